//! One call to the target: its URL, the bearer token, the request under a concurrency permit, and
//! keeping count of the calls in a row that find the target unavailable.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use conveyor_base::Secret;
use reqwest::{Method, StatusCode};
use serde::Serialize;

use super::classify::{Answer, StatusClass, class_of, classify_error, classify_status, is_down};
use super::setup::{Auth, HttpTarget};
use crate::target::WriteError;

/// Renew a token this long before the target says it expires (a quarter of its life if that is shorter).
const TOKEN_MARGIN: Duration = Duration::from_secs(30);

impl HttpTarget {
    pub(super) fn url(&self, path: &str, key: Option<&str>) -> String {
        match key {
            Some(key) => format!(
                "{}{}",
                self.base,
                path.replace("{key}", &percent_encode(key))
            ),
            None => format!("{}{path}", self.base),
        }
    }

    /// One write call, classified.
    pub(super) async fn call(
        &self,
        method: Method,
        url: &str,
        body: &(impl Serialize + Sync),
        header: Option<(&str, String)>,
    ) -> Result<Answer, WriteError> {
        let response = self.send(method, url, Some(body), header).await?;
        let status = response.status();
        if status.is_success() {
            self.served();
            return Ok(Answer::Applied);
        }
        if class_of(status, &self.spec.errors) == StatusClass::Exists {
            self.served();
            return Ok(Answer::AlreadyThere);
        }
        Err(self.sort_failure(status, &response.text().await.unwrap_or_default()))
    }

    /// Sorts an answer that is not a success ([`classify_status`]) and keeps count of the calls that
    /// find the target unavailable.
    pub(super) fn sort_failure(&self, status: StatusCode, body: &str) -> WriteError {
        let error = classify_status(status, body, &self.spec.errors);
        if class_of(status, &self.spec.errors) == StatusClass::Unavailable {
            self.failed(error)
        } else {
            self.served();
            error
        }
    }

    /// A call got an answer from a target that serves (whatever it says about the data).
    pub(super) fn served(&self) {
        self.failing.store(0, Ordering::Relaxed);
    }

    /// A call got no answer (refused, timed out, broken) or one saying that the service is unavailable
    /// (429, 502, 503, 504). From `errors.unavailable_after` such calls in a row on, the target counts
    /// as down: the error becomes [`WriteError::Unavailable`], on which the writer's circuit breaker
    /// holds back every write until the target's probe answers again (and the first such failure
    /// after that opens it again).
    fn failed(&self, error: WriteError) -> WriteError {
        let in_a_row = self
            .failing
            .fetch_add(1, Ordering::Relaxed)
            .saturating_add(1);
        match error {
            WriteError::Transient(message) if in_a_row >= self.spec.errors.unavailable_after => {
                WriteError::Unavailable(format!(
                    "{in_a_row} calls in a row failed, the last: {message}"
                ))
            }
            error => error,
        }
    }

    /// The bearer token of the next call, if the target wants one: the static token, or the token
    /// endpoint's, cached until shortly before it expires (`renew` fetches a new one regardless).
    pub(super) async fn token(&self, renew: bool) -> Result<Option<Secret>, WriteError> {
        let (url, client_id, client_secret, cached) = match &self.auth {
            Auth::None => return Ok(None),
            Auth::Static(token) => return Ok(Some(token.clone())),
            Auth::Endpoint {
                url,
                client_id,
                client_secret,
                cached,
            } => (url, client_id, client_secret, cached),
        };
        let mut cached = cached.lock().await;
        if !renew
            && let Some((token, until)) = cached.as_ref()
            && Instant::now() < *until
        {
            return Ok(Some(token.clone()));
        }
        #[derive(serde::Deserialize)]
        struct Granted {
            access_token: String,
            #[serde(default)]
            expires_in: Option<u64>,
        }
        let response = self
            .client
            .post(url)
            .form(&[
                ("grant_type", "client_credentials"),
                ("client_id", client_id.as_str()),
                ("client_secret", client_secret.expose()),
            ])
            .send()
            .await
            .map_err(|err| self.failed(classify_error("token endpoint", err)))?;
        let status = response.status();
        if !status.is_success() {
            // A token endpoint that cannot serve counts as the target unavailable; any other refusal
            // is a setup error (the credentials, or auth.path), never the records'.
            if is_down(status) || status.is_server_error() {
                return Err(self.failed(WriteError::Transient(format!(
                    "token endpoint answered {status}"
                ))));
            }
            self.served();
            return Err(WriteError::Refused(format!(
                "token endpoint answered {status}: check CONVEYOR_HTTP_TARGET_CLIENT_ID, \
                 CONVEYOR_HTTP_TARGET_CLIENT_SECRET and the pipeline's target.auth.path"
            )));
        }
        let granted: Granted = response.json().await.map_err(|err| {
            WriteError::Transient(format!("token endpoint answered no token: {err}"))
        })?;
        let lifetime = Duration::from_secs(granted.expires_in.unwrap_or(300));
        let token = Secret::new(granted.access_token);
        let margin = TOKEN_MARGIN.min(lifetime / 4);
        *cached = Some((token.clone(), Instant::now() + lifetime - margin));
        Ok(Some(token))
    }

    /// Sends a request under a concurrency permit, with a bearer token when configured; after a 401 it
    /// fetches a fresh token and tries once more.
    pub(super) async fn send(
        &self,
        method: Method,
        url: &str,
        body: Option<&(impl Serialize + Sync)>,
        header: Option<(&str, String)>,
    ) -> Result<reqwest::Response, WriteError> {
        let _permit = self
            .permits
            .acquire()
            .await
            .map_err(|_| WriteError::Transient("the writer is stopping".into()))?;
        let mut renew = false;
        loop {
            let mut request = self
                .client
                .request(method.clone(), url)
                .headers(self.headers.clone());
            if let Some(token) = self.token(renew).await? {
                request = request.bearer_auth(token.expose());
            }
            if let Some((name, value)) = &header {
                request = request.header(*name, value);
            }
            if let Some(body) = body {
                request = request.json(body);
            }
            let response = request
                .send()
                .await
                .map_err(|err| self.failed(classify_error(&self.spec.path, err)))?;
            if response.status() == StatusCode::UNAUTHORIZED && self.auth.renewable() && !renew {
                renew = true;
                continue;
            }
            return Ok(response);
        }
    }
}

/// Percent-encodes a key for a URL path segment.
pub(super) fn percent_encode(key: &str) -> String {
    let mut out = String::with_capacity(key.len());
    for byte in key.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}
