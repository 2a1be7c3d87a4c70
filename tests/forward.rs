//! Store-and-forward as a site runs it: modalities (DCMTK storescu) send to dicomchain, which
//! records every instance and passes it on to the PACS (Orthanc, DCMTK storescp, a refusing
//! pynetdicom SCP). What arrives is compared byte for byte with what was sent.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use dicomchain::ledger::{Event, Ledger};

use crate::support::{self, assert_ok, read_part10, sha256_hex, Node, Orthanc, Scu, Storescp};

/// SOP Instance UID → SHA-256 of the data set of each file.
fn digests(files: &[PathBuf]) -> BTreeMap<String, String> {
    files
        .iter()
        .map(|f| {
            let p = read_part10(f).unwrap();
            (p.sop_instance_uid, sha256_hex(&p.dataset))
        })
        .collect()
}

/// Asserts two SOP Instance UID → digest maps are equal, naming what differs.
fn assert_same(got: &BTreeMap<String, String>, want: &BTreeMap<String, String>, what: &str) {
    let missing: Vec<&String> = want.keys().filter(|k| !got.contains_key(*k)).collect();
    let extra: Vec<&String> = got.keys().filter(|k| !want.contains_key(*k)).collect();
    let differ: Vec<&String> = want
        .iter()
        .filter(|(k, v)| got.get(*k).is_some_and(|g| g != *v))
        .map(|(k, _)| k)
        .collect();
    assert!(
        missing.is_empty() && extra.is_empty() && differ.is_empty(),
        "{what}: missing {missing:?}, unexpected {extra:?}, different bytes {differ:?}"
    );
}

fn forward_status(node: &Node) -> Vec<serde_json::Value> {
    let out = node.run(&["forward", "status", "--json"]);
    assert_ok(&out, "dicomchain forward status --json");
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Waits until a destination has nothing pending and nothing given up.
fn settled(node: &Node, name: &str) {
    node.wait_for(30, &format!("{name} to settle"), || {
        let s = forward_status(node);
        let d = destination(&s, name);
        (d["pending"] == 0 && d["failed"] == 0).then_some(())
    });
}

fn destination<'a>(status: &'a [serde_json::Value], name: &str) -> &'a serde_json::Value {
    status
        .iter()
        .find(|d| d["destination"] == name)
        .unwrap_or_else(|| panic!("no destination {name} in {status:?}"))
}

/// Forward outcome entries on the ledger: (subject entry, peer AE, status).
fn outcome_entries(node: &Node) -> Vec<(u64, String, u16)> {
    let scratch = tempfile::tempdir().unwrap();
    let ledger = Ledger::open_secondary(&node.dir.join("ledger"), scratch.path()).unwrap();
    let mut out = Vec::new();
    ledger
        .for_each_entry(|_, e| {
            let e = e.unwrap();
            if e.event == Event::Forward {
                out.push((e.subject_seq, e.peer, e.status));
            }
        })
        .unwrap();
    out
}

/// Waits until Orthanc holds at least `n` instances; returns what it holds.
fn in_orthanc(node: &Node, orthanc: &Orthanc, n: usize) -> BTreeMap<String, String> {
    node.wait_for(60, "every instance in Orthanc", || {
        let got = orthanc.instances();
        (got.len() >= n).then_some(got)
    })
}

fn storescu(node: &Node, calling: &str, files: &[PathBuf]) {
    let out = Scu::storescu().calling(calling).files(files).run(node.port);
    assert_ok(&out, "storescu");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !err.contains("E:") && !err.contains("Failed"),
        "storescu reported errors:\n{err}"
    );
}

fn verify_ledger(node: &Node) {
    let out = node.run(&["verify", "--ledger-only"]);
    assert_ok(&out, "dicomchain verify --ledger-only");
}

