//! The fetcher: syncs records from the source by modify-time windows and publishes them to the pipeline's
//! transform queue, the rows of consecutive pages of a window gathered into one message
//! (`source.records_per_message`).
//!
//! Windows are work items on the pipeline's fetch queue, so any number of fetcher processes share them;
//! the call budget is shared through PostgreSQL, so it holds in total. A window is finished — and the
//! watermark may pass it — only after every page of it is confirmed by the broker.
//!
//! Rows that move while a window is paged would shift the pages and silently skip a row ("漏单"), so a
//! pass over a window counts only if it saw a steady window:
//! - every page reports the `count` of the first (a row that left or entered changes it), and
//! - no row comes twice (a row modified within the window and listed again further on, while the
//!   `count` stays the same);
//!
//! otherwise the window is paged again from the start. One case shows in neither: a row leaving while
//! another enters between the same two pages. Rows enter a window already planned only when they
//! become visible late, which the sync allows for up to `lag_secs + overlap_secs` after their modify
//! time; so a window of several pages that ends within that span of now is paged until two passes in
//! a row return the same ids. Older windows cannot gain rows, and one pass of them is enough; each plan
//! puts its last `overlap_secs` in windows of their own, so that only they may need the second pass.

pub mod state;
pub mod window;

use std::collections::{HashSet, VecDeque};
use std::marker::PhantomData;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use conveyor_amqp::consume::{self, Handler};
use conveyor_amqp::dead_letters::DeadLetters;
use conveyor_amqp::envelope::{Envelope, Meta};
use conveyor_amqp::{PendingConfirm, Publisher, Topology};
use conveyor_base::json::select_top_level;
use conveyor_base::metrics::Metrics;
use conveyor_base::{Disposition, ErrorClass, Failure, Record, Stage, source_time};
use conveyor_kingdee::{Gateway, GatewayError, KingdeeArgs, ListData, Page};
use conveyor_pipeline::SourceSpec;
use conveyor_postgres::{Database, PostgresArgs};
use conveyor_runtime::host::Host;
use conveyor_runtime::settings::WorkerArgs;
use conveyor_runtime::worker::{Session, WorkerRuntime};
use futures_util::StreamExt;
use serde::Serialize;
use serde_json::Value;
use serde_json::value::RawValue;
use tokio_util::sync::CancellationToken;

use crate::state::{SharedBudget, SyncStore};
use crate::window::Window;

/// Times an inconsistent page is asked for again before the window is retried later.
const PAGE_ATTEMPTS: u32 = 3;
/// Pages of one window fetched at once.
const PAGES_IN_FLIGHT: usize = 4;
/// Times a window is paged again because its rows moved, before the work item is retried later.
const WINDOW_RESTARTS: u32 = 8;
/// Messages published and not yet confirmed that one window pass may have.
const UNCONFIRMED: usize = 8;
/// A message also closes once its rows hold this many bytes of JSON, whatever
/// `source.records_per_message` says: far below the size a worker accepts, even after a mapping that
/// adds fields.
const MESSAGE_BYTES: usize = 4 * 1024 * 1024;

/// The fetcher's command line (every flag also reads an environment variable).
#[derive(Debug, clap::Parser)]
#[command(
    name = "conveyor-fetcher",
    version,
    about = "Syncs records from the source into the pipeline"
)]
pub struct Cli {
    #[command(flatten)]
    pub worker: WorkerArgs,
    #[command(flatten)]
    pub kingdee: KingdeeArgs,
    #[command(flatten)]
    pub postgres: PostgresArgs,
    /// Sync up to now (less the lag), print a summary and exit.
    #[arg(long)]
    pub once: bool,
    /// Seconds between plans of new windows when not --once.
    #[arg(long, env = "CONVEYOR_FETCH_INTERVAL_SECS", default_value_t = 60)]
    pub interval_secs: u64,
    /// Windows this process pages at once.
    #[arg(long, env = "CONVEYOR_FETCH_CONCURRENCY", default_value_t = 2)]
    pub concurrency: u16,
    /// A window handed out and not finished after this many seconds is handed out again.
    #[arg(
        long,
        env = "CONVEYOR_FETCH_REPUBLISH_AFTER_SECS",
        default_value_t = 900
    )]
    pub republish_after_secs: u64,
}

/// What a fetcher process did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SyncSummary {
    pub windows: u64,
    pub pages: u64,
    pub records: u64,
    pub dead_lettered: u64,
    pub seconds: f64,
    /// Everything modified before this instant is confirmed by the broker.
    pub watermark: Option<String>,
}

