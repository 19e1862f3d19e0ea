//! Handshake messages cut into MTU-sized fragments, and put back together.
//!
//! A handshake message is cut into at most 256 fragments of equal size (the last may be
//! shorter). The receiver stores fragments by index in a buffer bounded by the largest
//! message of that kind, so memory never depends on what a peer claims; duplicates and
//! reordering are harmless. Loss is repaired by the [`Outgoing`] side from the receiver's
//! have-bitmaps (`HsAck`).

use std::time::Instant;

use super::wire::{bitmap_len, Frame, Kind, FRAGMENT_HEADER_LEN};

/// A handshake message on its way out.
#[derive(Debug)]
pub struct Outgoing {
    /// Encoded fragment frames.
    frames: Vec<Vec<u8>>,
    acked: Vec<bool>,
    /// Fragment indices waiting to be (re)sent, in order.
    queue: std::collections::VecDeque<usize>,
    /// When the last fragment went out.
    pub last_sent: Option<Instant>,
    /// Retransmission rounds so far.
    pub rounds: u32,
}

/// A message needs more than 256 fragments at this MTU.
#[derive(thiserror::Error, Debug, Clone, Copy, PartialEq, Eq)]
#[error("a {len}-byte handshake message needs more than 256 fragments at MTU {mtu}")]
pub struct TooManyFragments {
    /// Message length.
    pub len: usize,
    /// MTU.
    pub mtu: usize,
}

impl Outgoing {
    /// Cuts `msg` into fragment frames of at most `mtu` bytes.
    pub fn new(kind: Kind, tag: u16, msg: &[u8], mtu: usize) -> Result<Outgoing, TooManyFragments> {
        let room = mtu.saturating_sub(FRAGMENT_HEADER_LEN);
        let err = TooManyFragments { len: msg.len(), mtu };
        if room == 0 || msg.is_empty() {
            return Err(err);
        }
        let count = msg.len().div_ceil(room);
        let last = u8::try_from(count - 1).map_err(|_| err)?;
        let frames: Vec<Vec<u8>> = msg
            .chunks(room)
            .zip(0..=last)
            .map(|(bytes, index)| Frame::Fragment { kind, tag, index, last, bytes }.encode())
            .collect();
        Ok(Outgoing {
            acked: vec![false; frames.len()],
            queue: (0..frames.len()).collect(),
            frames,
            last_sent: None,
            rounds: 0,
        })
    }

    /// The next frame to send, if any is queued.
    pub fn next_frame(&mut self, now: Instant) -> Option<Vec<u8>> {
        while let Some(i) = self.queue.pop_front() {
            if self.acked.get(i) == Some(&false) {
                self.last_sent = Some(now);
                return self.frames.get(i).cloned();
            }
        }
        None
    }

    /// Whether frames are waiting to go out.
    pub fn has_queued(&self) -> bool {
        self.queue.iter().any(|&i| self.acked.get(i) == Some(&false))
    }

    /// Bytes in all fragments together.
    pub fn total_bytes(&self) -> usize {
        self.frames.iter().map(Vec::len).sum()
    }

    /// Index of the last fragment.
    pub fn last_index(&self) -> usize {
        self.frames.len().saturating_sub(1)
    }

    /// Applies a have-bitmap: marks what arrived and queues every fragment that did not.
    /// Returns whether everything is acknowledged.
    pub fn on_ack(&mut self, last: u8, have: &[u8]) -> bool {
        if usize::from(last) != self.last_index() || have.len() != bitmap_len(last) {
            return self.all_acked();
        }
        let mut missing = Vec::new();
        for i in 0..self.frames.len() {
            let got = have.get(i / 8).is_some_and(|b| b & (1 << (i % 8)) != 0);
            if got {
                if let Some(a) = self.acked.get_mut(i) {
                    if !*a {
                        // Progress: the path works, so probing starts from the short timeout again.
                        self.rounds = 0;
                    }
                    *a = true;
                }
            } else {
                missing.push(i);
            }
        }
        for i in missing {
            if !self.queue.contains(&i) {
                self.queue.push_back(i);
            }
        }
        self.all_acked()
    }

