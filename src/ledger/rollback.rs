//! Holding the ledger to what it signed at open: the newest stored checkpoint must still be
//! covered by the chain and the tree, and the checkpoint file beside the ledger (see
//! [`super::witness`]) must not be ahead of it; [`check_witness`] also carries out an accepted
//! rollback.

use std::path::{Path, PathBuf};

use rocksdb::{IteratorMode, WriteBatch, WriteOptions, DB};

use super::checkpoint::{self, Checkpointing};
use super::damage::read_error;
use super::db::{CF_CHECKPOINTS, CF_PENDING};
use super::error::LedgerError;
use super::merkle;
use super::notes::ERASED_NOTE;
use super::request::AuditRecord;
use super::trail::ledger_alert;
use super::tree::DbNodes;
use super::witness;

/// The newest checkpoint's size, after checking that the chain still reaches it and that our
/// tree still has the root it signed. A ledger cut below a signed checkpoint, or rewritten under
/// one, must not carry on as if nothing happened.
pub(super) fn check_last_checkpoint(db: &DB, entries: u64) -> Result<u64, LedgerError> {
    let cf = db
        .cf_handle(CF_CHECKPOINTS)
        .ok_or_else(|| LedgerError::Corrupt("missing checkpoints".into()))?;
    let Some(item) = db.iterator_cf(cf, IteratorMode::End).next() else {
        return Ok(0);
    };
    let (_, note) = item.map_err(read_error(db))?;
    let note = String::from_utf8_lossy(&note);
    let body_end = note.rfind("\n\n").map(|i| i + 1).unwrap_or(note.len());
    let cp = checkpoint::Checkpoint::parse(&note[..body_end])
        .map_err(|e| LedgerError::Corrupt(format!("newest checkpoint: {e}")))?;
    if cp.size > entries {
        return Err(LedgerError::Corrupt(format!(
            "the chain has {entries} entries but a signed checkpoint covers {}: entries were removed",
            cp.size
        )));
    }
    if merkle::root(&DbNodes(db), cp.size)? != cp.root {
        return Err(LedgerError::Corrupt(format!(
            "the tree no longer has the root signed at size {}: entries were altered",
            cp.size
        )));
    }
    Ok(cp.size)
}

/// What `dicomchain ledger accept-rollback` did.
#[derive(Debug, Clone)]
pub struct RollbackAccepted {
    /// Entries the ledger holds now.
    pub entries: u64,
    /// The size the checkpoint file recorded, if there was a readable one.
    pub given_up: Option<u64>,
    /// Where the old checkpoint file was moved.
    pub set_aside: Option<PathBuf>,
    /// The size of the newest checkpoint the ledger still holds (now in the checkpoint file).
    pub newest: Option<u64>,
}

/// The newest stored checkpoint note and its checkpoint, if any.
pub(super) fn newest_stored_checkpoint(
    db: &DB,
) -> Result<Option<(String, checkpoint::Checkpoint)>, LedgerError> {
    let cf = db
        .cf_handle(CF_CHECKPOINTS)
        .ok_or_else(|| LedgerError::Corrupt("missing checkpoints".into()))?;
    let Some(item) = db.iterator_cf(cf, IteratorMode::End).next() else {
        return Ok(None);
    };
    let (_, note) = item.map_err(read_error(db))?;
    let note = String::from_utf8_lossy(&note).into_owned();
    let cp = witness::parse_note(&note)
        .map_err(|e| LedgerError::Corrupt(format!("newest checkpoint: {e}")))?;
    Ok(Some((note, cp)))
}

/// Deletes the pending-object notes (but those of erased instances' objects). After a rollback
/// the notes of objects whose entries were lost survive, and the next start would delete those
/// objects as interrupted C-STOREs although they were acknowledged; kept, they are orphans that
/// `verify` lists, from which the instances can be recovered.
pub(super) fn keep_objects_of_lost_entries(db: &DB) -> Result<(), LedgerError> {
    let cf = db
        .cf_handle(CF_PENDING)
        .ok_or_else(|| LedgerError::Corrupt("missing pending".into()))?;
    let mut batch = WriteBatch::default();
    for item in db.iterator_cf(cf, IteratorMode::Start) {
        let (k, v) = item.map_err(read_error(db))?;
        let numbered = k.len() == 9 && k[0] == 0;
        if numbered || v.get(32) != Some(&ERASED_NOTE) {
            batch.delete_cf(cf, k);
        }
    }
    let mut wo = WriteOptions::default();
    wo.set_sync(true);
    db.write_opt(batch, &wo).map_err(LedgerError::Write)
}

