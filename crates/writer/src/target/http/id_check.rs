//! The existence check before writing (id check `exists`): which records the target holds already,
//! and the updates of those it holds in an older version.

use chrono::{DateTime, FixedOffset};
use conveyor_base::Record;
use conveyor_pipeline::target::http::{IdCheckSpec, OnExists};
use futures_util::future::join_all;
use reqwest::{Method, StatusCode};
use serde_json::Value;

use super::classify::{merge, severity};
use super::setup::HttpTarget;
use crate::target::{WriteError, WriteReport};

impl HttpTarget {
    /// With the id check `exists`: asks the target for each id (concurrently) and returns its copy of
    /// each (None where it answers 404). None without that id check: the target cannot be read by id.
    pub async fn held(&self, ids: &[&str]) -> Option<Result<Vec<Option<Value>>, WriteError>> {
        let IdCheckSpec::Exists { path, .. } = &self.spec.id_check else {
            return None;
        };
        let checks = ids.iter().map(|id| async move {
            let response = self
                .send(Method::GET, &self.url(path, Some(id)), None::<&Value>, None)
                .await?;
            match response.status() {
                StatusCode::NOT_FOUND => {
                    self.served();
                    Ok(None)
                }
                status if status.is_success() => {
                    self.served();
                    let held: Value = response.json().await.unwrap_or(Value::Null);
                    Ok(Some(held))
                }
                status => {
                    Err(self.sort_failure(status, &response.text().await.unwrap_or_default()))
                }
            }
        });
        let held = join_all(checks).await;
        // The worst answer decides, as for the writes (see [`merge`]).
        if let Some(worst) = held
            .iter()
            .filter_map(|answer| answer.as_ref().err())
            .max_by_key(|err| severity(err))
        {
            return Some(Err(worst.clone()));
        }
        Some(held.into_iter().collect())
    }

    /// Asks the target about each record; returns the records still to write, and writes the
    /// updates of existing ones.
    pub(super) async fn check_existing<'a>(
        &self,
        records: Vec<&'a Record>,
    ) -> Result<(Vec<&'a Record>, WriteReport), WriteError> {
        let IdCheckSpec::Exists {
            path,
            on_exists,
            update_method,
            update_path,
        } = &self.spec.id_check
        else {
            return Ok((records, WriteReport::default()));
        };
        let ids: Vec<&str> = records.iter().map(|record| record.id.as_str()).collect();
        let held = self
            .held(&ids)
            .await
            .unwrap_or_else(|| Ok(vec![None; ids.len()]))?;
        let mut new = Vec::new();
        let mut updates = Vec::new();
        let mut report = WriteReport::default();
        for (record, held) in records.into_iter().zip(held) {
            match held {
                None => new.push(record),
                Some(_) if *on_exists == OnExists::Skip => report.stale += 1,
                Some(held) if self.holds_as_new(&held, record.modify_time) => report.stale += 1,
                Some(_) => updates.push(record),
            }
        }
        let method = Method::from_bytes(update_method.as_bytes()).unwrap_or(Method::PUT);
        let update_path = update_path.as_deref().unwrap_or(path);
        let calls = updates.iter().map(|record| {
            let method = method.clone();
            async move {
                (
                    1,
                    self.call(
                        method,
                        &self.url(update_path, Some(&record.id)),
                        &record.data,
                        None,
                    )
                    .await,
                )
            }
        });
        let report = merge(report, join_all(calls).await)?;
        Ok((new, report))
    }

    /// Whether the target's copy carries `version` or a newer one.
    pub fn holds_as_new(&self, held: &Value, version: DateTime<FixedOffset>) -> bool {
        self.held_version(held)
            .is_some_and(|held_version| held_version >= version)
    }

    /// The version of the target's copy, when it says.
    pub fn held_version(&self, held: &Value) -> Option<DateTime<FixedOffset>> {
        held.get(&self.version_field)
            .map(conveyor_base::source_time::parse_instant)
            .and_then(Result::ok)
    }
}
