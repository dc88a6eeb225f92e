//! The third round of attacks (SECURITY.md lists them with their results), each against the
//! real `fjord-server` with real Redis: key sets over many endpoints and the key index's
//! budget, slow readers of large records, many connections with overlapping key sets
//! leaving at once, request targets no route serves, and the smaller faults of tokens,
//! resume ids and queries. Memory and time are measured on the server process, with
//! generous bounds that the attacks exceeded many times over before their fixes.

mod common;

use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

const SECRET_ENV: &str = "FJORD_TEST_ATTACKS_SECRET";
const SECRET: &str = "an attack-test secret: 48 bytes of varied text!!";

struct Server {
    port: u16,
    process: Process,
    _dir: tempfile::TempDir,
}

/// Starts `fjord-server` for `endpoints` (name, topic) with the manifest `edit` made.
async fn start(endpoints: &[(&str, &str)], edit: impl FnOnce(&mut serde_json::Value)) -> Server {
    let services = services();
    let port = free_port();
    let mut manifest = manifest(&services, endpoints, &unique("group"), port);
    edit(&mut manifest);
    let (dir, path) = write_manifest(&manifest);
    let mut process = Process::start(
        env!("CARGO_BIN_EXE_fjord-server"),
        &["--manifest", path.to_str().expect("utf-8 path")],
        &[(SECRET_ENV, SECRET)],
    );
    process.wait_ready(port).await;
    Server {
        port,
        process,
        _dir: dir,
    }
}

impl Server {
    /// A value of `/metrics`: the first line that starts with `name` (with its labels).
    async fn metric(&self, name: &str) -> f64 {
        let text = reqwest::get(format!("http://127.0.0.1:{}/metrics", self.port))
            .await
            .expect("metrics")
            .text()
            .await
            .expect("text");
        let value = text
            .lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok());
        assert!(value.is_some(), "no {name} in {text}");
        value.unwrap_or_default()
    }

    /// Fails the test if the server panicked or stopped answering.
    async fn assert_no_panic(&self) {
        let log = self.process.log().join("\n");
        assert!(!log.contains("panicked"), "the server panicked:\n{log}");
        let health = reqwest::get(format!("http://127.0.0.1:{}/healthz", self.port)).await;
        assert!(
            health.is_ok_and(|response| response.status() == 200),
            "the server stopped answering:\n{log}"
        );
    }
}

/// A response read off a raw connection: its status, head, and the rest of what came
/// before `until` appeared or the server closed the connection.
struct Raw {
    status: u16,
    head: String,
    socket: TcpStream,
    body: Vec<u8>,
}

impl Raw {
    fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().find_map(|line| {
            let (field, value) = line.split_once(':')?;
            field.eq_ignore_ascii_case(name).then_some(value.trim())
        })
    }

    fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Sends `request` and reads until the response head and `until` arrived; for `None`, the
/// whole response, or only the head of a stream (which does not end).
async fn raw(port: u16, request: &[u8], until: Option<&[u8]>) -> Raw {
    let mut socket = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    socket.write_all(request).await.expect("request");
    let mut received = Vec::new();
    let done = |received: &[u8]| match received.windows(4).position(|w| w == b"\r\n\r\n") {
        Some(end) => match until {
            Some(until) => received[end..]
                .windows(until.len())
                .any(|window| window == until),
            None => received.starts_with(b"HTTP/1.1 200"),
        },
        None => false,
    };
    while !done(&received) {
        let mut chunk = vec![0_u8; 16 * 1024];
        let n = tokio::time::timeout(PATIENCE, socket.read(&mut chunk))
            .await
            .expect("a response in time")
            .expect("read");
        if n == 0 {
            break;
        }
        received.extend_from_slice(&chunk[..n]);
    }
    let end = received.windows(4).position(|w| w == b"\r\n\r\n");
    assert!(
        end.is_some(),
        "no head: {}",
        String::from_utf8_lossy(&received)
    );
    let end = end.unwrap_or_default();
    let head = String::from_utf8_lossy(&received[..end]).into_owned();
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|status| status.parse().ok());
    assert!(status.is_some(), "no status: {head}");
    let status = status.unwrap_or_default();
    Raw {
        status,
        head,
        socket,
        body: received[end + 4..].to_vec(),
    }
}

