//! The embedded default backend: pixel objects as files under one root directory.
//!
//! Durability follows the classic recipe (as Garage's block manager does): write to a temp file in
//! `root/tmp`, `fsync` it, `rename` it to its final name, `fsync` the directory. A crash leaves
//! either nothing or the whole object under its final name; stray temp files are removed at open.
//! Objects are sharded by the first two hex digits of their name (`root/ab/ab…`) to keep
//! directories small.
//!
//! Two things keep those syncs short, since the C-STORE response waits for them:
//! - **writeback starts while the object is still arriving** (`sync_file_range`, Linux): by the
//!   time the last byte is written most of the object is already on its way to the disk, so the
//!   final `fsync` waits for the tail and the metadata only;
//! - **a fresh name is renamed before the `fsync`** ([`FsUpload::commit`] with `fresh`): on a
//!   journaling file system one journal commit then carries the file's allocation and its new
//!   directory entry, and the directory `fsync` that follows finds it already done (measured on
//!   ext4: one commit instead of two). [`FsUpload::place`] stops there, with the object readable
//!   under its name, so that ingest can run the syncs ([`FsPlaced::sync`]) and the ledger's
//!   group commit at the same time; the C-STORE response waits for both. A crash before the syncs
//!   leaves a partial object under its final name, which its pending-object note sends to
//!   `reconcile` (see `ledger::unacked`). Only a name no other object can have may go first: a
//!   sealed object's name is made with a random salt. A plaintext object's name is its instance
//!   key's, which a durable object from an earlier identical C-STORE may already have; renaming
//!   over that before the sync could leave a crash with neither, so such names keep the classic
//!   order.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::StoreError;

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> StoreError {
    let what = what.into();
    move |source| StoreError::Io { what, source }
}

/// Handle on a local object directory.
#[derive(Clone, Debug)]
pub struct FsStore {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    root: PathBuf,
    tmp: PathBuf,
    counter: AtomicU64,
}

/// A staged object: a temp file being written.
pub struct FsUpload {
    store: FsStore,
    path: PathBuf,
    file: tokio::io::BufWriter<tokio::fs::File>,
    /// Set once the temp file was renamed to its final name (nothing left to remove on drop).
    renamed: bool,
    writeback: Writeback,
}

/// An object under its final name whose durability [`FsPlaced::sync`] completes.
pub struct FsPlaced {
    /// The upload, renamed, while its data is not synced yet.
    unsynced: Option<FsUpload>,
    dest: PathBuf,
    dir: PathBuf,
}

impl FsPlaced {
    /// Syncs the object's data (if [`FsUpload::place`] did not) and its directory entry.
    pub async fn sync(self) -> Result<(), StoreError> {
        if let Some(u) = &self.unsynced {
            let what = format!("writing {}", self.dest.display());
            u.file.get_ref().sync_all().await.map_err(io(&what))?;
        }
        sync_dir(&self.dir).await
    }
}

/// Bytes written between two starts of writeback.
const WRITEBACK_STEP: usize = 256 * 1024;

/// Starts the kernel's writeback of a temp file as it grows, from the blocking pool, at most one
/// request in flight (each covers the whole file, so one skipped is caught up by the next).
struct Writeback {
    /// A duplicate of the file's descriptor: valid for as long as a request holds it, even if
    /// the upload is dropped meanwhile.
    #[cfg(target_os = "linux")]
    fd: Option<Arc<std::os::fd::OwnedFd>>,
    #[cfg(target_os = "linux")]
    inflight: Option<tokio::task::JoinHandle<()>>,
    since: usize,
}

impl Writeback {
    fn new(_file: &tokio::fs::File) -> Writeback {
        Writeback {
            // Without a duplicate descriptor the upload just goes without early writeback.
            #[cfg(target_os = "linux")]
            fd: std::os::fd::AsFd::as_fd(_file)
                .try_clone_to_owned()
                .ok()
                .map(Arc::new),
            #[cfg(target_os = "linux")]
            inflight: None,
            since: 0,
        }
    }

