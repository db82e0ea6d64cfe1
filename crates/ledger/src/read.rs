//! Reading the ledger back: a pipeline's books per stage, the messages sent and not yet settled, and
//! the record ids of given messages. `conveyor_ops::status` adds up what these return.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use conveyor_postgres::failed as sql;
use conveyor_postgres::{Database, DatabaseError};
use serde::Serialize;

/// The span of settlements (and sends) to add up; `None` ends are open.
#[derive(Debug, Clone, Copy, Default)]
pub struct Span {
    pub since: Option<DateTime<Utc>>,
    pub until: Option<DateTime<Utc>>,
}

/// What one stage settled and was sent, in its own units.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct StageBooks {
    /// Messages and records sent into the stage's queue, by who sent them (`fetch`, `transform`,
    /// `replay`).
    pub sent: BTreeMap<String, Count>,
    /// Messages the stage settled that no one recorded sending: a sender that died between its
    /// publish and its record (the stage took them: they are accounted for).
    pub unrecorded_sends: Count,
    /// Messages settled (not malformed) and their records.
    pub settled: Count,
    pub passed_on: u64,
    pub filtered: u64,
    pub written: u64,
    pub stale: u64,
    /// Records dead-lettered, by class.
    pub dead_lettered: BTreeMap<String, u64>,
    /// Messages refused as unreadable.
    pub malformed_messages: u64,
}

/// A number of messages and of the records in them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Count {
    pub messages: u64,
    pub records: u64,
}

impl Count {
    fn add(&mut self, messages: i64, records: i64) {
        self.messages += messages.max(0) as u64;
        self.records += records.max(0) as u64;
    }
}

/// A message sent into a stage's queue and not settled there (yet).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Open {
    pub stage: String,
    pub message_id: String,
    pub sent_by: String,
    pub parent_id: String,
    pub sent_at: DateTime<Utc>,
    pub records: u64,
}

/// What operators did to a stage's dead letters.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ActionBooks {
    pub replayed: Count,
    pub purged: Count,
}

/// A pipeline's books.
#[derive(Debug, Clone, Default)]
pub struct Books {
    pub stages: BTreeMap<String, StageBooks>,
    pub actions: BTreeMap<String, ActionBooks>,
    /// Every message sent and not settled, oldest first (whatever the span).
    pub open: Vec<Open>,
}

