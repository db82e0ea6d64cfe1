//! The start and the end of every conveyor process: logging installed, a runtime built, SIGTERM and
//! SIGINT wired to a graceful stop (workers), and an error turned into an exit code with one line an
//! operator can act on, never with secrets.

use std::future::Future;
use std::process::ExitCode;

use anyhow::Context as _;
use conveyor_base::telemetry::{self, LogFormat};
use tokio_util::sync::CancellationToken;

use crate::settings::WorkerArgs;

/// Runs a worker: installs logging, builds the runtime, wires SIGTERM/SIGINT to a graceful stop.
/// Exits 0 after a clean stop, 1 after an error (logged on one line, never with secrets).
pub fn run_worker<F, Fut>(args: &WorkerArgs, run: F) -> ExitCode
where
    F: FnOnce(CancellationToken) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    run_service(args.log_format, &args.log_filter, run)
}

/// Runs a long-lived process (a worker, the console) as [`run_worker`] does, logging as told.
pub fn run_service<F, Fut>(log_format: LogFormat, log_filter: &str, run: F) -> ExitCode
where
    F: FnOnce(CancellationToken) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    if let Err(err) = telemetry::init(log_format, log_filter) {
        eprintln!("error: {err:#}");
        return ExitCode::FAILURE;
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: starting the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        let shutdown = conveyor_base::shutdown::on_signals()?;
        run(shutdown).await
    });
    // Background tasks (health server, broker I/O) must not keep the process alive after the work ends.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    match result {
        Ok(()) => {
            tracing::info!("stopped");
            ExitCode::SUCCESS
        }
        // Said once, as a log line: the process's stderr is its log.
        Err(err) => {
            tracing::error!(error = %format!("{err:#}"), "stopped by an error");
            ExitCode::FAILURE
        }
    }
}

/// Runs a command-line tool (`conveyorctl`, `conveyor-dev`): logs at `warn` unless CONVEYOR_LOG says
/// otherwise, then `run` on a runtime. Exits 0 after success, 1 after an error (printed on one line).
pub fn run_tool(run: impl Future<Output = anyhow::Result<()>>) -> ExitCode {
    let log_filter = std::env::var("CONVEYOR_LOG").unwrap_or_else(|_| "warn".into());
    if let Err(err) = telemetry::init(LogFormat::Text, &log_filter) {
        eprintln!("error: {err:#}");
        return ExitCode::FAILURE;
    }
    let result = tokio::runtime::Runtime::new()
        .context("starting the async runtime")
        .and_then(|runtime| runtime.block_on(run));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
