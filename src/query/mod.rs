//! C-FIND: answering Patient Root and Study Root queries (PS3.4 C.4.1) from the ledger's index.
//!
//! - [`dataset`] parses identifiers and stored metadata into elements and writes responses;
//! - [`charset`] decodes text under any Specific Character Set, ISO 2022 extensions included;
//! - [`matching`] turns an identifier into keys with the matching rules of PS3.4 C.2.2.2;
//! - [`index`] is what the index keeps of an instance (written at ingest, read here);
//! - this module plans and runs a query: it picks the most selective index range (probing each
//!   candidate for at most [`PROBE`] entities), walks it skipping over the rest of every study or
//!   series already seen, and checks each candidate's stored metadata against every key. So the
//!   cost follows the number of matching entities, not the size of the archive.
//!
//! Attributes of an entity above the image level are read from one of its instances (the one the
//! index led to); instances of a study are expected to agree on the study's attributes.

pub mod charset;
pub mod dataset;
pub mod index;
pub mod matching;

use std::borrow::Cow;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};

use charset::Charset;
use dataset::{Element, Value};
use matching::*;

use crate::instance::Layout;
use crate::ledger::{find_key, Ledger, LedgerError, Step};
use crate::archive::retrieve::{self, RetrieveError};
use crate::dicom::Encoding;

/// Most entities counted when estimating how selective an index range is.
pub const PROBE: usize = 64;

/// Settings of one C-FIND.
#[derive(Debug, Clone)]
pub struct FindOptions {
    pub matching: MatchOptions,
    /// Most matches answered; more end the query with a failure.
    pub max_results: usize,
    /// Retrieve AE Title (0008,0054) put in every response: our own AE title.
    pub retrieve_ae: String,
}

#[derive(Debug, thiserror::Error)]
pub enum FindError {
    #[error("more than {0} matches; narrow the query")]
    TooMany(usize),
    #[error("query cancelled")]
    Cancelled,
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    #[error("stored metadata unreadable: {0}")]
    Record(String),
}

impl From<RetrieveError> for FindError {
    fn from(e: RetrieveError) -> Self {
        FindError::Record(e.to_string())
    }
}

/// One candidate instance and where the index found it.
#[derive(Debug, Clone)]
struct Candidate {
    study: String,
    series: String,
    sop: String,
}

/// An index range the planner can walk.
#[derive(Debug, Clone)]
enum Source {
    /// Instances of listed SOP Instance UIDs.
    Sops(Vec<String>),
    /// Keys under `prefix` (`a\0TAG\0value…` or `study\0…`): `head_fields` NUL-separated fields
    /// precede study/series/SOP in each key (1 for attribute keys, 0 for `study\0` keys whose
    /// prefix holds the study). `upto`: stop past this value (range scans).
    Scan {
        prefix: Vec<u8>,
        start: Vec<u8>,
        upto: Option<Vec<u8>>,
        study_in_prefix: Option<String>,
    },
    /// The union of several ranges (a key listing several values).
    Union(Vec<Source>),
}

/// Runs `query`, handing each response identifier (encoded in `enc`) to `emit`, which returns
/// false when nobody listens any more. Returns the number of matches.
pub fn run(
    ledger: &Ledger,
    q: &Query,
    opts: &FindOptions,
    enc: Encoding,
    cancel: &AtomicBool,
    mut emit: impl FnMut(Vec<u8>) -> bool,
) -> Result<usize, FindError> {
    run_with(ledger, q, opts, cancel, |elements, _| {
        let mut bytes = Vec::with_capacity(512);
        dataset::write(&elements, enc, &mut bytes);
        emit(bytes)
    })
}

