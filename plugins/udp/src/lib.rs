//! The UDP transport plugin: datagrams over one IPv4 or IPv6 socket, optional broadcast.
//!
//! One I/O thread per instance runs a `mio` loop over the socket and a waker. `send` and
//! `send_batch` only copy the datagrams into a bounded `SendQueue` (a batch for one
//! destination becomes one run: one buffer, one lock, at most one wake); the loop drains it
//! into the socket with `sendmmsg`, a run of equal-size datagrams as one segmentation
//! offload send (`UDP_SEGMENT`) where the kernel has it, and parks on the socket's
//! writability when the kernel pushes back, so backpressure from the kernel or from a full
//! queue reaches the host as `WouldBlock` followed by `writable`. Inbound datagrams are read
//! with `recvmmsg` (with receive offload, `UDP_GRO`, a train of datagrams per slot) and
//! handed to the host one call's worth per `deliver` — or, once the host pulls
//! (`recv_pull`, what its QUIC socket does), read on the host's own thread straight into its
//! buffers, the I/O thread only saying `readable` when the host waits. See `batch` for the
//! system calls and their portable fallback.

use std::io;
use std::net::{SocketAddr, SocketAddrV6};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use antmesh_plugin_api::abi_stable::std_types::{RNone, ROption, RSlice};
use antmesh_plugin_api::{
    export::parse_config, BatchResult, Capabilities, Duplex, Framing, Host, InFrame, LatencyClass, LinkAddr,
    OutFrame, PluginError, RecvSlot, Reliability, SendError, Transport, TransportAddr,
};
use mio::net::UdpSocket;
use mio::{Events, Interest, Poll, Registry, Token, Waker};
use serde::Deserialize;
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

// The export attribute expands to paths under `::abi_stable`.
use abi_stable as _;

mod batch;
mod queue;

use batch::{Got, OutMsg, Receiver, GSO_MAX_BYTES, GSO_MAX_SEGMENTS, MAX_IOVS, MAX_MSGS};
use queue::{Run, SendQueue};

/// Receive calls per loop turn before sending and the stop flag get their turn.
const RECV_TURN: usize = 4;
/// Datagrams taken from the queue per drain.
const SEND_DRAIN: usize = 256;
/// Drains per loop turn before receiving and the stop flag get their turn.
const SEND_TURN: usize = 8;
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
fn default_offload() -> bool {
    true
}
fn default_recv_buffer() -> Option<usize> {
    Some(DEFAULT_RECV_BUFFER)
}
fn default_dont_fragment() -> bool {
    true
}
fn default_sched_batch() -> bool {
    // On by default: with the I/O thread's wakeups preempting the sessions' crypto, QUIC
    // bulk through this plugin fell to 0.72-0.80 of quinn's own socket (0.91-0.93 with it),
    // while handshake latency through it did not measurably change. Under CPU contention a
    // send may wait up to a scheduler slice; nodes that would rather not, turn it off.
    true
}

/// SO_RCVBUF asked for by default. The I/O thread is one more scheduling hop between the
/// kernel and the consumer than a socket read in place, and a bulk sender fills the
/// kernel's default (~208 KiB) while it waits for a core: every overflow is a loss, and a
/// congestion response. The kernel caps the request at `net.core.rmem_max`.
pub const DEFAULT_RECV_BUFFER: usize = 1 << 20;

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
    /// SO_RCVBUF in bytes ([`DEFAULT_RECV_BUFFER`] unless given; `None`: the kernel's default).
    #[serde(default = "default_recv_buffer")]
    pub recv_buffer: Option<usize>,
    /// SO_SNDBUF in bytes (kernel default when absent).
    #[serde(default)]
    pub send_buffer: Option<usize>,
    /// Use the kernel's UDP segmentation and receive offloads (GSO/GRO) where it has them.
    #[serde(default = "default_offload")]
    pub offload: bool,
    /// Send with the don't-fragment bit (Linux: `IP_PMTUDISC_PROBE`): a datagram larger than
    /// the path MTU is lost instead of fragmented, which QUIC's path MTU discovery relies
    /// on. Off: the kernel fragments.
    #[serde(default = "default_dont_fragment")]
    pub dont_fragment: bool,
    /// Run the I/O thread under `SCHED_BATCH` (Linux): its wakeups do not preempt a busy
    /// core, so it runs a moment later and handles more datagrams per wakeup. Same CPU
    /// share as before; under CPU contention a datagram may wait up to a scheduler slice
    /// (about a millisecond) for the thread, on an idle core nothing changes.
    #[serde(default = "default_sched_batch")]
    pub sched_batch: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            bind: default_bind(),
            broadcast: None,
            mtu: default_mtu(),
            queue_frames: default_queue(),
            recv_buffer: default_recv_buffer(),
            send_buffer: None,
            offload: default_offload(),
            dont_fragment: default_dont_fragment(),
            sched_batch: default_sched_batch(),
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
    queue: Arc<SendQueue>,
    socket: Arc<UdpSocket>,
    pull: Arc<Pull>,
    /// The socket's registration with the I/O thread's poll.
    interest: Arc<SocketInterest>,
    host: Host,
    mtu: usize,
    gro: bool,
    stop: Arc<AtomicBool>,
    waker: Arc<Waker>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

