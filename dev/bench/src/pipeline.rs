//! `conveyor-dev bench pipeline`: the whole pipeline against the simulator with no rate limit, set against
//! two ceilings measured in the same run — the raw broker and the raw target.
//!
//! How each figure is taken:
//! - **drain time, records/s**: from starting the fetcher until the writers' `conveyor_records_out_total`
//!   (scraped from their `/metrics`) reaches the records expected; then the target is checked against
//!   the truth (PostgreSQL: ids and versions; HTTP: the target simulator's ids; noop: the count).
//! - **CPU s per million records**: utime + stime of each worker process (`/proc/<pid>/stat`), summed per
//!   stage, over the process's whole life (start-up included); `simulator` is this process's CPU during
//!   the run, which serves the source (and the HTTP target): not the pipeline's, but on the same cores.
//!   It renders its orders before the clock starts, so that what it spends is serving pages.
//! - **broker CPU s per million records**: utime + stime, during the run, of the RabbitMQ node (every
//!   `beam.smp` process on this machine; none when the broker runs elsewhere): the durability the
//!   pipeline pays for, on the same cores.
//! - **database CPU s per million records**: the same for every `postgres` process (those that exit
//!   during the run drop out): the target's writes, the ledger, the sync state and the call budget.
//! - **peak RSS**: `VmHWM` of `/proc/<pid>/status`, the largest of a stage's processes.
//! - **fetch → write latency**: from the cumulative counts of records fetched (the fetcher's metrics)
//!   and written (the writers'), sampled every 25 ms: the k-th record written is taken to be the k-th
//!   fetched (first in, first out), and its latency is the time between the two curves reaching k.
//! - **raw broker**: one quorum queue, persistent 1 KiB messages published with confirms (up to 1000
//!   outstanding) while a consumer (prefetch 1000) acks every 100th delivery with `multiple`. It is
//!   measured before every run and after the last; a run is set against the mean of the two readings
//!   around it, since this machine's speed drifts by ± 15% over a series.
//! - **raw target** (PostgreSQL only): after each run, the rows it wrote upserted again into fresh
//!   tables by plain SQL, by each of two methods, on as many connections as the run's writers could
//!   hold (writers × `CONVEYOR_PG_POOL_SIZE`) ([`crate::raw_target`]). The run is set against both: the jsonb statement the writer ran before,
//!   and the fastest.
//! - **write stage** (`--write-stage`): the fetcher and the transformer fill the write queue before any
//!   writer starts; records/s is then the writers' drain from the moment all of them serve (less what
//!   they wrote before), the figure to set against the raw target, which has the cores to itself too.
//! - **ledger cost**: `--ledger on,off,off,on` runs each writer count with the ledger on and off, in
//!   the same series; the report gives the mean throughput with it as a share of the mean without.
//! - **a cluster**: `--brokers single,cluster` runs the series on the machine's broker, then on a
//!   three-node cluster of the bench's own on the same cores (started once, its own ports and data),
//!   the raw broker read on the run's broker each time; the report gives, per writer count, the mean
//!   throughput on the cluster as a share of the mean on one node.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use conveyor_harness::own_cluster::OwnCluster;
use conveyor_harness::{Scenario, Services, Worker, WorkerProcess};
use futures_util::StreamExt as _;
use kingdee_sim::SimConfig;
use lapin::BasicProperties;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use serde::Serialize;

use crate::proc::{cpu_seconds, peak_rss_mib};
use crate::raw_target::RawTarget;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TargetKind {
    Postgres,
    Http,
    Noop,
}

