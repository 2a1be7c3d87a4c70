//! C-MOVE and C-GET as SCP: what each adds to the sub-operation driver of
//! [`super::suboperations`]. C-MOVE sends over an association it opens to the move destination
//! (PS3.4 C.4.2.3); C-GET sends by C-STORE over the requesting association, on the storage
//! contexts the requestor offered to receive on (SCP role, PS3.4 C.4.3.3).

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};
use tracing::{info, warn};

use super::qr::{message, Outgoing, Request, Services};
use super::suboperations::{resolve, Counts, Operation, Recipient, Retrieval, Sent};
use crate::acl::Permission;
use crate::archive::outbound::{
    self, Accepted, Body, Outbound, Placed, Ready, SendError, RESPONSE_TIMEOUT,
};
use crate::config::PeerConfig;
use crate::dimse::command::{field, store_rq, tag, Command};
use crate::dimse::scu::{CheckFailure, Scu};
use crate::dimse::status::{self, Failure};
use crate::query::matching;

/// C-MOVE: resolve, open an association to the destination, send every instance by C-STORE.
pub async fn run_move(
    services: Services,
    req: Request,
    destination: String,
    q: matching::Query,
    cancel: Arc<AtomicBool>,
    out: mpsc::Sender<Outgoing>,
) {
    let peer = services
        .peers
        .iter()
        .find(|p| p.ae_title.trim() == destination.trim())
        .cloned();
    let op = Operation {
        command_field: field::C_MOVE_RSP,
        detector: "c-move",
        permission: Permission::Move,
        parties: vec![(req.calling_ae.clone(), "requester")],
    };
    let mut retrieval = Retrieval::start(services, req, op, cancel, out);
    let Some(peer) = peer else {
        info!(destination = %destination, "C-MOVE to an unknown destination refused");
        let f = Failure::new(status::MOVE_DESTINATION_UNKNOWN, "move destination unknown");
        return retrieval.refuse(&Counts::default(), Some(f)).await;
    };
    retrieval
        .op
        .parties
        .push((peer.ae_title.clone(), "destination"));
    let uids = match resolve(&retrieval.services, q, &retrieval.cancel).await {
        Ok(u) => u,
        Err(f) => return retrieval.refuse(&Counts::default(), Some(f)).await,
    };
    if uids.is_empty() {
        return retrieval.refuse(&Counts::default(), None).await;
    }
    let outbound = retrieval.services.outbound();
    let pairs = stored_pairs(&outbound, &uids);
    let scu = match outbound.connect(&peer, &pairs).await {
        Ok(s) => s,
        Err(e) => {
            warn!(destination = %peer.ae_title, error = %e, "cannot open the association for C-MOVE");
            let f = Failure::new(
                status::UNABLE_TO_PERFORM_SUBOPERATIONS,
                "cannot reach the move destination",
            );
            return retrieval.refuse(&Counts::all_failed(&uids), Some(f)).await;
        }
    };
    let destination = Destination {
        originator: (retrieval.req.calling_ae.clone(), retrieval.req.message_id),
        outbound,
        peer,
        pairs,
        scu: Some(scu),
    };
    retrieval.drive(uids, destination).await;
}

/// The (SOP class, stored syntax) pairs of the latest versions of `uids`, each once.
fn stored_pairs(outbound: &Outbound, uids: &[String]) -> Vec<(String, String)> {
    let mut pairs: Vec<(String, String)> = Vec::new();
    for uid in uids {
        if let Ok(Some(e)) = outbound.ledger.latest(uid) {
            let pair = (e.sop_class_uid.clone(), e.transfer_syntax.clone());
            if !pairs.contains(&pair) {
                pairs.push(pair);
            }
        }
    }
    pairs
}

