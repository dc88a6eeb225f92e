//! Tests of views through the hub: filters and field lists from the query, the token and
//! the manifest, live, on resume, with keys, and what they cost per record.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use serde_json::{Value, json};

use super::testing::{name, next_text, publish_envelope};
use super::{Hub, HubEndpoint, NoRoom, Subscription};
use crate::auth::Grant;
use crate::request::parse_stream_request;
use fjord_bus::envelope::{Envelope, RecordParts};
use fjord_bus::memory::MemoryBus;
use fjord_bus::{Bus, BusReader, SkipReason, SkippedRecords, StreamId};
use fjord_config::{Keeping, Retention, ServerConfig, StartPosition, TableBounds};
use fjord_filter::{Filter, Limits};

/// A hub of `orders` on a memory bus, whose manifest pins `filter` on it, and its reader.
async fn orders_hub(
    filter: Option<&str>,
    server: &ServerConfig,
) -> (MemoryBus, BusReader, Arc<Hub>) {
    orders_hub_of(filter, false, server).await
}

/// [`orders_hub`], of a table endpoint when `table`.
async fn orders_hub_of(
    filter: Option<&str>,
    table: bool,
    server: &ServerConfig,
) -> (MemoryBus, BusReader, Arc<Hub>) {
    let bus = MemoryBus::new();
    let reader = Bus::Memory(bus.clone())
        .reader(vec![name("orders")])
        .await
        .expect("reader");
    let endpoint = HubEndpoint {
        name: name("orders"),
        start: StartPosition::Live,
        filter: filter.map(|source| Filter::compile(source, &Limits::default()).expect("a filter")),
        table,
    };
    let hub = Arc::new(Hub::new(
        [endpoint],
        reader.cursors(),
        server,
        Bus::Memory(bus.clone()),
        Arc::default(),
    ));
    (bus, reader, hub)
}

/// Publishes the orders `values` (offsets from `first`, keys `k{offset}`) and lets the hub
/// read them in one batch; returns their ids.
async fn publish(
    hub: &Hub,
    bus: &MemoryBus,
    reader: &mut BusReader,
    first: i64,
    values: &[Value],
) -> Vec<StreamId> {
    let keeping = Keeping {
        retention: Retention::default(),
        table: hub.is_table(0).then(TableBounds::default),
    };
    let endpoints = [(name("orders"), keeping)];
    for (offset, value) in (first..).zip(values) {
        let key = format!("k{offset}");
        let value = value.to_string();
        let envelope = Envelope::encode(
            RecordParts {
                topic: "orders",
                partition: 0,
                offset,
                key: Some(key.as_bytes()),
                timestamp: None,
                value: Some(value.as_bytes()),
            },
            [],
        )
        .expect("encodes");
        publish_envelope(bus, &endpoints, offset, &envelope).await;
    }
    let batch = reader.next_batch().await.expect("memory bus");
    hub.dispatch(&batch);
    batch.iter().map(|(_, entry)| entry.id).collect()
}

/// A connection to `orders` with `query`, as `grant` allows, resuming after `resume`.
fn subscribe(hub: &Arc<Hub>, grant: &Grant, query: &str, resume: Option<&str>) -> Subscription {
    let request = parse_stream_request(hub, grant, Some("orders"), query, resume).expect("valid");
    hub.subscribe(request.interest, request.resume.as_ref(), None)
}

/// The data of the events in `text`.
fn data(text: &str) -> Vec<Value> {
    text.lines()
        .filter_map(|line| line.strip_prefix("data: "))
        .map(|data| serde_json::from_str(data).expect("JSON"))
        .collect()
}

/// Reads `subscription` until `count` events arrived; returns their data.
async fn read(subscription: &mut Subscription, count: usize) -> Vec<Value> {
    let mut events = Vec::new();
    while events.len() < count {
        events.extend(data(&next_text(subscription).await));
    }
    events
}

fn offsets(events: &[Value]) -> Vec<i64> {
    events
        .iter()
        .filter_map(|event| event["offset"].as_i64())
        .collect()
}

fn totals() -> Vec<Value> {
    [5, 10, 20, 1]
        .map(|total| json!({"id": format!("o{total}"), "total": total, "status": "placed"}))
        .to_vec()
}

