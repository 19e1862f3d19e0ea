//! The outbound queue: runs of datagrams, bounded in datagrams.
//!
//! A [`Run`] holds consecutive datagrams for one destination in one buffer, every one of
//! them `seg` bytes except possibly the last: exactly the shape a QUIC transmit has, and
//! the shape the kernel's UDP segmentation offload (`UDP_SEGMENT`) takes in one call.
//! A `send_batch` of ten datagrams is one run, one allocation, one lock and at most one
//! wake of the I/O thread.
//!
//! Backpressure is the plugin kit's `Outbox` contract, counted in datagrams: a push that
//! finds the queue at capacity is refused with `WouldBlock` (a batch is taken up to the
//! capacity, in order), and once the I/O thread has drained the queue to half its capacity
//! it calls `Host::writable` exactly once for that refusal.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Mutex, MutexGuard};

use antmesh_plugin_api::{Host, SendError};

/// Consecutive datagrams for one destination.
#[derive(Debug)]
pub(crate) struct Run {
    /// Destination.
    pub to: SocketAddr,
    /// The datagrams back to back.
    pub data: Vec<u8>,
    /// Datagram size: every datagram is `seg` bytes except possibly the last (0 only for a
    /// run of one empty datagram).
    pub seg: usize,
    /// Bytes of `data` already sent (a multiple of `seg`).
    pub off: usize,
    /// Datagrams not sent yet.
    pub left: usize,
}

impl Run {
    /// A run of one datagram.
    pub fn new(to: SocketAddr, first: &[u8], capacity: usize) -> Run {
        let mut data = Vec::with_capacity(capacity.max(first.len()));
        data.extend_from_slice(first);
        Run { to, data, seg: first.len(), off: 0, left: 1 }
    }

    /// Appends `datagram` if it keeps the run's shape (same destination is the caller's
    /// business): not after a short datagram, not longer than the first, not empty.
    pub fn try_push(&mut self, datagram: &[u8]) -> bool {
        if self.seg == 0 || datagram.is_empty() || datagram.len() > self.seg || !self.data.len().is_multiple_of(self.seg) {
            return false;
        }
        self.data.extend_from_slice(datagram);
        self.left += 1;
        true
    }

    /// Keeps only the first `n` (≥ 1) unsent datagrams.
    fn truncate(&mut self, n: usize) {
        if n < self.left {
            self.data.truncate(self.off + n * self.seg);
            self.left = n;
        }
    }
}

struct State {
    runs: VecDeque<Run>,
    /// Datagrams in `runs`.
    frames: usize,
    refused: bool,
    closed: bool,
}

/// The queue between `send`/`send_batch` and the I/O thread.
pub(crate) struct SendQueue {
    state: Mutex<State>,
    capacity: usize,
    host: Host,
    wake: Box<dyn Fn() + Send + Sync>,
}

