//! Where every record of a pipeline is, from the workers' own counts and the queues' depths: the logic
//! behind `conveyorctl status`.
//!
//! How it counts: stage by stage, in the units of the stage's own queue (a transformer that flattens
//! orders into lines takes orders in and passes lines on, so the transform stage counts orders and the
//! write stage lines). For each stage that takes records from a queue (transform, write):
//!
//! - **entered**: the records the stage before published into its queue
//!   (`conveyor_records_out_total` of the fetch stage for transform, of the transform stage for write)
//!   plus those replayed into it from its dead-letter queue (`conveyor_records_replayed_total`);
//! - **settled**: the records whose message the stage finished with for good
//!   (`conveyor_records_settled_total`): passed on or written (some perhaps filtered by a rule), or
//!   dead-lettered; a message handed to a retry queue, or back to its queue, is not settled;
//! - **in flight** = entered − settled: in the stage's work or retry queues, or in its workers' hands.
//!
//! When a stage's work and retry queues are empty and none of its workers holds a message, its in
//! flight must be 0; if it is not, the difference is flagged as unaccounted for (records lost on the
//! way, or counted twice) and the command fails. Because records move while the workers and queues
//! are read one after the other, a stage that looks unaccounted for is read again a moment later and
//! flagged only if both readings agree. Messages dead-lettered as malformed are counted as messages:
//! they never entered through conveyor, so their records are in no stage's sums.
//!
//! Counters live in the worker processes: a worker that restarted lost its counts, so point this at
//! every worker and read it as a check of a run, not as a ledger (Prometheus keeps the long history).

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use anyhow::Context as _;
use conveyor_amqp::Topology;
use conveyor_amqp::settings::BrokerArgs;
use conveyor_base::Stage;
use serde::Serialize;

/// How long to wait before reading a pipeline again when it looks as if records were unaccounted for.
const RECHECK_AFTER: Duration = Duration::from_secs(1);

/// Where a pipeline's records are.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct PipelineStatus {
    pub pipeline: String,
    /// Records the fetcher published, plus source rows it dead-lettered (no usable id or modify time).
    pub fetched: u64,
    /// Records the writers wrote (settled at the write stage and not dead-lettered), in the target's
    /// units (lines, when the transformer flattens orders into lines).
    pub written: u64,
    /// Records dead-lettered at every stage, each in its stage's units.
    pub dead_lettered: u64,
    /// Messages dead-lettered because they could not be read (their records are counted nowhere).
    pub malformed_messages: u64,
    /// Records the rules skipped on purpose (the transformer's output units).
    pub filtered: u64,
    pub retried: u64,
    /// Records put back into the pipeline from dead-letter queues (and settled since).
    pub replayed: u64,
    /// The stages' records in flight, added up.
    pub in_flight: i64,
    /// Messages ready in the work and retry queues of the stages that carry records.
    pub queued_messages: u64,
    /// Messages held by the workers, not yet acked.
    pub unacked_messages: u64,
    /// Messages in the dead-letter queues.
    pub dead_letter_messages: u64,
    /// Records in flight at stages where nothing is queued or in a worker's hands (lost, or counted
    /// twice), added up as sizes.
    pub unaccounted: u64,
    /// Each stage that takes records from a queue, with its own sums.
    pub stages: Vec<StageStatus>,
}

/// The records of one stage, in the units of its queue.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct StageStatus {
    pub stage: String,
    /// Records published into the stage's queue by the stage before it, plus those replayed into it.
    pub entered: u64,
    /// Of those, records replayed from its dead-letter queue (counted when the stage settled them).
    pub replayed: u64,
    /// Records whose message the stage finished with for good: passed on or written (some perhaps
    /// filtered), or dead-lettered.
    pub settled: u64,
    /// Of those, records the stage dead-lettered.
    pub dead_lettered: u64,
    /// entered − settled: in the stage's work or retry queues, or in its workers' hands.
    pub in_flight: i64,
    /// Messages ready in the stage's work and retry queues.
    pub queued_messages: u64,
    /// Messages the stage's workers hold, not yet acked.
    pub unacked_messages: u64,
    /// In flight although nothing is queued at the stage or held by its workers: lost records
    /// (positive) or records counted twice (negative).
    pub unaccounted: i64,
}

