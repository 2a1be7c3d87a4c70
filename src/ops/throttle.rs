//! Bounds for the admin listener (`http::serve_admin`), kept apart from HTTP so they can be
//! tested alone: a pool of connections counted per source address, and warnings limited per
//! source, so that neither idle connections nor a flood of refused requests from one address
//! can lock operators out or fill the disk with log lines.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// A pool of connections with a total and a per-address limit. A connection holds a [`Slot`]
/// until it is dropped. When the pool is full, a newcomer takes the place of the oldest
/// connection still waiting for its request from the address that holds the most; when its own
/// address holds its share, of that address's oldest waiting one. Idle connections cannot keep
/// anyone out, even from their own address, and a source that floods only evicts its own.
#[derive(Clone, Debug)]
pub struct Pool {
    inner: Arc<Mutex<Slots>>,
    total: usize,
    per_address: usize,
}

#[derive(Debug, Default)]
struct Slots {
    /// Every slot held, by id (ids grow: the smallest is the oldest).
    held: std::collections::BTreeMap<u64, Held>,
    by_address: HashMap<IpAddr, usize>,
    next_id: u64,
}

#[derive(Debug)]
struct Held {
    ip: IpAddr,
    /// The connection's socket, to see whether bytes have arrived that its task has not read
    /// yet (under a flood the task may not run before the next eviction).
    fd: Option<std::os::fd::RawFd>,
    /// Still waiting for its request (may be evicted).
    waiting: bool,
    evict: Arc<tokio::sync::Notify>,
}

impl Slots {
    fn release(&mut self, id: u64) -> Option<Held> {
        let held = self.held.remove(&id)?;
        if let Some(n) = self.by_address.get_mut(&held.ip) {
            *n -= 1;
            if *n == 0 {
                self.by_address.remove(&held.ip);
            }
        }
        Some(held)
    }

    /// The oldest slot of `ip` that has sent nothing yet.
    fn oldest_waiting_of(&self, ip: IpAddr) -> Option<u64> {
        self.held
            .iter()
            .find(|(_, h)| h.ip == ip && h.evictable())
            .map(|(id, _)| *id)
    }

    /// The oldest evictable slot of the address holding the most slots, if any.
    fn victim(&self) -> Option<u64> {
        self.held
            .iter()
            .filter(|(_, h)| h.evictable())
            .max_by_key(|(id, h)| {
                let n = self.by_address.get(&h.ip).copied().unwrap_or(0);
                (n, std::cmp::Reverse(**id))
            })
            .map(|(id, _)| *id)
    }
}

/// Whether bytes have arrived on `fd` that nobody has read yet (FIONREAD). A closed or reused
/// descriptor only makes the answer wrong for this one choice of whom to evict.
fn bytes_waiting(fd: std::os::fd::RawFd) -> bool {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one c_int through the pointer, which points at `n`.
    let r = unsafe { libc::ioctl(fd, libc::FIONREAD, &mut n as *mut libc::c_int) };
    r == 0 && n > 0
}

impl Held {
    /// Only a connection that has sent nothing yet may lose its place: sources that reconnect
    /// as soon as they are evicted then evict each other in a chain, but the chain passes over a
    /// real client, whose request arrives right behind its connection (see [`Slot::started`]).
    fn evictable(&self) -> bool {
        self.waiting && !self.fd.is_some_and(bytes_waiting)
    }
}

/// Why [`Pool::admit`] refused a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Full {
    /// The address holds its share already.
    Address,
    /// Every slot is taken by a connection past its request.
    Total,
}

impl Pool {
    pub fn new(total: usize, per_address: usize) -> Pool {
        Pool {
            inner: Arc::default(),
            total,
            per_address,
        }
    }

