//! Issue 23, items 1 and 3, as the attack was made: connections that never send a byte, trickle
//! one byte every 4 s or send half an A-ASSOCIATE-RQ, re-opened when closed, from several source
//! addresses (127.0.0.2–9: still loopback) and to both ports; a known AE title holding every
//! association it can get; and a flood of rejected associations. Known peers must get in every
//! time, at once, and the ledger may grow by only a few entries per source.

use std::io::{Read, Write};
use std::net::{IpAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dicom_ul::pdu::{AssociationRQ, Pdu, PresentationContextProposed, UserVariableItem};

use crate::support::{self, Node, Scu, AE};

/// An A-ASSOCIATE-RQ for Verification from `calling`.
fn association_rq(calling: &str) -> Vec<u8> {
    let rq = Pdu::AssociationRQ(AssociationRQ {
        protocol_version: 1,
        calling_ae_title: calling.into(),
        called_ae_title: AE.into(),
        application_context_name: "1.2.840.10008.3.1.1.1".into(),
        presentation_contexts: vec![PresentationContextProposed {
            id: 1,
            abstract_syntax: "1.2.840.10008.1.1".into(),
            transfer_syntaxes: vec!["1.2.840.10008.1.2".into()],
        }],
        user_variables: vec![UserVariableItem::MaxLength(16384)],
    });
    let mut buf = Vec::new();
    dicom_ul::write_pdu(&mut buf, &rq).unwrap();
    buf
}

#[derive(Clone, Copy)]
enum Misbehaviour {
    Silent,
    Trickle,
    HalfRequest,
}

/// Holds one misbehaving connection open, re-opening it whenever the node closes it, until
/// `stop`. Counts the re-openings.
async fn misbehave(
    from: IpAddr,
    port: u16,
    how: Misbehaviour,
    stop: Arc<AtomicBool>,
    reopened: Arc<AtomicU64>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rq = association_rq("INTRUDER");
    while !stop.load(Ordering::Relaxed) {
        let Ok(mut s) = support::connect_from(from, port).await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        if let Misbehaviour::HalfRequest = how {
            let _ = s.write_all(&rq[..rq.len() / 2]).await;
        }
        let mut sent = 0;
        let mut buf = [0u8; 64];
        loop {
            if stop.load(Ordering::Relaxed) {
                return;
            }
            // Wait up to 4 s for the node to close us, then (trickling) send one more byte.
            match tokio::time::timeout(Duration::from_secs(4), s.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => break,
                Ok(Ok(_)) => {}
                Err(_) => {
                    if let Misbehaviour::Trickle = how {
                        if sent < rq.len() - 1 && s.write_all(&rq[sent..sent + 1]).await.is_err() {
                            break;
                        }
                        sent += 1;
                    }
                }
            }
        }
        reopened.fetch_add(1, Ordering::Relaxed);
        // The attack re-opens at once; a short pause keeps a closed port from spinning.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Opens and holds as many associations of `calling` as the node accepts (up to `max`).
fn hold_associations(port: u16, calling: &str, max: usize) -> Vec<TcpStream> {
    hold_associations_from("127.0.0.1".parse().unwrap(), port, calling, max)
}

/// [`hold_associations`] from the loopback address `from`.
fn hold_associations_from(from: IpAddr, port: u16, calling: &str, max: usize) -> Vec<TcpStream> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut held = Vec::new();
    for _ in 0..max {
        let s = rt
            .block_on(support::connect_from(from, port))
            .unwrap()
            .into_std()
            .unwrap();
        s.set_nonblocking(false).unwrap();
        let mut s = s;
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(&association_rq(calling)).unwrap();
        let mut header = [0u8; 6];
        if s.read_exact(&mut header).is_err() {
            continue;
        }
        let len = u32::from_be_bytes(header[2..6].try_into().unwrap()) as usize;
        let mut body = vec![0u8; len];
        let _ = s.read_exact(&mut body);
        if header[0] == 0x02 {
            held.push(s);
        }
    }
    held
}

fn echo_as(port: u16, aet: &str) -> std::process::Output {
    Scu::echoscu()
        .calling(aet)
        .args(["-to", "5", "-ta", "5"])
        .run(port)
}

#[test]
fn idle_and_trickling_connections_do_not_lock_out_a_known_peer() {
    let keys = tempfile::tempdir().unwrap();
    let pki = crate::tls::Pki::new(keys.path());
    let peers = [
        support::peer("admin", "ADMIN", 1),
        support::peer("idler", "IDLER", 1),
        "[admin]\nlisten = \"127.0.0.1:0\"\n".into(),
    ]
    .concat();
    let node = Node::start_with(
        &[
            ("DICOMCHAIN__NODE__ALLOW_UNKNOWN_PEERS", "false"),
            ("DICOMCHAIN__NODE__TLS__LISTEN", "127.0.0.1:0"),
            ("DICOMCHAIN__NODE__TLS__CERT", &pki.path("server.crt")),
            ("DICOMCHAIN__NODE__TLS__KEY", &pki.path("server.key")),
        ],
        &peers,
    );
    let (tls_port, admin) = (node.tls_port(), node.admin_port());
    // A known AE title holds every association it can get and stays idle (the idle timeout is
    // 300 s): it gets its share, not every slot.
    let held = hold_associations(node.port, "IDLER", 64);
    assert!(
        !held.is_empty() && held.len() < 64,
        "one AE title holds {} of 64 associations",
        held.len()
    );

    // 200 misbehaving connections from eight addresses, a quarter of them to the TLS port.
    let stop = Arc::new(AtomicBool::new(false));
    let reopened = Arc::new(AtomicU64::new(0));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    for i in 0..200u32 {
        let from: IpAddr = format!("127.0.0.{}", 2 + i % 8).parse().unwrap();
        let port = if i % 4 == 3 { tls_port } else { node.port };
        let how = match i % 3 {
            0 => Misbehaviour::Silent,
            1 => Misbehaviour::Trickle,
            _ => Misbehaviour::HalfRequest,
        };
        rt.spawn(misbehave(from, port, how, stop.clone(), reopened.clone()));
    }
    std::thread::sleep(Duration::from_secs(2));

    // For 60 s, the known peer gets in every time, within 2 s.
    let started = Instant::now();
    let mut probes = 0;
    let mut slowest = Duration::ZERO;
    while started.elapsed() < Duration::from_secs(60) {
        let t = Instant::now();
        let out = echo_as(node.port, "ADMIN");
        let took = t.elapsed();
        slowest = slowest.max(took);
        assert!(
            out.status.success() && took < Duration::from_secs(2),
            "probe {probes} after {:?}: {} in {took:?}\n{}",
            started.elapsed(),
            if out.status.success() {
                "succeeded"
            } else {
                "failed"
            },
            support::output_text(&out)
        );
        probes += 1;
        std::thread::sleep(Duration::from_millis(500));
    }
    stop.store(true, Ordering::Relaxed);
    rt.shutdown_timeout(Duration::from_secs(1));
    assert!(probes >= 30, "{probes} probes");
    // The attack really ran: the node kept closing the misbehaving connections (ARTIM, the
    // pending pool's evictions), and they kept coming back.
    assert!(
        reopened.load(Ordering::Relaxed) >= 200,
        "only {} re-openings",
        reopened.load(Ordering::Relaxed)
    );
    let (status, metrics) = support::http_get(admin, "/metrics");
    assert_eq!(status, 200, "{metrics}");
    let dropped = metrics
        .lines()
        .find(|l| l.starts_with("dicomchain_connections_dropped_total "))
        .and_then(|l| l.split(' ').nth(1)?.parse::<u64>().ok())
        .unwrap_or(0);
    assert!(dropped >= 200, "{dropped} connections dropped\n{metrics}");
    println!(
        "{probes} probes, slowest {slowest:?}, {} re-openings",
        reopened.load(Ordering::Relaxed)
    );
    drop(held);
}

#[test]
fn a_flood_of_rejected_associations_adds_a_few_entries_per_source() {
    let mut node = Node::start_with(
        &[("DICOMCHAIN__NODE__ALLOW_UNKNOWN_PEERS", "false")],
        &support::peer("admin", "ADMIN", 1),
    );
    let port = node.port;
    let sources: Vec<IpAddr> = (2..6)
        .map(|i| format!("127.0.0.{i}").parse().unwrap())
        .collect();
    let flood = Duration::from_secs(10);
    let started = Instant::now();
    // Each source: one unknown AE title's association requests, back to back.
    let threads: Vec<_> = sources
        .iter()
        .map(|&from| {
            std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(async move {
                    use tokio::io::{AsyncReadExt, AsyncWriteExt};
                    let rq = association_rq("INTRUDER");
                    let (mut rejected, mut closed) = (0u64, 0u64);
                    while started.elapsed() < flood {
                        let Ok(mut s) = support::connect_from(from, port).await else {
                            continue;
                        };
                        let _ = s.write_all(&rq).await;
                        let mut header = [0u8; 1];
                        match tokio::time::timeout(Duration::from_secs(5), s.read(&mut header))
                            .await
                        {
                            Ok(Ok(1)) if header[0] == 0x03 => rejected += 1,
                            Ok(Ok(1)) => {
                                panic!("PDU type {:#x} for an unknown AE title", header[0])
                            }
                            _ => closed += 1,
                        }
                    }
                    (rejected, closed)
                })
            })
        })
        .collect();
    let results: Vec<(u64, u64)> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    // Known peers were never affected by the flood's source addresses.
    support::assert_ok(
        &echo_as(port, "ADMIN"),
        "echoscu -aet ADMIN after the flood",
    );
    node.stop();

    let out = node.run(&["audit", "--json"]);
    support::assert_ok(&out, "dicomchain audit --json");
    let events: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let secs = flood.as_secs_f64();
    for (from, (rejected, closed)) in sources.iter().zip(&results) {
        let from = from.to_string();
        let entries: Vec<&serde_json::Value> = events
            .iter()
            .filter(|e| {
                e["event_id"] == 110114
                    && e["outcome"] == 1
                    && e["peer"]
                        .as_str()
                        .is_some_and(|p| p == from || p.starts_with(&format!("{from}:")))
            })
            .collect();
        // The ledger: the first rejection on its own, then one summary (the window is 60 s,
        // and the node wrote what was pending when it stopped).
        assert!(
            (1..=2).contains(&entries.len()),
            "{from}: {} entries for {rejected} rejections:\n{entries:#?}",
            entries.len()
        );
        // Nothing is lost from the count: the summary accounts for every rejection after the
        // first.
        let summed: u64 = entries
            .iter()
            .map(|e| e["count"].as_u64().unwrap_or(0))
            .sum();
        assert_eq!(summed + 1, *rejected, "{from}: {entries:#?}");
        // The rate limit (100 connections/s, bursts of 200) closed the rest unanswered.
        assert!(
            (*rejected as f64) <= 200.0 + 100.0 * (secs + 1.0),
            "{from}: {rejected} rejected in {secs} s"
        );
        assert!(
            *closed > 0,
            "{from}: the rate limit never closed a connection"
        );
    }
    // No entry carries more than the source's summary: a handful in all.
    let all_rejections = events
        .iter()
        .filter(|e| e["event_id"] == 110114 && e["outcome"] == 1)
        .count();
    assert!(
        all_rejections <= 2 * sources.len(),
        "{all_rejections} rejection entries"
    );
}

