//! What the hub's unit tests share: a hub of two endpoints (`drivers`, `orders`) on a memory
//! bus, records published to it and read back as the server's feed does, and readers of
//! what a subscription yields.

use std::ops::Range;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::StreamExt;

use super::{Hub, Interest, Outgoing, Subscription};
use crate::keys::KeySet;
use fjord_bus::envelope::Envelope;
use fjord_bus::memory::MemoryBus;
use fjord_bus::{Bus, BusEntry, BusReader, EntryKind, Publication, StreamId, WireJson};
use fjord_config::{EndpointName, Keeping, Retention, ServerConfig, StartPosition};

pub(super) fn name(name: &str) -> EndpointName {
    EndpointName::try_from(name.to_owned()).expect("valid")
}

pub(super) fn hub_with(
    queue_size: usize,
    bus: MemoryBus,
    start: &[StreamId],
    orders_start: StartPosition,
) -> Arc<Hub> {
    let server = ServerConfig {
        client_queue: queue_size,
        ..ServerConfig::default()
    };
    Arc::new(Hub::new(
        vec![
            (name("drivers"), StartPosition::Live),
            (name("orders"), orders_start),
        ],
        start,
        &server,
        Bus::Memory(bus),
        Arc::default(),
    ))
}

pub(super) fn hub(queue_size: usize) -> Arc<Hub> {
    hub_with(
        queue_size,
        MemoryBus::new(),
        &[StreamId { ms: 5, seq: 0 }, StreamId::ZERO],
        StartPosition::Live,
    )
}

/// A hub fed from a memory bus by `reader`, as the server's feed does.
pub(super) async fn hub_on_memory_bus(
    orders_start: StartPosition,
) -> (MemoryBus, BusReader, Arc<Hub>) {
    let bus = MemoryBus::new();
    let reader = Bus::Memory(bus.clone())
        .reader(vec![name("drivers"), name("orders")])
        .await
        .expect("reader");
    let hub = hub_with(64, bus.clone(), reader.cursors(), orders_start);
    (bus, reader, hub)
}

pub(super) fn entry(ms: u64, key: &str) -> BusEntry {
    BusEntry {
        id: StreamId { ms, seq: 0 },
        previous: StreamId::ZERO,
        kind: EntryKind::Record {
            filter_key: Some(Bytes::copy_from_slice(key.as_bytes())),
            envelope: WireJson::new(Bytes::from(format!("{{\"key\":\"{key}\"}}")))
                .expect("an object"),
        },
    }
}

pub(super) fn live(endpoints: Vec<usize>) -> Interest {
    Interest {
        endpoints,
        keys: None,
        views: Vec::new(),
        encoding: None,
    }
}

/// An interest in the records of `endpoints` with one of `keys`.
pub(super) fn keyed<const N: usize>(endpoints: Vec<usize>, keys: [&str; N]) -> Interest {
    Interest {
        endpoints,
        keys: Some(KeySet::new(keys)),
        views: Vec::new(),
        encoding: None,
    }
}

pub(super) async fn next_text(subscription: &mut Subscription) -> String {
    match subscription.next().await.expect("open") {
        Outgoing::Events(bytes) => String::from_utf8(bytes.to_vec()).expect("utf-8"),
        Outgoing::Unfinished => panic!("no direct writes here"),
    }
}

/// Publishes `count` records of `orders` with keys k0, k1, … to the bus and lets the hub
/// read them, as the server's feed does; returns their ids.
pub(super) async fn publish(
    hub: &Hub,
    bus: &MemoryBus,
    reader: &mut BusReader,
    first_offset: i64,
    count: i64,
    retention: Retention,
) -> Vec<StreamId> {
    let offsets = first_offset..first_offset + count;
    publish_padded(hub, bus, reader, offsets, retention, 0).await
}

/// Publishes `envelope` as record `offset` of partition 0 of the topic `orders`.
pub(super) async fn publish_envelope(
    bus: &MemoryBus,
    endpoints: &[(EndpointName, Keeping)],
    offset: i64,
    envelope: &Envelope,
) {
    Bus::Memory(bus.clone())
        .publish(Publication {
            topic: "orders",
            partition: 0,
            offset,
            endpoints,
            envelope,
        })
        .await
        .expect("memory bus");
}

/// [`publish`] of the records at `offsets`, with `pad` more bytes in each.
pub(super) async fn publish_padded(
    hub: &Hub,
    bus: &MemoryBus,
    reader: &mut BusReader,
    offsets: Range<i64>,
    retention: Retention,
    pad: usize,
) -> Vec<StreamId> {
    let endpoints = [(name("orders"), retention.into())];
    let pad = "x".repeat(pad);
    for offset in offsets {
        let envelope = Envelope {
            filter_key: Some(format!("k{offset}").into_bytes()),
            json: format!("{{\"offset\":{offset},\"pad\":\"{pad}\"}}").into_bytes(),
            tombstone: false,
        };
        publish_envelope(bus, &endpoints, offset, &envelope).await;
    }
    let batch = reader.next_batch().await.expect("memory bus");
    hub.dispatch(&batch);
    batch.iter().map(|(_, entry)| entry.id).collect()
}

pub(super) fn offsets(text: &str) -> Vec<i64> {
    text.lines()
        .filter_map(|line| line.strip_prefix("data: "))
        .filter_map(|data| serde_json::from_str::<serde_json::Value>(data).ok())
        .filter_map(|value| value["offset"].as_i64())
        .collect()
}

pub(super) async fn read_offsets(subscription: &mut Subscription, count: usize) -> Vec<i64> {
    let mut seen = Vec::new();
    while seen.len() < count {
        seen.extend(offsets(&next_text(subscription).await));
    }
    seen
}

/// Reads until `count` records arrived; returns everything read.
pub(super) async fn read_text(subscription: &mut Subscription, count: usize) -> String {
    let mut text = String::new();
    while offsets(&text).len() < count {
        text.push_str(&next_text(subscription).await);
    }
    text
}
