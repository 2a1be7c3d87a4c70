//! One task per forward destination: it reads the destination's queue from the ledger, keeps one
//! association open while there is work, sends each queued instance rebuilt and checked against
//! the ledger (as C-MOVE does: byte-exact when the destination accepts the stored syntax), and
//! records each final outcome on the ledger.
//!
//! Delivery is at least once: an instance whose C-STORE succeeded but whose outcome was not yet
//! durable when the node died is sent again after the restart (the destination sees the same
//! SOP Instance again, which a PACS treats as a re-send).
//!
//! Retries: a destination that cannot be reached (connection refused, association rejected) is
//! retried without limit, waiting `retry_initial_ms` doubling up to `retry_max_secs`; its error
//! is kept for `forward status`. An instance the destination refuses (failure status, no
//! accepted context, an abort while it was being sent) is retried with the same backoff up to
//! `max_attempts` times, then given up (`forward retry` re-queues it). An instance that fails
//! its ledger check is given up at once and never sent (a security event is recorded).

use std::collections::{HashMap, HashSet};
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::futures::Notified;
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

use super::pacing::{backoff, give_way, QUIET};
use super::Router;
use crate::archive::ingest::Activity;
use crate::archive::outbound::{
    self, Accepted, Outbound, PrepareError, Ready, Requester, SendError,
};
use crate::config::{Config, ForwardingConfig, PeerConfig};
use crate::dimse::scu::{Scu, ScuError};
use crate::dimse::status;
use crate::ledger::{Entry, ForwardOutcome, ForwardUpdate, LedgerError};

/// Most instances sent between two outcome commits.
const BATCH: usize = 64;
/// Most (SOP class, syntax) pairs one association proposes (two contexts each, 128 at most).
const MAX_PAIRS: usize = 48;
/// Queue items read at once to find the ones that are due.
const SCAN: usize = 1024;
/// A destination error is recorded on the ledger at most this often (unless it changes).
const ERROR_RECORD_INTERVAL: Duration = Duration::from_secs(60);

/// The running forward workers, on their own runtime whose threads run at a lower CPU
/// priority (`forwarding.niceness`), so forwarding never slows the acknowledgement of
/// incoming instances on a busy machine.
pub struct Forwarder {
    stop: watch::Sender<bool>,
    handles: Vec<tokio::task::JoinHandle<()>>,
    runtime: Option<tokio::runtime::Runtime>,
}

/// Gives the calling thread the nice value `nice` (Linux: the nice value is per thread).
fn lower_priority(nice: i32) {
    #[cfg(target_os = "linux")]
    // SAFETY: setpriority only reads its integer arguments; who = 0 is the calling thread.
    unsafe {
        libc::setpriority(libc::PRIO_PROCESS, 0, nice);
    }
    #[cfg(not(target_os = "linux"))]
    let _ = nice;
}

impl Forwarder {
    /// Starts a worker for every destination of a rule, and for every configured peer that
    /// still has queued or given-up items although no rule names it any more (so that
    /// `forward retry` reaches them too). `services`: what sending checked instances needs (the
    /// node passes its Query/Retrieve services, which convert into it).
    pub fn start(
        services: impl Into<Outbound>,
        cfg: &Config,
        activity: Arc<Activity>,
    ) -> Result<Forwarder, std::io::Error> {
        let services: Outbound = services.into();
        let mut names = Router::new(&cfg.forward).all_destinations();
        let queues = services
            .ledger
            .forward_summary()
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        for (dest, q) in queues {
            if (q.pending == 0 && q.failed == 0) || names.contains(&dest) {
                continue;
            }
            if cfg.peers.contains_key(&dest) {
                names.push(dest);
            } else {
                warn!(destination = %dest, pending = q.pending, "forwards queued for a destination that is no longer a configured peer; they wait");
            }
        }
        let (stop, stop_rx) = watch::channel(false);
        let mut handles = Vec::new();
        if names.is_empty() {
            return Ok(Forwarder {
                stop,
                handles,
                runtime: None,
            });
        }
        let nice = cfg.forwarding.niceness;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .max_blocking_threads(16)
            .thread_name("forward")
            .enable_all()
            .on_thread_start(move || lower_priority(nice))
            .build()?;
        for name in names {
            let Some(peer) = cfg.peers.get(&name).cloned() else {
                continue;
            };
            info!(destination = %name, ae_title = %peer.ae_title, "forwarding to destination");
            let w = Worker {
                name,
                peer,
                services: services.clone(),
                cfg: cfg.forwarding.clone(),
                stop: stop_rx.clone(),
                wakeup: services.ledger.forward_wakeup(),
                activity: activity.clone(),
            };
            handles.push(runtime.spawn(w.run()));
        }
        Ok(Forwarder {
            stop,
            handles,
            runtime: Some(runtime),
        })
    }