/// Pull mode: the host reads the socket itself (`recv_pull`).
#[derive(Default)]
struct Pull {
    /// The host has pulled: the I/O thread no longer reads the socket.
    on: AtomicBool,
    /// A pull found nothing: the next datagram is announced with `readable`.
    armed: AtomicBool,
    /// Scratch for the host's reads (address and control buffers, results).
    scratch: Mutex<(batch::Meta, Vec<Got>)>,
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
    let offloads = if cfg.offload { batch::offloads(&socket) } else { batch::Offloads::default() };
    if cfg.dont_fragment {
        batch::set_dont_fragment(&socket, cfg.bind.is_ipv6()).map_err(io_err("IP_MTU_DISCOVER"))?;
    }

    let poll = Poll::new().map_err(io_err("mio poll"))?;
    poll.registry()
        .register(&mut socket, SOCKET, Interest::READABLE | Interest::WRITABLE)
        .map_err(io_err("mio register"))?;
    let waker = Arc::new(Waker::new(poll.registry(), WAKER).map_err(io_err("mio waker"))?);
    let wake = Arc::clone(&waker);
    let parked = Arc::new(AtomicBool::new(false));
    let parking = Arc::clone(&parked);
    let queue = Arc::new(SendQueue::new(cfg.queue_frames, host.clone(), move || {
        // Only a thread that is (about to be) asleep needs the eventfd: a busy one finds
        // the queue on its next turn. A failed wake only delays the drain until the next
        // event; nothing to recover.
        if parking.swap(false, Ordering::SeqCst) {
            let _ = wake.wake();
        }
    }));
    let stop = Arc::new(AtomicBool::new(false));
    let caps = capabilities(&cfg);
    let mtu = cfg.mtu as usize;
    let socket = Arc::new(socket);
    let pull = Arc::new(Pull::default());
    let host_for_pull = host.clone();
    let registry = poll.registry().try_clone().map_err(io_err("mio registry"))?;
    let interest = Arc::new(SocketInterest::new(registry, &socket));
    let io = IoLoop {
        poll,
        socket: Arc::clone(&socket),
        pull: Arc::clone(&pull),
        interest: Arc::clone(&interest),
        queue: Arc::clone(&queue),
        parked,
        host: host.clone(),
        stop: Arc::clone(&stop),
        mtu,
        gso: offloads.gso,
        rx: Receiver::new(mtu, offloads.gro),
        sched_batch: cfg.sched_batch,
    };
    let thread = std::thread::Builder::new()
        .name(format!("antmesh-udp-{}", local.port()))
        .spawn(move || {
            let queue = Arc::clone(&io.queue);
            if let Err(msg) = antmesh_plugin_api::guard(|| io.run()) {
                host.log(antmesh_plugin_api::LogLevel::Error, &format!("udp I/O thread panicked: {msg}"));
            }
            // Nothing drains the queue any more: senders get Closed, not a silent stall.
            queue.close();
        })
        .map_err(io_err("spawn udp thread"))?;
    Ok(UdpTransport {
        caps,
        local,
        broadcast: cfg.broadcast,
        queue,
        socket,
        pull,
        interest,
        host: host_for_pull,
        mtu,
        gro: offloads.gro,
        stop,
        waker,
        thread: Mutex::new(Some(thread)),
    })
}

struct IoLoop {
    poll: Poll,
    socket: Arc<UdpSocket>,
    pull: Arc<Pull>,
    interest: Arc<SocketInterest>,
    queue: Arc<SendQueue>,
    /// Set while the thread waits with nothing to send: a push then writes the waker.
    parked: Arc<AtomicBool>,
    host: Host,
    stop: Arc<AtomicBool>,
    mtu: usize,
    /// Segmentation offload in use (turned off for good if the kernel refuses a send).
    gso: bool,
    rx: Receiver,
    sched_batch: bool,
}

/// What a transmit turn ended with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sent {
    /// The queue is empty.
    Idle,
    /// The kernel pushed back; wait for writability.
    KernelFull,
    /// The turn ended with datagrams still queued.
    More,
}

/// One message for the kernel: `pieces` consecutive [`Piece`]s from `first`, to the
/// destination of run `run`, cut into `seg`-byte datagrams by the kernel when `seg` is set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Msg {
    run: usize,
    first: usize,
    pieces: usize,
    datagrams: usize,
    seg: Option<usize>,
    /// Its last piece ends on a full datagram (so another piece may follow).
    ends_full: bool,
}

