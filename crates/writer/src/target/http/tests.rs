//! The HTTP target against the target simulator as a real HTTP server on a loopback port.

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::DateTime;
use conveyor_core::envelope::Record;
use serde_json::{Value, json};
use target_sim::{TargetConfig, TargetSim};

use super::*;

const COLLECTION: &str = "lines";

async fn sim(config: TargetConfig) -> (Arc<TargetSim>, String) {
    let sim = TargetSim::new(TargetConfig {
        key_field: "line_id".into(),
        version_field: Some("modified".into()),
        ..config
    });
    let addr = target_sim::spawn(sim.clone(), ([127, 0, 0, 1], 0).into())
        .await
        .unwrap();
    (sim, format!("http://{addr}"))
}

fn spec(extra: Value) -> HttpTargetSpec {
    let mut value = json!({"path": format!("/api/{COLLECTION}"), "timeout_secs": 5});
    value
        .as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    let spec: HttpTargetSpec = serde_json::from_value(value).unwrap();
    spec.check().unwrap();
    spec
}

fn target(spec: &HttpTargetSpec, url: &str) -> HttpTarget {
    let args = HttpArgs {
        http_target_url: Some(url.to_owned()),
        ..HttpArgs::default()
    };
    HttpTarget::new(spec, "modified", &args).unwrap()
}

fn record(id: u32, modified: &str) -> Record {
    let modify_time = DateTime::parse_from_rfc3339(modified).unwrap();
    Record::new(
        format!("L{id}"),
        modify_time,
        &json!({"line_id": format!("L{id}"), "modified": modified, "qty": "1.50"}),
    )
}

fn records(count: u32, modified: &str) -> Vec<Record> {
    (0..count).map(|id| record(id, modified)).collect()
}

const OLD: &str = "2025-01-01T08:00:00+08:00";
const NEW: &str = "2025-01-02T08:00:00+08:00";

#[tokio::test]
async fn batches_land_and_the_newest_version_wins() {
    let (sim, url) = sim(TargetConfig::default()).await;
    let target = target(&spec(json!({"batch_size": 7})), &url);
    let report = target.write(&records(20, NEW)).await.unwrap();
    assert_eq!(report.applied, 20);
    assert!(
        sim.stats
            .requests
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 3
    );
    // An older version arriving later changes nothing; a batch holding both versions writes the newer.
    target.write(&records(20, OLD)).await.unwrap();
    let mut both = records(3, OLD);
    both.push(record(30, NEW));
    both.push(record(30, OLD));
    let report = target.write(&both).await.unwrap();
    assert_eq!(report.stale, 1);
    let held = sim.records(COLLECTION);
    assert_eq!(held.len(), 21);
    assert!(
        held.values().all(|record| record["modified"] == NEW),
        "{held:?}"
    );
    assert_eq!(held["L0"]["qty"], "1.50");
}

#[tokio::test]
async fn idempotency_keys_make_repeats_harmless() {
    let (sim, url) = sim(TargetConfig::default()).await;
    let target = target(
        &spec(json!({"body": "record", "id_check": {"mode": "idempotency_key"}})),
        &url,
    );
    target.write(&records(5, NEW)).await.unwrap();
    target.write(&records(5, NEW)).await.unwrap();
    let stats = &sim.stats;
    assert_eq!(stats.created.load(std::sync::atomic::Ordering::Relaxed), 5);
    assert_eq!(stats.replayed.load(std::sync::atomic::Ordering::Relaxed), 5);
    assert_eq!(sim.records(COLLECTION).len(), 5);
}

#[tokio::test]
async fn conflict_counts_as_written() {
    let (sim, url) = sim(TargetConfig {
        insert_only: true,
        ..TargetConfig::default()
    })
    .await;
    let target = target(&spec(json!({"body": "record"})), &url);
    assert_eq!(target.write(&records(4, NEW)).await.unwrap().applied, 4);
    let again = target.write(&records(4, NEW)).await.unwrap();
    assert_eq!((again.applied, again.stale), (0, 4));
    assert_eq!(
        sim.stats
            .conflicts
            .load(std::sync::atomic::Ordering::Relaxed),
        4
    );
}

