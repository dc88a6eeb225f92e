//! The table scenario (issue 25): one release `fjord-server` on Redis with one table
//! endpoint, filled with `keys` driver positions in batches straight to the bus (the
//! consumer's `publish_batch`, the same Lua script), then `connections` clients that all
//! connect at once and read the snapshot. It owns what is measured around that burst: the
//! Redis memory the table takes (`MEMORY USAGE` of the rows hash, the row keys' sorted set
//! and the stream, and `used_memory` before and after filling), the server's resident
//! memory before, at its peak (`VmHWM`, reset before the burst) and after, its CPU and
//! Redis's for the burst, and the peak of `fjord_replay_buffered_bytes`; the workers time
//! each client's first row and `fjord.snapshot_end` and check its rows
//! ([`super::snapshot`]). With a rate, a light live load updates random keys from the
//! burst's start until `measure_secs` after its end; once every client has received the
//! last of them (resuming by id if the server closed it), every client's final map must
//! equal the table. Without one, every client must get exactly one row per key.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use redis::aio::ConnectionManager;

use super::fanout::{Driven, counter_total, wait_ready, worker_specs};
use super::histogram::Histogram;
use super::ingest::forget;
use super::outcome::{Outcome, Quantiles, TableRun};
use super::scenario::{
    ENDPOINT, Env, Scenario, free_port, manifest, on_cpu, server_command, unique,
};
use super::snapshot::{SnapshotReport, TableSpec, key_of, mix};
use super::worker::WorkerReport;
use super::{cpu_ticks, now_us, rss_kib, ticks_per_second};
use fjord_bus::envelope::Envelope;
use fjord_bus::{Batch, Bus, Publication};
use fjord_config::{EndpointName, Keeping, Manifest};

/// Records per batch while filling the table: about the consumer's (1,024).
const FILL_BATCH: usize = 1_000;
/// The server's count of clients it cut off (a full queue, or too far behind).
const DROPPED: &str = "fjord_clients_dropped_total";
/// How often the burst's peaks are sampled.
const SAMPLE_EVERY: Duration = Duration::from_millis(200);

/// Runs the table scenario.
pub(super) async fn run(env: &Env, scenario: &Scenario) -> anyhow::Result<Outcome> {
    let prefix = unique("bench-table");
    let mut redis = redis::Client::open(env.redis.as_str())?
        .get_connection_manager()
        .await
        .context("connecting to Redis")?;
    let outcome = measure(env, scenario, &prefix, &mut redis).await;
    // The table is tens of megabytes, and the test Redis is shared.
    forget(&mut redis, &prefix).await;
    outcome
}

/// The manifest of `scenario`'s server: the standard one, with the endpoint a table of
/// the scenario's keys under the default retention.
fn table_manifest(
    env: &Env,
    scenario: &Scenario,
    port: u16,
    prefix: &str,
) -> anyhow::Result<String> {
    let mut manifest: serde_json::Value =
        serde_json::from_str(&manifest(env, scenario, &env.redis, port, prefix, "bench"))?;
    let endpoint = &mut manifest["endpoints"][ENDPOINT];
    endpoint
        .as_object_mut()
        .context("the manifest's endpoint")?
        .remove("retention");
    endpoint["mode"] = "table".into();
    endpoint["table"] = serde_json::json!({
        "max_keys": scenario.keys.max(1),
        "max_bytes": (scenario.keys * 1024).max(256 * 1024 * 1024),
    });
    Ok(manifest.to_string())
}

