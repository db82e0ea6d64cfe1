//! RabbitMQ: connecting, the topology every worker declares, and publishing with confirms.
//!
//! Durability needs three things together: durable (quorum) queues, persistent messages and publisher
//! confirms. [`Publisher`] awaits the broker's confirm of every message and treats a nack, or a message
//! the broker could not route, as a failed publish.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::tcp::{OwnedIdentity, OwnedTLSConfig};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::uri::{AMQPScheme, AMQPUri};
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ExchangeKind,
};
use tokio_util::sync::CancellationToken;

use crate::envelope::{Compression, long_string};
use crate::settings::{BrokerArgs, QueueType, Secret, SettingsError};
use crate::tls::{self, CaBundle, ClientIdentity};

/// A quorum queue dead-letters a message redelivered this often: a last guard against a message that
/// keeps crashing its consumer. (RabbitMQ 4 drops such messages unless a dead-letter exchange is set.)
pub const DELIVERY_LIMIT: u32 = 20;

/// The delivery limit of the dead-letter queues: more than any reading will reach. `conveyorctl dlq`
/// reads a letter by taking it and handing it back, and on RabbitMQ 4.0 to 4.2 every hand-back counts
/// as a delivery, so that the default limit of quorum queues (20) would drop a letter, with no
/// dead-letter exchange to catch it, after its twentieth reading. RabbitMQ 4 also takes -1 for no
/// limit; 3.x accepts -1 as well but documents no such meaning: a large number means the same on both.
pub const DEAD_LETTER_DELIVERY_LIMIT: u32 = i32::MAX as u32;

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("invalid AMQP URL (CONVEYOR_AMQP_URL): {0}")]
    Url(String),
    #[error("cannot connect to RabbitMQ at {endpoint}: {source}")]
    Connect {
        endpoint: String,
        source: lapin::Error,
    },
    #[error("cannot connect to RabbitMQ at {endpoint}: {advice}")]
    Tls { endpoint: String, advice: String },
    #[error("cannot connect to RabbitMQ at {0}: no answer within 30 s")]
    ConnectTimeout(String),
    #[error("{action}: {source}")]
    Amqp {
        action: String,
        source: lapin::Error,
    },
    #[error("the broker cancelled the consumer of {0} (was the queue deleted?)")]
    ConsumerCancelled(String),
    #[error("the broker refused (nacked) a message published to {0}")]
    Nacked(String),
    #[error("the broker could not route a message published to {0}: no queue is bound")]
    Unroutable(String),
}

fn amqp(action: impl Into<String>) -> impl FnOnce(lapin::Error) -> BrokerError {
    let action = action.into();
    move |source| BrokerError::Amqp { action, source }
}

/// Where the broker is and how to trust it: the URL(s), which carry the password, and the TLS
/// settings of `amqps://` connections. Neither is ever printed.
#[derive(Clone)]
pub struct BrokerAddress {
    url: Secret,
    tls: OwnedTLSConfig,
}

impl fmt::Debug for BrokerAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("BrokerAddress(***)")
    }
}

impl BrokerAddress {
    /// A broker whose `amqps://` certificate the public roots vouch for (or a plain `amqp://` one).
    pub fn new(url: Secret) -> Self {
        Self {
            url,
            tls: OwnedTLSConfig::default(),
        }
    }

    /// A broker trusted through `ca` too, with a client certificate for mutual TLS. TLS files with a
    /// plain `amqp://` URL are refused: the operator expects encryption that would not happen.
    pub fn with_tls(
        url: Secret,
        ca: Option<CaBundle>,
        identity: Option<ClientIdentity>,
    ) -> Result<Self, SettingsError> {
        if (ca.is_some() || identity.is_some())
            && broker_urls(&url).any(|one| !one.starts_with("amqps://"))
        {
            return Err(SettingsError::new(
                "CONVEYOR_AMQP_URL",
                "TLS files are set (CONVEYOR_AMQP_TLS_*), but a broker URL is not amqps://: that connection would not be encrypted",
            ));
        }
        Ok(Self {
            url,
            tls: OwnedTLSConfig {
                identity: identity.map(|identity| OwnedIdentity::PKCS8 {
                    pem: identity.cert_pem().to_vec(),
                    key: identity.key_pem().to_vec(),
                }),
                cert_chain: ca.map(|ca| ca.pem().to_owned()),
            },
        })
    }

