//! The shards and replica-lag scenarios (issue 13): what Redis Cluster adds to the bus.
//! Each starts local Redis Clusters of its own with `ci/redis-cluster.sh`, on free blocks of
//! ports, in directories under `$FJORD_CI_STATE/bench`, and stops and deletes them after.
//! `shards` puts the same load on one primary and on three: publishers write batches with
//! the crate's own bus (`Bus::publish_batch`, the consumer's path) to endpoints spread evenly
//! over the primaries, as fast as Redis takes them; then the same again while readers
//! (`Bus::reader`, as servers read) each read every endpoint. It reports records/s, entries/s
//! served to readers, and every primary's CPU from `INFO cpu` beside the load generator's.
//! `replica-lag` publishes at a fixed rate to one primary with one replica and reads the
//! stream from the primary and from the replica side by side: the difference between their
//! delivery latencies is what reading from replicas costs.

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use redis::Value;

use super::histogram::Histogram;
use super::outcome::{Latency, Outcome, ReplicaLag, ShardRun};
use super::scenario::{Env, Scenario, Spread, free_port, manifest, publish_to_bus, unique};
use super::{cpu_ticks, event_envelope, now_us, ticks_per_second};
use fjord_bus::envelope::Envelope;
use fjord_bus::{Batch, Bus, BusReader, EntryKind};
use fjord_config::{EndpointName, Keeping, Manifest, RedisConfig, Retention};

/// Endpoints the shards scenario publishes to, spread evenly over the primaries.
const ENDPOINTS: usize = 12;
/// Publishers, each one partition's batches to one endpoint, as consumer members would.
const PUBLISHERS: usize = 12;
/// Records per batch: what a consumer member with a backlog sends in one round trip.
const BATCH: usize = 256;
/// Readers in the read phase, each reading every endpoint, as server processes do.
const READERS: usize = 4;
/// Shard counts compared.
const SHARDS: [usize; 2] = [1, 3];
/// What each stream keeps: bounded, so a run's memory (and AOF) stays small, and trimming
/// costs what it costs in production.
const RETENTION: Retention = Retention {
    max_records: 10_000,
    max_age_secs: 3_600,
};

/// A local Redis Cluster started by `ci/redis-cluster.sh`, stopped and deleted on drop.
struct Cluster {
    script: PathBuf,
    dir: PathBuf,
    /// `redis://127.0.0.1:PORT` of every node.
    urls: Vec<String>,
}

impl Cluster {
    /// Starts `primaries` primaries with `replicas` replicas each on a free block of ports.
    async fn up(primaries: usize, replicas: usize) -> anyhow::Result<Self> {
        let script = script()?;
        let state = std::env::var_os("FJORD_CI_STATE")
            .map_or_else(|| PathBuf::from("/tmp/fjord-ci"), PathBuf::from);
        let dir = state
            .join("bench")
            .join(unique(&format!("cluster-{primaries}x{replicas}")));
        let nodes = primaries * (1 + replicas);
        let mut cluster = Self {
            script,
            dir,
            urls: Vec::new(),
        };
        let mut last_error = None;
        // Another process may take a port between the check and the start: try elsewhere.
        for attempt in 0..3 {
            let base = free_block(2 * nodes, attempt)?;
            let output = cluster
                .command()
                .arg("up")
                .arg(&cluster.dir)
                .args([
                    base.to_string(),
                    primaries.to_string(),
                    replicas.to_string(),
                ])
                .output()
                .await
                .context("running ci/redis-cluster.sh up")?;
            if output.status.success() {
                cluster.urls = (0..nodes)
                    .map(|node| format!("redis://127.0.0.1:{}", usize::from(base) + node))
                    .collect();
                return Ok(cluster);
            }
            let stderr = String::from_utf8_lossy(&output.stderr);
            let tail: Vec<&str> = stderr.lines().rev().take(5).collect();
            last_error = Some(format!(
                "ci/redis-cluster.sh up {} {base} {primaries} {replicas}: {}",
                cluster.dir.display(),
                tail.into_iter().rev().collect::<Vec<_>>().join(" / ")
            ));
        }
        anyhow::bail!(last_error.unwrap_or_default())
    }

