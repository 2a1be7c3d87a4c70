//! Object storage for the pixel half of every instance.
//!
//! The store only ever sees opaque names and sealed pixel bytes: no patient data, no UIDs, no
//! plaintext (see [`sealed`]: AES-256-GCM in chunks, a data key and a keyed name per object, the
//! key records kept on the ledger). Two backends share one interface:
//! - [`fs`]: the embedded default, a local directory (temp file → fsync → rename → fsync directory);
//! - [`s3`]: MinIO or any S3-compatible server, over HTTP(S), through the `minio` crate.
//!
//! Writes are staged: an [`Upload`] receives the bulk bytes as they arrive from the network and is
//! only made visible under its final name by [`Upload::commit`], because the name is derived from a
//! digest that is known only once the whole instance has been received.

pub mod coder;
pub mod fs;
pub mod s3;
pub mod sealed;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use crate::config::{StoreBackend, StoreConfig};
use crate::instance::Digest32;
pub use sealed::{MasterKey, ObjectKey};

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
    Damaged {
        name: String,
        reason: sealed::SealError,
    },
    #[error("object {name} is encrypted and no master key is loaded ({hint})")]
    NoMasterKey { name: String, hint: String },
}

/// A cheap, cloneable handle on the configured backend, with the master key that seals new
/// objects and opens sealed ones.
#[derive(Clone, Debug)]
pub struct Store {
    backend: Backend,
    master: Option<Arc<MasterKey>>,
}

#[derive(Clone, Debug)]
enum Backend {
    Fs(fs::FsStore),
    S3(s3::S3Store),
}

/// A staged write of one object.
pub struct Upload {
    inner: UploadBackend,
    /// The key record that goes on the ledger, and the master key that names the object (none:
    /// a plaintext object).
    sealing: Option<(ObjectKey, Arc<MasterKey>)>,
    /// Hashing and sealing, for the S3 backend (the fs backend runs its own on its writer).
    coder: Option<coder::Coder>,
    /// Sealed bytes on their way to the S3 backend.
    out: Vec<u8>,
    /// The plaintext's length and SHA-256, once [`Upload::finish`] ran.
    digest: Option<(u64, Digest32)>,
}

enum UploadBackend {
    Fs(fs::FsUpload),
    S3(s3::S3Upload),
}

/// An object under its final name, readable, whose durability [`Placed::sync`] completes.
pub enum Placed {
    Fs(Box<fs::FsPlaced>),
    /// Durable already (an S3 upload is once the server acknowledged it).
    Durable,
}

impl Placed {
    /// Returns once the object is durable.
    pub async fn sync(self) -> Result<(), StoreError> {
        match self {
            Placed::Fs(p) => p.sync().await,
            Placed::Durable => Ok(()),
        }
    }
}

/// A streaming read of one object (decrypted when it is sealed).
pub struct ObjectReader {
    inner: ReaderBackend,
    opener: Option<sealed::Opener>,
    name: String,
    done: bool,
}

enum ReaderBackend {
    Fs(fs::FsReader),
    S3(s3::S3Reader),
}

impl Store {
    /// Opens the backend named by the configuration, creating the directory or checking the bucket.
    pub async fn open(cfg: &StoreConfig) -> Result<Store, StoreError> {
        Ok(Store::on(match cfg.backend {
            StoreBackend::Fs => Backend::Fs(fs::FsStore::open(&cfg.fs.root).await?),
            StoreBackend::S3 => Backend::S3(s3::S3Store::open(&cfg.s3, cfg.timeout()).await?),
        }))
    }

    /// Opens the backend for reading only, beside a node that may be running (no cleanup).
    pub async fn open_read_only(cfg: &StoreConfig) -> Result<Store, StoreError> {
        Ok(Store::on(match cfg.backend {
            StoreBackend::Fs => Backend::Fs(fs::FsStore::open_read_only(&cfg.fs.root).await?),
            StoreBackend::S3 => Backend::S3(s3::S3Store::open(&cfg.s3, cfg.timeout()).await?),
        }))
    }

    /// A local directory store (tests and tools).
    pub fn from_fs(store: fs::FsStore) -> Store {
        Store::on(Backend::Fs(store))
    }

    /// A backend without a master key (see [`Store::with_master_key`]).
    fn on(backend: Backend) -> Store {
        Store {
            backend,
            master: None,
        }
    }

    /// Seals every new object under this master key and opens sealed ones with it. Without a
    /// master key new objects are plaintext (format 1) and sealed ones cannot be read.
    pub fn with_master_key(mut self, master: Option<Arc<MasterKey>>) -> Store {
        self.master = master;
        self
    }

