//! Exponential backoff, written once: every retry loop of conveyor's (the broker connection, a call to
//! the source, a message handed back, the breaker's probes) takes its delays from a [`Backoff`].

use std::time::Duration;

use rand::RngExt as _;
use tokio_util::sync::CancellationToken;

/// Delays that start at `first` and double with each attempt, up to `max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub first: Duration,
    pub max: Duration,
}

impl Backoff {
    pub const fn new(first: Duration, max: Duration) -> Self {
        Self { first, max }
    }

    /// The delay before retry `attempt` (0 for the first retry).
    pub fn delay(&self, attempt: u32) -> Duration {
        self.first
            .saturating_mul(1u32 << attempt.min(20))
            .min(self.max)
    }

    /// [`Backoff::delay`] with jitter, between half and all of it, so that many clients that failed
    /// together do not retry together.
    pub fn jittered(&self, attempt: u32) -> Duration {
        let full = self.delay(attempt);
        full / 2 + rand::rng().random_range(Duration::ZERO..=full / 2)
    }
}

/// Sleeps for `delay` unless `shutdown` fires first; `false` if it did.
pub async fn sleep_unless_cancelled(delay: Duration, shutdown: &CancellationToken) -> bool {
    tokio::select! {
        () = shutdown.cancelled() => false,
        () = tokio::time::sleep(delay) => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_up_to_the_maximum() {
        let backoff = Backoff::new(Duration::from_millis(250), Duration::from_secs(10));
        let delays: Vec<u128> = (0..8).map(|n| backoff.delay(n).as_millis()).collect();
        assert_eq!(delays, [250, 500, 1000, 2000, 4000, 8000, 10_000, 10_000]);
        assert_eq!(backoff.delay(u32::MAX), Duration::from_secs(10));
    }

    #[test]
    fn jitter_stays_between_half_and_all_and_varies() {
        let backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
        let delays: std::collections::BTreeSet<Duration> =
            (0..50).map(|_| backoff.jittered(3)).collect();
        assert!(delays.len() > 1, "{delays:?}");
        for delay in delays {
            assert!(delay >= Duration::from_secs(2) && delay <= Duration::from_secs(4));
        }
    }
}
