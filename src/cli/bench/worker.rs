//! A load-generator worker process (`fjord bench worker`): opens its share of HTTP/1.1 SSE
//! connections from several 127.0.0.x source addresses, reads them like a client would,
//! and measures every event's latency from the timestamp its payload carries, and gaps in
//! the sequence numbers per connection. Connections to a table endpoint read its snapshot
//! instead ([`super::snapshot`]), resume from their last id when the server closes them
//! after it, and the worker says when every snapshot has ended (`snapshots`) and when every
//! connection has received a given live record (`await N`, then `drained`). The controller
//! drives it over stdin (`measure`, `await`, `stop`) and reads JSON lines from its stdout.

use std::cell::RefCell;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::rc::Rc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpSocket;

use super::histogram::Histogram;
use super::snapshot::{Seen, SnapshotReport, TableSpec, TableView};
use super::{cpu_ticks, now_us, ticks_per_second};

/// Connections to one server.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Target {
    /// The server.
    pub address: SocketAddr,
    /// The request path, such as `/v1/streams/bench`.
    pub path: String,
    /// How many connections.
    pub count: usize,
    /// With `Some(keys)`, connection `i` asks for `?key=k{(first_index + i) % keys}`.
    pub keys: Option<u64>,
    /// With `Some(filters)`, connection `i` asks for
    /// `?filter=value.bucket == {(first_index + i) % filters}`.
    #[serde(default)]
    pub filters: Option<u64>,
    /// The index of this target's first connection, for keys and filters.
    pub first_index: u64,
}

/// What one worker does.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkerSpec {
    /// Where to connect.
    pub targets: Vec<Target>,
    /// Source addresses, used in turn.
    pub sources: Vec<Ipv4Addr>,
    /// Connections being opened at once.
    pub connect_concurrency: usize,
    /// Every `slow_every`-th connection (0: none) stops reading after its headers, with a
    /// small receive buffer: a stalled client.
    pub slow_every: usize,
    /// The worker exits by itself after this long.
    pub deadline_secs: u64,
    /// With `Some`, the connections read a table endpoint's snapshot, are timed and
    /// checked by it, and the worker says `snapshots` once every one has ended or failed;
    /// latencies are those of the live records after it, from the worker's start.
    #[serde(default)]
    pub table: Option<TableSpec>,
    /// Whether the connections ask for gzip, and decode it.
    #[serde(default)]
    pub compressed: bool,
}

/// What a worker measured between `measure` and `stop`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct WorkerReport {
    /// Connections that got a 200 and streamed.
    pub connected: u64,
    /// Connections that could not be opened.
    pub failed: u64,
    /// Stalled connections among `connected`.
    pub slow: u64,
    /// Events received in the window.
    pub events: u64,
    /// Sequence numbers skipped, summed over connections (in the window).
    pub gaps: u64,
    /// Events that repeated or went back in sequence (in the window).
    pub out_of_order: u64,
    /// Connections the server closed (at any time).
    pub closed_by_server: u64,
    /// Latencies per second of the window.
    pub slices: Vec<Histogram>,
    /// The same latencies in two stages, split where the bus took each record (its
    /// stream id, in milliseconds): publish (or Kafka produce) → bus, and bus → received.
    #[serde(default)]
    pub to_bus: Histogram,
    #[serde(default)]
    pub from_bus: Histogram,
    /// This worker's CPU time in the window, in seconds.
    pub cpu_secs: f64,
    /// The window's length, in seconds.
    pub window_secs: f64,
    /// The first error seen, if any.
    pub first_error: Option<String>,
    /// Response body bytes received, at any time.
    #[serde(default)]
    pub bytes: u64,
    /// Response body bytes received in the window.
    #[serde(default)]
    pub window_bytes: u64,
    /// What the connections read of a table endpoint's snapshot.
    #[serde(default)]
    pub snapshot: Option<SnapshotReport>,
}

