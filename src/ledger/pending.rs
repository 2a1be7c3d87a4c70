//! Pending-object notes as the rest of the node sees them (see `notes` for their
//! layout and numbering): noting an object about to be committed, clearing notes, and listing
//! what a crash left for the startup reconciliation.

use std::sync::Mutex;

use rocksdb::IteratorMode;
use tokio::sync::oneshot;

use super::damage::read_error;
use super::db::CF_PENDING;
use super::error::LedgerError;
use super::group::Group;
use super::handle::Ledger;
pub use super::notes::NoteId;
use super::notes::{note_key, note_number, NoteBook, ERASED_NOTE, NUMBERED};
use super::request::Job;
use crate::instance::Digest32;

/// What [`Ledger::pending_objects`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingObject {
    pub name: String,
    pub instance_key: Digest32,
    /// The ledger holds that instance after all (a duplicate, or an entry whose note was not
    /// deleted in time).
    pub recorded: bool,
    /// Numbered notes; `None` for named ones.
    pub note: Option<NoteId>,
}

impl Ledger {
    /// Notes, before the pixel object `name` of instance `key` is committed to the object store,
    /// that it is about to exist. Pass the note on in [`StoreRequest::note`]: the group commit
    /// that records the instance settles it. Notes go through the committer like everything
    /// else (many small writes from many threads queued in RocksDB's write path behind each
    /// other and the group commits), in the next group's batch; a group of notes alone is
    /// written without an fsync of its own (the next group commit syncs it): a note survives a
    /// killed process; after a power loss an object whose note was lost is an orphan that only
    /// `verify`'s full scan finds.
    pub async fn intend_object(&self, name: &str, key: &Digest32) -> Result<NoteId, LedgerError> {
        let (reply, rx) = oneshot::channel();
        let job = Job::Note {
            name: name.to_string(),
            key: *key,
            reply,
        };
        self.ask(job, rx).await
    }

    /// Forgets a numbered note whose object was deleted (or found recorded). A note that was
    /// rewritten in the named form meanwhile keeps that form: `reconcile` then finds the object
    /// gone (deleting a missing object succeeds) and forgets it.
    pub fn clear_note(&self, note: NoteId) -> Result<(), LedgerError> {
        let book = self.inner.notes.as_ref().ok_or(LedgerError::ReadOnly)?;
        self.inner
            .db
            .delete_cf(self.cf(CF_PENDING)?, note_key(note.0))
            .map_err(LedgerError::Write)?;
        if let Ok(mut b) = book.lock() {
            b.settle(&[note.0]);
        }
        Ok(())
    }

    /// Forgets a named note (after the object was found recorded, or deleted).
    pub fn clear_pending(&self, name: &str) -> Result<(), LedgerError> {
        if self.inner.secondary {
            return Err(LedgerError::ReadOnly);
        }
        self.inner
            .db
            .delete_cf(self.cf(CF_PENDING)?, name.as_bytes())
            .map_err(LedgerError::Write)
    }

    /// Forgets the note of a [`PendingObject`], whichever its form.
    pub fn clear_pending_object(&self, p: &PendingObject) -> Result<(), LedgerError> {
        match p.note {
            Some(note) => self.clear_note(note),
            None => self.clear_pending(&p.name),
        }
    }

