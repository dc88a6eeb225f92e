//! A connection's bounded queue, from the hub to the connection's task: bounded in items
//! (each takes a slot), in the bytes they hold together, and once its consumer has drained
//! it, in time, so that a burst a consumer keeps up with fits while one that stopped reading
//! is found out as soon as its oldest item is stale, and no record size makes a slow
//! consumer hold more than its bound of bytes.
//! (Until it first finds it empty, the consumer may be busy elsewhere on purpose: a
//! connection replays what it missed before it reads its live events.) Queuing an event
//! takes one uncontended lock; so does taking one. An idle queue costs about a hundred
//! bytes — a tokio channel keeps a block of 32 slots and a semaphore for every connection —
//! and a queue that grew in a burst gives its memory back once drained. How an item delivered
//! in the consumer's place keeps its order with those the consumer takes is stated, with the
//! tests that guard it, in the hub's outlet (`hub::outlet`), the queue's one user.

use std::collections::VecDeque;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use tokio::time::Instant;

/// Above this many slots, a drained queue shrinks.
const KEEP_SLOTS: usize = 16;

/// What a direct delivery did with an item.
#[derive(Debug)]
pub(crate) enum Delivery<T> {
    /// Delivered whole: nothing to queue.
    Done,
    /// Delivered in part: this is queued instead.
    Rest(T),
    /// Not delivered: the item is queued.
    Refused,
}

/// What a queue's bounds read of an item.
pub(crate) trait Measured {
    /// When it was queued; `None` for an item that no bound in time applies to.
    fn queued_at(&self) -> Option<Instant>;
    /// The bytes it holds, for the bound in bytes.
    fn bytes(&self) -> usize;
}

/// The most a queue holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Bounds {
    /// Items, whatever their size.
    pub(crate) items: usize,
    /// Bytes of the items together; an empty queue still takes one item larger than this,
    /// or a record above it could never be delivered.
    pub(crate) bytes: usize,
    /// Once the consumer found the queue empty, the most its oldest item may have waited
    /// when another is queued; zero for no bound in time.
    pub(crate) wait: Duration,
}

/// Why an item was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PushError {
    /// The queue holds its bound of items or bytes, or its oldest item waited longer than
    /// its bound in time when this one came.
    Full,
    /// The queue was closed.
    Closed,
}

/// A bounded queue with one consumer task.
#[derive(Debug)]
pub(crate) struct Queue<T> {
    state: Mutex<State<T>>,
    capacity: usize,
    max_bytes: usize,
}

#[derive(Debug)]
struct State<T> {
    items: VecDeque<T>,
    /// What the items hold together.
    bytes: usize,
    /// The consumer, when it waits for an item.
    waker: Option<Waker>,
    closed: bool,
    /// The most milliseconds its oldest item may have waited when another is queued, once
    /// the consumer found the queue empty (`live`); 0 for no bound.
    max_wait_ms: u32,
    live: bool,
}

