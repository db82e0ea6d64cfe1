//! The gateway client against the strict simulator, over real HTTP: signatures, tokens that expire, a
//! rotating secret, a tenant that moves, injected faults, and pages checked against their counts.

use std::sync::Arc;
use std::time::Duration;

use conveyor_core::metrics::Metrics;
use conveyor_core::settings::Secret;
use conveyor_kingdee::{Credentials, Gateway, ListData, Page, Unlimited};
use kingdee_sim::gate::{
    DEMO_CLIENT_ID, DEMO_CLIENT_SECRET, DEMO_OUTER_INSTANCE_ID, Faults, GatewayConfig,
};
use kingdee_sim::{Object, SimConfig, Simulator};
use serde_json::value::RawValue;

/// The demo account's credentials for a gateway at `addr`, signing with `secret`.
fn credentials(addr: std::net::SocketAddr, secret: &str) -> Credentials {
    Credentials {
        base_url: format!("http://{addr}"),
        client_id: DEMO_CLIENT_ID.into(),
        client_secret: Secret::new(secret),
        outer_instance_id: DEMO_OUTER_INSTANCE_ID.into(),
        account: None,
        ca: None,
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
    Page::from_list(data, number, size).unwrap()
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
        assert_eq!((page.count, page.total_page), (250, 3));
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
        match Page::from_list(list(&data), 1, 100) {
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
    let err = Page::from_list(list(&data), 1, 500).unwrap_err();
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
        let page = Page::from_list(list(&data), 1, 100).unwrap();
        assert_eq!(page.count as usize, sim.truth(object).len(), "{path}");
    }
}
