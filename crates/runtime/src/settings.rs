//! The settings every worker process has, besides its broker's: which pipelines it runs, where it
//! serves its health endpoints, how it logs, stops and gives up on a failing message.

use std::net::SocketAddr;
use std::path::PathBuf;

use conveyor_amqp::envelope::Compression;
use conveyor_amqp::settings::BrokerArgs;
use conveyor_base::SettingsError;
use conveyor_base::telemetry::LogFormat;
use conveyor_ledger::LedgerArgs;
use conveyor_postgres::PostgresArgs;

/// Settings every worker process has.
#[derive(Debug, Clone, clap::Args)]
pub struct WorkerArgs {
    /// The pipelines this worker runs, each a task of its own: pipeline files (TOML) and directories
    /// (every `*.toml` in them, in name order), comma-separated.
    #[arg(
        long = "pipeline",
        env = "CONVEYOR_PIPELINE",
        value_delimiter = ',',
        required = true
    )]
    pub pipelines: Vec<PathBuf>,
    #[command(flatten)]
    pub broker: BrokerArgs,
    /// Where PostgreSQL is: the ledger's home, the fetcher's sync state, the postgres target.
    #[command(flatten)]
    pub postgres: PostgresArgs,
    #[command(flatten)]
    pub ledger: LedgerArgs,
    /// Address of the /metrics, /healthz and /readyz endpoints, which have no authentication: the
    /// worker's default port on 127.0.0.1 if unset (a container sets 0.0.0.0 and its port).
    #[arg(long, env = "CONVEYOR_HTTP_ADDR")]
    pub http_addr: Option<SocketAddr>,
    /// Log format.
    #[arg(long, env = "CONVEYOR_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
    /// Log filter: a level, or comma-separated target=level (e.g. info,conveyor_amqp=debug).
    #[arg(long, env = "CONVEYOR_LOG", default_value = "info")]
    pub log_filter: String,
    /// How long a stopping worker may take to finish the work it holds before it exits anyway.
    #[arg(long, env = "CONVEYOR_DRAIN_TIMEOUT_SECS", default_value_t = 30)]
    pub drain_timeout_secs: u64,
    /// Tries of a message that keeps failing for a transient reason before it is dead-lettered.
    #[arg(long, env = "CONVEYOR_MAX_ATTEMPTS", default_value_t = 8)]
    pub max_attempts: u32,
    /// Deliveries a consumer holds unacknowledged at once (basic.qos).
    #[arg(long, env = "CONVEYOR_PREFETCH", default_value_t = 32)]
    pub prefetch: u16,
    /// Message bodies of this many bytes or more are published lz4-compressed; "off" publishes them
    /// plain. Compression spares a remote broker's network and disk, and costs the workers CPU: turn
    /// it off where the broker shares the workers' cores. Workers read either kind.
    #[arg(long, env = "CONVEYOR_COMPRESS_FROM_BYTES", default_value_t)]
    pub compress_from_bytes: Compression,
}

impl WorkerArgs {
    /// The pipeline files, directories expanded; a directory without any is an error.
    pub fn pipeline_files(&self) -> Result<Vec<PathBuf>, SettingsError> {
        pipeline_files(&self.pipelines)
    }

    pub(crate) fn http_addr_or(&self, default_port: u16) -> SocketAddr {
        self.http_addr
            .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], default_port)))
    }
}

/// Pipeline files and directories (every `*.toml` in them, in name order) as CONVEYOR_PIPELINE gives
/// them, expanded; a directory without any is an error.
pub fn pipeline_files(given_list: &[PathBuf]) -> Result<Vec<PathBuf>, SettingsError> {
    let mut files = Vec::new();
    for given in given_list {
        if !given.is_dir() {
            files.push(given.clone());
            continue;
        }
        let problem = |what: String| {
            SettingsError::new("CONVEYOR_PIPELINE", format!("{}: {what}", given.display()))
        };
        let mut found: Vec<PathBuf> = std::fs::read_dir(given)
            .map_err(|err| problem(format!("cannot list it: {err}")))?
            .filter_map(|entry| entry.ok().map(|entry| entry.path()))
            .filter(|path| path.extension().is_some_and(|ext| ext == "toml") && path.is_file())
            .collect();
        if found.is_empty() {
            return Err(problem(
                "a directory without pipeline files (*.toml)".into(),
            ));
        }
        found.sort();
        files.extend(found);
    }
    Ok(files)
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        worker: WorkerArgs,
    }

    #[test]
    fn the_health_endpoints_listen_on_the_loopback_unless_told() {
        let cli = Cli::try_parse_from(["worker", "--pipeline", "p.toml"]).unwrap();
        assert_eq!(cli.worker.http_addr_or(9103).to_string(), "127.0.0.1:9103");
        let cli = Cli::try_parse_from([
            "worker",
            "--pipeline",
            "p.toml",
            "--http-addr",
            "0.0.0.0:9000",
        ])
        .unwrap();
        assert_eq!(cli.worker.http_addr_or(9103).to_string(), "0.0.0.0:9000");
    }
}
