//! The command line: every command and its options (clap).

use std::path::PathBuf;

use clap::{ArgGroup, Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "dicomchain",
    version,
    about = "A DICOM node with a verifiable ledger"
)]
pub struct Cli {
    /// Configuration file (TOML); DICOMCHAIN__SECTION__KEY environment variables override it.
    #[arg(long, global = true, default_value = "conf/dicomchain.toml")]
    pub config: PathBuf,
    /// Calling AE title of echo/store/find/move/get (default: node.ae_title).
    #[arg(long, global = true)]
    pub aet: Option<String>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
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
pub enum LedgerAction {
    /// Give up what a damaged write-ahead log or a rollback took: opens the ledger cutting its
    /// log at the damage, sets the checkpoint file aside (kept as evidence), records a
    /// security alert, and lets the node start on what is left. Checkpoints signed after this
    /// may fork those given up. Keep a copy of the ledger directory before running it.
    AcceptRollback,
}

#[derive(Subcommand)]
pub enum ForwardAction {
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
