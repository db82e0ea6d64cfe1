//! The source's ways of writing time, read into real instants.
//!
//! Kingdee writes times as epoch milliseconds (a number or a numeric string) or as local
//! `yyyy-MM-dd HH:mm:ss` text in China Standard Time (UTC+8, no daylight saving).

use std::sync::OnceLock;

use chrono::{DateTime, FixedOffset, NaiveDate, NaiveDateTime, TimeZone};
use serde_json::Value;

/// China Standard Time, the zone of the source's local times.
pub fn china_standard_time() -> FixedOffset {
    FixedOffset::east_opt(8 * 3600).expect("UTC+8 is a valid offset")
}

/// Why a value is not a time the source writes (never the value itself).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct TimeError(String);

/// Reads an instant from epoch milliseconds, `yyyy-MM-dd HH:mm:ss` (CST), `yyyy-MM-dd` (CST midnight)
/// or RFC 3339. The result carries the CST offset, so that it prints as the source's local time.
pub fn parse_instant(value: &Value) -> Result<DateTime<FixedOffset>, TimeError> {
    parse_instant_with(value, |local| local_to_instant(local).map_err(|err| err.0))
}

/// Like [`parse_instant`], with local times read by `local` (for sources in another zone).
pub fn parse_instant_with(
    value: &Value,
    local: impl Fn(NaiveDateTime) -> Result<DateTime<FixedOffset>, String>,
) -> Result<DateTime<FixedOffset>, TimeError> {
    match value {
        Value::Number(number) => number
            .as_i64()
            .ok_or_else(|| TimeError("a number that is not whole epoch milliseconds".into()))
            .and_then(from_epoch_millis),
        Value::String(text) => parse_instant_text(text.trim(), local),
        other => Err(TimeError(format!(
            "expected a time, found {}",
            kind_of(other)
        ))),
    }
}

fn parse_instant_text(
    text: &str,
    local: impl Fn(NaiveDateTime) -> Result<DateTime<FixedOffset>, String>,
) -> Result<DateTime<FixedOffset>, TimeError> {
    let cst = china_standard_time();
    if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        let millis = text
            .parse::<i64>()
            .map_err(|_| TimeError("out of range for epoch milliseconds".into()))?;
        return from_epoch_millis(millis);
    }
    if let Some(time) = parse_local(text) {
        return local(time).map_err(TimeError);
    }
    if let Ok(date) = NaiveDate::parse_from_str(text, "%Y-%m-%d") {
        return local(date.and_hms_opt(0, 0, 0).expect("midnight exists")).map_err(TimeError);
    }
    DateTime::parse_from_rfc3339(text)
        .map(|instant| instant.with_timezone(&cst))
        .map_err(|_| {
            // Without the value, which may be personal data when a field is mis-mapped.
            TimeError(
                "expected epoch milliseconds, yyyy-MM-dd HH:mm:ss, yyyy-MM-dd or RFC 3339".into(),
            )
        })
}

/// `yyyy-MM-dd HH:mm:ss`, with the pattern parsed once: it is the form of every source time, and
/// parsing the pattern for each value costs more than reading the value.
fn parse_local(text: &str) -> Option<NaiveDateTime> {
    use chrono::format::{Item, Parsed, StrftimeItems};
    static ITEMS: OnceLock<Vec<Item<'static>>> = OnceLock::new();
    let items = ITEMS.get_or_init(|| {
        StrftimeItems::new("%Y-%m-%d %H:%M:%S")
            .parse_to_owned()
            .expect("a valid pattern")
    });
    let mut parsed = Parsed::new();
    chrono::format::parse(&mut parsed, text, items.iter()).ok()?;
    parsed.to_naive_datetime_with_offset(0).ok()
}

fn local_to_instant(local: NaiveDateTime) -> Result<DateTime<FixedOffset>, TimeError> {
    china_standard_time()
        .from_local_datetime(&local)
        .single()
        .ok_or_else(|| TimeError("a local time that does not exist in China Standard Time".into()))
}

/// Epoch milliseconds as an instant in CST.
pub fn from_epoch_millis(millis: i64) -> Result<DateTime<FixedOffset>, TimeError> {
    DateTime::from_timestamp_millis(millis)
        .map(|utc| utc.with_timezone(&china_standard_time()))
        .ok_or_else(|| TimeError("out of range for epoch milliseconds".into()))
}

/// A word for a JSON value's kind, for error messages that must not echo the value itself.
pub fn kind_of(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn local_cst_text_becomes_rfc3339_with_offset() {
        let instant = parse_instant(&json!("2020-03-02 15:15:59")).unwrap();
        assert_eq!(instant.to_rfc3339(), "2020-03-02T15:15:59+08:00");
        assert_eq!(instant.timestamp(), 1_583_133_359);
    }

    #[test]
    fn epoch_millis_as_number_or_string() {
        let from_number = parse_instant(&json!(1_700_000_000_000_i64)).unwrap();
        let from_text = parse_instant(&json!("1700000000000")).unwrap();
        assert_eq!(from_number, from_text);
        assert_eq!(from_number.to_rfc3339(), "2023-11-15T06:13:20+08:00");
    }

    #[test]
    fn dates_and_rfc3339() {
        assert_eq!(
            parse_instant(&json!("2020-03-03")).unwrap().to_rfc3339(),
            "2020-03-03T00:00:00+08:00"
        );
        assert_eq!(
            parse_instant(&json!("2020-03-03T00:00:00Z"))
                .unwrap()
                .to_rfc3339(),
            "2020-03-03T08:00:00+08:00"
        );
    }

    #[test]
    fn rejects_what_is_not_a_time() {
        for bad in [
            json!("yesterday"),
            json!(true),
            json!(1.5),
            json!("2020-13-01"),
        ] {
            assert!(parse_instant(&bad).is_err(), "{bad} should not parse");
        }
    }
}
