//! A simulator of the Kingdee Cloud Xingchen V2 open API (金蝶云星辰 V2), for demos, tests and
//! benchmarks.
//!
//! It serves the list endpoints of sales orders, customers and materials with the real paging rules and
//! response envelope, from a data set generated from a seed. Its ground truth — every record id with its
//! modify time — is on `/admin/truth/{object}`, so that a test can prove the target holds exactly the
//! source.
//!
//! List rows carry the detail fields (`modify_time`, `material_entity`) so that one list call yields
//! complete, versioned records.

pub mod data;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::net::TcpListener;

use crate::data::{Dataset, LOCAL_TIME_FORMAT};

/// The largest page the real gateway serves.
pub const GATEWAY_MAX_PAGE_SIZE: usize = 100;

/// The amount written into spoiled orders.
pub const POISON_AMOUNT: &str = "N/A";

/// How the simulator behaves.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// Seed of the generated data set.
    pub seed: u64,
    /// Number of sales orders.
    pub orders: usize,
    /// Reproduce a reported gateway quirk: a page_size above 100 is served as 100 rows while
    /// `total_page` is computed from the size asked for — which loses rows for a client that trusts it.
    pub total_page_from_requested_size: bool,
    /// Spoil every n-th sales order (0: none) with an amount that is not a number, as bad data entered at
    /// the source would be. Such records can never be written; a pipeline must dead-letter exactly them.
    pub poison_every: usize,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            seed: 42,
            orders: 10_000,
            total_page_from_requested_size: false,
            poison_every: 0,
        }
    }
}

/// The simulator's state.
pub struct Simulator {
    config: SimConfig,
    data: Dataset,
}

/// One record of the ground truth.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TruthRecord {
    pub id: String,
    /// `yyyy-MM-dd HH:mm:ss`, China Standard Time.
    pub modify_time: String,
}

/// The objects the simulator serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Object {
    SalesOrder,
    Customer,
    Material,
}

impl Object {
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "sal_order" => Some(Self::SalesOrder),
            "customer" => Some(Self::Customer),
            "material" => Some(Self::Material),
            _ => None,
        }
    }
}

impl Simulator {
    pub fn new(config: SimConfig) -> Arc<Self> {
        let mut data = Dataset::generate(config.seed, config.orders);
        if config.poison_every > 0 {
            for order in data
                .orders
                .iter_mut()
                .skip(config.poison_every - 1)
                .step_by(config.poison_every)
            {
                order.total_amount = POISON_AMOUNT.to_owned();
            }
        }
        Arc::new(Self { config, data })
    }

    /// The ids of the sales orders spoiled by `poison_every`.
    pub fn poisoned_orders(&self) -> Vec<String> {
        self.data
            .orders
            .iter()
            .filter(|order| order.total_amount == POISON_AMOUNT)
            .map(|order| order.id.clone())
            .collect()
    }

    /// Every record of `object` with its modify time, in the order the list serves them.
    pub fn truth(&self, object: Object) -> Vec<TruthRecord> {
        let record = |id: &String, modify_time: &String| TruthRecord {
            id: id.clone(),
            modify_time: modify_time.clone(),
        };
        match object {
            Object::SalesOrder => self
                .data
                .orders
                .iter()
                .map(|o| record(&o.id, &o.modify_time))
                .collect(),
            Object::Customer => self
                .data
                .customers
                .iter()
                .map(|c| record(&c.id, &c.modify_time))
                .collect(),
            Object::Material => self
                .data
                .materials
                .iter()
                .map(|m| record(&m.id, &m.modify_time))
                .collect(),
        }
    }

    /// Every entry line of every sales order, with its order's modify time (a line changes with its
    /// order): the truth of a pipeline that flattens orders into lines.
    pub fn order_lines_truth(&self) -> Vec<TruthRecord> {
        self.data
            .orders
            .iter()
            .flat_map(|order| {
                order.material_entity.iter().map(|line| TruthRecord {
                    id: line.id.clone(),
                    modify_time: order.modify_time.clone(),
                })
            })
            .collect()
    }

    pub fn router(self: &Arc<Self>) -> Router {
        Router::new()
            .route("/jdy/v2/scm/sal_order", get(list_sales_orders))
            .route("/jdy/v2/bd/customer", get(list_customers))
            .route("/jdy/v2/bd/material", get(list_materials))
            .route("/admin/truth/{object}", get(truth))
            .route("/healthz", get(|| async { "ok\n" }))
            .with_state(self.clone())
    }
}

/// Serves the simulator on `listener` until the task is dropped or the process ends.
pub async fn serve(simulator: Arc<Simulator>, listener: TcpListener) -> std::io::Result<()> {
    axum::serve(listener, simulator.router()).await
}

