//! The consume loop every queue-fed worker runs, and the dead-letter queues it feeds.
//!
//! The loop owns the acknowledgement discipline: a delivery is acked only after what it asked for is
//! durable (the handler's publishes confirmed or its write committed), or after its retry copy or its
//! dead letter is confirmed. A transient failure sends a copy to the stage's retry queue of the next
//! delay tier (the consumer never sleeps on it) until the attempts run out; a message that cannot be
//! read goes to the dead-letter queue with the reason; no input makes a worker panic or stop.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection};
use rand::Rng;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::broker::{BrokerError, Publisher, Stage, Topology};
use crate::envelope::{
    Envelope, HEADER_ATTEMPT, HEADER_PIPELINE, Meta, Record, header_u32, long_string,
};
use crate::metrics::Metrics;

pub const HEADER_STAGE: &str = "x-conveyor-stage";
pub const HEADER_ERROR_CLASS: &str = "x-conveyor-error-class";
pub const HEADER_ERROR: &str = "x-conveyor-error";
pub const HEADER_FIRST_FAILED_AT: &str = "x-conveyor-first-failed-at";
pub const HEADER_LAST_FAILED_AT: &str = "x-conveyor-last-failed-at";
pub const HEADER_ORIGINAL_EXCHANGE: &str = "x-conveyor-original-exchange";
pub const HEADER_ORIGINAL_ROUTING_KEY: &str = "x-conveyor-original-routing-key";
pub const HEADER_RECORD_IDS: &str = "x-conveyor-record-ids";

/// What kind of failure, which decides where the work goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// The message itself is unreadable: not JSON, wrong shape, unknown schema, oversize.
    Malformed,
    /// The data is wrong for its target: retrying cannot help.
    Permanent,
    /// The target or a dependency failed for now: retrying may help.
    Transient,
}

impl ErrorClass {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorClass::Malformed => "malformed",
            ErrorClass::Permanent => "permanent",
            ErrorClass::Transient => "transient",
        }
    }
}

/// A failure with its class and a message fit for operators (never containing secrets).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub class: ErrorClass,
    pub message: String,
}

impl Failure {
    pub fn new(class: ErrorClass, message: impl Into<String>) -> Self {
        Self {
            class,
            message: message.into(),
        }
    }
}

/// What became of a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Disposition {
    /// Everything the message asked for is durable downstream: ack it.
    Done,
    /// It can never succeed as it is: dead-letter it with the reason, then ack.
    DeadLetter(Failure),
    /// It may succeed later: send a copy to the next retry tier (or, after the last attempt, to the
    /// dead-letter queue), then ack.
    Retry(Failure),
    /// The worker cannot take it now (it is stopping, or its target is down): give it back to the work
    /// queue as it is, without counting an attempt.
    Release,
}

/// A stage's work on one message.
pub trait Handler: Send + Sync + 'static {
    fn handle(&self, envelope: Envelope) -> impl Future<Output = Disposition> + Send;

    /// Called once a whole message is in the dead-letter queue (given up on, or refused outright).
    fn dead_lettered(&self, _failure: &Failure) {}
}

/// Publishes to one stage's dead-letter queue, with the failure in headers and the payload unchanged.
#[derive(Clone)]
pub struct DeadLetters {
    publisher: Publisher,
    topology: Topology,
    stage: Stage,
    metrics: Metrics,
}

impl DeadLetters {
    pub fn new(publisher: Publisher, topology: Topology, stage: Stage, metrics: Metrics) -> Self {
        Self {
            publisher,
            topology,
            stage,
            metrics,
        }
    }

    /// Dead-letters a whole delivery: its body and properties unchanged, plus the failure headers.
    /// `attempts` is the number of tries made.
    pub async fn send_delivery(
        &self,
        delivery: &Delivery,
        failure: &Failure,
        attempts: u32,
    ) -> Result<(), BrokerError> {
        let record_ids = record_ids_in(&delivery.data, &delivery.properties);
        let (exchange, routing_key) = original_route(delivery);
        let properties = self.with_failure(
            delivery.properties.clone(),
            failure,
            &exchange,
            &routing_key,
            &record_ids,
            attempts,
        );
        self.publish(&delivery.data, properties).await?;
        self.count_message(failure);
        Ok(())
    }

