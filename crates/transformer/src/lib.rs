//! The transformer: applies the pipeline's mapping to every record of a batch and publishes the result
//! to the write queue. A record that cannot be mapped goes to the transform dead-letter queue on its
//! own, with the field and the reason; the rest of its batch goes on. What became of each batch is
//! recorded in the ledger once its output is confirmed, and only then is the batch acked.

use conveyor_amqp::consume::Handler;
use conveyor_amqp::dead_letters::DeadLetters;
use conveyor_amqp::envelope::Envelope;
use conveyor_amqp::{Publisher, Topology};
use conveyor_base::ledger::{Sent, Settled, SharedLedger};
use conveyor_base::metrics::Metrics;
use conveyor_base::{Disposition, ErrorClass, Failure, Record, Stage};
use conveyor_pipeline::mapping::{MappedRecord, Mapping};
use conveyor_runtime::host::Host;
use conveyor_runtime::settings::WorkerArgs;
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

/// The `conveyor-transformer` process: its command line, then [`run`] until SIGTERM. Here and not in the
/// binary, so that the async code is compiled in this crate, once.
pub fn main() -> std::process::ExitCode {
    let cli = <Cli as clap::Parser>::parse();
    conveyor_runtime::process::run_worker(&cli.worker.clone(), |shutdown| run(cli, shutdown))
}

pub async fn run(cli: Cli, shutdown: CancellationToken) -> anyhow::Result<()> {
    let Some(host) = Host::start(&cli.worker, Stage::Transform, 9102, &[], &shutdown).await? else {
        return Ok(());
    };
    host.run(&shutdown, |runtime, _: Cli, shutdown| async move {
        runtime
            .consume(
                |session| Transformer {
                    mapping: runtime.pipeline.mapping.clone(),
                    publisher: session.publisher.clone(),
                    topology: runtime.topology.clone(),
                    dead_letters: session.dead_letters.clone(),
                    ledger: runtime.ledger.clone(),
                    metrics: runtime.metrics.clone(),
                },
                &shutdown,
            )
            .await
    })
    .await
}

/// Maps batches and passes them on.
pub struct Transformer {
    pub mapping: Mapping,
    pub publisher: Publisher,
    pub topology: Topology,
    pub dead_letters: DeadLetters,
    pub ledger: SharedLedger,
    pub metrics: Metrics,
}

/// What a batch became: the output records, the source records that failed (with the reason), how
/// many output records the filter skipped, and the source records it skipped whole.
#[derive(Debug, Default)]
pub struct MappedBatch {
    pub mapped: Vec<Record>,
    pub failed: Vec<(Record, Failure)>,
    pub filtered: u64,
    pub filtered_ids: Vec<String>,
}

/// An output record as it travels to the writer: keyed by the target key, versioned by the version field.
fn to_record(output: MappedRecord) -> Record {
    Record {
        data: output.to_json(),
        id: output.id,
        modify_time: output.version,
    }
}

/// Maps every record; a record that fails is set apart with its reason and the rest go on.
pub fn map_records(mapping: &Mapping, records: Vec<Record>) -> MappedBatch {
    let mut batch = MappedBatch {
        mapped: Vec::with_capacity(records.len()),
        ..MappedBatch::default()
    };
    for record in records {
        let applied = mapping
            .parse_source(record.data.get())
            .map_err(|err| format!("record data: {err}"))
            .and_then(|source| mapping.apply_owned(source).map_err(|err| err.to_string()));
        match applied {
            Ok(applied) => {
                batch.filtered += applied.filtered;
                if applied.records.is_empty() && applied.filtered > 0 {
                    batch.filtered_ids.push(record.id);
                }
                batch
                    .mapped
                    .extend(applied.records.into_iter().map(to_record));
            }
            Err(err) => batch
                .failed
                .push((record, Failure::new(ErrorClass::Permanent, err))),
        }
    }
    batch
}

impl Handler for Transformer {
    async fn handle(&self, envelope: Envelope) -> Disposition {
        let message_id = envelope.meta.message_id.to_string();
        let mut settled = Settled::new(
            Stage::Transform,
            message_id.clone(),
            envelope.records.len() as u64,
        );
        let MappedBatch {
            mapped,
            failed,
            filtered,
            filtered_ids,
        } = map_records(&self.mapping, envelope.records);
        let count = mapped.len() as u64;
        if !mapped.is_empty() {
            // The same batch passed on again (a redelivery) is the same message downstream.
            let meta = envelope.meta.derived(Stage::Write.as_str());
            if self.ledger.enabled() {
                settled.sent.push(Sent {
                    stage: Stage::Write,
                    message_id: meta.message_id.to_string(),
                    by: Stage::Transform.as_str(),
                    parent_id: message_id,
                    record_ids: mapped.iter().map(|record| record.id.clone()).collect(),
                });
            }
            let (body, properties) = Envelope {
                meta,
                records: mapped,
            }
            .to_amqp(self.topology.compression());
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
            settled.dead_ids = failed.iter().map(|(record, _)| record.id.clone()).collect();
            settled.dead_class = Some(ErrorClass::Permanent);
            match self.dead_letters.send_records(&envelope.meta, failed).await {
                Ok(letters) => settled.letters = letters,
                Err(err) => {
                    return Disposition::Retry(Failure::new(
                        ErrorClass::Transient,
                        err.to_string(),
                    ));
                }
            }
        }
        settled.passed_on = count;
        settled.filtered = filtered;
        settled.filtered_ids = filtered_ids;
        if let Err(err) = self.ledger.settle(settled).await {
            return Disposition::Retry(Failure::new(ErrorClass::Transient, err));
        }
        self.metrics
            .records_out
            .with_label_values(&[self.topology.pipeline(), Stage::Transform.as_str()])
            .inc_by(count);
        self.metrics
            .records_filtered
            .with_label_values(&[self.topology.pipeline(), Stage::Transform.as_str()])
            .inc_by(filtered);
        Disposition::Done
    }
}

