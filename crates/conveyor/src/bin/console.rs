//! `conveyor-console`: the operators' web console, see [`conveyor_console`].

use clap::Parser;
// The package's library holds the binaries' allocator (mimalloc).
use conveyor as _;

fn main() -> std::process::ExitCode {
    let cli = conveyor_console::Cli::parse();
    let (format, filter) = (cli.log_format, cli.log_filter.clone());
    conveyor_runtime::process::run_service(format, &filter, |shutdown| {
        conveyor_console::run(cli, shutdown)
    })
}
