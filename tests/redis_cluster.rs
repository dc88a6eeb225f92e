//! The Redis Cluster that the cluster tests stand on (`ci/redis-cluster.sh`, through
//! `common::redis_cluster`): every slot served once it is up, `up` again leaves a healthy
//! cluster alone, and a killed primary's slot is taken over by its replica with what was
//! written to both.
#![allow(clippy::panic, reason = "a test fails loudly")]

use crate::common::redis_cluster::RedisCluster;
use crate::common::*;
use redis::aio::MultiplexedConnection;

async fn connect(port: u16) -> MultiplexedConnection {
    redis::Client::open(format!("redis://127.0.0.1:{port}"))
        .expect("a url")
        .get_multiplexed_async_connection()
        .await
        .unwrap_or_else(|error| panic!("connect to node {port}: {error}"))
}

async fn query<T: redis::FromRedisValue>(port: u16, command: &mut redis::Cmd) -> T {
    command
        .query_async(&mut connect(port).await)
        .await
        .unwrap_or_else(|error| panic!("node {port}: {error}"))
}

fn port_of(url: &str) -> u16 {
    url.rsplit(':')
        .next()
        .and_then(|port| port.parse().ok())
        .unwrap_or_else(|| panic!("a port in {url}"))
}

#[tokio::test]
async fn a_killed_primary_s_replica_takes_over_its_slot_with_its_data() {
    if skip_without_services() {
        return;
    }
    let cluster = RedisCluster::start(3, 1);
    let urls = cluster.urls();
    assert_eq!(urls.len(), 6, "{urls:?}");
    for url in &urls {
        let info: String = query(port_of(url), redis::cmd("CLUSTER").arg("INFO")).await;
        for line in [
            "cluster_state:ok",
            "cluster_slots_ok:16384",
            "cluster_size:3",
        ] {
            assert!(info.lines().any(|l| l == line), "{url}: {info}");
        }
    }

    let key = unique("{orders}:stream");
    let primary = cluster.primary_of(&key);
    let _: () = query(primary, redis::cmd("SET").arg(&key).arg("kept")).await;
    // On the replica too before the kill: replication is asynchronous.
    let replicas: i64 = query(primary, redis::cmd("WAIT").arg(1).arg(5000)).await;
    assert_eq!(replicas, 1, "the write reached the replica");

    assert_eq!(cluster.kill_primary_of(&key), primary);
    assert!(
        redis::Client::open(format!("redis://127.0.0.1:{primary}"))
            .expect("a url")
            .get_multiplexed_async_connection()
            .await
            .is_err(),
        "the killed primary is gone"
    );
    let promoted = cluster.wait_failover(&key);
    assert_ne!(promoted, primary);
    let role: Vec<redis::Value> = query(promoted, &mut redis::cmd("ROLE")).await;
    assert_eq!(
        role.first(),
        Some(&redis::Value::BulkString(b"master".to_vec()))
    );
    let value: Option<String> = query(promoted, redis::cmd("GET").arg(&key)).await;
    assert_eq!(value.as_deref(), Some("kept"));
    assert_eq!(cluster.primary_of(&key), promoted);

    // The killed node comes back as a replica of the one that took over, and catches up.
    cluster.restart_stopped();
    assert_eq!(cluster.primary_of(&key), promoted);
    let role: Vec<redis::Value> = query(primary, &mut redis::cmd("ROLE")).await;
    assert_eq!(
        role.first(),
        Some(&redis::Value::BulkString(b"slave".to_vec()))
    );
    let _: () = query(promoted, redis::cmd("SET").arg(&key).arg("after")).await;
    let replicas: i64 = query(promoted, redis::cmd("WAIT").arg(1).arg(5000)).await;
    assert_eq!(replicas, 1, "the old primary replicates the new one");
}

#[tokio::test]
async fn up_again_leaves_a_healthy_cluster_alone_and_one_shard_serves_every_slot() {
    if skip_without_services() {
        return;
    }
    // One shard: the baseline of a shards benchmark, made without `redis-cli --cluster
    // create`, which wants three primaries.
    let cluster = RedisCluster::start(1, 1);
    let urls = cluster.urls();
    assert_eq!(urls.len(), 2, "{urls:?}");
    let first = port_of(&urls[0]);
    let id: String = query(first, redis::cmd("CLUSTER").arg("MYID")).await;
    let info: String = query(first, redis::cmd("CLUSTER").arg("INFO")).await;
    assert!(
        info.lines().any(|l| l == "cluster_slots_ok:16384"),
        "{info}"
    );
    for key in ["a", "b", "{x}:stream", "zzz"] {
        assert_eq!(cluster.primary_of(key), first, "{key}");
    }

    // `up` of the same shape over a healthy cluster: the same nodes, not new ones.
    let up = std::process::Command::new(repo_root().join("ci/redis-cluster.sh"))
        .arg("up")
        .arg(cluster.dir())
        .args([first.to_string().as_str(), "1", "1"])
        .output()
        .expect("run ci/redis-cluster.sh");
    assert!(up.status.success(), "{up:?}");
    assert!(
        String::from_utf8_lossy(&up.stderr).contains("already up"),
        "{up:?}"
    );
    let same: String = query(first, redis::cmd("CLUSTER").arg("MYID")).await;
    assert_eq!(same, id);
}
