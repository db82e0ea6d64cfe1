//! End to end into an HTTP target: sales orders flattened into their entry lines by the declarative
//! rules, written by the real worker binaries through RabbitMQ into the target simulator (a real HTTP
//! server with token authentication, injected 429s and 5xx), ending equal to the ground truth.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use conveyor_core::broker::Stage;
use conveyor_harness::{Scenario, Services, Worker, WorkerProcess};
use kingdee_sim::SimConfig;
use target_sim::{TargetConfig, TargetSim};

const TIMEOUT: Duration = Duration::from_secs(120);
const COLLECTION: &str = "sales_order_lines";

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn bin_dir() -> PathBuf {
    Path::new(env!("CARGO_BIN_EXE_conveyor-writer"))
        .parent()
        .expect("binaries live in a directory")
        .to_owned()
}

/// What the target holds that the truth does not say, or says otherwise.
fn differences(truth: &BTreeMap<String, String>, sim: &TargetSim) -> Vec<String> {
    let held = sim.records(COLLECTION);
    let mut problems = Vec::new();
    for (id, modified) in truth {
        match held
            .get(id)
            .and_then(|record| record["modified_at"].as_str())
        {
            None => problems.push(format!("missing {id}")),
            Some(found) if found != modified => {
                problems.push(format!("{id}: version {found}, expected {modified}"))
            }
            Some(_) => {}
        }
    }
    for id in held.keys().filter(|id| !truth.contains_key(*id)) {
        problems.push(format!("unexpected {id}"));
    }
    problems
}

