//! Counters of the running node, and the admin listener that serves them: `GET /metrics` in the
//! Prometheus text format (0.0.4) and `GET /health` (200 only while the ledger and the object
//! store answer). No patient data is ever a label or a value.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::OnceLock;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Response, StatusCode};

use crate::ledger::Ledger;
use crate::store::Store;

/// Upper bounds (seconds) of the C-STORE latency histogram buckets.
const BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];

/// The node's counters; one set per process ([`global`]).
#[derive(Debug, Default)]
pub struct Metrics {
    pub associations_open: AtomicI64,
    pub associations_total: AtomicU64,
    pub associations_rejected: AtomicU64,
    /// Connections closed before an association request: over their source's rate, evicted
    /// from the pending pool, or silent past the ARTIM timeout.
    pub connections_dropped: AtomicU64,
    pub instances_stored: AtomicU64,
    pub instances_duplicate: AtomicU64,
    pub instances_failed: AtomicU64,
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
    pub object_store_errors: AtomicU64,
    /// Bytes of incoming data sets held in memory now (see `node.max_bytes_in_flight`).
    pub bytes_in_flight: AtomicI64,
    store_buckets: [AtomicU64; BUCKETS.len()],
    store_count: AtomicU64,
    store_micros: AtomicU64,
}

/// The process's metrics.
pub fn global() -> &'static Metrics {
    static M: OnceLock<Metrics> = OnceLock::new();
    M.get_or_init(Metrics::default)
}

impl Metrics {
    /// Records the time from a C-STORE-RQ to its response.
    pub fn observe_store(&self, d: Duration) {
        // The count first: `render` reads the buckets first, so a scrape in between never shows
        // a finite bucket above +Inf (= the count).
        self.store_count.fetch_add(1, Relaxed);
        self.store_micros.fetch_add(d.as_micros() as u64, Relaxed);
        let secs = d.as_secs_f64();
        for (i, bound) in BUCKETS.iter().enumerate() {
            if secs <= *bound {
                self.store_buckets[i].fetch_add(1, Relaxed);
            }
        }
    }

    /// The Prometheus text exposition, with the ledger's size and checkpoint age.
    pub fn render(
        &self,
        ledger_entries: u64,
        checkpoint_age: Option<f64>,
        uncheckpointed: u64,
    ) -> String {
        let mut out = String::new();
        let mut metric = |name: &str, kind: &str, help: &str, value: String| {
            out += &format!("# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n");
        };
        let c = |a: &AtomicU64| a.load(Relaxed).to_string();
        metric(
            "dicomchain_associations_open",
            "gauge",
            "Associations being served now.",
            self.associations_open.load(Relaxed).to_string(),
        );
        metric(
            "dicomchain_associations_total",
            "counter",
            "Associations accepted since start.",
            c(&self.associations_total),
        );
        metric(
            "dicomchain_associations_rejected_total",
            "counter",
            "Association requests rejected since start.",
            c(&self.associations_rejected),
        );
        metric(
            "dicomchain_connections_dropped_total",
            "counter",
            "Connections closed before an association request (rate limit, pending pool full, ARTIM timeout).",
            c(&self.connections_dropped),
        );
        metric(
            "dicomchain_instances_stored_total",
            "counter",
            "Instances stored (new instances and new versions).",
            c(&self.instances_stored),
        );
        metric(
            "dicomchain_instances_duplicate_total",
            "counter",
            "Identical instances received again (acknowledged, not stored twice).",
            c(&self.instances_duplicate),
        );
        metric(
            "dicomchain_instances_failed_total",
            "counter",
            "C-STORE requests answered with a failure status.",
            c(&self.instances_failed),
        );
        metric(
            "dicomchain_bytes_received_total",
            "counter",
            "PDU bytes received on DICOM associations.",
            c(&self.bytes_in),
        );
        metric(
            "dicomchain_bytes_sent_total",
            "counter",
            "PDU bytes sent on DICOM associations.",
            c(&self.bytes_out),
        );
        metric(
            "dicomchain_bytes_in_flight",
            "gauge",
            "Bytes of incoming data sets held in memory across associations.",
            self.bytes_in_flight.load(Relaxed).to_string(),
        );
        metric(
            "dicomchain_object_store_errors_total",
            "counter",
            "C-STORE requests failed by the object store.",
            c(&self.object_store_errors),
        );
        metric(
            "dicomchain_ledger_entries",
            "gauge",
            "Entries in the ledger's hash chain.",
            ledger_entries.to_string(),
        );
        if let Some(age) = checkpoint_age {
            metric(
                "dicomchain_checkpoint_age_seconds",
                "gauge",
                "Seconds since the newest entry the newest signed checkpoint covers (grows on an idle node: alert on the uncovered entries instead).",
                format!("{age:.3}"),
            );
        }
        metric(
            "dicomchain_entries_not_checkpointed",
            "gauge",
            "Ledger entries no signed checkpoint covers yet.",
            uncheckpointed.to_string(),
        );
        out += "# HELP dicomchain_store_duration_seconds Time from C-STORE-RQ to C-STORE-RSP.\n";
        out += "# TYPE dicomchain_store_duration_seconds histogram\n";
        for (i, bound) in BUCKETS.iter().enumerate() {
            out += &format!(
                "dicomchain_store_duration_seconds_bucket{{le=\"{bound}\"}} {}\n",
                self.store_buckets[i].load(Relaxed)
            );
        }
        let count = self.store_count.load(Relaxed);
        out += &format!("dicomchain_store_duration_seconds_bucket{{le=\"+Inf\"}} {count}\n");
        out += &format!(
            "dicomchain_store_duration_seconds_sum {:.6}\n",
            self.store_micros.load(Relaxed) as f64 / 1e6
        );
        out += &format!("dicomchain_store_duration_seconds_count {count}\n");
        out
    }
}

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
    let refusals = std::sync::Arc::new(crate::ops::throttle::Warnings::new(Duration::from_secs(60)));
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_exposition_is_prometheus_text() {
        let m = Metrics::default();
        m.instances_stored.fetch_add(3, Relaxed);
        m.observe_store(Duration::from_millis(3));
        m.observe_store(Duration::from_millis(300));
        let text = m.render(42, Some(1.5), 2);
        assert!(text.contains("# TYPE dicomchain_instances_stored_total counter\ndicomchain_instances_stored_total 3\n"));
        assert!(text.contains("dicomchain_ledger_entries 42\n"));
        assert!(text.contains("dicomchain_checkpoint_age_seconds 1.500\n"));
        assert!(text.contains("dicomchain_entries_not_checkpointed 2\n"));
        assert!(text.contains("dicomchain_store_duration_seconds_bucket{le=\"0.0025\"} 0\n"));
        assert!(text.contains("dicomchain_store_duration_seconds_bucket{le=\"0.005\"} 1\n"));
        assert!(text.contains("dicomchain_store_duration_seconds_bucket{le=\"0.5\"} 2\n"));
        assert!(text.contains("dicomchain_store_duration_seconds_bucket{le=\"+Inf\"} 2\n"));
        assert!(text.contains("dicomchain_store_duration_seconds_count 2\n"));
        // Every sample line is `name value` or `name{labels} value`.
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let (name, value) = line.rsplit_once(' ').unwrap();
            assert!(name.starts_with("dicomchain_"), "{line}");
            assert!(value.parse::<f64>().is_ok(), "{line}");
        }
    }
}
