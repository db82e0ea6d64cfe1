//! The index of dead letters: what the console browses, so that reading letters never takes them
//! from their queue. Each stage indexes the letters it sends with the settlement that sends them
//! ([`conveyor_base::ledger::Settled::letters`]); letters found in a queue and not indexed (the
//! broker's own, or sent while the ledger was off) are indexed when found ([`index_found`]). A
//! replay or purge marks the letters it moved, in the transaction that records it.

use chrono::{DateTime, Utc};
use conveyor_base::Stage;
use conveyor_base::ledger::Letter;
use conveyor_postgres::{Database, DatabaseError};
use serde::Serialize;
use tokio_postgres::Row;
use tokio_postgres::types::ToSql;

use crate::record::{LetterRow, insert_letters};
use conveyor_postgres::failed;

/// Which letters to read. Empty fields match everything.
#[derive(Debug, Clone, Default)]
pub struct LetterQuery {
    pub pipeline: String,
    pub stage: Option<String>,
    pub class: Option<String>,
    /// Only letters that failed for exactly this reason.
    pub reason: Option<String>,
    pub record_id: Option<String>,
    /// Only letters that failed at or after this time.
    pub since: Option<DateTime<Utc>>,
    /// Only letters that failed before this time.
    pub until: Option<DateTime<Utc>>,
    /// Only letters in this state (`dead`, `replayed`, `purged`); every state if `None`.
    pub state: Option<String>,
}

impl LetterQuery {
    /// The letters of `pipeline` still in their queues.
    pub fn dead(pipeline: &str) -> Self {
        Self {
            pipeline: pipeline.to_owned(),
            state: Some("dead".to_owned()),
            ..Default::default()
        }
    }

    /// The query's condition on `conveyor_ledger_letter`, over `$1` to `$8`.
    const WHERE: &str = "pipeline = $1 \
        AND ($2::text IS NULL OR stage = $2) \
        AND ($3::text IS NULL OR class = $3) \
        AND ($4::text IS NULL OR reason = $4) \
        AND ($5::text IS NULL OR record_ids @> ARRAY[$5::text]) \
        AND ($6::timestamptz IS NULL OR failed_at >= $6) \
        AND ($7::timestamptz IS NULL OR failed_at < $7) \
        AND ($8::text IS NULL OR state = $8)";

    fn params(&self) -> [&(dyn ToSql + Sync); 8] {
        [
            &self.pipeline,
            &self.stage,
            &self.class,
            &self.reason,
            &self.record_id,
            &self.since,
            &self.until,
            &self.state,
        ]
    }
}

/// Letters that failed at one stage, for one reason.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Group {
    pub stage: String,
    pub class: String,
    pub reason: String,
    pub letters: u64,
    pub records: u64,
    pub first_failed_at: DateTime<Utc>,
    pub last_failed_at: DateTime<Utc>,
}

/// One letter in a list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LetterSummary {
    pub stage: String,
    pub message_id: String,
    pub failed_at: DateTime<Utc>,
    pub class: String,
    pub reason: String,
    pub record_ids: Vec<String>,
    pub attempts: i32,
    pub replays: i32,
    pub state: String,
}

/// Where a page of letters starts: after this letter, in the list's order (newest first).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct After {
    pub failed_at: DateTime<Utc>,
    pub message_id: String,
}

/// One letter with everything the index holds of it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LetterDetail {
    #[serde(flatten)]
    pub summary: LetterSummary,
    pub pipeline: String,
    pub parent_id: String,
    pub headers: serde_json::Value,
    pub payload: String,
    /// The whole payload's length: more than the payload kept when it was cut.
    pub payload_bytes: i64,
    pub action_id: Option<i64>,
    /// The letter whose replayed copy died again as this one, if it is one.
    pub replay_of: Option<String>,
    /// Earlier letters of the same records, oldest first.
    pub earlier: Vec<LetterSummary>,
}

const SUMMARY_COLUMNS: &str =
    "stage, message_id, failed_at, class, reason, record_ids, attempts, replays, state";

