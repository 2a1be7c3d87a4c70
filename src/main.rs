//! The `dicomchain` command: parse arguments, load the configuration, run. Errors become messages
//! on stderr and exit codes here, and nowhere else.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{ArgGroup, Parser, Subcommand};
use dicomchain::config::Config;
use dicomchain::cli::export::{self, Selection};

#[derive(Parser)]
#[command(
    name = "dicomchain",
    version,
    about = "A DICOM node with a verifiable ledger"
)]
struct Cli {
    /// Configuration file (TOML); DICOMCHAIN__SECTION__KEY environment variables override it.
    #[arg(long, global = true, default_value = "conf/dicomchain.toml")]
    config: PathBuf,
    /// Calling AE title of echo/store/find/move/get (default: node.ae_title).
    #[arg(long, global = true)]
    aet: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the node.
    Serve {
        /// Once every listener is bound, write the addresses they got to this file (one
        /// `NAME=ADDRESS:PORT` line each: `dicom`, `tls`, `admin`), so that a script or test can
        /// configure port 0 and learn the port. Written whole (temp file, rename).
        #[arg(long, value_name = "PATH")]
        ready_file: Option<std::path::PathBuf>,
    },
    /// Validate the configuration and print the effective values (secrets masked).
    CheckConfig,
    /// Print the newest signed checkpoint (C2SP tlog-checkpoint, signed note).
    Checkpoint {
        /// Print the verifier key (`<name>+<hex key id>+<base64 key>`) instead.
        #[arg(long)]
        verifier_key: bool,
    },
    /// Print an RFC 9162 proof as JSON: inclusion of an instance, or consistency of two sizes.
    #[command(group(ArgGroup::new("kind").required(true).args(["instance", "consistency"])))]
    Proof {
        /// SOP Instance UID: proves its latest entry is in the newest checkpoint.
        #[arg(long)]
        instance: Option<String>,
        /// OLD NEW: proves the tree of NEW entries extends the tree of OLD entries.
        #[arg(long, num_args = 2, value_names = ["OLD", "NEW"])]
        consistency: Option<Vec<u64>>,
    },
    /// Audit the ledger and the object store; exit 0 when intact, 1 on damage, 2 when unable.
    Verify {
        /// Check the ledger only, without re-reading the pixel objects.
        #[arg(long)]
        ledger_only: bool,
        /// Verifier key for the checkpoints (default: derived from ledger.signing_key_file).
        #[arg(long)]
        verifier_key: Option<String>,
        /// A checkpoint saved earlier (`dicomchain checkpoint > FILE`) the ledger must still
        /// hold: its size and root. Repeatable. The checkpoint file beside the ledger is always
        /// checked.
        #[arg(long = "checkpoint", value_name = "FILE")]
        checkpoints: Vec<PathBuf>,
    },
    /// Operator actions on the ledger itself; the node must be stopped.
    Ledger {
        #[command(subcommand)]
        action: LedgerAction,
    },
    /// Rebuild stored instances as Part 10 files, checked against the ledger.
    #[command(group(ArgGroup::new("what").required(true).args(["study", "series", "instance"])))]
    Export {
        #[arg(long)]
        study: Option<String>,
        #[arg(long)]
        series: Option<String>,
        #[arg(long)]
        instance: Option<String>,
        /// Output directory (created if missing).
        #[arg(long)]
        out: PathBuf,
    },
    /// Import Part 10 files and folders (an old archive) through the ingest pipeline; the node
    /// must be stopped. Instances already stored are skipped, so an interrupted import is rerun.
    /// Exit 0 when every file was imported or skipped, 1 when some were invalid, 2 when unable.
    Import {
        /// Files and folders (walked recursively).
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        /// Files imported at once.
        #[arg(long, default_value_t = 4)]
        jobs: usize,
    },
    /// C-ECHO a peer: TARGET is AE@host:port or a [peers.NAME] name.
    Echo { target: String },
    /// C-STORE Part 10 files and folders to a peer, each data set exactly as in its file.
    Store {
        target: String,
        #[arg(required = true)]
        paths: Vec<PathBuf>,
    },
    /// C-FIND on a peer; prints every match. Keys as findscu: -k QueryRetrieveLevel=STUDY -k PatientID=X
    Find {
        target: String,
        /// Patient Root (default: Study Root).
        #[arg(short = 'P', long)]
        patient_root: bool,
        /// KEY=VALUE (keyword or gggg,eeee); KEY alone asks for it to be returned.
        #[arg(short = 'k', long = "key", required = true)]
        keys: Vec<String>,
    },
    /// C-MOVE on a peer to a destination AE; prints progress.
    Move {
        target: String,
        /// Move destination AE title (must be known to the peer).
        #[arg(long)]
        dest: String,
        /// Patient Root (default: Study Root).
        #[arg(short = 'P', long)]
        patient_root: bool,
        #[arg(short = 'k', long = "key", required = true)]
        keys: Vec<String>,
    },
    /// C-GET from a peer into a folder (<SOP Instance UID>.dcm, data sets as received).
    Get {
        target: String,
        /// Output directory (created if missing).
        #[arg(long)]
        out: PathBuf,
        /// Patient Root (default: Study Root).
        #[arg(short = 'P', long)]
        patient_root: bool,
        #[arg(short = 'k', long = "key", required = true)]
        keys: Vec<String>,
    },
    /// Grant permissions (echo, store, find, move, get) to an AE title: a ledger entry, in
    /// force at once on the running node (through its admin API).
    Grant {
        ae: String,
        #[arg(required = true)]
        permissions: Vec<String>,
    },
    /// Revoke permissions from an AE title: a ledger entry, in force at once, C-MOVE and C-GET
    /// sub-operations in progress included.
    Revoke {
        ae: String,
        #[arg(required = true)]
        permissions: Vec<String>,
    },
    /// The audit trail kept on the ledger: associations, stores, queries, retrievals, forwards,
    /// grants, revocations and security alerts, each with its DICOM audit event ID (1101xx).
    Audit {
        /// From this time on: YYYY-MM-DD[THH:MM:SS] (UTC) or seconds since the epoch.
        #[arg(long)]
        since: Option<String>,
        /// Only events whose calling AE title or peer is this AE title.
        #[arg(long)]
        ae: Option<String>,
        /// Only this audit event ID, e.g. 110112 (Query).
        #[arg(long)]
        event: Option<u32>,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
    /// The effective access rules of the running node, with the ledger entry of each change.
    Permissions {
        #[arg(long)]
        json: bool,
    },
    /// Store-and-forward: the queue of each destination, and re-queueing of given-up items.
    Forward {
        #[command(subcommand)]
        action: ForwardAction,
    },
    /// Erase every instance of a study or a patient (all versions) by crypto-shredding: their
    /// metadata, index entries and object keys are deleted and the pixel objects with them;
    /// an erasure entry is appended (the chain still verifies). Through the running node.
    #[command(group(clap::ArgGroup::new("scope").required(true).args(["study", "patient"])))]
    Erase {
        /// Study Instance UID.
        #[arg(long)]
        study: Option<String>,
        /// Patient ID.
        #[arg(long)]
        patient: Option<String>,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum LedgerAction {
    /// Give up what a damaged write-ahead log or a rollback took: opens the ledger cutting its
    /// log at the damage, sets the checkpoint file aside (kept as evidence), records a
    /// security alert, and lets the node start on what is left. Checkpoints signed after this
    /// may fork those given up. Keep a copy of the ledger directory before running it.
    AcceptRollback,
}

#[derive(Subcommand)]
enum ForwardAction {
    /// Queue depth, oldest pending item, given-up items and last error per destination.
    Status {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Re-queue the items given up (of one destination, or all); applied by the running node.
    Retry {
        /// A `[peers.NAME]` name; default: every destination.
        #[arg(long)]
        destination: Option<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The ledger holds patient attributes and the key files open the rest: whatever this
    // command creates is its owner's only. Export and get write the files the user asked for,
    // where the user's umask decides.
    if !matches!(cli.command, Command::Export { .. } | Command::Get { .. }) {
        dicomchain::util::perms::restrict_umask();
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
        if !dicomchain::config::valid_ae_title(&aet) {
            eprintln!("dicomchain: --aet {aet:?}: an AE title is 1-16 printable ASCII characters, no backslash");
            return ExitCode::from(2);
        }
        cfg.node.ae_title = aet;
    }
    match cli.command {
        Command::CheckConfig => {
            println!("# effective configuration from {}", cli.config.display());
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
            let since_micros = match since.as_deref().map(dicomchain::cli::audit::parse_since) {
                Some(None) => {
                    eprintln!("dicomchain: --since: use YYYY-MM-DD[THH:MM:SS] (UTC) or seconds since the epoch");
                    return ExitCode::from(2);
                }
                Some(t) => t,
                None => None,
            };
            let filter = dicomchain::cli::audit::TrailFilter {
                since_micros,
                ae,
                event,
            };
            print_or_fail(dicomchain::cli::audit::trail(&cfg, &filter, json))
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
                dicomchain::cli::audit::verifier_key(&cfg).map(|k| format!("{k}\n"))
            } else {
                dicomchain::cli::audit::latest_checkpoint(&cfg)
            };
            print_or_fail(r)
        }
        Command::Proof {
            instance,
            consistency,
        } => {
            let r = match (instance, consistency.as_deref()) {
                (Some(uid), _) => dicomchain::cli::audit::instance_proof(&cfg, &uid),
                (None, Some([old, new])) => dicomchain::cli::audit::consistency_proof(&cfg, *old, *new),
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

fn run_accept_rollback(cfg: &Config) -> ExitCode {
    match dicomchain::ledger::Ledger::accept_rollback(&cfg.ledger.path) {
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

fn run_verify(
    cfg: Config,
    ledger_only: bool,
    verifier_key: Option<String>,
    checkpoint_files: Vec<PathBuf>,
) -> ExitCode {
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("dicomchain: cannot start the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let opts = dicomchain::cli::verify::Options {
        ledger_only,
        verifier_key,
        checkpoint_files,
    };
    match rt.block_on(dicomchain::cli::verify::run(&cfg, &opts)) {
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
            let record = dicomchain::cli::verify::audit_record(&report, ledger_only);
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

enum Client {
    Echo,
    Store(Vec<PathBuf>),
    Find(bool, Vec<String>),
    Move(bool, String, Vec<String>),
    Get(bool, Vec<String>, PathBuf),
}

/// The SCU commands: exit 0 on success, 1 on a failure status, 2 when it could not run.
fn run_client(cfg: Config, what: Client, target: &str) -> ExitCode {
    use dicomchain::cli::client;
    let target = match client::Target::resolve(&cfg, target) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("dicomchain: {e}");
            return ExitCode::from(2);
        }
    };
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("dicomchain: cannot start the runtime: {e}");
            return ExitCode::from(2);
        }
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

fn run_import(cfg: Config, paths: &[PathBuf], jobs: usize) -> ExitCode {
    match dicomchain::cli::import::run(&cfg, paths, jobs) {
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

fn run_forward(cfg: Config, action: ForwardAction) -> ExitCode {
    use dicomchain::forward;
    match action {
        ForwardAction::Status { json } => match forward::status(&cfg) {
            Ok(list) => {
                if json {
                    match serde_json::to_string_pretty(&list) {
                        Ok(t) => println!("{t}"),
                        Err(e) => {
                            eprintln!("dicomchain: {e}");
                            return ExitCode::FAILURE;
                        }
                    }
                } else {
                    let now = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map(|d| d.as_micros() as i64)
                        .unwrap_or(0);
                    print!("{}", forward::render_status(&list, now));
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("dicomchain: forward status: {e}");
                ExitCode::FAILURE
            }
        },
        ForwardAction::Retry { destination } => {
            match forward::retry(&cfg, destination.as_deref()) {
                Ok(n) => {
                    println!("re-queued {n} given-up item(s)");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("dicomchain: forward retry: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn print_or_fail(r: Result<String, dicomchain::cli::audit::AuditError>) -> ExitCode {
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

fn run_acl_change(cfg: Config, grant: bool, ae: &str, names: &[String]) -> ExitCode {
    use dicomchain::acl::Permission;
    let mut permissions = Vec::new();
    for n in names.iter().flat_map(|n| n.split(',')) {
        match Permission::from_name(n) {
            Some(p) => permissions.push(p),
            None => {
                eprintln!("dicomchain: unknown permission {n:?} (echo, store, find, move, get)");
                return ExitCode::from(2);
            }
        }
    }
    let body = serde_json::json!({ "ae": ae, "permissions": permissions }).to_string();
    let path = if grant { "/v1/grant" } else { "/v1/revoke" };
    let result = admin_call(&cfg, hyper::Method::POST, path, Some(body));
    match result {
        Ok(v) => {
            println!(
                "{} {} {ae}: ledger entry {}",
                if grant { "granted" } else { "revoked" },
                Permission::list(&permissions),
                v["seq"]
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("dicomchain: {e}");
            ExitCode::from(2)
        }
    }
}

/// One request to the running node's admin API, from a runtime of its own.
fn admin_call(
    cfg: &Config,
    method: hyper::Method,
    path: &str,
    body: Option<String>,
) -> Result<serde_json::Value, String> {
    let rt = runtime().map_err(|e| e.to_string())?;
    rt.block_on(dicomchain::ops::admin::request(cfg, method, path, body))
        .map_err(|e| e.to_string())
}

fn run_erase(cfg: Config, study: Option<String>, patient: Option<String>, json: bool) -> ExitCode {
    let what = match (&study, &patient) {
        (Some(uid), _) => format!("study {uid}"),
        (_, Some(id)) => format!("patient {id}"),
        _ => unreachable!("clap requires one"),
    };
    let body = serde_json::to_string(&dicomchain::ops::admin::EraseRequest { study, patient })
        .unwrap_or_default();
    let result = admin_call(&cfg, hyper::Method::POST, "/v1/erase", Some(body));
    let v = match result {
        Ok(v) => v,
        Err(e) => {
            eprintln!("dicomchain: erase {what}: {e}");
            return ExitCode::from(2);
        }
    };
    if json {
        println!("{v}");
        return ExitCode::SUCCESS;
    }
    match serde_json::from_value::<dicomchain::ops::admin::EraseView>(v) {
        Ok(view) => {
            println!(
                "erased {what}: {} instance(s), {} stored version(s), {} pixel object(s) deleted{}; erasure entry {}",
                view.sop_instance_uids.len(),
                view.versions,
                view.objects_deleted,
                if view.objects_left > 0 {
                    format!(
                        " ({} more shredded, still being deleted by the node)",
                        view.objects_left
                    )
                } else {
                    String::new()
                },
                view.entries
                    .iter()
                    .map(u64::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("dicomchain: erase {what}: unexpected answer: {e}");
            ExitCode::from(2)
        }
    }
}

fn run_permissions(cfg: Config, json: bool) -> ExitCode {
    let result = admin_call(&cfg, hyper::Method::GET, "/v1/permissions", None);
    let v = match result {
        Ok(v) => v,
        Err(e) => {
            eprintln!("dicomchain: {e}");
            return ExitCode::from(2);
        }
    };
    if json {
        println!("{v:#}");
        return ExitCode::SUCCESS;
    }
    let view: dicomchain::ops::admin::PermissionsView = match serde_json::from_value(v) {
        Ok(view) => view,
        Err(e) => {
            eprintln!("dicomchain: unexpected answer: {e}");
            return ExitCode::from(2);
        }
    };
    println!(
        "unknown AE titles: {}",
        if view.allow_unknown_peers {
            "allowed (everything)"
        } else {
            "refused"
        }
    );
    for p in view.peers {
        let perms: Vec<&str> = p.permissions.iter().map(|x| x.name()).collect();
        let from = if p.allowed_addresses.is_empty() {
            "any address".to_string()
        } else {
            p.allowed_addresses.join(", ")
        };
        println!(
            "{:<16} {:<26} from {from}",
            p.ae,
            if perms.is_empty() {
                "-".to_string()
            } else {
                perms.join(",")
            }
        );
        for c in p.changes {
            let names: Vec<&str> = c.permissions.iter().map(|x| x.name()).collect();
            println!(
                "    entry {}: {} {}",
                c.seq,
                if c.grant { "granted" } else { "revoked" },
                names.join(",")
            );
        }
    }
    ExitCode::SUCCESS
}

fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
}

fn serve(cfg: Config, ready_file: Option<std::path::PathBuf>) -> ExitCode {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours only for a person at a terminal: journald, log files and shippers get plain text.
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match cfg.node.log_format {
        // One JSON object per line, with the association span's fields, for log shippers.
        dicomchain::config::LogFormat::Json => logs.json().with_current_span(true).init(),
        // Peer-supplied values escaped, so that none can add a line (JSON escapes them itself).
        dicomchain::config::LogFormat::Text => {
            logs.fmt_fields(dicomchain::util::escape::log_fields()).init()
        }
    }
    // A panicking task must not leave a half-alive node behind (as Garage does): abort, and let
    // systemd restart us. Acknowledged data is already durable.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default_hook(info);
        std::process::abort();
    }));
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("dicomchain: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(dicomchain::node::run(cfg, ready_file, shutdown_signal())) {
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

fn run_export(cfg: Config, selection: Selection, out: PathBuf) -> ExitCode {
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("dicomchain: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
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
