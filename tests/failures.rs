//! End-to-end tests of failure: a target that goes away for 20 s, a broker restarted mid-run, workers
//! killed at random moments, lock conflicts retried through the delay queues, and dead letters replayed
//! after their cause is fixed. Real processes, the machine's PostgreSQL, the machine's RabbitMQ (and a
//! RabbitMQ node of the test's own for the restart). Each ends with the target equal to the truth minus
//! exactly the records that had to fail, which sit in the dead-letter queue with the right reason.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::*;
use conveyor_amqp::envelope::{Compression, Envelope, Meta};
use conveyor_base::{Record, Stage};
use conveyor_harness::own_broker::OwnBroker;
use conveyor_harness::proxy::TcpProxy;
use conveyor_harness::{Scenario, Services, Worker, WorkerProcess, pg_client};
use kingdee_sim::SimConfig;
use lapin::options::BasicGetOptions;
use rand::RngExt as _;

/// A failure test that has not finished by then fails, saying which step it was in, rather than hang.
const TEST_LIMIT: Duration = Duration::from_secs(300);

fn poisoned(sim_orders: usize) -> SimConfig {
    SimConfig {
        poison_every: 97,
        ..orders(sim_orders)
    }
}

/// Asserts the transform dead-letter queue holds exactly the simulator's poison records (each may sit
/// there more than once after a worker was killed between dead-lettering and acking: at least once),
/// each with the field and the reason.
async fn assert_poison_dead_lettered(scenario: &Scenario) {
    let letters = scenario.peek_dead_letters(Stage::Transform).await.unwrap();
    let dead: BTreeSet<String> = letters
        .iter()
        .flat_map(|l| l.record_ids.iter().cloned())
        .collect();
    let poisoned: BTreeSet<String> = scenario.simulator.poisoned_orders().into_iter().collect();
    assert!(!poisoned.is_empty());
    assert_eq!(
        dead, poisoned,
        "exactly the poison records are dead-lettered"
    );
    for letter in &letters {
        assert_eq!(letter.class, "permanent");
        assert_eq!(letter.stage, "transform");
        assert_eq!(letter.pipeline, "sales_orders");
        assert!(letter.error.contains("total_amount"), "{}", letter.error);
        assert!(!letter.trace_id.is_empty() && letter.last_failed_at.is_some());
    }
}

