//! conveyor's shared vocabulary: what every crate of it speaks, with no broker, database or script
//! engine behind it. Everything else points down to here.

pub mod backoff;
pub mod json;
pub mod ledger;
pub mod metrics;
mod outcome;
mod record;
mod setting;
pub mod shutdown;
pub mod source;
pub mod source_time;
mod sql;
mod stage;
pub mod telemetry;
pub mod tls;
pub mod waiting;

pub use outcome::{Disposition, ErrorClass, Failure};
pub use record::Record;
pub use setting::{Secret, SettingsError};
pub use sql::is_sql_identifier;
pub use stage::Stage;
