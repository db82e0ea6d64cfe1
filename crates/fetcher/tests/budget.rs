//! The shared call budget against the real PostgreSQL on 127.0.0.1:5432 (user postgres, database test)
//! and the simulator, which records when each call arrives: two budgets for one account set, each on
//! its own connection pool as two fetcher processes would be, pace their calls together — and the same
//! calls without the budget break the very checks the paced ones pass.

use std::sync::Arc;
use std::time::{Duration, Instant};

use conveyor_base::Secret;
use conveyor_base::metrics::Metrics;
use conveyor_base::source::{Page, RateBudget, Unlimited};
use conveyor_fetcher::budget::SharedBudget;
use conveyor_fetcher::state::SyncStore;
use conveyor_kingdee::{Credentials, Gateway, ListData};
use conveyor_postgres::{Database, PostgresArgs};
use kingdee_sim::gate::demo_credentials;
use kingdee_sim::{SimConfig, Simulator};

/// A list answer read as a page and checked against its counts, as the sync engine does.
fn checked(data: ListData, number: u64, size: u64) -> Result<Page, String> {
    let page = data.into_page()?;
    page.check(number, size)?;
    Ok(page)
}

/// Calls per minute: one call every 102 ms, so the ~50 calls below take about five seconds.
const BUDGET: u32 = 600;
const GATEWAYS: usize = 2;
const TASKS_PER_GATEWAY: usize = 4;
const PAGES_PER_TASK: usize = 6;

/// Spans the pacing is checked over (the run lasts about five seconds).
fn windows() -> [Duration; 3] {
    [
        Duration::from_millis(500),
        Duration::from_secs(1),
        Duration::from_secs(2),
    ]
}

fn postgres_args(schema: &str) -> PostgresArgs {
    PostgresArgs {
        pg_pool_size: 4,
        ..PostgresArgs::at(
            Secret::new("postgres://postgres@127.0.0.1:5432/test"),
            schema.to_owned(),
        )
    }
}

async fn simulator() -> (Arc<Simulator>, Credentials) {
    let sim = Simulator::new(SimConfig {
        orders: 30,
        ..SimConfig::default()
    });
    let addr = kingdee_sim::spawn(sim.clone(), ([127, 0, 0, 1], 0).into())
        .await
        .unwrap();
    let credentials = demo_credentials(addr);
    (sim, credentials)
}

/// A new schema with the sync state's tables, and a connection pool into it for each of `GATEWAYS`
/// processes.
async fn fresh_state(prefix: &str) -> (String, Vec<Database>) {
    let schema = format!("{prefix}_{}", std::process::id());
    let databases: Vec<Database> = (0..GATEWAYS)
        .map(|_| Database::connect(&postgres_args(&schema)).unwrap())
        .collect();
    drop_schema(&databases[0], &schema).await;
    SyncStore::open(databases[0].clone(), "orders")
        .await
        .unwrap();
    (schema, databases)
}

