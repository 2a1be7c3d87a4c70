//! One association from A-ASSOCIATE-AC to release (the request is answered in
//! [`establish`](super::establish)): the DIMSE message loop.
//!
//! Messages are assembled from P-DATA PDVs (PS3.8 §9.3.5, PS3.7 §8.2): command fragments are
//! collected (they are small and bounded), data set fragments are streamed straight into the
//! ingest pipeline as they arrive — never buffered whole. A failed C-STORE keeps reading its data
//! set to the last fragment and then answers with a failure status, so the association stays
//! usable. Protocol violations (PDV on an unknown context, data without command, oversized PDU)
//! end the association with an A-ABORT.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use dicom_ul::pdu::{AbortRQServiceProviderReason, PDataValueType, Pdu};
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn, Instrument};

use crate::dimse::admission::{Pending, Slot};
use crate::dimse::command::{field, tag, Command, CommandBuilder, NO_DATA_SET};
use crate::dimse::connection::{pdu_name, ConnError, Connection, PData, Pdv, Received};
use super::context::NodeContext;
use super::establish::{self, Request};
use crate::dimse::negotiate::{self, Negotiated, VERIFICATION};
use super::qr::{self, Outgoing};
use crate::dimse::status::{self, Failure};
use crate::acl::Permission;
use crate::query::{dataset, matching, FindOptions};
use crate::archive::ingest::{Incoming, StoreContext};
use crate::ledger::trail::{self, AuditRecord};
use crate::ledger::StoreOutcome;
use crate::split::Encoding;

/// Most bytes of command fragments we collect for one command set.
const MAX_COMMAND_BYTES: usize = 64 * 1024;
/// Most bytes of a C-FIND identifier.
const MAX_IDENTIFIER_BYTES: usize = 1024 * 1024;
/// Messages a running operation may have ready before the association sends them.
const OP_QUEUE: usize = 16;
/// While an operation runs, the requestor may stay silent as long as it takes.
const OP_WAIT: Duration = Duration::from_secs(24 * 3600);


impl crate::dimse::listener::Services for NodeContext {
    type Request = Request;

    fn admission(&self) -> &crate::dimse::admission::Admission {
        &self.admission
    }

    fn artim_timeout(&self) -> std::time::Duration {
        self.node.artim_timeout()
    }

    fn drain_timeout(&self) -> std::time::Duration {
        self.node.drain_timeout()
    }

    fn warn_allowed(&self, ip: std::net::IpAddr) -> Option<u64> {
        self.warnings.allow(ip, std::time::Instant::now())
    }

    async fn receive(
        &self,
        secured: crate::dimse::listener::Secured,
        addr: std::net::SocketAddr,
        deadline: tokio::time::Instant,
    ) -> Option<Request> {
        establish::receive_association_request(secured, addr, self, deadline).await
    }

    async fn serve(
        self: std::sync::Arc<Self>,
        request: Request,
        pending: crate::dimse::admission::Pending,
        stop: tokio::sync::watch::Receiver<bool>,
    ) {
        serve(request, pending, self, stop).await
    }

    fn flush_rejections(&self, all: bool) {
        establish::flush_rejections(self, all)
    }
}

/// Answers an association request and, when it is accepted, serves the association to the
/// end. `pending` is the connection's place in the pending pool: given up for an association
/// slot once the request is accepted. `shutdown` turns true when the node stops: the
/// association then finishes the message in progress and is aborted.
pub async fn serve(
    request: Request,
    pending: Pending,
    ctx: Arc<NodeContext>,
    shutdown: watch::Receiver<bool>,
) {
    static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    let id = NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let peer = request.addr.to_string();
    let span = tracing::info_span!("association", id, peer = %peer, tls = request.tls.is_some(), calling = tracing::field::Empty, called = tracing::field::Empty);
    async move {
        let Some((conn, negotiated, slot)) = establish::accept(request, &ctx).await else {
            return;
        };
        // The association holds its slot now; its place among pending connections is free.
        drop(pending);
        let metrics = crate::ops::metrics::global();
        metrics.associations_total.fetch_add(1, Relaxed);
        metrics.associations_open.fetch_add(1, Relaxed);
        /// Counts the association as open until it ends, however it ends.
        struct Open;
        impl Drop for Open {
            fn drop(&mut self) {
                crate::ops::metrics::global()
                    .associations_open
                    .fetch_sub(1, Relaxed);
            }
        }
        let _open = Open;
        tracing::Span::current().record("calling", negotiated.calling_ae.as_str());
        tracing::Span::current().record("called", negotiated.called_ae.as_str());
        info!(contexts = negotiated.contexts.len(), "association accepted");
        let assoc = Association {
            conn,
            ctx,
            slot,
            peer: peer.clone(),
            negotiated,
            state: State::Idle,
            stored: 0,
            failed: 0,
        };
        assoc.run(shutdown).await;
    }
    .instrument(span)
    .await
}

