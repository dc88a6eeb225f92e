//! Shared harness of the integration tests: the real Kafka and Redis (single-node, or the
//! Redis Cluster with `FJORD_TEST_BUS=cluster`) that `ci/test.sh` starts, the real
//! `fjord-consumer` and `fjord-server` binaries, and an SSE client.
#![allow(
    unreachable_pub,
    reason = "the harness's items are the modules' shared API"
)]
#![allow(clippy::unwrap_used, clippy::panic, reason = "a test fails loudly")]

pub mod redis_cluster;
pub mod tls;

use std::collections::BTreeMap;
use std::future::Future;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::producer::{FutureProducer, FutureRecord};

/// How long a test waits for any one thing before it fails.
pub const PATIENCE: Duration = Duration::from_secs(60);

fn required_env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!("{name} is not set: run the integration tests with ci/test.sh, which starts Kafka and Redis and sets it")
    })
}

/// The command that runs the tests which need the real services.
const SERVICES_HINT: &str =
    "run ci/test.sh, or ci/services.sh up then source /tmp/fjord-ci/env (FJORD_CI_STATE/env)";

/// Whether a test that needs the real Kafka and Redis must skip: true when
/// `FJORD_TEST_KAFKA_BROKERS` is not set (ci/services.sh's env file sets it with the others),
/// on a machine where they were never started. `cargo test` on a fresh clone then passes,
/// saying once per test binary what runs these tests. Under CI (`CI` set and not `false`) a
/// missing service is a failure, never a skip.
///
/// A test that needs them starts with `if skip_without_services() { return; }`.
pub fn skip_without_services() -> bool {
    if std::env::var_os("FJORD_TEST_KAFKA_BROKERS").is_some() {
        return false;
    }
    let ci = std::env::var("CI").is_ok_and(|ci| !ci.is_empty() && ci != "false" && ci != "0");
    assert!(
        !ci,
        "CI is set but FJORD_TEST_KAFKA_BROKERS is not: the services are missing ({SERVICES_HINT})"
    );
    static SAID: std::sync::Once = std::sync::Once::new();
    SAID.call_once(|| {
        // Past the test harness's capture, which would hide the line of a passing test.
        use std::io::Write as _;
        let test = std::env::current_exe().ok();
        let name = test
            .as_deref()
            .and_then(Path::file_stem)
            .and_then(|stem| stem.to_str())
            .and_then(|stem| stem.rsplit_once('-').map(|(name, _hash)| name))
            .unwrap_or("these tests");
        let _ = writeln!(
            std::io::stderr(),
            "{name}: skipped the tests that need Kafka and Redis: {SERVICES_HINT}"
        );
    });
    true
}

/// The real services.
pub struct Services {
    pub brokers: String,
    pub sasl_brokers: String,
    pub scram_user: String,
    pub scram_password: String,
    pub redis_url: String,
    /// Every node of the shared Redis Cluster, when `ci/services.sh` started one.
    pub redis_cluster_urls: Option<Vec<String>>,
}

pub fn services() -> Services {
    Services {
        brokers: required_env("FJORD_TEST_KAFKA_BROKERS"),
        sasl_brokers: required_env("FJORD_TEST_KAFKA_SASL_BROKERS"),
        scram_user: required_env("FJORD_TEST_SCRAM_USER"),
        scram_password: required_env("FJORD_TEST_SCRAM_PASSWORD"),
        redis_url: required_env("FJORD_TEST_REDIS_URL"),
        redis_cluster_urls: std::env::var("FJORD_TEST_REDIS_CLUSTER_URLS")
            .ok()
            .filter(|urls| !urls.is_empty())
            .map(|urls| urls.split(',').map(str::to_owned).collect()),
    }
}

/// Which Redis the bus of the tests runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BusKind {
    /// The single-node Redis (`FJORD_TEST_REDIS_URL`); the default.
    Single,
    /// The shared Redis Cluster (`FJORD_TEST_REDIS_CLUSTER_URLS`): `FJORD_TEST_BUS=cluster`.
    Cluster,
}

pub fn bus_kind() -> BusKind {
    match std::env::var("FJORD_TEST_BUS").as_deref() {
        Err(_) | Ok("" | "single") => BusKind::Single,
        Ok("cluster") => BusKind::Cluster,
        Ok(other) => panic!("FJORD_TEST_BUS={other}: want single or cluster"),
    }
}

