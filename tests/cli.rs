//! The command line: configuration checks and the export's integrity guarantees.

use std::process::Command;

use crate::support::{self, assert_ok, dicomchain, Node};

#[test]
fn check_config_prints_effective_values_with_secrets_masked() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("c.toml");
    std::fs::write(&cfg, "[store]\nbackend = \"s3\"\n[store.s3]\naccess_key = \"AKIAEXAMPLE\"\nsecret_key = \"TOPSECRET\"\n").unwrap();
    let out = dicomchain()
        .args(["check-config", "--config"])
        .arg(&cfg)
        .env("DICOMCHAIN__NODE__LISTEN", "127.0.0.1:4242")
        .output()
        .unwrap();
    assert_ok(&out, "check-config");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("listen = \"127.0.0.1:4242\""), "{text}");
    assert!(text.contains("backend = \"s3\""), "{text}");
    assert!(
        !text.contains("AKIAEXAMPLE") && !text.contains("TOPSECRET"),
        "{text}"
    );
}

#[test]
fn bad_configuration_names_the_key_and_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("c.toml");
    std::fs::write(&cfg, "[node]\nmax_asociations = 3\n").unwrap();
    let out = dicomchain()
        .args(["check-config", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("max_asociations"));

    let out = dicomchain()
        .args(["serve", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));

    let out = dicomchain()
        .args(["check-config", "--config", "/nonexistent/dicomchain.toml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/dicomchain.toml"));

    std::fs::write(&cfg, "").unwrap();
    let out = dicomchain()
        .args(["check-config", "--config"])
        .arg(&cfg)
        .env("DICOMCHAIN__NODE__MAX_PDU_LENGTH", "12")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("node.max_pdu_length"));
}

#[test]
fn export_refuses_an_instance_whose_pixels_were_altered() {
    let node = Node::checkpointing();
    let (_src, files) = support::ct_series(3, 64);
    assert_ok(&node.storescu(&[], &files), "storescu");
    // Flip one byte in one pixel object, as a tampering cloud provider would.
    let objects: Vec<_> = support::files_under(&node.dir.join("objects"))
        .into_iter()
        .filter(|p| !p.starts_with(node.dir.join("objects/tmp")))
        .collect();
    assert_eq!(objects.len(), 3);
    support::xor_byte(&objects[0], 100, 0xFF);

    let study_uid = dicom_study_uid(&files[0]);
    let out_dir = tempfile::tempdir().unwrap();
    let out = node.export(&["--study", &study_uid], out_dir.path());
    assert!(
        !out.status.success(),
        "export must fail on a tampered instance"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("NOT exported") && stderr.contains("integrity"),
        "{stderr}"
    );
    // The two intact instances are written, the tampered one is not, and no temp file remains.
    let written = support::files_under(out_dir.path());
    assert_eq!(written.len(), 2, "{written:?}");
    assert!(written
        .iter()
        .all(|p| p.extension().is_some_and(|e| e == "dcm")));
    // The failure is a security event on the ledger, recorded by the running node.
    let text = node.wait_for(30, "a security event on the ledger", || {
        let out = node.run(&["verify", "--ledger-only"]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.contains("SECURITY EVENT").then_some(text)
    });
    assert!(
        text.contains("pixel data does not match the ledger") && text.contains("found by export"),
        "{text}"
    );
}

/// The Study Instance UID of a Part 10 file, via pydicom.
pub fn dicom_study_uid(path: &std::path::Path) -> String {
    let out = Command::new("python3")
        .args(["-c", "import sys, pydicom; print(pydicom.dcmread(sys.argv[1], stop_before_pixels=True).StudyInstanceUID)"])
        .arg(path)
        .output()
        .unwrap();
    assert_ok(&out, "pydicom");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}
