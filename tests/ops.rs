//! Running it like production: every documented metric is exported by the workers with bounded
//! labels, and no configured secret shows in their logs, `/metrics`, `/readyz` or `--help`.

use std::collections::BTreeSet;
use std::time::Duration;

mod common;

use common::*;
use conveyor_base::metrics::{DOCUMENTED, LABELS};
use conveyor_harness::{Worker, WorkerProcess};
use kingdee_sim::SimConfig;

/// The metric families of a worker's `/metrics` (histogram series under their family name), with
/// every label name and `pipeline` value seen.
struct Scrape {
    text: String,
    names: BTreeSet<String>,
    labels: BTreeSet<String>,
    pipelines: BTreeSet<String>,
}

async fn scrape(worker: &WorkerProcess) -> Scrape {
    let url = format!("http://{}/metrics", worker.http_addr);
    let text = http()
        .get(url)
        .send()
        .await
        .expect("/metrics answers")
        .text()
        .await
        .expect("metrics text");
    let mut names = BTreeSet::new();
    let mut labels = BTreeSet::new();
    let mut pipelines = BTreeSet::new();
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let name = line.split(['{', ' ']).next().unwrap_or_default();
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| {
                name.strip_suffix(suffix)
                    .filter(|family| DOCUMENTED.contains(family))
            })
            .unwrap_or(name);
        names.insert(family.to_owned());
        if let Some((_, rest)) = line.split_once('{') {
            let label_text = rest.split_once('}').expect("closed label set").0;
            for pair in label_text.split(',') {
                let (label, value) = pair.split_once('=').expect("label=value");
                labels.insert(label.to_owned());
                if label == "pipeline" {
                    pipelines.insert(value.trim_matches('"').to_owned());
                }
            }
        }
    }
    Scrape {
        text,
        names,
        labels,
        pipelines,
    }
}

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|name| name.to_string()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_export_every_documented_metric_and_no_secret() {
    let client_secret = format!("kd-secret-{}", uuid_like());
    let pg_password = format!("pg-password-{}", uuid_like());
    let mut sim = orders(300);
    sim.gateway.client_secret = client_secret.clone();
    let mut scenario = scenario("ops", sim).await;
    // The machine's PostgreSQL trusts local connections, so any password works: a distinctive one
    // shows whether the URL leaks anywhere.
    let pg_url = scenario.services.pg_url.expose().replacen(
        "postgres://postgres@",
        &format!("postgres://postgres:{pg_password}@"),
        1,
    );
    assert!(pg_url.contains(&pg_password), "unexpected PG URL shape");
    scenario.set_env("CONVEYOR_PG_URL", pg_url);
    // Debug logs are where a secret would most likely slip out.
    // The broker client too: its lines are off by default, and must hold no secret when turned on.
    scenario.set_env("CONVEYOR_LOG", "debug,lapin=debug");
    let secrets = [client_secret.as_str(), pg_password.as_str()];

    within(TIMEOUT, async {
        step("running a full pipeline");
        let mut workers = vec![
            spawn_ready(&scenario, Worker::Transformer).await,
            spawn_ready(&scenario, Worker::Writer).await,
            scenario.spawn(Worker::Fetcher, &[]).unwrap(),
        ];
        assert_target_equals_truth(&scenario, &workers).await;
        wait_ready(&workers[2], true, TIMEOUT).await;

        step("scraping every worker");
        let mut all_names = BTreeSet::new();
        let common = set(&[
            "conveyor_records_in_total",
            "conveyor_records_out_total",
            "conveyor_records_dead_lettered_total",
            "conveyor_messages_dead_lettered_total",
            "conveyor_records_retried_total",
            "conveyor_records_filtered_total",
            "conveyor_records_replayed_total",
            "conveyor_messages_in_hand",
            "conveyor_queue_messages",
            "conveyor_message_duration_seconds",
            "conveyor_message_queued_seconds",
            "conveyor_ready",
        ]);
        // The fetch stage's messages are sync windows: it settles no records of a queue.
        let own = [
            set(&["conveyor_records_settled_total"]),
            set(&[
                "conveyor_records_settled_total",
                "conveyor_target_rows_total",
                "conveyor_target_write_duration_seconds",
            ]),
            set(&[
                "conveyor_source_requests_total",
                "conveyor_source_token_refreshes_total",
                "conveyor_source_throttled_total",
                "conveyor_source_rate_wait_seconds_total",
                "conveyor_source_call_rate_per_minute",
                "conveyor_sync_windows_total",
                "conveyor_sync_watermark_seconds",
            ]),
        ];
        for (worker, own) in workers.iter().zip(own) {
            let scraped = scrape(worker).await;
            let expected: BTreeSet<String> = common.union(&own).cloned().collect();
            assert_eq!(
                scraped.names,
                expected,
                "metrics of {}",
                worker.worker.binary()
            );
            let allowed = set(LABELS).into_iter().chain(["le".to_owned()]).collect();
            assert!(
                scraped.labels.is_subset(&allowed),
                "{} has labels {:?}",
                worker.worker.binary(),
                scraped.labels
            );
            assert_eq!(
                scraped.pipelines,
                set(&[scenario.pipeline.name()]),
                "pipeline label values"
            );
            for secret in secrets {
                assert!(!scraped.text.contains(secret), "/metrics shows a secret");
            }
            let readyz = http()
                .get(format!("http://{}/readyz", worker.http_addr))
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap();
            for secret in secrets {
                assert!(!readyz.contains(secret), "/readyz shows a secret");
            }
            all_names.extend(scraped.names);
        }
        assert_eq!(
            all_names,
            set(DOCUMENTED),
            "the workers together export DOCUMENTED"
        );

        for worker in &workers[..2] {
            assert!(
                metric(worker, "conveyor_message_queued_seconds_count", &[]).await > 0.0,
                "{} measured no time queued",
                worker.worker.binary()
            );
        }
        stop_all(&mut workers).await;
        step("reading every log");
        for worker in &workers {
            let log = std::fs::read_to_string(&worker.log).unwrap();
            assert!(
                log.lines().count() > 10,
                "{} logged too little for the check to mean anything",
                worker.worker.binary()
            );
            for secret in secrets {
                assert!(
                    !log.contains(secret),
                    "{} logged a secret: {}",
                    worker.worker.binary(),
                    worker.log.display()
                );
            }
        }
        let help = std::process::Command::new(bin_dir().join("conveyor-fetcher"))
            .arg("--help")
            .envs(scenario.environment())
            .envs(scenario.extra_env.iter().map(|(k, v)| (k, v)))
            .output()
            .unwrap();
        let help = String::from_utf8_lossy(&help.stdout);
        assert!(help.contains("CONVEYOR_KINGDEE_CLIENT_SECRET"), "{help}");
        for secret in secrets {
            assert!(!help.contains(secret), "--help shows a secret");
        }
    })
    .await;
    scenario.clean_up(false).await.unwrap();
}

