//! The fetchers' shared, durable state in PostgreSQL: the sync watermark, the windows handed out and not
//! yet finished, and how far a pass over a window got (the call budget is in [`crate::budget`]).
//!
//! The watermark moves only when windows finish, and only up to the start of the oldest unfinished one:
//! a crash at any moment may repeat a window, never skip one.

use std::collections::HashSet;
use std::time::Duration;

use chrono::{DateTime, FixedOffset, SubsecRound, Utc};
use conveyor_base::source::Window;
use conveyor_base::tls::error_chain;
use conveyor_base::waiting;
use conveyor_postgres::failed as sql;
use conveyor_postgres::{Database, DatabaseError};

const HISTORY_TABLE: &str = "conveyor_state_migrations";

/// A failed statement said as text with its causes (a database error's own message is only "db
/// error"), for the budget's and the login's errors.
pub(crate) fn failed(action: &'static str) -> impl FnOnce(tokio_postgres::Error) -> String {
    move |err| error_chain(&sql(action)(err))
}

/// Takes the pipeline's window lock until the end of `transaction`. Plans and splits hold it while
/// they publish windows, before they commit them; a fetcher may finish such a window meanwhile, and
/// finishing takes the lock too, so that it waits for the window's row to be committed before
/// deleting it.
async fn lock_windows(
    transaction: &tokio_postgres::Transaction<'_>,
    pipeline: &str,
) -> Result<(), DatabaseError> {
    // Another fetcher plans or splits meanwhile (or one hangs holding it).
    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&pipeline];
    let lock = transaction.execute(
        "SELECT pg_advisory_xact_lock(hashtext('conveyor-plan:' || $1))",
        &params,
    );
    waiting::reported("the window lock", waiting::REPORT_EVERY, lock)
        .await
        .map_err(sql("taking the window lock"))?;
    Ok(())
}

/// How far a pass over a window got: every record of its pages up to `pages_confirmed` is confirmed,
/// and the window held `count` rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    pub pages_confirmed: u64,
    pub count: u64,
}

async fn forget_progress(
    transaction: &tokio_postgres::Transaction<'_>,
    pipeline: &str,
    window: &Window,
) -> Result<(), DatabaseError> {
    for table in ["conveyor_sync_progress", "conveyor_sync_seen"] {
        transaction
            .execute(
                &format!(
                    "DELETE FROM {table} WHERE pipeline = $1 AND window_start = $2 AND window_end = $3"
                ),
                &[&pipeline, &window.start, &window.end],
            )
            .await
            .map_err(sql("forgetting how far a pass got"))?;
    }
    Ok(())
}

/// What a plan handed out.
#[derive(Debug, Default)]
pub struct Plan {
    /// New windows, and old ones handed out again because nobody finished them in time.
    pub windows: Vec<Window>,
}

/// One pipeline's sync state.
#[derive(Clone)]
pub struct SyncStore {
    database: Database,
    pipeline: String,
}

impl SyncStore {
    /// Connects and creates the state tables if needed.
    pub async fn open(database: Database, pipeline: &str) -> Result<Self, DatabaseError> {
        let migrations = [
            (
                "V1__sync_state",
                include_str!("../migrations/V1__sync_state.sql"),
            ),
            (
                "V2__rate_budget_unlogged",
                include_str!("../migrations/V2__rate_budget_unlogged.sql"),
            ),
            (
                "V3__sync_progress",
                include_str!("../migrations/V3__sync_progress.sql"),
            ),
            (
                "V4__adaptive_rate",
                include_str!("../migrations/V4__adaptive_rate.sql"),
            ),
            (
                "V5__source_session",
                include_str!("../migrations/V5__source_session.sql"),
            ),
        ]
        .map(|(name, sql)| {
            refinery::Migration::unapplied(name, sql)
                .expect("the embedded migrations are named like migrations")
        });
        database
            .migrate("of the sync state", &migrations, HISTORY_TABLE)
            .await?;
        Ok(Self {
            database,
            pipeline: pipeline.to_owned(),
        })
    }

