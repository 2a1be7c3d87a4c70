//! The ledger: a hash chain of [`Entry`]s in RocksDB, the metadata records they commit to, and the
//! index that finds instances.
//!
//! Column families:
//! - `entries`: u64 BE sequence number → encoded [`Entry`] (the chain);
//! - `meta`: sequence number u64 BE → the encoded [`MetadataRecord`] of that entry (separate, so a
//!   record can later be erased without breaking the chain, which only holds its hash). Keyed by
//!   sequence number, a group's records are appended where the memtable and the table files
//!   end instead of landing at random places; ledgers written before this keyed them by
//!   instance key (32 bytes), and those records are read as they are (see [`RecordKey`]);
//! - `index`: `sop\0UID` → latest (seq, version, instance key), every version's seq and the
//!   hierarchy keys of the latest version (to move an instance when a new version changes its
//!   study or series), see [`SopIndex`]; `study\0S\0SE\0UID`, `series\0SE\0UID`,
//!   `patient\0PID\0S\0UID` → (). The value of
//!   a `study` key is `SOP Class UID\0Modality` (for the computed C-FIND attributes). C-FIND's
//!   attribute index: `a\0TTTTTTTT\0value\0S\0SE\0UID` → () for each attribute of
//!   [`crate::find::query::INDEXED`] (tag in hex, value normalised and escaped, see
//!   [`find_key`]), kept with the hierarchy keys so a new version moves them too;
//! - `tree`: leaf index u64 BE → the hashes of the complete subtrees of the RFC 9162 Merkle tree
//!   over the entries (leaf i = entry with sequence number i + 1) that appending leaf i created:
//!   its own hash, then one per level it completed (see [`merkle`], [`node_slot`]). Written in
//!   the same batch as the entries, so the tree always covers exactly the chain;
//! - `checkpoints`: tree size u64 → signed checkpoint note (see [`checkpoint`]); all are kept.
//! - `forward`: the store-and-forward queue (see [`forward`]): `q\0DEST\0seq` for each stored
//!   entry waiting to be forwarded to destination DEST, written in the same batch as the entry;
//!   `f\0DEST\0seq` → why, for those given up; `e\0DEST` → time and text of the last error.
//! - `pending`: a note for each pixel object about to be committed whose entry is not written
//!   yet (see [`pending`]): `0x00 ‖ n` (u64 BE) → instance key ‖ object name, settled by a range
//!   deletion in the batch that records the instance; or object name → instance key (written by
//!   an erasure, by earlier versions, and for notes nobody settled). What is left after a crash
//!   names the objects to check at the next start.
//!
//! **One writer, group commits.** All writes go through a single committer thread: associations
//! send requests over a channel and wait for a reply. The committer takes every request waiting,
//! assigns sequence numbers and chain hashes in order, writes them as one `WriteBatch` with a
//! synced WAL (one fsync for the whole group) and only then replies (pending-object notes
//! waiting with them go first, in a batch of their own without an fsync: see [`pending`]). So
//! a C-STORE-RSP success always follows a durable ledger write, and concurrent associations
//! share fsyncs instead of queueing behind each other's. Being the only writer also makes duplicate detection race-free.

pub mod acl;
mod batch;
pub mod checkpoint;
mod damage;
pub mod entry;
pub mod erase;
pub mod forward;
pub mod merkle;
pub mod pending;
pub mod scrub;
pub mod trail;
pub mod unacked;
pub mod witness;

// Group-local maps keyed by our own numbers and UIDs of at most one group: no need for SipHash.
use rustc_hash::FxHashMap as HashMap;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use rocksdb::{
    ColumnFamilyDescriptor, Direction, IteratorMode, Options, WriteBatch, WriteOptions, DB,
};
use tokio::sync::oneshot;

use damage::read_error;
pub use entry::{Entry, Event, Reason};
pub use forward::{ForwardOutcome, ForwardSummary, ForwardUpdate};
pub use pending::{NoteId, PendingObject};

use crate::instance::{Digest32, IndexAttrs, MetadataRecord};
use crate::util::bytes::{Reader, Truncated};
use crate::instance::ObjectKey;

const CF_ENTRIES: &str = "entries";
const CF_META: &str = "meta";
const CF_INDEX: &str = "index";
const CF_TREE: &str = "tree";
const CF_CHECKPOINTS: &str = "checkpoints";
const CF_FORWARD: &str = "forward";
const CF_PENDING: &str = "pending";
/// The outcome recorded on an integrity-failure entry: Processing failure (PS3.7 C.4, 0110H).
/// An alert is never a success: the instance it names was not delivered.
pub const INTEGRITY_FAILURE_STATUS: u16 = 0x0110;
/// Object name → key record of a sealed pixel object (see `store::sealed`): erasable.
const CF_KEYS: &str = "keys";
/// Key of the master key's check value in the `keys` column family (object names are hex).
const MASTER_CHECK: &[u8] = b"\0master-key-check";
/// The byte after the instance key in a `pending` note for the object of an erased instance.
const ERASED_NOTE: u8 = b'E';
/// Longest an association waits for its ledger write.
const STORE_WAIT: std::time::Duration = std::time::Duration::from_secs(120);
/// How often the committer reads the event spool.
const SPOOL_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);
/// Most requests folded into one group commit.
const MAX_GROUP: usize = 512;
/// Batch bytes reserved per request of a group: an entry, its tree nodes, a metadata record of
/// a typical CT/MR header and its index keys.
const BATCH_BYTES_PER_REQUEST: usize = 2048;
/// Most metadata record bytes folded into one group commit (a group's records exist three times
/// while it is written: the requests', the batch's and the memtable's). A larger record is a
/// group of its own, charged to its data set (see `ingest::COPIES`).
const MAX_GROUP_RECORD_BYTES: usize = 8 * 1024 * 1024;

