//! The Schema Registry client: fetches a writer's schema by id (`GET /schemas/ids/{id}`, its
//! references by subject and version, and which subject and version the id is), parses it
//! once ([`crate::decode`] uses it), and keeps it in a cache bounded by the manifest's
//! `cache_schemas`, refusals included, so the registry is asked once per id. A registry that
//! does not answer, or answers 5xx, is [`FetchError::Down`]: the caller waits with the shared
//! backoff and asks again, and the record waits with it.
//!
//! The HTTP client is ureq's blocking one, run on tokio's blocking pool: a request happens
//! once per schema id, and ureq brings no hyper into the consumer (issue 23).

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use fjord_config::{ManifestError, RegistryAuth, SchemaRegistryConfig};
use prost_reflect::{DescriptorPool, MessageDescriptor};
use serde::Deserialize;

/// How long one request may take before the registry counts as down.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Largest answer read from the registry: a schema is kilobytes, so a bigger answer is
/// refused rather than held in memory.
const MAX_ANSWER_BYTES: u64 = 16 * 1024 * 1024;

/// Most schemas one schema may reference, through its references' references: a bound on
/// a cycle or a very deep chain.
const MAX_REFERENCES: usize = 64;

/// Why a schema could not be had.
#[derive(Debug, Clone, thiserror::Error)]
pub enum FetchError {
    /// The registry cannot be reached or failed (5xx): ask again later.
    #[error("schema registry unavailable: {0}")]
    Down(String),
    /// The registry answered, and the answer is final: no such id, access refused, or a
    /// schema that does not parse. Kept in the cache like a schema.
    #[error("{0}")]
    Refused(String),
}

/// A parsed writer's schema.
#[derive(Debug)]
pub struct WriterSchema {
    /// The schema's id.
    pub id: u32,
    /// The subject and version the id is registered under, when the registry names one.
    pub subject: Option<(String, i64)>,
    /// What decodes records written with it.
    pub kind: SchemaKind,
}

/// A schema by its type.
#[derive(Debug)]
#[allow(
    clippy::large_enum_variant,
    reason = "one per schema id, kept in an Arc: their size does not matter"
)]
pub enum SchemaKind {
    /// Avro: the schema and the named schemas it references.
    Avro {
        schema: apache_avro::Schema,
        references: Vec<apache_avro::Schema>,
        /// Their named types, for the decoder.
        names: crate::decode::AvroNames,
    },
    /// Protobuf: the messages of the schema's own file, top level, in declaration order.
    Protobuf { messages: Vec<MessageDescriptor> },
    /// JSON Schema: the record is JSON text; the schema's text is kept for `fjord types`.
    Json { schema: String },
}

impl SchemaKind {
    /// A schema without references as the registry would return it: `schema_type` is its
    /// `schemaType` (`AVRO`, `PROTOBUF` or `JSON`).
    pub fn parse(schema_type: &str, schema: &str) -> Result<Self, String> {
        let schema_type = serde_json::from_value(serde_json::Value::from(schema_type))
            .map_err(|error| format!("schema type {schema_type:?}: {error}"))?;
        parse(
            &SchemaResponse {
                schema: schema.to_owned(),
                schema_type,
                references: Vec::new(),
            },
            &[],
        )
    }
}

/// A schema's type as the registry names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
enum SchemaType {
    #[default]
    Avro,
    Protobuf,
    Json,
}

#[derive(Debug, Deserialize)]
struct Reference {
    name: String,
    subject: String,
    version: i64,
}

/// `GET /schemas/ids/{id}` and `GET /subjects/{s}/versions/{v}`.
#[derive(Debug, Deserialize)]
struct SchemaResponse {
    schema: String,
    #[serde(default, rename = "schemaType")]
    schema_type: SchemaType,
    #[serde(default)]
    references: Vec<Reference>,
}

/// `GET /subjects/{s}/versions/latest`.
#[derive(Debug, Deserialize)]
struct LatestResponse {
    id: u32,
    version: i64,
    #[serde(flatten)]
    schema: SchemaResponse,
}

/// A subject name as one path segment.
fn encode_path(subject: &str) -> String {
    percent_encoding::utf8_percent_encode(subject, percent_encoding::NON_ALPHANUMERIC).to_string()
}

