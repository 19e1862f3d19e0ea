//! Token buckets: how much of something a peer (or everyone together) may make this node
//! do per second — verify a signature, decapsulate, answer, log a line.
//!
//! Time is a parameter, as everywhere in the protocol code.

use std::collections::HashMap;
use std::hash::Hash;
use std::time::{Duration, Instant};

/// A token bucket: `burst` tokens at most, refilled at `per_sec`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limiter {
    per_sec: f64,
    burst: f64,
    tokens: f64,
    at: Option<Instant>,
}

impl Limiter {
    /// A full bucket.
    pub const fn new(per_sec: f64, burst: u32) -> Limiter {
        Limiter { per_sec, burst: burst as f64, tokens: burst as f64, at: None }
    }

    fn refill(&mut self, now: Instant) {
        let since = self.at.map_or(0.0, |t| now.saturating_duration_since(t).as_secs_f64());
        self.tokens = (self.tokens + since * self.per_sec).min(self.burst);
        self.at = Some(now);
    }

    /// Takes `n` tokens if there are that many.
    pub fn take(&mut self, now: Instant, n: f64) -> bool {
        self.refill(now);
        if self.tokens >= n {
            self.tokens -= n;
            true
        } else {
            false
        }
    }

    /// Takes one token if there is one.
    pub fn allow(&mut self, now: Instant) -> bool {
        self.take(now, 1.0)
    }

    /// Whether `n` tokens would be there at `now`, without taking them.
    pub fn would_allow(&self, now: Instant, n: f64) -> bool {
        let mut probe = *self;
        probe.take(now, n)
    }

    /// Whether the bucket is full again at `now` (nothing to remember about it).
    pub fn is_full(&self, now: Instant) -> bool {
        let mut probe = *self;
        probe.refill(now);
        probe.tokens >= probe.burst
    }
}

/// One bucket per key (a neighbour, a destination), in a bounded map: full buckets are
/// forgotten when room is needed, and when every bucket is in use a new key is refused —
/// failing closed, so that many keys cannot buy more than the map holds.
#[derive(Debug, Clone)]
pub struct KeyedLimiter<K> {
    template: Limiter,
    buckets: HashMap<K, Limiter>,
    max_keys: usize,
    /// No sweep for full buckets before this: while new keys keep coming and every bucket
    /// is in use, a sweep per key would make each refusal cost the whole map.
    next_sweep: Option<Instant>,
}

/// Least time between two sweeps of a full [`KeyedLimiter`] that freed nothing.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

impl<K: Hash + Eq + Clone> KeyedLimiter<K> {
    /// `per_sec` and `burst` per key, at most `max_keys` keys remembered.
    pub fn new(per_sec: f64, burst: u32, max_keys: usize) -> Self {
        KeyedLimiter { template: Limiter::new(per_sec, burst), buckets: HashMap::new(), max_keys: max_keys.max(1), next_sweep: None }
    }

    /// Takes one token from `key`'s bucket.
    pub fn allow(&mut self, now: Instant, key: &K) -> bool {
        if !self.buckets.contains_key(key) && self.buckets.len() >= self.max_keys {
            if self.next_sweep.is_some_and(|t| now < t) {
                return false;
            }
            self.buckets.retain(|_, b| !b.is_full(now));
            if self.buckets.len() >= self.max_keys {
                self.next_sweep = Some(now + SWEEP_EVERY);
                return false;
            }
        }
        self.buckets.entry(key.clone()).or_insert(self.template).allow(now)
    }

    /// Forgets `key` (a neighbour that went away).
    pub fn forget(&mut self, key: &K) {
        self.buckets.remove(key);
    }

    /// Keys remembered now.
    pub fn len(&self) -> usize {
        self.buckets.len()
    }

    /// Whether no key is remembered.
    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }
}

/// Keys (peers, addresses) refused until an instant, at most `max` of them: beyond, a
/// new block is not recorded until old ones expire — the blocked party is disconnected
/// either way, and the list cannot be grown without bound by getting blocked.
#[derive(Debug, Clone)]
pub struct BlockList<K> {
    until: HashMap<K, Instant>,
    max: usize,
}

