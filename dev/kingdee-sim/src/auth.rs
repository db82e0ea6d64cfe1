//! The auth flow's two endpoints: push_app_authorize and kingdee_auth_token.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::Simulator;
use crate::error::{business_error, query_value};
use crate::gate::bump;

pub(crate) async fn authorize(
    State(sim): State<Arc<Simulator>>,
    headers: HeaderMap,
    Query(query): Query<Vec<(String, String)>>,
) -> Response {
    if let Err(rejection) = sim.admit("POST", gateway_path::AUTHORIZE, &headers, &query, false) {
        return rejection.into_response();
    }
    let config = &sim.config.gateway;
    if query_value(&query, "outerInstanceId") != Some(config.outer_instance_id.as_str()) {
        return Json(
            json!({"code": 1_030_002_003, "msg": "outerInstanceId does not exist", "data": []}),
        )
        .into_response();
    }
    bump(&sim.stats.authorizations);
    let mut gate = sim.gate.lock().expect("gate lock");
    let account = |name: &str, id: &str, status: u8, key: &str, secret: &str, domain: &str| {
        json!({
            "appKey": key, "appSecret": secret, "domain": domain, "accountId": id, "accountName": name,
            "groupName": "演示集团", "status": status, "outerInstanceId": config.outer_instance_id,
            "clientId": config.client_id, "serviceId": "1001",
            "instanceExpiresTime": 4_102_416_000_000_i64,
        })
    };
    let mut sets = vec![account(
        "归档账套",
        "1760000000000000002",
        0,
        "SimKey02",
        "0000000000000000000000000000000000000000",
        &gate.domain,
    )];
    for index in 0..gate.accounts.len() {
        let secret = gate.app_secret(config, index);
        let set = &gate.accounts[index];
        sets.push(account(
            &set.name,
            &set.id,
            1,
            &set.app_key,
            &secret,
            &gate.domain,
        ));
    }
    Json(json!({"code": 200, "msg": "success", "data": sets})).into_response()
}

pub(crate) async fn token(
    State(sim): State<Arc<Simulator>>,
    headers: HeaderMap,
    Query(query): Query<Vec<(String, String)>>,
) -> Response {
    if let Err(rejection) = sim.admit("GET", gateway_path::TOKEN, &headers, &query, false) {
        return rejection.into_response();
    }
    let config = &sim.config.gateway;
    let mut gate = sim.gate.lock().expect("gate lock");
    let account = gate
        .accounts
        .iter()
        .position(|set| query_value(&query, "app_key") == Some(set.app_key.as_str()));
    let signed_right = account.is_some_and(|index| {
        let app_secret = gate.app_secret(config, index);
        let expected =
            conveyor_kingdee::sign::app_signature(&gate.accounts[index].app_key, &app_secret);
        query_value(&query, "app_signature") == Some(expected.as_str())
    });
    let Some(account) = account.filter(|_| signed_right) else {
        bump(&sim.stats.stale_secret);
        return business_error(1_030_002_006, "授权密钥校验失败".into()).into_response();
    };
    let (token, expires) = gate.issue_token(config.token_lifetime, account);
    bump(&sim.stats.tokens_issued);
    Json(json!({
        "errcode": 0,
        "description": "success",
        "data": {"app-token": token, "access_token": "0123456789abcdef0123456789abcdef", "expires": expires.timestamp_millis(), "uid": 1},
    }))
    .into_response()
}

/// The auth flow's paths, as the client calls them.
pub(crate) mod gateway_path {
    pub const AUTHORIZE: &str = conveyor_kingdee::gateway::AUTHORIZE_PATH;
    pub const TOKEN: &str = conveyor_kingdee::gateway::TOKEN_PATH;
}
