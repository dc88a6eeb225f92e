//! The bus on a Redis that speaks only TLS and wants a password: a real `redis-server` that
//! each test starts on a free port, with a CA and a server certificate the test makes with
//! `openssl`. Records cross it end to end; each way of getting the connection wrong stops
//! the process at start with a one-line reason, or, where it may yet pass, is retried with
//! the reason logged.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;

use crate::common::*;

const USER: &str = "fjord";
/// The variable the manifests name for the password; set only in the spawned processes.
const PASSWORD_ENV: &str = "FJORD_TEST_REDIS_TLS_PASSWORD";

/// A `redis-server` with only a TLS port, `requirepass` for the default user and an ACL
/// user; stopped and its files removed when dropped.
struct TlsRedis {
    port: u16,
    ca_file: PathBuf,
    default_password: String,
    user_password: String,
    child: Child,
    _dir: tempfile::TempDir,
}

impl TlsRedis {
    fn start() -> Self {
        Self::start_as(false)
    }

    /// A one-node Redis Cluster over TLS (every slot on the one node), as ElastiCache's
    /// cluster mode with in-transit encryption is.
    fn start_cluster() -> Self {
        let redis = Self::start_as(true);
        let cli = |args: &[&str]| {
            let output = Command::new("redis-cli")
                .args(["--tls", "--cacert", redis.ca_file(), "-h", "127.0.0.1"])
                .args(["-p", &redis.port.to_string(), "--user", "default"])
                .args(["--pass", &redis.default_password, "--no-auth-warning"])
                .args(args)
                .output()
                .expect("redis-cli (ci/services.sh installs it)");
            String::from_utf8_lossy(&output.stdout).into_owned()
        };
        let added = cli(&["CLUSTER", "ADDSLOTSRANGE", "0", "16383"]);
        assert!(added.contains("OK"), "ADDSLOTSRANGE: {added}");
        let deadline = std::time::Instant::now() + PATIENCE;
        while !cli(&["CLUSTER", "INFO"]).contains("cluster_state:ok") {
            assert!(
                std::time::Instant::now() < deadline,
                "the TLS cluster never became ok"
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        redis
    }

    fn start_as(cluster: bool) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let certificates = tls::make_certificates(dir.path(), None);
        let file = |path: &Path| path.to_string_lossy().into_owned();
        let port = free_port();
        let default_password = unique("default");
        let user_password = unique("user");
        let mut child = Command::new("redis-server")
            .args(["--port", "0", "--bind", "127.0.0.1"])
            .args(["--tls-port", &port.to_string()])
            .args(["--tls-cert-file", &file(&certificates.server_cert)])
            .args(["--tls-key-file", &file(&certificates.server_key)])
            .args(["--tls-ca-cert-file", &file(&certificates.ca)])
            .args(["--tls-auth-clients", "no"])
            .args(["--requirepass", &default_password])
            .args(["--user", USER, "on", &format!(">{user_password}")])
            .args(["~*", "&*", "+@all"])
            .args([
                "--dir",
                &file(dir.path()),
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .args(if cluster {
                vec![
                    "--cluster-enabled".to_owned(),
                    "yes".to_owned(),
                    "--cluster-port".to_owned(),
                    free_port().to_string(),
                    "--tls-cluster".to_owned(),
                    "yes".to_owned(),
                ]
            } else {
                Vec::new()
            })
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server (ci/services.sh installs it)");
        let stdout = child.stdout.take().expect("stdout");
        let (ready_tx, ready_rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut log = Vec::new();
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if line.contains("Ready to accept connections") {
                    let _ = ready_tx.send(Ok(()));
                }
                log.push(line);
            }
            let _ = ready_tx.send(Err(log.join("\n")));
        });
        let started = ready_rx
            .recv_timeout(PATIENCE)
            .expect("redis-server with TLS ready in time");
        assert!(
            started.is_ok(),
            "redis-server with TLS did not start:\n{}",
            started.err().unwrap_or_default()
        );
        Self {
            port,
            ca_file: certificates.ca,
            default_password,
            user_password,
            child,
            _dir: dir,
        }
    }

    fn url(&self) -> String {
        format!("rediss://127.0.0.1:{}", self.port)
    }

    fn ca_file(&self) -> &str {
        self.ca_file.to_str().expect("utf-8 path")
    }
}

impl Drop for TlsRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A manifest for one endpoint on `redis`, as the ACL user.
fn tls_manifest(
    services: &Services,
    redis: &TlsRedis,
    topic: &str,
    port: u16,
) -> serde_json::Value {
    let mut manifest = manifest(services, &[("orders", topic)], &unique("group"), port);
    manifest["redis"]["url"] = redis.url().into();
    manifest["redis"]["username"] = USER.into();
    manifest["redis"]["password_env"] = PASSWORD_ENV.into();
    manifest
}

/// Starts `binary` on `manifest` with `envs`, waits for it to fail, and returns its log.
async fn failure_log(binary: &str, manifest: &Path, envs: &[(&str, &str)]) -> String {
    let mut process = Process::start(
        binary,
        &["--manifest", manifest.to_str().expect("utf-8 path")],
        envs,
    );
    assert_ne!(process.wait_exit().await, Some(0), "{binary} should fail");
    process.log().join("\n")
}

#[tokio::test]
async fn records_cross_a_tls_redis_as_an_acl_user() {
    if skip_without_services() {
        return;
    }
    records_cross(TlsRedis::start(), |_| {}).await;
}

#[tokio::test]
async fn records_cross_a_tls_redis_cluster_as_an_acl_user() {
    if skip_without_services() {
        return;
    }
    // No replica to read from: the server falls back to the primary.
    records_cross(TlsRedis::start_cluster(), |manifest| {
        manifest["redis"]["cluster"] = serde_json::json!({"read_from": "replica"});
    })
    .await;
}

/// Records cross `redis` end to end, as the ACL user, with the manifest `edit` made; the
/// password is in no log.
async fn records_cross(redis: TlsRedis, edit: impl FnOnce(&mut serde_json::Value)) {
    let services = services();
    let topic = unique("orders");
    create_topic(&services.brokers, &topic, 2).await;
    let port = free_port();
    let mut manifest = tls_manifest(&services, &redis, &topic, port);
    edit(&mut manifest);
    let (_dir, path) = write_manifest(&manifest);
    let envs = [
        ("SSL_CERT_FILE", redis.ca_file()),
        (PASSWORD_ENV, redis.user_password.as_str()),
    ];
    let path_arg = path.to_str().expect("utf-8 path");
    let mut server = Process::start(
        &workspace_binary("fjord-server"),
        &["--manifest", path_arg],
        &envs,
    );
    server.wait_ready(port).await;
    let mut client =
        SseStream::connect(&format!("http://127.0.0.1:{port}/v1/streams/orders"), &[]).await;
    assert_eq!(client.status, 200);
    let _consumer = Process::consumer(&path, &envs);

    let produced = produce(&services.brokers, &topic, &json_records(100, 2, 7)).await;
    let records = client.records(produced.len()).await;
    assert_complete_and_ordered(&records, &produced);
    let log = server.log().join("\n");
    assert!(
        !log.contains(&redis.user_password),
        "the password was logged:\n{log}"
    );
}

#[tokio::test]
async fn refused_credentials_stop_the_process_naming_user_and_variable() {
    if skip_without_services() {
        return;
    }
    let services = services();
    let redis = TlsRedis::start();
    let mut manifest = tls_manifest(&services, &redis, "unused-topic", free_port());
    let server = &workspace_binary("fjord-server");
    let consumer = &workspace_binary("fjord-consumer");

    let (_dir, path) = write_manifest(&manifest);
    for binary in [server, consumer] {
        let envs = [
            ("SSL_CERT_FILE", redis.ca_file()),
            (PASSWORD_ENV, "not-the-password"),
        ];
        let log = failure_log(binary, &path, &envs).await;
        assert!(
            log.contains(&format!(
                "authentication as user \"{USER}\" with the password in {PASSWORD_ENV} failed"
            )),
            "{binary}:\n{log}"
        );
        assert!(!log.contains("not-the-password"), "{log}");
    }

    // Redis answers an unknown user as it answers a wrong password.
    manifest["redis"]["username"] = "nobody".into();
    let (_dir, path) = write_manifest(&manifest);
    let envs = [
        ("SSL_CERT_FILE", redis.ca_file()),
        (PASSWORD_ENV, redis.user_password.as_str()),
    ];
    let log = failure_log(server, &path, &envs).await;
    assert!(log.contains("authentication as user \"nobody\""), "{log}");

    // No password at all: the connection opens, and the first command is refused.
    let redis_section = manifest["redis"].as_object_mut().expect("object");
    redis_section.remove("username");
    redis_section.remove("password_env");
    let (_dir, path) = write_manifest(&manifest);
    let log = failure_log(server, &path, &[("SSL_CERT_FILE", redis.ca_file())]).await;
    assert!(
        log.contains(
            "Redis requires a password and Fjord has no password (redis.password_env is not set)"
        ),
        "{log}"
    );

    // The default user's password, without a user name, is accepted.
    manifest["redis"]["password_env"] = PASSWORD_ENV.into();
    let port = free_port();
    manifest["server"]["port"] = port.into();
    let (_dir, path) = write_manifest(&manifest);
    let _server = Process::start(
        server,
        &["--manifest", path.to_str().expect("utf-8 path")],
        &[
            ("SSL_CERT_FILE", redis.ca_file()),
            (PASSWORD_ENV, redis.default_password.as_str()),
        ],
    );
    wait_ready(port).await;
}

#[tokio::test]
async fn an_untrusted_certificate_or_a_plain_port_stops_the_process() {
    if skip_without_services() {
        return;
    }
    let services = services();
    let redis = TlsRedis::start();
    let manifest = tls_manifest(&services, &redis, "unused-topic", free_port());
    let (_dir, path) = write_manifest(&manifest);
    let server = &workspace_binary("fjord-server");

    // The roots this machine trusts (the system's, or an SSL_CERT_FILE of its own) do not
    // hold the test CA.
    let log = failure_log(
        server,
        &path,
        &[(PASSWORD_ENV, redis.user_password.as_str())],
    )
    .await;
    let untrusted = format!(
        "redis at {}: its TLS certificate is not valid for this host or not signed by",
        redis.url()
    );
    assert!(log.contains(&untrusted), "{log}");

    // Nor does another CA.
    let other = tempfile::tempdir().expect("temp dir");
    let other_ca = tls::make_certificates(other.path(), None).ca;
    let other_ca = other_ca.to_str().expect("utf-8 path");
    let log = failure_log(
        server,
        &path,
        &[
            ("SSL_CERT_FILE", other_ca),
            (PASSWORD_ENV, redis.user_password.as_str()),
        ],
    )
    .await;
    assert!(
        log.contains(&format!(
            "{untrusted} the CA bundle in SSL_CERT_FILE ({other_ca}) (invalid peer certificate: "
        )),
        "{log}"
    );

    // A trust bundle that cannot be read is named.
    let log = failure_log(
        server,
        &path,
        &[
            ("SSL_CERT_FILE", "/nonexistent/ca.pem"),
            (PASSWORD_ENV, redis.user_password.as_str()),
        ],
    )
    .await;
    assert!(
        log.contains(
            "cannot load the TLS trust roots, the CA bundle in SSL_CERT_FILE (/nonexistent/ca.pem)"
        ),
        "{log}"
    );

    // The log of the failure with Redis at `url`, trusting the test CA.
    let failure_at = async |url: String| {
        let mut elsewhere = manifest.clone();
        elsewhere["redis"]["url"] = url.into();
        let (_dir, path) = write_manifest(&elsewhere);
        failure_log(
            server,
            &path,
            &[
                ("SSL_CERT_FILE", redis.ca_file()),
                (PASSWORD_ENV, redis.user_password.as_str()),
            ],
        )
        .await
    };

    // rediss:// to a port that speaks plain Redis.
    let plain_address = services
        .redis_url
        .strip_prefix("redis://")
        .expect("the test Redis URL is redis://");
    let log = failure_at(format!("rediss://{plain_address}")).await;
    assert!(
        log.contains("this port speaks Redis without TLS: use redis://, or Redis's TLS port"),
        "{log}"
    );

    // rediss:// to a port that answers, but not with TLS.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let not_tls = listener.local_addr().expect("address");
    std::thread::spawn(move || {
        for mut stream in listener.incoming().map_while(Result::ok) {
            use std::io::Write as _;
            let _ = stream.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n");
        }
    });
    let log = failure_at(format!("rediss://{not_tls}")).await;
    assert!(
        log.contains("the TLS handshake failed: is this Redis's TLS port?"),
        "{log}"
    );
}

#[tokio::test]
async fn fjord_dev_streams_through_a_tls_redis() {
    if skip_without_services() {
        return;
    }
    let redis = TlsRedis::start();
    let port = free_port();
    let url = redis.url();
    // The password comes from the variable `fjord dev` reads by default.
    let _dev = Process::start(
        &workspace_binary("fjord"),
        &[
            "dev",
            "--port",
            &port.to_string(),
            "--redis",
            &url,
            "--redis-user",
            USER,
        ],
        &[
            ("SSL_CERT_FILE", redis.ca_file()),
            ("FJORD_REDIS_PASSWORD", redis.user_password.as_str()),
        ],
    );
    wait_ready(port).await;
    let mut client =
        SseStream::connect(&format!("http://127.0.0.1:{port}/v1/streams/orders"), &[]).await;
    assert_eq!(client.status, 200);
    let records = client.records(3).await;
    for record in &records {
        assert_eq!(record.event.as_deref(), Some("orders"));
        assert!(record.json()["value"].is_object(), "{record:?}");
    }
}

#[tokio::test]
async fn redis_url_to_a_tls_port_is_retried_with_a_hint() {
    if skip_without_services() {
        return;
    }
    let services = services();
    let redis = TlsRedis::start();
    let mut manifest = tls_manifest(&services, &redis, "unused-topic", free_port());
    manifest["redis"]["url"] = format!("redis://127.0.0.1:{}", redis.port).into();
    let (_dir, path) = write_manifest(&manifest);
    // A reset connection may also pass, so the process keeps trying and says why.
    let server = Process::start(
        &workspace_binary("fjord-server"),
        &["--manifest", path.to_str().expect("utf-8 path")],
        &[(PASSWORD_ENV, redis.user_password.as_str())],
    );
    server
        .wait_for_log(&[
            "redis is not reachable yet (if this port serves TLS, the URL needs rediss://)",
            "Connection reset",
        ])
        .await;
}