enum State {
    /// Between messages.
    Idle,
    /// Collecting command fragments.
    Command { context_id: u8, bytes: Vec<u8> },
    /// Receiving the data set of a C-STORE.
    Store(Box<StoreInProgress>),
    /// Reading and dropping a data set we will answer with a failure.
    Discard { context_id: u8, reply: Reply },
    /// Collecting the identifier of a C-FIND, C-MOVE or C-GET.
    Identifier(Box<IdentifierRequest>),
    /// A C-FIND, C-MOVE or C-GET running beside the association (see [`qr`]).
    Running(Box<Running>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Operation {
    Find,
    Move { destination: String },
    Get,
}

impl Operation {
    fn permission(&self) -> Permission {
        match self {
            Operation::Find => Permission::Find,
            Operation::Move { .. } => Permission::Move,
            Operation::Get => Permission::Get,
        }
    }

    fn name(&self) -> &'static str {
        match self {
            Operation::Find => "C-FIND",
            Operation::Move { .. } => "C-MOVE",
            Operation::Get => "C-GET",
        }
    }
}

/// 0124 for an operation the calling AE may not ask for.
fn not_authorized(operation: &str) -> Failure {
    Failure::new(
        status::NOT_AUTHORIZED,
        format!("{operation} is not permitted to this calling AE title"),
    )
}

struct IdentifierRequest {
    operation: Operation,
    context_id: u8,
    message_id: u16,
    sop_class_uid: String,
    bytes: Vec<u8>,
}

struct Running {
    /// The audit record written when the final response goes out (status and count filled in),
    /// or, if the operation ends without one, when this is dropped.
    audit: Option<AuditRecord>,
    ledger: crate::ledger::Ledger,
    /// Pending responses sent so far (C-FIND matches).
    pending: u64,
    context_id: u8,
    message_id: u16,
    /// The response command field, for a failure if the task ends without its final response.
    response_field: u16,
    sop_class_uid: String,
    out: mpsc::Receiver<Outgoing>,
    /// C-GET: the requestor's C-STORE responses go back to the task.
    replies: Option<mpsc::Sender<Command>>,
    cancel: Arc<AtomicBool>,
}

impl Drop for Running {
    /// However the association ends (release, abort, drain timeout), the operation stops, and
    /// it is on the audit trail even without its final response.
    fn drop(&mut self) {
        self.cancel.store(true, Ordering::Relaxed);
        if let Some(mut audit) = self.audit.take() {
            audit.status = status::UNABLE_TO_PROCESS;
            audit.count = self.pending;
            audit.detail = format!(
                "{}: ended before its final response (association aborted, closed or shut down; {} pending responses sent)",
                audit.detail, self.pending
            );
            self.ledger.audit(audit);
        }
    }
}

/// What woke the association loop.
enum Next {
    Pdu(Result<Received, ConnError>),
    Out(Option<Outgoing>),
    Shutdown,
    /// Admission ended it while idle to make room (see `admission::Admission::admit`).
    Reclaimed,
}

struct StoreInProgress {
    started: std::time::Instant,
    context_id: u8,
    message_id: u16,
    context: StoreContext,
    incoming: Option<Incoming>,
    failure: Option<Failure>,
}

/// A response to send once a discarded data set has been read.
struct Reply {
    command_field: u16,
    message_id: u16,
    sop_class_uid: String,
    sop_instance_uid: String,
    failure: Failure,
}

/// Ends the association with an A-ABORT.
struct Abort(AbortRQServiceProviderReason, String);

struct Association {
    conn: Connection,
    ctx: Arc<NodeContext>,
    /// Its place under the association caps: told whether it is idle, and may be reclaimed.
    slot: Slot,
    /// The peer's address, for the audit trail.
    peer: String,
    negotiated: Negotiated,
    state: State,
    stored: u64,
    failed: u64,
}

impl Association {
    async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        let idle = self.ctx.node.idle_timeout();
        let end = loop {
            let stopping = *shutdown.borrow();
            if stopping && matches!(self.state, State::Idle) {
                break Some(Abort(
                    AbortRQServiceProviderReason::ReasonNotSpecified,
                    "node is shutting down".into(),
                ));
            }
            let wait = match self.state {
                State::Idle => idle,
                State::Running(_) => OP_WAIT,
                _ => self.ctx.node.io_timeout(),
            };
            let is_idle = matches!(self.state, State::Idle);
            self.slot.set_idle(is_idle);
            // `receive` is cancel-safe: a PDU half read when results win the race stays buffered.
            let next = match &mut self.state {
                State::Running(r) => tokio::select! {
                    msg = r.out.recv() => Next::Out(msg),
                    pdu = self.conn.receive_data(wait) => Next::Pdu(pdu),
                },
                _ => tokio::select! {
                    pdu = self.conn.receive_data(wait) => Next::Pdu(pdu),
                    _ = shutdown.changed(), if !stopping && is_idle => Next::Shutdown,
                    _ = self.slot.reclaimed(), if is_idle => Next::Reclaimed,
                },
            };
            let pdu = match next {
                Next::Pdu(pdu) => pdu,
                Next::Shutdown => continue,
                Next::Reclaimed => {
                    // Counted out already: its place went to a request over a cap.
                    break Some(Abort(
                        AbortRQServiceProviderReason::ReasonNotSpecified,
                        "idle while its place was needed (association limit reached)".into(),
                    ));
                }
                Next::Out(msg) => {
                    if let Err(abort) = self.on_outgoing(msg).await {
                        break Some(abort);
                    }
                    continue;
                }
            };
            let pdu = match pdu {
                Ok(Received::Data(pdata)) => {
                    let handled = self.on_pdata(&pdata).await;
                    self.conn.recycle(pdata);
                    if let Err(abort) = handled {
                        break Some(abort);
                    }
                    continue;
                }
                Ok(Received::Other(pdu)) => Ok(pdu),
                Err(e) => Err(e),
            };
            match pdu {
                Ok(Pdu::ReleaseRQ) => {
                    if !matches!(self.state, State::Idle) {
                        break Some(Abort(
                            AbortRQServiceProviderReason::UnexpectedPdu,
                            "release during a message".into(),
                        ));
                    }
                    let _ = self.conn.send(&Pdu::ReleaseRP).await;
                    info!(
                        stored = self.stored,
                        failed = self.failed,
                        "association released"
                    );
                    break None;
                }
                Ok(Pdu::AbortRQ { source }) => {
                    info!(
                        ?source,
                        stored = self.stored,
                        failed = self.failed,
                        "association aborted by peer"
                    );
                    break None;
                }
                Ok(other) => {
                    break Some(Abort(
                        AbortRQServiceProviderReason::UnexpectedPdu,
                        format!("unexpected {}", pdu_name(&other)),
                    ));
                }
                Err(ConnError::TooLarge { length, max }) => {
                    break Some(Abort(
                        AbortRQServiceProviderReason::InvalidPduParameter,
                        format!("PDU of {length} bytes exceeds the maximum of {max}"),
                    ));
                }
                Err(ConnError::Malformed(m)) => {
                    break Some(Abort(AbortRQServiceProviderReason::UnrecognizedPdu, m));
                }
                Err(ConnError::Timeout(t)) => {
                    break Some(Abort(
                        AbortRQServiceProviderReason::ReasonNotSpecified,
                        format!("no data for {t:?}"),
                    ));
                }
                Err(e) => {
                    info!(error = %e, stored = self.stored, failed = self.failed, "association ended");
                    break None;
                }
            }
        };
        // A data set cut off mid-way is discarded: nothing was acknowledged for it.
        match std::mem::replace(&mut self.state, State::Idle) {
            State::Store(op) => {
                if let Some(incoming) = op.incoming {
                    incoming.abort().await;
                }
            }
            State::Running(r) => r.cancel.store(true, Ordering::Relaxed),
            _ => {}
        }
        match end {
            Some(Abort(reason, why)) => {
                warn!(reason = %why, stored = self.stored, failed = self.failed, "aborting association");
                self.conn.abort(reason).await;
            }
            None => self.conn.close().await,
        }
    }