async fn wait_until_equal(
    truth: &BTreeMap<String, String>,
    sim: &TargetSim,
    workers: &[WorkerProcess],
) {
    let started = Instant::now();
    loop {
        let problems = differences(truth, sim);
        if problems.is_empty() {
            return;
        }
        if started.elapsed() > TIMEOUT {
            let logs: Vec<String> = workers
                .iter()
                .map(|w| format!("--- {}\n{}", w.worker.binary(), w.log_tail(20)))
                .collect();
            panic!(
                "the target differs from the truth after {TIMEOUT:?} ({} problems, first: {:?})\n{}",
                problems.len(),
                &problems[..problems.len().min(5)],
                logs.join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A running scenario of the lines pipeline: the Kingdee simulator, the target simulator, a
/// transformer and two writers, and the truth (line id → version, in UTC as the pipeline writes it).
struct Run {
    scenario: Scenario,
    sim: Arc<TargetSim>,
    workers: Vec<WorkerProcess>,
    truth: BTreeMap<String, String>,
}

const CLIENT_SECRET: &str = "e2e-client-secret";

async fn start(prefix: &str, orders: usize, target: TargetConfig) -> Run {
    let services = Services::check()
        .await
        .unwrap_or_else(|err| panic!("the end-to-end tests need RabbitMQ and PostgreSQL: {err:#}"));
    let pipeline = repo_root().join("ops/pipelines/sales_order_lines_http.toml");
    let sim_config = SimConfig {
        seed: 11,
        orders,
        ..SimConfig::default()
    };
    let scenario = Scenario::start(services, &pipeline, &bin_dir(), prefix, sim_config, &[])
        .await
        .expect("scenario starts");
    let sim = TargetSim::new(TargetConfig {
        key_field: "line_id".into(),
        version_field: Some("modified_at".into()),
        client: Some(("conveyor-e2e".into(), CLIENT_SECRET.into())),
        ..target
    });
    let addr = target_sim::spawn(sim.clone(), ([127, 0, 0, 1], 0).into())
        .await
        .unwrap();
    let url = format!("http://{addr}");
    let env = [
        ("CONVEYOR_HTTP_TARGET_URL", url.as_str()),
        ("CONVEYOR_HTTP_TARGET_CLIENT_ID", "conveyor-e2e"),
        ("CONVEYOR_HTTP_TARGET_CLIENT_SECRET", CLIENT_SECRET),
    ];
    scenario.declare_topology().await.unwrap();
    let workers = vec![
        scenario.spawn(Worker::Transformer, &[]).unwrap(),
        scenario.spawn_with_env(Worker::Writer, &[], &env).unwrap(),
        scenario.spawn_with_env(Worker::Writer, &[], &env).unwrap(),
    ];
    let truth = scenario.expected_order_lines();
    Run {
        scenario,
        sim,
        workers,
        truth,
    }
}

impl Run {
    /// Stops the workers (each must exit 0 on SIGTERM), proves no secret reached a log, cleans up.
    async fn finish(mut self) {
        for worker in &self.workers {
            let log = std::fs::read_to_string(&worker.log).unwrap_or_default();
            assert!(
                !log.contains(CLIENT_SECRET),
                "a secret reached the log of {}",
                worker.worker.binary()
            );
        }
        conveyor_harness::stop_all(&mut self.workers).await.unwrap();
        self.scenario.clean_up(false).await.unwrap();
    }
}

/// Waits until the work queues are empty and the target has had no call for half a second.
async fn wait_until_quiet(scenario: &Scenario, sim: &TargetSim) {
    let settled = async {
        let mut calls = u64::MAX;
        loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let depths = scenario.queue_depths().await.unwrap();
            let now = sim.stats.requests.load(Ordering::Relaxed);
            let work_queues_empty = depths
                .iter()
                .filter(|(queue, _)| !queue.ends_with(".dlq"))
                .all(|(_, n)| *n == 0);
            if work_queues_empty && now == calls {
                return;
            }
            calls = now;
        }
    };
    tokio::time::timeout(TIMEOUT, settled)
        .await
        .expect("queues drain and the target goes quiet");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn order_lines_flattened_into_an_http_target_equal_the_truth() {
    // Short-lived tokens, so that they are renewed during the run; one call in five refused with 429
    // or 503, to prove that transient failures are retried.
    let run = start(
        "http",
        1_000,
        TargetConfig {
            latency: Duration::from_millis(2),
            rate_429: 0.1,
            rate_5xx: 0.1,
            token_ttl: Duration::from_secs(2),
            ..TargetConfig::default()
        },
    )
    .await;
    let Run {
        scenario,
        sim,
        workers,
        truth,
    } = &run;
    assert!(truth.len() > 1_500, "orders have 1 to 4 lines each");

    scenario.run_fetcher_once(TIMEOUT).await.unwrap();
    wait_until_equal(truth, sim, workers).await;
    let created = sim.stats.created.load(Ordering::Relaxed);
    assert_eq!(
        created as usize,
        truth.len(),
        "every line created exactly once"
    );

    // Another sync (a full one, or from the watermark with its overlap) repeats lines: the target's
    // upsert keeps one copy at the same version. Wait until the queues are empty and the target quiet.
    scenario.run_fetcher_once(TIMEOUT).await.unwrap();
    wait_until_quiet(scenario, sim).await;
    assert!(differences(truth, sim).is_empty());
    assert_eq!(
        sim.stats.created.load(Ordering::Relaxed) as usize,
        truth.len()
    );
    assert_eq!(
        sim.stats.updated.load(Ordering::Relaxed),
        0,
        "same versions never rewrite"
    );

    let injected = sim.stats.injected_429.load(Ordering::Relaxed)
        + sim.stats.injected_5xx.load(Ordering::Relaxed);
    assert!(
        injected > 0,
        "the run met injected failures and retried them"
    );
    assert!(
        sim.stats.tokens_issued.load(Ordering::Relaxed) >= 2,
        "each writer got a token"
    );
    assert!(
        scenario
            .peek_dead_letters(Stage::Write)
            .await
            .unwrap()
            .is_empty(),
        "transient failures are retried, never dead-lettered"
    );
    run.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lines_the_target_refuses_are_dead_lettered_alone() {
    const ORDERS: usize = 300;
    // The target refuses every 40th line as invalid (422), wherever it falls in a batch.
    let all_lines = kingdee_sim::Simulator::new(SimConfig {
        seed: 11,
        orders: ORDERS,
        ..SimConfig::default()
    })
    .order_lines_truth();
    let mut refused: Vec<String> = all_lines
        .iter()
        .step_by(40)
        .map(|line| line.id.clone())
        .collect();
    let run = start(
        "http_refused",
        ORDERS,
        TargetConfig {
            invalid_when: refused
                .iter()
                .map(|id| ("line_id".to_owned(), serde_json::json!(id)))
                .collect(),
            ..TargetConfig::default()
        },
    )
    .await;
    let mut expected = run.truth.clone();
    for id in &refused {
        expected.remove(id);
    }
    run.scenario.run_fetcher_once(TIMEOUT).await.unwrap();
    wait_until_equal(&expected, &run.sim, &run.workers).await;
    wait_until_quiet(&run.scenario, &run.sim).await;
    assert!(differences(&expected, &run.sim).is_empty());

    let letters = run.scenario.peek_dead_letters(Stage::Write).await.unwrap();
    let mut dead: Vec<String> = letters.iter().flat_map(|l| l.record_ids.clone()).collect();
    dead.sort();
    refused.sort();
    assert_eq!(dead, refused, "exactly the refused lines, each once");
    for letter in &letters {
        assert_eq!(letter.record_ids.len(), 1, "each refused line on its own");
        assert_eq!(letter.class, "permanent");
        assert_eq!(letter.stage, "write");
        assert!(letter.error.contains("422"), "{}", letter.error);
    }
    run.finish().await;
}

#[test]
fn transform_preview_prints_records_and_errors() {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_conveyorctl"))
        .args(["transform", "preview"])
        .arg(repo_root().join("ops/pipelines/sales_order_lines_http.toml"))
        .arg("--input")
        .arg(repo_root().join("ops/samples/sal_order_rows.json"))
        .output()
        .expect("conveyorctl runs");
    // The sample holds one good order of two lines and one order with a line that has no price.
    assert_eq!(
        output.status.code(),
        Some(1),
        "a failing row makes the exit status 1"
    );
    let shown: serde_json::Value = serde_json::from_slice(&output.stdout).expect("JSON on stdout");
    let lines: Vec<&str> = shown["records"]
        .as_array()
        .unwrap()
        .iter()
        .map(|record| record["data"]["line_id"].as_str().unwrap())
        .collect();
    assert_eq!(lines, ["830000000000123457", "830000000000123458"]);
    assert_eq!(shown["records"][0]["data"]["bill_date"], "01/01/2025");
    assert_eq!(shown["records"][0]["data"]["gross_amount"], "67.8");
    assert_eq!(shown["errors"][0]["id"], "830000000000123999");
    assert_eq!(shown["errors"][0]["field"], "price");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("1 of the sample rows"), "{stderr}");
}
