//! The envelope: how one Kafka record looks to clients. Built once, by the consumer, as
//! compact JSON without line breaks (an SSE `data:` line cannot hold one), and carried as
//! bytes from then on.
//!
//! `value` is the record's JSON when it parses as JSON, a string when it is other text
//! (UTF-8 without control characters but tab, LF and CR), else `{"base64": "..."}`; `key`
//! and header values are strings when text, else the base64 object. So an event is at most
//! about twice its record's size (a string of `"` or `\`), never six times. A header name
//! that occurs more than once maps to an array of its values.
//!
//! A key or value the consumer decoded itself (the manifest's `topics` formats, a Schema
//! Registry's) replaces those rules with its JSON ([`Decoded`]); one decoded with a registry's
//! schema also names it, in `key_schema` / `value_schema` (`id`, and `subject` and `version`
//! when the registry names them), fields that are absent otherwise.

use std::collections::BTreeMap;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde::Serialize;
use serde::ser::{SerializeMap, Serializer};
use serde_json::value::RawValue;

/// The parts of a Kafka record the envelope is made of, borrowed from the client's message.
#[derive(Debug, Clone, Copy)]
pub struct RecordParts<'a> {
    /// The topic.
    pub topic: &'a str,
    /// The partition.
    pub partition: i32,
    /// The offset within the partition.
    pub offset: i64,
    /// The key, if the record has one.
    pub key: Option<&'a [u8]>,
    /// Milliseconds since the epoch, if the record carries a timestamp.
    pub timestamp: Option<i64>,
    /// The payload; `None` for a tombstone.
    pub value: Option<&'a [u8]>,
}

/// One encoded record: what is published to the bus.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    /// The key as clients filter on it: the record key's bytes, whether text or not, so
    /// that `?key=` text and `?key_base64=` bytes match it only when they are those bytes;
    /// `None` when the record has no key.
    pub filter_key: Option<Vec<u8>>,
    /// The envelope's JSON, one line.
    pub json: Vec<u8>,
    /// Whether the record is a tombstone (no value): it deletes its key from a table.
    pub tombstone: bool,
}

/// Bytes shown as a JSON string when they are text, else as `{"base64": "..."}`. Text is
/// UTF-8 without control characters other than tab, line feed and carriage return: JSON
/// writes each of the others as a six-byte `\u00XX` escape, so a record of them would reach
/// every client six times its size, where base64 is a third larger.
struct TextOrBase64<'a>(&'a [u8]);

/// Whether JSON writes `c` as a `\u00XX` escape.
fn is_escaped_long(c: char) -> bool {
    c.is_ascii_control() && !matches!(c, '\t' | '\n' | '\r') && c != '\u{7f}'
}

impl Serialize for TextOrBase64<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match std::str::from_utf8(self.0) {
            Ok(text) if !text.contains(is_escaped_long) => serializer.serialize_str(text),
            _ => {
                let mut map = serializer.serialize_map(Some(1))?;
                map.serialize_entry("base64", &BASE64.encode(self.0))?;
                map.end()
            }
        }
    }
}

/// A record's value: its JSON when it parses, else text or base64.
enum Value<'a> {
    Json(&'a RawValue),
    /// JSON that spans several lines, made one: its text without the line breaks, which
    /// valid JSON holds only between tokens. Not parsed into values and written again,
    /// which would change numbers that do not round-trip through `f64`.
    ReformattedJson(Box<RawValue>),
    Other(TextOrBase64<'a>),
    Decoded(&'a RawValue),
    Null,
}

impl<'a> Value<'a> {
    fn of(bytes: Option<&'a [u8]>) -> Self {
        let Some(bytes) = bytes else {
            return Self::Null;
        };
        match serde_json::from_slice::<&RawValue>(bytes) {
            Ok(raw) if !raw.get().contains(['\n', '\r']) => Self::Json(raw),
            Ok(raw) => {
                let one_line = raw.get().replace(['\n', '\r'], "");
                match RawValue::from_string(one_line) {
                    Ok(value) => Self::ReformattedJson(value),
                    Err(_) => Self::Other(TextOrBase64(bytes)),
                }
            }
            Err(_) => Self::Other(TextOrBase64(bytes)),
        }
    }
}

impl Serialize for Value<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::Json(raw) => raw.serialize(serializer),
            Self::ReformattedJson(value) => value.serialize(serializer),
            Self::Other(other) => other.serialize(serializer),
            Self::Decoded(raw) => raw.serialize(serializer),
            Self::Null => serializer.serialize_none(),
        }
    }
}