    async fn on_pdata(&mut self, pdata: &PData) -> Result<(), Abort> {
        for pdv in pdata.values() {
            if self
                .negotiated
                .context(pdv.presentation_context_id)
                .is_none()
            {
                return Err(Abort(
                    AbortRQServiceProviderReason::UnexpectedPduParameter,
                    format!(
                        "PDV on presentation context {} which was not accepted",
                        pdv.presentation_context_id
                    ),
                ));
            }
            match pdv.value_type {
                PDataValueType::Command => self.on_command_fragment(pdv).await?,
                PDataValueType::Data => self.on_data_fragment(pdv).await?,
            }
        }
        Ok(())
    }

    async fn on_command_fragment(&mut self, pdv: Pdv<'_>) -> Result<(), Abort> {
        if let State::Running(r) = &mut self.state {
            // Only a C-CANCEL of the running request, or (C-GET) the requestor's C-STORE
            // responses, may come now: asynchronous operations are not negotiated.
            let command = if pdv.is_last {
                Command::decode(pdv.data).ok()
            } else {
                None
            };
            let field = command.as_ref().and_then(|c| c.command_field().ok());
            let responds_to = command.as_ref().and_then(|c| {
                c.u16(tag::MESSAGE_ID_BEING_RESPONDED_TO, "message id")
                    .ok()
                    .flatten()
            });
            match (field, command) {
                (Some(field::C_CANCEL_RQ), _) if responds_to == Some(r.message_id) => {
                    r.cancel.store(true, Ordering::Relaxed);
                    return Ok(());
                }
                (Some(field::C_STORE_RSP), Some(c)) if r.replies.is_some() => {
                    // Never block the loop on the task: a requestor flooding us with responses
                    // it was not asked for is a protocol error.
                    if let Some(tx) = &r.replies {
                        if tx.try_send(c).is_err() {
                            return Err(Abort(
                                AbortRQServiceProviderReason::UnexpectedPdu,
                                "C-STORE responses that were not asked for".into(),
                            ));
                        }
                    }
                    return Ok(());
                }
                _ => {
                    return Err(Abort(
                        AbortRQServiceProviderReason::UnexpectedPdu,
                        "request while another is running (asynchronous operations were not negotiated)"
                            .into(),
                    ))
                }
            }
        }
        let bytes = match std::mem::replace(&mut self.state, State::Idle) {
            State::Idle => pdv.data.to_vec(),
            State::Command {
                context_id,
                mut bytes,
            } if context_id == pdv.presentation_context_id => {
                bytes.extend_from_slice(pdv.data);
                bytes
            }
            _ => {
                return Err(Abort(
                    AbortRQServiceProviderReason::UnexpectedPduParameter,
                    "command fragment out of sequence".into(),
                ));
            }
        };
        if bytes.len() > MAX_COMMAND_BYTES {
            return Err(Abort(
                AbortRQServiceProviderReason::InvalidPduParameter,
                "command set too large".into(),
            ));
        }
        if !pdv.is_last {
            self.state = State::Command {
                context_id: pdv.presentation_context_id,
                bytes,
            };
            return Ok(());
        }
        let command = Command::decode(&bytes).map_err(|e| {
            Abort(
                AbortRQServiceProviderReason::InvalidPduParameter,
                format!("bad command set: {e}"),
            )
        })?;
        self.dispatch(pdv.presentation_context_id, command).await
    }

