//! The stages of a pipeline, the vocabulary of queues, metrics and the operator's tools.

use std::fmt;

/// A stage of a pipeline: each has a work queue (fed by the stage before) and a dead-letter queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stage {
    Fetch,
    Transform,
    Write,
}

impl Stage {
    pub const ALL: [Stage; 3] = [Stage::Fetch, Stage::Transform, Stage::Write];

    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Fetch => "fetch",
            Stage::Transform => "transform",
            Stage::Write => "write",
        }
    }

    /// Whether the stage consumes a work queue (all do: the fetcher's holds modify-time windows).
    pub fn has_work_queue(self) -> bool {
        true
    }

    /// Whether the stage's messages carry records. The fetch stage's carry modify-time windows (work
    /// items): the records it fetches enter the pipeline at the transform queue, and the accounting
    /// (`conveyor_records_settled_total`, `conveyorctl status`) starts there.
    pub fn carries_records(self) -> bool {
        self != Stage::Fetch
    }
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
