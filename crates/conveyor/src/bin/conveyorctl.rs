//! `conveyorctl`: the operator's tool. See [`conveyor::ctl`].

use clap::Parser;

fn main() -> std::process::ExitCode {
    conveyor::ctl::main(conveyor::ctl::Cli::parse())
}
