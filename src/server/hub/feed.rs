//! The hub's feed: the bus reader's entries, read forever with backoff, each rendered once
//! and queued as one shared event to its receivers, found by endpoint and key in the index.
//! A marker of records the consumer could not read goes to every connection of its endpoint,
//! whatever its keys, as `fjord.gap`; so does an entry the bus found invalid, to the
//! connections that would have had its record (all of them when its key is unknown), and so
//! do entries that retention trimmed before this server read them (a table's connections are
//! cut off instead, and get a fresh snapshot when they resume). A connection whose queue is
//! full is cut off after the batch and resumes by id.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use tokio::time::Instant;

use super::Hub;
use super::outlet::{ClientQueue, Frame, QueuedEvent};
use crate::compression::SharedEvent;
use crate::keys::ClientId;
use crate::queue::PushError;
use crate::sse::{self, RenderedEvent};
use crate::views::Verdicts;
use fjord_bus::backoff::Backoff;
use fjord_bus::clock::now_ms;
use fjord_bus::process::LogThrottle;
use fjord_bus::{BusEntry, BusReader, EntryKind, Receivers, SkipReason};

/// Most receivers of an event that the hub writes to itself, about 10 ms of system calls.
const MAX_DIRECT_WRITES: usize = 1_000;
/// Longest pause between failed bus reads.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

impl Hub {
    /// Feeds the hub from the bus forever, retrying failed reads with backoff; the reader
    /// keeps its position, so nothing is skipped.
    pub async fn run_feed(self: Arc<Self>, mut reader: BusReader) {
        let mut backoff = Backoff::new(Duration::from_millis(100), MAX_BACKOFF);
        loop {
            match reader.next_batch().await {
                Ok(batch) => {
                    self.last_read_ms.store(now_ms(), Relaxed);
                    backoff.reset();
                    self.dispatch(&batch);
                }
                Err(error) => {
                    self.metrics.bus_errors.fetch_add(1, Relaxed);
                    let retry_in = backoff.next_delay();
                    tracing::warn!(%error, ?retry_in, "bus read failed");
                    tokio::time::sleep(retry_in).await;
                }
            }
        }
    }

    /// Queues each entry to its receivers; cuts off connections whose queue is full.
    pub fn dispatch(&self, batch: &[(usize, BusEntry)]) {
        // Once a connection missed an event it must get nothing after it: its queue may
        // drain while the batch goes on, and a later event would move its last id past
        // the one it missed. It is cut off after the batch and resumes from before the hole.
        let mut too_slow = HashSet::new();
        // Writing in the connection tasks' place saves a wake-up and a poll per delivery,
        // but puts a system call per receiver on this one task: worth it while the feed
        // keeps up (one entry per read) and an event has few enough receivers to be written
        // in a few milliseconds; otherwise the tasks write in parallel and coalesce.
        let may_write_now = batch.len() == 1;
        let latency = self.metrics.latency.get();
        for (endpoint, entry) in batch {
            let Some(rendered) = self.render(*endpoint, entry) else {
                continue;
            };
            if let EntryKind::Skipped(skipped) = &entry.kind
                && skipped.reason == SkipReason::UndecodableRecord
            {
                let count = skipped.last_offset - skipped.first_offset + 1;
                self.metrics
                    .undecodable_records
                    .fetch_add(u64::try_from(count).unwrap_or(0), Relaxed);
            }
            if let EntryKind::Invalid(invalid) = &entry.kind {
                self.metrics.bus_invalid_entries.fetch_add(1, Relaxed);
                static INVALID: LogThrottle = LogThrottle::new(Duration::from_secs(10));
                if let Some(held_back) = INVALID.admit() {
                    tracing::warn!(endpoint = self.endpoints[*endpoint].as_str(), id = %entry.id, problem = %invalid.problem, held_back, "a bus entry not written by fjord-consumer; clients get fjord.gap in its place");
                }
            }
            // One reading of each clock per entry, whatever the number of receivers.
            let (now, now_wall_ms) = (Instant::now(), now_ms());
            let event = Arc::new(QueuedEvent {
                endpoint: *endpoint,
                id: entry.id,
                event: SharedEvent::new(rendered),
                queued_at: now,
                kafka_ms: match &entry.kind {
                    EntryKind::Record { envelope, .. } => envelope.timestamp_ms(),
                    EntryKind::Skipped(_) | EntryKind::Invalid(_) => None,
                },
            });
            let Some(channel) = self.index.receivers(*endpoint) else {
                continue;
            };
            let last = channel.last_id();
            if entry.previous > last && self.is_table(*endpoint) {
                // Retention trimmed entries before this server read them: its live
                // connections to a table missed changes of its rows, and are cut off, to
                // resume from their last id, which gets them a fresh snapshot.
                too_slow.extend(channel.all().map(|(client, _)| client));
            } else if entry.previous > last {
                // The same for a stream: its live connections are told so, as a resuming
                // client would be.
                let gap = Arc::new(sse::gap(self.endpoints[*endpoint].as_str(), last, entry.id));
                for (client, sender) in channel.all() {
                    if let Err(PushError::Full) = sender.push(Frame::Raw(Arc::clone(&gap))) {
                        too_slow.insert(client);
                    }
                }
            }
            let mut queued = 0;
            let mut deliver = |client: ClientId,
                               sender: &ClientQueue,
                               event: &Arc<QueuedEvent>,
                               write_now: bool| {
                if !too_slow.is_empty() && too_slow.contains(&client) {
                    return;
                }
                match sender.push_event(event, write_now) {
                    Ok(written) => {
                        queued += 1;
                        if written && let Some(latency) = latency {
                            latency.record(
                                event.endpoint,
                                now_wall_ms,
                                event.id.ms,
                                event.kafka_ms,
                            );
                        }
                    }
                    Err(PushError::Full) => {
                        too_slow.insert(client);
                    }
                    Err(PushError::Closed) => {}
                }
            };
            match entry.receivers() {
                Receivers::Key(key) => {
                    let write_now = may_write_now && channel.count(key) <= MAX_DIRECT_WRITES;
                    let wrap = |rendered| {
                        Arc::new(QueuedEvent {
                            event: SharedEvent::new(rendered),
                            ..*event
                        })
                    };
                    let name = self.endpoints[*endpoint].as_str();
                    let mut verdicts = Verdicts::new(entry, name, &wrap);
                    for (client, sender) in channel.everyone() {
                        deliver(client, sender, &event, write_now);
                    }
                    for viewers in channel.viewing() {
                        if let Some(seen) = verdicts.of(&viewers.view, &event) {
                            for (&client, sender) in &viewers.members {
                                deliver(client, sender, &seen, write_now);
                            }
                        }
                    }
                    for (client, member) in key.into_iter().flat_map(|key| channel.keyed(key)) {
                        let seen = match &member.view {
                            None => Some(Arc::clone(&event)),
                            Some(view) => verdicts.of(view, &event),
                        };
                        if let Some(seen) = seen {
                            deliver(client, &member.queue, &seen, write_now);
                        }
                    }
                    if verdicts.evaluations() > 0 {
                        self.metrics
                            .filter_evaluations
                            .fetch_add(verdicts.evaluations(), Relaxed);
                    }
                }
                Receivers::All => {
                    for (client, sender) in channel.all() {
                        deliver(client, sender, &event, false);
                    }
                }
            }
            channel.set_last_id(entry.id);
            drop(channel);
            self.metrics.events_out.fetch_add(queued, Relaxed);
        }
        self.metrics
            .records_in
            .fetch_add(batch.len() as u64, Relaxed);
        if let Some((_, newest)) = batch.last() {
            self.metrics
                .bus_lag_ms
                .store(now_ms().saturating_sub(newest.id.ms), Relaxed);
        }
        self.cut_off(too_slow);
    }

