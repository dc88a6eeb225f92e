//! What key filters cost the real `fjord-server`: connections with 1,000 keys each, all
//! different and all the same, measured from the process's resident memory. Prints the
//! figures that README.md quotes; asserts only a loose bound.

use crate::common::*;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

const CONNECTIONS: usize = 200;
const KEYS: usize = 1000;

/// Opens a stream of `orders` filtered on `keys` and waits for its prelude.
async fn open(port: u16, keys: &[String]) -> tokio::net::TcpStream {
    let query: Vec<String> = keys.iter().map(|key| format!("key={key}")).collect();
    let request = format!(
        "GET /v1/streams/orders?{} HTTP/1.1\r\nhost: x\r\n\r\n",
        query.join("&")
    );
    let mut socket = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    socket.write_all(request.as_bytes()).await.expect("request");
    let mut received = Vec::new();
    while !received.windows(7).any(|window| window == b"retry: ") {
        let mut chunk = [0_u8; 1024];
        let n = socket.read(&mut chunk).await.expect("read");
        assert!(n > 0, "closed: {}", String::from_utf8_lossy(&received));
        received.extend_from_slice(&chunk[..n]);
    }
    assert!(received.starts_with(b"HTTP/1.1 200"));
    socket
}

/// KiB of resident memory per connection for `CONNECTIONS` connections with `keys_of(i)`,
/// each set of connections on a server of its own (an allocator keeps what was freed).
async fn kib_per_connection(keys_of: impl Fn(usize) -> Vec<String>) -> f64 {
    let services = services();
    let port = free_port();
    let manifest = manifest(&services, &[("orders", &unique("keys"))], "unused", port);
    let (_dir, path) = write_manifest(&manifest);
    let server = Process::server(&path);
    wait_ready(port).await;
    // Warm up the server's per-connection paths.
    for _ in 0..10 {
        open(port, &keys_of(CONNECTIONS)).await;
    }
    let before = rss_kib(server.pid());
    let mut sockets = Vec::with_capacity(CONNECTIONS);
    for i in 0..CONNECTIONS {
        sockets.push(open(port, &keys_of(i)).await);
    }
    let after = rss_kib(server.pid());
    drop(sockets);
    after.saturating_sub(before) as f64 / CONNECTIONS as f64
}

#[tokio::test]
async fn key_filters_of_a_thousand_keys_per_connection() {
    if skip_without_services() {
        return;
    }
    let without = kib_per_connection(|_| Vec::new()).await;
    let different = kib_per_connection(|i| (0..KEYS).map(|k| format!("c{i}-k{k}")).collect()).await;
    let same = kib_per_connection(|_| (0..KEYS).map(|k| format!("shared-k{k}")).collect()).await;
    println!(
        "{CONNECTIONS} connections: no keys {without:.1} KiB each; {KEYS} keys each, all different {different:.1} KiB each; the same {KEYS} keys {same:.1} KiB each"
    );
    assert!(different < 200.0, "{different:.1} KiB per connection");
}
