//! The hub: one per server process. It takes entries from the bus reader, renders each
//! event once, and queues the shared bytes to the connections that should receive it —
//! found through an index by endpoint and record key, so that the cost of a record follows
//! its receivers, not the number of connections. Each connection has a bounded queue; one
//! that fills up is cut off and resumes by id. One timer sends every heartbeat.

use std::collections::HashMap;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};
use futures_util::Stream;
use tokio::sync::mpsc::{self, error::TrySendError};

use crate::bus::{BusEntry, BusReader, StreamId};
use crate::config::EndpointName;
use crate::metrics::Metrics;
use crate::sse::{self, RenderedEvent, ResumeId};

/// Most frames written to a connection in one write.
const MAX_COALESCED_FRAMES: usize = 64;
/// Longest pause between failed bus reads.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// The bus counts as unreachable when no read succeeded for this long.
const READY_WINDOW_MS: u64 = 10_000;

type ClientId = u64;
type Sender = mpsc::Sender<Frame>;

/// What goes into a connection's queue.
#[derive(Debug, Clone)]
enum Frame {
    Event {
        endpoint: usize,
        id: StreamId,
        event: RenderedEvent,
    },
    Raw(Bytes),
}

/// The connections of one endpoint.
#[derive(Debug, Default)]
struct Channel {
    /// Connections that receive every record.
    everyone: HashMap<ClientId, Sender>,
    /// Connections that receive only records with one of their keys, by key.
    by_key: HashMap<String, HashMap<ClientId, Sender>>,
    /// The id of the last entry queued to this channel's connections. Written under the
    /// read lock by the one dispatcher, read under the write lock by a new subscriber.
    last_ms: AtomicU64,
    last_seq: AtomicU64,
}

impl Channel {
    fn last_id(&self) -> StreamId {
        StreamId {
            ms: self.last_ms.load(Relaxed),
            seq: self.last_seq.load(Relaxed),
        }
    }
}

#[derive(Debug)]
struct Client {
    sender: Sender,
    endpoints: Vec<usize>,
    keys: Option<Vec<String>>,
}

/// The hub of one server process.
#[derive(Debug)]
pub struct Hub {
    endpoints: Vec<EndpointName>,
    channels: Vec<RwLock<Channel>>,
    clients: Mutex<HashMap<ClientId, Client>>,
    next_client: AtomicU64,
    queue_size: usize,
    retry_ms: u64,
    last_read_ms: AtomicU64,
    draining: AtomicBool,
    metrics: Arc<Metrics>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| {
            u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX)
        })
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
    pub keys: Option<Vec<String>>,
}

