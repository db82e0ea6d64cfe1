//! The HTTP target against the target simulator as a real HTTP server on a loopback port.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use chrono::DateTime;
use conveyor_base::{Record, Secret, tls};
use conveyor_pipeline::target::http::{HttpErrorOverrides, HttpTargetSpec};
use reqwest::StatusCode;
use serde_json::{Value, json};
use target_sim::{TargetConfig, TargetSim};

use super::call::percent_encode;
use super::*;
use crate::target::{Target, WriteError};
use conveyor_runtime::refusal::Checked;

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
    ] {
        let result = transient(config).await;
        assert!(
            matches!(result, Err(WriteError::Transient(_))),
            "{result:?}"
        );
    }
    let refused = transient(TargetConfig {
        static_token: Some("expected".into()),
        ..TargetConfig::default()
    })
    .await;
    assert!(
        matches!(refused, Err(WriteError::Refused(_))),
        "{refused:?}"
    );
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
        http_target_allow_plain_http: true,
        ..HttpArgs::default()
    };
    // Credentials over plain HTTP are refused unless intended.
    let refused = HttpTarget::new(
        &spec,
        "modified",
        &HttpArgs {
            http_target_allow_plain_http: false,
            ..args("s3cret-value")
        },
    )
    .err()
    .expect("credentials over http:// refused");
    assert!(
        refused
            .to_string()
            .contains("CONVEYOR_HTTP_TARGET_ALLOW_PLAIN_HTTP"),
        "{refused}"
    );
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
    assert!(
        matches!(err, WriteError::Refused(ref m) if m.contains("token endpoint answered 401")),
        "a refused client secret is a setup error: {err:?}"
    );
    assert!(!err.to_string().contains("wrong-secret"), "{err}");
    assert!(matches!(
        wrong.check_credentials().await,
        Checked::Refused(_)
    ));
    assert_eq!(target.check_credentials().await, Checked::Accepted);
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
    let none = HttpErrorOverrides::default();
    let class = |status: u16, overrides: &HttpErrorOverrides| {
        class_of(StatusCode::from_u16(status).unwrap(), overrides)
    };
    for status in [429, 502, 503, 504] {
        assert_eq!(class(status, &none), StatusClass::Unavailable, "{status}");
    }
    for status in [408, 425, 500, 501, 505] {
        assert_eq!(class(status, &none), StatusClass::Transient, "{status}");
    }
    for status in [401, 403] {
        assert_eq!(class(status, &none), StatusClass::Credentials, "{status}");
    }
    for status in [400, 404, 413, 422] {
        assert_eq!(class(status, &none), StatusClass::Permanent, "{status}");
    }
    assert_eq!(class(409, &none), StatusClass::Exists);
    for status in [408, 429, 503] {
        let status = StatusCode::from_u16(status).unwrap();
        assert!(
            matches!(classify_status(status, "", &none), WriteError::Transient(_)),
            "{status}"
        );
    }
    for status in [401, 403] {
        let status = StatusCode::from_u16(status).unwrap();
        assert!(
            matches!(classify_status(status, "", &none), WriteError::Refused(_)),
            "{status}"
        );
    }
    for status in [400, 409, 422] {
        let status = StatusCode::from_u16(status).unwrap();
        assert!(
            matches!(classify_status(status, "", &none), WriteError::Permanent(_)),
            "{status}"
        );
    }

    // The pipeline file's overrides come first: a 404 of a target that learns of referenced
    // records late is worth retrying; a 500 a target answers for a record it chokes on is not.
    let overrides = HttpErrorOverrides {
        transient: vec![404, 409, 503],
        permanent: vec![500, 401, 502],
        ..HttpErrorOverrides::default()
    };
    assert_eq!(class(404, &overrides), StatusClass::Transient);
    assert_eq!(class(409, &overrides), StatusClass::Transient);
    assert_eq!(class(500, &overrides), StatusClass::Permanent);
    assert_eq!(class(401, &overrides), StatusClass::Permanent);
    // 503 says the service is unavailable, transient listed or not; a 502 the file calls permanent
    // is permanent.
    assert_eq!(class(503, &overrides), StatusClass::Unavailable);
    assert_eq!(class(502, &overrides), StatusClass::Permanent);
    assert_eq!(class(422, &overrides), StatusClass::Permanent);
    assert!(matches!(
        classify_status(StatusCode::NOT_FOUND, "", &overrides),
        WriteError::Transient(_)
    ));
    assert!(matches!(
        classify_status(StatusCode::INTERNAL_SERVER_ERROR, "", &overrides),
        WriteError::Permanent(_)
    ));

    // The breaker's probe: only answers saying the service is unavailable keep it open.
    for (status, down) in [
        (503, true),
        (502, true),
        (504, true),
        (429, true),
        (404, false),
    ] {
        assert_eq!(
            is_down(StatusCode::from_u16(status).unwrap()),
            down,
            "{status}"
        );
    }
    assert!(!is_down(StatusCode::INTERNAL_SERVER_ERROR));
    assert_eq!(percent_encode("a/b c"), "a%2Fb%20c");
}

