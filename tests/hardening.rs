//! The Low findings of the hardening issue (#23), each as the attack that found it, on loopback
//! and bounded in time: the admin listener blocked by idle connections and flooded with
//! refused requests, state files other users could read, log and audit lines forged through an
//! AE title, and integrity alerts that did not name who asked.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::support::dcmtk::getscu_patient;
use crate::support::{self, output_text as text, Node, AE};

/// A node with its admin listener: (node, admin port, token).
fn admin_node() -> (Node, u16, String) {
    let node = Node::start_with_admin();
    let admin = node.admin_port();
    let token = std::fs::read_to_string(node.dir.join("var/admin-token"))
        .unwrap()
        .trim()
        .to_string();
    (node, admin, token)
}

/// One GET from 127.0.0.1 that must be answered within `within`: its status line.
fn get_within(port: u16, path: &str, token: &str, within: Duration) -> Result<String, String> {
    let started = Instant::now();
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut s = TcpStream::connect_timeout(&addr, within).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(within)).unwrap();
    s.set_write_timeout(Some(within)).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| format!("write: {e}"))?;
    let mut answer = String::new();
    s.read_to_string(&mut answer)
        .map_err(|e| format!("no answer after {:?}: {e}", started.elapsed()))?;
    if started.elapsed() > within {
        return Err(format!("answered after {:?}", started.elapsed()));
    }
    Ok(answer.lines().next().unwrap_or("").to_string())
}

