//! The transformation of one source record into one output record, declared in the pipeline file.
//!
//! Each output field names where it comes from (a dotted path into the source record) and what type it
//! must become. Money becomes an exact decimal written as a string (never a float); times become
//! RFC 3339. A mapping is compiled once when the pipeline file loads, so that a mistake in it is
//! reported before any record moves.

use std::collections::BTreeSet;
use std::str::FromStr;

use chrono::{DateTime, FixedOffset};
use rust_decimal::Decimal;
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::source_time::{self, kind_of};

/// The `[transform]` section of a pipeline file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TransformSpec {
    /// The output field that identifies a record in the target (its primary key).
    pub key: String,
    /// The output field that orders versions of a record: a newer one replaces an older one, never the
    /// reverse. Must be a `datetime` field.
    pub version: String,
    /// The output fields, in order.
    pub fields: Vec<FieldSpec>,
}

/// One output field.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FieldSpec {
    /// Name of the output field.
    pub to: String,
    /// Dotted path of the source field (`customer.name`); the output name if omitted.
    pub from: Option<String>,
    /// The type the value is converted to.
    #[serde(default, rename = "type")]
    pub kind: FieldType,
    /// A record without this field (or with null) is an error instead of getting null.
    #[serde(default)]
    pub required: bool,
}

/// What a field's value is converted to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FieldType {
    /// Copied unchanged.
    #[default]
    Json,
    /// Text; numbers and booleans are written out as text.
    String,
    /// A whole number (from a number or numeric text).
    Integer,
    /// An exact decimal, written as a string so that no consumer reads it through a float.
    Decimal,
    /// `true`/`false` from booleans, 1/0, "1"/"0", "true"/"false".
    Boolean,
    /// An RFC 3339 instant, from epoch milliseconds, CST local text or RFC 3339.
    Datetime,
    /// A `yyyy-MM-dd` calendar date.
    Date,
}

/// A problem in the mapping's declaration: the field (a path in the pipeline file) and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecProblem {
    pub field: String,
    pub problem: String,
}

/// A record that cannot be mapped: the output field and why. Never contains the value itself, which
/// may be personal data.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("field {field:?}: {reason}")]
pub struct FieldError {
    pub field: String,
    pub reason: String,
}

#[derive(Debug, Clone)]
struct CompiledField {
    to: String,
    from: Vec<String>,
    kind: FieldType,
    required: bool,
}

/// A compiled mapping, ready to apply to records.
#[derive(Debug, Clone)]
pub struct Mapping {
    fields: Vec<CompiledField>,
    key: String,
    version: String,
}

/// One mapped record with the identity and version the target needs.
#[derive(Debug, Clone, PartialEq)]
pub struct MappedRecord {
    pub id: String,
    pub version: DateTime<FixedOffset>,
    pub data: Map<String, Value>,
}

