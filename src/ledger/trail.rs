//! The audit trail on the ledger: associations, queries and retrievals become entries of their
//! own (event 6), beside what the chain records anyway (stored instances, forward outcomes,
//! integrity failures, grants and revocations). Each carries its DICOM audit event ID (PS3.15
//! A.5, DCM codes 110100–110114) in `version`, the calling AE title, the peer, the outcome
//! status and a description without patient data; a query's identifier only as its SHA-256 (in
//! `instance_key`), never its values. [`atna`] maps every entry to its audit event.

use super::entry::{Entry, Event};
use super::error::LedgerError;
use super::group::Group;
use super::handle::Ledger;
use super::request::Job;
pub use super::request::{AuditRecord, SPOOL_EXTENSION};
use super::scrub;

/// DICOM audit event IDs (PS3.16 CID 400, "Audit Event ID").
pub mod id {
    pub const APPLICATION_ACTIVITY: u32 = 110100;
    pub const INSTANCES_ACCESSED: u32 = 110103;
    pub const INSTANCES_TRANSFERRED: u32 = 110104;
    pub const STUDY_DELETED: u32 = 110105;
    pub const EXPORT: u32 = 110106;
    pub const QUERY: u32 = 110112;
    pub const SECURITY_ALERT: u32 = 110113;
    pub const USER_AUTHENTICATION: u32 = 110114;
}

/// The name of an audit event ID.
pub fn event_name(id: u32) -> &'static str {
    match id {
        id::APPLICATION_ACTIVITY => "Application Activity",
        110101 => "Audit Log Used",
        110102 => "Begin Transferring DICOM Instances",
        id::INSTANCES_ACCESSED => "DICOM Instances Accessed",
        id::INSTANCES_TRANSFERRED => "DICOM Instances Transferred",
        id::STUDY_DELETED => "DICOM Study Deleted",
        id::EXPORT => "Export",
        110107 => "Import",
        110108 => "Network Entry",
        id::QUERY => "Query",
        id::SECURITY_ALERT => "Security Alert",
        id::USER_AUTHENTICATION => "User Authentication",
        _ => "Unknown",
    }
}

/// The audit event an entry stands for: its own ID for an audit record; stored instances and
/// forward outcomes are instance transfers; integrity failures, grants and revocations are
/// security alerts; erasures are study deletions.
pub fn atna(e: &Entry) -> u32 {
    match e.event {
        Event::Audit => e.version,
        Event::Store | Event::Forward => id::INSTANCES_TRANSFERRED,
        Event::IntegrityFailure | Event::Grant | Event::Revoke => id::SECURITY_ALERT,
        Event::Erase => id::STUDY_DELETED,
    }
}

impl Ledger {
    /// Appends an audit record without waiting for it (the operation it records is not held up
    /// by the ledger); a failure to record it is logged.
    pub fn audit(&self, record: AuditRecord) {
        if self.inner.secondary {
            return;
        }
        let (reply, rx) = tokio::sync::oneshot::channel();
        if let Err(e) = self.submit(Job::Audit { record, reply }) {
            tracing::warn!(error = %e, "audit record not written");
            return;
        }
        drop(rx);
    }

    /// Appends an audit record and waits until it is durable.
    pub async fn audit_durable(&self, record: AuditRecord) -> Result<u64, LedgerError> {
        let (reply, rx) = tokio::sync::oneshot::channel();
        self.ask_until_done(Job::Audit { record, reply }, rx).await
    }
}

impl Group<'_> {
    pub(super) fn audit(&mut self, r: &AuditRecord) -> Result<u64, LedgerError> {
        let (seq, prev_hash) = self.next_position();
        // Titles, addresses and details can come from peers: stored escaped, so that no reader
        // of the trail (`dicomchain audit`, syslog, the admin API) meets a control character.
        let text = |s: &str, max: usize| crate::util::escape::escape(s).chars().take(max).collect();
        let entry = Entry {
            calling_ae: text(&r.calling_ae, 64),
            sop_class_uid: r.sop_class_uid.chars().take(64).collect(),
            instance_key: r.identifier_sha256,
            version: r.event_id,
            subject_seq: r.count,
            status: r.status,
            // Never empty, so the entry always takes the version-2 encoding its fields need.
            peer: if r.peer.is_empty() {
                "-".into()
            } else {
                text(&r.peer, 128)
            },
            detail: text(&r.detail, 512),
            ..Entry::event(seq, prev_hash, self.time_micros, Event::Audit)
        };
        self.append(&entry)?;
        Ok(seq)
    }
}

/// A security alert (110113, outcome 1) about the ledger itself, for the trail.
pub(super) fn ledger_alert(detail: String) -> AuditRecord {
    AuditRecord {
        event_id: id::SECURITY_ALERT,
        calling_ae: "dicomchain".into(),
        peer: "-".into(),
        status: 1,
        detail,
        ..Default::default()
    }
}

pub(super) fn damage_alert(d: &scrub::Damage) -> AuditRecord {
    ledger_alert(format!("ledger damaged: {d}"))
}
