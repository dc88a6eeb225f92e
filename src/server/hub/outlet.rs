//! The outlet a connection drains: its bounded queue of frames (shared events, shared bytes),
//! and once the connection is live, the hub's way to write an event to its socket in the
//! connection task's place. The hub hands over SSE text only; how a connection frames it on
//! the wire, and what it keeps of a write the socket took in part, is the connection's.
//!
//! # Ordering: the queue and direct writes
//!
//! Bytes reach a connection's socket two ways: its task writes what it takes from the queue
//! (`connection::pump`), and the hub writes an event itself ([`DirectWrite`]) under the
//! queue's lock ([`Queue::push_or_deliver`]). These rules make the two one ordered stream
//! without repeats; this is the one place they are stated, with the tests that guard them.
//!
//! 1. **A direct write is the next bytes either way.** The hub writes in the task's place
//!    only under the queue's lock, while the queue is empty and the task waits on it: its
//!    last poll found nothing and nothing has woken it since, so it holds no bytes it has yet
//!    to write. The first item queued wakes it, and every event after queues behind until it
//!    waits again. Guarded by `queue::tests::only_a_waiting_consumer_s_items_are_delivered_directly_in_its_place`
//!    and `hub::outlet::tests::once_live_a_waiting_connection_s_events_are_written_in_its_place_in_order`.
//! 2. **Heartbeats, gaps and notices always queue.** Only events are written directly; a
//!    [`Frame::Raw`] is pushed, which wakes the task, so an event that follows it waits behind
//!    it instead of overtaking it. Guarded by
//!    `hub::outlet::tests::once_live_a_waiting_connection_s_events_are_written_in_its_place_in_order`
//!    (an event after a heartbeat).
//! 3. **A write the socket took in part is finished first.** The writer keeps the framed rest
//!    and [`Frame::Unfinished`] is queued in the event's place, first in the empty queue; the
//!    task takes it alone, never coalesced ([`Outgoing::Unfinished`](super::Outgoing)), and
//!    writes the rest before anything else. Guarded by
//!    `hub::outlet::tests::a_direct_write_taken_in_part_is_finished_before_anything_else` and
//!    `connection::tests::a_direct_write_the_socket_cannot_take_whole_leaves_its_framed_rest`.
//! 4. **Only events new to the connection are written directly.** The task skips an event at
//!    or before the connection's position (its replay, and the overlap with the index when it
//!    subscribed); the hub does not look. So the subscription hands the writer over only once
//!    it took a live event past its position, after which every event is newer, and never for
//!    a connection of several endpoints, whose `id:` lines are its own. Guarded by
//!    `hub::outlet::tests::what_a_connection_had_already_is_never_written_in_its_place`.
//! 5. **Nothing after a hole or the end.** A closed queue (cut off, drained, expired) takes
//!    nothing more, directly or not, so its last notice is the stream's last word; and a
//!    connection that missed an event of a batch (its queue was full) is given nothing after
//!    it, then cut off, and resumes from before the hole. Guarded by
//!    `queue::tests::a_closed_queue_takes_nothing_more_not_even_directly` and
//!    `hub::feed::tests::a_full_queue_cuts_the_connection_off_after_what_was_queued`.

use std::sync::atomic::{AtomicU32, Ordering::Relaxed};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use tokio::time::Instant;

use crate::compression::{Encoder, Encoding, SharedEvent};
use crate::queue::{Bounds, Delivery, Measured, PushError, Queue};
use fjord_bus::StreamId;

/// A connection's outlet, shared by the hub's index (which pushes) and its subscription
/// (which takes).
pub(super) type ClientQueue = Arc<Outlet>;

/// A connection as the hub reaches it: its queue, and once the connection is live, a way to
/// write to its socket at once.
#[derive(Debug)]
pub(super) struct Outlet {
    pub(super) queue: Queue<Frame>,
    direct: OnceLock<Arc<dyn DirectWrite>>,
    /// The coding of a compressed stream, and what its trailer needs; boxed, as most
    /// streams have none.
    encoder: Option<Box<Encoder>>,
    /// The longest an event it took had waited, in milliseconds, since the hub last looked.
    worst_wait_ms: AtomicU32,
}

