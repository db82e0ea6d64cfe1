//! The generic sync engine: pages the windows of any [`Source`] and publishes their records to the
//! pipeline's transform queue, the rows of consecutive pages of a window gathered into one message
//! (`source.records_per_message`). It knows windows, pages and the watermark, never a source's
//! protocol; the checkpoint contract it relies on is [`conveyor_base::source`]'s.
//!
//! Windows are work items on the pipeline's fetch queue, so any number of fetcher processes share them.
//! A window is finished — and the watermark may pass it — only after every page of it is confirmed by
//! the broker.
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

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use conveyor_amqp::consume::Handler;
use conveyor_amqp::dead_letters::DeadLetters;
use conveyor_amqp::envelope::{Envelope, Meta};
use conveyor_amqp::{PendingConfirm, Publisher, Topology};
use conveyor_base::ledger::{Settled, SharedLedger};
use conveyor_base::metrics::Metrics;
use conveyor_base::source::{Page, Source, Window, consistent_page};
use conveyor_base::{Disposition, ErrorClass, Failure, Record, Stage};
use conveyor_runtime::refusal::RefusalGate;
use futures_util::StreamExt;
use serde_json::value::RawValue;
use tokio_util::sync::CancellationToken;

use crate::pass::{Checkpoints, PassIds, transient};
use crate::rows::to_records;
use crate::settings::SyncSettings;
use crate::state::SyncStore;
use crate::window;

/// Pages of one window fetched at once.
const PAGES_IN_FLIGHT: usize = 4;
/// Times a window is paged again because its rows moved, before the work item is retried later.
const WINDOW_RESTARTS: u32 = 8;
/// A message also closes once its rows hold this many bytes of JSON, whatever
/// `source.records_per_message` says: far below the size a worker accepts, even after a mapping that
/// adds fields.
const MESSAGE_BYTES: usize = 4 * 1024 * 1024;

/// What a fetcher process did, across its broker sessions.
#[derive(Default)]
pub(crate) struct Counters {
    pub(crate) windows: AtomicU64,
    pub(crate) pages: AtomicU64,
    pub(crate) records: AtomicU64,
    pub(crate) dead_lettered: AtomicU64,
    /// Why the last window this process gave up on was dead-lettered: a `--once` sync cannot finish.
    pub(crate) window_given_up: std::sync::Mutex<Option<String>>,
}

/// Pages windows of one pipeline on one broker session, and publishes their records.
pub(crate) struct Engine<S> {
    pub(crate) source: Arc<S>,
    pub(crate) settings: SyncSettings,
    pub(crate) store: SyncStore,
    pub(crate) publisher: Publisher,
    pub(crate) topology: Topology,
    pub(crate) dead_letters: DeadLetters,
    pub(crate) metrics: Metrics,
    pub(crate) counters: Arc<Counters>,
    /// A window handed out and not finished after this long is handed out again.
    pub(crate) republish_after: Duration,
    /// Cancelled when the broker session is lost: a window being paged stops at once, before the
    /// calls already waiting for their slot are made for pages it could not publish.
    pub(crate) session_lost: CancellationToken,
    /// Where the pages each window sent on are recorded.
    pub(crate) ledger: SharedLedger,
    /// Closed while the source refuses the credentials: windows wait, unacked, instead of failing.
    pub(crate) gate: Arc<RefusalGate>,
    /// The process stops: a window waiting at the gate gives its message back.
    pub(crate) shutdown: CancellationToken,
}

impl<S: Source> Engine<S> {
    pub(crate) fn pipeline(&self) -> &str {
        self.topology.pipeline()
    }

