//! The S3 backend against a real S3 server over HTTP (s3s-fs, in-process on an ephemeral port).

use std::time::{Duration, Instant};

use crate::roundtrip::{assert_no_identifiers, ct_and_mr_series_round_trip};
use crate::support::{self, assert_ok, s3server::S3Server, Node};

/// A node on the S3 backend of `server`, each attempt bounded by `timeout_secs`.
pub(crate) fn s3_node(server: &S3Server, timeout_secs: &str) -> Node {
    s3_node_with(server, timeout_secs, &[])
}

/// [`s3_node`] with more environment overrides.
pub(crate) fn s3_node_with(server: &S3Server, timeout_secs: &str, env: &[(&str, &str)]) -> Node {
    let mut env = env.to_vec();
    env.extend([
        ("DICOMCHAIN__STORE__BACKEND", "s3"),
        ("DICOMCHAIN__STORE__S3__ENDPOINT", server.endpoint.as_str()),
        ("DICOMCHAIN__STORE__S3__BUCKET", server.bucket.as_str()),
        (
            "DICOMCHAIN__STORE__S3__ACCESS_KEY",
            server.access_key.as_str(),
        ),
        (
            "DICOMCHAIN__STORE__S3__SECRET_KEY",
            server.secret_key.as_str(),
        ),
        ("DICOMCHAIN__STORE__TIMEOUT_SECS", timeout_secs),
    ]);
    Node::start_with_env(&env)
}

#[test]
fn ct_and_mr_series_round_trip_on_the_s3_backend() {
    let root = tempfile::tempdir().unwrap();
    let server = S3Server::start(root.path());
    let mut node = s3_node(&server, "30");
    ct_and_mr_series_round_trip(&mut node);
    assert_eq!(server.object_names().len(), 1050, "one object per instance");
    // Nothing went to the local object directory.
    assert!(support::files_under(&node.dir.join("objects")).is_empty());
}

#[test]
fn s3_objects_carry_no_patient_identifiers() {
    let root = tempfile::tempdir().unwrap();
    let server = S3Server::start(root.path());
    let node = s3_node(&server, "30");
    let src = tempfile::tempdir().unwrap();
    let files = support::make_series(
        src.path(),
        "CT",
        4,
        64,
        &[
            "--patient-name",
            "QUIXOTE^ALONSO",
            "--patient-id",
            "PID-99-ZZ",
        ],
    );
    assert_ok(&node.storescu(&[], &files), "storescu");
    let names = server.object_names();
    assert_eq!(names.len(), 4);
    let sent = support::read_part10(&files[0]).unwrap();
    assert_no_identifiers(
        server.root(),
        &[
            b"QUIXOTE",
            b"ALONSO",
            b"PID-99-ZZ",
            sent.sop_instance_uid.as_bytes(),
            &sent.dataset[sent.dataset.len() - 64..],
        ],
    );
    // verify reads every object back over S3 and lists the bucket for orphans.
    let verify = |node: &Node| {
        let out = node.run(&["verify"]);
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let (code, text) = verify(&node);
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("4 pixel objects"), "{text}");
    // An object no entry names, and the leftover of an interrupted upload, are both reported
    // (found by listing over S3, not by looking at the server's directory).
    let bucket = server.root().join(&server.bucket);
    std::fs::write(bucket.join("0123456789abcdef"), b"stray").unwrap();
    std::fs::create_dir_all(bucket.join("staging")).unwrap();
    std::fs::write(bucket.join("staging").join("feedface"), b"part").unwrap();
    let (code, text) = verify(&node);
    assert_eq!(code, Some(1), "{text}");
    assert!(
        text.contains("object 0123456789abcdef") && text.contains("orphan"),
        "{text}"
    );
    assert!(
        text.contains("object staging/feedface") && text.contains("interrupted S3 upload"),
        "{text}"
    );
    assert_eq!(text.matches("DAMAGED").count(), 2, "{text}");
}

#[test]
fn an_unreachable_object_store_fails_with_a700_promptly_and_the_node_recovers() {
    let root = tempfile::tempdir().unwrap();
    let mut server = S3Server::start(root.path());
    let node = s3_node(&server, "3");
    let (_src, files) = support::ct_series(3, 64);
    server.stop();
    let started = Instant::now();
    let res = node.send_exact(&files[..1]);
    let took = started.elapsed();
    assert_eq!(res[0].0, Some(0xA700), "{res:?}\n{}", node.log());
    assert!(took < Duration::from_secs(20), "A700 took {took:?}");
    assert_ok(&node.echoscu(), "echoscu while the store is down");
    server.restart();
    let res = node.send_exact(&files);
    assert!(
        res.iter().all(|(s, _)| *s == Some(0)),
        "{res:?}\n{}",
        node.log()
    );
    let out = tempfile::tempdir().unwrap();
    let uid = support::read_part10(&files[0]).unwrap().sop_instance_uid;
    assert_ok(
        &node.export(&["--instance", &uid], out.path()),
        "export after recovery",
    );
}
