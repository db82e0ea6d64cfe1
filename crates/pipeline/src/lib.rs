//! The pipeline file: one integration scheme (方案) — a source object, a mapping, a target.
//!
//! A pipeline file holds no addresses and no secrets; those come from the environment. Loading checks
//! everything that can be checked without a network, and every error names the file, the field and the
//! problem, so `conveyorctl check` and every worker refuse a bad file with the same words.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use chrono::{DateTime, FixedOffset};
use serde::Deserialize;

use crate::mapping::{Mapping, TransformSpec};

pub mod mapping;
pub mod target;

pub use target::TargetSpec;

/// The largest page the Kingdee gateway serves; larger requests are silently capped by it.
pub const MAX_PAGE_SIZE: u32 = 100;

/// A pipeline file as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineSpec {
    /// The pipeline's name: part of queue names and a metrics label. Lowercase letters, digits, `_`, `-`.
    pub name: String,
    pub source: SourceSpec,
    pub transform: TransformSpec,
    pub target: TargetSpec,
}

/// Where records come from.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceSpec {
    pub kind: SourceKind,
    /// The list endpoint's path, e.g. `/jdy/v2/scm/sal_order`.
    pub path: String,
    /// Rows per list call; at most 100.
    #[serde(default = "default_page_size")]
    pub page_size: u32,
    /// The row field that identifies a record at the source.
    #[serde(default = "default_id_field")]
    pub id_field: String,
    /// The row field with the record's last modification time.
    #[serde(default = "default_modify_time_field")]
    pub modify_time_field: String,
    /// Extra query parameters of every list call (e.g. `bill_status = "C"`).
    #[serde(default)]
    pub query: BTreeMap<String, String>,
    /// Where the first sync starts (RFC 3339); later syncs go on from the stored watermark.
    pub start_time: DateTime<FixedOffset>,
    /// Width of one modify-time window, the unit of work fetchers share.
    #[serde(default = "default_window_secs")]
    pub window_secs: u64,
    /// Windows end this long before now, so that rows still being written at the source are left for
    /// the next sync.
    #[serde(default = "default_lag_secs")]
    pub lag_secs: u64,
    /// Each sync goes this far back before where the last one ended, for rows that became visible late.
    #[serde(default = "default_overlap_secs")]
    pub overlap_secs: u64,
    /// A window holding more rows than this is split in two, so that no window pages for long.
    #[serde(default = "default_max_window_rows")]
    pub max_window_rows: u64,
    /// Calls per minute allowed for the account set, shared by every fetcher process.
    #[serde(default = "default_calls_per_minute")]
    pub calls_per_minute: u32,
    /// Records of consecutive pages of a window gathered into one message. Each message costs the
    /// broker, the transformer and the writer a fixed share of work (about 1.2 ms of CPU on the
    /// development machine), so fewer, larger ones cost less per record; a page is never split.
    #[serde(default = "default_records_per_message")]
    pub records_per_message: u32,
}

/// The most records a message may gather (`source.records_per_message`).
pub const MAX_RECORDS_PER_MESSAGE: u32 = 10_000;

fn default_records_per_message() -> u32 {
    300
}

fn default_window_secs() -> u64 {
    24 * 3600
}

fn default_lag_secs() -> u64 {
    60
}

fn default_overlap_secs() -> u64 {
    300
}

fn default_max_window_rows() -> u64 {
    20_000
}

fn default_calls_per_minute() -> u32 {
    500
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SourceKind {
    /// Kingdee Cloud Xingchen V2 open API.
    Kingdee,
}

fn default_page_size() -> u32 {
    MAX_PAGE_SIZE
}

fn default_id_field() -> String {
    "id".to_owned()
}

fn default_modify_time_field() -> String {
    "modify_time".to_owned()
}

/// A loaded, checked pipeline.
#[derive(Debug, Clone)]
pub struct Pipeline {
    pub file: PathBuf,
    pub spec: PipelineSpec,
    pub mapping: Mapping,
}

/// Why a pipeline file was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct PipelineError {
    pub file: PathBuf,
    /// Dotted path of the offending field; empty when the file as a whole is at fault.
    pub field: String,
    pub problem: String,
}

