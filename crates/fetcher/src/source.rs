//! A plain client of a Kingdee list endpoint: one page per call, checked against the counts the API
//! reports. (Request signing, tokens and rate limits are layered on in the Kingdee connector.)

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;
use serde_json::Value;

/// Why a page could not be fetched. All are worth retrying: the source may answer right next time.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("request failed: {0}")]
    Http(#[from] reqwest::Error),
    #[error("HTTP status {0}")]
    Status(u16),
    #[error("business error {errcode}: {description}")]
    Business { errcode: i64, description: String },
    #[error("unexpected response: {0}")]
    Shape(String),
    #[error("page {page} is inconsistent: {problem}")]
    Inconsistent { page: u64, problem: String },
}

/// A count that the API writes as a number on some lists and as a string on others.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Count {
    Number(u64),
    Text(String),
}

impl Count {
    fn value(&self) -> Result<u64, SourceError> {
        match self {
            Count::Number(n) => Ok(*n),
            Count::Text(text) => text
                .trim()
                .parse()
                .map_err(|_| SourceError::Shape(format!("count {text:?} is not a number"))),
        }
    }
}

#[derive(Debug, Deserialize)]
struct ListResponse {
    #[serde(alias = "code")]
    errcode: i64,
    #[serde(default, alias = "msg")]
    description: String,
    data: Option<ListData>,
}

#[derive(Debug, Deserialize)]
struct ListData {
    count: Count,
    total_page: Count,
    #[serde(default)]
    rows: Vec<Value>,
}

/// One page of rows with the totals the source reported alongside.
#[derive(Debug)]
pub struct Page {
    pub rows: Vec<Value>,
    pub count: u64,
    pub total_page: u64,
}

/// Calls one list endpoint.
#[derive(Debug, Clone)]
pub struct ListClient {
    http: reqwest::Client,
    url: String,
    page_size: u32,
    query: BTreeMap<String, String>,
}

impl ListClient {
    pub fn new(
        base_url: &str,
        path: &str,
        page_size: u32,
        query: BTreeMap<String, String>,
    ) -> Self {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .expect("an HTTP client without TLS settings builds");
        Self {
            http,
            url: format!("{}{path}", base_url.trim_end_matches('/')),
            page_size,
            query,
        }
    }

    /// Fetches page `page` (from 1) and checks its row count against the reported totals: a short page
    /// is an error, never a success, since trusting it would skip rows silently.
    pub async fn fetch_page(&self, page: u64) -> Result<Page, SourceError> {
        let mut query: Vec<(&str, String)> = vec![
            ("page", page.to_string()),
            ("page_size", self.page_size.to_string()),
        ];
        query.extend(
            self.query
                .iter()
                .map(|(key, value)| (key.as_str(), value.clone())),
        );
        let response = self.http.get(&self.url).query(&query).send().await?;
        let status = response.status();
        if !status.is_success() {
            return Err(SourceError::Status(status.as_u16()));
        }
        let body: ListResponse = response
            .json()
            .await
            .map_err(|err| SourceError::Shape(err.to_string()))?;
        if body.errcode != 0 && body.errcode != 200 {
            return Err(SourceError::Business {
                errcode: body.errcode,
                description: body.description,
            });
        }
        let data = body
            .data
            .ok_or_else(|| SourceError::Shape("success without data".into()))?;
        let page_data = Page {
            count: data.count.value()?,
            total_page: data.total_page.value()?,
            rows: data.rows,
        };
        page_data.check(page, u64::from(self.page_size))?;
        Ok(page_data)
    }
}

impl Page {
    fn check(&self, page: u64, page_size: u64) -> Result<(), SourceError> {
        let inconsistent = |problem: String| Err(SourceError::Inconsistent { page, problem });
        let expected_pages = self.count.div_ceil(page_size);
        if self.total_page != expected_pages {
            return inconsistent(format!(
                "total_page {} but count {} at page_size {page_size} makes {expected_pages}",
                self.total_page, self.count
            ));
        }
        let before = (page - 1).saturating_mul(page_size);
        let expected_rows = self.count.saturating_sub(before).min(page_size);
        if self.rows.len() as u64 != expected_rows {
            return inconsistent(format!(
                "{} rows but count {} makes {expected_rows} on this page",
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

    fn page(rows: usize, count: u64, total_page: u64) -> Page {
        Page {
            rows: vec![Value::Null; rows],
            count,
            total_page,
        }
    }

    #[test]
    fn full_and_last_pages_pass() {
        assert!(page(100, 250, 3).check(1, 100).is_ok());
        assert!(page(50, 250, 3).check(3, 100).is_ok());
        assert!(page(0, 0, 0).check(1, 100).is_ok());
    }

    #[test]
    fn short_pages_and_miscounted_totals_fail() {
        assert!(page(99, 250, 3).check(1, 100).is_err());
        // The capped-page quirk: 100 rows served for a page_size of 500 while total_page says 1.
        assert!(page(100, 250, 1).check(1, 500).is_err());
    }

    #[test]
    fn count_may_be_a_string() {
        let data: ListData =
            serde_json::from_str(r#"{"count":"3","total_page":1,"rows":[1,2,3]}"#).unwrap();
        assert_eq!(data.count.value().unwrap(), 3);
    }
}