/// What `conveyorctl transform preview` shows: every output record, every error and the filtered count.
#[derive(Debug, serde::Serialize)]
pub struct Preview {
    pub records: Vec<Record>,
    pub errors: Vec<PreviewError>,
    pub filtered: u64,
}

/// A source row the rules refused.
#[derive(Debug, serde::Serialize)]
pub struct PreviewError {
    /// Position of the row in the sample (from 0).
    pub index: usize,
    /// The row's id at the source, if it has one.
    pub id: Option<Value>,
    pub field: String,
    pub reason: String,
}

/// Applies the rules to sample rows: a JSON array of rows, one row, or a list response
/// (`{"data":{"rows":[...]}}`) as the source API returns it.
pub fn preview(mapping: &Mapping, id_field: &str, sample: Value) -> Preview {
    let rows = match sample {
        Value::Array(rows) => rows,
        Value::Object(mut object) => match object
            .get_mut("data")
            .and_then(|data| data.get_mut("rows"))
            .map(Value::take)
        {
            Some(Value::Array(rows)) => rows,
            _ => vec![Value::Object(object)],
        },
        other => vec![other],
    };
    let mut preview = Preview {
        records: Vec::new(),
        errors: Vec::new(),
        filtered: 0,
    };
    for (index, row) in rows.iter().enumerate() {
        match mapping.apply(row) {
            Ok(applied) => {
                preview.filtered += applied.filtered;
                preview
                    .records
                    .extend(applied.records.into_iter().map(to_record));
            }
            Err(err) => preview.errors.push(PreviewError {
                index,
                id: row.get(id_field).cloned(),
                field: err.field,
                reason: err.reason,
            }),
        }
    }
    preview
}

#[cfg(test)]
mod tests {
    use super::*;
    use conveyor_pipeline::mapping::TransformSpec;
    use serde_json::json;

    fn lines_mapping() -> Mapping {
        let spec: TransformSpec = serde_json::from_value(json!({
            "key": "line_id",
            "version": "modified",
            "flatten": {"path": "lines", "as": "line"},
            "filter": "qty > 0",
            "fields": [
                {"to": "line_id", "from": "line.id", "type": "string"},
                {"to": "modified", "from": "modify_time", "type": "datetime"},
                {"to": "qty", "from": "line.qty", "type": "decimal"},
            ],
        }))
        .unwrap();
        Mapping::compile(&spec).unwrap()
    }

    fn order(id: &str, lines: Value) -> Record {
        Record::new(
            id.into(),
            conveyor_base::source_time::parse_instant(&json!("2025-01-01 08:00:00")).unwrap(),
            &json!({"id": id, "modify_time": "2025-01-01 08:00:00", "lines": lines}),
        )
    }

    #[test]
    fn a_batch_maps_around_its_bad_records_and_counts_the_filtered() {
        let batch = map_records(
            &lines_mapping(),
            vec![
                order(
                    "a",
                    json!([{"id": "a1", "qty": "1"}, {"id": "a2", "qty": "0"}]),
                ),
                order("b", json!([{"id": "b1", "qty": "many"}])),
                order("c", json!([{"id": "c1", "qty": "2"}])),
            ],
        );
        let ids: Vec<&str> = batch.mapped.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(ids, ["a1", "c1"]);
        assert_eq!(batch.filtered, 1, "a2 has no quantity");
        assert_eq!(batch.failed.len(), 1);
        let (record, failure) = &batch.failed[0];
        assert_eq!(
            record.id, "b",
            "the source record goes to the dead letters, whole"
        );
        assert_eq!(failure.class, ErrorClass::Permanent);
        assert!(failure.message.contains("qty"), "{}", failure.message);
    }

    #[test]
    fn preview_reads_rows_or_a_list_response() {
        let rows = json!([
            order("a", json!([{"id": "a1", "qty": "1"}]))
                .fields()
                .unwrap(),
            order("b", json!([{"id": "b1", "qty": "x"}]))
                .fields()
                .unwrap(),
        ]);
        let shown = preview(&lines_mapping(), "id", rows.clone());
        assert_eq!(shown.records.len(), 1);
        assert_eq!(shown.errors.len(), 1);
        assert_eq!(shown.errors[0].index, 1);
        assert_eq!(shown.errors[0].id, Some(json!("b")));
        assert_eq!(shown.errors[0].field, "qty");
        let response = json!({"errcode": 0, "data": {"rows": rows}});
        assert_eq!(preview(&lines_mapping(), "id", response).records.len(), 1);
    }
}
