//! Planning a query over the ledger's index: the candidate index ranges a query allows, the most
//! selective of them (each probed for at most [`PROBE`] entities), and the walk over it that skips
//! the rest of every study or series already seen.

use super::error::FindError;
use super::matching::*;
use crate::ledger::{find_key, Ledger, Step};

/// Most entities counted when estimating how selective an index range is.
pub const PROBE: usize = 64;

/// One candidate instance and where the index found it.
#[derive(Debug, Clone)]
pub(super) struct Candidate {
    pub(super) study: String,
    pub(super) series: String,
    pub(super) sop: String,
}

/// An index range the planner can walk.
#[derive(Debug, Clone)]
pub(super) enum Source {
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

/// Walks a source, calling `f` per candidate (skipping the rest of each study or series at
/// those levels) until `f` returns false.
pub(super) fn walk(
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
pub(super) fn parse_study_key(k: &[u8]) -> Option<Candidate> {
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
pub(super) fn sources(q: &Query) -> Vec<Source> {
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

pub(super) fn date_range(tag: u32, lo: &str, hi: &str) -> Source {
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
pub(super) fn plan(ledger: &Ledger, q: &Query) -> Result<Source, FindError> {
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
