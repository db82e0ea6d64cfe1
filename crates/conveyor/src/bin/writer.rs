//! `conveyor-writer`: see [`conveyor_writer`].

use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = conveyor_writer::Cli::parse();
    conveyor::run_worker(&cli.worker.clone(), |shutdown| {
        conveyor_writer::run(cli, shutdown)
    })
}
