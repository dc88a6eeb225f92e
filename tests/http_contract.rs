//! The HTTP contract of `fjord-server` against real Redis: CORS, heartbeats, JSON errors,
//! health, metrics, and a manifest refused before any port is bound.

use crate::common::*;

async fn json_error(response: reqwest::Response) -> (u16, String) {
    let status = response.status().as_u16();
    assert_eq!(response.headers()["content-type"], "application/json");
    let body: serde_json::Value = response.json().await.expect("JSON body");
    (
        status,
        body["error"]["code"]
            .as_str()
            .expect("error code")
            .to_owned(),
    )
}

#[tokio::test]
async fn cors_preflight_allows_listed_origins_only() {
    if skip_without_services() {
        return;
    }
    let server = start_server(|m| {
        m["server"]["cors_origins"] = serde_json::json!(["https://app.example.com"])
    })
    .await;
    let client = reqwest::Client::new();
    let url = format!("http://127.0.0.1:{}/v1/streams/orders", server.port);
    let preflight = |origin: &str| {
        client
            .request(reqwest::Method::OPTIONS, &url)
            .header("origin", origin)
            .header("access-control-request-method", "GET")
            .header(
                "access-control-request-headers",
                "authorization, last-event-id",
            )
            .send()
    };
    let allowed = preflight("https://app.example.com")
        .await
        .expect("response");
    assert_eq!(allowed.status(), 200);
    assert_eq!(
        allowed.headers()["access-control-allow-origin"],
        "https://app.example.com"
    );
    let allowed_headers = allowed.headers()["access-control-allow-headers"]
        .to_str()
        .expect("ascii");
    assert!(allowed_headers.contains("authorization") && allowed_headers.contains("last-event-id"));

    let refused = preflight("https://evil.example.com")
        .await
        .expect("response");
    assert_eq!(json_error(refused).await, (403, "cors_forbidden".into()));

    // Errors carry the CORS headers too, so that the page can read why it was refused.
    let refused = client
        .get(format!("http://127.0.0.1:{}/v1/streams/nope", server.port))
        .header("origin", "https://app.example.com")
        .send()
        .await
        .expect("response");
    assert_eq!(
        refused.headers()["access-control-allow-origin"],
        "https://app.example.com"
    );
    assert_eq!(json_error(refused).await, (404, "unknown_endpoint".into()));

    let stream = SseStream::connect(&url, &[("origin", "https://app.example.com")]).await;
    assert_eq!(stream.status, 200);
    assert_eq!(
        stream.headers["access-control-allow-origin"],
        "https://app.example.com"
    );
}

