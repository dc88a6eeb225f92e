//! `fjord types MANIFEST [ENDPOINT]`: TypeScript types for what clients of an endpoint
//! receive, from the latest schema of each of its topics' value subjects
//! (`<topic>-value`, Confluent's default naming) in the manifest's Schema Registry. Avro
//! schemas become types that follow the consumer's JSON mapping (a decimal, a date, a
//! timestamp or bytes is a string), Protobuf schemas follow its proto3 JSON mapping as the
//! consumer writes it, and JSON Schemas what they promise of the JSON as produced; a topic
//! with no schema, or what a schema says that has no TypeScript type here, is `JsonValue`.
//! The output names one type per endpoint and an `Endpoints` map for `connect<Endpoints>()`
//! of `@fjord/client`.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use apache_avro::Schema;
use fjord_config::Manifest;
use fjord_consumer::registry::{FetchError, Registry, SchemaKind};
use prost_reflect::{Kind, MessageDescriptor};

/// Why no types could be written.
#[derive(Debug, thiserror::Error)]
pub enum TypesError {
    /// The manifest names no registry.
    #[error("the manifest has no schema_registry section to read schemas from")]
    NoRegistry,
    /// The endpoint asked for is not in the manifest.
    #[error("the manifest has no endpoint {0:?}")]
    UnknownEndpoint(String),
    /// The registry client could not be made.
    #[error(transparent)]
    Manifest(#[from] fjord_config::ManifestError),
    /// The registry did not answer.
    #[error("{0}")]
    Registry(FetchError),
}

/// The TypeScript module for `endpoint` (every endpoint when `None`).
pub async fn types(manifest: &Manifest, endpoint: Option<&str>) -> Result<String, TypesError> {
    let config = manifest
        .schema_registry
        .as_ref()
        .ok_or(TypesError::NoRegistry)?;
    let registry = Registry::new(config)?;
    let endpoints: Vec<_> = match endpoint {
        Some(name) => vec![
            manifest
                .endpoints
                .iter()
                .find(|(endpoint, _)| endpoint.as_str() == name)
                .ok_or_else(|| TypesError::UnknownEndpoint(name.to_owned()))?,
        ],
        None => manifest.endpoints.iter().collect(),
    };
    let mut schemas = Vec::new();
    for (name, config) in endpoints {
        let mut kinds = Vec::new();
        for topic in &config.topics {
            match registry.latest(&format!("{topic}-value")).await {
                Ok(schema) => kinds.push(Some(schema.kind)),
                Err(FetchError::Refused(_)) => kinds.push(None),
                Err(down) => return Err(TypesError::Registry(down)),
            }
        }
        schemas.push((name.as_str(), kinds));
    }
    Ok(module(&schemas))
}

/// The module for endpoints and the value schemas of their topics (`None`: no schema).
pub fn module(endpoints: &[(&str, Vec<Option<SchemaKind>>)]) -> String {
    let mut named = BTreeMap::new();
    let mut types = String::new();
    // A type, not an interface: only a type meets `connect`'s `Record<string, unknown>`.
    let mut map = String::from("\nexport type Endpoints = {\n");
    for (name, kinds) in endpoints {
        let mut variants = Vec::new();
        for kind in kinds {
            let typed = match kind {
                Some(SchemaKind::Avro {
                    schema, references, ..
                }) => {
                    for reference in references {
                        ts_type(reference, &mut named);
                    }
                    ts_type(schema, &mut named)
                }
                Some(SchemaKind::Protobuf { messages }) => {
                    let types: Vec<_> = messages
                        .iter()
                        .map(|message| proto_message(message, &mut named))
                        .collect();
                    types.join(" | ")
                }
                Some(SchemaKind::Json { schema }) => match serde_json::from_str(schema) {
                    Ok(schema) => JsonSchema::new(&schema).ts_type(&schema, &mut named),
                    Err(_) => "JsonValue".to_owned(),
                },
                None => "JsonValue".to_owned(),
            };
            if !variants.contains(&typed) {
                variants.push(typed);
            }
        }
        let type_name = pascal(name) + "Value";
        let _ = writeln!(
            types,
            "\n/** Values of endpoint `{name}`. */\nexport type {type_name} = {};",
            variants.join(" | ")
        );
        let _ = writeln!(map, "  \"{name}\": {type_name};");
    }
    let mut out =
        String::from("// Written by `fjord types` from the Schema Registry; do not edit.\n");
    for declaration in named.values() {
        types.push('\n');
        types.push_str(declaration);
    }
    types.push_str(&map);
    types.push_str("};\n");
    // An unused import fails a type check with `noUnusedLocals`.
    if types.contains("JsonValue") {
        out.push_str("import type { JsonValue } from \"@fjord/client\";\n");
    }
    out + &types
}

/// `orders-v2` → `OrdersV2`.
fn pascal(name: &str) -> String {
    name.split(|c: char| !c.is_ascii_alphanumeric())
        .filter(|part| !part.is_empty())
        .map(|part| {
            let mut chars = part.chars();
            chars.next().map_or_else(String::new, |first| {
                first.to_ascii_uppercase().to_string() + chars.as_str()
            })
        })
        .collect()
}

/// The TypeScript type of an Avro schema; named types (records, enums, fixed) are declared
/// once in `named`, by full name, and referred to by their name.
fn ts_type(schema: &Schema, named: &mut BTreeMap<String, String>) -> String {
    match schema {
        Schema::Null => "null".into(),
        Schema::Boolean => "boolean".into(),
        Schema::Int | Schema::Long | Schema::Float | Schema::Double => "number".into(),
        Schema::String
        | Schema::TimeMillis
        | Schema::TimeMicros
        | Schema::Bytes
        | Schema::Uuid
        | Schema::Date
        | Schema::Decimal(_)
        | Schema::BigDecimal
        | Schema::TimestampMillis
        | Schema::TimestampMicros
        | Schema::TimestampNanos
        | Schema::LocalTimestampMillis
        | Schema::LocalTimestampMicros
        | Schema::LocalTimestampNanos => "string".into(),
        Schema::Duration => "{ months: number; days: number; millis: number }".into(),
        Schema::Array(array) => format!("Array<{}>", ts_type(&array.items, named)),
        Schema::Map(map) => format!("Record<string, {}>", ts_type(&map.types, named)),
        Schema::Union(union) => union
            .variants()
            .iter()
            .map(|variant| ts_type(variant, named))
            .collect::<Vec<_>>()
            .join(" | "),
        Schema::Record(record) => {
            let name = pascal(&record.name.fullname(None));
            if !named.contains_key(&name) {
                // Declared before its fields are typed, so that a recursive record ends.
                named.insert(name.clone(), String::new());
                let mut body = format!("export interface {name} {{\n");
                for field in &record.fields {
                    let _ = writeln!(body, "  {}: {};", field.name, ts_type(&field.schema, named));
                }
                body.push_str("}\n");
                named.insert(name.clone(), body);
            }
            name
        }
        Schema::Enum(e) => {
            let name = pascal(&e.name.fullname(None));
            let symbols: Vec<String> = e.symbols.iter().map(|s| format!("\"{s}\"")).collect();
            named.insert(
                name.clone(),
                format!("export type {name} = {};\n", symbols.join(" | ")),
            );
            name
        }
        Schema::Fixed(_) => "string".into(),
        Schema::Ref { name } => pascal(&name.fullname(None)),
    }
}

/// A property name as TypeScript writes it: quoted unless an identifier.
fn property(name: &str) -> String {
    let mut chars = name.chars();
    let identifier = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == '$')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '$');
    if identifier {
        name.to_owned()
    } else {
        serde_json::Value::from(name).to_string()
    }
}

