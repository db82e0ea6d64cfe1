//! The writer's circuit breaker: when the target is down altogether, hold back all writing instead of
//! failing (and so retrying, and at last dead-lettering) good records one by one.
//!
//! The first write that finds the target unavailable opens the breaker and starts one probe task; every
//! write waits while the breaker is open, holding its delivery unacked (so the message stays in the work
//! queue, and the prefetch limit stops further deliveries); the probe closes the breaker when the target
//! answers again, and the writes go on. `/readyz` reports the target as waiting meanwhile.

use std::sync::Arc;
use std::time::Duration;

use conveyor_runtime::health::Readiness;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::READY_TARGET;
use crate::target::Target;

/// Pause before the first probe of a target that was writing until then.
const FIRST_PROBE_INTERVAL: Duration = Duration::from_millis(250);
/// Longest pause between two probes of a target that is down.
const MAX_PROBE_INTERVAL: Duration = Duration::from_secs(5);

pub struct Breaker {
    /// `true` while the target is down.
    open: watch::Sender<bool>,
    /// The pause before the next probe. It keeps growing across openings until a write succeeds: a
    /// target whose probe answers while its writes still fail (a 429, or a write path down behind a
    /// live front) is then tried ever less often, not four times a second.
    probe_interval: std::sync::Mutex<Duration>,
    readiness: Readiness,
}

impl Breaker {
    pub fn new(readiness: Readiness) -> Arc<Self> {
        Arc::new(Self {
            open: watch::channel(false).0,
            probe_interval: std::sync::Mutex::new(FIRST_PROBE_INTERVAL),
            readiness,
        })
    }

    /// A write succeeded: the next opening probes soon again.
    pub fn written(&self) {
        *self.probe_interval.lock().expect("no panics while locked") = FIRST_PROBE_INTERVAL;
    }

    /// The pause before the next probe; the one after it is twice as long (up to the maximum).
    fn next_probe_interval(&self) -> Duration {
        let mut interval = self.probe_interval.lock().expect("no panics while locked");
        let this = *interval;
        *interval = (this * 2).min(MAX_PROBE_INTERVAL);
        this
    }

    pub fn is_open(&self) -> bool {
        *self.open.borrow()
    }

    /// Opens the breaker (if it is not open yet) and probes `target` until it answers.
    pub fn trip(self: &Arc<Self>, target: Arc<Target>, reason: &str, shutdown: CancellationToken) {
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
        assert_eq!(breaker.next_probe_interval(), FIRST_PROBE_INTERVAL);
    }
}
