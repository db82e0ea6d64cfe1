//! The list endpoints' response, checked against the totals the API reports with it.

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
/// the rest of the answer); [`Page::from_list`] checks it.
#[derive(Debug, Deserialize)]
pub struct ListData {
    count: Count,
    total_page: Count,
    #[serde(default)]
    rows: Vec<Box<RawValue>>,
}

/// One page of rows with the totals the source reported alongside.
#[derive(Debug, Clone)]
pub struct Page {
    /// The rows as the source wrote them: read only for their id and modify time, passed on unchanged.
    pub rows: Vec<Box<RawValue>>,
    /// Rows matching the query, all pages together, at the moment this page was served.
    pub count: u64,
    pub total_page: u64,
}

impl Page {
    /// Checks that page `page` of size `page_size` holds as many rows as `count` says: a short page is
    /// an error, never a success, since trusting it would skip rows silently.
    pub fn from_list(data: ListData, page: u64, page_size: u64) -> Result<Self, String> {
        let parsed = Self {
            count: data.count.value("count")?,
            total_page: data.total_page.value("total_page")?,
            rows: data.rows,
        };
        parsed.check(page, page_size)?;
        Ok(parsed)
    }

    fn check(&self, page: u64, page_size: u64) -> Result<(), String> {
        let expected_pages = self.count.div_ceil(page_size);
        if self.total_page != expected_pages {
            return Err(format!(
                "page {page}: total_page {} but count {} at page_size {page_size} makes {expected_pages}",
                self.total_page, self.count
            ));
        }
        let before = (page - 1).saturating_mul(page_size);
        let expected_rows = self.count.saturating_sub(before).min(page_size);
        if self.rows.len() as u64 != expected_rows {
            return Err(format!(
                "page {page}: {} rows but count {} makes {expected_rows} on this page",
                self.rows.len(),
                self.count
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    fn data(rows: usize, count: Value, total_page: u64) -> ListData {
        let data = json!({"count": count, "total_page": total_page, "rows": vec![json!({}); rows]});
        serde_json::from_value(data).unwrap()
    }

    #[test]
    fn full_and_last_pages_pass() {
        assert!(Page::from_list(data(100, json!(250), 3), 1, 100).is_ok());
        assert!(Page::from_list(data(50, json!(250), 3), 3, 100).is_ok());
        assert!(Page::from_list(data(0, json!(0), 0), 1, 100).is_ok());
    }

    #[test]
    fn count_may_be_a_string() {
        let page = Page::from_list(data(3, json!("3"), 1), 1, 100).unwrap();
        assert_eq!(page.count, 3);
    }

    #[test]
    fn short_pages_and_miscounted_totals_fail() {
        assert!(Page::from_list(data(99, json!(250), 3), 1, 100).is_err());
        // The capped-page quirk: 100 rows served for a page_size of 500 while total_page says 1.
        assert!(Page::from_list(data(100, json!(250), 1), 1, 500).is_err());
        assert!(Page::from_list(data(1, json!("many"), 1), 1, 100).is_err());
    }
}