    /// Hands out the windows from where the last plan ended (less `overlap`) up to now less `lag`, cut
    /// into `width` with the last `overlap` apart (see [`crate::window::cover_with_tail`]), plus pending
    /// windows published longer than `republish_after` ago. The first plan starts at `start`.
    /// `publish` must make every window durable in the broker before it returns: the plan commits only
    /// then.
    pub async fn plan<F, Fut>(
        &self,
        start: DateTime<FixedOffset>,
        width: Duration,
        lag: Duration,
        overlap: Duration,
        republish_after: Duration,
        publish: F,
    ) -> Result<Plan, anyhow::Error>
    where
        F: FnOnce(Vec<Window>) -> Fut,
        Fut: std::future::Future<Output = anyhow::Result<()>>,
    {
        let mut client = self.database.client().await?;
        let transaction = client.transaction().await.map_err(sql("starting a plan"))?;
        lock_windows(&transaction, &self.pipeline).await?;
        let now: DateTime<Utc> = transaction
            .query_one("SELECT clock_timestamp()", &[])
            .await
            .map_err(sql("reading the clock"))?
            .get(0);
        let planned: Option<DateTime<Utc>> = transaction
            .query_opt(
                "SELECT planned_until FROM conveyor_sync_state WHERE pipeline = $1 FOR UPDATE",
                &[&self.pipeline],
            )
            .await
            .map_err(sql("reading the sync state"))?
            .map(|row| row.get(0));
        // Windows travel as epoch milliseconds: keep their bounds whole milliseconds, so that a window
        // read back from a work item matches its row here.
        let from = match planned {
            Some(until) => until - overlap,
            None => start.with_timezone(&Utc),
        }
        .trunc_subsecs(3);
        let to = (now - lag).trunc_subsecs(3);
        // The last `overlap` is where rows may still appear late: in windows of its own.
        let fresh = crate::window::cover_with_tail(from, to, width, overlap);
        for window in &fresh {
            transaction
                .execute(
                    "INSERT INTO conveyor_sync_windows (pipeline, window_start, window_end, published_at) \
                     VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
                    &[&self.pipeline, &window.start, &window.end, &now],
                )
                .await
                .map_err(sql("recording a window"))?;
        }
        let stale = transaction
            .query(
                "UPDATE conveyor_sync_windows SET published_at = $2 \
                 WHERE pipeline = $1 AND published_at < $3 RETURNING window_start, window_end",
                &[&self.pipeline, &now, &(now - republish_after)],
            )
            .await
            .map_err(sql("finding windows nobody finished"))?;
        let planned_until = planned.map_or(to, |until| until.max(to));
        let initial_watermark = planned.unwrap_or(from);
        transaction
            .execute(
                "INSERT INTO conveyor_sync_state (pipeline, planned_until, watermark) VALUES ($1, $2, $3) \
                 ON CONFLICT (pipeline) DO UPDATE SET planned_until = EXCLUDED.planned_until, updated_at = now()",
                &[&self.pipeline, &planned_until, &initial_watermark],
            )
            .await
            .map_err(sql("recording the plan"))?;
        let mut windows = fresh;
        windows.extend(stale.iter().map(|row| Window {
            start: row.get(0),
            end: row.get(1),
        }));
        if !windows.is_empty() {
            publish(windows.clone()).await?;
        }
        transaction
            .commit()
            .await
            .map_err(sql("committing the plan"))?;
        Ok(Plan { windows })
    }

    /// Takes the window lock for `transaction`, then deletes `window`'s row (`action` names it in errors).
    async fn remove_window(
        &self,
        transaction: &tokio_postgres::Transaction<'_>,
        window: &Window,
        action: &'static str,
    ) -> Result<(), DatabaseError> {
        lock_windows(transaction, &self.pipeline).await?;
        transaction
            .execute(
                "DELETE FROM conveyor_sync_windows WHERE pipeline = $1 AND window_start = $2 AND window_end = $3",
                &[&self.pipeline, &window.start, &window.end],
            )
            .await
            .map_err(sql(action))?;
        forget_progress(transaction, &self.pipeline, window).await
    }

