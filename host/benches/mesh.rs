//! Mesh router benchmark: announce bytes per hop (full and compact forms), memory per
//! path-table entry, relay forwarding rate of the router, and convergence of a large
//! simulated mesh.
//!
//! ```text
//! cargo bench -p antmesh-host --bench mesh
//! ```
//!
//! It prints figures; it asserts nothing about them. See docs/performance.md.
//!
//! | variable | default | meaning |
//! |---|---|---|
//! | `ANTMESH_BENCH_NODES` | 10000 | nodes in the large simulation |
//! | `ANTMESH_BENCH_DESTS` | 200 | nodes of those that announce a destination |
//! | `ANTMESH_BENCH_FORWARD` | 1000000 | data packets pushed through the relay |
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::HashMap;
use std::sync::atomic::{AtomicIsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use antmesh_host::identity::Identity;
use antmesh_host::link::sim::SimRng;
use antmesh_host::mesh::announce::{Announce, AnnounceBody};
use antmesh_host::mesh::dest::{DestinationHash, ServiceName};
use antmesh_host::mesh::packet::Packet;
use antmesh_host::mesh::router::{NeighbourId, NeighbourInfo, PathEntry, Router, RouterConfig};
use antmesh_host::mesh::sim::{random_graph, MeshSim};
use zeroize::Zeroizing;

struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

// SAFETY: forwards to the system allocator and only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        LIVE.fetch_add(l.size() as isize, Ordering::Relaxed);
        // SAFETY: same layout contract as the caller's.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size() as isize, Ordering::Relaxed);
        // SAFETY: `p` came from `alloc` with this layout.
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        LIVE.fetch_add(new as isize - l.size() as isize, Ordering::Relaxed);
        // SAFETY: as for `realloc` itself.
        unsafe { System.realloc(p, l, new) }
    }
}

#[global_allocator]
static A: Counting = Counting;

