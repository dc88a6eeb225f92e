//! Replay: reading back from the bus what a client must have before its live records — the
//! records of each endpoint between the client's last id and the point where its live
//! subscription began, noticing when retention already trimmed some of them (a gap); and
//! for a table endpoint, a snapshot of its rows instead, for a client that has none or
//! whose records were trimmed. Pages are bounded in entries and, for big records, in bytes:
//! a client holds one page at a time.

use std::collections::VecDeque;

use bytes::Bytes;
use futures_util::stream::{self, BoxStream, StreamExt};

use fjord_bus::{Bus, BusEntry, BusError, StreamId};
use fjord_config::EndpointName;

/// Most entries fetched per bus round trip.
const PAGE: usize = 512;
/// About the most envelope bytes one page holds. Redis cannot count bytes for us, so a
/// page's count follows the entries seen: this over the largest entry of the last page.
pub const PAGE_BYTES: usize = 1024 * 1024;

/// One endpoint's stretch to read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplayRange {
    /// The endpoint's index in the hub.
    pub endpoint: usize,
    /// The client's last id (exclusive).
    pub after: StreamId,
    /// Where its live subscription began (inclusive).
    pub until: StreamId,
    /// What the client is sent.
    pub catch_up: CatchUp,
}

/// How a [`ReplayRange`] is caught up with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CatchUp {
    /// The records in the range, after a gap when some were trimmed (`report_gap`; not for
    /// a fresh client starting at the oldest).
    Records {
        /// Whether to report trimmed records.
        report_gap: bool,
    },
    /// A table endpoint's records in the range, or its snapshot when some were trimmed.
    TableRecords,
    /// A table endpoint's snapshot: its rows, then the live records after `until`.
    Snapshot {
        /// Whether `fjord.snapshot_start` was yielded.
        started: bool,
        /// The key of the last row read; `None` before the first.
        after_key: Option<Bytes>,
        /// Whether the last rows were read.
        done: bool,
    },
}

impl CatchUp {
    /// A snapshot from its first row.
    pub fn snapshot() -> Self {
        Self::Snapshot {
            started: false,
            after_key: None,
            done: false,
        }
    }
}

/// What a replay yields, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplayItem {
    /// Records after `requested` were trimmed; the replay continues at `oldest` (`ZERO`
    /// when nothing is kept).
    Gap {
        /// The endpoint's index.
        endpoint: usize,
        /// The client's last id.
        requested: StreamId,
        /// The oldest id still kept.
        oldest: StreamId,
    },
    /// Entries, as (endpoint index, entry).
    Entries(Vec<(usize, BusEntry)>),
    /// A table endpoint's rows follow; they replace whatever the client held.
    SnapshotStart {
        /// The endpoint's index.
        endpoint: usize,
    },
    /// Rows of a table endpoint's snapshot, in key order, each as the entry of its record:
    /// those at or before where the live records after the snapshot begin. A row newer than
    /// that changed while the snapshot was read; its record is among the live ones, which
    /// bring it right after the snapshot, so that a client never gets a record twice, nor
    /// one older than what it has, and resumes exactly from the snapshot's end.
    Rows {
        /// The endpoint's index.
        endpoint: usize,
        /// The rows.
        rows: Vec<BusEntry>,
    },
    /// The snapshot is complete; live records follow from `at`.
    SnapshotEnd {
        /// The endpoint's index.
        endpoint: usize,
        /// Where the live records begin.
        at: StreamId,
    },
}

struct State {
    bus: Bus,
    names: Vec<EndpointName>,
    ranges: VecDeque<ReplayRange>,
    /// Entries to ask for next.
    count: usize,
    /// The most a page may have.
    max_count: usize,
}

/// How many entries the page after `page` may have, at most `max_count`: as many as fit in
/// [`PAGE_BYTES`] at the size of its largest entry, and at most twice as many as it had,
/// so that a run of small records followed by big ones costs a few pages, not a
/// multiple of the bound.
fn next_count(page: &[BusEntry], count: usize, max_count: usize) -> usize {
    let largest = page.iter().map(BusEntry::size).max().unwrap_or(0).max(1);
    (PAGE_BYTES / largest).clamp(1, count.saturating_mul(2).min(max_count))
}

