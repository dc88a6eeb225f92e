//! Delivery latency, per endpoint, as Prometheus histograms: from a record's Kafka timestamp,
//! and from the bus taking it (its stream id), to the moment a live connection writes it to
//! its socket. The first is what a user waits; the second leaves out the producer's clock
//! and Kafka, so it tells the server's share. Counted in a few shards, each thread on its
//! own, so that the connection tasks of two cores do not fight over one cache line for every
//! delivery; summed when scraped.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};

/// The buckets' upper bounds, in milliseconds; one more bucket counts the rest.
const BOUNDS_MS: [u64; 13] = [
    1, 2, 5, 10, 25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000,
];
/// Slots per histogram: the buckets, the one past the last bound, and the sum.
const SLOTS: usize = BOUNDS_MS.len() + 2;
const SUM: usize = SLOTS - 1;
/// Where a latency is measured from.
const SOURCES: [&str; 2] = ["kafka", "bus"];
const SHARDS: usize = 8;

/// The histograms of a server's endpoints.
#[derive(Debug)]
pub struct Latency {
    endpoints: Vec<String>,
    /// Per shard: per endpoint and source, [`SLOTS`] counters.
    shards: Vec<Box<[AtomicU64]>>,
}

impl Latency {
    /// Empty histograms for `endpoints`, in the hub's order.
    pub fn new(endpoints: Vec<String>) -> Self {
        let per_shard = endpoints.len() * SOURCES.len() * SLOTS;
        let shards = (0..SHARDS)
            .map(|_| (0..per_shard).map(|_| AtomicU64::new(0)).collect())
            .collect();
        Self { endpoints, shards }
    }

    /// Counts a delivery of a record of `endpoint` written at `now_ms`, which the bus took
    /// at `bus_ms` and Kafka stamped `kafka_ms` (when it did). A clock behind the record's
    /// counts as no wait.
    pub fn record(&self, endpoint: usize, now_ms: u64, bus_ms: u64, kafka_ms: Option<i64>) {
        if endpoint >= self.endpoints.len() {
            return;
        }
        let shard = &self.shards[shard_of_this_thread()];
        let count = |source: usize, waited_ms: u64| {
            let base = (endpoint * SOURCES.len() + source) * SLOTS;
            let bucket = BOUNDS_MS.partition_point(|&bound| bound < waited_ms);
            shard[base + bucket].fetch_add(1, Relaxed);
            shard[base + SUM].fetch_add(waited_ms, Relaxed);
        };
        if let Some(kafka_ms) = kafka_ms.and_then(|ms| u64::try_from(ms).ok()) {
            count(0, now_ms.saturating_sub(kafka_ms));
        }
        count(1, now_ms.saturating_sub(bus_ms));
    }

    /// Appends the histograms in the Prometheus text format.
    pub fn render(&self, out: &mut String) {
        let name = "fjord_delivery_latency_seconds";
        let _ = write!(
            out,
            "# HELP {name} From a record's Kafka timestamp (since=\"kafka\") or the bus taking it (since=\"bus\") to a live connection writing it.\n# TYPE {name} histogram\n"
        );
        for (endpoint, endpoint_name) in self.endpoints.iter().enumerate() {
            for (source, source_name) in SOURCES.iter().enumerate() {
                let base = (endpoint * SOURCES.len() + source) * SLOTS;
                let slot = |slot: usize| -> u64 {
                    self.shards
                        .iter()
                        .map(|shard| shard[base + slot].load(Relaxed))
                        .sum()
                };
                let labels = format!("endpoint=\"{endpoint_name}\",since=\"{source_name}\"");
                let mut cumulative = 0;
                for (bucket, bound) in BOUNDS_MS.iter().enumerate() {
                    cumulative += slot(bucket);
                    let le = *bound as f64 / 1000.0;
                    let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{le}\"}} {cumulative}");
                }
                cumulative += slot(BOUNDS_MS.len());
                let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {cumulative}");
                let sum = slot(SUM) as f64 / 1000.0;
                let _ = writeln!(out, "{name}_sum{{{labels}}} {sum:.3}");
                let _ = writeln!(out, "{name}_count{{{labels}}} {cumulative}");
            }
        }
    }
}

/// This thread's shard: threads take the next one as they first count.
fn shard_of_this_thread() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static SHARD: usize = NEXT.fetch_add(1, Relaxed) % SHARDS;
    }
    SHARD.with(|shard| *shard)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deliveries_fall_in_cumulative_buckets_per_endpoint_and_source() {
        let latency = Latency::new(vec!["orders".to_owned(), "drivers".to_owned()]);
        latency.record(0, 10_000, 9_997, Some(9_990));
        latency.record(0, 10_000, 10_000, None);
        latency.record(1, 10_000, 10_050, Some(-1));
        latency.record(2, 10_000, 0, None);
        let text = {
            let mut out = String::new();
            latency.render(&mut out);
            out
        };
        let line = |start: &str| {
            text.lines()
                .find(|line| line.starts_with(start))
                .unwrap_or_else(|| panic!("{start} in {text}"))
                .rsplit(' ')
                .next()
                .unwrap_or_default()
                .to_owned()
        };
        let orders_kafka =
            r#"fjord_delivery_latency_seconds_bucket{endpoint="orders",since="kafka","#;
        assert_eq!(
            line(&format!("{orders_kafka}le=\"0.005\"}}")),
            "0",
            "10 ms is past 5"
        );
        assert_eq!(line(&format!("{orders_kafka}le=\"0.01\"}}")), "1");
        assert_eq!(
            line(r#"fjord_delivery_latency_seconds_count{endpoint="orders",since="kafka"}"#),
            "1",
            "a record without a timestamp counts only since the bus"
        );
        let orders_bus = r#"fjord_delivery_latency_seconds_bucket{endpoint="orders",since="bus","#;
        assert_eq!(line(&format!("{orders_bus}le=\"0.001\"}}")), "1", "0 ms");
        assert_eq!(line(&format!("{orders_bus}le=\"0.005\"}}")), "2", "3 ms");
        assert_eq!(
            line(r#"fjord_delivery_latency_seconds_sum{endpoint="orders",since="bus"}"#),
            "0.003"
        );
        assert_eq!(
            line(
                r#"fjord_delivery_latency_seconds_bucket{endpoint="drivers",since="bus",le="0.001"}"#
            ),
            "1",
            "a bus clock ahead counts as no wait"
        );
        assert_eq!(
            line(r#"fjord_delivery_latency_seconds_count{endpoint="drivers",since="kafka"}"#),
            "0",
            "a negative timestamp is none"
        );
    }
}
