//! Killing a Redis Cluster primary mid-stream, with `redis.commit_after_replicas`: the
//! consumer commits only what a replica holds, so the promoted replica has every record the
//! group committed, the consumer publishes the rest again, once, and a client of a server
//! reading from replicas gets every record exactly once, in order.

use crate::common::redis_cluster::RedisCluster;
use crate::common::*;

#[tokio::test]
async fn a_killed_primary_loses_no_committed_record() {
    if skip_without_services() {
        return;
    }
    let services = services();
    let cluster = RedisCluster::start(3, 1);
    let urls = cluster.urls();
    let topic = unique("orders");
    create_topic(&services.brokers, &topic, 1).await;
    let port = free_port();
    let prefix = unique("failover");
    let mut manifest = manifest(&services, &[("orders", &topic)], &unique("group"), port);
    manifest["redis"] = serde_json::json!({
        "url": urls[0],
        "key_prefix": prefix,
        "cluster": {"seed_urls": urls[1..], "read_from": "replica"},
        "commit_after_replicas": {"count": 1, "timeout_ms": 500}
    });
    manifest["endpoints"]["orders"]["start"] = "oldest".into();
    let (_dir, path) = write_manifest(&manifest);
    let mut server = Process::server(&path);
    server.wait_ready(port).await;
    let consumer = Process::consumer(&path, &[]);
    let client = ResumingClient::start(vec![format!("http://127.0.0.1:{port}/v1/streams/orders")]);

    let endpoint = fjord_config::EndpointName::try_from("orders".to_owned()).expect("a name");
    let stream = fjord_bus::redis::stream_key(&prefix, &endpoint);
    // Records keep coming while the primary dies, so that publishes are in flight then.
    let producer = tokio::spawn({
        let brokers = services.brokers.clone();
        let topic = topic.clone();
        async move {
            let mut produced = Vec::new();
            for _ in 0..40 {
                produced.extend(produce(&brokers, &topic, &json_records(100, 1, 7)).await);
            }
            produced
        }
    });
    client.wait_for_records(500).await;
    let killed = cluster.kill_primary_of(&stream);
    let promoted = cluster.wait_failover(&stream);
    assert_ne!(promoted, killed);
    // The promoted primary has no replica until the killed node comes back as one: until
    // then nothing of its shard can be committed, and the consumer holds its records back.
    cluster.restart_stopped();
    let produced = producer.await.expect("the producer");

    let events = client.wait_for_records(produced.len()).await;
    assert_complete_and_ordered(&events, &produced);

    // The stream on the promoted primary holds each record once.
    let mut connection = redis::Client::open(format!("redis://127.0.0.1:{promoted}"))
        .expect("a url")
        .get_multiplexed_async_connection()
        .await
        .expect("the promoted primary");
    let length: usize = redis::cmd("XLEN")
        .arg(&stream)
        .query_async(&mut connection)
        .await
        .expect("XLEN");
    assert_eq!(length, produced.len());
    let log = consumer.log().join("\n");
    assert!(!log.contains("panicked"), "{log}");
}
