//! Decoding a record's key and value by its topic's formats (the manifest's `topics`), once,
//! into the JSON the envelope carries. The Confluent wire format — a zero byte, a 4-byte
//! big-endian schema id, then the encoded data — is read with the writer's schema from the
//! [`Registry`]: Avro, Protobuf (after its message indexes) and JSON Schema.
//!
//! The JSON mapping of Avro: null, booleans, ints, longs, floats and doubles are JSON
//! literals and numbers (a NaN or an infinity is `null`; a long past 2^53 is written exactly,
//! which JavaScript's `JSON.parse` rounds); strings, enum symbols and `uuid` are strings;
//! `bytes` and `fixed` are base64 strings; a union is its branch's value, unwrapped;
//! arrays, maps and records are arrays and objects (a record's fields in schema order);
//! `decimal` is a string of the exact number (`"1234.50"`); `date` is `"YYYY-MM-DD"`;
//! `time-millis`/`-micros` are `"HH:MM:SS.sss"`/`"HH:MM:SS.ssssss"`; `timestamp-millis`,
//! `-micros` and `-nanos` are RFC 3339 UTC strings with that many fraction digits
//! (`"2026-01-02T03:04:05.678Z"`), and the `local-timestamp-*` ones the same without the
//! `Z`; `duration` is `{"months", "days", "millis"}`. Protobuf follows protobuf's JSON
//! mapping (64-bit integers as strings, bytes as base64, enums by name, well-known types
//! as theirs) with the `.proto` field names and every field, defaults included.

use std::collections::HashMap;
use std::sync::Arc;

use apache_avro::Schema as AvroSchema;
use apache_avro::types::Value as Avro;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use fjord_bus::envelope::{Decoded, DecodedField, SchemaRef};
use fjord_config::{Format, Manifest, TopicFormats};
use serde::ser::{Serialize, SerializeMap as _, Serializer};
use serde_json::value::RawValue;

use crate::registry::{FetchError, Registry, SchemaKind, WriterSchema};

/// Why a key or value cannot be decoded: the record is skipped with a gap.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{part}: {reason}")]
pub(crate) struct Undecodable {
    /// `key` or `value`.
    pub(crate) part: &'static str,
    /// What is wrong.
    pub(crate) reason: String,
}

/// What decoding a record with the schemas at hand came to.
#[derive(Debug)]
pub(crate) enum Outcome {
    /// Decoded (or left to the envelope's rules).
    Decoded(Decoded),
    /// Cannot be decoded, ever: skip it.
    Undecodable(Undecodable),
    /// The writer's schema with this id is not in the cache: fetch it
    /// ([`Decoder::fetch`]), then decode again.
    Fetch(u32),
}

/// A member's decoder: its manifest's formats and its registry client.
#[derive(Debug)]
pub(crate) struct Decoder<'a> {
    manifest: &'a Manifest,
    registry: Option<Registry>,
}

/// Why a field is not decoded now.
enum Missing {
    /// Never: the field is undecodable.
    Refused(String),
    /// Not before the schema with this id is fetched.
    Schema(u32),
}

/// The Confluent wire format's magic byte.
const MAGIC: u8 = 0;

/// A record in the wire format: its schema id and the data after the header.
fn wire_format(bytes: &[u8]) -> Option<(u32, &[u8])> {
    match bytes {
        [MAGIC, a, b, c, d, rest @ ..] => Some((u32::from_be_bytes([*a, *b, *c, *d]), rest)),
        _ => None,
    }
}

impl<'a> Decoder<'a> {
    /// A decoder for `manifest`'s topics, with a client of its registry if it names one.
    pub(crate) fn new(manifest: &'a Manifest) -> Result<Self, fjord_config::ManifestError> {
        let registry = manifest
            .schema_registry
            .as_ref()
            .map(Registry::new)
            .transpose()?;
        Ok(Self { manifest, registry })
    }

