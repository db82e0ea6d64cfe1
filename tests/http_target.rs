//! End to end into an HTTP target: sales orders flattened into their entry lines by the declarative
//! rules, written by the real worker binaries through RabbitMQ into the target simulator (a real HTTP
//! server with token authentication, required headers, injected 429s and 5xx, and outages), ending
//! equal to the ground truth, field by field.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::{TIMEOUT, bin_dir, repo_root, wait_until_no_problems};
use conveyor_base::Stage;
use conveyor_harness::{Scenario, Services, Worker, WorkerProcess};
use kingdee_sim::SimConfig;
use serde_json::{Value, json};
use target_sim::{StatusCode, TargetConfig, TargetSim};

const COLLECTION: &str = "sales_order_lines";

/// What the target holds that the truth does not say, or says otherwise (field by field).
fn differences(truth: &BTreeMap<String, Value>, sim: &TargetSim) -> Vec<String> {
    let held = sim.records(COLLECTION);
    let mut problems = Vec::new();
    for (id, expected) in truth {
        let Some(record) = held.get(id) else {
            problems.push(format!("missing {id}"));
            continue;
        };
        for (field, value) in expected.as_object().expect("expected lines are objects") {
            if record.get(field) != Some(value) {
                problems.push(format!(
                    "{id}: {field} is {}, expected {value}",
                    record.get(field).unwrap_or(&Value::Null)
                ));
            }
        }
    }
    for id in held.keys().filter(|id| !truth.contains_key(*id)) {
        problems.push(format!("unexpected {id}"));
    }
    problems
}

/// The lines the target must hold, derived here from the Kingdee simulator's own data (not through
/// any code of the pipeline), as ops/pipelines/sales_order_lines_http.toml maps them: by line id, the
/// fields the mapping selects, renames, nests, converts and computes.
fn expected_lines(scenario: &Scenario) -> BTreeMap<String, Value> {
    let config = scenario.simulator.config();
    let data = kingdee_sim::data::Dataset::generate(config.seed, config.orders, config.epoch);
    let versions = scenario.expected_order_lines();
    let mut lines = BTreeMap::new();
    for order in data.orders() {
        let [year, month, day]: [&str; 3] = order
            .bill_date
            .split('-')
            .collect::<Vec<_>>()
            .try_into()
            .expect("bill dates are yyyy-MM-dd");
        // China Standard Time, 8 hours ahead of UTC.
        let created_ms =
            chrono::NaiveDateTime::parse_from_str(&order.create_time, "%Y-%m-%d %H:%M:%S")
                .expect("a local time")
                .and_utc()
                .timestamp_millis()
                - 8 * 3_600_000;
        for line in &order.material_entity {
            let label = format!("{}#{}", order.bill_no, line.seq);
            lines.insert(
                line.id.clone(),
                json!({
                    "line_id": line.id,
                    "order_id": order.id,
                    "bill_no": order.bill_no,
                    "seq": line.seq,
                    "bill_date": format!("{month}/{day}/{year}"),
                    "status": match order.bill_status.as_str() {
                        "C" => "audited",
                        _ => "draft",
                    },
                    "customer": {
                        "number": order.customer_number,
                        "name": order.customer_name.trim(),
                    },
                    "material_number": line.material_number,
                    "qty": line.qty,
                    "price": line.price,
                    "tax_rate": line.cess,
                    "amount": line.amount,
                    "gross_amount": gross(&line.amount, &line.cess),
                    "label": label,
                    "created_at_ms": created_ms,
                    "modified_at": versions[&line.id],
                }),
            );
        }
    }
    assert_eq!(
        lines.len(),
        versions.len(),
        "the same lines as the simulator's truth"
    );
    lines
}

/// `amount + amount * tax_rate / 100` in exact decimals, written without trailing zeros: the amount
/// has two decimals, the rate none, so the result is a whole number of ten-thousandths.
fn gross(amount: &str, tax_rate: &str) -> String {
    let cents: i64 = amount
        .replace('.', "")
        .parse()
        .expect("an amount with cents");
    let rate: i64 = tax_rate.parse().expect("a whole tax rate");
    let units = cents * (100 + rate);
    let text = format!("{}.{:04}", units / 10_000, units % 10_000);
    text.trim_end_matches('0').trim_end_matches('.').to_owned()
}

