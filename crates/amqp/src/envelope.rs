//! The message that travels on every queue: a batch of records with the ids that make it traceable.
//!
//! The body is JSON (`{"schema":1,"records":[...]}`); the message's identity lives in AMQP properties and
//! headers, so that operators and tools can read it without parsing the body: message id (uuid), the
//! pipeline, a trace id that follows the records through every stage, and the attempt count.
//!
//! Bodies may travel lz4-compressed (see [`Compression`]), said by the AMQP content encoding `lz4` (an
//! lz4 block after its little-endian u32 length). Every worker reads both plain and compressed bodies.

use std::borrow::Cow;

use conveyor_base::Record;
use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, ShortString};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::headers::{
    HEADER_ATTEMPT, HEADER_PIPELINE, HEADER_RECORDS, HEADER_REPLAYS, HEADER_TRACE_ID, header_text,
    header_u32, long_string,
};

/// Version of the body's layout; a consumer refuses bodies of a version it does not know.
pub(crate) const SCHEMA_VERSION: u32 = 1;
/// The largest body a worker accepts; larger ones are dead-lettered as malformed.
pub(crate) const MAX_BODY_BYTES: usize = 16 * 1024 * 1024;
/// The AMQP content encoding of a compressed body.
pub(crate) const LZ4: &str = "lz4";

/// Identity of a message, carried in AMQP properties and headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Meta {
    pub message_id: Uuid,
    pub pipeline: String,
    pub trace_id: Uuid,
    /// How often this message was tried at its current stage before (0 for the first try).
    pub attempt: u32,
    /// How often it was replayed from its stage's dead-letter queue (0: never); a letter it sends
    /// carries the count, so that a replay that dies again is known as one.
    pub replays: u32,
}

impl Meta {
    /// A new message starting a trace (what the fetcher sends).
    pub fn new_trace(pipeline: &str) -> Self {
        Self {
            message_id: Uuid::new_v4(),
            pipeline: pipeline.to_owned(),
            trace_id: Uuid::new_v4(),
            attempt: 0,
            replays: 0,
        }
    }

    /// The message this one becomes at the next stage, its id derived from this one's and `part`: a
    /// redelivered message passed on again is the same message downstream, so that the ledger and
    /// the next stage absorb the repeat.
    pub fn derived(&self, part: &str) -> Self {
        Self {
            message_id: Uuid::new_v5(&self.message_id, part.as_bytes()),
            pipeline: self.pipeline.clone(),
            trace_id: self.trace_id,
            attempt: 0,
            replays: 0,
        }
    }

    /// A new message that continues this one's trace at the next stage.
    pub fn next_stage(&self) -> Self {
        Self {
            message_id: Uuid::new_v4(),
            pipeline: self.pipeline.clone(),
            trace_id: self.trace_id,
            attempt: 0,
            replays: 0,
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct Body<R> {
    schema: u32,
    records: R,
}

/// A batch of records with its identity.
#[derive(Debug, Clone, PartialEq)]
pub struct Envelope {
    pub meta: Meta,
    pub records: Vec<Record>,
}

/// Why a delivery is not a message conveyor can read. These messages go to the dead-letter queue.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Malformed {
    #[error("body is {0} bytes, more than the {MAX_BODY_BYTES} allowed")]
    Oversize(usize),
    #[error("missing or invalid header {0}")]
    Header(&'static str),
    #[error("missing or invalid message id property")]
    MessageId,
    #[error("message is for pipeline {found:?}, this worker runs {expected:?}")]
    WrongPipeline { expected: String, found: String },
    #[error("body is not a conveyor batch: {0}")]
    Body(String),
    #[error("body has schema version {0}, this worker reads version {SCHEMA_VERSION}")]
    SchemaVersion(u32),
    #[error("body has content encoding {0:?}; this worker reads plain and {LZ4:?} bodies")]
    Encoding(String),
    #[error("body does not decompress: {0}")]
    Compression(String),
}

/// Which bodies are published lz4-compressed.
///
/// A page of similar records shrinks about four times, so compression spares the broker's disk and
/// network; it costs the workers CPU on both sides. Where the broker shares the workers' cores (one
/// host) the CPU matters more; where it sits across a network, the bytes. Small bodies, such as a
/// dead-lettered record, always stay plain so that they read as they are in the broker's own tools.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    Off,
    /// Bodies of this many bytes or more are compressed.
    FromBytes(usize),
}

impl Compression {
    /// Below this, compression saves too little to be worth a body the broker's tools cannot read.
    pub(crate) const SMALLEST: usize = 4 * 1024;

    /// A body as published: compressed when it is large enough.
    fn encode(self, json: Vec<u8>, properties: BasicProperties) -> (Vec<u8>, BasicProperties) {
        match self {
            Compression::FromBytes(from) if json.len() >= from.max(Self::SMALLEST) => (
                lz4_flex::block::compress_prepend_size(&json),
                properties.with_content_encoding(LZ4.into()),
            ),
            _ => (json, properties),
        }
    }
}

impl Default for Compression {
    fn default() -> Self {
        Compression::FromBytes(Self::SMALLEST)
    }
}

impl std::fmt::Display for Compression {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Compression::Off => f.write_str("off"),
            Compression::FromBytes(bytes) => write!(f, "{bytes}"),
        }
    }
}

