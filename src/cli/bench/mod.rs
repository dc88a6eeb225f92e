//! `fjord bench`: the load generator, the floor and the standard scenarios behind
//! `BENCHMARKS.md`, its plots, and `fjord bench quick`, which needs no service. The controller starts real `fjord-server` (and for the end-to-end
//! scenario `fjord-consumer`) processes, re-executes itself as worker processes that open
//! HTTP/1.1 SSE connections from several 127.0.0.x source addresses, publishes records that
//! carry their publish time and a sequence number (straight to the Redis bus with
//! [`fjord_bus`], or to Kafka end to end), and reads the servers' CPU time and resident
//! memory from `/proc`. The floor is a bare non-blocking write loop doing the same fan-out,
//! measured by the same workers in the same run. The ingest scenario instead times one
//! `fjord-consumer` through a Kafka backlog, with Redis behind a delaying proxy; the shards
//! and replica-lag scenarios measure the bus alone, on local Redis Clusters that they start
//! and stop themselves; the table scenario times clients that all connect at once to read a
//! table endpoint's snapshot. Not part of the test suite.

mod delay;
mod fanout;
mod floor;
mod histogram;
mod ingest;
mod outcome;
mod plot;
mod quick;
mod report;
mod scenario;
mod shards;
mod snapshot;
mod sweep;
mod table;
mod values;
mod worker;

use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;

use self::outcome::{Machine, Results, utc_now};
use self::scenario::{ALL, Env, Kind};

pub use histogram::Histogram;
pub use outcome::{IngestRun, Latency, Outcome, Quantiles, ReplicaLag, ShardRun, TableRun};
pub use scenario::Scenario;
pub use snapshot::{MapCount, SnapshotReport, TableSpec};
pub use worker::{Target, WorkerReport, WorkerSpec};

/// The `fjord bench` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum BenchCommand {
    /// Measures the fan-out in a few seconds with no service: the server's code in this
    /// process on the in-memory bus, 1,000 connections, then the floor at the same load;
    /// prints a summary.
    Quick,
    /// Sweeps the server and the floor over load and over connections (several minutes;
    /// Redis and a release build, as `all`) and draws the plots of BENCHMARKS.md.
    Plots {
        /// Where the SVG plots and the sweep's JSON go.
        #[arg(long, default_value = "docs/bench")]
        out: PathBuf,
        /// The Markdown file whose plots section is rewritten.
        #[arg(long, default_value = "BENCHMARKS.md")]
        markdown: PathBuf,
        /// The plots' directory as the Markdown file refers to it.
        #[arg(long, default_value = "docs/bench")]
        link: String,
        #[command(flatten)]
        services: Services,
    },
    /// Runs every standard scenario, writes JSON results and rewrites BENCHMARKS.md's table.
    All {
        /// Where the JSON results go.
        #[arg(long, default_value = "target/bench-results.json")]
        out: PathBuf,
        /// The Markdown file whose generated section is rewritten (skipped with --tiny).
        #[arg(long, default_value = "BENCHMARKS.md")]
        markdown: PathBuf,
        /// Every scenario at a tiny load: checks that the tool works, in well under a minute.
        #[arg(long)]
        tiny: bool,
        /// Only these scenarios (repeatable): idle, floor, fanout, floor-1k, fanout-1k, keyed,
        /// filters-1, filters-100, filters-1000, overload, e2e, scale, ingest, shards,
        /// replica-lag, table.
        #[arg(long = "only")]
        only: Vec<String>,
        /// The command line to print in the report.
        #[arg(long, default_value = "ci/bench.sh")]
        command: String,
        #[command(flatten)]
        services: Services,
    },
    /// Runs one scenario with the given load and prints its outcome as JSON.
    Run {
        /// idle, floor, fanout, floor-1k, fanout-1k, keyed, filters-1, filters-100,
        /// filters-1000, overload, e2e, scale, ingest, shards, replica-lag or table; or
        /// million (a million connections held: about 16 GiB and half an hour).
        scenario: String,
        /// Connections in all (table: clients connecting at once).
        #[arg(long)]
        connections: Option<usize>,
        /// Records per second (table: live updates of random keys during the burst).
        #[arg(long)]
        rate: Option<f64>,
        /// Seconds measured.
        #[arg(long)]
        secs: Option<u64>,
        /// Server processes.
        #[arg(long)]
        servers: Option<usize>,
        /// Every Nth connection stalls (0: none).
        #[arg(long)]
        slow_every: Option<usize>,
        /// Connection `i` asks for `?filter=value.bucket == i % N`, N distinct filters in
        /// all (0: no filter); records go round 1,000 buckets.
        #[arg(long)]
        filters: Option<usize>,
        /// The servers' per-client queue.
        #[arg(long)]
        client_queue: Option<usize>,
        /// The servers' `client_max_lag_ms`.
        #[arg(long)]
        client_max_lag_ms: Option<u64>,
        /// Ingest: records in the Kafka backlog.
        #[arg(long)]
        records: Option<u64>,
        /// Ingest: round trips to Redis in milliseconds, comma-separated (0: Redis straight).
        #[arg(long, value_delimiter = ',')]
        rtt_ms: Vec<f64>,
        /// Ingest: the values' format; all but json are registered in the Schema Registry
        /// (--schema-registry) and decoded by the consumer.
        #[arg(long, value_enum)]
        value_format: Option<scenario::ValueFormat>,
        /// Table: keys in the table endpoint.
        #[arg(long)]
        keys: Option<u64>,
        /// The servers compress streams (`server.compression`), and the clients ask for gzip
        /// and decode it.
        #[arg(long)]
        compressed: bool,
        /// The servers' `overload_wait_ms` (0: they never shed connections).
        #[arg(long)]
        overload_wait_ms: Option<u64>,
        #[command(flatten)]
        services: Services,
    },
    /// A load-generator worker process (started by the controller).
    #[command(hide = true)]
    Worker {
        /// The worker's spec, as JSON.
        #[arg(long)]
        spec: String,
    },
    /// The floor: a bare non-blocking write loop (started by the controller).
    #[command(hide = true)]
    Floor {
        /// Where to listen, on 127.0.0.1.
        #[arg(long)]
        port: u16,
        /// It exits by itself after this long.
        #[arg(long, default_value_t = 600)]
        deadline_secs: u64,
    },
}