/// Where part of a message comes from: `data[start..end]` of run `run`, `datagrams` of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Piece {
    run: usize,
    start: usize,
    end: usize,
    datagrams: usize,
}

/// The next messages for the kernel, from the unsent part of `runs`: with `gso`, runs
/// to one destination with one datagram size are cut into as few segmentation offload
/// sends as the kernel's limits allow (consecutive runs share a send when the earlier one
/// ends on a full datagram); without, one message per datagram. At most [`MAX_MSGS`]
/// messages of [`MAX_IOVS`] pieces in all.
fn plan(runs: &[Run], gso: bool, msgs: &mut Vec<Msg>, pieces: &mut Vec<Piece>) {
    msgs.clear();
    pieces.clear();
    for (ri, run) in runs.iter().enumerate() {
        let seg = run.seg;
        let offload = gso && seg > 0 && u16::try_from(seg).is_ok();
        let max_segs = if offload { GSO_MAX_SEGMENTS.min(GSO_MAX_BYTES / seg).max(1) } else { 1 };
        let mut off = run.off;
        let mut left = run.left;
        while left > 0 {
            if pieces.len() >= MAX_IOVS {
                return;
            }
            // Join the previous message: same destination and size, it ends on a full
            // datagram, and it has room.
            let joined = match msgs.last_mut() {
                Some(m) if offload && m.seg == Some(seg) && runs[m.run].to == run.to && m.datagrams < max_segs && m.ends_full => {
                    let take = left.min(max_segs - m.datagrams);
                    m.datagrams += take;
                    m.pieces += 1;
                    Some(take)
                }
                _ => None,
            };
            let take = match joined {
                Some(take) => take,
                None => {
                    if msgs.len() >= MAX_MSGS {
                        return;
                    }
                    let take = left.min(max_segs);
                    msgs.push(Msg {
                        run: ri,
                        first: pieces.len(),
                        pieces: 1,
                        datagrams: take,
                        seg: offload.then_some(seg),
                        ends_full: true,
                    });
                    take
                }
            };
            let end = (off + take * seg).min(run.data.len());
            pieces.push(Piece { run: ri, start: off, end, datagrams: take });
            if let Some(m) = msgs.last_mut() {
                m.ends_full = end - off == take * seg;
            }
            off = end;
            left -= take;
        }
    }
}

