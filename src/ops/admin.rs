//! The admin API: what must go through the running node (RocksDB has one writer), on the admin
//! listener under `/v1/`, each request with `Authorization: Bearer <token>` (the token file is
//! created, mode 0600, on first start). `docs/ADMIN.md` documents it.
//!
//! - `GET /v1/permissions`: the effective access rules (JSON);
//! - `POST /v1/grant`, `POST /v1/revoke` with `{"ae": "CT1", "permissions": ["store"]}`: a grant
//!   or revoke entry on the ledger, applied to the running node once durable; answers
//!   `{"seq": N}`.
//! - `GET /v1/audit?since=…&ae=…&event=…`: the audit trail as `{"events": [...]}` (the objects
//!   of `dicomchain audit --json`);
//! - `POST /v1/erase` with `{"study": "UID"}` or `{"patient": "ID"}`: erases every instance of it
//!   by crypto-shredding (see `ledger::erase`), then deletes its pixel objects; answers what was
//!   erased (404 when nothing was found).
//!
//! The client half is here too: `dicomchain grant|revoke|permissions` send these requests.

use std::path::Path;
use std::sync::Arc;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use hyper::{Request, Response, StatusCode};
use serde::{Deserialize, Serialize};

use crate::acl::{LiveAcl, Permission};
use crate::ledger::acl::AclChange;
use crate::ledger::erase::EraseScope;
use crate::ledger::{Ledger, LedgerError};

/// Largest request body accepted.
const MAX_BODY: usize = 64 * 1024;

/// What the API handlers need.
#[derive(Clone)]
pub struct Api {
    pub token: Arc<String>,
    pub ledger: Ledger,
    pub acl: Arc<LiveAcl>,
    /// Held from a change's ledger write until it is applied, so the running rules apply
    /// changes in ledger order.
    pub changing: Arc<tokio::sync::Mutex<()>>,
    /// Where the pixel objects of erased instances are deleted.
    pub store: crate::store::Store,
}

/// `POST /v1/erase`: exactly one of the two.
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EraseRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub study: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub patient: Option<String>,
}

/// The answer to an erasure.
#[derive(Debug, Deserialize, Serialize)]
pub struct EraseView {
    /// The erasure entries on the ledger.
    pub entries: Vec<u64>,
    pub sop_instance_uids: Vec<String>,
    /// Stored entries (instance versions) erased.
    pub versions: u64,
    pub objects_deleted: u64,
    /// Objects the store could not delete now (already shredded; deleted at the next start).
    pub objects_left: u64,
}

