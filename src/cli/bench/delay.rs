//! A delaying TCP proxy for the ingest scenario: it stands between a process and Redis and
//! holds every chunk for a fixed one-way delay in each direction, so that loopback behaves
//! like a network with a given round trip (`tc netem` needs the `sch_netem` kernel module,
//! which this kind of container lacks). Each direction is a timed queue: a reader stamps
//! each chunk with when it is due and a writer sends it then, together with whatever else
//! is due, so chunks keep their order and many can be on the way at once — the delay adds
//! latency, not a cap of one chunk per delay. Plain threads sleeping with a timer slack of
//! a nanosecond keep sub-millisecond delays close to what was asked (tokio's timer wheel
//! counts whole milliseconds); they run at a raised priority where allowed, because a real
//! network does not wait for the host's CPU, and on a busy machine a thread that waits for
//! a core stretches every round trip.

use std::io::{self, Read as _, Write as _};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::num::NonZeroU64;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// Bytes one read takes at most.
const CHUNK: usize = 64 * 1024;

/// A running proxy; dropping it closes the listener and every connection.
#[derive(Debug)]
pub(crate) struct DelayProxy {
    address: SocketAddr,
    stop: Arc<AtomicBool>,
    /// Both ends of every connection, to shut them down on drop.
    sockets: Arc<Mutex<Vec<TcpStream>>>,
}

impl DelayProxy {
    /// Listens on a free loopback port and forwards each connection to `target`, delaying
    /// each direction by `one_way`.
    pub(crate) fn start(target: SocketAddr, one_way: Duration) -> io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let address = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let sockets = Arc::new(Mutex::new(Vec::new()));
        let (accept_stop, accept_sockets) = (Arc::clone(&stop), Arc::clone(&sockets));
        std::thread::Builder::new()
            .name("delay-accept".into())
            .spawn(move || {
                for client in listener.incoming() {
                    if accept_stop.load(Relaxed) {
                        break;
                    }
                    let proxied = client.and_then(|client| {
                        let server = TcpStream::connect(target)?;
                        splice(client, server, one_way, &accept_sockets)
                    });
                    if let Err(error) = proxied {
                        tracing::warn!(%error, %target, "delay proxy: a connection failed");
                    }
                }
            })?;
        Ok(Self {
            address,
            stop,
            sockets,
        })
    }

    /// Where it listens.
    pub(crate) fn address(&self) -> SocketAddr {
        self.address
    }
}

impl Drop for DelayProxy {
    fn drop(&mut self) {
        self.stop.store(true, Relaxed);
        // Wakes the accepting thread, which then sees `stop`.
        let _ = TcpStream::connect(self.address);
        let sockets = self.sockets.lock().unwrap_or_else(PoisonError::into_inner);
        for socket in sockets.iter() {
            let _ = socket.shutdown(Shutdown::Both);
        }
    }
}

/// Starts both directions of one proxied connection.
fn splice(
    client: TcpStream,
    server: TcpStream,
    one_way: Duration,
    sockets: &Mutex<Vec<TcpStream>>,
) -> io::Result<()> {
    for socket in [&client, &server] {
        socket.set_nodelay(true)?;
    }
    sockets
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .extend([client.try_clone()?, server.try_clone()?]);
    pipe(client.try_clone()?, server.try_clone()?, one_way)?;
    pipe(server, client, one_way)
}

/// Forwards `from` to `to`, each chunk `delay` after it was read.
fn pipe(mut from: TcpStream, mut to: TcpStream, delay: Duration) -> io::Result<()> {
    let (queue, due) = mpsc::channel::<(Instant, Vec<u8>)>();
    std::thread::Builder::new()
        .name("delay-read".into())
        .spawn(move || {
            raise_priority();
            let mut buffer = vec![0; CHUNK];
            // The channel closes when the peer closes its side (or fails), and the writer
            // passes that on once what was read before it is sent.
            while let Ok(read @ 1..) = from.read(&mut buffer) {
                if queue
                    .send((Instant::now() + delay, buffer[..read].to_vec()))
                    .is_err()
                {
                    break;
                }
            }
        })?;
    std::thread::Builder::new()
        .name("delay-write".into())
        .spawn(move || {
            // Sleeps end within microseconds of their deadline instead of within the default
            // 50 µs slack, which would be half of a 0.1 ms round trip.
            let _ = rustix::thread::set_current_timer_slack(NonZeroU64::new(1));
            raise_priority();
            let mut batch = Vec::new();
            let mut next = due.recv().ok();
            while let Some((when, chunk)) = next.take() {
                if let Some(wait) = when.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
                batch.clear();
                batch.extend_from_slice(&chunk);
                // Everything else already due goes in the same write.
                let now = Instant::now();
                while let Ok((when, chunk)) = due.try_recv() {
                    if when > now {
                        next = Some((when, chunk));
                        break;
                    }
                    batch.extend_from_slice(&chunk);
                }
                if to.write_all(&batch).is_err() {
                    break;
                }
                if next.is_none() {
                    next = due.recv().ok();
                }
            }
            let _ = to.shutdown(Shutdown::Write);
        })?;
    Ok(())
}

