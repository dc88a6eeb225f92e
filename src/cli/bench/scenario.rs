//! The standard scenarios, what each one's load is, and what every kind of scenario needs to
//! run: where the services and binaries are, free ports, a manifest, a server's command, a
//! publisher to the bus, a Kafka topic.

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};
use tokio::process::Command;

use super::{Services, event_envelope, now_us};
use fjord_bus::envelope::Envelope;
use fjord_bus::{Bus, Publication};
use fjord_config::Manifest;

/// The endpoint the scenarios stream.
pub(super) const ENDPOINT: &str = "bench";

/// What is being measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// `fjord-server` processes fed straight from the Redis bus.
    Server,
    /// The bare write loop.
    Floor,
    /// The server's code inside the controller's own process, on the in-memory bus (as
    /// `fjord dev` runs it): `fjord bench quick`, which needs no Redis and no other binary.
    InProcess,
    /// Kafka → fjord-consumer → Redis → fjord-server.
    EndToEnd,
    /// One fjord-consumer member through a Kafka backlog into Redis, no server.
    Ingest,
    /// The bus alone on local Redis Clusters of one and of three primaries.
    Shards,
    /// The bus alone on one primary and its replica, read from each.
    ReplicaLag,
    /// One `fjord-server` with a table endpoint of many keys, and clients that all connect
    /// at once and read its snapshot.
    Table,
}

