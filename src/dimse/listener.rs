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

use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;
use tracing::{error, info, warn};

use super::service::{self, NodeContext};

/// Most connections being refused at once (each waits at most the ARTIM timeout for its request).
const MAX_REFUSING: usize = 32;

/// Serves associations on `listener` until `shutdown` completes, then drains.
pub async fn run(
    listener: TcpListener,
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
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = &mut shutdown => break,
        };
        let (socket, _addr) = match accepted {
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
                    service::serve(socket, ctx, stop).await;
                    drop(permit);
                });
            }
            Err(_) => match refusing.clone().try_acquire_owned() {
                Ok(permit) => {
                    refusals.spawn(async move {
                        service::refuse_busy(socket, &ctx).await;
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
