//! The in-process bus of `fjord dev`: the same semantics as the Redis bus — per-endpoint
//! streams with ordered ids, retention by count and age, idempotent publishing — in memory.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use tokio::sync::Notify;

use super::{Append, BusEntry, Published, READ_BATCH, StreamId};
use crate::config::EndpointName;

/// How long [`MemoryReader::next_batch`] waits for an entry.
const READ_WAIT: Duration = Duration::from_secs(1);

#[derive(Debug, Default)]
struct Stream {
    entries: VecDeque<BusEntry>,
    last_id: StreamId,
    /// The newest entry trimmed away, as Redis's `max-deleted-entry-id`.
    max_deleted: StreamId,
}

#[derive(Debug, Default)]
struct State {
    streams: HashMap<EndpointName, Stream>,
    /// Highest offset published per (topic, partition).
    published: HashMap<(String, i32), i64>,
}

/// The in-process bus.
#[derive(Debug, Clone, Default)]
pub struct MemoryBus {
    state: Arc<Mutex<State>>,
    appended: Arc<Notify>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| {
            u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX)
        })
}

impl MemoryBus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic elsewhere while holding the lock leaves consistent data: every update
        // below is a single push or pop.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(super) fn append(&self, append: Append<'_>) -> Published {
        let mut state = self.lock();
        let partition_key = (append.topic.to_owned(), append.partition);
        if state
            .published
            .get(&partition_key)
            .is_some_and(|&last| last >= append.offset)
        {
            return Published::Duplicate;
        }
        let now = now_ms();
        let envelope = Bytes::copy_from_slice(append.body);
        let filter_key = append.filter_key.map(Bytes::copy_from_slice);
        for (endpoint, retention) in append.endpoints {
            let stream = state.streams.entry(endpoint.clone()).or_default();
            let id = if now > stream.last_id.ms {
                StreamId { ms: now, seq: 0 }
            } else {
                StreamId {
                    ms: stream.last_id.ms,
                    seq: stream.last_id.seq + 1,
                }
            };
            let previous = std::mem::replace(&mut stream.last_id, id);
            stream.entries.push_back(BusEntry {
                id,
                previous,
                kind: append.kind,
                filter_key: filter_key.clone(),
                envelope: envelope.clone(),
            });
            let oldest_kept_ms = now.saturating_sub(retention.max_age_secs.saturating_mul(1000));
            let max_records = usize::try_from(retention.max_records).unwrap_or(usize::MAX);
            while stream.entries.len() > max_records
                || stream
                    .entries
                    .front()
                    .is_some_and(|entry| entry.id.ms < oldest_kept_ms)
            {
                if let Some(trimmed) = stream.entries.pop_front() {
                    stream.max_deleted = trimmed.id;
                }
            }
        }
        state.published.insert(partition_key, append.offset);
        drop(state);
        self.appended.notify_waiters();
        Published::Appended
    }

    pub(super) fn reader(&self, endpoints: Vec<EndpointName>) -> MemoryReader {
        let state = self.lock();
        let cursors = endpoints
            .iter()
            .map(|endpoint| {
                state
                    .streams
                    .get(endpoint)
                    .map_or(StreamId::ZERO, |stream| stream.last_id)
            })
            .collect();
        drop(state);
        MemoryReader {
            bus: self.clone(),
            endpoints,
            cursors,
        }
    }

    pub(super) fn range(
        &self,
        endpoint: &EndpointName,
        after: StreamId,
        until: StreamId,
        count: usize,
    ) -> Vec<BusEntry> {
        let state = self.lock();
        let Some(stream) = state.streams.get(endpoint) else {
            return Vec::new();
        };
        let first = stream.entries.partition_point(|entry| entry.id <= after);
        stream
            .entries
            .range(first..)
            .take_while(|entry| entry.id <= until)
            .take(count)
            .cloned()
            .collect()
    }

    pub(super) fn trimmed_after(
        &self,
        endpoint: &EndpointName,
        after: StreamId,
    ) -> Option<StreamId> {
        let state = self.lock();
        let stream = state.streams.get(endpoint)?;
        (stream.max_deleted > after).then(|| {
            stream
                .entries
                .front()
                .map_or(StreamId::ZERO, |entry| entry.id)
        })
    }

    fn entries_after(
        &self,
        endpoints: &[EndpointName],
        cursors: &mut [StreamId],
    ) -> Vec<(usize, BusEntry)> {
        let state = self.lock();
        let mut batch = Vec::new();
        for (index, (endpoint, cursor)) in endpoints.iter().zip(cursors.iter_mut()).enumerate() {
            let Some(stream) = state.streams.get(endpoint) else {
                continue;
            };
            let first_new = stream.entries.partition_point(|entry| entry.id <= *cursor);
            for entry in stream.entries.range(first_new..).take(READ_BATCH) {
                *cursor = entry.id;
                batch.push((index, entry.clone()));
            }
        }
        batch
    }
}

/// Reads endpoint streams of a [`MemoryBus`].
#[derive(Debug)]
pub struct MemoryReader {
    bus: MemoryBus,
    endpoints: Vec<EndpointName>,
    pub(super) cursors: Vec<StreamId>,
}

