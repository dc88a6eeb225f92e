//! The hub: one per server process. It takes entries from the bus reader, renders each
//! event once, and queues the shared bytes to the connections that should receive it —
//! found through an index by endpoint and record key, so that the cost of a record follows
//! its receivers, not the number of connections. Each connection has a bounded queue; one
//! that fills up is cut off and resumes by id. One timer sends every heartbeat. A marker of
//! records the consumer could not read goes to every connection of its endpoint, whatever
//! its keys, as `fjord.gap`; so does an entry the bus found invalid, to the connections that
//! would have had its record (all of them when its key is unknown).

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock, PoisonError, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::stream::{BoxStream, Stream, StreamExt};
use tokio::time::Instant;

use crate::backoff::Backoff;
use crate::bus::{Bus, BusEntry, BusError, BusReader, EntryKind, Receivers, StreamId};
use crate::clock::now_ms;
use crate::config::{EndpointName, ServerConfig, StartPosition};
use crate::keys::{ClientId, KeyIndex, KeySet};
use crate::metrics::Metrics;
use crate::process::LogThrottle;
use crate::queue::{Delivery, PushError, Queue};
use crate::replay::{ReplayItem, ReplayRange, replay};
use crate::sse::{self, RenderedEvent, ResumeId};

/// Most receivers of an event that the hub writes to itself, about 10 ms of system calls.
const MAX_DIRECT_WRITES: usize = 1_000;
/// Most frames written to a connection in one write.
const MAX_COALESCED_FRAMES: usize = 64;
/// About the most replayed bytes written to a connection in one write (one event may pass
/// it): a resuming connection holds its replay's page and this.
const REPLAY_CHUNK_BYTES: usize = 64 * 1024;
/// Longest pause between failed bus reads.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// The bus counts as unreachable when no read succeeded for this long.
const READY_WINDOW_MS: u64 = 5_000;

/// A connection's queue, shared by the hub's indexes (which push) and its subscription
/// (which takes).
type ClientQueue = Arc<Outlet>;

/// A connection as the hub reaches it: its queue, and once the connection is live, a way to
/// write to its socket at once.
#[derive(Debug)]
struct Outlet {
    queue: Queue<Frame>,
    direct: OnceLock<Arc<dyn DirectWrite>>,
}

impl Outlet {
    fn push(&self, frame: Frame) -> Result<(), PushError> {
        self.queue.push(frame)
    }

    /// Queues an event, or writes it to the socket in the connection task's place when
    /// the task waits on an empty queue and the socket takes it without waiting: one
    /// system call instead of a queue, a wake-up and a poll.
    fn push_event(&self, event: &Arc<QueuedEvent>, may_write: bool) -> Result<(), PushError> {
        let frame = Frame::Event(Arc::clone(event));
        match self.direct.get() {
            Some(direct) if may_write => {
                self.queue
                    .push_or_deliver(frame, |_| match direct.write_now(event.event.bytes()) {
                        WrittenNow::All => Delivery::Done,
                        WrittenNow::Part(rest) => Delivery::Rest(Frame::Wire(Arc::new(rest))),
                        WrittenNow::Nothing => Delivery::Refused,
                    })
            }
            _ => self.queue.push(frame),
        }
    }
}

/// Writes an event to a connection's socket without waiting, framed as the connection's
/// transfer encoding wants.
pub trait DirectWrite: Send + Sync + std::fmt::Debug {
    /// Writes `sse` now, as much of it as the socket takes.
    fn write_now(&self, sse: &[u8]) -> WrittenNow;
}

/// How much of an event [`DirectWrite::write_now`] wrote.
#[derive(Debug)]
pub enum WrittenNow {
    /// All of it.
    All,
    /// Part: these framed bytes are still to be written, before anything else.
    Part(Bytes),
    /// Nothing: the socket would have blocked, or failed.
    Nothing,
}

/// What a connection writes next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outgoing {
    /// SSE text, to be framed as the connection's transfer encoding wants.
    Events(Bytes),
    /// Framed already: the rest of an event the hub began to write itself.
    Wire(Bytes),
}

/// An event as queued to every receiving connection: one allocation per event, shared.
#[derive(Debug)]
struct QueuedEvent {
    endpoint: usize,
    id: StreamId,
    event: RenderedEvent,
    /// When the hub queued it; a connection that takes it much later is cut off.
    queued_at: Instant,
}

/// What goes into a connection's queue: one pointer and a tag, so that a queue of many
/// events stays small.
#[derive(Debug, Clone)]
enum Frame {
    Event(Arc<QueuedEvent>),
    Raw(Arc<Bytes>),
    /// The rest of an event the hub began to write itself; always first in its queue.
    Wire(Arc<Bytes>),
}

/// The connections of one endpoint.
#[derive(Debug, Default)]
struct Channel {
    /// Connections that receive every record.
    everyone: HashMap<ClientId, ClientQueue>,
    /// Connections that receive only records with one of their keys, by key.
    by_key: KeyIndex<ClientQueue>,
    /// The id of the last entry queued to this channel's connections. Written under the
    /// read lock by the one dispatcher, read under the write lock by a new subscriber.
    last_ms: AtomicU64,
    last_seq: AtomicU64,
}

impl Channel {
    /// Every connection of the endpoint once, whatever its keys.
    fn all_receivers(&self) -> impl Iterator<Item = (ClientId, &ClientQueue)> {
        self.everyone
            .iter()
            .map(|(&client, sender)| (client, sender))
            .chain(self.by_key.all())
    }

    fn last_id(&self) -> StreamId {
        StreamId {
            ms: self.last_ms.load(Relaxed),
            seq: self.last_seq.load(Relaxed),
        }
    }
}

#[derive(Debug)]
struct Client {
    sender: ClientQueue,
    endpoints: Vec<usize>,
    keys: Option<Arc<KeySet>>,
    /// When its token runs out, in seconds since the epoch.
    expires_at: Option<u64>,
}

/// The hub of one server process.
#[derive(Debug)]
pub struct Hub {
    endpoints: Vec<EndpointName>,
    starts: Vec<StartPosition>,
    bus: Bus,
    channels: Vec<RwLock<Channel>>,
    clients: Mutex<HashMap<ClientId, Client>>,
    /// Connections by the time their token runs out.
    expiries: Mutex<BTreeSet<(u64, ClientId)>>,
    next_client: AtomicU64,
    queue_size: usize,
    max_lag: Duration,
    retry_ms: u64,
    last_read_ms: AtomicU64,
    draining: AtomicBool,
    metrics: Arc<Metrics>,
}

fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    // Every critical section below leaves the maps consistent, so a poisoned lock is usable.
    lock.read().unwrap_or_else(PoisonError::into_inner)
}

fn write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(PoisonError::into_inner)
}

/// How a connection wants its records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interest {
    /// Indexes into the hub's endpoints, sorted, without repeats.
    pub endpoints: Vec<usize>,
    /// Only records with one of these keys; `None` for all.
    pub keys: Option<KeySet>,
}

