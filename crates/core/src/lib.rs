//! What every conveyor worker shares: settings and secrets, the pipeline file, the message envelope,
//! the broker (connection, topology, confirmed publishing, the consume loop), telemetry, metrics,
//! the health endpoints and shutdown.

pub mod broker;
pub mod consume;
pub mod dead_letters;
pub mod envelope;
pub mod health;
pub mod http_target;
pub mod json;
pub mod mapping;
pub mod metrics;
pub mod pipeline;
pub mod postgres;
pub mod runtime;
pub mod settings;
pub mod shutdown;
pub mod source_time;
pub mod telemetry;
pub mod tls;
