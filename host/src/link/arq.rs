//! Selective-repeat ARQ with ordered message delivery, over the plaintext of session
//! packets. Knows nothing of keys or transports: the session seals what [`Arq::poll_packet`]
//! builds and hands [`Arq::on_packet`] what it opened.
//!
//! Plaintext of one session packet:
//!
//! ```text
//! flags u8  (SEG 0x01, FIN 0x02, ACK 0x04, PING 0x08, CLOSE 0x10)
//! [ACK]     next-expected segment u16 | n u8 | n bytes: bit i = segment next+1+i arrived
//! [CLOSE]   reason u8
//! [SEG]     segment u16 | data (rest of the packet; FIN marks the end of a message)
//! ```
//!
//! Segment numbers are 32-bit inside and 16-bit on the wire (the window is far below
//! 2^15, so the closest candidate is the right one). Loss is detected as in QUIC: a
//! segment is lost when one sent three transmissions after it is acknowledged, or when a
//! later one is acknowledged and 9/8 of an RTT has passed; otherwise the retransmission
//! timeout (RFC 6298, with Karn's rule and exponential backoff) recovers the tail.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::{Duration, Instant};

const SEG: u8 = 0x01;
const FIN: u8 = 0x02;
const ACK: u8 = 0x04;
const PING: u8 = 0x08;
const CLOSE: u8 = 0x10;
const PACKET_THRESHOLD: u64 = 3;
/// Most bytes of selective-ack bitmap one packet carries (256 segments beyond the gap).
const MAX_SACK_BYTES: usize = 32;

/// Settings of one direction pair.
#[derive(Debug, Clone)]
pub struct ArqConfig {
    /// Most segments in flight.
    pub max_window: u32,
    /// Largest message accepted or sent.
    pub max_message: usize,
    /// Most bytes queued for sending (beyond that `push` refuses).
    pub send_buffer: usize,
    /// Longest an acknowledgement is held back to be combined with another.
    pub ack_delay: Duration,
    /// Bounds of the retransmission timeout.
    pub min_rto: Duration,
    /// Upper bound of the retransmission timeout.
    pub max_rto: Duration,
    /// Round trip assumed before the first sample.
    pub initial_rtt: Duration,
    /// Declared link rate (0: unknown), for the window.
    pub bitrate_bps: u64,
    /// Plaintext bytes per packet, for the window.
    pub packet_room: usize,
}

/// Why a message was not queued.
#[derive(thiserror::Error, Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum PushError {
    /// Larger than the largest message.
    #[error("message of {len} bytes exceeds the {max}-byte limit")]
    TooLarge {
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The send buffer is full; try again after some of it is acknowledged.
    #[error("send buffer full")]
    Full,
}

/// A packet the session cannot accept.
#[derive(thiserror::Error, Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ArqError {
    /// The plaintext does not parse.
    #[error("malformed session packet")]
    Malformed,
    /// The peer acknowledged a segment that was never sent.
    #[error("acknowledgement of unsent segment")]
    AckOfUnsent,
    /// A message grew past the limit.
    #[error("incoming message exceeds {0} bytes")]
    MessageTooLarge(usize),
}

/// What a packet carried besides data.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Received {
    /// The peer closed the session with this reason.
    pub close: Option<u8>,
    /// The packet was new data or a ping.
    pub eliciting: bool,
}

#[derive(Debug)]
struct Seg {
    data: Vec<u8>,
    fin: bool,
    sent_at: Instant,
    order: u64,
    retx: u32,
    lost: bool,
}