impl IoLoop {
    fn run(mut self) {
        if self.sched_batch {
            if let Err(e) = batch::set_batch_scheduling() {
                self.host.debug(&format!("udp I/O thread stays on normal scheduling: {e}"));
            }
        }
        let mut events = Events::with_capacity(16);
        let mut pending: Vec<Run> = Vec::new();
        let mut got: Vec<Got> = Vec::new();
        let mut kernel_full = false;
        let mut more_to_read = false;
        let mut more_to_send = false;
        while !self.stop.load(Ordering::Acquire) {
            // Edge-triggered: if the last turn left datagrams in the socket or the queue,
            // come straight back for them instead of waiting for an edge that will not come.
            let mut busy = more_to_read || (more_to_send && !kernel_full);
            if !busy {
                // Announce the sleep, then look once more: a push either came before the
                // look (and is seen) or sees the flag and wakes us (SeqCst on both sides).
                self.parked.store(true, Ordering::SeqCst);
                if !kernel_full && !self.queue.is_empty() {
                    self.parked.store(false, Ordering::SeqCst);
                    busy = true;
                }
            }
            let timeout = if busy { Duration::ZERO } else { Duration::from_secs(1) };
            let polled = self.poll.poll(&mut events, Some(timeout));
            self.parked.store(false, Ordering::SeqCst);
            if let Err(e) = polled {
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
                    self.interest.set(None, Some(false));
                }
                if ev.token() == SOCKET && ev.is_readable() {
                    readable = true;
                }
            }
            if readable && self.pull.on.load(Ordering::SeqCst) {
                // The host reads; it only needs telling when it waits. Read interest goes
                // off until the host arms again (so arrivals while it is busy reading do
                // not wake this thread), then the flag is taken: the host sets the flag
                // before it turns interest on, so whatever the interleaving, an armed host
                // is told.
                more_to_read = false;
                self.interest.set(Some(false), None);
                if self.pull.armed.swap(false, Ordering::SeqCst) {
                    self.host.readable();
                }
            } else if readable {
                more_to_read = self.receive(&mut got);
            }
            if self.stop.load(Ordering::Acquire) {
                break;
            }
            // Sending gets its turn every iteration, so a receive flood cannot starve it.
            if !kernel_full {
                match self.transmit(&mut pending) {
                    Sent::Idle => more_to_send = false,
                    Sent::More => more_to_send = true,
                    Sent::KernelFull => {
                        kernel_full = true;
                        // Watched only while needed: every change of the registration
                        // re-reports a writable socket, a wakeup for nothing otherwise.
                        self.interest.set(None, Some(true));
                        more_to_send = true;
                    }
                }
            }
        }
    }

    /// Up to [`RECV_TURN`] receive calls; returns true if the socket may hold more.
    fn receive(&mut self, got: &mut Vec<Got>) -> bool {
        for _ in 0..RECV_TURN {
            let drained = match self.rx.recv(&self.socket, got) {
                // A short read emptied the socket: the next datagram raises a new edge.
                // (recvmmsg also stops early on an error after the first message, but an
                // unconnected UDP socket has none pending without IP_RECVERR.)
                Ok(n) => n < self.rx.slots(),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                // ICMP errors surface here on some systems; they concern one peer only.
                Err(e) => {
                    self.host.debug(&format!("udp recv: {e}"));
                    continue;
                }
            };
            let datagrams = got.iter().map(|g| if g.seg == 0 { 1 } else { g.len.div_ceil(g.seg) }).sum();
            let mut frames: Vec<InFrame<'_>> = Vec::with_capacity(datagrams);
            for g in got.iter() {
                let bytes = self.rx.bytes(g);
                // Without receive offload `seg` is the datagram's length.
                if g.truncated || g.seg > self.mtu {
                    self.host.debug(&format!("dropped {}-byte datagram from {}: over MTU", g.seg, g.from));
                    continue;
                }
                let from = LinkAddr::from(g.from);
                if bytes.is_empty() || g.seg == 0 {
                    frames.push(InFrame { from, data: RSlice::from_slice(bytes) });
                    continue;
                }
                for d in bytes.chunks(g.seg) {
                    frames.push(InFrame { from: from.clone(), data: RSlice::from_slice(d) });
                }
            }
            self.host.deliver(&frames);
            if drained || self.stop.load(Ordering::Acquire) {
                return false;
            }
        }
        true
    }

    /// Sends queued datagrams for up to [`SEND_TURN`] drains.
    fn transmit(&mut self, pending: &mut Vec<Run>) -> Sent {
        for _ in 0..SEND_TURN {
            pending.clear();
            if self.queue.drain_into(pending, SEND_DRAIN) == 0 {
                return Sent::Idle;
            }
            if self.send_runs(pending) {
                self.queue.requeue_front(pending.drain(..).filter(|r| r.left > 0));
                return Sent::KernelFull;
            }
        }
        Sent::More
    }

    /// Sends `runs` (advancing each one's `off`/`left`); returns true when the kernel
    /// buffer is full with some still unsent.
    fn send_runs(&mut self, runs: &mut [Run]) -> bool {
        let mut msgs = Vec::with_capacity(MAX_MSGS);
        let mut pieces = Vec::with_capacity(MAX_IOVS);
        loop {
            plan(runs, self.gso, &mut msgs, &mut pieces);
            if msgs.is_empty() {
                return false;
            }
            let out: Vec<OutMsg> = msgs
                .iter()
                .map(|m| OutMsg {
                    to: SockAddr::from(runs[m.run].to),
                    iov_start: m.first,
                    iov_len: m.pieces,
                    // A single datagram needs no segmentation: without the cmsg, a datagram
                    // too large for the path fails alone (EMSGSIZE) instead of looking like
                    // refused offload (EINVAL) and switching GSO off for good.
                    seg: m.seg.filter(|_| m.datagrams > 1).and_then(|s| u16::try_from(s).ok()),
                })
                .collect();
            let bufs: Vec<&[u8]> = pieces.iter().map(|p| runs[p.run].data.get(p.start..p.end).unwrap_or(&[])).collect();
            let result = batch::send(&self.socket, &out, &bufs);
            drop(bufs);
            let done = match result {
                Ok(n) if n > 0 => n,
                // Nothing sent and no error: not something the kernel does; drop the first
                // message rather than wait for a writability edge that may never come.
                Ok(_) => {
                    self.host.debug(&format!("udp send to {}: nothing sent", runs[msgs[0].run].to));
                    1
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
                Err(e) if out[0].seg.is_some() && batch::offload_refused(&e) => {
                    // Some devices and paths cannot take segmentation offload; the kernel
                    // says so only by refusing. Send datagram by datagram from now on.
                    self.host.info(&format!("udp segmentation offload refused ({e}); sending datagrams one by one"));
                    self.gso = false;
                    continue;
                }
                Err(e) => {
                    // Datagram semantics: an unreachable peer loses these datagrams only.
                    self.host.debug(&format!("udp send to {}: {e}", runs[msgs[0].run].to));
                    1
                }
            };
            for m in msgs.iter().take(done) {
                for p in &pieces[m.first..m.first + m.pieces] {
                    let run = &mut runs[p.run];
                    run.off = p.end;
                    run.left -= p.datagrams;
                }
            }
        }
    }
}