/// One of `GET /schemas/ids/{id}/versions`.
#[derive(Debug, Deserialize)]
struct SubjectVersion {
    subject: String,
    version: i64,
}

/// The registry's schemas, fetched once per id.
#[derive(Debug)]
pub struct Registry {
    client: ureq::Agent,
    urls: Arc<[String]>,
    authorization: Option<Arc<str>>,
    capacity: usize,
    cache: HashMap<u32, Result<Arc<WriterSchema>, FetchError>>,
    /// Ids in the order they were cached: the oldest goes first when the cache is full.
    order: VecDeque<u32>,
}

impl Registry {
    /// A client for the manifest's registry, its secret read from the environment and its
    /// CA (the system's unless one is given) loaded.
    pub fn new(config: &SchemaRegistryConfig) -> Result<Self, ManifestError> {
        let authorization = match &config.auth {
            None => None,
            Some(RegistryAuth::Basic {
                username,
                password_env,
            }) => Some(format!(
                "Basic {}",
                BASE64.encode(format!("{username}:{}", password_env.read()?))
            )),
            Some(RegistryAuth::Bearer { token_env }) => {
                Some(format!("Bearer {}", token_env.read()?))
            }
        }
        .map(Arc::from);
        let client = ureq::Agent::config_builder()
            .tls_config(tls_config(config)?)
            .timeout_global(Some(REQUEST_TIMEOUT))
            // Statuses are sorted below: 5xx and 429 are "down", the rest "refused".
            .http_status_as_error(false)
            .build()
            .into();
        Ok(Self {
            client,
            urls: config
                .urls
                .iter()
                .map(|url| url.trim_end_matches('/').to_owned())
                .collect::<Vec<_>>()
                .into(),
            authorization,
            // A record may need two schemas at once, its key's and its value's.
            capacity: config.cache_schemas.max(2),
            cache: HashMap::new(),
            order: VecDeque::new(),
        })
    }

    /// The schema with `id` if it is in the cache (`Err` if the registry refused it),
    /// without asking the registry.
    pub fn cached(&self, id: u32) -> Option<Result<Arc<WriterSchema>, String>> {
        self.cache
            .get(&id)
            .map(|cached| cached.clone().map_err(|refused| refused.to_string()))
    }

    /// The schema with `id`, from the cache or else from the registry. A refusal is cached
    /// too; a registry that is down is not, and is asked again at the next call.
    pub async fn schema(&mut self, id: u32) -> Result<Arc<WriterSchema>, FetchError> {
        if let Some(cached) = self.cache.get(&id) {
            return cached.clone();
        }
        let fetched = self.fetch(id).await.map(Arc::new);
        if let Err(FetchError::Down(_)) = fetched {
            return fetched;
        }
        if self.order.len() >= self.capacity
            && let Some(oldest) = self.order.pop_front()
        {
            self.cache.remove(&oldest);
        }
        self.order.push_back(id);
        self.cache.insert(id, fetched.clone());
        fetched
    }

    /// The latest version of `subject`'s schema, parsed (for `fjord types`); not cached.
    pub async fn latest(&self, subject: &str) -> Result<WriterSchema, FetchError> {
        let path = format!("/subjects/{}/versions/latest", encode_path(subject));
        let response: LatestResponse = self.get(&path).await?;
        let mut references = Vec::new();
        self.references(&response.schema.references, &mut references)
            .await?;
        let kind = parse(&response.schema, &references).map_err(|error| {
            FetchError::Refused(format!("{subject}'s schema does not parse: {error}"))
        })?;
        Ok(WriterSchema {
            id: response.id,
            subject: Some((subject.to_owned(), response.version)),
            kind,
        })
    }

    async fn fetch(&self, id: u32) -> Result<WriterSchema, FetchError> {
        let response: SchemaResponse = self.get(&format!("/schemas/ids/{id}")).await?;
        let mut references = Vec::new();
        self.references(&response.references, &mut references)
            .await?;
        let kind = parse(&response, &references)
            .map_err(|error| FetchError::Refused(format!("schema {id} does not parse: {error}")))?;
        // Which subject and version: for the envelope only, so a registry without this call
        // (or an id under several subjects) leaves it out.
        let subject = match self
            .get::<Vec<SubjectVersion>>(&format!("/schemas/ids/{id}/versions"))
            .await
        {
            Ok(versions) => match versions.as_slice() {
                [one] => Some((one.subject.clone(), one.version)),
                _ => None,
            },
            Err(FetchError::Refused(_)) => None,
            Err(down) => return Err(down),
        };
        Ok(WriterSchema { id, subject, kind })
    }

