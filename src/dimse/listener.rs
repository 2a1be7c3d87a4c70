//! The accept loop, in the shape of mini-redis's server, with the admission rules of
//! [`admission`](super::admission): a new connection is *pending* until its A-ASSOCIATE-RQ has
//! been accepted, and only then takes an association slot. Pending connections live in their
//! own bounded pool under the ARTIM deadline (TLS handshake included), so connections that
//! never send a byte — to either port — cannot keep a known peer out. Each source address has
//! a connection rate; a connection over it is closed at once.
//!
//! Every socket gets TCP_NODELAY (without it, Nagle against delayed ACK stalls each
//! C-STORE-RSP by ~40 ms), accept errors back off instead of spinning, and shutdown drains:
//! stop accepting, close the pending connections, let every association finish the message it
//! is in within the drain timeout, then abort the rest.

use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, error, info, warn};

use super::admission::{Admission, Pending};
use super::connection::Stream;

/// The services above the wire, as the accept loop sees them: who is admitted, how an
/// association request is received and answered, and how an accepted association is served.
pub trait Services: Send + Sync + Sized + 'static {
    /// An association request, read within the ARTIM timeout and not yet answered.
    type Request: Send + 'static;
    fn admission(&self) -> &Admission;
    fn artim_timeout(&self) -> Duration;
    fn drain_timeout(&self) -> Duration;
    /// Whether a misbehaving connection from `ip` may be logged now (`Some`, with how many
    /// warnings were held back since the last one) or only counted.
    fn warn_allowed(&self, ip: std::net::IpAddr) -> Option<u64>;
    /// Reads the A-ASSOCIATE-RQ from a new connection (`None`: the connection is closed).
    fn receive(
        &self,
        secured: Secured,
        addr: SocketAddr,
        deadline: tokio::time::Instant,
    ) -> impl std::future::Future<Output = Option<Self::Request>> + Send;
    /// Answers the request and serves the association to its end; `pending` is given up once
    /// the association holds a slot, and `stop` turns true when the node stops.
    fn serve(
        self: Arc<Self>,
        request: Self::Request,
        pending: Pending,
        stop: watch::Receiver<bool>,
    ) -> impl std::future::Future<Output = ()> + Send;
    /// Writes rejected associations summed up per source to the audit trail (`all`: also the
    /// sources still being counted).
    fn flush_rejections(&self, all: bool);
}

/// How an accepted connection's stream came to be.
pub struct Secured {
    pub stream: Box<dyn Stream>,
    /// `None`: plain TCP; `Some(names)`: TLS, with the client certificate's names.
    pub tls: Option<Vec<String>>,
}

/// The connection as the association will use it: the TCP socket itself, or TLS over it once
/// the handshake succeeded. `None` when it failed (logged). The caller bounds the time.
async fn secure(
    socket: TcpStream,
    acceptor: Option<TlsAcceptor>,
    addr: &SocketAddr,
    ctx: &impl Services,
) -> Option<Secured> {
    let Some(acceptor) = acceptor else {
        return Some(Secured {
            stream: Box::new(socket),
            tls: None,
        });
    };
    match acceptor.accept(socket).await {
        Ok(tls) => {
            let names = super::tls::certificate_names(
                tls.get_ref().1.peer_certificates().and_then(|c| c.first()),
            );
            Some(Secured {
                stream: Box::new(tls),
                tls: Some(names),
            })
        }
        Err(e) => {
            if let Some(held_back) = ctx.warn_allowed(addr.ip()) {
                info!(peer = %addr, error = %e, held_back, "TLS handshake failed");
            }
            crate::ops::metrics::global()
                .associations_rejected
                .fetch_add(1, Relaxed);
            None
        }
    }
}

