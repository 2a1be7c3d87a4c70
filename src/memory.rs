//! The node's memory model: what each part holds per data set and for itself, so that
//! `node.max_bytes_in_flight` is divided at startup (the ledger's part, the rest shared by the
//! data sets being received) and checked when the configuration is loaded. Below everything that
//! charges or checks it; imports nothing.

/// Most bytes all column families' memtables hold together before writes wait for a flush. A
/// memtable keeps a copy of every record written until it is flushed, after its C-STORE has
/// ended: part of the ledger's share.
pub const MEMTABLE_BYTES: usize = 64 * 1024 * 1024;

/// Copies of the largest record the ledger may hold beyond what a C-STORE is charged for while it
/// runs: the last write that took the memtables past [`MEMTABLE_BYTES`], and a blob moved by a
/// compaction.
pub const RECORD_COPIES_AFTER_STORE: usize = 2;

/// Copies of a data set's metadata that exist at once on its way to the ledger, each charged to
/// the ingest budget from its first byte: the metadata buffer (then the encoded record that
/// replaces it), the ledger's write batch, and the memtable's copy made while that batch is
/// written. Charging them all up front means a data set never needs more once received, so
/// finishing one never waits on another. What the ledger keeps after the C-STORE (memtables,
/// blobs being moved) is its own share.
pub const COPIES: usize = 3;
