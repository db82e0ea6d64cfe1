//! Incremental sync against the strict simulator: tokens that expire, a rotating secret, a rate limit,
//! injected 5xx, records modified and created during the run, two fetcher processes. The target must end
//! equal to the simulator's ground truth, with no call refused for its signature and no minute over
//! the call budget.
//!
//! Then one test per promise, each made to fail if the promise were not kept: two fetcher processes
//! keep one call budget (the simulator times every call); tokens revoked or expired mid-sync are
//! replaced once; a client whose budget is above the gateway's limit backs off from 429s, and one
//! whose gateway allows a quarter of its budget syncs at the gateway's rate; rows moved between two
//! pages of a window are not skipped; the named account set is the one used; a fetcher killed, or
//! cut off by broker restarts, resumes after its last confirmed page.

mod common;

use std::path::Path;
use std::time::Duration;

use common::bin_dir;
use conveyor_base::Stage;
use conveyor_harness::own_broker::OwnBroker;
use conveyor_harness::{Comparison, Scenario, Services, Worker, WorkerProcess};
use kingdee_sim::gate::{Faults, GatewayConfig};
use kingdee_sim::{ChangeRates, PagingChange, PagingChangeKind, SimConfig};

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

/// A scenario of the sales-orders pipeline with `source` overrides.
async fn scenario(prefix: &str, sim: SimConfig, source: &[(&str, toml::Value)]) -> Scenario {
    Scenario::start(
        common::services().await,
        &common::sales_orders_pipeline(),
        &bin_dir(),
        prefix,
        sim,
        source,
    )
    .await
    .expect("scenario starts")
}

/// A backlog of `orders` (at most 2,000) whose modify times are all older than a day: all of it is
/// there for the first plan, and no window with rows in it can still gain late rows, so each is paged
/// once unless rows move.
fn old_backlog(seed: u64, orders: usize) -> SimConfig {
    assert!(orders <= 2_000);
    SimConfig {
        seed,
        orders,
        // Created one after another (at most 2 minutes apart: under 2.8 days for 2,000) from 7 days ago,
        // each modified within 3 days of its creation.
        epoch: kingdee_sim::data::days_ago(7),
        ..SimConfig::default()
    }
}

/// Windows of 12 hours, pages of `page_size` rows (so that windows have several), 2 s of lag, 5 s of
/// overlap.
fn half_day_windows(page_size: i64) -> Vec<(&'static str, toml::Value)> {
    vec![
        ("window_secs", toml::Value::Integer(12 * 3600)),
        ("page_size", toml::Value::Integer(page_size)),
        ("lag_secs", toml::Value::Integer(2)),
        ("overlap_secs", toml::Value::Integer(5)),
    ]
}