fn summary(row: &Row) -> LetterSummary {
    LetterSummary {
        stage: row.get("stage"),
        message_id: row.get("message_id"),
        failed_at: row.get("failed_at"),
        class: row.get("class"),
        reason: row.get("reason"),
        record_ids: row.get("record_ids"),
        attempts: row.get("attempts"),
        replays: row.get("replays"),
        state: row.get("state"),
    }
}

/// The matching letters grouped by stage, class and reason, the largest groups first.
pub async fn groups(database: &Database, query: &LetterQuery) -> Result<Vec<Group>, DatabaseError> {
    let client = database.client().await?;
    let statement = format!(
        "SELECT stage, class, reason, count(*) AS letters, \
         coalesce(sum(cardinality(record_ids)), 0)::bigint AS records, \
         min(failed_at) AS first_failed_at, max(failed_at) AS last_failed_at \
         FROM conveyor_ledger_letter WHERE {} \
         GROUP BY stage, class, reason ORDER BY letters DESC, stage, class, reason LIMIT 1000",
        LetterQuery::WHERE
    );
    let rows = client
        .query(&statement, &query.params())
        .await
        .map_err(failed("grouping the dead letters"))?;
    Ok(rows
        .iter()
        .map(|row| Group {
            stage: row.get("stage"),
            class: row.get("class"),
            reason: row.get("reason"),
            letters: row.get::<_, i64>("letters") as u64,
            records: row.get::<_, i64>("records") as u64,
            first_failed_at: row.get("first_failed_at"),
            last_failed_at: row.get("last_failed_at"),
        })
        .collect())
}

/// How many letters match.
pub async fn count(database: &Database, query: &LetterQuery) -> Result<u64, DatabaseError> {
    let client = database.client().await?;
    let statement = format!(
        "SELECT count(*) FROM conveyor_ledger_letter WHERE {}",
        LetterQuery::WHERE
    );
    let row = client
        .query_one(&statement, &query.params())
        .await
        .map_err(failed("counting the dead letters"))?;
    Ok(row.get::<_, i64>(0) as u64)
}

/// Up to `limit` matching letters, newest first, after `after` (keyset paging: a page far down a
/// long list costs what the first one does).
pub async fn page(
    database: &Database,
    query: &LetterQuery,
    after: Option<&After>,
    limit: u32,
) -> Result<Vec<LetterSummary>, DatabaseError> {
    let client = database.client().await?;
    let statement = format!(
        "SELECT {SUMMARY_COLUMNS} FROM conveyor_ledger_letter WHERE {} \
         AND ($9::timestamptz IS NULL OR (failed_at, message_id) < ($9, $10::text)) \
         ORDER BY failed_at DESC, message_id DESC LIMIT $11",
        LetterQuery::WHERE
    );
    let after_at = after.map(|after| after.failed_at);
    let after_id = after.map(|after| after.message_id.as_str());
    let limit = i64::from(limit);
    let mut params: Vec<&(dyn ToSql + Sync)> = query.params().to_vec();
    params.extend([&after_at as &(dyn ToSql + Sync), &after_id, &limit]);
    let rows = client
        .query(&statement, &params)
        .await
        .map_err(failed("listing the dead letters"))?;
    Ok(rows.iter().map(summary).collect())
}

/// The (stage, message id) of every matching letter, for an action on a whole selection.
pub async fn ids(
    database: &Database,
    query: &LetterQuery,
) -> Result<Vec<(String, String)>, DatabaseError> {
    let client = database.client().await?;
    let statement = format!(
        "SELECT stage, message_id FROM conveyor_ledger_letter WHERE {} ORDER BY failed_at, message_id",
        LetterQuery::WHERE
    );
    let rows = client
        .query(&statement, &query.params())
        .await
        .map_err(failed("selecting the dead letters"))?;
    Ok(rows.iter().map(|row| (row.get(0), row.get(1))).collect())
}