/// Carries out an accepted rollback (see `Ledger::accept_rollback`): sets the checkpoint file
/// aside, keeps the objects of lost entries, writes a new file from the newest checkpoint `stored`
/// and returns the alert that records what was given up.
fn accept(
    db: &DB,
    file: &Path,
    entries: u64,
    stored: Option<(String, checkpoint::Checkpoint)>,
) -> Result<(u64, Vec<AuditRecord>, Option<RollbackAccepted>), LedgerError> {
    // A damaged file is set aside like a readable one: the operator chose the ledger.
    let old = witness::read(file).ok().flatten();
    let set_aside = witness::set_aside(file)?;
    keep_objects_of_lost_entries(db)?;
    if let Some((note, _)) = &stored {
        witness::write(file, note)?;
    }
    let accepted = RollbackAccepted {
        entries,
        given_up: old.as_ref().map(|(_, cp)| cp.size),
        set_aside,
        newest: stored.as_ref().map(|(_, cp)| cp.size),
    };
    // The alert alone must identify what was given up (the file set aside can be lost):
    // its size and root, and the signed note itself, escaped to stay on one line.
    let given_up = match &old {
        Some((note, cp)) => format!(
            "size {} root {} (note: {})",
            cp.size,
            hex::encode(cp.root),
            crate::util::escape::escape(note)
        ),
        None => "nothing readable".to_string(),
    };
    let alert = ledger_alert(format!(
        "rollback accepted by the operator: the ledger holds {entries} entries; the \
         checkpoint file recorded {given_up} (set aside as {})",
        accepted.set_aside.as_ref().map_or("-".to_string(), |p| {
            crate::util::escape::escape(&p.display().to_string()).into_owned()
        }),
    ));
    tracing::warn!(entries, given_up = ?accepted.given_up, "rollback of the ledger accepted by the operator");
    Ok((accepted.newest.unwrap_or(0), vec![alert], Some(accepted)))
}

