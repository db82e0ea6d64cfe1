//! A simulator of the Kingdee Cloud Xingchen V2 open API (金蝶云星辰 V2), for demos, tests and
//! benchmarks — as strict as the real gateway.
//!
//! It serves the list endpoints of sales orders, customers and materials with the real paging rules and
//! response envelope, from a data set generated from a seed, behind the real auth flow
//! (push_app_authorize, kingdee_auth_token) and the gateway's checks (see [`gate`]). While it runs, orders
//! are modified and created at configurable rates — also inside windows a client is paging through. Its
//! ground truth — every record id with its modify time — is on `/admin/truth/{object}`, so that a test
//! can prove the target holds exactly the source.
//!
//! List rows carry the detail fields (`modify_time`, `material_entity`) so that one list call yields
//! complete, versioned records.

pub mod data;
pub mod gate;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use chrono::NaiveDateTime;
use rand::rngs::ChaCha8Rng;
use rand::{RngExt as _, SeedableRng};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{Value, json};
use tokio::net::TcpListener;

use crate::data::{Dataset, LOCAL_TIME_FORMAT};
use crate::gate::{GateState, GatewayConfig, Stats, StatsSnapshot, bump};

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
    /// Start of the data's timeline (CST): orders are created one after another from here on.
    pub epoch: NaiveDateTime,
    /// Reproduce a reported gateway quirk: a page_size above 100 is served as 100 rows while
    /// `total_page` is computed from the size asked for — which loses rows for a client that trusts it.
    pub total_page_from_requested_size: bool,
    /// Spoil every n-th sales order (0: none) with an amount that is not a number, as bad data entered at
    /// the source would be. Such records can never be written; a pipeline must dead-letter exactly them.
    pub poison_every: usize,
    /// Write `count` as a string on every list, not only on `bd` lists (clients must accept both).
    pub count_always_string: bool,
    pub gateway: GatewayConfig,
    pub changes: ChangeRates,
}

/// How fast the data changes while the simulator runs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct ChangeRates {
    /// Existing orders modified per second (their modify time becomes now).
    pub modify_per_sec: f64,
    /// New orders created per second.
    pub create_per_sec: f64,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            seed: 42,
            orders: 10_000,
            epoch: data::default_epoch(),
            total_page_from_requested_size: false,
            poison_every: 0,
            count_always_string: false,
            gateway: GatewayConfig::default(),
            changes: ChangeRates::default(),
        }
    }
}

/// A change the simulator makes to the data between two pages of one list query, so that a test can
/// meet, every time, the case in which naive paging silently skips a row: armed with
/// [`Simulator::arm_paging_change`] (or `POST /admin/paging-change`), it is made once, by the first
/// sales-order query that serves page `after_page` and has more pages after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PagingChange {
    /// The page just served (from 1) when the change is made: the client's next page sees it.
    pub after_page: usize,
    pub kind: PagingChangeKind,
}

/// What happens to the first row of the page just served (the moved row): every row after it then
/// shifts one place up, so the first row of the next page slides onto the page already served.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PagingChangeKind {
    /// It is modified now (a newer modify time, after the window): it leaves the query, and `count`
    /// drops by one.
    Leave,
    /// It is modified to a newer time still inside the window (a second before its end) and moves to
    /// the end of the query's rows, as on a list ordered by modify time: `count` stays the same and the
    /// row comes again on a later page.
    MoveToEnd,
    /// It leaves as with `Leave`, and a late row enters the window at the same moment (an order created
    /// with a modify time a second before the window's end, listed last): `count` stays the same and no
    /// row comes twice.
    LeaveAndEnter,
}

/// The simulator's state.
pub struct Simulator {
    config: SimConfig,
    data: RwLock<Dataset>,
    gate: Mutex<GateState>,
    changes: Mutex<ChangeRates>,
    stats: Stats,
    /// Bumped by every change to the data, so that cached selections know they are stale.
    generation: AtomicU64,
    /// The orders matching the last sales-order query: the pages of one window share it, so a client
    /// paging through N orders costs the simulator O(N) once, not once per page.
    selection: Mutex<Option<Selection>>,
    /// The dice of the injected faults, seeded from the data's seed: the n-th list call rolls the
    /// same in every run, so a test's share of faults is what it asked for, not luck.
    fault_dice: Mutex<ChaCha8Rng>,
    /// Changes to make between two pages of a query, in the order they were armed.
    paging_changes: Mutex<std::collections::VecDeque<PagingChange>>,
}

