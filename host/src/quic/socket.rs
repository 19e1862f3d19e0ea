//! quinn's socket, lent by a datagram transport plugin (the UDP plugin).
//!
//! [`PluginSocket`] implements quinn's `AsyncUdpSocket` over the host's
//! [`Transport`](crate::transport::Transport) interface. The plugin owns the real socket and
//! its threads; nothing async crosses the boundary.
//!
//! - **Sending.** `try_send` hands a whole quinn transmit (up to [`MAX_TRANSMIT_SEGMENTS`]
//!   datagrams, cut at its segment size) to the plugin's non-blocking `send_batch` in one
//!   call; the udp plugin turns it into one segmentation offload send. A `WouldBlock` parks
//!   quinn's poller until the plugin's `writable` event.
//! - **Receiving, pull.** Where the plugin implements the contract's optional `recv_pull`
//!   (the udp plugin does), quinn's endpoint driver has the plugin read the socket straight
//!   into quinn's receive slots, in `poll_recv`, on quinn's own thread: no copy on the host
//!   side and no thread hop while data keeps coming, as with quinn's own socket. When a pull
//!   finds nothing, the plugin owes a `readable` event, which arrives through the event
//!   channel and wakes the driver. Receive-offload trains land in one slot each, cut at
//!   their stride by quinn ([`MAX_RECEIVE_SEGMENTS`] sizes the slots for 64 KiB trains).
//! - **Receiving, push** (plugins without `recv_pull`, and what was delivered before the
//!   first pull). quinn's endpoint driver reads the transport's event channel itself, in
//!   `poll_recv`: no task in between. Consecutive equal-size datagrams from one sender
//!   share one of quinn's receive slots, so quinn allocates once per train rather than per
//!   datagram. A received datagram is copied twice on the host side: out of the plugin's
//!   buffer in `deliver` (it is only lent), and into quinn's.
//! - **Path MTU.** `may_fragment()` is false, so quinn runs path MTU discovery as on its
//!   own socket: a datagram plugin carrying QUIC should send with the don't-fragment bit
//!   (the udp plugin does, `dont_fragment`). One that lets the kernel fragment still works,
//!   only less efficiently where the path MTU is below quinn's probes.
//! - **Send errors** other than `WouldBlock` and `Closed` lose the datagrams concerned and
//!   are logged at debug level, as quinn's own socket treats `sendmsg` errors: an error
//!   would end the connection, and QUIC recovers from loss. `TooLarge` is what an MTU probe
//!   above the plugin's MTU gets.
//!
//! **A transmit the plugin takes only part of.** quinn's `try_send` is all or nothing: an
//! error means "nothing of this transmit was sent, try it again", success means "all of it
//! was". `send_batch` may take a prefix (its queue filled up in the middle). Reporting an
//! error then would make quinn send the prefix twice; reporting success and forgetting the
//! rest would lose datagrams (QUIC would recover, at the price of a congestion response).
//! So the socket keeps the untaken rest (copied; one transmit's tail per concurrent sender
//! at most) and reports success: the tail goes first, before any later transmit, on the
//! next `try_send` or as soon as the plugin says `writable`, whichever comes first. While a
//! tail is waiting, a `try_send` that cannot flush it returns `WouldBlock`, so nothing
//! overtakes it and the memory stays bounded. A tail refused for another reason than
//! `WouldBlock` is dropped, as above.

use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use antmesh_plugin_api::abi_stable::std_types::{RSlice, RSliceMut};
use antmesh_plugin_api::{LinkAddr, OutFrame, RecvSlot, SendError, TransportAddr};
use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, UdpPoller};

use crate::transport::{EventReceiver, FrameBatch, SharedTransport, TransportEvent};

/// Datagrams queued for quinn before further ones are dropped (as a full socket buffer
/// would drop them; QUIC recovers).
pub const INBOUND_QUEUE: usize = 8192;

/// Transport events taken per `poll_recv` at most.
const EVENTS_PER_POLL: usize = 64;

/// The most datagrams quinn puts in one transmit (what quinn's own socket allows with GSO):
/// they reach the plugin in one `send_batch`.
pub const MAX_TRANSMIT_SEGMENTS: usize = 10;

