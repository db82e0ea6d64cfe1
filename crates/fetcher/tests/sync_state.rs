//! The sync state against the real PostgreSQL on 127.0.0.1:5432 (user postgres, database test): a
//! fetcher that finishes a window the moment it is published, before the plan that publishes it has
//! committed, still finishes it.

use std::sync::Mutex;
use std::time::Duration;

use chrono::{FixedOffset, Utc};
use conveyor_base::Secret;
use conveyor_base::source::Window;
use conveyor_fetcher::state::SyncStore;
use conveyor_postgres::{Database, PostgresArgs};
use tokio::task::JoinHandle;

const HOUR: Duration = Duration::from_secs(3600);
const DAY: Duration = Duration::from_secs(86_400);

/// A store in a fresh schema of its own, for a pipeline of its own (the window lock is database-wide);
/// dropped by [`drop_schema`].
async fn store(name: &str) -> (SyncStore, Database, String) {
    let pipeline = format!("orders_{name}_{}", std::process::id());
    let args = PostgresArgs {
        pg_pool_size: 8,
        ..PostgresArgs::at(
            Secret::new("postgres://postgres@127.0.0.1:5432/test"),
            format!("fetcher_state_{name}_{}", std::process::id()),
        )
    };
    let database = Database::connect(&args).unwrap();
    drop_schema(&database).await;
    let store = SyncStore::open(database.clone(), &pipeline)
        .await
        .expect("PostgreSQL must run on 127.0.0.1:5432 (ops/services.sh starts it)");
    (store, database, pipeline)
}

async fn drop_schema(database: &Database) {
    let client = database
        .client()
        .await
        .expect("PostgreSQL must run on 127.0.0.1:5432 (ops/services.sh starts it)");
    client
        .batch_execute(&format!(
            "DROP SCHEMA IF EXISTS \"{}\" CASCADE",
            database.schema
        ))
        .await
        .unwrap();
}

/// A start that makes the first plan three windows of a day: two whole ones and a shorter last one.
fn three_days_ago() -> chrono::DateTime<FixedOffset> {
    (Utc::now() - chrono::Duration::days(3) + chrono::Duration::hours(1)).fixed_offset()
}

/// The fastest possible fetcher: it finishes each window the moment it is published, while the plan
/// (or split) that publishes it has not committed yet.
fn finish_at_once(store: &SyncStore, windows: &[Window]) -> Vec<JoinHandle<()>> {
    windows
        .iter()
        .map(|window| {
            let (store, window) = (store.clone(), *window);
            tokio::spawn(async move {
                store.finish(&window).await.unwrap();
            })
        })
        .collect()
}

/// Returns once every finisher has tried: it waits for the pipeline's window lock, or it is done
/// (without the lock its DELETE finds no committed row and it returns at once). Only then does the
/// publish return and the plan commit, so the test fails without the lock, every time.
async fn until_finishers_tried(database: &Database, pipeline: &str, finishers: &[JoinHandle<()>]) {
    let client = database.client().await.unwrap();
    for _ in 0..1_000 {
        // pg_advisory_xact_lock(bigint): objid holds the key's low 32 bits, objsubid is 1.
        let waiting: i64 = client
            .query_one(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted \
                 AND objsubid = 1 \
                 AND objid::text::bigint = (hashtext('conveyor-plan:' || $1)::bigint & 4294967295)",
                &[&pipeline],
            )
            .await
            .unwrap()
            .get(0);
        let done = finishers.iter().filter(|f| f.is_finished()).count() as i64;
        if waiting + done == finishers.len() as i64 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the finishers never reached the database");
}

#[tokio::test]
async fn a_window_finished_while_its_plan_commits_is_done() {
    let (store, database, pipeline) = store("finish").await;
    let finishing = Mutex::new(Vec::new());
    // The publish of a plan (or split) by a fetcher whose windows are finished the moment they are out.
    let publish = |windows: Vec<Window>| {
        let (store, database, pipeline, finishing) = (&store, &database, &pipeline, &finishing);
        async move {
            let finishers = finish_at_once(store, &windows);
            until_finishers_tried(database, pipeline, &finishers).await;
            finishing.lock().unwrap().extend(finishers);
            anyhow::Ok(())
        }
    };
    let plan = store
        .plan(
            three_days_ago(),
            DAY,
            Duration::ZERO,
            Duration::ZERO,
            HOUR,
            publish,
        )
        .await
        .unwrap();
    let finishers = std::mem::take(&mut *finishing.lock().unwrap());
    for finished in finishers {
        finished.await.unwrap();
    }
    assert_eq!(plan.windows.len(), 3, "{plan:?}");
    assert_eq!(
        store.pending().await.unwrap().len(),
        0,
        "every window finished"
    );
    let watermark = store.watermark().await.unwrap().unwrap();
    assert_eq!(
        watermark, plan.windows[2].end,
        "the watermark passed all three"
    );

    let halves = store
        .split(&plan.windows[0], |halves| publish(halves[..1].to_vec()))
        .await
        .unwrap();
    let finishers = std::mem::take(&mut *finishing.lock().unwrap());
    for finished in finishers {
        finished.await.unwrap();
    }
    assert_eq!(halves, conveyor_fetcher::window::halves(&plan.windows[0]));
    assert_eq!(
        store.pending().await.unwrap().len(),
        1,
        "the half finished at once is done; the other is pending"
    );
    drop_schema(&database).await;
}

#[tokio::test]
async fn windows_whose_publish_failed_are_planned_again() {
    let (store, database, _) = store("failed").await;
    let start = three_days_ago();
    let attempted = Mutex::new(Vec::<Window>::new());
    let failed = store
        .plan(
            start,
            DAY,
            Duration::ZERO,
            Duration::ZERO,
            HOUR,
            |windows| {
                attempted.lock().unwrap().extend(windows);
                async { anyhow::bail!("broker refused") }
            },
        )
        .await
        .unwrap_err();
    assert!(
        format!("{failed:#}").contains("broker refused"),
        "{failed:#}"
    );
    assert_eq!(store.pending().await.unwrap().len(), 0, "nothing recorded");
    assert_eq!(store.watermark().await.unwrap(), None);

    let again = store
        .plan(
            start,
            DAY,
            Duration::ZERO,
            Duration::ZERO,
            HOUR,
            |_| async { Ok(()) },
        )
        .await
        .unwrap();
    let attempted = attempted.into_inner().unwrap();
    assert_eq!(again.windows[..2], attempted[..2], "the same windows again");
    assert_eq!(store.pending().await.unwrap().len(), 3);
    drop_schema(&database).await;
}