    /// Sends a copy of a delivery that failed for a transient reason to the retry queue of its tier,
    /// with the attempt count raised; the broker returns it to the work queue after the tier's delay.
    /// Returns `false` when no retry tier is configured (the caller dead-letters instead).
    pub async fn send_retry(
        &self,
        delivery: &Delivery,
        failure: &Failure,
        retry: u32,
    ) -> Result<bool, BrokerError> {
        let Some((queue, delay)) = self.topology.retry_tier(self.stage, retry) else {
            return Ok(false);
        };
        let record_ids = record_ids_in(&delivery.data, &delivery.properties);
        let (exchange, routing_key) = original_route(delivery);
        let mut properties = self.with_failure(
            delivery.properties.clone(),
            failure,
            &exchange,
            &routing_key,
            &record_ids,
            retry,
        );
        // Jitter: each copy expires somewhere in the second half of its tier's delay, so that retries
        // of messages that failed together do not all come back at once. The tier's queue-level TTL
        // stays the upper bound.
        let delay_ms = delay.as_millis() as u64;
        let expiration = delay_ms / 2 + rand::rng().random_range(0..=delay_ms / 2);
        properties = properties.with_expiration(expiration.to_string().into());
        self.publisher
            .publish("", &queue, &delivery.data, properties)
            .await?;
        self.metrics
            .records_retried
            .with_label_values(&[self.topology.pipeline(), self.stage.as_str()])
            .inc_by(record_ids.len().max(1) as u64);
        Ok(true)
    }

    /// Dead-letters records of a batch, each as its own message that continues the batch's trace.
    pub async fn send_records(
        &self,
        meta: &Meta,
        failed: Vec<(Record, Failure)>,
    ) -> Result<(), BrokerError> {
        let exchange = self.topology.exchange();
        let routing_key = self.topology.routing_key(self.stage);
        let mut pending = Vec::with_capacity(failed.len());
        for (record, failure) in &failed {
            let ids = [record.id.clone()];
            let single = Envelope {
                meta: Meta {
                    message_id: uuid::Uuid::new_v4(),
                    attempt: meta.attempt,
                    ..meta.clone()
                },
                records: vec![record.clone()],
            };
            let (body, properties) = single.to_amqp(self.topology.compression());
            let properties = self.with_failure(
                properties,
                failure,
                &exchange,
                &routing_key,
                &ids,
                meta.attempt + 1,
            );
            pending.push(
                self.publisher
                    .send(
                        &self.topology.dead_letter_exchange(),
                        &routing_key,
                        &body,
                        properties,
                    )
                    .await?,
            );
        }
        for confirm in pending {
            confirm.wait().await?;
        }
        for (_, failure) in &failed {
            self.count_message(failure);
            self.count_records(failure, 1);
        }
        Ok(())
    }

    async fn publish(&self, body: &[u8], properties: BasicProperties) -> Result<(), BrokerError> {
        self.publisher
            .publish(
                &self.topology.dead_letter_exchange(),
                &self.topology.routing_key(self.stage),
                body,
                properties,
            )
            .await
    }

