//! The ingest backlog's values in each [`ValueFormat`]: one order line (`seq`, `ts`, `sku`,
//! `qty`, `price`, `paid`) written as JSON, or with a schema registered in the Schema Registry
//! and the Confluent wire format (a zero byte, the schema id, for Protobuf the message index,
//! then the encoded data) by the format's own encoder, so that the consumer decodes what a
//! real producer writes.

use anyhow::Context as _;
use apache_avro::types::Value as Avro;
use prost_reflect::prost::Message as _;
use prost_reflect::{DynamicMessage, MessageDescriptor, Value as Proto};

use super::scenario::ValueFormat;
use fjord_consumer::registry::SchemaKind;

const AVRO_SCHEMA: &str = r#"{"type": "record", "name": "OrderLine", "namespace": "fjord.bench", "fields": [
    {"name": "seq", "type": "long"},
    {"name": "ts", "type": "long"},
    {"name": "sku", "type": "string"},
    {"name": "qty", "type": "int"},
    {"name": "price", "type": "double"},
    {"name": "paid", "type": "boolean"}
]}"#;

const PROTO_SCHEMA: &str = r#"syntax = "proto3";
package fjord.bench;

message OrderLine {
  int64 seq = 1;
  int64 ts = 2;
  string sku = 3;
  int32 qty = 4;
  double price = 5;
  bool paid = 6;
}
"#;

const JSON_SCHEMA: &str = r#"{"type": "object", "properties": {
    "seq": {"type": "integer"}, "ts": {"type": "integer"}, "sku": {"type": "string"},
    "qty": {"type": "integer"}, "price": {"type": "number"}, "paid": {"type": "boolean"}
}}"#;

/// Writes the values of one format.
pub(super) enum Values {
    Json,
    Avro {
        header: Vec<u8>,
        schema: apache_avro::Schema,
    },
    Protobuf {
        header: Vec<u8>,
        message: MessageDescriptor,
    },
    JsonSchema {
        header: Vec<u8>,
    },
}

/// One order line's fields.
struct Line {
    seq: u64,
    ts: u64,
    sku: String,
    qty: i32,
    price: f64,
    paid: bool,
}

impl Line {
    fn new(seq: u64, ts: u64) -> Self {
        Self {
            seq,
            ts,
            sku: format!("sku-{:04}", seq % 1_000),
            qty: i32::try_from(seq % 7).unwrap_or(0) + 1,
            price: (seq % 10_000) as f64 / 100.0,
            paid: seq.is_multiple_of(2),
        }
    }

    fn json(&self) -> Vec<u8> {
        serde_json::json!({
            "seq": self.seq, "ts": self.ts, "sku": self.sku,
            "qty": self.qty, "price": self.price, "paid": self.paid
        })
        .to_string()
        .into_bytes()
    }
}

impl Values {
    /// For `format`, its schema registered under `topic`'s value subject in `registry`.
    pub(super) async fn new(
        format: ValueFormat,
        registry: Option<&str>,
        topic: &str,
    ) -> anyhow::Result<Self> {
        let (schema_type, text) = match format {
            ValueFormat::Json => return Ok(Self::Json),
            ValueFormat::Avro => ("AVRO", AVRO_SCHEMA),
            ValueFormat::Protobuf => ("PROTOBUF", PROTO_SCHEMA),
            ValueFormat::JsonSchema => ("JSON", JSON_SCHEMA),
        };
        let registry = registry.context(
            "this value format needs a Schema Registry: --schema-registry or \
             FJORD_TEST_SCHEMA_REGISTRY_URL",
        )?;
        let id = register(registry, &format!("{topic}-value"), schema_type, text).await?;
        let mut header = vec![0];
        header.extend_from_slice(&id.to_be_bytes());
        Ok(match format {
            ValueFormat::Json => Self::Json,
            ValueFormat::Avro => Self::Avro {
                header,
                schema: apache_avro::Schema::parse_str(AVRO_SCHEMA)?,
            },
            ValueFormat::Protobuf => {
                // The first message of the file: a lone zero index.
                header.push(0);
                let SchemaKind::Protobuf { messages } = SchemaKind::parse(schema_type, text)
                    .map_err(|error| anyhow::anyhow!("the bench's .proto: {error}"))?
                else {
                    anyhow::bail!("the bench's .proto is not Protobuf");
                };
                let message = messages.into_iter().next().context("OrderLine")?;
                Self::Protobuf { header, message }
            }
            ValueFormat::JsonSchema => Self::JsonSchema { header },
        })
    }

    /// The value of record `seq`, produced at `ts` (µs since the epoch).
    pub(super) fn value(&self, seq: u64, ts: u64) -> anyhow::Result<Vec<u8>> {
        let line = Line::new(seq, ts);
        let long = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        Ok(match self {
            Self::Json => line.json(),
            Self::JsonSchema { header } => [header.as_slice(), &line.json()].concat(),
            Self::Avro { header, schema } => {
                let record = Avro::Record(vec![
                    ("seq".into(), Avro::Long(long(line.seq))),
                    ("ts".into(), Avro::Long(long(line.ts))),
                    ("sku".into(), Avro::String(line.sku)),
                    ("qty".into(), Avro::Int(line.qty)),
                    ("price".into(), Avro::Double(line.price)),
                    ("paid".into(), Avro::Boolean(line.paid)),
                ]);
                let mut value = header.clone();
                value.extend(apache_avro::to_avro_datum(schema, record)?);
                value
            }
            Self::Protobuf { header, message } => {
                let mut order = DynamicMessage::new(message.clone());
                for (name, field) in [
                    ("seq", Proto::I64(long(line.seq))),
                    ("ts", Proto::I64(long(line.ts))),
                    ("sku", Proto::String(line.sku)),
                    ("qty", Proto::I32(line.qty)),
                    ("price", Proto::F64(line.price)),
                    ("paid", Proto::Bool(line.paid)),
                ] {
                    order
                        .try_set_field_by_name(name, field)
                        .with_context(|| format!("OrderLine.{name}"))?;
                }
                let mut value = header.clone();
                order.encode(&mut value)?;
                value
            }
        })
    }
}

/// Registers `schema` under `subject` (`POST /subjects/{subject}/versions`); its id.
async fn register(
    registry: &str,
    subject: &str,
    schema_type: &str,
    schema: &str,
) -> anyhow::Result<u32> {
    #[derive(serde::Deserialize)]
    struct Registered {
        id: u32,
    }
    let url = format!(
        "{}/subjects/{subject}/versions",
        registry.trim_end_matches('/')
    );
    let response = reqwest::Client::new()
        .post(url)
        .header("Content-Type", "application/vnd.schemaregistry.v1+json")
        .json(&serde_json::json!({"schema": schema, "schemaType": schema_type}))
        .send()
        .await
        .context("registering the bench's schema")?;
    let status = response.status();
    anyhow::ensure!(
        status.is_success(),
        "the registry refused the bench's schema: HTTP {status}: {}",
        response.text().await.unwrap_or_default()
    );
    Ok(response.json::<Registered>().await?.id)
}
