//! The gateway client: the auth flow (push_app_authorize → app_signature → kingdee_auth_token), a cached
//! app-token refreshed before it expires by one task at a time, signed business calls, and retries.
//! With a [`SessionStore`], the token is also saved for every process of the account set: a restarted
//! or added fetcher takes it up instead of running the auth flow again.
//!
//! What each answer means, and what the client does about it:
//! - HTTP 519 with 4010/4011 (token invalid/expired): fetch a new token, retry.
//! - errcode 1030002006 on the token call (stale app_secret): authorize again, retry.
//! - HTTP 502 (the tenant moved data centre): authorize again to learn the new domain, retry.
//! - HTTP 429 and gateway 5007 (throttled): tell the rate budget, which may hold every call back
//!   (the shared one does, and cuts its rate); else wait as `Retry-After` says, or a growing pause. Then
//!   call again: not a failed try (see `THROTTLE`). A call still refused after `THROTTLE_PATIENCE`
//!   ends as [`GatewayError::Throttled`]: the work is put back for later, with no attempt counted.
//! - Gateway 5003/5004/5006, 5xx, network errors, unreadable bodies: back off with jitter, retry.
//! - 4003/4005/4008/4012 (a wrong client id or secret, a missing permission):
//!   [`GatewayError::Refused`], a setup error; the fetcher holds its work back until the credentials
//!   are accepted (`conveyor_runtime::refusal`). Every code's reason is said in words.
//! - 4007, HTTP 404 and business errors: fail with the gateway's reason (retrying cannot help).

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use conveyor_base::Secret;
use conveyor_base::backoff::Backoff;
use conveyor_base::metrics::Metrics;
use conveyor_base::source::{RateBudget, SavedSession, SessionStore};
use conveyor_base::tls;
use rand::RngExt as _;
use serde::de::DeserializeOwned;
use serde_json::Value;
use serde_json::value::RawValue;
use tokio::sync::Mutex;

use crate::account::{AccountSet, choose_account};
use crate::answer::{Answer, read_answer};
use crate::settings::Credentials;
use crate::sign::{self, SignatureInput};

pub const AUTHORIZE_PATH: &str = "/jdyconnector/app_management/push_app_authorize";
pub const TOKEN_PATH: &str = "/jdyconnector/app_management/kingdee_auth_token";
/// Tries of one call before it fails.
const ATTEMPTS: u32 = 8;

/// Why a call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GatewayError {
    /// Still failing after every retry; trying again later may work.
    #[error("{0}")]
    Transient(String),
    /// Retrying cannot help: wrong credentials, a refused signature, a business error.
    #[error("{0}")]
    Permanent(String),
    /// Throttled for longer than one call waits: the work should be put back for later, no fault.
    #[error("{0}")]
    Throttled(String),
    /// The gateway refuses the app's credentials or permissions: a setup error, no fault of the work.
    #[error("{0}")]
    Refused(String),
}

/// The account set's keys and data centre, from push_app_authorize.
#[derive(Debug, Clone)]
struct Authorization {
    app_key: String,
    app_secret: Secret,
    domain: String,
    account_name: String,
}

#[derive(Debug, Default)]
struct Session {
    authorization: Option<Authorization>,
    /// The app-token, and the domain it was fetched for.
    token: Option<SavedSession>,
}

/// Whether `token` is young enough to use: it is refreshed once 80% of its lifetime has passed, well
/// before the gateway refuses it.
fn fresh(token: &SavedSession, now: DateTime<Utc>) -> bool {
    let lifetime = token.expires_at - token.fetched_at;
    now < token.fetched_at + lifetime * 4 / 5
}

fn ticket_of(token: &SavedSession) -> Ticket {
    Ticket {
        token: token.token.clone(),
        domain: token.address.clone(),
    }
}

/// What a business call needs from the session.
#[derive(Debug, Clone)]
struct Ticket {
    token: Secret,
    domain: String,
}

/// What the token check found (for `conveyorctl kingdee token`).
#[derive(Debug, Clone)]
pub struct TokenReport {
    pub account_name: String,
    pub domain: String,
    pub expires_at: DateTime<Utc>,
}

