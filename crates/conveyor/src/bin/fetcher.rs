//! `conveyor-fetcher`: see [`conveyor_fetcher`].

use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = conveyor_fetcher::Cli::parse();
    conveyor::run_worker(&cli.worker.clone(), |shutdown| {
        conveyor_fetcher::run(cli, shutdown)
    })
}
