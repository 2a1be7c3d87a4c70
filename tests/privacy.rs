//! Privacy: erasure by crypto-shredding, seen from real clients (the CLI's DICOM client, DCMTK
//! storescu, DCMTK storescp as the C-MOVE destination) and the admin API.

use std::path::Path;

use crate::support::output_text as text;
use crate::support::{self, assert_ok, Node, Storescp};

/// Whether any file under `dir` contains `needle` (the raw bytes of RocksDB's logs and tables).
fn any_file_contains(dir: &Path, needle: &[u8]) -> Option<String> {
    support::files_under(dir).into_iter().find_map(|p| {
        let body = std::fs::read(&p).ok()?;
        body.windows(needle.len())
            .any(|w| w == needle)
            .then(|| p.display().to_string())
    })
}

#[test]
fn erasing_a_study_shreds_it_everywhere_and_verify_reports_it_erased() {
    let scp = Storescp::start();
    let mut node = Node::start_with(
        &[("DICOMCHAIN__ADMIN__LISTEN", "127.0.0.1:0")],
        &support::peer("archive", "STORESCP", scp.port),
    );
    let src = tempfile::tempdir().unwrap();
    let gone = support::make_series(
        &src.path().join("gone"),
        "CT",
        3,
        32,
        &["--patient-name", "ERASE^ME", "--patient-id", "PID-GONE-1"],
    );
    let kept = support::make_series(
        &src.path().join("kept"),
        "MR",
        2,
        32,
        &["--patient-name", "KEEP^ME", "--patient-id", "PID-KEPT-2"],
    );
    assert_ok(&node.storescu(&[], &gone), "storescu");
    assert_ok(&node.storescu(&[], &kept), "storescu");
    // A second version of one instance: erasure takes every version.
    let mut changed = std::fs::read(&gone[0]).unwrap();
    let n = changed.len();
    changed[n - 1] ^= 0x55;
    let changed_path = src.path().join("changed.dcm");
    std::fs::write(&changed_path, &changed).unwrap();
    assert_eq!(node.send_exact(&[changed_path])[0].0, Some(0));

    let study_of = |node: &Node, pid: &str| -> Option<String> {
        let found = node.client().find_studies(&[&format!("PatientID={pid}")]);
        assert_ok(&found, "find");
        support::study_uid_in(&found)
    };
    let study = study_of(&node, "PID-GONE-1").expect("the study before erasure");
    let objects = |node: &Node| {
        support::files_under(&node.dir.join("objects"))
            .into_iter()
            .filter(|p| !p.starts_with(node.dir.join("objects/tmp")))
            .count()
    };
    assert_eq!(objects(&node), 6);
    let secret = support::read_part10(&gone[1]).unwrap();
    assert!(
        any_file_contains(&node.dir.join("ledger"), b"PID-GONE-1").is_some(),
        "the metadata is on the ledger before erasure"
    );

    let erased = node.run(&["erase", "--study", &study]);
    assert_ok(&erased, "erase --study");
    let said = text(&erased);
    assert!(
        said.contains("3 instance(s), 4 stored version(s), 4 pixel object(s) deleted"),
        "{said}"
    );
    assert_eq!(
        objects(&node),
        2,
        "only the other patient's objects are left"
    );

    // C-FIND, C-MOVE, C-GET and export no longer find it; the other study is untouched.
    assert_eq!(study_of(&node, "PID-GONE-1"), None);
    let moved = node.client().move_study("STORESCP", &study);
    assert!(
        text(&moved).contains("completed 0,") || !moved.status.success(),
        "{}",
        text(&moved)
    );
    let got = tempfile::tempdir().unwrap();
    let _ = node.client().get_study(got.path(), &study);
    assert!(support::files_under(got.path()).is_empty());
    assert_eq!(
        scp.count(),
        0,
        "nothing of the erased study reached the destination"
    );
    let out = tempfile::tempdir().unwrap();
    let export = node.export(&["--instance", &secret.sop_instance_uid], out.path());
    assert!(!export.status.success(), "{}", text(&export));
    let kept_study = study_of(&node, "PID-KEPT-2").expect("the other study");
    assert_ok(
        &node.client().move_study("STORESCP", &kept_study),
        "move of the other study",
    );
    assert_eq!(scp.count(), 2);

    // The chain and the tree still verify; the erased entries are reported as erased.
    let verify = node.run(&["verify"]);
    let report = text(&verify);
    assert_eq!(verify.status.code(), Some(0), "{report}");
    assert!(
        report.contains("ERASED entry ") && report.contains("a study (4 stored entries"),
        "{report}"
    );
    assert!(report.contains(", 4 erased"), "{report}");
    assert!(!report.contains("DAMAGED"), "{report}");

    // Nothing to erase is an error; a patient erasure takes the rest.
    let again = node.run(&["erase", "--study", &study]);
    assert!(!again.status.success());
    assert!(
        text(&again).contains("no stored instance"),
        "{}",
        text(&again)
    );
    assert_ok(
        &node.run(&["erase", "--patient", "PID-KEPT-2"]),
        "erase --patient",
    );
    assert_eq!(objects(&node), 0);

    // The trail has both erasures (DICOM Study Deleted), without the UID or the patient.
    let trail = text(&node.run(&["audit", "--event", "110105"]));
    assert_eq!(trail.lines().count(), 2, "{trail}");
    assert!(
        trail.contains("study erased") && trail.contains("patient erased"),
        "{trail}"
    );
    for secret in [study.as_str(), "PID-GONE-1", "ERASE^ME", "PID-KEPT-2"] {
        assert!(!trail.contains(secret), "{trail}");
    }

    // The same trail from the admin API; a bad parameter is refused.
    let admin = node.admin_port();
    let token = std::fs::read_to_string(node.dir.join("var/admin-token")).unwrap();
    let (status, body) =
        support::http_get_with(admin, "/v1/audit?event=110105", Some(token.trim()));
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["events"].as_array().map(Vec::len), Some(2), "{body}");
    assert_eq!(v["events"][0]["event"], "DICOM Study Deleted", "{body}");
    let (status, body) =
        support::http_get_with(admin, "/v1/audit?since=someday", Some(token.trim()));
    assert_eq!(status, 400, "{body}");
    assert_eq!(
        support::http_get_with(admin, "/v1/audit", Some("wrong-token-0123456789")).0,
        401
    );

    // The values leave RocksDB's files too (flushed, compacted; the old logs deleted).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let left = ["PID-GONE-1", "ERASE^ME", "PID-KEPT-2"]
            .iter()
            .find_map(|s| any_file_contains(&node.dir.join("ledger"), s.as_bytes()));
        match left {
            None => break,
            Some(f) if std::time::Instant::now() > deadline => {
                panic!("an erased patient is still in {f}")
            }
            Some(_) => std::thread::sleep(std::time::Duration::from_millis(500)),
        }
    }

    // After a restart everything stays as it was.
    node.restart();
    assert_eq!(study_of(&node, "PID-KEPT-2"), None);
    let verify = node.run(&["verify"]);
    let report = text(&verify);
    assert_eq!(verify.status.code(), Some(0), "{report}");
    assert!(report.contains(", 6 erased"), "{report}");
}