/// The client. Cheap to share behind an `Arc`; calls may run concurrently.
pub struct Gateway<B> {
    http: reqwest::Client,
    credentials: Credentials,
    budget: B,
    session: Mutex<Session>,
    saved: Option<Arc<dyn SessionStore>>,
    metrics: Metrics,
    pipeline: String,
}

impl<B: RateBudget> Gateway<B> {
    pub fn new(credentials: Credentials, budget: B, metrics: Metrics, pipeline: &str) -> Self {
        let http = tls::http_client(credentials.ca.as_ref())
            .timeout(Duration::from_secs(30))
            .build()
            .expect("an HTTP client with a checked TLS configuration builds");
        Self {
            http,
            credentials,
            budget,
            session: Mutex::new(Session::default()),
            saved: None,
            metrics,
            pipeline: pipeline.to_owned(),
        }
    }

    /// Keeps the app-token in `store` too, shared with every process of the account set.
    pub fn with_session_store(mut self, store: impl SessionStore) -> Self {
        self.saved = Some(Arc::new(store));
        self
    }

    /// A signed business GET; returns the response's `data` read as `T`. Retries what can be
    /// retried, including an answer whose data is not a `T`. Throttling is waited out, not counted as
    /// a failed try (see `THROTTLE`).
    pub async fn get<T: DeserializeOwned>(
        &self,
        path: &str,
        query: &[(String, String)],
    ) -> Result<T, GatewayError> {
        let mut last = String::new();
        let mut failed_tries = 0;
        let mut throttled = Throttled::default();
        while failed_tries < ATTEMPTS {
            let ticket = self.ticket(true).await?;
            let answer = self
                .exchange(reqwest::Method::GET, path, query, Some(&ticket))
                .await?;
            match answer {
                Answer::Data(data) => {
                    self.count_request("ok");
                    return Ok(data);
                }
                Answer::Throttled {
                    reason,
                    retry_after,
                } => {
                    self.metrics
                        .source_throttled
                        .with_label_values(&[&self.pipeline])
                        .inc();
                    self.count_request("retried");
                    let Some(wait) = throttled.next_wait(retry_after) else {
                        return Err(GatewayError::Throttled(format!(
                            "GET {path}: throttled by the gateway for {} s: {reason}",
                            THROTTLE_PATIENCE.as_secs()
                        )));
                    };
                    if self.budget.throttled(retry_after).await {
                        tracing::warn!(
                            path,
                            reason,
                            "throttled by the gateway; the call budget holds every call back, then \
                             this one is made again (not a failed try)"
                        );
                    } else {
                        tracing::warn!(
                            path,
                            reason,
                            wait_secs = wait.as_secs_f64(),
                            "throttled by the gateway; waiting, then calling again (not a failed try)"
                        );
                        tokio::time::sleep(wait).await;
                    }
                    continue;
                }
                Answer::Retry { reason } => {
                    tracing::warn!(path, failed_tries, reason, "gateway call will be retried");
                    last = reason;
                }
                Answer::TokenRejected { reason } => {
                    tracing::info!(path, reason, "app-token refused; fetching a new one");
                    self.forget_token(&ticket.token).await;
                    last = reason;
                }
                Answer::TenantMoved | Answer::StaleSecret => {
                    tracing::info!(path, "tenant moved or secret stale; authorizing again");
                    self.forget_authorization(&ticket).await;
                    last = "HTTP 502: the tenant's data centre moved".into();
                }
                Answer::Fatal(reason) => {
                    self.count_request("failed");
                    return Err(GatewayError::Permanent(format!("GET {path}: {reason}")));
                }
                Answer::Refused(reason) => {
                    self.count_request("failed");
                    return Err(GatewayError::Refused(format!("GET {path}: {reason}")));
                }
            }
            self.count_request("retried");
            failed_tries += 1;
            if failed_tries < ATTEMPTS {
                tokio::time::sleep(RETRY.jittered(failed_tries)).await;
            }
        }
        self.count_request("failed");
        Err(GatewayError::Transient(format!(
            "GET {path}: still failing after {ATTEMPTS} tries: {last}"
        )))
    }