impl UdpTransport {
    /// The socket address `to` means for this instance.
    fn resolve(&self, to: &LinkAddr) -> Result<SocketAddr, SendError> {
        let dest = match (to, to.socket_addr()) {
            (_, Some(sa)) => sa,
            (LinkAddr::Broadcast, _) => self.broadcast.ok_or(SendError::BroadcastUnsupported)?,
            _ => return Err(SendError::BadAddress(to.to_string().into())),
        };
        Ok(match (self.local, dest) {
            (SocketAddr::V4(_), SocketAddr::V6(_)) => return Err(SendError::BadAddress(to.to_string().into())),
            // A dual-stack IPv6 socket reaches IPv4 peers through mapped addresses.
            (SocketAddr::V6(_), SocketAddr::V4(v4)) => {
                SocketAddr::V6(SocketAddrV6::new(v4.ip().to_ipv6_mapped(), v4.port(), 0, 0))
            }
            (_, d) => d,
        })
    }
}

/// The socket's registration with the I/O thread's poll (edge-triggered), shared by the
/// I/O thread and the host's pulls. Read interest: always in push mode, in pull mode only
/// while the host waits. Write interest: only while the kernel has pushed back. A change
/// re-checks readiness, so turning an interest on reports a state that already holds; and
/// an interest left on when not needed would be re-reported, a wakeup for nothing, on every
/// change of the other.
struct SocketInterest {
    registry: Registry,
    #[cfg(unix)]
    fd: std::os::fd::RawFd,
    /// (read, write) as registered.
    state: Mutex<(bool, bool)>,
}

impl SocketInterest {
    /// As registered at open: read and write.
    fn new(registry: Registry, socket: &UdpSocket) -> SocketInterest {
        #[cfg(unix)]
        let fd = std::os::fd::AsRawFd::as_raw_fd(socket);
        #[cfg(not(unix))]
        let _ = socket;
        SocketInterest {
            registry,
            #[cfg(unix)]
            fd,
            state: Mutex::new((true, true)),
        }
    }

    /// Changes what is given, keeps the rest.
    #[cfg(unix)]
    fn set(&self, read: Option<bool>, write: Option<bool>) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let (was_read, was_write) = *state;
        let (r, w) = (read.unwrap_or(was_read), write.unwrap_or(was_write));
        if (r, w) == (was_read, was_write) {
            return;
        }
        let mut source = mio::unix::SourceFd(&self.fd);
        let interest = match (r, w) {
            (true, true) => Some(Interest::READABLE | Interest::WRITABLE),
            (true, false) => Some(Interest::READABLE),
            (false, true) => Some(Interest::WRITABLE),
            (false, false) => None,
        };
        // Fails only for a closed descriptor, when nothing waits for it any more.
        let _ = match (interest, was_read || was_write) {
            (Some(i), true) => self.registry.reregister(&mut source, SOCKET, i),
            (Some(i), false) => self.registry.register(&mut source, SOCKET, i),
            (None, _) => self.registry.deregister(&mut source),
        };
        *state = (r, w);
    }

    /// Elsewhere both interests stay on: every arrival wakes the I/O thread, which tells an
    /// armed host and ignores the rest.
    #[cfg(not(unix))]
    fn set(&self, _: Option<bool>, _: Option<bool>) {
        let _ = &self.registry;
    }
}

impl UdpTransport {
    /// One read into the host's slots; returns how many were filled.
    fn read_into(&self, scratch: &mut (batch::Meta, Vec<Got>), slots: &mut [RecvSlot<'_>]) -> usize {
        let (meta, got) = scratch;
        let bufs = slots.iter_mut().map(|s| s.buf.as_mut_slice());
        // (EINTR is retried inside.)
        let n = match batch::recv_into(&self.socket, bufs, meta, self.gro, got) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return 0,
            // ICMP errors surface here on some systems; they concern one peer only, and the
            // next pull reads on.
            Err(e) => {
                self.host.debug(&format!("udp recv: {e}"));
                return 0;
            }
        };
        for g in got.iter() {
            let Some(slot) = slots.get_mut(g.slot) else { continue };
            slot.from = LinkAddr::from(g.from);
            // Without receive offload `seg` is the datagram's length.
            if g.truncated || g.seg > self.mtu {
                self.host.debug(&format!("dropped {}-byte datagram from {}: over MTU or slot", g.seg, g.from));
                slot.len = 0;
                slot.stride = 0;
                continue;
            }
            slot.len = u32::try_from(g.len).unwrap_or(0);
            slot.stride = u32::try_from(if g.seg == 0 { g.len } else { g.seg }).unwrap_or(0);
        }
        n
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
        let dest = self.resolve(to)?;
        match self.queue.push([Run::new(dest, frame, 0)]) {
            (_, Some(e)) => Err(e),
            (_, None) => Ok(()),
        }
    }

