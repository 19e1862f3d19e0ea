//! The constrained link engine: authenticated, encrypted, reliable sessions over transports
//! below the QUIC bar (serial, pipe, TCP, and later LoRa, AX.25, BLE).
//!
//! Sans-IO in the manner of quinn-proto: the caller feeds [`LinkEngine::handle_frame`] and
//! [`LinkEngine::handle_timeout`] with the current instant, and drains
//! [`LinkEngine::poll_transmit`], [`LinkEngine::poll_event`] and [`LinkEngine::poll_timeout`].
//! No sockets, no clock, no threads: the daemon drives it over a plugin, the simulation in
//! `tests/` drives it over a virtual link, and both see the same behaviour.
//!
//! Read in this order: [`wire`] (frames), [`handshake`] (the PQC handshake and
//! resumption), [`frag`] (handshake fragmentation), [`session`] (keys, ratchet, replay),
//! [`arq`] (selective repeat). docs/link.md describes the protocol for implementers.
//!
//! Peers are keyed by the transport's link address; one session per address. Identity is
//! the same [`PeerId`] as on QUIC: the ML-DSA-65 key that signed the handshake.

pub mod arq;
pub mod crypto;
pub mod frag;
pub mod handshake;
pub mod session;
pub mod sim;
pub mod wire;

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use antmesh_plugin_api::{Capabilities, LinkAddr};

use self::arq::{Arq, ArqConfig, ArqError, PushError};
use self::crypto::Rng;
use self::frag::{Outgoing, Reassembly, ReassemblyError};
use self::handshake::{HandshakeError, InitiatorStart, ResponderWait, SessionSecrets, Ticket};
use self::session::{KeyLimits, OpenError, Session};
pub use self::session::Mode;
use self::wire::{Frame, Kind, RejectReason, WireError, DATA_HEADER_LEN, NONCE_LEN, TAG_LEN, TICKET_ID_LEN};
use crate::budget::{BlockList, Limiter};
use crate::identity::{Identity, PeerId, PublicIdentity};

/// The largest frame the engine sends, whatever the transport's MTU.
pub const MAX_ENGINE_MTU: usize = 8192;

/// Settings of one engine (one interface).
#[derive(Debug, Clone)]
pub struct LinkConfig {
    /// Largest frame the transport carries.
    pub mtu: usize,
    /// Declared link rate in bit/s; 0 when unknown (no pacing).
    pub bitrate_bps: u64,
    /// One-way latency to assume before measuring.
    pub latency: Duration,
    /// Send a keepalive after this long without sending.
    pub keepalive: Duration,
    /// Declare the peer dead after this long without an authenticated frame.
    pub dead_after: Duration,
    /// Give up on a handshake after this long.
    pub handshake_timeout: Duration,
    /// Ratchet step after this many bytes under one key.
    pub ratchet_bytes: u64,
    /// Ratchet step after this long under one key.
    pub ratchet_interval: Duration,
    /// Fresh ML-KEM exchange after this many bytes in one generation.
    pub rekey_bytes: u64,
    /// Fresh ML-KEM exchange after this long; keys expire (session closed) at three times this.
    pub rekey_interval: Duration,
    /// Largest message.
    pub max_message: usize,
    /// Bytes queued per session before `send` refuses.
    pub send_buffer: usize,
    /// Most segments in flight per session.
    pub max_window: u32,
    /// Most peers (link addresses) with state.
    pub max_peers: usize,
    /// Most handshakes in progress at once.
    pub max_handshakes: usize,
    /// Most cached public keys (1,952 bytes each).
    pub max_known_keys: usize,
    /// Most resumption tickets held.
    pub max_tickets: usize,
    /// Offer resumption when a ticket is held.
    pub resumption: bool,
    /// When a responder asks an initiator to prove its address (a Cookie it must echo)
    /// before signing anything for it.
    pub cookie: CookieMode,
    /// Handshakes in progress from one source: an IP address, other link addresses as
    /// they are.
    pub max_handshakes_per_source: usize,
    /// Sessions (handshakes included) from one source.
    pub max_sessions_per_source: usize,
    /// Handshakes answered per second for initiators that did not prove their address
    /// (each costs an ML-DSA-65 signature); beyond, a Cookie first.
    pub responder_rate: f64,
    /// Burst of that allowance.
    pub responder_burst: u32,
}

/// When a responder wants an address proof before it answers a Hello.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum CookieMode {
    /// Never: answer every Hello (within the allowance; then refuse as busy).
    Never,
    /// Once handshakes pile up (half of `max_handshakes`) or the unproven allowance is
    /// spent: the default. One more round trip, only under load.
    UnderLoad,
    /// Always: one more round trip for every full handshake (not for resumptions).
    Always,
}

impl LinkConfig {
    /// Timers scaled to a link of this MTU and rate.
    pub fn for_link(mtu: usize, bitrate_bps: u64) -> LinkConfig {
        let frame = tx_time(mtu, bitrate_bps);
        let cold_hs = tx_time(13_500, bitrate_bps);
        LinkConfig {
            mtu,
            bitrate_bps,
            latency: Duration::from_millis(50),
            keepalive: (frame * 30).max(Duration::from_secs(15)),
            dead_after: (frame * 120).max(Duration::from_secs(60)),
            handshake_timeout: (cold_hs * 8).max(Duration::from_secs(30)),
            ratchet_bytes: 16 << 20,
            ratchet_interval: Duration::from_secs(600),
            rekey_bytes: 1 << 30,
            rekey_interval: Duration::from_secs(3600),
            max_message: 256 << 10,
            send_buffer: 1 << 20,
            max_window: 128,
            max_peers: 64,
            max_handshakes: 8,
            max_known_keys: 256,
            max_tickets: 256,
            resumption: true,
            cookie: CookieMode::UnderLoad,
            max_handshakes_per_source: 2,
            max_sessions_per_source: 8,
            responder_rate: 5.0,
            responder_burst: 10,
        }
    }

    /// Settings for a transport's declared capabilities. Frames are capped at
    /// [`MAX_ENGINE_MTU`] even where the transport takes more (pipes, TCP): that bounds
    /// the receive window's memory and costs little on links this engine serves.
    pub fn from_capabilities(caps: &Capabilities) -> LinkConfig {
        let mut c = LinkConfig::for_link((caps.mtu as usize).min(MAX_ENGINE_MTU), caps.bitrate_bps);
        c.latency = match caps.latency {
            antmesh_plugin_api::LatencyClass::Lan => Duration::from_millis(5),
            antmesh_plugin_api::LatencyClass::Wan => Duration::from_millis(100),
            _ => Duration::from_secs(1),
        };
        c
    }

    fn frame_time(&self) -> Duration {
        tx_time(self.mtu, self.bitrate_bps)
    }

    fn ack_delay(&self) -> Duration {
        (self.frame_time() * 6 / 5).clamp(Duration::from_millis(5), Duration::from_secs(3))
    }

    fn initial_rtt(&self) -> Duration {
        self.frame_time() * 2 + self.ack_delay() + self.latency * 2
    }

    /// First retransmission timeout of a handshake message, after its last fragment went out.
    fn hs_rto(&self, rounds: u32) -> Duration {
        let base = (self.frame_time() * 3 + self.latency * 4 + self.ack_delay()).max(Duration::from_millis(100));
        (base * (1 << rounds.min(5))).min(Duration::from_secs(120).max(base))
    }

    /// How long a receiver waits without progress before reporting the fragments it misses.
    fn nack_delay(&self) -> Duration {
        (self.frame_time() * 3 + self.latency * 2).max(Duration::from_millis(50))
    }

    fn arq(&self) -> ArqConfig {
        let frame = self.frame_time();
        ArqConfig {
            max_window: self.max_window,
            max_message: self.max_message,
            send_buffer: self.send_buffer,
            ack_delay: self.ack_delay(),
            min_rto: (frame * 2).max(Duration::from_millis(100)),
            max_rto: (frame * 20).max(Duration::from_secs(60)),
            initial_rtt: self.initial_rtt(),
            bitrate_bps: self.bitrate_bps,
            packet_room: self.packet_room(),
        }
    }

    /// Plaintext bytes one data frame can carry.
    fn packet_room(&self) -> usize {
        self.mtu.saturating_sub(DATA_HEADER_LEN + TAG_LEN)
    }
}

/// Serialisation time of `bytes` at `bps` (zero when the rate is unknown).
pub fn tx_time(bytes: usize, bps: u64) -> Duration {
    if bps == 0 {
        return Duration::ZERO;
    }
    Duration::from_nanos((bytes as u64 * 8).saturating_mul(1_000_000_000) / bps)
}

/// A frame to hand to the transport.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transmit {
    /// Where to.
    pub to: LinkAddr,
    /// The frame.
    pub frame: Vec<u8>,
}

/// Why a session ended.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum DisconnectReason {
    /// Closed by this node.
    Closed,
    /// The peer closed it.
    ClosedByPeer,
    /// Nothing authenticated arrived within `dead_after`.
    Timeout,
    /// No fresh key agreement within three rekey intervals.
    KeysExpired,
    /// A new handshake on the same address replaced it.
    Replaced,
    /// The peer broke the session protocol.
    Protocol(ArqError),
}

