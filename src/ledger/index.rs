//! The `index` column family's keys and values: `sop\0UID` ([`SopIndex`]), the hierarchy keys
//! that list an instance under its study, series and patient, C-FIND's attribute keys
//! ([`find_key`]), and the keys that keep moved versions findable (`vstudy`, `vpatient`,
//! `vloc`). The keys written by acl, erase and unacked live in their own files.

use rocksdb::DB;

use super::damage::read_error;
use super::db::CF_INDEX;
use super::error::LedgerError;
use crate::instance::{Digest32, IndexAttrs};
use crate::util::bytes::{Reader, Truncated};

/// `a\0b\0c` index keys. UIDs and IDs never contain NUL (trailing padding is trimmed on parse).
pub(super) fn key2(kind: &str, a: &str, b: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(kind.len() + a.len() + b.len() + 2);
    k.extend_from_slice(kind.as_bytes());
    k.push(0);
    k.extend_from_slice(a.as_bytes());
    k.push(0);
    k.extend_from_slice(b.as_bytes());
    k
}

pub(super) fn sop_key(uid: &str) -> Vec<u8> {
    let mut k = b"sop\0".to_vec();
    k.extend_from_slice(uid.as_bytes());
    k
}

/// `vloc\0SOP`: the [`version_keys`] of every version of a SOP Instance (never shrinks).
pub(super) fn vloc_key(uid: &str) -> Vec<u8> {
    let mut k = b"vloc\0".to_vec();
    k.extend_from_slice(uid.as_bytes());
    k
}

/// What the index holds about one SOP Instance under `sop\0UID`.
///
/// Value: latest seq u64 ‖ its version u32 ‖ its instance key [32] ‖ count u32 ‖ the seq u64 of
/// every version, oldest first ‖ the latest version's hierarchy keys ([`encode_keys`]). One key
/// per instance: the committer is bound by RocksDB memtable inserts.
#[derive(Clone, Debug, PartialEq)]
pub(super) struct SopIndex {
    pub(super) seq: u64,
    pub(super) version: u32,
    pub(super) instance_key: Digest32,
    pub(super) versions: Vec<u64>,
    pub(super) keys: Vec<Vec<u8>>,
}

impl SopIndex {
    pub(super) fn encode(&self) -> Vec<u8> {
        let keys = encode_keys(&self.keys);
        let mut v = Vec::with_capacity(48 + self.versions.len() * 8 + keys.len());
        v.extend_from_slice(&self.seq.to_be_bytes());
        v.extend_from_slice(&self.version.to_be_bytes());
        v.extend_from_slice(&self.instance_key);
        v.extend_from_slice(&(self.versions.len() as u32).to_be_bytes());
        for seq in &self.versions {
            v.extend_from_slice(&seq.to_be_bytes());
        }
        v.extend_from_slice(&keys);
        v
    }

    pub(super) fn decode(uid: &str, v: &[u8]) -> Result<SopIndex, LedgerError> {
        let bad = |_| LedgerError::Corrupt(format!("index value for {uid}"));
        let mut r = Reader::new(v);
        let seq = r.u64().map_err(bad)?;
        let version = r.u32().map_err(bad)?;
        let instance_key = r.array().map_err(bad)?;
        let count = r.u32().map_err(bad)? as usize;
        // Bounded by the value's length before anything is allocated for it.
        if count.checked_mul(8).is_none_or(|n| n > r.rest().len()) {
            return Err(bad(Truncated));
        }
        let versions = (0..count)
            .map(|_| r.u64())
            .collect::<Result<Vec<_>, _>>()
            .map_err(bad)?;
        let rest = r.rest();
        let keys = decode_keys(rest);
        // Every byte accounted for: a cut key list would leave keys an erasure misses.
        if encode_keys(&keys).len() != rest.len() || versions.last() != Some(&seq) {
            return Err(bad(Truncated));
        }
        Ok(SopIndex {
            seq,
            version,
            instance_key,
            versions,
            keys,
        })
    }
}

/// The index of one SOP Instance.
pub(super) fn read_sop(
    db: &DB,
    cf_index: &rocksdb::ColumnFamily,
    uid: &str,
) -> Result<Option<SopIndex>, LedgerError> {
    db.get_pinned_cf(cf_index, sop_key(uid))
        .map_err(read_error(db))?
        .map(|v| SopIndex::decode(uid, &v))
        .transpose()
}

