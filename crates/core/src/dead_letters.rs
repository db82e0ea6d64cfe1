//! Reading, replaying and removing dead letters: the logic behind `conveyorctl dlq`.
//!
//! A dead-letter queue is read by taking every message with `basic.get` and holding it unacknowledged:
//! nothing leaves the queue until a message is acked, and a message is acked only after its copy is
//! confirmed elsewhere (a replay) or the operator asked for it to go (a purge). Whatever is not removed
//! is handed back to the queue, in order, when the reading ends.

use std::borrow::Cow;
use std::time::Duration;

use chrono::{DateTime, FixedOffset, Utc};
use lapin::options::{BasicAckOptions, BasicGetOptions, BasicNackOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection};
use serde::Serialize;

use crate::broker::{BrokerError, Publisher, Stage, Topology};
use crate::consume::{
    HEADER_ERROR, HEADER_ERROR_CLASS, HEADER_FIRST_FAILED_AT, HEADER_LAST_FAILED_AT,
    HEADER_ORIGINAL_EXCHANGE, HEADER_ORIGINAL_ROUTING_KEY, HEADER_RECORD_IDS, HEADER_STAGE, header,
};
use crate::envelope::{HEADER_ATTEMPT, HEADER_PIPELINE, HEADER_TRACE_ID, decode_body};

/// Counts a replayed message carries: how often it was replayed (it keeps no failure headers).
pub const HEADER_REPLAYS: &str = "x-conveyor-replays";

/// One message of a dead-letter queue with its failure details.
#[derive(Debug, Clone, Serialize)]
pub struct DeadLetter {
    pub queue: String,
    pub pipeline: String,
    pub stage: String,
    /// `malformed`, `permanent` or `transient`.
    pub class: String,
    pub error: String,
    /// Tries made before it was dead-lettered.
    pub attempts: u32,
    pub first_failed_at: Option<DateTime<FixedOffset>>,
    pub last_failed_at: Option<DateTime<FixedOffset>>,
    pub original_exchange: String,
    pub original_routing_key: String,
    pub record_ids: Vec<String>,
    pub trace_id: String,
    pub message_id: String,
    /// The payload as text when it is UTF-8, decompressed if it travels compressed (it is kept byte
    /// for byte in the queue either way).
    pub payload: Option<String>,
    /// The payload in hex when it is not UTF-8.
    pub payload_hex: Option<String>,
    #[serde(skip)]
    pub body: Vec<u8>,
    #[serde(skip)]
    properties: BasicProperties,
    #[serde(skip)]
    delivery_tag: u64,
}

impl DeadLetter {
    fn read(queue: &str, data: &[u8], properties: &BasicProperties, delivery_tag: u64) -> Self {
        let text = |name: &str| header(properties, name).unwrap_or_default();
        let time = |name: &str| {
            header(properties, name).and_then(|t| DateTime::parse_from_rfc3339(&t).ok())
        };
        // Shown decompressed when it can be; kept byte for byte for replays either way.
        let shown = decode_body(data, properties).unwrap_or(Cow::Borrowed(data));
        let (payload, payload_hex) = match std::str::from_utf8(&shown) {
            Ok(text) => (Some(text.to_owned()), None),
            Err(_) => (
                None,
                Some(shown.iter().map(|b| format!("{b:02x}")).collect()),
            ),
        };
        Self {
            queue: queue.to_owned(),
            pipeline: text(HEADER_PIPELINE),
            stage: text(HEADER_STAGE),
            class: text(HEADER_ERROR_CLASS),
            error: text(HEADER_ERROR),
            attempts: text(HEADER_ATTEMPT).parse().unwrap_or(0),
            first_failed_at: time(HEADER_FIRST_FAILED_AT),
            last_failed_at: time(HEADER_LAST_FAILED_AT),
            original_exchange: text(HEADER_ORIGINAL_EXCHANGE),
            original_routing_key: text(HEADER_ORIGINAL_ROUTING_KEY),
            record_ids: text(HEADER_RECORD_IDS)
                .split(',')
                .filter(|id| !id.is_empty())
                .map(str::to_owned)
                .collect(),
            trace_id: text(HEADER_TRACE_ID),
            message_id: properties
                .message_id()
                .as_ref()
                .map(|id| id.to_string())
                .unwrap_or_default(),
            payload,
            payload_hex,
            body: data.to_vec(),
            properties: properties.clone(),
            delivery_tag,
        }
    }

