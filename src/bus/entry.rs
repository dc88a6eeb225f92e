//! Decoding a stream entry: the one place where what the bus holds becomes what a server may
//! send. Both buses hand every entry they read, live or for a replay, to [`decode`]; nothing
//! downstream looks at raw bytes again. Redis may hold entries Fjord did not write (anyone
//! with write access can `XADD`), so an entry that is not as fjord-consumer writes it is not
//! an error that stops a read: it becomes [`EntryKind::Invalid`], which servers turn into a
//! `fjord.gap` for the clients that would have had it, in its place in the stream.

use std::sync::Arc;

use bytes::Bytes;
use serde::de::IgnoredAny;

use super::{BusEntry, EntryKind, SkippedRecords, StreamId};

/// An entry's fields, as fjord-consumer writes them.
pub(super) mod field {
    /// The envelope's JSON, or a skipped-records marker's.
    pub(crate) const ENVELOPE: &[u8] = b"e";
    /// The id of the entry appended before it.
    pub(crate) const PREVIOUS: &[u8] = b"p";
    /// The record key clients filter on; absent for a record without a key.
    pub(crate) const KEY: &[u8] = b"k";
    /// Present (`1`) on a marker of skipped records.
    pub(crate) const SKIPPED: &[u8] = b"s";
}

/// An envelope that may be written on an SSE `data:` line as it is: UTF-8, one JSON object,
/// no CR, LF or NUL. Only [`WireJson::new`] makes one, so holding one is the proof.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WireJson {
    bytes: Bytes,
    /// Its top-level `timestamp` when that is an integer: the record's Kafka timestamp in
    /// milliseconds, which the delivery latency is measured from.
    timestamp_ms: Option<i64>,
}

/// The top level of an envelope, read in the pass that checks it is JSON: its `timestamp`
/// (the last, should it repeat) when an integer, and nothing else kept.
struct TopLevel(Option<i64>);

impl<'de> serde::Deserialize<'de> for TopLevel {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_map(TopLevelVisitor)
    }
}

struct TopLevelVisitor;

impl<'de> serde::de::Visitor<'de> for TopLevelVisitor {
    type Value = TopLevel;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<TopLevel, A::Error> {
        let mut timestamp = None;
        while let Some(IsTimestamp(is_timestamp)) = map.next_key()? {
            if is_timestamp {
                timestamp = map.next_value::<Integer>()?.0;
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(TopLevel(timestamp))
    }
}

/// Whether an object's key is `timestamp`, found without copying it.
struct IsTimestamp(bool);

impl<'de> serde::Deserialize<'de> for IsTimestamp {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = IsTimestamp;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a key")
            }
            fn visit_str<E>(self, key: &str) -> Result<IsTimestamp, E> {
                Ok(IsTimestamp(key == "timestamp"))
            }
        }
        deserializer.deserialize_str(Visitor)
    }
}

/// Any JSON value, kept when it is an integer that fits an `i64`.
struct Integer(Option<i64>);

