//! Helpers shared by the ledger's tests, and the names they use.

pub(super) use std::path::Path;

pub(super) use super::checkpoint::{self, Checkpointing};
pub(super) use super::db::*;
pub(super) use super::entry::{Event, Reason};
pub(super) use super::error::LedgerError;
pub(super) use super::handle::Ledger;
pub(super) use super::request::{RecordSummary, StoreOutcome, StoreRequest};
pub(super) use super::tree::tree_key;
pub(super) use super::{erase, trail};
pub(super) use crate::instance::{IndexAttrs, ObjectKey};
pub(super) use sha2::{Digest as _, Sha256};

pub(super) fn request(sop: &str, study: &str, key: u8) -> StoreRequest {
    StoreRequest {
        calling_ae: "TEST".into(),
        instance_key: [key; 32],
        record: vec![key; 10],
        summary: RecordSummary {
            sop_class_uid: "1.2.840.10008.5.1.4.1.1.2".into(),
            transfer_syntax: "1.2.840.10008.1.2".into(),
            pixel_sha256: [0; 32],
            pixel_length: 0,
            dataset_sha256: [key; 32],
            dataset_length: 10,
        },
        object_name: None,
        object_key: None,
        attrs: IndexAttrs {
            sop_class_uid: "1.2.840.10008.5.1.4.1.1.2".into(),
            sop_instance_uid: sop.into(),
            study_instance_uid: study.into(),
            series_instance_uid: format!("{study}.1"),
            patient_id: "P".into(),
            ..Default::default()
        },
        forward_to: vec![],
    }
}

pub(super) fn checkpointing(seed: u8) -> Checkpointing {
    Checkpointing {
        signer: checkpoint::NoteSigner::from_seed("test.example/ledger", [seed; 32]).unwrap(),
        origin: "test.example/ledger".into(),
        interval: std::time::Duration::from_millis(1),
    }
}

/// A checkpointing ledger at `dir` with `n` stored instances (`PREFIX.i`), a few ms apart
/// so that checkpoints are signed between them; closed.
pub(super) async fn stored_and_closed(dir: &Path, prefix: &str, n: u8) {
    let ledger = Ledger::open_with(dir, Some(checkpointing(3)), None).unwrap();
    for i in 0..n {
        ledger
            .store(request(&format!("{prefix}.{i}"), "1", i + 10))
            .await
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    ledger.close();
}
