//! `conveyor-transformer`: see [`conveyor_transformer`].

// The package's library holds the binaries' allocator (mimalloc).
use conveyor as _;

fn main() -> std::process::ExitCode {
    conveyor_transformer::main()
}
