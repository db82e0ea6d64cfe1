//! The transformer alone on one core: records/s of a realistic mapping of Kingdee sales orders (about
//! 1 KiB each), beside plain serde_json parse-and-serialize of the same message bodies in the same run.
//!
//! Run: `cargo run --release -p conveyor-bench --bin bench-transform [ORDERS]`; with
//! `CONVEYOR_BENCH_PROFILE=NAME` (a pipeline's name) it runs only that mapping, over and over, for a
//! profiler to watch.

use std::borrow::Cow;
use std::path::Path;
use std::time::{Duration, Instant};

use conveyor_amqp::envelope::{Compression, Envelope, Meta, decode_body};
use conveyor_base::{Record, source_time};
use conveyor_pipeline::Pipeline;
use conveyor_transformer::map_records;

/// The workers' allocator, so that the figures are theirs.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// A realistic mapping of orders: renames, exact decimals, CST times to RFC 3339 and epoch ms, a US date,
/// a value map, trimming, entry lines kept nested and mapped field by field, and a computed field.
const ORDERS_PIPELINE: &str = r#"
name = "bench_orders"
[source]
kind = "kingdee"
path = "/jdy/v2/scm/sal_order"
start_time = "2025-01-01T00:00:00+08:00"
[transform]
key = "id"
version = "modified_at"
fields = [
  { to = "id", type = "string" },
  { to = "bill_no", type = "string", required = true },
  { to = "bill_date", type = "date", format = "%m/%d/%Y" },
  { to = "status", from = "bill_status", map = { C = "audited", Z = "draft" } },
  { to = "customer.number", from = "customer_number", type = "string" },
  { to = "customer.name", from = "customer_name", type = "string", trim = true },
  { to = "department", from = "dept_name", type = "string" },
  { to = "salesperson", from = "emp_name", type = "string" },
  { to = "total_amount", type = "decimal" },
  { to = "exchange_rate", type = "decimal" },
  { to = "remark", type = "string", trim = true, empty_as_null = true },
  { to = "created_at", from = "create_time", type = "datetime" },
  { to = "modified_at", from = "modify_time", type = "datetime" },
  { to = "modified_ms", from = "modify_time", type = "datetime", format = "epoch_millis" },
  { to = "label", expr = 'bill_no + "/" + status' },
  { to = "lines", from = "material_entity", fields = [
      { to = "line_id", from = "id", type = "string" },
      { to = "seq", type = "integer" },
      { to = "material_number", type = "string" },
      { to = "qty", type = "decimal" },
      { to = "price", type = "decimal" },
      { to = "amount", type = "decimal" },
      { to = "tax_rate", from = "cess", type = "decimal" },
  ] },
]
[target]
kind = "noop"
"#;

const BATCH: usize = 100;