/// A C-MOVE's destination, over an association we open to it.
struct Destination {
    outbound: Outbound,
    peer: PeerConfig,
    /// What the association proposes contexts for.
    pairs: Vec<(String, String)>,
    /// `None` after the destination aborted or an instance failed mid-way.
    scu: Option<Scu>,
    /// The Move Originator AE Title and Message ID of every sub-operation.
    originator: (String, u16),
}

impl Recipient for Destination {
    /// A destination that aborted (it may refuse one instance that way) gets a new association
    /// for the rest.
    async fn reach(&mut self) -> bool {
        if self.scu.is_some() {
            return true;
        }
        match self.outbound.connect(&self.peer, &self.pairs).await {
            Ok(s) => {
                self.scu = Some(s);
                true
            }
            Err(e) => {
                warn!(destination = %self.peer.ae_title, error = %e, "cannot reopen the association for C-MOVE");
                false
            }
        }
    }

    async fn send(&mut self, instance: Ready) -> Sent {
        let Some(scu) = self.scu.as_mut() else {
            return Sent::Gone;
        };
        let contexts = outbound::accepted(scu);
        let originator = Some((self.originator.0.as_str(), self.originator.1));
        match outbound::send(scu, &contexts, instance, originator).await {
            Ok(code) => Sent::Status(code),
            Err(SendError::NoContext(why)) => {
                info!(reason = %why, "sub-operation not performed");
                Sent::Failed
            }
            Err(e) => {
                warn!(destination = %self.peer.ae_title, error = %e, "C-MOVE destination failed on an instance; association aborted");
                if let Some(s) = self.scu.take() {
                    s.abort().await;
                }
                Sent::Failed
            }
        }
    }

    async fn finish(self, counts: &Counts, started: Instant) {
        if let Some(s) = self.scu {
            s.release(Duration::from_secs(10)).await;
        }
        info!(
            destination = %self.peer.ae_title,
            completed = counts.completed,
            failed = counts.failed,
            warning = counts.warning,
            ms = started.elapsed().as_millis() as u64,
            "C-MOVE done"
        );
    }
}

/// C-GET: resolve, then send every instance by C-STORE over the requesting association, on the
/// storage contexts the requestor offered to receive on (SCP role). `replies` brings the
/// requestor's C-STORE responses.
pub async fn run_get(
    services: Services,
    req: Request,
    q: matching::Query,
    contexts: Vec<Accepted>,
    cancel: Arc<AtomicBool>,
    out: mpsc::Sender<Outgoing>,
    replies: mpsc::Receiver<Command>,
) {
    let op = Operation {
        command_field: field::C_GET_RSP,
        detector: "c-get",
        permission: Permission::Get,
        parties: vec![(req.calling_ae.clone(), "requester")],
    };
    let retrieval = Retrieval::start(services, req, op, cancel, out);
    let uids = match resolve(&retrieval.services, q, &retrieval.cancel).await {
        Ok(u) => u,
        Err(f) => return retrieval.refuse(&Counts::default(), Some(f)).await,
    };
    let requestor = Requestor {
        out: retrieval.out.clone(),
        replies,
        contexts,
        message_id: 1,
    };
    retrieval.drive(uids, requestor).await;
}

/// Why a C-STORE sub-operation over the requesting association failed; the association is
/// then no use for the rest.
#[derive(Debug, thiserror::Error)]
enum RequestorError {
    #[error("association closed")]
    Closed,
    #[error("no C-STORE response within {0:?}")]
    Timeout(Duration),
    #[error("C-STORE-RSP without status")]
    NoStatus,
    #[error("instance failed its ledger check while streaming")]
    Check,
}

/// A C-GET's requestor, sent to over its own association through the association loop.
struct Requestor {
    out: mpsc::Sender<Outgoing>,
    /// The requestor's C-STORE responses.
    replies: mpsc::Receiver<Command>,
    /// The storage contexts it accepted the SCP role on.
    contexts: Vec<Accepted>,
    message_id: u16,
}

impl Recipient for Requestor {
    async fn reach(&mut self) -> bool {
        true
    }

