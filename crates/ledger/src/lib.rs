//! The ledger: a durable account, in PostgreSQL, of what every stage settled for each message it
//! took, the messages each stage sent on, and what operators replayed and purged. `conveyorctl status`
//! reads it, so that a pipeline's books survive every restart of its workers.
//!
//! - Rows are keyed by pipeline, stage and message id: a redelivered message settled again is absorbed.
//! - A worker records a message's settlement after its output is durable (published and confirmed,
//!   written, or dead-lettered) and before it acks the message; for the PostgreSQL target, in the
//!   same statement as the upsert ([`with_settled_write`]).
//! - Recording goes through one task per process that commits whatever waits together ([`record`]):
//!   a busy worker pays one commit for many messages.
//! - Rows older than the retention time are deleted in batches ([`prune`]).
//!
//! The tables live in the schema of CONVEYOR_PG_SCHEMA, with their own migration history.

pub mod action;
pub mod jobs;
pub mod letters;
pub mod prune;
pub mod read;
mod record;

use std::time::Duration;

use conveyor_base::SettingsError;
use conveyor_base::ledger::{Ledger, LedgerFuture, NoLedger, Sent, Settled, SharedLedger};
use conveyor_postgres::{Database, DatabaseError, PostgresArgs};
use std::sync::Arc;

/// The ledger's migration history table.
const HISTORY_TABLE: &str = "conveyor_ledger_migrations";

/// Whether and how long the ledger keeps what the stages settled (every flag also reads an
/// environment variable).
#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "Ledger")]
pub struct LedgerArgs {
    /// Keep the ledger (on) or not (off). Off, `conveyorctl status` has nothing to read.
    #[arg(long = "ledger", env = "CONVEYOR_LEDGER", default_value = "on", value_parser = parse_switch)]
    pub enabled: bool,
    /// Days a settled message stays in the ledger before it is pruned.
    #[arg(long, env = "CONVEYOR_LEDGER_RETENTION_DAYS", default_value_t = 30)]
    pub ledger_retention_days: u32,
}

fn parse_switch(value: &str) -> Result<bool, String> {
    match value {
        "on" | "true" | "1" => Ok(true),
        "off" | "false" | "0" => Ok(false),
        other => Err(format!("{other:?} is neither on nor off")),
    }
}

impl LedgerArgs {
    pub fn retention(&self) -> Duration {
        Duration::from_secs(u64::from(self.ledger_retention_days.max(1)) * 24 * 3600)
    }
}

/// Runs the ledger's migrations.
pub async fn migrate(database: &Database) -> Result<(), DatabaseError> {
    let migrations = [
        ("V1__ledger", include_str!("../migrations/V1__ledger.sql")),
        ("V2__letters", include_str!("../migrations/V2__letters.sql")),
    ]
    .map(|(name, sql)| {
        refinery::Migration::unapplied(name, sql)
            .expect("the embedded migrations are named like migrations")
    });
    database
        .migrate("of the ledger", &migrations, HISTORY_TABLE)
        .await
}

/// The ledger of one process's pipelines as `args` say: off, or in the database of `postgres`
/// (migrated, with its recording and pruning tasks running).
pub async fn open(
    args: &LedgerArgs,
    postgres: &PostgresArgs,
) -> Result<Option<PgLedger>, DatabaseError> {
    if !args.enabled {
        return Ok(None);
    }
    let database = Database::connect(postgres).map_err(|err| match err {
        DatabaseError::Settings(settings) if settings.name == "CONVEYOR_PG_URL" => {
            DatabaseError::Settings(SettingsError::new(
                "CONVEYOR_PG_URL",
                "required: the ledger keeps what each stage settled there (CONVEYOR_LEDGER=off runs without it)",
            ))
        }
        other => other,
    })?;
    migrate(&database).await?;
    Ok(Some(PgLedger::start(database, args.retention())))
}

/// The ledger in PostgreSQL, shared by every pipeline of a process.
#[derive(Clone)]
pub struct PgLedger {
    recorder: record::Recorder,
    home: String,
    _pruning: Arc<prune::Pruning>,
}

impl PgLedger {
    /// Starts recording into `database` (migrated) and pruning rows older than `retention`.
    pub fn start(database: Database, retention: Duration) -> Self {
        Self {
            home: format!("{}/{}", database.endpoint, database.schema),
            _pruning: Arc::new(prune::Pruning::start(database.clone(), retention)),
            recorder: record::Recorder::start(database),
        }
    }

    /// Where the ledger is kept: `host/db/schema`.
    pub fn home(&self) -> String {
        self.home.clone()
    }

    /// The ledger of one pipeline.
    pub fn of(&self, pipeline: &str) -> SharedLedger {
        Arc::new(PipelineLedger {
            pipeline: pipeline.to_owned(),
            recorder: self.recorder.clone(),
        })
    }
}

/// The ledger of one pipeline, or none.
pub fn for_pipeline(ledger: Option<&PgLedger>, pipeline: &str) -> SharedLedger {
    match ledger {
        Some(ledger) => ledger.of(pipeline),
        None => Arc::new(NoLedger),
    }
}

struct PipelineLedger {
    pipeline: String,
    recorder: record::Recorder,
}

impl Ledger for PipelineLedger {
    fn enabled(&self) -> bool {
        true
    }

    fn settle(&self, settled: Settled) -> LedgerFuture<'_> {
        Box::pin(
            self.recorder
                .record(&self.pipeline, vec![settled], Vec::new()),
        )
    }

    fn sent(&self, sent: Vec<Sent>) -> LedgerFuture<'_> {
        Box::pin(self.recorder.record(&self.pipeline, Vec::new(), sent))
    }
}

/// `upsert` (an `INSERT ... ON CONFLICT` of the rows in `$1`) as one statement that also records the
/// write stage's settlement of the message: `$2` the pipeline, `$3` the message id, `$4` the records
/// it carried. Both commit together or not at all; a message settled before keeps its first row (the
/// upsert then applies nothing: the rows are there). The statement returns the rows applied.
pub fn with_settled_write(upsert: &str) -> String {
    format!(
        "WITH applied AS ({upsert} RETURNING 1), \
         settled AS (INSERT INTO conveyor_ledger_settled (pipeline, stage, message_id, outcome, records_in, written, stale) \
         SELECT $2::text, 'write', $3::text, 'done', $4::bigint, n, $4::bigint - n FROM (SELECT count(*) AS n FROM applied) AS c \
         ON CONFLICT DO NOTHING) \
         SELECT count(*) FROM applied"
    )
}