    fn command(&self) -> tokio::process::Command {
        let mut command = tokio::process::Command::new("bash");
        command
            .arg(&self.script)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        command
    }

    /// The bus's settings for this cluster, reading from `read_from`.
    fn redis_config(&self, prefix: &str, read_from: &str) -> anyhow::Result<RedisConfig> {
        let (first, rest) = self.urls.split_first().context("a cluster without nodes")?;
        Ok(serde_json::from_value(serde_json::json!({
            "url": first,
            "key_prefix": prefix,
            "cluster": {"seed_urls": rest, "read_from": read_from},
        }))?)
    }

    /// Each slot range's primary, as (first slot, last slot, port).
    async fn slot_owners(&self) -> anyhow::Result<Vec<(i64, i64, i64)>> {
        let mut node = node(&self.urls[0]).await?;
        let slots: Value = redis::cmd("CLUSTER")
            .arg("SLOTS")
            .query_async(&mut node)
            .await?;
        let Value::Array(ranges) = slots else {
            anyhow::bail!("CLUSTER SLOTS answered {slots:?}")
        };
        ranges
            .into_iter()
            .map(|range| {
                let Value::Array(fields) = range else {
                    anyhow::bail!("a CLUSTER SLOTS range is {range:?}")
                };
                match fields.as_slice() {
                    [
                        Value::Int(first),
                        Value::Int(last),
                        Value::Array(primary),
                        ..,
                    ] => match primary.get(1) {
                        Some(Value::Int(port)) => Ok((*first, *last, *port)),
                        other => anyhow::bail!("a CLUSTER SLOTS primary's port is {other:?}"),
                    },
                    _ => anyhow::bail!("a CLUSTER SLOTS range is {fields:?}"),
                }
            })
            .collect()
    }
}

