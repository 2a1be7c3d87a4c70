//! The embedded default backend: pixel objects as files under one root directory.
//!
//! Durability follows the classic recipe (as Garage's block manager does): write to a temp file in
//! `root/tmp`, `fsync` it, `rename` it to its final name, `fsync` the directory. A crash leaves
//! either nothing or the whole object under its final name; stray temp files are removed at open.
//! Objects are sharded by the first two hex digits of their name (`root/ab/ab…`) to keep
//! directories small.
//!
//! The bytes go to the file from the blocking pool in quarter-megabyte steps, one write in
//! flight while the next step is gathered, into buffers that are reused (no copy through a
//! buffered writer and `tokio::fs`'s own buffer, no fresh pages per object); the last step, the
//! rename and (for a name that may exist already) the `fsync` make one trip to the pool, and
//! the syncs of [`FsPlaced::sync`] another.
//!
//! Two things keep those syncs short, since the C-STORE response waits for them:
//! - **writeback starts while the object is still arriving** (`sync_file_range`, Linux): by the
//!   time the last byte is written most of the object is already on its way to the disk, so the
//!   final `fsync` waits for the tail and the metadata only;
//! - **a fresh name is renamed before the `fsync`** ([`FsUpload::commit`] with `fresh`): on a
//!   journaling file system one journal commit then carries the file's allocation and its new
//!   directory entry, and the directory `fsync` that follows finds it already done (one commit
//!   instead of two; docs/PERFORMANCE.md). [`FsUpload::place`] stops there, with the object readable
//!   under its name, so that ingest can run the syncs ([`FsPlaced::sync`]) after the ledger's
//!   group commit, which then carries the object's metadata in its journal commit too; the
//!   C-STORE response waits for both. A crash before the syncs leaves a partial object under
//!   its final name, which its pending-object note sends to `reconcile` (see
//!   `ledger::unacked`). Only a name no other object can have may go first (a sealed object's
//!   name is made with a random salt): renaming over a durable object before the sync could
//!   leave a crash with neither, so a name that may exist already keeps the classic order.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use tokio::io::AsyncReadExt;

use super::error::StoreError;

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
    /// Staging buffers of finished uploads, for the next ones, so that an object does not fault
    /// in a fresh quarter-megabyte buffer.
    buffers: std::sync::Mutex<Vec<Vec<u8>>>,
}

/// Most staging buffers kept for reuse (two per upload in flight).
const KEPT_BUFFERS: usize = 16;

impl Inner {
    fn buffer(&self) -> Vec<u8> {
        self.buffers
            .lock()
            .ok()
            .and_then(|mut b| b.pop())
            .unwrap_or_else(|| Vec::with_capacity(STAGE_CAPACITY))
    }

    /// `buf` if it can serve as a staging buffer, else a kept or new one.
    fn reuse(&self, buf: Vec<u8>) -> Vec<u8> {
        if buf.capacity() >= STAGE_CAPACITY {
            buf
        } else {
            self.buffer()
        }
    }

    fn give_back(&self, mut buf: Vec<u8>) {
        // Too small to stage a step, or grown far past one (a very large PDU): not kept.
        if !(STAGE_CAPACITY..=4 * STAGE_CAPACITY).contains(&buf.capacity()) {
            return;
        }
        buf.clear();
        if let Ok(mut b) = self.buffers.lock() {
            if b.len() < KEPT_BUFFERS {
                b.push(buf);
            }
        }
    }
}

/// A staged object: a temp file being written.
///
/// Bytes are gathered in [`WRITE_STEP`]s and written from the blocking pool, one write in
/// flight while the next step is gathered; its buffer comes back for reuse. Two buffers per
/// upload: a fixed cost per association, like its PDU buffer, not counted in
/// `node.max_bytes_in_flight`.
pub struct FsUpload {
    store: FsStore,
    path: PathBuf,
    file: Arc<std::fs::File>,
    /// Bytes gathered for the next write.
    staged: Vec<u8>,
    /// The buffer of the last write, back for reuse.
    spare: Vec<u8>,
    /// The write in flight, which hands its buffer back with its result.
    inflight: Option<tokio::task::JoinHandle<(Vec<u8>, std::io::Result<()>)>>,
    /// Set once the temp file was renamed to its final name (nothing left to remove on drop).
    renamed: bool,
}

/// An object under its final name whose durability [`FsPlaced::sync`] completes.
pub struct FsPlaced {
    /// The object's file while its data is not synced yet.
    unsynced: Option<Arc<std::fs::File>>,
    dest: PathBuf,
    dir: PathBuf,
}

impl FsPlaced {
    /// Syncs the object's data (if [`FsUpload::place`] did not) and its directory entry, in
    /// one trip to the blocking pool.
    pub async fn sync(self) -> Result<(), StoreError> {
        let FsPlaced {
            unsynced,
            dest,
            dir,
        } = self;
        blocking(move || {
            if let Some(file) = unsynced {
                file.sync_all()
                    .map_err(io(format!("writing {}", dest.display())))?;
            }
            sync_dir_now(&dir)
        })
        .await
    }
}

/// Bytes gathered before they go to the file in one write.
const WRITE_STEP: usize = 256 * 1024;

/// A staging buffer's size: a step, and room for the piece that completes it (a PDU's bulk
/// bytes, or a sealed chunk) without growing.
const STAGE_CAPACITY: usize = WRITE_STEP + 128 * 1024;