    /// Fetches `wanted` and what they reference, depth first, into `found` (by the name the
    /// referencing schema imports them as).
    async fn references(
        &self,
        wanted: &[Reference],
        found: &mut Vec<(String, SchemaResponse)>,
    ) -> Result<(), FetchError> {
        let mut stack: Vec<(String, String, i64)> = wanted
            .iter()
            .map(|r| (r.name.clone(), r.subject.clone(), r.version))
            .collect();
        while let Some((name, subject, version)) = stack.pop() {
            if found.iter().any(|(known, _)| *known == name) {
                continue;
            }
            if found.len() >= MAX_REFERENCES {
                return Err(FetchError::Refused(format!(
                    "more than {MAX_REFERENCES} schema references"
                )));
            }
            let path = format!("/subjects/{}/versions/{version}", encode_path(&subject));
            let response: SchemaResponse = self.get(&path).await?;
            stack.extend(
                response
                    .references
                    .iter()
                    .map(|r| (r.name.clone(), r.subject.clone(), r.version)),
            );
            found.push((name, response));
        }
        Ok(())
    }

    /// `GET` of `path` from the first URL that answers, on the blocking pool.
    async fn get<T>(&self, path: &str) -> Result<T, FetchError>
    where
        T: serde::de::DeserializeOwned + Send + 'static,
    {
        let client = self.client.clone();
        let urls = Arc::clone(&self.urls);
        let authorization = self.authorization.clone();
        let path = path.to_owned();
        tokio::task::spawn_blocking(move || get(&client, &urls, authorization.as_deref(), &path))
            .await
            .unwrap_or_else(|error| Err(FetchError::Down(error.to_string())))
    }
}

/// [`Registry::get`]'s blocking half.
fn get<T: serde::de::DeserializeOwned>(
    client: &ureq::Agent,
    urls: &[String],
    authorization: Option<&str>,
    path: &str,
) -> Result<T, FetchError> {
    let mut down = String::new();
    for base in urls {
        let mut request = client.get(format!("{base}{path}")).header(
            "Accept",
            "application/vnd.schemaregistry.v1+json, application/json",
        );
        if let Some(authorization) = authorization {
            request = request.header("Authorization", authorization);
        }
        let mut response = match request.call() {
            Ok(response) => response,
            Err(error) => {
                // ureq's errors name no URL; the base (which carries no secret) says which.
                down = format!("{base}: {error}");
                continue;
            }
        };
        let status = response.status();
        if status.is_server_error() || status == ureq::http::StatusCode::TOO_MANY_REQUESTS {
            down = format!("{base}{path}: HTTP {status}");
            continue;
        }
        if !status.is_success() {
            return Err(FetchError::Refused(format!(
                "the registry answered {path} with HTTP {status}"
            )));
        }
        return match response
            .body_mut()
            .with_config()
            .limit(MAX_ANSWER_BYTES)
            .read_json::<T>()
        {
            Ok(body) => Ok(body),
            Err(error @ (ureq::Error::Json(_) | ureq::Error::BodyExceedsLimit(_))) => {
                Err(FetchError::Refused(format!(
                    "the registry's answer to {path} is not what the Confluent API returns: {error}"
                )))
            }
            Err(error) => {
                down = format!("{base}: {error}");
                continue;
            }
        };
    }
    Err(FetchError::Down(down))
}

fn invalid(path: &str, message: String) -> ManifestError {
    ManifestError::Invalid {
        file: None,
        path: path.into(),
        message,
    }
}

