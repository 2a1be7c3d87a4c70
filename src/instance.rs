//! The metadata half of an instance, its key, and the attributes we index.
//!
//! A [`MetadataRecord`] is everything needed to rebuild the received data set except the bulk pixel
//! bytes: the metadata bytes, the splices that say where the bulk goes back, the transfer syntax,
//! and the digests and lengths of the bulk value and of the whole data set. Its canonical encoding
//! is hashed into the **instance key** (the design's "multi-use key"): the key names the pixel
//! object, checks both halves on every read (the record carries the pixel digest), and is what the
//! ledger commits to.

use sha2::{Digest, Sha256};

use crate::dicom::{self, Encoding};
use crate::split::Splice;
use crate::util::bytes::{Reader, Truncated};

/// A SHA-256 digest.
pub type Digest32 = [u8; 32];

/// Version of the record encoding below.
const RECORD_MAGIC: &[u8; 8] = b"DCMETA\x00\x01";

/// How the metadata bytes relate to the received data set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// Metadata bytes with the bulk values cut out at the splices.
    Split = 1,
    /// Deflated Explicit VR LE: the deflate stream cannot be re-created bit for bit from its
    /// inflated form, so the received bytes are kept whole as metadata and nothing goes to the
    /// object store.
    Whole = 2,
}

/// The metadata half of one received instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetadataRecord {
    pub layout: Layout,
    pub transfer_syntax: String,
    pub sop_class_uid: String,
    pub sop_instance_uid: String,
    pub splices: Vec<Splice>,
    pub pixel_length: u64,
    pub pixel_sha256: Digest32,
    pub dataset_length: u64,
    pub dataset_sha256: Digest32,
    pub meta: Vec<u8>,
}

/// Why a stored record could not be decoded.
#[derive(Debug, thiserror::Error)]
#[error("metadata record is corrupt: {0}")]
pub struct RecordError(&'static str);

impl MetadataRecord {
    /// Canonical encoding: magic, then fields in order; integers big endian, strings and byte
    /// strings prefixed by a u32 length.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.meta.len() + 256);
        out.extend_from_slice(RECORD_MAGIC);
        out.push(self.layout as u8);
        put_bytes(&mut out, self.transfer_syntax.as_bytes());
        put_bytes(&mut out, self.sop_class_uid.as_bytes());
        put_bytes(&mut out, self.sop_instance_uid.as_bytes());
        out.extend_from_slice(&(self.splices.len() as u32).to_be_bytes());
        for s in &self.splices {
            out.extend_from_slice(&s.header_offset.to_be_bytes());
            out.extend_from_slice(&s.value_offset.to_be_bytes());
            out.extend_from_slice(&s.length.to_be_bytes());
        }
        out.extend_from_slice(&self.pixel_length.to_be_bytes());
        out.extend_from_slice(&self.pixel_sha256);
        out.extend_from_slice(&self.dataset_length.to_be_bytes());
        out.extend_from_slice(&self.dataset_sha256);
        put_bytes(&mut out, &self.meta);
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<MetadataRecord, RecordError> {
        let mut r = Reader::new(bytes);
        if r.take(8)? != RECORD_MAGIC {
            return Err(RecordError("unknown record version"));
        }
        let layout = match r.u8()? {
            1 => Layout::Split,
            2 => Layout::Whole,
            _ => return Err(RecordError("unknown layout")),
        };
        let transfer_syntax = string(&mut r)?;
        let sop_class_uid = string(&mut r)?;
        let sop_instance_uid = string(&mut r)?;
        let n = r.u32()? as usize;
        if n > bytes.len() / 24 {
            return Err(RecordError("splice count exceeds record"));
        }
        let mut splices = Vec::with_capacity(n);
        for _ in 0..n {
            splices.push(Splice {
                header_offset: r.u64()?,
                value_offset: r.u64()?,
                length: r.u64()?,
            });
        }
        let pixel_length = r.u64()?;
        let pixel_sha256 = r.array()?;
        let dataset_length = r.u64()?;
        let dataset_sha256 = r.array()?;
        let meta = r.bytes32()?.to_vec();
        if !r.is_empty() {
            return Err(RecordError("trailing bytes"));
        }
        Ok(MetadataRecord {
            layout,
            transfer_syntax,
            sop_class_uid,
            sop_instance_uid,
            splices,
            pixel_length,
            pixel_sha256,
            dataset_length,
            dataset_sha256,
            meta,
        })
    }

    /// The bytes before the first bulk element: a complete data set holding every attribute we
    /// index (they all sort before (7FE0,xxxx)).
    pub fn indexable_prefix(&self) -> &[u8] {
        let end = self
            .splices
            .first()
            .map(|s| s.header_offset as usize)
            .unwrap_or(self.meta.len())
            .min(self.meta.len());
        &self.meta[..end]
    }
}

/// The instance key of an encoded record.
pub fn instance_key(encoded_record: &[u8]) -> Digest32 {
    Sha256::digest(encoded_record).into()
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as u32).to_be_bytes());
    out.extend_from_slice(b);
}

