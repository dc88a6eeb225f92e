//! One connection's stream of bytes: the prelude, then what it missed when it resumes (read
//! back a page at a time and written a chunk at a time), then its live events from its
//! outlet, several per write when they queue up. A connection whose oldest event waited too
//! long is shed and resumes by id. The subscription reaches back into the hub only through
//! [`HubHandle`]: what it renders, sheds and leaves.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::stream::{BoxStream, Stream, StreamExt};
use tokio::time::Instant;

use super::outlet::{ClientQueue, DirectWrite, Frame, QueuedEvent};
use crate::compression::{Encoder, Encoding};
use crate::keys::{ClientId, KeySet};
use crate::metrics::Metrics;
use crate::queue::Measured as _;
use crate::replay::ReplayItem;
use crate::sse::{self, RenderedEvent, ResumeId};
use crate::views::View;
use fjord_bus::clock::now_ms;
use fjord_bus::process::LogThrottle;
use fjord_bus::{BusEntry, BusError, Receivers, StreamId};

/// Most frames written to a connection in one write.
const MAX_COALESCED_FRAMES: usize = 64;
/// Most bytes of frames coalesced into one write (a frame larger than this goes alone, from
/// its shared bytes where it can).
const MAX_COALESCED_BYTES: usize = 64 * 1024;
/// About the most replayed bytes written to a connection in one write (one event may pass
/// it): a resuming connection holds its replay's page and this.
const REPLAY_CHUNK_BYTES: usize = 64 * 1024;

/// What a subscription asks of its hub, and all it may: the stream depends on these calls,
/// not on the hub's state, so that either side's insides can change alone.
pub(super) trait HubHandle: Send + Sync {
    /// The event of a replayed entry of `endpoint`; `None` for an endpoint the hub lacks.
    fn render(&self, endpoint: usize, entry: &BusEntry) -> Option<RenderedEvent>;
    /// The name of `endpoint`, for a gap in its replay.
    fn endpoint_name(&self, endpoint: usize) -> &str;
    /// How long an event may wait for a connection before the connection is shed.
    fn max_lag(&self) -> Duration;
    /// The server's metrics.
    fn metrics(&self) -> &Metrics;
    /// Sheds connection `client`, which fell behind: the hub queues it nothing more.
    fn cut_off(&self, client: ClientId);
    /// Forgets connection `client`, whose stream was dropped.
    fn leave(&self, client: ClientId);
}

/// What a connection writes next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outgoing {
    /// SSE text, to be framed as the connection's transfer encoding wants.
    Events(Bytes),
    /// The rest of an event the hub began to write with the connection's [`DirectWrite`],
    /// which holds it: to be finished before anything else.
    Unfinished,
}

/// The replay of a resuming connection.
pub(super) type Backlog = BoxStream<'static, Result<ReplayItem, BusError>>;

/// Where a new subscription starts.
pub(super) struct Start {
    /// Its first bytes: the retry interval and its position.
    pub(super) prelude: Bytes,
    /// Its position in each of its endpoints.
    pub(super) cursor: ResumeId,
    /// What it must be sent before its live events.
    pub(super) backlog: Option<Backlog>,
}

/// One connection's stream of bytes: the prelude, then what it missed (when it resumes),
/// then its live events, several per write when they queue up. Dropping it unsubscribes the
/// connection.
pub struct Subscription {
    prelude: Option<Bytes>,
    /// What it must be sent before its live events; `None` once sent.
    replay: Option<Box<Replay>>,
    /// When its replay ended: events queued while it replayed waited for the replay, not
    /// for the client, and do not count as lag.
    replayed_at: Option<Instant>,
    receiver: ClientQueue,
    /// Handed to the hub once the connection is live (see [`Subscription::write_directly`]).
    direct: Option<Arc<dyn DirectWrite>>,
    endpoints: Vec<usize>,
    /// What narrows its replay; `None` when it takes every record whole.
    narrowing: Option<Box<Narrowing>>,
    /// The connection's position in each of its endpoints: an event at or before it was
    /// sent already and is skipped.
    cursor: ResumeId,
    hub: Arc<dyn HubHandle>,
    id: ClientId,
}