    /// Counts `n` more bytes written; every [`WRITEBACK_STEP`] asks the kernel to start writing
    /// the file's dirty pages out (`SYNC_FILE_RANGE_WRITE` waits for nothing but the request).
    /// Best effort: the final `fsync` is what makes the object durable and reports errors.
    fn wrote(&mut self, n: usize) {
        self.since += n;
        if self.since < WRITEBACK_STEP {
            return;
        }
        self.since = 0;
        #[cfg(target_os = "linux")]
        {
            if self.inflight.as_ref().is_some_and(|h| !h.is_finished()) {
                return;
            }
            let Some(fd) = self.fd.clone() else { return };
            self.inflight = Some(tokio::task::spawn_blocking(move || {
                use std::os::fd::AsRawFd;
                // SAFETY: the descriptor is owned by `fd`, alive for the whole call; offset 0 and
                // length 0 mean the whole file.
                unsafe { libc::sync_file_range(fd.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE) };
            }));
        }
    }
}

/// A streaming read of one object file.
pub struct FsReader {
    file: tokio::fs::File,
    buf_size: usize,
}

/// Accepts only the names this crate makes: lowercase hex, so a name can never escape the root.
fn check_name(name: &str) -> Result<(), StoreError> {
    if name.len() >= 4
        && name
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        Ok(())
    } else {
        Err(StoreError::Config(format!("invalid object name {name:?}")))
    }
}

impl FsStore {
    /// Opens (creating if needed) the object directory and clears leftover temp files of a crash.
    pub async fn open(root: &Path) -> Result<FsStore, StoreError> {
        let tmp = root.join("tmp");
        tokio::fs::create_dir_all(&tmp)
            .await
            .map_err(io(format!("creating {}", tmp.display())))?;
        let mut leftovers = tokio::fs::read_dir(&tmp)
            .await
            .map_err(io(format!("listing {}", tmp.display())))?;
        while let Some(entry) = leftovers
            .next_entry()
            .await
            .map_err(io(format!("listing {}", tmp.display())))?
        {
            let _ = tokio::fs::remove_file(entry.path()).await;
        }
        // All 256 shard directories exist, durably, before the first object is acknowledged:
        // a rename into a directory whose own entry is not yet synced could vanish in a crash.
        for shard in 0..=255u8 {
            let dir = root.join(format!("{shard:02x}"));
            tokio::fs::create_dir_all(&dir)
                .await
                .map_err(io(format!("creating {}", dir.display())))?;
        }
        sync_dir(root).await?;
        Ok(FsStore {
            inner: Arc::new(Inner {
                root: root.to_path_buf(),
                tmp,
                counter: AtomicU64::new(0),
            }),
        })
    }

    /// Opens an existing object directory for reading only: no directory is created and no temp
    /// file is touched, so it is safe beside a running node (for `export`).
    pub async fn open_read_only(root: &Path) -> Result<FsStore, StoreError> {
        let meta = tokio::fs::metadata(root)
            .await
            .map_err(io(format!("opening object directory {}", root.display())))?;
        if !meta.is_dir() {
            return Err(StoreError::Config(format!(
                "{} is not a directory",
                root.display()
            )));
        }
        Ok(FsStore {
            inner: Arc::new(Inner {
                root: root.to_path_buf(),
                tmp: root.join("tmp"),
                counter: AtomicU64::new(0),
            }),
        })
    }

