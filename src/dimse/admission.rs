//! Who gets in, and when: the bounds that keep one source from locking everyone else out.
//!
//! A new TCP connection has proven nothing yet, so it does not get an association slot. It
//! enters the *pending pool* — bounded in total (`max_pending_connections`) and per source
//! address (`max_pending_per_ip`) — and has the ARTIM timeout, all of it, to finish its TLS
//! handshake and send a whole A-ASSOCIATE-RQ. When the pool (or the source's share of it) is
//! full, the newcomer is not turned away: the *oldest* pending connection of the source with
//! the most pending ones is evicted instead. A real peer sends its request within milliseconds
//! of connecting, so it is never the oldest; a source that opens connections and sends nothing
//! only ever evicts its own. Before that, each source address has a connection rate
//! (`max_connection_rate_per_ip`, a token bucket with a burst of twice the rate); a connection
//! over it is closed at once.
//!
//! Only an A-ASSOCIATE-RQ that negotiation and access control accept asks for an
//! *association slot*: at most `max_associations` in all, `max_associations_per_ae` per calling
//! AE title, `max_associations_per_ip` per source address, and — when unknown AE titles are
//! allowed — `max_unknown_associations` for all unknown titles together, so that the known
//! peers always keep room. A request over a cap gets A-ASSOCIATE-RJ rejected-transient, local
//! limit exceeded (PS3.8 §9.3.4), and retries later.
//!
//! Rates and association caps count per address. The pending pool's shares count per *source*:
//! an IPv4 address, or an IPv6 /64, so that an attacker holding a /64 does not get billions of
//! shares (see [`source`]). A /64 may be a whole LAN segment, but a share cannot starve a
//! neighbour on it: a newcomer evicts the source's oldest pending connection, never itself.
//!
//! The state is a few counters behind a std `Mutex`: every critical section is a handful of
//! map operations with no `.await` inside, so an async lock would only add overhead.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use tokio::sync::Notify;

use crate::config::NodeConfig;

/// The bounds, from `[node]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    pub max_associations: usize,
    pub max_associations_per_ae: usize,
    pub max_associations_per_ip: usize,
    pub max_unknown_associations: usize,
    pub max_pending: usize,
    pub max_pending_per_ip: usize,
    /// New connections per second per source address; 0 = no limit.
    pub connection_rate_per_ip: u32,
    /// An association idle this long may be ended to make room for a request over a cap it
    /// counts against (see [`Admission::admit`]); `None` = never.
    pub reclaim_idle_after: Option<std::time::Duration>,
}

impl Limits {
    /// The admission bounds, with the defaults that depend on `max_associations` filled in.
    pub fn from_config(node: &NodeConfig) -> Limits {
        let max = node.max_associations;
        Limits {
            max_associations: max,
            max_associations_per_ae: node.max_associations_per_ae.unwrap_or(max.div_ceil(2)),
            max_associations_per_ip: node
                .max_associations_per_ip
                .unwrap_or((max * 3).div_ceil(4)),
            max_unknown_associations: node.max_unknown_associations.unwrap_or(max.div_ceil(2)),
            max_pending: node.max_pending_connections,
            max_pending_per_ip: node.max_pending_per_ip,
            connection_rate_per_ip: node.max_connection_rate_per_ip,
            reclaim_idle_after: (node.reclaim_idle_secs > 0)
                .then(|| std::time::Duration::from_secs(node.reclaim_idle_secs)),
        }
    }
}

/// Why a connection was closed before it could send its request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Dropped {
    #[error("connection rate limit of the source address reached")]
    RateLimited,
}

/// Why an accepted request gets no association slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Busy {
    #[error("{0} associations open (node.max_associations)")]
    Total(usize),
    #[error("{0} associations open for this calling AE title (node.max_associations_per_ae)")]
    PerAe(usize),
    #[error("{0} associations open from this address (node.max_associations_per_ip)")]
    PerIp(usize),
    #[error("{0} associations open for unknown AE titles (node.max_unknown_associations)")]
    Unknown(usize),
}

