//! The web console against the real broker, database and workers: a pipeline whose target refuses
//! some records (a CHECK constraint, the poison), its dead letters browsed, replayed once too early
//! (they die again, and the console says so), then replayed after the fix until the target equals
//! the truth. Most checks call the router; one test clicks through a real headless Chromium and
//! keeps screenshots in target/console-screenshots/.

mod common;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use common::*;
use conveyor_console::{Cli, Console};
use conveyor_harness::browser::Browser;
use conveyor_harness::{Scenario, Worker, WorkerProcess};
use conveyor_ledger::letters::{self, LetterQuery};
use tower::ServiceExt as _;

const TEST_LIMIT: Duration = Duration::from_secs(300);
const OPERATOR: (&str, &str) = ("alice", "correct horse battery staple");
const VIEWER: (&str, &str) = ("victor", "viewer password 42");

/// A pipeline run to its end with the records whose id ends in 7 dead-lettered by the target.
struct Setup {
    scenario: Scenario,
    workers: Vec<WorkerProcess>,
    cause: RefusedSevens,
    refused: BTreeSet<String>,
    console: Arc<Console>,
    address: String,
    users: PathBuf,
}

async fn setup(prefix: &str) -> Setup {
    let mut scenario = scenario(prefix, orders(240)).await;
    scenario.set_env("CONVEYOR_FETCH_INTERVAL_SECS", "3600");
    let writer = spawn_ready(&scenario, Worker::Writer).await;
    let cause = RefusedSevens::add(&scenario).await;
    let refused = cause.ids.clone();
    assert!(refused.len() > 3);
    let total = scenario.expected_records().len();
    let transformer = scenario.spawn(Worker::Transformer, &[]).unwrap();
    let fetcher = scenario.spawn(Worker::Fetcher, &[]).unwrap();
    let workers = vec![fetcher, transformer, writer];
    step("running the pipeline until every poison record is dead-lettered");
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    while scenario
        .peek_dead_letters(conveyor_base::Stage::Write)
        .await
        .unwrap()
        .len()
        < refused.len()
        || scenario.target_count(&cause.client).await.unwrap() < total - refused.len()
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{}",
            logs_of(&workers)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    wait_for_empty_work_queues(&scenario).await;

    let port = conveyor_harness::free_port().unwrap();
    let address = format!("127.0.0.1:{port}");
    let users = std::env::temp_dir().join(format!("conveyor-console-users-{}", scenario.namespace));
    std::fs::write(
        &users,
        format!(
            "# the test's users\n{}:operator:{}\n{}:viewer:{}\n",
            OPERATOR.0, OPERATOR.1, VIEWER.0, VIEWER.1
        ),
    )
    .unwrap();
    let console = Console::open(&cli(&scenario, &address, Some(users.clone())))
        .await
        .unwrap();
    Setup {
        scenario,
        workers,
        cause,
        refused,
        console,
        address,
        users,
    }
}

/// The console's settings for a scenario, as flags.
fn cli(scenario: &Scenario, address: &str, users: Option<PathBuf>) -> Cli {
    let environment = scenario.environment();
    let mut args = vec![
        "conveyor-console".to_owned(),
        format!("--pipeline={}", environment["CONVEYOR_PIPELINE"]),
        format!("--amqp-url={}", environment["CONVEYOR_AMQP_URL"]),
        format!("--namespace={}", environment["CONVEYOR_NAMESPACE"]),
        format!("--pg-url={}", environment["CONVEYOR_PG_URL"]),
        format!("--pg-schema={}", environment["CONVEYOR_PG_SCHEMA"]),
        format!(
            "--retry-delays-ms={}",
            environment["CONVEYOR_RETRY_DELAYS_MS"]
        ),
        format!("--listen={address}"),
    ];
    if let Some(users) = users {
        args.push(format!("--users-file={}", users.display()));
    }
    <Cli as clap::Parser>::try_parse_from(args).unwrap()
}

/// One answer of the router.
struct Answer {
    status: StatusCode,
    headers: axum::http::HeaderMap,
    body: String,
}

