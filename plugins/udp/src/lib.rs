//! The UDP transport plugin: datagrams over one IPv4 or IPv6 socket, optional broadcast.
//!
//! One I/O thread per instance runs a `mio` loop over the socket and a waker. `send` only
//! copies the datagram into a bounded [`Outbox`]; the loop drains it into the socket and
//! parks on the socket's writability when the kernel pushes back, so backpressure from the
//! kernel or from a full queue reaches the host as `WouldBlock` followed by `writable`.
//! Inbound datagrams are handed to the host in batches of up to [`RECV_BATCH`].

use std::io;
use std::net::{SocketAddr, SocketAddrV6};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use antmesh_plugin_api::abi_stable::std_types::RSlice;
use antmesh_plugin_api::{
    export::parse_config, Capabilities, Duplex, Framing, Host, InFrame, LatencyClass, LinkAddr, PluginError,
    Reliability, SendError, Transport, TransportAddr,
};
use antmesh_plugin_kit::Outbox;
use mio::net::UdpSocket;
use mio::{Events, Interest, Poll, Token, Waker};
use serde::Deserialize;
use socket2::{Domain, Protocol, Socket, Type};

// The export attribute expands to paths under `::abi_stable`.
use abi_stable as _;

/// Datagrams handed to the host per `deliver` call.
pub const RECV_BATCH: usize = 64;
/// Receive batches per loop turn before sending and the stop flag get their turn.
const RECV_TURN: usize = 4;
const SOCKET: Token = Token(0);
const WAKER: Token = Token(1);

antmesh_plugin_api::export_transport! {
    name: "udp",
    description: "UDP datagrams over IPv4/IPv6, optional broadcast",
    schemes: ["udp"],
    capabilities: capabilities(&Config::default()),
    open: open,
}

fn default_bind() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 4242))
}
fn default_mtu() -> u32 {
    1472
}
fn default_queue() -> usize {
    4096
}

/// Instance configuration (RON).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Local address to bind; port 0 picks one.
    #[serde(default = "default_bind")]
    pub bind: SocketAddr,
    /// Where `LinkAddr::Broadcast` goes (e.g. `"192.168.1.255:4242"`); enables SO_BROADCAST.
    #[serde(default)]
    pub broadcast: Option<SocketAddr>,
    /// Largest datagram payload sent or accepted (1472 fits a 1500-byte Ethernet MTU over IPv4).
    #[serde(default = "default_mtu")]
    pub mtu: u32,
    /// Outbound queue capacity in datagrams.
    #[serde(default = "default_queue")]
    pub queue_frames: usize,
    /// SO_RCVBUF in bytes (kernel default when absent).
    #[serde(default)]
    pub recv_buffer: Option<usize>,
    /// SO_SNDBUF in bytes (kernel default when absent).
    #[serde(default)]
    pub send_buffer: Option<usize>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            bind: default_bind(),
            broadcast: None,
            mtu: default_mtu(),
            queue_frames: default_queue(),
            recv_buffer: None,
            send_buffer: None,
        }
    }
}

fn capabilities(cfg: &Config) -> Capabilities {
    Capabilities {
        mtu: cfg.mtu,
        bitrate_bps: 0,
        latency: LatencyClass::Wan,
        broadcast: cfg.broadcast.is_some(),
        duplex: Duplex::Full,
        reliability: Reliability::Lossy,
        framing: Framing::Datagram,
        link_layer_acks: false,
        metered: false,
        power_constrained: false,
        peer_liveness: false,
    }
}

/// An open UDP instance.
pub struct UdpTransport {
    caps: Capabilities,
    local: SocketAddr,
    broadcast: Option<SocketAddr>,
    outbox: Arc<Outbox<(SocketAddr, Vec<u8>)>>,
    stop: Arc<AtomicBool>,
    waker: Arc<Waker>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

fn io_err(context: &str) -> impl Fn(io::Error) -> PluginError + '_ {
    move |e| PluginError::io(context, &e)
}