    /// Records that every record of `window`'s pages up to `pages_confirmed` is confirmed, with the
    /// window's `count` and the ids those pages added. Nothing is recorded for a window no longer
    /// pending (finished meanwhile by a fetcher it was handed out to again).
    pub async fn record_progress(
        &self,
        window: &Window,
        progress: &Progress,
        new_ids: &[String],
    ) -> Result<(), DatabaseError> {
        let client = self.database.client().await?;
        // One statement, so one round trip: the ids and the progress, or neither.
        let record = client
            .prepare_cached(
                "WITH pending AS (SELECT 1 FROM conveyor_sync_windows \
                   WHERE pipeline = $1 AND window_start = $2 AND window_end = $3), \
                 seen AS (INSERT INTO conveyor_sync_seen (pipeline, window_start, window_end, last_page, ids) \
                   SELECT $1, $2, $3, $4, $6 FROM pending ON CONFLICT DO NOTHING) \
                 INSERT INTO conveyor_sync_progress (pipeline, window_start, window_end, pages_confirmed, row_count) \
                 SELECT $1, $2, $3, $4, $5 FROM pending \
                 ON CONFLICT (pipeline, window_start, window_end) DO UPDATE \
                   SET pages_confirmed = EXCLUDED.pages_confirmed, row_count = EXCLUDED.row_count, updated_at = now()",
            )
            .await
            .map_err(sql("preparing to record progress"))?;
        let (pages, count) = (progress.pages_confirmed as i64, progress.count as i64);
        client
            .execute(
                &record,
                &[
                    &self.pipeline,
                    &window.start,
                    &window.end,
                    &pages,
                    &count,
                    &new_ids,
                ],
            )
            .await
            .map_err(sql("recording how far a pass got"))?;
        Ok(())
    }

    /// How far the last pass over `window` got, with the ids it published.
    pub async fn progress(
        &self,
        window: &Window,
    ) -> Result<Option<(Progress, HashSet<String>)>, DatabaseError> {
        let client = self.database.client().await?;
        let Some(row) = client
            .query_opt(
                "SELECT pages_confirmed, row_count FROM conveyor_sync_progress \
                 WHERE pipeline = $1 AND window_start = $2 AND window_end = $3",
                &[&self.pipeline, &window.start, &window.end],
            )
            .await
            .map_err(sql("reading how far a pass got"))?
        else {
            return Ok(None);
        };
        let progress = Progress {
            pages_confirmed: row.get::<_, i64>(0).max(0) as u64,
            count: row.get::<_, i64>(1).max(0) as u64,
        };
        let ids = client
            .query(
                "SELECT unnest(ids) FROM conveyor_sync_seen \
                 WHERE pipeline = $1 AND window_start = $2 AND window_end = $3",
                &[&self.pipeline, &window.start, &window.end],
            )
            .await
            .map_err(sql("reading the ids a pass published"))?
            .iter()
            .map(|row| row.get(0))
            .collect();
        Ok(Some((progress, ids)))
    }

    /// Forgets how far passes over `window` got: the next pass starts from its first page.
    pub async fn forget_progress(&self, window: &Window) -> Result<(), DatabaseError> {
        let mut client = self.database.client().await?;
        let transaction = client
            .transaction()
            .await
            .map_err(sql("starting to forget progress"))?;
        forget_progress(&transaction, &self.pipeline, window).await?;
        transaction
            .commit()
            .await
            .map_err(sql("committing forgotten progress"))
    }

    /// Records a window as finished (every record of it confirmed by the broker) and moves the
    /// watermark up to the oldest unfinished window. Returns the watermark.
    pub async fn finish(&self, window: &Window) -> Result<Option<DateTime<Utc>>, DatabaseError> {
        let mut client = self.database.client().await?;
        let transaction = client
            .transaction()
            .await
            .map_err(sql("starting to finish a window"))?;
        self.remove_window(&transaction, window, "finishing a window")
            .await?;
        let watermark = transaction
            .query_opt(
                "UPDATE conveyor_sync_state SET updated_at = now(), watermark = GREATEST(watermark, \
                   COALESCE((SELECT min(window_start) FROM conveyor_sync_windows WHERE pipeline = $1), planned_until)) \
                 WHERE pipeline = $1 RETURNING watermark",
                &[&self.pipeline],
            )
            .await
            .map_err(sql("moving the watermark"))?
            .map(|row| row.get(0));
        transaction
            .commit()
            .await
            .map_err(sql("committing a finished window"))?;
        Ok(watermark)
    }

