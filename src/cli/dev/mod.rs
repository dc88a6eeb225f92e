//! `fjord dev`: the whole pipeline in one process with no external service — an in-process
//! Kafka (librdkafka's mock cluster), the in-process bus, the consumer, the server with a
//! demo page at `/`, and a producer of SuperEats-style events. Flags point it at a real
//! Kafka and Redis instead, and turn access control on with a key pair made for the run.

mod producer;

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::mpsc as std_mpsc;
use std::time::Duration;

use rdkafka::mocking::MockCluster;

use crate::setup::{self, SetupError, TokenRequest};
use fjord_bus::{Bus, BusError};
use fjord_config::{Manifest, ManifestError, OffsetReset};
use fjord_consumer::ConsumerError;
use fjord_server::ServerError;
use fjord_server::StaticFile;

/// What `fjord dev` serves besides the streams: the demo page at `/`, and the JavaScript
/// client it imports (built from `client/`; `ci/test-client.sh` keeps the copy fresh).
pub const DEMO_FILES: &[StaticFile] = &[
    StaticFile {
        path: "/",
        content_type: "text/html; charset=utf-8",
        body: include_str!("demo.html"),
    },
    StaticFile {
        path: "/fjord-client.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_str!("fjord-client.js"),
    },
];

/// The topics (and endpoints) of the demo.
pub const DEMO_TOPICS: [&str; 2] = ["orders", "drivers"];
const DEMO_PARTITIONS: i32 = 3;
/// How long the token that `fjord dev --auth` prints lives.
const DEV_TOKEN_TTL: Duration = Duration::from_secs(12 * 3600);
/// The key id that `fjord setup` writes and `fjord token` signs with by default.
const DEV_KEY_ID: &str = "fjord-setup";
/// How long `fjord dev` waits for a Kafka or Redis it was pointed at before it gives up,
/// saying which: a developer who mistyped an address learns it at once, not never.
pub const CONNECT_PATIENCE: Duration = Duration::from_secs(10);

/// Access control of `fjord dev`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DevAuth {
    /// Every endpoint open to anyone.
    Off,
    /// JWTs signed by a key pair made in a temporary folder, removed at exit.
    TemporaryKeys,
    /// JWTs signed by the key pair in this folder (`fjord setup`'s files), made there when
    /// missing and kept.
    Keys(PathBuf),
}

/// What `fjord dev` runs against.
#[derive(Debug, Clone)]
pub struct DevOptions {
    /// Address of the HTTP server.
    pub host: IpAddr,
    /// Port of the HTTP server.
    pub port: u16,
    /// Real Kafka brokers instead of the in-process cluster.
    pub kafka: Option<String>,
    /// A real Redis instead of the in-process bus.
    pub redis: Option<DevRedis>,
    /// Whether to run the demo producer.
    pub demo_producer: bool,
    /// A Schema Registry's URL: the topics are read with format `auto` through it.
    pub schema_registry: Option<String>,
    /// Access control.
    pub auth: DevAuth,
    /// Whether streams are sent compressed to clients that accept gzip or deflate.
    pub compression: bool,
}

/// The variable `fjord dev` reads a Redis password from, when it is set and no other is named.
pub const DEFAULT_REDIS_PASSWORD_ENV: &str = "FJORD_REDIS_PASSWORD";

/// A real Redis for `fjord dev`, with what its manifest section needs.
#[derive(Debug, Clone)]
pub struct DevRedis {
    /// `redis://host:port` or `rediss://` for TLS, without credentials.
    pub url: String,
    /// The ACL user, if not Redis's default user.
    pub username: Option<String>,
    /// The variable holding the password; [`DEFAULT_REDIS_PASSWORD_ENV`] when that is set.
    pub password_env: Option<String>,
}

