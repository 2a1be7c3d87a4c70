//! Security events other processes (export, verify, forwarding) leave in the event spool
//! directory for the node, the ledger's only writer, to record ([`SpooledEvent`]).

use std::path::{Path, PathBuf};

use super::db::now_micros;
use super::entry::Reason;

/// A security event waiting in the spool: `subject_seq=N`, `reason=R`, `detector=NAME` lines,
/// and `calling_ae=AE`, `peer=ADDRESS` when a peer's request found it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpooledEvent {
    pub subject_seq: u64,
    pub reason: Reason,
    pub detector: String,
    /// The calling AE title of the association whose request found it; empty when the node
    /// itself did (export, verify, forwarding).
    pub calling_ae: String,
    /// That association's peer address (empty as `calling_ae`).
    pub peer: String,
}

impl SpooledEvent {
    pub(super) fn parse(text: &str) -> Option<SpooledEvent> {
        let mut seq = None;
        let mut reason = None;
        let mut detector = None;
        let (mut calling_ae, mut peer) = (String::new(), String::new());
        for line in text.lines() {
            match line.split_once('=')? {
                ("subject_seq", v) => seq = v.parse().ok(),
                ("reason", v) => reason = v.parse().ok().and_then(Reason::from_u8),
                ("detector", v) => detector = Some(v.to_string()),
                ("calling_ae", v) => calling_ae = v.to_string(),
                ("peer", v) => peer = v.to_string(),
                _ => {}
            }
        }
        Some(SpooledEvent {
            subject_seq: seq?,
            reason: reason?,
            detector: detector?,
            calling_ae,
            peer,
        })
    }

    /// Leaves the event in `dir` for the node to record: temp file, fsync, rename, fsync dir.
    pub fn write(&self, dir: &Path) -> std::io::Result<PathBuf> {
        use std::io::Write;
        std::fs::create_dir_all(dir)?;
        let stamp = format!("{}-{}", now_micros(), std::process::id());
        let tmp = dir.join(format!("{stamp}.tmp"));
        let dest = dir.join(format!("{stamp}-{}.event", self.subject_seq));
        let mut f = std::fs::File::create(&tmp)?;
        // Escaped: a peer's title or address must not add a line of its own to the file.
        let esc = crate::util::escape::escape;
        writeln!(
            f,
            "subject_seq={}\nreason={}\ndetector={}\ncalling_ae={}\npeer={}",
            self.subject_seq,
            self.reason as u8,
            esc(&self.detector),
            esc(&self.calling_ae),
            esc(&self.peer)
        )?;
        f.sync_all()?;
        std::fs::rename(&tmp, &dest)?;
        std::fs::File::open(dir)?.sync_all()?;
        Ok(dest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::test_support::*;

    #[tokio::test(flavor = "multi_thread")]
    async fn spooled_security_events_become_entries_exactly_once() {
        let dir = tempfile::tempdir().unwrap();
        let spool = tempfile::tempdir().unwrap();
        let ledger = Ledger::open(dir.path()).unwrap();
        ledger.store(request("8.1", "2", 1)).await.unwrap();
        ledger.close();
        drop(ledger);
        let ev = SpooledEvent {
            subject_seq: 1,
            reason: Reason::Pixel,
            detector: "export".into(),
            calling_ae: String::new(),
            peer: String::new(),
        };
        ev.write(spool.path()).unwrap();
        SpooledEvent {
            subject_seq: 99,
            ..ev.clone()
        }
        .write(spool.path())
        .unwrap();
        let ledger = Ledger::open_with(dir.path(), None, Some(spool.path().to_path_buf())).unwrap();
        ledger.close();
        let e = ledger.entry(2).unwrap().unwrap();
        assert_eq!(
            (e.event, e.subject_seq, e.reason),
            (Event::IntegrityFailure, 1, Reason::Pixel)
        );
        assert_eq!(e.prev_hash, ledger.entry(1).unwrap().unwrap().hash());
        assert!(
            ledger.entry(3).unwrap().is_none(),
            "an event naming no entry is not recorded"
        );
        // The recorded event's file is gone; the bad one stays for an operator.
        assert_eq!(std::fs::read_dir(spool.path()).unwrap().count(), 1);
        // Events do not touch the instance index.
        assert_eq!(ledger.latest("8.1").unwrap().unwrap().seq, 1);
    }
}