impl Hub {
    /// A hub for `endpoints` (sorted, with where a new connection starts), whose bus
    /// reader starts after `reader_start` (one id each). `bus` serves replays.
    pub fn new(
        endpoints: Vec<(EndpointName, StartPosition)>,
        reader_start: &[StreamId],
        server: &ServerConfig,
        bus: Bus,
        metrics: Arc<Metrics>,
    ) -> Self {
        let (endpoints, starts): (Vec<_>, Vec<_>) = endpoints.into_iter().unzip();
        let channels = endpoints
            .iter()
            .enumerate()
            .map(|(i, _)| {
                let id = reader_start.get(i).copied().unwrap_or(StreamId::ZERO);
                RwLock::new(Channel {
                    last_ms: AtomicU64::new(id.ms),
                    last_seq: AtomicU64::new(id.seq),
                    ..Channel::default()
                })
            })
            .collect();
        Self {
            endpoints,
            starts,
            channels,
            clients: Mutex::new(HashMap::new()),
            expiries: Mutex::new(BTreeSet::new()),
            next_client: AtomicU64::new(0),
            queue_size: server.client_queue,
            max_lag: server.client_max_lag(),
            retry_ms: server.retry_ms,
            bus,
            last_read_ms: AtomicU64::new(0),
            draining: AtomicBool::new(false),
            metrics,
        }
    }

    /// The endpoints, in index order.
    pub fn endpoints(&self) -> &[EndpointName] {
        &self.endpoints
    }

    /// The index of an endpoint.
    pub fn endpoint_index(&self, name: &str) -> Option<usize> {
        self.endpoints
            .iter()
            .position(|endpoint| endpoint.as_str() == name)
    }

    /// The server's metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Whether the bus answered recently and the server is not draining.
    pub fn is_ready(&self) -> bool {
        !self.draining.load(Relaxed)
            && now_ms().saturating_sub(self.last_read_ms.load(Relaxed)) < READY_WINDOW_MS
    }

    fn clients(&self) -> std::sync::MutexGuard<'_, HashMap<ClientId, Client>> {
        self.clients.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn expiries(&self) -> std::sync::MutexGuard<'_, BTreeSet<(u64, ClientId)>> {
        self.expiries.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Registers a connection for live events, then plans what it must be sent first: the
    /// records after `resume` (one id per endpoint of the interest), or for a connection
    /// without one, the retention window of endpoints configured to start at the oldest.
    /// Registering before reading back means no record falls between the two. A connection
    /// whose token runs out at `expires_at` (seconds since the epoch) is sent `fjord.expired`
    /// then, and closed.
    pub fn subscribe(
        self: &Arc<Self>,
        interest: Interest,
        resume: Option<&ResumeId>,
        expires_at: Option<u64>,
    ) -> Subscription {
        let sender = Arc::new(Outlet {
            queue: Queue::new(self.queue_size),
            direct: OnceLock::new(),
        });
        let receiver = Arc::clone(&sender);
        let id = self.next_client.fetch_add(1, Relaxed);
        let mut live_start = Vec::with_capacity(interest.endpoints.len());
        // One set for the connection, shared with every endpoint's index, and with other
        // connections that asked for the same keys.
        let mut keys = interest.keys.map(Arc::new);
        for &endpoint in &interest.endpoints {
            let mut channel = write(&self.channels[endpoint]);
            match &mut keys {
                None => {
                    channel.everyone.insert(id, sender.clone());
                }
                Some(keys) => *keys = channel.by_key.insert(keys, id, sender.clone()),
            }
            live_start.push(channel.last_id());
        }
        self.clients().insert(
            id,
            Client {
                sender,
                endpoints: interest.endpoints.clone(),
                keys: keys.clone(),
                expires_at,
            },
        );
        if let Some(at) = expires_at {
            self.expiries().insert((at, id));
        }
        self.metrics.open_connections.fetch_add(1, Relaxed);

        let mut cursor = Vec::with_capacity(live_start.len());
        let mut ranges = Vec::new();
        for (position, (&endpoint, &live)) in interest.endpoints.iter().zip(&live_start).enumerate()
        {
            let from = match resume {
                Some(resume) => resume.0.get(position).map(|&after| (after, true)),
                None => (self.starts.get(endpoint) == Some(&StartPosition::Oldest))
                    .then_some((StreamId::ZERO, false)),
            };
            let Some((after, report_gap)) = from else {
                cursor.push(live);
                continue;
            };
            cursor.push(after);
            if after < live {
                ranges.push(ReplayRange {
                    endpoint,
                    after,
                    until: live,
                    report_gap,
                });
            }
        }
        let cursor = ResumeId(cursor);
        let backlog = (!ranges.is_empty()).then(|| {
            replay(
                self.bus.clone(),
                self.endpoints.clone(),
                ranges,
                self.queue_size,
            )
        });
        Subscription {
            prelude: Some(sse::prelude(self.retry_ms, &cursor)),
            backlog,
            page: VecDeque::new(),
            page_bytes: 0,
            replay_held: 0,
            handed_at: None,
            replayed_at: None,
            receiver,
            direct: None,
            endpoints: interest.endpoints,
            keys,
            cursor,
            hub: Arc::clone(self),
            id,
        }
    }

    /// Removes a connection from every index and closes its queue: its stream ends once the
    /// queue is drained.
    fn unsubscribe(&self, id: ClientId) -> bool {
        let Some(client) = self.clients().remove(&id) else {
            return false;
        };
        // The connection gets what is queued, then the end of its stream.
        client.sender.queue.close();
        if let Some(at) = client.expires_at {
            self.expiries().remove(&(at, id));
        }
        for &endpoint in &client.endpoints {
            let mut channel = write(&self.channels[endpoint]);
            match &client.keys {
                None => {
                    channel.everyone.remove(&id);
                }
                Some(keys) => {
                    channel.by_key.remove(keys, id);
                }
            }
        }
        true
    }

    /// Queues each entry to its receivers; cuts off connections whose queue is full.
    pub fn dispatch(&self, batch: &[(usize, BusEntry)]) {
        // Once a connection missed an event it must get nothing after it: its queue may
        // drain while the batch goes on, and a later event would move its last id past
        // the one it missed. It is cut off after the batch and resumes from before the hole.
        let mut too_slow = HashSet::new();
        // Writing in the connection tasks' place saves a wake-up and a poll per delivery,
        // but puts a system call per receiver on this one task: worth it while the feed
        // keeps up (one entry per read) and an event has few enough receivers to be written
        // in a few milliseconds; otherwise the tasks write in parallel and coalesce.
        let may_write_now = batch.len() == 1;
        for (endpoint, entry) in batch {
            let Some(lock) = self.channels.get(*endpoint) else {
                continue;
            };
            let Some(rendered) = self.render(*endpoint, entry) else {
                continue;
            };
            if let EntryKind::Invalid(invalid) = &entry.kind {
                self.metrics.bus_invalid_entries.fetch_add(1, Relaxed);
                static INVALID: LogThrottle = LogThrottle::new(Duration::from_secs(10));
                if let Some(held_back) = INVALID.admit() {
                    tracing::warn!(endpoint = self.endpoints[*endpoint].as_str(), id = %entry.id, problem = %invalid.problem, held_back, "a bus entry not written by fjord-consumer; clients get fjord.gap in its place");
                }
            }
            let event = Arc::new(QueuedEvent {
                endpoint: *endpoint,
                id: entry.id,
                event: rendered,
                queued_at: Instant::now(),
            });
            let channel = read(lock);
            let last = channel.last_id();
            if entry.previous > last {
                // Retention trimmed entries before this server read them: its live
                // connections missed them, and are told so, as a resuming client would be.
                let gap = Arc::new(sse::gap(self.endpoints[*endpoint].as_str(), last, entry.id));
                for (client, sender) in channel.all_receivers() {
                    if let Err(PushError::Full) = sender.push(Frame::Raw(Arc::clone(&gap))) {
                        too_slow.insert(client);
                    }
                }
            }
            let mut queued = 0;
            let mut deliver = |client: ClientId, sender: &ClientQueue, write_now: bool| {
                if !too_slow.is_empty() && too_slow.contains(&client) {
                    return;
                }
                match sender.push_event(&event, write_now) {
                    Ok(()) => queued += 1,
                    Err(PushError::Full) => {
                        too_slow.insert(client);
                    }
                    Err(PushError::Closed) => {}
                }
            };
            match entry.receivers() {
                Receivers::Key(key) => {
                    let write_now = may_write_now
                        && channel.everyone.len() + key.map_or(0, |key| channel.by_key.count(key))
                            <= MAX_DIRECT_WRITES;
                    let keyed = key
                        .into_iter()
                        .flat_map(|key| channel.by_key.receivers(key));
                    for (client, sender) in channel
                        .everyone
                        .iter()
                        .map(|(&client, sender)| (client, sender))
                        .chain(keyed)
                    {
                        deliver(client, sender, write_now);
                    }
                }
                Receivers::All => {
                    for (client, sender) in channel.all_receivers() {
                        deliver(client, sender, false);
                    }
                }
            }
            channel.last_ms.store(entry.id.ms, Relaxed);
            channel.last_seq.store(entry.id.seq, Relaxed);
            drop(channel);
            self.metrics.events_out.fetch_add(queued, Relaxed);
        }
        self.metrics
            .records_in
            .fetch_add(batch.len() as u64, Relaxed);
        if let Some((_, newest)) = batch.last() {
            self.metrics
                .bus_lag_ms
                .store(now_ms().saturating_sub(newest.id.ms), Relaxed);
        }
        self.cut_off(too_slow);
    }

