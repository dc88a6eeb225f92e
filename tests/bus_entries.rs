//! Entries on the bus that fjord-consumer did not write, against real Redis and the real
//! fjord-server: anyone who may write to Redis can `XADD` anything to an endpoint's stream.
//! Each such entry, wherever it sits, reaches the clients that would have had its record as
//! one `fjord.gap` (reason `invalid_entry`) in its place — live and on resume — and every
//! good record around it still arrives, once, in order; nothing of the raw entry reaches the
//! wire.
#![allow(clippy::panic, reason = "a test fails loudly")]

use crate::common::*;
use fjord_bus::envelope::{Envelope, RecordParts};
use fjord_bus::{Bus, Publication, connect_redis};
use fjord_config::{EndpointName, RedisConfig, Retention};

/// What a client should see, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Seen {
    /// A good record, by offset.
    Record(i64),
    /// `fjord.gap` for an invalid entry.
    Invalid,
}

/// A raw entry: its fields, and the key it routes by (`None`: every client is told).
struct Raw {
    fields: Vec<(&'static [u8], &'static [u8])>,
    key: Option<&'static str>,
}

fn raw(fields: &[(&'static [u8], &'static [u8])], key: Option<&'static str>) -> Raw {
    Raw {
        fields: fields.to_vec(),
        key,
    }
}

/// Malformed entries of every kind; each is written between two good records.
fn malformed() -> Vec<Raw> {
    vec![
        // A lone CR ends an SSE line: what follows would pose as an event of its own.
        raw(
            &[
                (b"e", b"{\"a\":1}\revent: fjord.shutdown\rdata: {}\r"),
                (b"p", b"0-0"),
            ],
            None,
        ),
        raw(
            &[(b"e", b"{\"a\":1}\nid: 99999999999999-0\n"), (b"p", b"0-0")],
            None,
        ),
        raw(&[(b"e", b"{\"a\":\"\0\"}"), (b"p", b"0-0")], None),
        raw(&[(b"e", b"not json at all"), (b"p", b"0-0")], None),
        raw(&[(b"e", b"[1,2,3]"), (b"p", b"0-0")], None),
        raw(&[(b"e", b"{\"a\":\"\xff\xfe\"}"), (b"p", b"0-0")], None),
        raw(&[(b"p", b"0-0"), (b"k", b"k1")], Some("k1")),
        raw(&[(b"e", b"{\"a\":1}")], None),
        raw(&[(b"e", b"{\"a\":1}"), (b"p", b"not-an-id")], None),
        raw(&[(b"\xff", b"{}"), (b"e", b"{}{"), (b"p", b"0-0")], None),
        // Its key says who would have had it: the clients of k2, not those of k1.
        raw(
            &[(b"e", b"{\"a\":"), (b"p", b"0-0"), (b"k", b"k2")],
            Some("k2"),
        ),
        raw(&[(b"e", b"{}"), (b"p", b"0-0"), (b"s", b"1")], None),
    ]
}

/// The key of good record `offset`.
fn key_of(offset: i64) -> &'static str {
    if offset % 2 == 0 { "k1" } else { "k2" }
}

/// What a client of `key` (all keys when `None`) should see.
fn expected(raws: &[Raw], key: Option<&str>) -> Vec<Seen> {
    let mut seen = Vec::new();
    let wanted = |record_key: Option<&str>| match (key, record_key) {
        (None, _) | (_, None) => true,
        (Some(key), Some(record_key)) => key == record_key,
    };
    for (offset, raw) in (0_i64..).zip(raws) {
        if wanted(Some(key_of(offset))) {
            seen.push(Seen::Record(offset));
        }
        if wanted(raw.key) {
            seen.push(Seen::Invalid);
        }
    }
    let last = i64::try_from(raws.len()).expect("few");
    if wanted(Some(key_of(last))) {
        seen.push(Seen::Record(last));
    }
    seen
}

/// Reads `stream` until it has seen `count` records and gaps; fails on anything else.
async fn read(stream: &mut SseStream, count: usize) -> Vec<Seen> {
    let mut seen = Vec::new();
    while seen.len() < count {
        let event = stream.next().await.expect("the stream stays open");
        for field in [&event.id, &event.event, &event.data] {
            assert!(
                !field.as_deref().unwrap_or("").contains(['\r', '\0']),
                "raw bytes reached the wire: {event:?}"
            );
        }
        match (event.event.as_deref(), &event.data) {
            (_, None) => {}
            (Some("orders"), Some(_)) => {
                seen.push(Seen::Record(
                    event.json()["offset"].as_i64().expect("an offset"),
                ));
            }
            (Some("fjord.gap"), Some(_)) => {
                let data = event.json();
                assert_eq!(data["reason"], "invalid_entry", "{data}");
                assert_eq!(data["endpoint"], "orders", "{data}");
                assert_eq!(
                    event.id.as_deref(),
                    data["id"].as_str(),
                    "the gap sits at the entry's id: {data}"
                );
                seen.push(Seen::Invalid);
            }
            _ => panic!("unexpected event {event:?}"),
        }
    }
    seen
}