async fn wait_until_equal(
    truth: &BTreeMap<String, Value>,
    sim: &TargetSim,
    workers: &[WorkerProcess],
) {
    wait_until_no_problems(workers, || differences(truth, sim)).await;
}

/// A running scenario of the lines pipeline: the Kingdee simulator, the target simulator, a
/// transformer and two writers, and the truth (line id → the line as the target must hold it).
struct Run {
    scenario: Scenario,
    sim: Arc<TargetSim>,
    /// The target simulator's base URL.
    url: String,
    workers: Vec<WorkerProcess>,
    truth: BTreeMap<String, Value>,
}

const CLIENT_SECRET: &str = "e2e-client-secret";

/// Starts a run of the lines pipeline; `pipeline_extra` is TOML appended to the pipeline file (e.g. a
/// `[target.errors]` table; a `[target.id_check]` one replaces the file's), `writer_env` settings the
/// writers get on top of the scenario's.
async fn start(
    prefix: &str,
    orders: usize,
    target: TargetConfig,
    pipeline_extra: &str,
    writer_env: &[(&str, &str)],
) -> Run {
    let services = Services::check()
        .await
        .unwrap_or_else(|err| panic!("the end-to-end tests need RabbitMQ and PostgreSQL: {err:#}"));
    let mut pipeline = repo_root().join("ops/pipelines/sales_order_lines_http.toml");
    if !pipeline_extra.is_empty() {
        let mut text = std::fs::read_to_string(&pipeline).unwrap();
        if pipeline_extra.contains("[target.id_check]") {
            let own = "[target.id_check]\nmode = \"upsert\"\n";
            assert!(text.contains(own), "the lines pipeline's id check changed");
            text = text.replace(own, "");
        }
        let dir = std::env::temp_dir()
            .join("conveyor-harness")
            .join(format!("{prefix}-pipeline-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        pipeline = dir.join("sales_order_lines_http.toml");
        std::fs::write(&pipeline, format!("{text}\n{pipeline_extra}\n")).unwrap();
    }
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
        // The pipeline file's headers must reach the target with every call.
        required_headers: vec![("x-source-system".into(), "kingdee".into())],
        ..target
    });
    let addr = target_sim::spawn(sim.clone(), ([127, 0, 0, 1], 0).into())
        .await
        .unwrap();
    let url = format!("http://{addr}");
    let mut env = vec![
        ("CONVEYOR_HTTP_TARGET_URL", url.as_str()),
        ("CONVEYOR_HTTP_TARGET_CLIENT_ID", "conveyor-e2e"),
        ("CONVEYOR_HTTP_TARGET_CLIENT_SECRET", CLIENT_SECRET),
        // The target simulator serves plain HTTP on the loopback.
        ("CONVEYOR_HTTP_TARGET_ALLOW_PLAIN_HTTP", "true"),
    ];
    env.extend_from_slice(writer_env);
    scenario.declare_topology().await.unwrap();
    let workers = vec![
        scenario.spawn(Worker::Transformer, &[]).unwrap(),
        scenario.spawn_with_env(Worker::Writer, &[], &env).unwrap(),
        scenario.spawn_with_env(Worker::Writer, &[], &env).unwrap(),
    ];
    let truth = expected_lines(&scenario);
    Run {
        scenario,
        sim,
        url,
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
        "",
        &[],
    )
    .await;
    let Run {
        scenario,
        sim,
        workers,
        truth,
        ..
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
    assert_eq!(
        sim.stats.missing_headers.load(Ordering::Relaxed),
        0,
        "every call carried the pipeline file's headers"
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
    refused_lines_are_dead_lettered_alone("http_refused", StatusCode::UNPROCESSABLE_ENTITY, "")
        .await;
}

/// A 500 is transient by default (retried, and at last dead-lettered as "gave up" with its whole
/// batch); this pipeline file says the target's 500 means a record it chokes on: each such line is
/// dead-lettered at once on its own, and the rest of its batch is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pipeline_file_decides_that_a_500_refuses_the_record() {
    refused_lines_are_dead_lettered_alone(
        "http_500",
        StatusCode::INTERNAL_SERVER_ERROR,
        "[target.errors]\npermanent = [500]",
    )
    .await;
}

/// The target refuses every 40th line with `status`, wherever it falls in a batch: exactly those are
/// dead-lettered, each on its own, as permanent; every other line lands.
async fn refused_lines_are_dead_lettered_alone(
    prefix: &str,
    status: StatusCode,
    pipeline_extra: &str,
) {
    const ORDERS: usize = 300;
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
        prefix,
        ORDERS,
        TargetConfig {
            invalid_when: refused
                .iter()
                .map(|id| ("line_id".to_owned(), json!(id)))
                .collect(),
            invalid_status: status,
            ..TargetConfig::default()
        },
        pipeline_extra,
        &[],
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
        assert!(letter.error.contains(status.as_str()), "{}", letter.error);
    }
    run.finish().await;
}