#[derive(Debug, Default)]
struct State {
    measuring: Option<Instant>,
    report: WorkerReport,
    /// Each table connection's reading, by index.
    views: Vec<TableView>,
    /// Table connections whose snapshot ended or never will.
    finished: usize,
    /// When the worker started.
    started: Option<Instant>,
    /// The live record every table connection is awaited to receive.
    awaited: Option<u64>,
    /// Table connections that received it, by index.
    reached: Vec<bool>,
    /// Table connections that will never receive it: lost before their snapshot ended, or
    /// unable to resume.
    gone: usize,
    /// Whether `drained` was said.
    drained: bool,
}

impl State {
    fn record(&mut self, latency_us: u64, gap: u64, out_of_order: bool, bus_us: Option<u64>) {
        let Some(start) = self.measuring else {
            return;
        };
        if let Some(from_bus) = bus_us {
            // The id has whole milliseconds: the split is good to one.
            self.report
                .to_bus
                .record(latency_us.saturating_sub(from_bus));
            self.report.from_bus.record(from_bus.min(latency_us));
        }
        let slice = start.elapsed().as_secs() as usize;
        if self.report.slices.len() <= slice {
            self.report
                .slices
                .resize_with(slice + 1, Histogram::default);
        }
        self.report.slices[slice].record(latency_us);
        self.report.events += 1;
        self.report.gaps += gap;
        if out_of_order {
            self.report.out_of_order += 1;
        }
    }

    fn error(&mut self, error: String) {
        if self.report.first_error.is_none() {
            self.report.first_error = Some(error);
        }
    }

    /// Counts what a table connection's line meant.
    fn seen(&mut self, seen: Seen) {
        match seen {
            Seen::Nothing => {}
            Seen::Ended {
                rows,
                first_row,
                end,
            } => {
                let keys = self.views.first().map_or(0, |view| view.keys());
                let started = self.started;
                let snapshot = self.report.snapshot.get_or_insert_default();
                snapshot.complete += 1;
                snapshot.rows += rows;
                if rows != keys {
                    snapshot.short += 1;
                }
                snapshot.first_row.record(micros(first_row));
                snapshot.end.record(micros(end));
                snapshot.burst_secs =
                    started.map_or(0.0, |started| started.elapsed().as_secs_f64());
                self.finish_one();
            }
            Seen::Live { published_us } => {
                self.record(now_us().saturating_sub(published_us), 0, false, None);
            }
        }
    }

    /// A table connection failed or closed before its snapshot ended.
    fn lost(&mut self) {
        self.report.snapshot.get_or_insert_default().incomplete += 1;
        self.gone += 1;
        self.finish_one();
        self.check_drained();
    }

    /// Whether table connection `view` has now received the awaited record.
    fn check_reached(&mut self, view: usize) {
        let Some(awaited) = self.awaited else {
            return;
        };
        if !self.reached[view] && self.views[view].max_seq().is_some_and(|seq| seq >= awaited) {
            self.reached[view] = true;
            self.check_drained();
        }
    }

    /// Awaits live record `seq` on every table connection.
    fn await_seq(&mut self, seq: u64) {
        self.awaited = Some(seq);
        self.reached = vec![false; self.views.len()];
        self.drained = false;
        for view in 0..self.views.len() {
            self.check_reached(view);
        }
        self.check_drained();
    }

    fn check_drained(&mut self) {
        if self.awaited.is_none() || self.drained {
            return;
        }
        let reached = self.reached.iter().filter(|reached| **reached).count();
        if reached + self.gone >= self.views.len() {
            self.drained = true;
            emit(&serde_json::json!({"type": "drained", "reached": reached, "gone": self.gone}));
        }
    }

    fn finish_one(&mut self) {
        self.finished += 1;
        if self.finished == self.views.len() {
            let snapshot = self.report.snapshot.get_or_insert_default();
            // The worker started with the burst: its CPU time so far is the burst's.
            let cpu = cpu_ticks(std::process::id());
            emit(&serde_json::json!({
                "type": "snapshots",
                "complete": snapshot.complete,
                "incomplete": snapshot.incomplete,
                "bytes": self.report.bytes,
                "cpu_secs": cpu.map_or(0.0, |ticks| ticks as f64 / ticks_per_second()),
            }));
        }
    }
}

