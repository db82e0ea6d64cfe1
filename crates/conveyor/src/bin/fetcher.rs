//! `conveyor-fetcher`: see [`conveyor_fetcher`].

// The package's library holds the binaries' allocator (mimalloc).
use conveyor as _;

fn main() -> std::process::ExitCode {
    conveyor_fetcher::main()
}
