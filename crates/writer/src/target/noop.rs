//! The no-op target (写入空操作): accepts every record, counts it, writes nowhere. For pipelines that only
//! fetch, and for measuring the pipeline without a target.

use std::sync::atomic::{AtomicU64, Ordering};

use conveyor_base::Record;

use super::WriteReport;

#[derive(Debug, Default)]
pub struct NoopTarget {
    accepted: AtomicU64,
}

impl NoopTarget {
    pub fn write(&self, records: &[Record]) -> WriteReport {
        self.accepted
            .fetch_add(records.len() as u64, Ordering::Relaxed);
        WriteReport {
            applied: records.len() as u64,
            stale: 0,
        }
    }

    /// Records accepted since start.
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }
}