impl Outlet {
    /// An outlet whose queue holds at most what `bounds` allow, for a stream sent in
    /// `encoding`.
    pub(super) fn new(bounds: Bounds, encoding: Option<Encoding>) -> Self {
        Self {
            queue: Queue::new(bounds),
            direct: OnceLock::new(),
            encoder: encoding.map(|encoding| Box::new(Encoder::new(encoding))),
            worst_wait_ms: AtomicU32::new(0),
        }
    }

    /// Notes that the connection took an event that had waited `waited` in its queue.
    pub(super) fn note_wait(&self, waited: Duration) {
        let waited = u32::try_from(waited.as_millis()).unwrap_or(u32::MAX);
        self.worst_wait_ms.fetch_max(waited, Relaxed);
    }

    /// The longest an event it took had waited since the last call; zero when it took none
    /// (a client that stopped reading takes nothing: it is its queue's bounds that find it
    /// out, not the hub's look at the server's load).
    pub(super) fn take_worst_wait(&self) -> Duration {
        Duration::from_millis(u64::from(self.worst_wait_ms.swap(0, Relaxed)))
    }

    /// The stream's coding, when it is compressed.
    pub(super) fn encoder(&self) -> Option<&Encoder> {
        self.encoder.as_deref()
    }

    pub(super) fn push(&self, frame: Frame) -> Result<(), PushError> {
        self.queue.push(frame)
    }

    /// Lets later events be written with `direct`; set once, when the connection is live.
    pub(super) fn write_directly(&self, direct: Arc<dyn DirectWrite>) {
        let _ = self.direct.set(direct);
    }

    /// Queues an event, or writes it to the socket in the connection task's place when
    /// the task waits on an empty queue and the socket takes it without waiting: one
    /// system call instead of a queue, a wake-up and a poll. True when it wrote it (all of
    /// it, or the part the socket took).
    pub(super) fn push_event(
        &self,
        event: &Arc<QueuedEvent>,
        may_write: bool,
    ) -> Result<bool, PushError> {
        let frame = Frame::Event(Arc::clone(event));
        match self.direct.get() {
            Some(direct) if may_write => {
                let mut written = false;
                self.queue.push_or_deliver(frame, |_| {
                    let delivery = match direct.write_now(event.event.bytes_for(self.encoder())) {
                        WrittenNow::All => Delivery::Done,
                        WrittenNow::Partly => Delivery::Rest(Frame::Unfinished),
                        WrittenNow::Nothing => Delivery::Refused,
                    };
                    written = !matches!(delivery, Delivery::Refused);
                    // Counted here, under the queue's lock, so that the checksum sees the
                    // stream's pieces in the order they reach the socket.
                    if let Some(encoder) = self.encoder()
                        && written
                    {
                        encoder.count(event.event.text.bytes());
                    }
                    delivery
                })?;
                Ok(written)
            }
            _ => self.queue.push(frame).map(|()| false),
        }
    }
}

/// Writes an event to a connection's socket without waiting, in the connection task's
/// place. The writer frames the event as its connection wants, and keeps what the socket did
/// not take: the connection's task is then told to finish it before anything else
/// ([`Outgoing::Unfinished`](super::Outgoing::Unfinished)).
pub trait DirectWrite: Send + Sync + std::fmt::Debug {
    /// Writes `event` now, as much of it as the socket takes: SSE text, or its compressed
    /// form when the stream is compressed.
    fn write_now(&self, event: &[u8]) -> WrittenNow;
}

/// How much of an event [`DirectWrite::write_now`] wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WrittenNow {
    /// All of it.
    All,
    /// Part of it: the writer holds the rest until the connection's task finishes it.
    Partly,
    /// Nothing: the socket would have blocked, or failed.
    Nothing,
}

/// An event as queued to every receiving connection: one allocation per event, shared.
#[derive(Debug)]
pub(super) struct QueuedEvent {
    pub(super) endpoint: usize,
    pub(super) id: StreamId,
    pub(super) event: SharedEvent,
    /// When the hub queued it; a connection that takes it much later is cut off.
    pub(super) queued_at: Instant,
    /// The record's Kafka timestamp in milliseconds, which its delivery latency counts
    /// from; `None` for a record without one, and for what is no record.
    pub(super) kafka_ms: Option<i64>,
}

