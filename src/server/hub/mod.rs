//! The hub: one per server process, the fan-out from the bus to the connections. Each entry
//! is rendered once and its shared bytes queued to the connections that should receive it,
//! found through an index by endpoint and record key, so that the cost of a record follows
//! its receivers, not the number of connections. Each connection has a bounded queue; one
//! that fills up or falls behind is cut off and resumes by id. One timer sends every
//! heartbeat. The hub speaks events and bytes; framing them for HTTP is the connection's.
//!
//! - `outlet`: the queue a connection drains, and the hub's writes to its socket in the
//!   connection task's place ([`DirectWrite`]).
//! - `index`: the connections by endpoint and key, and when their tokens run out.
//! - `feed`: the bus reader's entries, dispatched to their receivers ([`Hub::run_feed`]).
//! - `subscription`: one connection's stream — prelude, replay, live events
//!   ([`Subscription`]) — which reaches the hub only through a narrow handle.
//! - `overload`: shedding the connections furthest behind when the server cannot keep up.
//!
//! Here: the [`Hub`] itself — subscribing a connection and planning its replay, the
//! heartbeats, token expiries and the drain that reach every connection.

mod feed;
#[cfg(test)]
mod filtered;
mod index;
mod outlet;
mod overload;
mod subscription;
#[cfg(test)]
mod testing;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use bytes::Bytes;

use self::index::{Index, Indexed};
pub use self::outlet::{DirectWrite, WrittenNow};
use self::outlet::{Frame, Outlet};
use self::overload::Overload;
use self::subscription::{HubHandle, Start};
pub use self::subscription::{Outgoing, Subscription};
use crate::compression::Encoding;
use crate::keys::{ClientId, KeyBudgetReached, KeySet};
use crate::latency::Latency;
use crate::metrics::Metrics;
use crate::queue::{Bounds, PushError};
use crate::replay::{CatchUp, ReplayRange, replay};
use crate::sse::{self, RenderedEvent, ResumeId};
pub use crate::views::ViewSpec;
use crate::views::{TooManyViews, Views};
use fjord_bus::clock::now_ms;
use fjord_bus::{Bus, BusEntry, StreamId};
use fjord_config::{EndpointName, Filter, Limits, ServerConfig, StartPosition};

/// The bus counts as unreachable when no read succeeded for this long.
const READY_WINDOW_MS: u64 = 5_000;

/// The hub of one server process.
#[derive(Debug)]
pub struct Hub {
    endpoints: Vec<EndpointName>,
    starts: Vec<StartPosition>,
    /// Whether each endpoint is a table, whose connections start with a snapshot.
    tables: Vec<bool>,
    /// The manifest's filter of each endpoint, which every connection to it gets.
    filters: Vec<Option<Filter>>,
    /// How large the filters and field lists of requests may be.
    filter_limits: Limits,
    views: Views,
    bus: Bus,
    index: Index,
    /// What each connection's queue holds at most.
    queue_bounds: Bounds,
    overload: Overload,
    retry_ms: u64,
    last_read_ms: AtomicU64,
    draining: AtomicBool,
    metrics: Arc<Metrics>,
}

/// How a connection wants its records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interest {
    /// Indexes into the hub's endpoints, sorted, without repeats.
    pub endpoints: Vec<usize>,
    /// Only records with one of these keys; `None` for all.
    pub keys: Option<KeySet>,
    /// What it sees of each endpoint (filter, fields), in the order of `endpoints`; those
    /// past its end see every record. The endpoint's own filter is added by the hub.
    pub views: Vec<ViewSpec>,
    /// The coding its stream is compressed in; `None` for plain SSE text.
    pub encoding: Option<Encoding>,
}

