//! What a scenario measured, the one record every kind of scenario fills: the fan-out's
//! connections, latency, CPU and memory, and the figures of the ingest, shards and
//! replica-lag and table scenarios. `fjord bench` writes these as JSON; the report reads them back.

use serde::{Deserialize, Serialize};

use super::now_us;
use super::scenario::Scenario;

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
    /// The latency split where the bus took each record.
    #[serde(default)]
    pub stages: Option<Stages>,
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
    /// `fjord_clients_shed_total` rise during the run (overload), summed over servers.
    #[serde(default)]
    pub clients_shed: u64,
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
    /// Records decided for a filter in the window, per record published: the distinct
    /// filters a record met, however many connections share them.
    #[serde(default)]
    pub filter_evaluations_per_record: f64,
    /// Load-generator CPU in the window, in seconds.
    pub loadgen_cpu_secs: f64,
    /// Response bytes the connections read in the window, chunk framing and heartbeats
    /// included, as they came over the wire (compressed, for a compressed run).
    #[serde(default)]
    pub window_bytes: u64,
    /// `window_bytes` per delivery.
    #[serde(default)]
    pub bytes_per_delivery: f64,
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
    /// The table scenario's figures.
    #[serde(default)]
    pub table: Option<TableRun>,
}

impl Outcome {
    /// Whether the scenario ran without problems and measured something.
    pub fn ran_cleanly(&self) -> bool {
        self.errors.is_empty()
            && (self.connected > 0
                || !self.ingest.is_empty()
                || !self.shards.is_empty()
                || self.replica_lag.is_some()
                || self.table.is_some())
    }
}

/// A delivery's latency in two stages, split at the bus's stream id (whole milliseconds):
/// publish, or Kafka produce end to end, → the bus took it; the bus → the client read it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Stages {
    /// Publish → bus, median.
    pub to_bus_p50_ms: f64,
    /// Publish → bus, 99th percentile.
    pub to_bus_p99_ms: f64,
    /// Bus → client, median.
    pub from_bus_p50_ms: f64,
    /// Bus → client, 99th percentile.
    pub from_bus_p99_ms: f64,
    /// Bus → the server writing it to the socket, by the servers' own histogram
    /// (`fjord_delivery_latency_seconds{since="bus"}`) over the window: the mean, and
    /// quantiles interpolated within its buckets (1, 2, 5, 10, 25, 50, 100, 250, 500 ms …).
    /// What lies between it and `from_bus` is the loopback and the load generator.
    #[serde(default)]
    pub to_socket_mean_ms: Option<f64>,
    #[serde(default)]
    pub to_socket_p50_ms: Option<f64>,
    #[serde(default)]
    pub to_socket_p99_ms: Option<f64>,
}

/// What one consumer member did at one round trip.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct IngestRun {
    /// The round trip to Redis asked for, in milliseconds (0: straight to Redis).
    pub rtt_ms: f64,
    /// The median of a Redis PING through the same path, in milliseconds.
    pub rtt_measured_ms: f64,
    /// Their mean: what one request at a time waits on average.
    #[serde(default)]
    pub rtt_mean_ms: f64,
    /// Records carried.
    pub records: u64,
    /// From the consumer's start to the first record in the stream, in seconds.
    pub startup_secs: f64,
    /// From the first record's append to the last's, by Redis's clock, in seconds.
    pub secs: f64,
    /// Records per second over that span.
    pub records_per_sec: f64,
    /// The consumer's CPU (user + system) per record, in microseconds.
    pub consumer_cpu_us_per_record: f64,
    /// Redis's CPU per record, in microseconds (the whole Redis: anything else using it counts).
    pub redis_cpu_us_per_record: f64,
}

/// What one cluster shape carried.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ShardRun {
    /// Primaries (shards).
    pub primaries: usize,
    /// Endpoints on each primary.
    pub endpoints_per_primary: Vec<usize>,
    /// Publishers, one partition and one endpoint each.
    pub publishers: usize,
    /// Records per batch.
    pub batch: usize,
    /// Seconds measured per phase.
    pub secs: f64,
    /// Publishing alone: records per second taken.
    pub records_per_sec: f64,
    /// Publishing alone: each primary's CPU, in cores.
    pub redis_cores: Vec<f64>,
    /// Publishing alone: the load generator's CPU (this process), in cores.
    pub loadgen_cores: f64,
    /// Readers in the read phase.
    pub readers: usize,
    /// With readers: records per second published.
    pub read_phase_records_per_sec: f64,
    /// With readers: entries per second they received, summed over readers.
    pub entries_per_sec: f64,
    /// With readers: each primary's CPU, in cores.
    pub read_phase_redis_cores: Vec<f64>,
    /// With readers: the load generator's CPU, in cores.
    pub read_phase_loadgen_cores: f64,
}

