//! `conveyorctl`: check pipeline files, declare the topology, inspect and replay dead letters, account
//! for records, compare the target with the source, check the source's credentials.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use conveyor_amqp::Topology;
use conveyor_amqp::settings::BrokerArgs;
use conveyor_pipeline::Pipeline;

#[derive(Debug, Parser)]
#[command(name = "conveyorctl", version, about = "Operate conveyor pipelines")]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Check a pipeline file; on error, name the file, the field and the problem.
    Check {
        /// The pipeline file.
        file: PathBuf,
        /// Also check a postgres target against a database, changing nothing: the migrations run in
        /// a scratch schema inside a transaction that is rolled back, and the table they make must
        /// have every mapped column and a unique key (what a writer checks at start).
        #[arg(long, env = "CONVEYOR_PG_URL", hide_env_values = true)]
        pg_url: Option<conveyor_base::Secret>,
    },
    /// Try a pipeline's transformation rules on sample records.
    Transform {
        #[command(subcommand)]
        command: TransformCommand,
    },
    /// The broker topology of pipelines.
    Topology {
        #[command(subcommand)]
        command: TopologyCommand,
    },
    /// Dead letters: list, show, replay, purge, export.
    Dlq {
        #[command(subcommand)]
        command: crate::dlq::DlqCommand,
    },
    /// Where every record of a pipeline is: fetched, written, dead-lettered, filtered, in flight.
    Status(crate::status::StatusArgs),
    /// Compare the target with the source over a time range: missing, older and extra rows by id.
    Reconcile(crate::reconcile::ReconcileArgs),
    /// Hand modify-time windows out to the fetchers again (what reconcile offers to mend).
    Resync(crate::reconcile::ResyncArgs),
    /// The Kingdee gateway: debug a signature, check the credentials.
    Kingdee {
        #[command(subcommand)]
        command: KingdeeCommand,
    },
    /// Exit 0 if a URL answers 200 (a container healthcheck for images without curl).
    Probe {
        /// E.g. http://127.0.0.1:9103/readyz
        url: String,
        /// Seconds to wait for the answer.
        #[arg(long, default_value_t = 3)]
        timeout_secs: u64,
    },
}