#[test]
fn forwards_to_orthanc_byte_exact_through_an_outage_and_a_crash() {
    let tmp = tempfile::tempdir().unwrap();
    let mut orthanc = Orthanc::start();
    // What Orthanc stores when the modality sends to it directly: Orthanc re-encodes some data
    // sets it receives over DICOM (two of the pydicom files below), whoever sends them.
    let reference = Orthanc::start();
    // A bit-preserving copy of everything forwarded: proves what dicomchain put on the wire.
    let copy = Storescp::start();
    let mut node = Node::start_with(
        &[],
        &[
            support::peer("pacs", "ORTHANC", orthanc.dicom_port),
            support::peer("copy", "STORESCP", copy.port),
            "[[forward]]\ndestination = \"pacs\"\n\
             [[forward]]\ndestination = \"copy\"\n\
             [forwarding]\nretry_initial_ms = 200\nretry_max_secs = 1\nidle_release_secs = 1\n"
                .into(),
        ]
        .concat(),
    );
    let mut sent = BTreeMap::new();
    let send =
        |node: &Node, sent: &mut BTreeMap<String, String>, files: &[PathBuf], dcmtk: bool| {
            if dcmtk {
                storescu(node, "MODALITY", files);
            } else {
                // Compressed files as stored (storescu proposes one compressed syntax per run).
                for (status, path) in node.send_exact(files) {
                    assert_eq!(status, Some(0), "{}", path.display());
                }
            }
            for (status, path) in support::send_exact_to(reference.dicom_port, "ORTHANC", files, 60)
            {
                assert_eq!(status, Some(0), "reference Orthanc: {}", path.display());
            }
            sent.extend(digests(files));
        };
    let ct = support::make_series(&tmp.path().join("ct"), "CT", 20, 64, &[]);
    let mr = support::make_series(&tmp.path().join("mr"), "MR", 10, 32, &["--studies", "2"]);
    send(&node, &mut sent, &[ct.clone(), mr.clone()].concat(), true);
    let mut compressed = Vec::new();
    if let Some(data) = support::pydicom_data() {
        for name in ["JPEG2000.dcm", "SC_rgb_rle.dcm", "JPEG-lossy.dcm"] {
            compressed.push(data.join("test_files").join(name));
        }
        send(&node, &mut sent, &compressed, false);
    }
    let got = in_orthanc(&node, &orthanc, sent.len());
    assert_same(
        &got,
        &reference.instances(),
        "Orthanc holds what a direct send gives",
    );
    let generated = digests(&[ct, mr].concat());
    assert_same(
        &got.iter()
            .filter(|(k, _)| generated.contains_key(*k))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        &generated,
        "the generated series reach Orthanc byte for byte",
    );
    let on_wire = node.wait_for(60, "the bit-preserving copy", || {
        let got = received(&copy);
        (got.len() >= sent.len()).then_some(got)
    });
    assert_same(
        &on_wire,
        &sent,
        "dicomchain forwards exactly what it received",
    );
    settled(&node, "pacs");
    let outcomes = node.wait_for(30, "an outcome entry per instance and destination", || {
        let o = outcome_entries(&node);
        (o.len() >= 2 * sent.len()).then_some(o)
    });
    assert_eq!(
        outcomes.len(),
        2 * sent.len(),
        "exactly one outcome entry each"
    );
    assert!(outcomes
        .iter()
        .all(|(_, peer, st)| (peer == "ORTHANC" || peer == "STORESCP") && *st == 0));

    // Outage: the PACS goes away; instances are still acknowledged, and wait in the queue.
    orthanc.pause();
    let during = support::make_series(&tmp.path().join("during"), "CT", 8, 64, &[]);
    send(&node, &mut sent, &during, true);
    node.wait_for(30, "the queue to show the outage", || {
        let s = forward_status(&node);
        let p = destination(&s, "pacs").clone();
        (p["pending"] == 8 && !p["last_error"].is_null()).then_some(p)
    });
    let text = node.run(&["forward", "status"]);
    let text = String::from_utf8_lossy(&text.stdout).to_string();
    assert!(
        text.contains("pending: 8")
            && text.contains("oldest pending: entry")
            && text.contains("last error ("),
        "{text}"
    );
    orthanc.resume();
    let got = in_orthanc(&node, &orthanc, sent.len());
    assert_same(&got, &reference.instances(), "Orthanc after the outage");
    settled(&node, "pacs");

    // Crash with a non-empty queue: nothing is lost.
    orthanc.pause();
    let before_crash = support::make_series(&tmp.path().join("crash"), "MR", 6, 32, &[]);
    send(&node, &mut sent, &before_crash, true);
    node.kill();
    node.restart();
    assert_eq!(destination(&forward_status(&node), "pacs")["pending"], 6);
    orthanc.resume();
    let got = in_orthanc(&node, &orthanc, sent.len());
    assert_same(&got, &reference.instances(), "Orthanc after the crash");
    settled(&node, "pacs");
    settled(&node, "copy");
    let on_wire = received(&copy);
    assert_same(&on_wire, &sent, "the copy after the crash");
    let outcomes = outcome_entries(&node);
    let mut subjects: Vec<(u64, String)> = outcomes.iter().map(|o| (o.0, o.1.clone())).collect();
    subjects.sort();
    subjects.dedup();
    assert_eq!(
        subjects.len(),
        2 * sent.len(),
        "every instance has its outcome"
    );
    assert_eq!(outcomes.len(), subjects.len(), "and only one each");
    node.stop();
    verify_ledger(&node);
}

