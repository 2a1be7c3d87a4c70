//! `dicomchain export`: rebuilds stored instances as Part 10 files, for people.
//!
//! Works beside a running node: the ledger is opened as a RocksDB secondary (read-only, following
//! the primary) and the object store read-only. Every instance is rebuilt into a temp file in the
//! output directory and checked against the ledger (instance key, pixel digest, data set digest);
//! only an instance that passes every check is renamed to `<SOP Instance UID>.dcm`. A failing
//! instance is named on stderr, nothing is written for it, and the export ends non-zero.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::archive::retrieve::{self, RetrieveError};
use crate::config::Config;
use crate::ledger::{Ledger, LedgerError};
use crate::store::{Store, StoreError};

/// What to export.
#[derive(Debug, Clone)]
pub enum Selection {
    Study(String),
    Series(String),
    Instance(String),
}

/// Why an export could not run at all (per-instance failures are reported in [`Report`]).
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("{0}")]
    Ledger(#[from] LedgerError),
    #[error("object store: {0}")]
    Store(#[from] StoreError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("nothing stored matches {0}")]
    NotFound(String),
}

/// The outcome per instance.
#[derive(Debug, Default)]
pub struct Report {
    pub written: Vec<PathBuf>,
    pub failed: Vec<(String, String)>,
}

pub async fn run(cfg: &Config, selection: &Selection, out: &Path) -> Result<Report, ExportError> {
    let io_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ExportError::Io { path, source }
    };
    let ledger = Ledger::open_read_only(&cfg.ledger.path, "export")?;
    let store = Store::open_read_only(&cfg.store).await?.with_master_key(
        crate::archive::ingest::read_master_key(&ledger, &cfg.security.master_key_file)
            .map_err(|e| ExportError::Store(crate::store::StoreError::Config(e)))?,
    );
    let uids = match selection {
        Selection::Study(uid) => ledger.instances_in_study(uid)?,
        Selection::Series(uid) => ledger.instances_in_series(uid)?,
        Selection::Instance(uid) => vec![uid.clone()],
    };
    let mut entries = Vec::new();
    for uid in &uids {
        if let Some(e) = ledger.latest(uid)? {
            entries.push((uid.clone(), e));
        }
    }
    if entries.is_empty() {
        return Err(ExportError::NotFound(format!("{selection:?}")));
    }
    std::fs::create_dir_all(out).map_err(io_err(out))?;
    let mut report = Report::default();
    for (uid, entry) in entries {
        let dest = out.join(format!("{}.dcm", safe_file_name(&uid)));
        match export_one(&ledger, &store, &entry, &dest).await {
            Ok(()) => report.written.push(dest),
            Err(e) => {
                let mut why = e.to_string();
                let erased = retrieve::erased_meanwhile(&ledger, &entry, &e);
                if let Some(by) = erased {
                    why = format!("erased (ledger entry {by})");
                }
                // A damaged instance is a security event: the node records it on the ledger.
                if let (Some(reason), None) = (e.integrity_reason(), erased) {
                    let ev = crate::ledger::SpooledEvent {
                        subject_seq: entry.seq,
                        reason,
                        detector: "export".into(),
                        calling_ae: String::new(),
                        peer: String::new(),
                    };
                    match ev.write(&cfg.ledger.event_spool) {
                        Ok(_) => why += " (security event left for the ledger)",
                        Err(e) => {
                            why += &format!(
                                " (could not record the security event in {}: {e})",
                                cfg.ledger.event_spool.display()
                            )
                        }
                    }
                }
                report.failed.push((uid, why))
            }
        }
    }
    audit(cfg, selection, &report);
    Ok(report)
}

/// Leaves the export's audit record (110106 Export) for the node: what was selected (as the
/// SHA-256 of its UID: UIDs can identify a patient), how many instances were written, how many
/// failed their check.
fn audit(cfg: &Config, selection: &Selection, report: &Report) {
    use crate::ledger::trail::{id, AuditRecord};
    let (level, uid) = match selection {
        Selection::Study(u) => ("study", u),
        Selection::Series(u) => ("series", u),
        Selection::Instance(u) => ("instance", u),
    };
    let record = AuditRecord {
        event_id: id::EXPORT,
        calling_ae: "dicomchain export".into(),
        peer: "-".into(),
        status: if report.failed.is_empty() { 0 } else { 1 },
        detail: format!(
            "export of a {level}: {} written to files, {} failed the ledger check",
            report.written.len(),
            report.failed.len()
        ),
        identifier_sha256: <sha2::Sha256 as sha2::Digest>::digest(uid.as_bytes()).into(),
        count: report.written.len() as u64,
        ..Default::default()
    };
    if let Err(e) = record.spool(&cfg.ledger.event_spool) {
        tracing::warn!(error = %e, spool = %cfg.ledger.event_spool.display(), "cannot leave the export's audit record");
    }
}

async fn export_one(
    ledger: &Ledger,
    store: &Store,
    entry: &crate::ledger::Entry,
    dest: &Path,
) -> Result<(), RetrieveError> {
    let instance = retrieve::load_instance(ledger, entry)?;
    let dir = dest.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile::Builder::new()
        .prefix(".export-")
        .tempfile_in(dir)?;
    {
        let mut w = std::io::BufWriter::with_capacity(1024 * 1024, tmp.as_file_mut());
        w.write_all(&retrieve::part10_header(
            &instance.record,
            &entry.calling_ae,
        ))?;
        retrieve::rebuild(store, entry, &instance, &mut w).await?;
        w.flush()?;
    }
    // Only now, with every digest checked, does the file get its name; on error the temp file
    // is deleted when `tmp` drops.
    tmp.persist(dest).map_err(|e| RetrieveError::Io(e.error))?;
    Ok(())
}

/// UIDs are digits and dots; anything else is replaced so a hostile UID cannot escape `out`.
fn safe_file_name(uid: &str) -> String {
    uid.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect::<String>()
        .trim_start_matches('.')
        .to_string()
}

#[cfg(test)]
mod tests {
    #[test]
    fn file_names_stay_inside_the_output_directory() {
        assert_eq!(super::safe_file_name("1.2.840.1"), "1.2.840.1");
        assert_eq!(super::safe_file_name("../../etc/passwd"), "_.._etc_passwd");
    }
}
