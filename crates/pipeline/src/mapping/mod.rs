//! The transformation rules: how one source record becomes output records, declared in the pipeline file.
//!
//! Each output field names where it comes from (a dotted path into the source record, or an expression
//! over the fields before it), how it is cleaned (trim, empty to null, a value map, a default) and what
//! type it must become. Entry lines can be kept nested (mapped field by field) or flattened into one
//! output record per line that carries chosen fields of its parent. A filter skips records on purpose.
//! Everything is compiled when the pipeline file loads, so that a mistake is reported, naming the rule,
//! before any record moves.

pub mod convert;
pub mod expr;
mod source;

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use chrono::{DateTime, FixedOffset};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use serde_json::value::RawValue;

pub use convert::FieldType;
use convert::{TimeOutput, TimeRules, Zone};
use conveyor_base::source_time::{self, kind_of};
use expr::Expression;
pub use source::SourceRecord;
use source::{Parsed, Shape, Slot, SlotRef, SourceFields};

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

#[derive(Debug, Clone)]
enum Input {
    Path(Vec<String>),
    Expr(Expression),
}

#[derive(Debug, Clone)]
struct CompiledField {
    to: String,
    /// `to` split at dots: where the value goes in the output.
    to_path: Vec<String>,
    input: Input,
    kind: FieldType,
    required: bool,
    trim: bool,
    empty_as_null: bool,
    map: Option<BTreeMap<String, Value>>,
    unmapped: Unmapped,
    default: Option<Value>,
    time: TimeRules,
    drop: bool,
    nested: Option<FieldList>,
    /// Where a top-level field finds its source field in a parsed record.
    slot: Option<SlotRef>,
}

/// Compiled fields, and where the written ones go in the output object.
#[derive(Debug, Clone)]
struct FieldList {
    fields: Vec<CompiledField>,
    layout: Layout,
}

/// The written fields of an output object in the order they are declared, a dotted name nested in
/// objects: built once, so that a record's output is written from its values without a map.
#[derive(Debug, Clone, Default)]
struct Layout(Vec<(String, Place)>);

#[derive(Debug, Clone)]
enum Place {
    /// The value of the field at this index.
    Field(usize),
    Object(Layout),
}

/// The value a field gave one record.
#[derive(Debug, Clone)]
enum Out {
    Value(Value),
    /// Passed on exactly as the source wrote it (only from [`Mapping::apply_owned`]): a value no
    /// rule looks into is never built into a tree.
    Raw(Box<RawValue>),
    /// Entry lines mapped field by field, each with its own values.
    Lines(Vec<Vec<Out>>),
    /// An object mapped field by field.
    Line(Vec<Out>),
}

#[derive(Debug, Clone)]
struct Flatten {
    path: Vec<String>,
    alias: String,
}

/// Compiled rules, ready to apply to records.
#[derive(Debug, Clone)]
pub struct Mapping {
    fields: Arc<FieldList>,
    flatten: Option<Flatten>,
    filter: Option<Expression>,
    /// Indexes of the key and version fields.
    key_at: usize,
    version_at: usize,
    source: SourceFields,
}

/// One mapped record with the identity and version the target needs. Its output fields are read
/// with [`MappedRecord::to_json`].
#[derive(Debug, Clone)]
pub struct MappedRecord {
    pub id: String,
    pub version: DateTime<FixedOffset>,
    /// The value of each field, in the order of `fields`.
    values: Vec<Out>,
    fields: Arc<FieldList>,
}

impl MappedRecord {
    /// The output record as one JSON object, its fields in the order they are declared. The one
    /// way to read the whole output.
    pub fn to_json(&self) -> Box<RawValue> {
        // Written straight into raw JSON: serde_json's own output is not parsed again to check it.
        serde_json::value::to_raw_value(&Written {
            layout: &self.fields.layout,
            fields: &self.fields.fields,
            values: &self.values,
        })
        .expect("JSON trees and raw JSON serialize")
    }
}

/// An output object: the values of `fields` placed by `layout`.
struct Written<'a> {
    layout: &'a Layout,
    fields: &'a [CompiledField],
    values: &'a [Out],
}

