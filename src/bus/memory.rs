//! The in-process bus of `fjord dev`: the same semantics as the Redis bus — per-endpoint
//! streams with ordered ids, retention by count and age, idempotent publishing, and the
//! rows of table endpoints in key order — in memory. An entry is written as the Redis bus
//! writes it, as fields, and decoded by the same [`decode`] once, when it is appended.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::ops::Bound;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::Notify;

use super::entry::{decode, field};
use super::{
    Append, AppendEntry, AppendKind, BusEntry, READ_BATCH, StreamId, report_table_full, row_entry,
};
use crate::clock::now_ms;
use fjord_config::{EndpointName, Retention, TableBounds};

/// How long [`MemoryReader::next_batch`] waits for an entry.
const READ_WAIT: Duration = Duration::from_secs(1);

#[derive(Debug, Default)]
struct Stream {
    entries: VecDeque<BusEntry>,
    last_id: StreamId,
    /// The newest entry trimmed away, as Redis's `max-deleted-entry-id`.
    max_deleted: StreamId,
}

impl Stream {
    /// Appends `entry` with the next id, as Redis's `XADD *` numbers it.
    fn push(&mut self, now: u64, entry: &AppendEntry<'_>) -> StreamId {
        let id = if now > self.last_id.ms {
            StreamId { ms: now, seq: 0 }
        } else {
            StreamId {
                ms: self.last_id.ms,
                seq: self.last_id.seq + 1,
            }
        };
        let previous = std::mem::replace(&mut self.last_id, id);
        let tag = match (entry.kind, entry.filter_key) {
            (AppendKind::Skipped, _) => Some((field::SKIPPED, Bytes::from_static(b"1"))),
            (AppendKind::Record | AppendKind::Tombstone, Some(key)) => {
                Some((field::KEY, Bytes::copy_from_slice(key)))
            }
            (AppendKind::Record | AppendKind::Tombstone, None) => None,
        };
        let fields = [
            Some((field::ENVELOPE, Bytes::copy_from_slice(entry.body))),
            Some((field::PREVIOUS, Bytes::from(previous.to_string()))),
            tag,
        ];
        let fields = fields
            .into_iter()
            .flatten()
            .map(|(name, value)| (Bytes::from_static(name), value));
        self.entries.push_back(decode(id, fields));
        id
    }

    /// Drops what `retention` no longer keeps.
    fn trim(&mut self, now: u64, retention: Retention) {
        let oldest_kept_ms = now.saturating_sub(retention.max_age_secs.saturating_mul(1000));
        let max_records = usize::try_from(retention.max_records).unwrap_or(usize::MAX);
        while self.entries.len() > max_records
            || self
                .entries
                .front()
                .is_some_and(|entry| entry.id.ms < oldest_kept_ms)
        {
            if let Some(trimmed) = self.entries.pop_front() {
                self.max_deleted = trimmed.id;
            }
        }
    }
}

/// A table endpoint's rows: per key, the id and envelope of its latest record.
#[derive(Debug, Default)]
struct Table {
    rows: BTreeMap<Bytes, (StreamId, Bytes)>,
    /// The bytes of keys and rows, as the Redis bus counts them: a row is its id, a space
    /// and its envelope.
    bytes: u64,
}

impl Table {
    /// Applies a keyed record appended at `id`; false when it was a new key that the
    /// table, being full, did not keep.
    fn apply(&mut self, bounds: TableBounds, id: StreamId, entry: &AppendEntry<'_>) -> bool {
        let Some(key) = entry.filter_key else {
            return true;
        };
        let size = |key: &[u8], id: StreamId, envelope: &[u8]| {
            (key.len() + id.to_string().len() + 1 + envelope.len()) as u64
        };
        match entry.kind {
            AppendKind::Skipped => true,
            AppendKind::Tombstone => {
                if let Some((old_id, old)) = self.rows.remove(key) {
                    self.bytes -= size(key, old_id, &old);
                }
                true
            }
            AppendKind::Record => {
                let new = size(key, id, entry.body);
                if let Some((old_id, old)) = self.rows.get_mut(key) {
                    self.bytes = self.bytes - size(key, *old_id, old) + new;
                    *old_id = id;
                    *old = Bytes::copy_from_slice(entry.body);
                    return true;
                }
                if self.rows.len() as u64 >= bounds.max_keys || self.bytes + new > bounds.max_bytes
                {
                    return false;
                }
                self.bytes += new;
                self.rows.insert(
                    Bytes::copy_from_slice(key),
                    (id, Bytes::copy_from_slice(entry.body)),
                );
                true
            }
        }
    }
}

#[derive(Debug, Default)]
struct State {
    streams: HashMap<EndpointName, Stream>,
    tables: HashMap<EndpointName, Table>,
    /// Highest offset published per (endpoint, topic, partition).
    published: HashMap<(EndpointName, String, i32), i64>,
}

/// The in-process bus.
#[derive(Debug, Clone, Default)]
pub struct MemoryBus {
    state: Arc<Mutex<State>>,
    appended: Arc<Notify>,
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

    pub(super) fn append(&self, append: &Append<'_>) -> usize {
        let mut guard = self.lock();
        let state = &mut *guard;
        let now = now_ms();
        let mut appended = 0;
        for (endpoint, keeping) in append.endpoints {
            let partition_key = (endpoint.clone(), append.topic.to_owned(), append.partition);
            let mut done = state.published.get(&partition_key).copied();
            let stream = state.streams.entry(endpoint.clone()).or_default();
            let mut table = keeping
                .table
                .map(|bounds| (bounds, state.tables.entry(endpoint.clone()).or_default()));
            let mut refused = 0;
            for entry in &append.entries {
                if done.is_some_and(|done| done >= entry.offset) {
                    continue;
                }
                done = Some(entry.offset);
                appended += 1;
                let id = stream.push(now, entry);
                if let Some((bounds, table)) = &mut table
                    && !table.apply(*bounds, id, entry)
                {
                    refused += 1;
                }
            }
            stream.trim(now, keeping.retention);
            report_table_full(endpoint, refused);
            if let Some(done) = done {
                state.published.insert(partition_key, done);
            }
        }
        drop(guard);
        if appended > 0 {
            self.appended.notify_waiters();
        }
        appended
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

    pub(super) fn rows(
        &self,
        endpoint: &EndpointName,
        after: Option<&[u8]>,
        count: usize,
    ) -> Vec<BusEntry> {
        let state = self.lock();
        let Some(table) = state.tables.get(endpoint) else {
            return Vec::new();
        };
        let from = after.map_or(Bound::Unbounded, Bound::Excluded);
        table
            .rows
            .range::<[u8], _>((from, Bound::Unbounded))
            .take(count)
            .map(|(key, (id, envelope))| row_entry(*id, key.clone(), envelope.clone()))
            .collect()
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