/// A float in protobuf's JSON mapping: a number, or a string for what JSON has no number for.
const PROTO_FLOAT: &str = "number | \"NaN\" | \"Infinity\" | \"-Infinity\"";

/// The TypeScript type of a Protobuf message as the consumer writes it (prost-reflect's
/// proto3 JSON mapping, `.proto` field names, defaults written): 64-bit integers and bytes
/// are strings, an enum is its value's name (its number when the schema does not name it),
/// and a field with presence (a message, a oneof member, `optional`) is there only when set.
fn proto_message(message: &MessageDescriptor, named: &mut BTreeMap<String, String>) -> String {
    if let Some(known) = well_known(message.full_name()) {
        return known.to_owned();
    }
    let name = pascal(message.full_name());
    if !named.contains_key(&name) {
        // Declared before its fields are typed, so that a recursive message ends.
        named.insert(name.clone(), String::new());
        let mut body = format!("export interface {name} {{\n");
        for field in message.fields() {
            let typed = if field.is_map() {
                let value = match field.kind() {
                    Kind::Message(entry) => {
                        proto_kind(&entry.map_entry_value_field().kind(), named)
                    }
                    other => proto_kind(&other, named),
                };
                format!("Record<string, {value}>")
            } else if field.is_list() {
                format!("Array<{}>", proto_kind(&field.kind(), named))
            } else {
                proto_kind(&field.kind(), named)
            };
            let optional = if field.supports_presence() { "?" } else { "" };
            let _ = writeln!(body, "  {}{optional}: {typed};", property(field.name()));
        }
        body.push_str("}\n");
        named.insert(name.clone(), body);
    }
    name
}

