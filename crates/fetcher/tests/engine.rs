//! The generic sync engine against two sources: Kingdee (its gateway client against the simulator) and
//! a JSON list read from a fixture file, which knows nothing of Kingdee. Every test that can runs
//! against both, so that the engine's seam is proved not to be Kingdee-shaped.
//!
//! Each run has its own pipeline, queue namespace and schema on the real RabbitMQ and PostgreSQL; the
//! engine runs in-process, through the same host as the fetcher binary, and the test reads what it
//! published off the transform queue.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use chrono::{DateTime, FixedOffset, NaiveDateTime, SubsecRound as _, TimeZone as _, Utc};
use conveyor_amqp::Topology;
use conveyor_amqp::dead_letters::{DeadLetter, Held};
use conveyor_amqp::envelope::Envelope;
use conveyor_amqp::settings::BrokerArgs;
use conveyor_base::metrics::Metrics;
use conveyor_base::source::{Page, Source, Unlimited, Window};
use conveyor_base::telemetry::LogFormat;
use conveyor_base::{ErrorClass, Failure, Stage, source_time};
use conveyor_fetcher::serve::{self, RunOptions, SyncSummary};
use conveyor_fetcher::settings::SyncSettings;
use conveyor_fetcher::state::SyncStore;
use conveyor_harness::Services;
use conveyor_kingdee::{Gateway, KingdeeSource};
use conveyor_ledger::LedgerArgs;
use conveyor_postgres::{Database, PostgresArgs};
use conveyor_runtime::host::Host;
use conveyor_runtime::settings::WorkerArgs;
use kingdee_sim::gate::demo_credentials;
use kingdee_sim::{Object, PagingChange, PagingChangeKind, SimConfig, Simulator};
use serde_json::Value;
use serde_json::value::RawValue;
use tokio_util::sync::CancellationToken;

const PAGE_SIZE: u64 = 10;

/// A source under test: what it holds now, and a way to move one of its rows while a window is
/// paged (the first row of the page just served goes to the end of the window, as a row modified
/// again would on a list ordered by modify time).
trait SourceUnderTest: Source {
    /// Every row's id and modify time, as the source holds them now.
    fn truth(&self) -> BTreeMap<String, DateTime<FixedOffset>>;
    /// Moves a row, once, right after a query serves page `after_page` of a window of more pages.
    fn move_a_row_after_page(&self, after_page: u64);
    /// The sync's settings: from where the source's rows begin, in windows of `window`.
    fn settings(&self, window: Duration) -> SyncSettings;
}

// ---------------------------------------------------------------------------------------------
// The second source: a JSON list from a fixture file.

/// Rows of a JSON array, listed by modify time (`modify_time`, in any of the formats rows may use)
/// within a window, `PAGE_SIZE` a page, with the window's count on every page.
struct FixtureSource {
    rows: Mutex<Vec<FixtureRow>>,
    /// Refuse every call, as a source does with a wrong secret.
    refusing: AtomicBool,
    /// Calls still to be answered "call again later", as a source past the gateway's patience is.
    throttled_calls: AtomicU32,
    /// Pages after which a row moves, one per query that reaches them.
    moves: Mutex<VecDeque<u64>>,
}

struct FixtureRow {
    modify_time: DateTime<Utc>,
    json: Value,
}

impl FixtureSource {
    fn from_file(file: &str) -> Self {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(file);
        let text = std::fs::read_to_string(&path).expect("the fixture is readable");
        let list: Vec<Value> = serde_json::from_str(&text).expect("the fixture is a JSON list");
        let rows = list
            .into_iter()
            .map(|json| FixtureRow {
                modify_time: source_time::parse_instant(&json["modify_time"])
                    .expect("every fixture row has a modify time")
                    .with_timezone(&Utc),
                json,
            })
            .collect();
        Self {
            rows: Mutex::new(rows),
            refusing: AtomicBool::new(false),
            throttled_calls: AtomicU32::new(0),
            moves: Mutex::new(VecDeque::new()),
        }
    }

    fn earliest(&self) -> DateTime<Utc> {
        let rows = self.rows.lock().unwrap();
        rows.iter().map(|row| row.modify_time).min().unwrap()
    }
}

