//! The pipeline file's `[target]`: where records go. Each kind owns its spec and its checks in a file
//! of its own; the writer implements each kind (`conveyor_writer::target`). Adding a target is a spec
//! here, a variant below, and its implementation there.

use std::path::Path;

use serde::Deserialize;

pub mod http;
pub mod postgres;

pub use http::HttpTargetSpec;
pub use postgres::PostgresTargetSpec;

/// Where records go, by `kind`.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum TargetSpec {
    /// Upsert into a PostgreSQL table created by the pipeline's migrations.
    Postgres(PostgresTargetSpec),
    /// Write to a JSON write API (another system's), with an id check.
    Http(HttpTargetSpec),
    /// Write nowhere (写入空操作): accept and count.
    Noop(NoopTargetSpec),
}

/// A no-op target takes no settings: a key under it is a mistake (a target meant to be another
/// kind, or a setting misplaced), refused rather than ignored.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NoopTargetSpec {}

impl TargetSpec {
    /// Checks what can be checked without a network, and anchors relative paths at `base` (the
    /// pipeline file's directory): (field, problem).
    pub fn check(&mut self, base: &Path) -> Result<(), (String, String)> {
        match self {
            TargetSpec::Postgres(spec) => spec.check(base),
            TargetSpec::Http(spec) => spec.check(),
            TargetSpec::Noop(_) => Ok(()),
        }
    }
}
