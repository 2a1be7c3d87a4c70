//! The audit trail as RFC 5424 syslog over UDP (`[audit] syslog`): a thread follows the ledger
//! and sends every new entry as one message, so a site's log collector (SIEM) sees the same
//! events as `dicomchain audit`, with their DICOM audit event IDs. It reads what is already
//! durable and never writes; a collector that is down loses datagrams, not ledger entries.

use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::ledger::trail::{atna, event_name};
use crate::ledger::{Entry, Event, Ledger};

/// Private enterprise number placeholder for our structured data (RFC 5424 §7.2.2: an SD-ID
/// with an "@" and a number is one's own); 32473 is the one RFC 5612 reserves for examples.
const SD_ID: &str = "dicomchain@32473";

/// How often the ledger is looked at for new entries.
const POLL: Duration = Duration::from_millis(250);

/// RFC 5424 PARAM-VALUE escaping: `"`, `\` and `]`.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace(']', "\\]")
}

/// One entry as an RFC 5424 message: facility 13 (log audit), severity notice (5), or warning
/// (4) for a failure outcome or a security alert.
pub fn format(e: &Entry, hostname: &str) -> String {
    let id = atna(e);
    let failed = e.status != 0 || e.event == Event::IntegrityFailure;
    let severity = if failed || id == crate::ledger::trail::id::SECURITY_ALERT {
        4
    } else {
        5
    };
    let pri = 13 * 8 + severity;
    let time = crate::util::time::timestamp(e.time_micros);
    let (detail, count) = match e.event {
        Event::Store => (format!("C-STORE received, version {}", e.version), 1),
        Event::Audit => (e.detail.clone(), e.subject_seq),
        _ => (e.detail.clone(), 0),
    };
    format!(
        "<{pri}>1 {time} {host} dicomchain {pid} {id} [{SD_ID} seq=\"{seq}\" event=\"{name}\" calling=\"{calling}\" peer=\"{peer}\" outcome=\"{outcome}\" count=\"{count}\"] {detail}",
        host = if hostname.is_empty() { "-" } else { hostname },
        pid = std::process::id(),
        seq = e.seq,
        name = escape(event_name(id)),
        calling = escape(e.calling_ae.trim()),
        peer = escape(e.peer.trim()),
        outcome = e.status,
    )
}

/// Follows the ledger from its current head and sends each new entry to `to`, until `stop`.
pub fn start(
    ledger: Ledger,
    to: SocketAddr,
    stop: Arc<AtomicBool>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    let socket = UdpSocket::bind(if to.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" })?;
    let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default();
    let mut next = ledger.head().ok().flatten().map_or(1, |(seq, _)| seq + 1);
    std::thread::Builder::new()
        .name("audit-syslog".into())
        .spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let head = ledger.head().ok().flatten().map_or(0, |(seq, _)| seq);
                while next <= head {
                    match ledger.entry(next) {
                        Ok(Some(e)) => {
                            if let Err(err) = socket.send_to(format(&e, &hostname).as_bytes(), to) {
                                tracing::debug!(error = %err, "syslog datagram not sent");
                            }
                        }
                        // Skipped rather than stalling the stream (verify reports the entry).
                        Ok(None) => tracing::warn!(seq = next, "ledger entry missing; not sent to syslog"),
                        Err(err) => tracing::warn!(seq = next, error = %err, "ledger entry not sent to syslog"),
                    }
                    next += 1;
                }
                std::thread::sleep(POLL);
            }
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_follow_rfc_5424() {
        let e = Entry {
            calling_ae: "CT1".into(),
            version: 110112,
            subject_seq: 3,
            peer: "10.0.0.1:4000".into(),
            detail: "C-FIND at STUDY level".into(),
            ..Entry::event(7, [0; 32], 1_700_000_000_123_456, Event::Audit)
        };
        let m = format(&e, "pacs");
        assert!(
            m.starts_with("<109>1 2023-11-14T22:13:20.123456Z pacs dicomchain "),
            "{m}"
        );
        assert!(m.contains(" 110112 [dicomchain@32473 seq=\"7\" event=\"Query\" calling=\"CT1\" peer=\"10.0.0.1:4000\" outcome=\"0\" count=\"3\"] C-FIND at STUDY level"), "{m}");
        let refused = Entry {
            status: 0x0124,
            peer: "a\"b]".into(),
            ..e
        };
        let m = format(&refused, "");
        assert!(
            m.starts_with("<108>1 ") && m.contains(" - dicomchain "),
            "{m}"
        );
        assert!(m.contains("peer=\"a\\\"b\\]\""), "{m}");
    }
}
