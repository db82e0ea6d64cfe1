//! Type conversion of one value: text, whole numbers, exact decimals, booleans, instants and dates.
//!
//! Errors say what was expected and never echo the value, which may be personal data.

use std::str::FromStr;

use chrono::format::{Item, StrftimeItems};
use chrono::{DateTime, FixedOffset, NaiveDate, NaiveDateTime, TimeZone, Utc};
use rust_decimal::Decimal;
use serde::Deserialize;
use serde_json::Value;

use conveyor_base::source_time::{self, kind_of};

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
    /// An instant, from epoch milliseconds, local text or RFC 3339; written as RFC 3339 by default.
    Datetime,
    /// A calendar date, written as `yyyy-MM-dd` by default.
    Date,
}

/// A time zone: a fixed offset (`+08:00`, `Z`) or an IANA name (`Asia/Shanghai`, with its rules).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Zone {
    Fixed(FixedOffset),
    Named(chrono_tz::Tz),
}

impl Zone {
    pub fn parse(text: &str) -> Result<Self, String> {
        if text == "Z" || text == "UTC" {
            return Ok(Zone::Fixed(FixedOffset::east_opt(0).expect("zero offset")));
        }
        if let Ok(offset) = FixedOffset::from_str(text) {
            return Ok(Zone::Fixed(offset));
        }
        chrono_tz::Tz::from_str(text).map(Zone::Named).map_err(|_| {
            format!("{text:?} is not a time zone (an offset like +08:00, Z, or an IANA name like Asia/Shanghai)")
        })
    }

    /// The instant of a local time in this zone; an error for a time skipped or repeated by a DST change.
    fn local(&self, local: NaiveDateTime) -> Result<DateTime<FixedOffset>, String> {
        let single = match self {
            Zone::Fixed(offset) => offset.from_local_datetime(&local).single(),
            Zone::Named(tz) => tz
                .from_local_datetime(&local)
                .single()
                .map(|instant| instant.fixed_offset()),
        };
        single
            .ok_or_else(|| "a local time that does not exist (or is ambiguous) in its zone".into())
    }

    fn render(&self, instant: DateTime<Utc>) -> DateTime<FixedOffset> {
        match self {
            Zone::Fixed(offset) => instant.with_timezone(offset),
            Zone::Named(tz) => instant.with_timezone(tz).fixed_offset(),
        }
    }
}

/// How instants and dates are read and written.
#[derive(Debug, Clone)]
pub struct TimeRules {
    /// strftime pattern of text input, tried before the usual forms.
    pub input_format: Option<String>,
    /// Zone of local times in the input (default China Standard Time).
    pub input_zone: Zone,
    /// How to write the value.
    pub output: TimeOutput,
    /// Zone the value is written in (default China Standard Time).
    pub output_zone: Zone,
}

