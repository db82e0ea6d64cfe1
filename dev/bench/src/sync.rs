//! `conveyor-dev bench sync` measures how close the fetchers come to the gateway's call budget: a backlog of N
//! records behind a simulator that answers 429 above the budget is synced, and the time is set against
//! the ideal — N ÷ 100 rows per call ÷ calls allowed per minute. The pipeline's budget is set to the
//! simulator's limit, exactly: zero 429s then means the fetchers kept the budget. The defaults (60,000
//! records, 300 calls per minute: about 600 calls, two minutes) make the sync need well over one
//! minute's worth of calls, so that the limit binds: a backlog synced in less than a minute's worth
//! would meet no 429 however fast it called.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::bail;
use conveyor_harness::{Scenario, Services, Worker};
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
    /// Fetcher processes sharing the work and the budget.
    #[arg(long, default_value_t = 1)]
    fetchers: usize,
}

/// What `bench sync` measured.
#[derive(Debug, Serialize)]
pub struct SyncReport {
    pub records: usize,
    pub fetchers: usize,
    pub calls_per_minute: u32,
    pub calls: u64,
    pub rejected_429: u64,
    pub max_calls_in_a_minute: u64,
    pub seconds: f64,
    pub ideal_seconds: f64,
    /// `seconds / ideal_seconds`: 1.05 means 5% slower than the ideal.
    pub ratio_to_ideal: f64,
}

/// Syncs the backlog with the fetcher binary of `bin_dir`.
pub async fn run(args: &SyncArgs, bin_dir: &Path) -> anyhow::Result<SyncReport> {
    let services = Services::check().await?;
    // The backlog's timeline ends before now, so that one window holds all of it: orders are created
    // at most 2 minutes apart and modified within 3 days.
    let days = (args.orders as i64 * 120 / 86_400) + 5;
    let sim = SimConfig {
        orders: args.orders,
        epoch: kingdee_sim::data::days_ago(days),
        gateway: GatewayConfig {
            calls_per_minute: args.calls_per_minute,
            ..GatewayConfig::default()
        },
        ..SimConfig::default()
    };
    let source = [
        ("window_secs", toml::Value::Integer((days + 2) * 86_400)),
        (
            "max_window_rows",
            toml::Value::Integer(args.orders as i64 + 1),
        ),
        // The budget is the limit itself (the harness sets it so too; said here, since it is what is
        // measured).
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
    let minutes_of_calls = (args.orders as f64 / 100.0).ceil() / f64::from(args.calls_per_minute);
    eprintln!(
        "bench sync: {} records, {} calls/minute (budget = limit), {} fetcher(s): {minutes_of_calls:.1} minutes' worth of calls",
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
    for fetcher in &mut fetchers {
        let status = fetcher.wait(Duration::from_secs(3_600)).await?;
        if !status.success() {
            bail!("a fetcher failed:\n{}", fetcher.log_tail(20));
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    let stats = scenario.simulator.stats();
    scenario.clean_up(false).await?;
    let ideal_seconds =
        (args.orders as f64 / 100.0).ceil() / f64::from(args.calls_per_minute) * 60.0;
    Ok(SyncReport {
        records: args.orders,
        fetchers: args.fetchers,
        calls_per_minute: args.calls_per_minute,
        calls: stats.calls,
        rejected_429: stats.rate_limited,
        max_calls_in_a_minute: stats.max_calls_in_a_minute,
        seconds,
        ideal_seconds,
        ratio_to_ideal: seconds / ideal_seconds,
    })
}
