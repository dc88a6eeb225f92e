//! The manifest: one `manifest.json` read by every binary, parsed into typed structs and
//! validated here, at the boundary, so that the rest of the code trusts what it is given.
//! Every error names the JSON path of the offending value. Secrets never live in the file:
//! the manifest names environment variables, and [`Secret`] reads them at start.

mod formats;
mod validate;

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

pub use fjord_filter::{Filter, FilterError, Limits};
pub use formats::{Format, RegistryAuth, SchemaRegistryConfig, TopicFormats};
pub use validate::{ManifestError, Problem, without_values};

/// The JSON Schema shipped beside every manifest, for editors.
pub const SCHEMA: &str = include_str!("manifest.schema.json");
/// The environment variable that may hold the whole manifest, instead of a file.
pub const MANIFEST_JSON_ENV: &str = "FJORD_MANIFEST_JSON";

/// A complete example manifest, also used by `fjord setup` as its skeleton.
pub const EXAMPLE: &str = include_str!("manifest.example.json");

/// A validated manifest.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// The schema reference editors use; ignored.
    #[serde(rename = "$schema", default)]
    pub schema: Option<String>,
    /// Where the Kafka records come from.
    pub kafka: KafkaConfig,
    /// The bus between consumers and servers.
    pub redis: RedisConfig,
    /// What clients can stream, by name.
    pub endpoints: BTreeMap<EndpointName, EndpointConfig>,
    /// The Kafka consumer groups that feed the bus.
    pub consumer_groups: Vec<ConsumerGroupConfig>,
    /// The HTTP server.
    #[serde(default)]
    pub server: ServerConfig,
    /// Who may stream what.
    pub auth: AuthConfig,
    /// The formats of the topics' keys and values, by topic; `auto` for a topic not named.
    #[serde(default)]
    pub topics: BTreeMap<String, TopicFormats>,
    /// Where Avro, Protobuf and JSON Schema records' schemas come from.
    #[serde(default)]
    pub schema_registry: Option<SchemaRegistryConfig>,
    /// Everything AWS; read and validated by `fjord-deploy`, ignored by the runtime.
    #[serde(default)]
    pub deploy: Option<serde_json::Value>,
}

impl Manifest {
    /// Reads, parses and validates the manifest at `path`.
    pub fn load(path: &Path) -> Result<Self, ManifestError> {
        let text = std::fs::read_to_string(path).map_err(|source| ManifestError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text).map_err(|error| error.in_file(path))
    }

    /// Reads the manifest from `FJORD_MANIFEST_JSON` when that variable holds one (how ECS
    /// tasks get it), else from the file at `path`.
    pub fn load_from_env_or(path: &Path) -> Result<Self, ManifestError> {
        match std::env::var(MANIFEST_JSON_ENV) {
            Ok(text) if !text.trim().is_empty() => {
                Self::parse(&text).map_err(|error| error.in_file(Path::new(MANIFEST_JSON_ENV)))
            }
            _ => Self::load(path),
        }
    }

    /// Parses and validates a manifest from its JSON text. A refused manifest's error lists
    /// every problem found, each with its JSON path, and quotes no value that may be a
    /// secret.
    pub fn parse(text: &str) -> Result<Self, ManifestError> {
        let mut deserializer = serde_json::Deserializer::from_str(text);
        let parsed = serde_path_to_error::deserialize::<_, Self>(&mut deserializer)
            .map_err(|error| (json_path(&error.path().to_string()), error.into_inner()))
            .and_then(|manifest| {
                deserializer.end().map_err(|error| ("$".into(), error))?;
                Ok(manifest)
            });
        let manifest = parsed.map_err(|(path, error)| {
            // serde stops at the first mistake; each section on its own says what else
            // is wrong.
            let mut problems = serde_json::from_str(text)
                .map(|value| structural_problems(&value))
                .unwrap_or_default();
            if problems.is_empty() {
                problems.push(Problem {
                    path,
                    message: without_values(&error.to_string()),
                });
            }
            ManifestError::Problems {
                file: None,
                problems,
            }
        })?;
        manifest.validate()?;
        Ok(manifest)
    }

