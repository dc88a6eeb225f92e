//! End to end through real Kafka and Redis: records produced to Kafka reach SSE clients of
//! every server instance, complete and in order per partition.
#![allow(clippy::panic, reason = "a test fails loudly")]

use crate::common::*;

#[tokio::test]
async fn every_record_reaches_clients_of_two_servers_in_partition_order() {
    if skip_without_services() {
        return;
    }
    let services = services();
    let (orders, drivers) = (unique("orders"), unique("drivers"));
    create_topic(&services.brokers, &orders, 3).await;
    create_topic(&services.brokers, &drivers, 1).await;
    let (port_a, port_b) = (free_port(), free_port());
    let manifest = manifest(
        &services,
        &[("orders", &orders), ("drivers", &drivers)],
        &unique("group"),
        port_a,
    );
    let mut manifest_b = manifest.clone();
    manifest_b["server"]["port"] = port_b.into();
    let (_dir_a, path_a) = write_manifest(&manifest);
    let (_dir_b, path_b) = write_manifest(&manifest_b);

    let _server_a = Process::server(&path_a);
    let _server_b = Process::server(&path_b);
    wait_ready(port_a).await;
    wait_ready(port_b).await;
    let mut client_a =
        SseStream::connect(&format!("http://127.0.0.1:{port_a}/v1/streams/orders"), &[]).await;
    let mut client_b =
        SseStream::connect(&format!("http://127.0.0.1:{port_b}/v1/streams/orders"), &[]).await;
    let mut both = SseStream::connect(
        &format!("http://127.0.0.1:{port_b}/v1/streams?endpoint=orders&endpoint=drivers"),
        &[],
    )
    .await;
    for client in [&mut client_a, &mut client_b, &mut both] {
        assert_eq!(client.status, 200);
        assert_eq!(client.headers["content-type"], "text/event-stream");
        let prelude = client.next().await.expect("prelude");
        assert_eq!(prelude.retry.as_deref(), Some("2000"));
    }
    let _consumer = Process::consumer(&path_a, &[]);

    let mut records = json_records(300, 3, 17);
    // Records that are not JSON, not UTF-8, or have no value or key still arrive.
    records.push(TestRecord {
        partition: 0,
        key: None,
        value: Some(b"plain text".to_vec()),
    });
    records.push(TestRecord {
        partition: 1,
        key: Some(vec![0xff, 0xfe]),
        value: Some(vec![0x00, 0x9f, 0x92, 0x96]),
    });
    records.push(TestRecord {
        partition: 2,
        key: Some(b"gone".to_vec()),
        value: None,
    });
    let produced = produce(&services.brokers, &orders, &records).await;
    let produced_drivers = produce(&services.brokers, &drivers, &json_records(20, 1, 4)).await;

    let events_a = client_a.records(produced.len()).await;
    let events_b = client_b.records(produced.len()).await;
    assert_complete_and_ordered(&events_a, &produced);
    assert_complete_and_ordered(&events_b, &produced);
    // Both instances name each record by the same id, so either can resume it.
    let ids = |events: &[SseEvent]| events.iter().map(|e| e.id.clone()).collect::<Vec<_>>();
    let mut sorted_a = ids(&events_a);
    let mut sorted_b = ids(&events_b);
    sorted_a.sort();
    sorted_b.sort();
    assert_eq!(sorted_a, sorted_b);

    let envelope_of = |events: &[SseEvent], partition: i64, offset: i64| {
        events
            .iter()
            .map(SseEvent::json)
            .find(|e| e["partition"] == partition && e["offset"] == offset)
            .expect("delivered")
    };
    let (p, o) = produced[0];
    let first = envelope_of(&events_a, p.into(), o);
    assert_eq!(first["topic"], orders.as_str());
    assert_eq!(first["key"], "key-0");
    assert_eq!(first["value"], serde_json::json!({"seq": 0}));
    assert!(first["timestamp"].as_i64().expect("timestamp") > 1_700_000_000_000);
    assert_eq!(events_a[0].event.as_deref(), Some("orders"));
    let text = envelope_of(&events_a, produced[300].0.into(), produced[300].1);
    assert_eq!(
        (text["key"].clone(), text["value"].clone()),
        (serde_json::Value::Null, "plain text".into())
    );
    let binary = envelope_of(&events_a, produced[301].0.into(), produced[301].1);
    assert_eq!(binary["key"], serde_json::json!({"base64": "//4="}));
    assert_eq!(binary["value"], serde_json::json!({"base64": "AJ+Slg=="}));
    let tombstone = envelope_of(&events_a, produced[302].0.into(), produced[302].1);
    assert_eq!(tombstone["value"], serde_json::Value::Null);

    // The connection to both endpoints gets both, each in order.
    let events = both.records(produced.len() + produced_drivers.len()).await;
    let (order_events, driver_events): (Vec<_>, Vec<_>) = events
        .into_iter()
        .partition(|e| e.event.as_deref() == Some("orders"));
    assert_complete_and_ordered(&order_events, &produced);
    assert_complete_and_ordered(&driver_events, &produced_drivers);
    assert!(
        driver_events
            .iter()
            .all(|e| e.id.as_deref().is_some_and(|id| id.contains('_'))),
        "a connection of two endpoints carries a position for each in its ids"
    );
}