    /// Marks everything acknowledged (the peer answered with the next message).
    pub fn ack_all(&mut self) {
        self.acked.iter_mut().for_each(|a| *a = true);
        self.queue.clear();
    }

    /// Whether the peer has every fragment.
    pub fn all_acked(&self) -> bool {
        self.acked.iter().all(|a| *a)
    }

    /// After a timeout: queue the last unacknowledged fragment as a probe, so that the
    /// receiver answers with a have-bitmap instead of everything being resent blind.
    pub fn queue_probe(&mut self) {
        self.rounds += 1;
        if let Some(i) = (0..self.frames.len()).rev().find(|&i| self.acked.get(i) == Some(&false)) {
            if !self.queue.contains(&i) {
                self.queue.push_back(i);
            }
        }
    }
}

/// Why a fragment was not accepted.
#[derive(thiserror::Error, Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ReassemblyError {
    /// Fragments of one message disagree about its last index.
    #[error("fragments disagree on the message length ({0} vs {1} fragments)")]
    Inconsistent(u16, u16),
    /// The message would exceed the largest message of its kind.
    #[error("handshake message larger than {max} bytes")]
    TooLarge {
        /// The bound.
        max: usize,
    },
}

/// A handshake message coming in.
#[derive(Debug)]
pub struct Reassembly {
    max: usize,
    last: Option<u8>,
    slots: Vec<Option<Vec<u8>>>,
    bytes: usize,
    /// When the last new fragment arrived.
    pub last_progress: Option<Instant>,
}

impl Reassembly {
    /// An empty buffer for a message of at most `max` bytes.
    pub fn new(max: usize) -> Reassembly {
        Reassembly { max, last: None, slots: Vec::new(), bytes: 0, last_progress: None }
    }

    /// Stores one fragment. Returns whether it was new.
    pub fn insert(&mut self, now: Instant, index: u8, last: u8, bytes: &[u8]) -> Result<bool, ReassemblyError> {
        match self.last {
            Some(l) if l != last => return Err(ReassemblyError::Inconsistent(u16::from(l) + 1, u16::from(last) + 1)),
            Some(_) => {}
            None => {
                // Each fragment is at least one byte, so the count alone can rule it out.
                if usize::from(last) + 1 > self.max {
                    return Err(ReassemblyError::TooLarge { max: self.max });
                }
                self.last = Some(last);
                self.slots = vec![None; usize::from(last) + 1];
            }
        }
        let Some(slot) = self.slots.get_mut(usize::from(index)) else {
            return Ok(false);
        };
        if slot.is_some() {
            return Ok(false);
        }
        if self.bytes + bytes.len() > self.max {
            return Err(ReassemblyError::TooLarge { max: self.max });
        }
        self.bytes += bytes.len();
        *slot = Some(bytes.to_vec());
        self.last_progress = Some(now);
        Ok(true)
    }

    /// Whether every fragment is here.
    pub fn complete(&self) -> bool {
        self.last.is_some() && self.slots.iter().all(Option::is_some)
    }

    /// Whether any fragment arrived.
    pub fn started(&self) -> bool {
        self.last.is_some()
    }

    /// The message, once complete.
    pub fn assemble(&self) -> Option<Vec<u8>> {
        if !self.complete() {
            return None;
        }
        let mut out = Vec::with_capacity(self.bytes);
        for s in self.slots.iter().flatten() {
            out.extend_from_slice(s);
        }
        Some(out)
    }

