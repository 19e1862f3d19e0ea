//! `P2pEndpoint`: the peer-to-peer QUIC API (ant-quic's shape) over a UDP plugin instance,
//! with ML-KEM-768 key agreement and ML-DSA-65 mutual authentication on every connection.
//!
//! Peers are named by [`PeerId`], derived from the raw public key each side proves it holds
//! during the handshake. Messages sent with [`P2pEndpoint::send`] travel as one
//! unidirectional stream each (raw bytes, finished after the write) — the same framing
//! ant-quic uses, so the two stacks exchange messages directly.

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use antmesh_plugin_api::TransportAddr;
use tokio::sync::{broadcast, mpsc, OwnedSemaphorePermit, Semaphore};

use super::admission::{self, Admission, AdmissionConfig, Admit, Slot};
use crate::budget::BlockList;
use super::crypto;
use super::socket::{PluginSocket, SocketError};
use crate::identity::{Identity, PeerId};
use crate::plugin::{loader, NativeTransport};
use crate::transport::{EventReceiver, SharedTransport};

/// The server name quinn requires on dial. antmesh authenticates by PeerId, not by name:
/// it is neither sent (no SNI) nor checked.
const SERVER_NAME: &str = "antmesh";

/// Client configurations kept per expected peer (see `ConfigCache`).
pub const CLIENT_CONFIG_CACHE: usize = 64;

/// The first bytes of every application bidirectional stream, as ant-quic writes and
/// expects them: it keeps its own internal streams (acknowledgement requests, relay framing)
/// apart by such prefixes, so streams without it are not the application's.
pub const APP_BIDI_STREAM_MAGIC: &[u8; 8] = b"ANQAppB1";

/// Stream error code for a bidirectional stream that is not an application stream.
const STREAM_NOT_APPLICATION: u32 = 0x41;

/// Application close code: the peer asked to disconnect.
pub const CLOSE_DISCONNECT: u32 = 0;
/// Application close code: a newer connection to the same peer replaced this one.
pub const CLOSE_DUPLICATE: u32 = 1;
/// Application close code: the endpoint is shutting down.
pub const CLOSE_SHUTDOWN: u32 = 2;
/// Application close code: the peer is not who the dialler expected.
pub const CLOSE_WRONG_PEER: u32 = 3;
/// Application close code: this endpoint blocked the peer (it misbehaved).
pub const CLOSE_BLOCKED: u32 = 4;

/// Stream error code for a bidirectional stream refused because `accept_bi` is behind.
const STREAM_BUSY: u32 = 0x42;

/// Endpoint settings.
///
/// Memory a peer can pin on this endpoint is bounded by its settings: at most
/// `connection_window` bytes buffered inside QUIC, `concurrent_reads` × `max_message_size`
/// in messages being read, and `pending_bytes_per_peer` in messages waiting for `recv`
/// (then its streams wait and QUIC flow control holds the peer), plus
/// `pending_datagrams_per_peer` datagrams. [`P2pConfig::mesh_node`] sizes these for mesh
/// traffic; [`P2pConfig::new`] for bulk transfers between trusted peers.
#[derive(Clone)]
pub struct P2pConfig {
    /// This node's identity.
    pub identity: Arc<Identity>,
    /// Where the UDP plugin is loaded from (default: beside the executable).
    pub plugin_dir: Option<PathBuf>,
    /// Local UDP address (port 0 picks one).
    pub bind: SocketAddr,
    /// Close a connection idle this long.
    pub idle_timeout: Duration,
    /// Send keep-alives this often (None: never).
    pub keep_alive: Option<Duration>,
    /// Give up on a handshake (either side) after this long.
    pub handshake_timeout: Duration,
    /// Largest message `recv` accepts; longer streams are stopped.
    pub max_message_size: usize,
    /// Messages buffered for `recv` (all peers) before senders are slowed down.
    pub recv_queue: usize,
    /// Bytes one stream may have in flight (QUIC stream receive window).
    pub stream_window: u32,
    /// Bytes one peer may have in flight across all its streams (QUIC connection receive
    /// window).
    pub connection_window: u64,
    /// Bidirectional streams a peer may have open at once (0: none, `accept_bi` never
    /// yields).
    pub max_bidi_streams: u32,
    /// Unidirectional streams (messages) a peer may have open at once.
    pub max_uni_streams: u32,
    /// Messages of one peer read at once.
    pub concurrent_reads: usize,
    /// Message bytes of one peer waiting for `recv`; its further messages wait in QUIC.
    pub pending_bytes_per_peer: usize,
    /// Datagrams of one peer waiting for `recv_datagram`; more are dropped.
    pub pending_datagrams_per_peer: usize,
    /// Who may start a handshake, and when a Retry is sent first.
    pub admission: AdmissionConfig,
    /// Events buffered per subscriber; a subscriber further behind is told it lagged.
    pub event_queue: usize,
}

/// The default stream window: 8 MiB. quinn's 1.25 MB default caps a single stream at
/// window / RTT, and over the UDP plugin (two I/O threads on the path) the round trip is
/// long enough for that to bind: the plugin path reached 0.78 of a direct socket with the
/// default and 0.96 with 8 MiB (docs/performance.md). The window is a limit, not an
/// allocation: memory is used only for data the application has not read yet.
pub const DEFAULT_STREAM_WINDOW: u32 = 8 << 20;

