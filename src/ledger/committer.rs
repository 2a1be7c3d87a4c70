//! The committer: the ledger's single writer.
//!
//! All writes go through one thread: associations send requests over a channel and wait for a
//! reply. The committer takes every request waiting, assigns sequence numbers and chain hashes
//! in order, writes them as one `WriteBatch` with a synced WAL (one fsync for the whole group)
//! and only then replies (pending-object notes waiting with them go first, in a batch of their
//! own without an fsync: see [`super::notes`]). So a C-STORE-RSP success always follows a
//! durable ledger write, and concurrent associations share fsyncs instead of queueing behind
//! each other's. Being the only writer also makes duplicate detection race-free. Between groups
//! it records what other processes left in the event spool, the damage found by reads, and
//! signs checkpoints.

use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Mutex};

use rocksdb::{WriteOptions, DB};
use tokio::sync::oneshot;

use super::checkpoint::{self, Checkpointing};
use super::damage;
use super::db::{read_entry, read_head, CF_CHECKPOINTS};
use super::erase;
use super::error::LedgerError;
use super::forward;
use super::group::Group;
use super::merkle;
use super::notes::{self, NoteBook};
use super::request::{ForwardUpdate, Job, Planned, StoreOutcome};
use super::spool::SpooledEvent;
use super::trail::{self, damage_alert};
use super::tree::DbNodes;
use super::witness;
use crate::instance::Digest32;

/// How often the committer reads the event spool.
const SPOOL_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// Most requests folded into one group commit.
const MAX_GROUP: usize = 512;

/// Most metadata record bytes folded into one group commit (a group's records exist three times
/// while it is written: the requests', the batch's and the memtable's). A larger record is a
/// group of its own, charged to its data set (see `memory::COPIES`).
const MAX_GROUP_RECORD_BYTES: usize = 8 * 1024 * 1024;

/// The single writer.
pub(super) struct Committer {
    pub(super) db: Arc<DB>,
    pub(super) forward_wakeup: Arc<tokio::sync::Notify>,
    pub(super) head: Option<(u64, Digest32)>,
    pub(super) checkpointing: Option<Checkpointing>,
    /// Directory where other processes (export) leave security events for the ledger.
    pub(super) spool: Option<PathBuf>,
    /// The checkpoint file, rewritten before each checkpoint is stored (see [`witness`]).
    pub(super) witness: PathBuf,
    /// Tree size of the newest stored checkpoint.
    pub(super) last_checkpoint: u64,
    pub(super) last_signed: Option<std::time::Instant>,
    /// The background compaction after erasures, started with the first one.
    pub(super) compactor: Option<erase::Compactor>,
    pub(super) notes: Arc<Mutex<NoteBook>>,
    /// Where the next range deletion of numbered pending-object notes starts: the end of the
    /// last one written, never below this run's first number (see [`pending`]). Notes below it
    /// that are still unsettled were stepped around.
    pub(super) note_floor: u64,
    /// Damage found by any read; the committer records its alerts (see [`damage`]).
    pub(super) damage: Arc<damage::DamageBook>,
}

