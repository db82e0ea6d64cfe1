//! Logging through `tracing`: readable lines by default, JSON lines for collectors.

use std::io::IsTerminal as _;

use tracing_subscriber::EnvFilter;

/// How a worker logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

/// Installs the global subscriber. Call once, at the start of a binary.
///
/// The broker client's own lines are off unless `filter` names `lapin`: it logs a clean close as an
/// ERROR, and every broker failure reaches the worker's code, which reports it with its context.
pub fn init(format: LogFormat, filter: &str) -> anyhow::Result<()> {
    let filter = if filter.contains("lapin") {
        filter.to_owned()
    } else {
        format!("{filter},lapin=off")
    };
    let filter = EnvFilter::try_new(&filter)
        .map_err(|err| anyhow::anyhow!("setting CONVEYOR_LOG: invalid filter {filter:?}: {err}"))?;
    // Colours for a terminal only: in a file or a collector they are noise (and hide the level).
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let installed = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
    installed.map_err(|err| anyhow::anyhow!("installing the log subscriber: {err}"))
}
