//! What one pass over a window keeps: the ids it saw, and the messages not yet confirmed with the
//! progress each one's confirm records.

use std::collections::HashSet;

use conveyor_amqp::PendingConfirm;
use conveyor_base::ledger::{Sent, SharedLedger};
use conveyor_base::source::Window;
use conveyor_base::{ErrorClass, Failure, Stage};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::state::{Progress, SyncStore};

/// Messages published and not yet confirmed that one window pass may have.
const UNCONFIRMED: usize = 8;

/// A failure worth retrying later: the broker or the sync state did not answer.
pub(crate) fn transient(err: impl std::fmt::Display) -> Failure {
    // `:#` prints an `anyhow::Error` with its causes.
    Failure::new(ErrorClass::Transient, format!("{err:#}"))
}

/// The messages of a pass published and not yet confirmed, awaited in order by a task of their own;
/// once one is confirmed, the pass's progress is recorded up to its last page (see
/// [`SyncStore::record_progress`]), so that a fetcher that dies loses at most the messages in flight.
/// At most [`UNCONFIRMED`] wait at once: a fetcher that pages faster than the broker takes messages
/// waits for it, rather than holding the rest of the window in memory.
pub(crate) struct Checkpoints {
    sender: mpsc::Sender<Checkpoint>,
    task: JoinHandle<Result<(), Failure>>,
    /// Whether progress or the ledger is recorded (else the ids of a message are not needed).
    keeps_ids: bool,
}

/// A published message, and how far the pass is once it is confirmed.
struct Checkpoint {
    confirm: PendingConfirm,
    message_id: String,
    /// The last page whose records are all in this message or an earlier one.
    pages_confirmed: u64,
    ids: Vec<String>,
}

impl Checkpoints {
    /// `record`: where to record the progress (none for a pass that may not resume). Each confirmed
    /// message is recorded in `ledger` as sent by the window's message `window_message`.
    pub(crate) fn start(
        record: Option<(SyncStore, Window, u64)>,
        ledger: SharedLedger,
        window_message: String,
    ) -> Self {
        let keeps_ids = record.is_some() || ledger.enabled();
        let (sender, mut receiver) = mpsc::channel::<Checkpoint>(UNCONFIRMED);
        let task = tokio::spawn(async move {
            while let Some(checkpoint) = receiver.recv().await {
                checkpoint.confirm.wait().await.map_err(transient)?;
                let mut pages_confirmed = checkpoint.pages_confirmed;
                let mut sent = vec![(checkpoint.message_id, checkpoint.ids)];
                // The messages that queued up meanwhile are recorded in the same write: when writes
                // are slower than confirms, they are fewer, not later.
                while let Ok(next) = receiver.try_recv() {
                    next.confirm.wait().await.map_err(transient)?;
                    pages_confirmed = next.pages_confirmed;
                    sent.push((next.message_id, next.ids));
                }
                // The progress needs the ids only when it is recorded: copied then, moved otherwise.
                let ids: Vec<String> = match &record {
                    Some(_) if ledger.enabled() => sent
                        .iter()
                        .flat_map(|(_, ids)| ids.iter().cloned())
                        .collect(),
                    Some(_) => sent
                        .iter_mut()
                        .flat_map(|(_, ids)| std::mem::take(ids))
                        .collect(),
                    None => Vec::new(),
                };
                if ledger.enabled() {
                    let sent = sent
                        .into_iter()
                        .map(|(message_id, record_ids)| Sent {
                            stage: Stage::Transform,
                            message_id,
                            by: Stage::Fetch.as_str(),
                            parent_id: window_message.clone(),
                            record_ids,
                        })
                        .collect();
                    ledger.sent(sent).await.map_err(transient)?;
                }
                if let Some((store, window, count)) = &record {
                    let progress = Progress {
                        pages_confirmed,
                        count: *count,
                    };
                    store
                        .record_progress(window, &progress, &ids)
                        .await
                        .map_err(transient)?;
                }
            }
            Ok(())
        });
        Self {
            sender,
            task,
            keeps_ids,
        }
    }

    /// Whether the ids of each message's records are wanted.
    pub(crate) fn keeps_ids(&self) -> bool {
        self.keeps_ids
    }

    /// Adds a published message; waits while [`UNCONFIRMED`] others wait for their confirm.
    pub(crate) async fn add(
        &mut self,
        (confirm, message_id): (PendingConfirm, String),
        pages_confirmed: u64,
        ids: Vec<String>,
    ) -> Result<(), Failure> {
        let checkpoint = Checkpoint {
            confirm,
            message_id,
            pages_confirmed,
            ids,
        };
        if self.sender.send(checkpoint).await.is_err() {
            // The task stopped at a failed confirm or record: its error is the pass's.
            return Err(join(&mut self.task).await.err().unwrap_or_else(|| {
                Failure::new(ErrorClass::Transient, "the confirm task stopped early")
            }));
        }
        Ok(())
    }

    /// Waits until every message is confirmed and its progress recorded.
    pub(crate) async fn finish(self) -> Result<(), Failure> {
        let Self {
            sender, mut task, ..
        } = self;
        drop(sender);
        join(&mut task).await
    }
}

async fn join(task: &mut JoinHandle<Result<(), Failure>>) -> Result<(), Failure> {
    task.await.unwrap_or_else(|err| {
        Err(Failure::new(
            ErrorClass::Transient,
            format!("the confirm task failed: {err}"),
        ))
    })
}

/// The ids one pass over a window published, and whether one came twice.
#[derive(Debug)]
pub(crate) struct PassIds {
    pub(crate) ids: HashSet<String>,
    pub(crate) repeated: bool,
}

impl PassIds {
    /// Sized for the window's `count`, so that the set never grows (and holds two tables) on the way.
    pub(crate) fn for_count(count: u64) -> Self {
        Self {
            ids: HashSet::with_capacity(usize::try_from(count).unwrap_or(0).min(1 << 20)),
            repeated: false,
        }
    }

    /// The ids an earlier part of the pass published (a pass that resumes).
    pub(crate) fn from_ids(ids: HashSet<String>) -> Self {
        Self {
            ids,
            repeated: false,
        }
    }

    pub(crate) fn add(&mut self, id: &str) {
        if !self.ids.insert(id.to_owned()) {
            self.repeated = true;
        }
    }
}