/// The SOP Instance UIDs (latest versions) under every entity the identifier names: what a
/// C-MOVE or C-GET sends. The query is run at the IMAGE level with the identifier's keys.
pub fn instances(
    ledger: &Ledger,
    q: &Query,
    cancel: &AtomicBool,
) -> Result<Vec<String>, FindError> {
    let mut q = q.clone();
    q.level = Level::Image;
    let opts = FindOptions {
        matching: MatchOptions::default(),
        max_results: usize::MAX,
        retrieve_ae: String::new(),
    };
    let mut out = Vec::new();
    run_with(ledger, &q, &opts, cancel, |_, c| {
        out.push(c.sop.clone());
        true
    })?;
    Ok(out)
}

/// Runs a query, handing each match (response identifier and candidate) to `on_match`, which
/// returns false to stop.
fn run_with(
    ledger: &Ledger,
    q: &Query,
    opts: &FindOptions,
    cancel: &AtomicBool,
    mut on_match: impl FnMut(Vec<Element<'static>>, &Candidate) -> bool,
) -> Result<usize, FindError> {
    let plan = plan(ledger, q)?;
    let mut seen: HashSet<String> = HashSet::new();
    let mut cache = StatsCache::default();
    let mut matched = 0usize;
    let mut failure: Option<FindError> = None;
    let mut on_candidate = |c: Candidate| -> bool {
        if cancel.load(Ordering::Relaxed) {
            failure = Some(FindError::Cancelled);
            return false;
        }
        let id = match q.level {
            Level::Patient => None,
            Level::Study => Some(c.study.clone()),
            Level::Series => Some(c.series.clone()),
            Level::Image => Some(c.sop.clone()),
        };
        if let Some(id) = &id {
            if seen.contains(id) {
                return true;
            }
        }
        match evaluate(ledger, q, opts, &c, &mut seen, &mut cache) {
            Ok(Some(elements)) => {
                if let Some(id) = id {
                    seen.insert(id);
                }
                if matched == opts.max_results {
                    failure = Some(FindError::TooMany(opts.max_results));
                    return false;
                }
                matched += 1;
                if !on_match(elements, &c) {
                    failure = Some(FindError::Cancelled);
                    return false;
                }
                true
            }
            Ok(None) => true,
            Err(e) => {
                failure = Some(e);
                false
            }
        }
    };
    walk(ledger, &plan, q.level, &mut on_candidate)?;
    match failure {
        Some(e) => Err(e),
        None => Ok(matched),
    }
}

/// Walks a source, calling `f` per candidate (skipping the rest of each study or series at
/// those levels) until `f` returns false.
fn walk(
    ledger: &Ledger,
    source: &Source,
    level: Level,
    f: &mut dyn FnMut(Candidate) -> bool,
) -> Result<(), FindError> {
    match source {
        Source::Union(parts) => {
            let mut go = true;
            for part in parts {
                walk(ledger, part, level, &mut |c| {
                    go = f(c);
                    go
                })?;
                if !go {
                    break;
                }
            }
            Ok(())
        }
        Source::Sops(uids) => {
            for uid in uids {
                let keys = ledger.location(uid)?;
                let Some(study_key) = keys.first() else {
                    continue;
                };
                let Some(c) = parse_study_key(study_key) else {
                    continue;
                };
                if !f(c) {
                    break;
                }
            }
            Ok(())
        }
        Source::Scan {
            prefix,
            start,
            upto,
            study_in_prefix,
        } => {
            let mut result = Ok(());
            ledger
                .scan(prefix, start, |suffix, _| {
                    let fields: Vec<&[u8]> = suffix.split(|b| *b == 0).collect();
                    let (head, study, series, sop) = match (study_in_prefix, fields.as_slice()) {
                        (Some(s), [series, sop]) => (None, s.as_bytes(), *series, *sop),
                        (None, [head, study, series, sop]) => (Some(*head), *study, *series, *sop),
                        (None, [study, series, sop]) => (None, *study, *series, *sop),
                        _ => return Step::Next,
                    };
                    if let (Some(upto), Some(head)) = (upto, head) {
                        if head > upto.as_slice() {
                            return Step::Stop;
                        }
                    }
                    let c = Candidate {
                        study: String::from_utf8_lossy(study).into_owned(),
                        series: String::from_utf8_lossy(series).into_owned(),
                        sop: String::from_utf8_lossy(sop).into_owned(),
                    };
                    if !f(c) {
                        return Step::Stop;
                    }
                    // Skip what cannot bring a new entity at this level.
                    let mut to = prefix.clone();
                    if let Some(h) = head {
                        to.extend_from_slice(h);
                        to.push(0);
                    }
                    if study_in_prefix.is_some() && level <= Level::Study {
                        return Step::Stop;
                    }
                    match level {
                        Level::Patient | Level::Study if study_in_prefix.is_none() => {
                            to.extend_from_slice(study);
                            to.push(1);
                            Step::Seek(to)
                        }
                        Level::Series => {
                            if study_in_prefix.is_none() {
                                to.extend_from_slice(study);
                                to.push(0);
                            }
                            to.extend_from_slice(series);
                            to.push(1);
                            Step::Seek(to)
                        }
                        _ => Step::Next,
                    }
                })
                .map_err(|e| {
                    result = Err(FindError::from(e));
                })
                .ok();
            result
        }
    }
}

/// `study\0S\0SE\0SOP` → candidate.
fn parse_study_key(k: &[u8]) -> Option<Candidate> {
    let s = std::str::from_utf8(k.strip_prefix(b"study\0")?).ok()?;
    let mut it = s.split('\0');
    Some(Candidate {
        study: it.next()?.to_string(),
        series: it.next()?.to_string(),
        sop: it.next()?.to_string(),
    })
}

/// The index ranges a query could start from: one source per key that an index serves (a key
/// listing several values gives the union of their ranges).
fn sources(q: &Query) -> Vec<Source> {
    let mut out = Vec::new();
    let scan = |prefix: Vec<u8>| Source::Scan {
        prefix,
        start: Vec::new(),
        upto: None,
        study_in_prefix: None,
    };
    for key in q.matching_keys() {
        let mut parts = Vec::new();
        match (&key.matcher, key.tag) {
            (Matcher::Uids(uids), SOP_INSTANCE_UID) => parts.push(Source::Sops(uids.clone())),
            (Matcher::Uids(uids), STUDY_INSTANCE_UID) => {
                for uid in uids {
                    parts.push(Source::Scan {
                        prefix: format!("study\0{uid}\0").into_bytes(),
                        start: Vec::new(),
                        upto: None,
                        study_in_prefix: Some(uid.clone()),
                    });
                }
            }
            (Matcher::Uids(uids), SERIES_INSTANCE_UID) => {
                for uid in uids {
                    // An exact value: the prefix ends with its NUL, keys then hold study,
                    // series and SOP only.
                    let mut p = find_key(SERIES_INSTANCE_UID, uid);
                    p.push(0);
                    parts.push(scan(p));
                }
            }
            (Matcher::Text(patterns), tag)
                if INDEXED.contains(&tag) || tag == MODALITIES_IN_STUDY =>
            {
                let tag = if tag == MODALITIES_IN_STUDY {
                    MODALITY
                } else {
                    tag
                };
                for p in patterns {
                    let lit = p.literal_prefix();
                    if lit.is_empty() {
                        // One value that no index narrows: the key cannot start the search.
                        parts.clear();
                        break;
                    }
                    let mut prefix = find_key(tag, &lit);
                    if p.is_exact() {
                        prefix.push(0);
                    }
                    parts.push(scan(prefix));
                }
            }
            (Matcher::PersonName(groups), tag) if INDEXED.contains(&tag) => {
                if let Some(Some(p)) = groups.first() {
                    let lit = p.literal_prefix().to_uppercase();
                    if !lit.is_empty() {
                        parts.push(scan(find_key(tag, &lit)));
                    }
                }
            }
            (
                Matcher::Range {
                    lo,
                    hi,
                    kind: RangeKind::Date,
                },
                tag,
            ) if INDEXED.contains(&tag) => {
                parts.push(date_range(tag, lo, hi));
            }
            (Matcher::DateTime { lo, hi, .. }, tag) if INDEXED.contains(&tag) => {
                parts.push(date_range(
                    tag,
                    &lo[..8.min(lo.len())],
                    &hi[..8.min(hi.len())],
                ));
            }
            _ => {}
        }
        match parts.len() {
            0 => {}
            1 => out.extend(parts),
            _ => out.push(Source::Union(parts)),
        }
    }
    out
}

fn date_range(tag: u32, lo: &str, hi: &str) -> Source {
    let lo = lo.trim_end_matches('0');
    Source::Scan {
        prefix: find_key(tag, ""),
        start: lo.as_bytes().to_vec(),
        upto: Some(hi.as_bytes().to_vec()),
        study_in_prefix: None,
    }
}

/// Picks the source that yields the fewest entities (probing each up to [`PROBE`]); the whole
/// hierarchy when no key narrows the search.
fn plan(ledger: &Ledger, q: &Query) -> Result<Source, FindError> {
    let mut best: Option<(usize, Source)> = None;
    for s in sources(q) {
        let n = match &s {
            Source::Sops(uids) => uids.len(),
            scan => {
                let mut n = 0;
                walk(ledger, scan, q.level.max(Level::Study), &mut |_| {
                    n += 1;
                    n < PROBE
                })?;
                n
            }
        };
        if best.as_ref().is_none_or(|(b, _)| n < *b) {
            best = Some((n, s));
        }
        if n == 0 {
            break;
        }
    }
    Ok(best.map(|(_, s)| s).unwrap_or(Source::Scan {
        prefix: b"study\0".to_vec(),
        start: Vec::new(),
        upto: None,
        study_in_prefix: None,
    }))
}

/// A stored instance, parsed.
struct Loaded {
    bytes: Vec<u8>,
    enc: Encoding,
}

fn load(ledger: &Ledger, sop: &str) -> Result<Option<Loaded>, FindError> {
    let Some(entry) = ledger.latest(sop)? else {
        return Ok(None);
    };
    let record = match retrieve::load_record(ledger, &entry) {
        // Erased while the query ran: no longer a match.
        Err(RetrieveError::Erased { .. }) => return Ok(None),
        r => r?,
    };
    Ok(Some(
        match (
            Encoding::from_transfer_syntax(&record.transfer_syntax),
            record.layout,
        ) {
            (Some(enc), Layout::Split) => Loaded {
                bytes: record.indexable_prefix().to_vec(),
                enc,
            },
            _ => {
                let (inflated, _) = retrieve::inflate_start(&record.meta)
                    .map_err(|e| FindError::Record(e.to_string()))?;
                Loaded {
                    bytes: inflated,
                    enc: Encoding::ExplicitLittle,
                }
            }
        },
    ))
}

/// Checks one candidate; the response identifier when it matches.
fn evaluate(
    ledger: &Ledger,
    q: &Query,
    opts: &FindOptions,
    c: &Candidate,
    seen: &mut HashSet<String>,
    cache: &mut StatsCache,
) -> Result<Option<Vec<Element<'static>>>, FindError> {
    let Some(loaded) = load(ledger, &c.sop)? else {
        return Ok(None);
    };
    let elements = dataset::parse(&loaded.bytes, loaded.enc, true)
        .map_err(|e| FindError::Record(e.to_string()))?;
    let charset = dataset::find(&elements, SPECIFIC_CHARACTER_SET)
        .map(|e| Charset::from_value(e.bytes()))
        .unwrap_or(Charset::from_value(b""));
    let patient = (q.level == Level::Patient).then(|| {
        dataset::find(&elements, PATIENT_ID)
            .map(|e| text(e.bytes()))
            .unwrap_or_default()
    });
    if patient.as_ref().is_some_and(|pid| seen.contains(pid)) {
        return Ok(None);
    }
    let mut computed = Computed::new(ledger, c, &elements, &charset, cache);
    for key in q.matching_keys() {
        let ok = match &key.matcher {
            Matcher::DateTime { lo, hi, time_tag } => matches_date_time(
                lo,
                hi,
                dataset::find(&elements, key.tag),
                dataset::find(&elements, *time_tag),
            ),
            // The hierarchy UIDs are those the index holds (the command's SOP Instance UID
            // when a data set lacks its own).
            m if indexed_uid(c, key.tag).is_some() => {
                matches_text(m, indexed_uid(c, key.tag).unwrap_or_default(), false)
            }
            m if is_computed(key.tag) => match computed.value(key.tag)? {
                Some(v) => matches_text(m, &v, false),
                None => false,
            },
            m => matches(
                m,
                dataset::find(&elements, key.tag),
                &charset,
                opts.matching.case_insensitive_names,
            ),
        };
        if !ok {
            return Ok(None);
        }
    }
    // A patient is answered once, by the first of its instances that matches.
    if let Some(pid) = patient {
        seen.insert(pid);
    }
    // The response: every requested key, then level, Retrieve AE Title and character set.
    let mut out: Vec<Element<'static>> = Vec::new();
    let put = |out: &mut Vec<Element<'static>>, tag: u32, vr: [u8; 2], bytes: Vec<u8>| {
        out.push(Element {
            tag,
            vr,
            value: Value::Bytes(Cow::Owned(bytes)),
        })
    };
    for key in &q.keys {
        if matches!(key.tag, RETRIEVE_AE_TITLE | INSTANCE_AVAILABILITY) {
            continue;
        }
        if level_of(key.tag, q.model) > q.level {
            // Not an attribute of this level: returned empty (PS3.4 C.4.1.1.3.2).
            out.push(empty(key));
            continue;
        }
        if is_computed(key.tag) {
            let v = computed.value(key.tag)?.unwrap_or_default();
            put(
                &mut out,
                key.tag,
                key_vr(key),
                dataset::padded(&key_vr(key), v.as_bytes()),
            );
            continue;
        }
        match (dataset::find(&elements, key.tag), indexed_uid(c, key.tag)) {
            (Some(e), _) => out.push(project(e, key, &charset, opts)),
            (None, Some(uid)) => put(
                &mut out,
                key.tag,
                *b"UI",
                dataset::padded(b"UI", uid.as_bytes()),
            ),
            (None, None) => out.push(empty(key)),
        }
    }
    // The unique key of the level identifies the match even when the SCU forgot to ask for it.
    let unique = unique_key(q.level);
    if q.key(unique).is_none() {
        if let Some(e) = dataset::find(&elements, unique) {
            out.push(e.clone().into_owned());
        } else if let Some(uid) = indexed_uid(c, unique) {
            put(
                &mut out,
                unique,
                *b"UI",
                dataset::padded(b"UI", uid.as_bytes()),
            );
        }
    }
    put(
        &mut out,
        QUERY_RETRIEVE_LEVEL,
        *b"CS",
        dataset::padded(b"CS", q.level.name().as_bytes()),
    );
    put(
        &mut out,
        RETRIEVE_AE_TITLE,
        *b"AE",
        dataset::padded(b"AE", opts.retrieve_ae.as_bytes()),
    );
    if q.key(INSTANCE_AVAILABILITY).is_some() {
        put(&mut out, INSTANCE_AVAILABILITY, *b"CS", b"ONLINE".to_vec());
    }
    if let Some(cs) = dataset::find(&elements, SPECIFIC_CHARACTER_SET).filter(|e| !e.is_empty()) {
        put(
            &mut out,
            SPECIFIC_CHARACTER_SET,
            *b"CS",
            cs.bytes().to_vec(),
        );
    }
    out.sort_by_key(|e| e.tag);
    out.dedup_by_key(|e| e.tag);
    Ok(Some(out))
}