/// Waits until the target equals the truth or `timeout` passes; the last comparison.
async fn until_exact(scenario: &Scenario, timeout: Duration) -> Comparison {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let comparison = scenario.compare_with_truth().await.unwrap();
        if comparison.is_exact() || tokio::time::Instant::now() > deadline {
            return comparison;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

fn assert_exact(scenario: &Scenario, comparison: &Comparison, workers: &[&WorkerProcess]) {
    let logs: Vec<String> = workers
        .iter()
        .map(|w| format!("--- {}\n{}", w.worker.binary(), w.log_tail(15)))
        .collect();
    let truth = scenario.expected_records();
    let modified = |id: &String| {
        let record = truth.iter().find(|record| &record.id == id);
        (id.clone(), record.map(|record| record.modify_time.clone()))
    };
    let missing: Vec<_> = comparison.missing.iter().map(modified).collect();
    let wrong_version: Vec<_> = comparison.wrong_version.iter().map(modified).collect();
    assert!(
        comparison.is_exact(),
        "target differs from the truth: missing {missing:?}, unexpected {:?}, wrong version \
         {wrong_version:?} (ids with their modify times in the truth); simulator: {:?}\n{}",
        comparison.unexpected,
        scenario.simulator.stats(),
        logs.join("\n")
    );
}

/// Waits for a `--once` fetcher to succeed; returns its summary (the JSON line it prints last).
async fn summary_of(fetcher: &mut WorkerProcess) -> serde_json::Value {
    let status = fetcher.wait(Duration::from_secs(120)).await.unwrap();
    assert!(
        status.success(),
        "fetcher failed:\n{}",
        fetcher.log_tail(30)
    );
    let log = std::fs::read_to_string(&fetcher.log).unwrap();
    let line = log
        .lines()
        .rev()
        .find(|line| line.starts_with("{\"windows\""))
        .unwrap_or_else(|| panic!("no summary in:\n{}", fetcher.log_tail(10)));
    serde_json::from_str(line).unwrap()
}

async fn stop(workers: Vec<WorkerProcess>) {
    let mut workers = workers;
    conveyor_harness::stop_all(&mut workers).await.unwrap();
}

/// Lines of a worker's log that contain `text`.
fn log_lines(worker: &WorkerProcess, text: &str) -> usize {
    std::fs::read_to_string(&worker.log)
        .unwrap_or_default()
        .lines()
        .filter(|line| line.contains(text))
        .count()
}

/// The spans over which the tests below check a budget's pacing.
fn pacing_windows() -> [Duration; 3] {
    [
        Duration::from_millis(500),
        Duration::from_secs(1),
        Duration::from_secs(2),
    ]
}

/// Two fetcher processes share the work of a backlog and its call budget: the simulator, which has no
/// limit of its own here, times every call, and the calls keep the budget in any span of 0.5, 1 and
/// 2 s and take at least as long as the budget needs for them. Without the shared budget (or with one
/// per process) the same sync breaks both checks. They log in once: the app-token is shared too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_fetcher_processes_keep_one_call_budget() {
    // One call every 102 ms: the ~60 calls of this sync take about six seconds.
    const BUDGET: u32 = 600;
    let mut source = half_day_windows(50);
    source.push(("calls_per_minute", toml::Value::Integer(i64::from(BUDGET))));
    let scenario = scenario("budget", old_backlog(31, 2_000), &source).await;
    let started = std::time::Instant::now();
    let mut fetchers = [
        scenario.spawn(Worker::Fetcher, &["--once"]).unwrap(),
        scenario.spawn(Worker::Fetcher, &["--once"]).unwrap(),
    ];
    let mut summaries = Vec::new();
    for fetcher in &mut fetchers {
        summaries.push(summary_of(fetcher).await);
    }
    let elapsed = started.elapsed();

    let arrivals = scenario.simulator.call_arrivals();
    let stats = scenario.simulator.stats();
    assert!(
        (40..=100).contains(&arrivals.len()),
        "a sync of a few seconds: {} calls",
        arrivals.len()
    );
    // The second process waits for the first one's login and takes up its token.
    assert_one_login(&stats);
    for summary in &summaries {
        assert!(
            summary["pages"].as_u64().unwrap() > 0,
            "both processes paged windows: {summaries:?}"
        );
    }
    let breaches = kingdee_sim::gate::budget_breaches(&arrivals, BUDGET, &pacing_windows());
    assert!(
        breaches.is_empty(),
        "the budget was broken: {breaches:?}; arrivals: {arrivals:?}"
    );
    let least = Duration::from_secs_f64((arrivals.len() - 1) as f64 * 60.0 / f64::from(BUDGET));
    assert!(elapsed >= least, "{elapsed:?} < {least:?}");
    scenario.clean_up(false).await.unwrap();
}

/// Waits until the simulator has admitted `calls` calls.
async fn until_calls(scenario: &Scenario, calls: u64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while scenario.simulator.stats().calls < calls {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{:?}",
            scenario.simulator.stats()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The gateway drops its tokens in the middle of a sync — once revoked (4010), once expired early
/// (4011) — although the client's copy says it has most of its life left: each time the fetcher fetches
/// one new token, retries the refused calls and the target ends whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sync_goes_on_after_its_token_is_revoked_and_expired() {
    let mut source = half_day_windows(50);
    // About 6 s for the sync: time to drop the tokens twice while it runs.
    source.push(("calls_per_minute", toml::Value::Integer(600)));
    let scenario = scenario("tokens", old_backlog(32, 2_000), &source).await;
    let writers = transformer_and_writer(&scenario).await;
    let mut fetcher = scenario.spawn(Worker::Fetcher, &["--once"]).unwrap();
    until_calls(&scenario, 12).await;
    scenario.simulator.revoke_tokens();
    until_calls(&scenario, 28).await;
    scenario.simulator.expire_tokens();
    let summary = summary_of(&mut fetcher).await;

    let comparison = until_exact(&scenario, Duration::from_secs(60)).await;
    assert_exact(
        &scenario,
        &comparison,
        &[&fetcher, &writers[0], &writers[1]],
    );
    let stats = scenario.simulator.stats();
    assert_eq!(stats.tokens_invalidated, 2, "{stats:?}");
    assert!(
        stats.rejected_token >= 2,
        "calls were refused for their token: {stats:?}"
    );
    assert_eq!(
        (stats.authorizations, stats.tokens_issued),
        (1, 3),
        "one new token after each drop, and no new authorization: {stats:?}"
    );
    assert!(summary["records"].as_u64().unwrap() >= 2_000, "{summary}");
    stop(writers).await;
    scenario.clean_up(false).await.unwrap();
}

/// A budget above what the gateway allows (here 10 calls in any second): the simulator answers 429,
/// the fetcher backs off with jitter and retries, and the target still ends whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fetcher_over_the_gateway_limit_backs_off_and_ends_whole() {
    let sim = SimConfig {
        gateway: GatewayConfig {
            calls_per_minute: 600,
            rate_window: Duration::from_secs(1),
            ..GatewayConfig::default()
        },
        ..old_backlog(33, 2_000)
    };
    let mut source = half_day_windows(50);
    source.push(("calls_per_minute", toml::Value::Integer(60_000)));
    let scenario = scenario("throttled", sim, &source).await;
    let writers = transformer_and_writer(&scenario).await;
    let mut fetcher = scenario.spawn(Worker::Fetcher, &["--once"]).unwrap();
    summary_of(&mut fetcher).await;
    let comparison = until_exact(&scenario, Duration::from_secs(60)).await;
    assert_exact(
        &scenario,
        &comparison,
        &[&fetcher, &writers[0], &writers[1]],
    );
    let stats = scenario.simulator.stats();
    assert!(
        stats.rate_limited > 0,
        "the gateway answered 429: {stats:?}"
    );
    assert!(
        scenario
            .simulator
            .most_calls_within(Duration::from_millis(999))
            <= 10,
        "{stats:?}"
    );
    assert!(
        log_lines(&fetcher, "HTTP 429") > 0,
        "the fetcher saw the 429s:\n{}",
        fetcher.log_tail(20)
    );
    stop(writers).await;
    scenario.clean_up(false).await.unwrap();
}

/// Starts the transformer and the writer, each ready.
async fn transformer_and_writer(scenario: &Scenario) -> Vec<WorkerProcess> {
    vec![
        common::spawn_ready(scenario, Worker::Transformer).await,
        common::spawn_ready(scenario, Worker::Writer).await,
    ]
}

/// Starts the transformer, the writer and a fetcher that plans every second.
async fn pipeline(scenario: &Scenario) -> Vec<WorkerProcess> {
    let mut workers = transformer_and_writer(scenario).await;
    workers.push(scenario.spawn(Worker::Fetcher, &[]).unwrap());
    workers
}

/// Between page 1 and page 2 of a window the simulator moves the first row: once it leaves the window
/// (the count drops), once it is modified inside the window and listed again at the end (the count
/// stays the same). Either way every later row shifts one place up and the first row of page 2 slides
/// onto page 1, already read. The fetcher sees the count change, or the row coming twice, pages the
/// window again, and the target ends whole — which a naive pager does not (see
/// crates/kingdee/tests/gateway.rs).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_moved_between_two_pages_are_not_skipped() {
    let scenario = scenario("moved", old_backlog(34, 800), &half_day_windows(25)).await;
    for kind in [PagingChangeKind::Leave, PagingChangeKind::MoveToEnd] {
        scenario.simulator.arm_paging_change(PagingChange {
            after_page: 1,
            kind,
        });
    }
    let workers = pipeline(&scenario).await;
    let comparison = until_exact(&scenario, Duration::from_secs(60)).await;
    assert_exact(&scenario, &comparison, &workers.iter().collect::<Vec<_>>());
    let stats = scenario.simulator.stats();
    assert_eq!(stats.paging_changes, 2, "both rows were moved: {stats:?}");
    let fetcher = &workers[2];
    assert!(
        log_lines(fetcher, "the window's count changed") >= 1
            && log_lines(fetcher, "a row came twice") >= 1,
        "the fetcher paged again for each:\n{}",
        fetcher.log_tail(30)
    );
    assert_eq!(
        log_lines(fetcher, "late rows may still enter"),
        0,
        "no window here could gain late rows"
    );
    stop(workers).await;
    scenario.clean_up(false).await.unwrap();
}