    /// Writes the audit record of a finished query or retrieval, with the final status and the
    /// number of matches (C-FIND) or of instances sent (C-MOVE, C-GET).
    fn audit_final(&self, mut r: Running, final_command: &[u8]) {
        let Some(mut audit) = r.audit.take() else {
            return;
        };
        if let Ok(cmd) = Command::decode(final_command) {
            audit.status = cmd.u16(tag::STATUS, "Status").ok().flatten().unwrap_or(0);
            audit.count = if audit.event_id == trail::id::QUERY {
                r.pending
            } else {
                let n = |t| cmd.u16(t, "count").ok().flatten().unwrap_or(0);
                let (done, warned, failed) = (
                    n(tag::COMPLETED_SUBOPERATIONS),
                    n(tag::WARNING_SUBOPERATIONS),
                    n(tag::FAILED_SUBOPERATIONS),
                );
                audit.detail = format!(
                    "{}: {done} completed, {warned} with warnings, {failed} failed",
                    audit.detail
                );
                u64::from(done) + u64::from(warned)
            };
        }
        self.ctx.services.ledger.audit(audit);
    }

    /// Whether the calling AE may ask for this (logged when not).
    fn allowed(&self, what: Permission) -> bool {
        let ok = self.ctx.acl.allows(&self.negotiated.calling_ae, what);
        if !ok {
            warn!(
                operation = what.name(),
                "operation refused by access control"
            );
            self.ctx.services.ledger.audit(AuditRecord {
                event_id: trail::id::SECURITY_ALERT,
                calling_ae: self.negotiated.calling_ae.clone(),
                peer: self.peer.clone(),
                status: status::NOT_AUTHORIZED,
                detail: format!(
                    "{} refused: not permitted to this calling AE title",
                    what.name()
                ),
                ..Default::default()
            });
        }
        ok
    }