/// A key or value as the consumer decoded it.
#[derive(Debug, Clone)]
pub struct DecodedField {
    /// Its JSON, one line.
    pub json: Box<RawValue>,
    /// The registry's schema it was decoded with, if any.
    pub schema: Option<SchemaRef>,
}

/// A schema in a Schema Registry, as the envelope names it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SchemaRef {
    /// The schema id of the record's wire format.
    pub id: u32,
    /// The subject the id is registered under, when the registry names one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    /// The subject's version, likewise.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<i64>,
}

/// The key and value the consumer decoded; `None` keeps the envelope's own rules.
#[derive(Debug, Clone, Default)]
pub struct Decoded {
    /// The key.
    pub key: Option<DecodedField>,
    /// The value.
    pub value: Option<DecodedField>,
}

/// A record's key: decoded, else text or base64.
enum Key<'a> {
    Decoded(&'a RawValue),
    Raw(TextOrBase64<'a>),
}

impl Serialize for Key<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::Decoded(raw) => raw.serialize(serializer),
            Self::Raw(raw) => raw.serialize(serializer),
        }
    }
}

/// Header values by name; a name that repeats keeps every value, in order.
enum HeaderValues<'a> {
    One(Option<TextOrBase64<'a>>),
    Many(Vec<Option<TextOrBase64<'a>>>),
}

impl Serialize for HeaderValues<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::One(value) => value.serialize(serializer),
            Self::Many(values) => values.serialize(serializer),
        }
    }
}

#[derive(Serialize)]
struct EnvelopeJson<'a> {
    topic: &'a str,
    partition: i32,
    offset: i64,
    key: Option<Key<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    key_schema: Option<&'a SchemaRef>,
    timestamp: Option<i64>,
    headers: BTreeMap<&'a str, HeaderValues<'a>>,
    value: Value<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    value_schema: Option<&'a SchemaRef>,
}

