//! Starting and stopping the node: open the ledger, open the object store, bind, serve, drain,
//! close — one log line per step, in that order (and the reverse on the way down).

use std::sync::Arc;

use tracing::info;

use crate::archive::ingest::Pipeline;
use crate::config::Config;
use crate::dimse::negotiate::Policy;
use crate::ledger::{Ledger, LedgerError};
use crate::scp::context::NodeContext;
use crate::store::{Store, StoreError};

/// Why the node could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{0}")]
    Config(#[from] crate::config::ConfigError),
    #[error("{0}")]
    Ledger(#[from] LedgerError),
    #[error("object store: {0}")]
    Store(#[from] StoreError),
    #[error("audit syslog: {0}")]
    Syslog(String),
    #[error("admin API token: {0}")]
    Admin(String),
    #[error("DICOM TLS: {0}")]
    Tls(String),
    #[error("startup reconciliation of interrupted C-STOREs: {0}")]
    Reconcile(String),
    #[error("forwarding: {0}")]
    Forward(String),
    #[error("checkpoint signing key: {0}")]
    Key(String),
    /// A key file that group or others can read (see `perms`).
    #[error("{0}")]
    KeyMode(#[from] crate::util::perms::FileError),
    #[error("object master key (security.master_key_file): {0}")]
    MasterKey(String),
    #[error("--ready-file {path}: {source}")]
    ReadyFile {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: String,
        #[source]
        source: std::io::Error,
    },
}

/// Runs the node until `shutdown` completes, then drains and closes the ledger. With
/// `ready_file`, the bound addresses are written there once every listener is bound (see
/// [`write_ready_file`]).
pub async fn run(
    cfg: Config,
    ready_file: Option<std::path::PathBuf>,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), StartError> {
    let addr = cfg.node.listen_addr()?;
    check_permissions(&cfg)?;
    let (ledger, store) = open_state(&cfg).await?;
    let (listener, tls) = bind_dicom(&cfg, addr).await?;
    let local = match (&listener, &tls) {
        (Some(l), _) => l.local_addr().map(|a| a.to_string()).unwrap_or_default(),
        (None, Some((l, _))) => l
            .local_addr()
            .map(|a| format!("{a} (TLS only)"))
            .unwrap_or_default(),
        (None, None) => String::new(),
    };
    let mut rules = cfg.acl();
    for (ae, change) in ledger.acl_history()? {
        rules.apply(&ae, change);
    }
    let acl = Arc::new(crate::acl::LiveAcl::new(rules));
    let services = crate::scp::qr::Services {
        ledger: ledger.clone(),
        store: store.clone(),
        ae_title: cfg.node.ae_title.clone(),
        max_pdu_length: cfg.node.max_pdu_length,
        peers: cfg.peers.values().cloned().collect(),
        event_spool: cfg.ledger.event_spool.clone(),
        stream_above: cfg.node.max_retrieve_buffer_bytes,
        acl: acl.clone(),
    };
    let pipeline = Pipeline::new(
        ledger.clone(),
        store,
        cfg.store.timeout(),
        cfg.node.max_metadata_bytes,
    )
    .with_router(crate::forward::Router::new(&cfg.forward))
    .with_budget(crate::archive::ingest::Budget::new(
        cfg.node.ingest_budget(),
        cfg.node.io_timeout(),
    ));
    // Everything that can fail to start comes before the forwarder's runtime exists.
    let admin_listener = bind_admin(&cfg).await?;
    if let Some(path) = &ready_file {
        let admin = admin_listener.as_ref().map(|(_, l, _)| l);
        write_ready_file(path, &bound_addresses(&listener, &tls, admin)).map_err(|source| {
            StartError::ReadyFile {
                path: path.display().to_string(),
                source,
            }
        })?;
    }
    let forwarder =
        crate::forward::worker::Forwarder::start(services.clone(), &cfg, pipeline.activity())
            .map_err(|e| StartError::Forward(e.to_string()))?;
    let syslog_stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let syslog = match cfg.audit.syslog_addr()? {
        Some(to) => {
            info!(to = %to, "audit trail to syslog (RFC 5424, UDP)");
            Some(
                crate::ops::syslog::start(ledger.clone(), to, syslog_stop.clone())
                    .map_err(|e| StartError::Syslog(e.to_string()))?,
            )
        }
        None => None,
    };
    let ctx = Arc::new(NodeContext {
        services,
        pipeline,
        policy: Policy {
            ae_title: cfg.node.ae_title.clone(),
            check_called_ae: cfg.node.check_called_ae,
            max_pdu_length: cfg.node.max_pdu_length,
        },
        node: cfg.node.clone(),
        acl: acl.clone(),
        admission: crate::dimse::admission::Admission::new(
            crate::dimse::admission::Limits::from_config(&cfg.node),
        ),
        rejections: Default::default(),
        warnings: crate::ops::throttle::Warnings::new(std::time::Duration::from_secs(60)),
    });
    let admin = admin_listener.map(|(addr, l, token)| {
        let addr = l.local_addr().unwrap_or(addr);
        info!(listen = %addr, "admin listener: /metrics, /health, /v1/ (admin API)");
        let api = crate::ops::admin::Api {
            token: Arc::new(token),
            ledger: ledger.clone(),
            acl: acl.clone(),
            changing: Default::default(),
            store: ctx.services.store.clone(),
        };
        tokio::spawn(crate::ops::http::serve_admin(
            l,
            ledger.clone(),
            ctx.services.store.clone(),
            Some(api),
        ))
    });
    info!(ae_title = %cfg.node.ae_title, listen = %local, "listening");
    crate::ops::notify::notify(&format!(
        "READY=1\nSTATUS=listening on {local} as {}",
        cfg.node.ae_title
    ));
    let shutdown = async {
        shutdown.await;
        crate::ops::notify::notify("STOPPING=1\nSTATUS=draining associations");
    };
    crate::dimse::listener::run(listener, tls, ctx, shutdown).await;
    // What is not recorded as delivered stays queued for the next start.
    forwarder.stop(std::time::Duration::from_secs(10)).await;
    if let Some(a) = admin {
        a.abort();
    }
    syslog_stop.store(true, std::sync::atomic::Ordering::Relaxed);
    if let Some(t) = syslog {
        let _ = t.join();
    }
    ledger.close();
    info!("ledger closed; node stopped");
    Ok(())
}

/// Refuses key files others could read (before any is read: one may have been read already)
/// and closes state directories open to group or others, saying which.
fn check_permissions(cfg: &Config) -> Result<(), crate::util::perms::FileError> {
    crate::util::perms::check_key_files(&cfg.key_files())?;
    for (dir, done) in crate::util::perms::tighten_dirs(cfg.state_dirs()) {
        match done {
            Ok(old) => {
                tracing::warn!(path = %dir.display(), old_mode = format!("{old:04o}"), "state directory was open to group or others: now 0700")
            }
            Err(e) => {
                tracing::warn!(path = %dir.display(), error = %e, "state directory is open to group or others and cannot be closed: chmod 700 it")
            }
        }
    }
    Ok(())
}

/// Opens the ledger (checkpointing, scrubbed in the background) and the object store with the
/// master key, and reconciles the objects of C-STOREs a stop interrupted.
async fn open_state(cfg: &Config) -> Result<(Ledger, Store), StartError> {
    let signer = crate::ledger::checkpoint::load_or_create_key(
        &cfg.ledger.signing_key_file,
        &cfg.ledger.origin,
    )
    .map_err(|e| StartError::Key(e.to_string()))?;
    let ledger = Ledger::open_with(
        &cfg.ledger.path,
        Some(crate::ledger::Checkpointing {
            signer,
            origin: cfg.ledger.origin.clone(),
            interval: std::time::Duration::from_secs(cfg.ledger.checkpoint_interval),
        }),
        Some(cfg.ledger.event_spool.clone()),
    )?;
    let head = ledger.head()?;
    info!(path = %cfg.ledger.path.display(), entries = head.map(|h| h.0).unwrap_or(0), "ledger open");
    // A damaged table file shows only when a block of it is read: read them all now, beside
    // serving, so that damage is logged, recorded and reported by /health at once.
    ledger.scrub_in_background();
    let master = crate::archive::ingest::master_key(&ledger, &cfg.security.master_key_file)
        .map_err(StartError::MasterKey)?;
    let store = Store::open(&cfg.store)
        .await?
        .with_master_key(Some(std::sync::Arc::new(master)));
    info!(backend = ?cfg.store.backend, "object store open");
    match crate::archive::ingest::reconcile(&ledger, &store).await {
        Ok(0) => {}
        Ok(n) => info!(deleted = n, "reconciled objects of interrupted C-STOREs"),
        Err(e) => return Err(StartError::Reconcile(e.to_string())),
    }
    Ok((ledger, store))
}

type DicomListeners = (
    Option<tokio::net::TcpListener>,
    Option<(tokio::net::TcpListener, tokio_rustls::TlsAcceptor)>,
);

/// Binds the plain DICOM listener (`addr`, unless off) and the TLS one (when configured).
async fn bind_dicom(
    cfg: &Config,
    addr: Option<std::net::SocketAddr>,
) -> Result<DicomListeners, StartError> {
    let listener = match addr {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .map_err(bind_error(addr))?,
        ),
        None => None,
    };
    let tls = match cfg.node.tls.listen_addr()? {
        Some(addr) => {
            let acceptor = crate::dimse::tls::acceptor(&cfg.node.tls)
                .map_err(|e| StartError::Tls(e.to_string()))?;
            let l = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(bind_error(addr))?;
            info!(listen = %addr, mutual = !cfg.node.tls.client_ca.as_os_str().is_empty(), "DICOM TLS listener");
            Some((l, acceptor))
        }
        None => None,
    };
    Ok((listener, tls))
}

/// The start error of a listener that could not bind `addr`.
fn bind_error(addr: std::net::SocketAddr) -> impl FnOnce(std::io::Error) -> StartError {
    move |source| StartError::Bind {
        addr: addr.to_string(),
        source,
    }
}

type AdminListener = (std::net::SocketAddr, tokio::net::TcpListener, String);

/// Binds the admin listener, when configured, with the API token (created on first start).
async fn bind_admin(cfg: &Config) -> Result<Option<AdminListener>, StartError> {
    Ok(match cfg.admin.listen_addr()? {
        Some(addr) => Some((
            addr,
            crate::ops::http::bind_admin(addr)
                .await
                .map_err(bind_error(addr))?,
            crate::ops::admin::load_or_create_token(&cfg.admin.token_file)
                .map_err(StartError::Admin)?,
        )),
        None => None,
    })
}

/// Every bound listener by name (`dicom`, `tls`, `admin`), for the ready file. Bound, so that
/// connections wait in the backlog until the accept loops run a moment later.
fn bound_addresses(
    listener: &Option<tokio::net::TcpListener>,
    tls: &Option<(tokio::net::TcpListener, tokio_rustls::TlsAcceptor)>,
    admin: Option<&tokio::net::TcpListener>,
) -> Vec<(&'static str, std::net::SocketAddr)> {
    let mut bound = Vec::new();
    if let Some(a) = listener.as_ref().and_then(|l| l.local_addr().ok()) {
        bound.push(("dicom", a));
    }
    if let Some(a) = tls.as_ref().and_then(|(l, _)| l.local_addr().ok()) {
        bound.push(("tls", a));
    }
    if let Some(a) = admin.and_then(|l| l.local_addr().ok()) {
        bound.push(("admin", a));
    }
    bound
}

/// Writes `NAME=ADDRESS:PORT` lines, one per bound listener, to `path` as a whole: a temp file
/// beside it, then a rename, so that a reader never sees half of it.
pub fn write_ready_file(
    path: &std::path::Path,
    bound: &[(&str, std::net::SocketAddr)],
) -> std::io::Result<()> {
    let text: String = bound.iter().map(|(n, a)| format!("{n}={a}\n")).collect();
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)
}