    /// Refuses a gateway whose HTTPS certificate is not trusted (see [`tls::check_server`]): asked once
    /// at start, so that a wrong CA setting stops the process instead of failing every call.
    pub async fn check_tls(&self) -> Result<(), GatewayError> {
        tls::check_server(
            &self.http,
            &self.credentials.base_url,
            "CONVEYOR_KINGDEE_TLS_CA_FILE",
        )
        .await
        .map_err(|advice| {
            GatewayError::Permanent(format!("{}: {advice}", self.credentials.base_url))
        })
    }

    /// Whether the gateway accepts the app's credentials: its TLS, then an app-token, the one another
    /// process saved if it is fresh (logins are few: the token calls are counted), else through the
    /// auth flow. A saved token proves less (the client secret signs every call too), so a wrong secret
    /// may show only at the first call, as [`GatewayError::Refused`] all the same.
    pub async fn check_credentials(&self) -> Result<(), GatewayError> {
        self.check_tls().await?;
        self.ticket(true).await.map(drop)
    }

    /// Authorizes and fetches a token now, for an operator checking the credentials.
    pub async fn check_token(&self) -> Result<TokenReport, GatewayError> {
        self.check_tls().await?;
        {
            let mut session = self.session.lock().await;
            session.token = None;
        }
        self.ticket(false).await?;
        let session = self.session.lock().await;
        let authorization = session.authorization.as_ref().expect("ticket() authorized");
        let token = session.token.as_ref().expect("ticket() fetched a token");
        Ok(TokenReport {
            account_name: authorization.account_name.clone(),
            domain: authorization.domain.clone(),
            expires_at: token.expires_at,
        })
    }

    fn count_request(&self, outcome: &str) {
        self.metrics
            .source_requests
            .with_label_values(&[&self.pipeline, outcome])
            .inc();
    }

    /// The current token and domain, authorizing and fetching a token first if needed. The session lock
    /// is held while refreshing, so however many tasks call, one refresh runs and the rest wait for it.
    /// With `reuse_saved`, a fresh token another process saved is taken up first.
    async fn ticket(&self, reuse_saved: bool) -> Result<Ticket, GatewayError> {
        let mut session = self.session.lock().await;
        if let Some(token) = session
            .token
            .as_ref()
            .filter(|token| fresh(token, Utc::now()))
        {
            return Ok(ticket_of(token));
        }
        let mut _login = None;
        if reuse_saved && let Some(store) = &self.saved {
            // Before waiting for another process's login, and after it: it may have saved a token.
            for wait_for_login in [false, true] {
                if wait_for_login {
                    // Held until this login ends.
                    match store.lock_login().await {
                        Ok(guard) => _login = Some(guard),
                        Err(err) => tracing::warn!(%err, "cannot wait for other processes' login"),
                    }
                }
                if let Some(token) = self.load_saved().await {
                    let ticket = ticket_of(&token);
                    session.token = Some(token);
                    return Ok(ticket);
                }
            }
        }
        let mut last = String::new();
        for attempt in 0..ATTEMPTS {
            if attempt > 0 {
                tokio::time::sleep(RETRY.jittered(attempt)).await;
            }
            if session.authorization.is_none() {
                match self.authorize().await {
                    Ok(authorization) => session.authorization = Some(authorization),
                    Err(Answer::Fatal(reason)) => return Err(GatewayError::Permanent(reason)),
                    Err(Answer::Refused(reason)) => {
                        return Err(GatewayError::Refused(format!("authorizing: {reason}")));
                    }
                    Err(Answer::Retry { reason } | Answer::Throttled { reason, .. }) => {
                        last = reason;
                        continue;
                    }
                    Err(Answer::TokenRejected { reason }) => {
                        last = reason;
                        continue;
                    }
                    Err(Answer::TenantMoved) => {
                        last = "push_app_authorize answered HTTP 502".into();
                        continue;
                    }
                    Err(Answer::StaleSecret) => {
                        last = "push_app_authorize answered errcode 1030002006".into();
                        continue;
                    }
                    Err(Answer::Data(_)) => unreachable!("authorize returns data as Ok"),
                }
            }
            let authorization = session.authorization.clone().expect("authorized above");
            match self.fetch_token(&authorization).await {
                Ok(token) => {
                    self.save(&token).await;
                    let ticket = ticket_of(&token);
                    session.token = Some(token);
                    return Ok(ticket);
                }
                Err(Answer::StaleSecret) => {
                    tracing::info!("app_secret is stale; authorizing again");
                    session.authorization = None;
                    last = "app_secret stale (1030002006)".into();
                }
                Err(Answer::Fatal(reason)) => return Err(GatewayError::Permanent(reason)),
                Err(Answer::Refused(reason)) => {
                    return Err(GatewayError::Refused(format!(
                        "fetching an app-token: {reason}"
                    )));
                }
                Err(
                    Answer::Retry { reason }
                    | Answer::Throttled { reason, .. }
                    | Answer::TokenRejected { reason },
                ) => last = reason,
                Err(Answer::TenantMoved) => session.authorization = None,
                Err(Answer::Data(_)) => unreachable!("fetch_token returns data as Ok"),
            }
        }
        Err(GatewayError::Transient(format!(
            "cannot get an app-token: {last}"
        )))
    }

