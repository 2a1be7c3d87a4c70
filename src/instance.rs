//! The metadata half of an instance, its key, and the attributes we index.
//!
//! A [`MetadataRecord`] is everything needed to rebuild the received data set except the bulk pixel
//! bytes: the metadata bytes, the splices that say where the bulk goes back, the transfer syntax,
//! and the digests and lengths of the bulk value and of the whole data set. Its canonical encoding
//! is hashed into the **instance key** (the design's "multi-use key"): the key names the pixel
//! object, checks both halves on every read (the record carries the pixel digest), and is what the
//! ledger commits to.

use sha2::{Digest, Sha256};

use crate::split::Splice;

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
        let mut r = Reader { bytes, pos: 0 };
        if r.take(8)? != RECORD_MAGIC {
            return Err(RecordError("unknown record version"));
        }
        let layout = match r.take(1)?[0] {
            1 => Layout::Split,
            2 => Layout::Whole,
            _ => return Err(RecordError("unknown layout")),
        };
        let transfer_syntax = r.string()?;
        let sop_class_uid = r.string()?;
        let sop_instance_uid = r.string()?;
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
        let pixel_sha256 = r.digest()?;
        let dataset_length = r.u64()?;
        let dataset_sha256 = r.digest()?;
        let meta = r.bytes()?.to_vec();
        if r.pos != bytes.len() {
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

/// The opaque object-store name of an instance's pixel data: a domain-separated hash of the
/// instance key, so the name reveals nothing and cannot be confused with other digests.
pub fn object_name(key: &Digest32) -> String {
    let mut h = Sha256::new();
    h.update(b"dicomchain/pixel-object/v1\0");
    h.update(key);
    hex::encode(h.finalize())
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as u32).to_be_bytes());
    out.extend_from_slice(b);
}

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], RecordError> {
        let end = self.pos.checked_add(n).ok_or(RecordError("length overflow"))?;
        let s = self.bytes.get(self.pos..end).ok_or(RecordError("truncated"))?;
        self.pos = end;
        Ok(s)
    }
    fn u32(&mut self) -> Result<u32, RecordError> {
        Ok(u32::from_be_bytes(self.take(4)?.try_into().map_err(|_| RecordError("truncated"))?))
    }
    fn u64(&mut self) -> Result<u64, RecordError> {
        Ok(u64::from_be_bytes(self.take(8)?.try_into().map_err(|_| RecordError("truncated"))?))
    }
    fn digest(&mut self) -> Result<Digest32, RecordError> {
        self.take(32)?.try_into().map_err(|_| RecordError("truncated"))
    }
    fn bytes(&mut self) -> Result<&'a [u8], RecordError> {
        let n = self.u32()? as usize;
        self.take(n)
    }
    fn string(&mut self) -> Result<String, RecordError> {
        String::from_utf8(self.bytes()?.to_vec()).map_err(|_| RecordError("non-UTF-8 string"))
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
}

/// Why the indexable attributes could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ParseError {
    #[error("data set cannot be parsed: {0}")]
    Parse(String),
    #[error("data set lacks {0}")]
    Missing(&'static str),
}

/// Parses the indexable prefix of a data set in the given transfer syntax.
pub fn index_attrs(prefix: &[u8], transfer_syntax: &str) -> Result<IndexAttrs, ParseError> {
    use dicom_dictionary_std::tags;
    use dicom_encoding::TransferSyntaxIndex;
    use dicom_transfer_syntax_registry::TransferSyntaxRegistry;

    let ts = TransferSyntaxRegistry
        .get(transfer_syntax)
        .ok_or_else(|| ParseError::Parse(format!("unknown transfer syntax {transfer_syntax}")))?;
    let obj = dicom_object::InMemDicomObject::read_dataset_with_ts(prefix, ts)
        .map_err(|e| ParseError::Parse(e.to_string()))?;
    let text = |tag| -> Option<String> {
        obj.get(tag)
            .and_then(|e| e.to_str().ok())
            .map(|s| s.trim_end_matches(['\0', ' ']).trim_start().to_string())
    };
    let required = |tag, what| text(tag).filter(|s| !s.is_empty()).ok_or(ParseError::Missing(what));
    Ok(IndexAttrs {
        sop_class_uid: required(tags::SOP_CLASS_UID, "SOP Class UID (0008,0016)")?,
        sop_instance_uid: required(tags::SOP_INSTANCE_UID, "SOP Instance UID (0008,0018)")?,
        study_instance_uid: text(tags::STUDY_INSTANCE_UID).unwrap_or_default(),
        series_instance_uid: text(tags::SERIES_INSTANCE_UID).unwrap_or_default(),
        patient_id: text(tags::PATIENT_ID).unwrap_or_default(),
    })
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
    fn key_and_name_depend_on_every_field() {
        let a = record();
        let mut b = record();
        b.pixel_sha256[0] ^= 1;
        let ka = instance_key(&a.encode());
        let kb = instance_key(&b.encode());
        assert_ne!(ka, kb);
        assert_ne!(object_name(&ka), object_name(&kb));
        assert_eq!(object_name(&ka).len(), 64);
        assert_ne!(object_name(&ka), hex::encode(ka));
    }

    #[test]
    fn prefix_stops_before_the_pixel_header() {
        assert_eq!(record().indexable_prefix().len(), 10);
    }
}
