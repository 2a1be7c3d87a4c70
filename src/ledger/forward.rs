//! The store-and-forward queue on the ledger (column family `forward`).
//!
//! Keys (DEST is a destination's peer name from the configuration, seq a u64 BE entry number):
//! - `q\0DEST\0seq` → (): the stored entry `seq` waits to be forwarded to DEST. Written in the same
//!   batch as the entry, so an acknowledged instance is never forgotten, crashes included;
//! - `f\0DEST\0seq` → status u16 BE ‖ detail: forwarding was given up (retried
//!   `forwarding.max_attempts` times, or the instance failed its ledger check);
//! - `e\0DEST` → time µs i64 BE ‖ text: the last error reaching DEST (for `forward status`).
//!
//! A final outcome removes the queue item and appends a forward entry to the chain (event 3: the
//! destination, the status, the subject entry) in one batch: an outcome is recorded exactly once.

use std::collections::BTreeMap;

use rocksdb::{Direction, IteratorMode};

use super::damage::read_error;
use super::db::{now_micros, read_entry, CF_FORWARD};
use super::entry::{Entry, Event, Reason};
use super::error::LedgerError;
use super::group::Group;
use super::handle::Ledger;
pub use super::request::{ForwardOutcome, ForwardUpdate};
use crate::util::bytes::Reader;

/// File extension of a retry request left in the event spool by `dicomchain forward retry`.
pub const RETRY_EXTENSION: &str = "retry";

/// The queue of one destination as `forward status` shows it.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct ForwardSummary {
    pub pending: u64,
    /// The entry number and time (µs) of the oldest pending item.
    pub oldest_pending: Option<(u64, i64)>,
    pub failed: u64,
    /// Time (µs) and text of the last error reaching the destination.
    pub last_error: Option<(i64, String)>,
}

fn key(kind: u8, destination: &str, seq: Option<u64>) -> Vec<u8> {
    let mut k = vec![kind, 0];
    k.extend_from_slice(destination.as_bytes());
    k.push(0);
    if let Some(seq) = seq {
        k.extend_from_slice(&seq.to_be_bytes());
    }
    k
}

pub(super) fn queue_key(destination: &str, seq: u64) -> Vec<u8> {
    key(b'q', destination, Some(seq))
}

fn failed_key(destination: &str, seq: u64) -> Vec<u8> {
    key(b'f', destination, Some(seq))
}

fn error_key(destination: &str) -> Vec<u8> {
    let mut k = vec![b'e', 0];
    k.extend_from_slice(destination.as_bytes());
    k
}

/// Splits `q\0DEST\0seq` / `f\0DEST\0seq` into (kind, DEST, seq).
pub(super) fn split_item(k: &[u8]) -> Option<(u8, &str, u64)> {
    if k.len() < 2 + 1 + 8 || k[1] != 0 {
        return None;
    }
    let (head, seq) = k.split_at(k.len() - 8);
    let dest = head.get(2..head.len() - 1)?;
    if head[head.len() - 1] != 0 {
        return None;
    }
    Some((
        k[0],
        std::str::from_utf8(dest).ok()?,
        u64::from_be_bytes(seq.try_into().ok()?),
    ))
}

/// The text of a retry request: `destination=NAME`, or `destination=*` for all.
pub fn retry_request(destination: Option<&str>) -> String {
    format!("destination={}\n", destination.unwrap_or("*"))
}

/// Parses a retry request; `Some(None)` means every destination.
pub fn parse_retry_request(text: &str) -> Option<Option<String>> {
    let line = text.lines().find_map(|l| l.strip_prefix("destination="))?;
    let d = line.trim();
    match d {
        "" => None,
        "*" => Some(None),
        d => Some(Some(d.to_string())),
    }
}

/// The file where the node answers a retry request: how many items it re-queued.
pub fn retry_answer_path(request: &std::path::Path) -> std::path::PathBuf {
    request.with_extension("requeued")
}

