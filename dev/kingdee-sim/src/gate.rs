//! The simulated gateway's strictness: client id, signature, timestamp window, app-token, router address,
//! a per-account-set call limit, rotating app_secret, a movable tenant domain, and injected faults.
//! It rejects the way the real gateway does: HTTP 519 with its codes, 429, 502.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::Json;
use axum::http::header::RETRY_AFTER;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
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

/// The demo app's credentials for a simulator at `addr`: what a client of it is configured with.
pub fn demo_credentials(addr: std::net::SocketAddr) -> conveyor_kingdee::Credentials {
    conveyor_kingdee::Credentials {
        base_url: format!("http://{addr}"),
        client_id: DEMO_CLIENT_ID.into(),
        client_secret: conveyor_base::Secret::new(DEMO_CLIENT_SECRET),
        outer_instance_id: DEMO_OUTER_INSTANCE_ID.into(),
        account: None,
        ca: None,
    }
}

/// How strict and how unreliable the gateway is.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    pub client_id: String,
    pub client_secret: String,
    pub outer_instance_id: String,
    /// Name of the active account set whose data the simulator serves (an inactive one is returned
    /// beside it).
    pub account_name: String,
    /// More active account sets the tenant authorized the app for, by name: push_app_authorize returns
    /// them too, each with its own app_key and app_secret, and the token call accepts each. A client
    /// must pick the one it is configured for; [`crate::Simulator::token_accounts`] tells which it took.
    pub other_accounts: Vec<String>,
    /// The tenant's data centre, expected in X-GW-Router-Addr.
    pub domain: String,
    /// How long an app-token is valid.
    pub token_lifetime: Duration,
    /// How often app_secret changes (None: never).
    pub secret_rotation: Option<Duration>,
    /// Calls allowed per account set in any 60 seconds (0: no limit).
    pub calls_per_minute: u32,
    /// The span the limit is counted over: `calls_per_minute` × span ÷ 60 s calls (at least one) in any
    /// such span. 60 s as the gateway documents it; a test shortens it so that calls above the limit meet
    /// 429s within seconds rather than after a minute's worth of calls.
    pub rate_window: Duration,
    /// Answer a 429 with `Retry-After`: the whole seconds (rounded up) until the oldest call counted
    /// leaves the window, so that a call made then is admitted.
    pub retry_after: bool,
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
            other_accounts: Vec::new(),
            domain: "https://tf.jdy.com".to_owned(),
            token_lifetime: Duration::from_secs(2 * 3600),
            secret_rotation: None,
            calls_per_minute: 0,
            rate_window: Duration::from_secs(60),
            retry_after: false,
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
    /// Times every app-token was revoked or expired on demand ([`crate::Simulator::revoke_tokens`]).
    pub tokens_invalidated: AtomicU64,
    /// Rows moved between two pages of a list query ([`crate::Simulator::arm_paging_change`]).
    pub paging_changes: AtomicU64,
    /// List calls answered with no rows at all (`count` 0): windows with nothing in them.
    pub empty_lists: AtomicU64,
    /// Rows served by list calls, all pages together: above the rows there are, rows read again.
    pub rows_served: AtomicU64,
}

/// A copy of [`Stats`] that serializes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(default)]
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
    pub tokens_invalidated: u64,
    pub paging_changes: u64,
    pub empty_lists: u64,
    pub rows_served: u64,
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
            tokens_invalidated: read(&self.tokens_invalidated),
            paging_changes: read(&self.paging_changes),
            empty_lists: read(&self.empty_lists),
            rows_served: read(&self.rows_served),
        }
    }
}

pub(crate) fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// Arrival times kept for [`crate::Simulator::call_arrivals`]: the most recent ones, so that a long run
/// keeps a bounded memory.
const ARRIVALS_KEPT: usize = 200_000;

/// One active account set the tenant authorized the app for.
#[derive(Debug, Clone)]
pub(crate) struct AccountSet {
    pub name: String,
    pub id: String,
    pub app_key: String,
}

/// The gateway's changing state.
#[derive(Debug)]
pub(crate) struct GateState {
    /// The active account sets: the configured one first, then `other_accounts`.
    pub accounts: Vec<AccountSet>,
    secret_generation: u64,
    secret_since: Instant,
    pub domain: String,
    /// Each valid app-token with its expiry and the index of its account set.
    tokens: HashMap<String, (DateTime<Utc>, usize)>,
    tokens_made: u64,
    /// The account set of every token issued, in order.
    pub issued_for: Vec<String>,
    /// Calls allowed per account set in any 60 seconds (0: no limit): the configured limit until
    /// [`crate::Simulator::set_rate_limit`] changes it, as another client of the app would.
    pub calls_per_minute: u32,
    /// Calls admitted within the last `rate_window`, for the limit.
    limited: VecDeque<Instant>,
    /// Calls admitted within the last 60 seconds, for `max_calls_in_a_minute`.
    minute: VecDeque<Instant>,
    /// When each admitted call arrived (the latest [`ARRIVALS_KEPT`]).
    pub arrivals: VecDeque<Instant>,
    pub started: Instant,
}

