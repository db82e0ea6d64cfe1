//! The gateway client against the strict simulator, over real HTTP: signatures, tokens that expire, a
//! rotating secret, a tenant that moves, injected faults, and pages checked against their counts.

use std::sync::Arc;
use std::time::Duration;

use conveyor_base::Secret;
use conveyor_base::metrics::Metrics;
use conveyor_base::source::{Page, Unlimited};
use conveyor_kingdee::{Credentials, Gateway, ListData};
use kingdee_sim::gate::{
    DEMO_CLIENT_ID, DEMO_CLIENT_SECRET, Faults, GatewayConfig, demo_credentials,
};
use kingdee_sim::{Object, SimConfig, Simulator};
use serde_json::value::RawValue;

/// A list answer read as a page and checked against its counts, as the sync engine does.
fn checked(data: ListData, number: u64, size: u64) -> Result<Page, String> {
    let page = data.into_page()?;
    page.check(number, size)?;
    Ok(page)
}

/// The demo account's credentials for a gateway at `addr`, signing with `secret`.
fn credentials(addr: std::net::SocketAddr, secret: &str) -> Credentials {
    Credentials {
        client_secret: Secret::new(secret),
        ..demo_credentials(addr)
    }
}

async fn start(config: SimConfig) -> (Arc<Simulator>, Gateway<Unlimited>) {
    let sim = Simulator::new(config);
    let addr = kingdee_sim::spawn(sim.clone(), ([127, 0, 0, 1], 0).into())
        .await
        .unwrap();
    let credentials = credentials(addr, DEMO_CLIENT_SECRET);
    (
        sim,
        Gateway::new(credentials, Unlimited, Metrics::new(), "test"),
    )
}

