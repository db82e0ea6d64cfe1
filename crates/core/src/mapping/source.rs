//! Reading a source record for the rules: only the top-level fields they read are parsed (the rest
//! is skipped unparsed), a field read by one rule alone is moved into the output, never copied, and a
//! field passed on unchanged stays raw JSON.

use std::collections::{BTreeMap, BTreeSet};

use serde::Deserialize;
use serde::de::{DeserializeSeed, Deserializer};
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use crate::json::select_top_level;

/// The top-level source fields a mapping reads, and those among them that one rule alone reads.
#[derive(Debug, Clone, Default)]
pub(super) struct SourceFields {
    pub(super) read: BTreeSet<String>,
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
    /// From the roots of every path the rules read, a root once per reading rule.
    pub(super) fn new<'a>(roots: impl IntoIterator<Item = &'a str>) -> Self {
        let mut fields = Self::default();
        for root in roots {
            if fields.read.insert(root.to_owned()) {
                fields.read_once.insert(root.to_owned());
            } else {
                fields.read_once.remove(root);
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
            } else if self.read.contains(key) {
                Some((key.to_owned(), Read::Parsed))
            } else {
                None
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

/// How a kept field is read: parsed into a tree, or kept as raw JSON.
enum Read {
    Parsed,
    Raw,
}

/// A kept field as [`Read`] read it.
enum Field {
    Parsed(Value),
    Raw(Box<RawValue>),
}

impl<'de> DeserializeSeed<'de> for Read {
    type Value = Field;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Field, D::Error> {
        Ok(match self {
            Read::Parsed => Field::Parsed(Value::deserialize(deserializer)?),
            Read::Raw => Field::Raw(Box::<RawValue>::deserialize(deserializer)?),
        })
    }
}
