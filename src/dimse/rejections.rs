//! Rejected associations on the audit trail, without letting a flood write the ledger.
//!
//! Every ledger entry is hash-chained and can never be pruned, so an unauthenticated peer must
//! not be able to add one per attempt. The first rejection from a source address in a window
//! (`WINDOW`) is recorded at once, as it always was; the ones after it in that window are only
//! counted, and [`Rejections::flush`] (run by the listener every few seconds) writes one summary
//! entry per source: how many, the first and last time, the reasons and the last calling AE
//! title. A flood thus adds at most two entries per source per window. The same decision keeps
//! the log to a line per source per window.
//!
//! A source is what [`admission::source`](super::admission::source) says: an IPv4 address or an
//! IPv6 /64. Bounded in memory: at most [`MAX_SOURCES`] addresses are tracked; beyond that, rejections
//! from new addresses are counted together under "other sources".

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

/// How long one source's rejections are summed up before they are written.
pub const WINDOW: Duration = Duration::from_secs(60);
/// Sources tracked at once.
pub const MAX_SOURCES: usize = 4096;

/// What to do with one rejection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Note {
    /// Record (and log) it on its own: the first from its source in this window.
    Record,
    /// Counted toward the source's next summary.
    Counted,
}

/// A summary due for the audit trail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    /// `None`: the addresses beyond [`MAX_SOURCES`], together.
    pub source: Option<IpAddr>,
    pub count: u64,
    pub first: SystemTime,
    pub last: SystemTime,
    /// Reasons and how often each was given.
    pub reasons: BTreeMap<String, u64>,
    pub last_calling_ae: String,
}

impl Summary {
    /// The entry's description (no patient data: reasons and an AE title).
    pub fn detail(&self) -> String {
        let reasons: Vec<String> = self
            .reasons
            .iter()
            .map(|(r, n)| format!("{n}x {r}"))
            .collect();
        format!(
            "{} further association(s) rejected from {} between {} and {} (last calling AE {:?}): {}",
            self.count,
            self.source
                .map(|ip| ip.to_string())
                .unwrap_or_else(|| "other sources".into()),
            crate::audit::timestamp(micros(self.first)),
            crate::audit::timestamp(micros(self.last)),
            self.last_calling_ae,
            reasons.join("; ")
        )
    }
}

fn micros(t: SystemTime) -> i64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

struct Source {
    /// When the last entry (single or summary) for this source was written.
    written: Instant,
    pending: Option<Summary>,
}

/// Most distinct reasons kept per summary (each is a short fixed text, but a peer-chosen AE
/// title could otherwise vary them without bound).
const MAX_REASONS: usize = 16;

#[derive(Default)]
pub struct Rejections {
    sources: Mutex<HashMap<Option<IpAddr>, Source>>,
}

impl Rejections {
    /// Notes one rejection of a request from `ip` (calling AE title, reason).
    pub fn note(&self, ip: Option<IpAddr>, calling_ae: &str, reason: &str, now: Instant) -> Note {
        let ip = ip.map(super::admission::source);
        let mut sources = self.sources.lock().unwrap_or_else(|e| e.into_inner());
        let key = if ip.is_some() && !sources.contains_key(&ip) && sources.len() >= MAX_SOURCES {
            None
        } else {
            ip
        };
        match sources.get_mut(&key) {
            // The bucket of "other sources" never records single rejections.
            Some(s)
                if key.is_none()
                    || now.saturating_duration_since(s.written) < WINDOW
                    || s.pending.is_some() =>
            {
                let wall = SystemTime::now();
                let p = s.pending.get_or_insert_with(|| Summary {
                    source: key,
                    count: 0,
                    first: wall,
                    last: wall,
                    reasons: BTreeMap::new(),
                    last_calling_ae: String::new(),
                });
                p.count += 1;
                p.last = wall;
                p.last_calling_ae = calling_ae.to_string();
                if p.reasons.len() < MAX_REASONS || p.reasons.contains_key(reason) {
                    *p.reasons.entry(reason.to_string()).or_default() += 1;
                }
                Note::Counted
            }
            Some(s) => {
                s.written = now;
                Note::Record
            }
            None => {
                sources.insert(
                    key,
                    Source {
                        written: now,
                        pending: None,
                    },
                );
                if key.is_none() {
                    drop(sources);
                    return self.note(None, calling_ae, reason, now);
                }
                Note::Record
            }
        }
    }

    /// Summaries whose window has passed (to be written now); sources quiet for a whole
    /// window are forgotten. `all`: every pending summary, as at shutdown.
    pub fn flush(&self, now: Instant, all: bool) -> Vec<Summary> {
        let mut sources = self.sources.lock().unwrap_or_else(|e| e.into_inner());
        let mut due = Vec::new();
        sources.retain(|_, s| {
            let passed = now.saturating_duration_since(s.written) >= WINDOW;
            if passed || all {
                if let Some(p) = s.pending.take() {
                    due.push(p);
                    s.written = now;
                    return true;
                }
            }
            !passed
        });
        due
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_becomes_one_record_and_one_summary_per_window() {
        let r = Rejections::default();
        let t0 = Instant::now();
        let a = Some("10.0.0.1".parse().unwrap());
        let b = Some("10.0.0.2".parse().unwrap());
        assert_eq!(r.note(a, "X", "unknown AE", t0), Note::Record);
        assert_eq!(r.note(b, "Y", "unknown AE", t0), Note::Record);
        for i in 0..1000 {
            let reason = if i % 2 == 0 { "unknown AE" } else { "busy" };
            assert_eq!(r.note(a, "X", reason, t0), Note::Counted);
        }
        assert!(r.flush(t0 + Duration::from_secs(5), false).is_empty());
        let due = r.flush(t0 + WINDOW, false);
        assert_eq!(due.len(), 1, "b had nothing after its first");
        assert_eq!(due[0].source, a);
        assert_eq!(due[0].count, 1000);
        assert_eq!(due[0].reasons.get("busy"), Some(&500));
        assert!(due[0]
            .detail()
            .contains("1000 further association(s) rejected from 10.0.0.1"));
        // Right after a summary the source stays in summary mode for another window.
        assert_eq!(r.note(a, "X", "busy", t0 + WINDOW), Note::Counted);
        // b was quiet for a window: forgotten, so its next rejection is recorded at once.
        assert_eq!(r.note(b, "Y", "busy", t0 + WINDOW), Note::Record);
        let at_stop = r.flush(t0 + WINDOW, true);
        assert_eq!(at_stop.iter().map(|s| s.count).sum::<u64>(), 1);
    }

    #[test]
    fn sources_beyond_the_bound_share_one_summary() {
        let r = Rejections::default();
        let t0 = Instant::now();
        for i in 0..MAX_SOURCES as u32 {
            let ip = Some(IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + i)));
            assert_eq!(r.note(ip, "X", "unknown AE", t0), Note::Record);
        }
        let extra = Some("192.168.0.1".parse().unwrap());
        assert_eq!(r.note(extra, "X", "unknown AE", t0), Note::Counted);
        assert_eq!(r.note(extra, "X", "unknown AE", t0), Note::Counted);
        let due = r.flush(t0, true);
        assert_eq!(due.len(), 1);
        assert_eq!((due[0].source, due[0].count), (None, 2));
    }
}
