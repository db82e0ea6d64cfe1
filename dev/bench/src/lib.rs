//! conveyor's development tools: the demo and the benchmarks that run the real worker binaries
//! against the simulators, RabbitMQ and PostgreSQL (`conveyor-dev`), and the benchmarks of one piece
//! on its own (`bench-transform`, `bench-http`). Never a dependency of a production binary.

use std::path::PathBuf;

use anyhow::Context as _;

pub mod cli;
pub mod console;
pub mod demo;
pub mod hosting;
pub mod pipeline;
mod proc;
pub mod raw_target;
pub mod sync;

/// Where the worker binaries are: beside the running program (`cargo build` puts every binary of
/// the workspace in one directory).
pub fn bin_dir() -> anyhow::Result<PathBuf> {
    Ok(std::env::current_exe()
        .context("finding the running program")?
        .parent()
        .context("the running program has no directory")?
        .to_owned())
}