#[derive(Debug, clap::Args)]
pub struct PipelineArgs {
    /// The pipeline file (its source and transform; the target is replaced for http and noop).
    #[arg(long, default_value = "ops/pipelines/sales_orders.toml")]
    pipeline: PathBuf,
    /// Records in the simulator.
    #[arg(long, default_value_t = 20_000)]
    orders: usize,
    /// Seed of the simulator's data.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Writer processes, one run per entry (e.g. 1,2,4).
    #[arg(long, value_delimiter = ',', default_value = "1")]
    writers: Vec<usize>,
    /// The target.
    #[arg(long, value_enum, default_value = "postgres")]
    target: TargetKind,
    /// Latency of the HTTP target simulator, milliseconds.
    #[arg(long, default_value_t = 5)]
    http_latency_ms: u64,
    /// The HTTP target's calls in flight per writer (the pipeline setting `concurrency`): 1 models a
    /// target that takes one call at a time from each client, where writers are the bottleneck.
    #[arg(long, default_value_t = 8)]
    http_concurrency: u64,
    /// Records per call to the HTTP target (the pipeline setting `batch_size`).
    #[arg(long, default_value_t = 200)]
    http_batch_size: u64,
    /// The ledger in each run, one run per entry and writer count (e.g. on,off).
    #[arg(long, value_delimiter = ',', default_value = "on", value_parser = ["on", "off"])]
    ledger: Vec<String>,
    /// The broker of each series, one series per entry: `single` (the machine's, CONVEYOR_AMQP_URL)
    /// or `cluster` (three RabbitMQ nodes of the bench's own on this machine, every queue replicated
    /// on each).
    #[arg(long, value_delimiter = ',', default_value = "single", value_parser = ["single", "cluster"])]
    brokers: Vec<String>,
    /// Measure the write stage alone: the fetcher and the transformer fill the write queue first,
    /// then the writers drain it against the clock (set against the raw target on equal terms).
    #[arg(long)]
    write_stage: bool,
    /// Records per batch of the raw target methods (default: one message's, the source's page size).
    #[arg(long)]
    raw_batch_records: Option<usize>,
    /// Messages of the raw broker ceiling.
    #[arg(long, default_value_t = 20_000)]
    broker_messages: usize,
    /// Also write the report here, as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Give up a run after this many seconds.
    #[arg(long, default_value_t = 600)]
    timeout_secs: u64,
}

#[derive(Debug, Serialize)]
pub struct PipelineReport {
    pub target: TargetKind,
    pub records: usize,
    pub seed: u64,
    pub cores: usize,
    /// Every reading of the raw broker ceiling, in order: before each series' first run and after
    /// each run (on that series' broker).
    pub raw_broker_msgs_per_sec: Vec<f64>,
    /// HTTP only: the target simulator's latency and the writers' settings for it.
    pub http: Option<HttpSettings>,
    pub runs: Vec<RunReport>,
    /// With the ledger both on and off: per writer count, the mean records/s with it over the mean
    /// without.
    pub ledger_throughput_share: Vec<(usize, f64)>,
    /// With both brokers: per writer count, the mean records/s on the cluster over the mean on one
    /// node.
    pub cluster_throughput_share: Vec<(usize, f64)>,
}

#[derive(Debug, Serialize)]
pub struct HttpSettings {
    pub latency_ms: u64,
    pub concurrency: u64,
    pub batch_size: u64,
}

#[derive(Debug, Serialize)]
pub struct RunReport {
    /// `single` or `cluster`.
    pub broker: String,
    pub writers: usize,
    pub ledger: bool,
    /// The write stage alone: its queue filled first, the clock from the writers' start.
    pub write_stage: bool,
    pub seconds: f64,
    /// Of `seconds`, the time until the fetcher's first records: its start-up (connecting, the sync
    /// state, the token, the plan) and the first page. A short run pays it in full; it is why more
    /// records give a higher rate.
    pub first_fetch_seconds: f64,
    pub records_per_sec: f64,
    /// The mean of the raw broker readings just before and just after this run.
    pub raw_broker_msgs_per_sec: f64,
    pub ratio_to_raw_broker: f64,
    /// PostgreSQL only: the raw methods on as many connections as writers, records/s.
    pub raw_target: Option<RawTarget>,
    /// Against the jsonb statement the writer ran before.
    pub ratio_to_raw_jsonb_statement: Option<f64>,
    /// Against the fastest raw method.
    pub ratio_to_fastest_raw_target: Option<f64>,
    pub cpu_secs_per_million: StageFigures,
    /// RabbitMQ's CPU during the run, when it runs on this machine.
    pub broker_cpu_secs_per_million: Option<f64>,
    /// PostgreSQL's CPU during the run (its processes alive at the end), when it runs on this
    /// machine: the target's and the ledger's work.
    pub database_cpu_secs_per_million: Option<f64>,
    pub peak_rss_mib: StageFigures,
    pub latency_p50_ms: f64,
    pub latency_p99_ms: f64,
    pub exact: bool,
}