/// The most datagrams handed to quinn in one receive slot: consecutive equal-size datagrams
/// from one sender share a slot, as with receive offload on quinn's own socket. quinn sizes
/// its receive buffer to this (× its maximum datagram size × its batch of 32 slots: 3 MB of
/// address space per endpoint at the default 1472-byte datagram, as quinn's own socket on
/// Linux). 64 because a pulling plugin reads receive-offload trains of up to 64 KiB straight
/// into these slots: a smaller slot would cut trains short.
pub const MAX_RECEIVE_SEGMENTS: usize = 64;

/// Why a transport cannot carry QUIC.
#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum SocketError {
    /// The transport is not a datagram transport with an MTU of at least 1200 bytes.
    #[error("interface `{interface}` cannot carry QUIC: {why}")]
    Unsuitable {
        /// Interface name.
        interface: String,
        /// What is missing.
        why: String,
    },
    /// The transport reports no IP address of its own.
    #[error("interface `{0}` reports no local UDP address")]
    NoLocalAddress(String),
}

/// A batch of frames as the transport delivered it; quinn has had those before `next`.
struct Queued {
    frames: FrameBatch,
    next: usize,
}

/// Waits for the transport's next event.
type NextEvent = Pin<Box<dyn Future<Output = Result<TransportEvent, async_channel::RecvError>> + Send>>;

struct Inbound {
    /// The transport's events, read by `poll_recv` (that is, by quinn's endpoint driver):
    /// frames for quinn, `writable` for the senders.
    events: EventReceiver,
    /// The wait for the next event, once the channel was found empty.
    wait: Option<NextEvent>,
    /// Batches as delivered, in order.
    batches: VecDeque<Queued>,
    /// Frames in `batches` that quinn has not had yet.
    queued: usize,
    dropped: u64,
    closed: bool,
    /// Whether the transport reads into quinn's buffers itself (`recv_pull`); `None` until
    /// the first try.
    pull: Option<bool>,
}

impl Inbound {
    /// The next event if there is one now; otherwise registers `cx` for the next one.
    /// `Some(None)`: the channel has ended.
    fn next_event(&mut self, cx: &mut Context) -> Option<Option<TransportEvent>> {
        match self.events.try_recv() {
            Ok(ev) => return Some(Some(ev)),
            Err(async_channel::TryRecvError::Closed) => return Some(None),
            Err(async_channel::TryRecvError::Empty) => {}
        }
        let events = &self.events;
        let wait = self.wait.get_or_insert_with(|| {
            let rx = events.clone();
            Box::pin(async move { rx.recv().await })
        });
        match wait.as_mut().poll(cx) {
            Poll::Ready(r) => {
                self.wait = None;
                Some(r.ok())
            }
            Poll::Pending => None,
        }
    }

    /// Queues a delivered batch, dropping what does not fit (as a full socket buffer would).
    fn push(&mut self, mut frames: FrameBatch) {
        let room = INBOUND_QUEUE.saturating_sub(self.queued);
        if frames.len() > room {
            self.dropped += (frames.len() - room) as u64;
            frames.truncate(room);
        }
        if !frames.is_empty() {
            self.queued += frames.len();
            self.batches.push_back(Queued { frames, next: 0 });
        }
    }

