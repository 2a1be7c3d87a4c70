//! Entries whose pixel object did not survive a crash before their C-STORE was acknowledged.
//!
//! Ingest makes a new instance's object and its ledger entry durable at the same time: the
//! sealed object is placed under its final name, then its `fsync` and the group commit run
//! together, and the success response waits for both (see `ingest`). The pending-object note
//! taken before the object was placed stays until both are durable ([`Ledger::object_durable`]
//! settles it; a later group's range deletion removes it). So a crash (a power loss: a killed
//! process leaves the page cache, and the object with it) can leave an entry whose object is
//! missing or incomplete, never acknowledged to the sender. The startup reconciliation finds it
//! through the note, checks the object against the entry, and records on the ledger what
//! happened: an integrity-failure entry with reason [`Reason::Unacknowledged`] about that
//! entry, detected by "reconcile", together with an index mark `unacked\0seq`. With that mark:
//! - the same instance sent again (the sender got no success, so it retries) is stored as a new
//!   version, not taken for a duplicate of the entry whose object is gone;
//! - `verify` reports the entry's missing object as this recorded event, not as damage.

use std::collections::{HashMap, HashSet};

use rocksdb::{ColumnFamily, DB};

use super::damage::read_error;
use super::db::{read_entry, CF_ENTRIES, CF_INDEX};
use super::entry::{Entry, Event, Reason};
use super::error::LedgerError;
use super::group::Group;
use super::handle::Ledger;
use super::notes::NoteId;
use super::request::Job;

const UNACKED_PREFIX: &[u8] = b"unacked\0";

/// The detector named on the entries recorded here.
pub const DETECTOR: &str = "reconcile";

fn unacked_key(seq: u64) -> Vec<u8> {
    let mut k = UNACKED_PREFIX.to_vec();
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

/// Whether entry `seq` carries the mark.
fn marked(db: &DB, index: &ColumnFamily, seq: u64) -> Result<bool, LedgerError> {
    Ok(db
        .get_cf(index, unacked_key(seq))
        .map_err(read_error(db))?
        .is_some())
}

impl Ledger {
    /// Records that the object of stored entry `seq` was lost before its C-STORE was
    /// acknowledged (see the module). Returns the new entry's number; durable on return.
    pub async fn record_unacknowledged(&self, seq: u64) -> Result<u64, LedgerError> {
        let (reply, rx) = tokio::sync::oneshot::channel();
        self.ask_until_done(Job::Unacknowledged { seq, reply }, rx)
            .await
    }

    /// The stored entries among the last `within` that name one of `names`, by name: the
    /// entries of the objects whose notes a crash left (the newest entries, since a note lives
    /// only until its object is durable).
    pub fn entries_naming(
        &self,
        names: &HashSet<&str>,
        within: u64,
    ) -> Result<HashMap<String, Entry>, LedgerError> {
        let mut found = HashMap::new();
        if names.is_empty() {
            return Ok(found);
        }
        let mut it = self.inner.db.raw_iterator_cf(self.cf(CF_ENTRIES)?);
        it.seek_to_last();
        let mut seen = 0;
        while it.valid() && seen < within && found.len() < names.len() {
            if let Some(raw) = it.value() {
                let e = Entry::decode(raw).map_err(|e| LedgerError::Corrupt(e.to_string()))?;
                if e.event == Event::Store && names.contains(e.object_name.as_str()) {
                    found.entry(e.object_name.clone()).or_insert(e);
                }
            }
            seen += 1;
            it.prev();
        }
        it.status().map_err(read_error(&self.inner.db))?;
        Ok(found)
    }

    /// Whether stored entry `seq` was recorded as unacknowledged.
    pub fn is_unacknowledged(&self, seq: u64) -> Result<bool, LedgerError> {
        marked(&self.inner.db, self.cf(CF_INDEX)?, seq)
    }

    /// The object of a note is durable and its entry written (or not needed): the next group
    /// commit's range deletion takes the note. In memory only; a note whose deletion a crash
    /// loses is checked again by the startup reconciliation.
    pub fn object_durable(&self, note: NoteId) {
        if let Some(book) = self.inner.notes.as_ref() {
            if let Ok(mut b) = book.lock() {
                b.ready(note.number());
            }
        }
    }
}

impl Group<'_> {
    pub(super) fn unacknowledged(&mut self, seq: u64) -> Result<u64, LedgerError> {
        let subject = read_entry(self.db, seq)?
            .filter(|e| e.event == Event::Store && !e.object_name.is_empty())
            .ok_or_else(|| {
                LedgerError::Corrupt(format!(
                    "entry {seq} is not a stored instance with an object"
                ))
            })?;
        if self.is_unacked(seq)? {
            return Err(LedgerError::Corrupt(format!(
                "entry {seq} is already recorded as unacknowledged"
            )));
        }
        let event = self.add_event(&subject, Reason::Unacknowledged, DETECTOR, ("", ""))?;
        self.batch.put_cf(self.cf_index, unacked_key(seq), []);
        Ok(event)
    }

    /// Whether entry `seq` carries the mark (an entry of the latest version: read only when a
    /// C-STORE repeats it).
    pub(super) fn is_unacked(&self, seq: u64) -> Result<bool, LedgerError> {
        marked(self.db, self.cf_index, seq)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::test_support::*;

    #[tokio::test]
    async fn an_unacknowledged_entry_is_recorded_and_its_instance_stored_again() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::open(dir.path()).unwrap();
        let mut r = request("1.1", "9", 1);
        r.object_name = Some("obj1".into());
        r.object_key = Some(ObjectKey { salt: [1; 32] });
        let again = r.clone();
        assert_eq!(
            ledger.store(r).await.unwrap(),
            StoreOutcome::Stored { seq: 1, version: 1 }
        );
        assert!(!ledger.is_unacknowledged(1).unwrap());
        let event = ledger.record_unacknowledged(1).await.unwrap();
        assert_eq!(event, 2);
        let e = ledger.entry(2).unwrap().unwrap();
        assert_eq!(
            (e.event, e.subject_seq, e.reason, e.calling_ae.as_str()),
            (Event::IntegrityFailure, 1, Reason::Unacknowledged, DETECTOR)
        );
        assert!(ledger.is_unacknowledged(1).unwrap());
        // Once only, and only for a stored instance with an object.
        assert!(ledger.record_unacknowledged(1).await.is_err());
        assert!(ledger.record_unacknowledged(2).await.is_err());
        assert!(ledger.record_unacknowledged(99).await.is_err());
        // The same content again is its new version, not a duplicate of the lost one; and
        // that one is a duplicate again.
        assert_eq!(
            ledger.store(again.clone()).await.unwrap(),
            StoreOutcome::Stored { seq: 3, version: 2 }
        );
        assert_eq!(ledger.latest("1.1").unwrap().unwrap().seq, 3);
        assert_eq!(
            ledger.store(again).await.unwrap(),
            StoreOutcome::Duplicate { seq: 3 }
        );
        // The newest stored entries naming objects, by name.
        let names = ["obj1", "nothing"].into_iter().collect();
        let found = ledger.entries_naming(&names, 100).unwrap();
        assert_eq!(found.len(), 1);
        assert_eq!(found["obj1"].seq, 3);
        assert!(ledger.entries_naming(&names, 0).unwrap().is_empty());
    }
}