/// The shared admission state: a cheap handle.
#[derive(Clone)]
pub struct Admission {
    inner: Arc<Mutex<State>>,
    limits: Arc<Limits>,
    epoch: Instant,
}

#[derive(Default)]
struct State {
    next_id: u64,
    /// Pending connections by id; ids grow, so the first of a source is its oldest.
    pending: BTreeMap<u64, (IpAddr, Arc<Notify>)>,
    pending_by_ip: HashMap<IpAddr, usize>,
    open: usize,
    open_unknown: usize,
    open_by_ae: HashMap<String, usize>,
    open_by_ip: HashMap<IpAddr, usize>,
    /// Every open association, by admission order.
    associations: BTreeMap<u64, Held>,
    buckets: HashMap<IpAddr, Bucket>,
}

/// An open association as the caps count it.
struct Held {
    ip: IpAddr,
    ae: String,
    known: bool,
    activity: Arc<Activity>,
}

/// What an association tells admission about itself, and how admission ends it: shared by
/// the association's task and the admission state, updated without the lock.
#[derive(Default)]
struct Activity {
    /// Milliseconds since the admission's epoch at which the association last fell idle
    /// (between messages, nothing running), plus one; 0 while it is busy.
    idle_since: std::sync::atomic::AtomicU64,
    reclaim: Notify,
}

/// A token bucket: `tokens` refill at the rate up to the burst; a connection takes one.
#[derive(Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Buckets kept before full ones (sources that went quiet) are forgotten.
const MAX_BUCKETS: usize = 4096;

