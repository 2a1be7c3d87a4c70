//! C-FIND benchmark: bulk-loads synthetic instances through the real ingest pipeline (splitter,
//! index scanner, group-committed ledger with its C-FIND index; no network) and times queries
//! as the SCP runs them (`query::run`, identifiers encoded), at growing archive sizes.
//!
//! usage: cargo bench --bench find [-- INSTANCES]    (default 1 000 000)
//!
//! Archive shape: 100 instances per study (4 series of 25), 2 studies per patient, study dates
//! spread over ten years (about 1.4 studies per day at 1M instances). Queries, each repeated
//! on 200 different keys, median and 90th percentile:
//! - STUDY level by PatientID (the usual "what does this patient have" query), with the
//!   computed study keys (number of series/instances, modalities);
//! - STUDY level by StudyDate range (one week);
//! - STUDY level by PatientName prefix (`NAME123*`);
//! - IMAGE level by SeriesInstanceUID (25 matches).

use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use dicomchain::archive::ingest::{Pipeline, StoreContext};
use dicomchain::ledger::Ledger;
use dicomchain::query::{self, dataset, matching, FindOptions};
use dicomchain::split::Encoding;

const PER_STUDY: u64 = 100;
const PER_SERIES: u64 = 25;
const CT: &str = "1.2.840.10008.5.1.4.1.1.2";
const ROOT: &str = "1.2.826.0.1.3680043.10.1474.77";

fn el(out: &mut Vec<u8>, tag: u32, vr: &[u8; 2], value: &[u8]) {
    let mut v = value.to_vec();
    if v.len() % 2 == 1 {
        v.push(if vr == b"UI" { 0 } else { b' ' });
    }
    out.extend_from_slice(&((tag >> 16) as u16).to_le_bytes());
    out.extend_from_slice(&(tag as u16).to_le_bytes());
    out.extend_from_slice(vr);
    out.extend_from_slice(&(v.len() as u16).to_le_bytes());
    out.extend_from_slice(&v);
}

fn study_of(i: u64) -> u64 {
    i / PER_STUDY
}
fn patient_of(study: u64) -> u64 {
    study / 2
}
fn date_of(study: u64) -> String {
    // Ten years from 2015-01-01, as calendar dates (months of 28 days keep it simple and valid).
    let day = (study * 7919) % 3360;
    format!(
        "{}{:02}{:02}",
        2015 + day / 336,
        1 + (day % 336) / 28,
        1 + day % 28
    )
}

