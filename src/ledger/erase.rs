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

use super::damage::read_error;
use super::db::{keys_under, read_entry, ALL_CFS, CF_FORWARD, CF_INDEX, CF_KEYS, CF_META};
use super::entry::{Entry, Event};
use super::error::LedgerError;
use super::forward;
use super::group::Group;
use super::handle::Ledger;
use super::index::{decode_keys, key2, read_sop, sop_key, vloc_key};
use super::notes::ERASED_NOTE;
use super::request::Job;
pub use super::request::{EraseScope, Erased};

const ERASED_PREFIX: &[u8] = b"erased\0";
/// Most bytes of sequence ranges in one erasure entry.
const MAX_DETAIL: usize = 16 * 1024;

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
        self.submit(Job::Erase { scope, by, reply })?;
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
    for name in ALL_CFS {
        if let Some(cf) = db.cf_handle(name) {
            if let Err(e) = db.flush_cf(cf) {
                tracing::error!(error = %e, "cannot flush the ledger after an erasure");
            }
        }
    }
    // The bottommost level is rewritten too: otherwise a file holding an erased value (or a
    // reference to its blob) may be moved there as it is, tombstone and value side by side, and
    // stay until some later compaction happened to read it.
    let mut options = rocksdb::CompactOptions::default();
    options.set_bottommost_level_compaction(rocksdb::BottommostLevelCompaction::ForceOptimized);
    for name in [CF_META, CF_KEYS, CF_INDEX, CF_FORWARD] {
        if let Some(cf) = db.cf_handle(name) {
            db.compact_range_cf_opt(cf, None::<&[u8]>, None::<&[u8]>, &options);
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
        for (seq, e) in &versions {
            self.batch.delete_cf(self.cf_meta, seq.to_be_bytes());
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
    use crate::ledger::test_support::*;

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

    /// Records of `BLOB_MIN_BYTES` or more live in blob files: an erasure's compaction still
    /// takes them out of every file of the ledger (the blob GC moves the ones kept).
    #[tokio::test(flavor = "multi_thread")]
    async fn an_erased_large_record_leaves_the_blob_files() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::open(dir.path()).unwrap();
        let marker = b"LARGE-PRIVATE-ELEMENT";
        let large = |sop: &str, study: &str, key: u8| {
            let mut record = marker.repeat(BLOB_MIN_BYTES as usize / marker.len() + 1);
            record.push(key);
            StoreRequest {
                record,
                ..request(sop, study, key)
            }
        };
        ledger.store(large("1.1", "9", 1)).await.unwrap();
        ledger.store(large("2.1", "8", 2)).await.unwrap();
        let db = ledger.inner.db.clone();
        db.flush_cf(db.cf_handle(CF_META).unwrap()).unwrap();
        let files = |ext: &str| -> Vec<Vec<u8>> {
            std::fs::read_dir(dir.path())
                .unwrap()
                .flatten()
                .map(|e| e.path())
                .filter(|p| ext.is_empty() || p.extension().is_some_and(|x| x == ext))
                .map(|p| std::fs::read(p).unwrap())
                .collect()
        };
        let tail = |key: u8| [&marker[..], &[key]].concat();
        let holds = |f: &[u8], key: u8| f.windows(marker.len() + 1).any(|w| w == tail(key));
        assert!(
            files("blob").iter().any(|f| holds(f, 1)),
            "the record is in a blob file"
        );
        ledger
            .erase(erase::EraseScope::Study("9".into()), "test".into())
            .await
            .unwrap();
        ledger.close();
        drop((ledger, db));
        assert!(
            !files("").iter().any(|f| holds(f, 1)),
            "the erased record is left in a file"
        );
        let ledger = Ledger::open(dir.path()).unwrap();
        let kept = ledger.entry(2).unwrap().unwrap();
        assert_eq!(ledger.record_of(&kept).unwrap().unwrap().last(), Some(&2));
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn erasure_removes_all_but_the_entries_and_records_what_it_erased() {
        use erase::{EraseScope, Erased};
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::open(dir.path()).unwrap();
        let with_object = |sop: &str, study: &str, key: u8| StoreRequest {
            object_name: Some(format!("obj{key}")),
            object_key: Some(ObjectKey { salt: [key; 32] }),
            forward_to: vec!["archive".into()],
            ..request(sop, study, key)
        };
        for (sop, study, key) in [
            ("1.1", "9", 1),
            ("1.2", "9", 2),
            ("2.1", "8", 3),
            ("1.1", "9", 4),
        ] {
            ledger.store(with_object(sop, study, key)).await.unwrap();
        }
        let erased = ledger
            .erase(EraseScope::Study("9".into()), "admin-api".into())
            .await
            .unwrap();
        assert_eq!(
            erased,
            Erased {
                entries: vec![5],
                instances: vec!["1.1".into(), "1.2".into()],
                versions: 3,
                objects: vec![
                    ("obj1".into(), [1; 32]),
                    ("obj2".into(), [2; 32]),
                    ("obj4".into(), [4; 32]),
                ],
            }
        );
        let e = ledger.entry(5).unwrap().unwrap();
        assert_eq!(
            (e.event, e.peer.as_str(), e.detail.as_str()),
            (Event::Erase, "study", "1-2,4")
        );
        assert_eq!(erase::erased_of(&e), Some(vec![1, 2, 4]));
        for (seq, key) in [(1u64, 1u8), (2, 2), (4, 4)] {
            assert_eq!(ledger.erased_by(seq).unwrap(), Some(5));
            let erased = ledger.entry(seq).unwrap().unwrap();
            assert!(ledger.record_of(&erased).unwrap().is_none());
            assert!(ledger.object_key(&format!("obj{key}")).unwrap().is_none());
        }
        assert!(ledger.instances_in_study("9").unwrap().is_empty());
        assert!(
            ledger.latest("1.1").unwrap().is_none() && ledger.versions("1.1").unwrap().is_empty()
        );
        let mut pending: Vec<String> = ledger
            .pending_objects()
            .unwrap()
            .into_iter()
            .map(|p| {
                assert!(!p.recorded, "an erased object is not named any more");
                assert_eq!(p.note, None);
                p.name
            })
            .collect();
        pending.sort();
        assert_eq!(pending, ["obj1", "obj2", "obj4"]);
        // The forward queue keeps only the other study's item.
        let queued = ledger.forward_pending("archive", 0, 100).unwrap();
        assert_eq!(queued, vec![3]);
        // The other study is untouched; nothing left to erase is an error, and writes nothing.
        assert_eq!(
            ledger.instances_in_study("8").unwrap(),
            vec!["2.1".to_string()]
        );
        assert_eq!(ledger.erased_by(3).unwrap(), None);
        assert!(matches!(
            ledger
                .erase(EraseScope::Study("9".into()), "x".into())
                .await,
            Err(LedgerError::NotFound(_))
        ));
        assert_eq!(ledger.len().unwrap(), 5);
        // A newer version filed under another study: erasing the study of the older one takes
        // every version (the older one holds that study's data).
        ledger.store(with_object("2.1", "7", 5)).await.unwrap();
        let erased = ledger
            .erase(EraseScope::Study("8".into()), "admin-api".into())
            .await
            .unwrap();
        assert_eq!((erased.entries, erased.versions), (vec![7], 2));
        assert!(ledger.instances_in_study("7").unwrap().is_empty());
        assert!(matches!(
            ledger
                .erase(EraseScope::Patient("P".into()), "x".into())
                .await,
            Err(LedgerError::NotFound(_))
        ));
    }
}