    pub fn url(&self) -> &Secret {
        &self.url
    }
}

/// The brokers of a setting: one AMQP URL, or several separated by commas (the nodes of a cluster,
/// tried in order). A comma inside a URL must be percent-encoded (`%2C`).
fn broker_urls(url: &Secret) -> impl Iterator<Item = &str> {
    url.expose()
        .split(',')
        .map(str::trim)
        .filter(|one| !one.is_empty())
}

/// The host, port and vhost of each AMQP URL (comma-separated): what may be logged of them.
pub fn endpoint(url: &Secret) -> Result<String, BrokerError> {
    let mut shown = Vec::new();
    for one in broker_urls(url) {
        let uri = AMQPUri::from_str(one).map_err(BrokerError::Url)?;
        let scheme = match uri.scheme {
            AMQPScheme::AMQPS => "amqps://",
            AMQPScheme::AMQP => "",
        };
        shown.push(format!(
            "{scheme}{}:{}/{}",
            uri.authority.host, uri.authority.port, uri.vhost
        ));
    }
    if shown.is_empty() {
        return Err(BrokerError::Url("no broker address given".into()));
    }
    Ok(shown.join(","))
}

/// Connects once, to the first of the brokers (comma-separated URLs) that answers; fails with the
/// last broker's error. `name` shows in the broker's connection list.
pub async fn connect(address: &BrokerAddress, name: &str) -> Result<Connection, BrokerError> {
    // Every URL is checked before any is tried, so a typo fails at once rather than at failover.
    endpoint(&address.url)?;
    let mut last_error = None;
    for one in broker_urls(&address.url) {
        match connect_one(one, &address.tls, name).await {
            Ok(connection) => return Ok(connection),
            Err(err) => {
                tracing::debug!(error = %err, "broker not reachable, trying the next");
                last_error = Some(err);
            }
        }
    }
    Err(last_error.expect("endpoint() proved there is at least one URL"))
}

async fn connect_one(
    url: &str,
    tls: &OwnedTLSConfig,
    name: &str,
) -> Result<Connection, BrokerError> {
    let endpoint = endpoint(&Secret::new(url))?;
    let properties = ConnectionProperties::default().with_connection_name(name.to_owned().into());
    let runtime = lapin::runtime::default_runtime().map_err(|source| BrokerError::Connect {
        endpoint: endpoint.clone(),
        source,
    })?;
    // A broker that takes the TCP connection but never finishes the handshake (still starting, or
    // overloaded) must not hold a worker forever: give up and let the caller retry.
    let connecting = Connection::connect_with_config(url, properties, tls.clone(), runtime);
    match tokio::time::timeout(CONNECT_TIMEOUT, connecting).await {
        Ok(Ok(connection)) => Ok(connection),
        Ok(Err(source)) => match tls::tls_failure(&source) {
            Some(failure) => Err(BrokerError::Tls {
                endpoint,
                advice: tls::advice(failure, "CONVEYOR_AMQP_TLS_CA_FILE"),
            }),
            None => Err(BrokerError::Connect { endpoint, source }),
        },
        Err(_) => Err(BrokerError::ConnectTimeout(endpoint)),
    }
}