impl fmt::Display for PipelineError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "pipeline file {}: ", self.file.display())?;
        if !self.field.is_empty() {
            write!(f, "field `{}`: ", self.field)?;
        }
        f.write_str(&self.problem)
    }
}

impl Pipeline {
    /// Reads and checks a pipeline file.
    pub fn load(file: impl AsRef<Path>) -> Result<Self, PipelineError> {
        let file = file.as_ref();
        let text = std::fs::read_to_string(file).map_err(|err| PipelineError {
            file: file.to_owned(),
            field: String::new(),
            problem: format!("cannot read: {err}"),
        })?;
        Self::parse(file, &text)
    }

    /// Checks a pipeline given as text; `file` names it in errors and anchors relative paths.
    pub fn parse(file: &Path, text: &str) -> Result<Self, PipelineError> {
        let error = |field: &str, problem: String| PipelineError {
            file: file.to_owned(),
            field: field.to_owned(),
            problem,
        };
        let deserializer =
            toml::Deserializer::parse(text).map_err(|err| error("", describe(text, &err)))?;
        let mut spec: PipelineSpec =
            serde_path_to_error::deserialize(deserializer).map_err(|err| {
                let field = err.path().to_string();
                let field = if field == "." { String::new() } else { field };
                error(&field, describe(text, &err.into_inner()))
            })?;

        if spec.name.is_empty()
            || !spec
                .name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
        {
            return Err(error(
                "name",
                "must be lowercase letters, digits, '_' or '-'".into(),
            ));
        }
        if !spec.source.path.starts_with('/') {
            return Err(error("source.path", "must start with '/'".into()));
        }
        if !(1..=MAX_PAGE_SIZE).contains(&spec.source.page_size) {
            return Err(error(
                "source.page_size",
                format!(
                    "must be 1 to {MAX_PAGE_SIZE}: the gateway silently caps larger pages, which loses rows"
                ),
            ));
        }
        let source = &spec.source;
        if source.window_secs == 0 {
            return Err(error("source.window_secs", "must be at least 1".into()));
        }
        if source.calls_per_minute == 0 {
            return Err(error(
                "source.calls_per_minute",
                "must be at least 1".into(),
            ));
        }
        if !(1..=MAX_RECORDS_PER_MESSAGE).contains(&source.records_per_message) {
            return Err(error(
                "source.records_per_message",
                format!("must be 1 to {MAX_RECORDS_PER_MESSAGE}"),
            ));
        }
        if source.max_window_rows < u64::from(source.page_size) {
            return Err(error(
                "source.max_window_rows",
                "must be at least source.page_size".into(),
            ));
        }
        let mapping = Mapping::compile(&spec.transform).map_err(|p| error(&p.field, p.problem))?;
        let base = file.parent().unwrap_or(Path::new("."));
        spec.target
            .check(base)
            .map_err(|(field, problem)| error(&field, problem))?;
        Ok(Self {
            file: file.to_owned(),
            spec,
            mapping,
        })
    }

    pub fn name(&self) -> &str {
        &self.spec.name
    }
}

