//! `conveyorctl dlq`: list, show, replay, purge and export dead letters (the actions are
//! [`conveyor_ops::dead_letters`]; this is the command line around them: flags, printing, the
//! question before a purge, a progress bar).

use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;

use anyhow::{Context as _, bail};
use chrono::{DateTime, Utc};
use clap::{Args, Subcommand, ValueEnum};
use conveyor_amqp::dead_letters::{self, DeadLetter, Filter};
use conveyor_amqp::settings::BrokerArgs;
use conveyor_base::Stage;
use conveyor_ledger::LedgerArgs;
use conveyor_ledger::action::By;
use conveyor_ops::dead_letters::Selection;
use conveyor_postgres::{Database, PostgresArgs};
use indicatif::{ProgressBar, ProgressStyle};

#[derive(Debug, Subcommand)]
pub enum DlqCommand {
    /// Count dead letters per pipeline and stage, and by error class.
    List {
        /// Pipelines: names, or pipeline files.
        #[arg(required = true)]
        pipelines: Vec<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        broker: BrokerArgs,
    },
    /// Show dead letters with their failure details.
    Show {
        /// Print JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        select: Select,
    },
    /// Publish dead letters back into the stage where they failed (with a confirm), then remove them.
    Replay {
        /// Say what would be replayed, and replay nothing.
        #[arg(long)]
        dry_run: bool,
        #[command(flatten)]
        select: Select,
        #[command(flatten)]
        ledger: LedgerAccess,
    },
    /// Remove dead letters for good.
    Purge {
        /// Do not ask for confirmation.
        #[arg(long)]
        yes: bool,
        #[command(flatten)]
        select: Select,
        #[command(flatten)]
        ledger: LedgerAccess,
    },
    /// Write dead letters as JSON Lines, one message a line, for offline analysis. Removes nothing.
    Export {
        #[command(flatten)]
        select: Select,
        /// The file to write (standard output if absent).
        #[arg(long, short)]
        output: Option<PathBuf>,
    },
}

/// Which dead letters a command applies to.
#[derive(Debug, Args)]
pub struct Select {
    /// The pipeline: its name, or its pipeline file.
    pipeline: String,
    /// Only this stage's dead-letter queue (all stages if absent).
    #[arg(long, value_enum)]
    stage: Option<StageArg>,
    /// Only this error class.
    #[arg(long, value_enum)]
    class: Option<ClassArg>,
    /// Only letters carrying this record id.
    #[arg(long)]
    record_id: Option<String>,
    /// Only letters that last failed at or after this time (RFC 3339).
    #[arg(long, value_parser = crate::rfc3339)]
    since: Option<DateTime<Utc>>,
    /// Only letters that last failed before this time (RFC 3339).
    #[arg(long, value_parser = crate::rfc3339)]
    until: Option<DateTime<Utc>>,
    /// At most this many messages (per stage; 1 or more).
    #[arg(long, value_parser = at_least_one)]
    limit: Option<usize>,
    /// Messages read from one dead-letter queue at most (they are held in memory while working).
    #[arg(long, default_value_t = 100_000)]
    max_messages: usize,
    #[command(flatten)]
    broker: BrokerArgs,
}

/// Where the ledger that records a replay or a purge is: the workers' own settings.
#[derive(Debug, Args)]
pub struct LedgerAccess {
    #[command(flatten)]
    postgres: PostgresArgs,
    #[command(flatten)]
    ledger: LedgerArgs,
}

