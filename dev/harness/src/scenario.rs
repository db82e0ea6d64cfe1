//! One isolated run of the pipeline: its own namespace, schema and simulator, and the comparison of
//! its target with the simulator's truth.
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use conveyor_amqp::dead_letters::DeadLetter;
use conveyor_amqp::settings::BrokerArgs;
use conveyor_amqp::{Publisher, Topology};
use conveyor_base::Stage;
use conveyor_pipeline::{Pipeline, TargetSpec};
use kingdee_sim::{Object, SimConfig, Simulator};
use lapin::BasicProperties;
use tokio::process::Command;
use tokio_util::task::AbortOnDropHandle;

use crate::ports::free_local_addr;
use crate::process::{Worker, WorkerProcess};
use crate::services::{Services, pg_client};

/// Retry tiers of the scenarios' workers: short, so that tests of retries take seconds.
pub const RETRY_DELAYS_MS: &str = "300,600,1200";

/// How a target compares with the simulator's ground truth.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Comparison {
    pub expected: usize,
    pub found: usize,
    /// Ids in the truth but not in the target.
    pub missing: Vec<String>,
    /// Ids in the target but not in the truth.
    pub unexpected: Vec<String>,
    /// Ids whose modify time in the target is not the truth's.
    pub wrong_version: Vec<String>,
}

impl Comparison {
    pub fn is_exact(&self) -> bool {
        self.missing.is_empty()
            && self.unexpected.is_empty()
            && self.wrong_version.is_empty()
            && self.expected == self.found
    }
}

/// One isolated run: its own queue namespace, its own database schema, its own simulator.
pub struct Scenario {
    pub services: Services,
    pub pipeline: Pipeline,
    pub namespace: String,
    pub schema: String,
    pub simulator: Arc<Simulator>,
    pub sim_url: String,
    /// Settings that every worker started afterwards gets on top of [`Scenario::environment`].
    pub extra_env: Vec<(String, String)>,
    /// More pipelines the workers host besides `pipeline`, in the same namespace and schema, fed by
    /// the same simulator ([`Scenario::add_pipeline`]).
    pub more_pipelines: Vec<Pipeline>,
    bin_dir: PathBuf,
    log_dir: PathBuf,
    /// The simulator's server, stopped with the scenario: a process that runs scenarios one after
    /// another (a benchmark) would otherwise keep every simulator and its orders.
    _sim_server: AbortOnDropHandle<std::io::Result<()>>,
    /// Set by [`Scenario::clean_up`]; a scenario dropped without it (a test that failed) still
    /// deletes its queues, which would otherwise pile up in the broker run after run. Its schema is
    /// kept, for a look at what went wrong.
    cleaned: AtomicBool,
}

impl Drop for Scenario {
    fn drop(&mut self) {
        if self.cleaned.load(Ordering::Relaxed) {
            return;
        }
        // Drop may run inside the test's runtime, which must not be blocked on: a thread of its own.
        std::thread::scope(|scope| {
            scope.spawn(|| {
                let removed = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(anyhow::Error::from)
                    .and_then(|runtime| {
                        runtime.block_on(async {
                            tokio::time::timeout(Duration::from_secs(15), self.clean_up(true))
                                .await
                                .unwrap_or_else(|_| Err(anyhow::anyhow!("no answer within 15 s")))
                        })
                    });
                if let Err(err) = removed {
                    eprintln!(
                        "scenario {}: its queues were not deleted: {err:#}",
                        self.namespace
                    );
                }
            });
        });
    }
}

impl Scenario {
    /// Starts a simulator and names a fresh namespace and schema (`{prefix}_{random}`).
    pub async fn start(
        services: Services,
        pipeline_file: &Path,
        bin_dir: &Path,
        prefix: &str,
        sim: SimConfig,
        source: &[(&str, toml::Value)],
    ) -> anyhow::Result<Self> {
        let suffix = uuid::Uuid::new_v4().simple().to_string()[..10].to_owned();
        let name = format!("{prefix}_{suffix}");
        Self::start_named(services, pipeline_file, bin_dir, &name, &name, sim, source).await
    }

