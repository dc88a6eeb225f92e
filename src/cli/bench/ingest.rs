//! The ingest scenario: how many records per second one `fjord-consumer` member carries from
//! one Kafka partition into the Redis bus, with Redis a given round trip away. A fresh
//! one-partition topic is filled before any consumer starts; then, per round trip, one
//! consumer in a fresh group and under a fresh key prefix works through the whole backlog,
//! talking to Redis directly (0 ms) or through a [`DelayProxy`]. The rate is taken from the
//! stream itself — the ids of its first and last entries are Redis's clock when each was
//! appended — while a direct connection polls the stream's length to see the end, and the
//! consumer's and Redis's CPU time over that span are read alongside. The values are JSON,
//! or Avro, Protobuf or JSON Schema records that the consumer decodes ([`Values`]).

use std::net::{SocketAddr, ToSocketAddrs as _};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use redis::AsyncCommands as _;
use redis::aio::ConnectionManager;
use redis::streams::StreamRangeReply;

use super::delay::{DelayProxy, round_trips};
use super::outcome::{IngestRun, Outcome};
use super::scenario::{
    Env, Scenario, ValueFormat, create_topic, free_port, manifest, server_command, unique,
};
use super::values::Values;
use super::{cpu_ticks, now_us, ticks_per_second};
use fjord_bus::StreamId;
use fjord_bus::redis::stream_key;
use fjord_config::Manifest;

/// How often the stream's length is looked at.
const POLL: Duration = Duration::from_millis(2);
/// A consumer that appends nothing for this long has stalled.
const STALL: Duration = Duration::from_secs(60);
/// Round trips measured through the path to Redis before each run.
const PINGS: usize = 200;
/// Distinct record keys (the envelope carries the key, as most topics have one).
const KEYS: u64 = 1_000;

/// Runs the ingest scenario: one topic filled once, one consumer run per round trip.
pub(crate) async fn run(env: &Env, scenario: &Scenario) -> anyhow::Result<Outcome> {
    anyhow::ensure!(
        scenario.records >= 2,
        "the ingest scenario needs at least 2 records"
    );
    anyhow::ensure!(
        !scenario.rtt_ms.is_empty(),
        "the ingest scenario needs a round trip"
    );
    let redis = redis_address(&env.redis)?;
    let topic = unique("bench-ingest");
    create_topic(&env.kafka, &topic, 1).await?;
    let values = Values::new(
        scenario.value_format,
        env.schema_registry.as_deref(),
        &topic,
    )
    .await?;
    let filled = Instant::now();
    prefill(&env.kafka, &topic, scenario.records, &values)
        .await
        .with_context(|| format!("filling topic {topic}"))?;
    tracing::info!(%topic, records = scenario.records, secs = filled.elapsed().as_secs_f64(), "topic filled");
    let mut outcome = Outcome {
        scenario: scenario.name.clone(),
        load: Some(scenario.clone()),
        ..Outcome::default()
    };
    for &rtt_ms in &scenario.rtt_ms {
        match run_one(env, scenario, &topic, redis, rtt_ms).await {
            Ok(run) => {
                tracing::info!(
                    rtt_ms,
                    rtt_measured_ms = run.rtt_measured_ms,
                    records_per_sec = run.records_per_sec as u64,
                    consumer_cpu_us_per_record = run.consumer_cpu_us_per_record,
                    "ingested"
                );
                outcome.records += run.records;
                outcome.window_secs += run.secs;
                outcome.ingest.push(run);
            }
            Err(error) => outcome.errors.push(format!("at {rtt_ms} ms: {error:#}")),
        }
    }
    if let Err(error) = delete_topic(&env.kafka, &topic).await {
        tracing::warn!(%topic, error = %format!("{error:#}"), "could not delete the topic");
    }
    Ok(outcome)
}