    /// The address the server listens on: `server.host` when the manifest gives one, else
    /// every interface behind access control and only loopback without it, so that a
    /// manifest with `auth` disabled opens its streams to the network only when it says so.
    pub fn server_host(&self) -> std::net::IpAddr {
        self.server.host.unwrap_or(match self.auth {
            AuthConfig::Disabled => std::net::Ipv4Addr::LOCALHOST.into(),
            AuthConfig::Jwt(_) => std::net::Ipv4Addr::UNSPECIFIED.into(),
        })
    }

    /// The endpoints that stream records of `topic`.
    pub fn endpoints_of_topic<'a>(
        &'a self,
        topic: &'a str,
    ) -> impl Iterator<Item = &'a EndpointName> {
        self.endpoints
            .iter()
            .filter(move |(_, endpoint)| endpoint.topics.iter().any(|t| t == topic))
            .map(|(name, _)| name)
    }

    /// The consumer group with this id.
    pub fn consumer_group(&self, id: &str) -> Option<&ConsumerGroupConfig> {
        self.consumer_groups.iter().find(|group| group.id == id)
    }

    /// Every secret the manifest names, with the JSON path that names it and the
    /// processes that read it. This is the one list of them: validation checks their
    /// names, and `fjord-deploy` maps each to an ARN and hands it to its readers only, so
    /// a secret field added to the manifest must be added here or it is never deployed.
    pub fn secrets(&self) -> Vec<NamedSecret<'_>> {
        const CONSUMER: &[Process] = &[Process::Consumer];
        const SERVER: &[Process] = &[Process::Server];
        const BOTH: &[Process] = &[Process::Server, Process::Consumer];
        let named = |secret, path, readers| NamedSecret {
            secret,
            path,
            readers,
        };
        let mut secrets = Vec::new();
        if let Some(password) = &self.redis.password_env {
            secrets.push(named(password, "$.redis.password_env", BOTH));
        }
        match &self.kafka.security {
            KafkaSecurity::None => {}
            KafkaSecurity::SaslPlain(sasl)
            | KafkaSecurity::SaslScramSha256(sasl)
            | KafkaSecurity::SaslScramSha512(sasl) => {
                secrets.push(named(
                    &sasl.password_env,
                    "$.kafka.security.password_env",
                    CONSUMER,
                ));
            }
            KafkaSecurity::Ssl(tls) => {
                if let Some(key) = &tls.key_pem_env {
                    secrets.push(named(key, "$.kafka.security.key_pem_env", CONSUMER));
                }
                if let Some(password) = &tls.key_password_env {
                    secrets.push(named(
                        password,
                        "$.kafka.security.key_password_env",
                        CONSUMER,
                    ));
                }
            }
        }
        if let AuthConfig::Jwt(jwt) = &self.auth
            && let Some(shared) = &jwt.hs256_secret_env
        {
            secrets.push(named(shared, "$.auth.hs256_secret_env", SERVER));
        }
        if let Some((secret, path)) = self.registry_secrets() {
            secrets.push(named(secret, path, CONSUMER));
        }
        secrets
    }

    /// Every setting that names a file, with its JSON path and the form that needs no
    /// file. Files suit a developer's machine; an image's read-only file system has none
    /// of them, so `fjord-deploy` refuses these.
    pub fn file_settings(&self) -> Vec<FileSetting> {
        let mut files = Vec::new();
        let mut add = |file: &Option<PathBuf>, path: String, instead: &'static str| {
            if let Some(file) = file {
                files.push(FileSetting {
                    path,
                    file: file.clone(),
                    instead,
                });
            }
        };
        const CA: &str = "ca_pem, the CA certificates as PEM text (certificates are public)";
        match &self.kafka.security {
            KafkaSecurity::None => {}
            KafkaSecurity::SaslPlain(sasl)
            | KafkaSecurity::SaslScramSha256(sasl)
            | KafkaSecurity::SaslScramSha512(sasl) => {
                add(&sasl.ca_file, "$.kafka.security.ca_file".into(), CA);
            }
            KafkaSecurity::Ssl(tls) => {
                add(&tls.ca_file, "$.kafka.security.ca_file".into(), CA);
                add(
                    &tls.cert_file,
                    "$.kafka.security.cert_file".into(),
                    "cert_pem, the client certificate as PEM text (certificates are public)",
                );
                add(
                    &tls.key_file,
                    "$.kafka.security.key_file".into(),
                    "key_pem_env, the variable that holds the private key as PEM text, mapped to its secret in deploy.secrets",
                );
            }
        }
        if let AuthConfig::Jwt(jwt) = &self.auth {
            for (i, key) in jwt.keys.iter().enumerate() {
                add(
                    &key.pem_file,
                    format!("$.auth.keys[{i}].pem_file"),
                    "pem, the public key as PEM text",
                );
            }
        }
        if let Some(registry) = &self.schema_registry {
            add(&registry.ca_file, "$.schema_registry.ca_file".into(), CA);
        }
        files
    }
}