    /// Asks the workers to stop after the instance each is sending; aborts those still busy
    /// after `grace` (for all of them together). Nothing is lost either way: what was not
    /// recorded as delivered stays queued.
    pub async fn stop(mut self, grace: Duration) {
        let _ = self.stop.send(true);
        let deadline = tokio::time::Instant::now() + grace;
        for h in std::mem::take(&mut self.handles) {
            let abort = h.abort_handle();
            match tokio::time::timeout_at(deadline, h).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => warn!(error = %e, "a forward worker ended abnormally"),
                Err(_) => abort.abort(),
            }
        }
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

impl Drop for Forwarder {
    /// A forwarder dropped without [`Forwarder::stop`] (a failed start) must not drop its
    /// runtime inside the node's: that panics.
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

/// Retry state of one queue item (in memory: a restart gives every item a fresh start).
struct Attempts {
    /// Refusals by the destination.
    count: u32,
    /// Times it could not be rebuilt (not counted against `max_attempts`).
    later: u32,
    not_before: Instant,
}

impl Attempts {
    fn new(now: Instant) -> Attempts {
        Attempts {
            count: 0,
            later: 0,
            not_before: now,
        }
    }
}

/// What happened to one instance of a batch.
enum Sent {
    /// The destination kept instance `uid` with this status.
    Delivered { status: u16, uid: String },
    /// The destination refused it; counts as an attempt. `broken`: the association is gone.
    Refused {
        status: u16,
        detail: String,
        broken: bool,
    },
    /// Never to be sent (failed its ledger check). `broken`: the association was aborted.
    GiveUp { detail: String, broken: bool },
    /// Could not be rebuilt now; try again later without counting an attempt. `broken`: the
    /// association was left mid-data-set and must be aborted.
    Later { detail: String, broken: bool },
}

struct Worker {
    name: String,
    peer: PeerConfig,
    services: Outbound,
    cfg: ForwardingConfig,
    stop: watch::Receiver<bool>,
    wakeup: Arc<tokio::sync::Notify>,
    activity: Arc<Activity>,
}

/// An open association and the (SOP class, syntax) pairs it was opened for.
struct Open {
    scu: Scu,
    pairs: Vec<(String, String)>,
    last_used: Instant,
}

/// A worker's state from one turn of its loop to the next.
struct State {
    open: Option<Open>,
    attempts: HashMap<u64, Attempts>,
    /// Times in a row the destination could not be reached, and when it is tried again.
    dest_failures: u32,
    dest_not_before: Instant,
    /// The destination error last recorded on the ledger, and when.
    last_recorded: Option<(String, Instant)>,
    /// Since when forwarding gives way to ingest, and whether it gave way long enough (see
    /// [`give_way`]).
    yielding_since: Option<Instant>,
    overdue: bool,
}

/// Due entries to send over one association, and the outcomes of queue items already settled
/// while reading them.
struct Batch {
    entries: Vec<Entry>,
    pairs: Vec<(String, String)>,
    outcomes: Vec<ForwardOutcome>,
}

impl Worker {
    fn backoff(&self, failures: u32) -> Duration {
        backoff(&self.cfg, failures)
    }

    fn yield_limit(&self) -> Duration {
        Duration::from_secs(self.cfg.yield_to_ingest_secs)
    }