#[tokio::test]
async fn with_auth_on_a_narrow_token_cannot_tell_which_endpoints_exist() {
    if skip_without_services() {
        return;
    }
    const SECRET: &str = "http-contract-hs256-secret-of-48-random-bytes!!!";
    let services = services();
    let port = free_port();
    let mut manifest = manifest(
        &services,
        &[("orders", "orders-unused"), ("drivers", "drivers-unused")],
        &unique("group"),
        port,
    );
    manifest["auth"] = serde_json::json!({
        "mode": "jwt", "algorithms": ["HS256"], "hs256_secret_env": "FJORD_TEST_HS256_SECRET"
    });
    let (_dir, path) = write_manifest(&manifest);
    let _server = Process::start(
        &server_binary(),
        &["--manifest", path.to_str().expect("utf-8")],
        &[("FJORD_TEST_HS256_SECRET", SECRET)],
    );
    wait_ready(port).await;
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs()
        + 600;
    let token = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &serde_json::json!({"exp": exp, "fjord": {"endpoints": ["orders"]}}),
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .expect("sign");
    let client = reqwest::Client::new();
    let ask = |endpoint: &str| {
        client
            .get(format!("http://127.0.0.1:{port}/v1/streams/{endpoint}"))
            .bearer_auth(&token)
            .send()
    };
    let answer = |response: reqwest::Response, name: &'static str| async move {
        let status = response.status().as_u16();
        let content_type = response.headers()["content-type"].clone();
        let body = response.text().await.expect("body").replace(name, "NAME");
        (status, content_type, body)
    };
    let existing = answer(ask("drivers").await.expect("response"), "drivers").await;
    let unknown = answer(ask("dr1vers").await.expect("response"), "dr1vers").await;
    assert_eq!(existing.0, 403, "{existing:?}");
    assert!(existing.2.contains(r#""code":"forbidden""#), "{existing:?}");
    assert_eq!(existing, unknown);
    // The endpoint the token opens streams.
    let stream = SseStream::connect(
        &format!("http://127.0.0.1:{port}/v1/streams/orders"),
        &[("authorization", &format!("Bearer {token}"))],
    )
    .await;
    assert_eq!(stream.status, 200);
}

#[tokio::test]
async fn heartbeats_arrive_at_the_configured_interval() {
    if skip_without_services() {
        return;
    }
    let server = start_server(|m| m["server"]["heartbeat_secs"] = 1.into()).await;
    let mut stream = SseStream::connect(
        &format!("http://127.0.0.1:{}/v1/streams/orders", server.port),
        &[],
    )
    .await;
    let prelude = stream.next().await.expect("prelude");
    assert_eq!(prelude.retry.as_deref(), Some("2000"));
    assert!(prelude.id.is_some(), "the prelude names the start position");
    for _ in 0..2 {
        let heartbeat = stream.next().await.expect("heartbeat");
        assert_eq!(heartbeat.comment.as_deref(), Some("heartbeat"));
    }
}

#[tokio::test]
async fn bad_requests_get_json_errors_with_the_fitting_status() {
    if skip_without_services() {
        return;
    }
    let server = start_server(|_| {}).await;
    let client = reqwest::Client::new();
    let base = format!("http://127.0.0.1:{}", server.port);
    let get = |path: &str| client.get(format!("{base}{path}")).send();
    assert_eq!(
        json_error(get("/v1/streams/nope").await.expect("response")).await,
        (404, "unknown_endpoint".into())
    );
    assert_eq!(
        json_error(get("/v1/streams?endpoint=nope").await.expect("response")).await,
        (404, "unknown_endpoint".into())
    );
    assert_eq!(
        json_error(get("/v1/streams").await.expect("response")).await,
        (400, "bad_query".into())
    );
    assert_eq!(
        json_error(
            get("/v1/streams/orders?colour=red")
                .await
                .expect("response")
        )
        .await,
        (400, "bad_query".into())
    );
    let bad_resume = client
        .get(format!("{base}/v1/streams/orders"))
        .header("last-event-id", "yesterday")
        .send()
        .await
        .expect("response");
    assert_eq!(
        json_error(bad_resume).await,
        (400, "bad_last_event_id".into())
    );
    assert_eq!(
        json_error(get("/nothing/here").await.expect("response")).await,
        (404, "not_found".into())
    );
    let post = client
        .post(format!("{base}/v1/streams/orders"))
        .send()
        .await
        .expect("response");
    assert_eq!(json_error(post).await.0, 405);

    // Headers beyond what the server buffers are refused, not a crash.
    let mut huge = client.get(format!("{base}/v1/streams/orders"));
    for i in 0..200 {
        huge = huge.header(format!("x-filler-{i}"), "x".repeat(100));
    }
    let status = huge.send().await.map(|r| r.status().as_u16());
    assert!(matches!(status, Ok(431) | Err(_)), "{status:?}");
    // And the server still serves.
    assert_eq!(get("/healthz").await.expect("response").status(), 200);
}

#[tokio::test]
async fn health_readiness_and_metrics() {
    if skip_without_services() {
        return;
    }
    let server = start_server(|_| {}).await;
    let client = reqwest::Client::new();
    let base = format!("http://127.0.0.1:{}", server.port);
    assert_eq!(
        client
            .get(format!("{base}/healthz"))
            .send()
            .await
            .expect("response")
            .status(),
        200
    );
    assert_eq!(
        client
            .get(format!("{base}/readyz"))
            .send()
            .await
            .expect("response")
            .status(),
        200
    );
    let stream = SseStream::connect(&format!("{base}/v1/streams/orders"), &[]).await;
    let metrics = client
        .get(format!("{base}/metrics"))
        .send()
        .await
        .expect("response");
    assert!(
        metrics.headers()["content-type"]
            .to_str()
            .expect("ascii")
            .starts_with("text/plain")
    );
    let text = metrics.text().await.expect("body");
    for name in [
        "fjord_open_connections 1",
        "fjord_records_in_total",
        "fjord_events_out_total",
        "fjord_clients_dropped_total",
        "fjord_bus_lag_seconds",
    ] {
        assert!(text.contains(name), "{name} missing from:\n{text}");
    }

    // A client that goes away is noticed at once, with no event or heartbeat to write.
    drop(stream);
    wait_until_async("the closed stream to be counted out", || async {
        let text = reqwest::get(format!("{base}/metrics"))
            .await
            .expect("response")
            .text()
            .await
            .expect("body");
        text.contains("fjord_open_connections 0")
    })
    .await;
}

#[tokio::test]
async fn an_http_1_0_client_gets_a_stream_that_ends_with_the_connection() {
    if skip_without_services() {
        return;
    }
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let server = start_server(|_| {}).await;
    let mut socket = tokio::net::TcpStream::connect(("127.0.0.1", server.port))
        .await
        .expect("connect");
    socket
        .write_all(b"GET /v1/streams/orders HTTP/1.0\r\n\r\n")
        .await
        .expect("request");
    let mut received = Vec::new();
    while !received.ends_with(b"\n\n") {
        let mut chunk = [0_u8; 1024];
        let n = socket.read(&mut chunk).await.expect("read");
        assert!(
            n > 0,
            "closed early: {}",
            String::from_utf8_lossy(&received)
        );
        received.extend_from_slice(&chunk[..n]);
    }
    let text = String::from_utf8(received).expect("utf-8");
    let (head, body) = text.split_once("\r\n\r\n").expect("a head");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.contains("connection: close") && !head.contains("chunked"),
        "{head}"
    );
    // Not chunked: the prelude arrives as plain SSE.
    assert!(body.starts_with("retry: "), "{body}");
}