fn uuid_like() -> String {
    format!(
        "{:x}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or(Duration::ZERO)
            .as_nanos()
    )
}

/// Every query of the dashboard is valid PromQL: `promtool check rules` parses each as a recording
/// rule (with the dashboard's `$pipeline` variable set to match all). Needs `promtool` (Debian
/// package prometheus), as CI installs it.
#[test]
fn dashboard_queries_are_valid_promql() {
    let text = std::fs::read_to_string(repo_root().join("ops/grafana/dashboards/conveyor.json"))
        .expect("the dashboard file");
    let dashboard: serde_json::Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().expect("a PromQL expr");
            let expr = expr.replace("$pipeline", ".*");
            let quoted = serde_json::to_string(&expr).expect("a JSON string is a YAML string");
            rules.push_str(&format!(
                "      - record: dashboard:query\n        expr: {quoted}\n"
            ));
        }
    }
    let file = std::env::temp_dir().join(format!("conveyor-dashboard-{}.yml", uuid_like()));
    std::fs::write(&file, rules).unwrap();
    let output = std::process::Command::new("promtool")
        .args(["check", "rules"])
        .arg(&file)
        .output()
        .expect("promtool runs (apt-get install prometheus)");
    std::fs::remove_file(&file).ok();
    succeeded("promtool check rules", output);
}