/// A connection's replay in progress. Boxed, and absent once it is over (most connections
/// never have one), so that a live connection's task, where every byte counts once per open
/// stream, does not carry it.
struct Replay {
    backlog: Backlog,
    /// The replayed entries of the backlog's current page not yet written, and their bytes.
    page: VecDeque<(usize, BusEntry)>,
    page_bytes: usize,
    /// Whether `page` holds a table's rows, which carry no id, rather than records.
    page_of_rows: bool,
    /// The replay's bytes this connection holds — its page, and the chunk it was handed
    /// last, written by the time it asks for more — as counted in the metrics.
    held: usize,
    /// When it was handed its last replayed chunk.
    handed_at: Option<Instant>,
}

/// What narrows a connection's replay as the hub narrows its live events: its keys, and its
/// view of each of its endpoints. Boxed, and absent for a connection that takes everything,
/// so that such a connection's task, where every byte counts once per open stream, does
/// not grow for it.
#[derive(Debug)]
struct Narrowing {
    keys: Option<Arc<KeySet>>,
    /// In the order of the subscription's endpoints.
    views: Vec<Option<Arc<View>>>,
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
    /// The stream of connection `id` of `hub`, which takes its live events from `receiver`,
    /// for `endpoints` and `keys` (all records for `None`) seen through `views` (one per
    /// endpoint), from `start`.
    pub(super) fn new(
        hub: Arc<dyn HubHandle>,
        id: ClientId,
        receiver: ClientQueue,
        endpoints: Vec<usize>,
        keys: Option<Arc<KeySet>>,
        views: Vec<Option<Arc<View>>>,
        start: Start,
    ) -> Self {
        Self {
            prelude: Some(start.prelude),
            replay: start.backlog.map(|backlog| {
                Box::new(Replay {
                    backlog,
                    page: VecDeque::new(),
                    page_bytes: 0,
                    page_of_rows: false,
                    held: 0,
                    handed_at: None,
                })
            }),
            replayed_at: None,
            receiver,
            direct: None,
            endpoints,
            narrowing: (keys.is_some() || views.iter().any(Option::is_some))
                .then(|| Box::new(Narrowing { keys, views })),
            cursor: start.cursor,
            hub,
            id,
        }
    }

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

    /// Writes an event the connection's position moved to.
    fn write_taken(&self, event: &RenderedEvent, out: &mut BytesMut) {
        if self.is_multi_endpoint() {
            event.write_with_id(&self.cursor, out);
        } else {
            out.extend_from_slice(event.bytes());
        }
    }

    /// Writes a live event the connection's position moved to, compressed once for every
    /// connection when its stream is compressed.
    fn write_live(&self, event: &QueuedEvent, out: &mut BytesMut) {
        match self.receiver.encoder() {
            None => self.write_taken(&event.event.text, out),
            Some(encoder) if self.is_multi_endpoint() => {
                let mut id_line = BytesMut::new();
                self.cursor.write_id_line(&mut id_line);
                encoder.put_event_with_id(&id_line, &event.event, out);
            }
            Some(encoder) => encoder.put_event(&event.event, out),
        }
    }

    /// Bytes rendered for this connection alone, as its stream's coding sends them.
    fn own(&self, text: Bytes) -> Bytes {
        match self.receiver.encoder() {
            Some(encoder) => encoder.stored(&text),
            None => text,
        }
    }

    /// The coding the stream is sent in, if it is compressed.
    pub fn encoding(&self) -> Option<Encoding> {
        self.receiver.encoder().map(Encoder::encoding)
    }

    /// The last bytes of a compressed stream, which end its coding; nothing for a plain
    /// one.
    pub fn finish(&self) -> Option<Vec<u8>> {
        self.receiver.encoder().map(Encoder::finish)
    }

    /// Counts a live event about to be written, `now_ms`, in the delivery latency.
    fn count_latency(&self, event: &QueuedEvent, now_ms: u64) {
        if let Some(latency) = self.hub.metrics().latency.get() {
            latency.record(event.endpoint, now_ms, event.id.ms, event.kafka_ms);
        }
    }

    /// Writes a frame taken from the queue at `now_ms`.
    fn write_frame(&mut self, frame: Frame, now_ms: u64, out: &mut BytesMut) {
        match frame {
            Frame::Raw(bytes) => match self.receiver.encoder() {
                Some(encoder) => encoder.put_stored(&bytes, out),
                None => out.extend_from_slice(&bytes),
            },
            Frame::Event(event) => {
                if self.advance(event.endpoint, event.id) {
                    self.write_live(&event, out);
                    self.count_latency(&event, now_ms);
                }
            }
            // Never coalesced: it is taken alone, first (see `poll_next`).
            Frame::Unfinished => {}
        }
    }