/// Reads the token, or creates a random one (mode 0600) when the file does not exist.
pub fn load_or_create_token(path: &Path) -> Result<String, String> {
    match std::fs::read_to_string(path) {
        Ok(t) if t.trim().len() >= 16 => Ok(t.trim().to_string()),
        Ok(_) => Err(format!(
            "{}: the admin token must be at least 16 characters",
            path.display()
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut raw = [0u8; 32];
            getrandom::getrandom(&mut raw).map_err(|e| format!("no randomness: {e}"))?;
            let token = hex::encode(raw);
            crate::util::perms::create_secret_file(path, &token).map_err(|e| e.to_string())?;
            tracing::info!(path = %path.display(), "created the admin API token");
            Ok(token)
        }
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

/// Compares without an early exit, so the time taken does not tell how much of a guess matched.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[derive(Debug, Deserialize, Serialize)]
pub struct ChangeRequest {
    pub ae: String,
    pub permissions: Vec<Permission>,
}

#[derive(Debug, Deserialize, Serialize)]
pub struct PeerView {
    pub ae: String,
    pub permissions: Vec<Permission>,
    pub allowed_addresses: Vec<String>,
    /// Ledger entries that changed it: (seq, grant?, permissions).
    pub changes: Vec<ChangeView>,
}

#[derive(Debug, Deserialize, Serialize)]
pub struct ChangeView {
    pub seq: u64,
    pub grant: bool,
    pub permissions: Vec<Permission>,
}

#[derive(Debug, Deserialize, Serialize)]
pub struct PermissionsView {
    pub allow_unknown_peers: bool,
    pub peers: Vec<PeerView>,
}

fn json(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r
}

fn error(status: StatusCode, why: &str) -> Response<Full<Bytes>> {
    json(status, serde_json::json!({ "error": why }).to_string())
}

/// Whether `headers` carry `Authorization: Bearer <token>`.
pub fn authorized(headers: &hyper::HeaderMap, token: &[u8]) -> bool {
    headers
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|t| same(t.trim().as_bytes(), token))
}

/// Warnings about requests without a valid token: one per source address a minute, so that a
/// flood of them cannot fill the disk (each is still answered 401).
fn unauthorized_warnings() -> &'static crate::ops::throttle::Warnings {
    static W: std::sync::OnceLock<crate::ops::throttle::Warnings> = std::sync::OnceLock::new();
    W.get_or_init(|| crate::ops::throttle::Warnings::new(std::time::Duration::from_secs(60)))
}

/// Answers a request under `/v1/` from `peer`.
pub async fn handle(
    req: Request<hyper::body::Incoming>,
    api: &Api,
    peer: std::net::SocketAddr,
) -> Response<Full<Bytes>> {
    if !authorized(req.headers(), api.token.as_bytes()) {
        if let Some(held_back) = unauthorized_warnings().allow(peer.ip(), std::time::Instant::now())
        {
            tracing::warn!(peer = %peer, path = %req.uri().path(), held_back, "admin API request without a valid token (one warning per address a minute; held_back = those not logged since the last)");
        }
        return error(StatusCode::UNAUTHORIZED, "missing or wrong bearer token");
    }
    let path = req.uri().path().to_string();
    match (req.method().clone(), path.as_str()) {
        (hyper::Method::GET, "/v1/permissions") => {
            json(StatusCode::OK, permissions_view(&api.acl).to_string())
        }
        (hyper::Method::POST, "/v1/grant" | "/v1/revoke") => {
            let grant = path == "/v1/grant";
            let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
                Ok(b) => b.to_bytes(),
                Err(e) => return error(StatusCode::BAD_REQUEST, &format!("body: {e}")),
            };
            let change: ChangeRequest = match serde_json::from_slice(&body) {
                Ok(c) => c,
                Err(e) => return error(StatusCode::BAD_REQUEST, &format!("body: {e}")),
            };
            if !crate::config::valid_ae_title(&change.ae) || change.permissions.is_empty() {
                return error(
                    StatusCode::BAD_REQUEST,
                    "need an AE title (1-16 characters) and at least one permission",
                );
            }
            let _in_order = api.changing.lock().await;
            let recorded = api
                .ledger
                .acl_change(AclChange {
                    grant,
                    ae: change.ae.trim().to_string(),
                    permissions: change.permissions.clone(),
                    by: "admin-api".into(),
                })
                .await;
            match recorded {
                Ok(seq) => {
                    api.acl.apply(
                        &change.ae,
                        crate::acl::Change {
                            seq,
                            grant,
                            permissions: change.permissions.clone(),
                        },
                    );
                    tracing::info!(ae = %change.ae.trim(), grant, permissions = %Permission::list(&change.permissions), seq, "access rules changed");
                    json(
                        StatusCode::OK,
                        serde_json::json!({ "seq": seq }).to_string(),
                    )
                }
                Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, &format!("ledger: {e}")),
            }
        }
        (hyper::Method::GET, "/v1/audit") => {
            let filter = match audit_filter(req.uri().query().unwrap_or("")) {
                Ok(f) => f,
                Err(why) => return error(StatusCode::BAD_REQUEST, &why),
            };
            let ledger = api.ledger.clone();
            let lines = tokio::task::spawn_blocking(move || {
                crate::ops::trail::render(&ledger, &filter, true)
            })
            .await;
            match lines {
                Ok(Ok(text)) => {
                    let events: Vec<serde_json::Value> = text
                        .lines()
                        .filter_map(|l| serde_json::from_str(l).ok())
                        .collect();
                    json(
                        StatusCode::OK,
                        serde_json::json!({ "events": events }).to_string(),
                    )
                }
                Ok(Err(e)) => error(StatusCode::SERVICE_UNAVAILABLE, &format!("ledger: {e}")),
                Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
            }
        }
        (hyper::Method::POST, "/v1/erase") => {
            let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
                Ok(b) => b.to_bytes(),
                Err(e) => return error(StatusCode::BAD_REQUEST, &format!("body: {e}")),
            };
            let scope = match serde_json::from_slice::<EraseRequest>(&body) {
                Ok(EraseRequest {
                    study: Some(uid),
                    patient: None,
                }) if !uid.trim().is_empty() => EraseScope::Study(uid.trim().to_string()),
                Ok(EraseRequest {
                    study: None,
                    patient: Some(id),
                }) if !id.trim().is_empty() => EraseScope::Patient(id.trim().to_string()),
                Ok(_) => {
                    return error(
                        StatusCode::BAD_REQUEST,
                        "give exactly one of \"study\" (a Study Instance UID) or \"patient\" (a Patient ID)",
                    )
                }
                Err(e) => return error(StatusCode::BAD_REQUEST, &format!("body: {e}")),
            };
            erase(api, scope).await
        }
        _ => error(StatusCode::NOT_FOUND, "unknown admin API path"),
    }
}

