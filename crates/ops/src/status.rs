//! Where every record of a pipeline is, from the ledger: the logic behind `conveyorctl status`.
//!
//! The ledger ([`conveyor_ledger`]) holds, per message, what each stage settled and which messages each
//! stage sent on; it survives every restart of the workers, so the books add up after a crash as well
//! as before it. Stage by stage, in the units of the stage's own queue (a transformer that flattens
//! orders into lines takes orders in and passes lines on):
//!
//! - **entered**: the records sent into the stage's queue (by the stage before, or replayed from its
//!   dead-letter queue), and those the stage settled that no sender recorded (a sender killed between
//!   its publish and its record: the stage took them, so they are accounted for);
//! - **settled**: passed on (some perhaps filtered by a rule), written (or already newer), or
//!   dead-lettered, by class;
//! - **in flight**: the messages sent in and not settled. They wait in the stage's work or retry
//!   queues, or in a worker's hands.
//!
//! A message in flight while the stage's queues hold nothing, and still so a moment later, is
//! **unaccounted for**: named by message id and record ids, and the command fails. (A message the
//! broker dead-lettered itself, past its queue's delivery limit, is found in the dead-letter queue and
//! counted as such.) A worker holding a message longer than that moment, such as a writer waiting
//! for its target to come back, shows as unaccounted for until it settles: read again.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use anyhow::Context as _;
use chrono::{DateTime, Utc};
use conveyor_amqp::Topology;
use conveyor_amqp::dead_letters::BROKER_CLASS;
use conveyor_amqp::settings::BrokerArgs;
use conveyor_base::Stage;
use conveyor_ledger::letters::{self, LetterQuery};
use conveyor_ledger::read::{self, ActionBooks, Books, Open, Span, StageBooks};
use conveyor_postgres::Database;
use serde::Serialize;

/// What to read.
#[derive(Debug, Clone)]
pub struct Request {
    /// Pipelines: names, or pipeline files.
    pub pipelines: Vec<String>,
    /// The settlements to add up (all when open).
    pub span: Span,
    /// How long a message must stay in flight, with nothing queued at its stage, to be unaccounted for.
    pub settle_wait: Duration,
    /// Workers' `/metrics` URLs (or base URLs), whose messages in hand are counted as held.
    pub workers: Vec<String>,
}

/// Where a pipeline's records are.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct PipelineStatus {
    pub pipeline: String,
    /// Records the fetchers sent on (a window paged twice counts twice), plus source rows refused
    /// (no usable id or modify time).
    pub fetched: u64,
    /// Records the writers settled as written: applied, or already held in the same or a newer
    /// version (in the target's units).
    pub written: u64,
    pub applied: u64,
    pub already_newer: u64,
    /// Records dead-lettered at every stage, each in its stage's units, less those replayed since.
    pub dead_lettered: u64,
    pub dead_lettered_by_class: BTreeMap<String, u64>,
    /// Messages refused as unreadable (their records are counted nowhere).
    pub malformed_messages: u64,
    /// Records the rules skipped on purpose (the transformer's output units).
    pub filtered: u64,
    /// Records put back into the pipeline from dead-letter queues.
    pub replayed: u64,
    /// Records of dead letters an operator removed for good (still counted as dead-lettered).
    pub purged: u64,
    /// Records in flight over every stage.
    pub in_flight: u64,
    /// Messages ready in the work and retry queues of the stages that carry records.
    pub queued_messages: u64,
    /// Messages in the dead-letter queues.
    pub dead_letter_messages: u64,
    /// Records in flight where nothing is queued, named below.
    pub unaccounted: u64,
    pub unaccounted_messages: Vec<Unaccounted>,
    /// Distinct record ids, for pipelines whose output keeps the source's ids (one record in, one
    /// out): fetched should equal written + dead-lettered + filtered.
    pub ids: IdCounts,
    pub stages: Vec<StageStatus>,
}

/// Distinct record ids by what became of them.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct IdCounts {
    pub fetched: u64,
    pub written: u64,
    /// Dead-lettered and not written since.
    pub dead_lettered: u64,
    pub filtered: u64,
}