/// Indices of the orders matching one window and status, at one data generation.
struct Selection {
    key: (Option<String>, Option<String>, Option<String>),
    generation: u64,
    indices: Arc<Vec<usize>>,
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

/// The simulator's clock as CST local time, the source's way of writing time.
fn now_local() -> NaiveDateTime {
    (chrono::Utc::now() + chrono::Duration::hours(8)).naive_utc()
}

impl Simulator {
    pub fn new(config: SimConfig) -> Arc<Self> {
        let mut data = Dataset::generate(config.seed, config.orders, config.epoch);
        if config.poison_every > 0 {
            for index in (config.poison_every - 1..data.orders().len()).step_by(config.poison_every)
            {
                data.order_mut(index).total_amount = POISON_AMOUNT.to_owned();
            }
        }
        Arc::new(Self {
            gate: Mutex::new(GateState::new(&config.gateway)),
            changes: Mutex::new(config.changes),
            data: RwLock::new(data),
            stats: Stats::default(),
            generation: AtomicU64::new(0),
            selection: Mutex::new(None),
            fault_dice: Mutex::new(ChaCha8Rng::seed_from_u64(config.seed)),
            paging_changes: Mutex::new(std::collections::VecDeque::new()),
            config,
        })
    }

    pub fn config(&self) -> &SimConfig {
        &self.config
    }

    /// Renders every sales order ahead of serving it: a benchmark calls this before its clock starts,
    /// so that the simulator's share of the cores is serving pages, as an ERP elsewhere would.
    pub fn render_orders(&self) {
        self.data.read().expect("data lock").render_all();
    }

    /// Every record of `object` with its modify time, in the order the list serves them.
    pub fn truth(&self, object: Object) -> Vec<TruthRecord> {
        let data = self.data.read().expect("data lock");
        let record = |id: &String, modify_time: &String| TruthRecord {
            id: id.clone(),
            modify_time: modify_time.clone(),
        };
        match object {
            Object::SalesOrder => data
                .orders()
                .iter()
                .map(|o| record(&o.id, &o.modify_time))
                .collect(),
            Object::Customer => data
                .customers
                .iter()
                .map(|c| record(&c.id, &c.modify_time))
                .collect(),
            Object::Material => data
                .materials
                .iter()
                .map(|m| record(&m.id, &m.modify_time))
                .collect(),
        }
    }

    /// The ids of the sales orders spoiled by `poison_every`.
    pub fn poisoned_orders(&self) -> Vec<String> {
        let data = self.data.read().expect("data lock");
        data.orders()
            .iter()
            .filter(|order| order.total_amount == POISON_AMOUNT)
            .map(|order| order.id.clone())
            .collect()
    }

    pub fn stats(&self) -> StatsSnapshot {
        self.stats.snapshot()
    }

    /// Moves the tenant to another data centre: calls routed to the old one get HTTP 502.
    pub fn move_tenant(&self, domain: &str) {
        self.gate.lock().expect("gate lock").domain = domain.to_owned();
    }

    /// Revokes every app-token issued so far: a call with one is answered HTTP 519, code 4010 (token
    /// invalid), as after the gateway dropped its sessions.
    pub fn revoke_tokens(&self) {
        self.gate.lock().expect("gate lock").revoke_tokens();
        bump(&self.stats.tokens_invalidated);
    }

    /// Makes every app-token issued so far expire now: a call with one is answered HTTP 519, code 4011
    /// (token expired), although the `expires` the client was given has not passed.
    pub fn expire_tokens(&self) {
        self.gate.lock().expect("gate lock").expire_tokens();
        bump(&self.stats.tokens_invalidated);
    }

    /// The account set (by name) of every app-token issued, in order.
    pub fn token_accounts(&self) -> Vec<String> {
        self.gate.lock().expect("gate lock").issued_for.clone()
    }

    /// When each call the gateway admitted (past the signature checks and the rate limit) arrived,
    /// as time since the simulator started, in order: a test checks a client's pacing against it.
    pub fn call_arrivals(&self) -> Vec<Duration> {
        let gate = self.gate.lock().expect("gate lock");
        gate.arrivals
            .iter()
            .map(|at| at.duration_since(gate.started))
            .collect()
    }

