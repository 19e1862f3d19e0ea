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
//!
//! **Neighbours are not trusted.** Anyone can become one, so every table has a bound and
//! every neighbour a budget: new announces per second, signature verifications per second
//! (and a total), unverified destinations it may introduce, path requests per second.
//! Lifetimes are capped (`max_lifetime`). An unverified (compact) announce never replaces a
//! verified one, and when the table is full, unverified and path-less destinations go
//! first. What a new neighbour is sent of the table is bounded and paced. Timers and
//! evictions use ordered indexes, so work per event does not grow with the table.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::budget::{KeyedLimiter, Limiter};
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
    /// Longest announce lifetime honoured: an announce claiming more expires this long
    /// after its timestamp.
    pub max_lifetime: Duration,
    /// Most destinations kept without a path (unverified ones are dropped first).
    pub max_pathless: usize,
    /// Most unverified (compact) destinations one neighbour may have introduced.
    pub max_unverified_per_neighbour: usize,
    /// New announces (a new destination, or a newer timestamp) accepted per second from
    /// one neighbour.
    pub neighbour_announce_rate: f64,
    /// Burst of that allowance.
    pub neighbour_announce_burst: u32,
    /// Announce signatures verified per second for one neighbour.
    pub verify_rate: f64,
    /// Burst of that allowance.
    pub verify_burst: u32,
    /// Announce signatures verified per second in all.
    pub verify_rate_total: f64,
    /// Burst of that allowance.
    pub verify_burst_total: u32,
    /// Most known destinations replayed to a new neighbour (verified and newest first).
    pub max_replay: usize,
    /// Bytes per second such a replay may use (on a capped link, the cap rules). It also
    /// sends at most half the `neighbour_announce_rate` in announces per second, so that
    /// a receiver with the same settings takes all of it.
    pub replay_rate: u64,
}