impl DevRedis {
    fn section(&self) -> serde_json::Value {
        let mut section = serde_json::json!({"url": self.url, "key_prefix": "fjord-dev"});
        if let Some(username) = &self.username {
            section["username"] = username.as_str().into();
        }
        let password_env = self.password_env.as_deref().or_else(|| {
            std::env::var_os(DEFAULT_REDIS_PASSWORD_ENV)
                .is_some()
                .then_some(DEFAULT_REDIS_PASSWORD_ENV)
        });
        if let Some(env) = password_env {
            section["password_env"] = env.into();
        }
        section
    }
}

/// Why `fjord dev` stopped.
#[derive(Debug, thiserror::Error)]
pub enum DevError {
    /// The in-process Kafka could not start.
    #[error("in-process kafka: {0}")]
    MockCluster(String),
    /// The generated manifest was refused (a bad flag value).
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    /// The bus failed.
    #[error(transparent)]
    Bus(#[from] BusError),
    /// The consumer failed.
    #[error(transparent)]
    Consumer(#[from] ConsumerError),
    /// The server failed.
    #[error(transparent)]
    Server(#[from] ServerError),
    /// A Kafka or Redis that `fjord dev` was pointed at did not answer in time.
    #[error(
        "{service} at {address} did not answer within {} s: is it running, and is that its address?",
        waited.as_secs()
    )]
    Unreachable {
        /// `Kafka` or `Redis`.
        service: &'static str,
        /// Where it was looked for.
        address: String,
        /// How long it was waited for.
        waited: Duration,
    },
    /// The demo topics could not be created on the real Kafka.
    #[error("creating the demo topics")]
    CreateTopics(#[source] rdkafka::error::KafkaError),
    /// A demo topic could not be created on the real Kafka.
    #[error("creating topic {topic}: {code}")]
    CreateTopic {
        /// The topic.
        topic: String,
        /// Kafka's answer.
        code: rdkafka::error::RDKafkaErrorCode,
    },
    /// A task of the pipeline panicked or was cancelled.
    #[error("a task of fjord dev failed: {0}")]
    Task(String),
    /// The demo producer failed.
    #[error("demo producer")]
    Producer(#[from] rdkafka::error::KafkaError),
    /// The demo's Avro schema could not be registered with `--schema-registry`.
    #[error("schema registry: {0}")]
    Registry(String),
    /// The key pair for `--auth` could not be made, read or used.
    #[error("access control keys")]
    Keys(#[from] SetupError),
    /// The temporary folder for the keys could not be made.
    #[error("a temporary folder for the keys")]
    TempDir(#[source] std::io::Error),
}

/// An in-process Kafka cluster on a thread of its own (the mock cluster is not `Send`).
/// Dropping this stops it.
#[derive(Debug)]
pub struct InProcessKafka {
    bootstrap_servers: String,
    _stop: std_mpsc::Sender<()>,
}

impl InProcessKafka {
    /// Starts a one-broker cluster with `topics` of `partitions` each.
    pub fn start(topics: &[&str], partitions: i32) -> Result<Self, DevError> {
        let topics: Vec<String> = topics.iter().map(|t| (*t).to_owned()).collect();
        let (started_tx, started_rx) = std_mpsc::channel();
        let (stop_tx, stop_rx) = std_mpsc::channel::<()>();
        std::thread::Builder::new()
            .name("kafka-mock".into())
            .spawn(move || {
                let cluster = match MockCluster::new(1) {
                    Ok(cluster) => cluster,
                    Err(error) => {
                        let _ = started_tx.send(Err(error.to_string()));
                        return;
                    }
                };
                for topic in &topics {
                    if let Err(error) = cluster.create_topic(topic, partitions, 1) {
                        let _ = started_tx.send(Err(format!("creating topic {topic}: {error}")));
                        return;
                    }
                }
                let _ = started_tx.send(Ok(cluster.bootstrap_servers()));
                // Keeps the cluster alive until the handle is dropped.
                let _ = stop_rx.recv();
            })
            .map_err(|error| DevError::MockCluster(error.to_string()))?;
        let bootstrap_servers = started_rx
            .recv()
            .map_err(|_| DevError::MockCluster("the cluster thread ended".into()))?
            .map_err(DevError::MockCluster)?;
        Ok(Self {
            bootstrap_servers,
            _stop: stop_tx,
        })
    }

    /// The cluster's `bootstrap.servers`.
    pub fn bootstrap_servers(&self) -> &str {
        &self.bootstrap_servers
    }
}

/// The manifest `fjord dev` runs with; with `public_pem`, streams need a JWT it verifies.
///
/// The endpoints start at the oldest record they keep, and keep only the last minutes, so
/// that a page or a `curl` that connects gets the recent past at once and then goes on live.
pub fn manifest(
    brokers: &str,
    redis: Option<&DevRedis>,
    host: IpAddr,
    port: u16,
    public_pem: Option<&str>,
    schema_registry: Option<&str>,
) -> Result<Manifest, ManifestError> {
    let endpoints: serde_json::Map<String, serde_json::Value> = DEMO_TOPICS
        .iter()
        .map(|topic| {
            // Drivers matter only where they are now: a table, whose snapshot has each
            // driver's last position. Orders live for some minutes, and a page starts with
            // what the window holds.
            let endpoint = if *topic == "drivers" {
                serde_json::json!({
                    "topics": [topic],
                    "mode": "table",
                    "retention": {"max_records": 250, "max_age_secs": 60}
                })
            } else {
                serde_json::json!({
                    "topics": [topic],
                    "start": "oldest",
                    "retention": {"max_records": 600, "max_age_secs": 300}
                })
            };
            ((*topic).to_owned(), endpoint)
        })
        .collect();
    let auth = public_pem.map_or_else(
        || serde_json::json!({"mode": "disabled"}),
        |pem| {
            serde_json::json!({
                "mode": "jwt",
                "algorithms": ["EdDSA"],
                "keys": [{"kid": DEV_KEY_ID, "pem": pem}],
                "issuer": setup::DEFAULT_ISSUER,
                "audience": setup::DEFAULT_AUDIENCE
            })
        },
    );
    let mut manifest = serde_json::json!({
        "kafka": {"brokers": brokers.split(',').collect::<Vec<_>>()},
        // The in-process bus ignores the section; it is only there to be valid.
        "redis": redis.map_or_else(
            || serde_json::json!({"url": "redis://127.0.0.1:6379"}),
            DevRedis::section
        ),
        "endpoints": endpoints,
        "consumer_groups": [{"id": "fjord-dev", "topics": DEMO_TOPICS, "offset_reset": "latest"}],
        "server": {"host": host.to_string(), "port": port, "cors_origins": ["*"]},
        "auth": auth
    });
    // Every topic keeps format `auto`: the wire format with a schema id the registry knows
    // is decoded, anything else reads as before.
    if let Some(url) = schema_registry {
        manifest["schema_registry"] = serde_json::json!({"urls": [url]});
    }
    Manifest::parse(&manifest.to_string())
}

/// The key pair of `fjord dev --auth`, and the token it prints (no `Debug`: nothing
/// should print the token but the banner).
struct DevKeys {
    private_key: PathBuf,
    token: String,
    public_pem: String,
    /// Removes the temporary folder when dropped.
    _temporary: Option<tempfile::TempDir>,
}

impl DevKeys {
    fn new(auth: &DevAuth) -> Result<Option<Self>, DevError> {
        let (dir, temporary) = match auth {
            DevAuth::Off => return Ok(None),
            DevAuth::TemporaryKeys => {
                let temporary = tempfile::Builder::new()
                    .prefix("fjord-dev-")
                    .tempdir()
                    .map_err(DevError::TempDir)?;
                (temporary.path().to_owned(), Some(temporary))
            }
            DevAuth::Keys(dir) => (dir.clone(), None),
        };
        // Absolute, so that the `fjord token` line of the banner works from any folder.
        let dir = std::path::absolute(&dir).unwrap_or(dir);
        let private_key = dir.join(setup::PRIVATE_KEY_FILE);
        let public_key = dir.join(setup::PUBLIC_KEY_FILE);
        // A folder of `fjord setup` (or of an earlier run) keeps its keys; setup refuses to
        // overwrite either, so a folder with only one of them is an error that names it.
        if !(private_key.exists() && public_key.exists()) {
            setup::setup(&dir)?;
        }
        let public_pem = std::fs::read_to_string(&public_key).map_err(|source| SetupError::Io {
            path: public_key.clone(),
            source,
        })?;
        let token = setup::mint(
            &private_key,
            &TokenRequest {
                subject: "fjord-dev".into(),
                endpoints: DEMO_TOPICS.iter().map(|t| (*t).to_owned()).collect(),
                keys: Vec::new(),
                filters: Vec::new(),
                ttl: DEV_TOKEN_TTL,
                issuer: setup::DEFAULT_ISSUER.into(),
                audience: setup::DEFAULT_AUDIENCE.into(),
                key_id: Some(DEV_KEY_ID.into()),
            },
        )?;
        Ok(Some(Self {
            private_key,
            token,
            public_pem,
            _temporary: temporary,
        }))
    }
}

/// The `kcat` line that produces records into the demo's `orders`.
fn produce_command(brokers: &str) -> String {
    format!("kcat -b {brokers} -t orders -k order-1 -P")
}

/// The demo files, and `/dev.json`: what the page shows of this run (where to produce,
/// whether streams need a token).
fn demo_files(brokers: &str, in_process: bool, auth: bool) -> &'static [StaticFile] {
    let info = serde_json::json!({
        "kafka": brokers,
        "in_process_kafka": in_process,
        "topics": DEMO_TOPICS,
        "produce": produce_command(brokers),
        "auth": auth,
    });
    let mut files = DEMO_FILES.to_vec();
    files.push(StaticFile {
        path: "/dev.json",
        content_type: "application/json",
        // Made once per process and served until it exits: leaking it is the 'static.
        body: Box::leak(info.to_string().into_boxed_str()),
    });
    Box::leak(files.into_boxed_slice())
}

/// Runs `fjord dev` until Ctrl-C.
pub async fn run(options: DevOptions) -> Result<(), DevError> {
    let in_process_kafka = match &options.kafka {
        Some(_) => None,
        None => Some(InProcessKafka::start(&DEMO_TOPICS, DEMO_PARTITIONS)?),
    };
    let brokers = match (&options.kafka, &in_process_kafka) {
        (Some(brokers), _) => brokers.clone(),
        (None, Some(kafka)) => kafka.bootstrap_servers().to_owned(),
        (None, None) => return Err(DevError::MockCluster("no brokers".into())),
    };
    let keys = DevKeys::new(&options.auth)?;
    let mut manifest = manifest(
        &brokers,
        options.redis.as_ref(),
        options.host,
        options.port,
        keys.as_ref().map(|keys| keys.public_pem.as_str()),
        options.schema_registry.as_deref(),
    )?;
    manifest.server.compression = options.compression;
    announce_connecting(&brokers, in_process_kafka.is_some(), options.redis.as_ref());
    let fresh_topics = match &options.kafka {
        Some(_) => {
            within_patience(
                "Kafka",
                &brokers,
                producer::ensure_topics(&manifest, DEMO_PARTITIONS),
            )
            .await??
        }
        None => true,
    };
    // Topics that hold only this run's records are read from their start, so that the
    // history the producer writes first is not lost while the consumer joins its group.
    if fresh_topics && let Some(group) = manifest.consumer_groups.first_mut() {
        group.offset_reset = OffsetReset::Earliest;
    }
    let bus = match &options.redis {
        Some(redis) => {
            within_patience(
                "Redis",
                &redis.url,
                fjord_bus::connect_redis(&manifest.redis),
            )
            .await??
        }
        None => Bus::Memory(fjord_bus::memory::MemoryBus::new()),
    };
    let (readiness, consuming) = fjord_consumer::readiness();
    let bound = fjord_server::bind(&manifest)
        .await?
        .ready_while_consumer_consumes(consuming);
    let address = bound.local_addr().map_err(|source| ServerError::Bind {
        address: std::net::SocketAddr::new(options.host, options.port),
        source,
    })?;
    announce(
        &brokers,
        in_process_kafka.is_some(),
        options.redis.as_ref(),
        keys.as_ref(),
        options.schema_registry.as_deref(),
        address,
    );
    let files = demo_files(&brokers, in_process_kafka.is_some(), keys.is_some());

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut receiver: tokio::sync::watch::Receiver<bool>| async move {
        let _ = receiver.wait_for(|stop| *stop).await;
    };
    let group = manifest.consumer_groups[0].clone();
    let consumer = {
        let (manifest, bus, stop) = (manifest.clone(), bus.clone(), stopped(stop_rx.clone()));
        tokio::spawn(
            async move { fjord_consumer::run(&manifest, &group, &bus, stop, readiness).await },
        )
    };
    let producer = options.demo_producer.then(|| {
        let (manifest, stop) = (manifest.clone(), stopped(stop_rx.clone()));
        tokio::spawn(async move { producer::run(&manifest, stop).await })
    });
    let server = {
        let (manifest, bus, stop) = (manifest.clone(), bus.clone(), stopped(stop_rx.clone()));
        tokio::spawn(async move { fjord_server::serve(&manifest, &bus, bound, files, stop).await })
    };

    fjord_bus::process::shutdown_signal().await;
    let _ = stop_tx.send(true);
    if let Some(producer) = producer {
        flatten(producer.await)?;
    }
    flatten(consumer.await)?;
    flatten(server.await)?;
    drop(in_process_kafka);
    drop(keys);
    Ok(())
}

/// `connecting`'s outcome, or [`DevError::Unreachable`] once [`CONNECT_PATIENCE`] is over.
async fn within_patience<T>(
    service: &'static str,
    address: &str,
    connecting: impl Future<Output = T>,
) -> Result<T, DevError> {
    tokio::time::timeout(CONNECT_PATIENCE, connecting)
        .await
        .map_err(|_| DevError::Unreachable {
            service,
            address: address.to_owned(),
            waited: CONNECT_PATIENCE,
        })
}

fn flatten<E: Into<DevError>>(
    joined: Result<Result<(), E>, tokio::task::JoinError>,
) -> Result<(), DevError> {
    match joined {
        Ok(result) => result.map_err(Into::into),
        Err(error) => Err(DevError::Task(error.to_string())),
    }
}

/// How to run this program again from the user's shell: the name it was started by when
/// that came from the `PATH`, else its full path (`cargo run` starts `target/debug/fjord`).
fn program() -> String {
    let by_name = std::env::args_os()
        .next()
        .filter(|arg0| Path::new(arg0).components().count() == 1);
    by_name
        .or_else(|| std::env::current_exe().ok().map(PathBuf::into_os_string))
        .map_or_else(|| "fjord".to_owned(), |p| p.to_string_lossy().into_owned())
}

/// Says what `fjord dev` connects to before it does, so that a wait has a reason on screen.
#[allow(
    clippy::print_stdout,
    reason = "the developer's instructions go to the terminal"
)]
fn announce_connecting(brokers: &str, in_process: bool, redis: Option<&DevRedis>) {
    let kafka = (!in_process).then(|| format!("Kafka at {brokers}"));
    let redis = redis.map(|redis| format!("Redis at {}", redis.url));
    let services: Vec<String> = kafka.into_iter().chain(redis).collect();
    if !services.is_empty() {
        println!(
            "Connecting to {} (giving up after {} s)...",
            services.join(" and "),
            CONNECT_PATIENCE.as_secs()
        );
    }
}

#[allow(
    clippy::print_stdout,
    reason = "the developer's instructions go to the terminal"
)]
fn announce(
    brokers: &str,
    in_process: bool,
    redis: Option<&DevRedis>,
    keys: Option<&DevKeys>,
    schema_registry: Option<&str>,
    address: std::net::SocketAddr,
) {
    let page_host = if address.ip().is_unspecified() {
        "localhost".to_owned()
    } else {
        address.ip().to_string()
    };
    let base = format!("http://{page_host}:{}", address.port());
    let kafka = if in_process {
        "in-process Kafka"
    } else {
        "Kafka"
    };
    let bus = redis.map_or_else(
        || "the in-process bus".to_owned(),
        |redis| match &redis.username {
            Some(user) => format!("Redis at {} as {user}", redis.url),
            None => format!("Redis at {}", redis.url),
        },
    );
    println!();
    match keys {
        None => {
            println!("  Fjord dev is running.");
            println!();
            println!("  Demo page       {base}/");
            println!("  Stream          curl -N {base}/v1/streams/orders");
        }
        Some(keys) => {
            let token = &keys.token;
            let hours = DEV_TOKEN_TTL.as_secs() / 3600;
            println!("  Fjord dev is running, with access control on.");
            println!();
            // The token rides in the fragment, which the browser never sends to a server.
            println!("  Demo page       {base}/#token={token}");
            println!(
                "  Stream          curl -N -H \"Authorization: Bearer {token}\" {base}/v1/streams/orders"
            );
            println!("  Token           {token}");
            println!("                  (orders and drivers, every key, valid {hours} h)");
            println!(
                "  More tokens     {} token --private-key {} --endpoint drivers --key driver-3",
                program(),
                keys.private_key.display()
            );
        }
    }
    println!(
        "  {kafka:<15} {brokers}   (topics: {})",
        DEMO_TOPICS.join(", ")
    );
    println!(
        "  Produce         {}   (then type JSON lines)",
        produce_command(brokers)
    );
    println!("  Bus             {bus}");
    if let Some(url) = schema_registry {
        println!(
            "  Registry        {url}   (orders are written in Avro through it; records in its wire format arrive decoded)"
        );
    }
    println!();
    println!("  Ctrl-C stops everything.");
    println!();
}