#[tokio::test]
async fn a_malformed_manifest_fails_with_its_path_before_binding() {
    if skip_without_services() {
        return;
    }
    let services = services();
    let port = free_port();
    let mut manifest = manifest(&services, &[("orders", "orders")], "group", port);
    manifest["server"]["heartbeat_secs"] = 0.into();
    let (_dir, path) = write_manifest(&manifest);
    for binary in [&server_binary(), &workspace_binary("fjord-consumer")] {
        let mut process =
            Process::start(binary, &["--manifest", path.to_str().expect("utf-8")], &[]);
        assert_ne!(process.wait_exit().await, Some(0));
        let log = process.log().join("\n");
        assert!(log.contains("$.server.heartbeat_secs"), "{log}");
        assert!(log.contains("manifest.json"), "{log}");
    }
    std::net::TcpListener::bind(("127.0.0.1", port)).expect("the port was never bound");

    let (_dir, broken) = {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("manifest.json");
        std::fs::write(&path, r#"{"kafka": {"brokers": ["k:9092"]}, "redis": {"url": "redis://r"}, "endpoints": {"a": {"topics": ["t"], "colour": 1}}}"#)
            .expect("write");
        (dir, path)
    };
    let mut process = Process::server(&broken);
    assert_ne!(process.wait_exit().await, Some(0));
    let log = process.log().join("\n");
    assert!(
        log.contains("$.endpoints.a") && log.contains("colour"),
        "{log}"
    );
}

/// Sends `request` on a new connection and reads until the server closes it.
async fn exchange(port: u16, request: &str) -> String {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut socket = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    socket.write_all(request.as_bytes()).await.expect("request");
    let mut received = Vec::new();
    tokio::time::timeout(PATIENCE, socket.read_to_end(&mut received))
        .await
        .expect("the server closes the connection")
        .expect("read");
    String::from_utf8(received).expect("utf-8")
}

#[tokio::test]
async fn head_is_answered_like_get_without_a_body() {
    if skip_without_services() {
        return;
    }
    let server = start_server(|_| {}).await;
    for path in ["/healthz", "/readyz", "/metrics"] {
        let response = exchange(
            server.port,
            &format!("HEAD {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),
        )
        .await;
        let (head, body) = response.split_once("\r\n\r\n").expect("a head");
        assert!(head.starts_with("HTTP/1.1 200"), "{path}: {head}");
        assert!(head.contains("content-length: "), "{path}: {head}");
        assert_eq!(body, "", "{path}");
    }
    // A stream's HEAD is checked like its GET and gets the same head, then the connection
    // closes: no stream is opened.
    let response = exchange(
        server.port,
        "HEAD /v1/streams/orders HTTP/1.1\r\nHost: x\r\n\r\n",
    )
    .await;
    let (head, body) = response.split_once("\r\n\r\n").expect("a head");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.contains("content-type: text/event-stream"), "{head}");
    assert_eq!(body, "");
    let response = exchange(
        server.port,
        "HEAD /v1/streams/nope HTTP/1.1\r\nHost: x\r\n\r\n",
    )
    .await;
    let (head, body) = response.split_once("\r\n\r\n").expect("a head");
    assert!(head.starts_with("HTTP/1.1 404"), "{head}");
    assert_eq!(body, "");
    let text = reqwest::get(format!("http://127.0.0.1:{}/metrics", server.port))
        .await
        .expect("response")
        .text()
        .await
        .expect("body");
    assert!(text.contains("fjord_open_connections 0"), "{text}");
}

#[tokio::test]
async fn absolute_form_targets_are_served_like_their_paths() {
    if skip_without_services() {
        return;
    }
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let server = start_server(|_| {}).await;
    let port = server.port;
    let response = exchange(
        port,
        &format!("GET http://127.0.0.1:{port}/healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"),
    )
    .await;
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");

    let mut socket = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    socket
        .write_all(
            b"GET http://fjord.example/v1/streams/orders?key=a HTTP/1.1\r\nHost: fjord.example\r\n\r\n",
        )
        .await
        .expect("request");
    let mut received = Vec::new();
    while !String::from_utf8_lossy(&received).contains("retry: ") {
        let mut chunk = [0_u8; 1024];
        let n = socket.read(&mut chunk).await.expect("read");
        assert!(n > 0, "closed: {}", String::from_utf8_lossy(&received));
        received.extend_from_slice(&chunk[..n]);
    }
    let text = String::from_utf8_lossy(&received);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.contains("content-type: text/event-stream"), "{text}");
}

