//! The instance's I/O thread: one mio event loop that owns the listener, every connection
//! and every dial attempt.
//!
//! A single loop keeps `close` simple and fast however many peers there are: set the stop
//! flag, wake the loop, join one thread. `send` never touches a socket; it only pushes into
//! the peer's [`Outbox`], whose waker tells the loop that a connection has something to write.
//!
//! Backpressure: the loop moves frames from an outbox into that connection's write buffer
//! only while the buffer holds less than [`WRITE_BUF_LIMIT`] bytes, so a slow peer leaves its
//! outbox full and `send` returns `WouldBlock` until the socket drains.
//!
//! Host callbacks: every one is made on this thread and skipped once the stop flag is set.
//! `close` from another thread sets the flag and joins this thread, so no callback outlives
//! it; `close` from inside a callback sets the flag on this very thread, so every check after
//! the callback returns sees it. If the loop dies (a fatal poll error or a panic), [`Reactor::run`]
//! still reports every link down and fails every queue, so the instance never half-works.

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::mem;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard, Weak};
use std::time::{Duration, Instant};

use abi_stable::sabi_trait::TD_Opaque;
use abi_stable::std_types::{RArc, RSlice, RStr};
use antmesh_plugin_api::{guard, Host, HostHandle, HostHandle_TO, InFrame, LinkAddr, LogLevel};
use antmesh_plugin_kit::framing::Decoded;
use antmesh_plugin_kit::{Backoff, Codec, FramingKind, Outbox};
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token, Waker};

use crate::config::Config;

const WAKER: Token = Token(0);
const LISTENER: Token = Token(1);
const FIRST_CONN_TOKEN: usize = 2;

/// Encoded bytes a connection may hold outside its outbox. Large enough to keep a fast
/// link busy between wakeups, small enough that backpressure reaches `send` promptly.
const WRITE_BUF_LIMIT: usize = 256 * 1024;
/// Size of one `read` call.
const READ_CHUNK: usize = 64 * 1024;
/// Reads per connection per loop turn, so one fast sender cannot starve the others.
const READS_PER_TURN: usize = 16;
/// Give up on a dial the kernel is still retrying (a black-holed address would otherwise
/// hold the dialer for minutes before backoff even starts).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Retry delay after `accept` fails for lack of resources (e.g. no free descriptors).
const ACCEPT_RETRY: Duration = Duration::from_millis(100);
/// Bytes of `FramingKind::Length`'s prefix, for telling whether a connection is mid-frame.
const LEN_PREFIX: usize = 4;

/// A connection's outbound queue of raw frame payloads (encoded by the loop).
pub(crate) type FrameQueue = Outbox<Vec<u8>>;

/// State shared between the loop and the instance's `send`/`close`.
pub(crate) struct Shared {
    /// The outbound queue of every established connection, by peer address.
    peers: RwLock<HashMap<SocketAddr, Arc<FrameQueue>>>,
    /// Set by `close`: the loop exits and no host callback runs any more.
    stop: AtomicBool,
    /// Set when the loop has ended for any reason: nothing drains the queues any more.
    exited: AtomicBool,
    /// A failure for the loop to simulate at its next turn.
    #[cfg(test)]
    fault: Mutex<Option<Fault>>,
}

/// Failures tests inject into a running loop (see `TcpTransport::inject_fault`).
#[cfg(test)]
#[derive(Debug, Clone, Copy)]
pub(crate) enum Fault {
    /// The loop panics.
    Panic,
    /// `poll` fails with an error the loop cannot recover from.
    PollError,
}

impl Shared {
    /// Fresh state: no peers, not stopped.
    pub(crate) fn new() -> Self {
        Shared {
            peers: RwLock::new(HashMap::new()),
            stop: AtomicBool::new(false),
            exited: AtomicBool::new(false),
            #[cfg(test)]
            fault: Mutex::new(None),
        }
    }

    /// Arms `fault` for the loop's next turn (the caller wakes it).
    #[cfg(test)]
    pub(crate) fn inject(&self, fault: Fault) {
        *lock(&self.fault) = Some(fault);
    }

