//! Store-and-forward: every stored instance that matches a `[[forward]]` rule is passed on to
//! the rule's destination (the site's PACS), so the PACS keeps receiving what the modalities
//! send while the ledger records it all.
//!
//! - [`Router`] (pure) decides the destinations of an instance from the rules;
//! - the ingest pipeline hands them to the ledger, which queues the new entry for each
//!   destination **in the same batch** that stores it (see [`crate::ledger::forward`]): an
//!   acknowledged instance is never forgotten, crashes included;
//! - a [`worker`] per destination sends what is queued over one association, rebuilt and checked
//!   against the ledger exactly as C-MOVE does, retries with backoff, and records each final
//!   outcome as a ledger entry, pacing itself by [`pacing`] (retry backoff, giving way to ingest);
//! - [`status`] and [`retry`] serve `dicomchain forward status|retry`.

mod pacing;
pub mod worker;

use std::collections::BTreeMap;
use std::time::Duration;

use crate::config::{Config, ForwardRule};
use crate::ledger::{ForwardSummary, Ledger, LedgerError};

/// What the rules look at.
#[derive(Debug, Clone, Copy)]
pub struct Route<'a> {
    pub calling_ae: &'a str,
    pub called_ae: &'a str,
    pub modality: &'a str,
    pub sop_class_uid: &'a str,
}

/// The routing rules of the configuration.
#[derive(Debug, Clone, Default)]
pub struct Router {
    rules: Vec<ForwardRule>,
}