impl Serialize for Written<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = serializer.serialize_map(Some(self.layout.0.len()))?;
        for (name, place) in &self.layout.0 {
            match place {
                Place::Field(index) => map.serialize_entry(
                    name,
                    &Written1 {
                        field: &self.fields[*index],
                        value: &self.values[*index],
                    },
                )?,
                Place::Object(layout) => map.serialize_entry(
                    name,
                    &Written {
                        layout,
                        fields: self.fields,
                        values: self.values,
                    },
                )?,
            }
        }
        map.end()
    }
}

/// One field's value as JSON.
struct Written1<'a> {
    field: &'a CompiledField,
    value: &'a Out,
}

impl Serialize for Written1<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let object = |values| Written {
            layout: self
                .field
                .nested
                .as_ref()
                .map_or(&EMPTY, |nested| &nested.layout),
            fields: self
                .field
                .nested
                .as_ref()
                .map_or(&[], |nested| &nested.fields),
            values,
        };
        match self.value {
            Out::Value(value) => value.serialize(serializer),
            Out::Raw(json) => json.serialize(serializer),
            Out::Line(values) => object(values).serialize(serializer),
            Out::Lines(lines) => serializer.collect_seq(lines.iter().map(|values| object(values))),
        }
    }
}

static EMPTY: Layout = Layout(Vec::new());

impl Out {
    fn is_null(&self) -> bool {
        matches!(self, Out::Value(Value::Null))
    }

    /// The value as a JSON tree, for expressions and the record's identity. Lines mapped field by
    /// field are built from trees, which always convert; raw values are kept only when no expression
    /// or filter reads the output, and a key or version is never raw, so the `Null` below is never
    /// reached.
    fn tree<'a>(&'a self, field: &CompiledField) -> Cow<'a, Value> {
        match self {
            Out::Value(value) => Cow::Borrowed(value),
            other => Cow::Owned(
                serde_json::to_value(Written1 {
                    field,
                    value: other,
                })
                .unwrap_or(Value::Null),
            ),
        }
    }
}

/// The values of a record's top-level fields so far, by name: what expressions and the filter read.
struct Outputs<'a> {
    fields: &'a [CompiledField],
    values: &'a [Out],
}

impl expr::Fields for Outputs<'_> {
    fn field(&self, name: &str) -> Option<Cow<'_, Value>> {
        let (field, value) = self
            .fields
            .iter()
            .zip(self.values)
            .find(|(field, _)| field.to_path.len() == 1 && field.to == name)?;
        Some(value.tree(field))
    }
}

impl FieldList {
    /// Places every written field; `at` names the list in the pipeline file.
    fn new(fields: Vec<CompiledField>, at: &str) -> Result<Self, SpecProblem> {
        let mut layout = Layout::default();
        for (index, field) in fields.iter().enumerate().filter(|(_, field)| !field.drop) {
            let (last, parents) = field.to_path.split_last().expect("a path has a name");
            let mut object = &mut layout;
            for parent in parents {
                let position = match object.0.iter().position(|(name, _)| name == parent) {
                    Some(position) => position,
                    None => {
                        object
                            .0
                            .push((parent.clone(), Place::Object(Layout::default())));
                        object.0.len() - 1
                    }
                };
                object = match &mut object.0[position].1 {
                    Place::Object(inner) => inner,
                    Place::Field(_) => {
                        return Err(problem(
                            format!("{at}[{index}].to"),
                            format!("{parent:?} is both a field and an object of fields"),
                        ));
                    }
                };
            }
            if object.0.iter().any(|(name, _)| name == last) {
                return Err(problem(
                    format!("{at}[{index}].to"),
                    format!("{last:?} is both a field and an object of fields"),
                ));
            }
            object.0.push((last.clone(), Place::Field(index)));
        }
        Ok(Self { fields, layout })
    }
}

/// The same identity, version and output JSON.
impl PartialEq for MappedRecord {
    fn eq(&self, other: &Self) -> bool {
        let tree = |record: &Self| serde_json::from_str::<Value>(record.to_json().get()).ok();
        self.id == other.id && self.version == other.version && tree(self) == tree(other)
    }
}

