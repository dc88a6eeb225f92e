//! The Server-Sent Events wire format: how events, heartbeats and the connection prelude
//! look on the wire, and the resume ids clients send back. Every byte sent to a client is
//! written here.
//!
//! An event is rendered once per server and shared by every receiving connection. A
//! connection that streams one endpoint uses the event as is; one that streams several
//! replaces the `id:` line with its own resume id, which carries a position per endpoint.

use std::fmt::Write as _;

use bytes::{BufMut, Bytes, BytesMut};

use fjord_bus::{Problem, SkipReason, SkippedRecords, StreamId};

/// A heartbeat: a comment line, ignored by clients, that keeps proxies from closing the
/// connection as idle.
pub const HEARTBEAT: Bytes = Bytes::from_static(b": heartbeat\n\n");

/// Reserved event names.
pub mod reserved {
    /// Records were missed: the resume id was older than the retention window, the
    /// consumer skipped records it could not read, or the bus held an entry that cannot be
    /// sent.
    pub const GAP: &str = "fjord.gap";
    /// The instance is draining; reconnect now.
    pub const SHUTDOWN: &str = "fjord.shutdown";
    /// The token expired; refresh it and reconnect.
    pub const EXPIRED: &str = "fjord.expired";
    /// A table endpoint's rows follow, without ids: they replace what the client holds.
    pub const SNAPSHOT_START: &str = "fjord.snapshot_start";
    /// The rows are complete; its id is where the live records after them begin.
    pub const SNAPSHOT_END: &str = "fjord.snapshot_end";
}

/// An event rendered once: `id:`, `event:` and `data:` lines.
#[derive(Debug, Clone)]
pub struct RenderedEvent {
    bytes: Bytes,
    /// Where the `event:` line starts, after the `id:` line.
    tail_start: usize,
}

impl RenderedEvent {
    /// Renders a record of `endpoint` at `id`. `envelope` holds no line break.
    pub fn new(id: StreamId, endpoint: &str, envelope: &[u8]) -> Self {
        let mut buffer = BytesMut::with_capacity(envelope.len() + endpoint.len() + 48);
        // Writing to a BytesMut cannot fail.
        let _ = writeln!(buffer, "id: {id}");
        let tail_start = buffer.len();
        let _ = write!(buffer, "event: {endpoint}\ndata: ");
        buffer.put_slice(envelope);
        buffer.put_slice(b"\n\n");
        Self {
            bytes: buffer.freeze(),
            tail_start,
        }
    }

    /// The whole event, with the stream id of its endpoint as `id:`.
    pub fn bytes(&self) -> &Bytes {
        &self.bytes
    }

    /// The event without its `id:` line.
    pub fn tail(&self) -> &[u8] {
        &self.bytes[self.tail_start..]
    }

    /// Appends the event without its `id:` line, as a table's row is sent: a row is not a
    /// position to resume from.
    pub fn write_without_id(&self, out: &mut BytesMut) {
        out.put_slice(self.tail());
    }

    /// Appends the event with `resume_id` as its `id:` line.
    pub fn write_with_id(&self, resume_id: &ResumeId, out: &mut BytesMut) {
        resume_id.write_id_line(out);
        out.put_slice(self.tail());
    }
}

/// The first bytes of every stream: the reconnection delay, and the position the stream
/// starts at, so that a client that drops before its first event still resumes exactly.
pub fn prelude(retry_ms: u64, start: &ResumeId) -> Bytes {
    let mut out = BytesMut::with_capacity(64);
    let _ = write!(out, "retry: {retry_ms}\nid: ");
    start.write(&mut out);
    out.put_slice(b"\n\n");
    out.freeze()
}

/// An out-of-band event with a reserved name and a JSON body.
pub fn notice(event: &str, data: &serde_json::Value) -> Bytes {
    Bytes::from(format!("event: {event}\ndata: {data}\n\n"))
}

/// `fjord.snapshot_start`: the rows of table endpoint `endpoint` follow.
pub fn snapshot_start(endpoint: &str, out: &mut BytesMut) {
    let _ = write!(
        out,
        "event: {}\ndata: {}\n\n",
        reserved::SNAPSHOT_START,
        serde_json::json!({"endpoint": endpoint})
    );
}

