//! The one data element header reader and the one writer (PS3.5 §7.1 element headers, §7.5
//! items and delimiters), and the byte-order and padding rules of values.
//!
//! [`read_header`] works on a slice holding the start of a header and either decodes it or says
//! how many bytes it needs ([`NeedMore`]), so that a streaming reader (the splitter) can gather
//! exactly one header across chunk boundaries and slice readers can report truncation. It never
//! looks at the value and never allocates.
//!
//! Leniency: an explicit VR outside PS3.5 Table 6.2-1 is read with the 2-byte length form (the
//! form of every VR but the long ones); callers that must refuse unknown VRs check
//! [`is_known_vr`]. Items and delimiters, group FFFE, have no VR in any encoding (PS3.5 §7.5).

use super::encoding::{has_long_length, Encoding};

/// (FFFE,E000) Item, (FFFE,E00D) Item Delimitation Item, (FFFE,E0DD) Sequence Delimitation Item
/// (PS3.5 §7.5): tag and 4-byte length, no VR.
pub const ITEM: u32 = 0xFFFE_E000;
pub const ITEM_DELIMITATION: u32 = 0xFFFE_E00D;
pub const SEQUENCE_DELIMITATION: u32 = 0xFFFE_E0DD;
/// The undefined length FFFFFFFFH (PS3.5 §7.1.1).
pub const UNDEFINED_LENGTH: u32 = 0xFFFF_FFFF;

/// A decoded element, item or delimiter header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// (group << 16) | element.
    pub tag: u32,
    /// The VR as received; `None` under implicit VR and for items and delimiters.
    pub vr: Option<[u8; 2]>,
    /// The length field as received: [`UNDEFINED_LENGTH`] for undefined length.
    pub length: u32,
    /// Bytes of the header itself: 8, or 12 for an explicit VR with a 4-byte length.
    pub size: usize,
}

impl Header {
    /// An item or a delimiter (group FFFE).
    #[inline]
    pub fn is_item_tag(&self) -> bool {
        self.tag >> 16 == 0xFFFE
    }

    #[inline]
    pub fn is_undefined_length(&self) -> bool {
        self.length == UNDEFINED_LENGTH
    }

    /// The defined length of the value, `None` when undefined.
    #[inline]
    pub fn value_length(&self) -> Option<u32> {
        (!self.is_undefined_length()).then_some(self.length)
    }
}

/// The slice ends inside a header: this many bytes (from the header's first byte) are needed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NeedMore(pub usize);

/// The tag at the start of `buf` (4 bytes), in the byte order of `enc`.
#[inline]
pub fn read_tag(buf: &[u8], enc: Encoding) -> Result<u32, NeedMore> {
    match buf {
        [a, b, c, d, ..] => Ok((u32::from(enc.u16([*a, *b])) << 16) | u32::from(enc.u16([*c, *d]))),
        _ => Err(NeedMore(4)),
    }
}

/// The header at the start of `buf` (PS3.5 §7.1.2 explicit VR, §7.1.3 implicit VR, §7.5 items).
///
/// Needs 8 bytes, and 12 for an explicit VR with a 4-byte length (Table 7.1-1); with fewer it
/// returns how many, so a caller holding 8 bytes learns after them whether 4 more follow.
#[inline]
pub fn read_header(buf: &[u8], enc: Encoding) -> Result<Header, NeedMore> {
    let Some(h) = buf.get(..8) else {
        return Err(NeedMore(8));
    };
    let group = enc.u16([h[0], h[1]]);
    let tag = (u32::from(group) << 16) | u32::from(enc.u16([h[2], h[3]]));
    if group == 0xFFFE || !enc.is_explicit() {
        return Ok(Header {
            tag,
            vr: None,
            length: enc.u32([h[4], h[5], h[6], h[7]]),
            size: 8,
        });
    }
    let vr = [h[4], h[5]];
    if !has_long_length(&vr) {
        return Ok(Header {
            tag,
            vr: Some(vr),
            length: u32::from(enc.u16([h[6], h[7]])),
            size: 8,
        });
    }
    match buf.get(8..12) {
        Some(l) => Ok(Header {
            tag,
            vr: Some(vr),
            length: enc.u32([l[0], l[1], l[2], l[3]]),
            size: 12,
        }),
        None => Err(NeedMore(12)),
    }
}

/// One of the 34 VRs of PS3.5 §6.2 Table 6.2-1.
pub fn is_known_vr(vr: &[u8; 2]) -> bool {
    has_long_length(vr)
        || matches!(
            vr,
            b"AE"
                | b"AS"
                | b"AT"
                | b"CS"
                | b"DA"
                | b"DS"
                | b"DT"
                | b"FD"
                | b"FL"
                | b"IS"
                | b"LO"
                | b"LT"
                | b"PN"
                | b"SH"
                | b"SL"
                | b"SS"
                | b"ST"
                | b"TM"
                | b"UI"
                | b"UL"
                | b"US"
        )
}

