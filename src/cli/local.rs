//! The commands that work on the node's state from this process (beside a running node, or
//! instead of it): `ledger accept-rollback`, `verify`, `import`, `export`, the SCU commands, and
//! the printing of `audit`, `checkpoint` and `proof` answers. Each turns its result into lines on
//! stdout/stderr and an exit code.

use std::path::PathBuf;
use std::process::ExitCode;

use super::export::{self, Selection};
use super::serve::runtime_or;
use crate::config::Config;

pub(crate) fn run_accept_rollback(cfg: &Config) -> ExitCode {
    match crate::ledger::Ledger::accept_rollback(&cfg.ledger.path) {
        Ok(a) => {
            let given_up = match a.given_up {
                Some(s) if s > a.entries => format!(
                    "{} signed entries given up (the checkpoint file recorded {s})",
                    s - a.entries
                ),
                Some(s) => format!("the checkpoint file recorded {s}"),
                None => "no readable checkpoint file".into(),
            };
            println!(
                "ledger: {} entries kept; {given_up}; old checkpoint file {}; newest checkpoint now {}",
                a.entries,
                a.set_aside
                    .map_or("-".to_string(), |p| format!("set aside as {}", p.display())),
                a.newest.map_or("none".to_string(), |s| s.to_string()),
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("dicomchain: {e}");
            ExitCode::from(2)
        }
    }
}

pub(crate) fn run_verify(
    cfg: Config,
    ledger_only: bool,
    verifier_key: Option<String>,
    checkpoint_files: Vec<PathBuf>,
) -> ExitCode {
    let rt = match runtime_or(ExitCode::from(2)) {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    let opts = crate::cli::verify::Options {
        ledger_only,
        verifier_key,
        checkpoint_files,
    };
    match rt.block_on(crate::cli::verify::run(&cfg, &opts)) {
        Ok(report) => {
            for e in &report.events {
                println!("SECURITY EVENT {e}");
            }
            for e in &report.erasures {
                println!("ERASED {e}");
            }
            for p in &report.problems {
                println!("DAMAGED {}: {}", p.subject, p.what);
            }
            let erased = match (report.erased, report.erased_objects_left) {
                (0, _) => String::new(),
                (n, 0) => format!(", {n} erased"),
                (n, left) => format!(
                    ", {n} erased ({left} shredded object(s) still to be deleted by the node)"
                ),
            };
            let unacked = match report.unacknowledged {
                0 => String::new(),
                n => format!(
                    ", {n} object(s) lost in a crash before their C-STORE was acknowledged (recorded)"
                ),
            };
            println!(
                "verify: {} entries, {} checkpoints, {} pixel objects ({} bytes) checked{}{erased}{unacked}: {}",
                report.entries,
                report.checkpoints,
                report.objects_checked,
                report.bytes_checked,
                if ledger_only { " (ledger only)" } else { "" },
                if report.problems.is_empty() {
                    "everything intact".to_string()
                } else {
                    format!("{} problem(s)", report.problems.len())
                }
            );
            let record = crate::cli::verify::audit_record(&report, ledger_only);
            if let Err(e) = record.spool(&cfg.ledger.event_spool) {
                eprintln!(
                    "dicomchain: cannot leave the verify result for the ledger in {}: {e}",
                    cfg.ledger.event_spool.display()
                );
            }
            if report.problems.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(e) if e.is_damage() => {
            println!("DAMAGED ledger: {e}");
            println!("verify: the ledger's files are damaged; nothing else could be checked");
            ExitCode::from(1)
        }
        Err(e) => {
            eprintln!("dicomchain: verify could not run: {e}");
            ExitCode::from(2)
        }
    }
}

pub(crate) enum Client {
    Echo,
    Store(Vec<PathBuf>),
    Find(bool, Vec<String>),
    Move(bool, String, Vec<String>),
    Get(bool, Vec<String>, PathBuf),
}

/// The SCU commands: exit 0 on success, 1 on a failure status, 2 when it could not run.
pub(crate) fn run_client(cfg: Config, what: Client, target: &str) -> ExitCode {
    use crate::cli::client;
    let target = match client::Target::resolve(&cfg, target) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("dicomchain: {e}");
            return ExitCode::from(2);
        }
    };
    let rt = match runtime_or(ExitCode::from(2)) {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    let ok = |status: u16| status == 0 || (0xB000..=0xBFFF).contains(&status);
    let result: Result<bool, client::ClientError> = rt.block_on(async {
        match what {
            Client::Echo => {
                let (status, t) = client::echo(&cfg, &target).await?;
                println!(
                    "C-ECHO {}@{}:{}: status {status:04X} in {:.1} ms",
                    target.ae_title,
                    target.host,
                    target.port,
                    t.as_secs_f64() * 1000.0
                );
                Ok(ok(status))
            }
            Client::Store(paths) => {
                let sent = client::store(&cfg, &target, &paths).await?;
                let mut good = 0;
                for s in &sent {
                    match &s.result {
                        Ok(status) if ok(*status) => good += 1,
                        Ok(status) => eprintln!("FAILED {}: status {status:04X}", s.path.display()),
                        Err(why) => eprintln!("FAILED {}: {why}", s.path.display()),
                    }
                }
                println!("stored {good} of {} file(s)", sent.len());
                Ok(good == sent.len())
            }
            Client::Find(study_root, keys) => {
                let mut n = 0;
                let (count, status) = client::find(&cfg, &target, study_root, &keys, |m| {
                    n += 1;
                    println!("# match {n}\n{m}");
                })
                .await?;
                println!("{count} match(es), final status {status:04X}");
                Ok(status == 0)
            }
            Client::Move(study_root, dest, keys) => {
                let (status, [_, completed, failed, warning]) =
                    client::move_to(&cfg, &target, study_root, &dest, &keys, |[r, c, f, w]| {
                        eprintln!("remaining {r}, completed {c}, failed {f}, warning {w}")
                    })
                    .await?;
                println!(
                    "C-MOVE to {dest}: status {status:04X}: completed {completed}, failed {failed}, warning {warning}"
                );
                Ok(status == 0)
            }
            Client::Get(study_root, keys, out) => {
                let (status, [_, completed, failed, warning], files) =
                    client::get(&cfg, &target, study_root, &keys, &out).await?;
                println!(
                    "C-GET: status {status:04X}: completed {completed}, failed {failed}, warning {warning}; {} file(s) in {}",
                    files.len(),
                    out.display()
                );
                Ok(status == 0)
            }
        }
    });
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("dicomchain: {e}");
            ExitCode::from(2)
        }
    }
}