    /// Names of every object (not staged uploads).
    pub async fn list(&self) -> Result<Vec<String>, StoreError> {
        let mut names = Vec::new();
        for shard in 0..=255u8 {
            let dir = self.inner.root.join(format!("{shard:02x}"));
            let mut rd = match tokio::fs::read_dir(&dir).await {
                Ok(rd) => rd,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io(format!("listing {}", dir.display()))(e)),
            };
            while let Some(e) = rd
                .next_entry()
                .await
                .map_err(io(format!("listing {}", dir.display())))?
            {
                names.push(e.file_name().to_string_lossy().into_owned());
            }
        }
        Ok(names)
    }

    /// Where an object of this name lives.
    pub fn path_of(&self, name: &str) -> PathBuf {
        self.inner.root.join(&name[..2]).join(name)
    }

    pub async fn begin(&self) -> Result<FsUpload, StoreError> {
        let n = self.inner.counter.fetch_add(1, Ordering::Relaxed);
        let path = self
            .inner
            .tmp
            .join(format!("{}-{n}.part", std::process::id()));
        let file = tokio::fs::File::create(&path)
            .await
            .map_err(io(format!("creating {}", path.display())))?;
        Ok(FsUpload {
            store: self.clone(),
            path,
            writeback: Writeback::new(&file),
            file: tokio::io::BufWriter::with_capacity(256 * 1024, file),
            renamed: false,
        })
    }

    pub async fn open_read(&self, name: &str) -> Result<FsReader, StoreError> {
        check_name(name)?;
        let path = self.path_of(name);
        match tokio::fs::File::open(&path).await {
            Ok(file) => Ok(FsReader {
                file,
                buf_size: 1024 * 1024,
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Err(StoreError::NotFound { name: name.into() })
            }
            Err(e) => Err(io(format!("opening {}", path.display()))(e)),
        }
    }

    pub async fn exists(&self, name: &str) -> Result<bool, StoreError> {
        check_name(name)?;
        tokio::fs::try_exists(self.path_of(name))
            .await
            .map_err(io(format!("checking {name}")))
    }

    pub async fn delete(&self, name: &str) -> Result<(), StoreError> {
        check_name(name)?;
        match tokio::fs::remove_file(self.path_of(name)).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io(format!("deleting {name}"))(e)),
        }
    }
}