/// A connection the hub has no room for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NoRoom {
    /// Its set of keys is new, and the key index's budget is spent.
    #[error(transparent)]
    Keys(#[from] KeyBudgetReached),
    /// Its view is new, and the server holds as many as it may.
    #[error(transparent)]
    Views(#[from] TooManyViews),
}

/// One endpoint of a hub: its name, where a new connection starts, and the manifest's
/// filter for it.
#[derive(Debug, Clone)]
pub struct HubEndpoint {
    /// The endpoint's name.
    pub name: EndpointName,
    /// Where a connection without a resume id starts.
    pub start: StartPosition,
    /// What every connection to it is narrowed to.
    pub filter: Option<Filter>,
    /// Whether it is a table endpoint.
    pub table: bool,
}

/// A stream endpoint without a filter of its own.
impl From<(EndpointName, StartPosition)> for HubEndpoint {
    fn from((name, start): (EndpointName, StartPosition)) -> Self {
        Self {
            name,
            start,
            filter: None,
            table: false,
        }
    }
}

impl Hub {
    /// A hub for `endpoints` (sorted by name), whose bus reader starts after
    /// `reader_start` (one id each). `bus` serves replays.
    pub fn new(
        endpoints: impl IntoIterator<Item = impl Into<HubEndpoint>>,
        reader_start: &[StreamId],
        server: &ServerConfig,
        bus: Bus,
        metrics: Arc<Metrics>,
    ) -> Self {
        let endpoints: Vec<HubEndpoint> = endpoints.into_iter().map(Into::into).collect();
        let starts = endpoints.iter().map(|endpoint| endpoint.start).collect();
        let tables = endpoints.iter().map(|endpoint| endpoint.table).collect();
        let filters = endpoints
            .iter()
            .map(|endpoint| endpoint.filter.clone())
            .collect();
        let endpoints: Vec<_> = endpoints
            .into_iter()
            .map(|endpoint| endpoint.name)
            .collect();
        metrics.latency.get_or_init(|| {
            Latency::new(
                endpoints
                    .iter()
                    .map(|name| name.as_str().to_owned())
                    .collect(),
            )
        });
        Self {
            index: Index::new(
                endpoints.len(),
                reader_start,
                server.key_filter_memory(),
                Arc::clone(&metrics),
            ),
            endpoints,
            starts,
            tables,
            filters,
            filter_limits: server.filter_limits,
            views: Views::new(server.max_distinct_filters),
            queue_bounds: Bounds {
                items: server.client_queue,
                bytes: server.client_queue_bytes(),
                wait: server.client_max_lag(),
            },
            overload: Overload::new(server.overload_wait()),
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

    /// Whether endpoint `endpoint` is a table.
    fn is_table(&self, endpoint: usize) -> bool {
        self.tables.get(endpoint).copied().unwrap_or(false)
    }

    /// How large the filters and field lists of requests may be.
    pub fn filter_limits(&self) -> &Limits {
        &self.filter_limits
    }

    /// Whether the bus answered recently and the server is not draining.
    pub fn is_ready(&self) -> bool {
        !self.draining.load(Relaxed)
            && now_ms().saturating_sub(self.last_read_ms.load(Relaxed)) < READY_WINDOW_MS
    }

    /// Registers a connection for live events, then plans what it must be sent first: the
    /// records after `resume` (one id per endpoint of the interest), or for a connection
    /// without one, the retention window of endpoints configured to start at the oldest.
    /// Registering before reading back means no record falls between the two. A connection
    /// whose token runs out at `expires_at` (seconds since the epoch) is sent `fjord.expired`
    /// then, and closed. A connection with keys no other has asked for is refused when the
    /// key index's budget is spent, one with a view no other has when the server holds as
    /// many as it may.
    pub fn try_subscribe(
        self: &Arc<Self>,
        interest: Interest,
        resume: Option<&ResumeId>,
        expires_at: Option<u64>,
    ) -> Result<Subscription, NoRoom> {
        let mut specs = interest.views.into_iter();
        let views = interest
            .endpoints
            .iter()
            .map(|&endpoint| {
                let spec = specs.next().unwrap_or_default();
                let pinned = self.filters.get(endpoint).cloned().flatten();
                self.views.share(spec.and(pinned))
            })
            .collect::<Result<Vec<_>, _>>()
            .inspect_err(|_| {
                self.metrics.refused_filters.fetch_add(1, Relaxed);
            })?;
        let outlet = Arc::new(Outlet::new(self.queue_bounds, interest.encoding));
        let receiver = Arc::clone(&outlet);
        let Indexed {
            id,
            live_start,
            keys,
        } = self
            .index
            .add(
                outlet,
                &interest.endpoints,
                views.clone(),
                interest.keys,
                expires_at,
            )
            .inspect_err(|_| {
                self.metrics.refused_key_filters.fetch_add(1, Relaxed);
            })?;
        self.metrics.open_connections.fetch_add(1, Relaxed);

        let mut cursor = Vec::with_capacity(live_start.len());
        let mut ranges = Vec::new();
        for (position, (&endpoint, &live)) in interest.endpoints.iter().zip(&live_start).enumerate()
        {
            if self.is_table(endpoint) {
                // A table's client without rows (no id, or 0-0 before its snapshot ended)
                // gets a snapshot; one that had them catches up on the records it missed.
                let after = resume
                    .and_then(|resume| resume.0.get(position).copied())
                    .unwrap_or(StreamId::ZERO);
                cursor.push(after);
                let catch_up = match after {
                    StreamId::ZERO => Some(CatchUp::snapshot()),
                    after if after < live => Some(CatchUp::TableRecords),
                    _ => None,
                };
                if let Some(catch_up) = catch_up {
                    ranges.push(ReplayRange {
                        endpoint,
                        after,
                        until: live,
                        catch_up,
                    });
                }
                continue;
            }
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
                    catch_up: CatchUp::Records { report_gap },
                });
            }
        }
        let cursor = ResumeId(cursor);
        let backlog = (!ranges.is_empty()).then(|| {
            replay(
                self.bus.clone(),
                self.endpoints.clone(),
                ranges,
                self.queue_bounds.items,
            )
        });
        let start = Start {
            prelude: sse::prelude(self.retry_ms, &cursor),
            cursor,
            backlog,
        };
        Ok(Subscription::new(
            Arc::clone(self) as Arc<dyn HubHandle>,
            id,
            receiver,
            interest.endpoints,
            keys,
            views,
            start,
        ))
    }

    /// [`Hub::try_subscribe`], for tests whose keys fit the budget.
    #[cfg(test)]
    pub(crate) fn subscribe(
        self: &Arc<Self>,
        interest: Interest,
        resume: Option<&ResumeId>,
        expires_at: Option<u64>,
    ) -> Subscription {
        self.try_subscribe(interest, resume, expires_at)
            .expect("within the key budget")
    }

    fn cut_off(&self, clients: impl IntoIterator<Item = ClientId>) {
        for client in clients {
            if self.index.remove(client, None) {
                self.metrics.clients_dropped.fetch_add(1, Relaxed);
                tracing::debug!(client, "disconnected a client that fell behind");
            }
        }
    }

    /// Sends `bytes` to every connection, cutting off those that cannot take it.
    fn broadcast(&self, bytes: &Bytes) {
        let mut too_slow = Vec::new();
        let bytes = Arc::new(bytes.clone());
        self.index.for_each(|id, sender| {
            if let Err(PushError::Full) = sender.push(Frame::Raw(Arc::clone(&bytes))) {
                too_slow.push(id);
            }
        });
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
        let expired = self.index.take_expired(now_secs);
        if expired.is_empty() {
            return;
        }
        let notice = Arc::new(sse::notice(
            sse::reserved::EXPIRED,
            &serde_json::json!({"message": "your token expired; get a fresh one and reconnect with your last event id"}),
        ));
        for id in expired {
            self.index.remove(id, Some(Frame::Raw(Arc::clone(&notice))));
        }
    }

    /// Tells every connection to reconnect elsewhere and ends their streams.
    pub fn drain(&self) {
        self.draining.store(true, Relaxed);
        self.broadcast(&sse::notice(
            sse::reserved::SHUTDOWN,
            &serde_json::json!({"reason": "server shutting down; reconnect"}),
        ));
        for id in self.index.ids() {
            self.index.remove(id, None);
        }
    }
}

