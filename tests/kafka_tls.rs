//! Kafka over TLS with the certificates as PEM text and the private key from the
//! environment, the form that works in an ECS task (no files there). The test broker has
//! no TLS listener, so `openssl s_server` stands in for a broker's TLS layer: it requires a
//! client certificate signed by the test's CA, and says whose it accepted. Certificates
//! are made by the test with `openssl`.
#![allow(clippy::unwrap_used, clippy::panic, reason = "a test fails loudly")]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use crate::common::tls::{Certificates, make_certificates};
use crate::common::*;

const KEY_ENV: &str = "FJORD_TEST_KAFKA_KEY";

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap()
}

/// `openssl s_server` on a free port, requiring a client certificate; killed when dropped.
struct TlsServer {
    child: Child,
    port: u16,
    output: PathBuf,
}

impl TlsServer {
    async fn start(dir: &Path, certificates: &Certificates) -> Self {
        let port = free_port();
        let output = dir.join("s_server.out");
        let log = std::fs::File::create(&output).unwrap();
        let accept = format!("127.0.0.1:{port}");
        let child = Command::new("openssl")
            .args(["s_server", "-accept", &accept])
            .arg("-cert")
            .arg(&certificates.server_cert)
            .arg("-key")
            .arg(&certificates.server_key)
            .arg("-CAfile")
            .arg(&certificates.ca)
            .args(["-Verify", "1"])
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
    if skip_without_services() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let certificates = make_certificates(dir.path(), Some("fjord-client"));
    let server = TlsServer::start(dir.path(), &certificates).await;
    let manifest = manifest_with(
        server.port,
        &serde_json::json!({
            "protocol": "ssl",
            "ca_pem": read(&certificates.ca),
            "cert_pem": read(certificates.client_cert.as_deref().unwrap()),
            "key_pem_env": KEY_ENV,
        }),
    );
    let (_manifest_dir, path) = write_manifest(&manifest);
    let key = read(certificates.client_key.as_deref().unwrap());
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
    if skip_without_services() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let certificates = make_certificates(dir.path(), Some("fjord-client"));
    let security = serde_json::json!({
        "protocol": "ssl",
        "ca_pem": read(&certificates.ca),
        "cert_pem": read(certificates.client_cert.as_deref().unwrap()),
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
            read(&certificates.server_key),
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
