//! The transformer: applies the pipeline's mapping to every record of a batch and publishes the result
//! to the write queue. A record that cannot be mapped goes to the transform dead-letter queue on its
//! own, with the field and the reason; the rest of its batch goes on.

use conveyor_core::broker::{Publisher, Stage, Topology};
use conveyor_core::consume::{DeadLetters, Disposition, ErrorClass, Failure, Handler};
use conveyor_core::envelope::{Envelope, Record};
use conveyor_core::mapping::Mapping;
use conveyor_core::metrics::Metrics;
use conveyor_core::runtime::WorkerRuntime;
use conveyor_core::settings::WorkerArgs;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

/// The transformer's command line (every flag also reads an environment variable).
#[derive(Debug, clap::Parser)]
#[command(
    name = "conveyor-transformer",
    version,
    about = "Maps fetched records into the target's shape"
)]
pub struct Cli {
    #[command(flatten)]
    pub worker: WorkerArgs,
}

pub async fn run(cli: Cli, shutdown: CancellationToken) -> anyhow::Result<()> {
    let Some(mut runtime) =
        WorkerRuntime::start(&cli.worker, Stage::Transform, 9102, &[], &shutdown).await?
    else {
        return Ok(());
    };
    let result = runtime
        .consume(
            |runtime| Transformer {
                mapping: runtime.pipeline.mapping.clone(),
                publisher: runtime.publisher.clone(),
                topology: runtime.topology.clone(),
                dead_letters: runtime.dead_letters(),
                metrics: runtime.metrics.clone(),
            },
            &shutdown,
        )
        .await;
    runtime.stop().await;
    result
}

/// Maps batches and passes them on.
pub struct Transformer {
    pub mapping: Mapping,
    pub publisher: Publisher,
    pub topology: Topology,
    pub dead_letters: DeadLetters,
    pub metrics: Metrics,
}

/// Maps every record; returns the mapped ones and, apart, the ones that failed with the reason.
pub fn map_records(
    mapping: &Mapping,
    records: Vec<Record>,
) -> (Vec<Record>, Vec<(Record, Failure)>) {
    let mut mapped = Vec::with_capacity(records.len());
    let mut failed = Vec::new();
    for record in records {
        match mapping.apply(&record.data) {
            Ok(output) => mapped.push(Record {
                id: output.id,
                modify_time: output.version,
                data: Value::Object(output.data),
            }),
            Err(err) => failed.push((record, Failure::new(ErrorClass::Permanent, err.to_string()))),
        }
    }
    (mapped, failed)
}

impl Handler for Transformer {
    async fn handle(&self, envelope: Envelope) -> Disposition {
        let (mapped, failed) = map_records(&self.mapping, envelope.records);
        let count = mapped.len() as u64;
        if !mapped.is_empty() {
            let (body, properties) = Envelope {
                meta: envelope.meta.next_stage(),
                records: mapped,
            }
            .to_amqp();
            let routing_key = self.topology.routing_key(Stage::Write);
            if let Err(err) = self
                .publisher
                .publish(&self.topology.exchange(), &routing_key, &body, properties)
                .await
            {
                return Disposition::Retry(Failure::new(ErrorClass::Transient, err.to_string()));
            }
        }
        if !failed.is_empty() {
            for (record, failure) in &failed {
                tracing::warn!(record_id = %record.id, error = %failure.message, "record cannot be mapped");
            }
            if let Err(err) = self.dead_letters.send_records(&envelope.meta, failed).await {
                return Disposition::Retry(Failure::new(ErrorClass::Transient, err.to_string()));
            }
        }
        self.metrics
            .records_out
            .with_label_values(&[self.topology.pipeline(), Stage::Transform.as_str()])
            .inc_by(count);
        Disposition::Done
    }
}