/// The README's quick start names one command for all the tests; CI runs exactly it, and it needs nothing
/// run before it: it starts the services itself, then runs every test of the workspace.
#[test]
fn ci_runs_exactly_the_readme_test_command() {
    let readme = std::fs::read_to_string(repo_root().join("README.md")).unwrap();
    let quick_start = readme
        .split("## Quick start")
        .nth(1)
        .and_then(|rest| rest.split("```sh\n").nth(1))
        .and_then(|block| block.split("```").next())
        .expect("the quick start has a sh block");
    let test_commands: Vec<&str> = quick_start
        .lines()
        .filter(|line| line.contains("# all the tests"))
        .map(|line| line.split('#').next().unwrap().trim())
        .collect();
    assert_eq!(test_commands, ["ops/test.sh"], "{quick_start}");
    let ci = std::fs::read_to_string(repo_root().join(".ci/run")).unwrap();
    let ci_commands: Vec<&str> = ci
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .collect();
    assert_eq!(
        ci_commands.last(),
        Some(&test_commands[0]),
        ".ci/run must end by running the README's test command"
    );
    assert!(
        !ci.contains("cargo test"),
        ".ci/run runs the tests only through the README's command"
    );
    let script = std::fs::read_to_string(repo_root().join("ops/test.sh")).unwrap();
    let steps: Vec<&str> = script
        .lines()
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .collect();
    assert_eq!(
        steps[steps.len() - 2..],
        [
            "ops/services.sh --remove-test-queues",
            "exec cargo test --workspace --locked \"$@\""
        ],
        "ops/test.sh starts the services, then runs every test"
    );
}

/// `.env.example` lists exactly the variables docker-compose.yml reads, each with the compose file's
/// default.
#[test]
fn env_example_documents_every_compose_variable() {
    let compose = std::fs::read_to_string(repo_root().join("docker-compose.yml")).unwrap();
    let example = std::fs::read_to_string(repo_root().join(".env.example")).unwrap();
    let mut used = std::collections::BTreeMap::new();
    for reference in compose.split("${").skip(1) {
        let inner = reference.split('}').next().unwrap();
        let (name, default) = inner.split_once(":-").unwrap_or((inner, ""));
        let previous = used.insert(name.to_owned(), default.to_owned());
        assert!(
            previous.is_none_or(|p| p == default),
            "{name} has two defaults in docker-compose.yml"
        );
    }
    let documented: std::collections::BTreeMap<String, String> = example
        .lines()
        .filter(|line| !line.starts_with('#') && !line.trim().is_empty())
        .map(|line| {
            let (name, value) = line.split_once('=').expect("NAME=value");
            (name.to_owned(), value.to_owned())
        })
        .collect();
    assert!(used.len() > 10, "{used:?}");
    assert_eq!(documented, used, ".env.example vs docker-compose.yml");
}

