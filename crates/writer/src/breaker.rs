//! The writer's circuit breaker: when the target is down altogether, hold back all writing instead of
//! failing (and so retrying, and at last dead-lettering) good records one by one.
//!
//! The first write that finds the target unavailable opens the breaker and starts one probe task; every
//! write waits while the breaker is open, holding its delivery unacked (so the message stays in the work
//! queue, and the prefetch limit stops further deliveries); the probe closes the breaker when the target
//! answers again, and the writes go on. `/readyz` reports the target as waiting meanwhile.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use conveyor_base::backoff::Backoff;
use conveyor_runtime::health::Readiness;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::READY_TARGET;
use crate::target::Target;

/// The pauses between probes of a target that is down: 250 ms before the first probe of a target that
/// was writing until then, doubling up to 5 s.
const PROBES: Backoff = Backoff::new(Duration::from_millis(250), Duration::from_secs(5));

pub struct Breaker {
    /// `true` while the target is down.
    open: watch::Sender<bool>,
    /// Probes since the last successful write: the pause before the next one keeps growing across
    /// openings until a write succeeds, so that a target whose probe answers while its writes still
    /// fail (a 429, or a write path down behind a live front) is tried ever less often, not four times
    /// a second.
    probes: AtomicU32,
    readiness: Readiness,
}

impl Breaker {
    pub fn new(readiness: Readiness) -> Arc<Self> {
        Arc::new(Self {
            open: watch::channel(false).0,
            probes: AtomicU32::new(0),
            readiness,
        })
    }

    /// A write succeeded: the next opening probes soon again.
    pub fn written(&self) {
        self.probes.store(0, Ordering::Relaxed);
    }

    /// The pause before the next probe; the one after it is twice as long (up to the maximum).
    fn next_probe_interval(&self) -> Duration {
        PROBES.delay(self.probes.fetch_add(1, Ordering::Relaxed))
    }

    pub fn is_open(&self) -> bool {
        *self.open.borrow()
    }

    /// Opens the breaker (if it is not open yet) and probes `target` until it answers.
    pub fn trip<T: Target>(
        self: &Arc<Self>,
        target: Arc<T>,
        reason: &str,
        shutdown: CancellationToken,
    ) {
        let opened = self
            .open
            .send_if_modified(|open| !std::mem::replace(open, true));
        if !opened {
            return;
        }
        tracing::warn!(error = %reason, "target unavailable: holding back all writes until it answers again");
        self.readiness.set(READY_TARGET, false);
        let breaker = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(breaker.next_probe_interval()) => {}
                }
                if target.ping().await {
                    tracing::info!("target answers again: resuming writes");
                    breaker.readiness.set(READY_TARGET, true);
                    breaker.open.send_replace(false);
                    return;
                }
            }
        });
    }

    /// Waits while the breaker is open. Returns `false` if `shutdown` fired first.
    pub async fn wait_closed(&self, shutdown: &CancellationToken) -> bool {
        let mut open = self.open.subscribe();
        tokio::select! {
            () = shutdown.cancelled() => false,
            closed = open.wait_for(|open| !*open) => closed.is_ok(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probes_grow_apart_across_openings_until_a_write_succeeds() {
        let breaker = Breaker::new(Readiness::default());
        let intervals: Vec<_> = (0..7).map(|_| breaker.next_probe_interval()).collect();
        assert_eq!(
            intervals,
            [250, 500, 1_000, 2_000, 4_000, 5_000, 5_000].map(Duration::from_millis)
        );
        breaker.written();
        assert_eq!(breaker.next_probe_interval(), PROBES.first);
    }
}