#[tokio::test]
async fn the_pipeline_files_overrides_decide_what_a_refusal_means() {
    // The target answers 500 for the record it chokes on: transient by default (retried, in the
    // end dead-lettered as "gave up"), permanent where the file says so (dead-lettered at once).
    let (_sim, url) = sim(TargetConfig {
        invalid_when: vec![("line_id".into(), json!("L1"))],
        invalid_status: StatusCode::INTERNAL_SERVER_ERROR,
        ..TargetConfig::default()
    })
    .await;
    let result = target(&spec(json!({})), &url).write(&records(3, NEW)).await;
    assert!(
        matches!(result, Err(WriteError::Transient(ref m)) if m.contains("500")),
        "{result:?}"
    );
    let overridden = spec(json!({"errors": {"permanent": [500]}}));
    let result = target(&overridden, &url).write(&records(3, NEW)).await;
    assert!(
        matches!(result, Err(WriteError::Permanent(ref m)) if m.contains("500")),
        "{result:?}"
    );

    // And the other way round: a 422 made transient.
    let (_sim, url) = sim(TargetConfig {
        invalid_when: vec![("line_id".into(), json!("L1"))],
        ..TargetConfig::default()
    })
    .await;
    let overridden = spec(json!({"errors": {"transient": [422]}}));
    let result = target(&overridden, &url).write(&records(3, NEW)).await;
    assert!(
        matches!(result, Err(WriteError::Transient(ref m)) if m.contains("422")),
        "{result:?}"
    );

    // A 409 listed in the overrides is no longer "already exists".
    let (sim, url) = sim(TargetConfig {
        insert_only: true,
        ..TargetConfig::default()
    })
    .await;
    let overridden = spec(json!({"body": "record", "errors": {"permanent": [409]}}));
    let writer = target(&overridden, &url);
    writer.write(&records(1, NEW)).await.unwrap();
    let result = writer.write(&records(1, NEW)).await;
    assert!(
        matches!(result, Err(WriteError::Permanent(ref m)) if m.contains("409")),
        "{result:?}"
    );
    assert_eq!(sim.stats.conflicts.load(Relaxed), 1);
}

