//! The read API of [`Ledger`]: entries, metadata records, the index, the tree's roots and proofs,
//! checkpoints, and the key records of sealed objects.

use rocksdb::{IteratorMode, WriteOptions};

use super::damage::read_error;
use super::db::{
    keys_under, read_head, CF_CHECKPOINTS, CF_ENTRIES, CF_INDEX, CF_KEYS, CF_META, CF_TREE,
};
use super::entry::Entry;
use super::error::LedgerError;
use super::handle::Ledger;
use super::index::{key2, latest_of, read_sop, Step};
use super::merkle;
use super::tree::read_node;
use crate::instance::{Digest32, ObjectKey};

/// Key of the master key's check value in the `keys` column family (object names are hex).
const MASTER_CHECK: &[u8] = b"\0master-key-check";

impl Ledger {
    /// Whether a ledger entry names object `name`: its key record is written in the same batch
    /// as that entry.
    pub(super) fn names_object(&self, name: &str) -> Result<bool, LedgerError> {
        Ok(self.object_key(name)?.is_some())
    }

    /// The check value of the master key the objects are sealed with (see
    /// `MasterKey::check_value`), once a node has started with one.
    pub fn master_check(&self) -> Result<Option<Vec<u8>>, LedgerError> {
        let cf = self.cf(CF_KEYS)?;
        self.inner
            .db
            .get_cf(cf, MASTER_CHECK)
            .map_err(read_error(&self.inner.db))
    }

    pub fn set_master_check(&self, value: &[u8]) -> Result<(), LedgerError> {
        if self.inner.secondary {
            return Err(LedgerError::ReadOnly);
        }
        let mut wo = WriteOptions::default();
        wo.set_sync(true);
        self.inner
            .db
            .put_cf_opt(self.cf(CF_KEYS)?, MASTER_CHECK, value, &wo)
            .map_err(LedgerError::Write)
    }

