//! `conveyorctl reconcile`: the target compared with the source over a time range, window by window.
//!
//! - **Counts first.** Each window costs one call: its first page, which carries the window's row
//!   count. The target is counted by version over the same windows.
//! - **Then ids.** When the ids of the whole range fit in `max_calls`, every window is compared id by
//!   id; otherwise only the windows whose counts differ, as far as the calls allow. A row set back to
//!   an older version within its own window keeps the counts equal, so the report says which windows
//!   were compared by counts only. Windows of one page cost nothing more: their ids came with the count.
//! - **Through the rules.** Each source row goes through the pipeline's rules as in the transformer:
//!   what the filter skips is not expected in the target, and rows the rules refuse are listed apart
//!   (they are dead letters, not missing).
//! - **By id:** *missing* (in the source, not in the target), *older* (the target's version is older
//!   than the source's), *extra* (in the target with a version in the range, in no source window
//!   compared).
//! - **The target** is read as [`TargetReader`] can: a PostgreSQL table directly (counts, ids,
//!   extras); an HTTP target through its id check `exists`, by id only (no counts, so every window is
//!   compared by ids; no extras, since it cannot be listed).
//!
//! Calls go through the source as the fetchers build it, within the call budget they share.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::Duration;

use anyhow::{Context as _, bail};
use chrono::{DateTime, FixedOffset, SubsecRound as _, Utc};
use conveyor_base::source::{Page, Source, Window, consistent_page};
use conveyor_fetcher::rows::to_records;
use conveyor_fetcher::settings::SyncSettings;
use conveyor_pipeline::Pipeline;
use conveyor_pipeline::TargetSpec;
use conveyor_pipeline::target::http::IdCheckSpec;
use conveyor_postgres::{Database, quote};
use conveyor_writer::target::http::{HttpArgs, HttpTarget};
use serde::Serialize;
use serde_json::value::RawValue;

/// Times a window whose count moves while it is paged is paged again.
const WINDOW_ATTEMPTS: usize = 3;

/// What to compare.
#[derive(Debug, Clone)]
pub struct Request {
    pub since: DateTime<Utc>,
    pub until: DateTime<Utc>,
    /// Width of one window of the comparison.
    pub window: Duration,
    /// Calls to the source at most: the counts must fit in it (else the comparison is refused before
    /// it starts), and ids are fetched only within what is left.
    pub max_calls: u64,
}

/// How a window was compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Compared {
    /// Id by id, with versions.
    Ids,
    /// By counts only: they agreed, and comparing ids everywhere did not fit in the calls allowed.
    Counts,
    /// The counts differ, and its ids did not fit in the calls allowed.
    NotCompared,
}

#[derive(Debug, Clone, Serialize)]
pub struct WindowReport {
    pub start: DateTime<Utc>,
    pub end: DateTime<Utc>,
    pub source_rows: u64,
    /// None when the target cannot be counted (HTTP).
    pub target_rows: Option<u64>,
    pub compared: Compared,
    pub missing: u64,
    pub older: u64,
}

/// A target row older than the source's.
#[derive(Debug, Clone, Serialize)]
pub struct Older {
    pub id: String,
    pub source_version: DateTime<FixedOffset>,
    pub target_version: String,
}

/// A source row the rules refuse (it is a dead letter of the transform stage).
#[derive(Debug, Clone, Serialize)]
pub struct Refused {
    pub id: String,
    pub reason: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub pipeline: String,
    pub since: DateTime<Utc>,
    pub until: DateTime<Utc>,
    /// Calls made to the source.
    pub calls: u64,
    /// Of them, the calls that counted the windows (a window's first page; more where windows were
    /// cut for their size).
    pub calls_for_counts: u64,
    pub windows: Vec<WindowReport>,
    pub missing: Vec<String>,
    pub older: Vec<Older>,
    pub extra: Vec<String>,
    /// Whether extras were looked for (not in a target that cannot be listed).
    pub extras_sought: bool,
    pub refused: Vec<Refused>,
    /// Records the rules' filter skips: not expected in the target.
    pub filtered: u64,
}

impl Report {
    /// Nothing missing, older or extra, and every window compared.
    pub fn is_clean(&self) -> bool {
        self.missing.is_empty()
            && self.older.is_empty()
            && self.extra.is_empty()
            && self
                .windows
                .iter()
                .all(|window| window.compared != Compared::NotCompared)
    }