    /// The event of a bus entry of `endpoint`; `None` for an endpoint the hub does not have.
    fn render(&self, endpoint: usize, entry: &BusEntry) -> Option<RenderedEvent> {
        let name = self.endpoints.get(endpoint)?.as_str();
        Some(match &entry.kind {
            EntryKind::Record { envelope, .. } => {
                RenderedEvent::new(entry.id, name, envelope.as_bytes())
            }
            EntryKind::Skipped(skipped) => sse::unreadable_gap(entry.id, name, skipped),
            EntryKind::Invalid(invalid) => sse::invalid_gap(entry.id, name, invalid.problem),
        })
    }

    fn cut_off(&self, clients: impl IntoIterator<Item = ClientId>) {
        for client in clients {
            if self.unsubscribe(client) {
                self.metrics.clients_dropped.fetch_add(1, Relaxed);
                tracing::debug!(client, "disconnected a client that fell behind");
            }
        }
    }

    /// Sends `bytes` to every connection, cutting off those that cannot take it.
    fn broadcast(&self, bytes: &Bytes) {
        let mut too_slow = Vec::new();
        let bytes = Arc::new(bytes.clone());
        for (&id, client) in self.clients().iter() {
            if let Err(PushError::Full) = client.sender.push(Frame::Raw(Arc::clone(&bytes))) {
                too_slow.push(id);
            }
        }
        self.cut_off(too_slow);
    }

    /// Sends a heartbeat to every connection each `interval`, forever.
    pub async fn run_heartbeats(self: Arc<Self>, interval: Duration) {
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticker.tick().await;
        loop {
            ticker.tick().await;
            self.broadcast(&sse::HEARTBEAT);
        }
    }

    /// Every `interval`, sends `fjord.expired` to the connections whose token ran out and
    /// closes them, forever.
    pub async fn run_expiries(self: Arc<Self>, interval: Duration) {
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            self.expire(now_ms() / 1000);
        }
    }

    fn expire(&self, now_secs: u64) {
        let expired: Vec<ClientId> = {
            let mut expiries = self.expiries();
            let still_valid = expiries.split_off(&(now_secs + 1, 0));
            std::mem::replace(&mut *expiries, still_valid)
                .into_iter()
                .map(|(_, id)| id)
                .collect()
        };
        if expired.is_empty() {
            return;
        }
        let notice = Arc::new(sse::notice(
            sse::reserved::EXPIRED,
            &serde_json::json!({"message": "your token expired; get a fresh one and reconnect with your last event id"}),
        ));
        for id in expired {
            if let Some(client) = self.clients().get(&id) {
                // A full queue needs no notice: the connection is being cut off anyway.
                let _ = client.sender.push(Frame::Raw(Arc::clone(&notice)));
            }
            self.unsubscribe(id);
        }
    }

    /// Feeds the hub from the bus forever, retrying failed reads with backoff; the reader
    /// keeps its position, so nothing is skipped.
    pub async fn run_feed(self: Arc<Self>, mut reader: BusReader) {
        let mut backoff = Backoff::new(Duration::from_millis(100), MAX_BACKOFF);
        loop {
            match reader.next_batch().await {
                Ok(batch) => {
                    self.last_read_ms.store(now_ms(), Relaxed);
                    backoff.reset();
                    self.dispatch(&batch);
                }
                Err(error) => {
                    self.metrics.bus_errors.fetch_add(1, Relaxed);
                    let retry_in = backoff.next_delay();
                    tracing::warn!(%error, ?retry_in, "bus read failed");
                    tokio::time::sleep(retry_in).await;
                }
            }
        }
    }

    /// Tells every connection to reconnect elsewhere and ends their streams.
    pub fn drain(&self) {
        self.draining.store(true, Relaxed);
        self.broadcast(&sse::notice(
            sse::reserved::SHUTDOWN,
            &serde_json::json!({"reason": "server shutting down; reconnect"}),
        ));
        let ids: Vec<ClientId> = self.clients().keys().copied().collect();
        for id in ids {
            self.unsubscribe(id);
        }
    }
}

/// The replay of a resuming connection.
type Backlog = BoxStream<'static, Result<ReplayItem, BusError>>;

/// One connection's stream of bytes: the prelude, then what it missed (when it resumes),
/// then its live events, several per write when they queue up. Dropping it unsubscribes the
/// connection.
pub struct Subscription {
    prelude: Option<Bytes>,
    backlog: Option<Backlog>,
    /// The replayed entries of the backlog's current page not yet written, and their bytes.
    page: VecDeque<(usize, BusEntry)>,
    page_bytes: usize,
    /// The replay's bytes this connection holds — its page, and the chunk it was handed
    /// last, written by the time it asks for more — as counted in the metrics.
    replay_held: usize,
    /// When it was handed its last replayed chunk.
    handed_at: Option<Instant>,
    /// When its replay ended: events queued while it replayed waited for the replay, not
    /// for the client, and do not count as lag.
    replayed_at: Option<Instant>,
    receiver: ClientQueue,
    /// Handed to the hub once the connection is live (see [`Subscription::write_directly`]).
    direct: Option<Arc<dyn DirectWrite>>,
    endpoints: Vec<usize>,
    keys: Option<Arc<KeySet>>,
    /// The connection's position in each of its endpoints: an event at or before it was
    /// sent already and is skipped.
    cursor: ResumeId,
    hub: Arc<Hub>,
    id: ClientId,
}

impl std::fmt::Debug for Subscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscription")
            .field("id", &self.id)
            .field("endpoints", &self.endpoints)
            .field("cursor", &self.cursor)
            .finish_non_exhaustive()
    }
}

