//! The HTTP target: writes records to another system's JSON write API, a record or a batch per call,
//! with a bounded number of calls in flight per writer process.
//!
//! Writes stay idempotent by the pipeline's id check: the target's own upsert (a 409 "already exists"
//! for one record counts as written; a 409 for a batch splits it), an idempotency-key header per
//! record, or an existence check before writing. Every answer and transport error is sorted into
//! transient (retry) or permanent (the data is at fault) in one place, [`class_of`] (with the pipeline
//! file's `[target.errors]` overrides) and [`classify_error`]. Calls that get no answer, or one saying
//! that the service is unavailable (429, 502, 503, 504), one after another make the target
//! unavailable, so that the writer's circuit breaker holds back instead of retrying, and at last
//! dead-lettering, good records. Credentials come from the environment and are never logged.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use conveyor_base::tls::{self, CaBundle};
use conveyor_base::{Record, Secret, SettingsError};
use conveyor_pipeline::Pipeline;
use conveyor_pipeline::target::http::{
    AuthSpec, BodyShape, HttpErrorOverrides, HttpTargetSpec, IdCheckSpec, OnExists,
};
use futures_util::future::join_all;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use reqwest::{Method, StatusCode};
use serde::Serialize;
use serde_json::Value;
use serde_json::value::RawValue;
use tokio::sync::{Mutex, Semaphore};

use super::{Target, WriteError, WriteReport, newest_per_id};

/// Where the API is and its credentials (every flag also reads an environment variable).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct HttpArgs {
    /// Base URL of the HTTP target's API; the pipeline file's paths are appended to it.
    #[arg(long, env = "CONVEYOR_HTTP_TARGET_URL")]
    pub http_target_url: Option<String>,
    /// Static bearer token (auth kind "bearer"); never logged.
    #[arg(long, env = "CONVEYOR_HTTP_TARGET_TOKEN", hide_env_values = true)]
    pub http_target_token: Option<Secret>,
    /// File holding the bearer token, instead of CONVEYOR_HTTP_TARGET_TOKEN.
    #[arg(long, env = "CONVEYOR_HTTP_TARGET_TOKEN_FILE")]
    pub http_target_token_file: Option<PathBuf>,
    /// Client id for the token endpoint (auth kind "token_endpoint").
    #[arg(long, env = "CONVEYOR_HTTP_TARGET_CLIENT_ID")]
    pub http_target_client_id: Option<String>,
    /// Client secret for the token endpoint; never logged.
    #[arg(
        long,
        env = "CONVEYOR_HTTP_TARGET_CLIENT_SECRET",
        hide_env_values = true
    )]
    pub http_target_client_secret: Option<Secret>,
    /// File holding the client secret, instead of CONVEYOR_HTTP_TARGET_CLIENT_SECRET.
    #[arg(long, env = "CONVEYOR_HTTP_TARGET_CLIENT_SECRET_FILE")]
    pub http_target_client_secret_file: Option<PathBuf>,
    /// CA certificates (PEM) trusted for the target's HTTPS besides the public roots (a private CA).
    #[arg(long, env = "CONVEYOR_HTTP_TARGET_TLS_CA_FILE")]
    pub http_target_tls_ca_file: Option<PathBuf>,
}

/// How calls get their bearer token.
enum Auth {
    None,
    Static(Secret),
    Endpoint {
        url: String,
        client_id: String,
        client_secret: Secret,
        /// The current token and when to stop using it; one fetch at a time.
        cached: Mutex<Option<(Secret, Instant)>>,
    },
}

/// Renew a token this long before the target says it expires (a quarter of its life if that is shorter).
const TOKEN_MARGIN: Duration = Duration::from_secs(30);

impl Auth {
    fn renewable(&self) -> bool {
        matches!(self, Auth::Endpoint { .. })
    }
}

/// Why the target could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error(transparent)]
    Settings(#[from] SettingsError),
    #[error("target.headers: {0}")]
    Header(String),
    #[error("HTTP client: {0}")]
    Client(String),
    #[error("HTTP target {0}")]
    Tls(String),
}

pub struct HttpTarget {
    client: reqwest::Client,
    spec: HttpTargetSpec,
    base: String,
    /// The base URL as it may be logged (no user info, no query).
    endpoint: String,
    method: Method,
    headers: HeaderMap,
    auth: Auth,
    /// The output field with the record's version, to compare with the target's copy.
    version_field: String,
    /// Calls in flight, across every message this process handles at once.
    permits: Arc<Semaphore>,
    /// Calls in a row that got no answer, or one saying that the service is unavailable: from
    /// `errors.unavailable_after` on the target counts as down. Any other answer resets it.
    failing: AtomicU32,
}

