//! The places records are written to. Every target writes idempotently: a record is keyed by its id,
//! and a version (modify time) never replaces a newer one.

pub mod http;
pub mod noop;
pub mod postgres;

use std::collections::BTreeMap;
use std::future::Future;

use conveyor_base::Record;
use conveyor_runtime::refusal::Checked;

/// The newest version of each id in a batch, in id order (so that concurrent writers meet rows in the
/// same order). Older versions in the same batch would only be overwritten.
pub fn newest_per_id(records: &[Record]) -> Vec<&Record> {
    let mut newest: BTreeMap<&str, &Record> = BTreeMap::new();
    for record in records {
        newest
            .entry(&record.id)
            .and_modify(|kept| {
                if record.modify_time > kept.modify_time {
                    *kept = record;
                }
            })
            .or_insert(record);
    }
    newest.into_values().collect()
}

/// What a write did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriteReport {
    /// Records inserted or updated.
    pub applied: u64,
    /// Records skipped because the target already held the same or a newer version.
    pub stale: u64,
}

/// Why a write failed, classified by whether trying again can help and how.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WriteError {
    /// The target cannot be reached at all (refused or broken connection, shutting down): every write
    /// would fail alike, so the writer holds back (circuit breaker) rather than retry each message.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// This write failed for now (a lock or serialization conflict, a timeout): retry it later.
    #[error("transient: {0}")]
    Transient(String),
    /// The data cannot be written as it is (constraint, type, value errors).
    #[error("permanent: {0}")]
    Permanent(String),
    /// The target refuses the writer's credentials (a token endpoint's 401, a write's 401 or 403): a
    /// setup error, no fault of the records. The writer holds every write back until they are
    /// accepted (`conveyor_runtime::refusal`).
    #[error("refused: {0}")]
    Refused(String),
}

/// A place records are written to. Every implementation writes idempotently: a record is keyed by
/// its id, and a version (modify time) never replaces a newer one. Each kind's spec is in
/// `conveyor_pipeline::target`; adding a kind is a spec there, an implementation here, and one arm in
/// [`crate::run`].
pub trait Target: Send + Sync + 'static {
    /// Writes a batch (a message's records), all or, on an error, possibly part of it: a retry writes
    /// it again, which idempotence makes harmless.
    fn write(
        &self,
        records: &[Record],
    ) -> impl Future<Output = Result<WriteReport, WriteError>> + Send;

    /// Writes a batch and, in the same commit, records in the ledger that the write stage settled
    /// message `message_id` with it: what a target that keeps the ledger's database does. Any other
    /// returns `None`, and the writer records the settlement once the write answered.
    fn write_settling<'a>(
        &'a self,
        _records: &'a [Record],
        _message_id: &'a str,
    ) -> impl Future<Output = Option<Result<WriteReport, WriteError>>> + Send + 'a {
        std::future::ready(None)
    }

    /// Whether the target answers (the circuit breaker's probe).
    fn ping(&self) -> impl Future<Output = bool> + Send;

    /// Whether the target accepts the writer's credentials, where that can be asked without writing
    /// (a token endpoint can): at start, and again while they are refused.
    fn check_credentials(&self) -> impl Future<Output = Checked> + Send {
        std::future::ready(Checked::Accepted)
    }
}
