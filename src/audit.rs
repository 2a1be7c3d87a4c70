//! `dicomchain checkpoint` and `dicomchain proof`: what a third party needs to check the ledger
//! without trusting the node — the signed checkpoint, the verifier key, and inclusion and
//! consistency proofs (RFC 9162) as JSON. Read-only beside a running node (RocksDB secondary).

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use serde_json::json;

use crate::config::Config;
use crate::ledger::{checkpoint, merkle, Ledger, LedgerError};

/// Why an audit command could not answer.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("{0}")]
    Ledger(#[from] LedgerError),
    #[error("{0}")]
    Key(String),
    #[error("{0}")]
    NotFound(String),
    #[error("cannot create a scratch directory: {0}")]
    Io(#[from] std::io::Error),
}

fn open(cfg: &Config) -> Result<Ledger, AuditError> {
    Ok(Ledger::open_read_only(&cfg.ledger.path, "audit")?)
}

/// The newest signed checkpoint note.
pub fn latest_checkpoint(cfg: &Config) -> Result<String, AuditError> {
    let ledger = open(cfg)?;
    ledger
        .latest_checkpoint()?
        .ok_or_else(|| AuditError::NotFound("no checkpoint has been signed yet".into()))
}

/// The verifier key of the node's signing key, `<name>+<hex key id>+<base64 key>`.
pub fn verifier_key(cfg: &Config) -> Result<String, AuditError> {
    let text = std::fs::read_to_string(&cfg.ledger.signing_key_file)
        .map_err(|e| AuditError::Key(format!("{}: {e}", cfg.ledger.signing_key_file.display())))?;
    let signer = checkpoint::NoteSigner::parse(&text)
        .map_err(|e| AuditError::Key(format!("{}: {e}", cfg.ledger.signing_key_file.display())))?;
    Ok(signer.verifier_key())
}

fn b64(d: &[u8]) -> String {
    B64.encode(d)
}

/// The inclusion proof of an instance's latest ledger entry in the newest checkpoint.
pub fn instance_proof(
    cfg: &Config,
    sop_instance_uid: &str,
) -> Result<serde_json::Value, AuditError> {
    let ledger = open(cfg)?;
    let entry = ledger.latest(sop_instance_uid)?.ok_or_else(|| {
        AuditError::NotFound(format!("no instance {sop_instance_uid} on the ledger"))
    })?;
    let note = ledger
        .latest_checkpoint()?
        .ok_or_else(|| AuditError::NotFound("no checkpoint has been signed yet".into()))?;
    let body_end = note.rfind("\n\n").map(|i| i + 1).unwrap_or(note.len());
    let cp = checkpoint::Checkpoint::parse(&note[..body_end])
        .map_err(|e| LedgerError::Corrupt(format!("newest checkpoint: {e}")))?;
    if entry.seq > cp.size {
        return Err(AuditError::NotFound(format!(
            "entry {} of {sop_instance_uid} is newer than the newest checkpoint (size {}); one is signed within ledger.checkpoint_interval ({} s)",
            entry.seq, cp.size, cfg.ledger.checkpoint_interval
        )));
    }
    let leaf = entry.encode();
    let proof = ledger.inclusion_proof(entry.seq, cp.size)?;
    Ok(json!({
        "sop_instance_uid": sop_instance_uid,
        "version": entry.version,
        "leaf_index": entry.seq - 1,
        "tree_size": cp.size,
        "leaf": b64(&leaf),
        "leaf_hash": b64(&merkle::leaf_hash(&leaf)),
        "inclusion": proof.iter().map(|h| b64(h)).collect::<Vec<_>>(),
        "checkpoint": note,
        "dataset_sha256": hex::encode(entry.dataset_sha256),
        "instance_key": hex::encode(entry.instance_key),
        "pixel_sha256": hex::encode(entry.pixel_sha256),
    }))
}

/// The consistency proof between two tree sizes.
pub fn consistency_proof(
    cfg: &Config,
    old: u64,
    new: u64,
) -> Result<serde_json::Value, AuditError> {
    let ledger = open(cfg)?;
    let size = ledger.len()?;
    if old == 0 || old > new || new > size {
        return Err(AuditError::NotFound(format!(
            "need 0 < OLD <= NEW <= {size} (the ledger's size), got {old} and {new} \
             (RFC 9162 defines no proof from the empty tree)"
        )));
    }
    let proof = ledger.consistency_proof(old, new)?;
    Ok(json!({
        "old_size": old,
        "new_size": new,
        "old_root": b64(&ledger.tree_root(old)?),
        "new_root": b64(&ledger.tree_root(new)?),
        "consistency": proof.iter().map(|h| b64(h)).collect::<Vec<_>>(),
    }))
}

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
pub fn trail(cfg: &Config, filter: &TrailFilter, json: bool) -> Result<String, AuditError> {
    let ledger = open(cfg)?;
    trail_of(&ledger, filter, json)
}

/// [`trail`] of an open ledger (the running node's, for the admin API).
pub fn trail_of(ledger: &Ledger, filter: &TrailFilter, json: bool) -> Result<String, AuditError> {
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
        let time = chrono_like(e.time_micros);
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
        Some(e) => Err(e.into()),
        None => Ok(out),
    }
}

