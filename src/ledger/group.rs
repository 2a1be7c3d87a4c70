//! One group commit being planned ([`Group`]): the batch, the chain head and everything planned
//! so far that later requests of the same group must see; the planning of a stored instance
//! (entry, tree nodes, record, key record, index) and of a security event. The other kinds of
//! request are planned by the files of their concern (`impl Group` in acl, forward, erase,
//! trail, unacked, pending).

use rocksdb::DB;
// Group-local maps keyed by our own numbers and UIDs of at most one group: no need for SipHash.
use rustc_hash::FxHashMap as HashMap;

use super::batch;
use super::damage::read_error;
use super::db::{
    now_micros, CF_ENTRIES, CF_FORWARD, CF_INDEX, CF_KEYS, CF_META, CF_PENDING, CF_TREE,
};
use super::entry::{Entry, Event, Reason, INTEGRITY_FAILURE_STATUS};
use super::error::LedgerError;
use super::index::{
    decode_keys, encode_keys, hierarchy_keys, moved_from, read_sop, sop_key, vloc_key, SopIndex,
};
use super::merkle;
use super::request::{StoreOutcome, StoreRequest};
use super::tree::{plan_tree_nodes, put_tree_nodes};
use crate::instance::{Digest32, IndexAttrs};

/// Batch bytes reserved per request of a group: an entry, its tree nodes, a metadata record of
/// a typical CT/MR header and its index keys.
const BATCH_BYTES_PER_REQUEST: usize = 2048;

/// One group commit being planned: the batch and everything it changes that later requests of
/// the same group must see.
pub(super) struct Group<'a> {
    pub(super) db: &'a DB,
    pub(super) cf_entries: &'a rocksdb::ColumnFamily,
    pub(super) cf_meta: &'a rocksdb::ColumnFamily,
    pub(super) cf_index: &'a rocksdb::ColumnFamily,
    pub(super) cf_tree: &'a rocksdb::ColumnFamily,
    pub(super) cf_forward: &'a rocksdb::ColumnFamily,
    pub(super) cf_pending: &'a rocksdb::ColumnFamily,
    pub(super) cf_keys: &'a rocksdb::ColumnFamily,
    pub(super) batch: batch::SortedBatch<'a>,
    /// Something was put on the forward queue.
    pub(super) enqueued: bool,
    /// An erasure is planned (its values are compacted away after the write).
    pub(super) erased: bool,
    /// Forward queue keys settled in this group (so a second outcome for one is ignored).
    pub(super) settled: std::collections::HashSet<Vec<u8>>,
    pub(super) head: Option<(u64, Digest32)>,
    /// The index of each SOP Instance planned in this group, with its instance key.
    pub(super) pending: HashMap<String, (SopIndex, Digest32)>,
    /// Every-version hierarchy keys per SOP Instance planned in this group (see `vloc_key`).
    pub(super) pending_vloc: HashMap<String, Vec<Vec<u8>>>,
    /// Tree nodes planned in this group, not yet readable from the database.
    pub(super) new_nodes: HashMap<(u8, u64), Digest32>,
    pub(super) time_micros: i64,
}

