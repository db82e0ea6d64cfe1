//! The consume loop every queue-fed worker runs.
//!
//! The loop owns the acknowledgement discipline: a delivery is acked only after what it asked for is
//! durable (the handler's publishes confirmed or its write committed), or after its retry copy or its
//! dead letter is confirmed. A transient failure sends a copy to the stage's retry queue of the next
//! delay tier (the consumer never sleeps on it) until the attempts run out; a message that cannot be
//! read goes to the dead-letter queue with the reason; no input makes a worker panic or stop.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use futures_util::{FutureExt, StreamExt};
use lapin::Connection;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
};
use lapin::types::FieldTable;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use conveyor_base::backoff::Backoff;
use conveyor_base::ledger::{Letter, Settled, SharedLedger};
use conveyor_base::metrics::Metrics;
use conveyor_base::{Disposition, ErrorClass, Failure, Stage};

use crate::connect::close_channel;
use crate::dead_letters::DeadLetters;
use crate::envelope::{Envelope, record_ids_in};
use crate::error::{BrokerError, amqp, answered};
use crate::headers::*;
use crate::topology::Topology;

/// A stage's work on one message.
pub trait Handler: Send + Sync + 'static {
    fn handle(&self, envelope: Envelope) -> impl Future<Output = Disposition> + Send;

    /// Called once a whole message is in the dead-letter queue (given up on, or refused outright).
    fn dead_lettered(&self, _failure: &Failure) {}
}

/// Any [`Handler`], behind a pointer (implement `Handler`, not this): the consume loop takes one, so
/// that it is compiled once, in this crate, rather than once per handler in every worker crate (see
/// `conveyor_base::boxed`). A box per message costs nothing beside the message's own work.
pub trait AnyHandler: Send + Sync {
    fn handle(&self, envelope: Envelope) -> BoxFuture<'_, Disposition>;
    fn dead_lettered(&self, failure: &Failure);
}

