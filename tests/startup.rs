//! What the binaries do and say as they start, run as a user runs them: the manifest that
//! `fjord setup` writes delivers the first record; `fjord dev`'s `/readyz` waits for its
//! consumer, says what it connects to and gives up on what does not answer; an error's
//! cause is printed once; `fjord check` lists every problem; and no configuration error
//! of any binary echoes a secret or the userinfo of a URL.
#![allow(clippy::unwrap_used, clippy::panic, reason = "a test fails loudly")]

use std::io::Read as _;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use crate::common::*;

/// What a command that ran to its end printed.
#[derive(Debug)]
struct Finished {
    code: Option<i32>,
    stdout: String,
    stderr: String,
    took: Duration,
}

impl Finished {
    fn output(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }
}

/// Runs `binary` to its end, all of its output captured; fails if it runs past `patience`.
fn run(binary: &str, args: &[&str], envs: &[(&str, &str)], patience: Duration) -> Finished {
    let started = Instant::now();
    let mut child = Command::new(binary)
        .args(args)
        .envs(envs.iter().copied())
        .env("RUST_LOG", "debug")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|error| panic!("start {binary}: {error}"));
    let drain = |mut pipe: Box<dyn std::io::Read + Send>| {
        std::thread::spawn(move || {
            let mut text = String::new();
            let _ = pipe.read_to_string(&mut text);
            text
        })
    };
    let stdout = drain(Box::new(child.stdout.take().unwrap()));
    let stderr = drain(Box::new(child.stderr.take().unwrap()));
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > patience {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{binary} {args:?} still ran after {patience:?}; it said:\n{}{}",
                stdout.join().unwrap(),
                stderr.join().unwrap()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Finished {
        code: status.code(),
        took: started.elapsed(),
        stdout: stdout.join().unwrap(),
        stderr: stderr.join().unwrap(),
    }
}

/// `time` as tracing's log lines write it, `2026-12-07T01:36:14.123456Z`, so that the two
/// compare as strings (formatted by `date`).
fn log_time(time: SystemTime) -> String {
    let since = time.duration_since(SystemTime::UNIX_EPOCH).unwrap();
    let at = format!("@{}.{:09}", since.as_secs(), since.subsec_nanos());
    let date = Command::new("date")
        .args(["-u", "-d", &at, "+%Y-%m-%dT%H:%M:%S.%6NZ"])
        .output()
        .unwrap();
    assert!(date.status.success(), "date: {date:?}");
    String::from_utf8(date.stdout).unwrap().trim().to_owned()
}