impl Committer {
    pub(super) fn run(mut self, rx: mpsc::Receiver<Job>) {
        // The spool (security events, forward retry requests) is read about once a second, also
        // while requests keep the committer busy.
        let tick = self
            .checkpointing
            .as_ref()
            .map(|c| c.interval)
            .unwrap_or(SPOOL_INTERVAL)
            .min(SPOOL_INTERVAL);
        // Events left while the node was down, and a tree that grew meanwhile, are recorded now.
        self.drain_spool();
        let mut last_drain = std::time::Instant::now();
        self.maybe_checkpoint(true);
        let mut held: Option<Job> = None;
        loop {
            if last_drain.elapsed() >= SPOOL_INTERVAL {
                self.drain_spool();
                self.record_damage();
                self.abandon_old_notes();
                last_drain = std::time::Instant::now();
            }
            let first = match held.take() {
                Some(job) => job,
                None => match rx.recv_timeout(tick) {
                    Ok(job) => job,
                    Err(mpsc::RecvTimeoutError::Timeout) => {
                        // Idle: no next group is coming to take the settled notes.
                        self.flush_ready_notes();
                        self.maybe_checkpoint(false);
                        continue;
                    }
                    Err(mpsc::RecvTimeoutError::Disconnected) => break,
                },
            };
            // An erasure reads the index as the database has it: it runs in a group of its own.
            let alone = matches!(first, Job::Erase { .. });
            let mut record_bytes = first.record_bytes();
            let mut jobs = vec![first];
            while !alone && jobs.len() < MAX_GROUP && record_bytes < MAX_GROUP_RECORD_BYTES {
                match rx.try_recv() {
                    Ok(j @ Job::Erase { .. }) => {
                        held = Some(j);
                        break;
                    }
                    Ok(j) if record_bytes + j.record_bytes() > MAX_GROUP_RECORD_BYTES => {
                        held = Some(j);
                        break;
                    }
                    Ok(j) => {
                        record_bytes += j.record_bytes();
                        jobs.push(j);
                    }
                    Err(_) => break,
                }
            }
            // Notes first, in a group of their own: written without an fsync, they need not
            // wait for the one the stores' group makes.
            let (notes, rest): (Vec<Job>, Vec<Job>) = jobs
                .into_iter()
                .partition(|j| matches!(j, Job::Note { .. }));
            for jobs in [notes, rest] {
                if !jobs.is_empty() {
                    let results = self.commit_group(&jobs);
                    reply(jobs, results, &self.notes);
                }
            }
            self.maybe_checkpoint(false);
        }
        self.flush_ready_notes();
        // The last entries before a shutdown are covered too.
        self.maybe_checkpoint(true);
        if let Some(c) = self.compactor.take() {
            c.finish();
        }
    }

    /// Deletes the notes settled since the last group (when the node falls idle, and at
    /// shutdown), so that they neither wait for the next C-STORE nor send their objects to the
    /// next start's `reconcile`; a note would otherwise outlive [`notes::ABANDON_AFTER`] and
    /// be reported as unsettled. Not synced: a note a crash brings back costs one object check.
    pub(super) fn flush_ready_notes(&mut self) {
        if self.notes.lock().is_ok_and(|b| b.has_ready()) {
            let _ = self.commit_group(&[]);
        }
    }