    /// The saved token, when there is a store, it answers and the token is fresh. A store that fails
    /// costs an auth flow, not the call.
    async fn load_saved(&self) -> Option<SavedSession> {
        let store = self.saved.as_ref()?;
        match store.load().await {
            Ok(Some(token)) if fresh(&token, Utc::now()) => {
                tracing::info!(
                    expires_at = %token.expires_at,
                    "took up the saved app-token"
                );
                Some(token)
            }
            Ok(_) => None,
            Err(err) => {
                tracing::warn!(%err, "cannot read the saved app-token; fetching one");
                None
            }
        }
    }

    async fn save(&self, token: &SavedSession) {
        if let Some(store) = &self.saved
            && let Err(err) = store.save(token).await
        {
            tracing::warn!(%err, "cannot save the app-token for other processes");
        }
    }

    /// Drops the refused token here and in the store, unless a newer one replaced it meanwhile.
    async fn forget_token(&self, refused: &Secret) {
        let mut session = self.session.lock().await;
        if session
            .token
            .as_ref()
            .is_some_and(|token| token.token == *refused)
        {
            session.token = None;
        }
        self.forget_saved(refused).await;
    }

    async fn forget_authorization(&self, ticket: &Ticket) {
        let mut session = self.session.lock().await;
        let moved = |domain: &str| domain == ticket.domain;
        if session.token.as_ref().is_some_and(|t| moved(&t.address))
            || session
                .authorization
                .as_ref()
                .is_some_and(|a| moved(&a.domain))
        {
            session.authorization = None;
            session.token = None;
        }
        self.forget_saved(&ticket.token).await;
    }

    async fn forget_saved(&self, refused: &Secret) {
        if let Some(store) = &self.saved
            && let Err(err) = store.forget(refused).await
        {
            tracing::warn!(%err, "cannot drop the refused app-token from the store");
        }
    }

    /// push_app_authorize: the account set's app_key, app_secret and domain.
    async fn authorize(&self) -> Result<Authorization, Answer> {
        self.metrics
            .source_token_refreshes
            .with_label_values(&[&self.pipeline])
            .inc();
        let query = [(
            "outerInstanceId".to_owned(),
            self.credentials.outer_instance_id.clone(),
        )];
        let data = match self
            .exchange(reqwest::Method::POST, AUTHORIZE_PATH, &query, None)
            .await
        {
            Ok(Answer::Data(data)) => data,
            Ok(other) => return Err(other),
            // Only the rate budget fails an exchange: worth retrying, not a fault of the credentials.
            Err(err) => {
                return Err(Answer::Retry {
                    reason: err.to_string(),
                });
            }
        };
        let sets: Vec<AccountSet> =
            serde_json::from_str(data.get()).map_err(|err| Answer::Retry {
                reason: format!("push_app_authorize answer: {err}"),
            })?;
        let set =
            choose_account(&sets, self.credentials.account.as_deref()).map_err(Answer::Fatal)?;
        tracing::info!(
            account = set.account_name,
            domain = set.domain,
            "authorized"
        );
        Ok(Authorization {
            app_key: set.app_key.clone(),
            app_secret: Secret::new(set.app_secret.clone()),
            domain: set.domain.clone(),
            account_name: set.account_name.clone(),
        })
    }

