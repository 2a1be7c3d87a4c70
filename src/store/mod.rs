//! Object storage for the pixel half of every instance.
//!
//! The store only ever sees opaque names (hex digests derived from the instance key) and pixel bytes:
//! no patient data, no UIDs. Two backends share one interface:
//! - [`fs`]: the embedded default, a local directory (temp file → fsync → rename → fsync directory);
//! - [`s3`]: MinIO or any S3-compatible server, over HTTP(S), through the `minio` crate.
//!
//! Writes are staged: an [`Upload`] receives the bulk bytes as they arrive from the network and is
//! only made visible under its final name by [`Upload::commit`], because the name is derived from a
//! digest that is known only once the whole instance has been received.

pub mod fs;
pub mod s3;

use std::time::Duration;

use bytes::Bytes;

use crate::config::{StoreBackend, StoreConfig};

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
}

/// A cheap, cloneable handle on the configured backend.
#[derive(Clone, Debug)]
pub enum Store {
    Fs(fs::FsStore),
    S3(s3::S3Store),
}

/// A staged write of one object.
pub enum Upload {
    Fs(fs::FsUpload),
    S3(s3::S3Upload),
}

/// A streaming read of one object.
pub enum ObjectReader {
    Fs(fs::FsReader),
    S3(s3::S3Reader),
}

impl Store {
    /// Opens the backend named by the configuration, creating the directory or checking the bucket.
    pub async fn open(cfg: &StoreConfig) -> Result<Store, StoreError> {
        match cfg.backend {
            StoreBackend::Fs => Ok(Store::Fs(fs::FsStore::open(&cfg.fs.root).await?)),
            StoreBackend::S3 => Ok(Store::S3(s3::S3Store::open(&cfg.s3, cfg.timeout()).await?)),
        }
    }

    /// Opens the backend for reading only, beside a node that may be running (no cleanup).
    pub async fn open_read_only(cfg: &StoreConfig) -> Result<Store, StoreError> {
        match cfg.backend {
            StoreBackend::Fs => Ok(Store::Fs(fs::FsStore::open_read_only(&cfg.fs.root).await?)),
            StoreBackend::S3 => Ok(Store::S3(s3::S3Store::open(&cfg.s3, cfg.timeout()).await?)),
        }
    }

    /// Starts a staged upload.
    pub async fn begin(&self) -> Result<Upload, StoreError> {
        match self {
            Store::Fs(s) => Ok(Upload::Fs(s.begin().await?)),
            Store::S3(s) => Ok(Upload::S3(s.begin().await?)),
        }
    }

    /// Opens an object for a streaming read.
    pub async fn open_read(&self, name: &str) -> Result<ObjectReader, StoreError> {
        match self {
            Store::Fs(s) => Ok(ObjectReader::Fs(s.open_read(name).await?)),
            Store::S3(s) => Ok(ObjectReader::S3(s.open_read(name).await?)),
        }
    }

    /// Whether an object exists under this name.
    pub async fn exists(&self, name: &str) -> Result<bool, StoreError> {
        match self {
            Store::Fs(s) => s.exists(name).await,
            Store::S3(s) => s.exists(name).await,
        }
    }

    /// Names of every object in the store (for the audit's orphan scan).
    pub async fn list(&self) -> Result<Vec<String>, StoreError> {
        match self {
            Store::Fs(s) => s.list().await,
            Store::S3(s) => s.list().await,
        }
    }

    /// Deletes an object; deleting a missing object is not an error.
    pub async fn delete(&self, name: &str) -> Result<(), StoreError> {
        match self {
            Store::Fs(s) => s.delete(name).await,
            Store::S3(s) => s.delete(name).await,
        }
    }
}

impl Upload {
    /// Bytes of the object this upload holds in memory (not yet handed to the backend).
    pub fn buffered(&self) -> usize {
        match self {
            Upload::Fs(_) => 0,
            Upload::S3(u) => u.buffered(),
        }
    }

    /// Appends bytes to the staged object.
    pub async fn write(&mut self, data: &[u8]) -> Result<(), StoreError> {
        match self {
            Upload::Fs(u) => u.write(data).await,
            Upload::S3(u) => u.write(data).await,
        }
    }

    /// Makes the object durable and visible under `name`. Committing the same bytes under an
    /// existing name is allowed and leaves one object.
    pub async fn commit(self, name: &str) -> Result<(), StoreError> {
        match self {
            Upload::Fs(u) => u.commit(name).await,
            Upload::S3(u) => u.commit(name).await,
        }
    }

    /// Discards the staged bytes. Best effort: errors are logged, not returned.
    pub async fn abort(self) {
        match self {
            Upload::Fs(u) => u.abort().await,
            Upload::S3(u) => u.abort().await,
        }
    }
}

impl ObjectReader {
    /// The next chunk of the object, or `None` at the end.
    pub async fn next_chunk(&mut self) -> Result<Option<Bytes>, StoreError> {
        match self {
            ObjectReader::Fs(r) => r.next_chunk().await,
            ObjectReader::S3(r) => r.next_chunk().await,
        }
    }
}