fn open(text: &str, host: Host) -> Result<UdpTransport, PluginError> {
    let cfg: Config = parse_config(text)?;
    if cfg.mtu == 0 || cfg.mtu > 65507 {
        return Err(PluginError::bad_config(format!("mtu {} out of range 1..=65507", cfg.mtu)));
    }
    if cfg.queue_frames == 0 {
        return Err(PluginError::bad_config("queue_frames must be at least 1"));
    }
    if let Some(b) = cfg.broadcast {
        if b.is_ipv4() != cfg.bind.is_ipv4() {
            return Err(PluginError::bad_config("broadcast address family differs from bind"));
        }
    }
    let bind_ctx = format!("bind udp://{}", cfg.bind);
    let sock = Socket::new(Domain::for_address(cfg.bind), Type::DGRAM, Some(Protocol::UDP)).map_err(io_err(&bind_ctx))?;
    sock.set_nonblocking(true).map_err(io_err(&bind_ctx))?;
    if cfg.broadcast.is_some() {
        sock.set_broadcast(true).map_err(io_err("SO_BROADCAST"))?;
    }
    if let Some(n) = cfg.recv_buffer {
        sock.set_recv_buffer_size(n).map_err(io_err("SO_RCVBUF"))?;
    }
    if let Some(n) = cfg.send_buffer {
        sock.set_send_buffer_size(n).map_err(io_err("SO_SNDBUF"))?;
    }
    sock.bind(&cfg.bind.into()).map_err(io_err(&bind_ctx))?;
    let std_sock: std::net::UdpSocket = sock.into();
    let local = std_sock.local_addr().map_err(io_err(&bind_ctx))?;
    let mut socket = UdpSocket::from_std(std_sock);

    let poll = Poll::new().map_err(io_err("mio poll"))?;
    poll.registry()
        .register(&mut socket, SOCKET, Interest::READABLE | Interest::WRITABLE)
        .map_err(io_err("mio register"))?;
    let waker = Arc::new(Waker::new(poll.registry(), WAKER).map_err(io_err("mio waker"))?);
    let wake = Arc::clone(&waker);
    let outbox = Arc::new(Outbox::new(cfg.queue_frames, host.clone()).with_waker(move || {
        // A failed wake only delays the drain until the next event; nothing to recover.
        let _ = wake.wake();
    }));
    let stop = Arc::new(AtomicBool::new(false));
    let caps = capabilities(&cfg);
    let io = IoLoop { poll, socket, outbox: Arc::clone(&outbox), host: host.clone(), stop: Arc::clone(&stop), mtu: cfg.mtu as usize };
    let thread = std::thread::Builder::new()
        .name(format!("antmesh-udp-{}", local.port()))
        .spawn(move || {
            let outbox = Arc::clone(&io.outbox);
            if let Err(msg) = antmesh_plugin_api::guard(|| io.run()) {
                host.log(antmesh_plugin_api::LogLevel::Error, &format!("udp I/O thread panicked: {msg}"));
            }
            // Nothing drains the queue any more: senders get Closed, not a silent stall.
            outbox.close();
        })
        .map_err(io_err("spawn udp thread"))?;
    Ok(UdpTransport { caps, local, broadcast: cfg.broadcast, outbox, stop, waker, thread: Mutex::new(Some(thread)) })
}

struct IoLoop {
    poll: Poll,
    socket: UdpSocket,
    outbox: Arc<Outbox<(SocketAddr, Vec<u8>)>>,
    host: Host,
    stop: Arc<AtomicBool>,
    mtu: usize,
}