    /// kingdee_auth_token: a fresh app-token.
    async fn fetch_token(&self, authorization: &Authorization) -> Result<SavedSession, Answer> {
        self.metrics
            .source_token_refreshes
            .with_label_values(&[&self.pipeline])
            .inc();
        let query = [
            ("app_key".to_owned(), authorization.app_key.clone()),
            (
                "app_signature".to_owned(),
                sign::app_signature(&authorization.app_key, authorization.app_secret.expose()),
            ),
        ];
        let data = match self
            .exchange::<Box<RawValue>>(reqwest::Method::GET, TOKEN_PATH, &query, None)
            .await
        {
            Ok(Answer::Data(data)) => {
                serde_json::from_str::<Value>(data.get()).map_err(|err| Answer::Retry {
                    reason: format!("token answer: {err}"),
                })?
            }
            Ok(other) => return Err(other),
            // Only the rate budget fails an exchange: worth retrying, not a fault of the credentials.
            Err(err) => {
                return Err(Answer::Retry {
                    reason: err.to_string(),
                });
            }
        };
        let value = data["app-token"]
            .as_str()
            .filter(|token| !token.is_empty())
            .ok_or_else(|| Answer::Retry {
                reason: "token answer without app-token".into(),
            })?;
        let expires_ms = data["expires"]
            .as_i64()
            .or_else(|| data["expires"].as_str().and_then(|text| text.parse().ok()))
            .ok_or_else(|| Answer::Retry {
                reason: "token answer without expires".into(),
            })?;
        let now = Utc::now();
        let expires_at = DateTime::from_timestamp_millis(expires_ms).unwrap_or(now);
        tracing::info!(expires_at = %expires_at, "fetched an app-token");
        Ok(SavedSession {
            token: Secret::new(value),
            address: authorization.domain.clone(),
            expires_at,
            fetched_at: now,
        })
    }

    /// One signed HTTP exchange, read into an [`Answer`]. Errors only for a failing rate budget.
    async fn exchange<T: DeserializeOwned>(
        &self,
        method: reqwest::Method,
        path: &str,
        query: &[(String, String)],
        ticket: Option<&Ticket>,
    ) -> Result<Answer<T>, GatewayError> {
        let waited = self
            .budget
            .acquire()
            .await
            .map_err(GatewayError::Transient)?;
        self.metrics
            .source_rate_wait_seconds
            .with_label_values(&[&self.pipeline])
            .inc_by(waited.as_secs_f64());
        let timestamp = Utc::now().timestamp_millis().to_string();
        let nonce = rand::rng()
            .random_range(1_000_000_000u64..10_000_000_000)
            .to_string();
        let signature = SignatureInput {
            method: method.as_str(),
            path,
            query,
            nonce: &nonce,
            timestamp: &timestamp,
        }
        .signature(self.credentials.client_secret.expose());
        let mut request = self
            .http
            .request(
                method.clone(),
                format!("{}{path}", self.credentials.base_url),
            )
            .query(query)
            .header("Content-Type", "application/json")
            .header("X-Api-ClientID", &self.credentials.client_id)
            .header("X-Api-Auth-Version", "2.0")
            .header("X-Api-TimeStamp", &timestamp)
            .header("X-Api-Nonce", &nonce)
            .header("X-Api-SignHeaders", "X-Api-TimeStamp,X-Api-Nonce")
            .header("X-Api-Signature", signature);
        if let Some(ticket) = ticket {
            request = request
                .header("app-token", ticket.token.expose())
                .header("X-GW-Router-Addr", &ticket.domain);
        }
        if method == reqwest::Method::POST {
            request = request.body("{}");
        }
        let response = match request.send().await {
            Ok(response) => response,
            Err(err) => {
                // The URL carries the app key and signature, which open the account: never shown.
                let err = err.without_url();
                // Said plainly, with the setting that helps (the startup check catches it first).
                let reason = match tls::tls_failure(&err) {
                    Some(failure) => tls::advice(failure, "CONVEYOR_KINGDEE_TLS_CA_FILE"),
                    None => format!("request failed: {}", tls::error_chain(&err)),
                };
                return Ok(Answer::Retry { reason });
            }
        };
        let status = response.status().as_u16();
        let retry_after = retry_after(response.headers());
        let body = match response.bytes().await {
            Ok(body) => body,
            Err(err) => {
                return Ok(Answer::Retry {
                    reason: format!("reading the answer: {}", err.without_url()),
                });
            }
        };
        Ok(read_answer(status, retry_after, &body))
    }
}