fn micros(elapsed: Duration) -> u64 {
    u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX)
}

type Shared = Rc<RefCell<State>>;

/// Runs a worker until `stop`, end of stdin, or its deadline; prints JSON lines.
pub(crate) fn run(spec: &WorkerSpec) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&runtime, drive(spec.clone()))
}

#[allow(
    clippy::print_stdout,
    reason = "the controller reads the worker's stdout"
)]
fn emit(value: &serde_json::Value) {
    println!("{value}");
}

async fn drive(spec: WorkerSpec) -> anyhow::Result<()> {
    let state: Shared = Rc::default();
    if let Some(table) = spec.table {
        let mut state = state.borrow_mut();
        state.started = Some(Instant::now());
        state.measuring = state.started;
        let count = spec.targets.iter().map(|target| target.count).sum();
        state.views = (0..count).map(|_| TableView::new(table.keys)).collect();
        state.report.snapshot = Some(SnapshotReport::default());
    }
    let deadline = tokio::time::sleep(Duration::from_secs(spec.deadline_secs));
    tokio::pin!(deadline);
    let permits = Rc::new(tokio::sync::Semaphore::new(spec.connect_concurrency.max(1)));
    let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel::<bool>();
    let mut total = 0_usize;
    for target in &spec.targets {
        for i in 0..target.count {
            let slow = spec.slow_every > 0 && total % spec.slow_every == spec.slow_every - 1;
            let index = target.first_index + i as u64;
            let source = source_of(&spec.sources, index);
            let path = match (target.keys, target.filters) {
                (Some(keys), _) => format!("{}?key=k{}", target.path, index % keys),
                (None, Some(filters)) => format!(
                    "{}?filter=value.bucket%20%3D%3D%20{}",
                    target.path,
                    index % filters
                ),
                (None, None) => target.path.clone(),
            };
            let request = format!(
                "GET {path} HTTP/1.1\r\nHost: {}\r\nAccept: text/event-stream\r\nCache-Control: no-cache\r\n{}\r\n",
                target.address,
                if spec.compressed {
                    "Accept-Encoding: gzip\r\n"
                } else {
                    ""
                }
            );
            let address = target.address;
            let view = spec.table.is_some().then_some(total);
            let state = Rc::clone(&state);
            let permits = Rc::clone(&permits);
            let done = done_tx.clone();
            tokio::task::spawn_local(async move {
                connection(address, source, request, slow, view, state, permits, done).await;
            });
            total += 1;
        }
    }
    drop(done_tx);
    let mut stdin = BufReader::new(tokio::io::stdin()).lines();
    let mut answered = 0;
    let mut connected_sent = total == 0;
    if connected_sent {
        emit(&serde_json::json!({"type": "connected", "connected": 0, "failed": 0}));
    }
    let mut cpu_start = 0;
    loop {
        tokio::select! {
            () = &mut deadline => break,
            Some(ok) = done_rx.recv(), if !connected_sent => {
                answered += 1;
                let mut state = state.borrow_mut();
                if ok { state.report.connected += 1 } else { state.report.failed += 1 }
                if answered == total {
                    connected_sent = true;
                    emit(&serde_json::json!({
                        "type": "connected",
                        "connected": state.report.connected,
                        "failed": state.report.failed,
                        "first_error": state.report.first_error,
                    }));
                }
            }
            line = stdin.next_line() => match line {
                Ok(Some(line)) if line.trim() == "measure" => {
                    cpu_start = cpu_ticks(std::process::id()).unwrap_or(0);
                    state.borrow_mut().measuring = Some(Instant::now());
                }
                Ok(Some(line)) if line.trim() == "stop" => break,
                Ok(Some(line)) if line.starts_with("await ") => {
                    if let Ok(seq) = line["await ".len()..].trim().parse() {
                        state.borrow_mut().await_seq(seq);
                    }
                }
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => break,
            },
        }
    }
    let mut state = state.borrow_mut();
    if let Some(start) = state.measuring.take() {
        state.report.window_secs = start.elapsed().as_secs_f64();
        let ticks = cpu_ticks(std::process::id()).unwrap_or(0) - cpu_start;
        state.report.cpu_secs = ticks as f64 / ticks_per_second();
    }
    let mut report = std::mem::take(&mut state.report);
    if let Some(snapshot) = &mut report.snapshot {
        for view in &state.views {
            snapshot.add(view);
        }
    }
    emit(&serde_json::json!({"type": "report", "report": report}));
    // Connections close with the process.
    std::process::exit(0);
}

