//! Establishing an association (PS3.8 §7.1): the first PDU of a connection read under the ARTIM
//! deadline, then negotiation, access control and an association slot decide between
//! A-ASSOCIATE-AC and A-ASSOCIATE-RJ. Rejections are logged and recorded through
//! [`rejections`](super::rejections), so that a flood adds a summary, not an entry per attempt.

use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;

use dicom_ul::pdu::{AbortRQServiceProviderReason, AssociationRQ, Pdu};
use tracing::{debug, info, warn};

use super::context::NodeContext;
use super::rejections;
use crate::acl::Transport;
use crate::dimse::admission::Slot;
use crate::dimse::connection::pdu_name;
use crate::dimse::connection::Connection;
use crate::dimse::listener::Secured;
use crate::dimse::negotiate::{self, Negotiated};
use crate::ledger::trail::{self, AuditRecord};

/// A connection that sent its A-ASSOCIATE-RQ, not yet answered.
pub struct Request {
    conn: Connection,
    rq: AssociationRQ,
    pub addr: SocketAddr,
    /// `None`: plain TCP; `Some`: TLS, with the client certificate's names.
    pub tls: Option<Vec<String>>,
}

/// Reads the first PDU of a connection. The caller ends it at `deadline` (a peer trickling
/// bytes does not get a fresh I/O timeout per read). `None` when no A-ASSOCIATE-RQ came
/// (logged; an unexpected PDU is answered with A-ABORT).
pub async fn receive_association_request(
    secured: Secured,
    addr: SocketAddr,
    ctx: &NodeContext,
    deadline: tokio::time::Instant,
) -> Option<Request> {
    let mut conn = Connection::new(
        secured.stream,
        ctx.node.max_pdu_length,
        ctx.node.io_timeout(),
    );
    // The caller bounds the whole handshake by `deadline`; no read gets longer than what is left.
    let left = deadline.saturating_duration_since(tokio::time::Instant::now());
    match conn.receive(left).await {
        Ok(Pdu::AssociationRQ(rq)) => Some(Request {
            conn,
            rq,
            addr,
            tls: secured.tls,
        }),
        Ok(other) => {
            if let Some(held_back) = ctx.warnings.allow(addr.ip(), std::time::Instant::now()) {
                warn!(peer = %addr, pdu = pdu_name(&other), held_back, "expected A-ASSOCIATE-RQ");
            }
            conn.abort(AbortRQServiceProviderReason::UnexpectedPdu)
                .await;
            None
        }
        Err(e) => {
            debug!(peer = %addr, error = %e, "no association request");
            None
        }
    }
}

/// Writes the rejection summaries that are due (`all`: every one, at shutdown).
pub fn flush_rejections(ctx: &NodeContext, all: bool) {
    for summary in ctx.rejections.flush(std::time::Instant::now(), all) {
        let source = summary
            .source
            .map(|ip| ip.to_string())
            .unwrap_or_else(|| "other sources".into());
        info!(%source, count = summary.count, "associations rejected (summary)");
        ctx.services.ledger.audit(AuditRecord {
            event_id: trail::id::USER_AUTHENTICATION,
            calling_ae: summary.last_calling_ae.clone(),
            peer: source,
            status: 1,
            detail: summary.detail(),
            count: summary.count,
            ..Default::default()
        });
    }
}