/// Delivery latency of one reader, publish → read.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Latency {
    /// Entries read in the window.
    pub entries: u64,
    /// Median, in milliseconds.
    pub p50_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// The largest.
    pub max_ms: f64,
}

/// The replica-lag scenario's figures.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ReplicaLag {
    /// Records per second published.
    pub rate: f64,
    /// Records published in the window.
    pub records: u64,
    /// Read from the primary.
    pub primary: Latency,
    /// Read from the replica.
    pub replica: Latency,
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
    pub(super) fn this() -> Self {
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

pub(super) fn utc_now() -> String {
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

/// Times over connections, in milliseconds.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Quantiles {
    /// Median.
    pub p50_ms: f64,
    /// 90th percentile.
    pub p90_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// The largest.
    pub max_ms: f64,
}

impl Quantiles {
    pub(super) fn of(histogram: &super::Histogram) -> Self {
        Self {
            p50_ms: histogram.quantile_ms(0.5),
            p90_ms: histogram.quantile_ms(0.9),
            p99_ms: histogram.quantile_ms(0.99),
            max_ms: histogram.max_ms(),
        }
    }
}

/// The table scenario's figures: a table endpoint filled with keys, then clients that all
/// connect at once and read its snapshot.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct TableRun {
    /// Keys in the table.
    pub keys: u64,
    /// The average record's value, in bytes of JSON.
    pub value_bytes: f64,
    /// The average row's SSE event (`event:` and `data:` lines), in bytes.
    pub event_bytes: f64,
    /// Filling the table: seconds, in batches.
    pub fill_secs: f64,
    /// Records per batch while filling.
    pub fill_batch: usize,
    /// `MEMORY USAGE` of the rows hash, in bytes.
    pub redis_rows_bytes: u64,
    /// `MEMORY USAGE` of the row keys' sorted set.
    pub redis_row_keys_bytes: u64,
    /// `MEMORY USAGE` of the endpoint's stream.
    pub redis_stream_bytes: u64,
    /// Entries in the stream.
    pub stream_entries: u64,
    /// Redis's `used_memory` before filling.
    pub redis_used_before: u64,
    /// After filling.
    pub redis_used_after: u64,
    /// The most seen during the burst (sampled).
    pub redis_used_peak: u64,
    /// Clients that connected.
    pub clients: u64,
    /// Clients whose snapshot ended.
    pub complete: u64,
    /// From a client's start to its first row.
    pub first_row: Quantiles,
    /// From a client's start to its `fjord.snapshot_end`.
    pub snapshot_end: Quantiles,
    /// Rows received, over all clients.
    pub rows: u64,
    /// Keys × clients.
    pub rows_expected: u64,
    /// Clients whose final map (snapshot, then live records) equals the table.
    pub maps_equal: u64,
    /// Live records published during the burst and after it.
    pub live_published: u64,
    /// Live records received, over all clients.
    pub live_received: u64,
    /// From stopping the live load until every client had its last record, in seconds.
    #[serde(default)]
    pub drain_secs: f64,
    /// Clients the server cut off (`fjord_clients_dropped_total`).
    #[serde(default)]
    pub clients_dropped: u64,
    /// Reconnections with `Last-Event-ID` after the server closed a client whose snapshot
    /// had ended.
    #[serde(default)]
    pub resumed: u64,
    /// Snapshots sent again on such a reconnection.
    #[serde(default)]
    pub resnapshots: u64,
    /// From the workers' start to the last `fjord.snapshot_end`, in seconds.
    pub burst_secs: f64,
    /// Bytes the clients received in the burst (response bodies).
    pub bytes: u64,
    /// The server's resident memory before the table was filled, in KiB.
    pub server_rss_kib_empty: u64,
    /// Before the burst.
    pub server_rss_kib_before: u64,
    /// Its peak during the burst (`VmHWM`, reset before it when the kernel allows).
    pub server_rss_kib_peak: u64,
    /// When every snapshot had ended, the clients still connected.
    pub server_rss_kib_after: u64,
    /// Whether the peak is the burst's own (`VmHWM` was reset before it), or the process's.
    pub peak_reset: bool,
    /// The server's CPU (user + system) in the burst, in seconds.
    pub server_cpu_secs: f64,
    /// Redis's CPU in the burst (the whole Redis: anything else using it counts).
    pub redis_cpu_secs: f64,
    /// The load generator's CPU in the burst.
    pub loadgen_cpu_secs: f64,
    /// The highest `fjord_replay_buffered_bytes` sampled during the burst.
    pub replay_buffered_peak: u64,
}
