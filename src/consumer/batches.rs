//! Publishing a member's records in batches: each partition has one batch in flight at a
//! time, and the records read meanwhile make its next one, so a Redis round trip carries as
//! many records as arrived during the last, in offset order (the bus's idempotence counts on
//! each endpoint taking a partition's records in order). Offsets are stored as batches land.
//!
//! Batches are published by tasks of their own, which the rebalance callback can wait for:
//! a member that loses partitions commits what it published of them before it lets go, so
//! their next owner does not read it again.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

use futures_util::stream::{FuturesUnordered, StreamExt as _};
use rdkafka::consumer::{Consumer, StreamConsumer};
use tokio::task::JoinHandle;

use super::{MemberContext, Routes, until_accepted};
use fjord_bus::envelope::Envelope;
use fjord_bus::{Batch, Bus};

/// Most records read but not yet published, over all partitions: past it the member stops
/// reading until the bus catches up.
const MAX_WAITING: usize = 8192;

/// Most records in one batch (fewer for an endpoint that keeps fewer), and about most bytes.
const BATCH_RECORDS: usize = 1024;
const BATCH_BYTES: usize = 1 << 20;

/// A topic and partition.
type Partition = (String, i32);

/// A batch taken to publish.
struct OwnedBatch {
    topic: String,
    partition: i32,
    records: Vec<(i64, Envelope)>,
}

/// A batch the bus accepted.
pub(super) struct Landed {
    topic: String,
    partition: i32,
    last_offset: i64,
    records: u64,
}

/// Which partitions have a batch in flight, and the last offset each published: what the
/// rebalance callback, on librdkafka's side, needs of the publishing tasks.
#[derive(Debug, Default)]
pub(super) struct InFlight {
    state: Mutex<InFlightState>,
    landed: Condvar,
}

#[derive(Debug, Default)]
struct InFlightState {
    publishing: HashSet<Partition>,
    last_offsets: HashMap<Partition, i64>,
}

impl InFlight {
    fn lock(&self) -> std::sync::MutexGuard<'_, InFlightState> {
        // Every update below leaves the state whole.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn started(&self, partition: Partition) {
        self.lock().publishing.insert(partition);
    }

    fn landed(&self, landed: &Landed) {
        let partition = (landed.topic.clone(), landed.partition);
        let mut state = self.lock();
        state.publishing.remove(&partition);
        state.last_offsets.insert(partition, landed.last_offset);
        drop(state);
        self.landed.notify_all();
    }

    /// Waits up to `patience` until no batch of `partitions` is in flight; returns the last
    /// offset published of each, and forgets them. Blocks the thread: the rebalance callback
    /// must hold up the rebalance until then.
    pub(super) fn settle(
        &self,
        partitions: &[Partition],
        patience: Duration,
    ) -> (Vec<(Partition, i64)>, bool) {
        let deadline = Instant::now() + patience;
        let mut state = self.lock();
        let mut settled = true;
        while partitions.iter().any(|p| state.publishing.contains(p)) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                settled = false;
                break;
            }
            state = self
                .landed
                .wait_timeout(state, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        let offsets = partitions
            .iter()
            .filter_map(|p| {
                state
                    .last_offsets
                    .remove(p)
                    .map(|offset| (p.clone(), offset))
            })
            .collect();
        (offsets, settled)
    }
}

#[derive(Default)]
struct PartitionRecords {
    waiting: VecDeque<(i64, Envelope)>,
    in_flight: bool,
}

/// The records read and not yet published, per partition, and the batches in flight.
pub(super) struct Publisher {
    group: String,
    bus: Bus,
    routes: Arc<Routes>,
    in_flight: Arc<InFlight>,
    /// By topic, then partition.
    partitions: HashMap<String, HashMap<i32, PartitionRecords>>,
    /// Records waiting, over all partitions.
    waiting: usize,
    tasks: FuturesUnordered<JoinHandle<Landed>>,
    /// Records published since start.
    pub(super) published: u64,
}

impl Publisher {
    pub(super) fn new(
        group: &str,
        bus: &Bus,
        routes: Arc<Routes>,
        in_flight: Arc<InFlight>,
    ) -> Self {
        Self {
            group: group.to_owned(),
            bus: bus.clone(),
            routes,
            in_flight,
            partitions: HashMap::new(),
            waiting: 0,
            tasks: FuturesUnordered::new(),
            published: 0,
        }
    }

    /// Whether so many records wait that the member should stop reading.
    pub(super) fn is_full(&self) -> bool {
        self.waiting >= MAX_WAITING
    }