#[tokio::test]
async fn key_filters_deliver_only_matching_records() {
    if skip_without_services() {
        return;
    }
    let services = services();
    let topic = unique("orders");
    create_topic(&services.brokers, &topic, 2).await;
    let port = free_port();
    let (_dir, path) = write_manifest(&manifest(
        &services,
        &[("orders", &topic)],
        &unique("group"),
        port,
    ));
    let _server = Process::server(&path);
    wait_ready(port).await;
    let mut keyed = SseStream::connect(
        &format!("http://127.0.0.1:{port}/v1/streams/orders?key=key-1&key=key-3"),
        &[],
    )
    .await;
    keyed.next().await.expect("prelude");
    let _consumer = Process::consumer(&path, &[]);

    let records = json_records(100, 2, 5);
    let produced = produce(&services.brokers, &topic, &records).await;
    let expected: Vec<(i32, i64)> = records
        .iter()
        .zip(&produced)
        .filter(|(record, _)| matches!(record.key.as_deref(), Some(b"key-1" | b"key-3")))
        .map(|(_, placed)| *placed)
        .collect();
    assert_eq!(expected.len(), 40);
    let events = keyed.records(expected.len()).await;
    assert_complete_and_ordered(&events, &expected);
}

#[tokio::test]
async fn value_filters_and_field_lists_narrow_what_clients_get() {
    if skip_without_services() {
        return;
    }
    let services = services();
    let topic = unique("orders");
    create_topic(&services.brokers, &topic, 2).await;
    // The manifest's filter applies to every stream of the endpoint.
    let server = ServerStart::new()
        .endpoints(&[("orders", &topic)])
        .start(|manifest| {
            manifest["endpoints"]["orders"]["filter"] = r#"value.status != "draft""#.into();
        })
        .await;
    let stream = |query: &str| server.url(&format!("/v1/streams/orders?{query}"));

    let refusal = reqwest::get(stream("filter=value.total_cents+%3E%3D"))
        .await
        .expect("an answer");
    assert_eq!(refusal.status(), 400);
    let body: serde_json::Value = refusal.json().await.expect("JSON");
    assert_eq!(body["error"]["code"], "bad_filter");
    assert_eq!(body["error"]["column"], 21, "{body}");

    let mut filtered = SseStream::connect(
        &stream("filter=value.status+%3D%3D+%22placed%22+%26%26+value.total_cents+%3E%3D+1000&fields=id,total_cents"),
        &[],
    )
    .await;
    let mut everything = SseStream::connect(&stream(""), &[]).await;
    for client in [&mut filtered, &mut everything] {
        assert_eq!(client.status, 200);
        client.next().await.expect("prelude");
    }
    let _consumer = Process::consumer(&server.path, &[]);

    let status = |n: usize| ["placed", "paid", "draft"][n % 3];
    let records: Vec<TestRecord> = (0..90)
        .map(|n| TestRecord {
            partition: i32::try_from(n % 2).expect("small"),
            key: Some(format!("order-{n}").into_bytes()),
            value: Some(
                serde_json::json!({"id": n, "status": status(n), "total_cents": n * 30, "items": ["tea"]})
                    .to_string()
                    .into_bytes(),
            ),
        })
        .collect();
    let produced = produce(&services.brokers, &topic, &records).await;
    let placed: Vec<(i32, i64)> = (0..90)
        .zip(&produced)
        .filter(|(n, _)| status(*n) == "placed" && n * 30 >= 1000)
        .map(|(_, placed)| *placed)
        .collect();
    let not_draft: Vec<(i32, i64)> = (0..90)
        .zip(&produced)
        .filter(|(n, _)| status(*n) != "draft")
        .map(|(_, placed)| *placed)
        .collect();
    assert_eq!(placed.len(), 18);
    let events = filtered.records(placed.len()).await;
    assert_complete_and_ordered(&events, &placed);
    for event in &events {
        let value = &event.json()["value"];
        let n = value["id"].as_u64().expect("an id");
        assert_eq!(value, &serde_json::json!({"id": n, "total_cents": n * 30}));
    }
    let events = everything.records(not_draft.len()).await;
    assert_complete_and_ordered(&events, &not_draft);
}