fn query(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

/// Raw JSON (as the gateway client can hand it out) as a tree, to look inside.
fn tree(raw: &RawValue) -> serde_json::Value {
    serde_json::from_str(raw.get()).unwrap()
}

/// Raw JSON read as a list's data, as the fetcher has the gateway read it.
fn list(raw: &RawValue) -> ListData {
    serde_json::from_str(raw.get()).unwrap()
}

async fn page(gateway: &Gateway<Unlimited>, number: u64, size: u64) -> Page {
    let data = gateway
        .get::<ListData>(
            "/jdy/v2/scm/sal_order",
            &query(&[
                ("page", &number.to_string()),
                ("page_size", &size.to_string()),
            ]),
        )
        .await
        .unwrap();
    checked(data, number, size).unwrap()
}

#[tokio::test]
async fn pages_through_every_order_with_signed_calls() {
    let (sim, gateway) = start(SimConfig {
        orders: 250,
        ..SimConfig::default()
    })
    .await;
    let mut ids = Vec::new();
    for number in 1..=3 {
        let page = page(&gateway, number, 100).await;
        assert_eq!((page.count, page.total_pages), (250, 3));
        ids.extend(
            page.rows
                .iter()
                .map(|row| tree(row)["id"].as_str().unwrap().to_owned()),
        );
    }
    let truth: Vec<String> = sim
        .truth(Object::SalesOrder)
        .into_iter()
        .map(|r| r.id)
        .collect();
    assert_eq!(ids, truth);
    let stats = sim.stats();
    assert_eq!(stats.rejected_signature, 0);
    assert_eq!(
        (stats.authorizations, stats.tokens_issued),
        (1, 1),
        "one token serves every call"
    );
}

#[tokio::test]
async fn chinese_text_and_special_characters_sign_like_the_sdk() {
    let (sim, gateway) = start(SimConfig {
        orders: 5,
        ..SimConfig::default()
    })
    .await;
    for value in ["客户 A", "a*b~c", "x=y/z+1", "'!()"] {
        let data = gateway
            .get::<Box<RawValue>>(
                "/jdy/v2/scm/sal_order",
                &query(&[("page", "1"), ("page_size", "10"), ("bill_status", value)]),
            )
            .await
            .unwrap_or_else(|err| panic!("{value:?}: {err}"));
        assert_eq!(tree(&data)["count"], 0, "nothing has status {value:?}");
    }
    assert_eq!(sim.stats().rejected_signature, 0);
}

#[tokio::test]
async fn expired_tokens_and_rotated_secrets_are_survived() {
    let (sim, gateway) = start(SimConfig {
        orders: 30,
        gateway: GatewayConfig {
            token_lifetime: Duration::from_millis(400),
            secret_rotation: Some(Duration::from_millis(700)),
            ..GatewayConfig::default()
        },
        ..SimConfig::default()
    })
    .await;
    for _ in 0..12 {
        assert_eq!(page(&gateway, 1, 10).await.count, 30);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let stats = sim.stats();
    assert!(stats.tokens_issued >= 3, "{stats:?}");
    assert!(
        stats.stale_secret >= 1 && stats.authorizations >= 2,
        "re-authorized after rotation: {stats:?}"
    );
    assert_eq!(stats.rejected_signature, 0);
}

#[tokio::test]
async fn a_tenant_that_moved_is_found_again() {
    let (sim, gateway) = start(SimConfig {
        orders: 30,
        ..SimConfig::default()
    })
    .await;
    assert_eq!(page(&gateway, 1, 10).await.count, 30);
    sim.move_tenant("https://moved.jdy.com");
    assert_eq!(page(&gateway, 1, 10).await.count, 30);
    let stats = sim.stats();
    assert_eq!(
        (stats.wrong_domain, stats.authorizations),
        (1, 2),
        "{stats:?}"
    );
}

#[tokio::test]
async fn faults_are_retried_until_the_answer_is_whole() {
    let (sim, gateway) = start(SimConfig {
        orders: 120,
        gateway: GatewayConfig {
            faults: Faults {
                server_error: 0.1,
                dropped_connection: 0.1,
                truncated_body: 0.1,
                slow: 0.1,
                slow_delay: Duration::from_millis(50),
                ..Faults::default()
            },
            ..GatewayConfig::default()
        },
        ..SimConfig::default()
    })
    .await;
    for _ in 0..10 {
        assert_eq!(page(&gateway, 2, 100).await.rows.len(), 20);
    }
    assert!(sim.stats().injected_faults > 0);
}

#[tokio::test]
async fn empty_pages_are_caught_and_string_counts_accepted() {
    let (sim, gateway) = start(SimConfig {
        orders: 150,
        count_always_string: true,
        gateway: GatewayConfig {
            faults: Faults {
                empty_page: 0.5,
                ..Faults::default()
            },
            ..GatewayConfig::default()
        },
        ..SimConfig::default()
    })
    .await;
    let mut whole = 0;
    let mut caught = 0;
    for _ in 0..10 {
        let data = gateway
            .get::<Box<RawValue>>(
                "/jdy/v2/scm/sal_order",
                &query(&[("page", "1"), ("page_size", "100")]),
            )
            .await
            .unwrap();
        assert!(tree(&data)["count"].is_string());
        match checked(list(&data), 1, 100) {
            Ok(page) => {
                assert_eq!(page.rows.len(), 100);
                whole += 1;
            }
            Err(problem) => {
                assert!(problem.contains("0 rows but count 150"), "{problem}");
                caught += 1;
            }
        }
    }
    assert_eq!(whole + caught, 10);
    assert!(sim.stats().injected_faults as usize >= caught);
}

#[tokio::test]
async fn a_page_size_above_the_cap_is_caught_by_the_count_check() {
    let (_sim, gateway) = start(SimConfig {
        orders: 250,
        total_page_from_requested_size: true,
        ..SimConfig::default()
    })
    .await;
    let data = gateway
        .get::<Box<RawValue>>(
            "/jdy/v2/scm/sal_order",
            &query(&[("page", "1"), ("page_size", "500")]),
        )
        .await
        .unwrap();
    let err = checked(list(&data), 1, 500).unwrap_err();
    assert!(err.contains("rows but count"), "{err}");
}

#[tokio::test]
async fn wrong_credentials_fail_with_the_gateway_reason() {
    let sim = Simulator::new(SimConfig {
        orders: 1,
        ..SimConfig::default()
    });
    let addr = kingdee_sim::spawn(sim.clone(), ([127, 0, 0, 1], 0).into())
        .await
        .unwrap();
    let credentials = credentials(addr, "not-the-secret");
    let gateway = Gateway::new(credentials, Unlimited, Metrics::new(), "test");
    let err = gateway.check_token().await.unwrap_err();
    assert!(err.to_string().contains("4008"), "{err}");
}

/// A gateway that cannot be reached: the error gives the reason, never the URL, whose query carries
/// the app key and the signature that opens the account.
#[tokio::test(start_paused = true)]
async fn an_unreachable_gateway_fails_without_showing_the_signed_url() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = closed.local_addr().unwrap();
    drop(closed);
    let credentials = credentials(addr, DEMO_CLIENT_SECRET);
    let gateway = Gateway::new(credentials, Unlimited, Metrics::new(), "test");
    let err = gateway.check_token().await.unwrap_err().to_string();
    assert!(err.contains("request failed"), "{err}");
    for revealing in ["app_signature", "app_key", "client_id", "?", DEMO_CLIENT_ID] {
        assert!(!err.contains(revealing), "{revealing} shown in: {err}");
    }
}

#[tokio::test]
async fn base_data_lists_write_count_as_a_string() {
    let (sim, gateway) = start(SimConfig {
        orders: 200,
        ..SimConfig::default()
    })
    .await;
    for (path, object) in [
        ("/jdy/v2/bd/customer", Object::Customer),
        ("/jdy/v2/bd/material", Object::Material),
    ] {
        let data = gateway
            .get::<Box<RawValue>>(path, &query(&[("page", "1"), ("page_size", "100")]))
            .await
            .unwrap();
        let count = &tree(&data)["count"];
        assert!(count.is_string(), "{path}: {count}");
        let page = checked(list(&data), 1, 100).unwrap();
        assert_eq!(page.count as usize, sim.truth(object).len(), "{path}");
    }
}

/// Runs `calls` page calls at once on one gateway; every one must succeed.
async fn concurrent_pages(gateway: &Arc<Gateway<Unlimited>>, calls: usize) {
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..calls {
        let gateway = gateway.clone();
        tasks.spawn(async move { page(&gateway, 1, 10).await.count });
    }
    while let Some(count) = tasks.join_next().await {
        assert!(count.unwrap() > 0);
    }
}

/// However many tasks need a token at once — none yet, or one the gateway stopped accepting — one of
/// them fetches it and the others wait for it: one token call each time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_calls_share_one_token_fetch() {
    let (sim, gateway) = start(SimConfig {
        orders: 30,
        ..SimConfig::default()
    })
    .await;
    let gateway = Arc::new(gateway);
    concurrent_pages(&gateway, 16).await;
    let stats = sim.stats();
    assert_eq!(
        (stats.authorizations, stats.tokens_issued),
        (1, 1),
        "no token at first: {stats:?}"
    );

    // Tokens the client still thinks valid, refused as expired (4011), then as unknown (4010).
    sim.expire_tokens();
    concurrent_pages(&gateway, 16).await;
    let expired = sim.stats();
    assert_eq!(expired.tokens_issued, 2, "{expired:?}");
    assert!(expired.rejected_token >= 1, "{expired:?}");
    sim.revoke_tokens();
    concurrent_pages(&gateway, 16).await;
    let revoked = sim.stats();
    assert_eq!(revoked.tokens_issued, 3, "{revoked:?}");
    assert!(
        revoked.rejected_token > expired.rejected_token,
        "{revoked:?}"
    );
    assert_eq!(revoked.authorizations, 1, "the authorization stayed good");
    assert_eq!(revoked.rejected_signature, 0);
}