    fn send_batch(&self, frames: &[OutFrame<'_>]) -> BatchResult {
        // Destinations first (cheap, and where a bad one stops the batch), then one run per
        // stretch of datagrams to one destination, then one push.
        let mut runs: Vec<Run> = Vec::new();
        let mut stop = None;
        for (i, f) in frames.iter().enumerate() {
            let dest = match self.resolve(&f.to) {
                Ok(d) => d,
                Err(e) => {
                    stop = Some((i, e));
                    break;
                }
            };
            let data = f.data.as_slice();
            if let Some(run) = runs.last_mut() {
                if run.to == dest && run.try_push(data) {
                    continue;
                }
            }
            // Room for the datagrams to the same destination that follow: most batches
            // are one run.
            let room: usize =
                frames[i..].iter().take(GSO_MAX_SEGMENTS).take_while(|g| g.to == f.to).map(|g| g.data.len()).sum();
            runs.push(Run::new(dest, data, room));
        }
        let (taken, refused) = self.queue.push(runs);
        let error = match (refused, stop) {
            (Some(e), _) => ROption::RSome(e),
            (None, Some((_, e))) => ROption::RSome(e),
            (None, None) => RNone,
        };
        BatchResult { accepted: u32::try_from(taken).unwrap_or(u32::MAX), error }
    }

    fn recv_pull(&self, slots: &mut [RecvSlot<'_>]) -> Option<usize> {
        self.pull.on.store(true, Ordering::SeqCst);
        if self.stop.load(Ordering::Acquire) {
            return Some(0);
        }
        let mut scratch = self.pull.scratch.lock().unwrap_or_else(|p| p.into_inner());
        let n = self.read_into(&mut scratch, slots);
        if n > 0 {
            return Some(n);
        }
        // Arm, then look once more: a datagram that came before the flag is read here, one
        // after it raises an edge the I/O thread answers with `readable` (SeqCst on both
        // sides). A `readable` may still come after data was found: allowed, and harmless.
        self.pull.armed.store(true, Ordering::SeqCst);
        self.interest.set(Some(true), None);
        let n = self.read_into(&mut scratch, slots);
        if n > 0 {
            self.pull.armed.store(false, Ordering::SeqCst);
        }
        Some(n)
    }

    fn close(&self) -> Result<(), PluginError> {
        self.stop.store(true, Ordering::Release);
        self.queue.close();
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
    use antmesh_plugin_kit::testing::{Event, Harness};
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

    fn batch<'a>(to: &LinkAddr, frames: &'a [Vec<u8>]) -> Vec<OutFrame<'a>> {
        frames.iter().map(|f| OutFrame { to: to.clone(), data: RSlice::from_slice(f) }).collect()
    }

    /// Ten datagrams as QUIC sends them (nine full, one short), then single sends, between
    /// two instances: everything arrives intact, in order, one frame per datagram.
    fn batches_arrive_whole(offload: bool) {
        let ha = Harness::new();
        let hb = Harness::new();
        let a = open_at(&ha, &format!(r#"(bind: "127.0.0.1:0", offload: {offload})"#));
        let b = open_at(&hb, &format!(r#"(bind: "127.0.0.1:0", offload: {offload})"#));
        let to = LinkAddr::from(b.local);
        let mut want = Vec::new();
        for round in 0..20u8 {
            let frames: Vec<Vec<u8>> =
                (0..10u8).map(|i| vec![round.wrapping_mul(10).wrapping_add(i); if i == 9 { 100 } else { 1200 }]).collect();
            let r = a.send_batch(&batch(&to, &frames));
            assert_eq!((r.accepted, r.error), (10, RNone));
            want.extend(frames);
            // Paced: loopback drops what the receiver has no buffer for.
            std::thread::sleep(Duration::from_millis(2));
        }
        a.send(&to, b"single").unwrap();
        a.send(&to, b"").unwrap();
        want.push(b"single".to_vec());
        want.push(Vec::new());
        let got = hb.frames(want.len(), Duration::from_secs(5));
        let got: Vec<Vec<u8>> = got.into_iter().map(|(from, f)| {
            assert_eq!(from.socket_addr(), Some(a.local));
            f
        }).collect();
        assert_eq!(got.len(), want.len());
        assert!(got == want, "frames differ");
    }

    #[test]
    fn batches_arrive_whole_with_offload() {
        batches_arrive_whole(true);
    }

    #[test]
    fn batches_arrive_whole_without_offload() {
        batches_arrive_whole(false);
    }

    #[test]
    fn a_batch_stops_at_a_bad_destination_and_at_capacity() {
        let h = Harness::new();
        let a = open_at(&h, r#"(bind: "127.0.0.1:0", queue_frames: 4)"#);
        let sink = StdUdp::bind("127.0.0.1:0").unwrap();
        let to = LinkAddr::from(sink.local_addr().unwrap());
        let frames = vec![vec![1u8; 10]; 3];
        let mut out = batch(&to, &frames);
        out[2].to = LinkAddr::Broadcast;
        let r = a.send_batch(&out);
        assert_eq!((r.accepted, r.error), (2, ROption::RSome(SendError::BroadcastUnsupported)));
        // Fill the queue while the I/O thread drains it: a long enough batch is cut at
        // the capacity and reported WouldBlock, never more than asked is taken.
        let many = vec![vec![2u8; 10]; 64];
        let r = a.send_batch(&batch(&to, &many));
        assert!(r.accepted as usize <= many.len());
        if (r.accepted as usize) < many.len() {
            assert_eq!(r.error, ROption::RSome(SendError::WouldBlock));
        }
    }

    #[test]
    fn over_mtu_datagrams_are_dropped_with_and_without_offload() {
        for offload in [true, false] {
            let h = Harness::new();
            let b = open_at(&h, &format!(r#"(bind: "127.0.0.1:0", mtu: 1200, offload: {offload})"#));
            let s = StdUdp::bind("127.0.0.1:0").unwrap();
            s.send_to(&[7u8; 1201], b.local).unwrap();
            s.send_to(&[8u8; 1200], b.local).unwrap();
            let got = h.frames(1, Duration::from_secs(5));
            assert_eq!(got.len(), 1);
            assert_eq!(got[0].1, vec![8u8; 1200], "offload {offload}");
        }
    }

    fn run(to: u16, sizes: &[usize]) -> Run {
        let mut r = Run::new(SocketAddr::from(([127, 0, 0, 1], to)), &vec![0; sizes[0]], 0);
        for &n in &sizes[1..] {
            assert!(r.try_push(&vec![0; n]));
        }
        r
    }

    #[test]
    fn the_plan_joins_runs_only_where_the_kernel_can_cut_them() {
        let (mut msgs, mut pieces) = (Vec::new(), Vec::new());
        // Two full runs and a short-ended one to one peer, then another peer.
        let runs = [run(1, &[1000; 10]), run(1, &[1000, 1000, 500]), run(1, &[1000; 2]), run(2, &[1000; 3])];
        plan(&runs, true, &mut msgs, &mut pieces);
        let shape: Vec<(usize, usize, usize)> = msgs.iter().map(|m| (m.run, m.pieces, m.datagrams)).collect();
        assert_eq!(shape, vec![(0, 2, 13), (2, 1, 2), (3, 1, 3)]);
        assert!(msgs.iter().all(|m| m.seg == Some(1000)));
        // Without offload: one message per datagram.
        plan(&runs, false, &mut msgs, &mut pieces);
        assert_eq!(msgs.len(), MAX_MSGS.min(18));
        assert!(msgs.iter().all(|m| m.seg.is_none() && m.datagrams == 1 && m.pieces == 1));
        // The kernel's limits: at most 64 datagrams and 65507 bytes per send.
        let big = [run(1, &[1472; 100])];
        plan(&big, true, &mut msgs, &mut pieces);
        let counts: Vec<usize> = msgs.iter().map(|m| m.datagrams).collect();
        assert_eq!(counts, vec![44, 44, 12]);
        let small = [run(1, &[100; 100])];
        plan(&small, true, &mut msgs, &mut pieces);
        let counts: Vec<usize> = msgs.iter().map(|m| m.datagrams).collect();
        assert_eq!(counts, vec![64, 36]);
        // A partly sent run resumes where it stopped.
        let mut resumed = run(1, &[1000; 5]);
        resumed.off = 3000;
        resumed.left = 2;
        plan(std::slice::from_ref(&resumed), true, &mut msgs, &mut pieces);
        assert_eq!(pieces, vec![Piece { run: 0, start: 3000, end: 5000, datagrams: 2 }]);
        // An empty datagram is one message of nothing.
        let empty = [Run::new(SocketAddr::from(([127, 0, 0, 1], 1)), &[], 0)];
        plan(&empty, true, &mut msgs, &mut pieces);
        assert_eq!((msgs.len(), msgs[0].seg, pieces[0].start, pieces[0].end), (1, None, 0, 0));
    }

    /// Pulls until `want` datagrams were read (cut at each slot's stride) or `timeout`.
    fn pull_datagrams(t: &UdpTransport, slot_size: usize, want: usize, timeout: Duration) -> Vec<(LinkAddr, Vec<u8>)> {
        let deadline = Instant::now() + timeout;
        let mut bufs = vec![vec![0u8; slot_size]; 8];
        let mut out = Vec::new();
        while out.len() < want && Instant::now() < deadline {
            let mut slots: Vec<RecvSlot<'_>> = bufs
                .iter_mut()
                .map(|b| RecvSlot { buf: b.as_mut_slice().into(), from: LinkAddr::Broadcast, len: 0, stride: 0 })
                .collect();
            let n = t.recv_pull(&mut slots).expect("the udp plugin pulls");
            for s in &slots[..n] {
                let len = s.len as usize;
                if len == 0 {
                    continue;
                }
                for d in s.buf.as_slice()[..len].chunks(s.stride as usize) {
                    out.push((s.from.clone(), d.to_vec()));
                }
            }
            if n == 0 {
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        out
    }

    #[test]
    fn pulled_datagrams_arrive_in_place_in_order_and_are_not_delivered() {
        let h = Harness::new();
        let rx = open_at(&h, r#"(bind: "127.0.0.1:0")"#);
        let tx = open_at(&Harness::new(), r#"(bind: "127.0.0.1:0")"#);
        let to = LinkAddr::from(rx.local);
        // Before anything arrives: nothing, and the instance is in pull mode from now on.
        let mut buf = vec![0u8; 65536];
        let mut one = [RecvSlot { buf: buf.as_mut_slice().into(), from: LinkAddr::Broadcast, len: 0, stride: 0 }];
        assert_eq!(rx.recv_pull(&mut one), Some(0));
        // A segmented batch (one offload send where the kernel has it) and loose datagrams.
        let frames: Vec<Vec<u8>> = (0..12u8).map(|i| vec![i; 1000]).collect();
        let batch: Vec<OutFrame<'_>> =
            frames.iter().map(|f| OutFrame { to: to.clone(), data: RSlice::from_slice(f) }).collect();
        assert_eq!(tx.send_batch(&batch).accepted, 12);
        tx.send(&to, b"short tail").unwrap();
        let got = pull_datagrams(&rx, 65536, 13, Duration::from_secs(5));
        let data: Vec<Vec<u8>> = got.iter().map(|(_, d)| d.clone()).collect();
        let mut want = frames.clone();
        want.push(b"short tail".to_vec());
        assert_eq!(data, want);
        assert!(got.iter().all(|(from, _)| *from == LinkAddr::from(tx.local)));
        // Nothing went the push way.
        assert!(h.wait(Duration::from_millis(200), |e| matches!(e, Event::Frames(_))).is_none());
    }

    #[test]
    fn a_pull_that_finds_nothing_is_answered_by_readable_once_data_arrives() {
        let h = Harness::new();
        let rx = open_at(&h, r#"(bind: "127.0.0.1:0")"#);
        let sender = StdUdp::bind("127.0.0.1:0").unwrap();
        let mut buf = vec![0u8; 2048];
        for round in 0..3u8 {
            let mut slot = [RecvSlot { buf: buf.as_mut_slice().into(), from: LinkAddr::Broadcast, len: 0, stride: 0 }];
            assert_eq!(rx.recv_pull(&mut slot), Some(0), "round {round}");
            sender.send_to(&[round; 100], rx.local).unwrap();
            assert!(h.wait(Duration::from_secs(5), |e| matches!(e, Event::Readable)).is_some(), "round {round}");
            let mut slot = [RecvSlot { buf: buf.as_mut_slice().into(), from: LinkAddr::Broadcast, len: 0, stride: 0 }];
            assert_eq!(rx.recv_pull(&mut slot), Some(1));
            assert_eq!((slot[0].len, slot[0].stride), (100, 100));
            assert_eq!(&slot[0].buf.as_slice()[..100], &[round; 100][..]);
        }
        // Not armed (the last pull found data): arrivals wake no one.
        sender.send_to(b"quiet", rx.local).unwrap();
        assert!(h.wait(Duration::from_millis(300), |e| matches!(e, Event::Readable | Event::Frames(_))).is_none());
        let got = pull_datagrams(&rx, 2048, 1, Duration::from_secs(5));
        assert_eq!(got[0].1, b"quiet");
    }

    #[test]
    fn a_datagram_larger_than_its_slot_is_dropped_not_cut() {
        let h = Harness::new();
        let rx = open_at(&h, r#"(bind: "127.0.0.1:0", offload: false)"#);
        let sender = StdUdp::bind("127.0.0.1:0").unwrap();
        // Pull mode first (what arrives before the first pull is delivered the push way).
        assert_eq!(rx.recv_pull(&mut []), Some(0));
        sender.send_to(&[7u8; 600], rx.local).unwrap();
        sender.send_to(&[8u8; 100], rx.local).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        let (mut a, mut b) = (vec![0u8; 500], vec![0u8; 500]);
        let mut slots = [
            RecvSlot { buf: a.as_mut_slice().into(), from: LinkAddr::Broadcast, len: 0, stride: 0 },
            RecvSlot { buf: b.as_mut_slice().into(), from: LinkAddr::Broadcast, len: 0, stride: 0 },
        ];
        assert_eq!(rx.recv_pull(&mut slots), Some(2));
        assert_eq!(slots[0].len, 0, "the 600-byte datagram did not fit: dropped");
        assert_eq!((slots[1].len, slots[1].buf.as_slice()[0]), (100, 8));
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
