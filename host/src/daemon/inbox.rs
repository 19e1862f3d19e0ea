//! The hub's inbox: what interface drivers hand the mesh task, one bounded queue per
//! neighbour session, served round robin.
//!
//! A single FIFO in front of a single task lets one busy neighbour set everyone's latency
//! (and, unbounded, everyone's memory). Here each key has its own queue: packets beyond its
//! cap (count or bytes) are dropped at once — mesh traffic is loss-tolerant, and a driver
//! must never wait on a neighbour that floods — while session events (up, down) are never
//! dropped and keep their order with the packets around them. The consumer takes one item
//! per key in turn, so an honest neighbour's packet waits behind at most one item of each
//! other busy neighbour.

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;
use std::sync::{Mutex, MutexGuard};

use tokio::sync::Notify;

/// Per-key limits.
#[derive(Debug, Clone, Copy)]
pub struct InboxLimits {
    /// Packets queued per key.
    pub packets: usize,
    /// Packet bytes queued per key.
    pub bytes: usize,
}

impl Default for InboxLimits {
    fn default() -> Self {
        InboxLimits { packets: 256, bytes: 1 << 20 }
    }
}

/// One queued item.
#[derive(Debug, PartialEq, Eq)]
pub enum Item<E> {
    /// A session event; never dropped.
    Event(E),
    /// A packet.
    Packet(Vec<u8>),
}

struct Queue<E> {
    items: VecDeque<Item<E>>,
    packets: usize,
    bytes: usize,
}

struct State<K, E> {
    queues: HashMap<K, Queue<E>>,
    /// Keys with something queued, in serving order.
    ready: VecDeque<K>,
    closed: bool,
    dropped: u64,
}

/// A fair multi-queue (see the module docs).
pub struct Inbox<K, E> {
    state: Mutex<State<K, E>>,
    notify: Notify,
    limits: InboxLimits,
}

impl<K: Hash + Eq + Clone, E> Inbox<K, E> {
    /// An empty inbox.
    pub fn new(limits: InboxLimits) -> Self {
        Inbox {
            state: Mutex::new(State { queues: HashMap::new(), ready: VecDeque::new(), closed: false, dropped: 0 }),
            notify: Notify::new(),
            limits,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State<K, E>> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn push(&self, key: K, item: Item<E>) -> bool {
        let mut st = self.lock();
        if st.closed {
            return false;
        }
        let State { queues, ready, dropped, .. } = &mut *st;
        let q = queues.entry(key.clone()).or_insert_with(|| Queue { items: VecDeque::new(), packets: 0, bytes: 0 });
        if let Item::Packet(p) = &item {
            if q.packets >= self.limits.packets || q.bytes + p.len() > self.limits.bytes {
                *dropped += 1;
                if q.items.is_empty() {
                    queues.remove(&key);
                }
                return false;
            }
            q.packets += 1;
            q.bytes += p.len();
        }
        if q.items.is_empty() {
            ready.push_back(key);
        }
        q.items.push_back(item);
        drop(st);
        self.notify.notify_one();
        true
    }

    /// Queues a packet from `key`; false when its queue is full (the packet is dropped) or
    /// the inbox is closed.
    pub fn push_packet(&self, key: K, packet: Vec<u8>) -> bool {
        self.push(key, Item::Packet(packet))
    }

    /// Queues a session event for `key`; false only when the inbox is closed.
    pub fn push_event(&self, key: K, event: E) -> bool {
        self.push(key, Item::Event(event))
    }

    /// Takes the next item, one key after the other; None once closed and empty.
    pub fn try_pop(&self) -> Option<(K, Item<E>)> {
        let mut st = self.lock();
        let State { queues, ready, .. } = &mut *st;
        let key = ready.pop_front()?;
        let q = queues.get_mut(&key)?;
        let item = q.items.pop_front()?;
        if let Item::Packet(p) = &item {
            q.packets -= 1;
            q.bytes -= p.len();
        }
        if q.items.is_empty() {
            queues.remove(&key);
        } else {
            ready.push_back(key.clone());
        }
        Some((key, item))
    }

    /// Waits for the next item; None once the inbox is closed and drained.
    pub async fn pop(&self) -> Option<(K, Item<E>)> {
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            // Registered before checking, so a push between the check and the wait wakes us.
            notified.as_mut().enable();
            if let Some(x) = self.try_pop() {
                return Some(x);
            }
            if self.lock().closed {
                return None;
            }
            notified.await;
        }
    }

    /// Refuses further items; `pop` drains what is queued, then returns None.
    pub fn close(&self) {
        self.lock().closed = true;
        self.notify.notify_waiters();
        self.notify.notify_one();
    }

    /// Packets dropped so far because their key's queue was full.
    pub fn dropped(&self) -> u64 {
        self.lock().dropped
    }

    /// Items queued now, all keys.
    pub fn len(&self) -> usize {
        self.lock().queues.values().map(|q| q.items.len()).sum()
    }

    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.lock().ready.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn inbox(packets: usize, bytes: usize) -> Inbox<u8, &'static str> {
        Inbox::new(InboxLimits { packets, bytes })
    }