/// A token past 80% of its life is refreshed before the gateway refuses it, once for all the tasks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_near_its_expiry_is_refreshed_once_for_concurrent_calls() {
    let (sim, gateway) = start(SimConfig {
        orders: 30,
        gateway: GatewayConfig {
            token_lifetime: Duration::from_millis(1_500),
            ..GatewayConfig::default()
        },
        ..SimConfig::default()
    })
    .await;
    let gateway = Arc::new(gateway);
    concurrent_pages(&gateway, 8).await;
    tokio::time::sleep(Duration::from_millis(1_300)).await;
    concurrent_pages(&gateway, 16).await;
    let stats = sim.stats();
    assert_eq!(stats.tokens_issued, 2, "{stats:?}");
    assert_eq!(
        stats.rejected_token, 0,
        "refreshed before it expired: {stats:?}"
    );
}

/// With no budget of its own, a client that calls faster than the gateway allows meets 429s, backs
/// off and still gets every answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_over_the_gateway_limit_are_throttled_and_retried() {
    let (sim, gateway) = start(SimConfig {
        orders: 30,
        gateway: GatewayConfig {
            // 10 calls in any second.
            calls_per_minute: 600,
            rate_window: Duration::from_secs(1),
            ..GatewayConfig::default()
        },
        ..SimConfig::default()
    })
    .await;
    let gateway = Arc::new(gateway);
    concurrent_pages(&gateway, 30).await;
    let stats = sim.stats();
    assert!(stats.rate_limited > 0, "{stats:?}");
    assert!(
        sim.most_calls_within(Duration::from_millis(999)) <= 10,
        "the limit held: {stats:?}"
    );
}