/// The manifest's `redis` section for the bus of [`bus_kind`], under `key_prefix`: the
/// single Redis, or the shared cluster's first node as `url` and the others as seeds.
pub fn redis_section(services: &Services, key_prefix: &str) -> serde_json::Value {
    match bus_kind() {
        BusKind::Single => serde_json::json!({"url": services.redis_url, "key_prefix": key_prefix}),
        BusKind::Cluster => {
            let urls = services.redis_cluster_urls.as_deref().unwrap_or_else(|| {
                panic!("FJORD_TEST_BUS=cluster, but FJORD_TEST_REDIS_CLUSTER_URLS is not set: ci/services.sh up starts the cluster and writes it")
            });
            serde_json::json!({
                "url": urls[0],
                "cluster": {"seed_urls": urls[1..]},
                "key_prefix": key_prefix
            })
        }
    }
}

/// A connection for raw commands on `key` to the Redis of [`bus_kind`]: the single Redis, or
/// the cluster's primary that serves `key`'s slot (a plain connection, which follows no
/// redirection).
pub async fn redis_connection_for(
    services: &Services,
    key: &str,
) -> redis::aio::MultiplexedConnection {
    let url = match bus_kind() {
        BusKind::Single => services.redis_url.clone(),
        BusKind::Cluster => format!(
            "redis://127.0.0.1:{}",
            redis_cluster::RedisCluster::shared().primary_of(key)
        ),
    };
    redis::Client::open(url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap_or_else(|error| panic!("connect to {url}: {error}"))
}

/// Stops the Redis of [`bus_kind`] (every node of the shared cluster), keeping its data.
pub fn stop_bus_redis() {
    services_command(match bus_kind() {
        BusKind::Single => "stop-redis",
        BusKind::Cluster => "stop-redis-cluster",
    });
}

/// Starts the Redis of [`bus_kind`] again with its data; the cluster is ok when it returns.
pub fn start_bus_redis() {
    services_command(match bus_kind() {
        BusKind::Single => "start-redis",
        BusKind::Cluster => "start-redis-cluster",
    });
}

/// A name no other test run uses.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}-{:016x}", fastrand::u64(..))
}

/// A loopback port that was free a moment ago, and that this test process has not handed out
/// before.
///
/// It is drawn below the kernel's ephemeral range when that leaves room: a port from `bind(0)`
/// is free again once its probe closes, and the outgoing connections of tests running in
/// parallel may take it as their local port before the server binds it.
pub fn free_port() -> u16 {
    free_ports(1)
}

/// The first of `count` consecutive loopback ports that were all free a moment ago, drawn as
/// [`free_port`] draws one (a Redis Cluster takes a block: its nodes' ports and their cluster
/// bus ports).
pub fn free_ports(count: u16) -> u16 {
    static HANDED_OUT: Mutex<Vec<u16>> = Mutex::new(Vec::new());
    let below_ephemeral = ephemeral_range_start()
        .filter(|start| *start > 25_000)
        .map(|start| 20_000..start - count);
    loop {
        let wanted = below_ephemeral.clone().map_or(0, fastrand::u16);
        let Ok(probe) = std::net::TcpListener::bind(("127.0.0.1", wanted)) else {
            continue;
        };
        let first = probe.local_addr().unwrap().port();
        let Some(end) = first.checked_add(count) else {
            continue;
        };
        let others: Option<Vec<_>> = (first + 1..end)
            .map(|port| std::net::TcpListener::bind(("127.0.0.1", port)).ok())
            .collect();
        if others.is_none() {
            continue;
        }
        let mut handed_out = HANDED_OUT.lock().unwrap();
        if (first..end).all(|port| !handed_out.contains(&port)) {
            handed_out.extend(first..end);
            return first;
        }
    }
}

fn ephemeral_range_start() -> Option<u16> {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Creates a topic and waits until the broker has it.
pub async fn create_topic(brokers: &str, topic: &str, partitions: i32) {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .unwrap();
    let results = admin
        .create_topics(
            &[NewTopic::new(topic, partitions, TopicReplication::Fixed(1))],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(30))),
        )
        .await
        .unwrap();
    for result in results {
        result.unwrap();
    }
}

/// One record to produce.
#[derive(Debug, Clone)]
pub struct TestRecord {
    pub partition: i32,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
}

