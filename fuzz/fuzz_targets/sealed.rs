//! Sealed pixel objects come back from a bucket someone else holds: the opener must refuse any
//! bytes that are not what was sealed, without panicking, whatever pieces they arrive in; and
//! what it does open must be exactly the plaintext that was sealed.
#![no_main]

use dicomchain::instance::ObjectKey;
use dicomchain::store::MasterKey;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let master = MasterKey::from_bytes([9; 32]);
    let key = ObjectKey { salt: [3; 32] };
    // The first byte picks the piece size the bytes arrive in.
    let Some((&piece, rest)) = data.split_first() else {
        return;
    };
    let piece = 1 + piece as usize * 257;
    // Arbitrary bytes as an object: refused or opened, never a panic.
    let mut opener = master.opener(&key);
    let mut ok = true;
    for chunk in rest.chunks(piece) {
        if opener.push(chunk).is_err() {
            ok = false;
            break;
        }
    }
    if ok {
        let _ = opener.finish();
    }
    // The bytes as plaintext: sealed and opened in pieces, they come back unchanged.
    let (own, mut sealer) = master.sealer();
    let mut sealed = sealer.header().to_vec();
    for chunk in rest.chunks(piece) {
        sealer.push(chunk, &mut sealed);
    }
    sealer.finish(&mut sealed);
    let mut opener = master.opener(&own);
    let mut plain = Vec::new();
    for chunk in sealed.chunks(piece.max(7) - 6) {
        plain.extend(opener.push(chunk).expect("own object opens"));
    }
    plain.extend(opener.finish().expect("own object ends"));
    assert_eq!(plain, rest);
});