    /// Decodes a record of `topic` with the schemas in the cache, at once: the path of
    /// every record but the first of each schema id.
    pub(crate) fn decode(&self, topic: &str, key: Option<&[u8]>, value: Option<&[u8]>) -> Outcome {
        let TopicFormats {
            value_format,
            key_format,
        } = self.manifest.topic_formats(topic);
        let outcome = |part, missing| match missing {
            Missing::Refused(reason) => Outcome::Undecodable(Undecodable { part, reason }),
            Missing::Schema(id) => Outcome::Fetch(id),
        };
        let key = match self.field(key_format, key) {
            Ok(key) => key,
            Err(missing) => return outcome("key", missing),
        };
        let value = match self.field(value_format, value) {
            Ok(value) => value,
            Err(missing) => return outcome("value", missing),
        };
        Outcome::Decoded(Decoded { key, value })
    }

    /// Fetches the schema with `id` into the cache (a refusal too); `Err` says why the
    /// registry is down.
    pub(crate) async fn fetch(&mut self, id: u32) -> Result<(), String> {
        match &mut self.registry {
            Some(registry) => match registry.schema(id).await {
                Err(FetchError::Down(reason)) => Err(reason),
                Ok(_) | Err(FetchError::Refused(_)) => Ok(()),
            },
            // Never asked: without a registry no schema is missing.
            None => Ok(()),
        }
    }

    /// A key or value decoded, `None` for the envelope's rules.
    fn field(&self, format: Format, bytes: Option<&[u8]>) -> Result<Option<DecodedField>, Missing> {
        let Some(bytes) = bytes else {
            return Ok(None);
        };
        let fail = Missing::Refused;
        let plain = |json: String| {
            RawValue::from_string(json)
                .map(|json| Some(DecodedField { json, schema: None }))
                .map_err(|error| fail(error.to_string()))
        };
        match format {
            Format::Auto if self.registry.is_none() => Ok(None),
            Format::Json => match serde_json::from_slice::<&RawValue>(bytes) {
                // The envelope's rules write JSON as JSON.
                Ok(_) => Ok(None),
                Err(error) => Err(fail(format!("not JSON: {error}"))),
            },
            Format::String => match std::str::from_utf8(bytes) {
                Ok(text) => plain(serde_json::Value::from(text).to_string()),
                Err(error) => Err(fail(format!("not UTF-8: {error}"))),
            },
            Format::Bytes => plain(serde_json::json!({"base64": BASE64.encode(bytes)}).to_string()),
            Format::Auto => {
                let Some((id, data)) = wire_format(bytes) else {
                    return Ok(None);
                };
                match self.cached(id)? {
                    Ok(schema) => decode_with(&schema, data).map(Some).map_err(fail),
                    // Bytes that only look like the wire format: the envelope's rules.
                    Err(_) => Ok(None),
                }
            }
            Format::Avro | Format::Protobuf | Format::JsonSchema => {
                let Some((id, data)) = wire_format(bytes) else {
                    return Err(fail(
                        "not in the Confluent wire format (a zero byte and a 4-byte schema id)"
                            .into(),
                    ));
                };
                let schema = self.cached(id)?.map_err(fail)?;
                let matches = matches!(
                    (format, &schema.kind),
                    (Format::Avro, SchemaKind::Avro { .. })
                        | (Format::Protobuf, SchemaKind::Protobuf { .. })
                        | (Format::JsonSchema, SchemaKind::Json { .. })
                );
                if !matches {
                    return Err(fail(format!(
                        "schema {id} is not of the topic's format ({format:?})"
                    )));
                }
                decode_with(&schema, data).map(Some).map_err(fail)
            }
        }
    }

    /// The cached schema with `id`, or the registry's refusal of it.
    fn cached(&self, id: u32) -> Result<Result<Arc<WriterSchema>, String>, Missing> {
        match &self.registry {
            Some(registry) => match registry.cached(id) {
                Some(Ok(schema)) => Ok(Ok(schema)),
                Some(Err(refused)) => Ok(Err(refused)),
                None => Err(Missing::Schema(id)),
            },
            // The manifest's validation requires a registry for these formats.
            None => Ok(Err("no schema_registry".into())),
        }
    }
}

