//! The sans-IO router on simulated graphs: discovery over several hops, path requests
//! answered from caches, forwarding, convergence to cheapest loop-free paths on random
//! graphs with churn, a 1,000-node run, and the announce attacks.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::{Duration, Instant};

use antmesh_host::link::sim::SimRng;
use antmesh_host::mesh::router::{DropReason, MeshEvent, RouterConfig};
use antmesh_host::mesh::sim::{connected, random_graph, Edge, MeshSim};

fn line(n: usize, constrained: bool) -> Vec<Edge> {
    (1..n).map(|b| Edge { a: b - 1, b, constrained }).collect()
}

#[test]
fn an_announce_crosses_a_chain_and_data_follows_the_path() {
    let mut sim = MeshSim::new(4, &line(4, false), RouterConfig::default(), Instant::now()).unwrap();
    let now = sim.now;
    let d3 = sim.dests[3];
    sim.nodes[3].announce(now, &d3).unwrap();
    assert!(sim.run(Duration::from_secs(10)));
    let p = sim.nodes[0].resolve(&d3).unwrap();
    assert_eq!((p.hops, p.cost, p.verified), (3, 3, true));
    assert_eq!(sim.nodes[0].destination_peer(&d3), Some(sim.nodes[3].peer_id()));
    sim.nodes[0].send_to(d3, b"over three hops").unwrap();
    assert!(sim.run(Duration::from_secs(10)));
    assert!(sim.events.iter().any(|(k, e)| *k == 3 && matches!(e, MeshEvent::Delivered { payload, .. } if payload == b"over three hops")));
    assert_eq!(sim.nodes[1].stats().forwarded + sim.nodes[2].stats().forwarded, 2);
}

#[test]
fn a_path_request_is_answered_from_a_cache() {
    // 0 - 1 - 2 - 3; 3 announces before 0 is attached; 0 then asks. (Without the replay
    // of known paths to a new neighbour, which would answer before the request.)
    let cfg = RouterConfig { replay_on_connect: false, ..Default::default() };
    let mut sim = MeshSim::new(4, &line(4, false)[1..], cfg, Instant::now()).unwrap();
    let now = sim.now;
    let d3 = sim.dests[3];
    sim.nodes[3].announce(now, &d3).unwrap();
    assert!(sim.run(Duration::from_secs(10)));
    sim.connect(Edge { a: 0, b: 1, constrained: true });
    assert!(sim.nodes[0].resolve(&d3).is_none());
    let sent_by_3 = sim.nodes[3].stats().packets_out;
    let now = sim.now;
    sim.nodes[0].request_path(now, d3);
    assert!(sim.run(Duration::from_secs(10)));
    let p = sim.nodes[0].resolve(&d3).unwrap();
    assert_eq!(p.hops, 3);
    // Node 1 answered from its cache: the request never reached node 3.
    assert_eq!(sim.nodes[3].stats().packets_out, sent_by_3);
    assert!(!p.verified, "the answer crossed a constrained hop in compact form");
}

fn check_converged(sim: &MeshSim) {
    let n = sim.nodes.len();
    for to in 0..n {
        let best = sim.least_costs(to);
        for (from, least) in best.iter().enumerate() {
            if from == to {
                continue;
            }
            let hops = sim.walk(from, to);
            assert!(hops.is_some(), "no loop-free path {from} → {to}");
            let p = sim.nodes[from].resolve(&sim.dests[to]).unwrap();
            assert_eq!(Some(u32::from(p.cost)), *least, "path {from} → {to} is not the cheapest");
        }
    }
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig { cases: 16, ..Default::default() })]
    /// Random connected graphs, mixed hops: after every node announces, every node has a
    /// loop-free, cheapest path to every destination. Then links fail and come back, nodes
    /// re-announce, and the same holds on the new graph.
    #[test]
    fn random_graphs_converge_loop_free_through_churn(seed in proptest::prelude::any::<u64>(), n in 3usize..30, extra in 0usize..30) {
        let mut rng = SimRng::new(seed);
        let edges = random_graph(&mut rng, n, extra, 0.3);
        let mut sim = MeshSim::new(n, &edges, RouterConfig { identity_burst: 100, ..Default::default() }, Instant::now()).unwrap();
        sim.announce_all();
        proptest::prop_assert!(sim.run(Duration::from_secs(60)));
        check_converged(&sim);
        for _round in 0..3 {
            // Drop a few edges that keep the graph connected, add a few new ones.
            for _ in 0..3 {
                if sim.edges.is_empty() { break; }
                let e = sim.edges[(rng.next_u64() % sim.edges.len() as u64) as usize];
                let rest: Vec<Edge> = sim.edges.iter().copied().filter(|x| *x != e).collect();
                if connected(n, &rest) {
                    sim.disconnect(e.a, e.b);
                }
            }
            let (a, b) = ((rng.next_u64() % n as u64) as usize, (rng.next_u64() % n as u64) as usize);
            if a != b && sim.neighbour_id(a, b).is_none() {
                sim.connect(Edge { a, b, constrained: rng.unit() < 0.3 });
            }
            sim.advance(Duration::from_secs(30));
            sim.announce_all();
            proptest::prop_assert!(sim.run(Duration::from_secs(60)));
            check_converged(&sim);
        }
    }
}

