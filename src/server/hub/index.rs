//! The hub's index of connections. For each endpoint: the connections that take every
//! record, those that take every key through a view (a filter or projection), grouped by
//! view so that a record is decided once per view, and the id of the last entry queued to
//! them, where a new connection's live stream starts. For every endpoint at once: the
//! connections that take only some keys, by key, each with its view of the endpoint, so
//! that a connection's keys are indexed once however many endpoints it names, within a
//! budget for the whole server. For each connection: where it is indexed, and when its token
//! runs out. The feed reads an endpoint's connections under the read locks of its channel,
//! then of the key index; a connection coming or going takes the write locks, one at a time.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use super::outlet::{ClientQueue, Frame};
use crate::keys::{ClientId, KeyBudgetReached, KeyIndex, KeySet};
use crate::metrics::Metrics;
use crate::views::{View, ViewId};
use fjord_bus::StreamId;

/// The connections of one endpoint that take every key, and where its live stream is.
#[derive(Debug, Default)]
struct Channel {
    /// Those that take every record whole.
    everyone: HashMap<ClientId, ClientQueue>,
    /// Those that see the records through a view, by view.
    viewing: HashMap<ViewId, Viewers>,
    /// The id of the last entry queued to this channel's connections. Written under the
    /// read lock by the one feed, read under the write lock by a new subscriber.
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

/// The connections of an endpoint that share one view and take every key.
#[derive(Debug)]
pub(super) struct Viewers {
    pub(super) view: Arc<View>,
    pub(super) members: HashMap<ClientId, ClientQueue>,
}

/// A keyed connection in the key index: its queue, and its view of the endpoint.
#[derive(Debug, Clone)]
pub(super) struct Member {
    pub(super) queue: ClientQueue,
    pub(super) view: Option<Arc<View>>,
}

/// One endpoint's connections, read by the feed: its channel's and the key index's read
/// locks, taken in that order.
pub(super) struct Receivers<'a> {
    endpoint: usize,
    channel: RwLockReadGuard<'a, Channel>,
    keyed: RwLockReadGuard<'a, KeyIndex<Member>>,
}

impl Receivers<'_> {
    /// Every connection of the endpoint once, whatever its keys and view.
    pub(super) fn all(&self) -> impl Iterator<Item = (ClientId, &ClientQueue)> {
        let viewing = self
            .channel
            .viewing
            .values()
            .flat_map(|viewers| viewers.members.iter());
        self.channel
            .everyone
            .iter()
            .chain(viewing)
            .map(|(&client, sender)| (client, sender))
            .chain(
                self.keyed
                    .all(self.endpoint)
                    .map(|(client, member)| (client, &member.queue)),
            )
    }

    /// How many connections may receive a record with `key`.
    pub(super) fn count(&self, key: Option<&[u8]>) -> usize {
        let viewing: usize = self
            .channel
            .viewing
            .values()
            .map(|viewers| viewers.members.len())
            .sum();
        self.channel.everyone.len()
            + viewing
            + key.map_or(0, |key| self.keyed.count(self.endpoint, key))
    }

    /// The connections that take every record whole.
    pub(super) fn everyone(&self) -> impl Iterator<Item = (ClientId, &ClientQueue)> {
        self.channel
            .everyone
            .iter()
            .map(|(&client, sender)| (client, sender))
    }

    /// The connections that take every key through a view, a group per view.
    pub(super) fn viewing(&self) -> impl Iterator<Item = &Viewers> {
        self.channel.viewing.values()
    }

    /// The connections that asked for `key`, each with its view.
    pub(super) fn keyed<'a>(
        &'a self,
        key: &'a [u8],
    ) -> impl Iterator<Item = (ClientId, &'a Member)> {
        self.keyed.receivers(self.endpoint, key)
    }

    pub(super) fn last_id(&self) -> StreamId {
        self.channel.last_id()
    }

    /// Notes `id` as the last entry queued to the endpoint's connections.
    pub(super) fn set_last_id(&self, id: StreamId) {
        self.channel.last_ms.store(id.ms, Relaxed);
        self.channel.last_seq.store(id.seq, Relaxed);
    }
}

#[derive(Debug)]
struct Client {
    sender: ClientQueue,
    endpoints: Vec<usize>,
    /// Its view of each of its endpoints.
    views: Vec<Option<Arc<View>>>,
    keys: Option<Arc<KeySet>>,
    /// When its token runs out, in seconds since the epoch.
    expires_at: Option<u64>,
}

