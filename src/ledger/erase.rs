//! Erasure by crypto-shredding: event 7.
//!
//! Erasing a study or a patient (every version of every SOP Instance any version of which was
//! filed under it) deletes, in one batch with the erasure entry, everything the
//! ledger holds about its instances that is not a commitment: the metadata records (the only
//! place patient attributes live), every index key (C-FIND, C-MOVE/C-GET and export find them no
//! more), forward queue items, and the key records of their pixel objects — without which the
//! sealed objects cannot be decrypted by anyone, wherever copies of them remain. The objects
//! are then deleted from the store (noted as pending first, so a failed or interrupted deletion
//! is finished at the next start), and the ledger is flushed and compacted so the deleted values
//! leave its log and table files too.
//!
//! The entries of the erased instances stay: the chain and the tree still verify, and `verify`
//! reports them as erased. The erasure entry lists them: `peer` = "study" or "patient" (never the
//! UID or ID), `detail` = their sequence numbers as ranges ("12-40,57"), `subject_seq` = how
//! many it lists, `calling_ae` = who asked. A large erasure is recorded as several entries (at
//! most [`MAX_DETAIL`] bytes of ranges each). Each erased entry is indexed by `erased\0seq`.

use std::collections::{BTreeSet, HashSet};

use rocksdb::IteratorMode;

use super::{
    decode_keys, forward, key2, keys_under, read_entry, read_error,
    read_sop, sop_key, vloc_key, Entry, Event, Group, Ledger, LedgerError, CF_INDEX, ERASED_NOTE,
};

const ERASED_PREFIX: &[u8] = b"erased\0";
/// Most bytes of sequence ranges in one erasure entry.
const MAX_DETAIL: usize = 16 * 1024;

/// What to erase.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EraseScope {
    /// Every instance of a study (by Study Instance UID), all their versions.
    Study(String),
    /// Every instance of a patient (by Patient ID), all their versions.
    Patient(String),
}

impl EraseScope {
    fn kind(&self) -> &'static str {
        match self {
            EraseScope::Study(_) => "study",
            EraseScope::Patient(_) => "patient",
        }
    }
}

/// What an erasure did.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Erased {
    /// The erasure entries (sequence numbers).
    pub entries: Vec<u64>,
    /// SOP Instance UIDs erased.
    pub instances: Vec<String>,
    /// Stored entries (instance versions) erased.
    pub versions: u64,
    /// Opaque names of the pixel objects to delete from the store.
    pub objects: Vec<(String, [u8; 32])>,
}