impl IoLoop {
    fn run(mut self) {
        let mut events = Events::with_capacity(16);
        let slot = self.mtu + 1; // one spare byte detects oversized datagrams
        let mut arena = vec![0u8; slot * RECV_BATCH];
        let mut pending: Vec<(SocketAddr, Vec<u8>)> = Vec::with_capacity(RECV_BATCH);
        let mut kernel_full = false;
        let mut more_to_read = false;
        while !self.stop.load(Ordering::Acquire) {
            // Edge-triggered: if the last turn left datagrams in the socket, come straight
            // back for them instead of waiting for an edge that will not come.
            let timeout = if more_to_read { Duration::ZERO } else { Duration::from_secs(1) };
            if let Err(e) = self.poll.poll(&mut events, Some(timeout)) {
                if e.kind() != io::ErrorKind::Interrupted {
                    self.host.warn(&format!("udp poll failed: {e}"));
                    std::thread::sleep(Duration::from_millis(50));
                }
                continue;
            }
            let mut readable = more_to_read;
            for ev in events.iter() {
                if ev.token() == SOCKET && ev.is_writable() {
                    kernel_full = false;
                }
                if ev.token() == SOCKET && ev.is_readable() {
                    readable = true;
                }
            }
            if readable {
                more_to_read = self.receive(&mut arena, slot);
            }
            if self.stop.load(Ordering::Acquire) {
                break;
            }
            // Sending gets its turn every iteration, so a receive flood cannot starve it.
            if !kernel_full {
                kernel_full = self.transmit(&mut pending);
            }
        }
    }

    /// Reads up to [`RECV_TURN`] batches; returns true if the socket may hold more.
    fn receive(&self, arena: &mut [u8], slot: usize) -> bool {
        for _ in 0..RECV_TURN {
            let mut got: Vec<(SocketAddr, usize, usize)> = Vec::with_capacity(RECV_BATCH);
            let mut drained = false;
            for (i, buf) in arena.chunks_mut(slot).enumerate() {
                match self.socket.recv_from(buf) {
                    Ok((n, from)) if n <= self.mtu => got.push((from, i * slot, n)),
                    Ok((n, from)) => self.host.debug(&format!("dropped {n}-byte datagram from {from}: over MTU")),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        drained = true;
                        break;
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    // ICMP errors surface here on some systems; they concern one peer only.
                    Err(e) => self.host.debug(&format!("udp recv: {e}")),
                }
            }
            let frames: Vec<InFrame<'_>> = got
                .iter()
                .map(|&(from, off, n)| InFrame { from: LinkAddr::from(from), data: RSlice::from_slice(&arena[off..off + n]) })
                .collect();
            self.host.deliver(&frames);
            if drained || self.stop.load(Ordering::Acquire) {
                return false;
            }
        }
        true
    }

    /// Sends queued datagrams; returns true when the kernel buffer is full.
    fn transmit(&self, pending: &mut Vec<(SocketAddr, Vec<u8>)>) -> bool {
        loop {
            pending.clear();
            if self.outbox.drain_into(pending, RECV_BATCH) == 0 {
                return false;
            }
            let mut sent = 0;
            for (to, data) in pending.iter() {
                match self.socket.send_to(data, *to) {
                    Ok(_) => sent += 1,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => {
                        // Datagram semantics: an unreachable peer loses this datagram only.
                        self.host.debug(&format!("udp send to {to}: {e}"));
                        sent += 1;
                    }
                }
            }
            if sent < pending.len() {
                self.outbox.requeue_front(pending.drain(sent..));
                return true;
            }
        }
    }
}

impl Transport for UdpTransport {
    fn capabilities(&self) -> Capabilities {
        self.caps
    }

    fn local_addresses(&self) -> Vec<String> {
        vec![TransportAddr::Udp(self.local).to_string()]
    }

    fn send(&self, to: &LinkAddr, frame: &[u8]) -> Result<(), SendError> {
        let dest = match (to, to.socket_addr()) {
            (_, Some(sa)) => sa,
            (LinkAddr::Broadcast, _) => self.broadcast.ok_or(SendError::BroadcastUnsupported)?,
            _ => return Err(SendError::BadAddress(to.to_string().into())),
        };
        let dest = match (self.local, dest) {
            (SocketAddr::V4(_), SocketAddr::V6(_)) => return Err(SendError::BadAddress(to.to_string().into())),
            // A dual-stack IPv6 socket reaches IPv4 peers through mapped addresses.
            (SocketAddr::V6(_), SocketAddr::V4(v4)) => {
                SocketAddr::V6(SocketAddrV6::new(v4.ip().to_ipv6_mapped(), v4.port(), 0, 0))
            }
            (_, d) => d,
        };
        self.outbox.push((dest, frame.to_vec()))
    }