    /// The windows a re-sync would mend: those with missing or older rows, or not compared;
    /// adjacent ones joined.
    pub fn windows_to_resync(&self) -> Vec<Window> {
        let mut joined: Vec<Window> = Vec::new();
        let due = self.windows.iter().filter(|window| {
            window.missing > 0 || window.older > 0 || window.compared == Compared::NotCompared
        });
        for window in due {
            match joined.last_mut() {
                Some(last) if last.end + chrono::Duration::milliseconds(1) >= window.start => {
                    last.end = window.end;
                }
                _ => joined.push(Window {
                    start: window.start,
                    end: window.end,
                }),
            }
        }
        joined
    }
}

/// The windows of the comparison: `width` each, none overlapping (a window ends a millisecond before
/// the next starts; source times are whole milliseconds), the last one ending at `until`.
pub fn windows(since: DateTime<Utc>, until: DateTime<Utc>, width: Duration) -> Vec<Window> {
    let width = chrono::Duration::from_std(width)
        .unwrap_or(chrono::Duration::days(1))
        .max(chrono::Duration::seconds(1));
    let mut windows = Vec::new();
    let mut start = since;
    while start <= until {
        let next = start + width;
        let end = if next > until {
            until
        } else {
            next - chrono::Duration::milliseconds(1)
        };
        windows.push(Window { start, end });
        start = next;
    }
    windows
}

/// What the comparison reads of the target.
pub enum TargetReader {
    /// A PostgreSQL table: counted by version, read by id, listed for extras.
    Table(Box<TargetTable>),
    /// An HTTP target through its id check `exists`: read by id only.
    Http(Box<HttpTarget>),
}

/// Ids asked of an HTTP target at once.
const HTTP_IDS_AT_ONCE: usize = 256;

impl TargetReader {
    /// The target of `pipeline`'s `[target]`: its table in `database`, or its HTTP API as `http` says.
    pub async fn open(
        pipeline: &Pipeline,
        database: Database,
        http: &HttpArgs,
    ) -> anyhow::Result<Self> {
        match &pipeline.spec.target {
            TargetSpec::Postgres(_) => Ok(Self::Table(Box::new(
                TargetTable::open(pipeline, database).await?,
            ))),
            TargetSpec::Http(spec) => {
                if !matches!(spec.id_check, IdCheckSpec::Exists { .. }) {
                    bail!(
                        "pipeline {:?}: its HTTP target cannot be read by id; reconcile needs \
                         target.id_check mode = \"exists\"",
                        pipeline.name()
                    );
                }
                Ok(Self::Http(Box::new(
                    HttpTarget::open(pipeline, spec, http).await?,
                )))
            }
            TargetSpec::Noop(_) => bail!(
                "pipeline {:?} writes nowhere (a noop target): there is nothing to reconcile",
                pipeline.name()
            ),
        }
    }

    async fn count(&self, window: &Window) -> anyhow::Result<Option<u64>> {
        match self {
            Self::Table(table) => Ok(Some(table.count(window).await?)),
            Self::Http(_) => Ok(None),
        }
    }

    async fn ids_in(&self, window: &Window) -> anyhow::Result<Option<Vec<String>>> {
        match self {
            Self::Table(table) => Ok(Some(table.ids_in(window).await?)),
            Self::Http(_) => Ok(None),
        }
    }

    /// The expected `(id, version)`s the target lacks (None) or holds older (its version as text).
    async fn behind(
        &self,
        expected: &[(String, DateTime<FixedOffset>)],
    ) -> anyhow::Result<Vec<(String, Option<String>)>> {
        let http = match self {
            Self::Table(table) => return table.behind(expected).await,
            Self::Http(http) => http,
        };
        let mut behind = Vec::new();
        for chunk in expected.chunks(HTTP_IDS_AT_ONCE) {
            let ids: Vec<&str> = chunk.iter().map(|(id, _)| id.as_str()).collect();
            let held = http
                .held(&ids)
                .await
                .expect("opened only with the id check exists")
                .map_err(|err| anyhow::anyhow!("reading the HTTP target by id: {err}"))?;
            for ((id, version), held) in chunk.iter().zip(held) {
                match held.as_ref().map(|held| http.held_version(held)) {
                    None => behind.push((id.clone(), None)),
                    // A copy without a version cannot be told older.
                    Some(Some(held)) if held < *version => {
                        behind.push((id.clone(), Some(held.to_rfc3339())));
                    }
                    Some(_) => {}
                }
            }
        }
        Ok(behind)
    }
}