    /// The event of a replayed entry or a row, as this connection's keys and view let it
    /// see it; `None` when they leave it out.
    fn seen(&self, endpoint: usize, entry: &BusEntry) -> Option<RenderedEvent> {
        let narrowing = self.narrowing.as_deref();
        let wanted = match (narrowing.and_then(|n| n.keys.as_deref()), entry.receivers()) {
            (None, _) | (_, Receivers::All) => true,
            (Some(keys), Receivers::Key(Some(key))) => keys.contains(key),
            (Some(_), Receivers::Key(None)) => false,
        };
        if !wanted {
            return None;
        }
        let event = self.hub.render(endpoint, entry)?;
        let view = narrowing.and_then(|narrowing| {
            let position = self.endpoints.iter().position(|&e| e == endpoint)?;
            narrowing.views.get(position).cloned().flatten()
        });
        match view {
            Some(view) => view.see_replayed(entry, self.hub.endpoint_name(endpoint), event),
            None => Some(event),
        }
    }

    fn write_replayed(&mut self, endpoint: usize, entry: &BusEntry, out: &mut BytesMut) {
        if let Some(event) = self.seen(endpoint, entry)
            && self.advance(endpoint, entry.id)
        {
            self.write_taken(&event, out);
        }
    }

    /// Writes a snapshot's row, without an id: the position moves only at its end.
    fn write_row(&self, endpoint: usize, entry: &BusEntry, out: &mut BytesMut) {
        if let Some(event) = self.seen(endpoint, entry) {
            event.write_without_id(out);
        }
    }

    /// Counts `bytes` as what this connection's replay holds now.
    fn hold_replay(&mut self, bytes: usize) {
        let Some(replay) = self.replay.as_deref_mut() else {
            return;
        };
        let signed = |bytes: usize| i64::try_from(bytes).unwrap_or(i64::MAX);
        self.hub
            .metrics()
            .replay_buffered_bytes
            .fetch_add(signed(bytes) - signed(replay.held), Relaxed);
        replay.held = bytes;
    }

    /// Makes `entries` the page to write next: a table's rows, or records.
    fn take_page(&mut self, entries: Vec<(usize, BusEntry)>, rows: bool) {
        let Some(replay) = self.replay.as_deref_mut() else {
            return;
        };
        replay.page_of_rows = rows;
        replay.page_bytes = entries.iter().map(|(_, entry)| entry.size()).sum();
        replay.page = entries.into();
        let bytes = replay.page_bytes;
        self.hold_replay(bytes);
    }

    /// The next entry of the page, taken out of it.
    fn next_in_page(&mut self) -> Option<(usize, BusEntry)> {
        let replay = self.replay.as_deref_mut()?;
        let next = replay.page.pop_front()?;
        replay.page_bytes -= next.1.size();
        Some(next)
    }

    /// Ends the replay, and gives back what it held.
    fn end_replay(&mut self) {
        self.hold_replay(0);
        self.replay = None;
    }

