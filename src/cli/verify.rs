//! `dicomchain verify`: audits everything the ledger promises, beside a running node.
//!
//! 1. Replays the hash chain: every entry present, in order, linked to the one before.
//! 2. Recomputes the Merkle root from the entries alone (a compact range: O(log n) memory) and
//!    checks every stored checkpoint: its signature, and its root at its size — so all
//!    checkpoints are consistent with one another and with the chain.
//! 3. Checks every metadata record against its instance key and its entry.
//! 4. Unless `--ledger-only`: streams every pixel object through SHA-256 and compares it with its
//!    entry, and lists objects that no entry names (both backends; S3 staging leftovers included).
//! 5. Holds the chain to checkpoints signed earlier and kept outside the ledger: the checkpoint
//!    file beside it (see `ledger::witness`) and any saved with `--checkpoint FILE`. The ledger
//!    must still have their size and root; a shorter one was rolled back.
//!
//! Before all that, every column family is read back with its checksums (see `ledger::scrub`):
//! a damaged table file is damage like any other, and the checks above go on with what can
//! still be read (entries past a damaged block are read one by one).
//!
//! Exit status: 0 when everything is intact, 1 when damage was found, 2 when it could not run.

use std::borrow::Cow;
use std::collections::HashSet;
use std::io::{IsTerminal, Write};

use crate::config::Config;
use crate::instance::{self, Digest32, MetadataRecord};
use crate::ledger::{checkpoint, merkle, Ledger, LedgerError};
use crate::store::{Store, StoreError};

/// Why verify could not run at all.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("{0}")]
    Ledger(#[from] LedgerError),
    #[error("object store: {0}")]
    Store(#[from] StoreError),
    #[error("{0}")]
    Setup(String),
}

/// One damaged, missing or orphaned thing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// SOP Instance UID where known, else `entry N`, `checkpoint N` or `object NAME`.
    pub subject: String,
    pub what: String,
}

#[derive(Debug, Default)]
pub struct Report {
    pub entries: u64,
    pub checkpoints: usize,
    pub objects_checked: u64,
    pub bytes_checked: u64,
    pub problems: Vec<Problem>,
    /// Security events recorded on the ledger (integrity failures found at retrieval).
    pub events: Vec<String>,
    /// Forward outcome entries (audit records; checked as part of the chain and tree).
    pub forward_outcomes: u64,
    /// Grant and revoke entries (access control changes).
    pub acl_changes: u64,
    /// Audit records (associations, queries, retrievals).
    pub audit_records: u64,
    /// Erasure entries, and the stored entries they erased (reported as erased, not damaged).
    pub erase_entries: u64,
    pub erased: u64,
    /// One line per erasure entry: what it erased.
    pub erasures: Vec<String>,
    /// Pixel objects of erased instances still in the store (shredded: their key records are
    /// gone; the node deletes them at its next start).
    pub erased_objects_left: u64,
    /// Stored entries whose pixel objects a crash took before their C-STORE was acknowledged,
    /// as the node's startup reconciliation recorded on the ledger (`ledger::unacked`): their
    /// missing objects are reported as that event, not as damage.
    pub unacknowledged: u64,
}

pub struct Options {
    pub ledger_only: bool,
    /// The verifier key to check checkpoints with; by default the node's own key file.
    pub verifier_key: Option<String>,
    /// Checkpoints saved earlier (signed notes, as `dicomchain checkpoint` prints them) that
    /// the ledger must still hold.
    pub checkpoint_files: Vec<std::path::PathBuf>,
}

/// A checkpoint kept outside the ledger, to hold the chain to.
struct Saved {
    /// `checkpoint file PATH`, for problems.
    subject: String,
    cp: checkpoint::Checkpoint,
}

impl VerifyError {
    /// Whether verify stopped because the ledger's files are damaged (RocksDB found a bad
    /// checksum even to open them): that is damage, not an inability to run.
    pub fn is_damage(&self) -> bool {
        matches!(self, VerifyError::Ledger(e) if is_damage(e))
    }
}