/// Where Kafka and Redis are, and where the binaries are.
#[derive(Debug, Clone, clap::Args)]
pub struct Services {
    /// Redis for the bus.
    #[arg(
        long,
        env = "FJORD_TEST_REDIS_URL",
        default_value = "redis://127.0.0.1:16379"
    )]
    pub redis: String,
    /// Kafka brokers for the end-to-end scenario.
    #[arg(
        long,
        env = "FJORD_TEST_KAFKA_BROKERS",
        default_value = "127.0.0.1:19092"
    )]
    pub kafka: String,
    /// The directory holding `fjord-server` and `fjord-consumer` (default: beside this binary).
    #[arg(long)]
    pub bin_dir: Option<PathBuf>,
    /// The Schema Registry (its Confluent API) for the ingest scenario's Avro, Protobuf and
    /// JSON Schema values.
    #[arg(long, env = "FJORD_TEST_SCHEMA_REGISTRY_URL")]
    pub schema_registry: Option<String>,
}

/// Runs a `fjord bench` subcommand.
pub async fn run(command: BenchCommand) -> anyhow::Result<()> {
    match command {
        BenchCommand::Quick => {
            let summary = quick::run().await?;
            #[allow(clippy::print_stdout, reason = "the summary is the command's output")]
            {
                print!("{summary}");
            }
            Ok(())
        }
        BenchCommand::Plots {
            out,
            markdown,
            link,
            services,
        } => {
            let env = Env::new(&services)?;
            let swept = sweep::run(&env).await?;
            sweep::write(&swept, &out, &markdown, &link)?;
            tracing::info!(path = %out.display(), markdown = %markdown.display(), "wrote the plots");
            Ok(())
        }
        BenchCommand::All {
            out,
            markdown,
            tiny,
            only,
            command,
            services,
        } => {
            let env = Env::new(&services)?;
            let results = run_all(&env, tiny, &only).await?;
            report::write(&out, &results)?;
            tracing::info!(path = %out.display(), "wrote results");
            if !tiny {
                report::rewrite_markdown(&markdown, &results, &command)?;
                tracing::info!(path = %markdown.display(), "rewrote the results table");
            }
            let broken: Vec<&str> = results
                .outcomes
                .iter()
                .filter(|outcome| !outcome.ran_cleanly())
                .map(|outcome| outcome.scenario.as_str())
                .collect();
            if !broken.is_empty() {
                anyhow::bail!("scenarios that did not run cleanly: {}", broken.join(", "));
            }
            Ok(())
        }
        BenchCommand::Run {
            scenario,
            connections,
            rate,
            secs,
            servers,
            slow_every,
            filters,
            client_queue,
            client_max_lag_ms,
            records,
            rtt_ms,
            value_format,
            keys,
            compressed,
            overload_wait_ms,
            services,
        } => {
            let env = Env::new(&services)?;
            let mut chosen = Scenario::standard(&scenario, false)
                .ok_or_else(|| anyhow::anyhow!("no scenario named {scenario:?}"))?;
            if let Some(connections) = connections {
                chosen.connections = connections;
            }
            if let Some(rate) = rate {
                chosen.rate = rate;
            }
            if let Some(secs) = secs {
                chosen.measure_secs = secs;
            }
            if let Some(servers) = servers {
                chosen.servers = servers;
            }
            if let Some(slow_every) = slow_every {
                chosen.slow_every = slow_every;
            }
            if let Some(filters) = filters {
                chosen.filters = filters;
            }
            if client_queue.is_some() {
                chosen.client_queue = client_queue;
            }
            if client_max_lag_ms.is_some() {
                chosen.client_max_lag_ms = client_max_lag_ms;
            }
            if let Some(records) = records {
                chosen.records = records;
            }
            if !rtt_ms.is_empty() {
                chosen.rtt_ms = rtt_ms;
            }
            if let Some(format) = value_format {
                chosen.value_format = format;
            }
            if let Some(keys) = keys {
                chosen.keys = keys;
            }
            chosen.compressed |= compressed;
            if overload_wait_ms.is_some() {
                chosen.overload_wait_ms = overload_wait_ms;
            }
            let outcome = run_scenario(&env, &chosen).await?;
            #[allow(clippy::print_stdout, reason = "the outcome is the command's output")]
            {
                println!("{}", serde_json::to_string_pretty(&outcome)?);
            }
            Ok(())
        }
        BenchCommand::Worker { spec } => {
            let spec: WorkerSpec = serde_json::from_str(&spec)?;
            // The worker runs its own single-threaded runtime.
            tokio::task::spawn_blocking(move || worker::run(&spec)).await?
        }
        BenchCommand::Floor {
            port,
            deadline_secs,
        } => tokio::task::spawn_blocking(move || floor::run(port, deadline_secs)).await?,
    }
}