impl Subscription {
    /// Lets the hub write this connection's events to its socket with `direct` in the
    /// connection task's place, once the connection is live: past its replay and its first
    /// live event, so that every later event is new to it. Not for a connection of several
    /// endpoints, whose events carry ids of its own.
    pub fn write_directly(&mut self, direct: Arc<dyn DirectWrite>) {
        if !self.is_multi_endpoint() {
            self.direct = Some(direct);
        }
    }

    fn is_multi_endpoint(&self) -> bool {
        self.endpoints.len() > 1
    }

    /// Moves the cursor to `id` if the event is new to this connection.
    fn advance(&mut self, endpoint: usize, id: StreamId) -> bool {
        let Some(position) = self.endpoints.iter().position(|&e| e == endpoint) else {
            return false;
        };
        if id <= self.cursor.0[position] {
            return false;
        }
        self.cursor.0[position] = id;
        true
    }

    fn write_event(
        &mut self,
        endpoint: usize,
        id: StreamId,
        event: &RenderedEvent,
        out: &mut BytesMut,
    ) {
        if !self.advance(endpoint, id) {
            return;
        }
        if self.is_multi_endpoint() {
            event.write_with_id(&self.cursor, out);
        } else {
            out.extend_from_slice(event.bytes());
        }
    }

    fn write_frame(&mut self, frame: Frame, out: &mut BytesMut) {
        match frame {
            Frame::Raw(bytes) => out.extend_from_slice(&bytes),
            Frame::Event(event) => self.write_event(event.endpoint, event.id, &event.event, out),
            // Never coalesced: it is taken alone, first (see `poll_next`).
            Frame::Wire(_) => {}
        }
    }

    fn write_replayed(&mut self, endpoint: usize, entry: &BusEntry, out: &mut BytesMut) {
        let wanted = match (&self.keys, entry.receivers()) {
            (None, _) | (_, Receivers::All) => true,
            (Some(keys), Receivers::Key(Some(key))) => keys.contains(key),
            (Some(_), Receivers::Key(None)) => false,
        };
        if wanted && let Some(event) = self.hub.render(endpoint, entry) {
            self.write_event(endpoint, entry.id, &event, out);
        }
    }

    /// Counts `bytes` as what this connection's replay holds now.
    fn hold_replay(&mut self, bytes: usize) {
        let signed = |bytes: usize| i64::try_from(bytes).unwrap_or(i64::MAX);
        self.hub
            .metrics
            .replay_buffered_bytes
            .fetch_add(signed(bytes) - signed(self.replay_held), Relaxed);
        self.replay_held = bytes;
    }

    /// Ends the replay early: the connection gets nothing more and resumes from what it got.
    fn abandon_replay(&mut self) {
        self.backlog = None;
        self.page = VecDeque::new();
        self.page_bytes = 0;
        self.hold_replay(0);
        self.receiver.queue.close_and_clear();
    }

    /// The next chunk of the replay: a page is read from the bus only once the last one is
    /// written, and written a chunk at a time, so that a connection holds at most a page
    /// and a chunk, however big the records.
    fn poll_backlog(&mut self, cx: &mut Context<'_>) -> Poll<Option<Bytes>> {
        // Asked for more, the connection has written what it was handed. One that took too
        // long is shed, as a live one whose events wait too long is, and resumes from what
        // it got.
        let too_slow = self
            .handed_at
            .take()
            .is_some_and(|handed| handed.elapsed() > self.hub.max_lag);
        if too_slow {
            self.hub.cut_off([self.id]);
            self.abandon_replay();
            return Poll::Ready(None);
        }
        if self.receiver.queue.is_closed() {
            // Cut off by the hub (its queue filled while it replayed), drained or expired:
            // its notices still go out, not the live events after what it was not sent.
            let mut notices = BytesMut::new();
            while let Some(frame) = self.receiver.queue.try_next_if(|_| true) {
                if let Frame::Raw(bytes) = frame {
                    notices.extend_from_slice(&bytes);
                }
            }
            self.abandon_replay();
            return Poll::Ready((!notices.is_empty()).then(|| notices.freeze()));
        }
        loop {
            if !self.page.is_empty() {
                let mut out = BytesMut::new();
                let mut frames = 0;
                while out.len() < REPLAY_CHUNK_BYTES && frames < MAX_COALESCED_FRAMES {
                    let Some((endpoint, entry)) = self.page.pop_front() else {
                        break;
                    };
                    self.page_bytes -= entry.size();
                    self.write_replayed(endpoint, &entry, &mut out);
                    frames += 1;
                }
                self.hold_replay(self.page_bytes + out.len());
                if !out.is_empty() {
                    self.handed_at = Some(Instant::now());
                    return Poll::Ready(Some(out.freeze()));
                }
                continue;
            }
            let Some(backlog) = &mut self.backlog else {
                return Poll::Ready(None);
            };
            match backlog.poll_next_unpin(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => {
                    self.backlog = None;
                    self.hold_replay(0);
                    self.replayed_at = Some(Instant::now());
                    return Poll::Ready(None);
                }
                Poll::Ready(Some(Err(error))) => {
                    // Ending the stream makes the client reconnect and resume from what
                    // it got.
                    tracing::warn!(%error, client = self.id, "replay failed; closing the stream");
                    self.abandon_replay();
                    return Poll::Ready(None);
                }
                Poll::Ready(Some(Ok(ReplayItem::Gap {
                    endpoint,
                    requested,
                    oldest,
                }))) => {
                    self.hold_replay(0);
                    let name = self
                        .hub
                        .endpoints
                        .get(endpoint)
                        .map_or("", EndpointName::as_str);
                    return Poll::Ready(Some(sse::gap(name, requested, oldest)));
                }
                Poll::Ready(Some(Ok(ReplayItem::Entries(entries)))) => {
                    self.page_bytes = entries.iter().map(|(_, entry)| entry.size()).sum();
                    self.page = entries.into();
                    self.hold_replay(self.page_bytes);
                }
            }
        }
    }
}

