//! The standard scenarios and the controller that runs one: starts the servers (or the
//! floor, or a consumer and a server for end to end), the workers and the publisher, opens
//! a measurement window, and gathers what everyone measured.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};

use super::histogram::Histogram;
use super::ingest::IngestRun;
use super::shards::{ReplicaLag, ShardRun};
use super::worker::{Target, WorkerReport, WorkerSpec};
use super::{Services, cpu_ticks, event_envelope, now_us, rss_kib, ticks_per_second};
use fjord::bus::Publication;
use fjord::config::Manifest;
use fjord::envelope::Envelope;

/// Most connections one worker process opens (this machine allows 20,000 open files).
const MAX_PER_WORKER: usize = 15_000;
/// Source addresses 127.0.0.2 and up: about 28,000 ephemeral ports each.
const SOURCES: u8 = 12;
/// The endpoint the scenarios stream.
const ENDPOINT: &str = "bench";

/// What is being measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// `fjord-server` processes fed straight from the Redis bus.
    Server,
    /// The bare write loop.
    Floor,
    /// Kafka → fjord-consumer → Redis → fjord-server.
    EndToEnd,
    /// One fjord-consumer member through a Kafka backlog into Redis, no server.
    Ingest,
    /// The bus alone on local Redis Clusters of one and of three primaries.
    Shards,
    /// The bus alone on one primary and its replica, read from each.
    ReplicaLag,
}

impl Kind {
    /// Whether the scenario opens client connections (and so has a row in the
    /// connections table).
    pub fn has_connections(self) -> bool {
        matches!(self, Self::Server | Self::Floor | Self::EndToEnd)
    }
}

/// One scenario's load.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Scenario {
    /// Its name.
    pub name: String,
    /// What runs it.
    pub kind: Kind,
    /// Server processes.
    pub servers: usize,
    /// Connections in all.
    pub connections: usize,
    /// Records per second.
    pub rate: f64,
    /// Each connection asks for its own key (`?key=`); records go round the keys.
    pub keyed: bool,
    /// Seconds of load before measuring.
    pub warmup_secs: u64,
    /// Seconds measured.
    pub measure_secs: u64,
    /// Every Nth connection stalls (0: none).
    pub slow_every: usize,
    /// The servers' `client_queue`, when not the default.
    pub client_queue: Option<usize>,
    /// Servers on CPU 0, workers on CPU 1: so that the servers, not the load generator,
    /// run out of CPU first.
    #[serde(default)]
    pub pinned: bool,
    /// Records in the Kafka backlog (ingest).
    #[serde(default)]
    pub records: u64,
    /// Round trips to Redis to ingest at, in milliseconds; 0 is Redis straight (ingest).
    #[serde(default)]
    pub rtt_ms: Vec<f64>,
}