    fn slots(&self) -> MutexGuard<'_, Slots> {
        // Every update is complete before the lock is let go; a panic elsewhere cannot leave
        // the counts half-changed.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A slot for a connection from `ip` (evicting a waiting one if the pool is full), or why
    /// there is none. `fd`, the connection's socket: bytes that arrive on it keep it from being
    /// evicted even before its task has read them.
    pub fn admit(&self, ip: IpAddr, fd: Option<std::os::fd::RawFd>) -> Result<Slot, Full> {
        let mut s = self.slots();
        if s.by_address.get(&ip).copied().unwrap_or(0) >= self.per_address {
            // The operator may share the address with whatever holds its share (the admin
            // listener is usually on loopback): the newcomer takes the place of the address's
            // oldest connection still waiting for its request, as the pool does when full.
            let victim = s.oldest_waiting_of(ip).ok_or(Full::Address)?;
            if let Some(h) = s.release(victim) {
                h.evict.notify_one();
            }
        } else if s.held.len() >= self.total {
            let victim = s.victim().ok_or(Full::Total)?;
            if let Some(h) = s.release(victim) {
                // Stored as a permit if the connection is not listening yet.
                h.evict.notify_one();
            }
        }
        let id = s.next_id;
        s.next_id += 1;
        let evict = Arc::new(tokio::sync::Notify::new());
        s.held.insert(
            id,
            Held {
                ip,
                fd,
                waiting: true,
                evict: evict.clone(),
            },
        );
        *s.by_address.entry(ip).or_insert(0) += 1;
        Ok(Slot {
            pool: self.clone(),
            id,
            evict,
        })
    }

    /// Slots taken now (all addresses, and `ip`'s).
    pub fn taken(&self, ip: IpAddr) -> (usize, usize) {
        let s = self.slots();
        (s.held.len(), s.by_address.get(&ip).copied().unwrap_or(0))
    }
}

/// One connection's place in a [`Pool`]; given back when dropped.
#[derive(Debug)]
pub struct Slot {
    pool: Pool,
    id: u64,
    evict: Arc<tokio::sync::Notify>,
}

impl Slot {
    /// The connection's first bytes have arrived: it can no longer be evicted.
    pub fn started(&self) {
        if let Some(h) = self.pool.slots().held.get_mut(&self.id) {
            h.waiting = false;
        }
    }

    /// Completes when a newcomer took this slot: the connection should close.
    pub fn evicted(&self) -> Arc<tokio::sync::Notify> {
        self.evict.clone()
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.pool.slots().release(self.id);
    }
}

/// At most one warning per source address per `every`; the ones held back are counted and
/// reported with the next one let through.
#[derive(Debug)]
pub struct Warnings {
    every: Duration,
    sources: Mutex<HashMap<IpAddr, (Instant, u64)>>,
}

/// Sources remembered at most; beyond it, the ones quiet for `every` are forgotten, and a new
/// source that still finds no room is held back (a flood from many addresses logs little).
const MAX_SOURCES: usize = 4096;

impl Warnings {
    pub fn new(every: Duration) -> Warnings {
        Warnings {
            every,
            sources: Mutex::default(),
        }
    }