impl<H: Handler> AnyHandler for H {
    fn handle(&self, envelope: Envelope) -> BoxFuture<'_, Disposition> {
        Handler::handle(self, envelope).boxed()
    }

    fn dead_lettered(&self, failure: &Failure) {
        Handler::dead_lettered(self, failure);
    }
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
pub fn run(
    connection: &Connection,
    settings: ConsumeSettings,
    handler: Arc<dyn AnyHandler>,
    dead_letters: DeadLetters,
    ledger: SharedLedger,
    metrics: Metrics,
    shutdown: CancellationToken,
) -> BoxFuture<'_, Result<(), BrokerError>> {
    async move {
        let queue = settings.topology.queue(settings.stage);
        let tag = format!("{}-{}", settings.stage, uuid::Uuid::new_v4());
        let (channel, mut consumer) = answered(&format!("consuming {queue}"), async {
            let channel = connection
                .create_channel()
                .await
                .map_err(amqp("opening a consumer channel"))?;
            channel
                .basic_qos(settings.prefetch, BasicQosOptions::default())
                .await
                .map_err(amqp("setting the prefetch"))?;
            let consumer = channel
                .basic_consume(
                    queue.as_str().into(),
                    tag.as_str().into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await
                .map_err(amqp(format!("consuming {queue}")))?;
            Ok((channel, consumer))
        })
        .await?;
        tracing::info!(queue, prefetch = settings.prefetch, "consuming");

        let tracker = TaskTracker::new();
        let context = Arc::new(Context {
            pipeline: settings.topology.pipeline().to_owned(),
            stage: settings.stage,
            max_attempts: settings.max_attempts.max(1),
            handler,
            dead_letters,
            ledger,
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
                Some(Err(source)) => break Err(amqp(format!("consuming {queue}"))(source)),
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
        close_channel(&channel, "stopping").await;
        outcome
    }
    .boxed()
}

struct Context {
    pipeline: String,
    stage: Stage,
    max_attempts: u32,
    handler: Arc<dyn AnyHandler>,
    dead_letters: DeadLetters,
    ledger: SharedLedger,
    metrics: Metrics,
}

impl Context {
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
            Disposition::Defer(failure) => self.defer(&delivery, failure, records).await,
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
            .contains_key(HEADER_REPLAYS);
        if replayed {
            self.metrics
                .records_replayed
                .with_label_values(&labels)
                .inc_by(records);
        }
    }

    /// Dead-letters a delivery, records it in the ledger and acks it; `false` if it went back to its
    /// queue instead. `records` are those of a readable message, counted as dead-lettered (at a stage
    /// that carries records) once the original is acked, as settled ones are. A malformed message's
    /// are not: it never entered the pipeline through conveyor.
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
            Ok(letter) => {
                if let Err(err) = self
                    .record_dead_letter(delivery, failure, records, letter)
                    .await
                {
                    tracing::warn!(error = %err, "could not record a dead letter in the ledger; the message goes back to the queue");
                    self.hand_back(delivery).await;
                    return false;
                }
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
                tracing::warn!(error = %err, "could not dead-letter a message; it goes back to the queue");
                self.hand_back(delivery).await;
                false
            }
        }
    }

    /// Records in the ledger that the stage dead-lettered a whole delivery (a malformed one as
    /// such: its records, if any, are not the pipeline's) as `letter`.
    async fn record_dead_letter(
        &self,
        delivery: &Delivery,
        failure: &Failure,
        records: Option<u64>,
        letter: Letter,
    ) -> Result<(), String> {
        if !self.ledger.enabled() {
            return Ok(());
        }
        // The delivery's own id, or (it had none) the letter's: nothing redelivered can be matched
        // to it, so each copy is its own unreadable message.
        let message_id = letter.message_id.clone();
        let (class, record_ids) = match records {
            Some(_) => (
                failure.class,
                record_ids_in(&delivery.data, &delivery.properties),
            ),
            None => (ErrorClass::Malformed, Vec::new()),
        };
        let mut settled = Settled::dead_lettered(self.stage, message_id, class, record_ids);
        settled.letters.push(letter);
        self.ledger.settle(settled).await
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
        let sent = self
            .dead_letters
            .send_retry(delivery, &failure, tries)
            .await;
        self.settle_delayed(delivery, sent, &failure, tries, records)
            .await
    }

    /// Puts a delivery whose source asked to wait back with a delay, its attempts not counted; `true`
    /// only if it was dead-lettered (no retry tier is configured).
    async fn defer(&self, delivery: &Delivery, failure: Failure, records: Option<u64>) -> bool {
        let attempts = attempt_of(delivery);
        tracing::warn!(error = %failure.message, "the source asks to wait; putting the message back with a delay (not a failed attempt)");
        let sent = self
            .dead_letters
            .send_deferred(delivery, &failure, attempts)
            .await;
        self.settle_delayed(delivery, sent, &failure, attempts + 1, records)
            .await
    }

    /// Settles a delivery once its delayed copy was `sent`: acks it; dead-letters it (as attempt
    /// `attempts`) when no retry tier is configured; hands it back when the copy was not confirmed.
    /// `true` only when it was dead-lettered.
    async fn settle_delayed(
        &self,
        delivery: &Delivery,
        sent: Result<bool, BrokerError>,
        failure: &Failure,
        attempts: u32,
        records: Option<u64>,
    ) -> bool {
        match sent {
            Ok(true) => {
                ack(delivery).await;
                false
            }
            Ok(false) => self.dead_letter(delivery, failure, attempts, records).await,
            Err(err) => {
                tracing::warn!(error = %err, "could not send a message to its retry queue; it goes back to the queue");
                self.hand_back(delivery).await;
                false
            }
        }
    }

    /// The broker itself failed us (a publish was refused or not confirmed): pause, then give the
    /// message back to its queue. The work queue's delivery limit dead-letters one that never succeeds.
    async fn hand_back(&self, delivery: &Delivery) {
        let deliveries = header(&delivery.properties, HEADER_X_DELIVERY_COUNT)
            .and_then(|count| count.parse().ok())
            .unwrap_or(0);
        tokio::time::sleep(HAND_BACK.jittered(deliveries)).await;
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

/// The pause before a message the broker failed us on goes back to its queue, by its deliveries so
/// far: between half and all of 0.5 s, 1 s, 2 s, ... up to 30 s.
const HAND_BACK: Backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));

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