    async fn dispatch(&mut self, context_id: u8, cmd: Command) -> Result<(), Abort> {
        let bad = |e: crate::dimse::command::CommandError| {
            Abort(
                AbortRQServiceProviderReason::InvalidPduParameter,
                e.to_string(),
            )
        };
        let command_field = cmd.command_field().map_err(bad)?;
        if command_field == field::C_CANCEL_RQ {
            // Nothing of ours is cancellable yet (C-STORE is not).
            return Ok(());
        }
        let message_id = cmd.message_id().map_err(bad)?;
        let has_data = cmd.has_data_set().map_err(bad)?;
        let sop_class_uid = cmd.string(tag::AFFECTED_SOP_CLASS_UID).unwrap_or_default();
        let sop_instance_uid = cmd
            .string(tag::AFFECTED_SOP_INSTANCE_UID)
            .unwrap_or_default();
        let pc = self
            .negotiated
            .context(context_id)
            .cloned()
            .ok_or_else(|| {
                Abort(
                    AbortRQServiceProviderReason::UnexpectedPduParameter,
                    "unknown context".into(),
                )
            })?;
        let reply_failure = |failure: Failure| Reply {
            command_field: command_field | 0x8000,
            message_id,
            sop_class_uid: sop_class_uid.clone(),
            sop_instance_uid: sop_instance_uid.clone(),
            failure,
        };
        match command_field {
            field::C_ECHO_RQ if !has_data && !self.allowed(Permission::Echo) => {
                let reply = reply_failure(not_authorized("C-ECHO"));
                self.send_reply(context_id, reply).await
            }
            field::C_ECHO_RQ if !has_data => {
                let rsp = CommandBuilder::new()
                    .uid(tag::AFFECTED_SOP_CLASS_UID, VERIFICATION)
                    .u16(tag::COMMAND_FIELD, field::C_ECHO_RSP)
                    .u16(tag::MESSAGE_ID_BEING_RESPONDED_TO, message_id)
                    .u16(tag::COMMAND_DATA_SET_TYPE, NO_DATA_SET)
                    .u16(tag::STATUS, status::SUCCESS)
                    .encode();
                self.send_command(context_id, rsp).await
            }
            field::C_FIND_RQ | field::C_MOVE_RQ | field::C_GET_RQ if has_data => {
                let operation = match command_field {
                    field::C_FIND_RQ => Operation::Find,
                    field::C_MOVE_RQ => Operation::Move {
                        destination: cmd.string(tag::MOVE_DESTINATION).unwrap_or_default(),
                    },
                    _ => Operation::Get,
                };
                let (class_ok, not_ours) = match operation {
                    Operation::Find => (
                        matching::Model::of_sop_class(&sop_class_uid).is_some(),
                        "not a Query/Retrieve FIND SOP Class",
                    ),
                    Operation::Move { .. } => (
                        [qr::PATIENT_ROOT_MOVE, qr::STUDY_ROOT_MOVE]
                            .contains(&sop_class_uid.as_str()),
                        "not a Query/Retrieve SOP Class for this operation",
                    ),
                    Operation::Get => (
                        [qr::PATIENT_ROOT_GET, qr::STUDY_ROOT_GET]
                            .contains(&sop_class_uid.as_str()),
                        "not a Query/Retrieve SOP Class for this operation",
                    ),
                };
                let failure = if pc.abstract_syntax != sop_class_uid {
                    Some(Failure::new(
                        status::SOP_CLASS_NOT_SUPPORTED,
                        "SOP Class differs from the presentation context",
                    ))
                } else if !class_ok {
                    Some(Failure::new(status::SOP_CLASS_NOT_SUPPORTED, not_ours))
                } else if matches!(&operation, Operation::Move { destination } if destination.is_empty())
                {
                    Some(Failure::new(
                        status::MOVE_DESTINATION_UNKNOWN,
                        "command lacks Move Destination",
                    ))
                } else if !self.allowed(operation.permission()) {
                    Some(not_authorized(operation.name()))
                } else if matches!(&operation, Operation::Move { destination }
                    // An unknown destination is A801 (Move Destination unknown), from run_move.
                    if self.ctx.services.peers.iter().any(|p| p.ae_title.trim() == destination.trim())
                        && !self.ctx.acl.allows(destination, Permission::Move))
                {
                    Some(Failure::new(
                        status::NOT_AUTHORIZED,
                        "the move destination may not receive instances by C-MOVE",
                    ))
                } else {
                    None
                };
                self.state = match failure {
                    Some(f) => State::Discard {
                        context_id,
                        reply: reply_failure(f),
                    },
                    None => State::Identifier(Box::new(IdentifierRequest {
                        operation,
                        context_id,
                        message_id,
                        sop_class_uid,
                        bytes: Vec::new(),
                    })),
                };
                Ok(())
            }
            field::C_STORE_RQ if has_data => {
                let failure = if pc.abstract_syntax != sop_class_uid
                    || !negotiate::is_storage_sop_class(&pc.abstract_syntax)
                {
                    Some(Failure::new(
                        status::SOP_CLASS_NOT_SUPPORTED,
                        "SOP Class differs from the presentation context",
                    ))
                } else if sop_instance_uid.is_empty() {
                    Some(Failure::new(
                        status::CANNOT_UNDERSTAND,
                        "command lacks Affected SOP Instance UID",
                    ))
                } else if !self.allowed(Permission::Store) {
                    Some(not_authorized("C-STORE"))
                } else {
                    None
                };
                debug!(message_id, "C-STORE request");
                let incoming = failure
                    .is_none()
                    .then(|| self.ctx.pipeline.begin(&pc.transfer_syntax));
                self.state = State::Store(Box::new(StoreInProgress {
                    started: std::time::Instant::now(),
                    context_id,
                    message_id,
                    context: StoreContext {
                        calling_ae: self.negotiated.calling_ae.clone(),
                        called_ae: self.negotiated.called_ae.clone(),
                        sop_class_uid,
                        sop_instance_uid,
                    },
                    incoming,
                    failure,
                }));
                Ok(())
            }
            _ => {
                let reply = reply_failure(Failure::new(
                    status::UNRECOGNIZED_OPERATION,
                    "operation not supported",
                ));
                if has_data {
                    self.state = State::Discard { context_id, reply };
                    Ok(())
                } else {
                    self.send_reply(context_id, reply).await
                }
            }
        }
    }

