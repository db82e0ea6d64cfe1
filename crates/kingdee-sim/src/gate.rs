//! The simulated gateway's strictness: client id, signature, timestamp window, app-token, router address,
//! a per-account-set call limit, rotating app_secret, a movable tenant domain, and injected faults.
//! It rejects the way the real gateway does: HTTP 519 with its codes, 429, 502.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::Json;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use conveyor_kingdee::sign::{self, SignatureInput};
use serde::Serialize;
use serde_json::json;

/// Credentials the simulator accepts unless told otherwise; the demo and tests use them.
pub const DEMO_CLIENT_ID: &str = "conveyor-demo-client";
pub const DEMO_CLIENT_SECRET: &str = "sim-client-secret-7f3a9c2e51b04d68";
pub const DEMO_OUTER_INSTANCE_ID: &str = "sim-outer-instance-1";
pub const DEMO_ACCOUNT: &str = "演示账套";

/// How strict and how unreliable the gateway is.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    pub client_id: String,
    pub client_secret: String,
    pub outer_instance_id: String,
    /// Name of the active account set (an inactive one is returned beside it).
    pub account_name: String,
    /// The tenant's data centre, expected in X-GW-Router-Addr.
    pub domain: String,
    /// How long an app-token is valid.
    pub token_lifetime: Duration,
    /// How often app_secret changes (None: never).
    pub secret_rotation: Option<Duration>,
    /// Calls allowed per account set in any 60 seconds (0: no limit).
    pub calls_per_minute: u32,
    /// How far X-Api-TimeStamp may be from the simulator's clock.
    pub timestamp_window: Duration,
    pub faults: Faults,
}

/// Faults injected into business calls, each at a rate from 0 to 1.
#[derive(Debug, Clone, Default)]
pub struct Faults {
    /// Answer HTTP 500 or 503.
    pub server_error: f64,
    /// Answer after `slow_delay`.
    pub slow: f64,
    pub slow_delay: Duration,
    /// Cut the connection in the middle of the body.
    pub dropped_connection: f64,
    /// Answer 200 with a body cut in half.
    pub truncated_body: f64,
    /// Answer a page with no rows although `count` says it has some (a reported gateway quirk).
    pub empty_page: f64,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            client_id: DEMO_CLIENT_ID.to_owned(),
            client_secret: DEMO_CLIENT_SECRET.to_owned(),
            outer_instance_id: DEMO_OUTER_INSTANCE_ID.to_owned(),
            account_name: DEMO_ACCOUNT.to_owned(),
            domain: "https://tf.jdy.com".to_owned(),
            token_lifetime: Duration::from_secs(2 * 3600),
            secret_rotation: None,
            calls_per_minute: 0,
            timestamp_window: Duration::from_secs(300),
            faults: Faults::default(),
        }
    }
}

/// Counters of what the gateway did, for tests and benchmarks.
#[derive(Debug, Default)]
pub struct Stats {
    pub calls: AtomicU64,
    pub rejected_client: AtomicU64,
    pub rejected_signature: AtomicU64,
    pub rejected_timestamp: AtomicU64,
    pub rejected_token: AtomicU64,
    pub wrong_domain: AtomicU64,
    pub rate_limited: AtomicU64,
    pub authorizations: AtomicU64,
    pub tokens_issued: AtomicU64,
    pub stale_secret: AtomicU64,
    pub injected_faults: AtomicU64,
    pub max_calls_in_a_minute: AtomicU64,
    pub orders_modified: AtomicU64,
    pub orders_created: AtomicU64,
}

/// A copy of [`Stats`] that serializes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct StatsSnapshot {
    pub calls: u64,
    pub rejected_client: u64,
    pub rejected_signature: u64,
    pub rejected_timestamp: u64,
    pub rejected_token: u64,
    pub wrong_domain: u64,
    pub rate_limited: u64,
    pub authorizations: u64,
    pub tokens_issued: u64,
    pub stale_secret: u64,
    pub injected_faults: u64,
    pub max_calls_in_a_minute: u64,
    pub orders_modified: u64,
    pub orders_created: u64,
}

impl Stats {
    pub fn snapshot(&self) -> StatsSnapshot {
        let read = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        StatsSnapshot {
            calls: read(&self.calls),
            rejected_client: read(&self.rejected_client),
            rejected_signature: read(&self.rejected_signature),
            rejected_timestamp: read(&self.rejected_timestamp),
            rejected_token: read(&self.rejected_token),
            wrong_domain: read(&self.wrong_domain),
            rate_limited: read(&self.rate_limited),
            authorizations: read(&self.authorizations),
            tokens_issued: read(&self.tokens_issued),
            stale_secret: read(&self.stale_secret),
            injected_faults: read(&self.injected_faults),
            max_calls_in_a_minute: read(&self.max_calls_in_a_minute),
            orders_modified: read(&self.orders_modified),
            orders_created: read(&self.orders_created),
        }
    }
}

pub(crate) fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// The gateway's changing state.
#[derive(Debug)]
pub(crate) struct GateState {
    pub app_key: String,
    app_secret: String,
    secret_generation: u64,
    secret_since: Instant,
    pub domain: String,
    tokens: HashMap<String, DateTime<Utc>>,
    calls: VecDeque<Instant>,
}

impl GateState {
    pub fn new(config: &GatewayConfig) -> Self {
        let mut state = Self {
            app_key: "SimKey01".to_owned(),
            app_secret: String::new(),
            secret_generation: 0,
            secret_since: Instant::now(),
            domain: config.domain.clone(),
            tokens: HashMap::new(),
            calls: VecDeque::new(),
        };
        state.app_secret = state.secret_for(config, 0);
        state
    }

