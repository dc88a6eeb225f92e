//! Fjord's integration tests: the real binaries against the real Kafka, Redis, Redis Cluster
//! and Schema Registry that `ci/services.sh` starts, one module per subject, all in one test
//! binary so that librdkafka is linked once, not once per file.
//!
//! Every module's tests run in one process, in parallel threads, beside any other module's.
//! They use random topics, key prefixes and ports ([`common::unique`],
//! [`common::free_port`]), so that they can. The few that stop or restart a shared service
//! are `#[ignore]`d and run alone, in a second run: `ci/test.sh` does
//! `cargo test -p fjord-tests --test integration -- --ignored faults::`, and `ci/soak.sh`
//! the soak run. A module runs by itself with its name as the filter:
//! `cargo test -p fjord-tests --test integration pipeline::`.

mod common;

mod attacks;
mod auth;
mod bus_entries;
mod bus_semantics;
mod codecs;
mod dev;
mod failover;
mod faults;
mod http_contract;
mod kafka_tls;
mod key_filter_memory;
mod limits;
mod pipeline;
mod redis_cluster;
mod redis_tls;
mod replay_memory;
mod schema_registry;
mod soak;
mod startup;
