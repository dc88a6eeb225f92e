//! Checks that serde cannot express: value ranges and references between sections. Every
//! check runs, and a refused manifest lists all of its problems, each with its JSON path.
//!
//! No message echoes a value that may be a secret: a `*_env` field whose value is not a
//! variable name is most likely the secret itself, and a URL may carry a password in its
//! userinfo whatever else is wrong with it. [`shown`] is the one way a value gets into a
//! message, and [`without_values`] takes them out of serde's.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use super::{AuthConfig, EndpointMode, JwtAlgorithm, KafkaSecurity, Manifest, StartPosition};

/// Why a manifest was refused.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// The file could not be read.
    #[error("cannot read manifest {}", path.display())]
    Read {
        /// The manifest's path.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A value is malformed, unknown or out of range.
    #[error("{}{path}: {message}", file.as_ref().map(|f| format!("{}: ", f.display())).unwrap_or_default())]
    Invalid {
        /// The manifest's path, when it came from a file.
        file: Option<PathBuf>,
        /// The JSON path of the value, `$.endpoints.orders.topics`.
        path: String,
        /// What is wrong with it.
        message: String,
    },
    /// The manifest was refused for each of these problems (at least one).
    #[error("{}", Listed { file: file.as_deref(), problems })]
    Problems {
        /// The manifest's path, when it came from a file.
        file: Option<PathBuf>,
        /// Every problem found, in the order of the manifest's sections.
        problems: Vec<Problem>,
    },
    /// A secret the manifest names is not in the environment.
    #[error("environment variable {env} is not set (the manifest names it for a secret)")]
    MissingSecret {
        /// The variable's name.
        env: String,
    },
}

/// One problem of a manifest: where, and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The JSON path of the value, `$.endpoints.orders.topics`.
    pub path: String,
    /// What is wrong with it.
    pub message: String,
}

/// A list of problems: one on the line, several one to a line under a count.
struct Listed<'a> {
    file: Option<&'a Path>,
    problems: &'a [Problem],
}

impl fmt::Display for Listed<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(file) = self.file {
            write!(f, "{}: ", file.display())?;
        }
        match self.problems {
            [one] => write!(f, "{}: {}", one.path, one.message),
            several => {
                write!(f, "{} problems", several.len())?;
                for problem in several {
                    write!(f, "\n  {}: {}", problem.path, problem.message)?;
                }
                Ok(())
            }
        }
    }
}

impl ManifestError {
    /// Names the file the manifest came from in the error.
    pub fn in_file(self, manifest: &Path) -> Self {
        let file = Some(manifest.to_owned());
        match self {
            Self::Invalid { path, message, .. } => Self::Invalid {
                file,
                path,
                message,
            },
            Self::Problems { problems, .. } => Self::Problems { file, problems },
            other => other,
        }
    }
}

/// The problems found so far.
#[derive(Debug, Default)]
pub(super) struct Problems(Vec<Problem>);

impl Problems {
    pub(super) fn add(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.0.push(Problem {
            path: path.into(),
            message: message.into(),
        });
    }

    /// Records a problem unless `ok`; returns `ok`.
    pub(super) fn require(
        &mut self,
        ok: bool,
        path: impl Into<String>,
        message: impl Into<String>,
    ) -> bool {
        if !ok {
            self.add(path, message);
        }
        ok
    }

    /// `value` within `range`; the message names the range, then `unit`.
    fn within<T: PartialOrd + fmt::Display + Copy>(
        &mut self,
        value: T,
        range: std::ops::RangeInclusive<T>,
        path: impl Into<String>,
        unit: &str,
    ) {
        let message = format!("must be {} to {}{unit}", range.start(), range.end());
        self.require(range.contains(&value), path, message);
    }

    pub(super) fn into_result(self) -> Result<(), ManifestError> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(ManifestError::Problems {
                file: None,
                problems: self.0,
            })
        }
    }
}

/// A value as a message may show it: quoted, with the userinfo of anything that looks like
/// a URL or an address (`user:password@`) replaced by `***`.
pub(super) fn shown(value: &str) -> String {
    let (scheme, rest) = match value.find("://") {
        Some(at) => value.split_at(at + 3),
        None => ("", value),
    };
    // The last `@` of all, not of the authority: a password may hold `/`, `?` or `#`.
    match rest.rfind('@') {
        Some(at) => format!("{:?}", format!("{scheme}***{}", &rest[at..])),
        None => format!("{value:?}"),
    }
}

/// serde's message without the values it quotes: `invalid type: string "hunter2", expected
/// a map` becomes `invalid type: a string, expected a map`, and `unknown variant `x`` loses
/// the `x`. The value may be a secret pasted into the wrong field; the JSON path says where.
pub fn without_values(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut rest = message;
    loop {
        let string = rest.find("string \"");
        let variant = rest.find("variant `");
        match (string, variant) {
            (Some(at), v) if v.is_none_or(|v| at < v) => {
                out.push_str(&rest[..at]);
                out.push_str("a string");
                rest = skip_quoted(&rest[at + "string \"".len()..]);
            }
            (_, Some(at)) => {
                out.push_str(&rest[..at]);
                out.push_str("variant");
                let value = &rest[at + "variant `".len()..];
                // The value ends where serde's text resumes.
                rest = ["`, expected", "`, there are no variants", "` for", "`"]
                    .iter()
                    .find_map(|end| value.find(end).map(|at| &value[at + 1..]))
                    .unwrap_or("");
            }
            _ => {
                out.push_str(rest);
                return out;
            }
        }
    }
}

/// What follows a Rust-escaped string's closing quote.
fn skip_quoted(text: &str) -> &str {
    let mut escaped = false;
    for (at, c) in text.char_indices() {
        match c {
            '\\' if !escaped => escaped = true,
            '"' if !escaped => return &text[at + 1..],
            _ => escaped = false,
        }
    }
    ""
}

/// A `redis://` or `rediss://` URL without credentials, query or fragment.
fn validate_redis_url(p: &mut Problems, path: &str, url: &str) {
    let Some(rest) = url
        .strip_prefix("redis://")
        .or_else(|| url.strip_prefix("rediss://"))
    else {
        p.add(
            path,
            format!(
                "{} must start with redis:// or rediss:// (in lower case)",
                shown(url)
            ),
        );
        return;
    };
    let (authority, database) = rest.split_once('/').unwrap_or((rest, ""));
    if !p.require(
        !authority.contains('@'),
        path,
        "must not carry credentials; write the ACL user in redis.username and name the variable that holds the password in redis.password_env",
    ) {
        return;
    }
    if !p.require(
        !rest.contains(['#', '?']),
        path,
        "takes no query or fragment (certificates are always verified; there is no #insecure)",
    ) {
        return;
    }
    p.require(!authority.is_empty(), path, "needs a host");
    p.require(
        database.len() <= 5 && database.bytes().all(|b| b.is_ascii_digit()),
        path,
        "the path is the database number, /0 to /99999, or nothing",
    );
}