impl Scenario {
    /// A standard scenario by name, at full or tiny load.
    pub fn standard(name: &str, tiny: bool) -> Option<Self> {
        let base = Self {
            name: name.to_owned(),
            kind: Kind::Server,
            servers: 1,
            connections: 10_000,
            rate: 10.0,
            keyed: false,
            warmup_secs: 3,
            measure_secs: 20,
            slow_every: 0,
            client_queue: None,
            pinned: false,
            records: 0,
            rtt_ms: Vec::new(),
        };
        let full = match name {
            "idle" => Self {
                connections: 19_000,
                rate: 1.0,
                measure_secs: 5,
                ..base
            },
            "floor" => Self {
                kind: Kind::Floor,
                ..base
            },
            "fanout" => base,
            // The same deliveries per second as fewer connections with more events each.
            "floor-1k" => Self {
                kind: Kind::Floor,
                connections: 1_000,
                rate: 100.0,
                ..base
            },
            "fanout-1k" => Self {
                connections: 1_000,
                rate: 100.0,
                ..base
            },
            "keyed" => Self {
                keyed: true,
                ..base
            },
            "overload" => Self {
                rate: 40.0,
                measure_secs: 30,
                slow_every: 20,
                client_queue: Some(256),
                pinned: true,
                ..base
            },
            "e2e" => Self {
                kind: Kind::EndToEnd,
                connections: 5_000,
                rate: 1_000.0,
                keyed: true,
                warmup_secs: 10,
                ..base
            },
            "scale" => Self {
                servers: 6,
                connections: 100_000,
                rate: 1.0,
                measure_secs: 10,
                ..base
            },
            // Issue 13: at ElastiCache's ~0.5 ms round trip, one record per round trip caps
            // a partition near 2,000 records/s.
            "ingest" => Self {
                kind: Kind::Ingest,
                connections: 0,
                rate: 0.0,
                records: 200_000,
                rtt_ms: vec![0.0, 0.1, 1.0],
                ..base
            },
            // Issue 13: three shards carry measurably more than one.
            "shards" => Self {
                kind: Kind::Shards,
                connections: 0,
                rate: 0.0,
                warmup_secs: 2,
                measure_secs: 10,
                ..base
            },
            // Issue 13: the lag that reading from replicas adds.
            "replica-lag" => Self {
                kind: Kind::ReplicaLag,
                connections: 0,
                rate: 1_000.0,
                warmup_secs: 2,
                measure_secs: 20,
                ..base
            },
            _ => return None,
        };
        if !tiny {
            return Some(full);
        }
        match full.kind {
            Kind::Ingest => {
                return Some(Self {
                    records: 1_000,
                    ..full
                });
            }
            Kind::Shards | Kind::ReplicaLag => {
                return Some(Self {
                    rate: full.rate.min(200.0),
                    warmup_secs: 1,
                    measure_secs: 1,
                    ..full
                });
            }
            Kind::Server | Kind::Floor | Kind::EndToEnd => {}
        }
        Some(Self {
            connections: (full.connections / 100).max(60),
            rate: full.rate.min(20.0),
            warmup_secs: if full.kind == Kind::EndToEnd { 4 } else { 1 },
            measure_secs: 2,
            slow_every: full.slow_every.min(10),
            pinned: false,
            ..full
        })
    }
}

/// Every standard scenario, in the order they run.
pub(crate) const ALL: [&str; 12] = [
    "idle",
    "floor",
    "fanout",
    "floor-1k",
    "fanout-1k",
    "keyed",
    "overload",
    "e2e",
    "scale",
    "ingest",
    "shards",
    "replica-lag",
];

/// What one scenario measured.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Outcome {
    /// The scenario's name.
    pub scenario: String,
    /// The load it ran.
    pub load: Option<Scenario>,
    /// Connections that streamed.
    pub connected: u64,
    /// Connections that could not be opened.
    pub failed: u64,
    /// The measurement window, in seconds.
    pub window_secs: f64,
    /// Records published in the window.
    pub records: u64,
    /// Events received in the window.
    pub deliveries: u64,
    /// Events received per second.
    pub deliveries_per_sec: f64,
    /// Latency percentiles, published → received.
    pub p50_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// The largest.
    pub max_ms: f64,
    /// The 99th percentile of each second of the window.
    pub p99_per_sec_ms: Vec<f64>,
    /// Sequence numbers missing, over all connections.
    pub gaps: u64,
    /// Events out of order or repeated.
    pub out_of_order: u64,
    /// Connections the server closed.
    pub closed_by_server: u64,
    /// Stalled connections opened on purpose.
    pub slow_connections: u64,
    /// `fjord_clients_dropped_total` rise during the run, summed over servers.
    pub clients_dropped: u64,
    /// Resident memory of each server before connections, in KiB.
    pub rss_kib_before: Vec<u64>,
    /// Resident memory of each server at the end, in KiB.
    pub rss_kib_after: Vec<u64>,
    /// (after − before) / connections, in KiB.
    pub rss_kib_per_connection: f64,
    /// Server CPU (user + system) in the window, in seconds, summed over processes
    /// (the consumer included, end to end).
    pub server_cpu_secs: f64,
    /// Server CPU per delivery, in microseconds.
    pub cpu_us_per_delivery: f64,
    /// Server CPU per record published, in microseconds.
    pub cpu_us_per_record: f64,
    /// Load-generator CPU in the window, in seconds.
    pub loadgen_cpu_secs: f64,
    /// Problems that make the figures doubtful.
    pub errors: Vec<String>,
    /// The ingest scenario's figures, one per round trip.
    #[serde(default)]
    pub ingest: Vec<IngestRun>,
    /// The shards scenario's figures, one per cluster shape.
    #[serde(default)]
    pub shards: Vec<ShardRun>,
    /// The replica-lag scenario's figures.
    #[serde(default)]
    pub replica_lag: Option<ReplicaLag>,
}

