//! The worker's policy decisions, as pure functions over what it has seen: the crash-loop
//! breaker, which remote replica serves a request and how long a failed one is left out,
//! and when a model's own queue limit refuses a request. Clocks are passed in, so each is
//! tested with tables and no threads.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

pub(crate) use crate::settings::CrashLoop;

/// How long a failed remote replica is left out at first, and at most.
pub(crate) const REPLICA_BACKOFF: Duration = Duration::from_secs(1);
pub(crate) const REPLICA_BACKOFF_MAX: Duration = Duration::from_secs(30);

/// The crashes and failed loads of one instance, most recent last.
#[derive(Debug, Clone)]
pub(crate) struct Breaker {
    settings: CrashLoop,
    crashes: VecDeque<Instant>,
}

impl Breaker {
    pub(crate) fn new(settings: CrashLoop) -> Breaker {
        Breaker { settings, crashes: VecDeque::new() }
    }

    pub(crate) fn settings(&self) -> CrashLoop {
        self.settings
    }

    /// The child crashed or failed to load at `now`.
    pub(crate) fn record(&mut self, now: Instant) {
        self.crashes.push_back(now);
    }

    /// `llmctl stop` clears the breaker.
    pub(crate) fn clear(&mut self) {
        self.crashes.clear();
    }

    /// Crashes within the window before `now`, when they reach the limit: the instance
    /// must not be restarted.
    pub(crate) fn tripped(&mut self, now: Instant) -> Option<usize> {
        let window = self.settings.window;
        while self.crashes.front().is_some_and(|&at| now.saturating_duration_since(at) > window) {
            self.crashes.pop_front();
        }
        (self.crashes.len() >= self.settings.limit).then_some(self.crashes.len())
    }
}

/// One server of a remote model, as the policy sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ReplicaHealth {
    pub(crate) in_flight: u32,
    /// Left out of the rotation until then, after a failure.
    pub(crate) down_until: Option<Instant>,
    pub(crate) backoff: Duration,
}

impl ReplicaHealth {
    /// A replica that answered its health check (`up`), or not.
    pub(crate) fn checked(up: bool, now: Instant) -> ReplicaHealth {
        ReplicaHealth { in_flight: 0, down_until: (!up).then(|| now + REPLICA_BACKOFF), backoff: REPLICA_BACKOFF }
    }

    /// A request on it failed at `now`: left out for the backoff, which doubles up to its cap.
    pub(crate) fn failed(&mut self, now: Instant) {
        self.down_until = Some(now + self.backoff);
        self.backoff = (self.backoff * 2).min(REPLICA_BACKOFF_MAX);
    }

    fn up(&self, now: Instant) -> bool {
        self.down_until.is_none_or(|until| until <= now)
    }
}

/// The replica a request goes to: the least busy one that is not left out, the first of
/// equals; none when every one is down.
pub(crate) fn choose_replica(replicas: &[ReplicaHealth], now: Instant) -> Option<usize> {
    replicas
        .iter()
        .enumerate()
        .filter(|(_, replica)| replica.up(now))
        .min_by_key(|(_, replica)| replica.in_flight)
        .map(|(index, _)| index)
}

/// True when a request that would wait must be refused: the model's own queue limit
/// (`max_queued`) is reached.
pub(crate) fn refuse_queued(would_wait: bool, queued: usize, max_queued: Option<u32>) -> bool {
    would_wait && max_queued.is_some_and(|max| queued >= max as usize)
}

/// How long a refused client should wait before it tries again: the time the requests
/// ahead of it take on `slots` slots, each holding one for `service_ms` on average, from
/// 1 s to a minute (1 s before anything was measured).
pub(crate) fn retry_after_ms(service_ms: Option<f64>, ahead: usize, slots: usize) -> u64 {
    let Some(service_ms) = service_ms else { return 1000 };
    let wait = service_ms * ahead as f64 / slots.max(1) as f64;
    (wait as u64).clamp(1000, 60_000)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_breaker_trips_at_the_limit_within_the_window_and_forgets_old_crashes() {
        let start = Instant::now();
        let at = |seconds: u64| start + Duration::from_secs(seconds);
        let mut breaker = Breaker::new(CrashLoop { limit: 3, window: Duration::from_secs(60) });
        breaker.record(at(0));
        breaker.record(at(10));
        assert_eq!(breaker.tripped(at(11)), None, "two crashes are under the limit");
        breaker.record(at(20));
        assert_eq!(breaker.tripped(at(21)), Some(3));
        assert_eq!(breaker.tripped(at(65)), None, "the first crash left the window");
        breaker.record(at(66));
        assert_eq!(breaker.tripped(at(66)), Some(3));
        breaker.clear();
        assert_eq!(breaker.tripped(at(66)), None, "stop clears it");
    }

    #[test]
    fn replicas_least_busy_first_and_failed_ones_left_out_with_doubling_backoff() {
        let now = Instant::now();
        let mut replicas = vec![ReplicaHealth::checked(true, now), ReplicaHealth::checked(true, now)];
        assert_eq!(choose_replica(&replicas, now), Some(0), "the first of equals");
        replicas[0].in_flight = 2;
        assert_eq!(choose_replica(&replicas, now), Some(1), "the least busy");
        replicas[1].failed(now);
        assert_eq!(choose_replica(&replicas, now), Some(0), "a failed one is left out");
        assert_eq!(replicas[1].backoff, REPLICA_BACKOFF * 2);
        assert_eq!(choose_replica(&replicas, now + REPLICA_BACKOFF), Some(1), "back after its backoff");
        for _ in 0..10 {
            replicas[1].failed(now);
        }
        assert_eq!(replicas[1].backoff, REPLICA_BACKOFF_MAX, "the backoff is capped");
        replicas[0].failed(now);
        assert_eq!(choose_replica(&replicas, now), None, "every one down");
        let down = ReplicaHealth::checked(false, now);
        assert_eq!(choose_replica(&[down], now + REPLICA_BACKOFF), Some(0));
    }

    #[test]
    fn retry_after_follows_the_measured_service_time() {
        assert_eq!(retry_after_ms(None, 10, 1), 1000, "nothing measured yet");
        assert_eq!(retry_after_ms(Some(2000.0), 4, 2), 4000);
        assert_eq!(retry_after_ms(Some(10.0), 4, 2), 1000, "at least a second");
        assert_eq!(retry_after_ms(Some(60_000.0), 64, 1), 60_000, "at most a minute");
    }

    #[test]
    fn the_queue_limit_refuses_only_requests_that_would_wait() {
        let table =
            [(true, 2, Some(2), true), (true, 1, Some(2), false), (false, 5, Some(2), false), (true, 100, None, false)];
        for (would_wait, queued, max, refused) in table {
            assert_eq!(refuse_queued(would_wait, queued, max), refused, "{would_wait} {queued} {max:?}");
        }
    }
}
