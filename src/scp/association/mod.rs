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

use dicom_ul::pdu::{AbortRQServiceProviderReason, PDataValueType, Pdu};
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn, Instrument};

use super::context::NodeContext;
use super::establish::{self, Request};
use super::qr::{self, Outgoing};
use crate::acl::Permission;
use crate::archive::ingest::StoreContext;
use crate::dicom::uids::VERIFICATION;
use crate::dimse::admission::Pending;
use crate::dimse::command::{field, tag, Command, CommandBuilder, NO_DATA_SET};
use crate::dimse::connection::{pdu_name, ConnError, PData, Pdv, Received};
use crate::dimse::negotiate;
use crate::dimse::status::{self, Failure};
use crate::ledger::trail::{self, AuditRecord};
use crate::ledger::StoreOutcome;
use crate::query::{dataset, matching, FindOptions};
use crate::split::Encoding;

mod requests;
mod state;
mod store;

use state::*;

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
            break self.ended_by(pdu).await;
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

    /// How the association ends on a PDU other than P-DATA-TF, or on a read error: a release
    /// (answered when idle), a peer's abort, or an abort of ours with its reason.
    async fn ended_by(&mut self, pdu: Result<Pdu, ConnError>) -> Option<Abort> {
        match pdu {
            Ok(Pdu::ReleaseRQ) => {
                if !matches!(self.state, State::Idle) {
                    return Some(Abort(
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
                None
            }
            Ok(Pdu::AbortRQ { source }) => {
                info!(
                    ?source,
                    stored = self.stored,
                    failed = self.failed,
                    "association aborted by peer"
                );
                None
            }
            Ok(other) => Some(Abort(
                AbortRQServiceProviderReason::UnexpectedPdu,
                format!("unexpected {}", pdu_name(&other)),
            )),
            Err(ConnError::TooLarge { length, max }) => Some(Abort(
                AbortRQServiceProviderReason::InvalidPduParameter,
                format!("PDU of {length} bytes exceeds the maximum of {max}"),
            )),
            Err(ConnError::Malformed(m)) => {
                Some(Abort(AbortRQServiceProviderReason::UnrecognizedPdu, m))
            }
            Err(ConnError::Timeout(t)) => Some(Abort(
                AbortRQServiceProviderReason::ReasonNotSpecified,
                format!("no data for {t:?}"),
            )),
            Err(e) => {
                info!(error = %e, stored = self.stored, failed = self.failed, "association ended");
                None
            }
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
