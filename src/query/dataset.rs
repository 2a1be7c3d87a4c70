//! A small data set model for queries: parse identifiers and stored metadata into elements, and
//! write response identifiers in the negotiated encoding.
//!
//! Values stay as bytes (never decoded into typed values): text is compared after decoding with
//! [`super::charset`], and responses copy the stored bytes. Binary values are held in little
//! endian order whatever the source encoding, so writing to any encoding is a byte swap at most.
//! Implicit VR data get their VR from the standard dictionary (UN when unknown).

use std::borrow::Cow;

use dicom_core::dictionary::DataDictionary;
use dicom_core::Tag;
use dicom_dictionary_std::StandardDataDictionary;

use crate::split::{has_long_length, Encoding};

/// Deepest sequence nesting accepted.
const MAX_DEPTH: usize = 32;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Element<'a> {
    pub tag: u32,
    pub vr: [u8; 2],
    pub value: Value<'a>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value<'a> {
    /// The value bytes, binary VRs in little endian order.
    Bytes(Cow<'a, [u8]>),
    /// The items of a sequence.
    Items(Vec<Vec<Element<'a>>>),
}

impl Element<'_> {
    pub fn bytes(&self) -> &[u8] {
        match &self.value {
            Value::Bytes(b) => b,
            Value::Items(_) => &[],
        }
    }

    pub fn is_empty(&self) -> bool {
        match &self.value {
            Value::Bytes(b) => b.is_empty(),
            Value::Items(items) => items.is_empty(),
        }
    }

    pub fn into_owned(self) -> Element<'static> {
        Element {
            tag: self.tag,
            vr: self.vr,
            value: match self.value {
                Value::Bytes(b) => Value::Bytes(Cow::Owned(b.into_owned())),
                Value::Items(items) => Value::Items(
                    items
                        .into_iter()
                        .map(|i| i.into_iter().map(Element::into_owned).collect())
                        .collect(),
                ),
            },
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("identifier cannot be parsed: {0}")]
pub struct DatasetError(pub String);

fn err<T>(msg: impl Into<String>) -> Result<T, DatasetError> {
    Err(DatasetError(msg.into()))
}

/// The dictionary VR of a tag, `UN` when unknown (private tags included).
pub fn dictionary_vr(tag: u32) -> [u8; 2] {
    if tag & 0xFFFF == 0 {
        return *b"UL"; // group length
    }
    StandardDataDictionary
        .by_tag(Tag((tag >> 16) as u16, tag as u16))
        .map(|e| e.vr.relaxed().to_bytes())
        .unwrap_or(*b"UN")
}

/// Size of the units a binary VR is made of (for byte order), 1 for text and bytes.
fn unit(vr: &[u8; 2]) -> usize {
    match vr {
        b"US" | b"SS" | b"OW" | b"AT" => 2,
        b"UL" | b"SL" | b"FL" | b"OF" | b"OL" => 4,
        b"FD" | b"OD" | b"SV" | b"UV" | b"OV" => 8,
        _ => 1,
    }
}

fn swap(bytes: &[u8], unit: usize) -> Vec<u8> {
    let mut out = bytes.to_vec();
    if unit > 1 {
        for chunk in out.chunks_mut(unit) {
            chunk.reverse();
        }
    }
    out
}

struct Parser<'a> {
    b: &'a [u8],
    big: bool,
}

impl<'a> Parser<'a> {
    fn u16(&self, pos: usize, big: bool) -> Result<u16, DatasetError> {
        let s: [u8; 2] = match self.b.get(pos..pos + 2) {
            Some(s) => [s[0], s[1]],
            None => return err(format!("truncated at byte {pos}")),
        };
        Ok(if big {
            u16::from_be_bytes(s)
        } else {
            u16::from_le_bytes(s)
        })
    }

    fn u32(&self, pos: usize, big: bool) -> Result<u32, DatasetError> {
        let s: [u8; 4] = match self.b.get(pos..pos + 4) {
            Some(s) => [s[0], s[1], s[2], s[3]],
            None => return err(format!("truncated at byte {pos}")),
        };
        Ok(if big {
            u32::from_be_bytes(s)
        } else {
            u32::from_le_bytes(s)
        })
    }

    /// Parses elements from `pos` until `end` (defined length) or an item delimiter (when
    /// `end` is `None`). Returns the elements and the position after them (after the delimiter).
    fn elements(
        &self,
        mut pos: usize,
        end: Option<usize>,
        explicit: bool,
        depth: usize,
        top: bool,
        out: &mut Vec<Element<'a>>,
    ) -> Result<usize, DatasetError> {
        if depth > MAX_DEPTH {
            return err("sequences nested too deeply");
        }
        let big = self.big && explicit;
        loop {
            match end {
                Some(e) if pos >= e => return Ok(pos),
                None if pos >= self.b.len() => return err("item without delimiter"),
                _ => {}
            }
            let tag = (u32::from(self.u16(pos, big)?) << 16) | u32::from(self.u16(pos + 2, big)?);
            if tag == 0xFFFE_E00D {
                if end.is_some() {
                    return err(format!("unexpected item delimiter at byte {pos}"));
                }
                return Ok(pos + 8);
            }
            if tag >> 16 == 0xFFFE {
                return err(format!("unexpected item tag at byte {pos}"));
            }
            // Pixel data and what follows are never part of a query answer.
            if top && tag >= 0x7FE0_0000 {
                return Ok(end.unwrap_or(self.b.len()));
            }
            let (vr, len, value_start) = if explicit {
                let vr = match self.b.get(pos + 4..pos + 6) {
                    Some(v) => [v[0], v[1]],
                    None => return err(format!("truncated at byte {pos}")),
                };
                if has_long_length(&vr) {
                    (vr, self.u32(pos + 8, big)?, pos + 12)
                } else {
                    (vr, u32::from(self.u16(pos + 6, big)?), pos + 8)
                }
            } else {
                (dictionary_vr(tag), self.u32(pos + 4, big)?, pos + 8)
            };
            let undefined = len == u32::MAX;
            let is_seq = &vr == b"SQ" || (undefined && (&vr == b"UN" || !explicit));
            if is_seq {
                // An undefined-length UN holds Implicit VR LE items (PS3.5 §6.2.2).
                let inner_explicit = explicit && &vr == b"SQ";
                let (items, next) = self.items(value_start, len, inner_explicit, depth)?;
                out.push(Element {
                    tag,
                    vr: *b"SQ",
                    value: Value::Items(items),
                });
                pos = next;
            } else {
                if undefined {
                    return err(format!(
                        "undefined length on ({:04X},{:04X})",
                        tag >> 16,
                        tag & 0xFFFF
                    ));
                }
                let stop = value_start + len as usize;
                let Some(raw) = self.b.get(value_start..stop) else {
                    return err(format!(
                        "({:04X},{:04X}) runs past the data set",
                        tag >> 16,
                        tag & 0xFFFF
                    ));
                };
                let value = if big && unit(&vr) > 1 {
                    Cow::Owned(swap(raw, unit(&vr)))
                } else {
                    Cow::Borrowed(raw)
                };
                out.push(Element {
                    tag,
                    vr,
                    value: Value::Bytes(value),
                });
                pos = stop;
            }
        }
    }

    fn items(
        &self,
        mut pos: usize,
        len: u32,
        explicit: bool,
        depth: usize,
    ) -> Result<(Vec<Vec<Element<'a>>>, usize), DatasetError> {
        let end = (len != u32::MAX).then(|| pos + len as usize);
        if end.is_some_and(|e| e > self.b.len()) {
            return err("sequence runs past the data set");
        }
        let big = self.big && explicit;
        let mut items = Vec::new();
        loop {
            if end.is_some_and(|e| pos >= e) {
                return Ok((items, pos));
            }
            let tag = (u32::from(self.u16(pos, big)?) << 16) | u32::from(self.u16(pos + 2, big)?);
            let ilen = self.u32(pos + 4, big)?;
            match tag {
                0xFFFE_E0DD if end.is_none() => return Ok((items, pos + 8)),
                0xFFFE_E000 => {
                    let item_end = (ilen != u32::MAX).then(|| pos + 8 + ilen as usize);
                    if item_end.is_some_and(|e| e > self.b.len()) {
                        return err("item runs past the data set");
                    }
                    let mut els = Vec::new();
                    let next =
                        self.elements(pos + 8, item_end, explicit, depth + 1, false, &mut els)?;
                    items.push(els);
                    pos = next;
                }
                _ => return err(format!("expected an item at byte {pos}")),
            }
        }
    }
}

/// Parses a data set. With `partial`, an element cut off at the end ends the parse instead of
/// failing it (the start of a deflated data set): the complete elements before it are kept.
pub fn parse(bytes: &[u8], enc: Encoding, partial: bool) -> Result<Vec<Element<'_>>, DatasetError> {
    let p = Parser {
        b: bytes,
        big: enc == Encoding::ExplicitBig,
    };
    let mut out = Vec::new();
    match p.elements(
        0,
        Some(bytes.len()),
        enc != Encoding::ImplicitLittle,
        0,
        true,
        &mut out,
    ) {
        Ok(_) => Ok(out),
        Err(_) if partial => Ok(out),
        Err(e) => Err(e),
    }
}

