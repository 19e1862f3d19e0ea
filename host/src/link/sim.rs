//! A deterministic two-node simulation of the link engine: virtual time, a point-to-point
//! link with a declared bitrate and MTU, and seeded loss, duplication and reordering
//! (in the spirit of smoltcp's `FaultInjector`).
//!
//! Used by the engine's tests and by `benches/link.rs`. Each direction is its own
//! serial line: a frame occupies it for `bytes × 8 / bitrate`, then arrives after the
//! propagation delay unless the fault injector drops it. Nothing here reads a clock or
//! the operating system's randomness, so a seed reproduces a run exactly (ML-DSA's
//! hedged signatures differ from run to run, but never in length or timing).

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::{Duration, Instant};

use antmesh_plugin_api::LinkAddr;

use super::{tx_time, LinkEngine, LinkEvent};

/// The simulated link.
#[derive(Debug, Clone)]
pub struct SimLink {
    /// Rate of each direction, bit/s (0: infinitely fast).
    pub bitrate_bps: u64,
    /// Frames larger than this are dropped (and counted).
    pub mtu: usize,
    /// Propagation delay.
    pub latency: Duration,
    /// Probability a frame is lost.
    pub loss: f64,
    /// Probability a frame arrives twice.
    pub duplicate: f64,
    /// Probability a frame is held back by up to three frame times (reordering).
    pub reorder: f64,
    /// Seed of the fault injector.
    pub seed: u64,
}

impl SimLink {
    /// A clean link.
    pub fn clean(bitrate_bps: u64, mtu: usize) -> SimLink {
        SimLink { bitrate_bps, mtu, latency: Duration::from_millis(10), loss: 0.0, duplicate: 0.0, reorder: 0.0, seed: 1 }
    }
}

/// SplitMix64: tiny, seeded, good enough to drive fault injection.
#[derive(Debug, Clone)]
pub struct SimRng(u64);