/// A u32-length-prefixed UTF-8 field.
fn string(r: &mut Reader) -> Result<String, RecordError> {
    String::from_utf8(r.bytes32()?.to_vec()).map_err(|_| RecordError("non-UTF-8 string"))
}

impl From<Truncated> for RecordError {
    fn from(_: Truncated) -> RecordError {
        RecordError("truncated")
    }
}

/// The format byte of an [`ObjectKey`] record: that of the sealed objects it opens (format 2).
pub const OBJECT_KEY_FORMAT: u8 = 2;

/// The key record of one sealed pixel object: kept in the ledger (`keys` column family), never in
/// the bucket; the store derives the object's name and key from it.
#[derive(Clone, PartialEq, Eq)]
pub struct ObjectKey {
    pub salt: [u8; 32],
}

impl std::fmt::Debug for ObjectKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ObjectKey(..)")
    }
}

impl ObjectKey {
    /// `u8 format (2) · [32] object salt`.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(33);
        v.push(OBJECT_KEY_FORMAT);
        v.extend_from_slice(&self.salt);
        v
    }

    pub fn decode(b: &[u8]) -> Result<ObjectKey, RecordError> {
        match b {
            [OBJECT_KEY_FORMAT, salt @ ..] if salt.len() == 32 => Ok(ObjectKey {
                salt: salt.try_into().expect("length checked"),
            }),
            [OBJECT_KEY_FORMAT, ..] => Err(RecordError("object key record has the wrong length")),
            _ => Err(RecordError("object key record of an unknown format")),
        }
    }
}

/// The attributes the ledger's index keeps for one instance (never written to the ledger's
/// entries, which carry commitments only).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IndexAttrs {
    pub sop_class_uid: String,
    pub sop_instance_uid: String,
    pub study_instance_uid: String,
    pub series_instance_uid: String,
    pub patient_id: String,
    /// Modality (0008,0060), kept with the study's hierarchy key.
    pub modality: String,
    /// Normalised values of the C-FIND index attributes ([`crate::query::matching::INDEXED`]).
    pub find_values: Vec<(u32, String)>,
}

/// Why the indexable attributes could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ParseError {
    #[error("data set cannot be parsed: {0}")]
    Parse(String),
    #[error("data set lacks {0}")]
    Missing(&'static str),
}

/// Tags read for the index, as (group << 16 | element), ascending.
const SOP_CLASS_UID: u32 = 0x0008_0016;
const SOP_INSTANCE_UID: u32 = 0x0008_0018;
const PATIENT_ID: u32 = 0x0010_0020;
const STUDY_INSTANCE_UID: u32 = 0x0020_000D;
const SERIES_INSTANCE_UID: u32 = 0x0020_000E;
/// Deepest sequence nesting we follow; deeper is refused rather than risking the stack.
const MAX_DEPTH: usize = 64;

