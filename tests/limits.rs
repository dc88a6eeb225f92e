//! Connection limits of the real `fjord-server` against real Redis: the global limit, the
//! per-address and per-subject limits, health checks that answer while streams are at their
//! limit and when the open-file limit is low, and the separate metrics listener.

use std::net::SocketAddr;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::common::*;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpSocket, TcpStream};

const SECRET_ENV: &str = "FJORD_TEST_LIMITS_SECRET";
const SECRET: &str = "a test secret of more than thirty-two bytes, for HS256";

/// Starts `fjord-server` with the manifest `edit` made and the secret in its environment,
/// at an open-file limit of `nofile` when given.
async fn start(nofile: Option<u32>, edit: impl FnOnce(&mut serde_json::Value)) -> Server {
    let server = ServerStart::new().env(SECRET_ENV, SECRET);
    match nofile {
        Some(nofile) => server.nofile(nofile),
        None => server,
    }
    .start(edit)
    .await
}

fn jwt_auth() -> serde_json::Value {
    serde_json::json!({"mode": "jwt", "algorithms": ["HS256"], "hs256_secret_env": SECRET_ENV})
}

fn token(subject: &str) -> String {
    let exp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs()
        + 600;
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &serde_json::json!({"sub": subject, "exp": exp, "fjord": {"endpoints": ["*"]}}),
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .expect("sign")
}

/// A response head read off a raw connection, which stays open (a stream's does).
struct Raw {
    status: u16,
    head: String,
    socket: TcpStream,
}

impl Raw {
    fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().find_map(|line| {
            let (field, value) = line.split_once(':')?;
            field.eq_ignore_ascii_case(name).then_some(value.trim())
        })
    }

    /// The rest of the response, until the server closes the connection.
    async fn body(mut self) -> String {
        let mut rest = Vec::new();
        tokio::time::timeout(PATIENCE, self.socket.read_to_end(&mut rest))
            .await
            .expect("the server closes the connection")
            .expect("read");
        String::from_utf8_lossy(&rest).into_owned()
    }
}

/// Sends `request` from `source` (an address of 127/8) and reads the response head.
async fn raw_from(source: [u8; 4], port: u16, request: &str) -> Raw {
    let socket = TcpSocket::new_v4().expect("socket");
    socket
        .bind(SocketAddr::from((source, 0)))
        .expect("bind the source address");
    let mut socket = socket
        .connect(SocketAddr::from(([127, 0, 0, 1], port)))
        .await
        .expect("connect");
    socket.write_all(request.as_bytes()).await.expect("write");
    let mut head = Vec::new();
    let mut byte = [0_u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let read = tokio::time::timeout(PATIENCE, socket.read(&mut byte))
            .await
            .expect("a response head in time")
            .expect("read");
        assert!(
            read == 1,
            "connection closed before its response head: {}",
            String::from_utf8_lossy(&head)
        );
        head.push(byte[0]);
    }
    let head = String::from_utf8(head).expect("utf-8 head");
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|status| status.parse().ok())
        .expect("a status");
    Raw {
        status,
        head,
        socket,
    }
}

fn stream_request(token: Option<&str>) -> String {
    let authorization = token
        .map(|token| format!("Authorization: Bearer {token}\r\n"))
        .unwrap_or_default();
    format!("GET /v1/streams/orders HTTP/1.1\r\nHost: fjord\r\n{authorization}\r\n")
}

async fn open_stream(port: u16) -> Raw {
    raw_from([127, 0, 0, 1], port, &stream_request(None)).await
}

