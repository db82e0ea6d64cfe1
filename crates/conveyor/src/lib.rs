//! The conveyor binaries (each a few lines over the stage libraries and
//! `conveyor_runtime::process`), and `conveyorctl`'s command line.

/// Every conveyor binary allocates through mimalloc (see the workspace's Cargo.toml for why).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

pub mod ctl;
pub mod dlq;
pub mod reconcile;
pub mod status;

use chrono::{DateTime, Utc};

/// A time as the commands' `--since`, `--until` and windows take it, with what is expected when it
/// is not one.
pub(crate) fn rfc3339(given: &str) -> Result<DateTime<Utc>, String> {
    DateTime::parse_from_rfc3339(given)
        .map(|time| time.with_timezone(&Utc))
        .map_err(|err| {
            format!(
                "{given:?} is not a time ({err}): expected an RFC 3339 time, such as 2026-01-31T08:00:00+08:00 or 2026-01-31T00:00:00Z"
            )
        })
}
