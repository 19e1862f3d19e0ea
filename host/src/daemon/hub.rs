//! The node's mesh task: the router over every authenticated neighbour (QUIC peers and
//! link sessions), the node's own destination, end-to-end links to destinations, the
//! store, and the operator's control requests. One task owns all of it, so none of the
//! sans-IO state needs a lock; interfaces talk to it over channels.
//!
//! Mesh packets travel between neighbours as messages whose first byte is [`MSG_MESH`].
//! Inside mesh DATA packets the first byte says what the payload is:
//!
//! ```text
//! 0x01 probe        id [8] | reply-to destination [16]
//! 0x02 probe reply  id [8]
//! 0x03 link frame   reply-to destination [16] | link engine frame (docs/link.md)
//! 0x04 key request  reply-to destination [16]
//! 0x05 key record   destination [16] | signed ML-KEM key record (mesh::sealed)
//! 0x06 sealed       sealed packet (mesh::sealed): one message, end-to-end encrypted
//! ```
//!
//! End-to-end links are the constrained link engine run over the mesh: its link address
//! is the remote node's destination, its frames ride DATA packets, and its handshake
//! proves the PeerId the destination's announce names. Relays see only sealed frames.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot};

use crate::budget::{KeyedLimiter, Limiter};
use crate::identity::{Identity, PeerId};
use crate::log_budget::{log_limited, LogBudget};
use crate::mesh::dest::{DestinationHash, ServiceName};
use crate::mesh::router::{MeshEvent, NeighbourId, NeighbourInfo, Router, RouterConfig};
use crate::mesh::sealed::{NodeKem, RemoteKem};
use crate::quic::endpoint::P2pEndpoint;

use super::inbox::{Inbox, Item};
use super::persist::Persistence;

/// Message type byte of a mesh packet between neighbours.
pub const MSG_MESH: u8 = 0x02;
pub use crate::mesh::dest::NODE_SERVICE;

use crate::mesh::links::{LinkUpdate, MeshLinks, LINK_FRAME};
/// Node payload type: a probe (`id [8] | reply-to [16]`).
pub const PROBE: u8 = 0x01;
/// Node payload type: a probe's reply (`id [8]`).
pub const PROBE_REPLY: u8 = 0x02;
/// Node payload type: a request for the sealing key (`reply-to [16]`).
pub const KEY_REQUEST: u8 = 0x04;
/// Node payload type: a signed sealing key record (`destination [16] | record`).
pub const KEY_RECORD: u8 = 0x05;
/// Node payload type: a sealed packet.
pub const SEALED: u8 = 0x06;
/// A reply-to destination gets the key record at most this often.
const KEY_ANSWER_EVERY: Duration = Duration::from_secs(30);
/// Most remote sealing keys kept.
const MAX_REMOTE_KEMS: usize = 256;

/// How the hub sends to a neighbour.
#[derive(Clone)]
pub enum NeighbourTx {
    /// A QUIC peer: its writer task's queue.
    Quic(QuicWriter),
    /// A link session; the driver of its interface sends.
    Link(mpsc::Sender<LinkCommand>),
}

/// The sending side of one QUIC neighbour: a bounded queue drained by one writer task, so
/// a neighbour that stops reading costs one parked task and at most `QUIC_SEND_QUEUE`
/// packets, and never delays the hub.
#[derive(Clone)]
pub struct QuicWriter {
    ep: Arc<P2pEndpoint>,
    peer: PeerId,
    queue: mpsc::Sender<Vec<u8>>,
}

/// Mesh messages queued per QUIC neighbour; beyond, packets are dropped.
pub const QUIC_SEND_QUEUE: usize = 256;
/// A message the peer does not take within this long is dropped (its stream reset).
const QUIC_SEND_TIMEOUT: Duration = Duration::from_secs(5);

impl QuicWriter {
    /// Starts the writer task of `peer` on `ep`. It ends when every clone of the writer is
    /// dropped (the hub dropped the neighbour).
    pub fn spawn(ep: Arc<P2pEndpoint>, peer: PeerId) -> QuicWriter {
        let (queue, mut rx) = mpsc::channel::<Vec<u8>>(QUIC_SEND_QUEUE);
        let task_ep = Arc::clone(&ep);
        tokio::spawn(async move {
            while let Some(msg) = rx.recv().await {
                // A mesh packet that fits a QUIC datagram goes as one: no stream to open and
                // close per packet. Mesh traffic tolerates loss (ARQ inside end-to-end
                // links, repeated announces, probes and path requests). Larger ones (full
                // announces) go as messages on streams.
                let fits = task_ep.max_datagram_size(&peer).is_some_and(|m| msg.len() <= m);
                let send = async {
                    if fits {
                        task_ep.send_datagram(&peer, &msg).await
                    } else {
                        task_ep.send(&peer, &msg).await
                    }
                };
                match tokio::time::timeout(QUIC_SEND_TIMEOUT, send).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => tracing::debug!(%peer, "mesh packet not sent: {e}"),
                    Err(_) => tracing::debug!(%peer, "mesh packet not sent: the peer took none for {QUIC_SEND_TIMEOUT:?}"),
                }
            }
        });
        QuicWriter { ep, peer, queue }
    }
}