#[derive(Default)]
struct Counters {
    windows: AtomicU64,
    pages: AtomicU64,
    records: AtomicU64,
    dead_lettered: AtomicU64,
    /// Why the last window this process gave up on was dead-lettered: a `--once` sync cannot finish.
    window_given_up: std::sync::Mutex<Option<String>>,
}

/// Pages windows and publishes their records.
pub struct Fetcher {
    gateway: Arc<Gateway<SharedBudget>>,
    store: SyncStore,
    source: SourceSpec,
    publisher: Publisher,
    topology: Topology,
    dead_letters: DeadLetters,
    metrics: Metrics,
    /// The process's counts, across broker sessions.
    counters: Arc<Counters>,
    republish_after: Duration,
}

pub async fn run(cli: Cli, shutdown: CancellationToken) -> anyhow::Result<()> {
    let started = Instant::now();
    let host = Host::start(&cli.worker, Stage::Fetch, 9101, &[], &shutdown).await?;
    host.run(&shutdown, |runtime, cli: Cli, shutdown| async move {
        sync(&runtime, &cli, started, &shutdown).await
    })
    .await
}

/// Syncs one pipeline: plans its windows and pages them, through every broker session, until
/// `shutdown` (or, with `--once`, until every window is finished).
async fn sync(
    runtime: &WorkerRuntime,
    cli: &Cli,
    started: Instant,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    let source = runtime.pipeline.spec.source.clone();
    let database = Database::connect(&cli.postgres)?;
    let store = SyncStore::open(database.clone(), runtime.pipeline.name()).await?;
    let credentials = cli.kingdee.credentials()?;
    let budget = SharedBudget::new(
        database,
        KingdeeArgs::budget_key(&credentials),
        source.calls_per_minute,
    );
    // The app-token belongs to the source, not to a broker connection: one gateway serves them all.
    let gateway = Arc::new(Gateway::new(
        credentials,
        budget,
        runtime.metrics.clone(),
        runtime.pipeline.name(),
    ));
    gateway.check_tls().await?;
    let counters = Arc::new(Counters::default());
    // Windows whose pages were not all confirmed are not finished in the sync state: after a
    // reconnect they are handed out and paged again (writes are idempotent).
    runtime
        .run_sessions(shutdown, move |session| {
            let fetcher = Arc::new(Fetcher {
                gateway: gateway.clone(),
                store: store.clone(),
                source: source.clone(),
                publisher: session.publisher.clone(),
                topology: runtime.topology.clone(),
                dead_letters: session.dead_letters.clone(),
                metrics: runtime.metrics.clone(),
                counters: counters.clone(),
                republish_after: Duration::from_secs(cli.republish_after_secs),
            });
            serve(cli, runtime, session, fetcher, started, shutdown)
        })
        .await
}

/// Syncs through one broker session: consumes the fetch queue (the windows) while planning new
/// windows, or, with `--once`, until every window is finished.
async fn serve(
    cli: &Cli,
    runtime: &WorkerRuntime,
    session: Session,
    fetcher: Arc<Fetcher>,
    started: Instant,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    let settings = runtime.consume_settings(cli.concurrency.max(1));
    let consuming = shutdown.child_token();
    let consumer = consume::run(
        &session.connection,
        settings,
        fetcher.clone(),
        session.dead_letters,
        runtime.metrics.clone(),
        consuming.clone(),
    );
    let driver = async {
        let outcome = if cli.once {
            match fetcher.plan().await.context("planning the sync") {
                Ok(()) => wait_until_synced(&fetcher, shutdown).await,
                Err(err) => Err(err),
            }
        } else {
            plan_on_schedule(&fetcher, Duration::from_secs(cli.interval_secs), shutdown).await;
            Ok(())
        };
        consuming.cancel();
        outcome
    };
    tokio::pin!(consumer);
    tokio::pin!(driver);
    // The consumer returns early only on a broker failure; then the driver is abandoned.
    let (outcome, consumed) = tokio::select! {
        consumed = &mut consumer => (Ok(()), consumed),
        outcome = &mut driver => (outcome, consumer.await),
    };
    consumed?;
    outcome?;
    if cli.once {
        let summary = fetcher.summary(started).await?;
        tracing::info!(?summary, "sync finished");
        println!("{}", serde_json::to_string(&summary)?);
    }
    Ok(())
}