/// One session's ARQ state.
#[derive(Debug)]
pub struct Arq {
    cfg: ArqConfig,
    queue: VecDeque<Vec<u8>>,
    head_off: usize,
    queued_bytes: usize,
    next_seg: u32,
    inflight: BTreeMap<u32, Seg>,
    lost: BTreeSet<u32>,
    tx_order: u64,
    largest_acked_order: u64,
    srtt: Option<Duration>,
    rttvar: Duration,
    latest_rtt: Duration,
    backoff: u32,
    recv_next: u32,
    recv_buf: BTreeMap<u32, (Vec<u8>, bool)>,
    partial: Vec<u8>,
    delivered: VecDeque<Vec<u8>>,
    ack_needed: bool,
    ack_now: bool,
    eliciting_since_ack: u32,
    ack_deadline: Option<Instant>,
    ping: bool,
    close: Option<u8>,
    /// Segments retransmitted (statistics).
    pub retransmits: u64,
}

fn unwrap(reference: u32, wire: u16) -> u32 {
    let base = reference & !0xffff;
    let cand = base | u32::from(wire);
    let alts = [cand.wrapping_sub(0x1_0000), cand, cand.wrapping_add(0x1_0000)];
    alts.into_iter().min_by_key(|c| c.abs_diff(reference)).unwrap_or(cand)
}

impl Arq {
    /// Fresh state.
    pub fn new(cfg: ArqConfig) -> Arq {
        Arq {
            cfg,
            queue: VecDeque::new(),
            head_off: 0,
            queued_bytes: 0,
            next_seg: 0,
            inflight: BTreeMap::new(),
            lost: BTreeSet::new(),
            tx_order: 0,
            largest_acked_order: 0,
            srtt: None,
            rttvar: Duration::ZERO,
            latest_rtt: Duration::ZERO,
            backoff: 0,
            recv_next: 0,
            recv_buf: BTreeMap::new(),
            partial: Vec::new(),
            delivered: VecDeque::new(),
            ack_needed: false,
            ack_now: false,
            eliciting_since_ack: 0,
            ack_deadline: None,
            ping: false,
            close: None,
            retransmits: 0,
        }
    }

    /// Queues a message.
    pub fn push(&mut self, msg: Vec<u8>) -> Result<(), PushError> {
        if msg.len() > self.cfg.max_message {
            return Err(PushError::TooLarge { len: msg.len(), max: self.cfg.max_message });
        }
        if self.queued_bytes + msg.len() > self.cfg.send_buffer && !self.queue.is_empty() {
            return Err(PushError::Full);
        }
        self.queued_bytes += msg.len();
        self.queue.push_back(msg);
        Ok(())
    }

    /// Asks for an acknowledgement from the peer (keepalive).
    pub fn ping(&mut self) {
        self.ping = true;
    }

    /// Sends a close with `reason` in the next packet.
    pub fn close(&mut self, reason: u8) {
        self.close = Some(reason);
    }

    /// The smoothed round trip, once measured.
    pub fn srtt(&self) -> Option<Duration> {
        self.srtt
    }

    fn rtt(&self) -> Duration {
        self.srtt.unwrap_or(self.cfg.initial_rtt)
    }

    /// The current retransmission timeout, with backoff.
    pub fn rto(&self) -> Duration {
        let base = match self.srtt {
            Some(s) => s + (self.rttvar * 4).max(Duration::from_millis(1)) + self.cfg.ack_delay,
            None => self.cfg.initial_rtt * 3,
        };
        let base = base.clamp(self.cfg.min_rto, self.cfg.max_rto);
        base.saturating_mul(1 << self.backoff.min(6)).min(self.cfg.max_rto)
    }

    /// Segments allowed in flight: the bandwidth-delay product of the declared rate and
    /// the measured round trip, twice over, plus two; between 4 and `max_window`.
    pub fn window(&self) -> u32 {
        if self.cfg.bitrate_bps == 0 {
            return self.cfg.max_window;
        }
        let bdp = self.cfg.bitrate_bps as f64 / 8.0 * self.rtt().as_secs_f64();
        let segs = (bdp / self.cfg.packet_room.max(1) as f64).ceil() as u32;
        (segs.saturating_mul(2) + 2).clamp(4.min(self.cfg.max_window), self.cfg.max_window)
    }