/// `window` in two halves that do not overlap, cut at a whole millisecond; None when it is too narrow.
fn split(window: &Window) -> Option<[Window; 2]> {
    let middle = (window.start + (window.end - window.start) / 2).trunc_subsecs(3);
    (middle > window.start).then(|| {
        [
            Window {
                start: window.start,
                end: middle - chrono::Duration::milliseconds(1),
            },
            Window {
                start: middle,
                end: window.end,
            },
        ]
    })
}

/// The target table, read by version and by id.
pub struct TargetTable {
    database: Database,
    table: String,
    key: String,
    version: String,
    key_type: String,
}

impl TargetTable {
    /// The table of `pipeline`'s postgres target in `database`.
    pub async fn open(pipeline: &Pipeline, database: Database) -> anyhow::Result<Self> {
        let TargetSpec::Postgres(spec) = &pipeline.spec.target else {
            bail!("pipeline {:?}: its target is not postgres", pipeline.name());
        };
        let (key, version) = (
            pipeline.mapping.key_field().to_owned(),
            pipeline.mapping.version_field().to_owned(),
        );
        let client = database.client().await?;
        let row = client
            .query_opt(
                "SELECT format_type(a.atttypid, a.atttypmod) FROM pg_attribute a \
                 WHERE a.attrelid = to_regclass($1) AND a.attname = $2",
                &[&quote(&spec.table), &key],
            )
            .await
            .context("reading the target table's key column")?;
        let Some(row) = row else {
            bail!(
                "table {}.{} has no column {key:?} (or does not exist)",
                database.schema,
                spec.table
            );
        };
        Ok(Self {
            key_type: row.get(0),
            table: quote(&spec.table),
            key: quote(&key),
            version: quote(&version),
            database,
        })
    }

    async fn count(&self, window: &Window) -> anyhow::Result<u64> {
        let client = self.database.client().await?;
        let row = client
            .query_one(
                &format!(
                    "SELECT count(*) FROM {} WHERE {} BETWEEN $1 AND $2",
                    self.table, self.version
                ),
                &[&window.start, &window.end],
            )
            .await
            .context("counting the target's rows")?;
        Ok(row.get::<_, i64>(0) as u64)
    }

    async fn ids_in(&self, window: &Window) -> anyhow::Result<Vec<String>> {
        let client = self.database.client().await?;
        let rows = client
            .query(
                &format!(
                    "SELECT {}::text FROM {} WHERE {} BETWEEN $1 AND $2",
                    self.key, self.table, self.version
                ),
                &[&window.start, &window.end],
            )
            .await
            .context("reading the target's ids")?;
        Ok(rows.iter().map(|row| row.get(0)).collect())
    }

    /// The row of `id` as JSON, if the table holds it.
    pub async fn row(&self, id: &str) -> anyhow::Result<Option<serde_json::Value>> {
        let client = self.database.client().await?;
        let row = client
            .query_opt(
                &format!(
                    "SELECT to_jsonb(t) FROM {table} t WHERE t.{key} = $1::text::{key_type}",
                    table = self.table,
                    key = self.key,
                    key_type = self.key_type,
                ),
                &[&id],
            )
            .await
            .context("reading the target's row by id")?;
        Ok(row.map(|row| row.get(0)))
    }

    /// For each `(id, version)` expected: None when the target holds it at that version or newer,
    /// else whether it is missing (None) or held older (its version as text).
    async fn behind(
        &self,
        expected: &[(String, DateTime<FixedOffset>)],
    ) -> anyhow::Result<Vec<(String, Option<String>)>> {
        let (ids, versions): (Vec<&str>, Vec<DateTime<FixedOffset>>) = expected
            .iter()
            .map(|(id, version)| (id.as_str(), *version))
            .unzip();
        let client = self.database.client().await?;
        let rows = client
            .query(
                &format!(
                    "SELECT e.id, t.{version}::text FROM unnest($1::text[], $2::timestamptz[]) AS e(id, version) \
                     LEFT JOIN {table} t ON t.{key} = e.id::{key_type} \
                     WHERE t.{key} IS NULL OR t.{version} IS NULL OR t.{version} < e.version",
                    version = self.version,
                    table = self.table,
                    key = self.key,
                    key_type = self.key_type,
                ),
                &[&ids, &versions],
            )
            .await
            .context("reading the target's rows by id")?;
        Ok(rows.iter().map(|row| (row.get(0), row.get(1))).collect())
    }
}