/// The target's gateway answers 503 to every call (its probe included) for a few seconds: the writers
/// hold back (not ready), nothing is dead-lettered although a message may be tried only 3 times, and
/// when the target answers again everything lands.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_answering_503_to_everything_holds_the_writers_back() {
    // At least two messages (300 orders each), so that both writers hold one when the target fails.
    let run = start(
        "http_outage",
        600,
        TargetConfig::default(),
        "[target.errors]\nunavailable_after = 2",
        &[("CONVEYOR_MAX_ATTEMPTS", "3")],
    )
    .await;
    let writers = &run.workers[1..];
    for writer in writers {
        common::wait_ready(writer, true, TIMEOUT).await;
    }
    run.sim.set_outage(Some(StatusCode::SERVICE_UNAVAILABLE));
    let began = Instant::now();
    run.scenario.run_fetcher_once(TIMEOUT).await.unwrap();
    for writer in writers {
        common::wait_ready(writer, false, Duration::from_secs(30)).await;
    }
    tokio::time::sleep(Duration::from_secs(4).saturating_sub(began.elapsed())).await;
    assert!(run.sim.records(COLLECTION).is_empty());
    assert!(
        run.scenario
            .peek_dead_letters(Stage::Write)
            .await
            .unwrap()
            .is_empty(),
        "no good record is dead-lettered while the target is down"
    );
    let in_hand = common::messages_in_hand(writers).await;
    let queued: u32 = run
        .scenario
        .queue_depths()
        .await
        .unwrap()
        .iter()
        .filter(|(queue, _)| !queue.ends_with(".dlq"))
        .map(|(_, n)| n)
        .sum();
    assert!(
        in_hand + f64::from(queued) > 0.0,
        "the batches wait (held {in_hand}, queued {queued})"
    );
    let refused = run.sim.stats.outage_answers.load(Ordering::Relaxed);
    eprintln!("calls answered 503 during the outage: {refused}");

    run.sim.set_outage(None);
    for writer in writers {
        common::wait_ready(writer, true, Duration::from_secs(30)).await;
    }
    wait_until_equal(&run.truth, &run.sim, &run.workers).await;
    wait_until_quiet(&run.scenario, &run.sim).await;
    assert!(differences(&run.truth, &run.sim).is_empty());
    assert!(
        run.scenario
            .peek_dead_letters(Stage::Write)
            .await
            .unwrap()
            .is_empty()
    );
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

