//! `conveyorctl reconcile` and `conveyorctl resync`: the target compared with the source (the
//! comparing is [`conveyor_ops::reconcile`]), and the windows it names handed out again.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::bail;
use chrono::{DateTime, SubsecRound as _, Utc};
use conveyor_amqp::settings::BrokerArgs;
use conveyor_base::metrics::Metrics;
use conveyor_base::source::{Source, Window};
use conveyor_fetcher::WithSource;
use conveyor_kingdee::KingdeeArgs;
use conveyor_ops::reconcile::{Compared, Report, Request, TargetReader};
use conveyor_pipeline::Pipeline;
use conveyor_postgres::{Database, PostgresArgs};
use conveyor_writer::target::http::HttpArgs;

#[derive(Debug, clap::Args)]
pub struct ReconcileArgs {
    /// The pipeline: its file, or its name among CONVEYOR_PIPELINE's files (the workers' setting).
    pipeline: String,
    /// Compare the records modified at or after this time (RFC 3339).
    #[arg(long, value_parser = crate::rfc3339)]
    since: DateTime<Utc>,
    /// ... and at or before this time (RFC 3339; default: now).
    #[arg(long, value_parser = crate::rfc3339)]
    until: Option<DateTime<Utc>>,
    /// Width of one window of the comparison, seconds: each costs one call for its count.
    #[arg(long, default_value_t = 86_400)]
    window_secs: u64,
    /// Calls to the source at most. The windows' counts must fit; ids are compared in every window
    /// when they fit too, else only in windows whose counts differ.
    #[arg(long, default_value_t = 1_000)]
    max_calls: u64,
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    kingdee: KingdeeArgs,
    /// The target's, the sync state's and the call budget's database: the workers' own settings.
    #[command(flatten)]
    postgres: PostgresArgs,
    /// An HTTP target's API: the writers' own settings.
    #[command(flatten)]
    http: HttpArgs,
}

#[derive(Debug, clap::Args)]
pub struct ResyncArgs {
    /// The pipeline: its file, or its name among CONVEYOR_PIPELINE's files (the workers' setting).
    pipeline: String,
    /// A modify-time window to page again, START/END (RFC 3339); repeat for each.
    #[arg(long = "window", required = true, value_parser = parse_window)]
    windows: Vec<Window>,
    #[command(flatten)]
    broker: BrokerArgs,
    /// The sync state's database: the fetchers' own settings.
    #[command(flatten)]
    postgres: PostgresArgs,
}

pub async fn reconcile(args: ReconcileArgs) -> anyhow::Result<()> {
    let pipeline = load_pipeline(&args.pipeline)?;
    let database = Database::connect(&args.postgres)?;
    let request = Request {
        since: args.since,
        // Whole milliseconds, as the source's times and the fetchers' windows are.
        until: args.until.unwrap_or_else(Utc::now).trunc_subsecs(3),
        window: Duration::from_secs(args.window_secs),
        max_calls: args.max_calls,
    };
    // The call budget's and the login's tables, there even before any fetcher ran.
    conveyor_fetcher::state::SyncStore::open(database.clone(), pipeline.name()).await?;
    let work = Compare {
        target: TargetReader::open(&pipeline, database.clone(), &args.http).await?,
        pipeline: &pipeline,
        request,
    };
    let report =
        conveyor_fetcher::with_source(&pipeline, &args.kingdee, &database, &Metrics::new(), work)
            .await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", render(&report, &args.pipeline));
    }
    if !report.is_clean() {
        bail!(
            "pipeline {}: the target differs from the source ({} missing, {} older, {} extra, {} window(s) not compared)",
            report.pipeline,
            report.missing.len(),
            report.older.len(),
            report.extra.len(),
            report
                .windows
                .iter()
                .filter(|w| w.compared == Compared::NotCompared)
                .count()
        );
    }
    Ok(())
}

pub async fn resync(args: ResyncArgs) -> anyhow::Result<()> {
    let pipeline = load_pipeline(&args.pipeline)?;
    conveyor_fetcher::resync(&args.broker, &args.postgres, pipeline.name(), &args.windows).await?;
    for window in &args.windows {
        println!(
            "handed out {}/{} to the fetchers",
            window.start.to_rfc3339(),
            window.end.to_rfc3339()
        );
    }
    Ok(())
}

struct Compare<'a> {
    pipeline: &'a Pipeline,
    target: TargetReader,
    request: Request,
}

impl WithSource for Compare<'_> {
    type Output = Report;

    async fn run<S: Source>(self, source: std::sync::Arc<S>) -> anyhow::Result<Report> {
        source
            .check()
            .await
            .map_err(|failure| anyhow::anyhow!(failure.message))?;
        conveyor_ops::reconcile::reconcile(self.pipeline, &*source, &self.target, &self.request)
            .await
    }
}

