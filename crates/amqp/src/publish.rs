//! Publishing with confirms: [`Publisher`] awaits the broker's confirm of every message and treats a
//! nack, a message the broker could not route, or a confirm that does not come in time, as a failed
//! publish.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::ShortString;
use lapin::{BasicProperties, Channel, Confirmation, Connection};
use tokio_util::sync::CancellationToken;

use crate::error::{BrokerError, amqp};

/// Publishes on a channel in confirm mode. Cheap to clone; many publishes may be in flight at once.
///
/// A publisher that owns a share of its connection ([`Publisher::renewable`]) moves to a new channel
/// after the broker nacked one of its publishes: a channel opened while a quorum queue elected its
/// leader anew had every later publish nacked for as long as it lived (RabbitMQ 3.10 cluster, a
/// node killed), while a new channel published at once.
///
/// A broker that has a message but cannot store it (a cluster without its majority) withholds the
/// confirm rather than refusing it, and a hung node never answers: a confirm not come within the
/// confirm timeout fails the publish, and marks the publisher [`Publisher::stalled`].
#[derive(Clone)]
pub struct Publisher {
    channel: Arc<Mutex<Channel>>,
    /// Set by a nack: the next send opens a new channel first.
    suspect: Arc<AtomicBool>,
    connection: Option<Arc<Connection>>,
    confirm_timeout: Duration,
    stalled: CancellationToken,
}

/// How long a confirm is awaited unless [`Publisher::with_confirm_timeout`] says otherwise.
pub const DEFAULT_CONFIRM_TIMEOUT: Duration = Duration::from_secs(15);

/// A publish the broker has not confirmed yet.
#[must_use = "a publish is not durable until its confirm is awaited"]
pub struct PendingConfirm {
    confirm: lapin::PublisherConfirm,
    destination: String,
    suspect: Arc<AtomicBool>,
    timeout: Duration,
    stalled: CancellationToken,
}

async fn confirm_channel(connection: &Connection) -> Result<Channel, BrokerError> {
    let channel = connection
        .create_channel()
        .await
        .map_err(amqp("opening a publishing channel"))?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(amqp("enabling publisher confirms"))?;
    Ok(channel)
}

impl Publisher {
    pub async fn open(connection: &Connection) -> Result<Self, BrokerError> {
        Ok(Self {
            channel: Arc::new(Mutex::new(confirm_channel(connection).await?)),
            suspect: Arc::default(),
            connection: None,
            confirm_timeout: DEFAULT_CONFIRM_TIMEOUT,
            stalled: CancellationToken::new(),
        })
    }

    /// Fails a publish whose confirm has not come within `timeout`.
    pub fn with_confirm_timeout(mut self, timeout: Duration) -> Self {
        self.confirm_timeout = timeout;
        self
    }

    /// Fires once a confirm did not come in time: the broker behind this publisher's connection is
    /// not storing messages, and whoever owns the connection should stop taking work on it.
    pub fn stalled(&self) -> CancellationToken {
        self.stalled.clone()
    }

    /// A publisher that moves to a new channel of `connection` after a nack.
    pub async fn renewable(connection: Arc<Connection>) -> Result<Self, BrokerError> {
        let mut publisher = Self::open(&connection).await?;
        publisher.connection = Some(connection);
        Ok(publisher)
    }

    /// The channel to publish on: a new one if the last was nacked and a new one can be had.
    async fn channel(&self) -> Result<Channel, BrokerError> {
        if let Some(connection) = &self.connection
            && self.suspect.swap(false, Ordering::AcqRel)
        {
            let fresh = confirm_channel(connection).await?;
            let old = std::mem::replace(
                &mut *self.channel.lock().expect("no panics while locked"),
                fresh,
            );
            tracing::info!("the broker nacked a publish: publishing on a new channel");
            // Publishes still in flight on the old channel keep their confirms until it closes.
            tokio::spawn(async move {
                tokio::time::sleep(std::time::Duration::from_secs(30)).await;
                let _ = old.close(200, "replaced after a nack".into()).await;
            });
        }
        Ok(self.channel.lock().expect("no panics while locked").clone())
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
            .channel()
            .await?
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
            suspect: self.suspect.clone(),
            timeout: self.confirm_timeout,
            stalled: self.stalled.clone(),
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
    /// Waits for the broker: Ok only for an ack of a routed message, come within the confirm timeout.
    /// A publish that timed out may still have been stored: it is sent again, and the duplicate is
    /// absorbed downstream as every redelivery is.
    pub async fn wait(self) -> Result<(), BrokerError> {
        let Ok(confirmation) = tokio::time::timeout(self.timeout, self.confirm).await else {
            self.stalled.cancel();
            return Err(BrokerError::NotConfirmed {
                destination: self.destination,
                after: self.timeout,
            });
        };
        let confirmation = confirmation.map_err(amqp(format!(
            "awaiting the confirm from {}",
            self.destination
        )))?;
        match confirmation {
            Confirmation::Ack(None) => Ok(()),
            Confirmation::Ack(Some(_returned)) => Err(BrokerError::Unroutable(self.destination)),
            Confirmation::Nack(_) => {
                self.suspect.store(true, Ordering::Release);
                Err(BrokerError::Nacked(self.destination))
            }
            Confirmation::NotRequested => {
                unreachable!("publisher channels are always in confirm mode")
            }
        }
    }
}