/// Reads the index attributes from the indexable prefix of a data set.
///
/// A small top-level scanner over the received bytes rather than a full parse: it reads only up
/// to the last attribute it needs, skips sequences structurally, and copes with whatever a real
/// sender puts before them (UN-encoded sequences, private sequences) — a general-purpose parser
/// would be slower and would refuse instances the splitter has already proven well-formed.
/// SOP Class and SOP Instance UID missing from the data set are taken from the command.
/// With `partial`, `prefix` is a cut-off start of the data set: an element cut off at its end
/// ends the scan instead of being an error.
pub fn index_attrs(
    prefix: &[u8],
    encoding: Encoding,
    fallback: (&str, &str),
    partial: bool,
) -> Result<IndexAttrs, ParseError> {
    let wanted = [
        SOP_CLASS_UID,
        SOP_INSTANCE_UID,
        PATIENT_ID,
        STUDY_INSTANCE_UID,
        SERIES_INSTANCE_UID,
    ];
    let mut found: Vec<(u32, &[u8])> = Vec::new();
    let scanner = Scanner { b: prefix };
    let mut pos = 0;
    while pos < prefix.len() {
        let h = match scanner.header(pos, encoding) {
            Ok(h) => h,
            Err(_) if partial => break,
            Err(e) => return Err(e),
        };
        if h.tag > SERIES_INSTANCE_UID {
            break;
        }
        let value_start = pos + h.size;
        let step = match h.value_length() {
            None => match scanner.skip_sequence(value_start, encoding.inside(h.vr), 1) {
                Ok(end) => end,
                Err(_) if partial => break,
                Err(e) => return Err(e),
            },
            Some(len) if partial && value_start.saturating_add(len as usize) > prefix.len() => {
                break
            }
            Some(len) => {
                let end = value_start
                    .checked_add(len as usize)
                    .filter(|e| *e <= prefix.len())
                    .ok_or_else(|| {
                        ParseError::Parse(format!(
                            "element ({:04X},{:04X}) runs past the data set",
                            h.tag >> 16,
                            h.tag & 0xFFFF
                        ))
                    })?;
                if wanted.contains(&h.tag) {
                    found.push((h.tag, &prefix[value_start..end]));
                }
                end
            }
        };
        pos = step;
    }
    let text = |tag: u32| -> String {
        found
            .iter()
            .find(|(t, _)| *t == tag)
            .map(|(_, v)| {
                String::from_utf8_lossy(v)
                    .trim_end_matches(['\0', ' '])
                    .trim_start()
                    .to_string()
            })
            .unwrap_or_default()
    };
    let or = |v: String, f: &str| if v.is_empty() { f.to_string() } else { v };
    let attrs = IndexAttrs {
        sop_class_uid: or(text(SOP_CLASS_UID), fallback.0),
        sop_instance_uid: or(text(SOP_INSTANCE_UID), fallback.1),
        study_instance_uid: text(STUDY_INSTANCE_UID),
        series_instance_uid: text(SERIES_INSTANCE_UID),
        patient_id: text(PATIENT_ID),
        modality: String::new(),
        find_values: Vec::new(),
    };
    // The index frames its keys with NUL; a value containing one could pose as another
    // instance's hierarchy.
    for (what, v) in [
        ("SOP Class UID", &attrs.sop_class_uid),
        ("SOP Instance UID", &attrs.sop_instance_uid),
        ("Study Instance UID", &attrs.study_instance_uid),
        ("Series Instance UID", &attrs.series_instance_uid),
        ("Patient ID", &attrs.patient_id),
    ] {
        if v.contains('\0') {
            return Err(ParseError::Parse(format!("{what} contains a NUL byte")));
        }
    }
    if attrs.sop_class_uid.is_empty() {
        return Err(ParseError::Missing("SOP Class UID (0008,0016)"));
    }
    if attrs.sop_instance_uid.is_empty() {
        return Err(ParseError::Missing("SOP Instance UID (0008,0018)"));
    }
    Ok(attrs)
}

/// Walks a data set held in one slice with [`dicom::read_header`], skipping what it does not
/// read. Every `enc` is that of the nesting level (Implicit VR LE inside an explicit UN).
struct Scanner<'a> {
    b: &'a [u8],
}

