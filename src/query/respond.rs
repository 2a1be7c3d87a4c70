//! One candidate checked and answered: its stored metadata read, every key matched (the hierarchy
//! UIDs as the index holds them, computed attributes from the index), and the response
//! identifier built with the requested keys at this level.

use std::borrow::Cow;
use std::collections::HashSet;

use super::charset::Charset;
use super::computed::{is_computed, Computed, StatsCache};
use super::dataset::{self, Element, Value};
use super::error::FindError;
use super::matching::*;
use super::plan::Candidate;
use crate::archive::retrieve::{self, RetrieveError};
use crate::dicom::Encoding;
use crate::instance::Layout;
use crate::ledger::Ledger;

/// Settings of one C-FIND.
#[derive(Debug, Clone)]
pub struct FindOptions {
    pub matching: MatchOptions,
    /// Most matches answered; more end the query with a failure.
    pub max_results: usize,
    /// Retrieve AE Title (0008,0054) put in every response: our own AE title.
    pub retrieve_ae: String,
}

/// A stored instance, parsed.
pub(super) struct Loaded {
    pub(super) bytes: Vec<u8>,
    pub(super) enc: Encoding,
}

pub(super) fn load(ledger: &Ledger, sop: &str) -> Result<Option<Loaded>, FindError> {
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
pub(super) fn evaluate(
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
    response(q, opts, c, &elements, &charset, &mut computed).map(Some)
}

/// The response identifier of a match: every requested key (empty above this level, computed or
/// as stored, the hierarchy UIDs as the index holds them), then the level's unique key, the
/// level, Retrieve AE Title, Instance Availability when asked, and the character set.
fn response(
    q: &Query,
    opts: &FindOptions,
    c: &Candidate,
    elements: &[Element<'_>],
    charset: &Charset,
    computed: &mut Computed<'_, '_>,
) -> Result<Vec<Element<'static>>, FindError> {
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
                crate::dicom::padded(&key_vr(key), v.as_bytes()),
            );
            continue;
        }
        match (dataset::find(elements, key.tag), indexed_uid(c, key.tag)) {
            (Some(e), _) => out.push(project(e, key, charset, opts)),
            (None, Some(uid)) => put(
                &mut out,
                key.tag,
                *b"UI",
                crate::dicom::padded(b"UI", uid.as_bytes()),
            ),
            (None, None) => out.push(empty(key)),
        }
    }
    // The unique key of the level identifies the match even when the SCU forgot to ask for it.
    let unique = unique_key(q.level);
    if q.key(unique).is_none() {
        if let Some(e) = dataset::find(elements, unique) {
            out.push(e.clone().into_owned());
        } else if let Some(uid) = indexed_uid(c, unique) {
            put(
                &mut out,
                unique,
                *b"UI",
                crate::dicom::padded(b"UI", uid.as_bytes()),
            );
        }
    }
    put(
        &mut out,
        QUERY_RETRIEVE_LEVEL,
        *b"CS",
        crate::dicom::padded(b"CS", q.level.name().as_bytes()),
    );
    put(
        &mut out,
        RETRIEVE_AE_TITLE,
        *b"AE",
        crate::dicom::padded(b"AE", opts.retrieve_ae.as_bytes()),
    );
    if q.key(INSTANCE_AVAILABILITY).is_some() {
        put(&mut out, INSTANCE_AVAILABILITY, *b"CS", b"ONLINE".to_vec());
    }
    if let Some(cs) = dataset::find(elements, SPECIFIC_CHARACTER_SET).filter(|e| !e.is_empty()) {
        put(
            &mut out,
            SPECIFIC_CHARACTER_SET,
            *b"CS",
            cs.bytes().to_vec(),
        );
    }
    out.sort_by_key(|e| e.tag);
    out.dedup_by_key(|e| e.tag);
    Ok(out)
}

/// The candidate's Study, Series or SOP Instance UID as indexed.
pub(super) fn indexed_uid(c: &Candidate, tag: u32) -> Option<&str> {
    match tag {
        STUDY_INSTANCE_UID => Some(&c.study),
        SERIES_INSTANCE_UID => Some(&c.series),
        SOP_INSTANCE_UID => Some(&c.sop),
        _ => None,
    }
}

pub(super) fn key_vr(key: &Key) -> [u8; 2] {
    if &key.vr == b"UN" {
        dataset::dictionary_vr(key.tag)
    } else {
        key.vr
    }
}

pub(super) fn empty(key: &Key) -> Element<'static> {
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
pub(super) fn project(
    e: &Element<'_>,
    key: &Key,
    charset: &Charset,
    opts: &FindOptions,
) -> Element<'static> {
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