impl StageStatus {
    /// Nothing waits in the stage's queues and no worker of it holds a message.
    fn is_quiet(&self) -> bool {
        self.queued_messages == 0 && self.unacked_messages == 0
    }
}

/// What the broker says of a pipeline's queues: per stage, messages ready in the work and retry
/// queues; and messages in the dead-letter queues.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QueueDepths {
    pub queued: HashMap<Stage, u64>,
    pub dead_letters: u64,
}

/// Reads where the records of `pipelines` (names, or pipeline files) are, from the `/metrics` of
/// `workers` (URLs, or base URLs) and the queues of the broker. Records that look unaccounted for are
/// read again a moment later and flagged only if both readings agree.
pub async fn status(
    broker: &BrokerArgs,
    workers: &[String],
    pipelines: &[String],
) -> anyhow::Result<Vec<PipelineStatus>> {
    let http = conveyor_base::tls::http_client(None)
        .timeout(Duration::from_secs(5))
        .build()?;
    let names = pipelines
        .iter()
        .map(|given| crate::pipeline_name(given))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let connection = conveyor_amqp::connect(&broker.address()?, "conveyorctl").await?;
    let channel = connection.create_channel().await?;
    let mut statuses = read(broker, workers, &http, &channel, &names).await?;
    if statuses.iter().any(|status| status.unaccounted != 0) {
        // Records move while the workers and the queues are read one after the other: read again,
        // and flag only what both readings agree on.
        tokio::time::sleep(RECHECK_AFTER).await;
        let again = read(broker, workers, &http, &channel, &names).await?;
        statuses = again
            .into_iter()
            .zip(&statuses)
            .map(|(second, first)| second.confirmed_by(first))
            .collect();
    }
    conveyor_amqp::close(&connection).await;
    Ok(statuses)
}