/// One consumer member through a backlog of `scenario.records` records, `rtt_ms` from Redis.
async fn run_one(
    env: &Env,
    scenario: &Scenario,
    topic: &str,
    redis: SocketAddr,
    rtt_ms: f64,
) -> anyhow::Result<IngestRun> {
    anyhow::ensure!(
        rtt_ms.is_finite() && rtt_ms >= 0.0,
        "a round trip of {rtt_ms} ms"
    );
    let proxy = if rtt_ms > 0.0 {
        Some(DelayProxy::start(
            redis,
            Duration::from_secs_f64(rtt_ms / 2_000.0),
        )?)
    } else {
        None
    };
    let (path, url) = match &proxy {
        Some(proxy) => (proxy.address(), via(&env.redis, proxy.address())?),
        None => (redis, env.redis.clone()),
    };
    let rtt_measured =
        tokio::task::spawn_blocking(move || round_trips(path, b"PING\r\n", b"+PONG\r\n", PINGS))
            .await?
            .context("timing a PING to Redis")?;

    let prefix = unique("bench-ingest");
    let mut manifest_text = manifest(env, scenario, &url, free_port()?, &prefix, topic);
    if scenario.value_format != ValueFormat::Json {
        let mut json: serde_json::Value = serde_json::from_str(&manifest_text)?;
        let format = serde_json::to_value(scenario.value_format)?;
        json["topics"] = serde_json::json!({topic: {"value_format": format}});
        json["schema_registry"] = serde_json::json!({"urls": [env.schema_registry]});
        manifest_text = json.to_string();
    }
    let manifest = Manifest::parse(&manifest_text)?;
    let endpoint = manifest
        .endpoints
        .keys()
        .next()
        .context("the manifest's endpoint")?;
    let key = stream_key(&prefix, endpoint);
    // Reconnects: other users of the test Redis may restart it (its AOF keeps the stream).
    let mut redis_commands = redis::Client::open(env.redis.as_str())?
        .get_connection_manager()
        .await
        .context("connecting to Redis")?;

    let started = Instant::now();
    let mut consumer = server_command(env, scenario, "fjord-consumer", &manifest_text).spawn()?;
    let pid = consumer.id().context("the consumer's pid")?;
    let watched = watch(
        &mut redis_commands,
        &key,
        scenario.records,
        pid,
        &mut consumer,
    )
    .await;
    let _ = consumer.kill().await;
    drop(proxy);
    let figures = match watched {
        Ok(window) => {
            figures(
                &mut redis_commands,
                &key,
                scenario.records,
                started,
                &window,
            )
            .await
        }
        Err(error) => Err(error),
    };
    forget(&mut redis_commands, &prefix).await;
    let mut run = figures?;
    run.rtt_ms = rtt_ms;
    run.rtt_measured_ms = rtt_measured.median.as_secs_f64() * 1_000.0;
    run.rtt_mean_ms = rtt_measured.mean.as_secs_f64() * 1_000.0;
    Ok(run)
}

/// CPU times at the first record and at the last.
struct Window {
    first_seen: Instant,
    consumer_ticks: (u64, u64),
    redis_cpu_secs: (f64, f64),
}

/// Which Redis process answers, and its CPU time so far.
struct RedisCpu {
    run_id: String,
    secs: f64,
}

/// Polls the stream's length until all `records` are in it.
async fn watch(
    redis: &mut ConnectionManager,
    key: &str,
    records: u64,
    pid: u32,
    consumer: &mut tokio::process::Child,
) -> anyhow::Result<Window> {
    let mut first: Option<(Instant, u64, RedisCpu)> = None;
    let (mut seen, mut moved) = (0_u64, Instant::now());
    loop {
        let length: u64 = match redis::cmd("XLEN").arg(key).query_async(redis).await {
            Ok(length) => length,
            // A restart by someone else; the stall limit bounds the wait.
            Err(error) if error.is_io_error() || error.is_connection_refusal() => {
                tracing::debug!(%error, "polling the stream");
                seen
            }
            Err(error) => return Err(error.into()),
        };
        if length != seen {
            (seen, moved) = (length, Instant::now());
        }
        if length > 0 && first.is_none() {
            first = Some((
                Instant::now(),
                cpu_ticks(pid).unwrap_or(0),
                redis_cpu(redis).await?,
            ));
        }
        if length >= records
            && let Some((first_seen, ticks, cpu)) = first
        {
            let (ticks_now, cpu_now) = (cpu_ticks(pid).unwrap_or(0), redis_cpu(redis).await?);
            anyhow::ensure!(
                cpu_now.run_id == cpu.run_id,
                "Redis restarted during the run (by another user of it?): the figures would \
                 count the outage"
            );
            return Ok(Window {
                first_seen,
                consumer_ticks: (ticks, ticks_now),
                redis_cpu_secs: (cpu.secs, cpu_now.secs),
            });
        }
        if let Some(status) = consumer.try_wait()? {
            anyhow::bail!("fjord-consumer exited ({status}) after {seen} of {records} records");
        }
        anyhow::ensure!(
            moved.elapsed() < STALL,
            "stalled at {seen} of {records} records for {STALL:?}"
        );
        tokio::time::sleep(POLL).await;
    }
}

