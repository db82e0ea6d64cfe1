//! `conveyorctl status`: where every record of a pipeline is, from the ledger (the counting is
//! [`conveyor_ops::status`]; this is the command line around it).

use std::time::Duration;

use anyhow::bail;
use chrono::{DateTime, Utc};
use conveyor_amqp::settings::BrokerArgs;
use conveyor_ledger::read::Span;
use conveyor_ops::status::{PipelineStatus, Request};
use conveyor_postgres::{Database, PostgresArgs};

#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    /// Pipelines: names, or pipeline files.
    #[arg(required = true)]
    pipelines: Vec<String>,
    /// Add up only what was settled (and sent) at or after this time (RFC 3339).
    #[arg(long, value_parser = crate::rfc3339)]
    since: Option<DateTime<Utc>>,
    /// Add up only what was settled (and sent) before this time (RFC 3339).
    #[arg(long, value_parser = crate::rfc3339)]
    until: Option<DateTime<Utc>>,
    /// Seconds a message must stay in flight, with nothing queued at its stage, to be unaccounted for.
    #[arg(long, default_value_t = 3)]
    settle_wait_secs: u64,
    /// A worker's /metrics URL (or its base URL): its messages in hand count as held, not missing.
    #[arg(
        long = "worker",
        env = "CONVEYOR_STATUS_WORKERS",
        value_delimiter = ','
    )]
    workers: Vec<String>,
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    broker: BrokerArgs,
    /// Where the ledger is: the workers' own PostgreSQL settings.
    #[command(flatten)]
    postgres: PostgresArgs,
}

pub async fn run(args: StatusArgs) -> anyhow::Result<()> {
    let database = Database::connect(&args.postgres)?;
    let request = Request {
        pipelines: args.pipelines.clone(),
        span: Span {
            since: args.since,
            until: args.until,
        },
        settle_wait: Duration::from_secs(args.settle_wait_secs),
        workers: args.workers.clone(),
    };
    let statuses = conveyor_ops::status::status(&args.broker, &database, &request).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&statuses)?);
    } else {
        for status in &statuses {
            print!("{}", render(status));
        }
    }
    if let Some(bad) = statuses.iter().find(|s| s.unaccounted != 0) {
        bail!(
            "pipeline {}: record(s) unaccounted for ({}): sent into a stage, never settled there, and in none of its queues",
            bad.pipeline,
            bad.unaccounted_stages().join(", ")
        );
    }
    Ok(())
}

/// The human-readable report of one pipeline.
fn render(status: &PipelineStatus) -> String {
    let mut out = format!("pipeline {}\n", status.pipeline);
    out += &format!("  fetched          {:>10}\n", status.fetched);
    out += &format!(
        "  {:<10} {:>10} {:>10} {:>10} {:>10} {:>14} {:>10} {:>8}\n",
        "stage",
        "entered",
        "settled",
        "passed on",
        "written",
        "dead-lettered",
        "in flight",
        "queued"
    );
    for stage in &status.stages {
        out += &format!(
            "  {:<10} {:>10} {:>10} {:>10} {:>10} {:>14} {:>10} {:>8}\n",
            stage.stage,
            stage.entered,
            stage.settled,
            stage.passed_on,
            stage.written + stage.already_newer,
            stage.dead_lettered.values().sum::<u64>(),
            stage.in_flight,
            stage.queued_messages
        );
    }
    out += &format!(
        "  written          {:>10}  ({} applied, {} already newer in the target)\n",
        status.written, status.applied, status.already_newer
    );
    let classes: Vec<String> = status
        .dead_lettered_by_class
        .iter()
        .map(|(class, records)| format!("{class} {records}"))
        .collect();
    out += &format!(
        "  dead-lettered    {:>10}  record(s) [{}], and {} malformed message(s); {} message(s) in the dead-letter queues\n",
        status.dead_lettered,
        classes.join(", "),
        status.malformed_messages,
        status.dead_letter_messages
    );
    out += &format!(
        "  filtered         {:>10}  (skipped by the rules)\n",
        status.filtered
    );
    out += &format!(
        "  replayed         {:>10}  ({} purged)\n",
        status.replayed, status.purged
    );
    out += &format!(
        "  ids              fetched {}, written {}, dead-lettered {}, filtered {}\n",
        status.ids.fetched, status.ids.written, status.ids.dead_lettered, status.ids.filtered
    );
    for message in &status.unaccounted_messages {
        out += &format!(
            "  UNACCOUNTED      message {} at {} (sent by {} at {}, from {}): record(s) {}\n",
            message.message_id,
            message.stage,
            message.sent_by,
            message.sent_at.to_rfc3339(),
            message.parent_id,
            message.record_ids.join(", ")
        );
    }
    if status.unaccounted == 0 && status.in_flight == 0 {
        out += "  ok: every record sent into a stage is settled (passed on, written, filtered or dead-lettered)\n";
    } else if status.unaccounted == 0 {
        out += &format!(
            "  in flight: {} record(s) queued or in a worker's hands\n",
            status.in_flight
        );
    }
    out
}
