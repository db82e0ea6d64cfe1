//! `conveyor-transformer`: see [`conveyor_transformer`].

use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = conveyor_transformer::Cli::parse();
    conveyor::run_worker(&cli.worker.clone(), |shutdown| {
        conveyor_transformer::run(cli, shutdown)
    })
}
