//! The HTTP endpoints every worker serves: `/metrics`, `/healthz` (the process runs) and `/readyz`
//! (it can do its work: for each pipeline it hosts, connected to the broker and, for a writer, to
//! its target).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use conveyor_base::metrics::Metrics;

/// Named conditions that must all hold for the worker to be ready, each unmet one with what it waits
/// for when that is known.
#[derive(Clone, Default)]
pub struct Readiness {
    conditions: Arc<Mutex<BTreeMap<&'static str, Condition>>>,
    /// The `conveyor_ready` gauge, kept equal to [`Readiness::is_ready`].
    gauge: Arc<Mutex<Option<prometheus::IntGauge>>>,
}

impl Readiness {
    /// Keeps `gauge` at 1 while ready, 0 otherwise.
    pub(crate) fn attach_gauge(&self, gauge: prometheus::IntGauge) {
        gauge.set(i64::from(self.is_ready()));
        *self.gauge.lock().unwrap_or_else(|p| p.into_inner()) = Some(gauge);
    }

    /// Registers a condition, not yet met.
    pub fn require(&self, name: &'static str) {
        self.lock().entry(name).or_insert(Condition::Waiting(None));
    }

    pub fn set(&self, name: &'static str, met: bool) {
        let condition = if met {
            Condition::Met
        } else {
            Condition::Waiting(None)
        };
        self.put(name, condition);
    }

    /// The condition is not met, for the reason given (shown by `/readyz`).
    pub fn wait(&self, name: &'static str, why: impl Into<String>) {
        self.put(name, Condition::Waiting(Some(why.into())));
    }

    fn put(&self, name: &'static str, condition: Condition) {
        self.lock().insert(name, condition);
        if let Some(gauge) = &*self.gauge.lock().unwrap_or_else(|p| p.into_inner()) {
            gauge.set(i64::from(self.is_ready()));
        }
    }

    pub(crate) fn is_ready(&self) -> bool {
        let conditions = self.lock();
        !conditions.is_empty() && conditions.values().all(|c| *c == Condition::Met)
    }

    /// One line per condition: `name: ok`, `name: waiting`, or `name: waiting: why`.
    pub fn report(&self) -> String {
        self.lock()
            .iter()
            .map(|(name, condition)| match condition {
                Condition::Met => format!("{name}: ok\n"),
                Condition::Waiting(None) => format!("{name}: waiting\n"),
                Condition::Waiting(Some(why)) => format!("{name}: waiting: {why}\n"),
            })
            .collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<&'static str, Condition>> {
        self.conditions
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[derive(Clone, PartialEq, Eq)]
enum Condition {
    Met,
    Waiting(Option<String>),
}

/// The readiness of every pipeline a process hosts: ready when each of them is.
#[derive(Clone, Default)]
pub(crate) struct HostReadiness {
    pipelines: Arc<Vec<(String, Readiness)>>,
}

impl HostReadiness {
    pub fn new(pipelines: Vec<(String, Readiness)>) -> Self {
        Self {
            pipelines: Arc::new(pipelines),
        }
    }

    pub(crate) fn is_ready(&self) -> bool {
        !self.pipelines.is_empty() && self.pipelines.iter().all(|(_, r)| r.is_ready())
    }

    /// One line per condition of each pipeline, `pipeline name: ok` or `pipeline name: waiting`.
    pub fn report(&self) -> String {
        self.pipelines
            .iter()
            .flat_map(|(pipeline, readiness)| {
                readiness
                    .report()
                    .lines()
                    .map(|line| format!("{pipeline} {line}\n"))
                    .collect::<Vec<_>>()
            })
            .collect()
    }
}

#[derive(Clone)]
struct HealthState {
    metrics: Metrics,
    readiness: HostReadiness,
}

pub(crate) fn router(metrics: Metrics, readiness: HostReadiness) -> Router {
    Router::new()
        .route("/metrics", get(render_metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .with_state(HealthState { metrics, readiness })
}

async fn render_metrics(State(state): State<HealthState>) -> String {
    state.metrics.render()
}

async fn ready(State(state): State<HealthState>) -> (StatusCode, String) {
    let status = if state.readiness.is_ready() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, state.readiness.report())
}

/// Binds `addr` and serves the endpoints until `shutdown` fires. Returns the bound address.
pub(crate) async fn serve(
    addr: SocketAddr,
    metrics: Metrics,
    readiness: HostReadiness,
    shutdown: CancellationToken,
) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let app = router(metrics, readiness);
    tokio::spawn(async move {
        let stopped = shutdown.cancelled_owned();
        if let Err(err) = axum::serve(listener, app)
            .with_graceful_shutdown(stopped)
            .await
        {
            tracing::error!(error = %err, "health endpoint failed");
        }
    });
    tracing::info!(addr = %bound, "serving /metrics, /healthz and /readyz");
    Ok(bound)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_only_when_every_condition_holds() {
        let readiness = Readiness::default();
        assert!(!readiness.is_ready(), "nothing registered is not ready");
        readiness.require("broker");
        readiness.require("target");
        readiness.set("broker", true);
        assert!(!readiness.is_ready());
        assert_eq!(readiness.report(), "broker: ok\ntarget: waiting\n");
        readiness.wait("broker", "publishes not confirmed");
        assert_eq!(
            readiness.report(),
            "broker: waiting: publishes not confirmed\ntarget: waiting\n"
        );
        readiness.set("broker", true);
        readiness.set("target", true);
        assert!(readiness.is_ready());
    }

    #[test]
    fn a_host_is_ready_when_every_pipeline_is_and_names_each() {
        let (orders, lines) = (Readiness::default(), Readiness::default());
        orders.require("target");
        lines.require("target");
        let host = HostReadiness::new(vec![
            ("orders".into(), orders.clone()),
            ("lines".into(), lines.clone()),
        ]);
        orders.set("target", true);
        assert!(!host.is_ready());
        assert_eq!(host.report(), "orders target: ok\nlines target: waiting\n");
        lines.set("target", true);
        assert!(host.is_ready());
    }
}
