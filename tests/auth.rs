//! Access control against the real server, with keys from `fjord setup` and tokens from
//! `fjord token`, records from real Kafka through real Redis.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::common::*;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use warp::Filter;

fn fjord(args: &[&str], dir: &Path) -> std::process::Output {
    Command::new(workspace_binary("fjord"))
        .args(args)
        .current_dir(dir)
        .output()
        .expect("fjord runs")
}

fn token(dir: &Path, args: &[&str]) -> String {
    let output = fjord(&[&["token"], args].concat(), dir);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout)
        .expect("utf-8")
        .trim()
        .to_owned()
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs()
}

/// A token with any claims, signed with the key `fjord setup` wrote into `dir`.
fn sign(dir: &Path, claims: &serde_json::Value) -> String {
    let pem = std::fs::read(dir.join("fjord-private.pem")).expect("private key");
    let key = jsonwebtoken::EncodingKey::from_ed_pem(&pem).expect("key");
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::EdDSA),
        claims,
        &key,
    )
    .expect("sign")
}

struct AuthServer {
    topic: String,
    keys_dir: tempfile::TempDir,
    server: Server,
    _consumer: Process,
}

async fn start(edit_auth: impl FnOnce(&mut serde_json::Value)) -> AuthServer {
    let services = services();
    let keys_dir = tempfile::tempdir().expect("dir");
    let output = fjord(&["setup"], keys_dir.path());
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let skeleton: serde_json::Value = serde_json::from_slice(
        &std::fs::read(keys_dir.path().join("manifest.json")).expect("skeleton"),
    )
    .expect("json");
    let mut auth = skeleton["auth"].clone();
    let public_pem =
        std::fs::read_to_string(keys_dir.path().join("fjord-public.pem")).expect("public key");
    assert_eq!(
        auth["keys"][0]["pem"], public_pem,
        "the skeleton carries the public key inline"
    );
    auth["leeway_secs"] = 0.into();
    auth["allow_query_token"] = true.into();
    edit_auth(&mut auth);

    let topic = unique("secured");
    create_topic(&services.brokers, &topic, 2).await;
    let drivers = unique("drivers");
    create_topic(&services.brokers, &drivers, 1).await;
    let server = ServerStart::new()
        .endpoints(&[("orders", &topic), ("drivers", &drivers)])
        .start(|manifest| manifest["auth"] = auth)
        .await;
    let consumer = Process::consumer(&server.path, &[]);
    AuthServer {
        topic,
        keys_dir,
        server,
        _consumer: consumer,
    }
}

impl AuthServer {
    fn url(&self, path: &str) -> String {
        self.server.url(path)
    }

    fn token(&self, args: &[&str]) -> String {
        token(self.keys_dir.path(), args)
    }

    async fn refusal(&self, path: &str, headers: &[(&str, &str)]) -> (u16, String) {
        let (status, body) = self.raw_refusal(path, headers).await;
        (
            status,
            body["error"]["code"].as_str().expect("code").to_owned(),
        )
    }

    async fn raw_refusal(&self, path: &str, headers: &[(&str, &str)]) -> (u16, serde_json::Value) {
        let mut request = reqwest::Client::new().get(self.url(path));
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let response = request.send().await.expect("response");
        let status = response.status().as_u16();
        let challenge = response.headers().get("www-authenticate").is_some();
        let body: serde_json::Value = response.json().await.expect("JSON error");
        assert_eq!(challenge, status == 401, "401s carry WWW-Authenticate");
        (status, body)
    }
}

#[tokio::test]
async fn setup_refuses_to_overwrite_its_keys() {
    let dir = tempfile::tempdir().expect("dir");
    assert!(fjord(&["setup"], dir.path()).status.success());
    for file in [
        "fjord-private.pem",
        "fjord-public.pem",
        "manifest.json",
        "manifest.schema.json",
    ] {
        assert!(dir.path().join(file).exists(), "{file}");
    }
    let again = fjord(&["setup"], dir.path());
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("never overwrites"));
    let check = fjord(&["check", "manifest.json"], dir.path());
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );
}

