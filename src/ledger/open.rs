//! Opening the ledger: as its single writer (checking it against its checkpoints and the
//! checkpoint file, then starting the committer), as a read-only view beside a running node,
//! and the operator's way out of a refused open ([`Ledger::accept_rollback`]).

use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Mutex};

use rocksdb::DB;

use super::checkpoint::Checkpointing;
use super::committer::Committer;
use super::damage;
use super::db::{cf_descriptors, db_options, read_head};
use super::error::LedgerError;
use super::handle::{Inner, Ledger};
use super::notes::NoteBook;
use super::request::Job;
use super::rollback::{check_last_checkpoint, check_witness, RollbackAccepted};
use super::scrub;
use super::tree::backfill_tree;
use super::witness;

impl Ledger {
    /// Opens (creating if needed) the ledger as its single writer and starts the committer.
    pub fn open(path: &Path) -> Result<Ledger, LedgerError> {
        Ledger::open_with(path, None, None)
    }

    /// Opens the ledger as its single writer; with `checkpointing`, the committer signs
    /// checkpoints of the tree as it grows.
    ///
    /// Refuses a ledger whose write-ahead log is damaged ([`LedgerError::Damaged`]), and one
    /// that does not hold the checkpoint recorded in its checkpoint file
    /// ([`LedgerError::RolledBack`], see [`witness`]).
    pub fn open_with(
        path: &Path,
        checkpointing: Option<Checkpointing>,
        spool: Option<PathBuf>,
    ) -> Result<Ledger, LedgerError> {
        Ledger::open_writer(path, checkpointing, spool, false).map(|(l, _)| l)
    }

    /// The operator's way out of [`LedgerError::Damaged`] and [`LedgerError::RolledBack`]:
    /// opens the ledger with RocksDB's point-in-time recovery (a damaged write-ahead log is cut
    /// at the damage), sets the checkpoint file aside as evidence (`….rejected-<time>-<pid>`,
    /// never replacing one set aside before), writes a new one from the newest checkpoint the
    /// ledger still holds, and records a security alert on the ledger naming what was given up.
    /// Checkpoints signed later may fork the ones given up: whoever holds those must be told.
    pub fn accept_rollback(path: &Path) -> Result<RollbackAccepted, LedgerError> {
        let (ledger, accepted) = Ledger::open_writer(path, None, None, true)?;
        ledger.close();
        accepted.ok_or_else(|| LedgerError::Corrupt("rollback not recorded".into()))
    }

    pub(super) fn open_writer(
        path: &Path,
        checkpointing: Option<Checkpointing>,
        spool: Option<PathBuf>,
        accept_rollback: bool,
    ) -> Result<(Ledger, Option<RollbackAccepted>), LedgerError> {
        if let Some(parent) = path.parent() {
            let _ = std::fs::create_dir_all(parent);
        }
        let mut options = db_options();
        if !accept_rollback {
            // The default, point-in-time recovery, replays the log up to the first damaged
            // record and silently drops every record after it, acknowledged and signed ones
            // included. A clean kill leaves whole records (a record is one write(2), and a
            // C-STORE is answered only after its group's fsync), so only damage stops the open.
            options.set_wal_recovery_mode(rocksdb::DBRecoveryMode::AbsoluteConsistency);
            // Absolute consistency catches damaged records only: a write-ahead log deleted, or
            // cut exactly at a record boundary, reads as a log that ended there. With this the
            // MANIFEST records each closed log's synced size and the open fails if one is
            // missing or shorter. RocksDB does not track the live log this way (it would cost a
            // MANIFEST write per sync), so the newest one is covered only as far as the
            // checkpoint file reaches (see `witness`).
            options.set_track_and_verify_wals_in_manifest(true);
        }
        let db = DB::open_cf_descriptors(&options, path, cf_descriptors()).map_err(|source| {
            if scrub::is_corruption(&source) {
                LedgerError::Damaged {
                    path: path.to_path_buf(),
                    source,
                }
            } else {
                LedgerError::Open {
                    path: path.to_path_buf(),
                    source,
                }
            }
        })?;
        let db = Arc::new(db);
        let damage = damage::register(&db);
        let head = read_head(&db)?;
        backfill_tree(&db, head.map(|h| h.0).unwrap_or(0))?;
        let stored_checkpoint = check_last_checkpoint(&db, head.map(|h| h.0).unwrap_or(0))?;
        let witness_path = witness::path_for(path);
        let (witnessed, alerts, accepted) = check_witness(
            &db,
            path,
            &witness_path,
            head.map(|h| h.0).unwrap_or(0),
            accept_rollback,
            checkpointing.as_ref(),
        )?;
        let last_checkpoint = stored_checkpoint.max(witnessed);
        let book = NoteBook::open(&db)?;
        let note_floor = book.first();
        let notes = Arc::new(Mutex::new(book));
        let (tx, rx) = mpsc::channel::<Job>();
        let forward_wakeup = Arc::new(tokio::sync::Notify::new());
        let committer = {
            let db = db.clone();
            let committer = Committer {
                db,
                forward_wakeup: forward_wakeup.clone(),
                head,
                checkpointing,
                spool,
                witness: witness_path,
                last_checkpoint,
                last_signed: None,
                compactor: None,
                notes: notes.clone(),
                note_floor,
                damage: damage.clone(),
            };
            std::thread::Builder::new()
                .name("ledger-committer".into())
                .spawn(move || committer.run(rx))
                .map_err(|e| LedgerError::Corrupt(format!("cannot start committer thread: {e}")))?
        };
        let ledger = Ledger {
            inner: Arc::new(Inner {
                db,
                path: path.to_path_buf(),
                tx: Mutex::new(Some(tx)),
                committer: Mutex::new(Some(committer)),
                secondary: false,
                forward_wakeup,
                notes: Some(notes),
                damage,
                scrubber: Mutex::new(None),
                _scratch: None,
            }),
        };
        for record in alerts {
            ledger.audit(record);
        }
        Ok((ledger, accepted))
    }