/// Between page 1 and page 2 of the plan's newest window, a row leaves it while a late row enters it:
/// the count stays the same and no row comes twice, yet the first row of page 2 slid onto page 1. Rows
/// may still appear late in that window (its end is within lag + overlap of now), so the fetcher pages
/// it until two passes agree. One `--once` run, whose next plan would re-read the window as overlap,
/// must on its own leave the target holding every record up to its watermark.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_leaving_while_a_late_one_enters_is_not_skipped() {
    let sim = SimConfig {
        seed: 35,
        orders: 400,
        // Every order created and modified as the simulator starts: all in the plan's newest window.
        epoch: kingdee_sim::data::days_ago(0),
        ..SimConfig::default()
    };
    let source = [
        ("window_secs", toml::Value::Integer(86_400)),
        ("page_size", toml::Value::Integer(50)),
        ("lag_secs", toml::Value::Integer(2)),
        ("overlap_secs", toml::Value::Integer(30)),
    ];
    let scenario = scenario("late", sim, &source).await;
    scenario.simulator.arm_paging_change(PagingChange {
        after_page: 1,
        kind: PagingChangeKind::LeaveAndEnter,
    });
    let writers = transformer_and_writer(&scenario).await;
    // Past the lag (and the second the orders' times are written in), so that the plan takes them in.
    tokio::time::sleep(Duration::from_millis(3_500)).await;
    let mut fetcher = scenario.spawn(Worker::Fetcher, &["--once"]).unwrap();
    let summary = summary_of(&mut fetcher).await;
    let stats = scenario.simulator.stats();
    assert_eq!(stats.paging_changes, 1, "{stats:?}");
    assert!(
        log_lines(&fetcher, "late rows may still enter") >= 2,
        "a second pass differed from the first, a third agreed:\n{}",
        fetcher.log_tail(30)
    );

    // Everything modified up to the watermark is in the target; only the row that left the window
    // (modified after the watermark, for the next run) is still at its old version.
    let watermark = chrono::DateTime::parse_from_rfc3339(summary["watermark"].as_str().unwrap())
        .unwrap()
        .with_timezone(&chrono::FixedOffset::east_opt(8 * 3600).unwrap())
        .format("%Y-%m-%d %H:%M:%S")
        .to_string();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let comparison = loop {
        let comparison = scenario.compare_with_truth().await.unwrap();
        if (comparison.missing.is_empty() && comparison.wrong_version.len() <= 1)
            || tokio::time::Instant::now() > deadline
        {
            break comparison;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    let truth = scenario.expected_records();
    let after_watermark: Vec<&String> = truth
        .iter()
        .filter(|record| record.modify_time > watermark)
        .map(|record| &record.id)
        .collect();
    assert_eq!(
        after_watermark.len(),
        1,
        "the row that left: {after_watermark:?}"
    );
    assert!(
        comparison.missing.is_empty()
            && comparison.unexpected.is_empty()
            && comparison
                .wrong_version
                .iter()
                .all(|id| after_watermark.contains(&id)),
        "the target misses records modified before the watermark {watermark}: {comparison:?}\n{}",
        fetcher.log_tail(20)
    );
    stop(writers).await;
    scenario.clean_up(false).await.unwrap();
}

/// The tenant has three active account sets; CONVEYOR_KINGDEE_ACCOUNT names one, and the fetcher syncs
/// through it. `conveyorctl kingdee token` names the choices when the name matches none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_account_set_named_in_the_settings_is_the_one_read() {
    let sim = SimConfig {
        gateway: GatewayConfig {
            other_accounts: vec!["华东账套".into(), "华南账套".into()],
            ..GatewayConfig::default()
        },
        ..old_backlog(36, 300)
    };
    let mut scenario = scenario("account", sim, &half_day_windows(100)).await;
    scenario.set_env("CONVEYOR_KINGDEE_ACCOUNT", "华南账套");
    let mut fetcher = scenario.spawn(Worker::Fetcher, &["--once"]).unwrap();
    let summary = summary_of(&mut fetcher).await;
    assert_eq!(summary["records"].as_u64(), Some(300), "{summary}");
    assert_eq!(scenario.simulator.token_accounts(), ["华南账套"]);

    let token = |account: &str| {
        common::ctl_command(&scenario, &["kingdee", "token"])
            .envs(scenario.environment())
            .env("CONVEYOR_KINGDEE_ACCOUNT", account)
            .output()
            .expect("conveyorctl runs")
    };
    let chosen = common::succeeded("conveyorctl kingdee token", token("华东账套"));
    assert!(chosen.contains("account set \"华东账套\""), "{chosen}");
    let refused = token("西北账套");
    assert!(!refused.status.success());
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(
        said.contains("\"西北账套\" named by CONVEYOR_KINGDEE_ACCOUNT is not among")
            && said.contains("\"华东账套\"")
            && said.contains("\"华南账套\""),
        "{said}"
    );
    scenario.clean_up(false).await.unwrap();
}