/// Negotiates, checks access control and takes an association slot, then answers with
/// A-ASSOCIATE-AC; or answers with A-ASSOCIATE-RJ. `None` when no association results.
pub(super) async fn accept(
    request: Request,
    ctx: &NodeContext,
) -> Option<(Connection, Negotiated, Slot)> {
    let Request {
        mut conn,
        rq,
        addr,
        tls,
    } = request;
    let calling = rq.calling_ae_title.trim().to_string();
    let outcome = negotiate::negotiate(&ctx.policy, &rq)
        .map_err(Rejection::Negotiation)
        .and_then(|ok| {
            let transport = Transport::of(tls.as_deref());
            ctx.acl
                .association(&calling, Some(addr.ip()), transport)
                .map(|()| ok)
                .map_err(Rejection::AccessControl)
        })
        .and_then(|(ac, negotiated)| {
            ctx.admission
                .admit(addr.ip(), &calling, ctx.acl.is_known(&calling))
                .map(|slot| (ac, negotiated, slot))
                .map_err(Rejection::Busy)
        });
    match outcome {
        Ok((ac, negotiated, slot)) => {
            ctx.services.ledger.audit(AuditRecord {
                event_id: trail::id::USER_AUTHENTICATION,
                calling_ae: calling.clone(),
                peer: addr.to_string(),
                status: 0,
                detail: format!(
                    "association accepted: called {}, {} presentation context(s){}",
                    rq.called_ae_title.trim(),
                    negotiated.contexts.len(),
                    if tls.is_some() { ", TLS" } else { "" }
                ),
                ..Default::default()
            });
            if let Err(e) = conn.send(&Pdu::AssociationAC(ac)).await {
                warn!(error = %e, "cannot send A-ASSOCIATE-AC");
                return None;
            }
            Some((conn, negotiated, slot))
        }
        Err(rejection) => {
            crate::ops::metrics::global()
                .associations_rejected
                .fetch_add(1, Relaxed);
            let note = ctx.rejections.note(
                Some(addr.ip()),
                &calling,
                rejection.kind(),
                std::time::Instant::now(),
            );
            let rj = rejection.pdu();
            if note == rejections::Note::Counted {
                debug!(calling = ?calling, reason = %rejection, "association rejected (counted toward the source's summary)");
            } else {
                info!(calling = ?calling, called = ?rq.called_ae_title.trim(), reason = %rejection, "association rejected");
                ctx.services.ledger.audit(AuditRecord {
                    event_id: trail::id::USER_AUTHENTICATION,
                    calling_ae: calling.clone(),
                    peer: addr.to_string(),
                    status: 1,
                    detail: format!("association rejected: {rejection} ({:?})", rj.source),
                    ..Default::default()
                });
            }
            let _ = conn.send(&Pdu::AssociationRJ(rj)).await;
            conn.close().await;
            None
        }
    }
}

/// Why an association request is rejected.
enum Rejection {
    /// Negotiation's own answer (protocol version, application context, called AE title, no
    /// acceptable presentation context).
    Negotiation(dicom_ul::pdu::AssociationRJ),
    AccessControl(crate::acl::Refusal),
    Busy(crate::dimse::admission::Busy),
}

impl Rejection {
    /// The A-ASSOCIATE-RJ to send (PS3.8 §9.3.4): access control refuses permanently (calling
    /// AE title not recognized), the association limits transiently (local limit exceeded).
    fn pdu(&self) -> dicom_ul::pdu::AssociationRJ {
        use dicom_ul::pdu::{AssociationRJ, AssociationRJResult, AssociationRJSource};
        match self {
            Rejection::Negotiation(rj) => rj.clone(),
            Rejection::AccessControl(_) => AssociationRJ {
                result: AssociationRJResult::Permanent,
                source: AssociationRJSource::ServiceUser(
                    dicom_ul::pdu::AssociationRJServiceUserReason::CallingAETitleNotRecognized,
                ),
            },
            Rejection::Busy(_) => AssociationRJ {
                result: AssociationRJResult::Transient,
                source: AssociationRJSource::ServiceProviderPresentation(
                    dicom_ul::pdu::AssociationRJServiceProviderPresentationReason::LocalLimitExceeded,
                ),
            },
        }
    }

    /// The kind a summary counts it under: fixed text, without the peer-chosen parts (an AE
    /// title in the refusal's text would let a flood vary it without bound).
    fn kind(&self) -> &'static str {
        use crate::acl::Refusal;
        match self {
            Rejection::Negotiation(_) => "negotiation",
            Rejection::Busy(_) => "busy (association limits)",
            Rejection::AccessControl(r) => match r {
                Refusal::UnknownAe(_) => "calling AE title not recognized",
                Refusal::Address { .. } | Refusal::UnknownAddress(_) => "address not allowed",
                Refusal::TlsRequired(_) => "TLS required",
                Refusal::Certificate { .. } => "client certificate not bound to the AE title",
            },
        }
    }
}

impl std::fmt::Display for Rejection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Rejection::Negotiation(_) => f.write_str("negotiation"),
            Rejection::AccessControl(r) => write!(f, "access control: {r}"),
            Rejection::Busy(b) => write!(f, "busy: {b}"),
        }
    }
}
