//! Every Kafka compression codec, through the real broker, fjord-consumer, Redis and
//! fjord-server: records produced by another client (kcat) with gzip, snappy, lz4 and zstd
//! reach SSE clients with their exact values. And a batch the consumer cannot read at all
//! (its compressed payload corrupted, or its codec set to one no client knows, on the
//! broker's disk) does not stop its partition: it is skipped once, and clients — live and
//! resuming — are sent `fjord.gap` for it.

use std::io::{Seek as _, SeekFrom, Write as _};

use crate::common::*;
use fjord_bus::envelope::Envelope;
use fjord_bus::{
    Bus, EntryKind, Publication, Published, SkipReason, SkippedRecords, connect_redis,
};
use fjord_config::{EndpointName, RedisConfig, Retention};

/// Kafka's codec numbers in a batch's attributes.
const CODECS: [(&str, u8); 4] = [("gzip", 1), ("snappy", 2), ("lz4", 3), ("zstd", 4)];

/// Values of a few KiB that say what they are: repetitive enough that every codec shrinks
/// them, so that the producer really sends compressed batches.
fn records(codec: &str, first: usize, count: usize) -> Vec<(String, String)> {
    (first..first + count)
        .map(|n| {
            let text = format!("{codec} record {n} ").repeat(200);
            let value = serde_json::json!({"codec": codec, "n": n, "text": text});
            (format!("{codec}-{n}"), value.to_string())
        })
        .collect()
}

/// Checks that `events` carry exactly `expected`, in order: keys and values.
fn assert_values(events: &[SseEvent], expected: &[(String, String)]) {
    let got: Vec<(String, serde_json::Value)> = events
        .iter()
        .map(|event| {
            let envelope = event.json();
            (
                envelope["key"].as_str().expect("a key").to_owned(),
                envelope["value"].clone(),
            )
        })
        .collect();
    let expected: Vec<(String, serde_json::Value)> = expected
        .iter()
        .map(|(key, value)| {
            (
                key.clone(),
                serde_json::from_str(value).expect("a JSON value"),
            )
        })
        .collect();
    assert_eq!(got, expected);
}

/// The next event, past heartbeats, within [`PATIENCE`].
async fn next_event(stream: &mut SseStream) -> SseEvent {
    let deadline = std::time::Instant::now() + PATIENCE;
    loop {
        let event = stream.next().await.expect("an open stream");
        if event.comment.is_none() {
            return event;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "only heartbeats for {PATIENCE:?}"
        );
    }
}

#[tokio::test]
async fn records_of_every_codec_arrive_with_their_exact_values() {
    if skip_without_services() {
        return;
    }
    let services = services();
    let topics: Vec<(&str, String)> = CODECS
        .iter()
        .map(|(codec, _)| (*codec, unique(codec)))
        .collect();
    for (_, topic) in &topics {
        create_topic(&services.brokers, topic, 1).await;
    }
    let endpoints: Vec<(&str, &str)> = topics
        .iter()
        .map(|(codec, topic)| (*codec, topic.as_str()))
        .collect();
    let port = free_port();
    let manifest = manifest(&services, &endpoints, &unique("group"), port);
    let (_dir, path) = write_manifest(&manifest);
    let _server = Process::server(&path);
    wait_ready(port).await;
    let mut clients = Vec::new();
    for (codec, _) in &topics {
        let mut client =
            SseStream::connect(&format!("http://127.0.0.1:{port}/v1/streams/{codec}"), &[]).await;
        client.next().await.expect("prelude");
        clients.push(client);
    }
    let consumer = Process::consumer(&path, &[]);

    for ((codec, topic), mut client) in topics.iter().zip(clients) {
        let produced = records(codec, 0, 40);
        produce_with_kcat(&services.brokers, topic, 0, codec, &produced);
        let events = client.records(produced.len()).await;
        assert_values(&events, &produced);
        // The broker keeps what the producer sent: compressed batches of this codec.
        let expected_codec = CODECS
            .iter()
            .find(|(name, _)| name == codec)
            .expect("a codec")
            .1;
        let batches = segment_batches(topic, 0);
        assert!(!batches.is_empty(), "{topic} has batches on disk");
        assert!(
            batches.iter().all(|batch| batch.codec == expected_codec),
            "{codec}: {batches:?}"
        );
    }
    assert!(
        !consumer
            .log()
            .iter()
            .any(|line| line.contains("Decompression") || line.contains("cannot be read")),
        "{}",
        consumer.log().join("\n")
    );
}

