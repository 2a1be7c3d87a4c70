//! Ledger entries: canonical, versioned byte encoding and hashing (pure).
//!
//! An entry carries commitments only — digests, lengths, AE titles, UIDs of SOP *classes* and
//! transfer syntaxes — never patient attributes. Each entry names the hash of the one before it,
//! so the entries form a hash chain; the entry hash is SHA-256 over the encoding below.
//!
//! Encoding v1 (integers big endian; `str` = u16 length + UTF-8 bytes):
//! `"DCLEDGER"` · u8 version=1 · u8 event · u64 seq · [32] prev_hash · i64 time_micros ·
//! str calling_ae · str sop_class_uid · str transfer_syntax · [32] instance_key ·
//! [32] pixel_sha256 · u64 pixel_length · [32] dataset_sha256 · u64 dataset_length ·
//! str object_name (empty when the instance has no bulk data) · u32 version_of_instance ·
//! u64 subject_seq · u8 reason
//!
//! Encoding v2 = v1 (with version byte 2) followed by `u16 status · str peer · str detail`. An
//! entry is written as v2 only when one of those is set (a forward outcome), so every v1 entry
//! re-encodes to its original bytes and the encoding stays canonical.
//!
//! For a stored instance, `subject_seq` and `reason` are 0. An integrity failure (event 2) names
//! the entry whose instance failed a check in `subject_seq`, copies that entry's commitments, and
//! says what failed in `reason` (see [`Reason`]); `calling_ae` then names who detected it.
//! A forward outcome (event 3) names the stored entry whose instance was forwarded in
//! `subject_seq` and copies its commitments; `calling_ae` is our AE title (the sender), `peer` the
//! destination's AE title, `status` the destination's C-STORE status (or 0x0110 when the instance
//! never reached it) and `detail` what went wrong, without patient data.

use sha2::{Digest, Sha256};

use crate::instance::Digest32;
use crate::util::bytes::{Reader, Truncated};

const MAGIC: &[u8; 8] = b"DCLEDGER";
const VERSION: u8 = 1;
/// The outcome recorded on an integrity-failure entry: Processing failure (PS3.7 C.4, 0110H).
/// An alert is never a success: the instance it names was not delivered.
pub const INTEGRITY_FAILURE_STATUS: u16 = 0x0110;

/// The encoding with the outcome fields (status, peer, detail).
const VERSION_OUTCOME: u8 = 2;

/// What an entry records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// An instance (or a new version of one) was stored.
    Store = 1,
    /// A retrieval found an instance that no longer matches this ledger (a security event).
    IntegrityFailure = 2,
    /// The final outcome of forwarding a stored instance to a destination (an audit event).
    Forward = 3,
    /// Permissions granted to an AE title (`peer`), listed in `detail` (e.g. "store,find").
    Grant = 4,
    /// Permissions revoked from an AE title (`peer`), listed in `detail`.
    Revoke = 5,
    /// An audit record (association, query, retrieval): `version` holds its DICOM audit event
    /// ID (DCM 1101xx), `status` the outcome, `peer` the peer address or destination.
    Audit = 6,
    /// Stored entries whose instances were erased (see `ledger::erase`): `peer` "study" or
    /// "patient", `detail` their sequence numbers as ranges, `subject_seq` how many.
    Erase = 7,
}

/// What an integrity failure found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    None = 0,
    /// The metadata record is missing or does not hash to its instance key.
    Metadata = 1,
    /// The pixel object's bytes do not hash to the recorded digest.
    Pixel = 2,
    /// The pixel object is missing.
    MissingObject = 3,
    /// The rebuilt data set does not hash to the recorded digest.
    Dataset = 4,
    /// The pixel object did not survive a crash that came before the C-STORE was acknowledged
    /// (found by the startup reconciliation; see `ledger::unacked`).
    Unacknowledged = 5,
}

impl Reason {
    pub fn from_u8(v: u8) -> Option<Reason> {
        Some(match v {
            0 => Reason::None,
            1 => Reason::Metadata,
            2 => Reason::Pixel,
            3 => Reason::MissingObject,
            4 => Reason::Dataset,
            5 => Reason::Unacknowledged,
            _ => return None,
        })
    }