#[tokio::test]
async fn filters_and_fields_narrow_live_records_decided_once_per_distinct_view() {
    let (bus, mut reader, hub) = orders_hub(None, &ServerConfig::default()).await;
    let everything = Grant::everything();
    let mut filtered: Vec<_> = [
        "filter=value.total+%3E%3D+10",
        // The same filter, spelled otherwise: the same view.
        "filter=(value.total>=10)",
        "filter=value.total%20>=%2010",
    ]
    .iter()
    .map(|query| subscribe(&hub, &everything, query, None))
    .collect();
    let mut projected = subscribe(&hub, &everything, "filter=value.total>=10&fields=id", None);
    let mut whole = subscribe(&hub, &everything, "", None);
    for subscription in filtered.iter_mut().chain([&mut projected, &mut whole]) {
        next_text(subscription).await;
    }

    publish(&hub, &bus, &mut reader, 0, &totals()).await;

    for subscription in &mut filtered {
        let events = read(subscription, 2).await;
        assert_eq!(offsets(&events), vec![1, 2]);
        assert_eq!(events[0]["value"], totals()[1], "the whole value");
    }
    let events = read(&mut projected, 2).await;
    assert_eq!(offsets(&events), vec![1, 2]);
    assert_eq!(events[0]["value"], json!({"id": "o10"}));
    assert_eq!(
        events[1]["key"], "k2",
        "the envelope besides the value is kept"
    );
    assert_eq!(offsets(&read(&mut whole, 4).await), vec![0, 1, 2, 3]);
    // Four records, two distinct views (the three filters are one): eight decisions, not
    // one per connection.
    assert_eq!(hub.metrics().filter_evaluations.load(Relaxed), 8);
    assert_eq!(hub.metrics().events_out.load(Relaxed), 3 * 2 + 2 + 4);
    drop((filtered, projected, whole));
    assert!(hub.index.is_empty());
}

#[tokio::test]
async fn gaps_reach_filtered_connections_and_resumes_are_filtered_and_projected() {
    let (bus, mut reader, hub) = orders_hub(None, &ServerConfig::default()).await;
    let everything = Grant::everything();
    let query = "filter=value.total<10&fields=total";
    let mut live = subscribe(&hub, &everything, query, None);
    next_text(&mut live).await;
    let ids = publish(&hub, &bus, &mut reader, 0, &totals()).await;
    let skipped = SkippedRecords {
        topic: "orders".into(),
        partition: 0,
        first_offset: 4,
        last_offset: 4,
        error: "not Avro".into(),
        reason: SkipReason::UndecodableRecord,
    };
    Bus::Memory(bus.clone())
        .publish_skipped(&skipped, &[(name("orders"), Retention::default().into())])
        .await
        .expect("memory bus");
    hub.dispatch(&reader.next_batch().await.expect("memory bus"));

    let events = read(&mut live, 3).await;
    assert_eq!(offsets(&events), vec![0, 3]);
    assert_eq!(events[0]["value"], json!({"total": 5}));
    assert_eq!(events[2]["reason"], "undecodable_record", "{events:?}");

    // Resuming from the first record replays the rest through the same view.
    let first = ids[0].to_string();
    let mut resumed = subscribe(&hub, &everything, query, Some(&first));
    next_text(&mut resumed).await;
    let events = read(&mut resumed, 2).await;
    assert_eq!(offsets(&events), vec![3]);
    assert_eq!(events[0]["value"], json!({"total": 1}));
    assert_eq!(events[1]["reason"], "undecodable_record", "{events:?}");
}

#[tokio::test]
async fn keys_and_filters_narrow_together() {
    let (bus, mut reader, hub) = orders_hub(None, &ServerConfig::default()).await;
    let everything = Grant::everything();
    let mut keyed = subscribe(
        &hub,
        &everything,
        "key=k1&key=k2&key=k3&filter=value.total<15",
        None,
    );
    next_text(&mut keyed).await;
    publish(&hub, &bus, &mut reader, 0, &totals()).await;
    assert_eq!(offsets(&read(&mut keyed, 2).await), vec![1, 3]);
}