/// Serves associations on the plain `listener` and the TLS one, whichever are configured,
/// until `shutdown` completes, then drains. Both share the admission rules.
pub async fn run<S: Services>(
    listener: Option<TcpListener>,
    tls: Option<(TcpListener, TlsAcceptor)>,
    ctx: Arc<S>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut tasks = JoinSet::new();
    let mut backoff = Duration::from_millis(50);
    // Rejections summed up per source go to the audit trail every few seconds.
    let mut flush = tokio::time::interval(Duration::from_secs(5));
    flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(shutdown);
    loop {
        let plain_accept = async {
            match &listener {
                Some(l) => l.accept().await,
                None => std::future::pending().await,
            }
        };
        let tls_accept = async {
            match &tls {
                Some((l, acceptor)) => (l.accept().await, Some(acceptor.clone())),
                None => std::future::pending().await,
            }
        };
        let (accepted, acceptor) = tokio::select! {
            r = plain_accept => (r, None),
            r = tls_accept => r,
            _ = flush.tick() => {
                ctx.flush_rejections(false);
                continue;
            }
            _ = &mut shutdown => break,
        };
        let (socket, addr) = match accepted {
            Ok(s) => {
                backoff = Duration::from_millis(50);
                s
            }
            Err(e) => {
                // EMFILE and friends: wait for resources instead of spinning.
                error!(error = %e, retry_in = ?backoff, "accept failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        while tasks.try_join_next().is_some() {}
        let pending = match ctx.admission().enter(addr.ip(), Instant::now()) {
            Ok(p) => p,
            Err(why) => {
                crate::ops::metrics::global()
                    .connections_dropped
                    .fetch_add(1, Relaxed);
                if let Some(held_back) = ctx.warn_allowed(addr.ip()) {
                    warn!(peer = %addr, reason = %why, held_back, "connection closed before its association request");
                }
                drop(socket);
                continue;
            }
        };
        if let Err(e) = socket.set_nodelay(true) {
            warn!(error = %e, "cannot set TCP_NODELAY");
        }
        let ctx = ctx.clone();
        let stop = stop_rx.clone();
        tasks.spawn(connection(socket, addr, acceptor, pending, ctx, stop));
    }
    drop(listener);
    drop(tls);
    ctx.flush_rejections(true);
    let open = tasks.len();
    info!(connections = open, drain = ?ctx.drain_timeout(), "shutting down: no new associations");
    let _ = stop_tx.send(true);
    let drained = tokio::time::timeout(ctx.drain_timeout(), async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        warn!(
            associations = tasks.len(),
            "drain timeout: aborting the remaining associations"
        );
        tasks.abort_all();
        while tasks.join_next().await.is_some() {}
    }
}

/// One connection from accept to close: TLS handshake and A-ASSOCIATE-RQ while pending (all
/// within the ARTIM timeout, and ended early when a newer connection evicts it or the node
/// stops), then the association.
async fn connection<S: Services>(
    socket: TcpStream,
    addr: SocketAddr,
    acceptor: Option<TlsAcceptor>,
    pending: Pending,
    ctx: Arc<S>,
    mut stop: watch::Receiver<bool>,
) {
    let artim = ctx.artim_timeout();
    let deadline = tokio::time::Instant::now() + artim;
    let handshake = async {
        let secured = secure(socket, acceptor, &addr, &*ctx).await?;
        ctx.receive(secured, addr, deadline).await
    };
    let request = tokio::select! {
        r = tokio::time::timeout_at(deadline, handshake) => match r {
            Ok(Some(r)) => r,
            Ok(None) => return,
            Err(_) => {
                debug!(peer = %addr, timeout = ?artim, "no association request within the ARTIM timeout");
                crate::ops::metrics::global().connections_dropped.fetch_add(1, Relaxed);
                return;
            }
        },
        _ = pending.evicted() => {
            debug!(peer = %addr, "pending connection closed to make room for a newer one");
            crate::ops::metrics::global().connections_dropped.fetch_add(1, Relaxed);
            return;
        }
        _ = stop.wait_for(|s| *s) => return,
    };
    ctx.serve(request, pending, stop).await;
}
