//! Incremental sync against the strict simulator: tokens that expire, a rotating secret, a rate limit,
//! injected 5xx, records modified and created during the run, two fetcher processes. The target must end
//! equal to the simulator's ground truth, with no call refused for its signature and no minute over
//! the call budget.

use std::path::{Path, PathBuf};
use std::time::Duration;

use conveyor_harness::{Scenario, Services, Worker};
use kingdee_sim::gate::{Faults, GatewayConfig};
use kingdee_sim::{ChangeRates, SimConfig};

fn bin_dir() -> PathBuf {
    Path::new(env!("CARGO_BIN_EXE_conveyor-fetcher"))
        .parent()
        .expect("binaries live in a directory")
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_fetchers_sync_a_changing_source_through_a_strict_gateway() {
    const BUDGET: u32 = 1_200;
    let services = Services::check()
        .await
        .unwrap_or_else(|err| panic!("this test needs RabbitMQ and PostgreSQL: {err:#}"));
    let sim = SimConfig {
        seed: 11,
        orders: 1_500,
        epoch: kingdee_sim::data::days_ago(2),
        gateway: GatewayConfig {
            token_lifetime: Duration::from_secs(2),
            secret_rotation: Some(Duration::from_secs(3)),
            calls_per_minute: BUDGET,
            faults: Faults {
                server_error: 0.05,
                ..Faults::default()
            },
            ..GatewayConfig::default()
        },
        changes: ChangeRates {
            modify_per_sec: 15.0,
            create_per_sec: 4.0,
        },
        ..SimConfig::default()
    };
    let pipeline =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../ops/pipelines/sales_orders.toml");
    let source = [
        ("window_secs", toml::Value::Integer(6 * 3600)),
        ("max_window_rows", toml::Value::Integer(300)),
        ("lag_secs", toml::Value::Integer(2)),
        ("overlap_secs", toml::Value::Integer(5)),
    ];
    let scenario = Scenario::start(services, &pipeline, &bin_dir(), "sync", sim, &source)
        .await
        .expect("scenario starts");

    let mut workers = vec![
        scenario.spawn(Worker::Transformer, &[]).unwrap(),
        scenario.spawn(Worker::Writer, &[]).unwrap(),
        scenario.spawn(Worker::Fetcher, &[]).unwrap(),
        scenario.spawn(Worker::Fetcher, &[]).unwrap(),
    ];
    // Let the source change under the running fetchers, then let it rest so that a sync can catch up.
    tokio::time::sleep(Duration::from_secs(6)).await;
    scenario.simulator.set_changes(ChangeRates::default());

    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    let comparison = loop {
        let comparison = scenario.compare_with_truth().await.unwrap();
        if comparison.is_exact() || tokio::time::Instant::now() > deadline {
            break comparison;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let logs: Vec<String> = workers
        .iter()
        .map(|w| format!("--- {}\n{}", w.worker.binary(), w.log_tail(15)))
        .collect();
    let truth = scenario.expected_records();
    let modified = |id: &String| {
        truth
            .iter()
            .find(|r| &r.id == id)
            .map(|r| r.modify_time.clone())
    };
    let sample: Vec<_> = comparison
        .missing
        .iter()
        .chain(&comparison.wrong_version)
        .take(5)
        .map(modified)
        .collect();
    assert!(
        comparison.is_exact(),
        "target differs from the truth: missing {}, unexpected {}, wrong version {}; modify times of some: {sample:?}\n{}",
        comparison.missing.len(),
        comparison.unexpected.len(),
        comparison.wrong_version.len(),
        logs.join("\n")
    );

    let stats = scenario.simulator.stats();
    assert!(
        stats.orders_modified > 0 && stats.orders_created > 0,
        "the source changed: {stats:?}"
    );
    assert_eq!(stats.rejected_signature, 0, "{stats:?}");
    assert_eq!(stats.rate_limited, 0, "no call over the budget: {stats:?}");
    assert!(
        stats.max_calls_in_a_minute <= u64::from(BUDGET),
        "{stats:?}"
    );
    assert!(
        stats.tokens_issued >= 3,
        "tokens expired and were refreshed: {stats:?}"
    );
    assert!(
        stats.stale_secret >= 1 && stats.authorizations >= 3,
        "the secret rotated: {stats:?}"
    );
    assert!(stats.injected_faults > 0, "faults were injected: {stats:?}");

    for worker in &workers {
        worker.terminate().unwrap();
    }
    for worker in &mut workers {
        let status = worker.wait(Duration::from_secs(30)).await.unwrap();
        assert!(
            status.success(),
            "{} exited with {status}:\n{}",
            worker.worker.binary(),
            worker.log_tail(20)
        );
    }
    scenario.clean_up(false).await.unwrap();
}