/// Reads the books of `pipeline` over `span`.
pub async fn books(
    database: &Database,
    pipeline: &str,
    span: Span,
) -> Result<Books, DatabaseError> {
    let client = database.client().await?;
    let mut books = Books::default();
    let window = |column: &str| {
        format!(
            "($2::timestamptz IS NULL OR {column} >= $2) AND ($3::timestamptz IS NULL OR {column} < $3)"
        )
    };
    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 3] =
        [&pipeline, &span.since, &span.until];

    let settled = client
        .query(
            &format!(
                "SELECT stage, outcome, dead_class, count(*), sum(records_in)::bigint, sum(passed_on)::bigint, \
                 sum(filtered)::bigint, sum(written)::bigint, sum(stale)::bigint, sum(dead_lettered)::bigint \
                 FROM conveyor_ledger_settled WHERE pipeline = $1 AND {} GROUP BY 1, 2, 3",
                window("settled_at")
            ),
            &params,
        )
        .await
        .map_err(sql("reading the ledger's settlements"))?;
    for row in settled {
        let stage = books.stages.entry(row.get(0)).or_default();
        let outcome: &str = row.get(1);
        let count = |i: usize| row.get::<_, i64>(i).max(0) as u64;
        if outcome == "malformed" {
            stage.malformed_messages += count(3);
            continue;
        }
        stage.settled.add(row.get(3), row.get(4));
        stage.passed_on += count(5);
        stage.filtered += count(6);
        stage.written += count(7);
        stage.stale += count(8);
        let dead = count(9);
        if dead > 0 {
            let class: Option<String> = row.get(2);
            *stage
                .dead_lettered
                .entry(class.unwrap_or_else(|| "unknown".into()))
                .or_default() += dead;
        }
    }

    let sent = client
        .query(
            &format!(
                "SELECT stage, sent_by, count(*), sum(records)::bigint FROM conveyor_ledger_sent \
                 WHERE pipeline = $1 AND {} GROUP BY 1, 2",
                window("sent_at")
            ),
            &params,
        )
        .await
        .map_err(sql("reading the ledger's sent messages"))?;
    for row in sent {
        let stage = books.stages.entry(row.get(0)).or_default();
        stage
            .sent
            .entry(row.get(1))
            .or_default()
            .add(row.get(2), row.get(3));
    }

    let unrecorded = client
        .query(
            &format!(
                "SELECT t.stage, count(*), sum(t.records_in)::bigint FROM conveyor_ledger_settled t \
                 WHERE t.pipeline = $1 AND t.stage <> 'fetch' AND t.outcome <> 'malformed' AND {} \
                 AND NOT EXISTS (SELECT 1 FROM conveyor_ledger_sent s WHERE s.pipeline = t.pipeline \
                 AND s.stage = t.stage AND s.message_id = t.message_id) GROUP BY 1",
                window("t.settled_at")
            ),
            &params,
        )
        .await
        .map_err(sql("reading the ledger's unrecorded sends"))?;
    for row in unrecorded {
        let stage = books.stages.entry(row.get(0)).or_default();
        stage.unrecorded_sends.add(row.get(1), row.get(2));
    }

    let actions = client
        .query(
            &format!(
                "SELECT stage, action, sum(messages)::bigint, sum(records)::bigint FROM conveyor_ledger_action \
                 WHERE pipeline = $1 AND {} GROUP BY 1, 2",
                window("at")
            ),
            &params,
        )
        .await
        .map_err(sql("reading the ledger's operator actions"))?;
    for row in actions {
        let stage = books.actions.entry(row.get(0)).or_default();
        let action: &str = row.get(1);
        let count = match action {
            "replay" => &mut stage.replayed,
            _ => &mut stage.purged,
        };
        count.add(row.get(2), row.get(3));
    }

    books.open = client
        .query(
            "SELECT s.stage, s.message_id, s.sent_by, s.parent_id, s.sent_at, s.records FROM conveyor_ledger_sent s \
             WHERE s.pipeline = $1 AND NOT EXISTS (SELECT 1 FROM conveyor_ledger_settled t WHERE t.pipeline = s.pipeline \
             AND t.stage = s.stage AND t.message_id = s.message_id) ORDER BY s.sent_at, s.message_id",
            &[&pipeline],
        )
        .await
        .map_err(sql("reading the ledger's open messages"))?
        .into_iter()
        .map(|row| Open {
            stage: row.get(0),
            message_id: row.get(1),
            sent_by: row.get(2),
            parent_id: row.get(3),
            sent_at: row.get(4),
            records: row.get::<_, i64>(5).max(0) as u64,
        })
        .collect();
    Ok(books)
}

/// The record ids of messages sent into `stage`, by message id.
pub async fn record_ids(
    database: &Database,
    pipeline: &str,
    stage: &str,
    message_ids: &[String],
) -> Result<BTreeMap<String, Vec<String>>, DatabaseError> {
    let client = database.client().await?;
    let rows = client
        .query(
            "SELECT message_id, record_ids FROM conveyor_ledger_sent WHERE pipeline = $1 AND stage = $2 AND message_id = ANY($3)",
            &[&pipeline, &stage, &message_ids],
        )
        .await
        .map_err(sql("reading the record ids of open messages"))?;
    Ok(rows
        .into_iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect())
}

/// Distinct record ids by what became of them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DistinctIds {
    /// Sent on by the fetchers.
    pub fetched: u64,
    /// In messages the write stage settled, and not dead-lettered from them.
    pub written: u64,
    /// Dead-lettered at any stage and not written since.
    pub dead_lettered: u64,
    /// Skipped whole by the rules.
    pub filtered: u64,
}

