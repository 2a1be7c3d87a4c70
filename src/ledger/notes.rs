//! Pending-object notes and their numbering: before a pixel object is committed to the object store, ingest notes
//! in the `pending` column family that it is about to exist, so that a crash between the object
//! and its ledger entry leaves a trace for the next start (`Ledger::pending_objects`).
//!
//! Two forms share the column family:
//! - **numbered** (what ingest writes): `0x00 ‖ n` (u64 BE, one number per note, increasing) →
//!   instance key (32 bytes) ‖ object name. A group commit settles the notes of the instances it
//!   records with one range deletion `[first unsettled before, first unsettled now)` in the
//!   entries' batch, instead of one deletion per instance, which would cost the committer a memtable insert per
//!   note, at random keys.
//!   The numbers of this run that are not settled yet live in a [`NoteBook`]; a range deletion
//!   never reaches below the first number of this run (older notes are for `reconcile`), nor
//!   an unsettled note: it ends at the first note still in flight, and steps around a note
//!   unsettled for longer than [`STEP_OVER_AFTER`] (a store that failed or still runs) rather
//!   than wait for it.
//! - **named**: object name (never starts with 0x00) → instance key (32 bytes), optionally
//!   followed by [`ERASED_NOTE`]. Written by an erasure for the objects it deletes, and for a numbered note nobody settled within [`ABANDON_AFTER`]
//!   (a failed commit, a duplicate whose object could not be deleted), so that it no longer
//!   holds back the range deletions; `reconcile` handles it at the next start.
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use rocksdb::{WriteBatch, DB};

use super::damage::read_error;
use super::db::CF_PENDING;
use super::error::LedgerError;

/// The byte after the instance key in a `pending` note for the object of an erased instance.
pub(super) const ERASED_NOTE: u8 = b'E';
/// First byte of a numbered note's key.
pub(super) const NUMBERED: u8 = 0;

/// A numbered note no group settled (or ingest cleared) for this long becomes a named one.
pub(super) const ABANDON_AFTER: Duration = Duration::from_secs(600);

/// Range deletions end at an unsettled note younger than this (its store is in flight), and
/// are split around older ones, so a store that failed holds back nothing but its own note.
pub(super) const STEP_OVER_AFTER: Duration = Duration::from_secs(10);

/// A numbered pending-object note (see `Ledger::intend_object`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NoteId(pub(super) u64);

impl NoteId {
    pub(super) fn number(self) -> u64 {
        self.0
    }
}

pub(super) fn note_key(n: u64) -> [u8; 9] {
    let mut k = [NUMBERED; 9];
    k[1..].copy_from_slice(&n.to_be_bytes());
    k
}

pub(super) fn note_number(key: &[u8]) -> Option<u64> {
    match key {
        [NUMBERED, rest @ ..] => Some(u64::from_be_bytes(rest.try_into().ok()?)),
        _ => None,
    }
}

/// The numbered notes of this run that are not settled yet.
pub(super) struct NoteBook {
    /// The first number of this run: range deletions never reach below it.
    first: u64,
    next: u64,
    live: BTreeMap<u64, Instant>,
    /// Notes whose objects are durable and recorded, for the next group to delete.
    ready: Vec<u64>,
}

impl NoteBook {
    /// Numbers continue after the highest one in the column family.
    pub(super) fn open(db: &DB) -> Result<NoteBook, LedgerError> {
        let cf = db
            .cf_handle(CF_PENDING)
            .ok_or_else(|| LedgerError::Corrupt("missing column family pending".into()))?;
        let mut it = db.raw_iterator_cf(cf);
        it.seek_for_prev(note_key(u64::MAX));
        let last = it.key().and_then(note_number);
        it.status().map_err(read_error(db))?;
        let first = last.map_or(1, |n| n + 1);
        Ok(NoteBook {
            first,
            next: first,
            live: BTreeMap::new(),
            ready: Vec::new(),
        })
    }

    pub(super) fn first(&self) -> u64 {
        self.first
    }

    pub(super) fn take(&mut self) -> u64 {
        let n = self.next;
        self.next += 1;
        self.live.insert(n, Instant::now());
        n
    }

