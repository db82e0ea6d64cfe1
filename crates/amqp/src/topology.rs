//! The names and shapes of a pipeline's exchanges and queues, and their declaration.
//!
//! Durability needs three things together: durable (quorum) queues, persistent messages and publisher
//! confirms; this file declares the first.

use std::time::Duration;

use conveyor_base::Stage;
use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Connection, ExchangeKind};

use crate::connect::close_channel;
use crate::envelope::Compression;
use crate::error::{BrokerError, amqp, answered};
use crate::headers::long_string;
use crate::settings::{BrokerArgs, QueueType};

/// How long work waits, at least, when its source asked to be called later (see [`Topology::defer_tier`]):
/// about as long as a rate-limit window.
const DEFER_DELAY: Duration = Duration::from_secs(30);

/// A quorum queue dead-letters a message redelivered this often: a last guard against a message that
/// keeps crashing its consumer. (RabbitMQ 4 drops such messages unless a dead-letter exchange is set.)
pub const DELIVERY_LIMIT: u32 = 20;

/// The delivery limit of the dead-letter queues: more than any reading will reach. `conveyorctl dlq`
/// reads a letter by taking it and handing it back, and on RabbitMQ 4.0 to 4.2 every hand-back counts
/// as a delivery, so that the default limit of quorum queues (20) would drop a letter, with no
/// dead-letter exchange to catch it, after its twentieth reading. RabbitMQ 4 also takes -1 for no
/// limit; 3.x accepts -1 as well but documents no such meaning: a large number means the same on both.
pub const DEAD_LETTER_DELIVERY_LIMIT: u32 = i32::MAX as u32;

/// The names and shapes of one pipeline's exchanges and queues.
///
/// `{ns}` is a direct exchange that routes `{pipeline}.{stage}` to the work queue `{ns}.{pipeline}.{stage}`;
/// `{ns}.dlx` routes the same keys to `{ns}.{pipeline}.{stage}.dlq`. Each work queue has retry queues
/// `{ns}.{pipeline}.{stage}.retry.{delay}`, one per delay tier, reached through the default exchange:
/// a message waits there for the tier's delay (queue-level TTL), then the broker dead-letters it back
/// to the work exchange with its stage's routing key.
#[derive(Debug, Clone)]
pub struct Topology {
    namespace: String,
    pipeline: String,
    queue_type: QueueType,
    retry_delays: Vec<Duration>,
    compression: Compression,
}

impl Topology {
    pub fn new(broker: &BrokerArgs, pipeline: &str) -> Self {
        Self {
            namespace: broker.namespace.clone(),
            pipeline: pipeline.to_owned(),
            queue_type: broker.queue_type,
            retry_delays: broker
                .retry_delays_ms
                .iter()
                .map(|ms| Duration::from_millis(*ms))
                .collect(),
            compression: Compression::default(),
        }
    }

    /// Bodies published compressed as `compression` says (a worker's setting), instead of the default.
    pub fn with_compression(mut self, compression: Compression) -> Self {
        self.compression = compression;
        self
    }

    /// Which message bodies are published compressed.
    pub fn compression(&self) -> Compression {
        self.compression
    }

    /// The namespace: the prefix of every exchange and queue name.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The retry queue of `stage` for a message retried for the `retry`-th time (1 for the first
    /// retry), with its delay; `None` when no tiers are configured.
    pub(crate) fn retry_tier(&self, stage: Stage, retry: u32) -> Option<(String, Duration)> {
        let last = self.retry_delays.len().checked_sub(1)?;
        let tier = (retry.max(1) as usize - 1).min(last);
        let delay = self.retry_delays[tier];
        Some((self.retry_queue(stage, delay), delay))
    }

    /// The retry queue for work put back because its source asked to wait: the first tier of at
    /// least [`DEFER_DELAY`], else the longest; `None` when no tiers are configured.
    pub(crate) fn defer_tier(&self, stage: Stage) -> Option<(String, Duration)> {
        let delay = self
            .retry_delays
            .iter()
            .find(|delay| **delay >= DEFER_DELAY)
            .or(self.retry_delays.last())?;
        Some((self.retry_queue(stage, *delay), *delay))
    }

