//! A conveyor worker process: its settings, health endpoints, and the start and
//! reconnect loop every worker shares.

pub mod health;
pub mod settings;
pub mod worker;
