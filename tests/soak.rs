//! A soak run with random faults, outside the normal suite: `ci/soak.sh` (bounded by
//! `FJORD_SOAK_SECS`, default 300). Two servers, two consumer members and twenty resuming
//! clients while a producer writes steadily; every few seconds one fault at random — a
//! server killed and restarted, a consumer killed with SIGKILL and restarted, Redis
//! restarted, the Kafka broker restarted, a client stalled until it is cut off. At the end
//! every client must hold exactly the records produced, in order per partition.

#![allow(
    clippy::print_stdout,
    reason = "the soak run reports its progress as it goes"
)]

use std::time::{Duration, Instant};

use crate::common::*;

#[tokio::test]
#[ignore = "a long run; ci/soak.sh runs it"]
async fn soak_with_random_faults() {
    if skip_without_services() {
        return;
    }
    let seconds: u64 = std::env::var("FJORD_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(300);
    let seed = std::env::var("FJORD_SOAK_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| fastrand::u64(..));
    println!("soak: {seconds} s, seed {seed} (FJORD_SOAK_SEED reruns the same faults)");
    let mut rng = fastrand::Rng::with_seed(seed);
    let services = services();
    let topic = unique("soak");
    let partitions = 4;
    create_topic(&services.brokers, &topic, partitions).await;
    let ports = [free_port(), free_port()];
    let base = manifest(&services, &[("orders", &topic)], &unique("group"), ports[0]);
    let mut manifests = Vec::new();
    for port in ports {
        let mut own = base.clone();
        own["server"]["port"] = port.into();
        own["server"]["client_queue"] = 64.into();
        manifests.push(write_manifest(&own));
    }
    let mut servers: Vec<Process> = manifests
        .iter()
        .map(|(_, path)| Process::server(path))
        .collect();
    for port in ports {
        wait_ready(port).await;
    }
    let mut consumers: Vec<Process> = (0..2)
        .map(|_| Process::consumer(&manifests[0].1, &[]))
        .collect();
    let urls: Vec<String> = ports
        .iter()
        .map(|port| format!("http://127.0.0.1:{port}/v1/streams/orders"))
        .collect();
    let clients: Vec<ResumingClient> = (0..20)
        .map(|i| {
            let mut own = urls.clone();
            own.rotate_left(i % urls.len());
            ResumingClient::start(own)
        })
        .collect();
    wait_until("clients connected", || {
        clients.iter().all(|c| c.connections() >= 1)
    })
    .await;

    let producer_topic = topic.clone();
    let producer_brokers = services.brokers.clone();
    let stop_at = Instant::now() + Duration::from_secs(seconds);
    let producing = tokio::spawn(async move {
        let mut produced = Vec::new();
        let mut next = 0;
        while Instant::now() < stop_at {
            let batch: Vec<TestRecord> = json_records(next + 100, partitions, 13).split_off(next);
            produced.extend(produce(&producer_brokers, &producer_topic, &batch).await);
            next += 100;
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        produced
    });

    let mut faults = Vec::new();
    while Instant::now() + Duration::from_secs(15) < stop_at {
        tokio::time::sleep(Duration::from_secs(rng.u64(5..12))).await;
        let fault = rng.u8(0..5);
        match fault {
            0 => {
                let which = rng.usize(0..servers.len());
                servers[which].kill();
                tokio::time::sleep(Duration::from_secs(2)).await;
                servers[which] = Process::server(&manifests[which].1);
                wait_ready(ports[which]).await;
                faults.push(format!("server {which} killed and restarted"));
            }
            1 => {
                let which = rng.usize(0..consumers.len());
                consumers[which].kill();
                consumers[which] = Process::consumer(&manifests[0].1, &[]);
                faults.push(format!(
                    "consumer {which} killed with SIGKILL and restarted"
                ));
            }
            2 => {
                services_command("restart-redis");
                faults.push("redis restarted".into());
            }
            3 => {
                services_command("restart-kafka");
                faults.push("kafka restarted".into());
            }
            _ => {
                let which = rng.usize(0..clients.len());
                clients[which].pause(true);
                tokio::time::sleep(Duration::from_secs(rng.u64(1..6))).await;
                clients[which].pause(false);
                faults.push(format!("client {which} stalled"));
            }
        }
        println!("soak: {}", faults.last().map_or("", String::as_str));
    }
    let produced = producing.await.expect("producer");
    println!(
        "soak: produced {} records with {} faults",
        produced.len(),
        faults.len()
    );
    for (i, client) in clients.iter().enumerate() {
        let deadline = Instant::now() + Duration::from_secs(180);
        while client.records().len() < produced.len() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        if client.records().len() < produced.len() {
            report_shortfall(i, client, &produced, &servers, &consumers);
        }
        let records = client.records();
        assert_complete_and_ordered(&records, &produced);
        println!(
            "soak: client {i}: {} records, {} connections",
            records.len(),
            client.connections()
        );
    }
    println!("soak: passed");
}

/// Says what a client is missing, and what the processes were doing, before the test fails.
fn report_shortfall(
    index: usize,
    client: &ResumingClient,
    produced: &[(i32, i64)],
    servers: &[Process],
    consumers: &[Process],
) {
    let got: std::collections::BTreeSet<(i64, i64)> = client
        .records()
        .iter()
        .map(|event| {
            let envelope = event.json();
            (
                envelope["partition"].as_i64().unwrap_or(-1),
                envelope["offset"].as_i64().unwrap_or(-1),
            )
        })
        .collect();
    let missing: Vec<(i32, i64)> = produced
        .iter()
        .filter(|(partition, offset)| !got.contains(&(i64::from(*partition), *offset)))
        .copied()
        .collect();
    println!(
        "soak: client {index} has {} of {} records over {} connections; missing {} e.g. {:?}; notices {:?}",
        got.len(),
        produced.len(),
        client.connections(),
        missing.len(),
        missing.iter().take(10).collect::<Vec<_>>(),
        client.notices()
    );
    for (name, process) in servers
        .iter()
        .map(|p| ("server", p))
        .chain(consumers.iter().map(|p| ("consumer", p)))
    {
        let log = process.log();
        println!("soak: --- {name} log tail ---");
        for line in log.iter().rev().take(15).rev() {
            println!("soak:   {line}");
        }
    }
}
