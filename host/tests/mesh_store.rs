//! The mesh store: a router's paths, announces and known identities survive a restart,
//! expiry is honoured across it, and a writer killed with SIGKILL mid-write leaves the
//! previous or the next state, never a mix.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use antmesh_host::identity::{Identity, PeerId};
use antmesh_host::mesh::dest::DestinationHash;
use antmesh_host::mesh::router::{MeshEvent, NeighbourId, NeighbourInfo, Router, RouterConfig};
use antmesh_host::mesh::sim::{Edge, MeshSim};
use antmesh_host::mesh::store::{MeshStore, PathRecord, Snapshot};
use zeroize::Zeroizing;

const T0_MS: u64 = 1_700_000_000_000;

#[test]
fn paths_announces_and_keys_come_back_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    // 0 —full— 1 —compact— 2 —full— 3
    let edges = [Edge { a: 0, b: 1, constrained: false }, Edge { a: 1, b: 2, constrained: true }, Edge { a: 2, b: 3, constrained: false }];
    let cfg = RouterConfig { announce_lifetime: Duration::from_secs(600), ..Default::default() };
    let t0 = Instant::now();
    let mut sim = MeshSim::new(4, &edges, cfg.clone(), t0).unwrap();
    sim.announce_all();
    assert!(sim.run(Duration::from_secs(30)));
    let before: Vec<_> = (1..4).map(|k| sim.nodes[0].resolve(&sim.dests[k]).cloned().unwrap()).collect();

    let store = MeshStore::open(&dir.path().join("mesh.redb")).unwrap();
    store.save(&sim.nodes[0].snapshot(sim.now)).unwrap();
    drop(store);

    // "Restart" node 0: a new router with the same identity, state from the store.
    let later = sim.now + Duration::from_secs(60);
    let mut seed = [0u8; 32];
    seed[31] = 0xa5;
    let me = Arc::new(Identity::from_seed(Zeroizing::new(seed)));
    assert_eq!(me.peer_id(), sim.nodes[0].peer_id());
    let mut r = Router::new(me, cfg, (t0, T0_MS), [9; 32]);
    let store = MeshStore::open(&dir.path().join("mesh.redb")).unwrap();
    let snap = store.load(T0_MS + later.duration_since(t0).as_millis() as u64).unwrap();
    assert_eq!((snap.paths.len(), snap.announces.len()), (3, 3));
    assert!(!snap.keys.is_empty());
    r.restore(later, snap);
    // Nothing until the next hop (node 1, by identity) is back; then every path.
    assert!(r.resolve(&sim.dests[3]).is_none());
    let info = NeighbourInfo { peer: sim.nodes[1].peer_id(), compact: false, cost: 1, announce_rate: 0 };
    r.add_neighbour(later, NeighbourId(77), info);
    for (k, b) in (1..4).zip(&before) {
        let p = r.resolve(&sim.dests[k]).unwrap();
        assert_eq!((p.next_hop, p.hops, p.cost, p.timestamp_ms, p.verified), (NeighbourId(77), b.hops, b.cost, b.timestamp_ms, b.verified));
        assert_eq!(r.destination_peer(&sim.dests[k]), Some(sim.nodes[k].peer_id()));
    }
    let learned = std::iter::from_fn(|| r.poll_event()).filter(|e| matches!(e, MeshEvent::PathLearned { .. })).count();
    assert_eq!(learned, 3);
}

#[test]
fn expiry_is_honoured_across_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let store = MeshStore::open(&dir.path().join("mesh.redb")).unwrap();
    let rec = |n: u8, expires_ms| PathRecord {
        dest: DestinationHash([n; 16]),
        next_hop: PeerId([1; 32]),
        hops: 2,
        cost: 2,
        timestamp_ms: T0_MS,
        expires_ms,
        verified: true,
    };
    let snap = Snapshot { paths: vec![rec(1, T0_MS + 1_000), rec(2, T0_MS + 100_000)], ..Default::default() };
    store.save(&snap).unwrap();
    let loaded = store.load(T0_MS + 50_000).unwrap();
    assert_eq!(loaded.paths, vec![rec(2, T0_MS + 100_000)]);
    assert!(store.load(T0_MS + 200_000).unwrap().paths.is_empty());
}

fn generation(k: u64) -> Snapshot {
    let paths = (0..k)
        .map(|i| PathRecord {
            dest: {
                let mut d = [0u8; 16];
                d[..8].copy_from_slice(&i.to_be_bytes());
                DestinationHash(d)
            },
            next_hop: PeerId([7; 32]),
            hops: (k % 200) as u8,
            cost: k as u16,
            timestamp_ms: T0_MS + k,
            expires_ms: u64::MAX,
            verified: false,
        })
        .collect();
    Snapshot { paths, ..Default::default() }
}

/// Not a test on its own: the writer that the test below runs in a child process and kills.
/// Without `ANTMESH_STORE_WRITER` it returns at once.
#[test]
fn store_writer_child_process() {
    let Ok(path) = std::env::var("ANTMESH_STORE_WRITER") else { return };
    let store = MeshStore::open(std::path::Path::new(&path)).unwrap();
    let ready = format!("{path}.ready");
    for k in 1.. {
        store.save(&generation(1 + k % 300)).unwrap();
        if k == 5 {
            std::fs::write(&ready, b"").unwrap();
        }
    }
}

#[test]
fn a_writer_killed_mid_write_leaves_a_whole_generation() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mesh.redb");
    for round in 0..3 {
        let mut child = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["store_writer_child_process", "--exact", "--nocapture", "--test-threads", "1"])
            .env("ANTMESH_STORE_WRITER", &path)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let ready = dir.path().join("mesh.redb.ready");
        let deadline = Instant::now() + Duration::from_secs(60);
        while !ready.exists() {
            assert!(Instant::now() < deadline, "writer never got going");
            std::thread::sleep(Duration::from_millis(5));
        }
        std::thread::sleep(Duration::from_millis(50 + 37 * round));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        std::fs::remove_file(&ready).unwrap();
        let store = MeshStore::open(&path).unwrap();
        let snap = store.load(T0_MS).unwrap();
        let k = snap.paths.len() as u64;
        assert!(k > 0, "round {round}: nothing committed");
        // Every record of one generation, and only that one.
        let mut got = snap.paths.clone();
        got.sort_by_key(|p| p.dest);
        let mut want = generation(k).paths;
        want.sort_by_key(|p| p.dest);
        assert_eq!(got, want, "round {round}: a mixed or partial state");
    }
}