/// Credentials naming an account set.
fn credentials_for(addr: std::net::SocketAddr, account: Option<&str>) -> Credentials {
    Credentials {
        account: account.map(str::to_owned),
        ..credentials(addr, DEMO_CLIENT_SECRET)
    }
}

/// A tenant with three active account sets (and an inactive one).
async fn tenant_with_several_account_sets() -> (Arc<Simulator>, std::net::SocketAddr) {
    let sim = Simulator::new(SimConfig {
        orders: 10,
        gateway: GatewayConfig {
            other_accounts: vec!["华东账套".into(), "华南账套".into()],
            ..GatewayConfig::default()
        },
        ..SimConfig::default()
    });
    let addr = kingdee_sim::spawn(sim.clone(), ([127, 0, 0, 1], 0).into())
        .await
        .unwrap();
    (sim, addr)
}

#[tokio::test]
async fn the_named_account_set_is_used_among_several_active_ones() {
    let (sim, addr) = tenant_with_several_account_sets().await;
    let gateway = Gateway::new(
        credentials_for(addr, Some("华南账套")),
        Unlimited,
        Metrics::new(),
        "test",
    );
    let report = gateway.check_token().await.unwrap();
    assert_eq!(report.account_name, "华南账套");
    assert_eq!(page_of(&gateway).await, 10);
    assert_eq!(sim.token_accounts(), ["华南账套"]);
    assert_eq!(
        sim.stats().stale_secret,
        0,
        "its own app_secret signed the token call"
    );
}

#[tokio::test]
async fn an_account_set_that_is_not_active_fails_with_the_choices() {
    let (sim, addr) = tenant_with_several_account_sets().await;
    for (wanted, says) in [
        (
            Some("西北账套"),
            "\"西北账套\" named by CONVEYOR_KINGDEE_ACCOUNT is not among",
        ),
        (
            Some("归档账套"),
            "\"归档账套\" named by CONVEYOR_KINGDEE_ACCOUNT is inactive",
        ),
        (None, "3 active account sets"),
    ] {
        let gateway = Gateway::new(
            credentials_for(addr, wanted),
            Unlimited,
            Metrics::new(),
            "test",
        );
        let err = gateway.check_token().await.unwrap_err();
        assert!(
            matches!(err, conveyor_kingdee::GatewayError::Permanent(_)),
            "{err:?}"
        );
        let err = err.to_string();
        assert!(err.contains(says), "{err}");
        assert!(
            err.contains(&format!("\"{}\"", kingdee_sim::gate::DEMO_ACCOUNT))
                && err.contains("\"华东账套\"")
                && err.contains("\"华南账套\""),
            "lists the active ones: {err}"
        );
        // The same error from a business call, which a fetcher makes.
        let err = gateway
            .get::<ListData>("/jdy/v2/scm/sal_order", &query(&[("page", "1")]))
            .await
            .unwrap_err();
        assert!(err.to_string().contains(says), "{err}");
    }
    assert!(sim.token_accounts().is_empty());
}

async fn page_of<B: conveyor_base::source::RateBudget>(gateway: &Gateway<B>) -> u64 {
    let data = gateway
        .get::<ListData>(
            "/jdy/v2/scm/sal_order",
            &query(&[("page", "1"), ("page_size", "100")]),
        )
        .await
        .unwrap();
    checked(data, 1, 100).unwrap().count
}