impl LedgerAccess {
    /// The ledger's database, or `None` when it is switched off.
    fn database(&self) -> anyhow::Result<Option<Database>> {
        if !self.ledger.enabled {
            return Ok(None);
        }
        let database = Database::connect(&self.postgres).context(
            "the ledger records every replay and purge (CONVEYOR_LEDGER=off if the workers keep none)",
        )?;
        Ok(Some(database))
    }
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum StageArg {
    Fetch,
    Transform,
    Write,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum ClassArg {
    Malformed,
    Permanent,
    Transient,
    /// Dead-lettered by the broker itself (redelivered past its work queue's delivery limit).
    Broker,
}

impl Select {
    fn selection(&self) -> anyhow::Result<Selection> {
        if let (Some(since), Some(until)) = (self.since, self.until)
            && since >= until
        {
            anyhow::bail!(
                "--since {} is not before --until {}: no letter can match",
                since.to_rfc3339(),
                until.to_rfc3339()
            );
        }
        Ok(Selection {
            pipeline: self.pipeline.clone(),
            stage: self.stage.map(|stage| match stage {
                StageArg::Fetch => Stage::Fetch,
                StageArg::Transform => Stage::Transform,
                StageArg::Write => Stage::Write,
            }),
            filter: Filter {
                class: self.class.map(|class| {
                    match class {
                        ClassArg::Malformed => "malformed",
                        ClassArg::Permanent => "permanent",
                        ClassArg::Transient => "transient",
                        ClassArg::Broker => dead_letters::BROKER_CLASS,
                    }
                    .to_owned()
                }),
                record_id: self.record_id.clone(),
                since: self.since,
                until: self.until,
                ..Default::default()
            },
            limit: self.limit,
            max_messages: self.max_messages,
        })
    }
}

pub async fn run(command: DlqCommand) -> anyhow::Result<()> {
    match command {
        DlqCommand::List {
            pipelines,
            json,
            broker,
        } => list(&pipelines, json, &broker).await,
        DlqCommand::Show { select, json } => show(&select, json).await,
        DlqCommand::Replay {
            select,
            dry_run,
            ledger,
        } => replay(&select, dry_run, &ledger).await,
        DlqCommand::Purge {
            select,
            yes,
            ledger,
        } => purge(&select, yes, &ledger).await,
        DlqCommand::Export { select, output } => export(&select, output).await,
    }
}

async fn list(pipelines: &[String], json: bool, broker: &BrokerArgs) -> anyhow::Result<()> {
    let counts = conveyor_ops::dead_letters::list(broker, pipelines).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&counts)?);
        return Ok(());
    }
    println!(
        "{:<24} {:<10} {:>9} {:>9}  by class",
        "pipeline", "stage", "messages", "records"
    );
    for count in &counts {
        let classes: Vec<String> = count
            .by_class
            .iter()
            .map(|(class, n)| format!("{class} {n}"))
            .collect();
        println!(
            "{:<24} {:<10} {:>9} {:>9}  {}",
            count.pipeline,
            count.stage,
            count.messages,
            count.records,
            classes.join(", ")
        );
    }
    Ok(())
}

async fn show(select: &Select, json: bool) -> anyhow::Result<()> {
    let shown: Vec<DeadLetter> =
        conveyor_ops::dead_letters::show(&select.broker, &select.selection()?).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&shown)?);
        return Ok(());
    }
    for letter in &shown {
        let time = |t: &Option<DateTime<chrono::FixedOffset>>| {
            t.map(|t| t.to_rfc3339()).unwrap_or_else(|| "-".into())
        };
        println!("{} message {}", letter.queue, letter.message_id);
        println!("  class:    {}", letter.class);
        println!("  error:    {}", letter.error);
        println!("  attempts: {}", letter.attempts);
        println!(
            "  failed:   first {}, last {}",
            time(&letter.first_failed_at),
            time(&letter.last_failed_at)
        );
        println!(
            "  route:    exchange {:?} key {:?}",
            letter.original_exchange, letter.original_routing_key
        );
        println!("  records:  {}", letter.record_ids.join(", "));
        println!("  trace:    {}", letter.trace_id);
        let payload = letter
            .payload
            .clone()
            .unwrap_or_else(|| format!("(hex) {}", letter.payload_hex.clone().unwrap_or_default()));
        let short: String = payload.chars().take(300).collect();
        let more = if short.len() < payload.len() {
            " …"
        } else {
            ""
        };
        println!("  payload:  {short}{more}");
    }
    eprintln!("{} dead letter(s)", shown.len());
    Ok(())
}