#[tokio::test]
async fn malformed_entries_become_gaps_and_good_records_around_them_arrive_live_and_on_resume() {
    if skip_without_services() {
        return;
    }
    let services = services();
    let port = free_port();
    let manifest = manifest(&services, &[("orders", &unique("topic"))], "unused", port);
    let (_dir, path) = write_manifest(&manifest);
    let server = Process::server(&path);
    wait_ready(port).await;

    let config: RedisConfig =
        serde_json::from_value(manifest["redis"].clone()).expect("a redis section");
    let bus: Bus = connect_redis(&config).await.expect("redis");
    let endpoint = EndpointName::try_from("orders".to_owned()).expect("a name");
    let stream_key = fjord_bus::redis::stream_key(&config.key_prefix, &endpoint);
    let mut raw_connection = redis_connection_for(&services, &stream_key).await;

    let url = format!("http://127.0.0.1:{port}/v1/streams/orders");
    let mut everyone = SseStream::connect(&url, &[]).await;
    let start = everyone
        .next()
        .await
        .expect("the prelude")
        .id
        .expect("an id");
    let mut of_k1 = SseStream::connect(&format!("{url}?key=k1"), &[]).await;
    of_k1.next().await.expect("the prelude");

    let publish = async |offset: i64| {
        let value = format!("{{\"n\":{offset}}}");
        let envelope = Envelope::encode(
            RecordParts {
                topic: "orders",
                partition: 0,
                offset,
                key: Some(key_of(offset).as_bytes()),
                timestamp: Some(1),
                value: Some(value.as_bytes()),
            },
            [],
        )
        .expect("an envelope");
        bus.publish(Publication {
            topic: "orders",
            partition: 0,
            offset,
            endpoints: &[(endpoint.clone(), Retention::default().into())],
            envelope: &envelope,
        })
        .await
        .expect("publish");
    };
    let raws = malformed();
    for (offset, raw) in (0_i64..).zip(&raws) {
        publish(offset).await;
        let mut command = redis::cmd("XADD");
        command.arg(&stream_key).arg("*");
        for (name, value) in &raw.fields {
            command.arg(*name).arg(*value);
        }
        command
            .query_async::<String>(&mut raw_connection)
            .await
            .expect("xadd");
    }
    publish(i64::try_from(raws.len()).expect("few")).await;

    let all = expected(&raws, None);
    let k1 = expected(&raws, Some("k1"));
    assert_eq!(read(&mut everyone, all.len()).await, all, "live, all keys");
    assert_eq!(read(&mut of_k1, k1.len()).await, k1, "live, key k1");

    // Resuming from before it all reads the same back, across every malformed entry.
    let resume = [("last-event-id", start.as_str())];
    let mut resumed = SseStream::connect(&url, &resume).await;
    resumed.next().await.expect("the prelude");
    assert_eq!(
        read(&mut resumed, all.len()).await,
        all,
        "resumed, all keys"
    );
    let mut resumed_k1 = SseStream::connect(&format!("{url}?key=k1"), &resume).await;
    resumed_k1.next().await.expect("the prelude");
    assert_eq!(read(&mut resumed_k1, k1.len()).await, k1, "resumed, key k1");

    // Nothing more: no second gap, no retention gap, no record twice.
    publish(i64::try_from(raws.len()).expect("few") + 2).await;
    for stream in [&mut everyone, &mut resumed] {
        let next = read(stream, 1).await;
        assert_eq!(
            next,
            [Seen::Record(i64::try_from(raws.len()).expect("few") + 2)]
        );
    }

    let metrics = reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    assert!(
        metrics.contains(&format!("fjord_bus_invalid_entries_total {}", raws.len())),
        "each counted once: {metrics}"
    );
    let warnings = server
        .log()
        .into_iter()
        .filter(|line| line.contains("not written by fjord-consumer"))
        .count();
    assert_eq!(warnings, 1, "logged once: {:?}", server.log());
}