/// A deployed process, as far as what it reads is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Process {
    /// `fjord-server`.
    Server,
    /// `fjord-consumer`.
    Consumer,
}

/// A secret the manifest names; see [`Manifest::secrets`].
#[derive(Debug, Clone, Copy)]
pub struct NamedSecret<'a> {
    /// The environment variable.
    pub secret: &'a Secret,
    /// The JSON path of the field that names it.
    pub path: &'static str,
    /// The processes that read it.
    pub readers: &'static [Process],
}

/// A setting that names a file; see [`Manifest::file_settings`].
#[derive(Debug, Clone)]
pub struct FileSetting {
    /// The JSON path of the setting.
    pub path: String,
    /// The file it names.
    pub file: PathBuf,
    /// The setting to use where there are no files.
    pub instead: &'static str,
}

/// Every mistake of form serde finds in `value`, section by section (and endpoint by
/// endpoint, group by group), with its JSON path and without the values.
fn structural_problems(value: &serde_json::Value) -> Vec<Problem> {
    fn check<T: serde::de::DeserializeOwned>(
        value: &serde_json::Value,
        base: &str,
        problems: &mut Vec<Problem>,
    ) {
        if let Err(error) = serde_path_to_error::deserialize::<_, T>(value) {
            let inner = error.path().to_string();
            let path = match inner.as_str() {
                "." | "" => base.to_owned(),
                inner if inner.starts_with('[') => format!("{base}{inner}"),
                inner => format!("{base}.{inner}"),
            };
            problems.push(Problem {
                path,
                message: without_values(&error.into_inner().to_string()),
            });
        }
    }
    let mut problems = Vec::new();
    let Some(sections) = value.as_object() else {
        check::<Manifest>(value, "$", &mut problems);
        return problems;
    };
    for required in ["kafka", "redis", "endpoints", "consumer_groups", "auth"] {
        if !sections.contains_key(required) {
            problems.push(Problem {
                path: "$".into(),
                message: format!("missing field `{required}`"),
            });
        }
    }
    for (name, section) in sections {
        let path = format!("$.{name}");
        let problems = &mut problems;
        match (name.as_str(), section) {
            ("$schema", _) => check::<Option<String>>(section, &path, problems),
            ("kafka", _) => check::<KafkaConfig>(section, &path, problems),
            ("redis", _) => check::<RedisConfig>(section, &path, problems),
            ("endpoints", serde_json::Value::Object(endpoints)) => {
                for (endpoint, config) in endpoints {
                    let path = format!("{path}.{endpoint}");
                    if let Err(message) = EndpointName::try_from(endpoint.clone()) {
                        problems.push(Problem {
                            path: path.clone(),
                            message,
                        });
                    }
                    check::<EndpointConfig>(config, &path, problems);
                }
            }
            ("consumer_groups", serde_json::Value::Array(groups)) => {
                for (i, group) in groups.iter().enumerate() {
                    check::<ConsumerGroupConfig>(group, &format!("{path}[{i}]"), problems);
                }
            }
            ("endpoints", _) => check::<BTreeMap<EndpointName, EndpointConfig>>(section, &path, problems),
            ("consumer_groups", _) => check::<Vec<ConsumerGroupConfig>>(section, &path, problems),
            ("server", _) => check::<ServerConfig>(section, &path, problems),
            ("auth", _) => check::<AuthConfig>(section, &path, problems),
            ("topics", _) => check::<BTreeMap<String, TopicFormats>>(section, &path, problems),
            ("schema_registry", _) => {
                check::<Option<SchemaRegistryConfig>>(section, &path, problems);
            }
            ("deploy", _) => {}
            _ => problems.push(Problem {
                path: "$".into(),
                message: format!(
                    "unknown field `{name}`, expected one of `$schema`, `kafka`, `redis`, `endpoints`, `consumer_groups`, `server`, `auth`, `topics`, `schema_registry`, `deploy`"
                ),
            }),
        }
    }
    problems
}