    #[test]
    fn keys_are_served_in_turn_and_a_flooder_only_fills_its_own_queue() {
        let ib = inbox(3, 1 << 20);
        for _ in 0..10 {
            ib.push_packet(1, vec![1]);
        }
        assert!(ib.push_packet(2, vec![2]));
        assert_eq!(ib.dropped(), 7, "key 1 kept 3 of its 10");
        let order: Vec<u8> = std::iter::from_fn(|| ib.try_pop().map(|(k, _)| k)).collect();
        assert_eq!(order, vec![1, 2, 1, 1]);
    }

    #[test]
    fn events_are_never_dropped_and_keep_their_place() {
        let ib = inbox(1, 8);
        ib.push_event(1, "up");
        ib.push_packet(1, vec![0; 8]);
        assert!(!ib.push_packet(1, vec![0]), "over the cap");
        ib.push_event(1, "down");
        let items: Vec<Item<&str>> = std::iter::from_fn(|| ib.try_pop().map(|(_, i)| i)).collect();
        assert_eq!(items, vec![Item::Event("up"), Item::Packet(vec![0; 8]), Item::Event("down")]);
    }

    #[test]
    fn a_byte_cap_applies_too() {
        let ib = inbox(100, 10);
        assert!(ib.push_packet(1, vec![0; 6]));
        assert!(!ib.push_packet(1, vec![0; 6]));
        assert!(ib.push_packet(1, vec![0; 4]));
    }

    #[tokio::test]
    async fn pop_waits_for_a_push_and_ends_after_close() {
        let ib = std::sync::Arc::new(inbox(4, 100));
        let waiter = {
            let ib = std::sync::Arc::clone(&ib);
            tokio::spawn(async move { ib.pop().await.map(|(k, _)| k) })
        };
        tokio::task::yield_now().await;
        ib.push_packet(7, vec![1]);
        assert_eq!(waiter.await.unwrap(), Some(7));
        ib.push_packet(8, vec![1]);
        ib.close();
        assert!(!ib.push_packet(9, vec![1]));
        assert_eq!(ib.pop().await.map(|(k, _)| k), Some(8));
        assert_eq!(ib.pop().await.map(|(k, _)| k), None);
    }

    proptest! {
        /// Whatever is pushed: per-key caps hold, every key's items come out in the order
        /// they went in, events are never lost, and between two items of one key every
        /// other key that was waiting gets a turn.
        #[test]
        fn caps_order_and_fairness(ops in proptest::collection::vec((0u8..5, any::<bool>(), 0usize..20), 0..300)) {
            let ib: Inbox<u8, u32> = Inbox::new(InboxLimits { packets: 4, bytes: 40 });
            let mut expected: HashMap<u8, VecDeque<Item<u32>>> = HashMap::new();
            for (i, (k, event, len)) in ops.into_iter().enumerate() {
                if event {
                    prop_assert!(ib.push_event(k, i as u32));
                    expected.entry(k).or_default().push_back(Item::Event(i as u32));
                } else if ib.push_packet(k, vec![0; len]) {
                    expected.entry(k).or_default().push_back(Item::Packet(vec![0; len]));
                }
                let st = ib.lock();
                for q in st.queues.values() {
                    prop_assert!(q.packets <= 4 && q.bytes <= 40);
                }
            }
            // Round robin: a key is served only when no other key still holding items has
            // been served fewer times.
            let mut served: HashMap<u8, usize> = HashMap::new();
            while let Some((k, item)) = ib.try_pop() {
                let mine = served.get(&k).copied().unwrap_or(0);
                for (o, q) in &expected {
                    if *o != k && !q.is_empty() {
                        prop_assert!(mine <= served.get(o).copied().unwrap_or(0), "key {} served {} times before {} got {:?}", k, mine, o, served.get(o));
                    }
                }
                prop_assert_eq!(Some(item), expected.get_mut(&k).and_then(VecDeque::pop_front));
                *served.entry(k).or_default() += 1;
            }
            prop_assert!(expected.values().all(VecDeque::is_empty));
        }
    }
}