/// Largest mesh message a node takes from a neighbour: a full announce with its key is
/// ~5.9 KB, everything else fits a datagram.
pub const MESH_MAX_MESSAGE: usize = 64 << 10;

impl P2pConfig {
    /// Defaults for `identity` bound to `bind`, sized for bulk transfers: 8 MiB stream
    /// windows, 16 MiB messages. Each peer may pin up to ~96 MiB (see the type's docs):
    /// lower the windows where strangers connect, or use [`P2pConfig::mesh_node`].
    pub fn new(identity: Arc<Identity>, bind: SocketAddr) -> Self {
        P2pConfig {
            identity,
            plugin_dir: None,
            bind,
            idle_timeout: Duration::from_secs(30),
            keep_alive: Some(Duration::from_secs(10)),
            handshake_timeout: Duration::from_secs(10),
            max_message_size: 16 * 1024 * 1024,
            recv_queue: 1024,
            stream_window: DEFAULT_STREAM_WINDOW,
            connection_window: 2 * u64::from(DEFAULT_STREAM_WINDOW),
            max_bidi_streams: 16,
            max_uni_streams: 64,
            concurrent_reads: 4,
            pending_bytes_per_peer: 16 << 20,
            pending_datagrams_per_peer: 256,
            admission: AdmissionConfig::default(),
            event_queue: 1024,
        }
    }

    /// Settings for a mesh node open to strangers: messages up to [`MESH_MAX_MESSAGE`],
    /// 64 KiB stream and 256 KiB connection windows, no bidirectional streams, and
    /// [`AdmissionConfig::open`]. A peer pins at most ~768 KiB.
    pub fn mesh_node(identity: Arc<Identity>, bind: SocketAddr) -> Self {
        P2pConfig {
            max_message_size: MESH_MAX_MESSAGE,
            stream_window: MESH_MAX_MESSAGE as u32,
            connection_window: 4 * MESH_MAX_MESSAGE as u64,
            max_bidi_streams: 0,
            max_uni_streams: 16,
            pending_bytes_per_peer: 4 * MESH_MAX_MESSAGE,
            // A peer's datagrams wait in one queue with everyone's: a short backlog each
            // keeps an honest datagram from waiting behind a flood.
            pending_datagrams_per_peer: 32,
            admission: AdmissionConfig::open(),
            ..P2pConfig::new(identity, bind)
        }
    }
}

/// Which side opened a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// We dialled.
    Dialled,
    /// The peer dialled us.
    Accepted,
}

/// Why a connection ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DisconnectReason {
    /// We called `disconnect` or `shutdown`.
    Local,
    /// The peer closed it (with its application code and reason).
    Remote {
        /// Application close code.
        code: u64,
        /// Reason text.
        reason: String,
    },
    /// No traffic within the idle timeout.
    TimedOut,
    /// A newer connection to the same peer replaced it.
    Superseded,
    /// A transport or protocol error.
    Error(String),
}

/// Something that happened on the endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum P2pEvent {
    /// A connection is up.
    PeerConnected {
        /// The peer.
        peer: PeerId,
        /// Its address.
        addr: SocketAddr,
        /// Who dialled.
        side: Side,
    },
    /// The peer proved it holds the key of `peer` (ML-DSA-65, during the handshake).
    PeerAuthenticated {
        /// The peer.
        peer: PeerId,
    },
    /// A connection ended.
    PeerDisconnected {
        /// The peer.
        peer: PeerId,
        /// Why.
        reason: DisconnectReason,
    },
    /// A message arrived (its bytes are delivered by `recv`).
    DataReceived {
        /// The sender.
        peer: PeerId,
        /// Message length.
        bytes: usize,
    },
}

/// Counters since the endpoint started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EndpointStats {
    /// Connections open now.
    pub active_connections: usize,
    /// Connections we dialled that completed.
    pub connections_dialled: u64,
    /// Connections we accepted that completed.
    pub connections_accepted: u64,
    /// Handshakes that failed (either side).
    pub handshake_failures: u64,
    /// Messages sent with `send`.
    pub messages_sent: u64,
    /// Messages received for `recv`.
    pub messages_received: u64,
    /// Message bytes sent.
    pub bytes_sent: u64,
    /// Message bytes received.
    pub bytes_received: u64,
    /// Initials answered with a Retry (the source had to prove its address).
    pub retries_sent: u64,
    /// Initials refused or ignored (limits, blocked sources).
    pub handshakes_refused: u64,
    /// Datagrams dropped because their peer's receive queue was full.
    pub datagrams_dropped: u64,
    /// Handshakes in flight now (inbound).
    pub handshakes_in_flight: usize,
}

