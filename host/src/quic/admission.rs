//! Who may start a QUIC handshake with this endpoint, and who must first prove their
//! address with a Retry.
//!
//! A QUIC server's first flight costs an ML-KEM-768 encapsulation and an ML-DSA-65
//! signature (~1 ms of CPU and ~7 KB on the wire), and an Initial can come from a spoofed
//! source. So before quinn touches the handshake, [`Admission::decide`] looks at the
//! source IP and what is in flight:
//!
//! 1. a blocked IP is ignored;
//! 2. past `max_connections` (handshakes in flight included) the Initial is refused;
//! 3. past `max_connections_per_ip` from that IP, refused;
//! 4. each IP has a token bucket of handshakes (`handshake_rate` per second, burst
//!    `handshake_burst`): without a token, an unvalidated source is ignored and a validated
//!    one refused (a Retry would not help it: the bucket would still be empty, and a flood
//!    from one address would draw a Retry per packet);
//! 5. an unvalidated source (no Retry token) is sent a Retry once `retry_above`
//!    handshakes are in flight: a spoofer never sees the Retry, so it cannot hold more
//!    than `retry_above` handshakes, each for at most the handshake timeout;
//! 6. past `max_handshakes` in flight, refused.
//!
//! Sans-IO like the rest: time is a parameter, the endpoint reports handshakes and
//! connections ending through the [`Slot`]s it holds.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::budget::{BlockList, Limiter};

/// Limits on inbound handshakes and connections.
#[derive(Debug, Clone, PartialEq)]
pub struct AdmissionConfig {
    /// Most inbound connections, handshakes in flight included.
    pub max_connections: usize,
    /// Most inbound connections (and handshakes) from one IP address.
    pub max_connections_per_ip: usize,
    /// Most handshakes in flight.
    pub max_handshakes: usize,
    /// Handshakes in flight above which unvalidated sources are sent a Retry first.
    pub retry_above: usize,
    /// Handshakes per second one IP may start (token bucket refill).
    pub handshake_rate: f64,
    /// Burst of that bucket.
    pub handshake_burst: u32,
    /// Most source IPs whose buckets are remembered; idle ones are forgotten first.
    pub max_tracked_ips: usize,
}

impl Default for AdmissionConfig {
    /// Loose limits for endpoints among known peers (tests, private deployments): they
    /// stop a flood, not a busy client. [`AdmissionConfig::open`] is for nodes strangers
    /// can reach.
    fn default() -> Self {
        AdmissionConfig {
            max_connections: 1024,
            max_connections_per_ip: 256,
            max_handshakes: 64,
            retry_above: 32,
            handshake_rate: 1000.0,
            handshake_burst: 1000,
            max_tracked_ips: 4096,
        }
    }
}

impl AdmissionConfig {
    /// Limits for a node anyone can reach: 128 inbound connections, 16 per IP, Retry once
    /// 8 handshakes are in flight, and 4 handshakes per second per IP (burst 16). A
    /// spoofed flood then costs at most 8 handshakes per handshake timeout; one IP at most
    /// 4 per second.
    pub fn open() -> AdmissionConfig {
        AdmissionConfig {
            max_connections: 128,
            max_connections_per_ip: 16,
            max_handshakes: 32,
            retry_above: 8,
            handshake_rate: 4.0,
            handshake_burst: 16,
            max_tracked_ips: 4096,
        }
    }
}

/// Why an Initial was not taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Refusal {
    /// The IP is blocked for misbehaving.
    Blocked,
    /// `max_connections` reached.
    ConnectionLimit,
    /// `max_connections_per_ip` reached for this IP.
    IpConnectionLimit,
    /// The IP's handshake bucket is empty.
    IpRate,
    /// `max_handshakes` in flight.
    HandshakeLimit,
}

/// What to do with an Initial.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// Run the handshake.
    Accept,
    /// Send a Retry: the source must prove it receives at its address.
    Retry,
    /// Drop it silently (a spoofed source gets nothing to reflect).
    Ignore(Refusal),
    /// Answer with CONNECTION_REFUSED (the source proved its address).
    Refuse(Refusal),
}

