//! One business record as every stage sees it: its id, its version (the modify time) and its fields
//! as JSON text.

use chrono::{DateTime, FixedOffset};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use serde_json::value::RawValue;

/// One business record: its identity and version at the source, and its fields.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Record {
    /// The record's id (the source's id before transformation, the target key after).
    pub id: String,
    /// When the record was last modified; a newer version replaces an older one, never the reverse.
    pub modify_time: DateTime<FixedOffset>,
    /// The fields as JSON text (checked to be JSON when the message is read). Stages that only pass
    /// records on, or hand them to a target that reads JSON, never build a tree of them; the stage that
    /// looks inside parses them ([`Record::fields`]).
    pub data: Box<RawValue>,
}

impl Record {
    pub fn new(id: String, modify_time: DateTime<FixedOffset>, data: &Value) -> Self {
        Self {
            id,
            modify_time,
            data: serde_json::value::to_raw_value(data).expect("a JSON tree serializes"),
        }
    }

    /// The fields as a JSON tree.
    pub fn fields(&self) -> Result<Value, serde_json::Error> {
        serde_json::from_str(self.data.get())
    }
}

/// The same id, version and JSON text.
impl PartialEq for Record {
    fn eq(&self, other: &Self) -> bool {
        self.id == other.id
            && self.modify_time == other.modify_time
            && self.data.get() == other.data.get()
    }
}