/// A TOML error on one line: the problem, then where it is.
fn describe(text: &str, error: &toml::de::Error) -> String {
    let problem = error
        .message()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    match error.span() {
        Some(span) => {
            let before = &text[..span.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let column = before.len() - before.rfind('\n').map_or(0, |at| at + 1) + 1;
            format!("{problem} (line {line}, column {column})")
        }
        None => problem,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
name = "orders"
[source]
kind = "kingdee"
path = "/jdy/v2/scm/sal_order"
start_time = "2025-01-01T00:00:00+08:00"
[source.query]
bill_status = "C"
[transform]
key = "id"
version = "modify_time"
fields = [
  { to = "id", type = "string" },
  { to = "modify_time", type = "datetime" },
  { to = "total_amount", type = "decimal" },
]
[target]
kind = "noop"
"#;

    fn parse(text: &str) -> Result<Pipeline, PipelineError> {
        Pipeline::parse(Path::new("ops/pipelines/orders.toml"), text)
    }

    #[test]
    fn good_file_loads_with_defaults() {
        let pipeline = parse(GOOD).unwrap();
        assert_eq!(pipeline.name(), "orders");
        assert_eq!(pipeline.spec.source.page_size, 100);
        assert_eq!(pipeline.spec.source.id_field, "id");
        assert_eq!(pipeline.spec.source.query["bill_status"], "C");
        assert_eq!(pipeline.spec.source.window_secs, 86_400);
        assert_eq!(pipeline.spec.source.calls_per_minute, 500);
        assert!(matches!(pipeline.spec.target, TargetSpec::Noop));
    }

    #[test]
    fn errors_name_file_field_and_problem() {
        let cases = [
            (
                GOOD.replace("type = \"decimal\"", "type = \"decimall\""),
                "transform.fields[2].type",
                "decimall",
            ),
            (
                GOOD.replace("path = ", "paht = "),
                "source.paht",
                "unknown field",
            ),
            (
                GOOD.replace("[source.query]", "page_size = 500\n[source.query]"),
                "source.page_size",
                "caps",
            ),
            (
                GOOD.replace("[source.query]", "records_per_message = 0\n[source.query]"),
                "source.records_per_message",
                "must be 1 to 10000",
            ),
            (
                GOOD.replace("[source.query]", "calls_per_minute = 0\n[source.query]"),
                "source.calls_per_minute",
                "at least 1",
            ),
            (
                GOOD.replace("2025-01-01T00:00:00+08:00", "yesterday"),
                "source.start_time",
                "input",
            ),
            (
                GOOD.replace("\"orders\"", "\"Orders!\""),
                "name",
                "lowercase",
            ),
            (
                GOOD.replace(
                    "kind = \"noop\"",
                    "kind = \"postgres\"\ntable = \"t\"\nmigrations = \"nowhere\"",
                ),
                "target.migrations",
                "not a directory",
            ),
            (
                GOOD.replace(
                    "kind = \"noop\"",
                    "kind = \"postgres\"\ntable = \"t\"\nmigrations = \".\"\nerrors = { transient = [\"4000\"] }",
                ),
                "target.errors.transient",
                "SQLSTATE",
            ),
            (
                GOOD.replace("version = \"modify_time\"", "version = \"total_amount\""),
                "transform.version",
                "datetime",
            ),
        ];
        for (text, field, problem) in cases {
            let err = parse(&text).unwrap_err();
            let message = err.to_string();
            assert_eq!(err.field, field, "{message}");
            assert!(
                message.starts_with("pipeline file ops/pipelines/orders.toml: "),
                "{message}"
            );
            assert!(message.contains(problem), "{message}");
        }
    }

    #[test]
    fn http_targets_load_and_are_checked() {
        let http = |target: &str| GOOD.replace("kind = \"noop\"", target);
        let pipeline = parse(&http(
            "kind = \"http\"\npath = \"/api/orders\"\nbody = \"record\"\n[target.auth]\nkind = \"token_endpoint\"\npath = \"/oauth/token\"\n[target.id_check]\nmode = \"idempotency_key\"",
        ))
        .unwrap();
        assert!(matches!(pipeline.spec.target, TargetSpec::Http(_)));
        let cases = [
            (
                "kind = \"http\"\npath = \"/x\"\nheaders = { Authorization = \"Bearer abc\" }",
                "target.headers",
                "credentials",
            ),
            (
                "kind = \"http\"\npath = \"/x\"\n[target.id_check]\nmode = \"idempotency_key\"",
                "target.id_check.mode",
                "body = \"record\"",
            ),
            (
                "kind = \"http\"\npath = \"/x\"\n[target.id_check]\nmode = \"exists\"\npath = \"/x\"",
                "target.id_check.path",
                "{key}",
            ),
            (
                "kind = \"http\"\npath = \"/x\"\nconcurrency = 0",
                "target.concurrency",
                "1 to",
            ),
            (
                "kind = \"http\"\npath = \"/x\"\ntimeout = 3",
                // Serde reports an unknown field of a tagged section at the section.
                "target",
                "unknown field `timeout`",
            ),
        ];
        for (target, field, problem) in cases {
            let err = parse(&http(target)).unwrap_err();
            let message = err.to_string();
            assert_eq!(err.field, field, "{message}");
            assert!(message.contains(problem), "{message}");
        }
    }

    #[test]
    fn syntax_errors_are_reported_on_one_line_with_their_place() {
        let err = parse("name = \"x\"\nsource = ").unwrap_err();
        let message = err.to_string();
        assert!(!message.contains('\n'), "{message}");
        assert!(message.contains("(line 2, column"), "{message}");
    }
}
