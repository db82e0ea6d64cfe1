//! What the end-to-end test files share: starting a scenario, running and stopping workers, and
//! comparing the target with the truth. (Each test file uses a part of it.)
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use conveyor_harness::{Scenario, Services, Worker, WorkerProcess};
use kingdee_sim::SimConfig;

pub const TIMEOUT: Duration = Duration::from_secs(120);

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

pub fn sales_orders_pipeline() -> PathBuf {
    repo_root().join("ops/pipelines/sales_orders.toml")
}

pub fn bin_dir() -> PathBuf {
    Path::new(env!("CARGO_BIN_EXE_conveyor-writer"))
        .parent()
        .expect("binaries live in a directory")
        .to_owned()
}

pub async fn scenario(prefix: &str, sim: SimConfig) -> Scenario {
    scenario_with(services().await, prefix, sim).await
}

/// The machine's RabbitMQ and PostgreSQL, proven to answer.
pub async fn services() -> Services {
    Services::check()
        .await
        .unwrap_or_else(|err| panic!("the end-to-end tests need RabbitMQ and PostgreSQL: {err:#}"))
}

pub async fn scenario_with(services: Services, prefix: &str, sim: SimConfig) -> Scenario {
    Scenario::start(
        services,
        &sales_orders_pipeline(),
        &bin_dir(),
        prefix,
        sim,
        &[],
    )
    .await
    .expect("scenario starts")
}

/// An HTTP client whose calls give up after 5 s, so that a test fails rather than hangs.
pub fn http() -> reqwest::Client {
    conveyor_base::tls::http_client(None)
        .timeout(Duration::from_secs(5))
        .build()
        .expect("an HTTP client")
}

/// Waits until a worker's /readyz answers 200 (`ready`) or not (`!ready`).
pub async fn wait_ready(worker: &WorkerProcess, ready: bool, timeout: Duration) {
    if let Err(err) = worker.wait_ready(ready, timeout).await {
        panic!("{err:#}");
    }
}

/// `/readyz` of a worker: its status and the conditions it lists (nothing while it starts).
pub async fn readyz(worker: &WorkerProcess) -> (u16, String) {
    let url = format!("http://{}/readyz", worker.http_addr);
    match http().get(url).send().await {
        Ok(answer) => (answer.status().as_u16(), answer.text().await.unwrap()),
        Err(_) => (0, String::new()),
    }
}

