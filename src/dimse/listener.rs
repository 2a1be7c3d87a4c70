//! The accept loop, in the shape of mini-redis's server: a semaphore bounds the associations
//! served at once to `max_associations`; a connection beyond it is not left waiting in the
//! kernel's backlog (a modality would hang until its own timeout) but gets its A-ASSOCIATE-RQ
//! answered with A-ASSOCIATE-RJ rejected-transient "local limit exceeded", so it retries later.
//! Those refusals are themselves bounded ([`MAX_REFUSING`]); beyond that a connection is closed
//! at once. Every socket gets TCP_NODELAY (without it, Nagle against delayed ACK stalls each
//! C-STORE-RSP by ~40 ms), accept errors back off instead of spinning, and shutdown drains: stop
//! accepting, let every association finish the message it is in within the drain timeout, then
//! abort the rest.

use std::sync::Arc;
use std::time::Duration;

use std::net::SocketAddr;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tracing::{error, info, warn};

use super::connection::Stream;
use super::service::{self, NodeContext};

/// The connection as the association will use it: the TCP socket itself, or TLS over it once
/// the handshake (bounded by the ARTIM timeout) succeeded. `None` when it failed (logged).
async fn secure(
    socket: TcpStream,
    acceptor: Option<TlsAcceptor>,
    addr: &SocketAddr,
    ctx: &NodeContext,
) -> Option<Box<dyn Stream>> {
    let Some(acceptor) = acceptor else {
        return Some(Box::new(socket));
    };
    match tokio::time::timeout(ctx.node.artim_timeout(), acceptor.accept(socket)).await {
        Ok(Ok(tls)) => Some(Box::new(tls)),
        Ok(Err(e)) => {
            info!(peer = %addr, error = %e, "TLS handshake failed");
            crate::metrics::global()
                .associations_rejected
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            None
        }
        Err(_) => {
            info!(peer = %addr, "TLS handshake timed out");
            None
        }
    }
}

/// Most connections being refused at once (each waits at most the ARTIM timeout for its request).
const MAX_REFUSING: usize = 32;

/// Serves associations on `listener` (and, if given, DICOM over TLS on the second listener)
/// until `shutdown` completes, then drains. Both share the association limit.
pub async fn run(
    listener: TcpListener,
    tls: Option<(TcpListener, TlsAcceptor)>,
    ctx: Arc<NodeContext>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let limit = Arc::new(Semaphore::new(ctx.node.max_associations));
    let refusing = Arc::new(Semaphore::new(MAX_REFUSING));
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut tasks = JoinSet::new();
    // Refusals wait for a request, not for work in progress: aborted at once on shutdown.
    let mut refusals = JoinSet::new();
    let mut backoff = Duration::from_millis(50);
    tokio::pin!(shutdown);
    loop {
        let tls_accept = async {
            match &tls {
                Some((l, acceptor)) => (l.accept().await, Some(acceptor.clone())),
                None => std::future::pending().await,
            }
        };
        let (accepted, acceptor) = tokio::select! {
            r = listener.accept() => (r, None),
            r = tls_accept => r,
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
        if let Err(e) = socket.set_nodelay(true) {
            warn!(error = %e, "cannot set TCP_NODELAY");
        }
        while tasks.try_join_next().is_some() {}
        while refusals.try_join_next().is_some() {}
        let ctx = ctx.clone();
        match limit.clone().try_acquire_owned() {
            Ok(permit) => {
                let stop = stop_rx.clone();
                tasks.spawn(async move {
                    let tls = acceptor.is_some();
                    if let Some(stream) = secure(socket, acceptor, &addr, &ctx).await {
                        service::serve(stream, addr.to_string(), tls, ctx, stop).await;
                    }
                    drop(permit);
                });
            }
            Err(_) => match refusing.clone().try_acquire_owned() {
                Ok(permit) => {
                    refusals.spawn(async move {
                        if let Some(stream) = secure(socket, acceptor, &addr, &ctx).await {
                            service::refuse_busy(stream, addr.to_string(), &ctx).await;
                        }
                        drop(permit);
                    });
                }
                Err(_) => {
                    warn!("association limit reached and too many refusals pending: connection closed");
                    crate::metrics::global()
                        .associations_rejected
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            },
        }
    }
    drop(listener);
    refusals.abort_all();
    let open = tasks.len();
    info!(associations = open, drain = ?ctx.node.drain_timeout(), "shutting down: no new associations");
    let _ = stop_tx.send(true);
    let drained = tokio::time::timeout(ctx.node.drain_timeout(), async {
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
