//! Running the engine for one pipeline: through every broker session, consume the fetch queue (the
//! windows) while planning new ones, until shutdown or, for a `--once` sync, until every window is
//! finished.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use conveyor_amqp::Topology;
use conveyor_amqp::consume;
use conveyor_amqp::dead_letters::Held;
use conveyor_base::source::Source;
use conveyor_base::{ErrorClass, Failure, Stage};
use conveyor_pipeline::source::Schedule;
use conveyor_runtime::refusal::{Checked, CredentialCheck, RefusalGate};
use conveyor_runtime::worker::{Session, WorkerRuntime};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::engine::{Counters, Engine};
use crate::settings::SyncSettings;
use crate::state::SyncStore;
use crate::window;

/// How often a `--once` sync that waits says what for.
const WAIT_REPORT: Duration = conveyor_base::waiting::REPORT_EVERY;
/// How often a `--once` sync looks whether the windows it waits for are all dead letters.
const DEAD_LETTER_LOOK: Duration = Duration::from_secs(5);
/// Dead letters read at most for that look (each holds one window).
const DEAD_LETTERS_READ: usize = 10_000;

/// Readiness condition: the source accepts the credentials (or could not say at start).
pub const READY_SOURCE_CREDENTIALS: &str = "source credentials";

/// The check of the source's credentials ([`Source::check`]) as the refusal gate asks it.
fn credential_check<S: Source>(source: &Arc<S>) -> CredentialCheck {
    let source = source.clone();
    Arc::new(move || {
        let source = source.clone();
        Box::pin(async move { checked(source.check().await) })
    })
}

fn checked(result: Result<(), Failure>) -> Checked {
    match result {
        Ok(()) => Checked::Accepted,
        Err(failure) if failure.class == ErrorClass::Refused => Checked::Refused(failure.message),
        Err(failure) => Checked::Unknown(failure.message),
    }
}

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
///
/// The source is checked first ([`Source::check`]): a setting it cannot work with stops the process;
/// refused credentials hold the sync back until they are accepted (see
/// [`conveyor_runtime::refusal`]), except for a `--once` sync, which ends with the reason.
pub async fn sync<S: Source>(
    runtime: &WorkerRuntime,
    source: Arc<S>,
    settings: SyncSettings,
    store: SyncStore,
    options: &RunOptions,
    shutdown: &CancellationToken,
) -> anyhow::Result<SyncSummary> {
    let started = Instant::now();
    let gate = RefusalGate::new(
        runtime.readiness.clone(),
        READY_SOURCE_CREDENTIALS,
        "the source",
        credential_check(&source),
    );
    match source.check().await {
        Err(failure)
            if failure.class == ErrorClass::Permanent
                || (options.once && failure.class == ErrorClass::Refused) =>
        {
            anyhow::bail!("{}", failure.message)
        }
        found => gate.begin(&checked(found), shutdown),
    }
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
                session_lost: CancellationToken::new(),
                ledger: runtime.ledger.clone(),
                gate: gate.clone(),
                shutdown: shutdown.clone(),
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
        session.dead_letters.clone(),
        runtime.ledger.clone(),
        runtime.metrics.clone(),
        consuming.clone(),
    );
    let driver = async {
        let outcome = if options.once {
            match engine.plan().await.context("planning the sync") {
                Ok(()) => wait_until_synced(&engine, &session, shutdown).await,
                Err(err) => Err(err),
            }
        } else {
            match runtime.pipeline.spec.source.schedule() {
                Ok(schedule) => {
                    plan_on_schedule(&engine, options.interval, schedule.as_ref(), shutdown).await;
                    Ok(())
                }
                Err((field, problem)) => Err(anyhow::anyhow!("{field}: {problem}")),
            }
        };
        consuming.cancel();
        outcome
    };
    tokio::pin!(consumer);
    tokio::pin!(driver);
    // The consumer returns early only on a broker failure; then the driver is abandoned, and so are
    // the windows being paged.
    let (outcome, consumed) = tokio::select! {
        consumed = &mut consumer => {
            engine.session_lost.cancel();
            (Ok(()), consumed)
        }
        outcome = &mut driver => (outcome, consumer.await),
    };
    consumed?;
    outcome
}

