//! The compiled form of the rules, checked and built once when the pipeline file loads: every field
//! with its input and cleaning, where the written fields go in the output, and what of a source
//! record the rules read.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use serde_json::Value;

use super::convert::{self, FieldType, TimeOutput, TimeRules, Zone};
use super::expr::Expression;
use super::source::{Shape, SlotRef, SourceFields};
use super::spec::{FieldSpec, SpecProblem, TransformSpec, Unmapped, dotted, problem};

#[derive(Debug, Clone)]
pub(super) enum Input {
    Path(Vec<String>),
    Expr(Expression),
}

#[derive(Debug, Clone)]
pub(super) struct CompiledField {
    pub(super) to: String,
    /// `to` split at dots: where the value goes in the output.
    pub(super) to_path: Vec<String>,
    pub(super) input: Input,
    pub(super) kind: FieldType,
    pub(super) required: bool,
    pub(super) trim: bool,
    pub(super) empty_as_null: bool,
    pub(super) map: Option<BTreeMap<String, Value>>,
    pub(super) unmapped: Unmapped,
    pub(super) default: Option<Value>,
    pub(super) time: TimeRules,
    drop: bool,
    pub(super) nested: Option<FieldList>,
    /// Where a top-level field finds its source field in a parsed record.
    pub(super) slot: Option<SlotRef>,
}

/// Compiled fields, and where the written ones go in the output object.
#[derive(Debug, Clone)]
pub(super) struct FieldList {
    pub(super) fields: Vec<CompiledField>,
    pub(super) layout: Layout,
}

/// The written fields of an output object in the order they are declared, a dotted name nested in
/// objects: built once, so that a record's output is written from its values without a map.
#[derive(Debug, Clone, Default)]
pub(super) struct Layout(pub(super) Vec<(String, Place)>);

#[derive(Debug, Clone)]
pub(super) enum Place {
    /// The value of the field at this index.
    Field(usize),
    Object(Layout),
}

#[derive(Debug, Clone)]
pub(super) struct Flatten {
    pub(super) path: Vec<String>,
    pub(super) alias: String,
}

/// Compiled rules, ready to apply to records.
#[derive(Debug, Clone)]
pub struct Mapping {
    pub(super) fields: Arc<FieldList>,
    pub(super) flatten: Option<Flatten>,
    pub(super) filter: Option<Expression>,
    /// Indexes of the key and version fields.
    pub(super) key_at: usize,
    pub(super) version_at: usize,
    pub(super) source: SourceFields,
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
                let filter = Expression::compile(text, &available)
                    .map_err(|err| problem("transform.filter", err))?;
                filter
                    .check_gives_a_boolean()
                    .map_err(|err| problem("transform.filter", err))?;
                Some(filter)
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
}
