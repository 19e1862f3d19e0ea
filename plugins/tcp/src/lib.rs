//! The antmesh TCP transport plugin (`tcp://ip:port`).
//!
//! Each instance listens and/or dials configured peers; every connection carries frames
//! with a u32 big-endian length prefix. One I/O thread per instance (`reactor`) runs a mio
//! event loop over all sockets; `send` only queues into the peer's bounded outbox, so it never
//! blocks and reports `WouldBlock` when a peer cannot keep up. Dialled peers are redialled
//! with exponential backoff whenever their connection fails or closes.
//!
//! See `docs/transports/tcp.md` for the operator's view.

mod config;
mod reactor;

#[cfg(test)]
mod tests;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::{self, JoinHandle, ThreadId};

use antmesh_plugin_api::{
    guard, Capabilities, Duplex, Framing, Host, LatencyClass, LinkAddr, LogLevel, PluginError, PluginErrorKind,
    Reliability, SendError, Transport, TransportAddr,
};
use mio::Waker;

pub use config::Config;
use reactor::{Reactor, Shared};

antmesh_plugin_api::export_transport! {
    name: "tcp",
    description: "TCP connections (listen and/or dial) carrying length-prefixed frames",
    schemes: ["tcp"],
    capabilities: capabilities(config::Config::default().mtu),
    open: open,
}

/// The running I/O thread and the waker that interrupts its poll.
struct IoThread {
    handle: JoinHandle<()>,
    waker: Arc<Waker>,
}

/// One open tcp instance.
pub struct TcpTransport {
    shared: Arc<Shared>,
    caps: Capabilities,
    local: Vec<String>,
    /// The I/O thread's id, so `close` can tell it is being called from a host callback.
    io_thread: ThreadId,
    /// `None` once closed. The mutex also makes a concurrent second `close` wait until the
    /// first has joined the thread, so neither returns while callbacks can still run.
    io: Mutex<Option<IoThread>>,
}

/// Opens an instance from its RON `config`: binds the listener (if any), then starts the
/// I/O thread, which dials the configured peers.
pub fn open(config: &str, host: Host) -> Result<TcpTransport, PluginError> {
    let config = Config::parse(config)?;
    let listener = match config.listen {
        Some(addr) => Some(
            mio::net::TcpListener::bind(addr)
                .map_err(|e| PluginError::io(&format!("cannot listen on tcp://{addr}"), &e))?,
        ),
        None => None,
    };
    let local = match &listener {
        Some(l) => {
            let bound = l.local_addr().map_err(|e| PluginError::io("reading the bound listen address", &e))?;
            vec![TransportAddr::Tcp(bound).to_string()]
        }
        None => Vec::new(),
    };
    let shared = Arc::new(Shared::new());
    let (reactor, waker) = Reactor::new(&config, host.clone(), listener, Arc::clone(&shared))
        .map_err(|e| PluginError::io("creating the event loop", &e))?;
    let thread_shared = Arc::clone(&shared);
    let handle = thread::Builder::new()
        .name("antmesh-tcp".to_owned())
        .spawn(move || {
            // `run` survives panics in the loop itself; this catches one in its teardown.
            if let Err(msg) = guard(move || reactor.run()) {
                // After `close` nothing may reach the host, not even this.
                if !thread_shared.stopped() {
                    host.log(LogLevel::Error, &format!("tcp I/O thread panicked while stopping: {msg}"));
                }
            }
            // However the loop ended, nothing drains the queues any more: make `send` say so.
            thread_shared.mark_exited();
            thread_shared.forget_peers();
        })
        .map_err(|e| PluginError::io("starting the I/O thread", &e))?;
    Ok(TcpTransport {
        shared,
        caps: capabilities(config.mtu),
        local,
        io_thread: handle.thread().id(),
        io: Mutex::new(Some(IoThread { handle, waker })),
    })
}

fn capabilities(mtu: u32) -> Capabilities {
    Capabilities {
        mtu,
        bitrate_bps: 0,
        latency: LatencyClass::Wan,
        broadcast: false,
        duplex: Duplex::Full,
        reliability: Reliability::ReliableOrdered,
        framing: Framing::Stream,
        // TCP acknowledges bytes inside the kernel, not frames the host could rely on.
        link_layer_acks: false,
        metered: false,
        power_constrained: false,
        peer_liveness: true,
    }
}

impl Transport for TcpTransport {
    fn capabilities(&self) -> Capabilities {
        self.caps
    }

    fn local_addresses(&self) -> Vec<String> {
        self.local.clone()
    }

    fn send(&self, to: &LinkAddr, frame: &[u8]) -> Result<(), SendError> {
        if self.shared.refuses_sends() {
            return Err(SendError::Closed);
        }
        let peer = match to {
            LinkAddr::Ip(ip) => SocketAddr::from(*ip),
            LinkAddr::Broadcast => return Err(SendError::BroadcastUnsupported),
            LinkAddr::Named(name) => return Err(SendError::BadAddress(name.clone())),
        };
        // The adapter checks this too; repeat it so a direct caller cannot make the peer
        // drop the connection over an oversized length prefix.
        if frame.len() > self.caps.mtu as usize {
            let size = u32::try_from(frame.len()).unwrap_or(u32::MAX);
            return Err(SendError::TooLarge { size, mtu: self.caps.mtu });
        }
        let unknown = || SendError::UnknownPeer(to.to_string().into());
        let queue = self.shared.peers().get(&peer).cloned().ok_or_else(unknown)?;
        queue.push(frame.to_vec()).map_err(|e| match e {
            // The instance closed, or its loop died, between the check above and the push.
            SendError::Closed if self.shared.refuses_sends() => SendError::Closed,
            // The connection closed between the lookup and the push.
            SendError::Closed => unknown(),
            other => other,
        })
    }

    fn close(&self) -> Result<(), PluginError> {
        self.shared.request_stop();
        if thread::current().id() == self.io_thread {
            // Closed from inside a host callback on the I/O thread. It cannot join itself, and
            // must not wait for the `io` lock either: a `close` on another thread may hold it
            // while joining this very thread. The stop flag, set on this thread, suppresses
            // every callback from here on (the loop checks it after every callback, the
            // outboxes' host is gated on it), and the loop exits, dropping its sockets, as
            // soon as this callback returns. The thread stays in `io`, so a later `close` (or
            // the drop) from another thread still joins it.
            self.shared.forget_peers();
            return Ok(());
        }
        let mut io = self.io.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(IoThread { handle, waker }) = io.take() else { return Ok(()) };
        // mio's eventfd waker only fails if the descriptor is broken; the join below is
        // still correct then, as the loop also checks the stop flag after every event.
        let _ = waker.wake();
        let joined = handle.join();
        // Dropped only now: closing the eventfd before the loop saw the wakeup could lose it.
        drop(waker);
        self.shared.forget_peers();
        joined.map_err(|_| PluginError::new(PluginErrorKind::Panicked, "tcp I/O thread panicked outside its guard"))
    }
}

#[cfg(test)]
impl TcpTransport {
    /// Makes the running loop fail as `fault` describes, at once.
    fn inject_fault(&self, fault: reactor::Fault) {
        self.shared.inject(fault);
        if let Some(io) = self.io.lock().unwrap_or_else(PoisonError::into_inner).as_ref() {
            let _ = io.waker.wake();
        }
    }
}

impl Drop for TcpTransport {
    fn drop(&mut self) {
        // The host always closes first; this covers callers that do not, so a dropped
        // instance never leaves its thread and sockets behind. Errors were logged already.
        let _ = self.close();
    }
}
