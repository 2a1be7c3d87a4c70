//! Fault injection: the node killed at random moments during a parallel ingest, the object store
//! going away mid-ingest, SIGTERM while C-STOREs are in flight, and a load of 16 associations.
//! In every case nothing that got a success response may be lost.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::s3::s3_node;
use crate::support::{self, assert_ok, s3server::S3Server, Node, Scu, AE};

/// A pynetdicom sender running in the background (tests/support/send_exact.py), whose results
/// arrive line by line on a channel as (status, file).
struct Sender {
    child: Child,
    reader: Option<std::thread::JoinHandle<()>>,
}

type Result1 = (Option<u16>, PathBuf);

impl Sender {
    fn spawn(
        port: u16,
        files: &[PathBuf],
        dimse_timeout: u32,
        tx: mpsc::Sender<Result1>,
    ) -> Sender {
        let mut child = support::send_exact_command(port, AE, files, dimse_timeout)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run python3");
        // pynetdicom's warnings (an unexpected message, a response put back) for the report.
        let err = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                eprintln!("send_exact stderr: {line}");
            }
        });
        let out = child.stdout.take().unwrap();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                let Some((code, rest)) = line.split_once(' ') else {
                    continue;
                };
                let path = PathBuf::from(rest.split(' ').next().unwrap_or_default());
                let status = u16::from_str_radix(code, 16).ok();
                if status.is_none() {
                    // The sender's reason (no response, an abort, its exception) for the report.
                    eprintln!("send_exact: {line}");
                }
                let _ = tx.send((status, path));
            }
        });
        Sender {
            child,
            reader: Some(reader),
        }
    }

    fn wait(mut self) {
        let _ = self.child.wait();
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
    }
}

/// Starts `n` senders over the files (round robin), all reporting on one channel.
fn senders(
    port: u16,
    files: &[PathBuf],
    n: usize,
    dimse_timeout: u32,
) -> (Vec<Sender>, mpsc::Receiver<Result1>) {
    let (tx, rx) = mpsc::channel();
    let senders = (0..n)
        .map(|i| {
            let part: Vec<PathBuf> = files.iter().skip(i).step_by(n).cloned().collect();
            Sender::spawn(port, &part, dimse_timeout, tx.clone())
        })
        .collect();
    (senders, rx)
}

/// A small deterministic generator (xorshift), seeded from the clock and printed, so that a
/// failing run can be replayed by setting RELIABILITY_SEED.
struct Rng(u64);

