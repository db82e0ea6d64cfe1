//! `conveyor-writer`: see [`conveyor_writer`].

use clap::Parser;
// The package's library holds the binaries' allocator (mimalloc).
use conveyor as _;

fn main() -> std::process::ExitCode {
    let cli = conveyor_writer::Cli::parse();
    conveyor_runtime::process::run_worker(&cli.worker.clone(), |shutdown| {
        conveyor_writer::run(cli, shutdown)
    })
}