/// Produces records with a real producer and waits until Kafka acknowledged every one;
/// returns (partition, offset) of each, in the order given.
pub async fn produce(brokers: &str, topic: &str, records: &[TestRecord]) -> Vec<(i32, i64)> {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("acks", "all")
        .set("enable.idempotence", "true")
        .create()
        .unwrap();
    // All in flight at once; the idempotent producer keeps each partition in order.
    let deliveries = records.iter().map(|record| {
        let mut future_record = FutureRecord::<[u8], [u8]>::to(topic).partition(record.partition);
        if let Some(key) = &record.key {
            future_record = future_record.key(key.as_slice());
        }
        if let Some(value) = &record.value {
            future_record = future_record.payload(value.as_slice());
        }
        producer.send(future_record, Duration::from_secs(60))
    });
    futures_util::future::join_all(deliveries)
        .await
        .into_iter()
        .map(|delivery| match delivery {
            Ok(delivery) => (delivery.partition, delivery.offset),
            Err((error, _)) => panic!("produce to {topic}: {error}"),
        })
        .collect()
}

/// JSON records `{"seq": n}` keyed `key-<n % keys>`, spread over `partitions`.
pub fn json_records(count: usize, partitions: i32, keys: usize) -> Vec<TestRecord> {
    (0..count)
        .map(|n| TestRecord {
            partition: i32::try_from(n).unwrap() % partitions,
            key: Some(format!("key-{}", n % keys).into_bytes()),
            value: Some(format!(r#"{{"seq":{n}}}"#).into_bytes()),
        })
        .collect()
}

/// A manifest for one endpoint per topic, all consumed by one group.
pub fn manifest(
    services: &Services,
    endpoints: &[(&str, &str)],
    group: &str,
    port: u16,
) -> serde_json::Value {
    let endpoint_map: serde_json::Map<String, serde_json::Value> = endpoints
        .iter()
        .map(|(name, topic)| ((*name).to_owned(), serde_json::json!({"topics": [topic]})))
        .collect();
    let topics: Vec<&str> = endpoints.iter().map(|(_, topic)| *topic).collect();
    serde_json::json!({
        "kafka": {"brokers": [services.brokers]},
        "redis": redis_section(services, &unique("test")),
        "endpoints": endpoint_map,
        "consumer_groups": [{"id": group, "topics": topics, "offset_reset": "earliest"}],
        "server": {"host": "127.0.0.1", "port": port, "heartbeat_secs": 15},
        "auth": {"mode": "disabled"}
    })
}

/// A `fjord-server` that a test started on a free port with a manifest of its own; killed,
/// and its manifest removed, when dropped.
pub struct Server {
    pub port: u16,
    pub process: Process,
    /// The manifest it runs, for a consumer of the same pipeline.
    pub path: PathBuf,
    _dir: tempfile::TempDir,
}

impl Server {
    /// `http://127.0.0.1:PORT` followed by `path`.
    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// A value of `/metrics`: the first line that starts with `name` (with its labels).
    pub async fn metric(&self, name: &str) -> f64 {
        let text = reqwest::get(self.url("/metrics"))
            .await
            .expect("metrics")
            .text()
            .await
            .expect("text");
        let value = text
            .lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok());
        assert!(value.is_some(), "no {name} in {text}");
        value.unwrap_or_default()
    }
}

/// Starts `fjord-server` with one endpoint, `orders`, on a topic nothing produces to, and
/// the manifest `edit` made; returns once it is ready.
pub async fn start_server(edit: impl FnOnce(&mut serde_json::Value)) -> Server {
    ServerStart::new().start(edit).await
}

/// How [`start_server`] starts a server, when a test needs more than the manifest edit.
#[derive(Debug, Default)]
pub struct ServerStart<'a> {
    endpoints: Option<&'a [(&'a str, &'a str)]>,
    envs: Vec<(&'a str, &'a str)>,
    nofile: Option<u32>,
}

impl<'a> ServerStart<'a> {
    pub fn new() -> Self {
        Self::default()
    }

    /// The endpoints (name, topic) instead of `orders` alone.
    pub fn endpoints(mut self, endpoints: &'a [(&'a str, &'a str)]) -> Self {
        self.endpoints = Some(endpoints);
        self
    }