    /// Objects noted by [`Ledger::intend_object`] (or an erasure) whose note is still there:
    /// for each, whether the ledger holds its instance after all.
    pub fn pending_objects(&self) -> Result<Vec<PendingObject>, LedgerError> {
        let cf = self.cf(CF_PENDING)?;
        let mut out = Vec::new();
        for item in self.inner.db.iterator_cf(cf, IteratorMode::Start) {
            let (k, v) = item.map_err(read_error(&self.inner.db))?;
            let (note, name, rest) = match note_number(&k) {
                Some(n) => (Some(NoteId(n)), v.get(32..).unwrap_or_default(), &[][..]),
                None => (None, &k[..], v.get(32..).unwrap_or_default()),
            };
            let name = String::from_utf8(name.to_vec())
                .map_err(|_| LedgerError::Corrupt("pending object name is not UTF-8".into()))?;
            let instance_key: Digest32 = v
                .get(..32)
                .and_then(|k| k.try_into().ok())
                .ok_or_else(|| LedgerError::Corrupt(format!("pending object {name}: bad key")))?;
            // The object of an erased instance: no entry that is still live names it (a re-send
            // gets a new object), so it goes whatever the index says.
            let erased = rest.first() == Some(&ERASED_NOTE);
            let recorded = !erased && self.names_object(&name)?;
            out.push(PendingObject {
                name,
                instance_key,
                recorded,
                note,
            });
        }
        Ok(out)
    }

    /// Whether an object the entries read so far do not name is known all the same: a sealed
    /// object recorded since (its key record), or one being stored right now (its pending note).
    pub fn knows_object(&self, name: &str) -> Result<bool, LedgerError> {
        if self.object_key(name)?.is_some() {
            return Ok(true);
        }
        let cf = self.cf(CF_PENDING)?;
        if self
            .inner
            .db
            .get_cf(cf, name.as_bytes())
            .map_err(read_error(&self.inner.db))?
            .is_some()
        {
            return Ok(true);
        }
        // Numbered notes are few: those of the instances being stored, and those no range
        // deletion reached yet.
        let mut it = self.inner.db.raw_iterator_cf(cf);
        it.seek([NUMBERED]);
        while let (Some(k), Some(v)) = (it.key(), it.value()) {
            if note_number(k).is_none() {
                break;
            }
            if v.get(32..) == Some(name.as_bytes()) {
                return Ok(true);
            }
            it.next();
        }
        it.status().map_err(read_error(&self.inner.db))?;
        Ok(false)
    }
}