/// The run's figures, from the stream's first and last entries and the CPU times.
async fn figures(
    redis: &mut ConnectionManager,
    key: &str,
    records: u64,
    started: Instant,
    window: &Window,
) -> anyhow::Result<IngestRun> {
    let first: StreamRangeReply = redis::cmd("XRANGE")
        .arg(key)
        .arg("-")
        .arg("+")
        .arg("COUNT")
        .arg(1)
        .query_async(redis)
        .await?;
    let last: StreamRangeReply = redis::cmd("XREVRANGE")
        .arg(key)
        .arg("+")
        .arg("-")
        .arg("COUNT")
        .arg(1)
        .query_async(redis)
        .await?;
    let (first, last) = (
        first.ids.first().context("the stream's first entry")?,
        last.ids.first().context("the stream's last entry")?,
    );
    let envelope: serde_json::Value = serde_json::from_str(
        &last
            .get::<String>("e")
            .context("the last entry's envelope")?,
    )?;
    anyhow::ensure!(
        envelope["offset"].as_u64() == Some(records - 1),
        "the stream ends at offset {}, not at the last record's {}",
        envelope["offset"],
        records - 1
    );
    let (first_id, last_id): (StreamId, StreamId) = (first.id.parse()?, last.id.parse()?);
    // Ids count milliseconds: a span shorter than one is at most one.
    let secs = (last_id.ms.saturating_sub(first_id.ms).max(1)) as f64 / 1_000.0;
    let consumer_cpu = window
        .consumer_ticks
        .1
        .saturating_sub(window.consumer_ticks.0) as f64
        / ticks_per_second();
    let redis_cpu = (window.redis_cpu_secs.1 - window.redis_cpu_secs.0).max(0.0);
    Ok(IngestRun {
        records,
        startup_secs: window.first_seen.duration_since(started).as_secs_f64(),
        secs,
        records_per_sec: (records - 1) as f64 / secs,
        consumer_cpu_us_per_record: consumer_cpu * 1e6 / records as f64,
        redis_cpu_us_per_record: redis_cpu * 1e6 / records as f64,
        ..IngestRun::default()
    })
}

/// Redis's run id and own CPU time so far (`INFO`), user plus system, in seconds.
async fn redis_cpu(redis: &mut ConnectionManager) -> anyhow::Result<RedisCpu> {
    let info: String = redis::cmd("INFO").query_async(redis).await?;
    let field = |name: &str| {
        info.lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
            .map(str::trim)
            .with_context(|| format!("{name} in INFO"))
    };
    let seconds = |name: &str| -> anyhow::Result<f64> {
        field(name)?
            .parse()
            .with_context(|| format!("{name} in INFO is not a number"))
    };
    Ok(RedisCpu {
        run_id: field("run_id")?.to_owned(),
        secs: seconds("used_cpu_user")? + seconds("used_cpu_sys")?,
    })
}