#[derive(Debug)]
struct IpState {
    /// Handshakes it may start.
    bucket: Limiter,
    handshakes: usize,
    connections: usize,
}

/// Admission state of one endpoint.
#[derive(Debug)]
pub struct Admission {
    cfg: AdmissionConfig,
    ips: HashMap<IpAddr, IpState>,
    /// IPs in the order they were first tracked, to forget idle ones.
    order: VecDeque<IpAddr>,
    blocked: BlockList<IpAddr>,
    handshakes: usize,
    connections: usize,
}

/// Most blocked IPs remembered.
const MAX_BLOCKED: usize = 4096;

impl Admission {
    /// Admission under `cfg`.
    pub fn new(cfg: AdmissionConfig) -> Admission {
        Admission { cfg, ips: HashMap::new(), order: VecDeque::new(), blocked: BlockList::new(MAX_BLOCKED), handshakes: 0, connections: 0 }
    }

    /// The limits.
    pub fn config(&self) -> &AdmissionConfig {
        &self.cfg
    }

    /// Handshakes in flight and inbound connections open.
    pub fn counts(&self) -> (usize, usize) {
        (self.handshakes, self.connections)
    }

    /// Decides on an Initial from `ip`; `validated` when it carried a valid Retry token.
    /// [`Admit::Accept`] counts a handshake in flight until [`Admission::handshake_done`].
    pub fn decide(&mut self, now: Instant, ip: IpAddr, validated: bool) -> Admit {
        let no = |r| if validated { Admit::Refuse(r) } else { Admit::Ignore(r) };
        if self.blocked.is_blocked(now, &ip) {
            return Admit::Ignore(Refusal::Blocked);
        }
        if self.handshakes + self.connections >= self.cfg.max_connections {
            return no(Refusal::ConnectionLimit);
        }
        let per_ip = self.cfg.max_connections_per_ip;
        let in_flight = self.handshakes;
        let (retry_above, max_hs) = (self.cfg.retry_above, self.cfg.max_handshakes);
        let Some(st) = self.track(now, ip) else { return no(Refusal::ConnectionLimit) };
        if st.handshakes + st.connections >= per_ip {
            return no(Refusal::IpConnectionLimit);
        }
        if !st.bucket.would_allow(now, 1.0) {
            return no(Refusal::IpRate);
        }
        if !validated && in_flight >= retry_above {
            return Admit::Retry;
        }
        if in_flight >= max_hs {
            return no(Refusal::HandshakeLimit);
        }
        st.bucket.allow(now);
        st.handshakes += 1;
        self.handshakes += 1;
        Admit::Accept
    }

    /// The state of `ip`, tracked from now on; None when the table is full of active IPs.
    fn track(&mut self, now: Instant, ip: IpAddr) -> Option<&mut IpState> {
        if !self.ips.contains_key(&ip) {
            if self.ips.len() >= self.cfg.max_tracked_ips {
                self.forget_idle(now);
            }
            if self.ips.len() >= self.cfg.max_tracked_ips {
                return None;
            }
            let bucket = Limiter::new(self.cfg.handshake_rate, self.cfg.handshake_burst);
            self.ips.insert(ip, IpState { bucket, handshakes: 0, connections: 0 });
            self.order.push_back(ip);
        }
        self.ips.get_mut(&ip)
    }

    /// Forgets IPs with nothing open, oldest first, until a quarter of the table is free
    /// (amortised: one sweep per quarter of `max_tracked_ips` new IPs). An IP forgotten
    /// with an emptied bucket comes back with a full one: the per-IP rate is a best effort
    /// once more IPs than the table holds are active, and `retry_above` still holds.
    fn forget_idle(&mut self, now: Instant) {
        let target = self.cfg.max_tracked_ips - self.cfg.max_tracked_ips / 4;
        let mut kept = VecDeque::with_capacity(self.order.len());
        while let Some(ip) = self.order.pop_front() {
            let idle = self.ips.get(&ip).is_none_or(|s| s.handshakes == 0 && s.connections == 0);
            if idle && self.ips.len() > target {
                self.ips.remove(&ip);
            } else if self.ips.contains_key(&ip) {
                kept.push_back(ip);
            }
        }
        self.order = kept;
        self.blocked.prune(now);
    }

