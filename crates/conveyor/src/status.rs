//! `conveyorctl status`: where every record of a pipeline is (the counting is
//! [`conveyor_ops::status`]; this is the command line around it).

use anyhow::bail;
use conveyor_amqp::settings::BrokerArgs;
use conveyor_ops::status::PipelineStatus;

#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    /// Pipelines: names, or pipeline files.
    #[arg(required = true)]
    pipelines: Vec<String>,
    /// A worker's /metrics URL (or its base URL); repeat for every worker of the pipelines.
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
}

pub async fn run(args: StatusArgs) -> anyhow::Result<()> {
    let statuses =
        conveyor_ops::status::status(&args.broker, &args.workers, &args.pipelines).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&statuses)?);
    } else {
        for status in &statuses {
            print!("{}", render(status));
        }
    }
    if let Some(bad) = statuses.iter().find(|s| s.unaccounted != 0) {
        bail!(
            "pipeline {}: record(s) unaccounted for ({}); did a worker restart and lose its counts, or was one left out?",
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
        "  {:<10} {:>10} {:>10} {:>14} {:>10} {:>8} {:>8}\n",
        "stage", "entered", "settled", "dead-lettered", "in flight", "queued", "in hand"
    );
    for stage in &status.stages {
        out += &format!(
            "  {:<10} {:>10} {:>10} {:>14} {:>10} {:>8} {:>8}\n",
            stage.stage,
            stage.entered,
            stage.settled,
            stage.dead_lettered,
            stage.in_flight,
            stage.queued_messages,
            stage.unacked_messages
        );
    }
    out += &format!("  written          {:>10}\n", status.written);
    out += &format!(
        "  dead-lettered    {:>10}  record(s), and {} malformed message(s); {} message(s) in the dead-letter queues\n",
        status.dead_lettered, status.malformed_messages, status.dead_letter_messages
    );
    out += &format!(
        "  filtered         {:>10}  (skipped by the rules)\n",
        status.filtered
    );
    out += &format!(
        "  replayed         {:>10}  ({} retries so far)\n",
        status.replayed, status.retried
    );
    for stage in status.stages.iter().filter(|s| s.unaccounted != 0) {
        let what = if stage.unaccounted > 0 {
            "entered the stage and are neither settled, queued nor in a worker's hands"
        } else {
            "settled more often than they entered the stage (counted twice)"
        };
        out += &format!(
            "  UNACCOUNTED      {:>10}  at {}: record(s) that {what}\n",
            stage.unaccounted, stage.stage
        );
    }
    if status.unaccounted == 0 && status.stages.iter().all(|s| s.in_flight == 0) {
        out += "  ok: every record that entered a stage is settled (passed on, written, filtered or dead-lettered)\n";
    }
    out
}

#[cfg(test)]
mod tests {
    use conveyor_base::Stage;
    use conveyor_ops::status::{QueueDepths, count, parse_metrics};

    use super::*;

    const WRITTEN: &str = r#"conveyor_records_out_total{pipeline="p",stage="fetch"} 3
conveyor_records_settled_total{pipeline="p",stage="transform"} 3
conveyor_records_out_total{pipeline="p",stage="transform"} 3
conveyor_records_settled_total{pipeline="p",stage="write"} 2
"#;

    #[test]
    fn the_report_says_ok_or_names_what_is_unaccounted() {
        let quiet = QueueDepths {
            queued: [(Stage::Transform, 0), (Stage::Write, 0)].into(),
            dead_letters: 0,
        };
        let lost = render(&count("p", &parse_metrics(WRITTEN), &quiet));
        assert!(
            lost.contains("UNACCOUNTED               1  at write"),
            "{lost}"
        );
        let whole = WRITTEN.replace("stage=\"write\"} 2", "stage=\"write\"} 3");
        let ok = render(&count("p", &parse_metrics(&whole), &quiet));
        assert!(ok.contains("ok: every record"), "{ok}");
    }
}