impl Source for FixtureSource {
    fn page_size(&self) -> u64 {
        PAGE_SIZE
    }

    async fn check(&self) -> Result<(), Failure> {
        Ok(())
    }

    async fn page(&self, window: &Window, number: u64) -> Result<Page, Failure> {
        if self.refusing.load(Ordering::Relaxed) {
            return Err(Failure::new(
                ErrorClass::Permanent,
                "the source refused the call: wrong secret",
            ));
        }
        let throttling =
            self.throttled_calls
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |left| {
                    left.checked_sub(1)
                });
        if throttling.is_ok() {
            return Err(Failure::new(
                ErrorClass::Throttled,
                "throttled by the source for 600 s",
            ));
        }
        let mut rows = self.rows.lock().unwrap();
        let mut within: Vec<usize> = (0..rows.len())
            .filter(|&at| (window.start..=window.end).contains(&rows[at].modify_time))
            .collect();
        // By modify time; rows of the same time keep their order in the file.
        within.sort_by_key(|&at| rows[at].modify_time);
        let count = within.len() as u64;
        let total_pages = count.div_ceil(PAGE_SIZE);
        let skip = usize::try_from((number - 1) * PAGE_SIZE).unwrap();
        let served: Vec<usize> = within
            .iter()
            .skip(skip)
            .take(PAGE_SIZE as usize)
            .copied()
            .collect();
        let page = Page {
            rows: served
                .iter()
                .map(|&at| RawValue::from_string(rows[at].json.to_string()).unwrap())
                .collect(),
            count,
            total_pages,
        };
        let mut moves = self.moves.lock().unwrap();
        if moves.front() == Some(&number) && number < total_pages {
            moves.pop_front();
            let moved = &mut rows[served[0]];
            // Whole seconds, as the rows write their times.
            moved.modify_time = (window.end - chrono::Duration::seconds(1)).trunc_subsecs(0);
            moved.json["modify_time"] = Value::String(
                moved
                    .modify_time
                    .with_timezone(&source_time::china_standard_time())
                    .format("%Y-%m-%d %H:%M:%S")
                    .to_string(),
            );
        }
        Ok(page)
    }
}

impl SourceUnderTest for FixtureSource {
    fn truth(&self) -> BTreeMap<String, DateTime<FixedOffset>> {
        let rows = self.rows.lock().unwrap();
        rows.iter()
            .filter_map(|row| {
                Some((
                    row.json["id"].as_str()?.to_owned(),
                    row.modify_time.fixed_offset(),
                ))
            })
            .collect()
    }

    fn move_a_row_after_page(&self, after_page: u64) {
        self.moves.lock().unwrap().push_back(after_page);
    }

    fn settings(&self, window: Duration) -> SyncSettings {
        settings(self.earliest(), window)
    }
}

// ---------------------------------------------------------------------------------------------
// Kingdee: the real gateway client against the simulator.

struct KingdeeUnderTest {
    source: KingdeeSource<Unlimited>,
    simulator: Arc<Simulator>,
}

impl KingdeeUnderTest {
    /// A simulator of `orders` sales orders created over the last days.
    async fn start(orders: usize) -> Self {
        let epoch = (Utc::now() - chrono::Duration::days(4))
            .with_timezone(&source_time::china_standard_time())
            .naive_local();
        let simulator = Simulator::new(SimConfig {
            orders,
            epoch,
            ..SimConfig::default()
        });
        let addr = kingdee_sim::spawn(simulator.clone(), ([127, 0, 0, 1], 0).into())
            .await
            .expect("the simulator starts");
        let credentials = demo_credentials(addr);
        let gateway = Gateway::new(credentials, Unlimited, Metrics::new(), "engine-test");
        let source = KingdeeSource::new(
            gateway,
            "/jdy/v2/scm/sal_order",
            &BTreeMap::new(),
            u32::try_from(PAGE_SIZE).unwrap(),
        );
        Self { source, simulator }
    }
}

impl Source for KingdeeUnderTest {
    fn page_size(&self) -> u64 {
        self.source.page_size()
    }

