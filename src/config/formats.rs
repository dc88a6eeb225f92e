//! How the consumer reads a topic's keys and values (`topics`), and the Schema Registry it
//! fetches writers' schemas from (`schema_registry`): their types and their checks.

use std::path::PathBuf;

use serde::Deserialize;

use super::validate::{Problems, check_ca_at, check_topic, is_loopback, shown};
use super::{Manifest, Secret};

/// How the bytes of a key or a value are read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Format {
    /// The Confluent wire format when the bytes start with its magic byte and the registry
    /// knows their schema id, else the envelope's own rules (JSON, else text, else base64).
    /// Without a `schema_registry`, only the envelope's rules.
    #[default]
    Auto,
    /// JSON text; anything else is undecodable.
    Json,
    /// UTF-8 text, sent as a JSON string even when it parses as JSON.
    String,
    /// Any bytes, always sent as `{"base64": "..."}`.
    Bytes,
    /// Avro in the Confluent wire format.
    Avro,
    /// Protobuf in the Confluent wire format.
    Protobuf,
    /// JSON in the Confluent wire format (JSON Schema).
    JsonSchema,
}

impl Format {
    /// Whether reading this format needs the Schema Registry.
    pub fn needs_registry(self) -> bool {
        matches!(self, Self::Avro | Self::Protobuf | Self::JsonSchema)
    }
}

/// `topics.<name>`: the formats of one topic's records.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopicFormats {
    /// The values' format.
    #[serde(default)]
    pub value_format: Format,
    /// The keys' format. A decoded key is shown decoded in the envelope; `?key=` filters
    /// still match the key's bytes.
    #[serde(default)]
    pub key_format: Format,
}

/// `schema_registry`: a Confluent-compatible Schema Registry.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SchemaRegistryConfig {
    /// Base URLs of the registry's REST API, tried in order (`https://sr.internal:8081`, or
    /// with a path such as `/apis/ccompat/v7` for another registry's compatible API).
    pub urls: Vec<String>,
    /// How to authenticate; none when absent.
    #[serde(default)]
    pub auth: Option<RegistryAuth>,
    /// A CA bundle (PEM file) to trust instead of the system's.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// The same as PEM text, for where no file can be shipped.
    #[serde(default)]
    pub ca_pem: Option<String>,
    /// Most schemas kept in memory, by id.
    #[serde(default = "default_cache_schemas")]
    pub cache_schemas: usize,
}

/// `schema_registry.auth`.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum RegistryAuth {
    /// HTTP basic authentication (Confluent Cloud's API key and secret).
    Basic {
        /// The user name (an API key): not a secret.
        username: String,
        /// The variable holding the password (an API secret).
        password_env: Secret,
    },
    /// A bearer token.
    Bearer {
        /// The variable holding the token.
        token_env: Secret,
    },
}

fn default_cache_schemas() -> usize {
    1000
}

impl Manifest {
    /// The formats of `topic`'s records; `auto` for a topic the manifest does not name.
    pub fn topic_formats(&self, topic: &str) -> TopicFormats {
        self.topics.get(topic).copied().unwrap_or_default()
    }

    /// The registry's secrets, for [`Manifest::secrets`].
    pub(super) fn registry_secrets(&self) -> Option<(&Secret, &'static str)> {
        match self.schema_registry.as_ref()?.auth.as_ref()? {
            RegistryAuth::Basic { password_env, .. } => {
                Some((password_env, "$.schema_registry.auth.password_env"))
            }
            RegistryAuth::Bearer { token_env } => {
                Some((token_env, "$.schema_registry.auth.token_env"))
            }
        }
    }

