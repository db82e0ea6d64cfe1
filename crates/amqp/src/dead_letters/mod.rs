//! Dead letters: sending them ([`DeadLetters`]), and reading, replaying and removing them, the logic
//! behind `conveyorctl dlq`.
//!
//! A dead-letter queue is read by taking every message with `basic.get` and holding it unacknowledged:
//! nothing leaves the queue until a message is acked, and a message is acked only after its copy is
//! confirmed elsewhere (a replay) or the operator asked for it to go (a purge). Whatever is not removed
//! is handed back to the queue, in order, when the reading ends. (Every hand-back counts as a delivery
//! on RabbitMQ 4.0 to 4.2: the dead-letter queues carry a delivery limit no reading reaches, see
//! [`crate::topology::DEAD_LETTER_DELIVERY_LIMIT`].)
//!
//! Most letters are conveyor's own, with the failure in its headers. A letter the broker dead-lettered
//! itself (a message redelivered past its work queue's delivery limit, because its consumer died on it
//! every time) has none of them, or stale ones from an earlier retry: it is read from the broker's
//! `x-death` header, with the class `broker` and the broker's reason.

use std::borrow::Cow;
use std::collections::HashSet;
use std::time::Duration;

use chrono::{DateTime, FixedOffset, Utc};
use lapin::options::{BasicAckOptions, BasicGetOptions, BasicNackOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection};
use serde::Serialize;

use conveyor_base::ledger::Letter;
use conveyor_base::{ErrorClass, Stage};

use crate::connect::close_channel;
use crate::envelope::{decode_body, record_ids_in};
use crate::error::{BrokerError, amqp};
use crate::headers::*;
use crate::publish::{PendingConfirm, Publisher};
use crate::topology::{DELIVERY_LIMIT, Topology};

mod sender;
pub use sender::DeadLetters;

pub use conveyor_base::ledger::BROKER_CLASS;

/// The broker's own dead-lettering of a message, from its `x-death` header: a queue's delivery limit
/// (or a rejection, or a length limit) made the broker move it to the dead-letter exchange. A retry
/// tier's delay running out (`expired`) is conveyor's own way back to the work queue, not a failure.
#[derive(Debug, Clone, PartialEq, Eq)]
struct BrokerDeath {
    reason: String,
    /// The queue the broker took it from.
    queue: String,
    exchange: String,
    routing_key: Option<String>,
    /// How often it was dead-lettered so from that queue.
    count: u32,
    time: Option<DateTime<FixedOffset>>,
}

impl BrokerDeath {
    /// The most recent dead-lettering, if the broker's was the last thing that happened to the message.
    fn read(properties: &BasicProperties) -> Option<Self> {
        let headers = headers_of(properties).inner();
        let Some(AMQPValue::FieldArray(deaths)) = headers.get(HEADER_X_DEATH) else {
            return None;
        };
        // RabbitMQ keeps the most recent event first.
        let Some(AMQPValue::FieldTable(latest)) = deaths.as_slice().first() else {
            return None;
        };
        let field = |name: &str| latest.inner().get(name);
        let text = |name: &str| field(name).and_then(header_text).unwrap_or_default();
        let reason = text("reason");
        if reason.is_empty() || reason == "expired" {
            return None;
        }
        let routing_key = match field("routing-keys") {
            Some(AMQPValue::FieldArray(keys)) => keys.as_slice().first().and_then(header_text),
            _ => None,
        };
        let time = match field("time") {
            Some(AMQPValue::Timestamp(seconds)) => i64::try_from(*seconds)
                .ok()
                .and_then(|seconds| DateTime::from_timestamp(seconds, 0))
                .map(|time| time.fixed_offset()),
            _ => None,
        };
        Some(Self {
            reason,
            queue: text("queue"),
            exchange: text("exchange"),
            routing_key,
            count: field("count").and_then(header_u32).unwrap_or(1),
            time,
        })
    }

    /// The reason as an operator reads it: the broker's word first.
    fn describe(&self) -> String {
        let what = match self.reason.as_str() {
            "delivery_limit" => format!(
                "redelivered {DELIVERY_LIMIT} times without an ack (the delivery limit of {}), so the \
                 broker dead-lettered it: its consumer failed on it every time (a crash, or a lost \
                 connection)",
                self.queue
            ),
            _ => format!("dead-lettered by the broker from {}", self.queue),
        };
        let times = if self.count > 1 {
            format!(" ({} times)", self.count)
        } else {
            String::new()
        };
        format!("{}: {what}{times}", self.reason)
    }
}