impl Scanner<'_> {
    fn truncated(pos: usize) -> ParseError {
        ParseError::Parse(format!("data set truncated at byte {pos}"))
    }

    fn tag(&self, pos: usize, enc: Encoding) -> Result<u32, ParseError> {
        dicom::read_tag(self.b.get(pos..).unwrap_or_default(), enc)
            .map_err(|_| Self::truncated(pos))
    }

    /// An element header (PS3.5 §7.1); an item or delimiter here is out of place.
    fn header(&self, pos: usize, enc: Encoding) -> Result<dicom::Header, ParseError> {
        if self.tag(pos, enc)? >> 16 == 0xFFFE {
            return Err(ParseError::Parse(format!(
                "unexpected item tag at byte {pos}"
            )));
        }
        dicom::read_header(&self.b[pos..], enc).map_err(|_| Self::truncated(pos))
    }

    /// Skips the items of an undefined-length sequence starting at `pos`; returns the position
    /// after its sequence delimitation item.
    fn skip_sequence(
        &self,
        mut pos: usize,
        enc: Encoding,
        depth: usize,
    ) -> Result<usize, ParseError> {
        if depth > MAX_DEPTH {
            return Err(ParseError::Parse("sequences nested too deeply".into()));
        }
        loop {
            if self.tag(pos, enc)? >> 16 != 0xFFFE {
                return Err(ParseError::Parse(format!("expected an item at byte {pos}")));
            }
            let h = dicom::read_header(&self.b[pos..], enc).map_err(|_| Self::truncated(pos))?;
            match h.tag {
                dicom::SEQUENCE_DELIMITATION => return Ok(pos + 8),
                dicom::ITEM if h.is_undefined_length() => {
                    pos = self.skip_item(pos + 8, enc, depth)?
                }
                dicom::ITEM => pos = pos + 8 + h.length as usize,
                _ => return Err(ParseError::Parse(format!("expected an item at byte {pos}"))),
            }
            if pos > self.b.len() {
                return Err(ParseError::Parse("item runs past the data set".into()));
            }
        }
    }

    /// Skips the elements of an undefined-length item up to and including its delimiter.
    fn skip_item(&self, mut pos: usize, enc: Encoding, depth: usize) -> Result<usize, ParseError> {
        loop {
            if self.tag(pos, enc)? == dicom::ITEM_DELIMITATION {
                return Ok(pos + 8);
            }
            let h = self.header(pos, enc)?;
            let value_start = pos + h.size;
            pos = match h.value_length() {
                None => self.skip_sequence(value_start, enc.inside(h.vr), depth + 1)?,
                Some(len) => value_start + len as usize,
            };
            if pos > self.b.len() {
                return Err(ParseError::Parse("element runs past the data set".into()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> MetadataRecord {
        MetadataRecord {
            layout: Layout::Split,
            transfer_syntax: "1.2.840.10008.1.2.1".into(),
            sop_class_uid: "1.2.840.10008.5.1.4.1.1.2".into(),
            sop_instance_uid: "1.2.3".into(),
            splices: vec![Splice {
                header_offset: 10,
                value_offset: 22,
                length: 4,
            }],
            pixel_length: 4,
            pixel_sha256: [7; 32],
            dataset_length: 26,
            dataset_sha256: [9; 32],
            meta: vec![1; 22],
        }
    }

    #[test]
    fn record_round_trips_and_rejects_damage() {
        let r = record();
        let enc = r.encode();
        assert_eq!(MetadataRecord::decode(&enc).unwrap(), r);
        for cut in [0, 5, 9, enc.len() - 1] {
            assert!(MetadataRecord::decode(&enc[..cut]).is_err());
        }
        let mut longer = enc.clone();
        longer.push(0);
        assert!(MetadataRecord::decode(&longer).is_err());
    }

    #[test]
    fn key_depends_on_every_field() {
        let a = record();
        let mut b = record();
        b.pixel_sha256[0] ^= 1;
        let ka = instance_key(&a.encode());
        let kb = instance_key(&b.encode());
        assert_ne!(ka, kb);
    }

    /// An element in little or big endian, explicit or implicit VR.
    fn el(tag: u32, vr: &[u8; 2], value: &[u8], enc: Encoding) -> Vec<u8> {
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
        let mut out = Vec::new();
        out.extend_from_slice(&u16b((tag >> 16) as u16));
        out.extend_from_slice(&u16b(tag as u16));
        match enc {
            Encoding::ImplicitLittle => out.extend_from_slice(&u32b(value.len() as u32)),
            _ if matches!(vr, b"SQ" | b"UN" | b"OB") => {
                out.extend_from_slice(vr);
                out.extend_from_slice(&[0, 0]);
                out.extend_from_slice(&u32b(value.len() as u32));
            }
            _ => {
                out.extend_from_slice(vr);
                out.extend_from_slice(&u16b(value.len() as u16));
            }
        }
        out.extend_from_slice(value);
        out
    }

    fn undefined_sequence(tag: u32, vr: &[u8; 2], items: &[u8], enc: Encoding) -> Vec<u8> {
        let mut s = el(tag, vr, &[], enc);
        let n = s.len();
        s[n - 4..].copy_from_slice(&[0xFF; 4]);
        // one undefined-length item with the given (little endian) content, then delimiters
        s.extend_from_slice(&[0xFE, 0xFF, 0x00, 0xE0, 0xFF, 0xFF, 0xFF, 0xFF]);
        s.extend_from_slice(items);
        s.extend_from_slice(&[0xFE, 0xFF, 0x0D, 0xE0, 0, 0, 0, 0]);
        s.extend_from_slice(&[0xFE, 0xFF, 0xDD, 0xE0, 0, 0, 0, 0]);
        s
    }

    fn sample(enc: Encoding) -> Vec<u8> {
        [
            el(0x0008_0016, b"UI", b"1.2.840.10008.5.1.4.1.1.2\0", enc),
            el(0x0008_0018, b"UI", b"1.2.3.4", enc),
            el(0x0010_0020, b"LO", b"PID ", enc),
            el(0x0020_000D, b"UI", b"1.2.3.5\0", enc),
            el(0x0020_000E, b"UI", b"1.2.3.6\0", enc),
            el(0x0028_0010, b"US", &[0, 2], enc),
        ]
        .concat()
    }

    #[test]
    fn index_attributes_in_every_encoding() {
        for enc in [
            Encoding::ImplicitLittle,
            Encoding::ExplicitLittle,
            Encoding::ExplicitBig,
        ] {
            let a = index_attrs(&sample(enc), enc, ("", ""), false).unwrap();
            assert_eq!(a.sop_class_uid, "1.2.840.10008.5.1.4.1.1.2", "{enc:?}");
            assert_eq!(a.sop_instance_uid, "1.2.3.4");
            assert_eq!(a.patient_id, "PID");
            assert_eq!(a.study_instance_uid, "1.2.3.5");
            assert_eq!(a.series_instance_uid, "1.2.3.6");
        }
    }

    #[test]
    fn sequences_before_the_attributes_are_skipped() {
        // An explicit UN sequence of undefined length holds Implicit VR LE items, even in a
        // big endian data set (PS3.5 §6.2.2); a nested SQ holds explicit ones.
        let implicit_item = el(0x0008_1150, b"UI", b"9.9\0", Encoding::ImplicitLittle);
        for enc in [Encoding::ExplicitLittle, Encoding::ExplicitBig] {
            let mut ds = el(0x0008_0016, b"UI", b"1.2\0", enc);
            ds.extend(undefined_sequence(0x0008_0017, b"UN", &implicit_item, enc));
            ds.extend(el(0x0008_0018, b"UI", b"7.7\0", enc));
            let a = index_attrs(&ds, enc, ("", ""), false).unwrap();
            assert_eq!(a.sop_instance_uid, "7.7", "{enc:?}");
        }
        let mut ds = el(0x0008_0016, b"UI", b"1.2\0", Encoding::ExplicitLittle);
        let inner = el(0x0008_1150, b"UI", b"9.9\0", Encoding::ExplicitLittle);
        ds.extend(undefined_sequence(
            0x0008_1140,
            b"SQ",
            &inner,
            Encoding::ExplicitLittle,
        ));
        ds.extend(el(0x0008_0018, b"UI", b"7.7\0", Encoding::ExplicitLittle));
        assert_eq!(
            index_attrs(&ds, Encoding::ExplicitLittle, ("", ""), false)
                .unwrap()
                .sop_instance_uid,
            "7.7"
        );
    }

    #[test]
    fn missing_uids_come_from_the_command_or_fail() {
        let enc = Encoding::ExplicitLittle;
        let ds = el(0x0010_0020, b"LO", b"PID ", enc);
        let a = index_attrs(&ds, enc, ("1.2.840.10008.5.1.4.1.1.7", "5.6"), false).unwrap();
        assert_eq!(
            (a.sop_class_uid.as_str(), a.sop_instance_uid.as_str()),
            ("1.2.840.10008.5.1.4.1.1.7", "5.6")
        );
        assert!(matches!(
            index_attrs(&ds, enc, ("", ""), false),
            Err(ParseError::Missing(_))
        ));
        let truncated = &sample(enc)[..20];
        assert!(matches!(
            index_attrs(truncated, enc, ("1", "2"), false),
            Err(ParseError::Parse(_))
        ));
        // A cut-off start (of a deflated data set) keeps what it found.
        let a = index_attrs(&sample(enc)[..40], enc, ("1", "2"), true).unwrap();
        assert_eq!(a.sop_class_uid, "1.2.840.10008.5.1.4.1.1.2");
        assert_eq!(a.sop_instance_uid, "2");
        let nul = [
            el(0x0008_0016, b"UI", b"1.2\0", enc),
            el(0x0008_0018, b"UI", b"1\x002.9", enc),
        ]
        .concat();
        assert!(matches!(
            index_attrs(&nul, enc, ("", ""), false),
            Err(ParseError::Parse(_))
        ));
    }

    proptest::proptest! {
        /// The scanner reads received bytes: arbitrary input yields attributes or an error.
        #[test]
        fn index_scanner_never_panics(
            bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..512),
            sel in 0u8..6,
        ) {
            let enc = [Encoding::ImplicitLittle, Encoding::ExplicitLittle, Encoding::ExplicitBig][sel as usize % 3];
            let _ = index_attrs(&bytes, enc, ("1.2", "3.4"), sel >= 3);
        }

        /// Damaged records decode to an error; intact ones round-trip.
        #[test]
        fn record_decoder_never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..512)) {
            if let Ok(r) = MetadataRecord::decode(&bytes) {
                proptest::prop_assert_eq!(MetadataRecord::decode(&r.encode()).unwrap(), r);
            }
        }
    }

    #[test]
    fn prefix_stops_before_the_pixel_header() {
        assert_eq!(record().indexable_prefix().len(), 10);
    }
}
