//! Replay: reading back from the bus what a resuming client missed — the records of each
//! endpoint between the client's last id and the point where its live subscription began —
//! and noticing when retention already trimmed some of them (a gap).

use std::collections::VecDeque;

use futures_util::stream::{self, BoxStream, StreamExt};

use crate::bus::{Bus, BusEntry, BusError, StreamId};
use crate::config::EndpointName;

/// Entries fetched per bus round trip.
const PAGE: usize = 512;

/// One endpoint's stretch to read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplayRange {
    /// The endpoint's index in the hub.
    pub endpoint: usize,
    /// The client's last id (exclusive).
    pub after: StreamId,
    /// Where its live subscription began (inclusive).
    pub until: StreamId,
    /// Whether to report trimmed records; not for a fresh client starting at the oldest.
    pub report_gap: bool,
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
}

struct State {
    bus: Bus,
    names: Vec<EndpointName>,
    ranges: VecDeque<ReplayRange>,
}

/// Reads `ranges` back in order, one page at a time. `names` maps endpoint indexes to names.
/// Ends after the first error: the client reconnects and resumes from what it got.
pub fn replay(
    bus: Bus,
    names: Vec<EndpointName>,
    ranges: Vec<ReplayRange>,
) -> BoxStream<'static, Result<ReplayItem, BusError>> {
    let state = State {
        bus,
        names,
        ranges: ranges.into(),
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
        if range.report_gap {
            range.report_gap = false;
            match state.bus.trimmed_after(name, range.after).await {
                Err(error) => return Some(Err(error)),
                Ok(Some(oldest)) => {
                    return Some(Ok(ReplayItem::Gap {
                        endpoint: range.endpoint,
                        requested: range.after,
                        oldest,
                    }));
                }
                Ok(None) => {}
            }
        }
        let entries = match state.bus.range(name, range.after, range.until, PAGE).await {
            Err(error) => return Some(Err(error)),
            Ok(entries) => entries,
        };
        let endpoint = range.endpoint;
        match entries.last() {
            Some(last) if entries.len() == PAGE && last.id < range.until => range.after = last.id,
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