#[test]
fn cli_results_are_plain_output_and_a_failure_is_one_line() {
    let dir = tempfile::tempdir().expect("dir");
    let setup = fjord(&["setup"], dir.path());
    let said = String::from_utf8_lossy(&setup.stdout);
    assert!(
        said.contains("wrote ") && said.contains("manifest.json"),
        "{said}"
    );
    let check = fjord(&["check", "manifest.json"], dir.path());
    assert_eq!(
        String::from_utf8_lossy(&check.stdout),
        "manifest.json is valid\n"
    );

    std::fs::write(dir.path().join("broken.json"), "{").expect("write");
    let broken = Command::new(workspace_binary("fjord"))
        .args(["check", "broken.json"])
        .current_dir(dir.path())
        .env("RUST_BACKTRACE", "1")
        .output()
        .expect("fjord runs");
    assert_eq!(broken.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&broken.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.starts_with("error: broken.json"), "{stderr}");
    let verbose = Command::new(workspace_binary("fjord"))
        .args(["check", "broken.json", "--verbose"])
        .current_dir(dir.path())
        .env("RUST_BACKTRACE", "1")
        .output()
        .expect("fjord runs");
    assert!(String::from_utf8_lossy(&verbose.stderr).contains("backtrace"));
}

#[tokio::test]
async fn setup_writes_a_private_key_that_openssl_and_node_read() {
    let dir = tempfile::tempdir().expect("dir");
    assert!(fjord(&["setup"], dir.path()).status.success());
    let key = dir.path().join("fjord-private.pem");
    let openssl = Command::new("openssl")
        .args(["pkey", "-noout", "-in"])
        .arg(&key)
        .output()
        .expect("openssl runs (ci/services.sh installs it)");
    assert!(
        openssl.status.success(),
        "openssl refuses the key: {}",
        String::from_utf8_lossy(&openssl.stderr)
    );
    // Node is optional on a developer's machine; CI has it for the client tests.
    if Command::new("node").arg("--version").output().is_ok() {
        let node = Command::new("node")
            .args([
                "-e",
                "require('crypto').createPrivateKey(require('fs').readFileSync(process.argv[1]))",
            ])
            .arg(&key)
            .output()
            .expect("node runs");
        assert!(
            node.status.success(),
            "node refuses the key: {}",
            String::from_utf8_lossy(&node.stderr)
        );
    }
}

#[tokio::test]
async fn the_server_refuses_an_hs256_secret_shorter_than_32_bytes() {
    if skip_without_services() {
        return;
    }
    let services = services();
    let port = free_port();
    let mut manifest = manifest(
        &services,
        &[("orders", "orders-unused")],
        &unique("group"),
        port,
    );
    manifest["auth"] = serde_json::json!({
        "mode": "jwt", "algorithms": ["HS256"], "hs256_secret_env": "FJORD_TEST_HS256_SECRET"
    });
    let (_dir, path) = write_manifest(&manifest);
    let short = "s3cr3t-but-only-31-bytes-long!!";
    assert_eq!(short.len(), 31);
    for secret in ["", short] {
        let mut server = Process::start(
            &server_binary(),
            &["--manifest", path.to_str().expect("utf-8")],
            &[("FJORD_TEST_HS256_SECRET", secret)],
        );
        assert_ne!(server.wait_exit().await, Some(0), "{} bytes", secret.len());
        let log = server.log().join("\n");
        assert!(
            log.contains("$.auth.hs256_secret_env")
                && log.contains("FJORD_TEST_HS256_SECRET")
                && log.contains("32 random bytes"),
            "{log}"
        );
        assert!(
            secret.is_empty() || !log.contains(secret),
            "the secret reached the log"
        );
    }
}