    /// Records the security events other processes left in the spool directory, then deletes
    /// their files (only once the entries are durable, so none is ever lost).
    pub(super) fn drain_spool(&mut self) {
        let Some(dir) = &self.spool else { return };
        let Ok(rd) = std::fs::read_dir(dir) else {
            return;
        };
        let mut files: Vec<PathBuf> = Vec::new();
        let mut retries: Vec<PathBuf> = Vec::new();
        let mut audits: Vec<PathBuf> = Vec::new();
        for p in rd.flatten().map(|e| e.path()) {
            match p.extension().and_then(|x| x.to_str()) {
                Some("event") => files.push(p),
                Some(forward::RETRY_EXTENSION) => retries.push(p),
                Some(trail::SPOOL_EXTENSION) => audits.push(p),
                _ => {}
            }
        }
        retries.sort();
        for f in retries {
            self.apply_retry_request(&f);
        }
        if files.is_empty() && audits.is_empty() {
            return;
        }
        // Oldest first (the names start with the time), so the trail keeps their order.
        audits.sort();
        let mut group = match Group::new(&self.db, self.head, 0, 0) {
            Ok(g) => g,
            Err(e) => return tracing::error!(error = %e, "cannot record security events"),
        };
        let mut done = Vec::new();
        for f in &files {
            let parsed = std::fs::read_to_string(f)
                .ok()
                .and_then(|t| SpooledEvent::parse(&t));
            let Some(ev) = parsed else {
                tracing::error!(file = %f.display(), "unreadable security event file; renamed to .bad");
                let _ = std::fs::rename(f, f.with_extension("bad"));
                continue;
            };
            let subject = match read_entry(&self.db, ev.subject_seq) {
                Ok(Some(e)) => e,
                Ok(None) => {
                    tracing::error!(file = %f.display(), "security event names no entry; renamed to .bad");
                    let _ = std::fs::rename(f, f.with_extension("bad"));
                    continue;
                }
                Err(e) => {
                    tracing::error!(file = %f.display(), error = %e, "cannot read the entry a security event names; retried later");
                    continue;
                }
            };
            match group.add_event(
                &subject,
                ev.reason,
                &ev.detector,
                (&ev.calling_ae, &ev.peer),
            ) {
                Ok(seq) => {
                    tracing::warn!(seq, subject = ev.subject_seq, reason = ev.reason.describe(), detector = %ev.detector, calling = %ev.calling_ae, peer = %ev.peer, "security event recorded on the ledger");
                    done.push(f.clone());
                }
                Err(e) => tracing::error!(error = %e, "cannot record a security event"),
            }
        }
        for f in &audits {
            let parsed = std::fs::read_to_string(f)
                .ok()
                .and_then(|t| serde_json::from_str::<trail::AuditRecord>(&t).ok());
            let Some(record) = parsed else {
                tracing::error!(file = %f.display(), "unreadable audit record file; renamed to .bad");
                let _ = std::fs::rename(f, f.with_extension("bad"));
                continue;
            };
            match group.audit(&record) {
                Ok(_) => done.push(f.clone()),
                Err(e) => tracing::error!(error = %e, "cannot record an audit record"),
            }
        }
        if done.is_empty() {
            return;
        }
        let head = group.head;
        let mut wo = WriteOptions::default();
        wo.set_sync(true);
        match self.db.write_opt(group.batch.into_write_batch(), &wo) {
            Ok(()) => {
                self.head = head;
                for f in done {
                    let _ = std::fs::remove_file(f);
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot record security events");
                self.head = read_head(&self.db).unwrap_or(self.head);
            }
        }
    }

    /// Records a security alert for each damage found since the last pass (by the read-back or
    /// by a read that failed); one that cannot be recorded now is tried again at the next.
    pub(super) fn record_damage(&mut self) {
        let (mark, new) = self.damage.unalerted();
        if new.is_empty() {
            return;
        }
        let jobs: Vec<Job> = new
            .iter()
            .map(|d| Job::Audit {
                record: damage_alert(d),
                reply: oneshot::channel().0,
            })
            .collect();
        let results = self.commit_group(&jobs);
        let failed = results.iter().find_map(|r| match r {
            Planned::Audit(Err(e)) => Some(e.to_string()),
            _ => None,
        });
        match failed {
            None => self.damage.alerted(mark),
            Some(e) => {
                tracing::error!(error = %e, "cannot record the ledger's damage on the trail")
            }
        }
    }

    /// Re-queues the failed forwards a `dicomchain forward retry` asked for, then deletes the
    /// request (only once that is durable).
    pub(super) fn apply_retry_request(&mut self, file: &Path) {
        let Some(destination) = std::fs::read_to_string(file)
            .ok()
            .and_then(|t| forward::parse_retry_request(&t))
        else {
            tracing::error!(file = %file.display(), "unreadable forward retry request; renamed to .bad");
            let _ = std::fs::rename(file, file.with_extension("bad"));
            return;
        };
        let mut group = match Group::new(&self.db, self.head, 0, 0) {
            Ok(g) => g,
            Err(e) => return tracing::error!(error = %e, "cannot re-queue forwards"),
        };
        let result = group
            .forward(&ForwardUpdate::Retry { destination })
            .and_then(|n| {
                let mut wo = WriteOptions::default();
                wo.set_sync(true);
                self.db
                    .write_opt(group.batch.into_write_batch(), &wo)
                    .map_err(LedgerError::Write)
                    .map(|()| n)
            });
        match result {
            Ok(n) => {
                tracing::info!(requeued = n, "failed forwards re-queued");
                // The answer first, then the request goes: `forward retry` waits for the latter.
                let _ = std::fs::write(forward::retry_answer_path(file), n.to_string());
                let _ = std::fs::remove_file(file);
                self.forward_wakeup.notify_waiters();
            }
            Err(e) => tracing::error!(error = %e, "cannot re-queue forwards"),
        }
    }

    /// Signs and stores a checkpoint of the current tree if it grew since the last one and the
    /// interval has passed (or `now`). Only sizes already durable are signed, and the tree is
    /// append-only, so two checkpoints can never disagree — crashes included.
    pub(super) fn maybe_checkpoint(&mut self, now: bool) {
        let Some(cp) = &self.checkpointing else {
            return;
        };
        let size = self.head.map(|h| h.0).unwrap_or(0);
        if size <= self.last_checkpoint {
            return;
        }
        if !now && self.last_signed.is_some_and(|t| t.elapsed() < cp.interval) {
            return;
        }
        let result = merkle::root(&DbNodes(&self.db), size).and_then(|root| {
            let note = cp.signer.sign(&checkpoint::Checkpoint {
                origin: cp.origin.clone(),
                size,
                root,
            });
            // The file first, the checkpoint second: no checkpoint is ever stored (and so
            // published) that the file does not cover. A crash in between leaves the file ahead
            // of the stored checkpoints, over entries already durable, which the next open
            // accepts and stores. A file that cannot be written stops the signing instead.
            witness::write(&self.witness, &note)?;
            let cf = self
                .db
                .cf_handle(CF_CHECKPOINTS)
                .ok_or_else(|| LedgerError::Corrupt("missing checkpoints".into()))?;
            let mut wo = WriteOptions::default();
            wo.set_sync(true);
            self.db
                .put_cf_opt(cf, size.to_be_bytes(), note.as_bytes(), &wo)
                .map_err(LedgerError::Write)
        });
        // Tried again after the interval (so an error is logged once per interval).
        self.last_signed = Some(std::time::Instant::now());
        match result {
            Ok(()) => {
                self.last_checkpoint = size;
                tracing::debug!(size, "checkpoint signed");
            }
            Err(e @ LedgerError::Witness(_)) => {
                tracing::error!(error = %e, size, "no checkpoint signed: the checkpoint file cannot be written, and a checkpoint it does not cover could be rolled back unnoticed; signing resumes once it can be written")
            }
            Err(e) => tracing::error!(error = %e, size, "cannot sign a checkpoint"),
        }
    }

    /// Writes a group as one batch, synced unless it holds notes only. A request that cannot be
    /// planned (say, its previous version is unreadable) fails alone; if the write itself fails
    /// every planned request gets the error (a duplicate of an instance planned in the same
    /// group too: what it duplicates was not written either).
    pub(super) fn commit_group(&mut self, jobs: &[Job]) -> Vec<Planned> {
        let first_new = self.head.map_or(1, |h| h.0 + 1);
        let record_bytes = jobs.iter().map(Job::record_bytes).sum();
        let mut plan = match Group::new(&self.db, self.head, jobs.len(), record_bytes) {
            Ok(g) => g,
            Err(e) => {
                let err = || LedgerError::Corrupt(e.to_string());
                return jobs.iter().map(|job| job.failed(err())).collect();
            }
        };
        let planned: Vec<Planned> = jobs
            .iter()
            .map(|job| match job {
                Job::Store { req, .. } => Planned::Store(plan.add(req)),
                Job::Forward { update, .. } => Planned::Forward(plan.forward(update)),
                Job::Acl { change, .. } => Planned::Acl(plan.acl(change)),
                Job::Audit { record, .. } => Planned::Audit(plan.audit(record)),
                Job::Note { name, key, .. } => Planned::Note(plan.note(name, key, &self.notes)),
                Job::Unacknowledged { seq, .. } => {
                    Planned::Unacknowledged(plan.unacknowledged(*seq))
                }
                Job::Erase { scope, by, .. } => Planned::Erase(plan.erase(scope, by)),
            })
            .collect();
        // A failed erasure may have planned part of its entries: nothing of it is written
        // (it runs alone, so the batch holds nothing else).
        if matches!(planned.as_slice(), [Planned::Erase(Err(_))]) {
            return planned;
        }
        // Notes whose objects are durable and named by entries now ([`Ledger::object_durable`])
        // go in this batch, as one range deletion of every settled note (a duplicate's object
        // is named by no entry: its note stays until ingest deleted the object).
        let mut settling: Vec<u64> = self
            .notes
            .lock()
            .map(|mut b| b.take_ready())
            .unwrap_or_default();
        settling.sort_unstable();
        let ranges = self
            .notes
            .lock()
            .map(|b| b.settled_ranges(self.note_floor, &settling, notes::STEP_OVER_AFTER))
            .unwrap_or_default();
        for &(start, end) in &ranges {
            plan.batch.delete_range_cf(
                plan.cf_pending,
                notes::note_key(start),
                notes::note_key(end),
            );
        }
        // Notes the ranges stepped around earlier (stores that took long) go one by one.
        for &n in settling.iter().filter(|&&n| n < self.note_floor) {
            plan.batch.delete_cf(plan.cf_pending, notes::note_key(n));
        }
        if plan.batch.is_empty() {
            // Nothing to delete yet: a later range covers the settled notes.
            if let Ok(mut b) = self.notes.lock() {
                b.settle(&settling);
            }
            return planned;
        }
        // Notes alone are not synced (see `Ledger::intend_object`; `run` gives them groups of
        // their own); anything else is.
        let mut wo = WriteOptions::default();
        wo.set_sync(jobs.iter().any(|j| !matches!(j, Job::Note { .. })));
        let enqueued = plan.enqueued;
        let erased = plan.erased;
        match self.db.write_opt(plan.batch.into_write_batch(), &wo) {
            Ok(()) => {
                self.head = plan.head;
                if let Ok(mut b) = self.notes.lock() {
                    b.settle(&settling);
                }
                if let Some(&(_, end)) = ranges.last() {
                    self.note_floor = self.note_floor.max(end);
                }
                if erased {
                    self.compactor
                        .get_or_insert_with(|| erase::Compactor::start(self.db.clone()))
                        .request();
                }
                if enqueued {
                    self.forward_wakeup.notify_waiters();
                }
                planned
            }
            Err(e) => {
                tracing::error!(error = %e, requests = jobs.len(), "ledger group commit failed");
                // A compaction that met a damaged block fails every later write with its error.
                damage::report(&self.db, &e);
                // The settled notes were not deleted: the next group tries again.
                if let Ok(mut b) = self.notes.lock() {
                    b.put_back_ready(settling);
                }
                // RocksDB may have applied the batch without syncing it; follow the database
                // rather than our guess, so the next sequence number never collides.
                self.head = read_head(&self.db).unwrap_or(self.head);
                self.not_written(planned, &e, first_new)
            }
        }
    }

    /// The answers of a group whose write failed with `e`: every planned change fails with it
    /// (a duplicate of an instance new in the group too: what it duplicates was not written).
    fn not_written(
        &mut self,
        planned: Vec<Planned>,
        e: &rocksdb::Error,
        first_new: u64,
    ) -> Vec<Planned> {
        planned
            .into_iter()
            .map(|r| match r {
                Planned::Store(Ok(StoreOutcome::Stored { .. })) => {
                    Planned::Store(Err(LedgerError::Write(e.clone())))
                }
                Planned::Store(Ok(StoreOutcome::Duplicate { seq })) if seq >= first_new => {
                    Planned::Store(Err(LedgerError::Write(e.clone())))
                }
                Planned::Forward(Ok(_)) => Planned::Forward(Err(LedgerError::Write(e.clone()))),
                Planned::Acl(Ok(_)) => Planned::Acl(Err(LedgerError::Write(e.clone()))),
                Planned::Audit(Ok(_)) => Planned::Audit(Err(LedgerError::Write(e.clone()))),
                Planned::Unacknowledged(Ok(_)) => {
                    Planned::Unacknowledged(Err(LedgerError::Write(e.clone())))
                }
                Planned::Note(Ok(n)) => {
                    // Never written: nothing for a range deletion to wait for.
                    if let Ok(mut b) = self.notes.lock() {
                        b.settle(&[n.number()]);
                    }
                    Planned::Note(Err(LedgerError::Write(e.clone())))
                }
                Planned::Erase(Ok(_)) => Planned::Erase(Err(LedgerError::Write(e.clone()))),
                other => other,
            })
            .collect()
    }

    /// Turns the numbered notes nobody settled within [`notes::ABANDON_AFTER`] into named ones, so they
    /// stop holding back the range deletions; `reconcile` checks them at the next start.
    pub(super) fn abandon_old_notes(&mut self) {
        let old = match self.notes.lock() {
            Ok(b) => b.older(notes::ABANDON_AFTER),
            Err(_) => return,
        };
        if old.is_empty() {
            return;
        }
        // Out of the book only once the named form is written: until then a range deletion
        // must not reach them.
        match notes::keep_named(&self.db, &old) {
            Ok(n) => {
                if let Ok(mut b) = self.notes.lock() {
                    b.settle(&old);
                }
                tracing::warn!(
                    notes = n,
                    "pending-object notes unsettled for 10 minutes (C-STOREs that failed, or still commit a large object) kept by name; their objects are checked at the next start"
                );
            }
            Err(e) => tracing::error!(error = %e, "cannot keep pending-object notes; retried"),
        }
    }
}

/// Sends each job its result. A note nobody waits for any more (the C-STORE gave up before
/// committing its object) is settled at once.
pub(super) fn reply(jobs: Vec<Job>, results: Vec<Planned>, notes: &Mutex<NoteBook>) {
    for (job, result) in jobs.into_iter().zip(results) {
        match (job, result) {
            (Job::Store { reply, .. }, Planned::Store(r)) => {
                let _ = reply.send(r);
            }
            (Job::Forward { reply, .. }, Planned::Forward(r)) => {
                let _ = reply.send(r);
            }
            (Job::Acl { reply, .. }, Planned::Acl(r)) => {
                let _ = reply.send(r);
            }
            (Job::Audit { reply, .. }, Planned::Audit(r)) => {
                let _ = reply.send(r);
            }
            (Job::Note { reply, .. }, Planned::Note(r)) => {
                if let Err(Ok(n)) = reply.send(r) {
                    if let Ok(mut b) = notes.lock() {
                        b.settle(&[n.number()]);
                    }
                }
            }
            (Job::Unacknowledged { reply, .. }, Planned::Unacknowledged(r)) => {
                let _ = reply.send(r);
            }
            (Job::Erase { reply, .. }, Planned::Erase(r)) => {
                let _ = reply.send(r);
            }
            _ => unreachable!("results follow their jobs"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::test_support::*;

    #[tokio::test(flavor = "multi_thread")]
    async fn concurrent_writers_share_commits_and_keep_the_chain() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::open(dir.path()).unwrap();
        let mut tasks = Vec::new();
        for i in 0..200u32 {
            let l = ledger.clone();
            tasks.push(tokio::spawn(async move {
                let mut r = request(&format!("2.{i}"), "7", (i % 250) as u8);
                r.instance_key = Sha256::digest(i.to_be_bytes()).into();
                l.store(r).await.unwrap()
            }));
        }
        for t in tasks {
            assert!(matches!(t.await.unwrap(), StoreOutcome::Stored { .. }));
        }
        let mut prev = [0u8; 32];
        for seq in 1..=200 {
            let e = ledger.entry(seq).unwrap().unwrap();
            assert_eq!(e.prev_hash, prev, "chain broken at {seq}");
            prev = e.hash();
        }
        assert_eq!(ledger.instances_in_study("7").unwrap().len(), 200);
    }
}
