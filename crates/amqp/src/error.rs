//! What can go wrong with the broker, written once: every lapin error is mapped here, with the action
//! that failed.

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("invalid AMQP URL (CONVEYOR_AMQP_URL): {0}")]
    Url(String),
    // lapin's error is shown in the message and not chained as a source: an `{:#}` would say it
    // twice, and its own IO cause a third time.
    #[error("cannot connect to RabbitMQ at {endpoint}: {cause}")]
    Connect {
        endpoint: String,
        cause: lapin::Error,
    },
    #[error("cannot connect to RabbitMQ at {endpoint}: {advice}")]
    Tls { endpoint: String, advice: String },
    /// The broker refuses the user, the password or the vhost: a setup error.
    #[error(
        "RabbitMQ at {endpoint} refuses the user, password or vhost of CONVEYOR_AMQP_URL: {message}"
    )]
    Refused { endpoint: String, message: String },
    #[error("cannot connect to RabbitMQ at {0}: no answer within 30 s")]
    ConnectTimeout(String),
    #[error("{action}: {cause}")]
    Amqp { action: String, cause: lapin::Error },
    #[error(
        "no pipeline {pipeline} in namespace {namespace} (CONVEYOR_NAMESPACE) on this broker: its queues are not declared (a wrong name or namespace, or none of its workers has started yet)"
    )]
    NoPipeline { pipeline: String, namespace: String },
    #[error("the broker cancelled the consumer of {0} (was the queue deleted?)")]
    ConsumerCancelled(String),
    #[error("the broker refused (nacked) a message published to {0}")]
    Nacked(String),
    #[error(
        "the broker did not confirm a message published to {destination} within {} s (a node hung, the cluster lost its majority, or an alarm of the broker blocks publishing?)",
        after.as_secs()
    )]
    NotConfirmed {
        destination: String,
        after: std::time::Duration,
    },
    #[error("{action}: no answer from the broker within {} s", after.as_secs())]
    NoAnswer {
        action: String,
        after: std::time::Duration,
    },
    #[error("the broker could not route a message published to {0}: no queue is bound")]
    Unroutable(String),
}

pub(crate) fn amqp(action: impl Into<String>) -> impl FnOnce(lapin::Error) -> BrokerError {
    let action = action.into();
    move |cause| BrokerError::Amqp { action, cause }
}

/// How long a broker operation that should take milliseconds may take: one that waits on queues
/// without their majority, or on a node that hung, gives up and lets the caller connect again.
pub(crate) const ANSWER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// `operation`, failed with [`BrokerError::NoAnswer`] after [`ANSWER_TIMEOUT`].
pub(crate) async fn answered<T>(
    action: &str,
    operation: impl std::future::Future<Output = Result<T, BrokerError>>,
) -> Result<T, BrokerError> {
    tokio::time::timeout(ANSWER_TIMEOUT, operation)
        .await
        .unwrap_or_else(|_| {
            Err(BrokerError::NoAnswer {
                action: action.to_owned(),
                after: ANSWER_TIMEOUT,
            })
        })
}