    fn retry_queue(&self, stage: Stage, delay: Duration) -> String {
        let ms = delay.as_millis();
        let label = if ms.is_multiple_of(1000) {
            format!("{}s", ms / 1000)
        } else {
            format!("{ms}ms")
        };
        format!("{}.retry.{label}", self.queue(stage))
    }

    /// The retry queues of a stage, shortest delay first.
    pub fn retry_queues(&self, stage: Stage) -> Vec<String> {
        self.retry_delays
            .iter()
            .map(|delay| self.retry_queue(stage, *delay))
            .collect()
    }

    pub fn pipeline(&self) -> &str {
        &self.pipeline
    }

    pub fn exchange(&self) -> String {
        self.namespace.clone()
    }

    pub fn dead_letter_exchange(&self) -> String {
        format!("{}.dlx", self.namespace)
    }

    pub fn routing_key(&self, stage: Stage) -> String {
        format!("{}.{stage}", self.pipeline)
    }

    pub fn queue(&self, stage: Stage) -> String {
        format!("{}.{}.{stage}", self.namespace, self.pipeline)
    }

    pub fn dead_letter_queue(&self, stage: Stage) -> String {
        format!("{}.dlq", self.queue(stage))
    }

    /// Every queue of the pipeline: work queues with their retry queues, then dead-letter queues.
    pub fn queues(&self) -> Vec<String> {
        let work = Stage::ALL
            .into_iter()
            .filter(|s| s.has_work_queue())
            .flat_map(|s| std::iter::once(self.queue(s)).chain(self.retry_queues(s)));
        let dead = Stage::ALL.into_iter().map(|s| self.dead_letter_queue(s));
        work.chain(dead).collect()
    }

