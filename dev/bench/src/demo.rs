//! `conveyor-dev demo`: the whole pipeline on this machine — the simulator with its sales orders, the
//! fetcher, the transformer and writers as real processes, RabbitMQ and PostgreSQL — then a summary
//! and a clean stop.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use conveyor_harness::{Scenario, Services, Worker};
use kingdee_sim::SimConfig;

#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// The pipeline file to run.
    #[arg(long, default_value = "ops/pipelines/sales_orders.toml")]
    pub pipeline: PathBuf,
    /// Sales orders in the simulator.
    #[arg(long, default_value_t = 10_000)]
    pub orders: usize,
    /// Seed of the simulator's data.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Writer processes.
    #[arg(long, default_value_t = 2)]
    pub writers: usize,
    /// PostgreSQL schema the records land in (reset at the start, kept afterwards for a look).
    #[arg(long, default_value = "conveyor_demo")]
    pub schema: String,
    /// Prefix of the demo's exchanges and queues (deleted at the end), so that a demo never meets
    /// another pipeline's messages.
    #[arg(long, default_value = "conveyor-demo")]
    pub namespace: String,
    /// Give up if the records have not all landed after this many seconds.
    #[arg(long, default_value_t = 300)]
    pub timeout_secs: u64,
}

/// How the demo ended: what landed against the truth, and how the workers stopped.
#[derive(Debug)]
pub struct DemoReport {
    pub expected: usize,
    pub table: String,
    pub found: usize,
    pub missing: usize,
    pub unexpected: usize,
    pub wrong_version: usize,
    /// The target holds exactly the truth's ids, each at its version.
    pub exact: bool,
    pub dead_letters: u32,
    pub elapsed: Duration,
    pub fetcher_exit: std::process::ExitStatus,
    pub clean_stops: usize,
    pub workers: usize,
    /// `psql` arguments reaching the demo's database (no password: PostgreSQL asks for one).
    pub psql: String,
    pub schema: String,
    pub pipeline: String,
}

impl DemoReport {
    /// Exactly the source's records landed, and every process stopped cleanly.
    pub fn is_ok(&self) -> bool {
        self.exact && self.fetcher_exit.success() && self.clean_stops == self.workers
    }
}

impl fmt::Display for DemoReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let seconds = self.elapsed.as_secs_f64();
        writeln!(f, "records in the simulator:  {}", self.expected)?;
        writeln!(f, "rows in {}: {}", self.table, self.found)?;
        writeln!(
            f,
            "missing: {}, unexpected: {}, wrong version: {}",
            self.missing, self.unexpected, self.wrong_version
        )?;
        writeln!(f, "dead letters: {}", self.dead_letters)?;
        writeln!(
            f,
            "end to end: {seconds:.2} s, {:.0} records/s",
            self.found as f64 / seconds
        )?;
        writeln!(
            f,
            "fetcher exited with {}; {} of {} workers stopped cleanly on SIGTERM",
            self.fetcher_exit, self.clean_stops, self.workers
        )?;
        if self.is_ok() {
            writeln!(f, "ok: the target equals the source")?;
            writeln!(f)?;
            writeln!(f, "next:")?;
            writeln!(
                f,
                "  look at the rows:     psql {} -c 'SELECT id, bill_no, total_amount, modify_time FROM {} LIMIT 5'",
                self.psql, self.table
            )?;
            writeln!(
                f,
                "  what each stage did:  psql {} -c 'SELECT stage, sum(records_in), sum(written), sum(dead_lettered) FROM {}.conveyor_ledger_settled GROUP BY stage'",
                self.psql, self.schema
            )?;
            writeln!(
                f,
                "  with workers running: conveyorctl status {} (reads this ledger and the workers' /metrics)",
                self.pipeline
            )?;
            writeln!(
                f,
                "  the walkthrough:      README.md, \"Quick start\" and on; settings: docs/settings.md"
            )?;
            write!(
                f,
                "  operating it:         ops/RUNBOOK.md (containers: docker-compose.yml)"
            )
        } else {
            write!(
                f,
                "failed: the demo did not end with exactly the source's records and clean stops"
            )
        }
    }
}

/// Runs the demo with the worker binaries of `bin_dir`.
pub async fn run(args: &DemoArgs, bin_dir: &Path) -> anyhow::Result<DemoReport> {
    let services = Services::check().await?;
    let sim = SimConfig {
        seed: args.seed,
        orders: args.orders,
        ..SimConfig::default()
    };
    let scenario = Scenario::start_named(
        services,
        &args.pipeline,
        bin_dir,
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

    Ok(DemoReport {
        expected: comparison.expected,
        table: scenario.table()?,
        found: comparison.found,
        missing: comparison.missing.len(),
        unexpected: comparison.unexpected.len(),
        wrong_version: comparison.wrong_version.len(),
        exact: comparison.is_exact(),
        dead_letters: depths
            .iter()
            .filter(|(queue, _)| queue.ends_with(".dlq"))
            .map(|(_, n)| n)
            .sum(),
        elapsed,
        psql: psql_arguments(scenario.services.pg_url.expose())?,
        schema: args.schema.clone(),
        pipeline: scenario.pipeline.name().to_owned(),
        fetcher_exit: fetch_status,
        clean_stops,
        workers: workers.len(),
    })
}

/// `-h HOST -p PORT -U USER DBNAME` of a PostgreSQL URL: what `psql` needs, without the password.
fn psql_arguments(url: &str) -> anyhow::Result<String> {
    let config: tokio_postgres::Config = url.parse()?;
    let host = match config.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(host)) => host.clone(),
        Some(tokio_postgres::config::Host::Unix(path)) => path.display().to_string(),
        None => "127.0.0.1".to_owned(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    Ok(format!(
        "-h {host} -p {port} -U {} {}",
        config.get_user().unwrap_or("postgres"),
        config.get_dbname().unwrap_or("postgres")
    ))
}
