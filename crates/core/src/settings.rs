//! Settings that come from the environment (or flags): addresses, secrets, tuning.
//!
//! The pipeline file says *what* to move; these settings say *where* the services are. Every secret can
//! be given directly or as a file (`*_FILE`, for Docker secrets), and is wrapped in [`Secret`] so that it
//! never reaches a log line or a `Debug` print.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use crate::broker::BrokerAddress;
use crate::envelope::Compression;
use crate::tls::{CaBundle, ClientIdentity};

/// A value that must never be printed: passwords, tokens, URLs with credentials.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret itself, for the one place that needs it (a connect call, a signature).
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Takes the secret from `direct` or else from the file `file` (trailing newline removed).
    /// `name` is the setting's environment variable, used in the error.
    pub fn from_value_or_file(
        name: &str,
        direct: Option<&str>,
        file: Option<&Path>,
    ) -> Result<Option<Self>, SettingsError> {
        match (direct, file) {
            (Some(_), Some(_)) => Err(SettingsError::new(
                name,
                format!("set either {name} or {name}_FILE, not both"),
            )),
            (Some(value), None) => Ok(Some(Self::new(value))),
            (None, Some(path)) => {
                let text = std::fs::read_to_string(path).map_err(|err| {
                    SettingsError::new(
                        &format!("{name}_FILE"),
                        format!("cannot read {}: {err}", path.display()),
                    )
                })?;
                Ok(Some(Self::new(text.trim_end_matches(['\r', '\n']))))
            }
            (None, None) => Ok(None),
        }
    }
}

impl std::str::FromStr for Secret {
    type Err = std::convert::Infallible;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        Ok(Self::new(value))
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// A setting that is missing or wrong, named by its environment variable.
#[derive(Debug, thiserror::Error)]
#[error("setting {name}: {problem}")]
pub struct SettingsError {
    pub name: String,
    pub problem: String,
}

impl SettingsError {
    pub fn new(name: &str, problem: impl Into<String>) -> Self {
        Self {
            name: name.to_owned(),
            problem: problem.into(),
        }
    }
}

/// How the queues are made durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum QueueType {
    /// Replicated, redelivery-counting queues: the default for work that must not be lost.
    Quorum,
    /// Single-node queues, for brokers without quorum queue support.
    Classic,
}

/// Where RabbitMQ is and how conveyor's queues are named and shaped.
#[derive(Debug, Clone, clap::Args)]
pub struct BrokerArgs {
    /// AMQP URL of RabbitMQ; it carries the password, so it is never logged.
    #[arg(long, env = "CONVEYOR_AMQP_URL", hide_env_values = true)]
    amqp_url: Option<Secret>,
    /// File holding the AMQP URL (for Docker secrets), instead of CONVEYOR_AMQP_URL.
    #[arg(long, env = "CONVEYOR_AMQP_URL_FILE")]
    amqp_url_file: Option<PathBuf>,
    /// CA certificates (PEM) trusted for amqps:// besides the public roots: a broker whose certificate
    /// a private CA signed.
    #[arg(long, env = "CONVEYOR_AMQP_TLS_CA_FILE")]
    amqp_tls_ca_file: Option<PathBuf>,
    /// Client certificate (PEM, with its chain) for a broker that requires mutual TLS.
    #[arg(long, env = "CONVEYOR_AMQP_TLS_CERT_FILE")]
    amqp_tls_cert_file: Option<PathBuf>,
    /// Private key (PEM) of CONVEYOR_AMQP_TLS_CERT_FILE.
    #[arg(long, env = "CONVEYOR_AMQP_TLS_KEY_FILE")]
    amqp_tls_key_file: Option<PathBuf>,
    /// Prefix of every exchange and queue name; separate deployments (or tests) on one broker use
    /// different namespaces.
    #[arg(long, env = "CONVEYOR_NAMESPACE", default_value = "conveyor")]
    pub namespace: String,
    /// Queue type of every queue conveyor declares.
    #[arg(
        long,
        env = "CONVEYOR_QUEUE_TYPE",
        value_enum,
        default_value = "quorum"
    )]
    pub queue_type: QueueType,
    /// Deliveries a consumer holds unacknowledged at once (basic.qos).
    #[arg(long, env = "CONVEYOR_PREFETCH", default_value_t = 32)]
    pub prefetch: u16,
    /// Message bodies of this many bytes or more are published lz4-compressed; "off" publishes them
    /// plain. Compression spares a remote broker's network and disk, and costs the workers CPU: turn
    /// it off where the broker shares the workers' cores. Workers read either kind.
    #[arg(long, env = "CONVEYOR_COMPRESS_FROM_BYTES", default_value_t)]
    pub compress_from_bytes: Compression,
    /// Delays of the retry tiers, in milliseconds, shortest first: the n-th retry of a message waits in
    /// the n-th tier (the last tier for every later one). Each tier is a queue of its own, so changing
    /// the list declares new queues rather than clashing with the old ones.
    #[arg(
        long,
        env = "CONVEYOR_RETRY_DELAYS_MS",
        value_delimiter = ',',
        default_value = "1000,5000,30000,120000,600000"
    )]
    pub retry_delays_ms: Vec<u64>,
}