fn erased_key(seq: u64) -> Vec<u8> {
    let mut k = ERASED_PREFIX.to_vec();
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

/// "1-3,7,9-10" from ascending sequence numbers.
pub fn format_ranges(seqs: &[u64]) -> String {
    let mut out = String::new();
    let mut i = 0;
    while i < seqs.len() {
        let start = seqs[i];
        let mut end = start;
        while i + 1 < seqs.len() && seqs[i + 1] == end + 1 {
            i += 1;
            end = seqs[i];
        }
        if !out.is_empty() {
            out.push(',');
        }
        if start == end {
            out += &start.to_string();
        } else {
            out += &format!("{start}-{end}");
        }
        i += 1;
    }
    out
}

/// The sequence numbers of [`format_ranges`]; `None` unless strictly ascending and well formed.
pub fn parse_ranges(s: &str) -> Option<Vec<u64>> {
    let mut out: Vec<u64> = Vec::new();
    for part in s.split(',') {
        let (a, b) = match part.split_once('-') {
            Some((a, b)) => (a.parse::<u64>().ok()?, b.parse::<u64>().ok()?),
            None => {
                let a = part.parse::<u64>().ok()?;
                (a, a)
            }
        };
        if a > b || a == 0 || out.last().is_some_and(|&l| l >= a) || b - a > 100_000_000 {
            return None;
        }
        out.extend(a..=b);
    }
    Some(out)
}

/// The entries an erasure entry erases; `None` for other entries or malformed ranges.
pub fn erased_of(e: &Entry) -> Option<Vec<u64>> {
    if e.event != Event::Erase {
        return None;
    }
    let seqs = parse_ranges(&e.detail)?;
    (seqs.len() as u64 == e.subject_seq && seqs.iter().all(|&s| s < e.seq)).then_some(seqs)
}

impl Ledger {
    /// Erases a study or a patient (see the module documentation); returns once the erasure
    /// entries are durable, with the objects still to delete. Nothing found is an error.
    pub async fn erase(&self, scope: EraseScope, by: String) -> Result<Erased, LedgerError> {
        if self.inner.secondary {
            return Err(LedgerError::ReadOnly);
        }
        let (reply, rx) = tokio::sync::oneshot::channel();
        self.submit(super::Job::Erase { scope, by, reply })?;
        // No timeout once queued: an erasure reported as failed must not happen afterwards.
        rx.await.map_err(|_| LedgerError::Closed)?
    }

    /// The erasure entry that erased stored entry `seq`, if one did.
    pub fn erased_by(&self, seq: u64) -> Result<Option<u64>, LedgerError> {
        Ok(self
            .inner
            .db
            .get_cf(self.cf(CF_INDEX)?, erased_key(seq))
            .map_err(read_error(&self.inner.db))?
            .and_then(|v| <[u8; 8]>::try_from(&v[..]).ok())
            .map(u64::from_be_bytes))
    }
}

/// Flushes and compacts the ledger after erasures, on one background thread: requests made
/// while it works are folded into one more round. Finished (joined) when the committer stops.
pub(super) struct Compactor {
    tx: std::sync::mpsc::Sender<()>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl Compactor {
    pub(super) fn start(db: std::sync::Arc<rocksdb::DB>) -> Compactor {
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let handle = std::thread::Builder::new()
            .name("ledger-erasure-compaction".into())
            .spawn(move || {
                while rx.recv().is_ok() {
                    while rx.try_recv().is_ok() {}
                    compact(&db);
                }
            })
            .map_err(|e| tracing::error!(error = %e, "cannot start the compaction after erasures"))
            .ok();
        Compactor { tx, handle }
    }

    pub(super) fn request(&self) {
        let _ = self.tx.send(());
    }

    pub(super) fn finish(self) {
        drop(self.tx);
        if let Some(h) = self.handle {
            let _ = h.join();
        }
    }
}

/// RocksDB keeps deleted values until a compaction rewrites their files, and a log file until
/// everything in it is flushed: flush every column family, then compact those that held erased
/// values.
fn compact(db: &rocksdb::DB) {
    for name in super::ALL_CFS {
        if let Some(cf) = db.cf_handle(name) {
            if let Err(e) = db.flush_cf(cf) {
                tracing::error!(error = %e, "cannot flush the ledger after an erasure");
            }
        }
    }
    for name in [
        super::CF_META,
        super::CF_KEYS,
        super::CF_INDEX,
        super::CF_FORWARD,
    ] {
        if let Some(cf) = db.cf_handle(name) {
            db.compact_range_cf(cf, None::<&[u8]>, None::<&[u8]>);
        }
    }
    tracing::info!("erased values compacted out of the ledger files");
}

impl Group<'_> {
    /// Plans an erasure. Runs alone in its group (see the committer), so every read sees the
    /// database as it is. Every fallible read comes before the first write to the batch.
    pub(super) fn erase(&mut self, scope: &EraseScope, by: &str) -> Result<Erased, LedgerError> {
        let (kind, value) = match scope {
            EraseScope::Study(v) => ("study", v.trim()),
            EraseScope::Patient(v) => ("patient", v.trim()),
        };
        if value.is_empty() || value.contains('\0') {
            return Err(LedgerError::Invalid(format!(
                "erase needs a {kind} identifier without NUL"
            )));
        }
        // Every SOP Instance whose latest version is filed under it (`study\0UID\0series\0sop`,
        // `patient\0ID\0study\0sop`) or an older one was before a newer one moved
        // (`vstudy\0UID\0sop`, `vpatient\0ID\0sop`). The SOP Instance UID is the last part. All
        // their versions are erased.
        let mut sops = BTreeSet::new();
        for prefix in [key2(&format!("v{kind}"), value, ""), key2(kind, value, "")] {
            for rest in keys_under(self.db, self.cf_index, &prefix)? {
                if let Some(sop) = rest.rsplit(|&b| b == 0).next() {
                    sops.insert(String::from_utf8_lossy(sop).into_owned());
                }
            }
        }
        let mut index_deletes: Vec<Vec<u8>> = Vec::new();
        let mut versions: Vec<(u64, Entry)> = Vec::new();
        let mut found = Vec::new();
        for sop in sops {
            let Some(idx) = read_sop(self.db, self.cf_index, &sop)? else {
                continue;
            };
            found.push(sop);
            let sop = found.last().expect("just pushed");
            index_deletes.extend(idx.keys);
            if let Some(v) = self
                .db
                .get_cf(self.cf_index, vloc_key(sop))
                .map_err(read_error(self.db))?
            {
                index_deletes.extend(decode_keys(&v));
                index_deletes.push(vloc_key(sop));
            }
            index_deletes.push(sop_key(sop));
            for seq in idx.versions {
                let entry = read_entry(self.db, seq)?.ok_or_else(|| {
                    LedgerError::Corrupt(format!("version index names missing entry {seq}"))
                })?;
                versions.push((seq, entry));
            }
        }
        if versions.is_empty() {
            return Err(LedgerError::NotFound(format!(
                "no stored instance of that {kind} on the ledger"
            )));
        }
        versions.sort_by_key(|(seq, _)| *seq);
        let erased: HashSet<u64> = versions.iter().map(|(s, _)| *s).collect();
        let mut forward_deletes = Vec::new();
        for item in self.db.iterator_cf(self.cf_forward, IteratorMode::Start) {
            let (k, _) = item.map_err(read_error(self.db))?;
            if forward::split_item(&k).is_some_and(|(_, _, seq)| erased.contains(&seq)) {
                forward_deletes.push(k.to_vec());
            }
        }
        // From here on nothing fails but the tree-sibling reads of `append`, which come before
        // any write of theirs; the erasure entries are appended first.
        let seqs: Vec<u64> = versions.iter().map(|(s, _)| *s).collect();
        let mut out = Erased {
            instances: found,
            versions: seqs.len() as u64,
            ..Erased::default()
        };
        let mut erased_by = Vec::new();
        for part in split_ranges(&seqs) {
            let (seq, prev_hash) = self.next_position();
            let entry = Entry {
                calling_ae: by.chars().take(64).collect(),
                peer: scope.kind().into(),
                detail: format_ranges(part),
                subject_seq: part.len() as u64,
                ..Entry::event(seq, prev_hash, self.time_micros, Event::Erase)
            };
            self.append(&entry)?;
            out.entries.push(seq);
            erased_by.extend(part.iter().map(|&s| (s, seq)));
        }
        for (s, by_seq) in erased_by {
            self.batch
                .put_cf(self.cf_index, erased_key(s), by_seq.to_be_bytes());
        }
        let mut seen_keys = HashSet::new();
        for (seq, e) in &versions {
            // Under its sequence number, and the copy under its instance key (older ledgers,
            // plaintext objects).
            self.batch.delete_cf(self.cf_meta, seq.to_be_bytes());
            if seen_keys.insert(e.instance_key) {
                self.batch.delete_cf(self.cf_meta, e.instance_key);
            }
            if !e.object_name.is_empty() {
                self.batch.delete_cf(self.cf_keys, e.object_name.as_bytes());
                // Deleted from the store after the commit; a deletion that fails or is cut
                // short is finished by the startup reconciliation.
                let mut note = e.instance_key.to_vec();
                note.push(ERASED_NOTE);
                self.batch
                    .put_cf(self.cf_pending, e.object_name.as_bytes(), note);
                out.objects.push((e.object_name.clone(), e.instance_key));
            }
        }
        for k in index_deletes {
            self.batch.delete_cf(self.cf_index, k);
        }
        for k in forward_deletes {
            self.batch.delete_cf(self.cf_forward, k);
        }
        self.erased = true;
        Ok(out)
    }
}

/// Splits ascending sequence numbers into parts whose ranges fit one entry.
fn split_ranges(seqs: &[u64]) -> Vec<&[u64]> {
    let mut parts = Vec::new();
    let mut start = 0;
    let mut len = 0usize;
    for i in 0..seqs.len() {
        // A generous bound on what this number adds: 20 digits and a separator.
        len += 21;
        if len > MAX_DETAIL {
            parts.push(&seqs[start..i]);
            start = i;
            len = 21;
        }
    }
    parts.push(&seqs[start..]);
    parts
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_round_trip_and_reject_nonsense() {
        for seqs in [
            vec![1],
            vec![1, 2, 3, 7, 9, 10],
            vec![5, 7, 9],
            (100..2000).collect::<Vec<u64>>(),
        ] {
            let text = format_ranges(&seqs);
            assert_eq!(parse_ranges(&text).unwrap(), seqs, "{text}");
        }
        assert_eq!(format_ranges(&[1, 2, 3, 7, 9, 10]), "1-3,7,9-10");
        for bad in [
            "",
            "0",
            "3,2",
            "2-1",
            "1,1",
            "1-3,3",
            "a",
            "1-",
            "1-99999999999",
        ] {
            assert!(parse_ranges(bad).is_none(), "{bad:?}");
        }
    }

    #[test]
    fn large_erasures_split_into_entries_that_fit() {
        let seqs: Vec<u64> = (1..5000).map(|i| i * 2).collect();
        let parts = split_ranges(&seqs);
        assert!(parts.len() > 1);
        assert_eq!(parts.concat(), seqs);
        for p in parts {
            assert!(format_ranges(p).len() <= MAX_DETAIL);
        }
    }
}
