//! A worker process hosting one pipeline or many: it loads every pipeline file at start (one bad file
//! refuses the start, naming it), serves one `/metrics`, `/healthz` and `/readyz` for all of them, and
//! runs each pipeline as a task of its own, on a broker connection of its own, so that a pipeline whose
//! target is down holds back only itself.
//!
//! Settings for one pipeline alone: any setting's variable with the suffix `__{PIPELINE}` (the
//! pipeline's name in capitals, `-` as `_`) wins over the variable itself for that pipeline, e.g.
//! `CONVEYOR_HTTP_TARGET_TOKEN_FILE__SALES_ORDER_LINES_HTTP`. The process's own settings (the broker,
//! the namespace, the health address, logs) are the same for all.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::future::Future;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use conveyor_base::Stage;
use conveyor_base::backoff::{Backoff, sleep_unless_cancelled};
use conveyor_base::metrics::Metrics;
use conveyor_base::waiting::REPORT_EVERY;
use conveyor_ledger::PgLedger;
use conveyor_pipeline::Pipeline;
use conveyor_postgres::{Database, Unusable};
use futures_util::FutureExt;
use futures_util::future::{BoxFuture, join_all};
use tokio_util::sync::CancellationToken;

use crate::health::{self, HostReadiness, Readiness};
use crate::refusal;
use crate::settings::WorkerArgs;
use crate::worker::{READY_BROKER, WorkerRuntime};

/// A started worker process: its pipelines loaded, its health endpoints served.
pub struct Host {
    stage: Stage,
    pipelines: Vec<(Pipeline, Readiness)>,
    metrics: Metrics,
    http_addr: SocketAddr,
    args: WorkerArgs,
    /// The ledger every pipeline of the process records in (none when switched off).
    ledger: Option<PgLedger>,
}

