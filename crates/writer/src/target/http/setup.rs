//! Setting the target up: its settings from the command line and environment, the pipeline file's
//! `[target]`, and the client they make.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicU32;
use std::time::{Duration, Instant};

use conveyor_base::tls::{self, CaBundle};
use conveyor_base::{Secret, SettingsError};
use conveyor_pipeline::Pipeline;
use conveyor_pipeline::target::http::{AuthSpec, HttpTargetSpec};
use reqwest::Method;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use tokio::sync::{Mutex, Semaphore};

/// Where the API is and its credentials (every flag also reads an environment variable).
#[derive(Debug, Clone, Default, clap::Args)]
#[command(next_help_heading = "HTTP target")]
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
    /// Send the target's credentials (a bearer token, a client secret) over plain http:// all the
    /// same: a network where that is intended. Without it, such a target is refused at start.
    #[arg(
        long,
        env = "CONVEYOR_HTTP_TARGET_ALLOW_PLAIN_HTTP",
        default_value_t = false,
        action = clap::ArgAction::Set
    )]
    pub http_target_allow_plain_http: bool,
}

/// How calls get their bearer token.
pub(super) enum Auth {
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

impl Auth {
    pub(super) fn renewable(&self) -> bool {
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
    pub(super) client: reqwest::Client,
    pub(super) spec: HttpTargetSpec,
    pub(super) base: String,
    /// The base URL as it may be logged (no user info, no query).
    endpoint: String,
    pub(super) method: Method,
    pub(super) headers: HeaderMap,
    pub(super) auth: Auth,
    /// The output field with the record's version, to compare with the target's copy.
    pub(super) version_field: String,
    /// Calls in flight, across every message this process handles at once.
    pub(super) permits: Arc<Semaphore>,
    /// Calls in a row that got no answer, or one saying that the service is unavailable: from
    /// `errors.unavailable_after` on the target counts as down. Any other answer resets it.
    pub(super) failing: AtomicU32,
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
        if url.scheme() == "http"
            && !matches!(auth, Auth::None)
            && !args.http_target_allow_plain_http
        {
            return Err(SettingsError::new(
                "CONVEYOR_HTTP_TARGET_URL",
                "is plain http://, and the target's credentials would cross the network unencrypted: use https://, or set CONVEYOR_HTTP_TARGET_ALLOW_PLAIN_HTTP=true where plain HTTP is intended",
            )
            .into());
        }
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
}