/// `fjord.snapshot_end` of table endpoint `endpoint`, with the connection's position
/// `resume_id` after the rows as its id.
pub fn snapshot_end(endpoint: &str, resume_id: &ResumeId, out: &mut BytesMut) {
    out.put_slice(b"id: ");
    resume_id.write(out);
    let _ = write!(
        out,
        "\nevent: {}\ndata: {}\n\n",
        reserved::SNAPSHOT_END,
        serde_json::json!({"endpoint": endpoint})
    );
}

/// `fjord.gap`: records of `endpoint` after `last_event_id` are gone (past the retention
/// window); the stream continues at `oldest` (`ZERO` when nothing is kept).
pub fn gap(endpoint: &str, last_event_id: StreamId, oldest: StreamId) -> Bytes {
    let oldest = (oldest != StreamId::ZERO).then(|| oldest.to_string());
    notice(
        reserved::GAP,
        &serde_json::json!({
            "endpoint": endpoint,
            "last_event_id": last_event_id.to_string(),
            "oldest_id": oldest,
            "message": "records after your last event id are past the retention window; continuing from the oldest kept",
        }),
    )
}

/// The `fjord.gap` event for records of `endpoint` that the consumer could not read (or
/// decode) and skipped, at stream position `id`. Unlike a retention gap it has an id: it is
/// an entry of the stream, which a client resuming from before it is sent again.
pub fn unreadable_gap(id: StreamId, endpoint: &str, skipped: &SkippedRecords) -> RenderedEvent {
    let message = match skipped.reason {
        SkipReason::UnreadableRecord => {
            "records of this partition could not be read from Kafka and were skipped; their keys are unknown"
        }
        SkipReason::UndecodableRecord => {
            "a record of this partition could not be decoded by its topic's format and was skipped; its key is unknown"
        }
    };
    let data = serde_json::json!({
        "endpoint": endpoint,
        "reason": skipped.reason.as_str(),
        "topic": skipped.topic,
        "partition": skipped.partition,
        "first_offset": skipped.first_offset,
        "last_offset": skipped.last_offset,
        "error": skipped.error,
        "message": message,
    });
    RenderedEvent::new(id, reserved::GAP, data.to_string().as_bytes())
}

/// The `fjord.gap` event for an entry of `endpoint`'s stream at `id` that cannot be sent (it
/// was not written by fjord-consumer): whatever record it held is lost to clients. Like an
/// unreadable-record gap it has an id, so that a client resuming from before it is told too.
pub fn invalid_gap(id: StreamId, endpoint: &str, problem: Problem) -> RenderedEvent {
    let data = serde_json::json!({
        "endpoint": endpoint,
        "reason": "invalid_entry",
        "id": id.to_string(),
        "problem": problem.to_string(),
        "message": "an entry of this stream was not written by Fjord and cannot be sent; a record may be missing here",
    });
    RenderedEvent::new(id, reserved::GAP, data.to_string().as_bytes())
}

/// A client's position: one stream id per endpoint of its connection, in the order of the
/// connection's (sorted) endpoints. Rendered as the ids joined by `_`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResumeId(pub Vec<StreamId>);

/// A `Last-Event-ID` that is not a resume id of this connection's endpoints.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadResumeId {
    /// Not of the form.
    #[error("last event id is malformed: {0}")]
    Malformed(fjord_bus::BadStreamId),
    /// An id of a connection with another number of endpoints.
    #[error("last event id has {found} positions, but this stream has {expected} endpoints")]
    WrongLength {
        /// Endpoints of this connection.
        expected: usize,
        /// Positions in the id.
        found: usize,
    },
}

impl ResumeId {
    /// Parses an id sent back by a client of a connection with `endpoints` endpoints.
    pub fn parse(text: &str, endpoints: usize) -> Result<Self, BadResumeId> {
        let found = text.split('_').count();
        if found != endpoints {
            return Err(BadResumeId::WrongLength {
                expected: endpoints,
                found,
            });
        }
        let ids = text
            .split('_')
            .map(str::parse)
            .collect::<Result<Vec<StreamId>, _>>()
            .map_err(BadResumeId::Malformed)?;
        Ok(Self(ids))
    }

    /// Appends `id: {self}` and its line break.
    pub fn write_id_line(&self, out: &mut BytesMut) {
        out.put_slice(b"id: ");
        self.write(out);
        out.put_u8(b'\n');
    }

