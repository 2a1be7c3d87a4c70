//! Access control by calling AE title and source address, seen from real clients: unknown AE
//! titles and wrong addresses get A-ASSOCIATE-RJ, operations without permission get 0124.

use std::process::{Command, Output};

use crate::support::{self, assert_ok, Node, Storescp, AE};

fn dcmtk(tool: &str, aet: &str, port: u16, args: &[&str]) -> Output {
    Command::new(format!("/usr/bin/{tool}"))
        .args(["-aet", aet, "-aec", AE])
        .args(args)
        .args(["127.0.0.1", &port.to_string()])
        .output()
        .expect("run DCMTK")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
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
    let src = tempfile::tempdir().unwrap();
    let files = support::make_series(src.path(), "CT", 3, 32, &[]);

    // Unknown calling AE titles: no association at all.
    let stranger = dcmtk("echoscu", "STRANGER", port, &[]);
    assert!(!stranger.status.success(), "{}", text(&stranger));
    assert!(
        text(&stranger).contains("Calling AE Title Not Recognized"),
        "{}",
        text(&stranger)
    );
    // A known one from an address it may not use.
    let viewer = dcmtk(
        "findscu",
        "FINDSCU",
        port,
        &["-S", "-k", "QueryRetrieveLevel=STUDY"],
    );
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
    let stored = Command::new("/usr/bin/storescu")
        .args([
            "-aet",
            "STORESCU",
            "-aec",
            AE,
            "127.0.0.1",
            &port.to_string(),
        ])
        .args(&files)
        .output()
        .unwrap();
    assert_ok(&stored, "storescu as STORESCU");
    // ... but not query: C-FIND gets 0124.
    let find = Command::new(env!("CARGO_BIN_EXE_dicomchain"))
        .args([
            "--config",
            node.config_path().to_str().unwrap(),
            "--aet",
            "STORESCU",
        ])
        .args([
            "find",
            &format!("{AE}@127.0.0.1:{port}"),
            "-k",
            "QueryRetrieveLevel=STUDY",
            "-k",
            "StudyInstanceUID",
        ])
        .output()
        .unwrap();
    assert_eq!(find.status.code(), Some(1), "{}", text(&find));
    assert!(text(&find).contains("final status 0124"), "{}", text(&find));

    // WS may find and move, but STORESCP may not receive moves: 0124, nothing sent.
    let cli = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_dicomchain"))
            .args([
                "--config",
                node.config_path().to_str().unwrap(),
                "--aet",
                "WS",
            ])
            .args(args)
            .output()
            .unwrap()
    };
    let target = format!("{AE}@127.0.0.1:{port}");
    let found = cli(&[
        "find",
        &target,
        "-k",
        "QueryRetrieveLevel=STUDY",
        "-k",
        "StudyInstanceUID",
    ]);
    assert_ok(&found, "find as WS");
    assert!(text(&found).contains("1 match(es)"), "{}", text(&found));
    let study_uid = String::from_utf8_lossy(&found.stdout)
        .lines()
        .find_map(|l| {
            l.strip_prefix("(0020,000D) StudyInstanceUID = ")
                .map(str::to_string)
        })
        .expect("the study UID in the match");
    let moved = cli(&[
        "move",
        &target,
        "--dest",
        "STORESCP",
        "-k",
        "QueryRetrieveLevel=STUDY",
        "-k",
        &format!("StudyInstanceUID={study_uid}"),
    ]);
    assert_eq!(moved.status.code(), Some(1), "{}", text(&moved));
    assert!(text(&moved).contains("status 0124"), "{}", text(&moved));
    assert!(scp.received().is_empty());
    // Its C-ECHO is not permitted either (WS has no echo): 0124, the association stays up.
    let echo = cli(&["echo", &target]);
    assert!(!echo.status.success(), "{}", text(&echo));
    let log = node.log();
    assert!(log.contains("operation refused by access control"), "{log}");
}