impl Rng {
    fn from_env_or_clock() -> Rng {
        let seed = std::env::var("RELIABILITY_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos() as u64
                    | 1
            });
        eprintln!("RELIABILITY_SEED={seed}");
        Rng(seed)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// `dicomchain verify` (full: every pixel object re-read, orphans looked for) must pass.
fn verify_intact(node: &Node, when: &str) {
    let out = node.run(&["verify"]);
    assert_ok(&out, &format!("dicomchain verify {when}"));
}

/// Exports every study and checks that each acknowledged file's data set came back byte for byte.
fn assert_acknowledged_export_exactly(node: &Node, acked: &BTreeSet<PathBuf>) {
    let mut want: BTreeMap<String, (PathBuf, String)> = BTreeMap::new();
    for f in acked {
        let p = support::read_part10(f).unwrap();
        want.insert(
            p.sop_instance_uid.clone(),
            (f.clone(), support::sha256_hex(&p.dataset)),
        );
    }
    let out = tempfile::tempdir().unwrap();
    for s in study_uids(acked) {
        assert_ok(
            &node.export(&["--study", &s], out.path()),
            &format!("export --study {s}"),
        );
    }
    let got: BTreeMap<String, String> = support::files_under(out.path())
        .iter()
        .map(|f| {
            let p = support::read_part10(f).unwrap();
            (p.sop_instance_uid.clone(), support::sha256_hex(&p.dataset))
        })
        .collect();
    for (uid, (file, digest)) in &want {
        assert_eq!(
            got.get(uid),
            Some(digest),
            "acknowledged instance {uid} ({}) is not exported byte for byte",
            file.display()
        );
    }
}

/// The Study Instance UIDs of the files (read by pydicom in one process).
fn study_uids(files: &BTreeSet<PathBuf>) -> BTreeSet<String> {
    let list = tempfile::NamedTempFile::new().unwrap();
    let names: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
    std::fs::write(list.path(), names.join("\n")).unwrap();
    let out = Command::new("python3")
        .args([
            "-c",
            "import sys, pydicom\nfor p in open(sys.argv[1]).read().split('\\n'):\n    print(pydicom.dcmread(p, stop_before_pixels=True).StudyInstanceUID)",
        ])
        .arg(list.path())
        .output()
        .unwrap();
    assert_ok(&out, "reading Study Instance UIDs");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

#[test]
fn sigkill_during_parallel_ingest_loses_nothing_acknowledged() {
    const KILLS: usize = 22;
    const ASSOCIATIONS: usize = 4;
    let mut rng = Rng::from_env_or_clock();
    let mut node = Node::start();
    let src = tempfile::tempdir().unwrap();
    let files = support::make_series(src.path(), "CT", 1200, 16, &["--studies", "3"]);
    let mut acked: BTreeSet<PathBuf> = BTreeSet::new();
    let mut mid_ingest_kills = 0;
    for round in 0..=KILLS {
        // Unacknowledged files first, then re-sends of acknowledged ones (duplicates go through
        // the whole pipeline too), so that every kill lands in a running ingest.
        let mut order: Vec<PathBuf> = files
            .iter()
            .filter(|f| !acked.contains(*f))
            .cloned()
            .collect();
        let start = rng.below(files.len() as u64) as usize;
        order.extend(
            files[start..]
                .iter()
                .chain(&files[..start])
                .filter(|f| acked.contains(*f))
                .cloned(),
        );
        let last = round == KILLS;
        // pynetdicom notices a dead peer only by its timeout: short while killing.
        let (running, rx) = senders(node.port, &order, ASSOCIATIONS, if last { 60 } else { 2 });
        let kill_after = 1 + rng.below(300) as usize;
        let mut seen = 0;
        let mut round_acked = 0;
        let mut round_failed = 0;
        let deadline = Instant::now() + Duration::from_secs(120);
        while let Ok((status, path)) =
            rx.recv_timeout(deadline.saturating_duration_since(Instant::now()))
        {
            seen += 1;
            if status == Some(0) {
                acked.insert(path);
                round_acked += 1;
            } else {
                round_failed += 1;
            }
            if !last && seen == kill_after {
                node.kill();
                break;
            }
        }
        for s in running {
            s.wait();
        }
        // What arrived after the kill (responses already in flight, and the failures).
        while let Ok((status, path)) = rx.try_recv() {
            if status == Some(0) {
                acked.insert(path);
                round_acked += 1;
            } else {
                round_failed += 1;
            }
        }
        if last {
            assert_eq!(
                round_failed,
                0,
                "the last round, without a kill, had failures\n{}",
                node.log()
            );
            break;
        }
        if round_acked > 0 && round_failed > 0 {
            mid_ingest_kills += 1;
        }
        node.restart();
        verify_intact(&node, &format!("after kill {}", round + 1));
    }
    assert!(
        mid_ingest_kills >= 20,
        "only {mid_ingest_kills} of {KILLS} kills hit a running ingest"
    );
    assert_eq!(
        acked.len(),
        files.len(),
        "every file acknowledged in the end"
    );
    assert_acknowledged_export_exactly(&node, &acked);
    verify_intact(&node, "at the end");
    eprintln!(
        "{mid_ingest_kills} kills mid-ingest; {} objects of interrupted C-STOREs deleted at restarts",
        node.log().matches("deleted a pixel object").count()
    );
}

#[test]
fn an_object_store_outage_mid_ingest_fails_with_a700_and_nothing_acknowledged_is_lost() {
    let root = tempfile::tempdir().unwrap();
    let mut server = S3Server::start(root.path());
    let node = s3_node(&server, "5");
    let (_src, files) = support::ct_series(400, 64);
    let (running, rx) = senders(node.port, &files, 2, 60);
    let mut acked = BTreeSet::new();
    let mut failed = Vec::new();
    let mut stopped_at = None;
    let mut first_a700 = None;
    let mut outage_checked = false;
    while let Ok((status, path)) = rx.recv_timeout(Duration::from_secs(120)) {
        match status {
            Some(0) => {
                acked.insert(path);
            }
            Some(0xA700) => {
                first_a700.get_or_insert_with(Instant::now);
                failed.push(path);
            }
            other => panic!(
                "unexpected status {other:?} for {}\n{}",
                path.display(),
                node.log()
            ),
        }
        if acked.len() == 50 && stopped_at.is_none() {
            server.stop();
            stopped_at = Some(Instant::now());
        }
        if failed.len() == 3 && !outage_checked {
            // Down: the node still answers C-ECHO and C-FIND from the ledger.
            assert_ok(&node.echoscu(), "echoscu while the object store is down");
            let qdir = tempfile::tempdir().unwrap();
            let find = Scu::findscu()
                .args(["-S", "-X"])
                .out_dir(qdir.path())
                .level("STUDY")
                .key("StudyInstanceUID")
                .run(node.port);
            assert_ok(&find, "findscu while the object store is down");
            assert_eq!(
                support::files_under(qdir.path()).len(),
                1,
                "one study found"
            );
            server.restart();
            outage_checked = true;
        }
    }
    for s in running {
        s.wait();
    }
    let stopped_at = stopped_at.expect("the store was stopped");
    let first_a700 = first_a700.expect("C-STOREs failed while the store was down");
    assert!(outage_checked);
    // store.timeout_secs = 5 bounds every attempt and its retries.
    let took = first_a700.duration_since(stopped_at);
    assert!(took < Duration::from_secs(12), "first A700 after {took:?}");
    assert_eq!(acked.len() + failed.len(), files.len());
    // Once the store is back, what failed is sent again and stored.
    let again = node.send_exact(&failed);
    assert!(
        again.iter().all(|(s, _)| *s == Some(0)),
        "{again:?}\n{}",
        node.log()
    );
    acked.extend(failed);
    assert_acknowledged_export_exactly(&node, &acked);
    verify_intact(&node, "after the outage");
}

/// Sends a C-STORE-RQ command and the first part of a data set on a raw association, and never
/// finishes it: a C-STORE in flight.
fn start_a_stalled_store(port: u16, file: &Path) -> TcpStream {
    let mut s = crate::network::associate(port, 16384);
    let p = support::read_part10(file).unwrap();
    let command = crate::network::store_command(&p.sop_instance_uid);
    crate::network::pdv(&mut s, 1, true, true, &command);
    crate::network::pdv(&mut s, 1, false, false, &p.dataset[..p.dataset.len() / 2]);
    s
}

#[test]
fn sigterm_drains_in_flight_stores_then_aborts_the_rest() {
    let mut node = Node::start_with_env(&[("DICOMCHAIN__NODE__DRAIN_TIMEOUT_SECS", "3")]);
    let (_src, files) = support::ct_series(300, 64);
    let mut stalled = start_a_stalled_store(node.port, &files[0]);
    let (running, rx) = senders(node.port, &files[1..], 2, 10);
    let mut acked = BTreeSet::new();
    while acked.len() < 20 {
        let (status, path) = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("stores go on");
        if status == Some(0) {
            acked.insert(path);
        }
    }
    let term = Instant::now();
    node.signal("TERM");
    node.wait_exit_ok();
    let took = term.elapsed();
    for s in running {
        s.wait();
    }
    while let Ok((status, path)) = rx.try_recv() {
        if status == Some(0) {
            acked.insert(path);
        }
    }
    // The stalled C-STORE held the drain for the whole drain timeout, then was aborted.
    assert!(
        took >= Duration::from_millis(2500) && took < Duration::from_secs(15),
        "stopped after {took:?}\n{}",
        node.log()
    );
    stalled
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut rest = Vec::new();
    let _ = stalled.read_to_end(&mut rest);
    assert!(
        rest.is_empty() || rest[0] == 0x07,
        "the stalled association ends with A-ABORT or a close, got PDU {:#x}",
        rest[0]
    );
    assert!(node.log().contains("drain timeout"), "{}", node.log());
    node.restart();
    assert_acknowledged_export_exactly(&node, &acked);
    verify_intact(&node, "after the drain");
    // The unit gives the drain (30 s by default) and the forwarder's stop (10 s) room.
    let unit = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("systemd/dicomchain.service"),
    )
    .unwrap();
    let stop: u64 = unit
        .lines()
        .find_map(|l| l.strip_prefix("TimeoutStopSec="))
        .and_then(|v| v.trim().parse().ok())
        .expect("TimeoutStopSec in the unit");
    assert!(stop >= 30 + 10 + 5, "TimeoutStopSec={stop}");
}

#[test]
fn sixteen_associations_store_ten_thousand_instances() {
    let node = Node::start();
    let src = tempfile::tempdir().unwrap();
    let files = support::make_series(src.path(), "CT", 10_000, 32, &["--studies", "16"]);
    let started = Instant::now();
    let (running, rx) = senders(node.port, &files, 16, 120);
    let mut acked = BTreeSet::new();
    let mut failures = Vec::new();
    while let Ok((status, path)) = rx.recv_timeout(Duration::from_secs(300)) {
        if status == Some(0) {
            acked.insert(path);
        } else {
            failures.push((status, path));
        }
        if acked.len() + failures.len() == files.len() {
            break;
        }
    }
    for s in running {
        s.wait();
    }
    if !failures.is_empty() {
        // The node's log says which side stopped (an aborted association, a ledger request
        // that timed out, ...).
        let log = node.log();
        let lines: Vec<&str> = log.lines().collect();
        // Every line carries its association's span, so events are matched by their message.
        let words = [
            "WARN",
            "ERROR",
            "association accepted",
            "association released",
            "bort",
        ];
        let notable: Vec<&str> = lines
            .iter()
            .copied()
            .filter(|l| words.iter().any(|w| l.contains(w)))
            .collect();
        panic!(
            "{} failed: {:?}\nnode log, {} lines; warnings, errors and association events (last 60 of {}):\n{}",
            failures.len(),
            &failures[..failures.len().min(5)],
            lines.len(),
            notable.len(),
            notable[notable.len().saturating_sub(60)..].join("\n")
        );
    }
    assert_eq!(acked.len(), files.len());
    let rss = support::peak_rss_mib(node.pid().unwrap());
    eprintln!(
        "16 associations, {} instances in {:.1} s; node peak RSS {rss} MiB",
        files.len(),
        started.elapsed().as_secs_f64()
    );
    assert!(rss < 256, "peak RSS {rss} MiB");
    let entries = node.run(&["verify", "--ledger-only"]);
    assert_ok(&entries, "verify --ledger-only");
    // Every instance is on the ledger: one export per study, all there.
    assert_acknowledged_export_exactly(&node, &acked);
}

#[test]
fn a_connection_beyond_the_association_limit_is_rejected_transiently() {
    let node = Node::start_with_env(&[
        ("DICOMCHAIN__NODE__MAX_ASSOCIATIONS", "2"),
        // Both held associations come from one unknown AE title on one address.
        ("DICOMCHAIN__NODE__MAX_ASSOCIATIONS_PER_AE", "2"),
        ("DICOMCHAIN__NODE__MAX_UNKNOWN_ASSOCIATIONS", "2"),
        ("DICOMCHAIN__NODE__ARTIM_TIMEOUT_SECS", "2"),
        ("DICOMCHAIN__NODE__IDLE_TIMEOUT_SECS", "10"),
    ]);
    let held: Vec<TcpStream> = (0..2)
        .map(|_| crate::network::associate(node.port, 16384))
        .collect();
    // The third gets A-ASSOCIATE-RJ at once: result 2 (transient), source 3 (service provider,
    // presentation), reason 2 (local limit exceeded) — not a hang in the backlog.
    let started = Instant::now();
    let out = node.echoscu();
    assert!(!out.status.success());
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    let text =
        String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("Association Rejected") || text.contains("rejected"),
        "{text}"
    );
    let rj = crate::network::request_association(node.port);
    assert_eq!(rj[0], 0x03, "A-ASSOCIATE-RJ");
    assert_eq!(
        &rj[7..10],
        &[2, 3, 2],
        "transient, presentation service provider, local limit"
    );
    // A connection that never sends its request is closed after the ARTIM timeout.
    let mut silent = TcpStream::connect(("127.0.0.1", node.port)).unwrap();
    silent
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let started = Instant::now();
    let mut buf = Vec::new();
    let _ = silent.read_to_end(&mut buf);
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(1500) && waited < Duration::from_secs(8),
        "ARTIM closed after {waited:?}"
    );
    // The two held associations are idle: aborted after the idle timeout, freeing their slots.
    for mut s in held {
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut header = [0u8; 1];
        let n = s.read(&mut header).unwrap_or(0);
        assert!(
            n == 0 || header[0] == 0x07,
            "idle association ended with {:#x}",
            header[0]
        );
    }
    assert_ok(&node.echoscu(), "echoscu once the slots are free");
    let _ = std::io::stdout().flush();
}