/// Compares `target` with `source` as `request` says.
pub async fn reconcile<S: Source>(
    pipeline: &Pipeline,
    source: &S,
    target: &TargetReader,
    request: &Request,
) -> anyhow::Result<Report> {
    if request.until < request.since {
        bail!(
            "--until {} is before --since {}",
            request.until,
            request.since
        );
    }
    let settings = SyncSettings::of(&pipeline.spec.source);
    let page_size = source.page_size().max(1);
    let mut calls = 0;
    // A window of more rows than the sync pages at once is cut in two, so that comparing it by ids
    // holds no more rows in memory than a fetcher does.
    let mut pending: VecDeque<Window> =
        windows(request.since, request.until, request.window).into();
    let mut windows = Vec::with_capacity(pending.len());
    let mut first_pages = Vec::with_capacity(pending.len());
    let mut reports = Vec::with_capacity(pending.len());
    while let Some(window) = pending.pop_front() {
        if calls + 1 + pending.len() as u64 > request.max_calls {
            bail!(
                "counting {} window(s) takes more than --max-calls {} calls: widen --window-secs \
                 or raise --max-calls",
                windows.len() + 1 + pending.len(),
                request.max_calls
            );
        }
        let page = page(source, &window, 1, &mut calls).await?;
        if page.count > settings.max_window_rows
            && let Some([first, second]) = split(&window)
        {
            pending.push_front(second);
            pending.push_front(first);
            continue;
        }
        reports.push(WindowReport {
            start: window.start,
            end: window.end,
            source_rows: page.count,
            target_rows: target.count(&window).await?,
            compared: Compared::Counts,
            missing: 0,
            older: 0,
        });
        first_pages.push(page);
        windows.push(window);
    }
    // Ids everywhere if they fit; else the windows whose counts differ, in order, while they fit.
    let more_calls =
        |report: &WindowReport| report.source_rows.div_ceil(page_size).saturating_sub(1);
    let everywhere: u64 = reports.iter().map(more_calls).sum();
    let every_window = calls + everywhere <= request.max_calls;
    let mut allowance = request.max_calls.saturating_sub(calls);
    for report in &mut reports {
        let differ = report.target_rows != Some(report.source_rows);
        let cost = more_calls(report);
        if every_window || cost == 0 || (differ && cost <= allowance) {
            allowance = allowance.saturating_sub(cost);
            report.compared = Compared::Ids;
        } else if differ {
            report.compared = Compared::NotCompared;
        }
    }

    let mut report = Report {
        pipeline: pipeline.name().to_owned(),
        since: request.since,
        until: request.until,
        calls: 0,
        calls_for_counts: calls,
        windows: Vec::new(),
        missing: Vec::new(),
        older: Vec::new(),
        extra: Vec::new(),
        extras_sought: matches!(target, TargetReader::Table(_)),
        refused: Vec::new(),
        filtered: 0,
    };
    let mut expected_anywhere = BTreeSet::new();
    let mut extra_candidates = BTreeSet::new();
    for ((window, first), window_report) in windows.iter().zip(first_pages).zip(&mut reports) {
        if window_report.compared != Compared::Ids {
            continue;
        }
        let rows = window_rows(source, window, first, &mut calls).await?;
        window_report.source_rows = rows.len() as u64;
        let (records, unusable) = to_records(&settings, rows);
        let mapped = conveyor_transformer::map_records(&pipeline.mapping, records);
        report.filtered += mapped.filtered;
        let refused = unusable.into_iter().chain(mapped.failed);
        report
            .refused
            .extend(refused.map(|(record, failure)| Refused {
                id: record.id,
                reason: failure.message,
            }));
        // The newest version of each output id, as the writer keeps it.
        let mut expected: BTreeMap<String, DateTime<FixedOffset>> = BTreeMap::new();
        for record in mapped.mapped {
            let version = expected.entry(record.id).or_insert(record.modify_time);
            *version = (*version).max(record.modify_time);
        }
        let expected: Vec<(String, DateTime<FixedOffset>)> = expected.into_iter().collect();
        for (id, held) in target.behind(&expected).await? {
            let source_version = expected
                .binary_search_by(|(candidate, _)| candidate.as_str().cmp(&id))
                .map(|index| expected[index].1)
                .expect("the target answers with expected ids");
            match held {
                None => {
                    window_report.missing += 1;
                    report.missing.push(id);
                }
                Some(target_version) => {
                    window_report.older += 1;
                    report.older.push(Older {
                        id,
                        source_version,
                        target_version,
                    });
                }
            }
        }
        let in_window: BTreeSet<&str> = expected.iter().map(|(id, _)| id.as_str()).collect();
        for id in target.ids_in(window).await?.unwrap_or_default() {
            if !in_window.contains(id.as_str()) {
                extra_candidates.insert(id);
            }
        }
        expected_anywhere.extend(expected.into_iter().map(|(id, _)| id));
    }
    // A row whose source version moved to another compared window is older there, not extra here.
    report.extra = extra_candidates
        .into_iter()
        .filter(|id| !expected_anywhere.contains(id))
        .collect();
    report.calls = calls;
    report.windows = reports;
    Ok(report)
}