    fn write(&self, out: &mut BytesMut) {
        for (i, id) in self.0.iter().enumerate() {
            if i > 0 {
                out.put_u8(b'_');
            }
            let _ = write!(out, "{id}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(ms: u64, seq: u64) -> StreamId {
        StreamId { ms, seq }
    }

    #[test]
    fn event_wire_format() {
        let event = RenderedEvent::new(id(1_764_000_000_000, 2), "orders", br#"{"a":1}"#);
        assert_eq!(
            event.bytes().as_ref(),
            b"id: 1764000000000-2\nevent: orders\ndata: {\"a\":1}\n\n"
        );
        let mut out = BytesMut::new();
        event.write_with_id(
            &ResumeId(vec![id(5, 0), id(1_764_000_000_000, 2)]),
            &mut out,
        );
        assert_eq!(
            out.as_ref(),
            b"id: 5-0_1764000000000-2\nevent: orders\ndata: {\"a\":1}\n\n"
        );
    }

    #[test]
    fn an_unreadable_gap_is_an_event_with_an_id() {
        let skipped = SkippedRecords {
            topic: "orders".into(),
            partition: 3,
            first_offset: 40,
            last_offset: 59,
            error: "Local: Invalid compressed data".into(),
            reason: SkipReason::UnreadableRecord,
        };
        let event = unreadable_gap(id(9, 1), "orders", &skipped);
        let text = std::str::from_utf8(event.bytes()).expect("utf-8");
        let data = text
            .strip_prefix("id: 9-1\nevent: fjord.gap\ndata: ")
            .and_then(|rest| rest.strip_suffix("\n\n"))
            .expect(text);
        let data: serde_json::Value = serde_json::from_str(data).expect("json");
        assert_eq!(data["endpoint"], "orders");
        assert_eq!(data["reason"], "unreadable_record");
        assert_eq!(data["topic"], "orders");
        assert_eq!(data["partition"], 3);
        assert_eq!(data["first_offset"], 40);
        assert_eq!(data["last_offset"], 59);

        // An undecodable record's marker says so; an unreadable batch's marker is written
        // as before the reason existed, so servers of either version read both.
        let marker = serde_json::to_value(&skipped).expect("json");
        assert_eq!(marker.get("reason"), None);
        let undecodable = SkippedRecords {
            reason: SkipReason::UndecodableRecord,
            ..skipped
        };
        let marker = serde_json::to_value(&undecodable).expect("json");
        assert_eq!(marker["reason"], "undecodable_record");
        let event = unreadable_gap(id(9, 1), "orders", &undecodable);
        let text = std::str::from_utf8(event.bytes()).expect("utf-8");
        assert!(text.contains(r#""reason":"undecodable_record""#), "{text}");
        assert!(text.contains("could not be decoded"), "{text}");
    }

    #[test]
    fn an_invalid_entry_gap_is_an_event_with_an_id() {
        let event = invalid_gap(id(9, 2), "orders", Problem::LineBreak);
        let text = std::str::from_utf8(event.bytes()).expect("utf-8");
        let data = text
            .strip_prefix("id: 9-2\nevent: fjord.gap\ndata: ")
            .and_then(|rest| rest.strip_suffix("\n\n"))
            .expect(text);
        let data: serde_json::Value = serde_json::from_str(data).expect("json");
        assert_eq!(data["endpoint"], "orders");
        assert_eq!(data["reason"], "invalid_entry");
        assert_eq!(data["id"], "9-2");
        assert_eq!(data["problem"], "the envelope holds a line break");
    }

    #[test]
    fn prelude_carries_retry_and_start() {
        let start = ResumeId(vec![id(7, 1)]);
        assert_eq!(prelude(2000, &start).as_ref(), b"retry: 2000\nid: 7-1\n\n");
    }

    #[test]
    fn resume_ids_round_trip() {
        let resume = ResumeId(vec![id(1, 2), id(3, 4)]);
        let mut out = BytesMut::new();
        resume.write(&mut out);
        let text = std::str::from_utf8(&out).expect("ascii");
        assert_eq!(text, "1-2_3-4");
        assert_eq!(ResumeId::parse(text, 2), Ok(resume));
        assert!(matches!(
            ResumeId::parse(text, 1),
            Err(BadResumeId::WrongLength {
                expected: 1,
                found: 2
            })
        ));
        assert!(matches!(
            ResumeId::parse("1-2_x", 2),
            Err(BadResumeId::Malformed(_))
        ));
        assert!(ResumeId::parse("", 1).is_err());
    }
}
