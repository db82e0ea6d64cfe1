//! Keeping the ledger bounded: rows older than the retention time are deleted in batches, by one
//! process of the schema at a time, every hour.

use std::time::Duration;

use conveyor_postgres::Database;

/// How often a process looks for rows to prune.
const EVERY: Duration = Duration::from_secs(3600);
/// Rows deleted per statement: short statements, so that pruning never holds locks for long.
const BATCH: i64 = 10_000;

/// The pruning task of a process, stopped when dropped.
pub(crate) struct Pruning(tokio::task::JoinHandle<()>);

impl Drop for Pruning {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Pruning {
    pub(crate) fn start(database: Database, retention: Duration) -> Self {
        Self(tokio::spawn(async move {
            // Not at once: a fleet starting together has better things to do first.
            tokio::time::sleep(Duration::from_secs(60)).await;
            loop {
                match prune(&database, retention).await {
                    Ok(0) => {}
                    Ok(deleted) => tracing::info!(deleted, "pruned the ledger"),
                    Err(err) => {
                        tracing::warn!(error = %err, "pruning the ledger failed; trying again in an hour")
                    }
                }
                tokio::time::sleep(EVERY).await;
            }
        }))
    }
}

/// Deletes the rows older than `retention`, `BATCH` at a time, unless another process of the schema
/// is pruning; returns how many went.
pub async fn prune(database: &Database, retention: Duration) -> Result<u64, String> {
    let client = database.client().await.map_err(|err| err.to_string())?;
    let failed = |err: tokio_postgres::Error| format!("pruning the ledger: {err}");
    let lock = format!("conveyor-ledger-prune:{}", database.schema);
    let locked: bool = client
        .query_one("SELECT pg_try_advisory_lock(hashtext($1))", &[&lock])
        .await
        .map_err(failed)?
        .get(0);
    if !locked {
        return Ok(0);
    }
    let cutoff = chrono::Utc::now()
        - chrono::Duration::from_std(retention).unwrap_or(chrono::Duration::days(30));
    let mut deleted = 0;
    let mut result = Ok(());
    // A letter still in its queue stays indexed however old it is; a job, until it is finished.
    for (table, old) in [
        ("conveyor_ledger_sent", "sent_at < $1"),
        ("conveyor_ledger_settled", "settled_at < $1"),
        ("conveyor_ledger_action", "at < $1"),
        (
            "conveyor_ledger_letter",
            "failed_at < $1 AND state <> 'dead'",
        ),
        ("conveyor_ledger_job", "finished_at < $1"),
    ] {
        let statement = format!(
            "DELETE FROM {table} WHERE ctid = ANY(ARRAY(SELECT ctid FROM {table} WHERE {old} LIMIT $2))"
        );
        loop {
            match client.execute(&statement, &[&cutoff, &BATCH]).await {
                Ok(count) => {
                    deleted += count;
                    if count < BATCH as u64 {
                        break;
                    }
                }
                Err(err) => {
                    result = Err(failed(err));
                    break;
                }
            }
        }
    }
    let _ = client
        .execute("SELECT pg_advisory_unlock(hashtext($1))", &[&lock])
        .await;
    result.map(|()| deleted)
}