/// Leaves a retry request in the spool for the running node: temp file, fsync, rename.
pub fn write_retry_request(
    dir: &std::path::Path,
    destination: Option<&str>,
) -> std::io::Result<std::path::PathBuf> {
    use std::io::Write;
    std::fs::create_dir_all(dir)?;
    let stamp = format!("{}-{}", now_micros(), std::process::id());
    let tmp = dir.join(format!("{stamp}.tmp"));
    let dest = dir.join(format!("{stamp}.{RETRY_EXTENSION}"));
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(retry_request(destination).as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, &dest)?;
    std::fs::File::open(dir)?.sync_all()?;
    Ok(dest)
}

impl Group<'_> {
    /// Puts entry `seq` on the forward queue of `destination`.
    pub(super) fn enqueue(&mut self, destination: &str, seq: u64) {
        self.batch
            .put_cf(self.cf_forward, queue_key(destination, seq), []);
        self.enqueued = true;
    }

    /// Plans a forwarding update; returns how many queue items it changes.
    pub(super) fn forward(&mut self, update: &ForwardUpdate) -> Result<u64, LedgerError> {
        match update {
            ForwardUpdate::Outcomes {
                destination,
                peer_ae,
                sender_ae,
                outcomes,
            } => self.outcomes(destination, peer_ae, sender_ae, outcomes),
            ForwardUpdate::DestinationError { destination, error } => {
                let mut v = self.time_micros.to_be_bytes().to_vec();
                v.extend_from_slice(error.chars().take(512).collect::<String>().as_bytes());
                self.batch
                    .put_cf(self.cf_forward, error_key(destination), v);
                Ok(0)
            }
            ForwardUpdate::Retry { destination } => self.retry(destination.as_deref()),
        }
    }

    /// Plans the final outcomes of forwarding to `destination`: a forward entry for each queue
    /// item still open, which leaves the queue (for the failed list when not delivered).
    fn outcomes(
        &mut self,
        destination: &str,
        peer_ae: &str,
        sender_ae: &str,
        outcomes: &[ForwardOutcome],
    ) -> Result<u64, LedgerError> {
        // Read everything first: a failed read leaves the batch untouched.
        let mut subjects = Vec::new();
        let mut orphans = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for o in outcomes {
            let qkey = queue_key(destination, o.seq);
            let exists = |k: &[u8]| -> Result<bool, LedgerError> {
                Ok(self
                    .db
                    .get_cf(self.cf_forward, k)
                    .map_err(read_error(self.db))?
                    .is_some())
            };
            // Settled already (by an earlier outcome, in this request, this group or
            // before): once only. A superseded item may also be a given-up one.
            let open = exists(&qkey)? || (o.superseded && exists(&failed_key(destination, o.seq))?);
            if !seen.insert(o.seq) || self.settled.contains(&qkey) || !open {
                continue;
            }
            match read_entry(self.db, o.seq) {
                Ok(Some(subject)) => subjects.push((o, subject)),
                // Nothing to copy commitments from: settled without an entry.
                Ok(None) | Err(LedgerError::Corrupt(_)) => orphans.push(o),
                Err(e) => return Err(e),
            }
        }
        let mut changed = 0;
        for o in orphans {
            tracing::error!(destination = %destination, seq = o.seq, "forward queue names an entry that is missing or unreadable; given up");
            let qkey = queue_key(destination, o.seq);
            self.batch.delete_cf(self.cf_forward, &qkey);
            self.settled.insert(qkey);
            let mut v = o.status.to_be_bytes().to_vec();
            v.extend_from_slice(b"the queued ledger entry is missing or unreadable");
            self.batch
                .put_cf(self.cf_forward, failed_key(destination, o.seq), v);
            changed += 1;
        }
        for (o, subject) in subjects {
            let (seq, prev_hash) = self.next_position();
            let entry = Entry {
                seq,
                prev_hash,
                time_micros: self.time_micros,
                event: Event::Forward,
                calling_ae: sender_ae.chars().take(64).collect(),
                subject_seq: subject.seq,
                reason: Reason::None,
                version: 0,
                status: o.status,
                peer: peer_ae.chars().take(64).collect(),
                detail: o.detail.chars().take(512).collect(),
                ..subject
            };
            // Reading tree siblings can fail: the outcomes planned so far stay (each is
            // whole), the rest stay queued and are settled by the worker's next attempt.
            if let Err(e) = self.append(&entry) {
                if changed == 0 {
                    return Err(e);
                }
                tracing::error!(error = %e, "cannot record every forward outcome of a batch");
                break;
            }
            let qkey = queue_key(destination, o.seq);
            self.batch.delete_cf(self.cf_forward, &qkey);
            self.settled.insert(qkey);
            if o.superseded {
                self.batch
                    .delete_cf(self.cf_forward, failed_key(destination, o.seq));
            } else if !o.delivered {
                let mut v = o.status.to_be_bytes().to_vec();
                v.extend_from_slice(entry.detail.as_bytes());
                self.batch
                    .put_cf(self.cf_forward, failed_key(destination, o.seq), v);
            }
            changed += 1;
        }
        Ok(changed)
    }

    /// Moves the given-up items of `destination` (of all, with `None`) back to the queue.
    fn retry(&mut self, destination: Option<&str>) -> Result<u64, LedgerError> {
        let prefix = match destination {
            Some(d) => key(b'f', d, None),
            None => vec![b'f', 0],
        };
        let mut moved = Vec::new();
        for item in self.db.iterator_cf(
            self.cf_forward,
            IteratorMode::From(&prefix, Direction::Forward),
        ) {
            let (k, _) = item.map_err(read_error(self.db))?;
            if !k.starts_with(&prefix) {
                break;
            }
            if let Some((_, dest, seq)) = split_item(&k) {
                moved.push((k.to_vec(), queue_key(dest, seq)));
            }
        }
        for (failed, queued) in &moved {
            self.batch.delete_cf(self.cf_forward, failed);
            self.batch.put_cf(self.cf_forward, queued, []);
        }
        if !moved.is_empty() {
            self.enqueued = true;
        }
        Ok(moved.len() as u64)
    }
}

