//! Budgets for log lines that remote peers can cause.
//!
//! A line per received message, failed handshake or refused key is what an operator wants
//! to see — until a stranger sends ten thousand of them a second. Each such call site keeps
//! a [`LogBudget`]: a token bucket of lines; lines over budget are counted, and the next
//! line that passes says how many were suppressed.

use std::time::Instant;

use crate::budget::Limiter;

/// A token bucket of log lines.
#[derive(Debug, Clone)]
pub struct LogBudget {
    lines: Limiter,
    suppressed: u64,
}

impl LogBudget {
    /// At most `burst` lines at once, refilled at `per_sec`.
    pub const fn new(per_sec: f64, burst: u32) -> LogBudget {
        LogBudget { lines: Limiter::new(per_sec, burst), suppressed: 0 }
    }

    /// The default for remote-triggered lines: a burst of 20, then 2 per second.
    pub const fn remote() -> LogBudget {
        LogBudget::new(2.0, 20)
    }

    /// Whether a line may be logged at `now`; if so, how many were suppressed since the
    /// last one that was.
    pub fn allow(&mut self, now: Instant) -> Option<u64> {
        if self.lines.allow(now) {
            Some(std::mem::take(&mut self.suppressed))
        } else {
            self.suppressed += 1;
            None
        }
    }
}

/// Logs through a [`LogBudget`]: `log_limited!(budget, info, field = %x, "message")`. A
/// line that passes after suppressed ones carries `suppressed = n`.
macro_rules! log_limited {
    ($budget:expr, $level:ident, $($arg:tt)+) => {
        if let Some(suppressed) = $budget.allow(::std::time::Instant::now()) {
            if suppressed > 0 {
                ::tracing::$level!(suppressed, $($arg)+);
            } else {
                ::tracing::$level!($($arg)+);
            }
        }
    };
}
pub(crate) use log_limited;

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_burst_then_the_rate_and_the_suppressed_count() {
        let mut b = LogBudget::new(2.0, 3);
        let t = Instant::now();
        assert_eq!((b.allow(t), b.allow(t), b.allow(t)), (Some(0), Some(0), Some(0)));
        assert_eq!(b.allow(t), None);
        assert_eq!(b.allow(t), None);
        assert_eq!(b.allow(t + Duration::from_millis(499)), None);
        // 0.998 + 0.501 s × 2 tokens: two lines, the first reporting the three suppressed.
        assert_eq!(b.allow(t + Duration::from_millis(1000)), Some(3));
        assert_eq!(b.allow(t + Duration::from_millis(1000)), Some(0));
        assert_eq!(b.allow(t + Duration::from_millis(1000)), None);
    }
}