impl std::str::FromStr for Compression {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        if text.eq_ignore_ascii_case("off") {
            return Ok(Compression::Off);
        }
        match text.parse::<usize>() {
            Ok(bytes) if bytes >= Self::SMALLEST => Ok(Compression::FromBytes(bytes)),
            _ => Err(format!(
                "expected \"off\" or a size in bytes of at least {}, got {text:?}",
                Self::SMALLEST
            )),
        }
    }
}

/// A delivery's body as JSON bytes: decompressed when its content encoding says so. The size a
/// compressed body claims is checked before anything is allocated for it.
pub fn decode_body<'a>(
    body: &'a [u8],
    properties: &BasicProperties,
) -> Result<Cow<'a, [u8]>, Malformed> {
    match properties.content_encoding().as_ref().map(|e| e.as_str()) {
        None | Some("" | "identity") => Ok(Cow::Borrowed(body)),
        Some(LZ4) => {
            let (size, block) = lz4_flex::block::uncompressed_size(body)
                .map_err(|err| Malformed::Compression(err.to_string()))?;
            if size > MAX_BODY_BYTES {
                return Err(Malformed::Oversize(size));
            }
            let json = lz4_flex::block::decompress(block, size)
                .map_err(|err| Malformed::Compression(err.to_string()))?;
            if json.len() != size {
                return Err(Malformed::Compression(format!(
                    "{} bytes where the header says {size}",
                    json.len()
                )));
            }
            Ok(Cow::Owned(json))
        }
        Some(other) => Err(Malformed::Encoding(other.to_owned())),
    }
}

impl Envelope {
    /// The body and AMQP properties to publish: persistent, JSON (compressed when large), with
    /// identity headers.
    pub fn to_amqp(&self, compression: Compression) -> (Vec<u8>, BasicProperties) {
        // Sized up front (each record's data, its id and time, and the keys around them): a body of a
        // few hundred KiB grown by doubling leaves the allocator a trail of freed blocks to hold.
        let size = self
            .records
            .iter()
            .map(|record| record.data.get().len() + record.id.len() + 96)
            .sum::<usize>()
            + 32;
        let mut json = Vec::with_capacity(size);
        serde_json::to_writer(
            &mut json,
            &Body {
                schema: SCHEMA_VERSION,
                records: &self.records,
            },
        )
        .expect("records serialize: their values are JSON already");
        compression.encode(json, self.meta.properties(self.records.len()))
    }

    /// Reads a delivery's body and properties, checking it belongs to `pipeline`.
    pub fn from_amqp(
        pipeline: &str,
        body: &[u8],
        properties: &BasicProperties,
    ) -> Result<Self, Malformed> {
        if body.len() > MAX_BODY_BYTES {
            return Err(Malformed::Oversize(body.len()));
        }
        let meta = Meta::from_properties(properties)?;
        if meta.pipeline != pipeline {
            return Err(Malformed::WrongPipeline {
                expected: pipeline.to_owned(),
                found: meta.pipeline,
            });
        }
        let body = decode_body(body, properties)?;
        let body = body.as_ref();
        #[derive(Deserialize)]
        struct SchemaOnly {
            schema: u32,
        }
        // One parse in the usual case; a body of another layout is read again only to say which.
        let parsed = serde_json::from_slice::<Body<Vec<Record>>>(body);
        let schema = match &parsed {
            Ok(parsed) => parsed.schema,
            Err(err) => {
                serde_json::from_slice::<SchemaOnly>(body)
                    .map_err(|_| Malformed::Body(err.to_string()))?
                    .schema
            }
        };
        if schema != SCHEMA_VERSION {
            return Err(Malformed::SchemaVersion(schema));
        }
        let parsed = parsed.map_err(|err| Malformed::Body(err.to_string()))?;
        Ok(Self {
            meta,
            records: parsed.records,
        })
    }
}

