//! Capped exponential backoff with jitter, the one retry schedule every
//! layer uses for transient faults (PostgreSQL away, a webhook down, a
//! broker restarting).
//!
//! The delay starts at `initial`, doubles after each failure up to `max`,
//! and each sleep adds up to a quarter of the delay at random so that
//! processes that failed together do not retry in lockstep. A success
//! [`Backoff::reset`]s it.

use std::time::Duration;

/// A retry schedule; see the module documentation.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    next: Duration,
    jitter: bool,
}

impl Backoff {
    /// Starts at `initial`, doubling up to `max`, with jitter.
    pub fn new(initial: Duration, max: Duration) -> Self {
        let initial = initial.min(max);
        Self { initial, max, next: initial, jitter: true }
    }

    /// The same schedule without the random part (exact delays).
    pub fn without_jitter(mut self) -> Self {
        self.jitter = false;
        self
    }

    /// The delay the next [`Self::sleep`] waits, before its jitter.
    pub fn current(&self) -> Duration {
        self.next
    }

    /// Whether the delay has reached its cap.
    pub fn at_cap(&self) -> bool {
        self.next >= self.max
    }

    /// The delay to wait now (jitter included), advancing the schedule.
    pub fn next_delay(&mut self) -> Duration {
        let base = self.next;
        self.next = (self.next * 2).min(self.max);
        if self.jitter { base + base.mul_f64(jitter_fraction() * 0.25) } else { base }
    }

    /// Sleeps for [`Self::next_delay`].
    pub async fn sleep(&mut self) {
        tokio::time::sleep(self.next_delay()).await;
    }

    /// Back to the initial delay after a success.
    pub fn reset(&mut self) {
        self.next = self.initial;
    }
}

/// A fraction in `[0, 1)` that differs between processes and calls; good
/// enough to spread retries, not for anything else.
fn jitter_fraction() -> f64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos()));
    (h.finish() % 1_000_000) as f64 / 1_000_000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_up_to_the_cap_and_reset() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(500)).without_jitter();
        let delays: Vec<u64> = (0..5).map(|_| b.next_delay().as_millis() as u64).collect();
        assert_eq!(delays, [100, 200, 400, 500, 500]);
        assert!(b.at_cap());
        b.reset();
        assert_eq!(b.next_delay(), Duration::from_millis(100));
    }

    #[test]
    fn jitter_adds_at_most_a_quarter() {
        let mut b = Backoff::new(Duration::from_millis(400), Duration::from_secs(10));
        for expected in [400u64, 800, 1600] {
            let d = b.next_delay().as_millis() as u64;
            assert!((expected..=expected + expected / 4).contains(&d), "{d} outside [{expected}, +25%]");
        }
    }

    #[test]
    fn an_initial_delay_above_the_cap_is_capped() {
        let mut b = Backoff::new(Duration::from_secs(9), Duration::from_secs(2)).without_jitter();
        assert_eq!(b.next_delay(), Duration::from_secs(2));
    }
}
