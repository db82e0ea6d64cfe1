//! Recording with group commits: every worker task hands its rows to one recorder task per process,
//! which writes whatever waits in one statement and answers each task once it committed. A worker
//! that settles hundreds of messages a second pays a few commits, not hundreds.

use conveyor_base::ledger::{Letter, Outcome, Sent, Settled};
use conveyor_base::{ErrorClass, Stage};
use conveyor_postgres::Database;
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};
use tokio_postgres::types::Json;

/// Requests written in one statement at most.
const MOST_PER_COMMIT: usize = 512;

/// Rows to record for one caller, and where to say that they are.
struct Job {
    pipeline: String,
    settled: Vec<Settled>,
    sent: Vec<Sent>,
    done: oneshot::Sender<Result<(), String>>,
}

/// The handle of a process's recorder task.
#[derive(Clone)]
pub(crate) struct Recorder {
    jobs: mpsc::Sender<Job>,
}

impl Recorder {
    pub(crate) fn start(database: Database) -> Self {
        let (jobs, receiver) = mpsc::channel(4 * MOST_PER_COMMIT);
        tokio::spawn(run(database, receiver));
        Self { jobs }
    }

    /// Records `settled` and `sent` of `pipeline`; returns once they are committed.
    pub(crate) fn record(
        &self,
        pipeline: &str,
        settled: Vec<Settled>,
        sent: Vec<Sent>,
    ) -> impl Future<Output = Result<(), String>> + Send + 'static {
        let jobs = self.jobs.clone();
        let pipeline = pipeline.to_owned();
        async move {
            let (done, committed) = oneshot::channel();
            let job = Job {
                pipeline,
                settled,
                sent,
                done,
            };
            jobs.send(job)
                .await
                .map_err(|_| "the ledger's recorder stopped".to_owned())?;
            committed
                .await
                .map_err(|_| "the ledger's recorder stopped".to_owned())?
        }
    }
}

async fn run(database: Database, mut jobs: mpsc::Receiver<Job>) {
    while let Some(first) = jobs.recv().await {
        let mut batch = vec![first];
        while batch.len() < MOST_PER_COMMIT {
            match jobs.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let result = write(&database, &batch).await;
        for job in batch {
            let _ = job.done.send(result.clone());
        }
    }
}

pub(crate) const SETTLED_COLUMNS: &str = "pipeline, stage, message_id, outcome, records_in, passed_on, \
    filtered, filtered_ids, written, stale, dead_lettered, dead_class, dead_ids";
const SENT_COLUMNS: &str = "pipeline, stage, message_id, sent_by, parent_id, records, record_ids";
const LETTER_COLUMNS: &str = "pipeline, stage, message_id, parent_id, class, reason, record_ids, \
    attempts, replays, headers, payload, payload_bytes";

/// The most of a letter's payload the index keeps (its queue keeps all of it).
const PAYLOAD_KEPT: usize = 1 << 20;

/// Writes the rows of every job in one statement (every table at once: atomic). A letter indexed
/// already was found in its queue before its stage recorded it: its stage names its parent.
async fn write(database: &Database, batch: &[Job]) -> Result<(), String> {
    let settled: Vec<SettledRow> = batch
        .iter()
        .flat_map(|job| {
            job.settled
                .iter()
                .map(|settled| SettledRow::of(&job.pipeline, settled))
        })
        .collect();
    let sent: Vec<SentRow> = batch
        .iter()
        .flat_map(|job| {
            let inside = job.settled.iter().flat_map(|settled| &settled.sent);
            inside
                .chain(&job.sent)
                .map(|sent| SentRow::of(&job.pipeline, sent))
        })
        .collect();
    let letters: Vec<LetterRow> = batch
        .iter()
        .flat_map(|job| {
            job.settled.iter().flat_map(|settled| {
                settled
                    .letters
                    .iter()
                    .map(|letter| LetterRow::of(&job.pipeline, settled, letter))
            })
        })
        .collect();
    let client = database
        .client()
        .await
        .map_err(|err| format!("ledger: {err}"))?;
    let statement = format!(
        "WITH sent AS (INSERT INTO conveyor_ledger_sent ({SENT_COLUMNS}) \
         SELECT {SENT_COLUMNS} FROM jsonb_populate_recordset(NULL::conveyor_ledger_sent, $2::jsonb) \
         ON CONFLICT DO NOTHING), \
         letters AS (INSERT INTO conveyor_ledger_letter ({LETTER_COLUMNS}) \
         SELECT DISTINCT ON (pipeline, stage, message_id) {LETTER_COLUMNS} \
         FROM jsonb_populate_recordset(NULL::conveyor_ledger_letter, $3::jsonb) \
         ON CONFLICT (pipeline, stage, message_id) DO UPDATE SET parent_id = EXCLUDED.parent_id) \
         INSERT INTO conveyor_ledger_settled ({SETTLED_COLUMNS}) \
         SELECT {SETTLED_COLUMNS} FROM jsonb_populate_recordset(NULL::conveyor_ledger_settled, $1::jsonb) \
         ON CONFLICT DO NOTHING"
    );
    let prepared = client
        .prepare_cached(&statement)
        .await
        .map_err(|err| format!("ledger: preparing the record: {err}"))?;
    client
        .execute(&prepared, &[&Json(&settled), &Json(&sent), &Json(&letters)])
        .await
        .map_err(|err| format!("ledger: recording {} settlement(s): {err}", settled.len()))?;
    Ok(())
}

#[derive(Debug, Serialize)]
pub(crate) struct SettledRow<'a> {
    pipeline: &'a str,
    stage: &'static str,
    message_id: &'a str,
    outcome: &'static str,
    records_in: u64,
    passed_on: u64,
    filtered: u64,
    filtered_ids: &'a [String],
    written: u64,
    stale: u64,
    dead_lettered: u64,
    dead_class: Option<&'static str>,
    dead_ids: &'a [String],
}