    /// The ranges `[start, end)` of notes from `floor` on that may be deleted once the notes
    /// `settling` (sorted) are settled: up to the first unsettled note younger than `hold`, or
    /// to the next number, around older unsettled ones.
    pub(super) fn settled_ranges(
        &self,
        floor: u64,
        settling: &[u64],
        hold: Duration,
    ) -> Vec<(u64, u64)> {
        let mut ranges = Vec::new();
        let mut start = floor;
        for (&n, taken) in self.live.range(floor..) {
            if settling.binary_search(&n).is_ok() {
                continue;
            }
            if n > start {
                ranges.push((start, n));
            }
            if taken.elapsed() < hold {
                return ranges;
            }
            start = n + 1;
        }
        if self.next > start {
            ranges.push((start, self.next));
        }
        ranges
    }

    /// A note whose object is durable and recorded: the next group deletes it.
    pub(super) fn ready(&mut self, note: u64) {
        self.ready.push(note);
    }

    /// The ready notes, sorted, for a group to delete (and then [`NoteBook::settle`]).
    pub(super) fn take_ready(&mut self) -> Vec<u64> {
        let mut r = std::mem::take(&mut self.ready);
        r.sort_unstable();
        r
    }

    pub(super) fn has_ready(&self) -> bool {
        !self.ready.is_empty()
    }

    /// Ready notes a failed group did not delete.
    pub(super) fn put_back_ready(&mut self, notes: Vec<u64>) {
        self.ready.extend(notes);
    }

    pub(super) fn settle(&mut self, notes: &[u64]) {
        for n in notes {
            self.live.remove(n);
        }
    }

    /// The notes older than `age`.
    pub(super) fn older(&self, age: Duration) -> Vec<u64> {
        self.live
            .iter()
            .filter(|(_, t)| t.elapsed() >= age)
            .map(|(n, _)| *n)
            .collect()
    }
}

/// Rewrites the numbered notes `numbers` as named ones (those still there); returns how many.
pub(super) fn keep_named(db: &DB, numbers: &[u64]) -> Result<usize, LedgerError> {
    let cf = db
        .cf_handle(CF_PENDING)
        .ok_or_else(|| LedgerError::Corrupt("missing column family pending".into()))?;
    let mut batch = WriteBatch::default();
    let mut kept = 0;
    for &n in numbers {
        if let Some(v) = db.get_cf(cf, note_key(n)).map_err(read_error(db))? {
            if v.len() > 32 {
                batch.put_cf(cf, &v[32..], &v[..32]);
                kept += 1;
            }
            batch.delete_cf(cf, note_key(n));
        }
    }
    db.write(batch).map_err(LedgerError::Write)?;
    Ok(kept)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_end_at_notes_in_flight_and_step_around_old_ones() {
        let hold = Duration::from_secs(3600);
        let mut b = NoteBook {
            first: 5,
            next: 5,
            live: BTreeMap::new(),
            ready: Vec::new(),
        };
        assert!(b.settled_ranges(5, &[], hold).is_empty());
        let (a, c, d) = (b.take(), b.take(), b.take());
        assert_eq!((a, c, d), (5, 6, 7));
        assert!(b.settled_ranges(5, &[], hold).is_empty());
        // Settling 5 and 7 in one group: 6, in flight, holds the range back.
        assert_eq!(b.settled_ranges(5, &[5, 7], hold), [(5, 6)]);
        b.settle(&[5, 7]);
        assert_eq!(b.settled_ranges(6, &[6], hold), [(6, 8)]);
        // An old unsettled note is stepped around (held for zero seconds): 6 stays.
        assert_eq!(b.settled_ranges(5, &[], Duration::ZERO), [(5, 6), (7, 8)]);
        assert!(b.older(hold).is_empty());
        assert_eq!(b.older(Duration::ZERO), vec![6]);
        b.settle(&[6]);
        let e = b.take();
        assert_eq!(b.settled_ranges(8, &[], hold), []);
        assert_eq!(b.settled_ranges(8, &[e], hold), [(8, 9)]);
    }

    #[test]
    fn note_keys_sort_by_number_and_before_every_object_name() {
        assert!(note_key(1) < note_key(2));
        assert!(note_key(255) < note_key(256));
        assert!(note_key(u64::MAX)[..] < b"0"[..]);
        assert_eq!(note_number(&note_key(77)), Some(77));
        assert_eq!(note_number(b"abc"), None);
        assert_eq!(note_number(&[0, 1]), None);
    }
}