/// A stream request for `path?query`.
fn get(path_and_query: &str, fields: &str) -> Vec<u8> {
    format!("GET {path_and_query} HTTP/1.1\r\nhost: x\r\n{fields}\r\n").into_bytes()
}

/// Seconds of CPU the process has used (user and system), from `/proc/PID/stat`.
fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    // The fields after the command's closing parenthesis; utime and stime are the 14th and
    // 15th of the whole line.
    let after = stat.rsplit_once(')').expect("comm").1;
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 =
        fields[11].parse::<f64>().expect("utime") + fields[12].parse::<f64>().expect("stime");
    ticks / 100.0
}

fn keys_query(keys: impl Iterator<Item = String>) -> String {
    keys.map(|key| format!("key={key}"))
        .collect::<Vec<_>>()
        .join("&")
}

/// Row 3: a target in authority form (`GET a:1`, `CONNECT host:port`) reached warp and
/// panicked inside `http`, twenty thousand times in 2.7 s from one client; with
/// `panic = "abort"` one packet would end the server. Now it is a 400 before any router.
#[tokio::test]
async fn targets_that_are_not_a_path_or_a_url_are_refused_before_any_router() {
    let server = start(&[("orders", &unique("orders-unused"))], |_| {}).await;
    for request in [
        &b"GET a:1 HTTP/1.1\r\nhost: x\r\n\r\n"[..],
        b"CONNECT example.com:443 HTTP/1.1\r\nhost: example.com:443\r\n\r\n",
        b"CONNECT /v1/streams/orders HTTP/1.1\r\nhost: x\r\n\r\n",
        b"OPTIONS * HTTP/1.1\r\nhost: x\r\n\r\n",
        b"GET healthz HTTP/1.1\r\nhost: x\r\n\r\n",
    ] {
        for _ in 0..50 {
            let response = raw(server.port, request, None).await;
            assert_eq!(response.status, 400, "{}", String::from_utf8_lossy(request));
            assert!(response.body_text().contains("bad_request_target"));
        }
    }
    // Absolute form is still served.
    let absolute = raw(
        server.port,
        format!(
            "GET http://127.0.0.1:{}/healthz HTTP/1.1\r\nhost: x\r\n\r\n",
            server.port
        )
        .as_bytes(),
        None,
    )
    .await;
    assert_eq!(absolute.status, 200);
    assert_eq!(
        status_of(&format!("http://127.0.0.1:{}/healthz", server.port)).await,
        200
    );
    assert!(server.metric("fjord_requests_refused_total").await >= 250.0);
    server.assert_no_panic().await;
}

/// Publishes `count` records of about `bytes` bytes to every endpoint of `manifest`, through
/// the bus the server reads.
async fn publish_big(path: &std::path::Path, first_offset: i64, count: i64, bytes: usize) {
    use fjord::bus::Publication;
    use fjord::envelope::{Envelope, RecordParts};
    let config = fjord::config::Manifest::load(path).expect("manifest");
    let endpoints: Vec<_> = config
        .endpoints
        .iter()
        .map(|(name, endpoint)| (name.clone(), endpoint.retention))
        .collect();
    let bus = fjord::bus::connect_redis(&config.redis)
        .await
        .expect("redis");
    let value = format!("{{\"pad\":\"{}\"}}", "x".repeat(bytes));
    for offset in first_offset..first_offset + count {
        let envelope = Envelope::encode(
            RecordParts {
                topic: "orders",
                partition: 0,
                offset,
                key: Some(b"k"),
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
            endpoints: &endpoints,
            envelope: &envelope,
        })
        .await
        .expect("publish");
    }
}

/// A stream reader that takes 16 KiB every 100 ms through a small receive buffer, until
/// dropped.
async fn crawl(port: u16, request: Vec<u8>) -> tokio::task::JoinHandle<()> {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("receive buffer");
    let mut stream = socket
        .connect(([127, 0, 0, 1], port).into())
        .await
        .expect("connect");
    stream.write_all(&request).await.expect("request");
    let mut first = [0_u8; 12];
    stream.read_exact(&mut first).await.expect("head");
    assert!(first.starts_with(b"HTTP/1.1 200"));
    tokio::spawn(async move {
        let mut chunk = vec![0_u8; 16 * 1024];
        loop {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    })
}