#[test]
fn a_thousand_nodes_converge() {
    let mut rng = SimRng::new(1000);
    let n = 1000;
    // Every hop constrained: compact announces, so the run costs hashing, not a million
    // ML-DSA verifications (the random-graph test above mixes both forms).
    let edges = random_graph(&mut rng, n, n, 1.0);
    let mut sim = MeshSim::new(n, &edges, RouterConfig::default(), Instant::now()).unwrap();
    sim.keep_events = false;
    sim.announce_all();
    assert!(sim.run(Duration::from_secs(600)));
    for to in [0usize, 1, 499, 998, 999] {
        let best = sim.least_costs(to);
        for from in (0..n).step_by(37) {
            if from == to {
                continue;
            }
            assert!(sim.walk(from, to).is_some(), "{from} → {to}");
            assert_eq!(Some(u32::from(sim.nodes[from].resolve(&sim.dests[to]).unwrap().cost)), best[from]);
        }
    }
    let total: usize = sim.nodes.iter().map(|r| r.paths().count()).sum();
    assert_eq!(total, n * (n - 1));
    println!("1,000 nodes, {} edges: {} packets, {} bytes, {:?} virtual", sim.edges.len(), sim.delivered, sim.bytes, sim.now);
}

/// The packet node `from` sends to node `to` right after announcing at `at`.
fn announce_packet(sim: &mut MeshSim, from: usize, to: usize, at: Instant) -> Vec<u8> {
    let d = sim.dests[from];
    sim.nodes[from].announce(at, &d).unwrap();
    let mut pkt = None;
    while let Some((n, b)) = sim.nodes[from].poll_transmit(at) {
        if sim.other_end(from, n) == Some(to) {
            pkt = Some(b);
        }
    }
    pkt.unwrap()
}

#[test]
fn probes_keep_smoothed_rtt_and_loss_on_the_path() {
    let mut sim = MeshSim::new(2, &line(2, false), RouterConfig::default(), Instant::now()).unwrap();
    sim.announce_all();
    assert!(sim.run(Duration::from_secs(10)));
    let d = sim.dests[1];
    let r = &mut sim.nodes[0];
    r.record_probe(&d, Some(Duration::from_millis(80)));
    assert_eq!(r.resolve(&d).map(|p| (p.rtt, p.loss_permille)), Some((Some(Duration::from_millis(80)), 0)));
    r.record_probe(&d, Some(Duration::from_millis(160)));
    r.record_probe(&d, None);
    let p = r.resolve(&d).unwrap();
    assert_eq!(p.rtt, Some(Duration::from_millis(90)));
    assert_eq!(p.loss_permille, 125);
}

#[test]
fn a_new_neighbour_is_told_the_known_paths() {
    let mut sim = MeshSim::new(4, &line(4, false)[1..], RouterConfig::default(), Instant::now()).unwrap();
    sim.announce_all();
    assert!(sim.run(Duration::from_secs(10)));
    sim.connect(Edge { a: 0, b: 1, constrained: false });
    assert!(sim.run(Duration::from_secs(10)));
    for k in 1..4 {
        assert_eq!(sim.nodes[0].resolve(&sim.dests[k]).map(|p| p.hops), Some(k as u8));
        assert!(sim.nodes[k].resolve(&sim.dests[0]).is_some(), "node {k} has no path to the newcomer");
    }
}

