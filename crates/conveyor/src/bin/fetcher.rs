//! `conveyor-fetcher`: see [`conveyor_fetcher`].

use clap::Parser;
// The package's library holds the binaries' allocator (mimalloc).
use conveyor as _;

fn main() -> std::process::ExitCode {
    let cli = conveyor_fetcher::Cli::parse();
    conveyor_runtime::process::run_worker(&cli.worker.clone(), |shutdown| {
        conveyor_fetcher::run(cli, shutdown)
    })
}
