//! End to end into an HTTP target: sales orders flattened into their entry lines by the declarative
//! rules, written by the real worker binaries through RabbitMQ into the target simulator (a real HTTP
//! server with token authentication, injected 429s and 5xx), ending equal to the ground truth.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
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

async fn run_fetcher_once(scenario: &Scenario) {
    let mut fetcher = scenario.spawn(Worker::Fetcher, &["--once"]).unwrap();
    let status = fetcher.wait(TIMEOUT).await.unwrap();
    assert!(
        status.success(),
        "fetcher failed:\n{}",
        fetcher.log_tail(30)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn order_lines_flattened_into_an_http_target_equal_the_truth() {
    let services = Services::check()
        .await
        .unwrap_or_else(|err| panic!("the end-to-end tests need RabbitMQ and PostgreSQL: {err:#}"));
    let pipeline = repo_root().join("ops/pipelines/sales_order_lines_http.toml");
    let scenario = Scenario::start(
        services,
        &pipeline,
        &bin_dir(),
        "http",
        SimConfig {
            seed: 11,
            orders: 1_000,
            ..SimConfig::default()
        },
    )
    .await
    .expect("scenario starts");

    // The target: tokens from its endpoint, short-lived so that they are renewed during the run, and
    // one call in five refused with 429 or 503 to prove that transient failures are retried.
    let sim = TargetSim::new(TargetConfig {
        key_field: "line_id".into(),
        version_field: Some("modified_at".into()),
        latency: Duration::from_millis(2),
        rate_429: 0.1,
        rate_5xx: 0.1,
        client: Some(("conveyor-e2e".into(), "e2e-client-secret".into())),
        ..TargetConfig::default()
    });
    let addr = target_sim::spawn(sim.clone(), ([127, 0, 0, 1], 0).into())
        .await
        .unwrap();
    let url = format!("http://{addr}");
    let env = [
        ("CONVEYOR_HTTP_TARGET_URL", url.as_str()),
        ("CONVEYOR_HTTP_TARGET_CLIENT_ID", "conveyor-e2e"),
        ("CONVEYOR_HTTP_TARGET_CLIENT_SECRET", "e2e-client-secret"),
    ];
    let mut workers = vec![
        scenario.spawn(Worker::Transformer, &[]).unwrap(),
        scenario.spawn_with_env(Worker::Writer, &[], &env).unwrap(),
        scenario.spawn_with_env(Worker::Writer, &[], &env).unwrap(),
    ];

    // The truth: every line of every order, versioned by its order's modify time (written in UTC).
    let truth: BTreeMap<String, String> = scenario
        .simulator
        .order_lines_truth()
        .into_iter()
        .map(|line| {
            let instant =
                conveyor_core::source_time::parse_instant(&line.modify_time.into()).unwrap();
            (line.id, instant.to_utc().to_rfc3339())
        })
        .collect();
    assert!(truth.len() > 1_500, "orders have 1 to 4 lines each");

    run_fetcher_once(&scenario).await;
    wait_until_equal(&truth, &sim, &workers).await;
    let created = sim.stats.created.load(Ordering::Relaxed);
    assert_eq!(
        created as usize,
        truth.len(),
        "every line created exactly once"
    );

    // A second full sync repeats every line: the target's upsert keeps one copy at the same version.
    let stale_before = sim.stats.stale.load(Ordering::Relaxed) as usize;
    run_fetcher_once(&scenario).await;
    let depths_settled = async {
        loop {
            let depths = scenario.queue_depths().await.unwrap();
            if depths.iter().all(|(_, n)| *n == 0) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    tokio::time::timeout(TIMEOUT, depths_settled)
        .await
        .expect("queues drain");
    // Messages may still be in flight (unacked) when the queues look empty: wait for every write.
    let stale_after_repeat = async {
        while (sim.stats.stale.load(Ordering::Relaxed) as usize) < stale_before + truth.len() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    tokio::time::timeout(TIMEOUT, stale_after_repeat)
        .await
        .expect("the repeated sync reaches the target");
    assert!(differences(&truth, &sim).is_empty());
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
    for worker in &workers {
        let log = std::fs::read_to_string(&worker.log).unwrap_or_default();
        assert!(
            !log.contains("e2e-client-secret"),
            "a secret reached the log of {}",
            worker.worker.binary()
        );
    }

    for worker in workers.iter() {
        worker.terminate().expect("SIGTERM sent");
    }
    for worker in workers.iter_mut() {
        let status = worker
            .wait(Duration::from_secs(30))
            .await
            .expect("worker exits");
        assert!(
            status.success(),
            "{} exited with {status}:\n{}",
            worker.worker.binary(),
            worker.log_tail(30)
        );
    }
    scenario.clean_up(false).await.unwrap();
}
