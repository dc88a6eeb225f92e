//! One suite of bus semantics, run against both buses: the in-process bus of `fjord dev` and
//! the Redis bus of production (real Redis). `fjord dev` keeps the promise production keeps
//! only if both pass the same cases: ids, ranges, retention and the gaps it makes, markers
//! of skipped records, and the hub's live start — a connection that subscribes, or resumes,
//! while records are being published misses none and gets none twice.
//!
//! Each case is written once, over [`Bus`], and run once per bus (`memory::…`, `redis::…`).
//! Entries someone else wrote can only reach the Redis bus; their case runs there alone.
#![allow(clippy::panic, reason = "a test fails loudly")]

use std::sync::Arc;
use std::time::Duration;

use crate::common::*;
use fjord_bus::envelope::{Envelope, RecordParts};
use fjord_bus::memory::MemoryBus;
use fjord_bus::{
    Bus, BusEntry, EntryKind, InvalidEntry, Problem, Publication, Published, Receivers, SkipReason,
    SkippedRecords, StreamId, connect_redis,
};
use fjord_config::{EndpointName, RedisConfig, Retention, ServerConfig, StartPosition};
use fjord_server::hub::{Hub, Interest, Outgoing, Subscription};
use fjord_server::sse::ResumeId;
use futures_util::StreamExt;

/// Which bus a case runs on.
#[derive(Debug, Clone, Copy)]
enum Kind {
    Memory,
    Redis,
}

/// A fresh bus of `kind`: an empty one, or Redis under a key prefix of its own.
async fn fresh(kind: Kind) -> (Bus, String) {
    match kind {
        Kind::Memory => (Bus::Memory(MemoryBus::new()), String::new()),
        Kind::Redis => {
            let prefix = unique("semantics");
            let config: RedisConfig = serde_json::from_value(redis_section(&services(), &prefix))
                .expect("a redis section");
            (connect_redis(&config).await.expect("redis"), prefix)
        }
    }
}

fn name(name: &str) -> EndpointName {
    EndpointName::try_from(name.to_owned()).expect("a name")
}

/// Publishes record (`partition`, `offset`) of topic `t`, keyed `k<offset % 3>`.
async fn publish(
    bus: &Bus,
    endpoints: &[(EndpointName, Retention)],
    partition: i32,
    offset: i64,
) -> Published {
    let key = format!("k{}", offset % 3);
    let value = format!("{{\"n\":{offset}}}");
    let envelope = Envelope::encode(
        RecordParts {
            topic: "t",
            partition,
            offset,
            key: Some(key.as_bytes()),
            timestamp: None,
            value: Some(value.as_bytes()),
        },
        [],
    )
    .expect("an envelope");
    bus.publish(Publication {
        topic: "t",
        partition,
        offset,
        endpoints,
        envelope: &envelope,
    })
    .await
    .expect("publish")
}

/// (partition, offset) of a record entry; `None` for anything else.
fn record_of(entry: &BusEntry) -> Option<(i64, i64)> {
    let EntryKind::Record { envelope, .. } = &entry.kind else {
        return None;
    };
    let json: serde_json::Value = serde_json::from_slice(envelope.as_bytes()).expect("json");
    Some((
        json["partition"].as_i64().expect("a partition"),
        json["offset"].as_i64().expect("an offset"),
    ))
}

const END: StreamId = StreamId {
    ms: u64::MAX,
    seq: u64::MAX,
};

async fn everything(bus: &Bus, endpoint: &EndpointName) -> Vec<BusEntry> {
    bus.range(endpoint, StreamId::ZERO, END, 100_000)
        .await
        .expect("range")
}

/// Reads until `count` entries came.
async fn read(reader: &mut fjord_bus::BusReader, count: usize) -> Vec<(usize, BusEntry)> {
    let mut entries = Vec::new();
    let deadline = std::time::Instant::now() + PATIENCE;
    while entries.len() < count {
        assert!(std::time::Instant::now() < deadline, "read {entries:?}");
        entries.extend(reader.next_batch().await.expect("read"));
    }
    entries
}

/// Each entry names the one before it in its stream.
fn assert_chained(entries: &[BusEntry]) {
    for pair in entries.windows(2) {
        assert!(pair[0].id < pair[1].id, "ordered: {pair:?}");
        assert_eq!(pair[1].previous, pair[0].id, "chained: {pair:?}");
    }
}

