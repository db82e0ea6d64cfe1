//! Everything an operator looks at first, in one reading: per pipeline, the books ([`status`]), each
//! stage's rate, the sync watermark and its lag, the dead letters by class; the source's call
//! budgets; and the workers seen, with their readiness. The console's overview page shows this.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use conveyor_amqp::settings::BrokerArgs;
use conveyor_fetcher::state::SyncStore;
use conveyor_ledger::read;
use conveyor_pipeline::Pipeline;
use conveyor_postgres::Database;
use serde::Serialize;

use crate::status::{self, PipelineStatus, parse_metrics};

/// Seconds of settlements a stage's rate is averaged over.
pub const RATE_SECONDS: u32 = 60;

/// One pipeline at a glance.
#[derive(Debug, Clone, Serialize)]
pub struct PipelineOverview {
    pub status: PipelineStatus,
    /// Records settled per second, per stage, over the last [`RATE_SECONDS`].
    pub rates: BTreeMap<String, f64>,
    /// Below it, every modified record is confirmed fetched.
    pub watermark: Option<DateTime<Utc>>,
    /// Seconds the watermark is behind now.
    pub lag_secs: Option<i64>,
    /// Windows handed out and not finished.
    pub pending_windows: usize,
    /// The calls per minute the pipeline's source allows.
    pub calls_per_minute: u32,
}

/// A call budget shared by the fetchers of an account set.
#[derive(Debug, Clone, Serialize)]
pub struct Budget {
    /// The budget's key: the tenant's authorization and the account set it counts for (no secret).
    pub key: String,
    /// Calls per minute allowed now after throttling, if the source throttled (else the limit).
    pub rate_now: Option<f64>,
    /// When the source last refused a call for its rate limit.
    pub throttled_at: Option<DateTime<Utc>>,
    /// Seconds of call slots reserved ahead of now: the budget in use.
    pub reserved_ahead_secs: f64,
}

/// A worker process seen at a metrics address.
#[derive(Debug, Clone, Serialize)]
pub struct Worker {
    pub url: String,
    /// Ready per pipeline and stage (`conveyor_ready`), when it answered.
    pub ready: BTreeMap<String, bool>,
    pub error: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Overview {
    pub read_at: DateTime<Utc>,
    pub pipelines: Vec<PipelineOverview>,
    pub budgets: Vec<Budget>,
    pub workers: Vec<Worker>,
}

/// Reads the overview of `pipelines`; `workers` are metrics URLs whose host names are resolved to
/// every address they have (a compose service scaled to many copies is seen copy by copy).
pub async fn overview(
    broker: &BrokerArgs,
    database: &Database,
    pipelines: &[Pipeline],
    workers: &[String],
) -> anyhow::Result<Overview> {
    let workers = seen(workers).await;
    // The messages in the hands of the workers that answered (one that did not is shown as such).
    let request = status::Request {
        pipelines: pipelines.iter().map(|p| p.name().to_owned()).collect(),
        span: read::Span::default(),
        settle_wait: Duration::from_secs(1),
        workers: workers
            .iter()
            .filter(|worker| worker.error.is_none())
            .map(|worker| worker.url.clone())
            .collect(),
    };
    let statuses = status::status(broker, database, &request).await?;
    let now = Utc::now();
    let mut overviews = Vec::new();
    for (pipeline, status) in pipelines.iter().zip(statuses) {
        let sync = SyncStore::open(database.clone(), pipeline.name()).await?;
        let watermark = sync.watermark().await?;
        overviews.push(PipelineOverview {
            rates: read::rates(database, pipeline.name(), RATE_SECONDS).await?,
            lag_secs: watermark.map(|at| (now - at).num_seconds()),
            watermark,
            pending_windows: sync.pending().await?.len(),
            calls_per_minute: pipeline.spec.source.calls_per_minute,
            status,
        });
    }
    Ok(Overview {
        read_at: now,
        pipelines: overviews,
        budgets: budgets(database).await?,
        workers,
    })
}

async fn budgets(database: &Database) -> anyhow::Result<Vec<Budget>> {
    let client = database.client().await?;
    let rows = client
        .query(
            "SELECT budget, rate_cut, throttled_at, \
             greatest(extract(epoch FROM (next_slot - clock_timestamp())), 0)::float8 \
             FROM conveyor_rate_budget ORDER BY budget",
            &[],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|row| Budget {
            key: row.get(0),
            rate_now: row.get(1),
            throttled_at: row.get(2),
            reserved_ahead_secs: row.get(3),
        })
        .collect())
}

/// Scrapes each worker address for its readiness.
async fn seen(workers: &[String]) -> Vec<Worker> {
    let http = match conveyor_base::tls::http_client(None)
        .timeout(Duration::from_secs(2))
        .build()
    {
        Ok(http) => http,
        Err(err) => {
            return vec![Worker {
                url: String::new(),
                ready: BTreeMap::new(),
                error: Some(err.to_string()),
            }];
        }
    };
    let mut urls = Vec::new();
    for worker in workers {
        urls.extend(expand(worker).await);
    }
    let mut seen = Vec::new();
    for url in urls {
        let answer = async {
            let text = http
                .get(&url)
                .send()
                .await?
                .error_for_status()?
                .text()
                .await?;
            anyhow::Ok(text)
        }
        .await;
        seen.push(match answer {
            Ok(text) => Worker {
                ready: parse_metrics(&text)
                    .into_iter()
                    .filter(|sample| sample.name == "conveyor_ready")
                    .map(|sample| {
                        let label =
                            |name: &str| sample.labels.get(name).cloned().unwrap_or_default();
                        (
                            format!("{} {}", label("pipeline"), label("stage")),
                            sample.value > 0.0,
                        )
                    })
                    .collect(),
                url,
                error: None,
            },
            Err(err) => Worker {
                url,
                ready: BTreeMap::new(),
                error: Some(format!("{err:#}")),
            },
        });
    }
    seen
}

/// A worker's metrics URL, once per address its host resolves to.
async fn expand(worker: &str) -> Vec<String> {
    let url = if worker.ends_with("/metrics") {
        worker.to_owned()
    } else {
        format!("{}/metrics", worker.trim_end_matches('/'))
    };
    let Ok(parsed) = reqwest::Url::parse(&url) else {
        return vec![url];
    };
    let (Some(host), Some(port)) = (parsed.host_str(), parsed.port_or_known_default()) else {
        return vec![url];
    };
    let Ok(addresses) = tokio::net::lookup_host((host, port)).await else {
        return vec![url];
    };
    let mut urls: Vec<String> = addresses
        .map(|address| {
            let mut each = parsed.clone();
            let _ = each.set_ip_host(address.ip());
            each.to_string()
        })
        .collect();
    urls.sort();
    urls.dedup();
    if urls.len() <= 1 {
        return vec![url];
    }
    urls
}