impl Router {
    pub fn new(rules: &[ForwardRule]) -> Router {
        Router {
            rules: rules.to_vec(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Every destination named in a rule, once, in rule order.
    pub fn all_destinations(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for r in &self.rules {
            if !out.contains(&r.destination) {
                out.push(r.destination.clone());
            }
        }
        out
    }

    /// The destinations of an instance: those of every matching rule, once each.
    pub fn destinations(&self, route: &Route) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for r in self.rules.iter().filter(|r| matches(r, route)) {
            if !out.contains(&r.destination) {
                out.push(r.destination.clone());
            }
        }
        out
    }
}

fn matches(rule: &ForwardRule, route: &Route) -> bool {
    let ae =
        |list: &[String], v: &str| list.is_empty() || list.iter().any(|a| a.trim() == v.trim());
    ae(&rule.calling_ae, route.calling_ae)
        && ae(&rule.called_ae, route.called_ae)
        && (rule.modality.is_empty()
            || rule
                .modality
                .iter()
                .any(|m| m.trim().eq_ignore_ascii_case(route.modality.trim())))
        && (rule.sop_class.is_empty()
            || rule
                .sop_class
                .iter()
                .any(|c| c.trim() == route.sop_class_uid))
}

/// Why `forward status` or `forward retry` could not answer.
#[derive(Debug, thiserror::Error)]
pub enum ForwardCliError {
    #[error("{0}")]
    Ledger(#[from] LedgerError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Usage(String),
    #[error("the running node did not take the retry request within {0:?}; it stays in {1} and is applied when the node runs")]
    NotTaken(Duration, String),
}

/// One destination's line of `forward status`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DestinationStatus {
    pub destination: String,
    /// The peer's AE title, or `None` when the name is no longer configured.
    pub ae_title: Option<String>,
    #[serde(flatten)]
    pub queue: ForwardSummary,
    /// Given-up items: (entry, status, detail), oldest first (at most 20).
    pub failed_items: Vec<(u64, u16, String)>,
}

fn open_secondary(cfg: &Config) -> Result<Ledger, ForwardCliError> {
    Ok(Ledger::open_read_only(&cfg.ledger.path, "forward")?)
}

/// The queue of every destination (configured in a rule, or holding items). Works beside a
/// running node.
pub fn status(cfg: &Config) -> Result<Vec<DestinationStatus>, ForwardCliError> {
    let ledger = open_secondary(cfg)?;
    let mut queues: BTreeMap<String, ForwardSummary> = ledger.forward_summary()?;
    for d in Router::new(&cfg.forward).all_destinations() {
        queues.entry(d).or_default();
    }
    let mut out = Vec::new();
    for (destination, queue) in queues {
        let failed_items = if queue.failed > 0 {
            let mut f = ledger.forward_failed(&destination)?;
            f.truncate(20);
            f
        } else {
            Vec::new()
        };
        out.push(DestinationStatus {
            ae_title: cfg.peers.get(&destination).map(|p| p.ae_title.clone()),
            destination,
            queue,
            failed_items,
        });
    }
    Ok(out)
}

/// `forward status` as text: one block per destination.
pub fn render_status(list: &[DestinationStatus], now_micros: i64) -> String {
    if list.is_empty() {
        return "no forward destinations configured and nothing queued\n".into();
    }
    let mut out = String::new();
    for d in list {
        let ae = d
            .ae_title
            .as_deref()
            .map(|a| a.to_string())
            .unwrap_or_else(|| "not configured any more".into());
        out += &format!("{} ({ae})\n", d.destination);
        out += &format!("  pending: {}\n", d.queue.pending);
        if let Some((seq, t)) = d.queue.oldest_pending {
            out += &format!(
                "  oldest pending: entry {seq}, queued {} ago\n",
                human_age(now_micros - t)
            );
        }
        out += &format!("  failed: {}\n", d.queue.failed);
        for (seq, status, detail) in &d.failed_items {
            out += &format!("    entry {seq}: status {status:04X}: {detail}\n");
        }
        match &d.queue.last_error {
            Some((t, e)) => {
                out += &format!("  last error ({} ago): {e}\n", human_age(now_micros - t))
            }
            None => out += "  last error: none\n",
        }
    }
    out
}

fn human_age(micros: i64) -> String {
    let s = (micros.max(0) / 1_000_000) as u64;
    match s {
        0..=119 => format!("{s} s"),
        120..=7199 => format!("{} min", s / 60),
        _ => format!("{} h", s / 3600),
    }
}

/// Re-queues given-up forwards (of one destination, or all). Through the running node when it
/// runs (a request in the event spool, applied within a second), else directly. Returns how many
/// items were re-queued.
pub fn retry(cfg: &Config, destination: Option<&str>) -> Result<u64, ForwardCliError> {
    if let Some(d) = destination {
        if !cfg.peers.contains_key(d) {
            let known: Vec<&str> = cfg.peers.keys().map(String::as_str).collect();
            return Err(ForwardCliError::Usage(format!(
                "{d:?} is not a [peers.NAME] name (known: {})",
                known.join(", ")
            )));
        }
    }
    if !cfg.ledger.path.join("CURRENT").exists() {
        return Err(ForwardCliError::Usage(format!(
            "no ledger at {} (ledger.path)",
            cfg.ledger.path.display()
        )));
    }
    let request =
        crate::ledger::forward::write_retry_request(&cfg.ledger.event_spool, destination)?;
    // Not running: open the ledger as its writer; the committer applies the request at start.
    match Ledger::open_with(&cfg.ledger.path, None, Some(cfg.ledger.event_spool.clone())) {
        Ok(ledger) => {
            ledger.close();
            drop(ledger);
        }
        Err(LedgerError::Open { source, .. }) if crate::ledger::is_locked(&source) => {
            // The node holds the ledger: it drains the spool at least once a second.
            let deadline = std::time::Instant::now() + Duration::from_secs(15);
            while request.exists() {
                if std::time::Instant::now() > deadline {
                    return Err(ForwardCliError::NotTaken(
                        Duration::from_secs(15),
                        request.display().to_string(),
                    ));
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        Err(e) => return Err(e.into()),
    }
    if request.exists() {
        return Err(ForwardCliError::NotTaken(
            Duration::ZERO,
            request.display().to_string(),
        ));
    }
    // The node's answer: how many items it moved back to the queue.
    let answer = crate::ledger::forward::retry_answer_path(&request);
    let text = std::fs::read_to_string(&answer)?;
    let _ = std::fs::remove_file(&answer);
    text.trim()
        .parse()
        .map_err(|_| ForwardCliError::Usage(format!("{}: not a count", answer.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(dest: &str) -> ForwardRule {
        ForwardRule {
            destination: dest.into(),
            calling_ae: vec![],
            called_ae: vec![],
            modality: vec![],
            sop_class: vec![],
        }
    }

    const CT: &str = "1.2.840.10008.5.1.4.1.1.2";

    fn route<'a>(calling: &'a str, modality: &'a str) -> Route<'a> {
        Route {
            calling_ae: calling,
            called_ae: "DICOMCHAIN",
            modality,
            sop_class_uid: CT,
        }
    }

    #[test]
    fn empty_conditions_match_everything_and_lists_match_any_value() {
        let r = Router::new(&[rule("pacs")]);
        assert_eq!(r.destinations(&route("CT1", "CT")), vec!["pacs"]);
        let mut mr = rule("mr-archive");
        mr.modality = vec!["mr".into(), "PT".into()];
        mr.calling_ae = vec!["MR1".into(), "MR2 ".into()];
        let r = Router::new(&[mr]);
        assert_eq!(r.destinations(&route("MR2", "MR")), vec!["mr-archive"]);
        assert!(r.destinations(&route("MR2", "CT")).is_empty());
        assert!(r.destinations(&route("CT1", "MR")).is_empty());
    }

    #[test]
    fn every_matching_rule_adds_its_destination_once() {
        let mut ct = rule("pacs");
        ct.sop_class = vec![CT.into()];
        let mut by_called = rule("teaching");
        by_called.called_ae = vec!["OTHER".into()];
        let r = Router::new(&[rule("pacs"), ct, by_called, rule("backup")]);
        assert_eq!(r.destinations(&route("X", "CT")), vec!["pacs", "backup"]);
        assert_eq!(r.all_destinations(), vec!["pacs", "teaching", "backup"]);
        assert!(Router::default().destinations(&route("X", "CT")).is_empty());
    }

    #[test]
    fn ages_read_naturally() {
        assert_eq!(human_age(5_000_000), "5 s");
        assert_eq!(human_age(600_000_000), "10 min");
        assert_eq!(human_age(7_200_000_000), "2 h");
        assert_eq!(human_age(-1), "0 s");
    }
}