    async fn check(&self) -> Result<(), Failure> {
        self.source.check().await
    }

    async fn page(&self, window: &Window, number: u64) -> Result<Page, Failure> {
        self.source.page(window, number).await
    }
}

impl SourceUnderTest for KingdeeUnderTest {
    fn truth(&self) -> BTreeMap<String, DateTime<FixedOffset>> {
        self.simulator
            .truth(Object::SalesOrder)
            .into_iter()
            .map(|record| {
                let time = NaiveDateTime::parse_from_str(&record.modify_time, "%Y-%m-%d %H:%M:%S")
                    .expect("the simulator writes its times so");
                let time = source_time::china_standard_time()
                    .from_local_datetime(&time)
                    .unwrap();
                (record.id, time)
            })
            .collect()
    }

    fn move_a_row_after_page(&self, after_page: u64) {
        self.simulator.arm_paging_change(PagingChange {
            after_page: usize::try_from(after_page).unwrap(),
            kind: PagingChangeKind::MoveToEnd,
        });
    }

    fn settings(&self, window: Duration) -> SyncSettings {
        let epoch = source_time::china_standard_time()
            .from_local_datetime(&self.simulator.config().epoch)
            .unwrap();
        // Orders are modified up to 30 days before the timeline starts.
        settings(
            epoch.with_timezone(&Utc) - chrono::Duration::days(31),
            window,
        )
    }
}

// ---------------------------------------------------------------------------------------------
// Running the engine.

fn settings(from: DateTime<Utc>, window: Duration) -> SyncSettings {
    SyncSettings {
        start_time: from.fixed_offset(),
        window,
        lag: Duration::ZERO,
        overlap: Duration::ZERO,
        max_window_rows: 10_000,
        records_per_message: 25,
        id_field: "id".into(),
        modify_time_field: "modify_time".into(),
    }
}

/// What one `--once` sync did, as the test sees it.
struct Run {
    summary: SyncSummary,
    /// Every record published to the transform stage, by id: the newest modify time published.
    published: BTreeMap<String, DateTime<FixedOffset>>,
    dead_letters: Vec<DeadLetter>,
}

impl Run {
    /// Checks that every row the source holds now was published in its current version.
    fn assert_complete(&self, truth: &BTreeMap<String, DateTime<FixedOffset>>) {
        let missing: Vec<&String> = truth
            .keys()
            .filter(|id| !self.published.contains_key(*id))
            .collect();
        assert!(
            missing.is_empty(),
            "rows never published (漏单): {missing:?}"
        );
        let stale: Vec<&String> = truth
            .iter()
            .filter(|(id, time)| self.published[*id] != **time)
            .map(|(id, _)| id)
            .collect();
        assert!(
            stale.is_empty(),
            "rows published only in an older version: {stale:?}"
        );
        let unexpected: Vec<&String> = self
            .published
            .keys()
            .filter(|id| !truth.contains_key(*id))
            .collect();
        assert!(
            unexpected.is_empty(),
            "rows the source never had: {unexpected:?}"
        );
        let watermark = self
            .summary
            .watermark
            .as_deref()
            .expect("the watermark moved");
        assert!(DateTime::parse_from_rfc3339(watermark).unwrap() >= *truth.values().max().unwrap());
    }
}

/// A pipeline of its own (name, queue namespace, schema) for the engine to sync, once or more.
struct EnginePipeline {
    services: Services,
    name: String,
    broker: BrokerArgs,
    args: WorkerArgs,
    database: Database,
}