    /// Declares exchanges, queues and bindings. Idempotent: every worker calls it at start, with the same
    /// arguments (a queue redeclared with other arguments is refused by the broker; the one exception,
    /// a dead-letter queue an earlier conveyor declared without its delivery limit, is taken as it is).
    ///
    /// Boxed, like the other checks of the topology: compiled once, here (docs/development.md,
    /// "Build time").
    pub fn declare<'a>(
        &'a self,
        connection: &'a Connection,
    ) -> BoxFuture<'a, Result<(), BrokerError>> {
        async move {
            let mut channel = reopen(connection).await?;
            let declared = answered(
                "declaring the topology",
                self.declare_on(connection, &mut channel),
            )
            .await;
            close_channel(&channel, "declared").await;
            declared
        }
        .boxed()
    }

    async fn declare_on(
        &self,
        connection: &Connection,
        channel: &mut Channel,
    ) -> Result<(), BrokerError> {
        let durable = ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        };
        for exchange in [self.exchange(), self.dead_letter_exchange()] {
            channel
                .exchange_declare(
                    exchange.as_str().into(),
                    ExchangeKind::Direct,
                    durable,
                    FieldTable::default(),
                )
                .await
                .map_err(amqp(format!("declaring exchange {exchange}")))?;
        }
        for stage in Stage::ALL {
            let dead_letters = self.dead_letter_queue(stage);
            self.declare_dead_letter_queue(connection, channel, &dead_letters)
                .await?;
            self.bind(channel, &dead_letters, &self.dead_letter_exchange(), stage)
                .await?;
            if stage.has_work_queue() {
                let work = self.queue(stage);
                let mut arguments = self.queue_arguments();
                arguments.insert(
                    "x-dead-letter-exchange".into(),
                    long_string(&self.dead_letter_exchange()),
                );
                arguments.insert(
                    "x-dead-letter-routing-key".into(),
                    long_string(&self.routing_key(stage)),
                );
                if self.queue_type == QueueType::Quorum {
                    arguments.insert(
                        "x-delivery-limit".into(),
                        AMQPValue::LongUInt(DELIVERY_LIMIT),
                    );
                }
                self.dead_letter_safely(&mut arguments);
                self.declare_queue(connection, channel, &work, arguments)
                    .await?;
                self.bind(channel, &work, &self.exchange(), stage).await?;
                for delay in self.retry_delays.clone() {
                    let mut arguments = self.queue_arguments();
                    arguments.insert(
                        "x-message-ttl".into(),
                        AMQPValue::LongUInt(u32::try_from(delay.as_millis()).unwrap_or(u32::MAX)),
                    );
                    // When the delay is over, the broker sends the message back to the work queue.
                    arguments.insert(
                        "x-dead-letter-exchange".into(),
                        long_string(&self.exchange()),
                    );
                    arguments.insert(
                        "x-dead-letter-routing-key".into(),
                        long_string(&self.routing_key(stage)),
                    );
                    self.dead_letter_safely(&mut arguments);
                    let queue = self.retry_queue(stage, delay);
                    self.declare_queue(connection, channel, &queue, arguments)
                        .await?;
                }
            }
        }
        Ok(())
    }

    /// Declares a dead-letter queue with [`DEAD_LETTER_DELIVERY_LIMIT`] (quorum queues). One declared by
    /// an earlier conveyor, without a limit, is refused so by the broker ("inequivalent arg"), which
    /// closes the channel: it is then taken as it is on a new channel, with a warning that says how to
    /// give it the limit.
    async fn declare_dead_letter_queue(
        &self,
        connection: &Connection,
        channel: &mut Channel,
        queue: &str,
    ) -> Result<(), BrokerError> {
        let mut arguments = self.queue_arguments();
        if self.queue_type == QueueType::Quorum {
            arguments.insert(
                "x-delivery-limit".into(),
                AMQPValue::LongUInt(DEAD_LETTER_DELIVERY_LIMIT),
            );
        }
        match self
            .declare_queue(connection, channel, queue, arguments)
            .await
        {
            Err(BrokerError::Amqp { cause, .. })
                if declared_without(&cause, "x-delivery-limit") =>
            {
                tracing::warn!(
                    queue,
                    "this dead-letter queue was declared by an earlier conveyor without a delivery limit: on \
                     RabbitMQ 4.0 to 4.2 a letter read 20 times (conveyorctl dlq) is dropped unless a policy gives \
                     it one (this warning stays while the queue keeps its old arguments), e.g. rabbitmqctl set_policy conveyor-dead-letters '\\.dlq$' \
                     '{{\"delivery-limit\":{DEAD_LETTER_DELIVERY_LIMIT}}}' --apply-to quorum_queues, or delete it \
                     once empty so that it is declared anew"
                );
                *channel = reopen(connection).await?;
                self.declare_queue(connection, channel, queue, self.queue_arguments())
                    .await
            }
            other => other,
        }
    }

    /// On quorum queues, the broker dead-letters with confirms inside itself, so nothing is lost on
    /// the way (at-least-once needs reject-publish overflow). Classic queues cannot.
    fn dead_letter_safely(&self, arguments: &mut FieldTable) {
        if self.queue_type == QueueType::Quorum {
            arguments.insert(
                "x-dead-letter-strategy".into(),
                long_string("at-least-once"),
            );
            arguments.insert("x-overflow".into(), long_string("reject-publish"));
        }
    }

    fn queue_arguments(&self) -> FieldTable {
        let mut arguments = FieldTable::default();
        let kind = match self.queue_type {
            QueueType::Quorum => "quorum",
            QueueType::Classic => "classic",
        };
        arguments.insert("x-queue-type".into(), long_string(kind));
        if self.queue_type == QueueType::Quorum {
            // Each new queue's leader goes to the node leading the fewest: a pipeline's queues are
            // spread over a cluster, whichever node the worker that declared them first is on.
            arguments.insert(LEADER_LOCATOR.into(), long_string("balanced"));
        }
        arguments
    }

    /// Declares a durable queue. One that an earlier conveyor declared without a leader locator is
    /// taken as it is (the locator only places a queue as it is created) on a new channel, since
    /// the broker closes the channel of a refused declaration.
    async fn declare_queue(
        &self,
        connection: &Connection,
        channel: &mut Channel,
        queue: &str,
        arguments: FieldTable,
    ) -> Result<(), BrokerError> {
        let options = QueueDeclareOptions {
            durable: true,
            ..Default::default()
        };
        let declared = channel
            .queue_declare(queue.into(), options, arguments.clone())
            .await;
        match declared {
            Err(source) if declared_without(&source, LEADER_LOCATOR) => {
                tracing::debug!(queue, "declared before leader locators: taken as it is");
                *channel = reopen(connection).await?;
                let mut without = FieldTable::default();
                for (key, value) in arguments.inner() {
                    if key.as_str() != LEADER_LOCATOR {
                        without.insert(key.clone(), value.clone());
                    }
                }
                channel
                    .queue_declare(queue.into(), options, without)
                    .await
                    .map_err(amqp(format!("declaring queue {queue}")))?;
            }
            other => {
                other.map_err(amqp(format!("declaring queue {queue}")))?;
            }
        }
        Ok(())
    }

    /// Whether the pipeline's queues are on the broker (its write stage's dead-letter queue, by
    /// passive declare on a channel of its own): tools say "no such pipeline" rather than the
    /// broker's NOT_FOUND.
    pub fn is_declared<'a>(
        &'a self,
        connection: &'a Connection,
    ) -> BoxFuture<'a, Result<bool, BrokerError>> {
        async move {
            let channel = reopen(connection).await?;
            let queue = self.dead_letter_queue(Stage::Write);
            match queue_depth(&channel, &queue).await {
                Ok(_) => {
                    close_channel(&channel, "checked").await;
                    Ok(true)
                }
                Err(err) if err.to_string().contains("NOT_FOUND") => Ok(false),
                Err(err) => Err(amqp(format!("inspecting queue {queue}"))(err)),
            }
        }
        .boxed()
    }

    /// Fails, naming the pipeline and the namespace, unless [`Topology::is_declared`].
    pub async fn require_declared(&self, connection: &Connection) -> Result<(), BrokerError> {
        if self.is_declared(connection).await? {
            return Ok(());
        }
        Err(BrokerError::NoPipeline {
            pipeline: self.pipeline.clone(),
            namespace: self.namespace.clone(),
        })
    }

    async fn bind(
        &self,
        channel: &Channel,
        queue: &str,
        exchange: &str,
        stage: Stage,
    ) -> Result<(), BrokerError> {
        channel
            .queue_bind(
                queue.into(),
                exchange.into(),
                self.routing_key(stage).as_str().into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(amqp(format!("binding queue {queue}")))
    }
}

