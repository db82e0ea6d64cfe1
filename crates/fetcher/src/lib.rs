//! The fetcher: reads records from the source and publishes them, one message per source page, to the
//! pipeline's transform queue.

pub mod source;

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use conveyor_core::broker::{BrokerError, PendingConfirm, Stage};
use conveyor_core::consume::{ErrorClass, Failure};
use conveyor_core::envelope::{Envelope, Meta, Record};
use conveyor_core::runtime::WorkerRuntime;
use conveyor_core::settings::WorkerArgs;
use conveyor_core::source_time;
use serde::Serialize;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::source::{ListClient, SourceError};

/// Pages whose publish may await its confirm while the next pages are fetched.
const CONFIRMS_IN_FLIGHT: usize = 16;
/// Tries of one page before the sync gives up.
const PAGE_ATTEMPTS: u32 = 5;

/// The fetcher's command line (every flag also reads an environment variable).
#[derive(Debug, clap::Parser)]
#[command(
    name = "conveyor-fetcher",
    version,
    about = "Reads records from the source and publishes them"
)]
pub struct Cli {
    #[command(flatten)]
    pub worker: WorkerArgs,
    /// Base URL of the Kingdee gateway (the simulator's address in tests and the demo).
    #[arg(
        long,
        env = "CONVEYOR_KINGDEE_BASE_URL",
        default_value = "https://api.kingdee.com"
    )]
    pub source_url: String,
    /// Sync once, print a summary and exit.
    #[arg(long)]
    pub once: bool,
    /// Seconds between syncs when not --once.
    #[arg(long, env = "CONVEYOR_FETCH_INTERVAL_SECS", default_value_t = 300)]
    pub interval_secs: u64,
}

/// What one sync did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SyncSummary {
    pub pages: u64,
    pub records: u64,
    pub dead_lettered: u64,
    pub seconds: f64,
    pub stopped_early: bool,
}

pub async fn run(cli: Cli, shutdown: CancellationToken) -> anyhow::Result<()> {
    let Some(mut runtime) =
        WorkerRuntime::start(&cli.worker, Stage::Fetch, 9101, &[], &shutdown).await?
    else {
        return Ok(());
    };
    let source = &runtime.pipeline.spec.source;
    let client = ListClient::new(
        &cli.source_url,
        &source.path,
        source.page_size,
        source.query.clone(),
    );
    let result = loop {
        match sync_once(&runtime, &client, &shutdown).await {
            Ok(summary) => {
                tracing::info!(
                    pages = summary.pages,
                    records = summary.records,
                    dead_lettered = summary.dead_lettered,
                    seconds = summary.seconds,
                    "sync finished"
                );
                if cli.once {
                    println!("{}", serde_json::to_string(&summary)?);
                    break Ok(());
                }
            }
            Err(err) if err.downcast_ref::<BrokerError>().is_some() => {
                // Pages whose publish was not confirmed are lost with the connection: sync again from
                // the start (writes are idempotent, so pages sent twice do no harm).
                tracing::warn!(error = %format!("{err:#}"), "lost the broker during a sync; reconnecting to sync again");
                if !runtime.reconnect(&shutdown).await? {
                    break Ok(());
                }
                continue;
            }
            Err(err) if cli.once => break Err(err),
            Err(err) => {
                tracing::error!(error = %format!("{err:#}"), "sync failed; trying again at the next interval")
            }
        }
        tokio::select! {
            () = shutdown.cancelled() => break Ok(()),
            () = tokio::time::sleep(Duration::from_secs(cli.interval_secs)) => {}
        }
    };
    runtime.stop().await;
    result
}

