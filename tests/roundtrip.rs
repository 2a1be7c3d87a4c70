//! Store, restart, export: the exact bytes come back. Real clients, the real binary.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::cli::dicom_study_uid;
use crate::support::{self, assert_ok, Node, Part10};

/// Exports one instance and returns its data set bytes and transfer syntax.
fn export_instance(node: &Node, uid: &str) -> Part10 {
    let out = tempfile::tempdir().unwrap();
    let o = node.export(&["--instance", uid], out.path());
    assert_ok(&o, &format!("export --instance {uid}"));
    let files = support::files_under(out.path());
    assert_eq!(files.len(), 1, "{files:?}");
    support::read_part10(&files[0]).expect("export writes a Part 10 file")
}

/// Exports one study, which must succeed: what was written, by SOP Instance UID.
fn export_study(node: &Node, study_uid: &str) -> HashMap<String, Part10> {
    let out = tempfile::tempdir().unwrap();
    assert_ok(
        &node.export(&["--study", study_uid], out.path()),
        &format!("export --study {study_uid}"),
    );
    support::files_under(out.path())
        .iter()
        .map(|p| support::read_part10(p).unwrap())
        .map(|p| (p.sop_instance_uid.clone(), p))
        .collect()
}

/// pydicom's corpus, which must be there.
fn corpus() -> Vec<Part10> {
    let corpus = support::pydicom_corpus();
    assert!(
        corpus.len() >= 50,
        "pydicom's corpus is missing or small ({} files); CI installs pydicom",
        corpus.len()
    );
    corpus
}

/// Files of pydicom's corpus that are broken on purpose (pydicom's own tests use them to check
/// its error handling); a correct SCP refuses them with a C000-range status.
const DELIBERATELY_BROKEN: &[(&str, &str)] = &[
    ("MR_truncated.dcm", "pixel data cut short"),
    (
        "rtplan_truncated.dcm",
        "data set cut short inside an element",
    ),
    (
        "SC_rgb_jpeg.dcm",
        "declares JPEG Baseline (explicit VR) but its data set is implicit VR",
    ),
];

/// The SOP Instance UID the node indexes: the data set's (the File Meta's may differ), read by
/// pydicom.
fn dataset_uid(file: &Part10) -> String {
    let out = std::process::Command::new("python3")
        .args(["-c", "import sys, pydicom; print(getattr(pydicom.dcmread(sys.argv[1], stop_before_pixels=True, force=True), 'SOPInstanceUID', ''))"])
        .arg(&file.path)
        .output()
        .unwrap();
    let uid = String::from_utf8_lossy(&out.stdout).trim().to_string();
    // A data set without its own UID is stored under the command's, i.e. the File Meta's.
    if uid.is_empty() {
        file.sop_instance_uid.clone()
    } else {
        uid
    }
}

/// Every storage instance of pydicom's corpus, sent exactly as stored, one file after the other
/// (variants of one SOP Instance become versions), exported right after it was stored, and again
/// after a restart for the latest versions.
#[test]
fn pydicom_corpus_round_trips_byte_for_byte() {
    let corpus = corpus();
    let mut node = Node::start();
    let mut latest: HashMap<String, Part10> = HashMap::new();
    let mut failures = Vec::new();
    for file in &corpus {
        let res = node.send_exact(std::slice::from_ref(&file.path));
        let name = support::file_name(&file.path);
        let status = res.first().and_then(|r| r.0);
        if let Some((_, why)) = DELIBERATELY_BROKEN.iter().find(|(n, _)| *n == name) {
            // Bad input gets a clear error, not a stored instance.
            assert!(
                matches!(status, Some(0xC000..=0xCFFF)),
                "{name} ({why}) got {status:?}"
            );
            continue;
        }
        if status != Some(0) {
            failures.push(format!("{}: {:?}", file.path.display(), status));
            continue;
        }
        let got = export_instance(&node, &dataset_uid(file));
        assert_eq!(
            got.transfer_syntax,
            file.transfer_syntax,
            "{}",
            file.path.display()
        );
        assert!(
            got.dataset == file.dataset,
            "{}: exported data set differs from what was sent",
            file.path.display()
        );
        latest.insert(dataset_uid(file), file.clone());
    }
    assert!(
        failures.is_empty(),
        "instances not accepted:\n{}",
        failures.join("\n")
    );
    node.restart();
    for (uid, file) in &latest {
        let got = export_instance(&node, uid);
        assert!(
            got.dataset == file.dataset,
            "{} after restart",
            file.path.display()
        );
    }
    eprintln!(
        "pydicom corpus: {} files, {} distinct instances, all byte-identical",
        corpus.len(),
        latest.len()
    );
}

