//! A latency histogram with 1 % resolution: exact below 100 µs, then logarithmic buckets.
//! Workers keep a dense one and send it sparse; the controller merges them.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Below this many microseconds each microsecond has its bucket.
const LINEAR: u64 = 100;
/// Growth factor of the logarithmic buckets.
const GROWTH: f64 = 1.01;
/// Enough buckets for more than an hour.
const BUCKETS: usize = 1_700;

fn bucket_of(micros: u64) -> usize {
    if micros < LINEAR {
        return micros as usize;
    }
    let steps = ((micros as f64) / (LINEAR as f64)).ln() / GROWTH.ln();
    (LINEAR as usize + steps as usize).min(BUCKETS - 1)
}

/// The upper bound of a bucket, in microseconds.
fn upper_bound(bucket: usize) -> f64 {
    if bucket < LINEAR as usize {
        return bucket as f64 + 1.0;
    }
    let steps = (bucket - LINEAR as usize + 1) as f64;
    LINEAR as f64 * GROWTH.powf(steps)
}

/// Latencies in microseconds.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Histogram {
    /// Count per bucket; dense while recording, sparse once compacted.
    #[serde(with = "sparse")]
    counts: Vec<u64>,
    /// How many were recorded.
    pub count: u64,
    /// The largest, exactly.
    pub max_us: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Self {
            counts: vec![0; BUCKETS],
            count: 0,
            max_us: 0,
        }
    }
}

mod sparse {
    use super::{BTreeMap, BUCKETS, Deserialize, Serialize};

    pub(super) fn serialize<S: serde::Serializer>(
        counts: &[u64],
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        let map: BTreeMap<usize, u64> = counts
            .iter()
            .enumerate()
            .filter(|(_, count)| **count > 0)
            .map(|(bucket, count)| (bucket, *count))
            .collect();
        map.serialize(serializer)
    }

    pub(super) fn deserialize<'de, D: serde::Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Vec<u64>, D::Error> {
        let map = BTreeMap::<usize, u64>::deserialize(deserializer)?;
        let mut counts = vec![0; BUCKETS];
        for (bucket, count) in map {
            if let Some(slot) = counts.get_mut(bucket) {
                *slot += count;
            }
        }
        Ok(counts)
    }
}

impl Histogram {
    /// Records one latency.
    pub fn record(&mut self, micros: u64) {
        self.counts[bucket_of(micros)] += 1;
        self.count += 1;
        self.max_us = self.max_us.max(micros);
    }

    /// Adds another histogram's counts.
    pub fn merge(&mut self, other: &Self) {
        for (mine, theirs) in self.counts.iter_mut().zip(&other.counts) {
            *mine += theirs;
        }
        self.count += other.count;
        self.max_us = self.max_us.max(other.max_us);
    }

    /// The latency below which `quantile` (0..=1) of the recorded ones fall, in
    /// milliseconds (the bucket's upper bound: at most 1 % high); 0 when empty.
    pub fn quantile_ms(&self, quantile: f64) -> f64 {
        if self.count == 0 {
            return 0.0;
        }
        let rank = ((self.count as f64) * quantile).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (bucket, count) in self.counts.iter().enumerate() {
            seen += count;
            if seen >= rank {
                return (upper_bound(bucket).min(self.max_us as f64)) / 1000.0;
            }
        }
        self.max_us as f64 / 1000.0
    }

    /// The largest latency in milliseconds.
    pub fn max_ms(&self) -> f64 {
        self.max_us as f64 / 1000.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_are_within_one_percent() {
        let mut histogram = Histogram::default();
        for micros in 1..=100_000 {
            histogram.record(micros);
        }
        let p50 = histogram.quantile_ms(0.5);
        let p99 = histogram.quantile_ms(0.99);
        assert!((p50 - 50.0).abs() / 50.0 < 0.011, "{p50}");
        assert!((p99 - 99.0).abs() / 99.0 < 0.011, "{p99}");
        assert!((histogram.max_ms() - 100.0).abs() < f64::EPSILON);
    }

    #[test]
    fn round_trips_sparse_and_merges() {
        let mut a = Histogram::default();
        a.record(5);
        a.record(50_000);
        let text = serde_json::to_string(&a).expect("serializes");
        assert!(text.len() < 100, "{text}");
        let mut b: Histogram = serde_json::from_str(&text).expect("parses");
        assert_eq!(a, b);
        b.merge(&a);
        assert_eq!(b.count, 4);
        assert_eq!(b.max_us, 50_000);
        assert_eq!(Histogram::default().quantile_ms(0.99), 0.0);
    }
}