    /// The HsAck for this message: its last index and the have-bitmap.
    pub fn have(&self) -> Option<(u8, Vec<u8>)> {
        let last = self.last?;
        let mut bits = vec![0u8; bitmap_len(last)];
        for (i, s) in self.slots.iter().enumerate() {
            if s.is_some() {
                if let Some(b) = bits.get_mut(i / 8) {
                    *b |= 1 << (i % 8);
                }
            }
        }
        Some((last, bits))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn now() -> Instant {
        Instant::now()
    }

    proptest! {
        /// Fragments arriving in any order, with duplicates and some lost then repaired from
        /// have-bitmaps, give back the message.
        #[test]
        fn fragments_reassemble_in_any_order(
            msg in proptest::collection::vec(any::<u8>(), 1..7000),
            mtu in 48usize..1500,
            order in proptest::collection::vec(any::<u16>(), 0..600),
            drop_mask in any::<u64>(),
        ) {
            let Ok(mut out) = Outgoing::new(Kind::Reply, 9, &msg, mtu) else {
                prop_assert!(msg.len().div_ceil(mtu - FRAGMENT_HEADER_LEN) > 256);
                return Ok(());
            };
            let mut frames = Vec::new();
            while let Some(f) = out.next_frame(now()) {
                prop_assert!(f.len() <= mtu);
                frames.push(f);
            }
            let mut rx = Reassembly::new(7000);
            let deliver = |rx: &mut Reassembly, f: &[u8]| {
                if let Ok(Frame::Fragment { index, last, bytes, .. }) = Frame::decode(f) {
                    rx.insert(now(), index, last, bytes).unwrap();
                }
            };
            // First pass: shuffled, duplicated, lossy.
            for (k, o) in order.iter().enumerate() {
                let i = usize::from(*o) % frames.len();
                if drop_mask & (1 << (k % 64)) == 0 {
                    deliver(&mut rx, &frames[i]);
                }
            }
            // Repair rounds driven by have-bitmaps; the first fragment may never have arrived.
            for _ in 0..3 {
                if rx.complete() { break; }
                match rx.have() {
                    Some((last, have)) => { out.on_ack(last, &have); }
                    None => out.queue_probe(),
                }
                if !out.has_queued() { out.queue_probe(); }
                while let Some(f) = out.next_frame(now()) {
                    deliver(&mut rx, &f);
                }
            }
            if !rx.complete() {
                // One more have-bitmap repairs everything once any fragment arrived.
                let (last, have) = rx.have().unwrap();
                out.on_ack(last, &have);
                while let Some(f) = out.next_frame(now()) {
                    deliver(&mut rx, &f);
                }
            }
            prop_assert_eq!(rx.assemble().unwrap(), msg);
        }
    }

    #[test]
    fn bounds_hold_whatever_the_peer_claims() {
        let mut rx = Reassembly::new(100);
        assert_eq!(rx.insert(now(), 0, 200, b"x"), Err(ReassemblyError::TooLarge { max: 100 }));
        let mut rx = Reassembly::new(10);
        assert_eq!(rx.insert(now(), 0, 1, &[0; 8]), Ok(true));
        assert_eq!(rx.insert(now(), 0, 1, &[0; 8]), Ok(false));
        assert_eq!(rx.insert(now(), 1, 2, &[0; 1]), Err(ReassemblyError::Inconsistent(2, 3)));
        assert_eq!(rx.insert(now(), 1, 1, &[0; 3]), Err(ReassemblyError::TooLarge { max: 10 }));
        assert!(!rx.complete());
        assert_eq!(rx.insert(now(), 1, 1, &[0; 2]), Ok(true));
        assert_eq!(rx.assemble().unwrap().len(), 10);
    }

    #[test]
    fn too_many_fragments_is_an_error() {
        assert!(Outgoing::new(Kind::Hello, 1, &[0; 257 * 43], 48).is_err());
        assert!(Outgoing::new(Kind::Hello, 1, &[0; 256 * 43], 48).is_ok());
        assert!(Outgoing::new(Kind::Hello, 1, &[], 48).is_err());
    }
}
