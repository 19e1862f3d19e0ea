//! A deterministic simulation of many routers on a graph: virtual time, a fixed latency per
//! hop, packets delivered in order of arrival. Used by the router's tests and by
//! `benches/mesh.rs`.
//!
//! Links here are the neighbour sessions the host would provide (already authenticated);
//! what is simulated is their delay, not their bytes. Each edge is either a broadband hop
//! (full announces, cost 1) or a constrained one (compact announces, cost 10).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::identity::Identity;
use crate::link::sim::SimRng;

use super::dest::{DestinationHash, ServiceName, ServiceNameError};
use super::router::{DropReason, MeshEvent, NeighbourId, NeighbourInfo, Router, RouterConfig};

/// One edge of the graph.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Edge {
    /// One end (node index).
    pub a: usize,
    /// The other end.
    pub b: usize,
    /// A constrained hop (compact announces, cost 10).
    pub constrained: bool,
}

type InFlight = Reverse<(Instant, u64, usize, usize, Vec<u8>)>;

/// Routers on a graph.
pub struct MeshSim {
    /// The routers, by node index.
    pub nodes: Vec<Router>,
    /// Each node's destination (service `sim`).
    pub dests: Vec<DestinationHash>,
    /// Virtual now.
    pub now: Instant,
    /// Latency of a broadband hop; a constrained hop takes ten times as long (its cost is
    /// ten times as high, too).
    pub latency: Duration,
    /// Current edges.
    pub edges: Vec<Edge>,
    /// Packets delivered over edges so far.
    pub delivered: u64,
    /// Bytes delivered over edges so far.
    pub bytes: u64,
    /// Events, with their node.
    pub events: Vec<(usize, MeshEvent)>,
    /// Drops, with their node.
    pub drops: Vec<(usize, DropReason)>,
    queue: BinaryHeap<InFlight>,
    seq: u64,
    /// (node, neighbour id) → other node.
    links: HashMap<(usize, NeighbourId), usize>,
    /// (node, other node) → neighbour id at node.
    ids: HashMap<(usize, usize), NeighbourId>,
    /// (node, neighbour id) → the hop is constrained.
    slow: HashSet<(usize, NeighbourId)>,
    next_id: u32,
    /// Keep every event (tests) or only count (benchmarks).
    pub keep_events: bool,
}

impl MeshSim {
    /// `n` routers (identities from their index), each with destination `sim`, on `edges`.
    pub fn new(n: usize, edges: &[Edge], cfg: RouterConfig, t0: Instant) -> Result<MeshSim, ServiceNameError> {
        let service = ServiceName::new("sim")?;
        let mut nodes = Vec::with_capacity(n);
        let mut dests = Vec::with_capacity(n);
        for i in 0..n {
            let mut seed = [0u8; 32];
            seed[..8].copy_from_slice(&(i as u64).to_be_bytes());
            seed[31] = 0xa5;
            let id = Arc::new(Identity::from_seed(zeroize::Zeroizing::new(seed)));
            let mut r = Router::new(id, cfg.clone(), (t0, 1_700_000_000_000), seed);
            dests.push(r.register_destination(service.clone(), Vec::new()));
            nodes.push(r);
        }
        let mut sim = MeshSim {
            nodes,
            dests,
            now: t0,
            latency: Duration::from_millis(10),
            edges: Vec::new(),
            delivered: 0,
            bytes: 0,
            events: Vec::new(),
            drops: Vec::new(),
            queue: BinaryHeap::new(),
            seq: 0,
            links: HashMap::new(),
            ids: HashMap::new(),
            slow: HashSet::new(),
            next_id: 0,
            keep_events: true,
        };
        for e in edges {
            sim.connect(*e);
        }
        Ok(sim)
    }

    /// Adds an edge (both ends learn a neighbour).
    pub fn connect(&mut self, e: Edge) {
        for (x, y) in [(e.a, e.b), (e.b, e.a)] {
            self.next_id += 1;
            let id = NeighbourId(self.next_id);
            let peer = self.nodes[y].peer_id();
            let info = NeighbourInfo { peer, compact: e.constrained, cost: if e.constrained { 10 } else { 1 }, announce_rate: 0 };
            let now = self.now;
            self.nodes[x].add_neighbour(now, id, info);
            self.links.insert((x, id), y);
            self.ids.insert((x, y), id);
            if e.constrained {
                self.slow.insert((x, id));
            }
        }
        self.edges.push(e);
    }

    /// Removes an edge (both ends lose the neighbour and the paths through it).
    pub fn disconnect(&mut self, a: usize, b: usize) {
        for (x, y) in [(a, b), (b, a)] {
            if let Some(id) = self.ids.remove(&(x, y)) {
                self.nodes[x].remove_neighbour(id);
                self.links.remove(&(x, id));
                self.slow.remove(&(x, id));
            }
        }
        self.edges.retain(|e| !((e.a == a && e.b == b) || (e.a == b && e.b == a)));
    }

    /// The node on the other end of `node`'s neighbour `id`.
    pub fn other_end(&self, node: usize, id: NeighbourId) -> Option<usize> {
        self.links.get(&(node, id)).copied()
    }

    /// The neighbour id at `node` of the link to `other`.
    pub fn neighbour_id(&self, node: usize, other: usize) -> Option<NeighbourId> {
        self.ids.get(&(node, other)).copied()
    }