impl GateState {
    pub fn new(config: &GatewayConfig) -> Self {
        let accounts = std::iter::once(config.account_name.clone())
            .chain(config.other_accounts.iter().cloned())
            .enumerate()
            .map(|(index, name)| AccountSet {
                name,
                id: format!("{}", 1_760_000_000_000_000_001u64 + 10 * index as u64),
                // The configured account keeps the key it always had; 8 characters like the real ones.
                app_key: if index == 0 {
                    "SimKey01".to_owned()
                } else {
                    format!("SimKey{:02}", 10 + index)
                },
            })
            .collect();
        Self {
            accounts,
            secret_generation: 0,
            secret_since: Instant::now(),
            domain: config.domain.clone(),
            tokens: HashMap::new(),
            tokens_made: 0,
            issued_for: Vec::new(),
            calls_per_minute: config.calls_per_minute,
            limited: VecDeque::new(),
            minute: VecDeque::new(),
            arrivals: VecDeque::new(),
            started: Instant::now(),
        }
    }

    /// The app_secret of account set `account` at the current generation.
    fn secret_for(&self, config: &GatewayConfig, account: usize) -> String {
        let message = match account {
            0 => format!("app-secret-{}", self.secret_generation),
            _ => format!("app-secret-{account}-{}", self.secret_generation),
        };
        sign::hmac_hex(&config.client_secret, &message)[..40].to_owned()
    }

    /// The current app_secret of account set `account`, every secret rotated first if its period has
    /// passed.
    pub fn app_secret(&mut self, config: &GatewayConfig, account: usize) -> String {
        if let Some(period) = config.secret_rotation
            && self.secret_since.elapsed() >= period
        {
            self.secret_generation += 1;
            self.secret_since = Instant::now();
            tracing::info!(generation = self.secret_generation, "app_secret rotated");
        }
        self.secret_for(config, account)
    }

    pub fn issue_token(&mut self, lifetime: Duration, account: usize) -> (String, DateTime<Utc>) {
        self.tokens_made += 1;
        let token = format!(
            "sim.{}.{}",
            self.tokens_made,
            sign::hmac_hex(
                &self.accounts[account].app_key,
                &Utc::now().timestamp_nanos_opt().unwrap_or(0).to_string()
            )
        );
        let expires = Utc::now() + lifetime;
        self.tokens.retain(|_, (expiry, _)| *expiry > Utc::now());
        self.tokens.insert(token.clone(), (expires, account));
        self.issued_for.push(self.accounts[account].name.clone());
        (token, expires)
    }

    /// Forgets every app-token: calls with one are answered 4010 (token invalid).
    pub fn revoke_tokens(&mut self) {
        self.tokens.clear();
    }

    /// Makes every app-token expire now: calls with one are answered 4011 (token expired).
    pub fn expire_tokens(&mut self) {
        let now = Utc::now();
        for (expiry, _) in self.tokens.values_mut() {
            *expiry = now;
        }
    }

    /// Counts a call against the limit; over the limit, it is not counted, and the error is how long
    /// until a call would be admitted.
    fn admit_call(&mut self, config: &GatewayConfig, stats: &Stats) -> Result<(), Duration> {
        let now = Instant::now();
        if self.calls_per_minute > 0 {
            let window = config.rate_window.max(Duration::from_millis(1));
            while self
                .limited
                .front()
                .is_some_and(|at| now.duration_since(*at) >= window)
            {
                self.limited.pop_front();
            }
            let allowed = (f64::from(self.calls_per_minute) * window.as_secs_f64() / 60.0)
                .round()
                .max(1.0) as usize;
            if self.limited.len() >= allowed {
                // The oldest calls leave the window first: once enough have, one more is admitted.
                let frees_at = self.limited[self.limited.len() - allowed] + window;
                return Err(frees_at.saturating_duration_since(now));
            }
            self.limited.push_back(now);
        }
        while self
            .minute
            .front()
            .is_some_and(|at| now.duration_since(*at) >= Duration::from_secs(60))
        {
            self.minute.pop_front();
        }
        self.minute.push_back(now);
        stats
            .max_calls_in_a_minute
            .fetch_max(self.minute.len() as u64, Ordering::Relaxed);
        if self.arrivals.len() == ARRIVALS_KEPT {
            self.arrivals.pop_front();
        }
        self.arrivals.push_back(now);
        Ok(())
    }
}

