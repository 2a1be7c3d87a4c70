//! C-MOVE and C-GET as real clients see them: DCMTK movescu with storescp (bit-preserving) as the
//! destination, and getscu. What comes back is compared byte for byte with what was sent.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Output;

use dicom_dictionary_std::tags;
use dicom_encoding::TransferSyntaxIndex;
use dicom_transfer_syntax_registry::TransferSyntaxRegistry;

use crate::support::output_text as text;
use crate::support::{self, Node, Scu, Storescp};

/// (SOP Instance UID, Study Instance UID) of a data set as the node indexes it: the data set's,
/// not the File Meta's.
fn uids(p: &support::Part10) -> Option<(String, String)> {
    let ts = TransferSyntaxRegistry.get(&p.transfer_syntax)?;
    let obj = dicom_object::InMemDicomObject::read_dataset_with_ts(&p.dataset[..], ts).ok()?;
    // Raw bytes: some corpus files give UIDs a binary VR.
    let text = |t| {
        obj.element(t)
            .ok()
            .and_then(|e| e.to_bytes().ok().map(|b| b.to_vec()))
            .map(|b| {
                String::from_utf8_lossy(&b)
                    .trim_end_matches(['\0', ' '])
                    .to_string()
            })
    };
    Some((
        text(tags::SOP_INSTANCE_UID)?,
        text(tags::STUDY_INSTANCE_UID).unwrap_or_default(),
    ))
}

/// Sends `files` exactly as stored; returns the latest data set bytes per SOP Instance UID of
/// what the node acknowledged.
fn store(node: &Node, files: &[PathBuf]) -> BTreeMap<String, (String, Vec<u8>)> {
    let results = node.send_exact(files);
    let mut latest = BTreeMap::new();
    for (status, path) in results {
        if status != Some(0) {
            continue;
        }
        let p = support::read_part10(&path).expect("sent file reads");
        let (uid, study) = uids(&p).unwrap_or((p.sop_instance_uid.clone(), String::new()));
        latest.insert(uid, (study, p.dataset));
    }
    latest
}

fn movescu(node: &Node, model: &str, level: &str, keys: &[String], dest: &str) -> Output {
    Scu::movescu()
        .args(["-v", "-aem", dest, model])
        .level(level)
        .keys(keys)
        .run(node.port)
}

/// movescu (Study Root) of the studies `study_uids` (one UID, or several joined by `\`) to `dest`.
fn move_study(node: &Node, study_uids: &str, dest: &str) -> Output {
    movescu(
        node,
        "-S",
        "STUDY",
        &[format!("StudyInstanceUID={study_uids}")],
        dest,
    )
}

/// DCMTK getscu (Study Root) into `out_dir`: its output, and what it received.
fn getscu(
    node: &Node,
    out_dir: &std::path::Path,
    keys: &[String],
) -> (Output, Vec<support::Part10>) {
    std::fs::create_dir_all(out_dir).unwrap();
    let out = Scu::getscu()
        .args(["-v", "-S"])
        .out_dir(out_dir)
        .keys(keys)
        .run(node.port);
    let received = support::files_under(out_dir)
        .iter()
        .filter_map(|p| support::read_part10(p))
        .collect();
    (out, received)
}

/// [`getscu`] of one study.
fn get_study(
    node: &Node,
    out_dir: &std::path::Path,
    study_uid: &str,
) -> (Output, Vec<support::Part10>) {
    getscu(
        node,
        out_dir,
        &[
            "QueryRetrieveLevel=STUDY".into(),
            format!("StudyInstanceUID={study_uid}"),
        ],
    )
}

fn assert_identical(
    received: Vec<support::Part10>,
    latest: &BTreeMap<String, (String, Vec<u8>)>,
    what: &str,
) {
    let mut got = BTreeMap::new();
    for p in received {
        got.insert(p.sop_instance_uid.clone(), p);
    }
    let missing: Vec<_> = latest.keys().filter(|u| !got.contains_key(*u)).collect();
    assert!(missing.is_empty(), "{what}: not received: {missing:?}");
    for (uid, (_, bytes)) in latest {
        assert!(
            got[uid].dataset == *bytes,
            "{what}: {uid} differs from what was sent ({} vs {} bytes, {})",
            got[uid].dataset.len(),
            bytes.len(),
            got[uid].transfer_syntax
        );
    }
    assert_eq!(
        got.len(),
        latest.len(),
        "{what}: more instances than stored"
    );
}