/// Plans new windows every `interval` until shutdown.
async fn plan_on_schedule(fetcher: &Fetcher, interval: Duration, shutdown: &CancellationToken) {
    loop {
        if let Err(err) = fetcher.plan().await {
            tracing::error!(error = %format!("{err:#}"), "planning failed; trying again at the next interval");
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(interval) => {}
        }
    }
}

/// Waits until no window of the pipeline is left unfinished (by this process or another); fails as
/// soon as this process dead-letters a window, since the sync can then only finish after a replay.
async fn wait_until_synced(fetcher: &Fetcher, shutdown: &CancellationToken) -> anyhow::Result<()> {
    loop {
        if fetcher.store.pending().await? == 0 {
            return Ok(());
        }
        if let Some(reason) = fetcher.counters.window_given_up.lock().unwrap().clone() {
            anyhow::bail!(
                "a window was dead-lettered ({reason}); the sync cannot finish until it is replayed: \
                 see `conveyorctl dlq show {} --stage fetch`",
                fetcher.pipeline()
            );
        }
        tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            () = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
    }
}

impl Fetcher {
    fn pipeline(&self) -> &str {
        self.topology.pipeline()
    }

    /// Hands out the windows that are due, as work items on the fetch queue.
    pub async fn plan(&self) -> anyhow::Result<()> {
        let source = &self.source;
        let plan = self
            .store
            .plan(
                source.start_time,
                Duration::from_secs(source.window_secs),
                Duration::from_secs(source.lag_secs),
                Duration::from_secs(source.overlap_secs),
                self.republish_after,
                |windows| self.publish_windows(windows),
            )
            .await?;
        if !plan.windows.is_empty() {
            tracing::info!(windows = plan.windows.len(), "handed out windows");
        }
        Ok(())
    }

    async fn publish_windows(&self, windows: Vec<Window>) -> anyhow::Result<()> {
        let mut confirms = Vec::with_capacity(windows.len());
        for window in windows {
            let envelope = Envelope {
                meta: Meta::new_trace(self.pipeline()),
                records: vec![window.to_record()],
            };
            let (body, properties) = envelope.to_amqp(self.topology.compression());
            confirms.push(
                self.publisher
                    .send(
                        &self.topology.exchange(),
                        &self.topology.routing_key(Stage::Fetch),
                        &body,
                        properties,
                    )
                    .await?,
            );
        }
        for confirm in confirms {
            confirm.wait().await?;
        }
        Ok(())
    }

    async fn summary(&self, started: Instant) -> anyhow::Result<SyncSummary> {
        let read = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        Ok(SyncSummary {
            windows: read(&self.counters.windows),
            pages: read(&self.counters.pages),
            records: read(&self.counters.records),
            dead_lettered: read(&self.counters.dead_lettered),
            seconds: started.elapsed().as_secs_f64(),
            watermark: self.store.watermark().await?.map(|at| at.to_rfc3339()),
        })
    }

    async fn page(&self, window: &Window, number: u64) -> Result<Page, Failure> {
        let page_size = u64::from(self.source.page_size);
        let mut query: Vec<(String, String)> = vec![
            ("page".into(), number.to_string()),
            ("page_size".into(), page_size.to_string()),
        ];
        query.extend(window.query());
        query.extend(
            self.source
                .query
                .iter()
                .map(|(key, value)| (key.clone(), value.clone())),
        );
        // A page that disagrees with its own count is asked for again; it is never taken as it is.
        let mut attempt = 0;
        let page = loop {
            let data = self
                .gateway
                .get::<ListData>(&self.source.path, &query)
                .await
                .map_err(|err| match err {
                    GatewayError::Transient(message) => {
                        Failure::new(ErrorClass::Transient, message)
                    }
                    GatewayError::Permanent(message) => {
                        Failure::new(ErrorClass::Permanent, message)
                    }
                })?;
            match Page::from_list(data, number, page_size) {
                Ok(page) => break page,
                Err(problem) if attempt < PAGE_ATTEMPTS => {
                    tracing::warn!(problem, "page inconsistent with its count; asking again");
                    attempt += 1;
                }
                Err(problem) => return Err(Failure::new(ErrorClass::Transient, problem)),
            }
        };
        self.counters.pages.fetch_add(1, Ordering::Relaxed);
        self.metrics
            .records_in
            .with_label_values(&[self.pipeline(), Stage::Fetch.as_str()])
            .inc_by(page.rows.len() as u64);
        Ok(page)
    }