async fn ids_are_ordered_and_readers_see_each_new_entry_once(kind: Kind) {
    let (bus, _) = fresh(kind).await;
    let endpoints = [
        (name("a"), Retention::default()),
        (name("b"), Retention::default()),
    ];
    assert_eq!(publish(&bus, &endpoints, 0, 0).await, Published::Appended);
    let mut reader = bus.reader(vec![name("b")]).await.expect("a reader");
    let first = everything(&bus, &name("b")).await;
    assert_eq!(
        reader.cursors(),
        [first[0].id],
        "starts after the last entry"
    );
    assert_eq!(publish(&bus, &endpoints, 0, 1).await, Published::Appended);
    assert_eq!(publish(&bus, &endpoints, 0, 1).await, Published::Duplicate);
    assert_eq!(publish(&bus, &endpoints, 0, 0).await, Published::Duplicate);
    assert_eq!(publish(&bus, &endpoints, 1, 0).await, Published::Appended);
    let batch = read(&mut reader, 2).await;
    let seen: Vec<_> = batch
        .iter()
        .map(|(index, entry)| (*index, record_of(entry)))
        .collect();
    assert_eq!(seen, [(0, Some((0, 1))), (0, Some((1, 0)))]);
    let all = everything(&bus, &name("b")).await;
    assert_eq!(all.len(), 3);
    assert_eq!(all[0].previous, StreamId::ZERO);
    assert_chained(&all);
    assert_eq!(all[1..], [batch[0].1.clone(), batch[1].1.clone()]);
    assert_eq!(reader.cursors(), [all[2].id]);
    // The record key routes it.
    assert_eq!(all[1].receivers(), Receivers::Key(Some(b"k1")));
    // Nothing more, and nothing twice.
    assert!(
        reader.next_batch().await.expect("read").is_empty(),
        "no entry twice"
    );
}

async fn ranges_start_after_and_end_at_and_stop_at_the_count(kind: Kind) {
    let (bus, _) = fresh(kind).await;
    let endpoints = [(name("a"), Retention::default())];
    for offset in 0..5 {
        publish(&bus, &endpoints, 0, offset).await;
    }
    let ids: Vec<StreamId> = everything(&bus, &name("a"))
        .await
        .iter()
        .map(|entry| entry.id)
        .collect();
    assert_eq!(ids.len(), 5);
    let range = async |after: StreamId, until: StreamId, count: usize| -> Vec<StreamId> {
        bus.range(&name("a"), after, until, count)
            .await
            .expect("range")
            .iter()
            .map(|entry| entry.id)
            .collect()
    };
    assert_eq!(range(ids[0], ids[3], 10).await, ids[1..=3]);
    assert_eq!(range(ids[0], ids[3], 2).await, ids[1..=2]);
    assert_eq!(range(ids[4], END, 10).await, []);
    assert_eq!(range(StreamId::ZERO, ids[0], 10).await, ids[..1]);
    assert!(
        bus.range(&name("nowhere"), StreamId::ZERO, END, 10)
            .await
            .expect("range")
            .is_empty()
    );
    for after in [StreamId::ZERO, ids[2], ids[4]] {
        assert_eq!(
            bus.trimmed_after(&name("a"), after).await.expect("trimmed"),
            None,
            "nothing trimmed after {after}"
        );
    }
}

async fn retention_trims_the_oldest_and_tells_who_is_behind(kind: Kind) {
    let (bus, _) = fresh(kind).await;
    let small = Retention {
        max_records: 10,
        max_age_secs: 3600,
    };
    let endpoints = [(name("a"), small)];
    let mut reader = bus.reader(vec![name("a")]).await.expect("a reader");
    // Redis trims whole nodes of 100 entries (`MAXLEN ~`): enough that it must trim some.
    let published = 250;
    for offset in 0..published {
        publish(&bus, &endpoints, 0, offset).await;
    }
    let kept = everything(&bus, &name("a")).await;
    assert!(kept.len() >= 10, "never fewer than max_records");
    let offsets: Vec<i64> = kept
        .iter()
        .map(|entry| record_of(entry).expect("a record").1)
        .collect();
    let oldest = offsets[0];
    assert!(oldest > 0, "something was trimmed: {} kept", kept.len());
    assert_eq!(
        offsets,
        (oldest..published).collect::<Vec<_>>(),
        "the newest kept"
    );
    assert_chained(&kept);
    // Behind the oldest kept: told, with where it goes on.
    assert_eq!(
        bus.trimmed_after(&name("a"), StreamId::ZERO)
            .await
            .expect("trimmed"),
        Some(kept[0].id)
    );
    // Right before it, or past it: nothing missed.
    for after in [kept[0].previous, kept[0].id] {
        assert_eq!(
            bus.trimmed_after(&name("a"), after).await.expect("trimmed"),
            None
        );
    }
    // A reader from before the trim reads on from the oldest kept, whose `previous` tells
    // it what it missed.
    let first = read(&mut reader, 1).await.remove(0).1;
    assert_eq!(first, kept[0]);
    assert!(first.previous > StreamId::ZERO);
}