    /// `Some(n)` when a warning about `ip` may be logged now, `n` being how many were held back
    /// since the last one; `None` when this one is held back.
    pub fn allow(&self, ip: IpAddr, now: Instant) -> Option<u64> {
        let mut sources = self.sources.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((last, held)) = sources.get_mut(&ip) {
            if now.duration_since(*last) < self.every {
                *held += 1;
                return None;
            }
            let n = *held;
            *last = now;
            *held = 0;
            return Some(n);
        }
        if sources.len() >= MAX_SOURCES {
            let every = self.every;
            sources.retain(|_, (last, _)| now.duration_since(*last) < every);
            if sources.len() >= MAX_SOURCES {
                return None;
            }
        }
        sources.insert(ip, (now, 0));
        Some(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([127, 0, 0, last])
    }

    #[test]
    fn one_address_gets_its_share_and_others_still_get_in() {
        let pool = Pool::new(4, 2);
        let a1 = pool.admit(ip(2), None).unwrap();
        let a2 = pool.admit(ip(2), None).unwrap();
        a1.started();
        a2.started();
        assert_eq!(pool.admit(ip(2), None).unwrap_err(), Full::Address);
        let _b1 = pool.admit(ip(3), None).unwrap();
        let _c1 = pool.admit(ip(4), None).unwrap();
        assert_eq!(pool.taken(ip(2)), (4, 2));
        drop(a1);
        assert_eq!(pool.taken(ip(2)), (3, 1));
    }

    /// The operator shares 127.0.0.1 with connections that send nothing: it takes the place of
    /// the oldest of them instead of being turned away.
    #[test]
    fn at_its_share_an_address_evicts_its_own_oldest_waiting_connection() {
        let pool = Pool::new(16, 2);
        let idle1 = pool.admit(ip(1), None).unwrap();
        let idle2 = pool.admit(ip(1), None).unwrap();
        let operator = pool.admit(ip(1), None).unwrap();
        assert_eq!(pool.taken(ip(1)), (2, 2));
        // The operator's request follows its connection at once.
        operator.started();
        // The evicted one reconnects at once: it takes idle2's place, never the operator's.
        let again = pool.admit(ip(1), None).unwrap();
        let again2 = pool.admit(ip(1), None).unwrap();
        again2.started();
        assert_eq!(
            pool.admit(ip(1), None).unwrap_err(),
            Full::Address,
            "no one silent left"
        );
        let evicted = |slot: &Slot| {
            let n = slot.evicted();
            let fut = n.notified();
            futures_util::pin_mut!(fut);
            let waker = futures_util::task::noop_waker();
            std::future::Future::poll(fut, &mut std::task::Context::from_waker(&waker)).is_ready()
        };
        assert!(evicted(&idle1) && evicted(&idle2) && evicted(&again) && !evicted(&operator));
    }

    #[test]
    fn a_full_pool_evicts_the_oldest_waiting_connection_of_the_busiest_address() {
        let pool = Pool::new(4, 3);
        let a1 = pool.admit(ip(2), None).unwrap();
        let a2 = pool.admit(ip(2), None).unwrap();
        let a3 = pool.admit(ip(2), None).unwrap();
        let b1 = pool.admit(ip(3), None).unwrap();
        // Full: the newcomer takes a1's place (ip 2 holds the most; a1 is its oldest).
        let c1 = pool.admit(ip(4), None).unwrap();
        assert_eq!(pool.taken(ip(2)), (4, 2));
        let evicted = a1.evicted();
        assert!(futures_util::FutureExt::now_or_never(evicted.notified()).is_some());
        assert!(futures_util::FutureExt::now_or_never(a2.evicted().notified()).is_none());
        drop(a1); // its task ends: nothing is counted twice
        assert_eq!(pool.taken(ip(2)), (4, 2));
        // Connections past their request are never evicted.
        for s in [&a2, &a3, &b1, &c1] {
            s.started();
        }
        assert_eq!(pool.admit(ip(5), None).unwrap_err(), Full::Total);
        drop(c1);
        let _d1 = pool.admit(ip(5), None).unwrap();
    }

    #[test]
    fn slots_come_back_when_dropped() {
        let pool = Pool::new(2, 2);
        for _ in 0..100 {
            let s = pool.admit(ip(9), None).unwrap();
            drop(s);
        }
        assert_eq!(pool.taken(ip(9)), (0, 0));
        let slots = pool.slots();
        assert!(slots.by_address.is_empty() && slots.held.is_empty());
    }

    #[test]
    fn warnings_are_one_per_source_per_interval_with_a_count() {
        let w = Warnings::new(Duration::from_secs(60));
        let t0 = Instant::now();
        assert_eq!(w.allow(ip(2), t0), Some(0));
        for i in 1..1000 {
            assert_eq!(w.allow(ip(2), t0 + Duration::from_millis(i)), None);
        }
        assert_eq!(
            w.allow(ip(3), t0),
            Some(0),
            "another source has its own budget"
        );
        assert_eq!(w.allow(ip(2), t0 + Duration::from_secs(61)), Some(999));
        assert_eq!(w.allow(ip(2), t0 + Duration::from_secs(62)), None);
    }

    #[test]
    fn many_sources_do_not_grow_the_table_without_bound() {
        let w = Warnings::new(Duration::from_secs(60));
        let t0 = Instant::now();
        for i in 0..(MAX_SOURCES as u32 + 10) {
            let _ = w.allow(IpAddr::from(i.to_be_bytes()), t0);
        }
        assert!(w.sources.lock().unwrap().len() <= MAX_SOURCES);
        // Once the first ones are quiet for the interval, new sources find room again.
        assert_eq!(w.allow(ip(250), t0 + Duration::from_secs(61)), Some(0));
    }
}
