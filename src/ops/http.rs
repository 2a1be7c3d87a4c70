//! The admin listener: `GET /metrics` (the counters of [`super::metrics`] with the ledger's size
//! and checkpoint age), `GET /health` (200 only while the ledger and the object store answer),
//! and the admin API of [`super::admin`], under the bounds of [`super::throttle`].

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Response, StatusCode};

use super::metrics::global;
use crate::ledger::Ledger;
use crate::store::Store;

/// Seconds since the newest entry the newest checkpoint covers (the ledger keeps no signing
/// time; a checkpoint is signed within `checkpoint_interval` of that entry).
fn checkpoint_age(ledger: &Ledger, size: Option<u64>) -> Option<f64> {
    let entry = ledger.entry(size?).ok()??;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .ok()?
        .as_micros() as i64;
    Some((now - entry.time_micros).max(0) as f64 / 1e6)
}

/// Whether the node can serve: the ledger reads, no damage was found in its files, and the
/// object store answers.
async fn health(ledger: &Ledger, store: &Store) -> Result<(), String> {
    ledger.head().map_err(|e| format!("ledger: {e}"))?;
    if let Some(d) = ledger.damage().first() {
        return Err(format!("ledger damaged: {d}"));
    }
    match tokio::time::timeout(
        Duration::from_secs(5),
        store.exists("0000000000000000000000000000000000000000000000000000000000000000"),
    )
    .await
    {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(format!("object store: {e}")),
        Err(_) => Err("object store: no answer within 5 s".into()),
    }
}

fn reply(status: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    if let Ok(v) = content_type.parse() {
        r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    r
}

async fn handle(
    req: Request<hyper::body::Incoming>,
    ledger: Ledger,
    store: Store,
    api: Option<crate::ops::admin::Api>,
    peer: SocketAddr,
) -> Result<Response<Full<Bytes>>, Infallible> {
    if req.uri().path().starts_with("/v1/") {
        return Ok(match &api {
            Some(api) => crate::ops::admin::handle(req, api, peer).await,
            None => reply(StatusCode::NOT_FOUND, "text/plain", "no admin API\n".into()),
        });
    }
    if req.method() != hyper::Method::GET {
        return Ok(reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "GET only\n".into(),
        ));
    }
    Ok(match req.uri().path() {
        "/metrics" => {
            let entries = ledger.len().unwrap_or(0);
            let size = ledger.latest_checkpoint_size().ok().flatten();
            reply(
                StatusCode::OK,
                "text/plain; version=0.0.4",
                global().render(
                    entries,
                    checkpoint_age(&ledger, size),
                    entries.saturating_sub(size.unwrap_or(0)),
                ),
            )
        }
        "/health" => match health(&ledger, &store).await {
            Ok(()) => reply(StatusCode::OK, "text/plain", "ready\n".into()),
            Err(why) => reply(
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                format!("not ready: {why}\n"),
            ),
        },
        _ => reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found: try /metrics or /health\n".into(),
        ),
    })
}

/// Connections not (yet) known to carry a valid admin token: idle ones, and those asking for
/// `/metrics`, `/health` or anything refused. When all are taken, a newcomer evicts the oldest
/// connection still waiting for its request from the busiest address (`throttle::Pool`); when
/// none waits, it is closed at once rather than left in the backlog.
const MAX_OPEN: usize = 64;
/// Of [`MAX_OPEN`], from one source address: one address cannot take every slot.
const MAX_OPEN_PER_ADDRESS: usize = 8;
/// Requests with a valid admin token in progress: their own slots, which unauthenticated or
/// idle connections never take.
const MAX_AUTHENTICATED: usize = 8;
/// From accept to a complete request head. An operator's client sends it at once; an idle
/// connection is closed after this.
const HEAD_DEADLINE: Duration = Duration::from_secs(5);
/// Longest one request may take (an erasure answers within 40 s).
const REQUEST_LIMIT: Duration = Duration::from_secs(60);
/// How long an authenticated request waits for one of its slots before a 503.
const AUTHENTICATED_WAIT: Duration = Duration::from_secs(10);