async fn a_skipped_records_marker_is_published_once_and_counts_as_published(kind: Kind) {
    let (bus, _) = fresh(kind).await;
    let endpoints = [
        (name("a"), Retention::default()),
        (name("b"), Retention::default()),
    ];
    let mut reader = bus
        .reader(vec![name("a"), name("b")])
        .await
        .expect("reader");
    publish(&bus, &endpoints, 0, 2).await;
    let skipped = SkippedRecords {
        topic: "t".into(),
        partition: 0,
        first_offset: 3,
        last_offset: 7,
        error: "Local: Invalid compressed data".into(),
        reason: SkipReason::UnreadableRecord,
    };
    for expected in [Published::Appended, Published::Duplicate] {
        assert_eq!(
            bus.publish_skipped(&skipped, &endpoints)
                .await
                .expect("publish"),
            expected
        );
    }
    // A record of the skipped stretch read again after a restart is not published.
    assert_eq!(publish(&bus, &endpoints, 0, 5).await, Published::Duplicate);
    assert_eq!(publish(&bus, &endpoints, 0, 8).await, Published::Appended);
    let mut batch = read(&mut reader, 6).await;
    batch.sort_by_key(|(index, _)| *index);
    let seen: Vec<_> = batch
        .iter()
        .map(|(index, entry)| (*index, record_of(entry), entry.receivers()))
        .collect();
    assert_eq!(
        seen,
        [
            (0, Some((0, 2)), Receivers::Key(Some(b"k2"))),
            (0, None, Receivers::All),
            (0, Some((0, 8)), Receivers::Key(Some(b"k2"))),
            (1, Some((0, 2)), Receivers::Key(Some(b"k2"))),
            (1, None, Receivers::All),
            (1, Some((0, 8)), Receivers::Key(Some(b"k2"))),
        ]
    );
    assert_eq!(batch[1].1.kind, EntryKind::Skipped(Arc::new(skipped)));
}

/// (stream id, offset) of the records in `text`, an SSE stream of one endpoint.
fn records_in(text: &str) -> Vec<(StreamId, i64)> {
    text.split("\n\n")
        .filter_map(|block| {
            let id = block.lines().find_map(|line| line.strip_prefix("id: "))?;
            let data = block.lines().find_map(|line| line.strip_prefix("data: "))?;
            let data: serde_json::Value = serde_json::from_str(data).expect("json");
            Some((id.parse().expect("an id"), data["offset"].as_i64()?))
        })
        .collect()
}

/// The records a subscription sends next, waiting for at least one.
async fn next_records(subscription: &mut Subscription) -> Vec<(StreamId, i64)> {
    loop {
        let next = tokio::time::timeout(PATIENCE, subscription.next())
            .await
            .expect("an event in time")
            .expect("an open stream");
        let Outgoing::Events(bytes) = next else {
            panic!("no direct writes here");
        };
        let text = std::str::from_utf8(&bytes).expect("utf-8");
        assert!(!text.contains("fjord.gap"), "no gap: {text}");
        let records = records_in(text);
        if !records.is_empty() {
            return records;
        }
    }
}

