//! The sans-IO mesh router: announces, the path table, path requests and forwarding.
//!
//! The host tells it which authenticated neighbours exist (QUIC peers and link sessions,
//! each a [`NeighbourId`]), feeds it their mesh packets and the time, and sends what
//! [`Router::poll_transmit`] returns. Routing is destination-sequenced: an announce's origin
//! timestamp orders information about a destination, a newer one always wins, and among
//! copies of the same announce the cheaper path wins. That is DSDV's rule, which keeps the
//! next-hop graph for each destination free of loops once announces have spread.
//!
//! Best path for a destination: the newest announce; among its copies, the lowest cost
//! (sum of per-hop link costs), then fewest hops, then the one heard first.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::identity::{Identity, PeerId, PublicIdentity};
use crate::link::crypto::Rng;

use super::announce::{Announce, AnnounceBody, AnnounceError, CompactAnnounce, ID_LEN};
use super::dest::{DestinationHash, ServiceName};
use super::packet::{Packet, PacketError, TAG_LEN};
use super::store::{AnnounceRecord, PathRecord, Snapshot};

/// A neighbour as the host numbers it (one per authenticated session).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NeighbourId(pub u32);

/// What the router needs to know about a neighbour.
#[derive(Debug, Clone)]
pub struct NeighbourInfo {
    /// Its identity (from the session's handshake).
    pub peer: PeerId,
    /// Send compact announces (constrained hop).
    pub compact: bool,
    /// Cost of this hop (QUIC hops 1; slower links more).
    pub cost: u16,
    /// Announce bytes per second this hop may carry (0: no cap).
    pub announce_rate: u64,
}

/// Settings.
#[derive(Debug, Clone)]
pub struct RouterConfig {
    /// Announces and data travel at most this many hops.
    pub max_hops: u8,
    /// Lifetime of this node's own announces.
    pub announce_lifetime: Duration,
    /// Per-identity rate limit on new announces: a bucket of `identity_burst` refilled at
    /// one per `identity_interval`.
    pub identity_interval: Duration,
    /// Burst of the per-identity bucket.
    pub identity_burst: u32,
    /// Accept announces timestamped at most this far in the future (clock skew).
    pub max_skew: Duration,
    /// Most destinations in the path table.
    pub max_paths: usize,
    /// Most announce ids and request tags remembered for duplicate suppression.
    pub max_seen: usize,
    /// Most cached public keys.
    pub max_keys: usize,
    /// Most announces queued per neighbour behind its cap.
    pub max_queue: usize,
    /// How long a path request is remembered (to route its answer back).
    pub request_lifetime: Duration,
    /// Send a new neighbour every announce this node holds a path for. Off, a neighbour
    /// learns only from new announces and path requests.
    pub replay_on_connect: bool,
    /// Emit [`MeshEvent::Forwarded`] for every relayed data packet (diagnostics).
    pub report_forwarded: bool,
    /// Path requests per second accepted from one neighbour.
    pub request_rate: f64,
    /// Burst of that allowance.
    pub request_burst: u32,
}

impl Default for RouterConfig {
    fn default() -> Self {
        RouterConfig {
            max_hops: 32,
            announce_lifetime: Duration::from_secs(3600),
            identity_interval: Duration::from_secs(60),
            identity_burst: 4,
            max_skew: Duration::from_secs(600),
            max_paths: 100_000,
            max_seen: 200_000,
            max_keys: 4096,
            max_queue: 256,
            request_lifetime: Duration::from_secs(60),
            replay_on_connect: true,
            report_forwarded: false,
            request_rate: 2.0,
            request_burst: 20,
        }
    }
}

/// One entry of the path table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathEntry {
    /// Where to send packets for the destination.
    pub next_hop: NeighbourId,
    /// Hops to the destination.
    pub hops: u8,
    /// Path cost to the destination.
    pub cost: u16,
    /// The announce's origin timestamp (its sequence number).
    pub timestamp_ms: u64,
    /// When the path was learnt.
    pub learned: Instant,
    /// When it expires.
    pub expires: Instant,
    /// Smoothed round trip (7/8 old + 1/8 new), once probed.
    pub rtt: Option<Duration>,
    /// Smoothed probe loss in per mille (7/8 old + 1/8 new); 0 until probed.
    pub loss_permille: u16,
    /// The announce came in full and its signature was checked here.
    pub verified: bool,
}

/// Something the host or application should know.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum MeshEvent {
    /// A path to a destination was learnt or changed.
    PathLearned {
        /// Destination.
        dest: DestinationHash,
        /// Its identity.
        peer: PeerId,
        /// Next hop.
        next_hop: NeighbourId,
        /// Hops.
        hops: u8,
    },
    /// A path expired or its next hop went away.
    PathLost {
        /// Destination.
        dest: DestinationHash,
    },
    /// A data packet was forwarded (only with `report_forwarded`, for diagnostics).
    Forwarded {
        /// Destination.
        dest: DestinationHash,
        /// The payload as relayed.
        payload: Vec<u8>,
    },
    /// Data for one of this node's destinations.
    Delivered {
        /// Destination (local).
        dest: DestinationHash,
        /// Payload.
        payload: Vec<u8>,
    },
}