    /// Fills quinn's slots with queued frames; returns how many slots are full.
    fn fill(&mut self, bufs: &mut [IoSliceMut<'_>], meta: &mut [RecvMeta]) -> usize {
        let mut n = 0;
        while n < bufs.len().min(meta.len()) {
            let Some(q) = self.batches.front_mut() else { break };
            let Some((from, data)) = q.frames.get(q.next) else {
                self.batches.pop_front();
                continue;
            };
            q.next += 1;
            self.queued -= 1;
            let Some(addr) = from.socket_addr() else { continue };
            let buf = &mut bufs[n];
            // quinn's receive buffers hold a maximum-size datagram (times the segments);
            // a longer one cannot be a valid QUIC packet, so it is dropped, not truncated.
            if data.len() > buf.len() {
                self.dropped += 1;
                continue;
            }
            buf[..data.len()].copy_from_slice(data);
            // What receive offload does: the datagrams that follow from the same sender,
            // as long as the first (none after a shorter one), share the slot; quinn cuts
            // them apart at `stride`, with one allocation for them all.
            let seg = data.len();
            let mut len = seg;
            let mut count = 1;
            while seg > 0 && count < MAX_RECEIVE_SEGMENTS && len == count * seg {
                match q.frames.get(q.next) {
                    Some((f, d)) if f == from && !d.is_empty() && d.len() <= seg && len + d.len() <= buf.len() => {
                        buf[len..len + d.len()].copy_from_slice(d);
                        len += d.len();
                        count += 1;
                        q.next += 1;
                        self.queued -= 1;
                    }
                    _ => break,
                }
            }
            let m = &mut meta[n];
            m.addr = addr;
            m.len = len;
            m.stride = seg;
            m.ecn = None;
            m.dst_ip = None;
            n += 1;
        }
        while self.batches.front().is_some_and(|q| q.next >= q.frames.len()) {
            self.batches.pop_front();
        }
        n
    }
}

#[derive(Default)]
struct Writable {
    /// The generation (see [`Shared::generation`]) read before the last refused send.
    blocked_at: Option<u64>,
    wakers: Vec<Waker>,
}

/// The datagrams of a transmit the plugin has not taken yet (see the module docs).
struct Tail {
    to: LinkAddr,
    data: Vec<u8>,
    seg: usize,
}

struct Shared {
    transport: SharedTransport,
    inbound: Mutex<Inbound>,
    writable: Mutex<Writable>,
    /// Bumped on every `writable` event from the plugin (before its wakers are taken).
    generation: AtomicU64,
    /// Tails in transmit order: one, except when concurrent senders (connections) each
    /// left one before seeing the other's.
    tails: Mutex<VecDeque<Tail>>,
    /// Whether `tails` holds something (read without the lock on every send).
    has_tail: AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shared {
    /// Remembers a refusal seen by a send that started at `generation`: quinn's poller
    /// waits for a `writable` event counted after that.
    fn blocked(&self, generation: u64) {
        lock(&self.writable).blocked_at = Some(generation);
    }

    /// Sends `data` cut into `seg`-byte datagrams in one `send_batch`. Returns how many
    /// bytes the plugin took and, if not all, why not.
    fn send_segments(&self, to: &LinkAddr, data: &[u8], seg: usize) -> (usize, Option<SendError>) {
        if data.len() <= seg {
            return match self.transport.send(to, data) {
                Ok(()) => (data.len(), None),
                Err(e) => (0, Some(e)),
            };
        }
        let frames: Vec<OutFrame<'_>> =
            data.chunks(seg).map(|d| OutFrame { to: to.clone(), data: RSlice::from_slice(d) }).collect();
        let r = self.transport.send_batch(&frames);
        let accepted = (r.accepted as usize).min(frames.len());
        if accepted == frames.len() {
            return (data.len(), None);
        }
        // A plugin that stops a batch without saying why is treated as full.
        (accepted * seg, Some(r.error.into_option().unwrap_or(SendError::WouldBlock)))
    }

    /// Sends the waiting tails, if any. True once nothing waits any more (sent, or dropped
    /// for a reason other than backpressure), false if some of it still waits (the plugin
    /// said `WouldBlock`; its `writable` follows).
    fn flush_tails(&self) -> bool {
        let generation = self.generation.load(Ordering::Acquire);
        let mut tails = lock(&self.tails);
        while let Some(tail) = tails.front_mut() {
            match self.send_segments(&tail.to, &tail.data, tail.seg) {
                (_, None) => {}
                (taken, Some(SendError::WouldBlock)) => {
                    tail.data.drain(..taken);
                    self.blocked(generation);
                    return false;
                }
                (taken, Some(e)) => {
                    let interface = self.transport.interface();
                    tracing::debug!(interface, "dropped {} unsent bytes of a transmit: {e}", tail.data.len() - taken);
                }
            }
            tails.pop_front();
        }
        self.has_tail.store(false, Ordering::Release);
        true
    }

    /// The plugin has room again: a waiting tail goes now (not whenever quinn sends next;
    /// if the plugin refuses again, it owes another `writable`), then the senders retry.
    fn on_writable(&self) {
        // Bump first, then look for a tail (SeqCst on both sides): a sender that stores its
        // tail concurrently either sees the new generation and flushes itself, or its tail
        // is visible here. See `try_send`.
        self.generation.fetch_add(1, Ordering::SeqCst);
        if self.has_tail.load(Ordering::SeqCst) {
            self.flush_tails();
        }
        self.wake_senders();
    }

    fn wake_senders(&self) {
        let wakers = std::mem::take(&mut lock(&self.writable).wakers);
        wakers.into_iter().for_each(Waker::wake);
    }

    /// Keeps the untaken rest of a transmit (see the module docs).
    fn keep_tail(&self, tail: Tail) {
        let mut tails = lock(&self.tails);
        tails.push_back(tail);
        self.has_tail.store(true, Ordering::SeqCst);
    }
}

/// A transport instance as quinn's socket.
pub struct PluginSocket {
    local: SocketAddr,
    shared: Arc<Shared>,
}

impl fmt::Debug for PluginSocket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PluginSocket")
            .field("interface", &self.shared.transport.interface())
            .field("local", &self.local)
            .finish()
    }
}

