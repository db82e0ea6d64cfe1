//! The simulator's endpoints, called through its router.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::StatusCode;
use serde_json::Value;

use super::*;
use crate::data::LOCAL_TIME_FORMAT;
use crate::paging::{Paging, Window};
use axum::body::to_bytes;
use axum::http::Request;
use tower::ServiceExt;

async fn call(sim: &Arc<Simulator>, request: Request<Body>) -> (StatusCode, Value) {
    let response = sim.router().oneshot(request).await.unwrap();
    let status = response.status();
    let body = to_bytes(response.into_body(), usize::MAX).await.unwrap();
    (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
}

#[tokio::test]
async fn unsigned_and_badly_signed_calls_are_rejected_like_the_gateway() {
    let sim = Simulator::new(SimConfig {
        orders: 10,
        ..SimConfig::default()
    });
    let unsigned = Request::get("/jdy/v2/scm/sal_order")
        .body(Body::empty())
        .unwrap();
    let (status, body) = call(&sim, unsigned).await;
    assert_eq!(status.as_u16(), 519);
    assert_eq!(body["code"], 4003);

    let now = chrono::Utc::now().timestamp_millis().to_string();
    let forged = Request::get("/jdy/v2/scm/sal_order?page=1")
        .header("X-Api-ClientID", gate::DEMO_CLIENT_ID)
        .header("X-Api-SignHeaders", "X-Api-TimeStamp,X-Api-Nonce")
        .header("X-Api-TimeStamp", &now)
        .header("X-Api-Nonce", "1234567890")
        .header("X-Api-Signature", "Zm9yZ2Vk")
        .body(Body::empty())
        .unwrap();
    let (status, body) = call(&sim, forged).await;
    assert_eq!(status.as_u16(), 519);
    assert_eq!(body["code"], 4008);

    let stale = Request::get("/jdy/v2/scm/sal_order")
        .header("X-Api-ClientID", gate::DEMO_CLIENT_ID)
        .header("X-Api-SignHeaders", "X-Api-TimeStamp,X-Api-Nonce")
        .header("X-Api-TimeStamp", "1600000000000")
        .body(Body::empty())
        .unwrap();
    let (_, body) = call(&sim, stale).await;
    assert_eq!(body["code"], 4006);
    let stats = sim.stats();
    assert_eq!(
        (
            stats.rejected_client,
            stats.rejected_signature,
            stats.rejected_timestamp
        ),
        (1, 1, 1)
    );
}

#[test]
fn poison_spoils_every_nth_order() {
    let sim = Simulator::new(SimConfig {
        orders: 100,
        poison_every: 10,
        ..SimConfig::default()
    });
    let poisoned = sim.poisoned_orders();
    assert_eq!(poisoned.len(), 10);
    assert_eq!(poisoned[0], sim.truth(Object::SalesOrder)[9].id);
}

#[test]
fn a_cached_selection_is_not_served_after_the_data_changed() {
    let sim = Simulator::new(SimConfig {
        orders: 50,
        ..SimConfig::default()
    });
    let now = now_local();
    let window = Window {
        start: Some(
            (now - chrono::Duration::minutes(1))
                .format(LOCAL_TIME_FORMAT)
                .to_string(),
        ),
        end: Some(
            (now + chrono::Duration::minutes(1))
                .format(LOCAL_TIME_FORMAT)
                .to_string(),
        ),
    };
    let select = || {
        let data = sim.data.read().unwrap();
        sim.select_orders(&data, &window, None).len()
    };
    assert_eq!(select(), 0, "the generated orders are from 2025");
    assert_eq!(select(), 0, "served from the cache");
    sim.set_changes(ChangeRates {
        modify_per_sec: 5.0,
        create_per_sec: 0.0,
    });
    sim.apply_changes(Duration::from_secs(1), &mut (0.0, 0.0));
    assert!(select() >= 1, "orders modified just now are in the window");
}

#[test]
fn changes_modify_and_create_orders() {
    let sim = Simulator::new(SimConfig {
        orders: 50,
        ..SimConfig::default()
    });
    sim.set_changes(ChangeRates {
        modify_per_sec: 10.0,
        create_per_sec: 4.0,
    });
    let mut carry = (0.0, 0.0);
    sim.apply_changes(Duration::from_secs(1), &mut carry);
    let stats = sim.stats();
    assert_eq!((stats.orders_modified, stats.orders_created), (10, 4));
    let truth = sim.truth(Object::SalesOrder);
    assert_eq!(truth.len(), 54);
    let today = now_local().format("%Y-%m-%d").to_string();
    assert!(
        truth
            .iter()
            .filter(|r| r.modify_time.starts_with(&today))
            .count()
            >= 4
    );
}

/// The rows of sales orders in `window`, paged by 10, as a client would read them in one pass.
fn ids_in(sim: &Simulator, window: &Window) -> Vec<String> {
    let data = sim.data.read().unwrap();
    sim.select_orders(&data, window, None)
        .iter()
        .map(|&index| data.orders()[index].id.clone())
        .collect()
}

#[test]
fn a_paging_change_moves_the_first_row_of_the_page_just_served() {
    let window = Window {
        start: None,
        end: Some("2025-06-01 00:00:00".into()),
    };
    let paging = Paging {
        page: 2,
        requested_size: 10,
        size: 10,
    };
    for (kind, count) in [
        (PagingChangeKind::Leave, 29),
        (PagingChangeKind::MoveToEnd, 30),
        (PagingChangeKind::LeaveAndEnter, 30),
    ] {
        let sim = Simulator::new(SimConfig {
            orders: 30,
            ..SimConfig::default()
        });
        let before = ids_in(&sim, &window);
        sim.arm_paging_change(PagingChange {
            after_page: 2,
            kind,
        });
        // Not after page 1, and not after the last page: nothing to shift.
        sim.change_between_pages(&window, &Paging { page: 1, ..paging }, 3, &before[0]);
        sim.change_between_pages(&window, &Paging { page: 3, ..paging }, 3, &before[20]);
        assert_eq!(sim.stats().paging_changes, 0);
        sim.change_between_pages(&window, &paging, 3, &before[10]);
        assert_eq!(sim.stats().paging_changes, 1);
        let after = ids_in(&sim, &window);
        assert_eq!(after.len(), count, "{kind:?}");
        // The first row of page 3 slid onto page 2.
        assert_eq!(after[19], before[20], "{kind:?}");
        assert!(!after[..20].contains(&before[10]), "{kind:?}");
        if kind == PagingChangeKind::MoveToEnd {
            assert_eq!(after.last(), Some(&before[10]), "listed again, last");
        }
        let truth = sim.truth(Object::SalesOrder);
        let moved = truth.iter().find(|r| r.id == before[10]).unwrap();
        match kind {
            PagingChangeKind::MoveToEnd => assert_eq!(moved.modify_time, "2025-05-31 23:59:59"),
            _ => assert!(
                moved.modify_time.as_str() > "2025-06-01 00:00:00",
                "{kind:?}"
            ),
        }
    }
}