#[test]
fn c_move_returns_every_stored_instance_byte_for_byte() {
    let scp = Storescp::start();
    let node = Node::start_with_peers(&[("archive", "STORESCP", scp.port)]);
    // pydicom's corpus (every transfer syntax, versions of one instance, 17 character sets)
    // and a generated MR series, sent exactly as stored.
    let dir = tempfile::tempdir().unwrap();
    let mut files: Vec<PathBuf> = support::pydicom_corpus()
        .into_iter()
        .map(|p| p.path)
        .collect();
    files.extend(support::make_series(
        &dir.path().join("mr"),
        "MR",
        30,
        64,
        &["--studies", "2"],
    ));
    let latest = store(&node, &files);
    assert!(latest.len() > 100, "only {} instances stored", latest.len());

    // Everything, by SOP Instance UID list at the IMAGE level (Study Root). DCMTK refuses a
    // data set of odd length (an odd final PDV; the corpus's deflated image_dfl.dcm is one) by
    // aborting: that sub-operation fails, the move goes on over a new association.
    let list: Vec<&str> = latest.keys().map(String::as_str).collect();
    let out = movescu(
        &node,
        "-S",
        "IMAGE",
        &[format!("SOPInstanceUID={}", list.join("\\"))],
        "STORESCP",
    );
    let (odd, even): (BTreeMap<_, _>, BTreeMap<_, _>) = latest
        .clone()
        .into_iter()
        .partition(|(_, (_, b))| b.len() % 2 == 1);
    assert!(odd.len() <= 1, "odd-length data sets: {:?}", odd.keys());
    let want = if odd.is_empty() {
        "Final Move Response (Success)"
    } else {
        "Final Move Response (Warning"
    };
    assert!(text(&out).contains(want), "{}", text(&out));
    assert_identical(scp.received(), &even, "IMAGE-level C-MOVE");

    // Two studies by Study Instance UID list, Patient Root.
    scp.clear();
    let studies: Vec<String> = latest
        .values()
        .map(|(s, _)| s.clone())
        .filter(|s| !s.is_empty())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .filter(|s| even.values().any(|(st, _)| st == s) && !odd.values().any(|(st, _)| st == s))
        .take(2)
        .collect();
    let subset: BTreeMap<_, _> = even
        .iter()
        .filter(|(_, (s, _))| studies.contains(s))
        .map(|(u, v)| (u.clone(), v.clone()))
        .collect();
    let out = move_study(&node, &studies.join("\\"), "STORESCP");
    assert!(
        text(&out).contains("Final Move Response (Success)"),
        "{}",
        text(&out)
    );
    assert_identical(scp.received(), &subset, "STUDY-level C-MOVE");

    // An unknown destination is refused (A801) and nothing is sent.
    scp.clear();
    let out = move_study(&node, &studies[0], "NOBODY");
    assert!(
        text(&out).contains("MoveDestinationUnknown") || text(&out).contains("a801"),
        "{}",
        text(&out)
    );
    // A universal unique key would move the archive: refused (A900).
    let out = movescu(
        &node,
        "-S",
        "STUDY",
        &["StudyInstanceUID".to_string()],
        "STORESCP",
    );
    assert!(
        text(&out).contains("DataSetDoesNotMatchSOPClass"),
        "{}",
        text(&out)
    );
    // So would a wild card in it.
    for key in ["PatientID=*", "PatientID=PID?"] {
        let out = movescu(&node, "-P", "PATIENT", &[key.to_string()], "STORESCP");
        assert!(
            text(&out).contains("DataSetDoesNotMatchSOPClass"),
            "{key}: {}",
            text(&out)
        );
    }
    assert!(scp.received().is_empty());
}

#[test]
fn c_get_sends_over_the_requesting_association() {
    let node = Node::start();
    let dir = tempfile::tempdir().unwrap();
    let files = support::make_series(&dir.path().join("ct"), "CT", 20, 64, &["--studies", "2"]);
    let latest = store(&node, &files);
    assert_eq!(latest.len(), 20);
    let study = latest.values().next().unwrap().0.clone();
    let expect: BTreeMap<_, _> = latest
        .iter()
        .filter(|(_, (s, _))| *s == study)
        .map(|(u, v)| (u.clone(), v.clone()))
        .collect();
    let (out, received) = get_study(&node, &dir.path().join("got"), &study);
    assert!(
        text(&out).contains("Number of Completed Suboperations : 10"),
        "{}",
        text(&out)
    );
    assert!(
        text(&out).contains("Number of Failed Suboperations    : 0"),
        "{}",
        text(&out)
    );
    assert_identical(received, &expect, "C-GET");
}