impl PluginSocket {
    /// Wraps `transport`. Its events are read by quinn's endpoint driver (in `poll_recv`),
    /// so hand the socket to a quinn endpoint: until then the plugin's `deliver` waits once
    /// [`EVENT_QUEUE`](crate::plugin::native::EVENT_QUEUE) events are pending.
    pub fn new(transport: SharedTransport, events: EventReceiver) -> Result<Arc<PluginSocket>, SocketError> {
        let caps = transport.capabilities();
        let unsuitable = |why: &str| SocketError::Unsuitable { interface: transport.interface().to_owned(), why: why.to_owned() };
        if caps.framing != antmesh_plugin_api::Framing::Datagram {
            return Err(unsuitable("it is not a datagram transport"));
        }
        if caps.mtu < 1200 {
            return Err(unsuitable(&format!("its MTU {} is below QUIC's 1200", caps.mtu)));
        }
        let local = transport
            .local_addresses()
            .into_iter()
            .find_map(|a| match a {
                TransportAddr::Udp(sa) => Some(sa),
                _ => None,
            })
            .ok_or_else(|| SocketError::NoLocalAddress(transport.interface().to_owned()))?;
        let shared = Arc::new(Shared {
            transport,
            inbound: Mutex::new(Inbound {
                events,
                wait: None,
                batches: VecDeque::new(),
                queued: 0,
                dropped: 0,
                closed: false,
                pull: None,
            }),
            writable: Mutex::new(Writable::default()),
            generation: AtomicU64::new(0),
            tails: Mutex::new(VecDeque::new()),
            has_tail: AtomicBool::new(false),
        });
        Ok(Arc::new(PluginSocket { local, shared }))
    }

    /// The transport underneath.
    pub fn transport(&self) -> &SharedTransport {
        &self.shared.transport
    }

    /// Datagrams dropped because quinn fell behind.
    pub fn dropped(&self) -> u64 {
        lock(&self.shared.inbound).dropped
    }
}

/// Most of quinn's receive slots lent to one `recv_pull` (quinn offers its batch of 32).
const PULL_SLOTS: usize = 64;

/// Lets the transport read straight into quinn's buffers (see `Transport::recv_pull`).
/// `None`: it cannot. `Some(n)`: `n` slots filled (0: nothing now, a `Readable` follows).
fn pull(transport: &SharedTransport, local: SocketAddr, bufs: &mut [IoSliceMut<'_>], meta: &mut [RecvMeta]) -> Option<usize> {
    let k = bufs.len().min(meta.len()).min(PULL_SLOTS);
    let mut slots: Vec<RecvSlot<'_>> = bufs
        .iter_mut()
        .take(k)
        .map(|b| RecvSlot { buf: RSliceMut::from_mut_slice(&mut b[..]), from: LinkAddr::Broadcast, len: 0, stride: 0 })
        .collect();
    let filled = transport.recv_pull(&mut slots)?.min(k);
    for (slot, m) in slots.iter().zip(meta.iter_mut()).take(filled) {
        let len = (slot.len as usize).min(slot.buf.len());
        m.len = len;
        m.stride = match slot.stride as usize {
            0 => len,
            s => s,
        };
        m.ecn = None;
        m.dst_ip = None;
        match slot.from.socket_addr() {
            Some(addr) => m.addr = addr,
            // Not an IP sender (a plugin bug): an empty slot, which quinn drops.
            None => {
                m.addr = local;
                m.len = 0;
            }
        }
    }
    Some(filled)
}

struct Poller {
    shared: Arc<Shared>,
}

impl fmt::Debug for Poller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PluginSocketPoller")
    }
}

impl UdpPoller for Poller {
    fn poll_writable(self: Pin<&mut Self>, cx: &mut Context) -> Poll<io::Result<()>> {
        let mut w = lock(&self.shared.writable);
        match w.blocked_at {
            // A writable event came after the refusal: try again.
            Some(at) if self.shared.generation.load(Ordering::Acquire) > at => {
                w.blocked_at = None;
                Poll::Ready(Ok(()))
            }
            Some(_) => {
                if !w.wakers.iter().any(|k| k.will_wake(cx.waker())) {
                    w.wakers.push(cx.waker().clone());
                }
                Poll::Pending
            }
            None => Poll::Ready(Ok(())),
        }
    }
}