/// A CT header of about 1 KB, Explicit VR Little Endian, without pixel data.
fn instance(i: u64) -> (String, Vec<u8>) {
    let study = study_of(i);
    let patient = patient_of(study);
    let series = i / PER_SERIES;
    let sop = format!("{ROOT}.3.{i}");
    let mut d = Vec::with_capacity(1200);
    el(&mut d, 0x0008_0005, b"CS", b"ISO_IR 100");
    el(&mut d, 0x0008_0008, b"CS", b"ORIGINAL\\PRIMARY\\AXIAL");
    el(&mut d, 0x0008_0016, b"UI", CT.as_bytes());
    el(&mut d, 0x0008_0018, b"UI", sop.as_bytes());
    el(&mut d, 0x0008_0020, b"DA", date_of(study).as_bytes());
    el(&mut d, 0x0008_0030, b"TM", b"101500");
    el(&mut d, 0x0008_0050, b"SH", format!("ACC{study}").as_bytes());
    el(&mut d, 0x0008_0060, b"CS", b"CT");
    el(&mut d, 0x0008_0070, b"LO", b"ACME MEDICAL SYSTEMS");
    el(&mut d, 0x0008_0080, b"LO", b"GENERAL HOSPITAL OF SOMEWHERE");
    el(&mut d, 0x0008_0090, b"PN", b"REFERRING^DOCTOR");
    el(
        &mut d,
        0x0008_1030,
        b"LO",
        b"CT CHEST ABDOMEN PELVIS WITH CONTRAST",
    );
    el(&mut d, 0x0008_103E, b"LO", b"AXIAL 2.5MM SOFT TISSUE");
    el(
        &mut d,
        0x0010_0010,
        b"PN",
        format!("NAME{patient}^GIVEN").as_bytes(),
    );
    el(
        &mut d,
        0x0010_0020,
        b"LO",
        format!("PID{patient}").as_bytes(),
    );
    el(&mut d, 0x0010_0030, b"DA", b"19700101");
    el(&mut d, 0x0010_0040, b"CS", b"O");
    el(&mut d, 0x0018_0050, b"DS", b"2.5");
    el(&mut d, 0x0018_0060, b"DS", b"120");
    el(&mut d, 0x0018_1030, b"LO", b"CHEST ABDOMEN PELVIS");
    el(
        &mut d,
        0x0020_000D,
        b"UI",
        format!("{ROOT}.1.{study}").as_bytes(),
    );
    el(
        &mut d,
        0x0020_000E,
        b"UI",
        format!("{ROOT}.2.{series}").as_bytes(),
    );
    el(&mut d, 0x0020_0010, b"SH", format!("{study}").as_bytes());
    el(
        &mut d,
        0x0020_0011,
        b"IS",
        format!("{}", series % 4 + 1).as_bytes(),
    );
    el(
        &mut d,
        0x0020_0013,
        b"IS",
        format!("{}", i % PER_SERIES + 1).as_bytes(),
    );
    el(
        &mut d,
        0x0020_0032,
        b"DS",
        b"-250.000000\\-250.000000\\-100.500000",
    );
    el(
        &mut d,
        0x0020_0037,
        b"DS",
        b"1.000000\\0.000000\\0.000000\\0.000000\\1.000000\\0.000000",
    );
    el(
        &mut d,
        0x0020_0052,
        b"UI",
        format!("{ROOT}.4.{study}").as_bytes(),
    );
    el(&mut d, 0x0028_0002, b"US", &1u16.to_le_bytes());
    el(&mut d, 0x0028_0004, b"CS", b"MONOCHROME2");
    el(&mut d, 0x0028_0010, b"US", &512u16.to_le_bytes());
    el(&mut d, 0x0028_0011, b"US", &512u16.to_le_bytes());
    el(&mut d, 0x0028_0030, b"DS", b"0.703125\\0.703125");
    el(&mut d, 0x0028_0100, b"US", &16u16.to_le_bytes());
    el(&mut d, 0x0028_1050, b"DS", b"40");
    el(&mut d, 0x0028_1051, b"DS", b"400");
    (sop, d)
}