impl Group<'_> {
    /// Plans a numbered note: its number, and its put.
    pub(super) fn note(
        &mut self,
        name: &str,
        key: &Digest32,
        book: &Mutex<NoteBook>,
    ) -> Result<NoteId, LedgerError> {
        let n = book.lock().map_err(|_| LedgerError::Closed)?.take();
        let mut value = Vec::with_capacity(32 + name.len());
        value.extend_from_slice(key);
        value.extend_from_slice(name.as_bytes());
        self.batch.put_cf(self.cf_pending, note_key(n), value);
        Ok(NoteId(n))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::test_support::*;

    #[tokio::test]
    async fn pending_notes_go_once_their_objects_are_durable_and_never_before() {
        let dir = tempfile::tempdir().unwrap();
        let pending = |ledger: &Ledger| {
            let mut p: Vec<(String, bool)> = ledger
                .pending_objects()
                .unwrap()
                .into_iter()
                .map(|p| (p.name, p.recorded))
                .collect();
            p.sort();
            p
        };
        async fn noted(ledger: &Ledger, sop: &str, key: u8, name: &str) -> (StoreRequest, NoteId) {
            let mut r = request(sop, "1", key);
            r.object_name = Some(name.into());
            r.object_key = Some(ObjectKey { salt: [key; 32] });
            let note = ledger.intend_object(name, &[key; 32]).await.unwrap();
            (r, note)
        }
        {
            let ledger = Ledger::open(dir.path()).unwrap();
            let stuck = ledger.intend_object("stuck", &[9; 32]).await.unwrap();
            let (a, na) = noted(&ledger, "1.1", 1, "obj1").await;
            ledger.store(a).await.unwrap();
            // The entry alone settles nothing: its object may not be durable yet.
            assert_eq!(
                pending(&ledger),
                [("obj1".to_string(), true), ("stuck".to_string(), false)]
            );
            // Durable, but a note taken before it and never settled holds back the range.
            ledger.object_durable(na);
            let (b, nb) = noted(&ledger, "1.2", 2, "obj2").await;
            assert_eq!(
                pending(&ledger),
                [
                    ("obj1".to_string(), true),
                    ("obj2".to_string(), false),
                    ("stuck".to_string(), false)
                ]
            );
            ledger.clear_note(stuck).unwrap();
            ledger.store(b).await.unwrap();
            assert_eq!(pending(&ledger), [("obj2".to_string(), true)]);
            ledger.object_durable(nb);
            // A duplicate's note stays: its object is named by no entry. Its note's group
            // deletes the note settled before it.
            let (c, _) = noted(&ledger, "1.2", 2, "obj2b").await;
            assert!(matches!(
                ledger.store(c).await.unwrap(),
                StoreOutcome::Duplicate { .. }
            ));
            assert_eq!(pending(&ledger), [("obj2b".to_string(), false)]);
            // A note settled after the last group goes at shutdown, unless an unsettled one
            // before it holds the range back (then `reconcile` checks its object).
            let (d, nd) = noted(&ledger, "1.3", 3, "obj3").await;
            ledger.store(d).await.unwrap();
            ledger.object_durable(nd);
            assert_eq!(pending(&ledger).len(), 2);
            ledger.close();
        }
        let ledger = Ledger::open(dir.path()).unwrap();
        let held = [("obj2b".to_string(), false), ("obj3".to_string(), true)];
        assert_eq!(pending(&ledger), held);
        let obj3 = ledger.pending_objects().unwrap();
        ledger.clear_pending_object(&obj3[1]).unwrap();
        assert_eq!(pending(&ledger), [("obj2b".to_string(), false)]);
        // With nothing of this run holding it back, the committer's next idle moment takes it
        // (no later C-STORE needed).
        let (g, ng) = noted(&ledger, "1.7", 7, "obj7").await;
        ledger.store(g).await.unwrap();
        ledger.object_durable(ng);
        let idle = std::time::Instant::now();
        while pending(&ledger).len() == 2 {
            assert!(
                idle.elapsed() < std::time::Duration::from_secs(30),
                "note never deleted"
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        assert_eq!(pending(&ledger), [("obj2b".to_string(), false)]);
        ledger.close();
        drop(ledger);
        let ledger = Ledger::open(dir.path()).unwrap();
        assert_eq!(pending(&ledger), [("obj2b".to_string(), false)]);
        // The notes of an earlier run are left to `reconcile`: this run's range deletions
        // start at its own first number.
        let (d, nd) = noted(&ledger, "1.4", 4, "obj4").await;
        ledger.store(d).await.unwrap();
        ledger.object_durable(nd);
        ledger.store(request("1.9", "1", 9)).await.unwrap();
        assert_eq!(pending(&ledger), [("obj2b".to_string(), false)]);
        // A note nobody settles becomes a named one and stops holding the range back.
        let (e, ne) = noted(&ledger, "1.5", 5, "obj5").await;
        let n = ne.number();
        assert_eq!(
            crate::ledger::notes::keep_named(&ledger.inner.db, &[n]).unwrap(),
            1
        );
        ledger
            .inner
            .notes
            .as_ref()
            .unwrap()
            .lock()
            .unwrap()
            .settle(&[n]);
        drop(e);
        let (f, nf) = noted(&ledger, "1.6", 6, "obj6").await;
        ledger.store(f).await.unwrap();
        ledger.object_durable(nf);
        ledger.store(request("1.8", "1", 8)).await.unwrap();
        let all = ledger.pending_objects().unwrap();
        assert_eq!(all.len(), 2, "{all:?}");
        assert!(all.iter().all(|p| !p.recorded));
        assert!(all.iter().any(|p| p.name == "obj5" && p.note.is_none()));
        assert!(ledger.knows_object("obj5").unwrap() && ledger.knows_object("obj2b").unwrap());
        assert!(!ledger.knows_object("nothing").unwrap());
        for p in &all {
            ledger.clear_pending_object(p).unwrap();
        }
        assert!(pending(&ledger).is_empty());
    }
}