/// What one source record became.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Applied {
    pub records: Vec<MappedRecord>,
    /// Output records skipped by the filter (a source record without lines to flatten counts as one).
    pub filtered: u64,
}

fn problem(field: impl Into<String>, problem: impl Into<String>) -> SpecProblem {
    SpecProblem {
        field: field.into(),
        problem: problem.into(),
    }
}

fn dotted(text: &str) -> Option<Vec<String>> {
    let path: Vec<String> = text.split('.').map(str::to_owned).collect();
    (!path.iter().any(|part| part.trim().is_empty())).then_some(path)
}

/// Compiles a list of fields declared at `at` (e.g. `transform.fields`); `top` allows expressions.
fn compile_fields(
    specs: &[FieldSpec],
    at: &str,
    top: bool,
) -> Result<Vec<CompiledField>, SpecProblem> {
    let mut fields: Vec<CompiledField> = Vec::with_capacity(specs.len());
    let mut seen = BTreeSet::new();
    for (index, spec) in specs.iter().enumerate() {
        let at = |part: &str| format!("{at}[{index}].{part}");
        let to_path = dotted(&spec.to).ok_or_else(|| {
            problem(
                at("to"),
                format!("{:?} is not a name or dotted path", spec.to),
            )
        })?;
        if !seen.insert(spec.to.as_str()) {
            return Err(problem(
                at("to"),
                format!("{:?} is produced twice", spec.to),
            ));
        }
        let input =
            match (&spec.expr, &spec.from) {
                (Some(_), Some(_)) => {
                    return Err(problem(
                        at("expr"),
                        "give either `from` or `expr`, not both",
                    ));
                }
                (Some(_), None) if !top => {
                    return Err(problem(
                        at("expr"),
                        "computed fields are allowed at the top level only",
                    ));
                }
                (Some(text), None) => {
                    let available: Vec<(String, FieldType)> = fields
                        .iter()
                        .filter(|field| field.to_path.len() == 1)
                        .map(|field| (field.to.clone(), field.kind))
                        .collect();
                    Input::Expr(
                        Expression::compile(text, &available)
                            .map_err(|err| problem(at("expr"), err))?,
                    )
                }
                (None, from) => {
                    let from = from.as_deref().unwrap_or(&spec.to);
                    Input::Path(dotted(from).ok_or_else(|| {
                        problem(at("from"), format!("{from:?} is not a dotted path"))
                    })?)
                }
            };
        let is_time = matches!(spec.kind, FieldType::Datetime | FieldType::Date);
        for (name, given) in [
            ("format", &spec.format),
            ("input_format", &spec.input_format),
            ("input_timezone", &spec.input_timezone),
            ("timezone", &spec.timezone),
        ] {
            if given.is_some() && !is_time {
                return Err(problem(
                    at(name),
                    "applies to datetime and date fields only",
                ));
            }
        }
        let mut time = TimeRules::default();
        if let Some(format) = &spec.format {
            time.output = TimeOutput::parse(format).map_err(|err| problem(at("format"), err))?;
            if spec.kind == FieldType::Date && !matches!(time.output, TimeOutput::Pattern(_)) {
                return Err(problem(
                    at("format"),
                    "a date is written with a strftime pattern",
                ));
            }
        }
        if let Some(pattern) = &spec.input_format {
            convert::check_pattern(pattern).map_err(|err| problem(at("input_format"), err))?;
            time.input_format = Some(pattern.clone());
        }
        if let Some(zone) = &spec.input_timezone {
            time.input_zone =
                Zone::parse(zone).map_err(|err| problem(at("input_timezone"), err))?;
        }
        if let Some(zone) = &spec.timezone {
            time.output_zone = Zone::parse(zone).map_err(|err| problem(at("timezone"), err))?;
        }
        if spec.map.is_none() && spec.unmapped != Unmapped::Keep {
            return Err(problem(at("unmapped"), "applies only with a `map`"));
        }
        let nested = match &spec.fields {
            Some(_) if spec.kind != FieldType::Json => {
                return Err(problem(
                    at("fields"),
                    "nested fields need type json (the default)",
                ));
            }
            Some(_) if spec.trim || spec.empty_as_null || spec.map.is_some() => {
                return Err(problem(
                    at("fields"),
                    "trim, empty_as_null and map apply to values, not to mapped lines",
                ));
            }
            Some(nested) => Some(FieldList::new(
                compile_fields(nested, &at("fields"), false)?,
                &at("fields"),
            )?),
            None => None,
        };
        fields.push(CompiledField {
            to: spec.to.clone(),
            to_path,
            input,
            kind: spec.kind,
            required: spec.required,
            trim: spec.trim,
            empty_as_null: spec.empty_as_null,
            map: spec.map.clone(),
            unmapped: spec.unmapped,
            default: spec.default.clone(),
            time,
            drop: spec.drop,
            nested,
            slot: None,
        });
    }
    // A nested output name must not also be a plain one (`customer` and `customer.name`).
    for field in &fields {
        if field.to_path.len() > 1 && seen.contains(field.to_path[0].as_str()) {
            return Err(problem(
                format!("{at}[..].to"),
                format!(
                    "{:?} is both a field and an object of fields",
                    field.to_path[0]
                ),
            ));
        }
    }
    Ok(fields)
}

