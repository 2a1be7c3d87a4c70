//! Step 3 of `verify`: every metadata record hashed and decoded, on every core; [`record_for`]
//! finds the record an entry commits to and holds it to the entry's instance key.

use std::borrow::Cow;
use std::collections::HashMap;

use super::is_damage;
use crate::instance::{self, Digest32, MetadataRecord};
use crate::ledger::{Ledger, LedgerError};

/// What the audit found for one metadata record.
#[derive(Clone)]
pub(super) enum RecordCheck {
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
pub(super) fn check_raw(raw: &[u8]) -> RecordCheck {
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
pub(super) fn held_to<'r>(
    check: Cow<'r, RecordCheck>,
    instance_key: &Digest32,
) -> Cow<'r, RecordCheck> {
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
pub(super) fn record_for<'r>(
    records: &'r HashMap<u64, RecordCheck>,
    seq: u64,
    instance_key: &Digest32,
) -> Option<Cow<'r, RecordCheck>> {
    records
        .get(&seq)
        .map(|check| held_to(Cow::Borrowed(check), instance_key))
}

/// Every record hashed and decoded, by the sequence number it is filed under, in parallel batches;
/// with the damage that stopped the scan early, if any (the records read before it are kept).
#[allow(clippy::type_complexity)]
pub(super) fn check_records(
    ledger: &Ledger,
) -> Result<(HashMap<u64, RecordCheck>, Option<LedgerError>), LedgerError> {
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2);
    let mut out = HashMap::new();
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
