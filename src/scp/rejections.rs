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
//! A source is what [`admission::source`](crate::dimse::admission::source) says: an IPv4 address or an
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
/// Single records written per window, over all sources; beyond them, a source's first
/// rejection is counted toward the summary of "other sources".
pub const MAX_RECORDS: usize = 60;

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
            crate::util::time::timestamp(micros(self.first)),
            crate::util::time::timestamp(micros(self.last)),
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
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    sources: HashMap<Option<IpAddr>, Source>,
    /// When the current global window began, and the single records written in it.
    window: Option<Instant>,
    records: usize,
}

impl Inner {
    /// Takes one of the window's single records, if any is left.
    fn take_record(&mut self, now: Instant) -> bool {
        if self
            .window
            .is_none_or(|t| now.saturating_duration_since(t) >= WINDOW)
        {
            self.window = Some(now);
            self.records = 0;
        }
        if self.records < MAX_RECORDS {
            self.records += 1;
            true
        } else {
            false
        }
    }
}

impl Rejections {
    /// Notes one rejection of a request from `ip` (calling AE title, reason).
    pub fn note(&self, ip: Option<IpAddr>, calling_ae: &str, reason: &str, now: Instant) -> Note {
        let ip = ip.map(crate::dimse::admission::source);
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        // The first from a source in its window is recorded on its own, while the global
        // budget lasts: a flood from many addresses cannot turn each into an entry.
        let first = match ip {
            None => false,
            Some(_) => match inner.sources.get(&ip) {
                Some(s) => {
                    s.pending.is_none() && now.saturating_duration_since(s.written) >= WINDOW
                }
                None => inner.sources.len() < MAX_SOURCES,
            },
        };
        if first && inner.take_record(now) {
            inner.sources.insert(
                ip,
                Source {
                    written: now,
                    pending: None,
                },
            );
            return Note::Record;
        }
        // Counted toward the source's summary when it is tracked, else toward "other sources".
        let key = if inner.sources.contains_key(&ip) {
            ip
        } else {
            None
        };
        let s = inner.sources.entry(key).or_insert(Source {
            written: now,
            pending: None,
        });
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

    /// Summaries whose window has passed (to be written now); sources quiet for a whole
    /// window are forgotten. `all`: every pending summary, as at shutdown.
    pub fn flush(&self, now: Instant, all: bool) -> Vec<Summary> {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let mut due = Vec::new();
        inner.sources.retain(|_, s| {
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
    fn many_sources_beyond_the_record_budget_share_one_summary() {
        let r = Rejections::default();
        let t0 = Instant::now();
        let notes: Vec<Note> = (0..1000u32)
            .map(|i| {
                let ip = Some(IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + i)));
                r.note(ip, "X", "unknown AE", t0)
            })
            .collect();
        assert_eq!(
            notes.iter().filter(|n| **n == Note::Record).count(),
            MAX_RECORDS
        );
        let due = r.flush(t0 + WINDOW, false);
        assert_eq!(due.len(), 1, "{due:?}");
        assert_eq!(
            (due[0].source, due[0].count),
            (None, 1000 - MAX_RECORDS as u64)
        );
        assert!(due[0].detail().contains("rejected from other sources"));
        // A new window brings a new budget.
        let ip = Some("192.168.0.1".parse().unwrap());
        assert_eq!(r.note(ip, "X", "unknown AE", t0 + WINDOW), Note::Record);
    }
}