    async fn send(&mut self, instance: Ready) -> Sent {
        let id = self.message_id;
        self.message_id = self.message_id.wrapping_add(1).max(1);
        let placed = match outbound::place(instance, &self.contexts) {
            Ok(p) => p,
            Err(e) => {
                info!(reason = %e, "sub-operation not performed");
                return Sent::Failed;
            }
        };
        match self.store(placed, id).await {
            Ok(code) => Sent::Status(code),
            Err(e) => {
                warn!(error = %e, "C-GET sub-operation failed");
                Sent::Gone
            }
        }
    }

    async fn finish(self, counts: &Counts, started: Instant) {
        info!(
            completed = counts.completed,
            failed = counts.failed,
            warning = counts.warning,
            ms = started.elapsed().as_millis() as u64,
            "C-GET done"
        );
    }
}

impl Requestor {
    /// Sends one C-STORE-RQ as message `id` and waits for its response.
    async fn store(&mut self, placed: Placed, id: u16) -> Result<u16, RequestorError> {
        let ctx = placed.context_id;
        let command = store_rq(&placed.sop_class_uid, &placed.uid, id, None);
        match placed.body {
            Body::Whole(bytes) => put(&self.out, message(ctx, command, Some(bytes), false)).await?,
            Body::Stream {
                mut chunks,
                verified,
            } => self.stream(ctx, command, &mut chunks, verified).await?,
        }
        self.store_response(id).await
    }

    /// A streamed instance: pieces go out as they are rebuilt, the last one only once the
    /// check passed; a failed check aborts the association.
    async fn stream(
        &self,
        ctx: u8,
        command: Vec<u8>,
        chunks: &mut mpsc::Receiver<Vec<u8>>,
        verified: oneshot::Receiver<Result<(), CheckFailure>>,
    ) -> Result<(), RequestorError> {
        let out = &self.out;
        put(
            out,
            Outgoing::Command {
                context_id: ctx,
                command,
            },
        )
        .await?;
        let mut held: Option<Vec<u8>> = None;
        while let Some(chunk) = chunks.recv().await {
            if let Some(prev) = held.replace(chunk) {
                put(
                    out,
                    Outgoing::Data {
                        context_id: ctx,
                        bytes: prev,
                        last: false,
                    },
                )
                .await?;
            }
        }
        match verified.await {
            Ok(Ok(())) => {
                put(
                    out,
                    Outgoing::Data {
                        context_id: ctx,
                        bytes: held.unwrap_or_default(),
                        last: true,
                    },
                )
                .await
            }
            Ok(Err(_)) | Err(_) => {
                let why = RequestorError::Check;
                let _ = out.send(Outgoing::Abort(why.to_string())).await;
                Err(why)
            }
        }
    }

    /// Waits for the requestor's C-STORE-RSP to message `id`.
    async fn store_response(&mut self, id: u16) -> Result<u16, RequestorError> {
        let wait = async {
            loop {
                let Some(rsp) = self.replies.recv().await else {
                    return Err(RequestorError::Closed);
                };
                let responds_to = rsp
                    .u16(tag::MESSAGE_ID_BEING_RESPONDED_TO, "id")
                    .ok()
                    .flatten();
                if responds_to == Some(id) {
                    return rsp
                        .u16(tag::STATUS, "Status")
                        .ok()
                        .flatten()
                        .ok_or(RequestorError::NoStatus);
                }
            }
        };
        tokio::time::timeout(RESPONSE_TIMEOUT, wait)
            .await
            .unwrap_or(Err(RequestorError::Timeout(RESPONSE_TIMEOUT)))
    }
}

/// Hands the association loop one message; it is gone when the association closed.
async fn put(out: &mpsc::Sender<Outgoing>, m: Outgoing) -> Result<(), RequestorError> {
    out.send(m).await.map_err(|_| RequestorError::Closed)
}
