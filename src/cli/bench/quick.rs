//! `fjord bench quick`: the fan-out measured in a few seconds with nothing but this binary —
//! the server's code in this process on the in-memory bus, then the floor at the same load —
//! and a few lines that say what it did beside the floor.

use std::fmt::Write as _;

use super::outcome::Outcome;
use super::scenario::{Env, Scenario};

/// Runs the quick pair and returns its summary, or the scenarios' problems.
pub(crate) async fn run() -> anyhow::Result<String> {
    let env = Env::alone()?;
    let mut outcomes = Vec::new();
    for name in ["quick", "quick-floor"] {
        let scenario = Scenario::standard(name, false)
            .ok_or_else(|| anyhow::anyhow!("no scenario named {name}"))?;
        outcomes.push(super::run_scenario(&env, &scenario).await?);
    }
    let [fjord, floor] = <[Outcome; 2]>::try_from(outcomes)
        .map_err(|_| anyhow::anyhow!("two scenarios, two outcomes"))?;
    let text = summary(&fjord, &floor, cfg!(debug_assertions));
    let problems: Vec<String> = [&fjord, &floor]
        .iter()
        .filter(|outcome| !outcome.ran_cleanly())
        .map(|outcome| format!("{}: {}", outcome.scenario, outcome.errors.join("; ")))
        .collect();
    anyhow::ensure!(problems.is_empty(), "{text}{}", problems.join("\n"));
    Ok(text)
}

/// The summary: the load, one line per side, and the server against the floor.
pub(crate) fn summary(fjord: &Outcome, floor: &Outcome, debug: bool) -> String {
    let (connections, rate, secs) = fjord.load.as_ref().map_or((0, 0.0, 0), |load| {
        (load.connections, load.rate, load.measure_secs)
    });
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{connections} SSE connections on loopback, {rate:.0} records/s each to all of them \
         ({:.0} deliveries/s offered), {secs} s measured:",
        connections as f64 * rate
    );
    let _ = writeln!(
        out,
        "  {:<26} {:>12} {:>8} {:>8} {:>14} {:>15}",
        "", "deliveries/s", "p50 ms", "p99 ms", "KiB/connection", "CPU µs/delivery"
    );
    for (name, outcome) in [
        ("fjord (server in process)", fjord),
        ("floor (bare write loop)", floor),
    ] {
        let _ = writeln!(
            out,
            "  {name:<26} {:>12.0} {:>8.2} {:>8.2} {:>14.1} {:>15.2}",
            outcome.deliveries_per_sec,
            outcome.p50_ms,
            outcome.p99_ms,
            outcome.rss_kib_per_connection,
            outcome.cpu_us_per_delivery
        );
    }
    let ratio = |ours: f64, its: f64| {
        if its > 0.0 {
            format!("{:.2}×", ours / its)
        } else {
            "?".to_owned()
        }
    };
    let _ = writeln!(
        out,
        "fjord against the floor: {} its CPU per delivery, {} its p99, {} gaps.",
        ratio(fjord.cpu_us_per_delivery, floor.cpu_us_per_delivery),
        ratio(fjord.p99_ms, floor.p99_ms),
        fjord.gaps
    );
    if debug {
        let _ = writeln!(
            out,
            "A debug build: `cargo run --release --bin fjord -- bench quick` measures what \
             BENCHMARKS.md does (a release build of fjord-server on Redis, ci/bench.sh)."
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcome(name: &str, p99_ms: f64, cpu_us_per_delivery: f64) -> Outcome {
        Outcome {
            scenario: name.into(),
            load: Scenario::standard(name, false),
            connected: 1_000,
            deliveries_per_sec: 19_998.4,
            p50_ms: 1.234,
            p99_ms,
            rss_kib_per_connection: 4.44,
            cpu_us_per_delivery,
            ..Outcome::default()
        }
    }

    #[test]
    fn the_summary_is_a_few_lines_with_the_floor_beside() {
        let text = summary(
            &outcome("quick", 6.0, 5.5),
            &outcome("quick-floor", 4.0, 5.0),
            false,
        );
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 5, "{text}");
        assert!(
            lines[0].starts_with("1000 SSE connections")
                && lines[0].contains("(20000 deliveries/s offered), 5 s measured"),
            "{text}"
        );
        assert!(lines[2].contains("fjord (server in process)"), "{text}");
        assert!(
            lines[2].contains("19998") && lines[2].contains("6.00"),
            "{text}"
        );
        assert!(
            lines[2].contains("4.4") && lines[2].contains("5.50"),
            "{text}"
        );
        assert!(lines[3].contains("floor (bare write loop)"), "{text}");
        assert_eq!(
            lines[4],
            "fjord against the floor: 1.10× its CPU per delivery, 1.50× its p99, 0 gaps."
        );
        let debug = summary(
            &outcome("quick", 6.0, 5.5),
            &outcome("quick-floor", 0.0, 0.0),
            true,
        );
        assert!(debug.contains("? its CPU per delivery"), "{debug}");
        assert!(debug.contains("--release"), "{debug}");
    }
}