/// docker-compose.yml hands every secret over as a Docker secret, never as a variable: each setting
/// that carries one is a `*_FILE` pointing into /run/secrets, each secret it mounts is declared, and
/// ops/secrets.sh makes every declared file (the URLs carrying the passwords beside them), idempotently.
#[test]
fn compose_passes_secrets_as_files_that_ops_secrets_sh_makes() {
    let compose = std::fs::read_to_string(repo_root().join("docker-compose.yml")).unwrap();
    let (body, declared) = compose
        .split_once("\nsecrets:\n")
        .expect("a top-level secrets section");
    let mut files = std::collections::BTreeMap::new();
    let mut name = None;
    for line in declared.lines() {
        if let Some(secret) = line.strip_prefix("  ").and_then(|l| l.strip_suffix(':')) {
            name = Some(secret.trim().to_owned());
        } else if let Some(file) = line.trim().strip_prefix("file: ./ops/secrets/") {
            files.insert(name.take().expect("a secret's name first"), file.to_owned());
        }
    }
    assert!(files.len() >= 5, "{files:?}");
    for line in body.lines().map(str::trim) {
        let Some((key, value)) = line.split_once(": ") else {
            continue;
        };
        // Classified by the setting itself, so that its `_FILE` form is checked as well.
        let setting = key
            .strip_suffix("__FILE")
            .or_else(|| key.strip_suffix("_FILE"))
            .unwrap_or(key);
        let secret_setting = setting.contains("PASS")
            || setting.contains("SECRET")
            || ["CONVEYOR_AMQP_URL", "CONVEYOR_PG_URL"].contains(&setting);
        if secret_setting {
            assert!(
                key.ends_with("_FILE"),
                "a secret passed as a variable: {line}"
            );
            let mounted = value
                .strip_prefix("/run/secrets/")
                .unwrap_or_else(|| panic!("{key} must point into /run/secrets: {line}"));
            assert!(files.contains_key(mounted), "{mounted} is not declared");
        }
    }

    let dir = std::env::temp_dir().join(format!("conveyor-secrets-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("ops")).unwrap();
    let script = dir.join("ops/secrets.sh");
    std::fs::copy(repo_root().join("ops/secrets.sh"), &script).unwrap();
    let run = || {
        let output = std::process::Command::new("sh")
            .arg(&script)
            .output()
            .unwrap();
        succeeded(&script.display().to_string(), output);
    };
    run();
    let read = |file: &str| std::fs::read_to_string(dir.join("ops/secrets").join(file)).unwrap();
    let first: Vec<String> = files.values().map(|file| read(file)).collect();
    assert!(first.iter().all(|value| !value.is_empty()), "{files:?}");
    assert!(
        read("amqp_url.txt").contains(&format!(":{}@rabbitmq:", read("rabbitmq_password.txt")))
    );
    assert!(read("pg_url.txt").contains(&format!(":{}@postgres:", read("postgres_password.txt"))));
    run();
    let second: Vec<String> = files.values().map(|file| read(file)).collect();
    assert_eq!(first, second, "a second run keeps the secrets");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Every environment variable (with its default) that a binary's `--help` shows, walking
/// `conveyorctl`'s subcommands.
fn settings_in_help(
    binary: &str,
    path: &mut Vec<String>,
    found: &mut std::collections::BTreeMap<String, Option<String>>,
) {
    let output = std::process::Command::new(bin_dir().join(binary))
        .args(path.iter())
        .arg("--help")
        .env_clear()
        .output()
        .expect("the binary runs");
    assert!(output.status.success(), "{binary} {path:?} --help failed");
    let help = String::from_utf8(output.stdout).expect("UTF-8 help");
    let mut last_env: Option<String> = None;
    for line in help.lines().map(str::trim) {
        if let Some(env) = line.strip_prefix("[env: ") {
            let name = env.trim_end_matches(']').trim_end_matches('=').to_owned();
            found.entry(name.clone()).or_insert(None);
            last_env = Some(name);
        } else if let Some(default) = line.strip_prefix("[default: ") {
            if let Some(name) = last_env.take() {
                found.insert(name, Some(default.trim_end_matches(']').to_owned()));
            }
        } else if !line.is_empty() {
            last_env = None;
        }
    }
    let Some(commands) = help.split("Commands:\n").nth(1) else {
        return;
    };
    for line in commands.lines() {
        if !line.starts_with("  ") {
            break;
        }
        let command = line.split_whitespace().next().unwrap_or_default();
        if command == "help" || command.is_empty() {
            continue;
        }
        path.push(command.to_owned());
        settings_in_help(binary, path, found);
        path.pop();
    }
}

/// docs/settings.md lists exactly the environment variables the binaries read, and the
/// default of each that has one in the code; every secret also has its `*_FILE`.
#[test]
fn readme_settings_table_matches_every_binary() {
    let mut found = std::collections::BTreeMap::new();
    for binary in [
        "conveyor-fetcher",
        "conveyor-transformer",
        "conveyor-writer",
        "conveyorctl",
        "conveyor-console",
    ] {
        settings_in_help(binary, &mut Vec::new(), &mut found);
    }
    let table = std::fs::read_to_string(repo_root().join("docs/settings.md")).unwrap();
    let mut listed = std::collections::BTreeMap::new();
    for row in table.lines().filter(|l| l.starts_with("| `")) {
        let cells: Vec<&str> = row.split(" | ").collect();
        let name = cells[0].trim_start_matches("| ").split('`').nth(1).unwrap();
        listed.insert(name.to_owned(), cells[1].to_owned());
        assert!(
            !row.contains("(secret)") || cells[0].contains("/ `_FILE`"),
            "the secret {name} can be read from a file too: {row}"
        );
        if cells[0].contains("/ `_FILE`") {
            listed.insert(format!("{name}_FILE"), "—".to_owned());
        }
    }
    assert!(found.len() > 20, "{found:?}");
    assert_eq!(
        listed.keys().collect::<Vec<_>>(),
        found.keys().collect::<Vec<_>>(),
        "docs/settings.md vs the binaries' --help"
    );
    for (name, default) in &found {
        if let Some(default) = default {
            assert!(
                listed[name].contains(&format!("`{default}`")),
                "docs/settings.md gives {name} the default {}, the code {default}",
                listed[name]
            );
        }
    }
}

/// The services docker-compose.yml defines.
fn compose_services() -> BTreeSet<String> {
    compose_services_of("docker-compose.yml")
}

/// The services a compose file of the repository defines.
fn compose_services_of(file: &str) -> BTreeSet<String> {
    let compose = std::fs::read_to_string(repo_root().join(file)).unwrap();
    let services = compose
        .split("\nservices:\n")
        .nth(1)
        .expect("a services section");
    services
        .lines()
        .take_while(|line| line.is_empty() || line.starts_with(' ') || line.starts_with('#'))
        .filter_map(|line| line.strip_prefix("  ")?.strip_suffix(':'))
        .filter(|name| !name.starts_with(' '))
        .map(str::to_owned)
        .collect()
}

/// The commands of ops/RUNBOOK.md's `sh` blocks, in order.
fn runbook_commands() -> Vec<String> {
    let runbook = std::fs::read_to_string(repo_root().join("ops/RUNBOOK.md")).unwrap();
    let mut commands = Vec::new();
    for block in runbook.split("```sh\n").skip(1) {
        let block = block.split("```").next().unwrap();
        commands.extend(
            block
                .lines()
                .filter(|line| !line.trim().is_empty())
                .map(str::to_owned),
        );
    }
    commands
}

/// Runs every `conveyorctl` command of the runbook, in its order, against a pipeline with dead
/// letters; checks that every `docker compose` command names only services of docker-compose.yml,
/// and that the runbook has no other kind of command.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runbook_commands_work() {
    let services = compose_services();
    assert!(services.contains("conveyor-writer"), "{services:?}");
    let commands = runbook_commands();
    assert!(commands.len() > 15, "{commands:?}");
    let mut conveyorctl = Vec::new();
    for command in &commands {
        let mut words: Vec<&str> = command.split_whitespace().collect();
        assert_eq!(
            words[..2],
            ["docker", "compose"],
            "the runbook runs only docker compose: {command}"
        );
        // `-f` files layered over the compose file (the cluster): their services too.
        let mut services = services.clone();
        while words[2] == "-f" {
            services.extend(compose_services_of(words[3]));
            words.drain(2..4);
        }
        if words[2] == "exec" {
            assert!(services.contains(words[3]), "no service {}", words[3]);
            if words[3].starts_with("rabbitmq") && words[4] == "rabbitmqctl" {
                // The broker's own tool, in its container: not conveyor's to run here.
                continue;
            }
            assert_eq!(words[4], "conveyorctl", "{command}");
            conveyorctl.push(words[5..].iter().map(|w| w.to_string()).collect::<Vec<_>>());
            continue;
        }
        let subcommand = words[2];
        assert!(
            ["up", "ps", "logs", "restart"].contains(&subcommand),
            "unexpected compose command: {command}"
        );
        for word in &words[3..] {
            let word = word.split('=').next().unwrap();
            if word.starts_with('-') || word.parse::<u32>().is_ok() {
                continue;
            }
            assert!(services.contains(word), "no service {word}: {command}");
        }
    }
    assert!(conveyorctl.len() > 8, "{conveyorctl:?}");

    let scenario = scenario(
        "runbook",
        SimConfig {
            poison_every: 50,
            ..orders(300)
        },
    )
    .await;
    let poisoned = scenario.simulator.poisoned_orders().len();
    assert!(poisoned > 0);
    within(TIMEOUT, async {
        step("running a pipeline with poison records");
        let mut workers = vec![
            spawn_ready(&scenario, Worker::Transformer).await,
            spawn_ready(&scenario, Worker::Writer).await,
            scenario.spawn(Worker::Fetcher, &[]).unwrap(),
        ];
        assert_target_equals_truth(&scenario, &workers).await;
        wait_ready(&workers[2], true, TIMEOUT).await;
        while scenario
            .peek_dead_letters(conveyor_base::Stage::Transform)
            .await
            .unwrap()
            .len()
            < poisoned
        {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        wait_for_empty_work_queues(&scenario).await;

        // The containers' addresses, as the runbook names them, to the test's workers.
        let addresses = [
            ("conveyor-fetcher:9101", workers[2].http_addr),
            ("127.0.0.1:9101", workers[2].http_addr),
            ("conveyor-transformer:9102", workers[0].http_addr),
            ("127.0.0.1:9102", workers[0].http_addr),
            ("conveyor-writer:9103", workers[1].http_addr),
            ("127.0.0.1:9103", workers[1].http_addr),
        ];
        let dir = std::env::temp_dir().join(format!("conveyor-runbook-{}", uuid_like()));
        std::fs::create_dir_all(&dir).unwrap();
        for args in &conveyorctl {
            let args: Vec<String> = args
                .iter()
                .map(|arg| {
                    addresses
                        .iter()
                        .fold(arg.clone(), |arg, (from, to)| {
                            arg.replace(from, &to.to_string())
                        })
                        // The container's /tmp is the test's own directory.
                        .replace("/tmp/", &format!("{}/", dir.display()))
                })
                .collect();
            step(&format!("conveyorctl {}", args.join(" ")));
            let output = std::process::Command::new(bin_dir().join("conveyorctl"))
                .args(&args)
                .envs(scenario.environment())
                .current_dir(&dir)
                .stdin(std::process::Stdio::null())
                .output()
                .expect("conveyorctl runs");
            assert!(
                output.status.success(),
                "conveyorctl {args:?} failed: {}{}",
                String::from_utf8_lossy(&output.stderr),
                String::from_utf8_lossy(&output.stdout)
            );
            eprintln!("{}", String::from_utf8_lossy(&output.stdout));
        }
        let exported = std::fs::read_to_string(dir.join("dead-letters.jsonl")).unwrap();
        assert_eq!(
            exported.lines().count(),
            poisoned,
            "the export has every letter"
        );
        std::fs::remove_dir_all(&dir).ok();
        stop_all(&mut workers).await;
    })
    .await;
    scenario.clean_up(false).await.unwrap();
}

/// With several broker addresses (the nodes of a cluster), a worker and `conveyorctl` connect to the
/// next when one does not answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_list_of_brokers_fails_over_to_the_next() {
    let scenario = scenario("brokers", orders(50)).await;
    // A port nothing listens on: bound, then released.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let brokers = format!(
        "amqp://guest:guest@{dead}/%2f,{}",
        scenario.services.amqp_url.expose()
    );
    within(TIMEOUT, async {
        let mut workers = vec![
            scenario
                .spawn_with_env(
                    Worker::Transformer,
                    &[],
                    &[("CONVEYOR_AMQP_URL", brokers.as_str())],
                )
                .unwrap(),
        ];
        wait_ready(&workers[0], true, TIMEOUT).await;
        let output = std::process::Command::new(bin_dir().join("conveyorctl"))
            .args(["dlq", "list", "sales_orders"])
            .envs(scenario.environment())
            .env("CONVEYOR_AMQP_URL", &brokers)
            .stdin(std::process::Stdio::null())
            .output()
            .expect("conveyorctl runs");
        succeeded("conveyorctl dlq list over a list of brokers", output);
        let only_dead = std::process::Command::new(bin_dir().join("conveyorctl"))
            .args(["dlq", "list", "sales_orders"])
            .envs(scenario.environment())
            .env(
                "CONVEYOR_AMQP_URL",
                format!("amqp://guest:guest@{dead}/%2f"),
            )
            .stdin(std::process::Stdio::null())
            .output()
            .expect("conveyorctl runs");
        assert!(!only_dead.status.success(), "no broker answers there");
        stop_all(&mut workers).await;
    })
    .await;
    scenario.clean_up(false).await.unwrap();
}

/// `conveyorctl dlq` names what is wrong with what it was given, once, and what it expects: a
/// pipeline the broker has no queues of (a wrong name or namespace), an inverted time range, a time
/// that is not RFC 3339, and a limit of 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dlq_refuses_wrong_names_and_selections_with_what_it_expects() {
    let scenario = scenario("dlq_args", orders(10)).await;
    let refused = |args: &[&str], expected: &str| {
        let output = ctl(&scenario, args);
        let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
        assert!(!output.status.success(), "{args:?} succeeded: {stderr}");
        assert_eq!(
            stderr.matches(expected).count(),
            1,
            "{args:?} should say {expected:?} once: {stderr}"
        );
        assert!(!stderr.contains("NOT_FOUND"), "{args:?}: {stderr}");
    };
    let unknown = format!(
        "no pipeline sales_orders in namespace {} (CONVEYOR_NAMESPACE)",
        scenario.namespace
    );
    refused(&["dlq", "list", "sales_orders"], &unknown);
    refused(&["dlq", "show", "sales_orders"], &unknown);
    scenario.declare_topology().await.unwrap();
    refused(
        &["dlq", "show", "sales_orders", "--limit", "0"],
        "0 would select nothing",
    );
    refused(
        &[
            "dlq",
            "show",
            "sales_orders",
            "--since",
            "2026-02-01T00:00:00Z",
            "--until",
            "2026-01-01T00:00:00Z",
        ],
        "is not before --until",
    );
    refused(
        &["dlq", "show", "sales_orders", "--since", "yesterday"],
        "expected an RFC 3339 time",
    );
    ctl_ok(&scenario, &["dlq", "show", "sales_orders", "--limit", "1"]);
    scenario.clean_up(false).await.unwrap();
}

