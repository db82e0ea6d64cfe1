//! Reading a source record for the rules: only the fields they read are parsed, at any depth (the
//! rest is skipped unparsed: of entry lines mapped field by field, only those fields), a top-level
//! field read by one rule alone is moved into the output, never copied, and a field passed on
//! unchanged stays raw JSON.

use std::collections::BTreeMap;
use std::fmt;

use serde::Deserialize;
use serde::de::value::MapAccessDeserializer;
use serde::de::{DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;
use serde_json::{Map, Number, Value};

use conveyor_base::json::{select_entries, select_top_level};

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

/// The top-level source fields a mapping reads: each has a slot in a parsed record.
#[derive(Debug, Clone, Default)]
pub(super) struct SourceFields {
    slots: BTreeMap<String, usize>,
    roots: Vec<Root>,
}

/// A top-level source field the rules read.
#[derive(Debug, Clone)]
struct Root {
    name: String,
    /// What of it the rules read.
    shape: Shape,
    /// One rule alone reads it: the value is moved into the output, never copied.
    alone: bool,
    /// Its rule writes it unchanged: kept as raw JSON, never parsed.
    raw: bool,
}

/// Where a rule finds its top-level source field in a parsed record.
#[derive(Debug, Clone, Copy)]
pub(super) struct SlotRef {
    pub(super) index: usize,
    /// Whether this rule alone reads the field, and may take it.
    pub(super) alone: bool,
}

/// A source record parsed for [`super::Mapping::apply_owned`].
#[derive(Debug)]
pub struct SourceRecord(pub(super) Parsed);

#[derive(Debug)]
pub(super) enum Parsed {
    /// An object: the value of each field the rules read, by slot.
    Slots(Vec<Slot>),
    /// Anything else, whole, to fail as it would.
    Whole(Value),
}

/// A top-level field of a parsed record.
#[derive(Debug, Default)]
pub(super) enum Slot {
    #[default]
    Missing,
    Value(Value),
    Raw(Box<RawValue>),
}

impl SourceFields {
    /// From every path the rules read (once per reading rule) and what they read at its end.
    pub(super) fn new<'a>(reads: impl IntoIterator<Item = (&'a [String], Shape)>) -> Self {
        let mut fields = Self::default();
        for (path, shape) in reads {
            let (name, rest) = path.split_first().expect("a path has a name");
            let shape = Shape::along(rest, shape);
            match fields.slots.get(name) {
                Some(&index) => {
                    let root = &mut fields.roots[index];
                    root.shape.merge(shape);
                    root.alone = false;
                }
                None => {
                    fields.slots.insert(name.clone(), fields.roots.len());
                    fields.roots.push(Root {
                        name: name.clone(),
                        shape,
                        alone: true,
                        raw: false,
                    });
                }
            }
        }
        fields
    }

    /// Where the top-level field `name` is kept, if the rules read it.
    pub(super) fn slot(&self, name: &str) -> Option<SlotRef> {
        let index = *self.slots.get(name)?;
        Some(SlotRef {
            index,
            alone: self.roots[index].alone,
        })
    }

    /// Keeps the field `name`, which one rule alone reads, as raw JSON.
    pub(super) fn keep_raw(&mut self, name: &str) {
        if let Some(&index) = self.slots.get(name) {
            self.roots[index].raw = self.roots[index].alone;
        }
    }

    /// Parses a record's JSON, keeping the fields the rules read (of each, what they read), every
    /// other field skipped unparsed. What is not an object is parsed whole, to fail as it would.
    pub(super) fn parse(&self, json: &str) -> Result<SourceRecord, serde_json::Error> {
        if !json.trim_start().starts_with('{') {
            return Ok(SourceRecord(Parsed::Whole(serde_json::from_str(json)?)));
        }
        let selected = select_top_level(json, |key| {
            let index = *self.slots.get(key)?;
            let root = &self.roots[index];
            Some((
                index,
                if root.raw {
                    Read::Raw
                } else {
                    Read::Parsed(&root.shape)
                },
            ))
        })?;
        let mut slots: Vec<Slot> = std::iter::repeat_with(Slot::default)
            .take(self.roots.len())
            .collect();
        // A repeated key counts with its last value, as in a whole tree.
        for (index, field) in selected {
            slots[index] = match field {
                Field::Parsed(value) => Slot::Value(value),
                Field::Raw(value) => Slot::Raw(value),
            };
        }
        Ok(SourceRecord(Parsed::Slots(slots)))
    }

    /// A parsed record as a tree of the fields the rules read, for rules that read it more than once.
    pub(super) fn tree(&self, slots: Vec<Slot>) -> Result<Value, serde_json::Error> {
        let mut fields = Map::new();
        for (root, slot) in self.roots.iter().zip(slots) {
            let value = match slot {
                Slot::Missing => continue,
                Slot::Value(value) => value,
                Slot::Raw(json) => serde_json::from_str(json.get())?,
            };
            fields.insert(root.name.clone(), value);
        }
        Ok(Value::Object(fields))
    }
}

#[cfg(test)]
impl SourceFields {
    /// What a parsed record kept: the fields parsed, and the names of those kept raw.
    pub(super) fn kept(&self, record: SourceRecord) -> (Map<String, Value>, Vec<&str>) {
        let Parsed::Slots(slots) = record.0 else {
            panic!("not an object");
        };
        let mut parsed = Map::new();
        let mut raw = Vec::new();
        for (root, slot) in self.roots.iter().zip(slots) {
            match slot {
                Slot::Missing => {}
                Slot::Value(value) => {
                    parsed.insert(root.name.clone(), value);
                }
                Slot::Raw(_) => raw.push(root.name.as_str()),
            }
        }
        (parsed, raw)
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