    /// Adds one page's records to those `gathered` (and dead-letters its unusable rows), and publishes
    /// them once they fill a message; returns the pending confirm of what it published. The records'
    /// ids are added to the pass's `seen`.
    async fn gather_page(
        &self,
        meta: &Meta,
        rows: Vec<Box<RawValue>>,
        seen: &mut PassIds,
        gathered: &mut Vec<Record>,
    ) -> Result<Option<PendingConfirm>, Failure> {
        let (records, rejected) = to_records(&self.source, rows);
        for record in &records {
            seen.add(&record.id);
        }
        if !rejected.is_empty() {
            self.counters
                .dead_lettered
                .fetch_add(rejected.len() as u64, Ordering::Relaxed);
            self.dead_letters
                .send_records(meta, rejected)
                .await
                .map_err(transient)?;
        }
        gathered.extend(records);
        let bytes: usize = gathered.iter().map(|record| record.data.get().len()).sum();
        if gathered.len() < self.source.records_per_message as usize && bytes < MESSAGE_BYTES {
            return Ok(None);
        }
        self.publish(meta, std::mem::take(gathered)).await
    }

    /// Publishes records as one message to the transform stage; returns the pending confirm.
    async fn publish(
        &self,
        meta: &Meta,
        records: Vec<Record>,
    ) -> Result<Option<PendingConfirm>, Failure> {
        if records.is_empty() {
            return Ok(None);
        }
        let count = records.len() as u64;
        let (body, properties) = Envelope {
            meta: meta.next_stage(),
            records,
        }
        .to_amqp(self.topology.compression());
        let confirm = self
            .publisher
            .send(
                &self.topology.exchange(),
                &self.topology.routing_key(Stage::Transform),
                &body,
                properties,
            )
            .await
            .map_err(transient)?;
        self.counters.records.fetch_add(count, Ordering::Relaxed);
        self.metrics
            .records_out
            .with_label_values(&[self.pipeline(), Stage::Fetch.as_str()])
            .inc_by(count);
        Ok(Some(confirm))
    }

    /// Whether rows may still become visible in `window` late: its end is within `lag_secs +
    /// overlap_secs` of now, the span the sync allows late rows.
    fn may_gain_rows(&self, window: &Window) -> bool {
        let allowance = Duration::from_secs(
            self.source
                .lag_secs
                .saturating_add(self.source.overlap_secs),
        );
        let allowance = chrono::Duration::from_std(allowance).unwrap_or(chrono::Duration::MAX);
        window
            .end
            .checked_add_signed(allowance)
            .is_none_or(|until| chrono::Utc::now() <= until)
    }

    /// Pages through a window and publishes every page; finishes it once all are confirmed.
    async fn sync_window(&self, meta: &Meta, window: Window) -> Result<(), Failure> {
        let outcome = |name: &str| {
            self.metrics
                .sync_windows
                .with_label_values(&[self.pipeline(), name])
                .inc();
        };
        // The ids of the last steady pass, while the window needs two alike (see the module's note).
        let mut previous: Option<HashSet<String>> = None;
        for _ in 0..WINDOW_RESTARTS {
            let first = self.page(&window, 1).await?;
            if first.count > self.source.max_window_rows && window.splittable() {
                let halves = self
                    .store
                    .split(&window, |halves| self.publish_windows(halves.to_vec()))
                    .await
                    .map_err(transient)?;
                tracing::info!(
                    rows = first.count,
                    ?halves,
                    "window too large; split in two"
                );
                outcome("split");
                return Ok(());
            }
            let (count, total_page) = (first.count, first.total_page);
            let two_passes = total_page > 1 && self.may_gain_rows(&window);
            // Sized for the window's count, so that it never grows (and holds two tables) on the way.
            let mut seen = PassIds {
                ids: HashSet::with_capacity(usize::try_from(count).unwrap_or(0).min(1 << 20)),
                repeated: false,
            };
            let mut unconfirmed = Unconfirmed::default();
            let mut gathered = Vec::new();
            unconfirmed
                .add(
                    self.gather_page(meta, first.rows, &mut seen, &mut gathered)
                        .await?,
                )
                .await?;
            // The rest of the pages, a few at a time: the call budget, not this loop, sets the pace.
            let mut pages = futures_util::stream::iter(2..=total_page)
                .map(|number| self.page(&window, number))
                .buffered(PAGES_IN_FLIGHT);
            let mut moved = None;
            while let Some(page) = pages.next().await {
                let page = page?;
                if page.count != count {
                    moved = Some("the window's count changed");
                    break;
                }
                unconfirmed
                    .add(
                        self.gather_page(meta, page.rows, &mut seen, &mut gathered)
                            .await?,
                    )
                    .await?;
                if seen.repeated {
                    moved = Some("a row came twice");
                    break;
                }
            }
            drop(pages);
            // What this pass read is published even if the window is paged again: writes are idempotent.
            unconfirmed.add(self.publish(meta, gathered).await?).await?;
            unconfirmed.wait_all().await?;
            if let Some(reason) = moved {
                tracing::info!(
                    ?window,
                    reason,
                    "rows moved while paging; paging the window again"
                );
                outcome("restarted");
                previous = None;
                continue;
            }
            if two_passes && previous.as_ref() != Some(&seen.ids) {
                tracing::info!(
                    ?window,
                    "late rows may still enter the window; paging it again to compare"
                );
                outcome("verifying");
                previous = Some(seen.ids);
                continue;
            }
            let watermark = self.store.finish(&window).await.map_err(transient)?;
            if let Some(watermark) = watermark {
                self.metrics
                    .sync_watermark
                    .with_label_values(&[self.pipeline()])
                    .set(watermark.timestamp());
            }
            self.counters.windows.fetch_add(1, Ordering::Relaxed);
            outcome("done");
            return Ok(());
        }
        Err(Failure::new(
            ErrorClass::Transient,
            format!("rows kept moving while paging {window:?}; will try the window again later"),
        ))
    }
}