    /// Ends the replay early: the connection gets nothing more and resumes from what it got.
    fn abandon_replay(&mut self) {
        self.end_replay();
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
            .replay
            .as_deref_mut()
            .and_then(|replay| replay.handed_at.take())
            .is_some_and(|handed| handed.elapsed() > self.hub.max_lag());
        if too_slow {
            self.hub.cut_off(self.id);
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
            let Some(replay) = self.replay.as_deref_mut() else {
                return Poll::Ready(None);
            };
            if !replay.page.is_empty() {
                let rows = replay.page_of_rows;
                let mut out = BytesMut::new();
                let mut frames = 0;
                while out.len() < REPLAY_CHUNK_BYTES && frames < MAX_COALESCED_FRAMES {
                    let Some((endpoint, entry)) = self.next_in_page() else {
                        break;
                    };
                    if rows {
                        self.write_row(endpoint, &entry, &mut out);
                    } else {
                        self.write_replayed(endpoint, &entry, &mut out);
                    }
                    frames += 1;
                }
                let page_bytes = self.replay.as_ref().map_or(0, |replay| replay.page_bytes);
                self.hold_replay(page_bytes + out.len());
                if !out.is_empty() {
                    if let Some(replay) = self.replay.as_deref_mut() {
                        replay.handed_at = Some(Instant::now());
                    }
                    return Poll::Ready(Some(out.freeze()));
                }
                continue;
            }
            match replay.backlog.poll_next_unpin(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => {
                    self.end_replay();
                    self.replayed_at = Some(Instant::now());
                    return Poll::Ready(None);
                }
                Poll::Ready(Some(Err(error))) => {
                    // Ending the stream makes the client reconnect and resume from what
                    // it got.
                    // Once per connection would be a line for each resumer while the bus is
                    // down: the count held back says how many.
                    static REPLAY_FAILURES: LogThrottle = LogThrottle::new(Duration::from_secs(10));
                    if let Some(held_back) = REPLAY_FAILURES.admit() {
                        tracing::warn!(%error, held_back, "replay failed; closing the stream");
                    }
                    self.abandon_replay();
                    return Poll::Ready(None);
                }
                Poll::Ready(Some(Ok(ReplayItem::Gap {
                    endpoint,
                    requested,
                    oldest,
                }))) => {
                    self.hold_replay(0);
                    let name = self.hub.endpoint_name(endpoint);
                    return Poll::Ready(Some(sse::gap(name, requested, oldest)));
                }
                Poll::Ready(Some(Ok(ReplayItem::Entries(entries)))) => {
                    self.take_page(entries, false);
                }
                Poll::Ready(Some(Ok(ReplayItem::SnapshotStart { endpoint }))) => {
                    self.hold_replay(0);
                    let mut out = BytesMut::new();
                    sse::snapshot_start(self.hub.endpoint_name(endpoint), &mut out);
                    return Poll::Ready(Some(out.freeze()));
                }
                Poll::Ready(Some(Ok(ReplayItem::Rows { endpoint, rows }))) => {
                    self.take_page(rows.into_iter().map(|row| (endpoint, row)).collect(), true);
                }
                Poll::Ready(Some(Ok(ReplayItem::SnapshotEnd { endpoint, at }))) => {
                    self.hold_replay(0);
                    if let Some(position) = self.endpoints.iter().position(|&e| e == endpoint) {
                        self.cursor.0[position] = at;
                    }
                    let mut out = BytesMut::new();
                    sse::snapshot_end(self.hub.endpoint_name(endpoint), &self.cursor, &mut out);
                    return Poll::Ready(Some(out.freeze()));
                }
            }
        }
    }
}