#[tokio::test]
async fn a_target_failing_call_after_call_becomes_unavailable() {
    let (sim, url) = sim(TargetConfig::default()).await;
    let failing = spec(json!({"body": "record", "errors": {"unavailable_after": 3}}));
    let writer = target(&failing, &url);
    assert!(writer.ping().await);
    writer.write(&records(1, NEW)).await.unwrap();

    // The target's gateway answers 503 to everything (switched on as an operator of the simulator
    // binary would): the first calls are transient, then the target is unavailable.
    let admin = tls::http_client(None).build().unwrap();
    let outage = admin
        .put(format!("{url}/admin/outage"))
        .json(&json!({"status": 503}))
        .send()
        .await
        .unwrap();
    assert_eq!(outage.status(), StatusCode::NO_CONTENT);
    for _ in 0..2 {
        let result = writer.write(&records(1, NEW)).await;
        assert!(
            matches!(result, Err(WriteError::Transient(ref m)) if m.contains("503")),
            "{result:?}"
        );
    }
    let result = writer.write(&records(1, NEW)).await;
    assert!(
        matches!(result, Err(WriteError::Unavailable(ref m)) if m.contains("3 calls in a row") && m.contains("503")),
        "{result:?}"
    );
    assert!(!writer.ping().await, "the probe sees the outage");
    assert!(matches!(
        writer.write(&records(1, NEW)).await,
        Err(WriteError::Unavailable(_))
    ));

    let over = admin
        .delete(format!("{url}/admin/outage"))
        .send()
        .await
        .unwrap();
    assert_eq!(over.status(), StatusCode::NO_CONTENT);
    assert!(writer.ping().await, "the probe sees the target back");
    writer.write(&records(2, NEW)).await.unwrap();
    // The answers broke the run of failures: one failure is transient again.
    sim.set_outage(Some(StatusCode::BAD_GATEWAY));
    assert!(matches!(
        writer.write(&records(1, NEW)).await,
        Err(WriteError::Transient(_))
    ));
    // Any answer from a target that serves breaks the run: a refusal of the data, refused
    // credentials, a 500 (which a target may answer for some records only: it must not hold back
    // the writing of the others).
    for answer in [
        StatusCode::UNPROCESSABLE_ENTITY,
        StatusCode::UNAUTHORIZED,
        StatusCode::INTERNAL_SERVER_ERROR,
    ] {
        sim.set_outage(Some(answer));
        let result = writer.write(&records(1, NEW)).await;
        assert!(
            matches!(
                result,
                Err(WriteError::Transient(_) | WriteError::Permanent(_) | WriteError::Refused(_))
            ),
            "{answer}: {result:?}"
        );
        // Without the reset, the second of these would be the third failure in a row.
        sim.set_outage(Some(StatusCode::SERVICE_UNAVAILABLE));
        for _ in 0..2 {
            let result = writer.write(&records(1, NEW)).await;
            assert!(
                matches!(result, Err(WriteError::Transient(_))),
                "after {answer}: {result:?}"
            );
        }
    }
    sim.set_outage(Some(StatusCode::INTERNAL_SERVER_ERROR));
    assert!(writer.ping().await, "a 500 to the probe: something serves");
    assert!(sim.stats.outage_answers.load(Relaxed) >= 8);

    // Calls that time out count alike: two concurrent calls of one write, both timed out.
    let (_slow_sim, url) = self::sim(TargetConfig {
        latency: Duration::from_millis(1500),
        ..TargetConfig::default()
    })
    .await;
    let slow =
        spec(json!({"body": "record", "timeout_secs": 1, "errors": {"unavailable_after": 2}}));
    let result = target(&slow, &url).write(&records(2, NEW)).await;
    assert!(
        matches!(result, Err(WriteError::Unavailable(ref m)) if m.contains("timed out")),
        "{result:?}"
    );
}

#[tokio::test]
async fn a_batch_answered_409_is_split_and_only_records_already_there_count_as_written() {
    // The target inserts a batch in one transaction: one key that exists fails it whole with 409.
    let (sim, url) = sim(TargetConfig {
        insert_only: true,
        conflict_fails_batch: true,
        ..TargetConfig::default()
    })
    .await;
    let target = target(&spec(json!({"batch_size": 50})), &url);
    let report = target.write(&records(3, OLD)).await.unwrap();
    assert_eq!((report.applied, report.stale), (3, 0));
    // L0 to L2 exist: the batch of L0 to L5 is refused whole, split, and the new L3 to L5 land.
    let report = target.write(&records(6, OLD)).await.unwrap();
    assert_eq!(
        (report.applied, report.stale),
        (3, 3),
        "only the records answered 409 on their own count as written"
    );
    let held = sim.records(COLLECTION);
    assert_eq!(
        held.keys().collect::<Vec<_>>(),
        ["L0", "L1", "L2", "L3", "L4", "L5"]
    );
    // A batch of one answered 409 is that record's own 409.
    let report = target.write(&records(1, OLD)).await.unwrap();
    assert_eq!((report.applied, report.stale), (0, 1));
}

