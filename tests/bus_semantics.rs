//! One suite of bus semantics, run against both buses: the in-process bus of `fjord dev` and
//! the Redis bus of production (real Redis). `fjord dev` keeps the promise production keeps
//! only if both pass the same cases: ids, ranges, retention and the gaps it makes, markers
//! of skipped records, and the hub's live start — a connection that subscribes, or resumes,
//! while records are being published misses none and gets none twice — and table endpoints:
//! rows, their snapshot, and the live records after it.
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
use fjord_config::{
    EndpointName, Keeping, RedisConfig, Retention, ServerConfig, StartPosition, TableBounds,
};
use fjord_server::hub::{Hub, HubEndpoint, Interest, Outgoing, Subscription};
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
    endpoints: &[(EndpointName, Keeping)],
    partition: i32,
    offset: i64,
) -> Published {
    let key = format!("k{}", offset % 3);
    let value = format!("{{\"n\":{offset}}}");
    publish_record(bus, endpoints, partition, offset, Some(&key), Some(&value)).await
}

/// Publishes record (`partition`, `offset`) of topic `t` with `key` and `value` (`None`: a
/// tombstone).
async fn publish_record(
    bus: &Bus,
    endpoints: &[(EndpointName, Keeping)],
    partition: i32,
    offset: i64,
    key: Option<&str>,
    value: Option<&str>,
) -> Published {
    let envelope = Envelope::encode(
        RecordParts {
            topic: "t",
            partition,
            offset,
            key: key.map(str::as_bytes),
            timestamp: None,
            value: value.map(str::as_bytes),
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
        (name("a"), Retention::default().into()),
        (name("b"), Retention::default().into()),
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
    let endpoints = [(name("a"), Retention::default().into())];
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
    let endpoints = [(name("a"), small.into())];
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
        (name("a"), Retention::default().into()),
        (name("b"), Retention::default().into()),
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
            let endpoints = [(name("orders"), Retention::default().into())];
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
        encoding: None,
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
    let endpoints = [(name("a"), Retention::default().into())];
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

/// A table endpoint of `max_keys` rows (and ample bytes) that keeps `retention`.
fn table(max_keys: u64, retention: Retention) -> Keeping {
    Keeping {
        retention,
        table: Some(TableBounds {
            max_keys,
            max_bytes: 1 << 20,
        }),
    }
}

/// Every row of `endpoint`, read `page` at a time, as (key, offset of its record, id).
async fn all_rows(bus: &Bus, endpoint: &EndpointName, page: usize) -> Vec<(String, i64, StreamId)> {
    let mut rows = Vec::new();
    let mut after: Option<Vec<u8>> = None;
    loop {
        let got = bus
            .rows(endpoint, after.as_deref(), page)
            .await
            .expect("rows");
        for row in &got {
            let key = String::from_utf8(row.filter_key().expect("a key").to_vec()).expect("text");
            rows.push((key, record_of(row).expect("a record").1, row.id));
        }
        if got.len() < page {
            return rows;
        }
        after = got
            .last()
            .and_then(BusEntry::filter_key)
            .map(|key| key.to_vec());
    }
}

async fn a_table_keeps_the_latest_row_per_key_in_key_order(kind: Kind) {
    let (bus, _) = fresh(kind).await;
    let endpoints = [
        (name("rows"), table(4, Retention::default())),
        (name("log"), Retention::default().into()),
    ];
    let records: [(Option<&str>, Option<&str>); 9] = [
        (Some("b"), Some("1")),
        (Some("a"), Some("1")),
        (None, Some("1")),
        (Some("c"), Some("1")),
        (Some("b"), Some("2")),
        (Some("a"), None),
        (Some("d"), Some("1")),
        (Some("e"), Some("1")),
        (Some("f"), Some("1")),
    ];
    for (offset, (key, value)) in records.into_iter().enumerate() {
        publish_record(&bus, &endpoints, 0, offset as i64, key, value).await;
    }
    // Published twice after a crash: changes nothing.
    publish_record(&bus, &endpoints, 0, 4, Some("b"), Some("9")).await;
    let stream = everything(&bus, &name("rows")).await;
    assert_eq!(stream.len(), 9, "every record streams, rows or not");
    let id_of = |offset: i64| {
        stream
            .iter()
            .find(|entry| record_of(entry).expect("a record").1 == offset)
            .expect("in the stream")
            .id
    };
    // `a` was deleted by its tombstone; the record without a key is no row; `f` came when
    // four keys were held, and is refused.
    let expected = vec![
        ("b".to_owned(), 4, id_of(4)),
        ("c".to_owned(), 3, id_of(3)),
        ("d".to_owned(), 6, id_of(6)),
        ("e".to_owned(), 7, id_of(7)),
    ];
    for page in [1, 2, 3, 100] {
        assert_eq!(
            all_rows(&bus, &name("rows"), page).await,
            expected,
            "pages of {page}"
        );
    }
    assert!(
        bus.rows(&name("log"), None, 10)
            .await
            .expect("rows")
            .is_empty(),
        "a stream has no rows"
    );
    // A full table still updates the keys it has, and takes a new one once one is deleted.
    publish_record(&bus, &endpoints, 0, 9, Some("c"), Some("2")).await;
    publish_record(&bus, &endpoints, 0, 10, Some("f"), Some("2")).await;
    publish_record(&bus, &endpoints, 0, 11, Some("d"), None).await;
    publish_record(&bus, &endpoints, 0, 12, Some("f"), Some("3")).await;
    let keys: Vec<(String, i64)> = all_rows(&bus, &name("rows"), 2)
        .await
        .into_iter()
        .map(|(key, offset, _)| (key, offset))
        .collect();
    assert_eq!(
        keys,
        [
            ("b".to_owned(), 4),
            ("c".to_owned(), 9),
            ("e".to_owned(), 7),
            ("f".to_owned(), 12)
        ]
    );

    // The bound in bytes counts keys, ids and envelopes, and refuses new keys past it.
    let small = [(
        name("small"),
        Keeping {
            retention: Retention::default(),
            table: Some(TableBounds {
                max_keys: 1_000,
                max_bytes: 1_024,
            }),
        },
    )];
    for offset in 0..30 {
        publish_record(
            &bus,
            &small,
            0,
            offset,
            Some(&format!("key-{offset:02}")),
            Some("{}"),
        )
        .await;
    }
    let rows = bus.rows(&name("small"), None, 100).await.expect("rows");
    let bytes: usize = rows
        .iter()
        .map(|row| {
            let EntryKind::Record { envelope, .. } = &row.kind else {
                panic!("a record: {row:?}");
            };
            let key = row.filter_key().expect("a key").len();
            key + row.id.to_string().len() + 1 + envelope.as_bytes().len()
        })
        .sum();
    assert!(
        (5..30).contains(&rows.len()) && bytes <= 1_024,
        "{} rows, {bytes} bytes",
        rows.len()
    );
}

/// What a table client holds: its rows by key (offset of their record), and the checks it
/// makes of every event: rows and records of a key only ever newer, none twice.
#[derive(Debug, Default)]
struct TableClient {
    rows: std::collections::BTreeMap<String, i64>,
    /// While a snapshot is read: its rows.
    pending: Option<std::collections::BTreeMap<String, i64>>,
    /// The newest offset seen per key since the last snapshot began.
    newest: std::collections::HashMap<String, i64>,
    /// The id to resume from: the last `fjord.snapshot_end`'s or live record's.
    last_id: Option<StreamId>,
    snapshots: usize,
}

impl TableClient {
    /// Takes the events in `text`; true when the record of `until` (key, offset) was taken.
    fn take(&mut self, text: &str, until: (&str, i64)) -> bool {
        let mut reached = false;
        for block in text.split("\n\n").filter(|block| !block.trim().is_empty()) {
            let field = |name: &str| {
                block
                    .lines()
                    .find_map(|line| line.strip_prefix(&format!("{name}: ")[..]))
            };
            let id = field("id").map(|id| id.parse::<StreamId>().expect("an id"));
            match field("event") {
                Some("fjord.snapshot_start") => {
                    assert!(self.pending.is_none(), "one snapshot at a time: {text}");
                    self.pending = Some(Default::default());
                    self.newest.clear();
                    self.snapshots += 1;
                }
                Some("fjord.snapshot_end") => {
                    self.rows = self.pending.take().expect("a snapshot began");
                    self.last_id = Some(id.expect("snapshot_end has an id"));
                }
                Some("orders") => {
                    let data: serde_json::Value =
                        serde_json::from_str(field("data").expect("data")).expect("json");
                    let key = data["key"].as_str().expect("a key").to_owned();
                    let offset = data["offset"].as_i64().expect("an offset");
                    let before = self.newest.insert(key.clone(), offset);
                    assert!(
                        before.is_none_or(|before| before < offset),
                        "{key}: {offset} after {before:?}"
                    );
                    reached |= (key.as_str(), offset) == until;
                    match (&mut self.pending, id) {
                        (Some(pending), None) => {
                            assert!(!data["value"].is_null(), "a row is never a tombstone");
                            pending.insert(key, offset);
                        }
                        (None, Some(id)) => {
                            assert!(self.last_id.is_none_or(|last| last < id), "ids rise");
                            self.last_id = Some(id);
                            if data["value"].is_null() {
                                self.rows.remove(&key);
                            } else {
                                self.rows.insert(key, offset);
                            }
                        }
                        (pending, id) => {
                            panic!("a row has no id, a live record one: {pending:?} {id:?}")
                        }
                    }
                }
                Some("fjord.gap") => panic!("a table client gets a snapshot, not a gap: {text}"),
                Some(other) => panic!("unexpected {other}"),
                None => {}
            }
        }
        reached
    }
}

/// How far [`read_table`] got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Read {
    /// The record it waited for, and the end of any snapshot.
    Reached,
    /// As many chunks as it was to read.
    Stopped,
    /// The stream ended: the server cut the connection off.
    Ended,
}

/// Reads `subscription` until the record `until` and the end of any snapshot were taken,
/// `limit` chunks were, or the stream ended.
async fn read_table(
    client: &mut TableClient,
    subscription: &mut Subscription,
    until: (&str, i64),
    limit: u64,
) -> Read {
    let mut reached = false;
    for _ in 0..limit {
        let next = tokio::time::timeout(PATIENCE, subscription.next())
            .await
            .expect("an event in time");
        let Some(next) = next else {
            return Read::Ended;
        };
        let Outgoing::Events(bytes) = next else {
            panic!("no direct writes here");
        };
        reached |= client.take(std::str::from_utf8(&bytes).expect("utf-8"), until);
        if reached && client.pending.is_none() {
            return Read::Reached;
        }
    }
    Read::Stopped
}

/// Subscribes `client` to `hub`'s table from its last id until the record `until`,
/// subscribing again whenever the server cuts it off.
async fn read_table_to_the_end(hub: &Arc<Hub>, client: &mut TableClient, until: (&str, i64)) {
    for _ in 0..10 {
        let resume = client.last_id.map(|id| ResumeId(vec![id]));
        // A snapshot cut off is dropped; the next connection starts another.
        client.pending = None;
        let mut subscription = hub
            .try_subscribe(table_interest(), resume.as_ref(), None)
            .expect("room");
        if read_table(client, &mut subscription, until, 1_000).await == Read::Reached {
            return;
        }
    }
    panic!("cut off ten times");
}

fn table_interest() -> Interest {
    Interest {
        endpoints: vec![0],
        keys: None,
        views: Vec::new(),
        encoding: None,
    }
}

fn table_hub(bus: &Bus, reader: &fjord_bus::BusReader) -> Arc<Hub> {
    Arc::new(Hub::new(
        vec![HubEndpoint {
            name: name("orders"),
            start: StartPosition::Live,
            filter: None,
            table: true,
        }],
        reader.cursors(),
        &ServerConfig::default(),
        bus.clone(),
        Arc::default(),
    ))
}

/// The rows of `orders` on the bus, by key, as the offset of their record.
async fn rows_by_key(bus: &Bus) -> std::collections::BTreeMap<String, i64> {
    all_rows(bus, &name("orders"), 100)
        .await
        .into_iter()
        .map(|(key, offset, _)| (key, offset))
        .collect()
}

async fn a_table_s_snapshot_then_live_misses_nothing_and_repeats_nothing(kind: Kind) {
    let (bus, _) = fresh(kind).await;
    let reader = bus.reader(vec![name("orders")]).await.expect("reader");
    let hub = table_hub(&bus, &reader);
    let feed = tokio::spawn(Arc::clone(&hub).run_feed(reader));
    let total: i64 = 1_500;
    let last_key = |offset: i64| format!("k{:02}", offset % 40);
    let publisher = {
        let bus = bus.clone();
        tokio::spawn(async move {
            let endpoints = [(name("orders"), table(1_000, Retention::default()))];
            for offset in 0..total {
                let key = format!("k{:02}", offset % 40);
                // Every seventh record deletes its key; the next of that key makes it again.
                let value = (offset % 7 != 3).then(|| format!("{{\"n\":{offset}}}"));
                publish_record(&bus, &endpoints, 0, offset, Some(&key), value.as_deref()).await;
                if offset % 25 == 0 {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
        })
    };
    let interest = table_interest;
    let until = (last_key(total - 1), total - 1);
    // Clients that connect while rows change, read a little, drop, and resume from their
    // last id (or start over when they had none), until the last record.
    let clients: Vec<_> = (0..4_u64)
        .map(|client| {
            let (hub, until) = (Arc::clone(&hub), until.clone());
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(client * 5)).await;
                let mut state = TableClient::default();
                let mut cycles = 0;
                loop {
                    let resume = state.last_id.map(|id| ResumeId(vec![id]));
                    if resume.is_none() {
                        state = TableClient::default();
                    }
                    state.pending = None;
                    let mut subscription = hub
                        .try_subscribe(interest(), resume.as_ref(), None)
                        .expect("no key filters, so no key budget to reach");
                    let limit = 3 + cycles;
                    let done =
                        read_table(&mut state, &mut subscription, (&until.0, until.1), limit).await;
                    cycles += 1;
                    if done == Read::Reached {
                        return (state, cycles);
                    }
                }
            })
        })
        .collect();
    publisher.await.expect("publisher");
    let expected = rows_by_key(&bus).await;
    assert!(expected.len() > 30, "{expected:?}");
    for client in clients {
        let (state, cycles) = client.await.expect("client");
        assert!(cycles > 3, "dropped and resumed: {cycles}");
        assert!(state.snapshots >= 1);
        assert_eq!(state.rows, expected, "the client's rows are the table's");
    }
    // A client that comes after the last change gets the same rows in one snapshot.
    let mut late = TableClient::default();
    read_table_to_the_end(&hub, &mut late, (&until.0, until.1)).await;
    assert_eq!((late.rows, late.snapshots), (expected, 1));
    feed.abort();
}

async fn a_table_client_resumes_from_the_stream_or_gets_a_fresh_snapshot(kind: Kind) {
    let (bus, _) = fresh(kind).await;
    let reader = bus.reader(vec![name("orders")]).await.expect("reader");
    let hub = table_hub(&bus, &reader);
    let feed = tokio::spawn(Arc::clone(&hub).run_feed(reader));
    let small = Retention {
        max_records: 10,
        max_age_secs: 3600,
    };
    let endpoints = [(name("orders"), table(1_000, small))];
    let key = |offset: i64| format!("k{}", offset % 5);
    let mut offset = 0;
    let mut publish_next = async |count: i64| {
        for _ in 0..count {
            publish_record(&bus, &endpoints, 0, offset, Some(&key(offset)), Some("{}")).await;
            offset += 1;
        }
        offset - 1
    };
    let last = publish_next(8).await;
    let mut client = TableClient::default();
    read_table_to_the_end(&hub, &mut client, (&key(last), last)).await;
    // Within the window: the records it missed, no snapshot.
    let last = publish_next(3).await;
    read_table_to_the_end(&hub, &mut client, (&key(last), last)).await;
    assert_eq!(client.snapshots, 1);
    assert_eq!(client.rows, rows_by_key(&bus).await);
    // Past it (Redis trims whole nodes of 100 entries): a fresh snapshot in place of a gap,
    // whether the client was away, or connected to a server that read too late.
    let away_since = client.last_id.expect("an id");
    let last = publish_next(250).await;
    assert!(
        bus.trimmed_after(&name("orders"), away_since)
            .await
            .expect("trimmed")
            .is_some()
    );
    read_table_to_the_end(&hub, &mut client, (&key(last), last)).await;
    // Another when the server, reading late, cut it off again after a snapshot taken where
    // it stood.
    assert!(client.snapshots >= 2, "{}", client.snapshots);
    assert_eq!(client.rows, rows_by_key(&bus).await);
    feed.abort();
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
            a_table_keeps_the_latest_row_per_key_in_key_order,
            a_table_s_snapshot_then_live_misses_nothing_and_repeats_nothing,
            a_table_client_resumes_from_the_stream_or_gets_a_fresh_snapshot,
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