impl SendQueue {
    /// A queue of `capacity` datagrams; `wake` runs when it goes from empty to non-empty.
    pub fn new(capacity: usize, host: Host, wake: impl Fn() + Send + Sync + 'static) -> SendQueue {
        SendQueue {
            state: Mutex::new(State { runs: VecDeque::new(), frames: 0, refused: false, closed: false }),
            capacity: capacity.max(1),
            host,
            wake: Box::new(wake),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Nothing panics while the lock is held; a poisoned queue is still consistent.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues the datagrams of `runs`, in order, up to the capacity. Returns how many were
    /// taken and, if not all, why the next one was not (`WouldBlock` or `Closed`).
    pub fn push(&self, runs: impl IntoIterator<Item = Run>) -> (usize, Option<SendError>) {
        let (taken, refused, was_empty) = {
            let mut s = self.lock();
            if s.closed {
                return (0, Some(SendError::Closed));
            }
            let was_empty = s.runs.is_empty();
            let mut taken = 0;
            let mut refused = false;
            for mut run in runs {
                let room = self.capacity.saturating_sub(s.frames);
                if room == 0 {
                    refused = true;
                    break;
                }
                if run.left > room {
                    run.truncate(room);
                    refused = true;
                }
                taken += run.left;
                s.frames += run.left;
                s.runs.push_back(run);
                if refused {
                    break;
                }
            }
            if refused {
                s.refused = true;
            }
            (taken, refused, was_empty)
        };
        if was_empty && taken > 0 {
            (self.wake)();
        }
        (taken, refused.then_some(SendError::WouldBlock))
    }

    /// Moves whole runs into `out` until at least `max_frames` datagrams (or everything)
    /// are taken. Returns how many datagrams were moved.
    pub fn drain_into(&self, out: &mut Vec<Run>, max_frames: usize) -> usize {
        let (n, signal) = {
            let mut s = self.lock();
            let mut n = 0;
            while n < max_frames {
                let Some(run) = s.runs.pop_front() else { break };
                n += run.left;
                out.push(run);
            }
            s.frames -= n;
            let signal = s.refused && s.frames <= self.capacity / 2;
            if signal {
                s.refused = false;
            }
            (n, signal)
        };
        if signal {
            self.host.writable();
        }
        n
    }

    /// Puts unsent runs back at the front, in their order (the kernel pushed back).
    pub fn requeue_front(&self, runs: impl DoubleEndedIterator<Item = Run>) {
        let mut s = self.lock();
        for run in runs.rev() {
            s.frames += run.left;
            s.runs.push_front(run);
        }
    }

    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.lock().runs.is_empty()
    }

    /// Datagrams queued.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.lock().frames
    }

    /// Refuses further pushes (`Closed`) and wakes the I/O thread.
    pub fn close(&self) {
        self.lock().closed = true;
        (self.wake)();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use antmesh_plugin_kit::testing::{Event, Harness};
    use std::time::Duration;

    fn addr() -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 9))
    }

    fn run_of(sizes: &[usize]) -> Run {
        let mut r = Run::new(addr(), &vec![1; sizes[0]], 0);
        for &s in &sizes[1..] {
            assert!(r.try_push(&vec![2; s]));
        }
        r
    }

    #[test]
    fn runs_keep_their_shape() {
        let mut r = run_of(&[10, 10, 4]);
        assert_eq!((r.left, r.seg, r.data.len()), (3, 10, 24));
        assert!(!r.try_push(&[0; 4]), "nothing after a short datagram");
        let mut r2 = run_of(&[10]);
        assert!(!r2.try_push(&[0; 11]), "nothing longer than the first");
        assert!(!r2.try_push(&[]), "no empty datagram");
        let mut empty = Run::new(addr(), &[], 0);
        assert!(!empty.try_push(&[1]));
        assert_eq!(empty.left, 1);
        r.truncate(2);
        assert_eq!((r.left, r.data.len()), (2, 20));
    }

    #[test]
    fn a_batch_is_taken_up_to_capacity_then_writable_follows_the_drain() {
        let h = Harness::new();
        let q = SendQueue::new(8, h.host.clone(), || {});
        assert_eq!(q.push([run_of(&[5; 6])]), (6, None));
        assert_eq!(q.push([run_of(&[5; 3]), run_of(&[7])]), (2, Some(SendError::WouldBlock)));
        assert_eq!(q.len(), 8);
        assert_eq!(q.push([run_of(&[5])]), (0, Some(SendError::WouldBlock)));
        let mut out = Vec::new();
        assert_eq!(q.drain_into(&mut out, 1), 6, "whole runs");
        assert!(h.wait(Duration::from_secs(2), |e| matches!(e, Event::Writable)).is_some());
        assert_eq!(out[0].left, 6);
        out.clear();
        assert_eq!(q.drain_into(&mut out, 100), 2);
        assert_eq!(out[0].data.len(), 10, "the refused tail is not kept");
        q.requeue_front(out.drain(..));
        assert_eq!(q.len(), 2);
        q.close();
        assert_eq!(q.push([run_of(&[1])]), (0, Some(SendError::Closed)));
    }
}
