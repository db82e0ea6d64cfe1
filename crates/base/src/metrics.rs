//! Every metric conveyor exports, named in one place.
//!
//! Names follow `conveyor_<what>_<unit>[_total]`; labels are bounded: `pipeline` and `stage` come from
//! configuration, `class` and `outcome` from fixed sets. No label ever carries a record id or a message.

use crate::Stage;
use prometheus::{
    CounterVec, Encoder, GaugeVec, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

/// The metrics of one worker process.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    /// Records taken in by a stage (fetched from the source, or received from a queue: every delivery,
    /// a retry's or a redelivery's too). A throughput figure; the accounting uses `records_settled`.
    pub records_in: IntCounterVec,
    /// Records a stage passed on (published to the next queue, or written to the target), in the
    /// stage's output units: a transformer that flattens orders into lines counts lines.
    pub records_out: IntCounterVec,
    /// Records of a stage's input sent to a dead-letter queue, by class: those of a whole message
    /// given up on, or refused one by one. A message that cannot be read (`malformed`) counts in
    /// `messages_dead_lettered` only: it never entered the pipeline through conveyor.
    pub records_dead_lettered: IntCounterVec,
    /// Messages a stage sent to its dead-letter queue, by class: whole messages (malformed ones
    /// included) and single refused records alike. The fetch stage's given-up windows count here.
    pub messages_dead_lettered: IntCounterVec,
    /// Records sent to a retry queue to be tried again after a delay (counted once per retry).
    pub records_retried: IntCounterVec,
    /// Records of messages that came back from a dead-letter queue by `conveyorctl dlq replay`,
    /// counted when the stage settles them: they entered the stage again, so the accounting adds
    /// them to what entered it.
    pub records_replayed: IntCounterVec,
    /// Records a stage dropped on purpose (a rule filtered them out): accounted for, not lost. In the
    /// transformer's output units (an order without lines counts 1).
    pub records_filtered: IntCounterVec,
    /// Records of a stage's input whose message the stage finished with for good: acked after their
    /// output was published or written (some perhaps filtered) or after they were dead-lettered; not
    /// when handed to a retry queue or back to the work queue. Counted in the units of the stage's own
    /// queue, so that what entered a stage (what the stage before published into its queue, plus
    /// replays) less what it settled is exactly what is still in its queues or its workers' hands.
    /// Only stages whose messages carry records (transform, write) count it.
    pub records_settled: IntCounterVec,
    /// Time to handle one message (or, for the fetcher, one source page), end to end.
    pub message_duration: HistogramVec,
    /// Time from a message's publishing (its AMQP timestamp, whole seconds) to a worker taking it:
    /// the stage's lag, since the queues are first in, first out. A retried message counts its
    /// retry delay too.
    pub message_queued: HistogramVec,
    /// Rows the target applied, or skipped because it already held the same or a newer version.
    pub target_rows: IntCounterVec,
    /// Time of one write to the target.
    pub target_write_duration: HistogramVec,
    /// Calls to the source, by outcome (ok, retried, failed).
    pub source_requests: IntCounterVec,
    /// App-token fetches and re-authorizations at the source.
    pub source_token_refreshes: IntCounterVec,
    /// Calls the source refused for its rate limit or overload (429, gateway 5007).
    pub source_throttled: IntCounterVec,
    /// Seconds spent waiting for the shared call budget before calling the source.
    pub source_rate_wait_seconds: CounterVec,
    /// Calls per minute the shared budget allows now: the configured budget, or less after the
    /// source throttled calls, climbing back slowly.
    pub source_call_rate: GaugeVec,
    /// Modify-time windows a fetcher finished, split, or had to page again because rows moved.
    pub sync_windows: IntCounterVec,
    /// The sync watermark (epoch seconds): everything modified before it is safely in the broker.
    pub sync_watermark: IntGaugeVec,
    /// 1 while the worker is ready (connected to the broker and, for a writer, its target).
    pub ready: IntGaugeVec,
    /// Deliveries a worker holds and has not acked yet (in flight in its hands).
    pub messages_in_hand: IntGaugeVec,
    /// Messages ready in the stage's queues, by `queue` = `work`, `retry` or `dead_letter` (refreshed
    /// every few seconds by the stage's workers).
    pub queue_messages: IntGaugeVec,
}

const PIPELINE_STAGE: &[&str] = &["pipeline", "stage"];