/// Ledger failures. Writes that fail leave the ledger as it was.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("cannot open ledger at {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: rocksdb::Error,
    },
    /// RocksDB found damaged bytes while opening (its write-ahead log is recovered with
    /// absolute consistency: a damaged record stops the open instead of cutting the log there).
    #[error(
        "the ledger at {path} is damaged and was not opened, so nothing in it was dropped or \
         deleted ({source}). Keep a copy of the directory; then restore the ledger from a backup, \
         or accept the loss of everything after the damage with `dicomchain ledger \
         accept-rollback` (see docs/LEDGER.md)"
    )]
    Damaged {
        path: PathBuf,
        #[source]
        source: rocksdb::Error,
    },
    /// The ledger is shorter than, or differs from, the checkpoint last signed (kept in the
    /// checkpoint file beside it, see [`witness`]).
    #[error(
        "the ledger at {path} does not hold the checkpoint signed last (recorded in {file}): \
         {what}. The node refuses to run on it (it would sign a fork of its own log and could \
         delete acknowledged objects). Keep copies of both; restore the ledger from a backup that \
         holds that checkpoint, or accept the loss with `dicomchain ledger accept-rollback` (see \
         docs/LEDGER.md)"
    )]
    RolledBack {
        path: PathBuf,
        file: PathBuf,
        what: String,
    },
    #[error("{0}")]
    Witness(#[from] witness::WitnessError),
    #[error("ledger write failed: {0}")]
    Write(#[source] rocksdb::Error),
    #[error("ledger read failed: {0}")]
    Read(#[source] rocksdb::Error),
    #[error("ledger is corrupt: {0}")]
    Corrupt(String),
    #[error("ledger is closed")]
    Closed,
    #[error("ledger did not answer within {0:?}")]
    Timeout(std::time::Duration),
    #[error("ledger is open read-only")]
    ReadOnly,
    #[error("{0}")]
    NotFound(String),
    /// A request the ledger refuses as it stands (bad input, not a failure of the ledger).
    #[error("{0}")]
    Invalid(String),
}

/// A request to record one stored instance.
#[derive(Debug, Clone)]
pub struct StoreRequest {
    pub calling_ae: String,
    pub instance_key: Digest32,
    pub record: Vec<u8>,
    pub summary: RecordSummary,
    pub object_name: Option<String>,
    /// The key record of a sealed pixel object (kept under its name in the `keys` column family).
    pub object_key: Option<ObjectKey>,
    pub attrs: IndexAttrs,
    /// Destinations (peer names) the new entry is queued for, in the same batch.
    pub forward_to: Vec<String>,
}

/// The fields of a record the entry commits to (taken from the record, not re-parsed).
#[derive(Debug, Clone)]
pub struct RecordSummary {
    pub sop_class_uid: String,
    pub transfer_syntax: String,
    pub pixel_sha256: Digest32,
    pub pixel_length: u64,
    pub dataset_sha256: Digest32,
    pub dataset_length: u64,
}

impl RecordSummary {
    pub fn of(r: &MetadataRecord) -> RecordSummary {
        RecordSummary {
            sop_class_uid: r.sop_class_uid.clone(),
            transfer_syntax: r.transfer_syntax.clone(),
            pixel_sha256: r.pixel_sha256,
            pixel_length: r.pixel_length,
            dataset_sha256: r.dataset_sha256,
            dataset_length: r.dataset_length,
        }
    }
}

/// What the ledger did with a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreOutcome {
    /// A new entry: the first version of the instance, or a new version of it.
    Stored { seq: u64, version: u32 },
    /// The latest version already has exactly this content; nothing was written.
    Duplicate { seq: u64 },
}

enum Job {
    Store {
        req: StoreRequest,
        reply: oneshot::Sender<Result<StoreOutcome, LedgerError>>,
    },
    Forward {
        update: ForwardUpdate,
        reply: oneshot::Sender<Result<u64, LedgerError>>,
    },
    Acl {
        change: acl::AclChange,
        reply: oneshot::Sender<Result<u64, LedgerError>>,
    },
    Audit {
        record: trail::AuditRecord,
        reply: oneshot::Sender<Result<u64, LedgerError>>,
    },
    /// A pending-object note (see [`pending`]).
    Note {
        name: String,
        key: Digest32,
        reply: oneshot::Sender<Result<NoteId, LedgerError>>,
    },
    /// See [`unacked`].
    Unacknowledged {
        seq: u64,
        reply: oneshot::Sender<Result<u64, LedgerError>>,
    },
    /// Runs alone in its group.
    Erase {
        scope: erase::EraseScope,
        by: String,
        reply: oneshot::Sender<Result<erase::Erased, LedgerError>>,
    },
}

impl Job {
    /// The metadata record bytes this job writes.
    fn record_bytes(&self) -> usize {
        match self {
            Job::Store { req, .. } => req.record.len(),
            _ => 0,
        }
    }
}

/// What planning a job gave, before the group is written.
enum Planned {
    Store(Result<StoreOutcome, LedgerError>),
    Forward(Result<u64, LedgerError>),
    Acl(Result<u64, LedgerError>),
    Audit(Result<u64, LedgerError>),
    Note(Result<NoteId, LedgerError>),
    Unacknowledged(Result<u64, LedgerError>),
    Erase(Result<erase::Erased, LedgerError>),
}

/// Signing of checkpoints by the node.
pub struct Checkpointing {
    pub signer: checkpoint::NoteSigner,
    /// The checkpoint origin line: the log's identity.
    pub origin: String,
    /// At most one new checkpoint per interval, and only when the tree grew.
    pub interval: std::time::Duration,
}

/// Whether an open error means another process (the running node) holds the ledger.
pub fn is_locked(e: &rocksdb::Error) -> bool {
    let text = e.to_string();
    text.contains("lock") && text.contains("Resource temporarily unavailable")
}

/// A cheap, cloneable handle on the ledger.
#[derive(Clone)]
pub struct Ledger {
    inner: Arc<Inner>,
}

struct Inner {
    db: Arc<DB>,
    path: PathBuf,
    tx: Mutex<Option<mpsc::Sender<Job>>>,
    committer: Mutex<Option<std::thread::JoinHandle<()>>>,
    secondary: bool,
    /// Woken after a commit that queued something for forwarding.
    forward_wakeup: Arc<tokio::sync::Notify>,
    /// The pending-object notes not settled yet (the writer only).
    notes: Option<Arc<Mutex<pending::NoteBook>>>,
    /// Damage found in the ledger's files since it was opened, by the read-back or by any read
    /// (see [`damage`]).
    damage: Arc<damage::DamageBook>,
    /// The background scrub: its stop flag and thread (stopped before the committer).
    scrubber: Mutex<Option<Scrubber>>,
}

/// The background scrub's stop flag and thread.
type Scrubber = (
    Arc<std::sync::atomic::AtomicBool>,
    std::thread::JoinHandle<()>,
);

const ALL_CFS: [&str; 8] = [
    CF_ENTRIES,
    CF_META,
    CF_INDEX,
    CF_TREE,
    CF_CHECKPOINTS,
    CF_FORWARD,
    CF_PENDING,
    CF_KEYS,
];

/// Most bytes all column families' memtables hold together before writes wait for a flush.
/// Part of `node.max_bytes_in_flight` (see `config::NodeConfig::ingest_budget`): a memtable
/// keeps a copy of every record written until it is flushed, after its C-STORE has ended.
pub const MEMTABLE_BYTES: usize = 64 * 1024 * 1024;
/// The block cache all column families share.
const BLOCK_CACHE_BYTES: usize = 32 * 1024 * 1024;
/// The metadata family's memtable size. Reopening replays the WAL into memtables of this size,
/// flushing each as it fills: a small one bounds that replay's memory by one memtable and one
/// record rather than by the WAL's size.
const META_WRITE_BUFFER_BYTES: usize = 16 * 1024 * 1024;
/// Metadata records this large or larger are kept in blob files rather than table blocks.
const BLOB_MIN_BYTES: u64 = 512 * 1024;
/// Copies of the largest record the ledger may hold beyond what a C-STORE is charged for while it
/// runs: the last write that took the memtables past [`MEMTABLE_BYTES`], and a blob moved by a
/// compaction.
pub const RECORD_COPIES_AFTER_STORE: usize = 2;

fn cf_descriptors() -> Vec<ColumnFamilyDescriptor> {
    // One cache for all families: RocksDB otherwise gives each family its own 32 MiB.
    let cache = rocksdb::Cache::new_lru_cache(BLOCK_CACHE_BYTES);
    ALL_CFS
        .into_iter()
        .map(|name| {
            let mut o = Options::default();
            o.set_compression_type(rocksdb::DBCompressionType::Lz4);
            // Every new instance looks up its SOP Instance UID, which is usually absent: a bloom
            // filter answers that without reading index blocks.
            let mut table = rocksdb::BlockBasedOptions::default();
            table.set_bloom_filter(10.0, false);
            table.set_block_cache(&cache);
            o.set_block_based_table_factory(&table);
            o.set_write_buffer_size(64 * 1024 * 1024);
            if name == CF_META {
                o.set_write_buffer_size(META_WRITE_BUFFER_BYTES);
                // A large record (a big private element) goes to a blob file as its memtable is
                // flushed, uncompressed: a flush or compaction that kept it in a table block would
                // hold it once per input file, plus the block being built and its compressed copy.
                o.set_enable_blob_files(true);
                o.set_min_blob_size(BLOB_MIN_BYTES);
                // Every compaction moves the live blobs of the files it reads, so that an erased
                // record leaves the blob files with the compaction after its erasure (see
                // `erase`); only records of at least `BLOB_MIN_BYTES` pay for the rewrite.
                o.set_enable_blob_gc(true);
                o.set_blob_gc_age_cutoff(1.0);
            }
            ColumnFamilyDescriptor::new(name, o)
        })
        .collect()
}

fn db_options() -> Options {
    let mut o = Options::default();
    o.create_if_missing(true);
    o.create_missing_column_families(true);
    // Ledger writes are synced per group; keep the WAL fsync honest and bounded in size.
    o.set_max_total_wal_size(256 * 1024 * 1024);
    // All memtables together are bounded (eight families of 64 MiB, two each, could hold
    // 1 GiB): past the bound the largest is flushed, and writes wait while it is.
    o.set_write_buffer_manager(&rocksdb::WriteBufferManager::new_write_buffer_manager(
        MEMTABLE_BYTES,
        true,
    ));
    o.increase_parallelism(2);
    // The committer is the only steady writer: inserting its batches one at a time lets the
    // memtable start each insert where the previous one went (see `batch`).
    o.set_allow_concurrent_memtable_write(false);
    o
}

impl Ledger {
    /// Opens (creating if needed) the ledger as its single writer and starts the committer.
    pub fn open(path: &Path) -> Result<Ledger, LedgerError> {
        Ledger::open_with(path, None, None)
    }

    /// Opens the ledger as its single writer; with `checkpointing`, the committer signs
    /// checkpoints of the tree as it grows.
    ///
    /// Refuses a ledger whose write-ahead log is damaged ([`LedgerError::Damaged`]), and one
    /// that does not hold the checkpoint recorded in its checkpoint file
    /// ([`LedgerError::RolledBack`], see [`witness`]).
    pub fn open_with(
        path: &Path,
        checkpointing: Option<Checkpointing>,
        spool: Option<PathBuf>,
    ) -> Result<Ledger, LedgerError> {
        Ledger::open_writer(path, checkpointing, spool, false).map(|(l, _)| l)
    }

    /// The operator's way out of [`LedgerError::Damaged`] and [`LedgerError::RolledBack`]:
    /// opens the ledger with RocksDB's point-in-time recovery (a damaged write-ahead log is cut
    /// at the damage), sets the checkpoint file aside as evidence (`….rejected-<time>-<pid>`,
    /// never replacing one set aside before), writes a new one from the newest checkpoint the
    /// ledger still holds, and records a security alert on the ledger naming what was given up.
    /// Checkpoints signed later may fork the ones given up: whoever holds those must be told.
    pub fn accept_rollback(path: &Path) -> Result<RollbackAccepted, LedgerError> {
        let (ledger, accepted) = Ledger::open_writer(path, None, None, true)?;
        ledger.close();
        accepted.ok_or_else(|| LedgerError::Corrupt("rollback not recorded".into()))
    }

    fn open_writer(
        path: &Path,
        checkpointing: Option<Checkpointing>,
        spool: Option<PathBuf>,
        accept_rollback: bool,
    ) -> Result<(Ledger, Option<RollbackAccepted>), LedgerError> {
        if let Some(parent) = path.parent() {
            let _ = std::fs::create_dir_all(parent);
        }
        let mut options = db_options();
        if !accept_rollback {
            // The default, point-in-time recovery, replays the log up to the first damaged
            // record and silently drops every record after it, acknowledged and signed ones
            // included. A clean kill leaves whole records (a record is one write(2), and a
            // C-STORE is answered only after its group's fsync), so only damage stops the open.
            options.set_wal_recovery_mode(rocksdb::DBRecoveryMode::AbsoluteConsistency);
            // Absolute consistency catches damaged records only: a write-ahead log deleted, or
            // cut exactly at a record boundary, reads as a log that ended there. With this the
            // MANIFEST records each closed log's synced size and the open fails if one is
            // missing or shorter. RocksDB does not track the live log this way (it would cost a
            // MANIFEST write per sync), so the newest one is covered only as far as the
            // checkpoint file reaches (see `witness`).
            options.set_track_and_verify_wals_in_manifest(true);
        }
        let db = DB::open_cf_descriptors(&options, path, cf_descriptors()).map_err(|source| {
            if scrub::is_corruption(&source) {
                LedgerError::Damaged {
                    path: path.to_path_buf(),
                    source,
                }
            } else {
                LedgerError::Open {
                    path: path.to_path_buf(),
                    source,
                }
            }
        })?;
        let db = Arc::new(db);
        let damage = damage::register(&db);
        let head = read_head(&db)?;
        backfill_tree(&db, head.map(|h| h.0).unwrap_or(0))?;
        let stored_checkpoint = check_last_checkpoint(&db, head.map(|h| h.0).unwrap_or(0))?;
        let witness_path = witness::path_for(path);
        let (witnessed, alerts, accepted) = check_witness(
            &db,
            path,
            &witness_path,
            head.map(|h| h.0).unwrap_or(0),
            accept_rollback,
            checkpointing.as_ref(),
        )?;
        let last_checkpoint = stored_checkpoint.max(witnessed);
        let book = pending::NoteBook::open(&db)?;
        let note_floor = book.first();
        let notes = Arc::new(Mutex::new(book));
        let (tx, rx) = mpsc::channel::<Job>();
        let forward_wakeup = Arc::new(tokio::sync::Notify::new());
        let committer = {
            let db = db.clone();
            let committer = Committer {
                db,
                forward_wakeup: forward_wakeup.clone(),
                head,
                checkpointing,
                spool,
                witness: witness_path,
                last_checkpoint,
                last_signed: None,
                compactor: None,
                notes: notes.clone(),
                note_floor,
                damage: damage.clone(),
            };
            std::thread::Builder::new()
                .name("ledger-committer".into())
                .spawn(move || committer.run(rx))
                .map_err(|e| LedgerError::Corrupt(format!("cannot start committer thread: {e}")))?
        };
        let ledger = Ledger {
            inner: Arc::new(Inner {
                db,
                path: path.to_path_buf(),
                tx: Mutex::new(Some(tx)),
                committer: Mutex::new(Some(committer)),
                secondary: false,
                forward_wakeup,
                notes: Some(notes),
                damage,
                scrubber: Mutex::new(None),
            }),
        };
        for record in alerts {
            ledger.audit(record);
        }
        Ok((ledger, accepted))
    }

    /// Reads every column family back in a thread of its own (see [`scrub`]); damage found is
    /// logged, recorded on the ledger as a security alert and reported by [`Ledger::damage`].
    pub fn scrub_in_background(&self) {
        let Ok(mut slot) = self.inner.scrubber.lock() else {
            return;
        };
        if self.inner.secondary || slot.is_some() {
            return;
        }
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let db = self.inner.db.clone();
        let damage = self.inner.damage.clone();
        let flag = stop.clone();
        let spawned = std::thread::Builder::new()
            .name("ledger-scrub".into())
            .spawn(move || {
                let started = std::time::Instant::now();
                let scan = scrub::scan(&db, &ALL_CFS, &flag);
                if scan.stopped {
                    return;
                }
                if scan.damage.is_empty() {
                    tracing::info!(
                        keys = scan.keys,
                        secs = started.elapsed().as_secs_f64(),
                        "ledger read back: every block's checksum intact"
                    );
                    return;
                }
                for d in scan.damage {
                    damage.note(d, "the read-back after the start");
                }
            });
        match spawned {
            Ok(handle) => *slot = Some((stop, handle)),
            Err(e) => tracing::warn!(error = %e, "cannot start the ledger scrub"),
        }
    }

    /// Damage found in the ledger's files since it was opened (empty when none).
    pub fn damage(&self) -> Vec<scrub::Damage> {
        self.inner.damage.all()
    }

    /// Reads every column family back now (for `verify`, on a read-only view).
    pub fn scrub(&self) -> scrub::Scan {
        scrub::scan(
            &self.inner.db,
            &ALL_CFS,
            &std::sync::atomic::AtomicBool::new(false),
        )
    }

    /// Opens a read-only view that follows a ledger another process (the running node) may be
    /// writing: a RocksDB secondary instance whose own files live in `scratch`.
    pub fn open_secondary(path: &Path, scratch: &Path) -> Result<Ledger, LedgerError> {
        let open_err = |source| LedgerError::Open {
            path: path.to_path_buf(),
            source,
        };
        if !path.join("CURRENT").exists() {
            return Err(LedgerError::Corrupt(format!(
                "no ledger at {}",
                path.display()
            )));
        }
        let mut o = db_options();
        o.create_if_missing(false);
        o.set_max_open_files(-1);
        // Only the column families the primary has: a ledger written by an older version may
        // lack newer ones until the node opens it.
        let present = DB::list_cf(&o, path).map_err(open_err)?;
        let cfs: Vec<&str> = ALL_CFS
            .into_iter()
            .filter(|name| present.iter().any(|p| p == name))
            .collect();
        // The primary deletes table files as it compacts; a secondary that read the manifest
        // just before may not find one. Such a race passes on the next attempt.
        let mut attempt = 0;
        let db = loop {
            let descriptors: Vec<ColumnFamilyDescriptor> = cf_descriptors()
                .into_iter()
                .filter(|d| cfs.contains(&d.name()))
                .collect();
            let opened = DB::open_cf_descriptors_as_secondary(&o, path, scratch, descriptors)
                .and_then(|db| db.try_catch_up_with_primary().map(|()| db));
            match opened {
                Ok(db) => break db,
                Err(e) if attempt < 20 && e.to_string().contains("No such file or directory") => {
                    attempt += 1;
                    std::thread::sleep(std::time::Duration::from_millis(100 * attempt));
                }
                Err(e) => return Err(open_err(e)),
            }
        };
        Ok(Ledger {
            inner: Arc::new(Inner {
                db: Arc::new(db),
                path: path.to_path_buf(),
                tx: Mutex::new(None),
                committer: Mutex::new(None),
                secondary: true,
                forward_wakeup: Arc::new(tokio::sync::Notify::new()),
                notes: None,
                damage: Default::default(),
                scrubber: Mutex::new(None),
            }),
        })
    }

    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// A read-only view reads what the node wrote since it was opened; no-op for the writer.
    pub fn catch_up(&self) {
        if self.inner.secondary {
            if let Err(e) = self.inner.db.try_catch_up_with_primary() {
                tracing::debug!(error = %e, "cannot catch up with the node's ledger");
            }
        }
    }

    /// Records a stored instance; returns once the entry is durable (or was a duplicate).
    pub async fn store(&self, req: StoreRequest) -> Result<StoreOutcome, LedgerError> {
        let (reply, rx) = oneshot::channel();
        self.ask(Job::Store { req, reply }, rx).await
    }

    /// Records forwarding progress (see [`ForwardUpdate`]); returns once it is durable, with the
    /// number of queue items it changed.
    pub async fn forward(&self, update: ForwardUpdate) -> Result<u64, LedgerError> {
        let (reply, rx) = oneshot::channel();
        self.ask(Job::Forward { update, reply }, rx).await
    }

    /// Hands `job` to the committer and waits for its answer on `rx`, at most [`STORE_WAIT`]:
    /// a stalled disk must not hold associations forever (they get A700 and may resend; a
    /// resend of what did land is then recognised as a duplicate).
    async fn ask<T>(
        &self,
        job: Job,
        rx: oneshot::Receiver<Result<T, LedgerError>>,
    ) -> Result<T, LedgerError> {
        match tokio::time::timeout(STORE_WAIT, self.ask_until_done(job, rx)).await {
            Ok(r) => r,
            Err(_) => Err(LedgerError::Timeout(STORE_WAIT)),
        }
    }

    /// Hands `job` to the committer and waits for its answer however long it takes: for changes
    /// that must not become durable after they were reported as failed (the committer always
    /// answers).
    async fn ask_until_done<T>(
        &self,
        job: Job,
        rx: oneshot::Receiver<Result<T, LedgerError>>,
    ) -> Result<T, LedgerError> {
        if self.inner.secondary {
            return Err(LedgerError::ReadOnly);
        }
        self.submit(job)?;
        rx.await.map_err(|_| LedgerError::Closed)?
    }

    fn submit(&self, job: Job) -> Result<(), LedgerError> {
        let tx = self.inner.tx.lock().map_err(|_| LedgerError::Closed)?;
        tx.as_ref()
            .ok_or(LedgerError::Closed)?
            .send(job)
            .map_err(|_| LedgerError::Closed)
    }

    /// Notified after every commit that put something on the forward queue.
    pub fn forward_wakeup(&self) -> Arc<tokio::sync::Notify> {
        self.inner.forward_wakeup.clone()
    }

    /// Stops the committer after it has finished the requests already queued, and flushes.
    pub fn close(&self) {
        self.inner.stop_scrub();
        if let Ok(mut tx) = self.inner.tx.lock() {
            tx.take();
        }
        if let Some(handle) = self.inner.committer.lock().ok().and_then(|mut c| c.take()) {
            let _ = handle.join();
        }
        if !self.inner.secondary {
            let _ = self.inner.db.flush_wal(true);
        }
    }

    fn cf(&self, name: &str) -> Result<&rocksdb::ColumnFamily, LedgerError> {
        self.inner
            .db
            .cf_handle(name)
            .ok_or_else(|| LedgerError::Corrupt(format!("missing column family {name}")))
    }

    /// Whether a ledger entry names object `name` of instance `key`: a sealed object has its
    /// key record (written in the same batch as its entry); a plaintext one (written before
    /// sealing, or by a store without a master key) is named by the instance key alone, and its
    /// entry's batch also puts the record under that key.
    fn names_object(&self, name: &str, key: &Digest32) -> Result<bool, LedgerError> {
        if self.object_key(name)?.is_some() {
            return Ok(true);
        }
        Ok(crate::instance::object_name(key) == name && self.legacy_record(key)?.is_some())
    }

    /// The check value of the master key the objects are sealed with (see
    /// `MasterKey::check_value`), once a node has started with one.
    pub fn master_check(&self) -> Result<Option<Vec<u8>>, LedgerError> {
        let Some(cf) = self.inner.db.cf_handle(CF_KEYS) else {
            return Ok(None);
        };
        self.inner
            .db
            .get_cf(cf, MASTER_CHECK)
            .map_err(read_error(&self.inner.db))
    }

    pub fn set_master_check(&self, value: &[u8]) -> Result<(), LedgerError> {
        if self.inner.secondary {
            return Err(LedgerError::ReadOnly);
        }
        let mut wo = WriteOptions::default();
        wo.set_sync(true);
        self.inner
            .db
            .put_cf_opt(self.cf(CF_KEYS)?, MASTER_CHECK, value, &wo)
            .map_err(LedgerError::Write)
    }

    /// Whether any object key record exists (objects sealed under some master key).
    pub fn has_sealed_objects(&self) -> Result<bool, LedgerError> {
        let Some(cf) = self.inner.db.cf_handle(CF_KEYS) else {
            return Ok(false);
        };
        for item in self.inner.db.iterator_cf(cf, IteratorMode::Start) {
            let (k, _) = item.map_err(read_error(&self.inner.db))?;
            if k[..] != *MASTER_CHECK {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// The key record of a sealed pixel object, if the ledger holds one under this name.
    pub fn object_key(&self, name: &str) -> Result<Option<ObjectKey>, LedgerError> {
        let Some(cf) = self.inner.db.cf_handle(CF_KEYS) else {
            // A secondary view of a ledger the node has not opened since sealing began.
            return Ok(None);
        };
        self.inner
            .db
            .get_cf(cf, name.as_bytes())
            .map_err(read_error(&self.inner.db))?
            .map(|v| {
                ObjectKey::decode(&v)
                    .map_err(|e| LedgerError::Corrupt(format!("key record of object {name}: {e}")))
            })
            .transpose()
    }

    /// The last entry's sequence number and hash, if any.
    pub fn head(&self) -> Result<Option<(u64, Digest32)>, LedgerError> {
        read_head(&self.inner.db)
    }

    pub fn entry(&self, seq: u64) -> Result<Option<Entry>, LedgerError> {
        let raw = self
            .inner
            .db
            .get_cf(self.cf(CF_ENTRIES)?, seq.to_be_bytes())
            .map_err(read_error(&self.inner.db))?;
        raw.map(|b| {
            Entry::decode(&b).map_err(|e| LedgerError::Corrupt(format!("entry {seq}: {e}")))
        })
        .transpose()
    }

    /// The metadata record a stored entry commits to: under its sequence number, or (ledgers
    /// written before records were keyed so) under its instance key. The caller checks it
    /// against the entry's instance key.
    pub fn record_of(&self, entry: &Entry) -> Result<Option<Vec<u8>>, LedgerError> {
        let cf = self.cf(CF_META)?;
        match self
            .inner
            .db
            .get_cf(cf, entry.seq.to_be_bytes())
            .map_err(read_error(&self.inner.db))?
        {
            Some(r) => Ok(Some(r)),
            None => self.legacy_record(&entry.instance_key),
        }
    }

    /// A record under its instance key: every record of a ledger written before records were
    /// keyed by sequence number, and the second copy of a plaintext object's record (see
    /// [`Ledger::names_object`]).
    fn legacy_record(&self, key: &Digest32) -> Result<Option<Vec<u8>>, LedgerError> {
        self.inner
            .db
            .get_cf(self.cf(CF_META)?, key)
            .map_err(read_error(&self.inner.db))
    }

    /// The latest entry of a SOP Instance.
    pub fn latest(&self, sop_instance_uid: &str) -> Result<Option<Entry>, LedgerError> {
        match latest_of(&self.inner.db, sop_instance_uid)? {
            Some((seq, _)) => self.entry(seq),
            None => Ok(None),
        }
    }

    /// Sequence numbers of every version of a SOP Instance, oldest first.
    pub fn versions(&self, sop_instance_uid: &str) -> Result<Vec<u64>, LedgerError> {
        Ok(
            read_sop(&self.inner.db, self.cf(CF_INDEX)?, sop_instance_uid)?
                .map(|i| i.versions)
                .unwrap_or_default(),
        )
    }

    /// SOP Instance UIDs of a study (latest versions only).
    pub fn instances_in_study(&self, study_uid: &str) -> Result<Vec<String>, LedgerError> {
        let prefix = key2("study", study_uid, "");
        Ok(self
            .scan_index(&prefix)?
            .into_iter()
            .filter_map(|rest| {
                let s = String::from_utf8(rest).ok()?;
                s.split_once('\0').map(|(_, sop)| sop.to_string())
            })
            .collect())
    }

    /// SOP Instance UIDs of a series (latest versions only).
    pub fn instances_in_series(&self, series_uid: &str) -> Result<Vec<String>, LedgerError> {
        let prefix = key2("series", series_uid, "");
        Ok(self
            .scan_index(&prefix)?
            .into_iter()
            .filter_map(|rest| String::from_utf8(rest).ok())
            .collect())
    }

    /// The RFC 9162 root hash of the first `size` entries.
    pub fn tree_root(&self, size: u64) -> Result<Digest32, LedgerError> {
        merkle::root(self, size)
    }

    /// The inclusion proof of entry `seq` (leaf `seq - 1`) in the tree of `size` entries.
    pub fn inclusion_proof(&self, seq: u64, size: u64) -> Result<Vec<Digest32>, LedgerError> {
        if seq == 0 || seq > size || size > self.len()? {
            return Err(LedgerError::Corrupt(format!(
                "no entry {seq} in a tree of {size}"
            )));
        }
        merkle::inclusion_proof(self, seq - 1, size)
    }

    /// The consistency proof between the trees of `old` and `new` entries.
    pub fn consistency_proof(&self, old: u64, new: u64) -> Result<Vec<Digest32>, LedgerError> {
        if old > new || new > self.len()? {
            return Err(LedgerError::Corrupt(format!(
                "no consistency proof from {old} to {new}"
            )));
        }
        merkle::consistency_proof(self, old, new)
    }

    /// Visits every entry in sequence order with one sequential scan (for audits).
    pub fn for_each_entry(
        &self,
        mut f: impl FnMut(u64, Result<Entry, LedgerError>),
    ) -> Result<(), LedgerError> {
        let cf = self.cf(CF_ENTRIES)?;
        for item in self.inner.db.iterator_cf(cf, IteratorMode::Start) {
            let (k, v) = item.map_err(read_error(&self.inner.db))?;
            let seq = <[u8; 8]>::try_from(&k[..])
                .map(u64::from_be_bytes)
                .map_err(|_| LedgerError::Corrupt("entry key".into()))?;
            f(
                seq,
                Entry::decode(&v).map_err(|e| LedgerError::Corrupt(format!("entry {seq}: {e}"))),
            );
        }
        Ok(())
    }

    /// Like [`Ledger::for_each_entry`], but a read error (a damaged block) does not end the
    /// walk: the entries after the last one read, up to `upper`, are then read one by one, and
    /// those that cannot be are visited with their error. Returns the error that stopped the
    /// sequential scan, if one did.
    pub fn for_each_entry_salvaging(
        &self,
        upper: u64,
        mut f: impl FnMut(u64, Result<Entry, LedgerError>),
    ) -> Result<Option<LedgerError>, LedgerError> {
        let cf = self.cf(CF_ENTRIES)?;
        let decode = |seq: u64, v: &[u8]| {
            Entry::decode(v).map_err(|e| LedgerError::Corrupt(format!("entry {seq}: {e}")))
        };
        let read_error = read_error(&self.inner.db);
        let mut last = 0;
        for item in self.inner.db.iterator_cf(cf, IteratorMode::Start) {
            let (k, v) = match item {
                Ok(kv) => kv,
                Err(stopped) => {
                    for seq in last + 1..=upper {
                        match self.inner.db.get_cf(cf, seq.to_be_bytes()) {
                            Ok(Some(v)) => f(seq, decode(seq, &v)),
                            Ok(None) => {}
                            Err(e) => f(seq, Err(read_error(e))),
                        }
                    }
                    return Ok(Some(read_error(stopped)));
                }
            };
            let seq = <[u8; 8]>::try_from(&k[..])
                .map(u64::from_be_bytes)
                .map_err(|_| LedgerError::Corrupt("entry key".into()))?;
            last = seq;
            f(seq, decode(seq, &v));
        }
        Ok(None)
    }

    /// The highest sequence number in the entries' table files: how far the chain reaches when
    /// its newest entries cannot be read.
    pub fn entries_in_files(&self) -> Result<u64, LedgerError> {
        Ok(self
            .inner
            .db
            .live_files()
            .map_err(read_error(&self.inner.db))?
            .into_iter()
            .filter(|f| f.column_family_name == CF_ENTRIES)
            .filter_map(|f| f.end_key)
            .filter_map(|k| <[u8; 8]>::try_from(&k[..]).ok().map(u64::from_be_bytes))
            .max()
            .unwrap_or(0))
    }

    /// Visits every metadata record (in key order: those keyed by sequence number first) with
    /// one sequential scan, in batches (for audits that hash them in parallel).
    pub fn for_each_record_batch(
        &self,
        batch: usize,
        mut f: impl FnMut(Vec<(RecordKey, Box<[u8]>)>),
    ) -> Result<(), LedgerError> {
        let cf = self.cf(CF_META)?;
        let mut buf = Vec::with_capacity(batch);
        for item in self.inner.db.iterator_cf(cf, IteratorMode::Start) {
            let (k, v) = item.map_err(read_error(&self.inner.db))?;
            let key = if let Ok(seq) = <[u8; 8]>::try_from(&k[..]) {
                RecordKey::Seq(u64::from_be_bytes(seq))
            } else {
                RecordKey::Instance(
                    <Digest32>::try_from(&k[..])
                        .map_err(|_| LedgerError::Corrupt("record key".into()))?,
                )
            };
            buf.push((key, v));
            if buf.len() == batch {
                f(std::mem::replace(&mut buf, Vec::with_capacity(batch)));
            }
        }
        if !buf.is_empty() {
            f(buf);
        }
        Ok(())
    }

    /// Every stored checkpoint note, oldest (smallest tree) first.
    pub fn checkpoints(&self) -> Result<Vec<(u64, String)>, LedgerError> {
        let cf = self.cf(CF_CHECKPOINTS)?;
        let mut out = Vec::new();
        for item in self.inner.db.iterator_cf(cf, IteratorMode::Start) {
            let (k, v) = item.map_err(read_error(&self.inner.db))?;
            let size = <[u8; 8]>::try_from(&k[..])
                .map(u64::from_be_bytes)
                .map_err(|_| LedgerError::Corrupt("checkpoint key".into()))?;
            out.push((size, String::from_utf8_lossy(&v).into_owned()));
        }
        Ok(out)
    }

    /// The newest signed checkpoint note, if any.
    pub fn latest_checkpoint(&self) -> Result<Option<String>, LedgerError> {
        let cf = self.cf(CF_CHECKPOINTS)?;
        match self.inner.db.iterator_cf(cf, IteratorMode::End).next() {
            None => Ok(None),
            Some(item) => {
                let (_, v) = item.map_err(read_error(&self.inner.db))?;
                Ok(Some(String::from_utf8_lossy(&v).into_owned()))
            }
        }
    }

    /// The tree size of the newest signed checkpoint, if any (without reading the notes).
    pub fn latest_checkpoint_size(&self) -> Result<Option<u64>, LedgerError> {
        let cf = self.cf(CF_CHECKPOINTS)?;
        match self.inner.db.iterator_cf(cf, IteratorMode::End).next() {
            None => Ok(None),
            Some(item) => {
                let (k, _) = item.map_err(read_error(&self.inner.db))?;
                Ok(<[u8; 8]>::try_from(&k[..]).ok().map(u64::from_be_bytes))
            }
        }
    }

    /// Number of entries in the chain.
    pub fn len(&self) -> Result<u64, LedgerError> {
        Ok(self.head()?.map(|(seq, _)| seq).unwrap_or(0))
    }

    pub fn is_empty(&self) -> Result<bool, LedgerError> {
        Ok(self.len()? == 0)
    }

    /// Walks the index keys that start with `prefix`, from `prefix + start` on; `visit` gets
    /// each key (without the prefix) and its value, and says where to go next. Lets C-FIND skip
    /// over the rest of a study or series it has already seen, so its cost follows the matches.
    pub fn scan(
        &self,
        prefix: &[u8],
        start: &[u8],
        mut visit: impl FnMut(&[u8], &[u8]) -> Step,
    ) -> Result<(), LedgerError> {
        let cf = self.cf(CF_INDEX)?;
        let mut it = self.inner.db.raw_iterator_cf(cf);
        let mut first = prefix.to_vec();
        first.extend_from_slice(start);
        it.seek(&first);
        loop {
            let (Some(k), Some(v)) = (it.key(), it.value()) else {
                break;
            };
            if !k.starts_with(prefix) {
                break;
            }
            match visit(&k[prefix.len()..], v) {
                Step::Next => it.next(),
                Step::Seek(to) => it.seek(&to),
                Step::Stop => break,
            }
        }
        it.status().map_err(read_error(&self.inner.db))
    }

    /// The hierarchy keys of the latest version of an instance (study key first).
    pub fn location(&self, sop_instance_uid: &str) -> Result<Vec<Vec<u8>>, LedgerError> {
        Ok(
            read_sop(&self.inner.db, self.cf(CF_INDEX)?, sop_instance_uid)?
                .map(|i| i.keys)
                .unwrap_or_default(),
        )
    }

    /// Keys under `prefix` in the index, with the prefix removed.
    fn scan_index(&self, prefix: &[u8]) -> Result<Vec<Vec<u8>>, LedgerError> {
        keys_under(&self.inner.db, self.cf(CF_INDEX)?, prefix)
    }
}

/// Keys of `cf` that start with `prefix`, with the prefix removed, in key order.
fn keys_under(
    db: &DB,
    cf: &rocksdb::ColumnFamily,
    prefix: &[u8],
) -> Result<Vec<Vec<u8>>, LedgerError> {
    let mut out = Vec::new();
    for item in db.iterator_cf(cf, IteratorMode::From(prefix, Direction::Forward)) {
        let (k, _) = item.map_err(read_error(db))?;
        if !k.starts_with(prefix) {
            break;
        }
        out.push(k[prefix.len()..].to_vec());
    }
    Ok(out)
}

impl Inner {
    /// Stops the background scrub, which would otherwise read a large ledger to its end after
    /// the node was told to stop.
    fn stop_scrub(&self) {
        if let Some((stop, handle)) = self.scrubber.lock().ok().and_then(|mut s| s.take()) {
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            let _ = handle.join();
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.stop_scrub();
        if let Ok(mut tx) = self.tx.lock() {
            tx.take();
        }
        if let Some(handle) = self.committer.lock().ok().and_then(|mut c| c.take()) {
            let _ = handle.join();
        }
    }
}

/// `a\0b\0c` index keys. UIDs and IDs never contain NUL (trailing padding is trimmed on parse).
fn key2(kind: &str, a: &str, b: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(kind.len() + a.len() + b.len() + 2);
    k.extend_from_slice(kind.as_bytes());
    k.push(0);
    k.extend_from_slice(a.as_bytes());
    k.push(0);
    k.extend_from_slice(b.as_bytes());
    k
}

fn sop_key(uid: &str) -> Vec<u8> {
    let mut k = b"sop\0".to_vec();
    k.extend_from_slice(uid.as_bytes());
    k
}

/// `vloc\0SOP`: the [`version_keys`] of every version of a SOP Instance (never shrinks).
fn vloc_key(uid: &str) -> Vec<u8> {
    let mut k = b"vloc\0".to_vec();
    k.extend_from_slice(uid.as_bytes());
    k
}

/// What the index holds about one SOP Instance under `sop\0UID`.
///
/// Value: latest seq u64 ‖ its version u32 ‖ its instance key [32] ‖ count u32 ‖ the seq u64 of
/// every version, oldest first ‖ the latest version's hierarchy keys ([`encode_keys`]). One key
/// per instance: the committer is bound by RocksDB memtable inserts.
#[derive(Clone, Debug, PartialEq)]
struct SopIndex {
    seq: u64,
    version: u32,
    instance_key: Digest32,
    versions: Vec<u64>,
    keys: Vec<Vec<u8>>,
}

impl SopIndex {
    fn encode(&self) -> Vec<u8> {
        let keys = encode_keys(&self.keys);
        let mut v = Vec::with_capacity(48 + self.versions.len() * 8 + keys.len());
        v.extend_from_slice(&self.seq.to_be_bytes());
        v.extend_from_slice(&self.version.to_be_bytes());
        v.extend_from_slice(&self.instance_key);
        v.extend_from_slice(&(self.versions.len() as u32).to_be_bytes());
        for seq in &self.versions {
            v.extend_from_slice(&seq.to_be_bytes());
        }
        v.extend_from_slice(&keys);
        v
    }

    fn decode(uid: &str, v: &[u8]) -> Result<SopIndex, LedgerError> {
        let bad = |_| LedgerError::Corrupt(format!("index value for {uid}"));
        let mut r = Reader::new(v);
        let seq = r.u64().map_err(bad)?;
        let version = r.u32().map_err(bad)?;
        let instance_key = r.array().map_err(bad)?;
        let count = r.u32().map_err(bad)? as usize;
        // Bounded by the value's length before anything is allocated for it.
        if count.checked_mul(8).is_none_or(|n| n > r.rest().len()) {
            return Err(bad(Truncated));
        }
        let versions = (0..count)
            .map(|_| r.u64())
            .collect::<Result<Vec<_>, _>>()
            .map_err(bad)?;
        let rest = r.rest();
        let keys = decode_keys(rest);
        // Every byte accounted for: a cut key list would leave keys an erasure misses.
        if encode_keys(&keys).len() != rest.len() || versions.last() != Some(&seq) {
            return Err(bad(Truncated));
        }
        Ok(SopIndex {
            seq,
            version,
            instance_key,
            versions,
            keys,
        })
    }
}

/// The index of one SOP Instance.
fn read_sop(
    db: &DB,
    cf_index: &rocksdb::ColumnFamily,
    uid: &str,
) -> Result<Option<SopIndex>, LedgerError> {
    db.get_pinned_cf(cf_index, sop_key(uid))
        .map_err(read_error(db))?
        .map(|v| SopIndex::decode(uid, &v))
        .transpose()
}

/// `vstudy\0STUDY\0SOP` / `vpatient\0PID\0SOP` for the study and patient an older version of
/// SOP was filed under (from its hierarchy keys `old`), when the new version `a` is filed
/// elsewhere. Unlike the hierarchy keys they stay, so an erasure finds every instance that was
/// ever part of a study or a patient.
fn moved_from(old: &[Vec<u8>], a: &IndexAttrs) -> Vec<Vec<u8>> {
    let part = |prefix: &[u8]| {
        old.iter()
            .find_map(|k| k.strip_prefix(prefix))
            .and_then(|rest| rest.split(|&b| b == 0).next())
            .map(|v| String::from_utf8_lossy(v).into_owned())
    };
    let mut out = Vec::new();
    if let Some(study) = part(b"study\0").filter(|s| *s != a.study_instance_uid) {
        out.push(key2("vstudy", &study, &a.sop_instance_uid));
    }
    if let Some(pid) = part(b"patient\0").filter(|p| *p != a.patient_id) {
        out.push(key2("vpatient", &pid, &a.sop_instance_uid));
    }
    out
}

/// Escapes an index value so that it holds no NUL (the key separator) and keeps its order and
/// prefixes: NUL → 01 01, 01 → 01 02.
fn escape_value(v: &str, out: &mut Vec<u8>) {
    for &b in v.as_bytes() {
        match b {
            0 => out.extend_from_slice(&[1, 1]),
            1 => out.extend_from_slice(&[1, 2]),
            b => out.push(b),
        }
    }
}

/// The C-FIND attribute index key prefix for `tag` and a value (or value prefix).
pub fn find_key(tag: u32, value: &str) -> Vec<u8> {
    let mut k = format!("a\0{tag:08X}\0").into_bytes();
    escape_value(value, &mut k);
    k
}

/// What a metadata record is filed under in the `meta` column family.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RecordKey {
    /// The sequence number of the entry that commits to it (records written since).
    Seq(u64),
    /// Its instance key (records of older ledgers, and plaintext objects' second copy).
    Instance(Digest32),
}

/// A position in the index scanned by [`Ledger::scan`].
pub enum Step {
    Next,
    /// Seek forward to this full key.
    Seek(Vec<u8>),
    Stop,
}

/// The hierarchy keys of an instance.
fn hierarchy_keys(a: &IndexAttrs) -> Vec<Vec<u8>> {
    let mut study = key2("study", &a.study_instance_uid, &a.series_instance_uid);
    study.push(0);
    study.extend_from_slice(a.sop_instance_uid.as_bytes());
    // Every key names the instance, so moving one instance never unlists another.
    let mut patient = key2("patient", &a.patient_id, &a.study_instance_uid);
    patient.push(0);
    patient.extend_from_slice(a.sop_instance_uid.as_bytes());
    let mut keys = vec![
        study,
        key2("series", &a.series_instance_uid, &a.sop_instance_uid),
        patient,
    ];
    for (tag, value) in &a.find_values {
        let mut k = find_key(*tag, value);
        for part in [
            &a.study_instance_uid,
            &a.series_instance_uid,
            &a.sop_instance_uid,
        ] {
            k.push(0);
            k.extend_from_slice(part.as_bytes());
        }
        keys.push(k);
    }
    keys
}

fn encode_keys(keys: &[Vec<u8>]) -> Vec<u8> {
    let mut out = Vec::new();
    for k in keys {
        out.extend_from_slice(&(k.len() as u32).to_be_bytes());
        out.extend_from_slice(k);
    }
    out
}

fn decode_keys(mut b: &[u8]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    while b.len() >= 4 {
        let n = u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize;
        let Some(k) = b.get(4..4 + n) else { break };
        out.push(k.to_vec());
        b = &b[4 + n..];
    }
    out
}

fn latest_of(db: &DB, uid: &str) -> Result<Option<(u64, u32)>, LedgerError> {
    let cf = db
        .cf_handle(CF_INDEX)
        .ok_or_else(|| LedgerError::Corrupt("missing index".into()))?;
    // Only the leading (seq, version) (see `SopIndex`): this runs for every instance a query or
    // retrieval touches.
    let Some(v) = db.get_pinned_cf(cf, sop_key(uid)).map_err(read_error(db))? else {
        return Ok(None);
    };
    let bad = |_| LedgerError::Corrupt(format!("index value for {uid}"));
    if v.len() < 48 {
        return Err(bad(Truncated));
    }
    let mut r = Reader::new(&v);
    Ok(Some((r.u64().map_err(bad)?, r.u32().map_err(bad)?)))
}

fn read_head(db: &DB) -> Result<Option<(u64, Digest32)>, LedgerError> {
    let cf = db
        .cf_handle(CF_ENTRIES)
        .ok_or_else(|| LedgerError::Corrupt("missing entries".into()))?;
    match db.iterator_cf(cf, IteratorMode::End).next() {
        None => Ok(None),
        Some(item) => {
            let (_, v) = item.map_err(read_error(db))?;
            let e =
                Entry::decode(&v).map_err(|e| LedgerError::Corrupt(format!("last entry: {e}")))?;
            Ok(Some((e.seq, e.hash())))
        }
    }
}

/// The `tree` key of the nodes leaf `leaf` completed (its own hash first, then one per level).
fn tree_key(leaf: u64) -> [u8; 8] {
    leaf.to_be_bytes()
}

/// Where node (level, index) is stored: under the leaf that completed it, the last one it
/// covers, at position `level` of that leaf's value.
fn node_slot(level: u8, index: u64) -> Option<u64> {
    let width = 1u64.checked_shl(u32::from(level))?;
    index.checked_add(1)?.checked_mul(width)?.checked_sub(1)
}

fn read_node(
    db: &DB,
    cf: &rocksdb::ColumnFamily,
    level: u8,
    index: u64,
) -> Result<Digest32, LedgerError> {
    let missing =
        || LedgerError::Corrupt(format!("Merkle tree node ({level}, {index}) is missing"));
    let leaf = node_slot(level, index).ok_or_else(missing)?;
    let at = usize::from(level) * 32;
    db.get_pinned_cf(cf, tree_key(leaf))
        .map_err(read_error(db))?
        .and_then(|v| {
            v.get(at..at + 32)
                .and_then(|h| <Digest32>::try_from(h).ok())
        })
        .ok_or_else(missing)
}

fn read_entry(db: &DB, seq: u64) -> Result<Option<Entry>, LedgerError> {
    let cf = db
        .cf_handle(CF_ENTRIES)
        .ok_or_else(|| LedgerError::Corrupt("missing entries".into()))?;
    db.get_cf(cf, seq.to_be_bytes())
        .map_err(read_error(db))?
        .map(|b| Entry::decode(&b).map_err(|e| LedgerError::Corrupt(e.to_string())))
        .transpose()
}

/// A security event waiting in the spool: `subject_seq=N`, `reason=R`, `detector=NAME` lines,
/// and `calling_ae=AE`, `peer=ADDRESS` when a peer's request found it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpooledEvent {
    pub subject_seq: u64,
    pub reason: Reason,
    pub detector: String,
    /// The calling AE title of the association whose request found it; empty when the node
    /// itself did (export, verify, forwarding).
    pub calling_ae: String,
    /// That association's peer address (empty as `calling_ae`).
    pub peer: String,
}

impl SpooledEvent {
    fn parse(text: &str) -> Option<SpooledEvent> {
        let mut seq = None;
        let mut reason = None;
        let mut detector = None;
        let (mut calling_ae, mut peer) = (String::new(), String::new());
        for line in text.lines() {
            match line.split_once('=')? {
                ("subject_seq", v) => seq = v.parse().ok(),
                ("reason", v) => reason = v.parse().ok().and_then(Reason::from_u8),
                ("detector", v) => detector = Some(v.to_string()),
                ("calling_ae", v) => calling_ae = v.to_string(),
                ("peer", v) => peer = v.to_string(),
                _ => {}
            }
        }
        Some(SpooledEvent {
            subject_seq: seq?,
            reason: reason?,
            detector: detector?,
            calling_ae,
            peer,
        })
    }

    /// Leaves the event in `dir` for the node to record: temp file, fsync, rename, fsync dir.
    pub fn write(&self, dir: &Path) -> std::io::Result<PathBuf> {
        use std::io::Write;
        std::fs::create_dir_all(dir)?;
        let stamp = format!("{}-{}", now_micros(), std::process::id());
        let tmp = dir.join(format!("{stamp}.tmp"));
        let dest = dir.join(format!("{stamp}-{}.event", self.subject_seq));
        let mut f = std::fs::File::create(&tmp)?;
        // Escaped: a peer's title or address must not add a line of its own to the file.
        let esc = crate::util::escape::escape;
        writeln!(
            f,
            "subject_seq={}\nreason={}\ndetector={}\ncalling_ae={}\npeer={}",
            self.subject_seq,
            self.reason as u8,
            esc(&self.detector),
            esc(&self.calling_ae),
            esc(&self.peer)
        )?;
        f.sync_all()?;
        std::fs::rename(&tmp, &dest)?;
        std::fs::File::open(dir)?.sync_all()?;
        Ok(dest)
    }
}

/// The tree nodes that appending `leaf` as leaf number `index` creates: siblings come from
/// `pending` (nodes planned but not yet written) or the database. Nothing is written.
fn plan_tree_nodes(
    db: &DB,
    cf_tree: &rocksdb::ColumnFamily,
    pending: &HashMap<(u8, u64), Digest32>,
    index: u64,
    leaf: Digest32,
) -> Result<Vec<(u8, u64, Digest32)>, LedgerError> {
    merkle::append_nodes(index, leaf, |level, i| match pending.get(&(level, i)) {
        Some(h) => Ok(*h),
        None => read_node(db, cf_tree, level, i),
    })
}

/// Puts the nodes one leaf's append created into a batch, as one value under that leaf (see
/// [`tree_key`]), and remembers them as pending.
fn put_tree_nodes<'a>(
    batch: &mut batch::SortedBatch<'a>,
    cf_tree: &'a rocksdb::ColumnFamily,
    pending: &mut HashMap<(u8, u64), Digest32>,
    nodes: Vec<(u8, u64, Digest32)>,
) {
    let Some(&(_, leaf, _)) = nodes.first() else {
        return;
    };
    let mut value = Vec::with_capacity(nodes.len() * 32);
    for (level, index, hash) in nodes {
        debug_assert_eq!(node_slot(level, index), Some(leaf));
        value.extend_from_slice(&hash);
        pending.insert((level, index), hash);
    }
    batch.put_cf(cf_tree, tree_key(leaf), value);
}

/// The tree as the committer reads it.
struct DbNodes<'a>(&'a DB);

impl merkle::NodeSource for DbNodes<'_> {
    type Error = LedgerError;
    fn node(&self, level: u8, index: u64) -> Result<Digest32, LedgerError> {
        let cf = self
            .0
            .cf_handle(CF_TREE)
            .ok_or_else(|| LedgerError::Corrupt("missing tree".into()))?;
        read_node(self.0, cf, level, index)
    }
}