impl Ledger {
    /// Up to `limit` entries queued for `destination` after entry `after`, oldest first.
    pub fn forward_pending(
        &self,
        destination: &str,
        after: u64,
        limit: usize,
    ) -> Result<Vec<u64>, LedgerError> {
        let cf = self.cf(CF_FORWARD)?;
        let prefix = key(b'q', destination, None);
        let start = queue_key(destination, after.saturating_add(1));
        let mut out = Vec::new();
        for item in self
            .inner
            .db
            .iterator_cf(cf, IteratorMode::From(&start, Direction::Forward))
        {
            let (k, _) = item.map_err(read_error(&self.inner.db))?;
            if !k.starts_with(&prefix) || out.len() >= limit {
                break;
            }
            if let Some((_, _, seq)) = split_item(&k) {
                out.push(seq);
            }
        }
        Ok(out)
    }

    /// Given-up items of `destination`: (entry, status, detail), oldest first.
    pub fn forward_failed(
        &self,
        destination: &str,
    ) -> Result<Vec<(u64, u16, String)>, LedgerError> {
        let cf = self.cf(CF_FORWARD)?;
        let prefix = key(b'f', destination, None);
        let mut out = Vec::new();
        for item in self
            .inner
            .db
            .iterator_cf(cf, IteratorMode::From(&prefix, Direction::Forward))
        {
            let (k, v) = item.map_err(read_error(&self.inner.db))?;
            if !k.starts_with(&prefix) {
                break;
            }
            let mut r = Reader::new(&v);
            if let (Some((_, _, seq)), Ok(status)) = (split_item(&k), r.u16()) {
                out.push((seq, status, String::from_utf8_lossy(r.rest()).into_owned()));
            }
        }
        Ok(out)
    }