impl NeighbourTx {
    /// Queues `msg` without waiting; false when the neighbour's queue is full or gone.
    fn try_send(&self, peer: PeerId, msg: Vec<u8>) -> bool {
        match self {
            NeighbourTx::Quic(w) => w.queue.try_send(msg).is_ok(),
            NeighbourTx::Link(cmds) => cmds.try_send(LinkCommand::Send { peer, data: msg }).is_ok(),
        }
    }

    /// Disconnects `peer` and refuses it for [`BLOCK_FOR`].
    fn block(&self, peer: PeerId) {
        match self {
            NeighbourTx::Quic(w) => {
                w.ep.block(&w.peer, BLOCK_FOR);
            }
            NeighbourTx::Link(cmds) => {
                let _ = cmds.try_send(LinkCommand::Block { peer, duration: BLOCK_FOR });
            }
        }
    }
}

/// How long a neighbour caught forging stays refused.
pub const BLOCK_FOR: Duration = Duration::from_secs(600);

/// A request to a link driver.
#[derive(Debug)]
pub enum LinkCommand {
    /// Send `data` to `peer` on its session.
    Send {
        /// The peer.
        peer: PeerId,
        /// The message.
        data: Vec<u8>,
    },
    /// Close `peer`'s sessions and refuse its handshakes for `duration`.
    Block {
        /// The peer.
        peer: PeerId,
        /// For how long.
        duration: Duration,
    },
}

/// Commands queued per link driver; beyond, mesh packets to its peers are dropped.
pub const LINK_COMMAND_QUEUE: usize = 1024;

/// A neighbour session: the interface it is on, the peer, and for link sessions the link
/// address (one peer may hold sessions on several addresses of one interface, e.g. a TCP
/// peer reconnecting from a new port while its old session times out).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct NeighbourKey {
    /// Interface name.
    pub iface: String,
    /// The peer.
    pub peer: PeerId,
    /// The link address of a link session (None for QUIC: one connection per peer).
    pub addr: Option<String>,
}

/// A neighbour session starting or ending, queued in order with its packets.
pub enum SessionEvent {
    /// The session is up and authenticated.
    Up {
        /// Constrained hop (compact announces).
        compact: bool,
        /// Hop cost.
        cost: u16,
        /// Announce bytes per second this hop may carry (0: no cap).
        announce_rate: u64,
        /// How to reach it.
        tx: NeighbourTx,
    },
    /// The session ended.
    Down,
}

/// What interface drivers hand the hub: per-session queues served round robin.
pub type HubInbox = Inbox<NeighbourKey, SessionEvent>;

/// An operator request; the reply is JSON.
pub struct ControlRequest {
    /// The request.
    pub request: Value,
    /// Where the reply goes.
    pub reply: oneshot::Sender<Value>,
}

/// Control requests queued for the hub; clients wait for room beyond.
pub const CONTROL_QUEUE: usize = 64;

/// Settings of the hub.
pub struct HubConfig {
    /// Where the store lives (None: no persistence).
    pub store: Option<PathBuf>,
    /// Re-announce the node's destination this often.
    pub announce_interval: Duration,
    /// Save the store's changes at most this often (and at shutdown).
    pub save_interval: Duration,
}

enum Waiter {
    Probe { dest: DestinationHash, id: [u8; 8], sent: Option<Instant>, deadline: Instant, reply: oneshot::Sender<Value> },
    Send { dest: DestinationHash, data: Vec<u8>, deadline: Instant, reply: oneshot::Sender<Value> },
    Sealed { dest: DestinationHash, data: Vec<u8>, deadline: Instant, reply: oneshot::Sender<Value> },
}

/// The hub's counters, for the exit log line.
#[derive(Debug, Default, Clone, Copy)]
pub struct HubSummary {
    /// Destinations with a path at exit.
    pub paths: usize,
    /// End-to-end link sessions established.
    pub e2e_sessions: u64,
}

fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

struct Hub {
    me: Arc<Identity>,
    router: Router,
    links: MeshLinks,
    node_dest: DestinationHash,
    neighbours: HashMap<NeighbourId, (NeighbourKey, NeighbourTx)>,
    ids: HashMap<NeighbourKey, NeighbourId>,
    next_id: u32,
    persist: Option<Persistence>,
    waiters: Vec<Waiter>,
    e2e_sessions: u64,
    /// Payloads for destinations without a path yet (a path request is out).
    held: Vec<Held>,
    /// When a path request last went out, per destination (`ask_path`).
    asked: HashMap<DestinationHash, Instant>,
    /// Path requests made to answer remote peers: an allowance of their own, so that
    /// spoofed reply-to destinations cannot spend the node's.
    answer_requests: Limiter,
    /// This node's sealing key and its signed record.
    kem: NodeKem,
    kem_record: Vec<u8>,
    /// Verified sealing keys of other destinations, oldest first in `remote_kem_order`.
    remote_kems: HashMap<DestinationHash, RemoteKem>,
    remote_kem_order: std::collections::VecDeque<DestinationHash>,
    /// Key requests out: when, and how many records were checked for each since.
    key_asked: HashMap<DestinationHash, (Instant, u8)>,
    /// When a key record was last sent, per reply-to destination.
    key_answered: HashMap<DestinationHash, Instant>,
    /// Key records sent in all, and per neighbour the requests came through.
    key_answers: Limiter,
    key_answers_by_hop: KeyedLimiter<NeighbourId>,
    /// ML-KEM decapsulations of sealed packets, in all and per neighbour they came through.
    decaps: Limiter,
    decaps_by_hop: KeyedLimiter<NeighbourId>,
    inbox: Arc<HubInbox>,
    rng: crate::link::crypto::Rng,
    /// Packets dropped because a neighbour's send queue was full.
    send_dropped: u64,
    logs: Logs,
}

