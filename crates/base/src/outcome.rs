//! What becomes of a piece of work that failed, decided where the failure is understood: every error
//! knows its class, and every message its disposition.

/// What kind of failure, which decides where the work goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// The message itself is unreadable: not JSON, wrong shape, unknown schema, oversize.
    Malformed,
    /// The data is wrong for its target: retrying cannot help.
    Permanent,
    /// The target or a dependency failed for now: retrying may help.
    Transient,
    /// The source asked to be called later (its rate limit), for longer than a worker holds a
    /// message: no fault, so the work is put back with a delay and no attempt counted.
    Throttled,
    /// A service refused the worker's credentials or permissions: a setup error, no fault of the
    /// work. The worker holds the work back until they are accepted (`conveyor_runtime::refusal`).
    Refused,
}

impl ErrorClass {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorClass::Malformed => "malformed",
            ErrorClass::Permanent => "permanent",
            ErrorClass::Transient => "transient",
            ErrorClass::Throttled => "throttled",
            ErrorClass::Refused => "refused",
        }
    }
}

/// A failure with its class and a message fit for operators (never containing secrets).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub class: ErrorClass,
    pub message: String,
}

impl Failure {
    pub fn new(class: ErrorClass, message: impl Into<String>) -> Self {
        Self {
            class,
            message: message.into(),
        }
    }
}

/// What became of a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Disposition {
    /// Everything the message asked for is durable downstream: ack it.
    Done,
    /// It can never succeed as it is: dead-letter it with the reason, then ack.
    DeadLetter(Failure),
    /// It may succeed later: send a copy to the next retry tier (or, after the last attempt, to the
    /// dead-letter queue), then ack.
    Retry(Failure),
    /// The worker cannot take it now (it is stopping, or its target is down): give it back to the work
    /// queue as it is, without counting an attempt.
    Release,
    /// It waits on something that is no fault (the source throttles it): send a copy to a retry tier
    /// of about a minute, with the same attempt count, then ack. Never dead-letters it, and never holds
    /// it past the broker's consumer timeout.
    Defer(Failure),
}