    /// Whether nothing is queued, in flight or waiting to be acknowledged.
    pub fn is_idle(&self) -> bool {
        self.queue.is_empty() && self.inflight.is_empty() && !self.ack_needed
    }

    /// Bytes queued or in flight, not yet acknowledged.
    pub fn unacked_bytes(&self) -> usize {
        self.queued_bytes + self.inflight.values().map(|s| s.data.len()).sum::<usize>()
    }

    /// A message that arrived complete and in order.
    pub fn next_message(&mut self) -> Option<Vec<u8>> {
        self.delivered.pop_front()
    }

    fn ack_bytes(&self, room: usize) -> Option<Vec<u8>> {
        if room < 3 {
            return None;
        }
        let mut out = Vec::with_capacity(3 + MAX_SACK_BYTES);
        out.extend_from_slice(&(self.recv_next as u16).to_be_bytes());
        let span = self.recv_buf.keys().next_back().map_or(0, |&top| (top - self.recv_next) as usize);
        let n = span.div_ceil(8).min(MAX_SACK_BYTES).min(room - 3);
        out.push(n as u8);
        let mut bits = vec![0u8; n];
        for &s in self.recv_buf.keys() {
            let i = (s - self.recv_next - 1) as usize;
            if let Some(b) = bits.get_mut(i / 8) {
                *b |= 1 << (i % 8);
            }
        }
        out.extend_from_slice(&bits);
        Some(out)
    }

    /// Builds the next packet's plaintext of at most `room` bytes, or `None` if nothing is
    /// due. `allow_data` is false while the session cannot carry data yet.
    pub fn poll_packet(&mut self, now: Instant, room: usize, allow_data: bool) -> Option<Vec<u8>> {
        let ack_due = self.ack_needed && (self.ack_now || self.ack_deadline.is_some_and(|d| d <= now));
        let mut flags = 0u8;
        let mut body = Vec::new();
        let mut seg: Option<(u32, Vec<u8>, bool)> = None;
        if allow_data {
            if let Some(&s) = self.lost.iter().next() {
                self.lost.remove(&s);
                if let Some(x) = self.inflight.get(&s) {
                    seg = Some((s, x.data.clone(), x.fin));
                }
            }
            if seg.is_none() && !self.queue.is_empty() && self.next_seg - self.send_base() < self.window() {
                let ack_len = if self.ack_needed { 3 + self.sack_len() } else { 0 };
                let close_len = if self.close.is_some() { 1 } else { 0 };
                let space = room.saturating_sub(1 + 2 + ack_len + close_len);
                if space > 0 || self.queue.front().is_some_and(|m| m.len() == self.head_off) {
                    seg = self.cut(space).map(|(d, f)| (self.next_seg, d, f));
                }
            }
        }
        let mut ack = None;
        if self.ack_needed {
            let used = 1 + seg.as_ref().map_or(0, |(_, d, _)| 2 + d.len()) + usize::from(self.close.is_some());
            if seg.is_some() || ack_due || self.ping || self.close.is_some() {
                ack = self.ack_bytes(room.saturating_sub(used));
            }
        }
        if seg.is_none() && ack.is_none() && !self.ping && self.close.is_none() {
            return None;
        }
        if let Some(a) = &ack {
            flags |= ACK;
            body.extend_from_slice(a);
            self.ack_needed = false;
            self.ack_now = false;
            self.eliciting_since_ack = 0;
            self.ack_deadline = None;
        }
        if let Some(reason) = self.close.take() {
            flags |= CLOSE;
            body.push(reason);
        }
        if self.ping {
            flags |= PING;
            self.ping = false;
        }
        if let Some((s, data, fin)) = seg {
            flags |= SEG | if fin { FIN } else { 0 };
            body.extend_from_slice(&(s as u16).to_be_bytes());
            body.extend_from_slice(&data);
            self.tx_order += 1;
            let order = self.tx_order;
            if s == self.next_seg {
                self.next_seg += 1;
                self.inflight.insert(s, Seg { data, fin, sent_at: now, order, retx: 0, lost: false });
            } else if let Some(x) = self.inflight.get_mut(&s) {
                x.sent_at = now;
                x.order = order;
                x.retx += 1;
                x.lost = false;
                self.retransmits += 1;
            }
        }
        let mut out = Vec::with_capacity(1 + body.len());
        out.push(flags);
        out.extend_from_slice(&body);
        Some(out)
    }

