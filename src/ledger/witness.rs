//! The checkpoint file: a copy of the newest signed checkpoint kept outside RocksDB, beside the
//! ledger directory (`<ledger>.checkpoint` for a ledger at `<ledger>`).
//!
//! RocksDB keeps the chain and the checkpoints that sign it in the same write-ahead log and table
//! files, so whatever rolls one back (a damaged log that recovery cuts short, a lost table file,
//! a restored copy of the directory) rolls back the other with it, and the ledger still agrees
//! with itself. This file is the node's memory of what it has already signed: at every open the
//! ledger must be at least as long as the size it records and must reproduce the root recorded
//! for that size (the Merkle root of its first `size` entries, RFC 9162 §2.1.1); otherwise the
//! ledger does not open, so nothing runs on the shorter log — no startup reconciliation that
//! deletes objects, no checkpoint signed for a size already signed with another root.
//!
//! Written before each checkpoint is stored (temp file, fsync, rename, directory fsync: see
//! `store::fs`), once the entries it covers are durable, so no checkpoint is stored or published
//! that the file does not cover. A crash between the two leaves the file one checkpoint ahead,
//! over entries the ledger holds: the next open finds it consistent and stores it. A file that
//! cannot be written stops the signing (until it can be), and stops the open: every open writes
//! it again before the node serves. The file holds the signed
//! note as `dicomchain checkpoint` prints it, so a copy saved by an operator is checked the same
//! way (`dicomchain verify --checkpoint FILE`).
//!
//! What it cannot catch: a copy of the whole parent directory restored together with its old
//! checkpoint file, or a file deleted on purpose (a missing file is recreated from the ledger,
//! with a warning and a security event). Checkpoints held by other parties cover those.

use std::io::Write;
use std::path::{Path, PathBuf};

use super::checkpoint::{Checkpoint, NoteError};
use crate::instance::Digest32;

/// Why the checkpoint file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum WitnessError {
    #[error("cannot read the checkpoint file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the checkpoint file {path} is not a checkpoint: {reason}")]
    Malformed {
        path: PathBuf,
        #[source]
        reason: NoteError,
    },
    #[error("cannot write the checkpoint file {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// How a ledger stands against a checkpoint signed earlier.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Standing {
    /// The ledger holds the checkpoint's tree: at least `size` entries and the same root.
    Consistent,
    /// The ledger has fewer entries than the checkpoint signed.
    Shorter { entries: u64, signed: u64 },
    /// The ledger's first `size` entries hash to another root.
    Diverged { size: u64 },
}

impl Standing {
    /// Says what is wrong, for an error message or a verify problem.
    pub fn describe(&self) -> Option<String> {
        match self {
            Standing::Consistent => None,
            Standing::Shorter { entries, signed } => Some(format!(
                "the ledger has {entries} entries but a checkpoint of {signed} was signed: \
                 {} signed entries are gone (rolled back)",
                signed - entries
            )),
            Standing::Diverged { size } => Some(format!(
                "the ledger's first {size} entries no longer hash to the root signed for them \
                 (entries were altered)"
            )),
        }
    }
}

/// Compares a ledger of `entries` entries with checkpoint `cp`; `root_at(n)` is the ledger's
/// Merkle root over its first `n` entries (asked only when the ledger has them).
pub fn standing<E>(
    cp: &Checkpoint,
    entries: u64,
    root_at: impl FnOnce(u64) -> Result<Digest32, E>,
) -> Result<Standing, E> {
    if entries < cp.size {
        return Ok(Standing::Shorter {
            entries,
            signed: cp.size,
        });
    }
    Ok(if root_at(cp.size)? == cp.root {
        Standing::Consistent
    } else {
        Standing::Diverged { size: cp.size }
    })
}

/// The checkpoint file of the ledger at `ledger`: `<name>.checkpoint` in the same directory.
pub fn path_for(ledger: &Path) -> PathBuf {
    let name = ledger
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "ledger".into());
    let mut p = ledger.to_path_buf();
    p.set_file_name(format!("{name}.checkpoint"));
    p
}

/// The checkpoint in a signed note (its body; the signature is checked where a key is known).
pub fn parse_note(note: &str) -> Result<Checkpoint, NoteError> {
    let body_end = note.find("\n\n").map(|i| i + 1).unwrap_or(note.len());
    Checkpoint::parse(&note[..body_end])
}

/// The note in the checkpoint file and its checkpoint, or `None` if there is no file.
pub fn read(path: &Path) -> Result<Option<(String, Checkpoint)>, WitnessError> {
    let note = match std::fs::read_to_string(path) {
        Ok(n) => n,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(WitnessError::Read {
                path: path.to_path_buf(),
                source,
            })
        }
    };
    let cp = parse_note(&note).map_err(|reason| WitnessError::Malformed {
        path: path.to_path_buf(),
        reason,
    })?;
    Ok(Some((note, cp)))
}

/// Replaces the checkpoint file with `note`, durably: temp file, fsync, rename, directory fsync.
pub fn write(path: &Path, note: &str) -> Result<(), WitnessError> {
    let err = |source| WitnessError::Write {
        path: path.to_path_buf(),
        source,
    };
    let tmp = tmp_path(path);
    let mut f = std::fs::File::create(&tmp).map_err(err)?;
    f.write_all(note.as_bytes()).map_err(err)?;
    f.sync_all().map_err(err)?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(err)?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(err)
}