impl Outcome {
    /// Whether the scenario ran without problems and measured something.
    pub fn ran_cleanly(&self) -> bool {
        self.errors.is_empty()
            && (self.connected > 0
                || !self.ingest.is_empty()
                || !self.shards.is_empty()
                || self.replica_lag.is_some())
    }
}

/// Where things are.
#[derive(Debug, Clone)]
pub(crate) struct Env {
    pub(super) redis: String,
    pub(super) kafka: String,
    bin_dir: PathBuf,
    me: PathBuf,
}

impl Env {
    /// Resolves the binaries.
    pub(crate) fn new(services: &Services) -> anyhow::Result<Self> {
        let me = std::env::current_exe().context("locating this binary")?;
        let bin_dir = match &services.bin_dir {
            Some(dir) => dir.clone(),
            None => me
                .parent()
                .map(std::path::Path::to_path_buf)
                .context("this binary's directory")?,
        };
        for binary in ["fjord-server", "fjord-consumer"] {
            anyhow::ensure!(
                bin_dir.join(binary).exists(),
                "{} is missing: cargo build --release --bins",
                bin_dir.join(binary).display()
            );
        }
        Ok(Self {
            redis: services.redis.clone(),
            kafka: services.kafka.clone(),
            bin_dir,
            me,
        })
    }
}

/// Results of a whole run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Results {
    /// When, UTC, RFC 3339.
    pub date: String,
    /// The machine.
    pub machine: Machine,
    /// Whether it was the tiny load.
    pub tiny: bool,
    /// One per scenario.
    pub outcomes: Vec<Outcome>,
}

/// What the figures were measured on.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Machine {
    /// Cores.
    pub nproc: usize,
    /// From /proc/cpuinfo.
    pub cpu: String,
    /// Memory, in GiB.
    pub ram_gib: f64,
    /// `uname -r`.
    pub kernel: String,
}

impl Machine {
    fn this() -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu = cpuinfo
            .lines()
            .find_map(|line| line.strip_prefix("model name"))
            .map(|rest| rest.trim_start_matches([' ', '\t', ':']).trim().to_owned())
            .unwrap_or_default();
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let ram_kib: f64 = meminfo
            .lines()
            .find_map(|line| line.strip_prefix("MemTotal:"))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|kib| kib.parse().ok())
            .unwrap_or(0.0);
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
            .to_owned();
        Self {
            nproc: std::thread::available_parallelism().map_or(1, usize::from),
            cpu,
            ram_gib: (ram_kib / 1024.0 / 1024.0 * 10.0).round() / 10.0,
            kernel,
        }
    }
}

fn utc_now() -> String {
    let secs = now_us() / 1_000_000;
    let days = secs / 86_400;
    let rest = secs % 86_400;
    // Civil from days (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60
    )
}