/// Appends `buf` to the file; with `writeback`, then asks the kernel to start writing the
/// file's dirty pages out (Linux; `SYNC_FILE_RANGE_WRITE` waits for nothing but the request),
/// so that by the time the last byte is written most of the object is on its way to the disk
/// and the final `fsync` waits for the tail. Best effort: the `fsync` is what makes the object
/// durable and reports errors.
fn write_step(file: &std::fs::File, buf: &[u8], writeback: bool) -> std::io::Result<()> {
    use std::io::Write;
    let mut f = file;
    f.write_all(buf)?;
    #[cfg(target_os = "linux")]
    if writeback {
        use std::os::fd::AsRawFd;
        // SAFETY: the descriptor stays open while `file` is borrowed; offset 0 and length 0
        // mean the whole file.
        unsafe { libc::sync_file_range(file.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE) };
    }
    #[cfg(not(target_os = "linux"))]
    let _ = writeback;
    Ok(())
}

/// Runs file system calls on the blocking pool, as one trip.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| io("object store task")(std::io::Error::other(e)))?
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
                buffers: Default::default(),
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
                buffers: Default::default(),
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
        let at = path.clone();
        let file = blocking(move || {
            std::fs::File::create(&at).map_err(io(format!("creating {}", at.display())))
        })
        .await?;
        Ok(FsUpload {
            store: self.clone(),
            path,
            file: Arc::new(file),
            staged: self.inner.buffer(),
            spare: Vec::new(),
            inflight: None,
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
        self.store.inner.give_back(std::mem::take(&mut self.staged));
        self.store.inner.give_back(std::mem::take(&mut self.spare));
    }
}

impl FsUpload {
    /// Appends bytes to the object.
    pub async fn write(&mut self, data: &[u8]) -> Result<(), StoreError> {
        self.staged.extend_from_slice(data);
        self.step().await
    }

    /// The bytes not written yet, to append to in place (the sealer seals into it rather than
    /// into a buffer of its own); [`FsUpload::step`] then writes them.
    pub fn staged(&mut self) -> &mut Vec<u8> {
        &mut self.staged
    }

    /// Writes the staged bytes once a step's worth is gathered. The write runs in the
    /// background; the next one waits for it (one in flight: the file grows in order).
    pub async fn step(&mut self) -> Result<(), StoreError> {
        if self.staged.len() < WRITE_STEP {
            return Ok(());
        }
        self.settle().await?;
        let spare = self.store.inner.reuse(std::mem::take(&mut self.spare));
        let mut buf = std::mem::replace(&mut self.staged, spare);
        let file = self.file.clone();
        self.inflight = Some(tokio::task::spawn_blocking(move || {
            let r = write_step(&file, &buf, true);
            buf.clear();
            (buf, r)
        }));
        Ok(())
    }

    /// Waits for the write in flight, if any, and takes its buffer back.
    async fn settle(&mut self) -> Result<(), StoreError> {
        let Some(h) = self.inflight.take() else {
            return Ok(());
        };
        let what = format!("writing {}", self.path.display());
        let (buf, r) = h.await.map_err(|e| io(&what)(std::io::Error::other(e)))?;
        self.spare = buf;
        r.map_err(io(what))
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
    /// The last bytes, that sync and the rename make one trip to the blocking pool.
    pub async fn place(mut self, name: &str, fresh: bool) -> Result<FsPlaced, StoreError> {
        check_name(name)?;
        self.settle().await?;
        let dest = self.store.path_of(name);
        let dir = dest.parent().map(Path::to_path_buf).unwrap_or_default();
        let file = self.file.clone();
        let tail = std::mem::take(&mut self.staged);
        let (from, to, shard, root) = (
            self.path.clone(),
            dest.clone(),
            dir.clone(),
            self.store.inner.root.clone(),
        );
        let tail = blocking(move || {
            let what = || format!("writing {}", from.display());
            write_step(&file, &tail, fresh).map_err(io(what()))?;
            if !fresh {
                file.sync_all().map_err(io(what()))?;
            }
            rename_now(&from, &to, &shard, &root).map(|()| tail)
        })
        .await?;
        self.renamed = true;
        self.store.inner.give_back(tail);
        Ok(FsPlaced {
            // A fresh object's data is still to be synced, through the open descriptor.
            unsynced: fresh.then(|| self.file.clone()),
            dest,
            dir,
        })
    }

    pub async fn abort(self) {
        // Drop removes the temp file.
        drop(self);
    }
}

/// Renames a temp file to its final name, creating the shard directory if it went missing.
fn rename_now(from: &Path, dest: &Path, dir: &Path, root: &Path) -> Result<(), StoreError> {
    match std::fs::rename(from, dest) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(dir).map_err(io(format!("creating {}", dir.display())))?;
            sync_dir_now(root)?;
            std::fs::rename(from, dest).map_err(io(format!("renaming to {}", dest.display())))
        }
        Err(e) => Err(io(format!("renaming to {}", dest.display()))(e)),
    }
}

fn sync_dir_now(dir: &Path) -> Result<(), StoreError> {
    std::fs::File::open(dir)
        .map_err(io(format!("opening directory {}", dir.display())))?
        .sync_all()
        .map_err(io(format!("syncing directory {}", dir.display())))
}

async fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    let dir = dir.to_path_buf();
    blocking(move || sync_dir_now(&dir)).await
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
        let big: Vec<u8> = (0..3 * WRITE_STEP + 17).map(|i| (i % 251) as u8).collect();
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
