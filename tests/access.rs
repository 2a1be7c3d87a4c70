//! Access control by calling AE title and source address, seen from real clients: unknown AE
//! titles and wrong addresses get A-ASSOCIATE-RJ, operations without permission get 0124.

use std::process::Output;

use crate::support::output_text as text;
use crate::support::{self, assert_ok, Node, Scu, Storescp};

/// The Study Instance UID in the output of `dicomchain find`.
fn study_uid_in(found: &Output) -> String {
    support::study_uid_in(found).expect("the study UID in the match")
}

#[test]
fn unknown_aes_wrong_addresses_and_missing_permissions_are_refused() {
    let scp = Storescp::start();
    let peers = format!(
        r#"
[peers.modality]
ae_title = "SENDEXACT"
host = "127.0.0.1"
port = 1
permissions = ["echo"]
[peers.ct]
ae_title = "STORESCU"
host = "127.0.0.1"
port = 1
permissions = ["echo", "store"]
[peers.remote-viewer]
ae_title = "FINDSCU"
host = "127.0.0.1"
port = 1
allowed_addresses = ["10.9.9.0/24"]
[peers.workstation]
ae_title = "WS"
host = "127.0.0.1"
port = 1
permissions = ["find", "move", "get"]
allowed_addresses = ["127.0.0.0/8", "::1"]
[peers.archive]
ae_title = "STORESCP"
host = "127.0.0.1"
port = {}
permissions = ["echo"]
"#,
        scp.port
    );
    let node = Node::start_with(
        &[("DICOMCHAIN__NODE__ALLOW_UNKNOWN_PEERS", "false")],
        &peers,
    );
    let port = node.port;
    let (_src, files) = support::ct_series(3, 32);

    // Unknown calling AE titles: no association at all.
    let stranger = Scu::echoscu().calling("STRANGER").run(port);
    assert!(!stranger.status.success(), "{}", text(&stranger));
    assert!(
        text(&stranger).contains("Calling AE Title Not Recognized"),
        "{}",
        text(&stranger)
    );
    // A known one from an address it may not use.
    let viewer = Scu::findscu()
        .calling("FINDSCU")
        .arg("-S")
        .level("STUDY")
        .run(port);
    assert!(!viewer.status.success());
    assert!(
        text(&viewer).contains("Calling AE Title Not Recognized"),
        "{}",
        text(&viewer)
    );

    // SENDEXACT may only echo: its C-STOREs get 0124, nothing is stored.
    let res = node.send_exact(&files);
    assert!(
        res.iter().all(|(s, _)| *s == Some(0x0124)),
        "{res:?}\n{}",
        node.log()
    );
    // STORESCU may store.
    assert_ok(&node.storescu(&[], &files), "storescu as STORESCU");
    // ... but not query: C-FIND gets 0124.
    let find = node.client().calling("STORESCU").find_studies(&[]);
    assert_eq!(find.status.code(), Some(1), "{}", text(&find));
    assert!(text(&find).contains("final status 0124"), "{}", text(&find));

    // WS may find and move, but STORESCP may not receive moves: 0124, nothing sent.
    let ws = node.client().calling("WS");
    let found = ws.find_studies(&[]);
    assert_ok(&found, "find as WS");
    assert!(text(&found).contains("1 match(es)"), "{}", text(&found));
    let study_uid = study_uid_in(&found);
    let moved = ws.move_study("STORESCP", &study_uid);
    assert_eq!(moved.status.code(), Some(1), "{}", text(&moved));
    assert!(text(&moved).contains("status 0124"), "{}", text(&moved));
    assert!(scp.received().is_empty());
    // A destination that is no known peer at all stays A801 (Move Destination unknown).
    let nowhere = ws.move_study("NOWHERE", &study_uid);
    assert!(text(&nowhere).contains("status A801"), "{}", text(&nowhere));
    // Its C-ECHO is not permitted either (WS has no echo): 0124, the association stays up.
    let echo = ws.echo();
    assert!(!echo.status.success(), "{}", text(&echo));
    assert!(text(&echo).contains("0124"), "{}", text(&echo));
    let log = node.log();
    assert!(log.contains("operation refused by access control"), "{log}");
}