/// Scrapes every worker and reads the queues of every pipeline once.
async fn read(
    broker: &BrokerArgs,
    workers: &[String],
    http: &reqwest::Client,
    channel: &lapin::Channel,
    names: &[String],
) -> anyhow::Result<Vec<PipelineStatus>> {
    let mut samples = Vec::new();
    for worker in workers {
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
    let mut statuses = Vec::new();
    for name in names {
        let topology = Topology::new(broker, name);
        let mut depths = QueueDepths::default();
        for stage in Stage::ALL {
            depths.dead_letters +=
                u64::from(depth(channel, &topology.dead_letter_queue(stage)).await?);
            if stage.carries_records() {
                let mut queued = 0;
                for queue in
                    std::iter::once(topology.queue(stage)).chain(topology.retry_queues(stage))
                {
                    queued += u64::from(depth(channel, &queue).await?);
                }
                depths.queued.insert(stage, queued);
            }
        }
        statuses.push(count(name, &samples, &depths));
    }
    Ok(statuses)
}

/// Messages ready in a queue (it must exist).
async fn depth(channel: &lapin::Channel, queue: &str) -> anyhow::Result<u32> {
    conveyor_amqp::queue_depth(channel, queue)
        .await
        .with_context(|| format!("inspecting queue {queue} (is the topology declared?)"))
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

/// The sum of a metric over the samples of `pipeline` whose labels include every one of `labels`.
fn sum(samples: &[Sample], name: &str, pipeline: &str, labels: &[(&str, &str)]) -> u64 {
    samples
        .iter()
        .filter(|s| s.name == name)
        .filter(|s| s.labels.get("pipeline").map(String::as_str) == Some(pipeline))
        .filter(|s| {
            labels
                .iter()
                .all(|(key, value)| s.labels.get(*key).map(String::as_str) == Some(*value))
        })
        .map(|s| s.value as u64)
        .sum()
}

/// The stage whose output feeds `stage`'s queue.
fn upstream(stage: Stage) -> Option<Stage> {
    let at = Stage::ALL.iter().position(|s| *s == stage)?;
    at.checked_sub(1).map(|before| Stage::ALL[before])
}

/// The counts of one pipeline from the workers' samples and its queues' depths.
pub fn count(pipeline: &str, samples: &[Sample], depths: &QueueDepths) -> PipelineStatus {
    let of_stage =
        |name: &str, stage: Stage| sum(samples, name, pipeline, &[("stage", stage.as_str())]);
    let mut stages = Vec::new();
    for stage in Stage::ALL.into_iter().filter(|s| s.carries_records()) {
        let published = upstream(stage)
            .map(|before| of_stage("conveyor_records_out_total", before))
            .unwrap_or(0);
        let replayed = of_stage("conveyor_records_replayed_total", stage);
        let entered = published + replayed;
        let settled = of_stage("conveyor_records_settled_total", stage);
        let mut status = StageStatus {
            stage: stage.as_str().to_owned(),
            entered,
            replayed,
            settled,
            dead_lettered: of_stage("conveyor_records_dead_lettered_total", stage),
            in_flight: entered as i64 - settled as i64,
            queued_messages: depths.queued.get(&stage).copied().unwrap_or(0),
            unacked_messages: of_stage("conveyor_messages_in_hand", stage),
            unaccounted: 0,
        };
        if status.is_quiet() {
            status.unaccounted = status.in_flight;
        }
        stages.push(status);
    }
    let write = stages.iter().find(|s| s.stage == Stage::Write.as_str());
    PipelineStatus {
        pipeline: pipeline.to_owned(),
        fetched: of_stage("conveyor_records_out_total", Stage::Fetch)
            + of_stage("conveyor_records_dead_lettered_total", Stage::Fetch),
        written: write.map_or(0, |w| w.settled.saturating_sub(w.dead_lettered)),
        dead_lettered: sum(
            samples,
            "conveyor_records_dead_lettered_total",
            pipeline,
            &[],
        ),
        malformed_messages: sum(
            samples,
            "conveyor_messages_dead_lettered_total",
            pipeline,
            &[("class", "malformed")],
        ),
        filtered: sum(samples, "conveyor_records_filtered_total", pipeline, &[]),
        retried: sum(samples, "conveyor_records_retried_total", pipeline, &[]),
        replayed: stages.iter().map(|s| s.replayed).sum(),
        in_flight: stages.iter().map(|s| s.in_flight).sum(),
        queued_messages: stages.iter().map(|s| s.queued_messages).sum(),
        unacked_messages: sum(samples, "conveyor_messages_in_hand", pipeline, &[]),
        dead_letter_messages: depths.dead_letters,
        unaccounted: unaccounted(&stages),
        stages,
    }
}

/// Records unaccounted for over every stage, whichever way each is off.
fn unaccounted(stages: &[StageStatus]) -> u64 {
    stages.iter().map(|s| s.unaccounted.unsigned_abs()).sum()
}

impl PipelineStatus {
    /// The stages whose records are unaccounted for, as `N at stage`; empty when all add up.
    pub fn unaccounted_stages(&self) -> Vec<String> {
        self.stages
            .iter()
            .filter(|stage| stage.unaccounted != 0)
            .map(|stage| format!("{} at {}", stage.unaccounted, stage.stage))
            .collect()
    }

    /// This reading, with a stage's records flagged as unaccounted for only where `earlier` flagged
    /// the same number: a difference that changed between two readings is records on the move.
    pub fn confirmed_by(mut self, earlier: &PipelineStatus) -> Self {
        for stage in &mut self.stages {
            let before = earlier.stages.iter().find(|s| s.stage == stage.stage);
            if before.is_none_or(|before| before.unaccounted != stage.unaccounted) {
                stage.unaccounted = 0;
            }
        }
        self.unaccounted = unaccounted(&self.stages);
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn quiet() -> QueueDepths {
        QueueDepths {
            queued: [(Stage::Transform, 0), (Stage::Write, 0)].into(),
            dead_letters: 3,
        }
    }

    /// A flattening pipeline: 100 orders fetched (1 row refused), 99 published; one order
    /// dead-lettered by the transformer, one without lines; 98 orders became 240 lines, of which the
    /// filter skipped 4; 236 lines published, 2 refused by the target; a malformed message at each
    /// of two stages; 10 lines replayed after a fix.
    const FLATTENED: &str = r#"# HELP conveyor_records_in_total Records taken in by a stage
conveyor_records_in_total{pipeline="lines",stage="fetch"} 100
conveyor_records_out_total{pipeline="lines",stage="fetch"} 99
conveyor_records_dead_lettered_total{class="permanent",pipeline="lines",stage="fetch"} 1
conveyor_records_in_total{pipeline="lines",stage="transform"} 104
conveyor_records_settled_total{pipeline="lines",stage="transform"} 99
conveyor_records_dead_lettered_total{class="permanent",pipeline="lines",stage="transform"} 1
conveyor_records_filtered_total{pipeline="lines",stage="transform"} 5
conveyor_records_out_total{pipeline="lines",stage="transform"} 236
conveyor_messages_dead_lettered_total{class="malformed",pipeline="lines",stage="transform"} 1
conveyor_records_in_total{pipeline="lines",stage="write"} 246
conveyor_records_settled_total{pipeline="lines",stage="write"} 246
conveyor_records_replayed_total{pipeline="lines",stage="write"} 10
conveyor_records_dead_lettered_total{class="permanent",pipeline="lines",stage="write"} 2
conveyor_records_out_total{pipeline="lines",stage="write"} 244
conveyor_messages_dead_lettered_total{class="malformed",pipeline="lines",stage="write"} 1
conveyor_messages_dead_lettered_total{class="permanent",pipeline="lines",stage="write"} 2
conveyor_messages_in_hand{pipeline="lines",stage="write"} 0
conveyor_records_out_total{pipeline="other",stage="write"} 5
"#;

    #[test]
    fn each_stage_is_counted_in_its_own_units() {
        let status = count("lines", &parse_metrics(FLATTENED), &quiet());
        assert_eq!(status.fetched, 100);
        let stages: Vec<(&str, u64, u64, i64)> = status
            .stages
            .iter()
            .map(|s| (s.stage.as_str(), s.entered, s.settled, s.in_flight))
            .collect();
        // Orders at the transform stage, lines at the write stage: each adds up on its own.
        assert_eq!(stages, [("transform", 99, 99, 0), ("write", 246, 246, 0)]);
        assert_eq!(status.written, 244);
        assert_eq!(status.dead_lettered, 4);
        assert_eq!(
            status.malformed_messages, 2,
            "counted as messages, not records"
        );
        assert_eq!((status.replayed, status.filtered), (10, 5));
        assert_eq!((status.in_flight, status.unaccounted), (0, 0));
    }

    #[test]
    fn records_in_flight_are_unaccounted_for_only_where_nothing_is_pending() {
        // 40 lines published that the writers never settled.
        let text = FLATTENED.replace(
            r#"conveyor_records_out_total{pipeline="lines",stage="transform"} 236"#,
            r#"conveyor_records_out_total{pipeline="lines",stage="transform"} 276"#,
        );
        let samples = parse_metrics(&text);
        let status = count("lines", &samples, &quiet());
        assert_eq!(status.stages[1].in_flight, 40);
        assert_eq!(status.stages[1].unaccounted, 40);
        assert_eq!(status.stages[0].unaccounted, 0);
        assert_eq!(status.unaccounted, 40);

        // The same while a message waits in the write queue: in flight, nothing flagged.
        let busy = QueueDepths {
            queued: [(Stage::Transform, 0), (Stage::Write, 1)].into(),
            dead_letters: 0,
        };
        let moving = count("lines", &samples, &busy);
        assert_eq!((moving.in_flight, moving.unaccounted), (40, 0));

        // Settled more often than entered: counted twice, flagged as well.
        let twice = text.replace(
            r#"conveyor_records_settled_total{pipeline="lines",stage="transform"} 99"#,
            r#"conveyor_records_settled_total{pipeline="lines",stage="transform"} 101"#,
        );
        let status = count("lines", &parse_metrics(&twice), &quiet());
        assert_eq!(status.stages[0].unaccounted, -2);
        assert_eq!(status.unaccounted, 42);
    }

    #[test]
    fn a_difference_is_flagged_only_when_two_readings_agree() {
        let lost = FLATTENED.replace(
            r#"conveyor_records_settled_total{pipeline="lines",stage="write"} 246"#,
            r#"conveyor_records_settled_total{pipeline="lines",stage="write"} 240"#,
        );
        let first = count("lines", &parse_metrics(&lost), &quiet());
        assert_eq!(first.unaccounted, 6);
        let same = count("lines", &parse_metrics(&lost), &quiet()).confirmed_by(&first);
        assert_eq!(same.unaccounted, 6);
        // Meanwhile the writers settled them: the first reading caught records on the move.
        let settled = count("lines", &parse_metrics(FLATTENED), &quiet()).confirmed_by(&first);
        assert_eq!(settled.unaccounted, 0);
    }
}
