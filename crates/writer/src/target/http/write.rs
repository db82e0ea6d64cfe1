//! Writing a batch: the newest version of each id, after the id check, in calls of a record or a
//! batch each.

use conveyor_base::Record;
use conveyor_pipeline::target::http::{BodyShape, IdCheckSpec, OnExists};
use conveyor_runtime::refusal::Checked;
use futures_util::future::join_all;
use serde_json::value::RawValue;

use super::classify::{Answer, is_down, merge};
use super::setup::HttpTarget;
use crate::target::{Target, WriteError, WriteReport, newest_per_id};

impl HttpTarget {
    /// One batch call. A 409 for a batch of several records says that some record in it exists, not
    /// which, nor whether the others were written: its records are then sent one per call (still as a
    /// batch, of one), so that only a 409 for a single record counts as written.
    async fn write_batch(&self, chunk: &[&Record]) -> Vec<(u64, Result<Answer, WriteError>)> {
        let answer = self.post_batch(chunk).await;
        if chunk.len() == 1 || !matches!(answer, Ok(Answer::AlreadyThere)) {
            return vec![(chunk.len() as u64, answer)];
        }
        tracing::debug!(
            records = chunk.len(),
            "target answered 409 for a batch: sending its records one by one"
        );
        let calls = chunk
            .iter()
            .map(|record| async move { (1, self.post_batch(std::slice::from_ref(record)).await) });
        join_all(calls).await
    }

    async fn post_batch(&self, records: &[&Record]) -> Result<Answer, WriteError> {
        let rows: Vec<&RawValue> = records.iter().map(|record| &*record.data).collect();
        self.call(
            self.method.clone(),
            &self.url(&self.spec.path, None),
            &rows,
            None,
        )
        .await
    }
}

impl Target for HttpTarget {
    /// Whether the target answers as up: the circuit breaker's probe, a `HEAD` of the base URL. Any
    /// answer will do but one saying that the service is unavailable (see [`is_down`]).
    async fn check_credentials(&self) -> Checked {
        // A static token can only be tried by writing; a token endpoint can be asked.
        if !self.auth.renewable() {
            return Checked::Accepted;
        }
        match self.token(true).await {
            Ok(_) => Checked::Accepted,
            Err(WriteError::Refused(reason)) => Checked::Refused(reason),
            Err(other) => Checked::Unknown(other.to_string()),
        }
    }

    async fn ping(&self) -> bool {
        match self.client.head(&self.base).send().await {
            Ok(response) => !is_down(response.status()),
            Err(_) => false,
        }
    }

    /// Writes a batch: only the newest version of each id, split into calls that run concurrently.
    async fn write(&self, records: &[Record]) -> Result<WriteReport, WriteError> {
        let newest = newest_per_id(records);
        // Older versions of an id in the same batch are stale by definition.
        let superseded = (records.len() - newest.len()) as u64;
        let (to_write, mut report) = match &self.spec.id_check {
            IdCheckSpec::Exists { .. } => self.check_existing(newest).await?,
            _ => (newest, WriteReport::default()),
        };
        report.stale += superseded;
        let answers = match self.spec.body {
            BodyShape::Batch => {
                let calls = to_write
                    .chunks(self.spec.batch_size)
                    .map(|chunk| self.write_batch(chunk));
                join_all(calls).await.into_iter().flatten().collect()
            }
            BodyShape::Record => {
                let calls = to_write.iter().map(|record| async move {
                    let key = match &self.spec.id_check {
                        IdCheckSpec::IdempotencyKey { header } => Some((
                            header.as_str(),
                            format!("{}@{}", record.id, record.modify_time.timestamp_millis()),
                        )),
                        _ => None,
                    };
                    let answer = self
                        .call(
                            self.method.clone(),
                            &self.url(&self.spec.path, None),
                            &record.data,
                            key,
                        )
                        .await;
                    (1, answer)
                });
                join_all(calls).await
            }
        };
        let appeared = answers
            .iter()
            .any(|(_, answer)| matches!(answer, Ok(Answer::AlreadyThere)));
        if appeared
            && let IdCheckSpec::Exists {
                on_exists: OnExists::Update,
                ..
            } = &self.spec.id_check
        {
            // A record that was not there when asked was written meanwhile (by another writer, with
            // perhaps an older version): try again, and the next check finds it and updates it.
            return Err(WriteError::Transient(
                "target answered 409 for a record it did not hold a moment before".into(),
            ));
        }
        merge(report, answers)
    }
}