/// Turns serde_path_to_error's `a.b[0].c` into a JSON path, `$.a.b[0].c`.
fn json_path(path: &str) -> String {
    if path == "." || path.is_empty() {
        "$".into()
    } else {
        format!("$.{path}")
    }
}

/// An endpoint's name: what clients put in the URL and what SSE events are named.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(try_from = "String")]
pub struct EndpointName(String);

impl EndpointName {
    /// The name as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for EndpointName {
    type Error = String;

    fn try_from(name: String) -> Result<Self, Self::Error> {
        let valid_char = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '_';
        let reserved = name.starts_with("fjord");
        if name.is_empty() || name.len() > 64 || !name.chars().all(valid_char) || reserved {
            return Err(format!(
                "endpoint name {name:?} must be 1 to 64 characters of a-z, A-Z, 0-9, '-' or '_' and must not start with \"fjord\""
            ));
        }
        Ok(Self(name))
    }
}

impl fmt::Display for EndpointName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The name of an environment variable that holds a secret. Reading it is deferred to
/// [`Secret::read`], so that a manifest can be validated where the secret is not set.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret {
    env: String,
}

impl Secret {
    /// Names the environment variable `env`.
    pub fn from_env(env: impl Into<String>) -> Self {
        Self { env: env.into() }
    }

    /// The variable's name, safe to log.
    pub fn env_name(&self) -> &str {
        &self.env
    }

    /// Reads the secret from the environment, whatever its length: a reader that needs
    /// a minimum checks it (the HS256 secret, in `auth`), while a Redis or Kafka password
    /// is whatever the service was given.
    pub fn read(&self) -> Result<String, ManifestError> {
        std::env::var(&self.env).map_err(|_| ManifestError::MissingSecret {
            env: self.env.clone(),
        })
    }
}

/// `kafka`: brokers and how to reach them.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaConfig {
    /// Bootstrap brokers, `host:port`.
    pub brokers: Vec<String>,
    /// Authentication and encryption.
    #[serde(default)]
    pub security: KafkaSecurity,
}

/// `kafka.security`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(tag = "protocol", rename_all = "snake_case", deny_unknown_fields)]
pub enum KafkaSecurity {
    /// Plaintext, no authentication.
    #[default]
    None,
    /// SASL/PLAIN.
    SaslPlain(SaslCredentials),
    /// SASL/SCRAM-SHA-256.
    #[serde(rename = "sasl_scram_sha_256")]
    SaslScramSha256(SaslCredentials),
    /// SASL/SCRAM-SHA-512.
    #[serde(rename = "sasl_scram_sha_512")]
    SaslScramSha512(SaslCredentials),
    /// TLS, optionally with a client certificate.
    Ssl(TlsSettings),
}

/// Credentials of a SASL mechanism.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SaslCredentials {
    /// The SASL user name.
    pub username: String,
    /// The environment variable holding the password.
    pub password_env: Secret,
    /// Whether the SASL listener is behind TLS (`SASL_SSL`); true unless said otherwise.
    #[serde(default = "default_true")]
    pub tls: bool,
    /// A CA bundle (PEM file) to trust instead of the system's, for `tls`.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// The same as PEM text, for where no file can be shipped (an ECS task).
    #[serde(default)]
    pub ca_pem: Option<String>,
}