/// Binds `addr` (port 0 for any) and serves in the background; returns the bound address.
pub async fn spawn(simulator: Arc<Simulator>, addr: SocketAddr) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    tokio::spawn(async move {
        if let Err(err) = serve(simulator, listener).await {
            tracing::error!(error = %err, "simulator stopped");
        }
    });
    Ok(bound)
}

/// The list endpoints' query parameters (all optional, all text as on the wire).
#[derive(Debug, Deserialize)]
struct ListQuery {
    page: Option<String>,
    page_size: Option<String>,
    modify_start_time: Option<String>,
    modify_end_time: Option<String>,
    bill_status: Option<String>,
}

/// A business error the way the API reports one: HTTP 200 with a non-zero errcode.
#[derive(Debug)]
struct BusinessError {
    errcode: u64,
    description: String,
}

fn business_error(errcode: u64, description: String) -> BusinessError {
    BusinessError {
        errcode,
        description,
    }
}

impl IntoResponse for BusinessError {
    fn into_response(self) -> Response {
        Json(json!({"errcode": self.errcode, "description": self.description, "data": null}))
            .into_response()
    }
}

struct Window {
    start: Option<String>,
    end: Option<String>,
}

impl Window {
    /// The modify-time bounds of a query as local time text, which orders like time. Both ends inclusive.
    fn parse(query: &ListQuery) -> Result<Self, BusinessError> {
        let bound = |name: &str, value: &Option<String>| -> Result<Option<String>, BusinessError> {
            let Some(text) = value.as_deref().filter(|text| !text.is_empty()) else {
                return Ok(None);
            };
            let millis: i64 = text.parse().map_err(|_| {
                business_error(1_030_002_006, format!("{name} must be epoch milliseconds"))
            })?;
            let instant = chrono::DateTime::from_timestamp_millis(millis)
                .ok_or_else(|| business_error(1_030_002_006, format!("{name} is out of range")))?;
            let local = instant + chrono::Duration::hours(8);
            Ok(Some(local.format(LOCAL_TIME_FORMAT).to_string()))
        };
        Ok(Self {
            start: bound("modify_start_time", &query.modify_start_time)?,
            end: bound("modify_end_time", &query.modify_end_time)?,
        })
    }

    fn contains(&self, modify_time: &str) -> bool {
        self.start
            .as_deref()
            .is_none_or(|start| modify_time >= start)
            && self.end.as_deref().is_none_or(|end| modify_time <= end)
    }
}

/// Serves one page of `rows` under the gateway's paging rules.
fn page_of<T: Serialize>(
    simulator: &Simulator,
    query: &ListQuery,
    rows: Vec<&T>,
    count_as_string: bool,
) -> Result<Response, BusinessError> {
    let parse =
        |name: &str, value: &Option<String>, default: usize| -> Result<usize, BusinessError> {
            match value.as_deref().filter(|text| !text.is_empty()) {
                None => Ok(default),
                Some(text) => text
                    .parse::<usize>()
                    .ok()
                    .filter(|n| *n >= 1)
                    .ok_or_else(|| {
                        business_error(1_030_002_000, format!("{name} must be a positive integer"))
                    }),
            }
        };
    let page = parse("page", &query.page, 1)?;
    let requested_size = parse("page_size", &query.page_size, 10)?;
    let size = requested_size.min(GATEWAY_MAX_PAGE_SIZE);
    let count = rows.len();
    let paging_size = if simulator.config.total_page_from_requested_size {
        requested_size
    } else {
        size
    };
    let total_page = count.div_ceil(paging_size);
    let start = (page - 1).saturating_mul(size).min(count);
    let end = (start + size).min(count);
    let page_rows = &rows[start..end];
    let count_value = if count_as_string {
        Value::String(count.to_string())
    } else {
        Value::from(count)
    };
    Ok(Json(json!({
        "errcode": 0,
        "description": "success",
        "data": {
            "count": count_value,
            "page": page,
            "page_size": size,
            "total_page": total_page,
            "current_page_size": page_rows.len(),
            "headers": {},
            "rows": page_rows,
        }
    }))
    .into_response())
}

async fn list_sales_orders(
    State(simulator): State<Arc<Simulator>>,
    Query(query): Query<ListQuery>,
) -> Result<Response, BusinessError> {
    let window = Window::parse(&query)?;
    let status = query
        .bill_status
        .as_deref()
        .filter(|status| !status.is_empty());
    let rows = simulator
        .data
        .orders
        .iter()
        .filter(|order| window.contains(&order.modify_time))
        .filter(|order| status.is_none_or(|status| order.bill_status == status))
        .collect();
    page_of(&simulator, &query, rows, false)
}