/// How the test makes a batch unreadable on the broker's disk. The broker serves fetches
/// from the file as it is, without checking.
#[derive(Debug, Clone, Copy)]
enum Damage {
    /// Garbles the first bytes of the compressed payload (zstd's frame header), which
    /// starts 61 bytes into a v2 batch.
    Payload,
    /// Sets the batch's codec to 5, which no Kafka client knows: librdkafka fails it as
    /// it failed zstd when built without it ("Not implemented").
    UnknownCodec,
}

#[tokio::test]
async fn a_batch_with_a_corrupt_payload_is_skipped_once_with_a_gap() {
    if skip_without_services() {
        return;
    }
    an_unreadable_batch_is_skipped(Damage::Payload, "Invalid compressed data").await;
}

#[tokio::test]
async fn a_batch_of_an_unknown_codec_is_skipped_once_with_a_gap() {
    if skip_without_services() {
        return;
    }
    an_unreadable_batch_is_skipped(Damage::UnknownCodec, "Not implemented").await;
}

/// Offsets 0-4 readable, 5-24 one zstd batch that `damage` makes unreadable, 25-29
/// readable: clients live and resuming get the readable ones and one `fjord.gap`, and the
/// consumer logs one skip, whose `error` holds `error`.
async fn an_unreadable_batch_is_skipped(damage: Damage, error: &str) {
    let services = services();
    let topic = unique("corrupt");
    create_topic(&services.brokers, &topic, 1).await;
    let before = records("gzip", 0, 5);
    let bad = records("zstd", 5, 20);
    let after = records("lz4", 25, 5);
    produce_with_kcat(&services.brokers, &topic, 0, "gzip", &before);
    produce_with_kcat(&services.brokers, &topic, 0, "zstd", &bad);
    produce_with_kcat(&services.brokers, &topic, 0, "lz4", &after);
    let batches = segment_batches(&topic, 0);
    let corrupt: Vec<_> = batches.iter().filter(|batch| batch.codec == 4).collect();
    assert_eq!(corrupt.len(), 1, "one zstd batch: {batches:?}");
    let corrupt = *corrupt[0];
    assert_eq!((corrupt.base_offset, corrupt.last_offset), (5, 24));
    {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .open(segment_path(&topic, 0))
            .expect("the segment file");
        let (at, bytes): (u64, &[u8]) = match damage {
            Damage::Payload => (61, &[0xA5; 16]),
            // The low byte of the attributes (i16 at 21): no flags, codec 5.
            Damage::UnknownCodec => (22, &[5]),
        };
        file.seek(SeekFrom::Start(corrupt.position + at))
            .expect("seek");
        file.write_all(bytes).expect("write");
    }

    let port = free_port();
    let manifest = manifest(&services, &[("events", &topic)], &unique("group"), port);
    let (_dir, path) = write_manifest(&manifest);
    let _server = Process::server(&path);
    wait_ready(port).await;
    let url = format!("http://127.0.0.1:{port}/v1/streams/events");
    let mut live = SseStream::connect(&url, &[]).await;
    live.next().await.expect("prelude");
    let mut consumer = Process::consumer(&path, &[]);

    let first = live.records(before.len()).await;
    assert_values(&first, &before);
    let gap = next_event(&mut live).await;
    assert_eq!(
        gap.event.as_deref(),
        Some("fjord.gap"),
        "{gap:?}; consumer log:\n{}",
        consumer.log().join("\n")
    );
    assert!(gap.id.is_some(), "an entry of the stream: {gap:?}");
    let data = gap.json();
    assert_eq!(data["endpoint"], "events");
    assert_eq!(data["reason"], "unreadable_record");
    assert_eq!(data["topic"], topic.as_str());
    assert_eq!(data["partition"], 0);
    assert_eq!(data["first_offset"], 5);
    assert_eq!(data["last_offset"], 24);
    assert!(
        data["error"]
            .as_str()
            .is_some_and(|text| text.contains(error)),
        "{data}"
    );
    let rest = live.records(after.len()).await;
    assert_values(&rest, &after);

    // A client resuming from before the bad batch is told too, then gets the rest.
    let last_before = first.last().expect("a record").id.clone().expect("an id");
    let mut resumed = SseStream::connect(&url, &[("last-event-id", &last_before)]).await;
    resumed.next().await.expect("prelude");
    let replayed_gap = next_event(&mut resumed).await;
    assert_eq!(replayed_gap, gap);
    assert_values(&resumed.records(after.len()).await, &after);

    // The partition goes on, and the skip was logged once.
    let later = records("snappy", 30, 3);
    produce_with_kcat(&services.brokers, &topic, 0, "snappy", &later);
    assert_values(&live.records(later.len()).await, &later);
    let skips: Vec<String> = consumer
        .log()
        .into_iter()
        .filter(|line| line.contains("skipped records that cannot be read"))
        .collect();
    assert_eq!(skips.len(), 1, "{}", consumer.log().join("\n"));
    assert!(
        skips[0].contains("skipped_total=20")
            && skips[0].contains("first_offset=5")
            && skips[0].contains(error),
        "{}",
        skips[0]
    );
    let loud_repeats = consumer.log().into_iter().filter(|line| {
        line.contains("Decompression") && (line.contains(" WARN ") || line.contains(" ERROR "))
    });
    assert_eq!(loud_repeats.count(), 0, "{}", consumer.log().join("\n"));

    // The skip was committed: the next member of the group starts after the batch.
    consumer.terminate();
    assert_eq!(consumer.wait_exit().await, Some(0));
    let next_member = Process::consumer(&path, &[]);
    let last = records("gzip", 33, 2);
    produce_with_kcat(&services.brokers, &topic, 0, "gzip", &last);
    assert_values(&live.records(last.len()).await, &last);
    assert!(
        !next_member
            .log()
            .iter()
            .any(|line| line.contains("cannot be read")),
        "{}",
        next_member.log().join("\n")
    );
}