/// Raises the calling thread's priority (nice −10; per thread on Linux) when permitted.
fn raise_priority() {
    let _ = rustix::process::setpriority_process(None, -10);
}

/// The round trips of one connection, summed up.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RoundTrips {
    pub(crate) median: Duration,
    /// What a client that waits for each reply before the next request gets, on average.
    pub(crate) mean: Duration,
}

/// Sends `request` to `address` `count` times, each after the previous `reply` arrived in
/// full, and sums up the round trips.
pub(crate) fn round_trips(
    address: SocketAddr,
    request: &[u8],
    reply: &[u8],
    count: usize,
) -> io::Result<RoundTrips> {
    let mut socket = TcpStream::connect(address)?;
    socket.set_nodelay(true)?;
    socket.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut received = vec![0; reply.len()];
    let mut trips = Vec::with_capacity(count);
    for _ in 0..count {
        let started = Instant::now();
        socket.write_all(request)?;
        socket.read_exact(&mut received)?;
        trips.push(started.elapsed());
        if received != reply {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "expected {:?}, got {:?}",
                    String::from_utf8_lossy(reply),
                    String::from_utf8_lossy(&received)
                ),
            ));
        }
    }
    trips.sort();
    let median = trips
        .get(count / 2)
        .copied()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no round trip asked for"))?;
    let mean = trips.iter().sum::<Duration>() / u32::try_from(count).unwrap_or(u32::MAX);
    Ok(RoundTrips { median, mean })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A loopback echo server.
    fn echo() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let address = listener.local_addr().expect("address");
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                std::thread::spawn(move || {
                    let (mut reader, mut writer) = (&stream, &stream);
                    let _ = io::copy(&mut reader, &mut writer);
                });
            }
        });
        address
    }

    #[test]
    fn a_round_trip_takes_twice_the_delay() {
        let target = echo();
        let direct = round_trips(target, b"PING\r\n", b"PING\r\n", 50)
            .expect("direct")
            .median;
        let proxy = DelayProxy::start(target, Duration::from_millis(5)).expect("proxy");
        let delayed = round_trips(proxy.address(), b"PING\r\n", b"PING\r\n", 50)
            .expect("delayed")
            .median;
        // Each direction holds each chunk at least its delay.
        assert!(delayed >= Duration::from_millis(10), "{delayed:?}");
        // Far from 10 ms more would mean the delay is not what was asked (on a busy
        // machine a round trip may take a few milliseconds more, not tens).
        assert!(
            delayed < Duration::from_millis(40) + direct,
            "{delayed:?}, direct {direct:?}"
        );
    }

    #[test]
    fn chunks_in_flight_overlap_and_keep_their_order() {
        let target = echo();
        let proxy = DelayProxy::start(target, Duration::from_millis(20)).expect("proxy");
        let mut socket = TcpStream::connect(proxy.address()).expect("connect");
        socket.set_nodelay(true).expect("nodelay");
        socket
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let mut reader = socket.try_clone().expect("clone");
        // 200 separate writes, 1 ms apart: one chunk per delay would take 200 × 40 ms = 8 s.
        let started = Instant::now();
        let writer = std::thread::spawn(move || {
            for i in 0..200_u32 {
                socket.write_all(&i.to_be_bytes()).expect("write");
                std::thread::sleep(Duration::from_millis(1));
            }
        });
        let mut received = vec![0_u8; 800];
        reader.read_exact(&mut received).expect("read");
        let took = started.elapsed();
        writer.join().expect("writer");
        let expected: Vec<u8> = (0..200_u32).flat_map(u32::to_be_bytes).collect();
        assert_eq!(received, expected);
        assert!(took >= Duration::from_millis(40), "{took:?}");
        assert!(took < Duration::from_secs(2), "{took:?}");
    }

    #[test]
    fn closing_one_side_closes_the_other_after_what_was_sent() {
        let target = echo();
        let proxy = DelayProxy::start(target, Duration::from_millis(2)).expect("proxy");
        let mut socket = TcpStream::connect(proxy.address()).expect("connect");
        socket
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        socket.write_all(b"last words").expect("write");
        socket.shutdown(Shutdown::Write).expect("shutdown");
        let mut received = Vec::new();
        socket.read_to_end(&mut received).expect("read to end");
        assert_eq!(received, b"last words");
    }
}