impl Stream for Subscription {
    type Item = Outgoing;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if let Some(prelude) = self.prelude.take() {
            let first = match self.receiver.encoder() {
                Some(encoder) => {
                    let mut out = BytesMut::with_capacity(prelude.len() + 16);
                    encoder.start(&prelude, &mut out);
                    out.freeze()
                }
                None => prelude,
            };
            return Poll::Ready(Some(Outgoing::Events(first)));
        }
        if self.replay.is_some() {
            match self.poll_backlog(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(bytes)) => {
                    return Poll::Ready(Some(Outgoing::Events(self.own(bytes))));
                }
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
            // for the others; it resumes by id. The wait is noted too, for the hub's look
            // at whether the server as a whole keeps up (`hub::overload`).
            if let Frame::Event(event) = &first {
                let waited = self
                    .replayed_at
                    .map_or(event.queued_at, |replayed| replayed.max(event.queued_at))
                    .elapsed();
                self.receiver.note_wait(waited);
                if waited > self.hub.max_lag() {
                    self.hub.cut_off(self.id);
                    self.receiver.queue.close_and_clear();
                    return Poll::Ready(None);
                }
            }
            if let Frame::Unfinished = first {
                return Poll::Ready(Some(Outgoing::Unfinished));
            }
            // Coalesced into a buffer of the connection's own, copied from the shared
            // events: bounded in bytes too, or a lagging connection would copy its whole
            // queue of large records.
            let fits = |taken: usize| {
                move |frame: &Frame| {
                    !matches!(frame, Frame::Unfinished)
                        && taken + frame.bytes() <= MAX_COALESCED_BYTES
                }
            };
            let now = now_ms();
            if let Some(second) = self.receiver.queue.try_next_if(fits(first.bytes())) {
                let mut out = BytesMut::with_capacity(4096);
                self.write_frame(first, now, &mut out);
                self.write_frame(second, now, &mut out);
                for _ in 2..MAX_COALESCED_FRAMES {
                    match self.receiver.queue.try_next_if(fits(out.len())) {
                        Some(frame) => self.write_frame(frame, now, &mut out),
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
                    return Poll::Ready(Some(Outgoing::Events(self.own(Bytes::clone(&bytes)))));
                }
                Frame::Event(event) if !self.is_multi_endpoint() => {
                    if self.advance(event.endpoint, event.id) {
                        // Live, and past what it was sent before: every later event is new
                        // to it, so the hub may write them itself.
                        if let Some(direct) = self.direct.take() {
                            self.receiver.write_directly(direct);
                        }
                        self.count_latency(&event, now);
                        let encoder = self.receiver.encoder();
                        if let Some(encoder) = encoder {
                            encoder.count(event.event.text.bytes());
                        }
                        let bytes = event.event.bytes_for(encoder).clone();
                        return Poll::Ready(Some(Outgoing::Events(bytes)));
                    }
                }
                frame => {
                    let mut out = BytesMut::new();
                    self.write_frame(frame, now, &mut out);
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
        self.hub.leave(self.id);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering::Relaxed;
    use std::time::Duration;

    use futures_util::StreamExt;

    use super::super::testing::{
        entry, hub, hub_on_memory_bus, hub_with, keyed, live, name, next_text, offsets, publish,
        publish_padded, read_offsets, read_text,
    };
    use super::REPLAY_CHUNK_BYTES;
    use crate::hub::Hub;
    use crate::sse::ResumeId;
    use fjord_bus::memory::MemoryBus;
    use fjord_bus::{Bus, StreamId};
    use fjord_config::{Retention, ServerConfig, StartPosition};

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

    #[tokio::test(start_paused = true)]
    async fn a_connection_that_stopped_reading_is_cut_off_in_time_however_big_its_queue() {
        let hub = hub(100_000);
        let mut stopped = hub.subscribe(live(vec![1]), None, None);
        next_text(&mut stopped).await;
        // It found its queue empty once: live.
        assert!(futures_util::FutureExt::now_or_never(stopped.next()).is_none());
        hub.dispatch(&[(1, entry(10, "a"))]);
        let lag = ServerConfig::default().client_max_lag();
        tokio::time::advance(lag).await;
        hub.dispatch(&[(1, entry(11, "a"))]);
        assert_eq!(hub.metrics().clients_dropped.load(Relaxed), 0, "not yet");
        tokio::time::advance(Duration::from_millis(1)).await;
        hub.dispatch(&[(1, entry(12, "a"))]);
        assert_eq!(
            hub.metrics().clients_dropped.load(Relaxed),
            1,
            "its oldest event waited past the bound when the next came"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_that_a_reader_keeps_up_with_is_not_shed() {
        let hub = hub(ServerConfig::default().client_queue);
        let mut reader = hub.subscribe(live(vec![1]), None, None);
        next_text(&mut reader).await;
        assert!(futures_util::FutureExt::now_or_never(reader.next()).is_none());
        // Ten bus reads of 512 entries each, back to back, before the reader gets a turn.
        let batches: Vec<Vec<_>> = (0..10_u64)
            .map(|batch| {
                (0..512)
                    .map(|i| (1, entry(100 + batch * 512 + i, "k")))
                    .collect()
            })
            .collect();
        for batch in &batches {
            hub.dispatch(batch);
        }
        assert_eq!(hub.metrics().clients_dropped.load(Relaxed), 0);
        let mut read = 0;
        while read < 5_120 {
            read += next_text(&mut reader).await.matches("\nevent: ").count();
        }
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

    const BIG: usize = 100 * 1024;

    fn replay_held(hub: &Hub) -> usize {
        usize::try_from(hub.metrics().replay_buffered_bytes.load(Relaxed)).expect("not negative")
    }

    #[tokio::test]
    async fn a_replay_of_big_records_holds_about_a_page_and_is_written_in_chunks() {
        let (bus, mut reader, hub) = hub_on_memory_bus(StartPosition::Live).await;
        let ids = publish_padded(&hub, &bus, &mut reader, 0..40, Retention::default(), BIG).await;
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
        let ids = publish_padded(&hub, &bus, &mut reader, 0..5, Retention::default(), BIG).await;
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
        let ids = publish_padded(&hub, &bus, &mut reader, 0..5, Retention::default(), BIG).await;
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
        let interest = keyed(vec![0, 1], ["k2", "k5"]);
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
}