/// Every connection of a hub, by endpoint and key, and by id.
#[derive(Debug)]
pub(super) struct Index {
    channels: Vec<RwLock<Channel>>,
    keyed: RwLock<KeyIndex<Member>>,
    metrics: Arc<Metrics>,
    clients: Mutex<HashMap<ClientId, Client>>,
    /// Connections by the time their token runs out.
    expiries: Mutex<BTreeSet<(u64, ClientId)>>,
    next_client: AtomicU64,
}

/// A connection just indexed.
#[derive(Debug)]
pub(super) struct Indexed {
    pub(super) id: ClientId,
    /// Where its live events begin, one id for each of its endpoints.
    pub(super) live_start: Vec<StreamId>,
    /// Its keys, shared with the key index and with other connections that asked for the
    /// same keys.
    pub(super) keys: Option<Arc<KeySet>>,
}

fn read<T>(lock: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    // Every critical section leaves the maps consistent, so a poisoned lock is usable.
    lock.read().unwrap_or_else(PoisonError::into_inner)
}

fn write<T>(lock: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(PoisonError::into_inner)
}

impl Index {
    /// An empty index of `endpoints` endpoints, whose entries so far end at `last` (one id
    /// each; `ZERO` for those without one), whose distinct key sets may cost `key_budget`
    /// bytes in all.
    pub(super) fn new(
        endpoints: usize,
        last: &[StreamId],
        key_budget: usize,
        metrics: Arc<Metrics>,
    ) -> Self {
        let channels = (0..endpoints)
            .map(|i| {
                let id = last.get(i).copied().unwrap_or(StreamId::ZERO);
                RwLock::new(Channel {
                    last_ms: AtomicU64::new(id.ms),
                    last_seq: AtomicU64::new(id.seq),
                    ..Channel::default()
                })
            })
            .collect();
        Self {
            channels,
            keyed: RwLock::new(KeyIndex::with_budget(key_budget)),
            metrics,
            clients: Mutex::new(HashMap::new()),
            expiries: Mutex::new(BTreeSet::new()),
            next_client: AtomicU64::new(0),
        }
    }

