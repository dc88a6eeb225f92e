//! Kafka over TLS with the certificates as PEM text and the private key from the
//! environment, the form that works in an ECS task (no files there). The test broker has
//! no TLS listener, so `openssl s_server` stands in for a broker's TLS layer: it requires a
//! client certificate signed by the test's CA, and says whose it accepted. Certificates
//! are made by the test with `openssl`.
#![allow(clippy::unwrap_used, clippy::panic, reason = "a test fails loudly")]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use common::*;

const KEY_ENV: &str = "FJORD_TEST_KAFKA_KEY";

fn openssl(dir: &Path, args: &[&str]) {
    let output = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl runs");
    assert!(
        output.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A CA, a server certificate for 127.0.0.1 and a client certificate `fjord-client`,
/// all P-256, in `dir`.
fn make_certificates(dir: &Path) {
    let key = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let request = |name: &str, subject: &str| {
        let (key_file, csr) = (format!("{name}.key"), format!("{name}.csr"));
        let mut args = vec!["req"];
        args.extend(key);
        args.extend(["-keyout", &key_file, "-out", &csr, "-subj", subject]);
        openssl(dir, &args);
    };
    let sign = |name: &str, extensions: &[&str]| {
        let (csr, pem) = (format!("{name}.csr"), format!("{name}.pem"));
        let mut args = vec![
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "1",
            "-out",
            &pem,
        ];
        args.extend(extensions);
        openssl(dir, &args);
    };
    let mut args = vec!["req", "-x509"];
    args.extend(key);
    args.extend([
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "1",
        "-subj",
        "/CN=fjord-test-ca",
    ]);
    openssl(dir, &args);
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n",
    )
    .unwrap();
    request("server", "/CN=localhost");
    sign("server", &["-extfile", "server.ext"]);
    request("client", "/CN=fjord-client");
    sign("client", &[]);
}

fn read(dir: &Path, file: &str) -> String {
    std::fs::read_to_string(dir.join(file)).unwrap()
}

/// `openssl s_server` on a free port, requiring a client certificate; killed when dropped.
struct TlsServer {
    child: Child,
    port: u16,
    output: PathBuf,
}

impl TlsServer {
    async fn start(dir: &Path) -> Self {
        let port = free_port();
        let output = dir.join("s_server.out");
        let log = std::fs::File::create(&output).unwrap();
        let accept = format!("127.0.0.1:{port}");
        let child = Command::new("openssl")
            .args([
                "s_server",
                "-accept",
                &accept,
                "-cert",
                "server.pem",
                "-key",
            ])
            .args(["server.key", "-CAfile", "ca.pem", "-Verify", "1"])
            .arg("-verify_return_error")
            .current_dir(dir)
            // s_server stops at the end of its input: keep it open.
            .stdin(Stdio::piped())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("openssl s_server starts");
        let server = Self {
            child,
            port,
            output,
        };
        wait_until("s_server to listen", || server.said("ACCEPT")).await;
        server
    }

    fn said(&self, text: &str) -> bool {
        std::fs::read_to_string(&self.output).is_ok_and(|out| out.contains(text))
    }
}

impl Drop for TlsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A consumer's manifest for the broker at `port`, with `security`.
fn manifest_with(port: u16, security: &serde_json::Value) -> serde_json::Value {
    let services = services();
    let mut manifest = manifest(
        &services,
        &[("tls", &unique("tls"))],
        &unique("group"),
        free_port(),
    );
    manifest["kafka"] = serde_json::json!({
        "brokers": [format!("127.0.0.1:{port}")],
        "security": security,
    });
    manifest
}

#[tokio::test]
async fn the_client_certificate_and_key_as_pem_text_complete_a_tls_handshake() {
    let dir = tempfile::tempdir().unwrap();
    make_certificates(dir.path());
    let server = TlsServer::start(dir.path()).await;
    let manifest = manifest_with(
        server.port,
        &serde_json::json!({
            "protocol": "ssl",
            "ca_pem": read(dir.path(), "ca.pem"),
            "cert_pem": read(dir.path(), "client.pem"),
            "key_pem_env": KEY_ENV,
        }),
    );
    let (_manifest_dir, path) = write_manifest(&manifest);
    let key = read(dir.path(), "client.key");
    let consumer = Process::consumer(&path, &[(KEY_ENV, &key)]);
    // The server accepted the client's certificate, which it sends only after it has
    // verified the server's against ca_pem.
    wait_until("s_server to accept the client certificate", || {
        server.said("subject=CN = fjord-client")
    })
    .await;
    consumer.terminate();
}

#[tokio::test]
async fn a_key_that_is_not_pem_is_refused_with_its_variable() {
    let dir = tempfile::tempdir().unwrap();
    make_certificates(dir.path());
    let security = serde_json::json!({
        "protocol": "ssl",
        "ca_pem": read(dir.path(), "ca.pem"),
        "cert_pem": read(dir.path(), "client.pem"),
        "key_pem_env": KEY_ENV,
    });
    let (_manifest_dir, path) = write_manifest(&manifest_with(free_port(), &security));
    let not_pem =
        format!("$.kafka.security.key_pem_env: {KEY_ENV} does not hold a PEM private key");
    let cases: [(String, &[&str]); 3] = [
        // Not PEM at all: caught before librdkafka, naming the variable and its field.
        ("/run/secrets/client.key".to_owned(), &[&not_pem]),
        // PEM armour around garbage: librdkafka refuses the client, naming its setting.
        (
            "-----BEGIN PRIVATE KEY-----\nbm90IGEga2V5\n-----END PRIVATE KEY-----\n".to_owned(),
            &[
                "kafka create consumer",
                "ssl.key.pem failed",
                "not in PEM format",
            ],
        ),
        // A real key that is not the certificate's.
        (
            read(dir.path(), "server.key"),
            &["ssl.key.pem failed", "key values mismatch"],
        ),
    ];
    for (key, expected) in cases {
        let mut consumer = Process::consumer(&path, &[(KEY_ENV, &key)]);
        assert_ne!(consumer.wait_exit().await, Some(0), "{key}");
        let log = consumer.log().join("\n");
        for needle in expected {
            assert!(log.contains(needle), "expected {needle:?} in\n{log}");
        }
        assert!(
            !log.contains("bm90IGEga2V5"),
            "the key is not logged:\n{log}"
        );
    }
}