fn proto_kind(kind: &Kind, named: &mut BTreeMap<String, String>) -> String {
    match kind {
        Kind::Double | Kind::Float => PROTO_FLOAT.into(),
        Kind::Int32 | Kind::Sint32 | Kind::Sfixed32 | Kind::Uint32 | Kind::Fixed32 => {
            "number".into()
        }
        Kind::Int64
        | Kind::Sint64
        | Kind::Sfixed64
        | Kind::Uint64
        | Kind::Fixed64
        | Kind::String
        | Kind::Bytes => "string".into(),
        Kind::Bool => "boolean".into(),
        Kind::Enum(e) if e.full_name() == "google.protobuf.NullValue" => "null".into(),
        Kind::Enum(e) => {
            let name = pascal(e.full_name());
            let mut values: Vec<String> = e
                .values()
                .map(|value| serde_json::Value::from(value.name()).to_string())
                .collect();
            values.push("number".into());
            named.insert(
                name.clone(),
                format!("export type {name} = {};\n", values.join(" | ")),
            );
            name
        }
        Kind::Message(message) => proto_message(message, named),
    }
}

/// The JSON of protobuf's well-known types, which are not written as messages.
fn well_known(full_name: &str) -> Option<&'static str> {
    Some(match full_name {
        "google.protobuf.Any" => "{ \"@type\": string; [key: string]: JsonValue }",
        "google.protobuf.Timestamp"
        | "google.protobuf.Duration"
        | "google.protobuf.FieldMask"
        | "google.protobuf.Int64Value"
        | "google.protobuf.UInt64Value"
        | "google.protobuf.StringValue"
        | "google.protobuf.BytesValue" => "string",
        "google.protobuf.Struct" => "{ [key: string]: JsonValue }",
        "google.protobuf.FloatValue" | "google.protobuf.DoubleValue" => PROTO_FLOAT,
        "google.protobuf.Int32Value" | "google.protobuf.UInt32Value" => "number",
        "google.protobuf.BoolValue" => "boolean",
        "google.protobuf.ListValue" => "JsonValue[]",
        "google.protobuf.Value" => "JsonValue",
        "google.protobuf.Empty" => "Record<string, never>",
        _ => return None,
    })
}

/// A JSON Schema's types: `type` (one or a list), `properties` and `required`,
/// `additionalProperties` of an object without properties, `items`, `enum`, `const`,
/// `oneOf`/`anyOf` (a union), `allOf` (an intersection) and local `$ref`s to
/// `#/definitions/*` or `#/$defs/*` (declared once, by name); what it does not map is
/// `JsonValue`. The consumer writes a JSON Schema record as it was produced, so these are
/// what the producer's schema promises.
struct JsonSchema<'s> {
    root: &'s serde_json::Value,
}

