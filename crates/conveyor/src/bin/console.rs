//! `conveyor-console`: the operators' web console, see [`conveyor_console`].

// The package's library holds the binaries' allocator (mimalloc).
use conveyor as _;

fn main() -> std::process::ExitCode {
    conveyor_console::main()
}