/// One message of a dead-letter queue with its failure details.
#[derive(Debug, Clone, Serialize)]
pub struct DeadLetter {
    pub queue: String,
    pub pipeline: String,
    pub stage: String,
    /// `malformed`, `permanent` or `transient` (conveyor's), or `broker` for a letter the broker
    /// dead-lettered itself.
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
        // The stage of a letter without conveyor's headers: that of its queue, `{ns}.{pipeline}.{stage}.dlq`.
        let stage = header(properties, HEADER_STAGE).unwrap_or_else(|| {
            queue
                .strip_suffix(".dlq")
                .and_then(|work| work.rsplit('.').next())
                .unwrap_or_default()
                .to_owned()
        });
        let record_ids = match header(properties, HEADER_RECORD_IDS) {
            Some(ids) => ids
                .split(',')
                .filter(|id| !id.is_empty())
                .map(str::to_owned)
                .collect(),
            None => record_ids_in(data, properties),
        };
        let kept = |name: &str| header(properties, name).filter(|value| !value.is_empty());
        // Shown decompressed when it can be; kept byte for byte for replays either way.
        let shown = decode_body(data, properties).unwrap_or(Cow::Borrowed(data));
        let (payload, payload_hex) = match std::str::from_utf8(&shown) {
            Ok(text) => (Some(text.to_owned()), None),
            Err(_) => (
                None,
                Some(shown.iter().map(|b| format!("{b:02x}")).collect()),
            ),
        };
        let mut letter = Self {
            queue: queue.to_owned(),
            pipeline: text(HEADER_PIPELINE),
            stage,
            class: text(HEADER_ERROR_CLASS),
            error: text(HEADER_ERROR),
            attempts: text(HEADER_ATTEMPT).parse().unwrap_or(0),
            first_failed_at: time(HEADER_FIRST_FAILED_AT),
            last_failed_at: time(HEADER_LAST_FAILED_AT),
            original_exchange: text(HEADER_ORIGINAL_EXCHANGE),
            original_routing_key: text(HEADER_ORIGINAL_ROUTING_KEY),
            record_ids,
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
        };
        // The broker's dead-lettering came last: its reason is the letter's, whatever conveyor's
        // headers say of an earlier retry. The original route is conveyor's, if a retry kept it.
        if let Some(death) = BrokerDeath::read(properties) {
            letter.class = BROKER_CLASS.to_owned();
            letter.error = death.describe();
            letter.last_failed_at = death.time.or(letter.last_failed_at);
            letter.first_failed_at = letter.first_failed_at.or(death.time);
            if kept(HEADER_ORIGINAL_ROUTING_KEY).is_none() {
                letter.original_exchange = death.exchange;
                letter.original_routing_key = death.routing_key.unwrap_or_default();
            }
        }
        letter
    }

    /// The letter as the ledger indexes it.
    pub fn indexed(&self) -> Letter {
        let headers = headers_of(&self.properties)
            .inner()
            .iter()
            .map(|(name, value)| {
                let text = match value {
                    AMQPValue::LongString(_) | AMQPValue::ShortString(_) => header_text(value),
                    other => header_u32(other).map(|n| n.to_string()),
                };
                (
                    name.to_string(),
                    text.unwrap_or_else(|| format!("{value:?}")),
                )
            })
            .collect();
        let payload = self.payload.as_ref().or(self.payload_hex.as_ref());
        Letter {
            message_id: self.message_id.clone(),
            class: self.class.clone(),
            reason: self.error.clone(),
            record_ids: self.record_ids.clone(),
            attempts: self.attempts,
            replays: self.replays(),
            headers,
            payload: payload.cloned().unwrap_or_default(),
        }
    }

    /// How often the letter was replayed before.
    fn replays(&self) -> u32 {
        header(&self.properties, HEADER_REPLAYS)
            .and_then(|n| n.parse::<u32>().ok())
            .unwrap_or(0)
    }

    /// The message id of the letter's replayed copy: a new message for the stage (which settled the
    /// letter's own id already), the same for every try of the same replay.
    pub fn replayed_id(&self) -> String {
        let name = format!("{}:replay:{}", self.message_id, self.replays() + 1);
        uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, name.as_bytes()).to_string()
    }

    /// The properties of a replayed copy: the original headers, without the failure headers and
    /// broker bookkeeping, the attempt count back at 0, the replay counted and a message id of its
    /// own ([`DeadLetter::replayed_id`]).
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
            HEADER_X_DEATH,
            HEADER_X_DELIVERY_COUNT,
            "x-acquired-count",
            "x-first-death-exchange",
            "x-first-death-queue",
            "x-first-death-reason",
            "x-last-death-exchange",
            "x-last-death-queue",
            "x-last-death-reason",
        ];
        if let Some(original) = self.properties.headers() {
            for (name, value) in original.inner() {
                if !dropped.contains(&name.as_str()) {
                    headers.insert(name.clone(), value.clone());
                }
            }
        }
        headers.insert(HEADER_ATTEMPT.into(), AMQPValue::LongUInt(0));
        headers.insert(
            HEADER_REPLAYS.into(),
            AMQPValue::LongUInt(self.replays() + 1),
        );
        // Rebuilt rather than copied, so that no expiration or other leftover travels with the copy.
        let original = &self.properties;
        let mut properties = BasicProperties::default()
            .with_delivery_mode(2)
            .with_headers(headers)
            .with_message_id(self.replayed_id().into());
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
    /// Only the letters of these message ids.
    pub message_ids: Option<HashSet<String>>,
}