impl<'a> Group<'a> {
    /// A group of about `requests` requests carrying `record_bytes` of metadata records (its
    /// batch is sized for them up front: growing a megabyte batch by doubling would copy it
    /// again and again, and hold a large record's bytes twice).
    pub(super) fn new(
        db: &'a DB,
        head: Option<(u64, Digest32)>,
        requests: usize,
        record_bytes: usize,
    ) -> Result<Group<'a>, LedgerError> {
        let cf = |n| {
            db.cf_handle(n)
                .ok_or_else(|| LedgerError::Corrupt(format!("missing column family {n}")))
        };
        Ok(Group {
            db,
            cf_entries: cf(CF_ENTRIES)?,
            cf_meta: cf(CF_META)?,
            cf_index: cf(CF_INDEX)?,
            cf_tree: cf(CF_TREE)?,
            cf_forward: cf(CF_FORWARD)?,
            cf_pending: cf(CF_PENDING)?,
            cf_keys: cf(CF_KEYS)?,
            batch: batch::SortedBatch::with_capacity_bytes(
                requests * BATCH_BYTES_PER_REQUEST + record_bytes,
            ),
            enqueued: false,
            erased: false,
            settled: Default::default(),
            head,
            pending: HashMap::default(),
            pending_vloc: HashMap::default(),
            new_nodes: HashMap::default(),
            time_micros: now_micros(),
        })
    }

    /// The index of a SOP Instance and its latest version's instance key.
    pub(super) fn previous(&self, uid: &str) -> Result<Option<(SopIndex, Digest32)>, LedgerError> {
        if let Some(p) = self.pending.get(uid) {
            return Ok(Some(p.clone()));
        }
        Ok(read_sop(self.db, self.cf_index, uid)?.map(|idx| {
            let key = idx.instance_key;
            (idx, key)
        }))
    }

    /// Plans a security event about entry `subject`, detected by `detector` while serving
    /// `requester` (calling AE title, peer address; empty when the node itself found it). The
    /// entry names the requester as its calling AE and peer, and its outcome is a failure.
    pub(super) fn add_event(
        &mut self,
        subject: &Entry,
        reason: Reason,
        detector: &str,
        requester: (&str, &str),
    ) -> Result<u64, LedgerError> {
        let (seq, prev_hash) = self.next_position();
        let text = |s: &str, max: usize| crate::util::escape::escape(s).chars().take(max).collect();
        let (calling, detail) = match requester.0.trim() {
            "" => (detector, String::new()),
            ae => (ae, text(&format!("found by {detector}"), 512)),
        };
        let entry = Entry {
            seq,
            prev_hash,
            time_micros: self.time_micros,
            event: Event::IntegrityFailure,
            calling_ae: text(calling, 64),
            subject_seq: subject.seq,
            reason,
            version: 0,
            status: INTEGRITY_FAILURE_STATUS,
            peer: text(requester.1.trim(), 128),
            detail,
            ..subject.clone()
        };
        self.append(&entry)?;
        Ok(seq)
    }

    /// The next entry's sequence number and the hash it chains to.
    pub(super) fn next_position(&self) -> (u64, Digest32) {
        match self.head {
            Some((s, h)) => (s + 1, h),
            None => (1, [0u8; 32]),
        }
    }

    /// Adds an entry to the chain and the tree. The only fallible step (reading tree siblings)
    /// comes before any write to the batch.
    pub(super) fn append(&mut self, entry: &Entry) -> Result<(), LedgerError> {
        let encoded = entry.encode();
        let nodes = plan_tree_nodes(
            self.db,
            self.cf_tree,
            &self.new_nodes,
            entry.seq - 1,
            merkle::leaf_hash(&encoded),
        )?;
        put_tree_nodes(&mut self.batch, self.cf_tree, &mut self.new_nodes, nodes);
        // The chain hash is over the same bytes: hash them once here rather than re-encode.
        let hash: Digest32 = <sha2::Sha256 as sha2::Digest>::digest(&encoded).into();
        self.batch
            .put_cf(self.cf_entries, entry.seq.to_be_bytes(), encoded);
        self.head = Some((entry.seq, hash));
        Ok(())
    }

    /// The every-version keys of `uid` (see `vloc_key`) with those a new version filed under
    /// `attrs` adds, moving away from the hierarchy keys `old`; `None` when it does not move.
    fn moved_keys(
        &self,
        uid: &str,
        old: &[Vec<u8>],
        attrs: &IndexAttrs,
    ) -> Result<Option<Vec<Vec<u8>>>, LedgerError> {
        let moved = moved_from(old, attrs);
        if moved.is_empty() {
            return Ok(None);
        }
        let mut v = match self.pending_vloc.get(uid) {
            Some(v) => v.clone(),
            None => self
                .db
                .get_cf(self.cf_index, vloc_key(uid))
                .map_err(read_error(self.db))?
                .map(|v| decode_keys(&v))
                .unwrap_or_default(),
        };
        for k in moved {
            if !v.contains(&k) {
                v.push(k);
            }
        }
        Ok(Some(v))
    }

    /// Plans one request. Every fallible read happens before the first write to the batch, so a
    /// failed request leaves the batch untouched.
    pub(super) fn add(&mut self, req: &StoreRequest) -> Result<StoreOutcome, LedgerError> {
        if req.object_name.is_some() != req.object_key.is_some() {
            return Err(LedgerError::Invalid(
                "a pixel object is recorded with its key record, and only with one".into(),
            ));
        }
        let uid = req.attrs.sop_instance_uid.as_str();
        let previous = self.previous(uid)?;
        if let Some((idx, key)) = &previous {
            // The same content again is a duplicate, unless the latest entry's object was lost
            // before it was acknowledged (see `unacked`): then this is its new version.
            if *key == req.instance_key && !self.is_unacked(idx.seq)? {
                return Ok(StoreOutcome::Duplicate { seq: idx.seq });
            }
        }
        // A version that moves to another study or patient leaves a trace of where the older
        // one was, so an erasure of that study or patient still finds it (the hierarchy keys
        // follow the latest version only). Nothing to write for the usual first version.
        let vloc = match &previous {
            Some((idx, _)) => self.moved_keys(uid, &idx.keys, &req.attrs)?,
            None => None,
        };
        let (seq, prev_hash) = self.next_position();
        let version = previous.as_ref().map(|p| p.0.version + 1).unwrap_or(1);
        let s = &req.summary;
        let entry = Entry {
            seq,
            prev_hash,
            time_micros: self.time_micros,
            event: Event::Store,
            calling_ae: req.calling_ae.clone(),
            sop_class_uid: s.sop_class_uid.clone(),
            transfer_syntax: s.transfer_syntax.clone(),
            instance_key: req.instance_key,
            pixel_sha256: s.pixel_sha256,
            pixel_length: s.pixel_length,
            dataset_sha256: s.dataset_sha256,
            dataset_length: s.dataset_length,
            object_name: req.object_name.clone().unwrap_or_default(),
            version,
            subject_seq: 0,
            reason: Reason::None,
            status: 0,
            peer: String::new(),
            detail: String::new(),
        };
        self.append(&entry)?;
        // From here on nothing fails.
        self.batch
            .put_cf(self.cf_meta, seq.to_be_bytes(), &req.record);
        if let (Some(name), Some(key)) = (&req.object_name, &req.object_key) {
            self.batch
                .put_cf(self.cf_keys, name.as_bytes(), key.encode());
        }
        let keys = hierarchy_keys(&req.attrs);
        let mut versions = Vec::new();
        if let Some((old, _)) = &previous {
            for k in old.keys.iter().filter(|k| !keys.contains(k)) {
                self.batch.delete_cf(self.cf_index, k);
            }
            versions.clone_from(&old.versions);
        }
        versions.push(seq);
        let mut study_value = req.attrs.sop_class_uid.as_bytes().to_vec();
        study_value.push(0);
        study_value.extend_from_slice(req.attrs.modality.as_bytes());
        for k in &keys {
            let value: &[u8] = if k.starts_with(b"study\0") {
                &study_value
            } else {
                &[]
            };
            self.batch.put_cf(self.cf_index, k, value);
        }
        let idx = SopIndex {
            seq,
            version,
            instance_key: req.instance_key,
            versions,
            keys,
        };
        self.batch.put_cf(self.cf_index, sop_key(uid), idx.encode());
        if let Some(vloc) = vloc {
            for k in &vloc {
                self.batch.put_cf(self.cf_index, k, []);
            }
            self.batch
                .put_cf(self.cf_index, vloc_key(uid), encode_keys(&vloc));
            self.pending_vloc.insert(uid.to_string(), vloc);
        }
        self.pending
            .insert(uid.to_string(), (idx, req.instance_key));
        for destination in &req.forward_to {
            self.enqueue(destination, seq);
        }
        Ok(StoreOutcome::Stored { seq, version })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::test_support::*;

    #[tokio::test(flavor = "multi_thread")]
    async fn chain_versions_duplicates_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::open(dir.path()).unwrap();
        assert_eq!(
            ledger.store(request("1.1", "9", 1)).await.unwrap(),
            StoreOutcome::Stored { seq: 1, version: 1 }
        );
        assert_eq!(
            ledger.store(request("1.2", "9", 2)).await.unwrap(),
            StoreOutcome::Stored { seq: 2, version: 1 }
        );
        assert_eq!(
            ledger.store(request("1.1", "9", 1)).await.unwrap(),
            StoreOutcome::Duplicate { seq: 1 }
        );
        // New content, moved to another study: a new version, and the study index follows it.
        assert_eq!(
            ledger.store(request("1.1", "8", 3)).await.unwrap(),
            StoreOutcome::Stored { seq: 3, version: 2 }
        );
        assert_eq!(
            ledger.instances_in_study("9").unwrap(),
            vec!["1.2".to_string()]
        );
        assert_eq!(
            ledger.instances_in_study("8").unwrap(),
            vec!["1.1".to_string()]
        );
        assert_eq!(ledger.versions("1.1").unwrap(), vec![1, 3]);
        let e1 = ledger.entry(1).unwrap().unwrap();
        let e2 = ledger.entry(2).unwrap().unwrap();
        assert_eq!(e1.prev_hash, [0; 32]);
        assert_eq!(e2.prev_hash, e1.hash());
        let head = ledger.head().unwrap().unwrap();
        ledger.close();
        drop(ledger);
        let ledger = Ledger::open(dir.path()).unwrap();
        assert_eq!(ledger.head().unwrap().unwrap(), head);
        assert_eq!(
            ledger.store(request("1.3", "9", 4)).await.unwrap(),
            StoreOutcome::Stored { seq: 4, version: 1 }
        );
        assert_eq!(ledger.entry(4).unwrap().unwrap().prev_hash, head.1);
        assert_eq!(ledger.latest("1.1").unwrap().unwrap().seq, 3);
        let e3 = ledger.entry(3).unwrap().unwrap();
        assert_eq!(ledger.record_of(&e3).unwrap().unwrap(), vec![3; 10]);
    }
}