/// AE titles are not authentication: someone else using a known peer's title could hold all of
/// that title's associations, open and silent. Idle past `reclaim_idle_secs`, they give their
/// place to the next request over the cap, which then gets in.
#[test]
fn associations_held_idle_under_a_known_title_give_way_to_the_real_peer() {
    let node = Node::start_with(
        &[
            ("DICOMCHAIN__NODE__ALLOW_UNKNOWN_PEERS", "false"),
            ("DICOMCHAIN__NODE__MAX_ASSOCIATIONS_PER_AE", "4"),
            ("DICOMCHAIN__NODE__RECLAIM_IDLE_SECS", "2"),
        ],
        &support::peer("admin", "ADMIN", 1),
    );
    let mut held = hold_associations_from("127.0.0.2".parse().unwrap(), node.port, "ADMIN", 4);
    assert_eq!(held.len(), 4);
    // At once, the cap holds: they are not idle long enough to give way.
    let out = echo_as(node.port, "ADMIN");
    assert!(!out.status.success(), "{}", support::output_text(&out));
    std::thread::sleep(Duration::from_millis(2500));
    support::assert_ok(
        &echo_as(node.port, "ADMIN"),
        "echoscu -aet ADMIN once they idled 2 s",
    );
    // Exactly one of them was ended with A-ABORT to make room.
    let mut aborted = 0;
    for s in &mut held {
        s.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        let mut b = [0u8; 1];
        if matches!(s.read(&mut b), Ok(1) if b[0] == 0x07) {
            aborted += 1;
        }
    }
    assert_eq!(aborted, 1);
    assert!(
        node.log().contains("idle while its place was needed"),
        "{}",
        node.log()
    );
}
