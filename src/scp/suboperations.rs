//! The sub-operation driver of C-MOVE and C-GET (PS3.4 C.4.2, C.4.3): the identifier resolved
//! to instances, each rebuilt and checked ([`crate::archive::outbound`]) and handed to a
//! [`Recipient`] that sends it, the counts (remaining, completed, failed, warning) kept and
//! reported in a pending response after each sub-operation, C-CANCEL and permission revocation
//! honoured between them, and the final response with the Failed SOP Instance UID List.
//!
//! The next instance is rebuilt while the current one is sent, and at most [`PREFETCH`]
//! instances wait in memory, so a study of any size streams through a few instances' worth of
//! memory.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::mpsc;
use tracing::info;

use super::qr::{message, Outgoing, Request, Services, DATA_SET_PRESENT};
use crate::acl::Permission;
use crate::archive::outbound::{Outbound, Ready, Requester};
use crate::dimse::command::{tag, CommandBuilder, NO_DATA_SET};
use crate::dimse::status::{self, Failure};
use crate::query::{self, dataset, matching};

/// Instances rebuilt ahead of the one being sent.
const PREFETCH: usize = 1;

/// Sub-operation counts (PS3.4 C.4.2.1.6).
#[derive(Default, Clone)]
pub(super) struct Counts {
    pub remaining: u16,
    pub completed: u16,
    pub failed: u16,
    pub warning: u16,
    failed_uids: Vec<String>,
    /// Sub-operations done so far, uncapped (the counts above saturate at 65 535).
    attempted: usize,
}

impl Counts {
    fn put(&self, b: CommandBuilder, remaining: bool) -> CommandBuilder {
        let b = if remaining {
            b.u16(tag::REMAINING_SUBOPERATIONS, self.remaining)
        } else {
            b
        };
        b.u16(tag::COMPLETED_SUBOPERATIONS, self.completed)
            .u16(tag::FAILED_SUBOPERATIONS, self.failed)
            .u16(tag::WARNING_SUBOPERATIONS, self.warning)
    }

    /// Every one of `uids` failed (none could be attempted).
    pub fn all_failed(uids: &[String]) -> Counts {
        let mut counts = Counts::default();
        for uid in uids {
            counts.fail(uid);
        }
        counts
    }

    /// Ends a retrieval that was not cancelled: whatever was not attempted (a destination
    /// that went away, a requestor that left) counts as failed.
    fn close(&mut self, uids: &[String], cancelled: bool) {
        if cancelled {
            return;
        }
        for uid in uids.iter().skip(self.attempted) {
            self.fail(uid);
        }
        self.remaining = 0;
    }

    fn fail(&mut self, uid: &str) {
        self.failed = self.failed.saturating_add(1);
        self.failed_uids.push(uid.to_string());
        self.attempted += 1;
    }

    /// Counts a sub-operation the recipient answered with C-STORE status `code`.
    fn tally(&mut self, uid: &str, code: u16) {
        match code {
            status::SUCCESS => {
                self.completed = self.completed.saturating_add(1);
                self.attempted += 1;
            }
            c if status::store_kept(c) => {
                self.warning = self.warning.saturating_add(1);
                self.attempted += 1;
            }
            _ => self.fail(uid),
        }
    }
}

/// What became of one sub-operation.
pub(super) enum Sent {
    /// The recipient answered its C-STORE with this status.
    Status(u16),
    /// Not performed or refused; the next one is tried.
    Failed,
    /// The recipient is gone: this and the remaining sub-operations fail.
    Gone,
}

/// Where a retrieval's instances go, and how: over an association to the move destination
/// (C-MOVE) or by C-STORE on the requesting association (C-GET).
pub(super) trait Recipient {
    /// Gets ready for the next sub-operation; `false` when the recipient cannot be reached any
    /// more (the retrieval ends).
    async fn reach(&mut self) -> bool;

    /// Sends one checked instance.
    async fn send(&mut self, instance: Ready) -> Sent;

    /// After the last sub-operation: closes what the recipient opened and logs the outcome.
    async fn finish(self, counts: &Counts, started: Instant);
}

/// What distinguishes one retrieval operation to the driver.
pub(super) struct Operation {
    /// The response's command field (C-MOVE-RSP or C-GET-RSP).
    pub command_field: u16,
    /// Names the operation in security events (`c-move`, `c-get`).
    pub detector: &'static str,
    /// The permission checked again before every sub-operation, of these AEs (AE title, role).
    pub permission: Permission,
    pub parties: Vec<(String, &'static str)>,
}

/// Everything a retrieval's driver works with.
pub(super) struct Retrieval {
    pub services: Services,
    pub req: Request,
    pub op: Operation,
    pub cancel: Arc<AtomicBool>,
    pub out: mpsc::Sender<Outgoing>,
    pub started: Instant,
}

impl Retrieval {
    /// An operation starting now.
    pub fn start(
        services: Services,
        req: Request,
        op: Operation,
        cancel: Arc<AtomicBool>,
        out: mpsc::Sender<Outgoing>,
    ) -> Retrieval {
        Retrieval {
            services,
            req,
            op,
            cancel,
            out,
            started: Instant::now(),
        }
    }