/// Runs one scenario, by its kind.
async fn run_scenario(env: &Env, scenario: &Scenario) -> anyhow::Result<Outcome> {
    match scenario.kind {
        // No connections: one consumer and Redis.
        Kind::Ingest => ingest::run(env, scenario).await,
        // No connections: the bus alone, on clusters of its own.
        Kind::Shards => shards::run(scenario).await,
        Kind::ReplicaLag => shards::replica_lag(env, scenario).await,
        // One server; its clients read a snapshot, not a measured window.
        Kind::Table => table::run(env, scenario).await,
        Kind::Floor | Kind::Server | Kind::EndToEnd | Kind::InProcess => {
            fanout::run_connections(env, scenario).await
        }
    }
}

/// Runs the standard scenarios (or `only` these).
async fn run_all(env: &Env, tiny: bool, only: &[String]) -> anyhow::Result<Results> {
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
        let outcome = match run_scenario(env, &scenario).await {
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

/// Microseconds since the epoch.
pub fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| {
            u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX)
        })
}

/// A process's user plus system CPU time, in clock ticks (`/proc/PID/stat`).
pub fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces; fields are counted after its closing parenthesis.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line, 12 and 13 after the name.
    let user: u64 = fields.get(11)?.parse().ok()?;
    let system: u64 = fields.get(12)?.parse().ok()?;
    Some(user + system)
}

/// Clock ticks per second (`getconf CLK_TCK`; 100 on Linux).
pub fn ticks_per_second() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|output| String::from_utf8(output.stdout).ok())
            .and_then(|text| text.trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// A process's resident memory in KiB (`VmRSS` in `/proc/PID/status`).
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|value| value.split_whitespace().next())
        .and_then(|kib| kib.parse().ok())
}

/// The envelope JSON of benchmark record `offset`, as fjord-consumer would encode it, whose
/// value carries the sequence number within what its receivers get and the publish time.
pub fn event_envelope(
    offset: u64,
    key: Option<&str>,
    bucket: Option<u64>,
    seq: u64,
    published_us: u64,
) -> Vec<u8> {
    let key = key.map_or_else(|| "null".to_owned(), |key| format!("\"{key}\""));
    let bucket = bucket.map_or_else(String::new, |bucket| format!(r#""bucket":{bucket},"#));
    format!(
        r#"{{"topic":"bench","partition":0,"offset":{offset},"key":{key},"timestamp":{},"headers":{{}},"value":{{{bucket}"seq":{seq},"ts":{published_us}}}}}"#,
        published_us / 1000
    )
    .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process() {
        let pid = std::process::id();
        assert!(cpu_ticks(pid).is_some());
        assert!(rss_kib(pid).is_some_and(|kib| kib > 0));
    }

    #[test]
    fn envelopes_are_json_with_seq_and_time() {
        let json: serde_json::Value = serde_json::from_slice(&event_envelope(
            7,
            Some("k1"),
            None,
            3,
            1_764_000_000_123_456,
        ))
        .expect("json");
        assert_eq!(json["value"]["seq"], 3);
        let bucketed: serde_json::Value =
            serde_json::from_slice(&event_envelope(7, None, Some(9), 3, 1)).expect("json");
        assert_eq!(bucketed["value"]["bucket"], 9);
        assert_eq!(bucketed["value"]["seq"], 3);
        assert_eq!(json["value"]["ts"], 1_764_000_000_123_456_u64);
        assert_eq!(json["key"], "k1");
        assert_eq!(json["timestamp"], 1_764_000_000_123_u64);
    }
}
