//! How long a compiled filter takes per record, on an envelope already parsed, next to what
//! parsing the envelope and projecting its value cost (the server pays those once per record,
//! whatever the number of filters). Run optimised:
//! `cargo run --release -p fjord-filter --example speed`.

#![allow(
    clippy::print_stdout,
    reason = "the example's output is its measurements"
)]

use std::error::Error;
use std::hint::black_box;
use std::time::Instant;

use fjord_filter::{Filter, Limits, Projection, RecordView};
use serde_json::Value;

const ENVELOPE: &str = r#"{"topic":"orders","partition":3,"offset":1042,"key":"order-17","timestamp":1764000000000,"headers":{"source":"web"},"value":{"id":"order-17","restaurant_id":"r-42","status":"placed","total_cents":1250,"currency":"EUR","customer":{"id":"c-9","name":"Ada","city":"Zürich"},"items":[{"sku":"a-1","qty":2},{"sku":"b-2","qty":1}],"placed_at":"2026-12-07T05:00:00Z"}}"#;

const BATCHES: u32 = 400;
const PER_BATCH: u32 = 5_000;

/// Nanoseconds per call of `work`: the fastest of many short batches, which on a shared
/// machine is the batch that ran without being descheduled.
fn time(mut work: impl FnMut()) -> f64 {
    (0..BATCHES)
        .map(|_| {
            let started = Instant::now();
            for _ in 0..PER_BATCH {
                work();
            }
            started.elapsed().as_secs_f64() * 1e9 / f64::from(PER_BATCH)
        })
        .fold(f64::INFINITY, f64::min)
}

fn main() -> Result<(), Box<dyn Error>> {
    let limits = Limits::default();
    let envelope: Value = serde_json::from_str(ENVELOPE)?;
    let record = RecordView::from_envelope(&envelope).ok_or("not an envelope")?;
    for source in [
        r#"value.status == "placed" && value.total_cents >= 1000"#,
        r#"value.status == "shipped" && value.total_cents >= 1000"#,
        r#"value.restaurant_id in ["r-1", "r-7", "r-42", "r-99"] && value.customer.city.startsWith("Z") && has(value.items[1].sku)"#,
    ] {
        let filter = Filter::compile(source, &limits)?;
        let matched = filter.matches(&record);
        let nanos = time(|| {
            black_box(black_box(&filter).matches(black_box(&record)));
        });
        println!("{nanos:7.1} ns/eval  (matches: {matched})  {source}");
    }
    let nanos = time(|| {
        black_box(serde_json::from_str::<Value>(black_box(ENVELOPE)).ok());
    });
    println!(
        "{nanos:7.1} ns       parsing the envelope ({} bytes)",
        ENVELOPE.len()
    );
    let projection = Projection::parse("id,total_cents,customer.name", &limits)?;
    let nanos = time(|| {
        black_box(projection.apply(black_box(record.value)));
    });
    println!(
        "{nanos:7.1} ns       projecting value to {}",
        projection.canonical()
    );
    Ok(())
}