/// One window of 2,000 orders (with `old_backlog`) in 40 pages of 50, a page a message, 20 calls a
/// second.
fn one_big_window() -> [(&'static str, toml::Value); 7] {
    [
        ("window_secs", toml::Value::Integer(30 * 86_400)),
        ("page_size", toml::Value::Integer(50)),
        ("records_per_message", toml::Value::Integer(50)),
        ("max_window_rows", toml::Value::Integer(10_000)),
        ("calls_per_minute", toml::Value::Integer(1_200)),
        ("lag_secs", toml::Value::Integer(2)),
        ("overlap_secs", toml::Value::Integer(5)),
    ]
}

/// A fetcher killed (SIGKILL) in the middle of one big window: the next one resumes after the last
/// page whose records the broker had confirmed, so that the kill costs a few pages of calls — the
/// pages in flight and the one read again to prove nothing before it moved — and not the window.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fetcher_killed_mid_window_resumes_after_its_last_confirmed_page() {
    const PAGES: u64 = 40;
    let source = one_big_window();
    let scenario = scenario("resume", old_backlog(36, 2_000), &source).await;
    let workers = transformer_and_writer(&scenario).await;
    let mut killed = scenario.spawn(Worker::Fetcher, &["--once"]).unwrap();
    // The auth flow's two calls, then 15 pages.
    until_calls(&scenario, 17).await;
    killed.kill().await.unwrap();
    let calls_at_kill = scenario.simulator.stats().calls;
    let mut resumed = scenario.spawn(Worker::Fetcher, &["--once"]).unwrap();
    let summary = summary_of(&mut resumed).await;
    let comparison = until_exact(&scenario, Duration::from_secs(60)).await;
    assert_exact(
        &scenario,
        &comparison,
        &[&workers[0], &workers[1], &resumed],
    );
    assert_eq!(
        log_lines(
            &resumed,
            "resuming the window after its last confirmed page"
        ),
        1,
        "{}",
        resumed.log_tail(20)
    );
    // A clean run: the auth flow, the 40 pages and the plan's tail window (empty: one call). The kill
    // adds the page read again and the pages in flight (fetched ahead, at most 4, and not yet
    // confirmed); the second fetcher takes up the first one's app-token.
    let stats = scenario.simulator.stats();
    let clean = 2 + PAGES + 1;
    eprintln!(
        "calls: {} (clean run {clean}; {calls_at_kill} when killed); the resumed fetcher: {summary}",
        stats.calls
    );
    assert_one_login(&stats);
    assert!(
        stats.calls <= clean + 1 + 4,
        "the kill cost {} calls beyond a clean run",
        stats.calls - clean
    );
    stop(workers).await;
    scenario.clean_up(false).await.unwrap();
}