#[test]
fn grants_and_revocations_on_the_ledger_apply_at_once_even_mid_move() {
    let scp = Storescp::start();
    let peers = format!(
        r#"
[peers.ct]
ae_title = "CT1"
host = "127.0.0.1"
port = 1
permissions = ["echo"]
[peers.archive]
ae_title = "STORESCP"
host = "127.0.0.1"
port = {}
[peers.ws]
ae_title = "WS"
host = "127.0.0.1"
port = 1
permissions = ["find", "move"]
"#,
        scp.port
    );
    let mut node = Node::start_with(
        &[
            ("DICOMCHAIN__NODE__ALLOW_UNKNOWN_PEERS", "false"),
            ("DICOMCHAIN__ADMIN__LISTEN", "127.0.0.1:0"),
        ],
        &peers,
    );
    let target = node.target();
    let (_src, files) = support::ct_series(600, 128);
    let mut store_args = vec!["--aet", "CT1", "store", target.as_str()];
    let paths: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
    store_args.extend(paths.iter().map(String::as_str));

    // CT1 may only echo; a grant on the ledger lets it store at once.
    let refused = node.run(&store_args[..5]);
    assert_eq!(refused.status.code(), Some(1), "{}", text(&refused));
    let granted = node.run(&["grant", "CT1", "store"]);
    assert_ok(&granted, "dicomchain grant");
    assert!(
        text(&granted).contains("granted store CT1: ledger entry"),
        "{}",
        text(&granted)
    );
    assert_ok(&node.run(&store_args), "store after the grant");
    // A wrong token is refused by the admin API.
    let token = node.dir.join("var/admin-token");
    let good = std::fs::read_to_string(&token).unwrap();
    std::fs::write(&token, "0123456789abcdef0123456789abcdef").unwrap();
    let forged = node.run(&["revoke", "CT1", "store"]);
    assert_eq!(forged.status.code(), Some(2));
    assert!(text(&forged).contains("401"), "{}", text(&forged));
    std::fs::write(&token, good).unwrap();

    // WS moves the study to STORESCP; STORESCP loses `move` while it runs: the rest is not sent.
    let ws = node.client().calling("WS");
    let found = ws.find_studies(&[]);
    assert_ok(&found, "find as WS");
    let study_uid = study_uid_in(&found);
    let mover = ws
        .move_study_command("STORESCP", &study_uid)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while scp.count() < 20 {
        assert!(
            std::time::Instant::now() < deadline,
            "the move did not start"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let revoked = node.run(&["revoke", "STORESCP", "move"]);
    assert_ok(&revoked, "dicomchain revoke");
    let moved = mover.wait_with_output().unwrap();
    assert_eq!(moved.status.code(), Some(1), "{}", text(&moved));
    assert!(text(&moved).contains("status 0124"), "{}", text(&moved));
    std::thread::sleep(std::time::Duration::from_millis(500));
    let delivered = scp.count();
    assert!(
        (20..files.len()).contains(&delivered),
        "{delivered} of {} delivered after the revocation\n{}",
        files.len(),
        text(&moved)
    );
    // The next C-MOVE to STORESCP is refused outright.
    let again = ws.move_study("STORESCP", &study_uid);
    assert!(text(&again).contains("status 0124"), "{}", text(&again));
    assert_eq!(scp.count(), delivered);

    // `permissions` shows the effective rules and the ledger entry of each change; they
    // survive a restart (rebuilt from the ledger), and verify accepts the entries.
    let perms = node.run(&["permissions"]);
    assert_ok(&perms, "dicomchain permissions");
    let shown = text(&perms);
    assert!(
        shown.contains("granted store") && shown.contains("revoked move"),
        "{shown}"
    );
    node.restart();
    let after = node.run(&["permissions", "--json"]);
    assert_ok(&after, "permissions after a restart");
    let v: serde_json::Value = serde_json::from_slice(&after.stdout).unwrap();
    let peer = |ae: &str| {
        v["peers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["ae"] == ae)
            .cloned()
            .unwrap()
    };
    assert_eq!(
        peer("CT1")["permissions"],
        serde_json::json!(["echo", "store"])
    );
    assert_eq!(
        peer("STORESCP")["permissions"],
        serde_json::json!(["echo", "store", "find", "get"])
    );
    assert_eq!(peer("STORESCP")["changes"][0]["grant"], false);
    assert_ok(
        &node.run(&["verify", "--ledger-only"]),
        "verify with grant and revoke entries",
    );
}

#[test]
fn the_audit_trail_records_every_operation_type_without_patient_data() {
    let scp = Storescp::start();
    let node = Node::start_with(
        &[("DICOMCHAIN__ADMIN__LISTEN", "127.0.0.1:0")],
        &support::peer("archive", "STORESCP", scp.port),
    );
    let port = node.port;
    let (_src, files) = support::ct_series(2, 32);

    assert_ok(&node.echoscu(), "echoscu");
    let wrong = Scu::echoscu().called("NOT-US").run(port);
    assert!(!wrong.status.success());
    assert_ok(&node.storescu(&[], &files), "storescu");
    let client = node.client();
    let found = client.find_studies(&["PatientName=DOE*"]);
    assert_ok(&found, "find");
    let study_uid = study_uid_in(&found);
    assert_ok(&client.move_study("STORESCP", &study_uid), "move");
    let got = tempfile::tempdir().unwrap();
    assert_ok(&client.get_study(got.path(), &study_uid), "get");
    assert_ok(&node.run(&["grant", "VIEWER", "find"]), "grant");
    // Export and verify run beside the node: their records come through the event spool.
    let exported = tempfile::tempdir().unwrap();
    assert_ok(
        &node.export(&["--study", &study_uid], exported.path()),
        "export",
    );
    assert_ok(&node.run(&["verify", "--ledger-only"]), "verify");

    // Audit records are written beside the operations: wait until the last one is there.
    let mut events: Vec<serde_json::Value> = Vec::new();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while std::time::Instant::now() < deadline {
        let out = node.run(&["audit", "--json"]);
        assert_ok(&out, "dicomchain audit --json");
        events = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        if events.iter().any(|e| e["event_id"] == 110101) {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let with = |id: u64, part: &str| -> Vec<&serde_json::Value> {
        events
            .iter()
            .filter(|e| e["event_id"] == id && e["detail"].as_str().unwrap_or("").contains(part))
            .collect()
    };
    let all = format!("{events:#?}");
    // Associations, accepted and rejected (User Authentication).
    assert!(
        with(110114, "association accepted")
            .iter()
            .any(|e| e["outcome"] == 0),
        "{all}"
    );
    assert!(
        with(110114, "association rejected")
            .iter()
            .any(|e| e["outcome"] == 1),
        "{all}"
    );
    // Stores (DICOM Instances Transferred), one per instance.
    assert_eq!(with(110104, "C-STORE received").len(), 2, "{all}");
    // The query: level, match count, a hash of the identifier, never its values.
    let q = with(110112, "C-FIND at STUDY level");
    assert_eq!(q.len(), 1, "{all}");
    assert_eq!(q[0]["count"], 1);
    assert_eq!(q[0]["identifier_sha256"].as_str().map(str::len), Some(64));
    // Retrievals: which destination, how many, the outcome.
    let m = with(110104, "C-MOVE to STORESCP at STUDY level: 2 completed");
    assert_eq!(m.len(), 1, "{all}");
    assert_eq!(
        (m[0]["peer"].as_str(), m[0]["outcome"].as_u64()),
        (Some("STORESCP"), Some(0))
    );
    assert_eq!(
        with(110104, "C-GET at STUDY level: 2 completed").len(),
        1,
        "{all}"
    );
    // The grant is a security alert.
    assert_eq!(with(110113, "permissions granted").len(), 1, "{all}");
    // Export (which study: only as a hash) and the verify run.
    let x = with(110106, "export of a study: 2 written to files, 0 failed");
    assert_eq!(x.len(), 1, "{all}");
    assert!(!x[0].to_string().contains(&study_uid), "{all}");
    assert_eq!(with(110101, "verify --ledger-only").len(), 1, "{all}");
    // No patient name or ID anywhere in the trail.
    let text = String::from_utf8_lossy(&node.run(&["audit"]).stdout).to_string();
    assert!(!text.contains("DOE") && !text.contains("PID0001"), "{text}");
    // Filters.
    let queries =
        String::from_utf8_lossy(&node.run(&["audit", "--event", "110112"]).stdout).to_string();
    assert_eq!(queries.lines().count(), 1, "{queries}");
    let to_scp =
        String::from_utf8_lossy(&node.run(&["audit", "--ae", "STORESCP"]).stdout).to_string();
    assert!(
        to_scp.lines().count() >= 1 && to_scp.lines().all(|l| l.contains("STORESCP")),
        "{to_scp}"
    );
    let future = node.run(&["audit", "--since", "2999-01-01"]);
    assert_ok(&future, "audit --since");
    assert!(future.stdout.is_empty());
    assert_ok(&node.run(&["verify"]), "verify with audit records");
}

#[test]
fn the_audit_trail_goes_to_syslog_as_rfc_5424() {
    let collector = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    collector
        .set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    let to = collector.local_addr().unwrap().to_string();
    let node = Node::start_with_env(&[("DICOMCHAIN__AUDIT__SYSLOG", &to)]);
    assert_ok(&node.echoscu(), "echoscu");
    let mut buf = [0u8; 4096];
    let n = collector.recv(&mut buf).expect("a syslog datagram");
    let msg = String::from_utf8_lossy(&buf[..n]).to_string();
    // Facility 13 (log audit), severity 5: <109>, version 1, then our structured data.
    assert!(msg.starts_with("<109>1 "), "{msg}");
    assert!(
        msg.contains(
            " 110114 [dicomchain@32473 seq=\"1\" event=\"User Authentication\" calling=\"ECHOSCU\""
        ),
        "{msg}"
    );
    assert!(msg.contains("association accepted"), "{msg}");
}