    /// The connections of `endpoint`; `None` for an endpoint the hub does not have.
    pub(super) fn receivers(&self, endpoint: usize) -> Option<Receivers<'_>> {
        let channel = read(self.channels.get(endpoint)?);
        Some(Receivers {
            endpoint,
            channel,
            keyed: read(&self.keyed),
        })
    }

    /// Shows what the key index holds in the metrics.
    fn count_key_bytes(&self, keyed: &KeyIndex<Member>) {
        self.metrics
            .key_filter_bytes
            .store(keyed.held_bytes() as u64, Relaxed);
    }

    fn clients(&self) -> MutexGuard<'_, HashMap<ClientId, Client>> {
        self.clients.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn expiries(&self) -> MutexGuard<'_, BTreeSet<(u64, ClientId)>> {
        self.expiries.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Indexes a new connection, reached through `sender`, for `endpoints` (indexes into the
    /// hub's, each known to it) seen through `views` (one each; `None` to see every record
    /// whole) and `keys` (all records for `None`), until `expires_at` if it is given; or
    /// refuses it when its keys are new and the key index's budget is spent.
    pub(super) fn add(
        &self,
        sender: ClientQueue,
        endpoints: &[usize],
        views: Vec<Option<Arc<View>>>,
        keys: Option<KeySet>,
        expires_at: Option<u64>,
    ) -> Result<Indexed, KeyBudgetReached> {
        let id = self.next_client.fetch_add(1, Relaxed);
        let view_of = |endpoint: usize| {
            endpoints
                .iter()
                .position(|&e| e == endpoint)
                .and_then(|position| views.get(position).cloned().flatten())
        };
        let keys = match keys {
            None => None,
            Some(keys) => {
                let mut keyed = write(&self.keyed);
                let kept = keyed.insert(&Arc::new(keys), endpoints, id, |endpoint| Member {
                    queue: sender.clone(),
                    view: view_of(endpoint),
                })?;
                self.count_key_bytes(&keyed);
                Some(kept)
            }
        };
        // Read after the connection is in the key index: every entry dispatched after this
        // id finds it there, and the subscription skips what it gets twice.
        let mut live_start = Vec::with_capacity(endpoints.len());
        for (&endpoint, view) in endpoints.iter().zip(&views) {
            let mut channel = write(&self.channels[endpoint]);
            if keys.is_none() {
                match view {
                    None => {
                        channel.everyone.insert(id, sender.clone());
                    }
                    Some(view) => {
                        channel
                            .viewing
                            .entry(ViewId::of(view))
                            .or_insert_with(|| Viewers {
                                view: Arc::clone(view),
                                members: HashMap::new(),
                            })
                            .members
                            .insert(id, sender.clone());
                    }
                }
            }
            live_start.push(channel.last_id());
        }
        self.clients().insert(
            id,
            Client {
                sender,
                endpoints: endpoints.to_vec(),
                views,
                keys: keys.clone(),
                expires_at,
            },
        );
        if let Some(at) = expires_at {
            self.expiries().insert((at, id));
        }
        Ok(Indexed {
            id,
            live_start,
            keys,
        })
    }

    /// Removes a connection from the index and closes its queue, after `last` when there is
    /// room for it: its stream ends once the queue is drained. False if it was not indexed.
    pub(super) fn remove(&self, id: ClientId, last: Option<Frame>) -> bool {
        let Some(client) = self.clients().remove(&id) else {
            return false;
        };
        if let Some(last) = last {
            // A full queue needs no last word: the connection is being cut off anyway.
            let _ = client.sender.push(last);
        }
        // The connection gets what is queued, then the end of its stream.
        client.sender.queue.close();
        if let Some(at) = client.expires_at {
            self.expiries().remove(&(at, id));
        }
        match &client.keys {
            None => {
                for (&endpoint, view) in client.endpoints.iter().zip(&client.views) {
                    let mut channel = write(&self.channels[endpoint]);
                    let Some(view) = view else {
                        channel.everyone.remove(&id);
                        continue;
                    };
                    let view = ViewId::of(view);
                    if let Some(viewers) = channel.viewing.get_mut(&view) {
                        viewers.members.remove(&id);
                        if viewers.members.is_empty() {
                            channel.viewing.remove(&view);
                        }
                    }
                }
            }
            Some(keys) => {
                let mut keyed = write(&self.keyed);
                keyed.remove(keys, &client.endpoints, id);
                self.count_key_bytes(&keyed);
            }
        }
        true
    }

    /// Takes the connections whose token ran out by `now_secs` out of the expiries.
    pub(super) fn take_expired(&self, now_secs: u64) -> Vec<ClientId> {
        let mut expiries = self.expiries();
        let still_valid = expiries.split_off(&(now_secs + 1, 0));
        std::mem::replace(&mut *expiries, still_valid)
            .into_iter()
            .map(|(_, id)| id)
            .collect()
    }

    /// Calls `visit` with every connection, under the lock that holds them.
    pub(super) fn for_each(&self, mut visit: impl FnMut(ClientId, &ClientQueue)) {
        for (&id, client) in self.clients().iter() {
            visit(id, &client.sender);
        }
    }

    /// The ids of every connection.
    pub(super) fn ids(&self) -> Vec<ClientId> {
        self.clients().keys().copied().collect()
    }

    /// Whether no connection is indexed, by id or in any endpoint.
    #[cfg(test)]
    pub(super) fn is_empty(&self) -> bool {
        self.clients().is_empty()
            && read(&self.keyed).is_empty()
            && self.channels.iter().all(|channel| {
                let channel = read(channel);
                channel.everyone.is_empty() && channel.viewing.is_empty()
            })
    }

    /// How many connections wait for their token to run out.
    #[cfg(test)]
    pub(super) fn expiring(&self) -> usize {
        self.expiries().len()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::super::testing::{
        entry, hub, hub_on_memory_bus, live, name, next_text, publish_envelope, read_text,
    };
    use crate::hub::{Hub, Subscription};
    use crate::sse::ResumeId;
    use fjord_bus::StreamId;
    use fjord_bus::envelope::Envelope;
    use fjord_config::{Retention, StartPosition};

    #[tokio::test]
    async fn a_subscriber_starts_after_the_last_dispatched_entry() {
        let hub = hub(4);
        hub.dispatch(&[(1, entry(20, "a"))]);
        let mut late = hub.subscribe(live(vec![1]), None, None);
        assert_eq!(next_text(&mut late).await, "retry: 2000\nid: 20-0\n\n");
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
        let endpoints = [(name("orders"), Retention::default().into())];
        for (offset, key) in [(0, binary), (1, text)] {
            let envelope = Envelope::encode(
                fjord_bus::envelope::RecordParts {
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
            crate::request::parse_stream_request(
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
        let request = crate::request::parse_stream_request(
            hub,
            &crate::auth::Grant::everything(),
            Some("orders"),
            query,
            None,
        )
        .expect("valid");
        hub.subscribe(request.interest, None, None)
    }
}