/// A failure worth retrying later: the broker or the sync state did not answer.
fn transient(err: impl std::fmt::Display) -> Failure {
    // `:#` prints an `anyhow::Error` with its causes.
    Failure::new(ErrorClass::Transient, format!("{err:#}"))
}

/// Messages of a window published and not yet confirmed by the broker. At most [`UNCONFIRMED`] wait
/// at once: a fetcher that pages faster than the broker takes messages waits for it, rather than
/// holding the rest of the window in memory.
#[derive(Default)]
struct Unconfirmed(VecDeque<PendingConfirm>);

impl Unconfirmed {
    async fn add(&mut self, confirm: Option<PendingConfirm>) -> Result<(), Failure> {
        self.0.extend(confirm);
        while self.0.len() > UNCONFIRMED {
            self.wait_oldest().await?;
        }
        Ok(())
    }

    async fn wait_all(mut self) -> Result<(), Failure> {
        while !self.0.is_empty() {
            self.wait_oldest().await?;
        }
        Ok(())
    }

    async fn wait_oldest(&mut self) -> Result<(), Failure> {
        match self.0.pop_front() {
            Some(confirm) => confirm.wait().await.map_err(transient),
            None => Ok(()),
        }
    }
}

/// The ids one pass over a window published, and whether one came twice.
#[derive(Debug, Default)]
struct PassIds {
    ids: HashSet<String>,
    repeated: bool,
}

impl PassIds {
    fn add(&mut self, id: &str) {
        if !self.ids.insert(id.to_owned()) {
            self.repeated = true;
        }
    }
}

impl Handler for Fetcher {
    async fn handle(&self, envelope: Envelope) -> Disposition {
        for record in &envelope.records {
            let window = match Window::from_record(record) {
                Ok(window) => window,
                Err(problem) => {
                    return Disposition::DeadLetter(Failure::new(ErrorClass::Malformed, problem));
                }
            };
            match self.sync_window(&envelope.meta, window).await {
                Ok(()) => {}
                Err(failure) if failure.class == ErrorClass::Transient => {
                    return Disposition::Retry(failure);
                }
                Err(failure) => return Disposition::DeadLetter(failure),
            }
        }
        Disposition::Done
    }

    fn dead_lettered(&self, failure: &Failure) {
        // A malformed message is not one of the windows a sync waits for; anything else is.
        if failure.class != ErrorClass::Malformed {
            *self.counters.window_given_up.lock().unwrap() = Some(failure.message.clone());
        }
    }
}

