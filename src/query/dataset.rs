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

use crate::dicom::{self, has_long_length, Encoding};

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

fn truncated<T>(pos: usize) -> Result<T, DatasetError> {
    err(format!("truncated at byte {pos}"))
}

/// Reads elements into the model with [`dicom::read_header`]; `enc` is that of the nesting level
/// (Implicit VR LE inside an explicit UN, PS3.5 §6.2.2).
struct Parser<'a> {
    b: &'a [u8],
}

impl<'a> Parser<'a> {
    fn tag(&self, pos: usize, enc: Encoding) -> Result<u32, DatasetError> {
        match dicom::read_tag(self.b.get(pos..).unwrap_or_default(), enc) {
            Ok(tag) => Ok(tag),
            Err(_) => truncated(pos),
        }
    }

    /// The header at `pos`, whose tag has been read (so `pos` is in bounds).
    fn header(&self, pos: usize, enc: Encoding) -> Result<dicom::Header, DatasetError> {
        match dicom::read_header(&self.b[pos..], enc) {
            Ok(h) => Ok(h),
            Err(_) => truncated(pos),
        }
    }

    /// Parses elements from `pos` until `end` (defined length) or an item delimiter (when
    /// `end` is `None`). Returns the elements and the position after them (after the delimiter).
    fn elements(
        &self,
        mut pos: usize,
        end: Option<usize>,
        enc: Encoding,
        depth: usize,
        top: bool,
        out: &mut Vec<Element<'a>>,
    ) -> Result<usize, DatasetError> {
        if depth > MAX_DEPTH {
            return err("sequences nested too deeply");
        }
        loop {
            match end {
                Some(e) if pos >= e => return Ok(pos),
                None if pos >= self.b.len() => return err("item without delimiter"),
                _ => {}
            }
            let tag = self.tag(pos, enc)?;
            if tag == dicom::ITEM_DELIMITATION {
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
            let h = self.header(pos, enc)?;
            let vr = h.vr.unwrap_or_else(|| dictionary_vr(tag));
            let value_start = pos + h.size;
            let undefined = h.is_undefined_length();
            let is_seq = &vr == b"SQ" || (undefined && (&vr == b"UN" || !enc.is_explicit()));
            if is_seq {
                let (items, next) = self.items(value_start, h.length, enc.inside(h.vr), depth)?;
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
                let stop = value_start + h.length as usize;
                let Some(raw) = self.b.get(value_start..stop) else {
                    return err(format!(
                        "({:04X},{:04X}) runs past the data set",
                        tag >> 16,
                        tag & 0xFFFF
                    ));
                };
                // Binary values are kept little endian (see the module docs).
                let unit = dicom::value_unit(&vr);
                let value = if enc.is_big_endian() && unit > 1 {
                    Cow::Owned(dicom::swap_units(raw, unit))
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
        enc: Encoding,
        depth: usize,
    ) -> Result<(Vec<Vec<Element<'a>>>, usize), DatasetError> {
        let end = (len != dicom::UNDEFINED_LENGTH).then(|| pos + len as usize);
        if end.is_some_and(|e| e > self.b.len()) {
            return err("sequence runs past the data set");
        }
        let mut items = Vec::new();
        loop {
            if end.is_some_and(|e| pos >= e) {
                return Ok((items, pos));
            }
            if self.tag(pos, enc)? >> 16 != 0xFFFE {
                return err(format!("expected an item at byte {pos}"));
            }
            let h = self.header(pos, enc)?;
            match h.tag {
                dicom::SEQUENCE_DELIMITATION if end.is_none() => return Ok((items, pos + 8)),
                dicom::ITEM => {
                    let item_end = h.value_length().map(|l| pos + 8 + l as usize);
                    if item_end.is_some_and(|e| e > self.b.len()) {
                        return err("item runs past the data set");
                    }
                    let mut els = Vec::new();
                    let next = self.elements(pos + 8, item_end, enc, depth + 1, false, &mut els)?;
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
    let p = Parser { b: bytes };
    let mut out = Vec::new();
    match p.elements(0, Some(bytes.len()), enc, 0, true, &mut out) {
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

/// Writes elements (sorted by the caller) in `enc` with [`dicom::write_header`]. Sequences and
/// items get undefined lengths.
pub fn write(elements: &[Element<'_>], enc: Encoding, out: &mut Vec<u8>) {
    for e in elements {
        match &e.value {
            Value::Items(items) => {
                dicom::write_header(out, enc, e.tag, b"SQ", dicom::UNDEFINED_LENGTH);
                for item in items {
                    dicom::write_item(out, enc, dicom::ITEM, dicom::UNDEFINED_LENGTH);
                    write(item, enc, out);
                    dicom::write_item(out, enc, dicom::ITEM_DELIMITATION, 0);
                }
                dicom::write_item(out, enc, dicom::SEQUENCE_DELIMITATION, 0);
            }
            Value::Bytes(b) => {
                // A value too long for its VR's 2-byte length (implicit-VR data allow it)
                // goes out as UN, which has a 4-byte length.
                let vr = if enc.is_explicit() && !has_long_length(&e.vr) && b.len() > 0xFFFF {
                    *b"UN"
                } else {
                    e.vr
                };
                dicom::write_header(out, enc, e.tag, &vr, b.len() as u32);
                let start = out.len();
                out.extend_from_slice(b);
                let unit = dicom::value_unit(&e.vr);
                if enc.is_big_endian() && unit > 1 {
                    dicom::swap_units_in_place(&mut out[start..], unit);
                }
            }
        }
    }
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
