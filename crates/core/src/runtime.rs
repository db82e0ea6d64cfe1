//! The start every worker shares: load the pipeline, serve health and metrics, connect to the broker,
//! declare the topology, open a confirming publisher.

use std::net::SocketAddr;

use anyhow::Context as _;
use lapin::Connection;
use tokio_util::sync::CancellationToken;

use crate::broker::{self, Publisher, Stage, Topology};
use crate::consume::DeadLetters;
use crate::health::{self, Readiness};
use crate::metrics::Metrics;
use crate::pipeline::Pipeline;
use crate::settings::WorkerArgs;

/// Readiness condition: connected to the broker with the topology declared.
pub const READY_BROKER: &str = "broker";

/// What a started worker holds.
pub struct WorkerRuntime {
    pub pipeline: Pipeline,
    pub stage: Stage,
    pub metrics: Metrics,
    pub readiness: Readiness,
    pub connection: Connection,
    pub topology: Topology,
    pub publisher: Publisher,
    pub http_addr: SocketAddr,
}

impl WorkerRuntime {
    /// Starts a worker of `stage`. Returns `None` if `shutdown` fired before the broker was reached.
    /// `extra_ready` names further readiness conditions the worker will report (e.g. its target).
    pub async fn start(
        args: &WorkerArgs,
        stage: Stage,
        default_port: u16,
        extra_ready: &[&'static str],
        shutdown: &CancellationToken,
    ) -> anyhow::Result<Option<Self>> {
        let pipeline = Pipeline::load(&args.pipeline)?;
        let metrics = Metrics::new();
        let readiness = Readiness::default();
        readiness.require(READY_BROKER);
        for condition in extra_ready {
            readiness.require(condition);
        }
        let http_addr = health::serve(
            args.http_addr_or(default_port),
            metrics.clone(),
            readiness.clone(),
            shutdown.clone(),
        )
        .await
        .with_context(|| {
            format!(
                "binding the health endpoint on {}",
                args.http_addr_or(default_port)
            )
        })?;

        let url = args.broker.amqp_url()?;
        let endpoint = broker::endpoint(&url)?;
        let name = format!("conveyor-{stage}:{}", pipeline.name());
        let Some(connection) = broker::connect_with_retry(&url, &name, shutdown).await? else {
            return Ok(None);
        };
        tracing::info!(broker = %endpoint, pipeline = pipeline.name(), "connected to the broker");
        let topology = Topology::new(&args.broker, pipeline.name());
        let channel = connection
            .create_channel()
            .await
            .context("opening a channel to declare the topology")?;
        topology.declare(&channel).await?;
        let _ = channel.close(200, "declared".into()).await;
        let publisher = Publisher::open(&connection).await?;
        readiness.set(READY_BROKER, true);
        metrics
            .ready
            .with_label_values(&[pipeline.name(), stage.as_str()])
            .set(1);
        Ok(Some(Self {
            pipeline,
            stage,
            metrics,
            readiness,
            connection,
            topology,
            publisher,
            http_addr,
        }))
    }

    /// The dead-letter queue of this worker's stage.
    pub fn dead_letters(&self) -> DeadLetters {
        DeadLetters::new(
            self.publisher.clone(),
            self.topology.clone(),
            self.stage,
            self.metrics.clone(),
        )
    }

    /// Marks the worker not ready and closes the broker connection.
    pub async fn stop(self) {
        self.readiness.set(READY_BROKER, false);
        self.metrics
            .ready
            .with_label_values(&[self.pipeline.name(), self.stage.as_str()])
            .set(0);
        broker::close(&self.connection).await;
    }
}
