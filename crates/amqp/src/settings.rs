//! Where RabbitMQ is and how conveyor's queues are named and shaped: the broker settings of every
//! process that talks to it (each flag also reads an environment variable).

use std::path::PathBuf;
use std::time::Duration;

use conveyor_base::tls::{CaBundle, ClientIdentity};
use conveyor_base::{Secret, SettingsError};

use crate::connect::{BrokerAddress, DEFAULT_HEARTBEAT_SECS};
use crate::publish::DEFAULT_CONFIRM_TIMEOUT;

/// How the queues are made durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum QueueType {
    /// Replicated, redelivery-counting queues: the default for work that must not be lost.
    Quorum,
    /// Single-node queues, for brokers without quorum queue support.
    Classic,
}

/// Where RabbitMQ is and how conveyor's queues are named and shaped: what every process that talks to
/// it needs (a worker's own tuning, such as its prefetch, is in `conveyor_runtime::settings`).
#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "Broker (RabbitMQ)")]
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
    /// Seconds between AMQP heartbeats (0: none). A broker silent for two heartbeats is taken for
    /// lost and the worker moves to another node: this bounds how long a hung node holds a worker.
    /// A `?heartbeat=` in the URL wins.
    #[arg(long, env = "CONVEYOR_AMQP_HEARTBEAT_SECS", default_value_t = DEFAULT_HEARTBEAT_SECS)]
    pub heartbeat_secs: u16,
    /// Seconds a publish waits for the broker's confirm before it counts as not stored. A cluster
    /// without its majority withholds confirms: the worker then holds its work, says so in /readyz,
    /// and connects again.
    #[arg(
        long,
        env = "CONVEYOR_AMQP_CONFIRM_TIMEOUT_SECS",
        default_value_t = DEFAULT_CONFIRM_TIMEOUT.as_secs(),
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    pub confirm_timeout_secs: u64,
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
            retry_delays_ms: vec![1_000, 5_000, 30_000, 120_000, 600_000],
            heartbeat_secs: DEFAULT_HEARTBEAT_SECS,
            confirm_timeout_secs: DEFAULT_CONFIRM_TIMEOUT.as_secs(),
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
        Ok(BrokerAddress::with_tls(url, ca, identity)?.with_heartbeat(self.heartbeat_secs))
    }

    /// How long a publish waits for its confirm.
    pub fn confirm_timeout(&self) -> Duration {
        Duration::from_secs(self.confirm_timeout_secs)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_settings_never_print_the_url() {
        let args = BrokerArgs::local("ns").with_amqp_url("amqp://user:hunter2@host");
        assert!(!format!("{args:?}").contains("hunter2"));
    }
}