#[test]
fn the_admin_api_answers_its_operator_while_idle_connections_and_refused_requests_flood_it() {
    let (node, admin, token) = admin_node();
    let stop = Arc::new(AtomicBool::new(false));
    let refused = Arc::new(AtomicUsize::new(0));
    let attack = {
        let (stop, refused) = (stop.clone(), refused.clone());
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                let mut tasks = Vec::new();
                // 128 connections from 16 addresses that never send a byte, re-opened when
                // closed: twice what the listener holds. 127.0.0.1, the operator's own address,
                // is one of them (the admin listener is usually on loopback).
                for i in 0..128u8 {
                    let stop = stop.clone();
                    tasks.push(tokio::spawn(async move {
                        let from = IpAddr::from([127, 0, 0, 1 + i % 16]);
                        while !stop.load(Ordering::Relaxed) {
                            let Ok(mut s) = support::connect_from(from, admin).await else {
                                tokio::time::sleep(Duration::from_millis(20)).await;
                                continue;
                            };
                            let mut b = [0u8; 64];
                            while !stop.load(Ordering::Relaxed) {
                                match tokio::time::timeout(Duration::from_millis(200), s.read(&mut b)).await {
                                    Ok(Ok(0)) | Ok(Err(_)) => break,
                                    _ => {}
                                }
                            }
                        }
                    }));
                }
                // Requests without a token from 127.0.0.100, as fast as they are answered.
                for _ in 0..4 {
                    let (stop, refused) = (stop.clone(), refused.clone());
                    tasks.push(tokio::spawn(async move {
                        let from = IpAddr::from([127, 0, 0, 100]);
                        while !stop.load(Ordering::Relaxed) {
                            let Ok(mut s) = support::connect_from(from, admin).await else {
                                tokio::time::sleep(Duration::from_millis(20)).await;
                                continue;
                            };
                            let _ = s
                                .write_all(b"GET /v1/permissions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                                .await;
                            let mut answer = Vec::new();
                            let _ = tokio::time::timeout(Duration::from_secs(2), s.read_to_end(&mut answer)).await;
                            if answer.starts_with(b"HTTP/1.1 401") {
                                refused.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }));
                }
                for t in tasks {
                    let _ = t.await;
                }
            });
        })
    };
    // Let the attack take every slot it can.
    std::thread::sleep(Duration::from_secs(2));
    let mut failures = Vec::new();
    let probes = 20;
    for i in 0..probes {
        match get_within(admin, "/v1/permissions", &token, Duration::from_secs(2)) {
            Ok(status) if status.starts_with("HTTP/1.1 200") => {}
            Ok(status) => failures.push(format!("probe {i}: {status}")),
            Err(why) => failures.push(format!("probe {i}: {why}")),
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    stop.store(true, Ordering::Relaxed);
    attack.join().unwrap();
    assert!(
        failures.is_empty(),
        "{} of {probes} authenticated requests failed under the flood:\n{}\n{}",
        failures.len(),
        failures.join("\n"),
        node.log()
            .lines()
            .filter(|l| l.contains("admin connection closed"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    let refused = refused.load(Ordering::Relaxed);
    assert!(
        refused >= 100,
        "the flood got only {refused} answers: no attack"
    );
    let warnings = node
        .log()
        .lines()
        .filter(|l| l.contains("admin API request without a valid token"))
        .count();
    assert!(
        (1..=2).contains(&warnings),
        "{refused} refused requests from one address made {warnings} warning lines"
    );
}

/// Every file and directory under `dir` that group or others can access, with its mode.
fn open_to_others(dir: &Path) -> Vec<String> {
    let mut open = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(p) = stack.pop() {
        let Ok(meta) = std::fs::symlink_metadata(&p) else {
            continue;
        };
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            open.push(format!("{:o} {}", mode, p.display()));
        }
        if meta.is_dir() {
            stack.extend(std::fs::read_dir(&p).unwrap().flatten().map(|e| e.path()));
        }
    }
    open
}

#[test]
fn patient_data_and_keys_stay_private_under_a_loose_umask() {
    // The umask a shell or a unit usually gives: what the node inherits decides nothing now.
    // SAFETY: umask(2) swaps the process's creation mask; other tests only create files too.
    unsafe {
        libc::umask(0o022);
    }
    let (mut node, _admin, _token) = admin_node();
    let dir = tempfile::tempdir().unwrap();
    let files = support::make_series(&dir.path().join("ct"), "CT", 2, 16, &[]);
    support::assert_ok(&node.storescu(&[], &files), "storescu");
    node.stop();
    let state: Vec<_> = ["ledger", "objects", "var"]
        .iter()
        .map(|d| node.dir.join(d))
        .collect();
    let leaked: Vec<String> = state.iter().flat_map(|d| open_to_others(d)).collect();
    assert!(
        leaked.is_empty(),
        "readable by other users:\n{}",
        leaked.join("\n")
    );

    // A ledger directory an older version left open is closed at the next start, with a word.
    let ledger = node.dir.join("ledger");
    std::fs::set_permissions(&ledger, std::fs::Permissions::from_mode(0o755)).unwrap();
    node.restart();
    let mode = std::fs::metadata(&ledger).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700, "{:o}", mode);
    assert!(
        node.log()
            .contains("state directory was open to group or others"),
        "{}",
        node.log()
    );
    node.stop();

    // A key file others can read stops the start, naming the file, its mode and the fix.
    for key in [
        "var/master.key",
        "var/ledger-signing.key",
        "var/admin-token",
    ] {
        let path = node.dir.join(key);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let mut child = node
            .command()
            .arg("serve")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("the node started with {key} at mode 0644");
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let mut err = String::new();
        child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut err)
            .unwrap();
        assert!(!status.success(), "{key}: {err}");
        // The key paths are the default ones, relative to the node's directory.
        for part in [key.to_string(), "0644".into(), format!("chmod 600 {key}")] {
            assert!(err.contains(&part), "{key}: no {part:?} in:\n{err}");
        }
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    node.restart();
    assert_eq!(node.echoscu().status.code(), Some(0));
}

/// An A-ASSOCIATE-RQ (PS3.8 §9.3.2) for Verification with raw 16-byte AE title fields.
fn associate_rq(called: &[u8; 16], calling: &[u8; 16]) -> Vec<u8> {
    fn item(kind: u8, body: &[u8]) -> Vec<u8> {
        let mut v = vec![kind, 0];
        v.extend_from_slice(&(body.len() as u16).to_be_bytes());
        v.extend_from_slice(body);
        v
    }
    let mut pc = vec![1, 0, 0, 0];
    pc.extend(item(0x30, b"1.2.840.10008.1.1"));
    pc.extend(item(0x40, b"1.2.840.10008.1.2"));
    let mut user = item(0x51, &16384u32.to_be_bytes());
    user.extend(item(0x52, b"1.2.826.0.1.3680043.9.7433"));
    let mut body = vec![0, 1, 0, 0];
    body.extend_from_slice(called);
    body.extend_from_slice(calling);
    body.extend_from_slice(&[0; 32]);
    body.extend(item(0x10, b"1.2.840.10008.3.1.1.1"));
    body.extend(item(0x20, &pc));
    body.extend(item(0x50, &user));
    let mut pdu = vec![0x01, 0];
    pdu.extend_from_slice(&(body.len() as u32).to_be_bytes());
    pdu.extend(body);
    pdu
}

#[test]
fn an_ae_title_with_a_newline_is_rejected_and_forges_no_log_or_audit_line() {
    let node = Node::start();
    let mut called = [b' '; 16];
    called[..AE.len()].copy_from_slice(AE.as_bytes());
    let calling: &[u8; 16] = b"X\nFORGED-LINE-01";
    let mut s = TcpStream::connect(("127.0.0.1", node.port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(&associate_rq(&called, calling)).unwrap();
    let mut head = [0u8; 10];
    s.read_exact(&mut head).unwrap();
    // A-ASSOCIATE-RJ: rejected-permanent (1), service user (1), calling AE title not
    // recognized (3) (PS3.8 §9.3.4).
    assert_eq!(
        head[0], 0x03,
        "expected A-ASSOCIATE-RJ, got PDU type {:02X}",
        head[0]
    );
    assert_eq!(&head[7..10], &[1, 1, 3], "result, source, reason");
    drop(s);
    // The rejection is logged, escaped; no line of its own begins with the forged text.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !node.log().contains("FORGED-LINE-01") && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let log = node.log();
    assert!(log.contains("X\\nFORGED-LINE-01"), "{log}");
    assert!(
        !log.lines().any(|l| l.starts_with("FORGED")),
        "a forged log line:\n{log}"
    );
    // The audit trail: one line per event, each beginning with its sequence number.
    std::thread::sleep(Duration::from_secs(2));
    let audit = node.run(&["audit"]);
    support::assert_ok(&audit, "dicomchain audit");
    let trail = String::from_utf8_lossy(&audit.stdout).to_string();
    for line in trail.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        assert!(
            first.parse::<u64>().is_ok(),
            "a forged audit line {line:?} in:\n{trail}"
        );
    }
    // The admin API's grant takes AE titles under the same rule.
    let grant = node.run(&["grant", "X\nFORGED", "store"]);
    assert!(!grant.status.success(), "{}", text(&grant));
}

#[test]
fn an_integrity_alert_names_the_requester_its_address_and_a_failure() {
    let node = Node::start();
    let dir = tempfile::tempdir().unwrap();
    let files = support::make_series(&dir.path().join("ct"), "CT", 3, 64, &[]);
    support::assert_ok(&node.storescu(&[], &files), "storescu");
    // Alter one pixel object on disk.
    let objects = support::files_under(&node.dir.join("objects"));
    assert_eq!(objects.len(), 3);
    support::xor_byte(&objects[1], 100, 0xFF);
    let out_dir = dir.path().join("got");
    let get = getscu_patient(node.port, "PID0001", &out_dir);
    assert_eq!(
        support::files_under(&out_dir).len(),
        2,
        "the altered instance must not be sent: {}",
        text(&get)
    );
    // The security event reaches the ledger from the spool within a few seconds.
    let alert = node.wait_for(30, "an integrity alert", || {
        node.security_alerts().into_iter().find(|e| {
            e["detail"]
                .as_str()
                .is_some_and(|d| d.starts_with("integrity failure"))
        })
    });
    assert_eq!(alert["calling_ae"], "GETSCU", "{alert}");
    let peer = alert["peer"].as_str().unwrap_or("");
    assert!(peer.starts_with("127.0.0.1:"), "{alert}");
    assert_ne!(alert["outcome"], 0, "{alert}");
    assert!(
        alert["detail"]
            .as_str()
            .unwrap_or("")
            .contains("found by c-get"),
        "{alert}"
    );
    // And the text trail says the same on one line.
    let out = node.run(&["audit", "--event", "110113"]);
    let trail = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        trail
            .lines()
            .any(|l| l.contains("calling=GETSCU peer=127.0.0.1:")
                && !l.contains("outcome=success")
                && l.contains("integrity failure")),
        "{trail}"
    );
}
