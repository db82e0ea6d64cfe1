//! The fetcher: syncs records from the pipeline's source into its transform queue.
//!
//! - `engine`: the generic sync engine over any [`Source`](conveyor_base::source::Source) — windows,
//!   the steady-pass check, pages gathered into messages, the watermark.
//! - [`serve`]: the engine run for one pipeline through every broker session.
//! - [`state`]: the shared, durable sync state in PostgreSQL.
//! - [`budget`]: the call budget shared by every fetcher of an account set, adapting to throttling.
//! - [`session`]: the source's login, shared by every fetcher of an account set.
//! - [`run`]: the process and its pipelines; [`with_source`]: the one match that builds a pipeline's
//!   source by kind (for the sync and for `conveyorctl reconcile`); [`resync`]: windows handed out again.

pub mod budget;
mod engine;
mod pass;
pub mod rows;
pub mod serve;
pub mod session;
pub mod settings;
pub mod state;
pub mod window;

use std::sync::Arc;
use std::time::Duration;

use conveyor_base::Stage;
use conveyor_base::metrics::Metrics;
use conveyor_base::source::Source;
use conveyor_kingdee::{Gateway, KingdeeArgs, KingdeeSource};
use conveyor_pipeline::source::SourceKind;
use conveyor_postgres::Database;
use conveyor_runtime::host::Host;
use conveyor_runtime::settings::WorkerArgs;
use conveyor_runtime::worker::WorkerRuntime;
use tokio_util::sync::CancellationToken;

use crate::budget::SharedBudget;
use crate::serve::RunOptions;
use crate::session::SessionTable;
use crate::settings::SyncSettings;
use crate::state::SyncStore;

/// The fetcher's command line (every flag also reads an environment variable).
#[derive(Debug, clap::Parser)]
#[command(
    name = "conveyor-fetcher",
    version,
    about = "Syncs records from the source into the pipeline"
)]
pub struct Cli {
    #[command(flatten)]
    pub worker: WorkerArgs,
    #[command(flatten)]
    pub kingdee: KingdeeArgs,
    /// Sync up to now (less the lag), print a summary and exit.
    #[arg(long)]
    pub once: bool,
    /// Seconds between plans of new windows when not --once.
    #[arg(long, env = "CONVEYOR_FETCH_INTERVAL_SECS", default_value_t = 60)]
    pub interval_secs: u64,
    /// Windows this process pages at once.
    #[arg(long, env = "CONVEYOR_FETCH_CONCURRENCY", default_value_t = 2)]
    pub concurrency: u16,
    /// A window handed out and not finished after this many seconds is handed out again.
    #[arg(
        long,
        env = "CONVEYOR_FETCH_REPUBLISH_AFTER_SECS",
        default_value_t = 900
    )]
    pub republish_after_secs: u64,
}

impl Cli {
    fn run_options(&self) -> RunOptions {
        RunOptions {
            once: self.once,
            interval: Duration::from_secs(self.interval_secs),
            concurrency: self.concurrency,
            republish_after: Duration::from_secs(self.republish_after_secs),
        }
    }
}

/// The `conveyor-fetcher` process: its command line, then [`run`] until SIGTERM. Here and not in the
/// binary, so that the async code is compiled in this crate, once.
pub fn main() -> std::process::ExitCode {
    let cli = <Cli as clap::Parser>::parse();
    conveyor_runtime::process::run_worker(&cli.worker.clone(), |shutdown| run(cli, shutdown))
}

pub async fn run(cli: Cli, shutdown: CancellationToken) -> anyhow::Result<()> {
    let host = Host::start(
        &cli.worker,
        Stage::Fetch,
        9101,
        &[serve::READY_SOURCE_CREDENTIALS],
        &shutdown,
    )
    .await?;
    let Some(host) = host else { return Ok(()) };
    host.run(&shutdown, |runtime, cli: Cli, shutdown| async move {
        sync_pipeline(&runtime, &cli, &shutdown).await
    })
    .await
}