/// Every source path `fields` read, with what they read at its end: a field mapped field by field
/// reads only what its own fields read.
fn reads(fields: &[CompiledField]) -> impl Iterator<Item = (&[String], Shape)> {
    fields.iter().filter_map(|field| match &field.input {
        Input::Path(path) => Some((path.as_slice(), field.shape())),
        Input::Expr(_) => None,
    })
}

impl CompiledField {
    /// What of its source value the field reads.
    fn shape(&self) -> Shape {
        let Some(nested) = &self.nested else {
            return Shape::Whole;
        };
        let mut shape = Shape::Fields(BTreeMap::new());
        for (path, inner) in reads(&nested.fields) {
            shape.merge(Shape::along(path, inner));
        }
        shape
    }

    /// Whether the value is written exactly as read: no conversion, cleaning, default, nesting or
    /// check.
    fn passed_unchanged(&self) -> bool {
        self.kind == FieldType::Json
            && !self.required
            && !self.trim
            && !self.empty_as_null
            && self.map.is_none()
            && self.default.is_none()
            && self.nested.is_none()
            && !self.drop
            && self.to_path.len() == 1
    }
}

impl Mapping {
    pub fn compile(spec: &TransformSpec) -> Result<Self, SpecProblem> {
        let mut fields = compile_fields(&spec.fields, "transform.fields", true)?;
        let find = |name: &str| fields.iter().find(|field| field.to == name);
        let not_produced = |name: &str| {
            format!("{name:?} is not one of the output fields (transform.fields[].to)")
        };
        match find(&spec.key) {
            None => return Err(problem("transform.key", not_produced(&spec.key))),
            Some(field) if !matches!(field.kind, FieldType::String | FieldType::Integer) => {
                return Err(problem(
                    "transform.key",
                    format!("{:?} must have type string or integer", spec.key),
                ));
            }
            Some(field) if field.drop || field.to_path.len() > 1 => {
                return Err(problem(
                    "transform.key",
                    "must be a written, top-level field",
                ));
            }
            Some(_) => {}
        }
        match find(&spec.version) {
            None => return Err(problem("transform.version", not_produced(&spec.version))),
            Some(field) if field.kind != FieldType::Datetime => {
                return Err(problem(
                    "transform.version",
                    format!("{:?} must have type datetime", spec.version),
                ));
            }
            Some(field)
                if !matches!(
                    field.time.output,
                    TimeOutput::Rfc3339 | TimeOutput::EpochMillis
                ) =>
            {
                return Err(problem(
                    "transform.version",
                    format!(
                        "{:?} must be written as rfc3339 or epoch_millis",
                        spec.version
                    ),
                ));
            }
            Some(field) if field.drop || field.to_path.len() > 1 => {
                return Err(problem(
                    "transform.version",
                    "must be a written, top-level field",
                ));
            }
            Some(_) => {}
        }
        // The key and the version are what make writes idempotent: a record without them cannot go on.
        for field in &mut fields {
            if field.to == spec.key || field.to == spec.version {
                field.required = true;
            }
        }
        let flatten = match &spec.flatten {
            None => None,
            Some(flatten) => {
                let path = dotted(&flatten.path).ok_or_else(|| {
                    problem(
                        "transform.flatten.path",
                        format!("{:?} is not a dotted path", flatten.path),
                    )
                })?;
                if flatten.alias.is_empty() || flatten.alias.contains('.') {
                    return Err(problem(
                        "transform.flatten.as",
                        "must be a plain name, e.g. \"line\"",
                    ));
                }
                Some(Flatten {
                    path,
                    alias: flatten.alias.clone(),
                })
            }
        };
        let filter = match &spec.filter {
            None => None,
            Some(text) => {
                let available: Vec<(String, FieldType)> = fields
                    .iter()
                    .filter(|field| field.to_path.len() == 1)
                    .map(|field| (field.to.clone(), field.kind))
                    .collect();
                Some(
                    Expression::compile(text, &available)
                        .map_err(|err| problem("transform.filter", err))?,
                )
            }
        };
        let position = |name: &str| {
            fields
                .iter()
                .position(|field| field.to == name)
                .expect("checked above")
        };
        let (key_at, version_at) = (position(&spec.key), position(&spec.version));
        let mut source = match &flatten {
            None => SourceFields::new(reads(&fields)),
            Some(flatten) => {
                // Paths through the alias read each line; the others read the record.
                let (of_lines, of_record): (Vec<_>, Vec<_>) =
                    reads(&fields).partition(|(path, _)| path[0] == flatten.alias);
                let mut line = Shape::Fields(BTreeMap::new());
                for (path, shape) in of_lines {
                    line.merge(Shape::along(&path[1..], shape));
                }
                SourceFields::new(
                    of_record
                        .into_iter()
                        .chain([(flatten.path.as_slice(), line)]),
                )
            }
        };
        // A field copied unchanged from a top-level source field no other rule reads travels as raw
        // JSON — unless records are flattened (every line reads the record again) or an expression
        // or the filter might read it.
        let computed = filter.is_some() || fields.iter().any(|f| matches!(f.input, Input::Expr(_)));
        if flatten.is_none() && !computed {
            for field in &fields {
                if let Input::Path(path) = &field.input
                    && path.len() == 1
                    && field.passed_unchanged()
                {
                    source.keep_raw(&path[0]);
                }
            }
        }
        for field in &mut fields {
            if let Input::Path(path) = &field.input
                && flatten.as_ref().is_none_or(|f| f.alias != path[0])
            {
                field.slot = source.slot(&path[0]);
            }
        }
        Ok(Self {
            fields: Arc::new(FieldList::new(fields, "transform.fields")?),
            flatten,
            filter,
            key_at,
            version_at,
            source,
        })
    }