    /// Ends the operation with a final response and no sub-operations.
    pub async fn refuse(&self, counts: &Counts, failure: Option<Failure>) {
        let rsp = self.final_response(counts, false, failure);
        let _ = self.out.send(rsp).await;
    }

    /// Sends every one of `uids` to `recipient`, one sub-operation each, then the final
    /// response.
    pub async fn drive(self, uids: Vec<String>, mut recipient: impl Recipient) {
        let mut counts = Counts {
            remaining: uids.len().min(u16::MAX as usize) as u16,
            ..Counts::default()
        };
        let requester = self.req.requester(self.op.detector);
        let outbound = self.services.outbound();
        let mut ready = prefetch(outbound, uids.clone(), requester, self.cancel.clone());
        let mut gone = false;
        let mut revoked = None;
        while let Some((uid, instance)) = ready.recv().await {
            if self.cancel.load(Ordering::Relaxed) {
                break;
            }
            revoked = self.revocation();
            if revoked.is_some() {
                break;
            }
            counts.remaining = counts.remaining.saturating_sub(1);
            if !recipient.reach().await {
                counts.fail(&uid);
                gone = true;
                break;
            }
            match instance {
                None => counts.fail(&uid),
                Some(r) => match recipient.send(r).await {
                    Sent::Status(code) => counts.tally(&uid, code),
                    Sent::Failed => counts.fail(&uid),
                    Sent::Gone => {
                        counts.fail(&uid);
                        gone = true;
                        break;
                    }
                },
            }
            if self.out.send(self.pending(&counts)).await.is_err() {
                gone = true;
                break;
            }
        }
        let cancelled = self.cancel.load(Ordering::Relaxed) && !gone;
        counts.close(&uids, cancelled);
        recipient.finish(&counts, self.started).await;
        let rsp = self.final_response(&counts, cancelled, revoked);
        let _ = self.out.send(rsp).await;
    }

    /// Checked before every sub-operation: a failure (0124) when one of the parties lost the
    /// permission since the retrieval started; the remaining sub-operations are then not
    /// performed.
    fn revocation(&self) -> Option<Failure> {
        let what = self.op.permission;
        let (ae, role) = self
            .op
            .parties
            .iter()
            .find(|(ae, _)| !self.services.acl.allows(ae, what))?;
        info!(ae = %ae, role, permission = what.name(), "retrieval stopped: permission revoked");
        Some(Failure::new(
            status::NOT_AUTHORIZED,
            format!("permission {} of the {role} {ae} was revoked", what.name()),
        ))
    }

    fn pending(&self, counts: &Counts) -> Outgoing {
        let b = self
            .req
            .response(self.op.command_field)
            .u16(tag::STATUS, status::PENDING)
            .u16(tag::COMMAND_DATA_SET_TYPE, NO_DATA_SET);
        message(
            self.req.context_id,
            counts.put(b, true).encode(),
            None,
            false,
        )
    }

