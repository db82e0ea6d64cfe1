//! `kingdee-sim`: serves a simulated Kingdee Cloud Xingchen V2 open API. See [`kingdee_sim`].

use std::net::SocketAddr;

use clap::Parser;

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
    /// Reproduce the gateway quirk of computing total_page from a page_size above 100.
    #[arg(long, env = "KINGDEE_SIM_TOTAL_PAGE_QUIRK")]
    total_page_quirk: bool,
    /// Spoil every n-th sales order with an amount that is not a number (0: none).
    #[arg(long, env = "KINGDEE_SIM_POISON_EVERY", default_value_t = 0)]
    poison_every: usize,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    conveyor_core::telemetry::init(conveyor_core::settings::LogFormat::Text, "info")?;
    let cli = Cli::parse();
    let simulator = kingdee_sim::Simulator::new(kingdee_sim::SimConfig {
        seed: cli.seed,
        orders: cli.orders,
        total_page_from_requested_size: cli.total_page_quirk,
        poison_every: cli.poison_every,
    });
    let listener = tokio::net::TcpListener::bind(cli.listen).await?;
    tracing::info!(addr = %listener.local_addr()?, orders = cli.orders, seed = cli.seed, "kingdee-sim listening");
    let shutdown = conveyor_core::shutdown::on_signals()?;
    tokio::select! {
        served = kingdee_sim::serve(simulator, listener) => served?,
        () = shutdown.cancelled() => {}
    }
    Ok(())
}