    /// Like [`Scenario::start`] with chosen names; the schema is dropped first if it exists.
    #[allow(clippy::too_many_arguments)]
    pub async fn start_named(
        services: Services,
        pipeline_file: &Path,
        bin_dir: &Path,
        namespace: &str,
        schema: &str,
        sim: SimConfig,
        source: &[(&str, toml::Value)],
    ) -> anyhow::Result<Self> {
        let log_dir = std::env::temp_dir()
            .join("conveyor-harness")
            .join(namespace);
        std::fs::create_dir_all(&log_dir)?;
        let derived = derive_pipeline(pipeline_file, &log_dir, &sim, source)?;
        let pipeline = Pipeline::load(&derived)?;
        for worker in [Worker::Fetcher, Worker::Transformer, Worker::Writer] {
            let binary = bin_dir.join(worker.binary());
            if !binary.is_file() {
                bail!(
                    "{} is missing: build the workers first (cargo build --bins)",
                    binary.display()
                );
            }
        }
        let client = pg_client(&services.pg_url).await?;
        client
            .batch_execute(&format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"))
            .await
            .context("resetting the scenario's schema")?;
        let simulator = Simulator::new(sim);
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await?;
        let sim_addr = listener.local_addr()?;
        let sim_server = AbortOnDropHandle::new(tokio::spawn(kingdee_sim::serve(
            simulator.clone(),
            listener,
        )));
        Ok(Self {
            services,
            pipeline,
            namespace: namespace.to_owned(),
            schema: schema.to_owned(),
            simulator,
            sim_url: format!("http://{sim_addr}"),
            extra_env: Vec::new(),
            more_pipelines: Vec::new(),
            bin_dir: bin_dir.to_owned(),
            log_dir,
            _sim_server: sim_server,
            cleaned: AtomicBool::new(false),
        })
    }

    /// Adds a pipeline that every worker started afterwards hosts besides the scenario's own: its file
    /// derived like the first one's, fed by the same simulator.
    pub fn add_pipeline(&mut self, file: &Path) -> anyhow::Result<Pipeline> {
        let derived = derive_pipeline(file, &self.log_dir, self.simulator.config(), &[])?;
        let pipeline = Pipeline::load(&derived)?;
        self.more_pipelines.push(pipeline.clone());
        Ok(pipeline)
    }

    /// The environment every worker of this scenario gets.
    pub fn environment(&self) -> HashMap<&'static str, String> {
        let gateway = &self.simulator.config().gateway;
        let files: Vec<String> = std::iter::once(&self.pipeline)
            .chain(&self.more_pipelines)
            .map(|pipeline| pipeline.file.display().to_string())
            .collect();
        let mut environment = HashMap::from([
            ("CONVEYOR_PIPELINE", files.join(",")),
            (
                "CONVEYOR_AMQP_URL",
                self.services.amqp_url.expose().to_owned(),
            ),
            ("CONVEYOR_PG_URL", self.services.pg_url.expose().to_owned()),
            ("CONVEYOR_PG_SCHEMA", self.schema.clone()),
            ("CONVEYOR_NAMESPACE", self.namespace.clone()),
            ("CONVEYOR_KINGDEE_BASE_URL", self.sim_url.clone()),
            ("CONVEYOR_KINGDEE_CLIENT_ID", gateway.client_id.clone()),
            (
                "CONVEYOR_KINGDEE_CLIENT_SECRET",
                gateway.client_secret.clone(),
            ),
            (
                "CONVEYOR_KINGDEE_OUTER_INSTANCE_ID",
                gateway.outer_instance_id.clone(),
            ),
            ("CONVEYOR_KINGDEE_ACCOUNT", gateway.account_name.clone()),
            ("CONVEYOR_FETCH_INTERVAL_SECS", "1".into()),
            ("CONVEYOR_DRAIN_TIMEOUT_SECS", "20".into()),
            ("CONVEYOR_RETRY_DELAYS_MS", RETRY_DELAYS_MS.into()),
            (
                "CONVEYOR_LOG",
                std::env::var("CONVEYOR_LOG").unwrap_or_else(|_| "info".into()),
            ),
        ]);
        environment.extend(self.services.amqp_tls.environment());
        environment
    }