/// The longest Avro string or bytes, and the most items in one block of an array or map,
/// that a record may declare: 16 Mi, sixteen times Kafka's default largest record. A
/// length is read before the data it counts, and apache-avro reserves room for that many
/// values at once (by default up to 512 Mi of them: tens of GiB for an array or a map, an
/// allocation failure that aborts the process, caused by a record of a few bytes; found by
/// `fuzz_decode_with_huge_lengths`).
const MAX_AVRO_LENGTH: usize = 16 << 20;

/// Sets apache-avro's bound on what a declared length may make it reserve, to
/// [`MAX_AVRO_LENGTH`]; false when the process had set another first. The bound is
/// process-wide and only the first setting holds, and decoding anything with apache-avro
/// sets its default (512 Mi) when none was set: call this before any Avro is decoded.
pub fn avro_limit_in_force() -> bool {
    apache_avro::util::max_allocation_bytes(MAX_AVRO_LENGTH) == MAX_AVRO_LENGTH
}

/// Decodes the data after the wire format's header with its writer's schema (public so that
/// `fjord types`'s tests hold its types to what this writes).
pub fn decode_with(schema: &WriterSchema, data: &[u8]) -> Result<DecodedField, String> {
    if !avro_limit_in_force() {
        // Fail closed: with a larger bound, a record of a few bytes can abort the process.
        return Err(
            "apache-avro's allocation bound was set elsewhere in this process; nothing is decoded"
                .to_owned(),
        );
    }
    let json = match &schema.kind {
        SchemaKind::Avro {
            schema: avro,
            references,
            names,
        } => {
            let mut reader = data;
            // The writer's schema among them too: its own named types, used again by name.
            let value = apache_avro::from_avro_datum_schemata(
                avro,
                std::iter::once(avro).chain(references).collect(),
                &mut reader,
                None,
            )
            .map_err(|error| format!("not Avro of schema {}: {error}", schema.id))?;
            if !reader.is_empty() {
                return Err(format!(
                    "{} bytes left after the Avro datum of schema {}",
                    reader.len(),
                    schema.id
                ));
            }
            let json = AvroJson {
                value: &value,
                schema: avro,
                names,
            };
            serde_json::to_string(&json).map_err(|e| e.to_string())?
        }
        SchemaKind::Protobuf { messages } => {
            let (indexes, rest) = message_indexes(data)?;
            let message = message_of(messages, &indexes)
                .ok_or_else(|| format!("schema {} has no message {indexes:?}", schema.id))?;
            let decoded = prost_reflect::DynamicMessage::decode(message, rest)
                .map_err(|error| format!("not Protobuf of schema {}: {error}", schema.id))?;
            let options = prost_reflect::SerializeOptions::new()
                .skip_default_fields(false)
                .use_proto_field_name(true);
            let mut out = serde_json::Serializer::new(Vec::new());
            decoded
                .serialize_with_options(&mut out, &options)
                .map_err(|error| error.to_string())?;
            String::from_utf8(out.into_inner()).map_err(|error| error.to_string())?
        }
        // As written, numbers included; made one line as the envelope's rules make it (JSON
        // holds line breaks only between tokens).
        SchemaKind::Json { .. } => match serde_json::from_slice::<&RawValue>(data) {
            Ok(raw) => raw.get().replace(['\n', '\r'], ""),
            Err(error) => return Err(format!("not JSON: {error}")),
        },
    };
    let (subject, version) = match &schema.subject {
        Some((subject, version)) => (Some(subject.clone()), Some(*version)),
        None => (None, None),
    };
    Ok(DecodedField {
        json: RawValue::from_string(json).map_err(|error| error.to_string())?,
        schema: Some(SchemaRef {
            id: schema.id,
            subject,
            version,
        }),
    })
}

/// A zig-zag varint, and the bytes after it.
fn zigzag(bytes: &[u8]) -> Result<(i64, &[u8]), String> {
    let mut value: u64 = 0;
    for (i, byte) in bytes.iter().enumerate().take(10) {
        value |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            #[allow(
                clippy::cast_possible_wrap,
                reason = "zig-zag decoding is bit twiddling"
            )]
            let decoded = (value >> 1) as i64 ^ -((value & 1) as i64);
            return Ok((decoded, &bytes[i + 1..]));
        }
    }
    Err("a malformed varint in the message indexes".into())
}

