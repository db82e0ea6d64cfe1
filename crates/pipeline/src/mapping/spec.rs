//! The declaration of the rules, as the pipeline file's `[transform]` section gives them, and what is
//! reported when they or a record are wrong.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::Value;

use super::convert::FieldType;

/// The `[transform]` section of a pipeline file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TransformSpec {
    /// The output field that identifies a record in the target (its primary key).
    pub key: String,
    /// The output field that orders versions of a record: a newer one replaces an older one, never the
    /// reverse. Must be a `datetime` field.
    pub version: String,
    /// Make one output record per element of an array of entry lines (e.g. a sales order's
    /// `material_entity`), instead of one per source record.
    #[serde(default)]
    pub flatten: Option<FlattenSpec>,
    /// The output fields, in order.
    pub fields: Vec<FieldSpec>,
    /// An expression over the output fields; a record for which it is false is skipped (and counted as
    /// filtered, never as lost).
    #[serde(default)]
    pub filter: Option<String>,
}

/// Flattening of entry lines.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FlattenSpec {
    /// Dotted path of the array of lines in the source record.
    pub path: String,
    /// The name by which field paths refer to the line (`line.qty`); other paths read the parent.
    #[serde(rename = "as")]
    pub alias: String,
}

/// One output field.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FieldSpec {
    /// Name of the output field; a dotted name (`customer.name`) nests it in an object.
    pub to: String,
    /// Dotted path of the source field (`customer.name`); the output name if omitted.
    pub from: Option<String>,
    /// An expression computing the value from the fields declared before, instead of `from`.
    pub expr: Option<String>,
    /// The type the value is converted to.
    #[serde(default, rename = "type")]
    pub kind: FieldType,
    /// A record with this field null (after cleaning and defaults) is an error.
    #[serde(default)]
    pub required: bool,
    /// Trim white space from text.
    #[serde(default)]
    pub trim: bool,
    /// Empty text becomes null.
    #[serde(default)]
    pub empty_as_null: bool,
    /// Replacements of values (compared as text), e.g. `{ C = "audited", Z = "draft" }`.
    #[serde(default)]
    pub map: Option<BTreeMap<String, Value>>,
    /// What a value the map does not name becomes.
    #[serde(default)]
    pub unmapped: Unmapped,
    /// The value when the source has none (missing, null, or emptied by cleaning).
    #[serde(default)]
    pub default: Option<Value>,
    /// For `datetime`: `rfc3339` (default), `epoch_millis` or a strftime pattern; for `date`: a
    /// strftime pattern (default `%Y-%m-%d`).
    pub format: Option<String>,
    /// strftime pattern of text input, e.g. `%d.%m.%Y`.
    pub input_format: Option<String>,
    /// Zone of local input times (default `Asia/Shanghai`, China Standard Time).
    pub input_timezone: Option<String>,
    /// Zone the value is written in (default `+08:00`).
    pub timezone: Option<String>,
    /// Read and usable by later expressions and the filter, but not written.
    #[serde(default)]
    pub drop: bool,
    /// For an array of objects (or an object): the fields to keep of each element, mapped by the same
    /// rules (paths relative to the element).
    pub fields: Option<Vec<FieldSpec>>,
}

/// What becomes of a value that a field's `map` does not name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Unmapped {
    /// It stays as it is.
    #[default]
    Keep,
    /// It becomes null.
    Null,
    /// The record is an error.
    Error,
}

/// A problem in the rules' declaration: the field (a path in the pipeline file) and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecProblem {
    pub field: String,
    pub problem: String,
}

/// A record that cannot be mapped: the output field and why. Never contains the value itself, which
/// may be personal data.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("field {field:?}: {reason}")]
pub struct FieldError {
    pub field: String,
    pub reason: String,
}

pub(super) fn problem(field: impl Into<String>, problem: impl Into<String>) -> SpecProblem {
    SpecProblem {
        field: field.into(),
        problem: problem.into(),
    }
}

pub(super) fn dotted(text: &str) -> Option<Vec<String>> {
    let path: Vec<String> = text.split('.').map(str::to_owned).collect();
    (!path.iter().any(|part| part.trim().is_empty())).then_some(path)
}
