//! `conveyor-writer`: see [`conveyor_writer`].

// The package's library holds the binaries' allocator (mimalloc).
use conveyor as _;

fn main() -> std::process::ExitCode {
    conveyor_writer::main()
}