/// The newest checkpoint's size, after checking that the chain still reaches it and that our
/// tree still has the root it signed. A ledger cut below a signed checkpoint, or rewritten under
/// one, must not carry on as if nothing happened.
fn check_last_checkpoint(db: &DB, entries: u64) -> Result<u64, LedgerError> {
    let cf = db
        .cf_handle(CF_CHECKPOINTS)
        .ok_or_else(|| LedgerError::Corrupt("missing checkpoints".into()))?;
    let Some(item) = db.iterator_cf(cf, IteratorMode::End).next() else {
        return Ok(0);
    };
    let (_, note) = item.map_err(read_error(db))?;
    let note = String::from_utf8_lossy(&note);
    let body_end = note.rfind("\n\n").map(|i| i + 1).unwrap_or(note.len());
    let cp = checkpoint::Checkpoint::parse(&note[..body_end])
        .map_err(|e| LedgerError::Corrupt(format!("newest checkpoint: {e}")))?;
    if cp.size > entries {
        return Err(LedgerError::Corrupt(format!(
            "the chain has {entries} entries but a signed checkpoint covers {}: entries were removed",
            cp.size
        )));
    }
    if merkle::root(&DbNodes(db), cp.size)? != cp.root {
        return Err(LedgerError::Corrupt(format!(
            "the tree no longer has the root signed at size {}: entries were altered",
            cp.size
        )));
    }
    Ok(cp.size)
}