#[test]
fn an_altered_pixel_object_is_never_sent() {
    let scp = Storescp::start();
    let node = Node::start_with_peers(&[("archive", "STORESCP", scp.port)]);
    let dir = tempfile::tempdir().unwrap();
    let files = support::make_series(&dir.path().join("ct"), "CT", 5, 64, &[]);
    let latest = store(&node, &files);
    // Flip a byte in one pixel object on disk.
    let objects = support::files_under(&node.dir.join("objects"));
    assert_eq!(objects.len(), 5);
    support::xor_byte(&objects[2], 100, 0xFF);
    let study = latest.values().next().unwrap().0.clone();
    let out = move_study(&node, &study, "STORESCP");
    let t = text(&out);
    assert!(
        t.contains("Final Move Response (Warning)")
            || t.contains("b000")
            || t.contains("SubOperationsCompleteOneOrMoreFailures"),
        "{t}"
    );
    let received = scp.received();
    assert_eq!(received.len(), 4, "the altered instance must not be sent");
    for p in &received {
        assert_eq!(
            p.dataset, latest[&p.sop_instance_uid].1,
            "only intact instances arrive"
        );
    }
    assert!(node.log().contains("fails its ledger check"));
}

#[test]
fn orthanc_stores_into_queries_and_moves_from_the_node() {
    // Orthanc as the site's PACS: dicomchain knows it as a peer, it knows dicomchain as a
    // modality. Everything goes through Orthanc's REST API (tests/support/orthanc_peer.py).
    let orthanc_port = support::free_port();
    let node = Node::start_with(
        &[("DICOMCHAIN__LEDGER__CHECKPOINT_INTERVAL", "1")],
        &support::peer("pacs", "ORTHANC", orthanc_port),
    );
    let dir = tempfile::tempdir().unwrap();
    let mut files = support::make_find_corpus(dir.path());
    let data = support::pydicom_data().expect("pydicom is installed");
    files.push(data.join("test_files/CT_small.dcm"));
    files.push(data.join("test_files/MR_small.dcm"));
    let out = support::script("orthanc_peer.py")
        .arg(node.port.to_string())
        .arg(orthanc_port.to_string())
        .args(&files)
        .output()
        .unwrap();
    support::assert_ok(&out, "orthanc_peer.py");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    // Every instance came back exactly as dicomchain received it: the SHA-256 of what Orthanc
    // got back equals the data set digest the ledger recorded when Orthanc sent it. (Orthanc's
    // own C-STORE drops group lengths from some files, e.g. CT_small, so for those what it sent
    // differs from what it held; all others must also equal the file Orthanc held.)
    let returned = report["returned_sha256"].as_object().unwrap();
    assert_eq!(returned.len(), files.len());
    for (uid, sha) in returned {
        let proof = node.run(&["proof", "--instance", uid]);
        support::assert_ok(&proof, "proof");
        let proof: serde_json::Value = serde_json::from_slice(&proof.stdout).unwrap();
        assert_eq!(&proof["dataset_sha256"], sha, "{uid} came back altered");
    }
    let different = report["different"].as_array().unwrap();
    assert!(different.len() <= 2, "{report}");
    assert!(report["identical"].as_u64().unwrap() as usize >= files.len() - 2);
}

