//! Publishing with confirms: [`Publisher`] awaits the broker's confirm of every message and treats a
//! nack, or a message the broker could not route, as a failed publish.

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::ShortString;
use lapin::{BasicProperties, Channel, Confirmation, Connection};

use crate::error::{BrokerError, amqp};

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
