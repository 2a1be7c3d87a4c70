//! `dicomchain import PATH…`: migrates Part 10 files from disk (an old archive's folders)
//! through the same ingest pipeline as C-STORE: split, object store, ledger entry, C-FIND index.
//!
//! Files are read in parallel (`--jobs`); a file whose instance is already on the ledger with
//! the same data set digest is skipped without being stored again, so an interrupted import is
//! simply run again. Every file that cannot be imported is named with its reason. It opens the
//! ledger as its writer, so the node must not be running (RocksDB has one writer).

use std::io::{IsTerminal, Read};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use futures_util::StreamExt;
use sha2::{Digest, Sha256};

use crate::archive::ingest::{Pipeline, StoreContext};
use crate::config::Config;
use crate::ledger::{Ledger, LedgerError, StoreOutcome};
use crate::store::Store;

/// The calling AE title recorded on the ledger for imported instances.
pub const IMPORT_AE: &str = "IMPORT";
/// Bytes read from a file at a time.
const CHUNK: usize = 1024 * 1024;

/// Why the import could not run at all.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("the ledger at {0} is in use: stop the node first (RocksDB has one writer), or send the files with storescu")]
    NodeRunning(String),
    #[error("{0}")]
    Ledger(#[from] LedgerError),
    #[error("object store: {0}")]
    Store(#[from] crate::store::StoreError),
    #[error("object master key (security.master_key_file): {0}")]
    MasterKey(String),
    #[error("{path}: {source}")]
    Walk {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Runtime(#[from] std::io::Error),
}

/// What became of the files.
#[derive(Debug, Default)]
pub struct Summary {
    pub imported: u64,
    /// New versions of instances already on the ledger (a different data set, same UID).
    pub new_versions: u64,
    /// Already on the ledger with the same data set digest.
    pub skipped: u64,
    /// (path, reason) of every file that could not be imported.
    pub invalid: Vec<(PathBuf, String)>,
    pub bytes: u64,
    pub seconds: f64,
}

pub use crate::dicom::part10::Part10Header;

/// Parses the preamble, "DICM" and the group 0002 elements (Explicit VR Little Endian,
/// PS3.10 §7.1) from the start of a file. `head` must hold the whole meta group.
pub fn parse_header(head: &[u8]) -> Result<Part10Header, String> {
    crate::dicom::part10::read(head).map_err(|e| e.to_string())
}

/// Every regular file under `paths` (files as given, folders recursively, each folder sorted),
/// once each; and every path that could not be read, with why. Symbolic links to files are
/// followed; links to folders are not (no loops).
pub fn collect_files(paths: &[PathBuf]) -> (Vec<PathBuf>, Vec<(PathBuf, String)>) {
    let mut out = Vec::new();
    let mut errors = Vec::new();
    let mut seen = std::collections::HashSet::new();
    let mut stack: Vec<(PathBuf, bool)> = paths.iter().rev().map(|p| (p.clone(), true)).collect();
    while let Some((p, given)) = stack.pop() {
        let meta = match std::fs::symlink_metadata(&p) {
            Ok(m) => m,
            Err(e) => {
                errors.push((p, format!("cannot read: {e}")));
                continue;
            }
        };
        let meta = if meta.file_type().is_symlink() {
            match std::fs::metadata(&p) {
                Ok(t) if t.is_dir() && !given => {
                    errors.push((p, "symbolic link to a folder: not followed".into()));
                    continue;
                }
                Ok(t) => t,
                Err(e) => {
                    errors.push((p, format!("broken symbolic link: {e}")));
                    continue;
                }
            }
        } else {
            meta
        };
        if meta.is_dir() {
            match std::fs::read_dir(&p) {
                Ok(rd) => {
                    let mut children: Vec<PathBuf> = rd.flatten().map(|e| e.path()).collect();
                    children.sort();
                    stack.extend(children.into_iter().rev().map(|c| (c, false)));
                }
                Err(e) => errors.push((p, format!("cannot list the folder: {e}"))),
            }
        } else if meta.is_file() {
            // The same file named twice (overlapping arguments, links) is imported once.
            let key = std::fs::canonicalize(&p).unwrap_or_else(|_| p.clone());
            if seen.insert(key) {
                out.push(p);
            }
        }
    }
    (out, errors)
}

/// What happened to one file.
enum Done {
    Imported(StoreOutcome),
    Skipped,
    Invalid(String),
}

/// Imports `paths` with `jobs` files in flight.
pub fn run(cfg: &Config, paths: &[PathBuf], jobs: usize) -> Result<Summary, ImportError> {
    let (files, unreadable) = collect_files(paths);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let ledger = match Ledger::open(&cfg.ledger.path) {
        Ok(l) => l,
        Err(LedgerError::Open { source, .. }) if crate::ledger::is_locked(&source) => {
            return Err(ImportError::NodeRunning(
                cfg.ledger.path.display().to_string(),
            ))
        }
        Err(e) => return Err(e.into()),
    };
    let result = rt.block_on(async {
        crate::util::perms::check_key_file(&cfg.security.master_key_file, "key file")
            .map_err(|e| ImportError::MasterKey(e.to_string()))?;
        let master = crate::archive::ingest::master_key(&ledger, &cfg.security.master_key_file)
            .map_err(ImportError::MasterKey)?;
        let store = Store::open(&cfg.store)
            .await?
            .with_master_key(Some(std::sync::Arc::new(master)));
        let pipeline = Pipeline::new(
            ledger.clone(),
            store,
            cfg.store.timeout(),
            cfg.node.max_metadata_bytes,
        );
        Ok::<_, ImportError>(
            import_all(
                pipeline,
                ledger.clone(),
                cfg.node.ae_title.clone(),
                files,
                jobs,
            )
            .await,
        )
    });
    ledger.close();
    result.map(|mut s| {
        s.invalid.extend(unreadable);
        s
    })
}

async fn import_all(
    pipeline: Pipeline,
    ledger: Ledger,
    called_ae: String,
    files: Vec<PathBuf>,
    jobs: usize,
) -> Summary {
    let started = Instant::now();
    let total_bytes: u64 = files
        .iter()
        .filter_map(|f| std::fs::metadata(f).ok())
        .map(|m| m.len())
        .sum();
    let total = files.len() as u64;
    let done_bytes = Arc::new(AtomicU64::new(0));
    let progress = std::io::stderr().is_terminal();
    let mut summary = Summary::default();
    // One task per file in flight, so files are split and hashed on every core.
    let mut results = futures_util::stream::iter(files.into_iter().map(|path| {
        let (done_bytes, pipeline, ledger, called_ae) = (
            done_bytes.clone(),
            pipeline.clone(),
            ledger.clone(),
            called_ae.clone(),
        );
        tokio::spawn(async move {
            let done = import_file(&pipeline, &ledger, &called_ae, &path).await;
            if let Ok(m) = std::fs::metadata(&path) {
                done_bytes.fetch_add(m.len(), Ordering::Relaxed);
            }
            (path, done)
        })
    }))
    .buffer_unordered(jobs.max(1));
    let mut n = 0u64;
    while let Some(joined) = results.next().await {
        let (path, done) = match joined {
            Ok(r) => r,
            Err(e) => (
                PathBuf::from("?"),
                Done::Invalid(format!("import task failed: {e}")),
            ),
        };
        n += 1;
        match done {
            Done::Imported(StoreOutcome::Stored { version: 1, .. }) => summary.imported += 1,
            Done::Imported(StoreOutcome::Stored { .. }) => summary.new_versions += 1,
            Done::Imported(StoreOutcome::Duplicate { .. }) | Done::Skipped => summary.skipped += 1,
            Done::Invalid(why) => summary.invalid.push((path, why)),
        }
        if progress && (n.is_multiple_of(16) || n == total) {
            let secs = started.elapsed().as_secs_f64().max(0.001);
            let bytes = done_bytes.load(Ordering::Relaxed);
            let rate = bytes as f64 / secs;
            let eta = if rate > 0.0 {
                (total_bytes.saturating_sub(bytes)) as f64 / rate
            } else {
                0.0
            };
            eprint!(
                "\rimport: {n}/{total} files, {:.1} MB/s, ETA {:.0} s   ",
                rate / 1e6,
                eta
            );
        }
    }
    if progress {
        eprintln!();
    }
    summary.bytes = done_bytes.load(Ordering::Relaxed);
    summary.seconds = started.elapsed().as_secs_f64();
    summary
}

/// Reads the first bytes of a file: enough for any real file meta group.
fn read_head(path: &Path) -> std::io::Result<Vec<u8>> {
    let mut head = Vec::with_capacity(64 * 1024);
    std::fs::File::open(path)?
        .take(64 * 1024 + 132)
        .read_to_end(&mut head)?;
    Ok(head)
}

async fn import_file(pipeline: &Pipeline, ledger: &Ledger, called_ae: &str, path: &Path) -> Done {
    let head = match read_head(path) {
        Ok(h) => h,
        Err(e) => return Done::Invalid(format!("cannot read: {e}")),
    };
    let header = match parse_header(&head) {
        Ok(h) => h,
        Err(why) => return Done::Invalid(why),
    };
    // Resumable: a data set already on the ledger (as any version of its instance) is not
    // stored again — re-running an import never rolls a newer version back. Files of instances
    // the ledger does not know are read once.
    let versions = ledger
        .versions(&header.sop_instance_uid)
        .unwrap_or_default();
    if !versions.is_empty() {
        match dataset_digest(path, header.dataset_offset).await {
            Ok(digest) => {
                let known = versions.iter().any(
                    |seq| matches!(ledger.entry(*seq), Ok(Some(e)) if e.dataset_sha256 == digest),
                );
                if known {
                    return Done::Skipped;
                }
            }
            Err(e) => return Done::Invalid(format!("cannot read: {e}")),
        }
    }
    let mut incoming = pipeline.begin(&header.transfer_syntax);
    let mut file = match tokio::fs::File::open(path).await {
        Ok(f) => f,
        Err(e) => return Done::Invalid(format!("cannot read: {e}")),
    };
    use tokio::io::{AsyncReadExt, AsyncSeekExt};
    if let Err(e) = file
        .seek(std::io::SeekFrom::Start(header.dataset_offset as u64))
        .await
    {
        return Done::Invalid(format!("cannot read: {e}"));
    }
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = match file.read(&mut buf).await {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) => {
                incoming.abort().await;
                return Done::Invalid(format!("cannot read: {e}"));
            }
        };
        if let Err(e) = incoming.feed(&buf[..n]).await {
            incoming.abort().await;
            return Done::Invalid(e.to_string());
        }
    }
    let ctx = StoreContext {
        calling_ae: IMPORT_AE.into(),
        called_ae: called_ae.into(),
        sop_class_uid: header.sop_class_uid,
        sop_instance_uid: header.sop_instance_uid,
    };
    match incoming.finish(&ctx).await {
        Ok(stored) => Done::Imported(stored.outcome),
        Err(e) => Done::Invalid(e.to_string()),
    }
}

/// SHA-256 of the data set part of a file (what the ledger records as `dataset_sha256`).
async fn dataset_digest(path: &Path, offset: usize) -> std::io::Result<[u8; 32]> {
    let path = path.to_path_buf();
    tokio::task::spawn_blocking(move || {
        let mut f = std::fs::File::open(&path)?;
        std::io::Seek::seek(&mut f, std::io::SeekFrom::Start(offset as u64))?;
        let mut hash = Sha256::new();
        let mut buf = vec![0u8; CHUNK];
        loop {
            let n = f.read(&mut buf)?;
            if n == 0 {
                break;
            }
            hash.update(&buf[..n]);
        }
        Ok(hash.finalize().into())
    })
    .await
    .map_err(std::io::Error::other)?
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::dicom::part10::meta_element as element;

    fn file() -> Vec<u8> {
        let mut f = vec![0u8; 128];
        f.extend_from_slice(b"DICM");
        element(&mut f, 0x0001, b"OB", &[0, 1]);
        element(&mut f, 0x0002, b"UI", b"1.2.840.10008.5.1.4.1.1.2\0");
        element(&mut f, 0x0003, b"UI", b"1.2.3.4 ");
        element(&mut f, 0x0010, b"UI", b"1.2.840.10008.1.2.1\0");
        f.extend_from_slice(&[0x08, 0x00, 0x16, 0x00]);
        f
    }

    #[test]
    fn the_header_gives_syntax_uids_and_where_the_data_set_starts() {
        let f = file();
        let h = parse_header(&f).unwrap();
        assert_eq!(h.transfer_syntax, "1.2.840.10008.1.2.1");
        assert_eq!(h.sop_class_uid, "1.2.840.10008.5.1.4.1.1.2");
        assert_eq!(h.sop_instance_uid, "1.2.3.4");
        assert_eq!(&f[h.dataset_offset..h.dataset_offset + 2], &[0x08, 0x00]);
    }

    #[test]
    fn broken_headers_say_why() {
        assert!(parse_header(b"hello").unwrap_err().contains("not a DICOM"));
        let f = file();
        let e = parse_header(&f[..150]).unwrap_err();
        assert!(
            e.contains("cut short") || e.contains("Transfer Syntax"),
            "{e}"
        );
        let e = parse_header(&f[..140]).unwrap_err();
        assert!(e.contains("cut short"), "{e}");
        let mut no_ts = vec![0u8; 128];
        no_ts.extend_from_slice(b"DICM");
        element(&mut no_ts, 0x0002, b"UI", b"1.2\0");
        element(&mut no_ts, 0x0003, b"UI", b"1.3\0");
        assert!(parse_header(&no_ts)
            .unwrap_err()
            .contains("Transfer Syntax"));
    }

    #[test]
    fn folders_are_walked_in_order_once_without_loops() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("b/c")).unwrap();
        for p in ["a", "b/c/d", "b/e"] {
            std::fs::write(dir.path().join(p), b"x").unwrap();
        }
        std::os::unix::fs::symlink(dir.path(), dir.path().join("b/loop")).unwrap();
        std::os::unix::fs::symlink(dir.path().join("gone"), dir.path().join("dangling")).unwrap();
        std::os::unix::fs::symlink(dir.path().join("a"), dir.path().join("link-to-a")).unwrap();
        let (got, errors) = collect_files(&[dir.path().to_path_buf(), dir.path().join("b")]);
        let rel: Vec<String> = got
            .iter()
            .map(|p| p.strip_prefix(dir.path()).unwrap().display().to_string())
            .collect();
        assert_eq!(
            rel,
            vec!["a", "b/c/d", "b/e"],
            "the link to a is the same file"
        );
        let why: Vec<String> = errors.iter().map(|(_, w)| w.clone()).collect();
        assert!(
            why.iter().any(|w| w.contains("broken symbolic link")),
            "{why:?}"
        );
        assert!(why.iter().any(|w| w.contains("not followed")), "{why:?}");
        let (_, errors) = collect_files(&[dir.path().join("missing")]);
        assert_eq!(errors.len(), 1);
    }
}
