//! The pipeline file's `[source]`: where records come from and how they are synced.
//!
//! The table is one flat TOML table, so that every error keeps its line: the fields of the source's
//! kind (what to read: `path`, `query`, `page_size`) beside the sync engine's, which every kind shares
//! (the windows, the budget, how records are keyed and gathered). Each kind checks its own fields in
//! `SourceKind::check`; the fetcher implements each kind (`conveyor_fetcher`'s one match on it).

use std::collections::BTreeMap;

use chrono::{DateTime, FixedOffset, Utc};
use serde::Deserialize;

use crate::mapping::convert::Zone;

/// The largest page the Kingdee gateway serves; larger requests are silently capped by it.
pub const MAX_PAGE_SIZE: u32 = 100;

/// The most records a message may gather (`source.records_per_message`).
pub const MAX_RECORDS_PER_MESSAGE: u32 = 10_000;

/// Where records come from.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceSpec {
    pub kind: SourceKind,
    /// The list endpoint's path, e.g. `/jdy/v2/scm/sal_order`.
    pub path: String,
    /// Extra query parameters of every list call (e.g. `bill_status = "C"`).
    #[serde(default)]
    pub query: BTreeMap<String, String>,
    /// Rows per list call; at most what the kind serves.
    #[serde(default = "default_page_size")]
    pub page_size: u32,
    /// The row field that identifies a record at the source.
    #[serde(default = "default_id_field")]
    pub id_field: String,
    /// The row field with the record's last modification time.
    #[serde(default = "default_modify_time_field")]
    pub modify_time_field: String,
    /// Where the first sync starts (RFC 3339); later syncs go on from the stored watermark.
    #[serde(deserialize_with = "rfc3339")]
    pub start_time: DateTime<FixedOffset>,
    /// Width of one modify-time window, the unit of work fetchers share.
    #[serde(default = "default_window_secs")]
    pub window_secs: u64,
    /// Windows end this long before now, so that rows still being written at the source are left for
    /// the next sync.
    #[serde(default = "default_lag_secs")]
    pub lag_secs: u64,
    /// Each sync goes this far back before where the last one ended, for rows that became visible late.
    #[serde(default = "default_overlap_secs")]
    pub overlap_secs: u64,
    /// A window holding more rows than this is split in two, so that no window pages for long.
    #[serde(default = "default_max_window_rows")]
    pub max_window_rows: u64,
    /// Calls per minute allowed for the account set, shared by every fetcher process.
    #[serde(default = "default_calls_per_minute")]
    pub calls_per_minute: u32,
    /// Records of consecutive pages of a window gathered into one message. Each message costs the
    /// broker, the transformer and the writer a fixed share of work (about 1.2 ms of CPU on the
    /// development machine), so fewer, larger ones cost less per record; a page is never split.
    #[serde(default = "default_records_per_message")]
    pub records_per_message: u32,
    /// When fetchers plan new windows: a five-field cron expression (minute hour day-of-month month
    /// day-of-week) in `time_zone`, e.g. `"*/15 * * * *"` or `"0 8-20 * * 1-5"`. Without it, they plan
    /// every CONVEYOR_FETCH_INTERVAL_SECS.
    #[serde(default)]
    pub schedule: Option<String>,
    /// The zone of `schedule`: the source's (an IANA name, or an offset like `+08:00`).
    #[serde(default = "default_time_zone")]
    pub time_zone: String,
}

/// When to plan, as `source.schedule` and `source.time_zone` say.
#[derive(Debug, Clone)]
pub struct Schedule {
    cron: cron_parser::Schedule,
    zone: Zone,
    /// The expression as written, with its zone: for logs.
    pub described: String,
}

impl Schedule {
    /// The first run time strictly after `instant`.
    pub fn next_after(&self, instant: DateTime<Utc>) -> Option<DateTime<FixedOffset>> {
        match self.zone {
            Zone::Fixed(offset) => self.cron.next_after(&instant.with_timezone(&offset)),
            Zone::Named(tz) => self
                .cron
                .next_after(&instant.with_timezone(&tz))
                .map(|next| next.fixed_offset()),
        }
    }