/// Budgets of the log lines remote peers can cause (one per kind, so a flood of one kind
/// does not hide the others).
struct Logs {
    neighbour: LogBudget,
    path: LogBudget,
    forged: LogBudget,
    key: LogBudget,
    sealed: LogBudget,
    e2e_state: LogBudget,
    e2e_message: LogBudget,
}

impl Default for Logs {
    fn default() -> Self {
        Logs {
            neighbour: LogBudget::remote(),
            path: LogBudget::new(5.0, 100),
            forged: LogBudget::remote(),
            key: LogBudget::remote(),
            sealed: LogBudget::remote(),
            e2e_state: LogBudget::remote(),
            e2e_message: LogBudget::new(5.0, 50),
        }
    }
}

/// End-to-end links idle this long are closed (a send opens one again).
const E2E_IDLE: Duration = Duration::from_secs(300);

/// A payload waiting for a path.
struct Held {
    dest: DestinationHash,
    payload: Vec<u8>,
    until: Instant,
    /// Sent to answer a remote peer (a probe reply, a key record, a link reply), not on
    /// this node's own behalf.
    answer: bool,
}

/// How long a payload of this node's own waits for a path.
const HOLD: Duration = Duration::from_secs(30);
/// How long an answer to a remote peer waits for a path.
const HOLD_ANSWER: Duration = Duration::from_secs(10);
/// Most payloads of this node's own held.
const MAX_HELD: usize = 192;
/// Most answers held: a flood of requests with spoofed reply-to destinations evicts only
/// other answers.
const MAX_HELD_ANSWERS: usize = 64;
/// How long a key request waits for its record; how many records are checked per request
/// (a forger may answer first).
const KEY_WAIT: Duration = Duration::from_secs(60);
const KEY_TRIES: u8 = 4;
/// How long a probe waits for its reply before it is sent again.
const PROBE_AGAIN: Duration = Duration::from_secs(2);
/// How often path requests for held payloads are repeated.
const REQUEST_AGAIN: Duration = Duration::from_secs(3);

/// Most inbox items handled between two flushes of the router's output: an answer made
/// early in a batch waits for the batch to end, so this is kept small.
const BATCH: usize = 16;