/// Plans new windows until shutdown: at the times of the pipeline's `schedule` when it has one, else
/// at once and then every `interval`.
async fn plan_on_schedule<S: Source>(
    engine: &Engine<S>,
    interval: Duration,
    schedule: Option<&Schedule>,
    shutdown: &CancellationToken,
) {
    if let Some(schedule) = schedule {
        tracing::info!(
            schedule = schedule.described,
            "planning new windows on the pipeline's schedule"
        );
    }
    // Without a schedule, the first plan is at once.
    let mut due = schedule.is_none();
    loop {
        if due && let Err(err) = engine.plan().await {
            tracing::warn!(error = %format!("{err:#}"), "planning failed; trying again at the next planning time");
        }
        let pause = match schedule {
            None => interval,
            Some(schedule) => {
                let now = chrono::Utc::now();
                let Some(next) = schedule.next_after(now) else {
                    return;
                };
                (next.with_timezone(&chrono::Utc) - now)
                    .to_std()
                    .unwrap_or_default()
            }
        };
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(pause) => due = true,
        }
    }
}

/// Waits until no window of the pipeline is left unfinished (by this process or another). Fails as
/// soon as the windows left can only be released by an operator: when this process dead-letters a
/// window, or when every window left is in the fetch dead-letter queue (an earlier run's). Says what
/// it waits for every [`WAIT_REPORT`].
async fn wait_until_synced<S: Source>(
    engine: &Engine<S>,
    session: &Session,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    let mut reported = Instant::now();
    let mut looked_at_dead_letters: Option<Instant> = None;
    loop {
        let pending = engine.store.pending().await?;
        if pending.is_empty() {
            return Ok(());
        }
        let replay = || {
            let (pipeline, stage) = (engine.pipeline(), Stage::Fetch.as_str());
            format!(
                "see `conveyorctl dlq show {pipeline} --stage {stage}`, and replay once the cause is \
                 fixed: `conveyorctl dlq replay {pipeline} --stage {stage}`"
            )
        };
        if let Some(reason) = engine.gate.refusal() {
            anyhow::bail!("the source refuses the credentials: {reason}");
        }
        if let Some(reason) = engine.counters.window_given_up.lock().unwrap().clone() {
            anyhow::bail!(
                "a window was dead-lettered ({reason}); the sync cannot finish until it is replayed: {}",
                replay()
            );
        }
        if looked_at_dead_letters.is_none_or(|at| at.elapsed() >= DEAD_LETTER_LOOK) {
            looked_at_dead_letters = Some(Instant::now());
            let held = dead_lettered_windows(session, &engine.topology).await?;
            let ids: Vec<String> = pending
                .iter()
                .map(|window| window::to_work_item(*window).id)
                .collect();
            if ids.iter().all(|id| held.contains_key(id)) {
                let reason = &held[&ids[0]];
                anyhow::bail!(
                    "every window left ({}) is in the fetch dead-letter queue, from an earlier run \
                     ({reason}); the sync cannot finish until they are replayed: {}",
                    ids.len(),
                    replay()
                );
            }
        }
        if reported.elapsed() >= WAIT_REPORT {
            reported = Instant::now();
            tracing::info!(
                windows = pending.len(),
                oldest = ?pending[0],
                "waiting for windows handed out and not yet finished (by this or another fetcher)"
            );
        }
        tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            () = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
    }
}

/// The windows in the pipeline's fetch dead-letter queue, by work-item id, with why each is there.
async fn dead_lettered_windows(
    session: &Session,
    topology: &Topology,
) -> anyhow::Result<HashMap<String, String>> {
    let queue = topology.dead_letter_queue(Stage::Fetch);
    let held = Held::take(&session.connection, &queue, DEAD_LETTERS_READ)
        .await
        .with_context(|| format!("reading {queue}"))?;
    let windows = held
        .letters
        .iter()
        .flat_map(|letter| {
            letter
                .record_ids
                .iter()
                .map(|id| (id.clone(), letter.error.clone()))
        })
        .collect();
    held.release().await;
    Ok(windows)
}
