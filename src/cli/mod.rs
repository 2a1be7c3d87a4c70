//! The `dicomchain` command line: [`args`] defines it, [`run`] loads the configuration and
//! dispatches, and each command lives in a file of its own or of its kind:
//!
//! - [`serve`]: the node itself;
//! - [`node_api`]: grant, revoke, permissions, erase, forward — through the running node's admin API;
//! - [`local`]: the commands that work from this process and print what they found;
//! - [`audit`] (checkpoint, proof, audit trail), [`verify`], [`export`], [`import`] and
//!   [`client`] (echo, store, find, move, get as an SCU) do the work behind them.

pub mod args;
pub mod audit;
pub mod client;
pub mod export;
pub mod import;
mod local;
mod node_api;
mod serve;
pub mod verify;

use std::process::ExitCode;

pub use args::Cli;
use args::{Command, LedgerAction};
use export::Selection;
use local::*;
use node_api::*;
use serve::serve;

use crate::config::Config;

/// Runs one command: errors become messages on stderr and exit codes here, and nowhere else.
pub fn run(cli: Cli) -> ExitCode {
    // The ledger holds patient attributes and the key files open the rest: whatever this
    // command creates is its owner's only. Export and get write the files the user asked for,
    // where the user's umask decides.
    if !matches!(cli.command, Command::Export { .. } | Command::Get { .. }) {
        crate::util::perms::restrict_umask();
    }
    let mut cfg = match Config::load(&cli.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("dicomchain: {e}");
            return ExitCode::from(2);
        }
    };
    if let Some(aet) = cli.aet {
        if !matches!(
            cli.command,
            Command::Echo { .. }
                | Command::Store { .. }
                | Command::Find { .. }
                | Command::Move { .. }
                | Command::Get { .. }
        ) {
            eprintln!("dicomchain: --aet applies to echo, store, find, move and get only");
            return ExitCode::from(2);
        }
        if !crate::config::valid_ae_title(&aet) {
            eprintln!("dicomchain: --aet {aet:?}: an AE title is 1-16 printable ASCII characters, no backslash");
            return ExitCode::from(2);
        }
        cfg.node.ae_title = aet;
    }
    dispatch(cli.command, cfg, &cli.config)
}

/// Runs one command with its configuration loaded.
fn dispatch(command: Command, cfg: Config, config_path: &std::path::Path) -> ExitCode {
    match command {
        Command::CheckConfig => {
            println!("# effective configuration from {}", config_path.display());
            print!("{}", cfg.render_masked());
            ExitCode::SUCCESS
        }
        Command::Serve { ready_file } => serve(cfg, ready_file),
        Command::Grant { ae, permissions } => run_acl_change(cfg, true, &ae, &permissions),
        Command::Revoke { ae, permissions } => run_acl_change(cfg, false, &ae, &permissions),
        Command::Permissions { json } => run_permissions(cfg, json),
        Command::Erase {
            study,
            patient,
            json,
        } => run_erase(cfg, study, patient, json),
        Command::Audit {
            since,
            ae,
            event,
            json,
        } => {
            let since_micros = match since.as_deref().map(crate::util::time::parse_since) {
                Some(None) => {
                    eprintln!("dicomchain: --since: use YYYY-MM-DD[THH:MM:SS] (UTC) or seconds since the epoch");
                    return ExitCode::from(2);
                }
                Some(t) => t,
                None => None,
            };
            let filter = crate::ops::trail::TrailFilter {
                since_micros,
                ae,
                event,
            };
            print_or_fail(crate::cli::audit::trail(&cfg, &filter, json))
        }
        Command::Forward { action } => run_forward(cfg, action),
        Command::Import { paths, jobs } => run_import(cfg, &paths, jobs),
        Command::Echo { target } => run_client(cfg, Client::Echo, &target),
        Command::Store { target, paths } => run_client(cfg, Client::Store(paths), &target),
        Command::Find {
            target,
            patient_root,
            keys,
        } => run_client(cfg, Client::Find(!patient_root, keys), &target),
        Command::Move {
            target,
            dest,
            patient_root,
            keys,
        } => run_client(cfg, Client::Move(!patient_root, dest, keys), &target),
        Command::Get {
            target,
            out,
            patient_root,
            keys,
        } => run_client(cfg, Client::Get(!patient_root, keys, out), &target),
        Command::Verify {
            ledger_only,
            verifier_key,
            checkpoints,
        } => run_verify(cfg, ledger_only, verifier_key, checkpoints),
        Command::Ledger {
            action: LedgerAction::AcceptRollback,
        } => run_accept_rollback(&cfg),
        Command::Checkpoint { verifier_key } => {
            let r = if verifier_key {
                crate::cli::audit::verifier_key(&cfg).map(|k| format!("{k}\n"))
            } else {
                crate::cli::audit::latest_checkpoint(&cfg)
            };
            print_or_fail(r)
        }
        Command::Proof {
            instance,
            consistency,
        } => {
            let r = match (instance, consistency.as_deref()) {
                (Some(uid), _) => crate::cli::audit::instance_proof(&cfg, &uid),
                (None, Some([old, new])) => crate::cli::audit::consistency_proof(&cfg, *old, *new),
                _ => unreachable!("clap requires --instance or --consistency OLD NEW"),
            };
            print_or_fail(r.map(|v| format!("{v:#}\n")))
        }
        Command::Export {
            study,
            series,
            instance,
            out,
        } => {
            let selection = match (study, series, instance) {
                (Some(s), _, _) => Selection::Study(s),
                (_, Some(s), _) => Selection::Series(s),
                (_, _, Some(s)) => Selection::Instance(s),
                _ => unreachable!("clap requires one of --study, --series, --instance"),
            };
            run_export(cfg, selection, out)
        }
    }
}