/// Turns rows into records; rows without a usable id or modify time are returned apart, with the reason.
/// Each row's JSON goes on unchanged: only its id and modify time are read.
fn to_records(
    source: &SourceSpec,
    rows: Vec<Box<RawValue>>,
) -> (Vec<Record>, Vec<(Record, Failure)>) {
    let mut records = Vec::with_capacity(rows.len());
    let mut rejected = Vec::new();
    for row in rows {
        let keys = RowKeys::read(source, &row);
        let id = match keys.id {
            Some(Value::String(text)) if !text.is_empty() => Some(text),
            Some(Value::Number(number)) => Some(number.to_string()),
            _ => None,
        };
        let modify_time = keys.modify_time.as_ref().map(source_time::parse_instant);
        let (id, problem) = match (id, modify_time) {
            (Some(id), Some(Ok(modify_time))) => {
                records.push(Record {
                    id,
                    modify_time,
                    data: row,
                });
                continue;
            }
            (None, _) => (
                None,
                format!("row has no usable id field {:?}", source.id_field),
            ),
            (id, None) => (
                id,
                format!(
                    "row has no modify time field {:?}",
                    source.modify_time_field
                ),
            ),
            (id, Some(Err(err))) => (
                id,
                format!("modify time field {:?}: {err}", source.modify_time_field),
            ),
        };
        let record = Record {
            id: id.unwrap_or_default(),
            modify_time: source_time::from_epoch_millis(0).expect("epoch is in range"),
            data: row,
        };
        rejected.push((record, Failure::new(ErrorClass::Permanent, problem)));
    }
    (records, rejected)
}

/// The id and modify time fields of a row, read without building the rest of it (a row that is not an
/// object has neither).
#[derive(Debug, Default)]
struct RowKeys {
    id: Option<Value>,
    modify_time: Option<Value>,
}

impl RowKeys {
    fn read(source: &SourceSpec, row: &RawValue) -> Self {
        let selected = select_top_level(row.get(), |key| {
            let field = match (key == source.id_field, key == source.modify_time_field) {
                (true, true) => Field::Both,
                (true, false) => Field::Id,
                (false, true) => Field::ModifyTime,
                (false, false) => return None,
            };
            Some((field, PhantomData::<Value>))
        });
        let mut keys = RowKeys::default();
        // A repeated key counts with its last value, as in a JSON tree.
        for (field, value) in selected.unwrap_or_default() {
            match field {
                Field::Id => keys.id = Some(value),
                Field::ModifyTime => keys.modify_time = Some(value),
                Field::Both => {
                    keys.modify_time = Some(value.clone());
                    keys.id = Some(value);
                }
            }
        }
        keys
    }
}

/// Which of the fields the fetcher reads a key names.
enum Field {
    Id,
    ModifyTime,
    /// A source whose id field is its modify time field.
    Both,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn source() -> SourceSpec {
        serde_json::from_value(json!({
            "kind": "kingdee",
            "path": "/jdy/v2/scm/sal_order",
            "start_time": "2025-01-01T00:00:00+08:00",
        }))
        .unwrap()
    }

    fn rows(texts: &[&str]) -> Vec<Box<RawValue>> {
        texts
            .iter()
            .map(|text| RawValue::from_string((*text).to_owned()).unwrap())
            .collect()
    }

    #[test]
    fn rows_pass_unchanged_and_unusable_ones_are_set_apart_with_the_reason() {
        let good = r#"{"material_entity":[{"id":"9","modify_time":"x"}],"id":"7", "modify_time":"2025-01-02 03:04:05","n":1.50}"#;
        let (records, rejected) = to_records(
            &source(),
            rows(&[
                good,
                r#"{"i\u0064":8,"modify_time":1735750000000}"#,
                r#"{"id":"","modify_time":"2025-01-02 03:04:05"}"#,
                r#"{"id":"10"}"#,
                r#"{"id":"11","modify_time":"soon"}"#,
                r#"[1,2]"#,
                r#"{"id":"12","id":"13","modify_time":"2025-01-02 03:04:05"}"#,
            ]),
        );
        let ids: Vec<&str> = records.iter().map(|record| record.id.as_str()).collect();
        assert_eq!(ids, ["7", "8", "13"]);
        assert_eq!(
            records[0].data.get(),
            good,
            "the row's JSON is passed on as it came"
        );
        assert_eq!(
            records[0].modify_time.to_rfc3339(),
            "2025-01-02T03:04:05+08:00"
        );
        let reasons: Vec<(&str, &str)> = rejected
            .iter()
            .map(|(record, failure)| (record.id.as_str(), failure.message.as_str()))
            .collect();
        assert_eq!(reasons.len(), 4);
        assert!(reasons[0].0.is_empty() && reasons[0].1.contains("no usable id"));
        assert!(reasons[1] == ("10", r#"row has no modify time field "modify_time""#));
        assert!(
            reasons[2].0 == "11"
                && reasons[2]
                    .1
                    .starts_with(r#"modify time field "modify_time""#)
        );
        assert!(reasons[3].1.contains("no usable id"));
        assert_eq!(rejected[3].0.data.get(), "[1,2]");
    }
}