/// One process of each worker hosts two pipelines at once, from one simulator: the sales orders into
/// PostgreSQL and their lines into the HTTP target, whose settings are given for its pipeline alone
/// (`{VARIABLE}__{PIPELINE}`). While the HTTP target is down, the orders still land, and the writer's
/// `/readyz` names the pipeline that waits; once it is up, the lines land too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_process_hosts_two_pipelines_and_a_target_down_holds_back_only_its_own() {
    let services = Services::check()
        .await
        .unwrap_or_else(|err| panic!("the end-to-end tests need RabbitMQ and PostgreSQL: {err:#}"));
    let sim_config = SimConfig {
        seed: 11,
        orders: 600,
        ..SimConfig::default()
    };
    let mut scenario = Scenario::start(
        services,
        &repo_root().join("ops/pipelines/sales_orders.toml"),
        &bin_dir(),
        "two_pipelines",
        sim_config,
        &[],
    )
    .await
    .expect("scenario starts");
    // The lines pipeline gives up on its target after two calls without an answer, so that its
    // writer holds back (rather than retries and at last dead-letters) while the target is down.
    let lines_file = std::env::temp_dir()
        .join("conveyor-harness")
        .join(format!("two-pipelines-{}", std::process::id()))
        .join("sales_order_lines_http.toml");
    std::fs::create_dir_all(lines_file.parent().unwrap()).unwrap();
    let text =
        std::fs::read_to_string(repo_root().join("ops/pipelines/sales_order_lines_http.toml"))
            .unwrap();
    std::fs::write(
        &lines_file,
        format!("{text}\n[target.errors]\nunavailable_after = 2\n"),
    )
    .unwrap();
    let lines = scenario.add_pipeline(&lines_file).unwrap();
    let suffix = conveyor_runtime::host::pipeline_suffix(lines.name());

    let sim = TargetSim::new(TargetConfig {
        key_field: "line_id".into(),
        version_field: Some("modified_at".into()),
        client: Some(("conveyor-e2e".into(), CLIENT_SECRET.into())),
        required_headers: vec![("x-source-system".into(), "kingdee".into())],
        ..TargetConfig::default()
    });
    sim.set_outage(Some(StatusCode::SERVICE_UNAVAILABLE));
    let addr = target_sim::spawn(sim.clone(), ([127, 0, 0, 1], 0).into())
        .await
        .unwrap();
    let env = [
        (
            format!("CONVEYOR_HTTP_TARGET_URL{suffix}"),
            format!("http://{addr}"),
        ),
        (
            format!("CONVEYOR_HTTP_TARGET_CLIENT_ID{suffix}"),
            "conveyor-e2e".into(),
        ),
        (
            format!("CONVEYOR_HTTP_TARGET_CLIENT_SECRET{suffix}"),
            CLIENT_SECRET.into(),
        ),
        (
            format!("CONVEYOR_HTTP_TARGET_ALLOW_PLAIN_HTTP{suffix}"),
            "true".into(),
        ),
        ("CONVEYOR_MAX_ATTEMPTS".into(), "3".into()),
    ];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    scenario.declare_topology().await.unwrap();
    let mut workers = vec![
        scenario.spawn(Worker::Transformer, &[]).unwrap(),
        scenario.spawn_with_env(Worker::Writer, &[], &env).unwrap(),
    ];
    common::wait_ready(&workers[1], true, TIMEOUT).await;
    scenario.run_fetcher_once(TIMEOUT).await.unwrap();

    common::assert_target_equals_truth(&scenario, &workers).await;
    let writer = &workers[1];
    let readyz = format!("http://{}/readyz", writer.http_addr);
    let waiting = format!("{} target: waiting", lines.name());
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let answer = common::http().get(&readyz).send().await.unwrap();
        let status = answer.status();
        let report = answer.text().await.unwrap();
        if status == 503 && report.contains(&waiting) {
            assert!(report.contains("sales_orders target: ok"), "{report}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "/readyz never named {} as waiting ({status}):\n{report}\n{}",
            lines.name(),
            writer.log_tail(20)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(sim.records(COLLECTION).is_empty());

    sim.set_outage(None);
    let truth = expected_lines(&scenario);
    wait_until_equal(&truth, &sim, &workers).await;
    common::wait_ready(&workers[1], true, TIMEOUT).await;
    assert!(
        scenario
            .peek_dead_letters(Stage::Write)
            .await
            .unwrap()
            .is_empty()
    );
    conveyor_harness::stop_all(&mut workers).await.unwrap();
    scenario.clean_up(false).await.unwrap();
}

/// `conveyorctl reconcile` of the lines pipeline (its HTTP target read through the id check
/// `exists`), with the scenario's and the target's settings; `--json` unless `human`.
fn reconcile(run: &Run, human: bool) -> std::process::Output {
    let extra: &[&str] = if human { &[] } else { &["--json"] };
    common::reconcile_command(&run.scenario, extra)
        .env("CONVEYOR_HTTP_TARGET_URL", &run.url)
        .env("CONVEYOR_HTTP_TARGET_CLIENT_ID", "conveyor-e2e")
        .env("CONVEYOR_HTTP_TARGET_CLIENT_SECRET", CLIENT_SECRET)
        .env("CONVEYOR_HTTP_TARGET_ALLOW_PLAIN_HTTP", "true")
        .output()
        .expect("conveyorctl runs")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconcile_reads_an_http_target_by_id_and_its_resync_mends_it() {
    let run = start(
        "http_reconcile",
        40,
        TargetConfig::default(),
        "[target.id_check]\nmode = \"exists\"\npath = \"/api/sales_order_lines/{key}\"\non_exists = \"update\"",
        &[],
    )
    .await;
    run.scenario.run_fetcher_once(TIMEOUT).await.unwrap();
    wait_until_equal(&run.truth, &run.sim, &run.workers).await;
    let clean = reconcile(&run, true);
    let text = String::from_utf8_lossy(&clean.stdout).into_owned();
    assert!(
        clean.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&clean.stderr)
    );
    assert!(text.contains("extras not sought"), "{text}");

    // Behind the pipeline's back: two lines deleted, one set back to an older version.
    let ids: Vec<String> = run.truth.keys().cloned().collect();
    let (deleted, set_back) = (&ids[3..5], &ids[20]);
    run.sim.edit(COLLECTION, |records| {
        for id in deleted {
            records.remove(id);
        }
        let line = records.get_mut(set_back).expect("the line is held");
        line["modified_at"] = json!("2024-06-01T00:00:00+08:00");
    });
    let found = reconcile(&run, false);
    assert_eq!(
        found.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&found.stderr)
    );
    let report: Value = serde_json::from_slice(&found.stdout).unwrap();
    let named = |field: &str| -> Vec<String> {
        let mut ids: Vec<String> = report[field]
            .as_array()
            .unwrap()
            .iter()
            .map(|item| {
                let id = if item.is_string() { item } else { &item["id"] };
                id.as_str().unwrap().to_owned()
            })
            .collect();
        ids.sort();
        ids
    };
    assert_eq!(named("missing"), deleted, "{report:#}");
    assert_eq!(named("older"), std::slice::from_ref(set_back), "{report:#}");
    assert_eq!(report["extras_sought"], false);

    let human = reconcile(&run, true);
    let text = String::from_utf8_lossy(&human.stdout).into_owned();
    let command = text
        .lines()
        .find_map(|line| line.trim().strip_prefix("conveyorctl "))
        .unwrap_or_else(|| panic!("no re-sync command offered:\n{text}"));
    let resync = std::process::Command::new(bin_dir().join("conveyorctl"))
        .args(command.split_whitespace())
        .envs(run.scenario.environment())
        .output()
        .unwrap();
    assert!(
        resync.status.success(),
        "{}",
        String::from_utf8_lossy(&resync.stderr)
    );
    run.scenario.run_fetcher_once(TIMEOUT).await.unwrap();
    wait_until_equal(&run.truth, &run.sim, &run.workers).await;
    let mended = reconcile(&run, true);
    assert!(
        mended.status.success(),
        "{}",
        String::from_utf8_lossy(&mended.stdout)
    );
    run.finish().await;
}

