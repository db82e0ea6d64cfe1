//! What one pass over a window keeps: the ids it saw, and the messages not yet confirmed.

use std::collections::{HashSet, VecDeque};

use conveyor_amqp::PendingConfirm;
use conveyor_base::{ErrorClass, Failure};

/// Messages published and not yet confirmed that one window pass may have.
const UNCONFIRMED: usize = 8;

/// A failure worth retrying later: the broker or the sync state did not answer.
pub(crate) fn transient(err: impl std::fmt::Display) -> Failure {
    // `:#` prints an `anyhow::Error` with its causes.
    Failure::new(ErrorClass::Transient, format!("{err:#}"))
}

/// Messages of a window published and not yet confirmed by the broker. At most [`UNCONFIRMED`] wait
/// at once: a fetcher that pages faster than the broker takes messages waits for it, rather than
/// holding the rest of the window in memory.
#[derive(Default)]
pub(crate) struct Unconfirmed(VecDeque<PendingConfirm>);

impl Unconfirmed {
    pub(crate) async fn add(&mut self, confirm: Option<PendingConfirm>) -> Result<(), Failure> {
        self.0.extend(confirm);
        while self.0.len() > UNCONFIRMED {
            self.wait_oldest().await?;
        }
        Ok(())
    }

    pub(crate) async fn wait_all(mut self) -> Result<(), Failure> {
        while !self.0.is_empty() {
            self.wait_oldest().await?;
        }
        Ok(())
    }

    async fn wait_oldest(&mut self) -> Result<(), Failure> {
        match self.0.pop_front() {
            Some(confirm) => confirm.wait().await.map_err(transient),
            None => Ok(()),
        }
    }
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

    pub(crate) fn add(&mut self, id: &str) {
        if !self.ids.insert(id.to_owned()) {
            self.repeated = true;
        }
    }
}