fn main() -> anyhow::Result<()> {
    let orders: usize = std::env::args()
        .nth(1)
        .map(|n| n.parse())
        .transpose()?
        .unwrap_or(20_000);
    let dataset =
        kingdee_sim::data::Dataset::generate(42, orders, kingdee_sim::data::default_epoch());
    let records: Vec<Record> = dataset
        .orders()
        .iter()
        .map(|order| -> anyhow::Result<Record> {
            Ok(Record::new(
                order.id.clone(),
                source_time::parse_instant(&order.modify_time.clone().into())?,
                &serde_json::to_value(order)?,
            ))
        })
        .collect::<anyhow::Result<_>>()?;
    let orders_pipeline = Pipeline::parse(Path::new("bench-orders.toml"), ORDERS_PIPELINE)?;
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let lines_pipeline = Pipeline::load(root.join("ops/pipelines/sales_order_lines_http.toml"))?;
    // The demo's and `conveyorctl bench pipeline`'s rules: ten fields, the lines passed on unchanged.
    let demo_pipeline = Pipeline::load(root.join("ops/pipelines/sales_orders.toml"))?;

    // Message bodies as the fetcher publishes them: batches of 100 records.
    let messages: Vec<(Vec<u8>, lapin::BasicProperties)> = records
        .chunks(BATCH)
        .map(|chunk| {
            Envelope {
                meta: Meta::new_trace(orders_pipeline.name()),
                records: chunk.to_vec(),
            }
            .to_amqp(Compression::default())
        })
        .collect();
    // The floor reads the bodies as JSON; the transformer also decompresses and compresses them.
    let plain: Vec<Vec<u8>> = messages
        .iter()
        .map(|(body, properties)| decode_body(body, properties).map(Cow::into_owned))
        .collect::<Result<_, _>>()?;
    let bytes: usize = plain.iter().map(Vec::len).sum();
    let compressed: usize = messages.iter().map(|(body, _)| body.len()).sum();
    println!(
        "{} records in {} messages, {:.0} bytes per record as JSON, {:.0} compressed",
        records.len(),
        messages.len(),
        bytes as f64 / records.len() as f64,
        compressed as f64 / records.len() as f64
    );

    // The floor and each transformer run take turns, five rounds after a warm-up, and each keeps its
    // best (least disturbed) time: the ratio stays fair when other work shares the machine.
    let floor = || {
        let mut out = 0;
        for body in &plain {
            let value: serde_json::Value = serde_json::from_slice(body).expect("valid JSON");
            out += serde_json::to_vec(&value).expect("serializes").len();
        }
        (out, records.len())
    };
    let transform = |pipeline: &Pipeline| {
        let mut out = 0;
        let mut outputs = 0;
        for (body, properties) in &messages {
            // The messages were published for the orders pipeline; the rules are what differs.
            let mut envelope = Envelope::from_amqp(orders_pipeline.name(), body, properties)
                .expect("a valid batch");
            let batch = map_records(&pipeline.mapping, std::mem::take(&mut envelope.records));
            assert!(batch.failed.is_empty(), "{:?}", batch.failed.first());
            outputs += batch.mapped.len();
            let (body, _) = Envelope {
                meta: envelope.meta.next_stage(),
                records: batch.mapped,
            }
            .to_amqp(Compression::default());
            out += body.len();
        }
        (out, outputs)
    };
    let ways: [&dyn Fn() -> (usize, usize); 4] = [
        &floor,
        &|| transform(&orders_pipeline),
        &|| transform(&lines_pipeline),
        &|| transform(&demo_pipeline),
    ];
    if let Ok(name) = std::env::var("CONVEYOR_BENCH_PROFILE") {
        let pipeline = [&orders_pipeline, &lines_pipeline, &demo_pipeline]
            .into_iter()
            .find(|pipeline| pipeline.name() == name)
            .ok_or_else(|| anyhow::anyhow!("CONVEYOR_BENCH_PROFILE: no mapping named {name:?}"))?;
        let started = Instant::now();
        for _ in 0..30 {
            std::hint::black_box(transform(pipeline));
        }
        let rate = 30.0 * records.len() as f64 / started.elapsed().as_secs_f64();
        println!("{name}: {rate:.0} source records/s");
        return Ok(());
    }
    let mut best = [Duration::MAX; 4];
    let mut outputs = [0; 4];
    for round in 0..6 {
        for (index, way) in ways.iter().enumerate() {
            let started = Instant::now();
            let (bytes_out, produced) = std::hint::black_box(way());
            let elapsed = started.elapsed();
            std::hint::black_box(bytes_out);
            outputs[index] = produced;
            if round > 0 {
                best[index] = best[index].min(elapsed);
            }
        }
    }
    let rate = |index: usize| records.len() as f64 / best[index].as_secs_f64();
    println!(
        "serde_json parse + serialize (floor): {:>10.0} records/s",
        rate(0)
    );
    for (index, name) in [
        (1, orders_pipeline.name()),
        (2, lines_pipeline.name()),
        (3, demo_pipeline.name()),
    ] {
        println!(
            "transformer, {name:<22}: {:>10.0} source records/s = {:>3.0}% of the floor ({:.0} output records/s)",
            rate(index),
            100.0 * rate(index) / rate(0),
            outputs[index] as f64 / best[index].as_secs_f64()
        );
    }
    Ok(())
}