    /// Gives every worker started from now on the setting `name` = `value` (the last one set wins).
    pub fn set_env(&mut self, name: &str, value: impl Into<String>) {
        self.extra_env.push((name.to_owned(), value.into()));
    }

    /// Starts a worker process with the scenario's environment, plus `args`.
    pub fn spawn(&self, worker: Worker, args: &[&str]) -> anyhow::Result<WorkerProcess> {
        self.spawn_with_env(worker, args, &[])
    }

    /// Like [`Scenario::spawn`], with more environment variables (e.g. an HTTP target's address).
    pub fn spawn_with_env(
        &self,
        worker: Worker,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> anyhow::Result<WorkerProcess> {
        let http_addr = free_local_addr()?;
        let log = self.log_dir.join(format!(
            "{}-{}.log",
            worker.binary(),
            uuid::Uuid::new_v4().simple()
        ));
        let log_file = std::fs::File::create(&log)?;
        let child = Command::new(self.bin_dir.join(worker.binary()))
            .args(args)
            .envs(self.environment())
            .envs(self.extra_env.iter().map(|(k, v)| (k, v)))
            .env("CONVEYOR_HTTP_ADDR", http_addr.to_string())
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", worker.binary()))?;
        Ok(WorkerProcess {
            worker,
            http_addr,
            log,
            child,
        })
    }

    /// Runs the fetcher once (`--once`) and fails, with its log, unless it succeeds within `timeout`.
    pub async fn run_fetcher_once(&self, timeout: Duration) -> anyhow::Result<()> {
        let mut fetcher = self.spawn(Worker::Fetcher, &["--once"])?;
        let status = fetcher.wait(timeout).await?;
        if !status.success() {
            bail!("fetcher failed:\n{}", fetcher.log_tail(30));
        }
        Ok(())
    }

    /// The log lines at ERROR of every process this scenario started (workers and fetcher runs).
    pub fn logged_errors(&self) -> Vec<String> {
        let Ok(entries) = std::fs::read_dir(&self.log_dir) else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter(|entry| entry.path().extension().is_some_and(|ext| ext == "log"))
            .filter_map(|entry| std::fs::read_to_string(entry.path()).ok())
            .flat_map(|log| {
                log.lines()
                    .filter(|line| line.contains(" ERROR ") || line.contains("\"level\":\"ERROR\""))
                    .map(str::to_owned)
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// The PostgreSQL table of the pipeline's target.
    pub fn table(&self) -> anyhow::Result<String> {
        match &self.pipeline.spec.target {
            TargetSpec::Postgres(spec) => Ok(format!("\"{}\".\"{}\"", self.schema, spec.table)),
            _ => bail!(
                "pipeline {} has no table: its target is not postgres",
                self.pipeline.name()
            ),
        }
    }

    /// Rows in the target table (0 while it does not exist yet).
    pub async fn target_count(&self, client: &tokio_postgres::Client) -> anyhow::Result<usize> {
        let exists: bool = client
            .query_one("SELECT to_regclass($1) IS NOT NULL", &[&self.table()?])
            .await?
            .get(0);
        if !exists {
            return Ok(0);
        }
        let row = client
            .query_one(&format!("SELECT count(*) FROM {}", self.table()?), &[])
            .await?;
        Ok(row.get::<_, i64>(0) as usize)
    }

    /// What the target must hold: the simulator's sales orders minus those it spoiled on purpose.
    pub fn expected_records(&self) -> Vec<kingdee_sim::TruthRecord> {
        let poisoned: std::collections::HashSet<String> =
            self.simulator.poisoned_orders().into_iter().collect();
        self.simulator
            .truth(Object::SalesOrder)
            .into_iter()
            .filter(|record| !poisoned.contains(&record.id))
            .collect()
    }

    /// What a target of order lines must hold: every line of every order, by line id, versioned by its
    /// order's modify time (RFC 3339, UTC).
    pub fn expected_order_lines(&self) -> std::collections::BTreeMap<String, String> {
        self.simulator
            .order_lines_truth()
            .into_iter()
            .map(|line| {
                let instant = conveyor_base::source_time::parse_instant(&line.modify_time.into())
                    .expect("the simulator writes valid times");
                (line.id, instant.to_utc().to_rfc3339())
            })
            .collect()
    }

    /// Waits until the target holds as many rows as the truth has records, or `timeout` passes.
    pub async fn wait_for_target(&self, timeout: Duration) -> anyhow::Result<Duration> {
        let client = pg_client(&self.services.pg_url).await?;
        let expected = self.expected_records().len();
        let started = Instant::now();
        loop {
            let found = self.target_count(&client).await?;
            if found >= expected {
                return Ok(started.elapsed());
            }
            if started.elapsed() > timeout {
                bail!("the target holds {found} of {expected} records after {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Compares the target table with the expected records: ids and modify times.
    pub async fn compare_with_truth(&self) -> anyhow::Result<Comparison> {
        let client = pg_client(&self.services.pg_url).await?;
        let key = &self.pipeline.mapping.key_field();
        let version = &self.pipeline.mapping.version_field();
        let rows = client
            .query(
                &format!(
                    "SELECT \"{key}\"::text, to_char(\"{version}\" AT TIME ZONE 'Asia/Shanghai', 'YYYY-MM-DD HH24:MI:SS') FROM {}",
                    self.table()?
                ),
                &[],
            )
            .await?;
        let mut target: HashMap<String, String> = HashMap::with_capacity(rows.len());
        for row in &rows {
            target.insert(
                row.get(0),
                row.get::<_, Option<String>>(1).unwrap_or_default(),
            );
        }
        let truth = self.expected_records();
        let mut comparison = Comparison {
            expected: truth.len(),
            found: rows.len(),
            ..Default::default()
        };
        for record in &truth {
            match target.remove(&record.id) {
                None => comparison.missing.push(record.id.clone()),
                Some(modify_time) if modify_time != record.modify_time => {
                    comparison.wrong_version.push(record.id.clone())
                }
                Some(_) => {}
            }
        }
        comparison.unexpected = target.into_keys().collect();
        Ok(comparison)
    }

    /// Messages waiting in each of the pipeline's queues (work and dead-letter).
    pub async fn queue_depths(&self) -> anyhow::Result<Vec<(String, u32)>> {
        let connection =
            conveyor_amqp::connect(&self.services.broker()?, "conveyor-harness").await?;
        let channel = connection.create_channel().await?;
        let mut depths = Vec::new();
        for queue in self.topology().queues() {
            let depth = conveyor_amqp::queue_depth(&channel, &queue)
                .await
                .with_context(|| format!("inspecting queue {queue}"))?;
            depths.push((queue, depth));
        }
        conveyor_amqp::close(&connection).await;
        Ok(depths)
    }

    /// Reads every message in a stage's dead-letter queue without removing any.
    pub async fn peek_dead_letters(&self, stage: Stage) -> anyhow::Result<Vec<DeadLetter>> {
        let connection =
            conveyor_amqp::connect(&self.services.broker()?, "conveyor-harness").await?;
        let queue = self.topology().dead_letter_queue(stage);
        let held = conveyor_amqp::dead_letters::Held::take(&connection, &queue, usize::MAX).await?;
        let letters = held.letters.clone();
        held.release().await;
        conveyor_amqp::close(&connection).await;
        Ok(letters)
    }

    /// Publishes a message as it is (confirmed) into a stage's work queue, as a producer outside conveyor
    /// might: for feeding workers malformed input.
    pub async fn publish_raw(
        &self,
        stage: Stage,
        body: &[u8],
        properties: BasicProperties,
    ) -> anyhow::Result<()> {
        let connection =
            conveyor_amqp::connect(&self.services.broker()?, "conveyor-harness").await?;
        let topology = self.topology();
        topology.declare(&connection).await?;
        let publisher = Publisher::open(&connection).await?;
        publisher
            .publish(
                &topology.exchange(),
                &topology.routing_key(stage),
                body,
                properties,
            )
            .await?;
        conveyor_amqp::close(&connection).await;
        Ok(())
    }

    /// Declares the scenario's exchanges and queues before any worker starts. Workers declare them too;
    /// doing it first keeps several workers from racing to create the same new quorum queue (a consumer
    /// can reach a quorum queue whose leader is still starting, which closes its connection).
    pub async fn declare_topology(&self) -> anyhow::Result<()> {
        let connection =
            conveyor_amqp::connect(&self.services.broker()?, "conveyor-harness").await?;
        for topology in self.topologies() {
            topology.declare(&connection).await?;
        }
        conveyor_amqp::close(&connection).await;
        Ok(())
    }

    /// The topology of the scenario's own pipeline.
    pub fn topology(&self) -> Topology {
        Topology::new(&self.broker_args(), self.pipeline.name())
    }

    /// The topologies of every pipeline of the scenario.
    pub fn topologies(&self) -> Vec<Topology> {
        std::iter::once(&self.pipeline)
            .chain(&self.more_pipelines)
            .map(|pipeline| Topology::new(&self.broker_args(), pipeline.name()))
            .collect()
    }

    /// The broker settings the scenario's workers get.
    pub fn broker_args(&self) -> BrokerArgs {
        let delays = RETRY_DELAYS_MS
            .split(',')
            .map(|ms| ms.parse().expect("RETRY_DELAYS_MS is a list of numbers"))
            .collect();
        self.services
            .broker_args(&self.namespace)
            .with_retry_delays_ms(delays)
    }

    /// Deletes the scenario's queues and exchanges (and its schema unless `keep_schema`).
    pub async fn clean_up(&self, keep_schema: bool) -> anyhow::Result<()> {
        self.services.delete_topology(&self.topologies()).await?;
        self.cleaned.store(true, Ordering::Relaxed);
        if !keep_schema {
            let client = pg_client(&self.services.pg_url).await?;
            client
                .batch_execute(&format!(
                    "DROP SCHEMA IF EXISTS \"{}\" CASCADE",
                    self.schema
                ))
                .await?;
        }
        Ok(())
    }
}

/// Writes the scenario's copy of a pipeline file: the migrations path made absolute, the sync starting a
/// day before the simulator's data, the call budget set to the simulator's limit (or, when it has none,
/// high enough not to slow a test), then `source` overrides of `[source]` keys.
fn derive_pipeline(
    file: &Path,
    dir: &Path,
    sim: &SimConfig,
    source: &[(&str, toml::Value)],
) -> anyhow::Result<PathBuf> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let mut table: toml::Table =
        toml::from_str(&text).with_context(|| format!("parsing {}", file.display()))?;
    if let Some(toml::Value::Table(target)) = table.get_mut("target")
        && let Some(toml::Value::String(migrations)) = target.get_mut("migrations")
    {
        let absolute = file.parent().unwrap_or(Path::new(".")).join(&*migrations);
        *migrations = absolute
            .canonicalize()
            .unwrap_or(absolute)
            .display()
            .to_string();
    }
    let start = chrono::TimeZone::from_local_datetime(
        &conveyor_base::source_time::china_standard_time(),
        &sim.epoch,
    )
    .single()
    .context("the simulator's epoch is a valid CST time")?
        - chrono::Duration::days(1);
    let calls_per_minute = match sim.gateway.calls_per_minute {
        0 => 600_000,
        limit => i64::from(limit),
    };
    let mut settings = vec![
        ("start_time", toml::Value::String(start.to_rfc3339())),
        ("calls_per_minute", toml::Value::Integer(calls_per_minute)),
    ];
    settings.extend(source.iter().map(|(key, value)| (*key, value.clone())));
    let Some(toml::Value::Table(source_table)) = table.get_mut("source") else {
        bail!("{} has no [source] table", file.display());
    };
    for (key, value) in settings {
        source_table.insert(key.to_owned(), value);
    }
    let derived = dir.join(file.file_name().unwrap_or("pipeline.toml".as_ref()));
    std::fs::write(&derived, toml::to_string(&table)?)?;
    Ok(derived)
}