impl MemoryReader {
    pub(super) async fn next_batch(&mut self) -> Vec<(usize, BusEntry)> {
        let appended = self.bus.appended.clone();
        let notified = appended.notified();
        tokio::pin!(notified);
        // Registered before looking, so that an append between the look and the wait wakes us.
        notified.as_mut().enable();
        let batch = self.bus.entries_after(&self.endpoints, &mut self.cursors);
        if !batch.is_empty() {
            return batch;
        }
        if tokio::time::timeout(READ_WAIT, notified).await.is_err() {
            return Vec::new();
        }
        self.bus.entries_after(&self.endpoints, &mut self.cursors)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::{Bus, EntryKind, Publication, SkippedRecords};
    use crate::config::Retention;
    use crate::envelope::Envelope;

    fn endpoint(name: &str) -> EndpointName {
        EndpointName::try_from(name.to_owned()).expect("valid name")
    }

    fn envelope(text: &str) -> Envelope {
        Envelope {
            filter_key: Some(text.as_bytes().to_vec()),
            json: text.as_bytes().to_vec(),
        }
    }

    fn publish(
        bus: &MemoryBus,
        endpoints: &[(EndpointName, Retention)],
        partition: i32,
        offset: i64,
    ) -> Published {
        let envelope = envelope(&format!("{partition}/{offset}"));
        bus.append(
            Publication {
                topic: "t",
                partition,
                offset,
                endpoints,
                envelope: &envelope,
            }
            .append(),
        )
    }

    #[tokio::test]
    async fn readers_see_new_entries_in_order_once() {
        let bus = MemoryBus::new();
        let endpoints = [
            (endpoint("a"), Retention::default()),
            (endpoint("b"), Retention::default()),
        ];
        assert_eq!(publish(&bus, &endpoints, 0, 0), Published::Appended);
        let mut reader = bus.reader(vec![endpoint("b")]);
        assert_eq!(publish(&bus, &endpoints, 0, 1), Published::Appended);
        assert_eq!(publish(&bus, &endpoints, 0, 1), Published::Duplicate);
        assert_eq!(publish(&bus, &endpoints, 0, 0), Published::Duplicate);
        assert_eq!(publish(&bus, &endpoints, 1, 0), Published::Appended);
        let batch = reader.next_batch().await;
        let seen: Vec<_> = batch
            .iter()
            .map(|(i, e)| (*i, e.envelope.clone()))
            .collect();
        assert_eq!(seen, vec![(0, Bytes::from("0/1")), (0, Bytes::from("1/0"))]);
        assert!(batch[0].1.id < batch[1].1.id);
    }

    #[test]
    fn retention_trims_by_count() {
        let bus = MemoryBus::new();
        let retention = Retention {
            max_records: 3,
            max_age_secs: 60,
        };
        let endpoints = [(endpoint("a"), retention)];
        for offset in 0..10 {
            publish(&bus, &endpoints, 0, offset);
        }
        let mut cursors = [StreamId::ZERO];
        let kept = bus.entries_after(&[endpoint("a")], &mut cursors);
        let kept: Vec<_> = kept.into_iter().map(|(_, e)| e.envelope).collect();
        assert_eq!(
            kept,
            vec![Bytes::from("0/7"), Bytes::from("0/8"), Bytes::from("0/9")]
        );
    }

    #[tokio::test]
    async fn a_skipped_records_marker_is_published_once_and_counts_as_published() {
        let bus = MemoryBus::new();
        let endpoints = [
            (endpoint("a"), Retention::default()),
            (endpoint("b"), Retention::default()),
        ];
        let mut reader = bus.reader(vec![endpoint("a"), endpoint("b")]);
        publish(&bus, &endpoints, 0, 2);
        let skipped = SkippedRecords {
            topic: "t".into(),
            partition: 0,
            first_offset: 3,
            last_offset: 7,
            error: "Local: Invalid compressed data".into(),
        };
        let shared = Bus::Memory(bus.clone());
        for expected in [Published::Appended, Published::Duplicate] {
            assert_eq!(
                shared
                    .publish_skipped(&skipped, &endpoints)
                    .await
                    .expect("memory bus"),
                expected
            );
        }
        // A record of the skipped stretch read again after a restart is not published.
        assert_eq!(publish(&bus, &endpoints, 0, 5), Published::Duplicate);
        assert_eq!(publish(&bus, &endpoints, 0, 8), Published::Appended);
        let batch = reader.next_batch().await;
        let kinds: Vec<_> = batch.iter().map(|(i, e)| (*i, e.kind)).collect();
        assert_eq!(
            kinds,
            vec![
                (0, EntryKind::Record),
                (0, EntryKind::Skipped),
                (0, EntryKind::Record),
                (1, EntryKind::Record),
                (1, EntryKind::Skipped),
                (1, EntryKind::Record),
            ]
        );
        let marker = &batch[1].1;
        assert_eq!(marker.filter_key, None);
        let parsed: SkippedRecords = serde_json::from_slice(&marker.envelope).expect("json");
        assert_eq!(parsed, skipped);
    }
}