/// setup → server → `/readyz` 200 → a client connects → a record is produced, and only
/// then the consumer's group has joined: the record arrives. With the group at `latest`, as
/// `fjord setup` wrote it, a record produced while the group was joining was never read.
#[tokio::test]
async fn the_manifest_of_fjord_setup_delivers_the_first_record() {
    if skip_without_services() {
        return;
    }
    let services = services();
    let dir = tempfile::tempdir().unwrap();
    let fjord = workspace_binary("fjord");
    let setup = run(
        &fjord,
        &["setup", "--dir", dir.path().to_str().unwrap()],
        &[],
        PATIENCE,
    );
    assert_eq!(setup.code, Some(0), "{}", setup.output());

    // Pointed at the test's Kafka, Redis, topic and port; everything else as written.
    let path = dir.path().join("manifest.json");
    let mut manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let topic = unique("setup");
    let port = free_port();
    manifest["kafka"]["brokers"] = serde_json::json!([services.brokers]);
    manifest["redis"] = redis_section(&services, &unique("setup"));
    manifest["endpoints"]["orders"]["topics"] = serde_json::json!([topic]);
    manifest["consumer_groups"][0]["topics"] = serde_json::json!([topic]);
    manifest["consumer_groups"][0]["id"] = unique("setup").into();
    manifest["server"]["port"] = port.into();
    std::fs::write(&path, manifest.to_string()).unwrap();
    create_topic(&services.brokers, &topic, 1).await;

    let mut server = Process::server(&path);
    server.wait_ready(port).await;
    let private_key = dir.path().join("fjord-private.pem");
    let token = run(
        &fjord,
        &[
            "token",
            "--private-key",
            private_key.to_str().unwrap(),
            "--endpoint",
            "orders",
        ],
        &[],
        PATIENCE,
    );
    assert_eq!(token.code, Some(0), "{}", token.output());
    let bearer = format!("Bearer {}", token.stdout.trim());
    let mut stream = SseStream::connect(
        &format!("http://127.0.0.1:{port}/v1/streams/orders"),
        &[("authorization", &bearer)],
    )
    .await;
    assert_eq!(stream.status, 200);
    let produced = produce(
        &services.brokers,
        &topic,
        &[TestRecord {
            partition: 0,
            key: Some(b"order-1".to_vec()),
            value: Some(br#"{"status":"placed"}"#.to_vec()),
        }],
    )
    .await;
    // The consumer joins after the record was produced: a member slower to join its group
    // than the server is to be ready and the user to produce, as the README's flow allows.
    let _consumer = Process::consumer(&path, &[]);
    let records = tokio::time::timeout(PATIENCE, stream.records(1))
        .await
        .unwrap_or_else(|_| panic!("the first record never arrived ({produced:?})"));
    assert_eq!(records[0].json()["value"]["status"], "placed");
}

/// The local addresses listening on `port`, as `/proc/net/tcp` shows them (hex, in the
/// kernel's byte order: `0100007F` is 127.0.0.1, `00000000` every interface).
fn listening_on(port: u16) -> Vec<String> {
    std::fs::read_to_string("/proc/net/tcp")
        .unwrap()
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (address, local_port) = fields[1].split_once(':')?;
            let listening = fields[3] == "0A";
            (listening && u16::from_str_radix(local_port, 16).ok()? == port)
                .then(|| address.to_owned())
        })
        .collect()
}

/// `fjord-server` with access control off, as the README's manifest has it, listens on
/// loopback only; a manifest that says `server.host` listens where it says, and so does
/// `fjord dev --host 0.0.0.0` (the dev image's command). It used to take every interface.
#[tokio::test]
async fn without_access_control_the_server_listens_on_loopback_unless_told() {
    if skip_without_services() {
        return;
    }
    let services = services();
    for (host, expected) in [(None, "0100007F"), (Some("0.0.0.0"), "00000000")] {
        let port = free_port();
        let mut manifest = manifest(&services, &[("orders", "orders")], "loopback", port);
        match host {
            Some(host) => manifest["server"]["host"] = host.into(),
            None => {
                manifest["server"].as_object_mut().unwrap().remove("host");
            }
        }
        let (_dir, path) = write_manifest(&manifest);
        let mut server = Process::server(&path);
        server.wait_ready(port).await;
        assert_eq!(listening_on(port), [expected], "server.host {host:?}");
    }
    let port = free_port();
    let _dev = Process::start(
        &workspace_binary("fjord"),
        &[
            "dev",
            "--no-demo-producer",
            "--host",
            "0.0.0.0",
            "--port",
            &port.to_string(),
        ],
        &[],
    );
    wait_ready(port).await;
    assert_eq!(listening_on(port), ["00000000"], "fjord dev --host 0.0.0.0");
}

