//! `fjord dev`, the real binary with its in-process Kafka, bus and demo producer: a client
//! that keeps dropping its connection and resuming with `Last-Event-ID` loses nothing, on the
//! stream endpoint `orders` and the table endpoint `drivers` alike.
#![allow(clippy::unwrap_used, clippy::panic, reason = "a test fails loudly")]

use std::collections::BTreeMap;
use std::time::Duration;

use crate::common::*;

#[tokio::test]
async fn a_hundred_drop_and_resume_cycles_lose_nothing() {
    let port = free_port();
    let port_text = port.to_string();
    let _dev = Process::start(
        &workspace_binary("fjord"),
        &["dev", "--host", "127.0.0.1", "--port", &port_text],
        &[],
    );
    wait_ready(port).await;
    let url = format!("http://127.0.0.1:{port}/v1/streams?endpoint=drivers&endpoint=orders");
    // The last offset seen per (topic, partition).
    let mut last_offsets: BTreeMap<(String, i64), i64> = BTreeMap::new();
    // Per partition of `drivers`, the newest row of the last snapshot: the first record
    // after it is newer (rows of keys that changed while it was read come as records).
    let mut snapshot_floor: BTreeMap<(String, i64), i64> = BTreeMap::new();
    let mut in_snapshot = false;
    let mut snapshots = 0;
    let mut last_id: Option<String> = None;
    let mut records = 0;
    for cycle in 0..100 {
        let headers: Vec<(&str, &str)> = last_id
            .as_deref()
            .map(|id| ("last-event-id", id))
            .into_iter()
            .collect();
        let mut stream = SseStream::connect(&url, &headers).await;
        assert_eq!(stream.status, 200);
        let mut got = 0;
        while got < 3 {
            let event = stream.next().await.expect("an open stream");
            if let Some(id) = &event.id {
                last_id = Some(id.clone());
            }
            match event.event.as_deref() {
                Some("fjord.snapshot_start") => {
                    assert!(!in_snapshot, "cycle {cycle}: one snapshot at a time");
                    in_snapshot = true;
                    snapshots += 1;
                    snapshot_floor.clear();
                    last_offsets.retain(|(topic, _), _| topic != "drivers");
                }
                Some("fjord.snapshot_end") => {
                    assert!(
                        in_snapshot && event.id.is_some(),
                        "cycle {cycle}: {event:?}"
                    );
                    in_snapshot = false;
                }
                Some("drivers") if in_snapshot => {
                    assert!(event.id.is_none(), "a row has no id: {event:?}");
                    let envelope = event.json();
                    let partition = (
                        "drivers".to_owned(),
                        envelope["partition"].as_i64().unwrap(),
                    );
                    let offset = envelope["offset"].as_i64().unwrap();
                    let floor = snapshot_floor.entry(partition).or_insert(offset);
                    *floor = (*floor).max(offset);
                }
                Some("orders" | "drivers") => {
                    let envelope = event.json();
                    let partition = (
                        envelope["topic"].as_str().unwrap().to_owned(),
                        envelope["partition"].as_i64().unwrap(),
                    );
                    let offset = envelope["offset"].as_i64().unwrap();
                    if let Some(floor) = snapshot_floor.remove(&partition) {
                        assert!(
                            offset > floor,
                            "cycle {cycle}: {partition:?}: {offset} after a snapshot up to {floor}"
                        );
                    }
                    if let Some(previous) = last_offsets.insert(partition.clone(), offset) {
                        assert_eq!(
                            offset,
                            previous + 1,
                            "cycle {cycle}: {partition:?} went from {previous} to {offset} without fjord.gap"
                        );
                    }
                    got += 1;
                    records += 1;
                }
                Some(other) => panic!("cycle {cycle}: unexpected {other}: {event:?}"),
                None => {}
            }
        }
        drop(stream);
        // Dropped within a snapshot, it starts another when it comes back.
        in_snapshot = false;
        tokio::time::sleep(Duration::from_millis(fastrand::u64(0..400))).await;
    }
    assert_eq!(records, 300);
    assert!(
        snapshots >= 1,
        "drivers is a table: it starts with a snapshot"
    );
}
