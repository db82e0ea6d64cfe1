//! Reading a source record for the rules: only the top-level fields they read are parsed (the rest
//! is skipped unparsed), and a field read by one rule alone is moved into the output, never copied.

use std::collections::BTreeSet;
use std::fmt;

use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, Visitor};
use serde_json::{Map, Value};

/// The top-level source fields a mapping reads, and those among them that one rule alone reads.
#[derive(Debug, Clone, Default)]
pub(super) struct SourceFields {
    pub(super) read: BTreeSet<String>,
    pub(super) read_once: BTreeSet<String>,
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
    /// left out). What is not an object is parsed whole, to fail as it would.
    pub(super) fn parse(&self, json: &str) -> Result<Value, serde_json::Error> {
        if !json.trim_start().starts_with('{') {
            return serde_json::from_str(json);
        }
        let mut reader = serde_json::Deserializer::from_str(json);
        let fields = (&mut reader).deserialize_map(Kept(&self.read))?;
        reader.end()?;
        Ok(Value::Object(fields))
    }
}

struct Kept<'a>(&'a BTreeSet<String>);

impl<'de> Visitor<'de> for Kept<'_> {
    type Value = Map<String, Value>;

    fn expecting(&self, formatter: &mut fmt::Formatter) -> fmt::Result {
        formatter.write_str("a record object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut fields = Map::new();
        while let Some(key) = map.next_key_seed(KeptKey(self.0))? {
            match key {
                // A repeated key counts with its last value, as in a whole tree.
                Some(key) => {
                    fields.insert(key, map.next_value()?);
                }
                None => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(fields)
    }
}

/// A key, allocated only when it is kept.
struct KeptKey<'a>(&'a BTreeSet<String>);

impl<'de> DeserializeSeed<'de> for KeptKey<'_> {
    type Value = Option<String>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for KeptKey<'_> {
    type Value = Option<String>;

    fn expecting(&self, formatter: &mut fmt::Formatter) -> fmt::Result {
        formatter.write_str("a field name")
    }

    fn visit_str<E: serde::de::Error>(self, key: &str) -> Result<Self::Value, E> {
        Ok(self.0.contains(key).then(|| key.to_owned()))
    }
}