    fn secret_for(&self, config: &GatewayConfig, generation: u64) -> String {
        sign::hmac_hex(&config.client_secret, &format!("app-secret-{generation}"))[..40].to_owned()
    }

    /// The current app_secret, rotated if its period has passed.
    pub fn app_secret(&mut self, config: &GatewayConfig) -> String {
        if let Some(period) = config.secret_rotation
            && self.secret_since.elapsed() >= period
        {
            self.secret_generation += 1;
            self.app_secret = self.secret_for(config, self.secret_generation);
            self.secret_since = Instant::now();
            tracing::info!(generation = self.secret_generation, "app_secret rotated");
        }
        self.app_secret.clone()
    }

    pub fn issue_token(&mut self, lifetime: Duration) -> (String, DateTime<Utc>) {
        let token = format!(
            "sim.{}.{}",
            self.tokens.len(),
            sign::hmac_hex(
                &self.app_key,
                &Utc::now().timestamp_nanos_opt().unwrap_or(0).to_string()
            )
        );
        let expires = Utc::now() + lifetime;
        self.tokens.retain(|_, expiry| *expiry > Utc::now());
        self.tokens.insert(token.clone(), expires);
        (token, expires)
    }
}

/// How the gateway turns a call away.
#[derive(Debug)]
pub(crate) enum Rejection {
    /// HTTP 519 with a gateway code.
    Gateway { code: u32, message: &'static str },
    /// HTTP 429.
    RateLimited,
    /// HTTP 502: the tenant is not in the data centre the call was routed to.
    WrongDomain,
}

fn rejected(code: u32, message: &'static str) -> Rejection {
    Rejection::Gateway { code, message }
}

impl IntoResponse for Rejection {
    fn into_response(self) -> Response {
        match self {
            Rejection::Gateway { code, message } => {
                let status = StatusCode::from_u16(519).expect("519 is a valid status code");
                (status, Json(json!({"code": code, "msg": message}))).into_response()
            }
            Rejection::RateLimited => {
                (StatusCode::TOO_MANY_REQUESTS, "rate limited").into_response()
            }
            Rejection::WrongDomain => (StatusCode::BAD_GATEWAY, "tenant not here").into_response(),
        }
    }
}

impl crate::Simulator {
    /// Checks a call like the gateway; `Err` is the rejection to send. `business` calls also need an
    /// app-token and the tenant's router address.
    pub(crate) fn admit(
        &self,
        method: &str,
        path: &str,
        headers: &HeaderMap,
        query: &[(String, String)],
        business: bool,
    ) -> Result<(), Rejection> {
        let config = &self.config.gateway;
        let stats = &self.stats;
        bump(&stats.calls);
        let header = |name: &str| {
            headers
                .get(name)
                .and_then(|value| value.to_str().ok())
                .unwrap_or("")
        };
        if header("X-Api-ClientID") != config.client_id {
            bump(&stats.rejected_client);
            return Err(rejected(4003, "client id invalid"));
        }
        let signed = header("X-Api-SignHeaders").to_ascii_lowercase();
        if !(signed.contains("x-api-timestamp") && signed.contains("x-api-nonce")) {
            bump(&stats.rejected_signature);
            return Err(rejected(4007, "sign headers invalid"));
        }
        let timestamp = header("X-Api-TimeStamp");
        let within_window = timestamp
            .parse::<i64>()
            .ok()
            .and_then(DateTime::from_timestamp_millis)
            .is_some_and(|at| {
                (Utc::now() - at).abs().to_std().unwrap_or(Duration::MAX) <= config.timestamp_window
            });
        if !within_window {
            bump(&stats.rejected_timestamp);
            return Err(rejected(4006, "timestamp invalid"));
        }
        let expected = SignatureInput {
            method,
            path,
            query,
            nonce: header("X-Api-Nonce"),
            timestamp,
        }
        .signature(&config.client_secret);
        if header("X-Api-Signature") != expected {
            bump(&stats.rejected_signature);
            tracing::warn!(path, "signature mismatch");
            return Err(rejected(4008, "signature invalid"));
        }

        let mut gate = self.gate.lock().expect("gate lock");
        if config.calls_per_minute > 0 {
            let now = Instant::now();
            while gate
                .calls
                .front()
                .is_some_and(|at| now.duration_since(*at) >= Duration::from_secs(60))
            {
                gate.calls.pop_front();
            }
            if gate.calls.len() >= config.calls_per_minute as usize {
                bump(&stats.rate_limited);
                return Err(Rejection::RateLimited);
            }
            gate.calls.push_back(now);
            stats
                .max_calls_in_a_minute
                .fetch_max(gate.calls.len() as u64, Ordering::Relaxed);
        }
        if business {
            let token = header("app-token");
            if token.is_empty() {
                bump(&stats.rejected_token);
                return Err(rejected(4009, "token empty"));
            }
            match gate.tokens.get(token) {
                None => {
                    bump(&stats.rejected_token);
                    return Err(rejected(4010, "token invalid"));
                }
                Some(expiry) if *expiry <= Utc::now() => {
                    bump(&stats.rejected_token);
                    return Err(rejected(4011, "token expired"));
                }
                Some(_) => {}
            }
            if header("X-GW-Router-Addr") != gate.domain {
                bump(&stats.wrong_domain);
                return Err(Rejection::WrongDomain);
            }
        }
        Ok(())
    }
}