    async fn on_data_fragment(&mut self, pdv: Pdv<'_>) -> Result<(), Abort> {
        let out_of_sequence = || {
            Abort(
                AbortRQServiceProviderReason::UnexpectedPduParameter,
                "data fragment without a command".into(),
            )
        };
        match &mut self.state {
            State::Store(op) if op.context_id == pdv.presentation_context_id => {
                if let Some(incoming) = op.incoming.as_mut() {
                    if let Err(e) = incoming.feed(pdv.data).await {
                        warn!(error = %e, "C-STORE failed while receiving");
                        op.failure = Some(super::status::store_failure(&e));
                        if let Some(i) = op.incoming.take() {
                            i.abort().await;
                        }
                    }
                }
                if pdv.is_last {
                    if let State::Store(op) = std::mem::replace(&mut self.state, State::Idle) {
                        self.finish_store(*op).await?;
                    }
                }
                Ok(())
            }
            State::Identifier(req) if req.context_id == pdv.presentation_context_id => {
                req.bytes.extend_from_slice(pdv.data);
                if req.bytes.len() > MAX_IDENTIFIER_BYTES {
                    let reply = Reply {
                        command_field: request_field(&req.operation) | 0x8000,
                        message_id: req.message_id,
                        sop_class_uid: req.sop_class_uid.clone(),
                        sop_instance_uid: String::new(),
                        failure: Failure::new(status::OUT_OF_RESOURCES, "identifier too large"),
                    };
                    self.state = State::Discard {
                        context_id: req.context_id,
                        reply,
                    };
                }
                if pdv.is_last {
                    match std::mem::replace(&mut self.state, State::Idle) {
                        State::Identifier(req) => self.start(*req).await?,
                        State::Discard { context_id, reply } => {
                            self.send_reply(context_id, reply).await?
                        }
                        other => self.state = other,
                    }
                }
                Ok(())
            }
            State::Discard { context_id, .. } if *context_id == pdv.presentation_context_id => {
                if pdv.is_last {
                    if let State::Discard { context_id, reply } =
                        std::mem::replace(&mut self.state, State::Idle)
                    {
                        self.send_reply(context_id, reply).await?;
                    }
                }
                Ok(())
            }
            _ => Err(out_of_sequence()),
        }
    }

    async fn finish_store(&mut self, op: StoreInProgress) -> Result<(), Abort> {
        let result = match (op.failure, op.incoming) {
            (Some(f), incoming) => {
                if let Some(i) = incoming {
                    i.abort().await;
                }
                Err(f)
            }
            (None, Some(incoming)) => match incoming.finish(&op.context).await {
                Ok(stored) => {
                    let m = crate::ops::metrics::global();
                    match stored.outcome {
                        StoreOutcome::Stored { .. } => m.instances_stored.fetch_add(1, Relaxed),
                        StoreOutcome::Duplicate { .. } => {
                            m.instances_duplicate.fetch_add(1, Relaxed)
                        }
                    };
                    match stored.outcome {
                        StoreOutcome::Stored { seq, version } => {
                            info!(
                                seq,
                                version,
                                bytes = stored.dataset_length,
                                "instance stored"
                            )
                        }
                        StoreOutcome::Duplicate { seq } => {
                            info!(seq, "identical instance received again")
                        }
                    }
                    Ok(())
                }
                Err(e) => {
                    warn!(error = %e, "C-STORE failed");
                    if matches!(e, crate::archive::ingest::IngestError::Store(_)) {
                        crate::ops::metrics::global()
                            .object_store_errors
                            .fetch_add(1, Relaxed);
                    }
                    Err(super::status::store_failure(&e))
                }
            },
            (None, None) => Err(Failure::new(status::OUT_OF_RESOURCES, "internal error")),
        };
        let mut rsp = CommandBuilder::new()
            .uid(tag::AFFECTED_SOP_CLASS_UID, &op.context.sop_class_uid)
            .u16(tag::COMMAND_FIELD, field::C_STORE_RSP)
            .u16(tag::MESSAGE_ID_BEING_RESPONDED_TO, op.message_id)
            .u16(tag::COMMAND_DATA_SET_TYPE, NO_DATA_SET)
            .uid(tag::AFFECTED_SOP_INSTANCE_UID, &op.context.sop_instance_uid);
        crate::ops::metrics::global().observe_store(op.started.elapsed());
        match result {
            Ok(()) => {
                self.stored += 1;
                rsp = rsp.u16(tag::STATUS, status::SUCCESS);
            }
            Err(f) => {
                self.failed += 1;
                crate::ops::metrics::global()
                    .instances_failed
                    .fetch_add(1, Relaxed);
                rsp = rsp.u16(tag::STATUS, f.status).text(
                    tag::ERROR_COMMENT,
                    &f.comment,
                    status::ERROR_COMMENT_MAX,
                );
            }
        }
        self.send_command(op.context_id, rsp.encode()).await?;
        debug!(message_id = op.message_id, "C-STORE response sent");
        Ok(())
    }