impl Host {
    /// Loads the pipelines, serves the health endpoints (not ready until each pipeline is
    /// connected) and waits for PostgreSQL if the process uses it; `None` if `shutdown` came first.
    /// `extra_ready` names further readiness conditions each pipeline will report (e.g. its target).
    pub fn start<'a>(
        args: &'a WorkerArgs,
        stage: Stage,
        default_port: u16,
        extra_ready: &'a [&'static str],
        shutdown: &'a CancellationToken,
    ) -> BoxFuture<'a, anyhow::Result<Option<Self>>> {
        // Boxed, so that the start is compiled here once (docs/development.md, "Build time").
        Self::started(args, stage, default_port, extra_ready, shutdown).boxed()
    }

    async fn started(
        args: &WorkerArgs,
        stage: Stage,
        default_port: u16,
        extra_ready: &[&'static str],
        shutdown: &CancellationToken,
    ) -> anyhow::Result<Option<Self>> {
        let mut files_by_name = BTreeMap::new();
        let metrics = Metrics::new();
        let mut pipelines = Vec::new();
        for file in args.pipeline_files()? {
            let pipeline = Pipeline::load(&file)?;
            if let Some(other) = files_by_name.insert(pipeline.name().to_owned(), file.clone()) {
                anyhow::bail!(
                    "pipeline file {}: pipeline {:?} is in {} already: each pipeline runs once per process",
                    file.display(),
                    pipeline.name(),
                    other.display()
                );
            }
            metrics.initialize(pipeline.name(), stage);
            let readiness = Readiness::default();
            readiness.require(READY_BROKER);
            for condition in extra_ready {
                readiness.require(condition);
            }
            readiness.attach_gauge(
                metrics
                    .ready
                    .with_label_values(&[pipeline.name(), stage.as_str()]),
            );
            pipelines.push((pipeline, readiness));
        }
        // A wrong broker URL or TLS file is named now, before any other work starts.
        conveyor_amqp::endpoint(args.broker.address()?.url())?;
        let host_readiness = HostReadiness::new(
            pipelines
                .iter()
                .map(|(pipeline, readiness)| (pipeline.name().to_owned(), readiness.clone()))
                .collect(),
        );
        let addr = args.http_addr_or(default_port);
        let http_addr = health::serve(addr, metrics.clone(), host_readiness, shutdown.clone())
            .await
            .with_context(|| format!("binding the health endpoint on {addr}"))?;
        // PostgreSQL, where the process uses it, is waited for like the broker: not ready meanwhile.
        let postgres = &args.postgres;
        if postgres.pg_url.is_some() || postgres.pg_url_file.is_some() {
            let database = Database::connect(postgres)?;
            let readiness: Vec<_> = pipelines.iter().map(|(_, r)| r.clone()).collect();
            if !wait_for_database(&database, &readiness, shutdown).await? {
                return Ok(None);
            }
        }
        // A ledger that cannot be kept stops the start: the workers ack nothing they could not record.
        let ledger = conveyor_ledger::open(&args.ledger, &args.postgres).await?;
        Ok(Some(Self {
            stage,
            pipelines,
            metrics,
            http_addr,
            args: args.clone(),
            ledger,
        }))
    }

    /// Runs `work` for every pipeline at once, each with its [`WorkerRuntime`] and its settings `C`
    /// (the command line, with the pipeline's own settings: see the module's doc), until all of them
    /// return. The settings of every pipeline are read before any work starts. When one pipeline's
    /// work fails, the others are stopped, and the error names the pipeline.
    pub async fn run<C, W, F>(&self, shutdown: &CancellationToken, work: W) -> anyhow::Result<()>
    where
        C: clap::Parser,
        W: Fn(WorkerRuntime, C, CancellationToken) -> F,
        F: Future<Output = anyhow::Result<()>>,
    {
        let mut settings = Vec::new();
        for (pipeline, _) in &self.pipelines {
            let read = settings_for::<C>(pipeline.name(), std::env::args_os(), |name| {
                std::env::var_os(name)
            })
            .map_err(|err| anyhow::anyhow!("pipeline {}: {err}", pipeline.name()))?;
            settings.push(read);
        }
        let mut settings = settings.into_iter();
        self.run_each(shutdown, |runtime, stopping| {
            let settings = settings
                .next()
                .expect("settings were read for every pipeline");
            work(runtime, settings, stopping)
        })
        .await?;
        Ok(())
    }

    /// Runs `work` for every pipeline at once, in the order of their files, until all of them return;
    /// returns what each returned. When one pipeline's work fails, the others are stopped, and the
    /// error names the pipeline.
    pub async fn run_each<T, W, F>(
        &self,
        shutdown: &CancellationToken,
        mut work: W,
    ) -> anyhow::Result<Vec<T>>
    where
        W: FnMut(WorkerRuntime, CancellationToken) -> F,
        F: Future<Output = anyhow::Result<T>>,
    {
        let stopping = shutdown.child_token();
        let tasks: Vec<_> = self
            .pipelines
            .iter()
            .map(|(pipeline, readiness)| {
                let runtime = WorkerRuntime::new(
                    pipeline.clone(),
                    self.stage,
                    self.metrics.clone(),
                    readiness.clone(),
                    self.http_addr,
                    &self.args,
                    self.ledger.as_ref(),
                );
                let stopping = stopping.clone();
                let running = work(runtime, stopping.clone());
                let name = pipeline.name().to_owned();
                async move {
                    let result = running.await;
                    if result.is_err() {
                        stopping.cancel();
                    }
                    result.with_context(|| format!("pipeline {name}"))
                }
            })
            .collect();
        join_all(tasks).await.into_iter().collect()
    }

    /// Where the health endpoints are served.
    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }
}

/// Readiness condition: PostgreSQL answers and takes the credentials (checked at start).
pub const READY_DATABASE: &str = "database";

/// The pauses between connection attempts to a database that does not answer.
const DATABASE_RETRY: Backoff = Backoff::new(Duration::from_millis(250), Duration::from_secs(5));

