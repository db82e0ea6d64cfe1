//! The HTTP target against a write API with 5 ms of latency per call (the target simulator): the
//! batched, concurrent writer beside the naive way — one existence check and one POST per record, one
//! after another — writing the same records, in the same run.
//!
//! Run: `cargo run --release -p conveyor-bench --bin bench-http [RECORDS]`

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use conveyor_base::{Record, source_time};
use conveyor_pipeline::Pipeline;
use conveyor_pipeline::target::http::HttpTargetSpec;
use conveyor_writer::target::Target;
use conveyor_writer::target::http::{HttpArgs, HttpTarget};
use serde_json::json;
use target_sim::{TargetConfig, TargetSim};

const LATENCY: Duration = Duration::from_millis(5);
/// Records per message, as the transformer publishes a fetched page of 100 orders as about 250 lines.
const PER_MESSAGE: usize = 250;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let count: usize = std::env::args()
        .nth(1)
        .map(|n| n.parse())
        .transpose()?
        .unwrap_or(1_000);
    let records = line_records(count)?;
    let sim = TargetSim::new(TargetConfig {
        key_field: "line_id".into(),
        version_field: Some("modified_at".into()),
        latency: LATENCY,
        ..TargetConfig::default()
    });
    let addr = target_sim::spawn(sim.clone(), ([127, 0, 0, 1], 0).into()).await?;
    let base = format!("http://{addr}");
    println!(
        "{} sales order lines, {} ms latency per call",
        records.len(),
        LATENCY.as_millis()
    );

    let naive = naive(&base, &records).await?;
    let naive_rate = records.len() as f64 / naive.as_secs_f64();
    println!(
        "naive (GET + POST per record, sequential): {naive_rate:>9.0} records/s ({naive:.2?})"
    );

    for (collection, id_check) in [
        ("batched", json!({"mode": "upsert"})),
        (
            "checked",
            json!({"mode": "exists", "path": "/api/checked/{key}", "on_exists": "update"}),
        ),
    ] {
        let spec: HttpTargetSpec = serde_json::from_value(json!({
            "path": format!("/api/{collection}"),
            "body": "batch",
            "batch_size": 200,
            "concurrency": 16,
            "id_check": id_check,
        }))?;
        spec.check()
            .map_err(|(field, problem)| anyhow::anyhow!("{field}: {problem}"))?;
        let target = Arc::new(HttpTarget::new(
            &spec,
            "modified_at",
            &HttpArgs {
                http_target_url: Some(base.clone()),
                ..HttpArgs::default()
            },
        )?);
        let elapsed = batched(&target, &records).await?;
        let rate = records.len() as f64 / elapsed.as_secs_f64();
        println!(
            "batched, concurrent ({:<6} id check):      {rate:>9.0} records/s ({elapsed:.2?}) = {:.0}x naive",
            if collection == "batched" {
                "upsert"
            } else {
                "exists"
            },
            rate / naive_rate
        );
        let (written, expected) = (sim.records(collection), sim.records("naive"));
        anyhow::ensure!(
            written == expected,
            "{collection} wrote other records than the naive way"
        );
    }
    println!(
        "every way wrote the same {} records",
        sim.records("naive").len()
    );
    Ok(())
}

/// Sales order lines as the lines pipeline maps them.
fn line_records(count: usize) -> anyhow::Result<Vec<Record>> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let pipeline = Pipeline::load(root.join("ops/pipelines/sales_order_lines_http.toml"))?;
    let dataset =
        kingdee_sim::data::Dataset::generate(42, count / 2 + 1, kingdee_sim::data::default_epoch());
    let mut records = Vec::with_capacity(count);
    for order in dataset.orders() {
        let source = serde_json::to_value(order)?;
        for mapped in pipeline.mapping.apply(&source)?.records {
            records.push(Record {
                data: mapped.to_json(),
                id: mapped.id,
                modify_time: mapped.version,
            });
        }
    }
    records.truncate(count);
    anyhow::ensure!(records.len() == count, "not enough lines generated");
    // Sanity: versions came through.
    source_time::parse_instant(&records[0].fields()?["modified_at"])?;
    Ok(records)
}

/// One record at a time: ask whether it exists, then POST it.
async fn naive(base: &str, records: &[Record]) -> anyhow::Result<Duration> {
    let client = conveyor_base::tls::http_client(None)
        .build()
        .expect("an HTTP client builds");
    let started = Instant::now();
    for record in records {
        let exists = client
            .get(format!("{base}/api/naive/{}", record.id))
            .send()
            .await?;
        anyhow::ensure!(exists.status() == 404, "unexpected {}", exists.status());
        let response = client
            .post(format!("{base}/api/naive"))
            .json(&record.data)
            .send()
            .await?;
        anyhow::ensure!(
            response.status().is_success(),
            "POST answered {}",
            response.status()
        );
    }
    Ok(started.elapsed())
}

/// The writer's way: messages handled concurrently (as the consume loop does with its prefetch), each
/// written in batch calls, with the calls in flight bounded by the target's concurrency limit.
async fn batched(target: &Arc<HttpTarget>, records: &[Record]) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for message in records.chunks(PER_MESSAGE) {
        let target = target.clone();
        let message = message.to_vec();
        tasks.spawn(async move { target.write(&message).await });
    }
    while let Some(result) = tasks.join_next().await {
        result??;
    }
    Ok(started.elapsed())
}