/// One connection; `view` is its table view's index, for a table endpoint.
#[allow(clippy::too_many_arguments, reason = "a task's inputs, passed once")]
async fn connection(
    address: SocketAddr,
    source: SocketAddrV4,
    request: String,
    slow: bool,
    view: Option<usize>,
    state: Shared,
    permits: Rc<tokio::sync::Semaphore>,
    done: tokio::sync::mpsc::UnboundedSender<bool>,
) {
    if let Some(view) = view {
        state.borrow_mut().views[view].start();
    }
    let permit = permits.acquire().await;
    let mut opened = None;
    for attempt in 0..CONNECT_ATTEMPTS {
        let from = match attempt {
            0 => source,
            _ => spare_port(source),
        };
        match open(address, from, &request, slow).await {
            Ok(stream) => {
                opened = Some(stream);
                break;
            }
            Err(error) => {
                state
                    .borrow_mut()
                    .error(format!("{address} from {source}: {error}"));
                tokio::time::sleep(retry_pause(attempt)).await;
            }
        }
    }
    drop(permit);
    let Some((mut stream, leftover, gzip)) = opened else {
        if view.is_some() {
            state.borrow_mut().lost();
        }
        let _ = done.send(false);
        return;
    };
    let _ = done.send(true);
    if slow {
        state.borrow_mut().report.slow += 1;
        // Never reads again; the server must cut it off. Held until the process exits.
        std::future::pending::<()>().await;
    }
    // A snapshot is megabytes: fewer, larger reads.
    let mut buffer = vec![0_u8; if view.is_some() { 64 * 1024 } else { 4096 }];
    let (mut leftover, mut gzip) = (leftover, gzip);
    loop {
        let mut decoder = Decoder {
            view,
            gunzip: gzip.then(|| Box::new(Gunzip::new())),
            ..Decoder::default()
        };
        decoder.feed(&leftover, &state);
        loop {
            match stream.read(&mut buffer).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let mut shared = state.borrow_mut();
                    shared.report.bytes += n as u64;
                    if shared.measuring.is_some() {
                        shared.report.window_bytes += n as u64;
                    }
                    drop(shared);
                    decoder.feed(&buffer[..n], &state);
                }
            }
        }
        let resume = {
            let mut state = state.borrow_mut();
            state.report.closed_by_server += 1;
            let Some(view) = view else {
                return;
            };
            if !state.views[view].ended() {
                state.lost();
                return;
            }
            // After its snapshot, a client resumes from the last id it read.
            state.views[view].reopened();
            let last_id = state.views[view].last_id().unwrap_or("0-0").to_owned();
            state.report.snapshot.get_or_insert_default().resumed += 1;
            resuming(&request, &last_id)
        };
        let mut reopened = None;
        for attempt in 0..CONNECT_ATTEMPTS {
            tokio::time::sleep(retry_pause(attempt)).await;
            match open(address, spare_port(source), &resume, false).await {
                Ok(opened) => {
                    reopened = Some(opened);
                    break;
                }
                Err(error) => state
                    .borrow_mut()
                    .error(format!("resuming {address} from {source}: {error}")),
            }
        }
        let Some((again, head_rest, again_gzip)) = reopened else {
            let mut state = state.borrow_mut();
            state.gone += 1;
            state.check_drained();
            return;
        };
        stream = again;
        leftover = head_rest;
        gzip = again_gzip;
    }
}

