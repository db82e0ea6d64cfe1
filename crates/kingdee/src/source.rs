//! Kingdee as a source of the sync engine: a list endpoint read by modify-time window, page by page.

use std::collections::BTreeMap;

use conveyor_base::source::{Page, RateBudget, Source, Window};
use conveyor_base::{ErrorClass, Failure};

use crate::gateway::{Gateway, GatewayError};
use crate::list::ListData;

/// One list endpoint (a business object) of one account set.
pub struct KingdeeSource<B> {
    gateway: Gateway<B>,
    /// The list endpoint, e.g. `/jdy/v2/scm/sal_order`.
    path: String,
    /// Query parameters of every list call besides the page and the window.
    query: Vec<(String, String)>,
    page_size: u32,
}

impl<B: RateBudget> KingdeeSource<B> {
    /// `page_size` is at most what the gateway serves (`conveyor_pipeline::source::MAX_PAGE_SIZE`).
    pub fn new(
        gateway: Gateway<B>,
        path: &str,
        query: &BTreeMap<String, String>,
        page_size: u32,
    ) -> Self {
        Self {
            gateway,
            path: path.to_owned(),
            query: query
                .iter()
                .map(|(key, value)| (key.clone(), value.clone()))
                .collect(),
            page_size,
        }
    }
}

impl From<GatewayError> for Failure {
    fn from(err: GatewayError) -> Self {
        match err {
            GatewayError::Transient(message) => Failure::new(ErrorClass::Transient, message),
            GatewayError::Permanent(message) => Failure::new(ErrorClass::Permanent, message),
            GatewayError::Throttled(message) => Failure::new(ErrorClass::Throttled, message),
            GatewayError::Refused(message) => Failure::new(ErrorClass::Refused, message),
        }
    }
}

impl<B: RateBudget> Source for KingdeeSource<B> {
    fn page_size(&self) -> u64 {
        u64::from(self.page_size)
    }

    async fn check(&self) -> Result<(), Failure> {
        Ok(self.gateway.check_credentials().await?)
    }

    async fn page(&self, window: &Window, number: u64) -> Result<Page, Failure> {
        // The list calls filter by modify time in epoch milliseconds, as text.
        let mut query = vec![
            ("page".to_owned(), number.to_string()),
            ("page_size".to_owned(), self.page_size.to_string()),
            (
                "modify_start_time".to_owned(),
                window.start.timestamp_millis().to_string(),
            ),
            (
                "modify_end_time".to_owned(),
                window.end.timestamp_millis().to_string(),
            ),
        ];
        query.extend(self.query.iter().cloned());
        let data: ListData = self.gateway.get(&self.path, &query).await?;
        // Counts that are not numbers are an answer to ask for again, like a page at odds with them.
        data.into_page()
            .map_err(|problem| Failure::new(ErrorClass::Transient, problem))
    }
}
