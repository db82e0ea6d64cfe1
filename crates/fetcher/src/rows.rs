//! Rows into records: only a row's id and modify time are read; its JSON goes on unchanged.

use std::marker::PhantomData;

use conveyor_base::json::select_top_level;
use conveyor_base::{ErrorClass, Failure, Record, source_time};
use serde_json::Value;
use serde_json::value::RawValue;

use crate::settings::SyncSettings;

/// Turns rows into records; rows without a usable id or modify time are returned apart, with the reason.
/// Each row's JSON goes on unchanged: only its id and modify time are read.
pub fn to_records(
    source: &SyncSettings,
    rows: Vec<Box<RawValue>>,
) -> (Vec<Record>, Vec<(Record, Failure)>) {
    let mut records = Vec::with_capacity(rows.len());
    let mut rejected = Vec::new();
    for row in rows {
        let keys = RowKeys::read(source, &row);
        let id = match keys.id {
            Some(Value::String(text)) if !text.is_empty() => Some(text),
            Some(Value::Number(number)) => Some(number.to_string()),
            _ => None,
        };
        let modify_time = keys.modify_time.as_ref().map(source_time::parse_instant);
        let (id, problem) = match (id, modify_time) {
            (Some(id), Some(Ok(modify_time))) => {
                records.push(Record {
                    id,
                    modify_time,
                    data: row,
                });
                continue;
            }
            (None, _) => (
                None,
                format!("row has no usable id field {:?}", source.id_field),
            ),
            (id, None) => (
                id,
                format!(
                    "row has no modify time field {:?}",
                    source.modify_time_field
                ),
            ),
            (id, Some(Err(err))) => (
                id,
                format!("modify time field {:?}: {err}", source.modify_time_field),
            ),
        };
        let record = Record {
            id: id.unwrap_or_default(),
            modify_time: source_time::from_epoch_millis(0).expect("epoch is in range"),
            data: row,
        };
        rejected.push((record, Failure::new(ErrorClass::Permanent, problem)));
    }
    (records, rejected)
}

/// The id and modify time fields of a row, read without building the rest of it (a row that is not an
/// object has neither).
#[derive(Debug, Default)]
struct RowKeys {
    id: Option<Value>,
    modify_time: Option<Value>,
}

impl RowKeys {
    fn read(source: &SyncSettings, row: &RawValue) -> Self {
        let selected = select_top_level(row.get(), |key| {
            let field = match (key == source.id_field, key == source.modify_time_field) {
                (true, true) => Field::Both,
                (true, false) => Field::Id,
                (false, true) => Field::ModifyTime,
                (false, false) => return None,
            };
            Some((field, PhantomData::<Value>))
        });
        let mut keys = RowKeys::default();
        // A repeated key counts with its last value, as in a JSON tree.
        for (field, value) in selected.unwrap_or_default() {
            match field {
                Field::Id => keys.id = Some(value),
                Field::ModifyTime => keys.modify_time = Some(value),
                Field::Both => {
                    keys.modify_time = Some(value.clone());
                    keys.id = Some(value);
                }
            }
        }
        keys
    }
}

/// Which of the fields the fetcher reads a key names.
enum Field {
    Id,
    ModifyTime,
    /// A source whose id field is its modify time field.
    Both,
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn source() -> SyncSettings {
        SyncSettings {
            start_time: source_time::from_epoch_millis(0).unwrap(),
            window: Duration::from_secs(3600),
            lag: Duration::ZERO,
            overlap: Duration::ZERO,
            max_window_rows: 1000,
            records_per_message: 100,
            id_field: "id".into(),
            modify_time_field: "modify_time".into(),
        }
    }

    fn rows(texts: &[&str]) -> Vec<Box<RawValue>> {
        texts
            .iter()
            .map(|text| RawValue::from_string((*text).to_owned()).unwrap())
            .collect()
    }

    #[test]
    fn rows_pass_unchanged_and_unusable_ones_are_set_apart_with_the_reason() {
        let good = r#"{"material_entity":[{"id":"9","modify_time":"x"}],"id":"7", "modify_time":"2025-01-02 03:04:05","n":1.50}"#;
        let (records, rejected) = to_records(
            &source(),
            rows(&[
                good,
                r#"{"i\u0064":8,"modify_time":1735750000000}"#,
                r#"{"id":"","modify_time":"2025-01-02 03:04:05"}"#,
                r#"{"id":"10"}"#,
                r#"{"id":"11","modify_time":"soon"}"#,
                r#"[1,2]"#,
                r#"{"id":"12","id":"13","modify_time":"2025-01-02 03:04:05"}"#,
            ]),
        );
        let ids: Vec<&str> = records.iter().map(|record| record.id.as_str()).collect();
        assert_eq!(ids, ["7", "8", "13"]);
        assert_eq!(
            records[0].data.get(),
            good,
            "the row's JSON is passed on as it came"
        );
        assert_eq!(
            records[0].modify_time.to_rfc3339(),
            "2025-01-02T03:04:05+08:00"
        );
        let reasons: Vec<(&str, &str)> = rejected
            .iter()
            .map(|(record, failure)| (record.id.as_str(), failure.message.as_str()))
            .collect();
        assert_eq!(reasons.len(), 4);
        assert!(reasons[0].0.is_empty() && reasons[0].1.contains("no usable id"));
        assert!(reasons[1] == ("10", r#"row has no modify time field "modify_time""#));
        assert!(
            reasons[2].0 == "11"
                && reasons[2]
                    .1
                    .starts_with(r#"modify time field "modify_time""#)
        );
        assert!(reasons[3].1.contains("no usable id"));
        assert_eq!(rejected[3].0.data.get(), "[1,2]");
    }
}
