//! `conveyor-dev`: the demo and the whole-pipeline benchmarks, on the worker binaries built beside it.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::{console, demo, hosting, pipeline, sync};

#[derive(Debug, Parser)]
#[command(
    name = "conveyor-dev",
    version,
    about = "Run conveyor's demo and benchmarks on this machine"
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the demo: the simulator, the three workers and PostgreSQL, end to end, with a summary.
    Demo(demo::DemoArgs),
    /// Benchmarks that print numbers.
    Bench {
        #[command(subcommand)]
        command: BenchCommand,
    },
}

#[derive(Debug, Subcommand)]
enum BenchCommand {
    /// Sync a backlog under the simulator's rate limit; compare the time with the ideal.
    Sync(sync::SyncArgs),
    /// The whole pipeline with no rate limit, against the raw broker and raw target ceilings.
    Pipeline(pipeline::PipelineArgs),
    /// The memory of one process of each worker hosting many pipelines, idle and working.
    Hosting(hosting::HostingArgs),
    /// The console's pages with many dead letters: their times, and the console's memory.
    Console(console::ConsoleArgs),
}

pub fn main(cli: Cli) -> ExitCode {
    conveyor_runtime::process::run_tool(run(cli))
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let bin_dir = crate::bin_dir()?;
    match cli.command {
        Command::Demo(args) => {
            let report = demo::run(&args, &bin_dir).await?;
            println!("{report}");
            anyhow::ensure!(report.is_ok(), "the demo failed (see above)");
        }
        Command::Bench {
            command: BenchCommand::Sync(args),
        } => {
            let report = sync::run(&args, &bin_dir).await?;
            println!("{}", serde_json::to_string_pretty(&report)?);
        }
        Command::Bench {
            command: BenchCommand::Pipeline(args),
        } => {
            let report = pipeline::run(&args, &bin_dir).await?;
            println!("{}", serde_json::to_string_pretty(&report)?);
        }
        Command::Bench {
            command: BenchCommand::Hosting(args),
        } => {
            let report = hosting::run(&args, &bin_dir).await?;
            println!("{}", serde_json::to_string_pretty(&report)?);
        }
        Command::Bench {
            command: BenchCommand::Console(args),
        } => {
            let report = console::run(&args, &bin_dir).await?;
            println!("{}", serde_json::to_string_pretty(&report)?);
        }
    }
    Ok(())
}