/// The most calls among `arrivals` (in order) that fall within any span of `window`, ends included.
pub fn most_calls_within(arrivals: &[Duration], window: Duration) -> usize {
    let mut most = 0;
    let mut first = 0;
    for (last, at) in arrivals.iter().enumerate() {
        while *at - arrivals[first] > window {
            first += 1;
        }
        most = most.max(last + 1 - first);
    }
    most
}

/// How `arrivals` (in order) break a call budget of `calls_per_minute`; empty if they keep it. A paced
/// client passes both checks; one that is not fails them:
/// - within any span of each of `windows` (W), at most `calls_per_minute` × W ÷ 60 s + 1 calls arrive
///   (the one is the fencepost: N calls evenly spaced span N - 1 gaps);
/// - the first and the last call are at least (calls - 1) × 60 s ÷ `calls_per_minute` apart, so the
///   budget, not the client's own speed, set the pace.
pub fn budget_breaches(
    arrivals: &[Duration],
    calls_per_minute: u32,
    windows: &[Duration],
) -> Vec<String> {
    let mut breaches = Vec::new();
    let per_second = f64::from(calls_per_minute) / 60.0;
    for window in windows {
        let most = most_calls_within(arrivals, *window);
        let bound = per_second * window.as_secs_f64() + 1.0;
        if most as f64 > bound {
            breaches.push(format!(
                "{most} calls within {window:?}, where the budget allows {bound:.1}"
            ));
        }
    }
    if let (Some(first), Some(last)) = (arrivals.first(), arrivals.last()) {
        let span = (*last - *first).as_secs_f64();
        let least = (arrivals.len() - 1) as f64 / per_second;
        if span < least {
            breaches.push(format!(
                "{} calls within {span:.3} s, where the budget needs at least {least:.3} s",
                arrivals.len()
            ));
        }
    }
    breaches
}

/// How the gateway turns a call away.
#[derive(Debug)]
pub(crate) enum Rejection {
    /// HTTP 519 with a gateway code.
    Gateway { code: u32, message: &'static str },
    /// HTTP 429, with `Retry-After` when the gateway is configured to send it.
    RateLimited { retry_after: Option<Duration> },
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
            Rejection::RateLimited { retry_after } => {
                let mut response = (StatusCode::TOO_MANY_REQUESTS, "rate limited").into_response();
                if let Some(wait) = retry_after {
                    let seconds = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
                    response
                        .headers_mut()
                        .insert(RETRY_AFTER, HeaderValue::from(seconds));
                }
                response
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
        if let Err(wait) = gate.admit_call(config, stats) {
            bump(&stats.rate_limited);
            return Err(Rejection::RateLimited {
                retry_after: config.retry_after.then_some(wait),
            });
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
                Some((expiry, _)) if *expiry <= Utc::now() => {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn millis(times: &[u64]) -> Vec<Duration> {
        times.iter().map(|&ms| Duration::from_millis(ms)).collect()
    }

    #[test]
    fn the_busiest_span_is_counted_with_both_ends() {
        let arrivals = millis(&[0, 100, 200, 1_000, 1_050, 1_100, 1_150, 3_000]);
        assert_eq!(most_calls_within(&arrivals, Duration::from_millis(150)), 4);
        assert_eq!(
            most_calls_within(&arrivals, Duration::from_millis(1_000)),
            5
        );
        assert_eq!(most_calls_within(&arrivals, Duration::from_millis(10)), 1);
        assert_eq!(most_calls_within(&[], Duration::from_secs(1)), 0);
    }

    #[test]
    fn evenly_paced_calls_keep_the_budget_and_a_burst_breaks_it() {
        // 600 calls a minute: one every 100 ms is exactly the budget.
        let paced: Vec<u64> = (0..50).map(|n| n * 102).collect();
        assert!(
            budget_breaches(&millis(&paced), 600, &[Duration::from_secs(1)]).is_empty(),
            "{:?}",
            budget_breaches(&millis(&paced), 600, &[Duration::from_secs(1)])
        );
        let burst: Vec<u64> = (0..50).map(|n| n * 20).collect();
        let breaches = budget_breaches(&millis(&burst), 600, &[Duration::from_secs(1)]);
        assert_eq!(breaches.len(), 2, "{breaches:?}");
        assert!(
            breaches[0].starts_with("50 calls within 1s"),
            "{breaches:?}"
        );
        assert!(
            breaches[1].contains("needs at least 4.900 s"),
            "{breaches:?}"
        );
    }
}
