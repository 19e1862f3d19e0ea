//! Exponential backoff with jitter for reconnects and respawns.

use std::time::Duration;

/// Doubles the delay after each failure up to `max`, with ±25 % jitter so many peers that
/// lost the same hub do not reconnect in lockstep.
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    current: Duration,
    rng: u64,
}

impl Backoff {
    /// The longest delay ever returned: one day.
    pub const CEILING: Duration = Duration::from_secs(86_400);

    /// A backoff between `min` and `max`. Both are capped at [`Backoff::CEILING`] so a
    /// configured delay can never overflow a deadline (`Instant + delay`).
    pub fn new(min: Duration, max: Duration) -> Self {
        let min = min.min(Self::CEILING);
        let max = max.min(Self::CEILING);
        let seed = u64::from(std::process::id())
            ^ std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0x9e37_79b9_7f4a_7c15);
        Backoff { min, max: max.max(min), current: min, rng: seed | 1 }
    }

    /// The delay before the next attempt; grows each call.
    pub fn next_delay(&mut self) -> Duration {
        // xorshift64: jitter only, not security.
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        let base = self.current;
        self.current = (self.current * 2).min(self.max);
        let quarter = base / 4;
        let span = (quarter.as_nanos() as u64).saturating_mul(2).max(1);
        base - quarter + Duration::from_nanos(self.rng % span)
    }

    /// Back to the minimum after a success.
    pub fn reset(&mut self) {
        self.current = self.min;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_to_max_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let first = b.next_delay();
        assert!(first >= Duration::from_millis(75) && first <= Duration::from_millis(125));
        for _ in 0..10 {
            let d = b.next_delay();
            assert!(d <= Duration::from_millis(1250), "{d:?}");
        }
        assert!(b.next_delay() >= Duration::from_millis(750));
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(125));
    }

    #[test]
    fn absurd_delays_are_capped() {
        let mut b = Backoff::new(Duration::from_secs(u64::MAX / 4), Duration::MAX);
        for _ in 0..4 {
            let d = b.next_delay();
            assert!(d <= Backoff::CEILING + Backoff::CEILING / 4);
            assert!(std::time::Instant::now().checked_add(d).is_some());
        }
    }
}