/// How often a connection is tried before it counts as failed. A million connecting to
/// busy servers overflowed some accept queues for seconds at a time: the pauses between
/// tries add up to about 25 s, which outlasts that.
const CONNECT_ATTEMPTS: u32 = 8;

/// The pause after try `attempt` (from 0): 0.1 s, doubling, at most 6.4 s.
fn retry_pause(attempt: u32) -> Duration {
    Duration::from_millis(100 << attempt.min(6))
}

/// `request` with a `Last-Event-ID` header.
fn resuming(request: &str, last_id: &str) -> String {
    let head = request.strip_suffix("\r\n").unwrap_or(request);
    format!("{head}Last-Event-ID: {last_id}\r\n\r\n")
}

/// The source address and port of connection `index`: spread over the source addresses,
/// each (address, port) its own across all workers. Binding to port 0 instead makes the
/// kernel search for a port that no socket of the address holds, which past a few hundred
/// thousand connections took most of both cores and stalled connecting (the search in
/// `inet_bind2_bucket_find`, seen with `perf`); a given port is one lookup.
fn source_of(sources: &[Ipv4Addr], index: u64) -> SocketAddrV4 {
    let count = sources.len().max(1) as u64;
    let address = sources
        .get((index % count) as usize)
        .copied()
        .unwrap_or(Ipv4Addr::LOCALHOST);
    let port = FIRST_SOURCE_PORT + (index / count % SOURCE_PORTS) as u16;
    SocketAddrV4::new(address, port)
}

/// Ports `FIRST_SOURCE_PORT..FIRST_SOURCE_PORT + SOURCE_PORTS` of each source address are
/// the load generator's: 40 addresses of 40,000 ports are room for 1.6 million connections.
const FIRST_SOURCE_PORT: u16 = 20_000;
const SOURCE_PORTS: u64 = 40_000;

/// `source`'s address with a port past those assigned, at random, for a retry: its own port
/// may be held yet, and leaving the choice to the kernel is the slow search.
fn spare_port(source: SocketAddrV4) -> SocketAddrV4 {
    let first_spare = FIRST_SOURCE_PORT + SOURCE_PORTS as u16;
    SocketAddrV4::new(*source.ip(), fastrand::u16(first_spare..=u16::MAX))
}

/// Connects from `source`, sends the request, reads the response head; returns the stream
/// and the body bytes read with the head.
async fn open(
    address: SocketAddr,
    source: SocketAddrV4,
    request: &str,
    slow: bool,
) -> anyhow::Result<(tokio::net::TcpStream, Vec<u8>, bool)> {
    let socket = TcpSocket::new_v4()?;
    // A given port may still be in TIME_WAIT from an earlier run.
    socket.set_reuseaddr(true)?;
    socket.bind(source.into())?;
    if slow {
        socket.set_recv_buffer_size(4096)?;
    }
    let mut stream = tokio::time::timeout(Duration::from_secs(20), socket.connect(address))
        .await
        .map_err(|_| anyhow::anyhow!("connect timed out"))??;
    stream.set_nodelay(true)?;
    stream.write_all(request.as_bytes()).await?;
    let mut head = Vec::with_capacity(512);
    let mut buffer = [0_u8; 1024];
    let read_head = async {
        loop {
            let n = stream.read(&mut buffer).await?;
            if n == 0 {
                anyhow::bail!("closed before the response head");
            }
            head.extend_from_slice(&buffer[..n]);
            if let Some(end) = find(&head, b"\r\n\r\n") {
                return Ok(end + 4);
            }
            if head.len() > 16 * 1024 {
                anyhow::bail!("response head too long");
            }
        }
    };
    let end = tokio::time::timeout(Duration::from_secs(20), read_head)
        .await
        .map_err(|_| anyhow::anyhow!("no response head within 20 s"))??;
    if !head.starts_with(b"HTTP/1.1 200") {
        let line = String::from_utf8_lossy(&head[..find(&head, b"\r\n").unwrap_or(head.len())])
            .into_owned();
        anyhow::bail!("refused: {line}");
    }
    let lower = head[..end].to_ascii_lowercase();
    if find(&lower, b"transfer-encoding: chunked").is_none() {
        anyhow::bail!("expected a chunked response");
    }
    let gzip = find(&lower, b"content-encoding: gzip").is_some();
    let leftover = head.split_off(end);
    Ok((stream, leftover, gzip))
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack
        .windows(needle.len())
        .position(|window| window == needle)
}

