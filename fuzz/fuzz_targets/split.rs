//! The data set of a C-STORE is split while it arrives, in chunks of any size, then its metadata
//! is parsed for the index. Any input must end in a result or an error, never a panic; the bytes
//! the splitter emits (metadata + bulk) are exactly the input; and the split does not depend on
//! how the input was cut into chunks.
#![no_main]

use dicomchain::split::{Encoding, Piece, Splitter};
use libfuzzer_sys::fuzz_target;

fn split(enc: Encoding, data: &[u8], chunk: usize) -> Option<(Vec<u8>, Vec<u8>)> {
    let mut s = Splitter::new(enc);
    let (mut meta, mut bulk) = (Vec::new(), Vec::new());
    for piece in data.chunks(chunk.max(1)) {
        s.feed(piece, |p| match p {
            Piece::Meta(b) => meta.extend_from_slice(b),
            Piece::Bulk(b) => bulk.extend_from_slice(b),
        })
        .ok()?;
    }
    s.finish().ok()?;
    Some((meta, bulk))
}

fuzz_target!(|input: &[u8]| {
    let Some((&selector, data)) = input.split_first() else {
        return;
    };
    let enc = match selector % 3 {
        0 => Encoding::ImplicitLittle,
        1 => Encoding::ExplicitLittle,
        _ => Encoding::ExplicitBig,
    };
    let chunk = 1 + (selector as usize / 3) % 64;
    let whole = split(enc, data, data.len());
    let cut = split(enc, data, chunk);
    assert_eq!(whole, cut, "the split depends on the chunking");
    if let Some((meta, bulk)) = whole {
        assert_eq!(meta.len() + bulk.len(), data.len());
        let _ = dicomchain::instance::index_attrs(&meta, enc, ("1.2", "1.2.3"), false);
        let _ = dicomchain::query::index::index_values(&meta, enc, false);
    }
});