#[tokio::test]
async fn cors_star_sends_a_literal_star_without_credentials() {
    if skip_without_services() {
        return;
    }
    let server = start_server(|m| m["server"]["cors_origins"] = serde_json::json!(["*"])).await;
    let url = format!("http://127.0.0.1:{}/v1/streams/orders", server.port);
    let stream = SseStream::connect(&url, &[("origin", "https://anyone.example")]).await;
    assert_eq!(stream.status, 200);
    assert_eq!(stream.headers["access-control-allow-origin"], "*");
    assert!(
        !stream
            .headers
            .contains_key("access-control-allow-credentials")
    );
    let client = reqwest::Client::new();
    let preflight = client
        .request(reqwest::Method::OPTIONS, &url)
        .header("origin", "https://anyone.example")
        .header("access-control-request-method", "GET")
        .send()
        .await
        .expect("response");
    assert_eq!(preflight.status(), 200);
    assert_eq!(preflight.headers()["access-control-allow-origin"], "*");
    assert!(
        !preflight
            .headers()
            .contains_key("access-control-allow-credentials")
    );
    let health = client
        .get(format!("http://127.0.0.1:{}/healthz", server.port))
        .header("origin", "https://anyone.example")
        .send()
        .await
        .expect("response");
    assert_eq!(health.headers()["access-control-allow-origin"], "*");
}

#[tokio::test]
async fn listed_origins_get_credentials_in_cookie_mode_and_refusals_are_logged() {
    if skip_without_services() {
        return;
    }
    let server = start_server(|m| {
        m["server"]["cors_origins"] = serde_json::json!(["https://app.example.com"]);
        m["auth"] = serde_json::json!({
            "mode": "jwt", "algorithms": ["RS256"], "jwks_url": "https://127.0.0.1:9/jwks",
            "token_cookie": "fjord_token"
        });
    })
    .await;
    let url = format!("http://127.0.0.1:{}/v1/streams/orders", server.port);
    let origin = "https://app.example.com";
    let client = reqwest::Client::new();
    // Without a token: a 401, which a page on the origin may read, cookies and all.
    let refused = client
        .get(&url)
        .header("origin", origin)
        .send()
        .await
        .expect("response");
    let headers = refused.headers().clone();
    assert_eq!(json_error(refused).await.0, 401);
    assert_eq!(headers["access-control-allow-origin"], origin);
    assert_eq!(headers["access-control-allow-credentials"], "true");
    assert_eq!(headers["vary"], "origin");
    let preflight = client
        .request(reqwest::Method::OPTIONS, &url)
        .header("origin", origin)
        .header("access-control-request-method", "GET")
        .header("access-control-request-headers", "last-event-id")
        .send()
        .await
        .expect("response");
    assert_eq!(preflight.status(), 200);
    assert_eq!(preflight.headers()["access-control-allow-origin"], origin);
    assert_eq!(
        preflight.headers()["access-control-allow-credentials"],
        "true"
    );
    assert_eq!(preflight.headers()["vary"], "origin");

    // A page on an origin not listed is refused, and the log says which and what is listed.
    let stranger = client
        .get(&url)
        .header("origin", "http://127.0.0.1:5173")
        .send()
        .await
        .expect("response");
    assert_eq!(json_error(stranger).await, (403, "cors_forbidden".into()));
    let line = server
        .process
        .wait_for_log(&[
            "http://127.0.0.1:5173",
            "https://app.example.com",
            "cors_origins",
        ])
        .await;
    assert!(line.contains("WARN"), "{line}");
    // At a bounded rate: a flood of refusals adds no line within the interval.
    for _ in 0..20 {
        let _ = client
            .get(&url)
            .header("origin", "http://127.0.0.1:5173")
            .send()
            .await
            .expect("response");
    }
    let lines = server
        .process
        .log()
        .iter()
        .filter(|line| line.contains("http://127.0.0.1:5173"))
        .count();
    assert_eq!(lines, 1);
}