/// Reads a table endpoint's snapshot from `stream`, after its prelude: the rows, as
/// (key, value), and the id of `fjord.snapshot_end`.
async fn snapshot(stream: &mut SseStream) -> (Vec<(String, serde_json::Value)>, String) {
    let mut rows = Vec::new();
    let mut started = false;
    loop {
        let event = stream.next().await.expect("an open stream");
        match event.event.as_deref() {
            Some("fjord.snapshot_start") => {
                assert_eq!(event.json()["endpoint"], "drivers");
                started = true;
            }
            Some("fjord.snapshot_end") => {
                assert!(started, "rows only within a snapshot");
                return (rows, event.id.expect("the id live records go on from"));
            }
            Some("drivers") => {
                assert!(
                    started && event.id.is_none(),
                    "a row, without id: {event:?}"
                );
                let envelope = event.json();
                rows.push((
                    envelope["key"].as_str().expect("a text key").to_owned(),
                    envelope["value"].clone(),
                ));
            }
            Some(other) => panic!("unexpected {other}: {event:?}"),
            None => {}
        }
    }
}

#[tokio::test]
async fn a_table_endpoint_sends_its_rows_then_what_changes() {
    if skip_without_services() {
        return;
    }
    let services = services();
    let topic = unique("drivers");
    create_topic(&services.brokers, &topic, 2).await;
    let server = ServerStart::new()
        .endpoints(&[("drivers", &topic)])
        .start(|manifest| {
            manifest["endpoints"]["drivers"]["mode"] = "table".into();
        })
        .await;
    let stream = |query: &str| server.url(&format!("/v1/streams/drivers?{query}"));
    let position = |driver: usize, round: usize| serde_json::json!({"driver": driver, "lat": 59.0 + driver as f64 / 10.0, "round": round});
    let record = |driver: usize, value: Option<serde_json::Value>| TestRecord {
        partition: i32::try_from(driver % 2).expect("small"),
        key: Some(format!("driver-{driver}").into_bytes()),
        value: value.map(|value| value.to_string().into_bytes()),
    };
    // Three rounds of ten drivers, then driver 3 goes off shift (a tombstone), and a record
    // without a key, which streams but is no row.
    let mut records: Vec<TestRecord> = (0..3)
        .flat_map(|round| (0..10).map(move |driver| (driver, round)))
        .map(|(driver, round)| record(driver, Some(position(driver, round))))
        .collect();
    records.push(record(3, None));
    records.push(TestRecord {
        partition: 0,
        key: None,
        value: Some(b"{\"note\":\"no key\"}".to_vec()),
    });
    let mut log = SseStream::connect(&stream(""), &[]).await;
    assert_eq!(log.status, 200);
    let _consumer = Process::consumer(&server.path, &[]);
    produce(&services.brokers, &topic, &records).await;
    // Everything is on the bus once a connection from before has had it all.
    log.records(2 + records.len()).await;

    let expected: Vec<(String, serde_json::Value)> = [0, 1, 2, 4, 5, 6, 7, 8, 9]
        .into_iter()
        .map(|driver| (format!("driver-{driver}"), position(driver, 2)))
        .collect();
    let mut table = SseStream::connect(&stream(""), &[]).await;
    assert_eq!(
        table.next().await.expect("prelude").id.as_deref(),
        Some("0-0")
    );
    let (rows, end) = snapshot(&mut table).await;
    assert_eq!(rows, expected, "the last record per key, in key order");

    // Keys, filters and fields narrow the rows as they narrow records.
    let mut narrowed = SseStream::connect(
        &stream("key=driver-1&key=driver-3&key=driver-7&filter=value.lat+%3C+59.5&fields=lat"),
        &[],
    )
    .await;
    assert_eq!(narrowed.status, 200);
    narrowed.next().await.expect("prelude");
    let (rows, _) = snapshot(&mut narrowed).await;
    assert_eq!(
        rows,
        [("driver-1".to_owned(), serde_json::json!({"lat": 59.1}))]
    );

    // What changes next arrives live, with ids: an update, and a delete.
    let changes = produce(
        &services.brokers,
        &topic,
        &[record(1, Some(position(1, 3))), record(2, None)],
    )
    .await;
    let live = table.records(2).await;
    assert_complete_and_ordered(&live, &changes);
    assert!(live.iter().all(|event| event.id.is_some()));
    // The two changes are on different partitions, so either may come first.
    let value_of = |key: &str| {
        live.iter()
            .map(SseEvent::json)
            .find(|envelope| envelope["key"] == key)
            .unwrap_or_else(|| panic!("no live record for {key}: {live:?}"))["value"]
            .clone()
    };
    assert_eq!(value_of("driver-1"), position(1, 3), "an update");
    assert_eq!(value_of("driver-2"), serde_json::Value::Null, "a delete");
    let narrowed_live = narrowed.records(1).await;
    assert_eq!(
        narrowed_live[0].json()["value"],
        serde_json::json!({"lat": 59.1})
    );

    // Resumed from the snapshot's end: those changes, and no snapshot.
    let mut resumed = SseStream::connect(&stream(""), &[("last-event-id", &end)]).await;
    resumed.next().await.expect("prelude");
    let replayed = resumed.records(2).await;
    assert!(
        replayed
            .iter()
            .all(|event| event.event.as_deref() == Some("drivers"))
    );
    assert_complete_and_ordered(&replayed, &changes);
    // A new connection's snapshot has them.
    let mut later = SseStream::connect(&stream(""), &[]).await;
    later.next().await.expect("prelude");
    let (rows, _) = snapshot(&mut later).await;
    let mut now = expected.clone();
    now.retain(|(key, _)| key != "driver-2");
    now[1].1 = position(1, 3);
    assert_eq!(rows, now);

    // Each live delivery's latency is counted, from Kafka and from the bus; rows and
    // replayed records are not live. The first stream had 34 records, the table's 2, the
    // narrowed one 1.
    for since in ["kafka", "bus"] {
        let count = format!(
            "fjord_delivery_latency_seconds_count{{endpoint=\"drivers\",since=\"{since}\"}}"
        );
        wait_until_async("the deliveries counted", || async {
            server.metric(&count).await == 37.0
        })
        .await;
    }
}