/// The number after `"name":` in `line`.
fn number_after(line: &[u8], name: &[u8]) -> Option<u64> {
    let start = find(line, name)? + name.len();
    let digits = line[start..]
        .iter()
        .take_while(|byte| byte.is_ascii_digit())
        .count();
    std::str::from_utf8(&line[start..start + digits])
        .ok()?
        .parse()
        .ok()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    /// Reading the hex size line.
    Size,
    /// This many data bytes left in the chunk.
    Data(usize),
    /// Skipping the CRLF after a chunk's data.
    Trailer(u8),
}

/// Decodes a gzip response body as its pieces arrive, as a browser does.
#[derive(Debug)]
struct Gunzip {
    /// The gzip header's bytes still to skip (Fjord's has no optional fields).
    header_left: usize,
    inflate: flate2::Decompress,
    text: Vec<u8>,
}

impl Gunzip {
    fn new() -> Self {
        Self {
            header_left: 10,
            inflate: flate2::Decompress::new(false),
            text: Vec::new(),
        }
    }

    /// The text `bytes` decode to; the trailer after the last block is ignored.
    fn inflate(&mut self, bytes: &[u8]) -> Result<&[u8], flate2::DecompressError> {
        let skipped = self.header_left.min(bytes.len());
        self.header_left -= skipped;
        let mut input = &bytes[skipped..];
        self.text.clear();
        while !input.is_empty() {
            self.text.reserve(input.len() * 4 + 1024);
            let read = self.inflate.total_in();
            let status = self.inflate.decompress_vec(
                input,
                &mut self.text,
                flate2::FlushDecompress::Sync,
            )?;
            let used = usize::try_from(self.inflate.total_in() - read).unwrap_or(input.len());
            input = &input[used..];
            if status == flate2::Status::StreamEnd {
                break;
            }
        }
        Ok(&self.text)
    }
}

/// Undoes chunked transfer encoding (and gzip) and splits the SSE stream into lines.
#[derive(Debug)]
struct Decoder {
    chunk: Chunk,
    size: usize,
    line: Vec<u8>,
    last_seq: Option<u64>,
    /// The connection's table view's index, for a table endpoint.
    view: Option<usize>,
    gunzip: Option<Box<Gunzip>>,
    /// The milliseconds of the last `id:` line, where the bus took the event it heads.
    bus_ms: Option<u64>,
}

impl Default for Decoder {
    fn default() -> Self {
        Self {
            chunk: Chunk::Size,
            size: 0,
            line: Vec::with_capacity(512),
            last_seq: None,
            view: None,
            gunzip: None,
            bus_ms: None,
        }
    }
}