impl<'s> JsonSchema<'s> {
    fn new(root: &'s serde_json::Value) -> Self {
        Self { root }
    }

    fn ts_type(&self, schema: &serde_json::Value, named: &mut BTreeMap<String, String>) -> String {
        use serde_json::Value as Json;
        let Json::Object(schema) = schema else {
            // `true` or anything else: any value; `false`: none.
            return if schema == &Json::Bool(false) {
                "never"
            } else {
                "JsonValue"
            }
            .into();
        };
        if let Some(Json::String(reference)) = schema.get("$ref") {
            return self.reference(reference, named);
        }
        if let Some(Json::Array(values)) = schema.get("enum") {
            return union(values.iter().map(literal));
        }
        if let Some(value) = schema.get("const") {
            return literal(value);
        }
        for (key, joiner) in [("oneOf", " | "), ("anyOf", " | "), ("allOf", " & ")] {
            if let Some(Json::Array(schemas)) = schema.get(key) {
                let types: Vec<_> = schemas
                    .iter()
                    .map(|schema| format!("({})", self.ts_type(schema, named)))
                    .collect();
                return types.join(joiner);
            }
        }
        let types: Vec<&str> = match schema.get("type") {
            Some(Json::String(one)) => vec![one.as_str()],
            Some(Json::Array(many)) => many.iter().filter_map(Json::as_str).collect(),
            _ => return "JsonValue".into(),
        };
        union(types.into_iter().map(|name| match name {
            "string" => "string".into(),
            "integer" | "number" => "number".into(),
            "boolean" => "boolean".into(),
            "null" => "null".into(),
            "array" => match schema.get("items") {
                Some(items @ (Json::Object(_) | Json::Bool(_))) => {
                    format!("Array<{}>", self.ts_type(items, named))
                }
                _ => "JsonValue[]".into(),
            },
            "object" => self.object(schema, named),
            _ => "JsonValue".into(),
        }))
    }

    fn object(
        &self,
        schema: &serde_json::Map<String, serde_json::Value>,
        named: &mut BTreeMap<String, String>,
    ) -> String {
        let properties = schema.get("properties").and_then(|p| p.as_object());
        let Some(properties) = properties.filter(|p| !p.is_empty()) else {
            return match schema.get("additionalProperties") {
                Some(serde_json::Value::Bool(false)) => "Record<string, never>".into(),
                Some(values @ serde_json::Value::Object(_)) => {
                    format!("Record<string, {}>", self.ts_type(values, named))
                }
                _ => "{ [key: string]: JsonValue }".into(),
            };
        };
        let required: Vec<&str> = schema
            .get("required")
            .and_then(|r| r.as_array())
            .map(|r| r.iter().filter_map(|name| name.as_str()).collect())
            .unwrap_or_default();
        let mut body = String::from("{\n");
        for (name, property_schema) in properties {
            let optional = if required.contains(&name.as_str()) {
                ""
            } else {
                "?"
            };
            let typed = self.ts_type(property_schema, named);
            let _ = writeln!(body, "  {}{optional}: {typed};", property(name));
        }
        body.push('}');
        body
    }

    fn reference(&self, reference: &str, named: &mut BTreeMap<String, String>) -> String {
        let target = ["#/definitions/", "#/$defs/"].iter().find_map(|prefix| {
            let name = reference.strip_prefix(prefix)?;
            let schema = self.root.pointer(&reference[1..])?;
            Some((name, schema))
        });
        let Some((name, schema)) = target else {
            return "JsonValue".into();
        };
        let name = pascal(name);
        if !named.contains_key(&name) {
            named.insert(name.clone(), String::new());
            let typed = self.ts_type(schema, named);
            named.insert(name.clone(), format!("export type {name} = {typed};\n"));
        }
        name
    }
}

/// Types as one union, each once.
fn union(types: impl Iterator<Item = String>) -> String {
    let mut unique: Vec<String> = Vec::new();
    for typed in types {
        if !unique.contains(&typed) {
            unique.push(typed);
        }
    }
    if unique.is_empty() {
        "never".into()
    } else {
        unique.join(" | ")
    }
}

