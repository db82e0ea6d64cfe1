//! Runs conveyor's workers as real processes against the simulator, RabbitMQ and PostgreSQL, and checks
//! the target against the simulator's ground truth. The demo, the end-to-end tests and the benchmarks
//! stand on it.

pub mod browser;
pub mod own_broker;
pub mod own_cluster;
pub mod own_postgres;
mod ports;
mod process;
pub mod proxy;
mod scenario;
mod services;
pub mod tls;

pub use ports::free_port;
pub use process::{Worker, WorkerProcess, stop_all};
pub use scenario::{Comparison, RETRY_DELAYS_MS, Scenario};
pub use services::{AmqpTlsFiles, DEFAULT_PG_URL, Services, pg_client};