impl Meta {
    fn properties(&self, record_count: usize) -> BasicProperties {
        let mut headers = FieldTable::default();
        headers.insert(HEADER_PIPELINE.into(), long_string(&self.pipeline));
        headers.insert(
            HEADER_TRACE_ID.into(),
            long_string(&self.trace_id.to_string()),
        );
        headers.insert(HEADER_ATTEMPT.into(), AMQPValue::LongUInt(self.attempt));
        if self.replays > 0 {
            headers.insert(HEADER_REPLAYS.into(), AMQPValue::LongUInt(self.replays));
        }
        headers.insert(
            HEADER_RECORDS.into(),
            AMQPValue::LongUInt(u32::try_from(record_count).unwrap_or(u32::MAX)),
        );
        BasicProperties::default()
            .with_message_id(ShortString::from(self.message_id.to_string()))
            .with_correlation_id(ShortString::from(self.trace_id.to_string()))
            .with_content_type("application/json".into())
            .with_delivery_mode(2)
            .with_timestamp(chrono::Utc::now().timestamp().max(0) as u64)
            .with_headers(headers)
    }

    /// Reads identity from a delivery's properties.
    pub(crate) fn from_properties(properties: &BasicProperties) -> Result<Self, Malformed> {
        let message_id = properties
            .message_id()
            .as_ref()
            .and_then(|id| Uuid::parse_str(id.as_str()).ok())
            .ok_or(Malformed::MessageId)?;
        let headers = properties.headers().as_ref();
        let text = |name: &'static str| -> Result<String, Malformed> {
            headers
                .and_then(|table| table.inner().get(name))
                .and_then(header_text)
                .ok_or(Malformed::Header(name))
        };
        let pipeline = text(HEADER_PIPELINE)?;
        let trace_id = Uuid::parse_str(&text(HEADER_TRACE_ID)?)
            .map_err(|_| Malformed::Header(HEADER_TRACE_ID))?;
        let attempt = headers
            .and_then(|table| table.inner().get(HEADER_ATTEMPT))
            .map(|value| header_u32(value).ok_or(Malformed::Header(HEADER_ATTEMPT)))
            .transpose()?
            .unwrap_or(0);
        // Counted by conveyor's replays only: unreadable, it is taken as none.
        let replays = headers
            .and_then(|table| table.inner().get(HEADER_REPLAYS))
            .and_then(header_u32)
            .unwrap_or(0);
        Ok(Self {
            message_id,
            pipeline,
            trace_id,
            attempt,
            replays,
        })
    }
}