/// The candidate's Study, Series or SOP Instance UID as indexed.
fn indexed_uid(c: &Candidate, tag: u32) -> Option<&str> {
    match tag {
        STUDY_INSTANCE_UID => Some(&c.study),
        SERIES_INSTANCE_UID => Some(&c.series),
        SOP_INSTANCE_UID => Some(&c.sop),
        _ => None,
    }
}

fn key_vr(key: &Key) -> [u8; 2] {
    if &key.vr == b"UN" {
        dataset::dictionary_vr(key.tag)
    } else {
        key.vr
    }
}

fn empty(key: &Key) -> Element<'static> {
    Element {
        tag: key.tag,
        vr: key_vr(key),
        value: if &key.vr == b"SQ" {
            Value::Items(Vec::new())
        } else {
            Value::Bytes(Cow::Owned(Vec::new()))
        },
    }
}

/// A stored element as returned for `key`: a sequence keeps the items that match the key's
/// sub-keys, each reduced to the requested sub-keys (whole items when none were named).
fn project(e: &Element<'_>, key: &Key, charset: &Charset, opts: &FindOptions) -> Element<'static> {
    let Value::Items(items) = &e.value else {
        return e.clone().into_owned();
    };
    if key.sub_keys.is_empty() {
        return e.clone().into_owned();
    }
    let kept = items
        .iter()
        .filter(|item| {
            key.sub_keys.iter().all(|k| {
                matches(
                    &k.matcher,
                    dataset::find(item, k.tag),
                    charset,
                    opts.matching.case_insensitive_names,
                )
            })
        })
        .map(|item| {
            let mut els: Vec<Element<'static>> = key
                .sub_keys
                .iter()
                .map(|k| match dataset::find(item, k.tag) {
                    Some(sub) => project(sub, k, charset, opts),
                    None => empty(k),
                })
                .collect();
            els.sort_by_key(|e| e.tag);
            els
        })
        .collect();
    Element {
        tag: e.tag,
        vr: *b"SQ",
        value: Value::Items(kept),
    }
}

fn is_computed(tag: u32) -> bool {
    matches!(
        tag,
        MODALITIES_IN_STUDY
            | SOP_CLASSES_IN_STUDY
            | PATIENT_RELATED_STUDIES
            | PATIENT_RELATED_SERIES
            | PATIENT_RELATED_INSTANCES
            | STUDY_RELATED_SERIES
            | STUDY_RELATED_INSTANCES
            | SERIES_RELATED_INSTANCES
    )
}

/// The computed attributes of a candidate's patient, study and series, read from the index on
/// first use and kept for the rest of the query (an IMAGE-level query asking Number of Study
/// Related Instances reads each study once, not once per instance).
struct Computed<'l, 'c> {
    ledger: &'l Ledger,
    study: String,
    series: String,
    patient_id: String,
    cache: &'c mut StatsCache,
}

/// Computed attributes read during one query.
#[derive(Default)]
struct StatsCache {
    studies: HashMap<String, StudyStats>,
    series: HashMap<(String, String), usize>,
    patients: HashMap<String, (usize, usize, usize)>,
}

#[derive(Default)]
struct StudyStats {
    series: BTreeSet<String>,
    instances: usize,
    modalities: BTreeSet<String>,
    sop_classes: BTreeSet<String>,
}

impl<'l, 'c> Computed<'l, 'c> {
    fn new(
        ledger: &'l Ledger,
        c: &Candidate,
        elements: &[Element<'_>],
        charset: &Charset,
        cache: &'c mut StatsCache,
    ) -> Computed<'l, 'c> {
        Computed {
            ledger,
            study: c.study.clone(),
            series: c.series.clone(),
            // As the index holds it (decoded with the data set's character set).
            patient_id: dataset::find(elements, PATIENT_ID)
                .map(|e| index::index_value(e, charset))
                .unwrap_or_default(),
            cache,
        }
    }

    fn study(ledger: &Ledger, study: &str) -> Result<StudyStats, FindError> {
        let mut s = StudyStats::default();
        let prefix = format!("study\0{study}\0").into_bytes();
        ledger.scan(&prefix, b"", |suffix, value| {
            if let Some(series) = suffix.split(|b| *b == 0).next() {
                s.series
                    .insert(String::from_utf8_lossy(series).into_owned());
            }
            s.instances += 1;
            let mut parts = value.split(|b| *b == 0);
            if let Some(class) = parts.next().filter(|c| !c.is_empty()) {
                s.sop_classes
                    .insert(String::from_utf8_lossy(class).into_owned());
            }
            if let Some(m) = parts.next().filter(|m| !m.is_empty()) {
                s.modalities.insert(String::from_utf8_lossy(m).into_owned());
            }
            Step::Next
        })?;
        Ok(s)
    }

    fn value(&mut self, tag: u32) -> Result<Option<String>, FindError> {
        let join = |set: &BTreeSet<String>| set.iter().cloned().collect::<Vec<_>>().join("\\");
        Ok(Some(match tag {
            MODALITIES_IN_STUDY
            | SOP_CLASSES_IN_STUDY
            | STUDY_RELATED_SERIES
            | STUDY_RELATED_INSTANCES => {
                if !self.cache.studies.contains_key(&self.study) {
                    let stats = Self::study(self.ledger, &self.study)?;
                    self.cache.studies.insert(self.study.clone(), stats);
                }
                let Some(s) = self.cache.studies.get(&self.study) else {
                    return Ok(None);
                };
                match tag {
                    MODALITIES_IN_STUDY => join(&s.modalities),
                    SOP_CLASSES_IN_STUDY => join(&s.sop_classes),
                    STUDY_RELATED_SERIES => s.series.len().to_string(),
                    _ => s.instances.to_string(),
                }
            }
            SERIES_RELATED_INSTANCES => {
                let key = (self.study.clone(), self.series.clone());
                if !self.cache.series.contains_key(&key) {
                    let prefix = format!("study\0{}\0{}\0", self.study, self.series).into_bytes();
                    let mut n = 0;
                    self.ledger.scan(&prefix, b"", |_, _| {
                        n += 1;
                        Step::Next
                    })?;
                    self.cache.series.insert(key.clone(), n);
                }
                self.cache
                    .series
                    .get(&key)
                    .copied()
                    .unwrap_or(0)
                    .to_string()
            }
            PATIENT_RELATED_STUDIES | PATIENT_RELATED_SERIES | PATIENT_RELATED_INSTANCES => {
                if !self.cache.patients.contains_key(&self.patient_id) {
                    let mut prefix = find_key(PATIENT_ID, &self.patient_id);
                    prefix.push(0);
                    let (mut studies, mut series, mut n) = (HashSet::new(), HashSet::new(), 0);
                    self.ledger.scan(&prefix, b"", |suffix, _| {
                        let mut f = suffix.split(|b| *b == 0);
                        if let (Some(st), Some(se)) = (f.next(), f.next()) {
                            studies.insert(st.to_vec());
                            series.insert(se.to_vec());
                        }
                        n += 1;
                        Step::Next
                    })?;
                    self.cache
                        .patients
                        .insert(self.patient_id.clone(), (studies.len(), series.len(), n));
                }
                let (st, se, n) = self
                    .cache
                    .patients
                    .get(&self.patient_id)
                    .copied()
                    .unwrap_or_default();
                match tag {
                    PATIENT_RELATED_STUDIES => st.to_string(),
                    PATIENT_RELATED_SERIES => se.to_string(),
                    _ => n.to_string(),
                }
            }
            _ => return Ok(None),
        }))
    }
}