/// What `dicomchain ledger accept-rollback` did.
#[derive(Debug, Clone)]
pub struct RollbackAccepted {
    /// Entries the ledger holds now.
    pub entries: u64,
    /// The size the checkpoint file recorded, if there was a readable one.
    pub given_up: Option<u64>,
    /// Where the old checkpoint file was moved.
    pub set_aside: Option<PathBuf>,
    /// The size of the newest checkpoint the ledger still holds (now in the checkpoint file).
    pub newest: Option<u64>,
}

/// The newest stored checkpoint note and its checkpoint, if any.
fn newest_stored_checkpoint(
    db: &DB,
) -> Result<Option<(String, checkpoint::Checkpoint)>, LedgerError> {
    let cf = db
        .cf_handle(CF_CHECKPOINTS)
        .ok_or_else(|| LedgerError::Corrupt("missing checkpoints".into()))?;
    let Some(item) = db.iterator_cf(cf, IteratorMode::End).next() else {
        return Ok(None);
    };
    let (_, note) = item.map_err(read_error(db))?;
    let note = String::from_utf8_lossy(&note).into_owned();
    let cp = witness::parse_note(&note)
        .map_err(|e| LedgerError::Corrupt(format!("newest checkpoint: {e}")))?;
    Ok(Some((note, cp)))
}

/// A security alert (110113, outcome 1) about the ledger itself, for the trail.
fn ledger_alert(detail: String) -> trail::AuditRecord {
    trail::AuditRecord {
        event_id: trail::id::SECURITY_ALERT,
        calling_ae: "dicomchain".into(),
        peer: "-".into(),
        status: 1,
        detail,
        ..Default::default()
    }
}

fn damage_alert(d: &scrub::Damage) -> trail::AuditRecord {
    ledger_alert(format!("ledger damaged: {d}"))
}

/// Deletes the pending-object notes (but those of erased instances' objects). After a rollback
/// the notes of objects whose entries were lost survive, and the next start would delete those
/// objects as interrupted C-STOREs although they were acknowledged; kept, they are orphans that
/// `verify` lists, from which the instances can be recovered.
fn keep_objects_of_lost_entries(db: &DB) -> Result<(), LedgerError> {
    let cf = db
        .cf_handle(CF_PENDING)
        .ok_or_else(|| LedgerError::Corrupt("missing pending".into()))?;
    let mut batch = WriteBatch::default();
    for item in db.iterator_cf(cf, IteratorMode::Start) {
        let (k, v) = item.map_err(read_error(db))?;
        let numbered = k.len() == 9 && k[0] == 0;
        if numbered || v.get(32) != Some(&ERASED_NOTE) {
            batch.delete_cf(cf, k);
        }
    }
    let mut wo = WriteOptions::default();
    wo.set_sync(true);
    db.write_opt(batch, &wo).map_err(LedgerError::Write)
}

/// Holds the ledger (of `entries` entries) to the checkpoint file at `file` (see [`witness`]):
/// the size it records, the security alerts to append once the committer runs, and with
/// `accept_rollback` what the operator gave up.
fn check_witness(
    db: &DB,
    path: &Path,
    file: &Path,
    entries: u64,
    accept_rollback: bool,
    checkpointing: Option<&Checkpointing>,
) -> Result<(u64, Vec<trail::AuditRecord>, Option<RollbackAccepted>), LedgerError> {
    let stored = newest_stored_checkpoint(db)?;
    if accept_rollback {
        // A damaged file is set aside like a readable one: the operator chose the ledger.
        let old = witness::read(file).ok().flatten();
        let set_aside = witness::set_aside(file)?;
        keep_objects_of_lost_entries(db)?;
        if let Some((note, _)) = &stored {
            witness::write(file, note)?;
        }
        let accepted = RollbackAccepted {
            entries,
            given_up: old.as_ref().map(|(_, cp)| cp.size),
            set_aside,
            newest: stored.as_ref().map(|(_, cp)| cp.size),
        };
        // The alert alone must identify what was given up (the file set aside can be lost):
        // its size and root, and the signed note itself, escaped to stay on one line.
        let given_up = match &old {
            Some((note, cp)) => format!(
                "size {} root {} (note: {})",
                cp.size,
                hex::encode(cp.root),
                crate::util::escape::escape(note)
            ),
            None => "nothing readable".to_string(),
        };
        let alert = ledger_alert(format!(
            "rollback accepted by the operator: the ledger holds {entries} entries; the \
             checkpoint file recorded {given_up} (set aside as {})",
            accepted.set_aside.as_ref().map_or("-".to_string(), |p| {
                crate::util::escape::escape(&p.display().to_string()).into_owned()
            }),
        ));
        tracing::warn!(entries, given_up = ?accepted.given_up, "rollback of the ledger accepted by the operator");
        return Ok((accepted.newest.unwrap_or(0), vec![alert], Some(accepted)));
    }
    match witness::read(file)? {
        None => {
            let Some((note, cp)) = stored else {
                // A new ledger: nothing to record yet, but a file that could not be written
                // would stop the signing later; refuse now, naming the path.
                witness::check_writable(file)?;
                return Ok((0, Vec::new(), None));
            };
            // Either the ledger was last run by a version that kept no such file, or the file
            // was deleted: nothing tells the two apart, so the file is recreated from the
            // ledger (which checked itself against its own newest checkpoint above), loudly.
            tracing::warn!(file = %file.display(), size = cp.size, "the checkpoint file is missing although the ledger has signed checkpoints: recreated from the ledger's newest one (a rollback before now cannot be detected)");
            witness::write(file, &note)?;
            let alert = ledger_alert(format!(
                "checkpoint file {} missing; recreated from the ledger's newest checkpoint at \
                 size {}",
                file.display(),
                cp.size
            ));
            Ok((cp.size, vec![alert], None))
        }
        Some((note, cp)) => {
            let standing = witness::standing(&cp, entries, |n| merkle::root(&DbNodes(db), n))?;
            if let Some(what) = standing.describe() {
                return Err(LedgerError::RolledBack {
                    path: path.to_path_buf(),
                    file: file.to_path_buf(),
                    what,
                });
            }
            let stored_size = stored.as_ref().map_or(0, |(_, s)| s.size);
            if let Some((note, newer)) = stored.filter(|(_, s)| s.size > cp.size) {
                // Stored by an older version (which wrote the file second), and a crash came
                // before the file was written.
                witness::write(file, &note)?;
                tracing::info!(
                    from = cp.size,
                    to = newer.size,
                    "checkpoint file brought up to the ledger's newest checkpoint"
                );
                return Ok((newer.size, Vec::new(), None));
            }
            if cp.size > stored_size {
                // The file was written and a crash came before the checkpoint was stored. Its
                // entries are durable (they are written before the file) and reproduce its root
                // (checked above): store it now, signed again, so the stored checkpoints and
                // the file agree.
                if let Some(signing) = checkpointing {
                    let again = signing.signer.sign(&checkpoint::Checkpoint {
                        origin: signing.origin.clone(),
                        size: cp.size,
                        root: cp.root,
                    });
                    witness::write(file, &again)?;
                    let cf = db
                        .cf_handle(CF_CHECKPOINTS)
                        .ok_or_else(|| LedgerError::Corrupt("missing checkpoints".into()))?;
                    let mut wo = WriteOptions::default();
                    wo.set_sync(true);
                    db.put_cf_opt(cf, cp.size.to_be_bytes(), again.as_bytes(), &wo)
                        .map_err(LedgerError::Write)?;
                    tracing::info!(
                        size = cp.size,
                        stored = stored_size,
                        "checkpoint in the checkpoint file stored (a crash came between the two)"
                    );
                    return Ok((cp.size, Vec::new(), None));
                }
            }
            // Written again, unchanged: a file that can no longer be written is found now,
            // before the node serves, not when the next checkpoint is due.
            witness::write(file, &note)?;
            Ok((cp.size, Vec::new(), None))
        }
    }
}

impl merkle::NodeSource for Ledger {
    type Error = LedgerError;
    fn node(&self, level: u8, index: u64) -> Result<Digest32, LedgerError> {
        read_node(&self.inner.db, self.cf(CF_TREE)?, level, index)
    }
}

/// Makes the Merkle tree cover every entry. Leaves are appended in order, so the tree covers a
/// prefix of the chain; a tree that lags the chain (its newest leaves lost) gets the missing
/// leaves added from the entries here, in synced batches of [`BACKFILL_CHUNK`] leaves. A tree
/// with leaves past the last entry refuses to open.
fn backfill_tree(db: &DB, entries: u64) -> Result<(), LedgerError> {
    let cf_tree = db
        .cf_handle(CF_TREE)
        .ok_or_else(|| LedgerError::Corrupt("missing tree".into()))?;
    let lo = leaves_held(entries, |i| {
        db.get_pinned_cf(cf_tree, tree_key(i))
            .map(|v| v.is_some())
            .map_err(read_error(db))
    })?;
    if lo == entries {
        return Ok(());
    }
    tracing::warn!(
        from = lo,
        to = entries,
        "Merkle tree behind the chain: adding the missing leaves"
    );
    // Written in leaf order, a synced batch every BACKFILL_CHUNK leaves (memory stays bounded
    // on a large ledger; after a crash the search above resumes where the leaves stop).
    let mut batch = batch::SortedBatch::with_capacity_bytes(0);
    let mut new_nodes: HashMap<(u8, u64), Digest32> = HashMap::default();
    let mut wo = WriteOptions::default();
    wo.set_sync(true);
    for_each_entry_from(db, lo, entries, |i, raw| {
        let created = plan_tree_nodes(db, cf_tree, &new_nodes, i, merkle::leaf_hash(raw))?;
        put_tree_nodes(&mut batch, cf_tree, &mut new_nodes, created);
        if (i + 1 - lo) % BACKFILL_CHUNK == 0 {
            let full = std::mem::replace(&mut batch, batch::SortedBatch::with_capacity_bytes(0));
            db.write_opt(full.into_write_batch(), &wo)
                .map_err(LedgerError::Write)?;
            new_nodes.clear();
        }
        Ok(())
    })?;
    db.write_opt(batch.into_write_batch(), &wo)
        .map_err(LedgerError::Write)
}

