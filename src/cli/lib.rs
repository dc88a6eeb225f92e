//! `fjord`, the developer CLI, as a library its thin binary calls into.
//!
//! - [`dev`]: `fjord dev`, everything in one process: an in-process Kafka cluster, the bus,
//!   a consumer, a server, the demo producer and page.
//! - [`setup`]: `fjord setup` and `fjord token`: keys, a manifest skeleton, test tokens.
//! - [`bench`]: `fjord bench`, the load generator, the floor and the scenarios of
//!   `BENCHMARKS.md`.
//!
//! It stands on `fjord-server` (hub, routes, serve), `fjord-consumer`, `fjord-bus` and
//! `fjord-config`; nothing that a deployed server or consumer runs lives here.

pub mod bench;
pub mod dev;
pub mod setup;
pub mod types;
