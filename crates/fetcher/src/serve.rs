//! Running the engine for one pipeline: through every broker session, consume the fetch queue (the
//! windows) while planning new ones, until shutdown or, for a `--once` sync, until every window is
//! finished.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use conveyor_amqp::consume;
use conveyor_base::Stage;
use conveyor_base::source::Source;
use conveyor_runtime::worker::{Session, WorkerRuntime};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::engine::{Counters, Engine};
use crate::settings::SyncSettings;
use crate::state::SyncStore;

/// How a fetcher process runs the sync (its command line's part).
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Sync up to now (less the lag) and return, instead of planning on schedule until shutdown.
    pub once: bool,
    /// Time between plans of new windows when not `once`.
    pub interval: Duration,
    /// Windows this process pages at once.
    pub concurrency: u16,
    /// A window handed out and not finished after this long is handed out again.
    pub republish_after: Duration,
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

/// Syncs one pipeline from `source` through every broker session until `shutdown`, or, with
/// `options.once`, until every window is finished; then returns what this process did. The source (so
/// a token it holds) outlives broker connections: one serves them all.
pub async fn sync<S: Source>(
    runtime: &WorkerRuntime,
    source: Arc<S>,
    settings: SyncSettings,
    store: SyncStore,
    options: &RunOptions,
    shutdown: &CancellationToken,
) -> anyhow::Result<SyncSummary> {
    let started = Instant::now();
    let counters = Arc::new(Counters::default());
    // Windows whose pages were not all confirmed are not finished in the sync state: after a
    // reconnect they are handed out and paged again (writes are idempotent).
    runtime
        .run_sessions(shutdown, |session| {
            let engine = Arc::new(Engine {
                source: source.clone(),
                settings: settings.clone(),
                store: store.clone(),
                publisher: session.publisher.clone(),
                topology: runtime.topology.clone(),
                dead_letters: session.dead_letters.clone(),
                metrics: runtime.metrics.clone(),
                counters: counters.clone(),
                republish_after: options.republish_after,
            });
            serve(runtime, session, engine, options, shutdown)
        })
        .await?;
    let read = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
    Ok(SyncSummary {
        windows: read(&counters.windows),
        pages: read(&counters.pages),
        records: read(&counters.records),
        dead_lettered: read(&counters.dead_lettered),
        seconds: started.elapsed().as_secs_f64(),
        watermark: store.watermark().await?.map(|at| at.to_rfc3339()),
    })
}

/// Syncs through one broker session: consumes the fetch queue while planning new windows, or, with
/// `once`, until every window is finished.
async fn serve<S: Source>(
    runtime: &WorkerRuntime,
    session: Session,
    engine: Arc<Engine<S>>,
    options: &RunOptions,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    let settings = runtime.consume_settings(options.concurrency.max(1));
    let consuming = shutdown.child_token();
    let consumer = consume::run(
        &session.connection,
        settings,
        engine.clone(),
        session.dead_letters,
        runtime.metrics.clone(),
        consuming.clone(),
    );
    let driver = async {
        let outcome = if options.once {
            match engine.plan().await.context("planning the sync") {
                Ok(()) => wait_until_synced(&engine, shutdown).await,
                Err(err) => Err(err),
            }
        } else {
            plan_on_schedule(&engine, options.interval, shutdown).await;
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
    outcome
}

/// Plans new windows every `interval` until shutdown.
async fn plan_on_schedule<S: Source>(
    engine: &Engine<S>,
    interval: Duration,
    shutdown: &CancellationToken,
) {
    loop {
        if let Err(err) = engine.plan().await {
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
async fn wait_until_synced<S: Source>(
    engine: &Engine<S>,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    loop {
        if engine.store.pending().await? == 0 {
            return Ok(());
        }
        if let Some(reason) = engine.counters.window_given_up.lock().unwrap().clone() {
            anyhow::bail!(
                "a window was dead-lettered ({reason}); the sync cannot finish until it is replayed: \
                 see `conveyorctl dlq show {} --stage {}`",
                engine.pipeline(),
                Stage::Fetch.as_str()
            );
        }
        tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            () = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
    }
}
