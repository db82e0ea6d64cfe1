//! An operator's replay or purge of dead letters, recorded as such: who ran it (the OS user, or the
//! console's), when,
//! and which letters moved. A replayed letter is sent into its stage again under a new message id, so
//! that the stage settles it anew; a letter the broker dead-lettered itself (no stage settled it) is
//! recorded as dead-lettered by the broker at the same time.

use conveyor_base::Stage;
use conveyor_base::ledger::{BROKER_CLASS, Sent};
use conveyor_postgres::{Database, DatabaseError};
use serde::Serialize;
use tokio_postgres::types::Json;

use crate::record::SettledRow;

/// What an operator did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ActionKind {
    Replay,
    Purge,
}

impl ActionKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ActionKind::Replay => "replay",
            ActionKind::Purge => "purge",
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        [ActionKind::Replay, ActionKind::Purge]
            .into_iter()
            .find(|kind| kind.as_str() == name)
    }
}

/// One dead letter an action moved.
#[derive(Debug, Clone, Serialize)]
pub struct Moved {
    pub message_id: String,
    pub class: String,
    pub record_ids: Vec<String>,
    /// The message id its replayed copy carries.
    pub replayed_as: Option<String>,
}

/// The user running this process, as the OS names it.
pub fn os_user() -> String {
    ["USER", "LOGNAME", "USERNAME"]
        .iter()
        .find_map(|name| std::env::var(name).ok().filter(|user| !user.is_empty()))
        .unwrap_or_else(|| "unknown".to_owned())
}

/// Who ran an action, and the job it is part of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct By {
    /// The OS user of `conveyorctl`, or the console's user (`alice (console)`).
    pub who: String,
    pub job_id: Option<i64>,
}

impl By {
    /// The OS user running this process.
    pub fn os_user() -> Self {
        Self {
            who: os_user(),
            job_id: None,
        }
    }
}

/// Records that `kind` moved `letters` of `stage`'s dead-letter queue, and marks them in the
/// letter index, in one transaction.
pub async fn record(
    database: &Database,
    pipeline: &str,
    stage: Stage,
    kind: ActionKind,
    letters: &[Moved],
    by: &By,
) -> Result<(), DatabaseError> {
    if letters.is_empty() {
        return Ok(());
    }
    let failed = conveyor_postgres::failed;
    let mut client = database.client().await?;
    let transaction = client
        .transaction()
        .await
        .map_err(failed("opening the ledger"))?;
    // Malformed letters carry no records of the pipeline's.
    let records: usize = letters
        .iter()
        .filter(|letter| letter.class != "malformed")
        .map(|letter| letter.record_ids.len())
        .sum();
    let action_id: i64 = transaction
        .query_one(
            "INSERT INTO conveyor_ledger_action (pipeline, action, stage, os_user, messages, records, letters, job_id) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8) RETURNING id",
            &[
                &pipeline,
                &kind.as_str(),
                &stage.as_str(),
                &by.who,
                &(letters.len() as i64),
                &(records as i64),
                &Json(letters),
                &by.job_id,
            ],
        )
        .await
        .map_err(failed("recording the action in the ledger"))?
        .get(0);
    let ids: Vec<&str> = letters.iter().map(|l| l.message_id.as_str()).collect();
    let state = match kind {
        ActionKind::Replay => "replayed",
        ActionKind::Purge => "purged",
    };
    crate::letters::mark(&*transaction, pipeline, stage, &ids, state, action_id)
        .await
        .map_err(failed("marking the letters moved in the ledger"))?;
    let broker: Vec<conveyor_base::ledger::Settled> = letters
        .iter()
        .filter(|letter| letter.class == BROKER_CLASS)
        .map(|letter| {
            let mut settled = conveyor_base::ledger::Settled::new(
                stage,
                letter.message_id.clone(),
                letter.record_ids.len() as u64,
            );
            settled.outcome =
                conveyor_base::ledger::Outcome::DeadLettered(conveyor_base::ErrorClass::Permanent);
            settled.dead_ids = letter.record_ids.clone();
            settled
        })
        .collect();
    if !broker.is_empty() {
        let rows: Vec<SettledRow> = broker
            .iter()
            .map(|settled| SettledRow::of(pipeline, settled).with_class(BROKER_CLASS))
            .collect();
        crate::record::insert_settled(&*transaction, &rows)
            .await
            .map_err(failed("recording the broker's dead letters in the ledger"))?;
    }
    if kind == ActionKind::Replay {
        let sent: Vec<Sent> = letters
            .iter()
            .filter_map(|letter| {
                Some(Sent {
                    stage,
                    message_id: letter.replayed_as.clone()?,
                    by: "replay",
                    parent_id: letter.message_id.clone(),
                    record_ids: letter.record_ids.clone(),
                })
            })
            .collect();
        crate::record::insert_sent(&*transaction, pipeline, &sent)
            .await
            .map_err(failed("recording the replayed copies in the ledger"))?;
    }
    transaction
        .commit()
        .await
        .map_err(failed("committing the action to the ledger"))
}