#[tokio::test]
async fn a_static_bearer_token_is_sent() {
    let (sim, url) = sim(TargetConfig {
        static_token: Some("static-token-1".into()),
        ..TargetConfig::default()
    })
    .await;
    let bearer = spec(json!({"auth": {"kind": "bearer"}}));
    let with_token = |token: &str| HttpArgs {
        http_target_url: Some(url.clone()),
        http_target_token: Some(Secret::new(token)),
        http_target_allow_plain_http: true,
        ..HttpArgs::default()
    };
    let target = HttpTarget::new(&bearer, "modified", &with_token("static-token-1")).unwrap();
    assert_eq!(target.write(&records(3, NEW)).await.unwrap().applied, 3);
    assert_eq!(sim.records(COLLECTION).len(), 3);
    assert_eq!(sim.stats.unauthorized.load(Relaxed), 0);

    // From a file (a mounted secret), trimmed of its line end.
    let file = std::env::temp_dir().join(format!("conveyor-token-{}", uuid::Uuid::new_v4()));
    std::fs::write(
        &file,
        "static-token-1
",
    )
    .unwrap();
    let from_file = HttpArgs {
        http_target_url: Some(url.clone()),
        http_target_token_file: Some(file.clone()),
        http_target_allow_plain_http: true,
        ..HttpArgs::default()
    };
    let target = HttpTarget::new(&bearer, "modified", &from_file).unwrap();
    let written = target.write(&records(4, NEW)).await;
    std::fs::remove_file(&file).unwrap();
    assert_eq!(written.unwrap().applied, 4);
    assert_eq!(sim.stats.unauthorized.load(Relaxed), 0);

    let wrong = HttpTarget::new(&bearer, "modified", &with_token("stale-token")).unwrap();
    let err = wrong.write(&records(1, NEW)).await.unwrap_err();
    assert!(
        matches!(err, WriteError::Refused(ref m) if m.contains("401") && m.contains("CONVEYOR_HTTP_TARGET_TOKEN")),
        "{err:?}"
    );
    assert!(!err.to_string().contains("stale-token"), "{err}");
}

#[tokio::test]
async fn headers_from_the_pipeline_file_reach_the_target() {
    let (sim, url) = sim(TargetConfig {
        required_headers: vec![
            ("x-source-system".into(), "kingdee".into()),
            ("x-tenant".into(), "t-001".into()),
        ],
        ..TargetConfig::default()
    })
    .await;
    let with_headers =
        spec(json!({"headers": {"X-Source-System": "kingdee", "X-Tenant": "t-001"}}));
    let report = target(&with_headers, &url)
        .write(&records(3, NEW))
        .await
        .unwrap();
    assert_eq!(report.applied, 3);
    let exists = spec(json!({
        "headers": {"X-Source-System": "kingdee", "X-Tenant": "t-001"},
        "id_check": {"mode": "exists", "path": format!("/api/{COLLECTION}/{{key}}"), "on_exists": "update"},
    }));
    let report = target(&exists, &url).write(&records(4, NEW)).await.unwrap();
    assert_eq!(
        (report.applied, report.stale),
        (1, 3),
        "checks carry them too"
    );
    assert_eq!(sim.stats.missing_headers.load(Relaxed), 0);

    let without = spec(json!({"headers": {"X-Source-System": "kingdee"}}));
    let result = target(&without, &url).write(&records(1, NEW)).await;
    assert!(
        matches!(result, Err(WriteError::Permanent(ref m)) if m.contains("x-tenant")),
        "{result:?}"
    );
    assert_eq!(sim.stats.missing_headers.load(Relaxed), 1);
}

#[tokio::test]
async fn tokens_are_renewed_before_they_expire() {
    // Tokens live 2 s; the target renews a token a quarter of its life before it expires.
    let (sim, url) = sim(TargetConfig {
        client: Some(("conveyor".into(), "s3cret-value".into())),
        token_ttl: Duration::from_secs(2),
        ..TargetConfig::default()
    })
    .await;
    let spec = spec(json!({"auth": {"kind": "token_endpoint", "path": "/oauth/token"}}));
    let args = HttpArgs {
        http_target_url: Some(url.clone()),
        http_target_client_id: Some("conveyor".into()),
        http_target_client_secret: Some(Secret::new("s3cret-value")),
        http_target_allow_plain_http: true,
        ..HttpArgs::default()
    };
    let target = HttpTarget::new(&spec, "modified", &args).unwrap();
    let started = Instant::now();
    target.write(&records(2, NEW)).await.unwrap();
    target.write(&records(2, NEW)).await.unwrap();
    assert_eq!(sim.stats.tokens_issued.load(Relaxed), 1, "cached");
    // 1.6 s on: the first token is still valid for 0.4 s, but inside its margin.
    tokio::time::sleep(Duration::from_millis(1600).saturating_sub(started.elapsed())).await;
    target.write(&records(2, NEW)).await.unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "too slow to tell"
    );
    assert_eq!(
        sim.stats.tokens_issued.load(Relaxed),
        2,
        "renewed before it expired"
    );
    assert_eq!(
        sim.stats.unauthorized.load(Relaxed),
        0,
        "no call met an expired token"
    );
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