impl Decoder {
    fn feed(&mut self, mut bytes: &[u8], state: &Shared) {
        while !bytes.is_empty() {
            match self.chunk {
                Chunk::Size => {
                    let byte = bytes[0];
                    bytes = &bytes[1..];
                    match byte {
                        b'\n' => {
                            self.chunk = if self.size == 0 {
                                Chunk::Trailer(2)
                            } else {
                                Chunk::Data(self.size)
                            };
                            self.size = 0;
                        }
                        b'0'..=b'9' => self.size = self.size * 16 + usize::from(byte - b'0'),
                        b'a'..=b'f' => self.size = self.size * 16 + usize::from(byte - b'a' + 10),
                        b'A'..=b'F' => self.size = self.size * 16 + usize::from(byte - b'A' + 10),
                        _ => {}
                    }
                }
                Chunk::Data(left) => {
                    let take = left.min(bytes.len());
                    self.data(&bytes[..take], state);
                    bytes = &bytes[take..];
                    self.chunk = if take == left {
                        Chunk::Trailer(2)
                    } else {
                        Chunk::Data(left - take)
                    };
                }
                Chunk::Trailer(left) => {
                    bytes = &bytes[1..];
                    self.chunk = if left == 1 {
                        Chunk::Size
                    } else {
                        Chunk::Trailer(left - 1)
                    };
                }
            }
        }
    }

    /// A chunk's data: SSE text, or gzip to decode first.
    fn data(&mut self, bytes: &[u8], state: &Shared) {
        let Some(mut gunzip) = self.gunzip.take() else {
            self.lines(bytes, state);
            return;
        };
        match gunzip.inflate(bytes) {
            Ok(text) => self.lines(text, state),
            Err(error) => state.borrow_mut().error(format!("gzip: {error}")),
        }
        self.gunzip = Some(gunzip);
    }

    fn lines(&mut self, mut bytes: &[u8], state: &Shared) {
        while let Some(end) = bytes.iter().position(|&byte| byte == b'\n') {
            if self.line.is_empty() {
                self.on_line(&bytes[..end], state);
            } else {
                self.line.extend_from_slice(&bytes[..end]);
                let line = std::mem::take(&mut self.line);
                self.on_line(&line, state);
                self.line = line;
                self.line.clear();
            }
            bytes = &bytes[end + 1..];
        }
        self.line.extend_from_slice(bytes);
    }