    pub fn describe(self) -> &'static str {
        match self {
            Reason::None => "none",
            Reason::Metadata => "metadata record does not match the ledger",
            Reason::Pixel => "pixel data does not match the ledger",
            Reason::MissingObject => "pixel object is missing",
            Reason::Dataset => "rebuilt data set does not match the ledger",
            Reason::Unacknowledged => {
                "pixel object lost in a crash before the C-STORE was acknowledged"
            }
        }
    }
}

/// One ledger entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub seq: u64,
    pub prev_hash: Digest32,
    pub time_micros: i64,
    pub event: Event,
    pub calling_ae: String,
    pub sop_class_uid: String,
    pub transfer_syntax: String,
    pub instance_key: Digest32,
    pub pixel_sha256: Digest32,
    pub pixel_length: u64,
    pub dataset_sha256: Digest32,
    pub dataset_length: u64,
    pub object_name: String,
    /// 1 for the first version of a SOP Instance, 2 for the next, …
    pub version: u32,
    /// For an integrity failure: the entry whose instance failed (0 otherwise).
    pub subject_seq: u64,
    /// For an integrity failure: what failed.
    pub reason: Reason,
    /// For an outcome: the DIMSE status (0 otherwise).
    pub status: u16,
    /// For an outcome: the peer AE title (empty otherwise).
    pub peer: String,
    /// For an outcome: what went wrong, without patient data (empty otherwise).
    pub detail: String,
}

