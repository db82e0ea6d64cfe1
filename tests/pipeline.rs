//! End-to-end tests: the simulator, the worker binaries as real processes, the machine's RabbitMQ and
//! PostgreSQL. Each test has its own queue namespace and schema, so tests run in parallel and again.
//! They fail (never skip) when RabbitMQ or PostgreSQL is down.

use std::process::Command;
use std::time::Duration;

mod common;

use common::*;
use conveyor_amqp::envelope::{Compression, Envelope, Meta};
use conveyor_base::{Record, Stage};
use conveyor_harness::{Scenario, Worker, WorkerProcess};
use kingdee_sim::SimConfig;
use lapin::BasicProperties;
use lapin::options::BasicGetOptions;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_writers_land_exactly_the_source() {
    let scenario = scenario("e2e", orders(3_000)).await;
    let mut workers = vec![
        scenario.spawn(Worker::Transformer, &[]).unwrap(),
        scenario.spawn(Worker::Writer, &[]).unwrap(),
        scenario.spawn(Worker::Writer, &[]).unwrap(),
    ];
    run_fetcher_once(&scenario).await;
    assert_target_equals_truth(&scenario, &workers).await;

    // A second sync goes on from the watermark (less the overlap): nothing new, nothing doubled.
    run_fetcher_once(&scenario).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let depths = wait_for_empty_work_queues(&scenario).await;
    assert_target_equals_truth(&scenario, &workers).await;
    assert!(
        depths.iter().all(|(_, n)| *n == 0),
        "queues not empty: {depths:?}"
    );

    stop_all(&mut workers).await;
    // ERROR means a human should look: a clean run and a clean stop log none.
    let errors = scenario.logged_errors();
    assert!(errors.is_empty(), "{errors:#?}");
    scenario.clean_up(false).await.unwrap();
}

/// `CONVEYOR_COMPRESS_FROM_BYTES=off` publishes plain bodies, and workers with and without compression
/// work together: each reads either kind. The fetcher gathers pages into messages of
/// `source.records_per_message` (300 here, pages of 100).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_with_and_without_compression_work_together() {
    let scenario = scenario("compress", orders(1_500)).await;
    step("a fetcher with compression off publishes its pages plain");
    let mut fetcher = scenario
        .spawn_with_env(
            Worker::Fetcher,
            &["--once"],
            &[("CONVEYOR_COMPRESS_FROM_BYTES", "off")],
        )
        .unwrap();
    assert!(
        fetcher.wait(TIMEOUT).await.unwrap().success(),
        "{}",
        fetcher.log_tail(30)
    );
    let connection = conveyor_amqp::connect(&scenario.services.broker().unwrap(), "test")
        .await
        .unwrap();
    let channel = connection.create_channel().await.unwrap();
    // Held unacknowledged until the channel closes, which hands them back to the queue.
    let mut sizes = Vec::new();
    while let Some(message) = channel
        .basic_get(
            scenario.topology().queue(Stage::Transform).as_str().into(),
            BasicGetOptions { no_ack: false },
        )
        .await
        .unwrap()
    {
        let delivery = message.delivery;
        assert_eq!(delivery.properties.content_encoding(), &None);
        let batch =
            Envelope::from_amqp("sales_orders", &delivery.data, &delivery.properties).unwrap();
        sizes.push(batch.records.len());
    }
    assert_eq!(
        sizes.iter().sum::<usize>(),
        scenario.expected_records().len(),
        "{sizes:?}"
    );
    assert_eq!(
        sizes.iter().max(),
        Some(&300),
        "pages of 100 gathered three to a message: {sizes:?}"
    );
    connection.close(200, "done".into()).await.unwrap();

    step("a compressing transformer reads them; a writer reads its compressed output");
    let mut workers = vec![
        scenario.spawn(Worker::Transformer, &[]).unwrap(),
        scenario.spawn(Worker::Writer, &[]).unwrap(),
    ];
    assert_target_equals_truth(&scenario, &workers).await;
    stop_all(&mut workers).await;
    scenario.clean_up(false).await.unwrap();
}

