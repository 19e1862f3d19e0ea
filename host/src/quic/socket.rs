//! quinn's socket, lent by a datagram transport plugin (the UDP plugin).
//!
//! [`PluginSocket`] implements quinn's `AsyncUdpSocket` over the host's
//! [`Transport`](crate::transport::Transport) interface: `try_send` is the plugin's
//! non-blocking `send`, a `WouldBlock` parks quinn's poller until the plugin's `writable`
//! event, and received frames are queued by a pump task and handed to quinn in batches.
//! The plugin owns the real socket and its threads; nothing async crosses the boundary.

use std::collections::VecDeque;
use std::fmt;
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use antmesh_plugin_api::{LinkAddr, SendError, TransportAddr};
use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, UdpPoller};

use crate::transport::{EventReceiver, SharedTransport, TransportEvent};

/// Datagrams queued for quinn before further ones are dropped (as a full socket buffer
/// would drop them; QUIC recovers).
pub const INBOUND_QUEUE: usize = 8192;

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

#[derive(Default)]
struct Inbound {
    queue: VecDeque<(SocketAddr, Vec<u8>)>,
    waker: Option<Waker>,
    dropped: u64,
    closed: bool,
}

#[derive(Default)]
struct Writable {
    /// Bumped on every `writable` event from the plugin.
    generation: u64,
    /// The generation at the last refused send.
    blocked_at: Option<u64>,
    wakers: Vec<Waker>,
}

struct Shared {
    inbound: Mutex<Inbound>,
    writable: Mutex<Writable>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A transport instance as quinn's socket.
pub struct PluginSocket {
    transport: SharedTransport,
    local: SocketAddr,
    shared: Arc<Shared>,
}

impl fmt::Debug for PluginSocket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PluginSocket").field("interface", &self.transport.interface()).field("local", &self.local).finish()
    }
}

impl PluginSocket {
    /// Wraps `transport` and starts the task that feeds its events to quinn. Must be
    /// called inside a tokio runtime.
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
        let shared = Arc::new(Shared { inbound: Mutex::new(Inbound::default()), writable: Mutex::new(Writable::default()) });
        tokio::spawn(pump(Arc::clone(&shared), events));
        Ok(Arc::new(PluginSocket { transport, local, shared }))
    }

    /// The transport underneath.
    pub fn transport(&self) -> &SharedTransport {
        &self.transport
    }

    /// Datagrams dropped because quinn fell behind.
    pub fn dropped(&self) -> u64 {
        lock(&self.shared.inbound).dropped
    }
}

async fn pump(shared: Arc<Shared>, events: EventReceiver) {
    while let Ok(ev) = events.recv().await {
        match ev {
            TransportEvent::Frames(batch) => {
                let waker = {
                    let mut inb = lock(&shared.inbound);
                    for (from, data) in batch {
                        let Some(sa) = from.socket_addr() else { continue };
                        if inb.queue.len() >= INBOUND_QUEUE {
                            inb.dropped += 1;
                            continue;
                        }
                        inb.queue.push_back((sa, data));
                    }
                    inb.waker.take()
                };
                if let Some(w) = waker {
                    w.wake();
                }
            }
            TransportEvent::Writable => {
                let wakers = {
                    let mut w = lock(&shared.writable);
                    w.generation += 1;
                    std::mem::take(&mut w.wakers)
                };
                wakers.into_iter().for_each(Waker::wake);
            }
            // Links are a connection-oriented notion; QUIC keeps its own liveness.
            TransportEvent::LinkUp(_) | TransportEvent::LinkDown { .. } => {}
        }
    }
    // The instance is closed: wake quinn so it sees the end.
    let (r, ws) = {
        let mut inb = lock(&shared.inbound);
        inb.closed = true;
        (inb.waker.take(), std::mem::take(&mut lock(&shared.writable).wakers))
    };
    r.into_iter().chain(ws).for_each(Waker::wake);
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
            Some(at) if w.generation > at => {
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

fn to_io(e: SendError) -> io::Error {
    match e {
        SendError::WouldBlock => io::Error::from(io::ErrorKind::WouldBlock),
        SendError::TooLarge { size, mtu } => {
            io::Error::new(io::ErrorKind::InvalidInput, format!("datagram of {size} bytes exceeds the MTU of {mtu}"))
        }
        SendError::Closed => io::Error::from(io::ErrorKind::NotConnected),
        other => io::Error::other(other.to_string()),
    }
}

impl AsyncUdpSocket for PluginSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        Box::pin(Poller { shared: Arc::clone(&self.shared) })
    }

    fn try_send(&self, transmit: &Transmit) -> io::Result<()> {
        let to = LinkAddr::from(transmit.destination);
        let seg = transmit.segment_size.unwrap_or(transmit.contents.len()).max(1);
        for datagram in transmit.contents.chunks(seg) {
            if let Err(e) = self.transport.send(&to, datagram) {
                if e == SendError::WouldBlock {
                    let mut w = lock(&self.shared.writable);
                    w.blocked_at = Some(w.generation);
                }
                return Err(to_io(e));
            }
        }
        Ok(())
    }

    fn poll_recv(&self, cx: &mut Context, bufs: &mut [IoSliceMut<'_>], meta: &mut [RecvMeta]) -> Poll<io::Result<usize>> {
        let mut inb = lock(&self.shared.inbound);
        if inb.queue.is_empty() {
            // A closed transport simply delivers nothing more: an error here would make
            // quinn's driver log a spurious I/O failure during an orderly shutdown.
            if !inb.closed {
                inb.waker = Some(cx.waker().clone());
            }
            return Poll::Pending;
        }
        let mut n = 0;
        for (buf, m) in bufs.iter_mut().zip(meta.iter_mut()) {
            let Some((from, data)) = inb.queue.pop_front() else { break };
            // quinn's receive buffers hold a maximum-size datagram; a longer one cannot
            // be a valid QUIC packet, so it is dropped rather than truncated.
            if data.len() > buf.len() {
                inb.dropped += 1;
                continue;
            }
            buf[..data.len()].copy_from_slice(&data);
            m.addr = from;
            m.len = data.len();
            m.stride = data.len();
            m.ecn = None;
            m.dst_ip = None;
            n += 1;
        }
        if n == 0 {
            if inb.queue.is_empty() {
                inb.waker = Some(cx.waker().clone());
            } else {
                // Everything in this round was dropped but more is queued: come back.
                cx.waker().wake_by_ref();
            }
            return Poll::Pending;
        }
        Poll::Ready(Ok(n))
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.local)
    }
}