impl Kind {
    /// Whether the scenario streams to client connections for a measured window (and so
    /// has a row in the connections table; the table scenario's connections have a table
    /// of their own).
    pub fn has_connections(self) -> bool {
        matches!(
            self,
            Self::Server | Self::Floor | Self::EndToEnd | Self::InProcess
        )
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
    /// Connections ask for this many distinct filters (`?filter=value.bucket == N`), in
    /// turn. 0: no filter.
    #[serde(default)]
    pub filters: usize,
    /// The buckets the records go round when connections filter: [`FILTER_BUCKETS`] at
    /// full load, so that deliveries do not depend on the filters; as many as the filters
    /// at tiny load, so that every record reaches someone within its short window.
    #[serde(default)]
    pub buckets: u64,
    /// Seconds of load before measuring.
    pub warmup_secs: u64,
    /// Seconds measured.
    pub measure_secs: u64,
    /// Every Nth connection stalls (0: none).
    pub slow_every: usize,
    /// The servers' `client_queue`, when not the default.
    pub client_queue: Option<usize>,
    /// The servers' `client_max_lag_ms`, when not the default.
    pub client_max_lag_ms: Option<u64>,
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
    /// How the backlog's values are written, and so decoded (ingest).
    #[serde(default)]
    pub value_format: ValueFormat,
    /// Keys in the table endpoint (table).
    #[serde(default)]
    pub keys: u64,
    /// Whether the servers compress streams and the clients ask for gzip.
    #[serde(default)]
    pub compressed: bool,
    /// The servers' `overload_wait_ms`, when not the default (0: they never shed).
    #[serde(default)]
    pub overload_wait_ms: Option<u64>,
}

/// The ingest backlog's value format: plain JSON, or the Confluent wire format with a
/// schema registered in the Schema Registry, which the consumer then decodes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum ValueFormat {
    /// An order line as JSON (`seq`, `ts`, `sku`, `qty`, `price`, `paid`), read with
    /// format `auto`.
    #[default]
    Json,
    /// The same fields in Avro, read with format `avro`.
    Avro,
    /// The same fields in Protobuf, read with format `protobuf`.
    Protobuf,
    /// The same JSON behind the wire format's header, read with format `json_schema`.
    JsonSchema,
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
            filters: 0,
            buckets: FILTER_BUCKETS,
            warmup_secs: 3,
            measure_secs: 20,
            slow_every: 0,
            client_queue: None,
            client_max_lag_ms: None,
            pinned: false,
            records: 0,
            rtt_ms: Vec::new(),
            value_format: ValueFormat::Json,
            keys: 0,
            compressed: false,
            overload_wait_ms: None,
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
            // `fjord bench quick`: a load that a debug build on a laptop carries too.
            "quick" => Self {
                kind: Kind::InProcess,
                connections: 1_000,
                rate: 20.0,
                warmup_secs: 1,
                measure_secs: 5,
                ..base
            },
            "quick-floor" => Self {
                kind: Kind::Floor,
                connections: 1_000,
                rate: 20.0,
                warmup_secs: 1,
                measure_secs: 5,
                ..base
            },
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
            // Issue 25: 10,000 connections, 1,000 records/s, as many deliveries whatever
            // the number of distinct filters (each record matches one bucket's filter), so
            // that what changes is the filters' own cost.
            "filters-1" | "filters-100" | "filters-1000" => Self {
                rate: 1_000.0,
                filters: name.trim_start_matches("filters-").parse().unwrap_or(1),
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
            // Holding connections is what it measures: on two cores the servers are seconds
            // behind, and would shed (server.overload_wait_ms) what it means to hold.
            "scale" => Self {
                servers: 6,
                connections: 100_000,
                rate: 1.0,
                measure_secs: 10,
                overload_wait_ms: Some(0),
                ..base
            },
            // Issue 26: a million held on one machine. Not in the standard run (~16 GiB):
            // 55 servers of ~18,200 (the open-file limit is 20,000 a process), and a
            // broadcast every 5 s, which two cores can deliver to a million (one a second
            // cannot be: BENCHMARKS.md, "A million connections"). A broadcast takes the
            // starved servers seconds, so a record may still wait for a connection when the
            // next comes: the default `client_max_lag_ms` (5 s) would cut it as too slow.
            "million" => Self {
                servers: 55,
                connections: 1_000_000,
                rate: 0.2,
                measure_secs: 30,
                overload_wait_ms: Some(0),
                client_max_lag_ms: Some(60_000),
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
            // Issue 25: a table of 100,000 keys, 1,000 clients connecting at once. No live
            // load unless asked for (--rate), so that every client must get every row.
            "table" => Self {
                kind: Kind::Table,
                connections: 1_000,
                rate: 0.0,
                keys: 100_000,
                warmup_secs: 2,
                measure_secs: 2,
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
            // With a light live load, so that the check of the clients' final maps against
            // the table runs with records after the snapshot too.
            Kind::Table => {
                return Some(Self {
                    connections: 20,
                    keys: 1_000,
                    rate: 20.0,
                    warmup_secs: 1,
                    measure_secs: 1,
                    ..full
                });
            }
            Kind::Server | Kind::Floor | Kind::EndToEnd | Kind::InProcess => {}
        }
        Some(Self {
            connections: (full.connections / 100).max(60),
            rate: full.rate.min(20.0),
            buckets: full.filters.max(1) as u64,
            warmup_secs: if full.kind == Kind::EndToEnd { 4 } else { 1 },
            measure_secs: 2,
            slow_every: full.slow_every.min(10),
            pinned: false,
            ..full
        })
    }
}

/// Every standard scenario, in the order they run.
pub(crate) const ALL: [&str; 16] = [
    "idle",
    "floor",
    "fanout",
    "floor-1k",
    "fanout-1k",
    "keyed",
    "filters-1",
    "filters-100",
    "filters-1000",
    "overload",
    "e2e",
    "scale",
    "ingest",
    "shards",
    "replica-lag",
    "table",
];

/// Where things are.
#[derive(Debug, Clone)]
pub(crate) struct Env {
    pub(super) redis: String,
    pub(super) kafka: String,
    bin_dir: PathBuf,
    pub(super) me: PathBuf,
    /// The Schema Registry's URL, when one is given.
    pub(super) schema_registry: Option<String>,
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
            schema_registry: services.schema_registry.clone(),
        })
    }

    /// For the scenarios of this binary alone (the floor, the server in process): no
    /// services, no other binary.
    pub(crate) fn alone() -> anyhow::Result<Self> {
        let me = std::env::current_exe().context("locating this binary")?;
        let bin_dir = me
            .parent()
            .map(std::path::Path::to_path_buf)
            .context("this binary's directory")?;
        // Written into the manifest, which wants them, and never connected to.
        Ok(Self {
            redis: "redis://127.0.0.1:6379".into(),
            kafka: "127.0.0.1:9092".into(),
            bin_dir,
            me,
            schema_registry: None,
        })
    }
}

