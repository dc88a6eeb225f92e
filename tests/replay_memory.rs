//! What resuming clients that never read cost the real `fjord-server`, with real Redis and
//! big records: the bytes their replays hold stay bounded (`fjord_replay_buffered_bytes`),
//! and they are shed like live clients that cannot keep up (`fjord_clients_dropped_total`).

use std::time::Duration;

use crate::common::*;
use fjord_bus::envelope::{Envelope, RecordParts};
use fjord_bus::{Bus, Publication};
use fjord_config::{EndpointName, Keeping, Manifest};
use fjord_server::replay::PAGE_BYTES;
use tokio::io::AsyncWriteExt as _;

/// Resumers that never read.
const RESUMERS: usize = 8;
/// Records in the replay window, each about `RECORD_BYTES`: more than a page of 512.
const RECORDS: i64 = 600;
const RECORD_BYTES: usize = 100 * 1024;
/// What one replay may hold at once: its page (about `PAGE_BYTES`, or one record when a
/// record is bigger), plus the chunk its connection is writing (64 KiB, or one event).
const BOUND_PER_RESUMER: u64 = PAGE_BYTES as u64 + 2 * (RECORD_BYTES as u64 + 1024) + 64 * 1024;

async fn publish(bus: &Bus, endpoints: &[(EndpointName, Keeping)], offset: i64, bytes: usize) {
    let value = format!("{{\"pad\":\"{}\"}}", "x".repeat(bytes));
    let key = format!("k{offset}");
    let envelope = Envelope::encode(
        RecordParts {
            topic: "orders",
            partition: 0,
            offset,
            key: Some(key.as_bytes()),
            timestamp: None,
            value: Some(value.as_bytes()),
        },
        [],
    )
    .expect("encodes");
    bus.publish(Publication {
        topic: "orders",
        partition: 0,
        offset,
        endpoints,
        envelope: &envelope,
    })
    .await
    .expect("publish");
}

fn metric(text: &str, name: &str) -> Option<u64> {
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

/// A stream request that resumes from the start of the window, on a socket that is never
/// read, with a small receive buffer so that the server's writes block early.
async fn resume_without_reading(port: u16) -> tokio::net::TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("receive buffer");
    let mut stream = socket
        .connect(([127, 0, 0, 1], port).into())
        .await
        .expect("connect");
    stream
        .write_all(b"GET /v1/streams/orders HTTP/1.1\r\nhost: x\r\nlast-event-id: 0-1\r\n\r\n")
        .await
        .expect("request");
    stream
}

/// The highest RSS and replay bytes seen at each scrape of the server.
struct Peaks {
    metrics_url: String,
    pid: u32,
    rss_before: u64,
    rss_kib: u64,
    buffered: u64,
}

impl Peaks {
    fn new(port: u16, pid: u32) -> Self {
        let rss_before = rss_kib(pid);
        Self {
            metrics_url: format!("http://127.0.0.1:{port}/metrics"),
            pid,
            rss_before,
            rss_kib: rss_before,
            buffered: 0,
        }
    }

    /// Scrapes `/metrics` and notes the peaks; returns the metrics.
    async fn sample(&mut self) -> String {
        let metrics = reqwest::get(&self.metrics_url)
            .await
            .expect("metrics")
            .text()
            .await
            .expect("body");
        self.rss_kib = self.rss_kib.max(rss_kib(self.pid));
        let buffered = metric(&metrics, "fjord_replay_buffered_bytes").unwrap_or(0);
        self.buffered = self.buffered.max(buffered);
        metrics
    }

    async fn wait_until(&mut self, what: &str, done: impl Fn(&str) -> bool) {
        let deadline = std::time::Instant::now() + PATIENCE;
        loop {
            let metrics = self.sample().await;
            if done(&metrics) {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "waited {PATIENCE:?} for {what}: {metrics}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

#[tokio::test]
async fn resumers_that_never_read_hold_bounded_bytes_and_are_shed() {
    if skip_without_services() {
        return;
    }
    let services = services();
    let port = free_port();
    let mut manifest = manifest(&services, &[("orders", &unique("replay"))], "unused", port);
    manifest["server"]["client_queue"] = 16.into();
    let (_dir, path) = write_manifest(&manifest);
    let config = Manifest::load(&path).expect("manifest");
    let endpoints: Vec<(EndpointName, Keeping)> = config
        .endpoints
        .iter()
        .map(|(name, endpoint)| (name.clone(), endpoint.keeping()))
        .collect();
    let bus = fjord_bus::connect_redis(&config.redis)
        .await
        .expect("redis");
    for offset in 0..RECORDS {
        publish(&bus, &endpoints, offset, RECORD_BYTES).await;
    }
    let server = Process::server(&path);
    wait_ready(port).await;
    let mut peaks = Peaks::new(port, server.pid());

    let mut resumers = Vec::new();
    for _ in 0..RESUMERS {
        resumers.push(resume_without_reading(port).await);
    }
    // Every replay has handed at least one record to its connection.
    peaks
        .wait_until("every resumer is replaying", |metrics| {
            metric(metrics, "fjord_replay_buffered_bytes")
                .is_some_and(|bytes| bytes >= RESUMERS as u64 * RECORD_BYTES as u64)
        })
        .await;
    // Live records fill their queues: each is shed, as a live client that cannot keep up.
    let mut offset = RECORDS;
    loop {
        publish(&bus, &endpoints, offset, 100).await;
        offset += 1;
        let metrics = peaks.sample().await;
        if metric(&metrics, "fjord_clients_dropped_total") == Some(RESUMERS as u64) {
            break;
        }
        assert!(offset < RECORDS + 1000, "never shed: {metrics}");
    }
    let Peaks {
        rss_before,
        rss_kib: peak_rss,
        buffered: peak_buffered,
        ..
    } = peaks;
    println!(
        "{RESUMERS} resumers that never read, {RECORD_BYTES}-byte records: server RSS {rss_before} KiB → peak {peak_rss} KiB (+{} KiB); replays held at most {peak_buffered} bytes",
        peak_rss.saturating_sub(rss_before)
    );
    assert!(
        peak_buffered <= RESUMERS as u64 * BOUND_PER_RESUMER,
        "replays held {peak_buffered} bytes, more than {RESUMERS} × {BOUND_PER_RESUMER}"
    );
    // Before replays were bounded, the same run grew by about 540 MiB.
    assert!(
        peak_rss - rss_before < 64 * 1024,
        "the server grew by {} KiB",
        peak_rss - rss_before
    );
    drop(resumers);
}
