//! Applying the compiled rules to source records: reading each field, cleaning and converting it,
//! the filter, and flattening entry lines.

use std::borrow::Cow;
use std::sync::Arc;

use conveyor_base::source_time::{self, kind_of};
use serde_json::Value;

use super::compile::{CompiledField, Input, Mapping};
use super::output::{Applied, MappedRecord, Out};
use super::source::{Parsed, Slot, SourceRecord};
use super::spec::{FieldError, Unmapped};
use super::{convert, expr};

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

impl Mapping {
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
/// `slots` (see [`SourceFields::parse`](super::source::SourceFields::parse); a field one rule alone
/// reads is taken), else from the tree `source` (of a line, when flattening).
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
