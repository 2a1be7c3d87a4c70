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

mod error;
pub mod fs;
pub mod s3;
pub mod sealed;

use std::sync::Arc;

use bytes::Bytes;

use crate::config::{StoreBackend, StoreConfig};
use crate::instance::{Digest32, ObjectKey};
pub use error::StoreError;
pub use sealed::MasterKey;

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

/// A staged write of one object, sealed as it is written.
pub struct Upload {
    inner: UploadBackend,
    sealer: sealed::Sealer,
    /// The key record that goes on the ledger.
    key: ObjectKey,
    master: Arc<MasterKey>,
    out: Vec<u8>,
}

enum UploadBackend {
    Fs(fs::FsUpload),
    S3(s3::upload::S3Upload),
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

/// A streaming read of one object, opened as it is read.
pub struct ObjectReader {
    inner: ReaderBackend,
    /// `None` once the object was read to its end.
    opener: Option<sealed::Opener>,
    name: String,
}

enum ReaderBackend {
    Fs(fs::FsReader),
    S3(s3::reader::S3Reader),
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

    /// Seals every new object under this master key and opens objects with it. Without a master
    /// key objects can be listed and deleted, but neither written nor read.
    pub fn with_master_key(mut self, master: Option<Arc<MasterKey>>) -> Store {
        self.master = master;
        self
    }

    /// Starts a staged upload, sealed under the master key.
    pub async fn begin(&self) -> Result<Upload, StoreError> {
        let master = self.master.clone().ok_or(StoreError::NoMasterKeyToSeal)?;
        let inner = match &self.backend {
            Backend::Fs(s) => UploadBackend::Fs(s.begin().await?),
            Backend::S3(s) => UploadBackend::S3(s.begin().await?),
        };
        let (key, sealer) = master.sealer();
        let header = sealer.header();
        let mut upload = Upload {
            inner,
            sealer,
            key,
            master,
            out: Vec::new(),
        };
        upload.inner_write(&header).await?;
        Ok(upload)
    }

    /// Opens an object for a streaming read; `key` is its key record from the ledger.
    pub async fn open_read(&self, name: &str, key: &ObjectKey) -> Result<ObjectReader, StoreError> {
        let Some(master) = &self.master else {
            return Err(StoreError::NoMasterKey {
                name: name.into(),
                hint: "set security.master_key_file to the node's key file".into(),
            });
        };
        let opener = Some(master.opener(key));
        let inner = match &self.backend {
            Backend::Fs(s) => ReaderBackend::Fs(s.open_read(name).await?),
            Backend::S3(s) => ReaderBackend::S3(s.open_read(name).await?),
        };
        Ok(ObjectReader {
            inner,
            opener,
            name: name.into(),
        })
    }

    /// The length and SHA-256 of an object's content (decrypted).
    pub async fn digest(&self, name: &str, key: &ObjectKey) -> Result<(u64, Digest32), StoreError> {
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
    /// Bytes of the object this upload holds in memory (not yet handed to the backend).
    pub fn buffered(&self) -> usize {
        let backend = match &self.inner {
            UploadBackend::Fs(_) => 0,
            UploadBackend::S3(u) => u.buffered(),
        };
        backend + self.sealer.buffered() + self.out.capacity()
    }

    async fn inner_write(&mut self, data: &[u8]) -> Result<(), StoreError> {
        match &mut self.inner {
            UploadBackend::Fs(u) => u.write(data).await,
            UploadBackend::S3(u) => u.write(data).await,
        }
    }

    /// Appends bytes to the staged object.
    pub async fn write(&mut self, data: &[u8]) -> Result<(), StoreError> {
        match &mut self.inner {
            // Sealed straight into the file's staging buffer: no copy in between.
            UploadBackend::Fs(u) => {
                self.sealer.push(data, u.staged());
                u.step().await
            }
            UploadBackend::S3(_) => {
                let mut out = std::mem::take(&mut self.out);
                self.sealer.push(data, &mut out);
                let r = if out.is_empty() {
                    Ok(())
                } else {
                    self.inner_write(&out).await
                };
                out.clear();
                self.out = out;
                r
            }
        }
    }

    /// The name this object will have as the pixel data of `instance_key`, and its key record
    /// for the ledger.
    pub fn name_for(&self, instance_key: &Digest32) -> (String, ObjectKey) {
        (
            self.master.object_name(instance_key, &self.key),
            self.key.clone(),
        )
    }

    /// Makes the object durable and visible under `name`. Committing the same bytes under an
    /// existing name is allowed and leaves one object.
    pub async fn commit(self, name: &str) -> Result<(), StoreError> {
        self.place(name).await?.sync().await
    }

    /// Makes the object visible under `name`; it is durable once [`Placed::sync`] returns, which
    /// the caller may overlap with other work. The name, salted at random, is no other object's,
    /// so it is placed before it is synced.
    pub async fn place(self, name: &str) -> Result<Placed, StoreError> {
        let Upload {
            mut inner,
            sealer,
            mut out,
            ..
        } = self;
        match &mut inner {
            UploadBackend::Fs(u) => sealer.finish(u.staged()),
            UploadBackend::S3(u) => {
                sealer.finish(&mut out);
                u.write(&out).await?;
            }
        }
        match inner {
            UploadBackend::Fs(u) => u.place(name, true).await.map(|p| Placed::Fs(Box::new(p))),
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

    /// The next chunk of the object (decrypted), or `None` at the end. An object that fails
    /// authentication gives [`StoreError::Damaged`].
    pub async fn next_chunk(&mut self) -> Result<Option<Bytes>, StoreError> {
        loop {
            if self.opener.is_none() {
                return Ok(None);
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

    /// A sealed object written straight into the file's staging buffers, in pieces of every
    /// size across many write steps, reads back as its plaintext and digests to it; an upload
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
            let (name, key) = up.name_for(&[round as u8; 32]);
            up.commit(&name).await.unwrap();
            let (len, sha) = store.digest(&name, &key).await.unwrap();
            assert_eq!(len, plain.len() as u64);
            assert_eq!(sha, <[u8; 32]>::from(sha2::Sha256::digest(&plain)));
        }
        assert_eq!(
            std::fs::read_dir(dir.path().join("tmp")).unwrap().count(),
            0
        );
    }
}