/// One authorization and one token in all, however many fetchers ran.
fn assert_one_login(stats: &kingdee_sim::gate::StatsSnapshot) {
    assert_eq!(
        (stats.authorizations, stats.tokens_issued),
        (1, 1),
        "one login: {stats:?}"
    );
}

/// `source` paced at 300 calls a minute, a page every 200 ms: slow enough for faults to land between
/// pages, as they do at a real gateway's pace.
fn at_five_calls_a_second<const N: usize>(
    source: [(&'static str, toml::Value); N],
) -> [(&'static str, toml::Value); N] {
    source.map(|(name, value)| match name {
        "calls_per_minute" => (name, toml::Value::Integer(300)),
        _ => (name, value),
    })
}

/// After `faults` interruptions of a sync of one window of `pages`: one login in all, and at most two
/// page calls per fault beyond the pages. Counted apart: the login, and the empty windows (each new
/// fetcher or session plans one up to its own start, and one cut off may be read again).
fn assert_each_fault_cost_two_pages_at_most(
    scenario: &Scenario,
    pages: u64,
    faults: u64,
    what: &str,
) {
    let stats = scenario.simulator.stats();
    let page_calls = stats.calls - stats.authorizations - stats.tokens_issued - stats.empty_lists;
    eprintln!(
        "{page_calls} calls for the window's {pages} pages with {faults} {what}, {} empty windows",
        stats.empty_lists
    );
    assert_one_login(&stats);
    assert!(
        page_calls <= pages + 2 * faults,
        "{faults} {what} cost {} page calls beyond a clean run's {pages}: {stats:?}",
        page_calls - pages
    );
}

/// Four SIGKILLs spread over one big window, 2.4 s apart, each fetcher restarted at once: each kill
/// costs at most two pages of calls beyond a clean run — the page read again to prove nothing before
/// it moved, and the page in flight — because the next fetcher resumes after the last confirmed page
/// and takes up the saved app-token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_fetcher_kills_cost_at_most_two_pages_each() {
    const PAGES: u64 = 40;
    const KILLS: u64 = 4;
    let source = at_five_calls_a_second(one_big_window());
    let scenario = scenario("kills", old_backlog(38, 2_000), &source).await;
    let workers = transformer_and_writer(&scenario).await;
    let mut fetcher = scenario.spawn(Worker::Fetcher, &["--once"]).unwrap();
    // Each fetcher lives 2.4 s: started and ready in about one, then pages at five a second.
    until_calls(&scenario, 3).await;
    for _ in 0..KILLS {
        tokio::time::sleep(Duration::from_millis(2_400)).await;
        fetcher.kill().await.unwrap();
        fetcher = scenario.spawn(Worker::Fetcher, &["--once"]).unwrap();
    }
    let summary = summary_of(&mut fetcher).await;
    let comparison = until_exact(&scenario, Duration::from_secs(60)).await;
    assert_exact(
        &scenario,
        &comparison,
        &[&workers[0], &workers[1], &fetcher],
    );
    eprintln!("the last fetcher: {summary}");
    assert_each_fault_cost_two_pages_at_most(&scenario, PAGES, KILLS, "kills");
    stop(workers).await;
    scenario.clean_up(false).await.unwrap();
}

/// Three restarts of the broker (a node of the test's own) during one big window, 1.5 s of paging
/// apart: the fetcher loses its session each time, reconnects, gets the window again and resumes after
/// its last confirmed page with the app-token it holds, so each restart costs at most two pages of
/// calls beyond a clean run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_broker_restarts_cost_at_most_two_pages_each() {
    const PAGES: u64 = 40;
    const RESTARTS: u64 = 3;
    let mut broker = OwnBroker::start(&format!("sync-restarts-{}", std::process::id()))
        .await
        .unwrap_or_else(|err| panic!("this test runs a RabbitMQ node of its own: {err:#}"));
    let services = Services {
        amqp_url: broker.url(),
        amqp_tls: Default::default(),
        pg_url: common::services().await.pg_url,
    };
    let source = at_five_calls_a_second(one_big_window());
    let scenario = Scenario::start(
        services,
        &common::sales_orders_pipeline(),
        &bin_dir(),
        "restarts",
        old_backlog(39, 2_000),
        &source,
    )
    .await
    .expect("scenario starts");
    let workers = transformer_and_writer(&scenario).await;
    let mut fetcher = scenario.spawn(Worker::Fetcher, &["--once"]).unwrap();
    until_calls(&scenario, 3).await;
    for _ in 0..RESTARTS {
        tokio::time::sleep(Duration::from_millis(1_500)).await;
        broker.stop().await.unwrap();
        broker.resume().await.unwrap();
        // Paging again before the next restart.
        let calls = scenario.simulator.stats().calls;
        until_calls(&scenario, calls + 1).await;
    }
    let summary = summary_of(&mut fetcher).await;
    let comparison = until_exact(&scenario, Duration::from_secs(60)).await;
    assert_exact(
        &scenario,
        &comparison,
        &[&workers[0], &workers[1], &fetcher],
    );
    assert!(
        log_lines(
            &fetcher,
            "resuming the window after its last confirmed page"
        ) as u64
            >= RESTARTS,
        "every restart landed in the window:\n{}",
        fetcher.log_tail(30)
    );
    eprintln!("the fetcher: {summary}");
    assert_each_fault_cost_two_pages_at_most(&scenario, PAGES, RESTARTS, "broker restarts");
    stop(workers).await;
    scenario.clean_up(false).await.unwrap();
    broker.stop().await.unwrap();
}

/// A row changes right after page 10 is served, and the fetcher is killed a few pages later — for
/// each of the simulator's changes: the row leaves the window, moves to its end, or leaves while a
/// late one enters. Every row after it shifted one place up, so the first row of page 11 slid onto
/// page 10, already read. The move is seen either way: by the killed fetcher (the count changed), or
/// by its successor, whose page read again holds a row not yet published (the kill came before the
/// pages after the move were confirmed), or which resumes and meets the moved row again at the end
/// (the ids published before the kill are kept with the progress). The window is paged again, and,
/// once the next sync has read the window the left row went to, the target ends exact.
async fn a_fetcher_killed_after_rows_moved_still_ends_exact(prefix: &str, move_: Move) {
    let scenario = scenario(prefix, move_.sim, &move_.source).await;
    scenario.simulator.arm_paging_change(PagingChange {
        after_page: move_.after_page,
        kind: move_.kind,
    });
    let workers = transformer_and_writer(&scenario).await;
    // Past the lag (and the second the orders' times are written in), so that the plan takes in
    // orders modified as the simulator started.
    tokio::time::sleep(Duration::from_millis(3_500)).await;
    let mut killed = scenario.spawn(Worker::Fetcher, &["--once"]).unwrap();
    // The auth flow, then a few pages after the move.
    until_calls(&scenario, 2 + move_.after_page as u64 + 6).await;
    killed.kill().await.unwrap();
    let mut resumed = scenario.spawn(Worker::Fetcher, &["--once"]).unwrap();
    summary_of(&mut resumed).await;
    // A row that left was modified just now: its new version belongs to the next sync's windows, once
    // the lag (2 s) has passed.
    tokio::time::sleep(Duration::from_secs(3)).await;
    scenario
        .run_fetcher_once(Duration::from_secs(60))
        .await
        .unwrap();
    let comparison = until_exact(&scenario, Duration::from_secs(60)).await;
    assert_exact(
        &scenario,
        &comparison,
        &[&workers[0], &workers[1], &resumed],
    );
    assert_eq!(scenario.simulator.stats().paging_changes, 1);
    let seen = [
        "rows moved while paging",
        "paging it from the start",
        "late rows may still enter",
    ]
    .iter()
    .map(|text| log_lines(&killed, text) + log_lines(&resumed, text))
    .sum::<usize>();
    assert!(
        seen >= 1,
        "a fetcher saw the move ({:?}):\n{}\n{}",
        move_.kind,
        killed.log_tail(20),
        resumed.log_tail(20)
    );
    stop(workers).await;
    scenario.clean_up(false).await.unwrap();
}

/// A change of the simulator's, where it is made: in which window, after which page.
struct Move {
    sim: SimConfig,
    source: Vec<(&'static str, toml::Value)>,
    kind: PagingChangeKind,
    after_page: usize,
}

/// A row leaving or moving to the end, in one big window of an old backlog (40 pages, one pass).
fn in_an_old_window(seed: u64, kind: PagingChangeKind) -> Move {
    Move {
        sim: old_backlog(seed, 2_000),
        source: one_big_window().to_vec(),
        kind,
        after_page: 10,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fetcher_killed_after_a_row_moved_to_the_end_still_ends_exact() {
    let move_ = in_an_old_window(37, PagingChangeKind::MoveToEnd);
    a_fetcher_killed_after_rows_moved_still_ends_exact("resume_moved", move_).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fetcher_killed_after_a_row_left_still_ends_exact() {
    let move_ = in_an_old_window(40, PagingChangeKind::Leave);
    a_fetcher_killed_after_rows_moved_still_ends_exact("resume_left", move_).await;
}

/// A late row entering is within the source's contract only in a window that may still gain late
/// rows (its end within lag + overlap of now), which is paged until two passes agree: here the plan's
/// newest window, of orders made as the simulator started (8 pages).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fetcher_killed_after_a_row_left_as_one_entered_still_ends_exact() {
    let move_ = Move {
        sim: SimConfig {
            seed: 41,
            orders: 400,
            epoch: kingdee_sim::data::days_ago(0),
            ..SimConfig::default()
        },
        source: vec![
            ("window_secs", toml::Value::Integer(86_400)),
            ("page_size", toml::Value::Integer(50)),
            ("records_per_message", toml::Value::Integer(50)),
            ("calls_per_minute", toml::Value::Integer(1_200)),
            ("lag_secs", toml::Value::Integer(2)),
            ("overlap_secs", toml::Value::Integer(30)),
        ],
        kind: PagingChangeKind::LeaveAndEnter,
        after_page: 1,
    };
    a_fetcher_killed_after_rows_moved_still_ends_exact("resume_swapped", move_).await;
}

/// Another client of the app spends three quarters of the limit: the gateway allows 1,500 calls a
/// minute where the pipeline's budget is 6,000 (the 150 under 600, ten times faster: the
/// gateway counts over 6 s, not 60). The budget cuts its rate after the first 429s and holds every
/// call back while the gateway has no room, so that one big window of 200 pages syncs with no dead
/// letter, at most 15% more calls than a clean run and in at most 1.2 times the ideal time at the
/// gateway's rate — whether the gateway says when to call again (`Retry-After`) or not.
async fn sync_under_a_lower_source_limit(prefix: &str, retry_after: bool) {
    const PAGES: u64 = 200;
    const SOURCE_LIMIT: u32 = 1_500;
    let sim = SimConfig {
        gateway: GatewayConfig {
            calls_per_minute: SOURCE_LIMIT,
            rate_window: Duration::from_secs(6),
            retry_after,
            ..GatewayConfig::default()
        },
        ..old_backlog(38, 2_000)
    };
    let mut source = one_big_window();
    for (name, value) in &mut source {
        match *name {
            "page_size" | "records_per_message" => *value = toml::Value::Integer(10),
            "calls_per_minute" => *value = toml::Value::Integer(4 * i64::from(SOURCE_LIMIT)),
            _ => {}
        }
    }
    let scenario = scenario(prefix, sim, &source).await;
    let workers = transformer_and_writer(&scenario).await;
    let started = tokio::time::Instant::now();
    let mut fetcher = scenario.spawn(Worker::Fetcher, &["--once"]).unwrap();
    let summary = summary_of(&mut fetcher).await;
    let took = started.elapsed();
    let comparison = until_exact(&scenario, Duration::from_secs(60)).await;
    assert_exact(
        &scenario,
        &comparison,
        &[&workers[0], &workers[1], &fetcher],
    );
    assert!(
        scenario
            .peek_dead_letters(Stage::Fetch)
            .await
            .unwrap()
            .is_empty(),
        "a window was dead-lettered"
    );
    // A clean run: the auth flow, the pages and the plan's empty tail window.
    let clean = 2 + PAGES + 1;
    let stats = scenario.simulator.stats();
    // Every call the gateway saw, refused ones included.
    let calls = stats.calls;
    let ideal = Duration::from_secs_f64(clean as f64 * 60.0 / f64::from(SOURCE_LIMIT));
    eprintln!(
        "retry_after {retry_after}: {calls} calls ({} refused; clean run {clean}: {:.3}×), {:.1} s \
         ({:.3}× the ideal {:.1} s); {summary}",
        stats.rate_limited,
        calls as f64 / clean as f64,
        took.as_secs_f64(),
        took.as_secs_f64() / ideal.as_secs_f64(),
        ideal.as_secs_f64()
    );
    assert!(stats.rate_limited > 0, "the gateway throttled: {stats:?}");
    assert!(
        calls as f64 <= 1.15 * clean as f64,
        "{calls} calls against {clean} for a clean run: {stats:?}"
    );
    assert!(
        took.as_secs_f64() <= 1.2 * ideal.as_secs_f64(),
        "{took:?} against the ideal {ideal:?}"
    );
    stop(workers).await;
    scenario.clean_up(false).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_allowing_a_quarter_of_the_budget_is_synced_at_its_rate() {
    sync_under_a_lower_source_limit("quarter", false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_that_says_when_to_call_again_is_synced_at_its_rate() {
    sync_under_a_lower_source_limit("quarter_told", true).await;
}