    /// The most admitted calls that arrived within any span of `window`.
    pub fn most_calls_within(&self, window: Duration) -> usize {
        gate::most_calls_within(&self.call_arrivals(), window)
    }

    /// Arms a change of the data between two pages of a coming sales-order query (see
    /// [`PagingChange`]); several armed changes are made by successive queries.
    pub fn arm_paging_change(&self, change: PagingChange) {
        self.paging_changes
            .lock()
            .expect("paging changes lock")
            .push_back(change);
    }

    /// Makes the armed change due after `paging.page` of a query of `pages` pages whose page began with
    /// the order `first_id`, if any. By id, not by place: another change may have moved the orders
    /// since the page was served.
    fn change_between_pages(&self, window: &Window, paging: &Paging, pages: usize, first_id: &str) {
        let change = {
            let mut armed = self.paging_changes.lock().expect("paging changes lock");
            match armed.front() {
                Some(change) if change.after_page == paging.page && pages > paging.page => {
                    armed.pop_front()
                }
                _ => None,
            }
        };
        let Some(change) = change else {
            return;
        };
        let now = now_local();
        let end = window
            .end
            .as_deref()
            .and_then(|end| NaiveDateTime::parse_from_str(end, LOCAL_TIME_FORMAT).ok());
        // A time after the window, and never before now: the record leaves the window.
        let after_window = end.map_or(now, |end| now.max(end + chrono::Duration::seconds(1)));
        // A time inside the window, a second before its end (or now, for a window without one): off the
        // bound it shares with the next window, so that no other window gains a row.
        let start = window
            .start
            .as_deref()
            .and_then(|start| NaiveDateTime::parse_from_str(start, LOCAL_TIME_FORMAT).ok());
        let inside = end.map_or(now, |end| {
            let before_end = end - chrono::Duration::seconds(1);
            start.map_or(before_end, |start| before_end.max(start))
        });
        let mut data = self.data.write().expect("data lock");
        let Some(moved) = data.orders().iter().position(|order| order.id == first_id) else {
            return;
        };
        match change.kind {
            PagingChangeKind::Leave => data.modify_order(moved, after_window),
            PagingChangeKind::MoveToEnd => {
                let current = NaiveDateTime::parse_from_str(
                    &data.orders()[moved].modify_time,
                    LOCAL_TIME_FORMAT,
                )
                .unwrap_or(now);
                data.modify_order(moved, inside.max(current));
                data.move_to_end(moved);
            }
            PagingChangeKind::LeaveAndEnter => {
                data.modify_order(moved, after_window);
                // Late: created with a time inside the window, visible only now.
                data.create_order(inside);
            }
        }
        self.generation.fetch_add(1, Ordering::Release);
        bump(&self.stats.paging_changes);
        tracing::info!(
            ?change,
            id = first_id,
            "moved a row between two pages of a query"
        );
    }

    /// Changes how fast the data changes (zero rates stop it).
    pub fn set_changes(&self, rates: ChangeRates) {
        *self.changes.lock().expect("changes lock") = rates;
    }

    /// Applies `elapsed` worth of changes; `carry` keeps the fractions between ticks.
    fn apply_changes(&self, elapsed: Duration, carry: &mut (f64, f64)) {
        let rates = *self.changes.lock().expect("changes lock");
        carry.0 += rates.modify_per_sec * elapsed.as_secs_f64();
        carry.1 += rates.create_per_sec * elapsed.as_secs_f64();
        if carry.0 < 1.0 && carry.1 < 1.0 {
            return;
        }
        let now = now_local();
        let mut data = self.data.write().expect("data lock");
        while carry.0 >= 1.0 {
            carry.0 -= 1.0;
            if !data.orders().is_empty() {
                let index = data.random_index();
                data.modify_order(index, now);
                bump(&self.stats.orders_modified);
            }
        }
        while carry.1 >= 1.0 {
            carry.1 -= 1.0;
            data.create_order(now);
            bump(&self.stats.orders_created);
        }
        self.generation.fetch_add(1, Ordering::Release);
    }

