//! Replays and purges run as jobs: the letters a job covers are fixed when it is asked for, its
//! progress and failures are kept as it runs, and a job still running when its runner stopped (a
//! console restarted) is found again and resumed. Resuming is safe: a letter moved already is
//! marked so in the letter index, and is not moved twice.

use chrono::{DateTime, Utc};
use conveyor_postgres::{Database, DatabaseError};
use serde::{Deserialize, Serialize};
use tokio_postgres::Row;
use tokio_postgres::types::Json;

use crate::action::ActionKind;
use conveyor_postgres::failed;

/// A letter a job covers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobLetter {
    pub stage: String,
    pub message_id: String,
}

/// A job as the ledger keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Job {
    pub id: i64,
    pub pipeline: String,
    pub action: String,
    pub requested_by: String,
    pub requested_at: DateTime<Utc>,
    pub letters: Vec<JobLetter>,
    pub total: i64,
    /// Letters moved so far: those the job's actions recorded (every hundred letters, as it runs).
    pub moved: i64,
    /// The letters that could not be moved, each with its reason.
    pub failed: Vec<String>,
    /// `running` or `done`.
    pub state: String,
    pub finished_at: Option<DateTime<Utc>>,
}

/// A job's columns, with its progress counted from the actions it recorded.
const SELECT: &str = "SELECT id, j.pipeline, j.action, requested_by, requested_at, j.letters, total, \
    (SELECT coalesce(sum(a.messages), 0) FROM conveyor_ledger_action a WHERE a.job_id = j.id)::bigint AS moved, \
    failed, state, finished_at FROM conveyor_ledger_job j";

fn job(row: &Row) -> Job {
    let Json(letters): Json<Vec<JobLetter>> = row.get("letters");
    let Json(failed): Json<Vec<String>> = row.get("failed");
    Job {
        id: row.get("id"),
        pipeline: row.get("pipeline"),
        action: row.get("action"),
        requested_by: row.get("requested_by"),
        requested_at: row.get("requested_at"),
        letters,
        total: row.get("total"),
        moved: row.get("moved"),
        failed,
        state: row.get("state"),
        finished_at: row.get("finished_at"),
    }
}

/// Records a new job of `kind` on `letters`, asked for by `who`; returns its id.
pub async fn create(
    database: &Database,
    pipeline: &str,
    kind: ActionKind,
    who: &str,
    letters: &[JobLetter],
) -> Result<i64, DatabaseError> {
    let client = database.client().await?;
    let row = client
        .query_one(
            "INSERT INTO conveyor_ledger_job (pipeline, action, requested_by, letters, total) \
             VALUES ($1, $2, $3, $4, $5) RETURNING id",
            &[
                &pipeline,
                &kind.as_str(),
                &who,
                &Json(letters),
                &(letters.len() as i64),
            ],
        )
        .await
        .map_err(failed("recording a job"))?;
    Ok(row.get(0))
}

/// A job, if there is one with this id.
pub async fn get(database: &Database, id: i64) -> Result<Option<Job>, DatabaseError> {
    let client = database.client().await?;
    let row = client
        .query_opt(&format!("{SELECT} WHERE id = $1"), &[&id])
        .await
        .map_err(failed("reading a job"))?;
    Ok(row.as_ref().map(job))
}

/// The latest jobs, newest first, without their letters.
pub async fn recent(database: &Database, limit: i64) -> Result<Vec<Job>, DatabaseError> {
    let client = database.client().await?;
    let rows = client
        .query(
            &format!("{SELECT} ORDER BY id DESC LIMIT $1")
                .replace("j.letters", "'[]'::jsonb AS letters"),
            &[&limit],
        )
        .await
        .map_err(failed("listing jobs"))?;
    Ok(rows.iter().map(job).collect())
}

/// The ids of jobs still running (or left running by a runner that stopped).
pub async fn running(database: &Database) -> Result<Vec<i64>, DatabaseError> {
    let client = database.client().await?;
    let rows = client
        .query(
            "SELECT id FROM conveyor_ledger_job WHERE state = 'running' ORDER BY id",
            &[],
        )
        .await
        .map_err(failed("listing running jobs"))?;
    Ok(rows.iter().map(|row| row.get(0)).collect())
}

/// Keeps the letters a job could not move; `done` ends it.
pub async fn progress(
    database: &Database,
    id: i64,
    failures: &[String],
    done: bool,
) -> Result<(), DatabaseError> {
    let client = database.client().await?;
    client
        .execute(
            "UPDATE conveyor_ledger_job SET failed = $2, \
             state = CASE WHEN $3 THEN 'done' ELSE state END, \
             finished_at = CASE WHEN $3 THEN now() ELSE finished_at END WHERE id = $1",
            &[&id, &Json(failures), &done],
        )
        .await
        .map_err(failed("recording a job's progress"))?;
    Ok(())
}