/// `kafka.security` for `protocol: ssl`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSettings {
    /// A CA bundle (PEM file) to trust instead of the system's.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// The same as PEM text.
    #[serde(default)]
    pub ca_pem: Option<String>,
    /// A client certificate (PEM file) for mutual TLS.
    #[serde(default)]
    pub cert_file: Option<PathBuf>,
    /// The same as PEM text: a certificate is public, so it may sit in the manifest.
    #[serde(default)]
    pub cert_pem: Option<String>,
    /// The client certificate's private key (PEM file).
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    /// The environment variable holding the private key as PEM text: a key is a secret,
    /// so where no file can be shipped it comes from the environment, never the manifest.
    #[serde(default)]
    pub key_pem_env: Option<Secret>,
    /// The environment variable holding the private key's password, if it has one.
    #[serde(default)]
    pub key_password_env: Option<Secret>,
}

/// `redis`: the bus.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisConfig {
    /// `redis://host:port[/db]` or `rediss://` for TLS; no credentials in it.
    pub url: String,
    /// The ACL user to authenticate as; Redis's `default` user when absent. A user name
    /// is not a secret, so it is written here rather than read from the environment.
    #[serde(default)]
    pub username: Option<String>,
    /// The environment variable holding the Redis password (or the ACL user's password).
    #[serde(default)]
    pub password_env: Option<Secret>,
    /// Prefix of every key Fjord writes, so that several deployments can share a Redis.
    #[serde(default = "default_key_prefix")]
    pub key_prefix: String,
    /// Present when the bus is a Redis Cluster (ElastiCache cluster mode): `url` is then one
    /// seed node (or the configuration endpoint) and the rest are discovered.
    #[serde(default)]
    pub cluster: Option<RedisClusterConfig>,
    /// When present, the consumer stores a record's Kafka offset only once this many
    /// replicas hold it too (`WAIT`), so promoting a replica loses nothing committed.
    #[serde(default)]
    pub commit_after_replicas: Option<ReplicaAcks>,
}

/// `redis.cluster`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisClusterConfig {
    /// More seed nodes besides `redis.url`, in the same form.
    #[serde(default)]
    pub seed_urls: Vec<String>,
    /// Where servers read the live streams from.
    #[serde(default)]
    pub read_from: ReadFrom,
}

/// `redis.cluster.read_from`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReadFrom {
    /// Each stream's primary.
    #[default]
    Primary,
    /// A replica of each stream's shard, the primary when it has none reachable: every
    /// server reads every record, so this takes that egress off the primaries.
    Replica,
}

/// `redis.commit_after_replicas`.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplicaAcks {
    /// How many replicas must hold a record before its offset is committed.
    pub count: u32,
    /// How long one `WAIT` waits; a publish acknowledged by fewer replicas is retried.
    #[serde(default = "default_replica_ack_timeout_ms")]
    pub timeout_ms: u64,
}

fn default_replica_ack_timeout_ms() -> u64 {
    1000
}

/// `endpoints.<name>`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointConfig {
    /// The Kafka topics whose records this endpoint streams.
    pub topics: Vec<String>,
    /// Where a connection without a resume id starts.
    #[serde(default)]
    pub start: StartPosition,
    /// How much of the stream the bus keeps for resuming clients.
    #[serde(default)]
    pub retention: Retention,
    /// A filter every connection to this endpoint gets, ANDed with the token's and the
    /// query's (docs/filters.md); `None` for every record.
    #[serde(default)]
    pub filter: Option<String>,
    /// Whether the endpoint is a stream of records or a table of the latest one per key.
    #[serde(default)]
    pub mode: EndpointMode,
    /// The bounds of a table endpoint's rows; only with `mode: "table"`.
    #[serde(default)]
    pub table: Option<TableBounds>,
}

/// `endpoints.<name>.mode`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EndpointMode {
    /// Records in order; a connection starts live, at the oldest, or where it left off.
    #[default]
    Stream,
    /// The latest record per key as rows (a tombstone deletes its key): a connection gets
    /// the current rows as a snapshot, then the records after it.
    Table,
}

/// `endpoints.<name>.table`: how many rows a table endpoint keeps on the bus. A record of a
/// key the table lacks is not made a row once either bound is reached (it still streams);
/// the keys it has are always updated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TableBounds {
    /// At most this many keys.
    #[serde(default = "default_max_keys")]
    pub max_keys: u64,
    /// About the most bytes of keys and rows.
    #[serde(default = "default_max_table_bytes")]
    pub max_bytes: u64,
}