impl<'a> SettledRow<'a> {
    pub(crate) fn of(pipeline: &'a str, settled: &'a Settled) -> Self {
        Self {
            pipeline,
            stage: settled.stage.as_str(),
            message_id: &settled.message_id,
            outcome: match settled.outcome {
                Outcome::Done => "done",
                Outcome::DeadLettered(_) => "dead_lettered",
                Outcome::Malformed => "malformed",
            },
            records_in: settled.records_in,
            passed_on: settled.passed_on,
            filtered: settled.filtered,
            filtered_ids: &settled.filtered_ids,
            written: settled.written,
            stale: settled.stale,
            dead_lettered: settled.dead_ids.len() as u64,
            dead_class: settled.dead_class.map(ErrorClass::as_str),
            dead_ids: &settled.dead_ids,
        }
    }

    /// The row with its dead letters' class named as the ledger reads it (the broker's has no
    /// [`ErrorClass`]).
    pub(crate) fn with_class(mut self, class: &'static str) -> Self {
        self.dead_class = Some(class);
        self
    }
}

/// Inserts `sent` of `pipeline` (already recorded ones stay as they are).
pub(crate) async fn insert_sent(
    client: &impl tokio_postgres::GenericClient,
    pipeline: &str,
    sent: &[Sent],
) -> Result<(), tokio_postgres::Error> {
    let rows: Vec<SentRow> = sent
        .iter()
        .map(|sent| SentRow::of(pipeline, sent))
        .collect();
    insert(client, "conveyor_ledger_sent", SENT_COLUMNS, &rows).await
}

/// Inserts settled `rows` (already recorded messages stay as they are).
pub(crate) async fn insert_settled(
    client: &impl tokio_postgres::GenericClient,
    rows: &[SettledRow<'_>],
) -> Result<(), tokio_postgres::Error> {
    insert(client, "conveyor_ledger_settled", SETTLED_COLUMNS, rows).await
}

/// Inserts JSON `rows` into one of the ledger's tables.
async fn insert(
    client: &impl tokio_postgres::GenericClient,
    table: &str,
    columns: &str,
    rows: &[impl Serialize + std::fmt::Debug + Sync],
) -> Result<(), tokio_postgres::Error> {
    client
        .execute(
            &format!(
                "INSERT INTO {table} ({columns}) SELECT {columns} \
                 FROM jsonb_populate_recordset(NULL::{table}, $1::jsonb) ON CONFLICT DO NOTHING"
            ),
            &[&Json(rows)],
        )
        .await
        .map(drop)
}

#[derive(Debug, Serialize)]
struct SentRow<'a> {
    pipeline: &'a str,
    stage: &'static str,
    message_id: &'a str,
    sent_by: &'static str,
    parent_id: &'a str,
    records: u64,
    record_ids: &'a [String],
}

impl<'a> SentRow<'a> {
    fn of(pipeline: &'a str, sent: &'a Sent) -> Self {
        Self {
            pipeline,
            stage: sent.stage.as_str(),
            message_id: &sent.message_id,
            sent_by: sent.by,
            parent_id: &sent.parent_id,
            records: sent.record_ids.len() as u64,
            record_ids: &sent.record_ids,
        }
    }
}

#[derive(Debug, Serialize)]
pub(crate) struct LetterRow<'a> {
    pipeline: &'a str,
    stage: &'static str,
    message_id: &'a str,
    parent_id: &'a str,
    class: &'a str,
    reason: &'a str,
    record_ids: &'a [String],
    attempts: u32,
    replays: u32,
    headers: std::collections::BTreeMap<&'a str, &'a str>,
    payload: &'a str,
    payload_bytes: usize,
}

impl<'a> LetterRow<'a> {
    pub(crate) fn of(pipeline: &'a str, settled: &'a Settled, letter: &'a Letter) -> Self {
        Self::in_stage(pipeline, settled.stage, &settled.message_id, letter)
    }

    pub(crate) fn in_stage(
        pipeline: &'a str,
        stage: Stage,
        parent_id: &'a str,
        letter: &'a Letter,
    ) -> Self {
        let mut kept = letter.payload.len().min(PAYLOAD_KEPT);
        while !letter.payload.is_char_boundary(kept) {
            kept -= 1;
        }
        Self {
            pipeline,
            stage: stage.as_str(),
            message_id: &letter.message_id,
            parent_id,
            class: &letter.class,
            reason: &letter.reason,
            record_ids: &letter.record_ids,
            attempts: letter.attempts,
            replays: letter.replays,
            headers: letter
                .headers
                .iter()
                .map(|(name, value)| (name.as_str(), value.as_str()))
                .collect(),
            payload: &letter.payload[..kept],
            payload_bytes: letter.payload.len(),
        }
    }
}

/// Indexes `letters` of `pipeline` (already indexed ones stay as they are).
pub(crate) async fn insert_letters(
    client: &impl tokio_postgres::GenericClient,
    rows: &[LetterRow<'_>],
) -> Result<(), tokio_postgres::Error> {
    insert(client, "conveyor_ledger_letter", LETTER_COLUMNS, rows).await
}
