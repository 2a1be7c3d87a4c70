//! The ledger: a hash chain of [`Entry`]s in RocksDB, the metadata records they commit to, the
//! index that finds instances, and an RFC 9162 Merkle tree over the chain with signed
//! checkpoints. The byte layouts are in docs/LEDGER.md.
//!
//! Files, from the bottom up:
//! - pure codecs: [`entry`] (the chain's entries), [`merkle`] (tree arithmetic and proofs),
//!   [`checkpoint`] (signed notes), [`witness`] (the checkpoint file beside the ledger), `batch`
//!   (a write batch in key order);
//! - the database: `error` ([`LedgerError`]), `db` (column families and options), `damage` and
//!   [`scrub`] (damaged blocks), `index` (index keys and values), `tree` (the tree's storage),
//!   `notes` (pending-object note numbering);
//! - the write path: `request` (the jobs the committer runs and their payloads), `group` (one
//!   group commit being planned), `committer` (the single writer), `spool` (events left by other
//!   processes), `rollback` (holding the ledger to its checkpoints at open);
//! - the handle: `handle` ([`Ledger`] and how requests reach the committer), `open` (opening it),
//!   `read` (its read API);
//! - one file per kind of request, each with its planning and its reads: [`acl`], [`erase`],
//!   [`forward`], [`pending`], [`trail`], [`unacked`].

pub mod acl;
mod batch;
pub mod checkpoint;
mod committer;
mod damage;
mod db;
pub mod entry;
pub mod erase;
mod error;
pub mod forward;
mod group;
mod handle;
mod index;
pub mod merkle;
mod notes;
mod open;
pub mod pending;
mod read;
mod request;
mod rollback;
pub mod scrub;
mod spool;
#[cfg(test)]
mod test_support;
pub mod trail;
mod tree;
pub mod unacked;
pub mod witness;

pub use checkpoint::Checkpointing;
pub use db::{is_locked, MEMTABLE_BYTES, RECORD_COPIES_AFTER_STORE};
pub use entry::{Entry, Event, Reason, INTEGRITY_FAILURE_STATUS};
pub use error::LedgerError;
pub use forward::{ForwardOutcome, ForwardSummary, ForwardUpdate};
pub use handle::Ledger;
pub use index::{find_key, Step};
pub use pending::{NoteId, PendingObject};
pub use request::{RecordSummary, StoreOutcome, StoreRequest};
pub use rollback::RollbackAccepted;
pub use spool::SpooledEvent;
