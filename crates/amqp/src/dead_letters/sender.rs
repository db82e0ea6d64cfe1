//! Sending to a stage's dead-letter queue: the payload unchanged, the failure in headers, counted in
//! the stage's metrics.

use std::time::Duration;

use conveyor_base::ledger::Letter;
use conveyor_base::metrics::Metrics;
use conveyor_base::{Failure, Record, Stage};
use lapin::BasicProperties;
use lapin::message::Delivery;
use lapin::types::AMQPValue;
use rand::RngExt as _;

use super::DeadLetter;
use crate::envelope::{Envelope, Meta, record_ids_in};
use crate::error::BrokerError;
use crate::headers::*;
use crate::publish::Publisher;
use crate::topology::Topology;

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

    /// Dead-letters a whole delivery: its body and properties unchanged, plus the failure headers
    /// (and a message id, if it came without one, so that the letter can be named). `attempts` is the
    /// number of tries made. Returns the letter as the ledger indexes it.
    pub(crate) async fn send_delivery(
        &self,
        delivery: &Delivery,
        failure: &Failure,
        attempts: u32,
    ) -> Result<Letter, BrokerError> {
        let record_ids = record_ids_in(&delivery.data, &delivery.properties);
        let (exchange, routing_key) = original_route(delivery);
        let mut properties = self.with_failure(
            delivery.properties.clone(),
            failure,
            &exchange,
            &routing_key,
            &record_ids,
            attempts,
        );
        if properties.message_id().is_none() {
            properties = properties.with_message_id(uuid::Uuid::new_v4().to_string().into());
        }
        let letter = self.indexed(&delivery.data, &properties);
        self.publish(&delivery.data, properties).await?;
        self.count_message(failure);
        Ok(letter)
    }

    /// A letter about to be sent, as the ledger indexes it.
    fn indexed(&self, body: &[u8], properties: &BasicProperties) -> Letter {
        let queue = self.topology.dead_letter_queue(self.stage);
        DeadLetter::read(&queue, body, properties, 0).indexed()
    }

    /// Sends a copy of a delivery that failed for a transient reason to the retry queue of its tier,
    /// with the attempt count raised; the broker returns it to the work queue after the tier's delay.
    /// Returns `false` when no retry tier is configured (the caller dead-letters instead).
    pub(crate) async fn send_retry(
        &self,
        delivery: &Delivery,
        failure: &Failure,
        retry: u32,
    ) -> Result<bool, BrokerError> {
        let Some(tier) = self.topology.retry_tier(self.stage, retry) else {
            return Ok(false);
        };
        self.send_delayed(delivery, failure, retry, tier).await?;
        Ok(true)
    }

    /// Sends a copy of a delivery whose source asked to wait to the retry tier nearest a minute, with
    /// the attempt count as it was. Returns `false` when no retry tier is configured.
    pub(crate) async fn send_deferred(
        &self,
        delivery: &Delivery,
        failure: &Failure,
        attempts: u32,
    ) -> Result<bool, BrokerError> {
        let Some(tier) = self.topology.defer_tier(self.stage) else {
            return Ok(false);
        };
        self.send_delayed(delivery, failure, attempts, tier).await?;
        Ok(true)
    }

    async fn send_delayed(
        &self,
        delivery: &Delivery,
        failure: &Failure,
        retry: u32,
        (queue, delay): (String, Duration),
    ) -> Result<(), BrokerError> {
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
        Ok(())
    }

    /// Dead-letters records of a batch, each as its own message that continues the batch's trace.
    /// A record's letter has the same message id whenever its batch is dead-lettered again (a
    /// redelivery). Returns the letters as the ledger indexes them, in the order of `failed`.
    pub async fn send_records(
        &self,
        meta: &Meta,
        failed: Vec<(Record, Failure)>,
    ) -> Result<Vec<Letter>, BrokerError> {
        let exchange = self.topology.exchange();
        let routing_key = self.topology.routing_key(self.stage);
        let mut pending = Vec::with_capacity(failed.len());
        let mut letters = Vec::with_capacity(failed.len());
        for (record, failure) in &failed {
            let ids = [record.id.clone()];
            let single = Envelope {
                meta: Meta {
                    attempt: meta.attempt,
                    replays: meta.replays,
                    ..meta.derived(record.data.get())
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
            letters.push(self.indexed(&body, &properties));
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
        Ok(letters)
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

    pub(crate) fn count_records(&self, failure: &Failure, records: u64) {
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