/// Why a packet was dropped. The router carries on; this is for counters, logs, tests.
#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum DropReason {
    /// Not a mesh packet.
    #[error(transparent)]
    Packet(#[from] PacketError),
    /// The announce is invalid.
    #[error(transparent)]
    Announce(#[from] AnnounceError),
    /// From a neighbour the router does not know.
    #[error("packet from unknown neighbour {0:?}")]
    UnknownNeighbour(NeighbourId),
    /// Seen before.
    #[error("duplicate")]
    Duplicate,
    /// Older than what is known for the destination (a replay, or stale).
    #[error("stale announce for {0}")]
    Stale(DestinationHash),
    /// Past its expiry.
    #[error("expired announce for {0}")]
    Expired(DestinationHash),
    /// Timestamped too far in the future.
    #[error("announce for {0} from the future")]
    FromFuture(DestinationHash),
    /// The identity exceeded its announce rate.
    #[error("announce rate limit for {0}")]
    RateLimited(PeerId),
    /// Too many hops.
    #[error("hop limit")]
    HopLimit,
    /// A copy of an announce whose path was lost, no cheaper than before the loss: it may
    /// lead back through this node (feasibility condition).
    #[error("infeasible path to {0}")]
    Infeasible(DestinationHash),
    /// The neighbour exceeded its path-request rate.
    #[error("path request rate limit")]
    RequestRateLimited,
    /// This node's own announce came back.
    #[error("own announce reflected")]
    Reflected,
    /// Data with no path onward.
    #[error("no path to {0}")]
    NoPath(DestinationHash),
    /// The path points back where the packet came from.
    #[error("loop towards {0}")]
    Loop(DestinationHash),
}

impl DropReason {
    /// Whether the packet proves its sender forged it: a full announce whose signature or
    /// key is wrong, or an announce (either form) for a destination not bound to its
    /// identity. Honest nodes check all of these before they relay, so such a packet was
    /// made by the neighbour it came from.
    pub fn is_forgery(&self) -> bool {
        matches!(
            self,
            DropReason::Announce(AnnounceError::BadSignature(_) | AnnounceError::KeyMismatch(_) | AnnounceError::Binding { .. })
        )
    }
}

/// Why `send_to` failed.
#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum SendToError {
    /// No path is known; call `request_path` and wait for `PathLearned`.
    #[error("no path to {0}")]
    NoPath(DestinationHash),
}

/// Why `announce` failed.
#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum AnnounceSendError {
    /// The destination is not registered here.
    #[error("{0} is not a local destination")]
    NotLocal(DestinationHash),
    /// Building the announce failed.
    #[error(transparent)]
    Announce(#[from] AnnounceError),
}

/// Counters.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RouterStats {
    /// Packets handled.
    pub packets_in: u64,
    /// Packets sent.
    pub packets_out: u64,
    /// Announce bytes sent.
    pub announce_bytes_out: u64,
    /// Packets dropped, any reason.
    pub dropped: u64,
    /// Announces dropped by the per-identity rate limit.
    pub rate_limited: u64,
    /// Announce signatures verified.
    pub verified: u64,
    /// Data packets forwarded.
    pub forwarded: u64,
}

struct Neighbour {
    info: NeighbourInfo,
    tokens: f64,
    refilled: Instant,
    queue: VecDeque<Vec<u8>>,
}

struct Cached {
    full: Option<Announce>,
    body: AnnounceBody,
    id: [u8; ID_LEN],
    /// The compact form, encoded once.
    compact: Vec<u8>,
}

struct Bucket {
    tokens: f64,
    at: Instant,
}

struct Local {
    service: ServiceName,
    app_data: Vec<u8>,
}

struct Bounded<T: std::hash::Hash + Eq + Copy> {
    set: HashSet<T>,
    order: VecDeque<T>,
    max: usize,
}

impl<T: std::hash::Hash + Eq + Copy> Bounded<T> {
    fn new(max: usize) -> Self {
        Bounded { set: HashSet::new(), order: VecDeque::new(), max }
    }

    /// Inserts; returns false if present. Forgets the oldest beyond `max`.
    fn insert(&mut self, v: T) -> bool {
        if !self.set.insert(v) {
            return false;
        }
        self.order.push_back(v);
        while self.order.len() > self.max {
            if let Some(old) = self.order.pop_front() {
                self.set.remove(&old);
            }
        }
        true
    }
}