impl Cluster {
    /// Waits until the cluster lists a replica of the slots in `CLUSTER SLOTS` (where the bus
    /// looks for one), which Redis does only once the replica's replication offset is not
    /// zero: something is written first. Returns the replica's URL.
    async fn replica_listed(&self, prefix: &str) -> anyhow::Result<String> {
        let mut replica = None;
        for url in &self.urls {
            let mut connection = node(url).await?;
            let role: Vec<Value> = redis::cmd("ROLE").query_async(&mut connection).await?;
            match role.first() {
                Some(Value::BulkString(role)) if role.as_slice() == b"slave" => {
                    replica = Some(url.clone());
                }
                _ => {
                    redis::cmd("SET")
                        .arg(format!("{{{prefix}}}:replicated"))
                        .arg(1)
                        .query_async::<()>(&mut connection)
                        .await?;
                }
            }
        }
        let replica = replica.context("the cluster has no replica")?;
        let mut connection = node(&self.urls[0]).await?;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let slots: Value = redis::cmd("CLUSTER")
                .arg("SLOTS")
                .query_async(&mut connection)
                .await?;
            let listed = matches!(&slots, Value::Array(ranges) if ranges
                .iter()
                .any(|range| matches!(range, Value::Array(fields) if fields.len() > 3)));
            if listed {
                return Ok(replica);
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "CLUSTER SLOTS lists no replica within 20 s"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Whether a node serves a blocking stream read (`XREAD`) to some client now.
async fn serves_reads(url: &str) -> anyhow::Result<bool> {
    let mut connection = node(url).await?;
    let clients: String = redis::cmd("CLIENT")
        .arg("LIST")
        .query_async(&mut connection)
        .await?;
    Ok(clients.contains("cmd=xread"))
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // Synchronous, so that a failed run stops its nodes too.
        let stopped = std::process::Command::new("bash")
            .arg(&self.script)
            .arg("down")
            .arg(&self.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        match stopped {
            Ok(status) if status.success() => {
                if let Err(error) = std::fs::remove_dir_all(&self.dir) {
                    tracing::warn!(dir = %self.dir.display(), %error, "could not delete a bench cluster");
                }
            }
            _ => tracing::warn!(dir = %self.dir.display(), "could not stop a bench cluster"),
        }
    }
}

/// `ci/redis-cluster.sh`, from the working directory or above this binary (`target/*/`).
fn script() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("locating this binary")?;
    let cwd = std::env::current_dir().context("the working directory")?;
    cwd.ancestors()
        .chain(exe.ancestors())
        .map(|dir| dir.join("ci/redis-cluster.sh"))
        .find(|path| path.is_file())
        .context("ci/redis-cluster.sh not found (run fjord bench from the repository)")
}

/// The first port of `count` consecutive free ports below the ephemeral range.
fn free_block(count: usize, attempt: u64) -> anyhow::Result<u16> {
    let span = 30_000 - 21_000 - count as u64;
    let mut base = 21_000 + (now_us() / 7 + attempt * 997) % span;
    for _ in 0..200 {
        let free = (base..base + count as u64).all(|port| {
            u16::try_from(port)
                .is_ok_and(|port| std::net::TcpListener::bind(("127.0.0.1", port)).is_ok())
        });
        if free {
            return Ok(u16::try_from(base)?);
        }
        base = 21_000 + (base - 21_000 + count as u64) % span;
    }
    anyhow::bail!("no {count} consecutive free ports in 21000-30000")
}

/// A plain connection to one node, for `INFO` and `CLUSTER`.
async fn node(url: &str) -> anyhow::Result<redis::aio::MultiplexedConnection> {
    redis::Client::open(url)?
        .get_multiplexed_async_connection()
        .await
        .with_context(|| format!("connecting to {url}"))
}

/// A node's own CPU time so far (user plus system), in seconds.
async fn node_cpu_secs(connection: &mut redis::aio::MultiplexedConnection) -> anyhow::Result<f64> {
    let info: String = redis::cmd("INFO")
        .arg("cpu")
        .query_async(connection)
        .await?;
    let seconds = |name: &str| -> anyhow::Result<f64> {
        info.lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
            .with_context(|| format!("{name} in INFO cpu"))?
            .trim()
            .parse()
            .with_context(|| format!("{name} in INFO cpu is not a number"))
    };
    Ok(seconds("used_cpu_user")? + seconds("used_cpu_sys")?)
}

/// CPU meters: the primaries' and this process's.
struct Meters {
    primaries: Vec<redis::aio::MultiplexedConnection>,
}

/// One reading of the meters.
struct Reading {
    at: Instant,
    primaries: Vec<f64>,
    me: u64,
}

impl Meters {
    async fn read(&mut self) -> anyhow::Result<Reading> {
        let mut primaries = Vec::new();
        for connection in &mut self.primaries {
            primaries.push(node_cpu_secs(connection).await?);
        }
        Ok(Reading {
            at: Instant::now(),
            primaries,
            me: cpu_ticks(std::process::id()).unwrap_or(0),
        })
    }
}

impl Reading {
    /// Cores used since `before`: each primary's, and this process's.
    fn cores_since(&self, before: &Self) -> (Vec<f64>, f64) {
        let secs = self.at.duration_since(before.at).as_secs_f64().max(1e-9);
        let primaries = self
            .primaries
            .iter()
            .zip(&before.primaries)
            .map(|(after, before)| (after - before).max(0.0) / secs)
            .collect();
        let me = self.me.saturating_sub(before.me) as f64 / ticks_per_second() / secs;
        (primaries, me)
    }
}

/// Runs the shards scenario: one primary, then three, the same load on each.
pub(crate) async fn run(scenario: &Scenario) -> anyhow::Result<Outcome> {
    let mut outcome = Outcome {
        scenario: scenario.name.clone(),
        load: Some(scenario.clone()),
        ..Outcome::default()
    };
    // Started side by side: creating a cluster is mostly waiting for its nodes to agree.
    let clusters =
        futures_util::future::join_all(SHARDS.map(|primaries| Cluster::up(primaries, 0))).await;
    for (primaries, cluster) in SHARDS.into_iter().zip(clusters) {
        let run = match cluster {
            Ok(cluster) => run_shards(scenario, &cluster, primaries).await,
            Err(error) => Err(error),
        };
        match run {
            Ok(run) => {
                tracing::info!(
                    primaries,
                    records_per_sec = run.records_per_sec as u64,
                    entries_per_sec = run.entries_per_sec as u64,
                    redis_cores = ?run.redis_cores,
                    loadgen_cores = run.loadgen_cores,
                    "sharded"
                );
                outcome.records += (run.records_per_sec * run.secs) as u64;
                outcome.window_secs += run.secs;
                outcome.shards.push(run);
            }
            Err(error) => outcome
                .errors
                .push(format!("{primaries} primaries: {error:#}")),
        }
    }
    Ok(outcome)
}

/// Both phases on one cluster.
async fn run_shards(
    scenario: &Scenario,
    cluster: &Cluster,
    primaries: usize,
) -> anyhow::Result<ShardRun> {
    let prefix = unique("bench-shards");
    let bus = fjord_bus::connect_redis(&cluster.redis_config(&prefix, "primary")?).await?;
    let owners = cluster.slot_owners().await?;
    let mut primary_ports: Vec<i64> = owners.iter().map(|&(_, _, port)| port).collect();
    primary_ports.sort_unstable();
    primary_ports.dedup();
    anyhow::ensure!(
        primary_ports.len() == primaries,
        "the cluster has {} primaries, not {primaries}",
        primary_ports.len()
    );
    let (endpoints, endpoints_per_primary) =
        spread_endpoints(cluster, &prefix, &owners, &primary_ports).await?;
    let mut meters = Meters {
        primaries: Vec::new(),
    };
    for port in &primary_ports {
        meters
            .primaries
            .push(node(&format!("redis://127.0.0.1:{port}")).await?);
    }

    let published = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let publishers: Vec<_> = (0..PUBLISHERS)
        .map(|partition| {
            tokio::spawn(publish_batches(
                bus.clone(),
                endpoints[partition % endpoints.len()].clone(),
                partition,
                Arc::clone(&published),
                Arc::clone(&stop),
            ))
        })
        .collect();
    let warmup = Duration::from_secs(scenario.warmup_secs);
    let window = Duration::from_secs(scenario.measure_secs.max(1));

    tokio::time::sleep(warmup).await;
    let (count, before) = (published.load(Relaxed), meters.read().await?);
    tokio::time::sleep(window).await;
    let (counted, after) = (published.load(Relaxed), meters.read().await?);
    let secs = after.at.duration_since(before.at).as_secs_f64();
    let (redis_cores, loadgen_cores) = after.cores_since(&before);
    let records_per_sec = (counted - count) as f64 / secs;

    let read = Arc::new(AtomicU64::new(0));
    let mut readers = Vec::new();
    for _ in 0..READERS {
        let reader = bus.reader(endpoints.clone()).await?;
        readers.push(tokio::spawn(count_entries(
            reader,
            Arc::clone(&read),
            Arc::clone(&stop),
        )));
    }
    tokio::time::sleep(warmup).await;
    let (count, entries, before) = (
        published.load(Relaxed),
        read.load(Relaxed),
        meters.read().await?,
    );
    tokio::time::sleep(window).await;
    let (counted, entries_after, after) = (
        published.load(Relaxed),
        read.load(Relaxed),
        meters.read().await?,
    );
    stop.store(true, Relaxed);
    let read_secs = after.at.duration_since(before.at).as_secs_f64();
    let (read_phase_redis_cores, read_phase_loadgen_cores) = after.cores_since(&before);
    for task in publishers.into_iter().chain(readers) {
        task.await.context("a bench task panicked")??;
    }
    forget(cluster, &primary_ports, &prefix).await;
    Ok(ShardRun {
        primaries,
        endpoints_per_primary,
        publishers: PUBLISHERS,
        batch: BATCH,
        secs,
        records_per_sec,
        redis_cores,
        loadgen_cores,
        readers: READERS,
        read_phase_records_per_sec: (counted - count) as f64 / read_secs,
        entries_per_sec: (entries_after - entries) as f64 / read_secs,
        read_phase_redis_cores,
        read_phase_loadgen_cores,
    })
}

/// `ENDPOINTS` endpoint names whose hash tags put the same number on every primary, and how
/// many each primary got.
async fn spread_endpoints(
    cluster: &Cluster,
    prefix: &str,
    owners: &[(i64, i64, i64)],
    primary_ports: &[i64],
) -> anyhow::Result<(Vec<EndpointName>, Vec<usize>)> {
    let mut node = node(&cluster.urls[0]).await?;
    let per_primary = ENDPOINTS.div_ceil(primary_ports.len());
    let mut counts = vec![0; primary_ports.len()];
    let mut endpoints = Vec::new();
    for candidate in 0..ENDPOINTS * 100 {
        if endpoints.len() == ENDPOINTS {
            break;
        }
        let name = EndpointName::try_from(format!("shard-{candidate}"))
            .map_err(|error| anyhow::anyhow!(error))?;
        let key = fjord_bus::redis::stream_key(prefix, &name);
        let slot: i64 = redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(&key)
            .query_async(&mut node)
            .await?;
        let port = owners
            .iter()
            .find(|&&(first, last, _)| (first..=last).contains(&slot))
            .map(|&(_, _, port)| port)
            .with_context(|| format!("no primary serves slot {slot}"))?;
        let index = primary_ports
            .iter()
            .position(|&primary| primary == port)
            .context("a slot's primary is not among the primaries")?;
        if counts[index] < per_primary {
            counts[index] += 1;
            endpoints.push(name);
        }
    }
    anyhow::ensure!(
        endpoints.len() == ENDPOINTS,
        "could not spread {ENDPOINTS} endpoints over the primaries"
    );
    Ok((endpoints, counts))
}

/// One partition's batches of `BATCH` records to `endpoint`, back to back, until `stop`.
async fn publish_batches(
    bus: Bus,
    endpoint: EndpointName,
    partition: usize,
    published: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<()> {
    let endpoints = [(
        endpoint,
        Keeping {
            retention: RETENTION,
            table: None,
        },
    )];
    let partition = i32::try_from(partition)?;
    let mut next = 0_u64;
    while !stop.load(Relaxed) {
        let json = event_envelope(next, None, None, next, now_us());
        let records: Vec<(i64, Envelope)> = (next..next + BATCH as u64)
            .map(|offset| {
                let envelope = Envelope {
                    json: json.clone(),
                    filter_key: None,
                    tombstone: false,
                };
                (i64::try_from(offset).unwrap_or(i64::MAX), envelope)
            })
            .collect();
        let appended = bus
            .publish_batch(Batch {
                topic: "bench",
                partition,
                endpoints: &endpoints,
                records: &records,
            })
            .await?;
        next += BATCH as u64;
        published.fetch_add(appended as u64, Relaxed);
    }
    Ok(())
}

/// Counts the entries a reader gets until `stop`.
async fn count_entries(
    mut reader: BusReader,
    read: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<()> {
    while !stop.load(Relaxed) {
        let batch = reader.next_batch().await?;
        read.fetch_add(batch.len() as u64, Relaxed);
    }
    Ok(())
}

/// Deletes a run's keys from every primary: the clusters go, but not before the next run.
async fn forget(cluster: &Cluster, primary_ports: &[i64], prefix: &str) {
    for port in primary_ports {
        let deleted = async {
            let mut node = node(&format!("redis://127.0.0.1:{port}")).await?;
            let keys: Vec<String> = redis::cmd("KEYS")
                .arg(format!("*{prefix}*"))
                .query_async(&mut node)
                .await?;
            for key in keys {
                redis::cmd("UNLINK")
                    .arg(key)
                    .query_async::<()>(&mut node)
                    .await?;
            }
            Ok::<_, anyhow::Error>(())
        };
        if let Err(error) = deleted.await {
            tracing::warn!(dir = %cluster.dir.display(), port, error = %format!("{error:#}"), "could not delete a run's keys");
        }
    }
}

/// Runs the replica-lag scenario: one primary, one replica, one endpoint read from both.
pub(crate) async fn replica_lag(env: &Env, scenario: &Scenario) -> anyhow::Result<Outcome> {
    let cluster = Cluster::up(1, 1).await?;
    let prefix = unique("bench-lag");
    let replica_url = cluster.replica_listed(&prefix).await?;
    let mut text: serde_json::Value = serde_json::from_str(&manifest(
        env,
        scenario,
        &cluster.urls[0],
        free_port()?,
        &prefix,
        "bench",
    ))?;
    text["redis"]["cluster"] = serde_json::json!({"seed_urls": &cluster.urls[1..]});
    let manifest = Manifest::parse(&text.to_string())?;
    let endpoints: Vec<EndpointName> = manifest.endpoints.keys().cloned().collect();
    let mut readers = Vec::new();
    let measuring = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    for read_from in ["primary", "replica"] {
        let bus = fjord_bus::connect_redis(&cluster.redis_config(&prefix, read_from)?).await?;
        let reader = bus.reader(endpoints.clone()).await?;
        readers.push(tokio::spawn(time_entries(
            reader,
            Arc::clone(&measuring),
            Arc::clone(&stop),
        )));
    }
    let published = Arc::new(AtomicU64::new(0));
    let publisher = tokio::spawn(publish_to_bus(
        fjord_bus::connect_redis(&manifest.redis).await?,
        manifest,
        scenario.rate,
        Spread::All,
        Arc::clone(&published),
        Arc::clone(&stop),
    ));
    tokio::time::sleep(Duration::from_secs(scenario.warmup_secs)).await;
    // The bus falls back to the primary when it finds no replica: that would measure nothing.
    let on_replica = serves_reads(&replica_url).await?;
    measuring.store(true, Relaxed);
    let (count, started) = (published.load(Relaxed), Instant::now());
    tokio::time::sleep(Duration::from_secs(scenario.measure_secs.max(1))).await;
    measuring.store(false, Relaxed);
    let (counted, secs) = (published.load(Relaxed), started.elapsed().as_secs_f64());
    stop.store(true, Relaxed);
    publisher.await.context("the publisher panicked")??;
    let mut latencies = Vec::new();
    for reader in readers {
        latencies.push(reader.await.context("a reader panicked")??);
    }
    let mut outcome = Outcome {
        scenario: scenario.name.clone(),
        load: Some(scenario.clone()),
        records: counted - count,
        window_secs: secs,
        ..Outcome::default()
    };
    let mut latencies = latencies.into_iter();
    let (Some(primary), Some(replica)) = (latencies.next(), latencies.next()) else {
        anyhow::bail!("two readers, two latencies")
    };
    if !on_replica {
        outcome
            .errors
            .push("the replica served no read: the replica reader read from the primary".into());
    }
    for (name, latency) in [("primary", &primary), ("replica", &replica)] {
        if latency.entries == 0 {
            outcome
                .errors
                .push(format!("the {name} reader got nothing in the window"));
        }
    }
    outcome.replica_lag = Some(ReplicaLag {
        rate: scenario.rate,
        records: outcome.records,
        primary,
        replica,
    });
    Ok(outcome)
}

/// Times every record a reader gets while `measuring`, from the publish time it carries.
async fn time_entries(
    mut reader: BusReader,
    measuring: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<Latency> {
    let mut histogram = Histogram::default();
    let mut entries = 0;
    while !stop.load(Relaxed) {
        let batch = reader.next_batch().await?;
        let now = now_us();
        if !measuring.load(Relaxed) {
            continue;
        }
        for (_, entry) in batch {
            let EntryKind::Record { envelope, .. } = entry.kind else {
                anyhow::bail!("an entry that is not a record: {:?}", entry.kind)
            };
            let json: serde_json::Value = serde_json::from_slice(envelope.as_bytes())?;
            let published = json["value"]["ts"]
                .as_u64()
                .context("a record without its publish time")?;
            histogram.record(now.saturating_sub(published));
            entries += 1;
        }
    }
    Ok(Latency {
        entries,
        p50_ms: histogram.quantile_ms(0.5),
        p99_ms: histogram.quantile_ms(0.99),
        max_ms: histogram.max_ms(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_free_block_is_free_and_below_the_ephemeral_range() {
        let base = free_block(8, 0).expect("a free block");
        assert!((21_000..30_000 - 8).contains(&base), "{base}");
        for port in base..base + 8 {
            assert!(
                std::net::TcpListener::bind(("127.0.0.1", port)).is_ok(),
                "{port}"
            );
        }
    }

    #[test]
    fn the_script_is_found_from_the_repository() {
        assert!(
            script()
                .expect("the script")
                .ends_with("ci/redis-cluster.sh")
        );
    }
}