/// Runs the standard scenarios (or `only` these).
pub(crate) async fn run_all(env: &Env, tiny: bool, only: &[String]) -> anyhow::Result<Results> {
    let mut outcomes = Vec::new();
    for name in ALL {
        if !only.is_empty() && !only.iter().any(|chosen| chosen == name) {
            continue;
        }
        let scenario = Scenario::standard(name, tiny).context("a standard scenario")?;
        tracing::info!(
            scenario = name,
            connections = scenario.connections,
            rate = scenario.rate,
            "running"
        );
        let outcome = match run(env, &scenario).await {
            Ok(outcome) => outcome,
            Err(error) => Outcome {
                scenario: name.to_owned(),
                load: Some(scenario.clone()),
                errors: vec![format!("{error:#}")],
                ..Outcome::default()
            },
        };
        tracing::info!(
            scenario = name,
            connected = outcome.connected,
            deliveries_per_sec = outcome.deliveries_per_sec as u64,
            p99_ms = outcome.p99_ms,
            cpu_us_per_delivery = outcome.cpu_us_per_delivery,
            rss_kib_per_connection = outcome.rss_kib_per_connection,
            errors = ?outcome.errors,
            "done"
        );
        outcomes.push(outcome);
        // Let sockets in TIME_WAIT and the servers' exits settle.
        tokio::time::sleep(Duration::from_secs(if tiny { 1 } else { 3 })).await;
    }
    Ok(Results {
        date: utc_now(),
        machine: Machine::this(),
        tiny,
        outcomes,
    })
}

pub(super) fn free_port() -> anyhow::Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

pub(super) fn unique(prefix: &str) -> String {
    format!("{prefix}-{}-{}", std::process::id(), now_us())
}

/// A manifest for the scenario's processes, with the bus at `redis_url`.
pub(super) fn manifest(
    env: &Env,
    scenario: &Scenario,
    redis_url: &str,
    port: u16,
    prefix: &str,
    topic: &str,
) -> String {
    let mut server = serde_json::json!({"host": "127.0.0.1", "port": port, "heartbeat_secs": 15});
    if let Some(queue) = scenario.client_queue {
        server["client_queue"] = queue.into();
    }
    serde_json::json!({
        "kafka": {"brokers": [env.kafka]},
        "redis": {"url": redis_url, "key_prefix": prefix},
        "endpoints": {ENDPOINT: {
            "topics": [topic],
            // The ingest scenario's backlog stays whole: its length says when it is all in.
            "retention": {"max_records": scenario.records.max(20_000), "max_age_secs": 3_600}
        }},
        "consumer_groups": [{"id": prefix, "topics": [topic], "offset_reset": "earliest"}],
        "server": server,
        "auth": {"mode": "disabled"}
    })
    .to_string()
}

/// A child process driven over stdin, reporting JSON lines on stdout.
struct Driven {
    child: Child,
    stdin: ChildStdin,
    stdout: Lines<BufReader<ChildStdout>>,
}

impl Driven {
    fn spawn(mut command: Command) -> anyhow::Result<Self> {
        command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        let mut child = command.spawn()?;
        let stdin = child.stdin.take().context("stdin")?;
        let stdout = BufReader::new(child.stdout.take().context("stdout")?).lines();
        Ok(Self {
            child,
            stdin,
            stdout,
        })
    }

    fn pid(&self) -> u32 {
        self.child.id().unwrap_or(0)
    }

    async fn say(&mut self, line: &str) {
        let _ = self.stdin.write_all(format!("{line}\n").as_bytes()).await;
        let _ = self.stdin.flush().await;
    }

    /// The next JSON line whose `type` is `kind`.
    async fn expect(
        &mut self,
        kind: &str,
        patience: Duration,
    ) -> anyhow::Result<serde_json::Value> {
        let wait = async {
            while let Some(line) = self.stdout.next_line().await? {
                if let Ok(value) = serde_json::from_str::<serde_json::Value>(&line)
                    && value["type"] == kind
                {
                    return Ok(value);
                }
            }
            anyhow::bail!("exited before saying {kind}")
        };
        tokio::time::timeout(patience, wait)
            .await
            .map_err(|_| anyhow::anyhow!("no {kind} within {patience:?}"))?
    }
}