    /// Whether any object key record exists (objects sealed under some master key).
    pub fn has_sealed_objects(&self) -> Result<bool, LedgerError> {
        let cf = self.cf(CF_KEYS)?;
        for item in self.inner.db.iterator_cf(cf, IteratorMode::Start) {
            let (k, _) = item.map_err(read_error(&self.inner.db))?;
            if k[..] != *MASTER_CHECK {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// The key record of a sealed pixel object, if the ledger holds one under this name.
    pub fn object_key(&self, name: &str) -> Result<Option<ObjectKey>, LedgerError> {
        let cf = self.cf(CF_KEYS)?;
        self.inner
            .db
            .get_cf(cf, name.as_bytes())
            .map_err(read_error(&self.inner.db))?
            .map(|v| {
                ObjectKey::decode(&v)
                    .map_err(|e| LedgerError::Corrupt(format!("key record of object {name}: {e}")))
            })
            .transpose()
    }

    /// The last entry's sequence number and hash, if any.
    pub fn head(&self) -> Result<Option<(u64, Digest32)>, LedgerError> {
        read_head(&self.inner.db)
    }

    pub fn entry(&self, seq: u64) -> Result<Option<Entry>, LedgerError> {
        let raw = self
            .inner
            .db
            .get_cf(self.cf(CF_ENTRIES)?, seq.to_be_bytes())
            .map_err(read_error(&self.inner.db))?;
        raw.map(|b| {
            Entry::decode(&b).map_err(|e| LedgerError::Corrupt(format!("entry {seq}: {e}")))
        })
        .transpose()
    }

    /// The metadata record a stored entry commits to (under its sequence number). The caller
    /// checks it against the entry's instance key.
    pub fn record_of(&self, entry: &Entry) -> Result<Option<Vec<u8>>, LedgerError> {
        self.inner
            .db
            .get_cf(self.cf(CF_META)?, entry.seq.to_be_bytes())
            .map_err(read_error(&self.inner.db))
    }

    /// The latest entry of a SOP Instance.
    pub fn latest(&self, sop_instance_uid: &str) -> Result<Option<Entry>, LedgerError> {
        match latest_of(&self.inner.db, sop_instance_uid)? {
            Some((seq, _)) => self.entry(seq),
            None => Ok(None),
        }
    }

    /// Sequence numbers of every version of a SOP Instance, oldest first.
    pub fn versions(&self, sop_instance_uid: &str) -> Result<Vec<u64>, LedgerError> {
        Ok(
            read_sop(&self.inner.db, self.cf(CF_INDEX)?, sop_instance_uid)?
                .map(|i| i.versions)
                .unwrap_or_default(),
        )
    }

    /// SOP Instance UIDs of a study (latest versions only).
    pub fn instances_in_study(&self, study_uid: &str) -> Result<Vec<String>, LedgerError> {
        let prefix = key2("study", study_uid, "");
        Ok(self
            .scan_index(&prefix)?
            .into_iter()
            .filter_map(|rest| {
                let s = String::from_utf8(rest).ok()?;
                s.split_once('\0').map(|(_, sop)| sop.to_string())
            })
            .collect())
    }

    /// SOP Instance UIDs of a series (latest versions only).
    pub fn instances_in_series(&self, series_uid: &str) -> Result<Vec<String>, LedgerError> {
        let prefix = key2("series", series_uid, "");
        Ok(self
            .scan_index(&prefix)?
            .into_iter()
            .filter_map(|rest| String::from_utf8(rest).ok())
            .collect())
    }

    /// The RFC 9162 root hash of the first `size` entries.
    pub fn tree_root(&self, size: u64) -> Result<Digest32, LedgerError> {
        merkle::root(self, size)
    }

    /// The inclusion proof of entry `seq` (leaf `seq - 1`) in the tree of `size` entries.
    pub fn inclusion_proof(&self, seq: u64, size: u64) -> Result<Vec<Digest32>, LedgerError> {
        if seq == 0 || seq > size || size > self.len()? {
            return Err(LedgerError::Corrupt(format!(
                "no entry {seq} in a tree of {size}"
            )));
        }
        merkle::inclusion_proof(self, seq - 1, size)
    }

    /// The consistency proof between the trees of `old` and `new` entries.
    pub fn consistency_proof(&self, old: u64, new: u64) -> Result<Vec<Digest32>, LedgerError> {
        if old > new || new > self.len()? {
            return Err(LedgerError::Corrupt(format!(
                "no consistency proof from {old} to {new}"
            )));
        }
        merkle::consistency_proof(self, old, new)
    }

    /// Visits every entry in sequence order with one sequential scan (for audits).
    pub fn for_each_entry(
        &self,
        mut f: impl FnMut(u64, Result<Entry, LedgerError>),
    ) -> Result<(), LedgerError> {
        let cf = self.cf(CF_ENTRIES)?;
        for item in self.inner.db.iterator_cf(cf, IteratorMode::Start) {
            let (k, v) = item.map_err(read_error(&self.inner.db))?;
            let seq = <[u8; 8]>::try_from(&k[..])
                .map(u64::from_be_bytes)
                .map_err(|_| LedgerError::Corrupt("entry key".into()))?;
            f(
                seq,
                Entry::decode(&v).map_err(|e| LedgerError::Corrupt(format!("entry {seq}: {e}"))),
            );
        }
        Ok(())
    }

    /// Like [`Ledger::for_each_entry`], but a read error (a damaged block) does not end the
    /// walk: the entries after the last one read, up to `upper`, are then read one by one, and
    /// those that cannot be are visited with their error. Returns the error that stopped the
    /// sequential scan, if one did.
    pub fn for_each_entry_salvaging(
        &self,
        upper: u64,
        mut f: impl FnMut(u64, Result<Entry, LedgerError>),
    ) -> Result<Option<LedgerError>, LedgerError> {
        let cf = self.cf(CF_ENTRIES)?;
        let decode = |seq: u64, v: &[u8]| {
            Entry::decode(v).map_err(|e| LedgerError::Corrupt(format!("entry {seq}: {e}")))
        };
        let read_error = read_error(&self.inner.db);
        let mut last = 0;
        for item in self.inner.db.iterator_cf(cf, IteratorMode::Start) {
            let (k, v) = match item {
                Ok(kv) => kv,
                Err(stopped) => {
                    for seq in last + 1..=upper {
                        match self.inner.db.get_cf(cf, seq.to_be_bytes()) {
                            Ok(Some(v)) => f(seq, decode(seq, &v)),
                            Ok(None) => {}
                            Err(e) => f(seq, Err(read_error(e))),
                        }
                    }
                    return Ok(Some(read_error(stopped)));
                }
            };
            let seq = <[u8; 8]>::try_from(&k[..])
                .map(u64::from_be_bytes)
                .map_err(|_| LedgerError::Corrupt("entry key".into()))?;
            last = seq;
            f(seq, decode(seq, &v));
        }
        Ok(None)
    }

    /// The highest sequence number in the entries' table files: how far the chain reaches when
    /// its newest entries cannot be read.
    pub fn entries_in_files(&self) -> Result<u64, LedgerError> {
        Ok(self
            .inner
            .db
            .live_files()
            .map_err(read_error(&self.inner.db))?
            .into_iter()
            .filter(|f| f.column_family_name == CF_ENTRIES)
            .filter_map(|f| f.end_key)
            .filter_map(|k| <[u8; 8]>::try_from(&k[..]).ok().map(u64::from_be_bytes))
            .max()
            .unwrap_or(0))
    }

    /// Visits every metadata record (in key order: those keyed by sequence number first) with
    /// one sequential scan, in batches (for audits that hash them in parallel).
    pub fn for_each_record_batch(
        &self,
        batch: usize,
        mut f: impl FnMut(Vec<(u64, Box<[u8]>)>),
    ) -> Result<(), LedgerError> {
        let cf = self.cf(CF_META)?;
        let mut buf = Vec::with_capacity(batch);
        for item in self.inner.db.iterator_cf(cf, IteratorMode::Start) {
            let (k, v) = item.map_err(read_error(&self.inner.db))?;
            let seq = <[u8; 8]>::try_from(&k[..])
                .map(u64::from_be_bytes)
                .map_err(|_| LedgerError::Corrupt("record key".into()))?;
            buf.push((seq, v));
            if buf.len() == batch {
                f(std::mem::replace(&mut buf, Vec::with_capacity(batch)));
            }
        }
        if !buf.is_empty() {
            f(buf);
        }
        Ok(())
    }

    /// Every stored checkpoint note, oldest (smallest tree) first.
    pub fn checkpoints(&self) -> Result<Vec<(u64, String)>, LedgerError> {
        let cf = self.cf(CF_CHECKPOINTS)?;
        let mut out = Vec::new();
        for item in self.inner.db.iterator_cf(cf, IteratorMode::Start) {
            let (k, v) = item.map_err(read_error(&self.inner.db))?;
            let size = <[u8; 8]>::try_from(&k[..])
                .map(u64::from_be_bytes)
                .map_err(|_| LedgerError::Corrupt("checkpoint key".into()))?;
            out.push((size, String::from_utf8_lossy(&v).into_owned()));
        }
        Ok(out)
    }

    /// The newest signed checkpoint note, if any.
    pub fn latest_checkpoint(&self) -> Result<Option<String>, LedgerError> {
        let cf = self.cf(CF_CHECKPOINTS)?;
        match self.inner.db.iterator_cf(cf, IteratorMode::End).next() {
            None => Ok(None),
            Some(item) => {
                let (_, v) = item.map_err(read_error(&self.inner.db))?;
                Ok(Some(String::from_utf8_lossy(&v).into_owned()))
            }
        }
    }

    /// The tree size of the newest signed checkpoint, if any (without reading the notes).
    pub fn latest_checkpoint_size(&self) -> Result<Option<u64>, LedgerError> {
        let cf = self.cf(CF_CHECKPOINTS)?;
        match self.inner.db.iterator_cf(cf, IteratorMode::End).next() {
            None => Ok(None),
            Some(item) => {
                let (k, _) = item.map_err(read_error(&self.inner.db))?;
                Ok(<[u8; 8]>::try_from(&k[..]).ok().map(u64::from_be_bytes))
            }
        }
    }

    /// Number of entries in the chain.
    pub fn len(&self) -> Result<u64, LedgerError> {
        Ok(self.head()?.map(|(seq, _)| seq).unwrap_or(0))
    }

    pub fn is_empty(&self) -> Result<bool, LedgerError> {
        Ok(self.len()? == 0)
    }

    /// Walks the index keys that start with `prefix`, from `prefix + start` on; `visit` gets
    /// each key (without the prefix) and its value, and says where to go next. Lets C-FIND skip
    /// over the rest of a study or series it has already seen, so its cost follows the matches.
    pub fn scan(
        &self,
        prefix: &[u8],
        start: &[u8],
        mut visit: impl FnMut(&[u8], &[u8]) -> Step,
    ) -> Result<(), LedgerError> {
        let cf = self.cf(CF_INDEX)?;
        let mut it = self.inner.db.raw_iterator_cf(cf);
        let mut first = prefix.to_vec();
        first.extend_from_slice(start);
        it.seek(&first);
        while let (Some(k), Some(v)) = (it.key(), it.value()) {
            if !k.starts_with(prefix) {
                break;
            }
            match visit(&k[prefix.len()..], v) {
                Step::Next => it.next(),
                Step::Seek(to) => it.seek(&to),
                Step::Stop => break,
            }
        }
        it.status().map_err(read_error(&self.inner.db))
    }

    /// The hierarchy keys of the latest version of an instance (study key first).
    pub fn location(&self, sop_instance_uid: &str) -> Result<Vec<Vec<u8>>, LedgerError> {
        Ok(
            read_sop(&self.inner.db, self.cf(CF_INDEX)?, sop_instance_uid)?
                .map(|i| i.keys)
                .unwrap_or_default(),
        )
    }

    /// Keys under `prefix` in the index, with the prefix removed.
    pub(super) fn scan_index(&self, prefix: &[u8]) -> Result<Vec<Vec<u8>>, LedgerError> {
        keys_under(&self.inner.db, self.cf(CF_INDEX)?, prefix)
    }
}

impl merkle::NodeSource for Ledger {
    type Error = LedgerError;
    fn node(&self, level: u8, index: u64) -> Result<Digest32, LedgerError> {
        read_node(&self.inner.db, self.cf(CF_TREE)?, level, index)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::test_support::*;

    #[tokio::test(flavor = "multi_thread")]
    async fn records_are_filed_by_sequence_number_and_objects_by_their_key_records() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::open(dir.path()).unwrap();
        let mut sealed = request("1.1", "9", 1);
        sealed.object_name = Some("sealed".into());
        sealed.object_key = Some(ObjectKey { salt: [7; 32] });
        ledger.store(sealed).await.unwrap();
        ledger.store(request("1.2", "9", 2)).await.unwrap();
        // An object without its key record could never be read: refused, nothing written.
        let mut keyless = request("1.3", "9", 3);
        keyless.object_name = Some("keyless".into());
        assert!(matches!(
            ledger.store(keyless).await,
            Err(LedgerError::Invalid(_))
        ));
        assert_eq!(ledger.len().unwrap(), 2);
        let mut filed = Vec::new();
        ledger
            .for_each_record_batch(1, |b| filed.extend(b.into_iter().map(|(k, _)| k)))
            .unwrap();
        assert_eq!(filed, vec![1, 2]);
        assert!(ledger.names_object("sealed").unwrap());
        assert!(!ledger.names_object("keyless").unwrap());
        let e2 = ledger.entry(2).unwrap().unwrap();
        assert_eq!(ledger.record_of(&e2).unwrap().unwrap(), vec![2; 10]);
        let cf = ledger.cf(CF_META).unwrap();
        ledger.inner.db.delete_cf(cf, 2u64.to_be_bytes()).unwrap();
        assert!(ledger.record_of(&e2).unwrap().is_none());
    }
}