impl EnginePipeline {
    async fn new(name: &str) -> Self {
        let services = Services::check()
            .await
            .expect("RabbitMQ and PostgreSQL for the engine tests");
        let unique = uuid::Uuid::new_v4().simple().to_string()[..10].to_owned();
        let pipeline = format!("engine-{name}-{unique}").replace('_', "-");
        let dir = std::env::temp_dir()
            .join("conveyor-engine-tests")
            .join(&unique);
        std::fs::create_dir_all(&dir).unwrap();
        // The host needs a pipeline file for the pipeline's name and queues; the engine gets its
        // source and settings from the test, not from the file's [source].
        let file = dir.join("pipeline.toml");
        std::fs::write(
            &file,
            format!(
                "name = \"{pipeline}\"\n\
                 [source]\nkind = \"kingdee\"\npath = \"/unused\"\nstart_time = \"2026-01-01T00:00:00+08:00\"\n\
                 [transform]\nkey = \"id\"\nversion = \"modify_time\"\nfields = [{{ to = \"id\", type = \"string\" }}, {{ to = \"modify_time\", type = \"datetime\" }}]\n\
                 [target]\nkind = \"noop\"\n"
            ),
        )
        .unwrap();
        let broker = services
            .broker_args(&format!("engine_{unique}"))
            .with_retry_delays_ms(vec![200]);
        let postgres = PostgresArgs {
            pg_pool_size: 4,
            ..PostgresArgs::at(services.pg_url.clone(), format!("engine_{unique}"))
        };
        let database = Database::connect(&postgres).unwrap();
        let args = WorkerArgs {
            pipelines: vec![file],
            broker: broker.clone(),
            postgres,
            ledger: LedgerArgs {
                enabled: true,
                ledger_retention_days: 30,
            },
            http_addr: Some(([127, 0, 0, 1], 0).into()),
            log_format: LogFormat::Text,
            log_filter: "info".into(),
            drain_timeout_secs: 5,
            max_attempts: 3,
            prefetch: 32,
            compress_from_bytes: Default::default(),
        };
        Self {
            services,
            name: pipeline,
            broker,
            args,
            database,
        }
    }

    /// Runs the engine once (`--once`) over `source`, in-process, through the same host as the
    /// fetcher binary; gives up after 60 s.
    async fn sync_once<S: Source>(
        &self,
        source: Arc<S>,
        settings: SyncSettings,
    ) -> anyhow::Result<SyncSummary> {
        let store = SyncStore::open(self.database.clone(), &self.name).await?;
        let options = RunOptions {
            once: true,
            interval: Duration::from_secs(1),
            concurrency: 2,
            republish_after: Duration::from_secs(900),
        };
        let shutdown = CancellationToken::new();
        let host = Host::start(&self.args, Stage::Fetch, 0, &[], &shutdown)
            .await?
            .expect("not shut down");
        let mut source = Some(source);
        let synced =
            tokio::time::timeout(
                Duration::from_secs(60),
                host.run_each(&shutdown, |runtime, stopping| {
                    let (source, settings, store, options) = (
                        source.take().expect("one pipeline"),
                        settings.clone(),
                        store.clone(),
                        options.clone(),
                    );
                    async move {
                        serve::sync(&runtime, source, settings, store, &options, &stopping).await
                    }
                }),
            )
            .await;
        shutdown.cancel();
        let mut summaries = synced.context("the sync did not finish within 60 s")??;
        Ok(summaries.pop().expect("one pipeline"))
    }

    /// Takes every message off the transform queue, and reads the fetch stage's dead letters.
    async fn read(&self) -> anyhow::Result<Published> {
        read_queues(&self.services, &self.broker, &self.name).await
    }

    async fn clean_up(&self) {
        clean_up(&self.services, &self.broker, &self.name, &self.database).await;
    }
}

/// Runs the engine once over `source` with `settings` in a pipeline of its own, and reads what it
/// published.
async fn sync_once<S: Source>(name: &str, source: Arc<S>, settings: SyncSettings) -> Run {
    let pipeline = EnginePipeline::new(name).await;
    let synced = pipeline.sync_once(source, settings).await;
    let read = pipeline.read().await;
    pipeline.clean_up().await;
    let summary = synced.expect("the sync succeeded");
    let (published, dead_letters) = read.expect("the queues are readable");
    Run {
        summary,
        published,
        dead_letters,
    }
}

type Published = (BTreeMap<String, DateTime<FixedOffset>>, Vec<DeadLetter>);