async fn drop_schema(database: &Database, schema: &str) {
    let client = database
        .client()
        .await
        .expect("PostgreSQL must run on 127.0.0.1:5432 (ops/services.sh starts it)");
    client
        .batch_execute(&format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"))
        .await
        .unwrap();
}

/// Every task of every gateway pages at once, as the fetch tasks of several processes do.
async fn call_from_all<B: RateBudget>(gateways: Vec<Gateway<B>>) {
    let mut tasks = tokio::task::JoinSet::new();
    for gateway in gateways.into_iter().map(Arc::new) {
        for _ in 0..TASKS_PER_GATEWAY {
            let gateway = gateway.clone();
            tasks.spawn(async move {
                for _ in 0..PAGES_PER_TASK {
                    let query = [
                        ("page".to_owned(), "1".to_owned()),
                        ("page_size".to_owned(), "10".to_owned()),
                    ];
                    let data = gateway
                        .get::<ListData>("/jdy/v2/scm/sal_order", &query)
                        .await
                        .unwrap();
                    assert_eq!(checked(data, 1, 10).unwrap().count, 30);
                }
            });
        }
    }
    while let Some(task) = tasks.join_next().await {
        task.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_budgets_of_one_account_set_pace_their_calls_together() {
    let (schema, databases) = fresh_state("fetcher_budget").await;

    let (sim, credentials) = simulator().await;
    let gateways = databases
        .iter()
        .map(|database| {
            let budget = SharedBudget::new(database.clone(), "tenant/account".into(), BUDGET);
            Gateway::new(credentials.clone(), budget, Metrics::new(), "test")
        })
        .collect();
    let started = Instant::now();
    call_from_all(gateways).await;
    let elapsed = started.elapsed();
    let arrivals = sim.call_arrivals();
    let stats = sim.stats();
    // Each gateway authorized and fetched its token (2 calls), then paged.
    let expected_calls = GATEWAYS * (2 + TASKS_PER_GATEWAY * PAGES_PER_TASK);
    assert_eq!(arrivals.len(), expected_calls, "{stats:?}");
    assert_eq!(stats.tokens_issued, GATEWAYS as u64, "{stats:?}");
    let breaches = kingdee_sim::gate::budget_breaches(&arrivals, BUDGET, &windows());
    assert!(
        breaches.is_empty(),
        "the shared budget was broken: {breaches:?}; arrivals {arrivals:?}"
    );
    assert!(
        elapsed >= Duration::from_secs_f64((expected_calls - 1) as f64 * 60.0 / f64::from(BUDGET)),
        "{elapsed:?}"
    );

    // The control: the same calls with no budget break both checks, so passing them above is the
    // budget's doing.
    let (unpaced, credentials) = simulator().await;
    let gateways = (0..GATEWAYS)
        .map(|_| Gateway::new(credentials.clone(), Unlimited, Metrics::new(), "test"))
        .collect();
    call_from_all(gateways).await;
    let breaches = kingdee_sim::gate::budget_breaches(&unpaced.call_arrivals(), BUDGET, &windows());
    assert_eq!(breaches.len(), 4, "{breaches:?}");

    drop_schema(&databases[0], &schema).await;
}

/// One process's call is throttled: every process's next call waits as long as the source said, and
/// both now pace calls at the cut rate (each sees it at its next reservation), which the gauge shows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_throttled_call_holds_every_process_back_and_cuts_the_shared_rate() {
    let (schema, databases) = fresh_state("fetcher_budget_cut").await;
    let metrics = Metrics::new();
    let gauges =
        ["first", "second"].map(|name| metrics.source_call_rate.with_label_values(&[name]));
    let [first, second] = [0, 1].map(|index| {
        SharedBudget::new(databases[index].clone(), "tenant/account".into(), BUDGET)
            .with_rate_gauge(gauges[index].clone())
    });
    first.acquire().await.unwrap();
    assert_eq!(gauges[1].get(), f64::from(BUDGET));

    assert!(first.throttled(Some(Duration::from_secs(1))).await);
    assert_eq!(gauges[0].get(), 540.0, "cut by a tenth");
    let waited = second.acquire().await.unwrap();
    assert!(
        waited >= Duration::from_millis(900) && waited <= Duration::from_millis(1500),
        "{waited:?}"
    );
    assert!((gauges[1].get() - 540.0).abs() < 0.5, "{}", gauges[1].get());
    // A refusal a second later is a new overshoot: cut again. Without Retry-After, every caller
    // pauses for two spacings at the new rate.
    assert!(second.throttled(None).await);
    let waited = first.acquire().await.unwrap();
    assert!(waited >= Duration::from_millis(200), "{waited:?}");
    let rate = gauges[0].get();
    assert!((480.0..500.0).contains(&rate), "{rate}");

    drop_schema(&databases[0], &schema).await;
}