    fn sack_len(&self) -> usize {
        let span = self.recv_buf.keys().next_back().map_or(0, |&top| (top - self.recv_next) as usize);
        span.div_ceil(8).min(MAX_SACK_BYTES)
    }

    fn send_base(&self) -> u32 {
        self.inflight.keys().next().copied().unwrap_or(self.next_seg)
    }

    /// Cuts up to `space` bytes from the head message.
    fn cut(&mut self, space: usize) -> Option<(Vec<u8>, bool)> {
        let head = self.queue.front()?;
        let take = (head.len() - self.head_off).min(space);
        let data = head[self.head_off..self.head_off + take].to_vec();
        self.head_off += take;
        let fin = self.head_off == head.len();
        if fin {
            self.queued_bytes -= head.len();
            self.queue.pop_front();
            self.head_off = 0;
        }
        Some((data, fin))
    }

    /// Processes an authenticated packet's plaintext.
    pub fn on_packet(&mut self, now: Instant, p: &[u8]) -> Result<Received, ArqError> {
        let (&flags, mut rest) = p.split_first().ok_or(ArqError::Malformed)?;
        if flags & !(SEG | FIN | ACK | PING | CLOSE) != 0 || (flags & FIN != 0 && flags & SEG == 0) {
            return Err(ArqError::Malformed);
        }
        let mut got = Received::default();
        if flags & ACK != 0 {
            let (head, tail) = rest.split_at_checked(3).ok_or(ArqError::Malformed)?;
            let n = usize::from(head[2]);
            let (sack, tail) = tail.split_at_checked(n).ok_or(ArqError::Malformed)?;
            rest = tail;
            self.on_ack(now, u16::from_be_bytes([head[0], head[1]]), sack)?;
        }
        if flags & CLOSE != 0 {
            let (&reason, tail) = rest.split_first().ok_or(ArqError::Malformed)?;
            rest = tail;
            got.close = Some(reason);
        }
        if flags & PING != 0 {
            got.eliciting = true;
            self.ack_needed = true;
            self.ack_now = true;
        }
        if flags & SEG != 0 {
            let (head, data) = rest.split_at_checked(2).ok_or(ArqError::Malformed)?;
            got.eliciting = true;
            self.on_segment(now, u16::from_be_bytes([head[0], head[1]]), data, flags & FIN != 0)?;
        } else if !rest.is_empty() {
            return Err(ArqError::Malformed);
        }
        Ok(got)
    }

    fn on_ack(&mut self, now: Instant, cum: u16, sack: &[u8]) -> Result<(), ArqError> {
        let cum = unwrap(self.next_seg, cum);
        if cum > self.next_seg {
            return Err(ArqError::AckOfUnsent);
        }
        let mut acked: Vec<u32> = self.inflight.range(..cum).map(|(&s, _)| s).collect();
        for (i, b) in sack.iter().enumerate() {
            for bit in 0..8 {
                if b & (1 << bit) != 0 {
                    let s = cum.wrapping_add(1 + (i * 8 + bit) as u32);
                    if s >= self.next_seg {
                        return Err(ArqError::AckOfUnsent);
                    }
                    if self.inflight.contains_key(&s) {
                        acked.push(s);
                    }
                }
            }
        }
        let mut sample = None;
        for s in acked {
            if let Some(x) = self.inflight.remove(&s) {
                self.lost.remove(&s);
                if x.order > self.largest_acked_order {
                    self.largest_acked_order = x.order;
                    if x.retx == 0 {
                        sample = Some(now.saturating_duration_since(x.sent_at));
                    }
                }
                self.backoff = 0;
            }
        }
        if let Some(r) = sample {
            self.latest_rtt = r;
            match self.srtt {
                None => {
                    self.srtt = Some(r);
                    self.rttvar = r / 2;
                }
                Some(s) => {
                    let diff = s.abs_diff(r);
                    self.rttvar = (self.rttvar * 3 + diff) / 4;
                    self.srtt = Some((s * 7 + r) / 8);
                }
            }
        }
        self.detect_lost(now);
        Ok(())
    }

