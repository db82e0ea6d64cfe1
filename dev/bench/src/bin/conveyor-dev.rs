//! `conveyor-dev`: see [`conveyor_bench::cli`].

use clap::Parser;

/// The same allocator as the workers: the simulators serve from this process, and the benchmarks
/// count its CPU.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    conveyor_bench::cli::main(conveyor_bench::cli::Cli::parse())
}