/// Runs the hub until the inbox closes or `stop` fires.
pub async fn run(
    me: Arc<Identity>,
    cfg: HubConfig,
    inbox: Arc<HubInbox>,
    mut control: mpsc::Receiver<ControlRequest>,
    stop: Arc<tokio::sync::Notify>,
) -> HubSummary {
    let now = Instant::now();
    let mut seed = [0u8; 32];
    if getrandom::getrandom(&mut seed).is_err() {
        tracing::error!("no randomness for the mesh router; mesh disabled");
        return HubSummary::default();
    }
    let rcfg = RouterConfig {
        report_forwarded: tracing::enabled!(tracing::Level::TRACE),
        // An announce outlives two announce intervals, so one lost re-announce leaves no gap.
        announce_lifetime: (cfg.announce_interval * 2).max(RouterConfig::default().announce_lifetime),
        ..RouterConfig::default()
    };
    let mut router = Router::new(Arc::clone(&me), rcfg, (now, unix_ms()), seed);
    let node_dest = match ServiceName::new(NODE_SERVICE) {
        Ok(s) => router.register_destination(s, crate::daemon::agent().into_bytes()),
        Err(e) => {
            tracing::error!("{e}");
            return HubSummary::default();
        }
    };
    let links = match MeshLinks::new(Arc::clone(&me), node_dest, E2E_IDLE) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!("no randomness for end-to-end links: {e}");
            return HubSummary::default();
        }
    };
    let persist = match cfg.store.clone() {
        Some(path) => {
            let interval = cfg.save_interval;
            match tokio::task::spawn_blocking(move || Persistence::open(path, interval)).await {
                Ok((p, snap)) => {
                    tracing::info!(paths = snap.paths.len(), announces = snap.announces.len(), keys = snap.keys.len(), "mesh state loaded");
                    router.restore(now, snap);
                    Some(p)
                }
                Err(e) => {
                    tracing::error!("opening the mesh store failed: {e}; paths will not persist");
                    None
                }
            }
        }
        None => None,
    };
    tracing::info!(dest = %node_dest, service = NODE_SERVICE, "node destination");
    let kem = NodeKem::for_identity(&me);
    let kem_record = match kem.record(&me, &node_dest) {
        Ok(r) => r,
        Err(e) => {
            tracing::error!("cannot sign the sealing key record: {e}");
            return HubSummary::default();
        }
    };
    let mut rng_seed = [0u8; 32];
    if getrandom::getrandom(&mut rng_seed).is_err() {
        tracing::error!("no randomness for sealed packets; mesh disabled");
        return HubSummary::default();
    }
    // Announced now (to nobody yet) so that each neighbour gets it as it comes up.
    if let Err(e) = router.announce(now, &node_dest) {
        tracing::warn!("announce failed: {e}");
    }
    let mut hub = Hub {
        me,
        router,
        links,
        node_dest,
        neighbours: HashMap::new(),
        ids: HashMap::new(),
        next_id: 0,
        persist,
        waiters: Vec::new(),
        e2e_sessions: 0,
        held: Vec::new(),
        asked: HashMap::new(),
        answer_requests: Limiter::new(0.5, 4),
        kem,
        kem_record,
        remote_kems: HashMap::new(),
        remote_kem_order: std::collections::VecDeque::new(),
        key_asked: HashMap::new(),
        key_answered: HashMap::new(),
        key_answers: Limiter::new(1.0, 4),
        key_answers_by_hop: KeyedLimiter::new(0.1, 2, 4096),
        decaps: Limiter::new(200.0, 400),
        decaps_by_hop: KeyedLimiter::new(20.0, 40, 4096),
        inbox: Arc::clone(&inbox),
        rng: crate::link::crypto::Rng::from_seed(rng_seed),
        send_dropped: 0,
        logs: Logs::default(),
    };
    let mut next_announce = tokio::time::Instant::now() + cfg.announce_interval;
    loop {
        hub.flush();
        let now = Instant::now();
        if let Some(p) = hub.persist.as_mut() {
            p.maybe_start(now, &mut hub.router);
        }
        let held = hub.held.iter().map(|h| h.until).min().map(|t| t.min(now + REQUEST_AGAIN));
        let save = hub.persist.as_ref().and_then(|p| p.next_wake(hub.router.has_changes()));
        let wake = [hub.router.poll_timeout(now), hub.links.poll_timeout(now), hub.next_waiter_deadline(), held, save]
            .into_iter()
            .flatten()
            .min()
            .map(tokio::time::Instant::from_std)
            .unwrap_or(next_announce)
            .min(next_announce);
        let saving = hub.persist.as_ref().is_some_and(Persistence::is_saving);
        tokio::select! {
            biased;
            () = stop.notified() => break,
            // Operator requests first: a flood on the inbox must not starve `status`.
            Some(ControlRequest { request, reply }) = control.recv() => hub.on_control(Instant::now(), request, reply),
            outcome = async { match hub.persist.as_mut() { Some(p) => p.finished().await, None => std::future::pending().await } }, if saving => {
                if let Some(p) = hub.persist.as_mut() {
                    p.on_finished(Instant::now(), outcome, &mut hub.router);
                }
            }
            item = inbox.pop() => match item {
                Some((key, item)) => {
                    hub.on_item(key, item);
                    for _ in 1..BATCH {
                        let Some((key, item)) = inbox.try_pop() else { break };
                        hub.on_item(key, item);
                    }
                }
                None => break,
            },
            () = tokio::time::sleep_until(wake) => {
                let now = Instant::now();
                hub.router.handle_timeout(now);
                hub.links.handle_timeout(now);
                hub.check_waiters(now);
                hub.release_held(now);
                if tokio::time::Instant::now() >= next_announce {
                    hub.announce(now);
                    next_announce = tokio::time::Instant::now() + cfg.announce_interval;
                }
            }
        }
    }
    if let Some(p) = hub.persist.as_mut() {
        p.flush(&mut hub.router).await;
    }
    HubSummary { paths: hub.router.paths().count(), e2e_sessions: hub.e2e_sessions }
}

impl Hub {
    /// Asks the mesh for a path to `dest`, at most once per `REQUEST_AGAIN` per
    /// destination; for an answer to a remote peer (`answer`), only within the answers'
    /// own allowance.
    fn ask_path(&mut self, now: Instant, dest: DestinationHash, answer: bool) {
        if self.asked.get(&dest).is_some_and(|t| *t + REQUEST_AGAIN > now) {
            return;
        }
        if answer && !self.answer_requests.allow(now) {
            return;
        }
        if self.asked.len() >= 1024 {
            self.asked.retain(|_, t| *t + REQUEST_AGAIN > now);
        }
        self.asked.insert(dest, now);
        self.router.request_path(now, dest);
    }

    /// Sends `payload` to `dest`, or holds it (and asks for a path) until one is known.
    /// Answers to remote peers (`answer`) have their own, smaller share of the hold.
    fn send_or_hold(&mut self, now: Instant, dest: DestinationHash, payload: Vec<u8>, answer: bool) {
        if self.router.send_to(dest, &payload).is_ok() {
            return;
        }
        self.ask_path(now, dest, answer);
        let (cap, hold) = if answer { (MAX_HELD_ANSWERS, HOLD_ANSWER) } else { (MAX_HELD, HOLD) };
        if self.held.iter().filter(|h| h.answer == answer).count() >= cap {
            if let Some(i) = self.held.iter().position(|h| h.answer == answer) {
                self.held.remove(i);
            }
        }
        self.held.push(Held { dest, payload, until: now + hold, answer });
    }

