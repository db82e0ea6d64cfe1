//! `conveyor-dev bench hosting`: the memory of one process of each worker hosting many pipelines.
//!
//! N copies of a pipeline file (each with a name of its own and the no-op target) are fed by one
//! simulator of M orders. A transformer and a writer that host all N are started, and their resident
//! memory (`VmRSS`) is read once they are ready and idle. Then a fetcher that hosts all N syncs every
//! pipeline while the resident memory of the three is sampled; its peak (`VmHWM`) is the "working"
//! figure, and `VmRSS` a few seconds after the last record was written the "idle after work" one.
//! The queues are classic ones: 21 quorum queues a pipeline outgrow a small broker's file handles.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use conveyor_harness::{Scenario, Services, Worker};
use kingdee_sim::SimConfig;
use serde::Serialize;

use crate::proc::{peak_rss_mib, rss_mib};

#[derive(Debug, clap::Args)]
pub struct HostingArgs {
    /// The pipeline file copied (its source and transform; the target becomes the no-op one).
    #[arg(long, default_value = "ops/pipelines/sales_orders.toml")]
    pipeline: PathBuf,
    /// Pipelines each process hosts.
    #[arg(long, default_value_t = 20)]
    pipelines: usize,
    /// Orders in the simulator, which every pipeline syncs.
    #[arg(long, default_value_t = 2_000)]
    orders: usize,
}

/// Resident memory of one worker process, MiB.
#[derive(Debug, Serialize)]
pub struct WorkerMemory {
    pub worker: &'static str,
    /// Ready and idle, before any work (the fetcher has no such reading: it syncs as it starts).
    pub idle_before_mib: Option<f64>,
    /// The peak while every pipeline was working.
    pub working_peak_mib: f64,
    /// Idle again, a few seconds after the last record was written.
    pub idle_after_mib: f64,
}

/// What `bench hosting` measured.
#[derive(Debug, Serialize)]
pub struct HostingReport {
    pub pipelines: usize,
    pub queue_type: &'static str,
    pub orders_per_pipeline: usize,
    pub records: usize,
    /// From starting the transformer and the writer until both were ready (every pipeline connected
    /// and its topology declared).
    pub ready_seconds: f64,
    /// From starting the fetcher until every record was written.
    pub seconds: f64,
    pub workers: Vec<WorkerMemory>,
}

pub async fn run(args: &HostingArgs, bin_dir: &Path) -> anyhow::Result<HostingReport> {
    if args.pipelines == 0 {
        bail!("--pipelines must be at least 1");
    }
    let services = Services::check().await?;
    let dir = std::env::temp_dir().join(format!("conveyor-bench-hosting-{}", std::process::id()));
    let files = pipeline_files(args, &dir)?;
    let days = (args.orders as i64 * 60 / 86_400) + 5;
    let sim = SimConfig {
        orders: args.orders,
        epoch: kingdee_sim::data::days_ago(days),
        ..SimConfig::default()
    };
    let mut scenario =
        Scenario::start(services, &files[0], bin_dir, "bench_hosting", sim, &[]).await?;
    for file in &files[1..] {
        scenario.add_pipeline(file)?;
    }
    // Classic queues: what is measured is the workers' memory, and 21 quorum queues a pipeline (420
    // for 20) outgrow a small broker's file handles. The workers declare them.
    scenario.set_env("CONVEYOR_QUEUE_TYPE", "classic");
    let result = measure(&scenario, args).await;
    scenario.clean_up(result.is_err()).await?;
    let _ = std::fs::remove_dir_all(&dir);
    result
}

/// Writes the N copies of the pipeline file, each named `bench_hosting_{i}`, with the no-op target.
fn pipeline_files(args: &HostingArgs, dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let text = std::fs::read_to_string(&args.pipeline)
        .with_context(|| format!("reading {}", args.pipeline.display()))?;
    let mut table: toml::Table = toml::from_str(&text)?;
    table.insert(
        "target".into(),
        toml::from_str::<toml::Value>("kind = \"noop\"")?,
    );
    std::fs::create_dir_all(dir)?;
    (0..args.pipelines)
        .map(|i| {
            table.insert("name".into(), format!("bench_hosting_{i}").into());
            let file = dir.join(format!("bench_hosting_{i}.toml"));
            std::fs::write(&file, toml::to_string(&table)?)?;
            Ok(file)
        })
        .collect()
}

async fn measure(scenario: &Scenario, args: &HostingArgs) -> anyhow::Result<HostingReport> {
    let spawned = Instant::now();
    let mut workers = vec![
        scenario.spawn(Worker::Transformer, &[])?,
        scenario.spawn(Worker::Writer, &[])?,
    ];
    // Each pipeline declares its 21 queues as it connects.
    for worker in &workers {
        worker.wait_ready(true, Duration::from_secs(120)).await?;
    }
    let ready_seconds = spawned.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let idle_before: Vec<f64> = workers
        .iter()
        .map(|worker| rss_mib(worker.pid().as_raw()).unwrap_or(0.0))
        .collect();
    let records = args.orders * args.pipelines;
    let started = Instant::now();
    workers.push(scenario.spawn(Worker::Fetcher, &["--interval-secs", "3600"])?);
    let http = conveyor_base::tls::http_client(None)
        .timeout(Duration::from_secs(5))
        .build()?;
    let deadline = started + Duration::from_secs(600);
    loop {
        let written = crate::pipeline::scrape(&http, &workers[1], "write").await;
        if written.is_some_and(|n| n >= records as f64) {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "{records} records were not all written after 600 s; the fetcher's log:\n{}",
                workers[2].log_tail(20)
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let seconds = started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let memory = workers
        .iter()
        .enumerate()
        .map(|(i, worker)| {
            let pid = worker.pid().as_raw();
            WorkerMemory {
                worker: worker.worker.binary(),
                idle_before_mib: idle_before.get(i).copied(),
                working_peak_mib: peak_rss_mib(pid).unwrap_or(0.0),
                idle_after_mib: rss_mib(pid).unwrap_or(0.0),
            }
        })
        .collect();
    conveyor_harness::stop_all(&mut workers).await?;
    Ok(HostingReport {
        pipelines: args.pipelines,
        queue_type: "classic",
        orders_per_pipeline: args.orders,
        records,
        ready_seconds,
        seconds,
        workers: memory,
    })
}