impl<'de> serde::Deserialize<'de> for Integer {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = Integer;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_i64<E>(self, value: i64) -> Result<Integer, E> {
                Ok(Integer(Some(value)))
            }
            fn visit_u64<E>(self, value: u64) -> Result<Integer, E> {
                Ok(Integer(i64::try_from(value).ok()))
            }
            fn visit_f64<E>(self, _: f64) -> Result<Integer, E> {
                Ok(Integer(None))
            }
            fn visit_bool<E>(self, _: bool) -> Result<Integer, E> {
                Ok(Integer(None))
            }
            fn visit_str<E>(self, _: &str) -> Result<Integer, E> {
                Ok(Integer(None))
            }
            fn visit_unit<E>(self) -> Result<Integer, E> {
                Ok(Integer(None))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Integer, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(Integer(None))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Integer, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(Integer(None))
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

impl WireJson {
    /// Checks `bytes`.
    pub fn new(bytes: Bytes) -> Result<Self, Problem> {
        // SSE ends a line at CR, LF or CRLF: one of them would end the `data:` line early
        // and let the rest pose as fields of its own (`id:`, `event:`).
        if bytes.contains(&b'\r') || bytes.contains(&b'\n') {
            return Err(Problem::LineBreak);
        }
        if bytes.contains(&0) {
            return Err(Problem::Nul);
        }
        let text = std::str::from_utf8(&bytes).map_err(|_| Problem::NotUtf8)?;
        if !text.trim_start_matches([' ', '\t']).starts_with('{') {
            return Err(Problem::NotObject);
        }
        let TopLevel(timestamp_ms) =
            serde_json::from_str::<TopLevel>(text).map_err(|_| Problem::NotJson)?;
        Ok(Self {
            bytes,
            timestamp_ms,
        })
    }

    /// The JSON.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// The record's Kafka timestamp in milliseconds, when the envelope has one.
    pub fn timestamp_ms(&self) -> Option<i64> {
        self.timestamp_ms
    }
}

/// Why an entry cannot be sent: said in words that name no byte of it, so that the words
/// themselves are safe to send and to log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Problem {
    /// No `e` field.
    #[error("the entry has no envelope field")]
    NoEnvelope,
    /// No `p` field, or one that is not a stream id.
    #[error("the entry has no readable previous-entry id")]
    BadPrevious,
    /// A field Fjord writes once occurs more than once.
    #[error("a field occurs more than once")]
    RepeatedField,
    /// The envelope holds a CR or LF.
    #[error("the envelope holds a line break")]
    LineBreak,
    /// The envelope holds a NUL byte.
    #[error("the envelope holds a NUL byte")]
    Nul,
    /// The envelope is not UTF-8.
    #[error("the envelope is not UTF-8")]
    NotUtf8,
    /// The envelope is not a JSON object.
    #[error("the envelope is not a JSON object")]
    NotObject,
    /// The envelope is not JSON.
    #[error("the envelope is not valid JSON")]
    NotJson,
    /// A marker of skipped records that does not say which.
    #[error("the skipped-records marker is not readable")]
    BadMarker,
}

/// An entry that cannot be sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidEntry {
    /// What is wrong with it.
    pub problem: Problem,
    /// The record key it names, when it names one; `None` when its receivers cannot be
    /// told apart, so that every client of the endpoint is told.
    pub filter_key: Option<Bytes>,
}

/// Decodes and checks the entry `id` from its fields (name, value), in any order; fields
/// Fjord does not write are ignored. Never fails: what is not as fjord-consumer writes it
/// becomes [`EntryKind::Invalid`].
pub fn decode(id: StreamId, fields: impl IntoIterator<Item = (Bytes, Bytes)>) -> BusEntry {
    let (mut envelope, mut previous, mut key, mut skipped) = (None, None, None, None);
    let mut repeated = false;
    for (name, value) in fields {
        let slot = match name.as_ref() {
            field::ENVELOPE => &mut envelope,
            field::PREVIOUS => &mut previous,
            field::KEY => &mut key,
            field::SKIPPED => &mut skipped,
            _ => continue,
        };
        repeated |= slot.replace(value).is_some();
    }
    let previous = previous.map(|text| {
        std::str::from_utf8(&text)
            .ok()
            .and_then(|text| text.parse::<StreamId>().ok())
    });
    let kind = check(repeated, envelope, previous, skipped.is_some());
    let kind = match kind {
        Ok(Content::Record(envelope)) => EntryKind::Record {
            filter_key: key,
            envelope,
        },
        Ok(Content::Skipped(skipped)) => EntryKind::Skipped(Arc::new(skipped)),
        Err(problem) => EntryKind::Invalid(InvalidEntry {
            problem,
            // A marker, or an entry whose key is gone, may concern any client.
            filter_key: key.filter(|_| skipped.is_none()),
        }),
    };
    BusEntry {
        id,
        previous: previous.flatten().unwrap_or(StreamId::ZERO),
        kind,
    }
}

enum Content {
    Record(WireJson),
    Skipped(SkippedRecords),
}