/// `vstudy\0STUDY\0SOP` / `vpatient\0PID\0SOP` for the study and patient an older version of
/// SOP was filed under (from its hierarchy keys `old`), when the new version `a` is filed
/// elsewhere. Unlike the hierarchy keys they stay, so an erasure finds every instance that was
/// ever part of a study or a patient.
pub(super) fn moved_from(old: &[Vec<u8>], a: &IndexAttrs) -> Vec<Vec<u8>> {
    let part = |prefix: &[u8]| {
        old.iter()
            .find_map(|k| k.strip_prefix(prefix))
            .and_then(|rest| rest.split(|&b| b == 0).next())
            .map(|v| String::from_utf8_lossy(v).into_owned())
    };
    let mut out = Vec::new();
    if let Some(study) = part(b"study\0").filter(|s| *s != a.study_instance_uid) {
        out.push(key2("vstudy", &study, &a.sop_instance_uid));
    }
    if let Some(pid) = part(b"patient\0").filter(|p| *p != a.patient_id) {
        out.push(key2("vpatient", &pid, &a.sop_instance_uid));
    }
    out
}

/// Escapes an index value so that it holds no NUL (the key separator) and keeps its order and
/// prefixes: NUL → 01 01, 01 → 01 02.
pub(super) fn escape_value(v: &str, out: &mut Vec<u8>) {
    for &b in v.as_bytes() {
        match b {
            0 => out.extend_from_slice(&[1, 1]),
            1 => out.extend_from_slice(&[1, 2]),
            b => out.push(b),
        }
    }
}

/// The C-FIND attribute index key prefix for `tag` and a value (or value prefix).
pub fn find_key(tag: u32, value: &str) -> Vec<u8> {
    let mut k = format!("a\0{tag:08X}\0").into_bytes();
    escape_value(value, &mut k);
    k
}

/// A position in the index scanned by `Ledger::scan`.
pub enum Step {
    Next,
    /// Seek forward to this full key.
    Seek(Vec<u8>),
    Stop,
}

/// The hierarchy keys of an instance.
pub(super) fn hierarchy_keys(a: &IndexAttrs) -> Vec<Vec<u8>> {
    let mut study = key2("study", &a.study_instance_uid, &a.series_instance_uid);
    study.push(0);
    study.extend_from_slice(a.sop_instance_uid.as_bytes());
    // Every key names the instance, so moving one instance never unlists another.
    let mut patient = key2("patient", &a.patient_id, &a.study_instance_uid);
    patient.push(0);
    patient.extend_from_slice(a.sop_instance_uid.as_bytes());
    let mut keys = vec![
        study,
        key2("series", &a.series_instance_uid, &a.sop_instance_uid),
        patient,
    ];
    for (tag, value) in &a.find_values {
        let mut k = find_key(*tag, value);
        for part in [
            &a.study_instance_uid,
            &a.series_instance_uid,
            &a.sop_instance_uid,
        ] {
            k.push(0);
            k.extend_from_slice(part.as_bytes());
        }
        keys.push(k);
    }
    keys
}

pub(super) fn encode_keys(keys: &[Vec<u8>]) -> Vec<u8> {
    let mut out = Vec::new();
    for k in keys {
        out.extend_from_slice(&(k.len() as u32).to_be_bytes());
        out.extend_from_slice(k);
    }
    out
}

pub(super) fn decode_keys(b: &[u8]) -> Vec<Vec<u8>> {
    let mut r = Reader::new(b);
    let mut out = Vec::new();
    while let Ok(k) = r.bytes32() {
        out.push(k.to_vec());
    }
    out
}

pub(super) fn latest_of(db: &DB, uid: &str) -> Result<Option<(u64, u32)>, LedgerError> {
    let cf = db
        .cf_handle(CF_INDEX)
        .ok_or_else(|| LedgerError::Corrupt("missing index".into()))?;
    // Only the leading (seq, version) (see `SopIndex`): this runs for every instance a query or
    // retrieval touches.
    let Some(v) = db.get_pinned_cf(cf, sop_key(uid)).map_err(read_error(db))? else {
        return Ok(None);
    };
    let bad = |_| LedgerError::Corrupt(format!("index value for {uid}"));
    if v.len() < 48 {
        return Err(bad(Truncated));
    }
    let mut r = Reader::new(&v);
    Ok(Some((r.u64().map_err(bad)?, r.u32().map_err(bad)?)))
}