/// The router of one node.
pub struct Router {
    me: Arc<Identity>,
    cfg: RouterConfig,
    rng: Rng,
    /// Unix time in ms at `base`.
    base_ms: u64,
    base: Instant,
    neighbours: HashMap<NeighbourId, Neighbour>,
    paths: HashMap<DestinationHash, PathEntry>,
    cache: HashMap<DestinationHash, Cached>,
    keys: HashMap<PeerId, PublicIdentity>,
    key_order: VecDeque<PeerId>,
    seen: Bounded<[u8; ID_LEN]>,
    tags: Bounded<[u8; TAG_LEN]>,
    requests: HashMap<[u8; TAG_LEN], (Option<NeighbourId>, Instant)>,
    rate: HashMap<PeerId, Bucket>,
    local: HashMap<DestinationHash, Local>,
    out: VecDeque<(NeighbourId, Vec<u8>)>,
    events: VecDeque<MeshEvent>,
    stats: RouterStats,
    /// Paths loaded from the store, by next-hop identity, waiting for that neighbour.
    restored: HashMap<PeerId, Vec<PathRecord>>,
    /// This node's latest announce per local destination, replayed to new neighbours.
    own: HashMap<DestinationHash, Announce>,
    /// For destinations whose path was lost: the announce timestamp and cost it had.
    feasible: HashMap<DestinationHash, (u64, u16)>,
    /// Per-neighbour path-request allowance.
    request_tokens: HashMap<NeighbourId, Bucket>,
}

impl Router {
    /// A router for `me`. `clock` pairs an instant with the Unix time in ms at that
    /// instant (announce timestamps are wall-clock; everything else runs on `Instant`).
    pub fn new(me: Arc<Identity>, cfg: RouterConfig, clock: (Instant, u64), seed: [u8; 32]) -> Router {
        Router {
            me,
            rng: Rng::from_seed(seed),
            base: clock.0,
            base_ms: clock.1,
            neighbours: HashMap::new(),
            paths: HashMap::new(),
            cache: HashMap::new(),
            keys: HashMap::new(),
            key_order: VecDeque::new(),
            seen: Bounded::new(cfg.max_seen),
            tags: Bounded::new(cfg.max_seen),
            requests: HashMap::new(),
            rate: HashMap::new(),
            local: HashMap::new(),
            out: VecDeque::new(),
            events: VecDeque::new(),
            stats: RouterStats::default(),
            restored: HashMap::new(),
            own: HashMap::new(),
            feasible: HashMap::new(),
            request_tokens: HashMap::new(),
            cfg,
        }
    }

    fn unix_ms(&self, now: Instant) -> u64 {
        self.base_ms.saturating_add(now.saturating_duration_since(self.base).as_millis() as u64)
    }

    fn instant_of(&self, ms: u64) -> Instant {
        self.base + Duration::from_millis(ms.saturating_sub(self.base_ms))
    }

    /// This node's id.
    pub fn peer_id(&self) -> PeerId {
        self.me.peer_id()
    }

    /// Counters.
    pub fn stats(&self) -> RouterStats {
        self.stats.clone()
    }

    /// A neighbour came up (an authenticated session). It is sent this node's announces
    /// and every announce this node holds a path for (so it can route at once), and stored
    /// paths through it come back.
    pub fn add_neighbour(&mut self, now: Instant, id: NeighbourId, mut info: NeighbourInfo) {
        // Every hop costs something: a zero-cost hop would break the loop-freedom argument.
        info.cost = info.cost.max(1);
        let peer = info.peer;
        // Starts with one second's allowance, so the first announces go at once.
        let tokens = info.announce_rate as f64;
        self.neighbours.insert(id, Neighbour { info, tokens, refilled: now, queue: VecDeque::new() });
        let own: Vec<Announce> = self.own.values().cloned().collect();
        for a in &own {
            self.queue_announce(id, a, None, 0, 0);
        }
        if self.cfg.replay_on_connect {
            // Not the neighbour's own destinations, nor paths that lead through it.
            let known: Vec<(DestinationHash, u8, u16)> = self
                .paths
                .iter()
                .filter(|(d, p)| p.next_hop != id && self.cache.get(*d).is_none_or(|c| c.body.peer != peer))
                .map(|(d, p)| (*d, p.hops, p.cost))
                .collect();
            for (d, hops, cost) in known {
                self.forward_cached(id, &d, hops, cost, None);
            }
        }
        if let Some(records) = self.restored.remove(&peer) {
            let now_ms = self.unix_ms(now);
            for r in records {
                let newer_known = self.paths.get(&r.dest).is_some_and(|p| p.timestamp_ms > r.timestamp_ms);
                if r.expires_ms <= now_ms || newer_known || !self.better_or_absent(&r.dest, r.cost, r.hops, r.timestamp_ms) {
                    continue;
                }
                let entry = PathEntry {
                    next_hop: id,
                    hops: r.hops,
                    cost: r.cost,
                    timestamp_ms: r.timestamp_ms,
                    learned: now,
                    expires: self.instant_of(r.expires_ms),
                    rtt: None,
                    loss_permille: 0,
                    verified: r.verified,
                };
                self.paths.insert(r.dest, entry);
                let dest_peer = self.cache.get(&r.dest).map_or(peer, |c| c.body.peer);
                self.events.push_back(MeshEvent::PathLearned { dest: r.dest, peer: dest_peer, next_hop: id, hops: r.hops });
                // Back in the table: tell the other neighbours, as for a fresh announce.
                let others: Vec<NeighbourId> = self.neighbours.keys().copied().filter(|n| *n != id).collect();
                for n in others {
                    self.forward_cached(n, &r.dest, r.hops, r.cost, None);
                }
            }
        }
    }

