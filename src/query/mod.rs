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
mod computed;
pub mod dataset;
mod error;
pub mod index;
pub mod matching;
mod plan;
mod respond;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};

use computed::StatsCache;
use dataset::Element;
use matching::*;
use plan::{plan, walk, Candidate};
use respond::evaluate;

use crate::dicom::Encoding;
use crate::ledger::Ledger;
pub use error::FindError;
pub use plan::PROBE;
pub use respond::FindOptions;

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