/// A JSON value as a literal type; objects and arrays as `JsonValue`.
fn literal(value: &serde_json::Value) -> String {
    match value {
        serde_json::Value::Object(_) | serde_json::Value::Array(_) => "JsonValue".into(),
        scalar => scalar.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn avro_types_follow_the_consumers_json_mapping() {
        let schema = Schema::parse_str(
            r#"{"type": "record", "name": "Order", "namespace": "shop", "fields": [
                {"name": "id", "type": {"type": "string", "logicalType": "uuid"}},
                {"name": "total", "type": {"type": "bytes", "logicalType": "decimal", "precision": 9, "scale": 2}},
                {"name": "qty", "type": "int"},
                {"name": "state", "type": {"type": "enum", "name": "State", "symbols": ["NEW", "PAID"]}},
                {"name": "note", "type": ["null", "string"]},
                {"name": "tags", "type": {"type": "map", "values": "long"}},
                {"name": "next", "type": ["null", "Order"]}
            ]}"#,
        )
        .expect("schema");
        let mut named = BTreeMap::new();
        assert_eq!(ts_type(&schema, &mut named), "ShopOrder");
        assert_eq!(
            named["ShopOrder"],
            "export interface ShopOrder {\n  id: string;\n  total: string;\n  qty: number;\n  state: ShopState;\n  note: null | string;\n  tags: Record<string, number>;\n  next: null | ShopOrder;\n}\n"
        );
        assert_eq!(
            named["ShopState"],
            "export type ShopState = \"NEW\" | \"PAID\";\n"
        );
        assert_eq!(pascal("orders-v2"), "OrdersV2");
    }

    /// The fields an interface declares, and those of them that are always there.
    fn fields(declaration: &str) -> (Vec<&str>, Vec<&str>) {
        let mut all = Vec::new();
        let mut always = Vec::new();
        for line in declaration.lines().filter(|line| line.starts_with("  ")) {
            let name = line.trim().split(':').next().unwrap_or_default();
            match name.strip_suffix('?') {
                Some(optional) => all.push(optional),
                None => {
                    all.push(name);
                    always.push(name);
                }
            }
        }
        (all, always)
    }

    fn sorted(mut names: Vec<&str>) -> Vec<&str> {
        names.sort_unstable();
        names
    }

    /// Decoded by the consumer from the wire format's data (after the header).
    fn decoded(kind: SchemaKind, data: &[u8]) -> serde_json::Value {
        let schema = fjord_consumer::registry::WriterSchema {
            id: 1,
            subject: None,
            kind,
        };
        let field = fjord_consumer::decode::decode_with(&schema, data).expect("decodes");
        serde_json::from_str(field.json.get()).expect("JSON")
    }

    const ORDER_PROTO: &str = r#"syntax = "proto3";