    /// The queue of every destination that has or had items or errors.
    pub fn forward_summary(&self) -> Result<BTreeMap<String, ForwardSummary>, LedgerError> {
        let cf = self.cf(CF_FORWARD)?;
        let mut out: BTreeMap<String, ForwardSummary> = BTreeMap::new();
        for item in self.inner.db.iterator_cf(cf, IteratorMode::Start) {
            let (k, v) = item.map_err(read_error(&self.inner.db))?;
            if k.first() == Some(&b'e') {
                let dest = String::from_utf8_lossy(&k[2..]).into_owned();
                let mut r = Reader::new(&v);
                if let Ok(t) = r.u64() {
                    out.entry(dest).or_default().last_error =
                        Some((t as i64, String::from_utf8_lossy(r.rest()).into_owned()));
                }
                continue;
            }
            let Some((kind, dest, seq)) = split_item(&k) else {
                continue;
            };
            let s = out.entry(dest.to_string()).or_default();
            match kind {
                b'q' => {
                    s.pending += 1;
                    if s.oldest_pending.is_none() {
                        let time = self
                            .entry(seq)
                            .ok()
                            .flatten()
                            .map(|e| e.time_micros)
                            .unwrap_or(0);
                        s.oldest_pending = Some((seq, time));
                    }
                }
                b'f' => s.failed += 1,
                _ => {}
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::test_support::*;

    #[test]
    fn item_keys_split_back() {
        let k = queue_key("pacs", 258);
        assert_eq!(split_item(&k), Some((b'q', "pacs", 258)));
        assert_eq!(split_item(&failed_key("a", 1)), Some((b'f', "a", 1)));
        assert_eq!(split_item(b"q\0"), None);
        // A destination is never a prefix of another's keys.
        assert!(!queue_key("pacs2", 1).starts_with(&key(b'q', "pacs", None)));
    }

    #[test]
    fn retry_requests_round_trip() {
        assert_eq!(parse_retry_request(&retry_request(None)), Some(None));
        assert_eq!(
            parse_retry_request(&retry_request(Some("pacs"))),
            Some(Some("pacs".into()))
        );
        assert_eq!(parse_retry_request("nonsense"), None);
        assert_eq!(parse_retry_request("destination=\n"), None);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn forward_queue_is_written_with_the_entry_and_settled_once() {
        let dir = tempfile::tempdir().unwrap();
        let spool = dir.path().join("spool");
        let ledger = Ledger::open_with(&dir.path().join("l"), None, Some(spool.clone())).unwrap();
        let queued = |sop: &str, key: u8| {
            let mut r = request(sop, "1.2", key);
            r.forward_to = vec!["pacs".into(), "backup".into()];
            r
        };
        assert_eq!(
            ledger.store(queued("1.2.3", 1)).await.unwrap(),
            StoreOutcome::Stored { seq: 1, version: 1 }
        );
        ledger.store(queued("1.2.4", 2)).await.unwrap();
        // An identical re-send is a duplicate: stored once, forwarded once.
        assert!(matches!(
            ledger.store(queued("1.2.4", 2)).await.unwrap(),
            StoreOutcome::Duplicate { .. }
        ));
        // A new version is queued as well.
        ledger.store(queued("1.2.3", 3)).await.unwrap();
        assert_eq!(
            ledger.forward_pending("pacs", 0, 10).unwrap(),
            vec![1, 2, 3]
        );
        assert_eq!(ledger.forward_pending("pacs", 0, 2).unwrap(), vec![1, 2]);
        assert_eq!(
            ledger.forward_pending("backup", 0, 10).unwrap(),
            vec![1, 2, 3]
        );
        assert!(ledger.forward_pending("pac", 0, 10).unwrap().is_empty());

        let outcomes = |v: Vec<(u64, bool, u16)>| ForwardUpdate::Outcomes {
            destination: "pacs".into(),
            peer_ae: "PACS_AE".into(),
            sender_ae: "DICOMCHAIN".into(),
            outcomes: v
                .into_iter()
                .map(|(seq, delivered, status)| ForwardOutcome {
                    seq,
                    delivered,
                    superseded: false,
                    status,
                    detail: if delivered {
                        String::new()
                    } else {
                        "refused".into()
                    },
                })
                .collect(),
        };
        let n = ledger
            .forward(outcomes(vec![
                (1, true, 0),
                (3, false, 0xA700),
                (1, true, 0),
            ]))
            .await
            .unwrap();
        assert_eq!(n, 2);
        assert_eq!(ledger.forward_pending("pacs", 0, 10).unwrap(), vec![2]);
        assert_eq!(
            ledger.forward_failed("pacs").unwrap(),
            vec![(3, 0xA700, "refused".to_string())]
        );
        // Settled items are settled once: a late duplicate outcome changes nothing.
        assert_eq!(
            ledger.forward(outcomes(vec![(1, true, 0)])).await.unwrap(),
            0
        );
        let (e5, e6) = (
            ledger.entry(4).unwrap().unwrap(),
            ledger.entry(5).unwrap().unwrap(),
        );
        assert_eq!(ledger.len().unwrap(), 5);
        assert_eq!(
            (e5.event, e5.subject_seq, e5.status),
            (Event::Forward, 1, 0)
        );
        assert_eq!(e5.peer, "PACS_AE");
        assert_eq!(
            e5.instance_key,
            ledger.entry(1).unwrap().unwrap().instance_key
        );
        assert_eq!((e6.subject_seq, e6.status), (3, 0xA700));
        assert_eq!(e6.prev_hash, e5.hash());

        ledger
            .forward(ForwardUpdate::DestinationError {
                destination: "backup".into(),
                error: "connection refused".into(),
            })
            .await
            .unwrap();
        let summary = ledger.forward_summary().unwrap();
        assert_eq!(summary["pacs"].pending, 1);
        assert_eq!(summary["pacs"].failed, 1);
        assert_eq!(summary["pacs"].oldest_pending.map(|o| o.0), Some(2));
        assert_eq!(summary["backup"].pending, 3);
        assert_eq!(
            summary["backup"].last_error.as_ref().map(|e| e.1.as_str()),
            Some("connection refused")
        );

        // A retry request left in the spool (by `forward retry`) re-queues the given-up item.
        crate::ledger::forward::write_retry_request(&spool, Some("pacs")).unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while ledger.forward_pending("pacs", 0, 10).unwrap() != vec![2, 3] {
            assert!(
                std::time::Instant::now() < deadline,
                "retry request not applied"
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        assert!(ledger.forward_failed("pacs").unwrap().is_empty());
        assert_eq!(ledger.forward_pending("pacs", 2, 10).unwrap(), vec![3]);
        // Superseded items (a newer version was delivered) settle whether queued or given up.
        let superseded = |seq: u64| ForwardUpdate::Outcomes {
            destination: "pacs".into(),
            peer_ae: "PACS_AE".into(),
            sender_ae: "DICOMCHAIN".into(),
            outcomes: vec![ForwardOutcome {
                seq,
                delivered: false,
                superseded: true,
                status: 0,
                detail: "not sent: superseded".into(),
            }],
        };
        assert_eq!(
            ledger
                .forward(outcomes(vec![(2, false, 0xA700)]))
                .await
                .unwrap(),
            1
        );
        assert_eq!(ledger.forward(superseded(2)).await.unwrap(), 1);
        assert_eq!(ledger.forward(superseded(3)).await.unwrap(), 1);
        assert_eq!(ledger.forward(superseded(3)).await.unwrap(), 0);
        assert!(ledger.forward_failed("pacs").unwrap().is_empty());
        assert!(ledger.forward_pending("pacs", 0, 10).unwrap().is_empty());
        let last = ledger.entry(ledger.len().unwrap()).unwrap().unwrap();
        assert_eq!(
            (last.event, last.subject_seq, last.status),
            (Event::Forward, 3, 0)
        );
        assert_eq!(last.detail, "not sent: superseded");
        ledger.close();
        drop(ledger);
        // The queue survives a restart.
        let ledger = Ledger::open(&dir.path().join("l")).unwrap();
        assert!(ledger.forward_pending("pacs", 0, 10).unwrap().is_empty());
        assert_eq!(
            ledger.forward_pending("backup", 0, 10).unwrap(),
            vec![1, 2, 3]
        );
    }
}