fn check(
    repeated: bool,
    envelope: Option<Bytes>,
    previous: Option<Option<StreamId>>,
    skipped: bool,
) -> Result<Content, Problem> {
    if repeated {
        return Err(Problem::RepeatedField);
    }
    let envelope = envelope.ok_or(Problem::NoEnvelope)?;
    previous.flatten().ok_or(Problem::BadPrevious)?;
    if skipped {
        return serde_json::from_slice(&envelope)
            .map(Content::Skipped)
            .map_err(|_| Problem::BadMarker);
    }
    WireJson::new(envelope).map(Content::Record)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const ID: StreamId = StreamId { ms: 9, seq: 1 };

    fn fields(pairs: &[(&[u8], &[u8])]) -> Vec<(Bytes, Bytes)> {
        pairs
            .iter()
            .map(|(name, value)| (Bytes::copy_from_slice(name), Bytes::copy_from_slice(value)))
            .collect()
    }

    fn decoded(pairs: &[(&[u8], &[u8])]) -> BusEntry {
        decode(ID, fields(pairs))
    }

    fn problem(entry: &BusEntry) -> Option<Problem> {
        match &entry.kind {
            EntryKind::Invalid(invalid) => Some(invalid.problem),
            _ => None,
        }
    }

    #[test]
    fn an_envelope_s_kafka_timestamp_is_read_in_the_pass_that_checks_it() {
        let timestamp = |json: &str| {
            WireJson::new(Bytes::copy_from_slice(json.as_bytes()))
                .expect("an object")
                .timestamp_ms()
        };
        assert_eq!(
            timestamp(
                r#"{"key":{"timestamp":1},"timestamp":1764000000000,"value":{"timestamp":2}}"#
            ),
            Some(1_764_000_000_000),
            "the top level's, not a key's or a value's"
        );
        assert_eq!(timestamp(r#"{"timestamp":null}"#), None);
        assert_eq!(timestamp(r#"{"timestamp":"soon"}"#), None);
        assert_eq!(timestamp(r#"{"timestamp":1.5}"#), None);
        assert_eq!(timestamp(r#"{"timestamp":[1]}"#), None);
        assert_eq!(
            timestamp(r#"{"t\u0069mestamp":-5}"#),
            Some(-5),
            "escaped key"
        );
        assert_eq!(timestamp(r#"{"timestamp":99999999999999999999}"#), None);
        assert_eq!(timestamp("{}"), None);
        assert!(WireJson::new(Bytes::from_static(br#"{"timestamp":1,}"#)).is_err());
    }

    #[test]
    fn entries_as_fjord_writes_them() {
        let entry = decoded(&[(b"e", br#"{"a":1}"#), (b"p", b"5-0"), (b"k", b"order-1")]);
        assert_eq!(entry.id, ID);
        assert_eq!(entry.previous, StreamId { ms: 5, seq: 0 });
        let EntryKind::Record {
            filter_key,
            envelope,
        } = entry.kind
        else {
            panic!("a record: {entry:?}");
        };
        assert_eq!(filter_key.as_deref(), Some(&b"order-1"[..]));
        assert_eq!(envelope.as_bytes(), br#"{"a":1}"#);

        let entry = decoded(&[(b"p", b"0-0"), (b"e", b"{}")]);
        assert!(matches!(
            entry.kind,
            EntryKind::Record {
                filter_key: None,
                ..
            }
        ));

        let marker = br#"{"topic":"t","partition":1,"first_offset":2,"last_offset":3,"error":"x"}"#;
        let entry = decoded(&[(b"e", marker), (b"p", b"1-0"), (b"s", b"1")]);
        let EntryKind::Skipped(skipped) = entry.kind else {
            panic!("a marker: {entry:?}");
        };
        assert_eq!(skipped.last_offset, 3);
    }

    #[test]
    fn what_fjord_does_not_write_is_invalid_with_the_reason() {
        type Pairs<'a> = &'a [(&'a [u8], &'a [u8])];
        let cases: &[(Pairs<'_>, Problem)] = &[
            (&[(b"p", b"1-0")], Problem::NoEnvelope),
            (&[(b"e", b"{}")], Problem::BadPrevious),
            (&[(b"e", b"{}"), (b"p", b"x")], Problem::BadPrevious),
            (
                &[(b"e", b"{}"), (b"p", b"1-0"), (b"e", b"{}")],
                Problem::RepeatedField,
            ),
            (
                &[
                    (b"e", b"{\"a\":\"x\revent: fjord.shutdown\"}"),
                    (b"p", b"1-0"),
                ],
                Problem::LineBreak,
            ),
            (&[(b"e", b"{}\n"), (b"p", b"1-0")], Problem::LineBreak),
            (&[(b"e", b"{\"a\":\"\0\"}"), (b"p", b"1-0")], Problem::Nul),
            (
                &[(b"e", b"{\"a\":\"\xc3\x28\"}"), (b"p", b"1-0")],
                Problem::NotUtf8,
            ),
            (&[(b"e", b"[1]"), (b"p", b"1-0")], Problem::NotObject),
            (&[(b"e", b"hello"), (b"p", b"1-0")], Problem::NotObject),
            (&[(b"e", b"{\"a\":"), (b"p", b"1-0")], Problem::NotJson),
            (&[(b"e", b"{}{}"), (b"p", b"1-0")], Problem::NotJson),
            (
                &[(b"e", b"{\"a\":\"\x01\"}"), (b"p", b"1-0")],
                Problem::NotJson,
            ),
            (
                &[(b"e", b"{}"), (b"p", b"1-0"), (b"s", b"1")],
                Problem::BadMarker,
            ),
        ];
        for (pairs, expected) in cases {
            assert_eq!(problem(&decoded(pairs)), Some(*expected), "{pairs:?}");
        }
    }

    #[test]
    fn an_invalid_entry_keeps_what_routes_it() {
        let entry = decoded(&[(b"e", b"nope"), (b"p", b"4-2"), (b"k", b"order-1")]);
        assert_eq!(entry.previous, StreamId { ms: 4, seq: 2 });
        assert_eq!(
            entry.kind,
            EntryKind::Invalid(InvalidEntry {
                problem: Problem::NotObject,
                filter_key: Some(Bytes::from_static(b"order-1")),
            })
        );
        // Unknown receivers: everyone is told.
        for pairs in [
            &[(&b"e"[..], &b"nope"[..]), (b"p", b"4-2")][..],
            &[(b"e", b"{}"), (b"p", b"4-2"), (b"k", b"a"), (b"s", b"1")],
        ] {
            let entry = decoded(pairs);
            assert!(
                matches!(
                    &entry.kind,
                    EntryKind::Invalid(InvalidEntry {
                        filter_key: None,
                        ..
                    })
                ),
                "{entry:?}"
            );
        }
    }

    /// A field name: mostly Fjord's, sometimes another.
    fn field_name() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            4 => prop::sample::select(vec![b"e".to_vec(), b"p".to_vec(), b"k".to_vec(), b"s".to_vec()]),
            1 => prop::collection::vec(any::<u8>(), 0..4),
        ]
    }

    /// A field value: arbitrary bytes, or close to what Fjord writes.
    fn field_value() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            prop::collection::vec(any::<u8>(), 0..64),
            "[0-9]{1,3}-[0-9]{1,2}".prop_map(String::into_bytes),
            any::<String>()
                .prop_map(|text| serde_json::json!({"v": text}).to_string().into_bytes()),
            r#"\{"v":"[a-z\r\n\x00\x7f]{0,8}"\}"#.prop_map(String::into_bytes),
            Just(
                br#"{"topic":"t","partition":0,"first_offset":1,"last_offset":2,"error":"e"}"#
                    .to_vec()
            ),
        ]
    }

    proptest! {
        #[test]
        fn fuzz_bus_entry_decoding(
            pairs in prop::collection::vec((field_name(), field_value()), 0..6),
        ) {
            let entry = decode(
                ID,
                pairs
                    .iter()
                    .map(|(name, value)| (Bytes::from(name.clone()), Bytes::from(value.clone()))),
            );
            prop_assert_eq!(entry.id, ID);
            match &entry.kind {
                EntryKind::Record { envelope, .. } => {
                    let bytes = envelope.as_bytes();
                    prop_assert!(!bytes.iter().any(|b| matches!(b, b'\r' | b'\n' | 0)));
                    let value: serde_json::Value = serde_json::from_slice(bytes)
                        .map_err(|error| TestCaseError::fail(error.to_string()))?;
                    prop_assert!(value.is_object());
                    let original = pairs.iter().find(|(name, _)| name == b"e").map(|(_, v)| v);
                    prop_assert_eq!(Some(&bytes.to_vec()), original);
                }
                EntryKind::Skipped(_) => {
                    prop_assert!(pairs.iter().any(|(name, _)| name == b"s"));
                }
                EntryKind::Invalid(invalid) => {
                    // The words are fixed text, safe on a data line.
                    prop_assert!(!invalid.problem.to_string().contains(['\r', '\n', '\0']));
                }
            }
        }
    }
}