    fn better_or_absent(&self, dest: &DestinationHash, cost: u16, hops: u8, ts: u64) -> bool {
        self.paths.get(dest).is_none_or(|p| ts > p.timestamp_ms || (ts == p.timestamp_ms && (cost, hops) < (p.cost, p.hops)))
    }

    /// The state to persist: paths (by next-hop identity), announces and known keys.
    pub fn snapshot(&self, now: Instant) -> Snapshot {
        let _ = now;
        let mut snap = Snapshot::default();
        for (dest, p) in &self.paths {
            let Some(n) = self.neighbours.get(&p.next_hop) else { continue };
            snap.paths.push(PathRecord {
                dest: *dest,
                next_hop: n.info.peer,
                hops: p.hops,
                cost: p.cost,
                timestamp_ms: p.timestamp_ms,
                expires_ms: self.unix_ms(p.expires),
                verified: p.verified,
            });
        }
        // Restored paths whose neighbour has not come back yet are kept too.
        for records in self.restored.values() {
            snap.paths.extend(records.iter().cloned());
        }
        for (dest, c) in &self.cache {
            snap.announces.push(AnnounceRecord { dest: *dest, compact: c.compact.clone(), full: c.full.as_ref().map(|a| a.encode(None)) });
        }
        snap.keys = self.keys.values().cloned().collect();
        snap
    }

    /// Loads persisted state (at start). Announces are checked again (binding, expiry, and
    /// the signature of full forms); paths wait for their next hop to come back.
    pub fn restore(&mut self, now: Instant, snap: Snapshot) {
        let now_ms = self.unix_ms(now);
        for k in snap.keys {
            self.add_known_key(k);
        }
        for a in snap.announces {
            let Ok(c) = CompactAnnounce::decode(&a.compact) else { continue };
            if c.body.dest != a.dest || c.body.expires_ms() <= now_ms {
                continue;
            }
            let keys = &self.keys;
            let full = a
                .full
                .and_then(|f| Announce::decode_verify(&f, |p| keys.get(p).cloned()).ok())
                .map(|(x, _)| x)
                .filter(|x| x.id() == c.id);
            self.seen.insert(c.id);
            if self.cache.len() < self.cfg.max_paths {
                self.cache.insert(a.dest, Cached { full, body: c.body, id: c.id, compact: a.compact });
            }
        }
        for p in snap.paths {
            if p.expires_ms > now_ms {
                self.restored.entry(p.next_hop).or_default().push(p);
            }
        }
        let up: Vec<(NeighbourId, PeerId)> = self.neighbours.iter().map(|(id, n)| (*id, n.info.peer)).collect();
        for (id, peer) in up {
            if let Some(info) = self.neighbours.get(&id).map(|n| n.info.clone()) {
                if self.restored.contains_key(&peer) {
                    self.add_neighbour(now, id, info);
                }
            }
        }
    }

    /// A neighbour went away: paths through it are lost.
    pub fn remove_neighbour(&mut self, id: NeighbourId) {
        self.neighbours.remove(&id);
        let lost: Vec<DestinationHash> = self.paths.iter().filter(|(_, p)| p.next_hop == id).map(|(d, _)| *d).collect();
        for d in lost {
            if let Some(p) = self.paths.remove(&d) {
                self.feasible.insert(d, (p.timestamp_ms, p.cost));
            }
            self.events.push_back(MeshEvent::PathLost { dest: d });
        }
        self.out.retain(|(n, _)| *n != id);
        self.request_tokens.remove(&id);
    }

    /// Registers a local destination for `service`; returns its hash.
    pub fn register_destination(&mut self, service: ServiceName, app_data: Vec<u8>) -> DestinationHash {
        let d = DestinationHash::new(&self.me.peer_id(), &service);
        self.local.insert(d, Local { service, app_data });
        d
    }

    /// Records a probe of `dest`'s path: its round trip, or `None` when it went unanswered.
    /// Kept as smoothed figures on the path entry, for operators (`antmesh paths`); the best
    /// path is still chosen by announce age, cost and hops.
    pub fn record_probe(&mut self, dest: &DestinationHash, rtt: Option<Duration>) {
        let Some(p) = self.paths.get_mut(dest) else { return };
        let lost = if rtt.is_some() { 0u32 } else { 1000 };
        p.loss_permille = ((u32::from(p.loss_permille) * 7 + lost) / 8) as u16;
        if let Some(r) = rtt {
            p.rtt = Some(match p.rtt {
                Some(old) => (old * 7 + r) / 8,
                None => r,
            });
        }
    }

    /// The path to `dest`, if known.
    pub fn resolve(&self, dest: &DestinationHash) -> Option<&PathEntry> {
        self.paths.get(dest)
    }