impl<K: Hash + Eq> BlockList<K> {
    /// An empty list holding at most `max` keys.
    pub fn new(max: usize) -> Self {
        BlockList { until: HashMap::new(), max: max.max(1) }
    }

    /// Refuses `key` until `until` (a key already listed gets the new instant).
    pub fn block(&mut self, now: Instant, key: K, until: Instant) {
        if self.until.len() >= self.max && !self.until.contains_key(&key) {
            self.prune(now);
            if self.until.len() >= self.max {
                return;
            }
        }
        self.until.insert(key, until);
    }

    /// Whether `key` is refused at `now`.
    pub fn is_blocked(&self, now: Instant, key: &K) -> bool {
        self.until.get(key).is_some_and(|u| *u > now)
    }

    /// Forgets the blocks that ended.
    pub fn prune(&mut self, now: Instant) {
        self.until.retain(|_, u| *u > now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_bucket_allows_its_burst_then_its_rate() {
        let mut l = Limiter::new(2.0, 3);
        let t = Instant::now();
        assert_eq!((0..5).filter(|_| l.allow(t)).count(), 3);
        assert!(!l.would_allow(t + Duration::from_millis(400), 1.0));
        assert!(l.would_allow(t + Duration::from_millis(500), 1.0));
        assert!(l.allow(t + Duration::from_millis(500)));
        assert!(!l.allow(t + Duration::from_millis(500)));
        assert!(l.is_full(t + Duration::from_secs(2)));
    }

    #[test]
    fn keyed_buckets_are_bounded_and_fail_closed() {
        let mut k = KeyedLimiter::new(1.0, 1, 2);
        let t = Instant::now();
        assert!(k.allow(t, &1) && k.allow(t, &2));
        assert!(!k.allow(t, &3), "both buckets in use: a third key is refused");
        // A second later both are full again and may be forgotten.
        assert!(k.allow(t + Duration::from_secs(1), &3));
        assert!(k.len() <= 2);
    }

    #[test]
    fn a_full_map_is_swept_at_most_once_a_second() {
        let mut k = KeyedLimiter::new(1000.0, 1, 1);
        let t = Instant::now();
        assert!(k.allow(t, &1));
        assert!(!k.allow(t, &2), "the one bucket is in use");
        // Its bucket is full again after a millisecond, but the failed sweep holds for a
        // second: new keys are refused without another look at the map.
        assert!(!k.allow(t + Duration::from_millis(500), &2));
        assert!(k.allow(t + Duration::from_secs(1), &2));
    }

    #[test]
    fn block_lists_expire_and_are_bounded() {
        let mut b = BlockList::new(2);
        let t = Instant::now();
        b.block(t, 1, t + Duration::from_secs(10));
        b.block(t, 2, t + Duration::from_secs(1));
        b.block(t, 3, t + Duration::from_secs(10));
        assert!(b.is_blocked(t, &1) && b.is_blocked(t, &2));
        assert!(!b.is_blocked(t, &3), "the list is full of live blocks");
        let later = t + Duration::from_secs(2);
        assert!(!b.is_blocked(later, &2));
        b.block(later, 3, later + Duration::from_secs(10));
        assert!(b.is_blocked(later, &3), "an expired block made room");
        b.block(later, 1, later + Duration::from_secs(60));
        assert!(b.is_blocked(later + Duration::from_secs(30), &1), "a listed key's block is extended");
    }

    proptest! {
        /// Over any window, what passes is at most burst + rate × window.
        #[test]
        fn never_more_than_burst_plus_rate(gaps in proptest::collection::vec(0u64..2000, 1..200), rate in 0.1f64..50.0, burst in 1u32..20) {
            let mut l = Limiter::new(rate, burst);
            let start = Instant::now();
            let mut t = start;
            let mut passed = 0u32;
            for g in gaps {
                t += Duration::from_millis(g);
                if l.allow(t) {
                    passed += 1;
                }
                let window = t.saturating_duration_since(start).as_secs_f64();
                prop_assert!(f64::from(passed) <= f64::from(burst) + rate * window + 1e-9);
            }
        }
    }
}
