//! A bounded outbound queue with the contract's backpressure semantics.
//!
//! `push` never blocks: when the queue is full it returns `WouldBlock` and remembers that a
//! sender was refused. When a consumer has drained the queue to half its capacity it calls
//! `Host::writable` exactly once for that refusal.

use std::collections::VecDeque;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Duration;

use antmesh_plugin_api::{Host, SendError};

struct State<T> {
    queue: VecDeque<T>,
    refused: bool,
    closed: bool,
}

/// The queue. Share it between the `send` side and the writer through an `Arc`.
pub struct Outbox<T> {
    state: Mutex<State<T>>,
    ready: Condvar,
    capacity: usize,
    host: Host,
    wake: Option<Box<dyn Fn() + Send + Sync>>,
}

impl<T> Outbox<T> {
    /// A queue of `capacity` items that signals room to `host`.
    pub fn new(capacity: usize, host: Host) -> Self {
        Outbox {
            state: Mutex::new(State { queue: VecDeque::new(), refused: false, closed: false }),
            ready: Condvar::new(),
            capacity: capacity.max(1),
            host,
            wake: None,
        }
    }

    /// Also calls `wake` whenever the queue goes from empty to non-empty (for writers that
    /// sleep in an event loop rather than on the condition variable).
    pub fn with_waker(mut self, wake: impl Fn() + Send + Sync + 'static) -> Self {
        self.wake = Some(Box::new(wake));
        self
    }

    fn lock(&self) -> MutexGuard<'_, State<T>> {
        // A poisoned lock means a writer panicked mid-operation; the queue itself is still
        // structurally sound, so keep going rather than propagate the panic.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues `item`, or refuses with `WouldBlock` (full) or `Closed`.
    pub fn push(&self, item: T) -> Result<(), SendError> {
        let was_empty = {
            let mut s = self.lock();
            if s.closed {
                return Err(SendError::Closed);
            }
            if s.queue.len() >= self.capacity {
                s.refused = true;
                return Err(SendError::WouldBlock);
            }
            s.queue.push_back(item);
            s.queue.len() == 1
        };
        self.ready.notify_one();
        if was_empty {
            if let Some(w) = &self.wake {
                w();
            }
        }
        Ok(())
    }

    /// Moves up to `max` queued items into `out` without waiting. Returns how many.
    pub fn drain_into(&self, out: &mut Vec<T>, max: usize) -> usize {
        let (n, signal) = {
            let mut s = self.lock();
            let n = s.queue.len().min(max);
            out.extend(s.queue.drain(..n));
            (n, self.take_refusal(&mut s))
        };
        if signal {
            self.host.writable();
        }
        n
    }

    /// Puts items back at the front (a writer that could not send them yet).
    pub fn requeue_front(&self, items: impl DoubleEndedIterator<Item = T>) {
        let mut s = self.lock();
        for it in items.rev() {
            s.queue.push_front(it);
        }
    }

    /// Waits up to `timeout` for items, then moves up to `max` into `out`. Returns `None`
    /// once the queue is closed and empty (the writer should exit).
    pub fn wait_drain(&self, out: &mut Vec<T>, max: usize, timeout: Duration) -> Option<usize> {
        let (n, signal) = {
            let mut s = self.lock();
            if s.queue.is_empty() && !s.closed {
                s = match self.ready.wait_timeout(s, timeout) {
                    Ok((g, _)) => g,
                    Err(p) => p.into_inner().0,
                };
            }
            if s.queue.is_empty() && s.closed {
                return None;
            }
            let n = s.queue.len().min(max);
            out.extend(s.queue.drain(..n));
            (n, self.take_refusal(&mut s))
        };
        if signal {
            self.host.writable();
        }
        Some(n)
    }

    fn take_refusal(&self, s: &mut State<T>) -> bool {
        if s.refused && s.queue.len() <= self.capacity / 2 {
            s.refused = false;
            return true;
        }
        false
    }

    /// Number of queued items.
    pub fn len(&self) -> usize {
        self.lock().queue.len()
    }

    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Drops everything queued (a peer went away) and lets refused senders retry.
    pub fn clear(&self) {
        let signal = {
            let mut s = self.lock();
            s.queue.clear();
            self.take_refusal(&mut s)
        };
        if signal {
            self.host.writable();
        }
    }

    /// Refuses further pushes and wakes the writer so it can exit.
    pub fn close(&self) {
        self.lock().closed = true;
        self.ready.notify_all();
        if let Some(w) = &self.wake {
            w();
        }
    }

    /// Whether `close` was called.
    pub fn is_closed(&self) -> bool {
        self.lock().closed
    }
}