    /// The event of a bus entry of `endpoint`; `None` for an endpoint the hub does not have.
    pub(super) fn render(&self, endpoint: usize, entry: &BusEntry) -> Option<RenderedEvent> {
        let name = self.endpoints.get(endpoint)?.as_str();
        Some(match &entry.kind {
            EntryKind::Record { envelope, .. } => {
                RenderedEvent::new(entry.id, name, envelope.as_bytes())
            }
            EntryKind::Skipped(skipped) => sse::unreadable_gap(entry.id, name, skipped),
            EntryKind::Invalid(invalid) => sse::invalid_gap(entry.id, name, invalid.problem),
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering::Relaxed;

    use futures_util::StreamExt;

    use super::super::testing::{
        entry, hub, hub_on_memory_bus, keyed, live, name, next_text, offsets, publish, read_text,
    };
    use crate::sse::ResumeId;
    use fjord_bus::{Bus, SkipReason, SkippedRecords};
    use fjord_config::{Retention, StartPosition};

    #[tokio::test]
    async fn events_reach_matching_connections_once() {
        let hub = hub(16);
        let mut all = hub.subscribe(live(vec![1]), None, None);
        let mut keyed = hub.subscribe(keyed(vec![1], ["a", "c"]), None, None);
        assert_eq!(next_text(&mut all).await, "retry: 2000\nid: 0-0\n\n");
        assert_eq!(next_text(&mut keyed).await, "retry: 2000\nid: 0-0\n\n");
        hub.dispatch(&[(1, entry(10, "a"))]);
        hub.dispatch(&[(1, entry(11, "b"))]);
        assert_eq!(
            next_text(&mut all).await,
            "id: 10-0\nevent: orders\ndata: {\"key\":\"a\"}\n\nid: 11-0\nevent: orders\ndata: {\"key\":\"b\"}\n\n"
        );
        assert_eq!(
            next_text(&mut keyed).await,
            "id: 10-0\nevent: orders\ndata: {\"key\":\"a\"}\n\n"
        );
        assert_eq!(hub.metrics().events_out.load(Relaxed), 3);
        drop(all);
        drop(keyed);
        assert!(hub.index.is_empty());
    }

    #[tokio::test]
    async fn a_full_queue_cuts_the_connection_off_after_what_was_queued() {
        let hub = hub(2);
        let mut slow = hub.subscribe(live(vec![1]), None, None);
        let mut fast = hub.subscribe(live(vec![1]), None, None);
        next_text(&mut slow).await;
        for ms in 10..13 {
            hub.dispatch(&[(1, entry(ms, "a"))]);
            next_text(&mut fast).await;
        }
        assert_eq!(hub.metrics().clients_dropped.load(Relaxed), 1);
        let queued = next_text(&mut slow).await;
        assert!(
            queued.starts_with("id: 10-0") && queued.contains("id: 11-0"),
            "{queued}"
        );
        assert!(slow.next().await.is_none(), "the stream ends");
        hub.dispatch(&[(1, entry(13, "a"))]);
        assert!(next_text(&mut fast).await.starts_with("id: 13-0"));
    }

    #[tokio::test]
    async fn live_connections_are_told_when_retention_trimmed_what_the_server_had_not_read() {
        let (bus, mut reader, hub) = hub_on_memory_bus(StartPosition::Live).await;
        let mut client = hub.subscribe(live(vec![1]), None, None);
        next_text(&mut client).await;
        let small = Retention {
            max_records: 5,
            max_age_secs: 3600,
        };
        // Twelve records arrive before the server reads; only the last five are kept.
        let kept = publish(&hub, &bus, &mut reader, 0, 12, small).await;
        let text = next_text(&mut client).await;
        assert!(text.starts_with("event: fjord.gap\ndata: "), "{text}");
        assert!(
            text.contains(&format!("\"oldest_id\":\"{}\"", kept[0])),
            "{text}"
        );
        let mut offsets_seen = offsets(&text);
        while offsets_seen.len() < 5 {
            offsets_seen.extend(offsets(&next_text(&mut client).await));
        }
        assert_eq!(offsets_seen, (7..12).collect::<Vec<_>>());
        // Reading on without trimming tells nothing more.
        publish(&hub, &bus, &mut reader, 12, 1, small).await;
        assert!(next_text(&mut client).await.starts_with("id: "));
    }

    /// The `fjord.gap` events for skipped records in `text`, as JSON.
    fn unreadable_gaps(text: &str) -> Vec<serde_json::Value> {
        text.split("\n\n")
            .filter(|event| event.contains("event: fjord.gap\n"))
            .filter_map(|event| event.lines().find_map(|line| line.strip_prefix("data: ")))
            .filter_map(|data| serde_json::from_str::<serde_json::Value>(data).ok())
            .filter(|data| data["reason"] == "unreadable_record")
            .collect()
    }

    #[tokio::test]
    async fn skipped_records_reach_every_connection_once_live_and_on_resume() {
        let (bus, mut reader, hub) = hub_on_memory_bus(StartPosition::Live).await;
        let mut all = hub.subscribe(live(vec![1]), None, None);
        let mut keyed = hub.subscribe(keyed(vec![1], ["k1", "k6"]), None, None);
        next_text(&mut all).await;
        next_text(&mut keyed).await;
        let ids = publish(&hub, &bus, &mut reader, 0, 3, Retention::default()).await;
        let skipped = SkippedRecords {
            topic: "orders".into(),
            partition: 0,
            first_offset: 3,
            last_offset: 5,
            error: "Local: Invalid compressed data".into(),
            reason: SkipReason::UnreadableRecord,
        };
        Bus::Memory(bus.clone())
            .publish_skipped(&skipped, &[(name("orders"), Retention::default().into())])
            .await
            .expect("memory bus");
        hub.dispatch(&reader.next_batch().await.expect("memory bus"));
        publish(&hub, &bus, &mut reader, 6, 2, Retention::default()).await;

        let text = read_text(&mut all, 5).await;
        assert_eq!(offsets(&text), vec![0, 1, 2, 6, 7]);
        let gaps = unreadable_gaps(&text);
        assert_eq!(gaps.len(), 1, "{text}");
        assert_eq!(gaps[0]["endpoint"], "orders");
        assert_eq!(gaps[0]["first_offset"], 3);
        assert_eq!(gaps[0]["last_offset"], 5);
        assert!(
            text.find("event: fjord.gap").expect("gap") > text.find("\"offset\":2").expect("2")
                && text.find("event: fjord.gap").expect("gap")
                    < text.find("\"offset\":6").expect("6"),
            "in stream order: {text}"
        );
        let text = read_text(&mut keyed, 2).await;
        assert_eq!(offsets(&text), vec![1, 6]);
        assert_eq!(
            unreadable_gaps(&text).len(),
            1,
            "once, whatever the keys: {text}"
        );

        // A client resuming from before the skipped records is told too.
        let mut resumed = hub.subscribe(live(vec![1]), Some(&ResumeId(vec![ids[2]])), None);
        next_text(&mut resumed).await;
        let text = read_text(&mut resumed, 2).await;
        assert_eq!(offsets(&text), vec![6, 7]);
        assert_eq!(unreadable_gaps(&text), gaps);
    }
}