async fn the_hub_s_live_start_misses_nothing_and_repeats_nothing(kind: Kind) {
    let (bus, _) = fresh(kind).await;
    let endpoint = name("orders");
    let reader = bus.reader(vec![endpoint.clone()]).await.expect("reader");
    let hub = Arc::new(Hub::new(
        vec![(endpoint.clone(), StartPosition::Live)],
        reader.cursors(),
        &ServerConfig::default(),
        bus.clone(),
        Arc::default(),
    ));
    let feed = tokio::spawn(Arc::clone(&hub).run_feed(reader));
    let total: i64 = 2_000;
    let publisher = {
        let bus = bus.clone();
        tokio::spawn(async move {
            let endpoints = [(name("orders"), Retention::default())];
            for offset in 0..total {
                publish(&bus, &endpoints, 0, offset).await;
                if offset % 20 == 0 {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
        })
    };
    let live = || Interest {
        endpoints: vec![0],
        keys: None,
        views: Vec::new(),
    };
    // Connections that subscribe while records flow, read a few, drop, and resume from the
    // last id they got, until the last record.
    let clients: Vec<_> = (0..4)
        .map(|client| {
            let hub = Arc::clone(&hub);
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(client * 7)).await;
                let (mut last, mut cycles) = (None::<(StreamId, i64)>, 0);
                while last.is_none_or(|(_, offset)| offset < total - 1) {
                    let resume = last.map(|(id, _)| ResumeId(vec![id]));
                    let mut subscription = hub
                        .try_subscribe(live(), resume.as_ref(), None)
                        .expect("no key filters, so no key budget to reach");
                    let mut got = 0;
                    while got < 5 && last.is_none_or(|(_, offset)| offset < total - 1) {
                        for (id, offset) in next_records(&mut subscription).await {
                            if let Some((last_id, last_offset)) = last {
                                assert!(
                                    id > last_id && offset == last_offset + 1,
                                    "client {client}, cycle {cycles}: {offset} ({id}) after {last_offset} ({last_id})"
                                );
                            }
                            last = Some((id, offset));
                            got += 1;
                        }
                    }
                    drop(subscription);
                    cycles += 1;
                    if cycles % 3 == 0 {
                        tokio::time::sleep(Duration::from_millis(3)).await;
                    }
                }
                cycles
            })
        })
        .collect();
    publisher.await.expect("publisher");
    for client in clients {
        assert!(client.await.expect("client") > 10, "dropped and resumed");
    }
    feed.abort();
}

/// Entries someone else wrote to Redis: decoded in their place, and the reader goes on.
async fn invalid_entries_are_read_in_place_and_the_rest_read_on(kind: Kind) {
    let (bus, prefix) = fresh(kind).await;
    let endpoints = [(name("a"), Retention::default())];
    let mut reader = bus.reader(vec![name("a")]).await.expect("reader");
    let stream_key = fjord_bus::redis::stream_key(&prefix, &name("a"));
    let mut raw = redis_connection_for(&services(), &stream_key).await;
    publish(&bus, &endpoints, 0, 0).await;
    let _: String = ::redis::cmd("XADD")
        .arg(&stream_key)
        .arg("*")
        .arg(&b"\xff"[..])
        .arg("x")
        .arg("p")
        .arg("0-0")
        .arg("e")
        .arg("{\"a\":1}\r")
        .query_async(&mut raw)
        .await
        .expect("xadd");
    publish(&bus, &endpoints, 0, 1).await;
    let read_live: Vec<BusEntry> = read(&mut reader, 3)
        .await
        .into_iter()
        .map(|(_, entry)| entry)
        .collect();
    assert_eq!(read_live, everything(&bus, &name("a")).await);
    assert_eq!(record_of(&read_live[0]), Some((0, 0)));
    assert_eq!(
        read_live[1].kind,
        EntryKind::Invalid(InvalidEntry {
            problem: Problem::LineBreak,
            filter_key: None,
        })
    );
    assert_eq!(read_live[1].receivers(), Receivers::All);
    assert_eq!(record_of(&read_live[2]), Some((0, 1)));
    assert_eq!(reader.cursors(), [read_live[2].id]);
}

/// One test per case, run on the bus of `$kind`.
macro_rules! cases {
    ($kind:ident: $($case:ident),* $(,)?) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $case() {
            if matches!(super::Kind::$kind, super::Kind::Redis) && super::skip_without_services() {
                return;
            }
            super::$case(super::Kind::$kind).await;
        }
    )*};
}

/// The cases both buses pass.
macro_rules! shared_cases {
    ($kind:ident) => {
        cases!($kind:
            ids_are_ordered_and_readers_see_each_new_entry_once,
            ranges_start_after_and_end_at_and_stop_at_the_count,
            retention_trims_the_oldest_and_tells_who_is_behind,
            a_skipped_records_marker_is_published_once_and_counts_as_published,
            the_hub_s_live_start_misses_nothing_and_repeats_nothing,
        );
    };
}

mod memory {
    shared_cases!(Memory);
}

mod redis {
    shared_cases!(Redis);
    cases!(Redis: invalid_entries_are_read_in_place_and_the_rest_read_on);
}