/// Opens a stream once a closed one's place is free: the server notices a close at once,
/// but not before the client's next request.
async fn open_once_there_is_room(source: [u8; 4], port: u16, request: &str) -> Raw {
    let deadline = std::time::Instant::now() + PATIENCE;
    loop {
        let stream = raw_from(source, port, request).await;
        if stream.status == 200 {
            return stream;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no place freed: {}",
            stream.head
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

async fn assert_refused_at_a_limit(refused: Raw) -> String {
    assert_eq!(refused.status, 503, "{}", refused.head);
    assert_eq!(refused.header("retry-after"), Some("5"), "{}", refused.head);
    assert_eq!(refused.header("content-type"), Some("application/json"));
    let body: serde_json::Value =
        serde_json::from_str(&refused.body().await).expect("a JSON error");
    assert_eq!(body["error"]["code"], "too_many_connections");
    body["error"]["message"]
        .as_str()
        .expect("a message")
        .to_owned()
}

async fn get(port: u16, path: &str) -> (u16, String) {
    let response = reqwest::get(format!("http://127.0.0.1:{port}{path}"))
        .await
        .expect("an answer");
    let status = response.status().as_u16();
    (status, response.text().await.expect("a body"))
}

async fn refused_count(port: u16, limit: &str) -> u64 {
    let (_, metrics) = get(port, "/metrics").await;
    let line = format!("fjord_connections_refused_total{{limit=\"{limit}\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(line.as_str()))
        .and_then(|count| count.parse().ok())
        .expect("the counter is in /metrics")
}

#[tokio::test]
async fn at_the_global_limit_a_stream_gets_503_with_retry_after_and_healthz_still_answers() {
    if skip_without_services() {
        return;
    }
    let server = start(None, |m| m["server"]["max_connections"] = 20.into()).await;
    let mut streams = Vec::new();
    for _ in 0..20 {
        let stream = open_stream(server.port).await;
        assert_eq!(stream.status, 200, "{}", stream.head);
        streams.push(stream);
    }
    let message = assert_refused_at_a_limit(open_stream(server.port).await).await;
    assert!(message.contains("20 streams"), "{message}");
    assert_eq!(get(server.port, "/healthz").await.0, 200);
    assert_eq!(get(server.port, "/readyz").await.0, 200);
    assert_eq!(refused_count(server.port, "global").await, 1);

    // A closed stream gives its place back.
    drop(streams.pop());
    streams.push(open_once_there_is_room([127, 0, 0, 1], server.port, &stream_request(None)).await);
}

#[tokio::test]
async fn streams_are_limited_per_client_address_and_per_token_subject() {
    if skip_without_services() {
        return;
    }
    let server = start(None, |m| {
        m["auth"] = jwt_auth();
        m["server"]["max_connections_per_address"] = 3.into();
        m["server"]["max_connections_per_subject"] = 2.into();
    })
    .await;
    let port = server.port;
    let mut open = Vec::new();

    // Per subject: alice's third stream is refused, from whichever address.
    let alice = stream_request(Some(&token("alice")));
    for source in [[127, 0, 0, 2], [127, 0, 0, 3]] {
        let stream = raw_from(source, port, &alice).await;
        assert_eq!(stream.status, 200, "{}", stream.head);
        open.push(stream);
    }
    let message = assert_refused_at_a_limit(raw_from([127, 0, 0, 4], port, &alice).await).await;
    assert!(message.contains("subject"), "{message}");
    let bob = stream_request(Some(&token("bob")));
    let stream = raw_from([127, 0, 0, 2], port, &bob).await;
    assert_eq!(stream.status, 200, "another subject: {}", stream.head);
    open.push(stream);

    // Per address: 127.0.0.2 holds alice's and bob's; a third subject gets one more there.
    let carol = stream_request(Some(&token("carol")));
    let stream = raw_from([127, 0, 0, 2], port, &carol).await;
    assert_eq!(stream.status, 200, "{}", stream.head);
    open.push(stream);
    let dave = stream_request(Some(&token("dave")));
    let message = assert_refused_at_a_limit(raw_from([127, 0, 0, 2], port, &dave).await).await;
    assert!(message.contains("address"), "{message}");
    let stream = raw_from([127, 0, 0, 5], port, &dave).await;
    assert_eq!(stream.status, 200, "another address: {}", stream.head);
    open.push(stream);

    assert_eq!(refused_count(port, "subject").await, 1);
    assert_eq!(refused_count(port, "address").await, 1);
    assert_eq!(refused_count(port, "global").await, 0);
    server
        .process
        .wait_for_log(&["too many streams for this token's subject"])
        .await;

    // A token's streams count only while open.
    drop(open.remove(0));
    open.push(open_once_there_is_room([127, 0, 0, 6], port, &alice).await);
}

#[tokio::test]
async fn behind_a_trusted_balancer_the_forwarded_address_is_counted() {
    if skip_without_services() {
        return;
    }
    let server = start(None, |m| {
        m["server"]["max_connections_per_address"] = 1.into();
        m["server"]["trust_forwarded_for"] = true.into();
    })
    .await;
    let from = |client: &str| {
        format!(
            "GET /v1/streams/orders HTTP/1.1\r\nHost: fjord\r\nX-Forwarded-For: {client}\r\n\r\n"
        )
    };
    // One balancer address, two clients; the entries before the last are the client's own.
    let first = raw_from([127, 0, 0, 1], server.port, &from("198.51.100.1")).await;
    assert_eq!(first.status, 200, "{}", first.head);
    let second = raw_from([127, 0, 0, 1], server.port, &from("10.9.9.9, 198.51.100.2")).await;
    assert_eq!(second.status, 200, "{}", second.head);
    let again = raw_from([127, 0, 0, 1], server.port, &from("10.8.8.8, 198.51.100.2")).await;
    let message = assert_refused_at_a_limit(again).await;
    assert!(message.contains("address"), "{message}");
}

#[tokio::test]
async fn with_a_low_open_file_limit_streams_are_refused_before_health_checks_fail() {
    if skip_without_services() {
        return;
    }
    let server = start(Some(256), |_| {}).await;
    let port = server.port;
    let limits = server
        .process
        .wait_for_log(&["connection limits", "open_file_limit=256"])
        .await;
    assert!(limits.contains("max_connections=128"), "{limits}");

    let mut streams = Vec::new();
    let mut refused = 0;
    for _ in 0..200 {
        let stream = open_stream(port).await;
        match stream.status {
            200 => streams.push(stream),
            503 => refused += 1,
            other => unreachable!("stream answered {other}: {}", stream.head),
        }
        if streams.len() % 16 == 0 {
            assert_eq!(get(port, "/healthz").await.0, 200);
        }
    }
    assert_eq!(streams.len(), 128);
    assert_eq!(refused, 72);

    // Idle connections that never send a head take the rest of the descriptors; each new
    // one displaces the oldest of them, so a health check still gets through. A burst can
    // still run the process out of descriptors for a moment: accepts fail, and are logged
    // at a bounded rate.
    let mut idle = Vec::new();
    for _ in 0..500 {
        idle.push(
            TcpStream::connect(("127.0.0.1", port))
                .await
                .expect("connect"),
        );
    }
    for _ in 0..20 {
        assert_eq!(get(port, "/healthz").await.0, 200);
        assert_eq!(get(port, "/metrics").await.0, 200);
    }
    let (status, ready) = get(port, "/readyz").await;
    assert_eq!(status, 200, "{ready}");

    let accept_failures = server
        .process
        .log()
        .iter()
        .filter(|line| line.contains("accept failed"))
        .count();
    assert!(
        accept_failures <= 3,
        "{accept_failures} accept failures logged"
    );
    drop(idle);
    drop(streams);
}

#[tokio::test]
async fn a_metrics_listener_takes_metrics_off_the_public_port() {
    if skip_without_services() {
        return;
    }
    let metrics_port = free_port();
    let server = start(None, |m| {
        m["server"]["metrics_listener"] =
            serde_json::json!({"host": "127.0.0.1", "port": metrics_port});
    })
    .await;
    let (status, body) = get(server.port, "/metrics").await;
    assert_eq!(status, 404, "{body}");
    let (status, body) = get(metrics_port, "/metrics").await;
    assert_eq!(status, 200);
    assert!(body.contains("fjord_connection_limit "), "{body}");
    assert_eq!(get(metrics_port, "/healthz").await.0, 200);
    assert_eq!(get(metrics_port, "/readyz").await.0, 200);
    assert_eq!(get(metrics_port, "/v1/streams/orders").await.0, 404);

    let metrics_port = free_port();
    let both = start(None, |m| {
        m["server"]["metrics_listener"] = serde_json::json!(
            {"host": "127.0.0.1", "port": metrics_port, "keep_on_public_port": true}
        );
    })
    .await;
    assert_eq!(get(both.port, "/metrics").await.0, 200);
    assert_eq!(get(metrics_port, "/metrics").await.0, 200);
}