/// Waits until `database` takes a connection, each pipeline's `database` condition saying why not
/// meanwhile: one that does not answer is tried again (WARN, every 30 s at most), one that refuses
/// the credentials too, less often (one ERROR). A certificate not trusted stops the start.
/// `false` if `shutdown` came first.
async fn wait_for_database(
    database: &Database,
    readiness: &[Readiness],
    shutdown: &CancellationToken,
) -> anyhow::Result<bool> {
    for one in readiness {
        one.require(READY_DATABASE);
    }
    let mut reported: Option<Instant> = None;
    let (mut unreachable, mut refusals) = (0, 0);
    loop {
        let (why, pause) = match database.check().await {
            Ok(()) => {
                if reported.is_some() {
                    tracing::info!(database = database.endpoint, "PostgreSQL answers");
                }
                for one in readiness {
                    one.set(READY_DATABASE, true);
                }
                return Ok(true);
            }
            Err(Unusable::Misconfigured(err)) => return Err(err.into()),
            Err(Unusable::Refused(err)) => {
                if refusals == 0 {
                    tracing::error!(error = %err, "PostgreSQL refuses the credentials (the user, password or database name): not ready; trying again every minute at most");
                }
                reported.get_or_insert_with(Instant::now);
                refusals += 1;
                (
                    format!("refused: {err}"),
                    refusal::CHECKS.delay(refusals - 1),
                )
            }
            Err(Unusable::Unreachable(err)) => {
                if reported.is_none_or(|at| at.elapsed() >= REPORT_EVERY) {
                    tracing::warn!(error = %err, "PostgreSQL does not answer: not ready; trying again");
                    reported = Some(Instant::now());
                }
                unreachable += 1;
                (err.to_string(), DATABASE_RETRY.delay(unreachable - 1))
            }
        };
        for one in readiness {
            one.wait(READY_DATABASE, why.clone());
        }
        if !sleep_unless_cancelled(pause, shutdown).await {
            return Ok(false);
        }
    }
}

/// The suffix of a setting's variable that gives it for `pipeline` alone.
pub fn pipeline_suffix(pipeline: &str) -> String {
    format!("__{}", pipeline.to_ascii_uppercase().replace('-', "_"))
}

/// The command line `argv` read as `C`, with every setting that `env` gives for `pipeline` alone
/// (`{VARIABLE}__{PIPELINE}`) taking the place of the process-wide value.
fn settings_for<C: clap::Parser>(
    pipeline: &str,
    argv: impl IntoIterator<Item = OsString>,
    env: impl Fn(&str) -> Option<OsString>,
) -> Result<C, clap::Error> {
    let suffix = pipeline_suffix(pipeline);
    let mut argv: Vec<OsString> = argv.into_iter().collect();
    let command = C::command().args_override_self(true);
    for arg in command.get_arguments() {
        let (Some(variable), Some(long)) = (arg.get_env(), arg.get_long()) else {
            continue;
        };
        if !arg.get_action().takes_values() {
            continue;
        }
        if let Some(value) = env(&format!("{}{suffix}", variable.to_string_lossy())) {
            let mut flag = OsString::from(format!("--{long}="));
            flag.push(value);
            argv.push(flag);
        }
    }
    let mut matches = command.try_get_matches_from(argv)?;
    C::from_arg_matches_mut(&mut matches)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, clap::Parser)]
    struct Cli {
        #[arg(long, env = "CONVEYOR_TEST_TARGET_URL")]
        target_url: Option<String>,
        #[arg(long, env = "CONVEYOR_TEST_BATCH", default_value_t = 1)]
        batch: u32,
    }

    #[test]
    fn a_pipeline_s_own_settings_win_over_the_process_s() {
        let argv = ["worker", "--batch", "5"].map(OsString::from);
        let env = |name: &str| {
            (name == "CONVEYOR_TEST_TARGET_URL__SALES_ORDER_LINES").then(|| "http://lines".into())
        };
        let lines: Cli = settings_for("sales-order_lines", argv.clone(), env).unwrap();
        assert_eq!(lines.target_url.as_deref(), Some("http://lines"));
        assert_eq!(lines.batch, 5);
        let orders: Cli = settings_for("orders", argv, env).unwrap();
        assert_eq!(orders.target_url, None);

        let batch = |name: &str| (name == "CONVEYOR_TEST_BATCH__ORDERS").then(|| "7".into());
        let orders: Cli = settings_for(
            "orders",
            ["worker", "--batch", "5"].map(OsString::from),
            batch,
        )
        .unwrap();
        assert_eq!(orders.batch, 7, "the pipeline's setting wins over the flag");
        let bad = |name: &str| (name == "CONVEYOR_TEST_BATCH__ORDERS").then(|| "many".into());
        let err = settings_for::<Cli>("orders", ["worker"].map(OsString::from), bad).unwrap_err();
        assert!(err.to_string().contains("--batch"), "{err}");
    }
}