/// The ids of the records in a body, as far as it can be read; empty for an unreadable body.
pub fn record_ids_in(body: &[u8], properties: &BasicProperties) -> Vec<String> {
    #[derive(serde::Deserialize)]
    struct Ids {
        records: Vec<IdOnly>,
    }
    #[derive(serde::Deserialize)]
    struct IdOnly {
        id: String,
    }
    decode_body(body, properties)
        .ok()
        .and_then(|body| serde_json::from_slice::<Ids>(&body).ok())
        .map(|ids| ids.records.into_iter().map(|record| record.id).collect())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::DateTime;
    use serde_json::json;

    fn sample() -> Envelope {
        Envelope {
            meta: Meta::new_trace("orders"),
            records: vec![Record::new(
                "839081161182436352".into(),
                DateTime::parse_from_rfc3339("2020-03-02T15:15:59+08:00").unwrap(),
                &json!({"bill_no": "XSDD-20200303-00004", "total_amount": "20.2"}),
            )],
        }
    }

    #[test]
    fn round_trips_through_amqp() {
        let envelope = sample();
        let (body, properties) = envelope.to_amqp(Compression::default());
        assert_eq!(properties.delivery_mode(), &Some(2));
        assert_eq!(
            Envelope::from_amqp("orders", &body, &properties).unwrap(),
            envelope
        );
    }

    #[test]
    fn large_bodies_travel_compressed_and_small_ones_plain() {
        let compression = Compression::FromBytes(Compression::SMALLEST);
        let small = sample();
        let (body, properties) = small.to_amqp(compression);
        assert_eq!(properties.content_encoding(), &None);
        assert!(body.starts_with(b"{"));

        let mut large = sample();
        large.records = vec![large.records[0].clone(); 100];
        let (body, properties) = large.to_amqp(Compression::Off);
        assert_eq!(properties.content_encoding(), &None);
        assert_eq!(
            Envelope::from_amqp("orders", &body, &properties).unwrap(),
            large
        );

        let (body, properties) = large.to_amqp(compression);
        assert_eq!(
            properties.content_encoding().as_ref().map(|e| e.as_str()),
            Some(LZ4)
        );
        let plain = decode_body(&body, &properties).unwrap();
        assert!(plain.len() >= Compression::SMALLEST);
        assert!(
            body.len() * 4 < plain.len(),
            "{} of {}",
            body.len(),
            plain.len()
        );
        assert_eq!(
            Envelope::from_amqp("orders", &body, &properties).unwrap(),
            large
        );
    }

    #[test]
    fn compression_settings_parse_or_say_what_they_expect() {
        assert_eq!("off".parse(), Ok(Compression::Off));
        assert_eq!("65536".parse(), Ok(Compression::FromBytes(65_536)));
        for bad in ["100", "4k", ""] {
            let err = bad.parse::<Compression>().unwrap_err();
            assert!(err.contains("\"off\" or a size in bytes"), "{err}");
        }
    }

    #[test]
    fn compressed_bodies_are_checked_before_they_are_trusted() {
        let (_, properties) = sample().to_amqp(Compression::default());
        let lz4 = properties.clone().with_content_encoding(LZ4.into());
        // A body that claims 4 GiB is refused before anything is allocated for it.
        let bomb = u32::MAX.to_le_bytes();
        assert_eq!(
            Envelope::from_amqp("orders", &bomb, &lz4),
            Err(Malformed::Oversize(u32::MAX as usize))
        );
        let mut truncated = lz4_flex::block::compress_prepend_size(&[b'x'; 9000]);
        truncated.truncate(truncated.len() / 2);
        assert!(matches!(
            Envelope::from_amqp("orders", &truncated, &lz4),
            Err(Malformed::Compression(_))
        ));
        assert!(matches!(
            Envelope::from_amqp("orders", b"{}", &lz4),
            Err(Malformed::Compression(_))
        ));
        let gzip = properties.with_content_encoding("gzip".into());
        assert_eq!(
            Envelope::from_amqp("orders", b"{}", &gzip),
            Err(Malformed::Encoding("gzip".into()))
        );
    }

    #[test]
    fn next_stage_keeps_the_trace() {
        let meta = Meta::new_trace("orders");
        let next = meta.next_stage();
        assert_eq!(next.trace_id, meta.trace_id);
        assert_ne!(next.message_id, meta.message_id);
    }

    #[test]
    fn refuses_what_is_not_a_batch() {
        let (body, properties) = sample().to_amqp(Compression::default());
        assert!(matches!(
            Envelope::from_amqp("other", &body, &properties),
            Err(Malformed::WrongPipeline { .. })
        ));
        assert!(matches!(
            Envelope::from_amqp("orders", b"not json", &properties),
            Err(Malformed::Body(_))
        ));
        assert_eq!(
            Envelope::from_amqp("orders", br#"{"schema":9,"records":[]}"#, &properties),
            Err(Malformed::SchemaVersion(9))
        );
        assert!(matches!(
            Envelope::from_amqp(
                "orders",
                br#"{"schema":1,"records":[{"id":1}]}"#,
                &properties
            ),
            Err(Malformed::Body(_))
        ));
        // Record data travels as JSON text, still checked to be JSON.
        assert!(matches!(
            Envelope::from_amqp(
                "orders",
                br#"{"schema":1,"records":[{"id":"1","modify_time":"2020-03-02T15:15:59+08:00","data":{"a":tru}}]}"#,
                &properties
            ),
            Err(Malformed::Body(_))
        ));
        assert_eq!(
            Envelope::from_amqp("orders", &body, &BasicProperties::default()),
            Err(Malformed::MessageId)
        );
    }

    #[test]
    fn record_ids_are_read_from_a_batch_body() {
        let plain = BasicProperties::default();
        let body = br#"{"schema":1,"records":[{"id":"a"},{"id":"b"}]}"#;
        assert_eq!(record_ids_in(body, &plain), ["a", "b"]);
        assert!(record_ids_in(b"garbage", &plain).is_empty());
        let compressed = lz4_flex::block::compress_prepend_size(body);
        let lz4 = plain.with_content_encoding(LZ4.into());
        assert_eq!(record_ids_in(&compressed, &lz4), ["a", "b"]);
    }
}