    pub(super) fn validate_formats(&self, p: &mut Problems) {
        let consumed: Vec<&str> = self
            .consumer_groups
            .iter()
            .flat_map(|group| group.topics.iter().map(String::as_str))
            .collect();
        for (topic, formats) in &self.topics {
            let path = format!("$.topics.{topic}");
            if !check_topic(p, &path, topic) {
                continue;
            }
            p.require(
                consumed.contains(&topic.as_str()),
                &path,
                format!("no consumer group reads {topic:?}"),
            );
            for (format, field) in [
                (formats.value_format, "value_format"),
                (formats.key_format, "key_format"),
            ] {
                p.require(
                    !format.needs_registry() || self.schema_registry.is_some(),
                    format!("{path}.{field}"),
                    "needs a schema_registry section to fetch the writers' schemas from",
                );
            }
        }
        let Some(registry) = &self.schema_registry else {
            return;
        };
        p.require(
            !registry.urls.is_empty(),
            "$.schema_registry.urls",
            "needs at least one URL",
        );
        for (i, url) in registry.urls.iter().enumerate() {
            check_registry_url(
                p,
                &format!("$.schema_registry.urls[{i}]"),
                url,
                registry.auth.is_some(),
            );
        }
        if let Some(RegistryAuth::Basic { username, .. }) = &registry.auth {
            p.require(
                !username.is_empty() && !username.contains(':'),
                "$.schema_registry.auth.username",
                "must be non-empty and without ':' (HTTP basic authentication's separator)",
            );
        }
        p.require(
            (1..=1_000_000).contains(&registry.cache_schemas),
            "$.schema_registry.cache_schemas",
            "must be 1 to 1000000",
        );
        check_ca_at(
            p,
            "$.schema_registry",
            registry.ca_file.as_ref(),
            registry.ca_pem.as_deref(),
        );
    }
}

/// An `http(s)://` base URL without credentials, query or fragment. Credentials go over
/// plain `http://` only to a loopback host: anyone on the way could read them.
fn check_registry_url(p: &mut Problems, path: &str, url: &str, credentials: bool) {
    let parsed = match url::Url::parse(url) {
        Ok(parsed) => parsed,
        Err(error) => {
            p.add(path, format!("{} is not a URL: {error}", shown(url)));
            return;
        }
    };
    if !p.require(
        parsed.username().is_empty() && parsed.password().is_none(),
        path,
        "must not carry credentials; use schema_registry.auth, whose secret comes from the environment",
    ) {
        return;
    }
    p.require(
        matches!(parsed.scheme(), "http" | "https"),
        path,
        format!("{url:?} is not an http:// or https:// URL"),
    );
    p.require(
        parsed.query().is_none() && parsed.fragment().is_none(),
        path,
        "takes no query or fragment",
    );
    p.require(
        !credentials || parsed.scheme() == "https" || is_loopback(&parsed),
        path,
        format!(
            "{url:?} is plain http://, which shows the registry's credentials to anyone on the way; use https:// (http:// with auth is allowed only for loopback hosts)"
        ),
    );
}

#[cfg(test)]
mod tests {
    use super::super::validate::tests::{accepted, error_of, minimal};
    use super::*;

    fn with(topics: serde_json::Value, registry: serde_json::Value) -> serde_json::Value {
        let mut value = minimal();
        value["topics"] = topics;
        if !registry.is_null() {
            value["schema_registry"] = registry;
        }
        value
    }

    #[test]
    fn a_topic_not_named_is_auto_and_named_ones_keep_their_formats() {
        let manifest = accepted(&with(
            serde_json::json!({"orders": {"value_format": "protobuf", "key_format": "string"}}),
            serde_json::json!({"urls": ["http://127.0.0.1:8081/apis/ccompat/v7"]}),
        ));
        assert_eq!(
            manifest.topic_formats("orders"),
            TopicFormats {
                value_format: Format::Protobuf,
                key_format: Format::String
            }
        );
        assert_eq!(manifest.topic_formats("other"), TopicFormats::default());
        assert_eq!(TopicFormats::default().value_format, Format::Auto);
        let registry = manifest.schema_registry.expect("a registry");
        assert_eq!(registry.cache_schemas, 1000);
        assert!(registry.auth.is_none());
        // Without a registry, the formats that need none are fine.
        accepted(&with(
            serde_json::json!({"orders": {"value_format": "bytes", "key_format": "json"}}),
            serde_json::Value::Null,
        ));
    }