/// Deletes a run's keys: a backlog's stream is large, and the test Redis is shared.
pub(super) async fn forget(redis: &mut ConnectionManager, prefix: &str) {
    let keys = async {
        let mut found = redis.scan_match::<_, String>(format!("*{prefix}*")).await?;
        let mut keys = Vec::new();
        while let Some(key) = found.next_item().await {
            keys.push(key?);
        }
        Ok::<_, redis::RedisError>(keys)
    };
    let deleted = match keys.await {
        Ok(keys) if !keys.is_empty() => {
            redis::cmd("UNLINK")
                .arg(&keys)
                .query_async::<()>(redis)
                .await
        }
        Ok(_) => Ok(()),
        Err(error) => Err(error),
    };
    if let Err(error) = deleted {
        tracing::warn!(%error, prefix, "could not delete the run's keys");
    }
}

/// Produces `records` small records (order lines, in the scenario's format) to `topic` as
/// fast as the producer batches them, and waits until Kafka has them all.
async fn prefill(brokers: &str, topic: &str, records: u64, values: &Values) -> anyhow::Result<()> {
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let producer: FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("linger.ms", "20")
        .set("batch.num.messages", "10000")
        .set("queue.buffering.max.messages", "1000000")
        .create()?;
    let mut deliveries = Vec::new();
    for record in 0..records {
        let key = format!("k{}", record % KEYS);
        let value = values.value(record, now_us())?;
        let delivery = producer
            .send_result(FutureRecord::to(topic).key(&key).payload(&value))
            .map_err(|(error, _)| anyhow::anyhow!("produce: {error}"))?;
        deliveries.push(delivery);
        if deliveries.len() >= 100_000 || record + 1 == records {
            for delivery in deliveries.drain(..) {
                match delivery.await {
                    Ok(Ok(_)) => {}
                    Ok(Err((error, _))) => anyhow::bail!("produce: {error}"),
                    Err(_) => anyhow::bail!("the producer dropped a delivery"),
                }
            }
        }
    }
    Ok(())
}

async fn delete_topic(brokers: &str, topic: &str) -> anyhow::Result<()> {
    use rdkafka::admin::{AdminClient, AdminOptions};
    let admin: AdminClient<rdkafka::client::DefaultClientContext> = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()?;
    for result in admin.delete_topics(&[topic], &AdminOptions::new()).await? {
        result.map_err(|(topic, code)| anyhow::anyhow!("delete topic {topic}: {code}"))?;
    }
    Ok(())
}

/// Where a plain `redis://` URL points.
fn redis_address(redis: &str) -> anyhow::Result<SocketAddr> {
    let url = plain_url(redis)?;
    let host = url.host_str().context("the Redis URL's host")?;
    (host, url.port().unwrap_or(6379))
        .to_socket_addrs()
        .with_context(|| format!("resolving {host}"))?
        .next()
        .with_context(|| format!("{host} resolves to no address"))
}

/// `redis` with its host and port replaced by `proxy`'s (credentials and database kept).
fn via(redis: &str, proxy: SocketAddr) -> anyhow::Result<String> {
    let mut url = plain_url(redis)?;
    url.set_ip_host(proxy.ip())
        .map_err(|()| anyhow::anyhow!("the Redis URL takes no host"))?;
    url.set_port(Some(proxy.port()))
        .map_err(|()| anyhow::anyhow!("the Redis URL takes no port"))?;
    Ok(url.to_string())
}

fn plain_url(redis: &str) -> anyhow::Result<reqwest::Url> {
    // Not the URL itself in the message: it may carry a password.
    let url = reqwest::Url::parse(redis).context("the Redis URL does not parse")?;
    anyhow::ensure!(
        url.scheme() == "redis",
        "the ingest scenario delays plain redis:// only (its proxy does not speak TLS)"
    );
    Ok(url)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_proxied_url_keeps_all_but_the_address() {
        let proxy = SocketAddr::from(([127, 0, 0, 1], 40_001));
        assert_eq!(
            via("redis://user:secret@10.0.0.5:6380/2", proxy).expect("via"),
            "redis://user:secret@127.0.0.1:40001/2"
        );
        assert_eq!(
            redis_address("redis://127.0.0.1:16379").expect("address"),
            SocketAddr::from(([127, 0, 0, 1], 16_379))
        );
        assert!(via("rediss://127.0.0.1:6380", proxy).is_err());
    }
}
