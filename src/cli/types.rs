//! `fjord types MANIFEST [ENDPOINT]`: TypeScript types for what clients of an endpoint
//! receive, from the latest schema of each of its topics' value subjects
//! (`<topic>-value`, Confluent's default naming) in the manifest's Schema Registry. Avro
//! schemas become types that follow the consumer's JSON mapping (a decimal, a date, a
//! timestamp or bytes is a string); a topic whose subject is Protobuf or JSON Schema, or has
//! no schema, is typed `JsonValue` for now. The output names one type per endpoint and an
//! `Endpoints` map for `connect<Endpoints>()` of `@fjord/client`.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use apache_avro::Schema;
use fjord::config::Manifest;
use fjord_consumer::registry::{FetchError, Registry, SchemaKind};

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
    Manifest(#[from] fjord::config::ManifestError),
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
    let mut named = BTreeMap::new();
    let mut out = String::from(
        "// Written by `fjord types` from the Schema Registry; do not edit.\nimport type { JsonValue } from \"@fjord/client\";\n",
    );
    let mut map = String::from("\nexport interface Endpoints {\n");
    for (name, config) in endpoints {
        let mut variants = Vec::new();
        for topic in &config.topics {
            let subject = format!("{topic}-value");
            let typed = match registry.latest(&subject).await {
                Ok(schema) => match &schema.kind {
                    SchemaKind::Avro { schema, references } => {
                        for reference in references {
                            ts_type(reference, &mut named);
                        }
                        ts_type(schema, &mut named)
                    }
                    _ => "JsonValue".to_owned(),
                },
                Err(FetchError::Refused(_)) => "JsonValue".to_owned(),
                Err(down) => return Err(TypesError::Registry(down)),
            };
            if !variants.contains(&typed) {
                variants.push(typed);
            }
        }
        let type_name = pascal(name.as_str()) + "Value";
        let _ = writeln!(
            out,
            "\n/** Values of endpoint `{name}`. */\nexport type {type_name} = {};",
            variants.join(" | ")
        );
        let _ = writeln!(map, "  \"{name}\": {type_name};");
    }
    for declaration in named.values() {
        out.push('\n');
        out.push_str(declaration);
    }
    out.push_str(&map);
    out.push_str("}\n");
    Ok(out)
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
}
