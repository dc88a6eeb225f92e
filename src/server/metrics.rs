//! Counters the server exposes at `/metrics`, in the Prometheus text format. Plain atomics,
//! written by whoever does the work and read only when scraped; the delivery latency's
//! histograms are `latency`'s.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use crate::latency::Latency;

/// The server's counters.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Open SSE connections.
    pub open_connections: AtomicI64,
    /// Records read from the bus.
    pub records_in: AtomicU64,
    /// Events queued to clients (one per record per receiving client).
    pub events_out: AtomicU64,
    /// Clients disconnected because they could not keep up: their queue filled, or an event
    /// or a replayed chunk waited longer than the lag bound.
    pub clients_dropped: AtomicU64,
    /// Clients disconnected because the server was overloaded (`server.overload_wait_ms`).
    pub clients_shed: AtomicU64,
    /// Streams refused because the server was overloaded.
    pub refused_overload: AtomicU64,
    /// Failed bus reads.
    pub bus_errors: AtomicU64,
    /// Bus entries that could not be sent, read live (each once per server).
    pub bus_invalid_entries: AtomicU64,
    /// Records the consumer read but could not decode by their topic's format and skipped,
    /// read live (once per endpoint that carries the topic, per server).
    pub undecodable_records: AtomicU64,
    /// Milliseconds between the bus taking the newest record and this server reading it.
    pub bus_lag_ms: AtomicU64,
    /// Requests refused with an error status.
    pub requests_refused: AtomicU64,
    /// The most streams this server holds open, after the open-file limit.
    pub connection_limit: AtomicU64,
    /// Streams refused at `server.max_connections`.
    pub refused_global: AtomicU64,
    /// Streams refused at `server.max_connections_per_address`.
    pub refused_per_address: AtomicU64,
    /// Streams refused at `server.max_connections_per_subject`.
    pub refused_per_subject: AtomicU64,
    /// Connections refused because every file descriptor the server may use was taken.
    pub refused_descriptors: AtomicU64,
    /// Failed `accept` calls (out of file descriptors, most often).
    pub accept_errors: AtomicU64,
    /// Requests refused because their `Origin` is not in `server.cors_origins`.
    pub cors_refused: AtomicU64,
    /// Bytes read back from the bus for resuming clients and not yet written to them.
    pub replay_buffered_bytes: AtomicI64,
    /// What the distinct key sets of keyed connections cost, as charged against
    /// `server.key_filter_memory_mib`.
    pub key_filter_bytes: AtomicU64,
    /// Streams refused because their keys would take the key index past its budget.
    pub refused_key_filters: AtomicU64,
    /// Streams refused because their view (filter and fields) would be one more than
    /// `server.max_distinct_filters`.
    pub refused_filters: AtomicU64,
    /// Records decided for a view: once per record and distinct view that could receive it,
    /// however many connections share the view.
    pub filter_evaluations: AtomicU64,
    /// How long live deliveries waited, per endpoint; set once the hub knows its endpoints.
    pub latency: OnceLock<Latency>,
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
            "fjord_clients_shed_total",
            "counter",
            "Clients disconnected because the server was overloaded: events waited longer than server.overload_wait_ms.",
            self.clients_shed.load(Relaxed).to_string(),
        );
        metric(
            "fjord_bus_errors_total",
            "counter",
            "Failed bus reads.",
            self.bus_errors.load(Relaxed).to_string(),
        );
        metric(
            "fjord_bus_invalid_entries_total",
            "counter",
            "Bus entries not written by Fjord, sent to clients as fjord.gap instead.",
            self.bus_invalid_entries.load(Relaxed).to_string(),
        );
        metric(
            "fjord_undecodable_records_total",
            "counter",
            "Records the consumer could not decode by their topic's format, sent to clients as fjord.gap instead.",
            self.undecodable_records.load(Relaxed).to_string(),
        );
        metric(
            "fjord_bus_lag_seconds",
            "gauge",
            "Seconds between the bus taking the newest record and this server reading it.",
            format!("{:.3}", self.bus_lag_ms.load(Relaxed) as f64 / 1000.0),
        );
        metric(
            "fjord_replay_buffered_bytes",
            "gauge",
            "Bytes read back from the bus for resuming clients and not yet written to them.",
            self.replay_buffered_bytes.load(Relaxed).to_string(),
        );
        metric(
            "fjord_key_filter_bytes",
            "gauge",
            "What the distinct key sets of keyed connections cost, against server.key_filter_memory_mib.",
            self.key_filter_bytes.load(Relaxed).to_string(),
        );
        metric(
            "fjord_filter_evaluations_total",
            "counter",
            "Records decided for a filter or field list: once per record and distinct view, however many streams share it.",
            self.filter_evaluations.load(Relaxed).to_string(),
        );
        metric(
            "fjord_requests_refused_total",
            "counter",
            "Requests answered with an error status.",
            self.requests_refused.load(Relaxed).to_string(),
        );
        metric(
            "fjord_connection_limit",
            "gauge",
            "The most streams this server holds open.",
            self.connection_limit.load(Relaxed).to_string(),
        );
        metric(
            "fjord_accept_errors_total",
            "counter",
            "Failed accepts of new connections.",
            self.accept_errors.load(Relaxed).to_string(),
        );
        metric(
            "fjord_cors_refused_total",
            "counter",
            "Requests refused because their origin is not in server.cors_origins.",
            self.cors_refused.load(Relaxed).to_string(),
        );
        let name = "fjord_connections_refused_total";
        let _ = write!(
            out,
            "# HELP {name} Connections refused with 503 at a limit, by limit.\n# TYPE {name} counter\n"
        );
        for (limit, count) in [
            ("global", &self.refused_global),
            ("address", &self.refused_per_address),
            ("subject", &self.refused_per_subject),
            ("file_descriptors", &self.refused_descriptors),
            ("key_filters", &self.refused_key_filters),
            ("filters", &self.refused_filters),
            ("overload", &self.refused_overload),
        ] {
            let _ = writeln!(out, "{name}{{limit=\"{limit}\"}} {}", count.load(Relaxed));
        }
        if let Some(latency) = self.latency.get() {
            latency.render(&mut out);
        }
        out
    }
}