#[tokio::test]
async fn bad_tokens_are_refused_with_their_reason_and_never_logged() {
    if skip_without_services() {
        return;
    }
    let server = start(|_| {}).await;
    let other_keys = tempfile::tempdir().expect("dir");
    assert!(fjord(&["setup"], other_keys.path()).status.success());
    let foreign = token(other_keys.path(), &["--endpoint", "orders"]);
    let expired = sign(
        server.keys_dir.path(),
        &serde_json::json!({
            "iss": "fjord-setup", "aud": "fjord", "exp": now() - 60, "fjord": {"endpoints": ["orders"]}
        }),
    );
    let not_yet = sign(
        server.keys_dir.path(),
        &serde_json::json!({
            "iss": "fjord-setup", "aud": "fjord", "exp": now() + 600, "nbf": now() + 300, "fjord": {"endpoints": ["orders"]}
        }),
    );
    let elsewhere = server.token(&["--endpoint", "orders", "--audience", "another-service"]);
    type Headers<'a> = Vec<(&'a str, String)>;
    let cases: Vec<(Headers<'_>, (u16, &str))> = vec![
        (vec![], (401, "token_missing")),
        (
            vec![("authorization", "Bearer garbage".into())],
            (401, "token_malformed"),
        ),
        (
            vec![(
                "authorization",
                format!(
                    "Bearer {}.{}",
                    URL_SAFE_NO_PAD.encode(r#"{"alg":"EdDSA","kid":7}"#),
                    foreign.split_once('.').expect("a JWT").1
                ),
            )],
            (401, "token_header"),
        ),
        (
            vec![("authorization", format!("Bearer {foreign}"))],
            (401, "token_signature"),
        ),
        (
            vec![("authorization", format!("Bearer {expired}"))],
            (401, "token_expired"),
        ),
        (
            vec![("authorization", format!("Bearer {elsewhere}"))],
            (401, "token_audience"),
        ),
    ];
    for (headers, expected) in cases {
        let headers: Vec<(&str, &str)> = headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
        let got = server.refusal("/v1/streams/orders", &headers).await;
        assert_eq!((got.0, got.1.as_str()), expected, "{headers:?}");
    }
    // An unauthenticated caller learns nothing about which endpoints exist.
    assert_eq!(
        server.refusal("/v1/streams/secret-plans", &[]).await,
        (401, "token_missing".into())
    );
    let log = server.server.process.log().join("\n");
    for secret in [&foreign, &expired, &not_yet, &elsewhere] {
        assert!(!log.contains(secret.as_str()), "a token reached the log");
    }
}

