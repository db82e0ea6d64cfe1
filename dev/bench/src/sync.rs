//! `conveyor-dev bench sync` measures how close the fetchers come to the gateway's call budget: a backlog of N
//! records behind a simulator that answers 429 above the budget is synced, and the time is set against
//! the ideal — N ÷ 100 rows per call ÷ calls allowed per minute. The pipeline's budget is set to the
//! simulator's limit, exactly: zero 429s then means the fetchers kept the budget. The defaults (60,000
//! records, 300 calls per minute: about 600 calls, two minutes) make the sync need well over one
//! minute's worth of calls, so that the limit binds: a backlog synced in less than a minute's worth
//! would meet no 429 however fast it called.
//!
//! Fault modes measure what faults cost: `--source-limit` (another client of the app spends part of
//! the limit, so the gateway allows less than the budget; `--retry-after` makes it say when to call
//! again), `--kill-fetcher-every` (the first fetcher is SIGKILLed and restarted at once) and
//! `--restart-broker-every` (the bench runs a RabbitMQ node of its own and restarts it). The report
//! sets the calls against the ideal ones (the pages, the login and the plan's empty tail window) and
//! the time against the ideal at the rate the gateway allows, and counts the rows fetched again and
//! the dead-lettered windows.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::bail;
use conveyor_base::Stage;
use conveyor_harness::own_broker::OwnBroker;
use conveyor_harness::{Scenario, Services, Worker, WorkerProcess};
use kingdee_sim::SimConfig;
use kingdee_sim::gate::GatewayConfig;
use serde::Serialize;

#[derive(Debug, clap::Args)]
pub struct SyncArgs {
    /// The pipeline file whose source is synced.
    #[arg(long, default_value = "ops/pipelines/sales_orders.toml")]
    pipeline: PathBuf,
    /// Records in the backlog: at 100 a call, make it well over a minute's worth of calls, or the
    /// limit never binds.
    #[arg(long, default_value_t = 60_000)]
    orders: usize,
    /// The gateway's limit, calls per minute (the simulator enforces it with 429), and the fetchers'
    /// budget.
    #[arg(long, default_value_t = 300)]
    calls_per_minute: u32,
    /// Rows above which a window is split in two (`source.max_window_rows`); by default the whole
    /// backlog fits one window. Smaller values measure what splitting and small windows cost.
    #[arg(long)]
    max_window_rows: Option<u64>,
    /// Fetcher processes sharing the work and the budget.
    #[arg(long, default_value_t = 1)]
    fetchers: usize,
    /// Fault: the gateway allows only this many calls per minute (another client spends the rest),
    /// below the budget of --calls-per-minute.
    #[arg(long)]
    source_limit: Option<u32>,
    /// With --source-limit: the gateway's 429s say when to call again (Retry-After).
    #[arg(long)]
    retry_after: bool,
    /// Fault: SIGKILL the first fetcher every this many seconds, restarting it at once.
    #[arg(long)]
    kill_fetcher_every: Option<f64>,
    /// Fault: run on a RabbitMQ node of the bench's own and restart it every this many seconds of
    /// work (the time the node takes to stop and start again comes on top).
    #[arg(long)]
    restart_broker_every: Option<f64>,
}

/// What `bench sync` measured.
#[derive(Debug, Serialize)]
pub struct SyncReport {
    pub records: usize,
    pub fetchers: usize,
    pub calls_per_minute: u32,
    /// What the gateway allowed, calls per minute.
    pub source_limit: u32,
    pub fetcher_kills: u32,
    pub broker_restarts: u32,
    /// `source.max_window_rows`, when set (else the backlog is one window).
    pub max_window_rows: Option<u64>,
    pub calls: u64,
    /// The pages, the login's two calls and the plan's empty tail window.
    pub ideal_calls: u64,
    pub ratio_to_ideal_calls: f64,
    /// Rows fetched more than once (rows served by the simulator beyond the backlog): what the
    /// faults made the fetchers read again, and an upper bound of the rows written again.
    pub rows_fetched_again: u64,
    /// Windows dead-lettered by the fetchers.
    pub dead_letters: usize,
    pub rejected_429: u64,
    pub max_calls_in_a_minute: u64,
    pub seconds: f64,
    pub ideal_seconds: f64,
    /// `seconds / ideal_seconds`: 1.05 means 5% slower than the ideal.
    pub ratio_to_ideal: f64,
}