/// Wrong credentials for the source (the Kingdee client secret), the target (the token endpoint's
/// client secret), the broker (a password) and PostgreSQL (a database that does not exist) are setup
/// errors: each worker stays up, not ready, with `/readyz` naming the refusal, says so in one ERROR
/// line however often it checks again, and burns no message's attempts: nothing is dead-lettered.
/// Restarted with the right settings, they deliver everything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_credentials_hold_the_workers_not_ready_with_one_error_and_no_dead_letter() {
    const WRONG_CLIENT_SECRET: &str = "wrong-target-secret-5c1d";
    const WRONG_KINGDEE_SECRET: &str = "wrong-kingdee-secret-93be";
    let mut run = start(
        "credentials",
        40,
        TargetConfig::default(),
        "",
        &[("CONVEYOR_HTTP_TARGET_CLIENT_SECRET", WRONG_CLIENT_SECRET)],
    )
    .await;
    // Work arrives all the same (a fetcher with the right secret syncs once): the writers hold it.
    run.scenario.run_fetcher_once(TIMEOUT).await.unwrap();
    let wrong_fetcher = run
        .scenario
        .spawn_with_env(
            Worker::Fetcher,
            &[],
            &[
                ("CONVEYOR_KINGDEE_CLIENT_SECRET", WRONG_KINGDEE_SECRET),
                ("CONVEYOR_FETCH_INTERVAL_SECS", "1"),
            ],
        )
        .unwrap();
    let said =
        common::wait_for_condition(&wrong_fetcher, "source credentials: waiting: refused:").await;
    assert!(
        said.contains("code 4008") && said.contains("check CONVEYOR_KINGDEE_CLIENT_SECRET"),
        "the gateway's code is explained: {said}"
    );
    let services = &run.scenario.services;
    let wrong_broker = run
        .scenario
        .spawn_with_env(
            Worker::Transformer,
            &[],
            &[(
                "CONVEYOR_AMQP_URL",
                &services
                    .amqp_url
                    .expose()
                    .replace("guest:guest@", "guest:wrong-amqp-password@"),
            )],
        )
        .unwrap();
    let said = common::wait_for_condition(&wrong_broker, "broker: waiting: refused:").await;
    assert!(said.contains("ACCESS_REFUSED"), "{said}");
    let missing_database = services
        .pg_url
        .expose()
        .rsplit_once('/')
        .map(|(server, _)| format!("{server}/no_such_database_3e1f"))
        .unwrap();
    let wrong_database = run
        .scenario
        .spawn_with_env(
            Worker::Transformer,
            &[],
            &[("CONVEYOR_PG_URL", &missing_database)],
        )
        .unwrap();
    let said = common::wait_for_condition(&wrong_database, "database: waiting: refused:").await;
    assert!(said.contains("no_such_database_3e1f"), "{said}");
    for writer in &run.workers[1..] {
        let said =
            common::wait_for_condition(writer, "target credentials: waiting: refused:").await;
        assert!(
            said.contains("token endpoint answered 401")
                && said.contains("CONVEYOR_HTTP_TARGET_CLIENT_SECRET"),
            "{said}"
        );
    }

    // Long enough for the gates to check again (5 s, then 10 s later).
    tokio::time::sleep(Duration::from_secs(16)).await;
    assert_eq!(run.sim.stats.created.load(Ordering::Relaxed), 0);
    assert!(
        common::waiting_for_writers(&run.scenario, &run.workers[1..]).await > 0.0,
        "the batches wait for the writers"
    );
    for stage in [Stage::Fetch, Stage::Transform, Stage::Write] {
        assert!(
            run.scenario
                .peek_dead_letters(stage)
                .await
                .unwrap()
                .is_empty(),
            "refused credentials dead-letter nothing ({stage:?})"
        );
    }
    for (worker, secret) in [
        (&wrong_fetcher, WRONG_KINGDEE_SECRET),
        (&run.workers[1], WRONG_CLIENT_SECRET),
        (&run.workers[2], WRONG_CLIENT_SECRET),
        (&wrong_broker, "wrong-amqp-password"),
        (&wrong_database, "no secret"),
    ] {
        let log = std::fs::read_to_string(&worker.log).unwrap();
        let told: Vec<&str> = log
            .lines()
            .filter(|line| line.contains("refuses the credentials"))
            .collect();
        assert_eq!(told.len(), 1, "one line says it: {told:#?}");
        assert!(told[0].contains("ERROR"), "{}", told[0]);
        assert!(!log.contains(secret), "a secret reached a log");
    }
    assert_eq!(
        run.scenario.logged_errors().len(),
        5,
        "no other ERROR: {:#?}",
        run.scenario.logged_errors()
    );

    // SIGTERM while held: each exits 0, giving its work back.
    let mut stopped = vec![
        wrong_fetcher,
        run.workers.pop().unwrap(),
        run.workers.pop().unwrap(),
    ];
    conveyor_harness::stop_all(&mut stopped).await.unwrap();
    let env = [
        ("CONVEYOR_HTTP_TARGET_URL", run.url.as_str()),
        ("CONVEYOR_HTTP_TARGET_CLIENT_ID", "conveyor-e2e"),
        ("CONVEYOR_HTTP_TARGET_CLIENT_SECRET", CLIENT_SECRET),
        ("CONVEYOR_HTTP_TARGET_ALLOW_PLAIN_HTTP", "true"),
    ];
    run.workers.push(
        run.scenario
            .spawn_with_env(Worker::Writer, &[], &env)
            .unwrap(),
    );
    wait_until_equal(&run.truth, &run.sim, &run.workers).await;
    assert_eq!(
        run.sim.stats.created.load(Ordering::Relaxed) as usize,
        run.truth.len(),
        "every line written once"
    );
    run.finish().await;
}
