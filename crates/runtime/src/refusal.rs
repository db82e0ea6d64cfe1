//! Holding a worker back while a service it needs refuses its credentials (a wrong client secret, a
//! revoked app, a missing permission): a setup error, for a human to fix, that no message is at fault
//! for. Retrying each message through the retry tiers would only burn its attempts and end in a dead
//! letter, so instead the worker stops working, says why in `/readyz`, logs one ERROR, and checks the
//! credentials again now and then; once they are accepted, the work goes on where it stopped.
//!
//! Work that meets a refusal calls [`RefusalGate::refuse`] and waits in [`RefusalGate::wait_accepted`]
//! holding its delivery unacked (the message stays in its queue, and the prefetch limit stops further
//! deliveries); the check at start goes through [`RefusalGate::check_at_start`].

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use conveyor_base::backoff::{Backoff, sleep_unless_cancelled};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::health::Readiness;

/// The pauses between checks of refused credentials: someone has to change them, so there is no
/// hurry, and a login endpoint should not be hammered.
pub const CHECKS: Backoff = Backoff::new(Duration::from_secs(5), Duration::from_secs(60));

/// The longest a delivery waits at a closed gate before it is given back (RabbitMQ closes the channel
/// of a delivery unacked for 30 minutes).
pub const HOLD_AT_MOST: Duration = Duration::from_secs(600);

/// What a credential check found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Checked {
    /// The credentials are accepted.
    Accepted,
    /// They are refused, for this reason (said in words, naming the setting to look at).
    Refused(String),
    /// The service could not say (down, timed out): the work's own retries deal with that.
    Unknown(String),
}

/// A check of the credentials, asked at start and then every while as long as they are refused.
pub type CredentialCheck =
    Arc<dyn Fn() -> Pin<Box<dyn Future<Output = Checked> + Send>> + Send + Sync>;

/// The gate of one dependency (the source, the target) of one pipeline.
pub struct RefusalGate {
    check: CredentialCheck,
    /// The readiness condition it holds down while refused.
    condition: &'static str,
    /// What the dependency is, for the log: "the source", "the target".
    what: &'static str,
    /// `Some(reason)` while the credentials are refused.
    refused: watch::Sender<Option<String>>,
    readiness: Readiness,
    /// Whether the ERROR was logged since work last succeeded: one line per episode, however many
    /// times a check passes and the work is refused again (a bearer token can only be tried by
    /// writing).
    reported: AtomicBool,
    checks: AtomicU32,
}

impl RefusalGate {
    /// The gate of the readiness condition `condition`, its dependency named `what` in logs.
    pub fn new(
        readiness: Readiness,
        condition: &'static str,
        what: &'static str,
        check: CredentialCheck,
    ) -> Arc<Self> {
        Arc::new(Self {
            check,
            condition,
            what,
            refused: watch::channel(None).0,
            readiness,
            reported: AtomicBool::new(false),
            checks: AtomicU32::new(0),
        })
    }

    pub fn is_refused(&self) -> bool {
        self.refused.borrow().is_some()
    }

    /// Why the credentials are refused, while they are.
    pub fn refusal(&self) -> Option<String> {
        self.refused.borrow().clone()
    }

    /// Work went through: a later refusal is a new episode, logged again.
    pub fn worked(&self) {
        self.reported.store(false, Ordering::Relaxed);
        self.checks.store(0, Ordering::Relaxed);
    }

    /// Checks the credentials before any work; refused, the gate closes (see [`Self::refuse`]).
    /// Returns what the check found.
    pub async fn check_at_start(self: &Arc<Self>, shutdown: &CancellationToken) -> Checked {
        let found = (self.check)().await;
        self.begin(&found, shutdown);
        found
    }

    /// Opens the gate, or closes it, by what a check before any work `found`.
    pub fn begin(self: &Arc<Self>, found: &Checked, shutdown: &CancellationToken) {
        match found {
            Checked::Accepted => {
                tracing::info!("{} accepts the credentials", self.what);
                self.readiness.set(self.condition, true);
            }
            Checked::Refused(reason) => self.refuse(reason, shutdown.clone()),
            Checked::Unknown(reason) => {
                tracing::warn!(
                    reason,
                    "cannot check the credentials of {} now; going on (its calls are retried)",
                    self.what
                );
                self.readiness.set(self.condition, true);
            }
        }
    }