#[tokio::test]
async fn the_token_s_and_the_manifest_s_filters_are_anded_with_the_query_s() {
    let (bus, mut reader, hub) = orders_hub(
        Some(r#"value.status == "placed""#),
        &ServerConfig::default(),
    )
    .await;
    let pinned = Grant {
        filters: BTreeMap::from([(
            "orders".to_owned(),
            Filter::compile("value.total >= 5", &Limits::default()).expect("a filter"),
        )]),
        ..Grant::everything()
    };
    let mut narrowed = subscribe(&hub, &pinned, "filter=value.total<=10", None);
    // Asking for more than the token allows gets no more.
    let mut widened = subscribe(&hub, &pinned, "filter=value.total>=0||true", None);
    let mut plain = subscribe(&hub, &pinned, "", None);
    let mut anyone = subscribe(&hub, &Grant::everything(), "", None);
    for subscription in [&mut narrowed, &mut widened, &mut plain, &mut anyone] {
        next_text(subscription).await;
    }
    let mut values = totals();
    values.push(json!({"id": "draft", "total": 50, "status": "draft"}));
    publish(&hub, &bus, &mut reader, 0, &values).await;
    assert_eq!(offsets(&read(&mut narrowed, 2).await), vec![0, 1]);
    assert_eq!(offsets(&read(&mut widened, 3).await), vec![0, 1, 2]);
    assert_eq!(offsets(&read(&mut plain, 3).await), vec![0, 1, 2]);
    assert_eq!(
        offsets(&read(&mut anyone, 4).await),
        vec![0, 1, 2, 3],
        "the manifest's filter applies to every connection"
    );
}

#[tokio::test]
async fn a_new_view_past_the_limit_is_refused_and_a_shared_one_is_not() {
    let server = ServerConfig {
        max_distinct_filters: 1,
        ..ServerConfig::default()
    };
    let (_bus, _reader, hub) = orders_hub(None, &server).await;
    let everything = Grant::everything();
    let first = subscribe(&hub, &everything, "filter=value.total>1", None);
    let _same = subscribe(&hub, &everything, "filter=value.total > 1", None);
    let _unfiltered = subscribe(&hub, &everything, "", None);
    let other =
        parse_stream_request(&hub, &everything, Some("orders"), "fields=id", None).expect("valid");
    let refused = hub.try_subscribe(other.interest.clone(), None, None);
    assert!(matches!(refused, Err(NoRoom::Views(_))), "{refused:?}");
    assert_eq!(hub.metrics().refused_filters.load(Relaxed), 1);
    drop(first);
    drop(_same);
    hub.try_subscribe(other.interest, None, None)
        .expect("the first view was let go");
}

#[tokio::test]
async fn a_filtered_connection_resumes_after_the_last_record_it_was_sent() {
    // Its id moves only with what it is sent: resuming replays what came after through the
    // filter again, and nothing twice.
    let (bus, mut reader, hub) = orders_hub(None, &ServerConfig::default()).await;
    let everything = Grant::everything();
    let mut live = subscribe(&hub, &everything, "filter=value.total>=10", None);
    next_text(&mut live).await;
    let ids = publish(&hub, &bus, &mut reader, 0, &totals()).await;
    assert_eq!(offsets(&read(&mut live, 2).await), vec![1, 2]);
    let after = ids[1].to_string();
    let mut resumed = subscribe(&hub, &everything, "filter=value.total>=10", Some(&after));
    next_text(&mut resumed).await;
    publish(&hub, &bus, &mut reader, 4, &[json!({"total": 99})]).await;
    assert_eq!(offsets(&read(&mut resumed, 2).await), vec![2, 4]);
}

#[tokio::test]
async fn a_table_s_snapshot_holds_only_the_rows_the_manifest_the_token_and_the_query_let_through() {
    let (bus, mut reader, hub) = orders_hub_of(
        Some(r#"value.status != "draft""#),
        true,
        &ServerConfig::default(),
    )
    .await;
    let values = [
        (5, "placed"),
        (10, "placed"),
        (20, "draft"),
        (1, "placed"),
        (30, "placed"),
    ]
    .map(|(total, status)| json!({"id": format!("o{total}"), "total": total, "status": status}));
    publish(&hub, &bus, &mut reader, 0, &values).await;
    let pinned = Grant {
        filters: BTreeMap::from([(
            "orders".to_owned(),
            Filter::compile("value.total >= 5", &Limits::default()).expect("a filter"),
        )]),
        ..Grant::everything()
    };
    // The query cannot widen what the token and the manifest let through.
    let mut client = subscribe(&hub, &pinned, "filter=true&fields=id", None);
    let mut text = String::new();
    while !text.contains("event: fjord.snapshot_end") {
        text.push_str(&next_text(&mut client).await);
    }
    assert!(text.contains("event: fjord.snapshot_start"), "{text}");
    let rows: Vec<Value> = data(&text)
        .into_iter()
        .filter(|event| event.get("offset").is_some())
        .collect();
    assert_eq!(
        offsets(&rows),
        vec![0, 1, 4],
        "keys k0, k1, k4 in key order"
    );
    assert!(rows.iter().all(|row| {
        row["value"]
            .as_object()
            .is_some_and(|value| value.len() == 1)
    }));
    let row_blocks = text
        .split("\n\n")
        .filter(|block| block.contains("event: orders\n"));
    for block in row_blocks {
        assert!(!block.contains("id: "), "a row carries no id: {block}");
    }
}