/// A pynetdicom SCP that refuses every instance with a failure status.
struct Refuser {
    child: Child,
    log: PathBuf,
}

impl Refuser {
    /// Starts the SCP on a port of its own choosing and returns once it listens there.
    fn start(status: &str, log: PathBuf) -> (Refuser, u16) {
        let mut child = support::script("refusing_scp.py")
            .args(["0", status])
            .arg(&log)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("python3");
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.take().unwrap()),
            &mut line,
        )
        .unwrap();
        let port: u16 = line
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("refusing_scp.py did not start: {line:?}"));
        (Refuser { child, log }, port)
    }

    fn attempts(&self) -> Vec<String> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }
}

impl Drop for Refuser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn received(scp: &Storescp) -> BTreeMap<String, String> {
    scp.received()
        .into_iter()
        .map(|p| (p.sop_instance_uid, sha256_hex(&p.dataset)))
        .collect()
}

#[test]
fn rules_route_refusals_are_given_up_and_retry_requeues_them() {
    let tmp = tempfile::tempdir().unwrap();
    let ct_pacs = Storescp::start();
    let archive = Storescp::start();
    let (refuser, flaky_port) = Refuser::start("A700", tmp.path().join("attempts.log"));
    let mut node = Node::start_with(
        &[("DICOMCHAIN__NODE__MAX_RETRIEVE_BUFFER_BYTES", "16384")],
        &[
            support::peer("ctpacs", "STORESCP", ct_pacs.port),
            support::peer("archive", "STORESCP", archive.port),
            support::peer("flaky", "REFUSER", flaky_port),
            "[[forward]]\ndestination = \"ctpacs\"\nmodality = [\"ct\"]\ncalling_ae = [\"CT1\"]\n\
             [[forward]]\ndestination = \"archive\"\n\
             [[forward]]\ndestination = \"flaky\"\nmodality = [\"MR\"]\n\
             [forwarding]\nmax_attempts = 2\nretry_initial_ms = 100\nretry_max_secs = 1\n"
                .into(),
        ]
        .concat(),
    );
    // CT instances above the retrieval buffer limit stream out of the object store while they
    // are sent; the MR ones go whole.
    let ct = support::make_series(&tmp.path().join("ct"), "CT", 5, 128, &[]);
    let mr = support::make_series(&tmp.path().join("mr"), "MR", 3, 32, &[]);
    let other_ct = support::make_series(&tmp.path().join("ct2"), "CT", 2, 64, &[]);
    storescu(&node, "CT1", &ct);
    storescu(&node, "MR1", &mr);
    storescu(&node, "CT2", &other_ct);

    let all: BTreeMap<String, String> =
        digests(&[ct.clone(), mr.clone(), other_ct.clone()].concat());
    let got = node.wait_for(60, "the archive to receive everything", || {
        let got = received(&archive);
        (got.len() >= all.len()).then_some(got)
    });
    assert_same(
        &got,
        &all,
        "the catch-all rule forwards everything byte-exact",
    );
    let got = node.wait_for(60, "the CT PACS", || {
        let got = received(&ct_pacs);
        (got.len() >= ct.len()).then_some(got)
    });
    assert_same(
        &got,
        &digests(&ct),
        "only CT from CT1 (modality and calling AE rule)",
    );

    // The refusing destination saw each MR max_attempts times, then they were given up.
    let deadline = Instant::now() + Duration::from_secs(120);
    let flaky = loop {
        let s = forward_status(&node);
        let f = destination(&s, "flaky").clone();
        if f["failed"] == 3 && f["pending"] == 0 {
            break f;
        }
        assert!(
            Instant::now() < deadline,
            "the MR were not given up: status {f}, refusals {:?}\nnode log:\n{}",
            refuser.attempts(),
            node.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let items = flaky["failed_items"].as_array().unwrap();
    assert_eq!(items.len(), 3);
    assert!(
        items.iter().all(|i| i[1] == 0xA700),
        "the destination's status is kept: {flaky}"
    );
    let attempts = refuser.attempts();
    assert_eq!(attempts.len(), 6, "2 attempts per instance: {attempts:?}");
    let refusals = outcome_entries(&node)
        .into_iter()
        .filter(|(_, peer, st)| peer == "REFUSER" && *st == 0xA700)
        .count();
    assert_eq!(refusals, 3, "each given-up forward is an entry");

    // The PACS is fixed; `forward retry` sends the given-up instances again.
    drop(refuser);
    let fixed = Storescp::start_on(flaky_port);
    // A new version of one given-up MR is delivered first: the given-up older version must not
    // follow it (at the PACS it would replace the newer one), so it is settled as superseded.
    let v2 = tmp.path().join("mr0-v2.dcm");
    let st = Command::new("python3")
        .args([
            "-c",
            "import sys, pydicom; d = pydicom.dcmread(sys.argv[1]); \
             d.SeriesDescription = 'second version'; d.save_as(sys.argv[2], enforce_file_format=True)",
        ])
        .arg(&mr[0])
        .arg(&v2)
        .status()
        .unwrap();
    assert!(st.success());
    storescu(&node, "MR1", std::slice::from_ref(&v2));
    node.wait_for(60, "the new version to supersede the given-up one", || {
        let s = forward_status(&node);
        (destination(&s, "flaky")["failed"] == 2).then_some(())
    });
    let out = node.run(&["forward", "retry", "--destination", "flaky"]);
    assert_ok(&out, "forward retry");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("re-queued 2"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let mut want = digests(&mr[1..]);
    want.extend(digests(std::slice::from_ref(&v2)));
    let got = node.wait_for(60, "the retried MR", || {
        let got = received(&fixed);
        (got.len() >= mr.len()).then_some(got)
    });
    settled(&node, "flaky");
    assert_same(
        &received(&fixed),
        &want,
        "the newest version of each, nothing older after it",
    );
    let _ = got;
    let superseded = {
        let scratch = tempfile::tempdir().unwrap();
        let ledger = Ledger::open_secondary(&node.dir.join("ledger"), scratch.path()).unwrap();
        let mut n = 0;
        ledger
            .for_each_entry(|_, e| {
                let e = e.unwrap();
                n += usize::from(e.event == Event::Forward && e.detail.contains("superseded"));
            })
            .unwrap();
        n
    };
    assert_eq!(
        superseded, 1,
        "the older version's outcome says it was superseded"
    );

    // Unknown destinations are refused by the CLI with the names it knows.
    let out = node.run(&["forward", "retry", "--destination", "nope"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("archive"));
    node.stop();
    verify_ledger(&node);
}

#[test]
fn a_rule_naming_an_unknown_peer_stops_startup() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("c.toml");
    std::fs::write(
        &cfg,
        "[[forward]]\ndestination = \"pacs\"\nmodality = [\"CT\"]\n",
    )
    .unwrap();
    let out = support::dicomchain()
        .arg("--config")
        .arg(&cfg)
        .arg("check-config")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("forward[0].destination") && err.contains("pacs"),
        "{err}"
    );
}