    /// Replaces a window by its two halves; `publish` must make them durable before the change commits.
    pub async fn split<F, Fut>(
        &self,
        window: &Window,
        publish: F,
    ) -> Result<[Window; 2], anyhow::Error>
    where
        F: FnOnce([Window; 2]) -> Fut,
        Fut: std::future::Future<Output = anyhow::Result<()>>,
    {
        let halves = crate::window::halves(window);
        let mut client = self.database.client().await?;
        let transaction = client
            .transaction()
            .await
            .map_err(sql("starting a split"))?;
        self.remove_window(&transaction, window, "removing a split window")
            .await?;
        self.record_pending(&transaction, &halves, "recording a half window")
            .await?;
        publish(halves).await?;
        transaction
            .commit()
            .await
            .map_err(sql("committing a split"))?;
        Ok(halves)
    }

    /// Hands out `windows` again, whatever was synced before (a re-sync): recorded as pending and
    /// published as work items (`publish` must make them durable) in one commit. The watermark does not
    /// move back: it only ever rises.
    pub async fn resync<F, Fut>(&self, windows: &[Window], publish: F) -> Result<(), anyhow::Error>
    where
        F: FnOnce(Vec<Window>) -> Fut,
        Fut: std::future::Future<Output = anyhow::Result<()>>,
    {
        let mut client = self.database.client().await?;
        let transaction = client
            .transaction()
            .await
            .map_err(sql("starting a re-sync"))?;
        lock_windows(&transaction, &self.pipeline).await?;
        // Windows travel as epoch milliseconds: a finer bound would never match its row here.
        let windows: Vec<Window> = windows
            .iter()
            .map(|window| Window {
                start: window.start.trunc_subsecs(3),
                end: window.end.trunc_subsecs(3),
            })
            .collect();
        self.record_pending(&transaction, &windows, "recording a window to re-sync")
            .await?;
        publish(windows).await?;
        transaction
            .commit()
            .await
            .map_err(sql("committing a re-sync"))?;
        Ok(())
    }

    /// Records `windows` as handed out now (those already pending stay as they are).
    async fn record_pending(
        &self,
        transaction: &tokio_postgres::Transaction<'_>,
        windows: &[Window],
        action: &'static str,
    ) -> Result<(), DatabaseError> {
        for window in windows {
            transaction
                .execute(
                    "INSERT INTO conveyor_sync_windows (pipeline, window_start, window_end, published_at) \
                     VALUES ($1, $2, $3, now()) ON CONFLICT DO NOTHING",
                    &[&self.pipeline, &window.start, &window.end],
                )
                .await
                .map_err(sql(action))?;
        }
        Ok(())
    }

    /// Windows handed out and not finished, oldest first.
    pub async fn pending(&self) -> Result<Vec<Window>, DatabaseError> {
        let client = self.database.client().await?;
        let rows = client
            .query(
                "SELECT window_start, window_end FROM conveyor_sync_windows WHERE pipeline = $1 \
                 ORDER BY window_start, window_end",
                &[&self.pipeline],
            )
            .await
            .map_err(sql("reading pending windows"))?;
        Ok(rows
            .iter()
            .map(|row| Window {
                start: row.get(0),
                end: row.get(1),
            })
            .collect())
    }

    /// The watermark, if the pipeline ever synced.
    pub async fn watermark(&self) -> Result<Option<DateTime<Utc>>, DatabaseError> {
        let client = self.database.client().await?;
        Ok(client
            .query_opt(
                "SELECT watermark FROM conveyor_sync_state WHERE pipeline = $1",
                &[&self.pipeline],
            )
            .await
            .map_err(sql("reading the watermark"))?
            .map(|row| row.get(0)))
    }
}