/// `fjord dev`'s `/readyz` says 200 only once its consumer holds its partitions: the
/// "partitions assigned" line is logged before the first 200 is answered.
#[tokio::test]
async fn fjord_dev_is_ready_only_once_its_consumer_holds_partitions() {
    let port = free_port();
    let dev = Process::start(
        &workspace_binary("fjord"),
        &["dev", "--no-demo-producer", "--port", &port.to_string()],
        &[],
    );
    let client = reqwest::Client::new();
    let deadline = Instant::now() + PATIENCE;
    let ready_at = loop {
        let answer = client
            .get(format!("http://127.0.0.1:{port}/readyz"))
            .send()
            .await;
        // When the 200 had arrived: the assignment must have been logged before that.
        let answered = SystemTime::now();
        if answer.is_ok_and(|response| response.status() == 200) {
            break answered;
        }
        assert!(Instant::now() < deadline, "never ready:\n{:?}", dev.log());
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let assigned = dev.wait_for_log(&["partitions assigned"]).await;
    let logged_at = assigned.split_whitespace().next().unwrap().to_owned();
    assert_eq!(logged_at.len(), 27, "a timestamp: {assigned}");
    assert!(
        logged_at <= log_time(ready_at),
        "/readyz said 200 (answered by {}) before the consumer held partitions ({assigned})",
        log_time(ready_at)
    );
}

/// `fjord dev` pointed at a Kafka or a Redis that does not answer says what it connects to
/// before it does, then gives up within a bounded time, naming what did not answer. It used
/// to print nothing for 20 s (Kafka) or retry for ever (Redis).
#[test]
fn fjord_dev_names_what_it_connects_to_and_gives_up_on_what_does_not_answer() {
    let fjord = workspace_binary("fjord");
    for (flag, address, service) in [
        ("--kafka", "127.0.0.1:1", "Kafka"),
        ("--redis", "redis://127.0.0.1:1", "Redis"),
    ] {
        let port = free_port().to_string();
        let dev = run(
            &fjord,
            &["dev", "--no-demo-producer", "--port", &port, flag, address],
            &[],
            Duration::from_secs(60),
        );
        assert_eq!(dev.code, Some(1), "{}", dev.output());
        assert!(
            dev.stdout
                .starts_with(&format!("Connecting to {service} at {address}")),
            "no banner first: {}",
            dev.output()
        );
        assert!(
            dev.stderr.contains(&format!(
                "error: {service} at {address} did not answer within 10 s"
            )),
            "{}",
            dev.output()
        );
        // Ten seconds of patience and the time to stop, with a generous margin.
        assert!(dev.took < Duration::from_secs(30), "took {:?}", dev.took);
    }
}

/// A port already taken is reported with its cause once, by `fjord-server` and `fjord dev`:
/// not "Address already in use (os error 98): Address already in use (os error 98)".
#[test]
fn a_cause_is_printed_once() {
    if skip_without_services() {
        return;
    }
    let services = services();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let manifest = manifest(&services, &[("orders", "orders")], "once", port);
    let (_dir, path) = write_manifest(&manifest);
    let server = run(
        &workspace_binary("fjord-server"),
        &["--manifest", path.to_str().unwrap()],
        &[],
        PATIENCE,
    );
    let dev = run(
        &workspace_binary("fjord"),
        &["dev", "--no-demo-producer", "--port", &port.to_string()],
        &[],
        PATIENCE,
    );
    for outcome in [server, dev] {
        assert_eq!(outcome.code, Some(1), "{}", outcome.output());
        let error = outcome
            .stderr
            .lines()
            .find(|line| line.starts_with("error: "))
            .unwrap_or_else(|| panic!("no error line: {}", outcome.output()));
        assert!(
            error.contains(&format!("cannot listen on 127.0.0.1:{port}")),
            "{error}"
        );
        assert_eq!(
            error.matches("Address already in use").count(),
            1,
            "{error}"
        );
    }
}

/// `fjord check` lists every problem of a manifest, each with its JSON path, in one run:
/// mistakes of form in several sections and out-of-range values alike.
#[test]
fn fjord_check_lists_every_problem() {
    let fjord = workspace_binary("fjord");
    let form = serde_json::json!({
        "kafka": {"brokers": "127.0.0.1:9092"},
        "redis": {"url": "redis://127.0.0.1:6379", "keyprefix": "x"},
        "endpoints": {"orders": {"topics": ["orders"], "start": "newest"}},
        "consumer_groups": [{"id": "g", "topics": ["orders"], "members": "two"}],
        "server": {"port": 70000},
        "auth": {"mode": "disabled"}
    });
    let values = serde_json::json!({
        "kafka": {"brokers": ["no-port"]},
        "redis": {"url": "http://127.0.0.1:6379"},
        "endpoints": {"orders": {"topics": ["orders", "bad topic"]}},
        "consumer_groups": [{"id": "g", "topics": ["orders"], "members": 0}],
        "server": {"heartbeat_secs": 0},
        "auth": {"mode": "jwt", "algorithms": []}
    });
    for (manifest, paths) in [
        (
            form,
            &[
                "$.kafka.brokers",
                "$.redis",
                "$.endpoints.orders.start",
                "$.consumer_groups[0].members",
                "$.server.port",
            ][..],
        ),
        (
            values,
            &[
                "$.kafka.brokers[0]",
                "$.redis.url",
                "$.endpoints.orders.topics[1]",
                "$.consumer_groups[0].members",
                "$.server.heartbeat_secs",
                "$.auth.algorithms",
            ][..],
        ),
    ] {
        let (_dir, path) = write_manifest(&manifest);
        let check = run(&fjord, &["check", path.to_str().unwrap()], &[], PATIENCE);
        assert_eq!(check.code, Some(1), "{}", check.output());
        assert!(
            check.stderr.contains(&format!("{} problems", paths.len())),
            "{}",
            check.stderr
        );
        for json_path in paths {
            assert!(
                check.stderr.contains(&format!("\n  {json_path}")),
                "{json_path} is not listed: {}",
                check.stderr
            );
        }
    }
}

/// A recognisable secret, pasted where it does not belong in every way a user could, never
/// reaches the output of any binary: not the value of a `*_env` field (most often the
/// secret itself), not the userinfo of a URL whatever else is wrong with it, not a value
/// serde quotes in "invalid type: string ..." when a string stands where an object belongs.
/// Every binary that reads a manifest is run on each, from the file and from
/// `FJORD_MANIFEST_JSON`; the deploy tool's pre-flight reads it with the same parser
/// (`fjord_config::Manifest::parse`), tested here through that parser.
#[test]
fn configuration_errors_never_echo_a_secret() {
    const SECRET: &str = "Hunter2-Zq8-pasted-secret";
    let base = serde_json::json!({
        "kafka": {"brokers": ["127.0.0.1:9092"]},
        "redis": {"url": "redis://127.0.0.1:6379"},
        "endpoints": {"orders": {"topics": ["orders"]}},
        "consumer_groups": [{"id": "g", "topics": ["orders"]}],
        "server": {"host": "127.0.0.1", "port": free_port()},
        "auth": {"mode": "disabled"}
    });
    let pem = format!("-----BEGIN PRIVATE KEY-----\n{SECRET}\n-----END PRIVATE KEY-----");
    let cert = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----";
    let jwt = |extra: serde_json::Value| {
        let mut auth = serde_json::json!({"mode": "jwt", "algorithms": ["HS256", "RS256"], "hs256_secret_env": "HS"});
        auth.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        auth
    };
    let cases: Vec<(&str, serde_json::Value)> = vec![
        (
            "/kafka/security",
            serde_json::json!({"protocol": "sasl_plain", "username": "u", "password_env": SECRET}),
        ),
        (
            "/kafka/security",
            serde_json::json!({"protocol": "sasl_scram_sha_512", "username": "u", "password_env": format!("{SECRET} x")}),
        ),
        (
            "/kafka/security",
            serde_json::json!({"protocol": "ssl", "cert_pem": cert, "key_pem_env": pem}),
        ),
        (
            "/kafka/security",
            serde_json::json!({"protocol": "ssl", "cert_pem": cert, "key_pem_env": "K", "key_password_env": SECRET}),
        ),
        ("/kafka/security", serde_json::json!({"protocol": SECRET})),
        ("/kafka/security", SECRET.into()),
        (
            "/kafka/brokers",
            serde_json::json!([format!("user:{SECRET}@127.0.0.1:9092")]),
        ),
        ("/kafka", SECRET.into()),
        ("/redis/password_env", SECRET.into()),
        ("/redis/password_env", serde_json::json!([SECRET])),
        (
            "/redis/url",
            format!("REDIS://user:{SECRET}@127.0.0.1:6379").into(),
        ),
        (
            "/redis/url",
            format!("Redis://:{SECRET}@127.0.0.1:6379/0?x#y").into(),
        ),
        (
            "/redis/url",
            format!("redis://user:{SECRET}@127.0.0.1:6379").into(),
        ),
        ("/redis/url", format!("user:{SECRET}@127.0.0.1:6379").into()),
        (
            "/redis/cluster",
            serde_json::json!({"seed_urls": [format!("Rediss://:{SECRET}@127.0.0.1:7000")]}),
        ),
        ("/redis", SECRET.into()),
        (
            "/auth",
            jwt(serde_json::json!({"hs256_secret_env": SECRET})),
        ),
        (
            "/auth",
            jwt(
                serde_json::json!({"jwks_url": format!("https://user:{SECRET}@idp.example.com/jwks.json")}),
            ),
        ),
        (
            "/auth",
            jwt(serde_json::json!({"jwks_url": format!("htps://user:{SECRET}@[idp")})),
        ),
        (
            "/auth",
            jwt(
                serde_json::json!({"jwks_url": format!("http://user:{SECRET}@idp.example.com/jwks.json")}),
            ),
        ),
        ("/auth", jwt(serde_json::json!({"algorithms": [SECRET]}))),
        ("/auth", SECRET.into()),
        ("/auth/mode", SECRET.into()),
        (
            "/server/cors_origins",
            serde_json::json!([format!("https://user:{SECRET}@app.example.com")]),
        ),
        ("/server/host", SECRET.into()),
        ("/endpoints/orders", SECRET.into()),
        ("/consumer_groups/0/offset_reset", SECRET.into()),
    ];
    let fjord = workspace_binary("fjord");
    let consumer = workspace_binary("fjord-consumer");
    let server = &workspace_binary("fjord-server");
    // The variables the manifests name hold the secret too: their values are read, never shown.
    let envs = [("HS", SECRET), ("K", SECRET)];
    for (pointer, value) in &cases {
        let mut manifest = base.clone();
        let (parent, field) = pointer.rsplit_once('/').unwrap();
        manifest.pointer_mut(parent).unwrap()[field] = value.clone();
        let text = manifest.to_string();
        let (_dir, path) = write_manifest(&manifest);
        let path = path.to_str().unwrap();
        let from_env = [envs[0], envs[1], ("FJORD_MANIFEST_JSON", text.as_str())];
        let runs = [
            run(&fjord, &["check", path], &envs, PATIENCE),
            run(server, &["--manifest", path], &envs, PATIENCE),
            run(&consumer, &["--manifest", path], &envs, PATIENCE),
            run(server, &[], &from_env, PATIENCE),
            run(&consumer, &["--verbose"], &from_env, PATIENCE),
        ];
        for outcome in runs {
            assert_eq!(
                outcome.code,
                Some(1),
                "{pointer} = {value}: {}",
                outcome.output()
            );
            assert!(
                !outcome.output().contains(SECRET),
                "{pointer} = {value}: the secret is in the output:\n{}",
                outcome.output()
            );
        }
        // The deploy's pre-flight: the same parser, its error as the deploy prints it.
        let error = fjord_config::Manifest::parse(&text)
            .unwrap_err()
            .in_file(Path::new("manifest.json"));
        assert!(!error.to_string().contains(SECRET), "{pointer}: {error}");
        assert!(
            !format!("{error:?}").contains(SECRET),
            "{pointer}: {error:?}"
        );
    }

    // `fjord dev --redis` with a password in the URL, whatever the scheme's case, and a
    // broker list with one.
    for (flag, value) in [
        ("--redis", format!("Redis://:{SECRET}@127.0.0.1:1")),
        ("--redis", format!("redis://user:{SECRET}@127.0.0.1:1")),
        ("--redis", format!("REDISS://{SECRET}@127.0.0.1:1")),
        ("--kafka", format!("user:{SECRET}@127.0.0.1:1")),
    ] {
        let port = free_port().to_string();
        let dev = run(
            &fjord,
            &["dev", "--no-demo-producer", "--port", &port, flag, &value],
            &[],
            PATIENCE,
        );
        assert_eq!(dev.code, Some(1), "{flag} {value}: {}", dev.output());
        assert!(
            !dev.output().contains(SECRET),
            "{flag} {value}: the secret is in the output:\n{}",
            dev.output()
        );
    }
}
