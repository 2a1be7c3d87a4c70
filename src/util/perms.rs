//! File modes of the node's state. The ledger holds patient attributes in plaintext (metadata
//! records and the C-FIND index), and the key files open everything else, so none of it may be
//! readable by another local user whatever the umask of the shell or unit that started us:
//!
//! - the `dicomchain` command runs with umask 077 ([`restrict_umask`]), so every file and
//!   directory it creates (RocksDB's, the object store's, the spool's, the keys') is the owner's
//!   only;
//! - a key file (master key, signing key, admin token, TLS private key, S3 secret) that group or
//!   others may read or write stops the start ([`check_key_files`]): it may have been read
//!   already, and only the operator can decide whether to replace it;
//! - a state directory left open by an older version or a loose umask is closed to mode 0700 at
//!   start ([`tighten_dirs`]); the files inside may still be 0644, but nobody else can reach them.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// Group and other permission bits.
const NOT_OWNER: u32 = 0o077;

/// Sets the process umask to 077: files are created 0600, directories 0700.
pub fn restrict_umask() {
    // SAFETY: umask(2) only swaps the process's creation mask; it cannot fail and touches no
    // memory. Called at the start of `main`, before any thread that creates files exists.
    unsafe {
        libc::umask(0o077);
    }
}

/// Why a file of the node's state could not be checked or written; every error names the path.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} {}: {source}", path.display())]
    Unreadable {
        what: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{what} {} has mode {mode:04o}: group or others can read it. Run `chmod 600 {}` \
         (and replace the key if someone else may have read it)",
        path.display(),
        path.display()
    )]
    OpenToOthers {
        what: String,
        path: PathBuf,
        mode: u32,
    },
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> FileError + '_ {
    move |source| FileError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Err naming the path, its mode and the fix when group or others have any access to the key
/// file at `path`; Ok when it is private or does not exist yet (then the node creates it 0600).
pub fn check_key_file(path: &Path, what: &str) -> Result<(), FileError> {
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(FileError::Unreadable {
                what: what.to_string(),
                path: path.to_path_buf(),
                source,
            })
        }
    };
    let mode = meta.permissions().mode() & 0o7777;
    if mode & NOT_OWNER != 0 {
        return Err(FileError::OpenToOthers {
            what: what.to_string(),
            path: path.to_path_buf(),
            mode,
        });
    }
    Ok(())
}

/// [`check_key_file`] for every key file (path, what it is); the first failure.
pub fn check_key_files(files: &[(&Path, &'static str)]) -> Result<(), FileError> {
    files
        .iter()
        .copied()
        .try_for_each(|(path, what)| check_key_file(path, what))
}

/// Removes group and other access from the state directories that exist; returns each one
/// changed with its old mode, and the ones that could not be changed with why.
pub fn tighten_dirs(dirs: Vec<PathBuf>) -> Vec<(PathBuf, Result<u32, std::io::Error>)> {
    let mut changed = Vec::new();
    for dir in dirs {
        let Ok(meta) = std::fs::metadata(&dir) else {
            continue;
        };
        let mode = meta.permissions().mode() & 0o7777;
        if !meta.is_dir() || mode & NOT_OWNER == 0 {
            continue;
        }
        let done =
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(mode & !NOT_OWNER))
                .map(|()| mode);
        changed.push((dir, done));
    }
    changed
}

/// Writes a new secret file (a key, a token): `text` and a newline, mode 0600, fsynced; fails if
/// the file exists. Creates the parent directory.
pub fn create_secret_file(path: &Path, text: &str) -> Result<(), FileError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(io_error(dir))?;
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(io_error(path))?;
    f.write_all(format!("{text}\n").as_bytes())
        .and_then(|_| f.sync_all())
        .map_err(io_error(path))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn chmod(p: &Path, mode: u32) {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn a_key_file_others_can_read_is_refused_with_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("master.key");
        assert!(
            check_key_file(&key, "object master key").is_ok(),
            "missing: created later"
        );
        std::fs::write(&key, "x").unwrap();
        for (mode, ok) in [
            (0o600, true),
            (0o400, true),
            (0o644, false),
            (0o640, false),
            (0o604, false),
            (0o620, false),
        ] {
            chmod(&key, mode);
            let r = check_key_file(&key, "object master key");
            assert_eq!(r.is_ok(), ok, "{mode:o}: {r:?}");
            if let Err(why) = r.map_err(|e| e.to_string()) {
                assert!(why.contains(&format!("{mode:04o}")), "{why}");
                assert!(
                    why.contains(&format!("chmod 600 {}", key.display())),
                    "{why}"
                );
                assert!(why.starts_with("object master key "), "{why}");
            }
        }
    }

    #[test]
    fn open_state_directories_are_closed() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("dicomchain.toml");
        std::fs::write(
            &file,
            format!(
                "[ledger]\npath = {:?}\nevent_spool = {:?}\n[store.fs]\nroot = {:?}\n",
                dir.path().join("ledger"),
                dir.path().join("spool"),
                dir.path().join("objects")
            ),
        )
        .unwrap();
        let cfg = Config::load(&file).unwrap();
        std::fs::create_dir(&cfg.ledger.path).unwrap();
        std::fs::create_dir(&cfg.store.fs.root).unwrap();
        chmod(&cfg.ledger.path, 0o755);
        chmod(&cfg.store.fs.root, 0o700);
        let changed = tighten_dirs(cfg.state_dirs());
        assert_eq!(changed.len(), 1, "{changed:?}");
        assert_eq!(changed[0].0, cfg.ledger.path);
        assert_eq!(changed[0].1.as_ref().ok(), Some(&0o755));
        let mode = std::fs::metadata(&cfg.ledger.path)
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o700);
        assert!(tighten_dirs(cfg.state_dirs()).is_empty());
    }
}
