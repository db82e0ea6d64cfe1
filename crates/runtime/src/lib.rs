//! A conveyor worker process: its settings, its health endpoints, the host of its pipelines, and the
//! reconnect loop every worker shares.

pub mod health;
pub mod host;
pub mod process;
pub mod refusal;
pub mod settings;
pub mod worker;
