//! Everything conveyor does with RabbitMQ. Durability needs three things together: durable (quorum)
//! queues ([`Topology`]), persistent messages ([`envelope`]) and publisher confirms ([`Publisher`]);
//! the [`consume`] loop acks a delivery only after what it asked for is durable.

mod connect;
pub mod consume;
pub mod dead_letters;
pub mod envelope;
mod error;
pub mod headers;
mod publish;
pub mod settings;
mod topology;

pub use connect::{BrokerAddress, Connected, close, connect, connect_after, endpoint};
pub use error::BrokerError;
pub use publish::{DEFAULT_CONFIRM_TIMEOUT, PendingConfirm, Publisher};
pub use topology::{DEAD_LETTER_DELIVERY_LIMIT, DELIVERY_LIMIT, Topology, queue_depth};