/// Holds the ledger (of `entries` entries) to the checkpoint file at `file` (see [`witness`]):
/// the size it records, the security alerts to append once the committer runs, and with
/// `accept_rollback` what the operator gave up.
pub(super) fn check_witness(
    db: &DB,
    path: &Path,
    file: &Path,
    entries: u64,
    accept_rollback: bool,
    checkpointing: Option<&Checkpointing>,
) -> Result<(u64, Vec<AuditRecord>, Option<RollbackAccepted>), LedgerError> {
    let stored = newest_stored_checkpoint(db)?;
    if accept_rollback {
        return accept(db, file, entries, stored);
    }
    match witness::read(file)? {
        None => {
            let Some((note, cp)) = stored else {
                // A new ledger: nothing to record yet, but a file that could not be written
                // would stop the signing later; refuse now, naming the path.
                witness::check_writable(file)?;
                return Ok((0, Vec::new(), None));
            };
            // The file was deleted (or the ledger moved without it): it is recreated from the
            // ledger (which checked itself against its own newest checkpoint above), loudly.
            tracing::warn!(file = %file.display(), size = cp.size, "the checkpoint file is missing although the ledger has signed checkpoints: recreated from the ledger's newest one (a rollback before now cannot be detected)");
            witness::write(file, &note)?;
            let alert = ledger_alert(format!(
                "checkpoint file {} missing; recreated from the ledger's newest checkpoint at \
                 size {}",
                file.display(),
                cp.size
            ));
            Ok((cp.size, vec![alert], None))
        }
        Some((note, cp)) => {
            let standing = witness::standing(&cp, entries, |n| merkle::root(&DbNodes(db), n))?;
            if let Some(what) = standing.describe() {
                return Err(LedgerError::RolledBack {
                    path: path.to_path_buf(),
                    file: file.to_path_buf(),
                    what,
                });
            }
            let stored_size = stored.as_ref().map_or(0, |(_, s)| s.size);
            if let Some((note, newer)) = stored.filter(|(_, s)| s.size > cp.size) {
                // The ledger stores a newer checkpoint than the file records (the file is an
                // older copy): both hold the same tree (checked above), so the file catches up.
                witness::write(file, &note)?;
                tracing::info!(
                    from = cp.size,
                    to = newer.size,
                    "checkpoint file brought up to the ledger's newest checkpoint"
                );
                return Ok((newer.size, Vec::new(), None));
            }
            if cp.size > stored_size {
                // The file was written and a crash came before the checkpoint was stored. Its
                // entries are durable (they are written before the file) and reproduce its root
                // (checked above): store it now, signed again, so the stored checkpoints and
                // the file agree.
                if let Some(signing) = checkpointing {
                    let again = signing.signer.sign(&checkpoint::Checkpoint {
                        origin: signing.origin.clone(),
                        size: cp.size,
                        root: cp.root,
                    });
                    witness::write(file, &again)?;
                    let cf = db
                        .cf_handle(CF_CHECKPOINTS)
                        .ok_or_else(|| LedgerError::Corrupt("missing checkpoints".into()))?;
                    let mut wo = WriteOptions::default();
                    wo.set_sync(true);
                    db.put_cf_opt(cf, cp.size.to_be_bytes(), again.as_bytes(), &wo)
                        .map_err(LedgerError::Write)?;
                    tracing::info!(
                        size = cp.size,
                        stored = stored_size,
                        "checkpoint in the checkpoint file stored (a crash came between the two)"
                    );
                    return Ok((cp.size, Vec::new(), None));
                }
            }
            // Written again, unchanged: a file that can no longer be written is found now,
            // before the node serves, not when the next checkpoint is due.
            witness::write(file, &note)?;
            Ok((cp.size, Vec::new(), None))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::test_support::*;

    #[tokio::test(flavor = "multi_thread")]
    async fn checkpoints_are_signed_as_the_tree_grows_and_guard_against_truncation() {
        let tmp = tempfile::tempdir().unwrap();
        // A directory inside: the checkpoint file goes beside the ledger.
        let dir = tmp.path().join("l");
        let dir = &dir;
        let vkey = checkpointing(3).signer.verifier_key();
        let ledger = Ledger::open_with(dir, Some(checkpointing(3)), None).unwrap();
        for i in 0..5u8 {
            ledger
                .store(request(&format!("6.{i}"), "1", i + 10))
                .await
                .unwrap();
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        ledger.close();
        let note = ledger.latest_checkpoint().unwrap().unwrap();
        let cp = checkpoint::verify(&note, &vkey).unwrap();
        assert_eq!(cp.size, 5);
        assert_eq!(cp.root, ledger.tree_root(5).unwrap());
        drop(ledger);
        // Remove the newest entry behind the node's back: it refuses to start.
        {
            let db = DB::open_cf_descriptors(&db_options(), dir, cf_descriptors()).unwrap();
            db.delete_cf(db.cf_handle(CF_ENTRIES).unwrap(), 5u64.to_be_bytes())
                .unwrap();
        }
        let err = Ledger::open_with(dir, Some(checkpointing(3)), None)
            .err()
            .unwrap();
        assert!(err.to_string().contains("entries were removed"), "{err}");
    }

    /// A rollback the ledger cannot see in itself (its newest entries, their tree nodes and the
    /// checkpoints that signed them all gone, as when recovery cuts a damaged write-ahead log)
    /// is refused by the checkpoint file, until the operator accepts it.
    #[tokio::test(flavor = "multi_thread")]
    async fn the_checkpoint_file_refuses_a_consistent_rollback_until_it_is_accepted() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("l");
        let file = witness::path_for(&dir);
        stored_and_closed(&dir, "9", 5).await;
        let (_, cp) = witness::read(&file).unwrap().unwrap();
        assert_eq!(cp.size, 5);
        {
            let db = DB::open_cf_descriptors(&db_options(), &dir, cf_descriptors()).unwrap();
            let cf = |n| db.cf_handle(n).unwrap();
            for n in [CF_ENTRIES, CF_CHECKPOINTS] {
                db.delete_range_cf(cf(n), 4u64.to_be_bytes(), u64::MAX.to_be_bytes())
                    .unwrap();
            }
            db.delete_range_cf(cf(CF_TREE), tree_key(3), tree_key(u64::MAX))
                .unwrap();
        }
        match Ledger::open_with(&dir, Some(checkpointing(3)), None) {
            Err(LedgerError::RolledBack { what, .. }) => {
                assert!(what.contains("2 signed entries are gone"), "{what}")
            }
            Err(e) => panic!("{e}"),
            Ok(_) => panic!("a rolled-back ledger opened"),
        }
        let accepted = Ledger::accept_rollback(&dir).unwrap();
        assert_eq!(accepted.entries, 3);
        assert_eq!(accepted.given_up, Some(5));
        assert!(accepted.set_aside.unwrap().exists());
        assert_eq!(witness::read(&file).unwrap().unwrap().1.size, 3);
        let ledger = Ledger::open(&dir).unwrap();
        ledger.close();
        // The alert is on the ledger.
        let alert = ledger.entry(4).unwrap().unwrap();
        assert_eq!(alert.version, trail::id::SECURITY_ALERT);
        assert!(
            alert.detail.contains("rollback accepted"),
            "{}",
            alert.detail
        );
        // It names what was given up (size, root and the note, escaped onto one line), as the
        // file set aside may not survive.
        let given_up = format!("size 5 root {}", hex::encode(cp.root));
        assert!(alert.detail.contains(&given_up), "{}", alert.detail);
        assert!(alert.detail.contains("(note: "), "{}", alert.detail);
        assert!(!alert.detail.contains('\n'), "{}", alert.detail);
        drop(ledger);
        // A missing file is recreated from the ledger (with an alert), not a reason to refuse.
        std::fs::remove_file(&file).unwrap();
        let ledger = Ledger::open(&dir).unwrap();
        ledger.close();
        assert_eq!(witness::read(&file).unwrap().unwrap().1.size, 3);
        assert!(ledger
            .entry(5)
            .unwrap()
            .unwrap()
            .detail
            .contains("missing; recreated"));
    }

    /// The checkpoint file blocked for everyone, root included: its temporary file's name is
    /// taken by a directory.
    fn block_witness(file: &Path) -> PathBuf {
        let mut tmp = file.as_os_str().to_owned();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        std::fs::create_dir_all(tmp.join("x")).unwrap();
        tmp
    }

    /// A checkpoint file that cannot be written must not weaken the protection silently: the
    /// ledger does not open, and while it runs no checkpoint is stored that the file does not
    /// cover; signing resumes once the file can be written.
    #[tokio::test(flavor = "multi_thread")]
    async fn no_checkpoint_is_signed_that_the_checkpoint_file_does_not_cover() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("l");
        let file = witness::path_for(&dir);
        // A new ledger whose file could not be written does not open.
        let blocked = block_witness(&file);
        match Ledger::open_with(&dir, Some(checkpointing(3)), None) {
            Err(LedgerError::Witness(witness::WitnessError::Write { path, .. })) => {
                assert_eq!(path, file)
            }
            Err(e) => panic!("{e}"),
            Ok(_) => panic!("opened with a checkpoint file it cannot write"),
        }
        std::fs::remove_dir_all(&blocked).unwrap();
        let ledger = Ledger::open_with(&dir, Some(checkpointing(3)), None).unwrap();
        for i in 0..3u8 {
            ledger
                .store(request(&format!("8.{i}"), "1", i + 10))
                .await
                .unwrap();
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while ledger.latest_checkpoint_size().unwrap() != Some(3) {
            assert!(std::time::Instant::now() < deadline, "no checkpoint of 3");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let covered = witness::read(&file).unwrap().unwrap().1.size;
        assert_eq!(covered, 3);
        let blocked = block_witness(&file);
        for i in 3..6u8 {
            ledger
                .store(request(&format!("8.{i}"), "1", i + 10))
                .await
                .unwrap();
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert_eq!(ledger.latest_checkpoint_size().unwrap(), Some(covered));
        assert_eq!(witness::read(&file).unwrap().unwrap().1.size, covered);
        std::fs::remove_dir_all(&blocked).unwrap();
        ledger.store(request("8.6", "1", 16)).await.unwrap();
        std::thread::sleep(std::time::Duration::from_millis(5));
        ledger.close();
        assert_eq!(ledger.latest_checkpoint_size().unwrap(), Some(7));
        assert_eq!(witness::read(&file).unwrap().unwrap().1.size, 7);
        drop(ledger);
        // An existing ledger whose file can no longer be written does not open either.
        let blocked = block_witness(&file);
        assert!(matches!(
            Ledger::open_with(&dir, Some(checkpointing(3)), None),
            Err(LedgerError::Witness(witness::WitnessError::Write { .. }))
        ));
        std::fs::remove_dir_all(&blocked).unwrap();
    }

    /// The file is written before the checkpoint is stored: a crash in between leaves the file
    /// ahead of the stored checkpoints, over durable entries. That is consistent, and the open
    /// stores the file's checkpoint so that the two agree again.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_checkpoint_file_ahead_of_the_stored_checkpoints_is_accepted_and_stored() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("l");
        let file = witness::path_for(&dir);
        let vkey = checkpointing(3).signer.verifier_key();
        stored_and_closed(&dir, "7", 4).await;
        let (_, cp) = witness::read(&file).unwrap().unwrap();
        assert_eq!(cp.size, 4);
        // The crash: the newest checkpoint never reached the ledger.
        {
            let db = DB::open_cf_descriptors(&db_options(), &dir, cf_descriptors()).unwrap();
            db.delete_cf(db.cf_handle(CF_CHECKPOINTS).unwrap(), 4u64.to_be_bytes())
                .unwrap();
        }
        let ledger = Ledger::open_with(&dir, Some(checkpointing(3)), None).unwrap();
        assert_eq!(ledger.latest_checkpoint_size().unwrap(), Some(4));
        let note = ledger.latest_checkpoint().unwrap().unwrap();
        let stored = checkpoint::verify(&note, &vkey).unwrap();
        assert_eq!(stored, cp);
        assert_eq!(witness::read(&file).unwrap().unwrap().0, note);
        ledger.store(request("7.4", "1", 14)).await.unwrap();
        std::thread::sleep(std::time::Duration::from_millis(5));
        ledger.close();
        assert_eq!(ledger.latest_checkpoint_size().unwrap(), Some(5));
        assert_eq!(witness::read(&file).unwrap().unwrap().1.size, 5);
    }

    /// A write-ahead log deleted whole has no damaged record for absolute consistency to stop
    /// at; the MANIFEST's record of closed logs makes the open fail instead of dropping it.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_missing_closed_write_ahead_log_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("l");
        let ledger = Ledger::open(&dir).unwrap();
        ledger.store(request("5.1", "1", 10)).await.unwrap();
        ledger.close();
        drop(ledger);
        let logs = |dir: &Path| -> Vec<PathBuf> {
            let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
                .unwrap()
                .map(|e| e.unwrap().path())
                .filter(|p| p.extension().is_some_and(|x| x == "log"))
                .collect();
            v.sort();
            v
        };
        {
            // A log closed while it still holds unflushed writes (of the entries' family), as
            // a long-running node has, then a crash.
            let mut o = db_options();
            o.set_track_and_verify_wals_in_manifest(true);
            let db = DB::open_cf_descriptors(&o, &dir, cf_descriptors()).unwrap();
            let cf = |n| db.cf_handle(n).unwrap();
            let mut wo = WriteOptions::default();
            wo.set_sync(true);
            for n in [CF_ENTRIES, CF_KEYS] {
                db.delete_cf_opt(cf(n), b"no such key", &wo).unwrap();
            }
            let before = logs(&dir);
            db.flush_cf(cf(CF_KEYS)).unwrap();
            db.delete_cf_opt(cf(CF_ENTRIES), b"no such key either", &wo)
                .unwrap();
            assert!(
                logs(&dir).len() > before.len(),
                "no new log: {:?}",
                logs(&dir)
            );
        }
        let all = logs(&dir);
        assert!(all.len() >= 2, "{all:?}");
        std::fs::remove_file(&all[all.len() - 2]).unwrap();
        match Ledger::open(&dir) {
            Err(LedgerError::Damaged { .. }) => {}
            Err(e) => panic!("{e}"),
            Ok(_) => panic!("opened without a closed write-ahead log"),
        }
        // The operator's way out works, and lasts.
        Ledger::accept_rollback(&dir).unwrap();
        let ledger = Ledger::open(&dir).unwrap();
        // The entry, then the alert.
        assert_eq!(ledger.head().unwrap().map(|h| h.0), Some(2));
        ledger.close();
    }
}