impl Envelope {
    /// Encodes a record with its headers (name, value) in the order Kafka gave them.
    ///
    /// Fails only if serde_json cannot write what it was given, which borrowed strings,
    /// numbers and validated raw JSON never cause.
    pub fn encode<'a>(
        record: RecordParts<'a>,
        headers: impl IntoIterator<Item = (&'a str, Option<&'a [u8]>)>,
    ) -> Result<Self, serde_json::Error> {
        Self::encode_decoded(record, headers, &Decoded::default())
    }

    /// Encodes a record whose key or value the consumer decoded: `decoded` takes the place
    /// of the envelope's rules for what it holds. A tombstone's value stays `null`.
    pub fn encode_decoded<'a>(
        record: RecordParts<'a>,
        headers: impl IntoIterator<Item = (&'a str, Option<&'a [u8]>)>,
        decoded: &Decoded,
    ) -> Result<Self, serde_json::Error> {
        let mut header_map: BTreeMap<&str, HeaderValues<'_>> = BTreeMap::new();
        for (name, value) in headers {
            let value = value.map(TextOrBase64);
            match header_map.remove(name) {
                None => header_map.insert(name, HeaderValues::One(value)),
                Some(HeaderValues::One(first)) => {
                    header_map.insert(name, HeaderValues::Many(vec![first, value]))
                }
                Some(HeaderValues::Many(mut values)) => {
                    values.push(value);
                    header_map.insert(name, HeaderValues::Many(values))
                }
            };
        }
        let json = EnvelopeJson {
            topic: record.topic,
            partition: record.partition,
            offset: record.offset,
            key: match (&decoded.key, record.key) {
                (_, None) => None,
                (Some(key), Some(_)) => Some(Key::Decoded(&key.json)),
                (None, Some(key)) => Some(Key::Raw(TextOrBase64(key))),
            },
            key_schema: record
                .key
                .and(decoded.key.as_ref())
                .and_then(|key| key.schema.as_ref()),
            timestamp: record.timestamp,
            headers: header_map,
            value: match (&decoded.value, record.value) {
                (Some(value), Some(_)) => Value::Decoded(&value.json),
                _ => Value::of(record.value),
            },
            value_schema: record
                .value
                .and(decoded.value.as_ref())
                .and_then(|value| value.schema.as_ref()),
        };
        let json = serde_json::to_vec(&json)?;
        Ok(Self {
            filter_key: record.key.map(<[u8]>::to_vec),
            json,
            tombstone: record.value.is_none(),
        })
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn parts<'a>(key: Option<&'a [u8]>, value: Option<&'a [u8]>) -> RecordParts<'a> {
        RecordParts {
            topic: "orders",
            partition: 3,
            offset: 1042,
            key,
            timestamp: Some(1_764_000_000_000),
            value,
        }
    }

    fn encode(
        key: Option<&[u8]>,
        value: Option<&[u8]>,
        headers: &[(&str, Option<&[u8]>)],
    ) -> (Envelope, serde_json::Value) {
        let envelope =
            Envelope::encode(parts(key, value), headers.iter().copied()).expect("encodes");
        assert!(!envelope.json.contains(&b'\n'), "one line");
        let parsed = serde_json::from_slice(&envelope.json).expect("envelope is JSON");
        (envelope, parsed)
    }

    #[test]
    fn json_value_is_embedded_as_json() {
        let (envelope, json) = encode(
            Some(b"order-17"),
            Some(br#"{"total": 23.5, "items": [1, 2]}"#),
            &[("source", Some(b"web"))],
        );
        assert_eq!(
            json,
            serde_json::json!({
                "topic": "orders", "partition": 3, "offset": 1042, "key": "order-17",
                "timestamp": 1_764_000_000_000_i64, "headers": {"source": "web"},
                "value": {"total": 23.5, "items": [1, 2]}
            })
        );
        assert_eq!(envelope.filter_key.as_deref(), Some(&b"order-17"[..]));
    }

    #[test]
    fn multi_line_json_is_made_compact() {
        let (_, json) = encode(None, Some(b"{\n  \"a\": 1\n}\r\n"), &[]);
        assert_eq!(json["value"], serde_json::json!({"a": 1}));
        assert_eq!(json["key"], serde_json::Value::Null);
    }

    #[test]
    fn multi_line_json_keeps_its_numbers_as_written() {
        let (envelope, json) = encode(
            None,
            Some(b"[\n  {\"\": 5.294316068335519e+257, \"n\": 1.10}\r\n]"),
            &[],
        );
        assert!(
            String::from_utf8_lossy(&envelope.json)
                .ends_with(r#""value":[  {"": 5.294316068335519e+257, "n": 1.10}]}"#),
            "{json}"
        );
    }

    #[test]
    fn text_that_is_not_json_is_a_string() {
        let (_, json) = encode(None, Some(b"hello\nworld {"), &[]);
        assert_eq!(json["value"], "hello\nworld {");
    }

    #[test]
    fn control_characters_are_sent_as_base64_not_six_byte_escapes() {
        let control = vec![1_u8; 200_000];
        let (raw, envelope) = encode(Some(b"k\x01"), Some(&control), &[]);
        assert!(
            raw.json.len() < control.len() * 4 / 3 + 200,
            "{}",
            raw.json.len()
        );
        assert_eq!(
            envelope["value"]["base64"].as_str().map(str::len),
            Some(266_668)
        );
        assert_eq!(envelope["key"], serde_json::json!({"base64": "awE="}));
        let (_, envelope) = encode(None, Some(b"tab\tand\nlines\r\x7f"), &[]);
        assert_eq!(envelope["value"], "tab\tand\nlines\r\x7f");
    }

    #[test]
    fn binary_is_base64() {
        let (envelope, json) = encode(
            Some(&[0xff, 0x00]),
            Some(&[0xc3, 0x28, 0x00]),
            &[("bin", Some(&[0x80]))],
        );
        assert_eq!(json["value"], serde_json::json!({"base64": "wygA"}));
        assert_eq!(json["key"], serde_json::json!({"base64": "/wA="}));
        assert_eq!(
            json["headers"]["bin"],
            serde_json::json!({"base64": "gA=="})
        );
        assert_eq!(envelope.filter_key.as_deref(), Some(&[0xff, 0x00][..]));
    }

    #[test]
    fn decoded_fields_replace_the_rules_and_name_their_schema() {
        let field = |json: &str, id: Option<u32>| DecodedField {
            json: RawValue::from_string(json.to_owned()).expect("JSON"),
            schema: id.map(|id| SchemaRef {
                id,
                subject: Some("orders-value".into()),
                version: Some(2),
            }),
        };
        let decoded = Decoded {
            key: Some(field(r#""k-1""#, None)),
            value: Some(field(r#"{"total":"23.50"}"#, Some(7))),
        };
        let envelope = Envelope::encode_decoded(
            parts(Some(b"\0\0\0\0\x01k"), Some(b"\0\0\0\0\x07...")),
            [],
            &decoded,
        )
        .expect("encodes");
        let json: serde_json::Value = serde_json::from_slice(&envelope.json).expect("JSON");
        assert_eq!(json["key"], "k-1");
        assert_eq!(json.get("key_schema"), None);
        assert_eq!(json["value"], serde_json::json!({"total": "23.50"}));
        assert_eq!(
            json["value_schema"],
            serde_json::json!({"id": 7, "subject": "orders-value", "version": 2})
        );
        // The key filter is still the key's bytes.
        assert_eq!(envelope.filter_key.as_deref(), Some(&b"\0\0\0\0\x01k"[..]));
        // A tombstone stays null, without a schema, whatever was decoded.
        let tombstone = Envelope::encode_decoded(parts(None, None), [], &decoded).expect("encodes");
        let json: serde_json::Value = serde_json::from_slice(&tombstone.json).expect("JSON");
        assert_eq!(json["value"], serde_json::Value::Null);
        assert_eq!(json.get("value_schema"), None);
        assert_eq!(json["key"], serde_json::Value::Null);
    }

    #[test]
    fn tombstones_and_empty_values() {
        let (_, json) = encode(Some(b"k"), None, &[("h", None)]);
        assert_eq!(json["value"], serde_json::Value::Null);
        assert_eq!(json["headers"]["h"], serde_json::Value::Null);
        let (_, json) = encode(Some(b"k"), Some(b""), &[]);
        assert_eq!(json["value"], "");
    }

    #[test]
    fn repeated_headers_keep_every_value() {
        let (_, json) = encode(
            None,
            Some(b"1"),
            &[
                ("trace", Some(b"a")),
                ("trace", Some(b"b")),
                ("trace", None),
                ("x", Some(b"y")),
            ],
        );
        assert_eq!(
            json["headers"],
            serde_json::json!({"trace": ["a", "b", null], "x": "y"})
        );
        assert_eq!(json["value"], 1);
    }

    #[test]
    fn json_scalars_stay_json() {
        for (input, expected) in [
            ("42", serde_json::json!(42)),
            ("\"quoted\"", serde_json::json!("quoted")),
            ("true", serde_json::json!(true)),
            ("null", serde_json::Value::Null),
        ] {
            let (_, json) = encode(None, Some(input.as_bytes()), &[]);
            assert_eq!(json["value"], expected, "{input}");
        }
    }

    /// A JSON value, as text: compact, pretty (several lines) or with CRLF.
    fn json_text() -> impl Strategy<Value = Vec<u8>> {
        let leaf = prop_oneof![
            Just(serde_json::Value::Null),
            any::<bool>().prop_map(serde_json::Value::from),
            any::<i64>().prop_map(serde_json::Value::from),
            any::<f64>().prop_map(serde_json::Value::from),
            any::<String>().prop_map(serde_json::Value::from),
        ];
        let value = leaf.prop_recursive(3, 24, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::from),
                prop::collection::btree_map(any::<String>(), inner, 0..4)
                    .prop_map(|map| serde_json::Value::Object(map.into_iter().collect())),
            ]
        });
        (value, 0..3_u8).prop_map(|(value, style)| match style {
            0 => serde_json::to_vec(&value).unwrap_or_default(),
            1 => serde_json::to_vec_pretty(&value).unwrap_or_default(),
            _ => serde_json::to_string_pretty(&value)
                .unwrap_or_default()
                .replace('\n', "\r\n")
                .into_bytes(),
        })
    }

    /// Bytes of any kind: JSON, other text, or not UTF-8.
    fn payload() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            json_text(),
            any::<String>().prop_map(String::into_bytes),
            prop::collection::vec(any::<u8>(), 0..48),
        ]
    }

    /// What the envelope says for bytes that are text or base64.
    fn text_or_base64(bytes: &[u8]) -> serde_json::Value {
        match std::str::from_utf8(bytes) {
            Ok(text) if !text.chars().any(|c| c < ' ' && !"\t\n\r".contains(c)) => {
                serde_json::Value::from(text)
            }
            _ => serde_json::json!({"base64": BASE64.encode(bytes)}),
        }
    }

    proptest! {
        #[test]
        fn fuzz_envelope_encoding(
            topic in any::<String>(),
            partition in any::<i32>(),
            offset in any::<i64>(),
            key in prop::option::of(payload()),
            timestamp in prop::option::of(any::<i64>()),
            value in prop::option::of(payload()),
            headers in prop::collection::vec(
                (prop_oneof![any::<String>(), Just("h".to_owned())], prop::option::of(payload())),
                0..5,
            ),
        ) {
            let envelope = Envelope::encode(
                RecordParts {
                    topic: &topic,
                    partition,
                    offset,
                    key: key.as_deref(),
                    timestamp,
                    value: value.as_deref(),
                },
                headers.iter().map(|(name, value)| (name.as_str(), value.as_deref())),
            )
            .map_err(|error| TestCaseError::fail(error.to_string()))?;
            // What the bus checks every entry for, so that each envelope passes.
            prop_assert!(
                crate::WireJson::new(bytes::Bytes::from(envelope.json.clone())).is_ok(),
                "{:?}",
                String::from_utf8_lossy(&envelope.json)
            );
            let json: serde_json::Value = serde_json::from_slice(&envelope.json)
                .map_err(|error| TestCaseError::fail(error.to_string()))?;
            prop_assert_eq!(&json["topic"], &serde_json::Value::from(topic.as_str()));
            prop_assert_eq!(&json["partition"], &serde_json::Value::from(partition));
            prop_assert_eq!(&json["offset"], &serde_json::Value::from(offset));
            prop_assert_eq!(&json["timestamp"], &serde_json::Value::from(timestamp));
            let expected_key = key.as_deref().map_or(serde_json::Value::Null, text_or_base64);
            prop_assert_eq!(&json["key"], &expected_key);
            prop_assert_eq!(
                envelope.filter_key.is_some(),
                key.is_some()
            );
            let expected_value = value.as_deref().map_or(serde_json::Value::Null, |bytes| {
                serde_json::from_slice(bytes).unwrap_or_else(|_| text_or_base64(bytes))
            });
            prop_assert_eq!(&json["value"], &expected_value);
            let mut expected_headers: BTreeMap<&str, Vec<serde_json::Value>> = BTreeMap::new();
            for (name, value) in &headers {
                expected_headers
                    .entry(name)
                    .or_default()
                    .push(value.as_deref().map_or(serde_json::Value::Null, text_or_base64));
            }
            let expected_headers: serde_json::Map<String, serde_json::Value> = expected_headers
                .into_iter()
                .map(|(name, mut values)| {
                    let value = if values.len() == 1 {
                        values.remove(0)
                    } else {
                        serde_json::Value::from(values)
                    };
                    (name.to_owned(), value)
                })
                .collect();
            prop_assert_eq!(&json["headers"], &serde_json::Value::Object(expected_headers));
        }
    }
}
