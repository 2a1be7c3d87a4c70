//! A bad disk against the ledger: one flipped byte in RocksDB's write-ahead log after a crash,
//! and one in a table file. Neither may roll the signed log back, delete an acknowledged
//! object, or go unreported.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::dcmtk::getscu_patient;
use crate::support::{self, assert_ok, Node, Scu};

/// The newest signed checkpoint the CLI prints, and its size.
fn checkpoint(node: &Node) -> Option<(String, u64)> {
    let out = node.run(&["checkpoint"]);
    if !out.status.success() {
        return None;
    }
    let note = String::from_utf8(out.stdout).unwrap();
    let size = note.lines().nth(1)?.parse().ok()?;
    Some((note, size))
}

/// Waits until the newest checkpoint covers at least `min` entries and has stopped growing.
fn settled_checkpoint(node: &Node, min: u64) -> (String, u64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut last = None;
    loop {
        let now = checkpoint(node).filter(|(_, s)| *s >= min);
        match (&last, &now) {
            (Some((_, a)), Some((_, b))) if a == b => return now.unwrap(),
            _ => last = now,
        }
        assert!(
            Instant::now() < deadline,
            "no settled checkpoint of {min}:\n{}",
            node.log()
        );
        std::thread::sleep(Duration::from_millis(1500));
    }
}

fn objects(node: &Node) -> BTreeSet<PathBuf> {
    let root = node.dir.join("objects");
    support::files_under(&root)
        .into_iter()
        .filter(|p| !p.strip_prefix(&root).unwrap().starts_with("tmp"))
        .collect()
}

fn copy_tree(from: &Path, to: &Path) {
    let _ = std::fs::remove_dir_all(to);
    let st = Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()
        .unwrap();
    assert!(st.success(), "cp -a {} {}", from.display(), to.display());
}

/// The state a node leaves on disk: ledger, checkpoint file, objects.
const STATE: [&str; 3] = ["ledger", "ledger.checkpoint", "objects"];

fn snapshot(node: &Node, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for name in STATE {
        if node.dir.join(name).exists() {
            copy_tree(&node.dir.join(name), &to.join(name));
        }
    }
}

fn restore(node: &Node, from: &Path) {
    for name in STATE {
        let _ = std::fs::remove_dir_all(node.dir.join(name));
        let _ = std::fs::remove_file(node.dir.join(name));
        if from.join(name).exists() {
            copy_tree(&from.join(name), &node.dir.join(name));
        }
    }
}

/// XORs one byte of `file` at `fraction` of its length.
fn flip(file: &Path, fraction: f64) -> u64 {
    let mut bytes = std::fs::read(file).unwrap();
    assert!(!bytes.is_empty(), "{} is empty", file.display());
    let at = ((bytes.len() as f64 * fraction) as usize).min(bytes.len() - 1);
    bytes[at] ^= 0x5a;
    std::fs::write(file, bytes).unwrap();
    at as u64
}

/// The newest (highest-numbered) file of the ledger directory ending in `ext`, or the largest.
fn ledger_file(node: &Node, ext: &str, largest: bool) -> PathBuf {
    let mut files: Vec<PathBuf> = std::fs::read_dir(node.dir.join("ledger"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == ext))
        .collect();
    if largest {
        files.sort_by_key(|p| std::fs::metadata(p).unwrap().len());
    } else {
        files.sort();
    }
    files
        .pop()
        .unwrap_or_else(|| panic!("no *.{ext} in the ledger"))
}