impl<T: Measured> Queue<T> {
    /// An empty queue that holds at most what `bounds` allow.
    pub(crate) fn new(bounds: Bounds) -> Self {
        Self {
            state: Mutex::new(State {
                items: VecDeque::new(),
                bytes: 0,
                waker: None,
                closed: false,
                max_wait_ms: u32::try_from(bounds.wait.as_millis()).unwrap_or(u32::MAX),
                live: false,
            }),
            capacity: bounds.items,
            max_bytes: bounds.bytes,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State<T>> {
        // Every critical section leaves the state consistent, so a poisoned lock is usable.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues `item` and wakes the consumer.
    pub(crate) fn push(&self, item: T) -> Result<(), PushError> {
        self.push_or_deliver(item, |_| Delivery::Refused)
    }

    /// Hands `item` to `deliver` when the consumer waits on an empty queue — it would take
    /// the item next and do nothing else meanwhile, so delivering in its place keeps the
    /// order — and queues it (or what `deliver` left of it) otherwise. `deliver` runs under
    /// the queue's lock: nothing is queued or taken while it runs.
    pub(crate) fn push_or_deliver(
        &self,
        item: T,
        deliver: impl FnOnce(&T) -> Delivery<T>,
    ) -> Result<(), PushError> {
        let waker = {
            let mut state = self.lock();
            if state.closed {
                return Err(PushError::Closed);
            }
            let waiting = state.items.is_empty() && state.waker.is_some();
            let item = if waiting {
                match deliver(&item) {
                    Delivery::Done => return Ok(()),
                    Delivery::Rest(rest) => rest,
                    Delivery::Refused => item,
                }
            } else if state.items.len() >= self.capacity
                || self.over_bytes(&state, &item)
                || waited_too_long(&state, &item)
            {
                return Err(PushError::Full);
            } else {
                item
            };
            state.bytes = state.bytes.saturating_add(item.bytes());
            state.items.push_back(item);
            state.waker.take()
        };
        if let Some(waker) = waker {
            waker.wake();
        }
        Ok(())
    }

    /// Whether `item` would take the queue past its bound in bytes; an empty queue takes any.
    fn over_bytes(&self, state: &State<T>, item: &T) -> bool {
        !state.items.is_empty() && state.bytes.saturating_add(item.bytes()) > self.max_bytes
    }

    /// Refuses further items; the consumer still gets those queued, then the end.
    pub(crate) fn close(&self) {
        let waker = {
            let mut state = self.lock();
            state.closed = true;
            state.waker.take()
        };
        if let Some(waker) = waker {
            waker.wake();
        }
    }

    /// Whether the queue was closed.
    pub(crate) fn is_closed(&self) -> bool {
        self.lock().closed
    }

    /// Closes the queue and drops what it holds.
    pub(crate) fn close_and_clear(&self) {
        let dropped = {
            let mut state = self.lock();
            state.closed = true;
            state.bytes = 0;
            std::mem::take(&mut state.items)
        };
        drop(dropped);
    }

    /// The next item; `None` once the queue is closed and empty.
    pub(crate) fn poll_next(&self, cx: &mut Context<'_>) -> Poll<Option<T>> {
        let mut state = self.lock();
        if let Some(item) = Self::pop(&mut state) {
            return Poll::Ready(Some(item));
        }
        if state.closed {
            return Poll::Ready(None);
        }
        state.live = true;
        match &state.waker {
            Some(waker) if waker.will_wake(cx.waker()) => {}
            _ => state.waker = Some(cx.waker().clone()),
        }
        Poll::Pending
    }

    /// The next item, if one is queued and `wanted` accepts it.
    pub(crate) fn try_next_if(&self, wanted: impl FnOnce(&T) -> bool) -> Option<T> {
        let mut state = self.lock();
        if !state.items.front().is_some_and(wanted) {
            return None;
        }
        Self::pop(&mut state)
    }

    fn pop(state: &mut State<T>) -> Option<T> {
        let item = state.items.pop_front()?;
        state.bytes = state.bytes.saturating_sub(item.bytes());
        if state.items.is_empty() && state.items.capacity() > KEEP_SLOTS {
            state.items = VecDeque::new();
        }
        Some(item)
    }
}

/// Whether the oldest timed item of the queue (among its first few: a heartbeat may come
/// first) waited longer than the queue's bound when `item` came.
fn waited_too_long<T: Measured>(state: &State<T>, item: &T) -> bool {
    if !state.live || state.max_wait_ms == 0 {
        return false;
    }
    let (Some(now), Some(oldest)) = (
        item.queued_at(),
        state.items.iter().take(4).find_map(Measured::queued_at),
    ) else {
        return false;
    };
    now.saturating_duration_since(oldest) > Duration::from_millis(u64::from(state.max_wait_ms))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    /// An untimed item of as many bytes as its value.
    impl Measured for i32 {
        fn queued_at(&self) -> Option<Instant> {
            None
        }
        fn bytes(&self) -> usize {
            usize::try_from(self.unsigned_abs()).unwrap_or(usize::MAX)
        }
    }

    /// Bounds of `items` and `wait`, and none in bytes.
    fn bounds(items: usize, wait: Duration) -> Bounds {
        Bounds {
            items,
            bytes: usize::MAX,
            wait,
        }
    }

    /// An item queued at a time, or with none, as a heartbeat.
    #[derive(Debug, PartialEq, Eq)]
    struct Stamped(Option<Instant>);

    impl Measured for Stamped {
        fn queued_at(&self) -> Option<Instant> {
            self.0
        }
        fn bytes(&self) -> usize {
            0
        }
    }

    #[test]
    fn once_bounded_in_time_a_queue_refuses_an_item_that_comes_long_after_its_oldest() {
        let queue = Queue::new(bounds(100, Duration::from_secs(5)));
        let start = Instant::now();
        let at = |ms| Stamped(Some(start + Duration::from_millis(ms)));
        let mut cx = Context::from_waker(Waker::noop());
        assert_eq!(queue.push(at(0)), Ok(()));
        assert_eq!(
            queue.push(at(6_000)),
            Ok(()),
            "not bounded before its consumer found it empty: it may be replaying"
        );
        assert_eq!(queue.poll_next(&mut cx), Poll::Ready(Some(at(0))));
        assert_eq!(queue.poll_next(&mut cx), Poll::Ready(Some(at(6_000))));
        assert_eq!(queue.poll_next(&mut cx), Poll::Pending);
        assert_eq!(queue.push(at(0)), Ok(()));
        assert_eq!(queue.push(at(5_000)), Ok(()));
        assert_eq!(queue.push(at(5_001)), Err(PushError::Full));
        assert_eq!(
            queue.push(Stamped(None)),
            Ok(()),
            "a heartbeat is not timed"
        );
        // With the oldest taken, the next oldest counts.
        assert_eq!(queue.try_next_if(|_| true), Some(at(0)));
        assert_eq!(queue.push(at(9_000)), Ok(()));
        assert_eq!(queue.push(at(11_001)), Err(PushError::Full));
    }

    #[test]
    fn a_queue_refuses_an_item_past_its_bytes_but_an_empty_one_takes_any() {
        let queue = Queue::new(Bounds {
            items: 100,
            bytes: 100,
            wait: Duration::ZERO,
        });
        assert_eq!(queue.push(60), Ok(()));
        assert_eq!(queue.push(50), Err(PushError::Full));
        assert_eq!(queue.push(40), Ok(()), "exactly at its bound");
        assert_eq!(queue.push(1), Err(PushError::Full));
        // What the consumer takes is room again.
        assert_eq!(queue.try_next_if(|_| true), Some(60));
        assert_eq!(queue.push(50), Ok(()));
        while queue.try_next_if(|_| true).is_some() {}
        assert_eq!(
            queue.push(500),
            Ok(()),
            "a record larger than the bound still reaches a client that keeps up"
        );
        assert_eq!(queue.push(1), Err(PushError::Full));
        queue.close_and_clear();
        assert_eq!(queue.lock().bytes, 0);
    }

    #[tokio::test]
    async fn items_arrive_in_order_until_closed_then_the_end() {
        let queue = Arc::new(Queue::new(bounds(2, Duration::ZERO)));
        assert_eq!(queue.push(1), Ok(()));
        assert_eq!(queue.push(2), Ok(()));
        assert_eq!(queue.push(3), Err(PushError::Full));
        let consumer = {
            let queue = Arc::clone(&queue);
            tokio::spawn(async move {
                let mut seen = Vec::new();
                while let Some(item) = std::future::poll_fn(|cx| queue.poll_next(cx)).await {
                    seen.push(item);
                }
                seen
            })
        };
        // The consumer drains and waits; a later push wakes it.
        tokio::task::yield_now().await;
        assert_eq!(queue.push(4), Ok(()));
        queue.close();
        assert_eq!(queue.push(5), Err(PushError::Closed));
        assert_eq!(consumer.await.expect("consumer"), vec![1, 2, 4]);
    }

    #[test]
    fn only_a_waiting_consumer_s_items_are_delivered_directly_in_its_place() {
        let queue = Queue::new(bounds(4, Duration::ZERO));
        let mut cx = Context::from_waker(Waker::noop());
        // Nobody waits yet: queued.
        assert_eq!(queue.push_or_deliver(1, |_| Delivery::Done), Ok(()));
        assert_eq!(queue.poll_next(&mut cx), Poll::Ready(Some(1)));
        // The consumer waits on an empty queue: delivered, or what is left of it queued.
        assert_eq!(queue.poll_next(&mut cx), Poll::Pending);
        assert_eq!(queue.push_or_deliver(2, |_| Delivery::Done), Ok(()));
        assert_eq!(queue.push_or_deliver(3, |_| Delivery::Rest(30)), Ok(()));
        // Woken by that, the consumer no longer waits: the next one queues behind.
        assert_eq!(queue.push_or_deliver(4, |_| Delivery::Done), Ok(()));
        assert_eq!(queue.try_next_if(|&item| item != 30), None);
        assert_eq!(queue.try_next_if(|_| true), Some(30));
        assert_eq!(queue.try_next_if(|_| true), Some(4));
    }

    #[test]
    fn a_closed_queue_takes_nothing_more_not_even_directly() {
        let queue = Queue::new(bounds(4, Duration::ZERO));
        let mut cx = Context::from_waker(Waker::noop());
        assert_eq!(queue.poll_next(&mut cx), Poll::Pending);
        // Closed while its consumer waits on it, as a shed connection's queue is.
        queue.close_and_clear();
        let delivered = std::cell::Cell::new(false);
        let pushed = queue.push_or_deliver(1, |_| {
            delivered.set(true);
            Delivery::Done
        });
        assert_eq!(pushed, Err(PushError::Closed));
        assert!(!delivered.get(), "nothing is delivered after the end");
        assert_eq!(queue.poll_next(&mut cx), Poll::Ready(None));
    }

    #[test]
    fn a_cleared_queue_ends_at_once_and_a_drained_burst_is_given_back() {
        let queue = Queue::new(bounds(1000, Duration::ZERO));
        for item in 0..100 {
            assert_eq!(queue.push(item), Ok(()));
        }
        while queue.try_next_if(|_| true).is_some() {}
        assert_eq!(queue.lock().items.capacity(), 0);
        assert_eq!(queue.push(1), Ok(()));
        queue.close_and_clear();
        assert_eq!(queue.try_next_if(|_| true), None);
        let mut cx = Context::from_waker(Waker::noop());
        assert_eq!(queue.poll_next(&mut cx), Poll::Ready(None));
    }
}