/// `since=…&ae=…&event=…` (each optional; `since` as `dicomchain audit --since` takes it).
fn audit_filter(query: &str) -> Result<crate::ops::trail::TrailFilter, String> {
    let mut f = crate::ops::trail::TrailFilter::default();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let v = percent_decode(v).ok_or_else(|| format!("{k}: bad percent-encoding"))?;
        match k {
            "since" => {
                f.since_micros =
                    Some(crate::util::time::parse_since(&v).ok_or(
                        "since: use YYYY-MM-DD[THH:MM:SS] (UTC) or seconds since the epoch",
                    )?)
            }
            "ae" => f.ae = Some(v),
            "event" => {
                f.event = Some(
                    v.parse()
                        .map_err(|_| "event: an audit event ID such as 110112")?,
                )
            }
            other => {
                return Err(format!(
                    "unknown query parameter {other:?} (since, ae, event)"
                ))
            }
        }
    }
    Ok(f)
}

/// `%XX` and `+` decoding of a query value; `None` for a malformed escape or non-UTF-8 result.
fn percent_decode(v: &str) -> Option<String> {
    let b = v.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

/// Records the erasure, then deletes the shredded objects (each one's pending note goes once
/// it is deleted; one that cannot be deleted now is deleted at the next start).
async fn erase(api: &Api, scope: EraseScope) -> Response<Full<Bytes>> {
    if let Err(why) = valid_scope(&scope) {
        return error(StatusCode::BAD_REQUEST, &why);
    }
    let erased = match api.ledger.erase(scope, "admin-api".into()).await {
        Ok(e) => e,
        Err(LedgerError::NotFound(why)) => return error(StatusCode::NOT_FOUND, &why),
        Err(LedgerError::Invalid(why)) => return error(StatusCode::BAD_REQUEST, &why),
        Err(e) => return error(StatusCode::SERVICE_UNAVAILABLE, &format!("ledger: {e}")),
    };
    // The objects go in the background (the answer must come before the admin connection's
    // limit, a large study on S3 may take longer); the answer says how far it got by then.
    let total = erased.objects.len() as u64;
    let (first_pass, done) = tokio::sync::oneshot::channel();
    tokio::spawn(delete_erased_objects(
        api.store.clone(),
        api.ledger.clone(),
        erased.objects,
        first_pass,
    ));
    let deleted = match tokio::time::timeout(ERASE_ANSWER_WITHIN, done).await {
        Ok(Ok(n)) => n,
        _ => 0,
    };
    tracing::info!(entries = ?erased.entries, instances = erased.instances.len(), versions = erased.versions, deleted, left = total - deleted, "erased");
    let view = EraseView {
        entries: erased.entries,
        sop_instance_uids: erased.instances,
        versions: erased.versions,
        objects_deleted: deleted,
        objects_left: total - deleted,
    };
    json(
        StatusCode::OK,
        serde_json::to_string(&view).unwrap_or_default(),
    )
}

/// Longest an erase request waits for its objects' deletion before it answers.
const ERASE_ANSWER_WITHIN: std::time::Duration = std::time::Duration::from_secs(40);

/// A Study Instance UID (digits and dots, at most 64) or a Patient ID (at most 64 characters,
/// no control characters or backslash).
fn valid_scope(scope: &EraseScope) -> Result<(), String> {
    match scope {
        EraseScope::Study(uid) => {
            if uid.is_empty()
                || uid.len() > 64
                || !uid.bytes().all(|b| b.is_ascii_digit() || b == b'.')
            {
                return Err(format!(
                    "{uid:?} is not a Study Instance UID (digits and dots, at most 64)"
                ));
            }
        }
        EraseScope::Patient(id) => {
            if id.is_empty()
                || id.chars().count() > 64
                || id.chars().any(|c| c.is_control() || c == '\\')
            {
                return Err(format!(
                    "{id:?} is not a Patient ID (at most 64 characters, no control characters or backslash)"
                ));
            }
        }
    }
    Ok(())
}

/// Deletes the objects of erased instances, eight at a time, and forgets each one's pending
/// note once it is gone. `first_pass` gets how many the first attempt deleted; the others are
/// tried again every 30 s for 10 minutes, then left to the startup reconciliation. They are
/// shredded already (their key records are gone).
async fn delete_erased_objects(
    store: crate::store::Store,
    ledger: Ledger,
    mut objects: Vec<(String, [u8; 32])>,
    first_pass: tokio::sync::oneshot::Sender<u64>,
) {
    use futures_util::StreamExt;
    let mut first_pass = Some(first_pass);
    let mut deleted = 0u64;
    for attempt in 0..=20 {
        if attempt > 0 {
            tokio::time::sleep(std::time::Duration::from_secs(30)).await;
        }
        let results: Vec<(String, [u8; 32], Result<(), String>)> =
            futures_util::stream::iter(std::mem::take(&mut objects))
                .map(|(name, key)| {
                    let store = store.clone();
                    async move {
                        let r = tokio::time::timeout(
                            std::time::Duration::from_secs(30),
                            store.delete(&name),
                        )
                        .await
                        .map_err(|_| "timed out".to_string())
                        .and_then(|r| r.map_err(|e| e.to_string()));
                        (name, key, r)
                    }
                })
                .buffer_unordered(8)
                .collect()
                .await;
        for (name, key, r) in results {
            match r {
                Ok(()) => {
                    deleted += 1;
                    if let Err(e) = ledger.clear_pending(&name) {
                        tracing::warn!(object = %name, error = %e, "cannot clear a pending-object note");
                    }
                }
                Err(e) => {
                    tracing::warn!(object = %name, error = %e, attempt, "cannot delete an erased instance's object yet (already shredded)");
                    objects.push((name, key));
                }
            }
        }
        if let Some(tx) = first_pass.take() {
            let _ = tx.send(deleted);
        }
        if objects.is_empty() {
            return;
        }
    }
    tracing::warn!(
        left = objects.len(),
        "objects of erased instances left for the next start"
    );
}

fn permissions_view(acl: &LiveAcl) -> serde_json::Value {
    let acl = acl.snapshot();
    let view = PermissionsView {
        allow_unknown_peers: acl.allow_unknown(),
        peers: acl
            .entries()
            .into_iter()
            .map(|(ae, rights, changes)| PeerView {
                ae,
                permissions: rights.permissions.into_iter().collect(),
                allowed_addresses: rights.addresses.iter().map(|n| n.to_string()).collect(),
                changes: changes
                    .into_iter()
                    .map(|c| ChangeView {
                        seq: c.seq,
                        grant: c.grant,
                        permissions: c.permissions,
                    })
                    .collect(),
            })
            .collect(),
    };
    serde_json::to_value(view).unwrap_or_default()
}

/// Why a CLI request to the admin API failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{0}")]
    Setup(String),
    #[error("cannot reach the node's admin API at {addr} (is the node running with [admin] listen?): {why}")]
    Unreachable { addr: String, why: String },
    #[error("admin API answered {status}: {body}")]
    Refused { status: u16, body: String },
}

