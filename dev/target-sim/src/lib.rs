//! A simulator of a business system's JSON write API: the far end of conveyor's HTTP target.
//!
//! It stores what it receives in collections (`/api/{collection}`), keyed by a field of each record,
//! answers existence checks (`GET /api/{collection}/{key}`), and shows what it holds on
//! `/admin/{collection}` (and to in-process tests). It can require bearer tokens, issued by its token
//! endpoint (`POST /oauth/token`, OAuth2 client credentials) or fixed, and injects latency, 429, 5xx and
//! 4xx validation errors on demand, so that tests and benchmarks meet the failures real targets have.
//!
//! Writes are upserts in which a newer version wins (when a version field is configured), or, with
//! `insert_only`, refused with 409 when the key exists (per record in a batch's answer, or the whole
//! batch with `conflict_fails_batch`). An `Idempotency-Key` header seen before is answered as the
//! first time and not applied again. It can require headers of every call, and be switched into an
//! outage (`PUT /admin/outage`, or [`TargetSim::set_outage`]) in which every call but the admin ones
//! is answered with one status, as a target behind a gateway whose backend is down.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::rngs::ChaCha8Rng;
use rand::{RngExt as _, SeedableRng};

use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Form, Json, Router};
use chrono::DateTime;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::net::TcpListener;

/// The statuses of [`TargetConfig`] and [`TargetSim::set_outage`].
pub use axum::http::StatusCode;

/// How the simulated target behaves.
#[derive(Debug, Clone)]
pub struct TargetConfig {
    /// The record field that identifies a record.
    pub key_field: String,
    /// The record field that orders versions (RFC 3339 or epoch ms): an older version never replaces a
    /// newer one. Without it, the last write wins.
    pub version_field: Option<String>,
    /// Refuse a write of an existing key with 409 instead of updating (POST only; PUT updates).
    pub insert_only: bool,
    /// With `insert_only`: a batch holding a key that exists is refused whole with 409 and nothing of
    /// it is applied, as APIs that insert a batch in one transaction do.
    pub conflict_fails_batch: bool,
    /// Added to every API call.
    pub latency: Duration,
    /// Share of API calls answered 429 Too Many Requests (0 to 1).
    pub rate_429: f64,
    /// Share of API calls answered 503 Service Unavailable.
    pub rate_5xx: f64,
    /// Share of written records refused as invalid (422); a batch holding one is refused whole.
    pub rate_invalid: f64,
    /// Records in which a (field, value) of this list is found are always refused as invalid.
    pub invalid_when: Vec<(String, Value)>,
    /// The status of a refusal of an invalid record (422 by default; some APIs answer 400, or 500 for
    /// records they choke on).
    pub invalid_status: StatusCode,
    /// Headers (name, value) every API call must carry; a call without them is refused
    /// with 400.
    pub required_headers: Vec<(String, String)>,
    /// Require `Authorization: Bearer` with this fixed token.
    pub static_token: Option<String>,
    /// Require tokens issued by `/oauth/token` to these client credentials (id, secret).
    pub client: Option<(String, String)>,
    /// Lifetime of issued tokens.
    pub token_ttl: Duration,
}

impl Default for TargetConfig {
    fn default() -> Self {
        Self {
            key_field: "id".into(),
            version_field: None,
            insert_only: false,
            conflict_fails_batch: false,
            latency: Duration::ZERO,
            rate_429: 0.0,
            rate_5xx: 0.0,
            rate_invalid: 0.0,
            invalid_when: Vec::new(),
            invalid_status: StatusCode::UNPROCESSABLE_ENTITY,
            required_headers: Vec::new(),
            static_token: None,
            client: None,
            token_ttl: Duration::from_secs(3600),
        }
    }
}

/// Counters of what the target saw, for tests and benchmarks.
#[derive(Debug, Default, Serialize)]
pub struct Stats {
    /// API calls (writes, existence checks, token requests), faults included.
    pub requests: AtomicU64,
    pub created: AtomicU64,
    pub updated: AtomicU64,
    /// Writes of a version not newer than the one held: accepted, not applied.
    pub stale: AtomicU64,
    /// Writes refused with 409 because the key exists (`insert_only`).
    pub conflicts: AtomicU64,
    /// Writes answered from an idempotency key seen before.
    pub replayed: AtomicU64,
    pub injected_429: AtomicU64,
    pub injected_5xx: AtomicU64,
    pub refused_invalid: AtomicU64,
    /// Calls refused because a required header was missing or wrong.
    pub missing_headers: AtomicU64,
    /// Calls answered with the outage's status.
    pub outage_answers: AtomicU64,
    pub unauthorized: AtomicU64,
    pub tokens_issued: AtomicU64,
}

