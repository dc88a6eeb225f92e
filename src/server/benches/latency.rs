//! The delivery-latency histograms' cost on their own: `Latency::record`, which each live
//! delivery calls once, timed over many calls on one thread and then on two at once (the
//! connection tasks of two cores, each counting in its own shard). Its figure beside the
//! server's CPU per delivery is in BENCHMARKS.md ("What the latency histograms cost").
//!
//!   cargo bench -p fjord-server --bench latency

#![allow(clippy::print_stdout)]

use std::hint::black_box;
use std::time::Instant;

use fjord_server::Latency;

const CALLS: u64 = 20_000_000;
const ROUNDS: usize = 5;

fn main() {
    let latency = Latency::new(vec!["orders".to_owned(), "drivers".to_owned()]);
    println!("Latency::record, {CALLS} calls a round, {ROUNDS} rounds (ns per call):");
    for threads in [1, 2] {
        let rounds: Vec<f64> = (0..ROUNDS)
            .map(|_| {
                std::thread::scope(|scope| {
                    let workers: Vec<_> = (0..threads)
                        .map(|_| scope.spawn(|| ns_per_call(&latency)))
                        .collect();
                    workers
                        .into_iter()
                        .map(|worker| worker.join().unwrap_or(f64::NAN))
                        .fold(0.0, f64::max)
                })
            })
            .collect();
        let mut sorted = rounds.clone();
        sorted.sort_by(f64::total_cmp);
        println!(
            "  {threads} thread(s): min {:.1}, median {:.1}, max {:.1}",
            sorted[0],
            sorted[ROUNDS / 2],
            sorted[ROUNDS - 1]
        );
    }
}

/// Times `CALLS` deliveries, spread over the buckets as real waits are (0 to 300 ms since
/// the bus, a few ms more since Kafka), and returns the nanoseconds of one.
fn ns_per_call(latency: &Latency) -> f64 {
    let now_ms = 1_800_000_000_000_u64;
    let start = Instant::now();
    for call in 0..CALLS {
        let waited = call % 300;
        let bus_ms = now_ms - waited;
        latency.record(
            black_box((call & 1) as usize),
            black_box(now_ms),
            black_box(bus_ms),
            black_box(Some((bus_ms - 3) as i64)),
        );
    }
    start.elapsed().as_nanos() as f64 / CALLS as f64
}