    /// Sends what waited for a path that is now known; drops what waited too long; asks
    /// again for the paths still missing every few seconds (a neighbour that could answer
    /// may have come up since).
    fn release_held(&mut self, now: Instant) {
        for h in std::mem::take(&mut self.held) {
            if self.router.resolve(&h.dest).is_some() {
                let _ = self.router.send_to(h.dest, &h.payload);
            } else if h.until > now {
                self.ask_path(now, h.dest, h.answer);
                self.held.push(h);
            } else {
                tracing::debug!(dest = %h.dest, "no path appeared; payload dropped");
            }
        }
    }

    fn announce(&mut self, now: Instant) {
        let d = self.node_dest;
        if let Err(e) = self.router.announce(now, &d) {
            tracing::warn!("announce failed: {e}");
        }
    }

    fn on_item(&mut self, key: NeighbourKey, item: Item<SessionEvent>) {
        let now = Instant::now();
        match item {
            Item::Event(SessionEvent::Up { compact, cost, announce_rate, tx }) => {
                if let Some(old) = self.ids.remove(&key) {
                    self.router.remove_neighbour(old);
                    self.neighbours.remove(&old);
                }
                self.next_id += 1;
                let id = NeighbourId(self.next_id);
                log_limited!(self.logs.neighbour, info, interface = %key.iface, peer = %key.peer, ?id, compact, cost, "mesh neighbour up");
                self.router.add_neighbour(now, id, NeighbourInfo { peer: key.peer, compact, cost, announce_rate });
                self.ids.insert(key.clone(), id);
                self.neighbours.insert(id, (key, tx));
                // The router replays this node's announce and the ones it holds to the new
                // neighbour, so it can route at once.
            }
            Item::Event(SessionEvent::Down) => {
                // Only the session that ended: a newer one of the same peer has its own key.
                if let Some(id) = self.ids.remove(&key) {
                    log_limited!(self.logs.neighbour, info, interface = %key.iface, peer = %key.peer, "mesh neighbour down");
                    self.router.remove_neighbour(id);
                    self.neighbours.remove(&id);
                }
            }
            Item::Packet(bytes) => {
                let Some(&id) = self.ids.get(&key) else { return };
                if let Err(e) = self.router.handle_packet(now, id, &bytes) {
                    tracing::debug!(interface = %key.iface, from = %key.peer, "mesh packet dropped: {e}");
                    if e.is_forgery() {
                        // Honest nodes verify full announces before relaying them, so a
                        // forged one was made by this neighbour.
                        log_limited!(self.logs.forged, warn, interface = %key.iface, peer = %key.peer, "neighbour sent a forged announce ({e}); blocked for {}s", BLOCK_FOR.as_secs());
                        if let Some((_, tx)) = self.neighbours.get(&id) {
                            tx.block(key.peer);
                        }
                    }
                }
            }
        }
    }

    fn on_control(&mut self, now: Instant, req: Value, reply: oneshot::Sender<Value>) {
        let cmd = req.get("cmd").and_then(Value::as_str).unwrap_or_default();
        let dest = || {
            req.get("dest")
                .and_then(Value::as_str)
                .ok_or("missing dest")
                .and_then(|d| d.parse::<DestinationHash>().map_err(|_| "dest is 32 hex characters"))
        };
        let timeout = Duration::from_secs(req.get("timeout_s").and_then(Value::as_u64).unwrap_or(30).clamp(1, 3600));
        match cmd {
            "status" => {
                let _ = reply.send(json!({
                    "ok": true,
                    "peer_id": self.me.peer_id().to_hex(),
                    "node_dest": self.node_dest.to_hex(),
                    "neighbours": self.neighbours.values().map(|(k, _)| json!({"interface": k.iface, "peer": k.peer.to_hex()})).collect::<Vec<_>>(),
                    "counters": self.counters(),
                    "store": self.persist.as_ref().map(Persistence::status),
                }));
            }
            "paths" => {
                let mut paths: Vec<Value> = self
                    .router
                    .paths()
                    .map(|(d, p)| {
                        let via = self.neighbours.get(&p.next_hop).map(|(k, _)| k.clone());
                        json!({
                            "dest": d.to_hex(),
                            "peer": self.router.destination_peer(d).map(|x| x.to_hex()),
                            "next_hop": via.as_ref().map(|k| k.peer.to_hex()),
                            "interface": via.as_ref().map(|k| k.iface.clone()),
                            "hops": p.hops,
                            "cost": p.cost,
                            "verified": p.verified,
                            "rtt_ms": p.rtt.map(|r| r.as_secs_f64() * 1e3),
                            "loss_permille": p.loss_permille,
                            "expires_in_s": p.expires.saturating_duration_since(now).as_secs(),
                        })
                    })
                    .collect();
                paths.sort_by(|a, b| a["dest"].as_str().cmp(&b["dest"].as_str()));
                let _ = reply.send(json!({"ok": true, "node_dest": self.node_dest.to_hex(), "paths": paths}));
            }
            "probe" | "send" if dest().is_ok_and(|d| d == self.node_dest) => {
                let _ = reply.send(json!({"ok": false, "error": "that is this node's own destination"}));
            }
            "probe" => match dest() {
                Ok(d) => {
                    let id: [u8; 8] = self.rng.bytes();
                    if self.router.resolve(&d).is_none() {
                        self.ask_path(now, d, false);
                    }
                    self.waiters.push(Waiter::Probe { dest: d, id, sent: None, deadline: now + timeout, reply });
                    self.check_waiters(now);
                }
                Err(e) => {
                    let _ = reply.send(json!({"ok": false, "error": e}));
                }
            },
            "send" => match dest() {
                Ok(d) => {
                    let data = req.get("data").and_then(Value::as_str).unwrap_or_default().as_bytes().to_vec();
                    if self.router.resolve(&d).is_none() {
                        self.ask_path(now, d, false);
                    }
                    let deadline = now + timeout;
                    if req.get("sealed").and_then(Value::as_bool) == Some(true) {
                        self.waiters.push(Waiter::Sealed { dest: d, data, deadline, reply });
                    } else {
                        self.waiters.push(Waiter::Send { dest: d, data, deadline, reply });
                    }
                    self.check_waiters(now);
                }
                Err(e) => {
                    let _ = reply.send(json!({"ok": false, "error": e}));
                }
            },
            other => {
                let _ = reply.send(json!({"ok": false, "error": format!("unknown command `{other}`")}));
            }
        }
    }

