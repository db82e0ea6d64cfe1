//! `conveyorctl demo`: the whole pipeline on this machine — the simulator with its sales orders, the
//! fetcher, the transformer and writers as real processes, RabbitMQ and PostgreSQL — then a summary
//! and a clean stop.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use conveyor_harness::{Scenario, Services, Worker};
use kingdee_sim::SimConfig;

#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// The pipeline file to run.
    #[arg(long, default_value = "ops/pipelines/sales_orders.toml")]
    pipeline: PathBuf,
    /// Sales orders in the simulator.
    #[arg(long, default_value_t = 10_000)]
    orders: usize,
    /// Seed of the simulator's data.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Writer processes.
    #[arg(long, default_value_t = 2)]
    writers: usize,
    /// PostgreSQL schema the records land in (reset at the start, kept afterwards for a look).
    #[arg(long, default_value = "conveyor_demo")]
    schema: String,
    /// Prefix of the demo's exchanges and queues (deleted at the end), so that a demo never meets
    /// another pipeline's messages.
    #[arg(long, default_value = "conveyor-demo")]
    namespace: String,
    /// Give up if the records have not all landed after this many seconds.
    #[arg(long, default_value_t = 300)]
    timeout_secs: u64,
}

/// Where the worker binaries are: beside conveyorctl.
pub fn bin_dir() -> anyhow::Result<PathBuf> {
    Ok(std::env::current_exe()?
        .parent()
        .context("conveyorctl has no directory")?
        .to_owned())
}

pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    let services = Services::check().await?;
    let bin_dir = bin_dir()?;
    let sim = SimConfig {
        seed: args.seed,
        orders: args.orders,
        ..SimConfig::default()
    };
    let scenario = Scenario::start_named(
        services,
        &args.pipeline,
        &bin_dir,
        &args.namespace,
        &args.schema,
        sim,
        &[],
    )
    .await?;
    println!(
        "demo: {} sales orders from the simulator at {} → RabbitMQ → {} writer(s) → PostgreSQL {}",
        args.orders,
        scenario.sim_url,
        args.writers,
        scenario.table()?
    );
    let mut workers = vec![scenario.spawn(Worker::Transformer, &[])?];
    for _ in 0..args.writers {
        workers.push(scenario.spawn(Worker::Writer, &[])?);
    }
    let started = Instant::now();
    let mut fetcher = scenario.spawn(Worker::Fetcher, &["--once"])?;
    let landed = scenario
        .wait_for_target(Duration::from_secs(args.timeout_secs))
        .await;
    let elapsed = started.elapsed();
    let fetch_status = fetcher.wait(Duration::from_secs(30)).await?;

    for worker in &workers {
        worker.terminate()?;
    }
    let mut clean_stops = 0;
    for worker in &mut workers {
        let status = worker.wait(Duration::from_secs(30)).await?;
        if status.success() {
            clean_stops += 1;
        } else {
            eprintln!(
                "{} exited with {status}:\n{}",
                worker.worker.binary(),
                worker.log_tail(20)
            );
        }
    }
    if let Err(err) = landed {
        eprintln!("fetcher log:\n{}", fetcher.log_tail(20));
        return Err(err);
    }
    let comparison = scenario.compare_with_truth().await?;
    let depths = scenario.queue_depths().await?;
    scenario.clean_up(true).await?;

    let rate = comparison.found as f64 / elapsed.as_secs_f64();
    println!("records in the simulator:  {}", comparison.expected);
    println!("rows in {}: {}", scenario.table()?, comparison.found);
    println!(
        "missing: {}, unexpected: {}, wrong version: {}",
        comparison.missing.len(),
        comparison.unexpected.len(),
        comparison.wrong_version.len()
    );
    println!(
        "dead letters: {}",
        depths
            .iter()
            .filter(|(q, _)| q.ends_with(".dlq"))
            .map(|(_, n)| n)
            .sum::<u32>()
    );
    println!(
        "end to end: {:.2} s, {rate:.0} records/s",
        elapsed.as_secs_f64()
    );
    println!(
        "fetcher exited with {fetch_status}; {clean_stops} of {} workers stopped cleanly on SIGTERM",
        workers.len()
    );
    if !comparison.is_exact() || !fetch_status.success() || clean_stops != workers.len() {
        bail!("the demo did not end with exactly the source's records and clean stops");
    }
    println!("ok: the target equals the source");
    Ok(())
}