impl Hub {
    /// A hub for `endpoints` (sorted), whose bus reader starts after `start` (one id each).
    pub fn new(
        endpoints: Vec<EndpointName>,
        start: &[StreamId],
        queue_size: usize,
        retry_ms: u64,
        metrics: Arc<Metrics>,
    ) -> Self {
        let channels = endpoints
            .iter()
            .enumerate()
            .map(|(i, _)| {
                let id = start.get(i).copied().unwrap_or(StreamId::ZERO);
                RwLock::new(Channel {
                    last_ms: AtomicU64::new(id.ms),
                    last_seq: AtomicU64::new(id.seq),
                    ..Channel::default()
                })
            })
            .collect();
        Self {
            endpoints,
            channels,
            clients: Mutex::new(HashMap::new()),
            next_client: AtomicU64::new(0),
            queue_size,
            retry_ms,
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

    /// Registers a connection; its stream starts with the prelude, then live events.
    pub fn subscribe(self: &Arc<Self>, interest: Interest) -> Subscription {
        let (sender, receiver) = mpsc::channel(self.queue_size);
        let id = self.next_client.fetch_add(1, Relaxed);
        let mut start = Vec::with_capacity(interest.endpoints.len());
        for &endpoint in &interest.endpoints {
            let mut channel = write(&self.channels[endpoint]);
            match &interest.keys {
                None => {
                    channel.everyone.insert(id, sender.clone());
                }
                Some(keys) => {
                    for key in keys {
                        channel
                            .by_key
                            .entry(key.clone())
                            .or_default()
                            .insert(id, sender.clone());
                    }
                }
            }
            start.push(channel.last_id());
        }
        self.clients().insert(
            id,
            Client {
                sender,
                endpoints: interest.endpoints.clone(),
                keys: interest.keys,
            },
        );
        self.metrics.open_connections.fetch_add(1, Relaxed);
        let start = ResumeId(start);
        let multi_endpoint_cursor = (interest.endpoints.len() > 1).then(|| start.clone());
        Subscription {
            prelude: Some(sse::prelude(self.retry_ms, &start)),
            receiver,
            endpoints: interest.endpoints,
            cursor: multi_endpoint_cursor,
            hub: Arc::clone(self),
            id,
        }
    }

    /// Removes a connection from every index. Its stream ends once its queue is drained.
    fn unsubscribe(&self, id: ClientId) -> bool {
        let Some(client) = self.clients().remove(&id) else {
            return false;
        };
        for &endpoint in &client.endpoints {
            let mut channel = write(&self.channels[endpoint]);
            match &client.keys {
                None => {
                    channel.everyone.remove(&id);
                }
                Some(keys) => {
                    for key in keys {
                        if let Some(clients) = channel.by_key.get_mut(key) {
                            clients.remove(&id);
                            if clients.is_empty() {
                                channel.by_key.remove(key);
                            }
                        }
                    }
                }
            }
        }
        true
    }

    /// Queues each entry to its receivers; cuts off connections whose queue is full.
    pub fn dispatch(&self, batch: &[(usize, BusEntry)]) {
        let mut too_slow = Vec::new();
        for (endpoint, entry) in batch {
            let Some(lock) = self.channels.get(*endpoint) else {
                continue;
            };
            if entry.envelope.contains(&b'\n') {
                tracing::error!(endpoint = %self.endpoints[*endpoint], id = %entry.id, "dropping a bus entry with a line break; it was not written by fjord-consumer");
                continue;
            }
            let event = RenderedEvent::new(
                entry.id,
                self.endpoints[*endpoint].as_str(),
                &entry.envelope,
            );
            let channel = read(lock);
            let keyed = entry
                .filter_key
                .as_ref()
                .and_then(|key| channel.by_key.get(key));
            let receivers = channel.everyone.iter().chain(keyed.into_iter().flatten());
            let mut queued = 0;
            for (&client, sender) in receivers {
                let frame = Frame::Event {
                    endpoint: *endpoint,
                    id: entry.id,
                    event: event.clone(),
                };
                match sender.try_send(frame) {
                    Ok(()) => queued += 1,
                    Err(TrySendError::Full(_)) => too_slow.push(client),
                    Err(TrySendError::Closed(_)) => {}
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

    fn cut_off(&self, clients: Vec<ClientId>) {
        for client in clients {
            if self.unsubscribe(client) {
                self.metrics.clients_dropped.fetch_add(1, Relaxed);
                tracing::debug!(client, "disconnected a client whose queue was full");
            }
        }
    }

    /// Sends `bytes` to every connection, cutting off those that cannot take it.
    fn broadcast(&self, bytes: &Bytes) {
        let mut too_slow = Vec::new();
        for (&id, client) in self.clients().iter() {
            if let Err(TrySendError::Full(_)) = client.sender.try_send(Frame::Raw(bytes.clone())) {
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

    /// Feeds the hub from the bus forever, retrying failed reads with backoff; the reader
    /// keeps its position, so nothing is skipped.
    pub async fn run_feed(self: Arc<Self>, mut reader: BusReader) {
        let mut backoff = Duration::from_millis(100);
        loop {
            match reader.next_batch().await {
                Ok(batch) => {
                    self.last_read_ms.store(now_ms(), Relaxed);
                    backoff = Duration::from_millis(100);
                    self.dispatch(&batch);
                }
                Err(error) => {
                    self.metrics.bus_errors.fetch_add(1, Relaxed);
                    tracing::warn!(%error, retry_in = ?backoff, "bus read failed");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
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

/// One connection's stream of bytes: the prelude, then its events, several per write when
/// they queue up. Dropping it unsubscribes the connection.
#[derive(Debug)]
pub struct Subscription {
    prelude: Option<Bytes>,
    receiver: mpsc::Receiver<Frame>,
    endpoints: Vec<usize>,
    /// For a connection of several endpoints: its position in each, sent as its ids.
    cursor: Option<ResumeId>,
    hub: Arc<Hub>,
    id: ClientId,
}

impl Subscription {
    fn write_frame(&mut self, frame: Frame, out: &mut BytesMut) {
        match frame {
            Frame::Raw(bytes) => out.extend_from_slice(&bytes),
            Frame::Event {
                endpoint,
                id,
                event,
            } => match &mut self.cursor {
                None => out.extend_from_slice(event.bytes()),
                Some(cursor) => {
                    if let Some(position) = self.endpoints.iter().position(|&e| e == endpoint) {
                        cursor.0[position] = id;
                    }
                    event.write_with_id(cursor, out);
                }
            },
        }
    }

    fn single_frame_bytes(&self, frame: &Frame) -> Option<Bytes> {
        match frame {
            Frame::Raw(bytes) => Some(bytes.clone()),
            Frame::Event { event, .. } if self.cursor.is_none() => Some(event.bytes().clone()),
            Frame::Event { .. } => None,
        }
    }
}

impl Stream for Subscription {
    type Item = Result<Bytes, Infallible>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if let Some(prelude) = self.prelude.take() {
            return Poll::Ready(Some(Ok(prelude)));
        }
        let first = match self.receiver.poll_recv(cx) {
            Poll::Ready(Some(frame)) => frame,
            Poll::Ready(None) => return Poll::Ready(None),
            Poll::Pending => return Poll::Pending,
        };
        let Ok(second) = self.receiver.try_recv() else {
            // The common case: one frame, sent without copying when its bytes are shared.
            if let Some(bytes) = self.single_frame_bytes(&first) {
                return Poll::Ready(Some(Ok(bytes)));
            }
            let mut out = BytesMut::new();
            self.write_frame(first, &mut out);
            return Poll::Ready(Some(Ok(out.freeze())));
        };
        let mut out = BytesMut::with_capacity(4096);
        self.write_frame(first, &mut out);
        self.write_frame(second, &mut out);
        for _ in 2..MAX_COALESCED_FRAMES {
            match self.receiver.try_recv() {
                Ok(frame) => self.write_frame(frame, &mut out),
                Err(_) => break,
            }
        }
        Poll::Ready(Some(Ok(out.freeze())))
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.hub.unsubscribe(self.id);
        self.hub.metrics.open_connections.fetch_sub(1, Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use futures_util::StreamExt;

    use super::*;

    fn hub(queue_size: usize) -> Arc<Hub> {
        let endpoints = ["drivers", "orders"]
            .map(|name| EndpointName::try_from(name.to_owned()).expect("valid"))
            .to_vec();
        Arc::new(Hub::new(
            endpoints,
            &[StreamId { ms: 5, seq: 0 }, StreamId::ZERO],
            queue_size,
            2000,
            Arc::default(),
        ))
    }

    fn entry(ms: u64, key: &str) -> BusEntry {
        BusEntry {
            id: StreamId { ms, seq: 0 },
            filter_key: Some(key.to_owned()),
            envelope: Bytes::from(format!("{{\"key\":\"{key}\"}}")),
        }
    }

    async fn next_text(subscription: &mut Subscription) -> String {
        let bytes = subscription
            .next()
            .await
            .expect("open")
            .expect("infallible");
        String::from_utf8(bytes.to_vec()).expect("utf-8")
    }

    #[tokio::test]
    async fn events_reach_matching_connections_once() {
        let hub = hub(16);
        let mut all = hub.subscribe(Interest {
            endpoints: vec![1],
            keys: None,
        });
        let mut keyed = hub.subscribe(Interest {
            endpoints: vec![1],
            keys: Some(vec!["a".into(), "c".into()]),
        });
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
        let mut both = hub.subscribe(Interest {
            endpoints: vec![0, 1],
            keys: None,
        });
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
        let mut slow = hub.subscribe(Interest {
            endpoints: vec![1],
            keys: None,
        });
        let mut fast = hub.subscribe(Interest {
            endpoints: vec![1],
            keys: None,
        });
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

    #[tokio::test]
    async fn a_subscriber_starts_after_the_last_dispatched_entry() {
        let hub = hub(4);
        hub.dispatch(&[(1, entry(20, "a"))]);
        let mut late = hub.subscribe(Interest {
            endpoints: vec![1],
            keys: None,
        });
        assert_eq!(next_text(&mut late).await, "retry: 2000\nid: 20-0\n\n");
    }

    #[tokio::test]
    async fn drain_says_shutdown_and_ends_streams() {
        let hub = hub(4);
        let mut client = hub.subscribe(Interest {
            endpoints: vec![0],
            keys: None,
        });
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
}