impl Mapping {
    pub fn compile(spec: &TransformSpec) -> Result<Self, SpecProblem> {
        let mut seen = BTreeSet::new();
        let mut fields = Vec::with_capacity(spec.fields.len());
        for (index, field) in spec.fields.iter().enumerate() {
            let at = |part: &str| format!("transform.fields[{index}].{part}");
            if field.to.trim().is_empty() {
                return Err(problem(at("to"), "must not be empty"));
            }
            if !seen.insert(field.to.as_str()) {
                return Err(problem(
                    at("to"),
                    format!("{:?} is produced twice", field.to),
                ));
            }
            let from = field.from.as_deref().unwrap_or(&field.to);
            let path: Vec<String> = from.split('.').map(str::to_owned).collect();
            if path.iter().any(String::is_empty) {
                return Err(problem(
                    at("from"),
                    format!("{from:?} is not a dotted path"),
                ));
            }
            fields.push(CompiledField {
                to: field.to.clone(),
                from: path,
                kind: field.kind,
                required: field.required,
            });
        }
        let find = |name: &str| fields.iter().find(|field| field.to == name);
        match find(&spec.key) {
            None => return Err(problem("transform.key", not_produced(&spec.key))),
            Some(field) if !matches!(field.kind, FieldType::String | FieldType::Integer) => {
                return Err(problem(
                    "transform.key",
                    format!("{:?} must have type string or integer", spec.key),
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
            Some(_) => {}
        }
        // The key and the version are what make writes idempotent: a record without them cannot go on.
        for field in &mut fields {
            if field.to == spec.key || field.to == spec.version {
                field.required = true;
            }
        }
        Ok(Self {
            fields,
            key: spec.key.clone(),
            version: spec.version.clone(),
        })
    }

    /// The names of the output fields, in order.
    pub fn output_fields(&self) -> impl Iterator<Item = &str> {
        self.fields.iter().map(|field| field.to.as_str())
    }

    pub fn key_field(&self) -> &str {
        &self.key
    }

    pub fn version_field(&self) -> &str {
        &self.version
    }

    /// Maps one source record.
    pub fn apply(&self, source: &Value) -> Result<MappedRecord, FieldError> {
        let mut data = Map::with_capacity(self.fields.len());
        for field in &self.fields {
            let found = lookup(source, &field.from).filter(|value| !value.is_null());
            let value = match found {
                Some(value) => convert(value, field.kind).map_err(|reason| FieldError {
                    field: field.to.clone(),
                    reason,
                })?,
                None if field.required => {
                    return Err(FieldError {
                        field: field.to.clone(),
                        reason: format!(
                            "required, but {:?} is missing or null",
                            field.from.join(".")
                        ),
                    });
                }
                None => Value::Null,
            };
            data.insert(field.to.clone(), value);
        }
        let id = match &data[&self.key] {
            Value::String(text) => text.clone(),
            other => other.to_string(),
        };
        let version =
            source_time::parse_instant(&data[&self.version]).map_err(|err| FieldError {
                field: self.version.clone(),
                reason: err.to_string(),
            })?;
        Ok(MappedRecord { id, version, data })
    }
}

fn problem(field: impl Into<String>, problem: impl Into<String>) -> SpecProblem {
    SpecProblem {
        field: field.into(),
        problem: problem.into(),
    }
}

fn not_produced(name: &str) -> String {
    format!("{name:?} is not one of the output fields (transform.fields[].to)")
}

fn lookup<'a>(value: &'a Value, path: &[String]) -> Option<&'a Value> {
    path.iter()
        .try_fold(value, |current, part| current.get(part))
}

fn convert(value: &Value, kind: FieldType) -> Result<Value, String> {
    match kind {
        FieldType::Json => Ok(value.clone()),
        FieldType::String => match value {
            Value::String(text) => Ok(Value::String(text.clone())),
            Value::Number(_) | Value::Bool(_) => Ok(Value::String(value.to_string())),
            other => Err(format!("expected text, found {}", kind_of(other))),
        },
        FieldType::Integer => match value {
            Value::Number(number) if number.is_i64() || number.is_u64() => Ok(value.clone()),
            Value::String(text) => text
                .trim()
                .parse::<i64>()
                .map(Value::from)
                .map_err(|_| "expected a whole number".to_owned()),
            other => Err(format!("expected a whole number, found {}", kind_of(other))),
        },
        FieldType::Decimal => {
            let text = match value {
                Value::String(text) => text.trim().to_owned(),
                Value::Number(number) => number.to_string(),
                other => return Err(format!("expected a decimal, found {}", kind_of(other))),
            };
            Decimal::from_str(&text)
                .or_else(|_| Decimal::from_scientific(&text))
                .map(|decimal| Value::String(decimal.to_string()))
                .map_err(|_| "expected a decimal number".to_owned())
        }
        FieldType::Boolean => match value {
            Value::Bool(flag) => Ok(Value::Bool(*flag)),
            Value::Number(number) if number.as_u64() == Some(1) => Ok(Value::Bool(true)),
            Value::Number(number) if number.as_u64() == Some(0) => Ok(Value::Bool(false)),
            Value::String(text) => match text.trim().to_ascii_lowercase().as_str() {
                "1" | "true" => Ok(Value::Bool(true)),
                "0" | "false" => Ok(Value::Bool(false)),
                _ => Err("expected 1, 0, true or false".to_owned()),
            },
            other => Err(format!("expected a boolean, found {}", kind_of(other))),
        },
        FieldType::Datetime => source_time::parse_instant(value)
            .map(|instant| Value::String(instant.to_rfc3339()))
            .map_err(|err| err.to_string()),
        FieldType::Date => source_time::parse_instant(value)
            .map(|instant| Value::String(instant.format("%Y-%m-%d").to_string()))
            .map_err(|err| err.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn spec(fields: Value) -> TransformSpec {
        serde_json::from_value(json!({"key": "id", "version": "modified", "fields": fields}))
            .unwrap()
    }

    fn order_mapping() -> Mapping {
        Mapping::compile(&spec(json!([
            {"to": "id", "type": "string"},
            {"to": "modified", "from": "modify_time", "type": "datetime"},
            {"to": "total", "from": "total_amount", "type": "decimal"},
            {"to": "customer", "from": "customer.name", "type": "string"},
            {"to": "lines", "from": "material_entity"},
            {"to": "enabled", "from": "enable", "type": "boolean"},
            {"to": "bill_date", "type": "date"},
            {"to": "qty", "type": "integer"},
        ])))
        .unwrap()
    }

    #[test]
    fn maps_renames_and_converts() {
        let source = json!({
            "id": 839081161182436352_u64,
            "modify_time": "2020-03-02 15:15:59",
            "total_amount": "20.20",
            "customer": {"name": "客户A"},
            "material_entity": [{"seq": 1}],
            "enable": "1",
            "bill_date": "2020-03-03",
            "qty": "7",
            "ignored": "x",
        });
        let record = order_mapping().apply(&source).unwrap();
        assert_eq!(record.id, "839081161182436352");
        assert_eq!(record.version.to_rfc3339(), "2020-03-02T15:15:59+08:00");
        assert_eq!(
            Value::Object(record.data),
            json!({
                "id": "839081161182436352",
                "modified": "2020-03-02T15:15:59+08:00",
                "total": "20.20",
                "customer": "客户A",
                "lines": [{"seq": 1}],
                "enabled": true,
                "bill_date": "2020-03-03",
                "qty": 7,
            })
        );
    }

    #[test]
    fn decimals_stay_exact() {
        let mapping = order_mapping();
        let base = json!({"id": "1", "modify_time": 1_700_000_000_000_i64});
        for (input, expected) in [
            (json!("0.1"), "0.1"),
            (
                json!("12345678901234567890.123456789"),
                "12345678901234567890.123456789",
            ),
            (json!(20.2), "20.2"),
            (json!("-3"), "-3"),
        ] {
            let mut source = base.clone();
            source["total_amount"] = input;
            assert_eq!(
                mapping.apply(&source).unwrap().data["total"],
                json!(expected)
            );
        }
    }

    #[test]
    fn missing_optional_field_is_null_but_missing_key_is_an_error() {
        let mapping = order_mapping();
        let record = mapping
            .apply(&json!({"id": "1", "modify_time": "2020-03-02 15:15:59"}))
            .unwrap();
        assert_eq!(record.data["total"], Value::Null);
        let err = mapping
            .apply(&json!({"modify_time": "2020-03-02 15:15:59"}))
            .unwrap_err();
        assert_eq!(err.field, "id");
    }

    #[test]
    fn bad_values_name_the_field_not_the_value() {
        let err = order_mapping()
            .apply(&json!({"id": "1", "modify_time": "2020-03-02 15:15:59", "total_amount": "12,5 secret"}))
            .unwrap_err();
        assert_eq!(err.field, "total");
        assert!(!err.to_string().contains("secret"), "{err}");
    }

    #[test]
    fn compile_errors_name_the_field() {
        let err = Mapping::compile(&spec(json!([{"to": "id", "type": "string"}]))).unwrap_err();
        assert_eq!(err.field, "transform.version");
        let err = Mapping::compile(&spec(json!([
            {"to": "id", "type": "string"},
            {"to": "id", "from": "modify_time", "type": "datetime"},
        ])))
        .unwrap_err();
        assert_eq!(err.field, "transform.fields[1].to");
        let err = Mapping::compile(&spec(json!([
            {"to": "id", "type": "string"},
            {"to": "modified", "type": "string"},
        ])))
        .unwrap_err();
        assert_eq!(err.field, "transform.version");
    }
}