    /// The next `count` run times after `instant`.
    pub fn upcoming(&self, instant: DateTime<Utc>, count: usize) -> Vec<DateTime<FixedOffset>> {
        std::iter::successors(self.next_after(instant), |last| {
            self.next_after(last.with_timezone(&Utc))
        })
        .take(count)
        .collect()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SourceKind {
    /// Kingdee Cloud Xingchen V2 open API.
    Kingdee,
}

impl SourceKind {
    /// Checks the fields of this kind: (field, problem).
    fn check(self, spec: &SourceSpec) -> Result<(), (String, String)> {
        let problem = |field: &str, problem: String| Err((format!("source.{field}"), problem));
        match self {
            SourceKind::Kingdee => {
                if !spec.path.starts_with('/') {
                    return problem("path", "must start with '/'".into());
                }
                if !(1..=MAX_PAGE_SIZE).contains(&spec.page_size) {
                    return problem(
                        "page_size",
                        format!(
                            "must be 1 to {MAX_PAGE_SIZE}: the gateway silently caps larger pages, which loses rows"
                        ),
                    );
                }
                Ok(())
            }
        }
    }
}

impl SourceSpec {
    /// The planning schedule, when the file gives one.
    pub fn schedule(&self) -> Result<Option<Schedule>, (String, String)> {
        let Some(expression) = &self.schedule else {
            return Ok(None);
        };
        let zone = Zone::parse(&self.time_zone).map_err(|err| ("source.time_zone".into(), err))?;
        let cron = cron_parser::Schedule::parse(expression).map_err(|err| {
            (
                "source.schedule".to_owned(),
                format!(
                    "{expression:?} is not a cron expression ({err}): five fields, minute hour day-of-month month day-of-week, e.g. \"*/15 * * * *\""
                ),
            )
        })?;
        let schedule = Schedule {
            cron,
            zone,
            described: format!("{expression:?} in {}", self.time_zone),
        };
        if schedule.next_after(Utc::now()).is_none() {
            return Err((
                "source.schedule".into(),
                format!("{expression:?} never runs"),
            ));
        }
        Ok(Some(schedule))
    }

    /// Checks what can be checked without a network: (field, problem).
    pub fn check(&self) -> Result<(), (String, String)> {
        self.kind.check(self)?;
        self.schedule()?;
        let problem =
            |field: &str, problem: &str| Err((format!("source.{field}"), problem.to_owned()));
        if self.window_secs == 0 {
            return problem("window_secs", "must be at least 1");
        }
        if self.calls_per_minute == 0 {
            return problem("calls_per_minute", "must be at least 1");
        }
        if !(1..=MAX_RECORDS_PER_MESSAGE).contains(&self.records_per_message) {
            return problem(
                "records_per_message",
                &format!("must be 1 to {MAX_RECORDS_PER_MESSAGE}"),
            );
        }
        if self.max_window_rows < u64::from(self.page_size) {
            return problem("max_window_rows", "must be at least source.page_size");
        }
        Ok(())
    }
}

fn default_page_size() -> u32 {
    MAX_PAGE_SIZE
}

fn default_id_field() -> String {
    "id".to_owned()
}

fn default_modify_time_field() -> String {
    "modify_time".to_owned()
}

fn default_window_secs() -> u64 {
    24 * 3600
}

fn default_lag_secs() -> u64 {
    60
}

fn default_overlap_secs() -> u64 {
    300
}

fn default_max_window_rows() -> u64 {
    20_000
}

fn default_calls_per_minute() -> u32 {
    500
}

fn default_records_per_message() -> u32 {
    300
}

fn default_time_zone() -> String {
    "Asia/Shanghai".to_owned()
}

/// A time written as an RFC 3339 string or a TOML offset date-time; anything else is refused with
/// the form expected.
fn rfc3339<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<DateTime<FixedOffset>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Written {
        Text(String),
        Toml(toml::value::Datetime),
    }
    let text = match Written::deserialize(deserializer)? {
        Written::Text(text) => text,
        Written::Toml(datetime) => datetime.to_string(),
    };
    DateTime::parse_from_rfc3339(&text).map_err(|err| {
        serde::de::Error::custom(format!(
            "{text:?} is not an RFC 3339 time ({err}): write it with its offset, e.g. 2025-01-01T00:00:00+08:00"
        ))
    })
}