/// Seed of the injected failures' dice.
const ROLLS_SEED: u64 = 7;

/// The simulator's state.
pub struct TargetSim {
    config: TargetConfig,
    /// The dice of the injected failures: the n-th roll is the same in every run, so a test's share of
    /// failures is what it asked for, not luck.
    rolls: Mutex<ChaCha8Rng>,
    collections: Mutex<HashMap<String, BTreeMap<String, Value>>>,
    idempotency: Mutex<HashMap<String, (StatusCode, Value)>>,
    tokens: Mutex<HashMap<String, Instant>>,
    /// The status every call is answered with during an outage; 0 when there is none.
    outage: AtomicU16,
    pub stats: Stats,
}

impl TargetSim {
    pub fn new(config: TargetConfig) -> Arc<Self> {
        Arc::new(Self {
            config,
            rolls: Mutex::new(ChaCha8Rng::seed_from_u64(ROLLS_SEED)),
            collections: Mutex::default(),
            idempotency: Mutex::default(),
            tokens: Mutex::default(),
            outage: AtomicU16::new(0),
            stats: Stats::default(),
        })
    }

    /// The next roll of the dice, in [0, 1).
    fn roll(&self) -> f64 {
        self.rolls.lock().expect("no panics while locked").random()
    }

    /// Every record of a collection, by key.
    pub fn records(&self, collection: &str) -> BTreeMap<String, Value> {
        self.collections
            .lock()
            .expect("no panics while locked")
            .get(collection)
            .cloned()
            .unwrap_or_default()
    }

    /// Changes a collection's records in place, as another system writing to the target would (a
    /// test's damage behind the pipeline's back).
    pub fn edit(&self, collection: &str, change: impl FnOnce(&mut BTreeMap<String, Value>)) {
        let mut collections = self.collections.lock().expect("no panics while locked");
        change(collections.entry(collection.to_owned()).or_default());
    }

    /// Forgets every token issued so far, as a target does when tokens expire or are revoked.
    pub fn revoke_tokens(&self) {
        self.tokens.lock().expect("no panics while locked").clear();
    }

    /// Starts an outage in which every call but the admin ones is answered with `status` (e.g. 503),
    /// or ends it (`None`).
    pub fn set_outage(&self, status: Option<StatusCode>) {
        let code = status.map_or(0, |status| status.as_u16());
        self.outage.store(code, Ordering::Relaxed);
        if code == 0 {
            tracing::info!("target-sim outage over");
        } else {
            tracing::info!(status = code, "target-sim outage begins");
        }
    }

    /// The outage's answer, if there is one now.
    fn outage(&self) -> Option<Response> {
        let code = self.outage.load(Ordering::Relaxed);
        match StatusCode::from_u16(code) {
            Ok(status) if code != 0 => {
                self.stats.outage_answers.fetch_add(1, Ordering::Relaxed);
                Some(fail(status, "the service is down"))
            }
            _ => None,
        }
    }

    pub fn router(self: &Arc<Self>) -> Router {
        Router::new()
            .route("/", get(root))
            .route("/api/{collection}", post(write_many))
            .route("/api/{collection}/{key}", get(exists).put(put_one))
            .route("/oauth/token", post(token))
            .route("/admin/stats", get(stats))
            .route("/admin/outage", put(start_outage).delete(end_outage))
            .route("/admin/{collection}", get(admin_records))
            .route("/healthz", get(|| async { "ok\n" }))
            .with_state(self.clone())
    }