    /// The identity behind a destination, when an announce for it was seen.
    pub fn destination_peer(&self, dest: &DestinationHash) -> Option<PeerId> {
        self.cache.get(dest).map(|c| c.body.peer)
    }

    /// The whole table.
    pub fn paths(&self) -> impl Iterator<Item = (&DestinationHash, &PathEntry)> {
        self.paths.iter()
    }

    /// Caches a public key (announces from its owner may then omit it).
    pub fn add_known_key(&mut self, key: PublicIdentity) {
        let id = key.peer_id();
        if self.keys.insert(id, key).is_none() {
            self.key_order.push_back(id);
            while self.keys.len() > self.cfg.max_keys {
                let Some(old) = self.key_order.pop_front() else { break };
                self.keys.remove(&old);
            }
        }
    }

    /// Announces a local destination to every neighbour.
    pub fn announce(&mut self, now: Instant, dest: &DestinationHash) -> Result<(), AnnounceSendError> {
        let local = self.local.get(dest).ok_or(AnnounceSendError::NotLocal(*dest))?;
        let body = AnnounceBody {
            dest: *dest,
            service: local.service.hash(),
            peer: self.me.peer_id(),
            timestamp_ms: self.unix_ms(now),
            nonce: self.rng.bytes(),
            lifetime_s: self.cfg.announce_lifetime.as_secs().min(u64::from(u32::MAX)) as u32,
            app_data: local.app_data.clone(),
        };
        let a = Announce::sign(&self.me, body)?;
        self.seen.insert(a.id());
        let ids: Vec<NeighbourId> = self.neighbours.keys().copied().collect();
        for n in ids {
            self.queue_announce(n, &a, None, 0, 0);
        }
        self.own.insert(*dest, a);
        Ok(())
    }

    /// Asks the neighbours for a path to `dest` (answered from caches on the way).
    pub fn request_path(&mut self, now: Instant, dest: DestinationHash) {
        let tag: [u8; TAG_LEN] = self.rng.bytes();
        self.tags.insert(tag);
        self.requests.insert(tag, (None, now + self.cfg.request_lifetime));
        let pkt = Packet::PathRequest { tag, dest, hops: 0 }.encode();
        for &n in self.neighbours.keys() {
            self.out.push_back((n, pkt.clone()));
        }
    }

    /// Sends `payload` towards `dest` along the path table.
    pub fn send_to(&mut self, dest: DestinationHash, payload: &[u8]) -> Result<(), SendToError> {
        if self.local.contains_key(&dest) {
            self.events.push_back(MeshEvent::Delivered { dest, payload: payload.to_vec() });
            return Ok(());
        }
        let p = self.paths.get(&dest).ok_or(SendToError::NoPath(dest))?;
        self.out.push_back((p.next_hop, Packet::Data { dest, hops: 0, payload }.encode()));
        Ok(())
    }

    /// Handles one packet from neighbour `from`.
    pub fn handle_packet(&mut self, now: Instant, from: NeighbourId, bytes: &[u8]) -> Result<(), DropReason> {
        self.stats.packets_in += 1;
        let r = self.dispatch(now, from, bytes);
        if r.is_err() {
            self.stats.dropped += 1;
        }
        r
    }