/// What goes into a connection's queue: one pointer and a tag, so that a queue of many
/// events stays small.
#[derive(Debug, Clone)]
pub(super) enum Frame {
    Event(Arc<QueuedEvent>),
    Raw(Arc<Bytes>),
    /// A direct write the socket took in part, whose writer holds the rest; always first in
    /// its queue.
    Unfinished,
}

/// An event's queue time bounds the queue; heartbeats and notices are not timed. Its bytes
/// count as SSE text, compressed or not: what the client has yet to read.
impl Measured for Frame {
    fn queued_at(&self) -> Option<Instant> {
        match self {
            Self::Event(event) => Some(event.queued_at),
            Self::Raw(_) | Self::Unfinished => None,
        }
    }

    /// About the bytes it writes (an event's `id:` line may grow by a few); the coalescing
    /// of frames into one write is bounded by it too.
    fn bytes(&self) -> usize {
        match self {
            Self::Event(event) => event.event.text.bytes().len(),
            Self::Raw(bytes) => bytes.len(),
            Self::Unfinished => 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::sync::atomic::Ordering::Relaxed;

    use futures_util::StreamExt;

    use super::super::testing::{entry, hub, live, next_text};
    use super::*;
    use crate::hub::{Hub, Outgoing, Subscription};
    use crate::sse::{self, ResumeId};

    /// Records what the hub writes in a connection task's place; the socket takes `taken`.
    #[derive(Debug)]
    struct Recorder {
        written: Mutex<Vec<String>>,
        taken: WrittenNow,
    }

    impl Recorder {
        fn new(taken: WrittenNow) -> Arc<Self> {
            Arc::new(Self {
                written: Mutex::default(),
                taken,
            })
        }

        fn written(&self) -> Vec<String> {
            self.written.lock().expect("not poisoned").clone()
        }
    }

    impl DirectWrite for Recorder {
        fn write_now(&self, event: &[u8]) -> WrittenNow {
            let mut written = self.written.lock().expect("not poisoned");
            written.push(String::from_utf8_lossy(event).into_owned());
            self.taken
        }
    }

    /// A connection of `orders` made live with a direct writer whose socket takes `taken`,
    /// now waiting on its empty queue.
    async fn live_and_waiting(taken: WrittenNow) -> (Arc<Hub>, Arc<Recorder>, Subscription) {
        let hub = hub(8);
        let recorder = Recorder::new(taken);
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
        (hub, recorder, client)
    }

    #[tokio::test]
    async fn once_live_a_waiting_connection_s_events_are_written_in_its_place_in_order() {
        let (hub, recorder, mut client) = live_and_waiting(WrittenNow::All).await;
        hub.dispatch(&[(1, entry(11, "a"))]);
        // A heartbeat wakes the task: what follows queues behind it, in order.
        hub.broadcast(&sse::HEARTBEAT);
        hub.dispatch(&[(1, entry(12, "a"))]);
        let written = recorder.written();
        assert_eq!(written.len(), 1);
        assert!(written[0].starts_with("id: 11-0"), "{written:?}");
        let queued = next_text(&mut client).await;
        assert!(queued.starts_with(": heartbeat\n\n"), "{queued}");
        assert!(queued.contains("id: 12-0"), "{queued}");
        assert_eq!(hub.metrics().events_out.load(Relaxed), 3);
    }

    #[tokio::test]
    async fn what_a_connection_had_already_is_never_written_in_its_place() {
        let hub = hub(8);
        let recorder = Recorder::new(WrittenNow::All);
        // Resumed from ahead of this instance: the next records are not new to it.
        let ahead = ResumeId(vec![StreamId { ms: 20, seq: 0 }]);
        let mut client = hub.subscribe(live(vec![1]), Some(&ahead), None);
        client.write_directly(Arc::clone(&recorder) as Arc<dyn DirectWrite>);
        next_text(&mut client).await;
        for ms in [10, 20] {
            hub.dispatch(&[(1, entry(ms, "a"))]);
            assert!(
                futures_util::FutureExt::now_or_never(client.next()).is_none(),
                "{ms} is skipped, and the task waits on its queue"
            );
        }
        assert_eq!(recorder.written(), Vec::<String>::new());
        // The first new event goes through the queue; the ones after it are written directly.
        hub.dispatch(&[(1, entry(21, "a"))]);
        assert!(next_text(&mut client).await.starts_with("id: 21-0"));
        assert!(futures_util::FutureExt::now_or_never(client.next()).is_none());
        hub.dispatch(&[(1, entry(22, "a"))]);
        let written = recorder.written();
        assert!(
            written.len() == 1 && written[0].starts_with("id: 22-0"),
            "{written:?}"
        );
    }

    #[tokio::test]
    async fn a_direct_write_taken_in_part_is_finished_before_anything_else() {
        let (hub, recorder, mut client) = live_and_waiting(WrittenNow::Partly).await;
        hub.dispatch(&[(1, entry(11, "a"))]);
        hub.dispatch(&[(1, entry(12, "a"))]);
        assert_eq!(recorder.written().len(), 1, "the task no longer waits");
        assert_eq!(client.next().await, Some(Outgoing::Unfinished));
        assert!(next_text(&mut client).await.starts_with("id: 12-0"));
    }
}

#[cfg(test)]
mod compressed {
    use std::sync::Mutex;

    use futures_util::{FutureExt, StreamExt};

    use super::super::testing::{entry, hub, live};
    use super::*;
    use crate::compression::Encoding;
    use crate::compression::tests::decode;
    use crate::hub::{Interest, Outgoing, Subscription};
    use crate::sse;

    /// A socket that takes every byte the hub writes in the task's place onto `wire`.
    #[derive(Debug)]
    struct Wire(Arc<Mutex<Vec<u8>>>);

    impl DirectWrite for Wire {
        fn write_now(&self, event: &[u8]) -> WrittenNow {
            self.0
                .lock()
                .expect("not poisoned")
                .extend_from_slice(event);
            WrittenNow::All
        }
    }

    /// Moves what `client` has ready onto `wire`, in the order a socket would get it.
    fn take_ready(client: &mut Subscription, wire: &Mutex<Vec<u8>>) {
        while let Some(Some(next)) = client.next().now_or_never() {
            match next {
                Outgoing::Events(bytes) => wire.lock().expect("not poisoned").extend(&bytes),
                Outgoing::Unfinished => panic!("the wire takes every write whole"),
            }
        }
    }

    #[tokio::test]
    async fn a_compressed_stream_decodes_to_what_a_plain_one_gets() {
        for encoding in [Encoding::Gzip, Encoding::Deflate] {
            for endpoints in [vec![1], vec![0, 1]] {
                let hub = hub(64);
                let compressed_interest = Interest {
                    encoding: Some(encoding),
                    ..live(endpoints.clone())
                };
                let mut plain = hub.subscribe(live(endpoints.clone()), None, None);
                let mut compressed = hub.subscribe(compressed_interest, None, None);
                assert_eq!(compressed.encoding(), Some(encoding));
                let (plain_wire, wire) = (Mutex::default(), Arc::new(Mutex::default()));
                compressed.write_directly(Arc::new(Wire(Arc::clone(&wire))));
                let mut step = || {
                    take_ready(&mut plain, &plain_wire);
                    take_ready(&mut compressed, &wire);
                };
                step();
                // The first live event through the queue, the next written in the task's
                // place (one endpoint), a heartbeat, then a batch coalesced in one write.
                hub.dispatch(&[(1, entry(10, "a"))]);
                step();
                let written_before = wire.lock().expect("not poisoned").len();
                hub.dispatch(&[(1, entry(11, "b"))]);
                let written_directly = wire.lock().expect("not poisoned").len() > written_before;
                assert_eq!(written_directly, endpoints.len() == 1, "{endpoints:?}");
                step();
                hub.broadcast(&sse::HEARTBEAT);
                hub.dispatch(&[
                    (1, entry(12, "c")),
                    (0, entry(13, "d")),
                    (1, entry(14, "e")),
                ]);
                step();
                hub.drain();
                step();
                let finish = compressed.finish().expect("compressed");
                wire.lock().expect("not poisoned").extend(finish);
                let plain = String::from_utf8(plain_wire.into_inner().expect("not poisoned"))
                    .expect("utf-8");
                assert!(plain.contains("\"key\":\"e\""), "{plain}");
                let sent = wire.lock().expect("not poisoned").clone();
                assert_eq!(decode(encoding, &sent), plain, "{encoding:?} {endpoints:?}");
            }
        }
    }
}
