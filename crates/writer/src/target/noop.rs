//! The no-op target (写入空操作): accepts every record, counts it, writes nowhere. For pipelines that only
//! fetch, and for measuring the pipeline without a target.

use std::sync::atomic::{AtomicU64, Ordering};

use conveyor_base::Record;

use super::{Target, WriteError, WriteReport};

#[derive(Debug, Default)]
pub struct NoopTarget {
    accepted: AtomicU64,
}

impl Target for NoopTarget {
    async fn write(&self, records: &[Record]) -> Result<WriteReport, WriteError> {
        self.accepted
            .fetch_add(records.len() as u64, Ordering::Relaxed);
        Ok(WriteReport {
            applied: records.len() as u64,
            stale: 0,
        })
    }

    async fn ping(&self) -> bool {
        true
    }
}

impl NoopTarget {
    /// Records accepted since start.
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }
}
