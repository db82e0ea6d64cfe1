//! What the conveyor binaries share: starting logs, signals and a runtime, and turning an error into an
//! exit code with a message an operator can act on.

use std::future::Future;
use std::process::ExitCode;

use conveyor_runtime::settings::WorkerArgs;
use tokio_util::sync::CancellationToken;

/// Every conveyor binary allocates through mimalloc (see the workspace's Cargo.toml for why).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

pub mod ctl;
pub mod dlq;
pub mod status;

/// Runs a worker: installs logging, builds the runtime, wires SIGTERM/SIGINT to a graceful stop.
/// Exits 0 after a clean stop, 1 after an error (printed on one line, never with secrets).
pub fn run_worker<F, Fut>(args: &WorkerArgs, run: F) -> ExitCode
where
    F: FnOnce(CancellationToken) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    if let Err(err) = conveyor_base::telemetry::init(args.log_format, &args.log_filter) {
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
        Err(err) => {
            tracing::error!(error = %format!("{err:#}"), "stopped by an error");
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