impl HubHandle for Hub {
    fn render(&self, endpoint: usize, entry: &BusEntry) -> Option<RenderedEvent> {
        Self::render(self, endpoint, entry)
    }

    fn endpoint_name(&self, endpoint: usize) -> &str {
        self.endpoints
            .get(endpoint)
            .map_or("", EndpointName::as_str)
    }

    fn max_lag(&self) -> Duration {
        self.queue_bounds.wait
    }

    fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    fn cut_off(&self, client: ClientId) {
        Self::cut_off(self, [client]);
    }

    fn leave(&self, client: ClientId) {
        self.index.remove(client, None);
        self.metrics.open_connections.fetch_sub(1, Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use futures_util::StreamExt;

    use super::testing::{entry, hub, hub_on_memory_bus, live, next_text, publish, read_offsets};
    use fjord_config::{Retention, StartPosition};

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
        assert_eq!(hub.index.expiring(), 1);
        drop(lasting);
        assert!(hub.index.expiring() == 0);
    }

    #[tokio::test]
    async fn endpoints_that_start_at_the_oldest_replay_the_window_to_new_connections() {
        let (bus, mut reader, hub) = hub_on_memory_bus(StartPosition::Oldest).await;
        publish(&hub, &bus, &mut reader, 0, 3, Retention::default()).await;
        let mut client = hub.subscribe(live(vec![1]), None, None);
        assert_eq!(next_text(&mut client).await, "retry: 2000\nid: 0-0\n\n");
        assert_eq!(read_offsets(&mut client, 3).await, vec![0, 1, 2]);
    }
}