#[tokio::test]
async fn a_token_opens_its_endpoints_and_only_its_pinned_keys() {
    if skip_without_services() {
        return;
    }
    let server = start(|_| {}).await;
    let driver = server.token(&[
        "--sub",
        "driver-42",
        "--endpoint",
        "orders",
        "--key",
        "driver-42",
    ]);
    let bearer = format!("Bearer {driver}");
    let auth = [("authorization", bearer.as_str())];
    // The same answer for an endpoint that exists and one that does not: a narrow token
    // cannot list the endpoints.
    let existing = server.raw_refusal("/v1/streams/drivers", &auth).await;
    assert_eq!(existing.0, 403);
    assert_eq!(existing.1["error"]["code"], "forbidden");
    let unknown = server.raw_refusal("/v1/streams/dr1vers", &auth).await;
    let masked = |(status, body): (u16, serde_json::Value)| {
        (
            status,
            body.to_string()
                .replace("drivers", "NAME")
                .replace("dr1vers", "NAME"),
        )
    };
    assert_eq!(masked(existing), masked(unknown));
    assert_eq!(
        server
            .refusal("/v1/streams?endpoint=orders&endpoint=nope", &auth)
            .await,
        (403, "forbidden".into())
    );
    assert_eq!(
        server
            .refusal("/v1/streams?endpoint=orders&endpoint=drivers", &auth)
            .await,
        (403, "forbidden".into())
    );
    assert_eq!(
        server
            .refusal("/v1/streams/orders?key=driver-7", &auth)
            .await,
        (403, "forbidden".into())
    );

    let mut pinned = SseStream::connect(&server.url("/v1/streams/orders"), &auth).await;
    assert_eq!(pinned.status, 200);
    pinned.next().await.expect("prelude");
    let cookie = format!("fjord_token={driver}");
    let mut by_cookie = SseStream::connect(
        &server.url("/v1/streams/orders?key=driver-42"),
        &[("cookie", &cookie)],
    )
    .await;
    assert_eq!(by_cookie.status, 200);
    by_cookie.next().await.expect("prelude");
    let mut by_query = SseStream::connect(
        &server.url(&format!("/v1/streams/orders?access_token={driver}")),
        &[],
    )
    .await;
    assert_eq!(by_query.status, 200);
    by_query.next().await.expect("prelude");

    let records: Vec<TestRecord> = (0..60)
        .map(|n| TestRecord {
            partition: n % 2,
            key: Some(if n % 3 == 0 {
                b"driver-42".to_vec()
            } else {
                format!("driver-{n}").into_bytes()
            }),
            value: Some(format!(r#"{{"n":{n}}}"#).into_bytes()),
        })
        .collect();
    let produced = produce(&services().brokers, &server.topic, &records).await;
    let expected: Vec<(i32, i64)> = records
        .iter()
        .zip(&produced)
        .filter(|(record, _)| record.key.as_deref() == Some(b"driver-42"))
        .map(|(_, placed)| *placed)
        .collect();
    for stream in [&mut pinned, &mut by_cookie, &mut by_query] {
        let events = stream.records(expected.len()).await;
        assert!(events.iter().all(|e| e.json()["key"] == "driver-42"));
        assert_complete_and_ordered(&events, &expected);
    }
}

#[tokio::test]
async fn a_token_s_filter_holds_whatever_the_query_asks() {
    if skip_without_services() {
        return;
    }
    let server = start(|_| {}).await;
    let pinned = server.token(&["--endpoint", "orders", "--filter", "orders=value.n >= 30"]);
    let bearer = format!("Bearer {pinned}");
    let auth = [("authorization", bearer.as_str())];
    let mut narrowed = SseStream::connect(
        &server.url("/v1/streams/orders?filter=value.n+%3C+45"),
        &auth,
    )
    .await;
    let mut widened =
        SseStream::connect(&server.url("/v1/streams/orders?filter=true"), &auth).await;
    for stream in [&mut narrowed, &mut widened] {
        assert_eq!(stream.status, 200);
        stream.next().await.expect("prelude");
    }
    let records: Vec<TestRecord> = (0..60)
        .map(|n| TestRecord {
            partition: n % 2,
            key: Some(format!("order-{n}").into_bytes()),
            value: Some(format!(r#"{{"n":{n}}}"#).into_bytes()),
        })
        .collect();
    let produced = produce(&services().brokers, &server.topic, &records).await;
    let within = |range: std::ops::Range<i32>| -> Vec<(i32, i64)> {
        (0..60)
            .zip(&produced)
            .filter(|(n, _)| range.contains(n))
            .map(|(_, placed)| *placed)
            .collect()
    };
    let events = narrowed.records(15).await;
    assert_complete_and_ordered(&events, &within(30..45));
    let events = widened.records(30).await;
    assert_complete_and_ordered(&events, &within(30..60));
    // A resume replays through the token's filter too.
    let after = events[9].id.clone().expect("an id");
    let mut resumed = SseStream::connect(
        &server.url("/v1/streams/orders?filter=value.n+%3E%3D+0"),
        &[
            ("authorization", bearer.as_str()),
            ("last-event-id", after.as_str()),
        ],
    )
    .await;
    assert_eq!(resumed.status, 200);
    let ids = |events: &[SseEvent]| -> Vec<Option<String>> {
        events.iter().map(|event| event.id.clone()).collect()
    };
    assert_eq!(ids(&resumed.records(20).await), ids(&events[10..]));
    let (status, code) = server
        .refusal("/v1/streams/orders?filter=value.n+%3E", &auth)
        .await;
    assert_eq!((status, code.as_str()), (400, "bad_filter"));
}

#[tokio::test]
async fn a_stream_is_closed_with_expired_when_its_token_runs_out() {
    if skip_without_services() {
        return;
    }
    let server = start(|_| {}).await;
    let short = server.token(&["--endpoint", "*", "--ttl", "2"]);
    let bearer = format!("Bearer {short}");
    let mut stream = SseStream::connect(
        &server.url("/v1/streams/orders"),
        &[("authorization", &bearer)],
    )
    .await;
    assert_eq!(stream.status, 200);
    let mut saw_expired = false;
    while let Some(event) = stream.next().await {
        if event.event.as_deref() == Some("fjord.expired") {
            saw_expired = true;
        }
    }
    assert!(saw_expired, "the stream ended with fjord.expired");
}

#[tokio::test]
async fn a_stream_admitted_within_the_leeway_is_cut_at_exp_plus_leeway_not_before() {
    if skip_without_services() {
        return;
    }
    const LEEWAY: u64 = 4;
    let server = start(|auth| auth["leeway_secs"] = LEEWAY.into()).await;
    // Expired a second ago: admitted only thanks to the leeway.
    let exp = now() - 1;
    let token = sign(
        server.keys_dir.path(),
        &serde_json::json!({
            "iss": "fjord-setup", "aud": "fjord", "exp": exp, "fjord": {"endpoints": ["orders"]}
        }),
    );
    let bearer = format!("Bearer {token}");
    let mut stream = SseStream::connect(
        &server.url("/v1/streams/orders"),
        &[("authorization", &bearer)],
    )
    .await;
    assert_eq!(stream.status, 200, "admitted within the leeway");
    let mut expired_at = None;
    while let Some(event) = stream.next().await {
        if event.event.as_deref() == Some("fjord.expired") {
            expired_at = Some(now());
        }
    }
    let expired_at = expired_at.expect("the stream ended with fjord.expired");
    assert!(
        expired_at >= exp + LEEWAY,
        "cut at {expired_at}, before exp + leeway = {}",
        exp + LEEWAY
    );
}

#[tokio::test]
async fn jwks_keys_are_fetched_again_for_an_unknown_key_id_but_not_on_every_request() {
    if skip_without_services() {
        return;
    }
    use ed25519_dalek::pkcs8::DecodePublicKey;

    let jwks_dir = tempfile::tempdir().expect("dir");
    assert!(fjord(&["setup"], jwks_dir.path()).status.success());
    let public = ed25519_dalek::VerifyingKey::read_public_key_pem_file(
        jwks_dir.path().join("fjord-public.pem"),
    )
    .expect("public key");
    let jwk = serde_json::json!({
        "kty": "OKP", "crv": "Ed25519", "alg": "EdDSA", "kid": "rotated",
        "x": URL_SAFE_NO_PAD.encode(public.as_bytes())
    });
    // The identity provider publishes the rotated key only after the server started.
    let published = Arc::new(std::sync::Mutex::new(serde_json::json!({"keys": []})));
    let fetches = Arc::new(AtomicUsize::new(0));
    let (jwks_published, jwks_fetches) = (Arc::clone(&published), Arc::clone(&fetches));
    let route = warp::path!("jwks.json").map(move || {
        jwks_fetches.fetch_add(1, Ordering::SeqCst);
        warp::reply::json(&*jwks_published.lock().expect("lock"))
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let jwks_url = format!(
        "http://{}/jwks.json",
        listener.local_addr().expect("address")
    );
    tokio::spawn(warp::serve(route).incoming(listener).run());

    let server = start(|auth| auth["jwks_url"] = jwks_url.clone().into()).await;
    let rotated = token(
        jwks_dir.path(),
        &["--endpoint", "orders", "--key-id", "rotated"],
    );
    let bearer = format!("Bearer {rotated}");
    let auth = [("authorization", bearer.as_str())];
    for _ in 0..20 {
        assert_eq!(
            server.refusal("/v1/streams/orders", &auth).await,
            (401, "token_unknown_key".into())
        );
    }
    assert!(
        fetches.load(Ordering::SeqCst) <= 2,
        "unknown key ids do not hammer the JWKS endpoint"
    );
    *published.lock().expect("lock") = serde_json::json!({"keys": [jwk]});
    wait_until_async("the rotated key is accepted", || async {
        SseStream::connect(&server.url("/v1/streams/orders"), &auth)
            .await
            .status
            == 200
    })
    .await;
}