    /// Parses a source record's JSON for [`Mapping::apply_owned`]: the top-level fields the rules do not
    /// read are skipped, not built, and those passed on unchanged are kept as raw JSON.
    pub fn parse_source(&self, json: &str) -> Result<SourceRecord, serde_json::Error> {
        self.source.parse(json)
    }

    /// Like [`Mapping::apply`], taking the record: a field only one rule reads is moved into the
    /// output rather than copied (when not flattening: then every line reads the record again).
    pub fn apply_owned(&self, source: SourceRecord) -> Result<Applied, FieldError> {
        let mut slots = match source.0 {
            Parsed::Slots(slots) => slots,
            Parsed::Whole(value) => return self.apply(&value),
        };
        if self.flatten.is_some() {
            let tree = self.source.tree(slots).map_err(|err| FieldError {
                field: "record".into(),
                reason: err.to_string(),
            })?;
            return self.apply(&tree);
        }
        let mut applied = Applied::default();
        match self.map_one(&Value::Null, None, &mut slots)? {
            Some(record) => applied.records.push(record),
            None => applied.filtered += 1,
        }
        Ok(applied)
    }

    /// The names of the top-level output fields that are written, in order.
    pub fn output_fields(&self) -> impl Iterator<Item = &str> {
        self.fields.layout.0.iter().map(|(name, _)| name.as_str())
    }