    /// The final response, with the Failed SOP Instance UID List when needed.
    fn final_response(
        &self,
        counts: &Counts,
        cancelled: bool,
        refused: Option<Failure>,
    ) -> Outgoing {
        let (code, comment) = final_status(counts, cancelled, refused);
        let mut b = self.req.response(self.op.command_field);
        if let Some(c) = comment {
            b = b.text(tag::ERROR_COMMENT, &c, status::ERROR_COMMENT_MAX);
        }
        b = counts.put(b.u16(tag::STATUS, code), cancelled);
        let data = (!counts.failed_uids.is_empty() && code != status::SUCCESS)
            .then(|| failed_uid_list(&counts.failed_uids, self.req.encoding));
        let data_set_type = if data.is_some() {
            DATA_SET_PRESENT
        } else {
            NO_DATA_SET
        };
        b = b.u16(tag::COMMAND_DATA_SET_TYPE, data_set_type);
        message(self.req.context_id, b.encode(), data, true)
    }
}

/// The status of a final response, and its error comment: the refusal if there is one, else
/// from how the sub-operations went.
fn final_status(
    counts: &Counts,
    cancelled: bool,
    refused: Option<Failure>,
) -> (u16, Option<String>) {
    match (refused, cancelled) {
        (Some(f), _) => (f.status, Some(f.comment)),
        (None, true) => (status::CANCEL, None),
        // Every sub-operation failed: a failure, not a warning (PS3.4 C.4.2.1.5).
        (None, false) if counts.failed > 0 && counts.completed == 0 && counts.warning == 0 => (
            status::UNABLE_TO_PERFORM_SUBOPERATIONS,
            Some("no sub-operation succeeded".into()),
        ),
        (None, false) if counts.failed > 0 || counts.warning > 0 => {
            (status::SUBOPERATIONS_FAILED, None)
        }
        (None, false) => (status::SUCCESS, None),
    }
}

/// A data set of one Failed SOP Instance UID List (0008,0058) holding as many of `uids` as fit:
/// a UI value has a 2-byte length in explicit VR.
fn failed_uid_list(uids: &[String], encoding: crate::split::Encoding) -> Vec<u8> {
    let mut list = String::new();
    for uid in uids {
        if list.len() + uid.len() + 1 > 0xFFF0 {
            break;
        }
        if !list.is_empty() {
            list.push('\\');
        }
        list.push_str(uid);
    }
    let el = dataset::Element {
        tag: 0x0008_0058,
        vr: *b"UI",
        value: dataset::Value::Bytes(crate::dicom::padded(b"UI", list.as_bytes()).into()),
    };
    let mut out = Vec::new();
    dataset::write(&[el], encoding, &mut out);
    out
}

/// Rebuilds `uids` in order on a separate task, at most [`PREFETCH`] ahead of the sender.
fn prefetch(
    outbound: Outbound,
    uids: Vec<String>,
    requester: Requester,
    cancel: Arc<AtomicBool>,
) -> mpsc::Receiver<(String, Option<Ready>)> {
    let (tx, rx) = mpsc::channel(PREFETCH);
    tokio::spawn(async move {
        for uid in uids {
            if cancel.load(Ordering::Relaxed) {
                break;
            }
            let ready = outbound.prepare(&uid, &requester).await;
            if tx.send((uid, ready)).await.is_err() {
                break;
            }
        }
    });
    rx
}

/// Resolves the identifier to the instances to send (blocking ledger reads).
pub(super) async fn resolve(
    services: &Services,
    q: matching::Query,
    cancel: &Arc<AtomicBool>,
) -> Result<Vec<String>, Failure> {
    let ledger = services.ledger.clone();
    let cancel = cancel.clone();
    match tokio::task::spawn_blocking(move || query::instances(&ledger, &q, &cancel)).await {
        Ok(Ok(uids)) => Ok(uids),
        Ok(Err(e)) => Err(super::status::find_error(&e)),
        Err(e) => Err(Failure::new(
            status::UNABLE_TO_PROCESS,
            format!("query failed: {e}"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn uids(n: usize) -> Vec<String> {
        (1..=n).map(|i| format!("1.2.3.{i}")).collect()
    }

    #[test]
    fn what_was_not_attempted_fails_unless_cancelled() {
        let all = uids(4);
        let mut counts = Counts {
            remaining: 4,
            ..Counts::default()
        };
        counts.tally(&all[0], status::SUCCESS);
        counts.tally(&all[1], 0xB007);
        counts.remaining = 2;
        let mut cancelled = counts.clone();
        cancelled.close(&all, true);
        assert_eq!((cancelled.remaining, cancelled.failed), (2, 0));
        counts.close(&all, false);
        assert_eq!(
            (
                counts.remaining,
                counts.completed,
                counts.warning,
                counts.failed
            ),
            (0, 1, 1, 2)
        );
        assert_eq!(counts.failed_uids, all[2..].to_vec());
    }

    #[test]
    fn a_refused_status_is_a_failure() {
        let mut counts = Counts::default();
        counts.tally("1.2", 0xA700);
        assert_eq!((counts.failed, counts.completed), (1, 0));
        assert_eq!(counts.failed_uids, vec!["1.2".to_string()]);
    }

    #[test]
    fn the_final_status_follows_the_sub_operations() {
        let ok = Counts {
            completed: 2,
            ..Counts::default()
        };
        assert_eq!(final_status(&ok, false, None), (status::SUCCESS, None));
        let all_failed = Counts::all_failed(&uids(2));
        let (code, comment) = final_status(&all_failed, false, None);
        assert_eq!(code, status::UNABLE_TO_PERFORM_SUBOPERATIONS);
        assert!(comment.is_some());
        let mut some_failed = Counts::all_failed(&uids(1));
        some_failed.tally("1.9", status::SUCCESS);
        assert_eq!(
            final_status(&some_failed, false, None).0,
            status::SUBOPERATIONS_FAILED
        );
        assert_eq!(final_status(&some_failed, true, None).0, status::CANCEL);
        let refused = Failure::new(status::MOVE_DESTINATION_UNKNOWN, "unknown");
        assert_eq!(
            final_status(&ok, true, Some(refused)),
            (status::MOVE_DESTINATION_UNKNOWN, Some("unknown".into()))
        );
    }
}