    fn loss_delay(&self) -> Duration {
        self.rtt().max(self.latest_rtt) * 9 / 8
    }

    fn detect_lost(&mut self, now: Instant) {
        let delay = self.loss_delay();
        for (&s, x) in self.inflight.iter_mut() {
            if x.lost || x.order >= self.largest_acked_order {
                continue;
            }
            if x.order + PACKET_THRESHOLD <= self.largest_acked_order || x.sent_at + delay <= now {
                x.lost = true;
                self.lost.insert(s);
            }
        }
    }

    fn on_segment(&mut self, now: Instant, wire: u16, data: &[u8], fin: bool) -> Result<(), ArqError> {
        let s = unwrap(self.recv_next, wire);
        self.ack_needed = true;
        if s < self.recv_next || self.recv_buf.contains_key(&s) || s >= self.recv_next + self.cfg.max_window {
            // Duplicate or beyond the window: the peer has stale acknowledgement state.
            self.ack_now = true;
            return Ok(());
        }
        if s != self.recv_next || !self.recv_buf.is_empty() {
            self.ack_now = true;
        }
        self.recv_buf.insert(s, (data.to_vec(), fin));
        while let Some((data, fin)) = self.recv_buf.remove(&self.recv_next) {
            if self.partial.len() + data.len() > self.cfg.max_message {
                return Err(ArqError::MessageTooLarge(self.cfg.max_message));
            }
            self.partial.extend_from_slice(&data);
            if fin {
                self.delivered.push_back(std::mem::take(&mut self.partial));
            }
            self.recv_next += 1;
        }
        self.eliciting_since_ack += 1;
        if self.eliciting_since_ack >= 2 {
            self.ack_now = true;
        } else if self.ack_deadline.is_none() {
            self.ack_deadline = Some(now + self.cfg.ack_delay);
        }
        Ok(())
    }