/// Calls the router as a browser at the console's address would.
async fn call(
    router: &Router,
    host: &str,
    method: &str,
    path: &str,
    cookie: Option<&str>,
    form: Option<&[(&str, &str)]>,
    origin: Option<&str>,
) -> Answer {
    let mut request = Request::builder()
        .method(method)
        .uri(path)
        .header(header::HOST, host);
    if let Some(cookie) = cookie {
        request = request.header(header::COOKIE, cookie);
    }
    if let Some(origin) = origin {
        request = request.header(header::ORIGIN, origin);
    }
    let body = match form {
        Some(fields) => {
            request = request.header(header::CONTENT_TYPE, "application/x-www-form-urlencoded");
            let mut encoded = form_urlencoded::Serializer::new(String::new());
            for (name, value) in fields {
                encoded.append_pair(name, value);
            }
            Body::from(encoded.finish())
        }
        None => Body::empty(),
    };
    let response = router
        .clone()
        .oneshot(request.body(body).unwrap())
        .await
        .unwrap();
    let status = response.status();
    let headers = response.headers().clone();
    let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
        .await
        .unwrap();
    Answer {
        status,
        headers,
        body: String::from_utf8_lossy(&bytes).into_owned(),
    }
}

/// A logged-in user of the router, and the CSRF token its pages carry.
struct User {
    router: Router,
    host: String,
    cookie: String,
    csrf: String,
}

impl User {
    async fn login(router: &Router, host: &str, (name, password): (&str, &str)) -> Self {
        let origin = format!("http://{host}");
        let answer = call(
            router,
            host,
            "POST",
            "/login",
            None,
            Some(&[("user", name), ("password", password)]),
            Some(&origin),
        )
        .await;
        assert_eq!(answer.status, StatusCode::SEE_OTHER, "{}", answer.body);
        let set = answer.headers[header::SET_COOKIE]
            .to_str()
            .unwrap()
            .to_owned();
        assert!(
            set.contains("HttpOnly") && set.contains("SameSite=Strict"),
            "{set}"
        );
        let cookie = set.split(';').next().unwrap().to_owned();
        let page = call(router, host, "GET", "/", Some(&cookie), None, None).await;
        assert_eq!(page.status, StatusCode::OK, "{}", page.body);
        let csrf = page
            .body
            .split("name=\"csrf\" value=\"")
            .nth(1)
            .and_then(|rest| rest.split('"').next())
            .expect("every page has the logout form's CSRF token")
            .to_owned();
        Self {
            router: router.clone(),
            host: host.to_owned(),
            cookie,
            csrf,
        }
    }

    async fn get(&self, path: &str) -> Answer {
        call(
            &self.router,
            &self.host,
            "GET",
            path,
            Some(&self.cookie),
            None,
            None,
        )
        .await
    }

    /// Starts a job with `fields` posted to /actions/run; returns its page once it is done.
    async fn run_job(&self, fields: &[(&str, &str)]) -> String {
        let started = self.post("/actions/run", fields).await;
        assert_eq!(started.status, StatusCode::SEE_OTHER, "{}", started.body);
        let job = started.headers[header::LOCATION].to_str().unwrap();
        wait_for_job(self, job).await
    }

    /// Posts a form with the session's CSRF token, from the console's own origin.
    async fn post(&self, path: &str, fields: &[(&str, &str)]) -> Answer {
        let mut with_token = fields.to_vec();
        with_token.push(("csrf", &self.csrf));
        let origin = format!("http://{}", self.host);
        call(
            &self.router,
            &self.host,
            "POST",
            path,
            Some(&self.cookie),
            Some(&with_token),
            Some(&origin),
        )
        .await
    }
}

/// The letters of the write stage still in their queue, by the index.
async fn dead_in_index(console: &Console, pipeline: &str) -> Vec<letters::LetterSummary> {
    letters::page(
        &console.database,
        &LetterQuery::dead(pipeline),
        None,
        10_000,
    )
    .await
    .unwrap()
}