/// One letter, with the letter whose replay it is and the earlier letters of its records.
pub async fn letter(
    database: &Database,
    pipeline: &str,
    stage: &str,
    message_id: &str,
) -> Result<Option<LetterDetail>, DatabaseError> {
    let client = database.client().await?;
    let Some(row) = client
        .query_opt(
            &format!(
                "SELECT {SUMMARY_COLUMNS}, parent_id, headers, payload, payload_bytes, action_id, \
                 (SELECT s.parent_id FROM conveyor_ledger_sent s WHERE s.pipeline = l.pipeline \
                  AND s.stage = l.stage AND s.message_id = l.parent_id AND s.sent_by = 'replay') AS replay_of \
                 FROM conveyor_ledger_letter l WHERE pipeline = $1 AND stage = $2 AND message_id = $3"
            ),
            &[&pipeline, &stage, &message_id],
        )
        .await
        .map_err(failed("reading a dead letter"))?
    else {
        return Ok(None);
    };
    let this = summary(&row);
    let earlier = client
        .query(
            &format!(
                "SELECT {SUMMARY_COLUMNS} FROM conveyor_ledger_letter WHERE pipeline = $1 \
                 AND record_ids && $2 AND failed_at < $3 AND message_id <> $4 \
                 ORDER BY failed_at LIMIT 100"
            ),
            &[&pipeline, &this.record_ids, &this.failed_at, &message_id],
        )
        .await
        .map_err(failed("reading a dead letter's history"))?;
    Ok(Some(LetterDetail {
        pipeline: pipeline.to_owned(),
        parent_id: row.get("parent_id"),
        headers: row.get("headers"),
        payload: row.get("payload"),
        payload_bytes: row.get("payload_bytes"),
        action_id: row.get("action_id"),
        replay_of: row.get("replay_of"),
        earlier: earlier.iter().map(summary).collect(),
        summary: this,
    }))
}

/// Letters still in their queue, by stage, as the index counts them.
pub async fn dead_by_stage(
    database: &Database,
    pipeline: &str,
) -> Result<Vec<(String, u64)>, DatabaseError> {
    let client = database.client().await?;
    let rows = client
        .query(
            "SELECT stage, count(*) FROM conveyor_ledger_letter \
             WHERE pipeline = $1 AND state = 'dead' GROUP BY stage",
            &[&pipeline],
        )
        .await
        .map_err(failed("counting the dead letters"))?;
    Ok(rows
        .iter()
        .map(|row| (row.get(0), row.get::<_, i64>(1) as u64))
        .collect())
}

/// Indexes letters found in `stage`'s dead-letter queue that no stage indexed (each is its own
/// parent); already indexed ones stay as they are. Returns how many were new.
pub async fn index_found(
    database: &Database,
    pipeline: &str,
    stage: Stage,
    letters: &[Letter],
) -> Result<u64, DatabaseError> {
    if letters.is_empty() {
        return Ok(0);
    }
    let client = database.client().await?;
    let known: Vec<String> = client
        .query(
            "SELECT message_id FROM conveyor_ledger_letter \
             WHERE pipeline = $1 AND stage = $2 AND message_id = ANY($3)",
            &[
                &pipeline,
                &stage.as_str(),
                &letters
                    .iter()
                    .map(|letter| letter.message_id.as_str())
                    .collect::<Vec<_>>(),
            ],
        )
        .await
        .map_err(failed("reading the dead-letter index"))?
        .iter()
        .map(|row| row.get(0))
        .collect();
    let rows: Vec<LetterRow> = letters
        .iter()
        .filter(|letter| !letter.message_id.is_empty() && !known.contains(&letter.message_id))
        .map(|letter| LetterRow::in_stage(pipeline, stage, &letter.message_id, letter))
        .collect();
    insert_letters(&**client, &rows)
        .await
        .map_err(failed("indexing dead letters"))?;
    Ok(rows.len() as u64)
}

/// Marks letters of `stage` as moved (`replayed` or `purged`) by the action `action_id`.
pub(crate) async fn mark(
    client: &impl tokio_postgres::GenericClient,
    pipeline: &str,
    stage: Stage,
    message_ids: &[&str],
    state: &str,
    action_id: i64,
) -> Result<(), tokio_postgres::Error> {
    client
        .execute(
            "UPDATE conveyor_ledger_letter SET state = $4, action_id = $5 \
             WHERE pipeline = $1 AND stage = $2 AND message_id = ANY($3)",
            &[&pipeline, &stage.as_str(), &message_ids, &state, &action_id],
        )
        .await
        .map(drop)
}
