//! What the rules make of a record: each field's value, and the output record written from them as
//! JSON by the compiled layout.

use std::borrow::Cow;
use std::sync::Arc;

use chrono::{DateTime, FixedOffset};
use serde::Serialize;
use serde_json::Value;
use serde_json::value::RawValue;

use super::compile::{CompiledField, FieldList, Layout, Place};

/// The value a field gave one record.
#[derive(Debug, Clone)]
pub(super) enum Out {
    Value(Value),
    /// Passed on exactly as the source wrote it (only from
    /// [`Mapping::apply_owned`](super::compile::Mapping::apply_owned)): a value no rule looks into
    /// is never built into a tree.
    Raw(Box<RawValue>),
    /// Entry lines mapped field by field, each with its own values.
    Lines(Vec<Vec<Out>>),
    /// An object mapped field by field.
    Line(Vec<Out>),
}

/// One mapped record with the identity and version the target needs. Its output fields are read
/// with [`MappedRecord::to_json`].
#[derive(Debug, Clone)]
pub struct MappedRecord {
    pub id: String,
    pub version: DateTime<FixedOffset>,
    /// The value of each field, in the order of `fields`.
    pub(super) values: Vec<Out>,
    pub(super) fields: Arc<FieldList>,
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
    pub(super) fn is_null(&self) -> bool {
        matches!(self, Out::Value(Value::Null))
    }

    /// The value as a JSON tree, for expressions and the record's identity. Lines mapped field by
    /// field are built from trees, which always convert; raw values are kept only when no expression
    /// or filter reads the output, and a key or version is never raw, so the `Null` below is never
    /// reached.
    pub(super) fn tree<'a>(&'a self, field: &CompiledField) -> Cow<'a, Value> {
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