/// Waits for a job's page to say it is done; returns the page.
async fn wait_for_job(user: &User, location: &str) -> String {
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        let page = user.get(&format!("{location}/live")).await;
        if page.body.contains("data-state=\"done\"") {
            return page.body;
        }
        assert!(tokio::time::Instant::now() < deadline, "{}", page.body);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A number the overview shows, by its `data-count` name.
fn shown_count(page: &str, name: &str) -> u64 {
    page.split(&format!("data-count=\"{name}\">"))
        .nth(1)
        .and_then(|rest| {
            let rest = rest.trim_start_matches(|c: char| c != '>' && !c.is_ascii_digit());
            let rest = rest.trim_start_matches('>');
            rest.split('<').next()
        })
        .and_then(|number| number.trim().parse().ok())
        .unwrap_or_else(|| panic!("the overview shows no {name}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_guards_its_actions_and_replays_after_the_fix() {
    within(TEST_LIMIT, guards_and_replays()).await;
}

async fn guards_and_replays() {
    let setup = setup("console").await;
    let router = conveyor_console::router(setup.console.clone());
    let host = setup.address.as_str();
    let pipeline = "sales_orders";

    step("no session: pages lead to the login, actions are refused");
    let answer = call(&router, host, "GET", "/", None, None, None).await;
    assert_eq!(answer.status, StatusCode::SEE_OTHER);
    assert_eq!(answer.headers[header::LOCATION], "/login");
    let csp = answer.headers[header::CONTENT_SECURITY_POLICY]
        .to_str()
        .unwrap();
    assert!(
        csp.contains("script-src 'self'") && csp.contains("frame-ancestors 'none'"),
        "{csp}"
    );
    let origin = format!("http://{host}");
    let answer = call(
        &router,
        host,
        "POST",
        "/actions/run",
        None,
        Some(&[("action", "purge")]),
        Some(&origin),
    )
    .await;
    assert_eq!(answer.status, StatusCode::UNAUTHORIZED);
    let answer = call(
        &router,
        "evil.example:80",
        "GET",
        "/login",
        None,
        None,
        None,
    )
    .await;
    assert_eq!(
        answer.status,
        StatusCode::MISDIRECTED_REQUEST,
        "another host name (DNS rebinding)"
    );

    step("failed logins are limited");
    let guess = || {
        call(
            &router,
            host,
            "POST",
            "/login",
            None,
            Some(&[("user", "mallory"), ("password", "guess guess guess")]),
            Some(&origin),
        )
    };
    for _ in 0..conveyor_console::auth::LOGIN_FAILURES_ALLOWED {
        let answer = guess().await;
        assert_eq!(answer.status, StatusCode::UNAUTHORIZED);
        assert!(answer.body.contains("Wrong user or password"));
    }
    let answer = guess().await;
    assert_eq!(answer.status, StatusCode::TOO_MANY_REQUESTS);
    assert!(answer.headers.contains_key(header::RETRY_AFTER));

    step("the overview's counts are the ledger's");
    let alice = User::login(&router, host, OPERATOR).await;
    let overview = alice.get("/").await;
    let status = conveyor_ops::status::status(
        &setup.console.broker,
        &setup.console.database,
        &conveyor_ops::status::Request {
            pipelines: vec![pipeline.to_owned()],
            span: Default::default(),
            settle_wait: Duration::from_millis(500),
            workers: Vec::new(),
        },
    )
    .await
    .unwrap()
    .remove(0);
    let total = setup.scenario.expected_records().len() as u64;
    assert_eq!(status.fetched, total);
    assert_eq!(status.dead_lettered, setup.refused.len() as u64);
    for (name, expected) in [
        ("fetched", status.fetched),
        ("written", status.written),
        ("dead_lettered", status.dead_lettered),
        ("unaccounted", 0),
    ] {
        assert_eq!(shown_count(&overview.body, name), expected, "{name}");
    }

    step("the dead letters: one group, its list, one letter");
    let groups = alice.get(&format!("/letters?pipeline={pipeline}")).await;
    assert_eq!(groups.status, StatusCode::OK, "{}", groups.body);
    assert!(groups.body.contains("no_sevens"), "{}", groups.body);
    assert!(
        groups
            .body
            .contains(&format!("{} letter(s) in 1 group(s)", setup.refused.len())),
        "{}",
        groups.body
    );
    let list = alice
        .get(&format!("/letters/list?pipeline={pipeline}&stage=write"))
        .await;
    for id in &setup.refused {
        assert!(list.body.contains(id.as_str()), "{id} listed");
    }
    let dead = dead_in_index(&setup.console, pipeline).await;
    assert_eq!(dead.len(), setup.refused.len());
    let first = &dead[0];
    let letter = alice
        .get(&format!("/letters/{pipeline}/write/{}", first.message_id))
        .await;
    assert_eq!(letter.status, StatusCode::OK);
    assert!(letter.body.contains("no_sevens"), "the reason");
    assert!(letter.body.contains(&first.record_ids[0]), "the payload");
    assert!(
        letter.body.contains("x-conveyor-error-class"),
        "the headers"
    );

    step("a viewer sees everything and changes nothing");
    let victor = User::login(&router, host, VIEWER).await;
    let seen = victor.get(&format!("/letters?pipeline={pipeline}")).await;
    assert!(seen.body.contains("no_sevens") && !seen.body.contains("Replay "));
    let one = format!("write/{}", first.message_id);
    let refused = victor
        .post(
            "/actions/run",
            &[
                ("action", "replay"),
                ("pipeline", pipeline),
                ("letter", &one),
            ],
        )
        .await;
    assert_eq!(refused.status, StatusCode::FORBIDDEN, "{}", refused.body);
    assert!(refused.body.contains("change nothing"), "{}", refused.body);

    step("an action without the CSRF token, or from another origin, is refused");
    let no_token = call(
        &router,
        host,
        "POST",
        "/actions/run",
        Some(&alice.cookie),
        Some(&[
            ("action", "replay"),
            ("pipeline", pipeline),
            ("letter", &one),
        ]),
        Some(&origin),
    )
    .await;
    assert_eq!(no_token.status, StatusCode::FORBIDDEN);
    assert!(no_token.body.contains("CSRF"), "{}", no_token.body);
    let foreign = call(
        &router,
        host,
        "POST",
        "/actions/run",
        Some(&alice.cookie),
        Some(&[
            ("action", "replay"),
            ("pipeline", pipeline),
            ("letter", &one),
            ("csrf", &alice.csrf),
        ]),
        Some("http://evil.example"),
    )
    .await;
    assert_eq!(foreign.status, StatusCode::FORBIDDEN);
    assert_eq!(
        dead_in_index(&setup.console, pipeline).await.len(),
        setup.refused.len()
    );

    step("a dry run moves nothing; a purge needs its typed confirmation");
    let plan = alice
        .post(
            "/actions/plan",
            &[
                ("action", "replay"),
                ("pipeline", pipeline),
                ("letter", &one),
            ],
        )
        .await;
    assert!(
        plan.body.contains("Dry run") && plan.body.contains(".write</code>"),
        "{}",
        plan.body
    );
    let purge = alice
        .post(
            "/actions/run",
            &[
                ("action", "purge"),
                ("pipeline", pipeline),
                ("letter", &one),
            ],
        )
        .await;
    assert_eq!(purge.status, StatusCode::BAD_REQUEST);
    assert!(
        purge.body.contains("type &quot;purge 1&quot;"),
        "{}",
        purge.body
    );
    assert_eq!(
        setup
            .scenario
            .peek_dead_letters(conveyor_base::Stage::Write)
            .await
            .unwrap()
            .len(),
        setup.refused.len()
    );

    step("replayed before the fix, a letter dies again, and says so");
    let done = alice
        .run_job(&[
            ("action", "replay"),
            ("pipeline", pipeline),
            ("letter", &one),
        ])
        .await;
    assert!(done.contains("1 of 1"), "{done}");
    let again = loop {
        let dead = dead_in_index(&setup.console, pipeline).await;
        if let Some(again) = dead.iter().find(|letter| {
            letter.record_ids == first.record_ids && letter.message_id != first.message_id
        }) {
            break again.clone();
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let page = alice
        .get(&format!("/letters/{pipeline}/write/{}", again.message_id))
        .await;
    assert_eq!(
        again.replays, 1,
        "the letter of a replayed copy counts the replay"
    );
    assert!(
        page.body.contains("died again after a replay"),
        "{}",
        page.body
    );
    assert!(
        page.body.contains(&first.message_id),
        "its earlier letter is named"
    );

    step("a replay of a whole queue ends, though each replayed letter dies again as it runs");
    let replayed = ctl_ok(
        &setup.scenario,
        &["dlq", "replay", pipeline, "--stage", "write"],
    );
    let count = setup.refused.len();
    assert!(
        replayed.contains(&format!("replayed {count} message(s)")),
        "{replayed}"
    );
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        let dead = dead_in_index(&setup.console, pipeline).await;
        if dead.len() == count && dead.iter().all(|letter| letter.replays >= 1) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{dead:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    step("a job left running by a console that stopped is resumed by the next one");
    let dead = dead_in_index(&setup.console, pipeline).await;
    let job = conveyor_ops::letters::start_job(
        &setup.console.database,
        pipeline,
        conveyor_ledger::action::ActionKind::Replay,
        "alice (console)",
        &dead[..2],
    )
    .await
    .unwrap();
    let next_address = format!("127.0.0.1:{}", conveyor_harness::free_port().unwrap());
    let stop = tokio_util::sync::CancellationToken::new();
    let next_console = tokio::spawn(conveyor_console::run(
        cli(&setup.scenario, &next_address, Some(setup.users.clone())),
        stop.clone(),
    ));
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        let read = conveyor_ledger::jobs::get(&setup.console.database, job)
            .await
            .unwrap()
            .unwrap();
        if read.state == "done" {
            assert_eq!((read.moved, read.failed.len()), (2, 0), "{read:?}");
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{read:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    stop.cancel();
    next_console.await.unwrap().unwrap();
    while dead_in_index(&setup.console, pipeline).await.len() < count {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the replayed letters died again"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    step("after the fix, replaying everything needs its confirmation, then lands every record");
    setup.cause.fix().await;
    let everything = alice
        .post(
            "/actions/run",
            &[("action", "replay"), ("pipeline", pipeline)],
        )
        .await;
    assert_eq!(everything.status, StatusCode::BAD_REQUEST);
    let phrase = format!("replay {}", setup.refused.len());
    assert!(everything.body.contains(&phrase), "{}", everything.body);
    let done = alice
        .run_job(&[
            ("action", "replay"),
            ("pipeline", pipeline),
            ("confirm", &phrase),
        ])
        .await;
    assert!(
        done.contains(&format!("{0} of {0}", setup.refused.len())),
        "{done}"
    );
    assert!(done.contains("Nothing failed"), "{done}");
    assert_target_equals_truth(&setup.scenario, &setup.workers).await;
    wait_for_empty_work_queues(&setup.scenario).await;
    assert!(dead_in_index(&setup.console, pipeline).await.is_empty());
    assert!(
        setup
            .scenario
            .peek_dead_letters(conveyor_base::Stage::Write)
            .await
            .unwrap()
            .is_empty()
    );
    let jobs = alice.get("/jobs").await;
    assert!(jobs.body.contains("alice (console)"), "{}", jobs.body);

    step("a record's lineage");
    let lineage = alice
        .get(&format!(
            "/lineage?pipeline={pipeline}&record_id={}",
            first.record_ids[0]
        ))
        .await;
    assert!(
        lineage.body.contains("replay") && lineage.body.contains("dead-lettered"),
        "{}",
        lineage.body
    );
    let at_target = lineage
        .body
        .split("At the target")
        .nth(1)
        .unwrap_or_default();
    assert!(
        at_target.contains(&first.record_ids[0]) && !at_target.contains("target-absent"),
        "the target's row: {at_target}"
    );

    step("the rule preview runs the pipeline's rules only, and names each error");
    let sample = r#"[
        {"id": "A-1", "bill_no": "B-1", "total_amount": "12.50", "modify_time": "2026-01-02 03:04:05"},
        {"id": "A-2", "bill_no": "B-2", "total_amount": "1 + 1", "modify_time": "2026-01-02 03:04:05"}
    ]"#;
    let preview = alice
        .post("/preview", &[("pipeline", pipeline), ("sample", sample)])
        .await;
    assert_eq!(preview.status, StatusCode::OK);
    assert!(
        preview.body.contains("1 record(s), 1 error(s)"),
        "{}",
        preview.body
    );
    let error = preview
        .body
        .split("mapping-error")
        .nth(1)
        .unwrap_or_default();
    assert!(
        error.contains("Row 2") && error.contains("total_amount"),
        "{error}"
    );
    assert!(preview.body.contains("12.50"), "the good row's fields");

    let mut setup = setup;
    stop_all(&mut setup.workers).await;
    setup.scenario.clean_up(false).await.unwrap();
}

/// Waits for the job page the browser shows to say the job is done. The page reloads itself while
/// the job runs: an element found just before a reload is gone when read, and is read again.
async fn wait_for_job_in(browser: &Browser) {
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        let state = browser.text("dd.state").await;
        if state.as_ref().is_ok_and(|state| state == "done") {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the job did not finish: {state:?}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// A folder kept as test artefacts (not committed): target/console-screenshots/.
fn screenshots() -> PathBuf {
    repo_root().join("target/console-screenshots")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_replays_a_poison_record_in_a_real_browser() {
    within(TEST_LIMIT, in_a_browser()).await;
}

async fn in_a_browser() {
    let mut setup = setup("browser").await;
    let listener = tokio::net::TcpListener::bind(&setup.address).await.unwrap();
    let app = conveyor_console::router(setup.console.clone())
        .into_make_service_with_connect_info::<std::net::SocketAddr>();
    let server = tokio::spawn(async move { axum::serve(listener, app).await });
    let base = format!("http://{}", setup.address);
    let browser = Browser::start().await.unwrap();
    let pipeline = "sales_orders";

    step("log in");
    browser.goto(&format!("{base}/")).await.unwrap();
    browser
        .type_into("input[name=user]", OPERATOR.0)
        .await
        .unwrap();
    browser
        .type_into("input[name=password]", OPERATOR.1)
        .await
        .unwrap();
    browser.click("button[type=submit]").await.unwrap();
    let fetched = browser.text("[data-count=fetched]").await.unwrap();
    assert_eq!(fetched, setup.scenario.expected_records().len().to_string());
    let dead = browser.text("[data-count=dead_lettered]").await.unwrap();
    assert_eq!(dead, setup.refused.len().to_string());
    browser
        .screenshot(&screenshots().join("overview.png"))
        .await
        .unwrap();

    step("open a dead letter of a poison record");
    browser.click("[data-count=dead_lettered] a").await.unwrap();
    browser.click("td.reason a").await.unwrap();
    assert!(browser.source().await.unwrap().contains("no_sevens"));
    browser
        .screenshot(&screenshots().join("dead-letters.png"))
        .await
        .unwrap();
    browser
        .click("table.letters tbody tr td:nth-child(2) a")
        .await
        .unwrap();
    let reason = browser.text("p.reason").await.unwrap();
    assert!(reason.contains("no_sevens"), "{reason}");
    browser
        .screenshot(&screenshots().join("letter.png"))
        .await
        .unwrap();
    let letter_url = browser.current_url().await.unwrap();

    step("an action without the CSRF token is refused, even with the session's cookie");
    let cookie = browser
        .cookie(conveyor_console::auth::COOKIE)
        .await
        .unwrap();
    let refused = http()
        .post(format!("{base}/actions/run"))
        .header(
            header::COOKIE,
            format!("{}={cookie}", conveyor_console::auth::COOKIE),
        )
        .header(header::ORIGIN, &base)
        .form(&[
            ("action", "purge"),
            ("pipeline", pipeline),
            ("confirm", "purge 1"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), StatusCode::FORBIDDEN);

    step("fix the cause, replay the letter from its page");
    setup.cause.fix().await;
    browser
        .click("button[name=action][value=replay]")
        .await
        .unwrap();
    assert!(browser.text("p.dry").await.unwrap().contains("Dry run"));
    browser
        .click("form[action='/actions/run'] button[type=submit]")
        .await
        .unwrap();
    wait_for_job_in(&browser).await;
    assert_eq!(browser.text("dd.moved").await.unwrap(), "1 of 1");

    step("replay the rest from the list, then the target equals the truth");
    browser
        .goto(&format!("{base}/letters/list?pipeline={pipeline}"))
        .await
        .unwrap();
    browser
        .click("form.inline button[name=action][value=replay]")
        .await
        .unwrap();
    let phrase = browser.text("code.phrase").await.unwrap();
    browser
        .type_into("input[name=confirm]", &phrase)
        .await
        .unwrap();
    browser
        .click("form[action='/actions/run'] button[type=submit]")
        .await
        .unwrap();
    wait_for_job_in(&browser).await;
    assert_target_equals_truth(&setup.scenario, &setup.workers).await;

    step("a read-only user sees no way to replay");
    browser.click("button.link").await.unwrap();
    browser
        .type_into("input[name=user]", VIEWER.0)
        .await
        .unwrap();
    browser
        .type_into("input[name=password]", VIEWER.1)
        .await
        .unwrap();
    browser.click("button[type=submit]").await.unwrap();
    browser.text("[data-count=fetched]").await.unwrap();
    browser.goto(&letter_url).await.unwrap();
    browser.text("p.reason").await.unwrap();
    assert_eq!(browser.count("button[name=action]").await.unwrap(), 0);

    browser.close().await;
    server.abort();
    stop_all(&mut setup.workers).await;
    setup.scenario.clean_up(false).await.unwrap();
    eprintln!("screenshots: {}", screenshots().display());
}

#[test]
fn the_console_refuses_to_serve_other_hosts_without_a_login() {
    let output = std::process::Command::new(bin_dir().join("conveyor-console"))
        .args([
            "--pipeline",
            sales_orders_pipeline().to_str().unwrap(),
            "--listen",
            "0.0.0.0:9480",
        ])
        .env_remove("CONVEYOR_CONSOLE_USERS_FILE")
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("CONVEYOR_CONSOLE_ADDR") && stderr.contains("CONVEYOR_CONSOLE_USERS_FILE"),
        "{stderr}"
    );
}
