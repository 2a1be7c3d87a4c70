//! `dicomchain checkpoint` and `dicomchain proof`: what a third party needs to check the ledger
//! without trusting the node — the signed checkpoint, the verifier key, and inclusion and
//! consistency proofs (RFC 9162) as JSON. Read-only beside a running node (RocksDB secondary).

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use serde_json::json;

use crate::config::Config;
use crate::ledger::{checkpoint, merkle, Ledger, LedgerError};
pub use crate::ops::trail::TrailFilter;

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

/// The audit trail: every ledger entry as an audit event (its DICOM audit event ID, time,
/// calling AE, peer, outcome, description), filtered, oldest first; one JSON object per line
/// with `json`, else one text line per event.
pub fn trail(cfg: &Config, filter: &TrailFilter, json: bool) -> Result<String, AuditError> {
    let ledger = open(cfg)?;
    Ok(crate::ops::trail::render(&ledger, filter, json)?)
}
