//! `conveyorctl status`: where every record of a pipeline is, from the workers' own counts and the
//! queues' depths.
//!
//! How it counts: it scrapes `/metrics` of the workers it is given and adds up, per pipeline, the
//! records fetched (those the fetcher published, `conveyor_records_out_total{stage="fetch"}`, plus
//! those it dead-lettered), replayed from dead-letter queues, written (`records_out` of the write
//! stage, stale versions included), dead-lettered (every stage) and filtered (every stage). A record
//! fetched twice (overlapping sync windows) is counted twice, and written (as stale) twice. What is neither written,
//! dead-lettered nor filtered is in flight: waiting in a work or retry queue, or in a worker's hands.
//! When the work and retry queues are empty and no worker holds anything, in flight must be 0; if it is
//! not, the records are flagged as unaccounted for. Counters live in the worker processes: a worker that
//! restarted lost its counts, so point this at every worker and read it as a check of a run, not as a
//! ledger (Prometheus keeps the long history).

use std::collections::BTreeMap;

use anyhow::{Context as _, bail};
use conveyor_core::broker::{self, Stage, Topology};
use conveyor_core::settings::BrokerArgs;
use lapin::options::QueueDeclareOptions;
use serde::Serialize;

#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    /// Pipelines: names, or pipeline files.
    #[arg(required = true)]
    pipelines: Vec<String>,
    /// A worker's /metrics URL (or its base URL); repeat for every worker of the pipelines.
    #[arg(
        long = "worker",
        env = "CONVEYOR_STATUS_WORKERS",
        value_delimiter = ','
    )]
    workers: Vec<String>,
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    broker: BrokerArgs,
}

/// Where a pipeline's records are.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct PipelineStatus {
    pub pipeline: String,
    pub fetched: u64,
    pub written: u64,
    pub dead_lettered: u64,
    pub filtered: u64,
    pub retried: u64,
    /// Records put back into the pipeline from dead-letter queues.
    pub replayed: u64,
    /// fetched + replayed − written − dead-lettered − filtered.
    pub in_flight: i64,
    /// Messages ready in the work and retry queues.
    pub queued_messages: u64,
    /// Messages held by the workers, not yet acked.
    pub unacked_messages: u64,
    /// Messages in the dead-letter queues.
    pub dead_letter_messages: u64,
    /// Records in flight although nothing is queued or in a worker's hands: lost or counted twice.
    pub unaccounted: i64,
}

pub async fn run(args: StatusArgs) -> anyhow::Result<()> {
    let mut samples = Vec::new();
    let http = conveyor_core::tls::http_client(None)
        .timeout(std::time::Duration::from_secs(5))
        .build()?;
    for worker in &args.workers {
        let url = if worker.ends_with("/metrics") {
            worker.clone()
        } else {
            format!("{}/metrics", worker.trim_end_matches('/'))
        };
        let text = http
            .get(&url)
            .send()
            .await
            .and_then(|r| r.error_for_status())
            .with_context(|| format!("scraping {url}"))?
            .text()
            .await?;
        samples.extend(parse_metrics(&text));
    }
    let connection = broker::connect(&args.broker.address()?, "conveyorctl").await?;
    let channel = connection.create_channel().await?;
    let mut statuses = Vec::new();
    for given in &args.pipelines {
        let name = crate::dlq::pipeline_name(given)?;
        let topology = Topology::new(&args.broker, &name);
        let mut status = count(&name, &samples);
        for stage in Stage::ALL {
            let dead = depth(&channel, &topology.dead_letter_queue(stage)).await?;
            status.dead_letter_messages += u64::from(dead.0);
            if stage.has_work_queue() {
                for queue in
                    std::iter::once(topology.queue(stage)).chain(topology.retry_queues(stage))
                {
                    let (ready, _) = depth(&channel, &queue).await?;
                    status.queued_messages += u64::from(ready);
                }
            }
        }
        status.unacked_messages = unacked(&samples, &name);
        if status.queued_messages == 0 && status.unacked_messages == 0 {
            status.unaccounted = status.in_flight;
        }
        statuses.push(status);
    }
    broker::close(&connection).await;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&statuses)?);
    } else {
        for s in &statuses {
            println!("pipeline {}", s.pipeline);
            println!("  fetched        {:>10}", s.fetched);
            println!("  written        {:>10}", s.written);
            println!(
                "  dead-lettered  {:>10}  ({} message(s) in the dead-letter queues)",
                s.dead_lettered, s.dead_letter_messages
            );
            println!("  filtered       {:>10}", s.filtered);
            println!("  replayed       {:>10}", s.replayed);
            println!(
                "  in flight      {:>10}  ({} message(s) queued, {} in workers' hands; {} retries so far)",
                s.in_flight, s.queued_messages, s.unacked_messages, s.retried
            );
            if s.unaccounted != 0 {
                println!(
                    "  UNACCOUNTED    {:>10}  records neither written, dead-lettered, filtered nor queued",
                    s.unaccounted
                );
            } else if s.in_flight == 0 {
                println!("  ok: every fetched record is written, dead-lettered or filtered");
            }
        }
    }
    if let Some(bad) = statuses.iter().find(|s| s.unaccounted != 0) {
        bail!(
            "pipeline {}: {} record(s) unaccounted for (did a worker restart and lose its counts?)",
            bad.pipeline,
            bad.unaccounted
        );
    }
    Ok(())
}