    /// A handshake admitted by `decide` ended; `established` when it became a connection
    /// (counted until [`Admission::connection_closed`]).
    pub fn handshake_done(&mut self, ip: IpAddr, established: bool) {
        self.handshakes = self.handshakes.saturating_sub(1);
        if established {
            self.connections += 1;
        }
        if let Some(st) = self.ips.get_mut(&ip) {
            st.handshakes = st.handshakes.saturating_sub(1);
            if established {
                st.connections += 1;
            }
        }
    }

    /// An inbound connection from `ip` closed.
    pub fn connection_closed(&mut self, ip: IpAddr) {
        self.connections = self.connections.saturating_sub(1);
        if let Some(st) = self.ips.get_mut(&ip) {
            st.connections = st.connections.saturating_sub(1);
        }
    }

    /// Ignores Initials from `ip` until `until`.
    pub fn block(&mut self, now: Instant, ip: IpAddr, until: Instant) {
        self.blocked.block(now, ip, until);
    }

    /// Whether `ip` is blocked at `now`.
    pub fn is_blocked(&self, now: Instant, ip: IpAddr) -> bool {
        self.blocked.is_blocked(now, &ip)
    }
}

/// What an admitted handshake or inbound connection holds: ending it (dropping the slot)
/// tells the admission state.
pub struct Slot {
    admission: Arc<Mutex<Admission>>,
    ip: IpAddr,
    established: bool,
}

impl Slot {
    /// The slot of a handshake `decide` accepted.
    pub fn handshake(admission: Arc<Mutex<Admission>>, ip: IpAddr) -> Slot {
        Slot { admission, ip, established: false }
    }

    /// The handshake became a connection.
    pub fn established(&mut self) {
        if !self.established {
            self.established = true;
            lock(&self.admission).handshake_done(self.ip, true);
        }
    }

    /// The source IP.
    pub fn ip(&self) -> IpAddr {
        self.ip
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut a = lock(&self.admission);
        if self.established {
            a.connection_closed(self.ip);
        } else {
            a.handshake_done(self.ip, false);
        }
    }
}

fn lock(m: &Mutex<Admission>) -> std::sync::MutexGuard<'_, Admission> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The IP a source is counted under: IPv4-mapped IPv6 addresses as their IPv4 address.
pub fn source_ip(addr: std::net::SocketAddr) -> IpAddr {
    match addr.ip() {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    }
}