/// DCMTK's storescu sends each corpus file it can read, to the node and to DCMTK's own storescp
/// in bit-preserving mode (`+B`: it writes the data set exactly as received). What storescp
/// recorded is what DCMTK put on the wire; the node's export must equal it byte for byte.
#[test]
fn pydicom_corpus_through_dcmtk_storescu() {
    let corpus = corpus();
    let node = Node::start();
    let reference = support::Storescp::start();
    let (mut identical, mut not_sent) = (0, Vec::new());
    for file in &corpus {
        let name = support::file_name(&file.path);
        let propose = dcmtk_propose(&file.transfer_syntax);
        let wire = reference.receive(&file.path, propose);
        let out = node.storescu(propose, std::slice::from_ref(&file.path));
        let Some(wire) = wire else {
            // storescu could not read or encode the file: it reached neither receiver.
            assert!(
                !out.status.success() || DELIBERATELY_BROKEN.iter().any(|(n, _)| *n == name),
                "{name}: storescp got nothing but the node did"
            );
            not_sent.push(name);
            continue;
        };
        assert_ok(&out, &format!("storescu {name}"));
        let got = export_instance(&node, &dataset_uid(file));
        assert_eq!(
            got.transfer_syntax, wire.transfer_syntax,
            "{name}: transfer syntax"
        );
        assert!(
            got.dataset == wire.dataset,
            "{name}: the node's export differs from what DCMTK sent"
        );
        identical += 1;
    }
    eprintln!("storescu: {identical} instances byte-identical to what DCMTK sent; not sent by DCMTK: {not_sent:?}");
    assert!(
        identical >= 150,
        "only {identical} files went through DCMTK"
    );
}

/// The storescu option that makes it propose a file's own compressed transfer syntax (it
/// proposes only uncompressed ones otherwise, and cannot decompress to send those).
fn dcmtk_propose(ts: &str) -> &'static [&'static str] {
    match ts {
        "1.2.840.10008.1.2.5" => &["-xr"],
        "1.2.840.10008.1.2.4.50" => &["-xy"],
        "1.2.840.10008.1.2.4.51" => &["-xx"],
        "1.2.840.10008.1.2.4.70" => &["-xs"],
        "1.2.840.10008.1.2.4.80" => &["-xt"],
        "1.2.840.10008.1.2.4.81" => &["-xu"],
        "1.2.840.10008.1.2.4.90" => &["-xv"],
        "1.2.840.10008.1.2.4.91" => &["-xw"],
        "1.2.840.10008.1.2.1.99" => &["-xd"],
        _ => &[],
    }
}

fn assert_series_round_trip(node: &Node, files: &[PathBuf], study_uid: &str) {
    let exported = export_study(node, study_uid);
    assert_eq!(exported.len(), files.len());
    for f in files {
        let sent = support::read_part10(f).unwrap();
        let got = &exported[&sent.sop_instance_uid];
        assert_eq!(got.transfer_syntax, sent.transfer_syntax);
        assert!(got.dataset == sent.dataset, "{} differs", f.display());
    }
}

/// Runs the CT + MR series round trip against a node: 1000 CT 512×512 over one association,
/// an MR series in implicit VR, restart, export each study.
pub fn ct_and_mr_series_round_trip(node: &mut Node) {
    let src = tempfile::tempdir().unwrap();
    let ct = support::make_series(&src.path().join("ct"), "CT", 1000, 512, &[]);
    let mr = support::make_series(
        &src.path().join("mr"),
        "MR",
        50,
        256,
        &["--syntax", "implicit"],
    );
    assert_ok(
        &node.storescu(&["+sd", "+r"], &[src.path().join("ct")]),
        "storescu CT",
    );
    // -xi: implicit VR only, so storescu sends the MR files in their own syntax.
    assert_ok(&node.storescu(&["-xi"], &mr), "storescu MR");
    node.restart();
    assert_series_round_trip(node, &ct, &dicom_study_uid(&ct[0]));
    assert_series_round_trip(node, &mr, &dicom_study_uid(&mr[0]));
}