    /// What the node refused or dropped, and why: for operators and the hostile-peer suite.
    fn counters(&self) -> Value {
        let r = self.router.stats();
        let (destinations, unverified) = self.router.destinations();
        json!({
            "paths": self.router.paths().count(),
            "destinations": destinations,
            "unverified": unverified,
            "packets_in": r.packets_in,
            "packets_dropped": r.dropped,
            "signatures_verified": r.verified,
            "neighbour_limited": r.neighbour_limited,
            "identity_limited": r.rate_limited,
            "evicted": r.evicted,
            "inbox_dropped": self.inbox.dropped(),
            "send_dropped": self.send_dropped,
            "held": self.held.len(),
            "remote_kems": self.remote_kems.len(),
        })
    }

    fn next_waiter_deadline(&self) -> Option<Instant> {
        self.waiters
            .iter()
            .map(|w| match w {
                Waiter::Probe { deadline, sent: Some(t), .. } => (*deadline).min(*t + PROBE_AGAIN),
                Waiter::Sealed { deadline, .. } => (*deadline).min(Instant::now() + REQUEST_AGAIN),
                Waiter::Probe { deadline, .. } | Waiter::Send { deadline, .. } => *deadline,
            })
            .min()
    }

    /// Moves control requests on: paths found, links up, deadlines.
    fn check_waiters(&mut self, now: Instant) {
        let waiters = std::mem::take(&mut self.waiters);
        for w in waiters {
            match w {
                Waiter::Probe { dest, id, sent, deadline, reply } => {
                    if deadline <= now {
                        let _ = reply.send(json!({"ok": false, "error": if sent.is_some() { "no reply" } else { "no path" }, "dest": dest.to_hex()}));
                        continue;
                    }
                    // Not sent yet, or unanswered for a while (lost, or sent into a
                    // connection that had just died): send (again).
                    let due = sent.is_none_or(|t| t + PROBE_AGAIN <= now);
                    if sent.is_some() && due {
                        self.router.record_probe(&dest, None);
                    }
                    if due && self.router.resolve(&dest).is_some() {
                        // A fresh id per send: a late answer to an earlier one must not be
                        // timed against this one.
                        let id: [u8; 8] = self.rng.bytes();
                        let mut payload = vec![PROBE];
                        payload.extend_from_slice(&id);
                        payload.extend_from_slice(&self.node_dest.0);
                        if self.router.send_to(dest, &payload).is_ok() {
                            self.waiters.push(Waiter::Probe { dest, id, sent: Some(now), deadline, reply });
                            continue;
                        }
                    }
                    if self.router.resolve(&dest).is_none() {
                        self.ask_path(now, dest, false);
                    }
                    self.waiters.push(Waiter::Probe { dest, id, sent, deadline, reply });
                }
                Waiter::Sealed { dest, data, deadline, reply } => {
                    if deadline <= now {
                        let _ = reply.send(json!({"ok": false, "error": "no sealing key from the destination", "dest": dest.to_hex()}));
                        continue;
                    }
                    match self.remote_kems.get(&dest).cloned() {
                        Some(kem) => {
                            let r = match kem.seal(&mut self.rng, &dest, &data) {
                                Ok(sealed) => {
                                    let mut payload = vec![SEALED];
                                    payload.extend_from_slice(&sealed);
                                    self.send_or_hold(now, dest, payload, false);
                                    json!({"ok": true, "dest": dest.to_hex(), "sealed": true, "bytes": sealed.len()})
                                }
                                Err(e) => json!({"ok": false, "error": e.to_string()}),
                            };
                            let _ = reply.send(r);
                        }
                        None => {
                            // Ask the destination for its signed sealing key, at most every
                            // few seconds.
                            if self.key_asked.get(&dest).is_none_or(|(t, _)| *t + REQUEST_AGAIN <= now) {
                                if self.key_asked.len() >= 1024 {
                                    self.key_asked.retain(|_, (t, _)| *t + KEY_WAIT > now);
                                }
                                self.key_asked.insert(dest, (now, 0));
                                let mut payload = vec![KEY_REQUEST];
                                payload.extend_from_slice(&self.node_dest.0);
                                self.send_or_hold(now, dest, payload, false);
                            }
                            self.waiters.push(Waiter::Sealed { dest, data, deadline, reply });
                        }
                    }
                }
                Waiter::Send { dest, data, deadline, reply } => {
                    if deadline <= now {
                        let _ = reply.send(json!({"ok": false, "error": "no session with the destination", "dest": dest.to_hex()}));
                        continue;
                    }
                    match (self.links.link_peer(&dest), self.router.destination_peer(&dest)) {
                        (Some(_), _) => {
                            let r = match self.links.send(now, &dest, data) {
                                Ok(peer) => json!({"ok": true, "dest": dest.to_hex(), "peer": peer.to_hex()}),
                                Err(e) => json!({"ok": false, "error": e.to_string()}),
                            };
                            let _ = reply.send(r);
                        }
                        (None, Some(peer)) if self.router.resolve(&dest).is_some() => {
                            // Dial (idempotent while a handshake runs), expecting the identity
                            // the destination's announce names.
                            if let Err(e) = self.links.open_link(now, dest, peer) {
                                let _ = reply.send(json!({"ok": false, "error": e.to_string()}));
                                continue;
                            }
                            self.waiters.push(Waiter::Send { dest, data, deadline, reply });
                        }
                        _ => {
                            if self.router.resolve(&dest).is_none() {
                                self.ask_path(now, dest, false);
                            }
                            self.waiters.push(Waiter::Send { dest, data, deadline, reply });
                        }
                    }
                }
            }
        }
    }