    /// Every entry line of every sales order, with its order's modify time (a line changes with its
    /// order): the truth of a pipeline that flattens orders into lines.
    pub fn order_lines_truth(&self) -> Vec<TruthRecord> {
        let data = self.data.read().expect("data lock");
        data.orders()
            .iter()
            .flat_map(|order| {
                order.material_entity.iter().map(|line| TruthRecord {
                    id: line.id.clone(),
                    modify_time: order.modify_time.clone(),
                })
            })
            .collect()
    }

    /// The indices of the orders in `window` with `status`, reusing the last selection while the data
    /// has not changed. Called with the data's read lock held, so the data cannot change meanwhile.
    fn select_orders(
        &self,
        data: &Dataset,
        window: &Window,
        status: Option<&str>,
    ) -> Arc<Vec<usize>> {
        let key = (
            window.start.clone(),
            window.end.clone(),
            status.map(str::to_owned),
        );
        let generation = self.generation.load(Ordering::Acquire);
        let mut cached = self.selection.lock().expect("selection lock");
        if let Some(selection) = cached.as_ref()
            && selection.key == key
            && selection.generation == generation
        {
            return selection.indices.clone();
        }
        let indices: Arc<Vec<usize>> = Arc::new(
            data.orders()
                .iter()
                .enumerate()
                .filter(|(_, order)| window.contains(&order.modify_time))
                .filter(|(_, order)| status.is_none_or(|status| order.bill_status == status))
                .map(|(index, _)| index)
                .collect(),
        );
        *cached = Some(Selection {
            key,
            generation,
            indices: indices.clone(),
        });
        indices
    }

    pub fn router(self: &Arc<Self>) -> Router {
        Router::new()
            .route(gateway_path::AUTHORIZE, post(authorize))
            .route(gateway_path::TOKEN, get(token))
            .route("/jdy/v2/scm/sal_order", get(list_sales_orders))
            .route(data::Customer::PATH, get(list_base_data::<data::Customer>))
            .route(data::Material::PATH, get(list_base_data::<data::Material>))
            .route("/admin/truth/{object}", get(truth))
            .route("/admin/stats", get(stats))
            .route("/admin/domain", post(move_tenant))
            .route("/admin/changes", post(set_changes))
            .route("/admin/tokens/revoke", post(revoke_tokens))
            .route("/admin/tokens/expire", post(expire_tokens))
            .route("/admin/paging-change", post(arm_paging_change))
            .route("/admin/arrivals", get(arrivals))
            .route("/healthz", get(|| async { "ok\n" }))
            .with_state(self.clone())
    }
}

mod gateway_path {
    pub const AUTHORIZE: &str = conveyor_kingdee::gateway::AUTHORIZE_PATH;
    pub const TOKEN: &str = conveyor_kingdee::gateway::TOKEN_PATH;
}

/// Serves the simulator on `listener` (and changes its data at the configured rates) until the task is
/// dropped or the process ends.
pub async fn serve(simulator: Arc<Simulator>, listener: TcpListener) -> std::io::Result<()> {
    let changer = simulator.clone();
    // Ends with the server, also when the server's task is aborted.
    let _changes = tokio_util::task::AbortOnDropHandle::new(tokio::spawn(async move {
        let tick = Duration::from_millis(50);
        let mut carry = (0.0, 0.0);
        loop {
            tokio::time::sleep(tick).await;
            changer.apply_changes(tick, &mut carry);
        }
    }));
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

fn query_value<'a>(query: &'a [(String, String)], name: &str) -> Option<&'a str> {
    query
        .iter()
        .find(|(key, _)| key == name)
        .map(|(_, value)| value.as_str())
        .filter(|value| !value.is_empty())
}