#[derive(Debug, Default, Serialize)]
pub struct StageFigures {
    /// This process: the Kingdee simulator (and the target simulator for http) serving the fetcher,
    /// plus the bench's own sampling. Not part of the pipeline; shown because it shares the cores. Its
    /// CPU is the run's; its peak RSS is the whole bench's so far (each run's simulators
    /// stop with the run, but the allocator may keep the memory they held).
    pub simulator: f64,
    pub fetcher: f64,
    pub transformer: f64,
    pub writer: f64,
}

/// Runs the series with the worker binaries of `bin_dir`.
pub async fn run(args: &PipelineArgs, bin_dir: &Path) -> anyhow::Result<PipelineReport> {
    let single = Services::check().await?;
    // Started when its series comes, so that its idle nodes do not weigh on the runs before it.
    let mut cluster: Option<OwnCluster> = None;
    let ceiling = async |services: &Services, broker: &str| {
        let reading = raw_broker(services, args.broker_messages).await?;
        eprintln!(
            "raw broker, {broker} ({} × 1 KiB): {reading:.0} msgs/s",
            args.broker_messages
        );
        anyhow::Ok(reading)
    };
    let mut report = PipelineReport {
        target: args.target,
        records: args.orders,
        seed: args.seed,
        cores: std::thread::available_parallelism().map_or(1, usize::from),
        raw_broker_msgs_per_sec: Vec::new(),
        http: (args.target == TargetKind::Http).then_some(HttpSettings {
            latency_ms: args.http_latency_ms,
            concurrency: args.http_concurrency,
            batch_size: args.http_batch_size,
        }),
        runs: Vec::new(),
        ledger_throughput_share: Vec::new(),
        cluster_throughput_share: Vec::new(),
    };
    for broker in &args.brokers {
        let services = if broker == "cluster" {
            if cluster.is_none() {
                let started =
                    OwnCluster::start(&format!("bench-{}", std::process::id()), 3).await?;
                eprintln!("a three-node cluster of the bench's own is up");
                cluster = Some(started);
            }
            Services {
                amqp_url: cluster.as_ref().expect("started above").url(),
                ..single.clone()
            }
        } else {
            single.clone()
        };
        report
            .raw_broker_msgs_per_sec
            .push(ceiling(&services, broker).await?);
        for &writers in &args.writers {
            for ledger in &args.ledger {
                let ledger = ledger == "on";
                let mut run = run_once(&services, args, bin_dir, writers, ledger).await?;
                let before = *report.raw_broker_msgs_per_sec.last().expect("read first");
                let after = ceiling(&services, broker).await?;
                report.raw_broker_msgs_per_sec.push(after);
                run.broker = broker.clone();
                run.raw_broker_msgs_per_sec = (before + after) / 2.0;
                run.ratio_to_raw_broker = run.records_per_sec / run.raw_broker_msgs_per_sec;
                eprintln!("{}", serde_json::to_string(&run)?);
                report.runs.push(run);
            }
            // The mean of each setting's runs: `on,off,off,on` cancels a steady drift of the machine.
            let runs = report.runs.iter().rev().take(args.ledger.len());
            let on = mean_speed(runs.clone().filter(|run| run.ledger));
            let off = mean_speed(runs.filter(|run| !run.ledger));
            if let (Some(on), Some(off)) = (on, off) {
                eprintln!(
                    "{writers} writer(s), {broker}: the ledger on runs at {:.2} of off",
                    on / off
                );
                report.ledger_throughput_share.push((writers, on / off));
            }
        }
    }
    for &writers in &args.writers {
        let on = |broker: &str| {
            mean_speed(
                report
                    .runs
                    .iter()
                    .filter(|run| run.writers == writers && run.broker == broker),
            )
        };
        if let (Some(cluster), Some(single)) = (on("cluster"), on("single")) {
            eprintln!(
                "{writers} writer(s): the cluster runs at {:.2} of one node",
                cluster / single
            );
            report
                .cluster_throughput_share
                .push((writers, cluster / single));
        }
    }
    if let Some(file) = &args.json {
        std::fs::write(file, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", file.display()))?;
    }
    Ok(report)
}

/// The mean records/s of `runs`, if there are any.
fn mean_speed<'a>(runs: impl Iterator<Item = &'a RunReport>) -> Option<f64> {
    let speeds: Vec<f64> = runs.map(|run| run.records_per_sec).collect();
    (!speeds.is_empty()).then(|| speeds.iter().sum::<f64>() / speeds.len() as f64)
}

