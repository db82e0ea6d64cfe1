//! One pipeline's part of a worker process, and the one reconnect loop of every worker: connect to the
//! broker, declare the pipeline's topology, open a confirming publisher, keep the stage's queue-depth
//! gauges up to date, run the worker's work on that connection, and do it all again when the broker
//! restarts or the connection drops.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use conveyor_amqp::consume::{self, ConsumeSettings, Handler};
use conveyor_amqp::dead_letters::DeadLetters;
use conveyor_amqp::{BrokerError, Publisher, Topology};
use conveyor_base::Stage;
use conveyor_base::backoff::{Backoff, sleep_unless_cancelled};
use conveyor_base::ledger::SharedLedger;
use conveyor_base::metrics::Metrics;
use conveyor_ledger::PgLedger;
use conveyor_pipeline::Pipeline;
use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use lapin::Connection;
use tokio_util::sync::CancellationToken;

use crate::health::Readiness;
use crate::refusal;
use crate::settings::WorkerArgs;

/// Readiness condition: connected to the broker with the topology declared.
pub const READY_BROKER: &str = "broker";

/// The pause between attempts to reach the broker and declare the topology: short, so that a worker
/// is back within about half a second of the broker taking connections again. An attempt at a broker
/// that is down is a refused TCP connection, cheap for both sides.
const RECONNECT: Backoff = Backoff::new(Duration::from_millis(100), Duration::from_millis(500));

/// While the broker stays out of reach, how often a worker says so.
const UNREACHABLE_REPORT: Duration = Duration::from_secs(30);

/// What a worker holds for one of its pipelines, whatever its broker connection.
pub struct WorkerRuntime {
    pub pipeline: Pipeline,
    pub stage: Stage,
    pub metrics: Metrics,
    pub readiness: Readiness,
    pub topology: Topology,
    pub http_addr: SocketAddr,
    /// Where the pipeline's stage records what it settled.
    pub ledger: SharedLedger,
    /// The database and schema the ledger is kept in (`host/db/schema`), when it is kept.
    pub ledger_home: Option<String>,
    /// Worker settings, kept for connecting and for the consume loop.
    args: WorkerArgs,
}

/// What one broker connection gives a worker's work: the connection to consume from, a confirming
/// publisher on it, and the stage's dead-letter queue through that publisher.
#[derive(Clone)]
pub struct Session {
    pub connection: Arc<Connection>,
    pub publisher: Publisher,
    pub dead_letters: DeadLetters,
}

impl WorkerRuntime {
    /// The runtime of `pipeline` in a process of `stage` (see [`crate::host::Host`]).
    pub(crate) fn new(
        pipeline: Pipeline,
        stage: Stage,
        metrics: Metrics,
        readiness: Readiness,
        http_addr: SocketAddr,
        args: &WorkerArgs,
        ledger: Option<&PgLedger>,
    ) -> Self {
        let topology =
            Topology::new(&args.broker, pipeline.name()).with_compression(args.compress_from_bytes);
        Self {
            ledger: conveyor_ledger::for_pipeline(ledger, pipeline.name()),
            ledger_home: ledger.map(PgLedger::home),
            pipeline,
            stage,
            metrics,
            readiness,
            topology,
            http_addr,
            args: args.clone(),
        }
    }

    /// Runs `work` on a session until it returns, connecting first. When it fails because the broker
    /// connection was lost, connects again (with backoff; not ready meanwhile) and runs `work` on the
    /// new session, until `shutdown`. Deliveries not acked when a connection died are redelivered by
    /// the broker, so whatever was not confirmed downstream is done again. Returns `Ok` when `work`
    /// does, or when `shutdown` fired while the broker was out of reach.
    pub async fn run_sessions<W, F>(
        &self,
        shutdown: &CancellationToken,
        mut work: W,
    ) -> anyhow::Result<()>
    where
        W: FnMut(Session) -> F + Send,
        F: Future<Output = anyhow::Result<()>> + Send,
    {
        self.sessions(shutdown, &mut |session| work(session).boxed())
            .await
    }