/// A port on 127.0.0.1 that nothing listens on, for a process the bench starts. Chosen below
/// the kernel's ephemeral ports (32,768 and up by default): a port the kernel handed out
/// for a moment may be given to another process's outgoing connection before the server
/// binds it (55 servers starting at once, each connecting to Redis, did so once in a
/// million-connection run).
pub(super) fn free_port() -> anyhow::Result<u16> {
    const PORTS: std::ops::Range<u16> = 10_000..20_000;
    for _ in 0..100 {
        let port = fastrand::u16(PORTS);
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    anyhow::bail!("no free port on 127.0.0.1 in {PORTS:?} after 100 tries")
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
    if let Some(lag) = scenario.client_max_lag_ms {
        server["client_max_lag_ms"] = lag.into();
    }
    if scenario.compressed {
        server["compression"] = true.into();
    }
    if let Some(wait) = scenario.overload_wait_ms {
        server["overload_wait_ms"] = wait.into();
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

/// `program`, on `cpu` alone when the scenario is pinned.
pub(super) fn on_cpu(
    program: impl AsRef<std::ffi::OsStr>,
    scenario: &Scenario,
    cpu: u32,
) -> Command {
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

/// Publishes to `bus` at `rate` until `stop`; counts into `published`.
/// The buckets of the filter scenarios' records: `value.bucket` goes round them.
pub(super) const FILTER_BUCKETS: u64 = 1_000;

/// How the publisher spreads its records over what connections ask for; each part has a
/// sequence of its own, so that a connection that gets one part sees no gap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Spread {
    /// One sequence, no key.
    All,
    /// Keys `k0`, `k1`, … in turn.
    Keys(u64),
    /// `value.bucket` 0, 1, … in turn.
    Buckets(u64),
}

impl Spread {
    /// What `scenario`'s connections ask for.
    pub(crate) fn of(scenario: &Scenario) -> Self {
        if scenario.keyed {
            Self::Keys(scenario.connections.max(1) as u64)
        } else if scenario.filters > 0 {
            Self::Buckets(scenario.buckets.max(1))
        } else {
            Self::All
        }
    }
}

pub(super) async fn publish_to_bus(
    bus: Bus,
    manifest: Manifest,
    rate: f64,
    spread: Spread,
    published: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<()> {
    let endpoints: Vec<_> = manifest
        .endpoints
        .iter()
        .map(|(name, endpoint)| (name.clone(), endpoint.keeping()))
        .collect();
    let started = Instant::now();
    let mut sent = 0_u64;
    while !stop.load(Relaxed) {
        let due = (started.elapsed().as_secs_f64() * rate) as u64;
        if sent >= due {
            tokio::time::sleep(Duration::from_micros(500)).await;
            continue;
        }
        let (key, bucket, seq) = match spread {
            Spread::Keys(keys) => (Some(format!("k{}", sent % keys)), None, sent / keys),
            Spread::Buckets(buckets) => (None, Some(sent % buckets), sent / buckets),
            Spread::All => (None, None, sent),
        };
        let envelope = Envelope {
            json: event_envelope(sent, key.as_deref(), bucket, seq, now_us()),
            filter_key: key.map(String::into_bytes),
            tombstone: false,
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
