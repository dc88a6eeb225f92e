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
//! This crate, `fjord-server`, is the part from the bus on: the hub, the HTTP routes and the
//! streams. The bus, the envelope, backoff, clock and process plumbing come from `fjord-bus`,
//! the manifest from `fjord-config`; it links no librdkafka and no load generator
//! (`ci/check-parts.sh`). The workspace's crate map is in the README.
//!
//! This crate's modules:
//! - [`hub`]: a server's fan-out from the bus to its connections: a folder with a file per
//!   job — outlet (a connection's queue), index (by endpoint and key), feed, subscription.
//! - `keys`: key filters, stored once per distinct set, and the index by key.
//! - `views`: filters on values and field lists (`fjord-filter`), shared by the connections
//!   that ask for the same, each record decided once per distinct view.
//! - `queue`: a connection's bounded queue, from the hub to its task.
//! - [`replay`]: reading back what a resuming client missed, and noticing gaps; a table
//!   endpoint's snapshot of rows.
//! - [`sse`]: the bytes on the wire: events, heartbeats, resume ids.
//! - [`auth`]: JWT verification and what a token opens.
//! - `request`: what a stream request asks for and may have, decided in one call, and the
//!   JSON error refusing it, rendered once for every route.
//! - `cors`: the one CORS policy, for streams and the other routes.
//! - `http`: warp's routes besides the streams: health, readiness, metrics, static files.
//! - `connection`: one TCP connection: stream responses written straight to the socket.
//! - `compression`: gzip and deflate streams, each event compressed once per server.
//! - `limits`: how many connections a server holds, and descriptors kept for health checks.
//! - `metrics`: the counters behind `/metrics`.
//! - `latency`: the delivery latency's histograms per endpoint, from Kafka and from the bus.
//! - `serve`: wires bus, hub and routes into a running server with graceful drain; its
//!   [`bind`] and [`serve`] are what the binaries call.
//!
//! The binaries are thin: they parse arguments and call into their crate's library. What
//! they call is this crate's API: [`bind`], [`serve`] and [`auth`] (for `fjord token` and
//! `fjord dev --auth`). [`hub`], [`replay`] and [`sse`] are public only because the
//! integration tests reach into them (`tests/bus_semantics.rs` drives a hub on each bus,
//! `tests/replay_memory.rs` reads the replay's page size), and hidden from the docs: they are
//! not API. [`Latency`] is public for its benchmark (`benches/latency.rs`) alone.

pub mod auth;
mod compression;
mod connection;
mod cors;
mod http;
#[doc(hidden)]
pub mod hub;
mod keys;
mod latency;
mod limits;
mod metrics;
mod queue;
#[doc(hidden)]
pub mod replay;
mod request;
mod serve;
#[doc(hidden)]
pub mod sse;
mod views;

pub use compression::Encoding;
#[doc(hidden)]
pub use latency::Latency;
pub use serve::{Bound, DRAIN_GRACE, ServerError, StaticFile, bind, serve};
