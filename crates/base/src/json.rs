//! Reading chosen top-level fields of a JSON object without building the rest of it.

use std::fmt;

use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, Visitor};

/// Reads the top-level fields of the JSON object `json` that `select` picks, skipping every other
/// value unparsed (checked to be JSON, never built).
///
/// `select` sees each key (unescaped, not allocated) and answers `None` to skip its value, or a tag
/// of the caller's and the [`DeserializeSeed`] to read the value with: `PhantomData::<T>` reads a
/// `T` (e.g. a `serde_json::Value`, or `&RawValue` to keep it as raw JSON borrowed from `json`).
/// The picked fields come back in the order they are written, a repeated key once per occurrence:
/// the caller decides which counts (a JSON tree keeps the last).
///
/// What is not an object, and anything after the object but white space, is an error.
pub fn select_top_level<'de, K, S>(
    json: &'de str,
    select: impl FnMut(&str) -> Option<(K, S)>,
) -> Result<Vec<(K, S::Value)>, serde_json::Error>
where
    S: DeserializeSeed<'de>,
{
    let mut reader = serde_json::Deserializer::from_str(json);
    let selected = (&mut reader).deserialize_map(Selected(select))?;
    reader.end()?;
    Ok(selected)
}

struct Selected<F>(F);

impl<'de, K, S, F> Visitor<'de> for Selected<F>
where
    S: DeserializeSeed<'de>,
    F: FnMut(&str) -> Option<(K, S)>,
{
    type Value = Vec<(K, S::Value)>;

    fn expecting(&self, formatter: &mut fmt::Formatter) -> fmt::Result {
        formatter.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
        select_entries(map, self.0)
    }
}

/// The entries of an object being read (`map`) that `select` picks, as [`select_top_level`] reads
/// them: for a [`Visitor`] that keeps part of an object at any depth.
pub fn select_entries<'de, A, K, S>(
    mut map: A,
    mut select: impl FnMut(&str) -> Option<(K, S)>,
) -> Result<Vec<(K, S::Value)>, A::Error>
where
    A: MapAccess<'de>,
    S: DeserializeSeed<'de>,
{
    let mut selected = Vec::new();
    while let Some(picked) = map.next_key_seed(KeyOf(&mut select))? {
        match picked {
            Some((tag, seed)) => selected.push((tag, map.next_value_seed(seed)?)),
            None => {
                map.next_value::<IgnoredAny>()?;
            }
        }
    }
    Ok(selected)
}

/// Reads a key and hands it to the selector in place: borrowed from the input, or from the
/// deserializer's buffer when it had escapes to undo.
struct KeyOf<'a, F>(&'a mut F);

impl<'de, K, S, F> DeserializeSeed<'de> for KeyOf<'_, F>
where
    F: FnMut(&str) -> Option<(K, S)>,
{
    type Value = Option<(K, S)>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_str(self)
    }
}

impl<'de, K, S, F> Visitor<'de> for KeyOf<'_, F>
where
    F: FnMut(&str) -> Option<(K, S)>,
{
    type Value = Option<(K, S)>;

    fn expecting(&self, formatter: &mut fmt::Formatter) -> fmt::Result {
        formatter.write_str("a field name")
    }

    fn visit_str<E: serde::de::Error>(self, key: &str) -> Result<Self::Value, E> {
        Ok((self.0)(key))
    }
}

#[cfg(test)]
mod tests {
    use std::marker::PhantomData;

    use serde_json::value::RawValue;
    use serde_json::{Value, json};

    use super::*;

    /// The raw JSON of the fields named `wanted`, with their names.
    fn raw<'a>(
        json: &'a str,
        wanted: &[&str],
    ) -> Result<Vec<(String, &'a str)>, serde_json::Error> {
        let selected = select_top_level(json, |key| {
            wanted
                .contains(&key)
                .then(|| (key.to_owned(), PhantomData::<&RawValue>))
        })?;
        Ok(selected
            .into_iter()
            .map(|(key, value)| (key, value.get()))
            .collect())
    }

    fn pairs<'a>(expected: &[(&str, &'a str)]) -> Vec<(String, &'a str)> {
        expected
            .iter()
            .map(|(key, value)| ((*key).to_owned(), *value))
            .collect()
    }

    #[test]
    fn picked_fields_come_raw_and_in_order_the_rest_is_skipped() {
        let json = r#" {"a": 1, "skip": {"deep": [1, {"x": "\u0041"}], "b": 2}, "b" : {"c": [true, null]}, "c":"t\"x"} "#;
        assert_eq!(
            raw(json, &["b", "a", "c"]).unwrap(),
            pairs(&[
                ("a", "1"),
                ("b", r#"{"c": [true, null]}"#),
                ("c", r#""t\"x""#)
            ])
        );
        assert_eq!(
            raw(json, &["x", "deep"]).unwrap(),
            pairs(&[]),
            "keys of nested objects are not top-level keys"
        );
        assert_eq!(raw("{}", &["a"]).unwrap(), pairs(&[]));
    }

    #[test]
    fn escaped_keys_are_compared_unescaped() {
        let json = r#"{"\u0069d": 7, "a\"b": 8, "\u5ba2\u6237": 9, "i\\d": 10}"#;
        assert_eq!(
            raw(json, &["id", "a\"b", "客户"]).unwrap(),
            pairs(&[("id", "7"), ("a\"b", "8"), ("客户", "9")])
        );
        assert_eq!(raw(json, &["i\\d"]).unwrap(), pairs(&[("i\\d", "10")]));
    }

    #[test]
    fn a_repeated_key_comes_once_per_occurrence() {
        assert_eq!(
            raw(r#"{"id": 1, "x": 0, "id": 2}"#, &["id"]).unwrap(),
            pairs(&[("id", "1"), ("id", "2")])
        );
    }

    #[test]
    fn values_are_read_with_the_seed_given_for_their_key() {
        let selected = select_top_level(r#"{"a": {"b": [1]}, "n": 1.50}"#, |key| {
            (key != "z").then_some((key.len(), PhantomData::<Value>))
        })
        .unwrap();
        assert_eq!(selected, [(1, json!({"b": [1]})), (1, json!(1.5))]);
    }

    #[test]
    fn what_is_not_one_object_is_an_error() {
        for json in [
            "[1, 2]",
            "\"id\"",
            "1",
            "null",
            "",
            "{\"a\": 1",
            "{\"a\": 1} {}",
            "{\"a\": 1} x",
        ] {
            assert!(raw(json, &["a"]).is_err(), "{json:?}");
        }
        assert!(
            raw(r#"{"a": 1, "skip": [1,]}"#, &["a"]).is_err(),
            "skipped values are still checked to be JSON"
        );
    }
}