    /// Adds a record read; publishes it at once if its partition has no batch in flight.
    pub(super) fn add(&mut self, topic: &str, partition: i32, offset: i64, envelope: Envelope) {
        let partitions = match self.partitions.get_mut(topic) {
            Some(partitions) => partitions,
            None => self.partitions.entry(topic.to_owned()).or_default(),
        };
        let records = partitions.entry(partition).or_default();
        records.waiting.push_back((offset, envelope));
        self.waiting += 1;
        if !records.in_flight {
            self.start(topic, partition);
        }
    }

    /// The next batch to land. Pending forever while none is in flight, like a channel
    /// without senders would not be: for use in `select!`.
    pub(super) async fn next_landed(&mut self) -> Landed {
        loop {
            match self.tasks.next().await {
                Some(Ok(landed)) => return landed,
                // A publishing task never panics; were it cancelled, its records would be
                // read again after the next rebalance or restart.
                Some(Err(error)) => {
                    tracing::error!(group = %self.group, %error, "a publishing task failed")
                }
                None => std::future::pending::<()>().await,
            }
        }
    }

    /// Stores the offset of a batch that landed, and publishes its partition's next batch.
    pub(super) fn settle(&mut self, consumer: &StreamConsumer<MemberContext>, landed: &Landed) {
        if let Err(error) =
            consumer.store_offset(&landed.topic, landed.partition, landed.last_offset)
        {
            // The partition was revoked meanwhile; its new owner reads the records again
            // and the idempotent publish drops them.
            tracing::debug!(%error, "offset not stored");
        }
        let before = self.published;
        self.published += landed.records;
        if before / 10_000 != self.published / 10_000 {
            tracing::info!(group = %self.group, published = self.published, "records published");
        }
        if let Some(records) = self
            .partitions
            .get_mut(&landed.topic)
            .and_then(|partitions| partitions.get_mut(&landed.partition))
        {
            records.in_flight = false;
            if !records.waiting.is_empty() {
                self.start(&landed.topic, landed.partition);
            }
        }
    }

    /// Waits until every record read so far is published, storing offsets as batches land.
    pub(super) async fn settle_all(&mut self, consumer: &StreamConsumer<MemberContext>) {
        while !self.tasks.is_empty() {
            let landed = self.next_landed().await;
            self.settle(consumer, &landed);
        }
    }

    /// Takes the next batch of a partition and publishes it in a task of its own.
    fn start(&mut self, topic: &str, partition: i32) {
        let Some(records) = self
            .partitions
            .get_mut(topic)
            .and_then(|partitions| partitions.get_mut(&partition))
        else {
            return;
        };
        // A batch longer than an endpoint's retention would trim itself before any server
        // read it: live clients would get a gap for records that were never old.
        let most = self
            .routes
            .get(topic)
            .into_iter()
            .flatten()
            .map(|(_, keeping)| {
                usize::try_from(keeping.retention.max_records).unwrap_or(usize::MAX)
            })
            .fold(BATCH_RECORDS, usize::min)
            .max(1);
        let mut batch = Vec::new();
        let mut bytes = 0;
        while let Some((_, envelope)) = records.waiting.front() {
            let size = envelope.json.len();
            if batch.len() == most || (bytes > 0 && bytes + size > BATCH_BYTES) {
                break;
            }
            bytes += size;
            batch.extend(records.waiting.pop_front());
        }
        records.in_flight = true;
        self.waiting -= batch.len();
        self.in_flight.started((topic.to_owned(), partition));
        let batch = OwnedBatch {
            topic: topic.to_owned(),
            partition,
            records: batch,
        };
        let (bus, routes, in_flight) = (
            self.bus.clone(),
            Arc::clone(&self.routes),
            Arc::clone(&self.in_flight),
        );
        self.tasks.push(tokio::spawn(async move {
            let landed = publish(&bus, &routes, batch).await;
            in_flight.landed(&landed);
            landed
        }));
    }
}

/// Publishes `batch`, retrying for as long as the bus refuses.
async fn publish(bus: &Bus, routes: &Routes, batch: OwnedBatch) -> Landed {
    let OwnedBatch {
        topic,
        partition,
        records,
    } = batch;
    let (first_offset, last_offset) = match (records.first(), records.last()) {
        (Some((first, _)), Some((last, _))) => (*first, *last),
        _ => (0, -1),
    };
    if let Some(endpoints) = routes.get(&topic) {
        until_accepted(&topic, partition, first_offset, || {
            bus.publish_batch(Batch {
                topic: &topic,
                partition,
                endpoints,
                records: &records,
            })
        })
        .await;
    }
    Landed {
        topic,
        partition,
        last_offset,
        records: u64::try_from(records.len()).unwrap_or(u64::MAX),
    }
}
