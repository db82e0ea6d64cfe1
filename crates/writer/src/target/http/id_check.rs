//! The existence check before writing (id check `exists`): which records the target holds already,
//! and the updates of those it holds in an older version.

use conveyor_base::Record;
use conveyor_pipeline::target::http::{IdCheckSpec, OnExists};
use futures_util::future::join_all;
use reqwest::{Method, StatusCode};
use serde_json::Value;

use super::classify::{merge, severity};
use super::setup::HttpTarget;
use crate::target::{WriteError, WriteReport};

impl HttpTarget {
    /// Asks the target about each record (concurrently); returns the records still to write, and
    /// writes the updates of existing ones.
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
        let checks = records.iter().map(|record| async move {
            let response = self
                .send(
                    Method::GET,
                    &self.url(path, Some(&record.id)),
                    None::<&Value>,
                    None,
                )
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
            return Err(worst.clone());
        }
        let held: Vec<_> = held.into_iter().collect::<Result<_, _>>()?;
        let mut new = Vec::new();
        let mut updates = Vec::new();
        let mut report = WriteReport::default();
        for (record, held) in records.into_iter().zip(held) {
            match held {
                None => new.push(record),
                Some(_) if *on_exists == OnExists::Skip => report.stale += 1,
                Some(held) if self.holds_as_new(&held, record) => report.stale += 1,
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

    /// Whether the target's copy carries the record's version or a newer one.
    fn holds_as_new(&self, held: &Value, record: &Record) -> bool {
        held.get(&self.version_field)
            .map(conveyor_base::source_time::parse_instant)
            .and_then(Result::ok)
            .is_some_and(|held_version| held_version >= record.modify_time)
    }
}
