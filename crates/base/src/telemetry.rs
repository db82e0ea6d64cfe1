//! Logging through `tracing`: readable lines by default, JSON lines for collectors.

use std::io::IsTerminal as _;

use tracing_subscriber::Layer as _;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

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
    // A level, and levels by target: no span or field filters (whose regex engine costs every build
    // about 25 s of CPU).
    let filter: Targets = filter.parse().map_err(|err| {
        anyhow::anyhow!(
            "setting CONVEYOR_LOG: invalid filter {filter:?}: {err} (a level, or comma-separated target=level, e.g. info,conveyor_amqp=debug)"
        )
    })?;
    // Colours for a terminal only: in a file or a collector they are noise (and hide the level).
    let lines = tracing_subscriber::fmt::layer()
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let registry = tracing_subscriber::registry();
    let installed = match format {
        LogFormat::Text => registry.with(lines.with_filter(filter)).try_init(),
        LogFormat::Json => registry
            .with(lines.json().flatten_event(true).with_filter(filter))
            .try_init(),
    };
    installed.map_err(|err| anyhow::anyhow!("installing the log subscriber: {err}"))
}