/// How long a misbehaving peer's IP stays blocked by default.
pub const DEFAULT_BLOCK: Duration = Duration::from_secs(600);

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ip(n: u8) -> IpAddr {
        IpAddr::from([10, 77, 0, n])
    }

    fn cfg() -> AdmissionConfig {
        AdmissionConfig {
            max_connections: 8,
            max_connections_per_ip: 3,
            max_handshakes: 6,
            retry_above: 2,
            handshake_rate: 1.0,
            handshake_burst: 4,
            max_tracked_ips: 16,
        }
    }

    #[test]
    fn unvalidated_sources_get_a_retry_once_handshakes_pile_up() {
        let mut a = Admission::new(cfg());
        let now = Instant::now();
        assert_eq!(a.decide(now, ip(1), false), Admit::Accept);
        assert_eq!(a.decide(now, ip(2), false), Admit::Accept);
        // Two in flight: the next unvalidated source must prove its address first.
        assert_eq!(a.decide(now, ip(3), false), Admit::Retry);
        assert_eq!(a.decide(now, ip(3), true), Admit::Accept);
        a.handshake_done(ip(1), false);
        a.handshake_done(ip(2), false);
        assert_eq!(a.decide(now, ip(4), false), Admit::Accept);
        assert_eq!(a.counts(), (2, 0));
    }

    #[test]
    fn one_ip_is_held_to_its_bucket_and_its_connection_share() {
        let mut a = Admission::new(AdmissionConfig { retry_above: 100, max_handshakes: 100, ..cfg() });
        let now = Instant::now();
        for _ in 0..3 {
            assert_eq!(a.decide(now, ip(1), true), Admit::Accept);
            a.handshake_done(ip(1), true);
        }
        assert_eq!(a.decide(now, ip(1), true), Admit::Refuse(Refusal::IpConnectionLimit));
        a.connection_closed(ip(1));
        a.connection_closed(ip(1));
        a.connection_closed(ip(1));
        // One token left of the burst of 4, then the bucket is empty.
        assert_eq!(a.decide(now, ip(1), true), Admit::Accept);
        a.handshake_done(ip(1), false);
        assert_eq!(a.decide(now, ip(1), true), Admit::Refuse(Refusal::IpRate));
        // Not a Retry: proving its address would not get it a token.
        assert_eq!(a.decide(now, ip(1), false), Admit::Ignore(Refusal::IpRate));
        // Refilled at one per second.
        assert_eq!(a.decide(now + Duration::from_secs(1), ip(1), true), Admit::Accept);
        // Another IP is not affected.
        assert_eq!(a.decide(now, ip(2), true), Admit::Accept);
    }

    #[test]
    fn blocked_ips_are_ignored_until_the_block_ends() {
        let mut a = Admission::new(cfg());
        let now = Instant::now();
        a.block(now, ip(9), now + Duration::from_secs(60));
        assert_eq!(a.decide(now, ip(9), true), Admit::Ignore(Refusal::Blocked));
        assert_eq!(a.decide(now + Duration::from_secs(61), ip(9), true), Admit::Accept);
    }

    #[test]
    fn slots_release_what_they_hold() {
        let adm = Arc::new(Mutex::new(Admission::new(cfg())));
        let now = Instant::now();
        assert_eq!(lock(&adm).decide(now, ip(1), true), Admit::Accept);
        let mut s = Slot::handshake(Arc::clone(&adm), ip(1));
        assert_eq!(lock(&adm).counts(), (1, 0));
        s.established();
        assert_eq!(lock(&adm).counts(), (0, 1));
        drop(s);
        assert_eq!(lock(&adm).counts(), (0, 0));
        assert_eq!(lock(&adm).decide(now, ip(2), true), Admit::Accept);
        drop(Slot::handshake(Arc::clone(&adm), ip(2)));
        assert_eq!(lock(&adm).counts(), (0, 0));
    }

    #[test]
    fn v4_mapped_sources_count_as_v4() {
        let mapped: std::net::SocketAddr = "[::ffff:10.77.0.1]:4242".parse().unwrap();
        assert_eq!(source_ip(mapped), ip(1));
    }

    proptest! {
        /// Whatever arrives, in whatever order: the caps hold, spoofed (unvalidated)
        /// handshakes never exceed `retry_above`, the tracked-IP table stays bounded.
        #[test]
        fn the_caps_hold_under_any_sequence(ops in proptest::collection::vec((0u8..40, any::<bool>(), 0u8..4, 0u64..3000), 1..400)) {
            let c = cfg();
            let mut a = Admission::new(c.clone());
            let start = Instant::now();
            let mut open: Vec<(IpAddr, bool)> = Vec::new();
            let mut unvalidated_in_flight = 0usize;
            for (n, validated, action, ms) in ops {
                let now = start + Duration::from_millis(ms);
                match action {
                    0 | 1 => {
                        if a.decide(now, ip(n), validated) == Admit::Accept {
                            open.push((ip(n), validated));
                            if !validated { unvalidated_in_flight += 1; }
                        }
                    }
                    2 => if let Some((i, v)) = open.pop() {
                        a.handshake_done(i, false);
                        if !v { unvalidated_in_flight -= 1; }
                    },
                    _ => if let Some((i, v)) = open.pop() {
                        a.handshake_done(i, true);
                        a.connection_closed(i);
                        if !v { unvalidated_in_flight -= 1; }
                    },
                }
                let (hs, conns) = a.counts();
                prop_assert!(hs + conns <= c.max_connections);
                prop_assert!(hs <= c.max_handshakes);
                prop_assert!(unvalidated_in_flight <= c.retry_above);
                prop_assert!(a.ips.len() <= c.max_tracked_ips);
                for st in a.ips.values() {
                    prop_assert!(st.handshakes + st.connections <= c.max_connections_per_ip);
                }
            }
        }
    }
}