/// The pipeline `given` names: its file, or the one of CONVEYOR_PIPELINE's files with that name.
fn load_pipeline(given: &str) -> anyhow::Result<Pipeline> {
    if given.ends_with(".toml") || Path::new(given).is_file() {
        return Ok(Pipeline::load(given)?);
    }
    let listed = std::env::var("CONVEYOR_PIPELINE").unwrap_or_default();
    let paths: Vec<PathBuf> = listed
        .split(',')
        .filter(|path| !path.is_empty())
        .map(PathBuf::from)
        .collect();
    for file in conveyor_runtime::settings::pipeline_files(&paths)? {
        let pipeline = Pipeline::load(&file)?;
        if pipeline.name() == given {
            return Ok(pipeline);
        }
    }
    bail!(
        "no pipeline {given:?} among CONVEYOR_PIPELINE ({listed:?}): give its file, or set \
         CONVEYOR_PIPELINE to the files the workers run"
    )
}

fn parse_window(text: &str) -> Result<Window, String> {
    let (start, end) = text
        .split_once('/')
        .ok_or_else(|| format!("{text:?} is not START/END"))?;
    let window = Window {
        start: crate::rfc3339(start)?,
        end: crate::rfc3339(end)?,
    };
    if window.end < window.start {
        return Err(format!("{text:?} ends before it starts"));
    }
    Ok(window)
}

/// Ids listed of each kind in the human-readable report.
const LISTED: usize = 50;

/// The human-readable report.
fn render(report: &Report, pipeline: &str) -> String {
    let mut out = format!(
        "pipeline {}: {} – {}, {} window(s), {} call(s) to the source\n",
        report.pipeline,
        report.since.to_rfc3339(),
        report.until.to_rfc3339(),
        report.windows.len(),
        report.calls
    );
    out += &format!(
        "  {:<32} {:>8} {:>8} {:>12} {:>8} {:>8}\n",
        "window start", "source", "target", "compared", "missing", "older"
    );
    let mut empty = 0;
    for window in &report.windows {
        if window.source_rows == 0 && window.target_rows.unwrap_or(0) == 0 {
            empty += 1;
            continue;
        }
        let compared = match window.compared {
            Compared::Ids => "ids",
            Compared::Counts => "counts",
            Compared::NotCompared => "NOT",
        };
        out += &format!(
            "  {:<32} {:>8} {:>8} {:>12} {:>8} {:>8}\n",
            window.start.to_rfc3339(),
            window.source_rows,
            window
                .target_rows
                .map_or("-".to_owned(), |rows| rows.to_string()),
            compared,
            window.missing,
            window.older
        );
    }
    if empty > 0 {
        out += &format!("  and {empty} window(s) empty in both\n");
    }
    // A screenful at most: --json lists them all.
    let list = |ids: &mut dyn ExactSizeIterator<Item = String>| {
        let more = ids.len().saturating_sub(LISTED);
        let mut text = ids.take(LISTED).collect::<Vec<_>>().join(", ");
        if more > 0 {
            text += &format!(" … and {more} more (--json lists every one)");
        }
        text
    };
    if !report.missing.is_empty() {
        out += &format!(
            "missing ({}): {}\n",
            report.missing.len(),
            list(&mut report.missing.iter().cloned())
        );
    }
    if !report.older.is_empty() {
        out += &format!(
            "older ({}): {}\n",
            report.older.len(),
            list(&mut report.older.iter().map(|older| format!(
                "{} (source {}, target {})",
                older.id,
                older.source_version.to_rfc3339(),
                older.target_version
            )))
        );
    }
    if !report.extra.is_empty() {
        out += &format!(
            "extra ({}): {}\n  in the target with a version in the range, not among the source's rows: deleted at \
             the source, or written by something else. A re-sync does not delete them.\n",
            report.extra.len(),
            list(&mut report.extra.iter().cloned())
        );
    }
    if !report.extras_sought {
        out += "extras not sought: an HTTP target cannot be listed\n";
    }
    if !report.refused.is_empty() {
        out += &format!(
            "refused by the rules ({}, dead letters rather than missing): {}\n",
            report.refused.len(),
            list(
                &mut report
                    .refused
                    .iter()
                    .map(|refused| format!("{} ({})", refused.id, refused.reason))
            )
        );
    }
    if report.filtered > 0 {
        out += &format!(
            "filtered by the rules: {} (not expected in the target)\n",
            report.filtered
        );
    }
    let counts_only = report
        .windows
        .iter()
        .filter(|w| w.compared == Compared::Counts)
        .count();
    if counts_only > 0 {
        out += &format!(
            "{counts_only} window(s) compared by counts only (their ids did not fit in --max-calls): a row set \
             back to an older version within its window would not show there\n"
        );
    }
    let resync = report.windows_to_resync();
    if resync.is_empty() {
        if report.is_clean() {
            out += "ok: the target holds every source record of the range at its version\n";
        }
    } else {
        let windows: Vec<String> = resync
            .iter()
            .map(|w| format!("--window {}/{}", w.start.to_rfc3339(), w.end.to_rfc3339()))
            .collect();
        out += &format!(
            "to page those windows again (missing and older rows; running fetchers take them):\n  \
             conveyorctl resync {} {}\n",
            pipeline,
            windows.join(" ")
        );
    }
    out
}
