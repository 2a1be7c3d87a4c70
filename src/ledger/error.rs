//! [`LedgerError`]: every way a ledger operation fails, with the path or entry it concerns.

use std::path::PathBuf;

use super::witness;

/// Ledger failures. Writes that fail leave the ledger as it was.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("cannot open ledger at {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: rocksdb::Error,
    },
    /// RocksDB found damaged bytes while opening (its write-ahead log is recovered with
    /// absolute consistency: a damaged record stops the open instead of cutting the log there).
    #[error(
        "the ledger at {path} is damaged and was not opened, so nothing in it was dropped or \
         deleted ({source}). Keep a copy of the directory; then restore the ledger from a backup, \
         or accept the loss of everything after the damage with `dicomchain ledger \
         accept-rollback` (see docs/LEDGER.md)"
    )]
    Damaged {
        path: PathBuf,
        #[source]
        source: rocksdb::Error,
    },
    /// The ledger is shorter than, or differs from, the checkpoint last signed (kept in the
    /// checkpoint file beside it, see [`witness`]).
    #[error(
        "the ledger at {path} does not hold the checkpoint signed last (recorded in {file}): \
         {what}. The node refuses to run on it (it would sign a fork of its own log and could \
         delete acknowledged objects). Keep copies of both; restore the ledger from a backup that \
         holds that checkpoint, or accept the loss with `dicomchain ledger accept-rollback` (see \
         docs/LEDGER.md)"
    )]
    RolledBack {
        path: PathBuf,
        file: PathBuf,
        what: String,
    },
    #[error("cannot create a scratch directory for a read-only view of the ledger: {0}")]
    Scratch(#[source] std::io::Error),
    #[error("{0}")]
    Witness(#[from] witness::WitnessError),
    #[error("ledger write failed: {0}")]
    Write(#[source] rocksdb::Error),
    #[error("ledger read failed: {0}")]
    Read(#[source] rocksdb::Error),
    #[error("ledger is corrupt: {0}")]
    Corrupt(String),
    #[error("ledger is closed")]
    Closed,
    #[error("ledger did not answer within {0:?}")]
    Timeout(std::time::Duration),
    #[error("ledger is open read-only")]
    ReadOnly,
    #[error("{0}")]
    NotFound(String),
    /// A request the ledger refuses as it stands (bad input, not a failure of the ledger).
    #[error("{0}")]
    Invalid(String),
}