/// The queue argument that places a quorum queue's leader.
const LEADER_LOCATOR: &str = "x-queue-leader-locator";

/// Whether a queue declaration was refused because the queue exists without `argument`.
fn declared_without(err: &lapin::Error, argument: &str) -> bool {
    let message = err.to_string();
    message.contains(&format!("inequivalent arg '{argument}'"))
        && message.contains("current is none")
}

/// A new channel: one for the topology, or after the broker closed one by refusing a declaration.
async fn reopen(connection: &Connection) -> Result<Channel, BrokerError> {
    connection
        .create_channel()
        .await
        .map_err(amqp("opening a channel to declare or inspect the topology"))
}

/// Messages ready in `queue`, by passive declare: an error if it does not exist (which also closes
/// `channel`, as the broker does on any failed declare).
pub async fn queue_depth(channel: &Channel, queue: &str) -> Result<u32, lapin::Error> {
    let options = QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    let declared = channel
        .queue_declare(queue.into(), options, FieldTable::default())
        .await?;
    Ok(declared.message_count())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_namespaced_per_pipeline_and_stage() {
        let topology = Topology::new(&BrokerArgs::local("ns"), "orders");
        assert_eq!(topology.queue(Stage::Write), "ns.orders.write");
        assert_eq!(
            topology.dead_letter_queue(Stage::Fetch),
            "ns.orders.fetch.dlq"
        );
        assert_eq!(topology.routing_key(Stage::Transform), "orders.transform");
        // 3 work queues with 5 retry tiers each, 3 dead-letter queues.
        assert_eq!(topology.queues().len(), 21);
        assert_eq!(
            topology.retry_tier(Stage::Write, 1).unwrap(),
            ("ns.orders.write.retry.1s".into(), Duration::from_secs(1))
        );
        assert_eq!(
            topology.retry_tier(Stage::Write, 99).unwrap().0,
            "ns.orders.write.retry.600s"
        );
        let fast = Topology::new(
            &BrokerArgs::local("ns").with_retry_delays_ms(vec![250]),
            "orders",
        );
        assert_eq!(
            fast.retry_tier(Stage::Transform, 1).unwrap().0,
            "ns.orders.transform.retry.250ms"
        );
        let none = Topology::new(&BrokerArgs::local("ns").with_retry_delays_ms(vec![]), "o");
        assert!(none.retry_tier(Stage::Write, 1).is_none());
    }
}
