//! Counters the server exposes at `/metrics`, in the Prometheus text format. Plain atomics,
//! written by whoever does the work and read only when scraped.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};

/// The server's counters.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Open SSE connections.
    pub open_connections: AtomicI64,
    /// Records read from the bus.
    pub records_in: AtomicU64,
    /// Events queued to clients (one per record per receiving client).
    pub events_out: AtomicU64,
    /// Clients disconnected because their queue was full.
    pub clients_dropped: AtomicU64,
    /// Failed bus reads.
    pub bus_errors: AtomicU64,
    /// Milliseconds between the bus taking the newest record and this server reading it.
    pub bus_lag_ms: AtomicU64,
    /// Requests refused with an error status.
    pub requests_refused: AtomicU64,
}

impl Metrics {
    /// The Prometheus text exposition of every counter.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(1024);
        let mut metric = |name: &str, kind: &str, help: &str, value: String| {
            // Writing to a String cannot fail.
            let _ = write!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n"
            );
        };
        metric(
            "fjord_open_connections",
            "gauge",
            "Open SSE connections.",
            self.open_connections.load(Relaxed).to_string(),
        );
        metric(
            "fjord_records_in_total",
            "counter",
            "Records read from the bus.",
            self.records_in.load(Relaxed).to_string(),
        );
        metric(
            "fjord_events_out_total",
            "counter",
            "Events queued to clients.",
            self.events_out.load(Relaxed).to_string(),
        );
        metric(
            "fjord_clients_dropped_total",
            "counter",
            "Clients disconnected because they could not keep up.",
            self.clients_dropped.load(Relaxed).to_string(),
        );
        metric(
            "fjord_bus_errors_total",
            "counter",
            "Failed bus reads.",
            self.bus_errors.load(Relaxed).to_string(),
        );
        metric(
            "fjord_bus_lag_seconds",
            "gauge",
            "Seconds between the bus taking the newest record and this server reading it.",
            format!("{:.3}", self.bus_lag_ms.load(Relaxed) as f64 / 1000.0),
        );
        metric(
            "fjord_requests_refused_total",
            "counter",
            "Requests answered with an error status.",
            self.requests_refused.load(Relaxed).to_string(),
        );
        out
    }
}
