//! Waiting between retries: the wait doubles from a first delay up to a cap, and each wait
//! is drawn between half of it and all of it, so that servers and members that lost Redis
//! at the same moment do not all come back at the same moment.

use std::time::Duration;

/// Retry delays: doubling, capped, with jitter.
#[derive(Debug, Clone)]
pub struct Backoff {
    first: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    pub const fn new(first: Duration, max: Duration) -> Self {
        Self {
            first,
            max,
            next: first,
        }
    }

    /// How long to wait before the next try; the one after waits about twice as long.
    pub fn next_delay(&mut self) -> Duration {
        let delay = self.next;
        self.next = (self.next * 2).min(self.max);
        delay.mul_f64(0.5 + fastrand::f64() / 2.0)
    }

    /// Starts over from the first delay, after a success.
    pub fn reset(&mut self) {
        self.next = self.first;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_up_to_the_cap_with_jitter_and_start_over_after_a_reset() {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_millis(400));
        for nominal in [100, 200, 400, 400] {
            let delay = backoff.next_delay();
            let nominal = Duration::from_millis(nominal);
            assert!(
                delay >= nominal / 2 && delay <= nominal,
                "{delay:?} for {nominal:?}"
            );
        }
        backoff.reset();
        assert!(backoff.next_delay() <= Duration::from_millis(100));
    }
}
