//! The writer's circuit breaker: when the target is down altogether, hold back all writing instead of
//! failing (and so retrying, and at last dead-lettering) good records one by one.
//!
//! The first write that finds the target unavailable opens the breaker and starts one probe task; every
//! write waits while the breaker is open, holding its delivery unacked (so the message stays in the work
//! queue, and the prefetch limit stops further deliveries); the probe closes the breaker when the target
//! answers again, and the writes go on. `/readyz` reports the target as waiting meanwhile.

use std::sync::Arc;
use std::time::Duration;

use conveyor_core::health::Readiness;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::READY_TARGET;
use crate::target::Target;

/// Longest pause between two probes of a target that is down.
const MAX_PROBE_INTERVAL: Duration = Duration::from_secs(5);

pub struct Breaker {
    /// `true` while the target is down.
    open: watch::Sender<bool>,
    readiness: Readiness,
}

impl Breaker {
    pub fn new(readiness: Readiness) -> Arc<Self> {
        Arc::new(Self {
            open: watch::channel(false).0,
            readiness,
        })
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
            let mut delay = Duration::from_millis(250);
            loop {
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(delay) => {}
                }
                if target.ping().await {
                    tracing::info!("target answers again: resuming writes");
                    breaker.readiness.set(READY_TARGET, true);
                    breaker.open.send_replace(false);
                    return;
                }
                delay = (delay * 2).min(MAX_PROBE_INTERVAL);
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