    fn labels<'a>(&'a self, failure: &Failure) -> [&'a str; 3] {
        [
            self.topology.pipeline(),
            self.stage.as_str(),
            failure.class.as_str(),
        ]
    }

    fn count_message(&self, failure: &Failure) {
        self.metrics
            .messages_dead_lettered
            .with_label_values(&self.labels(failure))
            .inc();
    }

    fn count_records(&self, failure: &Failure, records: u64) {
        self.metrics
            .records_dead_lettered
            .with_label_values(&self.labels(failure))
            .inc_by(records);
    }

    fn with_failure(
        &self,
        properties: BasicProperties,
        failure: &Failure,
        exchange: &str,
        routing_key: &str,
        record_ids: &[String],
        attempts: u32,
    ) -> BasicProperties {
        let mut headers = properties.headers().clone().unwrap_or_default();
        if !headers.inner().contains_key(HEADER_PIPELINE) {
            headers.insert(
                HEADER_PIPELINE.into(),
                long_string(self.topology.pipeline()),
            );
        }
        headers.insert(HEADER_ATTEMPT.into(), AMQPValue::LongUInt(attempts));
        let now = chrono::Utc::now().to_rfc3339();
        if !headers.inner().contains_key(HEADER_FIRST_FAILED_AT) {
            headers.insert(HEADER_FIRST_FAILED_AT.into(), long_string(&now));
        }
        headers.insert(HEADER_LAST_FAILED_AT.into(), long_string(&now));
        headers.insert(HEADER_STAGE.into(), long_string(self.stage.as_str()));
        headers.insert(
            HEADER_ERROR_CLASS.into(),
            long_string(failure.class.as_str()),
        );
        headers.insert(HEADER_ERROR.into(), long_string(&failure.message));
        headers.insert(HEADER_ORIGINAL_EXCHANGE.into(), long_string(exchange));
        headers.insert(HEADER_ORIGINAL_ROUTING_KEY.into(), long_string(routing_key));
        headers.insert(HEADER_RECORD_IDS.into(), long_string(&record_ids.join(",")));
        properties.with_headers(headers).with_delivery_mode(2)
    }
}

/// Where a delivery was first published: the original route kept by an earlier retry, else its own.
/// (A retried message comes back through the broker's dead-lettering, which does not change the
/// exchange and routing key it is delivered with; the headers are kept for the operator's tools.)
fn original_route(delivery: &Delivery) -> (String, String) {
    let kept = |name| header(&delivery.properties, name).filter(|value| !value.is_empty());
    (
        kept(HEADER_ORIGINAL_EXCHANGE).unwrap_or_else(|| delivery.exchange.to_string()),
        kept(HEADER_ORIGINAL_ROUTING_KEY).unwrap_or_else(|| delivery.routing_key.to_string()),
    )
}

/// The ids of the records in a body, as far as it can be read; empty for an unreadable body.
pub(crate) fn record_ids_in(body: &[u8], properties: &BasicProperties) -> Vec<String> {
    #[derive(serde::Deserialize)]
    struct Ids {
        records: Vec<IdOnly>,
    }
    #[derive(serde::Deserialize)]
    struct IdOnly {
        id: String,
    }
    crate::envelope::decode_body(body, properties)
        .ok()
        .and_then(|body| serde_json::from_slice::<Ids>(&body).ok())
        .map(|ids| ids.records.into_iter().map(|record| record.id).collect())
        .unwrap_or_default()
}

/// How one stage consumes its work queue.
#[derive(Clone)]
pub struct ConsumeSettings {
    pub topology: Topology,
    pub stage: Stage,
    /// Unacknowledged deliveries held at once.
    pub prefetch: u16,
    /// How long in-flight work may take to finish after shutdown before the worker exits anyway.
    pub drain_timeout: Duration,
    /// Tries of a message failing for a transient reason before it is dead-lettered.
    pub max_attempts: u32,
}