#[test]
fn ct_and_mr_series_round_trip_on_the_fs_backend() {
    let mut node = Node::start();
    ct_and_mr_series_round_trip(&mut node);
    let log = node.log();
    assert!(
        !log.contains("DOE^JOHN") && !log.contains("PID0001"),
        "patient data in the log"
    );
}

#[test]
fn resends_and_new_versions() {
    let node = Node::start();
    let (src, files) = support::ct_series(1, 32);
    let original = support::read_part10(&files[0]).unwrap();
    assert_eq!(node.send_exact(&files)[0].0, Some(0));
    assert_eq!(
        node.send_exact(&files)[0].0,
        Some(0),
        "identical re-send is a success"
    );
    let objects = |n: &Node| {
        support::files_under(&n.dir.join("objects"))
            .into_iter()
            .filter(|p| !p.starts_with(n.dir.join("objects/tmp")))
            .count()
    };
    assert_eq!(
        objects(&node),
        1,
        "an identical re-send stores no second object"
    );
    // Same SOP Instance UID, different pixels: a new version, and export returns it.
    let mut changed = std::fs::read(&files[0]).unwrap();
    let n = changed.len();
    changed[n - 1] ^= 0x55;
    let changed_path = src.path().join("changed.dcm");
    std::fs::write(&changed_path, &changed).unwrap();
    assert_eq!(
        node.send_exact(std::slice::from_ref(&changed_path))[0].0,
        Some(0)
    );
    assert_eq!(
        objects(&node),
        2,
        "the first version's pixels stay (history)"
    );
    let got = export_instance(&node, &original.sop_instance_uid);
    assert_eq!(
        got.dataset,
        support::read_part10(&changed_path).unwrap().dataset
    );
}

#[test]
fn no_patient_identifiers_reach_the_object_store() {
    let node = Node::start();
    let src = tempfile::tempdir().unwrap();
    let files = support::make_series(
        src.path(),
        "MR",
        5,
        64,
        &[
            "--patient-name",
            "SECRETARY^WILHELMINA",
            "--patient-id",
            "PID-7734-XQ",
        ],
    );
    assert_ok(&node.storescu(&[], &files), "storescu");
    let sent = support::read_part10(&files[0]).unwrap();
    let study_uid = dicom_study_uid(&files[0]);
    // The objects are sealed: not even the pixel data is there in the clear.
    let pixels = &sent.dataset[sent.dataset.len() - 64..];
    assert_no_identifiers(
        &node.dir.join("objects"),
        &[
            b"SECRETARY",
            b"WILHELMINA",
            b"PID-7734-XQ",
            study_uid.as_bytes(),
            sent.sop_instance_uid.as_bytes(),
            pixels,
        ],
    );
    // Under a master key the node created for itself, readable by its owner only.
    use std::os::unix::fs::PermissionsExt;
    let key = std::fs::metadata(node.dir.join("var/master.key")).unwrap();
    assert_eq!(key.permissions().mode() & 0o777, 0o600);
    // And every instance still comes back byte for byte.
    assert_eq!(
        export_instance(&node, &sent.sop_instance_uid).dataset,
        sent.dataset
    );
}

/// No object name or body under `root` contains any of `needles`.
pub fn assert_no_identifiers(root: &Path, needles: &[&[u8]]) {
    let objects = support::files_under(root);
    assert!(!objects.is_empty());
    for p in &objects {
        let name = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
        let body = std::fs::read(p).unwrap();
        for n in needles {
            assert!(
                !name.as_bytes().windows(n.len()).any(|w| w == *n),
                "identifier in object name {name}"
            );
            assert!(
                !body.windows(n.len()).any(|w| w == *n),
                "identifier {:?} in object {name}",
                String::from_utf8_lossy(n)
            );
        }
    }
}