/// Messages ready and consumers of a queue (passive declare: it must exist).
async fn depth(channel: &lapin::Channel, queue: &str) -> anyhow::Result<(u32, u32)> {
    let declared = channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            Default::default(),
        )
        .await
        .with_context(|| format!("inspecting queue {queue} (is the topology declared?)"))?;
    Ok((declared.message_count(), declared.consumer_count()))
}

/// One sample of the Prometheus text format: a name, its labels, its value.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// Reads the samples of a Prometheus text exposition (conveyor's own: no escapes in label values).
pub fn parse_metrics(text: &str) -> Vec<Sample> {
    text.lines()
        .filter(|line| !line.starts_with('#') && !line.trim().is_empty())
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let value: f64 = value.parse().ok()?;
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => (name, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            let labels = labels
                .split(',')
                .filter_map(|pair| {
                    let (key, value) = pair.split_once('=')?;
                    Some((key.to_owned(), value.trim_matches('"').to_owned()))
                })
                .collect();
            Some(Sample {
                name: name.to_owned(),
                labels,
                value,
            })
        })
        .collect()
}

fn sum(samples: &[Sample], name: &str, pipeline: &str, stage: Option<&str>) -> u64 {
    samples
        .iter()
        .filter(|s| s.name == name)
        .filter(|s| s.labels.get("pipeline").map(String::as_str) == Some(pipeline))
        .filter(|s| {
            stage.is_none_or(|stage| s.labels.get("stage").map(String::as_str) == Some(stage))
        })
        .map(|s| s.value as u64)
        .sum()
}

fn unacked(samples: &[Sample], pipeline: &str) -> u64 {
    sum(samples, "conveyor_messages_in_hand", pipeline, None)
}

/// The counts of one pipeline from the workers' samples.
pub fn count(pipeline: &str, samples: &[Sample]) -> PipelineStatus {
    let dead_lettered_at_fetch = sum(
        samples,
        "conveyor_records_dead_lettered_total",
        pipeline,
        Some("fetch"),
    );
    let fetched = sum(
        samples,
        "conveyor_records_out_total",
        pipeline,
        Some("fetch"),
    ) + dead_lettered_at_fetch;
    let written = sum(
        samples,
        "conveyor_records_out_total",
        pipeline,
        Some("write"),
    );
    let dead_lettered = sum(
        samples,
        "conveyor_records_dead_lettered_total",
        pipeline,
        None,
    );
    let filtered = sum(samples, "conveyor_records_filtered_total", pipeline, None);
    let replayed = sum(samples, "conveyor_records_replayed_total", pipeline, None);
    PipelineStatus {
        pipeline: pipeline.to_owned(),
        fetched,
        written,
        dead_lettered,
        filtered,
        retried: sum(samples, "conveyor_records_retried_total", pipeline, None),
        replayed,
        in_flight: (fetched + replayed) as i64
            - written as i64
            - dead_lettered as i64
            - filtered as i64,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_a_pipeline_from_worker_metrics() {
        let text = r#"# HELP conveyor_records_in_total Records taken in by a stage
conveyor_records_in_total{pipeline="orders",stage="fetch"} 107
conveyor_records_out_total{pipeline="orders",stage="fetch"} 99
conveyor_records_dead_lettered_total{class="permanent",pipeline="orders",stage="fetch"} 1
conveyor_records_in_total{pipeline="orders",stage="write"} 90
conveyor_records_out_total{pipeline="orders",stage="write"} 87
conveyor_records_out_total{pipeline="other",stage="write"} 5
conveyor_records_dead_lettered_total{class="permanent",pipeline="orders",stage="transform"} 10
conveyor_records_dead_lettered_total{class="permanent",pipeline="orders",stage="write"} 1
conveyor_records_filtered_total{pipeline="orders",stage="transform"} 1
"#;
        let status = count("orders", &parse_metrics(text));
        assert_eq!(status.fetched, 100);
        assert_eq!(status.written, 87);
        assert_eq!(status.dead_lettered, 12);
        assert_eq!(status.filtered, 1);
        assert_eq!(status.in_flight, 0);
    }
}
