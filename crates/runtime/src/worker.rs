//! The start every worker shares: load the pipeline, serve health and metrics, connect to the broker,
//! declare the topology, open a confirming publisher; and the reconnect loop that does it all again
//! when the broker restarts or the connection drops.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use lapin::Connection;
use tokio_util::sync::CancellationToken;

use conveyor_amqp::consume::{self, ConsumeSettings, Handler};
use conveyor_amqp::dead_letters::DeadLetters;
use conveyor_amqp::{Publisher, Topology};
use conveyor_base::Stage;
use conveyor_base::metrics::Metrics;
use conveyor_pipeline::Pipeline;

use crate::health::{self, Readiness};
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
    /// Worker settings, kept for reconnecting and for the consume loop.
    args: WorkerArgs,
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
        metrics.initialize(pipeline.name(), stage);
        let readiness = Readiness::default();
        readiness.require(READY_BROKER);
        for condition in extra_ready {
            readiness.require(condition);
        }
        readiness.attach_gauge(
            metrics
                .ready
                .with_label_values(&[pipeline.name(), stage.as_str()]),
        );
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

        let name = format!("conveyor-{stage}:{}", pipeline.name());
        let topology = Topology::new(&args.broker, pipeline.name());
        let Some((connection, publisher)) =
            connect_and_declare(args, &name, &topology, shutdown).await?
        else {
            return Ok(None);
        };
        let runtime = Self {
            pipeline,
            stage,
            metrics,
            readiness,
            connection,
            topology,
            publisher,
            http_addr,
            args: args.clone(),
        };
        runtime.set_connected(true);
        Ok(Some(runtime))
    }

    fn set_connected(&self, connected: bool) {
        self.readiness.set(READY_BROKER, connected);
    }

    /// Drops the broken connection and connects again (with backoff), declares the topology again
    /// and opens a new publisher. Not ready meanwhile. Returns `false` if `shutdown` fired first.
    pub async fn reconnect(&mut self, shutdown: &CancellationToken) -> anyhow::Result<bool> {
        self.set_connected(false);
        conveyor_amqp::close(&self.connection).await;
        let name = format!("conveyor-{}:{}", self.stage, self.pipeline.name());
        let Some((connection, publisher)) =
            connect_and_declare(&self.args, &name, &self.topology, shutdown).await?
        else {
            return Ok(false);
        };
        self.connection = connection;
        self.publisher = publisher;
        self.set_connected(true);
        Ok(true)
    }

    /// Consumes the stage's work queue until `shutdown`, reconnecting whenever the broker connection
    /// or channel fails. `make_handler` builds the handler for each connection (it publishes through
    /// that connection's publisher). Deliveries not acked when a connection died are redelivered by the
    /// broker, so whatever was not confirmed downstream is done again.
    pub async fn consume<H: Handler>(
        &mut self,
        make_handler: impl Fn(&WorkerRuntime) -> H,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<()> {
        loop {
            let settings = ConsumeSettings {
                topology: self.topology.clone(),
                stage: self.stage,
                prefetch: self.args.broker.prefetch,
                drain_timeout: Duration::from_secs(self.args.drain_timeout_secs),
                max_attempts: self.args.max_attempts,
            };
            let depths = match self.connection.create_channel().await {
                Ok(channel) => Some(tokio::spawn(watch_queue_depths(
                    channel,
                    self.topology.clone(),
                    self.stage,
                    self.metrics.clone(),
                ))),
                Err(err) => {
                    tracing::debug!(error = %err, "no channel for the queue-depth gauge");
                    None
                }
            };
            let result = consume::run(
                &self.connection,
                settings,
                Arc::new(make_handler(self)),
                self.dead_letters(),
                self.metrics.clone(),
                shutdown.clone(),
            )
            .await;
            if let Some(depths) = depths {
                depths.abort();
            }
            match result {
                Ok(()) => return Ok(()),
                Err(err) => {
                    tracing::warn!(error = %err, "lost the broker; reconnecting");
                    if !self.reconnect(shutdown).await? {
                        return Ok(());
                    }
                }
            }
        }
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
        self.set_connected(false);
        conveyor_amqp::close(&self.connection).await;
    }
}

/// How often a worker refreshes the queue-depth gauge of its stage.
const QUEUE_DEPTH_INTERVAL: Duration = Duration::from_secs(10);

/// Keeps `conveyor_queue_messages` of the stage's work, retry and dead-letter queues up to date (messages
/// ready in each, by passive declare) until aborted or the connection fails.
async fn watch_queue_depths(
    channel: lapin::Channel,
    topology: Topology,
    stage: Stage,
    metrics: Metrics,
) {
    let kinds = [
        ("work", vec![topology.queue(stage)]),
        ("retry", topology.retry_queues(stage)),
        ("dead_letter", vec![topology.dead_letter_queue(stage)]),
    ];
    loop {
        for (kind, queues) in &kinds {
            let mut total = 0i64;
            for queue in queues {
                match conveyor_amqp::queue_depth(&channel, queue).await {
                    Ok(depth) => total += i64::from(depth),
                    Err(err) => {
                        // A lost connection is reported (and the watch restarted) by the reconnect;
                        // a queue deleted behind the pipeline's back is said here.
                        tracing::warn!(error = %err, queue, "stopped reading queue depths");
                        return;
                    }
                }
            }
            metrics
                .queue_messages
                .with_label_values(&[topology.pipeline(), stage.as_str(), kind])
                .set(total);
        }
        tokio::time::sleep(QUEUE_DEPTH_INTERVAL).await;
    }
}

/// Connects (retrying with backoff until `shutdown`), declares the topology, opens a publisher.
async fn connect_and_declare(
    args: &WorkerArgs,
    name: &str,
    topology: &Topology,
    shutdown: &CancellationToken,
) -> anyhow::Result<Option<(Connection, Publisher)>> {
    let address = args.broker.address()?;
    let endpoint = conveyor_amqp::endpoint(address.url())?;
    let mut delay = Duration::from_millis(250);
    loop {
        let Some(connection) = conveyor_amqp::connect_with_retry(&address, name, shutdown).await?
        else {
            return Ok(None);
        };
        // A broker that is still starting accepts connections before it can declare queues.
        let declared = async {
            topology.declare(&connection).await?;
            anyhow::Ok(Publisher::open(&connection).await?)
        }
        .await;
        match declared {
            Ok(publisher) => {
                tracing::info!(broker = %endpoint, pipeline = topology.pipeline(), "connected to the broker");
                return Ok(Some((connection, publisher)));
            }
            Err(err) => {
                tracing::warn!(error = %format!("{err:#}"), retry_in_ms = delay.as_millis() as u64, "declaring the topology failed");
                conveyor_amqp::close(&connection).await;
            }
        }
        tokio::select! {
            () = shutdown.cancelled() => return Ok(None),
            () = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(Duration::from_secs(10));
    }
}
