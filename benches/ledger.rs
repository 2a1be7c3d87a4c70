//! Ledger benchmark: batched append rate, `verify --ledger-only` time, and proof latency, at a
//! given size (default 1 000 000 entries).
//!
//! usage: cargo bench --bench ledger [-- ENTRIES]
//!
//! Appends go through the real committer (group commits with a synced WAL) from `BENCH_WRITERS`
//! (default 512) concurrent writers, each entry with a 1 KiB metadata record and a sealed object's
//! key record, like a busy node's ingest minus the network: each writer first takes the object's
//! pending-object note (`Ledger::intend_object`, a committer round trip of its own), then stores
//! the instance and marks the object durable (a later group deletes the note). `BENCH_NOTES=0`
//! leaves the notes out (appends alone). The CPU time of each thread during the appends is
//! printed too.

use std::time::Instant;

use dicomchain::instance::{instance_key, IndexAttrs, Layout, MetadataRecord};
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
        object_name: Some(hex::encode(key)),
        // Every new object is sealed: its key record goes in the entry's batch.
        object_key: Some(dicomchain::instance::ObjectKey { salt: key }),
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
    let notes = std::env::var("BENCH_NOTES").map_or(true, |v| v != "0");
    let mut queues: Vec<Vec<StoreRequest>> = (0..writers).map(|_| Vec::new()).collect();
    for i in 0..n {
        queues[(i % writers) as usize].push(request(i));
    }
    let cpu_before = threads_cpu();
    let t = Instant::now();
    rt.block_on(async {
        let mut tasks = Vec::new();
        for queue in queues {
            let l = ledger.clone();
            tasks.push(tokio::spawn(async move {
                for r in queue {
                    // As ingest does before it places the object, and once the object and
                    // the entry are both durable.
                    let note = match notes {
                        true => {
                            let name = r.object_name.clone().unwrap();
                            Some(l.intend_object(&name, &r.instance_key).await.unwrap())
                        }
                        false => None,
                    };
                    l.store(r).await.unwrap();
                    if let Some(n) = note {
                        l.object_durable(n);
                    }
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
    });
    let append = t.elapsed();
    let cpu = threads_cpu()
        .into_iter()
        .map(|(name, ticks)| {
            let before = cpu_before.get(&name).copied().unwrap_or(0);
            (ticks.saturating_sub(before), name)
        })
        .filter(|(ticks, _)| *ticks > 0);
    let mut cpu: Vec<(u64, String)> = cpu.collect();
    cpu.sort_by(|a, b| b.cmp(a));
    assert_eq!(ledger.len().unwrap(), n);
    println!(
        "append: {n} entries in {:.2} s = {:.0} entries/s ({writers} writers, group commits, synced WAL{})",
        append.as_secs_f64(),
        n as f64 / append.as_secs_f64(),
        if notes { ", pending-object notes" } else { "" }
    );

    let total: u64 = cpu.iter().map(|c| c.0).sum();
    println!(
        "CPU during append: {:.1} s ({:.2} cores): {}",
        total as f64 / 100.0,
        total as f64 / 100.0 / append.as_secs_f64(),
        cpu.iter()
            .map(|(t, n)| format!("{n} {:.1}", *t as f64 / 100.0))
            .collect::<Vec<_>>()
            .join(", ")
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
    let opts = dicomchain::cli::verify::Options {
        ledger_only: true,
        verifier_key: Some(
            dicomchain::ledger::checkpoint::NoteSigner::from_seed("bench", [1; 32])
                .unwrap()
                .verifier_key(),
        ),
        checkpoint_files: Vec::new(),
    };
    let t = Instant::now();
    let report = rt
        .block_on(dicomchain::cli::verify::run(&cfg, &opts))
        .unwrap();
    let verify = t.elapsed();
    assert_eq!(report.entries, n);
    println!(
        "verify --ledger-only: {n} entries in {:.2} s ({} problems)",
        verify.as_secs_f64(),
        report.problems.len()
    );
}

/// CPU time (user + system, in clock ticks of 10 ms) used so far by this process's threads,
/// summed by thread name (Linux; empty elsewhere).
fn threads_cpu() -> std::collections::HashMap<String, u64> {
    let mut out = std::collections::HashMap::new();
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return out;
    };
    for task in tasks.flatten() {
        let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else {
            continue;
        };
        // pid (comm) state ... utime stime: fields 14 and 15, counted after the comm's ')'.
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let name = stat[open + 1..close].to_string();
        let fields: Vec<&str> = stat[close + 2..].split(' ').collect();
        let ticks: u64 = fields
            .get(11..13)
            .map(|f| f.iter().filter_map(|v| v.parse::<u64>().ok()).sum())
            .unwrap_or(0);
        *out.entry(name).or_insert(0) += ticks;
    }
    out
}