/// The Redis bus keeps a skipped-records marker as it keeps a record: once, and counting as
/// published, so that the records it covers are not published after it.
#[tokio::test]
async fn the_redis_bus_publishes_a_skipped_records_marker_once() {
    if skip_without_services() {
        return;
    }
    let services = services();
    let config: RedisConfig = serde_json::from_value(
        serde_json::json!({"url": services.redis_url, "key_prefix": unique("test")}),
    )
    .expect("redis config");
    let bus: Bus = connect_redis(&config).await.expect("redis");
    let endpoint = EndpointName::try_from("events".to_owned()).expect("a name");
    let endpoints = [(endpoint.clone(), Retention::default().into())];
    let mut reader = bus.reader(vec![endpoint]).await.expect("a reader");
    let skipped = SkippedRecords {
        topic: "t".into(),
        partition: 2,
        first_offset: 3,
        last_offset: 7,
        error: "Local: Invalid compressed data".into(),
        reason: SkipReason::UnreadableRecord,
    };
    assert_eq!(
        bus.publish_skipped(&skipped, &endpoints)
            .await
            .expect("publish"),
        Published::Appended
    );
    assert_eq!(
        bus.publish_skipped(&skipped, &endpoints)
            .await
            .expect("publish"),
        Published::Duplicate
    );
    // A key that is not UTF-8 travels as its bytes, for filters to compare.
    let key = [0xff, 0xfe, 0x00, 0x6b];
    let record = |offset| Envelope {
        filter_key: Some(key.to_vec()),
        json: format!("{{\"offset\":{offset}}}").into_bytes(),
        tombstone: false,
    };
    for (offset, expected) in [(7, Published::Duplicate), (8, Published::Appended)] {
        let envelope = record(offset);
        let publication = Publication {
            topic: "t",
            partition: 2,
            offset,
            endpoints: &endpoints,
            envelope: &envelope,
        };
        assert_eq!(bus.publish(publication).await.expect("publish"), expected);
    }
    let mut entries = Vec::new();
    while entries.len() < 2 {
        entries.extend(reader.next_batch().await.expect("read"));
    }
    let (_, marker) = &entries[0];
    assert_eq!(marker.kind, EntryKind::Skipped(skipped.into()));
    assert!(
        matches!(&entries[1].1.kind, EntryKind::Record { filter_key: Some(k), .. } if k[..] == key[..])
    );
    assert_eq!(entries.len(), 2);
}