/// `program`, on `cpu` alone when the scenario is pinned.
fn on_cpu(program: impl AsRef<std::ffi::OsStr>, scenario: &Scenario, cpu: u32) -> Command {
    let cpus = std::thread::available_parallelism().map_or(1, usize::from);
    if !scenario.pinned || cpus < 2 {
        return Command::new(program);
    }
    // taskset execs the program: its pid is the one measured.
    let mut command = Command::new("taskset");
    command.arg("-c").arg(cpu.to_string()).arg(program);
    command
}

pub(super) fn server_command(
    env: &Env,
    scenario: &Scenario,
    binary: &str,
    manifest: &str,
) -> Command {
    let mut command = on_cpu(env.bin_dir.join(binary), scenario, 0);
    command
        .env("FJORD_MANIFEST_JSON", manifest)
        // Connections the workers drop at the end are not news.
        .env("RUST_LOG", "warn,warp::server=off")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true);
    command
}

async fn wait_ready(port: u16) -> anyhow::Result<()> {
    let client = reqwest::Client::new();
    let url = format!("http://127.0.0.1:{port}/readyz");
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if let Ok(response) = client.get(&url).send().await
            && response.status().is_success()
        {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    anyhow::bail!("server on port {port} not ready within 30 s")
}

async fn clients_dropped(ports: &[u16]) -> u64 {
    let Ok(client) = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
    else {
        return 0;
    };
    let mut total = 0;
    for port in ports {
        let Ok(response) = client
            .get(format!("http://127.0.0.1:{port}/metrics"))
            .send()
            .await
        else {
            continue;
        };
        let text = response.text().await.unwrap_or_default();
        total += text
            .lines()
            .find_map(|line| line.strip_prefix("fjord_clients_dropped_total "))
            .and_then(|value| value.trim().parse::<f64>().ok())
            .unwrap_or(0.0) as u64;
    }
    total
}

/// Splits connections `0..connections` into worker specs, each with its share of servers.
fn worker_specs(
    scenario: &Scenario,
    addresses: &[SocketAddr],
    deadline_secs: u64,
) -> Vec<WorkerSpec> {
    let total = scenario.connections;
    let workers = total
        .div_ceil(MAX_PER_WORKER)
        .max(if total >= 2_000 { 2 } else { 1 });
    let servers = addresses.len().max(1);
    let sources: Vec<Ipv4Addr> = (0..SOURCES)
        .map(|i| Ipv4Addr::new(127, 0, 0, 2 + i))
        .collect();
    (0..workers)
        .map(|w| {
            let (start, end) = (total * w / workers, total * (w + 1) / workers);
            let targets = (0..servers)
                .filter_map(|s| {
                    let (s_start, s_end) = (total * s / servers, total * (s + 1) / servers);
                    let (from, to) = (start.max(s_start), end.min(s_end));
                    (from < to).then(|| Target {
                        address: addresses[s],
                        path: format!("/v1/streams/{ENDPOINT}"),
                        count: to - from,
                        keys: scenario.keyed.then_some(total as u64),
                        first_index: from as u64,
                    })
                })
                .collect();
            WorkerSpec {
                targets,
                sources: sources.clone(),
                connect_concurrency: 256,
                slow_every: scenario.slow_every,
                deadline_secs,
            }
        })
        .collect()
}

/// Publishes at `rate` until `stop`; counts into `published`.
pub(super) async fn publish_to_bus(
    manifest: Manifest,
    rate: f64,
    keys: Option<u64>,
    published: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<()> {
    let bus = fjord::bus::connect_redis(&manifest.redis).await?;
    let endpoints: Vec<_> = manifest
        .endpoints
        .iter()
        .map(|(name, endpoint)| (name.clone(), endpoint.retention))
        .collect();
    let started = Instant::now();
    let mut sent = 0_u64;
    while !stop.load(Relaxed) {
        let due = (started.elapsed().as_secs_f64() * rate) as u64;
        if sent >= due {
            tokio::time::sleep(Duration::from_micros(500)).await;
            continue;
        }
        let (key, seq) = match keys {
            Some(keys) => (Some(format!("k{}", sent % keys)), sent / keys),
            None => (None, sent),
        };
        let envelope = Envelope {
            json: event_envelope(sent, key.as_deref(), seq, now_us()),
            filter_key: key.map(String::into_bytes),
        };
        bus.publish(Publication {
            topic: "bench",
            partition: 0,
            offset: i64::try_from(sent).unwrap_or(i64::MAX),
            endpoints: &endpoints,
            envelope: &envelope,
        })
        .await?;
        sent += 1;
        published.store(sent, Relaxed);
    }
    Ok(())
}

/// Produces to Kafka at `rate` until `stop`; values carry the sequence per key and the
/// produce time.
async fn produce_to_kafka(
    brokers: String,
    topic: String,
    rate: f64,
    keys: u64,
    published: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<()> {
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let producer: FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("linger.ms", "1")
        .create()?;
    let started = Instant::now();
    let mut sent = 0_u64;
    let mut deliveries = Vec::new();
    while !stop.load(Relaxed) {
        let due = (started.elapsed().as_secs_f64() * rate) as u64;
        if sent >= due {
            tokio::time::sleep(Duration::from_micros(500)).await;
            continue;
        }
        let key = format!("k{}", sent % keys);
        let value = format!(r#"{{"seq":{},"ts":{}}}"#, sent / keys, now_us());
        match producer.send_result(FutureRecord::to(&topic).key(&key).payload(&value)) {
            Ok(delivery) => deliveries.push(delivery),
            Err((error, _)) => anyhow::bail!("produce: {error}"),
        }
        sent += 1;
        published.store(sent, Relaxed);
        if deliveries.len() >= 1_000 {
            for delivery in deliveries.drain(..) {
                if let Ok(Err((error, _))) = delivery.await {
                    anyhow::bail!("produce: {error}");
                }
            }
        }
    }
    Ok(())
}

pub(super) async fn create_topic(
    brokers: &str,
    topic: &str,
    partitions: i32,
) -> anyhow::Result<()> {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    let admin: AdminClient<rdkafka::client::DefaultClientContext> = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()?;
    let results = admin
        .create_topics(
            &[NewTopic::new(topic, partitions, TopicReplication::Fixed(1))],
            &AdminOptions::new(),
        )
        .await?;
    for result in results {
        result.map_err(|(topic, code)| anyhow::anyhow!("create topic {topic}: {code}"))?;
    }
    Ok(())
}

/// Runs one scenario.
pub(crate) async fn run(env: &Env, scenario: &Scenario) -> anyhow::Result<Outcome> {
    let prefix = unique("bench");
    let topic = if scenario.kind == Kind::EndToEnd {
        let topic = unique("bench");
        create_topic(&env.kafka, &topic, 4).await?;
        topic
    } else {
        "bench".to_owned()
    };
    let deadline_secs =
        300 + scenario.connections as u64 / 200 + scenario.warmup_secs + scenario.measure_secs;
    let mut ports = Vec::new();
    let mut servers: Vec<Child> = Vec::new();
    let mut floor: Option<Driven> = None;
    let mut consumer: Option<Child> = None;
    let mut manifest_text = String::new();
    match scenario.kind {
        // No connections: one consumer and Redis.
        Kind::Ingest => return super::ingest::run(env, scenario).await,
        // No connections: the bus alone, on clusters of its own.
        Kind::Shards => return super::shards::run(scenario).await,
        Kind::ReplicaLag => return super::shards::replica_lag(env, scenario).await,
        Kind::Floor => {
            let port = free_port()?;
            let mut command = Command::new(&env.me);
            command.args([
                "bench",
                "floor",
                "--port",
                &port.to_string(),
                "--deadline-secs",
                &deadline_secs.to_string(),
            ]);
            command.env("RUST_LOG", "warn");
            let mut driven = Driven::spawn(command)?;
            driven.expect("listening", Duration::from_secs(10)).await?;
            ports.push(port);
            floor = Some(driven);
        }
        Kind::Server | Kind::EndToEnd => {
            for _ in 0..scenario.servers.max(1) {
                let port = free_port()?;
                manifest_text = manifest(env, scenario, &env.redis, port, &prefix, &topic);
                servers
                    .push(server_command(env, scenario, "fjord-server", &manifest_text).spawn()?);
                ports.push(port);
            }
            for &port in &ports {
                wait_ready(port).await?;
            }
            if scenario.kind == Kind::EndToEnd {
                consumer =
                    Some(server_command(env, scenario, "fjord-consumer", &manifest_text).spawn()?);
            }
        }
    }
    let measured_pids: Vec<u32> = match &floor {
        Some(floor) => vec![floor.pid()],
        None => servers
            .iter()
            .chain(consumer.iter())
            .filter_map(Child::id)
            .collect(),
    };
    let rss_pids: Vec<u32> = match &floor {
        Some(floor) => vec![floor.pid()],
        None => servers.iter().filter_map(Child::id).collect(),
    };
    let rss_kib_before: Vec<u64> = rss_pids
        .iter()
        .map(|&pid| rss_kib(pid).unwrap_or(0))
        .collect();
    let server_ports: Vec<u16> = if floor.is_some() {
        Vec::new()
    } else {
        ports.clone()
    };
    let dropped_before = clients_dropped(&server_ports).await;

    let addresses: Vec<SocketAddr> = ports
        .iter()
        .map(|&port| SocketAddr::from(([127, 0, 0, 1], port)))
        .collect();
    let mut workers = Vec::new();
    for spec in worker_specs(scenario, &addresses, deadline_secs) {
        let mut command = on_cpu(&env.me, scenario, 1);
        command
            .args(["bench", "worker", "--spec", &serde_json::to_string(&spec)?])
            .env("RUST_LOG", "warn");
        workers.push(Driven::spawn(command)?);
    }
    let mut outcome = Outcome {
        scenario: scenario.name.clone(),
        load: Some(scenario.clone()),
        rss_kib_before: rss_kib_before.clone(),
        ..Outcome::default()
    };
    let connect_patience = Duration::from_secs(60 + scenario.connections as u64 / 500);
    for worker in &mut workers {
        let connected = worker.expect("connected", connect_patience).await?;
        outcome.connected += connected["connected"].as_u64().unwrap_or(0);
        outcome.failed += connected["failed"].as_u64().unwrap_or(0);
        if let Some(error) = connected["first_error"].as_str() {
            outcome.errors.push(format!("connecting: {error}"));
        }
    }
    tracing::info!(scenario = %scenario.name, connected = outcome.connected, failed = outcome.failed, "connected");
    tokio::time::sleep(Duration::from_secs(1)).await;

    // Load.
    let published = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let publisher = match scenario.kind {
        // The floor makes its own events (and the bus-only scenarios returned above).
        Kind::Floor | Kind::Ingest | Kind::Shards | Kind::ReplicaLag => {
            if let Some(floor) = &mut floor {
                floor.say(&format!("go {}", scenario.rate)).await;
            }
            None
        }
        Kind::Server => Some(tokio::spawn(publish_to_bus(
            Manifest::parse(&manifest_text)?,
            scenario.rate,
            scenario.keyed.then_some(scenario.connections as u64),
            Arc::clone(&published),
            Arc::clone(&stop),
        ))),
        Kind::EndToEnd => Some(tokio::spawn(produce_to_kafka(
            env.kafka.clone(),
            topic.clone(),
            scenario.rate,
            scenario.connections as u64,
            Arc::clone(&published),
            Arc::clone(&stop),
        ))),
    };
    tokio::time::sleep(Duration::from_secs(scenario.warmup_secs)).await;

    // The window.
    for worker in &mut workers {
        worker.say("measure").await;
    }
    let window_start = Instant::now();
    let cpu_before: u64 = measured_pids.iter().filter_map(|&pid| cpu_ticks(pid)).sum();
    let published_before = published.load(Relaxed);
    tokio::time::sleep(Duration::from_secs(scenario.measure_secs)).await;
    let cpu_after: u64 = measured_pids.iter().filter_map(|&pid| cpu_ticks(pid)).sum();
    let published_after = published.load(Relaxed);
    let window = window_start.elapsed().as_secs_f64();
    for worker in &mut workers {
        worker.say("stop").await;
    }
    stop.store(true, Relaxed);
    if let Some(floor) = &mut floor {
        floor.say("stop").await;
    }
    outcome.rss_kib_after = rss_pids
        .iter()
        .map(|&pid| rss_kib(pid).unwrap_or(0))
        .collect();
    outcome.clients_dropped = clients_dropped(&server_ports)
        .await
        .saturating_sub(dropped_before);

    let mut slices: Vec<Histogram> = Vec::new();
    for worker in &mut workers {
        let report = worker.expect("report", Duration::from_secs(30)).await?;
        let report: WorkerReport = serde_json::from_value(report["report"].clone())?;
        outcome.deliveries += report.events;
        outcome.gaps += report.gaps;
        outcome.out_of_order += report.out_of_order;
        outcome.closed_by_server += report.closed_by_server;
        outcome.slow_connections += report.slow;
        outcome.loadgen_cpu_secs += report.cpu_secs;
        for (i, slice) in report.slices.iter().enumerate() {
            if slices.len() <= i {
                slices.resize_with(i + 1, Histogram::default);
            }
            slices[i].merge(slice);
        }
    }
    if let Some(publisher) = publisher {
        match tokio::time::timeout(Duration::from_secs(10), publisher).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(error))) => outcome.errors.push(format!("publisher: {error:#}")),
            Ok(Err(error)) => outcome.errors.push(format!("publisher: {error}")),
            Err(_) => outcome.errors.push("publisher did not stop".into()),
        }
    }
    drop(workers);
    drop(floor);
    drop(servers);
    drop(consumer);

    let mut all = Histogram::default();
    for slice in &slices {
        all.merge(slice);
    }
    outcome.window_secs = window;
    outcome.records = match scenario.kind {
        Kind::Floor => (scenario.rate * window) as u64,
        _ => published_after - published_before,
    };
    outcome.deliveries_per_sec = outcome.deliveries as f64 / window;
    outcome.p50_ms = all.quantile_ms(0.5);
    outcome.p99_ms = all.quantile_ms(0.99);
    outcome.max_ms = all.max_ms();
    outcome.p99_per_sec_ms = slices.iter().map(|slice| slice.quantile_ms(0.99)).collect();
    outcome.server_cpu_secs = cpu_after.saturating_sub(cpu_before) as f64 / ticks_per_second();
    if outcome.deliveries > 0 {
        outcome.cpu_us_per_delivery = outcome.server_cpu_secs * 1e6 / outcome.deliveries as f64;
    }
    if outcome.records > 0 {
        outcome.cpu_us_per_record = outcome.server_cpu_secs * 1e6 / outcome.records as f64;
    }
    if outcome.connected > 0 {
        let grown: u64 = outcome
            .rss_kib_after
            .iter()
            .zip(&outcome.rss_kib_before)
            .map(|(after, before)| after.saturating_sub(*before))
            .sum();
        outcome.rss_kib_per_connection = grown as f64 / outcome.connected as f64;
    }
    if outcome.failed > 0 {
        outcome
            .errors
            .push(format!("{} connections failed", outcome.failed));
    }
    if scenario.rate > 0.0 && outcome.deliveries == 0 {
        outcome.errors.push("no event arrived in the window".into());
    }
    Ok(outcome)
}
