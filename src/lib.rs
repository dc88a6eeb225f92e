//! Fjord streams Kafka records to browsers and apps over Server-Sent Events.
//!
//! Data moves one way, and each step has its module:
//!
//! ```text
//! Kafka ──► consumer ──► bus ──► hub ──► http ──► clients
//!           (envelope)  (Redis    (fan-out,  (routes, SSE
//!                        Streams)  per key)   wire format)
//! ```
//!
//! - `auth`: JWT verification and what a token opens.
//! - [`config`]: the manifest every binary reads, validated at start.
//! - [`envelope`]: a Kafka record as clients see it, encoded once.
//! - [`consumer`]: consumer-group members that publish records to the bus (needs `kafka`).
//! - [`bus`]: the link between consumers and servers: Redis Streams, or in process.
//! - [`hub`]: a server's fan-out from the bus to its connections: a folder with a file per
//!   job — outlet (a connection's queue), index (by endpoint and key), feed, subscription.
//! - `keys`: key filters, stored once per distinct set, and the index by key.
//! - `queue`: a connection's bounded queue, from the hub to its task.
//! - [`replay`]: reading back what a resuming client missed, and noticing gaps.
//! - [`sse`]: the bytes on the wire: events, heartbeats, resume ids.
//! - `http`: what a stream request asks for and may have, the other routes, CORS, JSON errors.
//! - `connection`: one TCP connection: stream responses written straight to the socket.
//! - `limits`: how many connections a server holds, and descriptors kept for health checks.
//! - `metrics`: the counters behind `/metrics`.
//! - [`server`]: wires bus, hub and routes into a running server with graceful drain.
//! - [`process`]: logging and shutdown signals, shared by the binaries.
//! - `backoff`: the delays between retries, doubling with jitter, for every retry loop.
//! - `clock`: wall-clock milliseconds and seconds, the one clock every part reads.
//! - [`setup`]: `fjord setup` and `fjord token`: keys, manifest skeleton, test tokens.
//! - [`dev`]: `fjord dev`, everything in one process (needs `kafka`).
//! - [`bench`]: `fjord bench`, the load generator, floor and scenarios of `BENCHMARKS.md` (needs `kafka`).
//!
//! The binaries in `src/bin` are thin: they parse arguments and call into these modules.

mod auth;
mod backoff;
#[cfg(feature = "kafka")]
pub mod bench;
pub mod bus;
mod clock;
pub mod config;
mod connection;
#[cfg(feature = "kafka")]
pub mod consumer;
#[cfg(feature = "kafka")]
pub mod dev;
pub mod envelope;
mod http;
pub mod hub;
mod keys;
mod limits;
mod metrics;
pub mod process;
mod queue;
pub mod replay;
pub mod server;
pub mod setup;
pub mod sse;