package shop;
import "google/protobuf/timestamp.proto";
message Order {
  enum State { NEW = 0; PAID = 1; }
  message Line { string sku = 1; double price = 2; }
  string id = 1;
  int64 total_cents = 2;
  int32 qty = 3;
  bytes raw = 4;
  State state = 5;
  repeated Line lines = 6;
  map<string, uint64> tags = 7;
  google.protobuf.Timestamp at = 8;
  optional string note = 9;
  oneof paid_by { string card = 10; bool cash = 11; }
  Line first = 12;
}
"#;

    #[test]
    fn protobuf_types_are_the_fields_the_consumer_writes() {
        let kind = SchemaKind::parse("PROTOBUF", ORDER_PROTO).expect("compiles");
        let SchemaKind::Protobuf { messages } = &kind else {
            panic!("not Protobuf");
        };
        let mut named = BTreeMap::new();
        assert_eq!(proto_message(&messages[0], &mut named), "ShopOrder");
        let order = named["ShopOrder"].clone();
        assert_eq!(
            order,
            "export interface ShopOrder {\n  id: string;\n  total_cents: string;\n  qty: number;\n  raw: string;\n  state: ShopOrderState;\n  lines: Array<ShopOrderLine>;\n  tags: Record<string, string>;\n  at?: string;\n  note?: string;\n  card?: string;\n  cash?: boolean;\n  first?: ShopOrderLine;\n}\n"
        );
        assert_eq!(
            named["ShopOrderState"],
            "export type ShopOrderState = \"NEW\" | \"PAID\" | number;\n"
        );
        assert!(
            named["ShopOrderLine"]
                .contains("  price: number | \"NaN\" | \"Infinity\" | \"-Infinity\";\n")
        );
        let (all, always) = fields(&order);
        // An empty message: the decoder writes exactly the fields typed as always there.
        let empty = decoded(
            SchemaKind::parse("PROTOBUF", ORDER_PROTO).expect("compiles"),
            &[0],
        );
        let keys: Vec<&str> = empty
            .as_object()
            .expect("object")
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(keys, sorted(always), "{empty}");
        // Every field set (the oneof's `cash`, so not `card`): the decoder writes each as typed.
        let message = &messages[0];
        let mut value = prost_reflect::DynamicMessage::new(message.clone());
        for field in message.fields().filter(|field| field.name() != "card") {
            let set = match field.name() {
                "total_cents" => prost_reflect::Value::I64(1 << 60),
                "raw" => prost_reflect::Value::Bytes(vec![0xff].into()),
                "state" => prost_reflect::Value::EnumNumber(1),
                "note" => prost_reflect::Value::String("hi".into()),
                "cash" => prost_reflect::Value::Bool(true),
                _ => prost_reflect::Value::default_value_for_field(&field),
            };
            value.set_field(&field, set);
        }
        let mut data = vec![0];
        data.extend(prost_reflect::prost::Message::encode_to_vec(&value));
        let full = decoded(kind, &data);
        let keys: Vec<&str> = full
            .as_object()
            .expect("object")
            .keys()
            .map(String::as_str)
            .collect();
        let expected: Vec<&str> = all.into_iter().filter(|name| *name != "card").collect();
        assert_eq!(keys, sorted(expected), "{full}");
        assert_eq!(full["total_cents"], "1152921504606846976");
        assert_eq!(full["state"], "PAID");
        assert_eq!(full["raw"], "/w==");
        assert_eq!(full["at"], "1970-01-01T00:00:00Z");
        assert_eq!(full["first"], serde_json::json!({"sku": "", "price": 0.0}));
    }

    #[test]
    fn json_schema_types_follow_properties_required_enums_and_arrays() {
        let schema = serde_json::json!({
            "type": "object",
            "properties": {
                "id": {"type": "string"},
                "qty": {"type": "integer"},
                "state": {"enum": ["NEW", "PAID", null]},
                "lines": {"type": "array", "items": {"$ref": "#/definitions/line"}},
                "tags": {"type": "object", "additionalProperties": {"type": "number"}},
                "note": {"type": ["string", "null"]},
                "extra": {"not": {}},
                "a-b": {"type": "boolean"}
            },
            "required": ["id", "qty", "lines"],
            "definitions": {
                "line": {"type": "object", "properties": {
                    "sku": {"type": "string"},
                    "next": {"$ref": "#/definitions/line"}
                }, "required": ["sku"]}
            }
        });
        let mut named = BTreeMap::new();
        assert_eq!(
            JsonSchema::new(&schema).ts_type(&schema, &mut named),
            "{\n  \"a-b\"?: boolean;\n  extra?: JsonValue;\n  id: string;\n  lines: Array<Line>;\n  note?: string | null;\n  qty: number;\n  state?: \"NEW\" | \"PAID\" | null;\n  tags?: Record<string, number>;\n}"
        );
        assert_eq!(
            named["Line"],
            "export type Line = {\n  next?: Line;\n  sku: string;\n};\n"
        );
        // The consumer writes the record as produced: what the producer's schema promises.
        let text = schema.to_string();
        let value = br#"{"id": "o-1", "qty": 2, "lines": [{"sku": "a"}]}"#;
        assert_eq!(
            decoded(SchemaKind::Json { schema: text }, value),
            serde_json::json!({"id": "o-1", "qty": 2, "lines": [{"sku": "a"}]})
        );
    }
}