/// `2026-11-26T01:02:03.456789Z` from µs since the epoch (UTC, proleptic Gregorian).
pub fn timestamp(micros: i64) -> String {
    chrono_like(micros)
}

fn chrono_like(micros: i64) -> String {
    let secs = micros.div_euclid(1_000_000);
    let frac = micros.rem_euclid(1_000_000);
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{frac:06}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Parses `--since`: seconds since the epoch, or `YYYY-MM-DD[THH[:MM[:SS]]][Z]` (UTC). Strict:
/// a date that does not exist (February 31), a part that is not a number, or a year outside
/// 1970–9999 is refused rather than guessed.
pub fn parse_since(s: &str) -> Option<i64> {
    let s = s.trim();
    // All digits and not a YYYYMMDD-looking 8: seconds since the epoch.
    if !s.is_empty() && s.len() != 8 && s.bytes().all(|b| b.is_ascii_digit()) {
        return s.parse::<i64>().ok()?.checked_mul(1_000_000);
    }
    let s = s.strip_suffix('Z').unwrap_or(s);
    let (date, time) = s.split_once('T').unwrap_or((s, "00"));
    let num = |p: &str| -> Option<i64> {
        (!p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
            .then(|| p.parse().ok())
            .flatten()
    };
    let d: Vec<&str> = date.split('-').collect();
    let t: Vec<&str> = time.split(':').collect();
    if d.len() != 3 || t.is_empty() || t.len() > 3 {
        return None;
    }
    let (y, m, day) = (num(d[0])?, num(d[1])?, num(d[2])?);
    let hh = num(t[0])?;
    let mm = t.get(1).map_or(Some(0), |p| num(p))?;
    let ss = t.get(2).map_or(Some(0), |p| num(p))?;
    if !(1970..=9999).contains(&y)
        || !(1..=12).contains(&m)
        || !(1..=31).contains(&day)
        || hh > 23
        || mm > 59
        || ss > 59
    {
        return None;
    }
    // Days from civil (the inverse of `chrono_like`).
    let y2 = if m <= 2 { y - 1 } else { y };
    let era = y2.div_euclid(400);
    let yoe = y2.rem_euclid(400);
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let micros = (days * 86_400 + hh * 3600 + mm * 60 + ss) * 1_000_000;
    // February 31 would roll into March: refuse a date that does not come back unchanged.
    (chrono_like(micros)[..10] == format!("{y:04}-{m:02}-{day:02}")).then_some(micros)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_print_and_parse_back() {
        assert_eq!(chrono_like(0), "1970-01-01T00:00:00.000000Z");
        let t = parse_since("2026-11-26T01:02:03").unwrap();
        assert_eq!(chrono_like(t + 456_789), "2026-11-26T01:02:03.456789Z");
        assert_eq!(parse_since("2024-02-29"), Some(1_709_164_800 * 1_000_000));
        assert_eq!(parse_since("1700000000"), Some(1_700_000_000 * 1_000_000));
        assert_eq!(parse_since("2024-13-01"), None);
        assert_eq!(parse_since("yesterday"), None);
        assert_eq!(parse_since("2024-02-29Z"), parse_since("2024-02-29"));
        assert_eq!(parse_since("2026-02-31"), None);
        assert_eq!(parse_since("2026-01-01T10:xx"), None);
        assert_eq!(parse_since("20260101"), None);
        assert_eq!(parse_since("99999999999999999"), None);
        assert_eq!(
            parse_since("2026-11-26T01"),
            parse_since("2026-11-26T01:00:00")
        );
    }
}
