//! The writer: takes mapped batches from the write queue and writes each into the target in one
//! idempotent statement, acking only after the write committed.

pub mod target;

use std::sync::Arc;
use std::time::Duration;

use conveyor_core::broker::Stage;
use conveyor_core::consume::{
    self, ConsumeSettings, DeadLetters, Disposition, ErrorClass, Failure, Handler,
};
use conveyor_core::envelope::{Envelope, Record};
use conveyor_core::metrics::Metrics;
use conveyor_core::pipeline::{Pipeline, TargetSpec};
use conveyor_core::runtime::WorkerRuntime;
use conveyor_core::settings::WorkerArgs;
use tokio_util::sync::CancellationToken;

use crate::target::http::{HttpArgs, HttpTarget};
use crate::target::postgres::{PostgresArgs, PostgresTarget, TableSpec};
use crate::target::{Target, WriteError, noop::NoopTarget};

/// Readiness condition: the target is reachable and set up.
pub const READY_TARGET: &str = "target";

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
    #[command(flatten)]
    pub postgres: PostgresArgs,
    #[command(flatten)]
    pub http: HttpArgs,
}

/// Sets up the pipeline's target.
pub async fn open_target(
    pipeline: &Pipeline,
    postgres: &PostgresArgs,
    http: &HttpArgs,
) -> anyhow::Result<Target> {
    Ok(match &pipeline.spec.target {
        TargetSpec::Noop => Target::Noop(NoopTarget::default()),
        TargetSpec::Http(spec) => Target::Http(Box::new(HttpTarget::new(
            spec,
            pipeline.mapping.version_field(),
            http,
        )?)),
        TargetSpec::Postgres { table, migrations } => {
            let mapping = &pipeline.mapping;
            let spec = TableSpec {
                table: table.clone(),
                key: mapping.key_field().to_owned(),
                version: mapping.version_field().to_owned(),
                columns: mapping.output_fields().map(str::to_owned).collect(),
            };
            Target::Postgres(
                PostgresTarget::connect(postgres, pipeline.name(), migrations, &spec).await?,
            )
        }
    })
}

pub async fn run(cli: Cli, shutdown: CancellationToken) -> anyhow::Result<()> {
    let Some(runtime) =
        WorkerRuntime::start(&cli.worker, Stage::Write, 9103, &[READY_TARGET], &shutdown).await?
    else {
        return Ok(());
    };
    let target = open_target(&runtime.pipeline, &cli.postgres, &cli.http).await?;
    runtime.readiness.set(READY_TARGET, true);
    let handler = Arc::new(Writer {
        pipeline: runtime.pipeline.name().to_owned(),
        target,
        dead_letters: runtime.dead_letters(),
        metrics: runtime.metrics.clone(),
    });
    let settings = ConsumeSettings {
        topology: runtime.topology.clone(),
        stage: Stage::Write,
        prefetch: cli.worker.broker.prefetch,
        drain_timeout: Duration::from_secs(cli.worker.drain_timeout_secs),
    };
    let result = consume::run(
        &runtime.connection,
        settings,
        handler,
        runtime.dead_letters(),
        runtime.metrics.clone(),
        shutdown,
    )
    .await;
    runtime.readiness.set(READY_TARGET, false);
    runtime.stop().await;
    Ok(result?)
}

/// Writes batches into the target.
pub struct Writer {
    pub pipeline: String,
    pub target: Target,
    pub dead_letters: DeadLetters,
    pub metrics: Metrics,
}

impl Writer {
    async fn write(&self, records: &[Record]) -> Result<(), WriteError> {
        let timer = self
            .metrics
            .target_write_duration
            .with_label_values(&[&self.pipeline])
            .start_timer();
        let report = self.target.write(records).await?;
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
        Ok(())
    }
}

impl Handler for Writer {
    async fn handle(&self, envelope: Envelope) -> Disposition {
        match self.write(&envelope.records).await {
            Ok(()) => return Disposition::Done,
            Err(WriteError::Transient(message)) => {
                return Disposition::Retry(Failure::new(ErrorClass::Transient, message));
            }
            Err(WriteError::Permanent(message)) => {
                tracing::warn!(error = %message, records = envelope.records.len(), "batch refused; writing its records one by one");
            }
        }
        // Find the records at fault: the good ones are written, the bad ones dead-lettered each on its own.
        let mut refused = Vec::new();
        for record in envelope.records {
            match self.write(std::slice::from_ref(&record)).await {
                Ok(()) => {}
                Err(WriteError::Transient(message)) => {
                    return Disposition::Retry(Failure::new(ErrorClass::Transient, message));
                }
                Err(WriteError::Permanent(message)) => {
                    refused.push((record, Failure::new(ErrorClass::Permanent, message)));
                }
            }
        }
        match self
            .dead_letters
            .send_records(&envelope.meta, refused)
            .await
        {
            Ok(()) => Disposition::Done,
            Err(err) => Disposition::Retry(Failure::new(ErrorClass::Transient, err.to_string())),
        }
    }
}
