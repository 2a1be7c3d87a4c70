//! What can go wrong in the object store: every error names the object (by its opaque name) or
//! the operation, and what failed.

use std::time::Duration;

use super::sealed::SealError;

/// Errors of the object store. Every variant says which object (by opaque name) and what failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("object store I/O error on {what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("S3 error on {what}: {message}")]
    S3 { what: String, message: String },
    #[error("object {name} not found")]
    NotFound { name: String },
    #[error("object store operation {what} timed out after {after:?}")]
    Timeout { what: String, after: Duration },
    #[error("invalid object store configuration: {0}")]
    Config(String),
    /// The object's bytes are not what was sealed: altered, truncated, or another key.
    #[error("object {name} is damaged: {reason}")]
    Damaged { name: String, reason: SealError },
    #[error("object {name} is encrypted and no master key is loaded ({hint})")]
    NoMasterKey { name: String, hint: String },
    /// Every object is written sealed: a store without a master key can only list and delete.
    #[error("no master key is loaded, and objects are only ever written sealed")]
    NoMasterKeyToSeal,
}