    /// The credentials were refused: holds the work back, says why, and checks them again every while
    /// until they are accepted (or `shutdown`). Refusals while already refused are one.
    pub fn refuse(self: &Arc<Self>, reason: &str, shutdown: CancellationToken) {
        let closed = self.refused.send_if_modified(|refused| {
            let closing = refused.is_none();
            if closing {
                *refused = Some(reason.to_owned());
            }
            closing
        });
        if !closed {
            return;
        }
        self.readiness
            .wait(self.condition, format!("refused: {reason}"));
        if !self.reported.swap(true, Ordering::Relaxed) {
            tracing::error!(
                reason,
                "{} refuses the credentials: holding back all work until they are accepted \
                 (checked again every minute at most; nothing is dead-lettered meanwhile)",
                self.what
            );
        }
        let gate = self.clone();
        tokio::spawn(async move {
            loop {
                let pause = CHECKS.delay(gate.checks.fetch_add(1, Ordering::Relaxed));
                if !sleep_unless_cancelled(pause, &shutdown).await {
                    return;
                }
                match (gate.check)().await {
                    Checked::Accepted => {
                        tracing::info!("{} accepts the credentials again: resuming", gate.what);
                        gate.readiness.set(gate.condition, true);
                        gate.refused.send_replace(None);
                        return;
                    }
                    Checked::Refused(reason) => {
                        tracing::debug!(reason, "credentials still refused");
                        gate.readiness
                            .wait(gate.condition, format!("refused: {reason}"));
                    }
                    Checked::Unknown(reason) => {
                        tracing::debug!(reason, "cannot check the credentials now");
                    }
                }
            }
        });
    }

    /// Waits while the credentials are refused. Returns `false` if `shutdown` fired first, or after
    /// [`HOLD_AT_MOST`]: the caller then gives its message back to the queue (and takes it again),
    /// so that no delivery stays unacked long enough for the broker's consumer timeout.
    pub async fn wait_accepted(&self, shutdown: &CancellationToken) -> bool {
        let mut refused = self.refused.subscribe();
        tokio::select! {
            () = shutdown.cancelled() => false,
            () = tokio::time::sleep(HOLD_AT_MOST) => false,
            accepted = refused.wait_for(Option::is_none) => accepted.is_ok(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_refusal_holds_until_a_check_accepts_and_is_reported_once() {
        let readiness = Readiness::default();
        readiness.require("source credentials");
        let accept = Arc::new(AtomicBool::new(false));
        let check: CredentialCheck = {
            let accept = accept.clone();
            Arc::new(move || {
                let accepted = accept.load(Ordering::Relaxed);
                Box::pin(async move {
                    if accepted {
                        Checked::Accepted
                    } else {
                        Checked::Refused("code 4008".into())
                    }
                })
            })
        };
        let gate = RefusalGate::new(readiness.clone(), "source credentials", "the source", check);
        let shutdown = CancellationToken::new();
        let found = gate.check_at_start(&shutdown).await;
        assert_eq!(found, Checked::Refused("code 4008".into()));
        assert!(gate.is_refused());
        assert!(
            readiness
                .report()
                .contains("source credentials: waiting: refused: code 4008"),
            "{}",
            readiness.report()
        );
        gate.refuse("again", shutdown.clone());
        assert!(gate.reported.load(Ordering::Relaxed));

        let waiting = tokio::spawn({
            let gate = gate.clone();
            let shutdown = shutdown.clone();
            async move { gate.wait_accepted(&shutdown).await }
        });
        tokio::time::sleep(Duration::from_secs(30)).await;
        assert!(!waiting.is_finished(), "still refused: the work waits");
        accept.store(true, Ordering::Relaxed);
        tokio::time::sleep(Duration::from_secs(61)).await;
        assert!(waiting.await.unwrap(), "accepted: the work goes on");
        assert!(!gate.is_refused());
        assert_eq!(readiness.report(), "source credentials: ok\n");
    }
}