/// The checkpoints to hold the chain to: the checkpoint file beside the ledger, if there is
/// one, and `extra` (which must be readable). A signature that does not verify is a problem.
fn saved_checkpoints(
    cfg: &Config,
    extra: &[std::path::PathBuf],
    vkey: &str,
    problems: &mut Vec<Problem>,
) -> Result<Vec<Saved>, VerifyError> {
    use crate::ledger::witness;
    let mut out = Vec::new();
    let beside = witness::path_for(&cfg.ledger.path);
    let mut notes = Vec::new();
    match witness::read(&beside) {
        Ok(Some((note, _))) => notes.push((beside.clone(), note)),
        Ok(None) => {}
        Err(e) => problems.push(Problem {
            subject: format!("checkpoint file {}", beside.display()),
            what: e.to_string(),
        }),
    }
    for f in extra {
        let note = std::fs::read_to_string(f)
            .map_err(|e| VerifyError::Setup(format!("--checkpoint {}: {e}", f.display())))?;
        notes.push((f.clone(), note));
    }
    for (path, note) in notes {
        let subject = format!("checkpoint file {}", path.display());
        match checkpoint::verify(&note, vkey) {
            Ok(cp) => out.push(Saved { subject, cp }),
            Err(e) => problems.push(Problem {
                subject,
                what: format!("signature does not verify: {e}"),
            }),
        }
    }
    out.sort_by_key(|s| s.cp.size);
    Ok(out)
}

struct Progress {
    on: bool,
    total: u64,
}

impl Progress {
    fn tick(&self, what: &str, done: u64) {
        if self.on && (done % 4096 == 0 || done == self.total) {
            let pct = if self.total == 0 {
                100
            } else {
                done * 100 / self.total
            };
            eprint!("\rverify: {what} {done}/{} ({pct}%)   ", self.total);
            let _ = std::io::stderr().flush();
        }
    }
    fn end(&self) {
        if self.on {
            eprintln!();
        }
    }
}