/// Where the server reports its open connections to CloudWatch, as Embedded Metric Format
/// lines on stdout that the awslogs driver turns into the metric `Fjord/OpenConnections`
/// with the dimensions `ClusterName` and `ServiceName`. Autoscaling tracks its average.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct EmfTarget {
    /// The ECS cluster.
    pub cluster: String,
    /// The ECS service.
    pub service: String,
}

impl EmfTarget {
    /// From `FJORD_EMF_CLUSTER` and `FJORD_EMF_SERVICE`, which `fjord-deploy` sets; `None`
    /// when the service is not named.
    pub(crate) fn from_env() -> Option<Self> {
        let service = std::env::var("FJORD_EMF_SERVICE")
            .ok()
            .filter(|s| !s.is_empty())?;
        let cluster = std::env::var("FJORD_EMF_CLUSTER").unwrap_or_default();
        Some(Self { cluster, service })
    }

    /// One EMF line for `open_connections` at `timestamp_ms`.
    pub(crate) fn line(&self, open_connections: i64, timestamp_ms: u64) -> String {
        serde_json::json!({
            "_aws": {
                "Timestamp": timestamp_ms,
                "CloudWatchMetrics": [{
                    "Namespace": "Fjord",
                    "Dimensions": [["ClusterName", "ServiceName"]],
                    "Metrics": [{"Name": "OpenConnections", "Unit": "Count"}]
                }]
            },
            "ClusterName": self.cluster,
            "ServiceName": self.service,
            "OpenConnections": open_connections
        })
        .to_string()
    }

    /// Prints a line every `interval`, forever.
    #[allow(
        clippy::print_stdout,
        reason = "EMF lines go to stdout, where the log driver reads them"
    )]
    pub(crate) async fn run(self, metrics: Arc<Metrics>, interval: Duration) {
        let mut ticker = tokio::time::interval(interval);
        loop {
            ticker.tick().await;
            let now = fjord_bus::clock::now_ms();
            println!("{}", self.line(metrics.open_connections.load(Relaxed), now));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emf_line_names_namespace_metric_and_dimensions() {
        let target = EmfTarget {
            cluster: "prod".into(),
            service: "fjord-server".into(),
        };
        let line: serde_json::Value =
            serde_json::from_str(&target.line(42, 1_764_000_000_000)).expect("JSON");
        assert_eq!(line["OpenConnections"], 42);
        assert_eq!(line["ServiceName"], "fjord-server");
        assert_eq!(line["_aws"]["CloudWatchMetrics"][0]["Namespace"], "Fjord");
        assert_eq!(
            line["_aws"]["CloudWatchMetrics"][0]["Metrics"][0]["Name"],
            "OpenConnections"
        );
        assert_eq!(line["_aws"]["Timestamp"], 1_764_000_000_000_u64);
    }

    #[test]
    fn prometheus_text_has_every_counter() {
        let metrics = Metrics::default();
        metrics.events_out.fetch_add(3, Relaxed);
        let text = metrics.render();
        assert!(text.contains("# TYPE fjord_events_out_total counter\nfjord_events_out_total 3\n"));
        assert!(text.contains("fjord_open_connections 0"));
        metrics.refused_per_subject.fetch_add(2, Relaxed);
        let text = metrics.render();
        assert!(text.contains("fjord_connections_refused_total{limit=\"subject\"} 2\n"));
        assert!(text.contains("fjord_connections_refused_total{limit=\"global\"} 0\n"));
    }
}