    /// Parses the identifier of a C-FIND, C-MOVE or C-GET and starts the operation beside the
    /// association, or answers with the failure status for a bad identifier.
    async fn start(&mut self, req: IdentifierRequest) -> Result<(), Abort> {
        let transfer_syntax = self
            .negotiated
            .context(req.context_id)
            .map(|c| c.transfer_syntax.clone())
            .unwrap_or_default();
        let model = match req.operation {
            Operation::Find => matching::Model::of_sop_class(&req.sop_class_uid),
            _ => qr::retrieve_model(&req.sop_class_uid),
        };
        let matching = matching::MatchOptions {
            case_insensitive_names: self.ctx.node.find_case_insensitive_names,
            combined_datetime: self
                .negotiated
                .combined_datetime
                .contains(&req.sop_class_uid),
        };
        let retrieval = req.operation != Operation::Find;
        let mut audit = AuditRecord {
            event_id: if retrieval {
                trail::id::INSTANCES_TRANSFERRED
            } else {
                trail::id::QUERY
            },
            calling_ae: self.negotiated.calling_ae.clone(),
            peer: match &req.operation {
                Operation::Move { destination } => destination.trim().to_string(),
                _ => self.peer.clone(),
            },
            sop_class_uid: req.sop_class_uid.clone(),
            identifier_sha256: <sha2::Sha256 as sha2::Digest>::digest(&req.bytes).into(),
            detail: match &req.operation {
                Operation::Move { destination } => format!("C-MOVE to {}", destination.trim()),
                other => other.name().to_string(),
            },
            ..Default::default()
        };
        let parsed = match (Encoding::from_transfer_syntax(&transfer_syntax), model) {
            (Some(enc), Some(model)) => dataset::parse(&req.bytes, enc, false)
                .map_err(|e| Failure::new(status::CANNOT_UNDERSTAND, e.to_string()))
                .and_then(|elements| {
                    matching::Query::parse(&elements, model, matching)
                        .map_err(|e| super::status::find_failure(&e))
                })
                .and_then(|q| {
                    if retrieval {
                        retrieval_keys(&q)?;
                    }
                    Ok(q)
                })
                .map(|q| (q, enc)),
            _ => Err(Failure::new(
                status::CANNOT_UNDERSTAND,
                "unsupported transfer syntax",
            )),
        };
        let (q, encoding) = match parsed {
            Ok(p) => p,
            Err(failure) => {
                info!(status = format!("{:04X}", failure.status), reason = %failure.comment, "request refused");
                audit.status = failure.status;
                audit.detail = format!("{} refused: {}", audit.detail, failure.comment);
                self.ctx.services.ledger.audit(audit);
                let reply = Reply {
                    command_field: request_field(&req.operation) | 0x8000,
                    message_id: req.message_id,
                    sop_class_uid: req.sop_class_uid,
                    sop_instance_uid: String::new(),
                    failure,
                };
                return self.send_reply(req.context_id, reply).await;
            }
        };
        audit.detail = format!("{} at {} level", audit.detail, q.level.name());
        let (tx, rx) = mpsc::channel(OP_QUEUE);
        let cancel = Arc::new(AtomicBool::new(false));
        let services = self.ctx.services.clone();
        let request = qr::Request {
            context_id: req.context_id,
            message_id: req.message_id,
            sop_class_uid: req.sop_class_uid.clone(),
            encoding,
            calling_ae: self.negotiated.calling_ae.clone(),
            peer: self.peer.clone(),
        };
        let mut replies = None;
        match req.operation.clone() {
            Operation::Find => {
                let opts = FindOptions {
                    matching,
                    max_results: self.ctx.node.max_find_results,
                    retrieve_ae: self.ctx.policy.ae_title.clone(),
                };
                let stop = cancel.clone();
                tokio::task::spawn_blocking(move || {
                    qr::run_find(&services, &request, &q, &opts, &stop, &tx)
                });
            }
            Operation::Move { destination } => {
                tokio::spawn(qr::run_move(
                    services,
                    request,
                    destination,
                    q,
                    cancel.clone(),
                    tx,
                ));
            }
            Operation::Get => {
                let contexts: Vec<(u8, String, String)> = self
                    .negotiated
                    .contexts
                    .iter()
                    .filter(|c| self.negotiated.scp_role.contains(&c.abstract_syntax))
                    .map(|c| (c.id, c.abstract_syntax.clone(), c.transfer_syntax.clone()))
                    .collect();
                let (rtx, rrx) = mpsc::channel(4);
                replies = Some(rtx);
                tokio::spawn(qr::run_get(
                    services,
                    request,
                    q,
                    contexts,
                    cancel.clone(),
                    tx,
                    rrx,
                ));
            }
        }
        self.state = State::Running(Box::new(Running {
            audit: Some(audit),
            ledger: self.ctx.services.ledger.clone(),
            pending: 0,
            context_id: req.context_id,
            message_id: req.message_id,
            response_field: request_field(&req.operation) | 0x8000,
            sop_class_uid: req.sop_class_uid,
            out: rx,
            replies,
            cancel,
        }));
        Ok(())
    }

