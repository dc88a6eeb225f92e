//! The scenarios that stream to connections (the floor, the server, end to end): starts the
//! servers (or the floor, or a consumer and a server for end to end), the workers and the
//! publisher, opens a measurement window, and gathers what everyone measured.

use std::net::{Ipv4Addr, SocketAddr};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};

use super::histogram::Histogram;
use super::outcome::{Outcome, Stages};
use super::scenario::{
    ENDPOINT, Env, Kind, Scenario, Spread, create_topic, free_port, manifest, on_cpu,
    publish_to_bus, server_command, unique,
};
use super::worker::{Target, WorkerReport, WorkerSpec};
use super::{cpu_ticks, now_us, rss_kib, ticks_per_second};
use fjord_bus::Bus;
use fjord_bus::memory::MemoryBus;
use fjord_config::Manifest;

/// The servers' counters read around the window.
const DROPPED: &str = "fjord_clients_dropped_total";
const EVALUATIONS: &str = "fjord_filter_evaluations_total";
const SHED: &str = "fjord_clients_shed_total";

/// Most connections one worker process opens (this machine allows 20,000 open files).
const MAX_PER_WORKER: usize = 15_000;
/// Source addresses 127.0.0.2 and up: about 28,000 ephemeral ports each, so room for a
/// million connections.
const SOURCES: u8 = 40;

/// A child process driven over stdin, reporting JSON lines on stdout.
pub(super) struct Driven {
    child: Child,
    stdin: ChildStdin,
    stdout: Lines<BufReader<ChildStdout>>,
}

