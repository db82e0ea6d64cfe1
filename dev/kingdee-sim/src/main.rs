//! `kingdee-sim`: serves a simulated Kingdee Cloud Xingchen V2 open API. See [`kingdee_sim`].

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use kingdee_sim::gate::{self, Faults, GatewayConfig};
use kingdee_sim::{ChangeRates, SimConfig};

#[derive(Debug, Parser)]
#[command(
    name = "kingdee-sim",
    version,
    about = "A simulator of the Kingdee Cloud Xingchen V2 open API"
)]
struct Cli {
    /// Address to listen on.
    #[arg(long, env = "KINGDEE_SIM_LISTEN", default_value = "127.0.0.1:8090")]
    listen: SocketAddr,
    /// Seed of the generated data set: the same seed gives the same records.
    #[arg(long, env = "KINGDEE_SIM_SEED", default_value_t = 42)]
    seed: u64,
    /// Number of sales orders.
    #[arg(long, env = "KINGDEE_SIM_ORDERS", default_value_t = 10_000)]
    orders: usize,
    /// Start the data's timeline this many days before now (instead of 2025-01-01).
    #[arg(long, env = "KINGDEE_SIM_EPOCH_DAYS_AGO")]
    epoch_days_ago: Option<i64>,
    /// Reproduce the gateway quirk of computing total_page from a page_size above 100.
    #[arg(long, env = "KINGDEE_SIM_TOTAL_PAGE_QUIRK")]
    total_page_quirk: bool,
    /// Spoil every n-th sales order with an amount that is not a number (0: none).
    #[arg(long, env = "KINGDEE_SIM_POISON_EVERY", default_value_t = 0)]
    poison_every: usize,
    /// The client id the gateway accepts.
    #[arg(long, env = "KINGDEE_SIM_CLIENT_ID", default_value = gate::DEMO_CLIENT_ID)]
    client_id: String,
    /// The client secret the gateway signs with.
    #[arg(long, env = "KINGDEE_SIM_CLIENT_SECRET", default_value = gate::DEMO_CLIENT_SECRET, hide_default_value = true)]
    client_secret: String,
    /// File holding the client secret (Docker secrets); wins over KINGDEE_SIM_CLIENT_SECRET.
    #[arg(long, env = "KINGDEE_SIM_CLIENT_SECRET_FILE")]
    client_secret_file: Option<std::path::PathBuf>,
    /// The outerInstanceId the gateway knows.
    #[arg(long, env = "KINGDEE_SIM_OUTER_INSTANCE_ID", default_value = gate::DEMO_OUTER_INSTANCE_ID)]
    outer_instance_id: String,
    /// Seconds an app-token lives.
    #[arg(long, env = "KINGDEE_SIM_TOKEN_LIFETIME_SECS", default_value_t = 7200)]
    token_lifetime_secs: u64,
    /// Seconds between app_secret rotations (0: never).
    #[arg(long, env = "KINGDEE_SIM_SECRET_ROTATION_SECS", default_value_t = 0)]
    secret_rotation_secs: u64,
    /// Calls allowed per account set in any 60 seconds (0: no limit); more are answered 429.
    #[arg(long, env = "KINGDEE_SIM_CALLS_PER_MINUTE", default_value_t = 0)]
    calls_per_minute: u32,
    /// Answer a 429 with Retry-After (the seconds until a call would be admitted).
    #[arg(long, env = "KINGDEE_SIM_RETRY_AFTER")]
    retry_after: bool,
    /// Share of list calls answered 503.
    #[arg(long, env = "KINGDEE_SIM_FAULT_5XX", default_value_t = 0.0)]
    fault_5xx: f64,
    /// Share of list calls answered slowly (after --slow-ms).
    #[arg(long, env = "KINGDEE_SIM_FAULT_SLOW", default_value_t = 0.0)]
    fault_slow: f64,
    #[arg(long, env = "KINGDEE_SIM_SLOW_MS", default_value_t = 2000)]
    slow_ms: u64,
    /// Share of list calls whose connection is cut mid-body.
    #[arg(long, env = "KINGDEE_SIM_FAULT_DROP", default_value_t = 0.0)]
    fault_drop: f64,
    /// Share of list calls answered with a body cut in half.
    #[arg(long, env = "KINGDEE_SIM_FAULT_TRUNCATE", default_value_t = 0.0)]
    fault_truncate: f64,
    /// Share of list pages served without their rows (count unchanged), a reported gateway quirk.
    #[arg(long, env = "KINGDEE_SIM_FAULT_EMPTY_PAGE", default_value_t = 0.0)]
    fault_empty_page: f64,
    /// Write `count` as a string on every list, not only on bd lists.
    #[arg(long, env = "KINGDEE_SIM_COUNT_AS_STRING")]
    count_as_string: bool,
    /// Existing orders modified per second while running.
    #[arg(long, env = "KINGDEE_SIM_MODIFY_PER_SEC", default_value_t = 0.0)]
    modify_per_sec: f64,
    /// New orders created per second while running.
    #[arg(long, env = "KINGDEE_SIM_CREATE_PER_SEC", default_value_t = 0.0)]
    create_per_sec: f64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    conveyor_base::telemetry::init(conveyor_base::telemetry::LogFormat::Text, "info")?;
    let cli = Cli::parse();
    // The file wins over the variable, which always has a value (the demo's default).
    let client_secret = conveyor_base::Secret::from_value_or_file(
        "KINGDEE_SIM_CLIENT_SECRET",
        None,
        cli.client_secret_file.as_deref(),
    )?
    .map_or_else(
        || cli.client_secret.clone(),
        |secret| secret.expose().to_owned(),
    );
    let epoch = match cli.epoch_days_ago {
        Some(days) => kingdee_sim::data::days_ago(days),
        None => kingdee_sim::data::default_epoch(),
    };
    let simulator = kingdee_sim::Simulator::new(SimConfig {
        seed: cli.seed,
        orders: cli.orders,
        epoch,
        total_page_from_requested_size: cli.total_page_quirk,
        poison_every: cli.poison_every,
        count_always_string: cli.count_as_string,
        gateway: GatewayConfig {
            client_id: cli.client_id,
            client_secret,
            outer_instance_id: cli.outer_instance_id,
            token_lifetime: Duration::from_secs(cli.token_lifetime_secs),
            secret_rotation: (cli.secret_rotation_secs > 0)
                .then(|| Duration::from_secs(cli.secret_rotation_secs)),
            calls_per_minute: cli.calls_per_minute,
            retry_after: cli.retry_after,
            faults: Faults {
                server_error: cli.fault_5xx,
                slow: cli.fault_slow,
                slow_delay: Duration::from_millis(cli.slow_ms),
                dropped_connection: cli.fault_drop,
                truncated_body: cli.fault_truncate,
                empty_page: cli.fault_empty_page,
            },
            ..GatewayConfig::default()
        },
        changes: ChangeRates {
            modify_per_sec: cli.modify_per_sec,
            create_per_sec: cli.create_per_sec,
        },
    });
    let listener = tokio::net::TcpListener::bind(cli.listen).await?;
    tracing::info!(addr = %listener.local_addr()?, orders = cli.orders, seed = cli.seed, "kingdee-sim listening");
    let shutdown = conveyor_base::shutdown::on_signals()?;
    tokio::select! {
        served = kingdee_sim::serve(simulator, listener) => served?,
        () = shutdown.cancelled() => {}
    }
    Ok(())
}
