//! How a pipeline is synced, whatever its source: the engine's own settings.

use std::time::Duration;

use chrono::{DateTime, FixedOffset};
use conveyor_pipeline::SourceSpec;

/// How a pipeline is synced, whatever its source: the sync's part of the pipeline file's `[source]`.
#[derive(Debug, Clone)]
pub struct SyncSettings {
    /// Where the first sync starts; later syncs go on from the stored watermark.
    pub start_time: DateTime<FixedOffset>,
    /// Width of one window.
    pub window: Duration,
    /// Windows end this long before now.
    pub lag: Duration,
    /// Each plan goes this far back before where the last one ended.
    pub overlap: Duration,
    /// A window holding more rows than this is split in two.
    pub max_window_rows: u64,
    /// Records of consecutive pages gathered into one message.
    pub records_per_message: usize,
    /// The row field that identifies a record.
    pub id_field: String,
    /// The row field with the record's last modification time.
    pub modify_time_field: String,
}

impl SyncSettings {
    pub fn of(spec: &SourceSpec) -> Self {
        Self {
            start_time: spec.start_time,
            window: Duration::from_secs(spec.window_secs),
            lag: Duration::from_secs(spec.lag_secs),
            overlap: Duration::from_secs(spec.overlap_secs),
            max_window_rows: spec.max_window_rows,
            records_per_message: spec.records_per_message as usize,
            id_field: spec.id_field.clone(),
            modify_time_field: spec.modify_time_field.clone(),
        }
    }
}
