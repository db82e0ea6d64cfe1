//! The PostgreSQL target against a real PostgreSQL (CONVEYOR_PG_URL, or the local `test` database): a
//! newer modify time wins, an older one never overwrites, and the same version is not written again,
//! whatever the order of the writes and however many writers write the same ids at once. Each test has
//! a schema of its own; they fail, never skip, when PostgreSQL is down.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use chrono::{DateTime, FixedOffset};
use conveyor_base::{Record, Secret};
use conveyor_pipeline::target::postgres::SqlErrorOverrides;
use conveyor_writer::target::Target;
use conveyor_writer::target::WriteError;
use conveyor_writer::target::postgres::{PostgresArgs, PostgresTarget, TableSpec};
use futures_util::StreamExt;

/// The PostgreSQL used when CONVEYOR_PG_URL is not set (as in the end-to-end tests).
const DEFAULT_PG_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

fn pg_url() -> String {
    std::env::var("CONVEYOR_PG_URL").unwrap_or_else(|_| DEFAULT_PG_URL.into())
}

/// A schema of the test's own with the `orders` table, made by the target's migrations.
struct Table {
    schema: String,
    migrations: PathBuf,
}

impl Table {
    fn new(prefix: &str) -> Self {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let schema = format!("{prefix}_{}_{:x}", std::process::id(), nanos % (1 << 40));
        let migrations = std::env::temp_dir().join(format!("conveyor-{schema}"));
        std::fs::create_dir_all(&migrations).unwrap();
        std::fs::write(
            migrations.join("V1__orders.sql"),
            "CREATE TABLE orders (id text PRIMARY KEY, modify_time timestamptz NOT NULL, \
             total numeric(18, 2), note text);",
        )
        .unwrap();
        Self { schema, migrations }
    }

    /// A writer's target: its own connection pool, as each writer process has.
    async fn target(&self) -> PostgresTarget {
        let args = PostgresArgs {
            pg_pool_size: 4,
            lock_timeout_ms: Some(10_000),
            ..PostgresArgs::at(Secret::new(pg_url()), self.schema.clone())
        };
        let spec = TableSpec {
            table: "orders".into(),
            key: "id".into(),
            version: "modify_time".into(),
            columns: ["id", "modify_time", "total", "note"]
                .map(str::to_owned)
                .into(),
        };
        PostgresTarget::connect(
            &args,
            "versions",
            &self.migrations,
            &spec,
            SqlErrorOverrides::default(),
            None,
        )
        .await
        .unwrap_or_else(|err| panic!("the PostgreSQL target at {}: {err}", pg_url()))
    }

    async fn client(&self) -> tokio_postgres::Client {
        let (client, connection) = tokio_postgres::connect(&pg_url(), tokio_postgres::NoTls)
            .await
            .unwrap_or_else(|err| panic!("these tests need PostgreSQL at {}: {err}", pg_url()));
        tokio::spawn(connection);
        client
    }

    /// Every row: id → (version as seconds after the epoch of these tests, note, total).
    async fn rows(
        &self,
        client: &tokio_postgres::Client,
    ) -> BTreeMap<String, (i64, String, String)> {
        let sql = format!(
            "SELECT id, extract(epoch FROM modify_time - timestamptz '{EPOCH}')::bigint, note, total::text FROM \"{}\".orders",
            self.schema
        );
        client
            .query(&sql, &[])
            .await
            .unwrap()
            .iter()
            .map(|row| (row.get(0), (row.get(1), row.get(2), row.get(3))))
            .collect()
    }

    async fn drop(self) {
        let client = self.client().await;
        client
            .batch_execute(&format!("DROP SCHEMA \"{}\" CASCADE", self.schema))
            .await
            .unwrap();
        std::fs::remove_dir_all(&self.migrations).ok();
    }
}

const EPOCH: &str = "2025-01-01T08:00:00+08:00";

/// Version `v` of record `id`: modified `v` seconds after the epoch, its data saying which it is.
fn version(id: &str, v: i64, note: &str) -> Record {
    let modify_time: DateTime<FixedOffset> =
        EPOCH.parse::<DateTime<FixedOffset>>().unwrap() + chrono::Duration::seconds(v);
    Record::new(
        id.to_owned(),
        modify_time,
        &serde_json::json!({
            "id": id,
            "modify_time": modify_time.to_rfc3339(),
            "total": format!("{v}.50"),
            "note": note,
        }),
    )
}