/// How many leaves the tree holds, counted from leaf 0 (they are always a prefix), given whether
/// it holds leaf i. Tree and entries are written in one batch: a leaf past
/// the last entry means entries were cut from the end of the chain.
fn leaves_held(
    entries: u64,
    has_leaf: impl Fn(u64) -> Result<bool, LedgerError>,
) -> Result<u64, LedgerError> {
    if has_leaf(entries)? {
        return Err(LedgerError::Corrupt(format!(
            "the Merkle tree has leaves beyond the chain's {entries} entries: entries were removed"
        )));
    }
    if entries == 0 || has_leaf(entries - 1)? {
        return Ok(entries);
    }
    // The first leaf index without a node.
    let (mut lo, mut hi) = (0u64, entries - 1);
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        if has_leaf(mid)? {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    Ok(lo)
}

/// Leaves per synced batch when the tree is (re)built at open.
const BACKFILL_CHUNK: u64 = 65_536;

/// Calls `f(leaf index, entry bytes)` for entries seq `from + 1` ..= `to`, in order; a missing
/// entry is an error.
fn for_each_entry_from(
    db: &DB,
    from: u64,
    to: u64,
    mut f: impl FnMut(u64, &[u8]) -> Result<(), LedgerError>,
) -> Result<(), LedgerError> {
    let cf_entries = db
        .cf_handle(CF_ENTRIES)
        .ok_or_else(|| LedgerError::Corrupt("missing entries".into()))?;
    let start = (from + 1).to_be_bytes();
    let mut it = db.iterator_cf(cf_entries, IteratorMode::From(&start, Direction::Forward));
    for i in from..to {
        let (key, raw) = it
            .next()
            .transpose()
            .map_err(read_error(db))?
            .ok_or_else(|| LedgerError::Corrupt(format!("entry {} is missing", i + 1)))?;
        if key[..] != (i + 1).to_be_bytes() {
            return Err(LedgerError::Corrupt(format!("entry {} is missing", i + 1)));
        }
        f(i, &raw)?;
    }
    Ok(())
}

fn now_micros() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

/// The single writer.
struct Committer {
    db: Arc<DB>,
    forward_wakeup: Arc<tokio::sync::Notify>,
    head: Option<(u64, Digest32)>,
    checkpointing: Option<Checkpointing>,
    /// Directory where other processes (export) leave security events for the ledger.
    spool: Option<PathBuf>,
    /// The checkpoint file, rewritten before each checkpoint is stored (see [`witness`]).
    witness: PathBuf,
    /// Tree size of the newest stored checkpoint.
    last_checkpoint: u64,
    last_signed: Option<std::time::Instant>,
    /// The background compaction after erasures, started with the first one.
    compactor: Option<erase::Compactor>,
    notes: Arc<Mutex<pending::NoteBook>>,
    /// Where the next range deletion of numbered pending-object notes starts: the end of the
    /// last one written, never below this run's first number (see [`pending`]). Notes below it
    /// that are still unsettled were stepped around.
    note_floor: u64,
    /// Damage found by any read; the committer records its alerts (see [`damage`]).
    damage: Arc<damage::DamageBook>,
}

impl Committer {
    fn run(mut self, rx: mpsc::Receiver<Job>) {
        // The spool (security events, forward retry requests) is read about once a second, also
        // while requests keep the committer busy.
        let tick = self
            .checkpointing
            .as_ref()
            .map(|c| c.interval)
            .unwrap_or(SPOOL_INTERVAL)
            .min(SPOOL_INTERVAL);
        // Events left while the node was down, and a tree that grew meanwhile, are recorded now.
        self.drain_spool();
        let mut last_drain = std::time::Instant::now();
        self.maybe_checkpoint(true);
        let mut held: Option<Job> = None;
        loop {
            if last_drain.elapsed() >= SPOOL_INTERVAL {
                self.drain_spool();
                self.record_damage();
                self.abandon_old_notes();
                last_drain = std::time::Instant::now();
            }
            let first = match held.take() {
                Some(job) => job,
                None => match rx.recv_timeout(tick) {
                    Ok(job) => job,
                    Err(mpsc::RecvTimeoutError::Timeout) => {
                        // Idle: no next group is coming to take the settled notes.
                        self.flush_ready_notes();
                        self.maybe_checkpoint(false);
                        continue;
                    }
                    Err(mpsc::RecvTimeoutError::Disconnected) => break,
                },
            };
            // An erasure reads the index as the database has it: it runs in a group of its own.
            let alone = matches!(first, Job::Erase { .. });
            let mut record_bytes = first.record_bytes();
            let mut jobs = vec![first];
            while !alone && jobs.len() < MAX_GROUP && record_bytes < MAX_GROUP_RECORD_BYTES {
                match rx.try_recv() {
                    Ok(j @ Job::Erase { .. }) => {
                        held = Some(j);
                        break;
                    }
                    Ok(j) if record_bytes + j.record_bytes() > MAX_GROUP_RECORD_BYTES => {
                        held = Some(j);
                        break;
                    }
                    Ok(j) => {
                        record_bytes += j.record_bytes();
                        jobs.push(j);
                    }
                    Err(_) => break,
                }
            }
            // Notes first, in a group of their own: written without an fsync, they need not
            // wait for the one the stores' group makes.
            let (notes, rest): (Vec<Job>, Vec<Job>) = jobs
                .into_iter()
                .partition(|j| matches!(j, Job::Note { .. }));
            for jobs in [notes, rest] {
                if !jobs.is_empty() {
                    let results = self.commit_group(&jobs);
                    reply(jobs, results, &self.notes);
                }
            }
            self.maybe_checkpoint(false);
        }
        self.flush_ready_notes();
        // The last entries before a shutdown are covered too.
        self.maybe_checkpoint(true);
        if let Some(c) = self.compactor.take() {
            c.finish();
        }
    }

    /// Deletes the notes settled since the last group (when the node falls idle, and at
    /// shutdown), so that they neither wait for the next C-STORE nor send their objects to the
    /// next start's `reconcile`; a note would otherwise outlive [`pending::ABANDON_AFTER`] and
    /// be reported as unsettled. Not synced: a note a crash brings back costs one object check.
    fn flush_ready_notes(&mut self) {
        if self.notes.lock().is_ok_and(|b| b.has_ready()) {
            let _ = self.commit_group(&[]);
        }
    }

    /// Records the security events other processes left in the spool directory, then deletes
    /// their files (only once the entries are durable, so none is ever lost).
    fn drain_spool(&mut self) {
        let Some(dir) = &self.spool else { return };
        let Ok(rd) = std::fs::read_dir(dir) else {
            return;
        };
        let mut files: Vec<PathBuf> = Vec::new();
        let mut retries: Vec<PathBuf> = Vec::new();
        let mut audits: Vec<PathBuf> = Vec::new();
        for p in rd.flatten().map(|e| e.path()) {
            match p.extension().and_then(|x| x.to_str()) {
                Some("event") => files.push(p),
                Some(forward::RETRY_EXTENSION) => retries.push(p),
                Some(trail::SPOOL_EXTENSION) => audits.push(p),
                _ => {}
            }
        }
        retries.sort();
        for f in retries {
            self.apply_retry_request(&f);
        }
        if files.is_empty() && audits.is_empty() {
            return;
        }
        // Oldest first (the names start with the time), so the trail keeps their order.
        audits.sort();
        let mut group = match Group::new(&self.db, self.head, 0, 0) {
            Ok(g) => g,
            Err(e) => return tracing::error!(error = %e, "cannot record security events"),
        };
        let mut done = Vec::new();
        for f in &files {
            let parsed = std::fs::read_to_string(f)
                .ok()
                .and_then(|t| SpooledEvent::parse(&t));
            let Some(ev) = parsed else {
                tracing::error!(file = %f.display(), "unreadable security event file; renamed to .bad");
                let _ = std::fs::rename(f, f.with_extension("bad"));
                continue;
            };
            let subject = match read_entry(&self.db, ev.subject_seq) {
                Ok(Some(e)) => e,
                Ok(None) => {
                    tracing::error!(file = %f.display(), "security event names no entry; renamed to .bad");
                    let _ = std::fs::rename(f, f.with_extension("bad"));
                    continue;
                }
                Err(e) => {
                    tracing::error!(file = %f.display(), error = %e, "cannot read the entry a security event names; retried later");
                    continue;
                }
            };
            match group.add_event(
                &subject,
                ev.reason,
                &ev.detector,
                (&ev.calling_ae, &ev.peer),
            ) {
                Ok(seq) => {
                    tracing::warn!(seq, subject = ev.subject_seq, reason = ev.reason.describe(), detector = %ev.detector, calling = %ev.calling_ae, peer = %ev.peer, "security event recorded on the ledger");
                    done.push(f.clone());
                }
                Err(e) => tracing::error!(error = %e, "cannot record a security event"),
            }
        }
        for f in &audits {
            let parsed = std::fs::read_to_string(f)
                .ok()
                .and_then(|t| serde_json::from_str::<trail::AuditRecord>(&t).ok());
            let Some(record) = parsed else {
                tracing::error!(file = %f.display(), "unreadable audit record file; renamed to .bad");
                let _ = std::fs::rename(f, f.with_extension("bad"));
                continue;
            };
            match group.audit(&record) {
                Ok(_) => done.push(f.clone()),
                Err(e) => tracing::error!(error = %e, "cannot record an audit record"),
            }
        }
        if done.is_empty() {
            return;
        }
        let head = group.head;
        let mut wo = WriteOptions::default();
        wo.set_sync(true);
        match self.db.write_opt(group.batch.into_write_batch(), &wo) {
            Ok(()) => {
                self.head = head;
                for f in done {
                    let _ = std::fs::remove_file(f);
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot record security events");
                self.head = read_head(&self.db).unwrap_or(self.head);
            }
        }
    }

    /// Records a security alert for each damage found since the last pass (by the read-back or
    /// by a read that failed); one that cannot be recorded now is tried again at the next.
    fn record_damage(&mut self) {
        let (mark, new) = self.damage.unalerted();
        if new.is_empty() {
            return;
        }
        let jobs: Vec<Job> = new
            .iter()
            .map(|d| Job::Audit {
                record: damage_alert(d),
                reply: oneshot::channel().0,
            })
            .collect();
        let results = self.commit_group(&jobs);
        let failed = results.iter().find_map(|r| match r {
            Planned::Audit(Err(e)) => Some(e.to_string()),
            _ => None,
        });
        match failed {
            None => self.damage.alerted(mark),
            Some(e) => {
                tracing::error!(error = %e, "cannot record the ledger's damage on the trail")
            }
        }
    }

    /// Re-queues the failed forwards a `dicomchain forward retry` asked for, then deletes the
    /// request (only once that is durable).
    fn apply_retry_request(&mut self, file: &Path) {
        let Some(destination) = std::fs::read_to_string(file)
            .ok()
            .and_then(|t| forward::parse_retry_request(&t))
        else {
            tracing::error!(file = %file.display(), "unreadable forward retry request; renamed to .bad");
            let _ = std::fs::rename(file, file.with_extension("bad"));
            return;
        };
        let mut group = match Group::new(&self.db, self.head, 0, 0) {
            Ok(g) => g,
            Err(e) => return tracing::error!(error = %e, "cannot re-queue forwards"),
        };
        let result = group
            .forward(&ForwardUpdate::Retry { destination })
            .and_then(|n| {
                let mut wo = WriteOptions::default();
                wo.set_sync(true);
                self.db
                    .write_opt(group.batch.into_write_batch(), &wo)
                    .map_err(LedgerError::Write)
                    .map(|()| n)
            });
        match result {
            Ok(n) => {
                tracing::info!(requeued = n, "failed forwards re-queued");
                // The answer first, then the request goes: `forward retry` waits for the latter.
                let _ = std::fs::write(forward::retry_answer_path(file), n.to_string());
                let _ = std::fs::remove_file(file);
                self.forward_wakeup.notify_waiters();
            }
            Err(e) => tracing::error!(error = %e, "cannot re-queue forwards"),
        }
    }

    /// Signs and stores a checkpoint of the current tree if it grew since the last one and the
    /// interval has passed (or `now`). Only sizes already durable are signed, and the tree is
    /// append-only, so two checkpoints can never disagree — crashes included.
    fn maybe_checkpoint(&mut self, now: bool) {
        let Some(cp) = &self.checkpointing else {
            return;
        };
        let size = self.head.map(|h| h.0).unwrap_or(0);
        if size <= self.last_checkpoint {
            return;
        }
        if !now && self.last_signed.is_some_and(|t| t.elapsed() < cp.interval) {
            return;
        }
        let result = merkle::root(&DbNodes(&self.db), size).and_then(|root| {
            let note = cp.signer.sign(&checkpoint::Checkpoint {
                origin: cp.origin.clone(),
                size,
                root,
            });
            // The file first, the checkpoint second: no checkpoint is ever stored (and so
            // published) that the file does not cover. A crash in between leaves the file ahead
            // of the stored checkpoints, over entries already durable, which the next open
            // accepts and stores. A file that cannot be written stops the signing instead.
            witness::write(&self.witness, &note)?;
            let cf = self
                .db
                .cf_handle(CF_CHECKPOINTS)
                .ok_or_else(|| LedgerError::Corrupt("missing checkpoints".into()))?;
            let mut wo = WriteOptions::default();
            wo.set_sync(true);
            self.db
                .put_cf_opt(cf, size.to_be_bytes(), note.as_bytes(), &wo)
                .map_err(LedgerError::Write)
        });
        // Tried again after the interval (so an error is logged once per interval).
        self.last_signed = Some(std::time::Instant::now());
        match result {
            Ok(()) => {
                self.last_checkpoint = size;
                tracing::debug!(size, "checkpoint signed");
            }
            Err(e @ LedgerError::Witness(_)) => {
                tracing::error!(error = %e, size, "no checkpoint signed: the checkpoint file cannot be written, and a checkpoint it does not cover could be rolled back unnoticed; signing resumes once it can be written")
            }
            Err(e) => tracing::error!(error = %e, size, "cannot sign a checkpoint"),
        }
    }

    /// Writes a group as one batch, synced unless it holds notes only. A request that cannot be
    /// planned (say, its previous version is unreadable) fails alone; if the write itself fails
    /// every planned request gets the error (a duplicate of an instance planned in the same
    /// group too: what it duplicates was not written either).
    fn commit_group(&mut self, jobs: &[Job]) -> Vec<Planned> {
        let first_new = self.head.map_or(1, |h| h.0 + 1);
        let record_bytes = jobs.iter().map(Job::record_bytes).sum();
        let mut plan = match Group::new(&self.db, self.head, jobs.len(), record_bytes) {
            Ok(g) => g,
            Err(e) => {
                let err = || LedgerError::Corrupt(e.to_string());
                return jobs
                    .iter()
                    .map(|job| match job {
                        Job::Store { .. } => Planned::Store(Err(err())),
                        Job::Forward { .. } => Planned::Forward(Err(err())),
                        Job::Acl { .. } => Planned::Acl(Err(err())),
                        Job::Audit { .. } => Planned::Audit(Err(err())),
                        Job::Note { .. } => Planned::Note(Err(err())),
                        Job::Unacknowledged { .. } => Planned::Unacknowledged(Err(err())),
                        Job::Erase { .. } => Planned::Erase(Err(err())),
                    })
                    .collect();
            }
        };
        let planned: Vec<Planned> = jobs
            .iter()
            .map(|job| match job {
                Job::Store { req, .. } => Planned::Store(plan.add(req)),
                Job::Forward { update, .. } => Planned::Forward(plan.forward(update)),
                Job::Acl { change, .. } => Planned::Acl(plan.acl(change)),
                Job::Audit { record, .. } => Planned::Audit(plan.audit(record)),
                Job::Note { name, key, .. } => Planned::Note(plan.note(name, key, &self.notes)),
                Job::Unacknowledged { seq, .. } => {
                    Planned::Unacknowledged(plan.unacknowledged(*seq))
                }
                Job::Erase { scope, by, .. } => Planned::Erase(plan.erase(scope, by)),
            })
            .collect();
        // A failed erasure may have planned part of its entries: nothing of it is written
        // (it runs alone, so the batch holds nothing else).
        if matches!(planned.as_slice(), [Planned::Erase(Err(_))]) {
            return planned;
        }
        // Notes whose objects are durable and named by entries now ([`Ledger::object_durable`])
        // go in this batch, as one range deletion of every settled note (a duplicate's object
        // is named by no entry: its note stays until ingest deleted the object).
        let mut settling: Vec<u64> = self
            .notes
            .lock()
            .map(|mut b| b.take_ready())
            .unwrap_or_default();
        settling.sort_unstable();
        let ranges = self
            .notes
            .lock()
            .map(|b| b.settled_ranges(self.note_floor, &settling, pending::STEP_OVER_AFTER))
            .unwrap_or_default();
        for &(start, end) in &ranges {
            plan.batch.delete_range_cf(
                plan.cf_pending,
                pending::note_key(start),
                pending::note_key(end),
            );
        }
        // Notes the ranges stepped around earlier (stores that took long) go one by one.
        for &n in settling.iter().filter(|&&n| n < self.note_floor) {
            plan.batch.delete_cf(plan.cf_pending, pending::note_key(n));
        }
        if plan.batch.is_empty() {
            // Nothing to delete yet: a later range covers the settled notes.
            if let Ok(mut b) = self.notes.lock() {
                b.settle(&settling);
            }
            return planned;
        }
        // Notes alone are not synced (see `Ledger::intend_object`; `run` gives them groups of
        // their own); anything else is.
        let mut wo = WriteOptions::default();
        wo.set_sync(jobs.iter().any(|j| !matches!(j, Job::Note { .. })));
        let enqueued = plan.enqueued;
        let erased = plan.erased;
        match self.db.write_opt(plan.batch.into_write_batch(), &wo) {
            Ok(()) => {
                self.head = plan.head;
                if let Ok(mut b) = self.notes.lock() {
                    b.settle(&settling);
                }
                if let Some(&(_, end)) = ranges.last() {
                    self.note_floor = self.note_floor.max(end);
                }
                if erased {
                    self.compactor
                        .get_or_insert_with(|| erase::Compactor::start(self.db.clone()))
                        .request();
                }
                if enqueued {
                    self.forward_wakeup.notify_waiters();
                }
                planned
            }
            Err(e) => {
                tracing::error!(error = %e, requests = jobs.len(), "ledger group commit failed");
                // A compaction that met a damaged block fails every later write with its error.
                damage::report(&self.db, &e);
                // The settled notes were not deleted: the next group tries again.
                if let Ok(mut b) = self.notes.lock() {
                    b.put_back_ready(settling);
                }
                // RocksDB may have applied the batch without syncing it; follow the database
                // rather than our guess, so the next sequence number never collides.
                self.head = read_head(&self.db).unwrap_or(self.head);
                planned
                    .into_iter()
                    .map(|r| match r {
                        Planned::Store(Ok(StoreOutcome::Stored { .. })) => {
                            Planned::Store(Err(LedgerError::Write(e.clone())))
                        }
                        Planned::Store(Ok(StoreOutcome::Duplicate { seq })) if seq >= first_new => {
                            Planned::Store(Err(LedgerError::Write(e.clone())))
                        }
                        Planned::Forward(Ok(_)) => {
                            Planned::Forward(Err(LedgerError::Write(e.clone())))
                        }
                        Planned::Acl(Ok(_)) => Planned::Acl(Err(LedgerError::Write(e.clone()))),
                        Planned::Audit(Ok(_)) => Planned::Audit(Err(LedgerError::Write(e.clone()))),
                        Planned::Unacknowledged(Ok(_)) => {
                            Planned::Unacknowledged(Err(LedgerError::Write(e.clone())))
                        }
                        Planned::Note(Ok(n)) => {
                            // Never written: nothing for a range deletion to wait for.
                            if let Ok(mut b) = self.notes.lock() {
                                b.settle(&[n.number()]);
                            }
                            Planned::Note(Err(LedgerError::Write(e.clone())))
                        }
                        Planned::Erase(Ok(_)) => Planned::Erase(Err(LedgerError::Write(e.clone()))),
                        other => other,
                    })
                    .collect()
            }
        }
    }
}

/// Sends each job its result. A note nobody waits for any more (the C-STORE gave up before
/// committing its object) is settled at once.
fn reply(jobs: Vec<Job>, results: Vec<Planned>, notes: &Mutex<pending::NoteBook>) {
    for (job, result) in jobs.into_iter().zip(results) {
        match (job, result) {
            (Job::Store { reply, .. }, Planned::Store(r)) => {
                let _ = reply.send(r);
            }
            (Job::Forward { reply, .. }, Planned::Forward(r)) => {
                let _ = reply.send(r);
            }
            (Job::Acl { reply, .. }, Planned::Acl(r)) => {
                let _ = reply.send(r);
            }
            (Job::Audit { reply, .. }, Planned::Audit(r)) => {
                let _ = reply.send(r);
            }
            (Job::Note { reply, .. }, Planned::Note(r)) => {
                if let Err(Ok(n)) = reply.send(r) {
                    if let Ok(mut b) = notes.lock() {
                        b.settle(&[n.number()]);
                    }
                }
            }
            (Job::Unacknowledged { reply, .. }, Planned::Unacknowledged(r)) => {
                let _ = reply.send(r);
            }
            (Job::Erase { reply, .. }, Planned::Erase(r)) => {
                let _ = reply.send(r);
            }
            _ => unreachable!("results follow their jobs"),
        }
    }
}

/// One group commit being planned: the batch and everything it changes that later requests of
/// the same group must see.
struct Group<'a> {
    db: &'a DB,
    cf_entries: &'a rocksdb::ColumnFamily,
    cf_meta: &'a rocksdb::ColumnFamily,
    cf_index: &'a rocksdb::ColumnFamily,
    cf_tree: &'a rocksdb::ColumnFamily,
    cf_forward: &'a rocksdb::ColumnFamily,
    cf_pending: &'a rocksdb::ColumnFamily,
    cf_keys: &'a rocksdb::ColumnFamily,
    batch: batch::SortedBatch<'a>,
    /// Something was put on the forward queue.
    enqueued: bool,
    /// An erasure is planned (its values are compacted away after the write).
    erased: bool,
    /// Forward queue keys settled in this group (so a second outcome for one is ignored).
    settled: std::collections::HashSet<Vec<u8>>,
    head: Option<(u64, Digest32)>,
    /// The index of each SOP Instance planned in this group, with its instance key.
    pending: HashMap<String, (SopIndex, Digest32)>,
    /// Every-version hierarchy keys per SOP Instance planned in this group (see `vloc_key`).
    pending_vloc: HashMap<String, Vec<Vec<u8>>>,
    /// Tree nodes planned in this group, not yet readable from the database.
    new_nodes: HashMap<(u8, u64), Digest32>,
    time_micros: i64,
}

impl<'a> Group<'a> {
    /// A group of about `requests` requests carrying `record_bytes` of metadata records (its
    /// batch is sized for them up front: growing a megabyte batch by doubling showed up in
    /// profiles, and would hold a large record's bytes twice).
    fn new(
        db: &'a DB,
        head: Option<(u64, Digest32)>,
        requests: usize,
        record_bytes: usize,
    ) -> Result<Group<'a>, LedgerError> {
        let cf = |n| {
            db.cf_handle(n)
                .ok_or_else(|| LedgerError::Corrupt(format!("missing column family {n}")))
        };
        Ok(Group {
            db,
            cf_entries: cf(CF_ENTRIES)?,
            cf_meta: cf(CF_META)?,
            cf_index: cf(CF_INDEX)?,
            cf_tree: cf(CF_TREE)?,
            cf_forward: cf(CF_FORWARD)?,
            cf_pending: cf(CF_PENDING)?,
            cf_keys: cf(CF_KEYS)?,
            batch: batch::SortedBatch::with_capacity_bytes(
                requests * BATCH_BYTES_PER_REQUEST + record_bytes,
            ),
            enqueued: false,
            erased: false,
            settled: Default::default(),
            head,
            pending: HashMap::default(),
            pending_vloc: HashMap::default(),
            new_nodes: HashMap::default(),
            time_micros: now_micros(),
        })
    }

    /// The index of a SOP Instance and its latest version's instance key.
    fn previous(&self, uid: &str) -> Result<Option<(SopIndex, Digest32)>, LedgerError> {
        if let Some(p) = self.pending.get(uid) {
            return Ok(Some(p.clone()));
        }
        Ok(read_sop(self.db, self.cf_index, uid)?.map(|idx| {
            let key = idx.instance_key;
            (idx, key)
        }))
    }

    /// Plans a security event about entry `subject`, detected by `detector` while serving
    /// `requester` (calling AE title, peer address; empty when the node itself found it). The
    /// entry names the requester as its calling AE and peer, and its outcome is a failure.
    fn add_event(
        &mut self,
        subject: &Entry,
        reason: Reason,
        detector: &str,
        requester: (&str, &str),
    ) -> Result<u64, LedgerError> {
        let (seq, prev_hash) = self.next_position();
        let text = |s: &str, max: usize| crate::util::escape::escape(s).chars().take(max).collect();
        let (calling, detail) = match requester.0.trim() {
            "" => (detector, String::new()),
            ae => (ae, text(&format!("found by {detector}"), 512)),
        };
        let entry = Entry {
            seq,
            prev_hash,
            time_micros: self.time_micros,
            event: Event::IntegrityFailure,
            calling_ae: text(calling, 64),
            subject_seq: subject.seq,
            reason,
            version: 0,
            status: INTEGRITY_FAILURE_STATUS,
            peer: text(requester.1.trim(), 128),
            detail,
            ..subject.clone()
        };
        self.append(&entry)?;
        Ok(seq)
    }

    /// The next entry's sequence number and the hash it chains to.
    fn next_position(&self) -> (u64, Digest32) {
        match self.head {
            Some((s, h)) => (s + 1, h),
            None => (1, [0u8; 32]),
        }
    }

    /// Adds an entry to the chain and the tree. The only fallible step (reading tree siblings)
    /// comes before any write to the batch.
    fn append(&mut self, entry: &Entry) -> Result<(), LedgerError> {
        let encoded = entry.encode();
        let nodes = plan_tree_nodes(
            self.db,
            self.cf_tree,
            &self.new_nodes,
            entry.seq - 1,
            merkle::leaf_hash(&encoded),
        )?;
        put_tree_nodes(&mut self.batch, self.cf_tree, &mut self.new_nodes, nodes);
        // The chain hash is over the same bytes: hash them once here rather than re-encode.
        let hash: Digest32 = <sha2::Sha256 as sha2::Digest>::digest(&encoded).into();
        self.batch
            .put_cf(self.cf_entries, entry.seq.to_be_bytes(), encoded);
        self.head = Some((entry.seq, hash));
        Ok(())
    }

    /// Plans one request. Every fallible read happens before the first write to the batch, so a
    /// failed request leaves the batch untouched.
    fn add(&mut self, req: &StoreRequest) -> Result<StoreOutcome, LedgerError> {
        let uid = req.attrs.sop_instance_uid.as_str();
        let previous = self.previous(uid)?;
        if let Some((idx, key)) = &previous {
            // The same content again is a duplicate, unless the latest entry's object was lost
            // before it was acknowledged (see `unacked`): then this is its new version.
            if *key == req.instance_key && !self.is_unacked(idx.seq)? {
                return Ok(StoreOutcome::Duplicate { seq: idx.seq });
            }
        }
        // A version that moves to another study or patient leaves a trace of where the older
        // one was, so an erasure of that study or patient still finds it (the hierarchy keys
        // follow the latest version only). Nothing to write for the usual first version.
        let moved = match &previous {
            Some((idx, _)) => moved_from(&idx.keys, &req.attrs),
            None => Vec::new(),
        };
        let vloc = if moved.is_empty() {
            None
        } else {
            let mut v = match self.pending_vloc.get(uid) {
                Some(v) => v.clone(),
                None => self
                    .db
                    .get_cf(self.cf_index, vloc_key(uid))
                    .map_err(read_error(self.db))?
                    .map(|v| decode_keys(&v))
                    .unwrap_or_default(),
            };
            for k in moved {
                if !v.contains(&k) {
                    v.push(k);
                }
            }
            Some(v)
        };
        let (seq, prev_hash) = self.next_position();
        let version = previous.as_ref().map(|p| p.0.version + 1).unwrap_or(1);
        let s = &req.summary;
        let entry = Entry {
            seq,
            prev_hash,
            time_micros: self.time_micros,
            event: Event::Store,
            calling_ae: req.calling_ae.clone(),
            sop_class_uid: s.sop_class_uid.clone(),
            transfer_syntax: s.transfer_syntax.clone(),
            instance_key: req.instance_key,
            pixel_sha256: s.pixel_sha256,
            pixel_length: s.pixel_length,
            dataset_sha256: s.dataset_sha256,
            dataset_length: s.dataset_length,
            object_name: req.object_name.clone().unwrap_or_default(),
            version,
            subject_seq: 0,
            reason: Reason::None,
            status: 0,
            peer: String::new(),
            detail: String::new(),
        };
        self.append(&entry)?;
        // From here on nothing fails.
        self.batch
            .put_cf(self.cf_meta, seq.to_be_bytes(), &req.record);
        match (&req.object_name, &req.object_key) {
            (Some(name), Some(key)) => {
                self.batch
                    .put_cf(self.cf_keys, name.as_bytes(), key.encode());
            }
            // A plaintext object has no key record: the record under its instance key is what
            // tells the startup reconciliation that an entry names it.
            (Some(_), None) => {
                self.batch
                    .put_cf(self.cf_meta, req.instance_key, &req.record);
            }
            (None, _) => {}
        }
        let keys = hierarchy_keys(&req.attrs);
        let mut versions = Vec::new();
        if let Some((old, _)) = &previous {
            for k in old.keys.iter().filter(|k| !keys.contains(k)) {
                self.batch.delete_cf(self.cf_index, k);
            }
            versions.clone_from(&old.versions);
        }
        versions.push(seq);
        let mut study_value = req.attrs.sop_class_uid.as_bytes().to_vec();
        study_value.push(0);
        study_value.extend_from_slice(req.attrs.modality.as_bytes());
        for k in &keys {
            let value: &[u8] = if k.starts_with(b"study\0") {
                &study_value
            } else {
                &[]
            };
            self.batch.put_cf(self.cf_index, k, value);
        }
        let idx = SopIndex {
            seq,
            version,
            instance_key: req.instance_key,
            versions,
            keys,
        };
        self.batch
            .put_cf(self.cf_index, sop_key(uid), idx.encode());
        if let Some(vloc) = vloc {
            for k in &vloc {
                self.batch.put_cf(self.cf_index, k, []);
            }
            self.batch
                .put_cf(self.cf_index, vloc_key(uid), encode_keys(&vloc));
            self.pending_vloc.insert(uid.to_string(), vloc);
        }
        self.pending
            .insert(uid.to_string(), (idx, req.instance_key));
        for destination in &req.forward_to {
            self.batch
                .put_cf(self.cf_forward, forward::queue_key(destination, seq), []);
            self.enqueued = true;
        }
        Ok(StoreOutcome::Stored { seq, version })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(sop: &str, study: &str, key: u8) -> StoreRequest {
        StoreRequest {
            calling_ae: "TEST".into(),
            instance_key: [key; 32],
            record: vec![key; 10],
            summary: RecordSummary {
                sop_class_uid: "1.2.840.10008.5.1.4.1.1.2".into(),
                transfer_syntax: "1.2.840.10008.1.2".into(),
                pixel_sha256: [0; 32],
                pixel_length: 0,
                dataset_sha256: [key; 32],
                dataset_length: 10,
            },
            object_name: None,
            object_key: None,
            attrs: IndexAttrs {
                sop_class_uid: "1.2.840.10008.5.1.4.1.1.2".into(),
                sop_instance_uid: sop.into(),
                study_instance_uid: study.into(),
                series_instance_uid: format!("{study}.1"),
                patient_id: "P".into(),
                ..Default::default()
            },
            forward_to: vec![],
        }
    }

    /// Records of `BLOB_MIN_BYTES` or more live in blob files: an erasure's compaction still
    /// takes them out of every file of the ledger (the blob GC moves the ones kept).
    #[tokio::test(flavor = "multi_thread")]
    async fn an_erased_large_record_leaves_the_blob_files() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::open(dir.path()).unwrap();
        let marker = b"LARGE-PRIVATE-ELEMENT";
        let large = |sop: &str, study: &str, key: u8| {
            let mut record = marker.repeat(BLOB_MIN_BYTES as usize / marker.len() + 1);
            record.push(key);
            StoreRequest {
                record,
                ..request(sop, study, key)
            }
        };
        ledger.store(large("1.1", "9", 1)).await.unwrap();
        ledger.store(large("2.1", "8", 2)).await.unwrap();
        let db = ledger.inner.db.clone();
        db.flush_cf(db.cf_handle(CF_META).unwrap()).unwrap();
        let files = |ext: &str| -> Vec<Vec<u8>> {
            std::fs::read_dir(dir.path())
                .unwrap()
                .flatten()
                .map(|e| e.path())
                .filter(|p| ext.is_empty() || p.extension().is_some_and(|x| x == ext))
                .map(|p| std::fs::read(p).unwrap())
                .collect()
        };
        let tail = |key: u8| [&marker[..], &[key]].concat();
        let holds = |f: &[u8], key: u8| f.windows(marker.len() + 1).any(|w| w == tail(key));
        assert!(
            files("blob").iter().any(|f| holds(f, 1)),
            "the record is in a blob file"
        );
        ledger
            .erase(erase::EraseScope::Study("9".into()), "test".into())
            .await
            .unwrap();
        ledger.close();
        drop((ledger, db));
        assert!(
            !files("").iter().any(|f| holds(f, 1)),
            "the erased record is left in a file"
        );
        let ledger = Ledger::open(dir.path()).unwrap();
        let kept = ledger.entry(2).unwrap().unwrap();
        assert_eq!(ledger.record_of(&kept).unwrap().unwrap().last(), Some(&2));
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn erasure_removes_all_but_the_entries_and_records_what_it_erased() {
        use erase::{EraseScope, Erased};
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::open(dir.path()).unwrap();
        let with_object = |sop: &str, study: &str, key: u8| StoreRequest {
            object_name: Some(format!("obj{key}")),
            object_key: Some(ObjectKey { salt: [key; 32] }),
            forward_to: vec!["archive".into()],
            ..request(sop, study, key)
        };
        for (sop, study, key) in [
            ("1.1", "9", 1),
            ("1.2", "9", 2),
            ("2.1", "8", 3),
            ("1.1", "9", 4),
        ] {
            ledger.store(with_object(sop, study, key)).await.unwrap();
        }
        let erased = ledger
            .erase(EraseScope::Study("9".into()), "admin-api".into())
            .await
            .unwrap();
        assert_eq!(
            erased,
            Erased {
                entries: vec![5],
                instances: vec!["1.1".into(), "1.2".into()],
                versions: 3,
                objects: vec![
                    ("obj1".into(), [1; 32]),
                    ("obj2".into(), [2; 32]),
                    ("obj4".into(), [4; 32]),
                ],
            }
        );
        let e = ledger.entry(5).unwrap().unwrap();
        assert_eq!(
            (e.event, e.peer.as_str(), e.detail.as_str()),
            (Event::Erase, "study", "1-2,4")
        );
        assert_eq!(erase::erased_of(&e), Some(vec![1, 2, 4]));
        for (seq, key) in [(1u64, 1u8), (2, 2), (4, 4)] {
            assert_eq!(ledger.erased_by(seq).unwrap(), Some(5));
            let erased = ledger.entry(seq).unwrap().unwrap();
            assert!(ledger.record_of(&erased).unwrap().is_none());
            assert!(ledger.legacy_record(&[key; 32]).unwrap().is_none());
            assert!(ledger.object_key(&format!("obj{key}")).unwrap().is_none());
        }
        assert!(ledger.instances_in_study("9").unwrap().is_empty());
        assert!(
            ledger.latest("1.1").unwrap().is_none() && ledger.versions("1.1").unwrap().is_empty()
        );
        let mut pending: Vec<String> = ledger
            .pending_objects()
            .unwrap()
            .into_iter()
            .map(|p| {
                assert!(!p.recorded, "an erased object is not named any more");
                assert_eq!(p.note, None);
                p.name
            })
            .collect();
        pending.sort();
        assert_eq!(pending, ["obj1", "obj2", "obj4"]);
        // The forward queue keeps only the other study's item.
        let queued = ledger.forward_pending("archive", 0, 100).unwrap();
        assert_eq!(queued, vec![3]);
        // The other study is untouched; nothing left to erase is an error, and writes nothing.
        assert_eq!(
            ledger.instances_in_study("8").unwrap(),
            vec!["2.1".to_string()]
        );
        assert_eq!(ledger.erased_by(3).unwrap(), None);
        assert!(matches!(
            ledger
                .erase(EraseScope::Study("9".into()), "x".into())
                .await,
            Err(LedgerError::NotFound(_))
        ));
        assert_eq!(ledger.len().unwrap(), 5);
        // A newer version filed under another study: erasing the study of the older one takes
        // every version (the older one holds that study's data).
        ledger.store(with_object("2.1", "7", 5)).await.unwrap();
        let erased = ledger
            .erase(EraseScope::Study("8".into()), "admin-api".into())
            .await
            .unwrap();
        assert_eq!((erased.entries, erased.versions), (vec![7], 2));
        assert!(ledger.instances_in_study("7").unwrap().is_empty());
        assert!(matches!(
            ledger
                .erase(EraseScope::Patient("P".into()), "x".into())
                .await,
            Err(LedgerError::NotFound(_))
        ));
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_chain_cut_from_its_end_does_not_open() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::open(dir.path()).unwrap();
        for i in 0..5u8 {
            ledger
                .store(request(&format!("4.{i}"), "4", i + 1))
                .await
                .unwrap();
        }
        let cf = ledger.cf(CF_ENTRIES).unwrap();
        ledger.inner.db.delete_cf(cf, 5u64.to_be_bytes()).unwrap();
        ledger.close();
        drop(ledger);
        match Ledger::open(dir.path()) {
            Err(LedgerError::Corrupt(m)) => assert!(m.contains("beyond the chain"), "{m}"),
            other => panic!("opened a cut chain: {:?}", other.is_ok()),
        }
    }

    #[tokio::test]
    async fn pending_notes_go_once_their_objects_are_durable_and_never_before() {
        let dir = tempfile::tempdir().unwrap();
        let pending = |ledger: &Ledger| {
            let mut p: Vec<(String, bool)> = ledger
                .pending_objects()
                .unwrap()
                .into_iter()
                .map(|p| (p.name, p.recorded))
                .collect();
            p.sort();
            p
        };
        async fn noted(ledger: &Ledger, sop: &str, key: u8, name: &str) -> (StoreRequest, NoteId) {
            let mut r = request(sop, "1", key);
            r.object_name = Some(name.into());
            r.object_key = Some(ObjectKey { salt: [key; 32] });
            let note = ledger.intend_object(name, &[key; 32]).await.unwrap();
            (r, note)
        }
        {
            let ledger = Ledger::open(dir.path()).unwrap();
            let stuck = ledger.intend_object("stuck", &[9; 32]).await.unwrap();
            let (a, na) = noted(&ledger, "1.1", 1, "obj1").await;
            ledger.store(a).await.unwrap();
            // The entry alone settles nothing: its object may not be durable yet.
            assert_eq!(
                pending(&ledger),
                [("obj1".to_string(), true), ("stuck".to_string(), false)]
            );
            // Durable, but a note taken before it and never settled holds back the range.
            ledger.object_durable(na);
            let (b, nb) = noted(&ledger, "1.2", 2, "obj2").await;
            assert_eq!(
                pending(&ledger),
                [
                    ("obj1".to_string(), true),
                    ("obj2".to_string(), false),
                    ("stuck".to_string(), false)
                ]
            );
            ledger.clear_note(stuck).unwrap();
            ledger.store(b).await.unwrap();
            assert_eq!(pending(&ledger), [("obj2".to_string(), true)]);
            ledger.object_durable(nb);
            // A duplicate's note stays: its object is named by no entry. Its note's group
            // deletes the note settled before it.
            let (c, _) = noted(&ledger, "1.2", 2, "obj2b").await;
            assert!(matches!(
                ledger.store(c).await.unwrap(),
                StoreOutcome::Duplicate { .. }
            ));
            assert_eq!(pending(&ledger), [("obj2b".to_string(), false)]);
            // A note settled after the last group goes at shutdown, unless an unsettled one
            // before it holds the range back (then `reconcile` checks its object).
            let (d, nd) = noted(&ledger, "1.3", 3, "obj3").await;
            ledger.store(d).await.unwrap();
            ledger.object_durable(nd);
            assert_eq!(pending(&ledger).len(), 2);
            ledger.close();
        }
        let ledger = Ledger::open(dir.path()).unwrap();
        let held = [("obj2b".to_string(), false), ("obj3".to_string(), true)];
        assert_eq!(pending(&ledger), held);
        let obj3 = ledger.pending_objects().unwrap();
        ledger.clear_pending_object(&obj3[1]).unwrap();
        assert_eq!(pending(&ledger), [("obj2b".to_string(), false)]);
        // With nothing of this run holding it back, the committer's next idle moment takes it
        // (no later C-STORE needed; it used to wait, and turn into a warning after 10 minutes).
        let (g, ng) = noted(&ledger, "1.7", 7, "obj7").await;
        ledger.store(g).await.unwrap();
        ledger.object_durable(ng);
        let idle = std::time::Instant::now();
        while pending(&ledger).len() == 2 {
            assert!(
                idle.elapsed() < std::time::Duration::from_secs(30),
                "note never deleted"
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        assert_eq!(pending(&ledger), [("obj2b".to_string(), false)]);
        ledger.close();
        drop(ledger);
        let ledger = Ledger::open(dir.path()).unwrap();
        assert_eq!(pending(&ledger), [("obj2b".to_string(), false)]);
        // The notes of an earlier run are left to `reconcile`: this run's range deletions
        // start at its own first number.
        let (d, nd) = noted(&ledger, "1.4", 4, "obj4").await;
        ledger.store(d).await.unwrap();
        ledger.object_durable(nd);
        ledger.store(request("1.9", "1", 9)).await.unwrap();
        assert_eq!(pending(&ledger), [("obj2b".to_string(), false)]);
        // A note nobody settles becomes a named one and stops holding the range back.
        let (e, ne) = noted(&ledger, "1.5", 5, "obj5").await;
        let n = ne.number();
        assert_eq!(pending::keep_named(&ledger.inner.db, &[n]).unwrap(), 1);
        ledger
            .inner
            .notes
            .as_ref()
            .unwrap()
            .lock()
            .unwrap()
            .settle(&[n]);
        drop(e);
        let (f, nf) = noted(&ledger, "1.6", 6, "obj6").await;
        ledger.store(f).await.unwrap();
        ledger.object_durable(nf);
        ledger.store(request("1.8", "1", 8)).await.unwrap();
        let all = ledger.pending_objects().unwrap();
        assert_eq!(all.len(), 2, "{all:?}");
        assert!(all.iter().all(|p| !p.recorded));
        assert!(all.iter().any(|p| p.name == "obj5" && p.note.is_none()));
        assert!(ledger.knows_object("obj5").unwrap() && ledger.knows_object("obj2b").unwrap());
        assert!(!ledger.knows_object("nothing").unwrap());
        for p in &all {
            ledger.clear_pending_object(p).unwrap();
        }
        assert!(pending(&ledger).is_empty());
    }

    #[tokio::test]
    async fn an_unacknowledged_entry_is_recorded_and_its_instance_stored_again() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::open(dir.path()).unwrap();
        let mut r = request("1.1", "9", 1);
        r.object_name = Some("obj1".into());
        r.object_key = Some(ObjectKey { salt: [1; 32] });
        let again = r.clone();
        assert_eq!(
            ledger.store(r).await.unwrap(),
            StoreOutcome::Stored { seq: 1, version: 1 }
        );
        assert!(!ledger.is_unacknowledged(1).unwrap());
        let event = ledger.record_unacknowledged(1).await.unwrap();
        assert_eq!(event, 2);
        let e = ledger.entry(2).unwrap().unwrap();
        assert_eq!(
            (e.event, e.subject_seq, e.reason, e.calling_ae.as_str()),
            (
                Event::IntegrityFailure,
                1,
                Reason::Unacknowledged,
                unacked::DETECTOR
            )
        );
        assert!(ledger.is_unacknowledged(1).unwrap());
        // Once only, and only for a stored instance with an object.
        assert!(ledger.record_unacknowledged(1).await.is_err());
        assert!(ledger.record_unacknowledged(2).await.is_err());
        assert!(ledger.record_unacknowledged(99).await.is_err());
        // The same content again is its new version, not a duplicate of the lost one; and
        // that one is a duplicate again.
        assert_eq!(
            ledger.store(again.clone()).await.unwrap(),
            StoreOutcome::Stored { seq: 3, version: 2 }
        );
        assert_eq!(ledger.latest("1.1").unwrap().unwrap().seq, 3);
        assert_eq!(
            ledger.store(again).await.unwrap(),
            StoreOutcome::Duplicate { seq: 3 }
        );
        // The newest stored entries naming objects, by name.
        let names = ["obj1", "nothing"].into_iter().collect();
        let found = ledger.entries_naming(&names, 100).unwrap();
        assert_eq!(found.len(), 1);
        assert_eq!(found["obj1"].seq, 3);
        assert!(ledger.entries_naming(&names, 0).unwrap().is_empty());
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn chain_versions_duplicates_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::open(dir.path()).unwrap();
        assert_eq!(
            ledger.store(request("1.1", "9", 1)).await.unwrap(),
            StoreOutcome::Stored { seq: 1, version: 1 }
        );
        assert_eq!(
            ledger.store(request("1.2", "9", 2)).await.unwrap(),
            StoreOutcome::Stored { seq: 2, version: 1 }
        );
        assert_eq!(
            ledger.store(request("1.1", "9", 1)).await.unwrap(),
            StoreOutcome::Duplicate { seq: 1 }
        );
        // New content, moved to another study: a new version, and the study index follows it.
        assert_eq!(
            ledger.store(request("1.1", "8", 3)).await.unwrap(),
            StoreOutcome::Stored { seq: 3, version: 2 }
        );
        assert_eq!(
            ledger.instances_in_study("9").unwrap(),
            vec!["1.2".to_string()]
        );
        assert_eq!(
            ledger.instances_in_study("8").unwrap(),
            vec!["1.1".to_string()]
        );
        assert_eq!(ledger.versions("1.1").unwrap(), vec![1, 3]);
        let e1 = ledger.entry(1).unwrap().unwrap();
        let e2 = ledger.entry(2).unwrap().unwrap();
        assert_eq!(e1.prev_hash, [0; 32]);
        assert_eq!(e2.prev_hash, e1.hash());
        let head = ledger.head().unwrap().unwrap();
        ledger.close();
        drop(ledger);
        let ledger = Ledger::open(dir.path()).unwrap();
        assert_eq!(ledger.head().unwrap().unwrap(), head);
        assert_eq!(
            ledger.store(request("1.3", "9", 4)).await.unwrap(),
            StoreOutcome::Stored { seq: 4, version: 1 }
        );
        assert_eq!(ledger.entry(4).unwrap().unwrap().prev_hash, head.1);
        assert_eq!(ledger.latest("1.1").unwrap().unwrap().seq, 3);
        let e3 = ledger.entry(3).unwrap().unwrap();
        assert_eq!(ledger.record_of(&e3).unwrap().unwrap(), vec![3; 10]);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn concurrent_writers_share_commits_and_keep_the_chain() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::open(dir.path()).unwrap();
        let mut tasks = Vec::new();
        for i in 0..200u32 {
            let l = ledger.clone();
            tasks.push(tokio::spawn(async move {
                let mut r = request(&format!("2.{i}"), "7", (i % 250) as u8);
                r.instance_key = Sha256::digest(i.to_be_bytes()).into();
                l.store(r).await.unwrap()
            }));
        }
        for t in tasks {
            assert!(matches!(t.await.unwrap(), StoreOutcome::Stored { .. }));
        }
        let mut prev = [0u8; 32];
        for seq in 1..=200 {
            let e = ledger.entry(seq).unwrap().unwrap();
            assert_eq!(e.prev_hash, prev, "chain broken at {seq}");
            prev = e.hash();
        }
        assert_eq!(ledger.instances_in_study("7").unwrap().len(), 200);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn the_merkle_tree_follows_the_chain_across_groups_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::open(dir.path()).unwrap();
        let mut tasks = Vec::new();
        for i in 0..37u32 {
            let l = ledger.clone();
            tasks.push(tokio::spawn(async move {
                let mut r = request(&format!("4.{i}"), "5", 0);
                r.instance_key = Sha256::digest(i.to_le_bytes()).into();
                l.store(r).await.unwrap()
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        ledger.close();
        drop(ledger);
        let ledger = Ledger::open(dir.path()).unwrap();
        let leaves: Vec<Digest32> = (1..=37)
            .map(|s| merkle::leaf_hash(&ledger.entry(s).unwrap().unwrap().encode()))
            .collect();
        for size in [1u64, 2, 5, 16, 37] {
            let root = ledger.tree_root(size).unwrap();
            for seq in [1, size / 2 + 1, size] {
                let p = ledger.inclusion_proof(seq, size).unwrap();
                assert!(merkle::verify_inclusion(
                    &leaves[seq as usize - 1],
                    seq - 1,
                    size,
                    &p,
                    &root
                ));
            }
            let c = ledger.consistency_proof(3.min(size), size).unwrap();
            assert!(merkle::verify_consistency(
                3.min(size),
                size,
                &ledger.tree_root(3.min(size)).unwrap(),
                &root,
                &c
            ));
        }
        assert!(ledger.inclusion_proof(38, 37).is_err());
        // A ledger whose tree lags the chain (written before the tree existed) is repaired at open.
        let root = ledger.tree_root(37).unwrap();
        {
            let cf = ledger.cf(CF_TREE).unwrap();
            let keys: Vec<_> = ledger
                .inner
                .db
                .iterator_cf(cf, IteratorMode::Start)
                .map(|kv| kv.unwrap().0)
                .collect();
            for k in keys
                .iter()
                .filter(|k| u64::from_be_bytes(k[..].try_into().unwrap()) >= 20)
            {
                ledger.inner.db.delete_cf(cf, k).unwrap();
            }
        }
        ledger.close();
        drop(ledger);
        let ledger = Ledger::open(dir.path()).unwrap();
        assert_eq!(ledger.tree_root(37).unwrap(), root);
    }

    fn checkpointing(seed: u8) -> Checkpointing {
        Checkpointing {
            signer: checkpoint::NoteSigner::from_seed("test.example/ledger", [seed; 32]).unwrap(),
            origin: "test.example/ledger".into(),
            interval: std::time::Duration::from_millis(1),
        }
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn checkpoints_are_signed_as_the_tree_grows_and_guard_against_truncation() {
        let tmp = tempfile::tempdir().unwrap();
        // A directory inside: the checkpoint file goes beside the ledger.
        let dir = tmp.path().join("l");
        let dir = &dir;
        let vkey = checkpointing(3).signer.verifier_key();
        let ledger = Ledger::open_with(dir, Some(checkpointing(3)), None).unwrap();
        for i in 0..5u8 {
            ledger
                .store(request(&format!("6.{i}"), "1", i + 10))
                .await
                .unwrap();
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        ledger.close();
        let note = ledger.latest_checkpoint().unwrap().unwrap();
        let cp = checkpoint::verify(&note, &vkey).unwrap();
        assert_eq!(cp.size, 5);
        assert_eq!(cp.root, ledger.tree_root(5).unwrap());
        drop(ledger);
        // Remove the newest entry behind the node's back: it refuses to start.
        {
            let db = DB::open_cf_descriptors(&db_options(), dir, cf_descriptors()).unwrap();
            db.delete_cf(db.cf_handle(CF_ENTRIES).unwrap(), 5u64.to_be_bytes())
                .unwrap();
        }
        let err = Ledger::open_with(dir, Some(checkpointing(3)), None)
            .err()
            .unwrap();
        assert!(err.to_string().contains("entries were removed"), "{err}");
    }

    /// A checkpointing ledger at `dir` with `n` stored instances (`PREFIX.i`), a few ms apart
    /// so that checkpoints are signed between them; closed.
    async fn stored_and_closed(dir: &Path, prefix: &str, n: u8) {
        let ledger = Ledger::open_with(dir, Some(checkpointing(3)), None).unwrap();
        for i in 0..n {
            ledger
                .store(request(&format!("{prefix}.{i}"), "1", i + 10))
                .await
                .unwrap();
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        ledger.close();
    }

    /// A rollback the ledger cannot see in itself (its newest entries, their tree nodes and the
    /// checkpoints that signed them all gone, as when recovery cuts a damaged write-ahead log)
    /// is refused by the checkpoint file, until the operator accepts it.
    #[tokio::test(flavor = "multi_thread")]
    async fn the_checkpoint_file_refuses_a_consistent_rollback_until_it_is_accepted() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("l");
        let file = witness::path_for(&dir);
        stored_and_closed(&dir, "9", 5).await;
        let (_, cp) = witness::read(&file).unwrap().unwrap();
        assert_eq!(cp.size, 5);
        {
            let db = DB::open_cf_descriptors(&db_options(), &dir, cf_descriptors()).unwrap();
            let cf = |n| db.cf_handle(n).unwrap();
            for n in [CF_ENTRIES, CF_CHECKPOINTS] {
                db.delete_range_cf(cf(n), 4u64.to_be_bytes(), u64::MAX.to_be_bytes())
                    .unwrap();
            }
            db.delete_range_cf(cf(CF_TREE), tree_key(3), tree_key(u64::MAX))
                .unwrap();
        }
        match Ledger::open_with(&dir, Some(checkpointing(3)), None) {
            Err(LedgerError::RolledBack { what, .. }) => {
                assert!(what.contains("2 signed entries are gone"), "{what}")
            }
            Err(e) => panic!("{e}"),
            Ok(_) => panic!("a rolled-back ledger opened"),
        }
        let accepted = Ledger::accept_rollback(&dir).unwrap();
        assert_eq!(accepted.entries, 3);
        assert_eq!(accepted.given_up, Some(5));
        assert!(accepted.set_aside.unwrap().exists());
        assert_eq!(witness::read(&file).unwrap().unwrap().1.size, 3);
        let ledger = Ledger::open(&dir).unwrap();
        ledger.close();
        // The alert is on the ledger.
        let alert = ledger.entry(4).unwrap().unwrap();
        assert_eq!(alert.version, trail::id::SECURITY_ALERT);
        assert!(
            alert.detail.contains("rollback accepted"),
            "{}",
            alert.detail
        );
        // It names what was given up (size, root and the note, escaped onto one line), as the
        // file set aside may not survive.
        let given_up = format!("size 5 root {}", hex::encode(cp.root));
        assert!(alert.detail.contains(&given_up), "{}", alert.detail);
        assert!(alert.detail.contains("(note: "), "{}", alert.detail);
        assert!(!alert.detail.contains('\n'), "{}", alert.detail);
        drop(ledger);
        // A missing file is recreated from the ledger (with an alert), not a reason to refuse.
        std::fs::remove_file(&file).unwrap();
        let ledger = Ledger::open(&dir).unwrap();
        ledger.close();
        assert_eq!(witness::read(&file).unwrap().unwrap().1.size, 3);
        assert!(ledger
            .entry(5)
            .unwrap()
            .unwrap()
            .detail
            .contains("missing; recreated"));
    }

    /// The checkpoint file blocked for everyone, root included: its temporary file's name is
    /// taken by a directory.
    fn block_witness(file: &Path) -> PathBuf {
        let mut tmp = file.as_os_str().to_owned();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        std::fs::create_dir_all(tmp.join("x")).unwrap();
        tmp
    }

    /// A checkpoint file that cannot be written must not weaken the protection silently: the
    /// ledger does not open, and while it runs no checkpoint is stored that the file does not
    /// cover; signing resumes once the file can be written.
    #[tokio::test(flavor = "multi_thread")]
    async fn no_checkpoint_is_signed_that_the_checkpoint_file_does_not_cover() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("l");
        let file = witness::path_for(&dir);
        // A new ledger whose file could not be written does not open.
        let blocked = block_witness(&file);
        match Ledger::open_with(&dir, Some(checkpointing(3)), None) {
            Err(LedgerError::Witness(witness::WitnessError::Write { path, .. })) => {
                assert_eq!(path, file)
            }
            Err(e) => panic!("{e}"),
            Ok(_) => panic!("opened with a checkpoint file it cannot write"),
        }
        std::fs::remove_dir_all(&blocked).unwrap();
        let ledger = Ledger::open_with(&dir, Some(checkpointing(3)), None).unwrap();
        for i in 0..3u8 {
            ledger
                .store(request(&format!("8.{i}"), "1", i + 10))
                .await
                .unwrap();
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while ledger.latest_checkpoint_size().unwrap() != Some(3) {
            assert!(std::time::Instant::now() < deadline, "no checkpoint of 3");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let covered = witness::read(&file).unwrap().unwrap().1.size;
        assert_eq!(covered, 3);
        let blocked = block_witness(&file);
        for i in 3..6u8 {
            ledger
                .store(request(&format!("8.{i}"), "1", i + 10))
                .await
                .unwrap();
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert_eq!(ledger.latest_checkpoint_size().unwrap(), Some(covered));
        assert_eq!(witness::read(&file).unwrap().unwrap().1.size, covered);
        std::fs::remove_dir_all(&blocked).unwrap();
        ledger.store(request("8.6", "1", 16)).await.unwrap();
        std::thread::sleep(std::time::Duration::from_millis(5));
        ledger.close();
        assert_eq!(ledger.latest_checkpoint_size().unwrap(), Some(7));
        assert_eq!(witness::read(&file).unwrap().unwrap().1.size, 7);
        drop(ledger);
        // An existing ledger whose file can no longer be written does not open either.
        let blocked = block_witness(&file);
        assert!(matches!(
            Ledger::open_with(&dir, Some(checkpointing(3)), None),
            Err(LedgerError::Witness(witness::WitnessError::Write { .. }))
        ));
        std::fs::remove_dir_all(&blocked).unwrap();
    }

    /// The file is written before the checkpoint is stored: a crash in between leaves the file
    /// ahead of the stored checkpoints, over durable entries. That is consistent, and the open
    /// stores the file's checkpoint so that the two agree again.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_checkpoint_file_ahead_of_the_stored_checkpoints_is_accepted_and_stored() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("l");
        let file = witness::path_for(&dir);
        let vkey = checkpointing(3).signer.verifier_key();
        stored_and_closed(&dir, "7", 4).await;
        let (_, cp) = witness::read(&file).unwrap().unwrap();
        assert_eq!(cp.size, 4);
        // The crash: the newest checkpoint never reached the ledger.
        {
            let db = DB::open_cf_descriptors(&db_options(), &dir, cf_descriptors()).unwrap();
            db.delete_cf(db.cf_handle(CF_CHECKPOINTS).unwrap(), 4u64.to_be_bytes())
                .unwrap();
        }
        let ledger = Ledger::open_with(&dir, Some(checkpointing(3)), None).unwrap();
        assert_eq!(ledger.latest_checkpoint_size().unwrap(), Some(4));
        let note = ledger.latest_checkpoint().unwrap().unwrap();
        let stored = checkpoint::verify(&note, &vkey).unwrap();
        assert_eq!(stored, cp);
        assert_eq!(witness::read(&file).unwrap().unwrap().0, note);
        ledger.store(request("7.4", "1", 14)).await.unwrap();
        std::thread::sleep(std::time::Duration::from_millis(5));
        ledger.close();
        assert_eq!(ledger.latest_checkpoint_size().unwrap(), Some(5));
        assert_eq!(witness::read(&file).unwrap().unwrap().1.size, 5);
    }

    /// A write-ahead log deleted whole has no damaged record for absolute consistency to stop
    /// at; the MANIFEST's record of closed logs makes the open fail instead of dropping it.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_missing_closed_write_ahead_log_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("l");
        let ledger = Ledger::open(&dir).unwrap();
        ledger.store(request("5.1", "1", 10)).await.unwrap();
        ledger.close();
        drop(ledger);
        let logs = |dir: &Path| -> Vec<PathBuf> {
            let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
                .unwrap()
                .map(|e| e.unwrap().path())
                .filter(|p| p.extension().is_some_and(|x| x == "log"))
                .collect();
            v.sort();
            v
        };
        {
            // A log closed while it still holds unflushed writes (of the entries' family), as
            // a long-running node has, then a crash.
            let mut o = db_options();
            o.set_track_and_verify_wals_in_manifest(true);
            let db = DB::open_cf_descriptors(&o, &dir, cf_descriptors()).unwrap();
            let cf = |n| db.cf_handle(n).unwrap();
            let mut wo = WriteOptions::default();
            wo.set_sync(true);
            for n in [CF_ENTRIES, CF_KEYS] {
                db.delete_cf_opt(cf(n), b"no such key", &wo).unwrap();
            }
            let before = logs(&dir);
            db.flush_cf(cf(CF_KEYS)).unwrap();
            db.delete_cf_opt(cf(CF_ENTRIES), b"no such key either", &wo)
                .unwrap();
            assert!(
                logs(&dir).len() > before.len(),
                "no new log: {:?}",
                logs(&dir)
            );
        }
        let all = logs(&dir);
        assert!(all.len() >= 2, "{all:?}");
        std::fs::remove_file(&all[all.len() - 2]).unwrap();
        match Ledger::open(&dir) {
            Err(LedgerError::Damaged { .. }) => {}
            Err(e) => panic!("{e}"),
            Ok(_) => panic!("opened without a closed write-ahead log"),
        }
        // The operator's way out works, and lasts.
        Ledger::accept_rollback(&dir).unwrap();
        let ledger = Ledger::open(&dir).unwrap();
        // The entry, then the alert.
        assert_eq!(ledger.head().unwrap().map(|h| h.0), Some(2));
        ledger.close();
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn spooled_security_events_become_entries_exactly_once() {
        let dir = tempfile::tempdir().unwrap();
        let spool = tempfile::tempdir().unwrap();
        let ledger = Ledger::open(dir.path()).unwrap();
        ledger.store(request("8.1", "2", 1)).await.unwrap();
        ledger.close();
        drop(ledger);
        let ev = SpooledEvent {
            subject_seq: 1,
            reason: Reason::Pixel,
            detector: "export".into(),
            calling_ae: String::new(),
            peer: String::new(),
        };
        ev.write(spool.path()).unwrap();
        SpooledEvent {
            subject_seq: 99,
            ..ev.clone()
        }
        .write(spool.path())
        .unwrap();
        let ledger = Ledger::open_with(dir.path(), None, Some(spool.path().to_path_buf())).unwrap();
        ledger.close();
        let e = ledger.entry(2).unwrap().unwrap();
        assert_eq!(
            (e.event, e.subject_seq, e.reason),
            (Event::IntegrityFailure, 1, Reason::Pixel)
        );
        assert_eq!(e.prev_hash, ledger.entry(1).unwrap().unwrap().hash());
        assert!(
            ledger.entry(3).unwrap().is_none(),
            "an event naming no entry is not recorded"
        );
        // The recorded event's file is gone; the bad one stays for an operator.
        assert_eq!(std::fs::read_dir(spool.path()).unwrap().count(), 1);
        // Events do not touch the instance index.
        assert_eq!(ledger.latest("8.1").unwrap().unwrap().seq, 1);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn secondary_follows_the_primary() {
        let dir = tempfile::tempdir().unwrap();
        let scratch = tempfile::tempdir().unwrap();
        let ledger = Ledger::open(dir.path()).unwrap();
        ledger.store(request("3.1", "6", 5)).await.unwrap();
        let ro = Ledger::open_secondary(dir.path(), scratch.path()).unwrap();
        assert_eq!(ro.latest("3.1").unwrap().unwrap().seq, 1);
        assert!(matches!(
            ro.store(request("3.2", "6", 6)).await,
            Err(LedgerError::ReadOnly)
        ));
    }

    use sha2::{Digest, Sha256};
    #[tokio::test(flavor = "multi_thread")]
    async fn forward_queue_is_written_with_the_entry_and_settled_once() {
        let dir = tempfile::tempdir().unwrap();
        let spool = dir.path().join("spool");
        let ledger = Ledger::open_with(&dir.path().join("l"), None, Some(spool.clone())).unwrap();
        let queued = |sop: &str, key: u8| {
            let mut r = request(sop, "1.2", key);
            r.forward_to = vec!["pacs".into(), "backup".into()];
            r
        };
        assert_eq!(
            ledger.store(queued("1.2.3", 1)).await.unwrap(),
            StoreOutcome::Stored { seq: 1, version: 1 }
        );
        ledger.store(queued("1.2.4", 2)).await.unwrap();
        // An identical re-send is a duplicate: stored once, forwarded once.
        assert!(matches!(
            ledger.store(queued("1.2.4", 2)).await.unwrap(),
            StoreOutcome::Duplicate { .. }
        ));
        // A new version is queued as well.
        ledger.store(queued("1.2.3", 3)).await.unwrap();
        assert_eq!(
            ledger.forward_pending("pacs", 0, 10).unwrap(),
            vec![1, 2, 3]
        );
        assert_eq!(ledger.forward_pending("pacs", 0, 2).unwrap(), vec![1, 2]);
        assert_eq!(
            ledger.forward_pending("backup", 0, 10).unwrap(),
            vec![1, 2, 3]
        );
        assert!(ledger.forward_pending("pac", 0, 10).unwrap().is_empty());

        let outcomes = |v: Vec<(u64, bool, u16)>| ForwardUpdate::Outcomes {
            destination: "pacs".into(),
            peer_ae: "PACS_AE".into(),
            sender_ae: "DICOMCHAIN".into(),
            outcomes: v
                .into_iter()
                .map(|(seq, delivered, status)| ForwardOutcome {
                    seq,
                    delivered,
                    superseded: false,
                    status,
                    detail: if delivered {
                        String::new()
                    } else {
                        "refused".into()
                    },
                })
                .collect(),
        };
        let n = ledger
            .forward(outcomes(vec![
                (1, true, 0),
                (3, false, 0xA700),
                (1, true, 0),
            ]))
            .await
            .unwrap();
        assert_eq!(n, 2);
        assert_eq!(ledger.forward_pending("pacs", 0, 10).unwrap(), vec![2]);
        assert_eq!(
            ledger.forward_failed("pacs").unwrap(),
            vec![(3, 0xA700, "refused".to_string())]
        );
        // Settled items are settled once: a late duplicate outcome changes nothing.
        assert_eq!(
            ledger.forward(outcomes(vec![(1, true, 0)])).await.unwrap(),
            0
        );
        let (e5, e6) = (
            ledger.entry(4).unwrap().unwrap(),
            ledger.entry(5).unwrap().unwrap(),
        );
        assert_eq!(ledger.len().unwrap(), 5);
        assert_eq!(
            (e5.event, e5.subject_seq, e5.status),
            (Event::Forward, 1, 0)
        );
        assert_eq!(e5.peer, "PACS_AE");
        assert_eq!(
            e5.instance_key,
            ledger.entry(1).unwrap().unwrap().instance_key
        );
        assert_eq!((e6.subject_seq, e6.status), (3, 0xA700));
        assert_eq!(e6.prev_hash, e5.hash());

        ledger
            .forward(ForwardUpdate::DestinationError {
                destination: "backup".into(),
                error: "connection refused".into(),
            })
            .await
            .unwrap();
        let summary = ledger.forward_summary().unwrap();
        assert_eq!(summary["pacs"].pending, 1);
        assert_eq!(summary["pacs"].failed, 1);
        assert_eq!(summary["pacs"].oldest_pending.map(|o| o.0), Some(2));
        assert_eq!(summary["backup"].pending, 3);
        assert_eq!(
            summary["backup"].last_error.as_ref().map(|e| e.1.as_str()),
            Some("connection refused")
        );

        // A retry request left in the spool (by `forward retry`) re-queues the given-up item.
        crate::ledger::forward::write_retry_request(&spool, Some("pacs")).unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while ledger.forward_pending("pacs", 0, 10).unwrap() != vec![2, 3] {
            assert!(
                std::time::Instant::now() < deadline,
                "retry request not applied"
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        assert!(ledger.forward_failed("pacs").unwrap().is_empty());
        assert_eq!(ledger.forward_pending("pacs", 2, 10).unwrap(), vec![3]);
        // Superseded items (a newer version was delivered) settle whether queued or given up.
        let superseded = |seq: u64| ForwardUpdate::Outcomes {
            destination: "pacs".into(),
            peer_ae: "PACS_AE".into(),
            sender_ae: "DICOMCHAIN".into(),
            outcomes: vec![ForwardOutcome {
                seq,
                delivered: false,
                superseded: true,
                status: 0,
                detail: "not sent: superseded".into(),
            }],
        };
        assert_eq!(
            ledger
                .forward(outcomes(vec![(2, false, 0xA700)]))
                .await
                .unwrap(),
            1
        );
        assert_eq!(ledger.forward(superseded(2)).await.unwrap(), 1);
        assert_eq!(ledger.forward(superseded(3)).await.unwrap(), 1);
        assert_eq!(ledger.forward(superseded(3)).await.unwrap(), 0);
        assert!(ledger.forward_failed("pacs").unwrap().is_empty());
        assert!(ledger.forward_pending("pacs", 0, 10).unwrap().is_empty());
        let last = ledger.entry(ledger.len().unwrap()).unwrap().unwrap();
        assert_eq!(
            (last.event, last.subject_seq, last.status),
            (Event::Forward, 3, 0)
        );
        assert_eq!(last.detail, "not sent: superseded");
        ledger.close();
        drop(ledger);
        // The queue survives a restart.
        let ledger = Ledger::open(&dir.path().join("l")).unwrap();
        assert!(ledger.forward_pending("pacs", 0, 10).unwrap().is_empty());
        assert_eq!(
            ledger.forward_pending("backup", 0, 10).unwrap(),
            vec![1, 2, 3]
        );
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn records_are_filed_by_sequence_number_and_older_ones_still_read() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::open(dir.path()).unwrap();
        let mut sealed = request("1.1", "9", 1);
        sealed.object_name = Some("sealed".into());
        sealed.object_key = Some(ObjectKey { salt: [7; 32] });
        ledger.store(sealed).await.unwrap();
        // A plaintext object (a store without a master key) is named by its instance key.
        let mut plain = request("1.2", "9", 2);
        plain.object_name = Some(crate::instance::object_name(&[2; 32]));
        ledger.store(plain).await.unwrap();
        ledger.store(request("1.3", "9", 3)).await.unwrap();
        let mut filed = Vec::new();
        ledger
            .for_each_record_batch(2, |b| filed.extend(b.into_iter().map(|(k, _)| k)))
            .unwrap();
        assert_eq!(
            filed,
            vec![
                RecordKey::Seq(1),
                RecordKey::Seq(2),
                RecordKey::Seq(3),
                RecordKey::Instance([2; 32]),
            ]
        );
        assert!(ledger.names_object("sealed", &[1; 32]).unwrap());
        assert!(ledger
            .names_object(&crate::instance::object_name(&[2; 32]), &[2; 32])
            .unwrap());
        assert!(!ledger
            .names_object(&crate::instance::object_name(&[4; 32]), &[4; 32])
            .unwrap());

        // A ledger written before: the record under the instance key only.
        let e3 = ledger.entry(3).unwrap().unwrap();
        let cf = ledger.cf(CF_META).unwrap();
        ledger.inner.db.delete_cf(cf, 3u64.to_be_bytes()).unwrap();
        assert!(ledger.record_of(&e3).unwrap().is_none());
        ledger.inner.db.put_cf(cf, [3u8; 32], [3u8; 10]).unwrap();
        assert_eq!(ledger.record_of(&e3).unwrap().unwrap(), vec![3; 10]);
        // The record under the entry's own number comes first.
        ledger
            .inner
            .db
            .put_cf(cf, 3u64.to_be_bytes(), b"newer")
            .unwrap();
        assert_eq!(ledger.record_of(&e3).unwrap().unwrap(), b"newer".to_vec());
    }
}