/// Writes the pipeline file the run uses: the given one, its target replaced for http and noop.
fn pipeline_file(args: &PipelineArgs, dir: &Path) -> anyhow::Result<PathBuf> {
    if args.target == TargetKind::Postgres {
        return Ok(args.pipeline.clone());
    }
    let text = std::fs::read_to_string(&args.pipeline)
        .with_context(|| format!("reading {}", args.pipeline.display()))?;
    let mut table: toml::Table = toml::from_str(&text)?;
    let target: toml::Table = match args.target {
        TargetKind::Noop => toml::from_str("kind = \"noop\"")?,
        _ => toml::from_str(&format!(
            "kind = \"http\"\npath = \"/api/records\"\nmethod = \"POST\"\nbody = \"batch\"\n\
             batch_size = {}\nconcurrency = {}",
            args.http_batch_size, args.http_concurrency
        ))?,
    };
    table.insert("target".into(), toml::Value::Table(target));
    std::fs::create_dir_all(dir)?;
    let file = dir.join(format!("bench_{:?}.toml", args.target).to_lowercase());
    std::fs::write(&file, toml::to_string(&table)?)?;
    Ok(file)
}

async fn run_once(
    services: &Services,
    args: &PipelineArgs,
    bin_dir: &Path,
    writers: usize,
    ledger: bool,
) -> anyhow::Result<RunReport> {
    let days = (args.orders as i64 * 60 / 86_400) + 5;
    let sim = SimConfig {
        seed: args.seed,
        orders: args.orders,
        epoch: kingdee_sim::data::days_ago(days),
        ..SimConfig::default()
    };
    let source = [
        ("window_secs", toml::Value::Integer((days + 2) * 86_400)),
        (
            "max_window_rows",
            toml::Value::Integer(args.orders as i64 + 1),
        ),
    ];
    let file = pipeline_file(args, &std::env::temp_dir().join("conveyor-bench-pipeline"))?;
    let scenario = Scenario::start(
        services.clone(),
        &file,
        bin_dir,
        "bench_pipeline",
        sim,
        &source,
    )
    .await?;
    let http_sim = match args.target {
        TargetKind::Http => {
            let sim = target_sim::TargetSim::new(target_sim::TargetConfig {
                key_field: scenario.pipeline.mapping.key_field().to_owned(),
                version_field: Some(scenario.pipeline.mapping.version_field().to_owned()),
                latency: Duration::from_millis(args.http_latency_ms),
                ..target_sim::TargetConfig::default()
            });
            // Served until this run ends, so that the next run does not find it holding these records.
            let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await?;
            let url = format!("http://{}", listener.local_addr()?);
            let server = tokio_util::task::AbortOnDropHandle::new(tokio::spawn(target_sim::serve(
                sim.clone(),
                listener,
            )));
            Some((sim, url, server))
        }
        _ => None,
    };
    let mut env = vec![("CONVEYOR_LEDGER", if ledger { "on" } else { "off" })];
    if let Some((_, url, _)) = &http_sim {
        env.push(("CONVEYOR_HTTP_TARGET_URL", url.as_str()));
    }
    let result = measure(
        &scenario,
        args,
        writers,
        &env,
        http_sim.as_ref().map(|(sim, _, _)| sim),
    )
    .await;
    let keep = result.is_err();
    if keep {
        eprintln!("logs kept; schema {} kept", scenario.schema);
    }
    scenario.clean_up(keep).await?;
    result
}

