//! What the committer is asked to do: one [`Job`] per request, with the channel its answer goes
//! back on, and the payloads of each kind (a stored instance, forwarding progress, a grant or
//! revocation, an audit record, a pending-object note, an unacknowledged entry, an erasure).
//! The payload types are re-exported by the files that handle them (`acl`, `forward`, `trail`,
//! `erase`).

use tokio::sync::oneshot;

use super::error::LedgerError;
use super::notes::NoteId;
use crate::acl::Permission;
use crate::instance::{Digest32, IndexAttrs, MetadataRecord, ObjectKey};

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

// A store request is the common job and goes by value through the committer's channel; boxing
// it would add an allocation per C-STORE only to make the rarer jobs smaller.
#[allow(clippy::large_enum_variant)]
pub(super) enum Job {
    Store {
        req: StoreRequest,
        reply: oneshot::Sender<Result<StoreOutcome, LedgerError>>,
    },
    Forward {
        update: ForwardUpdate,
        reply: oneshot::Sender<Result<u64, LedgerError>>,
    },
    Acl {
        change: AclChange,
        reply: oneshot::Sender<Result<u64, LedgerError>>,
    },
    Audit {
        record: AuditRecord,
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
        scope: EraseScope,
        by: String,
        reply: oneshot::Sender<Result<Erased, LedgerError>>,
    },
}

impl Job {
    /// The answer to this job when its group could not be planned at all.
    pub(super) fn failed(&self, e: LedgerError) -> Planned {
        match self {
            Job::Store { .. } => Planned::Store(Err(e)),
            Job::Forward { .. } => Planned::Forward(Err(e)),
            Job::Acl { .. } => Planned::Acl(Err(e)),
            Job::Audit { .. } => Planned::Audit(Err(e)),
            Job::Note { .. } => Planned::Note(Err(e)),
            Job::Unacknowledged { .. } => Planned::Unacknowledged(Err(e)),
            Job::Erase { .. } => Planned::Erase(Err(e)),
        }
    }

    /// The metadata record bytes this job writes.
    pub(super) fn record_bytes(&self) -> usize {
        match self {
            Job::Store { req, .. } => req.record.len(),
            _ => 0,
        }
    }
}

/// What planning a job gave, before the group is written.
pub(super) enum Planned {
    Store(Result<StoreOutcome, LedgerError>),
    Forward(Result<u64, LedgerError>),
    Acl(Result<u64, LedgerError>),
    Audit(Result<u64, LedgerError>),
    Note(Result<NoteId, LedgerError>),
    Unacknowledged(Result<u64, LedgerError>),
    Erase(Result<Erased, LedgerError>),
}

/// A grant or revocation to record.
#[derive(Debug, Clone)]
pub struct AclChange {
    pub grant: bool,
    /// The AE title it applies to.
    pub ae: String,
    pub permissions: Vec<Permission>,
    /// Who asked (recorded as the entry's calling AE).
    pub by: String,
}

/// The final outcome of forwarding one stored entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForwardOutcome {
    /// The stored entry that was forwarded.
    pub seq: u64,
    /// Delivered (success or warning status) or given up.
    pub delivered: bool,
    /// Not sent because a newer version of the same SOP Instance was delivered (an older one
    /// arriving later would replace it at the destination). Settles a queued or given-up item.
    pub superseded: bool,
    /// The destination's C-STORE status, or 0x0110 (processing failure) when it never answered.
    pub status: u16,
    /// What went wrong, without patient data (empty when delivered).
    pub detail: String,
}

/// Forwarding progress recorded by the committer.
#[derive(Debug, Clone)]
pub enum ForwardUpdate {
    /// Final outcomes for `destination` (peer name) whose AE title is `peer_ae`; `sender_ae` is
    /// ours. Each removes its queue item (to the failed list when not delivered) and appends a
    /// forward entry.
    Outcomes {
        destination: String,
        peer_ae: String,
        sender_ae: String,
        outcomes: Vec<ForwardOutcome>,
    },
    /// The destination could not be reached; kept as its last error.
    DestinationError { destination: String, error: String },
    /// Moves given-up items back to the queue: of one destination, or of all.
    Retry { destination: Option<String> },
}

/// What to erase.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EraseScope {
    /// Every instance of a study (by Study Instance UID), all their versions.
    Study(String),
    /// Every instance of a patient (by Patient ID), all their versions.
    Patient(String),
}

impl EraseScope {
    pub(super) fn kind(&self) -> &'static str {
        match self {
            EraseScope::Study(_) => "study",
            EraseScope::Patient(_) => "patient",
        }
    }
}

/// What an erasure did.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Erased {
    /// The erasure entries (sequence numbers).
    pub entries: Vec<u64>,
    /// SOP Instance UIDs erased.
    pub instances: Vec<String>,
    /// Stored entries (instance versions) erased.
    pub versions: u64,
    /// Opaque names of the pixel objects to delete from the store.
    pub objects: Vec<(String, [u8; 32])>,
}

/// File extension of an audit record another process (export, verify) left in the event spool.
pub const SPOOL_EXTENSION: &str = "audit";

/// One audit record to append.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AuditRecord {
    /// DICOM audit event ID (`trail::id`).
    pub event_id: u32,
    pub calling_ae: String,
    /// The peer: its address for an association, the destination AE title of a C-MOVE.
    pub peer: String,
    /// DIMSE status of the outcome (0 = success); for an association, 0 accepted, 1 rejected.
    pub status: u16,
    /// What happened, without patient data.
    pub detail: String,
    /// The SOP Class of the operation, if any.
    pub sop_class_uid: String,
    /// SHA-256 of the request's identifier (queries and retrievals), else zero.
    pub identifier_sha256: [u8; 32],
    /// Matches of a query, or instances sent by a retrieval.
    pub count: u64,
}

impl AuditRecord {
    /// Leaves the record in the event spool `dir` for the running node (the ledger's only
    /// writer) to append, as security events are: temp file, fsync, rename, fsync directory.
    pub fn spool(&self, dir: &std::path::Path) -> std::io::Result<std::path::PathBuf> {
        use std::io::Write;
        std::fs::create_dir_all(dir)?;
        let stamp = format!("{}-{}", super::db::now_micros(), std::process::id());
        let tmp = dir.join(format!("{stamp}.audit-tmp"));
        let dest = dir.join(format!("{stamp}.{SPOOL_EXTENSION}"));
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(serde_json::to_string(self)?.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, &dest)?;
        std::fs::File::open(dir)?.sync_all()?;
        Ok(dest)
    }
}