impl Default for TimeRules {
    fn default() -> Self {
        let cst = Zone::Fixed(source_time::china_standard_time());
        Self {
            input_format: None,
            input_zone: cst,
            output: TimeOutput::Rfc3339,
            output_zone: cst,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TimeOutput {
    Rfc3339,
    EpochMillis,
    Pattern(Pattern),
}

/// A strftime pattern, parsed once (parsing it for every value would cost more than the formatting).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pattern(Vec<Item<'static>>);

impl Pattern {
    pub fn parse(pattern: &str) -> Result<Self, String> {
        check_pattern(pattern)?;
        StrftimeItems::new(pattern)
            .parse_to_owned()
            .map(Self)
            .map_err(|_| format!("{pattern:?} is not a valid strftime pattern (e.g. %m/%d/%Y)"))
    }

    fn format(&self, instant: &DateTime<FixedOffset>) -> String {
        instant.format_with_items(self.0.iter()).to_string()
    }
}

impl TimeOutput {
    /// `rfc3339`, `epoch_millis`, or a strftime pattern (checked here, so a typo fails at load).
    pub fn parse(text: &str) -> Result<Self, String> {
        match text {
            "rfc3339" => Ok(Self::Rfc3339),
            "epoch_millis" => Ok(Self::EpochMillis),
            pattern => Pattern::parse(pattern).map(Self::Pattern),
        }
    }
}

/// Whether a strftime pattern is valid and has at least one field.
pub fn check_pattern(pattern: &str) -> Result<(), String> {
    let items: Vec<Item> = StrftimeItems::new(pattern).collect();
    if items.iter().any(|item| matches!(item, Item::Error)) {
        return Err(format!(
            "{pattern:?} is not a valid strftime pattern (e.g. %m/%d/%Y)"
        ));
    }
    if !items
        .iter()
        .any(|item| matches!(item, Item::Numeric(..) | Item::Fixed(_)))
    {
        return Err(format!(
            "{pattern:?} has no date or time fields; use rfc3339, epoch_millis or a strftime pattern like %m/%d/%Y"
        ));
    }
    Ok(())
}

/// Converts a non-null value to `kind`.
pub fn convert(value: Value, kind: FieldType, time: &TimeRules) -> Result<Value, String> {
    match kind {
        FieldType::Json => Ok(value),
        FieldType::String => match value {
            Value::String(text) => Ok(Value::String(text)),
            Value::Number(_) | Value::Bool(_) => Ok(Value::String(value.to_string())),
            other => Err(format!("expected text, found {}", kind_of(&other))),
        },
        FieldType::Integer => match value {
            Value::Number(ref number) if number.is_i64() || number.is_u64() => Ok(value),
            Value::String(text) => text
                .trim()
                .parse::<i64>()
                .map(Value::from)
                .map_err(|_| "expected a whole number".to_owned()),
            other => Err(format!(
                "expected a whole number, found {}",
                kind_of(&other)
            )),
        },
        FieldType::Decimal => {
            let decimal = decimal(&value)?;
            match value {
                // Already written as the decimal would write itself: keep the text, skip formatting.
                Value::String(text) if is_canonical_decimal(&text) => Ok(Value::String(text)),
                _ => Ok(Value::String(decimal.to_string())),
            }
        }
        FieldType::Boolean => match value {
            Value::Bool(flag) => Ok(Value::Bool(flag)),
            Value::Number(number) if number.as_u64() == Some(1) => Ok(Value::Bool(true)),
            Value::Number(number) if number.as_u64() == Some(0) => Ok(Value::Bool(false)),
            Value::String(text) => match text.trim().to_ascii_lowercase().as_str() {
                "1" | "true" => Ok(Value::Bool(true)),
                "0" | "false" => Ok(Value::Bool(false)),
                _ => Err("expected 1, 0, true or false".to_owned()),
            },
            other => Err(format!("expected a boolean, found {}", kind_of(&other))),
        },
        FieldType::Datetime => {
            let instant = time.output_zone.render(instant(&value, time)?);
            Ok(match &time.output {
                TimeOutput::Rfc3339 => Value::String(instant.to_rfc3339()),
                TimeOutput::EpochMillis => Value::from(instant.timestamp_millis()),
                TimeOutput::Pattern(pattern) => Value::String(pattern.format(&instant)),
            })
        }
        FieldType::Date => {
            let instant = time.output_zone.render(instant(&value, time)?);
            Ok(Value::String(match &time.output {
                TimeOutput::Pattern(pattern) => pattern.format(&instant),
                _ => instant.format("%Y-%m-%d").to_string(),
            }))
        }
    }
}

/// An exact decimal from text or a JSON number (read from its literal digits, never through a float).
pub fn decimal(value: &Value) -> Result<Decimal, String> {
    let text = match value {
        Value::String(text) => text.trim(),
        Value::Number(number) => &number.to_string(),
        other => return Err(format!("expected a decimal, found {}", kind_of(other))),
    };
    Decimal::from_str(text)
        .or_else(|_| Decimal::from_scientific(text))
        .map_err(|_| "expected a decimal number".to_owned())
}

/// Whether text is a plain decimal exactly as `rust_decimal` prints it: an optional `-`, no leading
/// zeros, an optional fraction, and few enough digits that nothing was rounded when it was read.
fn is_canonical_decimal(text: &str) -> bool {
    let digits = text.strip_prefix('-').unwrap_or(text);
    let (whole, fraction) = digits.split_once('.').unwrap_or((digits, ""));
    let plain = |part: &str| part.bytes().all(|b| b.is_ascii_digit());
    !whole.is_empty()
        && plain(whole)
        && plain(fraction)
        && (whole == "0" || !whole.starts_with('0'))
        && (digits.len() == whole.len() || !fraction.is_empty())
        && whole.len() + fraction.len() <= 28
        // A negative zero prints without its sign.
        && !(text.starts_with('-') && digits.bytes().all(|b| b == b'0' || b == b'.'))
}

/// Reads an instant: with the field's input pattern if it has one, else epoch milliseconds, local
/// `yyyy-MM-dd HH:mm:ss` / `yyyy-MM-dd` in the input zone, or RFC 3339.
fn instant(value: &Value, time: &TimeRules) -> Result<DateTime<Utc>, String> {
    if let (Some(pattern), Value::String(text)) = (&time.input_format, value) {
        let text = text.trim();
        if let Ok(instant) = DateTime::parse_from_str(text, pattern) {
            return Ok(instant.to_utc());
        }
        let local = NaiveDateTime::parse_from_str(text, pattern).or_else(|_| {
            NaiveDate::parse_from_str(text, pattern)
                .map(|date| date.and_hms_opt(0, 0, 0).expect("midnight exists"))
        });
        return match local {
            Ok(local) => time.input_zone.local(local).map(|instant| instant.to_utc()),
            Err(_) => Err(format!("expected a time in the form {pattern:?}")),
        };
    }
    source_time::parse_instant_with(value, |local| time.input_zone.local(local))
        .map(|instant| instant.to_utc())
        .map_err(|err| err.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn rules(output: &str, zone: &str) -> TimeRules {
        TimeRules {
            output: TimeOutput::parse(output).unwrap(),
            output_zone: Zone::parse(zone).unwrap(),
            ..TimeRules::default()
        }
    }

    #[test]
    fn epoch_millis_to_and_from_rfc3339_in_zones() {
        let millis = json!(1_700_000_000_000_i64);
        let cst = convert(millis.clone(), FieldType::Datetime, &TimeRules::default()).unwrap();
        assert_eq!(cst, json!("2023-11-15T06:13:20+08:00"));
        let utc = convert(millis.clone(), FieldType::Datetime, &rules("rfc3339", "Z")).unwrap();
        assert_eq!(utc, json!("2023-11-14T22:13:20+00:00"));
        let back = convert(
            cst.clone(),
            FieldType::Datetime,
            &rules("epoch_millis", "Z"),
        )
        .unwrap();
        assert_eq!(back, millis);
        // New York is on standard time in November (UTC-5), on daylight time in July (UTC-4).
        let ny = rules("rfc3339", "America/New_York");
        assert_eq!(
            convert(millis.clone(), FieldType::Datetime, &ny).unwrap(),
            json!("2023-11-14T17:13:20-05:00")
        );
        assert_eq!(
            convert(json!("2023-07-01 12:00:00"), FieldType::Datetime, &ny).unwrap(),
            json!("2023-07-01T00:00:00-04:00")
        );
    }

    #[test]
    fn local_source_times_are_china_standard_time() {
        let utc = convert(
            json!("2020-03-02 15:15:59"),
            FieldType::Datetime,
            &rules("epoch_millis", "Z"),
        )
        .unwrap();
        assert_eq!(utc, json!(1_583_133_359_000_i64));
    }

    #[test]
    fn custom_date_formats_in_and_out() {
        let us = TimeRules {
            input_format: Some("%Y-%m-%d".into()),
            ..rules("%m/%d/%Y", "+08:00")
        };
        assert_eq!(
            convert(json!("2020-03-03"), FieldType::Date, &us).unwrap(),
            json!("03/03/2020")
        );
        assert!(convert(json!("03/03/2020"), FieldType::Date, &us).is_err());
        // A date late in the evening in China is still the day before in UTC.
        assert_eq!(
            convert(
                json!("2020-03-03 07:00:00"),
                FieldType::Date,
                &rules("%Y-%m-%d", "Z")
            )
            .unwrap(),
            json!("2020-03-02")
        );
        assert!(TimeOutput::parse("%Q").is_err());
        assert!(TimeOutput::parse("MM/dd").is_err());
        assert!(Zone::parse("Mars/Olympus").is_err());
    }

    #[test]
    fn kept_decimal_text_is_what_the_decimal_would_print() {
        for text in [
            "0",
            "1",
            "-1",
            "20.20",
            "-0.00",
            "0.5",
            "123456789012345678901234567.8",
            "10",
            "0.10",
            "99999999999999999999999999.99",
            "-0.0",
            "1.0000000000000000000000000000",
        ] {
            // Kept text must be exactly what printing would give (the check may decline more).
            let printed = Decimal::from_str(text).unwrap().to_string();
            if is_canonical_decimal(text) {
                assert_eq!(printed, text);
            }
        }
        assert!(is_canonical_decimal("20.20") && is_canonical_decimal("-3"));
    }

    #[test]
    fn numbers_decimals_and_booleans() {
        let none = TimeRules::default();
        assert_eq!(
            convert(json!(" 42 "), FieldType::Integer, &none).unwrap(),
            json!(42)
        );
        assert!(convert(json!("4.2"), FieldType::Integer, &none).is_err());
        for (input, expected) in [
            (json!("0.1"), "0.1"),
            (
                json!("12345678901234567890.123456789"),
                "12345678901234567890.123456789",
            ),
            (json!(20.2), "20.2"),
            (json!("1e-3"), "0.001"),
            (json!(" 20.20 "), "20.20"),
            (json!("+5"), "5"),
            (json!("007.50"), "7.50"),
            (json!("-0.5"), "-0.5"),
            (json!("-0"), "0"),
            (json!("5."), "5"),
            (json!("-0.00"), "0.00"),
            (
                json!("0.0000000000000000000000000001"),
                "0.0000000000000000000000000001",
            ),
        ] {
            assert_eq!(
                convert(input.clone(), FieldType::Decimal, &none).unwrap(),
                json!(expected)
            );
        }
        for (input, expected) in [("1", true), ("0", false), ("true", true), ("FALSE", false)] {
            assert_eq!(
                convert(json!(input), FieldType::Boolean, &none).unwrap(),
                json!(expected)
            );
        }
        assert!(convert(json!("yes"), FieldType::Boolean, &none).is_err());
        assert_eq!(
            convert(json!(7), FieldType::String, &none).unwrap(),
            json!("7")
        );
    }
}