/// Runs `serve` outside the harness: `Ok(child)` once it listens, `Err(log)` if it exits.
fn try_serve(node: &Node, log: &Path) -> Result<std::process::Child, (i32, String)> {
    let mut child = node
        .command()
        .arg("serve")
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if text.contains("listening") {
            return Ok(child);
        }
        if let Some(status) = child.try_wait().unwrap() {
            return Err((status.code().unwrap_or(-1), text));
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("node neither started nor exited:\n{text}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Runs `serve` as [`try_serve`] does, logging to `log` in the node's directory; the node must
/// refuse to start (exit with a failure): what it said.
fn refused_start(node: &Node, log: &str) -> String {
    let (code, text) = try_serve(node, &node.dir.join(log))
        .map(|_| ())
        .unwrap_err();
    assert_ne!(code, 0);
    text
}

fn verify(node: &Node, extra: &[&str]) -> (i32, String) {
    let out = node.run(&[&["verify"], extra].concat());
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// `verify --ledger-only --checkpoint SAVED`: the ledger held to a checkpoint saved earlier.
fn verify_against(node: &Node, saved: &Path) -> (i32, String) {
    verify(
        node,
        &["--ledger-only", "--checkpoint", saved.to_str().unwrap()],
    )
}

/// The attack of issue 23, item 2: 20 instances stored and acknowledged, a checkpoint signed,
/// kill -9, one byte flipped in the newest write-ahead log, at several offsets. Each time the
/// node refuses to start (saying what to do) or starts with every acknowledged instance; no
/// object is deleted, and no checkpoint that disagrees with the one signed before is signed.
/// Then the operator's way out: accepting the rollback keeps every object, and verify holds
/// the ledger to the checkpoint saved before.
#[test]
fn a_flipped_byte_in_the_write_ahead_log_never_rolls_the_ledger_back() {
    let mut node = Node::checkpointing();
    let (_src, files) = support::ct_series(20, 32);
    assert_ok(&node.storescu(&[], &files), "storescu");
    let uids: Vec<String> = files
        .iter()
        .map(|f| support::read_part10(f).unwrap().sop_instance_uid)
        .collect();
    // An association record and 20 stored instances at least.
    let (note, signed) = settled_checkpoint(&node, 21);
    let saved = node.dir.join("saved.checkpoint");
    std::fs::write(&saved, &note).unwrap();
    node.kill();
    let stored = objects(&node);
    assert_eq!(stored.len(), 20);
    let snap = tempfile::tempdir().unwrap();
    snapshot(&node, snap.path());

    let mut refused = 0;
    for (i, fraction) in [0.2, 0.5, 0.8].into_iter().enumerate() {
        restore(&node, snap.path());
        let wal = ledger_file(&node, "log", false);
        let at = flip(&wal, fraction);
        let log = node.dir.join(format!("flip-{i}.log"));
        match try_serve(&node, &log) {
            Err((code, text)) => {
                eprintln!("byte {at} of {}: refused", wal.display());
                refused += 1;
                assert_ne!(code, 0, "{text}");
                assert!(
                    text.contains("accept-rollback") && text.contains("was not opened"),
                    "byte {at} of {}: the refusal says what to do:\n{text}",
                    wal.display()
                );
                assert!(!text.contains("reconciled"), "{text}");
            }
            Ok(mut child) => {
                eprintln!("byte {at} of {}: started", wal.display());
                // Started: then with everything it acknowledged and signed.
                let out = tempfile::tempdir().unwrap();
                let lost: Vec<&String> = uids
                    .iter()
                    .filter(|uid| {
                        !node
                            .export(&["--instance", uid], out.path())
                            .status
                            .success()
                    })
                    .collect();
                let _ = child.kill();
                let _ = child.wait();
                assert!(
                    lost.is_empty(),
                    "byte {at} of {}: {} acknowledged instances lost\n{}",
                    wal.display(),
                    lost.len(),
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
                let (code, text) = verify_against(&node, &saved);
                assert_eq!(code, 0, "byte {at}: {text}");
            }
        }
        assert_eq!(
            objects(&node),
            stored,
            "byte {at} of {}: objects deleted\n{}",
            wal.display(),
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    }
    assert!(refused > 0, "no flip was even noticed");

    // The operator accepts the loss of the first flip: every object stays (the ones of lost
    // entries as orphans), verify holds the ledger to the saved checkpoint and names the
    // rollback, and the alert is on the trail.
    restore(&node, snap.path());
    flip(&ledger_file(&node, "log", false), 0.5);
    let out = node.run(&["ledger", "accept-rollback"]);
    assert_ok(&out, "ledger accept-rollback");
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(said.contains("signed entries given up"), "{said}");
    let log = node.dir.join("accepted.log");
    let mut child = try_serve(&node, &log).unwrap_or_else(|(c, t)| panic!("{c}: {t}"));
    std::thread::sleep(Duration::from_secs(2));
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(
        objects(&node),
        stored,
        "{}",
        std::fs::read_to_string(&log).unwrap()
    );
    let (code, text) = verify_against(&node, &saved);
    assert_eq!(code, 1, "{text}");
    assert!(
        text.contains(&format!("signed for {signed} entries")) && text.contains("rolled back"),
        "{text}"
    );
    let trail = node.run(&["audit", "--event", "110113"]);
    assert!(
        String::from_utf8_lossy(&trail.stdout).contains("rollback accepted"),
        "{}",
        String::from_utf8_lossy(&trail.stdout)
    );
}

/// A restored older copy of the ledger (every table file intact, the log clean) is a rollback
/// RocksDB cannot see: the checkpoint file beside it refuses it, and `verify --checkpoint`
/// finds it with a checkpoint saved earlier.
#[test]
fn a_ledger_older_than_its_checkpoint_file_is_refused() {
    let mut node = Node::checkpointing();
    let (_src, files) = support::ct_series(10, 32);
    assert_ok(&node.storescu(&[], &files[..5]), "storescu");
    node.stop();
    let old = tempfile::tempdir().unwrap();
    copy_tree(&node.dir.join("ledger"), &old.path().join("ledger"));
    node.restart();
    assert_ok(&node.storescu(&[], &files[5..]), "storescu");
    let (note, _) = settled_checkpoint(&node, 12);
    let saved = node.dir.join("saved.checkpoint");
    std::fs::write(&saved, note).unwrap();
    node.stop();
    let stored = objects(&node);
    copy_tree(&old.path().join("ledger"), &node.dir.join("ledger"));
    let text = refused_start(&node, "old.log");
    assert!(
        text.contains("does not hold the checkpoint signed last")
            && text.contains("signed entries are gone")
            && text.contains("accept-rollback"),
        "{text}"
    );
    assert_eq!(objects(&node), stored);
    let (code, text) = verify_against(&node, &saved);
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("rolled back"), "{text}");
}

/// A node with its admin listener and 100 CT instances stored, restarted once so that the log's
/// contents are in table files: (node, admin port, the series).
fn node_with_table_files() -> (Node, u16, (tempfile::TempDir, Vec<PathBuf>)) {
    let mut node = Node::start_with_admin();
    let admin = node.admin_port();
    let series = support::ct_series(100, 32);
    assert_ok(&node.storescu(&[], &series.1), "storescu");
    node.restart();
    (node, admin, series)
}

/// Issue 23, item 5: one byte changed in a table file. verify names the damage (exit 1) and
/// checks everything else it can read; the node records a security alert, logs an error and
/// reports the damage on /health.
#[test]
fn a_damaged_table_file_is_reported_by_verify_the_log_the_trail_and_health() {
    let (mut node, admin, _series) = node_with_table_files();
    node.stop();
    let sst = ledger_file(&node, "sst", true);
    flip(&sst, 0.5);

    let (code, text) = verify(&node, &["--ledger-only"]);
    assert_eq!(code, 1, "{text}");
    assert!(
        text.contains("DAMAGED ledger") && text.contains("Corruption"),
        "{text}"
    );
    // It went on: the entries were counted and checked.
    assert!(text.contains("verify: "), "{text}");
    assert!(!text.contains("could not run"), "{text}");

    node.restart();
    let deadline = Instant::now() + Duration::from_secs(30);
    let health = unhealthy_by(admin, deadline);
    assert!(health.contains("ledger damaged"), "{health}");
    assert!(
        node.log().contains("the ledger is damaged"),
        "{}",
        node.log()
    );
    // The committer records the alert at its next pass, about a second after the damage is
    // reported.
    let trail = loop {
        let trail = node.run(&["audit", "--event", "110113"]);
        let trail = String::from_utf8_lossy(&trail.stdout).into_owned();
        if trail.contains("ledger damaged") || Instant::now() > deadline {
            break trail;
        }
        std::thread::sleep(Duration::from_millis(250));
    };
    assert!(trail.contains("ledger damaged"), "{trail}");
}

/// Polls /health on the admin port until it answers 503, by `deadline`: the body.
fn unhealthy_by(admin: u16, deadline: Instant) -> String {
    loop {
        let (status, body) = support::http_get(admin, "/health");
        if status == 503 {
            return body;
        }
        assert!(Instant::now() < deadline, "/health: {status} {body}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// XORs one byte of `file` at `fraction` of its length where it lies, as a failing disk would
/// under a running node (which keeps the file open: a rewritten copy would be another file).
fn flip_in_place(file: &Path, fraction: f64) {
    use std::io::{Read, Seek, SeekFrom, Write};
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(file)
        .unwrap();
    let at = (f.metadata().unwrap().len() as f64 * fraction) as u64;
    let mut b = [0u8];
    f.seek(SeekFrom::Start(at)).unwrap();
    f.read_exact(&mut b).unwrap();
    f.seek(SeekFrom::Start(at)).unwrap();
    f.write_all(&[b[0] ^ 0x5a]).unwrap();
    f.sync_all().unwrap();
}

/// The largest table file of column family `cf`, from the table files RocksDB's own log (LOG,
/// LOG.old.*) says it created.
fn table_file_of(node: &Node, cf: &str) -> PathBuf {
    let dir = node.dir.join("ledger");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| support::file_name(p).starts_with("LOG"))
        .flat_map(|p| {
            std::fs::read_to_string(p)
                .unwrap_or_default()
                .lines()
                .filter(|l| {
                    l.contains("\"event\": \"table_file_creation\"")
                        && l.contains(&format!("\"cf_name\": \"{cf}\""))
                })
                .filter_map(|l| {
                    let n = l.split("\"file_number\": ").nth(1)?;
                    let n: u64 = n
                        .split(|c: char| !c.is_ascii_digit())
                        .next()?
                        .parse()
                        .ok()?;
                    Some(dir.join(format!("{n:06}.sst")))
                })
                .collect::<Vec<_>>()
        })
        .filter(|p| p.exists())
        .collect();
    files.sort_by_key(|p| std::fs::metadata(p).unwrap().len());
    files
        .pop()
        .unwrap_or_else(|| panic!("no table file of {cf} in {}", dir.display()))
}

/// The node's security alerts about damage to the ledger (110113 entries), as JSON.
fn damage_alerts(node: &Node) -> Vec<serde_json::Value> {
    node.security_alerts()
        .into_iter()
        .filter(|e| {
            e["detail"]
                .as_str()
                .is_some_and(|d| d.starts_with("ledger damaged"))
        })
        .collect()
}

/// Issue 23, item 5, while the node runs: a table block that goes bad after the read-back at
/// the start has passed it is first met by a query. The queries that need it fail (nothing
/// damaged is sent), and the damage is reported as the read-back reports it: /health 503
/// naming it, one error in the log and one security alert, however many queries meet it.
#[test]
fn a_table_file_damaged_while_the_node_runs_is_reported_once() {
    let (node, admin, (src, files)) = node_with_table_files();
    // The start wrote the log's contents into table files, then reads them all back.
    node.wait_for(30, "the read-back", || {
        node.log()
            .contains("every block's checksum intact")
            .then_some(())
    });
    assert_eq!(support::http_get(admin, "/health").0, 200);

    // The read-back passes blocks without caching them: the next query reads this one from
    // the file.
    let meta = table_file_of(&node, "meta");
    flip_in_place(&meta, 0.3);
    let get = |n: usize| {
        let out_dir = src.path().join(format!("got-{n}"));
        let out = getscu_patient(node.port, "PID0001", &out_dir);
        (
            support::files_under(&out_dir).len(),
            support::output_text(&out),
        )
    };
    let find = || {
        Scu::findscu()
            .arg("-S")
            .level("IMAGE")
            .key("PatientID=PID0001")
            .keys(["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"])
            .run(node.port)
    };
    let (got, text) = get(0);
    assert!(got < files.len(), "the damaged block was not read: {text}");

    let deadline = Instant::now() + Duration::from_secs(30);
    let health = unhealthy_by(admin, deadline);
    let name = support::file_name(&meta);
    assert!(
        health.contains("ledger damaged") && health.contains(&name),
        "{health}"
    );
    let alerts = loop {
        let alerts = damage_alerts(&node);
        if !alerts.is_empty() {
            break alerts;
        }
        assert!(Instant::now() < deadline, "no alert:\n{}", node.log());
        std::thread::sleep(Duration::from_millis(250));
    };
    assert!(
        alerts[0]["detail"].as_str().unwrap().contains(&name),
        "{alerts:?}"
    );

    // More queries meet the same damage: still one error in the log, one alert.
    for n in 1..4 {
        let (got, text) = get(n);
        assert!(got < files.len(), "{text}");
        let _ = find();
    }
    // The committer records alerts about once a second.
    std::thread::sleep(Duration::from_secs(3));
    let log = node.log();
    assert_eq!(log.matches("the ledger is damaged").count(), 1, "{log}");
    assert!(log.contains(&name), "{log}");
    let alerts = damage_alerts(&node);
    assert_eq!(alerts.len(), 1, "{alerts:?}");
}

/// The checkpoint file blocked for everyone, root included (modes do not stop root): the name
/// of its temporary file is taken by a directory.
fn block_checkpoint_file(node: &Node) -> PathBuf {
    let tmp = node.dir.join("ledger.checkpoint.tmp");
    std::fs::create_dir_all(tmp.join("x")).unwrap();
    tmp
}

/// A checkpoint file that cannot be written must not weaken the rollback protection silently:
/// while the node runs it stops signing (and says so) rather than sign a checkpoint the file does
/// not cover; a node whose file cannot be written refuses to start, naming it; once it can be
/// written again, checkpoints resume.
#[test]
fn an_unwritable_checkpoint_file_stops_signing_and_refuses_the_start() {
    let mut node = Node::checkpointing();
    let (_src, files) = support::ct_series(10, 32);
    assert_ok(&node.storescu(&[], &files[..5]), "storescu");
    let (note, signed) = settled_checkpoint(&node, 6);
    let file = node.dir.join("ledger.checkpoint");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), note);
    let blocked = block_checkpoint_file(&node);
    assert_ok(&node.storescu(&[], &files[5..]), "storescu");
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(
        checkpoint(&node).map(|(_, s)| s),
        Some(signed),
        "a checkpoint was signed that the file does not cover:\n{}",
        node.log()
    );
    assert_eq!(std::fs::read_to_string(&file).unwrap(), note);
    assert!(
        node.log().contains("the checkpoint file cannot be written"),
        "{}",
        node.log()
    );
    node.stop();
    let text = refused_start(&node, "blocked.log");
    assert!(
        text.contains("cannot write the checkpoint file")
            && text.contains(&*file.to_string_lossy()),
        "{text}"
    );
    std::fs::remove_dir_all(&blocked).unwrap();
    node.restart();
    let (_, now) = settled_checkpoint(&node, signed + 5);
    assert_eq!(
        std::fs::read_to_string(&file).unwrap(),
        checkpoint(&node).unwrap().0
    );
    assert!(now > signed);
}

/// A write-ahead log that disappears whole (or is cut exactly at a record boundary) has no
/// damaged record for absolute-consistency recovery to stop at. After acknowledged stores and
/// a signed checkpoint, kill -9 and the newest log deleted: the node refuses to start, and no
/// object is deleted. (RocksDB tracks only closed logs in its MANIFEST — see the ledger's unit
/// test for those —, so for the live one it is the checkpoint file that refuses.)
#[test]
fn a_deleted_write_ahead_log_is_refused() {
    let mut node = Node::checkpointing();
    let (_src, files) = support::ct_series(10, 32);
    assert_ok(&node.storescu(&[], &files), "storescu");
    settled_checkpoint(&node, 11);
    node.kill();
    let stored = objects(&node);
    assert_eq!(stored.len(), 10);
    let wal = ledger_file(&node, "log", false);
    std::fs::remove_file(&wal).unwrap();
    let text = refused_start(&node, "deleted.log");
    eprintln!("{} deleted: {text}", wal.display());
    assert!(text.contains("accept-rollback"), "{text}");
    assert!(!text.contains("reconciled"), "{text}");
    assert_eq!(objects(&node), stored);
}