/// Finds a top-level element.
pub fn find<'e, 'a>(elements: &'e [Element<'a>], tag: u32) -> Option<&'e Element<'a>> {
    elements
        .binary_search_by_key(&tag, |e| e.tag)
        .ok()
        .map(|i| &elements[i])
        .or_else(|| elements.iter().find(|e| e.tag == tag))
}

/// Writes elements (sorted by the caller) in `enc`. Sequences and items get undefined lengths.
pub fn write(elements: &[Element<'_>], enc: Encoding, out: &mut Vec<u8>) {
    let explicit = enc != Encoding::ImplicitLittle;
    let big = enc == Encoding::ExplicitBig;
    let u16b = |v: u16| {
        if big {
            v.to_be_bytes()
        } else {
            v.to_le_bytes()
        }
    };
    let u32b = |v: u32| {
        if big {
            v.to_be_bytes()
        } else {
            v.to_le_bytes()
        }
    };
    for e in elements {
        out.extend_from_slice(&u16b((e.tag >> 16) as u16));
        out.extend_from_slice(&u16b(e.tag as u16));
        match &e.value {
            Value::Items(items) => {
                if explicit {
                    out.extend_from_slice(b"SQ\0\0");
                }
                out.extend_from_slice(&u32b(u32::MAX));
                for item in items {
                    out.extend_from_slice(&u16b(0xFFFE));
                    out.extend_from_slice(&u16b(0xE000));
                    out.extend_from_slice(&u32b(u32::MAX));
                    write(item, enc, out);
                    out.extend_from_slice(&u16b(0xFFFE));
                    out.extend_from_slice(&u16b(0xE00D));
                    out.extend_from_slice(&u32b(0));
                }
                out.extend_from_slice(&u16b(0xFFFE));
                out.extend_from_slice(&u16b(0xE0DD));
                out.extend_from_slice(&u32b(0));
            }
            Value::Bytes(b) => {
                let len = b.len() as u32;
                // A value too long for its VR's 2-byte length (implicit-VR data allow it)
                // goes out as UN, which has a 4-byte length.
                let vr = if explicit && !has_long_length(&e.vr) && b.len() > 0xFFFF {
                    *b"UN"
                } else {
                    e.vr
                };
                if explicit {
                    out.extend_from_slice(&vr);
                    if has_long_length(&vr) {
                        out.extend_from_slice(&[0, 0]);
                        out.extend_from_slice(&u32b(len));
                    } else {
                        out.extend_from_slice(&u16b(len as u16));
                    }
                } else {
                    out.extend_from_slice(&u32b(len));
                }
                if big && unit(&e.vr) > 1 {
                    out.extend_from_slice(&swap(b, unit(&e.vr)));
                } else {
                    out.extend_from_slice(b);
                }
            }
        }
    }
}

/// A text value padded to even length (UI with NUL, other VRs with a space).
pub fn padded(vr: &[u8; 2], text: &[u8]) -> Vec<u8> {
    let mut v = text.to_vec();
    if v.len() % 2 == 1 {
        v.push(if vr == b"UI" { 0 } else { b' ' });
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<Element<'static>> {
        vec![
            Element {
                tag: 0x0008_0052,
                vr: *b"CS",
                value: Value::Bytes(Cow::Owned(b"STUDY ".to_vec())),
            },
            Element {
                tag: 0x0020_1206,
                vr: *b"IS",
                value: Value::Bytes(Cow::Owned(b"12".to_vec())),
            },
            Element {
                tag: 0x0028_0010,
                vr: *b"US",
                value: Value::Bytes(Cow::Owned(vec![0, 2])),
            },
            Element {
                tag: 0x0040_0275,
                vr: *b"SQ",
                value: Value::Items(vec![vec![Element {
                    tag: 0x0040_1001,
                    vr: *b"SH",
                    value: Value::Bytes(Cow::Owned(b"RP1 ".to_vec())),
                }]]),
            },
        ]
    }

    #[test]
    fn round_trips_in_every_encoding() {
        for enc in [
            Encoding::ImplicitLittle,
            Encoding::ExplicitLittle,
            Encoding::ExplicitBig,
        ] {
            let mut out = Vec::new();
            write(&sample(), enc, &mut out);
            let back = parse(&out, enc, false).unwrap();
            assert_eq!(back, sample(), "{enc:?}");
            // A cut anywhere keeps the complete elements before it in partial mode and fails
            // otherwise; never a panic.
            for cut in 0..out.len() {
                let _ = parse(&out[..cut], enc, false);
                let p = parse(&out[..cut], enc, true).unwrap();
                assert!(p.len() <= sample().len());
            }
            let p = parse(&out, enc, true).unwrap();
            assert_eq!(p, sample(), "partial {enc:?}");
        }
    }

    #[test]
    fn deep_nesting_is_refused() {
        let mut ds = Vec::new();
        for _ in 0..100 {
            ds.extend_from_slice(&[
                0x40, 0x00, 0x75, 0x02, b'S', b'Q', 0, 0, 0xFF, 0xFF, 0xFF, 0xFF,
            ]);
            ds.extend_from_slice(&[0xFE, 0xFF, 0x00, 0xE0, 0xFF, 0xFF, 0xFF, 0xFF]);
        }
        assert!(parse(&ds, Encoding::ExplicitLittle, false).is_err());
    }

    proptest::proptest! {
        #[test]
        fn never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..300), sel in 0u8..6) {
            let enc = [Encoding::ImplicitLittle, Encoding::ExplicitLittle, Encoding::ExplicitBig][sel as usize % 3];
            let _ = parse(&bytes, enc, sel >= 3);
        }
    }
}
