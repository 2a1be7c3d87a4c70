//! The audit trail as people and log shippers read it: every ledger entry as an audit event,
//! filtered, one text line or one JSON object per line. Served by the admin API
//! (`GET /v1/audit`) and printed by `dicomchain audit`.

use serde_json::json;

use crate::ledger::{Ledger, LedgerError};
use crate::util::time::timestamp;

/// Filters of `dicomchain audit`.
#[derive(Debug, Default)]
pub struct TrailFilter {
    /// Only entries at or after this time (µs since the Unix epoch).
    pub since_micros: Option<i64>,
    /// Only entries whose calling AE title or peer is this AE title.
    pub ae: Option<String>,
    /// Only this DICOM audit event ID (e.g. 110112).
    pub event: Option<u32>,
}

/// The audit trail: every ledger entry as an audit event (its DICOM audit event ID, time,
/// calling AE, peer, outcome, description), filtered, oldest first; one JSON object per line
/// with `json`, else one text line per event.
pub fn render(ledger: &Ledger, filter: &TrailFilter, json: bool) -> Result<String, LedgerError> {
    use crate::ledger::trail::{atna, event_name};
    use crate::ledger::Event;
    let mut out = String::new();
    let mut failure = None;
    ledger.for_each_entry(|seq, entry| {
        let e = match entry {
            Ok(e) => e,
            Err(err) => {
                failure.get_or_insert(err);
                return;
            }
        };
        let id = atna(&e);
        if filter.since_micros.is_some_and(|t| e.time_micros < t)
            || filter.event.is_some_and(|want| want != id)
            || filter
                .ae
                .as_deref()
                .is_some_and(|ae| e.calling_ae.trim() != ae.trim() && e.peer.trim() != ae.trim())
        {
            return;
        }
        let (what, detail) = match e.event {
            Event::Store => (
                "C-STORE received".to_string(),
                format!("version {}, {} bytes", e.version, e.dataset_length),
            ),
            Event::Forward => ("forwarded".to_string(), e.detail.clone()),
            Event::IntegrityFailure => (
                "integrity failure".to_string(),
                if e.detail.is_empty() {
                    format!("{} in entry {}", e.reason.describe(), e.subject_seq)
                } else {
                    format!(
                        "{} in entry {} ({})",
                        e.reason.describe(),
                        e.subject_seq,
                        e.detail
                    )
                },
            ),
            Event::Grant => ("permissions granted".to_string(), e.detail.clone()),
            Event::Revoke => ("permissions revoked".to_string(), e.detail.clone()),
            Event::Audit => (String::new(), e.detail.clone()),
            Event::Erase => (
                format!("{} erased", e.peer),
                format!("{} stored entries ({})", e.subject_seq, e.detail),
            ),
        };
        let time = timestamp(e.time_micros);
        let outcome = if e.status == 0 { "success".to_string() } else { format!("{:04X}", e.status) };
        if json {
            out += &json!({
                "seq": seq,
                "time": time,
                "event_id": id,
                "event": event_name(id),
                "calling_ae": e.calling_ae,
                "peer": e.peer,
                "outcome": e.status,
                "detail": if what.is_empty() { detail.clone() } else { format!("{what}: {detail}") },
                "identifier_sha256": (e.event == Event::Audit && e.instance_key != [0; 32])
                    .then(|| hex::encode(e.instance_key)),
                "count": (e.event == Event::Audit).then_some(e.subject_seq),
            })
            .to_string();
            out.push('\n');
        } else {
            let desc = if what.is_empty() { detail } else { format!("{what}: {detail}") };
            // One line per event, whatever a peer put in its fields (entries written before
            // the ledger escaped them may hold control characters).
            use crate::util::escape::Escaped;
            out += &format!(
                "{seq:>8} {time} {id} {:<28} calling={} peer={} outcome={outcome} {}\n",
                event_name(id),
                Escaped(&e.calling_ae),
                Escaped(&e.peer),
                Escaped(&desc)
            );
        }
    })?;
    match failure {
        Some(e) => Err(e),
        None => Ok(out),
    }
}