/// Syncs the backlog with the fetcher binary of `bin_dir`.
pub async fn run(args: &SyncArgs, bin_dir: &Path) -> anyhow::Result<SyncReport> {
    let mut services = Services::check().await?;
    let mut own_broker = match args.restart_broker_every {
        Some(_) => {
            let broker = OwnBroker::start(&format!("bench-sync-{}", std::process::id())).await?;
            services.amqp_url = broker.url();
            Some(broker)
        }
        None => None,
    };
    // The backlog's timeline ends before now, so that one window holds all of it: orders are created
    // at most 2 minutes apart and modified within 3 days.
    let days = (args.orders as i64 * 120 / 86_400) + 5;
    let source_limit = args.source_limit.unwrap_or(args.calls_per_minute);
    anyhow::ensure!(
        source_limit <= args.calls_per_minute,
        "--source-limit {source_limit} is above the budget (--calls-per-minute {}): the fault is a \
         gateway allowing less than the budget",
        args.calls_per_minute
    );
    let sim = SimConfig {
        orders: args.orders,
        epoch: kingdee_sim::data::days_ago(days),
        gateway: GatewayConfig {
            calls_per_minute: source_limit,
            retry_after: args.retry_after,
            ..GatewayConfig::default()
        },
        ..SimConfig::default()
    };
    let source = [
        ("window_secs", toml::Value::Integer((days + 2) * 86_400)),
        (
            "max_window_rows",
            toml::Value::Integer(
                args.max_window_rows
                    .map_or(args.orders as i64 + 1, |rows| rows as i64),
            ),
        ),
        // The budget is the limit itself unless --source-limit cuts the gateway's.
        (
            "calls_per_minute",
            toml::Value::Integer(i64::from(args.calls_per_minute)),
        ),
    ];
    let scenario = Scenario::start(
        services,
        &args.pipeline,
        bin_dir,
        "bench_sync",
        sim,
        &source,
    )
    .await?;
    let pages = (args.orders as f64 / 100.0).ceil();
    let minutes_of_calls = pages / f64::from(source_limit);
    eprintln!(
        "bench sync: {} records, budget {} calls/minute, gateway limit {source_limit}, {} fetcher(s): \
         {minutes_of_calls:.1} minutes' worth of calls",
        args.orders, args.calls_per_minute, args.fetchers
    );
    if minutes_of_calls <= 1.0 {
        eprintln!(
            "bench sync: warning: under one minute's worth of calls, the limit cannot bind; zero 429s says nothing"
        );
    }
    let started = Instant::now();
    let mut fetchers = (0..args.fetchers)
        .map(|_| scenario.spawn(Worker::Fetcher, &["--once"]))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut fetcher_kills = 0;
    if let Some(every) = args.kill_fetcher_every {
        fetcher_kills = kill_until_done(&scenario, &mut fetchers[0], every).await?;
    }
    let mut broker_restarts = 0;
    if let (Some(every), Some(broker)) = (args.restart_broker_every, own_broker.as_mut()) {
        while fetchers[0]
            .exited_within(Duration::from_secs_f64(every))
            .await?
            .is_none()
        {
            broker.stop().await?;
            broker.resume().await?;
            broker_restarts += 1;
        }
    }
    for fetcher in &mut fetchers {
        let status = fetcher.wait(Duration::from_secs(3_600)).await?;
        if !status.success() {
            bail!("a fetcher failed:\n{}", fetcher.log_tail(20));
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    let stats = scenario.simulator.stats();
    let dead_letters = scenario.peek_dead_letters(Stage::Fetch).await?.len();
    scenario.clean_up(false).await?;
    if let Some(broker) = own_broker.as_mut() {
        broker.stop().await?;
    }
    let ideal_seconds = pages / f64::from(source_limit) * 60.0;
    let ideal_calls = pages as u64 + 2 + 1;
    Ok(SyncReport {
        records: args.orders,
        fetchers: args.fetchers,
        calls_per_minute: args.calls_per_minute,
        source_limit,
        fetcher_kills,
        broker_restarts,
        max_window_rows: args.max_window_rows,
        calls: stats.calls,
        ideal_calls,
        ratio_to_ideal_calls: stats.calls as f64 / ideal_calls as f64,
        rows_fetched_again: stats.rows_served.saturating_sub(args.orders as u64),
        dead_letters,
        rejected_429: stats.rate_limited,
        max_calls_in_a_minute: stats.max_calls_in_a_minute,
        seconds,
        ideal_seconds,
        ratio_to_ideal: seconds / ideal_seconds,
    })
}

/// SIGKILLs `fetcher` every `every` seconds and starts another in its place, until one finishes;
/// returns the kills.
async fn kill_until_done(
    scenario: &Scenario,
    fetcher: &mut WorkerProcess,
    every: f64,
) -> anyhow::Result<u32> {
    let mut kills = 0;
    while fetcher
        .exited_within(Duration::from_secs_f64(every))
        .await?
        .is_none()
    {
        fetcher.kill().await?;
        kills += 1;
        *fetcher = scenario.spawn(Worker::Fetcher, &["--once"])?;
    }
    Ok(kills)
}