async fn replay(select: &Select, dry_run: bool, ledger: &LedgerAccess) -> anyhow::Result<()> {
    let selection = select.selection()?;
    if dry_run {
        let letters = conveyor_ops::dead_letters::show(&select.broker, &selection).await?;
        for letter in &letters {
            println!(
                "would replay {} message {} ({} record(s), {}) to {:?}",
                letter.queue,
                letter.message_id,
                letter.record_ids.len(),
                letter.class,
                letter.original_routing_key
            );
        }
        let records: usize = letters.iter().map(|letter| letter.record_ids.len()).sum();
        println!(
            "would replay {} message(s) with {records} record(s); 0 failed and stay in the dead-letter queue",
            letters.len()
        );
        return Ok(());
    }
    let database = ledger.database()?;
    let mut bar = None;
    let replayed = conveyor_ops::dead_letters::replay(
        &select.broker,
        database.as_ref(),
        &selection,
        &By::os_user(),
        |selected| {
            // The letters are selected as the queues are read: the bar grows with them.
            let bar = bar.get_or_insert_with(|| progress(selected as u64));
            bar.set_length(selected as u64);
            bar.inc(1);
        },
    )
    .await?;
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    println!(
        "replayed {} message(s) with {} record(s); {} failed and stay in the dead-letter queue",
        replayed.messages,
        replayed.records,
        replayed.failed.len()
    );
    for failure in &replayed.failed {
        eprintln!("  {failure}");
    }
    if !replayed.failed.is_empty() {
        bail!("{} message(s) could not be replayed", replayed.failed.len());
    }
    Ok(())
}

async fn purge(select: &Select, yes: bool, ledger: &LedgerAccess) -> anyhow::Result<()> {
    let database = ledger.database()?;
    let purged = conveyor_ops::dead_letters::purge(
        &select.broker,
        database.as_ref(),
        &select.selection()?,
        &By::os_user(),
        |total| Ok(yes || confirm(total)?),
    )
    .await?;
    let Some(removed) = purged else {
        bail!("nothing purged: not confirmed (use --yes to skip the question)");
    };
    println!("purged {removed} message(s)");
    Ok(())
}

/// Asks on the terminal; anything but "y"/"yes" (or no terminal to ask on) is a no.
fn confirm(count: usize) -> anyhow::Result<bool> {
    let stdin = std::io::stdin();
    if !stdin.is_terminal() {
        eprintln!("{count} message(s) would be removed for good; confirm with --yes");
        return Ok(false);
    }
    eprint!("remove {count} dead letter(s) for good? [y/N] ");
    std::io::stderr().flush()?;
    let mut answer = String::new();
    stdin.lock().read_line(&mut answer)?;
    Ok(matches!(answer.trim().to_lowercase().as_str(), "y" | "yes"))
}

async fn export(select: &Select, output: Option<PathBuf>) -> anyhow::Result<()> {
    let mut out: Box<dyn Write> = match &output {
        Some(path) => Box::new(std::io::BufWriter::new(
            std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?,
        )),
        None => Box::new(std::io::stdout().lock()),
    };
    let written =
        conveyor_ops::dead_letters::export(&select.broker, &select.selection()?, &mut out).await?;
    eprintln!("exported {written} dead letter(s)");
    Ok(())
}

/// A progress bar on standard error for long runs (drawn only on a terminal).
fn progress(total: u64) -> ProgressBar {
    if total < 50 {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(total);
    if let Ok(style) = ProgressStyle::with_template("{bar:40} {pos}/{len} replayed ({eta} left)") {
        bar.set_style(style);
    }
    bar
}

fn at_least_one(given: &str) -> Result<usize, String> {
    match given.parse::<usize>() {
        Ok(0) => Err("0 would select nothing: give 1 or more, or leave --limit out".into()),
        Ok(count) => Ok(count),
        Err(err) => Err(format!("{err}: expected a count of 1 or more")),
    }
}
