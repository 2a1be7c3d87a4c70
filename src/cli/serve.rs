//! `dicomchain serve`: logging set up for where the output goes, a runtime, the node run until
//! SIGINT or SIGTERM.

use std::process::ExitCode;

use crate::config::Config;

pub(crate) fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
}

/// A runtime, or (said on stderr) the exit `code` of a command that cannot start one.
pub(crate) fn runtime_or(code: ExitCode) -> Result<tokio::runtime::Runtime, ExitCode> {
    runtime().map_err(|e| {
        eprintln!("dicomchain: cannot start the runtime: {e}");
        code
    })
}

pub(crate) fn serve(cfg: Config, ready_file: Option<std::path::PathBuf>) -> ExitCode {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours only for a person at a terminal: journald, log files and shippers get plain text.
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match cfg.node.log_format {
        // One JSON object per line, with the association span's fields, for log shippers.
        crate::config::LogFormat::Json => logs.json().with_current_span(true).init(),
        // Peer-supplied values escaped, so that none can add a line (JSON escapes them itself).
        crate::config::LogFormat::Text => logs.fmt_fields(crate::util::escape::log_fields()).init(),
    }
    // A panicking task must not leave a half-alive node behind (as Garage does): abort, and let
    // systemd restart us. Acknowledged data is already durable.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default_hook(info);
        std::process::abort();
    }));
    let rt = match runtime_or(ExitCode::FAILURE) {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    match rt.block_on(crate::node::run(cfg, ready_file, shutdown_signal())) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("dicomchain: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Completes on SIGINT or SIGTERM.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutdown requested");
}