/// The pause before a call is tried again: between half and all of 0.5 s, 1 s, 2 s, ... up to 16 s.
const RETRY: Backoff = Backoff::new(Duration::from_millis(250), Duration::from_secs(16));

/// The pause after a throttled call when the gateway does not say how long to wait: growing up to the
/// gateway's 60-s rate window, which by then has let every earlier call go.
const THROTTLE: Backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));

/// How long one call waits out throttling in all before it fails (as transient): short of the
/// broker's 30-minute consumer timeout, which would hand the delivery out again.
const THROTTLE_PATIENCE: Duration = Duration::from_secs(10 * 60);

/// One call's throttling so far.
#[derive(Default)]
struct Throttled {
    times: u32,
    since: Option<Instant>,
}

impl Throttled {
    /// The wait before calling again: what the gateway asked for, else [`THROTTLE`]'s next pause;
    /// `None` once [`THROTTLE_PATIENCE`] is spent (counted from the first refusal, whoever waited:
    /// this call, or the budget for every call).
    fn next_wait(&mut self, retry_after: Option<Duration>) -> Option<Duration> {
        self.times += 1;
        let since = *self.since.get_or_insert_with(Instant::now);
        let wait = retry_after
            .map(|wait| wait.min(THROTTLE.max))
            .unwrap_or_else(|| THROTTLE.jittered(self.times));
        (since.elapsed() + wait <= THROTTLE_PATIENCE).then_some(wait)
    }
}

/// `Retry-After` in seconds (the gateway's form; an HTTP date is not used by it and is ignored).
fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let seconds: f64 = headers
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()?;
    // Whatever the header holds, never a panic: a value out of range is no value.
    Duration::try_from_secs_f64(seconds).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_is_read_as_seconds_and_nonsense_is_ignored() {
        let header = |value: &str| {
            let mut headers = reqwest::header::HeaderMap::new();
            headers.insert(reqwest::header::RETRY_AFTER, value.parse().unwrap());
            retry_after(&headers)
        };
        assert_eq!(header("3"), Some(Duration::from_secs(3)));
        assert_eq!(header(" 0.5 "), Some(Duration::from_millis(500)));
        for nonsense in ["-1", "1e300", "NaN", "inf", "Wed, 21 Oct 2026 07:28:00 GMT"] {
            assert_eq!(header(nonsense), None, "{nonsense}");
        }
        assert_eq!(retry_after(&reqwest::header::HeaderMap::new()), None);
    }

    #[test]
    fn throttling_waits_as_told_and_gives_up_only_when_its_patience_is_spent() {
        let mut throttled = Throttled::default();
        assert_eq!(
            throttled.next_wait(Some(Duration::from_secs(3))),
            Some(Duration::from_secs(3))
        );
        // A wait longer than the gateway's window is not believed.
        assert_eq!(
            throttled.next_wait(Some(Duration::from_secs(3600))),
            Some(THROTTLE.max)
        );
        // Without Retry-After the pause grows, up to the window.
        let guessed = throttled.next_wait(None).unwrap();
        assert!(guessed >= Duration::from_secs(4) && guessed <= Duration::from_secs(8));
        // The patience is counted from the first refusal.
        let mut patient = Throttled {
            times: 0,
            since: Instant::now().checked_sub(THROTTLE_PATIENCE - Duration::from_secs(40)),
        };
        assert!(patient.next_wait(Some(Duration::from_secs(30))).is_some());
        assert_eq!(patient.next_wait(Some(Duration::from_secs(50))), None);
    }
}