    /// Hands out the windows that are due, as work items on the fetch queue.
    pub(crate) async fn plan(&self) -> anyhow::Result<()> {
        let settings = &self.settings;
        let plan = self
            .store
            .plan(
                settings.start_time,
                settings.window,
                settings.lag,
                settings.overlap,
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
        window::publish_work_items(&self.publisher, &self.topology, windows).await
    }

    /// Page `number` of `window`, asked for again while it disagrees with its own count: it is never
    /// taken as it is.
    async fn page(&self, window: &Window, number: u64) -> Result<Page, Failure> {
        let page = consistent_page(&*self.source, window, number, &mut 0).await?;
        self.counters.pages.fetch_add(1, Ordering::Relaxed);
        self.metrics
            .records_in
            .with_label_values(&[self.pipeline(), Stage::Fetch.as_str()])
            .inc_by(page.rows.len() as u64);
        Ok(page)
    }

    /// Adds page `number`'s records to those `gathered` (and dead-letters its unusable rows), and
    /// publishes them once they fill a message. The records' ids are added to the pass's `seen`.
    async fn gather_page(
        &self,
        meta: &Meta,
        page: (u64, Vec<Box<RawValue>>),
        seen: &mut PassIds,
        gathered: &mut Vec<Record>,
        checkpoints: &mut Checkpoints,
    ) -> Result<(), Failure> {
        let (number, rows) = page;
        let (records, rejected) = to_records(&self.settings, rows);
        for record in &records {
            seen.add(&record.id);
        }
        if !rejected.is_empty() {
            self.counters
                .dead_lettered
                .fetch_add(rejected.len() as u64, Ordering::Relaxed);
            let classes: Vec<ErrorClass> =
                rejected.iter().map(|(_, failure)| failure.class).collect();
            let letters = self
                .dead_letters
                .send_records(meta, rejected)
                .await
                .map_err(transient)?;
            // Each refused row is a message of its own, settled as its letter (the same row refused
            // again, a window paged twice, is the same letter).
            let settled = letters.into_iter().zip(classes).map(|(letter, class)| {
                let mut settled = Settled::dead_lettered(
                    Stage::Fetch,
                    letter.message_id.clone(),
                    class,
                    letter.record_ids.clone(),
                );
                settled.letters.push(letter);
                settled
            });
            futures_util::future::try_join_all(
                settled
                    .into_iter()
                    .map(|settled| self.ledger.settle(settled)),
            )
            .await
            .map_err(transient)?;
        }
        gathered.extend(records);
        let bytes: usize = gathered.iter().map(|record| record.data.get().len()).sum();
        if gathered.len() < self.settings.records_per_message && bytes < MESSAGE_BYTES {
            return Ok(());
        }
        self.flush(meta, gathered, number, checkpoints).await
    }

    /// Publishes the records `gathered` (all of the pages up to `last_page` not published yet) as one
    /// message, its confirm awaited by `checkpoints`.
    async fn flush(
        &self,
        meta: &Meta,
        gathered: &mut Vec<Record>,
        last_page: u64,
        checkpoints: &mut Checkpoints,
    ) -> Result<(), Failure> {
        let records = std::mem::take(gathered);
        // The ids are kept only for a pass that records its progress: a copy of each costs.
        let ids = match checkpoints.keeps_ids() {
            true => records.iter().map(|record| record.id.clone()).collect(),
            false => Vec::new(),
        };
        if let Some(confirm) = self.publish(meta, records).await? {
            checkpoints.add(confirm, last_page, ids).await?;
        }
        Ok(())
    }

    /// Publishes records as one message to the transform stage; returns the pending confirm and the
    /// message's id.
    async fn publish(
        &self,
        meta: &Meta,
        records: Vec<Record>,
    ) -> Result<Option<(PendingConfirm, String)>, Failure> {
        if records.is_empty() {
            return Ok(None);
        }
        let count = records.len() as u64;
        let meta = meta.next_stage();
        let message_id = meta.message_id.to_string();
        let (body, properties) = Envelope { meta, records }.to_amqp(self.topology.compression());
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
        Ok(Some((confirm, message_id)))
    }

    /// Whether rows may still become visible in `window` late: its end is within `lag + overlap` of
    /// now, the span the sync allows late rows.
    fn may_gain_rows(&self, window: &Window) -> bool {
        let allowance = self.settings.lag.saturating_add(self.settings.overlap);
        let allowance = chrono::Duration::from_std(allowance).unwrap_or(chrono::Duration::MAX);
        window
            .end
            .checked_add_signed(allowance)
            .is_none_or(|until| chrono::Utc::now() <= until)
    }

    /// Where a pass over `window` may start other than at its first page: after the last page an
    /// earlier pass had confirmed (its fetcher died, or lost the broker), when that page, read again,
    /// holds only rows the pass published and the window's count is the same. Then no row left the
    /// pages already read and none moved from them to the end (which shifts the rows after it, and
    /// brings an unseen row onto that page), so nothing before it can be missed. A window that may
    /// still gain rows never resumes: it is compared pass by pass, whole.
    async fn resume_point(&self, window: &Window) -> Result<Option<PassStart>, Failure> {
        if self.may_gain_rows(window) {
            return Ok(None);
        }
        let Some((progress, ids)) = self.store.progress(window).await.map_err(transient)? else {
            return Ok(None);
        };
        let last = self.page(window, progress.pages_confirmed).await?;
        let (records, _) = to_records(&self.settings, last.rows);
        let unchanged =
            last.count == progress.count && records.iter().all(|record| ids.contains(&record.id));
        if !unchanged {
            tracing::info!(
                ?window,
                "the window changed since a pass got to page {}; paging it from the start",
                progress.pages_confirmed
            );
            self.store
                .forget_progress(window)
                .await
                .map_err(transient)?;
            return Ok(None);
        }
        tracing::info!(
            ?window,
            pages_confirmed = progress.pages_confirmed,
            total_pages = last.total_pages,
            "resuming the window after its last confirmed page"
        );
        Ok(Some(PassStart {
            first: None,
            next_page: progress.pages_confirmed + 1,
            count: progress.count,
            total_pages: last.total_pages,
            seen: PassIds::from_ids(ids),
        }))
    }

    /// One pass over `window` from `start`. What it read is published, and confirmed, before it
    /// returns, even when rows moved: writes are idempotent. With `record`, each confirmed message
    /// records how far the pass got (see [`Engine::resume_point`]).
    async fn pass(
        &self,
        meta: &Meta,
        window: &Window,
        start: PassStart,
        record: bool,
    ) -> Result<PassOutcome, Failure> {
        let PassStart {
            first,
            next_page,
            count,
            total_pages,
            mut seen,
        } = start;
        let mut checkpoints = Checkpoints::start(
            record.then(|| (self.store.clone(), *window, count)),
            self.ledger.clone(),
            meta.message_id.to_string(),
        );
        let mut gathered = Vec::new();
        let mut last_page = next_page - 1;
        if let Some(first) = first {
            self.gather_page(
                meta,
                (1, first.rows),
                &mut seen,
                &mut gathered,
                &mut checkpoints,
            )
            .await?;
        }
        // The rest of the pages, a few at a time: the call budget, not this loop, sets the pace.
        let mut pages = futures_util::stream::iter(next_page.max(2)..=total_pages)
            .map(|number| async move { (number, self.page(window, number).await) })
            .buffered(PAGES_IN_FLIGHT);
        let mut moved = None;
        while let Some((number, page)) = pages.next().await {
            let page = page?;
            if page.count != count {
                moved = Some("the window's count changed");
                break;
            }
            self.gather_page(
                meta,
                (number, page.rows),
                &mut seen,
                &mut gathered,
                &mut checkpoints,
            )
            .await?;
            last_page = number;
            if seen.repeated {
                moved = Some("a row came twice");
                break;
            }
        }
        drop(pages);
        self.flush(meta, &mut gathered, last_page, &mut checkpoints)
            .await?;
        checkpoints.finish().await?;
        Ok(match moved {
            Some(reason) => PassOutcome::Moved(reason),
            None => PassOutcome::Steady(seen.ids),
        })
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
        let mut resume = self.resume_point(&window).await?;
        for _ in 0..WINDOW_RESTARTS {
            let start = match resume.take() {
                Some(start) => start,
                None => {
                    let first = self.page(&window, 1).await?;
                    if first.count > self.settings.max_window_rows && window::splittable(&window) {
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
                    PassStart::from_first(first)
                }
            };
            let two_passes = start.total_pages > 1 && self.may_gain_rows(&window);
            match self.pass(meta, &window, start, !two_passes).await? {
                PassOutcome::Moved(reason) => {
                    tracing::info!(
                        ?window,
                        reason,
                        "rows moved while paging; paging the window again"
                    );
                    outcome("restarted");
                    self.store
                        .forget_progress(&window)
                        .await
                        .map_err(transient)?;
                    previous = None;
                }
                PassOutcome::Steady(ids) if two_passes && previous.as_ref() != Some(&ids) => {
                    tracing::info!(
                        ?window,
                        "late rows may still enter the window; paging it again to compare"
                    );
                    outcome("verifying");
                    previous = Some(ids);
                }
                PassOutcome::Steady(_) => {
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
            }
        }
        Err(Failure::new(
            ErrorClass::Transient,
            format!("rows kept moving while paging {window:?}; will try the window again later"),
        ))
    }
}

/// Where a pass starts.
struct PassStart {
    /// The window's first page, read to decide the pass (none when resuming).
    first: Option<Page>,
    /// The first page still to read.
    next_page: u64,
    count: u64,
    total_pages: u64,
    /// The ids published so far.
    seen: PassIds,
}

impl PassStart {
    fn from_first(first: Page) -> Self {
        Self {
            next_page: 2,
            count: first.count,
            total_pages: first.total_pages,
            seen: PassIds::for_count(first.count),
            first: Some(first),
        }
    }
}

/// How a pass ended.
enum PassOutcome {
    /// The window held still: the ids it published.
    Steady(HashSet<String>),
    /// Rows moved while it was paged, for this reason: it must be paged again.
    Moved(&'static str),
}

impl<S: Source> Handler for Engine<S> {
    async fn handle(&self, envelope: Envelope) -> Disposition {
        for record in &envelope.records {
            let window = match window::from_work_item(record) {
                Ok(window) => window,
                Err(problem) => {
                    return Disposition::DeadLetter(Failure::new(ErrorClass::Malformed, problem));
                }
            };
            let synced = loop {
                // No attempt is spent waiting: the window is given back (after a while, or on
                // shutdown) and taken again, by this process or another.
                if self.gate.is_refused() {
                    tokio::select! {
                        biased;
                        () = self.session_lost.cancelled() => return Disposition::Release,
                        accepted = self.gate.wait_accepted(&self.shutdown) => if !accepted {
                            return Disposition::Release;
                        },
                    }
                }
                let synced = tokio::select! {
                    biased;
                    () = self.session_lost.cancelled() => return Disposition::Release,
                    synced = self.sync_window(&envelope.meta, window) => synced,
                };
                match synced {
                    Err(failure) if failure.class == ErrorClass::Refused => {
                        self.gate.refuse(&failure.message, self.shutdown.clone());
                    }
                    synced => break synced,
                }
            };
            match synced {
                Ok(()) => self.gate.worked(),
                Err(failure) if failure.class == ErrorClass::Transient => {
                    return Disposition::Retry(failure);
                }
                Err(failure) if failure.class == ErrorClass::Throttled => {
                    return Disposition::Defer(failure);
                }
                Err(failure) => return Disposition::DeadLetter(failure),
            }
        }
        // The records it sent on are recorded already, each message once confirmed.
        let settled = Settled::new(Stage::Fetch, envelope.meta.message_id.to_string(), 0);
        match self.ledger.settle(settled).await {
            Ok(()) => Disposition::Done,
            Err(err) => Disposition::Retry(Failure::new(ErrorClass::Transient, err)),
        }
    }

    fn dead_lettered(&self, failure: &Failure) {
        // A malformed message is not one of the windows a sync waits for; anything else is.
        if failure.class != ErrorClass::Malformed {
            *self.counters.window_given_up.lock().unwrap() = Some(failure.message.clone());
        }
    }
}
