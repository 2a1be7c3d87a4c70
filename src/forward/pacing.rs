//! When a forward worker sends: the backoff between retries, and how long it gives way to
//! ingest while instances arrive. Pure: the worker passes in the clock and the activity.

use std::time::{Duration, Instant};

use crate::config::ForwardingConfig;

/// The wait after the `failures`-th failure in a row: `retry_initial_ms`, doubled each time, at
/// most `retry_max_secs`.
pub(super) fn backoff(cfg: &ForwardingConfig, failures: u32) -> Duration {
    let initial = Duration::from_millis(cfg.retry_initial_ms);
    let max = Duration::from_secs(cfg.retry_max_secs);
    initial
        .saturating_mul(1u32 << failures.saturating_sub(1).min(20))
        .min(max)
}

/// Ingest counts as busy until this long after its last data set.
pub(super) const QUIET: Duration = Duration::from_millis(200);

/// Whether forwarding gives way to ingest now. It does while instances arrive, for at most
/// `limit` in a row (`since` is when it began); past that it is `overdue` and forwards alongside
/// ingest until its queue is empty. A zero `limit` never gives way.
pub(super) fn give_way(
    busy: bool,
    limit: Duration,
    since: &mut Option<Instant>,
    overdue: &mut bool,
    now: Instant,
) -> bool {
    if limit.is_zero() || *overdue {
        return false;
    }
    if !busy {
        *since = None;
        return false;
    }
    let start = *since.get_or_insert(now);
    if now.duration_since(start) >= limit {
        *overdue = true;
        return false;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwarding_gives_way_to_ingest_for_a_bounded_time() {
        let t0 = Instant::now();
        let limit = Duration::from_secs(30);
        let (mut since, mut overdue) = (None, false);
        assert!(!give_way(false, limit, &mut since, &mut overdue, t0));
        assert!(give_way(true, limit, &mut since, &mut overdue, t0));
        assert!(give_way(
            true,
            limit,
            &mut since,
            &mut overdue,
            t0 + Duration::from_secs(29)
        ));
        // A quiet moment resets the clock.
        assert!(!give_way(
            false,
            limit,
            &mut since,
            &mut overdue,
            t0 + Duration::from_secs(29)
        ));
        assert!(give_way(
            true,
            limit,
            &mut since,
            &mut overdue,
            t0 + Duration::from_secs(40)
        ));
        // Busy for the whole limit: overdue, forwards alongside ingest from then on.
        assert!(!give_way(
            true,
            limit,
            &mut since,
            &mut overdue,
            t0 + Duration::from_secs(71)
        ));
        assert!(overdue);
        assert!(!give_way(
            true,
            limit,
            &mut since,
            &mut overdue,
            t0 + Duration::from_secs(72)
        ));
        // Never gives way with a zero limit.
        let (mut since, mut overdue) = (None, false);
        assert!(!give_way(
            true,
            Duration::ZERO,
            &mut since,
            &mut overdue,
            t0
        ));
    }

    #[test]
    fn backoff_doubles_up_to_the_maximum() {
        let cfg = ForwardingConfig {
            retry_initial_ms: 250,
            retry_max_secs: 3,
            ..Default::default()
        };
        let waits: Vec<u128> = (1..=6).map(|n| backoff(&cfg, n).as_millis()).collect();
        assert_eq!(waits, vec![250, 500, 1000, 2000, 3000, 3000]);
        assert_eq!(backoff(&cfg, 0).as_millis(), 250);
        assert_eq!(backoff(&cfg, u32::MAX).as_millis(), 3000);
    }
}