pub async fn run(cfg: &Config, opts: &Options) -> Result<Report, VerifyError> {
    let ledger = Ledger::open_read_only(&cfg.ledger.path, "verify")?;
    let vkey = match &opts.verifier_key {
        Some(k) => k.clone(),
        None => crate::cli::audit::verifier_key(cfg).map_err(|e| VerifyError::Setup(e.to_string()))?,
    };
    let mut problems = Vec::new();
    let scan = ledger.scrub();
    for d in &scan.damage {
        problems.push(Problem {
            subject: "ledger".into(),
            what: format!("damaged: {d}"),
        });
    }
    let n = match ledger.len() {
        Ok(n) => n,
        // The newest entries are in a damaged block: the table files still say how far the
        // chain reaches.
        Err(e) if is_damage(&e) => ledger.entries_in_files()?,
        Err(e) => return Err(e.into()),
    };
    let mut report = Report {
        entries: n,
        ..Report::default()
    };
    let progress = Progress {
        on: std::io::stderr().is_terminal(),
        total: n,
    };
    let saved = saved_checkpoints(cfg, &opts.checkpoint_files, &vkey, &mut problems)?;
    let mut next_saved = saved.iter().peekable();
    let checkpoints = match ledger.checkpoints() {
        Ok(c) => c,
        Err(e) if is_damage(&e) => {
            problems.push(Problem {
                subject: "checkpoints".into(),
                what: format!("cannot all be read: {e}"),
            });
            Vec::new()
        }
        Err(e) => return Err(e.into()),
    };
    report.checkpoints = checkpoints.len();
    let mut next_cp = checkpoints.iter().peekable();
    let mut range = merkle::CompactRange::default();
    let mut prev = [0u8; 32];
    let mut named: HashSet<String> = HashSet::new();
    let mut with_objects: Vec<(String, crate::ledger::Entry)> = Vec::new();
    // Stored entries, the ones erased since, and the problems of stored entries.
    let mut stored: Vec<u64> = vec![0; (n / 64 + 1) as usize];
    let mut erased: HashSet<u64> = HashSet::new();
    // Stored entries recorded as unacknowledged by an integrity-failure entry after them.
    let mut unacked: HashSet<u64> = HashSet::new();
    let mut deferred: Vec<(u64, Problem)> = Vec::new();
    let check_checkpoint = |size: u64, note: &str, root: Digest32, problems: &mut Vec<Problem>| {
        match checkpoint::verify(note, &vkey) {
            Err(e) => problems.push(Problem {
                subject: format!("checkpoint {size}"),
                what: format!("signature does not verify: {e}"),
            }),
            Ok(cp) if cp.size != size => problems.push(Problem {
                subject: format!("checkpoint {size}"),
                what: format!("stored under size {size} but signs size {}", cp.size),
            }),
            Ok(cp) if cp.root != root => problems.push(Problem {
                subject: format!("checkpoint {size}"),
                what: "the entries no longer hash to the signed root".into(),
            }),
            Ok(_) => {}
        }
    };
    let check_saved = |s: &Saved, root: Digest32, problems: &mut Vec<Problem>| {
        if s.cp.root != root {
            problems.push(Problem {
                subject: s.subject.clone(),
                what: format!(
                    "the ledger's first {} entries no longer hash to the root signed for them",
                    s.cp.size
                ),
            });
        }
    };
    while let Some((size, note)) = next_cp.next_if(|(s, _)| *s == 0) {
        check_checkpoint(*size, note, merkle::empty_root(), &mut problems);
    }
    while let Some(s) = next_saved.next_if(|s| s.cp.size == 0) {
        check_saved(s, merkle::empty_root(), &mut problems);
    }
    // Records first: one sequential scan, hashed against their keys on every core.
    let (records, records_damage) = check_records(&ledger)?;
    if let Some(e) = &records_damage {
        problems.push(Problem {
            subject: "metadata records".into(),
            what: format!("cannot all be read in one scan ({e}): the rest are read one by one"),
        });
    }
    let mut expected = 1u64;
    let entries_damage = ledger.for_each_entry_salvaging(n, |seq, entry| {
        progress.tick("entries", seq);
        if seq != expected {
            problems.push(Problem {
                subject: format!("entries {expected}..{}", seq - 1),
                what: "missing from the chain".into(),
            });
            // The chain cannot be followed across a hole.
            prev = [0; 32];
        }
        expected = seq + 1;
        let entry = match entry {
            Ok(e) => e,
            Err(e) => {
                problems.push(Problem {
                    subject: format!("entry {seq}"),
                    what: e.to_string(),
                });
                prev = [0; 32];
                return;
            }
        };
        let encoded = entry.encode();
        if entry.seq != seq || entry.prev_hash != prev {
            problems.push(Problem {
                subject: format!("entry {seq}"),
                what: "hash chain broken: does not link to the entry before".into(),
            });
        }
        prev = entry.hash();
        range.push(merkle::leaf_hash(&encoded));
        while let Some((size, note)) = next_cp.next_if(|(s, _)| *s == seq) {
            check_checkpoint(*size, note, range.root(), &mut problems);
        }
        while let Some(s) = next_saved.next_if(|s| s.cp.size == seq) {
            check_saved(s, range.root(), &mut problems);
        }
        if entry.event == crate::ledger::Event::Forward {
            // An audit record about an earlier stored entry, whose commitments it copies.
            report.forward_outcomes += 1;
            let subject = (entry.subject_seq < seq)
                .then(|| ledger.entry(entry.subject_seq).ok().flatten())
                .flatten();
            let agrees = subject.is_some_and(|s| {
                s.event == crate::ledger::Event::Store
                    && s.instance_key == entry.instance_key
                    && s.dataset_sha256 == entry.dataset_sha256
                    && s.pixel_sha256 == entry.pixel_sha256
            });
            if !agrees {
                problems.push(Problem {
                    subject: format!("entry {seq}"),
                    what: format!(
                        "forward outcome names entry {}, which is not an earlier stored instance with the same commitments",
                        entry.subject_seq
                    ),
                });
            }
            return;
        }
        if entry.event == crate::ledger::Event::Audit {
            report.audit_records += 1;
            return;
        }
        if matches!(
            entry.event,
            crate::ledger::Event::Grant | crate::ledger::Event::Revoke
        ) {
            report.acl_changes += 1;
            if crate::ledger::acl::change_of(&entry).is_none() {
                problems.push(Problem {
                    subject: format!("entry {seq}"),
                    what: "grant or revocation without an AE title or with unknown permissions"
                        .into(),
                });
            }
            return;
        }
        if entry.event == crate::ledger::Event::Erase {
            report.erase_entries += 1;
            match crate::ledger::erase::erased_of(&entry) {
                None => problems.push(Problem {
                    subject: format!("entry {seq}"),
                    what: "erasure entry with malformed or inconsistent sequence ranges".into(),
                }),
                Some(seqs) => {
                    report.erasures.push(format!(
                        "entry {seq} erased a {} ({} stored entries: {}), asked by {}",
                        entry.peer, entry.subject_seq, entry.detail, entry.calling_ae
                    ));
                    for s in seqs {
                        if stored
                            .get((s / 64) as usize)
                            .is_some_and(|w| w & (1 << (s % 64)) != 0)
                        {
                            erased.insert(s);
                        } else {
                            problems.push(Problem {
                                subject: format!("entry {seq}"),
                                what: format!(
                                    "erasure names entry {s}, which is not an earlier stored instance"
                                ),
                            });
                        }
                    }
                }
            }
            return;
        }
        if entry.event == crate::ledger::Event::IntegrityFailure {
            if entry.reason == crate::ledger::Reason::Unacknowledged && entry.subject_seq < seq {
                unacked.insert(entry.subject_seq);
            }
            report.events.push(format!(
                "entry {}: {} in entry {}, found by {}",
                entry.seq,
                entry.reason.describe(),
                entry.subject_seq,
                entry.calling_ae
            ));
            return;
        }
        // Problems of a stored entry count unless a later erasure entry erased it.
        if let Some(w) = stored.get_mut((seq / 64) as usize) {
            *w |= 1 << (seq % 64);
        }
        // Records the scan could not reach are read one by one.
        let salvaged = match (&records_damage, record_for(&records, seq, &entry.instance_key)) {
            (Some(_), None) => match ledger.record_of(&entry) {
                Ok(Some(raw)) => Some(held_to(
                    Cow::Owned(check_raw(&raw)),
                    &entry.instance_key,
                )),
                Ok(None) => None,
                Err(e) => Some(Cow::Owned(RecordCheck::Bad {
                    subject: None,
                    what: format!("metadata record is unreadable: {e}"),
                })),
            },
            (_, found) => found,
        };
        let subject = match salvaged.as_deref() {
            None => {
                deferred.push((seq, Problem {
                    subject: format!("entry {seq}"),
                    what: "metadata record is missing".into(),
                }));
                format!("entry {seq}")
            }
            Some(RecordCheck::Bad { subject, what }) => {
                let subject = subject.clone().unwrap_or_else(|| format!("entry {seq}"));
                deferred.push((seq, Problem {
                    subject: subject.clone(),
                    what: what.clone(),
                }));
                subject
            }
            Some(RecordCheck::Good {
                sop,
                pixel,
                dataset,
                ..
            }) => {
                if *pixel != entry.pixel_sha256 || *dataset != entry.dataset_sha256 {
                    deferred.push((seq, Problem {
                        subject: sop.clone(),
                        what: "entry and metadata record disagree".into(),
                    }));
                }
                sop.clone()
            }
        };
        if !entry.object_name.is_empty() {
            named.insert(entry.object_name.clone());
            with_objects.push((subject, entry));
        }
    })?;
    if let Some(e) = entries_damage {
        problems.push(Problem {
            subject: "entries".into(),
            what: format!("cannot all be read in one scan ({e}): the rest were read one by one"),
        });
    }
    for s in next_saved {
        problems.push(Problem {
            subject: s.subject.clone(),
            what: format!(
                "signed for {} entries but the chain has only {n}: the ledger was rolled back",
                s.cp.size
            ),
        });
    }
    for (size, _) in next_cp {
        problems.push(Problem {
            subject: format!("checkpoint {size}"),
            what: format!(
                "signed for {size} entries but the chain has only {n}: entries were removed"
            ),
        });
    }
    progress.end();
    problems.extend(
        deferred
            .into_iter()
            .filter(|(seq, _)| !erased.contains(seq))
            .map(|(_, p)| p),
    );
    // An erased instance keeps its entry; nothing else of it may remain on the ledger.
    let mut erased_names = HashSet::new();
    for (_, e) in with_objects.iter().filter(|(_, e)| erased.contains(&e.seq)) {
        erased_names.insert(e.object_name.clone());
        if ledger.object_key(&e.object_name)?.is_some() {
            problems.push(Problem {
                subject: format!("entry {}", e.seq),
                what: "erased, but the key record of its pixel object is still on the ledger"
                    .into(),
            });
        }
    }
    for &seq in &erased {
        if records.contains_key(&seq) && ledger.entry(seq)?.is_some() {
            problems.push(Problem {
                subject: format!("entry {seq}"),
                what: "erased, but its metadata record is still on the ledger".into(),
            });
        }
    }
    with_objects.retain(|(_, e)| !erased.contains(&e.seq));
    report.erased = erased.len() as u64;
    if !opts.ledger_only {
        let store = Store::open_read_only(&cfg.store).await?.with_master_key(
            crate::archive::ingest::read_master_key(&ledger, &cfg.security.master_key_file)
                .map_err(VerifyError::Setup)?,
        );
        let progress = Progress {
            on: progress.on,
            total: with_objects.len() as u64,
        };
        // Problems of objects are confirmed once the ledger has caught up with the node: an
        // instance erased meanwhile has lost its object and key record, and that is no damage.
        let mut object_problems: Vec<(u64, Problem)> = Vec::new();
        for (i, (subject, entry)) in with_objects.iter().enumerate() {
            progress.tick("pixel objects", i as u64 + 1);
            let problem = |what: String| {
                (
                    entry.seq,
                    Problem {
                        subject: subject.clone(),
                        what,
                    },
                )
            };
            let key = match ledger.object_key(&entry.object_name) {
                Ok(k) => k,
                Err(e) if is_damage(&e) => {
                    object_problems.push(problem(format!(
                        "the key record of pixel object {} is unreadable: {e}",
                        entry.object_name
                    )));
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            let Some(key) = key else {
                object_problems.push(problem(format!(
                    "the key record of pixel object {} is missing (it cannot be decrypted)",
                    entry.object_name
                )));
                continue;
            };
            match store.digest(&entry.object_name, &key).await {
                Ok((len, digest)) => {
                    report.objects_checked += 1;
                    report.bytes_checked += len;
                    if len != entry.pixel_length || digest != entry.pixel_sha256 {
                        object_problems.push(problem(format!(
                            "pixel object {} differs from the ledger (SHA-256 or length)",
                            entry.object_name
                        )));
                    }
                }
                Err(StoreError::Damaged { reason, .. }) => object_problems.push(problem(format!(
                    "pixel object {} differs from the ledger ({reason})",
                    entry.object_name
                ))),
                Err(StoreError::NotFound { .. }) => object_problems.push(problem(format!(
                    "pixel object {} is missing",
                    entry.object_name
                ))),
                Err(e) => return Err(e.into()),
            }
        }
        progress.end();
        let listed = store.list().await?;
        ledger.catch_up();
        for (seq, p) in object_problems {
            if ledger.erased_by(seq)?.is_some() {
                report.erased += 1;
            } else if unacked.contains(&seq) {
                report.unacknowledged += 1;
            } else {
                problems.push(p);
            }
        }
        for name in listed {
            if erased_names.contains(&name) {
                // Shredded (its key record is gone); deleted at the node's next start.
                report.erased_objects_left += 1;
            } else if !named.contains(&name) && !ledger.knows_object(&name)? {
                problems.push(Problem {
                    subject: format!("object {name}"),
                    what: if name.starts_with("staging/") {
                        "leftover of an interrupted S3 upload (garbage, never a stored instance)"
                            .into()
                    } else {
                        "no ledger entry names this object (orphan)".into()
                    },
                });
            }
        }
    }
    report.problems = problems;
    Ok(report)
}

/// What the audit found for one metadata record.
#[derive(Clone)]
enum RecordCheck {
    Good {
        /// What the record hashes to.
        key: Digest32,
        sop: String,
        pixel: Digest32,
        dataset: Digest32,
    },
    Bad {
        /// The SOP Instance UID, when the damaged record still names it.
        subject: Option<String>,
        what: String,
    },
}

const MISMATCH: &str = "metadata record does not match its instance key";

/// Hashes and decodes a record (it is held to its entry's instance key by [`held_to`]).
fn check_raw(raw: &[u8]) -> RecordCheck {
    let key = instance::instance_key(raw);
    match MetadataRecord::decode(raw) {
        Ok(r) => RecordCheck::Good {
            key,
            sop: r.sop_instance_uid,
            pixel: r.pixel_sha256,
            dataset: r.dataset_sha256,
        },
        Err(e) => RecordCheck::Bad {
            subject: None,
            what: e.to_string(),
        },
    }
}

/// The check of a record as that of an entry with `instance_key`: one that hashes to another
/// key is a mismatch. Borrowed, except for the rare mismatch it finds (this runs for every
/// entry).
fn held_to<'r>(check: Cow<'r, RecordCheck>, instance_key: &Digest32) -> Cow<'r, RecordCheck> {
    if let RecordCheck::Good { key, sop, .. } = &*check {
        if key != instance_key {
            return Cow::Owned(RecordCheck::Bad {
                subject: Some(sop.clone()),
                what: MISMATCH.into(),
            });
        }
    }
    check
}

