//! Step 3 of `verify`: every metadata record hashed and decoded, on every core, and checked
//! against the instance key it is filed under; [`record_for`] finds the record an entry
//! commits to.

use std::borrow::Cow;
use std::collections::HashMap;

use super::is_damage;
use crate::instance::{self, Digest32, MetadataRecord};
use crate::ledger::{Ledger, LedgerError, RecordKey};

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

/// Hashes and decodes a record; one filed under an instance key must hash to it (one filed
/// under a sequence number is held to its entry by [`record_for`]).
pub(super) fn check_raw(filed: &RecordKey, raw: &[u8]) -> RecordCheck {
    let decoded = MetadataRecord::decode(raw);
    let subject = decoded.as_ref().ok().map(|r| r.sop_instance_uid.clone());
    let key = instance::instance_key(raw);
    if matches!(filed, RecordKey::Instance(k) if *k != key) {
        return RecordCheck::Bad {
            subject,
            what: MISMATCH.into(),
        };
    }
    match decoded {
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

/// The check of the record entry `seq` commits to: the one under its sequence number, which
/// must hash to the entry's instance key, or else the one filed under that key.
/// Borrowed, except for the rare mismatch it finds (this runs for every entry).
pub(super) fn record_for<'r>(
    records: &'r HashMap<RecordKey, RecordCheck>,
    seq: u64,
    instance_key: &Digest32,
) -> Option<Cow<'r, RecordCheck>> {
    match records.get(&RecordKey::Seq(seq)) {
        Some(RecordCheck::Good { key, sop, .. }) if key != instance_key => {
            Some(Cow::Owned(RecordCheck::Bad {
                subject: Some(sop.clone()),
                what: MISMATCH.into(),
            }))
        }
        Some(check) => Some(Cow::Borrowed(check)),
        None => records
            .get(&RecordKey::Instance(*instance_key))
            .map(Cow::Borrowed),
    }
}

/// Every record hashed (and checked against the key it is filed under), in parallel batches;
/// with the damage that stopped the scan early, if any (the records read before it are kept).
#[allow(clippy::type_complexity)]
pub(super) fn check_records(
    ledger: &Ledger,
) -> Result<(HashMap<RecordKey, RecordCheck>, Option<LedgerError>), LedgerError> {
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2);
    let mut out = HashMap::new();
    let scanned = ledger.for_each_record_batch(16_384, |batch| {
        let per = batch.len().div_ceil(threads).max(1);
        let results: Vec<Vec<(RecordKey, RecordCheck)>> = std::thread::scope(|s| {
            let handles: Vec<_> = batch
                .chunks(per)
                .map(|chunk| {
                    s.spawn(move || {
                        chunk
                            .iter()
                            .map(|(k, v)| (*k, check_raw(k, v)))
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