    /// The outage, latency, then the injected failures of an API call, then the required headers and
    /// the token check.
    async fn gate(&self, headers: &HeaderMap) -> Result<(), Response> {
        self.stats.requests.fetch_add(1, Ordering::Relaxed);
        if let Some(response) = self.outage() {
            return Err(response);
        }
        if !self.config.latency.is_zero() {
            tokio::time::sleep(self.config.latency).await;
        }
        let (roll_429, roll_5xx) = (self.roll(), self.roll());
        if roll_429 < self.config.rate_429 {
            self.stats.injected_429.fetch_add(1, Ordering::Relaxed);
            return Err(fail(StatusCode::TOO_MANY_REQUESTS, "slow down"));
        }
        if roll_5xx < self.config.rate_5xx {
            self.stats.injected_5xx.fetch_add(1, Ordering::Relaxed);
            return Err(fail(StatusCode::SERVICE_UNAVAILABLE, "try again later"));
        }
        if let Some((name, _)) = self.config.required_headers.iter().find(|(name, value)| {
            headers.get(name.as_str()).and_then(|v| v.to_str().ok()) != Some(value.as_str())
        }) {
            self.stats.missing_headers.fetch_add(1, Ordering::Relaxed);
            return Err(fail(
                StatusCode::BAD_REQUEST,
                &format!("header {name} is missing or wrong"),
            ));
        }
        if self.config.static_token.is_none() && self.config.client.is_none() {
            return Ok(());
        }
        let presented = headers
            .get("authorization")
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.strip_prefix("Bearer "));
        let valid = presented.is_some_and(|token| {
            self.config.static_token.as_deref() == Some(token)
                || self
                    .tokens
                    .lock()
                    .expect("no panics while locked")
                    .get(token)
                    .is_some_and(|expires| *expires > Instant::now())
        });
        if valid {
            Ok(())
        } else {
            self.stats.unauthorized.fetch_add(1, Ordering::Relaxed);
            Err(fail(
                StatusCode::UNAUTHORIZED,
                "missing, unknown or expired token",
            ))
        }
    }

    /// Why a record is refused, if it is.
    fn validate(&self, record: &Value) -> Result<String, String> {
        let key = match record.get(&self.config.key_field) {
            Some(Value::String(key)) if !key.is_empty() => key.clone(),
            Some(Value::Number(key)) => key.to_string(),
            _ => return Err(format!("{} is missing", self.config.key_field)),
        };
        if let Some((field, _)) = self
            .config
            .invalid_when
            .iter()
            .find(|(field, value)| record.get(field) == Some(value))
        {
            return Err(format!("{field} has a value this system does not accept"));
        }
        if self.config.rate_invalid > 0.0 && self.roll() < self.config.rate_invalid {
            return Err("refused by a validation rule".into());
        }
        Ok(key)
    }

    /// Applies validated records under one lock; `insert` refuses an existing key. With
    /// `all_or_nothing`, a batch holding any existing key is refused whole: the keys come back, and
    /// nothing is applied.
    fn apply_all(
        &self,
        collection: &str,
        keyed: Vec<(String, Value)>,
        insert: bool,
        all_or_nothing: bool,
    ) -> Result<Vec<(String, Applied)>, Vec<String>> {
        let mut collections = self.collections.lock().expect("no panics while locked");
        let records = collections.entry(collection.to_owned()).or_default();
        if all_or_nothing {
            let existing: Vec<String> = keyed
                .iter()
                .filter(|(key, _)| records.contains_key(key))
                .map(|(key, _)| key.clone())
                .collect();
            if !existing.is_empty() {
                return Err(existing);
            }
        }
        Ok(keyed
            .into_iter()
            .map(|(key, record)| {
                let outcome = self.apply(records, &key, record, insert);
                (key, outcome)
            })
            .collect())
    }

    /// Applies one validated record, an update if its key exists.
    fn apply_one(&self, collection: &str, key: &str, record: Value) -> Applied {
        let mut collections = self.collections.lock().expect("no panics while locked");
        let records = collections.entry(collection.to_owned()).or_default();
        self.apply(records, key, record, false)
    }

    /// Applies one validated record to a collection; `insert` refuses an existing key.
    fn apply(
        &self,
        records: &mut BTreeMap<String, Value>,
        key: &str,
        record: Value,
        insert: bool,
    ) -> Applied {
        let outcome = match records.get(key) {
            None => Applied::Created,
            Some(_) if insert => Applied::Conflict,
            Some(held) if !self.is_newer(&record, held) => Applied::Stale,
            Some(_) => Applied::Updated,
        };
        let counter = match outcome {
            Applied::Created => &self.stats.created,
            Applied::Updated => &self.stats.updated,
            Applied::Stale => &self.stats.stale,
            Applied::Conflict => &self.stats.conflicts,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        if matches!(outcome, Applied::Created | Applied::Updated) {
            records.insert(key.to_owned(), record);
        }
        outcome
    }

    fn is_newer(&self, record: &Value, held: &Value) -> bool {
        let Some(field) = &self.config.version_field else {
            return true;
        };
        match (version(record.get(field)), version(held.get(field))) {
            (Some(new), Some(old)) => new > old,
            (Some(_), None) => true,
            (None, _) => false,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Applied {
    Created,
    Updated,
    Stale,
    Conflict,
}

/// A version as epoch milliseconds: from RFC 3339 text or a number of milliseconds.
fn version(value: Option<&Value>) -> Option<i64> {
    match value? {
        Value::Number(number) => number.as_i64(),
        Value::String(text) => DateTime::parse_from_rfc3339(text)
            .ok()
            .map(|instant| instant.timestamp_millis()),
        _ => None,
    }
}

fn fail(status: StatusCode, message: &str) -> Response {
    (status, Json(json!({"error": message}))).into_response()
}

type Sim = State<Arc<TargetSim>>;

/// `POST /api/{collection}`: one record (an object) or a batch (an array), applied all or nothing.
async fn write_many(
    State(sim): Sim,
    Path(collection): Path<String>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    if let Err(response) = sim.gate(&headers).await {
        return response;
    }
    let idempotency_key = headers
        .get("idempotency-key")
        .and_then(|value| value.to_str().ok())
        .map(|key| format!("{collection}/{key}"));
    if let Some(key) = &idempotency_key
        && let Some((status, answer)) = sim
            .idempotency
            .lock()
            .expect("no panics while locked")
            .get(key)
            .cloned()
    {
        sim.stats.replayed.fetch_add(1, Ordering::Relaxed);
        return (status, Json(answer)).into_response();
    }
    let (single, records) = match body {
        Value::Array(records) => (false, records),
        record @ Value::Object(_) => (true, vec![record]),
        _ => return fail(StatusCode::BAD_REQUEST, "expected a JSON object or array"),
    };
    let mut keyed = Vec::with_capacity(records.len());
    let mut seen = HashSet::with_capacity(records.len());
    for (index, record) in records.into_iter().enumerate() {
        match sim.validate(&record) {
            Ok(key) if seen.insert(key.clone()) => keyed.push((key, record)),
            Ok(key) => {
                return fail_record(&sim, index, &key, "the key appears twice in the batch");
            }
            Err(reason) => {
                let key = record
                    .get(&sim.config.key_field)
                    .map(|key| key.to_string())
                    .unwrap_or_default();
                return fail_record(&sim, index, &key, &reason);
            }
        }
    }
    let all_or_nothing = sim.config.insert_only && sim.config.conflict_fails_batch && !single;
    let applied = match sim.apply_all(&collection, keyed, sim.config.insert_only, all_or_nothing) {
        Ok(applied) => applied,
        Err(existing) => {
            sim.stats
                .conflicts
                .fetch_add(existing.len() as u64, Ordering::Relaxed);
            return (
                StatusCode::CONFLICT,
                Json(json!({"error": "the batch holds keys that exist", "keys": existing})),
            )
                .into_response();
        }
    };
    let outcomes: Vec<Value> = applied
        .into_iter()
        .map(|(key, outcome)| json!({"key": key, "result": format!("{outcome:?}").to_lowercase()}))
        .collect();
    let status = match outcomes.first() {
        Some(first) if single && first["result"] == "conflict" => StatusCode::CONFLICT,
        Some(first) if single && first["result"] == "created" => StatusCode::CREATED,
        _ => StatusCode::OK,
    };
    let answer = json!({"results": outcomes});
    if let Some(key) = idempotency_key {
        sim.idempotency
            .lock()
            .expect("no panics while locked")
            .insert(key, (status, answer.clone()));
    }
    (status, Json(answer)).into_response()
}

fn fail_record(sim: &TargetSim, index: usize, key: &str, reason: &str) -> Response {
    sim.stats.refused_invalid.fetch_add(1, Ordering::Relaxed);
    (
        sim.config.invalid_status,
        Json(json!({"error": "validation failed", "index": index, "key": key, "reason": reason})),
    )
        .into_response()
}

/// `PUT /api/{collection}/{key}`: creates or updates one record.
async fn put_one(
    State(sim): Sim,
    Path((collection, key)): Path<(String, String)>,
    headers: HeaderMap,
    Json(record): Json<Value>,
) -> Response {
    if let Err(response) = sim.gate(&headers).await {
        return response;
    }
    match sim.validate(&record) {
        Ok(found) if found == key => {}
        Ok(_) => return fail_record(&sim, 0, &key, "the record's key is not the one in the path"),
        Err(reason) => return fail_record(&sim, 0, &key, &reason),
    }
    let outcome = sim.apply_one(&collection, &key, record);
    let status = if outcome == Applied::Created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    (
        status,
        Json(json!({"key": key, "result": format!("{outcome:?}").to_lowercase()})),
    )
        .into_response()
}

/// `GET /api/{collection}/{key}`: 200 with the record, or 404.
async fn exists(
    State(sim): Sim,
    Path((collection, key)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    if let Err(response) = sim.gate(&headers).await {
        return response;
    }
    let held = sim
        .collections
        .lock()
        .expect("no panics while locked")
        .get(&collection)
        .and_then(|records| records.get(&key).cloned());
    match held {
        Some(record) => Json(record).into_response(),
        None => fail(StatusCode::NOT_FOUND, "no such record"),
    }
}

#[derive(Deserialize)]
struct TokenRequest {
    grant_type: String,
    client_id: String,
    client_secret: String,
}

/// `POST /oauth/token` (form-encoded client credentials): a bearer token with its lifetime.
async fn token(State(sim): Sim, Form(request): Form<TokenRequest>) -> Response {
    sim.stats.requests.fetch_add(1, Ordering::Relaxed);
    if let Some(response) = sim.outage() {
        return response;
    }
    if !sim.config.latency.is_zero() {
        tokio::time::sleep(sim.config.latency).await;
    }
    let granted = request.grant_type == "client_credentials"
        && sim.config.client.as_ref().is_some_and(|(id, secret)| {
            *id == request.client_id && *secret == request.client_secret
        });
    if !granted {
        return fail(StatusCode::UNAUTHORIZED, "invalid client");
    }
    let token = uuid::Uuid::new_v4().simple().to_string();
    sim.tokens
        .lock()
        .expect("no panics while locked")
        .insert(token.clone(), Instant::now() + sim.config.token_ttl);
    sim.stats.tokens_issued.fetch_add(1, Ordering::Relaxed);
    Json(json!({
        "access_token": token,
        "token_type": "Bearer",
        "expires_in": sim.config.token_ttl.as_secs(),
    }))
    .into_response()
}

/// `GET` or `HEAD /`: what a client's probe of the base URL meets (200, or the outage's status).
async fn root(State(sim): Sim) -> Response {
    sim.outage()
        .unwrap_or_else(|| "target-sim\n".into_response())
}

#[derive(Deserialize)]
struct Outage {
    status: u16,
}

/// `PUT /admin/outage` with `{"status": 503}`: every call but the admin ones is answered so from now.
async fn start_outage(State(sim): Sim, Json(outage): Json<Outage>) -> Response {
    match StatusCode::from_u16(outage.status) {
        Ok(status) if (400..=599).contains(&status.as_u16()) => {
            sim.set_outage(Some(status));
            StatusCode::NO_CONTENT.into_response()
        }
        _ => fail(StatusCode::BAD_REQUEST, "status must be 400 to 599"),
    }
}

/// `DELETE /admin/outage`: the outage is over.
async fn end_outage(State(sim): Sim) -> Response {
    sim.set_outage(None);
    StatusCode::NO_CONTENT.into_response()
}

async fn stats(State(sim): Sim) -> Response {
    Json(&sim.stats).into_response()
}

async fn admin_records(State(sim): Sim, Path(collection): Path<String>) -> Response {
    Json(sim.records(&collection)).into_response()
}

/// Serves the simulator on `listener` until the task is dropped or the process ends.
pub async fn serve(sim: Arc<TargetSim>, listener: TcpListener) -> std::io::Result<()> {
    axum::serve(listener, sim.router()).await
}

/// Binds `addr` (port 0 for any) and serves in the background; returns the bound address.
pub async fn spawn(sim: Arc<TargetSim>, addr: SocketAddr) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    tokio::spawn(async move {
        if let Err(err) = serve(sim, listener).await {
            tracing::error!(error = %err, "target simulator stopped");
        }
    });
    Ok(bound)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Tests that ask for a share of failures and check they met one rely on the dice being the same
    /// every run: the first calls of every simulator see the same rolls, among them a low one.
    #[test]
    fn every_simulator_rolls_the_same_dice() {
        let rolls = |sim: &TargetSim| (0..20).map(|_| sim.roll()).collect::<Vec<_>>();
        let first = rolls(&TargetSim::new(TargetConfig::default()));
        assert_eq!(first, rolls(&TargetSim::new(TargetConfig::default())));
        assert!(first.iter().all(|roll| (0.0..1.0).contains(roll)));
        assert!(first.iter().any(|roll| *roll < 0.1), "{first:?}");
    }
}