    /// The next instant something is due.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let ack = if self.ack_needed { self.ack_deadline } else { None };
        let rto = self.inflight.values().filter(|x| !x.lost).map(|x| x.sent_at).min().map(|t| t + self.rto());
        let loss = self
            .inflight
            .values()
            .filter(|x| !x.lost && x.order < self.largest_acked_order)
            .map(|x| x.sent_at + self.loss_delay())
            .min();
        [ack, rto, loss].into_iter().flatten().min()
    }

    /// Fires due timers.
    pub fn on_timeout(&mut self, now: Instant) {
        if self.ack_needed && self.ack_deadline.is_some_and(|d| d <= now) {
            self.ack_now = true;
        }
        self.detect_lost(now);
        let rto = self.rto();
        let mut fired = false;
        for (&s, x) in self.inflight.iter_mut() {
            if !x.lost && x.sent_at + rto <= now {
                x.lost = true;
                self.lost.insert(s);
                fired = true;
            }
        }
        if fired {
            self.backoff += 1;
        }
    }

    /// Whether an ack or retransmission is ready to go now.
    pub fn wants_to_send(&self, now: Instant, allow_data: bool) -> bool {
        let ack_due = self.ack_needed && (self.ack_now || self.ack_deadline.is_some_and(|d| d <= now));
        ack_due
            || self.ping
            || self.close.is_some()
            || (allow_data
                && (!self.lost.is_empty()
                    || (!self.queue.is_empty() && self.next_seg - self.send_base() < self.window())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> ArqConfig {
        ArqConfig {
            max_window: 8,
            max_message: 10_000,
            send_buffer: 100_000,
            ack_delay: Duration::from_millis(20),
            min_rto: Duration::from_millis(50),
            max_rto: Duration::from_secs(10),
            initial_rtt: Duration::from_millis(100),
            bitrate_bps: 0,
            packet_room: 50,
        }
    }

    #[test]
    fn unwrap_picks_the_nearest() {
        assert_eq!(unwrap(0x1_fff0, 0x0005), 0x2_0005);
        assert_eq!(unwrap(0x2_0005, 0xfff0), 0x1_fff0);
        assert_eq!(unwrap(5, 3), 3);
    }

    /// Messages cross a lossy, reordering exchange and arrive whole and in order.
    #[test]
    fn messages_survive_loss_and_reordering() {
        let t0 = Instant::now();
        let (mut a, mut b) = (Arq::new(cfg()), Arq::new(cfg()));
        let msgs: Vec<Vec<u8>> = (0..40u8).map(|i| vec![i; usize::from(i) * 7]).collect();
        for m in &msgs {
            a.push(m.clone()).unwrap();
        }
        let mut got = Vec::new();
        let mut now = t0;
        let mut n = 0u32;
        let mut held: Vec<Vec<u8>> = Vec::new();
        for _ in 0..20_000 {
            now += Duration::from_millis(5);
            a.on_timeout(now);
            b.on_timeout(now);
            while let Some(p) = a.poll_packet(now, 50, true) {
                n += 1;
                match n % 7 {
                    0 => {}                 // lost
                    3 => held.push(p),      // delayed: arrives after the next one
                    _ => {
                        b.on_packet(now, &p).unwrap();
                        for h in held.drain(..) {
                            b.on_packet(now, &h).unwrap();
                        }
                    }
                }
            }
            while let Some(p) = b.poll_packet(now, 50, true) {
                n += 1;
                if !n.is_multiple_of(5) {
                    a.on_packet(now, &p).unwrap();
                }
            }
            while let Some(m) = b.next_message() {
                got.push(m);
            }
            if got.len() == msgs.len() && a.is_idle() {
                break;
            }
        }
        assert_eq!(got, msgs);
        assert!(a.retransmits > 0);
    }

    #[test]
    fn bad_input_is_refused() {
        let t0 = Instant::now();
        let mut a = Arq::new(cfg());
        assert_eq!(a.on_packet(t0, &[]), Err(ArqError::Malformed));
        assert_eq!(a.on_packet(t0, &[0x80]), Err(ArqError::Malformed));
        assert_eq!(a.on_packet(t0, &[FIN]), Err(ArqError::Malformed));
        assert_eq!(a.on_packet(t0, &[ACK, 0, 5, 0]), Err(ArqError::AckOfUnsent));
        assert_eq!(a.on_packet(t0, &[ACK, 0, 0, 1, 1]), Err(ArqError::AckOfUnsent));
        assert_eq!(a.on_packet(t0, &[ACK, 0, 0, 2, 0]), Err(ArqError::Malformed));
        assert_eq!(a.push(vec![0; 10_001]), Err(PushError::TooLarge { len: 10_001, max: 10_000 }));
        // A message that never ends is cut off at the limit, not buffered without bound.
        let mut r = Ok(Received::default());
        for s in 0..300u16 {
            let mut p = vec![SEG];
            p.extend_from_slice(&s.to_be_bytes());
            p.extend_from_slice(&[0; 40]);
            r = a.on_packet(t0, &p);
            if r.is_err() {
                break;
            }
        }
        assert_eq!(r, Err(ArqError::MessageTooLarge(10_000)));
    }
}
