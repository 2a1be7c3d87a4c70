//! The accept loop, in the shape of mini-redis's server: a semaphore permit is taken *before*
//! `accept()` (so at most `max_associations` are served and the rest wait in the kernel backlog),
//! every socket gets TCP_NODELAY (without it, Nagle against delayed ACK stalls each C-STORE-RSP
//! by ~40 ms), accept errors back off instead of spinning, and shutdown drains: stop accepting, let
//! every association finish the message it is in within the drain timeout, then abort the rest.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;
use tracing::{error, info, warn};

use super::service::{self, NodeContext};

/// Serves associations on `listener` until `shutdown` completes, then drains.
pub async fn run(
    listener: TcpListener,
    ctx: Arc<NodeContext>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let limit = Arc::new(Semaphore::new(ctx.node.max_associations));
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut tasks = JoinSet::new();
    let mut backoff = Duration::from_millis(50);
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            p = limit.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
            _ = &mut shutdown => break,
        };
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
        let ctx = ctx.clone();
        let stop = stop_rx.clone();
        tasks.spawn(async move {
            service::serve(socket, ctx, stop).await;
            drop(permit);
        });
        while tasks.try_join_next().is_some() {}
    }
    drop(listener);
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