    /// Starts a staged upload (sealed when a master key is set).
    pub async fn begin(&self) -> Result<Upload, StoreError> {
        let (sealing, sealer) = match &self.master {
            Some(master) => {
                let (key, sealer) = master.sealer();
                (Some((key, master.clone())), Some(sealer))
            }
            None => (None, None),
        };
        let header = sealer.as_ref().map(sealed::Sealer::header);
        let header: &[u8] = header.as_ref().map_or(&[], |h| &h[..]);
        let coder = coder::Coder::new(sealer);
        let (inner, coder) = match &self.backend {
            Backend::Fs(s) => (UploadBackend::Fs(s.begin(coder, header).await?), None),
            Backend::S3(s) => {
                let mut u = s.begin().await?;
                if !header.is_empty() {
                    u.write(header).await?;
                }
                (UploadBackend::S3(u), Some(coder))
            }
        };
        Ok(Upload {
            inner,
            sealing,
            coder,
            out: Vec::new(),
            digest: None,
        })
    }

    /// Opens an object for a streaming read; `key` is its key record from the ledger (none for
    /// a plaintext object written before sealing).
    pub async fn open_read(
        &self,
        name: &str,
        key: Option<&ObjectKey>,
    ) -> Result<ObjectReader, StoreError> {
        let opener = match (key, &self.master) {
            (None, _) => None,
            (Some(k), Some(m)) => Some(m.opener(k)),
            (Some(_), None) => {
                return Err(StoreError::NoMasterKey {
                    name: name.into(),
                    hint: "set security.master_key_file to the node's key file".into(),
                })
            }
        };
        let inner = match &self.backend {
            Backend::Fs(s) => ReaderBackend::Fs(s.open_read(name).await?),
            Backend::S3(s) => ReaderBackend::S3(s.open_read(name).await?),
        };
        Ok(ObjectReader {
            inner,
            opener,
            name: name.into(),
            done: false,
        })
    }

    /// The length and SHA-256 of an object's content (decrypted when it is sealed).
    pub async fn digest(
        &self,
        name: &str,
        key: Option<&ObjectKey>,
    ) -> Result<(u64, Digest32), StoreError> {
        use sha2::Digest as _;
        let mut r = self.open_read(name, key).await?;
        let mut h = sha2::Sha256::new();
        let mut len = 0u64;
        while let Some(chunk) = r.next_chunk().await? {
            len += chunk.len() as u64;
            h.update(&chunk);
        }
        Ok((len, h.finalize().into()))
    }

    /// Whether an object exists under this name.
    pub async fn exists(&self, name: &str) -> Result<bool, StoreError> {
        match &self.backend {
            Backend::Fs(s) => s.exists(name).await,
            Backend::S3(s) => s.exists(name).await,
        }
    }

    /// Names of every object in the store (for the audit's orphan scan).
    pub async fn list(&self) -> Result<Vec<String>, StoreError> {
        match &self.backend {
            Backend::Fs(s) => s.list().await,
            Backend::S3(s) => s.list().await,
        }
    }

    /// Deletes an object; deleting a missing object is not an error.
    pub async fn delete(&self, name: &str) -> Result<(), StoreError> {
        match &self.backend {
            Backend::Fs(s) => s.delete(name).await,
            Backend::S3(s) => s.delete(name).await,
        }
    }
}

impl Upload {
    /// Bytes of the object this upload holds in memory (not yet handed to the backend; the fs
    /// backend's staging buffers are a fixed cost per upload, see [`fs::FsUpload`]).
    pub fn buffered(&self) -> usize {
        let backend = match &self.inner {
            UploadBackend::Fs(_) => 0,
            UploadBackend::S3(u) => u.buffered(),
        };
        backend + self.coder.as_ref().map_or(0, coder::Coder::buffered) + self.out.capacity()
    }

    /// Appends plaintext bytes to the staged object.
    pub async fn write(&mut self, data: &[u8]) -> Result<(), StoreError> {
        if self.digest.is_some() {
            return Err(StoreError::Config(
                "write after the upload was finished".into(),
            ));
        }
        match &mut self.inner {
            UploadBackend::Fs(u) => u.write(data).await,
            UploadBackend::S3(u) => {
                let Some(coder) = self.coder.as_mut() else {
                    return Err(StoreError::Config(
                        "the object's upload failed before".into(),
                    ));
                };
                coder.push(data, &mut self.out);
                if !coder.seals() {
                    return u.write(data).await;
                }
                let r = if self.out.is_empty() {
                    Ok(())
                } else {
                    u.write(&self.out).await
                };
                self.out.clear();
                r
            }
        }
    }

    /// Ends the plaintext: seals its last chunk and returns its length and SHA-256 (what the
    /// ledger records as the pixel data's). [`Upload::place`] calls it if the caller did not.
    pub async fn finish(&mut self) -> Result<(u64, Digest32), StoreError> {
        if let Some(d) = self.digest {
            return Ok(d);
        }
        let d = match &mut self.inner {
            UploadBackend::Fs(u) => u.finish().await?,
            UploadBackend::S3(u) => {
                let Some(coder) = self.coder.take() else {
                    return Err(StoreError::Config(
                        "the object's upload failed before".into(),
                    ));
                };
                let d = coder.finish(&mut self.out);
                if !self.out.is_empty() {
                    u.write(&self.out).await?;
                }
                self.out = Vec::new();
                d
            }
        };
        self.digest = Some(d);
        Ok(d)
    }