pub(crate) fn run_import(cfg: Config, paths: &[PathBuf], jobs: usize) -> ExitCode {
    match crate::cli::import::run(&cfg, paths, jobs) {
        Ok(s) => {
            for (path, why) in &s.invalid {
                eprintln!("INVALID {}: {why}", path.display());
            }
            println!(
                "imported {} instance(s), {} new version(s), {} already stored (skipped), {} invalid; {:.1} MB in {:.1} s ({:.1} MB/s) into the ledger at {}",
                s.imported,
                s.new_versions,
                s.skipped,
                s.invalid.len(),
                s.bytes as f64 / 1e6,
                s.seconds,
                s.bytes as f64 / 1e6 / s.seconds.max(0.001),
                std::fs::canonicalize(&cfg.ledger.path)
                    .unwrap_or_else(|_| cfg.ledger.path.clone())
                    .display()
            );
            if s.invalid.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(e) => {
            eprintln!("dicomchain: import: {e}");
            ExitCode::from(2)
        }
    }
}

pub(crate) fn print_or_fail(r: Result<String, crate::cli::audit::AuditError>) -> ExitCode {
    match r {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("dicomchain: {e}");
            ExitCode::FAILURE
        }
    }
}

pub(crate) fn run_export(cfg: Config, selection: Selection, out: PathBuf) -> ExitCode {
    let rt = match runtime_or(ExitCode::FAILURE) {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    match rt.block_on(export::run(&cfg, &selection, &out)) {
        Ok(report) => {
            for (uid, why) in &report.failed {
                eprintln!("dicomchain: instance {uid} NOT exported: {why}");
            }
            println!(
                "exported {} instance(s) to {}{}",
                report.written.len(),
                out.display(),
                if report.failed.is_empty() {
                    String::new()
                } else {
                    format!("; {} failed the ledger check", report.failed.len())
                }
            );
            if report.failed.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("dicomchain: export failed: {e}");
            ExitCode::FAILURE
        }
    }
}
