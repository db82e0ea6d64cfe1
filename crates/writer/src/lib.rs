//! The writer: takes mapped batches from the write queue and writes each into the target in one
//! idempotent statement, acking only after the write committed and its settlement is in the ledger
//! (for the PostgreSQL target, in the same statement; for the others, once the target answered). A target that is down altogether holds
//! back the whole writer (see [`breaker`]), and so does one that refuses the credentials
//! ([`conveyor_runtime::refusal`]); a batch the target refuses for its data is split so that
//! only the records at fault are dead-lettered.

pub mod breaker;
pub mod target;

use std::sync::Arc;

use conveyor_amqp::consume::Handler;
use conveyor_amqp::dead_letters::DeadLetters;
use conveyor_amqp::envelope::Envelope;
use conveyor_base::ledger::{Settled, SharedLedger};
use conveyor_base::metrics::Metrics;
use conveyor_base::{Disposition, ErrorClass, Failure, Record, Stage};
use conveyor_pipeline::TargetSpec;
use conveyor_runtime::host::Host;
use conveyor_runtime::refusal::{CredentialCheck, RefusalGate};
use conveyor_runtime::settings::WorkerArgs;
use conveyor_runtime::worker::WorkerRuntime;
use tokio_util::sync::CancellationToken;

use crate::breaker::Breaker;
use crate::target::http::{HttpArgs, HttpTarget};
use crate::target::postgres::{PostgresArgs, PostgresTarget};
use crate::target::{Target, WriteError, WriteReport, noop::NoopTarget};

/// Readiness condition: the target is reachable and set up.
pub const READY_TARGET: &str = "target";
/// Readiness condition: the target accepts the credentials (or could not say at start).
pub const READY_TARGET_CREDENTIALS: &str = "target credentials";

/// The writer's command line (every flag also reads an environment variable).
#[derive(Debug, clap::Parser)]
#[command(
    name = "conveyor-writer",
    version,
    about = "Writes mapped records into the target"
)]
pub struct Cli {
    #[command(flatten)]
    pub worker: WorkerArgs,
    /// Longest wait for a row or table lock before a write fails (and is retried later); 0 waits forever.
    #[arg(long, env = "CONVEYOR_PG_LOCK_TIMEOUT_MS", default_value_t = 10_000)]
    pub pg_lock_timeout_ms: u64,
    #[command(flatten)]
    pub http: HttpArgs,
}

/// The `conveyor-writer` process: its command line, then [`run`] until SIGTERM. Here and not in the
/// binary, so that the async code is compiled in this crate, once.
pub fn main() -> std::process::ExitCode {
    let cli = <Cli as clap::Parser>::parse();
    conveyor_runtime::process::run_worker(&cli.worker.clone(), |shutdown| run(cli, shutdown))
}

pub async fn run(cli: Cli, shutdown: CancellationToken) -> anyhow::Result<()> {
    let host = Host::start(
        &cli.worker,
        Stage::Write,
        9103,
        &[READY_TARGET, READY_TARGET_CREDENTIALS],
        &shutdown,
    )
    .await?;
    let Some(host) = host else { return Ok(()) };
    host.run(&shutdown, |runtime, cli: Cli, shutdown| async move {
        write(&runtime, &cli, &shutdown).await
    })
    .await
}

/// Writes one pipeline's write queue into its target until `shutdown`.
async fn write(
    runtime: &WorkerRuntime,
    cli: &Cli,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    let postgres = PostgresArgs {
        lock_timeout_ms: Some(cli.pg_lock_timeout_ms),
        ..cli.worker.postgres.clone()
    };
    let pipeline = &runtime.pipeline;
    match &pipeline.spec.target {
        TargetSpec::Postgres(spec) => {
            let target =
                PostgresTarget::open(pipeline, spec, &postgres, runtime.ledger_home.as_deref())
                    .await?;
            serve(runtime, target, shutdown).await
        }
        TargetSpec::Http(spec) => {
            let target = HttpTarget::open(pipeline, spec, &cli.http).await?;
            serve(runtime, target, shutdown).await
        }
        TargetSpec::Noop(_) => serve(runtime, NoopTarget::default(), shutdown).await,
    }
}

/// Consumes the write queue into `target` until `shutdown`.
async fn serve<T: Target>(
    runtime: &WorkerRuntime,
    target: T,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    let target = Arc::new(target);
    runtime.readiness.set(READY_TARGET, true);
    let gate = RefusalGate::new(
        runtime.readiness.clone(),
        READY_TARGET_CREDENTIALS,
        "the target",
        credential_check(&target),
    );
    gate.check_at_start(shutdown).await;
    let breaker = Breaker::new(runtime.readiness.clone());
    let result = runtime
        .consume(
            |session| Writer {
                pipeline: runtime.pipeline.name().to_owned(),
                target: target.clone(),
                breaker: breaker.clone(),
                gate: gate.clone(),
                dead_letters: session.dead_letters.clone(),
                ledger: runtime.ledger.clone(),
                metrics: runtime.metrics.clone(),
                shutdown: shutdown.clone(),
            },
            shutdown,
        )
        .await;
    runtime.readiness.set(READY_TARGET, false);
    result
}

/// The target's [`Target::check_credentials`] as the refusal gate asks it.
fn credential_check<T: Target>(target: &Arc<T>) -> CredentialCheck {
    let target = target.clone();
    Arc::new(move || {
        let target = target.clone();
        Box::pin(async move { target.check_credentials().await })
    })
}