impl Filter {
    /// The most letters it can match: as many as the message ids it names, if it names them.
    pub fn most(&self) -> usize {
        self.message_ids.as_ref().map_or(usize::MAX, HashSet::len)
    }

    pub fn matches(&self, letter: &DeadLetter) -> bool {
        let failed_at = letter.last_failed_at.map(|t| t.with_timezone(&Utc));
        self.message_ids
            .as_ref()
            .is_none_or(|ids| ids.contains(&letter.message_id))
            && self
                .class
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

/// Rounds of [`Held::release_removed`] at most.
const REMOVAL_ROUNDS: usize = 3;

/// How long [`Held::release_removed`] waits after a channel's close for its letters to be back.
const HANDED_BACK_WITHIN: Duration = Duration::from_millis(200);

/// Every message of one dead-letter queue, held unacknowledged on a channel of its own until
/// [`Held::release`] (or until the channel closes) hands back whatever was not removed.
pub struct Held {
    channel: Channel,
    queue: String,
    /// The most letters read at once (memory).
    max: usize,
    /// Letters read so far, and their message ids.
    read: usize,
    seen: HashSet<String>,
    /// The letters [`Held::take`] read (empty when read one by one with [`Held::next`]).
    pub letters: Vec<DeadLetter>,
    /// The message ids of the letters removed, to make sure they are gone ([`Held::release_removed`]).
    removed: std::sync::Mutex<HashSet<String>>,
}

impl Held {
    /// Takes every message of `queue` (at most `max`, to bound memory) without removing any.
    pub async fn take(
        connection: &Connection,
        queue: &str,
        max: usize,
    ) -> Result<Self, BrokerError> {
        let mut held = Self::open(connection, queue, max).await?;
        while let Some(letter) = held.next().await? {
            held.letters.push(letter);
        }
        Ok(held)
    }

    /// Opens `queue` for reading letter by letter ([`Held::next`]): what is read stays held, but
    /// only what the caller keeps of it is in memory.
    pub async fn open(
        connection: &Connection,
        queue: &str,
        max: usize,
    ) -> Result<Self, BrokerError> {
        let channel = connection
            .create_channel()
            .await
            .map_err(amqp(format!("opening a channel to read {queue}")))?;
        Ok(Self {
            channel,
            queue: queue.to_owned(),
            max,
            read: 0,
            seen: HashSet::new(),
            letters: Vec::new(),
            removed: std::sync::Mutex::default(),
        })
    }

    /// The next letter of the queue, held; `None` once the queue (or the most to read) is done.
    pub async fn next(&mut self) -> Result<Option<DeadLetter>, BrokerError> {
        if self.read >= self.max {
            return Ok(None);
        }
        let got = self
            .channel
            .basic_get(
                self.queue.as_str().into(),
                BasicGetOptions { no_ack: false },
            )
            .await
            .map_err(amqp(format!("reading {}", self.queue)))?;
        let Some(message) = got else {
            return Ok(None);
        };
        self.read += 1;
        let delivery = &message.delivery;
        let letter = DeadLetter::read(
            &self.queue,
            &delivery.data,
            &delivery.properties,
            delivery.delivery_tag,
        );
        self.seen.insert(letter.message_id.clone());
        Ok(Some(letter))
    }

    /// Publishes a copy of `letter` back where it failed, through the normal path (the original
    /// exchange and routing key), and returns the broker's confirm to await (many copies await
    /// theirs together). The letter stays until [`Held::remove`] takes it.
    pub async fn send_copy(
        &self,
        letter: &DeadLetter,
        publisher: &Publisher,
        topology: &Topology,
    ) -> Result<PendingConfirm, BrokerError> {
        let (exchange, routing_key) = replay_route(letter, topology);
        publisher
            .send(
                &exchange,
                &routing_key,
                &letter.body,
                letter.replay_properties(),
            )
            .await
    }

    /// Removes a letter from its queue for good.
    pub async fn remove(&self, letter: &DeadLetter) -> Result<(), BrokerError> {
        self.channel
            .basic_ack(letter.delivery_tag, BasicAckOptions::default())
            .await
            .map_err(amqp(format!("removing a message from {}", letter.queue)))?;
        self.removed
            .lock()
            .expect("no panics while locked")
            .insert(letter.message_id.clone());
        Ok(())
    }

    /// Like [`Held::release`], then makes sure that the letters removed are gone. A quorum queue may
    /// drop acks that reach it just before their channel closes, and hand those letters back
    /// (rabbitmq-server#10327): the queue is read again, and letters removed that came back are
    /// removed again, a few rounds at most. Only the letters handed back need reading: a queue serves
    /// what was handed back before anything else (a quorum queue's returns come first, a classic
    /// queue's go back to where they were), so the reading stops at the first letter this one never
    /// held.
    pub async fn release_removed(mut self, connection: &Connection) -> Result<(), BrokerError> {
        let mut removed =
            std::mem::take(&mut *self.removed.lock().expect("no panics while locked"));
        let (queue, max) = (self.queue.clone(), self.max);
        let mut held_before = std::mem::take(&mut self.seen);
        self.release().await;
        for _ in 0..REMOVAL_ROUNDS {
            if removed.is_empty() {
                return Ok(());
            }
            // The queue hands back what a closed channel held a moment after the close.
            tokio::time::sleep(HANDED_BACK_WITHIN).await;
            let mut again = Held::open(connection, &queue, max).await?;
            let mut back = 0;
            while let Some(letter) = again.next().await? {
                if !held_before.contains(&letter.message_id) {
                    break;
                }
                if removed.contains(&letter.message_id) {
                    again.remove(&letter).await?;
                    back += 1;
                }
            }
            if back > 0 {
                tracing::info!(
                    queue,
                    letters = back,
                    "letters removed came back (the broker dropped their acks at the channel's close); removing them again"
                );
            }
            removed = std::mem::take(&mut *again.removed.lock().expect("no panics while locked"));
            held_before = std::mem::take(&mut again.seen);
            again.release().await;
        }
        if !removed.is_empty() {
            tracing::warn!(
                queue,
                letters = removed.len(),
                "letters removed keep coming back; list the queue again"
            );
        }
        Ok(())
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
        close_channel(&self.channel, "done").await;
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
    /// No letter counted yet.
    pub fn new(pipeline: &str, stage: Stage, queue: &str) -> Self {
        Self {
            pipeline: pipeline.to_owned(),
            stage: stage.as_str().to_owned(),
            queue: queue.to_owned(),
            ..Default::default()
        }
    }

    pub fn add(&mut self, letter: &DeadLetter) {
        self.messages += 1;
        // A malformed letter is counted as a message: records never entered through it, even when
        // its body could be read (another pipeline's, another schema version).
        if letter.class != ErrorClass::Malformed.as_str() {
            self.records += letter.record_ids.len();
        }
        *self.by_class.entry(letter.class.clone()).or_default() += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn counts_records_of_letters_but_not_of_malformed_messages() {
        let letters = [
            letter("permanent", "a,b", "2026-01-02T03:04:05+00:00"),
            letter("malformed", "c", "2026-01-02T03:04:05+00:00"),
        ];
        let mut counts = QueueCounts::new("p", Stage::Write, "ns.p.write.dlq");
        letters.iter().for_each(|letter| counts.add(letter));
        assert_eq!((counts.messages, counts.records), (2, 2));
        assert_eq!(counts.by_class["malformed"], 1);
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
                ..Default::default()
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

    fn death(reason: &str, queue: &str, routing_key: &str, time: u64) -> AMQPValue {
        let mut death = FieldTable::default();
        death.insert("reason".into(), long_string(reason));
        death.insert("queue".into(), long_string(queue));
        death.insert("exchange".into(), long_string("ns"));
        death.insert(
            "routing-keys".into(),
            AMQPValue::FieldArray(vec![long_string(routing_key)].into()),
        );
        death.insert("count".into(), AMQPValue::LongLongInt(1));
        death.insert("time".into(), AMQPValue::Timestamp(time));
        AMQPValue::FieldTable(death)
    }

    const BATCH: &[u8] = br#"{"schema":1,"records":[{"id":"a"},{"id":"b"}]}"#;

    #[test]
    fn a_letter_the_broker_dead_lettered_gets_the_brokers_reason() {
        let mut headers = FieldTable::default();
        headers.insert(HEADER_PIPELINE.into(), long_string("p"));
        headers.insert(HEADER_TRACE_ID.into(), long_string("t-1"));
        headers.insert(
            "x-death".into(),
            AMQPValue::FieldArray(
                vec![death(
                    "delivery_limit",
                    "ns.p.write",
                    "p.write",
                    1_800_000_000,
                )]
                .into(),
            ),
        );
        headers.insert("x-first-death-reason".into(), long_string("delivery_limit"));
        let properties = BasicProperties::default().with_headers(headers);
        let letter = DeadLetter::read("ns.p.write.dlq", BATCH, &properties, 1);
        assert_eq!(letter.class, BROKER_CLASS);
        assert!(
            letter
                .error
                .starts_with("delivery_limit: redelivered 20 times without an ack (the delivery limit of ns.p.write)"),
            "{}",
            letter.error
        );
        assert_eq!(letter.stage, "write", "from its queue's name");
        assert_eq!(letter.record_ids, ["a", "b"], "from its body");
        assert_eq!(
            (
                letter.original_exchange.as_str(),
                letter.original_routing_key.as_str()
            ),
            ("ns", "p.write")
        );
        let at = letter.last_failed_at.unwrap().to_rfc3339();
        assert_eq!(at, "2027-01-15T08:00:00+00:00");
        assert_eq!(letter.first_failed_at, letter.last_failed_at);
        assert!(
            Filter {
                class: Some(BROKER_CLASS.into()),
                record_id: Some("b".into()),
                ..Default::default()
            }
            .matches(&letter)
        );
        let replayed = letter.replay_properties();
        assert_eq!(header(&replayed, "x-first-death-reason"), None);
        assert_eq!(header(&replayed, HEADER_TRACE_ID).as_deref(), Some("t-1"));
    }

    #[test]
    fn the_last_death_decides_whose_letter_it_is() {
        // Retried once (the retry tier expired back into the work queue), then redelivered past the
        // limit: the broker's reason, conveyor's original route.
        let mut headers = FieldTable::default();
        headers.insert(HEADER_ERROR_CLASS.into(), long_string("transient"));
        headers.insert(HEADER_ERROR.into(), long_string("a lock timed out"));
        headers.insert(HEADER_ORIGINAL_EXCHANGE.into(), long_string("ns"));
        headers.insert(HEADER_ORIGINAL_ROUTING_KEY.into(), long_string("p.write"));
        headers.insert(
            "x-death".into(),
            AMQPValue::FieldArray(
                vec![
                    death("delivery_limit", "ns.p.write", "p.write", 1_800_000_100),
                    death(
                        "expired",
                        "ns.p.write.retry.1s",
                        "ns.p.write.retry.1s",
                        1_800_000_000,
                    ),
                ]
                .into(),
            ),
        );
        let properties = BasicProperties::default().with_headers(headers.clone());
        let letter = DeadLetter::read("ns.p.write.dlq", BATCH, &properties, 1);
        assert_eq!(letter.class, BROKER_CLASS);
        assert!(
            letter.error.starts_with("delivery_limit:"),
            "{}",
            letter.error
        );
        assert_eq!(letter.original_routing_key, "p.write");

        // Retried, then dead-lettered by conveyor: conveyor's reason stands.
        headers.insert(
            "x-death".into(),
            AMQPValue::FieldArray(
                vec![death(
                    "expired",
                    "ns.p.write.retry.1s",
                    "ns.p.write.retry.1s",
                    1,
                )]
                .into(),
            ),
        );
        let properties = BasicProperties::default().with_headers(headers);
        let letter = DeadLetter::read("ns.p.write.dlq", BATCH, &properties, 1);
        assert_eq!(
            (letter.class.as_str(), letter.error.as_str()),
            ("transient", "a lock timed out")
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