async fn list_customers(
    State(simulator): State<Arc<Simulator>>,
    Query(query): Query<ListQuery>,
) -> Result<Response, BusinessError> {
    let window = Window::parse(&query)?;
    let rows = simulator
        .data
        .customers
        .iter()
        .filter(|c| window.contains(&c.modify_time))
        .collect();
    page_of(&simulator, &query, rows, true)
}

async fn list_materials(
    State(simulator): State<Arc<Simulator>>,
    Query(query): Query<ListQuery>,
) -> Result<Response, BusinessError> {
    let window = Window::parse(&query)?;
    let rows = simulator
        .data
        .materials
        .iter()
        .filter(|m| window.contains(&m.modify_time))
        .collect();
    page_of(&simulator, &query, rows, true)
}

async fn truth(State(simulator): State<Arc<Simulator>>, Path(object): Path<String>) -> Response {
    match Object::from_name(&object) {
        Some(object) => Json(json!({"records": simulator.truth(object)})).into_response(),
        None => (
            StatusCode::NOT_FOUND,
            format!("unknown object {object:?}\n"),
        )
            .into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::to_bytes;
    use axum::http::Request;
    use tower::ServiceExt;

    async fn get_json(simulator: &Arc<Simulator>, uri: &str) -> Value {
        let response = simulator
            .router()
            .oneshot(Request::get(uri).body(axum::body::Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        serde_json::from_slice(&to_bytes(response.into_body(), usize::MAX).await.unwrap()).unwrap()
    }

    fn simulator(orders: usize, quirk: bool) -> Arc<Simulator> {
        Simulator::new(SimConfig {
            seed: 3,
            orders,
            total_page_from_requested_size: quirk,
            poison_every: 0,
        })
    }

    #[tokio::test]
    async fn pages_cover_every_order_once() {
        let sim = simulator(250, false);
        let mut seen = Vec::new();
        for page in 1..=3 {
            let body = get_json(
                &sim,
                &format!("/jdy/v2/scm/sal_order?page={page}&page_size=100"),
            )
            .await;
            assert_eq!(body["errcode"], 0);
            assert_eq!(body["data"]["count"], 250);
            assert_eq!(body["data"]["total_page"], 3);
            for row in body["data"]["rows"].as_array().unwrap() {
                seen.push(row["id"].as_str().unwrap().to_owned());
            }
        }
        let truth: Vec<String> = sim
            .truth(Object::SalesOrder)
            .into_iter()
            .map(|r| r.id)
            .collect();
        assert_eq!(seen, truth);
        let beyond = get_json(&sim, "/jdy/v2/scm/sal_order?page=4&page_size=100").await;
        assert_eq!(beyond["data"]["rows"].as_array().unwrap().len(), 0);
    }

    #[tokio::test]
    async fn page_size_is_capped_and_the_quirk_miscounts_pages() {
        let honest = get_json(
            &simulator(250, false),
            "/jdy/v2/scm/sal_order?page=1&page_size=500",
        )
        .await;
        assert_eq!(honest["data"]["rows"].as_array().unwrap().len(), 100);
        assert_eq!(honest["data"]["total_page"], 3);
        let quirky = get_json(
            &simulator(250, true),
            "/jdy/v2/scm/sal_order?page=1&page_size=500",
        )
        .await;
        assert_eq!(quirky["data"]["rows"].as_array().unwrap().len(), 100);
        assert_eq!(quirky["data"]["total_page"], 1);
    }

    #[tokio::test]
    async fn bd_lists_count_as_string_and_windows_filter() {
        let sim = simulator(100, false);
        let customers = get_json(&sim, "/jdy/v2/bd/customer?page=1&page_size=100").await;
        assert!(customers["data"]["count"].is_string());
        // 2025-01-01 08:00 CST is 1735689600000; the first orders are created right after it.
        let all = sim.truth(Object::SalesOrder).len();
        let body = get_json(&sim, "/jdy/v2/scm/sal_order?page=1&page_size=10&modify_start_time=1735689600000&modify_end_time=1735693200000").await;
        let count = body["data"]["count"].as_u64().unwrap() as usize;
        assert!(count < all, "the window selects a part ({count} of {all})");
        let expected = sim
            .truth(Object::SalesOrder)
            .iter()
            .filter(|r| {
                r.modify_time.as_str() >= "2025-01-01 08:00:00"
                    && r.modify_time.as_str() <= "2025-01-01 09:00:00"
            })
            .count();
        assert_eq!(count, expected);
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

    #[tokio::test]
    async fn bad_paging_is_a_business_error() {
        let body = get_json(&simulator(10, false), "/jdy/v2/scm/sal_order?page=0").await;
        assert_eq!(body["errcode"], 1_030_002_000);
    }
}