#[test]
fn large_instances_stream_and_a_damaged_one_is_never_completed() {
    // A buffer bound of 1 KB makes every instance take the streaming path: sent while it is
    // read from the object store, the last fragment held back until the check passes.
    let scp = Storescp::start();
    let node = Node::start_with(
        &[("DICOMCHAIN__NODE__MAX_RETRIEVE_BUFFER_BYTES", "1024")],
        &support::peer("archive", "STORESCP", scp.port),
    );
    let dir = tempfile::tempdir().unwrap();
    let files = support::make_series(&dir.path().join("ct"), "CT", 6, 512, &[]);
    let latest = store(&node, &files);
    let study = latest.values().next().unwrap().0.clone();

    // Intact: byte for byte, over C-MOVE and C-GET.
    let out = move_study(&node, &study, "STORESCP");
    assert!(
        text(&out).contains("Final Move Response (Success)"),
        "{}",
        text(&out)
    );
    assert_identical(scp.received(), &latest, "streamed C-MOVE");
    let (out, received) = get_study(&node, &dir.path().join("got"), &study);
    support::assert_ok(&out, "getscu");
    assert_identical(received, &latest, "streamed C-GET");

    // One pixel object altered at its end: most of the instance has gone out before the check
    // can fail, so the association is aborted and the destination never completes it; the
    // others follow over a new association.
    scp.clear();
    let objects = support::files_under(&node.dir.join("objects"));
    let victim = &objects[3];
    let n = std::fs::metadata(victim).unwrap().len() as usize;
    support::xor_byte(victim, n - 10, 0xFF);
    let out = move_study(&node, &study, "STORESCP");
    let t = text(&out);
    assert!(t.contains("Final Move Response (Warning"), "{t}");
    let received = scp.received();
    assert_eq!(received.len(), 5, "the damaged instance must not arrive");
    for p in &received {
        assert_eq!(p.dataset, latest[&p.sop_instance_uid].1);
    }
    assert!(node.log().contains("fails its ledger check"));
}

#[test]
fn pynetdicom_get_and_a_cancelled_move() {
    let scp = Storescp::start();
    let node = Node::start_with_peers(&[("archive", "STORESCP", scp.port)]);
    let dir = tempfile::tempdir().unwrap();
    let files = support::make_series(&dir.path().join("ct"), "CT", 300, 64, &[]);
    let latest = store(&node, &files);
    let study = latest.values().next().unwrap().0.clone();
    let out = support::script("qr_pynetdicom.py")
        .arg(node.port.to_string())
        .arg(&study)
        .arg("STORESCP")
        .args(&files)
        .output()
        .unwrap();
    support::assert_ok(&out, "qr_pynetdicom.py");
    // What did reach the destination before the cancel is intact.
    for p in scp.received() {
        assert_eq!(p.dataset, latest[&p.sop_instance_uid].1);
    }
}

#[test]
fn c_get_converts_between_uncompressed_syntaxes_only_when_it_must() {
    // The find corpus's series 5 is Explicit VR Big Endian; getscu offers its storage contexts
    // with little endian first, so the node converts, says so, and the values survive.
    let node = Node::start();
    let dir = tempfile::tempdir().unwrap();
    let files = support::make_find_corpus(&dir.path().join("corpus"));
    let latest = store(&node, &files);
    let series: BTreeMap<_, _> = latest
        .iter()
        .filter(|(u, _)| u.starts_with("1.2.826.0.1.3680043.10.1474.99.3.5."))
        .collect();
    assert_eq!(series.len(), 4);
    let (out, received) = getscu(
        &node,
        &dir.path().join("got"),
        &[
            "QueryRetrieveLevel=SERIES".into(),
            "StudyInstanceUID=1.2.826.0.1.3680043.10.1474.99.1.3".into(),
            "SeriesInstanceUID=1.2.826.0.1.3680043.10.1474.99.2.5".into(),
        ],
    );
    support::assert_ok(&out, "getscu");
    assert_eq!(received.len(), 4);
    let parse = |ts: &str, bytes: &[u8]| {
        dicom_object::InMemDicomObject::read_dataset_with_ts(
            bytes,
            TransferSyntaxRegistry.get(ts).unwrap(),
        )
        .unwrap()
    };
    for p in received {
        assert_ne!(p.transfer_syntax, "1.2.840.10008.1.2.2");
        let back = parse(&p.transfer_syntax, &p.dataset);
        let orig = parse("1.2.840.10008.1.2.2", &latest[&p.sop_instance_uid].1);
        for tag in [
            tags::PIXEL_DATA,
            tags::PATIENT_NAME,
            tags::ROWS,
            tags::REQUEST_ATTRIBUTES_SEQUENCE,
        ] {
            assert_eq!(
                back.element(tag).unwrap().value(),
                orig.element(tag).unwrap().value(),
                "{tag}"
            );
        }
    }
    assert!(node
        .log()
        .contains("instance converted for the destination"));
}