    pub fn key_field(&self) -> &str {
        &self.fields.fields[self.key_at].to
    }

    pub fn version_field(&self) -> &str {
        &self.fields.fields[self.version_at].to
    }

    /// Maps one source record into its output records (one, or one per line when flattening).
    /// An error in any of them fails the whole source record, so that it is dead-lettered as a unit.
    pub fn apply(&self, source: &Value) -> Result<Applied, FieldError> {
        let mut applied = Applied::default();
        let Some(flatten) = &self.flatten else {
            match self.map_one(source, None, &mut [])? {
                Some(record) => applied.records.push(record),
                None => applied.filtered += 1,
            }
            return Ok(applied);
        };
        let lines = match lookup(source, &flatten.path) {
            None | Some(Value::Null) => &[][..],
            Some(Value::Array(lines)) => lines.as_slice(),
            Some(other) => {
                return Err(FieldError {
                    field: flatten.path.join("."),
                    reason: format!(
                        "lines to flatten must be an array, found {}",
                        kind_of(other)
                    ),
                });
            }
        };
        if lines.is_empty() {
            applied.filtered += 1;
        }
        for (index, line) in lines.iter().enumerate() {
            match self.map_one(source, Some((flatten.alias.as_str(), line)), &mut []) {
                Ok(Some(record)) => applied.records.push(record),
                Ok(None) => applied.filtered += 1,
                Err(err) => {
                    return Err(FieldError {
                        field: err.field,
                        reason: format!(
                            "in line {} of {}: {}",
                            index + 1,
                            flatten.path.join("."),
                            err.reason
                        ),
                    });
                }
            }
        }
        Ok(applied)
    }

    /// Maps one record (of a line, when flattening); `None` when the filter skips it.
    fn map_one(
        &self,
        source: &Value,
        line: Option<(&str, &Value)>,
        slots: &mut [Slot],
    ) -> Result<Option<MappedRecord>, FieldError> {
        let fields = &self.fields.fields;
        let values = map_fields(fields, source, line, slots)?;
        if let Some(filter) = &self.filter
            && !filter
                .keep(&Outputs {
                    fields,
                    values: &values,
                })
                .map_err(|reason| FieldError {
                    field: "transform.filter".into(),
                    reason,
                })?
        {
            return Ok(None);
        }
        let id = match &*values[self.key_at].tree(&fields[self.key_at]) {
            Value::String(text) => text.clone(),
            other => other.to_string(),
        };
        let version =
            source_time::parse_instant(&values[self.version_at].tree(&fields[self.version_at]))
                .map_err(|err| FieldError {
                    field: self.version_field().to_owned(),
                    reason: err.to_string(),
                })?;
        Ok(Some(MappedRecord {
            id,
            version,
            values,
            fields: Arc::clone(&self.fields),
        }))
    }
}