    async fn run(mut self) {
        let mut st = State {
            open: None,
            attempts: HashMap::new(),
            dest_failures: 0,
            dest_not_before: Instant::now(),
            last_recorded: None,
            yielding_since: None,
            overdue: false,
        };
        loop {
            if *self.stop.borrow() {
                break;
            }
            // Registered before the queue is read, so a commit in between is not missed.
            let wakeup = self.wakeup.clone();
            let notified = wakeup.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let now = Instant::now();
            let due = match self.due(&st.attempts, now) {
                Ok((due, complete)) => {
                    if let Some(live) = complete {
                        st.attempts.retain(|seq, _| live.contains(seq));
                    }
                    due
                }
                Err(e) => {
                    warn!(destination = %self.name, error = %e, "cannot read the forward queue");
                    self.sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            if self.yields(&mut st, due.is_empty(), now) {
                self.sleep(Duration::from_millis(50)).await;
                continue;
            }
            if due.is_empty() || st.dest_not_before > now {
                self.idle(&mut st, notified, now).await;
                continue;
            }
            let batch = self.batch(due).await;
            let outcomes = self.send(&mut st, batch).await;
            self.record_outcomes(outcomes).await;
        }
        if let Some(o) = st.open.take() {
            o.scu.release(Duration::from_secs(5)).await;
        }
        info!(destination = %self.name, "forward worker stopped");
    }

    /// Whether this turn gives way to ingest (see [`give_way`]); `caught_up`: nothing is due.
    fn yields(&self, st: &mut State, caught_up: bool, now: Instant) -> bool {
        let limit = self.yield_limit();
        if caught_up {
            // Caught up: the next burst of ingest is given way to again.
            st.overdue = false;
            return false;
        }
        let busy = self.activity.busy(QUIET);
        if give_way(busy, limit, &mut st.yielding_since, &mut st.overdue, now) {
            return true;
        }
        if st.overdue && st.yielding_since.take().is_some() {
            info!(destination = %self.name, secs = limit.as_secs(), "instances kept arriving; forwarding alongside ingest until the queue is empty");
        }
        false
    }

    /// Nothing to send now: waits for a commit to the queue, the next retry, the stop, or at
    /// most a second; releases the association once it has been idle for `idle_release_secs`.
    async fn idle(&self, st: &mut State, notified: Pin<&mut Notified<'_>>, now: Instant) {
        let mut wait = Duration::from_secs(1);
        if st.dest_not_before > now {
            wait = wait.min(st.dest_not_before - now);
        }
        // Only waits still ahead count: one already past is held back by the destination's
        // backoff, and would otherwise make this loop spin.
        if let Some(next) = st
            .attempts
            .values()
            .map(|a| a.not_before)
            .filter(|t| *t > now)
            .min()
        {
            wait = wait.min(next - now);
        }
        if let Some(o) = &st.open {
            let idle = Duration::from_secs(self.cfg.idle_release_secs);
            let used = o.last_used.elapsed();
            if used >= idle {
                if let Some(o) = st.open.take() {
                    o.scu.release(Duration::from_secs(10)).await;
                }
            } else {
                wait = wait.min(idle.saturating_sub(used));
            }
        }
        let mut stop = self.stop.clone();
        tokio::select! {
            _ = notified => {}
            _ = tokio::time::sleep(wait.max(Duration::from_millis(10))) => {}
            _ = stop.changed() => {}
        }
    }

    /// The first of the `due` entries, at most [`BATCH`], whose (class, syntax) pairs fit one
    /// association ([`MAX_PAIRS`]). A queued entry that is gone from the ledger is given up.
    async fn batch(&mut self, due: Vec<u64>) -> Batch {
        let mut batch = Batch {
            entries: Vec::new(),
            pairs: Vec::new(),
            outcomes: Vec::new(),
        };
        for seq in due {
            if batch.entries.len() >= BATCH {
                break;
            }
            let entry = match self.services.ledger.entry(seq) {
                Ok(Some(e)) => e,
                Ok(None) | Err(LedgerError::Corrupt(_)) => {
                    warn!(destination = %self.name, seq, "a queued ledger entry is missing or unreadable; given up");
                    batch.outcomes.push(ForwardOutcome {
                        seq,
                        delivered: false,
                        superseded: false,
                        status: status::PROCESSING_FAILURE,
                        detail: "the queued ledger entry is missing or unreadable".into(),
                    });
                    continue;
                }
                Err(e) => {
                    warn!(destination = %self.name, seq, error = %e, "cannot read a queued entry");
                    if batch.entries.is_empty() && batch.outcomes.is_empty() {
                        self.sleep(Duration::from_secs(1)).await;
                    }
                    break;
                }
            };
            let pair = (entry.sop_class_uid.clone(), entry.transfer_syntax.clone());
            if !batch.pairs.contains(&pair) {
                if batch.pairs.len() >= MAX_PAIRS {
                    continue;
                }
                batch.pairs.push(pair);
            }
            batch.entries.push(entry);
        }
        batch
    }

    /// Sends a batch over an association that has contexts for it and settles what became of
    /// each instance; returns the outcomes to record.
    async fn send(&self, st: &mut State, batch: Batch) -> Vec<ForwardOutcome> {
        let Batch {
            mut entries,
            pairs,
            mut outcomes,
        } = batch;
        let reused = st.open.is_some();
        if !entries.is_empty() && !self.open_for(st, &pairs).await {
            entries.clear();
        }
        let may_yield = !self.yield_limit().is_zero() && !st.overdue;
        let Some(o) = st.open.as_mut() else {
            return outcomes;
        };
        let results = self.send_batch(o, entries, may_yield).await;
        o.last_used = Instant::now();
        let mut broken = false;
        for (i, (seq, sent)) in results.into_iter().enumerate() {
            // An association kept open between batches may have been closed by the peer
            // meanwhile: its first failure is not the instance's fault.
            let sent = match sent {
                Sent::Refused {
                    detail,
                    broken: true,
                    ..
                } if i == 0 && reused => Sent::Later {
                    detail: format!("the kept-open association failed: {detail}"),
                    broken: true,
                },
                other => other,
            };
            broken |= self.settle(st, seq, sent, &mut outcomes).await;
        }
        if broken {
            if let Some(o) = st.open.take() {
                o.scu.abort().await;
            }
        }
        outcomes
    }

    /// Makes `st.open` an association with contexts for `pairs`: the one open if it has them,
    /// else a new one. `false` when the destination cannot be reached (it is then not tried
    /// again before its backoff has passed).
    async fn open_for(&self, st: &mut State, pairs: &[(String, String)]) -> bool {
        if st
            .open
            .as_ref()
            .is_some_and(|o| !pairs.iter().all(|p| o.pairs.contains(p)))
        {
            if let Some(o) = st.open.take() {
                o.scu.release(Duration::from_secs(10)).await;
            }
        }
        if st.open.is_some() {
            return true;
        }
        match self.connect(pairs).await {
            Ok(scu) => {
                st.dest_failures = 0;
                st.open = Some(Open {
                    scu,
                    pairs: pairs.to_vec(),
                    last_used: Instant::now(),
                });
                true
            }
            Err(e) => {
                st.dest_failures += 1;
                let wait = self.backoff(st.dest_failures);
                st.dest_not_before = Instant::now() + wait;
                warn!(destination = %self.name, error = %e, retry_in_ms = wait.as_millis() as u64, "forward destination unreachable; instances stay queued");
                self.record_error(e.to_string(), &mut st.last_recorded)
                    .await;
                false
            }
        }
    }

    /// Settles what became of queue item `seq`: an outcome to record, or a retry later.
    /// Returns whether the association broke.
    async fn settle(
        &self,
        st: &mut State,
        seq: u64,
        sent: Sent,
        outcomes: &mut Vec<ForwardOutcome>,
    ) -> bool {
        let now = Instant::now();
        match sent {
            Sent::Delivered { status, uid } => {
                self.delivered(st, seq, status, &uid, outcomes);
                false
            }
            Sent::GiveUp { detail, broken } => {
                warn!(destination = %self.name, seq, detail = %detail, "forward given up");
                outcomes.push(ForwardOutcome {
                    seq,
                    delivered: false,
                    superseded: false,
                    status: status::PROCESSING_FAILURE,
                    detail,
                });
                broken
            }
            Sent::Later { detail, broken } => {
                let a = st.attempts.entry(seq).or_insert_with(|| Attempts::new(now));
                a.later += 1;
                a.not_before = Instant::now() + self.backoff(a.later);
                self.record_error(detail, &mut st.last_recorded).await;
                broken
            }
            Sent::Refused {
                status,
                detail,
                broken,
            } => {
                let a = st.attempts.entry(seq).or_insert_with(|| Attempts::new(now));
                a.count += 1;
                if a.count >= self.cfg.max_attempts {
                    warn!(destination = %self.name, seq, status = format!("{status:04X}"), detail = %detail, "forward given up after {} attempts", a.count);
                    st.attempts.remove(&seq);
                    outcomes.push(ForwardOutcome {
                        seq,
                        delivered: false,
                        superseded: false,
                        status,
                        detail,
                    });
                } else {
                    a.not_before = Instant::now() + self.backoff(a.count);
                    info!(destination = %self.name, seq, status = format!("{status:04X}"), detail = %detail, attempt = a.count, "forward refused; will retry");
                }
                broken
            }
        }
    }

    /// Records the delivery of entry `seq` (SOP Instance `uid`), and settles its older versions
    /// still queued or given up: they must not follow it, at the destination they would
    /// replace it.
    fn delivered(
        &self,
        st: &mut State,
        seq: u64,
        status: u16,
        uid: &str,
        outcomes: &mut Vec<ForwardOutcome>,
    ) {
        outcomes.push(ForwardOutcome {
            seq,
            delivered: true,
            superseded: false,
            status,
            detail: String::new(),
        });
        for older in self
            .services
            .ledger
            .versions(uid)
            .unwrap_or_default()
            .into_iter()
            .filter(|s| *s < seq)
        {
            st.attempts.remove(&older);
            // Given up in this same batch: superseded says it better (and leaves nothing for
            // `forward retry` to send after it).
            outcomes.retain(|o| o.seq != older);
            outcomes.push(ForwardOutcome {
                seq: older,
                delivered: false,
                superseded: true,
                status: status::SUCCESS,
                detail: format!(
                    "not sent: superseded by entry {seq}, a newer version that was delivered"
                ),
            });
        }
    }

    /// Records a batch's outcomes on the ledger; when that fails, the items stay queued and
    /// are sent again (at least once).
    async fn record_outcomes(&mut self, outcomes: Vec<ForwardOutcome>) {
        if outcomes.is_empty() {
            return;
        }
        let n = outcomes.len();
        let update = ForwardUpdate::Outcomes {
            destination: self.name.clone(),
            peer_ae: self.peer.ae_title.clone(),
            sender_ae: self.services.ae_title.clone(),
            outcomes,
        };
        match self.services.ledger.forward(update).await {
            Ok(_) => {
                tracing::debug!(destination = %self.name, outcomes = n, "forward outcomes recorded")
            }
            Err(e) => {
                warn!(destination = %self.name, error = %e, "cannot record forward outcomes");
                self.sleep(Duration::from_secs(1)).await;
            }
        }
    }

    /// The queue items due now, oldest first (at most [`BATCH`] × 4), read window by window so
    /// that items waiting for a retry never hide due ones behind them. With the whole queue
    /// read (`Some`), its items, to forget the retry state of settled ones.
    #[allow(clippy::type_complexity)]
    fn due(
        &self,
        attempts: &HashMap<u64, Attempts>,
        now: Instant,
    ) -> Result<(Vec<u64>, Option<HashSet<u64>>), LedgerError> {
        let mut due = Vec::new();
        let mut live = HashSet::new();
        let mut after = 0;
        loop {
            let window = self
                .services
                .ledger
                .forward_pending(&self.name, after, SCAN)?;
            let full = window.len() == SCAN;
            for &seq in &window {
                live.insert(seq);
                if attempts.get(&seq).is_none_or(|a| a.not_before <= now) {
                    due.push(seq);
                }
            }
            match window.last() {
                Some(&last) if full && due.len() < BATCH * 4 => after = last,
                _ => return Ok((due, (!full).then_some(live))),
            }
        }
    }

    async fn sleep(&mut self, d: Duration) {
        let mut stop = self.stop.clone();
        tokio::select! {
            _ = tokio::time::sleep(d) => {}
            _ = stop.changed() => {}
        }
    }

    async fn connect(&self, pairs: &[(String, String)]) -> Result<Scu, ScuError> {
        self.services.connect(&self.peer, pairs).await
    }

    /// Keeps the destination's last error on the ledger for `forward status`, at most once a
    /// minute unless it changed.
    async fn record_error(&self, error: String, last: &mut Option<(String, Instant)>) {
        if last
            .as_ref()
            .is_some_and(|(e, t)| *e == error && t.elapsed() < ERROR_RECORD_INTERVAL)
        {
            return;
        }
        let update = ForwardUpdate::DestinationError {
            destination: self.name.clone(),
            error: error.clone(),
        };
        if let Err(e) = self.services.ledger.forward(update).await {
            warn!(destination = %self.name, error = %e, "cannot record the destination error");
        }
        *last = Some((error, Instant::now()));
    }

    /// Sends `entries` in order over `open`, rebuilding the next one while the current one
    /// goes out. Stops at the first broken association (the rest stay queued).
    async fn send_batch(
        &self,
        open: &mut Open,
        entries: Vec<Entry>,
        may_yield: bool,
    ) -> Vec<(u64, Sent)> {
        let (tx, mut rx) = mpsc::channel(1);
        let services = self.services.clone();
        tokio::spawn(async move {
            for entry in entries {
                let seq = entry.seq;
                let r = services
                    .prepare_entry(entry, None, &Requester::node("forward"))
                    .await;
                if tx.send((seq, r)).await.is_err() {
                    break;
                }
            }
        });
        let contexts = outbound::accepted(&open.scu);
        let mut out = Vec::new();
        while let Some((seq, prepared)) = rx.recv().await {
            let sent = match prepared {
                Err(PrepareError::Integrity(why)) => Sent::GiveUp {
                    detail: format!("instance fails its ledger check: {why}"),
                    broken: false,
                },
                Err(PrepareError::Erased(why)) => Sent::GiveUp {
                    detail: why,
                    broken: false,
                },
                Err(PrepareError::Unavailable(why)) => Sent::Later {
                    detail: format!("cannot rebuild a queued instance: {why}"),
                    broken: false,
                },
                Ok(ready) => self.send_one(&mut open.scu, &contexts, ready).await,
            };
            let broken = matches!(
                sent,
                Sent::Refused { broken: true, .. }
                    | Sent::GiveUp { broken: true, .. }
                    | Sent::Later { broken: true, .. }
            );
            out.push((seq, sent));
            // Stop after a broken association, when the node shuts down, or when instances
            // start arriving (the rest stay queued).
            if broken || *self.stop.borrow() || (may_yield && self.activity.busy(QUIET)) {
                break;
            }
        }
        out
    }

    async fn send_one(&self, scu: &mut Scu, contexts: &[Accepted], ready: Ready) -> Sent {
        let uid = ready.uid.clone();
        sent(outbound::send(scu, contexts, ready, None).await, uid)
    }
}

/// What the result of sending instance `uid` means for its queue item.
fn sent(result: Result<u16, SendError>, uid: String) -> Sent {
    let refused = |status: u16, detail: String, broken: bool| Sent::Refused {
        status,
        detail,
        broken,
    };
    match result {
        Ok(code) if status::store_kept(code) => Sent::Delivered { status: code, uid },
        Ok(code) => refused(
            code,
            format!("the destination answered status {code:04X}"),
            false,
        ),
        Err(SendError::NoContext(why)) => refused(status::SOP_CLASS_NOT_SUPPORTED, why, false),
        Err(SendError::Check(f)) if f.integrity => Sent::GiveUp {
            detail: format!(
                "instance failed its ledger check while it was sent (association aborted): {f}"
            ),
            broken: true,
        },
        Err(SendError::Check(f)) => Sent::Later {
            detail: format!("cannot read a queued instance while it was sent: {f}"),
            broken: true,
        },
        Err(SendError::Peer(e)) => refused(
            status::PROCESSING_FAILURE,
            format!("association failed while sending: {e}"),
            true,
        ),
    }
}
