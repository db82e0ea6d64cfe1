//! Reading a source record for the rules: only the top-level fields they read are parsed (the rest
//! is skipped unparsed), a field read by one rule alone is moved into the output, never copied, and a
//! field passed on unchanged stays raw JSON.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, Visitor};
use serde_json::value::RawValue;
use serde_json::{Map, Value};

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
        let mut reader = serde_json::Deserializer::from_str(json);
        let record = (&mut reader).deserialize_map(Kept(self))?;
        reader.end()?;
        Ok(record)
    }
}

struct Kept<'a>(&'a SourceFields);

impl<'de> Visitor<'de> for Kept<'_> {
    type Value = SourceRecord;

    fn expecting(&self, formatter: &mut fmt::Formatter) -> fmt::Result {
        formatter.write_str("a record object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut fields = Map::new();
        let mut raw = BTreeMap::new();
        // A repeated key counts with its last value, as in a whole tree.
        while let Some(key) = map.next_key_seed(KeptKey(self.0))? {
            match key {
                Key::Parsed(key) => {
                    fields.insert(key, map.next_value()?);
                }
                Key::Raw(key) => {
                    raw.insert(key, map.next_value()?);
                }
                Key::Skipped => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(SourceRecord {
            fields: Value::Object(fields),
            raw,
        })
    }
}

enum Key {
    Parsed(String),
    Raw(String),
    Skipped,
}

/// A key, allocated only when it is kept.
struct KeptKey<'a>(&'a SourceFields);

impl<'de> DeserializeSeed<'de> for KeptKey<'_> {
    type Value = Key;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for KeptKey<'_> {
    type Value = Key;

    fn expecting(&self, formatter: &mut fmt::Formatter) -> fmt::Result {
        formatter.write_str("a field name")
    }

    fn visit_str<E: serde::de::Error>(self, key: &str) -> Result<Self::Value, E> {
        Ok(if self.0.raw.contains(key) {
            Key::Raw(key.to_owned())
        } else if self.0.read.contains(key) {
            Key::Parsed(key.to_owned())
        } else {
            Key::Skipped
        })
    }
}