impl Driven {
    pub(super) fn spawn(mut command: Command) -> anyhow::Result<Self> {
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

    pub(super) async fn say(&mut self, line: &str) {
        let _ = self.stdin.write_all(format!("{line}\n").as_bytes()).await;
        let _ = self.stdin.flush().await;
    }

    /// The next JSON line whose `type` is `kind`.
    pub(super) async fn expect(
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

/// The server's code in this process, on the in-memory bus.
struct InProcess {
    bus: Bus,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<(), fjord_server::ServerError>>,
}

impl InProcess {
    async fn start(manifest: Manifest) -> anyhow::Result<Self> {
        let bus = Bus::Memory(MemoryBus::new());
        let bound = fjord_server::bind(&manifest).await?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = {
            let bus = bus.clone();
            tokio::spawn(async move {
                let stopped = async {
                    let _ = stopped.await;
                };
                fjord_server::serve(&manifest, &bus, bound, &[], stopped).await
            })
        };
        Ok(Self { bus, stop, task })
    }

    /// Stops it and waits until it drained.
    async fn stop(self) {
        let _ = self.stop.send(());
        if let Ok(Err(error)) = self.task.await {
            tracing::warn!(%error, "the server in process");
        }
    }
}

pub(super) async fn wait_ready(port: u16) -> anyhow::Result<()> {
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

/// The sum over the servers on `ports` of the counter (or gauge) `name` on their `/metrics`.
pub(super) async fn counter_total(ports: &[u16], name: &str) -> u64 {
    scrape(ports)
        .await
        .iter()
        .filter_map(|text| {
            text.lines()
                .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
                .and_then(|value| value.trim().parse::<f64>().ok())
        })
        .map(|value| value as u64)
        .sum()
}

/// The `/metrics` text of each server that answers, asked of all at once: a server busy
/// with a large run takes seconds to answer (15 s each at a million connections on 55
/// servers), so one after another would stretch the window by minutes and time some out.
async fn scrape(ports: &[u16]) -> Vec<String> {
    let Ok(client) = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
    else {
        return Vec::new();
    };
    let asked = ports.iter().map(|port| {
        let request = client.get(format!("http://127.0.0.1:{port}/metrics"));
        async move { request.send().await.ok()?.text().await.ok() }
    });
    futures_util::future::join_all(asked)
        .await
        .into_iter()
        .flatten()
        .collect()
}

/// The servers' `fjord_delivery_latency_seconds{since="bus"}` summed over them: each
/// bucket's bound in milliseconds with its cumulative count, and the sum in seconds.
async fn bus_latency(ports: &[u16]) -> (Vec<(f64, u64)>, f64) {
    let mut buckets: Vec<(f64, u64)> = Vec::new();
    let mut sum = 0.0;
    for text in scrape(ports).await {
        let mut index = 0;
        for line in text.lines() {
            let Some(rest) = line.strip_prefix("fjord_delivery_latency_seconds_") else {
                continue;
            };
            if !rest.contains("since=\"bus\"") {
                continue;
            }
            let value = rest.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok());
            if rest.starts_with("sum") {
                sum += value.unwrap_or(0.0);
            } else if rest.starts_with("bucket") {
                let le = rest
                    .split("le=\"")
                    .nth(1)
                    .and_then(|rest| rest.split('"').next())
                    .map_or(f64::INFINITY, |le| {
                        le.parse::<f64>().map_or(f64::INFINITY, |s| s * 1000.0)
                    });
                if buckets.len() <= index {
                    buckets.push((le, 0));
                }
                buckets[index].1 += value.unwrap_or(0.0) as u64;
                index += 1;
            }
        }
    }
    (buckets, sum)
}

/// The `quantile` of the deliveries between two readings of [`bus_latency`], interpolated
/// within its bucket; `None` without deliveries.
fn bucket_quantile(before: &[(f64, u64)], after: &[(f64, u64)], quantile: f64) -> Option<f64> {
    let counts: Vec<(f64, u64)> = after
        .iter()
        .enumerate()
        .map(|(i, &(le, count))| (le, count.saturating_sub(before.get(i).map_or(0, |b| b.1))))
        .collect();
    let total = counts.last()?.1;
    if total == 0 {
        return None;
    }
    let rank = quantile * total as f64;
    let mut lower = (0.0, 0);
    for &(le, cumulative) in &counts {
        if cumulative as f64 >= rank {
            if le.is_infinite() {
                return Some(lower.0);
            }
            let within = (rank - lower.1 as f64) / (cumulative - lower.1).max(1) as f64;
            return Some(lower.0 + (le - lower.0) * within);
        }
        lower = (le, cumulative);
    }
    None
}

/// Splits connections `0..connections` into worker specs, each with its share of servers.
pub(super) fn worker_specs(
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
                        filters: (scenario.filters > 0).then_some(scenario.filters as u64),
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
                table: None,
                compressed: scenario.compressed,
            }
        })
        .collect()
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

/// Warns when the kernel's bound on all TCP buffers (`net.ipv4.tcp_mem`, in pages) is below
/// what `connections` take with both ends on this machine, about a page a socket while the
/// load generator has yet to read what came: past it the kernel holds back writes and
/// drops what arrives, and the load stalls (seen at 560,000 connections with Linux's
/// default for 24 GiB, 2.2 GiB).
fn warn_if_tcp_memory_is_short(connections: usize) {
    let Some(most_pages) = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_mem")
        .ok()
        .and_then(|text| text.split_whitespace().nth(2)?.parse::<u64>().ok())
    else {
        return;
    };
    let needed_pages = 2 * connections as u64;
    if most_pages < needed_pages {
        tracing::warn!(
            connections,
            tcp_mem_max_pages = most_pages,
            needed_pages,
            "net.ipv4.tcp_mem allows fewer pages than these connections take on one machine; \
             raise it (sysctl -w net.ipv4.tcp_mem=\"{} {} {}\") or the load may stall",
            needed_pages * 3 / 2,
            needed_pages * 2,
            needed_pages * 5 / 2,
        );
    }
}

/// Runs one scenario that streams to connections: the floor, the server, end to end.
pub(super) async fn run_connections(env: &Env, scenario: &Scenario) -> anyhow::Result<Outcome> {
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
    warn_if_tcp_memory_is_short(scenario.connections);
    let mut ports = Vec::new();
    let mut servers: Vec<Child> = Vec::new();
    let mut floor: Option<Driven> = None;
    let mut consumer: Option<Child> = None;
    let mut in_process: Option<InProcess> = None;
    let mut manifest_text = String::new();
    match scenario.kind {
        Kind::Ingest | Kind::Shards | Kind::ReplicaLag | Kind::Table => {
            anyhow::bail!(
                "{:?} opens no connections: bench::run_scenario runs it",
                scenario.kind
            )
        }
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
        Kind::InProcess => {
            let port = free_port()?;
            manifest_text = manifest(env, scenario, &env.redis, port, &prefix, &topic);
            in_process = Some(InProcess::start(Manifest::parse(&manifest_text)?).await?);
            wait_ready(port).await?;
            ports.push(port);
        }
    }
    let measured_pids: Vec<u32> = match &floor {
        Some(floor) => vec![floor.pid()],
        None if in_process.is_some() => vec![std::process::id()],
        None => servers
            .iter()
            .chain(consumer.iter())
            .filter_map(Child::id)
            .collect(),
    };
    let rss_pids: Vec<u32> = match &floor {
        Some(floor) => vec![floor.pid()],
        None if in_process.is_some() => vec![std::process::id()],
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
    let dropped_before = counter_total(&server_ports, DROPPED).await;
    let shed_before = counter_total(&server_ports, SHED).await;

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
        Kind::Floor | Kind::Ingest | Kind::Shards | Kind::ReplicaLag | Kind::Table => {
            if let Some(floor) = &mut floor {
                floor.say(&format!("go {}", scenario.rate)).await;
            }
            None
        }
        Kind::Server | Kind::InProcess => {
            let manifest = Manifest::parse(&manifest_text)?;
            let bus = match &in_process {
                Some(in_process) => in_process.bus.clone(),
                None => fjord_bus::connect_redis(&manifest.redis).await?,
            };
            Some(tokio::spawn(publish_to_bus(
                bus,
                manifest,
                scenario.rate,
                Spread::of(scenario),
                Arc::clone(&published),
                Arc::clone(&stop),
            )))
        }
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
    let evaluations_before = counter_total(&server_ports, EVALUATIONS).await;
    let (latency_before, latency_sum_before) = bus_latency(&server_ports).await;
    tokio::time::sleep(Duration::from_secs(scenario.measure_secs)).await;
    let (latency_after, latency_sum_after) = bus_latency(&server_ports).await;
    let cpu_after: u64 = measured_pids.iter().filter_map(|&pid| cpu_ticks(pid)).sum();
    let published_after = published.load(Relaxed);
    let evaluations = counter_total(&server_ports, EVALUATIONS)
        .await
        .saturating_sub(evaluations_before);
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
    outcome.clients_dropped = counter_total(&server_ports, DROPPED)
        .await
        .saturating_sub(dropped_before);
    outcome.clients_shed = counter_total(&server_ports, SHED)
        .await
        .saturating_sub(shed_before);

    let mut slices: Vec<Histogram> = Vec::new();
    let (mut to_bus, mut from_bus) = (Histogram::default(), Histogram::default());
    for worker in &mut workers {
        // Starved workers of a large run take a while to answer.
        let report = worker.expect("report", Duration::from_secs(120)).await?;
        let report: WorkerReport = serde_json::from_value(report["report"].clone())?;
        outcome.deliveries += report.events;
        outcome.window_bytes += report.window_bytes;
        outcome.gaps += report.gaps;
        outcome.out_of_order += report.out_of_order;
        outcome.closed_by_server += report.closed_by_server;
        outcome.slow_connections += report.slow;
        outcome.loadgen_cpu_secs += report.cpu_secs;
        to_bus.merge(&report.to_bus);
        from_bus.merge(&report.from_bus);
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
    if let Some(in_process) = in_process {
        in_process.stop().await;
    }

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
    if to_bus.count > 0 {
        let written = latency_after
            .last()
            .map_or(0, |last| last.1)
            .saturating_sub(latency_before.last().map_or(0, |last| last.1));
        outcome.stages = Some(Stages {
            to_bus_p50_ms: to_bus.quantile_ms(0.5),
            to_bus_p99_ms: to_bus.quantile_ms(0.99),
            from_bus_p50_ms: from_bus.quantile_ms(0.5),
            from_bus_p99_ms: from_bus.quantile_ms(0.99),
            to_socket_mean_ms: (written > 0)
                .then(|| (latency_sum_after - latency_sum_before) * 1000.0 / written as f64),
            to_socket_p50_ms: bucket_quantile(&latency_before, &latency_after, 0.5),
            to_socket_p99_ms: bucket_quantile(&latency_before, &latency_after, 0.99),
        });
    }
    outcome.server_cpu_secs = cpu_after.saturating_sub(cpu_before) as f64 / ticks_per_second();
    if outcome.deliveries > 0 {
        outcome.cpu_us_per_delivery = outcome.server_cpu_secs * 1e6 / outcome.deliveries as f64;
        outcome.bytes_per_delivery = outcome.window_bytes as f64 / outcome.deliveries as f64;
    }
    if outcome.records > 0 {
        outcome.cpu_us_per_record = outcome.server_cpu_secs * 1e6 / outcome.records as f64;
        outcome.filter_evaluations_per_record = evaluations as f64 / outcome.records as f64;
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