/// The image's build context leaves out every file that may hold a secret: the Docker secrets
/// ops/secrets.sh makes, and the compose file's `.env`.
#[test]
fn the_image_build_context_leaves_secrets_out() {
    let ignored = std::fs::read_to_string(repo_root().join(".dockerignore")).unwrap();
    let lines: BTreeSet<&str> = ignored.lines().map(str::trim).collect();
    for secret in ["ops/secrets", ".env", ".env.*"] {
        assert!(lines.contains(secret), ".dockerignore lacks {secret}");
    }
}

/// `conveyorctl dlq …` and `status --help` list the command's own options first, then the
/// connections it needs under their headings, and no worker's tuning (prefetch, compression, drain).
#[test]
fn operator_commands_help_shows_their_own_options_first_and_no_worker_tuning() {
    for path in [
        &["dlq", "list"][..],
        &["dlq", "show"],
        &["dlq", "replay"],
        &["dlq", "purge"],
        &["status"],
    ] {
        let output = std::process::Command::new(bin_dir().join("conveyorctl"))
            .args(path)
            .arg("--help")
            .env_clear()
            .output()
            .expect("conveyorctl runs");
        let help = String::from_utf8(output.stdout).unwrap();
        for tuning in [
            "--prefetch",
            "--compress-from-bytes",
            "--drain-timeout-secs",
            "--max-attempts",
        ] {
            assert!(
                !help.contains(tuning),
                "{path:?} --help lists {tuning}:\n{help}"
            );
        }
        let options = help.find("Options:").expect("an Options section");
        let broker = help.find("Broker (RabbitMQ):").expect("a broker section");
        assert!(
            options < broker,
            "{path:?}: its own options come first:\n{help}"
        );
        let own = &help[options..broker];
        assert!(
            own.lines()
                .filter(|line| line.trim_start().starts_with("--"))
                .count()
                >= 1
                && !own.contains("--amqp"),
            "{path:?}:\n{own}"
        );
    }
}