    /// The properties of a replayed copy: the original identity and headers, without the failure
    /// headers and broker bookkeeping, the attempt count back at 0 and the replay counted.
    fn replay_properties(&self) -> BasicProperties {
        let mut headers = FieldTable::default();
        let dropped = [
            HEADER_STAGE,
            HEADER_ERROR_CLASS,
            HEADER_ERROR,
            HEADER_FIRST_FAILED_AT,
            HEADER_LAST_FAILED_AT,
            HEADER_ORIGINAL_EXCHANGE,
            HEADER_ORIGINAL_ROUTING_KEY,
            HEADER_RECORD_IDS,
            HEADER_ATTEMPT,
            HEADER_REPLAYS,
            "x-death",
            "x-delivery-count",
            "x-first-death-exchange",
            "x-first-death-queue",
            "x-first-death-reason",
        ];
        if let Some(original) = self.properties.headers() {
            for (name, value) in original.inner() {
                if !dropped.contains(&name.as_str()) {
                    headers.insert(name.clone(), value.clone());
                }
            }
        }
        let replays = header(&self.properties, HEADER_REPLAYS)
            .and_then(|n| n.parse::<u32>().ok())
            .unwrap_or(0);
        headers.insert(HEADER_ATTEMPT.into(), AMQPValue::LongUInt(0));
        headers.insert(HEADER_REPLAYS.into(), AMQPValue::LongUInt(replays + 1));
        // Rebuilt rather than copied, so that no expiration or other leftover travels with the copy.
        let original = &self.properties;
        let mut properties = BasicProperties::default()
            .with_delivery_mode(2)
            .with_headers(headers);
        if let Some(id) = original.message_id() {
            properties = properties.with_message_id(id.clone());
        }
        if let Some(id) = original.correlation_id() {
            properties = properties.with_correlation_id(id.clone());
        }
        if let Some(kind) = original.content_type() {
            properties = properties.with_content_type(kind.clone());
        }
        if let Some(encoding) = original.content_encoding() {
            properties = properties.with_content_encoding(encoding.clone());
        }
        if let Some(timestamp) = original.timestamp() {
            properties = properties.with_timestamp(*timestamp);
        }
        properties
    }
}

/// Which dead letters an operation applies to. Empty filters match everything.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// Only this error class.
    pub class: Option<String>,
    /// Only letters carrying this record id.
    pub record_id: Option<String>,
    /// Only letters that last failed at or after this time.
    pub since: Option<DateTime<Utc>>,
    /// Only letters that last failed before this time.
    pub until: Option<DateTime<Utc>>,
}

impl Filter {
    pub fn matches(&self, letter: &DeadLetter) -> bool {
        let failed_at = letter.last_failed_at.map(|t| t.with_timezone(&Utc));
        self.class
            .as_ref()
            .is_none_or(|class| *class == letter.class)
            && self
                .record_id
                .as_ref()
                .is_none_or(|id| letter.record_ids.contains(id))
            && self
                .since
                .is_none_or(|since| failed_at.is_some_and(|t| t >= since))
            && self
                .until
                .is_none_or(|until| failed_at.is_some_and(|t| t < until))
    }
}

/// The dead-letter queues of a pipeline, one per stage.
pub fn queues(topology: &Topology) -> Vec<(Stage, String)> {
    Stage::ALL
        .into_iter()
        .map(|stage| (stage, topology.dead_letter_queue(stage)))
        .collect()
}

/// Every message of one dead-letter queue, held unacknowledged on a channel of its own until
/// [`Held::release`] (or until the channel closes) hands back whatever was not removed.
pub struct Held {
    channel: Channel,
    pub letters: Vec<DeadLetter>,
}

fn amqp(action: String) -> impl FnOnce(lapin::Error) -> BrokerError {
    move |source| BrokerError::Amqp { action, source }
}

impl Held {
    /// Takes every message of `queue` (at most `max`, to bound memory) without removing any.
    pub async fn take(
        connection: &Connection,
        queue: &str,
        max: usize,
    ) -> Result<Self, BrokerError> {
        let channel = connection
            .create_channel()
            .await
            .map_err(amqp(format!("opening a channel to read {queue}")))?;
        let mut letters = Vec::new();
        while letters.len() < max {
            let got = channel
                .basic_get(queue.into(), BasicGetOptions { no_ack: false })
                .await
                .map_err(amqp(format!("reading {queue}")))?;
            let Some(message) = got else { break };
            let delivery = &message.delivery;
            letters.push(DeadLetter::read(
                queue,
                &delivery.data,
                &delivery.properties,
                delivery.delivery_tag,
            ));
        }
        Ok(Self { channel, letters })
    }

    /// Removes a letter from its queue for good.
    pub async fn remove(&self, letter: &DeadLetter) -> Result<(), BrokerError> {
        self.channel
            .basic_ack(letter.delivery_tag, BasicAckOptions::default())
            .await
            .map_err(amqp(format!("removing a message from {}", letter.queue)))
    }