fn check_env_name(p: &mut Problems, path: &str, env: &str) {
    let valid = !env.is_empty()
        && !env.starts_with(|c: char| c.is_ascii_digit())
        && env.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    // The value is not shown: what is not a variable name here is most often the secret.
    p.require(
        valid,
        path,
        "is not an environment variable name (letters, digits and '_'; the value is not shown, in case it is the secret itself); the manifest names the variable that holds a secret, never the secret",
    );
}

impl Manifest {
    pub(super) fn validate(&self) -> Result<(), ManifestError> {
        let mut p = Problems::default();
        self.validate_kafka(&mut p);
        self.validate_redis(&mut p);
        self.validate_endpoints_and_groups(&mut p);
        self.validate_server(&mut p);
        self.validate_auth(&mut p);
        self.validate_formats(&mut p);
        for named in self.secrets() {
            check_env_name(&mut p, named.path, named.secret.env_name());
        }
        p.into_result()
    }

    fn validate_auth(&self, p: &mut Problems) {
        let AuthConfig::Jwt(jwt) = &self.auth else {
            return;
        };
        p.require(
            !jwt.algorithms.is_empty(),
            "$.auth.algorithms",
            "name at least one algorithm",
        );
        let shared = jwt.algorithms.contains(&JwtAlgorithm::Hs256);
        let public = jwt.algorithms.iter().any(|alg| *alg != JwtAlgorithm::Hs256);
        p.require(
            !shared || jwt.hs256_secret_env.is_some(),
            "$.auth.hs256_secret_env",
            "HS256 needs the variable that holds the shared secret",
        );
        p.require(
            jwt.hs256_secret_env.is_none() || shared,
            "$.auth.hs256_secret_env",
            "a shared secret is only used with HS256 in algorithms",
        );
        p.require(
            !public || !jwt.keys.is_empty() || jwt.jwks_url.is_some(),
            "$.auth.keys",
            "EdDSA, ES256 and RS256 need public keys or a jwks_url",
        );
        for (i, key) in jwt.keys.iter().enumerate() {
            p.require(
                key.pem.is_some() != key.pem_file.is_some(),
                format!("$.auth.keys[{i}]"),
                "give the key as pem or as pem_file, one of the two",
            );
        }
        if let Some(url) = &jwt.jwks_url {
            check_jwks_url(p, url);
        }
        p.require(jwt.leeway_secs <= 300, "$.auth.leeway_secs", "at most 300");
        if let Some(cookie) = &jwt.token_cookie {
            let valid = !cookie.is_empty()
                && cookie
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
            p.require(
                valid,
                "$.auth.token_cookie",
                "a cookie name of letters, digits, '-' and '_'",
            );
        }
    }

    fn validate_kafka(&self, p: &mut Problems) {
        p.require(
            !self.kafka.brokers.is_empty(),
            "$.kafka.brokers",
            "at least one broker is needed",
        );
        for (i, broker) in self.kafka.brokers.iter().enumerate() {
            let valid = broker.rsplit_once(':').is_some_and(|(host, port)| {
                !host.is_empty()
                    && !host.contains(['@', '/'])
                    && port.parse::<u16>().is_ok_and(|p| p > 0)
            });
            p.require(
                valid,
                format!("$.kafka.brokers[{i}]"),
                format!("{} is not host:port", shown(broker)),
            );
        }
        match &self.kafka.security {
            KafkaSecurity::None => {}
            KafkaSecurity::SaslPlain(sasl)
            | KafkaSecurity::SaslScramSha256(sasl)
            | KafkaSecurity::SaslScramSha512(sasl) => {
                p.require(
                    !sasl.username.is_empty(),
                    "$.kafka.security.username",
                    "must not be empty",
                );
                check_ca(p, sasl.ca_file.as_ref(), sasl.ca_pem.as_deref());
            }
            KafkaSecurity::Ssl(tls) => {
                check_ca(p, tls.ca_file.as_ref(), tls.ca_pem.as_deref());
                p.require(
                    !(tls.cert_file.is_some() && tls.cert_pem.is_some()),
                    "$.kafka.security",
                    "give the client certificate as cert_pem or as cert_file, not both",
                );
                p.require(
                    !(tls.key_file.is_some() && tls.key_pem_env.is_some()),
                    "$.kafka.security",
                    "give the private key as key_pem_env or as key_file, not both",
                );
                let cert = tls.cert_file.is_some() || tls.cert_pem.is_some();
                let key = tls.key_file.is_some() || tls.key_pem_env.is_some();
                p.require(
                    cert == key,
                    "$.kafka.security",
                    "a client certificate (cert_pem or cert_file) and its private key (key_pem_env or key_file) go together",
                );
                p.require(
                    key || tls.key_password_env.is_none(),
                    "$.kafka.security.key_password_env",
                    "a key password is only used with a private key",
                );
                if let Some(pem) = &tls.cert_pem {
                    check_certificates(p, "$.kafka.security.cert_pem", pem);
                }
            }
        }
    }

    fn validate_redis(&self, p: &mut Problems) {
        validate_redis_url(p, "$.redis.url", &self.redis.url);
        if let Some(cluster) = &self.redis.cluster {
            fn database(url: &str) -> &str {
                url.split_once("://")
                    .and_then(|(_, rest)| rest.split_once('/'))
                    .map_or("", |(_, database)| database)
            }
            p.require(
                matches!(database(&self.redis.url), "" | "0"),
                "$.redis.url",
                "a Redis Cluster has only database 0: no /N path",
            );
            let tls = self.redis.url.starts_with("rediss://");
            for (index, url) in cluster.seed_urls.iter().enumerate() {
                let path = format!("$.redis.cluster.seed_urls[{index}]");
                validate_redis_url(p, &path, url);
                p.require(
                    matches!(database(url), "" | "0"),
                    &path,
                    "a Redis Cluster has only database 0: no /N path",
                );
                p.require(
                    url.starts_with("rediss://") == tls,
                    &path,
                    "every node of a cluster is reached the same way: all redis:// or all rediss://, like redis.url",
                );
            }
        }
        if let Some(acks) = &self.redis.commit_after_replicas {
            p.within(
                acks.count,
                1..=5,
                "$.redis.commit_after_replicas.count",
                " replicas",
            );
            p.within(
                acks.timeout_ms,
                10..=60_000,
                "$.redis.commit_after_replicas.timeout_ms",
                " milliseconds",
            );
        }
        if let Some(username) = &self.redis.username {
            let valid = !username.is_empty()
                && username.len() <= 128
                && !username
                    .chars()
                    .any(|c| c.is_whitespace() || c.is_control());
            p.require(
                valid,
                "$.redis.username",
                "an ACL user name: 1 to 128 characters, no spaces",
            );
            p.require(
                self.redis.password_env.is_some(),
                "$.redis.password_env",
                "an ACL user (redis.username) needs the variable that holds its password",
            );
        }
        let prefix_ok = !self.redis.key_prefix.is_empty()
            && self.redis.key_prefix.len() <= 64
            && !self.redis.key_prefix.contains(['{', '}', ' ']);
        p.require(
            prefix_ok,
            "$.redis.key_prefix",
            "1 to 64 characters, without braces or spaces",
        );
    }

