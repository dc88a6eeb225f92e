//! The manifest file as a document to edit: its JSON with every object's keys in the
//! order the file has them, so that `bootstrap` can set the values it created and write the
//! file back with the rest of it as it was (content and order; the layout is re-indented
//! with two spaces, short arrays and objects of plain values kept on one line).

use std::fmt::Write as _;

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};

/// A JSON value whose objects keep their keys in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Json {
    /// `null`, a boolean, a number or a string, as `serde_json` holds it.
    Plain(serde_json::Value),
    /// An array.
    Array(Vec<Json>),
    /// An object, its keys in order.
    Object(Vec<(String, Json)>),
}

impl Json {
    /// Parses JSON text.
    pub fn parse(text: &str) -> Result<Self, serde_json::Error> {
        serde_json::from_str(text)
    }

    /// The ordered form of a `serde_json` value (whose own key order is sorted).
    pub fn from_value(value: serde_json::Value) -> Self {
        match value {
            serde_json::Value::Array(items) => {
                Self::Array(items.into_iter().map(Self::from_value).collect())
            }
            serde_json::Value::Object(map) => Self::Object(
                map.into_iter()
                    .map(|(k, v)| (k, Self::from_value(v)))
                    .collect(),
            ),
            plain => Self::Plain(plain),
        }
    }

    /// The value at `path` (object keys), if there is one.
    pub fn get(&self, path: &[&str]) -> Option<&Self> {
        let Some((first, rest)) = path.split_first() else {
            return Some(self);
        };
        match self {
            Self::Object(entries) => entries
                .iter()
                .find(|(k, _)| k == first)
                .and_then(|(_, v)| v.get(rest)),
            _ => None,
        }
    }

    /// Sets the value at `path`, creating the objects on the way (appended at their
    /// parent's end) and keeping an existing key where it is. Returns whether anything
    /// changed. A non-object on the way is replaced by an object.
    pub fn set(&mut self, path: &[&str], value: Self) -> bool {
        let Some((first, rest)) = path.split_first() else {
            let changed = *self != value;
            *self = value;
            return changed;
        };
        if !matches!(self, Self::Object(_)) {
            *self = Self::Object(Vec::new());
        }
        let Self::Object(entries) = self else {
            return false;
        };
        if let Some((_, child)) = entries.iter_mut().find(|(k, _)| k == first) {
            return child.set(rest, value);
        }
        let mut child = Self::Object(Vec::new());
        child.set(rest, value);
        entries.push(((*first).to_owned(), child));
        true
    }

    /// Removes the key at `path`; returns whether it was there.
    pub fn remove(&mut self, path: &[&str]) -> bool {
        let Some((last, parent)) = path.split_last() else {
            return false;
        };
        let mut node = self;
        for key in parent {
            let Self::Object(entries) = node else {
                return false;
            };
            let Some((_, child)) = entries.iter_mut().find(|(k, _)| k == key) else {
                return false;
            };
            node = child;
        }
        let Self::Object(entries) = node else {
            return false;
        };
        let before = entries.len();
        entries.retain(|(k, _)| k != last);
        entries.len() != before
    }

    /// The document as text, two-space indented, ending with a newline.
    pub fn pretty(&self) -> String {
        let mut out = String::new();
        self.write(&mut out, 0);
        out.push('\n');
        out
    }

    /// One line, if the value is short and holds only plain values.
    fn inline(&self) -> Option<String> {
        const WIDTH: usize = 80;
        let line = match self {
            Self::Plain(value) => return Some(value.to_string()),
            Self::Array(items) if items.is_empty() => "[]".to_owned(),
            Self::Object(entries) if entries.is_empty() => "{}".to_owned(),
            Self::Array(items) => {
                let parts: Option<Vec<String>> = items.iter().map(Self::plain).collect();
                format!("[{}]", parts?.join(", "))
            }
            Self::Object(entries) => {
                let parts: Option<Vec<String>> = entries
                    .iter()
                    .map(|(k, v)| Some(format!("{}: {}", quoted(k), v.plain()?)))
                    .collect();
                format!("{{ {} }}", parts?.join(", "))
            }
        };
        (line.len() <= WIDTH).then_some(line)
    }