/// Page `number` of `window` as the fetchers take it (asked again while it disagrees with its count).
async fn page<S: Source>(
    source: &S,
    window: &Window,
    number: u64,
    calls: &mut u64,
) -> anyhow::Result<Page> {
    consistent_page(source, window, number, calls)
        .await
        .map_err(|failure| {
            anyhow::anyhow!(
                "the source, window {} – {} page {number}: {}",
                window.start,
                window.end,
                failure.message
            )
        })
}

/// Every row of `window` (its first page already in hand), paged again from the start while the
/// window's count moves under the paging.
async fn window_rows<S: Source>(
    source: &S,
    window: &Window,
    first: Page,
    calls: &mut u64,
) -> anyhow::Result<Vec<Box<RawValue>>> {
    let mut first = Some(first);
    for _ in 0..WINDOW_ATTEMPTS {
        let first_page = match first.take() {
            Some(page) => page,
            None => page(source, window, 1, calls).await?,
        };
        let (count, pages) = (first_page.count, first_page.total_pages);
        let mut rows = first_page.rows;
        let mut steady = true;
        for number in 2..=pages {
            let next = page(source, window, number, calls).await?;
            if next.count != count {
                steady = false;
                break;
            }
            rows.extend(next.rows);
        }
        if steady {
            return Ok(rows);
        }
    }
    bail!(
        "window {} – {}: its rows kept changing while it was paged; try again, or a narrower --window-secs",
        window.start,
        window.end
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str) -> DateTime<Utc> {
        text.parse().unwrap()
    }

    #[test]
    fn windows_cover_the_range_without_overlap() {
        let cut = windows(
            at("2026-01-01T00:00:00Z"),
            at("2026-01-03T12:00:00Z"),
            Duration::from_secs(86_400),
        );
        let bounds: Vec<(String, String)> = cut
            .iter()
            .map(|w| (w.start.to_rfc3339(), w.end.to_rfc3339()))
            .collect();
        assert_eq!(
            bounds,
            [
                ("2026-01-01T00:00:00+00:00", "2026-01-01T23:59:59.999+00:00"),
                ("2026-01-02T00:00:00+00:00", "2026-01-02T23:59:59.999+00:00"),
                ("2026-01-03T00:00:00+00:00", "2026-01-03T12:00:00+00:00"),
            ]
            .map(|(a, b)| (a.to_owned(), b.to_owned()))
        );
    }

    #[test]
    fn a_split_window_keeps_every_millisecond_once() {
        let window = Window {
            start: at("2026-01-01T00:00:00Z"),
            end: at("2026-01-01T23:59:59.999Z"),
        };
        let [first, second] = split(&window).unwrap();
        assert_eq!(first.start, window.start);
        assert_eq!(first.end + chrono::Duration::milliseconds(1), second.start);
        assert_eq!(second.end, window.end);
        let narrow = Window {
            start: window.start,
            end: window.start,
        };
        assert!(split(&narrow).is_none());
    }

    #[test]
    fn windows_to_resync_join_neighbours() {
        let cut = windows(
            at("2026-01-01T00:00:00Z"),
            at("2026-01-04T23:59:59.999Z"),
            Duration::from_secs(86_400),
        );
        let window = |w: &Window, missing: u64, compared: Compared| WindowReport {
            start: w.start,
            end: w.end,
            source_rows: 0,
            target_rows: Some(0),
            compared,
            missing,
            older: 0,
        };
        let report = Report {
            pipeline: "p".into(),
            since: cut[0].start,
            until: cut[3].end,
            calls: 0,
            calls_for_counts: 0,
            windows: vec![
                window(&cut[0], 1, Compared::Ids),
                window(&cut[1], 0, Compared::NotCompared),
                window(&cut[2], 0, Compared::Ids),
                window(&cut[3], 2, Compared::Ids),
            ],
            missing: vec!["a".into()],
            older: vec![],
            extra: vec![],
            extras_sought: true,
            refused: vec![],
            filtered: 0,
        };
        let resync = report.windows_to_resync();
        assert_eq!(
            resync,
            [
                Window {
                    start: cut[0].start,
                    end: cut[1].end
                },
                cut[3]
            ]
        );
        assert!(!report.is_clean());
    }
}