/// Consumes the stage's work queue until `shutdown` fires, then stops taking deliveries, lets the
/// in-flight ones finish (up to the drain timeout) and returns. An error means the broker connection
/// or channel failed.
pub async fn run<H: Handler>(
    connection: &Connection,
    settings: ConsumeSettings,
    handler: Arc<H>,
    dead_letters: DeadLetters,
    metrics: Metrics,
    shutdown: CancellationToken,
) -> Result<(), BrokerError> {
    let queue = settings.topology.queue(settings.stage);
    let channel = connection
        .create_channel()
        .await
        .map_err(|source| BrokerError::Amqp {
            action: "opening a consumer channel".into(),
            source,
        })?;
    channel
        .basic_qos(settings.prefetch, BasicQosOptions::default())
        .await
        .map_err(|source| BrokerError::Amqp {
            action: "setting the prefetch".into(),
            source,
        })?;
    let tag = format!("{}-{}", settings.stage, uuid::Uuid::new_v4());
    let mut consumer = channel
        .basic_consume(
            queue.as_str().into(),
            tag.as_str().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|source| BrokerError::Amqp {
            action: format!("consuming {queue}"),
            source,
        })?;
    tracing::info!(queue, prefetch = settings.prefetch, "consuming");

    let tracker = TaskTracker::new();
    let context = Arc::new(Context {
        pipeline: settings.topology.pipeline().to_owned(),
        stage: settings.stage,
        max_attempts: settings.max_attempts.max(1),
        handler,
        dead_letters,
        metrics,
    });
    let outcome = loop {
        let next = tokio::select! {
            () = shutdown.cancelled() => break Ok(()),
            next = consumer.next() => next,
        };
        match next {
            Some(Ok(delivery)) => {
                let context = context.clone();
                tracker.spawn(async move { context.process(delivery).await });
            }
            Some(Err(source)) => {
                break Err(BrokerError::Amqp {
                    action: format!("consuming {queue}"),
                    source,
                });
            }
            None => {
                break Err(BrokerError::ConsumerCancelled(queue.clone()));
            }
        }
    };

    if outcome.is_err() {
        // The channel is gone: nothing in hand can be acked any more, and the broker gives it all back
        // to the queue. Waiting for it would only delay the reconnect; late finishers fail their ack
        // harmlessly (writes are idempotent).
        tracker.close();
        return outcome;
    }
    // Take no new work; what was delivered but not started goes back to the queue when the channel closes.
    if let Err(err) = channel
        .basic_cancel(tag.as_str().into(), BasicCancelOptions::default())
        .await
    {
        tracing::debug!(error = %err, "cancelling the consumer");
    }
    tracker.close();
    let in_flight = tracker.len();
    if in_flight > 0 {
        tracing::info!(in_flight, "finishing the messages in hand");
    }
    if tokio::time::timeout(settings.drain_timeout, tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            unfinished = tracker.len(),
            "drain timeout: exiting with work unfinished; the broker redelivers it"
        );
    }
    let _ = tokio::time::timeout(
        Duration::from_secs(5),
        channel.close(200, "stopping".into()),
    )
    .await;
    outcome
}

struct Context<H> {
    pipeline: String,
    stage: Stage,
    max_attempts: u32,
    handler: Arc<H>,
    dead_letters: DeadLetters,
    metrics: Metrics,
}

impl<H: Handler> Context<H> {
    async fn process(&self, delivery: Delivery) {
        let labels = [self.pipeline.as_str(), self.stage.as_str()];
        let in_hand = self.metrics.messages_in_hand.with_label_values(&labels);
        in_hand.inc();
        self.settle(delivery).await;
        in_hand.dec();
    }