    /// Publishes a copy of `letter` back where it failed, through the normal path (the original
    /// exchange and routing key), waits for the broker's confirm, and only then removes it from the
    /// dead-letter queue.
    pub async fn replay(
        &self,
        letter: &DeadLetter,
        publisher: &Publisher,
        topology: &Topology,
    ) -> Result<(), BrokerError> {
        let (exchange, routing_key) = replay_route(letter, topology);
        publisher
            .publish(
                &exchange,
                &routing_key,
                &letter.body,
                letter.replay_properties(),
            )
            .await?;
        self.remove(letter).await
    }

    /// Hands every letter not removed back to its queue (in order) and closes the channel.
    pub async fn release(self) {
        if let Err(err) = self
            .channel
            .basic_nack(
                0,
                BasicNackOptions {
                    multiple: true,
                    requeue: true,
                },
            )
            .await
        {
            tracing::debug!(error = %err, "handing back dead letters; the channel's close does it too");
        }
        let _ = tokio::time::timeout(
            Duration::from_secs(5),
            self.channel.close(200, "done".into()),
        )
        .await;
    }
}

/// Where a replay goes: the original route, or the work queue of the letter's stage when a producer
/// outside conveyor left none.
fn replay_route(letter: &DeadLetter, topology: &Topology) -> (String, String) {
    if !letter.original_routing_key.is_empty() {
        return (
            letter.original_exchange.clone(),
            letter.original_routing_key.clone(),
        );
    }
    let stage = Stage::ALL
        .into_iter()
        .find(|stage| stage.as_str() == letter.stage)
        .unwrap_or(Stage::Transform);
    (topology.exchange(), topology.routing_key(stage))
}

/// Counts of one dead-letter queue, by error class.
#[derive(Debug, Clone, Default, Serialize)]
pub struct QueueCounts {
    pub pipeline: String,
    pub stage: String,
    pub queue: String,
    pub messages: usize,
    pub records: usize,
    pub by_class: std::collections::BTreeMap<String, usize>,
}

impl QueueCounts {
    pub fn of(pipeline: &str, stage: Stage, queue: &str, letters: &[DeadLetter]) -> Self {
        let mut counts = Self {
            pipeline: pipeline.to_owned(),
            stage: stage.as_str().to_owned(),
            queue: queue.to_owned(),
            messages: letters.len(),
            ..Default::default()
        };
        for letter in letters {
            counts.records += letter.record_ids.len().max(1);
            *counts.by_class.entry(letter.class.clone()).or_default() += 1;
        }
        counts
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::long_string;

    fn letter(class: &str, ids: &str, failed_at: &str) -> DeadLetter {
        let mut headers = FieldTable::default();
        headers.insert(HEADER_ERROR_CLASS.into(), long_string(class));
        headers.insert(HEADER_RECORD_IDS.into(), long_string(ids));
        headers.insert(HEADER_LAST_FAILED_AT.into(), long_string(failed_at));
        headers.insert(HEADER_ERROR.into(), long_string("bad"));
        headers.insert("x-death".into(), long_string("broker bookkeeping"));
        headers.insert(HEADER_TRACE_ID.into(), long_string("t-1"));
        let properties = BasicProperties::default()
            .with_headers(headers)
            .with_expiration("500".into());
        DeadLetter::read("ns.p.write.dlq", b"{}", &properties, 1)
    }

    #[test]
    fn filters_by_class_record_and_time() {
        let letter = letter("permanent", "a,b", "2026-01-02T03:04:05+00:00");
        let at = |t: &str| Some(t.parse::<DateTime<Utc>>().unwrap());
        assert!(Filter::default().matches(&letter));
        assert!(
            Filter {
                class: Some("permanent".into()),
                record_id: Some("b".into()),
                since: at("2026-01-02T00:00:00Z"),
                until: at("2026-01-03T00:00:00Z"),
            }
            .matches(&letter)
        );
        assert!(
            !Filter {
                class: Some("transient".into()),
                ..Default::default()
            }
            .matches(&letter)
        );
        assert!(
            !Filter {
                record_id: Some("c".into()),
                ..Default::default()
            }
            .matches(&letter)
        );
        assert!(
            !Filter {
                since: at("2026-01-02T03:04:06Z"),
                ..Default::default()
            }
            .matches(&letter)
        );
    }

    #[test]
    fn a_replayed_copy_drops_failure_headers_and_counts_the_replay() {
        let properties = letter("transient", "a", "2026-01-02T03:04:05+00:00").replay_properties();
        assert_eq!(header(&properties, HEADER_ERROR), None);
        assert_eq!(header(&properties, "x-death"), None);
        assert_eq!(header(&properties, HEADER_ATTEMPT).as_deref(), Some("0"));
        assert_eq!(header(&properties, HEADER_REPLAYS).as_deref(), Some("1"));
        assert_eq!(header(&properties, HEADER_TRACE_ID).as_deref(), Some("t-1"));
        assert_eq!(properties.expiration(), &None);
        assert_eq!(properties.delivery_mode(), &Some(2));
    }
}