impl Stream for Subscription {
    type Item = Outgoing;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if let Some(prelude) = self.prelude.take() {
            return Poll::Ready(Some(Outgoing::Events(prelude)));
        }
        if self.backlog.is_some() {
            match self.poll_backlog(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(bytes)) => return Poll::Ready(Some(Outgoing::Events(bytes))),
                Poll::Ready(None) => {}
            }
        }
        loop {
            let first = match self.receiver.queue.poll_next(cx) {
                Poll::Ready(Some(frame)) => frame,
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Pending => return Poll::Pending,
            };
            // The oldest queued event tells how far behind this connection is. One that
            // cannot keep up is shed, so that an overloaded server's latency stays bounded
            // for the others; it resumes by id.
            if let Frame::Event(event) = &first
                && self
                    .replayed_at
                    .map_or(event.queued_at, |replayed| replayed.max(event.queued_at))
                    .elapsed()
                    > self.hub.max_lag
            {
                self.hub.cut_off([self.id]);
                self.receiver.queue.close_and_clear();
                return Poll::Ready(None);
            }
            if let Frame::Wire(rest) = first {
                return Poll::Ready(Some(Outgoing::Wire(Bytes::clone(&rest))));
            }
            let not_wire = |frame: &Frame| !matches!(frame, Frame::Wire(_));
            if let Some(second) = self.receiver.queue.try_next_if(not_wire) {
                let mut out = BytesMut::with_capacity(4096);
                self.write_frame(first, &mut out);
                self.write_frame(second, &mut out);
                for _ in 2..MAX_COALESCED_FRAMES {
                    match self.receiver.queue.try_next_if(not_wire) {
                        Some(frame) => self.write_frame(frame, &mut out),
                        None => break,
                    }
                }
                if !out.is_empty() {
                    return Poll::Ready(Some(Outgoing::Events(out.freeze())));
                }
                continue;
            }
            // The common case, one frame: its shared bytes go out without a copy.
            match first {
                Frame::Raw(bytes) => {
                    return Poll::Ready(Some(Outgoing::Events(Bytes::clone(&bytes))));
                }
                Frame::Event(event) if !self.is_multi_endpoint() => {
                    if self.advance(event.endpoint, event.id) {
                        // Live, and past what it was sent before: every later event is new
                        // to it, so the hub may write them itself.
                        if let Some(direct) = self.direct.take() {
                            let _ = self.receiver.direct.set(direct);
                        }
                        return Poll::Ready(Some(Outgoing::Events(event.event.bytes().clone())));
                    }
                }
                frame => {
                    let mut out = BytesMut::new();
                    self.write_frame(frame, &mut out);
                    if !out.is_empty() {
                        return Poll::Ready(Some(Outgoing::Events(out.freeze())));
                    }
                }
            }
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.hold_replay(0);
        self.hub.unsubscribe(self.id);
        self.hub.metrics.open_connections.fetch_sub(1, Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use futures_util::StreamExt;

    use super::*;
    use crate::bus::memory::MemoryBus;
    use crate::bus::{Publication, SkippedRecords, WireJson};
    use crate::config::Retention;
    use crate::envelope::Envelope;

    fn name(name: &str) -> EndpointName {
        EndpointName::try_from(name.to_owned()).expect("valid")
    }

    fn hub_with(
        queue_size: usize,
        bus: MemoryBus,
        start: &[StreamId],
        orders_start: StartPosition,
    ) -> Arc<Hub> {
        let server = ServerConfig {
            client_queue: queue_size,
            ..ServerConfig::default()
        };
        Arc::new(Hub::new(
            vec![
                (name("drivers"), StartPosition::Live),
                (name("orders"), orders_start),
            ],
            start,
            &server,
            Bus::Memory(bus),
            Arc::default(),
        ))
    }

    fn hub(queue_size: usize) -> Arc<Hub> {
        hub_with(
            queue_size,
            MemoryBus::new(),
            &[StreamId { ms: 5, seq: 0 }, StreamId::ZERO],
            StartPosition::Live,
        )
    }

    /// A hub fed from a memory bus by `reader`, as the server's feed does.
    async fn hub_on_memory_bus(orders_start: StartPosition) -> (MemoryBus, BusReader, Arc<Hub>) {
        let bus = MemoryBus::new();
        let reader = Bus::Memory(bus.clone())
            .reader(vec![name("drivers"), name("orders")])
            .await
            .expect("reader");
        let hub = hub_with(64, bus.clone(), reader.cursors(), orders_start);
        (bus, reader, hub)
    }

    fn entry(ms: u64, key: &str) -> BusEntry {
        BusEntry {
            id: StreamId { ms, seq: 0 },
            previous: StreamId::ZERO,
            kind: EntryKind::Record {
                filter_key: Some(Bytes::copy_from_slice(key.as_bytes())),
                envelope: WireJson::new(Bytes::from(format!("{{\"key\":\"{key}\"}}")))
                    .expect("an object"),
            },
        }
    }

    fn live(endpoints: Vec<usize>) -> Interest {
        Interest {
            endpoints,
            keys: None,
        }
    }

    async fn next_text(subscription: &mut Subscription) -> String {
        match subscription.next().await.expect("open") {
            Outgoing::Events(bytes) => String::from_utf8(bytes.to_vec()).expect("utf-8"),
            Outgoing::Wire(bytes) => panic!("no direct writes here: {bytes:?}"),
        }
    }

    /// Publishes `count` records of `orders` with keys k0, k1, … to the bus and lets the hub
    /// read them, as the server's feed does; returns their ids.
    async fn publish(
        hub: &Hub,
        bus: &MemoryBus,
        reader: &mut BusReader,
        first_offset: i64,
        count: i64,
        retention: Retention,
    ) -> Vec<StreamId> {
        publish_padded(hub, bus, reader, first_offset, count, retention, 0).await
    }

    /// Publishes `envelope` as record `offset` of partition 0 of the topic `orders`.
    async fn publish_envelope(
        bus: &MemoryBus,
        endpoints: &[(EndpointName, Retention)],
        offset: i64,
        envelope: &Envelope,
    ) {
        Bus::Memory(bus.clone())
            .publish(Publication {
                topic: "orders",
                partition: 0,
                offset,
                endpoints,
                envelope,
            })
            .await
            .expect("memory bus");
    }

    /// [`publish`] with `pad` more bytes in each record.
    async fn publish_padded(
        hub: &Hub,
        bus: &MemoryBus,
        reader: &mut BusReader,
        first_offset: i64,
        count: i64,
        retention: Retention,
        pad: usize,
    ) -> Vec<StreamId> {
        let endpoints = [(name("orders"), retention)];
        let pad = "x".repeat(pad);
        for offset in first_offset..first_offset + count {
            let envelope = Envelope {
                filter_key: Some(format!("k{offset}").into_bytes()),
                json: format!("{{\"offset\":{offset},\"pad\":\"{pad}\"}}").into_bytes(),
            };
            publish_envelope(bus, &endpoints, offset, &envelope).await;
        }
        let batch = reader.next_batch().await.expect("memory bus");
        hub.dispatch(&batch);
        batch.iter().map(|(_, entry)| entry.id).collect()
    }

    fn offsets(text: &str) -> Vec<i64> {
        text.lines()
            .filter_map(|line| line.strip_prefix("data: "))
            .filter_map(|data| serde_json::from_str::<serde_json::Value>(data).ok())
            .filter_map(|value| value["offset"].as_i64())
            .collect()
    }

    async fn read_offsets(subscription: &mut Subscription, count: usize) -> Vec<i64> {
        let mut seen = Vec::new();
        while seen.len() < count {
            seen.extend(offsets(&next_text(subscription).await));
        }
        seen
    }

    #[tokio::test]
    async fn events_reach_matching_connections_once() {
        let hub = hub(16);
        let mut all = hub.subscribe(live(vec![1]), None, None);
        let mut keyed = hub.subscribe(
            Interest {
                endpoints: vec![1],
                keys: Some(KeySet::new(["a", "c"])),
            },
            None,
            None,
        );
        assert_eq!(next_text(&mut all).await, "retry: 2000\nid: 0-0\n\n");
        assert_eq!(next_text(&mut keyed).await, "retry: 2000\nid: 0-0\n\n");
        hub.dispatch(&[(1, entry(10, "a"))]);
        hub.dispatch(&[(1, entry(11, "b"))]);
        assert_eq!(
            next_text(&mut all).await,
            "id: 10-0\nevent: orders\ndata: {\"key\":\"a\"}\n\nid: 11-0\nevent: orders\ndata: {\"key\":\"b\"}\n\n"
        );
        assert_eq!(
            next_text(&mut keyed).await,
            "id: 10-0\nevent: orders\ndata: {\"key\":\"a\"}\n\n"
        );
        assert_eq!(hub.metrics().events_out.load(Relaxed), 3);
        drop(all);
        drop(keyed);
        assert!(hub.clients().is_empty());
        assert!(read(&hub.channels[1]).by_key.is_empty());
    }

    #[tokio::test]
    async fn several_endpoints_carry_a_position_for_each() {
        let hub = hub(16);
        let mut both = hub.subscribe(live(vec![0, 1]), None, None);
        assert_eq!(next_text(&mut both).await, "retry: 2000\nid: 5-0_0-0\n\n");
        hub.dispatch(&[(1, entry(10, "a"))]);
        assert_eq!(
            next_text(&mut both).await,
            "id: 5-0_10-0\nevent: orders\ndata: {\"key\":\"a\"}\n\n"
        );
        hub.dispatch(&[(0, entry(12, "d"))]);
        assert_eq!(
            next_text(&mut both).await,
            "id: 12-0_10-0\nevent: drivers\ndata: {\"key\":\"d\"}\n\n"
        );
    }

    #[tokio::test]
    async fn a_full_queue_cuts_the_connection_off_after_what_was_queued() {
        let hub = hub(2);
        let mut slow = hub.subscribe(live(vec![1]), None, None);
        let mut fast = hub.subscribe(live(vec![1]), None, None);
        next_text(&mut slow).await;
        for ms in 10..13 {
            hub.dispatch(&[(1, entry(ms, "a"))]);
            next_text(&mut fast).await;
        }
        assert_eq!(hub.metrics().clients_dropped.load(Relaxed), 1);
        let queued = next_text(&mut slow).await;
        assert!(
            queued.starts_with("id: 10-0") && queued.contains("id: 11-0"),
            "{queued}"
        );
        assert!(slow.next().await.is_none(), "the stream ends");
        hub.dispatch(&[(1, entry(13, "a"))]);
        assert!(next_text(&mut fast).await.starts_with("id: 13-0"));
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_that_falls_behind_is_cut_off_and_the_others_are_not() {
        let hub = hub(64);
        let mut behind = hub.subscribe(live(vec![1]), None, None);
        let mut keeping_up = hub.subscribe(live(vec![1]), None, None);
        next_text(&mut behind).await;
        next_text(&mut keeping_up).await;
        hub.dispatch(&[(1, entry(10, "a"))]);
        assert!(next_text(&mut keeping_up).await.starts_with("id: 10-0"));
        tokio::time::advance(ServerConfig::default().client_max_lag() + Duration::from_millis(1))
            .await;
        hub.dispatch(&[(1, entry(11, "a"))]);
        assert!(
            behind.next().await.is_none(),
            "shed: its oldest event waited too long"
        );
        assert_eq!(hub.metrics().clients_dropped.load(Relaxed), 1);
        assert!(next_text(&mut keeping_up).await.starts_with("id: 11-0"));
    }

    /// Records what the hub writes in a connection task's place; the socket takes it all.
    #[derive(Debug, Default)]
    struct Recorder {
        written: Mutex<Vec<String>>,
    }

    impl DirectWrite for Recorder {
        fn write_now(&self, sse: &[u8]) -> WrittenNow {
            let mut written = self.written.lock().expect("not poisoned");
            written.push(String::from_utf8_lossy(sse).into_owned());
            WrittenNow::All
        }
    }

    #[tokio::test]
    async fn once_live_a_waiting_connection_s_events_are_written_in_its_place_in_order() {
        let hub = hub(8);
        let recorder = Arc::new(Recorder::default());
        let mut client = hub.subscribe(live(vec![1]), None, None);
        client.write_directly(Arc::clone(&recorder) as Arc<dyn DirectWrite>);
        next_text(&mut client).await;
        // The first live event goes through the queue, and makes the connection live.
        hub.dispatch(&[(1, entry(10, "a"))]);
        assert!(next_text(&mut client).await.starts_with("id: 10-0"));
        assert!(
            futures_util::FutureExt::now_or_never(client.next()).is_none(),
            "waits on its queue"
        );
        hub.dispatch(&[(1, entry(11, "a"))]);
        // A heartbeat wakes the task: what follows queues behind it, in order.
        hub.broadcast(&sse::HEARTBEAT);
        hub.dispatch(&[(1, entry(12, "a"))]);
        let written = recorder.written.lock().expect("not poisoned").clone();
        assert_eq!(written.len(), 1);
        assert!(written[0].starts_with("id: 11-0"), "{written:?}");
        let queued = next_text(&mut client).await;
        assert!(queued.starts_with(": heartbeat\n\n"), "{queued}");
        assert!(queued.contains("id: 12-0"), "{queued}");
        assert_eq!(hub.metrics().events_out.load(Relaxed), 3);
    }

    #[tokio::test]
    async fn a_subscriber_starts_after_the_last_dispatched_entry() {
        let hub = hub(4);
        hub.dispatch(&[(1, entry(20, "a"))]);
        let mut late = hub.subscribe(live(vec![1]), None, None);
        assert_eq!(next_text(&mut late).await, "retry: 2000\nid: 20-0\n\n");
    }

    #[tokio::test]
    async fn drain_says_shutdown_and_ends_streams() {
        let hub = hub(4);
        let mut client = hub.subscribe(live(vec![0]), None, None);
        next_text(&mut client).await;
        hub.drain();
        assert!(
            next_text(&mut client)
                .await
                .starts_with("event: fjord.shutdown\n")
        );
        assert!(client.next().await.is_none());
        assert!(!hub.is_ready());
    }

    #[tokio::test]
    async fn resuming_replays_what_was_missed_then_continues_live_without_repeats() {
        let (bus, mut reader, hub) = hub_on_memory_bus(StartPosition::Live).await;
        let ids = publish(&hub, &bus, &mut reader, 0, 10, Retention::default()).await;

        let resume = ResumeId(vec![ids[3]]);
        let mut client = hub.subscribe(live(vec![1]), Some(&resume), None);
        // Records arrive live while the replay has not been read yet.
        publish(&hub, &bus, &mut reader, 10, 5, Retention::default()).await;
        assert_eq!(
            next_text(&mut client).await,
            format!("retry: 2000\nid: {}\n\n", ids[3])
        );
        assert_eq!(
            read_offsets(&mut client, 11).await,
            (4..15).collect::<Vec<_>>()
        );

        // The same id on a client that is ahead of this instance skips what it had.
        let ahead = ResumeId(vec![StreamId {
            ms: u64::MAX,
            seq: 0,
        }]);
        let mut ahead_client = hub.subscribe(live(vec![1]), Some(&ahead), None);
        next_text(&mut ahead_client).await;
        publish(&hub, &bus, &mut reader, 15, 1, Retention::default()).await;
        hub.drain();
        let rest = next_text(&mut ahead_client).await;
        assert!(
            rest.starts_with("event: fjord.shutdown"),
            "nothing at or before its id: {rest}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn events_queued_during_a_long_replay_do_not_count_as_lag() {
        let (bus, mut reader, hub) = hub_on_memory_bus(StartPosition::Live).await;
        let ids = publish(&hub, &bus, &mut reader, 0, 5, Retention::default()).await;
        let mut client = hub.subscribe(live(vec![1]), Some(&ResumeId(vec![ids[0]])), None);
        publish(&hub, &bus, &mut reader, 5, 1, Retention::default()).await;
        // The replay has not been read when the live event is older than the lag bound.
        tokio::time::advance(ServerConfig::default().client_max_lag() + Duration::from_millis(1))
            .await;
        next_text(&mut client).await;
        assert_eq!(read_offsets(&mut client, 5).await, vec![1, 2, 3, 4, 5]);
        assert_eq!(hub.metrics().clients_dropped.load(Relaxed), 0);
    }

    #[tokio::test]
    async fn a_resume_id_older_than_the_window_gets_a_gap_then_the_oldest_kept() {
        let (bus, mut reader, hub) = hub_on_memory_bus(StartPosition::Live).await;
        let small = Retention {
            max_records: 5,
            max_age_secs: 3600,
        };
        // Only the last five are left by the time the hub reads them.
        let kept = publish(&hub, &bus, &mut reader, 0, 12, small).await;
        assert_eq!(kept.len(), 5);
        let long_ago = ResumeId(vec![StreamId { ms: 1, seq: 0 }]);
        let mut client = hub.subscribe(live(vec![1]), Some(&long_ago), None);
        next_text(&mut client).await;
        let gap = next_text(&mut client).await;
        assert!(gap.starts_with("event: fjord.gap\ndata: "), "{gap}");
        assert!(
            gap.contains(&format!("\"oldest_id\":\"{}\"", kept[0])),
            "{gap}"
        );
        assert_eq!(
            read_offsets(&mut client, 5).await,
            (7..12).collect::<Vec<_>>()
        );
    }

    #[tokio::test]
    async fn live_connections_are_told_when_retention_trimmed_what_the_server_had_not_read() {
        let (bus, mut reader, hub) = hub_on_memory_bus(StartPosition::Live).await;
        let mut client = hub.subscribe(live(vec![1]), None, None);
        next_text(&mut client).await;
        let small = Retention {
            max_records: 5,
            max_age_secs: 3600,
        };
        // Twelve records arrive before the server reads; only the last five are kept.
        let kept = publish(&hub, &bus, &mut reader, 0, 12, small).await;
        let text = next_text(&mut client).await;
        assert!(text.starts_with("event: fjord.gap\ndata: "), "{text}");
        assert!(
            text.contains(&format!("\"oldest_id\":\"{}\"", kept[0])),
            "{text}"
        );
        let mut offsets_seen = offsets(&text);
        while offsets_seen.len() < 5 {
            offsets_seen.extend(offsets(&next_text(&mut client).await));
        }
        assert_eq!(offsets_seen, (7..12).collect::<Vec<_>>());
        // Reading on without trimming tells nothing more.
        publish(&hub, &bus, &mut reader, 12, 1, small).await;
        assert!(next_text(&mut client).await.starts_with("id: "));
    }

    const BIG: usize = 100 * 1024;

    fn replay_held(hub: &Hub) -> usize {
        usize::try_from(hub.metrics().replay_buffered_bytes.load(Relaxed)).expect("not negative")
    }

    #[tokio::test]
    async fn a_replay_of_big_records_holds_about_a_page_and_is_written_in_chunks() {
        let (bus, mut reader, hub) = hub_on_memory_bus(StartPosition::Live).await;
        let ids = publish_padded(&hub, &bus, &mut reader, 0, 40, Retention::default(), BIG).await;
        let mut client = hub.subscribe(live(vec![1]), Some(&ResumeId(vec![ids[0]])), None);
        next_text(&mut client).await;
        let mut seen = Vec::new();
        let mut most_held = 0;
        while seen.len() < 39 {
            let text = next_text(&mut client).await;
            assert!(
                text.len() < REPLAY_CHUNK_BYTES + BIG + 100,
                "{}",
                text.len()
            );
            most_held = most_held.max(replay_held(&hub));
            seen.extend(offsets(&text));
        }
        assert_eq!(seen, (1..40).collect::<Vec<_>>());
        assert!(most_held > BIG, "counted: {most_held}");
        assert!(
            most_held < crate::replay::PAGE_BYTES + REPLAY_CHUNK_BYTES + 2 * (BIG + 100),
            "held {most_held}"
        );
        publish(&hub, &bus, &mut reader, 40, 1, Retention::default()).await;
        assert_eq!(read_offsets(&mut client, 1).await, vec![40]);
        assert_eq!(replay_held(&hub), 0, "given back once replayed");
    }

    #[tokio::test(start_paused = true)]
    async fn a_resumer_that_takes_too_long_to_write_its_replay_is_shed() {
        let (bus, mut reader, hub) = hub_on_memory_bus(StartPosition::Live).await;
        let ids = publish_padded(&hub, &bus, &mut reader, 0, 5, Retention::default(), BIG).await;
        let mut client = hub.subscribe(live(vec![1]), Some(&ResumeId(vec![ids[0]])), None);
        next_text(&mut client).await;
        assert_eq!(offsets(&next_text(&mut client).await), vec![1]);
        assert!(replay_held(&hub) > BIG);
        tokio::time::advance(ServerConfig::default().client_max_lag() + Duration::from_millis(1))
            .await;
        assert!(client.next().await.is_none(), "shed");
        assert_eq!(hub.metrics().clients_dropped.load(Relaxed), 1);
        assert_eq!(replay_held(&hub), 0);
    }

    #[tokio::test]
    async fn a_resumer_cut_off_while_it_replays_gets_no_more_of_it() {
        let bus = MemoryBus::new();
        let mut reader = Bus::Memory(bus.clone())
            .reader(vec![name("drivers"), name("orders")])
            .await
            .expect("reader");
        let hub = hub_with(2, bus.clone(), reader.cursors(), StartPosition::Live);
        let ids = publish_padded(&hub, &bus, &mut reader, 0, 5, Retention::default(), BIG).await;
        let mut client = hub.subscribe(live(vec![1]), Some(&ResumeId(vec![ids[0]])), None);
        next_text(&mut client).await;
        assert_eq!(offsets(&next_text(&mut client).await), vec![1]);
        // Live records fill its queue of two while it replays.
        publish(&hub, &bus, &mut reader, 5, 3, Retention::default()).await;
        assert_eq!(hub.metrics().clients_dropped.load(Relaxed), 1);
        assert!(
            client.next().await.is_none(),
            "neither the replay nor its live events"
        );
        assert_eq!(replay_held(&hub), 0);
    }

    #[tokio::test]
    async fn keyed_and_multi_endpoint_connections_resume_too() {
        let (bus, mut reader, hub) = hub_on_memory_bus(StartPosition::Live).await;
        let ids = publish(&hub, &bus, &mut reader, 0, 6, Retention::default()).await;
        let interest = Interest {
            endpoints: vec![0, 1],
            keys: Some(KeySet::new(["k2", "k5"])),
        };
        let mut client = hub.subscribe(
            interest,
            Some(&ResumeId(vec![StreamId::ZERO, ids[0]])),
            None,
        );
        assert_eq!(
            next_text(&mut client).await,
            format!("retry: 2000\nid: 0-0_{}\n\n", ids[0])
        );
        let replayed = read_text(&mut client, 2).await;
        assert_eq!(offsets(&replayed), vec![2, 5]);
        assert!(
            replayed.starts_with(&format!("id: 0-0_{}\n", ids[2])),
            "{replayed}"
        );
    }

    #[tokio::test]
    async fn a_text_key_and_a_binary_key_match_only_their_own_bytes() {
        let (bus, mut reader, hub) = hub_on_memory_bus(StartPosition::Live).await;
        // The binary key FF FE 00 6B shows as {"base64":"//4Aaw=="}; the text key is that.
        let binary: &[u8] = &[0xff, 0xfe, 0x00, 0x6b];
        let text: &[u8] = b"//4Aaw==";
        let mut by_text = subscribe_query(&hub, "key=%2F%2F4Aaw%3D%3D");
        let mut by_base64 = subscribe_query(&hub, "key_base64=%2F%2F4Aaw%3D%3D");
        let mut by_both = subscribe_query(&hub, "key=%2F%2F4Aaw%3D%3D&key_base64=%2F%2F4Aaw%3D%3D");
        for subscription in [&mut by_text, &mut by_base64, &mut by_both] {
            next_text(subscription).await;
        }
        let endpoints = [(name("orders"), Retention::default())];
        for (offset, key) in [(0, binary), (1, text)] {
            let envelope = Envelope::encode(
                crate::envelope::RecordParts {
                    topic: "orders",
                    partition: 0,
                    offset,
                    key: Some(key),
                    timestamp: None,
                    value: Some(b"{}"),
                },
                [],
            )
            .expect("encodes");
            publish_envelope(&bus, &endpoints, offset, &envelope).await;
        }
        hub.dispatch(&reader.next_batch().await.expect("memory bus"));
        let keys_of = |text: String| -> Vec<serde_json::Value> {
            text.lines()
                .filter_map(|line| line.strip_prefix("data: "))
                .map(|data| {
                    serde_json::from_str::<serde_json::Value>(data).expect("JSON")["key"].clone()
                })
                .collect()
        };
        let text_key = serde_json::json!("//4Aaw==");
        let binary_key = serde_json::json!({"base64": "//4Aaw=="});
        assert_eq!(
            keys_of(next_text(&mut by_text).await),
            vec![text_key.clone()]
        );
        assert_eq!(
            keys_of(next_text(&mut by_base64).await),
            vec![binary_key.clone()]
        );
        assert_eq!(
            keys_of(read_text(&mut by_both, 2).await),
            vec![binary_key, text_key]
        );
        // The same on resume.
        let mut resumed = hub.subscribe(
            crate::http::parse_stream_request(
                &hub,
                &crate::auth::Grant::everything(),
                Some("orders"),
                "key=%2F%2F4Aaw%3D%3D",
                Some("0-1"),
            )
            .expect("valid")
            .interest,
            Some(&ResumeId(vec![StreamId { ms: 0, seq: 1 }])),
            None,
        );
        next_text(&mut resumed).await;
        assert_eq!(
            keys_of(next_text(&mut resumed).await),
            vec![serde_json::json!("//4Aaw==")]
        );
    }

    /// A live connection to `orders` with the key filters of `query`.
    fn subscribe_query(hub: &Arc<Hub>, query: &str) -> Subscription {
        let request = crate::http::parse_stream_request(
            hub,
            &crate::auth::Grant::everything(),
            Some("orders"),
            query,
            None,
        )
        .expect("valid");
        hub.subscribe(request.interest, None, None)
    }

    #[tokio::test]
    async fn an_expired_token_gets_a_notice_and_the_stream_ends() {
        let hub = hub(8);
        let mut expiring = hub.subscribe(live(vec![1]), None, Some(100));
        let mut lasting = hub.subscribe(live(vec![1]), None, Some(200));
        next_text(&mut expiring).await;
        next_text(&mut lasting).await;
        hub.expire(99);
        hub.expire(100);
        assert!(
            next_text(&mut expiring)
                .await
                .starts_with("event: fjord.expired\n")
        );
        assert!(expiring.next().await.is_none());
        hub.dispatch(&[(1, entry(10, "a"))]);
        assert!(next_text(&mut lasting).await.starts_with("id: 10-0"));
        assert_eq!(hub.expiries().len(), 1);
        drop(lasting);
        assert!(hub.expiries().is_empty());
    }

    #[tokio::test]
    async fn endpoints_that_start_at_the_oldest_replay_the_window_to_new_connections() {
        let (bus, mut reader, hub) = hub_on_memory_bus(StartPosition::Oldest).await;
        publish(&hub, &bus, &mut reader, 0, 3, Retention::default()).await;
        let mut client = hub.subscribe(live(vec![1]), None, None);
        assert_eq!(next_text(&mut client).await, "retry: 2000\nid: 0-0\n\n");
        assert_eq!(read_offsets(&mut client, 3).await, vec![0, 1, 2]);
    }

    /// The `fjord.gap` events for skipped records in `text`, as JSON.
    fn unreadable_gaps(text: &str) -> Vec<serde_json::Value> {
        text.split("\n\n")
            .filter(|event| event.contains("event: fjord.gap\n"))
            .filter_map(|event| event.lines().find_map(|line| line.strip_prefix("data: ")))
            .filter_map(|data| serde_json::from_str::<serde_json::Value>(data).ok())
            .filter(|data| data["reason"] == "unreadable_record")
            .collect()
    }

    /// Reads until `count` records arrived; returns everything read.
    async fn read_text(subscription: &mut Subscription, count: usize) -> String {
        let mut text = String::new();
        while offsets(&text).len() < count {
            text.push_str(&next_text(subscription).await);
        }
        text
    }

    #[tokio::test]
    async fn skipped_records_reach_every_connection_once_live_and_on_resume() {
        let (bus, mut reader, hub) = hub_on_memory_bus(StartPosition::Live).await;
        let mut all = hub.subscribe(live(vec![1]), None, None);
        let mut keyed = hub.subscribe(
            Interest {
                endpoints: vec![1],
                keys: Some(KeySet::new(["k1", "k6"])),
            },
            None,
            None,
        );
        next_text(&mut all).await;
        next_text(&mut keyed).await;
        let ids = publish(&hub, &bus, &mut reader, 0, 3, Retention::default()).await;
        let skipped = SkippedRecords {
            topic: "orders".into(),
            partition: 0,
            first_offset: 3,
            last_offset: 5,
            error: "Local: Invalid compressed data".into(),
        };
        Bus::Memory(bus.clone())
            .publish_skipped(&skipped, &[(name("orders"), Retention::default())])
            .await
            .expect("memory bus");
        hub.dispatch(&reader.next_batch().await.expect("memory bus"));
        publish(&hub, &bus, &mut reader, 6, 2, Retention::default()).await;

        let text = read_text(&mut all, 5).await;
        assert_eq!(offsets(&text), vec![0, 1, 2, 6, 7]);
        let gaps = unreadable_gaps(&text);
        assert_eq!(gaps.len(), 1, "{text}");
        assert_eq!(gaps[0]["endpoint"], "orders");
        assert_eq!(gaps[0]["first_offset"], 3);
        assert_eq!(gaps[0]["last_offset"], 5);
        assert!(
            text.find("event: fjord.gap").expect("gap") > text.find("\"offset\":2").expect("2")
                && text.find("event: fjord.gap").expect("gap")
                    < text.find("\"offset\":6").expect("6"),
            "in stream order: {text}"
        );
        let text = read_text(&mut keyed, 2).await;
        assert_eq!(offsets(&text), vec![1, 6]);
        assert_eq!(
            unreadable_gaps(&text).len(),
            1,
            "once, whatever the keys: {text}"
        );

        // A client resuming from before the skipped records is told too.
        let mut resumed = hub.subscribe(live(vec![1]), Some(&ResumeId(vec![ids[2]])), None);
        next_text(&mut resumed).await;
        let text = read_text(&mut resumed, 2).await;
        assert_eq!(offsets(&text), vec![6, 7]);
        assert_eq!(unreadable_gaps(&text), gaps);
    }
}
