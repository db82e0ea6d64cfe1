//! What the sync engine (`conveyor_fetcher`) asks of a source: rows listed by modify-time window, page
//! by page, each page with the window's row count as the source saw it then.
//!
//! # The checkpoint contract
//! A source keeps no position of its own. The engine's checkpoint is the pipeline's **watermark**:
//! everything modified before it is durable in the broker. It is kept in the sync state, and it moves
//! only as follows, so that a crash at any moment repeats work and never skips it:
//!
//! 1. The engine cuts time into [`Window`]s and hands each out as a work item. A window is durable as
//!    a work item before the plan that made it commits.
//! 2. A window is read through [`Source::page`], pages `1..=total_pages`, and the rows are published.
//!    A window is *finished* only after every one of its messages is confirmed by the broker.
//! 3. The watermark moves up to the start of the oldest window not yet finished, never past it.
//!
//! For this to hold, a source promises:
//! - **Repeatable reads.** Asking for a window's page again returns the rows modified within the
//!   window *now*: a window can be read any number of times, by any process.
//! - **Honest counts.** Every page reports the window's `count` at the moment it was served. The engine
//!   refuses a page whose rows or `total_pages` disagree with its count ([`Page::check`]) and never
//!   takes a short page as the end of the window.
//! - **Stable order while unchanged.** While the window's rows do not change, its pages are a
//!   partition of them. Rows that change while a window is paged may shift between pages; the engine
//!   sees it (the count moves, or a row comes twice) and pages the window again.
//! - **Late rows arrive within a bound.** A row becomes visible at most `lag + overlap` after its
//!   modify time (the pipeline's `source.lag_secs` and `source.overlap_secs`).
//! - **Classified failures.** A failed call is a [`Failure`] whose class says whether trying the
//!   window again later can help.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::value::RawValue;

use crate::{ErrorClass, Failure, Secret};

/// Records modified from `start` to `end`, both inclusive (reading both ends costs at most a repeated
/// row, which idempotent writes absorb).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub start: DateTime<Utc>,
    pub end: DateTime<Utc>,
}

/// One page of a window's rows, with the totals the source reported alongside.
#[derive(Debug, Clone)]
pub struct Page {
    /// The rows as the source wrote them: read only for their id and modify time, passed on unchanged.
    pub rows: Vec<Box<RawValue>>,
    /// Rows in the window, all pages together, at the moment this page was served.
    pub count: u64,
    pub total_pages: u64,
}

impl Page {
    /// Checks that page `number` of size `page_size` holds as many rows as its count says: a short page
    /// is an error, never a success, since trusting it would skip rows silently.
    pub fn check(&self, number: u64, page_size: u64) -> Result<(), String> {
        let expected_pages = self.count.div_ceil(page_size);
        if self.total_pages != expected_pages {
            return Err(format!(
                "page {number}: total_page {} but count {} at page_size {page_size} makes {expected_pages}",
                self.total_pages, self.count
            ));
        }
        let before = number.saturating_sub(1).saturating_mul(page_size);
        let expected_rows = self.count.saturating_sub(before).min(page_size);
        if self.rows.len() as u64 != expected_rows {
            return Err(format!(
                "page {number}: {} rows but count {} makes {expected_rows} on this page",
                self.rows.len(),
                self.count
            ));
        }
        Ok(())
    }
}

/// A source of records by modify-time window; see the module's checkpoint contract.
pub trait Source: Send + Sync + 'static {
    /// Rows per page, as the source serves them (the last page of a window may hold fewer).
    fn page_size(&self) -> u64;

    /// Asked at start: fails when the source cannot be used as configured (an address, a certificate,
    /// a credential), so that a wrong setting is named before any work. A refused credential is
    /// [`ErrorClass::Refused`] (asked again until accepted); one that cannot be told now (the source
    /// is down) is [`ErrorClass::Transient`].
    fn check(&self) -> impl Future<Output = Result<(), Failure>> + Send;

    /// Page `number` (from 1) of the rows modified within `window`.
    fn page(
        &self,
        window: &Window,
        number: u64,
    ) -> impl Future<Output = Result<Page, Failure>> + Send;
}

/// Times a page that disagrees with its own count is asked for again before that is a transient
/// failure.
pub const PAGE_ATTEMPTS: u32 = 3;

/// Page `number` of `window`, asked for again while it disagrees with its own count ([`Page::check`]):
/// it is never taken as it is. `calls` counts every call made.
pub async fn consistent_page<S: Source>(
    source: &S,
    window: &Window,
    number: u64,
    calls: &mut u64,
) -> Result<Page, Failure> {
    let page_size = source.page_size();
    let mut attempt = 0;
    loop {
        *calls += 1;
        let page = source.page(window, number).await?;
        match page.check(number, page_size) {
            Ok(()) => return Ok(page),
            Err(problem) if attempt < PAGE_ATTEMPTS => {
                tracing::warn!(problem, "page inconsistent with its count; asking again");
                attempt += 1;
            }
            Err(problem) => return Err(Failure::new(ErrorClass::Transient, problem)),
        }
    }
}

/// A call budget shared by every process that calls one source account.
pub trait RateBudget: Send + Sync + 'static {
    /// Waits for the next call slot; returns how long it waited.
    fn acquire(&self) -> impl Future<Output = Result<Duration, String>> + Send;

    /// The source refused a call for its rate; `retry_after` is the wait it asked for, if it said.
    /// Returns whether the budget slows every caller itself from now on (the caller then just acquires
    /// again), or leaves the waiting to the caller (the default).
    fn throttled(&self, retry_after: Option<Duration>) -> impl Future<Output = bool> + Send {
        let _ = retry_after;
        async { false }
    }
}

/// A source's login: a token and the address it is good at, as a source's client fetched it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SavedSession {
    pub token: Secret,
    /// Where calls with this token go (Kingdee: the tenant's data centre).
    pub address: String,
    pub fetched_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
}

/// What a [`SessionStore`] call returns: rarely called, so boxed.
pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, String>> + Send + 'a>>;

/// Where every process calling one source account keeps its login, so that a restarted or added
/// process takes up the token another one fetched instead of logging in again (token calls are few
/// and counted: Kingdee allows about two a minute).
pub trait SessionStore: Send + Sync + 'static {
    /// The session saved last, if any.
    fn load(&self) -> StoreFuture<'_, Option<SavedSession>>;

    /// Saves `session` in place of any other.
    fn save<'a>(&'a self, session: &'a SavedSession) -> StoreFuture<'a, ()>;

    /// Forgets the saved session if its token is `refused` (not a newer one saved meanwhile).
    fn forget<'a>(&'a self, refused: &'a Secret) -> StoreFuture<'a, ()>;

    /// Waits until no other process is logging in to the account, then holds the login for this one
    /// until the returned guard is dropped: processes started together log in once, not each.
    fn lock_login(&self) -> StoreFuture<'_, Box<dyn Send>>;
}

/// No budget: for one-off tools.
pub struct Unlimited;

impl RateBudget for Unlimited {
    async fn acquire(&self) -> Result<Duration, String> {
        Ok(Duration::ZERO)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(rows: usize, count: u64, total_pages: u64) -> Page {
        let row = || RawValue::from_string("{}".to_owned()).unwrap();
        Page {
            rows: (0..rows).map(|_| row()).collect(),
            count,
            total_pages,
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
        assert!(page(1, 1, 1).check(2, 100).is_err());
    }
}
