//! What the ledger records, as the stages speak of it: each message a stage sent on ([`Sent`]), and
//! what a stage settled for each message it took ([`Settled`]). The ledger itself (PostgreSQL, in
//! `conveyor_ledger`) sits behind [`Ledger`], so that the consume loop and the stages record without
//! knowing where.
//!
//! Both are keyed by message id, so that a redelivered message, settled again, is absorbed: the first
//! record of a message stands.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use crate::{ErrorClass, Stage};

/// The class of a letter the broker dead-lettered itself (past its work queue's delivery limit).
pub const BROKER_CLASS: &str = "broker";

/// A message published into a stage's queue, with the ids of the records it carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sent {
    /// The stage whose queue it entered.
    pub stage: Stage,
    pub message_id: String,
    /// Who sent it: the stage before (`fetch`, `transform`) or an operator's `replay`.
    pub by: &'static str,
    /// The message it came from (a window, a batch, a dead letter).
    pub parent_id: String,
    pub record_ids: Vec<String>,
}

/// What became of a message a stage took, for good (a retry is not settled: its copy comes back).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Passed on, written, filtered: see the counts.
    Done,
    /// The whole message went to the dead-letter queue, for this reason.
    DeadLettered(ErrorClass),
    /// Unreadable: counted as a message, its records (if any) never entered through conveyor.
    Malformed,
}

/// What a stage settled for one message it took.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settled {
    pub stage: Stage,
    pub message_id: String,
    pub outcome: Outcome,
    /// Records the message carried.
    pub records_in: u64,
    /// Records published on (a transformer's output units; a fetched window's records).
    pub passed_on: u64,
    /// Source records the rules skipped whole, by id.
    pub filtered_ids: Vec<String>,
    /// Output records the rules skipped (in the output's units, as `passed_on`).
    pub filtered: u64,
    /// Records the target applied.
    pub written: u64,
    /// Records the target already held in the same or a newer version.
    pub stale: u64,
    /// Records dead-lettered (each on its own, or the whole message), by id.
    pub dead_ids: Vec<String>,
    /// Their class, when there are any.
    pub dead_class: Option<ErrorClass>,
    /// The messages it was passed on as, recorded with it.
    pub sent: Vec<Sent>,
    /// The dead letters it was sent to its stage's dead-letter queue as, indexed with it.
    pub letters: Vec<Letter>,
}

/// A dead letter as the ledger indexes it, so that operators browse letters without taking them
/// from their queue (which keeps the letter itself, byte for byte, for a replay).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Letter {
    /// The letter's own message id in its dead-letter queue.
    pub message_id: String,
    /// An [`ErrorClass`]'s name, or [`BROKER_CLASS`].
    pub class: String,
    pub reason: String,
    pub record_ids: Vec<String>,
    /// Tries made before it was dead-lettered.
    pub attempts: u32,
    /// Times the message was replayed before it died this time.
    pub replays: u32,
    /// The letter's headers as text, by name.
    pub headers: Vec<(String, String)>,
    /// The payload as text (decompressed), or in hex when it is not UTF-8.
    pub payload: String,
}

impl Settled {
    /// A message settled with nothing in it counted yet.
    pub fn new(stage: Stage, message_id: impl Into<String>, records_in: u64) -> Self {
        Self {
            stage,
            message_id: message_id.into(),
            outcome: Outcome::Done,
            records_in,
            passed_on: 0,
            filtered_ids: Vec::new(),
            filtered: 0,
            written: 0,
            stale: 0,
            dead_ids: Vec::new(),
            dead_class: None,
            sent: Vec::new(),
            letters: Vec::new(),
        }
    }

    /// A whole message dead-lettered (or refused as malformed) with its records.
    pub fn dead_lettered(
        stage: Stage,
        message_id: impl Into<String>,
        class: ErrorClass,
        record_ids: Vec<String>,
    ) -> Self {
        let mut settled = Self::new(stage, message_id, record_ids.len() as u64);
        settled.outcome = match class {
            ErrorClass::Malformed => Outcome::Malformed,
            class => Outcome::DeadLettered(class),
        };
        if class != ErrorClass::Malformed {
            settled.dead_ids = record_ids;
            settled.dead_class = Some(class);
        }
        settled
    }
}

pub type LedgerFuture<'a> = Pin<Box<dyn Future<Output = Result<(), String>> + Send + 'a>>;

/// Where what each stage settled is kept. A message is acked only after its settlement is recorded,
/// so that the ledger is never behind the queues.
pub trait Ledger: Send + Sync + 'static {
    /// Whether anything is kept (else every call succeeds at once).
    fn enabled(&self) -> bool;

    /// Records what a stage settled for a message, with the messages it sent on.
    fn settle(&self, settled: Settled) -> LedgerFuture<'_>;

    /// Records messages sent on before the message they came from is settled (a fetched window's
    /// pages, each once its publish is confirmed).
    fn sent(&self, sent: Vec<Sent>) -> LedgerFuture<'_>;
}

/// The ledger switched off: nothing is kept.
pub struct NoLedger;

impl Ledger for NoLedger {
    fn enabled(&self) -> bool {
        false
    }

    fn settle(&self, _settled: Settled) -> LedgerFuture<'_> {
        Box::pin(async { Ok(()) })
    }

    fn sent(&self, _sent: Vec<Sent>) -> LedgerFuture<'_> {
        Box::pin(async { Ok(()) })
    }
}

/// A shared ledger handle.
pub type SharedLedger = Arc<dyn Ledger>;