/// The Protobuf wire format's message indexes (a count, then that many indexes; a lone 0
/// for the first message), and the message's bytes after them.
fn message_indexes(data: &[u8]) -> Result<(Vec<usize>, &[u8]), String> {
    let (count, mut rest) = zigzag(data)?;
    if count == 0 {
        return Ok((vec![0], rest));
    }
    let count = usize::try_from(count)
        .ok()
        .filter(|count| *count <= 100)
        .ok_or_else(|| format!("{count} message indexes"))?;
    let mut indexes = Vec::with_capacity(count);
    for _ in 0..count {
        let (index, after) = zigzag(rest)?;
        indexes.push(usize::try_from(index).map_err(|_| format!("message index {index}"))?);
        rest = after;
    }
    Ok((indexes, rest))
}

/// The message at `indexes`: the first into the file's messages, the others into nested ones.
fn message_of(
    messages: &[prost_reflect::MessageDescriptor],
    indexes: &[usize],
) -> Option<prost_reflect::MessageDescriptor> {
    let (first, nested) = indexes.split_first()?;
    let mut message = messages.get(*first)?.clone();
    for index in nested {
        let child = message.child_messages().nth(*index)?;
        message = child;
    }
    Some(message)
}

/// The named types of an Avro schema and its references, by name: what a `Ref` in the
/// schema stands for. Made once per schema, when it is parsed.
#[derive(Debug, Default)]
pub struct AvroNames(HashMap<apache_avro::schema::Name, AvroSchema>);

impl AvroNames {
    /// The named types of `schema` and of the schemas it references.
    pub fn of(schema: &AvroSchema, references: &[AvroSchema]) -> Self {
        let mut names = HashMap::new();
        let mut stack: Vec<&AvroSchema> = references.iter().chain([schema]).collect();
        while let Some(schema) = stack.pop() {
            match schema {
                AvroSchema::Record(record) => {
                    names.insert(record.name.clone(), schema.clone());
                    stack.extend(record.fields.iter().map(|field| &field.schema));
                }
                AvroSchema::Enum(e) => {
                    names.insert(e.name.clone(), schema.clone());
                }
                AvroSchema::Fixed(fixed) => {
                    names.insert(fixed.name.clone(), schema.clone());
                }
                AvroSchema::Array(array) => stack.push(&array.items),
                AvroSchema::Map(map) => stack.push(&map.types),
                AvroSchema::Union(union) => stack.extend(union.variants()),
                _ => {}
            }
        }
        Self(names)
    }

    fn resolve<'a>(&'a self, schema: &'a AvroSchema) -> &'a AvroSchema {
        match schema {
            AvroSchema::Ref { name } => self.0.get(name).unwrap_or(schema),
            other => other,
        }
    }
}

/// An Avro value written as JSON by the mapping in this module's documentation, straight
/// to the output. The schema is followed beside the value for what the value alone does
/// not say: a decimal's scale.
struct AvroJson<'a> {
    value: &'a Avro,
    schema: &'a AvroSchema,
    names: &'a AvroNames,
}