/// Takes every message off the transform queue, and reads the fetch stage's dead letters.
async fn read_queues(
    services: &Services,
    broker: &BrokerArgs,
    pipeline: &str,
) -> anyhow::Result<Published> {
    let topology = Topology::new(broker, pipeline);
    let connection = conveyor_amqp::connect(&services.broker()?, "engine-test").await?;
    let channel = connection.create_channel().await?;
    let mut published = BTreeMap::new();
    let queue = topology.queue(Stage::Transform);
    while let Some(message) = channel
        .basic_get(queue.as_str().into(), Default::default())
        .await
        .with_context(|| format!("reading {queue}"))?
    {
        let delivery = message.delivery;
        let envelope = Envelope::from_amqp(pipeline, &delivery.data, &delivery.properties)?;
        for record in envelope.records {
            let newest = published.entry(record.id).or_insert(record.modify_time);
            *newest = (*newest).max(record.modify_time);
        }
        delivery.acker.ack(Default::default()).await?;
    }
    let held = Held::take(
        &connection,
        &topology.dead_letter_queue(Stage::Fetch),
        usize::MAX,
    )
    .await?;
    let letters = held.letters.clone();
    held.release().await;
    conveyor_amqp::close(&connection).await;
    Ok((published, letters))
}

/// Deletes the pipeline's queues and schema; a failure is told, not hidden, but fails no test.
async fn clean_up(services: &Services, broker: &BrokerArgs, pipeline: &str, database: &Database) {
    let topology = Topology::new(broker, pipeline);
    if let Err(err) = services.delete_topology(&[topology]).await {
        eprintln!("pipeline {pipeline}: its queues were not deleted: {err:#}");
    }
    let dropped = async {
        let client = database.client().await?;
        let drop = format!("DROP SCHEMA IF EXISTS \"{}\" CASCADE", database.schema);
        client
            .batch_execute(&drop)
            .await
            .map_err(anyhow::Error::from)
    };
    if let Err(err) = dropped.await {
        eprintln!("schema {}: not dropped: {err:#}", database.schema);
    }
}

// ---------------------------------------------------------------------------------------------
// The tests, each against both sources.

/// Every row arrives in its current version, and the watermark passes them all; a row without an id
/// is dead-lettered with the reason.
async fn every_row_arrives(name: &str, source: impl SourceUnderTest) -> Run {
    let source = Arc::new(source);
    let run = sync_once(
        name,
        source.clone(),
        source.settings(Duration::from_secs(3 * 86_400)),
    )
    .await;
    let truth = source.truth();
    run.assert_complete(&truth);
    assert_eq!(
        run.summary.records as usize,
        truth.len(),
        "each row published once"
    );
    assert!(
        run.summary.windows >= 2,
        "several windows: {:?}",
        run.summary
    );
    assert_eq!(run.dead_letters.len() as u64, run.summary.dead_lettered);
    for letter in &run.dead_letters {
        assert_eq!(letter.class, "permanent");
        assert!(
            letter.error.contains("no usable id field \"id\""),
            "{}",
            letter.error
        );
    }
    run
}

/// A row that moves while its window is paged shifts the rows after it one place up, so that the first
/// row of the next page slides onto the page already served: naive paging skips it. The engine pages
/// the window again and misses nothing.
async fn a_row_moving_while_paged_is_not_missed(name: &str, source: impl SourceUnderTest) {
    let source = Arc::new(source);
    // One window holds every row, so that the move happens in it.
    let settings = source.settings(Duration::from_secs(400 * 86_400));
    let pages_of_one_pass = (source.truth().len() as u64).div_ceil(PAGE_SIZE);
    source.move_a_row_after_page(2);
    let run = sync_once(name, source.clone(), settings).await;
    run.assert_complete(&source.truth());
    assert!(
        run.summary.pages > pages_of_one_pass,
        "the window was paged again: {:?}",
        run.summary
    );
}

/// A window holding more rows than `max_window_rows` is split in halves until none does, and still
/// nothing is missed.
async fn a_crowded_window_is_split(name: &str, source: impl SourceUnderTest) {
    let source = Arc::new(source);
    let settings = SyncSettings {
        max_window_rows: 40,
        ..source.settings(Duration::from_secs(400 * 86_400))
    };
    let run = sync_once(name, source.clone(), settings).await;
    let truth = source.truth();
    run.assert_complete(&truth);
    assert!(
        run.summary.windows as usize >= truth.len().div_ceil(40),
        "split into windows of at most 40 rows: {:?}",
        run.summary
    );
}