/// Counts the distinct record ids of `pipeline` by what became of them.
pub async fn distinct_ids(
    database: &Database,
    pipeline: &str,
) -> Result<DistinctIds, DatabaseError> {
    let client = database.client().await?;
    let row = client
        .query_one(
            "WITH written AS (SELECT DISTINCT id FROM conveyor_ledger_sent s \
               JOIN conveyor_ledger_settled t USING (pipeline, stage, message_id) \
               CROSS JOIN LATERAL unnest(s.record_ids) AS id \
               WHERE s.pipeline = $1 AND s.stage = 'write' AND t.outcome = 'done' AND id <> ALL (t.dead_ids)), \
             dead AS (SELECT DISTINCT id FROM conveyor_ledger_settled CROSS JOIN LATERAL unnest(dead_ids) AS id \
               WHERE pipeline = $1 EXCEPT SELECT id FROM written) \
             SELECT (SELECT count(DISTINCT id) FROM conveyor_ledger_sent CROSS JOIN LATERAL unnest(record_ids) AS id \
                     WHERE pipeline = $1 AND stage = 'transform' AND sent_by = 'fetch'), \
                    (SELECT count(*) FROM written), (SELECT count(*) FROM dead), \
                    (SELECT count(DISTINCT id) FROM conveyor_ledger_settled CROSS JOIN LATERAL unnest(filtered_ids) AS id \
                     WHERE pipeline = $1)",
            &[&pipeline],
        )
        .await
        .map_err(sql("counting the ledger's record ids"))?;
    let count = |i: usize| row.get::<_, i64>(i).max(0) as u64;
    Ok(DistinctIds {
        fetched: count(0),
        written: count(1),
        dead_lettered: count(2),
        filtered: count(3),
    })
}

/// Whether the ledger holds anything of `pipeline`.
pub async fn knows(database: &Database, pipeline: &str) -> Result<bool, DatabaseError> {
    let client = database.client().await?;
    let row = client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM conveyor_ledger_settled WHERE pipeline = $1) \
             OR EXISTS (SELECT 1 FROM conveyor_ledger_sent WHERE pipeline = $1)",
            &[&pipeline],
        )
        .await
        .map_err(sql("looking the pipeline up in the ledger"))?;
    Ok(row.get(0))
}

/// Records settled per stage over the last `seconds`, per second.
pub async fn rates(
    database: &Database,
    pipeline: &str,
    seconds: u32,
) -> Result<BTreeMap<String, f64>, DatabaseError> {
    let client = database.client().await?;
    let rows = client
        .query(
            "SELECT stage, coalesce(sum(records_in), 0)::bigint FROM conveyor_ledger_settled \
             WHERE pipeline = $1 AND settled_at > now() - make_interval(secs => $2) GROUP BY stage",
            &[&pipeline, &f64::from(seconds)],
        )
        .await
        .map_err(sql("reading the stages' rates"))?;
    Ok(rows
        .iter()
        .map(|row| {
            let records: i64 = row.get(1);
            (row.get(0), records as f64 / f64::from(seconds.max(1)))
        })
        .collect())
}

/// One step of a record's way through a pipeline.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Step {
    pub stage: String,
    pub message_id: String,
    /// Who sent the message into the stage (`fetch`, `transform`, `replay`).
    pub sent_by: String,
    pub parent_id: String,
    pub sent_at: DateTime<Utc>,
    /// `done`, `dead_lettered`, `malformed`, or `None` while in flight.
    pub outcome: Option<String>,
    pub settled_at: Option<DateTime<Utc>>,
    /// Whether the record itself was filtered, or dead-lettered, when the message settled.
    pub filtered: bool,
    pub dead_lettered: bool,
}

/// Every message of `pipeline` that carried `record_id` into a stage, oldest first, with what the
/// stage settled for it. (Read by scanning the sends kept: a record's way is looked up rarely.)
pub async fn lineage(
    database: &Database,
    pipeline: &str,
    record_id: &str,
) -> Result<Vec<Step>, DatabaseError> {
    let client = database.client().await?;
    let rows = client
        .query(
            "SELECT s.stage, s.message_id, s.sent_by, s.parent_id, s.sent_at, t.outcome, t.settled_at, \
             coalesce(t.filtered_ids @> ARRAY[$2::text], false), coalesce(t.dead_ids @> ARRAY[$2::text], false) \
             FROM conveyor_ledger_sent s LEFT JOIN conveyor_ledger_settled t \
             ON t.pipeline = s.pipeline AND t.stage = s.stage AND t.message_id = s.message_id \
             WHERE s.pipeline = $1 AND s.record_ids @> ARRAY[$2::text] ORDER BY s.sent_at, s.stage LIMIT 1000",
            &[&pipeline, &record_id],
        )
        .await
        .map_err(sql("reading a record's way"))?;
    Ok(rows
        .iter()
        .map(|row| Step {
            stage: row.get(0),
            message_id: row.get(1),
            sent_by: row.get(2),
            parent_id: row.get(3),
            sent_at: row.get(4),
            outcome: row.get(5),
            settled_at: row.get(6),
            filtered: row.get(7),
            dead_lettered: row.get(8),
        })
        .collect())
}