impl Serialize for AvroJson<'_> {
    fn serialize<S: Serializer>(&self, out: S) -> Result<S::Ok, S::Error> {
        let schema = self.names.resolve(self.schema);
        let names = self.names;
        let at = |value, schema| AvroJson {
            value,
            schema,
            names,
        };
        match self.value {
            Avro::Null => out.serialize_unit(),
            Avro::Boolean(b) => out.serialize_bool(*b),
            Avro::Int(i) => out.serialize_i32(*i),
            Avro::Long(i) => out.serialize_i64(*i),
            // JSON has no NaN or infinity: serde_json writes them as null.
            Avro::Float(f) => out.serialize_f64(f64::from(*f)),
            Avro::Double(f) => out.serialize_f64(*f),
            Avro::Bytes(bytes) | Avro::Fixed(_, bytes) => out.serialize_str(&BASE64.encode(bytes)),
            Avro::String(s) | Avro::Enum(_, s) => out.serialize_str(s),
            Avro::Union(branch, value) => {
                let variant = match schema {
                    AvroSchema::Union(union) => usize::try_from(*branch)
                        .ok()
                        .and_then(|branch| union.variants().get(branch)),
                    _ => None,
                };
                at(value, variant.unwrap_or(&AvroSchema::Null)).serialize(out)
            }
            Avro::Array(items) => {
                let item = match schema {
                    AvroSchema::Array(array) => &*array.items,
                    _ => &AvroSchema::Null,
                };
                out.collect_seq(items.iter().map(|value| at(value, item)))
            }
            Avro::Map(entries) => {
                let item = match schema {
                    AvroSchema::Map(map) => &*map.types,
                    _ => &AvroSchema::Null,
                };
                let mut sorted: Vec<_> = entries.iter().collect();
                sorted.sort_unstable_by(|a, b| a.0.cmp(b.0));
                out.collect_map(sorted.into_iter().map(|(k, v)| (k, at(v, item))))
            }
            Avro::Record(fields) => {
                let field_schemas = match schema {
                    AvroSchema::Record(record) => Some(&record.fields),
                    _ => None,
                };
                out.collect_map(fields.iter().enumerate().map(|(i, (name, value))| {
                    let field = field_schemas
                        .and_then(|f| f.get(i))
                        .map_or(&AvroSchema::Null, |f| &f.schema);
                    (name, at(value, field))
                }))
            }
            Avro::Decimal(decimal) => {
                let scale = match schema {
                    AvroSchema::Decimal(decimal) => decimal.scale,
                    _ => 0,
                };
                out.serialize_str(&decimal_text(
                    &num_bigint::BigInt::from(decimal.clone()),
                    scale,
                ))
            }
            Avro::BigDecimal(decimal) => out.collect_str(decimal),
            Avro::Uuid(uuid) => out.collect_str(uuid),
            Avro::Date(days) => out.serialize_str(&date(i64::from(*days))),
            Avro::TimeMillis(ms) => out.serialize_str(&time_of_day(i64::from(*ms) * 1_000_000, 3)),
            Avro::TimeMicros(us) => out.serialize_str(&time_of_day(us.saturating_mul(1000), 6)),
            Avro::TimestampMillis(t) => {
                out.serialize_str(&timestamp(i128::from(*t) * 1_000_000, 3, "Z"))
            }
            Avro::TimestampMicros(t) => {
                out.serialize_str(&timestamp(i128::from(*t) * 1000, 6, "Z"))
            }
            Avro::TimestampNanos(t) => out.serialize_str(&timestamp(i128::from(*t), 9, "Z")),
            Avro::LocalTimestampMillis(t) => {
                out.serialize_str(&timestamp(i128::from(*t) * 1_000_000, 3, ""))
            }
            Avro::LocalTimestampMicros(t) => {
                out.serialize_str(&timestamp(i128::from(*t) * 1000, 6, ""))
            }
            Avro::LocalTimestampNanos(t) => out.serialize_str(&timestamp(i128::from(*t), 9, "")),
            Avro::Duration(duration) => {
                let mut map = out.serialize_map(Some(3))?;
                map.serialize_entry("months", &u32::from(duration.months()))?;
                map.serialize_entry("days", &u32::from(duration.days()))?;
                map.serialize_entry("millis", &u32::from(duration.millis()))?;
                map.end()
            }
        }
    }
}

/// An unscaled integer and a scale as the exact decimal: `12345`, 2 → `"123.45"`.
fn decimal_text(unscaled: &num_bigint::BigInt, scale: usize) -> String {
    let digits = unscaled.magnitude().to_string();
    let sign = if unscaled.sign() == num_bigint::Sign::Minus {
        "-"
    } else {
        ""
    };
    if scale == 0 {
        return format!("{sign}{digits}");
    }
    let padded = format!("{digits:0>width$}", width = scale + 1);
    let (whole, fraction) = padded.split_at(padded.len() - scale);
    format!("{sign}{whole}.{fraction}")
}

/// The proleptic Gregorian date `days` after 1970-01-01, `YYYY-MM-DD`.
fn date(days: i64) -> String {
    // Days to a civil date, counting in 400-year eras that start on March 1st.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_index + 2) / 5 + 1;
    let month = if month_index < 10 {
        month_index + 3
    } else {
        month_index - 9
    };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}")
}

