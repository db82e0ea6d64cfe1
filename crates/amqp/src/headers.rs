//! Every AMQP header conveyor writes or reads, named once, and the helpers that read them whatever
//! integer or string type a client used.

use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, LongString};

/// The pipeline a message belongs to.
pub(crate) const HEADER_PIPELINE: &str = "x-conveyor-pipeline";
/// The trace that follows a fetched page's records through every stage.
pub(crate) const HEADER_TRACE_ID: &str = "x-conveyor-trace-id";
/// Tries of the message at its current stage before this one.
pub(crate) const HEADER_ATTEMPT: &str = "x-conveyor-attempt";
/// Records in the body, readable without parsing it.
pub(crate) const HEADER_RECORDS: &str = "x-conveyor-records";
/// The stage whose dead-letter queue holds the message.
pub(crate) const HEADER_STAGE: &str = "x-conveyor-stage";
/// The failure's class (malformed, permanent, transient; `broker` for the broker's own).
pub(crate) const HEADER_ERROR_CLASS: &str = "x-conveyor-error-class";
/// The failure, in words fit for an operator.
pub(crate) const HEADER_ERROR: &str = "x-conveyor-error";
/// When the message first failed at this stage (RFC 3339).
pub(crate) const HEADER_FIRST_FAILED_AT: &str = "x-conveyor-first-failed-at";
/// When it failed last.
pub(crate) const HEADER_LAST_FAILED_AT: &str = "x-conveyor-last-failed-at";
/// Where the message was first published, kept across retries for replay.
pub(crate) const HEADER_ORIGINAL_EXCHANGE: &str = "x-conveyor-original-exchange";
/// The routing key it was first published with.
pub(crate) const HEADER_ORIGINAL_ROUTING_KEY: &str = "x-conveyor-original-routing-key";
/// The ids of a dead letter's records, comma-separated, for `conveyorctl dlq`.
pub(crate) const HEADER_RECORD_IDS: &str = "x-conveyor-record-ids";

/// Counts a replayed message carries: how often it was replayed (it keeps no failure headers).
pub(crate) const HEADER_REPLAYS: &str = "x-conveyor-replays";
/// The broker's own record of dead-lettering (a delivery limit, a rejection, an expired TTL).
pub(crate) const HEADER_X_DEATH: &str = "x-death";
/// Deliveries of a message, counted by quorum queues.
pub(crate) const HEADER_X_DELIVERY_COUNT: &str = "x-delivery-count";

/// A text header value.
pub(crate) fn long_string(text: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(text.as_bytes().to_vec()))
}

/// A header's value as text, whether sent as a long or short string.
pub(crate) fn header_text(value: &AMQPValue) -> Option<String> {
    match value {
        AMQPValue::LongString(text) => std::str::from_utf8(text.as_bytes()).ok().map(str::to_owned),
        AMQPValue::ShortString(text) => Some(text.as_str().to_owned()),
        _ => None,
    }
}

/// A header's value as an unsigned count, whatever integer type a client used.
pub(crate) fn header_u32(value: &AMQPValue) -> Option<u32> {
    let wide: i64 = match *value {
        AMQPValue::ShortShortUInt(n) => n.into(),
        AMQPValue::ShortUInt(n) => n.into(),
        AMQPValue::LongUInt(n) => n.into(),
        AMQPValue::ShortShortInt(n) => n.into(),
        AMQPValue::ShortInt(n) => n.into(),
        AMQPValue::LongInt(n) => n.into(),
        AMQPValue::LongLongInt(n) => n,
        _ => return None,
    };
    u32::try_from(wide).ok()
}

/// Headers as a plain table, for tools that read dead letters.
pub(crate) fn headers_of(properties: &BasicProperties) -> &FieldTable {
    static EMPTY: std::sync::OnceLock<FieldTable> = std::sync::OnceLock::new();
    properties
        .headers()
        .as_ref()
        .unwrap_or_else(|| EMPTY.get_or_init(FieldTable::default))
}

/// A header as text, if present.
pub fn header(properties: &BasicProperties, name: &str) -> Option<String> {
    headers_of(properties)
        .inner()
        .get(name)
        .and_then(|value| match value {
            AMQPValue::LongString(_) | AMQPValue::ShortString(_) => header_text(value),
            other => header_u32(other).map(|n| n.to_string()),
        })
}
