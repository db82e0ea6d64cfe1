//! A list query's modify-time window and paging, read and checked as the gateway does.

use serde_json::value::RawValue;

use crate::GATEWAY_MAX_PAGE_SIZE;
use crate::data::LOCAL_TIME_FORMAT;
use crate::error::{BusinessError, business_error, query_value};

/// A list query's modify-time bounds.
pub(crate) struct Window {
    pub(crate) start: Option<String>,
    pub(crate) end: Option<String>,
}

impl Window {
    /// The modify-time bounds of a query as local time text, which orders like time. Both ends inclusive.
    pub(crate) fn parse(query: &[(String, String)]) -> Result<Self, BusinessError> {
        let bound = |name: &str| -> Result<Option<String>, BusinessError> {
            let Some(text) = query_value(query, name) else {
                return Ok(None);
            };
            let millis: i64 = text.parse().map_err(|_| {
                business_error(1_030_002_006, format!("{name} must be epoch milliseconds"))
            })?;
            let instant = chrono::DateTime::from_timestamp_millis(millis)
                .ok_or_else(|| business_error(1_030_002_006, format!("{name} is out of range")))?;
            let local = instant + chrono::Duration::hours(8);
            Ok(Some(local.format(LOCAL_TIME_FORMAT).to_string()))
        };
        Ok(Self {
            start: bound("modify_start_time")?,
            end: bound("modify_end_time")?,
        })
    }

    pub(crate) fn contains(&self, modify_time: &str) -> bool {
        self.start
            .as_deref()
            .is_none_or(|start| modify_time >= start)
            && self.end.as_deref().is_none_or(|end| modify_time <= end)
    }
}

/// The paging a list call asked for.
pub(crate) struct Paging {
    pub(crate) page: usize,
    pub(crate) requested_size: usize,
    /// The size served: the gateway caps it at 100.
    pub(crate) size: usize,
}

impl Paging {
    pub(crate) fn parse(query: &[(String, String)]) -> Result<Self, BusinessError> {
        let parse = |name: &str, default: usize| -> Result<usize, BusinessError> {
            match query_value(query, name) {
                None => Ok(default),
                Some(text) => text
                    .parse::<usize>()
                    .ok()
                    .filter(|n| *n >= 1)
                    .ok_or_else(|| {
                        business_error(1_030_002_000, format!("{name} must be a positive integer"))
                    }),
            }
        };
        let page = parse("page", 1)?;
        let requested_size = parse("page_size", 10)?;
        Ok(Self {
            page,
            requested_size,
            size: requested_size.min(GATEWAY_MAX_PAGE_SIZE),
        })
    }

    /// Where this page starts among the matching rows (any page number, however large, is an answer).
    pub(crate) fn start(&self) -> usize {
        (self.page - 1).saturating_mul(self.size)
    }

    /// The matching rows' count and this page of them, rendered by `render` (only the page is).
    pub(crate) fn take<T>(
        &self,
        rows: impl Iterator<Item = T>,
        render: impl Fn(T) -> Box<RawValue>,
    ) -> (usize, Vec<Box<RawValue>>) {
        let matching: Vec<T> = rows.collect();
        let count = matching.len();
        let start = self.start().min(count);
        let end = (start + self.size).min(count);
        let page = matching
            .into_iter()
            .skip(start)
            .take(end - start)
            .map(render)
            .collect();
        (count, page)
    }
}