    /// An environment variable of the server's (a secret the manifest names).
    pub fn env(mut self, name: &'a str, value: &'a str) -> Self {
        self.envs.push((name, value));
        self
    }

    /// Runs the server under `sh -c 'ulimit -n NOFILE; exec …'`.
    pub fn nofile(mut self, nofile: u32) -> Self {
        self.nofile = Some(nofile);
        self
    }

    pub async fn start(self, edit: impl FnOnce(&mut serde_json::Value)) -> Server {
        let services = services();
        let port = free_port();
        let endpoints = self.endpoints.unwrap_or(&[("orders", "orders-unused")]);
        let mut manifest = manifest(&services, endpoints, &unique("group"), port);
        edit(&mut manifest);
        let (dir, path) = write_manifest(&manifest);
        let server = server_binary();
        let manifest = path.to_str().expect("a UTF-8 path");
        let mut process = match self.nofile {
            None => Process::start(&server, &["--manifest", manifest], &self.envs),
            Some(nofile) => Process::start(
                "sh",
                &[
                    "-c",
                    &format!("ulimit -n {nofile} && exec \"$0\" --manifest \"$1\""),
                    &server,
                    manifest,
                ],
                &self.envs,
            ),
        };
        process.wait_ready(port).await;
        Server {
            port,
            process,
            path,
            _dir: dir,
        }
    }
}

/// Writes a manifest into a temporary directory that lives as long as the returned guard.
pub fn write_manifest(manifest: &serde_json::Value) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("manifest.json");
    std::fs::write(&path, serde_json::to_vec_pretty(manifest).unwrap()).unwrap();
    (dir, path)
}

/// The root of the repository, for its scripts (`ci/services.sh`) and fixtures.
pub fn repo_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests' package is a folder of the repository")
}

/// A binary of the workspace (`fjord`, `fjord-consumer`, `fjord-server`), built fresh: cargo
/// sets `CARGO_BIN_EXE_*` only for the tested package's own binaries (this one has none), and
/// `cargo test` does not build another package's binaries, so an old one could be tested.
/// The first call in the test binary runs `cargo build --bins` at the top of the workspace,
/// into the target dir and profile this test was built in (a no-op when they are fresh,
/// as after ci/test.sh's own `cargo build --bins`); the binary is then beside this test,
/// in `target/<profile>/`.
pub fn workspace_binary(name: &str) -> String {
    let test = std::env::current_exe().expect("the test's own path");
    // target/<profile>/deps/<test> → target/<profile>/<name>
    let folder = test
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>");
    static BUILT: std::sync::OnceLock<()> = std::sync::OnceLock::new();
    BUILT.get_or_init(|| build_workspace_binaries(folder));
    let binary = folder.join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    assert!(
        binary.exists(),
        "{} is not there after `cargo build --bins`",
        binary.display()
    );
    binary.to_str().expect("a UTF-8 target path").to_owned()
}

/// `cargo build --bins` of the workspace's default members into `profile_dir`
/// (`<target dir>/<profile>`), with the cargo that built this test.
fn build_workspace_binaries(profile_dir: &Path) {
    let profile = match profile_dir.file_name().and_then(|name| name.to_str()) {
        Some("debug") => "dev",
        Some(other) => other,
        None => panic!("{}: not a profile's directory", profile_dir.display()),
    };
    let target_dir = profile_dir.parent().expect("the target dir");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| env!("CARGO").into());
    let status = Command::new(cargo)
        .args(["build", "--quiet", "--bins", "--profile", profile])
        .env("CARGO_TARGET_DIR", target_dir)
        .current_dir(repo_root())
        .stdin(Stdio::null())
        .status()
        .expect("running cargo");
    assert!(
        status.success(),
        "cargo build --bins --profile {profile} failed ({status})"
    );
}

/// The `fjord-server` the tests start: the workspace's, or `FJORD_TEST_SERVER` (ci/attack.sh
/// sets it to the release build with `panic = "abort"`).
pub fn server_binary() -> String {
    std::env::var("FJORD_TEST_SERVER").unwrap_or_else(|_| workspace_binary("fjord-server"))
}

/// A running binary of the workspace, killed when dropped; its stderr is kept for assertions.
pub struct Process {
    name: String,
    child: Child,
    log: Arc<Mutex<Vec<String>>>,
    /// The thread that collects stderr; it ends when the process's stderr closes.
    collector: Option<std::thread::JoinHandle<()>>,
}