    async fn settle(&self, delivery: Delivery) {
        let labels = [self.pipeline.as_str(), self.stage.as_str()];
        let timer = self
            .metrics
            .message_duration
            .with_label_values(&labels)
            .start_timer();
        if let Some(published) = delivery.properties.timestamp() {
            let now = chrono::Utc::now().timestamp().max(0) as u64;
            self.metrics
                .message_queued
                .with_label_values(&labels)
                .observe(now.saturating_sub(*published) as f64);
        }
        // The records of a readable message (none for a malformed one: it is counted as a message).
        let mut records = None;
        let disposition =
            match Envelope::from_amqp(&self.pipeline, &delivery.data, &delivery.properties) {
                Ok(envelope) => {
                    let count = envelope.records.len() as u64;
                    records = Some(count);
                    if self.stage.carries_records() {
                        self.metrics
                            .records_in
                            .with_label_values(&labels)
                            .inc_by(count);
                    }
                    self.handler.handle(envelope).await
                }
                Err(malformed) => Disposition::DeadLetter(Failure::new(
                    ErrorClass::Malformed,
                    malformed.to_string(),
                )),
            };
        let settled = match disposition {
            Disposition::Done => ack(&delivery).await,
            Disposition::DeadLetter(failure) => {
                let attempts = attempt_of(&delivery) + 1;
                self.dead_letter(&delivery, &failure, attempts, records)
                    .await
            }
            Disposition::Retry(failure) => self.retry(&delivery, failure, records).await,
            Disposition::Release => {
                if let Err(err) = delivery.acker.nack(requeue()).await {
                    tracing::debug!(error = %err, "could not release a message; the broker redelivers it when the channel closes");
                }
                false
            }
        };
        if settled
            && self.stage.carries_records()
            && let Some(records) = records
        {
            self.count_settled(&delivery, records);
        }
        timer.observe_duration();
    }

    /// Counts the records of a message acked for good. A replayed message's records entered the
    /// stage again: they count as replayed at the same moment, so that a replay is added to what
    /// entered the stage exactly when it is added to what the stage settled (counted at its first
    /// try instead, a replayed message handed back unstarted at a shutdown would be counted by no one).
    fn count_settled(&self, delivery: &Delivery, records: u64) {
        let labels = [self.pipeline.as_str(), self.stage.as_str()];
        self.metrics
            .records_settled
            .with_label_values(&labels)
            .inc_by(records);
        let replayed = headers_of(&delivery.properties)
            .inner()
            .contains_key(crate::dead_letters::HEADER_REPLAYS);
        if replayed {
            self.metrics
                .records_replayed
                .with_label_values(&labels)
                .inc_by(records);
        }
    }

    /// Dead-letters a whole message and acks it; `false` if it went back to its queue instead.
    /// Dead-letters a delivery and acks it; `records` are those of a readable message, counted as
    /// dead-lettered (at a stage that carries records) once the original is acked, as settled ones
    /// are. A malformed message's are not: it never entered the pipeline through conveyor.
    async fn dead_letter(
        &self,
        delivery: &Delivery,
        failure: &Failure,
        attempts: u32,
        records: Option<u64>,
    ) -> bool {
        tracing::warn!(class = failure.class.as_str(), attempts, error = %failure.message, "dead-lettering a message");
        match self
            .dead_letters
            .send_delivery(delivery, failure, attempts)
            .await
        {
            Ok(()) => {
                self.handler.dead_lettered(failure);
                let acked = ack(delivery).await;
                if acked
                    && self.stage.carries_records()
                    && let Some(records) = records
                {
                    self.dead_letters.count_records(failure, records);
                }
                acked
            }
            Err(err) => {
                tracing::error!(error = %err, "could not dead-letter a message; it goes back to the queue");
                self.hand_back(delivery).await;
                false
            }
        }
    }

    /// Sends a copy to the next retry tier and acks the original once the copy is confirmed; after the
    /// last attempt, dead-letters it as transient with the last error. `true` only when the message
    /// was settled for good (dead-lettered); a retry copy is still the same records on their way.
    async fn retry(&self, delivery: &Delivery, failure: Failure, records: Option<u64>) -> bool {
        let tries = attempt_of(delivery) + 1;
        if tries >= self.max_attempts {
            let failure = Failure::new(
                failure.class,
                format!("gave up after {tries} attempts: {}", failure.message),
            );
            return self.dead_letter(delivery, &failure, tries, records).await;
        }
        tracing::warn!(class = failure.class.as_str(), attempt = tries, error = %failure.message, "will retry a message");
        match self
            .dead_letters
            .send_retry(delivery, &failure, tries)
            .await
        {
            Ok(true) => {
                ack(delivery).await;
                false
            }
            Ok(false) => self.dead_letter(delivery, &failure, tries, records).await,
            Err(err) => {
                tracing::error!(error = %err, "could not send a message to its retry queue; it goes back to the queue");
                self.hand_back(delivery).await;
                false
            }
        }
    }