async fn measure(
    scenario: &Scenario,
    args: &PipelineArgs,
    writers: usize,
    env: &[(&str, &str)],
    http_sim: Option<&std::sync::Arc<target_sim::TargetSim>>,
) -> anyhow::Result<RunReport> {
    scenario.declare_topology().await?;
    let expected = scenario.expected_records().len();
    scenario.simulator.render_orders();
    let http = conveyor_base::tls::http_client(None)
        .timeout(Duration::from_secs(2))
        .build()?;
    let mut workers = vec![scenario.spawn_with_env(Worker::Transformer, &[], env)?];
    let mut samples = Samples::default();
    // With --write-stage, the write queue is filled before any writer starts and before the clock.
    let mut fetcher = None;
    if args.write_stage {
        wait_serving(&http, &workers).await?;
        let filler = scenario.spawn_with_env(Worker::Fetcher, &["--once"], env)?;
        samples.register(&filler);
        samples.register(&workers[0]);
        let deadline = Instant::now() + Duration::from_secs(args.timeout_secs);
        while scrape(&http, &workers[0], "transform").await.unwrap_or(0.0) < expected as f64 {
            if Instant::now() > deadline {
                bail!(
                    "the write queue was not filled:\n{}",
                    workers[0].log_tail(20)
                );
            }
            samples.take_all();
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        fetcher = Some(filler);
    }
    for _ in 0..writers {
        workers.push(scenario.spawn_with_env(Worker::Writer, &[], env)?);
    }
    wait_serving(&http, &workers).await?;
    for worker in &workers {
        samples.register(worker);
    }
    let started = Instant::now();
    let own_cpu_before = cpu_seconds(std::process::id() as i32).unwrap_or(0.0);
    let broker_cpu_before = local_broker_cpu_seconds();
    let database_cpu_before = local_cpu_seconds("postgres");
    let mut fetcher = match fetcher {
        Some(filler) => filler,
        None => scenario.spawn_with_env(Worker::Fetcher, &["--once"], env)?,
    };
    samples.register(&fetcher);
    // Written before the clock started (writers consume from the moment they are set up).
    let mut written_before = None;
    let mut fetched_curve: Vec<(f64, f64)> = vec![(0.0, 0.0)];
    let mut written_curve: Vec<(f64, f64)> = vec![(0.0, 0.0)];
    let mut fetched = 0.0_f64;
    let timeout = Duration::from_secs(args.timeout_secs);
    let seconds = loop {
        let now = started.elapsed().as_secs_f64();
        if let Some(n) = scrape(&http, &fetcher, "fetch").await {
            fetched = fetched.max(n);
        }
        let mut written = 0.0;
        for worker in workers.iter().filter(|w| w.worker == Worker::Writer) {
            written += scrape(&http, worker, "write").await.unwrap_or(0.0);
        }
        written_before.get_or_insert(if args.write_stage { written } else { 0.0 });
        fetched_curve.push((now, fetched));
        written_curve.push((now, written));
        samples.take_all();
        if written >= expected as f64 {
            break started.elapsed().as_secs_f64();
        }
        if started.elapsed() > timeout {
            bail!("{written} of {expected} records written after {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    };
    samples.take_all();
    let own_cpu = cpu_seconds(std::process::id() as i32).unwrap_or(0.0) - own_cpu_before;
    let broker_cpu = local_broker_cpu_seconds()
        .zip(broker_cpu_before)
        .map(|(after, before)| after - before);
    let database_cpu = local_cpu_seconds("postgres")
        .zip(database_cpu_before)
        .map(|(after, before)| after - before);
    let fetch_status = fetcher.wait(Duration::from_secs(60)).await?;
    conveyor_harness::stop_all(&mut workers).await?;
    if !fetch_status.success() {
        bail!("the fetcher failed:\n{}", fetcher.log_tail(20));
    }
    // The correctness check: the target equals the truth.
    let exact = match args.target {
        TargetKind::Postgres => scenario.compare_with_truth().await?.is_exact(),
        TargetKind::Http => {
            let held = http_sim
                .map(|sim| sim.records("records"))
                .unwrap_or_default();
            let truth = scenario.expected_records();
            held.len() == truth.len() && truth.iter().all(|r| held.contains_key(&r.id))
        }
        TargetKind::Noop => written_curve.last().map(|(_, n)| *n as usize) == Some(expected),
    };
    if !exact {
        bail!("the target does not equal the truth after the run");
    }
    // The raw methods get as many connections as the writers could hold.
    let pool_size = std::env::var("CONVEYOR_PG_POOL_SIZE")
        .ok()
        .and_then(|size| size.parse().ok())
        .unwrap_or(conveyor_postgres::DEFAULT_POOL_SIZE);
    let raw_target = match args.target {
        TargetKind::Postgres => Some(
            crate::raw_target::measure(scenario, writers * pool_size, args.raw_batch_records)
                .await?,
        ),
        _ => None,
    };
    let records_per_sec = (expected as f64 - written_before.unwrap_or(0.0)) / seconds;
    let million = expected as f64 / 1e6;
    let (p50, p99) = if args.write_stage {
        (f64::NAN, f64::NAN)
    } else {
        latencies(&fetched_curve, &written_curve, expected)
    };
    let first_fetch_seconds = fetched_curve
        .iter()
        .find(|(_, fetched)| *fetched > 0.0)
        .map_or(seconds, |(at, _)| *at);
    let ledger = env.contains(&("CONVEYOR_LEDGER", "on"));
    Ok(RunReport {
        broker: String::new(),
        writers,
        ledger,
        write_stage: args.write_stage,
        seconds,
        first_fetch_seconds,
        records_per_sec,
        // Set by the caller, against the ceiling read around the run.
        raw_broker_msgs_per_sec: f64::NAN,
        ratio_to_raw_broker: f64::NAN,
        raw_target,
        ratio_to_raw_jsonb_statement: raw_target.map(|raw| records_per_sec / raw.jsonb_statement),
        ratio_to_fastest_raw_target: raw_target.map(|raw| records_per_sec / raw.fastest()),
        cpu_secs_per_million: StageFigures {
            simulator: own_cpu / million,
            fetcher: samples.cpu(Worker::Fetcher) / million,
            transformer: samples.cpu(Worker::Transformer) / million,
            writer: samples.cpu(Worker::Writer) / million,
        },
        broker_cpu_secs_per_million: broker_cpu.map(|cpu| cpu / million),
        database_cpu_secs_per_million: database_cpu.map(|cpu| cpu / million),
        peak_rss_mib: StageFigures {
            simulator: peak_rss_mib(std::process::id() as i32).unwrap_or(0.0),
            fetcher: samples.rss(Worker::Fetcher),
            transformer: samples.rss(Worker::Transformer),
            writer: samples.rss(Worker::Writer),
        },
        latency_p50_ms: p50 * 1000.0,
        latency_p99_ms: p99 * 1000.0,
        exact,
    })
}

/// Waits until every worker serves its metrics (it is connected and set up).
async fn wait_serving(http: &reqwest::Client, workers: &[WorkerProcess]) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    for worker in workers {
        while scrape(http, worker, "write").await.is_none() {
            if Instant::now() > deadline {
                bail!(
                    "{} did not start:\n{}",
                    worker.worker.binary(),
                    worker.log_tail(20)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    Ok(())
}

/// The worker's `conveyor_records_out_total` for `stage`, or None while it does not answer.
pub(crate) async fn scrape(
    http: &reqwest::Client,
    worker: &WorkerProcess,
    stage: &str,
) -> Option<f64> {
    let text = http
        .get(format!("http://{}/metrics", worker.http_addr))
        .send()
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    let label = format!("stage=\"{stage}\"");
    Some(
        text.lines()
            .filter(|line| line.starts_with("conveyor_records_out_total{") && line.contains(&label))
            .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
            .sum(),
    )
}

/// The last CPU and peak memory readings of each process, by pid.
#[derive(Default)]
struct Samples {
    by_pid: std::collections::HashMap<i32, (Worker, f64, f64)>,
}

impl Samples {
    /// Notes a process just started (its pid is known only while it runs).
    fn register(&mut self, worker: &WorkerProcess) -> i32 {
        let pid = worker.pid().as_raw();
        self.by_pid.insert(pid, (worker.worker, 0.0, 0.0));
        pid
    }

    /// Reads every registered process (a finished one keeps its last reading).
    fn take_all(&mut self) {
        for (pid, entry) in &mut self.by_pid {
            Self::take(*pid, entry);
        }
    }

    fn take(pid: i32, entry: &mut (Worker, f64, f64)) {
        if let Some(cpu) = cpu_seconds(pid) {
            entry.1 = entry.1.max(cpu);
        }
        if let Some(rss) = peak_rss_mib(pid) {
            entry.2 = entry.2.max(rss);
        }
    }

    fn cpu(&self, worker: Worker) -> f64 {
        self.by_pid
            .values()
            .filter(|v| v.0 == worker)
            .map(|v| v.1)
            .sum()
    }

    fn rss(&self, worker: Worker) -> f64 {
        self.by_pid
            .values()
            .filter(|v| v.0 == worker)
            .map(|v| v.2)
            .fold(0.0, f64::max)
    }
}

/// CPU seconds of the RabbitMQ node(s) on this machine (`beam.smp` processes), if there are any.
fn local_broker_cpu_seconds() -> Option<f64> {
    local_cpu_seconds("beam.smp")
}

/// utime + stime of every process of this machine named `name` (`comm`), if any runs here.
fn local_cpu_seconds(name: &str) -> Option<f64> {
    let mut total = None;
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse().ok()) else {
            continue;
        };
        let comm = std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
        if comm.trim_end() == name
            && let Some(cpu) = cpu_seconds(pid)
        {
            *total.get_or_insert(0.0) += cpu;
        }
    }
    total
}

/// When a cumulative count first reached `k` (linear between samples).
fn time_at(curve: &[(f64, f64)], k: f64) -> Option<f64> {
    let i = curve.iter().position(|&(_, n)| n >= k)?;
    if i == 0 {
        return Some(curve[0].0);
    }
    let (t0, n0) = curve[i - 1];
    let (t1, n1) = curve[i];
    Some(t0 + (t1 - t0) * (k - n0) / (n1 - n0).max(f64::EPSILON))
}

/// p50 and p99 of fetch → write latency, seconds (first in, first out between the two curves).
fn latencies(fetched: &[(f64, f64)], written: &[(f64, f64)], records: usize) -> (f64, f64) {
    let step = (records / 1000).max(1);
    let mut latency: Vec<f64> = (1..=records)
        .step_by(step)
        .filter_map(|k| {
            let k = k as f64;
            Some((time_at(written, k)? - time_at(fetched, k)?).max(0.0))
        })
        .collect();
    latency.sort_by(f64::total_cmp);
    let at = |q: f64| {
        latency
            .get(((latency.len() as f64 * q) as usize).min(latency.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0.0)
    };
    (at(0.50), at(0.99))
}

/// The raw broker: publish-with-confirms and consume-with-acks over one quorum queue, 1 KiB messages.
async fn raw_broker(services: &Services, messages: usize) -> anyhow::Result<f64> {
    let connection = conveyor_amqp::connect(&services.broker()?, "conveyor-bench-raw").await?;
    let queue = format!("conveyor-bench-raw-{}", std::process::id());
    let publish = connection.create_channel().await?;
    let mut arguments = FieldTable::default();
    arguments.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    publish
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            arguments,
        )
        .await?;
    publish
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let consume = connection.create_channel().await?;
    consume.basic_qos(1000, BasicQosOptions::default()).await?;
    let mut consumer = consume
        .basic_consume(
            queue.as_str().into(),
            "raw".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let started = Instant::now();
    let consuming = tokio::spawn(async move {
        let mut received = 0;
        while received < messages {
            let Some(delivery) = consumer.next().await else {
                bail!("the raw consumer stopped after {received} messages");
            };
            let delivery = delivery?;
            received += 1;
            if received % 100 == 0 || received == messages {
                delivery
                    .acker
                    .ack(BasicAckOptions { multiple: true })
                    .await?;
            }
        }
        anyhow::Ok(consumer)
    });
    let body = vec![b'x'; 1024];
    let mut outstanding = VecDeque::new();
    for _ in 0..messages {
        if outstanding.len() >= 1000
            && let Some(confirm) = outstanding.pop_front()
        {
            confirm.await?;
        }
        let confirm = publish
            .basic_publish(
                "".into(),
                queue.as_str().into(),
                BasicPublishOptions::default(),
                &body,
                BasicProperties::default().with_delivery_mode(2),
            )
            .await?;
        outstanding.push_back(confirm);
    }
    for confirm in outstanding {
        confirm.await?;
    }
    let consumer = consuming.await??;
    let seconds = started.elapsed().as_secs_f64();
    // Cancel the consumer, then close its channel, then delete the queue: a consumer dropped while
    // still active cancels itself in the background, which can meet the channel closing; a queue
    // deleted under a live consumer cancels it from the broker's side, an unexpected frame.
    consume
        .basic_cancel("raw".into(), BasicCancelOptions::default())
        .await?;
    drop(consumer);
    consume.close(200, "done".into()).await?;
    publish
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await?;
    conveyor_amqp::close(&connection).await;
    Ok(messages as f64 / seconds)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_is_the_gap_between_the_curves_first_in_first_out() {
        // 100 records fetched at t = 0..1 s, each written 0.2 s after it was fetched.
        let fetched = [(0.0, 0.0), (1.0, 100.0)];
        let written = [(0.0, 0.0), (0.2, 0.0), (1.2, 100.0)];
        let (p50, p99) = latencies(&fetched, &written, 100);
        assert!((p50 - 0.2).abs() < 1e-9, "p50 {p50}");
        assert!((p99 - 0.2).abs() < 1e-9, "p99 {p99}");
    }

    #[test]
    fn a_count_is_reached_between_two_samples() {
        let curve = [(0.0, 0.0), (1.0, 10.0), (2.0, 30.0)];
        assert_eq!(time_at(&curve, 20.0), Some(1.5));
        assert_eq!(time_at(&curve, 31.0), None);
    }

    #[test]
    fn this_process_has_cpu_time_and_a_peak_rss() {
        let pid = std::process::id() as i32;
        assert!(cpu_seconds(pid).is_some_and(|cpu| cpu >= 0.0));
        assert!(peak_rss_mib(pid).is_some_and(|rss| rss > 0.0));
    }
}