impl Default for TableBounds {
    fn default() -> Self {
        Self {
            max_keys: default_max_keys(),
            max_bytes: default_max_table_bytes(),
        }
    }
}

fn default_max_keys() -> u64 {
    100_000
}

fn default_max_table_bytes() -> u64 {
    256 * 1024 * 1024
}

/// What the bus keeps of one endpoint: its stream's window, and for a table endpoint, its
/// rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Keeping {
    /// The stream's retention.
    pub retention: Retention,
    /// The table's bounds; `None` for a stream endpoint.
    pub table: Option<TableBounds>,
}

/// A stream endpoint's.
impl From<Retention> for Keeping {
    fn from(retention: Retention) -> Self {
        Self {
            retention,
            table: None,
        }
    }
}

impl EndpointConfig {
    /// What the bus keeps of the endpoint.
    pub fn keeping(&self) -> Keeping {
        Keeping {
            retention: self.retention,
            table: (self.mode == EndpointMode::Table).then(|| self.table.unwrap_or_default()),
        }
    }

    /// The endpoint's filter compiled within `limits`; checked when the manifest is loaded.
    pub fn filter(&self, limits: &Limits) -> Result<Option<Filter>, FilterError> {
        self.filter
            .as_deref()
            .map(|source| Filter::compile(source, limits))
            .transpose()
    }
}

/// Where a new connection without a resume id starts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StartPosition {
    /// Only records that arrive after the connection opened.
    #[default]
    Live,
    /// The oldest record still in the retention window.
    Oldest,
}

/// `endpoints.<name>.retention`: the replay window kept on the bus.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Retention {
    /// At most this many records (trimmed approximately, never below this).
    #[serde(default = "default_max_records")]
    pub max_records: u64,
    /// Records older than this many seconds are dropped.
    #[serde(default = "default_max_age_secs")]
    pub max_age_secs: u64,
}

impl Default for Retention {
    fn default() -> Self {
        Self {
            max_records: default_max_records(),
            max_age_secs: default_max_age_secs(),
        }
    }
}

/// `consumer_groups[]`: one Kafka consumer group; each member is one `fjord-consumer`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsumerGroupConfig {
    /// The Kafka `group.id`.
    pub id: String,
    /// The topics this group consumes.
    pub topics: Vec<String>,
    /// How many members (processes) the group runs.
    #[serde(default = "default_members")]
    pub members: u32,
    /// Where a group without committed offsets starts reading.
    #[serde(default)]
    pub offset_reset: OffsetReset,
}

/// Where a consumer group without committed offsets starts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OffsetReset {
    /// The oldest record in each partition.
    Earliest,
    /// Only records produced after the group first joined.
    #[default]
    Latest,
}