impl Admission {
    pub fn new(limits: Limits) -> Admission {
        Admission {
            inner: Arc::default(),
            limits: Arc::new(limits),
            epoch: Instant::now(),
        }
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // No critical section can panic half-way through an update that matters more than
        // serving on; a poisoned lock keeps its counters.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A new connection from `ip`: into the pending pool, or refused by the source's rate.
    pub fn enter(&self, ip: IpAddr, now: Instant) -> Result<Pending, Dropped> {
        let mut s = self.state();
        if !s.take_token(address(ip), now, self.limits.connection_rate_per_ip) {
            return Err(Dropped::RateLimited);
        }
        let ip = source(ip);
        if s.pending_by_ip.get(&ip).copied().unwrap_or(0) >= self.limits.max_pending_per_ip {
            s.evict_oldest_of(ip);
        } else if s.pending.len() >= self.limits.max_pending {
            if let Some(busiest) = s.busiest_pending_source() {
                s.evict_oldest_of(busiest);
            }
        }
        s.next_id += 1;
        let id = s.next_id;
        let evicted = Arc::new(Notify::new());
        s.pending.insert(id, (ip, evicted.clone()));
        *s.pending_by_ip.entry(ip).or_default() += 1;
        Ok(Pending {
            admission: self.clone(),
            id,
            evicted,
        })
    }

    /// An association slot for an accepted request (`known`: the calling AE title is a
    /// configured peer or has been granted rights).
    ///
    /// A request over a cap may end the association that has been idle longest among those the
    /// cap counts (the same AE title, the same address, the unknown titles, or any), if it has
    /// been idle `reclaim_idle_after` or more: holding associations open and silent then keeps
    /// no one out. An unknown title's request only ends unknown titles' associations. The ended
    /// association stops counting at once and is told to abort ([`Slot::reclaimed`]).
    pub fn admit(&self, ip: IpAddr, ae: &str, known: bool) -> Result<Slot, Busy> {
        let ip = address(ip);
        let ae = ae.trim();
        let now = self.millis();
        let mut s = self.state();
        // Each reclaim frees one place under every cap: at most one per cap is needed.
        for _ in 0..4 {
            let busy = match s.over_cap(&self.limits, ip, ae, known) {
                None => break,
                Some(b) => b,
            };
            let victim = self.limits.reclaim_idle_after.and_then(|after| {
                s.longest_idle(&busy, ip, ae, known, now, after.as_millis() as u64)
            });
            match victim {
                Some(id) => s.reclaim(id),
                None => return Err(busy),
            }
        }
        if let Some(busy) = s.over_cap(&self.limits, ip, ae, known) {
            return Err(busy);
        }
        s.open += 1;
        if !known {
            s.open_unknown += 1;
        }
        *s.open_by_ae.entry(ae.to_string()).or_default() += 1;
        *s.open_by_ip.entry(ip).or_default() += 1;
        s.next_id += 1;
        let id = s.next_id;
        let activity = Arc::new(Activity::default());
        s.associations.insert(
            id,
            Held {
                ip,
                ae: ae.to_string(),
                known,
                activity: activity.clone(),
            },
        );
        Ok(Slot {
            admission: self.clone(),
            id,
            activity,
        })
    }

    fn millis(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Pending connections now (for tests and metrics).
    pub fn pending(&self) -> usize {
        self.state().pending.len()
    }

    /// Open associations now.
    pub fn open(&self) -> usize {
        self.state().open
    }
}

impl State {
    /// The first cap a new association of `ae` from `ip` would exceed.
    fn over_cap(&self, l: &Limits, ip: IpAddr, ae: &str, known: bool) -> Option<Busy> {
        if self.open >= l.max_associations {
            return Some(Busy::Total(self.open));
        }
        if !known && self.open_unknown >= l.max_unknown_associations {
            return Some(Busy::Unknown(self.open_unknown));
        }
        let by_ae = self.open_by_ae.get(ae).copied().unwrap_or(0);
        if by_ae >= l.max_associations_per_ae {
            return Some(Busy::PerAe(by_ae));
        }
        let by_ip = self.open_by_ip.get(&ip).copied().unwrap_or(0);
        if by_ip >= l.max_associations_per_ip {
            return Some(Busy::PerIp(by_ip));
        }
        None
    }

    /// The association idle longest (at least `after` ms) among those `busy`'s cap counts and
    /// a newcomer of this kind may end.
    fn longest_idle(
        &self,
        busy: &Busy,
        ip: IpAddr,
        ae: &str,
        known: bool,
        now: u64,
        after: u64,
    ) -> Option<u64> {
        self.associations
            .iter()
            .filter(|(_, h)| known || !h.known)
            .filter(|(_, h)| match busy {
                Busy::Total(_) => true,
                Busy::Unknown(_) => !h.known,
                Busy::PerAe(_) => h.ae == ae,
                Busy::PerIp(_) => h.ip == ip,
            })
            .filter_map(|(id, h)| {
                let since = h
                    .activity
                    .idle_since
                    .load(std::sync::atomic::Ordering::Relaxed);
                (since != 0 && now.saturating_sub(since - 1) >= after).then_some((since, *id))
            })
            .min()
            .map(|(_, id)| id)
    }

    /// Ends association `id`: it stops counting now, and its task is told to abort.
    fn reclaim(&mut self, id: u64) {
        if let Some(h) = self.forget(id) {
            h.activity.reclaim.notify_one();
        }
    }

    fn forget(&mut self, id: u64) -> Option<Held> {
        let h = self.associations.remove(&id)?;
        self.open -= 1;
        if !h.known {
            self.open_unknown -= 1;
        }
        decrement(&mut self.open_by_ae, &h.ae);
        decrement(&mut self.open_by_ip, &h.ip);
        Some(h)
    }

    fn take_token(&mut self, ip: IpAddr, now: Instant, rate: u32) -> bool {
        if rate == 0 {
            return true;
        }
        let rate = f64::from(rate);
        let burst = 2.0 * rate;
        if self.buckets.len() >= MAX_BUCKETS && !self.buckets.contains_key(&ip) {
            // Forget sources whose bucket has refilled: they are where a new one would start.
            self.buckets.retain(|_, b| {
                b.tokens + now.saturating_duration_since(b.at).as_secs_f64() * rate < burst
            });
            if self.buckets.len() >= MAX_BUCKETS {
                // Every bucket is in use: a flood from very many addresses. The newcomer
                // competes for the bucket of the one used longest ago.
                if let Some(oldest) = self
                    .buckets
                    .iter()
                    .min_by_key(|(_, b)| b.at)
                    .map(|(k, _)| *k)
                {
                    self.buckets.remove(&oldest);
                }
            }
        }
        let b = self.buckets.entry(ip).or_insert(Bucket {
            tokens: burst,
            at: now,
        });
        b.tokens = (b.tokens + now.saturating_duration_since(b.at).as_secs_f64() * rate).min(burst);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// The source with the most pending connections; among equals, the one whose oldest
    /// pending connection is the oldest of all (not whichever the hash order gives).
    fn busiest_pending_source(&self) -> Option<IpAddr> {
        let most = self.pending_by_ip.values().copied().max()?;
        self.pending
            .values()
            .map(|(ip, _)| *ip)
            .find(|ip| self.pending_by_ip.get(ip) == Some(&most))
    }

    fn evict_oldest_of(&mut self, ip: IpAddr) {
        let Some(id) = self
            .pending
            .iter()
            .find(|(_, (from, _))| *from == ip)
            .map(|(id, _)| *id)
        else {
            return;
        };
        if let Some((_, notify)) = self.remove_pending(id) {
            // A stored permit: the connection's task sees it whenever it next waits.
            notify.notify_one();
        }
    }

    fn remove_pending(&mut self, id: u64) -> Option<(IpAddr, Arc<Notify>)> {
        let (ip, notify) = self.pending.remove(&id)?;
        decrement(&mut self.pending_by_ip, &ip);
        Some((ip, notify))
    }
}

/// The source an address counts toward in the pending pool: an IPv4 address, or the /64 an
/// IPv6 address belongs to.
pub fn source(ip: IpAddr) -> IpAddr {
    match address(ip) {
        IpAddr::V6(v6) => IpAddr::V6((u128::from(v6) & !((1u128 << 64) - 1)).into()),
        v4 => v4,
    }
}

/// An address as rates and caps count it: IPv4 also when it arrives IPv4-mapped on a
/// dual-stack socket.
pub fn address(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

fn decrement<K: std::hash::Hash + Eq>(map: &mut HashMap<K, usize>, key: &K) {
    if let Some(n) = map.get_mut(key) {
        *n -= 1;
        if *n == 0 {
            map.remove(key);
        }
    }
}

/// A connection in the pending pool; leaves it when dropped.
pub struct Pending {
    admission: Admission,
    id: u64,
    evicted: Arc<Notify>,
}

impl Pending {
    /// Completes when a newer connection took this one's place in the pool.
    pub async fn evicted(&self) {
        self.evicted.notified().await
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        self.admission.state().remove_pending(self.id);
    }
}

/// An association slot; given back when dropped, however the association ends.
pub struct Slot {
    admission: Admission,
    id: u64,
    activity: Arc<Activity>,
}

impl Slot {
    /// Completes when admission ended the association to make room: it should A-ABORT.
    pub async fn reclaimed(&self) {
        self.activity.reclaim.notified().await
    }

    /// The association is between messages with nothing running (`true`), or busy.
    pub fn set_idle(&self, idle: bool) {
        use std::sync::atomic::Ordering::Relaxed;
        let a = &self.activity.idle_since;
        if !idle {
            a.store(0, Relaxed);
        } else if a.load(Relaxed) == 0 {
            a.store(self.admission.millis() + 1, Relaxed);
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        // Nothing to give back if admission already reclaimed it.
        self.admission.state().forget(self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn limits() -> Limits {
        Limits {
            max_associations: 6,
            max_associations_per_ae: 3,
            max_associations_per_ip: 4,
            max_unknown_associations: 2,
            max_pending: 4,
            max_pending_per_ip: 2,
            connection_rate_per_ip: 0,
            reclaim_idle_after: None,
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn is_evicted(p: &Pending) -> bool {
        let fut = p.evicted();
        futures_util::pin_mut!(fut);
        let waker = futures_util::task::noop_waker();
        let mut cx = std::task::Context::from_waker(&waker);
        fut.poll(&mut cx).is_ready()
    }

    use std::future::Future;

    #[test]
    fn a_source_over_its_pending_share_evicts_its_own_oldest() {
        let a = Admission::new(limits());
        let now = Instant::now();
        let first = a.enter(ip("10.0.0.1"), now).unwrap();
        let second = a.enter(ip("10.0.0.1"), now).unwrap();
        let other = a.enter(ip("10.0.0.2"), now).unwrap();
        let third = a.enter(ip("10.0.0.1"), now).unwrap();
        assert!(is_evicted(&first), "the source's oldest made room");
        assert!(!is_evicted(&second) && !is_evicted(&third) && !is_evicted(&other));
        assert_eq!(a.pending(), 3);
        drop(first);
        assert_eq!(
            a.pending(),
            3,
            "an evicted connection was already counted out"
        );
        drop((second, third, other));
        assert_eq!(a.pending(), 0);
    }

    #[test]
    fn a_full_pool_evicts_from_the_busiest_source_not_the_newcomer() {
        let a = Admission::new(limits());
        let now = Instant::now();
        let f1 = a.enter(ip("10.0.0.9"), now).unwrap();
        let f2 = a.enter(ip("10.0.0.9"), now).unwrap();
        let g1 = a.enter(ip("10.0.0.8"), now).unwrap();
        let h1 = a.enter(ip("10.0.0.7"), now).unwrap();
        // The pool holds 4: a fifth source's connection evicts 10.0.0.9's oldest.
        let newcomer = a.enter(ip("192.168.1.5"), now).unwrap();
        assert!(is_evicted(&f1));
        assert!(![&f2, &g1, &h1, &newcomer].iter().any(|p| is_evicted(p)));
    }

    #[test]
    fn rate_limit_is_a_token_bucket_per_source() {
        let a = Admission::new(Limits {
            connection_rate_per_ip: 5,
            max_pending: 100,
            max_pending_per_ip: 100,
            ..limits()
        });
        let t0 = Instant::now();
        let held: Vec<_> = (0..10)
            .map(|_| a.enter(ip("10.0.0.1"), t0).unwrap())
            .collect();
        assert_eq!(
            a.enter(ip("10.0.0.1"), t0).err(),
            Some(Dropped::RateLimited)
        );
        assert!(
            a.enter(ip("10.0.0.2"), t0).is_ok(),
            "other sources are not limited"
        );
        let later = t0 + Duration::from_millis(300);
        assert!(
            a.enter(ip("10.0.0.1"), later).is_ok(),
            "refilled at 5/s: 1.5 tokens"
        );
        assert_eq!(
            a.enter(ip("10.0.0.1"), later).err(),
            Some(Dropped::RateLimited)
        );
        drop(held);
    }

    #[test]
    fn an_ipv6_64_is_one_source() {
        assert_eq!(source(ip("2001:db8:1:2:aaaa::1")), ip("2001:db8:1:2::"));
        assert_eq!(source(ip("::ffff:10.1.2.3")), ip("10.1.2.3"));
        assert_eq!(source(ip("10.1.2.3")), ip("10.1.2.3"));
        let a = Admission::new(limits());
        let now = Instant::now();
        let first = a.enter(ip("2001:db8::1"), now).unwrap();
        let _second = a.enter(ip("2001:db8::2"), now).unwrap();
        let _third = a.enter(ip("2001:db8::3"), now).unwrap();
        assert!(
            is_evicted(&first),
            "three addresses of one /64 share its pending share"
        );
        // Rates and association caps are per address: a neighbour on the /64 keeps its own.
        let rated = Admission::new(Limits {
            connection_rate_per_ip: 1,
            max_pending: 100,
            max_pending_per_ip: 100,
            ..limits()
        });
        let _a = rated.enter(ip("2001:db8::1"), now).unwrap();
        let _b = rated.enter(ip("2001:db8::1"), now).unwrap();
        assert!(rated.enter(ip("2001:db8::1"), now).is_err());
        assert!(rated.enter(ip("2001:db8::2"), now).is_ok());
    }

    #[test]
    fn among_equally_busy_sources_the_oldest_pending_connection_goes() {
        let a = Admission::new(limits());
        let now = Instant::now();
        let order = ["10.0.0.4", "10.0.0.3", "10.0.0.2", "10.0.0.1"];
        let held: Vec<_> = order.iter().map(|s| a.enter(ip(s), now).unwrap()).collect();
        let newcomer = a.enter(ip("10.0.0.5"), now).unwrap();
        assert!(
            is_evicted(&held[0]),
            "the first to connect, whatever its address hashes to"
        );
        assert!(!held[1..].iter().any(is_evicted) && !is_evicted(&newcomer));
    }

    #[test]
    fn an_association_idle_long_enough_makes_room_for_a_request_over_a_cap() {
        let a = Admission::new(Limits {
            reclaim_idle_after: Some(Duration::ZERO),
            ..limits()
        });
        let far = ip("10.9.9.9");
        // Whoever uses the title ADMIN holds its three places, idle.
        let held: Vec<_> = (0..3)
            .map(|_| a.admit(far, "ADMIN", true).unwrap())
            .collect();
        held[0].set_idle(false);
        held[1].set_idle(true);
        std::thread::sleep(Duration::from_millis(5));
        held[2].set_idle(true);
        // The real ADMIN gets in: the association idle longest (held[1]) is ended; the busy
        // one never is.
        let admin = a.admit(ip("127.0.0.1"), "ADMIN", true).unwrap();
        let ended = |s: &Slot| {
            let fut = s.reclaimed();
            futures_util::pin_mut!(fut);
            let waker = futures_util::task::noop_waker();
            fut.poll(&mut std::task::Context::from_waker(&waker))
                .is_ready()
        };
        assert!(ended(&held[1]) && !ended(&held[0]) && !ended(&held[2]) && !ended(&admin));
        assert_eq!(a.open(), 3);
        drop(held);
        assert_eq!(a.open(), 1, "the reclaimed slot is not given back twice");
        // An unknown title cannot end a known peer's idle association.
        let idle_known: Vec<_> = (0..5)
            .map(|i| {
                a.admit(ip(&format!("10.0.0.{i}")), &format!("K{i}"), true)
                    .unwrap()
            })
            .collect();
        for s in &idle_known {
            s.set_idle(true);
        }
        assert_eq!(
            a.admit(ip("10.1.1.1"), "STRANGER", false).err(),
            Some(Busy::Total(6))
        );
        drop((admin, idle_known));
        let s = a.state();
        assert!(s.associations.is_empty() && s.open == 0 && s.open_by_ae.is_empty());
    }

    #[test]
    fn association_caps_per_ae_per_ip_unknown_and_total() {
        let a = Admission::new(limits());
        let lo = ip("127.0.0.1");
        let idle: Vec<_> = (0..3)
            .map(|_| a.admit(lo, "IDLER", true).unwrap())
            .collect();
        assert_eq!(a.admit(lo, "IDLER ", true).err(), Some(Busy::PerAe(3)));
        let other = a.admit(lo, "OTHER", true).unwrap();
        assert_eq!(a.admit(lo, "THIRD", true).err(), Some(Busy::PerIp(4)));
        let u1 = a.admit(ip("10.0.0.1"), "U1", false).unwrap();
        let u2 = a.admit(ip("10.0.0.2"), "U2", false).unwrap();
        assert_eq!(
            a.admit(ip("10.0.0.5"), "ADMIN", true).err(),
            Some(Busy::Total(6))
        );
        drop(other);
        // A slot is free, but not for a third unknown title: it stays for the known peers.
        assert_eq!(
            a.admit(ip("10.0.0.3"), "U3", false).err(),
            Some(Busy::Unknown(2))
        );
        let admin = a.admit(ip("10.0.0.5"), "ADMIN", true).unwrap();
        assert_eq!(a.open(), 6);
        drop((idle, u1, u2, admin));
        assert_eq!(a.open(), 0);
        let s = a.state();
        assert!(s.open_by_ae.is_empty() && s.open_by_ip.is_empty() && s.open_unknown == 0);
    }
}