    fn validate_endpoints_and_groups(&self, p: &mut Problems) {
        p.require(
            !self.endpoints.is_empty(),
            "$.endpoints",
            "at least one endpoint is needed",
        );
        p.require(
            self.endpoints.len() <= 1024,
            "$.endpoints",
            "at most 1024 endpoints",
        );
        for (name, endpoint) in &self.endpoints {
            let path = format!("$.endpoints.{name}");
            p.require(
                !endpoint.topics.is_empty(),
                format!("{path}.topics"),
                "at least one topic is needed",
            );
            for (i, topic) in endpoint.topics.iter().enumerate() {
                let topic_path = format!("{path}.topics[{i}]");
                if check_topic(p, &topic_path, topic) {
                    p.require(
                        self.consumer_groups
                            .iter()
                            .any(|g| g.topics.contains(topic)),
                        topic_path,
                        format!("topic {topic:?} is not consumed by any of consumer_groups"),
                    );
                }
            }
            p.require(
                endpoint.retention.max_records >= 1,
                format!("{path}.retention.max_records"),
                "must be at least 1",
            );
            p.require(
                endpoint.retention.max_age_secs >= 1,
                format!("{path}.retention.max_age_secs"),
                "must be at least 1",
            );
            if let Err(error) = endpoint.filter(&self.server.filter_limits) {
                p.add(format!("{path}.filter"), format!("not a filter: {error}"));
            }
            match (endpoint.mode, endpoint.table) {
                (EndpointMode::Stream, Some(_)) => p.add(
                    format!("{path}.table"),
                    "only for an endpoint with \"mode\": \"table\"",
                ),
                (EndpointMode::Table, bounds) => {
                    let bounds = bounds.unwrap_or_default();
                    p.within(
                        bounds.max_keys,
                        1..=100_000_000,
                        format!("{path}.table.max_keys"),
                        "",
                    );
                    p.within(
                        bounds.max_bytes,
                        1024..=1 << 40,
                        format!("{path}.table.max_bytes"),
                        " bytes",
                    );
                    p.require(
                        endpoint.start == StartPosition::Live,
                        format!("{path}.start"),
                        "a table endpoint starts every connection with a snapshot of its rows; leave \"start\" out",
                    );
                }
                (EndpointMode::Stream, None) => {}
            }
        }

        p.require(
            !self.consumer_groups.is_empty(),
            "$.consumer_groups",
            "at least one consumer group is needed",
        );
        let mut consumed_by: BTreeMap<&str, &str> = BTreeMap::new();
        for (g, group) in self.consumer_groups.iter().enumerate() {
            let path = format!("$.consumer_groups[{g}]");
            p.require(
                !group.id.trim().is_empty(),
                format!("{path}.id"),
                "must not be empty",
            );
            p.require(
                self.consumer_groups[..g]
                    .iter()
                    .all(|other| other.id != group.id),
                format!("{path}.id"),
                format!("group {:?} is listed twice", group.id),
            );
            p.within(group.members, 1..=1000, format!("{path}.members"), "");
            p.require(
                !group.topics.is_empty(),
                format!("{path}.topics"),
                "at least one topic is needed",
            );
            for (i, topic) in group.topics.iter().enumerate() {
                let topic_path = format!("{path}.topics[{i}]");
                if !check_topic(p, &topic_path, topic) {
                    continue;
                }
                if let Some(other) = consumed_by.insert(topic, &group.id) {
                    // Two groups would publish each record twice.
                    p.add(
                        topic_path,
                        format!(
                            "topic {topic:?} is already consumed by group {other:?}; a topic belongs to one group"
                        ),
                    );
                    continue;
                }
                p.require(
                    self.endpoints_of_topic(topic).next().is_some(),
                    topic_path,
                    format!("topic {topic:?} is not streamed by any endpoint"),
                );
            }
        }
    }

    fn validate_server(&self, p: &mut Problems) {
        let server = &self.server;
        p.within(
            server.heartbeat_secs,
            1..=3600,
            "$.server.heartbeat_secs",
            "",
        );
        p.within(server.retry_ms, 1..=600_000, "$.server.retry_ms", "");
        p.within(
            server.client_queue,
            1..=1_000_000,
            "$.server.client_queue",
            "",
        );
        p.within(
            server.client_queue_mib,
            1..=65_536,
            "$.server.client_queue_mib",
            "",
        );
        p.within(
            server.client_max_lag_ms,
            100..=3_600_000,
            "$.server.client_max_lag_ms",
            "",
        );
        p.within(
            server.key_filter_memory_mib,
            1..=1_048_576,
            "$.server.key_filter_memory_mib",
            "",
        );
        let limits = &server.filter_limits;
        // The parser recurses as deep as `max_depth`: hundreds are safe on any stack.
        for (value, range, name) in [
            (limits.max_length, 1..=65_536, "max_length"),
            (limits.max_depth, 1..=256, "max_depth"),
            (limits.max_terms, 1..=10_000, "max_terms"),
            (limits.max_list, 1..=10_000, "max_list"),
            (limits.max_fields, 1..=1_000, "max_fields"),
        ] {
            p.within(value, range, format!("$.server.filter_limits.{name}"), "");
        }
        p.within(
            server.max_distinct_filters,
            1..=1_000_000,
            "$.server.max_distinct_filters",
            "",
        );
        for (limit, path) in [
            (server.max_connections, "$.server.max_connections"),
            (
                server.max_connections_per_address,
                "$.server.max_connections_per_address",
            ),
            (
                server.max_connections_per_subject,
                "$.server.max_connections_per_subject",
            ),
        ] {
            if let Some(limit) = limit {
                p.within(limit, 1..=10_000_000, path, ", or absent for the default");
            }
        }
        if let Some(metrics) = &server.metrics_listener {
            p.require(
                metrics.port == 0 || metrics.port != server.port,
                "$.server.metrics_listener.port",
                format!(
                    "must differ from server.port ({}); leave metrics_listener out to serve /metrics on the public port",
                    server.port
                ),
            );
        }
        for (i, origin) in server.cors_origins.iter().enumerate() {
            let valid = origin == "*"
                || ((origin.starts_with("https://") || origin.starts_with("http://"))
                    && !origin.ends_with('/')
                    && !origin.contains('@')
                    && origin.parse::<http::HeaderValue>().is_ok());
            p.require(
                valid,
                format!("$.server.cors_origins[{i}]"),
                format!(
                    "{} is not an origin like https://app.example.com (scheme and host, no path) or \"*\"",
                    shown(origin)
                ),
            );
        }
    }
}