impl SimRng {
    /// A generator from `seed`.
    pub fn new(seed: u64) -> SimRng {
        SimRng(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// What happens to a frame in flight; see [`Sim::set_tamper`].
pub enum Verdict {
    /// Deliver it (possibly modified).
    Pass,
    /// Drop it.
    Drop,
}

type Tamper = Box<dyn FnMut(usize, &mut Vec<u8>) -> Verdict>;

/// A frame in flight: arrival time, a sequence number for stable ordering, the receiving
/// node and the bytes.
type InFlight = Reverse<(Instant, u64, usize, Vec<u8>)>;

/// Two engines joined by a simulated link. Node 0 sees node 1 as `Named("b")`, node 1 sees
/// node 0 as `Named("a")`.
pub struct Sim {
    /// The engines.
    pub nodes: [LinkEngine; 2],
    /// The link.
    pub link: SimLink,
    /// Virtual now.
    pub now: Instant,
    /// Start of the run.
    pub t0: Instant,
    rng: SimRng,
    queue: BinaryHeap<InFlight>,
    seq: u64,
    busy_until: [Instant; 2],
    /// Bytes each node put on the air.
    pub bytes_sent: [u64; 2],
    /// Frames each node sent.
    pub frames_sent: [u64; 2],
    /// Frames over the MTU (a bug in the engine if ever non-zero).
    pub oversize: u64,
    /// Every event so far, with the node it came from.
    pub events: Vec<(usize, LinkEvent)>,
    /// Every frame sent so far (node, frame), when `record` is on.
    pub record: Option<Vec<(usize, Vec<u8>)>>,
    /// Errors the engines returned for incoming frames.
    pub frame_errors: Vec<(usize, super::FrameError)>,
    tamper: Option<Tamper>,
}

impl Sim {
    /// Joins `a` and `b` with `link`, starting at `t0`.
    pub fn new(a: LinkEngine, b: LinkEngine, link: SimLink, t0: Instant) -> Sim {
        Sim {
            nodes: [a, b],
            rng: SimRng::new(link.seed),
            link,
            now: t0,
            t0,
            queue: BinaryHeap::new(),
            seq: 0,
            busy_until: [t0; 2],
            bytes_sent: [0; 2],
            frames_sent: [0; 2],
            oversize: 0,
            events: Vec::new(),
            record: None,
            frame_errors: Vec::new(),
            tamper: None,
        }
    }

    /// The address node `k` knows the other node by.
    pub fn peer_addr(k: usize) -> LinkAddr {
        LinkAddr::Named(if k == 0 { "b" } else { "a" }.into())
    }

    /// Lets `f` modify or drop each frame node `k` sends, before the fault injector.
    pub fn set_tamper(&mut self, f: impl FnMut(usize, &mut Vec<u8>) -> Verdict + 'static) {
        self.tamper = Some(Box::new(f));
    }

    /// Removes the tamper hook.
    pub fn clear_tamper(&mut self) {
        self.tamper = None;
    }

    /// Delivers `frame` to node `to` right now, as if the other node had sent it.
    pub fn inject(&mut self, to: usize, frame: &[u8]) -> Result<(), super::FrameError> {
        let from = Self::peer_addr(to);
        let now = self.now;
        let r = self.nodes[to].handle_frame(now, &from, frame);
        self.pump();
        r
    }

    fn send(&mut self, k: usize, mut frame: Vec<u8>) {
        if let Some(rec) = self.record.as_mut() {
            rec.push((k, frame.clone()));
        }
        self.bytes_sent[k] += frame.len() as u64;
        self.frames_sent[k] += 1;
        let start = self.busy_until[k].max(self.now);
        let end = start + tx_time(frame.len(), self.link.bitrate_bps);
        self.busy_until[k] = end;
        if frame.len() > self.link.mtu {
            self.oversize += 1;
            return;
        }
        if let Some(t) = self.tamper.as_mut() {
            if let Verdict::Drop = t(k, &mut frame) {
                return;
            }
        }
        if self.rng.unit() < self.link.loss {
            return;
        }
        let mut at = end + self.link.latency;
        if self.rng.unit() < self.link.reorder {
            let frame_time = tx_time(self.link.mtu, self.link.bitrate_bps).max(Duration::from_millis(1));
            at += frame_time.mul_f64(3.0 * self.rng.unit());
        }
        if self.rng.unit() < self.link.duplicate {
            self.seq += 1;
            self.queue.push(Reverse((at + Duration::from_micros(1), self.seq, 1 - k, frame.clone())));
        }
        self.seq += 1;
        self.queue.push(Reverse((at, self.seq, 1 - k, frame)));
    }

    /// Drains transmits and events of both nodes at the current instant.
    fn pump(&mut self) {
        loop {
            let mut any = false;
            for k in 0..2 {
                while let Some(t) = self.nodes[k].poll_transmit(self.now) {
                    any = true;
                    self.send(k, t.frame);
                }
                while let Some(e) = self.nodes[k].poll_event() {
                    self.events.push((k, e));
                }
            }
            if !any {
                break;
            }
        }
    }

    /// Runs until `done` holds or virtual time passes `limit` after the start of this call.
    /// Returns whether `done` held.
    pub fn run_until(&mut self, limit: Duration, mut done: impl FnMut(&mut Sim) -> bool) -> bool {
        let deadline = self.now + limit;
        loop {
            self.pump();
            if done(self) {
                return true;
            }
            let mut next = self.queue.peek().map(|Reverse((t, ..))| *t);
            for k in 0..2 {
                if let Some(t) = self.nodes[k].poll_timeout(self.now) {
                    next = Some(next.map_or(t, |n| n.min(t)));
                }
            }
            let Some(mut next) = next else {
                // Nothing will ever happen again: time still passes.
                self.now = deadline;
                return false;
            };
            if next <= self.now {
                // A timer due now that handle_timeout did not clear: step past it rather
                // than spin, so a bug shows up as slowness in a test, not a hang.
                next = self.now + Duration::from_millis(1);
            }
            if next > deadline {
                self.now = deadline;
                return false;
            }
            self.now = next;
            while self.queue.peek().is_some_and(|Reverse((t, ..))| *t <= self.now) {
                let Some(Reverse((_, _, to, frame))) = self.queue.pop() else { break };
                let from = Self::peer_addr(to);
                if let Err(e) = self.nodes[to].handle_frame(self.now, &from, &frame) {
                    self.frame_errors.push((to, e));
                }
            }
            for k in 0..2 {
                self.nodes[k].handle_timeout(self.now);
            }
        }
    }

    /// Runs for `d` of virtual time.
    pub fn run_for(&mut self, d: Duration) {
        self.run_until(d, |_| false);
    }

    /// Messages node `k` received so far.
    pub fn messages(&self, k: usize) -> Vec<Vec<u8>> {
        self.events
            .iter()
            .filter_map(|(n, e)| match e {
                LinkEvent::Message { data, .. } if *n == k => Some(data.clone()),
                _ => None,
            })
            .collect()
    }

    /// Whether both nodes hold an authenticated session with each other.
    pub fn connected(&self) -> bool {
        self.nodes[0].session_peer(&Self::peer_addr(0)) == Some(self.nodes[1].peer_id())
            && self.nodes[1].session_peer(&Self::peer_addr(1)) == Some(self.nodes[0].peer_id())
    }

    /// Virtual time since the start.
    pub fn elapsed(&self) -> Duration {
        self.now - self.t0
    }
}