#[cfg(test)]
mod tests {
    use super::*;
    use fjord_config::{EndpointMode, StartPosition};
    use fjord_server::auth::Authenticator;

    #[tokio::test]
    async fn auth_keys_sign_the_token_the_manifest_verifies_and_a_folder_keeps_them() {
        let dir = tempfile::tempdir().expect("temp dir");
        let keys = DevKeys::new(&DevAuth::Keys(dir.path().to_owned()))
            .expect("keys")
            .expect("auth is on");
        let manifest = manifest(
            "127.0.0.1:9092",
            None,
            IpAddr::from([127, 0, 0, 1]),
            0,
            Some(&keys.public_pem),
            None,
        )
        .expect("the dev manifest is valid");
        let auth = Authenticator::new(&manifest.auth, &manifest.server.filter_limits)
            .await
            .expect("keys load");
        let grant = auth
            .grant(Some(&keys.token))
            .await
            .expect("the banner's token");
        assert_eq!(
            grant.endpoints,
            Some(vec!["orders".to_owned(), "drivers".to_owned()])
        );
        assert_eq!(grant.keys, None);
        assert!(auth.grant(None).await.is_err(), "no token, no stream");

        // A second run on the same folder signs with the same key.
        let again = DevKeys::new(&DevAuth::Keys(dir.path().to_owned()))
            .expect("keys")
            .expect("auth is on");
        assert_eq!(again.public_pem, keys.public_pem);
        auth.grant(Some(&again.token)).await.expect("same key");
        let endpoint = |name: &str| {
            manifest
                .endpoints
                .iter()
                .find(|(endpoint, _)| endpoint.as_str() == name)
                .map(|(_, config)| config.clone())
                .expect("a demo endpoint")
        };
        assert_eq!(endpoint("orders").start, StartPosition::Oldest);
        assert_eq!(endpoint("drivers").mode, EndpointMode::Table);
    }

    #[test]
    fn temporary_keys_go_away_with_the_run() {
        let keys = DevKeys::new(&DevAuth::TemporaryKeys)
            .expect("keys")
            .expect("auth is on");
        let private_key = keys.private_key.clone();
        assert!(private_key.exists());
        drop(keys);
        assert!(!private_key.exists());
        assert!(DevKeys::new(&DevAuth::Off).expect("no keys").is_none());
    }
}