#[tokio::test]
async fn two_members_split_the_partitions_and_lose_nothing() {
    if skip_without_services() {
        return;
    }
    let services = services();
    let topic = unique("orders");
    create_topic(&services.brokers, &topic, 4).await;
    let port = free_port();
    let group = unique("group");
    let (_dir, path) = write_manifest(&manifest(&services, &[("orders", &topic)], &group, port));
    let _server = Process::server(&path);
    wait_ready(port).await;
    // Resumes when the server sheds it while the test is busy elsewhere.
    let client = ResumingClient::start(vec![format!("http://127.0.0.1:{port}/v1/streams/orders")]);
    wait_until("the client is connected", || client.connections() == 1).await;

    let first = Process::consumer(&path, &[]);
    first.wait_for_log(&["partitions assigned", &topic]).await;
    // Records on their way while the group rebalances: the first member's publishes of the
    // partitions it gives up are waited for and committed before the second takes them.
    let early = produce(&services.brokers, &topic, &json_records(2000, 4, 9)).await;
    let second = Process::consumer(&path, &[]);
    // After the second member joins, the group rebalances: each member ends up with a
    // non-empty share, and the shares are disjoint.
    let assigned = |process: &Process| -> Option<Vec<String>> {
        let line = process
            .log()
            .into_iter()
            .rev()
            .find(|line| line.contains("partitions assigned"))?;
        let list = line
            .split("partitions=")
            .nth(1)?
            .split_whitespace()
            .next()?
            .to_owned();
        Some(
            list.split(',')
                .filter(|p| !p.is_empty())
                .map(str::to_owned)
                .collect(),
        )
    };
    second.wait_for_log(&["partitions assigned", &topic]).await;
    let deadline = std::time::Instant::now() + PATIENCE;
    let (share_1, share_2) = loop {
        let (one, two) = (
            assigned(&first).unwrap_or_default(),
            assigned(&second).unwrap_or_default(),
        );
        if !one.is_empty()
            && !two.is_empty()
            && one.len() + two.len() == 4
            && one.iter().all(|p| !two.contains(p))
        {
            break (one, two);
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no split: {one:?} {two:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert_eq!(share_1.len() + share_2.len(), 4);

    first
        .wait_for_log(&["publishes of revoked partitions settled"])
        .await;
    let mut produced = early;
    produced.extend(produce(&services.brokers, &topic, &json_records(400, 4, 9)).await);
    let events = client.wait_for_records(produced.len()).await;
    assert_complete_and_ordered(&events, &produced);
}

async fn scram_member_delivers(mechanism: &str) {
    let services = services();
    let topic = unique("secure");
    create_topic(&services.brokers, &topic, 1).await;
    let port = free_port();
    let mut manifest = manifest(&services, &[("secure", &topic)], &unique("group"), port);
    manifest["kafka"] = serde_json::json!({
        "brokers": [services.sasl_brokers],
        "security": {
            "protocol": mechanism,
            "username": services.scram_user,
            "password_env": "TEST_KAFKA_PASSWORD",
            "tls": false
        }
    });
    let (_dir, path) = write_manifest(&manifest);
    let _server = Process::server(&path);
    wait_ready(port).await;
    let mut client =
        SseStream::connect(&format!("http://127.0.0.1:{port}/v1/streams/secure"), &[]).await;
    client.next().await.expect("prelude");
    let consumer = Process::consumer(&path, &[("TEST_KAFKA_PASSWORD", &services.scram_password)]);
    let produced = produce(&services.brokers, &topic, &json_records(10, 1, 2)).await;
    let events = client.records(produced.len()).await;
    assert_complete_and_ordered(&events, &produced);
    assert!(
        consumer
            .log()
            .iter()
            .all(|line| !line.contains(&services.scram_password)),
        "the password is never logged"
    );

    let mut refused = Process::consumer(&path, &[("TEST_KAFKA_PASSWORD", "wrong-password")]);
    let code = refused.wait_exit().await;
    assert_ne!(code, Some(0));
    let log = refused.log().join("\n");
    assert!(log.to_lowercase().contains("authentication"), "{log}");
    assert!(!log.contains("wrong-password"), "{log}");
}

#[tokio::test]
async fn sasl_scram_sha_256_member_authenticates() {
    if skip_without_services() {
        return;
    }
    scram_member_delivers("sasl_scram_sha_256").await;
}

#[tokio::test]
async fn sasl_scram_sha_512_member_authenticates() {
    if skip_without_services() {
        return;
    }
    scram_member_delivers("sasl_scram_sha_512").await;
}

#[tokio::test]
async fn a_missing_password_variable_is_named() {
    if skip_without_services() {
        return;
    }
    let services = services();
    let port = free_port();
    let mut manifest = manifest(
        &services,
        &[("secure", "unused-topic")],
        &unique("group"),
        port,
    );
    manifest["kafka"]["security"] = serde_json::json!({
        "protocol": "sasl_plain", "username": "u", "password_env": "FJORD_TEST_UNSET_PASSWORD"
    });
    let (_dir, path) = write_manifest(&manifest);
    let mut consumer = Process::consumer(&path, &[]);
    assert_ne!(consumer.wait_exit().await, Some(0));
    assert!(
        consumer
            .log()
            .join("\n")
            .contains("FJORD_TEST_UNSET_PASSWORD")
    );
}

#[tokio::test]
async fn compressed_streams_decode_as_each_event_arrives_and_end_with_a_valid_trailer() {
    if skip_without_services() {
        return;
    }
    let services = services();
    let topic = unique("orders");
    create_topic(&services.brokers, &topic, 2).await;
    let server = ServerStart::new()
        .endpoints(&[("orders", &topic)])
        .start(|manifest| {
            manifest["server"]["compression"] = true.into();
        })
        .await;
    let url = server.url("/v1/streams/orders");
    let mut gzip = SseStream::connect(&url, &[("accept-encoding", "gzip, deflate, br")]).await;
    let mut deflate = SseStream::connect(&url, &[("accept-encoding", "deflate")]).await;
    let mut plain = SseStream::connect(&url, &[]).await;
    let mut declined = SseStream::connect(&url, &[("accept-encoding", "gzip;q=0, br")]).await;
    assert_eq!(gzip.headers["content-encoding"], "gzip");
    assert_eq!(deflate.headers["content-encoding"], "deflate");
    for stream in [&gzip, &deflate, &plain, &declined] {
        assert_eq!(stream.headers["vary"], "accept-encoding");
    }
    for stream in [&plain, &declined] {
        assert!(stream.headers.get("content-encoding").is_none());
    }
    let _consumer = Process::consumer(&server.path, &[]);
    let order = |n: usize| {
        TestRecord {
        partition: i32::try_from(n % 2).expect("small"),
        key: Some(format!("order-{n}").into_bytes()),
        value: Some(
            serde_json::json!({"id": n, "status": "placed", "total_cents": 1250 + n, "items": ["tea", "cake"]})
                .to_string()
                .into_bytes(),
        ),
    }
    };
    // One record at a time, each read before the next is produced: every event decodes as
    // it arrives, not when later bytes push it out.
    for n in 0..3 {
        let produced = produce(&services.brokers, &topic, &[order(n)]).await;
        for stream in [&mut gzip, &mut deflate, &mut plain, &mut declined] {
            assert_complete_and_ordered(&stream.records(1).await, &produced);
        }
    }
    // A burst, coalesced into larger writes: the same events on every stream, in one order.
    let burst: Vec<TestRecord> = (3..203).map(order).collect();
    let produced = produce(&services.brokers, &topic, &burst).await;
    let plain_burst = plain.records(burst.len()).await;
    assert_complete_and_ordered(&plain_burst, &produced);
    for stream in [&mut gzip, &mut deflate, &mut declined] {
        assert_eq!(stream.records(burst.len()).await, plain_burst);
    }

    // Drained, a compressed stream ends with its coding's trailer: the whole body decodes,
    // checksum checked, to the same events.
    server.process.terminate();
    for stream in [&mut gzip, &mut deflate] {
        let shutdown = stream.next().await.expect("the shutdown notice");
        assert_eq!(shutdown.event.as_deref(), Some("fjord.shutdown"));
        assert!(stream.next().await.is_none(), "the stream ends");
    }
    for (stream, encoding) in [(&gzip, "gzip"), (&deflate, "deflate")] {
        let body = stream.compressed_body().expect("compressed");
        let mut text = String::new();
        let decoded = match encoding {
            "gzip" => {
                std::io::Read::read_to_string(&mut flate2::read::GzDecoder::new(body), &mut text)
            }
            _ => {
                std::io::Read::read_to_string(&mut flate2::read::ZlibDecoder::new(body), &mut text)
            }
        };
        decoded.unwrap_or_else(|error| panic!("{encoding}: {error}"));
        assert_eq!(text.matches("\nevent: orders\n").count(), 203, "{encoding}");
        assert!(
            text.ends_with(
                "event: fjord.shutdown\ndata: {\"reason\":\"server shutting down; reconnect\"}\n\n"
            ),
            "{encoding}: {text}"
        );
    }
}