#[test]
fn forged_replayed_and_expired_announces_are_dropped() {
    let cfg = RouterConfig { announce_lifetime: Duration::from_secs(100), ..Default::default() };
    let mut sim = MeshSim::new(3, &line(3, false), cfg, Instant::now()).unwrap();
    let now = sim.now;
    let d2 = sim.dests[2];
    let from = sim.neighbour_id(1, 2).unwrap();
    let pkt = announce_packet(&mut sim, 2, 1, now);
    // Replayed: the same announce again is a duplicate.
    assert_eq!(sim.nodes[1].handle_packet(now, from, &pkt), Ok(()));
    assert_eq!(sim.nodes[1].handle_packet(now, from, &pkt), Err(DropReason::Duplicate));
    // Once a newer announce is in, the old one replayed is stale.
    let later = now + Duration::from_secs(5);
    let newer = announce_packet(&mut sim, 2, 1, later);
    assert_eq!(sim.nodes[1].handle_packet(later, from, &newer), Ok(()));
    assert!(matches!(sim.nodes[1].handle_packet(later, from, &pkt), Err(DropReason::Stale(_))));

    let mut fresh = MeshSim::new(3, &line(3, false), RouterConfig::default(), now).unwrap();
    let f = fresh.neighbour_id(1, 2).unwrap();
    // Forged: one flipped bit in the signed part (envelope 5 bytes, then the body).
    let mut forged = pkt.clone();
    forged[5 + 70] ^= 1;
    assert!(matches!(fresh.nodes[1].handle_packet(now, f, &forged), Err(DropReason::Announce(_))));
    assert!(fresh.nodes[1].resolve(&d2).is_none());
    // Expired: the original, delivered after its 100 s lifetime.
    let late = now + Duration::from_secs(101);
    assert!(matches!(fresh.nodes[1].handle_packet(late, f, &pkt), Err(DropReason::Expired(_))));
    assert!(fresh.nodes[1].resolve(&d2).is_none());
    // From a node that is not a neighbour: refused before anything else.
    assert!(matches!(
        fresh.nodes[0].handle_packet(now, antmesh_host::mesh::router::NeighbourId(999), &pkt),
        Err(DropReason::UnknownNeighbour(_))
    ));
}

#[test]
fn an_announce_flood_from_one_identity_is_rate_limited_while_others_converge() {
    // A star: node 0 in the middle, 1..=5 around it. Node 1 floods.
    let edges: Vec<Edge> = (1..6).map(|b| Edge { a: 0, b, constrained: false }).collect();
    let cfg = RouterConfig { identity_burst: 2, identity_interval: Duration::from_secs(60), ..Default::default() };
    let mut sim = MeshSim::new(6, &edges, cfg, Instant::now()).unwrap();
    let d1 = sim.dests[1];
    for i in 0..50 {
        let at = sim.now + Duration::from_millis(i);
        sim.nodes[1].announce(at, &d1).unwrap();
    }
    sim.announce_all();
    assert!(sim.run(Duration::from_secs(30)));
    let limited = sim.nodes[0].stats().rate_limited;
    assert!(limited >= 45, "only {limited} announces of the flood were limited");
    // Node 0 passed at most the burst of node 1's announces on to each other node.
    for k in 2..6 {
        let from_1 = sim.events.iter().filter(|(n, e)| *n == k && matches!(e, MeshEvent::PathLearned { dest, .. } if *dest == d1)).count();
        assert!(from_1 <= 2, "node {k} learnt {from_1} announces of the flood");
    }
    check_converged(&sim);
}

/// After its path is lost, a node refuses the same announce back from a neighbour unless it
/// is cheaper than the lost path (that copy may run through the node itself).
#[test]
fn a_lost_path_does_not_come_back_through_a_loop() {
    let mut sim = MeshSim::new(3, &line(3, false), RouterConfig::default(), Instant::now()).unwrap();
    let now = sim.now;
    let pkt = announce_packet(&mut sim, 2, 1, now);
    let from2 = sim.neighbour_id(1, 2).unwrap();
    assert_eq!(sim.nodes[1].handle_packet(now, from2, &pkt), Ok(()));
    assert_eq!(sim.nodes[1].resolve(&sim.dests[2]).map(|p| p.cost), Some(1));
    sim.disconnect(1, 2);
    assert!(sim.nodes[1].resolve(&sim.dests[2]).is_none());
    // The same announce, as node 0 would relay it from its (now stale) path via node 1.
    let mut relayed = pkt.clone();
    relayed[1] = 2; // hops
    relayed[2..4].copy_from_slice(&2u16.to_be_bytes()); // cost
    let from0 = sim.neighbour_id(1, 0).unwrap();
    assert_eq!(sim.nodes[1].handle_packet(now, from0, &relayed), Err(DropReason::Infeasible(sim.dests[2])));
    assert!(sim.nodes[1].resolve(&sim.dests[2]).is_none());
    // A newer announce from the destination is taken whatever its cost.
    sim.connect(Edge { a: 1, b: 2, constrained: false });
    let later = now + Duration::from_secs(1);
    let fresh = announce_packet(&mut sim, 2, 1, later);
    let from2 = sim.neighbour_id(1, 2).unwrap();
    assert_eq!(sim.nodes[1].handle_packet(later, from2, &fresh), Ok(()));
}
