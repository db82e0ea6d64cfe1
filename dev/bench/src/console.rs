//! `conveyor-dev bench console`: how fast the console's pages are with many dead letters, and how
//! much memory it takes.
//!
//! A simulator whose every order is poisoned feeds a transformer and a writer, so every record becomes
//! a dead letter of its own at the transform stage, indexed by the transformer as in production. Then
//! the `conveyor-console` binary is started, an operator logs in, and each page is fetched `--rounds`
//! times: the letters grouped, their list's first page, a page deep down the list (keyset paging), one
//! letter, the overview. The report gives each page's time (median, 95th percentile, most, as the
//! client waits for the whole page), the console's peak resident memory (`VmHWM`), and how long one
//! job takes to replay every letter (the console holds them all while it moves them).

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use conveyor_harness::{Scenario, Services, Worker};
use kingdee_sim::SimConfig;
use serde::Serialize;

use crate::proc::{cpu_seconds, peak_rss_mib};

#[derive(Debug, clap::Args)]
pub struct ConsoleArgs {
    /// Dead letters to browse (one per order, every order poisoned).
    #[arg(long, default_value_t = 10_000)]
    letters: usize,
    /// Times each page is fetched.
    #[arg(long, default_value_t = 20)]
    rounds: usize,
}

/// The times of one page, milliseconds.
#[derive(Debug, Serialize)]
pub struct PageTimes {
    pub page: &'static str,
    pub bytes: usize,
    pub median_ms: f64,
    pub p95_ms: f64,
    pub max_ms: f64,
}

#[derive(Debug, Serialize)]
pub struct ConsoleReport {
    pub letters: usize,
    pub rounds: usize,
    /// Seconds from the first fetch until every letter was indexed.
    pub seconds_to_index: f64,
    pub pages: Vec<PageTimes>,
    /// The console's peak resident memory over the whole run, MiB.
    pub console_peak_rss_mib: f64,
    /// CPU the console spent serving every page of every round, seconds.
    pub console_cpu_secs: f64,
    /// One job replaying every letter: from its start until every letter was confirmed elsewhere and
    /// removed from its queue.
    pub replay_job_secs: f64,
    pub replayed_per_sec: f64,
}

pub async fn run(args: &ConsoleArgs, bin_dir: &Path) -> anyhow::Result<ConsoleReport> {
    let services = Services::check().await?;
    let days = (args.letters as i64 * 60 / 86_400) + 5;
    let sim = SimConfig {
        orders: args.letters,
        poison_every: 1,
        epoch: kingdee_sim::data::days_ago(days),
        ..SimConfig::default()
    };
    let pipeline = Path::new("ops/pipelines/sales_orders.toml");
    let scenario = Scenario::start(services, pipeline, bin_dir, "bench_console", sim, &[]).await?;
    let result = measure(&scenario, args, bin_dir).await;
    scenario.clean_up(result.is_err()).await?;
    result
}