/// Writes batches into the target.
pub struct Writer<T> {
    pub pipeline: String,
    pub target: Arc<T>,
    pub breaker: Arc<Breaker>,
    /// Closed while the target refuses the credentials: every write waits, unacked.
    pub gate: Arc<RefusalGate>,
    pub dead_letters: DeadLetters,
    pub ledger: SharedLedger,
    pub metrics: Metrics,
    /// Fired on SIGTERM: a write held back by the breaker then gives its message back.
    pub shutdown: CancellationToken,
}

/// Why a write did not happen.
enum Held {
    /// The target failed this write; what to do is in the error.
    Failed(WriteError),
    /// The breaker was open and the worker is stopping, or the credentials are refused and the
    /// message waited long enough: give it back untouched.
    GiveBack,
}

/// What a write did, and whether the target recorded its settlement in the ledger itself.
struct Written {
    report: WriteReport,
    settled: bool,
}

impl<T: Target> Writer<T> {
    /// Writes `records` (recording message `settling` with them when the target can), waiting out
    /// an unavailable target (the breaker) instead of failing.
    async fn write(&self, records: &[Record], settling: Option<&str>) -> Result<Written, Held> {
        loop {
            if self.breaker.is_open() && !self.breaker.wait_closed(&self.shutdown).await {
                return Err(Held::GiveBack);
            }
            // Given back after a while, or on shutdown: never held past the consumer timeout.
            if self.gate.is_refused() && !self.gate.wait_accepted(&self.shutdown).await {
                return Err(Held::GiveBack);
            }
            match self.write_once(records, settling).await {
                Err(WriteError::Unavailable(reason)) => {
                    self.breaker
                        .trip(self.target.clone(), &reason, self.shutdown.clone());
                }
                Err(WriteError::Refused(reason)) => {
                    self.gate.refuse(&reason, self.shutdown.clone());
                }
                Ok(written) => {
                    self.breaker.written();
                    self.gate.worked();
                    return Ok(written);
                }
                Err(other) => return Err(Held::Failed(other)),
            }
        }
    }

    async fn write_once(
        &self,
        records: &[Record],
        settling: Option<&str>,
    ) -> Result<Written, WriteError> {
        let timer = self
            .metrics
            .target_write_duration
            .with_label_values(&[&self.pipeline])
            .start_timer();
        let settled = match settling {
            Some(message_id) => self.target.write_settling(records, message_id).await,
            None => None,
        };
        let written = match settled {
            Some(report) => Written {
                report: report?,
                settled: true,
            },
            None => Written {
                report: self.target.write(records).await?,
                settled: false,
            },
        };
        let report = written.report;
        timer.observe_duration();
        let rows = &self.metrics.target_rows;
        rows.with_label_values(&[&self.pipeline, "applied"])
            .inc_by(report.applied);
        rows.with_label_values(&[&self.pipeline, "stale"])
            .inc_by(report.stale);
        self.metrics
            .records_out
            .with_label_values(&[&self.pipeline, Stage::Write.as_str()])
            .inc_by(records.len() as u64);
        Ok(written)
    }

    /// Records what the write stage settled, then lets the message be acked.
    async fn settle(&self, settled: Settled) -> Disposition {
        match self.ledger.settle(settled).await {
            Ok(()) => Disposition::Done,
            Err(err) => Disposition::Retry(Failure::new(ErrorClass::Transient, err)),
        }
    }
}

/// What a failed write means for its message.
fn disposition(held: Held) -> Disposition {
    match held {
        Held::GiveBack => Disposition::Release,
        Held::Failed(WriteError::Permanent(message)) => {
            Disposition::DeadLetter(Failure::new(ErrorClass::Permanent, message))
        }
        // The breaker and the gate handle Unavailable and Refused inside `write`; a message that
        // still sees them is retried.
        Held::Failed(
            WriteError::Transient(message)
            | WriteError::Unavailable(message)
            | WriteError::Refused(message),
        ) => Disposition::Retry(Failure::new(ErrorClass::Transient, message)),
    }
}

impl<T: Target> Handler for Writer<T> {
    async fn handle(&self, envelope: Envelope) -> Disposition {
        let message_id = envelope.meta.message_id.to_string();
        let mut settled = Settled::new(
            Stage::Write,
            message_id.clone(),
            envelope.records.len() as u64,
        );
        let settling = self.ledger.enabled().then_some(message_id.as_str());
        match self.write(&envelope.records, settling).await {
            Ok(written) if written.settled => return Disposition::Done,
            Ok(Written { report, .. }) => {
                settled.written = report.applied;
                settled.stale = report.stale;
                return self.settle(settled).await;
            }
            Err(Held::Failed(WriteError::Permanent(message))) if envelope.records.len() > 1 => {
                tracing::warn!(error = %message, records = envelope.records.len(), "batch refused; writing its records one by one");
            }
            Err(held) => return disposition(held),
        }
        // Find the records at fault: the good ones are written, the bad ones dead-lettered each on its own.
        let mut refused = Vec::new();
        for record in envelope.records {
            match self.write(std::slice::from_ref(&record), None).await {
                Ok(Written { report, .. }) => {
                    settled.written += report.applied;
                    settled.stale += report.stale;
                }
                Err(Held::Failed(WriteError::Permanent(message))) => {
                    refused.push((record, Failure::new(ErrorClass::Permanent, message)));
                }
                // Records written so far are rewritten on the retry: idempotent, so harmless.
                Err(held) => return disposition(held),
            }
        }
        settled.dead_ids = refused
            .iter()
            .map(|(record, _)| record.id.clone())
            .collect();
        settled.dead_class = Some(ErrorClass::Permanent);
        match self
            .dead_letters
            .send_records(&envelope.meta, refused)
            .await
        {
            Ok(letters) => {
                settled.letters = letters;
                self.settle(settled).await
            }
            Err(err) => Disposition::Retry(Failure::new(ErrorClass::Transient, err.to_string())),
        }
    }
}