impl Drop for FsUpload {
    /// An upload dropped without `commit` or `abort` (a cancelled C-STORE, a timeout, a drained
    /// association) takes its temp file with it.
    fn drop(&mut self) {
        if !self.renamed {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

impl FsUpload {
    pub async fn write(&mut self, data: &[u8]) -> Result<(), StoreError> {
        self.file
            .write_all(data)
            .await
            .map_err(io(format!("writing {}", self.path.display())))?;
        self.writeback.wrote(data.len());
        Ok(())
    }

    /// Makes the object durable under `name`: its data, its directory entry, and then returns.
    /// `fresh` says that no other object can have this name (see the module's notes): it is
    /// renamed into place before the file is synced, so one journal commit carries both.
    pub async fn commit(self, name: &str, fresh: bool) -> Result<(), StoreError> {
        self.place(name, fresh).await?.sync().await
    }

    /// Puts the object under `name`. With `fresh` it is visible there at once and durable only
    /// after [`FsPlaced::sync`] (so the caller can do other work meanwhile); otherwise it is
    /// synced first, the classic order, and `sync` has nothing left to do but the directory.
    pub async fn place(mut self, name: &str, fresh: bool) -> Result<FsPlaced, StoreError> {
        check_name(name)?;
        let what = format!("writing {}", self.path.display());
        self.file.flush().await.map_err(io(&what))?;
        let dest = self.store.path_of(name);
        let dir = dest.parent().map(Path::to_path_buf).unwrap_or_default();
        if !fresh {
            self.file.get_ref().sync_all().await.map_err(io(&what))?;
        }
        self.rename_to(&dest, &dir).await?;
        Ok(FsPlaced {
            // A fresh object's data is still to be synced, through the open descriptor.
            unsynced: fresh.then_some(self),
            dest,
            dir,
        })
    }

    async fn rename_to(&mut self, dest: &Path, dir: &Path) -> Result<(), StoreError> {
        if let Err(e) = tokio::fs::rename(&self.path, dest).await {
            if e.kind() != std::io::ErrorKind::NotFound {
                return Err(io(format!("renaming to {}", dest.display()))(e));
            }
            // The shard directory does not exist yet.
            tokio::fs::create_dir_all(dir)
                .await
                .map_err(io(format!("creating {}", dir.display())))?;
            sync_dir(&self.store.inner.root).await?;
            tokio::fs::rename(&self.path, dest)
                .await
                .map_err(io(format!("renaming to {}", dest.display())))?;
        }
        self.renamed = true;
        Ok(())
    }

    pub async fn abort(self) {
        // Drop removes the temp file.
        drop(self);
    }
}

async fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    let d = tokio::fs::File::open(dir)
        .await
        .map_err(io(format!("opening directory {}", dir.display())))?;
    d.sync_all()
        .await
        .map_err(io(format!("syncing directory {}", dir.display())))
}

impl FsReader {
    pub async fn next_chunk(&mut self) -> Result<Option<Bytes>, StoreError> {
        let mut buf = vec![0u8; self.buf_size];
        let mut filled = 0;
        // Fill the buffer as far as the file allows so callers see few, large chunks.
        while filled < buf.len() {
            let n = self
                .file
                .read(&mut buf[filled..])
                .await
                .map_err(io("reading object"))?;
            if n == 0 {
                break;
            }
            filled += n;
        }
        if filled == 0 {
            return Ok(None);
        }
        buf.truncate(filled);
        Ok(Some(Bytes::from(buf)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn read_all(store: &FsStore, name: &str) -> Vec<u8> {
        let mut r = store.open_read(name).await.unwrap();
        let mut out = Vec::new();
        while let Some(c) = r.next_chunk().await.unwrap() {
            out.extend_from_slice(&c);
        }
        out
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn staged_write_becomes_visible_only_at_commit() {
        let dir = tempfile::tempdir().unwrap();
        let store = FsStore::open(dir.path()).await.unwrap();
        let name = "ab".repeat(32);
        let mut up = store.begin().await.unwrap();
        up.write(b"hello ").await.unwrap();
        up.write(b"world").await.unwrap();
        assert!(!store.exists(&name).await.unwrap());
        up.commit(&name, false).await.unwrap();
        assert_eq!(read_all(&store, &name).await, b"hello world");
        // The same bytes again under the same name: still one object.
        let mut up = store.begin().await.unwrap();
        up.write(b"hello world").await.unwrap();
        up.commit(&name, false).await.unwrap();
        // A fresh name goes into place before its sync; large enough to start writeback on
        // the way.
        let big: Vec<u8> = (0..3 * WRITEBACK_STEP + 17)
            .map(|i| (i % 251) as u8)
            .collect();
        let fresh = "cd".repeat(32);
        let mut up = store.begin().await.unwrap();
        for piece in big.chunks(64 * 1024 + 3) {
            up.write(piece).await.unwrap();
        }
        assert!(!store.exists(&fresh).await.unwrap());
        up.commit(&fresh, true).await.unwrap();
        assert_eq!(read_all(&store, &fresh).await, big);
        assert_eq!(read_all(&store, &name).await, b"hello world");
        assert_eq!(read_all(&store, &name).await, b"hello world");
        assert_eq!(
            std::fs::read_dir(dir.path().join("tmp")).unwrap().count(),
            0
        );
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn abort_and_restart_leave_no_temp_files() {
        let dir = tempfile::tempdir().unwrap();
        let store = FsStore::open(dir.path()).await.unwrap();
        let mut up = store.begin().await.unwrap();
        up.write(b"x").await.unwrap();
        up.abort().await;
        let mut up = store.begin().await.unwrap();
        up.write(b"y").await.unwrap();
        drop(up); // a cancelled C-STORE
        assert_eq!(
            std::fs::read_dir(dir.path().join("tmp")).unwrap().count(),
            0
        );
        // A crash mid-write leaves a temp file; the next open clears it.
        std::fs::write(dir.path().join("tmp/1-1.part"), b"z").unwrap();
        let _ = FsStore::open(dir.path()).await.unwrap();
        assert_eq!(
            std::fs::read_dir(dir.path().join("tmp")).unwrap().count(),
            0
        );
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn missing_and_invalid_names() {
        let dir = tempfile::tempdir().unwrap();
        let store = FsStore::open(dir.path()).await.unwrap();
        assert!(matches!(
            store.open_read(&"cd".repeat(32)).await,
            Err(StoreError::NotFound { .. })
        ));
        assert!(store.open_read("../../etc/passwd").await.is_err());
        store.delete(&"cd".repeat(32)).await.unwrap();
    }
}
