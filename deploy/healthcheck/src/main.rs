//! `fjord-healthcheck URL`: the container health check of the server image, which has no
//! shell and no curl. Sends `GET` to an `http://host:port/path` URL and exits 0 when the
//! answer is `200`, 1 otherwise, within 3 seconds. Standard library only, so the image
//! stays small.

#![allow(
    clippy::print_stderr,
    reason = "stderr is where ECS shows why a health check failed"
)]

use std::io::{Read as _, Write as _};
use std::net::{TcpStream, ToSocketAddrs as _};
use std::process::ExitCode;
use std::time::Duration;

const TIMEOUT: Duration = Duration::from_secs(3);

fn main() -> ExitCode {
    let Some(url) = std::env::args().nth(1) else {
        eprintln!("usage: fjord-healthcheck http://HOST:PORT/PATH");
        return ExitCode::from(2);
    };
    match probe(&url) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("fjord-healthcheck {url}: {error}");
            ExitCode::FAILURE
        }
    }
}

fn probe(url: &str) -> Result<(), String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or("only http:// URLs are supported")?;
    let (authority, path) = rest.find('/').map_or((rest, "/"), |at| rest.split_at(at));
    let address = authority
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {authority}: {e}"))?
        .next()
        .ok_or_else(|| format!("{authority} has no address"))?;
    let mut stream = TcpStream::connect_timeout(&address, TIMEOUT).map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(TIMEOUT))
        .map_err(|e| e.to_string())?;
    stream
        .set_write_timeout(Some(TIMEOUT))
        .map_err(|e| e.to_string())?;
    // One write: `write!` straight to the socket would send each piece of the format in
    // its own syscall, and a server that answers after the first could close before the rest.
    let request = format!("GET {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n");
    stream
        .write_all(request.as_bytes())
        .map_err(|e| e.to_string())?;
    // The status line is all that matters: "HTTP/1.1 200 OK".
    let mut head = [0_u8; 32];
    let mut read = 0;
    while read < 12 {
        match stream.read(&mut head[read..]) {
            Ok(0) => break,
            Ok(n) => read += n,
            Err(e) => return Err(e.to_string()),
        }
    }
    let status_line = String::from_utf8_lossy(&head[..read]);
    match status_line.split(' ').nth(1) {
        Some("200") => Ok(()),
        Some(status) => Err(format!("status {status}")),
        None => Err("no HTTP answer".into()),
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read as _, Write as _};
    use std::net::TcpListener;

    use super::probe;

    /// A one-request HTTP server that answers with `status`; returns its URL.
    fn answering(status: &'static str) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            // Read the whole request head, as a real server does, before answering.
            let mut request = Vec::new();
            let mut chunk = [0_u8; 1024];
            while !request.ends_with(b"\r\n\r\n") {
                let n = stream.read(&mut chunk).unwrap();
                assert!(n > 0, "client closed before the end of its request");
                request.extend_from_slice(&chunk[..n]);
            }
            stream
                .write_all(format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\n\r\n").as_bytes())
                .unwrap();
        });
        format!("http://{address}/healthz")
    }

    #[test]
    fn healthy_on_200_only() {
        assert_eq!(probe(&answering("200 OK")), Ok(()));
        assert_eq!(
            probe(&answering("503 Service Unavailable")),
            Err("status 503".into())
        );
    }

    #[test]
    fn unreachable_or_unsupported_is_unhealthy() {
        let closed = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        assert!(probe(&format!("http://{closed}/healthz")).is_err());
        assert!(probe("https://127.0.0.1/healthz").is_err());
    }
}
