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

    scenario.run_fetcher_once(TIMEOUT).await.unwrap();
    wait_until_equal(&truth, &sim, &workers).await;
    let created = sim.stats.created.load(Ordering::Relaxed);
    assert_eq!(
        created as usize,
        truth.len(),
        "every line created exactly once"
    );

    // Another sync (a full one, or from the watermark with its overlap) repeats lines: the target's
    // upsert keeps one copy at the same version. Wait until the queues are empty and the target quiet.
    scenario.run_fetcher_once(TIMEOUT).await.unwrap();
    let settled = async {
        let mut calls = u64::MAX;
        loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let depths = scenario.queue_depths().await.unwrap();
            let now = sim.stats.requests.load(Ordering::Relaxed);
            if depths.iter().all(|(_, n)| *n == 0) && now == calls {
                return;
            }
            calls = now;
        }
    };
    tokio::time::timeout(TIMEOUT, settled)
        .await
        .expect("queues drain and the target goes quiet");
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

    conveyor_harness::stop_all(&mut workers).await.unwrap();
    scenario.clean_up(false).await.unwrap();
}
