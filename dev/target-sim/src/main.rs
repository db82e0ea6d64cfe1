//! `target-sim`: serves a simulated JSON write API, the far end of an HTTP target. See [`target_sim`].

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;

#[derive(Debug, Parser)]
#[command(
    name = "target-sim",
    version,
    about = "A simulator of a business system's JSON write API"
)]
struct Cli {
    /// Address to listen on.
    #[arg(long, env = "TARGET_SIM_LISTEN", default_value = "127.0.0.1:8091")]
    listen: SocketAddr,
    /// The record field that identifies a record.
    #[arg(long, env = "TARGET_SIM_KEY_FIELD", default_value = "id")]
    key_field: String,
    /// The record field that orders versions (an older one never replaces a newer one).
    #[arg(long, env = "TARGET_SIM_VERSION_FIELD")]
    version_field: Option<String>,
    /// Refuse a POST of an existing key with 409 instead of updating.
    #[arg(long, env = "TARGET_SIM_INSERT_ONLY")]
    insert_only: bool,
    /// Milliseconds added to every API call.
    #[arg(long, env = "TARGET_SIM_LATENCY_MS", default_value_t = 0)]
    latency_ms: u64,
    /// Share of calls answered 429 (0 to 1).
    #[arg(long, env = "TARGET_SIM_RATE_429", default_value_t = 0.0)]
    rate_429: f64,
    /// Share of calls answered 503 (0 to 1).
    #[arg(long, env = "TARGET_SIM_RATE_5XX", default_value_t = 0.0)]
    rate_5xx: f64,
    /// Share of records refused as invalid with 422 (0 to 1).
    #[arg(long, env = "TARGET_SIM_RATE_INVALID", default_value_t = 0.0)]
    rate_invalid: f64,
    /// Client id the token endpoint accepts (with TARGET_SIM_CLIENT_SECRET); tokens are then required.
    #[arg(long, env = "TARGET_SIM_CLIENT_ID", requires = "client_secret")]
    client_id: Option<String>,
    /// Client secret the token endpoint accepts.
    #[arg(long, env = "TARGET_SIM_CLIENT_SECRET", hide_env_values = true)]
    client_secret: Option<String>,
    /// Lifetime of issued tokens, in seconds.
    #[arg(long, env = "TARGET_SIM_TOKEN_TTL_SECS", default_value_t = 3600)]
    token_ttl_secs: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    conveyor_base::telemetry::init(conveyor_base::telemetry::LogFormat::Text, "info")?;
    let cli = Cli::parse();
    let sim = target_sim::TargetSim::new(target_sim::TargetConfig {
        key_field: cli.key_field,
        version_field: cli.version_field,
        insert_only: cli.insert_only,
        latency: Duration::from_millis(cli.latency_ms),
        rate_429: cli.rate_429,
        rate_5xx: cli.rate_5xx,
        rate_invalid: cli.rate_invalid,
        client: cli.client_id.zip(cli.client_secret),
        token_ttl: Duration::from_secs(cli.token_ttl_secs),
        ..target_sim::TargetConfig::default()
    });
    let listener = tokio::net::TcpListener::bind(cli.listen).await?;
    tracing::info!(addr = %listener.local_addr()?, "target-sim listening");
    let shutdown = conveyor_base::shutdown::on_signals()?;
    tokio::select! {
        served = target_sim::serve(sim, listener) => served?,
        () = shutdown.cancelled() => {}
    }
    Ok(())
}