    /// [`WorkerRuntime::run_sessions`] for any work: the connection code is compiled here once, not in
    /// every worker crate (docs/development.md, "Build time").
    fn sessions<'a>(
        &'a self,
        shutdown: &'a CancellationToken,
        work: &'a mut (dyn FnMut(Session) -> BoxFuture<'a, anyhow::Result<()>> + Send),
    ) -> BoxFuture<'a, anyhow::Result<()>> {
        async move {
            // Set when the last session ended because a confirm did not come: the next one is ready only
            // once it went a confirm timeout without the same.
            let mut stalled_before = false;
            // The node of the last connection lost, tried last by the next one.
            let mut lost = None;
            loop {
                let Some((session, node)) = self.connect(shutdown, lost).await? else {
                    return Ok(());
                };
                lost = Some(node);
                let connection = session.connection.clone();
                let stalled = session.publisher.stalled();
                if !stalled_before {
                    self.readiness.set(READY_BROKER, true);
                }
                let depths = match connection.create_channel().await {
                    Ok(channel) => Some(tokio::spawn(watch_queue_depths(
                        channel,
                        self.topology.clone(),
                        self.stage,
                        self.metrics.clone(),
                    ))),
                    Err(err) => {
                        tracing::warn!(error = %err, "no channel for the queue-depth gauges");
                        None
                    }
                };
                let work = work(session);
                tokio::pin!(work);
                let probation = tokio::time::sleep(self.args.broker.confirm_timeout());
                tokio::pin!(probation);
                let result = loop {
                    tokio::select! {
                        result = &mut work => break Some(result),
                        () = stalled.cancelled() => break None,
                        () = &mut probation, if stalled_before => {
                            stalled_before = false;
                            self.readiness.set(READY_BROKER, true);
                        }
                    }
                };
                if let Some(depths) = depths {
                    depths.abort();
                }
                let Some(result) = result else {
                    // The work in hand is dropped with the connection: nothing of it was acked, and the
                    // broker gives it back to whoever consumes next.
                    let why = format!(
                        "a publish was not confirmed within {} s (a node hung, the cluster lost its majority, or an alarm of the broker blocks publishing?): holding work and connecting again",
                        self.args.broker.confirm_timeout_secs
                    );
                    tracing::warn!("{why}");
                    self.readiness.wait(READY_BROKER, why);
                    stalled_before = true;
                    conveyor_amqp::close(&connection).await;
                    continue;
                };
                if !stalled_before {
                    self.readiness.set(READY_BROKER, false);
                }
                let lost_broker = result.as_ref().is_err_and(|err| {
                    err.downcast_ref::<BrokerError>().is_some() || !connection.status().connected()
                });
                conveyor_amqp::close(&connection).await;
                match result {
                    Err(err) if lost_broker && !shutdown.is_cancelled() => {
                        tracing::warn!(error = %format!("{err:#}"), "lost the broker; reconnecting");
                    }
                    other => return other,
                }
            }
        }
        .boxed()
    }

    /// Consumes the stage's work queue until `shutdown`, through [`WorkerRuntime::run_sessions`].
    /// `make_handler` builds the handler for each session (it publishes through that session).
    pub async fn consume<H: Handler>(
        &self,
        make_handler: impl Fn(&Session) -> H + Send + Sync,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<()> {
        let settings = self.consume_settings(self.args.prefetch);
        self.run_sessions(shutdown, |session| {
            let handler = Arc::new(make_handler(&session));
            let settings = settings.clone();
            async move {
                consume::run(
                    &session.connection,
                    settings,
                    handler,
                    session.dead_letters,
                    self.ledger.clone(),
                    self.metrics.clone(),
                    shutdown.clone(),
                )
                .await?;
                Ok(())
            }
        })
        .await
    }

    /// How the stage consumes its work queue, `prefetch` deliveries at a time.
    pub fn consume_settings(&self, prefetch: u16) -> ConsumeSettings {
        ConsumeSettings {
            topology: self.topology.clone(),
            stage: self.stage,
            prefetch,
            drain_timeout: Duration::from_secs(self.args.drain_timeout_secs),
            max_attempts: self.args.max_attempts,
        }
    }

    /// Connects (retrying with backoff until `shutdown`, then `None`), declares the topology and opens
    /// a publisher; says which node (by its place in the URL list) it connected to, starting after
    /// the node `lost` when given. A wrong URL and a TLS failure (a certificate not trusted, a client
    /// certificate refused) are not retried: waiting does not fix a configuration.
    async fn connect(
        &self,
        shutdown: &CancellationToken,
        lost: Option<usize>,
    ) -> anyhow::Result<Option<(Session, usize)>> {
        let address = self.args.broker.address()?;
        let endpoint = conveyor_amqp::endpoint(address.url())?;
        let name = format!("conveyor-{}:{}", self.stage, self.pipeline.name());
        let mut reported: Option<std::time::Instant> = None;
        let mut refusals = 0;
        for attempt in 0.. {
            let mut delay = RECONNECT.delay(attempt);
            // The first failure, then one line every UNREACHABLE_REPORT: not one per attempt.
            let mut report = || {
                let due = reported.is_none_or(|at| at.elapsed() >= UNREACHABLE_REPORT);
                if due {
                    reported = Some(std::time::Instant::now());
                }
                due
            };
            match conveyor_amqp::connect_after(&address, &name, lost).await {
                Ok(conveyor_amqp::Connected { connection, node }) => {
                    let connection = Arc::new(connection);
                    // A broker that is still starting accepts connections before it can declare
                    // queues.
                    let declared = async {
                        self.topology.declare(&connection).await?;
                        Ok::<_, BrokerError>(
                            Publisher::renewable(connection.clone())
                                .await?
                                .with_confirm_timeout(self.args.broker.confirm_timeout()),
                        )
                    }
                    .await;
                    match declared {
                        Ok(publisher) => {
                            tracing::info!(broker = %endpoint, pipeline = self.pipeline.name(), "connected to the broker");
                            let dead_letters = DeadLetters::new(
                                publisher.clone(),
                                self.topology.clone(),
                                self.stage,
                                self.metrics.clone(),
                            );
                            let session = Session {
                                connection,
                                publisher,
                                dead_letters,
                            };
                            return Ok(Some((session, node)));
                        }
                        Err(err) => {
                            if report() {
                                tracing::warn!(error = %err, attempt, "declaring the topology failed; trying again");
                            }
                            conveyor_amqp::close(&connection).await;
                        }
                    }
                }
                Err(err @ (BrokerError::Url(_) | BrokerError::Tls { .. })) => {
                    return Err(err.into());
                }
                // A setup error, said once at ERROR and in /readyz; asked again now and then, as
                // the user may be created or given the vhost meanwhile.
                Err(err @ BrokerError::Refused { .. }) => {
                    if refusals == 0 {
                        tracing::error!(error = %err, "the broker refuses the credentials: not ready; trying again every minute at most");
                    }
                    self.readiness.wait(READY_BROKER, format!("refused: {err}"));
                    delay = refusal::CHECKS.delay(refusals);
                    refusals += 1;
                }
                Err(err) => {
                    if report() {
                        tracing::warn!(error = %err, attempt, "broker not reachable; trying again every half second");
                    }
                }
            }
            if !sleep_unless_cancelled(delay, shutdown).await {
                return Ok(None);
            }
        }
        unreachable!("the attempts never run out")
    }
}

/// How often a worker refreshes the queue-depth gauges of its stage.
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