async fn measure(
    env: &Env,
    scenario: &Scenario,
    prefix: &str,
    redis: &mut ConnectionManager,
) -> anyhow::Result<Outcome> {
    let keys = scenario.keys.max(1);
    let port = free_port()?;
    let manifest_text = table_manifest(env, scenario, port, prefix)?;
    let manifest = Manifest::parse(&manifest_text)?;
    let endpoints: Vec<(EndpointName, Keeping)> = manifest
        .endpoints
        .iter()
        .map(|(name, endpoint)| (name.clone(), endpoint.keeping()))
        .collect();
    let name = endpoints.first().context("the endpoint")?.0.clone();
    let tag = format!("{{{prefix}:{name}}}");
    let mut outcome = Outcome {
        scenario: scenario.name.clone(),
        load: Some(scenario.clone()),
        ..Outcome::default()
    };
    let mut table = TableRun {
        keys,
        fill_batch: FILL_BATCH,
        redis_used_before: info_number(redis, "memory", "used_memory").await?,
        ..TableRun::default()
    };

    let server = server_command(env, scenario, "fjord-server", &manifest_text).spawn()?;
    let pid = server.id().context("the server's pid")?;
    wait_ready(port).await?;
    table.server_rss_kib_empty = rss_kib(pid).unwrap_or(0);

    // Fill.
    let bus = fjord_bus::connect_redis(&manifest.redis).await?;
    let filled = Instant::now();
    let (mut value_bytes, mut event_bytes) = (0_u64, 0_u64);
    for start in (0..keys).step_by(FILL_BATCH) {
        let records: Vec<(i64, Envelope)> = (start..(start + FILL_BATCH as u64).min(keys))
            .map(|key| {
                let (envelope, value) = driver(key, key, key, None, now_us());
                value_bytes += value as u64;
                event_bytes += row_event_bytes(&envelope);
                (i64::try_from(key).unwrap_or(i64::MAX), envelope)
            })
            .collect();
        bus.publish_batch(Batch {
            topic: "bench",
            partition: 0,
            endpoints: &endpoints,
            records: &records,
        })
        .await?;
    }
    table.fill_secs = filled.elapsed().as_secs_f64();
    table.value_bytes = value_bytes as f64 / keys as f64;
    table.event_bytes = event_bytes as f64 / keys as f64;
    // Let the server read the records it streams live, to no one, before the burst.
    tokio::time::sleep(Duration::from_secs(scenario.warmup_secs)).await;

    let rows_held: u64 = redis::cmd("HLEN")
        .arg(format!("{tag}:rows"))
        .query_async(redis)
        .await?;
    if rows_held != keys {
        outcome
            .errors
            .push(format!("the table holds {rows_held} rows, not {keys}"));
    }
    table.redis_rows_bytes = memory_usage(redis, &format!("{tag}:rows")).await?;
    table.redis_row_keys_bytes = memory_usage(redis, &format!("{tag}:row-keys")).await?;
    table.redis_stream_bytes = memory_usage(redis, &format!("{tag}:stream")).await?;
    table.stream_entries = redis::cmd("XLEN")
        .arg(format!("{tag}:stream"))
        .query_async(redis)
        .await?;
    table.redis_used_after = info_number(redis, "memory", "used_memory").await?;
    tracing::info!(
        keys,
        fill_secs = table.fill_secs,
        rows_mib = table.redis_rows_bytes as f64 / 1048576.0,
        "filled the table"
    );

    // The burst.
    table.server_rss_kib_before = rss_kib(pid).unwrap_or(0);
    outcome.rss_kib_before = vec![table.server_rss_kib_before];
    // Writing 5 to clear_refs resets the peak resident size to the current one.
    table.peak_reset = std::fs::write(format!("/proc/{pid}/clear_refs"), "5").is_ok();
    let cpu_before = cpu_ticks(pid).unwrap_or(0);
    let redis_cpu_before = redis_cpu_secs(redis).await?;
    let stop_live = Arc::new(AtomicBool::new(false));
    let live_published = Arc::new(AtomicU64::new(0));
    let live = (scenario.rate > 0.0).then(|| {
        tokio::spawn(live_load(
            bus.clone(),
            endpoints.clone(),
            keys,
            scenario.rate,
            Arc::clone(&live_published),
            Arc::clone(&stop_live),
        ))
    });
    let stop_sampling = Arc::new(AtomicBool::new(false));
    let sampler = tokio::spawn(sample_peaks(
        port,
        pid,
        redis.clone(),
        Arc::clone(&stop_sampling),
    ));

    let deadline_secs = 600 + keys * scenario.connections as u64 / 100_000;
    let address = SocketAddr::from(([127, 0, 0, 1], port));
    let mut workers = Vec::new();
    let started = Instant::now();
    for mut spec in worker_specs(scenario, &[address], deadline_secs) {
        // Every client at once.
        spec.connect_concurrency = spec.targets.iter().map(|target| target.count).sum();
        spec.table = Some(TableSpec { keys });
        let mut command = on_cpu(&env.me, scenario, 1);
        command
            .args(["bench", "worker", "--spec", &serde_json::to_string(&spec)?])
            .env("RUST_LOG", "warn");
        workers.push(Driven::spawn(command)?);
    }
    let patience = Duration::from_secs(60 + scenario.connections as u64 / 500);
    for worker in &mut workers {
        let connected = worker.expect("connected", patience).await?;
        outcome.connected += connected["connected"].as_u64().unwrap_or(0);
        outcome.failed += connected["failed"].as_u64().unwrap_or(0);
        if let Some(error) = connected["first_error"].as_str() {
            outcome.errors.push(format!("connecting: {error}"));
        }
    }
    tracing::info!(
        connected = outcome.connected,
        failed = outcome.failed,
        "connected"
    );
    for worker in &mut workers {
        let ended = worker
            .expect("snapshots", Duration::from_secs(deadline_secs))
            .await?;
        table.loadgen_cpu_secs += ended["cpu_secs"].as_f64().unwrap_or(0.0);
        table.bytes += ended["bytes"].as_u64().unwrap_or(0);
    }
    let burst = started.elapsed();
    outcome.clients_dropped = counter_total(&[port], DROPPED).await;
    table.server_cpu_secs =
        cpu_ticks(pid).unwrap_or(0).saturating_sub(cpu_before) as f64 / ticks_per_second();
    table.redis_cpu_secs = redis_cpu_secs(redis).await? - redis_cpu_before;
    table.server_rss_kib_after = rss_kib(pid).unwrap_or(0);
    stop_sampling.store(true, Relaxed);
    let peaks = sampler.await?;
    table.server_rss_kib_peak = hwm_kib(pid).unwrap_or(0).max(peaks.rss_kib);
    table.replay_buffered_peak = peaks.replay_buffered;
    table.redis_used_peak = peaks.redis_used;
    tracing::info!(secs = burst.as_secs_f64(), "every snapshot ended");

    // What the clients hold at the end: the live records after the burst too.
    let mut last: Vec<u64> = (0..keys).collect();
    if let Some(live) = live {
        tokio::time::sleep(Duration::from_secs(scenario.measure_secs)).await;
        stop_live.store(true, Relaxed);
        last = live.await??;
        table.live_published = live_published.load(Relaxed);
        // Every client must have the last record before its map is read.
        if let Some(final_seq) = (table.live_published > 0).then(|| keys + table.live_published - 1)
        {
            let draining = Instant::now();
            for worker in &mut workers {
                worker.say(&format!("await {final_seq}")).await;
            }
            for worker in &mut workers {
                if let Err(error) = worker
                    .expect("drained", Duration::from_secs(deadline_secs))
                    .await
                {
                    outcome.errors.push(format!(
                        "clients did not all get the last live record: {error:#}"
                    ));
                }
            }
            table.drain_secs = draining.elapsed().as_secs_f64();
        }
    }
    let expected = last.iter().enumerate().fold(0_u64, |sum, (key, &seq)| {
        sum.wrapping_add(mix(key as u64, seq))
    });
    let mut snapshot = SnapshotReport::default();
    let mut latency = Histogram::default();
    for worker in &mut workers {
        worker.say("stop").await;
    }
    for worker in &mut workers {
        let report = worker.expect("report", Duration::from_secs(60)).await?;
        let report: WorkerReport = serde_json::from_value(report["report"].clone())?;
        outcome.closed_by_server += report.closed_by_server;
        outcome.deliveries += report.events;
        outcome.loadgen_cpu_secs += report.cpu_secs;
        for slice in &report.slices {
            latency.merge(slice);
        }
        if let Some(theirs) = &report.snapshot {
            snapshot.merge(theirs);
        }
    }
    outcome.rss_kib_after = vec![table.server_rss_kib_after];
    drop(workers);
    drop(server);

    table.clients = outcome.connected;
    table.complete = snapshot.complete;
    table.first_row = Quantiles::of(&snapshot.first_row);
    table.snapshot_end = Quantiles::of(&snapshot.end);
    table.rows = snapshot.rows;
    table.rows_expected = keys * outcome.connected;
    table.live_received = snapshot.live;
    table.resumed = snapshot.resumed;
    table.resnapshots = snapshot.resnapshots;
    table.clients_dropped = outcome.clients_dropped;
    table.burst_secs = snapshot.burst_secs;
    table.maps_equal = snapshot
        .maps
        .iter()
        .filter(|map| map.held == keys && map.digest == expected)
        .map(|map| map.connections)
        .sum();
    outcome.records = table.live_published;
    outcome.window_secs = burst.as_secs_f64();
    outcome.p50_ms = latency.quantile_ms(0.5);
    outcome.p99_ms = latency.quantile_ms(0.99);
    outcome.max_ms = latency.max_ms();
    outcome.server_cpu_secs = table.server_cpu_secs;
    if outcome.connected > 0 {
        outcome.rss_kib_per_connection = table
            .server_rss_kib_after
            .saturating_sub(table.server_rss_kib_before)
            as f64
            / outcome.connected as f64;
    }
    outcome
        .errors
        .extend(problems(&table, &snapshot, &outcome, scenario.rate > 0.0));
    outcome.table = Some(table);
    Ok(outcome)
}