    fn on_line(&mut self, line: &[u8], state: &Shared) {
        if let Some(view) = self.view {
            let mut state = state.borrow_mut();
            let seen = state.views[view].line(line);
            if let Seen::Live { .. } = seen {
                state.check_reached(view);
            }
            state.seen(seen);
            return;
        }
        if let Some(id) = line.strip_prefix(b"id: ") {
            self.bus_ms = std::str::from_utf8(id)
                .ok()
                .and_then(|id| id.split('-').next())
                .and_then(|ms| ms.parse().ok());
            return;
        }
        if !line.starts_with(b"data: ") {
            return;
        }
        let (Some(seq), Some(sent)) = (
            number_after(line, b"\"seq\":"),
            number_after(line, b"\"ts\":"),
        ) else {
            return;
        };
        let now = now_us();
        let latency = now.saturating_sub(sent);
        let bus_us = self
            .bus_ms
            .take()
            .map(|ms| now.saturating_sub(ms.saturating_mul(1_000)));
        let (gap, out_of_order) = match self.last_seq {
            Some(last) if seq > last => (seq - last - 1, false),
            Some(_) => (0, true),
            None => (0, false),
        };
        self.last_seq = Some(self.last_seq.map_or(seq, |last| last.max(seq)));
        state
            .borrow_mut()
            .record(latency, gap, out_of_order, bus_us);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_million_connections_each_have_their_own_source_address_and_port() {
        let sources: Vec<Ipv4Addr> = (0..40).map(|i| Ipv4Addr::new(127, 0, 0, 2 + i)).collect();
        let mut seen = std::collections::HashSet::new();
        for index in 0..1_000_000 {
            let source = source_of(&sources, index);
            assert!(source.port() >= FIRST_SOURCE_PORT, "{source}");
            assert!(seen.insert(source), "{source} twice");
        }
    }

    #[test]
    fn decodes_chunks_split_anywhere_and_counts_gaps() {
        let events = [
            "id: 1-0\nevent: bench\ndata: {\"value\":{\"seq\":1,\"ts\":1}}\n\n",
            "id: 2-0\nevent: bench\ndata: {\"value\":{\"seq\":2,\"ts\":1}}\n\n: heartbeat\n\n",
            "id: 4-0\nevent: bench\ndata: {\"value\":{\"seq\":4,\"ts\":1}}\n\n",
        ];
        let mut wire = Vec::new();
        for event in events {
            wire.extend_from_slice(format!("{:X}\r\n{event}\r\n", event.len()).as_bytes());
        }
        for split in [1, 3, 7, wire.len()] {
            let state: Shared = Rc::default();
            state.borrow_mut().measuring = Some(Instant::now());
            let mut decoder = Decoder::default();
            for piece in wire.chunks(split) {
                decoder.feed(piece, &state);
            }
            let report = &state.borrow().report;
            assert_eq!(report.events, 3, "split {split}");
            assert_eq!(report.gaps, 1, "split {split}");
            assert_eq!(report.out_of_order, 0);
        }
    }

    #[test]
    fn a_resume_asks_for_what_follows_the_last_id() {
        let request = "GET /v1/streams/bench HTTP/1.1\r\nHost: x\r\n\r\n";
        assert_eq!(
            resuming(request, "5-0"),
            "GET /v1/streams/bench HTTP/1.1\r\nHost: x\r\nLast-Event-ID: 5-0\r\n\r\n"
        );
    }

    #[test]
    fn reads_a_table_snapshot_split_anywhere() {
        let row = |key: u64| {
            format!(
                "event: bench\ndata: {{\"key\":\"driver-{key:06}\",\"value\":{{\"seq\":{key},\"ts\":1}}}}\n\n"
            )
        };
        let mut events = vec![
            "retry: 1000\nid: 0-0\n\n".to_owned(),
            "event: fjord.snapshot_start\ndata: {\"endpoint\":\"bench\"}\n\n".to_owned(),
        ];
        events.extend((0..3).map(row));
        events
            .push("id: 9-0\nevent: fjord.snapshot_end\ndata: {\"endpoint\":\"bench\"}\n\n".into());
        events.push(
            "id: 10-0\nevent: bench\ndata: {\"key\":\"driver-000001\",\"value\":{\"seq\":3,\"prev\":1,\"ts\":1}}\n\n".into(),
        );
        let mut wire = Vec::new();
        for event in &events {
            wire.extend_from_slice(format!("{:X}\r\n{event}\r\n", event.len()).as_bytes());
        }
        for split in [1, 5, 64, wire.len()] {
            let state: Shared = Rc::default();
            {
                let mut state = state.borrow_mut();
                state.started = Some(Instant::now());
                state.measuring = state.started;
                state.views = vec![TableView::new(3)];
                state.report.snapshot = Some(SnapshotReport::default());
            }
            let mut decoder = Decoder {
                view: Some(0),
                ..Decoder::default()
            };
            for piece in wire.chunks(split) {
                decoder.feed(piece, &state);
            }
            // It has received live record 3, not 4.
            state.borrow_mut().await_seq(4);
            assert!(!state.borrow().drained);
            state.borrow_mut().await_seq(3);
            assert!(state.borrow().drained);
            let state = state.borrow();
            let snapshot = state.report.snapshot.as_ref().expect("a snapshot report");
            assert_eq!(state.finished, 1, "split {split}");
            assert_eq!(snapshot.complete, 1, "split {split}");
            assert_eq!((snapshot.rows, snapshot.short), (3, 0), "split {split}");
            assert_eq!(snapshot.first_row.count, 1);
            // The live record after the snapshot, timed.
            assert_eq!(state.report.events, 1, "split {split}");
            let mut finished = snapshot.clone();
            finished.add(&state.views[0]);
            assert_eq!(
                (finished.unordered, finished.unexpected, finished.live),
                (0, 0, 1)
            );
            assert_eq!(finished.maps.len(), 1);
            assert_eq!(finished.maps[0].held, 3);
        }
    }
}