/// Sends one request to the running node's admin API; returns the JSON body.
pub async fn request(
    cfg: &crate::config::Config,
    method: hyper::Method,
    path: &str,
    body: Option<String>,
) -> Result<serde_json::Value, ClientError> {
    let addr = cfg
        .admin
        .listen_addr()
        .map_err(|e| ClientError::Setup(e.to_string()))?
        .ok_or_else(|| {
            ClientError::Setup("[admin] listen is empty: the node serves no admin API".into())
        })?;
    let token = std::fs::read_to_string(&cfg.admin.token_file)
        .map_err(|e| {
            ClientError::Setup(format!(
                "admin token {}: {e}",
                cfg.admin.token_file.display()
            ))
        })?
        .trim()
        .to_string();
    let unreachable = |why: String| ClientError::Unreachable {
        addr: addr.to_string(),
        why,
    };
    let stream = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        tokio::net::TcpStream::connect(addr),
    )
    .await
    .map_err(|_| unreachable("no answer within 10 s".into()))?
    .map_err(|e| unreachable(e.to_string()))?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| unreachable(e.to_string()))?;
    tokio::spawn(conn);
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header(hyper::header::HOST, addr.to_string())
        .header(hyper::header::AUTHORIZATION, format!("Bearer {token}"))
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body.unwrap_or_default())))
        .map_err(|e| ClientError::Setup(e.to_string()))?;
    let rsp = tokio::time::timeout(
        std::time::Duration::from_secs(150),
        sender.send_request(req),
    )
    .await
    .map_err(|_| unreachable("no answer within 150 s".into()))?
    .map_err(|e| unreachable(e.to_string()))?;
    let status = rsp.status().as_u16();
    let bytes = rsp
        .into_body()
        .collect()
        .await
        .map_err(|e| unreachable(e.to_string()))?
        .to_bytes();
    let text = String::from_utf8_lossy(&bytes).to_string();
    if status != 200 {
        return Err(ClientError::Refused { status, body: text });
    }
    serde_json::from_str(&text).map_err(|e| ClientError::Refused {
        status,
        body: format!("not JSON ({e}): {text}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_comparison_and_creation() {
        assert!(same(b"abc", b"abc"));
        assert!(!same(b"abc", b"abd"));
        assert!(!same(b"abc", b"abcd"));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/token");
        let t = load_or_create_token(&path).unwrap();
        assert_eq!(t.len(), 64);
        assert_eq!(load_or_create_token(&path).unwrap(), t);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        std::fs::write(&path, "short").unwrap();
        assert!(load_or_create_token(&path).is_err());
    }

    #[test]
    fn audit_query_parameters() {
        let f = audit_filter("since=2026-11-01&ae=CT%201&event=110112").unwrap();
        assert_eq!(f.ae.as_deref(), Some("CT 1"));
        assert_eq!(f.event, Some(110112));
        assert!(f.since_micros.is_some());
        assert!(audit_filter("").unwrap().ae.is_none());
        for bad in ["since=yesterday", "event=x", "ae=%zz", "ae=%4", "limit=3"] {
            assert!(audit_filter(bad).is_err(), "{bad}");
        }
    }
}