/// TLS over rustls and ring with the system's roots, or the manifest's CA instead.
fn tls_config(config: &SchemaRegistryConfig) -> Result<ureq::tls::TlsConfig, ManifestError> {
    let mut roots = Vec::new();
    let pem = match (&config.ca_file, &config.ca_pem) {
        (Some(file), _) => Some(std::fs::read(file).map_err(|error| {
            invalid(
                "$.schema_registry.ca_file",
                format!("cannot read {}: {error}", file.display()),
            )
        })?),
        (None, Some(pem)) => Some(pem.clone().into_bytes()),
        (None, None) => None,
    };
    match pem {
        Some(pem) => {
            use rustls::pki_types::pem::PemObject as _;
            // A CA that is not one fails here, at start, rather than at the first fetch.
            let mut check = rustls::RootCertStore::empty();
            for certificate in rustls::pki_types::CertificateDer::pem_slice_iter(&pem) {
                let der = certificate
                    .map_err(|error| error.to_string())
                    .and_then(|der| {
                        check
                            .add(der.clone())
                            .map(|()| der)
                            .map_err(|error| error.to_string())
                    })
                    .map_err(|error| invalid("$.schema_registry", format!("the CA: {error}")))?;
                roots.push(ureq::tls::Certificate::from_der(&der).to_owned());
            }
        }
        None => {
            let native = rustls_native_certs::load_native_certs();
            roots.extend(
                native
                    .certs
                    .iter()
                    .map(|der| ureq::tls::Certificate::from_der(der).to_owned()),
            );
        }
    }
    Ok(ureq::tls::TlsConfig::builder()
        .root_certs(ureq::tls::RootCerts::Specific(Arc::new(roots)))
        .unversioned_rustls_crypto_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .build())
}

/// Parses a schema of any type with its references (name, schema), fetched beforehand.
fn parse(
    response: &SchemaResponse,
    references: &[(String, SchemaResponse)],
) -> Result<SchemaKind, String> {
    match response.schema_type {
        SchemaType::Avro => {
            let (schema, references) = apache_avro::Schema::parse_str_with_list(
                &response.schema,
                references.iter().map(|(_, r)| r.schema.as_str()),
            )
            .map_err(|error| error.to_string())?;
            let names = crate::decode::AvroNames::of(&schema, &references);
            Ok(SchemaKind::Avro {
                schema,
                references,
                names,
            })
        }
        SchemaType::Protobuf => parse_protobuf(&response.schema, references),
        SchemaType::Json => Ok(SchemaKind::Json {
            schema: response.schema.clone(),
        }),
    }
}

/// The name the schema's own file gets when its text names none.
const MAIN_PROTO: &str = "fjord-registry-schema.proto";

/// A `.proto` file from the registry: text, or a base64 serialized `FileDescriptorProto`
/// (how Confluent's serializers register schemas, and how some registries return them).
fn proto_file(name: &str, schema: &str) -> Result<protox::file::File, String> {
    // `.proto` text always holds a space or a line break, which base64 never does.
    if let Ok(bytes) = BASE64.decode(schema.trim()) {
        let mut file = protox::file::File::decode_file_descriptor_proto(bytes.as_slice())
            .map_err(|e| e.to_string())?;
        if file.name().is_empty() {
            let mut descriptor = file.file_descriptor_proto().clone();
            descriptor.name = Some(name.to_owned());
            file = protox::file::File::from_file_descriptor_proto(descriptor);
        }
        return Ok(file);
    }
    protox::file::File::from_source(name, schema).map_err(|error| error.to_string())
}

/// The registry's files by name, then the well-known `google/protobuf/*` ones.
struct Files(HashMap<String, protox::file::File>);

impl protox::file::FileResolver for Files {
    fn open_file(&self, name: &str) -> Result<protox::file::File, protox::Error> {
        self.0
            .get(name)
            .cloned()
            .ok_or_else(|| protox::Error::file_not_found(name))
    }
}