fn fixture() -> FixtureSource {
    FixtureSource::from_file("tests/fixtures/orders.json")
}

#[tokio::test]
async fn fixture_every_row_arrives() {
    let run = every_row_arrives("fixture-all", fixture()).await;
    assert_eq!(run.dead_letters.len(), 1, "the fixture's row without an id");
}

#[tokio::test]
async fn kingdee_every_row_arrives() {
    let run = every_row_arrives("kingdee-all", KingdeeUnderTest::start(120).await).await;
    assert!(run.dead_letters.is_empty());
}

#[tokio::test]
async fn fixture_a_row_moving_while_paged_is_not_missed() {
    a_row_moving_while_paged_is_not_missed("fixture-move", fixture()).await;
}

#[tokio::test]
async fn kingdee_a_row_moving_while_paged_is_not_missed() {
    a_row_moving_while_paged_is_not_missed("kingdee-move", KingdeeUnderTest::start(120).await)
        .await;
}

#[tokio::test]
async fn fixture_a_crowded_window_is_split() {
    a_crowded_window_is_split("fixture-split", fixture()).await;
}

#[tokio::test]
async fn kingdee_a_crowded_window_is_split() {
    a_crowded_window_is_split("kingdee-split", KingdeeUnderTest::start(120).await).await;
}

/// A `--once` sync after one that dead-lettered windows (a wrong secret, since fixed) does not wait
/// for them, which only an operator's replay can release: it says so, with the command, and fails.
#[tokio::test]
async fn a_once_sync_does_not_wait_for_windows_only_a_replay_can_release() {
    let source = Arc::new(fixture());
    let settings = source.settings(Duration::from_secs(3 * 86_400));
    let pipeline = EnginePipeline::new("fixture-refused").await;
    source.refusing.store(true, Ordering::Relaxed);
    let first = pipeline.sync_once(source.clone(), settings.clone()).await;
    source.refusing.store(false, Ordering::Relaxed);
    let second_started = std::time::Instant::now();
    let second = pipeline.sync_once(source.clone(), settings).await;
    let waited = second_started.elapsed();
    let read = pipeline.read().await;
    pipeline.clean_up().await;

    let first = format!("{:#}", first.unwrap_err());
    assert!(first.contains("a window was dead-lettered"), "{first}");
    let second = format!("{:#}", second.unwrap_err());
    assert!(
        second.contains("in the fetch dead-letter queue")
            && second.contains("wrong secret")
            && second.contains(&format!(
                "conveyorctl dlq replay {} --stage fetch",
                pipeline.name
            )),
        "{second}"
    );
    assert!(
        waited < Duration::from_secs(20),
        "it did not wait: {waited:?}"
    );
    let (_, dead_letters) = read.unwrap();
    assert!(!dead_letters.is_empty());
}

/// A window whose source keeps asking to wait (throttled past what one call waits) is put back with a
/// delay each time, its attempts not counted: five deferrals, against `max_attempts` of 3, dead-letter
/// no window, and the sync ends whole once the source answers.
#[tokio::test]
async fn a_window_its_source_throttles_is_put_back_without_counting_an_attempt() {
    const DEFERRALS: u32 = 5;
    let source = Arc::new(fixture());
    source.throttled_calls.store(DEFERRALS, Ordering::Relaxed);
    // One window holds every row, so that every deferral is of the same work item.
    let settings = source.settings(Duration::from_secs(400 * 86_400));
    let run = sync_once("fixture-throttled", source.clone(), settings).await;
    assert_eq!(source.throttled_calls.load(Ordering::Relaxed), 0);
    run.assert_complete(&source.truth());
    assert_eq!(
        run.dead_letters.len() as u64,
        run.summary.dead_lettered,
        "only the rows without an id: {:?}",
        run.dead_letters
    );
    assert!(
        run.dead_letters
            .iter()
            .all(|letter| letter.class == "permanent"),
        "{:?}",
        run.dead_letters
    );
}