/// The records of one stage, in the units of its queue.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct StageStatus {
    pub stage: String,
    /// Records sent into the stage's queue, by the stage before it or replayed, and those it settled
    /// that no sender recorded.
    pub entered: u64,
    /// Of those, records replayed from the stage's dead-letter queue.
    pub replayed: u64,
    /// Of those, records whose send was not recorded (the sender died between publish and record).
    pub unrecorded_sends: u64,
    /// Records whose message the stage settled.
    pub settled: u64,
    pub passed_on: u64,
    pub filtered: u64,
    pub written: u64,
    pub already_newer: u64,
    /// Records the stage dead-lettered, by class (the broker's own included).
    pub dead_lettered: BTreeMap<String, u64>,
    /// Messages sent in and not settled, and their records.
    pub in_flight_messages: u64,
    pub in_flight: u64,
    /// When the oldest message in flight was sent into the stage.
    pub oldest_in_flight_at: Option<DateTime<Utc>>,
    /// Messages ready in the stage's work and retry queues.
    pub queued_messages: u64,
    /// Messages the given workers hold, not yet acked.
    pub held_messages: u64,
    /// Records in flight while nothing is queued at the stage.
    pub unaccounted: u64,
}

/// A message sent into a stage and neither settled there, queued, nor dead-lettered.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Unaccounted {
    pub stage: String,
    pub message_id: String,
    pub sent_by: String,
    pub parent_id: String,
    pub sent_at: DateTime<Utc>,
    pub record_ids: Vec<String>,
}

/// One reading of what is outside the ledger: per stage, the messages ready in the work and retry
/// queues, the ids of the broker's own dead letters, the messages held by the given workers.
#[derive(Debug, Clone, Default)]
struct Outside {
    queued: HashMap<Stage, u64>,
    broker_dead: HashMap<Stage, BTreeMap<String, u64>>,
    dead_letter_messages: u64,
    held: HashMap<Stage, u64>,
}

/// Reads where the records of each pipeline are, from the ledger in `database` and the broker's
/// queues. Messages that look unaccounted for are looked at again after `request.settle_wait`.
pub async fn status(
    broker: &BrokerArgs,
    database: &Database,
    request: &Request,
) -> anyhow::Result<Vec<PipelineStatus>> {
    let names = request
        .pipelines
        .iter()
        .map(|given| crate::pipeline_name(given))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let connection = conveyor_amqp::connect(&broker.address()?, "conveyorctl").await?;
    let http = conveyor_base::tls::http_client(None)
        .timeout(Duration::from_secs(5))
        .build()?;
    let mut statuses = Vec::new();
    for name in &names {
        if !read::knows(database, name).await? {
            anyhow::bail!(
                "the ledger in {}/{} holds nothing of pipeline {name}: has it run, with CONVEYOR_LEDGER on and \
                 this CONVEYOR_PG_URL and CONVEYOR_PG_SCHEMA?",
                database.endpoint,
                database.schema
            );
        }
        let topology = Topology::new(broker, name);
        topology.require_declared(&connection).await?;
        let books = read::books(database, name, request.span).await?;
        let outside =
            look_outside(&connection, database, &topology, &http, &request.workers).await?;
        let mut suspects = quiet_open(&books, &outside);
        if !suspects.is_empty() {
            // Messages move while the ledger and the queues are read one after the other: flag only
            // those still in flight, with nothing queued at their stage, a moment later.
            tokio::time::sleep(request.settle_wait).await;
            let again = read::books(database, name, request.span).await?;
            let outside =
                look_outside(&connection, database, &topology, &http, &request.workers).await?;
            let still = suspects_ids(&quiet_open(&again, &outside));
            suspects.retain(|open| still.contains(&(open.stage.clone(), open.message_id.clone())));
        }
        let unaccounted = name_records(database, name, suspects).await?;
        let ids = distinct_ids(database, name).await?;
        statuses.push(count(name, &books, &outside, unaccounted, ids));
    }
    conveyor_amqp::close(&connection).await;
    Ok(statuses)
}

fn suspects_ids(open: &[Open]) -> BTreeSet<(String, String)> {
    open.iter()
        .map(|open| (open.stage.clone(), open.message_id.clone()))
        .collect()
}