impl AsyncUdpSocket for PluginSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        Box::pin(Poller { shared: Arc::clone(&self.shared) })
    }

    fn try_send(&self, transmit: &Transmit) -> io::Result<()> {
        let shared = &self.shared;
        if shared.has_tail.load(Ordering::Acquire) {
            // An earlier transmit's rest goes first; until it has, nothing overtakes it.
            if !shared.flush_tails() {
                return Err(io::Error::from(io::ErrorKind::WouldBlock));
            }
        }
        let generation = shared.generation.load(Ordering::Acquire);
        let to = LinkAddr::from(transmit.destination);
        let data = transmit.contents;
        let seg = transmit.segment_size.unwrap_or(data.len()).max(1);
        match shared.send_segments(&to, data, seg) {
            (_, None) => Ok(()),
            (0, Some(SendError::WouldBlock)) => {
                shared.blocked(generation);
                Err(io::Error::from(io::ErrorKind::WouldBlock))
            }
            // The instance is gone: the connection cannot go on.
            (0, Some(SendError::Closed)) => Err(io::Error::from(io::ErrorKind::NotConnected)),
            // Part of the transmit is queued: it is sent (see the module docs).
            (taken, Some(SendError::WouldBlock)) => {
                shared.keep_tail(Tail { to, data: data[taken..].to_vec(), seg });
                // A `writable` that arrived between the refusal and keep_tail found no tail
                // to flush; no other one is owed, so flush now.
                if shared.generation.load(Ordering::SeqCst) != generation {
                    shared.flush_tails();
                }
                Ok(())
            }
            // Anything else loses these datagrams only, as quinn's own socket treats send
            // errors: an error here would end the connection, and QUIC recovers from loss.
            // (`TooLarge` is what an MTU probe above the plugin's MTU gets.)
            (taken, Some(e)) => {
                let interface = shared.transport.interface();
                tracing::debug!(interface, "{} bytes of a transmit not sent: {e}", data.len() - taken);
                Ok(())
            }
        }
    }

    fn poll_recv(&self, cx: &mut Context, bufs: &mut [IoSliceMut<'_>], meta: &mut [RecvMeta]) -> Poll<io::Result<usize>> {
        let mut writable = false;
        let mut ended = false;
        let mut guard = lock(&self.shared.inbound);
        let inb = &mut *guard;
        // Take what the transport has delivered into the bounded queue first (beyond
        // [`INBOUND_QUEUE`] frames are dropped, as by a full socket buffer), so the channel
        // does not hold whole batches while quinn is behind. Bounded per call; quinn comes
        // back until this returns `Pending`.
        let mut waiting = false;
        for _ in 0..EVENTS_PER_POLL {
            if inb.closed {
                break;
            }
            match inb.next_event(cx) {
                Some(Some(TransportEvent::Frames(frames))) => inb.push(frames),
                Some(Some(TransportEvent::Writable)) => writable = true,
                // Pull mode: the socket has something again; the pull below reads it.
                Some(Some(TransportEvent::Readable)) => {}
                // Links are a connection-oriented notion; QUIC keeps its own liveness.
                Some(Some(TransportEvent::LinkUp(_) | TransportEvent::LinkDown { .. })) => {}
                Some(None) => {
                    inb.closed = true;
                    ended = true;
                }
                None => {
                    // `cx` is woken by the next event.
                    waiting = true;
                    break;
                }
            }
        }
        let mut n = inb.fill(bufs, meta);
        if n == 0 && !inb.closed && inb.pull != Some(false) {
            // After the events: a `Readable` sent after this pull finds the waker the event
            // loop registered (or is the event it stopped at).
            match pull(&self.shared.transport, self.local, bufs, meta) {
                None => inb.pull = Some(false),
                Some(filled) => {
                    inb.pull = Some(true);
                    n = filled;
                }
            }
        }
        // A closed transport simply delivers nothing more: an error would make quinn's
        // driver log a spurious I/O failure during an orderly shutdown.
        let result = if n > 0 { Poll::Ready(Ok(n)) } else { Poll::Pending };
        if n == 0 && !waiting && !inb.closed {
            // Stopped at the bound with nothing for quinn (all `writable`s, or all
            // dropped): events are left, so come back.
            cx.waker().wake_by_ref();
        }
        drop(guard);
        if writable {
            self.shared.on_writable();
        }
        if ended {
            // Senders waiting for room retry, and see the end.
            self.shared.wake_senders();
        }
        result
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.local)
    }

    fn max_transmit_segments(&self) -> usize {
        MAX_TRANSMIT_SEGMENTS
    }

    fn max_receive_segments(&self) -> usize {
        MAX_RECEIVE_SEGMENTS
    }

    fn may_fragment(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::{CloseError, Transport};
    use antmesh_plugin_api::abi_stable::std_types::{RNone, ROption};
    use antmesh_plugin_api::{BatchResult, Capabilities, Duplex, Framing, LatencyClass, Reliability};

    const LOCAL: ([u8; 4], u16) = ([127, 0, 0, 1], 4000);

    /// A datagram (or train) waiting for a pull: sender, bytes, stride.
    type Pullable = (LinkAddr, Vec<u8>, u32);

    /// A transport that records what it is given and takes as many frames as told.
    #[derive(Default)]
    struct Mock {
        /// Per call: the frames' lengths.
        sent: Mutex<Vec<Vec<usize>>>,
        /// Frames the next calls take (`None`: all), and the error past them.
        take: Mutex<Option<(usize, SendError)>>,
        /// `Some`: the transport pulls, and these are waiting (sender, bytes, stride); a pull
        /// that finds none arms `armed`.
        pullable: Mutex<Option<VecDeque<Pullable>>>,
        armed: AtomicBool,
    }

    impl Mock {
        fn accept(&self, frames: usize) -> (usize, Option<SendError>) {
            match lock(&self.take).clone() {
                Some((n, e)) if n < frames => (n, Some(e)),
                _ => (frames, None),
            }
        }
    }

    impl Transport for Mock {
        fn interface(&self) -> &str {
            "mock"
        }
        fn scheme(&self) -> &str {
            "udp"
        }
        fn capabilities(&self) -> Capabilities {
            Capabilities {
                mtu: 1472,
                bitrate_bps: 0,
                latency: LatencyClass::Wan,
                broadcast: false,
                duplex: Duplex::Full,
                reliability: Reliability::Lossy,
                framing: Framing::Datagram,
                link_layer_acks: false,
                metered: false,
                power_constrained: false,
                peer_liveness: false,
            }
        }
        fn local_addresses(&self) -> Vec<TransportAddr> {
            vec![TransportAddr::Udp(SocketAddr::from(LOCAL))]
        }
        fn send(&self, _: &LinkAddr, frame: &[u8]) -> Result<(), SendError> {
            match self.accept(1) {
                (1, _) => {
                    lock(&self.sent).push(vec![frame.len()]);
                    Ok(())
                }
                (_, e) => Err(e.unwrap_or(SendError::WouldBlock)),
            }
        }
        fn send_batch(&self, frames: &[OutFrame<'_>]) -> BatchResult {
            let (n, e) = self.accept(frames.len());
            if n > 0 {
                lock(&self.sent).push(frames[..n].iter().map(|f| f.data.len()).collect());
            }
            BatchResult { accepted: n as u32, error: e.map_or(RNone, ROption::RSome) }
        }
        fn close(&self) -> Result<(), CloseError> {
            Ok(())
        }
        fn recv_pull(&self, slots: &mut [RecvSlot<'_>]) -> Option<usize> {
            let mut pullable = lock(&self.pullable);
            let waiting = pullable.as_mut()?;
            let mut n = 0;
            while n < slots.len() {
                let Some((from, data, stride)) = waiting.pop_front() else { break };
                let slot = &mut slots[n];
                slot.buf.as_mut_slice()[..data.len()].copy_from_slice(&data);
                slot.from = from;
                slot.len = data.len() as u32;
                slot.stride = stride;
                n += 1;
            }
            if n == 0 {
                self.armed.store(true, Ordering::SeqCst);
            }
            Some(n)
        }
    }

    fn socket() -> (Arc<PluginSocket>, Arc<Mock>, async_channel::Sender<TransportEvent>) {
        let mock = Arc::new(Mock::default());
        let (tx, rx) = async_channel::bounded(16);
        let t: SharedTransport = mock.clone();
        (PluginSocket::new(t, rx).unwrap(), mock, tx)
    }

    fn peer() -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 5000))
    }

    /// nine 1200-byte datagrams and a 500-byte one
    fn transmit(contents: &[u8]) -> Transmit<'_> {
        Transmit { destination: peer(), ecn: None, contents, segment_size: Some(1200), src_ip: None }
    }

    fn poll_recv(s: &PluginSocket, slots: usize) -> Poll<io::Result<Vec<RecvMeta>>> {
        let mut storage = vec![vec![0u8; 1472 * MAX_RECEIVE_SEGMENTS]; slots];
        let mut bufs: Vec<IoSliceMut<'_>> = storage.iter_mut().map(|b| IoSliceMut::new(b)).collect();
        let mut meta = vec![RecvMeta::default(); slots];
        let mut cx = Context::from_waker(Waker::noop());
        s.poll_recv(&mut cx, &mut bufs, &mut meta).map_ok(|n| meta[..n].to_vec())
    }

    #[test]
    fn a_transmit_goes_in_one_batch() {
        let (s, mock, _tx) = socket();
        assert!(s.max_transmit_segments() > 1);
        let data = vec![7u8; 9 * 1200 + 500];
        s.try_send(&transmit(&data)).unwrap();
        assert_eq!(*lock(&mock.sent), vec![[vec![1200; 9], vec![500]].concat()]);
    }

    #[test]
    fn a_partly_taken_transmit_is_finished_first_and_nothing_is_sent_twice() {
        let (s, mock, tx) = socket();
        let data = vec![7u8; 9 * 1200 + 500];
        *lock(&mock.take) = Some((4, SendError::WouldBlock));
        // Four taken: success for quinn, the other six wait.
        s.try_send(&transmit(&data)).unwrap();
        // The tail still does not fit: this transmit is refused whole.
        *lock(&mock.take) = Some((0, SendError::WouldBlock));
        let next = vec![8u8; 2400];
        assert_eq!(s.try_send(&transmit(&next)).unwrap_err().kind(), io::ErrorKind::WouldBlock);
        let mut poller = Arc::clone(&s).create_io_poller();
        let mut cx = Context::from_waker(Waker::noop());
        assert!(poller.as_mut().poll_writable(&mut cx).is_pending());
        // Room again: the `writable` event flushes the tail and releases the poller.
        *lock(&mock.take) = None;
        tx.try_send(TransportEvent::Writable).unwrap();
        assert!(poll_recv(&s, 4).is_pending());
        assert!(poller.as_mut().poll_writable(&mut cx).is_ready());
        s.try_send(&transmit(&next)).unwrap();
        let sent = lock(&mock.sent).clone();
        assert_eq!(sent, vec![vec![1200; 4], [vec![1200; 5], vec![500]].concat(), vec![1200; 2]]);
    }

    #[test]
    fn send_errors_lose_datagrams_but_a_closed_transport_ends_the_connection() {
        let (s, mock, _tx) = socket();
        let data = vec![7u8; 2400];
        *lock(&mock.take) = Some((0, SendError::TooLarge { size: 2000, mtu: 1472 }));
        s.try_send(&transmit(&data)).unwrap();
        *lock(&mock.take) = Some((1, SendError::BadAddress("x".into())));
        s.try_send(&transmit(&data)).unwrap();
        *lock(&mock.take) = Some((0, SendError::Closed));
        assert_eq!(s.try_send(&transmit(&data)).unwrap_err().kind(), io::ErrorKind::NotConnected);
    }

    #[test]
    fn trains_share_a_slot() {
        let (s, _mock, tx) = socket();
        let a = LinkAddr::from(peer());
        let b = LinkAddr::from(SocketAddr::from(([127, 0, 0, 1], 6000)));
        let mut frames = vec![(a.clone(), vec![1u8; 1200]); 3];
        frames.push((a.clone(), vec![2u8; 500]));
        frames.push((a.clone(), vec![3u8; 1200])); // after a short one: a new slot
        frames.push((b, vec![4u8; 1200]));
        frames.push((a.clone(), vec![5u8; 2000]));
        tx.try_send(TransportEvent::Frames(frames.into_iter().collect())).unwrap();
        tx.try_send(TransportEvent::Frames([(a, vec![6u8; 100])].into_iter().collect())).unwrap();
        let Poll::Ready(Ok(meta)) = poll_recv(&s, 8) else { panic!("nothing received") };
        let shape: Vec<(u16, usize, usize)> = meta.iter().map(|m| (m.addr.port(), m.len, m.stride)).collect();
        assert_eq!(shape, vec![(5000, 4100, 1200), (5000, 1200, 1200), (6000, 1200, 1200), (5000, 2000, 2000), (5000, 100, 100)]);
        assert!(poll_recv(&s, 8).is_pending());
    }

    #[test]
    fn an_oversized_datagram_is_dropped_and_the_slots_stay_in_order() {
        let (s, _mock, tx) = socket();
        let a = LinkAddr::from(peer());
        let frames = vec![(a.clone(), vec![1u8; 100]), (a.clone(), vec![2u8; 2000]), (a, vec![3u8; 50])];
        tx.try_send(TransportEvent::Frames(frames.into_iter().collect())).unwrap();
        let mut storage = vec![vec![0u8; 1500]; 4];
        let mut bufs: Vec<IoSliceMut<'_>> = storage.iter_mut().map(|b| IoSliceMut::new(b)).collect();
        let mut meta = vec![RecvMeta::default(); 4];
        let mut cx = Context::from_waker(Waker::noop());
        let Poll::Ready(Ok(n)) = s.poll_recv(&mut cx, &mut bufs, &mut meta) else { panic!("nothing received") };
        assert_eq!((n, meta[0].len, meta[1].len), (2, 100, 50));
        assert_eq!(s.dropped(), 1);
    }

    /// With a pulling transport, quinn's slots are filled by the transport itself: trains
    /// keep their stride, what was delivered before the first pull goes first, an empty pull
    /// leaves the driver waiting, and `Readable` brings it back.
    #[test]
    fn a_pulling_transport_fills_quinn_slots_itself() {
        let (s, mock, tx) = socket();
        let a = LinkAddr::from(peer());
        *lock(&mock.pullable) = Some(VecDeque::from([(a.clone(), vec![9u8; 3 * 1200 + 40], 1200)]));
        // Delivered before the transport was first pulled: handed over first.
        tx.try_send(TransportEvent::Frames([(a.clone(), vec![1u8; 300])].into_iter().collect())).unwrap();
        let Poll::Ready(Ok(meta)) = poll_recv(&s, 4) else { panic!("nothing received") };
        assert_eq!(meta.iter().map(|m| (m.len, m.stride)).collect::<Vec<_>>(), vec![(300, 300)]);
        let Poll::Ready(Ok(meta)) = poll_recv(&s, 4) else { panic!("nothing pulled") };
        assert_eq!(meta.iter().map(|m| (m.addr, m.len, m.stride)).collect::<Vec<_>>(), vec![(peer(), 3640, 1200)]);
        // Nothing left: the transport is armed and the driver waits.
        assert!(poll_recv(&s, 4).is_pending());
        assert!(mock.armed.load(Ordering::SeqCst));
        // Something arrives and the transport says so.
        lock(&mock.pullable).as_mut().unwrap().push_back((a, vec![5u8; 80], 80));
        tx.try_send(TransportEvent::Readable).unwrap();
        let Poll::Ready(Ok(meta)) = poll_recv(&s, 4) else { panic!("readable did not lead to a pull") };
        assert_eq!(meta.iter().map(|m| m.len).collect::<Vec<_>>(), vec![80]);
    }

    /// A slot the transport leaves empty (a datagram it dropped) or fills from a non-IP
    /// sender reaches quinn as an empty slot, which quinn skips; a zero stride is the length.
    #[test]
    fn odd_pulled_slots_are_harmless_to_quinn() {
        let (s, mock, _tx) = socket();
        let named = LinkAddr::Named("not-ip".into());
        *lock(&mock.pullable) = Some(VecDeque::from([
            (LinkAddr::from(peer()), Vec::new(), 0),
            (named, vec![1u8; 10], 10),
            (LinkAddr::from(peer()), vec![2u8; 70], 0),
        ]));
        let Poll::Ready(Ok(meta)) = poll_recv(&s, 4) else { panic!("nothing pulled") };
        assert_eq!(meta.iter().map(|m| (m.len, m.stride)).collect::<Vec<_>>(), vec![(0, 0), (0, 10), (70, 70)]);
    }

    #[test]
    fn a_closed_channel_ends_reception_quietly() {
        let (s, _mock, tx) = socket();
        drop(tx);
        assert!(poll_recv(&s, 2).is_pending());
        assert!(poll_recv(&s, 2).is_pending());
    }
}
