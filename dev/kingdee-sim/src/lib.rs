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

mod admin;
mod auth;
pub mod data;
mod error;
pub mod gate;
mod list;
mod paging;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use axum::Router;
use axum::routing::{get, post};
use chrono::NaiveDateTime;
use rand::SeedableRng;
use rand::rngs::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;

use crate::admin::{
    arm_paging_change, arrivals, expire_tokens, move_tenant, revoke_tokens, set_changes,
    set_rate_limit, stats, truth,
};
use crate::auth::{authorize, gateway_path, token};
use crate::data::{Dataset, LOCAL_TIME_FORMAT};
use crate::gate::{GateState, GatewayConfig, Stats, StatsSnapshot, bump};
use crate::list::{BaseData as _, list_base_data, list_sales_orders};
use crate::paging::{Paging, Window};

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

    /// Changes the calls allowed per account set in any 60 seconds (0: no limit) from now on, as
    /// another client of the same app starting or stopping would.
    pub fn set_rate_limit(&self, calls_per_minute: u32) {
        self.gate.lock().expect("gate lock").calls_per_minute = calls_per_minute;
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
        let (modified, created) = (carry.0.floor(), carry.1.floor());
        carry.0 -= modified;
        carry.1 -= created;
        self.change_now(modified as usize, created as usize);
    }

    /// Modifies `modified` random orders and creates `created` new ones, all modified now.
    pub fn change_now(&self, modified: usize, created: usize) {
        let now = now_local();
        let mut data = self.data.write().expect("data lock");
        for _ in 0..modified {
            if !data.orders().is_empty() {
                let index = data.random_index();
                data.modify_order(index, now);
                bump(&self.stats.orders_modified);
            }
        }
        for _ in 0..created {
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
            .route("/admin/rate-limit", post(set_rate_limit))
            .route("/admin/tokens/revoke", post(revoke_tokens))
            .route("/admin/tokens/expire", post(expire_tokens))
            .route("/admin/paging-change", post(arm_paging_change))
            .route("/admin/arrivals", get(arrivals))
            .route("/healthz", get(|| async { "ok\n" }))
            .with_state(self.clone())
    }
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

#[cfg(test)]
mod tests;