/// What one call did.
enum Answer {
    Applied,
    /// 409: the target holds the record already.
    AlreadyThere,
}

impl HttpTarget {
    /// The target of `pipeline`'s `[target]` (an http one), its TLS checked: what a writer writes to.
    pub async fn open(
        pipeline: &Pipeline,
        spec: &HttpTargetSpec,
        args: &HttpArgs,
    ) -> Result<Self, SetupError> {
        let target = Self::new(spec, pipeline.mapping.version_field(), args)?;
        target.check_tls().await?;
        Ok(target)
    }

    pub fn new(
        spec: &HttpTargetSpec,
        version_field: &str,
        args: &HttpArgs,
    ) -> Result<Self, SetupError> {
        let base = args
            .http_target_url
            .clone()
            .ok_or_else(|| {
                SettingsError::new("CONVEYOR_HTTP_TARGET_URL", "required by an http target")
            })?
            .trim_end_matches('/')
            .to_owned();
        let url = reqwest::Url::parse(&base)
            .ok()
            .filter(|url| matches!(url.scheme(), "http" | "https") && url.host_str().is_some())
            .ok_or_else(|| {
                SettingsError::new(
                    "CONVEYOR_HTTP_TARGET_URL",
                    "must be an http:// or https:// URL",
                )
            })?;
        // Logged without user info or query, which could carry credentials.
        let endpoint = format!(
            "{}://{}{}",
            url.scheme(),
            url.host_str().unwrap_or_default(),
            url.port()
                .map(|port| format!(":{port}"))
                .unwrap_or_default()
        );
        let auth = match &spec.auth {
            AuthSpec::None => Auth::None,
            AuthSpec::Bearer => Auth::Static(
                Secret::from_value_or_file(
                    "CONVEYOR_HTTP_TARGET_TOKEN",
                    args.http_target_token.as_ref().map(Secret::expose),
                    args.http_target_token_file.as_deref(),
                )?
                .ok_or_else(|| {
                    SettingsError::new("CONVEYOR_HTTP_TARGET_TOKEN", "required by auth kind bearer")
                })?,
            ),
            AuthSpec::TokenEndpoint { path } => Auth::Endpoint {
                url: format!("{base}{path}"),
                client_id: args.http_target_client_id.clone().ok_or_else(|| {
                    SettingsError::new(
                        "CONVEYOR_HTTP_TARGET_CLIENT_ID",
                        "required by auth kind token_endpoint",
                    )
                })?,
                client_secret: Secret::from_value_or_file(
                    "CONVEYOR_HTTP_TARGET_CLIENT_SECRET",
                    args.http_target_client_secret.as_ref().map(Secret::expose),
                    args.http_target_client_secret_file.as_deref(),
                )?
                .ok_or_else(|| {
                    SettingsError::new(
                        "CONVEYOR_HTTP_TARGET_CLIENT_SECRET",
                        "required by auth kind token_endpoint",
                    )
                })?,
                cached: Mutex::new(None),
            },
        };
        let mut headers = HeaderMap::new();
        for (name, value) in &spec.headers {
            let name = HeaderName::from_bytes(name.as_bytes())
                .map_err(|err| SetupError::Header(err.to_string()))?;
            let value =
                HeaderValue::from_str(value).map_err(|err| SetupError::Header(err.to_string()))?;
            headers.insert(name, value);
        }
        let ca = CaBundle::load_for_https(
            "CONVEYOR_HTTP_TARGET_TLS_CA_FILE",
            args.http_target_tls_ca_file.as_deref(),
            "CONVEYOR_HTTP_TARGET_URL",
            &base,
        )?;
        let client = tls::http_client(ca.as_ref())
            .timeout(Duration::from_secs(spec.timeout_secs))
            .connect_timeout(Duration::from_secs(spec.timeout_secs.min(10)))
            .pool_max_idle_per_host(spec.concurrency)
            .build()
            .map_err(|err| SetupError::Client(err.to_string()))?;
        tracing::info!(target_api = %endpoint, path = spec.path, concurrency = spec.concurrency, "http target ready");
        Ok(Self {
            client,
            method: Method::from_bytes(spec.method.as_bytes())
                .map_err(|err| SetupError::Client(err.to_string()))?,
            spec: spec.clone(),
            base,
            endpoint,
            headers,
            auth,
            version_field: version_field.to_owned(),
            permits: Arc::new(Semaphore::new(spec.concurrency)),
            failing: AtomicU32::new(0),
        })
    }

