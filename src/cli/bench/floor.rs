//! The floor (`fjord bench floor`): the least work this machine can do per delivery. A bare
//! TCP server that answers each request with a fixed response head, then, for every event,
//! renders the same SSE bytes the server would (as one HTTP chunk) once and writes them to
//! each connection with one non-blocking `write`. No HTTP library, no queues, no tasks.
//! It generates its events itself at the rate the controller asks for on stdin
//! (`go <records per second>`, then `stop`), so it needs no bus.

use std::io::{BufRead, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{event_envelope, now_us};

const HEAD: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache, no-transform\r\nx-accel-buffering: no\r\ntransfer-encoding: chunked\r\n\r\n";
/// A connection that cannot take this much more is dropped, as the server drops a slow one.
const MAX_PENDING: usize = 1 << 20;

struct Connection {
    stream: TcpStream,
    pending: Vec<u8>,
}

enum Command {
    Go(f64),
    Stop,
}

#[allow(
    clippy::print_stdout,
    reason = "the controller reads the floor's stdout"
)]
fn emit(value: &serde_json::Value) {
    println!("{value}");
}

fn chunk(bytes: &[u8]) -> Vec<u8> {
    let mut out = format!("{:X}\r\n", bytes.len()).into_bytes();
    out.extend_from_slice(bytes);
    out.extend_from_slice(b"\r\n");
    out
}

fn handshake(mut stream: TcpStream) -> std::io::Result<TcpStream> {
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.set_nodelay(true)?;
    let mut request = Vec::with_capacity(512);
    let mut buffer = [0_u8; 512];
    while !request.windows(4).any(|window| window == b"\r\n\r\n") {
        let n = stream.read(&mut buffer)?;
        if n == 0 || request.len() > 16 * 1024 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        request.extend_from_slice(&buffer[..n]);
    }
    stream.write_all(HEAD)?;
    stream.write_all(&chunk(b"retry: 2000\nid: 0-0\n\n"))?;
    stream.set_nonblocking(true)?;
    Ok(stream)
}

/// Serves on `port` until `stop` or the end of stdin, or `deadline_secs`.
pub(crate) fn run(port: u16, deadline_secs: u64) -> anyhow::Result<()> {
    let listener = TcpListener::bind(("127.0.0.1", port))?;
    let fresh: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
    {
        let fresh = Arc::clone(&fresh);
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                if let Ok(stream) = handshake(stream) {
                    fresh
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .push(stream);
                }
            }
        });
    }
    let (commands, received) = mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            let mut words = line.split_whitespace();
            match (words.next(), words.next().map(str::parse::<f64>)) {
                (Some("go"), Some(Ok(rate))) => {
                    let _ = commands.send(Command::Go(rate));
                }
                (Some("stop"), _) => break,
                _ => {}
            }
        }
        let _ = commands.send(Command::Stop);
    });
    emit(&serde_json::json!({"type": "listening", "port": port}));

    let deadline = Instant::now() + Duration::from_secs(deadline_secs);
    let mut connections: Vec<Connection> = Vec::new();
    let mut rate = 0.0;
    let mut started = Instant::now();
    let mut sent = 0_u64;
    let (mut writes, mut partial, mut dropped) = (0_u64, 0_u64, 0_u64);
    while Instant::now() < deadline {
        match received.try_recv() {
            Ok(Command::Go(new_rate)) => {
                rate = new_rate;
                started = Instant::now();
                sent = 0;
            }
            Ok(Command::Stop) | Err(mpsc::TryRecvError::Disconnected) => break,
            Err(mpsc::TryRecvError::Empty) => {}
        }
        connections.extend(
            std::mem::take(
                &mut *fresh
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner),
            )
            .into_iter()
            .map(|stream| Connection {
                stream,
                pending: Vec::new(),
            }),
        );
        let due = if rate > 0.0 {
            (started.elapsed().as_secs_f64() * rate) as u64
        } else {
            0
        };
        if sent >= due {
            std::thread::sleep(Duration::from_micros(200));
            continue;
        }
        sent += 1;
        let envelope = event_envelope(sent, None, None, sent, now_us());
        let mut event = format!("id: {}-0\nevent: bench\ndata: ", now_us() / 1000).into_bytes();
        event.extend_from_slice(&envelope);
        event.extend_from_slice(b"\n\n");
        let bytes = chunk(&event);
        connections.retain_mut(|connection| {
            writes += 1;
            if !connection.pending.is_empty() {
                connection.pending.extend_from_slice(&bytes);
                let alive =
                    flush(connection, &mut partial) && connection.pending.len() < MAX_PENDING;
                if !alive {
                    dropped += 1;
                }
                return alive;
            }
            match connection.stream.write(&bytes) {
                Ok(n) if n == bytes.len() => true,
                Ok(n) => {
                    partial += 1;
                    connection.pending.extend_from_slice(&bytes[n..]);
                    true
                }
                Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {
                    partial += 1;
                    connection.pending.extend_from_slice(&bytes);
                    true
                }
                Err(_) => {
                    dropped += 1;
                    false
                }
            }
        });
    }
    emit(&serde_json::json!({
        "type": "report", "connections": connections.len(), "writes": writes,
        "partial": partial, "dropped": dropped,
    }));
    Ok(())
}

/// Writes what a connection has pending; false when it failed.
fn flush(connection: &mut Connection, partial: &mut u64) -> bool {
    match connection.stream.write(&connection.pending) {
        Ok(n) => {
            if n < connection.pending.len() {
                *partial += 1;
            }
            connection.pending.drain(..n);
            true
        }
        Err(error) => error.kind() == std::io::ErrorKind::WouldBlock,
    }
}