#[derive(Debug, Subcommand)]
enum TransformCommand {
    /// Print what the rules make of sample source rows: the output records, the errors (field and
    /// reason) and how many were filtered. Exits 1 if any row fails.
    Preview {
        /// The pipeline file.
        file: PathBuf,
        /// A JSON file: an array of source rows, one row, or a list response (`{"data":{"rows":[...]}}`).
        #[arg(long)]
        input: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
enum TopologyCommand {
    /// Declare the exchanges and queues of a pipeline (idempotent; workers do the same at start).
    Declare {
        /// The pipeline file.
        file: PathBuf,
        #[command(flatten)]
        broker: BrokerArgs,
    },
}

#[derive(Debug, Subcommand)]
enum KingdeeCommand {
    /// Print the string to sign and, on its last line, the X-Api-Signature the gateway expects.
    Sign {
        /// The app's client secret (the signing key); better from the environment or a file than on
        /// a command line, which other users of the machine can see.
        #[arg(long, env = "CONVEYOR_KINGDEE_CLIENT_SECRET", hide_env_values = true)]
        client_secret: Option<conveyor_base::Secret>,
        /// File holding the client secret, instead of CONVEYOR_KINGDEE_CLIENT_SECRET.
        #[arg(long, env = "CONVEYOR_KINGDEE_CLIENT_SECRET_FILE")]
        client_secret_file: Option<std::path::PathBuf>,
        /// HTTP method, e.g. GET.
        #[arg(long)]
        method: String,
        /// Request path, e.g. /jdy/v2/scm/sal_order.
        #[arg(long)]
        path: String,
        /// A decoded query parameter, KEY=VALUE; repeat for each.
        #[arg(long = "query", value_parser = parse_pair)]
        query: Vec<(String, String)>,
        /// X-Api-Nonce.
        #[arg(long)]
        nonce: String,
        /// X-Api-TimeStamp (epoch milliseconds).
        #[arg(long)]
        timestamp: String,
    },
    /// Authorize and fetch an app-token with the configured credentials, and say what failed.
    Token {
        #[command(flatten)]
        kingdee: conveyor_kingdee::KingdeeArgs,
    },
}

fn parse_pair(text: &str) -> Result<(String, String), String> {
    text.split_once('=')
        .map(|(key, value)| (key.to_owned(), value.to_owned()))
        .ok_or_else(|| format!("{text:?} is not KEY=VALUE"))
}

pub fn main(cli: Cli) -> ExitCode {
    conveyor_runtime::process::run_tool(run(cli))
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Check { file, pg_url } => {
            let pipeline = Pipeline::load(&file)?;
            println!(
                "{}: pipeline {:?} is valid ({} mapped fields)",
                file.display(),
                pipeline.name(),
                pipeline.mapping.output_fields().count()
            );
            // Checked when the file loaded; an error here is said like any other of the file's.
            let schedule = pipeline
                .spec
                .source
                .schedule()
                .map_err(|(field, problem)| {
                    anyhow::anyhow!(
                        "pipeline file {}: field `{field}`: {problem}",
                        file.display()
                    )
                })?;
            match schedule {
                Some(schedule) => {
                    let times: Vec<String> = schedule
                        .upcoming(chrono::Utc::now(), 3)
                        .iter()
                        .map(|time| time.format("%Y-%m-%d %H:%M %:z").to_string())
                        .collect();
                    println!(
                        "  plans new windows on schedule {}; next: {}",
                        schedule.described,
                        times.join(", ")
                    );
                }
                None => println!(
                    "  plans new windows every CONVEYOR_FETCH_INTERVAL_SECS (no source.schedule)"
                ),
            }
            if let Some(url) = pg_url {
                let conveyor_pipeline::TargetSpec::Postgres(spec) = &pipeline.spec.target else {
                    anyhow::bail!("--pg-url checks a postgres target; this pipeline's is not one");
                };
                let args = conveyor_postgres::PostgresArgs::at(url, "public");
                conveyor_writer::target::postgres::PostgresTarget::dry_run(&pipeline, spec, &args)
                    .await
                    .with_context(|| format!("pipeline file {}", file.display()))?;
                println!(
                    "{}: its migrations make table {:?} with every mapped column and a unique {:?} (checked in a scratch schema, rolled back)",
                    file.display(),
                    spec.table,
                    pipeline.mapping.key_field()
                );
            }
            Ok(())
        }
        Command::Transform {
            command: TransformCommand::Preview { file, input },
        } => {
            let pipeline = Pipeline::load(&file)?;
            let text = std::fs::read_to_string(&input)
                .with_context(|| format!("reading {}", input.display()))?;
            let sample: serde_json::Value = serde_json::from_str(&text)
                .with_context(|| format!("{} is not JSON", input.display()))?;
            let preview = conveyor_transformer::preview(
                &pipeline.mapping,
                &pipeline.spec.source.id_field,
                sample,
            );
            println!("{}", serde_json::to_string_pretty(&preview)?);
            anyhow::ensure!(
                preview.errors.is_empty(),
                "{} of the sample rows cannot be mapped (see \"errors\" above)",
                preview.errors.len()
            );
            Ok(())
        }
        Command::Topology {
            command: TopologyCommand::Declare { file, broker },
        } => {
            let pipeline = Pipeline::load(&file)?;
            let connection = conveyor_amqp::connect(&broker.address()?, "conveyorctl").await?;
            let topology = Topology::new(&broker, pipeline.name());
            topology.declare(&connection).await?;
            conveyor_amqp::close(&connection).await;
            for queue in topology.queues() {
                println!("declared {queue}");
            }
            Ok(())
        }
        Command::Dlq { command } => crate::dlq::run(command).await,
        Command::Status(args) => crate::status::run(args).await,
        Command::Reconcile(args) => crate::reconcile::reconcile(args).await,
        Command::Resync(args) => crate::reconcile::resync(args).await,
        Command::Kingdee {
            command:
                KingdeeCommand::Sign {
                    client_secret,
                    client_secret_file,
                    method,
                    path,
                    query,
                    nonce,
                    timestamp,
                },
        } => {
            let input = conveyor_kingdee::sign::SignatureInput {
                method: &method,
                path: &path,
                query: &query,
                nonce: &nonce,
                timestamp: &timestamp,
            };
            let client_secret = conveyor_base::Secret::from_value_or_file(
                "CONVEYOR_KINGDEE_CLIENT_SECRET",
                client_secret.as_ref().map(conveyor_base::Secret::expose),
                client_secret_file.as_deref(),
            )?
            .ok_or_else(|| {
                conveyor_base::SettingsError::new(
                    "CONVEYOR_KINGDEE_CLIENT_SECRET",
                    "required: the signing key (--client-secret, the variable, or its _FILE)",
                )
            })?;
            print!("{}", input.string_to_sign());
            println!("{}", input.signature(client_secret.expose()));
            Ok(())
        }
        Command::Kingdee {
            command: KingdeeCommand::Token { kingdee },
        } => {
            let credentials = kingdee.credentials()?;
            let gateway = conveyor_kingdee::Gateway::new(
                credentials,
                conveyor_base::source::Unlimited,
                conveyor_base::metrics::Metrics::new(),
                "conveyorctl",
            );
            let report = gateway
                .check_token()
                .await
                .map_err(|err| anyhow::anyhow!("the credentials do not work: {err}"))?;
            println!(
                "ok: account set {:?} at {}; app-token valid until {}",
                report.account_name, report.domain, report.expires_at
            );
            Ok(())
        }
        Command::Probe { url, timeout_secs } => {
            let client = conveyor_base::tls::http_client(None)
                .timeout(std::time::Duration::from_secs(timeout_secs))
                .build()?;
            let response = client.get(&url).send().await?;
            let status = response.status();
            let body = response.text().await.unwrap_or_default();
            anyhow::ensure!(
                status.is_success(),
                "{url} answered {status}: {}",
                body.trim()
            );
            Ok(())
        }
    }
}
