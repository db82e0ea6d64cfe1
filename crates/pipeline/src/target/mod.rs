//! The pipeline file's `[target]`: where records go. Each kind owns its spec and its checks in a file
//! of its own; the writer implements each kind (`conveyor_writer::target`). Adding a target is a spec
//! here, a variant below, and its implementation there.

use std::path::Path;

use serde::Deserialize;
use serde::de::{DeserializeOwned, IgnoredAny};

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

/// The `kind` key of a target's spec. Serde takes it off before the spec is read, except when an error
/// is located ([`locate_error`]): then the section is read as its kind's spec, key and all.
pub(crate) type Tag = Option<IgnoredAny>;

/// The exact key and line of the error in `text`'s `[target]`: serde reports any error inside a
/// tagged enum at the section itself, so the section is read again as its kind's own spec. `None` if
/// the kind is not one of the known ones (that error is serde's own, and exact).
pub(crate) fn locate_error(text: &str) -> Option<(String, String)> {
    #[derive(Deserialize)]
    struct KindOf {
        target: Kind,
    }
    #[derive(Deserialize)]
    struct Kind {
        kind: String,
    }
    #[derive(Deserialize)]
    struct Only<T> {
        #[serde(rename = "target")]
        _target: T,
    }
    fn again<T: DeserializeOwned>(text: &str) -> Option<(String, String)> {
        let deserializer = toml::Deserializer::parse(text).ok()?;
        let err = serde_path_to_error::deserialize::<_, Only<T>>(deserializer).err()?;
        Some((
            err.path().to_string(),
            crate::describe(text, &err.into_inner()),
        ))
    }
    let kind: KindOf = toml::from_str(text).ok()?;
    match kind.target.kind.as_str() {
        "postgres" => again::<PostgresTargetSpec>(text),
        "http" => again::<HttpTargetSpec>(text),
        "noop" => {
            let key = crate::keys_of(text, "target")?
                .into_iter()
                .find(|key| key != "kind")?;
            let field = format!("target.{key}");
            let line = crate::line_of(text, &field)?;
            Some((
                field,
                format!("unknown field `{key}`: a noop target takes no settings (line {line})"),
            ))
        }
        _ => None,
    }
}

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