/// Why the endpoint could not start.
#[derive(thiserror::Error, Debug)]
#[non_exhaustive]
pub enum EndpointError {
    /// No plugin directory could be determined.
    #[error("no plugin directory (set P2pConfig::plugin_dir)")]
    NoPluginDir,
    /// The plugin directory could not be read.
    #[error(transparent)]
    PluginDir(#[from] loader::PluginDirError),
    /// No `udp` plugin loaded.
    #[error("no `udp` plugin in {0}")]
    NoUdpPlugin(PathBuf),
    /// The UDP instance did not open.
    #[error(transparent)]
    Open(#[from] crate::plugin::OpenError),
    /// The transport cannot carry QUIC.
    #[error(transparent)]
    Socket(#[from] SocketError),
    /// TLS configuration failed.
    #[error(transparent)]
    Crypto(#[from] crypto::QuicCryptoError),
    /// quinn refused the endpoint.
    #[error("QUIC endpoint: {0}")]
    Quic(std::io::Error),
}

/// Why a connection could not be made.
#[derive(thiserror::Error, Debug)]
#[non_exhaustive]
pub enum ConnectError {
    /// This transport is served by the constrained engine, not QUIC.
    #[error("{0} addresses are not reachable over QUIC")]
    UnsupportedTransport(String),
    /// The peer's key does not hash to the PeerId we dialled.
    #[error("dialled {expected} but the peer authenticated as {actual}")]
    WrongPeer {
        /// Who we wanted.
        expected: PeerId,
        /// Who answered.
        actual: PeerId,
    },
    /// TLS configuration failed.
    #[error(transparent)]
    Crypto(#[from] crypto::QuicCryptoError),
    /// quinn refused to start the connection (bad address, endpoint closed).
    #[error("cannot start connection: {0}")]
    Start(#[from] quinn::ConnectError),
    /// The handshake or the connection failed.
    #[error("connection failed: {0}")]
    Connection(#[from] quinn::ConnectionError),
    /// The handshake completed without a usable peer key (cannot happen with our TLS
    /// configuration; reported rather than assumed).
    #[error("peer presented no usable ML-DSA-65 key")]
    NoPeerKey,
    /// The handshake did not complete within the handshake timeout.
    #[error("handshake timed out")]
    Timeout,
    /// The peer is blocked on this endpoint ([`P2pEndpoint::block`]).
    #[error("{0} is blocked")]
    Blocked(PeerId),
}

/// Why a message could not be sent.
#[derive(thiserror::Error, Debug)]
#[non_exhaustive]
pub enum MessageError {
    /// No connection to that peer.
    #[error("not connected to {0}")]
    NotConnected(PeerId),
    /// The connection failed.
    #[error(transparent)]
    Connection(#[from] quinn::ConnectionError),
    /// Writing the stream failed.
    #[error(transparent)]
    Write(#[from] quinn::WriteError),
    /// The stream was already closed.
    #[error(transparent)]
    Closed(#[from] quinn::ClosedStream),
    /// The datagram could not be sent (too large, or the peer takes none).
    #[error(transparent)]
    Datagram(#[from] quinn::SendDatagramError),
}

/// Why `recv` returned nothing.
#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum RecvError {
    /// The endpoint was shut down.
    #[error("endpoint is shut down")]
    Shutdown,
}

struct PeerEntry {
    conn: quinn::Connection,
    initiator: PeerId,
}

/// A message waiting for `recv`, holding its share of its peer's pending-bytes budget.
type Pending = (PeerId, Vec<u8>, OwnedSemaphorePermit);

/// A datagram waiting for `recv_datagram`, counted in its peer's queue until taken.
struct QueuedDatagram {
    peer: PeerId,
    data: Vec<u8>,
    _slot: Counted,
}

/// Counts one item against a per-peer counter while it lives.
struct Counted(Arc<AtomicUsize>);

impl Counted {
    /// Takes one unit of `counter` unless it is at `cap`.
    fn take(counter: &Arc<AtomicUsize>, cap: usize) -> Option<Counted> {
        counter.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < cap).then_some(n + 1)).ok()?;
        Some(Counted(Arc::clone(counter)))
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The client configuration of every dial, per expected peer (`None`: whoever answers),
/// built once: building one copies the identity (re-deriving the ML-DSA-65 key pair from
/// its seed), builds a rustls `ClientConfig` and starts a probe session, ~0.3 ms. A
/// configuration holds no per-connection state (no resumption, and every session makes
/// its own key share), so sharing it changes nothing on the wire. Bounded: past `cap`
/// entries the oldest goes.
struct ConfigCache<K, V> {
    map: HashMap<K, V>,
    order: VecDeque<K>,
    cap: usize,
}

impl<K: Hash + Eq + Clone, V: Clone> ConfigCache<K, V> {
    fn new(cap: usize) -> Self {
        ConfigCache { map: HashMap::new(), order: VecDeque::new(), cap: cap.max(1) }
    }

    fn get(&self, key: &K) -> Option<V> {
        self.map.get(key).cloned()
    }

    fn insert(&mut self, key: K, value: V) {
        if self.map.insert(key.clone(), value).is_none() {
            self.order.push_back(key);
            while self.order.len() > self.cap {
                if let Some(old) = self.order.pop_front() {
                    self.map.remove(&old);
                }
            }
        }
    }
}

struct Inner {
    me: PeerId,
    identity: Arc<Identity>,
    endpoint: quinn::Endpoint,
    transport: SharedTransport,
    peers: Mutex<HashMap<PeerId, PeerEntry>>,
    events: broadcast::Sender<P2pEvent>,
    messages: mpsc::Sender<Pending>,
    datagrams: mpsc::Sender<QueuedDatagram>,
    bi_streams: mpsc::Sender<(PeerId, quinn::SendStream, quinn::RecvStream)>,
    incoming: mpsc::Sender<PeerId>,
    limits: PeerLimits,
    admission: Arc<Mutex<Admission>>,
    /// Peers refused until the instant (`block`).
    blocked: Mutex<BlockList<PeerId>>,
    transport_cfg: Arc<quinn::TransportConfig>,
    client_configs: Mutex<ConfigCache<Option<PeerId>, quinn::ClientConfig>>,
    stats: Counters,
}

/// What one peer may hold of this endpoint's receive side.
#[derive(Clone, Copy)]
struct PeerLimits {
    max_message_size: usize,
    concurrent_reads: usize,
    pending_bytes: usize,
    pending_datagrams: usize,
    handshake_timeout: Duration,
}

#[derive(Default)]
struct Counters {
    dialled: AtomicU64,
    accepted: AtomicU64,
    failures: AtomicU64,
    sent: AtomicU64,
    received: AtomicU64,
    bytes_sent: AtomicU64,
    bytes_received: AtomicU64,
    retries: AtomicU64,
    refused: AtomicU64,
    datagrams_dropped: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A QUIC peer-to-peer endpoint.
pub struct P2pEndpoint {
    inner: Arc<Inner>,
    messages: tokio::sync::Mutex<mpsc::Receiver<Pending>>,
    datagrams: tokio::sync::Mutex<mpsc::Receiver<QueuedDatagram>>,
    bi_streams: tokio::sync::Mutex<mpsc::Receiver<(PeerId, quinn::SendStream, quinn::RecvStream)>>,
    incoming: tokio::sync::Mutex<mpsc::Receiver<PeerId>>,
}

impl P2pEndpoint {
    /// Loads the UDP plugin, binds `config.bind` and starts accepting connections.
    pub async fn new(config: P2pConfig) -> Result<P2pEndpoint, EndpointError> {
        let dir = config.plugin_dir.clone().or_else(loader::default_plugin_dir).ok_or(EndpointError::NoPluginDir)?;
        let set = loader::load_named(&dir, &["udp"])?;
        let plugin = set.get("udp").ok_or_else(|| EndpointError::NoUdpPlugin(dir.clone()))?;
        let (t, events) = NativeTransport::open(plugin, "quic", &format!("(bind: \"{}\")", config.bind))?;
        Self::with_transport(config, Arc::new(t), events)
    }

    /// Runs the endpoint over an already open datagram transport.
    pub fn with_transport(config: P2pConfig, transport: SharedTransport, events: EventReceiver) -> Result<P2pEndpoint, EndpointError> {
        let socket = PluginSocket::new(Arc::clone(&transport), events)?;
        let transport_cfg = Arc::new(transport_config(&config));
        let mut server = quinn::ServerConfig::new(crypto::server_crypto(&config.identity)?, crypto::token_key()?);
        server.transport_config(Arc::clone(&transport_cfg));
        // Initials wait in quinn only until `accept_loop` decides on them, which it does at
        // once; these bound what a flood can park there meanwhile.
        let incoming_cap = (config.admission.max_handshakes * 4).max(64);
        server.max_incoming(incoming_cap);
        server.incoming_buffer_size(16 << 10);
        server.incoming_buffer_size_total(incoming_cap as u64 * (16 << 10));
        // Reset key and connection-ID key both come from the identity, so that after a
        // restart the node resets its peers' stale connections at once (they redial).
        let mut endpoint_cfg = quinn::EndpointConfig::new(crypto::reset_key_for(&config.identity));
        let cid_key = crypto::cid_key_for(&config.identity);
        endpoint_cfg.cid_generator(move || Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key)));
        let endpoint = quinn::Endpoint::new_with_abstract_socket(
            endpoint_cfg,
            Some(server),
            socket,
            Arc::new(quinn::TokioRuntime),
        )
        .map_err(EndpointError::Quic)?;
        let (events_tx, _) = broadcast::channel(config.event_queue.max(1));
        let (msg_tx, msg_rx) = mpsc::channel(config.recv_queue.max(1));
        let (dg_tx, dg_rx) = mpsc::channel(config.recv_queue.max(1));
        let (bi_tx, bi_rx) = mpsc::channel(64);
        let (in_tx, in_rx) = mpsc::channel(64);
        let inner = Arc::new(Inner {
            me: config.identity.peer_id(),
            identity: Arc::clone(&config.identity),
            endpoint,
            transport,
            peers: Mutex::new(HashMap::new()),
            events: events_tx,
            messages: msg_tx,
            datagrams: dg_tx,
            bi_streams: bi_tx,
            incoming: in_tx,
            limits: PeerLimits {
                max_message_size: config.max_message_size,
                concurrent_reads: config.concurrent_reads.max(1),
                pending_bytes: config.pending_bytes_per_peer.clamp(1, u32::MAX as usize),
                pending_datagrams: config.pending_datagrams_per_peer.max(1),
                handshake_timeout: config.handshake_timeout,
            },
            admission: Arc::new(Mutex::new(Admission::new(config.admission.clone()))),
            blocked: Mutex::new(BlockList::new(MAX_BLOCKED_PEERS)),
            transport_cfg,
            client_configs: Mutex::new(ConfigCache::new(CLIENT_CONFIG_CACHE)),
            stats: Counters::default(),
        });
        tokio::spawn(accept_loop(Arc::clone(&inner)));
        Ok(P2pEndpoint {
            inner,
            messages: tokio::sync::Mutex::new(msg_rx),
            datagrams: tokio::sync::Mutex::new(dg_rx),
            bi_streams: tokio::sync::Mutex::new(bi_rx),
            incoming: tokio::sync::Mutex::new(in_rx),
        })
    }

    /// This node's PeerId.
    pub fn peer_id(&self) -> PeerId {
        self.inner.me
    }

    /// The local UDP address.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.inner.endpoint.local_addr().ok()
    }

    /// Dials `addr` and authenticates whoever answers.
    pub async fn connect_addr(&self, addr: SocketAddr) -> Result<PeerId, ConnectError> {
        self.dial(addr, None).await
    }

    /// Dials a transport address, optionally requiring the peer to be `expected`.
    pub async fn connect_transport(&self, addr: &TransportAddr, expected: Option<PeerId>) -> Result<PeerId, ConnectError> {
        match addr {
            TransportAddr::Udp(sa) => self.dial(*sa, expected).await,
            other => Err(ConnectError::UnsupportedTransport(other.scheme().to_owned())),
        }
    }

    /// The client configuration for dials expecting `expected` (cached, see [`ConfigCache`]).
    fn client_config(&self, expected: Option<PeerId>) -> Result<quinn::ClientConfig, ConnectError> {
        if let Some(client) = lock(&self.inner.client_configs).get(&expected) {
            return Ok(client);
        }
        // Built outside the lock: dials to other peers need not wait for it. Two dials
        // racing here build it twice; both are equivalent.
        let mut client = quinn::ClientConfig::new(crypto::client_crypto(&self.inner.identity, expected)?);
        client.transport_config(Arc::clone(&self.inner.transport_cfg));
        lock(&self.inner.client_configs).insert(expected, client.clone());
        Ok(client)
    }

    async fn dial(&self, addr: SocketAddr, expected: Option<PeerId>) -> Result<PeerId, ConnectError> {
        let client = self.client_config(expected)?;
        let connecting = self.inner.endpoint.connect_with(client, addr, SERVER_NAME)?;
        // Dropping `connecting` at the deadline closes the attempt.
        let Ok(done) = tokio::time::timeout(self.inner.limits.handshake_timeout, connecting).await else {
            self.inner.stats.failures.fetch_add(1, Ordering::Relaxed);
            return Err(ConnectError::Timeout);
        };
        let conn = match done {
            Ok(c) => c,
            Err(e) => {
                self.inner.stats.failures.fetch_add(1, Ordering::Relaxed);
                if let Some(want) = expected {
                    if let Some(crypto::QuicCryptoError::WrongPeer { expected, actual }) = crypto::wrong_peer(&e, want) {
                        return Err(ConnectError::WrongPeer { expected, actual });
                    }
                }
                return Err(ConnectError::Connection(e));
            }
        };
        let peer = crypto::peer_id_of(&conn).ok_or(ConnectError::NoPeerKey)?;
        if let Some(want) = expected {
            if want != peer {
                // The verifier refuses this in the handshake; this guards the invariant.
                conn.close(CLOSE_WRONG_PEER.into(), b"wrong peer");
                return Err(ConnectError::WrongPeer { expected: want, actual: peer });
            }
        }
        if is_blocked(&self.inner, &peer) {
            conn.close(CLOSE_BLOCKED.into(), b"blocked");
            return Err(ConnectError::Blocked(peer));
        }
        self.inner.stats.dialled.fetch_add(1, Ordering::Relaxed);
        register(&self.inner, conn, peer, Side::Dialled, None);
        Ok(peer)
    }

    /// The next peer that connected to us.
    pub async fn accept(&self) -> Option<PeerId> {
        self.incoming.lock().await.recv().await
    }

    /// Sends one message to `peer`: a unidirectional stream, raw bytes, finished.
    pub async fn send(&self, peer: &PeerId, data: &[u8]) -> Result<(), MessageError> {
        let conn = self.connection(peer).ok_or(MessageError::NotConnected(*peer))?;
        let mut s = conn.open_uni().await?;
        s.write_all(data).await?;
        s.finish()?;
        self.inner.stats.sent.fetch_add(1, Ordering::Relaxed);
        self.inner.stats.bytes_sent.fetch_add(data.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    /// The next message from any peer. Taking it frees its bytes in the sender's
    /// pending budget (`pending_bytes_per_peer`).
    pub async fn recv(&self) -> Result<(PeerId, Vec<u8>), RecvError> {
        let (peer, data, _budget) = self.messages.lock().await.recv().await.ok_or(RecvError::Shutdown)?;
        Ok((peer, data))
    }

    /// Sends one unreliable datagram (QUIC DATAGRAM frame, RFC 9221) to `peer`, waiting
    /// for room in the send buffer rather than dropping. Much cheaper than a message (no
    /// stream), but may be lost and must fit [`P2pEndpoint::max_datagram_size`].
    pub async fn send_datagram(&self, peer: &PeerId, data: &[u8]) -> Result<(), MessageError> {
        let conn = self.connection(peer).ok_or(MessageError::NotConnected(*peer))?;
        conn.send_datagram_wait(bytes::Bytes::copy_from_slice(data)).await?;
        self.inner.stats.sent.fetch_add(1, Ordering::Relaxed);
        self.inner.stats.bytes_sent.fetch_add(data.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    /// The largest datagram `peer` takes now (None: not connected, or it takes none).
    pub fn max_datagram_size(&self, peer: &PeerId) -> Option<usize> {
        self.connection(peer)?.max_datagram_size()
    }

    /// The next datagram from any peer. Datagrams that arrive while their peer already
    /// has `pending_datagrams_per_peer` waiting, or while this queue is full, are dropped
    /// (they are unreliable by nature; one busy peer cannot crowd out the others).
    pub async fn recv_datagram(&self) -> Result<(PeerId, Vec<u8>), RecvError> {
        let d = self.datagrams.lock().await.recv().await.ok_or(RecvError::Shutdown)?;
        Ok((d.peer, d.data))
    }

    /// Opens a bidirectional stream to `peer`.
    /// The stream starts with [`APP_BIDI_STREAM_MAGIC`] on the wire (written here, consumed
    /// by the peer's `accept_bi`), so the returned streams carry only application bytes.
    pub async fn open_bi(&self, peer: &PeerId) -> Result<(quinn::SendStream, quinn::RecvStream), MessageError> {
        let conn = self.connection(peer).ok_or(MessageError::NotConnected(*peer))?;
        let (mut send, recv) = conn.open_bi().await?;
        send.write_all(APP_BIDI_STREAM_MAGIC).await?;
        Ok((send, recv))
    }

    /// The next bidirectional stream a peer opened.
    pub async fn accept_bi(&self) -> Option<(PeerId, quinn::SendStream, quinn::RecvStream)> {
        self.bi_streams.lock().await.recv().await
    }

    /// Events from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<P2pEvent> {
        self.inner.events.subscribe()
    }

    /// Peers connected now.
    pub fn connected_peers(&self) -> Vec<PeerId> {
        lock(&self.inner.peers).keys().copied().collect()
    }

    /// Counters.
    pub fn stats(&self) -> EndpointStats {
        let s = &self.inner.stats;
        EndpointStats {
            active_connections: lock(&self.inner.peers).len(),
            connections_dialled: s.dialled.load(Ordering::Relaxed),
            connections_accepted: s.accepted.load(Ordering::Relaxed),
            handshake_failures: s.failures.load(Ordering::Relaxed),
            messages_sent: s.sent.load(Ordering::Relaxed),
            messages_received: s.received.load(Ordering::Relaxed),
            bytes_sent: s.bytes_sent.load(Ordering::Relaxed),
            bytes_received: s.bytes_received.load(Ordering::Relaxed),
            retries_sent: s.retries.load(Ordering::Relaxed),
            handshakes_refused: s.refused.load(Ordering::Relaxed),
            datagrams_dropped: s.datagrams_dropped.load(Ordering::Relaxed),
            handshakes_in_flight: lock(&self.inner.admission).counts().0,
        }
    }

    /// Closes the connection to `peer` and refuses it, and new handshakes from the IP it
    /// connected from, for `duration`: for a peer caught misbehaving (forged signatures,
    /// floods). Returns whether it was connected.
    pub fn block(&self, peer: &PeerId, duration: Duration) -> bool {
        let now = Instant::now();
        let until = now + duration;
        lock(&self.inner.blocked).block(now, *peer, until);
        let entry = lock(&self.inner.peers).remove(peer);
        let Some(e) = entry else { return false };
        let ip = admission::source_ip(e.conn.remote_address());
        lock(&self.inner.admission).block(now, ip, until);
        e.conn.close(CLOSE_BLOCKED.into(), b"blocked");
        let _ = self.inner.events.send(P2pEvent::PeerDisconnected { peer: *peer, reason: DisconnectReason::Local });
        true
    }

    /// Closes the connection to `peer`. Returns whether there was one.
    pub fn disconnect(&self, peer: &PeerId) -> bool {
        let entry = lock(&self.inner.peers).remove(peer);
        match entry {
            Some(e) => {
                e.conn.close(CLOSE_DISCONNECT.into(), b"disconnect");
                let _ = self.inner.events.send(P2pEvent::PeerDisconnected { peer: *peer, reason: DisconnectReason::Local });
                true
            }
            None => false,
        }
    }

    /// Closes every connection, waits for them to drain, and closes the transport.
    pub async fn shutdown(&self) {
        let peers: Vec<PeerId> = lock(&self.inner.peers).keys().copied().collect();
        for p in peers {
            if let Some(e) = lock(&self.inner.peers).remove(&p) {
                e.conn.close(CLOSE_SHUTDOWN.into(), b"shutdown");
                let _ = self.inner.events.send(P2pEvent::PeerDisconnected { peer: p, reason: DisconnectReason::Local });
            }
        }
        self.inner.endpoint.close(CLOSE_SHUTDOWN.into(), b"shutdown");
        self.inner.endpoint.wait_idle().await;
        let t = Arc::clone(&self.inner.transport);
        let _ = tokio::task::spawn_blocking(move || t.close()).await;
    }

    /// The RFC 9266 `tls-exporter` channel binding of the connection to `peer`: 32 bytes
    /// both ends compute alike, fresh per connection, that no third party can know. Bind an
    /// application-level proof to it (e.g. sign it) to show it was made for this very
    /// connection. `None` if not connected.
    pub fn channel_binding(&self, peer: &PeerId) -> Option<[u8; crypto::CHANNEL_BINDING_LEN]> {
        let mut out = [0u8; crypto::CHANNEL_BINDING_LEN];
        let conn = self.connection(peer)?;
        conn.export_keying_material(&mut out, crypto::CHANNEL_BINDING_LABEL, b"").ok()?;
        Some(out)
    }

    /// Whether a connection to `peer` is open.
    pub fn is_connected(&self, peer: &PeerId) -> bool {
        self.connection(peer).is_some_and(|c| c.close_reason().is_none())
    }

    fn connection(&self, peer: &PeerId) -> Option<quinn::Connection> {
        lock(&self.inner.peers).get(peer).map(|e| e.conn.clone())
    }
}

/// Most peers remembered as blocked.
const MAX_BLOCKED_PEERS: usize = 4096;

fn is_blocked(inner: &Inner, peer: &PeerId) -> bool {
    lock(&inner.blocked).is_blocked(Instant::now(), peer)
}

fn transport_config(config: &P2pConfig) -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.stream_receive_window(config.stream_window.into());
    // quinn's default connection window is unlimited: a peer could then buffer a full
    // stream window on every stream it may open.
    t.receive_window(quinn::VarInt::from_u64(config.connection_window.max(u64::from(config.stream_window))).unwrap_or(quinn::VarInt::MAX));
    t.max_concurrent_bidi_streams(config.max_bidi_streams.into());
    t.max_concurrent_uni_streams(config.max_uni_streams.into());
    // Unread datagrams quinn keeps per connection; the reader takes them at once.
    t.datagram_receive_buffer_size(Some((config.pending_datagrams_per_peer.max(1) * 1500).min(1 << 20)));
    t.send_window(u64::from(config.stream_window) * 2);
    t.max_idle_timeout(quinn::IdleTimeout::try_from(config.idle_timeout).ok());
    t.keep_alive_interval(config.keep_alive);
    t
}

async fn accept_loop(inner: Arc<Inner>) {
    while let Some(incoming) = inner.endpoint.accept().await {
        let ip = admission::source_ip(incoming.remote_address());
        let decision = lock(&inner.admission).decide(Instant::now(), ip, incoming.remote_address_validated());
        match decision {
            Admit::Accept => {}
            Admit::Retry => {
                inner.stats.retries.fetch_add(1, Ordering::Relaxed);
                if incoming.may_retry() {
                    let _ = incoming.retry();
                } else {
                    incoming.ignore();
                }
                continue;
            }
            Admit::Ignore(why) => {
                inner.stats.refused.fetch_add(1, Ordering::Relaxed);
                tracing::trace!(%ip, ?why, "Initial ignored");
                incoming.ignore();
                continue;
            }
            Admit::Refuse(why) => {
                inner.stats.refused.fetch_add(1, Ordering::Relaxed);
                tracing::trace!(%ip, ?why, "Initial refused");
                incoming.refuse();
                continue;
            }
        }
        let mut slot = Slot::handshake(Arc::clone(&inner.admission), ip);
        let inner = Arc::clone(&inner);
        tokio::spawn(async move {
            let failed = |e: &dyn std::fmt::Display| {
                inner.stats.failures.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(%ip, "incoming handshake failed: {e}");
            };
            let connecting = match incoming.accept() {
                Ok(c) => c,
                Err(e) => return failed(&e),
            };
            // Dropping `connecting` at the deadline closes the attempt (and the slot).
            let conn = match tokio::time::timeout(inner.limits.handshake_timeout, connecting).await {
                Ok(Ok(c)) => c,
                Ok(Err(e)) => return failed(&e),
                Err(_) => return failed(&"timed out"),
            };
            let Some(peer) = crypto::peer_id_of(&conn) else {
                conn.close(CLOSE_WRONG_PEER.into(), b"no peer key");
                return;
            };
            if is_blocked(&inner, &peer) {
                conn.close(CLOSE_BLOCKED.into(), b"blocked");
                return;
            }
            slot.established();
            inner.stats.accepted.fetch_add(1, Ordering::Relaxed);
            register(&inner, conn, peer, Side::Accepted, Some(slot));
            let _ = inner.incoming.try_send(peer);
        });
    }
}

/// Records a new connection (resolving duplicates the same way on both ends) and starts
/// its stream readers. An inbound connection brings its admission slot, held until it
/// closes.
fn register(inner: &Arc<Inner>, conn: quinn::Connection, peer: PeerId, side: Side, slot: Option<Slot>) {
    let initiator = match side {
        Side::Dialled => inner.me,
        Side::Accepted => peer,
    };
    {
        let mut peers = lock(&inner.peers);
        if let Some(old) = peers.get(&peer) {
            // Two connections between the same pair (simultaneous dials): both ends keep
            // the one dialled by the smaller PeerId, so they agree without talking.
            let preferred = inner.me.min(peer);
            let keep_old = old.conn.close_reason().is_none() && old.initiator == preferred && initiator != preferred;
            if keep_old {
                conn.close(CLOSE_DUPLICATE.into(), b"duplicate connection");
                return;
            }
            old.conn.close(CLOSE_DUPLICATE.into(), b"duplicate connection");
        }
        peers.insert(peer, PeerEntry { conn: conn.clone(), initiator });
    }
    let _ = inner.events.send(P2pEvent::PeerConnected { peer, addr: conn.remote_address(), side });
    let _ = inner.events.send(P2pEvent::PeerAuthenticated { peer });
    tokio::spawn(read_uni(Arc::clone(inner), conn.clone(), peer));
    tokio::spawn(read_datagrams(Arc::clone(inner), conn.clone(), peer));
    tokio::spawn(read_bi(Arc::clone(inner), conn.clone(), peer));
    tokio::spawn(watch_close(Arc::clone(inner), conn, peer, slot));
}

async fn read_datagrams(inner: Arc<Inner>, conn: quinn::Connection, peer: PeerId) {
    let queued = Arc::new(AtomicUsize::new(0));
    while let Ok(d) = conn.read_datagram().await {
        inner.stats.received.fetch_add(1, Ordering::Relaxed);
        inner.stats.bytes_received.fetch_add(d.len() as u64, Ordering::Relaxed);
        let sent = Counted::take(&queued, inner.limits.pending_datagrams)
            .is_some_and(|slot| inner.datagrams.try_send(QueuedDatagram { peer, data: d.to_vec(), _slot: slot }).is_ok());
        if !sent {
            inner.stats.datagrams_dropped.fetch_add(1, Ordering::Relaxed);
            tracing::trace!(%peer, "datagram dropped: receive queue full");
        }
    }
}

/// Reads the peer's messages: at most `concurrent_reads` at once, and at most
/// `pending_bytes` of them waiting for `recv`. Beyond that its streams stay unaccepted in
/// QUIC, which stops granting it new ones: the peer is slowed, nobody else is.
async fn read_uni(inner: Arc<Inner>, conn: quinn::Connection, peer: PeerId) {
    let limits = inner.limits;
    let readers = Arc::new(Semaphore::new(limits.concurrent_reads));
    let pending = Arc::new(Semaphore::new(limits.pending_bytes));
    loop {
        let Ok(reader) = Arc::clone(&readers).acquire_owned().await else { return };
        let Ok(mut s) = conn.accept_uni().await else { return };
        let inner = Arc::clone(&inner);
        let pending = Arc::clone(&pending);
        tokio::spawn(async move {
            match s.read_to_end(limits.max_message_size).await {
                Ok(data) => {
                    inner.stats.received.fetch_add(1, Ordering::Relaxed);
                    inner.stats.bytes_received.fetch_add(data.len() as u64, Ordering::Relaxed);
                    let _ = inner.events.send(P2pEvent::DataReceived { peer, bytes: data.len() });
                    // A message larger than the whole budget takes all of it.
                    let n = data.len().clamp(1, limits.pending_bytes) as u32;
                    let Ok(budget) = pending.acquire_many_owned(n).await else { return };
                    drop(reader);
                    let _ = inner.messages.send((peer, data, budget)).await;
                }
                Err(e) => tracing::debug!(%peer, "message stream failed: {e}"),
            }
        });
    }
}

async fn read_bi(inner: Arc<Inner>, conn: quinn::Connection, peer: PeerId) {
    while let Ok((mut send, mut recv)) = conn.accept_bi().await {
        let inner = Arc::clone(&inner);
        // Each stream's prefix is read on its own task: a peer that opens a stream and
        // never writes must not hold up the next one (it holds one of its own
        // `max_bidi_streams`, nothing more).
        tokio::spawn(async move {
            let mut magic = [0u8; 8];
            match recv.read_exact(&mut magic).await {
                Ok(()) if &magic == APP_BIDI_STREAM_MAGIC => {
                    if let Err(mpsc::error::TrySendError::Full((_, mut send, mut recv))) = inner.bi_streams.try_send((peer, send, recv)) {
                        // `accept_bi` is behind: refuse rather than park the stream.
                        let _ = recv.stop(STREAM_BUSY.into());
                        let _ = send.reset(STREAM_BUSY.into());
                    }
                }
                Ok(()) => {
                    tracing::debug!(%peer, "refused a bidirectional stream without the application prefix");
                    let _ = recv.stop(STREAM_NOT_APPLICATION.into());
                    let _ = send.reset(STREAM_NOT_APPLICATION.into());
                }
                Err(e) => tracing::debug!(%peer, "bidirectional stream ended before its prefix: {e}"),
            }
        });
    }
}

async fn watch_close(inner: Arc<Inner>, conn: quinn::Connection, peer: PeerId, slot: Option<Slot>) {
    let err = conn.closed().await;
    drop(slot);
    let was_current = {
        let mut peers = lock(&inner.peers);
        match peers.get(&peer) {
            Some(e) if e.conn.stable_id() == conn.stable_id() => {
                peers.remove(&peer);
                true
            }
            _ => false,
        }
    };
    if !was_current {
        return; // already reported (disconnect/shutdown) or superseded
    }
    let reason = match err {
        quinn::ConnectionError::ApplicationClosed(c) if u64::from(c.error_code) == u64::from(CLOSE_DUPLICATE) => {
            DisconnectReason::Superseded
        }
        quinn::ConnectionError::ApplicationClosed(c) => {
            DisconnectReason::Remote { code: c.error_code.into(), reason: String::from_utf8_lossy(&c.reason).into_owned() }
        }
        quinn::ConnectionError::LocallyClosed => DisconnectReason::Local,
        quinn::ConnectionError::TimedOut => DisconnectReason::TimedOut,
        other => DisconnectReason::Error(other.to_string()),
    };
    let _ = inner.events.send(P2pEvent::PeerDisconnected { peer, reason });
}

#[cfg(test)]
mod tests {
    use super::ConfigCache;

    #[test]
    fn the_config_cache_is_bounded_and_keeps_the_newest() {
        let mut c = ConfigCache::new(2);
        c.insert(Some(1), "a");
        c.insert(None, "b");
        c.insert(Some(1), "a2");
        assert_eq!((c.get(&Some(1)), c.get(&None)), (Some("a2"), Some("b")));
        c.insert(Some(3), "c");
        assert_eq!(c.get(&Some(1)), None, "the oldest entry went");
        assert_eq!((c.get(&None), c.get(&Some(3))), (Some("b"), Some("c")));
        assert_eq!((c.map.len(), c.order.len()), (2, 2));
    }
}