/// `server`: the HTTP tier.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// The TCP port to listen on.
    #[serde(default = "default_port")]
    pub port: u16,
    /// The address to listen on; see [`Manifest::server_host`] for the default.
    #[serde(default)]
    pub host: Option<std::net::IpAddr>,
    /// Seconds between heartbeat comments; below every load balancer's idle timeout.
    #[serde(default = "default_heartbeat_secs")]
    pub heartbeat_secs: u64,
    /// Milliseconds a client waits before reconnecting (`retry:`).
    #[serde(default = "default_retry_ms")]
    pub retry_ms: u64,
    /// Origins allowed by CORS; `["*"]` allows any.
    #[serde(default)]
    pub cors_origins: Vec<String>,
    /// Events queued for one client before it counts as too slow and is disconnected: room
    /// for a burst of many bus reads (512 entries each) that a client keeps up with. One
    /// that stopped reading is found out sooner, by `client_max_lag_ms`.
    #[serde(default = "default_client_queue")]
    pub client_queue: usize,
    /// MiB of events (their SSE text, shared with the other connections that get them)
    /// queued for one client before it counts as too slow: whatever the records' size, a
    /// slow client holds no more than this in memory. An event larger than it alone still
    /// goes to a client that keeps up.
    #[serde(default = "default_client_queue_mib")]
    pub client_queue_mib: u64,
    /// Milliseconds an event may wait in a client's queue; a client whose oldest queued
    /// event waited longer is too slow, and is disconnected so that the others keep up.
    #[serde(default = "default_client_max_lag_ms")]
    pub client_max_lag_ms: u64,
    /// Most open streams on one server; `None` derives it from the open-file limit, keeping
    /// descriptors in reserve for health checks, metrics and the bus.
    #[serde(default)]
    pub max_connections: Option<usize>,
    /// Most open streams from one client address; `None` for no such limit.
    #[serde(default)]
    pub max_connections_per_address: Option<usize>,
    /// Most open streams for one token subject (`sub`); `None` for no such limit.
    #[serde(default)]
    pub max_connections_per_subject: Option<usize>,
    /// MiB that the key filters of all streams may take together, counted once per distinct
    /// set of keys however many streams and endpoints share it; a stream with a new set past
    /// it is refused with a 503.
    #[serde(default = "default_key_filter_memory_mib")]
    pub key_filter_memory_mib: u64,
    /// How long and deep the filters and field lists of queries, tokens and endpoints may be.
    #[serde(default)]
    pub filter_limits: Limits,
    /// Most distinct views (filter and field list) the streams of one server may ask for at
    /// once; connections that ask for the same one share it. A stream with a new one past it
    /// is refused with a 503.
    #[serde(default = "default_max_distinct_filters")]
    pub max_distinct_filters: usize,
    /// Whether a client's address is the last entry of `X-Forwarded-For` (what a load
    /// balancer in front appends) rather than the connection's peer, for the per-address limit.
    #[serde(default)]
    pub trust_forwarded_for: bool,
    /// A separate listener for `/metrics` (and the health routes), for a scraper inside the
    /// network; without it `/metrics` is served on the public port.
    #[serde(default)]
    pub metrics_listener: Option<MetricsListener>,
    /// Milliseconds an event may wait in the queues of live connections before the server
    /// counts as overloaded (when enough connections are that far behind): it then sheds
    /// the connections furthest behind and refuses new streams until it keeps up. 0 never
    /// sheds.
    #[serde(default = "default_overload_wait_ms")]
    pub overload_wait_ms: u64,
    /// Whether streams are sent compressed (gzip, else deflate) to clients whose
    /// `Accept-Encoding` allows it. Off unless asked for: a proxy in front that buffers
    /// compressed responses would hold events back.
    #[serde(default)]
    pub compression: bool,
}

/// `server.metrics_listener`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsListener {
    /// The address to listen on.
    #[serde(default = "default_host")]
    pub host: std::net::IpAddr,
    /// The TCP port.
    pub port: u16,
    /// Whether `/metrics` is still served on the public port as well.
    #[serde(default)]
    pub keep_on_public_port: bool,
}

impl ServerConfig {
    /// The heartbeat interval.
    pub fn heartbeat(&self) -> Duration {
        Duration::from_secs(self.heartbeat_secs)
    }

    /// How long an event may wait in a client's queue.
    pub fn client_max_lag(&self) -> Duration {
        Duration::from_millis(self.client_max_lag_ms)
    }

    /// How long events may wait in live connections' queues before the server sheds some;
    /// `None` when it never does.
    pub fn overload_wait(&self) -> Option<Duration> {
        (self.overload_wait_ms > 0).then(|| Duration::from_millis(self.overload_wait_ms))
    }

    /// The bytes of events one client's queue holds at most.
    pub fn client_queue_bytes(&self) -> usize {
        usize::try_from(self.client_queue_mib.saturating_mul(1024 * 1024)).unwrap_or(usize::MAX)
    }

    /// What the key filters of all streams may take together, in bytes.
    pub fn key_filter_memory(&self) -> usize {
        usize::try_from(self.key_filter_memory_mib.saturating_mul(1024 * 1024))
            .unwrap_or(usize::MAX)
    }