/// The value of each of `fields` for a record, in their order: read from the top-level fields in
/// `slots` (see [`SourceFields::parse`]; a field one rule alone reads is taken), else from the
/// tree `source` (of a line, when flattening).
fn map_fields(
    fields: &[CompiledField],
    source: &Value,
    line: Option<(&str, &Value)>,
    slots: &mut [Slot],
) -> Result<Vec<Out>, FieldError> {
    let mut values = Vec::with_capacity(fields.len());
    for field in fields {
        let error = |reason: String| FieldError {
            field: field.to.clone(),
            reason,
        };
        let raw: Cow<Value> = match &field.input {
            Input::Path(path) => {
                let slot = field
                    .slot
                    .and_then(|at| Some((at.alone, slots.get_mut(at.index)?)));
                match slot {
                    Some((true, slot)) => match std::mem::take(slot) {
                        Slot::Raw(json) => {
                            values.push(Out::Raw(json));
                            continue;
                        }
                        Slot::Value(root) => {
                            Cow::Owned(take(root, &path[1..]).unwrap_or(Value::Null))
                        }
                        Slot::Missing => Cow::Owned(Value::Null),
                    },
                    Some((false, Slot::Value(root))) => {
                        lookup(root, &path[1..]).map_or(Cow::Owned(Value::Null), Cow::Borrowed)
                    }
                    // Kept raw only for a rule that reads it alone.
                    Some((false, Slot::Missing | Slot::Raw(_))) => Cow::Owned(Value::Null),
                    None => {
                        let found = match line {
                            Some((alias, line)) if path[0] == alias => lookup(line, &path[1..]),
                            _ => lookup(source, path),
                        };
                        found.map_or(Cow::Owned(Value::Null), Cow::Borrowed)
                    }
                }
            }
            Input::Expr(expression) => Cow::Owned(
                expression
                    .eval(&Outputs {
                        fields,
                        values: &values,
                    })
                    .map_err(error)?,
            ),
        };
        let value = match &field.nested {
            // Lines kept nested are read in place, never copied whole.
            Some(nested) => {
                let raw = match (&*raw, &field.default) {
                    (Value::Null, Some(default)) => default,
                    (raw, _) => raw,
                };
                let within = |index: Option<usize>| {
                    move |err: FieldError| FieldError {
                        field: match index {
                            Some(index) => format!("{}[{index}].{}", field.to, err.field),
                            None => format!("{}.{}", field.to, err.field),
                        },
                        reason: err.reason,
                    }
                };
                let nested = &nested.fields;
                match raw {
                    Value::Null => Out::Value(Value::Null),
                    Value::Array(items) => {
                        let mut lines = Vec::with_capacity(items.len());
                        for (index, item) in items.iter().enumerate() {
                            lines.push(
                                map_fields(nested, item, None, &mut [])
                                    .map_err(within(Some(index)))?,
                            );
                        }
                        Out::Lines(lines)
                    }
                    item @ Value::Object(_) => {
                        Out::Line(map_fields(nested, item, None, &mut []).map_err(within(None))?)
                    }
                    other => {
                        return Err(error(format!(
                            "expected an array or object to map field by field, found {}",
                            kind_of(other)
                        )));
                    }
                }
            }
            None => Out::Value(match clean(field, raw.into_owned()).map_err(error)? {
                Value::Null => Value::Null,
                value => convert::convert(value, field.kind, &field.time).map_err(error)?,
            }),
        };
        if value.is_null() && field.required {
            return Err(error(match &field.input {
                Input::Path(path) => {
                    format!("required, but {:?} is missing or null", path.join("."))
                }
                Input::Expr(_) => "required, but the expression gave null".into(),
            }));
        }
        values.push(value);
    }
    Ok(values)
}

/// Cleaning before conversion: trim, empty to null, the value map, then the default.
fn clean(field: &CompiledField, value: Value) -> Result<Value, String> {
    let mut value = match value {
        Value::String(text) if field.trim && text.trim().len() != text.len() => {
            Value::String(text.trim().to_owned())
        }
        other => other,
    };
    if field.empty_as_null && value.as_str().is_some_and(str::is_empty) {
        value = Value::Null;
    }
    if let Some(map) = &field.map
        && !value.is_null()
    {
        let text = match &value {
            Value::String(text) => text.clone(),
            other => other.to_string(),
        };
        value = match (map.get(&text), field.unmapped) {
            (Some(mapped), _) => mapped.clone(),
            (None, Unmapped::Keep) => value,
            (None, Unmapped::Null) => Value::Null,
            (None, Unmapped::Error) => return Err("value is not one the map names".into()),
        };
    }
    if value.is_null()
        && let Some(default) = &field.default
    {
        value = default.clone();
    }
    Ok(value)
}

fn lookup<'a>(value: &'a Value, path: &[String]) -> Option<&'a Value> {
    path.iter()
        .try_fold(value, |current, part| current.get(part))
}

/// [`lookup`] on a value that is no longer needed: the found part is moved out.
fn take(value: Value, path: &[String]) -> Option<Value> {
    path.iter().try_fold(value, |current, part| match current {
        Value::Object(mut fields) => fields.remove(part),
        _ => None,
    })
}

#[cfg(test)]
mod tests;