    /// Refuses a target whose HTTPS certificate is not trusted (see [`tls::check_server`]).
    pub async fn check_tls(&self) -> Result<(), SetupError> {
        tls::check_server(&self.client, &self.base, "CONVEYOR_HTTP_TARGET_TLS_CA_FILE")
            .await
            .map_err(|advice| SetupError::Tls(format!("{}: {advice}", self.endpoint)))
    }

    /// One batch call. A 409 for a batch of several records says that some record in it exists, not
    /// which, nor whether the others were written: its records are then sent one per call (still as a
    /// batch, of one), so that only a 409 for a single record counts as written.
    async fn write_batch(&self, chunk: &[&Record]) -> Vec<(u64, Result<Answer, WriteError>)> {
        let answer = self.post_batch(chunk).await;
        if chunk.len() == 1 || !matches!(answer, Ok(Answer::AlreadyThere)) {
            return vec![(chunk.len() as u64, answer)];
        }
        tracing::debug!(
            records = chunk.len(),
            "target answered 409 for a batch: sending its records one by one"
        );
        let calls = chunk
            .iter()
            .map(|record| async move { (1, self.post_batch(std::slice::from_ref(record)).await) });
        join_all(calls).await
    }

    async fn post_batch(&self, records: &[&Record]) -> Result<Answer, WriteError> {
        let rows: Vec<&RawValue> = records.iter().map(|record| &*record.data).collect();
        self.call(
            self.method.clone(),
            &self.url(&self.spec.path, None),
            &rows,
            None,
        )
        .await
    }