fn parse_protobuf(
    schema: &str,
    references: &[(String, SchemaResponse)],
) -> Result<SchemaKind, String> {
    let main = proto_file(MAIN_PROTO, schema)?;
    let main_name = main.name().to_owned();
    let mut files = HashMap::from([(main_name.clone(), main)]);
    for (name, reference) in references {
        files.insert(name.clone(), proto_file(name, &reference.schema)?);
    }
    let mut resolver = protox::file::ChainFileResolver::new();
    resolver.add(Files(files));
    resolver.add(protox::file::GoogleFileResolver::new());
    let mut compiler = protox::Compiler::with_file_resolver(resolver);
    compiler.include_imports(true);
    compiler
        .open_file(&main_name)
        .map_err(|error| error.to_string())?;
    let pool: DescriptorPool = compiler.descriptor_pool();
    let file = pool
        .get_file_by_name(&main_name)
        .ok_or_else(|| format!("{main_name} is not in its own descriptor pool"))?;
    Ok(SchemaKind::Protobuf {
        messages: file.messages().collect(),
    })
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;

    /// A registry that answers `/schemas/ids/{id}` with an Avro schema for ids below 100
    /// and 404 above, and counts the requests for schemas (not for their versions).
    async fn registry() -> (String, Arc<AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("address"));
        let fetched = Arc::new(AtomicUsize::new(0));
        let count = Arc::clone(&fetched);
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                let mut request = vec![0; 4096];
                let read = socket.read(&mut request).await.unwrap_or(0);
                let request = String::from_utf8_lossy(&request[..read]).into_owned();
                let path = request.split(' ').nth(1).unwrap_or_default().to_owned();
                let id: u32 = path
                    .trim_start_matches("/schemas/ids/")
                    .split('/')
                    .next()
                    .and_then(|id| id.parse().ok())
                    .unwrap_or(u32::MAX);
                let (status, body) = if path.ends_with("/versions") {
                    (
                        "200 OK",
                        r#"[{"subject":"s-value","version":1}]"#.to_owned(),
                    )
                } else if id < 100 {
                    count.fetch_add(1, Ordering::SeqCst);
                    (
                        "200 OK",
                        serde_json::json!({"schema": "\"long\""}).to_string(),
                    )
                } else {
                    count.fetch_add(1, Ordering::SeqCst);
                    ("404 Not Found", r#"{"error_code":40403}"#.to_owned())
                };
                let response = format!(
                    "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = socket.write_all(response.as_bytes()).await;
            }
        });
        (url, fetched)
    }

    fn config(url: &str, cache_schemas: usize) -> SchemaRegistryConfig {
        SchemaRegistryConfig {
            urls: vec![url.to_owned()],
            auth: None,
            ca_file: None,
            ca_pem: None,
            cache_schemas,
        }
    }

    #[tokio::test]
    async fn each_id_is_fetched_once_refusals_too_within_a_bounded_cache() {
        let (url, fetched) = registry().await;
        let mut registry = Registry::new(&config(&url, 2)).expect("client");
        let schema = registry.schema(1).await.expect("schema 1");
        assert_eq!(schema.subject, Some(("s-value".to_owned(), 1)));
        assert!(matches!(schema.kind, SchemaKind::Avro { .. }));
        registry.schema(1).await.expect("cached");
        assert!(matches!(
            registry.schema(404).await,
            Err(FetchError::Refused(_))
        ));
        assert!(matches!(
            registry.schema(404).await,
            Err(FetchError::Refused(_))
        ));
        assert_eq!(fetched.load(Ordering::SeqCst), 2, "once per id");
        // A third id takes the oldest one's place.
        registry.schema(2).await.expect("schema 2");
        registry.schema(1).await.expect("schema 1 again");
        assert_eq!(fetched.load(Ordering::SeqCst), 4);
        assert!(registry.cache.len() <= 2);
    }

    #[tokio::test]
    async fn an_answer_without_end_is_refused_once_it_passes_the_bound() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("address"));
        tokio::spawn(async move {
            let Ok((mut socket, _)) = listener.accept().await else {
                return;
            };
            let _ = socket.read(&mut [0; 4096]).await;
            let head = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n";
            let _ = socket.write_all(head.as_bytes()).await;
            // JSON whitespace, in chunks, until the client hangs up.
            let chunk = format!("10000\r\n{}\r\n", " ".repeat(0x10000));
            while socket.write_all(chunk.as_bytes()).await.is_ok() {}
        });
        let mut registry = Registry::new(&config(&url, 10)).expect("client");
        match registry.schema(1).await {
            // Refused for its size, not at the request's timeout.
            Err(FetchError::Refused(message)) => {
                assert!(message.contains(&MAX_ANSWER_BYTES.to_string()), "{message}");
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_registry_that_does_not_answer_is_down_and_asked_again() {
        // A port nothing listens on.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("address"));
        drop(listener);
        let mut registry = Registry::new(&config(&url, 10)).expect("client");
        assert!(matches!(registry.schema(1).await, Err(FetchError::Down(_))));
        assert!(registry.cache.is_empty(), "not cached");
    }
}