/// Nanoseconds into a day as `HH:MM:SS` with `digits` fraction digits.
fn time_of_day(nanos: i64, digits: u32) -> String {
    let seconds = nanos.div_euclid(1_000_000_000);
    let fraction = nanos.rem_euclid(1_000_000_000) / 10_i64.pow(9 - digits);
    format!(
        "{:02}:{:02}:{:02}.{fraction:0width$}",
        seconds / 3600,
        seconds / 60 % 60,
        seconds % 60,
        width = digits as usize
    )
}

/// Nanoseconds since the epoch as RFC 3339, with `digits` fraction digits and `zone`.
fn timestamp(nanos: i128, digits: u32, zone: &str) -> String {
    const DAY: i128 = 86_400_000_000_000;
    let days = i64::try_from(nanos.div_euclid(DAY)).unwrap_or(i64::MAX / 2);
    let in_day = i64::try_from(nanos.rem_euclid(DAY)).unwrap_or(0);
    format!("{}T{}{zone}", date(days), time_of_day(in_day, digits))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calendar_and_clock() {
        assert_eq!(date(0), "1970-01-01");
        assert_eq!(date(-1), "1969-12-31");
        assert_eq!(date(19_723), "2024-01-01");
        assert_eq!(date(11_016), "2000-02-29");
        assert_eq!(time_of_day(45_296_789_000_000, 3), "12:34:56.789");
        assert_eq!(time_of_day(1_000, 6), "00:00:00.000001");
        assert_eq!(
            timestamp(1_767_323_045_678_000_000, 3, "Z"),
            "2026-01-02T03:04:05.678Z"
        );
        assert_eq!(timestamp(-1_000, 6, ""), "1969-12-31T23:59:59.999999");
    }

    #[test]
    fn decimals_are_exact() {
        let text = |n: i64, scale| decimal_text(&num_bigint::BigInt::from(n), scale);
        assert_eq!(text(12_345, 2), "123.45");
        assert_eq!(text(-5, 3), "-0.005");
        assert_eq!(text(7, 0), "7");
        assert_eq!(text(0, 2), "0.00");
    }

    #[test]
    fn message_indexes_are_zigzag_varints() {
        assert_eq!(message_indexes(&[0, 9]), Ok((vec![0], &[9][..])));
        // Two indexes, [1, 2]: zig-zag 2 → 4, 1 → 2, 2 → 4.
        assert_eq!(message_indexes(&[4, 2, 4, 9]), Ok((vec![1, 2], &[9][..])));
        assert!(message_indexes(&[0x80]).is_err());
        assert!(message_indexes(&[1]).is_err(), "a negative count");
    }

    #[test]
    fn only_a_zero_byte_and_an_id_are_the_wire_format() {
        assert_eq!(wire_format(&[0, 0, 0, 1, 2, 7]), Some((258, &[7][..])));
        assert_eq!(wire_format(&[0, 0, 0, 1, 2]), Some((258, &[][..])));
        assert_eq!(wire_format(&[0, 0, 0, 1]), None);
        assert_eq!(wire_format(b"{\"a\":1}"), None);
    }

    #[test]
    fn avro_values_map_to_json_with_their_logical_types() {
        let schema = AvroSchema::parse_str(
            r#"{"type": "record", "name": "Order", "namespace": "shop", "fields": [
                {"name": "id", "type": {"type": "string", "logicalType": "uuid"}},
                {"name": "total", "type": {"type": "bytes", "logicalType": "decimal", "precision": 9, "scale": 2}},
                {"name": "day", "type": {"type": "int", "logicalType": "date"}},
                {"name": "at", "type": {"type": "long", "logicalType": "timestamp-micros"}},
                {"name": "state", "type": {"type": "enum", "name": "State", "symbols": ["NEW", "PAID"]}},
                {"name": "note", "type": ["null", "string"]},
                {"name": "lines", "type": {"type": "array", "items": {"type": "record", "name": "Line",
                    "fields": [{"name": "sku", "type": "string"}, {"name": "price", "type":
                    {"type": "fixed", "name": "Price", "size": 2, "logicalType": "decimal", "precision": 4, "scale": 1}}]}}},
                {"name": "tags", "type": {"type": "map", "values": "long"}},
                {"name": "raw", "type": {"type": "fixed", "name": "Raw", "size": 2}},
                {"name": "next", "type": ["null", "Line"]}
            ]}"#,
        )
        .expect("schema");
        let line = |sku: &str, price: i64| {
            Avro::Record(vec![
                ("sku".into(), Avro::String(sku.into())),
                (
                    "price".into(),
                    Avro::Decimal(apache_avro::Decimal::from(
                        num_bigint::BigInt::from(price).to_signed_bytes_be(),
                    )),
                ),
            ])
        };
        let value = Avro::Record(vec![
            (
                "id".into(),
                Avro::Uuid(
                    "8f2d6a52-6f0e-4a57-9c39-0a4c2a8f1b3e"
                        .parse()
                        .expect("uuid"),
                ),
            ),
            (
                "total".into(),
                Avro::Decimal(apache_avro::Decimal::from(
                    num_bigint::BigInt::from(-123_450).to_signed_bytes_be(),
                )),
            ),
            ("day".into(), Avro::Date(19_723)),
            ("at".into(), Avro::TimestampMicros(1_767_323_045_678_901)),
            ("state".into(), Avro::Enum(1, "PAID".into())),
            (
                "note".into(),
                Avro::Union(1, Box::new(Avro::String("hi".into()))),
            ),
            ("lines".into(), Avro::Array(vec![line("a", 125)])),
            (
                "tags".into(),
                Avro::Map([("x".to_owned(), Avro::Long(1))].into_iter().collect()),
            ),
            ("raw".into(), Avro::Fixed(2, vec![0xff, 0])),
            ("next".into(), Avro::Union(1, Box::new(line("b", -5)))),
        ]);
        // Through the real encoder and decoder, so the test holds the crate to this shape.
        let bytes = apache_avro::to_avro_datum(&schema, value).expect("encodes");
        // Decoding sets apache-avro's process-wide bound, which the fuzz tests rely on.
        assert!(avro_limit_in_force());
        let decoded =
            apache_avro::from_avro_datum(&schema, &mut bytes.as_slice(), None).expect("decodes");
        let names = AvroNames::of(&schema, &[]);
        let json = AvroJson {
            value: &decoded,
            schema: &schema,
            names: &names,
        };
        assert_eq!(
            serde_json::to_value(&json).expect("JSON"),
            serde_json::json!({
                "id": "8f2d6a52-6f0e-4a57-9c39-0a4c2a8f1b3e",
                "total": "-1234.50",
                "day": "2024-01-01",
                "at": "2026-01-02T03:04:05.678901Z",
                "state": "PAID",
                "note": "hi",
                "lines": [{"sku": "a", "price": "12.5"}],
                "tags": {"x": 1},
                "raw": "/wA=",
                "next": {"sku": "b", "price": "-0.5"}
            })
        );
    }

    #[test]
    fn avro_named_types_may_be_used_again_by_name() {
        let schema = WriterSchema {
            id: 9,
            subject: None,
            kind: SchemaKind::parse(
                "AVRO",
                r#"{"type": "record", "name": "Node", "fields": [
                    {"name": "n", "type": "int"},
                    {"name": "next", "type": ["null", "Node"]}
                ]}"#,
            )
            .expect("parses"),
        };
        // n = 1, next = (branch 1) n = 2, next = (branch 0) null.
        let field = decode_with(&schema, &[2, 2, 4, 0]).expect("decodes");
        assert_eq!(field.json.get(), r#"{"n":1,"next":{"n":2,"next":null}}"#);
    }

    /// Schemas with every kind of Avro type (a recursive one too), Protobuf messages with
    /// nesting, maps, enums, a oneof and a well-known type, and JSON Schema.
    fn fuzzed_schemas() -> &'static [WriterSchema] {
        static SCHEMAS: std::sync::LazyLock<Vec<WriterSchema>> = std::sync::LazyLock::new(|| {
            let avro = r#"{"type": "record", "name": "Node", "fields": [
                {"name": "id", "type": {"type": "string", "logicalType": "uuid"}},
                {"name": "total", "type": {"type": "bytes", "logicalType": "decimal", "precision": 9, "scale": 2}},
                {"name": "price", "type": {"type": "fixed", "name": "P", "size": 3, "logicalType": "decimal", "precision": 6, "scale": 1}},
                {"name": "day", "type": {"type": "int", "logicalType": "date"}},
                {"name": "at", "type": {"type": "long", "logicalType": "timestamp-nanos"}},
                {"name": "t", "type": {"type": "long", "logicalType": "time-micros"}},
                {"name": "state", "type": {"type": "enum", "name": "S", "symbols": ["A", "B"]}},
                {"name": "f", "type": "float"},
                {"name": "tags", "type": {"type": "map", "values": ["null", "double", "bytes"]}},
                {"name": "items", "type": {"type": "array", "items": "long"}},
                {"name": "next", "type": ["null", "Node"]}
            ]}"#;
            let proto = r#"syntax = "proto3";
                import "google/protobuf/timestamp.proto";
                message Order {
                  message Line { string sku = 1; sint64 qty = 2; bytes raw = 3; }
                  enum State { NEW = 0; PAID = 1; }
                  int64 id = 1; double total = 2; repeated Line lines = 3; State state = 4;
                  map<string, fixed32> tags = 5; oneof pick { string a = 6; Line b = 7; }
                  google.protobuf.Timestamp at = 8; optional bool paid = 9; Order child = 10;
                }
                message Other { repeated uint64 n = 1; }"#;
            [
                ("AVRO", avro),
                ("PROTOBUF", proto),
                ("JSON", r#"{"type": "object"}"#),
                // What a length starts: the data first.
                ("AVRO", r#""bytes""#),
                ("AVRO", r#""string""#),
                ("AVRO", r#"{"type": "array", "items": "long"}"#),
                ("AVRO", r#"{"type": "map", "values": "int"}"#),
            ]
            .into_iter()
            .zip(1..)
            .map(|((kind, text), id)| WriterSchema {
                id,
                subject: None,
                kind: SchemaKind::parse(kind, text).expect("the fuzzed schemas parse"),
            })
            .collect()
        });
        &SCHEMAS
    }

    /// Decodes `data` with `schema` and holds the outcome to a clear error or JSON on one
    /// line.
    fn decodes_or_refuses(schema: &WriterSchema, data: &[u8]) -> Result<(), TestCaseError> {
        if let Ok(field) = decode_with(schema, data) {
            let json = field.json.get();
            prop_assert!(!json.contains(['\n', '\r']), "{json}");
            prop_assert!(
                serde_json::from_str::<serde_json::Value>(json).is_ok(),
                "{json}"
            );
        }
        Ok(())
    }

    use proptest::prelude::*;
    use proptest::test_runner::TestCaseError;

    proptest! {
        #[test]
        fn fuzz_decode_with_bytes(
            schema in 0..7_usize,
            data in proptest::collection::vec(any::<u8>(), 0..512),
        ) {
            decodes_or_refuses(&fuzzed_schemas()[schema], &data)?;
        }

        /// Lengths and counts the data does not hold: a varint of up to 2^64 where bytes,
        /// a string, an array or a map starts, or the message indexes' count.
        #[test]
        fn fuzz_decode_with_huge_lengths(
            schema in prop_oneof![Just(1_usize), 3..7_usize],
            prefix in proptest::collection::vec(any::<u8>(), 0..2),
            // Mostly what apache-avro's own bound (2^29) lets through.
            length in prop_oneof![any::<u64>(), (1_u64 << 20)..(1 << 31)],
            rest in proptest::collection::vec(any::<u8>(), 0..8),
        ) {
            let mut data = prefix;
            let mut n = length;
            while n >= 0x80 {
                data.push(u8::try_from(n & 0x7f).unwrap_or(0) | 0x80);
                n >>= 7;
            }
            data.push(u8::try_from(n).unwrap_or(0));
            data.extend(rest);
            decodes_or_refuses(&fuzzed_schemas()[schema], &data)?;
        }
    }
}
