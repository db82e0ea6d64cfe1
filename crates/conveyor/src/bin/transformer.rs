//! `conveyor-transformer`: see [`conveyor_transformer`].

use clap::Parser;
// The package's library holds the binaries' allocator (mimalloc).
use conveyor as _;

fn main() -> std::process::ExitCode {
    let cli = conveyor_transformer::Cli::parse();
    conveyor_runtime::process::run_worker(&cli.worker.clone(), |shutdown| {
        conveyor_transformer::run(cli, shutdown)
    })
}