impl Process {
    pub fn start(binary: &str, args: &[&str], envs: &[(&str, &str)]) -> Self {
        let mut command = Command::new(binary);
        command
            .args(args)
            .envs(envs.iter().copied())
            .env("RUST_LOG", "info,fjord=debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = command
            .spawn()
            .unwrap_or_else(|error| panic!("start {binary}: {error}"));
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&log);
        let name = Path::new(binary)
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        let collector = std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        Self {
            name,
            child,
            log,
            collector: Some(collector),
        }
    }

    /// `fjord-server` ([`server_binary`]).
    pub fn server(manifest: &Path) -> Self {
        Self::start(
            &server_binary(),
            &["--manifest", manifest.to_str().unwrap()],
            &[],
        )
    }

    pub fn consumer(manifest: &Path, envs: &[(&str, &str)]) -> Self {
        Self::start(
            &workspace_binary("fjord-consumer"),
            &["--manifest", manifest.to_str().unwrap()],
            envs,
        )
    }

    /// The process id, for reading its `/proc` entries.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }

    /// Waits until a log line contains every one of `needles`; returns that line.
    pub async fn wait_for_log(&self, needles: &[&str]) -> String {
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(line) = self
                .log()
                .into_iter()
                .find(|line| needles.iter().all(|n| line.contains(n)))
            {
                return line;
            }
            if Instant::now() > deadline {
                panic!(
                    "{} never logged {needles:?}; its log:\n{}",
                    self.name,
                    self.log().join("\n")
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until this server answers `/readyz` on `port` with 200; fails at once, with the
    /// log, if the process exits first.
    pub async fn wait_ready(&mut self, port: u16) {
        let client = reqwest::Client::new();
        let deadline = Instant::now() + PATIENCE;
        loop {
            if is_ready(&client, port).await {
                return;
            }
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!(
                    "{} exited ({status}) before it was ready on port {port}; its log:\n{}",
                    self.name,
                    self.log().join("\n")
                );
            }
            assert!(
                Instant::now() < deadline,
                "{} on port {port} never became ready; its log:\n{}",
                self.name,
                self.log().join("\n")
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits for the process to exit by itself; returns its exit code.
    pub async fn wait_exit(&mut self) -> Option<i32> {
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                // Its last lines may still be in the pipe.
                if let Some(collector) = self.collector.take() {
                    let _ = collector.join();
                }
                return status.code();
            }
            if Instant::now() > deadline {
                panic!(
                    "{} did not exit; its log:\n{}",
                    self.name,
                    self.log().join("\n")
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Kills the process with SIGKILL and waits for it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends SIGTERM.
    pub fn terminate(&self) {
        let pid = self.child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn is_ready(client: &reqwest::Client, port: u16) -> bool {
    client
        .get(format!("http://127.0.0.1:{port}/readyz"))
        .send()
        .await
        .is_ok_and(|response| response.status() == 200)
}

/// Waits until the server at `port` answers `/readyz` with 200.
pub async fn wait_ready(port: u16) {
    let client = reqwest::Client::new();
    let deadline = Instant::now() + PATIENCE;
    loop {
        if is_ready(&client, port).await {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "server on port {port} never became ready"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One SSE event, or a comment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SseEvent {
    pub id: Option<String>,
    pub event: Option<String>,
    pub data: Option<String>,
    pub retry: Option<String>,
    pub comment: Option<String>,
}

impl SseEvent {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(self.data.as_deref().unwrap()).unwrap()
    }
}

/// An SSE connection read frame by frame.
pub struct SseStream {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    body: futures_util::stream::BoxStream<'static, reqwest::Result<bytes::Bytes>>,
    buffer: Vec<u8>,
    /// A compressed stream's decoder, fed as the bytes arrive, as a browser's is.
    inflater: Option<Inflater>,
}

/// Decodes a gzip or deflate (zlib) response body piece by piece, and keeps the bytes as
/// they came, for [`SseStream::compressed_body`].
struct Inflater {
    /// The gzip header's bytes still to skip; zlib's two the decoder reads itself.
    header_left: usize,
    decompress: flate2::Decompress,
    ended: bool,
    received: Vec<u8>,
}

impl Inflater {
    fn new(content_encoding: &str) -> Option<Self> {
        let (header_left, zlib) = match content_encoding {
            // The header Fjord writes: no name, comment or extra field.
            "gzip" => (10, false),
            "deflate" => (0, true),
            _ => return None,
        };
        Some(Self {
            header_left,
            decompress: flate2::Decompress::new(zlib),
            ended: false,
            received: Vec::new(),
        })
    }

    /// Appends what `chunk` decodes to, all of it: each piece of a stream must decode
    /// without the ones after it.
    fn feed(&mut self, chunk: &[u8], out: &mut Vec<u8>) {
        self.received.extend_from_slice(chunk);
        let skipped = self.header_left.min(chunk.len());
        self.header_left -= skipped;
        let mut input = &chunk[skipped..];
        while !self.ended && !input.is_empty() {
            out.reserve(input.len() * 8 + 4096);
            let read = self.decompress.total_in();
            let status = self
                .decompress
                .decompress_vec(input, out, flate2::FlushDecompress::Sync)
                .expect("a valid deflate stream");
            let used = usize::try_from(self.decompress.total_in() - read).unwrap();
            input = &input[used..];
            self.ended = status == flate2::Status::StreamEnd;
        }
    }
}

impl SseStream {
    pub async fn connect(url: &str, headers: &[(&str, &str)]) -> Self {
        Self::try_connect(url, headers).await.unwrap()
    }

    pub async fn try_connect(url: &str, headers: &[(&str, &str)]) -> reqwest::Result<Self> {
        let mut request = reqwest::Client::new().get(url);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let response = request.send().await?;
        let inflater = response
            .headers()
            .get("content-encoding")
            .and_then(|value| Inflater::new(value.to_str().unwrap()));
        Ok(Self {
            status: response.status().as_u16(),
            headers: response.headers().clone(),
            body: response.bytes_stream().boxed(),
            buffer: Vec::new(),
            inflater,
        })
    }

    /// A compressed stream's body as it came, for a check of its trailer once it ended.
    pub fn compressed_body(&self) -> Option<&[u8]> {
        self.inflater
            .as_ref()
            .map(|inflater| inflater.received.as_slice())
    }

    /// The next block (event, comment or prelude); `None` when the stream ended.
    pub async fn next(&mut self) -> Option<SseEvent> {
        loop {
            if let Some(end) = self.buffer.windows(2).position(|w| w == b"\n\n") {
                let block: Vec<u8> = self.buffer.drain(..end + 2).collect();
                return Some(parse_block(&String::from_utf8(block).unwrap()));
            }
            match tokio::time::timeout(PATIENCE, self.body.next()).await {
                Err(_) => panic!("no SSE data for {PATIENCE:?}"),
                Ok(None) | Ok(Some(Err(_))) => return None,
                Ok(Some(Ok(chunk))) => match &mut self.inflater {
                    Some(inflater) => inflater.feed(&chunk, &mut self.buffer),
                    None => self.buffer.extend_from_slice(&chunk),
                },
            }
        }
    }

    /// Reads until `count` record events arrived (skipping comments and the prelude). Fails
    /// when no record came for [`PATIENCE`], heartbeats or not: a stream that stays open
    /// but delivers nothing must fail the test, not hang it.
    pub async fn records(&mut self, count: usize) -> Vec<SseEvent> {
        let mut records = Vec::with_capacity(count);
        let mut last_record = Instant::now();
        while records.len() < count {
            match self.next().await {
                Some(event) if event.data.is_some() => {
                    records.push(event);
                    last_record = Instant::now();
                }
                Some(_) if last_record.elapsed() > PATIENCE => panic!(
                    "only heartbeats for {PATIENCE:?} after {} of {count} records",
                    records.len()
                ),
                Some(_) => {}
                None => panic!("stream ended after {} of {count} records", records.len()),
            }
        }
        records
    }
}

fn parse_block(block: &str) -> SseEvent {
    let mut event = SseEvent::default();
    for line in block.lines() {
        if let Some(comment) = line.strip_prefix(':') {
            event.comment = Some(comment.trim().to_owned());
        } else if let Some((field, value)) = line.split_once(": ") {
            let slot = match field {
                "id" => &mut event.id,
                "event" => &mut event.event,
                "data" => &mut event.data,
                "retry" => &mut event.retry,
                other => panic!("unexpected SSE field {other}"),
            };
            *slot = Some(value.to_owned());
        }
    }
    event
}

/// Checks that `events` hold each (partition, offset) of `produced` exactly once, in
/// offset order within each partition.
pub fn assert_complete_and_ordered(events: &[SseEvent], produced: &[(i32, i64)]) {
    let mut by_partition: BTreeMap<i64, Vec<i64>> = BTreeMap::new();
    for event in events {
        let envelope = event.json();
        by_partition
            .entry(envelope["partition"].as_i64().unwrap())
            .or_default()
            .push(envelope["offset"].as_i64().unwrap());
    }
    let mut expected: BTreeMap<i64, Vec<i64>> = BTreeMap::new();
    for (partition, offset) in produced {
        expected
            .entry(i64::from(*partition))
            .or_default()
            .push(*offset);
    }
    for offsets in expected.values_mut() {
        offsets.sort_unstable();
    }
    assert_eq!(
        by_partition, expected,
        "every record once, in order per partition"
    );
}

/// A client that behaves like EventSource: when its stream ends or breaks it reconnects
/// with `Last-Event-ID`, trying the next server of its list when one refuses. It keeps
/// every record event it gets, duplicates included, so that tests can assert there are none.
pub struct ResumingClient {
    records: Arc<Mutex<Vec<SseEvent>>>,
    notices: Arc<Mutex<Vec<SseEvent>>>,
    connections: Arc<std::sync::atomic::AtomicUsize>,
    paused: Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl ResumingClient {
    pub fn start(urls: Vec<String>) -> Self {
        Self::start_from(urls, None)
    }

    pub fn start_from(urls: Vec<String>, last_event_id: Option<String>) -> Self {
        use std::sync::atomic::Ordering::SeqCst;
        let records = Arc::new(Mutex::new(Vec::new()));
        let notices = Arc::new(Mutex::new(Vec::new()));
        let connections = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let paused = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (records_sink, notices_sink, connected, pause) = (
            Arc::clone(&records),
            Arc::clone(&notices),
            Arc::clone(&connections),
            Arc::clone(&paused),
        );
        let task = tokio::spawn(async move {
            let mut last_id = last_event_id;
            let mut server = 0;
            loop {
                let url = &urls[server % urls.len()];
                let headers: Vec<(&str, &str)> = last_id
                    .iter()
                    .map(|id| ("last-event-id", id.as_str()))
                    .collect();
                let mut stream = match SseStream::try_connect(url, &headers).await {
                    Ok(stream) if stream.status == 200 => stream,
                    _ => {
                        server += 1;
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                connected.fetch_add(1, SeqCst);
                loop {
                    while pause.load(SeqCst) {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    let Some(event) = stream.next().await else {
                        break;
                    };
                    if event
                        .event
                        .as_deref()
                        .is_some_and(|name| name.starts_with("fjord."))
                    {
                        notices_sink.lock().unwrap().push(event);
                        continue;
                    }
                    if let Some(id) = &event.id {
                        last_id = Some(id.clone());
                    }
                    if event.data.is_some() {
                        records_sink.lock().unwrap().push(event);
                    }
                }
            }
        });
        Self {
            records,
            notices,
            connections,
            paused,
            task,
        }
    }

    pub fn records(&self) -> Vec<SseEvent> {
        self.records.lock().unwrap().clone()
    }

    pub fn notices(&self) -> Vec<SseEvent> {
        self.notices.lock().unwrap().clone()
    }

    pub fn connections(&self) -> usize {
        self.connections.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Stops reading, so that the server's queue for it fills up.
    pub fn pause(&self, paused: bool) {
        self.paused
            .store(paused, std::sync::atomic::Ordering::SeqCst);
    }

    /// Waits until it got at least `count` records; returns all it got.
    pub async fn wait_for_records(&self, count: usize) -> Vec<SseEvent> {
        self.wait_for_records_within(count, PATIENCE).await
    }

    pub async fn wait_for_records_within(&self, count: usize, patience: Duration) -> Vec<SseEvent> {
        let deadline = Instant::now() + patience;
        while self.records().len() < count {
            if Instant::now() > deadline || self.task.is_finished() {
                let records = self.records();
                panic!(
                    "waited for {count} records, got {} over {} connections (reader alive: {}); last id {:?}; notices {:?}",
                    records.len(),
                    self.connections(),
                    !self.task.is_finished(),
                    records.last().and_then(|r| r.id.clone()),
                    self.notices()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.records()
    }
}

impl Drop for ResumingClient {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Waits until `done()` holds, checking every 20 ms, for at most [`PATIENCE`].
pub async fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + PATIENCE;
    while !done() {
        assert!(Instant::now() < deadline, "waited {PATIENCE:?} for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until the async check `done()` holds, checking every 250 ms, for at most
/// [`PATIENCE`].
pub async fn wait_until_async<F: Future<Output = bool>>(what: &str, mut done: impl FnMut() -> F) {
    let deadline = Instant::now() + PATIENCE;
    while !done().await {
        assert!(Instant::now() < deadline, "waited {PATIENCE:?} for {what}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The status of `GET url`, or 0 when nothing answers.
pub async fn status_of(url: &str) -> u16 {
    reqwest::get(url)
        .await
        .map_or(0, |response| response.status().as_u16())
}

/// Runs `ci/services.sh COMMAND` (stop-redis, start-redis, restart-kafka, ...).
pub fn services_command(command: &str) {
    let script = repo_root().join("ci/services.sh");
    let status = Command::new(script).arg(command).status().unwrap();
    assert!(status.success(), "ci/services.sh {command} failed");
}

/// Produces `records` (key, value; neither holding a tab or a line break) to one partition
/// with `kcat -z codec` (Debian's kcat, its own librdkafka), all in one batch when they fit,
/// and waits until Kafka acknowledged them.
pub fn produce_with_kcat(
    brokers: &str,
    topic: &str,
    partition: i32,
    codec: &str,
    records: &[(String, String)],
) {
    use std::io::Write as _;
    let mut child = Command::new("kcat")
        .args(["-P", "-b", brokers, "-t", topic, "-z", codec, "-K", "\t"])
        .args(["-p", &partition.to_string()])
        .args(["-X", "acks=all", "-X", "linger.ms=500"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|error| panic!("start kcat (ci/services.sh installs it): {error}"));
    let mut stdin = child.stdin.take().unwrap();
    for (key, value) in records {
        assert!(!format!("{key}{value}").contains(['\t', '\n']));
        writeln!(stdin, "{key}\t{value}").unwrap();
    }
    drop(stdin);
    let output = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success() && !stderr.contains("ERROR") && !stderr.contains("Failed"),
        "kcat -z {codec} to {topic}: {stderr}"
    );
}

/// A record batch in a partition's first log segment on the test broker's disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentBatch {
    /// Where the batch starts in the file.
    pub position: u64,
    pub base_offset: i64,
    pub last_offset: i64,
    /// The compression codec of the batch's attributes: 0 none, 1 gzip, 2 snappy, 3 lz4, 4 zstd.
    pub codec: u8,
}

/// Where the first log segment of `topic`/`partition` lies on the broker's disk.
pub fn segment_path(topic: &str, partition: i32) -> PathBuf {
    Path::new(&required_env("FJORD_CI_STATE"))
        .join("kafka/data")
        .join(format!("{topic}-{partition}"))
        .join("00000000000000000000.log")
}

/// The record batches (Kafka's v2 format) of a partition's first segment.
pub fn segment_batches(topic: &str, partition: i32) -> Vec<SegmentBatch> {
    let bytes = std::fs::read(segment_path(topic, partition)).unwrap();
    let be = |at: usize, len: usize| -> i64 {
        bytes[at..at + len]
            .iter()
            .fold(0_i64, |n, &b| (n << 8) | i64::from(b))
    };
    let mut batches = Vec::new();
    let mut at = 0;
    // baseOffset i64, batchLength i32, partitionLeaderEpoch i32, magic i8, crc u32,
    // attributes i16, lastOffsetDelta i32, ...
    while at + 27 <= bytes.len() {
        let length = usize::try_from(be(at + 8, 4)).unwrap();
        if length == 0 || at + 12 + length > bytes.len() {
            break;
        }
        let base_offset = be(at, 8);
        batches.push(SegmentBatch {
            position: u64::try_from(at).unwrap(),
            base_offset,
            last_offset: base_offset + be(at + 23, 4),
            codec: u8::try_from(be(at + 21, 2) & 0x7).unwrap(),
        });
        at += 12 + length;
    }
    batches
}

/// The resident memory of process `pid`, in KiB (Linux).
pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}