#[tokio::test]
async fn existence_check_skips_or_updates() {
    let (sim, url) = sim(TargetConfig {
        insert_only: true,
        ..TargetConfig::default()
    })
    .await;
    let exists = |on_exists: &str| {
        spec(
            json!({"id_check": {"mode": "exists", "path": format!("/api/{COLLECTION}/{{key}}"), "on_exists": on_exists}}),
        )
    };
    let skip = target(&exists("skip"), &url);
    assert_eq!(skip.write(&records(3, OLD)).await.unwrap().applied, 3);
    let report = skip.write(&records(4, NEW)).await.unwrap();
    assert_eq!(
        (report.applied, report.stale),
        (1, 3),
        "only the new one is written"
    );
    assert_eq!(sim.records(COLLECTION)["L0"]["modified"], OLD);

    let update = target(&exists("update"), &url);
    let report = update.write(&records(4, NEW)).await.unwrap();
    assert_eq!(
        (report.applied, report.stale),
        (3, 1),
        "L3 is already this new"
    );
    let report = update.write(&records(4, OLD)).await.unwrap();
    assert_eq!(
        (report.applied, report.stale),
        (0, 4),
        "never older over newer"
    );
    assert!(
        sim.records(COLLECTION)
            .values()
            .all(|r| r["modified"] == NEW)
    );
    assert_eq!(
        sim.stats
            .conflicts
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
}

#[tokio::test]
async fn a_record_written_meanwhile_is_retried_to_update_it() {
    let (sim, url) = sim(TargetConfig {
        insert_only: true,
        ..TargetConfig::default()
    })
    .await;
    target(&spec(json!({})), &url)
        .write(&records(2, OLD))
        .await
        .unwrap();
    // Asking a collection that never holds them answers 404, as a check just before a concurrent
    // writer's insert would: the POST then meets 409.
    let racing = target(
        &spec(
            json!({"body": "record", "id_check": {"mode": "exists", "path": "/api/elsewhere/{key}", "on_exists": "update"}}),
        ),
        &url,
    );
    let result = racing.write(&records(2, NEW)).await;
    assert!(
        matches!(result, Err(WriteError::Transient(_))),
        "{result:?}"
    );
    assert!(
        sim.records(COLLECTION)
            .values()
            .all(|r| r["modified"] == OLD)
    );
}

#[tokio::test]
async fn failures_are_classified() {
    let transient = |config: TargetConfig| async move {
        let (_sim, url) = sim(config).await;
        target(&spec(json!({})), &url).write(&records(2, NEW)).await
    };
    for config in [
        TargetConfig {
            rate_5xx: 1.0,
            ..TargetConfig::default()
        },
        TargetConfig {
            rate_429: 1.0,
            ..TargetConfig::default()
        },
        TargetConfig {
            static_token: Some("expected".into()),
            ..TargetConfig::default()
        },
    ] {
        let result = transient(config).await;
        assert!(
            matches!(result, Err(WriteError::Transient(_))),
            "{result:?}"
        );
    }
    let (_sim, url) = sim(TargetConfig {
        invalid_when: vec![("line_id".into(), json!("L1"))],
        ..TargetConfig::default()
    })
    .await;
    let result = target(&spec(json!({})), &url).write(&records(3, NEW)).await;
    assert!(
        matches!(result, Err(WriteError::Permanent(ref m)) if m.contains("422")),
        "{result:?}"
    );

    // Nothing listens on a port that was free a moment ago: refused, the target is unavailable (the
    // writer's circuit breaker holds back rather than retry each message).
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let result = target(&spec(json!({})), &format!("http://127.0.0.1:{port}"))
        .write(&records(1, NEW))
        .await;
    assert!(
        matches!(result, Err(WriteError::Unavailable(ref m)) if m.contains("connect")),
        "{result:?}"
    );

    let (_sim, url) = sim(TargetConfig {
        latency: Duration::from_millis(1500),
        ..TargetConfig::default()
    })
    .await;
    let result = target(&spec(json!({"timeout_secs": 1})), &url)
        .write(&records(1, NEW))
        .await;
    assert!(
        matches!(result, Err(WriteError::Transient(ref m)) if m.contains("timed out")),
        "{result:?}"
    );
}

#[tokio::test]
async fn tokens_are_cached_and_renewed_and_never_shown() {
    let (sim, url) = sim(TargetConfig {
        client: Some(("conveyor".into(), "s3cret-value".into())),
        ..TargetConfig::default()
    })
    .await;
    let spec = spec(json!({"auth": {"kind": "token_endpoint", "path": "/oauth/token"}}));
    let args = |secret: &str| HttpArgs {
        http_target_url: Some(url.clone()),
        http_target_client_id: Some("conveyor".into()),
        http_target_client_secret: Some(Secret::new(secret)),
        ..HttpArgs::default()
    };
    let target = HttpTarget::new(&spec, "modified", &args("s3cret-value")).unwrap();
    for _ in 0..3 {
        target.write(&records(2, NEW)).await.unwrap();
    }
    let issued = || {
        sim.stats
            .tokens_issued
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    assert_eq!(issued(), 1, "the token is cached");
    sim.revoke_tokens();
    target.write(&records(2, NEW)).await.unwrap();
    assert_eq!(issued(), 2, "a 401 fetches a new token");

    let wrong = HttpTarget::new(&spec, "modified", &args("wrong-secret")).unwrap();
    let err = wrong.write(&records(1, NEW)).await.unwrap_err();
    assert!(matches!(err, WriteError::Transient(_)), "{err:?}");
    assert!(!err.to_string().contains("wrong-secret"), "{err}");
}

#[tokio::test]
async fn calls_in_flight_are_limited() {
    let (_sim, url) = sim(TargetConfig {
        latency: Duration::from_millis(50),
        ..TargetConfig::default()
    })
    .await;
    let target = target(&spec(json!({"body": "record", "concurrency": 2})), &url);
    let started = Instant::now();
    target.write(&records(8, NEW)).await.unwrap();
    // 8 calls of 50 ms, 2 at a time, take at least 4 × 50 ms.
    assert!(
        started.elapsed() >= Duration::from_millis(200),
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn statuses_are_sorted_in_one_place() {
    for status in [408, 425, 429, 500, 502, 503, 504, 401, 403] {
        let status = StatusCode::from_u16(status).unwrap();
        assert!(
            matches!(classify_status(status, ""), WriteError::Transient(_)),
            "{status}"
        );
    }
    for status in [400, 404, 413, 422] {
        let status = StatusCode::from_u16(status).unwrap();
        assert!(
            matches!(classify_status(status, ""), WriteError::Permanent(_)),
            "{status}"
        );
    }
    assert_eq!(percent_encode("a/b c"), "a%2Fb%20c");
}

#[test]
fn setup_names_the_missing_or_wrong_setting() {
    let spec = spec(json!({"auth": {"kind": "bearer"}}));
    let with = |url: Option<&str>| HttpArgs {
        http_target_url: url.map(str::to_owned),
        ..HttpArgs::default()
    };
    for (args, variable) in [
        (with(None), "CONVEYOR_HTTP_TARGET_URL"),
        (with(Some("ftp://example")), "CONVEYOR_HTTP_TARGET_URL"),
        (
            with(Some("http://127.0.0.1:1")),
            "CONVEYOR_HTTP_TARGET_TOKEN",
        ),
    ] {
        let err = HttpTarget::new(&spec, "modified", &args).err().unwrap();
        assert!(err.to_string().contains(variable), "{err}");
    }
}