    /// The broker itself failed us (a publish was refused or not confirmed): pause, then give the
    /// message back to its queue. The work queue's delivery limit dead-letters one that never succeeds.
    async fn hand_back(&self, delivery: &Delivery) {
        let deliveries = header(&delivery.properties, "x-delivery-count")
            .and_then(|count| count.parse().ok())
            .unwrap_or(0);
        tokio::time::sleep(retry_delay(deliveries)).await;
        if let Err(err) = delivery.acker.nack(requeue()).await {
            tracing::warn!(error = %err, "could not hand a message back; the broker redelivers it when the channel closes");
        }
    }
}

fn requeue() -> BasicNackOptions {
    BasicNackOptions {
        requeue: true,
        ..Default::default()
    }
}

/// Tries made of a delivery before this one, from its attempt header (0 when absent or unreadable).
fn attempt_of(delivery: &Delivery) -> u32 {
    headers_of(&delivery.properties)
        .inner()
        .get(HEADER_ATTEMPT)
        .and_then(header_u32)
        .unwrap_or(0)
}

/// Exponential backoff with jitter: between half and all of 0.5 s, 1 s, 2 s, ... up to 30 s.
pub fn retry_delay(previous_deliveries: u32) -> Duration {
    let base_ms = 500u64
        .saturating_mul(1u64 << previous_deliveries.min(6))
        .min(30_000);
    let jitter_ms = rand::rng().random_range(0..=base_ms / 2);
    Duration::from_millis(base_ms / 2 + jitter_ms)
}

/// Acks a delivery; `false` if the ack could not be sent (the broker then redelivers the message).
async fn ack(delivery: &Delivery) -> bool {
    match delivery.acker.ack(BasicAckOptions::default()).await {
        Ok(true) => true,
        // The work is durable already; the broker redelivers the message and idempotence absorbs it.
        Ok(false) => {
            tracing::warn!("ack not sent (its channel is gone); the message will be redelivered");
            false
        }
        Err(err) => {
            tracing::warn!(error = %err, "ack failed; the message will be redelivered");
            false
        }
    }
}

/// Headers as a plain table, for tools that read dead letters.
pub fn headers_of(properties: &BasicProperties) -> &FieldTable {
    static EMPTY: std::sync::OnceLock<FieldTable> = std::sync::OnceLock::new();
    properties
        .headers()
        .as_ref()
        .unwrap_or_else(|| EMPTY.get_or_init(FieldTable::default))
}

/// A header as text, if present.
pub fn header(properties: &BasicProperties, name: &str) -> Option<String> {
    headers_of(properties)
        .inner()
        .get(name)
        .and_then(|value| match value {
            AMQPValue::LongString(_) | AMQPValue::ShortString(_) => {
                crate::envelope::header_text(value)
            }
            other => header_u32(other).map(|n| n.to_string()),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_delay_grows_and_is_capped() {
        for deliveries in 0..20 {
            let delay = retry_delay(deliveries);
            assert!(delay <= Duration::from_millis(30_000), "{delay:?}");
            assert!(delay >= Duration::from_millis(250), "{delay:?}");
        }
        assert!(retry_delay(6) > retry_delay(0));
    }

    #[test]
    fn record_ids_are_read_from_a_batch_body() {
        let plain = BasicProperties::default();
        let body = br#"{"schema":1,"records":[{"id":"a"},{"id":"b"}]}"#;
        assert_eq!(record_ids_in(body, &plain), ["a", "b"]);
        assert!(record_ids_in(b"garbage", &plain).is_empty());
        let compressed = lz4_flex::block::compress_prepend_size(body);
        let lz4 = plain.with_content_encoding(crate::envelope::LZ4.into());
        assert_eq!(record_ids_in(&compressed, &lz4), ["a", "b"]);
    }
}