    /// The name this object will have as the pixel data of `instance_key`, and its key record
    /// for the ledger (none for a plaintext object).
    pub fn name_for(&self, instance_key: &Digest32) -> (String, Option<ObjectKey>) {
        match &self.sealing {
            Some((key, master)) => (master.object_name(instance_key, key), Some(key.clone())),
            None => (crate::instance::object_name(instance_key), None),
        }
    }

    /// Makes the object durable and visible under `name`. Committing the same bytes under an
    /// existing name is allowed and leaves one object.
    pub async fn commit(self, name: &str) -> Result<(), StoreError> {
        self.place(name).await?.sync().await
    }

    /// Makes the object visible under `name`; it is durable once [`Placed::sync`] returns, which
    /// the caller may overlap with other work. Only a name no other object can have (a sealed
    /// object's, salted at random) is placed before it is synced: an earlier object under the
    /// same plaintext name stays durable until the new one is.
    pub async fn place(mut self, name: &str) -> Result<Placed, StoreError> {
        let fresh = self.sealing.is_some();
        self.finish().await?;
        match self.inner {
            UploadBackend::Fs(u) => u.place(name, fresh).await.map(|p| Placed::Fs(Box::new(p))),
            UploadBackend::S3(u) => u.commit(name).await.map(|()| Placed::Durable),
        }
    }

    /// Discards the staged bytes. Best effort: errors are logged, not returned.
    pub async fn abort(self) {
        match self.inner {
            UploadBackend::Fs(u) => u.abort().await,
            UploadBackend::S3(u) => u.abort().await,
        }
    }
}

impl ObjectReader {
    async fn inner_next(&mut self) -> Result<Option<Bytes>, StoreError> {
        match &mut self.inner {
            ReaderBackend::Fs(r) => r.next_chunk().await,
            ReaderBackend::S3(r) => r.next_chunk().await,
        }
    }

    /// The next chunk of the object (plaintext), or `None` at the end. A sealed object that
    /// fails authentication gives [`StoreError::Damaged`].
    pub async fn next_chunk(&mut self) -> Result<Option<Bytes>, StoreError> {
        loop {
            if self.opener.is_none() {
                // Plaintext, or a sealed object already read to its end.
                return if self.done {
                    Ok(None)
                } else {
                    self.inner_next().await
                };
            }
            let next = self.inner_next().await?;
            let damaged = |reason| StoreError::Damaged {
                name: self.name.clone(),
                reason,
            };
            match next {
                Some(sealed) => {
                    let opener = self.opener.as_mut().expect("checked above");
                    let plain = opener.push(&sealed).map_err(damaged)?;
                    if !plain.is_empty() {
                        return Ok(Some(plain.into()));
                    }
                }
                None => {
                    let opener = self.opener.take().expect("checked above");
                    self.done = true;
                    let plain = opener.finish().map_err(damaged)?;
                    return Ok((!plain.is_empty()).then(|| plain.into()));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sealed object, hashed and sealed by the fs writer step by step from pieces of every
    /// size, reads back as its plaintext, and the upload's digest is the plaintext's; an upload
    /// dropped halfway leaves nothing, and the next one (on reused buffers) is whole too.
    #[tokio::test(flavor = "multi_thread")]
    async fn sealed_objects_read_back_whole_across_write_steps() {
        use sha2::Digest as _;
        let dir = tempfile::tempdir().unwrap();
        let store = Store::from_fs(fs::FsStore::open(dir.path()).await.unwrap())
            .with_master_key(Some(Arc::new(MasterKey::from_bytes([7; 32]))));
        let plain: Vec<u8> = (0..1_300_000u32).map(|i| (i * 31 % 251) as u8).collect();
        let mut dropped = store.begin().await.unwrap();
        dropped.write(&plain[..700_000]).await.unwrap();
        drop(dropped);
        for (round, sizes) in [[1usize, 65_536, 16_384], [300_000, 7, 65_537]]
            .iter()
            .enumerate()
        {
            let mut up = store.begin().await.unwrap();
            let (mut at, mut i) = (0, 0);
            while at < plain.len() {
                let n = sizes[i % sizes.len()].min(plain.len() - at);
                up.write(&plain[at..at + n]).await.unwrap();
                at += n;
                i += 1;
            }
            let whole = (
                plain.len() as u64,
                <[u8; 32]>::from(sha2::Sha256::digest(&plain)),
            );
            // The digest the ledger records comes from the upload's own hashing.
            assert_eq!(up.finish().await.unwrap(), whole);
            assert!(up.write(b"more").await.is_err());
            let (name, key) = up.name_for(&[round as u8; 32]);
            up.commit(&name).await.unwrap();
            assert_eq!(store.digest(&name, key.as_ref()).await.unwrap(), whole);
        }
        assert_eq!(
            std::fs::read_dir(dir.path().join("tmp")).unwrap().count(),
            0
        );
    }
}