/// Syncs one pipeline from the source its file names; with `--once`, prints what was done.
async fn sync_pipeline(
    runtime: &WorkerRuntime,
    cli: &Cli,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    let database = Database::connect(&cli.worker.postgres)?;
    let store = SyncStore::open(database.clone(), runtime.pipeline.name()).await?;
    let work = SyncWork {
        runtime,
        settings: SyncSettings::of(&runtime.pipeline.spec.source),
        store,
        options: cli.run_options(),
        shutdown,
    };
    let summary = with_source(
        &runtime.pipeline,
        &cli.kingdee,
        &database,
        &runtime.metrics,
        work,
    )
    .await?;
    if cli.once {
        tracing::info!(?summary, "sync finished");
        println!("{}", serde_json::to_string(&summary)?);
    }
    Ok(())
}

struct SyncWork<'a> {
    runtime: &'a WorkerRuntime,
    settings: SyncSettings,
    store: SyncStore,
    options: RunOptions,
    shutdown: &'a CancellationToken,
}

impl WithSource for SyncWork<'_> {
    type Output = serve::SyncSummary;

    async fn run<S: Source>(self, source: Arc<S>) -> anyhow::Result<Self::Output> {
        serve::sync(
            self.runtime,
            source,
            self.settings,
            self.store,
            &self.options,
            self.shutdown,
        )
        .await
    }
}

/// Work done with a pipeline's source: the sync, an operator's reconcile. The source's type follows
/// the pipeline file's kind, so the work is handed the source rather than given it back.
pub trait WithSource {
    type Output;

    fn run<S: Source>(
        self,
        source: Arc<S>,
    ) -> impl Future<Output = anyhow::Result<Self::Output>> + Send;
}

/// Builds the source `pipeline`'s file names (the one match on its kind), with the call budget and
/// the login shared by every process calling its account (their tables are the sync state's: open a
/// [`SyncStore`] first), and hands it to `work`, which checks it first
/// ([`Source::check`]).
pub async fn with_source<W: WithSource>(
    pipeline: &conveyor_pipeline::Pipeline,
    kingdee: &KingdeeArgs,
    database: &Database,
    metrics: &Metrics,
    work: W,
) -> anyhow::Result<W::Output> {
    let spec = &pipeline.spec.source;
    match spec.kind {
        SourceKind::Kingdee => {
            let credentials = kingdee.credentials()?;
            let budget = SharedBudget::new(
                database.clone(),
                KingdeeArgs::budget_key(&credentials),
                spec.calls_per_minute,
            )
            .with_rate_gauge(
                metrics
                    .source_call_rate
                    .with_label_values(&[pipeline.name()]),
            );
            let session =
                SessionTable::new(database.clone(), KingdeeArgs::session_key(&credentials));
            let gateway = Gateway::new(credentials, budget, metrics.clone(), pipeline.name())
                .with_session_store(session);
            let source = KingdeeSource::new(gateway, &spec.path, &spec.query, spec.page_size);
            work.run(Arc::new(source)).await
        }
    }
}

/// Hands `windows` of `pipeline` out again, to be paged by whichever fetcher takes them (running
/// ones, or the next `--once`): what `conveyorctl reconcile` offers to mend what it found.
pub async fn resync(
    broker: &conveyor_amqp::settings::BrokerArgs,
    postgres: &conveyor_postgres::PostgresArgs,
    pipeline: &str,
    windows: &[conveyor_base::source::Window],
) -> anyhow::Result<()> {
    let store = SyncStore::open(Database::connect(postgres)?, pipeline).await?;
    let connection = conveyor_amqp::connect(&broker.address()?, "conveyorctl").await?;
    let topology = conveyor_amqp::Topology::new(broker, pipeline);
    let handed_out = async {
        topology.declare(&connection).await?;
        let publisher = conveyor_amqp::Publisher::open(&connection)
            .await?
            .with_confirm_timeout(broker.confirm_timeout());
        store
            .resync(windows, |windows| {
                window::publish_work_items(&publisher, &topology, windows)
            })
            .await
    }
    .await;
    conveyor_amqp::close(&connection).await;
    handed_out
}
