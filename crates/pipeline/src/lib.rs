//! The pipeline file: one integration scheme (方案) — a source object, a mapping, a target.
//!
//! A pipeline file holds no addresses and no secrets; those come from the environment. Loading checks
//! everything that can be checked without a network, and every error names the file, the field and the
//! problem, so `conveyorctl check` and every worker refuse a bad file with the same words.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::mapping::{Mapping, TransformSpec};

pub mod mapping;
pub mod source;
pub mod target;

pub use source::SourceSpec;
pub use target::TargetSpec;

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
                if field == "target" {
                    // The target's kinds are a tagged enum, whose errors serde reports at the
                    // section: read it again as its kind, for the exact key and line.
                    if let Some((field, problem)) = target::locate_error(text) {
                        return error(&field, problem);
                    }
                }
                let field = if field == "." { String::new() } else { field };
                error(&field, describe(text, &err.into_inner()))
            })?;
        // Checks after parsing name the field; the line is looked up in the text.
        let error = |field: &str, problem: String| {
            let problem = match line_of(text, field) {
                Some(line) => format!("{problem} (line {line})"),
                None => problem,
            };
            error(field, problem)
        };

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
        spec.source
            .check()
            .map_err(|(field, problem)| error(&field, problem))?;
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

/// The keys of the table `table` (a top-level key) in the TOML `text`, in the order written.
fn keys_of(text: &str, table: &str) -> Option<Vec<String>> {
    use toml::de::{DeTable, DeValue};
    let document = DeTable::parse(text).ok()?;
    let (_, value) = document
        .get_ref()
        .iter()
        .find(|(name, _)| name.get_ref() == table)?;
    let DeValue::Table(inner) = value.get_ref() else {
        return None;
    };
    let mut keys: Vec<_> = inner
        .iter()
        .map(|(name, _)| (name.span().start, name.get_ref().to_string()))
        .collect();
    keys.sort();
    Some(keys.into_iter().map(|(_, key)| key).collect())
}

/// The line of the key `field` (a dotted path, with `[n]` for an array's element) in the TOML `text`.
fn line_of(text: &str, field: &str) -> Option<usize> {
    use toml::de::{DeTable, DeValue};
    let document = DeTable::parse(text).ok()?;
    let mut table = document.get_ref();
    let mut span = None;
    let mut segments = field.split('.').peekable();
    while let Some(segment) = segments.next() {
        let (key, indexes) = match segment.find('[') {
            Some(at) => (&segment[..at], &segment[at..]),
            None => (segment, ""),
        };
        let (name, value) = table.iter().find(|(name, _)| name.get_ref() == key)?;
        span = Some(name.span());
        let mut value = value;
        for index in indexes.split(['[', ']']).filter(|part| !part.is_empty()) {
            let DeValue::Array(items) = value.get_ref() else {
                return None;
            };
            value = items.get(index.parse::<usize>().ok()?)?;
            span = Some(value.span());
        }
        match value.get_ref() {
            DeValue::Table(inner) => table = inner,
            _ if segments.peek().is_some() => return None,
            _ => {}
        }
    }
    let before = &text[..span?.start.min(text.len())];
    Some(before.matches('\n').count() + 1)
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
        assert!(matches!(pipeline.spec.target, TargetSpec::Noop(_)));
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
                GOOD.replace("kind = \"noop\"", "kind = \"noop\"\ntable = \"orders\""),
                "target.table",
                "unknown field `table`: a noop target takes no settings (line 19)",
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
                "not an RFC 3339 time",
            ),
            (
                GOOD.replace("[source.query]", "schedule = \"every hour\"\n[source.query]"),
                "source.schedule",
                "is not a cron expression",
            ),
            (
                GOOD.replace(
                    "[source.query]",
                    "schedule = \"0 * * * *\"\ntime_zone = \"Mars/Base\"\n[source.query]",
                ),
                "source.time_zone",
                "not a time zone",
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
    fn a_schedule_runs_in_its_zone() {
        let text = GOOD.replace(
            "[source.query]",
            "schedule = \"0 8 * * 1-5\"\n[source.query]",
        );
        let pipeline = parse(&text).unwrap();
        let schedule = pipeline.spec.source.schedule().unwrap().unwrap();
        assert_eq!(schedule.described, "\"0 8 * * 1-5\" in Asia/Shanghai");
        // Friday 2026-12-04 08:00 in Shanghai is 00:00 UTC: the next runs are Monday's and Tuesday's.
        let friday = "2026-12-04T00:00:00Z".parse().unwrap();
        let times: Vec<String> = schedule
            .upcoming(friday, 2)
            .iter()
            .map(|time| time.to_rfc3339())
            .collect();
        assert_eq!(
            times,
            ["2026-12-07T08:00:00+08:00", "2026-12-08T08:00:00+08:00"]
        );
        assert!(
            parse(GOOD)
                .unwrap()
                .spec
                .source
                .schedule()
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn a_start_time_may_be_a_toml_date_time_or_a_string() {
        let unquoted = GOOD.replace("\"2025-01-01T00:00:00+08:00\"", "2025-01-01T00:00:00+08:00");
        assert_ne!(unquoted, GOOD);
        let (quoted, unquoted) = (parse(GOOD).unwrap(), parse(&unquoted).unwrap());
        assert_eq!(
            quoted.spec.source.start_time,
            unquoted.spec.source.start_time
        );
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
                "target.timeout",
                "unknown field `timeout`",
            ),
            (
                "kind = \"http\"\npath = \"/x\"\n[target.auth]\nkind = \"oauth\"",
                "target.auth.kind",
                "unknown variant `oauth`",
            ),
            (
                "kind = \"http\"\npath = \"/x\"\n[target.id_check]\nmod = \"upsert\"",
                "target.id_check",
                "missing field `mode`",
            ),
            (
                "kind = \"http\"\npath = \"/x\"\nbatch_size = \"ten\"",
                "target.batch_size",
                "invalid type",
            ),
        ];
        for (target, field, problem) in cases {
            let err = parse(&http(target)).unwrap_err();
            let message = err.to_string();
            assert_eq!(err.field, field, "{message}");
            assert!(message.contains(problem), "{message}");
            assert!(message.contains("(line "), "{message}");
        }
    }

    #[test]
    fn checks_after_parsing_name_the_line_of_their_field() {
        let err =
            parse(&GOOD.replace("[source.query]", "page_size = 500\n[source.query]")).unwrap_err();
        assert!(err.to_string().ends_with("(line 7)"), "{err}");
        let err = parse(&GOOD.replace("version = \"modify_time\"", "version = \"total_amount\""))
            .unwrap_err();
        assert!(err.to_string().contains("(line 11)"), "{err}");
        assert_eq!(line_of(GOOD, "transform.fields[2].type"), Some(15));
        assert_eq!(line_of(GOOD, "source.query.bill_status"), Some(8));
        assert_eq!(line_of(GOOD, "source.nothing"), None);
    }

    #[test]
    fn syntax_errors_are_reported_on_one_line_with_their_place() {
        let err = parse("name = \"x\"\nsource = ").unwrap_err();
        let message = err.to_string();
        assert!(!message.contains('\n'), "{message}");
        assert!(message.contains("(line 2, column"), "{message}");
    }
}