/// What makes the run's figures doubtful: clients that failed, snapshots that did not end,
/// rows missing or out of order, maps unlike the table.
fn problems(
    table: &TableRun,
    snapshot: &SnapshotReport,
    outcome: &Outcome,
    live: bool,
) -> Vec<String> {
    let mut problems = Vec::new();
    if outcome.failed > 0 {
        problems.push(format!("{} connections failed", outcome.failed));
    }
    if snapshot.incomplete > 0 || snapshot.complete != table.clients {
        problems.push(format!(
            "{} of {} snapshots ended ({} did not; the server closed {} connections and counted {} clients dropped)",
            snapshot.complete,
            table.clients,
            snapshot.incomplete,
            outcome.closed_by_server,
            outcome.clients_dropped
        ));
    }
    // With live records, a row that changed while its page was read comes after the
    // snapshot instead; the final maps say whether anything is missing.
    if !live && table.rows != table.rows_expected {
        problems.push(format!(
            "{} rows received, not keys × clients = {} ({} snapshots short)",
            table.rows, table.rows_expected, snapshot.short
        ));
    }
    if snapshot.unordered > 0 {
        problems.push(format!(
            "{} rows repeated or out of key order",
            snapshot.unordered
        ));
    }
    if snapshot.unexpected > 0 {
        problems.push(format!("{} unexpected events", snapshot.unexpected));
    }
    if table.maps_equal != snapshot.complete {
        let with = |full: bool| -> u64 {
            snapshot
                .maps
                .iter()
                .filter(|map| (map.held == table.keys) == full)
                .map(|map| map.connections)
                .sum()
        };
        let fewest = snapshot.maps.iter().map(|map| map.held).min().unwrap_or(0);
        problems.push(format!(
            "{} of {} clients ended with a map unlike the table: {} with every key but an older row of some, {} missing keys (the fewest held: {fewest})",
            snapshot.complete.saturating_sub(table.maps_equal),
            snapshot.complete,
            with(true).saturating_sub(table.maps_equal),
            with(false),
        ));
    }
    problems
}