async fn dead_letter_count(scenario: &Scenario, stage: Stage) -> usize {
    scenario.peek_dead_letters(stage).await.unwrap().len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn target_down_for_20_s_holds_the_writer_and_dead_letters_no_good_record() {
    within(
        TEST_LIMIT,
        target_down_for_20_s_holds_the_writer_and_dead_letters_no_good_record_steps(),
    )
    .await;
}

async fn target_down_for_20_s_holds_the_writer_and_dead_letters_no_good_record_steps() {
    let scenario = scenario("pgdown", poisoned(2_000)).await;
    let proxy = TcpProxy::start(scenario.services.pg_addr().unwrap())
        .await
        .unwrap();
    let via_proxy = scenario.services.pg_url_via(proxy.addr()).unwrap();
    // Only the writer goes through the proxy (the fetcher keeps its sync state in PostgreSQL too).
    let writer = scenario
        .spawn_with_env(
            Worker::Writer,
            &[],
            &[("CONVEYOR_PG_URL", via_proxy.expose())],
        )
        .unwrap();
    let mut workers = vec![scenario.spawn(Worker::Transformer, &[]).unwrap(), writer];
    wait_ready(&workers[1], true, TIMEOUT).await;

    proxy.down();
    let cut = tokio::time::Instant::now();
    run_fetcher_once(&scenario).await;
    wait_ready(&workers[1], false, Duration::from_secs(30)).await;
    let client = pg_client(&scenario.services.pg_url).await.unwrap();
    let rows_at_cut = scenario.target_count(&client).await.unwrap();
    tokio::time::sleep(Duration::from_secs(20).saturating_sub(cut.elapsed())).await;
    assert_eq!(
        scenario.target_count(&client).await.unwrap(),
        rows_at_cut,
        "nothing is written while the target is down"
    );
    assert_eq!(
        dead_letter_count(&scenario, Stage::Write).await,
        0,
        "no good record is dead-lettered while the target is down"
    );
    assert!(
        waiting_for_writers(&scenario, &workers[1..]).await > 0.0,
        "the batches wait in the work queue or in the writer's hands"
    );

    proxy.up();
    wait_ready(&workers[1], true, Duration::from_secs(30)).await;
    assert_target_equals_truth(&scenario, &workers).await;
    assert_eq!(dead_letter_count(&scenario, Stage::Write).await, 0);
    assert_poison_dead_lettered(&scenario).await;
    stop_all(&mut workers).await;
    scenario.clean_up(false).await.unwrap();
}

/// PostgreSQL down when a worker starts is waited for, as the broker is: the worker serves its health
/// endpoints, says why it is not ready, logs no ERROR, and goes on once the database answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_started_while_postgresql_is_down_waits_for_it() {
    within(TEST_LIMIT, async {
        let scenario = scenario("pgwait", orders(200)).await;
        let proxy = TcpProxy::start(scenario.services.pg_addr().unwrap())
            .await
            .unwrap();
        proxy.down();
        let via_proxy = scenario.services.pg_url_via(proxy.addr()).unwrap();
        let mut writer = scenario
            .spawn_with_env(
                Worker::Writer,
                &[],
                &[("CONVEYOR_PG_URL", via_proxy.expose())],
            )
            .unwrap();
        let said = wait_for_condition(
            &writer,
            "database: waiting: cannot connect to PostgreSQL at",
        )
        .await;
        assert!(said.contains(&proxy.addr().port().to_string()), "{said}");
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert!(
            writer
                .exited_within(Duration::ZERO)
                .await
                .unwrap()
                .is_none(),
            "the writer waits: {}",
            writer.log_tail(10)
        );
        proxy.up();
        wait_ready(&writer, true, TIMEOUT).await;
        let mut workers = vec![scenario.spawn(Worker::Transformer, &[]).unwrap(), writer];
        run_fetcher_once(&scenario).await;
        assert_target_equals_truth(&scenario, &workers).await;
        let errors = scenario.logged_errors();
        assert!(
            errors.is_empty(),
            "a database that is down is no ERROR: {errors:#?}"
        );
        stop_all(&mut workers).await;
        scenario.clean_up(false).await.unwrap();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_restarted_mid_run_loses_nothing() {
    within(TEST_LIMIT, broker_restarted_mid_run_loses_nothing_steps()).await;
}

async fn broker_restarted_mid_run_loses_nothing_steps() {
    let name = format!("restart-{}", &uuid_suffix());
    let mut broker = OwnBroker::start(&name)
        .await
        .unwrap_or_else(|err| panic!("this test runs a RabbitMQ node of its own: {err:#}"));
    let services = Services {
        amqp_url: broker.url(),
        amqp_tls: Default::default(),
        pg_url: services().await.pg_url,
    };
    // One page per message: many small writes, so that the run is still going when the broker stops.
    let scenario = Scenario::start(
        services,
        &sales_orders_pipeline(),
        &bin_dir(),
        "restart",
        poisoned(5_000),
        &[("records_per_message", toml::Value::Integer(100))],
    )
    .await
    .unwrap();
    let mut workers = vec![scenario.spawn(Worker::Transformer, &[]).unwrap()];
    run_fetcher_once(&scenario).await;
    workers.push(scenario.spawn(Worker::Writer, &[]).unwrap());
    let client = pg_client(&scenario.services.pg_url).await.unwrap();
    let total = scenario.expected_records().len();
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    while scenario.target_count(&client).await.unwrap() == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "nothing written:\n{}",
            workers[1].log_tail(20)
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    step("stopping the broker mid-run");
    broker.stop().await.unwrap();
    let written_at_stop = scenario.target_count(&client).await.unwrap();
    assert!(
        written_at_stop < total,
        "the run finished before the broker stopped; use more records"
    );
    for worker in &workers {
        wait_ready(worker, false, Duration::from_secs(30)).await;
    }
    step("starting the broker again");
    broker.resume().await.unwrap();
    let back = tokio::time::Instant::now();
    for worker in &workers {
        wait_ready(worker, true, Duration::from_secs(60)).await;
    }
    // The workers try every half second at most (they waited up to 10 s between tries before): ready
    // within a second of the broker (measured: 0.3-0.5 s).
    let ready_after = back.elapsed();
    step(&format!(
        "workers ready {ready_after:?} after the broker took connections again"
    ));
    assert!(
        ready_after < Duration::from_secs(1),
        "workers took {ready_after:?} to come back"
    );
    step("waiting for the target");
    assert_target_equals_truth(&scenario, &workers).await;
    assert_poison_dead_lettered(&scenario).await;
    step("restarting the broker during a sync");
    // Again in the middle of a sync: the fetcher reconnects and syncs again.
    let mut fetcher = scenario.spawn(Worker::Fetcher, &["--once"]).unwrap();
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    while metric(&fetcher, "conveyor_source_requests_total", &[]).await == 0.0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{}",
            fetcher.log_tail(20)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    broker.stop().await.unwrap();
    broker.resume().await.unwrap();
    let status = fetcher.wait(TIMEOUT).await.unwrap();
    assert!(status.success(), "fetcher:\n{}", fetcher.log_tail(20));
    assert!(
        std::fs::read_to_string(&fetcher.log)
            .unwrap()
            .contains("lost the broker"),
        "the broker stopped after the sync finished; use more records:\n{}",
        fetcher.log_tail(20)
    );
    wait_for_empty_work_queues(&scenario).await;
    assert_target_equals_truth(&scenario, &workers).await;
    assert_poison_dead_lettered(&scenario).await;
    stop_all(&mut workers).await;
    // ERROR means a human should look: broker restarts the workers rode out are routine.
    let errors = scenario.logged_errors();
    assert!(errors.is_empty(), "{errors:#?}");
    scenario.clean_up(false).await.unwrap();
    broker.stop().await.unwrap();
}

fn uuid_suffix() -> String {
    let n: u64 = rand::rng().random();
    format!("{n:x}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_killed_at_random_moments_lose_nothing() {
    within(
        TEST_LIMIT,
        workers_killed_at_random_moments_lose_nothing_steps(),
    )
    .await;
}

async fn workers_killed_at_random_moments_lose_nothing_steps() {
    let scenario = scenario("chaos", poisoned(4_000)).await;
    let mut transformer = scenario.spawn(Worker::Transformer, &[]).unwrap();
    let mut writer = scenario.spawn(Worker::Writer, &[]).unwrap();
    let mut fetcher = scenario.spawn(Worker::Fetcher, &["--once"]).unwrap();
    let mut kills = Vec::new();
    for _ in 0..20 {
        let pause = rand::rng().random_range(50..400);
        tokio::time::sleep(Duration::from_millis(pause)).await;
        let victim: &mut WorkerProcess = match rand::rng().random_range(0..3) {
            0 => &mut fetcher,
            1 => &mut transformer,
            _ => &mut writer,
        };
        let kind = victim.worker;
        victim.kill().await.unwrap();
        let args: &[&str] = if kind == Worker::Fetcher {
            &["--once"]
        } else {
            &[]
        };
        *victim = scenario.spawn(kind, args).unwrap();
        kills.push(kind.binary());
    }
    eprintln!("killed with SIGKILL and restarted: {kills:?}");
    let status = fetcher.wait(TIMEOUT).await.unwrap();
    assert!(status.success(), "fetcher:\n{}", fetcher.log_tail(20));
    let mut workers = vec![transformer, writer];
    assert_target_equals_truth(&scenario, &workers).await;
    // The good records can all be written while a redelivered batch's dead letters are still being
    // sent: the last worker started may hold it.
    wait_until_idle(&scenario, &workers).await;
    assert_target_equals_truth(&scenario, &workers).await;
    assert_poison_dead_lettered(&scenario).await;
    assert_eq!(dead_letter_count(&scenario, Stage::Write).await, 0);

    // The ledger survived every kill: nothing unaccounted for, record for record.
    let status = ledger_status(&scenario, true);
    assert_eq!(status["unaccounted"], 0, "{status}");
    assert_eq!(status["in_flight"], 0, "{status}");
    let source = scenario
        .simulator
        .truth(kingdee_sim::Object::SalesOrder)
        .len();
    let ids = &status["ids"];
    assert_eq!(ids["fetched"], source, "{status}");
    let settled = ids["written"].as_u64().unwrap()
        + ids["dead_lettered"].as_u64().unwrap()
        + ids["filtered"].as_u64().unwrap();
    assert_eq!(settled, source as u64, "{status}");
    assert_eq!(
        ids["dead_lettered"],
        scenario.simulator.poisoned_orders().len(),
        "{status}"
    );

    // A message taken from the write queue behind the pipeline's back is named, and status fails.
    let mut writer = workers.pop().unwrap();
    writer.kill().await.unwrap();
    let stolen_ids = ["stolen-1", "stolen-2"];
    publish_orders(&scenario, &stolen_ids).await;
    let stolen = take_one(&scenario, Stage::Write).await;
    let status = ledger_status(&scenario, false);
    assert_eq!(status["unaccounted"], 2, "{status}");
    let named = &status["unaccounted_messages"][0];
    assert_eq!(named["message_id"], stolen.as_str(), "{status}");
    assert_eq!(named["stage"], "write", "{status}");
    assert_eq!(
        named["record_ids"],
        serde_json::json!(stolen_ids),
        "{status}"
    );
    stop_all(&mut workers).await;
    scenario.clean_up(false).await.unwrap();
}

/// `conveyorctl status --json` of the scenario's pipeline (without any worker's metrics), asserted
/// to succeed or to fail.
fn ledger_status(scenario: &Scenario, succeeds: bool) -> serde_json::Value {
    let output = ctl(scenario, &["status", "sales_orders", "--json"]);
    assert_eq!(
        output.status.success(),
        succeeds,
        "{}{}",
        String::from_utf8_lossy(&output.stderr),
        String::from_utf8_lossy(&output.stdout)
    );
    let parsed: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    parsed[0].clone()
}

/// Publishes source rows with these ids into the transform queue, as a fetcher would.
async fn publish_orders(scenario: &Scenario, ids: &[&str]) {
    let modified = "2025-03-01T08:00:00+08:00";
    let records = ids
        .iter()
        .map(|id| {
            Record::new(
                (*id).into(),
                modified.parse().unwrap(),
                &serde_json::json!({"id": id, "bill_no": format!("XSDD-{id}"), "modify_time": "2025-03-01 08:00:00"}),
            )
        })
        .collect();
    let (body, properties) = Envelope {
        meta: Meta::new_trace("sales_orders").next_stage(),
        records,
    }
    .to_amqp(Compression::default());
    scenario
        .publish_raw(Stage::Transform, &body, properties)
        .await
        .unwrap();
}

/// Takes the next message off a stage's work queue for good (waiting for one); returns its id.
async fn take_one(scenario: &Scenario, stage: Stage) -> String {
    let connection = conveyor_amqp::connect(&scenario.services.broker().unwrap(), "test")
        .await
        .unwrap();
    let channel = connection.create_channel().await.unwrap();
    let queue = scenario.topology().queue(stage);
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    let message = loop {
        let got = channel
            .basic_get(queue.as_str().into(), BasicGetOptions { no_ack: true })
            .await
            .unwrap();
        if let Some(message) = got {
            break message;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "nothing reached {queue}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    conveyor_amqp::close(&connection).await;
    message
        .delivery
        .properties
        .message_id()
        .as_ref()
        .expect("a message id")
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_conflicts_are_retried_later_and_dead_lettered_only_when_attempts_run_out() {
    within(
        TEST_LIMIT,
        lock_conflicts_are_retried_later_and_dead_lettered_only_when_attempts_run_out_steps(),
    )
    .await;
}

async fn lock_conflicts_are_retried_later_and_dead_lettered_only_when_attempts_run_out_steps() {
    let mut scenario = scenario("retry", orders(300)).await;
    scenario.set_env("CONVEYOR_PG_LOCK_TIMEOUT_MS", "100");
    let writer = spawn_ready(&scenario, Worker::Writer).await;
    let transformer = scenario.spawn(Worker::Transformer, &[]).unwrap();
    let table = scenario.table().unwrap();
    let locker = pg_client(&scenario.services.pg_url).await.unwrap();
    let lock = format!("BEGIN; LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE");

    // A lock held for 2 s from the first retry: writes fail with lock_not_available, go to the retry
    // queues and land later. The fetcher runs meanwhile: how long it takes to end (closing its broker
    // connection under load can take seconds) must not stretch the lock past the attempts.
    locker.batch_execute(&lock).await.unwrap();
    let mut fetcher = scenario.spawn(Worker::Fetcher, &["--once"]).unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while metric(&writer, "conveyor_records_retried_total", &[]).await == 0.0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no retry:\n{}",
            writer.log_tail(20)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    locker.batch_execute("COMMIT").await.unwrap();
    let synced = fetcher.wait(TIMEOUT).await.unwrap();
    assert!(synced.success(), "fetcher:\n{}", fetcher.log_tail(20));
    let workers = vec![transformer, writer];
    assert_target_equals_truth(&scenario, &workers).await;
    assert_eq!(dead_letter_count(&scenario, Stage::Write).await, 0);
    let [transformer, mut writer] = <[WorkerProcess; 2]>::try_from(workers).ok().unwrap();

    // With 2 attempts and a lock held throughout, the batches are dead-lettered as transient.
    writer.terminate().unwrap();
    writer.wait(Duration::from_secs(30)).await.unwrap();
    scenario.set_env("CONVEYOR_MAX_ATTEMPTS", "2");
    writer = spawn_ready(&scenario, Worker::Writer).await;
    locker.batch_execute(&lock).await.unwrap();
    // New records straight into the write queue (the source has nothing new to sync).
    let expected_letters = 3;
    for batch in 0..expected_letters {
        let records = (0..100)
            .map(|n| {
                let id = format!("lock-{batch}-{n}");
                Record::new(
                    id.clone(),
                    "2025-01-01T08:00:00+08:00".parse().unwrap(),
                    &serde_json::json!({"id": id, "bill_no": "XSDD-L", "modify_time": "2025-01-01T08:00:00+08:00"}),
                )
            })
            .collect();
        let (body, properties) = Envelope {
            meta: Meta::new_trace("sales_orders"),
            records,
        }
        .to_amqp(Compression::default());
        scenario
            .publish_raw(Stage::Write, &body, properties)
            .await
            .unwrap();
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while dead_letter_count(&scenario, Stage::Write).await < expected_letters {
        assert!(
            tokio::time::Instant::now() < deadline,
            "not dead-lettered:\n{}",
            writer.log_tail(20)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    locker.batch_execute("COMMIT").await.unwrap();
    let letters = scenario.peek_dead_letters(Stage::Write).await.unwrap();
    assert_eq!(letters.len(), expected_letters, "{letters:?}");
    for letter in &letters {
        assert_eq!(letter.class, "transient");
        assert_eq!(letter.attempts, 2);
        assert!(
            letter.error.starts_with("gave up after 2 attempts") && letter.error.contains("lock"),
            "{}",
            letter.error
        );
        assert_eq!(letter.record_ids.len(), 100);
        // The batch travels compressed and is shown as the JSON it holds.
        let payload = letter.payload.as_deref().unwrap_or_default();
        assert!(
            payload.starts_with(r#"{"schema":1"#) && payload.contains("XSDD-L"),
            "{}",
            &payload[..payload.len().min(200)]
        );
        assert!(letter.body.len() < payload.len() / 2);
        assert_eq!(letter.original_routing_key, "sales_orders.write");
        assert!(letter.first_failed_at <= letter.last_failed_at);
    }
    // The cause is gone: the replay lands them.
    let replayed = ctl_ok(
        &scenario,
        &["dlq", "replay", "sales_orders", "--stage", "write"],
    );
    assert!(
        replayed.contains("replayed 3 message(s) with 300 record(s)"),
        "{replayed}"
    );
    wait_for_empty_work_queues(&scenario).await;
    assert_eq!(dead_letter_count(&scenario, Stage::Write).await, 0);
    let landed: i64 = locker
        .query_one(
            &format!("SELECT count(*) FROM {table} WHERE id LIKE 'lock-%'"),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(landed, 300);
    stop_all(&mut [transformer, writer]).await;
    scenario.clean_up(false).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_after_the_cause_is_fixed_lands_the_refused_records_exactly_once() {
    within(
        TEST_LIMIT,
        replay_after_the_cause_is_fixed_lands_the_refused_records_exactly_once_steps(),
    )
    .await;
}

async fn replay_after_the_cause_is_fixed_lands_the_refused_records_exactly_once_steps() {
    let mut scenario = scenario("replay", orders(600)).await;
    scenario.set_env("CONVEYOR_FETCH_INTERVAL_SECS", "3600");
    let writer = spawn_ready(&scenario, Worker::Writer).await;
    // The cause: a rule in the target that refuses every order whose id ends in 7.
    let cause = RefusedSevens::add(&scenario).await;
    let (client, refused) = (&cause.client, cause.ids.clone());
    let total = scenario.expected_records().len();
    assert!(!refused.is_empty());

    let transformer = scenario.spawn(Worker::Transformer, &[]).unwrap();
    let fetcher = scenario.spawn(Worker::Fetcher, &[]).unwrap();
    let mut workers = vec![fetcher, transformer, writer];
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    while dead_letter_count(&scenario, Stage::Write).await < refused.len()
        || scenario.target_count(client).await.unwrap() < total - refused.len()
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{}",
            workers[2].log_tail(20)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    wait_for_empty_work_queues(&scenario).await;
    let letters = scenario.peek_dead_letters(Stage::Write).await.unwrap();
    let dead: BTreeSet<String> = letters.iter().flat_map(|l| l.record_ids.clone()).collect();
    assert_eq!(
        dead, refused,
        "exactly the refused records, each on its own"
    );
    assert_eq!(letters.len(), refused.len());
    for letter in &letters {
        assert_eq!(letter.class, "permanent");
        assert!(letter.error.contains("no_sevens"), "{}", letter.error);
    }

    // The operator's view: status accounts for every record, list counts, show filters, export writes.
    let addresses: Vec<String> = workers
        .iter()
        .map(|w| format!("--worker=http://{}", w.http_addr))
        .collect();
    let status_args = |extra: &[&str]| {
        let mut args = vec!["status", "sales_orders", "--json"];
        args.extend(addresses.iter().map(String::as_str));
        args.extend(extra);
        args.into_iter().map(str::to_owned).collect::<Vec<_>>()
    };
    // Read once nothing is in flight: a write's ack, and its count, come just after the write.
    let status_of = |scenario: &Scenario| {
        let args = status_args(&[]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let deadline = std::time::Instant::now() + TIMEOUT;
        loop {
            let out = ctl_ok(scenario, &args);
            let parsed: serde_json::Value = serde_json::from_str(&out).unwrap();
            if parsed[0]["in_flight"] == 0 || std::time::Instant::now() > deadline {
                return parsed[0].clone();
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    let status = status_of(&scenario);
    assert_eq!(status["fetched"], total, "{status}");
    assert_eq!(status["written"], total - refused.len(), "{status}");
    assert_eq!(status["dead_lettered"], refused.len(), "{status}");
    assert_eq!(status["in_flight"], 0, "{status}");
    assert_eq!(status["unaccounted"], 0, "{status}");

    let list: serde_json::Value = serde_json::from_str(&ctl_ok(
        &scenario,
        &["dlq", "list", "sales_orders", "--json"],
    ))
    .unwrap();
    let write = list
        .as_array()
        .unwrap()
        .iter()
        .find(|q| q["stage"] == "write")
        .unwrap();
    assert_eq!(write["messages"], refused.len(), "{list}");
    assert_eq!(write["by_class"]["permanent"], refused.len(), "{list}");

    let one = refused.iter().next().unwrap();
    let shown: serde_json::Value = serde_json::from_str(&ctl_ok(
        &scenario,
        &["dlq", "show", "sales_orders", "--record-id", one, "--json"],
    ))
    .unwrap();
    assert_eq!(shown.as_array().unwrap().len(), 1, "{shown}");
    assert_eq!(shown[0]["record_ids"][0], one.as_str());
    let none: serde_json::Value = serde_json::from_str(&ctl_ok(
        &scenario,
        &[
            "dlq",
            "show",
            "sales_orders",
            "--class",
            "transient",
            "--json",
        ],
    ))
    .unwrap();
    assert_eq!(none.as_array().unwrap().len(), 0);
    let export = std::env::temp_dir().join(format!("conveyor-export-{}.jsonl", scenario.namespace));
    ctl_ok(
        &scenario,
        &[
            "dlq",
            "export",
            "sales_orders",
            "--stage",
            "write",
            "--output",
            export.to_str().unwrap(),
        ],
    );
    let exported = std::fs::read_to_string(&export).unwrap();
    assert_eq!(exported.lines().count(), refused.len());
    let first: serde_json::Value = serde_json::from_str(exported.lines().next().unwrap()).unwrap();
    assert!(first["payload"].as_str().unwrap().contains("\"schema\":1"));
    let _ = std::fs::remove_file(&export);

    // A dry run moves nothing; after the fix, replays (a limited one, then the rest) land every
    // refused record exactly once.
    let dry = ctl_ok(
        &scenario,
        &[
            "dlq",
            "replay",
            "sales_orders",
            "--stage",
            "write",
            "--dry-run",
        ],
    );
    assert!(
        dry.contains(&format!("would replay {}", refused.len())),
        "{dry}"
    );
    assert_eq!(
        dead_letter_count(&scenario, Stage::Write).await,
        refused.len()
    );
    cause.fix().await;
    let first_two = ctl_ok(
        &scenario,
        &[
            "dlq",
            "replay",
            "sales_orders",
            "--stage",
            "write",
            "--limit",
            "2",
        ],
    );
    assert!(first_two.contains("replayed 2 message(s)"), "{first_two}");
    let rest = ctl_ok(&scenario, &["dlq", "replay", "sales_orders"]);
    assert!(
        rest.contains(&format!("replayed {} message(s)", refused.len() - 2)),
        "{rest}"
    );
    assert_target_equals_truth(&scenario, &workers).await;
    wait_for_empty_work_queues(&scenario).await;
    let left = scenario.peek_dead_letters(Stage::Write).await.unwrap();
    assert!(
        left.is_empty(),
        "{:?}",
        left.iter()
            .map(|l| (&l.message_id, &l.class, &l.error, l.attempts))
            .take(3)
            .collect::<Vec<_>>()
    );
    let writer = &workers[2];
    assert_eq!(
        metric(
            writer,
            "conveyor_target_rows_total",
            &["outcome=\"applied\""]
        )
        .await,
        total as f64,
        "every record applied exactly once"
    );
    assert_eq!(
        metric(writer, "conveyor_target_rows_total", &["outcome=\"stale\""]).await,
        0.0
    );
    let status = status_of(&scenario);
    assert_eq!(status["replayed"], refused.len(), "{status}");
    assert_eq!(status["written"], total, "{status}");
    assert_eq!(status["in_flight"], 0, "{status}");
    let again = ctl_ok(&scenario, &["dlq", "replay", "sales_orders"]);
    assert!(again.contains("replayed 0 message(s)"), "{again}");

    // Purge asks first: without a terminal to ask on, and without --yes, it removes nothing.
    scenario
        .publish_raw(
            Stage::Transform,
            b"not json",
            lapin::BasicProperties::default(),
        )
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while dead_letter_count(&scenario, Stage::Transform).await == 0 {
        assert!(tokio::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let refused_purge = ctl(&scenario, &["dlq", "purge", "sales_orders"]);
    assert!(!refused_purge.status.success());
    assert_eq!(dead_letter_count(&scenario, Stage::Transform).await, 1);
    let purged = ctl_ok(
        &scenario,
        &[
            "dlq",
            "purge",
            "sales_orders",
            "--class",
            "malformed",
            "--yes",
        ],
    );
    assert!(purged.contains("purged 1 message(s)"), "{purged}");
    assert_eq!(dead_letter_count(&scenario, Stage::Transform).await, 0);
    stop_all(&mut workers).await;
    scenario.clean_up(false).await.unwrap();
}

/// A message its consumer never acks (it dies on it every time) is dead-lettered by the broker itself
/// at the work queue's delivery limit, without conveyor's failure headers: `dlq show` and `list` present
/// it with the class `broker` and the broker's reason, and a replay lands it. Reading a dead-letter
/// queue again and again drops nothing: it carries a delivery limit no reading reaches (RabbitMQ 4.0 to
/// 4.2 count each hand-back of a read letter as a delivery).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_the_broker_dead_letters_at_its_delivery_limit_is_shown_and_replayed() {
    within(
        TEST_LIMIT,
        a_message_the_broker_dead_letters_at_its_delivery_limit_is_shown_and_replayed_steps(),
    )
    .await;
}

async fn a_message_the_broker_dead_letters_at_its_delivery_limit_is_shown_and_replayed_steps() {
    use conveyor_amqp::{DEAD_LETTER_DELIVERY_LIMIT, DELIVERY_LIMIT};
    use lapin::options::{BasicRejectOptions, QueueDeclareOptions};
    use lapin::types::{AMQPValue, FieldTable};

    let scenario = scenario("delivery_limit", orders(10)).await;
    scenario.declare_topology().await.unwrap();
    let modified = "2025-03-01T08:00:00+08:00";
    let record = |id: &str| {
        Record::new(
            id.into(),
            modified.parse().unwrap(),
            &serde_json::json!({"id": id, "bill_no": format!("XSDD-{id}"), "modify_time": modified}),
        )
    };
    let meta = Meta::new_trace("sales_orders");
    let (body, properties) = Envelope {
        meta: meta.next_stage(),
        records: vec![record("dl-1"), record("dl-2")],
    }
    .to_amqp(Compression::default());
    scenario
        .publish_raw(Stage::Write, &body, properties)
        .await
        .unwrap();

    step("a consumer that fails on the message every time hands it back until the broker gives up");
    let connection = conveyor_amqp::connect(&scenario.services.broker().unwrap(), "test")
        .await
        .unwrap();
    let channel = connection.create_channel().await.unwrap();
    let work_queue = scenario.topology().queue(Stage::Write);
    let mut deliveries = 0;
    while let Some(message) = channel
        .basic_get(
            work_queue.as_str().into(),
            BasicGetOptions { no_ack: false },
        )
        .await
        .unwrap()
    {
        deliveries += 1;
        assert!(deliveries <= 3 * DELIVERY_LIMIT, "never dead-lettered");
        // A reject counts as a failed delivery on every RabbitMQ version (4.3 counts no nack).
        channel
            .basic_reject(
                message.delivery.delivery_tag,
                BasicRejectOptions { requeue: true },
            )
            .await
            .unwrap();
    }
    assert!(deliveries >= DELIVERY_LIMIT, "delivered {deliveries} times");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while dead_letter_count(&scenario, Stage::Write).await == 0 {
        assert!(tokio::time::Instant::now() < deadline, "no dead letter");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    step("dlq show and list present it with the broker's reason");
    let shown: serde_json::Value = serde_json::from_str(&ctl_ok(
        &scenario,
        &["dlq", "show", "sales_orders", "--stage", "write", "--json"],
    ))
    .unwrap();
    let letters = shown.as_array().unwrap();
    assert_eq!(letters.len(), 1, "{shown:#}");
    let letter = &letters[0];
    assert_eq!(letter["class"], "broker", "{letter:#}");
    let error = letter["error"].as_str().unwrap();
    assert!(
        error.starts_with(&format!(
            "delivery_limit: redelivered {DELIVERY_LIMIT} times without an ack (the delivery limit of {work_queue})"
        )),
        "{error}"
    );
    assert_eq!(letter["stage"], "write");
    assert_eq!(letter["pipeline"], "sales_orders");
    assert_eq!(letter["record_ids"], serde_json::json!(["dl-1", "dl-2"]));
    assert_eq!(letter["original_routing_key"], "sales_orders.write");
    assert_eq!(letter["trace_id"], meta.trace_id.to_string());
    assert!(letter["last_failed_at"].is_string(), "{letter:#}");
    let text = ctl_ok(
        &scenario,
        &["dlq", "show", "sales_orders", "--class", "broker"],
    );
    assert!(
        text.contains("class:    broker") && text.contains("delivery_limit: redelivered"),
        "{text}"
    );
    let none = ctl_ok(
        &scenario,
        &[
            "dlq",
            "show",
            "sales_orders",
            "--class",
            "permanent",
            "--json",
        ],
    );
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&none).unwrap(),
        serde_json::json!([])
    );
    let list: serde_json::Value = serde_json::from_str(&ctl_ok(
        &scenario,
        &["dlq", "list", "sales_orders", "--json"],
    ))
    .unwrap();
    let write = list
        .as_array()
        .unwrap()
        .iter()
        .find(|q| q["stage"] == "write")
        .unwrap();
    assert_eq!(
        (
            &write["messages"],
            &write["records"],
            &write["by_class"]["broker"]
        ),
        (&1.into(), &2.into(), &1.into()),
        "{list:#}"
    );

    step("reading the dead-letter queue again and again drops nothing");
    for _ in 0..DELIVERY_LIMIT + 5 {
        assert_eq!(dead_letter_count(&scenario, Stage::Write).await, 1);
    }
    let dead_letter_queue = scenario.topology().dead_letter_queue(Stage::Write);
    let declare = |limit: Option<u32>| {
        let mut arguments = FieldTable::default();
        arguments.insert(
            "x-queue-type".into(),
            AMQPValue::LongString("quorum".into()),
        );
        arguments.insert(
            "x-queue-leader-locator".into(),
            AMQPValue::LongString("balanced".into()),
        );
        if let Some(limit) = limit {
            arguments.insert("x-delivery-limit".into(), AMQPValue::LongUInt(limit));
        }
        let connection = &connection;
        let queue = dead_letter_queue.clone();
        async move {
            let channel = connection.create_channel().await.unwrap();
            let options = QueueDeclareOptions {
                durable: true,
                ..Default::default()
            };
            channel
                .queue_declare(queue.as_str().into(), options, arguments)
                .await
                .map(|_| ())
                .map_err(|err| err.to_string())
        }
    };
    declare(Some(DEAD_LETTER_DELIVERY_LIMIT))
        .await
        .expect("the dead-letter queue has the delivery limit");
    let without = declare(None).await.unwrap_err();
    assert!(
        without.contains("inequivalent arg 'x-delivery-limit'"),
        "{without}"
    );
    conveyor_amqp::close(&connection).await;

    step("replayed, it lands");
    let mut writer = spawn_ready(&scenario, Worker::Writer).await;
    let replayed = ctl_ok(
        &scenario,
        &["dlq", "replay", "sales_orders", "--class", "broker"],
    );
    assert!(
        replayed.contains("replayed 1 message(s) with 2 record(s)"),
        "{replayed}"
    );
    let client = pg_client(&scenario.services.pg_url).await.unwrap();
    let table = scenario.table().unwrap();
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        let landed: i64 = client
            .query_one(
                &format!("SELECT count(*) FROM {table} WHERE id IN ('dl-1', 'dl-2')"),
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if landed == 2 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{}",
            writer.log_tail(20)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(dead_letter_count(&scenario, Stage::Write).await, 0);
    stop_all(std::slice::from_mut(&mut writer)).await;
    scenario.clean_up(false).await.unwrap();
}

/// Dead-letter queues an earlier conveyor declared without a delivery limit (nor a leader locator)
/// stop neither
/// `conveyorctl topology declare` nor a worker: they are taken as they are, with a warning that says
/// how to give them one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letter_queues_of_an_earlier_version_are_taken_as_they_are() {
    use lapin::options::QueueDeclareOptions;
    use lapin::types::{AMQPValue, FieldTable};

    let scenario = scenario("legacy_dlq", orders(10)).await;
    let connection = conveyor_amqp::connect(&scenario.services.broker().unwrap(), "test")
        .await
        .unwrap();
    let channel = connection.create_channel().await.unwrap();
    for stage in Stage::ALL {
        let mut arguments = FieldTable::default();
        arguments.insert(
            "x-queue-type".into(),
            AMQPValue::LongString("quorum".into()),
        );
        let options = QueueDeclareOptions {
            durable: true,
            ..Default::default()
        };
        let queue = scenario.topology().dead_letter_queue(stage);
        channel
            .queue_declare(queue.as_str().into(), options, arguments)
            .await
            .unwrap();
    }
    conveyor_amqp::close(&connection).await;

    let pipeline_file = sales_orders_pipeline();
    let output = ctl(
        &scenario,
        &["topology", "declare", pipeline_file.to_str().unwrap()],
    );
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    let stdout = succeeded("conveyorctl topology declare", output);
    assert!(stdout.contains(".sales_orders.write.dlq"), "{stdout}");
    assert!(
        stderr.contains("declared by an earlier conveyor without a delivery limit")
            && stderr.contains("set_policy"),
        "{stderr}"
    );
    let mut transformer = spawn_ready(&scenario, Worker::Transformer).await;
    stop_all(std::slice::from_mut(&mut transformer)).await;
    scenario.clean_up(false).await.unwrap();
}