/// A JWKS URL: `https://`, or plain `http://` only to a loopback host (a local identity
/// provider, tests). Keys fetched over plain HTTP can be swapped on the way, and whoever
/// swaps them can sign tokens that open every endpoint.
fn check_jwks_url(p: &mut Problems, url: &str) {
    const PATH: &str = "$.auth.jwks_url";
    let parsed = match url::Url::parse(url) {
        Ok(parsed) => parsed,
        Err(error) => {
            p.add(PATH, format!("{} is not a URL: {error}", shown(url)));
            return;
        }
    };
    if !p.require(
        parsed.username().is_empty() && parsed.password().is_none(),
        PATH,
        "must not carry credentials",
    ) {
        return;
    }
    let loopback = is_loopback(&parsed);
    match parsed.scheme() {
        "https" => {}
        "http" => {
            p.require(
                loopback,
                PATH,
                format!(
                    "{url:?} is plain http://, which lets anyone on the way replace the keys; use https:// (http:// is allowed only for loopback hosts: 127.0.0.0/8, ::1, localhost)"
                ),
            );
        }
        _ => p.add(PATH, format!("{url:?} is not an https:// URL")),
    }
}

/// Whether a URL's host is `localhost` or a loopback address.
pub(super) fn is_loopback(url: &url::Url) -> bool {
    let host = url.host_str().unwrap_or_default();
    host.eq_ignore_ascii_case("localhost")
        || host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// A CA given as a file or as PEM text, not both.
fn check_ca(p: &mut Problems, file: Option<&PathBuf>, pem: Option<&str>) {
    check_ca_at(p, "$.kafka.security", file, pem);
}

/// The same for the section at `section`.
pub(super) fn check_ca_at(
    p: &mut Problems,
    section: &str,
    file: Option<&PathBuf>,
    pem: Option<&str>,
) {
    p.require(
        file.is_none() || pem.is_none(),
        section,
        "give the CA as ca_pem or as ca_file, not both",
    );
    if let Some(pem) = pem {
        check_certificates(p, &format!("{section}.ca_pem"), pem);
    }
}

/// PEM text of one or more certificates. Only the armour is checked here; the TLS library
/// reads the rest when the client is made, and names the setting if it cannot.
fn check_certificates(p: &mut Problems, path: &str, pem: &str) {
    p.require(
        pem.contains("-----BEGIN CERTIFICATE-----") && pem.contains("-----END CERTIFICATE-----"),
        path,
        "not PEM certificates: expected the text from -----BEGIN CERTIFICATE----- to -----END CERTIFICATE----- (with its line breaks as \\n in JSON)",
    );
}

/// Whether `topic` is a valid Kafka topic name; records a problem if not.
pub(super) fn check_topic(p: &mut Problems, path: &str, topic: &str) -> bool {
    let valid = !topic.is_empty()
        && topic.len() <= 249
        && topic != "."
        && topic != ".."
        && topic
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    p.require(
        valid,
        path,
        format!("{} is not a valid Kafka topic name", shown(topic)),
    )
}

#[cfg(test)]
pub(super) mod tests {
    use super::super::{
        AuthConfig, EXAMPLE, Keeping, Manifest, OffsetReset, Retention, StartPosition, TableBounds,
    };

    pub(in super::super) fn minimal() -> serde_json::Value {
        serde_json::json!({
            "kafka": {"brokers": ["127.0.0.1:9092"]},
            "redis": {"url": "redis://127.0.0.1:6379"},
            "endpoints": {"orders": {"topics": ["orders"]}},
            "consumer_groups": [{"id": "fjord", "topics": ["orders"]}],
            "auth": {"mode": "disabled"}
        })
    }

    pub(in super::super) fn error_of(value: &serde_json::Value) -> String {
        match Manifest::parse(&value.to_string()) {
            Ok(_) => panic!("manifest {value} was accepted"),
            Err(error) => error.to_string(),
        }
    }

    /// The validator's error for a mistake of form (an unknown field, a wrong type, a missing
    /// section), which the schema must refuse as well, so an editor flags it too.
    fn structural_error_of(value: &serde_json::Value) -> String {
        assert!(
            !schema_errors(value).is_empty(),
            "the schema accepts {value}"
        );
        error_of(value)
    }

    /// Where the shipped JSON Schema refuses `value`, each as `path: message`.
    fn schema_errors(value: &serde_json::Value) -> Vec<String> {
        let schema: serde_json::Value = serde_json::from_str(super::super::SCHEMA).expect("JSON");
        let validator = jsonschema::validator_for(&schema).expect("a valid JSON Schema");
        validator
            .iter_errors(value)
            .map(|error| format!("{}: {error}", error.instance_path()))
            .collect()
    }

    /// Parses a manifest the validator must accept, and requires the schema to accept it
    /// too: the schema describes every field the validator takes, so editors never flag a
    /// manifest Fjord runs with.
    pub(in super::super) fn accepted(value: &serde_json::Value) -> Manifest {
        let manifest = Manifest::parse(&value.to_string()).expect("a valid manifest");
        let refused = schema_errors(value);
        assert!(
            refused.is_empty(),
            "the validator accepts {value} but the schema refuses it: {refused:?}"
        );
        manifest
    }

    #[test]
    fn minimal_manifest_gets_defaults() {
        let manifest = accepted(&minimal());
        assert_eq!(manifest.server.port, 8080);
        assert_eq!(manifest.server.heartbeat_secs, 15);
        assert_eq!(manifest.redis.key_prefix, "fjord");
        assert_eq!(manifest.consumer_groups[0].members, 1);
        assert_eq!(
            manifest.consumer_groups[0].offset_reset,
            OffsetReset::Latest
        );
        let orders = manifest.endpoints.values().next().expect("one endpoint");
        assert_eq!(orders.start, StartPosition::Live);
        assert!(matches!(manifest.auth, AuthConfig::Disabled));
    }

    #[test]
    fn shipped_example_is_valid() {
        accepted(&serde_json::from_str(EXAMPLE).expect("JSON"));
    }

    /// The property names the schema allows for the object at `path` of an instance: the
    /// union over every branch (`oneOf`, `anyOf`, `allOf`) and `$ref` that applies there.
    fn schema_fields_at(
        root: &serde_json::Value,
        node: &serde_json::Value,
        path: &[String],
    ) -> std::collections::BTreeSet<String> {
        let node = match node.get("$ref").and_then(serde_json::Value::as_str) {
            Some(reference) => {
                let name = reference.trim_start_matches("#/$defs/");
                &root["$defs"][name]
            }
            None => node,
        };
        let mut fields = std::collections::BTreeSet::new();
        for branch in ["oneOf", "anyOf", "allOf"] {
            for sub in node
                .get(branch)
                .and_then(serde_json::Value::as_array)
                .into_iter()
                .flatten()
            {
                fields.extend(schema_fields_at(root, sub, path));
            }
        }
        match path.split_first() {
            None => fields.extend(
                node.get("properties")
                    .and_then(serde_json::Value::as_object)
                    .into_iter()
                    .flat_map(|properties| properties.keys().cloned()),
            ),
            Some((step, rest)) => {
                let next = node["properties"]
                    .get(step)
                    .or_else(|| node.get("items").filter(|_| step.parse::<usize>().is_ok()))
                    .or_else(|| node.get("additionalProperties").filter(|a| a.is_object()));
                if let Some(next) = next {
                    fields.extend(schema_fields_at(root, next, rest));
                }
            }
        }
        fields
    }

    /// Every object of `value` with its path (object keys and array indexes).
    fn objects_of(value: &serde_json::Value, path: &mut Vec<String>, found: &mut Vec<Vec<String>>) {
        match value {
            serde_json::Value::Object(object) => {
                found.push(path.clone());
                for (key, child) in object {
                    path.push(key.clone());
                    objects_of(child, path, found);
                    path.pop();
                }
            }
            serde_json::Value::Array(items) => {
                for (index, child) in items.iter().enumerate() {
                    path.push(index.to_string());
                    objects_of(child, path, found);
                    path.pop();
                }
            }
            _ => {}
        }
    }

    /// The schema names every field the validator takes. For each object of manifests that
    /// use every section and variant, an unknown field makes the validator list the fields
    /// it expects there (serde's `deny_unknown_fields`), and each of them must be a property
    /// of the schema at that path. A field added to the config structs without its schema
    /// entry fails here, provided a manifest below uses the object that holds it.
    #[test]
    fn the_schema_describes_every_field_the_validator_takes() {
        let root: serde_json::Value = serde_json::from_str(super::super::SCHEMA).expect("JSON");
        let example: serde_json::Value = serde_json::from_str(EXAMPLE).expect("JSON");
        let mut manifests = vec![example.clone()];
        let mut jwt = example.clone();
        jwt["auth"] = serde_json::json!({
            "mode": "jwt", "algorithms": ["EdDSA"], "keys": [{"kid": "a", "pem": "x"}],
            "jwks_url": "https://id.example/jwks", "hs256_secret_env": "S", "issuer": "i",
            "audience": "a", "leeway_secs": 5, "token_cookie": "t", "allow_query_token": false
        });
        manifests.push(jwt);
        let mut formats = example.clone();
        formats["topics"] =
            serde_json::json!({"orders": {"value_format": "avro", "key_format": "string"}});
        formats["schema_registry"] = serde_json::json!({
            "urls": ["https://sr.internal"], "auth": {"type": "basic", "username": "u", "password_env": "P"},
            "ca_pem": "x", "cache_schemas": 10
        });
        manifests.push(formats);
        let mut ssl = example;
        ssl["kafka"]["security"] = serde_json::json!({
            "protocol": "ssl", "ca_pem": "x", "cert_pem": "x", "key_pem_env": "K",
            "key_password_env": "P"
        });
        manifests.push(ssl);
        let mut undescribed = std::collections::BTreeSet::new();
        for manifest in &manifests {
            let mut objects = Vec::new();
            objects_of(manifest, &mut Vec::new(), &mut objects);
            for path in objects {
                let mut probe = manifest.clone();
                let target = path.iter().fold(&mut probe, |value, step| match value {
                    serde_json::Value::Array(items) => {
                        &mut items[step.parse::<usize>().expect("index")]
                    }
                    other => &mut other[step.as_str()],
                });
                target["__probe"] = serde_json::json!(1);
                let Err(error) = Manifest::parse(&probe.to_string()) else {
                    continue;
                };
                let error = error.to_string();
                let Some((_, expected)) = error.split_once("unknown field `__probe`") else {
                    continue;
                };
                let schema_fields = schema_fields_at(&root, &root, &path);
                for field in expected.split('`').skip(1).step_by(2) {
                    if !schema_fields.contains(field) {
                        let at: String = path.iter().map(|step| format!(".{step}")).collect();
                        undescribed.insert(format!("${at}.{field}"));
                    }
                }
            }
        }
        assert!(
            undescribed.is_empty(),
            "fields the validator takes but the schema lacks: {undescribed:?}"
        );
    }

    #[test]
    fn unknown_field_names_its_path() {
        let mut value = minimal();
        value["endpoints"]["orders"]["topicz"] = serde_json::json!(["x"]);
        let error = structural_error_of(&value);
        assert!(error.starts_with("$.endpoints.orders"), "{error}");
        assert!(error.contains("topicz"), "{error}");
    }

    #[test]
    fn wrong_type_names_its_path() {
        let mut value = minimal();
        value["server"] = serde_json::json!({"port": "eighty"});
        assert!(structural_error_of(&value).starts_with("$.server.port"));
        value["server"] = serde_json::json!({"port": 70000});
        assert!(structural_error_of(&value).starts_with("$.server.port"));
    }

    #[test]
    fn missing_section_is_named() {
        let mut value = minimal();
        value.as_object_mut().expect("object").remove("auth");
        assert!(structural_error_of(&value).contains("auth"));
    }

    #[test]
    fn bad_values_name_their_paths() {
        let cases: &[(&str, serde_json::Value, &str)] = &[
            ("/kafka/brokers", serde_json::json!([]), "$.kafka.brokers"),
            (
                "/kafka/brokers",
                serde_json::json!(["nohost"]),
                "$.kafka.brokers[0]",
            ),
            ("/redis/url", serde_json::json!("http://x"), "$.redis.url"),
            (
                "/redis/url",
                serde_json::json!("redis://user:hunter2@x:6379"),
                "$.redis.url",
            ),
            (
                "/redis/url",
                serde_json::json!("rediss://x:6379/#insecure"),
                "$.redis.url",
            ),
            (
                "/redis/url",
                serde_json::json!("rediss://x:6379?protocol=resp3"),
                "$.redis.url",
            ),
            (
                "/redis/url",
                serde_json::json!("redis://x/db"),
                "$.redis.url",
            ),
            (
                "/redis/username",
                serde_json::json!("a b"),
                "$.redis.username",
            ),
            (
                "/redis/username",
                serde_json::json!("fjord"),
                "$.redis.password_env",
            ),
            ("/endpoints", serde_json::json!({}), "$.endpoints"),
            (
                "/endpoints",
                serde_json::json!({"fjord-x": {"topics": ["orders"]}}),
                "$.endpoints",
            ),
            (
                "/endpoints/orders/topics",
                serde_json::json!(["orders", "bad topic"]),
                "$.endpoints.orders.topics[1]",
            ),
            (
                "/endpoints/orders/topics",
                serde_json::json!(["orders", "other"]),
                "$.endpoints.orders.topics[1]",
            ),
            (
                "/endpoints/orders/retention",
                serde_json::json!({"max_records": 0}),
                "$.endpoints.orders.retention.max_records",
            ),
            (
                "/endpoints/orders/filter",
                serde_json::json!("value.total >"),
                "$.endpoints.orders.filter",
            ),
            (
                "/endpoints/orders/table",
                serde_json::json!({"max_keys": 10}),
                "$.endpoints.orders.table: only for an endpoint with \"mode\": \"table\"",
            ),
            (
                "/server",
                serde_json::json!({"filter_limits": {"max_depth": 1000}}),
                "$.server.filter_limits.max_depth",
            ),
            (
                "/server",
                serde_json::json!({"max_distinct_filters": 0}),
                "$.server.max_distinct_filters",
            ),
            (
                "/consumer_groups/0/members",
                serde_json::json!(0),
                "$.consumer_groups[0].members",
            ),
            (
                "/server",
                serde_json::json!({"heartbeat_secs": 0}),
                "$.server.heartbeat_secs",
            ),
            (
                "/server",
                serde_json::json!({"cors_origins": ["example.com"]}),
                "$.server.cors_origins[0]",
            ),
            (
                "/server",
                serde_json::json!({"client_queue": 0}),
                "$.server.client_queue",
            ),
            (
                "/server",
                serde_json::json!({"client_queue_mib": 0}),
                "$.server.client_queue_mib",
            ),
            (
                "/server",
                serde_json::json!({"client_max_lag_ms": 10}),
                "$.server.client_max_lag_ms",
            ),
            (
                "/server",
                serde_json::json!({"max_connections": 0}),
                "$.server.max_connections",
            ),
            (
                "/server",
                serde_json::json!({"max_connections_per_address": 0}),
                "$.server.max_connections_per_address",
            ),
            (
                "/server",
                serde_json::json!({"max_connections_per_subject": 0}),
                "$.server.max_connections_per_subject",
            ),
            (
                "/server",
                serde_json::json!({"port": 8080, "metrics_listener": {"port": 8080}}),
                "$.server.metrics_listener.port",
            ),
            (
                "/server",
                serde_json::json!({"metrics_listener": {"host": "127.0.0.1"}}),
                "$.server.metrics_listener",
            ),
            ("/auth", serde_json::json!({"mode": "maybe"}), "$.auth"),
            (
                "/auth",
                serde_json::json!({"mode": "jwt", "algorithms": []}),
                "$.auth.algorithms",
            ),
            (
                "/auth",
                serde_json::json!({"mode": "jwt", "algorithms": ["none"]}),
                "$.auth",
            ),
            (
                "/auth",
                serde_json::json!({"mode": "jwt", "algorithms": ["HS256"]}),
                "$.auth.hs256_secret_env",
            ),
            (
                "/auth",
                serde_json::json!({"mode": "jwt", "algorithms": ["EdDSA"]}),
                "$.auth.keys",
            ),
            (
                "/auth",
                serde_json::json!({"mode": "jwt", "algorithms": ["EdDSA"], "keys": [{}]}),
                "$.auth.keys[0]",
            ),
            (
                "/auth",
                serde_json::json!({"mode": "jwt", "algorithms": ["RS256"], "jwks_url": "ftp://x"}),
                "$.auth.jwks_url",
            ),
            (
                "/auth",
                serde_json::json!({"mode": "jwt", "algorithms": ["RS256"], "jwks_url": "http://idp.example.com/jwks.json"}),
                "$.auth.jwks_url: \"http://idp.example.com/jwks.json\" is plain http://",
            ),
            (
                "/auth",
                serde_json::json!({"mode": "jwt", "algorithms": ["RS256"], "jwks_url": "http://localhost.example.com/jwks.json"}),
                "$.auth.jwks_url: \"http://localhost.example.com/jwks.json\" is plain http://",
            ),
            (
                "/auth",
                serde_json::json!({"mode": "jwt", "algorithms": ["RS256"], "jwks_url": "http://10.0.0.1/jwks.json"}),
                "$.auth.jwks_url: \"http://10.0.0.1/jwks.json\" is plain http://",
            ),
            (
                "/auth",
                serde_json::json!({"mode": "jwt", "algorithms": ["RS256"], "jwks_url": "https://user:pass@idp.example.com/jwks.json"}),
                "$.auth.jwks_url: must not carry credentials",
            ),
            (
                "/auth",
                serde_json::json!({"mode": "jwt", "algorithms": ["RS256"], "jwks_url": "idp.example.com/jwks.json"}),
                "$.auth.jwks_url: \"idp.example.com/jwks.json\" is not a URL",
            ),
            (
                "/auth",
                serde_json::json!({"mode": "jwt", "algorithms": ["RS256"], "jwks_url": "https://x", "token_cookie": "a b"}),
                "$.auth.token_cookie",
            ),
        ];
        for (pointer, replacement, expected_path) in cases {
            let mut value = minimal();
            let (parent, field) = pointer.rsplit_once('/').expect("a pointer");
            value.pointer_mut(parent).expect("parent exists")[field] = replacement.clone();
            let error = error_of(&value);
            // The only problem, or one of those listed.
            assert!(
                error.starts_with(expected_path) || error.contains(&format!("\n  {expected_path}")),
                "{pointer} = {replacement}: {error}"
            );
        }
    }

    #[test]
    fn a_table_endpoint_has_bounds_and_no_start() {
        let mut value = minimal();
        value["endpoints"]["orders"]["mode"] = serde_json::json!("table");
        let manifest = accepted(&value);
        let keeping = manifest
            .endpoints
            .values()
            .next()
            .expect("orders")
            .keeping();
        assert_eq!(keeping.table, Some(TableBounds::default()));
        assert_eq!(keeping.table.map(|bounds| bounds.max_keys), Some(100_000));

        value["endpoints"]["orders"]["table"] = serde_json::json!({"max_keys": 0, "max_bytes": 10});
        value["endpoints"]["orders"]["start"] = serde_json::json!("oldest");
        let error = error_of(&value);
        for expected in [
            "$.endpoints.orders.table.max_keys: must be 1 to 100000000",
            "$.endpoints.orders.table.max_bytes: must be 1024 to 1099511627776 bytes",
            "$.endpoints.orders.start: a table endpoint starts every connection with a snapshot",
        ] {
            assert!(error.contains(expected), "{expected} in {error}");
        }
        value["endpoints"]["orders"]["mode"] = serde_json::json!("log");
        assert!(error_of(&value).starts_with("$.endpoints.orders.mode"));
        let stream = accepted(&minimal());
        let stream = stream.endpoints.values().next().expect("orders");
        assert_eq!(
            stream.keeping(),
            Keeping::from(Retention::default()),
            "a stream endpoint keeps no rows"
        );
    }

    #[test]
    fn an_endpoint_s_filter_is_checked_within_the_manifest_s_limits() {
        let mut value = minimal();
        value["endpoints"]["orders"]["filter"] = serde_json::json!("value.total >= 1000");
        let manifest = accepted(&value);
        let endpoint = &manifest.endpoints.values().next().expect("orders");
        let filter = endpoint
            .filter(&manifest.server.filter_limits)
            .expect("compiles")
            .expect("a filter");
        assert_eq!(filter.canonical(), "value.total >= 1000");
        value["server"]["filter_limits"] = serde_json::json!({"max_length": 10});
        let error = error_of(&value);
        assert!(
            error.starts_with(
                "$.endpoints.orders.filter: not a filter: at column 11: longer than 10 bytes"
            ),
            "{error}"
        );
    }

    #[test]
    fn jwks_urls_are_https_or_loopback_http() {
        for url in [
            "https://idp.example.com/.well-known/jwks.json",
            "http://127.0.0.1:8080/jwks.json",
            "http://127.8.9.10/jwks.json",
            "http://[::1]:9000/jwks.json",
            "http://localhost/jwks.json",
            "http://LOCALHOST:1/jwks.json",
        ] {
            let mut value = minimal();
            value["auth"] =
                serde_json::json!({"mode": "jwt", "algorithms": ["RS256"], "jwks_url": url});
            let parsed = Manifest::parse(&value.to_string());
            assert!(parsed.is_ok(), "{url}: {parsed:?}");
        }
    }

    #[test]
    fn a_topic_belongs_to_one_group() {
        let mut value = minimal();
        value["consumer_groups"] = serde_json::json!([
            {"id": "a", "topics": ["orders"]},
            {"id": "b", "topics": ["orders"]}
        ]);
        assert!(error_of(&value).starts_with("$.consumer_groups[1].topics[0]"));
    }

    #[test]
    fn secrets_are_named_not_inlined() {
        let mut value = minimal();
        value["kafka"]["security"] = serde_json::json!({
            "protocol": "sasl_scram_sha_512", "username": "fjord", "password_env": "hunter2!"
        });
        assert!(error_of(&value).starts_with("$.kafka.security.password_env"));
        value["kafka"]["security"]["password"] = serde_json::json!("x");
        assert!(error_of(&value).contains("password"));
    }

    const CERT: &str = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";

    #[test]
    fn tls_material_is_checked_with_its_path() {
        let cases: &[(serde_json::Value, &str)] = &[
            (
                serde_json::json!({"protocol": "ssl", "ca_file": "ca.pem", "ca_pem": CERT}),
                "$.kafka.security: give the CA as ca_pem or as ca_file, not both",
            ),
            (
                serde_json::json!({"protocol": "ssl", "ca_pem": "/etc/ssl/ca.pem"}),
                "$.kafka.security.ca_pem: not PEM certificates",
            ),
            (
                serde_json::json!({"protocol": "sasl_plain", "username": "u", "password_env": "P", "ca_pem": "x"}),
                "$.kafka.security.ca_pem: not PEM certificates",
            ),
            (
                serde_json::json!({"protocol": "ssl", "cert_pem": CERT}),
                "$.kafka.security: a client certificate (cert_pem or cert_file) and its private key",
            ),
            (
                serde_json::json!({"protocol": "ssl", "key_pem_env": "KEY"}),
                "$.kafka.security: a client certificate",
            ),
            (
                serde_json::json!({"protocol": "ssl", "cert_pem": CERT, "cert_file": "c.pem", "key_pem_env": "KEY"}),
                "$.kafka.security: give the client certificate as cert_pem or as cert_file, not both",
            ),
            (
                serde_json::json!({"protocol": "ssl", "cert_pem": CERT, "key_file": "k.pem", "key_pem_env": "KEY"}),
                "$.kafka.security: give the private key as key_pem_env or as key_file, not both",
            ),
            (
                serde_json::json!({"protocol": "ssl", "cert_pem": "MIIB", "key_pem_env": "KEY"}),
                "$.kafka.security.cert_pem: not PEM certificates",
            ),
            (
                serde_json::json!({"protocol": "ssl", "cert_pem": CERT, "key_pem_env": "-----BEGIN"}),
                "$.kafka.security.key_pem_env: is not an environment variable name",
            ),
            (
                serde_json::json!({"protocol": "ssl", "key_password_env": "PASS"}),
                "$.kafka.security.key_password_env: a key password is only used with a private key",
            ),
        ];
        for (security, expected) in cases {
            let mut value = minimal();
            value["kafka"]["security"] = security.clone();
            let error = error_of(&value);
            assert!(error.starts_with(expected), "{security}: {error}");
        }
        let mut value = minimal();
        value["kafka"]["security"] = serde_json::json!({
            "protocol": "ssl", "ca_pem": CERT, "cert_pem": CERT, "key_pem_env": "KEY", "key_password_env": "PASS"
        });
        accepted(&value);
    }

    /// A manifest that names every secret it can, in `security`'s Kafka variant.
    fn every_secret(security: serde_json::Value) -> Manifest {
        let mut value = minimal();
        value["kafka"]["security"] = security;
        value["redis"]["password_env"] = "REDIS_PASSWORD".into();
        value["auth"] = serde_json::json!({
            "mode": "jwt", "algorithms": ["HS256"], "hs256_secret_env": "HS256_SECRET"
        });
        value["schema_registry"] = serde_json::json!({
            "urls": ["https://sr.internal"], "auth": {"type": "bearer", "token_env": "SR_TOKEN"}
        });
        accepted(&value)
    }

    #[test]
    fn secrets_are_listed_with_their_paths_and_readers() {
        use super::super::Process::{Consumer, Server};
        let sasl = every_secret(serde_json::json!({
            "protocol": "sasl_scram_sha_512", "username": "u", "password_env": "KAFKA_PASSWORD"
        }));
        let ssl = every_secret(serde_json::json!({
            "protocol": "ssl", "cert_pem": CERT, "key_pem_env": "KAFKA_KEY", "key_password_env": "KAFKA_KEY_PASSWORD"
        }));
        let listed: Vec<(&str, &str, &[super::super::Process])> = sasl
            .secrets()
            .into_iter()
            .chain(ssl.secrets())
            .map(|named| (named.secret.env_name(), named.path, named.readers))
            .collect();
        assert_eq!(
            listed,
            [
                (
                    "REDIS_PASSWORD",
                    "$.redis.password_env",
                    &[Server, Consumer][..]
                ),
                (
                    "KAFKA_PASSWORD",
                    "$.kafka.security.password_env",
                    &[Consumer]
                ),
                ("HS256_SECRET", "$.auth.hs256_secret_env", &[Server]),
                ("SR_TOKEN", "$.schema_registry.auth.token_env", &[Consumer]),
                (
                    "REDIS_PASSWORD",
                    "$.redis.password_env",
                    &[Server, Consumer]
                ),
                ("KAFKA_KEY", "$.kafka.security.key_pem_env", &[Consumer]),
                (
                    "KAFKA_KEY_PASSWORD",
                    "$.kafka.security.key_password_env",
                    &[Consumer]
                ),
                ("HS256_SECRET", "$.auth.hs256_secret_env", &[Server]),
                ("SR_TOKEN", "$.schema_registry.auth.token_env", &[Consumer]),
            ]
        );

        // Every field the schema names `*_env` is on the list: a new one cannot be left
        // out of the deploy's secret mappings unnoticed.
        fn env_fields(schema: &serde_json::Value, found: &mut std::collections::BTreeSet<String>) {
            match schema {
                serde_json::Value::Object(map) => {
                    if let Some(serde_json::Value::Object(properties)) = map.get("properties") {
                        found.extend(properties.keys().filter(|k| k.ends_with("_env")).cloned());
                    }
                    map.values().for_each(|v| env_fields(v, found));
                }
                serde_json::Value::Array(items) => items.iter().for_each(|v| env_fields(v, found)),
                _ => {}
            }
        }
        let schema: serde_json::Value =
            serde_json::from_str(super::super::SCHEMA).expect("the schema is JSON");
        let mut in_schema = std::collections::BTreeSet::new();
        env_fields(&schema, &mut in_schema);
        let listed: std::collections::BTreeSet<String> = listed
            .iter()
            .map(|(_, path, _)| path.rsplit('.').next().unwrap_or_default().to_owned())
            .collect();
        assert_eq!(in_schema, listed);
    }

    #[test]
    fn file_settings_are_listed_with_the_form_to_use_instead() {
        let mut value = minimal();
        value["kafka"]["security"] = serde_json::json!({
            "protocol": "ssl", "ca_file": "ca.pem", "cert_file": "c.pem", "key_file": "k.pem"
        });
        value["auth"] = serde_json::json!({
            "mode": "jwt", "algorithms": ["EdDSA"],
            "keys": [{"pem": "x"}, {"kid": "b", "pem_file": "keys/b.pem"}]
        });
        let manifest = accepted(&value);
        let listed: Vec<(String, String, &str)> = manifest
            .file_settings()
            .into_iter()
            .map(|f| {
                (
                    f.path,
                    f.file.display().to_string(),
                    f.instead.split(',').next().unwrap_or_default(),
                )
            })
            .collect();
        assert_eq!(
            listed,
            [
                ("$.kafka.security.ca_file".into(), "ca.pem".into(), "ca_pem"),
                (
                    "$.kafka.security.cert_file".into(),
                    "c.pem".into(),
                    "cert_pem"
                ),
                (
                    "$.kafka.security.key_file".into(),
                    "k.pem".into(),
                    "key_pem_env"
                ),
                ("$.auth.keys[1].pem_file".into(), "keys/b.pem".into(), "pem"),
            ]
        );
        assert!(accepted(&minimal()).file_settings().is_empty());
    }

    #[test]
    fn redis_takes_an_acl_user_and_a_database() {
        let mut value = minimal();
        value["redis"] = serde_json::json!({
            "url": "rediss://cache.internal:6380/2",
            "username": "fjord",
            "password_env": "FJORD_REDIS_PASSWORD"
        });
        let manifest = accepted(&value);
        assert_eq!(manifest.redis.username.as_deref(), Some("fjord"));
        assert_eq!(
            manifest.redis.password_env.as_ref().map(|s| s.env_name()),
            Some("FJORD_REDIS_PASSWORD")
        );
    }

    #[test]
    fn every_problem_is_listed_with_its_path() {
        let mut value = minimal();
        value["kafka"]["brokers"] = serde_json::json!(["no-port"]);
        value["server"] = serde_json::json!({"heartbeat_secs": 0, "client_queue": 0});
        value["auth"] = serde_json::json!({"mode": "jwt", "algorithms": []});
        let error = error_of(&value);
        assert_eq!(
            error.lines().collect::<Vec<_>>(),
            [
                "4 problems",
                "  $.kafka.brokers[0]: \"no-port\" is not host:port",
                "  $.server.heartbeat_secs: must be 1 to 3600",
                "  $.server.client_queue: must be 1 to 1000000",
                "  $.auth.algorithms: name at least one algorithm",
            ]
        );

        // Mistakes of form: each section is read on its own, so one does not hide another.
        let mut value = minimal();
        value["kafka"]["brokers"] = "127.0.0.1:9092".into();
        value["endpoints"]["orders"]["start"] = "newest".into();
        value["consumer_groups"][0]["members"] = "two".into();
        value["unknown"] = true.into();
        value.as_object_mut().expect("an object").remove("auth");
        let error = error_of(&value);
        for path in [
            "$: missing field `auth`",
            "$.kafka.brokers: invalid type: a string, expected a sequence",
            "$.endpoints.orders.start: unknown variant, expected",
            "$.consumer_groups[0].members: invalid type: a string, expected u32",
            "$: unknown field `unknown`",
        ] {
            assert!(error.contains(&format!("\n  {path}")), "{path}: {error}");
        }
        assert!(error.starts_with("5 problems"), "{error}");
    }

    #[test]
    fn values_are_not_quoted_where_they_may_be_secrets() {
        use super::{shown, without_values};
        assert_eq!(
            without_values(r#"invalid type: string "hunter2 \"x\"", expected a map"#),
            "invalid type: a string, expected a map"
        );
        assert_eq!(
            without_values("unknown variant `hunter2`, expected one of `a`, `b`"),
            "unknown variant, expected one of `a`, `b`"
        );
        assert_eq!(
            without_values("unknown variant `hunter2`, there are no variants"),
            "unknown variant, there are no variants"
        );
        assert_eq!(
            without_values(r#"invalid value: string "x", expected y; invalid type: string "z""#),
            "invalid value: a string, expected y; invalid type: a string"
        );
        assert_eq!(shown("redis://h:1"), r#""redis://h:1""#);
        assert_eq!(shown("REDIS://u:pw@h:1/0"), r#""REDIS://***@h:1/0""#);
        assert_eq!(shown("u:p/w?#@h:1"), r#""***@h:1""#);
    }

    #[test]
    fn without_access_control_the_server_listens_on_loopback_unless_told() {
        let open = accepted(&minimal());
        assert_eq!(open.server_host(), std::net::Ipv4Addr::LOCALHOST);
        let mut value = minimal();
        value["server"] = serde_json::json!({"host": "0.0.0.0"});
        assert!(accepted(&value).server_host().is_unspecified());
        value["server"] = serde_json::json!({});
        value["auth"] =
            serde_json::json!({"mode": "jwt", "algorithms": ["EdDSA"], "keys": [{"pem": "x"}]});
        assert!(accepted(&value).server_host().is_unspecified());
    }

    #[test]
    fn trailing_garbage_is_refused() {
        let text = format!("{} {{", minimal());
        assert!(Manifest::parse(&text).is_err());
    }
}
