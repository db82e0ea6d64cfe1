//! Batches as the text format of `COPY ... FROM STDIN`: one line per record, one tab-separated field
//! per mapped column, each as the column's own text input reads it.
//!
//! - A JSON string is its characters; a number, `true` or `false` its JSON text as sent (no float on
//!   the way, so decimals stay exact); a missing field or JSON null is `\N`.
//! - A json or jsonb column takes the value's JSON text, whatever the value is.
//! - An array column takes a JSON array as an array literal (`{"a","b"}`).
//!
//! So a record reaches its table with the same values `jsonb_populate_record` would give it.

use std::collections::HashMap;

use serde_json::value::RawValue;

/// How a column's text input wants a JSON value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ColumnKind {
    /// Scalars: text, numbers, times, booleans, enums.
    Scalar,
    /// json and jsonb.
    Json,
    /// Arrays of any element type.
    Array,
}

impl ColumnKind {
    /// The kind of a column by its `information_schema.columns.data_type`.
    pub fn of_data_type(data_type: &str) -> Self {
        match data_type {
            "json" | "jsonb" => Self::Json,
            "ARRAY" => Self::Array,
            _ => Self::Scalar,
        }
    }
}

/// A mapped column of the target table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    pub name: String,
    pub kind: ColumnKind,
}

/// Appends the line of one record (a JSON object) for `columns`, or says why the record cannot be
/// one.
pub fn push_row(line: &mut Vec<u8>, record: &str, columns: &[Column]) -> Result<(), String> {
    let fields: HashMap<String, &RawValue> = serde_json::from_str(record)
        .map_err(|err| format!("the record is not a JSON object: {err}"))?;
    for (index, column) in columns.iter().enumerate() {
        if index > 0 {
            line.push(b'\t');
        }
        match fields.get(&column.name) {
            None => line.extend_from_slice(b"\\N"),
            Some(value) => push_value(line, value.get(), column.kind)?,
        }
    }
    line.push(b'\n');
    Ok(())
}

fn push_value(line: &mut Vec<u8>, json: &str, kind: ColumnKind) -> Result<(), String> {
    let first = json.as_bytes().first().copied().unwrap_or(b'n');
    match (kind, first) {
        (_, b'n') => line.extend_from_slice(b"\\N"),
        (ColumnKind::Json, _) => escape_into(line, json),
        (_, b'"') => escape_into(line, &parse_string(json)?),
        (ColumnKind::Array, b'[') => {
            let mut literal = String::new();
            array_literal(&mut literal, json)?;
            escape_into(line, &literal);
        }
        // Numbers and booleans as sent; an object into a scalar column as its JSON text.
        _ => escape_into(line, json),
    }
    Ok(())
}

fn parse_string(json: &str) -> Result<String, String> {
    serde_json::from_str(json).map_err(|err| format!("a field is not valid JSON: {err}"))
}

/// A JSON array as a PostgreSQL array literal: elements double-quoted, nested arrays nested.
fn array_literal(out: &mut String, json: &str) -> Result<(), String> {
    let items: Vec<&RawValue> =
        serde_json::from_str(json).map_err(|err| format!("a field is not a JSON array: {err}"))?;
    out.push('{');
    for (index, item) in items.iter().enumerate() {
        if index > 0 {
            out.push(',');
        }
        let text = item.get();
        match text.as_bytes().first() {
            Some(b'n') => out.push_str("NULL"),
            Some(b'[') => array_literal(out, text)?,
            Some(b'"') => quote_element(out, &parse_string(text)?),
            _ => quote_element(out, text),
        }
    }
    out.push('}');
    Ok(())
}

fn quote_element(out: &mut String, element: &str) {
    out.push('"');
    for c in element.chars() {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
}

/// COPY's text format escapes: a backslash, and the tab, newline and carriage return that would end a
/// field or a line.
fn escape_into(line: &mut Vec<u8>, text: &str) {
    for &byte in text.as_bytes() {
        match byte {
            b'\\' => line.extend_from_slice(b"\\\\"),
            b'\t' => line.extend_from_slice(b"\\t"),
            b'\n' => line.extend_from_slice(b"\\n"),
            b'\r' => line.extend_from_slice(b"\\r"),
            _ => line.push(byte),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(record: &str, columns: &[(&str, ColumnKind)]) -> String {
        let columns: Vec<Column> = columns
            .iter()
            .map(|(name, kind)| Column {
                name: (*name).to_owned(),
                kind: *kind,
            })
            .collect();
        let mut line = Vec::new();
        push_row(&mut line, record, &columns).unwrap();
        String::from_utf8(line).unwrap()
    }

    #[test]
    fn scalars_keep_their_text_and_nulls_are_marked() {
        use ColumnKind::Scalar;
        let line = row(
            r#"{"id":"a\tb\\c","total":12345678901234567890.123456789,"ok":true,"gone":null}"#,
            &[
                ("id", Scalar),
                ("total", Scalar),
                ("ok", Scalar),
                ("gone", Scalar),
                ("missing", Scalar),
            ],
        );
        assert_eq!(
            line,
            "a\\tb\\\\c\t12345678901234567890.123456789\ttrue\t\\N\t\\N\n"
        );
    }

    #[test]
    fn json_columns_take_json_text_and_arrays_take_literals() {
        let line = row(
            r#"{"lines":[{"note":"a\nb"}],"name":"x","tags":["a","b\"c",null,["d"]],"qty":[1,2]}"#,
            &[
                ("lines", ColumnKind::Json),
                ("name", ColumnKind::Json),
                ("tags", ColumnKind::Array),
                ("qty", ColumnKind::Array),
            ],
        );
        assert_eq!(
            line,
            "[{\"note\":\"a\\\\nb\"}]\t\"x\"\t{\"a\",\"b\\\\\"c\",NULL,{\"d\"}}\t{\"1\",\"2\"}\n"
        );
    }

    #[test]
    fn a_record_that_is_not_an_object_is_refused() {
        let mut line = Vec::new();
        let id = Column {
            name: "id".into(),
            kind: ColumnKind::Scalar,
        };
        let error = push_row(&mut line, "[1]", &[id]).unwrap_err();
        assert!(error.contains("not a JSON object"), "{error}");
    }
}