    fn close(&self) -> Result<(), PluginError> {
        self.stop.store(true, Ordering::Release);
        self.outbox.close();
        let _ = self.waker.wake();
        // Hold the lock across the join: a concurrent close must not return before the
        // thread (and with it every host callback) is gone.
        let mut guard = self.thread.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(h) = guard.take() {
            if h.thread().id() == std::thread::current().id() {
                // close() from a host callback on our own I/O thread: it exits after the
                // callback returns, having seen the stop flag.
                return Ok(());
            }
            // The thread catches its own panics, so join only fails if it was killed.
            let _ = h.join();
        }
        Ok(())
    }
}

impl Drop for UdpTransport {
    fn drop(&mut self) {
        let _ = Transport::close(self);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use antmesh_plugin_kit::testing::Harness;
    use std::net::UdpSocket as StdUdp;
    use std::time::Instant;

    fn open_at(h: &Harness, cfg: &str) -> UdpTransport {
        open(cfg, h.host.clone()).unwrap()
    }

    #[test]
    fn a_receive_flood_neither_starves_sending_nor_delays_close() {
        let h = Harness::new();
        let a = open_at(&h, r#"(bind: "127.0.0.1:0")"#);
        let a_addr = a.local;
        let sink = StdUdp::bind("127.0.0.1:0").unwrap();
        sink.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let flood = {
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || {
                let s = StdUdp::bind("127.0.0.1:0").unwrap();
                let end = Instant::now() + Duration::from_secs(5);
                while !stop.load(Ordering::Relaxed) && Instant::now() < end {
                    let _ = s.send_to(&[0u8; 64], a_addr);
                }
            })
        };
        std::thread::sleep(Duration::from_millis(100));
        let to = LinkAddr::from(sink.local_addr().unwrap());
        let mut sent = 0;
        let end = Instant::now() + Duration::from_secs(3);
        while sent < 100 && Instant::now() < end {
            match a.send(&to, b"out") {
                Ok(()) => sent += 1,
                Err(SendError::WouldBlock) => std::thread::sleep(Duration::from_millis(1)),
                Err(e) => panic!("{e}"),
            }
        }
        let mut buf = [0u8; 16];
        let mut got = 0;
        while got < 50 {
            match sink.recv_from(&mut buf) {
                Ok(_) => got += 1,
                Err(e) => panic!("only {got} of {sent} outbound datagrams left during the flood: {e}"),
            }
        }
        let t = Instant::now();
        Transport::close(&a).unwrap();
        assert!(t.elapsed() < Duration::from_secs(1), "close took {:?} under a flood", t.elapsed());
        stop.store(true, Ordering::Relaxed);
        flood.join().unwrap();
    }

    #[test]
    fn sends_after_close_are_refused() {
        let h = Harness::new();
        let a = open_at(&h, r#"(bind: "127.0.0.1:0")"#);
        Transport::close(&a).unwrap();
        Transport::close(&a).unwrap();
        let to = LinkAddr::from(SocketAddr::from(([127, 0, 0, 1], 9)));
        assert_eq!(a.send(&to, b"x"), Err(SendError::Closed));
    }

    #[test]
    fn bad_configs_are_refused_with_positions() {
        let h = Harness::new();
        for cfg in [r#"(bind: "nonsense")"#, "(mtu: 0)", "(mtu: 70000)", "(queue_frames: 0)", r#"(bind: "127.0.0.1:0", broadcast: Some("[::1]:5"))"#] {
            match open(cfg, h.host.clone()) {
                Err(e) => assert_eq!(e.kind, antmesh_plugin_api::PluginErrorKind::BadConfig, "{cfg}: {e}"),
                Ok(_) => panic!("{cfg} accepted"),
            }
        }
    }
}