    /// The established connections' queues. A poisoned lock only means a thread panicked
    /// while holding it; the map is still consistent, so carry on.
    pub(crate) fn peers(&self) -> RwLockReadGuard<'_, HashMap<SocketAddr, Arc<FrameQueue>>> {
        self.peers.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn peers_mut(&self) -> RwLockWriteGuard<'_, HashMap<SocketAddr, Arc<FrameQueue>>> {
        self.peers.write().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether the instance is closing or closed.
    pub(crate) fn stopped(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }

    /// Tells the loop (and `send`) that the instance is closing.
    pub(crate) fn request_stop(&self) {
        self.stop.store(true, Ordering::Release);
    }

    /// Whether `send` must answer `Closed`: the instance is closing, or its loop is gone.
    pub(crate) fn refuses_sends(&self) -> bool {
        self.stopped() || self.exited.load(Ordering::Acquire)
    }

    /// Records that the loop has ended and will drain no queue again.
    pub(crate) fn mark_exited(&self) {
        self.exited.store(true, Ordering::Release);
    }

    /// Refuses further frames for every peer and releases what was queued: nothing will
    /// write them any more.
    pub(crate) fn forget_peers(&self) {
        let drained: Vec<_> = self.peers_mut().drain().map(|(_, q)| q).collect();
        for queue in drained {
            queue.close();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The host as the outboxes see it. `Outbox` calls `writable` itself (from `drain_into` and
/// `clear`), out of the reactor's sight; this applies the reactor's rule to those calls too:
/// nothing reaches the host once `close` has begun. Weak, because the outboxes live in
/// `Shared` and a strong reference would keep it alive in a cycle.
#[derive(Clone)]
struct GatedHost {
    host: Host,
    shared: Weak<Shared>,
}

impl GatedHost {
    fn open(&self) -> bool {
        self.shared.upgrade().is_some_and(|s| !s.stopped())
    }
}

impl HostHandle for GatedHost {
    fn deliver(&self, frames: RSlice<'_, InFrame<'_>>) {
        if self.open() {
            self.host.deliver(frames.as_slice());
        }
    }

    fn link_up(&self, peer: &LinkAddr) {
        if self.open() {
            self.host.link_up(peer);
        }
    }

    fn link_down(&self, peer: &LinkAddr, reason: RStr<'_>) {
        if self.open() {
            self.host.link_down(peer, reason.as_str());
        }
    }

    fn writable(&self) {
        if self.open() {
            self.host.writable();
        }
    }

    fn log(&self, level: LogLevel, message: RStr<'_>) {
        if self.open() {
            self.host.log(level, message.as_str());
        }
    }
}

/// Where one configured peer's dialer stands.
enum DialState {
    /// Next attempt at this instant.
    Waiting(Instant),
    /// A non-blocking connect is in flight.
    Connecting,
    /// Connected; the connection schedules the next attempt when it drops.
    Connected,
}

struct Dialer {
    addr: SocketAddr,
    backoff: Backoff,
    state: DialState,
    /// Failed attempts since the last success; only the first is worth a warning.
    failures: u32,
}

/// A dial whose TCP handshake has not finished.
struct PendingDial {
    stream: TcpStream,
    dialer: usize,
    deadline: Instant,
}

/// An established connection.
struct Conn {
    stream: TcpStream,
    peer: SocketAddr,
    link: LinkAddr,
    queue: Arc<FrameQueue>,
    codec: Codec,
    /// Encoded bytes not yet accepted by the socket start at `wpos`.
    wbuf: Vec<u8>,
    wpos: usize,
    /// The dialer that owns this connection, if it was dialled rather than accepted.
    dialer: Option<usize>,
    /// Received bytes that are not yet part of a complete frame (a partial prefix or payload).
    rx_partial: usize,
    /// When bytes last arrived; with `rx_partial > 0` this starts the frame timeout.
    last_rx: Instant,
}

impl Conn {
    /// Accounts for `n` bytes read that completed the frames in `decoded`.
    fn note_received(&mut self, n: usize, decoded: &[Decoded], now: Instant) {
        let framed: usize = decoded
            .iter()
            .map(|d| match d {
                Decoded::Frame(data) => LEN_PREFIX + data.len(),
                Decoded::Dropped(_) => 0,
            })
            .sum();
        self.rx_partial = self.rx_partial.saturating_add(n).saturating_sub(framed);
        self.last_rx = now;
    }

    /// When this connection times out for stalling mid-frame, if it is mid-frame. `None`
    /// also for a timeout too large to represent, which is as good as never.
    fn stall_deadline(&self, timeout: Duration) -> Option<Instant> {
        if self.rx_partial == 0 {
            return None;
        }
        self.last_rx.checked_add(timeout)
    }

    fn pending_bytes(&self) -> usize {
        self.wbuf.len() - self.wpos
    }

    /// Tops the write buffer up from the outbox, leaving frames queued (and so `send`
    /// blocked) once the buffer is full.
    fn refill(&mut self, mtu: usize, batch: &mut Vec<Vec<u8>>) {
        if self.wpos > 0 && (self.wpos == self.wbuf.len() || self.wpos >= WRITE_BUF_LIMIT / 2) {
            self.wbuf.drain(..self.wpos);
            self.wpos = 0;
        }
        while self.pending_bytes() < WRITE_BUF_LIMIT {
            let room = WRITE_BUF_LIMIT - self.pending_bytes();
            // Sized for worst-case frames so the buffer overshoots by at most one frame.
            let max = (room / (mtu + 4)).max(1);
            batch.clear();
            if self.queue.drain_into(batch, max) == 0 {
                break;
            }
            for frame in batch.drain(..) {
                self.codec.encode(&frame, &mut self.wbuf);
            }
        }
    }

    /// Writes until the socket or the outbox runs dry. `Ok` includes "socket full": the
    /// connection stays registered for writable readiness, which resumes the flush.
    fn flush(&mut self, mtu: usize) -> io::Result<()> {
        let mut batch = Vec::new();
        loop {
            self.refill(mtu, &mut batch);
            if self.pending_bytes() == 0 {
                self.wbuf.clear();
                self.wpos = 0;
                return Ok(());
            }
            match self.stream.write(&self.wbuf[self.wpos..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => self.wpos += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
}

/// The event loop and everything it owns.
pub(crate) struct Reactor {
    poll: Poll,
    listener: Option<TcpListener>,
    shared: Arc<Shared>,
    host: Host,
    /// `host` behind the stop gate, for the outboxes (see [`GatedHost`]).
    outbox_host: Host,
    waker: Weak<Waker>,
    /// Tokens whose outbox went from empty to non-empty since the last turn.
    ready: Arc<Mutex<Vec<Token>>>,
    conns: HashMap<Token, Conn>,
    dialing: HashMap<Token, PendingDial>,
    dialers: Vec<Dialer>,
    next_token: usize,
    accept_retry_at: Option<Instant>,
    /// Connections that used their read budget and may still have data.
    read_backlog: Vec<Token>,
    read_buf: Vec<u8>,
    mtu: usize,
    queue_frames: usize,
    nodelay: bool,
    max_connections: usize,
    max_connections_per_ip: usize,
    frame_timeout: Duration,
}

impl Reactor {
    /// Builds the loop around an already bound `listener`. Returns the waker `close` uses;
    /// outboxes only hold it weakly, so dropping the returned `Arc` after the loop has
    /// exited releases its descriptor.
    pub(crate) fn new(
        config: &Config,
        host: Host,
        listener: Option<TcpListener>,
        shared: Arc<Shared>,
    ) -> io::Result<(Reactor, Arc<Waker>)> {
        let poll = Poll::new()?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
        let mut listener = listener;
        if let Some(l) = listener.as_mut() {
            poll.registry().register(l, LISTENER, Interest::READABLE)?;
        }
        let now = Instant::now();
        let dialers = config
            .connect
            .iter()
            .map(|&addr| Dialer {
                addr,
                backoff: Backoff::new(config.backoff_min(), config.backoff_max()),
                state: DialState::Waiting(now),
                failures: 0,
            })
            .collect();
        let gated = GatedHost { host: host.clone(), shared: Arc::downgrade(&shared) };
        let outbox_host = Host::new(HostHandle_TO::from_ptr(RArc::new(gated), TD_Opaque));
        let reactor = Reactor {
            poll,
            listener,
            shared,
            host,
            outbox_host,
            waker: Arc::downgrade(&waker),
            ready: Arc::new(Mutex::new(Vec::new())),
            conns: HashMap::new(),
            dialing: HashMap::new(),
            dialers,
            next_token: FIRST_CONN_TOKEN,
            accept_retry_at: None,
            read_backlog: Vec::new(),
            read_buf: vec![0; READ_CHUNK],
            mtu: config.mtu as usize,
            queue_frames: config.queue_frames,
            nodelay: config.nodelay,
            max_connections: config.max_connections,
            max_connections_per_ip: config.max_connections_per_ip,
            frame_timeout: config.frame_timeout(),
        };
        Ok((reactor, waker))
    }

    /// Runs until `close` sets the stop flag or the loop dies (polling fails, or a bug
    /// panics), then releases everything. A loop that died without `close` reports every
    /// link down and fails every queue on its way out (see [`Reactor::finish`]).
    pub(crate) fn run(mut self) {
        let why = match guard(|| self.turns()) {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(format!("event loop failed: {e}")),
            Err(panic) => Some(format!("I/O thread panicked: {panic}")),
        };
        let reason = match why {
            Some(why) => {
                self.log(LogLevel::Error, &format!("tcp {why}; the instance stops working"));
                format!("transport stopped ({why})")
            }
            // Closed: `finish` makes no callbacks, so the reason is never seen.
            None => String::new(),
        };
        self.finish(&reason);
    }

    /// The event loop proper. `Ok` once stopped by `close`; `Err` if polling failed for good.
    fn turns(&mut self) -> io::Result<()> {
        let mut events = Events::with_capacity(256);
        while !self.shared.stopped() {
            self.service_timers(Instant::now());
            let timeout = self.next_timeout(Instant::now());
            let polled = self.poll.poll(&mut events, timeout);
            #[cfg(test)]
            let polled = self.strike(polled);
            if let Err(e) = polled {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            for event in events.iter() {
                if self.shared.stopped() {
                    break;
                }
                match event.token() {
                    WAKER => {}
                    LISTENER => self.accept_all(),
                    t if self.dialing.contains_key(&t) => self.finish_dial(t),
                    t => {
                        if event.is_readable() || event.is_read_closed() || event.is_error() {
                            self.read(t);
                        }
                        if event.is_error() {
                            self.check_socket_error(t);
                        }
                        if event.is_writable() {
                            self.flush(t);
                        }
                    }
                }
            }
            if self.shared.stopped() {
                break;
            }
            let ready = mem::take(&mut *lock(&self.ready));
            for t in ready {
                self.flush(t);
            }
            for t in mem::take(&mut self.read_backlog) {
                self.read(t);
            }
        }
        Ok(())
    }

    /// Replaces the poll outcome with an injected failure, if a test armed one.
    #[cfg(test)]
    fn strike(&self, polled: io::Result<()>) -> io::Result<()> {
        match lock(&self.shared.fault).take() {
            Some(Fault::Panic) => panic!("injected panic"),
            Some(Fault::PollError) => Err(io::Error::other("injected poll failure")),
            None => polled,
        }
    }

    /// Tears everything down once the loop has ended. After `close` every callback below is
    /// suppressed by the stop flag; after a loop death they tell the host and the senders
    /// that this instance is gone, instead of leaving links up that nothing serves and
    /// senders waiting for a `writable` that would never come.
    fn finish(&mut self, reason: &str) {
        // First, so that from here on `send` answers `Closed`, including a sender woken by
        // the `clear` below.
        self.shared.mark_exited();
        self.shared.forget_peers();
        self.dialing.clear();
        self.read_backlog.clear();
        // Refuse new connections rather than leave them in the backlog unanswered.
        self.listener = None;
        let conns: Vec<Conn> = self.conns.drain().map(|(_, c)| c).collect();
        for conn in conns {
            conn.queue.close();
            // Wakes senders refused with WouldBlock: on retry they get `Closed`.
            conn.queue.clear();
            drop(conn.stream);
            self.link_down(&conn.link, reason);
        }
    }

    fn next_timeout(&self, now: Instant) -> Option<Duration> {
        if !self.read_backlog.is_empty() {
            return Some(Duration::ZERO);
        }
        let dial_timers = self.dialers.iter().filter_map(|d| match d.state {
            DialState::Waiting(at) => Some(at),
            DialState::Connecting | DialState::Connected => None,
        });
        let deadlines = self.dialing.values().map(|p| p.deadline);
        let stalls = self.conns.values().filter_map(|c| c.stall_deadline(self.frame_timeout));
        dial_timers
            .chain(deadlines)
            .chain(stalls)
            .chain(self.accept_retry_at)
            .min()
            .map(|at| at.saturating_duration_since(now))
    }

    fn service_timers(&mut self, now: Instant) {
        let stalled: Vec<Token> = self
            .conns
            .iter()
            // One with reads pending is not stalled; its data is just not read yet.
            .filter(|(t, c)| {
                c.stall_deadline(self.frame_timeout).is_some_and(|at| at <= now) && !self.read_backlog.contains(t)
            })
            .map(|(&t, _)| t)
            .collect();
        for t in stalled {
            let why = format!("no data for {} ms in the middle of a frame", self.frame_timeout.as_millis());
            self.drop_conn(t, &why);
        }
        for d in 0..self.dialers.len() {
            if self.shared.stopped() {
                // Closed from a callback above: open no new sockets.
                return;
            }
            if matches!(self.dialers[d].state, DialState::Waiting(at) if at <= now) {
                self.dial(d);
            }
        }
        let expired: Vec<Token> =
            self.dialing.iter().filter(|(_, p)| p.deadline <= now).map(|(&t, _)| t).collect();
        for t in expired {
            if let Some(pending) = self.dialing.remove(&t) {
                self.dial_failed(pending, &io::Error::from(io::ErrorKind::TimedOut));
            }
        }
        if self.accept_retry_at.is_some_and(|at| at <= now) {
            self.accept_retry_at = None;
            self.accept_all();
        }
    }

    fn token(&mut self) -> Token {
        let t = Token(self.next_token);
        self.next_token = self.next_token.checked_add(1).unwrap_or(FIRST_CONN_TOKEN);
        t
    }

    // ---- host callbacks: none once `close` has begun -------------------------------------

    fn log(&self, level: LogLevel, message: &str) {
        if !self.shared.stopped() {
            self.host.log(level, message);
        }
    }

    fn link_up(&self, peer: &LinkAddr) {
        if !self.shared.stopped() {
            self.host.link_up(peer);
        }
    }

    fn link_down(&self, peer: &LinkAddr, reason: &str) {
        if !self.shared.stopped() {
            self.host.link_down(peer, reason);
        }
    }

    fn deliver(&self, from: &LinkAddr, decoded: &[Decoded]) {
        if self.shared.stopped() {
            return;
        }
        let frames: Vec<InFrame<'_>> = decoded
            .iter()
            .filter_map(|d| match d {
                Decoded::Frame(data) => Some(InFrame { from: from.clone(), data: RSlice::from_slice(data) }),
                // The length framing never drops frames; it fails the stream instead.
                Decoded::Dropped(_) => None,
            })
            .collect();
        self.host.deliver(&frames);
    }

    // ---- accepting and dialling ----------------------------------------------------------

    /// Connections that hold (or are about to hold) a descriptor: established, accepted or
    /// dialled, and dials in progress.
    fn connection_count(&self) -> usize {
        self.conns.len() + self.dialing.len()
    }

    fn accept_all(&mut self) {
        loop {
            if self.shared.stopped() {
                return;
            }
            let Some(listener) = self.listener.as_ref() else { return };
            match listener.accept() {
                Ok((stream, peer)) => {
                    if self.connection_count() >= self.max_connections {
                        // Accept-and-close rather than leaving it in the backlog: the peer
                        // learns at once, and the backlog stays free for when a slot opens.
                        drop(stream);
                        let limit = self.max_connections;
                        let why = format!("refused connection from {peer}: max_connections ({limit}) reached");
                        self.log(LogLevel::Debug, &why);
                        continue;
                    }
                    let from_ip = self.conns.values().filter(|c| c.dialer.is_none() && c.peer.ip() == peer.ip()).count();
                    if from_ip >= self.max_connections_per_ip {
                        drop(stream);
                        let limit = self.max_connections_per_ip;
                        self.log(LogLevel::Debug, &format!("refused connection from {peer}: max_connections_per_ip ({limit}) reached"));
                        continue;
                    }
                    let t = self.token();
                    self.adopt(stream, t, peer, None);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if matches!(e.kind(), io::ErrorKind::Interrupted | io::ErrorKind::ConnectionAborted) => {}
                Err(e) => {
                    // Typically out of descriptors. The connection stays in the backlog and
                    // edge-triggered readiness will not report it again, so retry on a timer.
                    self.log(LogLevel::Warn, &format!("accept failed: {e}; retrying"));
                    self.accept_retry_at = Some(Instant::now() + ACCEPT_RETRY);
                    return;
                }
            }
        }
    }

    fn dial(&mut self, d: usize) {
        let addr = self.dialers[d].addr;
        let t = self.token();
        let attempt = TcpStream::connect(addr).and_then(|mut stream| {
            self.poll.registry().register(&mut stream, t, Interest::READABLE | Interest::WRITABLE)?;
            Ok(stream)
        });
        match attempt {
            Ok(stream) => {
                self.dialers[d].state = DialState::Connecting;
                let deadline = Instant::now() + CONNECT_TIMEOUT;
                self.dialing.insert(t, PendingDial { stream, dialer: d, deadline });
            }
            Err(e) => self.schedule_redial(d, &format!("dial {addr} failed: {e}")),
        }
    }

    /// Called on any readiness of a dial in flight: it either completed or failed.
    fn finish_dial(&mut self, t: Token) {
        let Some(pending) = self.dialing.get(&t) else { return };
        let outcome = match pending.stream.take_error() {
            Ok(Some(e)) | Err(e) => Err(e),
            Ok(None) => match pending.stream.peer_addr() {
                Ok(_) => Ok(()),
                // Spurious wakeup: the handshake is still in progress.
                Err(e) if e.kind() == io::ErrorKind::NotConnected => return,
                Err(e) => Err(e),
            },
        };
        let Some(pending) = self.dialing.remove(&t) else { return };
        match outcome {
            Ok(()) => {
                let addr = self.dialers[pending.dialer].addr;
                self.adopt(pending.stream, t, addr, Some(pending.dialer));
            }
            Err(e) => self.dial_failed(pending, &e),
        }
    }

    fn dial_failed(&mut self, mut pending: PendingDial, err: &io::Error) {
        // Deregistering a socket about to be closed only fails if it was never registered.
        let _ = self.poll.registry().deregister(&mut pending.stream);
        let addr = self.dialers[pending.dialer].addr;
        self.schedule_redial(pending.dialer, &format!("dial {addr} failed: {err}"));
    }

    fn schedule_redial(&mut self, d: usize, why: &str) {
        let dialer = &mut self.dialers[d];
        let delay = dialer.backoff.next_delay();
        dialer.state = DialState::Waiting(Instant::now() + delay);
        dialer.failures = dialer.failures.saturating_add(1);
        let level = if dialer.failures == 1 { LogLevel::Warn } else { LogLevel::Debug };
        let message = format!("{why}; retrying in {} ms", delay.as_millis());
        self.log(level, &message);
    }

    /// Makes `stream` (accepted, or dialled and registered under `t`) a live connection:
    /// publishes its outbox to `send`, then reports the link up.
    fn adopt(&mut self, mut stream: TcpStream, t: Token, peer: SocketAddr, dialer: Option<usize>) {
        if dialer.is_none() {
            if let Err(e) = self.poll.registry().register(&mut stream, t, Interest::READABLE | Interest::WRITABLE) {
                self.log(LogLevel::Warn, &format!("cannot watch connection from {peer}: {e}"));
                return;
            }
        }
        if let Err(e) = stream.set_nodelay(self.nodelay) {
            self.log(LogLevel::Debug, &format!("{peer}: cannot set TCP_NODELAY: {e}"));
        }
        let queue = Arc::new(Outbox::new(self.queue_frames, self.outbox_host.clone()).with_waker(self.wake_fn(t)));
        let published = match self.shared.peers_mut().entry(peer) {
            Entry::Vacant(slot) => {
                slot.insert(Arc::clone(&queue));
                true
            }
            Entry::Occupied(_) => false,
        };
        if !published {
            let _ = self.poll.registry().deregister(&mut stream);
            let why = format!("already connected to {peer}; dropping the duplicate connection");
            match dialer {
                Some(d) => self.schedule_redial(d, &why),
                None => self.log(LogLevel::Warn, &why),
            }
            return;
        }
        let link = LinkAddr::from(peer);
        if let Some(d) = dialer {
            let dialer = &mut self.dialers[d];
            dialer.state = DialState::Connected;
            dialer.backoff.reset();
            dialer.failures = 0;
        }
        self.conns.insert(
            t,
            Conn {
                stream,
                peer,
                link: link.clone(),
                queue,
                codec: Codec::new(FramingKind::Length, self.mtu),
                wbuf: Vec::new(),
                wpos: 0,
                dialer,
                rx_partial: 0,
                last_rx: Instant::now(),
            },
        );
        self.link_up(&link);
        // The peer may have written already; its readiness edge can predate registration.
        self.read(t);
    }

    /// What an outbox calls when it becomes non-empty (or closes): note the connection and
    /// wake the loop. Weak so a queue kept alive by a late `send` does not keep the waker's
    /// descriptor open after `close`.
    fn wake_fn(&self, t: Token) -> impl Fn() + Send + Sync + 'static {
        let ready = Arc::clone(&self.ready);
        let waker = Weak::clone(&self.waker);
        move || {
            lock(&ready).push(t);
            if let Some(w) = waker.upgrade() {
                // Only fails if the eventfd is unusable; the loop then still sees the frame
                // on the connection's next writable event.
                let _ = w.wake();
            }
        }
    }

    // ---- established connections ---------------------------------------------------------

    fn read(&mut self, t: Token) {
        let mut decoded = Vec::new();
        for _ in 0..READS_PER_TURN {
            if self.shared.stopped() {
                return;
            }
            let Some(conn) = self.conns.get_mut(&t) else { return };
            match conn.stream.read(&mut self.read_buf) {
                Ok(0) => return self.drop_conn(t, "connection closed by peer"),
                Ok(n) => {
                    decoded.clear();
                    let result = conn.codec.decode(&self.read_buf[..n], &mut decoded);
                    conn.note_received(n, &decoded, Instant::now());
                    let link = conn.link.clone();
                    // Frames decoded before a framing error are good; deliver them first.
                    self.deliver(&link, &decoded);
                    if let Err(e) = result {
                        return self.drop_conn(t, &format!("framing error: {e}"));
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return self.drop_conn(t, &format!("read failed: {e}")),
            }
        }
        // Budget used up. Edge-triggered readiness will not repeat for data already
        // waiting, so come back on the next turn.
        self.read_backlog.push(t);
    }

    fn check_socket_error(&mut self, t: Token) {
        let Some(conn) = self.conns.get(&t) else { return };
        match conn.stream.take_error() {
            Ok(None) => {}
            Ok(Some(e)) | Err(e) => self.drop_conn(t, &format!("socket error: {e}")),
        }
    }

    fn flush(&mut self, t: Token) {
        if self.shared.stopped() {
            // Closed from a callback this turn: nothing may be written or signalled any more.
            return;
        }
        let Some(conn) = self.conns.get_mut(&t) else { return };
        if let Err(e) = conn.flush(self.mtu) {
            self.drop_conn(t, &format!("write failed: {e}"));
        }
    }

    /// Tears a connection down: unpublishes its queue (so `send` reports the peer unknown),
    /// reports the link down and, for a dialled peer, schedules the redial.
    fn drop_conn(&mut self, t: Token, reason: &str) {
        let Some(mut conn) = self.conns.remove(&t) else { return };
        let _ = self.poll.registry().deregister(&mut conn.stream);
        {
            let mut peers = self.shared.peers_mut();
            if peers.get(&conn.peer).is_some_and(|q| Arc::ptr_eq(q, &conn.queue)) {
                peers.remove(&conn.peer);
            }
        }
        conn.queue.close();
        // Wakes senders refused with WouldBlock: on retry they learn the peer is gone. Its
        // `writable` goes through the gated host, so it is silent if a callback earlier in
        // this turn closed the instance.
        conn.queue.clear();
        drop(conn.stream);
        self.link_down(&conn.link, reason);
        if let Some(d) = conn.dialer {
            let why = format!("connection to {} lost ({reason})", conn.peer);
            self.schedule_redial(d, &why);
        }
    }
}
