//! Reading a source record for the rules: only the fields they read are parsed, at any depth (the
//! rest is skipped unparsed: of entry lines mapped field by field, only those fields), a top-level
//! field read by one rule alone is moved into the output, never copied, and a field passed on
//! unchanged stays raw JSON.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::Deserialize;
use serde::de::value::MapAccessDeserializer;
use serde::de::{DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;
use serde_json::{Map, Number, Value};

use crate::json::{select_entries, select_top_level};

/// What of a value the rules read.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Shape {
    /// All of it.
    Whole,
    /// Of an object, these fields (each in its own shape) and no other; of an array, this of each
    /// element; any other value whole.
    Fields(BTreeMap<String, Shape>),
}

impl Shape {
    /// What is read of a value to reach `shape` at `path` inside it.
    pub(super) fn along(path: &[String], shape: Shape) -> Shape {
        path.iter().rev().fold(shape, |inner, key| {
            Shape::Fields(BTreeMap::from([(key.clone(), inner)]))
        })
    }

    /// Reads what either reads.
    pub(super) fn merge(&mut self, other: Shape) {
        match (self, other) {
            (Shape::Whole, _) => {}
            (this, Shape::Whole) => *this = Shape::Whole,
            (Shape::Fields(fields), Shape::Fields(others)) => {
                for (key, shape) in others {
                    match fields.get_mut(&key) {
                        Some(known) => known.merge(shape),
                        None => {
                            fields.insert(key, shape);
                        }
                    }
                }
            }
        }
    }
}

/// The top-level source fields a mapping reads (with what of each), and those among them that one
/// rule alone reads.
#[derive(Debug, Clone, Default)]
pub(super) struct SourceFields {
    pub(super) read: BTreeMap<String, Shape>,
    pub(super) read_once: BTreeSet<String>,
    /// Fields of `read_once` that their rule writes unchanged: kept as raw JSON, never parsed.
    pub(super) raw: BTreeSet<String>,
}

/// A source record parsed for [`super::Mapping::apply_owned`].
#[derive(Debug)]
pub struct SourceRecord {
    pub(super) fields: Value,
    pub(super) raw: BTreeMap<String, Box<RawValue>>,
}

/// What [`super::map_fields`] may take instead of reading the record: fields moved out of it, fields
/// kept raw, and the raw fields it passed on.
#[derive(Debug, Default)]
pub(super) struct Taken {
    pub(super) values: Map<String, Value>,
    pub(super) raw: BTreeMap<String, Box<RawValue>>,
    pub(super) passed: Vec<(String, Box<RawValue>)>,
}

impl SourceFields {
    /// From every path the rules read (once per reading rule) and what they read at its end.
    pub(super) fn new<'a>(reads: impl IntoIterator<Item = (&'a [String], Shape)>) -> Self {
        let mut fields = Self::default();
        for (path, shape) in reads {
            let (root, rest) = path.split_first().expect("a path has a name");
            let shape = Shape::along(rest, shape);
            match fields.read.get_mut(root) {
                Some(known) => {
                    known.merge(shape);
                    fields.read_once.remove(root);
                }
                None => {
                    fields.read.insert(root.clone(), shape);
                    fields.read_once.insert(root.clone());
                }
            }
        }
        fields
    }

    /// Parses a record's JSON, keeping the fields in `read` (an object with every other field
    /// left out; those in `raw` as raw JSON). What is not an object is parsed whole, to fail as it
    /// would.
    pub(super) fn parse(&self, json: &str) -> Result<SourceRecord, serde_json::Error> {
        if !json.trim_start().starts_with('{') {
            return Ok(SourceRecord {
                fields: serde_json::from_str(json)?,
                raw: BTreeMap::new(),
            });
        }
        let selected = select_top_level(json, |key| {
            if self.raw.contains(key) {
                Some((key.to_owned(), Read::Raw))
            } else {
                let (key, shape) = self.read.get_key_value(key)?;
                Some((key.clone(), Read::Parsed(shape)))
            }
        })?;
        let mut fields = Map::new();
        let mut raw = BTreeMap::new();
        // A repeated key counts with its last value, as in a whole tree.
        for (key, field) in selected {
            match field {
                Field::Parsed(value) => {
                    fields.insert(key, value);
                }
                Field::Raw(value) => {
                    raw.insert(key, value);
                }
            }
        }
        Ok(SourceRecord {
            fields: Value::Object(fields),
            raw,
        })
    }
}

/// How a kept field is read: parsed into a tree (of what the rules read), or kept as raw JSON.
enum Read<'a> {
    Parsed(&'a Shape),
    Raw,
}

/// A kept field as [`Read`] read it.
enum Field {
    Parsed(Value),
    Raw(Box<RawValue>),
}

impl<'de> DeserializeSeed<'de> for Read<'_> {
    type Value = Field;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Field, D::Error> {
        Ok(match self {
            Read::Parsed(shape) => Field::Parsed(Projected(shape).deserialize(deserializer)?),
            Read::Raw => Field::Raw(Box::<RawValue>::deserialize(deserializer)?),
        })
    }
}

/// Reads a value into a tree of what `Shape` says is read; the rest is skipped, checked to be JSON.
struct Projected<'a>(&'a Shape);

impl<'de> DeserializeSeed<'de> for Projected<'_> {
    type Value = Value;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        match self.0 {
            Shape::Whole => Value::deserialize(deserializer),
            Shape::Fields(_) => deserializer.deserialize_any(ProjectedVisitor(self.0)),
        }
    }
}

/// [`Projected`] of a [`Shape::Fields`]: values other than objects and arrays come whole, as a
/// `serde_json::Value` would read them.
struct ProjectedVisitor<'a>(&'a Shape);

impl<'de> Visitor<'de> for ProjectedVisitor<'_> {
    type Value = Value;

    fn expecting(&self, formatter: &mut fmt::Formatter) -> fmt::Result {
        formatter.write_str("a JSON value")
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Value, A::Error> {
        let Shape::Fields(fields) = self.0 else {
            return Value::deserialize(MapAccessDeserializer::new(map));
        };
        let selected = select_entries(map, |key| {
            let (key, shape) = fields.get_key_value(key)?;
            Some((key.clone(), Projected(shape)))
        })?;
        // A repeated key counts with its last value, as in a whole tree.
        Ok(Value::Object(selected.into_iter().collect::<Map<_, _>>()))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut items: A) -> Result<Value, A::Error> {
        let mut kept = Vec::with_capacity(items.size_hint().unwrap_or(0));
        while let Some(item) = items.next_element_seed(Projected(self.0))? {
            kept.push(item);
        }
        Ok(Value::Array(kept))
    }

    fn visit_bool<E>(self, value: bool) -> Result<Value, E> {
        Ok(Value::Bool(value))
    }

    fn visit_i64<E>(self, value: i64) -> Result<Value, E> {
        Ok(Value::Number(value.into()))
    }

    fn visit_u64<E>(self, value: u64) -> Result<Value, E> {
        Ok(Value::Number(value.into()))
    }

    fn visit_f64<E>(self, value: f64) -> Result<Value, E> {
        Ok(Number::from_f64(value).map_or(Value::Null, Value::Number))
    }

    fn visit_str<E>(self, value: &str) -> Result<Value, E> {
        Ok(Value::String(value.to_owned()))
    }

    fn visit_string<E>(self, value: String) -> Result<Value, E> {
        Ok(Value::String(value))
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
}
