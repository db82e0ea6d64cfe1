//! A conveyor worker process: its settings, logs, signals, health endpoints, and the start and
//! reconnect loop every worker shares.

pub mod health;
pub mod settings;
pub mod shutdown;
pub mod telemetry;
pub mod worker;