    #[test]
    fn mistakes_name_their_paths() {
        let registry = serde_json::json!({"urls": ["https://sr.internal"]});
        for (topics, registry, expected) in [
            (
                serde_json::json!({"orders": {"value_format": "avro"}}),
                serde_json::Value::Null,
                "$.topics.orders.value_format: needs a schema_registry",
            ),
            (
                serde_json::json!({"orders": {"key_format": "json_schema"}}),
                serde_json::Value::Null,
                "$.topics.orders.key_format: needs a schema_registry",
            ),
            (
                serde_json::json!({"payments": {}}),
                registry.clone(),
                "$.topics.payments: no consumer group reads",
            ),
            (
                serde_json::json!({"orders": {"value_format": "xml"}}),
                registry,
                "$.topics.orders.value_format: unknown variant, expected one of",
            ),
            (
                serde_json::json!({}),
                serde_json::json!({"urls": []}),
                "$.schema_registry.urls: needs at least one URL",
            ),
            (
                serde_json::json!({}),
                serde_json::json!({"urls": ["https://u:p@sr.internal"]}),
                "$.schema_registry.urls[0]: must not carry credentials",
            ),
            (
                serde_json::json!({}),
                serde_json::json!({"urls": ["ftp://sr.internal"]}),
                "$.schema_registry.urls[0]: \"ftp://sr.internal\" is not an http:// or https:// URL",
            ),
            (
                serde_json::json!({}),
                serde_json::json!({"urls": ["https://sr.internal", "http://sr.internal:8081"],
                    "auth": {"type": "bearer", "token_env": "SR_TOKEN"}}),
                "$.schema_registry.urls[1]: \"http://sr.internal:8081\" is plain http://",
            ),
            (
                serde_json::json!({}),
                serde_json::json!({"urls": ["https://sr.internal"],
                    "auth": {"type": "basic", "username": "u", "password_env": "the secret"}}),
                "$.schema_registry.auth.password_env: is not an environment variable name (letters, digits and '_'; the value is not shown",
            ),
            (
                serde_json::json!({}),
                serde_json::json!({"urls": ["https://sr.internal"],
                    "auth": {"type": "basic", "username": "a:b", "password_env": "P"}}),
                "$.schema_registry.auth.username: must be non-empty",
            ),
            (
                serde_json::json!({}),
                serde_json::json!({"urls": ["https://sr.internal"], "ca_pem": "x", "ca_file": "ca.pem"}),
                "$.schema_registry: give the CA as ca_pem or as ca_file, not both",
            ),
            (
                serde_json::json!({}),
                serde_json::json!({"urls": ["https://sr.internal"], "ca_pem": "not pem"}),
                "$.schema_registry.ca_pem: not PEM certificates",
            ),
            (
                serde_json::json!({}),
                serde_json::json!({"urls": ["https://sr.internal"], "cache_schemas": 0}),
                "$.schema_registry.cache_schemas: must be 1 to 1000000",
            ),
        ] {
            let error = error_of(&with(topics, registry));
            assert!(error.contains(expected), "{error}\nexpected: {expected}");
        }
    }

    #[test]
    fn credentials_may_go_over_plain_http_to_a_loopback_registry_only() {
        let manifest = accepted(&with(
            serde_json::json!({}),
            serde_json::json!({"urls": ["http://localhost:8081", "http://[::1]:8081"],
                "auth": {"type": "basic", "username": "u", "password_env": "SR_PASSWORD"}}),
        ));
        let secrets: Vec<(&str, &str)> = manifest
            .secrets()
            .iter()
            .map(|named| (named.secret.env_name(), named.path))
            .collect();
        assert_eq!(
            secrets,
            [("SR_PASSWORD", "$.schema_registry.auth.password_env")]
        );
    }
}