    /// A message from the running operation; `None` when it ended without its final response
    /// (a failure is answered for it).
    async fn on_outgoing(&mut self, msg: Option<Outgoing>) -> Result<(), Abort> {
        let max = self.negotiated.peer_max_pdu;
        let Some(msg) = msg else {
            if let State::Running(r) = std::mem::replace(&mut self.state, State::Idle) {
                warn!("operation ended without a final response");
                let reply = Reply {
                    command_field: r.response_field,
                    message_id: r.message_id,
                    sop_class_uid: r.sop_class_uid.clone(),
                    sop_instance_uid: String::new(),
                    failure: Failure::new(status::UNABLE_TO_PROCESS, "internal error"),
                };
                return self.send_reply(r.context_id, reply).await;
            }
            return Ok(());
        };
        let sent = match msg {
            Outgoing::Message {
                context_id,
                command,
                data,
                last,
            } => {
                if last {
                    if let State::Running(r) = std::mem::replace(&mut self.state, State::Idle) {
                        self.audit_final(*r, &command);
                    }
                } else if let State::Running(r) = &mut self.state {
                    r.pending += 1;
                }
                match data {
                    Some(data) => self.conn.send_message(context_id, command, data, max).await,
                    None => self.conn.send_command(context_id, command).await,
                }
            }
            Outgoing::Command {
                context_id,
                command,
            } => self.conn.send_command(context_id, command).await,
            Outgoing::Data {
                context_id,
                bytes,
                last,
            } => self.conn.send_data(context_id, &bytes, last, max).await,
            Outgoing::Abort(why) => {
                return Err(Abort(AbortRQServiceProviderReason::ReasonNotSpecified, why));
            }
        };
        sent.map_err(|e| {
            Abort(
                AbortRQServiceProviderReason::ReasonNotSpecified,
                format!("cannot send: {e}"),
            )
        })
    }

    async fn send_reply(&mut self, context_id: u8, reply: Reply) -> Result<(), Abort> {
        self.failed += 1;
        let mut b = CommandBuilder::new()
            .u16(tag::COMMAND_FIELD, reply.command_field)
            .u16(tag::MESSAGE_ID_BEING_RESPONDED_TO, reply.message_id)
            .u16(tag::COMMAND_DATA_SET_TYPE, NO_DATA_SET)
            .u16(tag::STATUS, reply.failure.status)
            .text(
                tag::ERROR_COMMENT,
                &reply.failure.comment,
                status::ERROR_COMMENT_MAX,
            );
        if !reply.sop_class_uid.is_empty() {
            b = b.uid(tag::AFFECTED_SOP_CLASS_UID, &reply.sop_class_uid);
        }
        if !reply.sop_instance_uid.is_empty() {
            b = b.uid(tag::AFFECTED_SOP_INSTANCE_UID, &reply.sop_instance_uid);
        }
        self.send_command(context_id, b.encode()).await
    }

    async fn send_command(&mut self, context_id: u8, bytes: Vec<u8>) -> Result<(), Abort> {
        self.conn
            .send_command(context_id, bytes)
            .await
            .map_err(|e| {
                Abort(
                    AbortRQServiceProviderReason::ReasonNotSpecified,
                    format!("cannot send response: {e}"),
                )
            })
    }
}

fn request_field(op: &Operation) -> u16 {
    match op {
        Operation::Find => field::C_FIND_RQ,
        Operation::Move { .. } => field::C_MOVE_RQ,
        Operation::Get => field::C_GET_RQ,
    }
}

/// A C-MOVE or C-GET identifier must name what to retrieve: the unique key of its level, with a
/// value (PS3.4 C.4.2.2.1). A universal one would send the whole archive.
fn retrieval_keys(q: &matching::Query) -> Result<(), Failure> {
    let unique = matching::unique_key(q.level);
    let single = match q.key(unique).map(|k| &k.matcher) {
        Some(matching::Matcher::Uids(list)) => !list.is_empty(),
        // PatientID: single values (a list of them too), never wild cards.
        Some(matching::Matcher::Text(patterns)) => patterns.iter().all(|p| p.is_exact()),
        _ => false,
    };
    if single {
        Ok(())
    } else {
        Err(Failure::new(
            status::DATA_SET_DOES_NOT_MATCH_SOP_CLASS,
            format!(
                "identifier lacks a single value for the unique key of the {} level",
                q.level.name()
            ),
        ))
    }
}