/// Fails, naming the file, if the checkpoint file at `path` could not be written (creates the
/// temporary file [`write`] uses, fsyncs and removes it).
pub fn check_writable(path: &Path) -> Result<(), WitnessError> {
    let err = |source| WitnessError::Write {
        path: path.to_path_buf(),
        source,
    };
    let tmp = tmp_path(path);
    std::fs::File::create(&tmp)
        .and_then(|f| f.sync_all())
        .map_err(err)?;
    std::fs::remove_file(&tmp).map_err(err)
}

fn tmp_path(path: &Path) -> PathBuf {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    PathBuf::from(tmp)
}

/// Moves a checkpoint file the operator gave up on aside (kept as evidence), returning where.
///
/// The new name is linked before the old one is removed, and a link never replaces an existing
/// file: two runs in the same instant cannot overwrite evidence set aside earlier.
pub fn set_aside(path: &Path) -> Result<Option<PathBuf>, WitnessError> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let stamp = format!(
        "{}.{:09}-{}",
        now.as_secs(),
        now.subsec_nanos(),
        std::process::id()
    );
    set_aside_as(path, &stamp)
}

fn set_aside_as(path: &Path, stamp: &str) -> Result<Option<PathBuf>, WitnessError> {
    if std::fs::symlink_metadata(path).is_err() {
        return Ok(None);
    }
    let mut attempt = 0u32;
    let to = loop {
        let mut to = path.as_os_str().to_owned();
        to.push(format!(".rejected-{stamp}"));
        if attempt > 0 {
            to.push(format!("-{attempt}"));
        }
        let to = PathBuf::from(to);
        match std::fs::hard_link(path, &to) {
            Ok(()) => break to,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && attempt < 1000 => {
                attempt += 1
            }
            Err(source) => return Err(WitnessError::Write { path: to, source }),
        }
    };
    std::fs::remove_file(path).map_err(|source| WitnessError::Write {
        path: path.to_path_buf(),
        source,
    })?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|source| WitnessError::Write {
            path: dir.to_path_buf(),
            source,
        })?;
    Ok(Some(to))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cp(size: u64, root: u8) -> Checkpoint {
        Checkpoint {
            origin: "o".into(),
            size,
            root: [root; 32],
        }
    }

    #[test]
    fn a_longer_ledger_with_the_signed_root_is_consistent() {
        let s = standing::<()>(&cp(5, 1), 9, |n| {
            assert_eq!(n, 5);
            Ok([1; 32])
        });
        assert_eq!(s, Ok(Standing::Consistent));
        assert_eq!(
            standing::<()>(&cp(5, 1), 5, |_| Ok([1; 32])),
            Ok(Standing::Consistent)
        );
    }

    #[test]
    fn a_shorter_ledger_is_a_rollback_whatever_its_roots() {
        let s = standing::<()>(&cp(135, 1), 116, |_| panic!("no root below the size")).unwrap();
        assert_eq!(
            s,
            Standing::Shorter {
                entries: 116,
                signed: 135
            }
        );
        assert!(s.describe().unwrap().contains("19 signed entries are gone"));
    }

    #[test]
    fn another_root_at_the_signed_size_is_divergence() {
        let s = standing::<()>(&cp(5, 1), 9, |_| Ok([2; 32])).unwrap();
        assert_eq!(s, Standing::Diverged { size: 5 });
    }

    #[test]
    fn the_file_sits_beside_the_ledger_directory() {
        assert_eq!(
            path_for(Path::new("/var/lib/dicomchain/ledger")),
            PathBuf::from("/var/lib/dicomchain/ledger.checkpoint")
        );
        assert_eq!(
            path_for(Path::new("var/ledger/")),
            PathBuf::from("var/ledger.checkpoint")
        );
    }

    #[test]
    fn written_notes_read_back_and_garbage_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.checkpoint");
        assert!(read(&path).unwrap().is_none());
        let note = format!("{}\n\u{2014} k AAAA\n", cp(7, 3).body());
        write(&path, &note).unwrap();
        let (back, parsed) = read(&path).unwrap().unwrap();
        assert_eq!(back, note);
        assert_eq!(parsed, cp(7, 3));
        std::fs::write(&path, "not a checkpoint").unwrap();
        assert!(matches!(read(&path), Err(WitnessError::Malformed { .. })));
        let aside = set_aside(&path).unwrap().unwrap();
        assert!(aside.exists() && !path.exists());
    }

    /// Two accept-rollback runs in the same instant must not overwrite the evidence the first
    /// one set aside.
    #[test]
    fn setting_aside_never_replaces_evidence_set_aside_earlier() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.checkpoint");
        let mut seen = std::collections::HashSet::new();
        for i in 0..20 {
            std::fs::write(&path, format!("file {i}")).unwrap();
            // The same stamp each time, as two runs within one clock tick would get.
            let aside = set_aside_as(&path, "1").unwrap().unwrap();
            assert!(!path.exists());
            assert_eq!(
                std::fs::read_to_string(&aside).unwrap(),
                format!("file {i}")
            );
            assert!(seen.insert(aside), "a name was used twice");
        }
        for (i, p) in seen.iter().enumerate() {
            assert!(p.exists(), "evidence {i} gone");
        }
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 20);
        assert!(set_aside(&path).unwrap().is_none());
        std::fs::write(&path, "x").unwrap();
        assert!(set_aside(&path).unwrap().unwrap().exists());
    }
}