    fn plain(&self) -> Option<String> {
        match self {
            Self::Plain(value) => Some(value.to_string()),
            _ => None,
        }
    }

    fn write(&self, out: &mut String, depth: usize) {
        if let Some(line) = self.inline() {
            out.push_str(&line);
            return;
        }
        let indent = "  ".repeat(depth + 1);
        let (open, close) = match self {
            Self::Array(_) => ('[', ']'),
            _ => ('{', '}'),
        };
        out.push(open);
        let mut first = true;
        let mut item = |out: &mut String| {
            out.push_str(if first { "\n" } else { ",\n" });
            out.push_str(&indent);
            first = false;
        };
        match self {
            Self::Array(items) => {
                for value in items {
                    item(out);
                    value.write(out, depth + 1);
                }
            }
            Self::Object(entries) => {
                for (key, value) in entries {
                    item(out);
                    let _ = write!(out, "{}: ", quoted(key));
                    value.write(out, depth + 1);
                }
            }
            Self::Plain(_) => {}
        }
        out.push('\n');
        out.push_str(&"  ".repeat(depth));
        out.push(close);
    }
}

fn quoted(key: &str) -> String {
    serde_json::Value::String(key.to_owned()).to_string()
}

impl<'de> Deserialize<'de> for Json {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(JsonVisitor)
    }
}

struct JsonVisitor;

impl<'de> Visitor<'de> for JsonVisitor {
    type Value = Json;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_unit<E: de::Error>(self) -> Result<Json, E> {
        Ok(Json::Plain(serde_json::Value::Null))
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Json, E> {
        Ok(Json::Plain(v.into()))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Json, E> {
        Ok(Json::Plain(v.into()))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Json, E> {
        Ok(Json::Plain(v.into()))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Json, E> {
        Ok(Json::Plain(v.into()))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Json, E> {
        Ok(Json::Plain(v.into()))
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<Json, E> {
        Ok(Json::Plain(v.into()))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Json, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element()? {
            items.push(item);
        }
        Ok(Json::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Json, A::Error> {
        let mut entries: Vec<(String, Json)> = Vec::new();
        while let Some((key, value)) = map.next_entry::<String, Json>()? {
            // As serde_json's own maps do: a repeated key's last value counts.
            entries.retain(|(k, _)| *k != key);
            entries.push((key, value));
        }
        Ok(Json::Object(entries))
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn edits_keep_the_order_and_the_rest() {
        let text =
            r#"{"zeta": 1, "deploy": {"region": "eu-west-1", "name": "fjord"}, "alpha": [1, 2]}"#;
        let mut doc = Json::parse(text).unwrap();
        assert!(doc.set(&["deploy", "cluster"], Json::from_value(json!("fjord"))));
        assert!(!doc.set(&["deploy", "region"], Json::from_value(json!("eu-west-1"))));
        assert!(doc.set(
            &["deploy", "network", "subnets"],
            Json::from_value(json!(["subnet-1"]))
        ));
        assert!(doc.remove(&["alpha"]));
        assert!(!doc.remove(&["alpha"]));
        let written = doc.pretty();
        assert_eq!(
            written,
            "{\n  \"zeta\": 1,\n  \"deploy\": {\n    \"region\": \"eu-west-1\",\n    \"name\": \"fjord\",\n    \"cluster\": \"fjord\",\n    \"network\": {\n      \"subnets\": [\"subnet-1\"]\n    }\n  }\n}\n"
        );
        let reparsed: serde_json::Value = serde_json::from_str(&written).unwrap();
        assert_eq!(reparsed["deploy"]["network"]["subnets"][0], "subnet-1");
        assert_eq!(
            doc.get(&["deploy", "name"]),
            Some(&Json::Plain(json!("fjord")))
        );
    }

    #[test]
    fn the_shipped_example_round_trips() {
        let doc = Json::parse(fjord_config::EXAMPLE).unwrap();
        let again: serde_json::Value = serde_json::from_str(&doc.pretty()).unwrap();
        let original: serde_json::Value = serde_json::from_str(fjord_config::EXAMPLE).unwrap();
        assert_eq!(again, original);
        assert_eq!(Json::parse(&doc.pretty()).unwrap(), doc);
    }
}
