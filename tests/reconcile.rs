//! `conveyorctl reconcile` against a real sync: after the target is damaged behind the pipeline's back
//! (rows deleted, rows set back to an older version) and the source gains rows after the sync, it names
//! exactly those ids and exits 1; the re-sync it offers mends them, and it then exits 0.

use std::collections::BTreeSet;

mod common;

use common::*;
use conveyor_harness::{Scenario, Worker};

fn reconcile(scenario: &Scenario, extra: &[&str]) -> std::process::Output {
    reconcile_command(scenario, extra)
        .output()
        .expect("conveyorctl runs")
}

fn report_of(output: &std::process::Output) -> serde_json::Value {
    serde_json::from_slice(&output.stdout).unwrap_or_else(|err| {
        panic!(
            "reconcile printed no JSON report ({err}):\n{}\n{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        )
    })
}

fn ids(report: &serde_json::Value, field: &str) -> BTreeSet<String> {
    report[field]
        .as_array()
        .unwrap_or_else(|| panic!("no {field} in {report}"))
        .iter()
        .map(|item| {
            let id = if item.is_string() { item } else { &item["id"] };
            id.as_str().expect("an id").to_owned()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconcile_names_what_the_target_lacks_and_its_resync_mends_it() {
    // Windows of at most 250 rows: the sync and the reconcile both cut the 300 orders' window in two.
    let scenario = Scenario::start(
        services().await,
        &sales_orders_pipeline(),
        &bin_dir(),
        "reconcile",
        orders(300),
        &[("max_window_rows", toml::Value::Integer(250))],
    )
    .await
    .expect("scenario starts");
    let mut workers = vec![
        spawn_ready(&scenario, Worker::Transformer).await,
        spawn_ready(&scenario, Worker::Writer).await,
    ];
    run_fetcher_once(&scenario).await;
    assert_target_equals_truth(&scenario, &workers).await;

    step("a target equal to the source reconciles clean");
    let clean = reconcile(&scenario, &[]);
    let text = succeeded("reconcile of a clean target", clean);
    assert!(
        text.contains("ok: the target holds every source record"),
        "{text}"
    );

    step("rows deleted, rows set back, rows the source gained after the sync");
    let client = conveyor_harness::pg_client(&scenario.services.pg_url)
        .await
        .unwrap();
    let table = scenario.table().unwrap();
    // Deleted from a window of more than one page, so that a reconcile with too few calls cannot
    // compare it by ids.
    let clean = report_of(&reconcile(&scenario, &["--json"]));
    let paged = clean["windows"]
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["source_rows"].as_u64().unwrap() > 100)
        .unwrap_or_else(|| panic!("no window of several pages: {clean:#}"));
    let at = |field: &str| -> chrono::DateTime<chrono::Utc> {
        paged[field].as_str().unwrap().parse().unwrap()
    };
    let (start, end) = (at("start"), at("end"));
    let deleted: Vec<String> = client
        .query(
            &format!(
                "SELECT id FROM {table} WHERE modify_time BETWEEN $1 AND $2 ORDER BY id LIMIT 3"
            ),
            &[&start, &end],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    let set_back: Vec<String> = client
        .query(
            &format!("SELECT id FROM {table} WHERE id <> ALL($1) ORDER BY id DESC LIMIT 2"),
            &[&deleted],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    client
        .execute(
            &format!("DELETE FROM {table} WHERE id = ANY($1)"),
            &[&deleted],
        )
        .await
        .unwrap();
    client
        .execute(
            &format!(
                "UPDATE {table} SET modify_time = modify_time - interval '1 hour', total_amount = 0 \
                 WHERE id = ANY($1)"
            ),
            &[&set_back],
        )
        .await
        .unwrap();
    scenario.simulator.change_now(2, 3);
    let damage = scenario.compare_with_truth().await.unwrap();
    assert_eq!(damage.missing.len(), 3 + 3, "{damage:?}");
    assert!(damage.wrong_version.len() >= 2, "{damage:?}");

    let found = reconcile(&scenario, &["--json"]);
    assert_eq!(
        found.status.code(),
        Some(1),
        "reconcile must fail on a damaged target"
    );
    let report = report_of(&found);
    assert_eq!(
        ids(&report, "missing"),
        damage.missing.iter().cloned().collect(),
        "{report:#}"
    );
    assert_eq!(
        ids(&report, "older"),
        damage.wrong_version.iter().cloned().collect(),
        "{report:#}"
    );
    assert!(ids(&report, "extra").is_empty(), "{report:#}");
    for id in deleted.iter().chain(&set_back) {
        let all: BTreeSet<String> = ids(&report, "missing")
            .union(&ids(&report, "older"))
            .cloned()
            .collect();
        assert!(all.contains(id), "{id} not named: {report:#}");
    }

    let windows = report["windows"].as_array().unwrap();
    assert!(
        windows
            .iter()
            .all(|w| w["source_rows"].as_u64().unwrap() <= 250),
        "windows of more rows than the sync pages at once are cut: {report:#}"
    );
    step("with too few calls for ids everywhere, the windows whose counts differ are named");
    let counts_only = report["calls_for_counts"].as_u64().unwrap().to_string();
    let frugal = report_of(&reconcile(
        &scenario,
        &["--json", "--max-calls", &counts_only],
    ));
    let compared: Vec<&str> = frugal["windows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["compared"].as_str().unwrap())
        .collect();
    assert!(compared.contains(&"not_compared"), "{frugal:#}");

    step("the offered re-sync mends the target");
    let human = reconcile(&scenario, &[]);
    assert_eq!(human.status.code(), Some(1));
    let text = String::from_utf8_lossy(&human.stdout).into_owned();
    eprintln!("{text}");
    let command = text
        .lines()
        .find_map(|line| line.trim().strip_prefix("conveyorctl "))
        .unwrap_or_else(|| panic!("no re-sync command offered:\n{text}"));
    let args: Vec<&str> = command.split_whitespace().collect();
    assert_eq!(args[0], "resync", "{text}");
    let resync = ctl_command(&scenario, &args)
        .envs(scenario.environment())
        .output()
        .unwrap();
    succeeded("the offered re-sync", resync);
    run_fetcher_once(&scenario).await;
    assert_target_equals_truth(&scenario, &workers).await;
    let mended = reconcile(&scenario, &[]);
    let text = succeeded("reconcile after the re-sync", mended);
    assert!(text.contains("ok:"), "{text}");

    step("wrong requests are refused with their reason");
    let backwards = reconcile(&scenario, &["--until", "2024-01-01T00:00:00Z"]);
    let stderr = String::from_utf8_lossy(&backwards.stderr);
    assert!(
        !backwards.status.success() && stderr.contains("is before --since"),
        "{stderr}"
    );
    let file = scenario.pipeline.file.display().to_string();
    let costly = ctl_command(
        &scenario,
        &[
            "reconcile",
            &file,
            "--since",
            "2025-01-01T00:00:00Z",
            "--window-secs",
            "3600",
            "--max-calls",
            "100",
        ],
    )
    .envs(scenario.environment())
    .output()
    .unwrap();
    let stderr = String::from_utf8_lossy(&costly.stderr);
    assert!(
        !costly.status.success() && stderr.contains("--max-calls 100"),
        "{stderr}"
    );
    let unknown = ctl_command(
        &scenario,
        &[
            "reconcile",
            "no_such_pipeline",
            "--since",
            "2025-01-01T00:00:00Z",
        ],
    )
    .envs(scenario.environment())
    .output()
    .unwrap();
    let stderr = String::from_utf8_lossy(&unknown.stderr);
    assert!(
        !unknown.status.success() && stderr.contains("no pipeline \"no_such_pipeline\""),
        "{stderr}"
    );

    stop_all(&mut workers).await;
    scenario.clean_up(false).await.unwrap();
}