/// The README's demo (`ops/demo.sh` runs `conveyor-dev demo`), small, on the debug binaries, in a
/// schema and namespace of its own: it must end with its "ok" line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_lands_the_source_and_stops_cleanly() {
    let services = services().await;
    // Named like the harness's namespaces, so that ops/test.sh removes its queues if it is killed.
    let name = format!("demo_{:010x}", rand::random::<u64>() >> 24);
    let args = conveyor_bench::demo::DemoArgs {
        pipeline: sales_orders_pipeline(),
        orders: 2000,
        seed: 42,
        writers: 2,
        schema: name.clone(),
        namespace: name.clone(),
        timeout_secs: 100,
    };
    let report = conveyor_bench::demo::run(&args, &bin_dir()).await.unwrap();
    let summary = report.to_string();
    for expected in [
        "records in the simulator:  2000",
        &format!("rows in \"{name}\".\"sales_orders\": 2000"),
        "missing: 0, unexpected: 0, wrong version: 0",
        "3 of 3 workers stopped cleanly on SIGTERM",
        "ok: the target equals the source",
    ] {
        assert!(summary.contains(expected), "no {expected:?} in:\n{summary}");
    }
    assert!(report.is_ok(), "{summary}");
    conveyor_harness::pg_client(&services.pg_url)
        .await
        .unwrap()
        .batch_execute(&format!("DROP SCHEMA \"{name}\" CASCADE"))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writer_killed_mid_batch_loses_nothing() {
    let scenario = scenario("kill", orders(5_000)).await;
    let mut workers = vec![scenario.spawn(Worker::Transformer, &[]).unwrap()];
    // Everything is fetched and transformed before the writer starts, so that it works on full queues.
    run_fetcher_once(&scenario).await;
    let mut writer = scenario.spawn(Worker::Writer, &[]).unwrap();
    let client = conveyor_harness::pg_client(&scenario.services.pg_url)
        .await
        .unwrap();
    let total = scenario.expected_records().len();
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        let written = scenario.target_count(&client).await.unwrap();
        assert!(
            written < total,
            "the writer finished before it could be killed; use more records"
        );
        if written > 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the writer wrote nothing:\n{}",
            writer.log_tail(30)
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    writer.kill().await.unwrap();
    let written_at_kill = scenario.target_count(&client).await.unwrap();
    assert!(written_at_kill < total, "killed too late to prove anything");

    workers.push(scenario.spawn(Worker::Writer, &[]).unwrap());
    assert_target_equals_truth(&scenario, &workers).await;
    stop_all(&mut workers).await;
    scenario.clean_up(false).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_records_are_dead_lettered_alone() {
    let scenario = scenario(
        "poison",
        SimConfig {
            poison_every: 97,
            ..orders(1_000)
        },
    )
    .await;
    let mut workers = vec![
        scenario.spawn(Worker::Transformer, &[]).unwrap(),
        scenario.spawn(Worker::Writer, &[]).unwrap(),
    ];
    run_fetcher_once(&scenario).await;
    assert_target_equals_truth(&scenario, &workers).await;

    let mut poisoned = scenario.simulator.poisoned_orders();
    assert_eq!(poisoned.len(), 10);
    let letters = scenario.peek_dead_letters(Stage::Transform).await.unwrap();
    let mut dead_ids: Vec<String> = letters.iter().flat_map(|l| l.record_ids.clone()).collect();
    poisoned.sort();
    dead_ids.sort();
    assert_eq!(dead_ids, poisoned, "exactly the poison records, each once");
    for letter in &letters {
        assert_eq!(letter.record_ids.len(), 1, "each bad record on its own");
        assert_eq!(letter.class, "permanent");
        assert_eq!(letter.stage, "transform");
        assert!(
            letter.error.contains("total_amount"),
            "reason names the field: {}",
            letter.error
        );
        assert!(!letter.trace_id.is_empty());
        assert_eq!(letter.original_routing_key, "sales_orders.transform");
    }
    stop_all(&mut workers).await;
    scenario.clean_up(false).await.unwrap();
}

fn json_properties(meta: &Meta) -> BasicProperties {
    let envelope = Envelope {
        meta: meta.clone(),
        records: Vec::new(),
    };
    envelope.to_amqp(Compression::default()).1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_messages_go_to_each_stage_dead_letter_queue() {
    let scenario = scenario("malformed", orders(200)).await;
    let mut workers = vec![
        scenario.spawn(Worker::Transformer, &[]).unwrap(),
        scenario.spawn(Worker::Writer, &[]).unwrap(),
    ];
    let meta = Meta::new_trace("sales_orders");
    let good_headers = json_properties(&meta);
    let wrong_pipeline = json_properties(&Meta::new_trace("someone_else"));
    let bad_inputs: Vec<(&[u8], BasicProperties, &str)> = vec![
        (
            b"this is not json",
            good_headers.clone(),
            "not a conveyor batch",
        ),
        (
            br#"{"schema":99,"records":[]}"#,
            good_headers.clone(),
            "schema version 99",
        ),
        (
            br#"{"schema":1,"records":[{"id":"1"}]}"#,
            good_headers.clone(),
            "not a conveyor batch",
        ),
        (
            br#"{"schema":1,"records":[]}"#,
            BasicProperties::default(),
            "message id",
        ),
        (
            br#"{"schema":1,"records":[]}"#,
            wrong_pipeline,
            "someone_else",
        ),
    ];
    for stage in [Stage::Fetch, Stage::Transform, Stage::Write] {
        for (body, properties, _) in &bad_inputs {
            scenario
                .publish_raw(stage, body, properties.clone())
                .await
                .unwrap();
        }
    }
    // A valid batch with a record the target refuses (its bill_no is missing, which the table forbids):
    // it must end in the write dead-letter queue while its good neighbour is written.
    let good_and_bad = Envelope {
        meta: meta.next_stage(),
        records: vec![
            Record::new(
                "1".into(),
                "2025-01-01T08:00:00+08:00".parse().unwrap(),
                &serde_json::json!({"id": "1", "bill_no": "XSDD-1", "modify_time": "2025-01-01T08:00:00+08:00"}),
            ),
            Record::new(
                "2".into(),
                "2025-01-01T08:00:00+08:00".parse().unwrap(),
                &serde_json::json!({"id": "2", "modify_time": "2025-01-01T08:00:00+08:00"}),
            ),
        ],
    };
    let (body, properties) = good_and_bad.to_amqp(Compression::default());
    scenario
        .publish_raw(Stage::Write, &body, properties)
        .await
        .unwrap();

    // The workers survive all of it and still move real records.
    run_fetcher_once(&scenario).await;
    let client = conveyor_harness::pg_client(&scenario.services.pg_url)
        .await
        .unwrap();
    let expected = scenario.expected_records().len() + 1;
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    while scenario.target_count(&client).await.unwrap() < expected {
        assert!(
            tokio::time::Instant::now() < deadline,
            "records did not land:\n{}",
            workers[1].log_tail(30)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    for stage in [Stage::Fetch, Stage::Transform, Stage::Write] {
        let letters = scenario.peek_dead_letters(stage).await.unwrap();
        let mut malformed: Vec<_> = letters.iter().filter(|l| l.class == "malformed").collect();
        assert_eq!(malformed.len(), bad_inputs.len(), "{stage}: {letters:?}");
        // Consumers work on several messages at once, so dead letters may come in any order.
        for (body, _, reason) in &bad_inputs {
            let found = malformed
                .iter()
                .position(|letter| letter.body == *body && letter.error.contains(reason))
                .unwrap_or_else(|| {
                    panic!("{stage}: no dead letter with the payload unchanged mentioning {reason:?}: {malformed:?}")
                });
            assert_eq!(malformed.remove(found).stage, stage.as_str());
        }
        if stage == Stage::Write {
            let refused: Vec<_> = letters.iter().filter(|l| l.class == "permanent").collect();
            assert_eq!(refused.len(), 1, "{letters:?}");
            assert_eq!(refused[0].record_ids, ["2"]);
            assert!(refused[0].error.contains("bill_no"), "{}", refused[0].error);
        }
    }
    stop_all(&mut workers).await;
    scenario.clean_up(false).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_serve_health_readiness_and_metrics() {
    let scenario = scenario("health", orders(100)).await;
    let mut workers = vec![
        scenario.spawn(Worker::Transformer, &[]).unwrap(),
        scenario.spawn(Worker::Writer, &[]).unwrap(),
    ];
    let http = conveyor_base::tls::http_client(None).build().unwrap();
    for worker in &workers {
        let base = format!("http://{}", worker.http_addr);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let ready = http.get(format!("{base}/readyz")).send().await;
            if matches!(&ready, Ok(response) if response.status() == 200) {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{} never ready:\n{}",
                worker.worker.binary(),
                worker.log_tail(20)
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let health = http.get(format!("{base}/healthz")).send().await.unwrap();
        assert_eq!(health.status(), 200);
    }
    run_fetcher_once(&scenario).await;
    assert_target_equals_truth(&scenario, &workers).await;
    let writer_metrics = http
        .get(format!("http://{}/metrics", workers[1].http_addr))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for expected in [
        r#"conveyor_records_in_total{pipeline="sales_orders",stage="write"} 100"#,
        r#"conveyor_records_out_total{pipeline="sales_orders",stage="write"} 100"#,
        r#"conveyor_target_rows_total{outcome="applied",pipeline="sales_orders"} 100"#,
        r#"conveyor_ready{pipeline="sales_orders",stage="write"} 1"#,
        r#"conveyor_queue_messages{pipeline="sales_orders",queue="dead_letter",stage="write"} 0"#,
        r#"conveyor_messages_in_hand{pipeline="sales_orders",stage="write"} 0"#,
        "conveyor_target_write_duration_seconds_bucket",
    ] {
        assert!(
            writer_metrics.contains(expected),
            "missing {expected} in:\n{writer_metrics}"
        );
    }
    assert!(!writer_metrics.contains("guest"), "no secret in metrics");
    stop_all(&mut workers).await;
    scenario.clean_up(false).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_once_sync_whose_window_is_dead_lettered_fails_with_the_reason() {
    // An API the gateway does not serve: each window's first page is refused for good.
    let scenario = Scenario::start(
        services().await,
        &sales_orders_pipeline(),
        &bin_dir(),
        "once_refused",
        orders(10),
        &[(
            "path",
            toml::Value::String("/jdy/v2/scm/sal_order_gone".into()),
        )],
    )
    .await
    .expect("scenario starts");
    let mut fetcher = scenario.spawn(Worker::Fetcher, &["--once"]).unwrap();
    let status = fetcher.wait(Duration::from_secs(60)).await.unwrap();
    let log = fetcher.log_tail(10);
    assert!(!status.success(), "{log}");
    assert!(
        log.contains("a window was dead-lettered")
            && log.contains("conveyorctl dlq show sales_orders --stage fetch"),
        "{log}"
    );
    // Every window was refused for the same reason (the fetcher stops once the first one is).
    let letters = scenario.peek_dead_letters(Stage::Fetch).await.unwrap();
    assert!(!letters.is_empty());
    for letter in &letters {
        assert_eq!(
            (letter.class.as_str(), letter.error.as_str()),
            (
                "permanent",
                "GET /jdy/v2/scm/sal_order_gone: HTTP 404: no such API at this address (check the pipeline's source.path)"
            )
        );
    }
    scenario.clean_up(false).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_once_sync_with_a_wrong_client_secret_ends_at_once_naming_it() {
    let scenario = scenario("once_wrong_secret", orders(10)).await;
    scenario.declare_topology().await.unwrap();
    let secret = "not-the-secret-7f3a";
    let mut fetcher = scenario
        .spawn_with_env(
            Worker::Fetcher,
            &["--once"],
            &[("CONVEYOR_KINGDEE_CLIENT_SECRET", secret)],
        )
        .unwrap();
    let status = fetcher.wait(Duration::from_secs(60)).await.unwrap();
    let log = fetcher.log_tail(10);
    assert!(!status.success(), "{log}");
    assert!(
        log.contains("code 4008, the request's signature does not match: the client secret is wrong (check CONVEYOR_KINGDEE_CLIENT_SECRET)"),
        "{log}"
    );
    assert!(
        !log.contains(secret),
        "the secret must not be logged: {log}"
    );
    assert!(
        scenario
            .peek_dead_letters(Stage::Fetch)
            .await
            .unwrap()
            .is_empty(),
        "a setup error is no window's fault"
    );
    scenario.clean_up(false).await.unwrap();
}

#[test]
fn every_binary_refuses_a_bad_pipeline_file_with_the_same_message() {
    let dir = std::env::temp_dir().join(format!("conveyor-bad-pipeline-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("bad.toml");
    let good = std::fs::read_to_string(sales_orders_pipeline()).unwrap();
    std::fs::write(
        &file,
        good.replace("type = \"decimal\"", "type = \"money\""),
    )
    .unwrap();
    let expected = format!(
        "pipeline file {}: field `transform.fields[6].type`: unknown variant `money`",
        file.display()
    );

    let check = Command::new(bin_dir().join("conveyorctl"))
        .arg("check")
        .arg(&file)
        .output()
        .unwrap();
    assert!(!check.status.success());
    let check_stderr = String::from_utf8_lossy(&check.stderr);
    assert!(
        check_stderr.starts_with(&format!("error: {expected}")),
        "conveyorctl: {check_stderr}"
    );

    for binary in [
        "conveyor-fetcher",
        "conveyor-transformer",
        "conveyor-writer",
    ] {
        let output = Command::new(bin_dir().join(binary))
            .env("CONVEYOR_PIPELINE", &file)
            .env("CONVEYOR_HTTP_ADDR", "127.0.0.1:0")
            .output()
            .unwrap();
        assert!(
            !output.status.success(),
            "{binary} started with a bad pipeline file"
        );
        // Said once: a worker's stderr is its log, and the error is its last line.
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(stderr.matches(&expected).count(), 1, "{binary}: {stderr}");
        assert!(
            stderr
                .lines()
                .last()
                .is_some_and(|line| line.contains("ERROR") && line.contains(&expected)),
            "{binary}: {stderr}"
        );
    }
    let valid = Command::new(bin_dir().join("conveyorctl"))
        .arg("check")
        .arg(sales_orders_pipeline())
        .output()
        .unwrap();
    succeeded("conveyorctl check", valid);
}

/// `conveyorctl check` shows when a pipeline with a `source.schedule` plans, in its zone, and names a
/// wrong expression with its line.
#[test]
fn check_shows_a_schedule_s_next_run_times() {
    let dir = std::env::temp_dir().join(format!("conveyor-check-schedule-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let good = std::fs::read_to_string(sales_orders_pipeline()).unwrap();
    let file = dir.join("pipeline.toml");
    let with = |schedule: &str| {
        good.replace(
            "calls_per_minute = 500",
            &format!("calls_per_minute = 500\nschedule = {schedule:?}\ntime_zone = \"+08:00\""),
        )
        .replace(
            "migrations = \"../migrations/sales_orders\"",
            &format!(
                "migrations = {:?}",
                repo_root()
                    .join("ops/migrations/sales_orders")
                    .display()
                    .to_string()
            ),
        )
    };
    std::fs::write(&file, with("30 9 * * *")).unwrap();
    let output = Command::new(bin_dir().join("conveyorctl"))
        .arg("check")
        .arg(&file)
        .output()
        .unwrap();
    let stdout = succeeded("conveyorctl check", output);
    let line = stdout
        .lines()
        .find(|line| {
            line.contains("plans new windows on schedule \"30 9 * * *\" in +08:00; next: ")
        })
        .unwrap_or_else(|| panic!("{stdout}"));
    assert_eq!(line.matches(" 09:30 +08:00").count(), 3, "{line}");

    let wrong = with("30 9 * *");
    let line = 1 + wrong
        .lines()
        .position(|line| line.starts_with("schedule ="))
        .unwrap();
    std::fs::write(&file, wrong).unwrap();
    let output = Command::new(bin_dir().join("conveyorctl"))
        .arg("check")
        .arg(&file)
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("field `source.schedule`: \"30 9 * *\" is not a cron expression")
            && stderr.contains(&format!("(line {line})")),
        "{stderr}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `conveyorctl check --pg-url` runs a postgres target's migrations in a scratch schema it rolls
/// back, and refuses a mapping with a column the table lacks, before any writer creates anything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_with_a_database_finds_a_mapped_column_the_migrations_lack_and_changes_nothing() {
    let services = services().await;
    let dir = std::env::temp_dir().join(format!("conveyor-check-pg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let migrations = repo_root().join("ops/migrations/sales_orders");
    let good = std::fs::read_to_string(sales_orders_pipeline())
        .unwrap()
        .replace(
            "migrations = \"../migrations/sales_orders\"",
            &format!("migrations = {:?}", migrations.display().to_string()),
        );
    let check = |text: String| {
        let file = dir.join("pipeline.toml");
        std::fs::write(&file, text).unwrap();
        Command::new(bin_dir().join("conveyorctl"))
            .arg("check")
            .arg(&file)
            .env("CONVEYOR_PG_URL", services.pg_url.expose())
            .output()
            .unwrap()
    };
    let ok = check(good.clone());
    let stdout = succeeded("conveyorctl check --pg-url", ok);
    assert!(stdout.contains("with every mapped column"), "{stdout}");

    let extra = good.replace(
        "  { to = \"lines\", from = \"material_entity\" },",
        "  { to = \"lines\", from = \"material_entity\" },\n  { to = \"remark\", type = \"string\" },",
    );
    assert_ne!(extra, good);
    let refused = check(extra);
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("table sales_orders: has no column for the mapped field(s) [\"remark\"]"),
        "{stderr}"
    );
    let client = conveyor_harness::pg_client(&services.pg_url).await.unwrap();
    let left: i64 = client
        .query_one(
            "SELECT count(*) FROM information_schema.schemata WHERE schema_name LIKE 'conveyor_check_%'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 0, "the dry run leaves no schema behind");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topology_declare_is_idempotent() {
    let scenario = scenario("topology", orders(10)).await;
    for _ in 0..2 {
        let pipeline_file = sales_orders_pipeline();
        let stdout = ctl_ok(
            &scenario,
            &["topology", "declare", pipeline_file.to_str().unwrap()],
        );
        assert!(
            stdout.contains(&format!(
                "declared {}.sales_orders.write.dlq",
                scenario.namespace
            )),
            "{stdout}"
        );
    }
    let depths = scenario.queue_depths().await.unwrap();
    // 3 work queues (fetch windows, transform, write) with 3 retry tiers each, and 3 dead-letter queues.
    assert_eq!(depths.len(), 15, "{depths:?}");
    scenario.clean_up(false).await.unwrap();
}

#[test]
fn conveyorctl_kingdee_sign_prints_the_string_to_sign_then_the_signature() {
    // The official documentation's example (also in crates/kingdee/tests/signature-vectors.json).
    const SECRET: &str = "f2adcfef73369bfc4e1384677d38a0ff";
    let sign = || {
        let mut command = Command::new(bin_dir().join("conveyorctl"));
        command
            .args(["kingdee", "sign", "--method", "GET"])
            .args(["--path", "/jdyconnector/app_management/kingdee_auth_token"])
            .args(["--query", "app_key=bVZgAZOv1"])
            .args([
                "--query",
                "app_signature=MzZlYTk0ODk4MWZlNjdiODNmNWU4YzViNzYxNGM5MTFlOGJkN2NjMzk0MTJkZGNhZGM0NzZhN2YxZDJmOTlkZA==",
            ])
            .args(["--nonce", "4427456950", "--timestamp", "1670305063559"])
            .env_remove("CONVEYOR_KINGDEE_CLIENT_SECRET")
            .env_remove("CONVEYOR_KINGDEE_CLIENT_SECRET_FILE");
        command
    };
    // The secret from the environment and from a file sign the same, kept off the command line.
    let file = std::env::temp_dir().join(format!("conveyor-sign-secret-{}", std::process::id()));
    std::fs::write(&file, format!("{SECRET}\n")).unwrap();
    let from_env = succeeded(
        "conveyorctl kingdee sign (secret from the environment)",
        sign()
            .env("CONVEYOR_KINGDEE_CLIENT_SECRET", SECRET)
            .output()
            .unwrap(),
    );
    let from_file = succeeded(
        "conveyorctl kingdee sign (secret from a file)",
        sign()
            .env("CONVEYOR_KINGDEE_CLIENT_SECRET_FILE", &file)
            .output()
            .unwrap(),
    );
    std::fs::remove_file(&file).unwrap();
    let missing = sign().output().unwrap();
    assert!(
        !missing.status.success()
            && String::from_utf8_lossy(&missing.stderr).contains("CONVEYOR_KINGDEE_CLIENT_SECRET"),
        "{missing:?}"
    );
    let output = sign().args(["--client-secret", SECRET]).output().unwrap();
    let stdout = succeeded("conveyorctl kingdee sign", output);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        lines,
        [
            "GET",
            "%2Fjdyconnector%2Fapp_management%2Fkingdee_auth_token",
            "app_key=bVZgAZOv1&app_signature=MzZlYTk0ODk4MWZlNjdiODNmNWU4YzViNzYxNGM5MTFlOGJkN2NjMzk0MTJkZGNhZGM0NzZhN2YxZDJmOTlkZA%253D%253D",
            "x-api-nonce:4427456950",
            "x-api-timestamp:1670305063559",
            "OTFiZTliNDFiMjNkYTI3YzVhNzg4MDI4ZGU3MWY1ZTA5ZTk1NjVlNGM1YTI1ZjIxY2Y5YTA3ZGY2OGI1MGQ1MQ==",
        ]
    );
    assert_eq!(from_env, stdout);
    assert_eq!(from_file, stdout);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conveyorctl_kingdee_token_says_whether_the_credentials_work() {
    use kingdee_sim::gate::{
        DEMO_ACCOUNT, DEMO_CLIENT_ID, DEMO_CLIENT_SECRET, DEMO_OUTER_INSTANCE_ID,
    };
    let sim = kingdee_sim::Simulator::new(orders(1));
    let addr = kingdee_sim::spawn(sim, ([127, 0, 0, 1], 0).into())
        .await
        .unwrap();
    let token = |secret: &str| {
        tokio::process::Command::new(bin_dir().join("conveyorctl"))
            .args(["kingdee", "token"])
            .env("CONVEYOR_KINGDEE_BASE_URL", format!("http://{addr}"))
            .env("CONVEYOR_KINGDEE_CLIENT_ID", DEMO_CLIENT_ID)
            .env("CONVEYOR_KINGDEE_CLIENT_SECRET", secret)
            .env("CONVEYOR_KINGDEE_OUTER_INSTANCE_ID", DEMO_OUTER_INSTANCE_ID)
            .output()
    };
    let good = token(DEMO_CLIENT_SECRET).await.unwrap();
    assert!(succeeded("conveyorctl kingdee token", good).contains(DEMO_ACCOUNT));

    let bad = token("wrong-secret-value").await.unwrap();
    assert!(!bad.status.success());
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(
        stderr.contains("the credentials do not work") && stderr.contains("4008"),
        "{stderr}"
    );
    assert!(
        !stderr.contains("wrong-secret-value"),
        "the secret must not be printed: {stderr}"
    );
}

/// The pipeline that flattens sales orders into their entry lines, into the target simulator.
struct LinesRun {
    scenario: conveyor_harness::Scenario,
    sim: std::sync::Arc<target_sim::TargetSim>,
    /// The writer's settings for the target simulator.
    target_env: Vec<(&'static str, String)>,
}

const LINES_COLLECTION: &str = "sales_order_lines";
const LINES_CLIENT_SECRET: &str = "accounting-client-secret";

async fn lines_run(prefix: &str, sim_orders: usize, target: target_sim::TargetConfig) -> LinesRun {
    let pipeline = repo_root().join("ops/pipelines/sales_order_lines_http.toml");
    let mut scenario = conveyor_harness::Scenario::start(
        services().await,
        &pipeline,
        &bin_dir(),
        prefix,
        orders(sim_orders),
        &[],
    )
    .await
    .expect("scenario starts");
    // The fetcher keeps running (its counts are part of the accounting) and syncs once at its start.
    scenario.set_env("CONVEYOR_FETCH_INTERVAL_SECS", "3600");
    scenario.declare_topology().await.unwrap();
    let sim = target_sim::TargetSim::new(target_sim::TargetConfig {
        key_field: "line_id".into(),
        version_field: Some("modified_at".into()),
        client: Some(("conveyor-accounting".into(), LINES_CLIENT_SECRET.into())),
        ..target
    });
    let addr = target_sim::spawn(sim.clone(), ([127, 0, 0, 1], 0).into())
        .await
        .unwrap();
    let target_env = vec![
        ("CONVEYOR_HTTP_TARGET_URL", format!("http://{addr}")),
        (
            "CONVEYOR_HTTP_TARGET_CLIENT_ID",
            "conveyor-accounting".into(),
        ),
        (
            "CONVEYOR_HTTP_TARGET_CLIENT_SECRET",
            LINES_CLIENT_SECRET.into(),
        ),
        // The target simulator serves plain HTTP on the loopback.
        ("CONVEYOR_HTTP_TARGET_ALLOW_PLAIN_HTTP", "true".into()),
    ];
    LinesRun {
        scenario,
        sim,
        target_env,
    }
}

impl LinesRun {
    fn spawn_writer(&self) -> WorkerProcess {
        self.spawn_writer_with(&[])
    }

    /// A writer with more settings (e.g. its prefetch, its drain timeout).
    fn spawn_writer_with(&self, settings: &[(&str, &str)]) -> WorkerProcess {
        let env: Vec<(&str, &str)> = self
            .target_env
            .iter()
            .map(|(name, value)| (*name, value.as_str()))
            .chain(settings.iter().copied())
            .collect();
        self.scenario
            .spawn_with_env(Worker::Writer, &[], &env)
            .unwrap()
    }

    /// The lines the target holds that the truth does not, or holds at another version; and those it
    /// lacks.
    fn differences(&self) -> Vec<String> {
        let truth = self.scenario.expected_order_lines();
        let held = self.sim.records(LINES_COLLECTION);
        let mut problems: Vec<String> = truth
            .iter()
            .filter(|(id, version)| {
                held.get(*id)
                    .and_then(|record| record["modified_at"].as_str())
                    != Some(version.as_str())
            })
            .map(|(id, _)| format!("missing or wrong version: {id}"))
            .collect();
        problems.extend(
            held.keys()
                .filter(|id| !truth.contains_key(*id))
                .map(|id| format!("unexpected: {id}")),
        );
        problems
    }

    /// Waits until the target holds exactly the truth.
    async fn wait_until_target_equals_truth(&self, workers: &[&WorkerProcess]) {
        wait_until_no_problems(workers.iter().copied(), || self.differences()).await;
    }
}

/// `conveyorctl status` of the scenario's pipeline over `workers`, as text or `--json`.
fn status_command(
    scenario: &conveyor_harness::Scenario,
    workers: &[&WorkerProcess],
    json: bool,
) -> std::process::Output {
    let mut args = vec!["status".to_owned(), scenario.pipeline.name().to_owned()];
    if json {
        args.push("--json".into());
    }
    args.extend(
        workers
            .iter()
            .map(|worker| format!("--worker=http://{}", worker.http_addr)),
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    ctl(scenario, &args)
}

/// `conveyorctl status --json` over `workers`: whether it succeeded, the pipeline's status, and what it
/// printed on standard error.
fn status(
    scenario: &conveyor_harness::Scenario,
    workers: &[&WorkerProcess],
) -> (bool, serde_json::Value, String) {
    let output = status_command(scenario, workers, true);
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    let parsed: serde_json::Value = serde_json::from_str(&stdout)
        .unwrap_or_else(|err| panic!("status --json printed no JSON ({err}): {stdout}{stderr}"));
    (output.status.success(), parsed[0].clone(), stderr)
}

/// The status once no stage has records in flight (the last acks are counted just after the writes
/// they follow).
async fn settled_status(
    scenario: &conveyor_harness::Scenario,
    workers: &[&WorkerProcess],
) -> serde_json::Value {
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        let (ok, status, stderr) = status(scenario, workers);
        let moving = status["stages"]
            .as_array()
            .unwrap()
            .iter()
            .any(|stage| stage["in_flight"] != 0);
        if !moving {
            assert!(ok, "status failed: {stderr}\n{status:#}");
            return status;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "records still in flight after {TIMEOUT:?}: {status:#}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn stage<'a>(status: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    status["stages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|stage| stage["stage"] == name)
        .unwrap_or_else(|| panic!("no stage {name} in {status:#}"))
}

/// Orders flattened into lines: the transform stage counts orders, the write stage lines, and each adds
/// up on its own, with the target's transient refusals (429) retried, and malformed messages in two
/// queues counted as messages, not records. (Records refused one by one, and replays: the replay test
/// in failures.rs.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_accounts_for_flattened_records_stage_by_stage() {
    let run = lines_run(
        "acct_lines",
        300,
        target_sim::TargetConfig {
            rate_429: 0.1,
            ..Default::default()
        },
    )
    .await;
    let scenario = &run.scenario;
    let lines = scenario.expected_order_lines().len();
    let orders = scenario.expected_records().len();
    assert!(lines > orders, "orders have 1 to 4 lines each");
    within(TIMEOUT, async {
        for stage in [Stage::Transform, Stage::Write] {
            scenario
                .publish_raw(stage, b"not a batch", BasicProperties::default())
                .await
                .unwrap();
        }
        let mut workers = vec![
            scenario.spawn(Worker::Transformer, &[]).unwrap(),
            run.spawn_writer(),
            run.spawn_writer(),
            scenario.spawn(Worker::Fetcher, &[]).unwrap(),
        ];
        step("waiting for every line in the target");
        while run.sim.records(LINES_COLLECTION).len() < lines {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        wait_for_empty_work_queues(scenario).await;

        let all: Vec<&WorkerProcess> = workers.iter().collect();
        let status = settled_status(scenario, &all).await;
        eprintln!("{status:#}");
        assert_eq!(status["fetched"], orders, "{status:#}");
        let transform = stage(&status, "transform");
        assert_eq!(
            transform["entered"], orders,
            "orders at the transform stage"
        );
        assert_eq!(transform["settled"], orders);
        let write = stage(&status, "write");
        assert_eq!(write["entered"], lines, "lines at the write stage");
        assert_eq!(write["settled"], lines);
        assert_eq!(status["written"], lines);
        assert_eq!(status["dead_lettered"], 0);
        assert_eq!(status["malformed_messages"], 2, "{status:#}");
        assert_eq!(
            (&status["in_flight"], &status["unaccounted"]),
            (&0.into(), &0.into())
        );

        // The text report says so too.
        let text = succeeded("conveyorctl status", status_command(scenario, &all, false));
        assert!(
            text.contains("ok: every record sent into a stage is settled"),
            "{text}"
        );
        stop_all(&mut workers).await;
    })
    .await;
    scenario.clean_up(false).await.unwrap();
}

/// Lines purged from the write queue behind the pipeline's back are flagged as unaccounted for, at the
/// write stage, and the command fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_flags_records_purged_behind_the_pipelines_back() {
    let run = lines_run("acct_purged", 100, Default::default()).await;
    let scenario = &run.scenario;
    let lines = scenario.expected_order_lines().len();
    within(TIMEOUT, async {
        let mut workers = vec![
            scenario.spawn(Worker::Transformer, &[]).unwrap(),
            scenario.spawn(Worker::Fetcher, &[]).unwrap(),
        ];
        step("waiting for every line in the write queue, with no writer running");
        let write_queue = scenario.topology().queue(Stage::Write);
        loop {
            // Until the first settlement, the ledger knows nothing of the pipeline: status says so.
            let output = status_command(scenario, &workers.iter().collect::<Vec<_>>(), true);
            if output.status.success() {
                let status: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
                if stage(&status[0], "write")["entered"] == lines {
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let connection = conveyor_amqp::connect(&scenario.services.broker().unwrap(), "test")
            .await
            .unwrap();
        let channel = connection.create_channel().await.unwrap();
        let purged = channel
            .queue_purge(write_queue.as_str().into(), Default::default())
            .await
            .unwrap();
        assert!(purged > 0, "messages were waiting in {write_queue}");
        conveyor_amqp::close(&connection).await;

        step("a writer comes, finds nothing; status flags the purged lines");
        workers.push(run.spawn_writer());
        wait_ready(&workers[2], true, TIMEOUT).await;
        let all: Vec<&WorkerProcess> = workers.iter().collect();
        let (ok, status, stderr) = status(scenario, &all);
        assert!(!ok, "status must fail: {status:#}");
        assert_eq!(stage(&status, "write")["unaccounted"], lines, "{status:#}");
        assert_eq!(stage(&status, "transform")["unaccounted"], 0, "{status:#}");
        assert_eq!(status["unaccounted"], lines);
        assert!(
            stderr.contains("unaccounted for") && stderr.contains(&format!("{lines} at write")),
            "{stderr}"
        );
        let text = status_command(scenario, &all, false);
        let stdout = String::from_utf8_lossy(&text.stdout);
        assert!(!text.status.success());
        assert!(
            stdout.contains("UNACCOUNTED") && stdout.contains("at write"),
            "{stdout}"
        );
        stop_all(&mut workers).await;
    })
    .await;
    scenario.clean_up(false).await.unwrap();
}

/// SIGTERM to a writer that holds messages while its target is slow (every call takes 300 ms): it takes
/// no new work, finishes and acks what it holds well within the drain timeout, and exits 0; a new writer
/// finishes the run, and the target ends with exactly the truth, no line lost and none written twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_a_slow_writer_and_another_finishes_the_run() {
    let run = lines_run(
        "drain",
        3_000,
        target_sim::TargetConfig {
            latency: Duration::from_millis(300),
            ..Default::default()
        },
    )
    .await;
    let scenario = &run.scenario;
    let drain_timeout = Duration::from_secs(15);
    within(TIMEOUT, async {
        step("everything fetched and transformed before the first writer starts");
        let transformer = spawn_ready(scenario, Worker::Transformer).await;
        run_fetcher_once(scenario).await;
        let lines = scenario.expected_order_lines().len();
        loop {
            let published = metric(&transformer, "conveyor_records_out_total", &[]).await;
            if published as usize == lines {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let drain = drain_timeout.as_secs().to_string();
        let mut writer = run.spawn_writer_with(&[
            ("CONVEYOR_PREFETCH", "4"),
            ("CONVEYOR_DRAIN_TIMEOUT_SECS", drain.as_str()),
        ]);
        step("SIGTERM once the writer holds messages and has written some lines");
        loop {
            let held = metric(&writer, "conveyor_messages_in_hand", &[]).await;
            let written = run.sim.records(LINES_COLLECTION).len();
            assert!(
                written < lines,
                "the writer finished before it could be stopped"
            );
            if held > 0.0 && written > 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let stopping = std::time::Instant::now();
        writer.terminate().unwrap();
        let status = writer.wait(drain_timeout).await.unwrap();
        let took = stopping.elapsed();
        let log = std::fs::read_to_string(&writer.log).unwrap();
        assert!(status.success(), "{status}:\n{}", writer.log_tail(20));
        assert!(
            log.contains("finishing the messages in hand"),
            "it held messages when stopped:\n{}",
            writer.log_tail(20)
        );
        assert!(!log.contains("drain timeout"), "{}", writer.log_tail(20));
        let written_at_stop = run.sim.records(LINES_COLLECTION).len();
        eprintln!("the writer stopped in {took:?}, {written_at_stop} of {lines} lines written");
        assert!(
            written_at_stop < lines,
            "stopped with work left for another writer"
        );

        step("a new writer finishes the run");
        let mut workers = vec![transformer, run.spawn_writer()];
        let refs: Vec<&WorkerProcess> = workers.iter().collect();
        run.wait_until_target_equals_truth(&refs).await;
        wait_for_empty_work_queues(scenario).await;
        let stats = &run.sim.stats;
        let count = |counter: &std::sync::atomic::AtomicU64| {
            counter.load(std::sync::atomic::Ordering::Relaxed) as usize
        };
        assert_eq!(count(&stats.created), lines, "every line created once");
        assert_eq!(
            (count(&stats.updated), count(&stats.stale)),
            (0, 0),
            "no line written twice: what the first writer held it finished and acked"
        );
        stop_all(&mut workers).await;
    })
    .await;
    scenario.clean_up(false).await.unwrap();
}

/// When the drain timeout runs out (every call to the target takes 6 s, the writer may drain for 1 s),
/// the writer exits all the same, with 0 and a warning, leaving its messages unacked: the broker
/// redelivers them, and a new writer lands them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_timeout_that_runs_out_leaves_the_messages_to_be_redelivered() {
    let run = lines_run(
        "drain_out",
        200,
        target_sim::TargetConfig {
            // Far above the drain timeout, so that a loaded machine cannot blur the two.
            latency: Duration::from_secs(6),
            ..Default::default()
        },
    )
    .await;
    let scenario = &run.scenario;
    within(TIMEOUT, async {
        let transformer = spawn_ready(scenario, Worker::Transformer).await;
        run_fetcher_once(scenario).await;
        let lines = scenario.expected_order_lines().len();
        let mut writer = run.spawn_writer_with(&[("CONVEYOR_DRAIN_TIMEOUT_SECS", "1")]);
        step("SIGTERM while the writer holds messages it cannot finish within 1 s");
        loop {
            if metric(&writer, "conveyor_messages_in_hand", &[]).await > 0.0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let held = metric(&writer, "conveyor_messages_in_hand", &[]).await;
        let stopping = std::time::Instant::now();
        writer.terminate().unwrap();
        let status = writer.wait(Duration::from_secs(15)).await.unwrap();
        let took = stopping.elapsed();
        assert!(status.success(), "{status}:\n{}", writer.log_tail(20));
        assert!(
            took < Duration::from_secs(5),
            "it gave up after its drain timeout (1 s), not after the writes (6 s): {took:?}"
        );
        let log = std::fs::read_to_string(&writer.log).unwrap();
        assert!(
            log.contains("drain timeout: exiting with work unfinished"),
            "{}",
            writer.log_tail(20)
        );
        assert_eq!(
            run.sim.records(LINES_COLLECTION).len(),
            0,
            "nothing was written yet"
        );

        step("the broker redelivers what it held; a new writer lands every line");
        let mut workers = vec![transformer, run.spawn_writer()];
        let refs: Vec<&WorkerProcess> = workers.iter().collect();
        run.wait_until_target_equals_truth(&refs).await;
        wait_for_empty_work_queues(scenario).await;
        let taken = metric(&workers[1], "conveyor_records_in_total", &[]).await;
        assert_eq!(
            taken as usize, lines,
            "the new writer took every line, the {held} message(s) held by the first one included"
        );
        stop_all(&mut workers).await;
    })
    .await;
    scenario.clean_up(false).await.unwrap();
}

/// A test that fails drops its scenario without cleaning up: the queues go anyway, so that failed
/// runs do not pile up quorum queues (and their open files) in the broker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scenario_dropped_without_clean_up_deletes_its_queues() {
    let scenario = scenario("dropped", orders(10)).await;
    scenario.declare_topology().await.unwrap();
    let services = scenario.services.clone();
    let schema = scenario.schema.clone();
    let queue = scenario.topology().queue(Stage::Write);
    assert!(
        scenario.queue_depths().await.is_ok(),
        "the topology is declared"
    );
    drop(scenario);
    let connection = conveyor_amqp::connect(&services.broker().unwrap(), "test")
        .await
        .unwrap();
    let channel = connection.create_channel().await.unwrap();
    let found = conveyor_amqp::queue_depth(&channel, &queue).await;
    assert!(found.is_err(), "{queue} is still there");
    conveyor_amqp::close(&connection).await;
    // The schema is kept, for a look at what went wrong; this test has nothing to look at.
    conveyor_harness::pg_client(&services.pg_url)
        .await
        .unwrap()
        .batch_execute(&format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"))
        .await
        .unwrap();
}

/// The fetch stage's queue-depth gauges are kept up to date like every other stage's (the fetcher
/// once had a reconnect loop of its own that never started them, so that they stayed at 0 and the
/// dead-letter alert could not fire on its windows): unreadable work items the fetcher dead-letters
/// show in its `conveyor_queue_messages{queue="dead_letter"}`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fetch_stage_reports_its_queue_depths() {
    let scenario = scenario("fetch_depth", orders(20)).await;
    scenario.declare_topology().await.unwrap();
    let mut fetcher = scenario
        .spawn(Worker::Fetcher, &["--interval-secs", "3600"])
        .unwrap();
    let dead_letters = ["queue=\"dead_letter\"", "stage=\"fetch\""];
    let waiting = || metric(&fetcher, "conveyor_queue_messages", &dead_letters);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while waiting().await != 0.0 || !fetcher_serves_metrics(&fetcher).await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{}",
            fetcher.log_tail(20)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for _ in 0..3 {
        let envelope = Envelope {
            meta: Meta::new_trace(scenario.pipeline.name()),
            records: vec![],
        };
        let (_, properties) = envelope.to_amqp(Compression::Off);
        scenario
            .publish_raw(Stage::Fetch, b"not a window", properties)
            .await
            .unwrap();
    }
    // The gauge is read every 10 s.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while waiting().await != 3.0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the fetch stage's dead-letter gauge never showed the 3 letters:\n{}",
            fetcher.log_tail(20)
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    fetcher.terminate().unwrap();
    fetcher.wait(Duration::from_secs(30)).await.unwrap();
    scenario.clean_up(false).await.unwrap();
}

/// Whether the fetcher's `/metrics` answers yet.
async fn fetcher_serves_metrics(fetcher: &WorkerProcess) -> bool {
    http()
        .get(format!("http://{}/metrics", fetcher.http_addr))
        .send()
        .await
        .is_ok()
}