impl Default for RouterConfig {
    fn default() -> Self {
        RouterConfig {
            max_hops: 32,
            announce_lifetime: Duration::from_secs(3600),
            identity_interval: Duration::from_secs(60),
            identity_burst: 4,
            max_skew: Duration::from_secs(120),
            max_paths: 100_000,
            max_seen: 200_000,
            max_keys: 4096,
            max_queue: 256,
            request_lifetime: Duration::from_secs(60),
            replay_on_connect: true,
            report_forwarded: false,
            request_rate: 2.0,
            request_burst: 20,
            max_lifetime: Duration::from_secs(6 * 3600),
            max_pathless: 25_000,
            max_unverified_per_neighbour: 12_500,
            neighbour_announce_rate: 50.0,
            neighbour_announce_burst: 5000,
            verify_rate: 50.0,
            verify_burst: 500,
            verify_rate_total: 400.0,
            verify_burst_total: 800,
            max_replay: 1024,
            replay_rate: 64 << 10,
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
        /// The neighbour it came from (None: sent by this node to itself). Not its origin:
        /// the last hop, whose budget it may be charged to.
        from: Option<NeighbourId>,
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
    /// The neighbour exceeded its rate of new announces.
    #[error("neighbour announce rate limit")]
    NeighbourRate,
    /// The neighbour already introduced its share of unverified destinations.
    #[error("neighbour holds its share of unverified destinations")]
    NeighbourQuota,
    /// No signature verification allowance left (this neighbour's, or in all).
    #[error("signature verification budget spent")]
    VerifyBudget,
    /// The table is full of destinations this one may not displace.
    #[error("destination table full")]
    TableFull,
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
    /// Announces refused by a neighbour's budgets (rate, quota, verifications).
    pub neighbour_limited: u64,
    /// Destinations evicted to make room.
    pub evicted: u64,
}

struct Neighbour {
    info: NeighbourInfo,
    /// The announce byte cap (`announce_rate`): tokens, last refill, what waits behind it.
    tokens: f64,
    refilled: Instant,
    queue: VecDeque<Vec<u8>>,
    /// Destinations still to replay to it, and the byte allowance of that replay.
    replay: VecDeque<DestinationHash>,
    replay_tokens: f64,
    replay_at: Instant,
    /// New announces accepted from it.
    fresh: Limiter,
    /// Signatures verified for it.
    verify: Limiter,
    /// Unverified destinations it introduced that are in the table.
    unverified: usize,
}

impl Neighbour {
    fn replay_rate(&self, cfg: &RouterConfig) -> f64 {
        if self.info.announce_rate > 0 {
            self.info.announce_rate.min(cfg.replay_rate) as f64
        } else {
            cfg.replay_rate.max(1) as f64
        }
    }
}

/// Eviction order: class (0 unverified and path-less, 1 unverified with a path, 2 verified
/// and path-less, 3 verified with a path), then expiry, then the destination (ties).
type EvictKey = (u8, u64, DestinationHash);

/// Whether an eviction class is one of a destination with a path (1 or 3).
fn has_path_class(class: u8) -> bool {
    class & 1 == 1
}

struct Cached {
    full: Option<Announce>,
    body: AnnounceBody,
    id: [u8; ID_LEN],
    /// The compact form, encoded once.
    compact: Vec<u8>,
    /// When it expires (ms): its own expiry, capped at `max_lifetime` after its timestamp.
    expires_ms: u64,
    /// The neighbour that introduced it, while it is unverified (that neighbour's quota).
    from: Option<NeighbourId>,
    /// Its key in `Router::evict`.
    evict_key: EvictKey,
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

/// What changed since the last [`Router::take_changes`], for an incremental save: each
/// destination's path and announce record now (None: delete), and the keys added or
/// evicted.
#[derive(Debug, Default, Clone)]
pub struct Changes {
    /// Path records to write (Some) or delete (None).
    pub paths: Vec<(DestinationHash, Option<PathRecord>)>,
    /// Announce records to write or delete.
    pub announces: Vec<(DestinationHash, Option<AnnounceRecord>)>,
    /// Keys to write or delete.
    pub keys: Vec<(PeerId, Option<PublicIdentity>)>,
}

impl Changes {
    /// Whether there is nothing to save.
    pub fn is_empty(&self) -> bool {
        self.paths.is_empty() && self.announces.is_empty() && self.keys.is_empty()
    }
}

/// Most identities (and neighbours) whose announce and request allowances are remembered
/// at once; beyond, new ones are refused until buckets fill up again.
const MAX_IDENTITY_BUCKETS: usize = 65_536;

/// The router of one node.
pub struct Router {
    me: Arc<Identity>,
    cfg: RouterConfig,
    rng: Rng,
    /// Unix time in ms at `base`.
    base_ms: u64,
    base: Instant,
    neighbours: HashMap<NeighbourId, Neighbour>,
    /// Best path per destination; every destination here is in `cache` too.
    paths: HashMap<DestinationHash, PathEntry>,
    path_expiry: BTreeSet<(Instant, DestinationHash)>,
    /// Paths by next hop (what a neighbour going away takes with it).
    paths_by_hop: HashMap<NeighbourId, HashSet<DestinationHash>>,
    /// Paths by (verified, announce timestamp): what to replay first.
    by_freshness: BTreeSet<(bool, u64, DestinationHash)>,
    /// The latest announce per destination.
    cache: HashMap<DestinationHash, Cached>,
    cache_expiry: BTreeSet<(u64, DestinationHash)>,
    evict: BTreeSet<EvictKey>,
    /// Destinations in `cache` with neither a path nor a stored one waiting.
    pathless: usize,
    keys: HashMap<PeerId, PublicIdentity>,
    key_order: VecDeque<PeerId>,
    seen: Bounded<[u8; ID_LEN]>,
    tags: Bounded<[u8; TAG_LEN]>,
    requests: HashMap<[u8; TAG_LEN], (Option<NeighbourId>, Instant)>,
    /// Requests in the order they expire (one lifetime for all).
    request_order: VecDeque<(Instant, [u8; TAG_LEN])>,
    /// Per-identity announce allowance; verified and unverified announces apart, so that
    /// forged compact announces cannot spend the real identity's tokens.
    rate: KeyedLimiter<(PeerId, bool)>,
    verify_total: Limiter,
    local: HashMap<DestinationHash, Local>,
    out: VecDeque<(NeighbourId, Vec<u8>)>,
    events: VecDeque<MeshEvent>,
    stats: RouterStats,
    /// Paths loaded from the store, by next-hop identity, waiting for that neighbour.
    restored: HashMap<PeerId, HashMap<DestinationHash, PathRecord>>,
    restored_dest: HashMap<DestinationHash, PeerId>,
    /// This node's latest announce per local destination, replayed to new neighbours.
    own: HashMap<DestinationHash, (Announce, Instant)>,
    /// For destinations whose path was lost: the announce timestamp and cost it had.
    feasible: HashMap<DestinationHash, (u64, u16)>,
    /// Per-neighbour path-request allowance.
    request_tokens: KeyedLimiter<NeighbourId>,
    /// Destinations and keys changed since the last `take_changes`.
    dirty: HashSet<DestinationHash>,
    dirty_keys: HashSet<PeerId>,
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
            path_expiry: BTreeSet::new(),
            paths_by_hop: HashMap::new(),
            by_freshness: BTreeSet::new(),
            cache: HashMap::new(),
            cache_expiry: BTreeSet::new(),
            evict: BTreeSet::new(),
            pathless: 0,
            keys: HashMap::new(),
            key_order: VecDeque::new(),
            seen: Bounded::new(cfg.max_seen),
            tags: Bounded::new(cfg.max_seen),
            requests: HashMap::new(),
            request_order: VecDeque::new(),
            rate: KeyedLimiter::new(1.0 / cfg.identity_interval.as_secs_f64().max(1e-9), cfg.identity_burst, MAX_IDENTITY_BUCKETS),
            verify_total: Limiter::new(cfg.verify_rate_total, cfg.verify_burst_total),
            local: HashMap::new(),
            out: VecDeque::new(),
            events: VecDeque::new(),
            stats: RouterStats::default(),
            restored: HashMap::new(),
            restored_dest: HashMap::new(),
            own: HashMap::new(),
            feasible: HashMap::new(),
            request_tokens: KeyedLimiter::new(cfg.request_rate, cfg.request_burst, MAX_IDENTITY_BUCKETS),
            dirty: HashSet::new(),
            dirty_keys: HashSet::new(),
            cfg,
        }
    }

    fn unix_ms(&self, now: Instant) -> u64 {
        self.base_ms.saturating_add(now.saturating_duration_since(self.base).as_millis() as u64)
    }

    fn instant_of(&self, ms: u64) -> Instant {
        // Capped far below what `Instant` can hold; lifetimes are capped far below that.
        let d = Duration::from_millis(ms.saturating_sub(self.base_ms).min(u64::from(u32::MAX) * 1000));
        self.base.checked_add(d).unwrap_or(self.base)
    }

    /// The expiry honoured for `body`: its own, at most `max_lifetime` after its timestamp.
    fn effective_expiry(&self, body: &AnnounceBody) -> u64 {
        body.expires_ms().min(body.timestamp_ms.saturating_add(self.cfg.max_lifetime.as_millis() as u64))
    }

    /// This node's id.
    pub fn peer_id(&self) -> PeerId {
        self.me.peer_id()
    }

    /// Counters.
    pub fn stats(&self) -> RouterStats {
        self.stats.clone()
    }

    // ---- the table: one place for every change, so that the indexes stay true ----

    /// Recomputes `dest`'s eviction key after its path or verification changed. A stored
    /// path waiting for its next hop counts as a path.
    fn reindex(&mut self, dest: &DestinationHash) {
        let has_path = self.paths.contains_key(dest) || self.restored_dest.contains_key(dest);
        let Some(c) = self.cache.get_mut(dest) else { return };
        let key = (u8::from(c.full.is_some()) * 2 + u8::from(has_path), c.expires_ms, *dest);
        if key != c.evict_key {
            let old = std::mem::replace(&mut c.evict_key, key);
            self.evict_remove(&old);
            self.evict_insert(key);
        }
    }

    fn evict_insert(&mut self, key: EvictKey) {
        if self.evict.insert(key) && !has_path_class(key.0) {
            self.pathless += 1;
        }
    }

    fn evict_remove(&mut self, key: &EvictKey) {
        if self.evict.remove(key) && !has_path_class(key.0) {
            self.pathless = self.pathless.saturating_sub(1);
        }
    }

    fn neighbour_unverified(&mut self, c: &Cached, delta: isize) {
        if c.full.is_some() {
            return;
        }
        if let Some(n) = c.from.and_then(|id| self.neighbours.get_mut(&id)) {
            n.unverified = n.unverified.saturating_add_signed(delta);
        }
    }

    /// Inserts or replaces the announce held for `dest`.
    fn put_cache(&mut self, dest: DestinationHash, mut c: Cached) {
        if let Some(old) = self.cache.remove(&dest) {
            self.evict_remove(&old.evict_key);
            self.cache_expiry.remove(&(old.expires_ms, dest));
            self.neighbour_unverified(&old, -1);
        }
        self.neighbour_unverified(&c, 1);
        self.cache_expiry.insert((c.expires_ms, dest));
        // A key no entry has, so that `reindex` inserts the real one.
        c.evict_key = (u8::MAX, 0, dest);
        self.cache.insert(dest, c);
        self.reindex(&dest);
        self.dirty.insert(dest);
    }

    fn set_path(&mut self, dest: DestinationHash, entry: PathEntry) {
        if let Some(old) = self.paths.remove(&dest) {
            self.unindex_path(&dest, &old);
        }
        self.path_expiry.insert((entry.expires, dest));
        self.paths_by_hop.entry(entry.next_hop).or_default().insert(dest);
        self.by_freshness.insert((entry.verified, entry.timestamp_ms, dest));
        self.paths.insert(dest, entry);
        self.reindex(&dest);
        self.dirty.insert(dest);
    }

    fn unindex_path(&mut self, dest: &DestinationHash, p: &PathEntry) {
        self.path_expiry.remove(&(p.expires, *dest));
        self.by_freshness.remove(&(p.verified, p.timestamp_ms, *dest));
        if let Some(set) = self.paths_by_hop.get_mut(&p.next_hop) {
            set.remove(dest);
            if set.is_empty() {
                self.paths_by_hop.remove(&p.next_hop);
            }
        }
    }

    /// Removes `dest`'s path (the announce stays); reports it lost.
    fn drop_path(&mut self, dest: &DestinationHash) -> Option<PathEntry> {
        let p = self.paths.remove(dest)?;
        self.unindex_path(dest, &p);
        self.reindex(dest);
        self.dirty.insert(*dest);
        self.events.push_back(MeshEvent::PathLost { dest: *dest });
        Some(p)
    }

    /// Forgets everything about `dest`: path, announce, feasibility, a parked record.
    fn drop_destination(&mut self, dest: &DestinationHash) {
        self.drop_path(dest);
        if let Some(c) = self.cache.remove(dest) {
            self.evict_remove(&c.evict_key);
            self.cache_expiry.remove(&(c.expires_ms, *dest));
            self.neighbour_unverified(&c, -1);
        }
        self.feasible.remove(dest);
        // (The announce is gone, so no reindex is needed for the parked record.)
        if let Some(peer) = self.restored_dest.remove(dest) {
            if let Some(records) = self.restored.get_mut(&peer) {
                records.remove(dest);
                if records.is_empty() {
                    self.restored.remove(&peer);
                }
            }
        }
        self.dirty.insert(*dest);
    }

    /// Makes room for one more destination: evicts unverified ones first (path-less
    /// before routed, soonest to expire first), verified ones only for a verified
    /// newcomer. False when nothing may go.
    fn make_room(&mut self, verified_newcomer: bool) -> bool {
        while self.cache.len() >= self.cfg.max_paths {
            let victim = if verified_newcomer {
                self.evict.first().copied()
            } else {
                self.evict.range(..(2, 0, DestinationHash([0; 16]))).next().copied()
            };
            let Some((_, _, d)) = victim else { return false };
            self.drop_destination(&d);
            self.stats.evicted += 1;
        }
        true
    }

    /// Keeps path-less destinations within `max_pathless`, unverified ones going first.
    fn trim_pathless(&mut self) {
        let zero = DestinationHash([0; 16]);
        while self.pathless > self.cfg.max_pathless {
            let victim = self.evict.range((0, 0, zero)..(1, 0, zero)).next().or_else(|| self.evict.range((2, 0, zero)..(3, 0, zero)).next()).copied();
            let Some((_, _, d)) = victim else { return };
            self.drop_destination(&d);
            self.stats.evicted += 1;
        }
    }

    // ---- neighbours ----

    /// A neighbour came up (an authenticated session). It is sent this node's announces
    /// at once, and then, paced, the announces this node holds a path for (so it can
    /// route); stored paths through it come back.
    pub fn add_neighbour(&mut self, now: Instant, id: NeighbourId, mut info: NeighbourInfo) {
        // Every hop costs something: a zero-cost hop would break the loop-freedom argument.
        info.cost = info.cost.max(1);
        let peer = info.peer;
        // Starts with one second's allowance, so the first announces go at once.
        let tokens = info.announce_rate as f64;
        let replay = if self.cfg.replay_on_connect { self.replay_for(id, &peer) } else { VecDeque::new() };
        let mut n = Neighbour {
            info,
            tokens,
            refilled: now,
            queue: VecDeque::new(),
            replay,
            replay_tokens: 0.0,
            replay_at: now,
            fresh: Limiter::new(self.cfg.neighbour_announce_rate, self.cfg.neighbour_announce_burst),
            verify: Limiter::new(self.cfg.verify_rate, self.cfg.verify_burst),
            unverified: 0,
        };
        // A second's worth to start with.
        n.replay_tokens = n.replay_rate(&self.cfg);
        self.neighbours.insert(id, n);
        let own: Vec<Announce> = self.own.values().map(|(a, _)| a.clone()).collect();
        for a in &own {
            self.queue_announce(id, a, None, 0, 0);
        }
        if let Some(records) = self.restored.remove(&peer) {
            let now_ms = self.unix_ms(now);
            for (dest, r) in records {
                self.restored_dest.remove(&dest);
                self.reindex(&dest);
                // Only with the announce it was learnt from still held, and if no better
                // path came meanwhile.
                let matches = self.cache.get(&dest).is_some_and(|c| c.body.timestamp_ms == r.timestamp_ms);
                if r.expires_ms <= now_ms || !matches || !self.better_or_absent(&dest, r.cost, r.hops, r.timestamp_ms) {
                    continue;
                }
                let verified = self.cache.get(&dest).is_some_and(|c| c.full.is_some());
                let entry = PathEntry {
                    next_hop: id,
                    hops: r.hops,
                    cost: r.cost,
                    timestamp_ms: r.timestamp_ms,
                    learned: now,
                    expires: self.instant_of(r.expires_ms.min(self.cache.get(&dest).map_or(r.expires_ms, |c| c.expires_ms))),
                    rtt: None,
                    loss_permille: 0,
                    verified,
                };
                self.set_path(dest, entry);
                let dest_peer = self.cache.get(&dest).map_or(peer, |c| c.body.peer);
                self.events.push_back(MeshEvent::PathLearned { dest, peer: dest_peer, next_hop: id, hops: r.hops });
                // Back in the table: the other neighbours hear of it, paced like a replay.
                let max = self.cfg.max_replay;
                for (nid, n) in self.neighbours.iter_mut() {
                    if *nid != id && n.replay.len() < max {
                        n.replay.push_back(dest);
                    }
                }
            }
        }
    }

    /// What to replay to neighbour `id` (`peer`): paths not through it and not to its own
    /// destinations, at most `max_replay`, verified and newest first. Read off an ordered
    /// index: the work is the replay's size, not the table's.
    fn replay_for(&self, id: NeighbourId, peer: &PeerId) -> VecDeque<DestinationHash> {
        self.by_freshness
            .iter()
            .rev()
            .map(|(_, _, d)| *d)
            .filter(|d| self.paths.get(d).is_some_and(|p| p.next_hop != id) && self.cache.get(d).is_none_or(|c| c.body.peer != *peer))
            .take(self.cfg.max_replay)
            .collect()
    }

    fn better_or_absent(&self, dest: &DestinationHash, cost: u16, hops: u8, ts: u64) -> bool {
        self.paths.get(dest).is_none_or(|p| ts > p.timestamp_ms || (ts == p.timestamp_ms && (cost, hops) < (p.cost, p.hops)))
    }

    /// A neighbour went away: paths through it are lost.
    pub fn remove_neighbour(&mut self, id: NeighbourId) {
        self.neighbours.remove(&id);
        let lost: Vec<DestinationHash> = self.paths_by_hop.get(&id).map(|s| s.iter().copied().collect()).unwrap_or_default();
        for d in lost {
            if let Some(p) = self.drop_path(&d) {
                self.feasible.insert(d, (p.timestamp_ms, p.cost));
            }
        }
        self.out.retain(|(n, _)| *n != id);
        self.request_tokens.forget(&id);
        self.trim_pathless();
    }

    // ---- persistence ----

    fn path_record(&self, dest: &DestinationHash) -> Option<PathRecord> {
        if let Some(p) = self.paths.get(dest) {
            let n = self.neighbours.get(&p.next_hop)?;
            return Some(PathRecord {
                dest: *dest,
                next_hop: n.info.peer,
                hops: p.hops,
                cost: p.cost,
                timestamp_ms: p.timestamp_ms,
                expires_ms: self.unix_ms(p.expires),
                verified: p.verified,
            });
        }
        let peer = self.restored_dest.get(dest)?;
        self.restored.get(peer)?.get(dest).cloned()
    }

    fn announce_record(&self, dest: &DestinationHash) -> Option<AnnounceRecord> {
        let c = self.cache.get(dest)?;
        Some(AnnounceRecord { dest: *dest, compact: c.compact.clone(), full: c.full.as_ref().map(|a| a.encode(None)) })
    }

    /// The whole state to persist: paths (by next-hop identity), announces and known keys.
    pub fn snapshot(&self, now: Instant) -> Snapshot {
        let _ = now;
        let mut snap = Snapshot::default();
        for dest in self.paths.keys().chain(self.restored_dest.keys()) {
            if let Some(r) = self.path_record(dest) {
                snap.paths.push(r);
            }
        }
        for dest in self.cache.keys() {
            if let Some(a) = self.announce_record(dest) {
                snap.announces.push(a);
            }
        }
        snap.keys = self.keys.values().cloned().collect();
        snap
    }

    /// Whether anything changed since the last [`Router::take_changes`].
    pub fn has_changes(&self) -> bool {
        !self.dirty.is_empty() || !self.dirty_keys.is_empty()
    }

    /// What changed since the last call, as records to write or delete. Work and size are
    /// proportional to the changes, not to the table.
    pub fn take_changes(&mut self) -> Changes {
        let mut ch = Changes::default();
        for dest in std::mem::take(&mut self.dirty) {
            ch.paths.push((dest, self.path_record(&dest)));
            ch.announces.push((dest, self.announce_record(&dest)));
        }
        for peer in std::mem::take(&mut self.dirty_keys) {
            ch.keys.push((peer, self.keys.get(&peer).cloned()));
        }
        ch
    }

    /// Marks what `ch` covered as changed again (its save failed).
    pub fn restore_changes(&mut self, ch: &Changes) {
        self.dirty.extend(ch.paths.iter().map(|(d, _)| *d));
        self.dirty.extend(ch.announces.iter().map(|(d, _)| *d));
        self.dirty_keys.extend(ch.keys.iter().map(|(k, _)| *k));
    }

    /// Marks the whole state as changed (the store was replaced by an empty one).
    pub fn mark_all_changed(&mut self) {
        self.dirty.extend(self.cache.keys().copied());
        self.dirty.extend(self.restored_dest.keys().copied());
        self.dirty_keys.extend(self.keys.keys().copied());
    }

    /// Loads persisted state (at start). Announces are checked again (binding, expiry, and
    /// the signature of full forms): what comes back unverified stays unverified, is
    /// restored only up to a quarter of the table, and never ahead of a verified one.
    /// Paths wait for their next hop to come back.
    pub fn restore(&mut self, now: Instant, snap: Snapshot) {
        let now_ms = self.unix_ms(now);
        for k in snap.keys {
            self.add_known_key(k);
        }
        let mut verified = Vec::new();
        let mut unverified = Vec::new();
        let stored: Vec<DestinationHash> = snap.announces.iter().map(|a| a.dest).collect();
        for a in snap.announces {
            let Ok(c) = CompactAnnounce::decode(&a.compact) else { continue };
            let expires_ms = self.effective_expiry(&c.body);
            if c.body.dest != a.dest || expires_ms <= now_ms || c.body.timestamp_ms > now_ms.saturating_add(self.cfg.max_skew.as_millis() as u64) {
                continue;
            }
            let keys = &self.keys;
            let full = a
                .full
                .and_then(|f| Announce::decode_verify(&f, |p| keys.get(p).cloned()).ok())
                .map(|(x, _)| x)
                .filter(|x| x.id() == c.id);
            let cached = Cached { full, body: c.body, id: c.id, compact: a.compact, expires_ms, from: None, evict_key: (0, 0, a.dest) };
            if cached.full.is_some() {
                verified.push(cached);
            } else {
                unverified.push(cached);
            }
        }
        // Longest-lived first, so that what does not fit is what would expire soonest.
        verified.sort_by_key(|c| std::cmp::Reverse(c.expires_ms));
        unverified.sort_by_key(|c| std::cmp::Reverse(c.expires_ms));
        unverified.truncate(self.cfg.max_paths / 4);
        for c in verified.into_iter().chain(unverified) {
            if self.cache.len() >= self.cfg.max_paths {
                break;
            }
            if self.cache.contains_key(&c.body.dest) {
                continue;
            }
            self.seen.insert(c.id);
            self.put_cache(c.body.dest, c);
        }
        for p in snap.paths {
            // A path comes back only with its announce; whether it is verified is that
            // announce's standing here, not what the record says.
            let Some(c) = self.cache.get(&p.dest) else { continue };
            if p.expires_ms <= now_ms || c.body.timestamp_ms != p.timestamp_ms {
                continue;
            }
            let mut p = p;
            p.verified = c.full.is_some();
            p.expires_ms = p.expires_ms.min(c.expires_ms);
            let dest = p.dest;
            self.restored_dest.insert(dest, p.next_hop);
            self.restored.entry(p.next_hop).or_default().insert(dest, p);
            self.reindex(&dest);
        }
        self.trim_pathless();
        let up: Vec<(NeighbourId, PeerId)> = self.neighbours.iter().map(|(id, n)| (*id, n.info.peer)).collect();
        for (id, peer) in up {
            if let Some(info) = self.neighbours.get(&id).map(|n| n.info.clone()) {
                if self.restored.contains_key(&peer) {
                    self.add_neighbour(now, id, info);
                }
            }
        }
        // What was loaded is what the store holds; what was not (expired, damaged, over
        // the caps) is to be deleted from it.
        self.dirty.clear();
        self.dirty_keys.clear();
        for d in stored {
            if !self.cache.contains_key(&d) {
                self.dirty.insert(d);
            }
        }
    }

    // ---- local destinations and queries ----

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

    /// Destinations held (with or without a path) and how many of them are unverified.
    pub fn destinations(&self) -> (usize, usize) {
        let zero = DestinationHash([0; 16]);
        (self.cache.len(), self.evict.range(..(2, 0, zero)).count())
    }

    /// Caches a public key (announces from its owner may then omit it).
    pub fn add_known_key(&mut self, key: PublicIdentity) {
        let id = key.peer_id();
        if self.keys.insert(id, key).is_none() {
            self.key_order.push_back(id);
            self.dirty_keys.insert(id);
            while self.keys.len() > self.cfg.max_keys {
                let Some(old) = self.key_order.pop_front() else { break };
                self.keys.remove(&old);
                self.dirty_keys.insert(old);
            }
        }
    }

    /// Announces a local destination to every neighbour.
    pub fn announce(&mut self, now: Instant, dest: &DestinationHash) -> Result<(), AnnounceSendError> {
        let a = self.sign_own(now, dest)?;
        let ids: Vec<NeighbourId> = self.neighbours.keys().copied().collect();
        for n in ids {
            self.queue_announce(n, &a, None, 0, 0);
        }
        Ok(())
    }

    /// Signs a fresh announce of local destination `dest` and keeps it as the latest.
    fn sign_own(&mut self, now: Instant, dest: &DestinationHash) -> Result<Announce, AnnounceSendError> {
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
        self.own.insert(*dest, (a.clone(), now));
        Ok(a)
    }

    /// Asks the neighbours for a path to `dest` (answered from caches on the way).
    pub fn request_path(&mut self, now: Instant, dest: DestinationHash) {
        let tag: [u8; TAG_LEN] = self.rng.bytes();
        self.tags.insert(tag);
        self.remember_request(now, tag, None);
        let pkt = Packet::PathRequest { tag, dest, hops: 0 }.encode();
        for &n in self.neighbours.keys() {
            self.out.push_back((n, pkt.clone()));
        }
    }

    fn remember_request(&mut self, now: Instant, tag: [u8; TAG_LEN], from: Option<NeighbourId>) {
        let until = now + self.cfg.request_lifetime;
        self.requests.insert(tag, (from, until));
        self.request_order.push_back((until, tag));
    }

    /// Sends `payload` towards `dest` along the path table.
    pub fn send_to(&mut self, dest: DestinationHash, payload: &[u8]) -> Result<(), SendToError> {
        if self.local.contains_key(&dest) {
            self.events.push_back(MeshEvent::Delivered { dest, payload: payload.to_vec(), from: None });
            return Ok(());
        }
        let p = self.paths.get(&dest).ok_or(SendToError::NoPath(dest))?;
        self.out.push_back((p.next_hop, Packet::Data { dest, hops: 0, payload }.encode()));
        Ok(())
    }

    // ---- packets ----

    /// Handles one packet from neighbour `from`.
    pub fn handle_packet(&mut self, now: Instant, from: NeighbourId, bytes: &[u8]) -> Result<(), DropReason> {
        self.stats.packets_in += 1;
        let r = self.dispatch(now, from, bytes);
        if let Err(e) = &r {
            self.stats.dropped += 1;
            if matches!(e, DropReason::NeighbourRate | DropReason::NeighbourQuota | DropReason::VerifyBudget) {
                self.stats.neighbour_limited += 1;
            }
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
        let expires_ms = self.effective_expiry(&body);
        if expires_ms <= now_ms {
            return Err(DropReason::Expired(body.dest));
        }
        if body.timestamp_ms > now_ms.saturating_add(self.cfg.max_skew.as_millis() as u64) {
            return Err(DropReason::FromFuture(body.dest));
        }
        let hop_cost = self.neighbours.get(&from).map_or(1, |n| n.info.cost);
        let new_hops = hops.saturating_add(1);
        let new_cost = cost.saturating_add(hop_cost);
        let known = self.cache.get(&body.dest).map(|c| (c.body.timestamp_ms, c.id, c.full.is_some()));
        let fresh = match known {
            Some((ts, _, _)) if body.timestamp_ms < ts => return Err(DropReason::Stale(body.dest)),
            Some((ts, kid, _)) if body.timestamp_ms == ts => {
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
        let new_dest = known.is_none();
        // The neighbour's budgets, before any expensive work: new announces per second,
        // and its share of unverified destinations.
        if fresh {
            let quota = self.cfg.max_unverified_per_neighbour;
            // Would this add to the neighbour's unverified count?
            let adds = full_bytes.is_none() && self.cache.get(&body.dest).is_none_or(|c| c.full.is_some() || c.from != Some(from));
            let n = self.neighbours.get_mut(&from).ok_or(DropReason::UnknownNeighbour(from))?;
            if adds && n.unverified >= quota {
                return Err(DropReason::NeighbourQuota);
            }
            if !n.fresh.allow(now) {
                return Err(DropReason::NeighbourRate);
            }
        }
        // Verify the full form once per announce id, and before the identity's rate
        // limit, so that forged announces cannot spend an identity's allowance.
        let already = self.cache.get(&body.dest).is_some_and(|c| c.id == id && c.full.is_some());
        let mut full = None;
        if let (Some(b), false) = (full_bytes, already) {
            self.take_verification(now, from)?;
            let keys = &self.keys;
            let (a, key) = Announce::decode_verify(b, |p| keys.get(p).cloned())?;
            self.stats.verified += 1;
            self.add_known_key(key);
            full = Some(a);
        }
        let verified = full.is_some() || already;
        if fresh && !self.take_identity_token(now, body.peer, verified) {
            self.stats.rate_limited += 1;
            return Err(DropReason::RateLimited(body.peer));
        }
        if new_dest && !self.make_room(verified) {
            return Err(DropReason::TableFull);
        }
        self.seen.insert(id);
        let dest = body.dest;
        let peer = body.peer;
        if fresh || full.is_some() {
            // Fresh: the new announce replaces the entry; otherwise `full` verified a copy
            // of the one held compact.
            let from_unverified = if full.is_some() { None } else { Some(from) };
            let mut compact = body.encode(0);
            compact.extend_from_slice(&id);
            self.put_cache(dest, Cached { full, body, id, compact, expires_ms, from: from_unverified, evict_key: (0, 0, dest) });
        }
        let entry = PathEntry {
            next_hop: from,
            hops: new_hops,
            cost: new_cost,
            timestamp_ms: self.cache.get(&dest).map_or(0, |c| c.body.timestamp_ms),
            learned: now,
            expires: self.instant_of(expires_ms),
            rtt: None,
            loss_permille: 0,
            verified,
        };
        if fresh {
            self.feasible.remove(&dest);
        }
        let install = fresh || self.better(&dest, new_cost, new_hops) || (upgrade && self.paths.get(&dest).is_some_and(|p| p.next_hop == from));
        if install {
            self.set_path(dest, entry);
            self.events.push_back(MeshEvent::PathLearned { dest, peer, next_hop: from, hops: new_hops });
        } else if upgrade {
            // The held path stays; it is verified now.
            if let Some(mut p) = self.paths.get(&dest).cloned() {
                p.verified = true;
                self.set_path(dest, p);
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

    /// Takes one signature verification from `from`'s allowance and the total.
    fn take_verification(&mut self, now: Instant, from: NeighbourId) -> Result<(), DropReason> {
        let n = self.neighbours.get_mut(&from).ok_or(DropReason::UnknownNeighbour(from))?;
        // Checked before either is spent, so a refusal costs neither bucket.
        if !n.verify.would_allow(now, 1.0) || !self.verify_total.would_allow(now, 1.0) {
            return Err(DropReason::VerifyBudget);
        }
        n.verify.allow(now);
        self.verify_total.allow(now);
        Ok(())
    }

    /// Whether a path of `cost`/`hops` beats the current one for `dest`.
    fn better(&self, dest: &DestinationHash, cost: u16, hops: u8) -> bool {
        self.paths.get(dest).is_none_or(|p| (cost, hops) < (p.cost, p.hops))
    }

    fn take_identity_token(&mut self, now: Instant, peer: PeerId, verified: bool) -> bool {
        self.rate.allow(now, &(peer, verified))
    }

    /// Queues the held announce of `dest` for neighbour `to`; returns its size (0: none).
    fn forward_cached(&mut self, to: NeighbourId, dest: &DestinationHash, hops: u8, cost: u16, response: Option<[u8; TAG_LEN]>) -> usize {
        let Some(c) = self.cache.get(dest) else { return 0 };
        let compact_to = self.neighbours.get(&to).is_none_or(|n| n.info.compact);
        let bytes = match (&c.full, compact_to) {
            (Some(a), false) => {
                let key = self.keys.get(&a.body.peer);
                Packet::Announce { compact: false, hops, cost, response, bytes: &a.encode(key) }.encode()
            }
            (_, true) | (None, _) => Packet::Announce { compact: true, hops, cost, response, bytes: &c.compact }.encode(),
        };
        let len = bytes.len();
        self.enqueue_announce(to, bytes);
        len
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
        // Each request floods: a neighbour gets a bucket of `request_burst`, refilled at
        // `request_rate` per second.
        if !self.request_tokens.allow(now, &from) {
            return Err(DropReason::RequestRateLimited);
        }
        if hops >= self.cfg.max_hops {
            return Err(DropReason::HopLimit);
        }
        self.remember_request(now, tag, Some(from));
        if self.local.contains_key(&dest) {
            // Answer with our latest announce, back to the asker only; a new one is signed
            // only once the latest is a quarter of its lifetime old, so requests cannot
            // make this node sign at their rate.
            let recent = self.own.get(&dest).filter(|(_, at)| now.saturating_duration_since(*at) < self.cfg.announce_lifetime / 4).map(|(a, _)| a.clone());
            let a = match recent {
                Some(a) => Some(a),
                None => self.sign_own(now, &dest).ok(),
            };
            if let Some(a) = a {
                self.queue_announce(from, &a, Some(tag), 0, 0);
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
            self.events.push_back(MeshEvent::Delivered { dest, payload: payload.to_vec(), from: Some(from) });
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

    // ---- timers and output ----

    /// Expires paths, announces, requests and rate buckets. Each expiry costs its own
    /// removal; nothing scans the table.
    pub fn handle_timeout(&mut self, now: Instant) {
        while let Some(&(at, d)) = self.path_expiry.first() {
            if at > now {
                break;
            }
            self.drop_destination(&d);
        }
        let now_ms = self.unix_ms(now);
        while let Some(&(ms, d)) = self.cache_expiry.first() {
            if ms > now_ms {
                break;
            }
            self.drop_destination(&d);
        }
        while let Some(&(until, tag)) = self.request_order.front() {
            if until > now {
                break;
            }
            self.request_order.pop_front();
            if self.requests.get(&tag).is_some_and(|(_, u)| *u <= now) {
                self.requests.remove(&tag);
            }
        }
    }

    /// The next instant `handle_timeout` or `poll_transmit` has work.
    pub fn poll_timeout(&self, now: Instant) -> Option<Instant> {
        let mut t = self.path_expiry.first().map(|(at, _)| *at);
        let mut at = |x: Instant| t = Some(t.map_or(x, |t: Instant| t.min(x)));
        if let Some((ms, _)) = self.cache_expiry.first() {
            at(self.instant_of(*ms));
        }
        for n in self.neighbours.values() {
            if n.info.announce_rate > 0 {
                if let Some(front) = n.queue.front() {
                    let need = front.len() as f64 - n.tokens;
                    at(n.refilled + Duration::from_secs_f64((need / n.info.announce_rate as f64).max(0.0)));
                }
            }
            if !n.replay.is_empty() {
                let need = -n.replay_tokens;
                at(n.replay_at + Duration::from_secs_f64((need / n.replay_rate(&self.cfg)).max(0.0)));
            }
        }
        if let Some((until, _)) = self.request_order.front() {
            at(*until);
        }
        t.map(|x| x.max(now))
    }

    /// Hands the next paced replay announces to the output, per neighbour, as its byte
    /// allowance permits (a second's worth at most; an announce larger than what is left
    /// goes and leaves a debt).
    fn pump_replay(&mut self, now: Instant) {
        let mut ids: Vec<NeighbourId> = self.neighbours.iter().filter(|(_, n)| !n.replay.is_empty()).map(|(id, _)| *id).collect();
        ids.sort();
        for id in ids {
            while let Some(n) = self.neighbours.get_mut(&id) {
                let rate = n.replay_rate(&self.cfg);
                n.replay_tokens = (n.replay_tokens + now.saturating_duration_since(n.replay_at).as_secs_f64() * rate).min(rate);
                n.replay_at = now;
                // On a capped link the replay waits for the cap's queue to drain.
                if n.replay_tokens < 0.0 || (n.info.announce_rate > 0 && n.queue.len() >= 4) {
                    break;
                }
                let peer = n.info.peer;
                let Some(dest) = n.replay.pop_front() else { break };
                let Some(p) = self.paths.get(&dest).filter(|p| p.next_hop != id) else { continue };
                if self.cache.get(&dest).is_some_and(|c| c.body.peer == peer) {
                    continue;
                }
                let (hops, cost) = (p.hops, p.cost);
                let sent = self.forward_cached(id, &dest, hops, cost, None) as f64;
                // Each announce costs at least its share of half the receiver's allowance.
                let per_announce = rate / (self.cfg.neighbour_announce_rate / 2.0).max(0.1);
                if let Some(n) = self.neighbours.get_mut(&id) {
                    n.replay_tokens -= sent.max(per_announce);
                }
            }
        }
    }

    /// The next packet to send.
    pub fn poll_transmit(&mut self, now: Instant) -> Option<(NeighbourId, Vec<u8>)> {
        if self.out.is_empty() {
            self.pump_replay(now);
        }
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

#[cfg(test)]
#[path = "router_tests.rs"]
mod tests;