/// The broker URL used when none is configured: the local broker with RabbitMQ's default account.
pub const DEFAULT_AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

impl BrokerArgs {
    /// Settings for the local broker, namespaced; for tests and tools that build settings in code.
    pub fn local(namespace: impl Into<String>) -> Self {
        Self {
            amqp_url: None,
            amqp_url_file: None,
            amqp_tls_ca_file: None,
            amqp_tls_cert_file: None,
            amqp_tls_key_file: None,
            namespace: namespace.into(),
            queue_type: QueueType::Quorum,
            prefetch: 32,
            compress_from_bytes: Compression::default(),
            retry_delays_ms: vec![1_000, 5_000, 30_000, 120_000, 600_000],
        }
    }

    pub fn with_retry_delays_ms(mut self, delays: Vec<u64>) -> Self {
        self.retry_delays_ms = delays;
        self
    }

    pub fn with_amqp_url(mut self, url: impl Into<String>) -> Self {
        self.amqp_url = Some(Secret::new(url));
        self
    }

    /// The TLS files of amqps:// connections: a CA bundle, and a client certificate and key for mutual
    /// TLS (each optional).
    pub fn with_tls_files(
        mut self,
        ca_file: Option<PathBuf>,
        cert_file: Option<PathBuf>,
        key_file: Option<PathBuf>,
    ) -> Self {
        self.amqp_tls_ca_file = ca_file;
        self.amqp_tls_cert_file = cert_file;
        self.amqp_tls_key_file = key_file;
        self
    }

    /// The broker URL(s) with the TLS settings, files read and checked: what a connection needs.
    pub fn address(&self) -> Result<BrokerAddress, SettingsError> {
        let url = self.amqp_url()?;
        let ca = CaBundle::load_optional(
            "CONVEYOR_AMQP_TLS_CA_FILE",
            self.amqp_tls_ca_file.as_deref(),
        )?;
        let identity = ClientIdentity::load_optional(
            (
                "CONVEYOR_AMQP_TLS_CERT_FILE",
                self.amqp_tls_cert_file.as_deref(),
            ),
            (
                "CONVEYOR_AMQP_TLS_KEY_FILE",
                self.amqp_tls_key_file.as_deref(),
            ),
        )?;
        BrokerAddress::with_tls(url, ca, identity)
    }

    pub fn amqp_url(&self) -> Result<Secret, SettingsError> {
        Ok(Secret::from_value_or_file(
            "CONVEYOR_AMQP_URL",
            self.amqp_url.as_ref().map(Secret::expose),
            self.amqp_url_file.as_deref(),
        )?
        .unwrap_or_else(|| Secret::new(DEFAULT_AMQP_URL)))
    }
}