/// Serves `/metrics`, `/health` and (with `api`) the admin API on `listener` until the task is
/// dropped. One request per connection (no keep-alive), so a connection's life is bounded by
/// [`HEAD_DEADLINE`] and [`REQUEST_LIMIT`].
pub async fn serve_admin(
    listener: tokio::net::TcpListener,
    ledger: Ledger,
    store: Store,
    api: Option<crate::ops::admin::Api>,
) {
    let open = crate::ops::throttle::Pool::new(MAX_OPEN, MAX_OPEN_PER_ADDRESS);
    let authenticated = std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_AUTHENTICATED));
    let refusals =
        std::sync::Arc::new(crate::ops::throttle::Warnings::new(Duration::from_secs(60)));
    loop {
        let (socket, peer) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "admin listener accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let slot = match open.admit(peer.ip(), Some(std::os::fd::AsRawFd::as_raw_fd(&socket))) {
            Ok(s) => s,
            Err(full) => {
                if let Some(held_back) = refusals.allow(peer.ip(), std::time::Instant::now()) {
                    tracing::warn!(peer = %peer, ?full, held_back, "admin connection closed: too many open (one warning per address a minute)");
                }
                drop(socket);
                continue;
            }
        };
        let _ = socket.set_nodelay(true);
        let (ledger, store, api) = (ledger.clone(), store.clone(), api.clone());
        let authenticated = authenticated.clone();
        tokio::spawn(async move {
            let evicted = slot.evicted();
            let deadline = tokio::time::Instant::now() + HEAD_DEADLINE;
            // Until its first bytes arrive a connection may be evicted; a client's request
            // arrives right behind its connection, so only silent ones lose their place.
            let mut first = [0u8; 1];
            tokio::select! {
                r = socket.peek(&mut first) => {
                    // 0: closed before a byte came.
                    if !matches!(r, Ok(n) if n > 0) {
                        return;
                    }
                    slot.started();
                }
                _ = evicted.notified() => return,
                _ = tokio::time::sleep_until(deadline) => return,
            }
            // Given back as soon as the request proves itself, so that it counts in one pool only.
            let slot = std::sync::Arc::new(std::sync::Mutex::new(Some(slot)));
            let head = std::sync::Arc::new(tokio::sync::Notify::new());
            let service = {
                let head = head.clone();
                hyper::service::service_fn(move |req| {
                    head.notify_one();
                    let (ledger, store, api) = (ledger.clone(), store.clone(), api.clone());
                    let (slot, authenticated) = (slot.clone(), authenticated.clone());
                    async move {
                        let token_ok = api.as_ref().is_some_and(|a| {
                            crate::ops::admin::authorized(req.headers(), a.token.as_bytes())
                        });
                        let _held = if token_ok {
                            let permit = tokio::time::timeout(
                                AUTHENTICATED_WAIT,
                                authenticated.acquire_owned(),
                            )
                            .await;
                            match permit {
                                Ok(Ok(p)) => {
                                    slot.lock().unwrap_or_else(|p| p.into_inner()).take();
                                    Some(p)
                                }
                                _ => {
                                    return Ok(reply(
                                        StatusCode::SERVICE_UNAVAILABLE,
                                        "application/json",
                                        "{\"error\":\"admin API busy: retry\"}".into(),
                                    ))
                                }
                            }
                        } else {
                            None
                        };
                        handle(req, ledger, store, api, peer).await
                    }
                })
            };
            let io = hyper_util::rt::TokioIo::new(socket);
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .keep_alive(false)
                .header_read_timeout(HEAD_DEADLINE)
                .serve_connection(io, service);
            tokio::pin!(conn);
            // Our own deadline for the whole request head, whatever hyper's header timer does.
            // (Past its first byte a connection can no longer be evicted.)
            tokio::select! {
                _ = &mut conn => return,
                _ = head.notified() => {}
                _ = tokio::time::sleep_until(deadline) => return,
            }
            let _ = tokio::time::timeout(REQUEST_LIMIT, conn).await;
        });
    }
}

/// Binds the admin listener.
pub async fn bind_admin(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await
}