/// The messages in flight at stages where nothing is queued or held, and that are not the broker's
/// own dead letters.
fn quiet_open(books: &Books, outside: &Outside) -> Vec<Open> {
    books
        .open
        .iter()
        .filter(|open| {
            let Some(stage) = stage_named(&open.stage) else {
                return false;
            };
            let quiet = outside.queued.get(&stage).copied().unwrap_or(0) == 0
                && outside.held.get(&stage).copied().unwrap_or(0) == 0;
            let broker_dead = outside
                .broker_dead
                .get(&stage)
                .is_some_and(|ids| ids.contains_key(&open.message_id));
            quiet && !broker_dead
        })
        .cloned()
        .collect()
}

fn stage_named(name: &str) -> Option<Stage> {
    Stage::ALL.into_iter().find(|stage| stage.as_str() == name)
}

/// Reads the queues of a pipeline's stages and, when given, the workers' messages in hand.
async fn look_outside(
    connection: &lapin::Connection,
    database: &Database,
    topology: &Topology,
    http: &reqwest::Client,
    workers: &[String],
) -> anyhow::Result<Outside> {
    let channel = connection.create_channel().await?;
    let mut outside = Outside::default();
    for stage in Stage::ALL
        .into_iter()
        .filter(|stage| stage.carries_records())
    {
        let mut queued = 0;
        for queue in std::iter::once(topology.queue(stage)).chain(topology.retry_queues(stage)) {
            queued += u64::from(
                conveyor_amqp::queue_depth(&channel, &queue)
                    .await
                    .with_context(|| {
                        format!("inspecting queue {queue} (is the topology declared?)")
                    })?,
            );
        }
        outside.queued.insert(stage, queued);
    }
    // The broker's own dead letters from the letter index (brought up to date with the queues
    // first), so that reading the books takes no letter from other readers.
    crate::letters::refresh_index(connection, database, topology).await?;
    for stage in Stage::ALL {
        let queue = topology.dead_letter_queue(stage);
        outside.dead_letter_messages += u64::from(
            conveyor_amqp::queue_depth(&channel, &queue)
                .await
                .with_context(|| format!("inspecting queue {queue}"))?,
        );
    }
    let broker = LetterQuery {
        class: Some(BROKER_CLASS.to_owned()),
        ..LetterQuery::dead(topology.pipeline())
    };
    for letter in letters::page(database, &broker, None, u32::MAX).await? {
        if let Some(stage) = stage_named(&letter.stage) {
            outside
                .broker_dead
                .entry(stage)
                .or_default()
                .insert(letter.message_id, letter.record_ids.len() as u64);
        }
    }
    let _ = channel.close(200, "done".into()).await;
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
        for sample in parse_metrics(&text)
            .into_iter()
            .filter(|sample| sample.name == "conveyor_messages_in_hand")
            .filter(|sample| {
                sample.labels.get("pipeline").map(String::as_str) == Some(topology.pipeline())
            })
        {
            if let Some(stage) = sample
                .labels
                .get("stage")
                .and_then(|name| stage_named(name))
            {
                *outside.held.entry(stage).or_default() += sample.value as u64;
            }
        }
    }
    Ok(outside)
}

/// The unaccounted messages with the ids of their records.
async fn name_records(
    database: &Database,
    pipeline: &str,
    open: Vec<Open>,
) -> anyhow::Result<Vec<Unaccounted>> {
    let mut by_stage: BTreeMap<String, Vec<Open>> = BTreeMap::new();
    for message in open {
        by_stage
            .entry(message.stage.clone())
            .or_default()
            .push(message);
    }
    let mut named = Vec::new();
    for (stage, messages) in by_stage {
        let message_ids: Vec<String> = messages.iter().map(|m| m.message_id.clone()).collect();
        let mut ids = read::record_ids(database, pipeline, &stage, &message_ids).await?;
        named.extend(messages.into_iter().map(|message| Unaccounted {
            record_ids: ids.remove(&message.message_id).unwrap_or_default(),
            stage: message.stage,
            message_id: message.message_id,
            sent_by: message.sent_by,
            parent_id: message.parent_id,
            sent_at: message.sent_at,
        }));
    }
    Ok(named)
}