/// Every metric name conveyor exports: the metrics list of docs/operations.md, the dashboard and the alerts are
/// checked against it by tests.
pub const DOCUMENTED: &[&str] = &[
    "conveyor_records_in_total",
    "conveyor_records_out_total",
    "conveyor_records_dead_lettered_total",
    "conveyor_records_retried_total",
    "conveyor_records_filtered_total",
    "conveyor_records_replayed_total",
    "conveyor_records_settled_total",
    "conveyor_messages_dead_lettered_total",
    "conveyor_messages_in_hand",
    "conveyor_queue_messages",
    "conveyor_message_duration_seconds",
    "conveyor_message_queued_seconds",
    "conveyor_target_rows_total",
    "conveyor_target_write_duration_seconds",
    "conveyor_source_requests_total",
    "conveyor_source_token_refreshes_total",
    "conveyor_source_throttled_total",
    "conveyor_source_rate_wait_seconds_total",
    "conveyor_source_call_rate_per_minute",
    "conveyor_sync_windows_total",
    "conveyor_sync_watermark_seconds",
    "conveyor_ready",
];

/// Every label name a metric may carry (besides `le` of histogram buckets). Their values come from
/// configuration (`pipeline`) or from the fixed sets below, never from data.
pub const LABELS: &[&str] = &["pipeline", "stage", "class", "outcome", "queue"];