/// The longest a connection attempt (TCP and AMQP handshake) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// Connects, retrying with backoff until connected or `shutdown` fires (then `None`). A wrong URL
/// and a TLS failure (a certificate not trusted, a client certificate refused) are not retried:
/// waiting does not fix a configuration.
pub async fn connect_with_retry(
    address: &BrokerAddress,
    name: &str,
    shutdown: &CancellationToken,
) -> Result<Option<Connection>, BrokerError> {
    let mut delay = Duration::from_millis(250);
    loop {
        match connect(address, name).await {
            Ok(connection) => return Ok(Some(connection)),
            Err(err @ (BrokerError::Url(_) | BrokerError::Tls { .. })) => return Err(err),
            Err(err) => {
                tracing::warn!(error = %err, retry_in_ms = delay.as_millis() as u64, "broker not reachable")
            }
        }
        tokio::select! {
            () = shutdown.cancelled() => return Ok(None),
            () = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(Duration::from_secs(10));
    }
}

/// A stage of a pipeline: each has a work queue (fed by the stage before) and a dead-letter queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stage {
    Fetch,
    Transform,
    Write,
}

impl Stage {
    pub const ALL: [Stage; 3] = [Stage::Fetch, Stage::Transform, Stage::Write];

    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Fetch => "fetch",
            Stage::Transform => "transform",
            Stage::Write => "write",
        }
    }

    /// Whether the stage consumes a work queue (all do: the fetcher's holds modify-time windows).
    pub fn has_work_queue(self) -> bool {
        true
    }

    /// Whether the stage's messages carry records. The fetch stage's carry modify-time windows (work
    /// items): the records it fetches enter the pipeline at the transform queue, and the accounting
    /// (`conveyor_records_settled_total`, `conveyorctl status`) starts there.
    pub fn carries_records(self) -> bool {
        self != Stage::Fetch
    }
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

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
            compression: broker.compress_from_bytes,
        }
    }

    /// Which message bodies are published compressed.
    pub fn compression(&self) -> Compression {
        self.compression
    }

    /// The namespace: the prefix of every exchange and queue name.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The delays of the retry tiers, shortest first.
    pub fn retry_delays(&self) -> &[Duration] {
        &self.retry_delays
    }

    /// The retry queue of `stage` for a message retried for the `retry`-th time (1 for the first
    /// retry), with its delay; `None` when no tiers are configured.
    pub fn retry_tier(&self, stage: Stage, retry: u32) -> Option<(String, Duration)> {
        let last = self.retry_delays.len().checked_sub(1)?;
        let tier = (retry.max(1) as usize - 1).min(last);
        let delay = self.retry_delays[tier];
        Some((self.retry_queue(stage, delay), delay))
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
    pub async fn declare(&self, connection: &Connection) -> Result<(), BrokerError> {
        let mut channel = connection
            .create_channel()
            .await
            .map_err(amqp("opening a channel to declare the topology"))?;
        let declared = self.declare_on(connection, &mut channel).await;
        let _ = tokio::time::timeout(
            Duration::from_secs(5),
            channel.close(200, "declared".into()),
        )
        .await;
        declared
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
                self.declare_queue(channel, &work, arguments).await?;
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
                    self.declare_queue(channel, &self.retry_queue(stage, delay), arguments)
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
        match self.declare_queue(channel, queue, arguments).await {
            Err(BrokerError::Amqp { source, .. }) if declared_without_delivery_limit(&source) => {
                tracing::warn!(
                    queue,
                    "this dead-letter queue was declared by an earlier conveyor without a delivery limit: on \
                     RabbitMQ 4.0 to 4.2 a letter read 20 times (conveyorctl dlq) is dropped unless a policy gives \
                     it one (this warning stays while the queue keeps its old arguments), e.g. rabbitmqctl set_policy conveyor-dead-letters '\\.dlq$' \
                     '{{\"delivery-limit\":{DEAD_LETTER_DELIVERY_LIMIT}}}' --apply-to quorum_queues, or delete it \
                     once empty so that it is declared anew"
                );
                *channel = connection
                    .create_channel()
                    .await
                    .map_err(amqp("opening a channel to declare the topology"))?;
                self.declare_queue(channel, queue, self.queue_arguments())
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
        arguments
    }

    async fn declare_queue(
        &self,
        channel: &Channel,
        queue: &str,
        arguments: FieldTable,
    ) -> Result<(), BrokerError> {
        let options = QueueDeclareOptions {
            durable: true,
            ..Default::default()
        };
        channel
            .queue_declare(queue.into(), options, arguments)
            .await
            .map_err(amqp(format!("declaring queue {queue}")))?;
        Ok(())
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

/// Whether a queue declaration was refused because the queue exists without `x-delivery-limit`.
fn declared_without_delivery_limit(err: &lapin::Error) -> bool {
    let message = err.to_string();
    message.contains("inequivalent arg 'x-delivery-limit'") && message.contains("current is none")
}

/// Publishes on a channel in confirm mode. Cheap to clone; many publishes may be in flight at once.
#[derive(Clone)]
pub struct Publisher {
    channel: Channel,
}

/// A publish the broker has not confirmed yet.
#[must_use = "a publish is not durable until its confirm is awaited"]
pub struct PendingConfirm {
    confirm: lapin::PublisherConfirm,
    destination: String,
}

impl Publisher {
    pub async fn open(connection: &Connection) -> Result<Self, BrokerError> {
        let channel = connection
            .create_channel()
            .await
            .map_err(amqp("opening a publishing channel"))?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(amqp("enabling publisher confirms"))?;
        Ok(Self { channel })
    }

    /// Sends a message (mandatory: an unroutable message is an error, not a silent drop). Await the
    /// returned confirm before treating the message as durable.
    pub async fn send(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<PendingConfirm, BrokerError> {
        let destination = format!("exchange {exchange:?} key {routing_key:?}");
        let options = BasicPublishOptions {
            mandatory: true,
            ..Default::default()
        };
        let confirm = self
            .channel
            .basic_publish(
                ShortString::from(exchange),
                ShortString::from(routing_key),
                options,
                body,
                properties,
            )
            .await
            .map_err(amqp(format!("publishing to {destination}")))?;
        Ok(PendingConfirm {
            confirm,
            destination,
        })
    }

    /// Sends and waits for the broker's confirm.
    pub async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<(), BrokerError> {
        self.send(exchange, routing_key, body, properties)
            .await?
            .wait()
            .await
    }
}

impl PendingConfirm {
    /// Waits for the broker: Ok only for an ack of a routed message.
    pub async fn wait(self) -> Result<(), BrokerError> {
        let confirmation = self.confirm.await.map_err(amqp(format!(
            "awaiting the confirm from {}",
            self.destination
        )))?;
        match confirmation {
            Confirmation::Ack(None) => Ok(()),
            Confirmation::Ack(Some(_returned)) => Err(BrokerError::Unroutable(self.destination)),
            Confirmation::Nack(_) => Err(BrokerError::Nacked(self.destination)),
            Confirmation::NotRequested => {
                unreachable!("publisher channels are always in confirm mode")
            }
        }
    }
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

/// Closes a connection without hanging: lapin's close has been seen to take minutes.
pub async fn close(connection: &Connection) {
    let closing = connection.close(200, "worker stopping".into());
    match tokio::time::timeout(Duration::from_secs(5), closing).await {
        Ok(Ok(())) => {}
        Ok(Err(err)) => tracing::debug!(error = %err, "closing the broker connection"),
        Err(_) => tracing::warn!("closing the broker connection timed out"),
    }
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

    #[test]
    fn endpoint_hides_credentials() {
        let url = Secret::new("amqp://user:hunter2@broker.example:5673/prod");
        let shown = endpoint(&url).unwrap();
        assert_eq!(shown, "broker.example:5673/prod");
        let several = Secret::new("amqp://u:hunter2@a:5672/%2f, amqp://u:hunter2@b:5673/%2f");
        assert_eq!(endpoint(&several).unwrap(), "a:5672//,b:5673//");
        assert!(endpoint(&Secret::new(" , ")).is_err());
        assert!(endpoint(&Secret::new("amqp://a:5672/%2f,nonsense://")).is_err());
    }
}
