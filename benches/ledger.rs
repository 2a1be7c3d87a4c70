//! Ledger benchmark: batched append rate, `verify --ledger-only` time, and proof latency, at a
//! given size (default 1 000 000 entries).
//!
//! usage: cargo bench --bench ledger [-- ENTRIES]
//!
//! Appends go through the real committer (group commits with a synced WAL) from `BENCH_WRITERS`
//! (default 512) concurrent writers, each entry with a 1 KiB metadata record and a sealed object's
//! key record, its pending-object note deleted in the entry's batch, like a busy node's ingest
//! minus the network. With `BENCH_NOTES=1` each writer also writes that note first, as ingest
//! does on a blocking thread before it commits the object (one small write per instance outside
//! the committer).

use std::time::Instant;

use dicomchain::instance::{instance_key, object_name, IndexAttrs, Layout, MetadataRecord};
use dicomchain::ledger::{merkle, Ledger, RecordSummary, StoreRequest};
use sha2::{Digest, Sha256};

/// A stored-instance request with a real 1 KiB metadata record, so `verify` does real work.
fn request(i: u64) -> StoreRequest {
    let uid = format!("1.2.826.0.1.3680043.10.1474.{}.{}", i / 1000, i % 1000);
    let digest: [u8; 32] = Sha256::digest(i.to_be_bytes()).into();
    let record = MetadataRecord {
        layout: Layout::Split,
        transfer_syntax: "1.2.840.10008.1.2.1".into(),
        sop_class_uid: "1.2.840.10008.5.1.4.1.1.2".into(),
        sop_instance_uid: uid.clone(),
        splices: vec![],
        pixel_length: 524_288,
        pixel_sha256: digest,
        dataset_length: 526_000,
        dataset_sha256: digest,
        meta: vec![(i % 251) as u8; 1024],
    };
    let encoded = record.encode();
    let key = instance_key(&encoded);
    StoreRequest {
        calling_ae: "BENCH".into(),
        instance_key: key,
        summary: RecordSummary::of(&record),
        record: encoded,
        object_name: Some(object_name(&key)),
        // Every new object is sealed: its key record goes in the entry's batch.
        object_key: Some(dicomchain::store::ObjectKey { salt: key }),
        attrs: IndexAttrs {
            sop_class_uid: record.sop_class_uid.clone(),
            sop_instance_uid: uid,
            study_instance_uid: format!("1.2.3.{}", i / 10_000),
            series_instance_uid: format!("1.2.3.{}.{}", i / 10_000, i / 1000),
            patient_id: format!("P{}", i / 10_000),
            ..Default::default()
        },
        forward_to: vec![],
    }
}

fn main() {
    let n: u64 = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(1_000_000);
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let ledger = Ledger::open(dir.path()).unwrap();

    // Requests are prepared before the clock starts: this measures the ledger (committer, group
    // commits, RocksDB), not the hashing an association does while it receives an instance.
    // Group commits fold every request waiting at the committer into one synced write, so the
    // batch size is the number of writers in flight (`BENCH_WRITERS`, default 512).
    let writers: u64 = std::env::var("BENCH_WRITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(512);
    let notes = std::env::var("BENCH_NOTES").is_ok_and(|v| v == "1");
    let mut queues: Vec<Vec<StoreRequest>> = (0..writers).map(|_| Vec::new()).collect();
    for i in 0..n {
        queues[(i % writers) as usize].push(request(i));
    }
    let t = Instant::now();
    rt.block_on(async {
        let mut tasks = Vec::new();
        for queue in queues {
            let l = ledger.clone();
            tasks.push(tokio::spawn(async move {
                for r in queue {
                    if notes {
                        // As ingest does before it commits the object (on a blocking thread).
                        let noted = (l.clone(), r.object_name.clone().unwrap(), r.instance_key);
                        tokio::task::spawn_blocking(move || {
                            noted.0.intend_object(&noted.1, &noted.2)
                        })
                        .await
                        .unwrap()
                        .unwrap();
                    }
                    l.store(r).await.unwrap();
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
    });
    let append = t.elapsed();
    assert_eq!(ledger.len().unwrap(), n);
    println!(
        "append: {n} entries in {:.2} s = {:.0} entries/s ({writers} writers, group commits, synced WAL{})",
        append.as_secs_f64(),
        n as f64 / append.as_secs_f64(),
        if notes { ", pending-object notes" } else { "" }
    );

    // Proofs at full size: the median of 1000 inclusion proofs, generated and verified.
    let root = ledger.tree_root(n).unwrap();
    let mut times = Vec::with_capacity(1000);
    for k in 0..1000u64 {
        let seq = 1 + (k * 7919 * 104_729) % n;
        let t = Instant::now();
        let proof = ledger.inclusion_proof(seq, n).unwrap();
        times.push(t.elapsed());
        let leaf = merkle::leaf_hash(&ledger.entry(seq).unwrap().unwrap().encode());
        assert!(merkle::verify_inclusion(&leaf, seq - 1, n, &proof, &root));
    }
    times.sort();
    println!(
        "inclusion proof at {n} entries: median {:?}, p99 {:?}",
        times[500], times[990]
    );
    ledger.close();
    drop(ledger);

    // verify --ledger-only over the whole ledger, through the real command.
    let cfg_path = dir.path().join("bench.toml");
    std::fs::write(
        &cfg_path,
        format!("[ledger]\npath = \"{}\"\n", dir.path().display()),
    )
    .unwrap();
    let cfg = dicomchain::config::Config::load(&cfg_path).unwrap();
    let opts = dicomchain::verify::Options {
        ledger_only: true,
        verifier_key: Some(
            dicomchain::ledger::checkpoint::NoteSigner::from_seed("bench", [1; 32])
                .unwrap()
                .verifier_key(),
        ),
    };
    let t = Instant::now();
    let report = rt.block_on(dicomchain::verify::run(&cfg, &opts)).unwrap();
    let verify = t.elapsed();
    assert_eq!(report.entries, n);
    println!(
        "verify --ledger-only: {n} entries in {:.2} s ({} problems)",
        verify.as_secs_f64(),
        report.problems.len()
    );
}