fn live() -> isize {
    LIVE.load(Ordering::Relaxed)
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn ident(n: u8) -> Arc<Identity> {
    Arc::new(Identity::from_seed(Zeroizing::new([n; 32])))
}

fn main() {
    let nodes = env_u64("ANTMESH_BENCH_NODES", 10_000) as usize;
    let dests = env_u64("ANTMESH_BENCH_DESTS", 200) as usize;
    let forward = env_u64("ANTMESH_BENCH_FORWARD", 1_000_000);
    println!("antmesh mesh benchmark");

    // Announce bytes per hop, envelope included.
    let me = ident(1);
    let service = ServiceName::new("chat").unwrap();
    let body = AnnounceBody {
        dest: DestinationHash::new(&me.peer_id(), &service),
        service: service.hash(),
        peer: me.peer_id(),
        timestamp_ms: 1_700_000_000_000,
        nonce: [1; 8],
        lifetime_s: 3600,
        app_data: Vec::new(),
    };
    let a = Announce::sign(&me, body).unwrap();
    let env = |compact: bool, bytes: &[u8]| Packet::Announce { compact, hops: 1, cost: 1, response: None, bytes }.encode().len();
    println!("\nAnnounce bytes per hop (no app data; mesh envelope included):");
    println!("  full, public key included   {:>6} B", env(false, &a.encode(Some(me.public()))));
    println!("  full, public key cached     {:>6} B", env(false, &a.encode(None)));
    println!("  compact (constrained hops)  {:>6} B", env(true, &a.encode_compact()));
    for rate in [1_200u64, 9_600] {
        println!(
            "  airtime at {rate} bit/s: full {:.1} s, compact {:.2} s",
            env(false, &a.encode(Some(me.public()))) as f64 * 8.0 / rate as f64,
            env(true, &a.encode_compact()) as f64 * 8.0 / rate as f64
        );
    }

    // Memory per path-table entry: the table's own map, then the router with its announce
    // cache, per destination.
    let n = 100_000u32;
    let t = Instant::now();
    let before = live();
    let mut table: HashMap<DestinationHash, PathEntry> = HashMap::new();
    for i in 0..n {
        let mut d = [0u8; 16];
        d[..4].copy_from_slice(&i.to_be_bytes());
        table.insert(
            DestinationHash(d),
            PathEntry {
                next_hop: NeighbourId(1),
                hops: 3,
                cost: 3,
                timestamp_ms: 0,
                learned: t,
                expires: t,
                rtt: None,
                loss_permille: 0,
                verified: true,
            },
        );
    }
    let per_entry = (live() - before) as f64 / f64::from(n);
    drop(table);
    println!("\nMemory:");
    println!("  path-table entry (key + PathEntry + map overhead) {per_entry:>7.0} B");

    let mut rng = SimRng::new(7);
    let star = 2_000usize;
    let before = live();
    let mut sim = MeshSim::new(star + 1, &(1..=star).map(|b| antmesh_host::mesh::sim::Edge { a: 0, b, constrained: true }).collect::<Vec<_>>(), RouterConfig::default(), Instant::now()).unwrap();
    let with_nodes = live();
    sim.keep_events = false;
    sim.announce_all();
    assert!(sim.run(Duration::from_secs(600)));
    // Node 0 now holds `star` destinations; every leaf holds `star` too (via node 0).
    let total = live() - with_nodes;
    let _ = before;
    println!(
        "  router state per known destination, compact announces cached (path + announce + ids) {:>5.0} B",
        total as f64 / ((star + 1) * star) as f64
    );
    drop(sim);

    // Relay forwarding rate: one relay, data from neighbour 1 to a destination behind 2.
    let mut relay = Router::new(ident(2), RouterConfig::default(), (Instant::now(), 1_700_000_000_000), [2; 32]);
    let origin = ident(3);
    let now = Instant::now();
    relay.add_neighbour(now, NeighbourId(1), NeighbourInfo { peer: ident(4).peer_id(), compact: false, cost: 1, announce_rate: 0 });
    relay.add_neighbour(now, NeighbourId(2), NeighbourInfo { peer: origin.peer_id(), compact: false, cost: 1, announce_rate: 0 });
    let svc = ServiceName::new("sink").unwrap();
    let d = DestinationHash::new(&origin.peer_id(), &svc);
    let ann = Announce::sign(
        &origin,
        AnnounceBody { dest: d, service: svc.hash(), peer: origin.peer_id(), timestamp_ms: 1_700_000_000_000, nonce: [0; 8], lifetime_s: 3600, app_data: Vec::new() },
    )
    .unwrap();
    let pkt = Packet::Announce { compact: false, hops: 0, cost: 0, response: None, bytes: &ann.encode(Some(origin.public())) }.encode();
    relay.handle_packet(now, NeighbourId(2), &pkt).unwrap();
    while relay.poll_transmit(now).is_some() {}
    let data = Packet::Data { dest: d, hops: 0, payload: &[0xab; 1024] }.encode();
    let t = Instant::now();
    let mut out = 0u64;
    for _ in 0..forward {
        relay.handle_packet(now, NeighbourId(1), &data).unwrap();
        while let Some((_, p)) = relay.poll_transmit(now) {
            out += p.len() as u64;
        }
    }
    let secs = t.elapsed().as_secs_f64();
    println!("\nRelay forwarding (router only, 1 KiB payloads, one core):");
    println!("  {:.0} packets/s ({:.0} MB/s)", forward as f64 / secs, out as f64 / secs / 1e6);

    // Large mesh.
    println!("\nLarge mesh: {nodes} nodes, {dests} announcing, random graph (spanning tree + {nodes} edges), all hops constrained (compact):");
    let t = Instant::now();
    let edges = random_graph(&mut rng, nodes, nodes, 1.0);
    let mut sim = MeshSim::new(nodes, &edges, RouterConfig::default(), Instant::now()).unwrap();
    sim.keep_events = false;
    let setup = t.elapsed();
    let t = Instant::now();
    let start = sim.now;
    for k in 0..dests {
        let i = k * nodes / dests;
        let now = sim.now;
        let d = sim.dests[i];
        sim.nodes[i].announce(now, &d).unwrap();
    }
    let quiet = sim.run(Duration::from_secs(3600));
    let converged_after = sim.now - start;
    let wall = t.elapsed();
    let mut missing = 0usize;
    for k in 0..dests {
        let i = k * nodes / dests;
        for from in (0..nodes).step_by(97) {
            if from != i && sim.walk(from, i).is_none() {
                missing += 1;
            }
        }
    }
    let per_node_pkts = sim.delivered as f64 / nodes as f64;
    let per_node_bytes = sim.bytes as f64 / nodes as f64;
    let max_deg = {
        let mut deg = vec![0usize; nodes];
        for e in &edges {
            deg[e.a] += 1;
            deg[e.b] += 1;
        }
        deg.into_iter().max().unwrap_or(0)
    };
    println!("  setup {:.1} s (identities), simulation {:.1} s real", setup.as_secs_f64(), wall.as_secs_f64());
    println!("  quiet: {quiet}; converged after {:.2} s virtual (10 ms per broadband hop, 100 ms per constrained hop)", converged_after.as_secs_f64());
    println!("  sampled walks without a loop-free path: {missing}");
    println!(
        "  announce load: {} packets, {:.0} per node received ({:.0} B), {:.2} per node per destination; max degree {max_deg}",
        sim.delivered,
        per_node_pkts,
        per_node_bytes,
        per_node_pkts / dests as f64
    );
}