    fn dispatch(&mut self, now: Instant, from: NeighbourId, bytes: &[u8]) -> Result<(), DropReason> {
        if !self.neighbours.contains_key(&from) {
            return Err(DropReason::UnknownNeighbour(from));
        }
        match Packet::decode(bytes)? {
            Packet::Announce { compact, hops, cost, response, bytes } => self.on_announce(now, from, compact, hops, cost, response, bytes),
            Packet::PathRequest { tag, dest, hops } => self.on_path_request(now, from, tag, dest, hops),
            Packet::Data { dest, hops, payload } => self.on_data(from, dest, hops, payload),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn on_announce(
        &mut self,
        now: Instant,
        from: NeighbourId,
        compact: bool,
        hops: u8,
        cost: u16,
        response: Option<[u8; TAG_LEN]>,
        bytes: &[u8],
    ) -> Result<(), DropReason> {
        if hops >= self.cfg.max_hops {
            return Err(DropReason::HopLimit);
        }
        // A compact announce is taken on the word of the (authenticated) neighbour: a node
        // that learnt an announce over a constrained hop has only the compact form to pass
        // on, whatever the next hop. Paths from it stay marked unverified.
        // Parse without the signature check first, so that duplicates (by id) and stale
        // announces never cost a verification.
        let (body, id, full_bytes) = if compact {
            // Checks the destination binding too.
            let c = CompactAnnounce::decode(bytes)?;
            (c.body, c.id, None)
        } else {
            let (body, flags, n) = AnnounceBody::decode(bytes)?;
            body.check_binding()?;
            let key_len = if flags & super::announce::KEY != 0 { crate::identity::PUBLIC_KEY_LEN } else { 0 };
            let sig = bytes.get(n + key_len..).ok_or(AnnounceError::Malformed { len: bytes.len() })?;
            let d = crate::link::crypto::hash(&[&body.encode(0), sig]);
            let mut id = [0u8; ID_LEN];
            id.copy_from_slice(&d[..ID_LEN]);
            (body, id, Some(bytes))
        };
        if body.peer == self.me.peer_id() {
            return Err(DropReason::Reflected);
        }
        let now_ms = self.unix_ms(now);
        if body.expires_ms() <= now_ms {
            return Err(DropReason::Expired(body.dest));
        }
        if body.timestamp_ms > now_ms.saturating_add(self.cfg.max_skew.as_millis() as u64) {
            return Err(DropReason::FromFuture(body.dest));
        }
        let hop_cost = self.neighbours.get(&from).map_or(1, |n| n.info.cost);
        let new_hops = hops.saturating_add(1);
        let new_cost = cost.saturating_add(hop_cost);
        let known = self.cache.get(&body.dest).map(|c| (c.body.timestamp_ms, c.id));
        let fresh = match known {
            Some((ts, _)) if body.timestamp_ms < ts => return Err(DropReason::Stale(body.dest)),
            Some((ts, kid)) if body.timestamp_ms == ts => {
                if kid != id {
                    // Two different announces with one timestamp: keep the first.
                    return Err(DropReason::Stale(body.dest));
                }
                false
            }
            _ => true,
        };
        // A full copy of an announce held only in compact form is worth verifying.
        let upgrade = full_bytes.is_some() && self.cache.get(&body.dest).is_some_and(|c| c.id == id && c.full.is_none());
        if !fresh && response.is_none() && !self.seen.insert(id) && !self.better(&body.dest, new_cost, new_hops) && !upgrade {
            return Err(DropReason::Duplicate);
        }
        // Feasibility (as in Babel): after the path to a destination was lost, a copy of
        // the same announce is taken only from a neighbour whose own cost is below what
        // this node's cost was; any other neighbour may be routing through this node.
        if !fresh && !self.paths.contains_key(&body.dest) {
            if let Some(&(ts, fd)) = self.feasible.get(&body.dest) {
                if ts == body.timestamp_ms && cost >= fd {
                    return Err(DropReason::Infeasible(body.dest));
                }
            }
        }
        // Verify the full form once per announce id, and before the rate limit, so that
        // forged announces cannot spend an identity's allowance.
        let mut full = None;
        if let Some(b) = full_bytes {
            let cached_full = self.cache.get(&body.dest).and_then(|c| c.full.clone()).filter(|a| a.id() == id);
            match cached_full {
                Some(a) => full = Some(a),
                None => {
                    let keys = &self.keys;
                    let (a, key) = Announce::decode_verify(b, |p| keys.get(p).cloned())?;
                    self.stats.verified += 1;
                    self.add_known_key(key);
                    full = Some(a);
                }
            }
        }
        if fresh && !self.take_identity_token(now, body.peer) {
            self.stats.rate_limited += 1;
            return Err(DropReason::RateLimited(body.peer));
        }
        self.seen.insert(id);
        let verified = full.is_some() || self.cache.get(&body.dest).is_some_and(|c| c.id == id && c.full.is_some());
        let expires = self.instant_of(body.expires_ms());
        let entry = PathEntry {
            next_hop: from,
            hops: new_hops,
            cost: new_cost,
            timestamp_ms: body.timestamp_ms,
            learned: now,
            expires,
            rtt: None,
            loss_permille: 0,
            verified,
        };
        let dest = body.dest;
        let peer = body.peer;
        if fresh {
            self.feasible.remove(&dest);
        }
        let install = fresh || self.better(&dest, new_cost, new_hops) || (upgrade && self.paths.get(&dest).is_some_and(|p| p.next_hop == from));
        if install && !self.paths.contains_key(&dest) && self.paths.len() >= self.cfg.max_paths {
            // Full: the path closest to expiry makes room.
            if let Some(victim) = self.paths.iter().min_by_key(|(_, p)| p.expires).map(|(d, _)| *d) {
                self.paths.remove(&victim);
                self.cache.remove(&victim);
                self.events.push_back(MeshEvent::PathLost { dest: victim });
            }
        }
        if install {
            self.paths.insert(dest, entry);
            self.events.push_back(MeshEvent::PathLearned { dest, peer, next_hop: from, hops: new_hops });
        }
        if fresh || full.is_some() {
            let keep_full = full.or_else(|| self.cache.get(&dest).and_then(|c| c.full.clone()).filter(|a| a.id() == id));
            if self.cache.contains_key(&dest) || self.cache.len() < self.cfg.max_paths {
                let mut compact = body.encode(0);
                compact.extend_from_slice(&id);
                self.cache.insert(dest, Cached { full: keep_full, body, id, compact });
            }
        }
        // Onward: a response travels back along its request; anything else that changed
        // the path floods to every other neighbour; a copy that changed nothing stops here.
        match response {
            Some(tag) => {
                // The first answer to a request is routed back and the request is done;
                // later answers (over other paths) stop here. Ours ends here too: the
                // PathLearned event above is the answer.
                if let Some((Some(back), _)) = self.requests.remove(&tag) {
                    // Only an answer this node would route by itself goes back.
                    if back != from && self.paths.contains_key(&dest) {
                        self.forward_cached(back, &dest, new_hops, new_cost, Some(tag));
                    }
                }
            }
            // A fresh announce, or a cheaper path for a known one (so that cheaper paths
            // spread as DSDV's do; each re-send strictly lowers the cost, so it ends).
            None if install => {
                let others: Vec<NeighbourId> = self.neighbours.keys().copied().filter(|n| *n != from).collect();
                for n in others {
                    self.forward_cached(n, &dest, new_hops, new_cost, None);
                }
            }
            None => {}
        }
        Ok(())
    }

    /// Whether a path of `cost`/`hops` beats the current one for `dest`.
    fn better(&self, dest: &DestinationHash, cost: u16, hops: u8) -> bool {
        self.paths.get(dest).is_none_or(|p| (cost, hops) < (p.cost, p.hops))
    }

    fn take_identity_token(&mut self, now: Instant, peer: PeerId) -> bool {
        let (burst, interval) = (f64::from(self.cfg.identity_burst), self.cfg.identity_interval.as_secs_f64().max(1e-9));
        let b = self.rate.entry(peer).or_insert(Bucket { tokens: burst, at: now });
        b.tokens = (b.tokens + now.saturating_duration_since(b.at).as_secs_f64() / interval).min(burst);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    fn forward_cached(&mut self, to: NeighbourId, dest: &DestinationHash, hops: u8, cost: u16, response: Option<[u8; TAG_LEN]>) {
        let Some(c) = self.cache.get(dest) else { return };
        let compact_to = self.neighbours.get(&to).is_none_or(|n| n.info.compact);
        let bytes = match (&c.full, compact_to) {
            (Some(a), false) => {
                let key = self.keys.get(&a.body.peer);
                Packet::Announce { compact: false, hops, cost, response, bytes: &a.encode(key) }.encode()
            }
            (_, true) | (None, _) => Packet::Announce { compact: true, hops, cost, response, bytes: &c.compact }.encode(),
        };
        self.enqueue_announce(to, bytes);
    }

    fn queue_announce(&mut self, to: NeighbourId, a: &Announce, response: Option<[u8; TAG_LEN]>, hops: u8, cost: u16) {
        let compact_to = self.neighbours.get(&to).is_none_or(|n| n.info.compact);
        let bytes = if compact_to {
            Packet::Announce { compact: true, hops, cost, response, bytes: &a.encode_compact() }.encode()
        } else {
            Packet::Announce { compact: false, hops, cost, response, bytes: &a.encode(Some(self.me.public())) }.encode()
        };
        self.enqueue_announce(to, bytes);
    }

    fn enqueue_announce(&mut self, to: NeighbourId, bytes: Vec<u8>) {
        let max = self.cfg.max_queue;
        let Some(n) = self.neighbours.get_mut(&to) else { return };
        if n.info.announce_rate == 0 {
            self.stats.announce_bytes_out += bytes.len() as u64;
            self.out.push_back((to, bytes));
            return;
        }
        if n.queue.len() >= max {
            // Behind the cap the oldest announce is the least useful.
            n.queue.pop_front();
        }
        n.queue.push_back(bytes);
    }

    fn on_path_request(&mut self, now: Instant, from: NeighbourId, tag: [u8; TAG_LEN], dest: DestinationHash, hops: u8) -> Result<(), DropReason> {
        if !self.tags.insert(tag) {
            return Err(DropReason::Duplicate);
        }
        // Each request floods and may cost a signature: a neighbour gets a bucket of
        // `request_burst`, refilled at `request_rate` per second.
        let (burst, rate) = (f64::from(self.cfg.request_burst), self.cfg.request_rate);
        let b = self.request_tokens.entry(from).or_insert(Bucket { tokens: burst, at: now });
        b.tokens = (b.tokens + now.saturating_duration_since(b.at).as_secs_f64() * rate).min(burst);
        b.at = now;
        if b.tokens < 1.0 {
            return Err(DropReason::RequestRateLimited);
        }
        b.tokens -= 1.0;
        if hops >= self.cfg.max_hops {
            return Err(DropReason::HopLimit);
        }
        self.requests.insert(tag, (Some(from), now + self.cfg.request_lifetime));
        if self.local.contains_key(&dest) {
            // Answer with a fresh announce of our own, back to the asker only.
            let local = self.local.get(&dest).map(|l| (l.service.hash(), l.app_data.clone()));
            if let Some((service, app_data)) = local {
                let body = AnnounceBody {
                    dest,
                    service,
                    peer: self.me.peer_id(),
                    timestamp_ms: self.unix_ms(now),
                    nonce: self.rng.bytes(),
                    lifetime_s: self.cfg.announce_lifetime.as_secs().min(u64::from(u32::MAX)) as u32,
                    app_data,
                };
                if let Ok(a) = Announce::sign(&self.me, body) {
                    self.seen.insert(a.id());
                    self.queue_announce(from, &a, Some(tag), 0, 0);
                }
            }
            return Ok(());
        }
        if let Some(p) = self.paths.get(&dest).cloned() {
            // Answer from the cache with the signed material (or the compact form if that is
            // all this node holds; the asker is an authenticated neighbour either way).
            if p.next_hop != from {
                self.forward_cached(from, &dest, p.hops, p.cost, Some(tag));
                return Ok(());
            }
        }
        let pkt = Packet::PathRequest { tag, dest, hops: hops + 1 }.encode();
        let others: Vec<NeighbourId> = self.neighbours.keys().copied().filter(|n| *n != from).collect();
        for n in others {
            self.out.push_back((n, pkt.clone()));
        }
        Ok(())
    }

    fn on_data(&mut self, from: NeighbourId, dest: DestinationHash, hops: u8, payload: &[u8]) -> Result<(), DropReason> {
        if self.local.contains_key(&dest) {
            self.events.push_back(MeshEvent::Delivered { dest, payload: payload.to_vec() });
            return Ok(());
        }
        if hops.saturating_add(1) >= self.cfg.max_hops {
            return Err(DropReason::HopLimit);
        }
        let p = self.paths.get(&dest).ok_or(DropReason::NoPath(dest))?;
        if p.next_hop == from {
            return Err(DropReason::Loop(dest));
        }
        self.stats.forwarded += 1;
        self.out.push_back((p.next_hop, Packet::Data { dest, hops: hops + 1, payload }.encode()));
        if self.cfg.report_forwarded {
            self.events.push_back(MeshEvent::Forwarded { dest, payload: payload.to_vec() });
        }
        Ok(())
    }

    /// Expires paths, requests and rate buckets.
    pub fn handle_timeout(&mut self, now: Instant) {
        let expired: Vec<DestinationHash> = self.paths.iter().filter(|(_, p)| p.expires <= now).map(|(d, _)| *d).collect();
        for d in expired {
            self.paths.remove(&d);
            self.cache.remove(&d);
            self.events.push_back(MeshEvent::PathLost { dest: d });
        }
        self.requests.retain(|_, (_, until)| *until > now);
        // Announces whose path went away with a neighbour expire here too.
        let now_ms = self.unix_ms(now);
        let dead: Vec<DestinationHash> = self.cache.iter().filter(|(_, c)| c.body.expires_ms() <= now_ms).map(|(d, _)| *d).collect();
        for d in dead {
            self.cache.remove(&d);
            self.feasible.remove(&d);
        }
        let full = f64::from(self.cfg.identity_burst);
        let interval = self.cfg.identity_interval.as_secs_f64().max(1e-9);
        self.rate.retain(|_, b| b.tokens + now.saturating_duration_since(b.at).as_secs_f64() / interval < full);
    }

    /// The next instant `handle_timeout` or `poll_transmit` has work.
    pub fn poll_timeout(&self, now: Instant) -> Option<Instant> {
        let mut t = self.paths.values().map(|p| p.expires).min();
        for n in self.neighbours.values() {
            if n.info.announce_rate > 0 {
                if let Some(front) = n.queue.front() {
                    let need = front.len() as f64 - n.tokens;
                    let at = n.refilled + Duration::from_secs_f64((need / n.info.announce_rate as f64).max(0.0));
                    t = Some(t.map_or(at, |x| x.min(at)));
                }
            }
        }
        if let Some(r) = self.requests.values().map(|(_, u)| *u).min() {
            t = Some(t.map_or(r, |x| x.min(r)));
        }
        t.map(|x| x.max(now))
    }

    /// The next packet to send.
    pub fn poll_transmit(&mut self, now: Instant) -> Option<(NeighbourId, Vec<u8>)> {
        if let Some(p) = self.out.pop_front() {
            self.stats.packets_out += 1;
            return Some(p);
        }
        let mut ids: Vec<NeighbourId> = self.neighbours.keys().copied().collect();
        ids.sort();
        for id in ids {
            let Some(n) = self.neighbours.get_mut(&id) else { continue };
            let Some(front) = n.queue.front() else { continue };
            if n.info.announce_rate > 0 {
                // Token bucket in bytes, at most one second of burst.
                let rate = n.info.announce_rate as f64;
                n.tokens = (n.tokens + now.saturating_duration_since(n.refilled).as_secs_f64() * rate).min(rate.max(front.len() as f64));
                n.refilled = now;
                if n.tokens < front.len() as f64 {
                    continue;
                }
                n.tokens -= front.len() as f64;
            }
            if let Some(b) = n.queue.pop_front() {
                self.stats.packets_out += 1;
                self.stats.announce_bytes_out += b.len() as u64;
                return Some((id, b));
            }
        }
        None
    }

    /// The next event.
    pub fn poll_event(&mut self) -> Option<MeshEvent> {
        self.events.pop_front()
    }
}