    /// A read-only view ([`Ledger::open_secondary`]) whose scratch files go in a new temporary
    /// directory named after `purpose` (`dicomchain-PURPOSE-…`), removed once the view and its
    /// clones are dropped.
    pub fn open_read_only(path: &Path, purpose: &str) -> Result<Ledger, LedgerError> {
        let scratch = tempfile::Builder::new()
            .prefix(&format!("dicomchain-{purpose}-"))
            .tempdir()
            .map_err(LedgerError::Scratch)?;
        let at = scratch.path().to_path_buf();
        Ledger::open_view(path, &at, Some(scratch))
    }

    /// Opens a read-only view that follows a ledger another process (the running node) may be
    /// writing: a RocksDB secondary instance whose own files live in `scratch`.
    pub fn open_secondary(path: &Path, scratch: &Path) -> Result<Ledger, LedgerError> {
        Ledger::open_view(path, scratch, None)
    }

    /// [`Ledger::open_secondary`], keeping `guard` (the scratch directory) until the view closes.
    fn open_view(
        path: &Path,
        scratch: &Path,
        guard: Option<tempfile::TempDir>,
    ) -> Result<Ledger, LedgerError> {
        let open_err = |source| LedgerError::Open {
            path: path.to_path_buf(),
            source,
        };
        if !path.join("CURRENT").exists() {
            return Err(LedgerError::Corrupt(format!(
                "no ledger at {}",
                path.display()
            )));
        }
        let mut o = db_options();
        o.create_if_missing(false);
        o.set_max_open_files(-1);
        // The primary deletes table files as it compacts; a secondary that read the manifest
        // just before may not find one. Such a race passes on the next attempt.
        let mut attempt = 0;
        let db = loop {
            let opened = DB::open_cf_descriptors_as_secondary(&o, path, scratch, cf_descriptors())
                .and_then(|db| db.try_catch_up_with_primary().map(|()| db));
            match opened {
                Ok(db) => break db,
                Err(e) if attempt < 20 && e.to_string().contains("No such file or directory") => {
                    attempt += 1;
                    std::thread::sleep(std::time::Duration::from_millis(100 * attempt));
                }
                Err(e) => return Err(open_err(e)),
            }
        };
        Ok(Ledger {
            inner: Arc::new(Inner {
                db: Arc::new(db),
                path: path.to_path_buf(),
                tx: Mutex::new(None),
                committer: Mutex::new(None),
                secondary: true,
                forward_wakeup: Arc::new(tokio::sync::Notify::new()),
                notes: None,
                damage: Default::default(),
                scrubber: Mutex::new(None),
                _scratch: guard,
            }),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::test_support::*;

    #[tokio::test(flavor = "multi_thread")]
    async fn secondary_follows_the_primary() {
        let dir = tempfile::tempdir().unwrap();
        let scratch = tempfile::tempdir().unwrap();
        let ledger = Ledger::open(dir.path()).unwrap();
        ledger.store(request("3.1", "6", 5)).await.unwrap();
        let ro = Ledger::open_secondary(dir.path(), scratch.path()).unwrap();
        assert_eq!(ro.latest("3.1").unwrap().unwrap().seq, 1);
        assert!(matches!(
            ro.store(request("3.2", "6", 6)).await,
            Err(LedgerError::ReadOnly)
        ));
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_read_only_view_removes_its_scratch_directory_once_closed() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::open(dir.path()).unwrap();
        ledger.store(request("3.1", "6", 5)).await.unwrap();
        let ro = Ledger::open_read_only(dir.path(), "test").unwrap();
        let scratch = ro.inner._scratch.as_ref().unwrap().path().to_path_buf();
        assert!(scratch.is_dir());
        assert!(scratch
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("dicomchain-test-"));
        assert_eq!(ro.latest("3.1").unwrap().unwrap().seq, 1);
        let clone = ro.clone();
        drop(ro);
        assert!(scratch.is_dir(), "kept while a clone is open");
        drop(clone);
        assert!(!scratch.exists());
    }
}