async fn distinct_ids(database: &Database, pipeline: &str) -> anyhow::Result<IdCounts> {
    let ids = read::distinct_ids(database, pipeline).await?;
    Ok(IdCounts {
        fetched: ids.fetched,
        written: ids.written,
        dead_lettered: ids.dead_lettered,
        filtered: ids.filtered,
    })
}

/// Adds up a pipeline's books with what is outside the ledger.
fn count(
    pipeline: &str,
    books: &Books,
    outside: &Outside,
    unaccounted: Vec<Unaccounted>,
    ids: IdCounts,
) -> PipelineStatus {
    let no_books = StageBooks::default();
    let no_actions = ActionBooks::default();
    let books_of = |stage: Stage| books.stages.get(stage.as_str()).unwrap_or(&no_books);
    let transform = books_of(Stage::Transform);
    let mut status = PipelineStatus {
        pipeline: pipeline.to_owned(),
        fetched: transform.sent.get("fetch").map_or(0, |sent| sent.records)
            + transform.unrecorded_sends.records
            + books_of(Stage::Fetch).dead_lettered.values().sum::<u64>(),
        dead_letter_messages: outside.dead_letter_messages,
        ids,
        ..Default::default()
    };
    for stage in Stage::ALL {
        let stage_books = books_of(stage);
        let actions = books.actions.get(stage.as_str()).unwrap_or(&no_actions);
        status.malformed_messages += stage_books.malformed_messages;
        status.filtered += stage_books.filtered;
        status.replayed += actions.replayed.records;
        status.purged += actions.purged.records;
        let mut dead_lettered = stage_books.dead_lettered.clone();
        // Messages in flight that the broker dead-lettered itself: no stage settled them.
        let broker_letters = outside.broker_dead.get(&stage);
        let (mut in_flight_messages, mut in_flight) = (0, 0);
        let mut oldest_in_flight_at = None;
        for open in books
            .open
            .iter()
            .filter(|open| open.stage == stage.as_str())
        {
            if broker_letters.is_some_and(|letters| letters.contains_key(&open.message_id)) {
                *dead_lettered.entry(BROKER_CLASS.to_owned()).or_default() += open.records;
            } else {
                in_flight_messages += 1;
                in_flight += open.records;
                // The open messages come oldest first.
                oldest_in_flight_at = oldest_in_flight_at.or(Some(open.sent_at));
            }
        }
        for (class, records) in &dead_lettered {
            *status
                .dead_lettered_by_class
                .entry(class.clone())
                .or_default() += records;
        }
        if !stage.carries_records() {
            continue;
        }
        let sent: u64 = stage_books.sent.values().map(|sent| sent.records).sum();
        let unaccounted_here: u64 = unaccounted
            .iter()
            .filter(|message| message.stage == stage.as_str())
            .map(|message| message.record_ids.len() as u64)
            .sum();
        status.stages.push(StageStatus {
            stage: stage.as_str().to_owned(),
            entered: sent + stage_books.unrecorded_sends.records,
            replayed: stage_books
                .sent
                .get("replay")
                .map_or(0, |sent| sent.records),
            unrecorded_sends: stage_books.unrecorded_sends.records,
            settled: stage_books.settled.records,
            passed_on: stage_books.passed_on,
            filtered: stage_books.filtered,
            written: stage_books.written,
            already_newer: stage_books.stale,
            dead_lettered,
            in_flight_messages,
            in_flight,
            oldest_in_flight_at,
            queued_messages: outside.queued.get(&stage).copied().unwrap_or(0),
            held_messages: outside.held.get(&stage).copied().unwrap_or(0),
            unaccounted: unaccounted_here,
        });
    }
    let write = books_of(Stage::Write);
    status.applied = write.written;
    status.already_newer = write.stale;
    status.written = write.written + write.stale;
    status.dead_lettered = status
        .dead_lettered_by_class
        .values()
        .sum::<u64>()
        .saturating_sub(status.replayed);
    status.in_flight = status.stages.iter().map(|stage| stage.in_flight).sum();
    status.queued_messages = status.stages.iter().map(|s| s.queued_messages).sum();
    status.unaccounted = status.stages.iter().map(|s| s.unaccounted).sum();
    status.unaccounted_messages = unaccounted;
    status
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
