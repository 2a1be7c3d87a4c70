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
//! The record checks of step 3 are in [`records`], the object checks of step 4 in [`objects`].
//!
//! Exit status: 0 when everything is intact, 1 when damage was found, 2 when it could not run.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::io::{IsTerminal, Write};
use std::iter::Peekable;
use std::slice;

mod objects;
mod records;

use records::{check_raw, check_records, held_to, record_for, RecordCheck};

use crate::config::Config;
use crate::instance::Digest32;
use crate::ledger::{checkpoint, merkle, Ledger, LedgerError};
use crate::store::StoreError;

/// Why verify could not run at all.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("{0}")]
    Ledger(#[from] LedgerError),
    #[error("object store: {0}")]
    Store(#[from] StoreError),
    #[error("{0}")]
    VerifierKey(#[from] crate::cli::audit::AuditError),
    #[error("--checkpoint {}: {source}", path.display())]
    CheckpointFile {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    /// The master key cannot be read (to check encrypted pixel objects).
    #[error("{0}")]
    MasterKey(String),
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
        let note = std::fs::read_to_string(f).map_err(|source| VerifyError::CheckpointFile {
            path: f.clone(),
            source,
        })?;
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

/// A progress line on stderr, when it is a terminal.
struct Progress {
    on: bool,
    total: u64,
}

impl Progress {
    fn tick(&self, what: &str, done: u64) {
        if self.on && (done.is_multiple_of(4096) || done == self.total) {
            let pct = (done * 100).checked_div(self.total).unwrap_or(100);
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
    let vkey = match &opts.verifier_key {
        Some(k) => k.clone(),
        None => crate::cli::audit::verifier_key(cfg)?,
    };
    // Checkpoints kept outside the ledger are read before the ledger is opened: the node writes
    // one only after the entries it signs, so the ledger as opened next holds at least those.
    let mut saved_problems = Vec::new();
    let saved = saved_checkpoints(cfg, &opts.checkpoint_files, &vkey, &mut saved_problems)?;
    let ledger = Ledger::open_read_only(&cfg.ledger.path, "verify")?;
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
    let terminal = std::io::stderr().is_terminal();
    problems.extend(saved_problems);
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
    let report = Report {
        entries: n,
        checkpoints: checkpoints.len(),
        ..Report::default()
    };
    let mut walk = Walk {
        ledger: &ledger,
        vkey: &vkey,
        report,
        problems,
        checkpoints: checkpoints.iter().peekable(),
        saved: saved.iter().peekable(),
        range: merkle::CompactRange::default(),
        prev: [0; 32],
        expected: 1,
        records: HashMap::new(),
        records_damage: None,
        named: HashSet::new(),
        with_objects: Vec::new(),
        stored: vec![0; (n / 64 + 1) as usize],
        erased: HashSet::new(),
        unacked: HashSet::new(),
        deferred: Vec::new(),
    };
    walk.chain(n, terminal)?;
    let erased_names = walk.erased_leftovers()?;
    if !opts.ledger_only {
        walk.objects(cfg, &erased_names, terminal).await?;
    }
    let mut report = walk.report;
    report.problems = walk.problems;
    Ok(report)
}

/// What the walk along the chain keeps, and what it found.
struct Walk<'a> {
    ledger: &'a Ledger,
    /// The verifier key checkpoints are checked with.
    vkey: &'a str,
    report: Report,
    problems: Vec<Problem>,
    /// Stored and saved checkpoints the walk has not reached yet, by size.
    checkpoints: Peekable<slice::Iter<'a, (u64, String)>>,
    saved: Peekable<slice::Iter<'a, Saved>>,
    /// The tree of the entries walked so far.
    range: merkle::CompactRange,
    /// The hash of the entry before, and the sequence number expected next.
    prev: Digest32,
    expected: u64,
    /// Every metadata record checked, and the damage that cut their scan short (the rest are
    /// read one by one).
    records: HashMap<u64, RecordCheck>,
    records_damage: Option<LedgerError>,
    /// The pixel objects entries name, and the entries that name one (with their subject).
    named: HashSet<String>,
    with_objects: Vec<(String, crate::ledger::Entry)>,
    /// Stored entries (a bit per sequence number) and the ones erased since.
    stored: Vec<u64>,
    erased: HashSet<u64>,
    /// Stored entries recorded as unacknowledged by an integrity-failure entry after them.
    unacked: HashSet<u64>,
    /// Problems of stored entries: they count unless a later erasure entry erased the entry.
    deferred: Vec<(u64, Problem)>,
}

impl Walk<'_> {
    /// Steps 1, 2, 3 and 5: every entry in order, its link, its leaf in the tree, its record;
    /// every checkpoint at its size.
    fn chain(&mut self, n: u64, terminal: bool) -> Result<(), VerifyError> {
        let progress = Progress {
            on: terminal,
            total: n,
        };
        self.at_size(0);
        // Records first: one sequential scan, hashed against their keys on every core.
        let (records, damage) = check_records(self.ledger)?;
        if let Some(e) = &damage {
            self.problems.push(Problem {
                subject: "metadata records".into(),
                what: format!("cannot all be read in one scan ({e}): the rest are read one by one"),
            });
        }
        self.records = records;
        self.records_damage = damage;
        let ledger = self.ledger;
        let entries_damage = ledger.for_each_entry_salvaging(n, |seq, entry| {
            progress.tick("entries", seq);
            self.entry(seq, entry);
        })?;
        if let Some(e) = entries_damage {
            self.problems.push(Problem {
                subject: "entries".into(),
                what: format!(
                    "cannot all be read in one scan ({e}): the rest were read one by one"
                ),
            });
        }
        for s in self.saved.by_ref() {
            self.problems.push(Problem {
                subject: s.subject.clone(),
                what: format!(
                    "signed for {} entries but the chain has only {n}: the ledger was rolled back",
                    s.cp.size
                ),
            });
        }
        for (size, _) in self.checkpoints.by_ref() {
            self.problems.push(Problem {
                subject: format!("checkpoint {size}"),
                what: format!(
                    "signed for {size} entries but the chain has only {n}: entries were removed"
                ),
            });
        }
        progress.end();
        let erased = &self.erased;
        self.problems.extend(
            std::mem::take(&mut self.deferred)
                .into_iter()
                .filter(|(seq, _)| !erased.contains(seq))
                .map(|(_, p)| p),
        );
        Ok(())
    }

    /// Holds the stored and saved checkpoints of `size` entries to the tree walked so far.
    fn at_size(&mut self, size: u64) {
        let mut root = None;
        while let Some((at, note)) = self.checkpoints.next_if(|(s, _)| *s == size) {
            let root = *root.get_or_insert_with(|| self.range.root());
            let problem = |what: String| Problem {
                subject: format!("checkpoint {at}"),
                what,
            };
            match checkpoint::verify(note, self.vkey) {
                Err(e) => self
                    .problems
                    .push(problem(format!("signature does not verify: {e}"))),
                Ok(cp) if cp.size != *at => self.problems.push(problem(format!(
                    "stored under size {at} but signs size {}",
                    cp.size
                ))),
                Ok(cp) if cp.root != root => self.problems.push(problem(
                    "the entries no longer hash to the signed root".into(),
                )),
                Ok(_) => {}
            }
        }
        while let Some(s) = self.saved.next_if(|s| s.cp.size == size) {
            if s.cp.root != *root.get_or_insert_with(|| self.range.root()) {
                self.problems.push(Problem {
                    subject: s.subject.clone(),
                    what: format!(
                        "the ledger's first {} entries no longer hash to the root signed for them",
                        s.cp.size
                    ),
                });
            }
        }
    }

    /// One entry of the chain: linked to the one before, added to the tree, and checked for
    /// what its event promises.
    fn entry(&mut self, seq: u64, entry: Result<crate::ledger::Entry, LedgerError>) {
        use crate::ledger::Event;
        if seq != self.expected {
            self.problems.push(Problem {
                subject: format!("entries {}..{}", self.expected, seq - 1),
                what: "missing from the chain".into(),
            });
            // The chain cannot be followed across a hole.
            self.prev = [0; 32];
        }
        self.expected = seq + 1;
        let entry = match entry {
            Ok(e) => e,
            Err(e) => {
                self.problems.push(Problem {
                    subject: format!("entry {seq}"),
                    what: e.to_string(),
                });
                self.prev = [0; 32];
                return;
            }
        };
        let encoded = entry.encode();
        if entry.seq != seq || entry.prev_hash != self.prev {
            self.problems.push(Problem {
                subject: format!("entry {seq}"),
                what: "hash chain broken: does not link to the entry before".into(),
            });
        }
        self.prev = entry.hash();
        self.range.push(merkle::leaf_hash(&encoded));
        self.at_size(seq);
        match entry.event {
            Event::Forward => self.forward_outcome(seq, &entry),
            Event::Audit => self.report.audit_records += 1,
            Event::Grant | Event::Revoke => {
                self.report.acl_changes += 1;
                if crate::ledger::acl::change_of(&entry).is_none() {
                    self.problems.push(Problem {
                        subject: format!("entry {seq}"),
                        what: "grant or revocation without an AE title or with unknown permissions"
                            .into(),
                    });
                }
            }
            Event::Erase => self.erasure(seq, &entry),
            Event::IntegrityFailure => {
                if entry.reason == crate::ledger::Reason::Unacknowledged && entry.subject_seq < seq
                {
                    self.unacked.insert(entry.subject_seq);
                }
                self.report.events.push(format!(
                    "entry {}: {} in entry {}, found by {}",
                    entry.seq,
                    entry.reason.describe(),
                    entry.subject_seq,
                    entry.calling_ae
                ));
            }
            _ => self.stored_entry(seq, entry),
        }
    }

    /// A forward outcome: an audit record about an earlier stored entry, whose commitments it
    /// copies.
    fn forward_outcome(&mut self, seq: u64, entry: &crate::ledger::Entry) {
        self.report.forward_outcomes += 1;
        let subject = (entry.subject_seq < seq)
            .then(|| self.ledger.entry(entry.subject_seq).ok().flatten())
            .flatten();
        let agrees = subject.is_some_and(|s| {
            s.event == crate::ledger::Event::Store
                && s.instance_key == entry.instance_key
                && s.dataset_sha256 == entry.dataset_sha256
                && s.pixel_sha256 == entry.pixel_sha256
        });
        if !agrees {
            self.problems.push(Problem {
                subject: format!("entry {seq}"),
                what: format!(
                    "forward outcome names entry {}, which is not an earlier stored instance with the same commitments",
                    entry.subject_seq
                ),
            });
        }
    }

    /// An erasure entry: the stored entries it names are erased from here on.
    fn erasure(&mut self, seq: u64, entry: &crate::ledger::Entry) {
        self.report.erase_entries += 1;
        let Some(seqs) = crate::ledger::erase::erased_of(entry) else {
            self.problems.push(Problem {
                subject: format!("entry {seq}"),
                what: "erasure entry with malformed or inconsistent sequence ranges".into(),
            });
            return;
        };
        self.report.erasures.push(format!(
            "entry {seq} erased a {} ({} stored entries: {}), asked by {}",
            entry.peer, entry.subject_seq, entry.detail, entry.calling_ae
        ));
        for s in seqs {
            if self
                .stored
                .get((s / 64) as usize)
                .is_some_and(|w| w & (1 << (s % 64)) != 0)
            {
                self.erased.insert(s);
            } else {
                self.problems.push(Problem {
                    subject: format!("entry {seq}"),
                    what: format!(
                        "erasure names entry {s}, which is not an earlier stored instance"
                    ),
                });
            }
        }
    }

    /// A stored instance: its metadata record must commit to what its entry does.
    fn stored_entry(&mut self, seq: u64, entry: crate::ledger::Entry) {
        if let Some(w) = self.stored.get_mut((seq / 64) as usize) {
            *w |= 1 << (seq % 64);
        }
        // Records the scan could not reach are read one by one.
        let found = record_for(&self.records, seq, &entry.instance_key);
        let salvaged = match (&self.records_damage, found) {
            (Some(_), None) => match self.ledger.record_of(&entry) {
                Ok(Some(raw)) => Some(held_to(Cow::Owned(check_raw(&raw)), &entry.instance_key)),
                Ok(None) => None,
                Err(e) => Some(Cow::Owned(RecordCheck::Bad {
                    subject: None,
                    what: format!("metadata record is unreadable: {e}"),
                })),
            },
            (_, found) => found,
        };
        let (subject, problem) = match salvaged.as_deref() {
            None => (
                format!("entry {seq}"),
                Some("metadata record is missing".into()),
            ),
            Some(RecordCheck::Bad { subject, what }) => (
                subject.clone().unwrap_or_else(|| format!("entry {seq}")),
                Some(what.clone()),
            ),
            Some(RecordCheck::Good {
                sop,
                pixel,
                dataset,
                ..
            }) => {
                let disagree = *pixel != entry.pixel_sha256 || *dataset != entry.dataset_sha256;
                let what = disagree.then(|| "entry and metadata record disagree".to_string());
                (sop.clone(), what)
            }
        };
        if let Some(what) = problem {
            self.deferred.push((
                seq,
                Problem {
                    subject: subject.clone(),
                    what,
                },
            ));
        }
        if !entry.object_name.is_empty() {
            self.named.insert(entry.object_name.clone());
            self.with_objects.push((subject, entry));
        }
    }

    /// An erased instance keeps its entry; nothing else of it may remain on the ledger. Returns
    /// the names of the erased pixel objects (shredded, deleted at the node's next start), and
    /// leaves only the entries not erased to have their objects checked.
    fn erased_leftovers(&mut self) -> Result<HashSet<String>, VerifyError> {
        let ledger = self.ledger;
        let mut erased_names = HashSet::new();
        for (_, e) in self
            .with_objects
            .iter()
            .filter(|(_, e)| self.erased.contains(&e.seq))
        {
            erased_names.insert(e.object_name.clone());
            if ledger.object_key(&e.object_name)?.is_some() {
                self.problems.push(Problem {
                    subject: format!("entry {}", e.seq),
                    what: "erased, but the key record of its pixel object is still on the ledger"
                        .into(),
                });
            }
        }
        for &seq in &self.erased {
            if self.records.contains_key(&seq) && ledger.entry(seq)?.is_some() {
                self.problems.push(Problem {
                    subject: format!("entry {seq}"),
                    what: "erased, but its metadata record is still on the ledger".into(),
                });
            }
        }
        let erased = &self.erased;
        self.with_objects.retain(|(_, e)| !erased.contains(&e.seq));
        self.report.erased = self.erased.len() as u64;
        Ok(erased_names)
    }
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
