//! The list endpoints: sales orders (with their changes between pages) and base data.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use rand::RngExt as _;
use serde::Serialize;
use serde_json::Value;
use serde_json::value::RawValue;

use crate::Simulator;
use crate::data::{self, Dataset};
use crate::error::query_value;
use crate::gate::bump;
use crate::paging::{Paging, Window};

/// A row of a base-data list, serialized as it is served.
pub(crate) fn render<T: Serialize>(row: &T) -> Box<RawValue> {
    serde_json::value::to_raw_value(row).expect("rows serialize")
}

/// What a list endpoint serves: a page of matching rows and how it writes `count`.
pub(crate) struct Listing {
    pub(crate) count: usize,
    pub(crate) rows: Vec<Box<RawValue>>,
    pub(crate) count_as_string: bool,
}

/// The admission checks and injected faults every list call goes through. `served` is called once a
/// whole page (no fault) is ready to go out, before it is sent.
pub(crate) async fn list(
    sim: &Simulator,
    path: &str,
    headers: &HeaderMap,
    query: &[(String, String)],
    select: impl FnOnce(&Dataset, &Window, &Paging) -> Listing,
    served: impl FnOnce(&Window, &Paging),
) -> Response {
    if let Err(rejection) = sim.admit("GET", path, headers, query, true) {
        return rejection.into_response();
    }
    let faults = &sim.config.gateway.faults;
    let (server_error, slow, dropped, truncated, empty) = {
        let mut dice = sim.fault_dice.lock().expect("dice lock");
        let mut draw = |rate: f64| dice.random_bool(rate.clamp(0.0, 1.0));
        (
            draw(faults.server_error),
            draw(faults.slow),
            draw(faults.dropped_connection),
            draw(faults.truncated_body),
            draw(faults.empty_page),
        )
    };
    if server_error {
        bump(&sim.stats.injected_faults);
        return StatusCode::SERVICE_UNAVAILABLE.into_response();
    }
    if slow {
        bump(&sim.stats.injected_faults);
        tokio::time::sleep(faults.slow_delay).await;
    }
    let (window, paging) = match (Window::parse(query), Paging::parse(query)) {
        (Ok(window), Ok(paging)) => (window, paging),
        (Err(err), _) | (_, Err(err)) => return err.into_response(),
    };
    let mut listing = {
        let data = sim.data.read().expect("data lock");
        select(&data, &window, &paging)
    };
    listing.count_as_string |= sim.config.count_always_string;
    let emptied = empty && !listing.rows.is_empty();
    let whole = !(emptied || truncated || dropped);
    if emptied {
        bump(&sim.stats.injected_faults);
        listing.rows.clear();
    }
    let bytes = page_body(sim, &paging, listing);
    if whole {
        served(&window, &paging);
    }
    if truncated {
        bump(&sim.stats.injected_faults);
        return (
            [("content-type", "application/json")],
            bytes[..bytes.len() / 2].to_vec(),
        )
            .into_response();
    }
    if dropped {
        bump(&sim.stats.injected_faults);
        let half = bytes[..bytes.len() / 2].to_vec();
        let chunks: Vec<Result<Vec<u8>, std::io::Error>> = vec![
            Ok(half),
            Err(std::io::Error::other("connection dropped by the simulator")),
        ];
        return (
            [("content-type", "application/json")],
            Body::from_stream(futures_util::stream::iter(chunks)),
        )
            .into_response();
    }
    ([("content-type", "application/json")], bytes).into_response()
}

/// The response envelope of one page, under the gateway's paging rules. Written as a struct rather than
/// a `json!` tree, so that the rows go out as the bytes they were rendered to.
pub(crate) fn page_body(sim: &Simulator, paging: &Paging, listing: Listing) -> Vec<u8> {
    #[derive(Serialize)]
    struct PageBody {
        errcode: u32,
        description: &'static str,
        data: PageData,
    }
    #[derive(Serialize)]
    struct PageData {
        count: Value,
        page: usize,
        page_size: usize,
        total_page: usize,
        current_page_size: usize,
        headers: serde_json::Map<String, Value>,
        rows: Vec<Box<RawValue>>,
    }
    if listing.count == 0 {
        crate::gate::bump(&sim.stats.empty_lists);
    }
    sim.stats.rows_served.fetch_add(
        listing.rows.len() as u64,
        std::sync::atomic::Ordering::Relaxed,
    );
    let paging_size = if sim.config.total_page_from_requested_size {
        paging.requested_size
    } else {
        paging.size
    };
    let count = if listing.count_as_string {
        Value::String(listing.count.to_string())
    } else {
        Value::from(listing.count)
    };
    let body = PageBody {
        errcode: 0,
        description: "success",
        data: PageData {
            count,
            page: paging.page,
            page_size: paging.size,
            total_page: listing.count.div_ceil(paging_size),
            current_page_size: listing.rows.len(),
            headers: serde_json::Map::new(),
            rows: listing.rows,
        },
    };
    serde_json::to_vec(&body).expect("pages serialize")
}

pub(crate) async fn list_sales_orders(
    State(sim): State<Arc<Simulator>>,
    headers: HeaderMap,
    Query(query): Query<Vec<(String, String)>>,
) -> Response {
    let status = query_value(&query, "bill_status").map(str::to_owned);
    // The query's pages and the first order of the page served, for a change armed to happen between
    // two pages.
    let selected = std::sync::OnceLock::new();
    list(
        &sim,
        "/jdy/v2/scm/sal_order",
        &headers,
        &query,
        |data, window, paging| {
            let indices = sim.select_orders(data, window, status.as_deref());
            let (count, rows) =
                paging.take(indices.iter(), |&index| data.order_json(index).to_owned());
            let pages = count.div_ceil(paging.size);
            let first = indices.get(paging.start());
            if let Some(&first) = first {
                let _ = selected.set((pages, data.orders()[first].id.clone()));
            }
            Listing {
                count,
                rows,
                count_as_string: false,
            }
        },
        |window, paging| {
            if let Some((pages, first_id)) = selected.get() {
                sim.change_between_pages(window, paging, *pages, first_id);
            }
        },
    )
    .await
}

/// A base-data object (`bd` list): listed by modify time, with `count` written as a string.
pub(crate) trait BaseData: Serialize + Sized + Send + Sync + 'static {
    const PATH: &'static str;
    fn all(data: &Dataset) -> &[Self];
    fn modify_time(&self) -> &str;
}

impl BaseData for data::Customer {
    const PATH: &'static str = "/jdy/v2/bd/customer";
    fn all(data: &Dataset) -> &[Self] {
        &data.customers
    }
    fn modify_time(&self) -> &str {
        &self.modify_time
    }
}

impl BaseData for data::Material {
    const PATH: &'static str = "/jdy/v2/bd/material";
    fn all(data: &Dataset) -> &[Self] {
        &data.materials
    }
    fn modify_time(&self) -> &str {
        &self.modify_time
    }
}

pub(crate) async fn list_base_data<T: BaseData>(
    State(sim): State<Arc<Simulator>>,
    headers: HeaderMap,
    Query(query): Query<Vec<(String, String)>>,
) -> Response {
    list(
        &sim,
        T::PATH,
        &headers,
        &query,
        |data, window, paging| {
            let (count, rows) = paging.take(
                T::all(data)
                    .iter()
                    .filter(|row| window.contains(row.modify_time())),
                render,
            );
            Listing {
                count,
                rows,
                count_as_string: true,
            }
        },
        |_, _| {},
    )
    .await
}