    fn pump(&mut self) {
        for k in 0..self.nodes.len() {
            while let Some((to, bytes)) = self.nodes[k].poll_transmit(self.now) {
                if let Some(&other) = self.links.get(&(k, to)) {
                    self.seq += 1;
                    let delay = if self.slow.contains(&(k, to)) { self.latency * 10 } else { self.latency };
                    self.queue.push(Reverse((self.now + delay, self.seq, k, other, bytes)));
                }
            }
            while let Some(e) = self.nodes[k].poll_event() {
                if self.keep_events {
                    self.events.push((k, e));
                }
            }
        }
    }

    /// Runs until nothing is in flight or `limit` of virtual time passed. Returns whether
    /// the network went quiet.
    pub fn run(&mut self, limit: Duration) -> bool {
        let deadline = self.now + limit;
        loop {
            self.pump();
            let Some(Reverse((at, ..))) = self.queue.peek() else { return true };
            if *at > deadline {
                self.now = deadline;
                return false;
            }
            self.now = *at;
            while self.queue.peek().is_some_and(|Reverse((t, ..))| *t <= self.now) {
                let Some(Reverse((_, _, from, to, bytes))) = self.queue.pop() else { break };
                self.delivered += 1;
                self.bytes += bytes.len() as u64;
                let Some(id) = self.ids.get(&(to, from)).copied() else { continue };
                let now = self.now;
                if let Err(e) = self.nodes[to].handle_packet(now, id, &bytes) {
                    if self.keep_events {
                        self.drops.push((to, e));
                    }
                }
            }
        }
    }

    /// Advances virtual time without traffic, firing timers.
    pub fn advance(&mut self, d: Duration) {
        self.now += d;
        let now = self.now;
        for r in &mut self.nodes {
            r.handle_timeout(now);
        }
        self.pump();
    }

    /// Every node announces its destination.
    pub fn announce_all(&mut self) {
        let now = self.now;
        for (r, d) in self.nodes.iter_mut().zip(&self.dests) {
            let _ = r.announce(now, d);
        }
    }

    /// Follows next hops from `from` towards node `to`'s destination. Returns the hop count
    /// when it arrives, `None` on a missing path or a loop.
    pub fn walk(&self, from: usize, to: usize) -> Option<usize> {
        let dest = self.dests[to];
        let mut at = from;
        let mut visited = HashSet::new();
        while at != to {
            if !visited.insert(at) {
                return None;
            }
            let p = self.nodes[at].resolve(&dest)?;
            at = self.other_end(at, p.next_hop)?;
        }
        Some(visited.len())
    }

    /// Least path cost from every node to `to` (Dijkstra over the current edges), for
    /// checking that routing converged on the cheapest paths.
    pub fn least_costs(&self, to: usize) -> Vec<Option<u32>> {
        let mut adj: Vec<Vec<(usize, u32)>> = vec![Vec::new(); self.nodes.len()];
        for e in &self.edges {
            let c = if e.constrained { 10 } else { 1 };
            adj[e.a].push((e.b, c));
            adj[e.b].push((e.a, c));
        }
        let mut dist = vec![None; self.nodes.len()];
        let mut heap = BinaryHeap::new();
        dist[to] = Some(0);
        heap.push(Reverse((0u32, to)));
        while let Some(Reverse((d, u))) = heap.pop() {
            if dist[u].is_some_and(|x| x < d) {
                continue;
            }
            for &(v, c) in &adj[u] {
                let nd = d + c;
                if dist[v].is_none_or(|x| nd < x) {
                    dist[v] = Some(nd);
                    heap.push(Reverse((nd, v)));
                }
            }
        }
        dist
    }
}

/// A connected random graph: a random spanning tree plus `extra` random edges; each edge
/// constrained with probability `constrained`.
pub fn random_graph(rng: &mut SimRng, n: usize, extra: usize, constrained: f64) -> Vec<Edge> {
    let mut edges = Vec::new();
    let mut have = HashSet::new();
    for b in 1..n {
        let a = (rng.next_u64() % b as u64) as usize;
        have.insert((a.min(b), a.max(b)));
        edges.push(Edge { a, b, constrained: rng.unit() < constrained });
    }
    let mut tries = 0;
    while edges.len() < n - 1 + extra && tries < extra * 20 + 100 {
        tries += 1;
        let (a, b) = ((rng.next_u64() % n as u64) as usize, (rng.next_u64() % n as u64) as usize);
        if a == b || !have.insert((a.min(b), a.max(b))) {
            continue;
        }
        edges.push(Edge { a, b, constrained: rng.unit() < constrained });
    }
    edges
}

/// Whether `edges` connect all `n` nodes.
pub fn connected(n: usize, edges: &[Edge]) -> bool {
    let mut adj = vec![Vec::new(); n];
    for e in edges {
        adj[e.a].push(e.b);
        adj[e.b].push(e.a);
    }
    let mut seen = vec![false; n];
    let mut q = VecDeque::from([0usize]);
    if n > 0 {
        seen[0] = true;
    }
    while let Some(u) = q.pop_front() {
        for &v in &adj[u] {
            if !seen[v] {
                seen[v] = true;
                q.push_back(v);
            }
        }
    }
    seen.into_iter().all(|s| s)
}