/// Reads `ranges` back in order, one page at a time, of at most `max_count` entries (and
/// about [`PAGE_BYTES`]); the first page has one entry, to learn how big they are. `names`
/// maps endpoint indexes to names. Ends after the first error: the client reconnects and
/// resumes from what it got.
pub fn replay(
    bus: Bus,
    names: Vec<EndpointName>,
    ranges: Vec<ReplayRange>,
    max_count: usize,
) -> BoxStream<'static, Result<ReplayItem, BusError>> {
    let max_count = max_count.clamp(1, PAGE);
    let state = State {
        bus,
        names,
        ranges: ranges.into(),
        count: 1,
        max_count,
    };
    stream::unfold(state, |mut state| async move {
        let item = next_item(&mut state).await;
        if item.as_ref().is_some_and(Result::is_err) {
            state.ranges.clear();
        }
        item.map(|item| (item, state))
    })
    .boxed()
}

async fn next_item(state: &mut State) -> Option<Result<ReplayItem, BusError>> {
    loop {
        let range = state.ranges.front_mut()?;
        let Some(name) = state.names.get(range.endpoint) else {
            state.ranges.pop_front();
            continue;
        };
        let endpoint = range.endpoint;
        match &mut range.catch_up {
            CatchUp::Records { report_gap: false } => {}
            CatchUp::Records { report_gap } => {
                *report_gap = false;
                match state.bus.trimmed_after(name, range.after).await {
                    Err(error) => return Some(Err(error)),
                    Ok(Some(oldest)) => {
                        return Some(Ok(ReplayItem::Gap {
                            endpoint,
                            requested: range.after,
                            oldest,
                        }));
                    }
                    Ok(None) => {}
                }
            }
            CatchUp::TableRecords => {
                range.catch_up = match state.bus.trimmed_after(name, range.after).await {
                    Err(error) => return Some(Err(error)),
                    Ok(Some(_)) => CatchUp::snapshot(),
                    Ok(None) => CatchUp::Records { report_gap: false },
                };
                continue;
            }
            CatchUp::Snapshot { started, .. } if !*started => {
                *started = true;
                return Some(Ok(ReplayItem::SnapshotStart { endpoint }));
            }
            CatchUp::Snapshot { done: true, .. } => {
                let at = range.until;
                state.ranges.pop_front();
                return Some(Ok(ReplayItem::SnapshotEnd { endpoint, at }));
            }
            CatchUp::Snapshot {
                after_key, done, ..
            } => {
                let count = state.count;
                let rows = match state.bus.rows(name, after_key.as_deref(), count).await {
                    Err(error) => return Some(Err(error)),
                    Ok(rows) => rows,
                };
                state.count = next_count(&rows, count, state.max_count);
                *done = rows.len() < count;
                *after_key = rows.last().and_then(BusEntry::filter_key).cloned();
                let until = range.until;
                let rows: Vec<BusEntry> = rows.into_iter().filter(|row| row.id <= until).collect();
                if !rows.is_empty() {
                    return Some(Ok(ReplayItem::Rows { endpoint, rows }));
                }
                continue;
            }
        }
        let count = state.count;
        let entries = match state.bus.range(name, range.after, range.until, count).await {
            Err(error) => return Some(Err(error)),
            Ok(entries) => entries,
        };
        state.count = next_count(&entries, count, state.max_count);
        match entries.last() {
            Some(last) if entries.len() == count && last.id < range.until => range.after = last.id,
            _ => {
                state.ranges.pop_front();
            }
        }
        if !entries.is_empty() {
            return Some(Ok(ReplayItem::Entries(
                entries.into_iter().map(|entry| (endpoint, entry)).collect(),
            )));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fjord_bus::{EntryKind, WireJson};

    fn entries(sizes: &[usize]) -> Vec<BusEntry> {
        sizes
            .iter()
            .map(|&size| BusEntry {
                id: StreamId::ZERO,
                previous: StreamId::ZERO,
                kind: EntryKind::Record {
                    filter_key: None,
                    envelope: WireJson::new(Bytes::from(format!(
                        "{{\"x\":\"{}\"}}",
                        "x".repeat(size.saturating_sub(8))
                    )))
                    .expect("an object"),
                },
            })
            .collect()
    }

    #[test]
    fn pages_grow_at_most_twofold_and_shrink_to_fit_their_bytes() {
        assert_eq!(next_count(&entries(&[100]), 1, 512), 2);
        assert_eq!(next_count(&entries(&[100; 256]), 256, 512), 512);
        assert_eq!(
            next_count(&entries(&[100; 4]), 4, 16),
            8,
            "never above the queue"
        );
        assert_eq!(next_count(&entries(&[100 * 1024; 8]), 8, 512), 10);
        assert_eq!(
            next_count(&entries(&[2 * PAGE_BYTES]), 1, 512),
            1,
            "one at least"
        );
        assert_eq!(next_count(&[], 4, 512), 8);
    }
}