/// The check of the record entry `seq` commits to (filed under its sequence number).
fn record_for<'r>(
    records: &'r std::collections::HashMap<u64, RecordCheck>,
    seq: u64,
    instance_key: &Digest32,
) -> Option<Cow<'r, RecordCheck>> {
    records
        .get(&seq)
        .map(|check| held_to(Cow::Borrowed(check), instance_key))
}

/// Whether a ledger error is damaged bytes (a bad checksum), which verify reports and reads
/// around, rather than a reason to stop.
fn is_damage(e: &LedgerError) -> bool {
    match e {
        LedgerError::Read(source) | LedgerError::Open { source, .. } => {
            crate::ledger::scrub::is_corruption(source)
        }
        LedgerError::Damaged { .. } => true,
        _ => false,
    }
}

/// Every record hashed and decoded, by the sequence number it is filed under, in parallel batches;
/// with the damage that stopped the scan early, if any (the records read before it are kept).
#[allow(clippy::type_complexity)]
fn check_records(
    ledger: &Ledger,
) -> Result<
    (
        std::collections::HashMap<u64, RecordCheck>,
        Option<LedgerError>,
    ),
    LedgerError,
> {
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2);
    let mut out = std::collections::HashMap::new();
    let scanned = ledger.for_each_record_batch(16_384, |batch| {
        let per = batch.len().div_ceil(threads).max(1);
        let results: Vec<Vec<(u64, RecordCheck)>> = std::thread::scope(|s| {
            let handles: Vec<_> = batch
                .chunks(per)
                .map(|chunk| {
                    s.spawn(move || {
                        chunk
                            .iter()
                            .map(|(k, v)| (*k, check_raw(v)))
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_default())
                .collect()
        });
        out.extend(results.into_iter().flatten());
    });
    match scanned {
        Ok(()) => Ok((out, None)),
        Err(e) if is_damage(&e) => Ok((out, Some(e))),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_compact_range_gives_the_rfc_root_at_every_size() {
        struct Mem(std::collections::HashMap<(u8, u64), Digest32>);
        impl merkle::NodeSource for Mem {
            type Error = ();
            fn node(&self, l: u8, i: u64) -> Result<Digest32, ()> {
                self.0.get(&(l, i)).copied().ok_or(())
            }
        }
        let mut mem = Mem(Default::default());
        let mut range = merkle::CompactRange::default();
        assert_eq!(range.root(), merkle::empty_root());
        for i in 0..300u64 {
            let leaf = merkle::leaf_hash(&i.to_be_bytes());
            for (l, idx, h) in
                merkle::append_nodes(i, leaf, |l, idx| mem.0.get(&(l, idx)).copied().ok_or(()))
                    .unwrap()
            {
                mem.0.insert((l, idx), h);
            }
            range.push(leaf);
            assert_eq!(
                range.root(),
                merkle::root(&mem, i + 1).unwrap(),
                "size {}",
                i + 1
            );
        }
    }
}

/// The audit record of a verify run, for the ledger: 110101 Audit Log Used when everything was
/// intact, 110113 Security Alert (outcome 1) when damage was found; the counts, never a UID.
pub fn audit_record(report: &Report, ledger_only: bool) -> crate::ledger::trail::AuditRecord {
    use crate::ledger::trail::{id, AuditRecord};
    let damaged = !report.problems.is_empty();
    AuditRecord {
        event_id: if damaged { id::SECURITY_ALERT } else { 110101 },
        calling_ae: "dicomchain verify".into(),
        peer: "-".into(),
        status: u16::from(damaged),
        detail: format!(
            "verify{}: {} entries, {} checkpoints, {} pixel objects checked: {}",
            if ledger_only { " --ledger-only" } else { "" },
            report.entries,
            report.checkpoints,
            report.objects_checked,
            if damaged {
                format!("{} problem(s)", report.problems.len())
            } else {
                "everything intact".to_string()
            }
        ),
        count: report.problems.len() as u64,
        ..Default::default()
    }
}