/// An entry that could not be decoded.
#[derive(Debug, thiserror::Error)]
#[error("ledger entry is corrupt: {0}")]
pub struct EntryError(&'static str);

impl Entry {
    /// An entry that commits to no instance (every digest, length and name zero or empty):
    /// the base of grants, revocations and audit records, which set their own fields on it.
    pub fn event(seq: u64, prev_hash: Digest32, time_micros: i64, event: Event) -> Entry {
        Entry {
            seq,
            prev_hash,
            time_micros,
            event,
            calling_ae: String::new(),
            sop_class_uid: String::new(),
            transfer_syntax: String::new(),
            instance_key: [0; 32],
            pixel_sha256: [0; 32],
            pixel_length: 0,
            dataset_sha256: [0; 32],
            dataset_length: 0,
            object_name: String::new(),
            version: 0,
            subject_seq: 0,
            reason: Reason::None,
            status: 0,
            peer: String::new(),
            detail: String::new(),
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(320);
        let outcome = self.has_outcome();
        out.extend_from_slice(MAGIC);
        out.push(if outcome { VERSION_OUTCOME } else { VERSION });
        out.push(self.event as u8);
        out.extend_from_slice(&self.seq.to_be_bytes());
        out.extend_from_slice(&self.prev_hash);
        out.extend_from_slice(&self.time_micros.to_be_bytes());
        put_str(&mut out, &self.calling_ae);
        put_str(&mut out, &self.sop_class_uid);
        put_str(&mut out, &self.transfer_syntax);
        out.extend_from_slice(&self.instance_key);
        out.extend_from_slice(&self.pixel_sha256);
        out.extend_from_slice(&self.pixel_length.to_be_bytes());
        out.extend_from_slice(&self.dataset_sha256);
        out.extend_from_slice(&self.dataset_length.to_be_bytes());
        put_str(&mut out, &self.object_name);
        out.extend_from_slice(&self.version.to_be_bytes());
        out.extend_from_slice(&self.subject_seq.to_be_bytes());
        out.push(self.reason as u8);
        if outcome {
            out.extend_from_slice(&self.status.to_be_bytes());
            put_str(&mut out, &self.peer);
            put_str(&mut out, &self.detail);
        }
        out
    }

    /// Whether the entry needs the v2 encoding.
    fn has_outcome(&self) -> bool {
        self.status != 0 || !self.peer.is_empty() || !self.detail.is_empty()
    }

    /// The hash the next entry chains to.
    pub fn hash(&self) -> Digest32 {
        Sha256::digest(self.encode()).into()
    }

    pub fn decode(b: &[u8]) -> Result<Entry, EntryError> {
        let mut r = Reader::new(b);
        if r.take(8)? != MAGIC {
            return Err(EntryError("bad magic"));
        }
        let version = r.u8()?;
        if version != VERSION && version != VERSION_OUTCOME {
            return Err(EntryError("unknown entry version"));
        }
        let event = match r.u8()? {
            1 => Event::Store,
            2 => Event::IntegrityFailure,
            3 => Event::Forward,
            4 => Event::Grant,
            5 => Event::Revoke,
            6 => Event::Audit,
            7 => Event::Erase,
            _ => return Err(EntryError("unknown event")),
        };
        let mut e = Entry {
            event,
            seq: r.u64()?,
            prev_hash: r.array()?,
            time_micros: r.u64()? as i64,
            calling_ae: text(&mut r)?,
            sop_class_uid: text(&mut r)?,
            transfer_syntax: text(&mut r)?,
            instance_key: r.array()?,
            pixel_sha256: r.array()?,
            pixel_length: r.u64()?,
            dataset_sha256: r.array()?,
            dataset_length: r.u64()?,
            object_name: text(&mut r)?,
            version: r.u32()?,
            subject_seq: r.u64()?,
            reason: Reason::from_u8(r.u8()?).ok_or(EntryError("unknown reason"))?,
            status: 0,
            peer: String::new(),
            detail: String::new(),
        };
        if version == VERSION_OUTCOME {
            e.status = r.u16()?;
            e.peer = text(&mut r)?;
            e.detail = text(&mut r)?;
            if !e.has_outcome() {
                // The same entry has a v1 encoding: two encodings of one entry are not allowed.
                return Err(EntryError("v2 entry without outcome fields"));
            }
        }
        if !r.is_empty() {
            return Err(EntryError("trailing bytes"));
        }
        Ok(e)
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    let b = &s.as_bytes()[..s.len().min(u16::MAX as usize)];
    out.extend_from_slice(&(b.len() as u16).to_be_bytes());
    out.extend_from_slice(b);
}

/// A u16-length-prefixed UTF-8 field.
fn text(r: &mut Reader) -> Result<String, EntryError> {
    String::from_utf8(r.bytes16()?.to_vec()).map_err(|_| EntryError("non-UTF-8 text"))
}

impl From<Truncated> for EntryError {
    fn from(_: Truncated) -> EntryError {
        EntryError("truncated")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn sample(seq: u64, prev: Digest32) -> Entry {
        Entry {
            seq,
            prev_hash: prev,
            time_micros: 1_700_000_000_000_000,
            event: Event::Store,
            calling_ae: "STORESCU".into(),
            sop_class_uid: "1.2.840.10008.5.1.4.1.1.2".into(),
            transfer_syntax: "1.2.840.10008.1.2.1".into(),
            instance_key: [1; 32],
            pixel_sha256: [2; 32],
            pixel_length: 524288,
            dataset_sha256: [3; 32],
            dataset_length: 526000,
            object_name: "ab".repeat(32),
            version: 1,
            subject_seq: 0,
            reason: Reason::None,
            status: 0,
            peer: String::new(),
            detail: String::new(),
        }
    }

    #[test]
    fn encoding_round_trips_and_hash_covers_every_field() {
        let e = sample(1, [0; 32]);
        let enc = e.encode();
        assert_eq!(Entry::decode(&enc).unwrap(), e);
        assert!(Entry::decode(&enc[..enc.len() - 1]).is_err());
        let mut f = e.clone();
        f.calling_ae = "OTHER".into();
        assert_ne!(e.hash(), f.hash());
        let mut g = e.clone();
        g.prev_hash[31] = 1;
        assert_ne!(e.hash(), g.hash());
    }

    #[test]
    fn outcome_entries_use_v2_and_plain_entries_stay_v1() {
        let plain = sample(1, [0; 32]).encode();
        assert_eq!(plain[8], 1);
        let mut f = sample(2, [9; 32]);
        f.event = Event::Forward;
        f.subject_seq = 1;
        f.peer = "PACS".into();
        f.status = 0xA700;
        f.detail = "out of resources".into();
        let enc = f.encode();
        assert_eq!(enc[8], 2);
        assert_eq!(Entry::decode(&enc).unwrap(), f);
        assert!(Entry::decode(&enc[..enc.len() - 1]).is_err());
        // A v2 encoding of an entry without outcome fields is not canonical.
        let mut v2_plain = plain.clone();
        v2_plain[8] = 2;
        v2_plain.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
        assert!(Entry::decode(&v2_plain).is_err());
        let mut g = f.clone();
        g.status = 0;
        assert_ne!(f.hash(), g.hash());
    }
}