/// The envelope of record `seq` of driver `key` at `offset`, as fjord-consumer would
/// encode it, with `prev` the record it replaces; and its value's length. The value is a
/// driver's position like the demo's (about 220 bytes of JSON), led by the numbers the
/// workers read.
fn driver(
    key: u64,
    offset: u64,
    seq: u64,
    prev: Option<u64>,
    published_us: u64,
) -> (Envelope, usize) {
    let id = key_of(key);
    let prev = prev.map_or_else(String::new, |prev| format!(r#""prev":{prev},"#));
    // Spread over a city, moving with each record.
    let (lat, lon) = (
        59.85 + (key.wrapping_mul(7_919).wrapping_add(seq * 13) % 20_000) as f64 * 1e-5,
        10.65 + (key.wrapping_mul(6_271).wrapping_add(seq * 17) % 30_000) as f64 * 1e-5,
    );
    let heading = (key * 37 + seq * 11) % 360;
    let speed = (key * 13 + seq * 7) % 900;
    let (status, order) = if (key + seq).is_multiple_of(3) {
        ("idle", "null".to_owned())
    } else {
        (
            "en_route",
            format!("\"order-{:06}\"", (key * 31 + seq) % 1_000_000),
        )
    };
    let value = format!(
        r#"{{"seq":{seq},{prev}"ts":{published_us},"driver_id":"{id}","name":"Driver {key}","lat":{lat:.5},"lon":{lon:.5},"heading":{heading},"speed_kmh":{}.{},"status":"{status}","order_id":{order},"battery_pct":{}}}"#,
        speed / 10,
        speed % 10,
        (key + seq) % 100,
    );
    let json = format!(
        r#"{{"topic":"bench","partition":0,"offset":{offset},"key":"{id}","timestamp":{},"headers":{{}},"value":{value}}}"#,
        published_us / 1000
    );
    let envelope = Envelope {
        json: json.into_bytes(),
        filter_key: Some(id.into_bytes()),
        tombstone: false,
    };
    (envelope, value.len())
}

/// A row's bytes on the wire: `event: <endpoint>`, `data: <envelope>`, a blank line.
fn row_event_bytes(envelope: &Envelope) -> u64 {
    ("event: \ndata: \n\n".len() + ENDPOINT.len() + envelope.json.len()) as u64
}

/// Updates random keys at `rate` until `stop`, one record at a time; returns the last
/// record's number of every key.
async fn live_load(
    bus: Bus,
    endpoints: Vec<(EndpointName, Keeping)>,
    keys: u64,
    rate: f64,
    published: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<Vec<u64>> {
    let mut last: Vec<u64> = (0..keys).collect();
    let mut rng = fastrand::Rng::with_seed(keys);
    let started = Instant::now();
    let mut sent = 0_u64;
    while !stop.load(Relaxed) {
        let due = (started.elapsed().as_secs_f64() * rate) as u64;
        if sent >= due {
            tokio::time::sleep(Duration::from_millis(1)).await;
            continue;
        }
        let key = rng.u64(0..keys);
        let seq = keys + sent;
        let index = usize::try_from(key)?;
        let (envelope, _) = driver(key, seq, seq, Some(last[index]), now_us());
        bus.publish(Publication {
            topic: "bench",
            partition: 0,
            offset: i64::try_from(seq)?,
            endpoints: &endpoints,
            envelope: &envelope,
        })
        .await?;
        last[index] = seq;
        sent += 1;
        published.store(sent, Relaxed);
    }
    Ok(last)
}

/// The most seen while sampling.
#[derive(Debug, Default)]
struct Peaks {
    rss_kib: u64,
    replay_buffered: u64,
    redis_used: u64,
}

/// Samples the server's resident memory and replay buffers, and Redis's memory, until
/// `stop`.
async fn sample_peaks(
    port: u16,
    pid: u32,
    mut redis: ConnectionManager,
    stop: Arc<AtomicBool>,
) -> Peaks {
    let mut peaks = Peaks::default();
    while !stop.load(Relaxed) {
        peaks.rss_kib = peaks.rss_kib.max(rss_kib(pid).unwrap_or(0));
        peaks.replay_buffered = peaks
            .replay_buffered
            .max(counter_total(&[port], "fjord_replay_buffered_bytes").await);
        if let Ok(used) = info_number(&mut redis, "memory", "used_memory").await {
            peaks.redis_used = peaks.redis_used.max(used);
        }
        tokio::time::sleep(SAMPLE_EVERY).await;
    }
    peaks
}

/// A process's peak resident memory in KiB (`VmHWM` in `/proc/PID/status`).
fn hwm_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|value| value.split_whitespace().next())
        .and_then(|kib| kib.parse().ok())
}

/// `MEMORY USAGE key SAMPLES 0`: every element counted.
async fn memory_usage(redis: &mut ConnectionManager, key: &str) -> anyhow::Result<u64> {
    let bytes: Option<u64> = redis::cmd("MEMORY")
        .arg("USAGE")
        .arg(key)
        .arg("SAMPLES")
        .arg(0)
        .query_async(redis)
        .await?;
    Ok(bytes.unwrap_or(0))
}

/// A number of an `INFO section` field.
async fn info_number(
    redis: &mut ConnectionManager,
    section: &str,
    field: &str,
) -> anyhow::Result<u64> {
    let info: String = redis::cmd("INFO").arg(section).query_async(redis).await?;
    info_field(&info, field)?
        .parse()
        .with_context(|| format!("{field} in INFO is not a whole number"))
}

/// Redis's own CPU time so far, user plus system, in seconds.
async fn redis_cpu_secs(redis: &mut ConnectionManager) -> anyhow::Result<f64> {
    let info: String = redis::cmd("INFO").arg("cpu").query_async(redis).await?;
    let seconds = |name: &str| -> anyhow::Result<f64> {
        info_field(&info, name)?
            .parse()
            .with_context(|| format!("{name} in INFO is not a number"))
    };
    Ok(seconds("used_cpu_user")? + seconds("used_cpu_sys")?)
}

fn info_field<'a>(info: &'a str, name: &str) -> anyhow::Result<&'a str> {
    info.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
        .map(str::trim)
        .with_context(|| format!("{name} in INFO"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_drivers_record_reads_back_as_the_workers_read_it() {
        let (envelope, value_len) = driver(42, 7, 7, Some(3), 1_700_000_000_000_000);
        let json: serde_json::Value = serde_json::from_slice(&envelope.json).expect("JSON");
        assert_eq!(json["key"], "driver-000042");
        assert_eq!(json["value"]["seq"], 7);
        assert_eq!(json["value"]["prev"], 3);
        assert_eq!(json["value"]["ts"], 1_700_000_000_000_000_u64);
        assert_eq!(envelope.filter_key.as_deref(), Some(&b"driver-000042"[..]));
        assert!((150..=250).contains(&value_len), "{value_len}");
        // What a client gets: the row event, read by a table view.
        let mut view = super::super::snapshot::TableView::new(100);
        for line in [
            "event: fjord.snapshot_start",
            "data: {}",
            "",
            "event: bench",
        ] {
            view.line(line.as_bytes());
        }
        let mut data = b"data: ".to_vec();
        data.extend_from_slice(&envelope.json);
        view.line(&data);
        let mut report = SnapshotReport::default();
        report.add(&view);
        assert_eq!(report.unexpected, 0);
    }

    #[test]
    fn info_fields_are_found_by_name() {
        let info = "# Memory\r\nused_memory:1234\r\nused_memory_human:1.21K\r\n";
        assert_eq!(info_field(info, "used_memory").expect("found"), "1234");
        assert!(info_field(info, "used_memory_peak").is_err());
    }
}
