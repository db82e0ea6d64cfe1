//! What can go wrong with the broker, written once: every lapin error is mapped here, with the action
//! that failed.

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

pub(crate) fn amqp(action: impl Into<String>) -> impl FnOnce(lapin::Error) -> BrokerError {
    let action = action.into();
    move |source| BrokerError::Amqp { action, source }
}