/// Four associations at once (the ledger's group commit path): every instance is acknowledged
/// and comes back.
#[test]
fn parallel_associations_all_land() {
    let node = Node::start();
    let src = tempfile::tempdir().unwrap();
    let mut batches = Vec::new();
    for i in 0..4 {
        let dir = src.path().join(format!("b{i}"));
        batches.push((dir.clone(), support::make_series(&dir, "CT", 60, 64, &[])));
    }
    std::thread::scope(|s| {
        let handles: Vec<_> = batches
            .iter()
            .map(|(dir, _)| s.spawn(|| node.storescu(&["+sd"], std::slice::from_ref(dir))))
            .collect();
        for h in handles {
            assert_ok(&h.join().unwrap(), "parallel storescu");
        }
    });
    for (_, files) in &batches {
        assert_series_round_trip(&node, files, &dicom_study_uid(&files[0]));
    }
}

/// SIGTERM in the middle of a transfer: the node drains and exits cleanly, and every instance
/// that was acknowledged is there after a restart.
#[test]
fn graceful_shutdown_keeps_everything_acknowledged() {
    let mut node = Node::start();
    let (_src, files) = support::ct_series(800, 256);
    let sent = std::thread::scope(|s| {
        let sender = s.spawn(|| node.send_exact(&files));
        // Stop once the transfer is under way, however fast or slow this machine is.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while node.log().matches("instance stored").count() < 20 {
            assert!(
                std::time::Instant::now() < deadline,
                "the transfer never started"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        node.signal("TERM");
        sender.join().unwrap()
    });
    let acknowledged: Vec<_> = sent
        .iter()
        .filter(|(s, _)| *s == Some(0))
        .map(|(_, p)| p.clone())
        .collect();
    assert!(
        !acknowledged.is_empty() && acknowledged.len() < files.len(),
        "the stop should land mid-transfer ({} acknowledged)",
        acknowledged.len()
    );
    node.wait_exit_ok();
    assert!(node.log().contains("shutting down"), "{}", node.log());
    node.restart();
    let exported = export_study(&node, &dicom_study_uid(&files[0]));
    for f in &acknowledged {
        let sent = support::read_part10(f).unwrap();
        let got = exported.get(&sent.sop_instance_uid);
        assert!(
            got.is_some_and(|g| g.dataset == sent.dataset),
            "{} was acknowledged but did not survive",
            f.display()
        );
    }
}

/// SIGKILL at several moments during ingest over two associations: after a restart, every
/// instance that got a success response exports byte for byte; the others are absent or whole.
#[test]
fn a_crash_never_loses_an_acknowledged_instance() {
    let mut node = Node::start();
    let src = tempfile::tempdir().unwrap();
    let a = support::make_series(&src.path().join("a"), "CT", 300, 256, &["--studies", "1"]);
    let b = support::make_series(&src.path().join("b"), "MR", 300, 256, &["--studies", "1"]);
    let mut acknowledged: Vec<PathBuf> = Vec::new();
    // Kill after 5, 60 and 150 more instances were stored: early, mid-way and late in a
    // transfer, whatever this machine's speed.
    for (round, after) in [5usize, 60, 150].into_iter().enumerate() {
        let before = node.log().matches("instance stored").count();
        let sent = std::thread::scope(|s| {
            let ta = s.spawn(|| node.send_exact_with_timeout(&a, 10));
            let tb = s.spawn(|| node.send_exact_with_timeout(&b, 10));
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
            while node.log().matches("instance stored").count() < before + after
                && std::time::Instant::now() < deadline
            {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            node.signal("KILL");
            let mut v = ta.join().unwrap();
            v.extend(tb.join().unwrap());
            v
        });
        let acked: Vec<_> = sent
            .into_iter()
            .filter(|(s, _)| *s == Some(0))
            .map(|(_, p)| p)
            .collect();
        eprintln!(
            "crash round {round}: {} acknowledged before SIGKILL (after {after} more stored)",
            acked.len()
        );
        acknowledged.extend(acked);
        node.kill();
        node.restart();
    }
    for series in [&a, &b] {
        let exported = export_study(&node, &dicom_study_uid(&series[0]));
        for f in series.iter() {
            let sent = support::read_part10(f).unwrap();
            match exported.get(&sent.sop_instance_uid) {
                Some(got) => assert!(
                    got.dataset == sent.dataset,
                    "{} is present but not whole",
                    f.display()
                ),
                None => assert!(
                    !acknowledged.contains(f),
                    "{} was acknowledged, then lost in a crash",
                    f.display()
                ),
            }
        }
    }
    assert!(!acknowledged.is_empty());
}