/// The simulator's paging changes make the hazard real: a client that pages naively through a query
/// while a row moves between two of its pages misses a row that never changed. (The fetcher's own
/// answer to each case is proven in tests/kingdee_sync.rs.)
#[tokio::test]
async fn a_row_moved_between_pages_makes_naive_paging_skip_one() {
    use kingdee_sim::{PagingChange, PagingChangeKind};
    for (kind, count_after) in [
        (PagingChangeKind::Leave, 249),
        (PagingChangeKind::MoveToEnd, 250),
        (PagingChangeKind::LeaveAndEnter, 250),
    ] {
        let (sim, gateway) = start(SimConfig {
            orders: 250,
            ..SimConfig::default()
        })
        .await;
        // A window that holds every order and ends in the past (the data is from 2025-01).
        let window = [
            ("modify_start_time", "1700000000000"),
            ("modify_end_time", "1750000000000"),
        ];
        let before: Vec<String> = sim
            .truth(Object::SalesOrder)
            .into_iter()
            .map(|r| r.id)
            .collect();
        sim.arm_paging_change(PagingChange {
            after_page: 1,
            kind,
        });
        let mut read = Vec::new();
        let mut counts = Vec::new();
        for number in 1..=3u64 {
            let mut pairs = query(&window);
            pairs.extend(query(&[
                ("page", &number.to_string()),
                ("page_size", "100"),
            ]));
            let data = gateway
                .get::<ListData>("/jdy/v2/scm/sal_order", &pairs)
                .await
                .unwrap();
            let page = checked(data, number, 100).unwrap();
            counts.push(page.count);
            read.extend(
                page.rows
                    .iter()
                    .map(|row| tree(row)["id"].as_str().unwrap().to_owned()),
            );
        }
        assert_eq!(sim.stats().paging_changes, 1, "{kind:?}");
        assert_eq!(counts, [250, count_after, count_after], "{kind:?}");
        // The first row of page 2 slid onto page 1, already read: never seen, though it never changed.
        let skipped = &before[100];
        assert!(!read.contains(skipped), "{kind:?}: {skipped} was read");
        let truth = sim.truth(Object::SalesOrder);
        let unchanged = truth.iter().find(|r| &r.id == skipped).unwrap();
        assert!(unchanged.modify_time.starts_with("2025-"), "{kind:?}");
    }
}

/// Throttling is waited out, not counted as a failed try: told by `Retry-After` how long to wait, a
/// call over the limit meets one 429 and is admitted after it, where backing off by its own guess
/// would meet several.
#[tokio::test]
async fn a_throttled_call_waits_as_long_as_the_gateway_says() {
    let sim = Simulator::new(SimConfig {
        orders: 10,
        gateway: GatewayConfig {
            // Two calls in any second.
            calls_per_minute: 120,
            rate_window: Duration::from_secs(1),
            retry_after: true,
            ..GatewayConfig::default()
        },
        ..SimConfig::default()
    });
    let addr = kingdee_sim::spawn(sim.clone(), ([127, 0, 0, 1], 0).into())
        .await
        .unwrap();
    let metrics = Metrics::new();
    let gateway = Gateway::new(
        demo_credentials(addr),
        Unlimited,
        metrics.clone(),
        "throttled",
    );
    for _ in 0..10 {
        assert_eq!(page_of(&gateway).await, 10);
    }
    let stats = sim.stats();
    // 12 calls (the two of the auth flow, then ten lists) at two a second: each 429 is followed by
    // the two calls its wait made room for.
    assert!(stats.rate_limited >= 4, "the limit was met: {stats:?}");
    assert!(
        stats.rate_limited <= 6,
        "one 429 per wait, not a burst of them: {stats:?}"
    );
    assert_eq!(
        metrics
            .source_throttled
            .with_label_values(&["throttled"])
            .get(),
        stats.rate_limited
    );
}

/// The limit falls below what the client calls at, as when another client of the app starts: ten
/// calls at once share one call a second, so the last of them is throttled about nine times — more
/// than a call's eight tries — and still succeeds.
#[tokio::test]
async fn throttling_does_not_use_up_the_tries() {
    let (sim, gateway) = start(SimConfig {
        orders: 10,
        gateway: GatewayConfig {
            calls_per_minute: 600,
            rate_window: Duration::from_secs(1),
            retry_after: true,
            ..GatewayConfig::default()
        },
        ..SimConfig::default()
    })
    .await;
    assert_eq!(page_of(&gateway).await, 10);
    sim.set_rate_limit(60);
    let gateway = Arc::new(gateway);
    let calls: Vec<_> = (0..10)
        .map(|_| {
            let gateway = gateway.clone();
            tokio::spawn(async move { page_of(&gateway).await })
        })
        .collect();
    for call in calls {
        assert_eq!(call.await.unwrap(), 10);
    }
    assert!(
        sim.stats().rate_limited >= 30,
        "every waiting call was throttled each second: {:?}",
        sim.stats()
    );
}
