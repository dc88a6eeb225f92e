//! Fault injection against real Kafka and Redis (or, with `FJORD_TEST_BUS=cluster`, the
//! shared Redis Cluster). Each test asserts that the records every client received are
//! exactly the records produced: all of them, in order per partition, none twice. They run
//! one at a time. The two that stop a shared service (Redis, the Kafka broker) would break
//! every other module's tests running beside them in the test binary: they are `#[ignore]`d,
//! and `ci/test.sh` runs them alone (`-- --ignored faults::`).

use crate::common::*;
use tokio::sync::Mutex;

static ONE_AT_A_TIME: Mutex<()> = Mutex::const_new(());

struct Pipeline {
    topic: String,
    ports: Vec<u16>,
    servers: Vec<Process>,
    consumer: Option<Process>,
    path: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Pipeline {
    /// A topic of `partitions`, `servers` server instances and one consumer.
    async fn start(
        partitions: i32,
        servers: usize,
        edit: impl FnOnce(&mut serde_json::Value),
    ) -> Self {
        let services = services();
        let topic = unique("faults");
        create_topic(&services.brokers, &topic, partitions).await;
        let ports: Vec<u16> = (0..servers).map(|_| free_port()).collect();
        let mut manifest = manifest(&services, &[("orders", &topic)], &unique("group"), ports[0]);
        edit(&mut manifest);
        let (dir, path) = write_manifest(&manifest);
        let mut processes = Vec::new();
        let mut paths = Vec::new();
        for &port in &ports {
            let mut own = manifest.clone();
            own["server"]["port"] = port.into();
            let (own_dir, own_path) = write_manifest(&own);
            processes.push(Process::server(&own_path));
            paths.push((own_dir, own_path));
        }
        for &port in &ports {
            wait_ready(port).await;
        }
        // The manifests must outlive the servers' start only; they read them at once.
        drop(paths);
        let consumer = Some(Process::consumer(&path, &[]));
        Self {
            topic,
            ports,
            servers: processes,
            consumer,
            path,
            _dir: dir,
        }
    }

    /// Starts a pipeline and a client of its first server that has received a first 100
    /// records; returns them with the records produced.
    async fn streaming(
        partitions: i32,
        servers: usize,
        edit: impl FnOnce(&mut serde_json::Value),
    ) -> (Self, ResumingClient, Vec<(i32, i64)>) {
        let pipeline = Self::start(partitions, servers, edit).await;
        let urls = (0..servers).map(|server| pipeline.url(server)).collect();
        let client = ResumingClient::start(urls);
        wait_until("the client connected", || client.connections() == 1).await;
        let produced = pipeline.produce(0, 100, partitions).await;
        client.wait_for_records(100).await;
        (pipeline, client, produced)
    }

    fn url(&self, server: usize) -> String {
        format!("http://127.0.0.1:{}/v1/streams/orders", self.ports[server])
    }

    async fn produce(&self, from: usize, count: usize, partitions: i32) -> Vec<(i32, i64)> {
        let records: Vec<TestRecord> = json_records(from + count, partitions, 7).split_off(from);
        produce(&services().brokers, &self.topic, &records).await
    }
}

#[tokio::test]
#[ignore = "stops the shared Redis: run alone, `-- --ignored faults::` (ci/test.sh)"]
async fn redis_stopped_and_restarted_mid_stream() {
    if skip_without_services() {
        return;
    }
    let _serial = ONE_AT_A_TIME.lock().await;
    let (pipeline, client, mut produced) = Pipeline::streaming(2, 1, |_| {}).await;
    stop_bus_redis();
    let readyz = format!("http://127.0.0.1:{}/readyz", pipeline.ports[0]);
    let deadline = std::time::Instant::now() + PATIENCE;
    while status_of(&readyz).await != 503 {
        assert!(
            std::time::Instant::now() < deadline,
            "readyz never said 503 while Redis was down"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    // Kafka takes records while the bus is down; the consumer holds them.
    produced.extend(pipeline.produce(100, 100, 2).await);
    start_bus_redis();
    wait_ready(pipeline.ports[0]).await;
    produced.extend(pipeline.produce(200, 100, 2).await);

    let records = client.wait_for_records(produced.len()).await;
    assert_complete_and_ordered(&records, &produced);
    assert_eq!(
        client.connections(),
        1,
        "the server kept its client connected through the outage"
    );
}

#[tokio::test]
async fn a_killed_server_s_clients_resume_on_the_other() {
    if skip_without_services() {
        return;
    }
    let _serial = ONE_AT_A_TIME.lock().await;
    let mut pipeline = Pipeline::start(3, 2, |_| {}).await;
    let client = ResumingClient::start(vec![pipeline.url(0), pipeline.url(1)]);
    let both_endpoints = format!(
        "http://127.0.0.1:{}/v1/streams?endpoint=orders",
        pipeline.ports[0]
    );
    let second = ResumingClient::start(vec![both_endpoints, pipeline.url(1)]);
    wait_until("clients connected", || {
        client.connections() == 1 && second.connections() == 1
    })
    .await;
    let mut produced = pipeline.produce(0, 150, 3).await;
    client.wait_for_records(150).await;

    pipeline.servers[0].kill();
    produced.extend(pipeline.produce(150, 150, 3).await);
    let records = client.wait_for_records(produced.len()).await;
    assert_complete_and_ordered(&records, &produced);
    assert!(
        client.connections() >= 2,
        "the client moved to the other server"
    );
    assert_complete_and_ordered(&second.wait_for_records(produced.len()).await, &produced);
}

#[tokio::test]
async fn a_draining_server_sends_shutdown_and_its_clients_resume_elsewhere() {
    if skip_without_services() {
        return;
    }
    let _serial = ONE_AT_A_TIME.lock().await;
    let (mut pipeline, client, mut produced) = Pipeline::streaming(2, 2, |_| {}).await;

    pipeline.servers[0].terminate();
    assert_eq!(
        pipeline.servers[0].wait_exit().await,
        Some(0),
        "drains and exits cleanly"
    );
    // The notice was sent before the server exited; the client may still be reading it.
    wait_until("the client was told to reconnect", || {
        client
            .notices()
            .iter()
            .any(|n| n.event.as_deref() == Some("fjord.shutdown"))
    })
    .await;
    produced.extend(pipeline.produce(100, 100, 2).await);
    assert_complete_and_ordered(&client.wait_for_records(produced.len()).await, &produced);
}

#[tokio::test]
async fn a_consumer_killed_mid_stream_loses_and_repeats_nothing() {
    if skip_without_services() {
        return;
    }
    let _serial = ONE_AT_A_TIME.lock().await;
    let mut pipeline = Pipeline::start(3, 1, |_| {}).await;
    let client = ResumingClient::start(vec![pipeline.url(0)]);
    wait_until("the client connected", || client.connections() == 1).await;
    let topic = pipeline.topic.clone();
    let producing = tokio::spawn(async move {
        let records = json_records(3000, 3, 11);
        produce(&services().brokers, &topic, &records).await
    });
    client.wait_for_records(300).await;
    if let Some(consumer) = &mut pipeline.consumer {
        consumer.kill();
    }
    let produced = producing.await.expect("producer");
    // A new member takes over from the last commit and re-reads what the killed one
    // published after it; the idempotent publish drops those.
    let replacement = Process::consumer(&pipeline.path, &[]);
    let records = client.wait_for_records(produced.len()).await;
    assert_complete_and_ordered(&records, &produced);
    replacement.wait_for_log(&["partitions assigned"]).await;
}

#[tokio::test]
async fn a_terminated_consumer_commits_and_leaves_the_group() {
    if skip_without_services() {
        return;
    }
    let _serial = ONE_AT_A_TIME.lock().await;
    let mut pipeline = Pipeline::start(1, 1, |_| {}).await;
    let client = ResumingClient::start(vec![pipeline.url(0)]);
    wait_until("the client connected", || client.connections() == 1).await;
    let mut produced = pipeline.produce(0, 50, 1).await;
    client.wait_for_records(50).await;
    let consumer = pipeline.consumer.as_mut().expect("consumer");
    consumer.terminate();
    assert_eq!(consumer.wait_exit().await, Some(0));
    consumer.wait_for_log(&["leaving the group"]).await;
    let replacement = Process::consumer(&pipeline.path, &[]);
    produced.extend(pipeline.produce(50, 50, 1).await);
    assert_complete_and_ordered(&client.wait_for_records(produced.len()).await, &produced);
    drop(replacement);
}

#[tokio::test]
#[ignore = "restarts the shared Kafka: run alone, `-- --ignored faults::` (ci/test.sh)"]
async fn the_kafka_broker_restarted_mid_stream() {
    if skip_without_services() {
        return;
    }
    let _serial = ONE_AT_A_TIME.lock().await;
    let (pipeline, client, mut produced) = Pipeline::streaming(2, 1, |_| {}).await;
    services_command("restart-kafka");
    produced.extend(pipeline.produce(100, 100, 2).await);
    // The consumer's way back after a broker restart (reconnect backoff, then rejoining its
    // group on a broker that reloads the group's state) took over 60 s twice in CI with a
    // build on the other core; what is asserted is that nothing is lost, not how soon.
    let records = client
        .wait_for_records_within(produced.len(), 3 * PATIENCE)
        .await;
    assert_complete_and_ordered(&records, &produced);
}

#[tokio::test]
async fn a_slow_client_is_cut_off_and_resumes_without_loss() {
    a_slow_client_is_cut_off_by(serde_json::json!({"client_queue": 16})).await;
}

#[tokio::test]
async fn a_slow_client_is_cut_off_by_the_bytes_its_queue_holds_whatever_their_count() {
    // Neither the count nor the time bound is reached: 1 MiB is.
    a_slow_client_is_cut_off_by(serde_json::json!({
        "client_queue_mib": 1,
        "client_max_lag_ms": 3_600_000,
    }))
    .await;
}

/// A client that stops reading while 3,000 records of 8 KiB stream is cut off under the
/// `server` settings `bounds`, and once it reads again, resumes without loss.
async fn a_slow_client_is_cut_off_by(bounds: serde_json::Value) {
    if skip_without_services() {
        return;
    }
    let _serial = ONE_AT_A_TIME.lock().await;
    let pipeline = Pipeline::start(2, 1, |m| {
        for (name, value) in bounds.as_object().into_iter().flatten() {
            m["server"][name] = value.clone();
        }
    })
    .await;
    let fast = ResumingClient::start(vec![pipeline.url(0)]);
    let slow = ResumingClient::start(vec![pipeline.url(0)]);
    wait_until("clients connected", || {
        fast.connections() == 1 && slow.connections() == 1
    })
    .await;
    slow.pause(true);
    // Large records fill the socket buffers quickly, then the slow client's queue.
    let padding = "x".repeat(8 * 1024);
    let records: Vec<TestRecord> = (0..3000)
        .map(|n| TestRecord {
            partition: n % 2,
            key: Some(format!("key-{n}").into_bytes()),
            value: Some(format!(r#"{{"seq":{n},"padding":"{padding}"}}"#).into_bytes()),
        })
        .collect();
    let produced = produce(&services().brokers, &pipeline.topic, &records).await;
    assert_complete_and_ordered(&fast.wait_for_records(produced.len()).await, &produced);
    let metrics_url = format!("http://127.0.0.1:{}/metrics", pipeline.ports[0]);
    let metrics = reqwest::get(&metrics_url)
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    assert!(
        !metrics.contains("fjord_clients_dropped_total 0\n"),
        "the slow client was cut off:\n{metrics}"
    );

    slow.pause(false);
    assert_complete_and_ordered(&slow.wait_for_records(produced.len()).await, &produced);
    assert!(slow.connections() >= 2, "it resumed on a new connection");
}

#[tokio::test]
async fn a_resume_id_older_than_the_window_gets_a_gap_event() {
    if skip_without_services() {
        return;
    }
    let _serial = ONE_AT_A_TIME.lock().await;
    let pipeline = Pipeline::start(1, 1, |m| {
        m["endpoints"]["orders"]["retention"] = serde_json::json!({"max_records": 10});
    })
    .await;
    let live = ResumingClient::start(vec![pipeline.url(0)]);
    wait_until("the client connected", || live.connections() == 1).await;
    // A few at a time, each batch read before the next: the window holds ten records, and a
    // live client is rightly told of a gap when the server reads more than ten behind.
    let mut produced = Vec::new();
    for batch in 0..20 {
        produced.extend(pipeline.produce(batch * 5, 5, 1).await);
        live.wait_for_records(produced.len()).await;
    }
    let all = live.wait_for_records(produced.len()).await;
    assert_complete_and_ordered(&all, &produced);

    // Resuming from the first record's id: most of the window is gone.
    let first_id = all[0].id.clone().expect("id");
    let resumed = ResumingClient::start_from(vec![pipeline.url(0)], Some(first_id));
    wait_until("a gap event", || {
        resumed
            .notices()
            .iter()
            .any(|n| n.event.as_deref() == Some("fjord.gap"))
    })
    .await;
    let gap = resumed
        .notices()
        .into_iter()
        .find(|n| n.event.as_deref() == Some("fjord.gap"))
        .expect("gap");
    let oldest = gap.json()["oldest_id"]
        .as_str()
        .expect("oldest id")
        .to_owned();
    let oldest_index = all
        .iter()
        .position(|e| e.id.as_deref() == Some(oldest.as_str()))
        .expect("a delivered id");
    assert!(
        oldest_index > 1 && produced.len() - oldest_index >= 10,
        "kept at least max_records: {oldest_index}"
    );
    let rest = resumed
        .wait_for_records(produced.len() - oldest_index)
        .await;
    assert_complete_and_ordered(&rest, &produced[oldest_index..]);

    // Resuming from inside the window, by query parameter as a first request would, gets
    // exactly the rest, and no gap.
    let inside = all[produced.len() - 5].id.clone().expect("id");
    let url = format!("{}?last_event_id={inside}", pipeline.url(0));
    let mut stream = SseStream::connect(&url, &[]).await;
    let tail = stream.records(4).await;
    assert_complete_and_ordered(&tail, &produced[produced.len() - 4..]);
}