/// Waits until `/readyz` of `worker` lists `condition`; returns the whole answer.
pub async fn wait_for_condition(worker: &WorkerProcess, condition: &str) -> String {
    let deadline = std::time::Instant::now() + TIMEOUT;
    loop {
        let (status, body) = readyz(worker).await;
        if body.contains(condition) {
            assert_eq!(status, 503, "{body}");
            return body;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{} never said {condition:?}; /readyz: {body}\n{}",
            worker.worker.binary(),
            worker.log_tail(20)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Starts a worker and waits until it is ready (for a writer: its table is migrated).
pub async fn spawn_ready(scenario: &Scenario, worker: Worker) -> WorkerProcess {
    let process = scenario.spawn(worker, &[]).unwrap();
    wait_ready(&process, true, TIMEOUT).await;
    process
}

/// `conveyorctl` set up for the scenario's broker and namespace (more settings may be added).
pub fn ctl_command(scenario: &Scenario, args: &[&str]) -> std::process::Command {
    let mut command = std::process::Command::new(bin_dir().join("conveyorctl"));
    command
        .args(args)
        .env("CONVEYOR_NAMESPACE", &scenario.namespace)
        .env("CONVEYOR_AMQP_URL", scenario.services.amqp_url.expose())
        .env("CONVEYOR_PG_URL", scenario.services.pg_url.expose())
        .env("CONVEYOR_PG_SCHEMA", &scenario.schema)
        .env(
            "CONVEYOR_RETRY_DELAYS_MS",
            conveyor_harness::RETRY_DELAYS_MS,
        )
        .stdin(std::process::Stdio::null());
    command
}

/// `conveyorctl reconcile` of the scenario's pipeline over all of the simulator's data (from before its
/// first order to now, in 30-day windows), with every setting of the scenario's workers.
pub fn reconcile_command(scenario: &Scenario, extra: &[&str]) -> std::process::Command {
    let file = scenario.pipeline.file.display().to_string();
    let mut command = ctl_command(
        scenario,
        &[
            "reconcile",
            &file,
            "--since",
            "2024-12-31T00:00:00Z",
            "--window-secs",
            "2592000",
        ],
    );
    command.args(extra).envs(scenario.environment());
    command
}

/// Runs `conveyorctl` against the scenario's broker and namespace.
pub fn ctl(scenario: &Scenario, args: &[&str]) -> std::process::Output {
    ctl_command(scenario, args)
        .output()
        .expect("conveyorctl runs")
}

/// Runs `conveyorctl`, asserts it succeeded, returns its standard output.
pub fn ctl_ok(scenario: &Scenario, args: &[&str]) -> String {
    succeeded(&format!("conveyorctl {args:?}"), ctl(scenario, args))
}

/// Asserts that a command (`what`) succeeded, showing what it printed when it did not; returns its
/// standard output.
pub fn succeeded(what: &str, output: std::process::Output) -> String {
    assert!(
        output.status.success(),
        "{what} failed: {}{}",
        String::from_utf8_lossy(&output.stderr),
        String::from_utf8_lossy(&output.stdout)
    );
    String::from_utf8(output.stdout).expect("UTF-8 output")
}

/// A worker's metric value (the sum over label sets that contain every one of `labels`); 0 while
/// the worker does not serve its metrics yet.
pub async fn metric(worker: &WorkerProcess, name: &str, labels: &[&str]) -> f64 {
    let url = format!("http://{}/metrics", worker.http_addr);
    let Ok(response) = http().get(url).send().await else {
        return 0.0;
    };
    let text = response.text().await.expect("metrics text");
    text.lines()
        .filter(|line| line.starts_with(name) && labels.iter().all(|l| line.contains(l)))
        .filter_map(|line| line.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

pub fn orders(count: usize) -> SimConfig {
    SimConfig {
        seed: 7,
        orders: count,
        ..SimConfig::default()
    }
}

/// SIGTERMs every worker and asserts each exits 0.
pub async fn stop_all(workers: &mut [WorkerProcess]) {
    conveyor_harness::stop_all(workers).await.unwrap();
}

pub async fn run_fetcher_once(scenario: &Scenario) {
    scenario.run_fetcher_once(TIMEOUT).await.unwrap();
}

/// The last lines of each worker's log, for a failure message.
pub fn logs_of<'a>(workers: impl IntoIterator<Item = &'a WorkerProcess>) -> String {
    workers
        .into_iter()
        .map(|w| format!("--- {}\n{}", w.worker.binary(), w.log_tail(20)))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Waits until `problems` finds none; after [`TIMEOUT`] fails with the first of them and the
/// workers' logs.
pub async fn wait_until_no_problems<'a>(
    workers: impl IntoIterator<Item = &'a WorkerProcess>,
    mut problems: impl FnMut() -> Vec<String>,
) {
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        let found = problems();
        if found.is_empty() {
            return;
        }
        if tokio::time::Instant::now() > deadline {
            panic!(
                "the target differs from the truth after {TIMEOUT:?} ({} problems, first: {:?})\n{}",
                found.len(),
                &found[..found.len().min(5)],
                logs_of(workers)
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub async fn assert_target_equals_truth(scenario: &Scenario, workers: &[WorkerProcess]) {
    if let Err(err) = scenario.wait_for_target(TIMEOUT).await {
        panic!("{err:#}\n{}", logs_of(workers));
    }
    let comparison = scenario.compare_with_truth().await.unwrap();
    assert!(
        comparison.is_exact(),
        "target differs from the truth: {comparison:?}"
    );
}

/// Waits until the work and retry queues are empty (dead-letter queues aside); returns the depths of
/// every queue, dead-letter queues included.
pub async fn wait_for_empty_work_queues(scenario: &Scenario) -> Vec<(String, u32)> {
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        let depths = scenario.queue_depths().await.unwrap();
        let work_empty = depths
            .iter()
            .all(|(queue, n)| *n == 0 || queue.ends_with(".dlq"));
        if work_empty {
            return depths;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "work queues not empty after {TIMEOUT:?}: {depths:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Batches waiting for the writers: ready in the write queues, and held by `writers`.
pub async fn waiting_for_writers(scenario: &Scenario, writers: &[WorkerProcess]) -> f64 {
    let queued: u32 = scenario
        .queue_depths()
        .await
        .unwrap()
        .iter()
        .filter(|(queue, _)| queue.ends_with(".write"))
        .map(|(_, n)| n)
        .sum();
    f64::from(queued) + messages_in_hand(writers).await
}

/// The messages `workers` hold at the moment (delivered to them, not yet settled).
pub async fn messages_in_hand(workers: &[WorkerProcess]) -> f64 {
    let mut held = 0.0;
    for worker in workers {
        held += metric(worker, "conveyor_messages_in_hand", &[]).await;
    }
    held
}

/// Waits until the work queues are empty and no worker holds a message (one redelivered to a worker
/// started last is not in a queue's ready count while it is handled), twice in a row.
pub async fn wait_until_idle(scenario: &Scenario, workers: &[WorkerProcess]) {
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    let mut idle_before = false;
    loop {
        wait_for_empty_work_queues(scenario).await;
        let in_hand = messages_in_hand(workers).await;
        if in_hand == 0.0 {
            if idle_before {
                return;
            }
            idle_before = true;
        } else {
            idle_before = false;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "workers still hold {in_hand} messages after {TIMEOUT:?}:\n{}",
            logs_of(workers)
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// Runs a test's steps, failing if they take longer than `limit`.
pub async fn within(limit: Duration, steps: impl std::future::Future<Output = ()>) {
    if tokio::time::timeout(limit, steps).await.is_err() {
        panic!("the test did not finish within {limit:?}; its last step is logged above");
    }
}

/// Logs a test step (shown with the output of a failing test).
pub fn step(what: &str) {
    eprintln!("{:?} step: {what}", std::time::SystemTime::now());
}

/// A cause of dead letters that can be fixed: a CHECK constraint in the target table that refuses
/// every order whose id ends in 7.
pub struct RefusedSevens {
    pub client: tokio_postgres::Client,
    pub table: String,
    /// The ids the constraint refuses.
    pub ids: std::collections::BTreeSet<String>,
}

impl RefusedSevens {
    /// Adds the constraint to the scenario's table (a writer must have created it).
    pub async fn add(scenario: &Scenario) -> Self {
        let table = scenario.table().unwrap();
        let client = conveyor_harness::pg_client(&scenario.services.pg_url)
            .await
            .unwrap();
        client
            .batch_execute(&format!(
                "ALTER TABLE {table} ADD CONSTRAINT no_sevens CHECK (right(id, 1) <> '7')"
            ))
            .await
            .unwrap();
        let ids = scenario
            .expected_records()
            .into_iter()
            .map(|record| record.id)
            .filter(|id| id.ends_with('7'))
            .collect();
        Self { client, table, ids }
    }

    /// The fix: drops the constraint.
    pub async fn fix(&self) {
        self.client
            .batch_execute(&format!(
                "ALTER TABLE {} DROP CONSTRAINT no_sevens",
                self.table
            ))
            .await
            .unwrap();
    }
}