    /// Sends what the router and the end-to-end engine produced, handles their events.
    fn flush(&mut self) {
        loop {
            let now = Instant::now();
            let mut progress = false;
            while let Some((dest, payload)) = self.links.poll_payload(now) {
                progress = true;
                // Frames of a link this node dialled are its own; the rest answer a peer
                // whose reply-to destination nobody has proven yet.
                let answer = !self.links.dialled(&dest);
                self.send_or_hold(now, dest, payload, answer);
            }
            while let Some((to, bytes)) = self.router.poll_transmit(now) {
                progress = true;
                let Some((key, tx)) = self.neighbours.get(&to) else { continue };
                let mut msg = Vec::with_capacity(1 + bytes.len());
                msg.push(MSG_MESH);
                msg.extend_from_slice(&bytes);
                if !tx.try_send(key.peer, msg) {
                    self.send_dropped += 1;
                    tracing::trace!(peer = %key.peer, "mesh packet dropped: the neighbour's send queue is full");
                }
            }
            while let Some(ev) = self.router.poll_event() {
                progress = true;
                self.on_mesh_event(now, ev);
            }
            while let Some(u) = self.links.poll_update(now) {
                progress = true;
                self.on_link_update(u);
            }
            if progress {
                self.check_waiters(now);
                self.release_held(now);
            } else {
                break;
            }
        }
    }

    fn on_mesh_event(&mut self, now: Instant, ev: MeshEvent) {
        match ev {
            MeshEvent::PathLearned { dest, peer, next_hop, hops } => {
                let via = self.neighbours.get(&next_hop).map(|(k, _)| k.iface.clone()).unwrap_or_default();
                log_limited!(self.logs.path, info, %dest, %peer, hops, interface = %via, "path learned");
            }
            MeshEvent::PathLost { dest } => {
                log_limited!(self.logs.path, info, %dest, "path lost");
            }
            MeshEvent::Delivered { dest, payload, from } if dest == self.node_dest => self.on_delivered(now, from, &payload),
            MeshEvent::Delivered { dest, .. } => tracing::debug!(%dest, "data for an unused local destination"),
            MeshEvent::Forwarded { dest, payload } => {
                tracing::trace!(%dest, bytes = payload.len(), payload = %hex::encode(&payload), "forwarded");
            }
        }
    }