/// Something the application should know.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum LinkEvent {
    /// A session is up and authenticated.
    Connected {
        /// Link address.
        addr: LinkAddr,
        /// The peer's id (from the key that signed the handshake).
        peer: PeerId,
        /// How keys were agreed.
        mode: Mode,
        /// Whether this node initiated.
        initiator: bool,
    },
    /// Fresh keys were agreed inside a running session.
    Rekeyed {
        /// Link address.
        addr: LinkAddr,
        /// Peer.
        peer: PeerId,
    },
    /// A message arrived, complete and in order.
    Message {
        /// Link address.
        addr: LinkAddr,
        /// Peer.
        peer: PeerId,
        /// The message.
        data: Vec<u8>,
    },
    /// A session ended.
    Disconnected {
        /// Link address.
        addr: LinkAddr,
        /// Peer.
        peer: PeerId,
        /// Why.
        reason: DisconnectReason,
    },
    /// A handshake failed.
    HandshakeFailed {
        /// Link address.
        addr: LinkAddr,
        /// Why.
        error: HandshakeError,
    },
}

/// Why an incoming frame was dropped. The engine carries on either way; this is for
/// counters, logs and tests.
#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum FrameError {
    /// Not a frame of this protocol.
    #[error(transparent)]
    Wire(#[from] WireError),
    /// A handshake fragment that does not fit the message.
    #[error(transparent)]
    Reassembly(#[from] ReassemblyError),
    /// The handshake failed on this frame.
    #[error(transparent)]
    Handshake(#[from] HandshakeError),
    /// A data frame with no session on that address.
    #[error("data frame without a session")]
    NoSession,
    /// A data frame that did not open.
    #[error(transparent)]
    Open(#[from] OpenError),
    /// The session protocol inside a data frame was violated.
    #[error(transparent)]
    Arq(#[from] ArqError),
    /// A handshake frame for an attempt this node does not have.
    #[error("frame for unknown handshake attempt {0:#06x}")]
    UnknownAttempt(u16),
    /// A resumption for a ticket this node does not hold.
    #[error("unknown resumption ticket")]
    UnknownTicket,
    /// State for another peer would exceed `max_peers`.
    #[error("too many peers")]
    TooManyPeers,
    /// Another handshake would exceed `max_handshakes`.
    #[error("too many handshakes in progress")]
    Busy,
    /// A handshake from a peer this engine blocked ([`LinkEngine::block_peer`]).
    #[error("{0} is blocked")]
    Blocked(PeerId),
    /// Its source already has `max_handshakes_per_source` handshakes or
    /// `max_sessions_per_source` sessions.
    #[error("too many handshakes or sessions from this source")]
    SourceLimit,
    /// A CookieEcho with the wrong cookie.
    #[error("wrong cookie")]
    BadCookie,
    /// A frame that is valid but not expected now (for example a Hello that lost a
    /// simultaneous-open tie-break).
    #[error("{0:?} frame ignored in this state")]
    Ignored(Kind),
}

/// Why `connect` did nothing.
#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConnectError {
    /// State for another peer would exceed `max_peers`.
    #[error("too many peers")]
    TooManyPeers,
    /// A handshake message does not fit 256 fragments at this MTU.
    #[error(transparent)]
    Handshake(#[from] HandshakeError),
    /// Its source already holds `max_sessions_per_source` peers.
    #[error("too many peers from this source")]
    SourceLimit,
    /// The transport's MTU is below [`wire::MIN_MTU`].
    #[error("MTU {mtu} is below the engine's minimum of {} bytes", wire::MIN_MTU)]
    MtuTooSmall {
        /// The MTU.
        mtu: usize,
    },
}

/// Why `send` refused a message.
#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum SendError {
    /// No authenticated session with that peer.
    #[error("no session with {0}")]
    NoSession(PeerId),
    /// The session refused it.
    #[error(transparent)]
    Push(#[from] PushError),
}

/// Counters.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct LinkStats {
    /// Frames handed to the transport.
    pub frames_out: u64,
    /// Bytes handed to the transport.
    pub bytes_out: u64,
    /// Handshake (non-data) bytes handed to the transport.
    pub handshake_bytes_out: u64,
    /// Frames received.
    pub frames_in: u64,
    /// Bytes received.
    pub bytes_in: u64,
    /// Frames dropped (any [`FrameError`]).
    pub dropped: u64,
    /// Data frames refused as replays.
    pub replays: u64,
    /// Handshakes completed, by mode.
    pub cold: u64,
    /// Warm handshakes completed.
    pub warm: u64,
    /// Resumptions completed.
    pub resumed: u64,
    /// Rekeys completed.
    pub rekeys: u64,
    /// Handshakes failed.
    pub handshakes_failed: u64,
    /// Segments retransmitted.
    pub retransmits: u64,
    /// Cookies sent (address proofs asked for before answering a Hello).
    pub cookies_sent: u64,
    /// Hellos answered with a signed Reply.
    pub hellos_answered: u64,
}

enum InitStage {
    AwaitReply(InitiatorStart),
    AwaitConfirm,
}

struct InitHs {
    tag: u16,
    started: Instant,
    nonce: [u8; NONCE_LEN],
    stage: InitStage,
    out: Outgoing,
    rx: Reassembly,
    nack_at: Option<Instant>,
    /// When the responder acknowledged Finish (not yet authenticated).
    acked_at: Option<Instant>,
    rekey: bool,
    mode: Mode,
    expect: Option<PeerId>,
}

struct RespHs {
    tag: u16,
    hello_last: u8,
    started: Instant,
    wait: ResponderWait,
    out: Outgoing,
    rx: Reassembly,
    nack_at: Option<Instant>,
    mode: Mode,
}

struct ResumeHs {
    tag: u16,
    started: Instant,
    frame: Vec<u8>,
    nonce: [u8; NONCE_LEN],
    ticket: [u8; TICKET_ID_LEN],
    peer: PeerId,
    due: Option<Instant>,
    sent_at: Option<Instant>,
    rounds: u32,
}

enum Hs {
    Init(Box<InitHs>),
    Resp(Box<RespHs>),
    Resume(Box<ResumeHs>),
}

impl Hs {
    fn started(&self) -> Instant {
        match self {
            Hs::Init(h) => h.started,
            Hs::Resp(h) => h.started,
            Hs::Resume(h) => h.started,
        }
    }
}

/// A completed responder-side exchange, kept to answer retransmissions of its last message.
enum Completed {
    Full { tag: u16, last: u8 },
    Resume { request: Vec<u8>, answer: Vec<u8> },
}

/// A Hello coming in, before any handshake state exists for it.
struct HelloRx {
    tag: u16,
    rx: Reassembly,
    nack_at: Option<Instant>,
    nacks: u32,
}

/// Reports of missing Hello fragments per attempt.
const MAX_HELLO_NACKS: u32 = 3;

/// A whole Hello kept while its initiator proves its address.
struct HeldHello {
    tag: u16,
    last: u8,
    hello: Vec<u8>,
    cookie: [u8; wire::COOKIE_LEN],
    at: Instant,
}

/// Where a peer is, for per-source limits: the IP of an IP address (any port), else the
/// address itself.
#[derive(PartialEq, Eq)]
enum Source<'a> {
    Ip(std::net::IpAddr),
    Other(&'a LinkAddr),
}

fn source_of(addr: &LinkAddr) -> Source<'_> {
    match addr.socket_addr() {
        Some(sa) => Source::Ip(match sa.ip() {
            std::net::IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(std::net::IpAddr::V6(v6), std::net::IpAddr::V4),
            v4 => v4,
        }),
        None => Source::Other(addr),
    }
}

/// Equality that takes the same time wherever the inputs differ.
fn same_bytes(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

struct Peer {
    addr: LinkAddr,
    hs: Option<Hs>,
    session: Option<Session>,
    /// This node keeps a session to this address up, expecting this id (if known).
    want: Option<Option<PeerId>>,
    hello_rx: Option<HelloRx>,
    held_hello: Option<HeldHello>,
    control: VecDeque<Vec<u8>>,
    completed: Option<Completed>,
    last_peer: Option<PeerId>,
    retry_at: Option<Instant>,
    failures: u32,
    /// The transport reported the link down (and not up again): nothing is dialled, and
    /// without a session the peer may be forgotten (an accepted connection's address never
    /// comes back).
    link_down: bool,
}

impl Peer {
    fn new(addr: LinkAddr) -> Peer {
        Peer {
            addr,
            hs: None,
            session: None,
            want: None,
            hello_rx: None,
            held_hello: None,
            control: VecDeque::new(),
            completed: None,
            last_peer: None,
            retry_at: None,
            failures: 0,
            link_down: false,
        }
    }

    /// Whether the peer holds nothing worth keeping: no session, no handshake, and nobody
    /// to dial (or a dialled link that is down).
    fn is_idle(&self) -> bool {
        self.session.is_none() && self.hs.is_none() && (self.want.is_none() || self.link_down)
    }
}

/// The engine of one interface.
pub struct LinkEngine {
    me: Arc<Identity>,
    cfg: LinkConfig,
    rng: Rng,
    peers: Vec<Peer>,
    rr: usize,
    keys: HashMap<PeerId, PublicIdentity>,
    key_order: VecDeque<PeerId>,
    tickets: HashMap<[u8; TICKET_ID_LEN], Ticket>,
    ticket_by_peer: HashMap<PeerId, [u8; TICKET_ID_LEN]>,
    ticket_order: VecDeque<[u8; TICKET_ID_LEN]>,
    events: VecDeque<LinkEvent>,
    next_tx: Option<Instant>,
    stats: LinkStats,
    /// Peers refused until the instant.
    blocked: BlockList<PeerId>,
    /// Hellos answered for initiators that did not prove their address.
    responder: Limiter,
}

/// Most peers remembered as blocked.
const MAX_BLOCKED: usize = 1024;

impl LinkEngine {
    /// An engine for `me` with a random seed from the operating system.
    pub fn new(me: Arc<Identity>, cfg: LinkConfig) -> Result<LinkEngine, getrandom::Error> {
        Ok(Self::with_rng(me, cfg, Rng::from_os()?))
    }

    /// An engine whose randomness comes from `seed` (simulations and tests).
    pub fn with_seed(me: Arc<Identity>, cfg: LinkConfig, seed: [u8; 32]) -> LinkEngine {
        Self::with_rng(me, cfg, Rng::from_seed(seed))
    }

    fn with_rng(me: Arc<Identity>, cfg: LinkConfig, rng: Rng) -> LinkEngine {
        let responder = Limiter::new(cfg.responder_rate, cfg.responder_burst);
        LinkEngine {
            me,
            cfg,
            rng,
            peers: Vec::new(),
            rr: 0,
            keys: HashMap::new(),
            key_order: VecDeque::new(),
            tickets: HashMap::new(),
            ticket_by_peer: HashMap::new(),
            ticket_order: VecDeque::new(),
            events: VecDeque::new(),
            next_tx: None,
            stats: LinkStats::default(),
            blocked: BlockList::new(MAX_BLOCKED),
            responder,
        }
    }

    /// Closes every session with `peer` and refuses its handshakes and resumptions until
    /// `until` (a neighbour caught forging). Its resumption tickets are forgotten.
    pub fn block_peer(&mut self, now: Instant, peer: PeerId, until: Instant) {
        self.blocked.block(now, peer, until);
        if let Some(t) = self.ticket_by_peer.remove(&peer) {
            self.tickets.remove(&t);
        }
        let addrs: Vec<LinkAddr> = self
            .peers
            .iter()
            .filter(|p| p.session.as_ref().is_some_and(|s| s.peer.peer_id() == peer))
            .map(|p| p.addr.clone())
            .collect();
        for a in addrs {
            self.close(now, &a);
        }
    }

    fn is_blocked(&self, now: Instant, peer: &PeerId) -> bool {
        self.blocked.is_blocked(now, peer)
    }

    /// This node's id.
    pub fn peer_id(&self) -> PeerId {
        self.me.peer_id()
    }

    /// The settings.
    pub fn config(&self) -> &LinkConfig {
        &self.cfg
    }

    /// Counters.
    pub fn stats(&self) -> LinkStats {
        let mut s = self.stats.clone();
        for p in &self.peers {
            if let Some(x) = &p.session {
                s.retransmits += x.arq.retransmits;
                s.replays += x.replays;
            }
        }
        s
    }

    /// Caches a public key so that handshakes with its owner run warm.
    pub fn add_known_key(&mut self, key: PublicIdentity) {
        let id = key.peer_id();
        if self.keys.insert(id, key).is_none() {
            self.key_order.push_back(id);
            while self.keys.len() > self.cfg.max_known_keys {
                match self.key_order.pop_front() {
                    Some(old) => {
                        self.keys.remove(&old);
                    }
                    None => break,
                }
            }
        }
    }

    /// Whether this node holds a resumption ticket for `peer`.
    pub fn has_ticket(&self, peer: &PeerId) -> bool {
        self.ticket_by_peer.contains_key(peer)
    }

    /// Forgets every resumption ticket (the next sessions run a full handshake).
    pub fn forget_tickets(&mut self) {
        self.tickets.clear();
        self.ticket_by_peer.clear();
        self.ticket_order.clear();
    }

    /// Whether this engine keeps a session to `addr` up (it dialled), rather than only
    /// answering it.
    pub fn wants(&self, addr: &LinkAddr) -> bool {
        self.peers.iter().any(|p| p.addr == *addr && p.want.is_some())
    }

    /// The peer of the authenticated session on `addr`.
    pub fn session_peer(&self, addr: &LinkAddr) -> Option<PeerId> {
        self.peers.iter().find(|p| p.addr == *addr)?.session.as_ref().filter(|s| s.confirmed).map(|s| s.peer.peer_id())
    }

    /// Authenticated peers and their addresses.
    pub fn sessions(&self) -> Vec<(LinkAddr, PeerId, Mode)> {
        self.peers
            .iter()
            .filter_map(|p| p.session.as_ref().filter(|s| s.confirmed).map(|s| (p.addr.clone(), s.peer.peer_id(), s.mode)))
            .collect()
    }

    /// The sending side's (generation, ratchet epoch) on `addr`.
    pub fn key_epoch(&self, addr: &LinkAddr) -> Option<(u8, u32)> {
        self.peers.iter().find(|p| p.addr == *addr)?.session.as_ref().map(Session::tx_epoch)
    }

    /// Peers (link addresses) with state.
    pub fn peer_count(&self) -> usize {
        self.peers.len()
    }

    /// Whether every session's queues are empty and everything sent is acknowledged.
    pub fn is_idle(&self) -> bool {
        self.peers.iter().all(|p| p.control.is_empty() && p.session.as_ref().is_none_or(|s| s.arq.is_idle()))
    }

    fn peer_index(&mut self, addr: &LinkAddr) -> Option<usize> {
        if let Some(i) = self.peers.iter().position(|p| p.addr == *addr) {
            return Some(i);
        }
        if self.peers.len() >= self.cfg.max_peers {
            // Make room by dropping a peer with neither a session nor a handshake.
            let idle = self.peers.iter().position(Peer::is_idle)?;
            self.peers.swap_remove(idle);
        }
        self.peers.push(Peer::new(addr.clone()));
        Some(self.peers.len() - 1)
    }

    fn handshakes_in_progress(&self) -> usize {
        self.peers.iter().filter(|p| p.hs.is_some()).count()
    }

    /// Keeps a session to `addr` up: starts a handshake now (resumption, warm or cold,
    /// whichever this node can) and again whenever the session ends. `expect` is the id
    /// the peer must prove, when known.
    pub fn connect(&mut self, now: Instant, addr: LinkAddr, expect: Option<PeerId>) -> Result<(), ConnectError> {
        if self.cfg.mtu < wire::MIN_MTU {
            return Err(ConnectError::MtuTooSmall { mtu: self.cfg.mtu });
        }
        // Dialling whatever a transport reports up (every accepted connection, on a
        // listener) must not let one source fill the peer table.
        let known = self.peers.iter().any(|p| p.addr == addr);
        let src = source_of(&addr);
        let from_source = self.peers.iter().filter(|p| !p.is_idle() && source_of(&p.addr) == src).count();
        if !known && from_source >= self.cfg.max_sessions_per_source {
            return Err(ConnectError::SourceLimit);
        }
        let i = self.peer_index(&addr).ok_or(ConnectError::TooManyPeers)?;
        self.peers[i].want = Some(expect);
        self.peers[i].failures = 0;
        if self.peers[i].session.is_none() && self.peers[i].hs.is_none() {
            self.start_handshake(now, i, false)?;
        }
        Ok(())
    }

    /// Stops keeping `addr` up and closes its session.
    pub fn close(&mut self, now: Instant, addr: &LinkAddr) {
        let Some(i) = self.peers.iter().position(|p| p.addr == *addr) else { return };
        let (room, limits) = (self.cfg.packet_room(), self.limits());
        let p = &mut self.peers[i];
        p.want = None;
        p.hs = None;
        if let Some(mut s) = p.session.take() {
            s.arq.close(0);
            if let Some(plain) = s.arq.poll_packet(now, room, false) {
                if let Ok(f) = s.seal(now, &limits, plain) {
                    p.control.push_back(f);
                }
            }
            self.events.push_back(LinkEvent::Disconnected { addr: addr.clone(), peer: s.peer.peer_id(), reason: DisconnectReason::Closed });
        }
    }

    /// Queues a message to `peer`.
    pub fn send(&mut self, peer: &PeerId, msg: Vec<u8>) -> Result<(), SendError> {
        let s = self
            .peers
            .iter_mut()
            .filter_map(|p| p.session.as_mut())
            .find(|s| s.peer.peer_id() == *peer)
            .ok_or(SendError::NoSession(*peer))?;
        s.arq.push(msg)?;
        Ok(())
    }

    fn limits(&self) -> KeyLimits {
        KeyLimits { ratchet_bytes: self.cfg.ratchet_bytes, ratchet_interval: self.cfg.ratchet_interval }
    }

    fn start_handshake(&mut self, now: Instant, i: usize, rekey: bool) -> Result<(), HandshakeError> {
        let tag = self.rng.u16();
        let p = &self.peers[i];
        let target = p.want.flatten().or(p.session.as_ref().map(|s| s.peer.peer_id())).or(p.last_peer);
        if !rekey && self.cfg.resumption {
            let fresh = |t: &&Ticket| now.saturating_duration_since(t.kem_at) < self.cfg.rekey_interval;
            if let Some(t) = target.and_then(|id| self.ticket_by_peer.get(&id)).and_then(|tid| self.tickets.get(tid)).filter(fresh) {
                let nonce = self.rng.bytes::<NONCE_LEN>();
                let mut head = vec![Kind::Resume.first_byte()];
                head.extend_from_slice(&tag.to_be_bytes());
                head.extend_from_slice(&t.id);
                head.extend_from_slice(&nonce);
                let mac = handshake::resume_mac(t, &head, &nonce);
                head.extend_from_slice(&mac);
                let hs = ResumeHs { tag, started: now, frame: head, nonce, ticket: t.id, peer: t.peer, due: Some(now), sent_at: None, rounds: 0 };
                self.peers[i].hs = Some(Hs::Resume(Box::new(hs)));
                return Ok(());
            }
        }
        let known = target.filter(|id| self.keys.contains_key(id));
        let st = handshake::start(&mut self.rng, &self.me, known.as_ref(), rekey);
        let out = Outgoing::new(Kind::Hello, tag, &st.hello, self.cfg.mtu)?;
        let hs = InitHs {
            tag,
            started: now,
            nonce: st.nonce,
            stage: InitStage::AwaitReply(st),
            out,
            rx: Reassembly::new(handshake::MAX_REPLY),
            nack_at: None,
            acked_at: None,
            rekey,
            mode: if known.is_some() { Mode::Warm } else { Mode::Cold },
            expect: self.peers[i].want.flatten(),
        };
        self.peers[i].hs = Some(Hs::Init(Box::new(hs)));
        Ok(())
    }

    /// Processes one frame from `from`.
    pub fn handle_frame(&mut self, now: Instant, from: &LinkAddr, frame: &[u8]) -> Result<(), FrameError> {
        self.stats.frames_in += 1;
        self.stats.bytes_in += frame.len() as u64;
        let r = self.dispatch(now, from, frame);
        if r.is_err() {
            self.stats.dropped += 1;
        }
        r
    }

    fn dispatch(&mut self, now: Instant, from: &LinkAddr, frame: &[u8]) -> Result<(), FrameError> {
        let f = Frame::decode(frame)?;
        if let Frame::Data { header, key_id, pn, sealed } = f {
            let i = self.peers.iter().position(|p| p.addr == *from).ok_or(FrameError::NoSession)?;
            return self.on_data(now, i, header, key_id, pn, sealed);
        }
        let i = self.peer_index(from).ok_or(FrameError::TooManyPeers)?;
        match f {
            Frame::Fragment { kind: Kind::Hello, tag, index, last, bytes } => self.on_hello(now, i, tag, index, last, bytes),
            Frame::Fragment { kind: Kind::Reply, tag, index, last, bytes } => self.on_reply(now, i, tag, index, last, bytes),
            Frame::Fragment { tag, index, last, bytes, .. } => self.on_finish(now, i, tag, index, last, bytes),
            Frame::HsAck { tag, msg, last, have } => self.on_hs_ack(now, i, tag, msg, last, have),
            Frame::Resume { tag, ticket, nonce, mac } => self.on_resume(now, i, frame, tag, ticket, nonce, mac),
            Frame::ResumeOk { tag, nonce: _, mac } => self.on_resume_ok(now, i, frame, tag, mac),
            Frame::Reject { tag, reason } => self.on_reject(now, i, tag, RejectReason::from_u8(reason)),
            Frame::Cookie { echo: false, tag, cookie } => self.on_cookie(i, tag, cookie),
            Frame::Cookie { echo: true, tag, cookie } => self.on_cookie_echo(now, i, tag, cookie),
            Frame::Data { .. } => Ok(()),
        }
    }

    /// Stores a fragment of handshake message `msg`; returns the message once complete.
    /// The fragment with the last index, arriving before the rest, draws an HsAck of what
    /// is missing.
    #[allow(clippy::too_many_arguments)]
    fn take_fragment(
        rx: &mut Reassembly,
        control: &mut VecDeque<Vec<u8>>,
        now: Instant,
        tag: u16,
        msg: u8,
        index: u8,
        last: u8,
        bytes: &[u8],
    ) -> Result<Option<Vec<u8>>, FrameError> {
        rx.insert(now, index, last, bytes)?;
        let whole = rx.assemble();
        if whole.is_none() && index == last {
            if let Some((l, have)) = rx.have() {
                control.push_back(Self::hs_ack_frame(tag, msg, l, &have));
            }
        }
        Ok(whole)
    }

    fn hs_ack_frame(tag: u16, msg: u8, last: u8, have: &[u8]) -> Vec<u8> {
        Frame::HsAck { tag, msg, last, have }.encode()
    }

    fn full_ack(tag: u16, msg: u8, last: u8) -> Vec<u8> {
        let mut have = vec![0u8; wire::bitmap_len(last)];
        for i in 0..=usize::from(last) {
            have[i / 8] |= 1 << (i % 8);
        }
        Self::hs_ack_frame(tag, msg, last, &have)
    }

    fn on_hello(&mut self, now: Instant, i: usize, tag: u16, index: u8, last: u8, bytes: &[u8]) -> Result<(), FrameError> {
        let p = &mut self.peers[i];
        match &p.hs {
            Some(Hs::Resp(h)) if h.tag == tag && h.hello_last == last => {
                // Our Reply has not reached the initiator yet; tell it Hello arrived.
                p.control.push_back(Self::full_ack(tag, 1, last));
                return Ok(());
            }
            Some(Hs::Resp(h)) if h.tag == tag => return Err(FrameError::Ignored(Kind::Hello)),
            Some(Hs::Init(h)) if h.tag == tag => return Err(FrameError::Ignored(Kind::Hello)),
            _ => {}
        }
        if matches!(&p.completed, Some(Completed::Full { tag: t, .. }) if *t == tag) {
            return Err(FrameError::Ignored(Kind::Hello));
        }
        if let Some(h) = p.held_hello.as_ref().filter(|h| h.tag == tag) {
            // The initiator has not seen our Cookie (or its echo was lost): again.
            p.control.push_back(Frame::Cookie { echo: false, tag, cookie: &h.cookie }.encode());
            return Ok(());
        }
        if p.hello_rx.as_ref().is_none_or(|h| h.tag != tag) {
            p.hello_rx = Some(HelloRx { tag, rx: Reassembly::new(handshake::MAX_HELLO), nack_at: None, nacks: 0 });
        }
        let Some(HelloRx { rx, .. }) = p.hello_rx.as_mut() else { return Ok(()) };
        let Some(hello) = Self::take_fragment(rx, &mut p.control, now, tag, 1, index, last, bytes)? else { return Ok(()) };
        p.hello_rx = None;
        // Simultaneous open: the initiation with the larger nonce wins.
        let theirs = hello.get(1..1 + NONCE_LEN).unwrap_or_default();
        if Self::my_initiation_nonce(p).is_some_and(|mine| mine.as_slice() > theirs) {
            return Err(FrameError::Ignored(Kind::Hello));
        }
        if let Some(Hs::Init(mine)) = &p.hs {
            if matches!(mine.stage, InitStage::AwaitConfirm) {
                // The peer answered our Hello and now starts its own: it dropped our attempt
                // (timeout, restart). Abandon ours before answering.
                if mine.rekey {
                    let grace = self.cfg.arq().max_rto + self.cfg.handshake_timeout;
                    if let Some(s) = p.session.as_mut() {
                        s.abandon_rekey(now, grace);
                    }
                } else {
                    p.session = None;
                }
                p.hs = None;
            }
        }
        let claimed = handshake::Hello::decode(&hello).map(|h| h.peer).ok();
        if let Some(c) = claimed.filter(|c| self.is_blocked(now, c)) {
            self.peers[i].control.push_back(Frame::Reject { tag, reason: RejectReason::Refused as u8 }.encode());
            return Err(FrameError::Blocked(c));
        }
        // A rekey of the session on this address: its peer proved itself already.
        let session_peer = self.peers[i].session.as_ref().filter(|s| s.confirmed).map(|s| s.peer.peer_id());
        let proven = session_peer.is_some() && session_peer == claimed;
        self.answer_hello(now, i, tag, last, hello, proven)
    }

    /// Answers a whole Hello: signs a Reply, or asks for an address proof first, or
    /// refuses. `proven`: the initiator echoed our cookie, or holds the session on this
    /// address.
    fn answer_hello(&mut self, now: Instant, i: usize, tag: u16, last: u8, hello: Vec<u8>, proven: bool) -> Result<(), FrameError> {
        let refuse = |this: &mut Self, e: FrameError| {
            this.peers[i].control.push_back(Frame::Reject { tag, reason: RejectReason::Busy as u8 }.encode());
            Err(e)
        };
        if self.peers[i].hs.is_none() {
            if self.handshakes_in_progress() >= self.cfg.max_handshakes {
                return refuse(self, FrameError::Busy);
            }
            let (handshakes, sessions) = self.source_load(&self.peers[i].addr);
            let new_session = self.peers[i].session.is_none();
            if handshakes >= self.cfg.max_handshakes_per_source || (new_session && sessions >= self.cfg.max_sessions_per_source) {
                return refuse(self, FrameError::SourceLimit);
            }
        }
        if proven {
            // Counted, but never refused for the allowance: proven initiators are whom it
            // is kept for.
            let _ = self.responder.allow(now);
        } else {
            let under_load = 2 * self.handshakes_in_progress() >= self.cfg.max_handshakes || !self.responder.would_allow(now, 1.0);
            let cookie = match self.cfg.cookie {
                CookieMode::Always => true,
                CookieMode::UnderLoad => under_load,
                CookieMode::Never => false,
            };
            if cookie {
                let cookie = self.rng.bytes::<{ wire::COOKIE_LEN }>();
                let p = &mut self.peers[i];
                p.control.push_back(Frame::Cookie { echo: false, tag, cookie: &cookie }.encode());
                p.held_hello = Some(HeldHello { tag, last, hello, cookie, at: now });
                self.stats.cookies_sent += 1;
                return Ok(());
            }
            if !self.responder.allow(now) {
                return refuse(self, FrameError::Busy);
            }
        }
        let keep = self.peers[i].session.as_ref().is_some_and(|s| s.confirmed);
        let session_peer = self.peers[i].session.as_ref().map(|s| s.peer.peer_id());
        // Rekeying only continues a session with the same peer.
        let claimed = handshake::Hello::decode(&hello).map(|h| h.peer).ok();
        let keep = keep && claimed.is_some() && claimed == session_peer;
        let keys = &self.keys;
        let wait = handshake::respond(&mut self.rng, &self.me, &hello, |id| keys.get(id).cloned(), keep);
        let wait = match wait {
            Ok(w) => w,
            Err(e) => return Err(self.fail(now, i, e)),
        };
        self.stats.hellos_answered += 1;
        let mode = if wait.reply.first().is_some_and(|f| f & (handshake::HAS_KEY | handshake::SEND_KEY) != 0) {
            Mode::Cold
        } else {
            Mode::Warm
        };
        let out = Outgoing::new(Kind::Reply, tag, &wait.reply, self.cfg.mtu).map_err(|e| self.fail(now, i, e.into()))?;
        let max_finish = handshake::MAX_FINISH;
        self.peers[i].hs = Some(Hs::Resp(Box::new(RespHs {
            tag,
            hello_last: last,
            started: now,
            wait,
            out,
            rx: Reassembly::new(max_finish),
            nack_at: None,
            mode,
        })));
        Ok(())
    }

    /// Handshakes in progress and sessions (or handshakes) with peers at `addr`'s source.
    fn source_load(&self, addr: &LinkAddr) -> (usize, usize) {
        let src = source_of(addr);
        self.peers.iter().filter(|p| source_of(&p.addr) == src).fold((0, 0), |(h, s), p| {
            (h + usize::from(p.hs.is_some()), s + usize::from(p.session.is_some() || p.hs.is_some()))
        })
    }

    /// The responder asks for an address proof: echo it, if the attempt is ours.
    fn on_cookie(&mut self, i: usize, tag: u16, cookie: &[u8; wire::COOKIE_LEN]) -> Result<(), FrameError> {
        let p = &mut self.peers[i];
        match &p.hs {
            Some(Hs::Init(h)) if h.tag == tag && matches!(h.stage, InitStage::AwaitReply(_)) => {
                p.control.push_back(Frame::Cookie { echo: true, tag, cookie }.encode());
                Ok(())
            }
            _ => Err(FrameError::UnknownAttempt(tag)),
        }
    }

    /// The initiator echoed our cookie: it receives at its address; answer its Hello.
    fn on_cookie_echo(&mut self, now: Instant, i: usize, tag: u16, cookie: &[u8; wire::COOKIE_LEN]) -> Result<(), FrameError> {
        let p = &mut self.peers[i];
        let held = match p.held_hello.take() {
            Some(h) if h.tag == tag => h,
            other => {
                p.held_hello = other;
                return Err(FrameError::UnknownAttempt(tag));
            }
        };
        if !same_bytes(&held.cookie, cookie) {
            p.held_hello = Some(held);
            return Err(FrameError::BadCookie);
        }
        self.answer_hello(now, i, tag, held.last, held.hello, true)
    }

    /// The nonce of this node's own initiation to `p` that the peer has not answered yet
    /// (a Hello awaiting its Reply, or a Resume), for the simultaneous-open tie-break.
    fn my_initiation_nonce(p: &Peer) -> Option<[u8; NONCE_LEN]> {
        match &p.hs {
            Some(Hs::Init(h)) if matches!(h.stage, InitStage::AwaitReply(_)) => Some(h.nonce),
            Some(Hs::Resume(h)) => Some(h.nonce),
            _ => None,
        }
    }

    /// Records a failed handshake and returns the error for the caller to propagate.
    fn fail(&mut self, now: Instant, i: usize, e: HandshakeError) -> FrameError {
        self.stats.handshakes_failed += 1;
        let delay = self.retry_delay(self.peers[i].failures + 1);
        let grace = self.grace();
        let p = &mut self.peers[i];
        if let Some(Hs::Init(h)) = &p.hs {
            if matches!(h.stage, InitStage::AwaitConfirm) {
                if h.rekey {
                    // The running generation stays; only the new one is abandoned.
                    if let Some(s) = p.session.as_mut() {
                        s.abandon_rekey(now, grace);
                    }
                } else {
                    p.session = None;
                }
            }
        }
        p.hs = None;
        p.failures += 1;
        // The next attempt (a redial, or the next rekey of a running session) backs off.
        if p.want.is_some() || p.session.is_some() {
            p.retry_at = Some(now + delay);
        }
        self.events.push_back(LinkEvent::HandshakeFailed { addr: p.addr.clone(), error: e.clone() });
        FrameError::Handshake(e)
    }

    /// When to try again after `failures` failed attempts: the handshake retransmission
    /// timeout doubled per failure, at most the handshake timeout.
    fn retry_delay(&self, failures: u32) -> Duration {
        self.cfg.hs_rto(failures.saturating_sub(1)).min(self.cfg.handshake_timeout)
    }

    fn on_reply(&mut self, now: Instant, i: usize, tag: u16, index: u8, last: u8, bytes: &[u8]) -> Result<(), FrameError> {
        let p = &mut self.peers[i];
        let Some(Hs::Init(h)) = p.hs.as_mut() else { return Err(FrameError::UnknownAttempt(tag)) };
        if h.tag != tag {
            return Err(FrameError::UnknownAttempt(tag));
        }
        if !matches!(h.stage, InitStage::AwaitReply(_)) {
            return Err(FrameError::Ignored(Kind::Reply));
        }
        h.out.ack_all();
        let Some(reply) = Self::take_fragment(&mut h.rx, &mut p.control, now, tag, 2, index, last, bytes)? else { return Ok(()) };
        let Some(Hs::Init(mut h)) = p.hs.take() else { return Ok(()) };
        let InitStage::AwaitReply(st) = std::mem::replace(&mut h.stage, InitStage::AwaitConfirm) else { return Ok(()) };
        let expect = h.expect;
        // The same id start_handshake hinted at.
        let cached = expect.or(p.session.as_ref().map(|s| s.peer.peer_id())).or(p.last_peer).and_then(|id| self.keys.get(&id)).cloned();
        let can_continue = h.rekey && p.session.as_ref().is_some_and(|s| s.confirmed);
        let done = match handshake::finish(&self.me, st, &reply, cached.as_ref(), expect.as_ref(), can_continue) {
            Ok(d) => d,
            Err(e) => return Err(self.fail(now, i, e)),
        };
        let out = match Outgoing::new(Kind::Finish, tag, &done.finish, self.cfg.mtu) {
            Ok(o) => o,
            Err(e) => return Err(self.fail(now, i, e.into())),
        };
        h.out = out;
        // Cold when any public key travels: the responder's, or ours because it asked.
        if reply.first().is_some_and(|f| f & (handshake::HAS_KEY | handshake::SEND_KEY) != 0) {
            h.mode = Mode::Cold;
        }
        let peer = done.peer.clone();
        self.add_known_key(done.peer);
        self.store_ticket(peer.peer_id(), &done.secrets, now);
        let grace = self.grace();
        let p = &mut self.peers[i];
        let continues = done.continues && p.session.as_ref().is_some_and(|s| s.peer.peer_id() == peer.peer_id());
        let SessionSecrets { i2r, r2i, .. } = done.secrets;
        if continues {
            if let Some(s) = p.session.as_mut() {
                s.rekey(i2r, r2i, now, grace, false);
            }
        } else {
            if let Some(old) = p.session.take().filter(|o| o.confirmed) {
                self.events.push_back(LinkEvent::Disconnected { addr: p.addr.clone(), peer: old.peer.peer_id(), reason: DisconnectReason::Replaced });
            }
            p.session = Some(Session::new(peer, true, h.mode, Arq::new(self.cfg.arq()), i2r, r2i, false, now));
        }
        p.hs = Some(Hs::Init(h));
        Ok(())
    }

    /// How long the previous generation's receive keys stay after a rekey: frames sealed
    /// under them may still be in flight, and an abandoned rekey falls back to them.
    fn grace(&self) -> Duration {
        self.cfg.arq().max_rto + self.cfg.handshake_timeout
    }

    fn store_ticket(&mut self, peer: PeerId, s: &SessionSecrets, kem_at: Instant) {
        if let Some(old) = self.ticket_by_peer.remove(&peer) {
            self.tickets.remove(&old);
        }
        let mut secret = zeroize::Zeroizing::new([0u8; 32]);
        secret.copy_from_slice(&s.resume[..]);
        self.tickets.insert(s.ticket, Ticket { id: s.ticket, secret, peer, kem_at });
        self.ticket_by_peer.insert(peer, s.ticket);
        self.ticket_order.push_back(s.ticket);
        while self.tickets.len() > self.cfg.max_tickets {
            let Some(old) = self.ticket_order.pop_front() else { break };
            if let Some(t) = self.tickets.remove(&old) {
                if self.ticket_by_peer.get(&t.peer) == Some(&old) {
                    self.ticket_by_peer.remove(&t.peer);
                }
            }
        }
        self.ticket_order.retain(|t| self.tickets.contains_key(t));
    }

    fn take_ticket(&mut self, id: &[u8; TICKET_ID_LEN]) -> Option<Ticket> {
        let t = self.tickets.remove(id)?;
        if self.ticket_by_peer.get(&t.peer) == Some(id) {
            self.ticket_by_peer.remove(&t.peer);
        }
        Some(t)
    }

    fn on_finish(&mut self, now: Instant, i: usize, tag: u16, index: u8, last: u8, bytes: &[u8]) -> Result<(), FrameError> {
        let p = &mut self.peers[i];
        if matches!(&p.completed, Some(Completed::Full { tag: t, last: l }) if *t == tag && *l == last) {
            // Our acknowledgement was lost; the initiator is probing. Answer only while the
            // session it would confirm still exists, and with an authenticated ping too.
            let Some(s) = p.session.as_mut() else { return Err(FrameError::Ignored(Kind::Finish)) };
            s.arq.ping();
            p.control.push_back(Self::full_ack(tag, 3, last));
            return Ok(());
        }
        let Some(Hs::Resp(h)) = p.hs.as_mut() else { return Err(FrameError::UnknownAttempt(tag)) };
        if h.tag != tag {
            return Err(FrameError::UnknownAttempt(tag));
        }
        h.out.ack_all();
        let Some(finish) = Self::take_fragment(&mut h.rx, &mut p.control, now, tag, 3, index, last, bytes)? else { return Ok(()) };
        let Some(Hs::Resp(h)) = p.hs.take() else { return Ok(()) };
        let handshake::ResponderDone { peer, secrets, continues } = match handshake::accept(&h.wait, &finish) {
            Ok(x) => x,
            Err(e) => return Err(self.fail(now, i, e)),
        };
        let id = peer.peer_id();
        self.add_known_key(peer.clone());
        self.store_ticket(id, &secrets, now);
        let grace = self.grace();
        let arq_cfg = self.cfg.arq();
        let p = &mut self.peers[i];
        p.control.push_back(Self::full_ack(tag, 3, last));
        p.completed = Some(Completed::Full { tag, last });
        p.last_peer = Some(id);
        p.failures = 0;
        let SessionSecrets { i2r, r2i, .. } = secrets;
        let continues = continues && p.session.as_ref().is_some_and(|s| s.peer.peer_id() == id);
        if continues {
            if let Some(s) = p.session.as_mut() {
                s.rekey(r2i, i2r, now, grace, true);
                s.arq.ping();
            }
            self.stats.rekeys += 1;
            self.events.push_back(LinkEvent::Rekeyed { addr: p.addr.clone(), peer: id });
        } else {
            if let Some(old) = p.session.take().filter(|o| o.confirmed) {
                self.events.push_back(LinkEvent::Disconnected { addr: p.addr.clone(), peer: old.peer.peer_id(), reason: DisconnectReason::Replaced });
            }
            let mut session = Session::new(peer, false, h.mode, Arq::new(arq_cfg), r2i, i2r, true, now);
            // An authenticated frame confirms the handshake to the initiator even if the
            // acknowledgement of Finish is lost.
            session.arq.ping();
            p.session = Some(session);
            Self::count_mode(&mut self.stats, h.mode);
            self.events.push_back(LinkEvent::Connected { addr: p.addr.clone(), peer: id, mode: h.mode, initiator: false });
        }
        Ok(())
    }

    fn count_mode(stats: &mut LinkStats, mode: Mode) {
        match mode {
            Mode::Cold => stats.cold += 1,
            Mode::Warm => stats.warm += 1,
            Mode::Resumed => stats.resumed += 1,
        }
    }

    /// The initiator's handshake is confirmed: by the responder's acknowledgement of
    /// Finish, or by an authenticated frame under the new keys.
    fn confirm(&mut self, now: Instant, i: usize) {
        let p = &mut self.peers[i];
        let Some(Hs::Init(h)) = &p.hs else { return };
        if !matches!(h.stage, InitStage::AwaitConfirm) {
            return;
        }
        let (rekey, mode) = (h.rekey, h.mode);
        p.hs = None;
        p.failures = 0;
        let Some(s) = p.session.as_mut() else {
            // The session died while waiting (dead_after); dial again.
            if p.want.is_some() {
                p.retry_at = Some(now);
            }
            return;
        };
        let id = s.peer.peer_id();
        p.last_peer = Some(id);
        if rekey && s.rekey_pending() {
            s.confirm_rekey();
            self.stats.rekeys += 1;
            self.events.push_back(LinkEvent::Rekeyed { addr: p.addr.clone(), peer: id });
        } else {
            s.confirmed = true;
            // Liveness counts from here: Finish may have taken minutes on a slow link.
            s.last_rx = now;
            Self::count_mode(&mut self.stats, mode);
            self.events.push_back(LinkEvent::Connected { addr: p.addr.clone(), peer: id, mode, initiator: true });
        }
    }

    fn on_hs_ack(&mut self, now: Instant, i: usize, tag: u16, msg: u8, last: u8, have: &[u8]) -> Result<(), FrameError> {
        let p = &mut self.peers[i];
        match (p.hs.as_mut(), msg) {
            (Some(Hs::Init(h)), 1) if h.tag == tag && matches!(h.stage, InitStage::AwaitReply(_)) => {
                h.out.on_ack(last, have);
                Ok(())
            }
            (Some(Hs::Resp(h)), 2) if h.tag == tag => {
                h.out.on_ack(last, have);
                Ok(())
            }
            (Some(Hs::Init(h)), 3) if h.tag == tag && matches!(h.stage, InitStage::AwaitConfirm) => {
                // Unauthenticated, so it only stops Finish; what confirms is an authenticated
                // frame under the new keys (the responder's ping, or the answer to ours).
                if h.out.on_ack(last, have) && h.acked_at.is_none() {
                    h.acked_at = Some(now);
                }
                Ok(())
            }
            _ => Err(FrameError::UnknownAttempt(tag)),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn on_resume(
        &mut self,
        now: Instant,
        i: usize,
        frame: &[u8],
        tag: u16,
        ticket: &[u8; TICKET_ID_LEN],
        nonce: &[u8; NONCE_LEN],
        mac: &[u8; TAG_LEN],
    ) -> Result<(), FrameError> {
        if let Some(Completed::Resume { request, answer }) = &self.peers[i].completed {
            if request == frame {
                let a = answer.clone();
                self.peers[i].control.push_back(a);
                return Ok(());
            }
        }
        if Self::my_initiation_nonce(&self.peers[i]).is_some_and(|mine| mine.as_slice() > nonce.as_slice()) {
            return Err(FrameError::Ignored(Kind::Resume));
        }
        let fresh = |t: &&Ticket| now.saturating_duration_since(t.kem_at) < self.cfg.rekey_interval;
        let Some(t) = self.tickets.get(ticket).filter(fresh) else {
            self.peers[i].control.push_back(Frame::Reject { tag, reason: RejectReason::UnknownTicket as u8 }.encode());
            return Err(FrameError::UnknownTicket);
        };
        let r_nonce = self.rng.bytes::<NONCE_LEN>();
        let mut ok_head = vec![Kind::ResumeOk.first_byte()];
        ok_head.extend_from_slice(&tag.to_be_bytes());
        ok_head.extend_from_slice(&r_nonce);
        let (ok_mac, secrets) = handshake::resume_accept(t, frame, nonce, mac, &ok_head)?;
        let Some(t) = self.take_ticket(ticket) else { return Ok(()) };
        let kem_at = t.kem_at;
        let Some(peer) = self.keys.get(&t.peer).cloned() else {
            // Tickets are only filed for peers whose key is cached; the key was evicted.
            self.peers[i].control.push_back(Frame::Reject { tag, reason: RejectReason::UnknownTicket as u8 }.encode());
            return Err(FrameError::UnknownTicket);
        };
        self.store_ticket(t.peer, &secrets, kem_at);
        let mut answer = ok_head;
        answer.extend_from_slice(&ok_mac);
        let arq_cfg = self.cfg.arq();
        let p = &mut self.peers[i];
        p.control.push_back(answer.clone());
        p.completed = Some(Completed::Resume { request: frame.to_vec(), answer });
        p.last_peer = Some(t.peer);
        p.hs = None;
        if let Some(old) = p.session.take().filter(|o| o.confirmed) {
            self.events.push_back(LinkEvent::Disconnected { addr: p.addr.clone(), peer: old.peer.peer_id(), reason: DisconnectReason::Replaced });
        }
        let SessionSecrets { i2r, r2i, .. } = secrets;
        let mut session = Session::new(peer, false, Mode::Resumed, Arq::new(arq_cfg), r2i, i2r, true, now);
        session.keys_since = kem_at;
        p.session = Some(session);
        Self::count_mode(&mut self.stats, Mode::Resumed);
        self.events.push_back(LinkEvent::Connected { addr: p.addr.clone(), peer: t.peer, mode: Mode::Resumed, initiator: false });
        Ok(())
    }

    fn on_resume_ok(&mut self, now: Instant, i: usize, frame: &[u8], tag: u16, mac: &[u8; TAG_LEN]) -> Result<(), FrameError> {
        let p = &self.peers[i];
        let Some(Hs::Resume(h)) = &p.hs else { return Err(FrameError::UnknownAttempt(tag)) };
        if h.tag != tag {
            return Err(FrameError::UnknownAttempt(tag));
        }
        let Some(t) = self.tickets.get(&h.ticket) else { return Err(FrameError::UnknownTicket) };
        let ok_head = frame.get(..frame.len() - TAG_LEN).unwrap_or_default();
        let secrets = match handshake::resume_complete(t, &h.frame, &h.nonce, ok_head, mac) {
            Ok(s) => s,
            Err(e) => return Err(FrameError::Handshake(e)),
        };
        let peer_id = h.peer;
        let ticket = h.ticket;
        let kem_at = t.kem_at;
        let Some(peer) = self.keys.get(&peer_id).cloned() else { return Err(FrameError::UnknownTicket) };
        self.take_ticket(&ticket);
        self.store_ticket(peer_id, &secrets, kem_at);
        let arq_cfg = self.cfg.arq();
        let p = &mut self.peers[i];
        p.hs = None;
        p.failures = 0;
        p.last_peer = Some(peer_id);
        if let Some(old) = p.session.take().filter(|o| o.confirmed) {
            self.events.push_back(LinkEvent::Disconnected { addr: p.addr.clone(), peer: old.peer.peer_id(), reason: DisconnectReason::Replaced });
        }
        let SessionSecrets { i2r, r2i, .. } = secrets;
        let mut session = Session::new(peer, true, Mode::Resumed, Arq::new(arq_cfg), i2r, r2i, true, now);
        session.keys_since = kem_at;
        p.session = Some(session);
        Self::count_mode(&mut self.stats, Mode::Resumed);
        self.events.push_back(LinkEvent::Connected { addr: p.addr.clone(), peer: peer_id, mode: Mode::Resumed, initiator: true });
        Ok(())
    }

    fn on_reject(&mut self, now: Instant, i: usize, tag: u16, reason: RejectReason) -> Result<(), FrameError> {
        let p = &mut self.peers[i];
        let ours = match &p.hs {
            Some(Hs::Resume(h)) => h.tag == tag,
            Some(Hs::Init(h)) => h.tag == tag,
            _ => false,
        };
        if !ours {
            return Err(FrameError::UnknownAttempt(tag));
        }
        if let (Some(Hs::Resume(h)), RejectReason::UnknownTicket) = (&p.hs, reason) {
            // The peer lost the ticket (restart, eviction): fall back to a full handshake.
            let ticket = h.ticket;
            p.hs = None;
            self.take_ticket(&ticket);
            self.start_handshake(now, i, false).map_err(|e| self.fail(now, i, e))?;
            return Ok(());
        }
        Err(self.fail(now, i, HandshakeError::Rejected(reason)))
    }

    fn on_data(&mut self, now: Instant, i: usize, header: &[u8; DATA_HEADER_LEN], key_id: u8, pn: u32, sealed: &[u8]) -> Result<(), FrameError> {
        let (room, limits) = (self.cfg.packet_room(), self.limits());
        let p = &mut self.peers[i];
        let Some(s) = p.session.as_mut() else { return Err(FrameError::NoSession) };
        let (plain, newest) = s.open(now, key_id, pn, header, sealed)?;
        let id = s.peer.peer_id();
        let got = match s.arq.on_packet(now, &plain) {
            Ok(g) => g,
            Err(e) => {
                s.arq.close(1);
                if let Some(plain) = s.arq.poll_packet(now, room, false) {
                    if let Ok(f) = s.seal(now, &limits, plain) {
                        p.control.push_back(f);
                    }
                }
                self.end_session(now, i, DisconnectReason::Protocol(e));
                return Err(FrameError::Arq(e));
            }
        };
        while let Some(data) = s.arq.next_message() {
            self.events.push_back(LinkEvent::Message { addr: p.addr.clone(), peer: id, data });
        }
        let awaiting = matches!(&p.hs, Some(Hs::Init(h)) if matches!(h.stage, InitStage::AwaitConfirm));
        if awaiting && newest {
            self.confirm(now, i);
        }
        if got.close.is_some() {
            self.end_session(now, i, DisconnectReason::ClosedByPeer);
        }
        Ok(())
    }

    fn end_session(&mut self, now: Instant, i: usize, reason: DisconnectReason) {
        let p = &mut self.peers[i];
        if matches!(&p.hs, Some(Hs::Init(h)) if h.rekey || matches!(h.stage, InitStage::AwaitConfirm)) {
            // Either the unconfirmed session of that handshake is what ends here, or the
            // session a rekey was for.
            p.hs = None;
        }
        if let Some(s) = p.session.take() {
            p.last_peer = Some(s.peer.peer_id());
            if s.confirmed {
                self.events.push_back(LinkEvent::Disconnected { addr: p.addr.clone(), peer: s.peer.peer_id(), reason });
            }
        }
        if p.want.is_some() && p.hs.is_none() {
            p.retry_at = Some(now);
        }
    }

    /// Fires whatever timers are due at `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        for i in 0..self.peers.len() {
            self.peer_timers(now, i);
        }
    }

    fn nack_due(&self, rx: &Reassembly, nack_at: Option<Instant>, now: Instant) -> bool {
        let since = match (rx.last_progress, nack_at) {
            (Some(a), Some(b)) => a.max(b),
            (Some(a), None) => a,
            (None, b) => match b {
                Some(b) => b,
                None => return false,
            },
        };
        rx.started() && !rx.complete() && since + self.cfg.nack_delay() <= now
    }

    fn peer_timers(&mut self, now: Instant, i: usize) {
        if let Some(hs) = &self.peers[i].hs {
            if hs.started() + self.cfg.handshake_timeout <= now {
                let _ = self.fail(now, i, HandshakeError::Timeout);
            }
        }
        let cfg = self.cfg.clone();
        let delay = self.retry_delay(self.peers[i].failures.max(1));
        let nack_hello = self.peers[i].hello_rx.as_ref().is_some_and(|h| h.nacks < MAX_HELLO_NACKS && self.nack_due(&h.rx, h.nack_at, now));
        let nack_hs = match &self.peers[i].hs {
            Some(Hs::Init(h)) => self.nack_due(&h.rx, h.nack_at, now),
            Some(Hs::Resp(h)) => self.nack_due(&h.rx, h.nack_at, now),
            _ => false,
        };
        let p = &mut self.peers[i];
        // A partial Hello nobody completes (the peer gave the attempt up, or lost a
        // simultaneous open) is forgotten after the handshake timeout, and once a session
        // is up.
        let stale = p.hello_rx.as_ref().is_some_and(|h| h.rx.last_progress.is_some_and(|t| t + cfg.handshake_timeout <= now));
        if stale {
            p.hello_rx = None;
        }
        if p.held_hello.as_ref().is_some_and(|h| h.at + cfg.handshake_timeout <= now) {
            p.held_hello = None;
        }
        if nack_hello {
            if let Some(h) = p.hello_rx.as_mut() {
                // A few reports of what is missing; an initiator that is still there probes
                // on its own, one that gave up needs no more.
                if h.nacks < MAX_HELLO_NACKS {
                    if let Some((l, have)) = h.rx.have() {
                        p.control.push_back(Self::hs_ack_frame(h.tag, 1, l, &have));
                    }
                    h.nacks += 1;
                }
                h.nack_at = Some(now);
            }
        }
        match p.hs.as_mut() {
            Some(Hs::Init(h)) => {
                if !h.out.all_acked() && !h.out.has_queued() && h.out.last_sent.is_some_and(|t| t + cfg.hs_rto(h.out.rounds) <= now) {
                    h.out.queue_probe();
                }
                if let (Some(at), Some(s)) = (h.acked_at, p.session.as_mut()) {
                    // Finish arrived but no authenticated frame came back: ask for one.
                    if at + s.arq.rto() <= now && now.saturating_duration_since(s.last_tx) >= s.arq.rto() {
                        s.arq.ping();
                    }
                }
                if nack_hs {
                    if let Some((l, have)) = h.rx.have() {
                        p.control.push_back(Self::hs_ack_frame(h.tag, 2, l, &have));
                    }
                    h.nack_at = Some(now);
                }
            }
            Some(Hs::Resp(h)) => {
                if !h.out.all_acked() && !h.out.has_queued() && h.out.last_sent.is_some_and(|t| t + cfg.hs_rto(h.out.rounds) <= now) {
                    h.out.queue_probe();
                }
                if nack_hs {
                    if let Some((l, have)) = h.rx.have() {
                        p.control.push_back(Self::hs_ack_frame(h.tag, 3, l, &have));
                    }
                    h.nack_at = Some(now);
                }
            }
            Some(Hs::Resume(h)) if h.due.is_none() && h.sent_at.is_some_and(|t| t + cfg.hs_rto(h.rounds) <= now) => {
                h.due = Some(now);
                h.rounds += 1;
            }
            Some(Hs::Resume(_)) => {}
            None => {}
        }
        if p.want.is_some() && p.session.is_none() && p.hs.is_none() && p.retry_at.is_none() && !p.link_down {
            p.retry_at = Some(now + delay);
        }
        if p.want.is_some() && p.session.is_none() && p.hs.is_none() && !p.link_down && p.retry_at.is_some_and(|t| t <= now) {
            p.retry_at = None;
            if let Err(e) = self.start_handshake(now, i, false) {
                let _ = self.fail(now, i, e);
            }
        }
        let p = &mut self.peers[i];
        let Some(s) = p.session.as_mut() else { return };
        s.arq.on_timeout(now);
        // An unconfirmed session belongs to a handshake still in progress: its timeout rules.
        if s.confirmed && now.saturating_duration_since(s.last_rx) >= cfg.dead_after {
            self.end_session(now, i, DisconnectReason::Timeout);
            return;
        }
        if !s.confirmed {
            return;
        }
        // Keepalive after `keepalive` of silence; once nothing has come back for that long,
        // probe every retransmission timeout so that a lossy link is not declared dead on
        // a few unlucky pings.
        let quiet_rx = now.saturating_duration_since(s.last_rx) >= cfg.keepalive;
        if now.saturating_duration_since(s.last_tx) >= cfg.keepalive
            || (quiet_rx && now.saturating_duration_since(s.last_tx) >= s.arq.rto())
        {
            s.arq.ping();
        }
        let age = now.saturating_duration_since(s.keys_since);
        if age >= cfg.rekey_interval * 3 {
            self.end_session(now, i, DisconnectReason::KeysExpired);
            return;
        }
        let due = if s.initiator {
            age >= cfg.rekey_interval || s.gen_bytes >= cfg.rekey_bytes
        } else {
            // The responder rekeys too if the initiator does not (it may be an older node
            // or have lost the race to a flood of its own traffic).
            age >= cfg.rekey_interval * 3 / 2 || s.gen_bytes >= cfg.rekey_bytes.saturating_add(cfg.rekey_bytes / 2)
        };
        let can = p.hs.is_none() && p.retry_at.is_none_or(|t| t <= now);
        if due && can {
            if let Err(e) = self.start_handshake(now, i, true) {
                let _ = self.fail(now, i, e);
            }
        }
    }

    /// The next frame to hand to the transport, if one is due and the pacing allows.
    pub fn poll_transmit(&mut self, now: Instant) -> Option<Transmit> {
        if self.next_tx.is_some_and(|t| now < t) {
            return None;
        }
        let n = self.peers.len();
        for k in 0..n {
            let i = (self.rr + k) % n;
            if let Some((frame, hs)) = self.next_frame_for(now, i) {
                self.rr = (i + 1) % n;
                let start = self.next_tx.map_or(now, |t| t.max(now));
                self.next_tx = Some(start + tx_time(frame.len(), self.cfg.bitrate_bps));
                self.stats.frames_out += 1;
                self.stats.bytes_out += frame.len() as u64;
                if hs {
                    self.stats.handshake_bytes_out += frame.len() as u64;
                }
                return Some(Transmit { to: self.peers[i].addr.clone(), frame });
            }
        }
        None
    }

    fn next_frame_for(&mut self, now: Instant, i: usize) -> Option<(Vec<u8>, bool)> {
        let room = self.cfg.packet_room();
        let limits = self.limits();
        let p = &mut self.peers[i];
        if let Some(f) = p.control.pop_front() {
            let hs = f.first() != Some(&Kind::Data.first_byte());
            return Some((f, hs));
        }
        match p.hs.as_mut() {
            Some(Hs::Init(h)) => {
                if let Some(f) = h.out.next_frame(now) {
                    return Some((f, true));
                }
            }
            Some(Hs::Resp(h)) => {
                if let Some(f) = h.out.next_frame(now) {
                    return Some((f, true));
                }
            }
            Some(Hs::Resume(h)) if h.due.is_some_and(|d| d <= now) => {
                h.due = None;
                h.sent_at = Some(now);
                return Some((h.frame.clone(), true));
            }
            Some(Hs::Resume(_)) => {}
            None => {}
        }
        let s = p.session.as_mut()?;
        let plain = s.arq.poll_packet(now, room, s.confirmed)?;
        s.seal(now, &limits, plain).ok().map(|f| (f, false))
    }

    fn has_pending(&self, now: Instant) -> bool {
        self.peers.iter().any(|p| {
            !p.control.is_empty()
                || match &p.hs {
                    Some(Hs::Init(h)) => h.out.has_queued(),
                    Some(Hs::Resp(h)) => h.out.has_queued(),
                    Some(Hs::Resume(h)) => h.due.is_some(),
                    None => false,
                }
                || p.session.as_ref().is_some_and(|s| s.arq.wants_to_send(now, s.confirmed))
        })
    }

    /// When [`LinkEngine::handle_timeout`] (or, for paced frames, `poll_transmit`) should
    /// next be called. `now` is the current instant.
    pub fn poll_timeout(&self, now: Instant) -> Option<Instant> {
        let cfg = &self.cfg;
        let mut t: Option<Instant> = None;
        let mut at = |x: Instant| t = Some(t.map_or(x, |t| t.min(x)));
        if let Some(n) = self.next_tx {
            if n > now && self.has_pending(now) {
                at(n);
            }
        }
        for p in &self.peers {
            if let Some(hs) = &p.hs {
                at(hs.started() + cfg.handshake_timeout);
            }
            let nack = |rx: &Reassembly, nack_at: Option<Instant>, at: &mut dyn FnMut(Instant)| {
                if rx.started() && !rx.complete() {
                    if let Some(since) = [rx.last_progress, nack_at].into_iter().flatten().max() {
                        at(since + cfg.nack_delay());
                    }
                }
            };
            if let Some(h) = p.hello_rx.as_ref().filter(|h| h.nacks < MAX_HELLO_NACKS) {
                nack(&h.rx, h.nack_at, &mut at);
            }
            if let Some(t) = p.hello_rx.as_ref().and_then(|h| h.rx.last_progress) {
                at(t + cfg.handshake_timeout);
            }
            if let Some(h) = &p.held_hello {
                at(h.at + cfg.handshake_timeout);
            }
            match &p.hs {
                Some(Hs::Init(h)) => {
                    if !h.out.all_acked() && !h.out.has_queued() {
                        if let Some(ls) = h.out.last_sent {
                            at(ls + cfg.hs_rto(h.out.rounds));
                        }
                    }
                    if let (Some(a), Some(s)) = (h.acked_at, &p.session) {
                        at((a + s.arq.rto()).max(s.last_tx + s.arq.rto()));
                    }
                    nack(&h.rx, h.nack_at, &mut at);
                }
                Some(Hs::Resp(h)) => {
                    if !h.out.all_acked() && !h.out.has_queued() {
                        if let Some(ls) = h.out.last_sent {
                            at(ls + cfg.hs_rto(h.out.rounds));
                        }
                    }
                    nack(&h.rx, h.nack_at, &mut at);
                }
                Some(Hs::Resume(h)) => match (h.due, h.sent_at) {
                    (Some(d), _) => at(d),
                    (None, Some(s)) => at(s + cfg.hs_rto(h.rounds)),
                    _ => {}
                },
                None => {}
            }
            if p.hs.is_none() && p.session.is_none() && p.want.is_some() && !p.link_down {
                if let Some(r) = p.retry_at {
                    at(r);
                }
            }
            if let Some(s) = &p.session {
                if let Some(x) = s.arq.poll_timeout() {
                    at(x);
                }
                if s.confirmed {
                    at(s.last_rx + cfg.dead_after);
                    at((s.last_rx + cfg.keepalive).max(s.last_tx + s.arq.rto()));
                    at(s.last_tx + cfg.keepalive);
                    if p.hs.is_none() {
                        let k = if s.initiator { cfg.rekey_interval } else { cfg.rekey_interval * 3 / 2 };
                        at(s.keys_since + k);
                    }
                }
            }
        }
        t
    }

    /// The next event.
    pub fn poll_event(&mut self) -> Option<LinkEvent> {
        self.events.pop_front()
    }

    /// Tells the engine the transport lost `addr` (hangup, connection closed). The session
    /// stays until `dead_after` (the link may come back); a wanted peer is redialled when
    /// [`LinkEngine::link_up`] reports it again, not before. A handshake this node started
    /// towards it is dropped (its frames cannot arrive), and a peer left with nothing may
    /// be forgotten to make room.
    pub fn link_down(&mut self, addr: &LinkAddr) {
        if let Some(p) = self.peers.iter_mut().find(|p| p.addr == *addr) {
            p.failures = 0;
            p.link_down = true;
            p.retry_at = None;
            if p.session.is_none() && matches!(p.hs, Some(Hs::Init(_) | Hs::Resume(_))) {
                p.hs = None;
            }
        }
    }

    /// Tells the engine the transport reaches `addr` again: a wanted peer without a session
    /// is dialled at once.
    pub fn link_up(&mut self, now: Instant, addr: &LinkAddr) {
        if let Some(i) = self.peers.iter().position(|p| p.addr == *addr) {
            let p = &mut self.peers[i];
            p.link_down = false;
            if p.want.is_some() && p.session.is_none() && p.hs.is_none() {
                p.retry_at = Some(now);
            }
        }
    }
}