/// Where PostgreSQL is: the writer's target and the fetcher's sync state (every flag also reads an
/// environment variable).
#[derive(Debug, Clone, clap::Args)]
pub struct PostgresArgs {
    /// PostgreSQL connection URL (postgres://user:password@host/db); never logged.
    #[arg(long, env = "CONVEYOR_PG_URL", hide_env_values = true)]
    pub pg_url: Option<Secret>,
    /// File holding the PostgreSQL URL (for Docker secrets), instead of CONVEYOR_PG_URL.
    #[arg(long, env = "CONVEYOR_PG_URL_FILE")]
    pub pg_url_file: Option<PathBuf>,
    /// Schema of conveyor's tables: the targets, the migration history and the sync state.
    #[arg(long, env = "CONVEYOR_PG_SCHEMA", default_value = "public")]
    pub pg_schema: String,
    /// Connections per process (for a writer: concurrent batch writes).
    #[arg(long, env = "CONVEYOR_PG_POOL_SIZE", default_value_t = 8)]
    pub pg_pool_size: usize,
    /// The `lock_timeout` of every session, in milliseconds, when a process asks for one (the writer
    /// does, from CONVEYOR_PG_LOCK_TIMEOUT_MS, so that a blocked write fails and is retried later).
    #[arg(skip)]
    pub lock_timeout_ms: Option<u64>,
}

impl PostgresArgs {
    pub fn url(&self) -> Result<Secret, SettingsError> {
        Secret::from_value_or_file(
            "CONVEYOR_PG_URL",
            self.pg_url.as_ref().map(Secret::expose),
            self.pg_url_file.as_deref(),
        )?
        .ok_or_else(|| SettingsError::new("CONVEYOR_PG_URL", "required"))
    }
}

/// How a worker logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

/// Settings every worker process has.
#[derive(Debug, Clone, clap::Args)]
pub struct WorkerArgs {
    /// The pipeline file (TOML) this worker runs.
    #[arg(long, env = "CONVEYOR_PIPELINE")]
    pub pipeline: PathBuf,
    #[command(flatten)]
    pub broker: BrokerArgs,
    /// Address of the /metrics, /healthz and /readyz endpoints (the worker's default port if unset).
    #[arg(long, env = "CONVEYOR_HTTP_ADDR")]
    pub http_addr: Option<SocketAddr>,
    /// Log format.
    #[arg(long, env = "CONVEYOR_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
    /// Log filter, in tracing's EnvFilter syntax.
    #[arg(long, env = "CONVEYOR_LOG", default_value = "info")]
    pub log_filter: String,
    /// How long a stopping worker may take to finish the work it holds before it exits anyway.
    #[arg(long, env = "CONVEYOR_DRAIN_TIMEOUT_SECS", default_value_t = 30)]
    pub drain_timeout_secs: u64,
    /// Tries of a message that keeps failing for a transient reason before it is dead-lettered.
    #[arg(long, env = "CONVEYOR_MAX_ATTEMPTS", default_value_t = 8)]
    pub max_attempts: u32,
}

impl WorkerArgs {
    pub fn http_addr_or(&self, default_port: u16) -> SocketAddr {
        self.http_addr
            .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], default_port)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_never_prints() {
        let secret = Secret::new("amqp://user:hunter2@host");
        assert_eq!(format!("{secret:?}"), "Secret(***)");
        let args = BrokerArgs::local("ns").with_amqp_url("amqp://user:hunter2@host");
        assert!(!format!("{args:?}").contains("hunter2"));
    }

    #[test]
    fn secret_from_file_drops_trailing_newline() {
        let dir = std::env::temp_dir().join(format!("conveyor-secret-{}", std::process::id()));
        std::fs::write(&dir, "s3cret\n").unwrap();
        let secret = Secret::from_value_or_file("X", None, Some(&dir))
            .unwrap()
            .unwrap();
        assert_eq!(secret.expose(), "s3cret");
        std::fs::remove_file(&dir).unwrap();
    }

    #[test]
    fn secret_value_and_file_together_is_an_error() {
        let err = Secret::from_value_or_file("X", Some("a"), Some(Path::new("/nope"))).unwrap_err();
        assert!(err.to_string().contains("X_FILE"), "{err}");
    }
}
