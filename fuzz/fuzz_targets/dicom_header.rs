//! The element header reader and the Part 10 header reader see bytes from the network and from
//! files. Any input must give a header, a request for more bytes or an error, never a panic; a
//! header read back from its own encoding is the same header; and the walk over a data set's
//! headers (after the Part 10 header when there is one) always moves forward.
#![no_main]

use dicomchain::dicom::{self, part10, Encoding, NeedMore};
use libfuzzer_sys::fuzz_target;

/// Reads every header from the start of `data` to its end, entering items and sequences.
fn walk(data: &[u8], enc: Encoding) {
    let mut pos = 0usize;
    while pos < data.len() {
        let h = match dicom::read_header(&data[pos..], enc) {
            Ok(h) => h,
            Err(NeedMore(n)) => {
                assert!(n > data.len() - pos && n <= 12);
                return;
            }
        };
        assert!(h.size == 8 || h.size == 12);
        let mut again = Vec::new();
        match h.vr {
            Some(vr) => dicom::write_header(&mut again, enc, h.tag, &vr, h.length),
            None if h.is_item_tag() || !enc.is_explicit() => {
                dicom::write_item(&mut again, enc, h.tag, h.length)
            }
            None => unreachable!("explicit VR element without a VR"),
        }
        assert_eq!(dicom::read_header(&again, enc), Ok(h));
        let skip = match h.value_length() {
            Some(len) if !h.is_item_tag() => len as usize,
            _ => 0,
        };
        pos = pos.saturating_add(h.size).saturating_add(skip);
    }
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
    match part10::read(data) {
        Ok(h) => {
            assert!(h.dataset_offset <= data.len());
            let enc = Encoding::from_transfer_syntax(&h.transfer_syntax).unwrap_or(enc);
            walk(&data[h.dataset_offset..], enc);
        }
        Err(_) => walk(data, enc),
    }
});