/// Pages through the whole list and publishes every page. Returns once every publish is confirmed.
pub async fn sync_once(
    runtime: &WorkerRuntime,
    client: &ListClient,
    shutdown: &CancellationToken,
) -> anyhow::Result<SyncSummary> {
    let started = Instant::now();
    let mut summary = SyncSummary::default();
    let mut confirms: VecDeque<PendingConfirm> = VecDeque::new();
    let mut page_number = 1;
    loop {
        if shutdown.is_cancelled() {
            summary.stopped_early = true;
            break;
        }
        let page = fetch_with_retry(runtime, client, page_number, shutdown).await?;
        let last_page = page_number >= page.total_page;
        if !page.rows.is_empty() {
            let (records, rejected) = to_records(runtime, page.rows);
            summary.records += records.len() as u64;
            summary.dead_lettered += rejected.len() as u64;
            let meta = Meta::new_trace(runtime.pipeline.name());
            if !rejected.is_empty() {
                runtime.dead_letters().send_records(&meta, rejected).await?;
            }
            if !records.is_empty() {
                let count = records.len() as u64;
                let (body, properties) = Envelope { meta, records }.to_amqp();
                let confirm = runtime
                    .publisher
                    .send(
                        &runtime.topology.exchange(),
                        &runtime.topology.routing_key(Stage::Transform),
                        &body,
                        properties,
                    )
                    .await?;
                confirms.push_back(confirm);
                runtime
                    .metrics
                    .records_out
                    .with_label_values(&[runtime.pipeline.name(), Stage::Fetch.as_str()])
                    .inc_by(count);
            }
            while confirms.len() > CONFIRMS_IN_FLIGHT {
                confirms.pop_front().expect("not empty").wait().await?;
            }
        }
        summary.pages += 1;
        if last_page {
            break;
        }
        page_number += 1;
    }
    for confirm in confirms {
        confirm.wait().await?;
    }
    summary.seconds = started.elapsed().as_secs_f64();
    Ok(summary)
}

async fn fetch_with_retry(
    runtime: &WorkerRuntime,
    client: &ListClient,
    page: u64,
    shutdown: &CancellationToken,
) -> anyhow::Result<source::Page> {
    let pipeline = runtime.pipeline.name();
    let mut attempt = 0;
    loop {
        let timer = runtime
            .metrics
            .message_duration
            .with_label_values(&[pipeline, Stage::Fetch.as_str()])
            .start_timer();
        let result = client.fetch_page(page).await;
        timer.observe_duration();
        let outcome = if result.is_ok() { "ok" } else { "error" };
        runtime
            .metrics
            .source_requests
            .with_label_values(&[pipeline, outcome])
            .inc();
        let error: SourceError = match result {
            Ok(fetched) => {
                runtime
                    .metrics
                    .records_in
                    .with_label_values(&[pipeline, Stage::Fetch.as_str()])
                    .inc_by(fetched.rows.len() as u64);
                return Ok(fetched);
            }
            Err(error) => error,
        };
        attempt += 1;
        if attempt >= PAGE_ATTEMPTS {
            anyhow::bail!("page {page} failed {attempt} times; last error: {error}");
        }
        let delay = conveyor_core::consume::retry_delay(attempt);
        tracing::warn!(page, attempt, error = %error, retry_in_ms = delay.as_millis() as u64, "source call failed");
        tokio::select! {
            () = shutdown.cancelled() => anyhow::bail!("stopped while retrying page {page}"),
            () = tokio::time::sleep(delay) => {}
        }
    }
}

/// Turns rows into records; rows without a usable id or modify time are returned apart, with the reason.
fn to_records(runtime: &WorkerRuntime, rows: Vec<Value>) -> (Vec<Record>, Vec<(Record, Failure)>) {
    let source = &runtime.pipeline.spec.source;
    let mut records = Vec::with_capacity(rows.len());
    let mut rejected = Vec::new();
    for row in rows {
        let id = match row.get(&source.id_field) {
            Some(Value::String(text)) if !text.is_empty() => Some(text.clone()),
            Some(Value::Number(number)) => Some(number.to_string()),
            _ => None,
        };
        let modify_time = row
            .get(&source.modify_time_field)
            .map(source_time::parse_instant);
        match (id, modify_time) {
            (Some(id), Some(Ok(modify_time))) => records.push(Record {
                id,
                modify_time,
                data: row,
            }),
            (id, modify_time) => {
                let problem = match (&id, modify_time) {
                    (None, _) => format!("row has no usable id field {:?}", source.id_field),
                    (_, None) => format!(
                        "row has no modify time field {:?}",
                        source.modify_time_field
                    ),
                    (_, Some(Err(err))) => {
                        format!("modify time field {:?}: {err}", source.modify_time_field)
                    }
                    (_, Some(Ok(_))) => unreachable!("handled above"),
                };
                let record = Record {
                    id: id.unwrap_or_default(),
                    modify_time: source_time::from_epoch_millis(0).expect("epoch is in range"),
                    data: row,
                };
                rejected.push((record, Failure::new(ErrorClass::Permanent, problem)));
            }
        }
    }
    (records, rejected)
}