/// Appends an element header: the tag, then under explicit VR the VR and a 2-byte length, or 2
/// reserved zero bytes and a 4-byte length for the long VRs (PS3.5 §7.1.2); under implicit VR a
/// 4-byte length (§7.1.3). A short VR's length is cut to 16 bits: the caller picks a VR whose
/// length field holds the value.
pub fn write_header(out: &mut Vec<u8>, enc: Encoding, tag: u32, vr: &[u8; 2], length: u32) {
    out.extend_from_slice(&enc.u16_bytes((tag >> 16) as u16));
    out.extend_from_slice(&enc.u16_bytes(tag as u16));
    if !enc.is_explicit() {
        out.extend_from_slice(&enc.u32_bytes(length));
    } else if has_long_length(vr) {
        out.extend_from_slice(vr);
        out.extend_from_slice(&[0, 0]);
        out.extend_from_slice(&enc.u32_bytes(length));
    } else {
        out.extend_from_slice(vr);
        out.extend_from_slice(&enc.u16_bytes(length as u16));
    }
}

/// Appends an item or delimiter header (`tag` one of [`ITEM`], [`ITEM_DELIMITATION`],
/// [`SEQUENCE_DELIMITATION`]): tag and 4-byte length, no VR (PS3.5 §7.5).
pub fn write_item(out: &mut Vec<u8>, enc: Encoding, tag: u32, length: u32) {
    out.extend_from_slice(&enc.u16_bytes((tag >> 16) as u16));
    out.extend_from_slice(&enc.u16_bytes(tag as u16));
    out.extend_from_slice(&enc.u32_bytes(length));
}

/// Appends a whole element with a defined length: header, then `value` as given (already in
/// the byte order of `enc` and padded to even length, see [`padded`]).
pub fn write_element(out: &mut Vec<u8>, enc: Encoding, tag: u32, vr: &[u8; 2], value: &[u8]) {
    write_header(out, enc, tag, vr, value.len() as u32);
    out.extend_from_slice(value);
}

/// A text value padded to even length (PS3.5 §6.2): UI with a NUL, every other VR with a space.
pub fn padded(vr: &[u8; 2], text: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(text.len() + 1);
    v.extend_from_slice(text);
    if v.len() % 2 == 1 {
        v.push(if vr == b"UI" { 0 } else { b' ' });
    }
    v
}

/// Size of the units a binary VR's value is made of, which big endian reverses (PS3.5 §7.3);
/// 1 for text and byte values.
pub fn value_unit(vr: &[u8; 2]) -> usize {
    match vr {
        b"US" | b"SS" | b"OW" | b"AT" => 2,
        b"UL" | b"SL" | b"FL" | b"OF" | b"OL" => 4,
        b"FD" | b"OD" | b"SV" | b"UV" | b"OV" => 8,
        _ => 1,
    }
}

/// `bytes` with each `unit`-sized unit reversed: little ↔ big endian.
pub fn swap_units(bytes: &[u8], unit: usize) -> Vec<u8> {
    let mut out = bytes.to_vec();
    swap_units_in_place(&mut out, unit);
    out
}