/// Ingests instances `from..to` through the pipeline with `writers` concurrent tasks.
fn load(rt: &tokio::runtime::Runtime, pipeline: &Pipeline, from: u64, to: u64, writers: u64) {
    rt.block_on(async {
        let mut tasks = Vec::new();
        for w in 0..writers {
            let p = pipeline.clone();
            tasks.push(tokio::spawn(async move {
                let mut i = from + w;
                while i < to {
                    let (sop, bytes) = instance(i);
                    let mut incoming = p.begin("1.2.840.10008.1.2.1");
                    incoming.feed(&bytes).await.unwrap();
                    let ctx = StoreContext {
                        called_ae: "DICOMCHAIN".into(),
                        calling_ae: "BENCH".into(),
                        sop_class_uid: CT.into(),
                        sop_instance_uid: sop,
                    };
                    incoming.finish(&ctx).await.unwrap();
                    i += writers;
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
    });
}

/// An identifier as findscu would send it (Explicit VR LE).
fn identifier(level: &str, keys: &[(u32, &[u8; 2], String)]) -> Vec<u8> {
    let mut d = Vec::new();
    let mut all: Vec<(u32, &[u8; 2], String)> = keys.to_vec();
    all.push((0x0008_0052, b"CS", level.into()));
    all.sort_by_key(|k| k.0);
    for (tag, vr, v) in all {
        el(&mut d, tag, vr, v.as_bytes());
    }
    d
}

fn time_query(ledger: &Ledger, bytes: &[u8], expect_at_least: usize) -> (Duration, usize) {
    let t = Instant::now();
    let elements = dataset::parse(bytes, Encoding::ExplicitLittle, false).unwrap();
    let q =
        matching::Query::parse(&elements, matching::Model::StudyRoot, Default::default()).unwrap();
    let opts = FindOptions {
        matching: Default::default(),
        max_results: 100_000,
        retrieve_ae: "DICOMCHAIN".into(),
    };
    let cancel = AtomicBool::new(false);
    let mut n = 0;
    query::run(ledger, &q, &opts, Encoding::ExplicitLittle, &cancel, |_| {
        n += 1;
        true
    })
    .unwrap();
    assert!(
        n >= expect_at_least,
        "query found {n}, expected at least {expect_at_least}"
    );
    (t.elapsed(), n)
}

fn report(what: &str, mut times: Vec<(Duration, usize)>) {
    times.sort();
    let matches: usize = times.iter().map(|t| t.1).sum::<usize>() / times.len();
    println!(
        "  {what:<44} p50 {:>9.3} ms  p90 {:>9.3} ms  ({matches} matches on average)",
        times[times.len() / 2].0.as_secs_f64() * 1e3,
        times[times.len() * 9 / 10].0.as_secs_f64() * 1e3,
    );
}

fn queries(ledger: &Ledger, n: u64) {
    let studies = n / PER_STUDY;
    let patients = studies.div_ceil(2);
    let pick = |k: u64, m: u64| (k * 104_729 + 17) % m.max(1);
    let study_keys = |extra: (u32, &'static [u8; 2], String)| {
        vec![
            extra,
            (0x0020_000D, b"UI", String::new()),
            (0x0008_0020, b"DA", String::new()),
            (0x0010_0010, b"PN", String::new()),
            (0x0020_1206, b"IS", String::new()),
            (0x0020_1208, b"IS", String::new()),
            (0x0008_0061, b"CS", String::new()),
        ]
    };
    let by_pid: Vec<_> = (0..200)
        .map(|k| {
            let id = identifier(
                "STUDY",
                &study_keys((0x0010_0020, b"LO", format!("PID{}", pick(k, patients)))),
            );
            time_query(ledger, &id, 1)
        })
        .collect();
    report("STUDY by PatientID", by_pid);
    let by_date: Vec<_> = (0..200)
        .map(|k| {
            let s = pick(k, studies);
            let from = date_of(s);
            // One week: the same month (28-day months above), days d..d+6.
            let day: u32 = from[6..].parse().unwrap();
            let to = format!("{}{:02}", &from[..6], (day + 6).min(28));
            let id = identifier(
                "STUDY",
                &study_keys((0x0008_0020, b"DA", format!("{from}-{to}"))),
            );
            time_query(ledger, &id, 1)
        })
        .collect();
    report("STUDY by StudyDate range (one week)", by_date);
    let by_name: Vec<_> = (0..200)
        .map(|k| {
            let id = identifier(
                "STUDY",
                &study_keys((0x0010_0010, b"PN", format!("NAME{}^*", pick(k, patients)))),
            );
            time_query(ledger, &id, 1)
        })
        .collect();
    report("STUDY by PatientName (NAMEn^*)", by_name);
    let by_series: Vec<_> = (0..200)
        .map(|k| {
            let series = pick(k, n / PER_SERIES);
            let id = identifier(
                "IMAGE",
                &[
                    (0x0020_000E, b"UI", format!("{ROOT}.2.{series}")),
                    (0x0008_0018, b"UI", String::new()),
                    (0x0020_0013, b"IS", String::new()),
                ],
            );
            time_query(ledger, &id, PER_SERIES as usize)
        })
        .collect();
    report("IMAGE by SeriesInstanceUID", by_series);
}

fn main() {
    let n: u64 = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(1_000_000);
    let writers: u64 = std::env::var("BENCH_WRITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256);
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let ledger = Ledger::open(&dir.path().join("ledger")).unwrap();
    let store_cfg = dicomchain::config::StoreConfig {
        fs: dicomchain::config::FsStoreConfig {
            root: dir.path().join("objects"),
        },
        ..Default::default()
    };
    let store = rt
        .block_on(dicomchain::store::Store::open(&store_cfg))
        .unwrap()
        .with_master_key(Some(std::sync::Arc::new(
            dicomchain::store::MasterKey::from_bytes([1; 32]),
        )));
    let pipeline = Pipeline::new(ledger.clone(), store, Duration::from_secs(60), 64 << 20);
    let mut loaded = 0;
    let mut size = 10_000.min(n);
    loop {
        let t = Instant::now();
        load(&rt, &pipeline, loaded, size, writers);
        let dt = t.elapsed().as_secs_f64();
        println!(
            "archive of {size} instances: loaded {} in {dt:.1} s ({:.0} instances/s through the ingest pipeline, {writers} writers)",
            size - loaded,
            (size - loaded) as f64 / dt
        );
        loaded = size;
        queries(&ledger, size);
        if size == n {
            break;
        }
        size = (size * 10).min(n);
    }
}
