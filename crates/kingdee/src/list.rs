//! The list endpoints' response: a page of rows with the counts the API reports with it.

use conveyor_base::source::Page;
use serde::Deserialize;
use serde_json::value::RawValue;

/// A count the API writes as a number on some lists and as a string on others.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum Count {
    Number(u64),
    Text(String),
}

impl Count {
    fn value(&self, field: &str) -> Result<u64, String> {
        match self {
            Count::Number(n) => Ok(*n),
            Count::Text(text) => text
                .trim()
                .parse()
                .map_err(|_| format!("{field} {text:?} is not a number")),
        }
    }
}

/// The `data` of a list response as it is read off the wire (the gateway reads it in the same pass as
/// the rest of the answer).
#[derive(Debug, Deserialize)]
pub struct ListData {
    count: Count,
    total_page: Count,
    #[serde(default)]
    rows: Vec<Box<RawValue>>,
}

impl ListData {
    /// The page, its counts read as numbers (whether it agrees with them is [`Page::check`]'s part).
    pub fn into_page(self) -> Result<Page, String> {
        Ok(Page {
            count: self.count.value("count")?,
            total_pages: self.total_page.value("total_page")?,
            rows: self.rows,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn data(count: serde_json::Value) -> ListData {
        serde_json::from_value(json!({"count": count, "total_page": 1, "rows": [{}, {}, {}]}))
            .unwrap()
    }

    #[test]
    fn a_count_may_be_a_number_or_a_string() {
        assert_eq!(data(json!(3)).into_page().unwrap().count, 3);
        assert_eq!(data(json!(" 3")).into_page().unwrap().count, 3);
        let err = data(json!("many")).into_page().unwrap_err();
        assert_eq!(err, r#"count "many" is not a number"#);
    }
}