    /// A payload for the node destination; `from` is the neighbour it came through (its
    /// origin is unknown: payloads are not signed), whose allowances it is charged to.
    fn on_delivered(&mut self, now: Instant, from: Option<NeighbourId>, payload: &[u8]) {
        match payload.split_first() {
            Some((&PROBE, rest)) if rest.len() == 24 => {
                let mut back = [0u8; 16];
                back.copy_from_slice(&rest[8..24]);
                let mut answer = vec![PROBE_REPLY];
                answer.extend_from_slice(&rest[..8]);
                self.send_or_hold(now, DestinationHash(back), answer, true);
            }
            Some((&PROBE_REPLY, rest)) if rest.len() == 8 => {
                let waiters = std::mem::take(&mut self.waiters);
                for w in waiters {
                    match w {
                        Waiter::Probe { dest, id, sent: Some(sent), reply, .. } if id[..] == rest[..] => {
                            let rtt = now.saturating_duration_since(sent);
                            self.router.record_probe(&dest, Some(rtt));
                            let hops = self.router.resolve(&dest).map(|p| p.hops);
                            let _ = reply.send(json!({"ok": true, "dest": dest.to_hex(), "hops": hops, "rtt_ms": rtt.as_secs_f64() * 1e3}));
                        }
                        other => self.waiters.push(other),
                    }
                }
            }
            Some((&KEY_REQUEST, rest)) if rest.len() == 16 => {
                let mut back = [0u8; 16];
                back.copy_from_slice(rest);
                // A 17-byte request draws a 6.4 KB answer towards an unauthenticated
                // reply-to: each reply-to is answered at most once per KEY_ANSWER_EVERY,
                // requests through one neighbour once per 10 s (burst 2), and all of them at
                // most once per second (burst 4): one flooding neighbour spends only its own
                // share.
                let back_dest = DestinationHash(back);
                let recent = self.key_answered.get(&back_dest).is_some_and(|t| *t + KEY_ANSWER_EVERY > now);
                let hop_ok = from.is_none_or(|n| self.key_answers_by_hop.allow(now, &n));
                if recent || !hop_ok || !self.key_answers.allow(now) {
                    tracing::debug!(dest = %back_dest, "key request not answered (rate limit)");
                    return;
                }
                if self.key_answered.len() >= 1024 {
                    self.key_answered.retain(|_, t| *t + KEY_ANSWER_EVERY > now);
                }
                self.key_answered.insert(back_dest, now);
                let mut answer = vec![KEY_RECORD];
                answer.extend_from_slice(&self.node_dest.0);
                answer.extend_from_slice(&self.kem_record);
                self.send_or_hold(now, DestinationHash(back), answer, true);
            }
            Some((&KEY_RECORD, rest)) if rest.len() > 16 => {
                let (d, record) = rest.split_at(16);
                let mut dest = [0u8; 16];
                dest.copy_from_slice(d);
                let dest = DestinationHash(dest);
                // Only records this node asked for are checked (a signature verification
                // each), and only a few per request.
                match self.key_asked.get_mut(&dest) {
                    Some((at, tries)) if *at + KEY_WAIT > now && *tries < KEY_TRIES => *tries += 1,
                    _ => {
                        tracing::debug!(%dest, "unsolicited sealing key record dropped");
                        return;
                    }
                }
                match RemoteKem::from_record(&dest, record) {
                    Ok(k) => {
                        self.key_asked.remove(&dest);
                        while self.remote_kems.len() >= MAX_REMOTE_KEMS {
                            let Some(old) = self.remote_kem_order.pop_front() else { break };
                            self.remote_kems.remove(&old);
                        }
                        tracing::debug!(%dest, "sealing key verified");
                        if self.remote_kems.insert(dest, k).is_none() {
                            self.remote_kem_order.push_back(dest);
                        }
                        self.check_waiters(now);
                    }
                    Err(e) => log_limited!(self.logs.key, warn, %dest, "sealing key refused: {e}"),
                }
            }
            Some((&SEALED, sealed)) => {
                // A decapsulation each: within the allowance of the neighbour it came
                // through and the total.
                let hop_ok = from.is_none_or(|n| self.decaps_by_hop.allow(now, &n));
                if !hop_ok || !self.decaps.allow(now) {
                    tracing::debug!("sealed packet dropped: decapsulation budget spent");
                    return;
                }
                match self.kem.open(&self.node_dest, sealed) {
                    Ok(data) => {
                        let text: String = String::from_utf8_lossy(&data).chars().take(200).collect();
                        log_limited!(self.logs.sealed, info, bytes = data.len(), text = %text, "sealed packet received");
                    }
                    Err(e) => tracing::debug!("sealed packet dropped: {e}"),
                }
            }
            Some((&LINK_FRAME, _)) => {
                if let Err(e) = self.links.handle_payload(now, payload) {
                    tracing::debug!("end-to-end frame dropped: {e}");
                }
            }
            _ => tracing::debug!(bytes = payload.len(), "unknown node payload"),
        }
    }

    fn on_link_update(&mut self, u: LinkUpdate) {
        match u {
            LinkUpdate::Up { dest, peer, mode, initiator } => {
                self.e2e_sessions += 1;
                log_limited!(self.logs.e2e_state, info, %dest, %peer, ?mode, initiator, "end-to-end link up");
            }
            LinkUpdate::Refused { dest, peer } => {
                log_limited!(self.logs.e2e_state, warn, %dest, %peer, "end-to-end link refused: the peer does not own that destination");
            }
            LinkUpdate::Message { dest, peer, data } => {
                let text: String = String::from_utf8_lossy(&data).chars().take(200).collect();
                log_limited!(self.logs.e2e_message, info, %dest, from = %peer, bytes = data.len(), text = %text, "end-to-end message received");
            }
            LinkUpdate::Down { dest, peer } => log_limited!(self.logs.e2e_state, info, %dest, %peer, "end-to-end link down"),
            LinkUpdate::Failed { dest, error } => log_limited!(self.logs.e2e_state, warn, %dest, "end-to-end handshake failed: {error}"),
        }
    }
}