#[tokio::test]
async fn an_older_version_never_overwrites_a_newer_one() {
    let table = Table::new("writer_versions");
    let target = table.target().await;
    let client = table.client().await;
    let row = |rows: &BTreeMap<String, (i64, String, String)>, id: &str| rows[id].clone();

    let report = target.write(&[version("a", 2, "a@2")]).await.unwrap();
    assert_eq!((report.applied, report.stale), (1, 0));

    // The older version arrives late: not applied, the newer data stays.
    let report = target.write(&[version("a", 1, "a@1")]).await.unwrap();
    assert_eq!((report.applied, report.stale), (0, 1));
    assert_eq!(
        row(&table.rows(&client).await, "a"),
        (2, "a@2".into(), "2.50".into())
    );

    // The same version again (a redelivery): not applied; nor is other data under the same version.
    let report = target.write(&[version("a", 2, "a@2")]).await.unwrap();
    assert_eq!((report.applied, report.stale), (0, 1));
    let report = target
        .write(&[version("a", 2, "a@2, written again differently")])
        .await
        .unwrap();
    assert_eq!((report.applied, report.stale), (0, 1));
    assert_eq!(
        row(&table.rows(&client).await, "a"),
        (2, "a@2".into(), "2.50".into())
    );

    // A newer one wins; in one batch with older ones of the same id (in any order), the newest is
    // written, and a new id is inserted next to a stale one.
    let report = target
        .write(&[
            version("a", 5, "a@5"),
            version("b", 1, "b@1"),
            version("a", 3, "a@3"),
            version("a", 1, "a@1"),
        ])
        .await
        .unwrap();
    assert_eq!(report.applied, 2, "a@5 and b@1");
    let rows = table.rows(&client).await;
    assert_eq!(row(&rows, "a"), (5, "a@5".into(), "5.50".into()));
    assert_eq!(row(&rows, "b"), (1, "b@1".into(), "1.50".into()));
    let report = target
        .write(&[version("a", 4, "a@4"), version("b", 2, "b@2")])
        .await
        .unwrap();
    assert_eq!((report.applied, report.stale), (1, 1));
    let rows = table.rows(&client).await;
    assert_eq!(row(&rows, "a"), (5, "a@5".into(), "5.50".into()));
    assert_eq!(row(&rows, "b"), (2, "b@2".into(), "2.50".into()));
    table.drop().await;
}

/// A small deterministic generator (xorshift), so that a failure can be run again as it was.
struct Dice(u64);

impl Dice {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = (self.next() % (i as u64 + 1)) as usize;
            items.swap(i, j);
        }
    }
}

const IDS: usize = 200;
const VERSIONS: i64 = 12;

/// One writer's share: batches of (id, version) pairs, in a shuffled order.
fn share(dice: &mut Dice, versions: impl Fn(i64) -> bool) -> Vec<Vec<Record>> {
    let mut writes: Vec<Record> = (0..IDS)
        .flat_map(|n| {
            (1..=VERSIONS)
                .filter(|v| versions(*v))
                .map(move |v| version(&format!("id-{n:03}"), v, &format!("id-{n:03}@{v}")))
        })
        .collect();
    dice.shuffle(&mut writes);
    writes.chunks(40).map(<[Record]>::to_vec).collect()
}

/// Writes every batch, several at once, trying again a batch that failed for a transient reason (a
/// lock or serialization conflict), as the writer does through its retry queues.
async fn write_all(target: &PostgresTarget, batches: Vec<Vec<Record>>) {
    futures_util::stream::iter(batches)
        .for_each_concurrent(4, |batch| async move {
            for attempt in 1.. {
                match target.write(&batch).await {
                    Ok(_) => return,
                    Err(WriteError::Transient(reason)) if attempt < 10 => {
                        eprintln!("retrying a batch: {reason}");
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    Err(err) => panic!("a write failed: {err}"),
                }
            }
        })
        .await;
}

/// Two writers (each with its own pool, as two processes) write interleaved versions of the same 200
/// ids at once, in shuffled order, 4 batches in flight each: one the odd versions, the other the even
/// ones. While they run, no row ever goes back to an older version; at the end every id holds its
/// newest version with that version's data.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_writers_of_the_same_ids_keep_the_newest_version() {
    let table = Table::new("writer_concurrent");
    let (first, second) = (table.target().await, table.target().await);
    let mut dice = Dice(0x9E37_79B9_7F4A_7C15);
    let odd = share(&mut dice, |v| v % 2 == 1);
    let even = share(&mut dice, |v| v % 2 == 0);
    let client = table.client().await;

    let watching = tokio::sync::watch::channel(false);
    let watcher = {
        let stop = watching.1.clone();
        let table = &table;
        let client = &client;
        async move {
            let mut seen: BTreeMap<String, i64> = BTreeMap::new();
            let mut readings = 0;
            while !*stop.borrow() {
                for (id, (version, note, _)) in table.rows(client).await {
                    assert_eq!(
                        note,
                        format!("{id}@{version}"),
                        "a row's data is its version's"
                    );
                    let last = seen.entry(id.clone()).or_insert(version);
                    assert!(
                        version >= *last,
                        "{id} went back from version {last} to {version}"
                    );
                    *last = version;
                }
                readings += 1;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            readings
        }
    };
    let writers = async {
        tokio::join!(write_all(&first, odd), write_all(&second, even));
        watching.0.send_replace(true);
    };
    let (readings, ()) = tokio::join!(watcher, writers);
    assert!(readings > 1, "the rows were watched while the writers ran");

    let rows = table.rows(&client).await;
    assert_eq!(rows.len(), IDS);
    for (id, (version, note, total)) in &rows {
        assert_eq!(
            (*version, note.as_str(), total.as_str()),
            (VERSIONS, format!("{id}@{VERSIONS}").as_str(), "12.50"),
            "{id} holds its newest version"
        );
    }
    table.drop().await;
}