/// Classes of dead-lettered records; messages also count `malformed`.
const ERROR_CLASSES: &[&str] = &["permanent", "transient"];
const MESSAGE_ERROR_CLASSES: &[&str] = &["malformed", "permanent", "transient"];
const QUEUE_KINDS: &[&str] = &["work", "retry", "dead_letter"];
const SOURCE_OUTCOMES: &[&str] = &["ok", "retried", "failed"];
const WINDOW_OUTCOMES: &[&str] = &["done", "split", "restarted", "verifying"];
const ROW_OUTCOMES: &[&str] = &["applied", "stale"];

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let register = |metric: Box<dyn prometheus::core::Collector>| {
            registry
                .register(metric)
                .expect("each metric is registered once");
        };
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let metric = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
            register(Box::new(metric.clone()));
            metric
        };
        let float_counter = |name: &str, help: &str, labels: &[&str]| {
            let metric = CounterVec::new(Opts::new(name, help), labels).expect("valid metric");
            register(Box::new(metric.clone()));
            metric
        };
        let histogram = |name: &str, help: &str, labels: &[&str]| {
            let buckets = prometheus::exponential_buckets(0.0005, 2.5, 14).expect("valid buckets");
            let metric = HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), labels)
                .expect("valid metric");
            register(Box::new(metric.clone()));
            metric
        };
        let gauge = |name: &str, help: &str, labels: &[&str]| {
            let metric = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
            register(Box::new(metric.clone()));
            metric
        };
        let float_gauge = |name: &str, help: &str, labels: &[&str]| {
            let metric = GaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
            register(Box::new(metric.clone()));
            metric
        };
        let ready = gauge(
            "conveyor_ready",
            "1 while the worker is ready to work",
            PIPELINE_STAGE,
        );
        Self {
            records_in: counter(
                "conveyor_records_in_total",
                "Records taken in by a stage",
                PIPELINE_STAGE,
            ),
            records_out: counter(
                "conveyor_records_out_total",
                "Records a stage passed on or wrote",
                PIPELINE_STAGE,
            ),
            records_dead_lettered: counter(
                "conveyor_records_dead_lettered_total",
                "Records sent to a dead-letter queue",
                &["pipeline", "stage", "class"],
            ),
            messages_dead_lettered: counter(
                "conveyor_messages_dead_lettered_total",
                "Messages sent to a dead-letter queue",
                &["pipeline", "stage", "class"],
            ),
            records_retried: counter(
                "conveyor_records_retried_total",
                "Records sent to a retry queue to be tried again",
                PIPELINE_STAGE,
            ),
            records_replayed: counter(
                "conveyor_records_replayed_total",
                "Records replayed from a dead-letter queue",
                PIPELINE_STAGE,
            ),
            records_filtered: counter(
                "conveyor_records_filtered_total",
                "Records dropped on purpose by a rule",
                PIPELINE_STAGE,
            ),
            records_settled: counter(
                "conveyor_records_settled_total",
                "Records of a stage's input it finished with for good",
                PIPELINE_STAGE,
            ),
            message_duration: histogram(
                "conveyor_message_duration_seconds",
                "Time to handle one message or source page",
                PIPELINE_STAGE,
            ),
            message_queued: {
                let buckets = vec![
                    1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 14400.0,
                ];
                let metric = HistogramVec::new(
                    HistogramOpts::new(
                        "conveyor_message_queued_seconds",
                        "Time from a message's publishing to a worker taking it",
                    )
                    .buckets(buckets),
                    PIPELINE_STAGE,
                )
                .expect("valid metric");
                register(Box::new(metric.clone()));
                metric
            },
            target_rows: counter(
                "conveyor_target_rows_total",
                "Rows the target applied or skipped as stale",
                &["pipeline", "outcome"],
            ),
            target_write_duration: histogram(
                "conveyor_target_write_duration_seconds",
                "Time of one write to the target",
                &["pipeline"],
            ),
            source_requests: counter(
                "conveyor_source_requests_total",
                "Calls to the source API",
                &["pipeline", "outcome"],
            ),
            source_token_refreshes: counter(
                "conveyor_source_token_refreshes_total",
                "App-token fetches and re-authorizations at the source",
                &["pipeline"],
            ),
            source_throttled: counter(
                "conveyor_source_throttled_total",
                "Source calls refused for rate limit or overload",
                &["pipeline"],
            ),
            source_rate_wait_seconds: float_counter(
                "conveyor_source_rate_wait_seconds_total",
                "Seconds spent waiting for the shared call budget",
                &["pipeline"],
            ),
            source_call_rate: float_gauge(
                "conveyor_source_call_rate_per_minute",
                "Calls per minute the shared budget allows now, after throttling",
                &["pipeline"],
            ),
            sync_windows: counter(
                "conveyor_sync_windows_total",
                "Modify-time windows finished, split or paged again",
                &["pipeline", "outcome"],
            ),
            sync_watermark: gauge(
                "conveyor_sync_watermark_seconds",
                "The sync watermark as epoch seconds",
                &["pipeline"],
            ),
            ready,
            messages_in_hand: gauge(
                "conveyor_messages_in_hand",
                "Deliveries a worker holds, not yet acked",
                PIPELINE_STAGE,
            ),
            queue_messages: gauge(
                "conveyor_queue_messages",
                "Messages ready in a stage's work, retry and dead-letter queues",
                &["pipeline", "stage", "queue"],
            ),
            registry,
        }
    }

    /// Creates, at zero, every series a worker of `stage` can export, so that each is scraped from
    /// the start (a counter that appears only at its first increment hides that first increment from
    /// `rate()` and `increase()`). The sync watermark is left out: it has no meaningful zero.
    pub fn initialize(&self, pipeline: &str, stage: Stage) {
        let carries_records = stage.carries_records();
        let stage = stage.as_str();
        let pipeline_stage = [pipeline, stage];
        for counter in [
            &self.records_in,
            &self.records_out,
            &self.records_retried,
            &self.records_replayed,
            &self.records_filtered,
        ] {
            counter.with_label_values(&pipeline_stage);
        }
        for class in ERROR_CLASSES {
            self.records_dead_lettered
                .with_label_values(&[pipeline, stage, class]);
        }
        for class in MESSAGE_ERROR_CLASSES {
            self.messages_dead_lettered
                .with_label_values(&[pipeline, stage, class]);
        }
        if carries_records {
            self.records_settled.with_label_values(&pipeline_stage);
        }
        self.message_duration.with_label_values(&pipeline_stage);
        self.message_queued.with_label_values(&pipeline_stage);
        self.ready.with_label_values(&pipeline_stage);
        self.messages_in_hand.with_label_values(&pipeline_stage);
        for queue in QUEUE_KINDS {
            self.queue_messages
                .with_label_values(&[pipeline, stage, queue]);
        }
        match stage {
            "fetch" => {
                for outcome in SOURCE_OUTCOMES {
                    self.source_requests.with_label_values(&[pipeline, outcome]);
                }
                for outcome in WINDOW_OUTCOMES {
                    self.sync_windows.with_label_values(&[pipeline, outcome]);
                }
                self.source_token_refreshes.with_label_values(&[pipeline]);
                self.source_throttled.with_label_values(&[pipeline]);
                self.source_rate_wait_seconds.with_label_values(&[pipeline]);
            }
            "write" => {
                for outcome in ROW_OUTCOMES {
                    self.target_rows.with_label_values(&[pipeline, outcome]);
                }
                self.target_write_duration.with_label_values(&[pipeline]);
            }
            _ => {}
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buffer = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buffer)
            .expect("text encoding into a Vec cannot fail");
        String::from_utf8(buffer).expect("the text format is UTF-8")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The metric names of a Prometheus text exposition (histogram series under their family name).
    fn names_in(text: &str) -> std::collections::BTreeSet<String> {
        text.lines()
            .filter(|line| !line.starts_with('#') && !line.is_empty())
            .map(|line| {
                let name = line.split(['{', ' ']).next().unwrap_or_default();
                ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|suffix| {
                        name.strip_suffix(suffix)
                            .filter(|family| family.ends_with("_seconds"))
                    })
                    .unwrap_or(name)
                    .to_owned()
            })
            .collect()
    }

    #[test]
    fn every_registered_metric_is_documented_and_initialized() {
        let metrics = Metrics::new();
        for stage in Stage::ALL {
            metrics.initialize("orders", stage);
        }
        metrics.sync_watermark.with_label_values(&["orders"]).set(1);
        // Set by the fetcher's budget once it knows the configured limit.
        metrics
            .source_call_rate
            .with_label_values(&["orders"])
            .set(300.0);
        let rendered = names_in(&metrics.render());
        let documented: std::collections::BTreeSet<String> =
            DOCUMENTED.iter().map(|name| name.to_string()).collect();
        assert_eq!(rendered, documented);
        let families = metrics.registry.gather();
        for family in &families {
            for metric in family.get_metric() {
                for label in metric.get_label() {
                    assert!(
                        LABELS.contains(&label.name()),
                        "{} has the unbounded label {}",
                        family.name(),
                        label.name()
                    );
                }
            }
        }
    }

    /// The `conveyor_*` metric names a PromQL text mentions (recording rules, `conveyor:*`, aside),
    /// histogram series under their family name.
    fn metrics_named_in(text: &str) -> std::collections::BTreeSet<String> {
        let mut names = std::collections::BTreeSet::new();
        let mut rest = text;
        while let Some(at) = rest.find("conveyor_") {
            let before = rest[..at].chars().last();
            let tail = &rest[at..];
            let end = tail
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(tail.len());
            if !matches!(before, Some(c) if c.is_ascii_alphanumeric() || c == '_' || c == ':') {
                let name = &tail[..end];
                let family = ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|suffix| name.strip_suffix(suffix))
                    .filter(|family| DOCUMENTED.contains(family))
                    .unwrap_or(name);
                names.insert(family.to_owned());
            }
            rest = &tail[end..];
        }
        names
    }

    #[test]
    fn dashboard_parses_and_shows_every_metric_and_no_other() {
        let text = include_str!("../../../ops/grafana/dashboards/conveyor.json");
        let dashboard: serde_json::Value =
            serde_json::from_str(text).expect("the dashboard is JSON");
        let mut exprs = Vec::new();
        for panel in dashboard["panels"].as_array().expect("panels") {
            for target in panel["targets"].as_array().into_iter().flatten() {
                exprs.push(target["expr"].as_str().expect("a PromQL expr").to_owned());
            }
        }
        assert!(exprs.len() > 10, "the dashboard has its queries");
        let named = metrics_named_in(&exprs.join("\n"));
        let documented: std::collections::BTreeSet<String> =
            DOCUMENTED.iter().map(|name| name.to_string()).collect();
        assert_eq!(
            named, documented,
            "metrics the dashboard queries vs DOCUMENTED"
        );
        let recorded = include_str!("../../../ops/prometheus/alerts.yml");
        for rule in exprs.join("\n").split("conveyor:").skip(1) {
            let name = rule
                .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .next();
            let name = format!("conveyor:{}", name.unwrap_or_default());
            assert!(
                recorded.contains(&format!("record: {name}")),
                "the dashboard queries {name}, which alerts.yml does not record"
            );
        }
    }

    #[test]
    fn alerts_name_only_documented_metrics() {
        let alerts = include_str!("../../../ops/prometheus/alerts.yml");
        let named = metrics_named_in(alerts);
        assert!(named.len() > 5, "{named:?}");
        for name in &named {
            assert!(
                DOCUMENTED.contains(&name.as_str()),
                "alerts.yml names {name}, which is not a conveyor metric"
            );
        }
    }

    #[test]
    fn the_operations_doc_lists_exactly_the_documented_metrics() {
        let operations = include_str!("../../../docs/operations.md");
        let section = operations
            .split("- **Metrics**")
            .nth(1)
            .and_then(|rest| rest.split("\n- **").next())
            .expect("docs/operations.md has a Metrics item");
        let listed: std::collections::BTreeSet<&str> = section
            .split('`')
            .skip(1)
            .step_by(2)
            .filter(|code| code.starts_with("conveyor_"))
            .collect();
        let documented: std::collections::BTreeSet<&str> = DOCUMENTED.iter().copied().collect();
        assert_eq!(
            listed, documented,
            "docs/operations.md metrics list vs metrics::DOCUMENTED"
        );
    }

    #[test]
    fn renders_counters_with_labels() {
        let metrics = Metrics::new();
        metrics
            .records_in
            .with_label_values(&["orders", "write"])
            .inc_by(3);
        metrics
            .records_filtered
            .with_label_values(&["orders", "transform"])
            .inc_by(2);
        let text = metrics.render();
        assert!(
            text.contains(r#"conveyor_records_in_total{pipeline="orders",stage="write"} 3"#),
            "{text}"
        );
        assert!(
            text.contains(
                r#"conveyor_records_filtered_total{pipeline="orders",stage="transform"} 2"#
            ),
            "{text}"
        );
    }
}