async fn measure(
    scenario: &Scenario,
    args: &ConsoleArgs,
    bin_dir: &Path,
) -> anyhow::Result<ConsoleReport> {
    let mut workers = vec![
        scenario.spawn(Worker::Transformer, &[])?,
        scenario.spawn(Worker::Writer, &[])?,
    ];
    for worker in &workers {
        worker.wait_ready(true, Duration::from_secs(120)).await?;
    }
    let started = Instant::now();
    workers.push(scenario.spawn(Worker::Fetcher, &["--once"])?);
    let database = conveyor_postgres::Database::connect(&conveyor_postgres::PostgresArgs {
        pg_pool_size: 2,
        ..conveyor_postgres::PostgresArgs::at(
            scenario.services.pg_url.clone(),
            scenario.schema.clone(),
        )
    })?;
    let query = conveyor_ledger::letters::LetterQuery::dead("sales_orders");
    loop {
        let indexed = conveyor_ledger::letters::count(&database, &query)
            .await
            .unwrap_or(0);
        if indexed as usize >= args.letters {
            break;
        }
        if started.elapsed() > Duration::from_secs(600) {
            bail!(
                "only {indexed} of {} letters were indexed in 10 minutes",
                args.letters
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let seconds_to_index = started.elapsed().as_secs_f64();
    let letter = conveyor_ledger::letters::page(&database, &query, None, 1)
        .await?
        .pop()
        .context("no letter indexed")?;
    let deep = conveyor_ledger::letters::page(&database, &query, None, 5_000)
        .await?
        .pop()
        .context("no letter indexed")?;

    let port = conveyor_harness::free_port()?;
    let users = std::env::temp_dir().join(format!("conveyor-bench-console-{}", std::process::id()));
    let password = "bench password 1234";
    std::fs::write(&users, format!("bench:operator:{password}\n"))?;
    let mut console = tokio::process::Command::new(bin_dir.join("conveyor-console"))
        .envs(scenario.environment())
        .env("CONVEYOR_CONSOLE_ADDR", format!("127.0.0.1:{port}"))
        .env("CONVEYOR_CONSOLE_USERS_FILE", &users)
        .env(
            "CONVEYOR_LOG",
            std::env::var("CONVEYOR_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("starting conveyor-console")?;
    let pid = console.id().context("the console has no pid")? as i32;
    let base = format!("http://127.0.0.1:{port}");
    let http = conveyor_base::tls::http_client(None)
        .timeout(Duration::from_secs(30))
        .redirect(reqwest::redirect::Policy::none())
        .build()?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while http.get(format!("{base}/healthz")).send().await.is_err() {
        if Instant::now() > deadline {
            bail!("the console did not answer within 30 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let login = http
        .post(format!("{base}/login"))
        .header("Origin", &base)
        .form(&[("user", "bench"), ("password", password)])
        .send()
        .await?;
    let cookie = login
        .headers()
        .get("set-cookie")
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.split(';').next())
        .context("the login set no cookie")?
        .to_owned();
    let deep_page = format!(
        "/letters/list?pipeline=sales_orders&after_at={}&after_id={}",
        deep.failed_at.to_rfc3339().replace('+', "%2B"),
        deep.message_id
    );
    let pages: [(&'static str, String); 5] = [
        (
            "letters grouped",
            "/letters?pipeline=sales_orders".to_owned(),
        ),
        (
            "letter list, first page",
            "/letters/list?pipeline=sales_orders".to_owned(),
        ),
        ("letter list, page 51", deep_page),
        (
            "one letter",
            format!(
                "/letters/sales_orders/{}/{}",
                letter.stage, letter.message_id
            ),
        ),
        ("overview", "/".to_owned()),
    ];
    let cpu_before = cpu_seconds(pid).unwrap_or(0.0);
    let mut timed = Vec::new();
    for (name, path) in &pages {
        let mut times = Vec::new();
        let mut bytes = 0;
        for _ in 0..args.rounds {
            let asked = Instant::now();
            let answer = http
                .get(format!("{base}{path}"))
                .header("Cookie", &cookie)
                .send()
                .await?;
            let status = answer.status();
            let body = answer.text().await?;
            times.push(asked.elapsed().as_secs_f64() * 1000.0);
            if !status.is_success() {
                bail!("{name} ({path}) answered {status}: {body}");
            }
            bytes = body.len();
        }
        times.sort_by(f64::total_cmp);
        let at = |share: f64| times[((times.len() as f64 - 1.0) * share).round() as usize];
        timed.push(PageTimes {
            page: name,
            bytes,
            median_ms: round(at(0.5)),
            p95_ms: round(at(0.95)),
            max_ms: round(at(1.0)),
        });
    }
    let console_cpu_secs = cpu_seconds(pid).unwrap_or(0.0) - cpu_before;

    // One job replays every letter (they die again: the source's data is still bad).
    let page = http
        .get(format!("{base}/"))
        .header("Cookie", &cookie)
        .send()
        .await?
        .text()
        .await?;
    let csrf = page
        .split("name=\"csrf\" value=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .context("no CSRF token on the overview")?
        .to_owned();
    let phrase = format!("replay {}", args.letters);
    let replay_started = Instant::now();
    let started = http
        .post(format!("{base}/actions/run"))
        .header("Cookie", &cookie)
        .header("Origin", &base)
        .form(&[
            ("action", "replay"),
            ("pipeline", "sales_orders"),
            ("confirm", phrase.as_str()),
            ("csrf", csrf.as_str()),
        ])
        .send()
        .await?;
    let job = started
        .headers()
        .get("location")
        .and_then(|value| value.to_str().ok())
        .with_context(|| format!("the replay did not start: {}", started.status()))?
        .to_owned();
    let job_page = loop {
        let page = http
            .get(format!("{base}{job}/live"))
            .header("Cookie", &cookie)
            .send()
            .await?
            .text()
            .await?;
        if page.contains("data-state=\"done\"") {
            break page;
        }
        if replay_started.elapsed() > Duration::from_secs(600) {
            bail!("the replay job did not finish in 10 minutes: {page}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let replay_job_secs = replay_started.elapsed().as_secs_f64();
    let moved = format!("{0} of {0}", args.letters);
    if !job_page.contains(&moved) {
        bail!("the replay job did not move every letter: {job_page}");
    }
    let console_peak_rss_mib = peak_rss_mib(pid).unwrap_or(0.0);
    let _ = console.kill().await;
    let _ = std::fs::remove_file(&users);
    conveyor_harness::stop_all(&mut workers).await?;
    Ok(ConsoleReport {
        letters: args.letters,
        rounds: args.rounds,
        seconds_to_index,
        pages: timed,
        console_peak_rss_mib: round(console_peak_rss_mib),
        console_cpu_secs: round(console_cpu_secs),
        replay_job_secs: round(replay_job_secs),
        replayed_per_sec: round(args.letters as f64 / replay_job_secs),
    })
}

fn round(value: f64) -> f64 {
    (value * 10.0).round() / 10.0
}
