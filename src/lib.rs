//! Fjord streams Kafka records to browsers and apps over Server-Sent Events.
//!
//! Data moves one way, and each step has its room:
//!
//! ```text
//! Kafka ──► consumer ──► bus ──► hub ──► http ──► clients
//!           (envelope)  (Redis    (fan-out,  (routes, SSE
//!                        Streams)  per key)   wire format)
//! ```
//!
//! The workspace has one crate per part; each folder under `src/` that holds a `Cargo.toml`
//! is one:
//!
//! | crate | folder | what it is | binary |
//! |---|---|---|---|
//! | `fjord-config` | `src/config/` | the manifest: types, schema, example, validation | |
//! | `fjord` (this one) | `src/` | bus, hub, HTTP and the server | `fjord-server` |
//! | `fjord-consumer` | `src/consumer/` | Kafka consumer-group members (librdkafka) | `fjord-consumer` |
//! | `fjord-cli` | `src/cli/` | `dev`, `setup`, `token`, `check`, `bench` | `fjord` |
//! | `fjord-deploy` | `deploy/` | AWS: bootstrap, images to ECR, ECS services | `fjord-deploy` |
//!
//! Each depends only on those above it in the data flow: the deploy tool and every binary
//! read `fjord-config` (re-exported here as [`config`]), the server links no librdkafka and
//! no load generator, and `fjord-deploy` none of the web stack (`ci/check-parts.sh`).
//!
//! This crate's modules:
//! - [`config`]: the manifest every binary reads, validated at start (`fjord-config`).
//! - [`envelope`]: a Kafka record as clients see it, encoded once.
//! - [`bus`]: the link between consumers and servers: Redis Streams, or in process.
//! - [`hub`]: a server's fan-out from the bus to its connections: a folder with a file per
//!   job — outlet (a connection's queue), index (by endpoint and key), feed, subscription.
//! - `keys`: key filters, stored once per distinct set, and the index by key.
//! - `queue`: a connection's bounded queue, from the hub to its task.
//! - [`replay`]: reading back what a resuming client missed, and noticing gaps.
//! - [`sse`]: the bytes on the wire: events, heartbeats, resume ids.
//! - [`auth`]: JWT verification and what a token opens.
//! - `request`: what a stream request asks for and may have, decided in one call, and the
//!   JSON error refusing it, rendered once for every route.
//! - `cors`: the one CORS policy, for streams and the other routes.
//! - `http`: warp's routes besides the streams: health, readiness, metrics, static files.
//! - `connection`: one TCP connection: stream responses written straight to the socket.
//! - `limits`: how many connections a server holds, and descriptors kept for health checks.
//! - `metrics`: the counters behind `/metrics`.
//! - [`server`]: wires bus, hub and routes into a running server with graceful drain.
//! - [`process`]: logging and shutdown signals, shared by the binaries.
//! - [`backoff`]: the delays between retries, doubling with jitter, for every retry loop.
//! - [`clock`]: wall-clock milliseconds and seconds, the one clock every part reads.
//!
//! The binaries are thin: they parse arguments and call into their crate's library.

pub mod auth;
pub mod backoff;
pub mod bus;
pub mod clock;
pub use fjord_config as config;
mod connection;
mod cors;
pub mod envelope;
mod http;
pub mod hub;
mod keys;
mod limits;
mod metrics;
pub mod process;
mod queue;
pub mod replay;
mod request;
pub mod server;
pub mod sse;