    /// Asks the target about each record (concurrently); returns the records still to write, and
    /// writes the updates of existing ones.
    async fn check_existing<'a>(
        &self,
        records: Vec<&'a Record>,
    ) -> Result<(Vec<&'a Record>, WriteReport), WriteError> {
        let IdCheckSpec::Exists {
            path,
            on_exists,
            update_method,
            update_path,
        } = &self.spec.id_check
        else {
            return Ok((records, WriteReport::default()));
        };
        let checks = records.iter().map(|record| async move {
            let response = self
                .send(
                    Method::GET,
                    &self.url(path, Some(&record.id)),
                    None::<&Value>,
                    None,
                )
                .await?;
            match response.status() {
                StatusCode::NOT_FOUND => {
                    self.served();
                    Ok(None)
                }
                status if status.is_success() => {
                    self.served();
                    let held: Value = response.json().await.unwrap_or(Value::Null);
                    Ok(Some(held))
                }
                status => {
                    Err(self.sort_failure(status, &response.text().await.unwrap_or_default()))
                }
            }
        });
        let held = join_all(checks).await;
        // The worst answer decides, as for the writes (see [`merge`]).
        if let Some(worst) = held
            .iter()
            .filter_map(|answer| answer.as_ref().err())
            .max_by_key(|err| severity(err))
        {
            return Err(worst.clone());
        }
        let held: Vec<_> = held.into_iter().collect::<Result<_, _>>()?;
        let mut new = Vec::new();
        let mut updates = Vec::new();
        let mut report = WriteReport::default();
        for (record, held) in records.into_iter().zip(held) {
            match held {
                None => new.push(record),
                Some(_) if *on_exists == OnExists::Skip => report.stale += 1,
                Some(held) if self.holds_as_new(&held, record) => report.stale += 1,
                Some(_) => updates.push(record),
            }
        }
        let method = Method::from_bytes(update_method.as_bytes()).unwrap_or(Method::PUT);
        let update_path = update_path.as_deref().unwrap_or(path);
        let calls = updates.iter().map(|record| {
            let method = method.clone();
            async move {
                (
                    1,
                    self.call(
                        method,
                        &self.url(update_path, Some(&record.id)),
                        &record.data,
                        None,
                    )
                    .await,
                )
            }
        });
        let report = merge(report, join_all(calls).await)?;
        Ok((new, report))
    }

    /// Whether the target's copy carries the record's version or a newer one.
    fn holds_as_new(&self, held: &Value, record: &Record) -> bool {
        held.get(&self.version_field)
            .map(conveyor_base::source_time::parse_instant)
            .and_then(Result::ok)
            .is_some_and(|held_version| held_version >= record.modify_time)
    }

    fn url(&self, path: &str, key: Option<&str>) -> String {
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
    async fn call(
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
    fn sort_failure(&self, status: StatusCode, body: &str) -> WriteError {
        let error = classify_status(status, body, &self.spec.errors);
        if class_of(status, &self.spec.errors) == StatusClass::Unavailable {
            self.failed(error)
        } else {
            self.served();
            error
        }
    }

    /// A call got an answer from a target that serves (whatever it says about the data).
    fn served(&self) {
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
    async fn token(&self, renew: bool) -> Result<Option<Secret>, WriteError> {
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
            // Refused credentials are an operator's problem, never the records': retry, never
            // dead-letter. A token endpoint that cannot serve counts as the target unavailable.
            if is_down(status) {
                return Err(self.failed(WriteError::Transient(format!(
                    "token endpoint answered {status}"
                ))));
            }
            self.served();
            return Err(WriteError::Transient(format!(
                "token endpoint answered {status}: check CONVEYOR_HTTP_TARGET_CLIENT_ID and _SECRET"
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
    async fn send(
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

impl Target for HttpTarget {
    /// Whether the target answers as up: the circuit breaker's probe, a `HEAD` of the base URL. Any
    /// answer will do but one saying that the service is unavailable (see [`is_down`]).
    async fn ping(&self) -> bool {
        match self.client.head(&self.base).send().await {
            Ok(response) => !is_down(response.status()),
            Err(_) => false,
        }
    }

    /// Writes a batch: only the newest version of each id, split into calls that run concurrently.
    async fn write(&self, records: &[Record]) -> Result<WriteReport, WriteError> {
        let newest = newest_per_id(records);
        // Older versions of an id in the same batch are stale by definition.
        let superseded = (records.len() - newest.len()) as u64;
        let (to_write, mut report) = match &self.spec.id_check {
            IdCheckSpec::Exists { .. } => self.check_existing(newest).await?,
            _ => (newest, WriteReport::default()),
        };
        report.stale += superseded;
        let answers = match self.spec.body {
            BodyShape::Batch => {
                let calls = to_write
                    .chunks(self.spec.batch_size)
                    .map(|chunk| self.write_batch(chunk));
                join_all(calls).await.into_iter().flatten().collect()
            }
            BodyShape::Record => {
                let calls = to_write.iter().map(|record| async move {
                    let key = match &self.spec.id_check {
                        IdCheckSpec::IdempotencyKey { header } => Some((
                            header.as_str(),
                            format!("{}@{}", record.id, record.modify_time.timestamp_millis()),
                        )),
                        _ => None,
                    };
                    let answer = self
                        .call(
                            self.method.clone(),
                            &self.url(&self.spec.path, None),
                            &record.data,
                            key,
                        )
                        .await;
                    (1, answer)
                });
                join_all(calls).await
            }
        };
        let appeared = answers
            .iter()
            .any(|(_, answer)| matches!(answer, Ok(Answer::AlreadyThere)));
        if appeared
            && let IdCheckSpec::Exists {
                on_exists: OnExists::Update,
                ..
            } = &self.spec.id_check
        {
            // A record that was not there when asked was written meanwhile (by another writer, with
            // perhaps an older version): try again, and the next check finds it and updates it.
            return Err(WriteError::Transient(
                "target answered 409 for a record it did not hold a moment before".into(),
            ));
        }
        merge(report, answers)
    }
}

/// Adds the answers of calls (each for a number of records) to a report. An unavailable target makes
/// the whole write unavailable (the breaker holds back); otherwise any transient failure makes it
/// transient (it is retried, and idempotence absorbs what already landed); otherwise any permanent one
/// makes it permanent, so that the writer finds the bad records one by one.
fn merge(
    mut report: WriteReport,
    answers: Vec<(u64, Result<Answer, WriteError>)>,
) -> Result<WriteReport, WriteError> {
    let mut failure: Option<WriteError> = None;
    for (records, answer) in answers {
        match answer {
            Ok(Answer::Applied) => report.applied += records,
            Ok(Answer::AlreadyThere) => report.stale += records,
            Err(err) => {
                if failure
                    .as_ref()
                    .is_none_or(|worst| severity(&err) > severity(worst))
                {
                    failure = Some(err);
                }
            }
        }
    }
    match failure {
        Some(err) => Err(err),
        None => Ok(report),
    }
}

/// How much a failure weighs when a write's calls fail differently: the heaviest decides.
fn severity(err: &WriteError) -> u8 {
    match err {
        WriteError::Unavailable(_) => 2,
        WriteError::Transient(_) => 1,
        WriteError::Permanent(_) => 0,
    }
}

/// What an answer other than a success means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusClass {
    /// 409: the target holds the record already. Counts as written when the call was for one record;
    /// a batch answered so is split.
    Exists,
    /// The service says it cannot serve now ([`is_down`]: 429, 502, 503, 504): retry later. Calls
    /// answered so, or not at all, in a row make the target unavailable (the breaker holds back).
    Unavailable,
    /// This call failed for now (408, 425, 500 and other 5xx, the file's `transient`): retry later.
    Transient,
    /// Credentials refused: retry later (they are the operator's to fix, never a reason to drop
    /// records), though the target itself serves.
    Credentials,
    /// The target refuses the data: dead-letter.
    Permanent,
}

/// The one place where the HTTP target's answers are sorted: the pipeline file's `[target.errors]`
/// say what is permanent or transient first; then 429, 502, 503 and 504 say the service is
/// unavailable; 409 that the record exists; 408, 425 and other 5xx are transient; 401 and 403 are
/// credentials; any other status means that the target refuses the data.
pub fn class_of(status: StatusCode, overrides: &HttpErrorOverrides) -> StatusClass {
    let code = status.as_u16();
    if overrides.permanent.contains(&code) {
        return StatusClass::Permanent;
    }
    if is_down(status) {
        return StatusClass::Unavailable;
    }
    if overrides.transient.contains(&code) {
        return StatusClass::Transient;
    }
    match status {
        StatusCode::CONFLICT => StatusClass::Exists,
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => StatusClass::Credentials,
        StatusCode::REQUEST_TIMEOUT | StatusCode::TOO_EARLY => StatusClass::Transient,
        status if status.is_server_error() => StatusClass::Transient,
        _ => StatusClass::Permanent,
    }
}

/// The error of an answer that is not a success, by [`class_of`]: transient (credentials too) or
/// permanent (a 409 too, where it is not taken as "already exists").
pub fn classify_status(
    status: StatusCode,
    body: &str,
    overrides: &HttpErrorOverrides,
) -> WriteError {
    let body: String = body.chars().take(300).collect();
    let message = format!("target answered {status}: {}", body.trim());
    match class_of(status, overrides) {
        StatusClass::Unavailable | StatusClass::Transient | StatusClass::Credentials => {
            WriteError::Transient(message)
        }
        StatusClass::Exists | StatusClass::Permanent => WriteError::Permanent(message),
    }
}

/// Whether an answer says that the service is unavailable, so that the target counts as down when calls
/// get it one after another, and the breaker's probe keeps waiting: 429, 502, 503 and 504. Any other
/// answer, 404 or 500 included, means that something serves there (a 500 for some records must not
/// hold back the writing of the others).
pub fn is_down(status: StatusCode) -> bool {
    matches!(
        status,
        StatusCode::TOO_MANY_REQUESTS
            | StatusCode::BAD_GATEWAY
            | StatusCode::SERVICE_UNAVAILABLE
            | StatusCode::GATEWAY_TIMEOUT
    )
}

/// Sorts a transport error: a refused connection means the target is down altogether (the writer's
/// circuit breaker holds back at once); timeouts and anything else the client reports are transient,
/// since no answer about the data came back (and count towards `errors.unavailable_after`).
pub fn classify_error(what: &str, error: reqwest::Error) -> WriteError {
    let connect = error.is_connect() && !error.is_timeout();
    let kind = if error.is_timeout() {
        "timed out"
    } else if connect {
        "cannot connect"
    } else {
        "failed"
    };
    // Without the URL: it may carry credentials in its query.
    let error = error.without_url();
    let cause = match tls::tls_failure(&error) {
        Some(failure) => tls::advice(failure, "CONVEYOR_HTTP_TARGET_TLS_CA_FILE"),
        None => tls::error_chain(&error),
    };
    let message = format!("call to {what} {kind}: {cause}");
    if connect {
        WriteError::Unavailable(message)
    } else {
        WriteError::Transient(message)
    }
}

/// Percent-encodes a key for a URL path segment.
fn percent_encode(key: &str) -> String {
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

#[cfg(test)]
mod tests;