    /// Whether the public port serves `/metrics`.
    pub fn metrics_on_public_port(&self) -> bool {
        self.metrics_listener
            .as_ref()
            .is_none_or(|listener| listener.keep_on_public_port)
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            port: default_port(),
            host: None,
            heartbeat_secs: default_heartbeat_secs(),
            retry_ms: default_retry_ms(),
            cors_origins: Vec::new(),
            client_queue: default_client_queue(),
            client_queue_mib: default_client_queue_mib(),
            client_max_lag_ms: default_client_max_lag_ms(),
            max_connections: None,
            max_connections_per_address: None,
            max_connections_per_subject: None,
            key_filter_memory_mib: default_key_filter_memory_mib(),
            filter_limits: Limits::default(),
            max_distinct_filters: default_max_distinct_filters(),
            trust_forwarded_for: false,
            metrics_listener: None,
            overload_wait_ms: default_overload_wait_ms(),
            compression: false,
        }
    }
}

/// `auth`: access control.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "mode", rename_all = "snake_case", deny_unknown_fields)]
pub enum AuthConfig {
    /// No access control: every endpoint is open to anyone. Must be said explicitly.
    Disabled,
    /// Every stream needs a JWT.
    Jwt(JwtConfig),
}

/// `auth` with `mode: jwt`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtConfig {
    /// The only algorithms accepted; tokens signed otherwise (`none` included) are refused.
    pub algorithms: Vec<JwtAlgorithm>,
    /// Public keys (for EdDSA, ES256, RS256).
    #[serde(default)]
    pub keys: Vec<PublicKeyConfig>,
    /// A JWKS URL whose keys are fetched at start and when a token names an unknown key id.
    #[serde(default)]
    pub jwks_url: Option<String>,
    /// The environment variable holding the HS256 shared secret.
    #[serde(default)]
    pub hs256_secret_env: Option<Secret>,
    /// The required `iss`.
    #[serde(default)]
    pub issuer: Option<String>,
    /// The required `aud`.
    #[serde(default)]
    pub audience: Option<String>,
    /// Seconds of clock skew allowed on `exp` and `nbf`.
    #[serde(default = "default_leeway_secs")]
    pub leeway_secs: u64,
    /// A cookie that may carry the token.
    #[serde(default)]
    pub token_cookie: Option<String>,
    /// Whether `?access_token=` is accepted (URLs end up in logs; prefer the cookie).
    #[serde(default)]
    pub allow_query_token: bool,
}

/// A signing algorithm the server may accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum JwtAlgorithm {
    /// Ed25519.
    #[serde(rename = "EdDSA")]
    EdDsa,
    /// ECDSA P-256 with SHA-256.
    #[serde(rename = "ES256")]
    Es256,
    /// RSA PKCS#1 v1.5 with SHA-256.
    #[serde(rename = "RS256")]
    Rs256,
    /// HMAC with SHA-256 and a shared secret.
    #[serde(rename = "HS256")]
    Hs256,
}

/// `auth.keys[]`: a public key, inline or in a file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PublicKeyConfig {
    /// The key id tokens name in their `kid` header, if any.
    #[serde(default)]
    pub kid: Option<String>,
    /// The PEM text.
    #[serde(default)]
    pub pem: Option<String>,
    /// A PEM file, relative to the working directory.
    #[serde(default)]
    pub pem_file: Option<PathBuf>,
}

fn default_leeway_secs() -> u64 {
    30
}
fn default_true() -> bool {
    true
}
fn default_key_prefix() -> String {
    "fjord".into()
}
fn default_max_records() -> u64 {
    100_000
}
fn default_max_age_secs() -> u64 {
    24 * 60 * 60
}
fn default_members() -> u32 {
    1
}
fn default_port() -> u16 {
    8080
}
fn default_host() -> std::net::IpAddr {
    std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED)
}
fn default_heartbeat_secs() -> u64 {
    15
}
fn default_retry_ms() -> u64 {
    2000
}
fn default_client_queue() -> usize {
    16_384
}
fn default_client_queue_mib() -> u64 {
    32
}
fn default_overload_wait_ms() -> u64 {
    250
}

fn default_client_max_lag_ms() -> u64 {
    5000
}
fn default_key_filter_memory_mib() -> u64 {
    256
}
fn default_max_distinct_filters() -> usize {
    10_000
}