/// Reverses each `unit`-sized unit of `bytes` (a trailing partial unit too, as received).
pub fn swap_units_in_place(bytes: &mut [u8], unit: usize) {
    if unit > 1 {
        for chunk in bytes.chunks_mut(unit) {
            chunk.reverse();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: [Encoding; 3] = [
        Encoding::ImplicitLittle,
        Encoding::ExplicitLittle,
        Encoding::ExplicitBig,
    ];

    #[test]
    fn headers_round_trip_in_every_encoding() {
        for enc in ALL {
            for (tag, vr, value) in [
                (0x0010_0010u32, b"PN", &b"DOE^JOHN"[..]),
                (0x0028_0010, b"US", &[0, 2][..]),
                (0x7FE0_0010, b"OW", &[1, 2, 3, 4][..]),
                (0x0009_1001, b"UN", &[][..]),
                (0x0008_0018, b"UI", &b"1.2.3\0"[..]),
            ] {
                let mut out = Vec::new();
                write_element(&mut out, enc, tag, vr, value);
                let h = read_header(&out, enc).unwrap();
                assert_eq!(h.tag, tag, "{enc:?}");
                assert_eq!(h.length as usize, value.len());
                assert_eq!(h.vr, enc.is_explicit().then_some(*vr));
                let long = enc.is_explicit() && has_long_length(vr);
                assert_eq!(h.size, if long { 12 } else { 8 });
                assert_eq!(&out[h.size..], value);
                assert_eq!(read_tag(&out, enc), Ok(tag));
            }
        }
    }

    #[test]
    fn truncated_headers_say_how_many_bytes_they_need() {
        for enc in ALL {
            let mut out = Vec::new();
            write_header(&mut out, enc, 0x0008_1140, b"SQ", 10);
            for cut in 0..out.len() {
                let need = if cut < 8 { 8 } else { 12 };
                assert_eq!(
                    read_header(&out[..cut], enc),
                    Err(NeedMore(need)),
                    "{enc:?}"
                );
            }
            assert_eq!(read_tag(&out[..3], enc), Err(NeedMore(4)));
        }
        // A short VR is complete after 8 bytes.
        let h = read_header(b"\x10\x00\x10\x00PN\x04\x00", Encoding::ExplicitLittle).unwrap();
        assert_eq!((h.size, h.length), (8, 4));
    }

    #[test]
    fn undefined_lengths_items_and_delimiters() {
        for enc in ALL {
            let mut out = Vec::new();
            write_header(&mut out, enc, 0x0008_1140, b"SQ", UNDEFINED_LENGTH);
            write_item(&mut out, enc, ITEM, UNDEFINED_LENGTH);
            write_item(&mut out, enc, ITEM_DELIMITATION, 0);
            write_item(&mut out, enc, SEQUENCE_DELIMITATION, 0);
            let sq = read_header(&out, enc).unwrap();
            assert!(sq.is_undefined_length() && !sq.is_item_tag());
            assert_eq!(sq.value_length(), None);
            let mut pos = sq.size;
            for (tag, length) in [
                (ITEM, UNDEFINED_LENGTH),
                (ITEM_DELIMITATION, 0),
                (SEQUENCE_DELIMITATION, 0),
            ] {
                let h = read_header(&out[pos..], enc).unwrap();
                assert_eq!((h.tag, h.vr, h.length, h.size), (tag, None, length, 8));
                assert!(h.is_item_tag());
                pos += 8;
            }
            assert_eq!(pos, out.len());
        }
    }

    #[test]
    fn big_endian_byte_order() {
        let mut out = Vec::new();
        write_element(&mut out, Encoding::ExplicitBig, 0x0028_0010, b"US", &[2, 0]);
        assert_eq!(out, [0x00, 0x28, 0x00, 0x10, b'U', b'S', 0x00, 0x02, 2, 0]);
        let mut out = Vec::new();
        write_header(
            &mut out,
            Encoding::ExplicitBig,
            0x7FE0_0010,
            b"OB",
            0x0102_0304,
        );
        assert_eq!(out, [0x7F, 0xE0, 0x00, 0x10, b'O', b'B', 0, 0, 1, 2, 3, 4]);
        // The same bytes read little endian are another tag.
        assert_eq!(read_tag(&out, Encoding::ExplicitLittle), Ok(0xE07F_1000));
        assert_eq!(swap_units(&[1, 2, 3, 4], value_unit(b"UL")), [4, 3, 2, 1]);
        assert_eq!(swap_units(&[1, 2, 3, 4], value_unit(b"US")), [2, 1, 4, 3]);
        assert_eq!(swap_units(&[1, 2, 3], value_unit(b"LO")), [1, 2, 3]);
    }

    #[test]
    fn unknown_vrs_read_with_the_short_form_and_are_flagged() {
        let h = read_header(b"\x08\x00\x16\x00ZZ\x02\x00", Encoding::ExplicitLittle).unwrap();
        assert_eq!((h.vr, h.length, h.size), (Some(*b"ZZ"), 2, 8));
        assert!(!is_known_vr(b"ZZ"));
        assert!(is_known_vr(b"UI") && is_known_vr(b"UV"));
        // Items carry no VR even under explicit VR.
        let h = read_header(
            b"\xFE\xFF\x00\xE0\x04\x00\x00\x00",
            Encoding::ExplicitLittle,
        )
        .unwrap();
        assert_eq!((h.tag, h.vr, h.length), (ITEM, None, 4));
    }

    #[test]
    fn padding_rules() {
        assert_eq!(padded(b"UI", b"1.2.3"), b"1.2.3\0");
        assert_eq!(padded(b"SH", b"ABC"), b"ABC ");
        assert_eq!(padded(b"AE", b"ABCD"), b"ABCD");
        assert_eq!(
            Encoding::ExplicitLittle.inside(Some(*b"UN")),
            Encoding::ImplicitLittle
        );
        assert_eq!(
            Encoding::ExplicitBig.inside(Some(*b"SQ")),
            Encoding::ExplicitBig
        );
        assert_eq!(Encoding::ExplicitBig.inside(None), Encoding::ExplicitBig);
    }

    proptest::proptest! {
        /// Any bytes decode to a header or a request for at most 12 bytes; never a panic.
        #[test]
        fn reader_never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..16), sel in 0usize..3) {
            match read_header(&bytes, ALL[sel]) {
                Ok(h) => proptest::prop_assert!(h.size <= bytes.len()),
                Err(NeedMore(n)) => proptest::prop_assert!(n > bytes.len() && n <= 12),
            }
        }
    }
}
