//! The HTTP target: writes records to another system's JSON write API, a record or a batch per call,
//! with a bounded number of calls in flight per writer process.
//!
//! Writes stay idempotent by the pipeline's id check: the target's own upsert (a 409 "already exists"
//! for one record counts as written; a 409 for a batch splits it), an idempotency-key header per
//! record, or an existence check before writing. Every answer and transport error is sorted into
//! transient (retry) or permanent (the data is at fault) in one place, [`class_of`] (with the pipeline
//! file's `[target.errors]` overrides) and [`classify_error`]. Calls that get no answer, or one saying
//! that the service is unavailable (429, 502, 503, 504), one after another make the target
//! unavailable, so that the writer's circuit breaker holds back instead of retrying, and at last
//! dead-lettering, good records. Credentials come from the environment and are never logged.

mod call;
mod classify;
mod id_check;
mod setup;
mod write;

pub use classify::{StatusClass, class_of, classify_error, classify_status, is_down};
pub use setup::{HttpArgs, HttpTarget, SetupError};

#[cfg(test)]
mod tests;
