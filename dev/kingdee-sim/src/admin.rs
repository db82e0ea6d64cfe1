//! The admin endpoints a test or the demo drives: truth, stats, the tenant's domain, change rates,
//! tokens, paging changes, call arrivals.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::gate::StatsSnapshot;
use crate::{ChangeRates, Object, PagingChange, Simulator};

pub(crate) async fn truth(
    State(sim): State<Arc<Simulator>>,
    Path(object): Path<String>,
) -> Response {
    match Object::from_name(&object) {
        Some(object) => Json(json!({"records": sim.truth(object)})).into_response(),
        None => (
            StatusCode::NOT_FOUND,
            format!("unknown object {object:?}\n"),
        )
            .into_response(),
    }
}

pub(crate) async fn stats(State(sim): State<Arc<Simulator>>) -> Json<StatsSnapshot> {
    Json(sim.stats())
}

#[derive(Deserialize)]
pub(crate) struct MoveTenant {
    pub(crate) domain: String,
}

pub(crate) async fn move_tenant(
    State(sim): State<Arc<Simulator>>,
    Json(body): Json<MoveTenant>,
) -> StatusCode {
    sim.move_tenant(&body.domain);
    StatusCode::NO_CONTENT
}

pub(crate) async fn set_changes(
    State(sim): State<Arc<Simulator>>,
    Json(rates): Json<ChangeRates>,
) -> StatusCode {
    sim.set_changes(rates);
    StatusCode::NO_CONTENT
}

#[derive(Deserialize)]
pub(crate) struct RateLimit {
    pub(crate) calls_per_minute: u32,
}

pub(crate) async fn set_rate_limit(
    State(sim): State<Arc<Simulator>>,
    Json(limit): Json<RateLimit>,
) -> StatusCode {
    sim.set_rate_limit(limit.calls_per_minute);
    StatusCode::NO_CONTENT
}

pub(crate) async fn revoke_tokens(State(sim): State<Arc<Simulator>>) -> StatusCode {
    sim.revoke_tokens();
    StatusCode::NO_CONTENT
}

pub(crate) async fn expire_tokens(State(sim): State<Arc<Simulator>>) -> StatusCode {
    sim.expire_tokens();
    StatusCode::NO_CONTENT
}

pub(crate) async fn arm_paging_change(
    State(sim): State<Arc<Simulator>>,
    Json(change): Json<PagingChange>,
) -> StatusCode {
    sim.arm_paging_change(change);
    StatusCode::NO_CONTENT
}

/// The admitted calls' arrival times, milliseconds since the simulator started.
pub(crate) async fn arrivals(State(sim): State<Arc<Simulator>>) -> Json<Value> {
    let millis: Vec<f64> = sim
        .call_arrivals()
        .iter()
        .map(|at| at.as_secs_f64() * 1000.0)
        .collect();
    Json(json!({ "millis": millis }))
}