async fn authorize(
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

async fn token(
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

struct Window {
    start: Option<String>,
    end: Option<String>,
}

impl Window {
    /// The modify-time bounds of a query as local time text, which orders like time. Both ends inclusive.
    fn parse(query: &[(String, String)]) -> Result<Self, BusinessError> {
        let bound = |name: &str| -> Result<Option<String>, BusinessError> {
            let Some(text) = query_value(query, name) else {
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
            start: bound("modify_start_time")?,
            end: bound("modify_end_time")?,
        })
    }

    fn contains(&self, modify_time: &str) -> bool {
        self.start
            .as_deref()
            .is_none_or(|start| modify_time >= start)
            && self.end.as_deref().is_none_or(|end| modify_time <= end)
    }
}

/// The paging a list call asked for.
struct Paging {
    page: usize,
    requested_size: usize,
    /// The size served: the gateway caps it at 100.
    size: usize,
}

impl Paging {
    fn parse(query: &[(String, String)]) -> Result<Self, BusinessError> {
        let parse = |name: &str, default: usize| -> Result<usize, BusinessError> {
            match query_value(query, name) {
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
        let page = parse("page", 1)?;
        let requested_size = parse("page_size", 10)?;
        Ok(Self {
            page,
            requested_size,
            size: requested_size.min(GATEWAY_MAX_PAGE_SIZE),
        })
    }

    /// Where this page starts among the matching rows (any page number, however large, is an answer).
    fn start(&self) -> usize {
        (self.page - 1).saturating_mul(self.size)
    }

    /// The matching rows' count and this page of them, rendered by `render` (only the page is).
    fn take<T>(
        &self,
        rows: impl Iterator<Item = T>,
        render: impl Fn(T) -> Box<RawValue>,
    ) -> (usize, Vec<Box<RawValue>>) {
        let matching: Vec<T> = rows.collect();
        let count = matching.len();
        let start = self.start().min(count);
        let end = (start + self.size).min(count);
        let page = matching
            .into_iter()
            .skip(start)
            .take(end - start)
            .map(render)
            .collect();
        (count, page)
    }
}

/// A row of a base-data list, serialized as it is served.
fn render<T: Serialize>(row: &T) -> Box<RawValue> {
    serde_json::value::to_raw_value(row).expect("rows serialize")
}

/// What a list endpoint serves: a page of matching rows and how it writes `count`.
struct Listing {
    count: usize,
    rows: Vec<Box<RawValue>>,
    count_as_string: bool,
}

/// The admission checks and injected faults every list call goes through. `served` is called once a
/// whole page (no fault) is ready to go out, before it is sent.
async fn list(
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
fn page_body(sim: &Simulator, paging: &Paging, listing: Listing) -> Vec<u8> {
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

async fn list_sales_orders(
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
trait BaseData: Serialize + Sized + Send + Sync + 'static {
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

async fn list_base_data<T: BaseData>(
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

async fn truth(State(sim): State<Arc<Simulator>>, Path(object): Path<String>) -> Response {
    match Object::from_name(&object) {
        Some(object) => Json(json!({"records": sim.truth(object)})).into_response(),
        None => (
            StatusCode::NOT_FOUND,
            format!("unknown object {object:?}\n"),
        )
            .into_response(),
    }
}

async fn stats(State(sim): State<Arc<Simulator>>) -> Json<StatsSnapshot> {
    Json(sim.stats())
}

#[derive(Deserialize)]
struct MoveTenant {
    domain: String,
}

async fn move_tenant(
    State(sim): State<Arc<Simulator>>,
    Json(body): Json<MoveTenant>,
) -> StatusCode {
    sim.move_tenant(&body.domain);
    StatusCode::NO_CONTENT
}

async fn set_changes(
    State(sim): State<Arc<Simulator>>,
    Json(rates): Json<ChangeRates>,
) -> StatusCode {
    sim.set_changes(rates);
    StatusCode::NO_CONTENT
}

async fn revoke_tokens(State(sim): State<Arc<Simulator>>) -> StatusCode {
    sim.revoke_tokens();
    StatusCode::NO_CONTENT
}

async fn expire_tokens(State(sim): State<Arc<Simulator>>) -> StatusCode {
    sim.expire_tokens();
    StatusCode::NO_CONTENT
}

async fn arm_paging_change(
    State(sim): State<Arc<Simulator>>,
    Json(change): Json<PagingChange>,
) -> StatusCode {
    sim.arm_paging_change(change);
    StatusCode::NO_CONTENT
}

/// The admitted calls' arrival times, milliseconds since the simulator started.
async fn arrivals(State(sim): State<Arc<Simulator>>) -> Json<Value> {
    let millis: Vec<f64> = sim
        .call_arrivals()
        .iter()
        .map(|at| at.as_secs_f64() * 1000.0)
        .collect();
    Json(json!({ "millis": millis }))
}

#[cfg(test)]
mod tests {
    use super::*;
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
}
