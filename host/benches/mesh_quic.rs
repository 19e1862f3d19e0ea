//! The mesh over real post-quantum QUIC on loopback, in one process: path discovery
//! latency over 1–5 hops, probe round trips, and the forwarding rate of a relay.
//!
//! ```text
//! cargo build --release -p antmesh-transport-udp     # the UDP plugin the endpoints load
//! cargo bench -p antmesh-host --bench mesh_quic
//! ```
//!
//! It prints figures; it asserts nothing about them. See docs/performance.md.
//!
//! | variable | default | meaning |
//! |---|---|---|
//! | `ANTMESH_PLUGIN_DIR` | beside the bench binary (`target/release`) | where `libantmesh_udp.so` is |
//! | `ANTMESH_BENCH_RELAY_PACKETS` | 20000 | 1 KiB data packets pushed through the relay |
//!
//! Nodes are the daemon's own mesh hub (`antmesh_host::daemon::hub`) over `P2pEndpoint`s,
//! the same code `antmesh up` runs, without plugins other than UDP and without stores.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use antmesh_host::daemon::hub::{self, ControlRequest, HubConfig, HubInbox, MSG_MESH};
use antmesh_host::daemon::inbox::{Inbox, InboxLimits};
use antmesh_host::identity::Identity;
use antmesh_host::mesh::dest::{DestinationHash, ServiceName};
use antmesh_host::mesh::packet::Packet;
use antmesh_host::mesh::router::{NeighbourId, NeighbourInfo, Router, RouterConfig};
use antmesh_host::plugin::loader;
use antmesh_host::quic::endpoint::{P2pConfig, P2pEndpoint};
use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot, Notify};
use zeroize::Zeroizing;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn plugin_dir() -> PathBuf {
    std::env::var_os("ANTMESH_PLUGIN_DIR").map(PathBuf::from).or_else(loader::default_plugin_dir).unwrap()
}

fn ident(n: u8) -> Arc<Identity> {
    Arc::new(Identity::from_seed(Zeroizing::new([n; 32])))
}

struct Node {
    ep: Arc<P2pEndpoint>,
    hub: mpsc::Sender<ControlRequest>,
    dest: DestinationHash,
}

async fn node(n: u8) -> Node {
    let id = ident(n);
    let mut cfg = P2pConfig::new(Arc::clone(&id), "127.0.0.1:0".parse().unwrap());
    cfg.plugin_dir = Some(plugin_dir());
    let ep = Arc::new(P2pEndpoint::new(cfg).await.unwrap());
    let (tx, rx) = mpsc::channel(hub::CONTROL_QUEUE);
    let inbox: Arc<HubInbox> = Arc::new(Inbox::new(InboxLimits::default()));
    let hub_cfg = HubConfig { store: None, announce_interval: Duration::from_secs(3600), save_interval: Duration::from_secs(3600) };
    tokio::spawn(hub::run(Arc::clone(&id), hub_cfg, Arc::clone(&inbox), rx, Arc::new(Notify::new())));
    tokio::spawn(antmesh_host::daemon::watch_quic(format!("n{n}"), Arc::clone(&ep), inbox));
    let dest = DestinationHash::node(&id.peer_id());
    Node { ep, hub: tx, dest }
}

async fn control(n: &Node, req: Value) -> Value {
    let (tx, rx) = oneshot::channel();
    n.hub.send(ControlRequest { request: req, reply: tx }).await.unwrap();
    rx.await.unwrap()
}

async fn hops_to(n: &Node, d: &DestinationHash) -> Option<u64> {
    let v = control(n, json!({"cmd": "paths"})).await;
    v["paths"].as_array()?.iter().find(|p| p["dest"] == d.to_hex().as_str())?["hops"].as_u64()
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async {
        if loader::load_dir(&plugin_dir()).map(|s| s.get("udp").is_none()).unwrap_or(true) {
            println!("no udp plugin in {}; run `cargo build --release -p antmesh-transport-udp` first", plugin_dir().display());
            return;
        }
        println!("antmesh mesh over PQ QUIC on loopback (one process, 2 worker threads)");

        // A chain 0 — 1 — … — 5. For k = 1..5 a newcomer joins node k-1: the time until
        // node 0 has a path to it is the discovery latency over k hops (QUIC handshake of
        // the newcomer's link excluded: the clock starts once that link is up).
        let mut chain = vec![node(10).await];
        println!("\nPath discovery (newcomer k hops from node 0) and probe round trips:");
        println!("  {:>4}  {:>14}  {:>14}", "hops", "discovery ms", "probe RTT ms");
        for k in 1..=5u8 {
            let newcomer = node(20 + k).await;
            let prev = chain.last().unwrap();
            let addr = newcomer.ep.local_addr().unwrap();
            prev.ep.connect_addr(addr).await.unwrap();
            let t = Instant::now();
            loop {
                if hops_to(&chain[0], &newcomer.dest).await == Some(u64::from(k)) {
                    break;
                }
                tokio::time::sleep(Duration::from_micros(200)).await;
            }
            let discovery = t.elapsed();
            let mut rtts = Vec::new();
            for _ in 0..5 {
                let v = control(&chain[0], json!({"cmd": "probe", "dest": newcomer.dest.to_hex(), "timeout_s": 10})).await;
                rtts.push(v["rtt_ms"].as_f64().unwrap_or(f64::NAN));
            }
            rtts.sort_by(f64::total_cmp);
            println!("  {k:>4}  {:>14.2}  {:>14.2}", discovery.as_secs_f64() * 1e3, rtts[2]);
            chain.push(newcomer);
        }

        // Relay forwarding: A → relay → C, 1 KiB data packets as mesh messages over QUIC
        // (one unidirectional stream per message, as P2pEndpoint::send does). The relay is a
        // bare Router between two endpoints.
        let packets = env_u64("ANTMESH_BENCH_RELAY_PACKETS", 20_000);
        let (ida, idr, idc) = (ident(1), ident(2), ident(3));
        let mk = |id: &Arc<Identity>| {
            let mut c = P2pConfig::new(Arc::clone(id), "127.0.0.1:0".parse().unwrap());
            c.plugin_dir = Some(plugin_dir());
            c.recv_queue = 4096;
            c
        };
        let a = Arc::new(P2pEndpoint::new(mk(&ida)).await.unwrap());
        let r = Arc::new(P2pEndpoint::new(mk(&idr)).await.unwrap());
        let c = Arc::new(P2pEndpoint::new(mk(&idc)).await.unwrap());
        a.connect_addr(r.local_addr().unwrap()).await.unwrap();
        r.connect_addr(c.local_addr().unwrap()).await.unwrap();
        a.connect_addr(c.local_addr().unwrap()).await.unwrap();
        let now = Instant::now();
        let mut router = Router::new(Arc::clone(&idr), RouterConfig::default(), (now, 1_700_000_000_000), [5; 32]);
        router.add_neighbour(now, NeighbourId(1), NeighbourInfo { peer: ida.peer_id(), compact: false, cost: 1, announce_rate: 0 });
        router.add_neighbour(now, NeighbourId(2), NeighbourInfo { peer: idc.peer_id(), compact: false, cost: 1, announce_rate: 0 });
        let svc = ServiceName::new("sink").unwrap();
        let dest = DestinationHash::new(&idc.peer_id(), &svc);
        let ann = antmesh_host::mesh::announce::Announce::sign(
            &idc,
            antmesh_host::mesh::announce::AnnounceBody {
                dest,
                service: svc.hash(),
                peer: idc.peer_id(),
                timestamp_ms: 1_700_000_000_000,
                nonce: [0; 8],
                lifetime_s: 3600,
                app_data: Vec::new(),
            },
        )
        .unwrap();
        let pkt = Packet::Announce { compact: false, hops: 0, cost: 0, response: None, bytes: &ann.encode(Some(idc.public())) }.encode();
        router.handle_packet(now, NeighbourId(2), &pkt).unwrap();
        while router.poll_transmit(now).is_some() {}
        let (cpeer, rpeer) = (idc.peer_id(), idr.peer_id());
        println!("\nRelay over QUIC (A → relay → C, 1 KiB payloads, all three nodes in this process):");
        for datagrams in [false, true] {
            let label = if datagrams { "DATAGRAM frames (what the hub uses for packets that fit)" } else { "one uni stream per packet" };
            let (relayed, relay_secs, relay_cpu) = run_relay(&a, &r, &c, &rpeer, &cpeer, dest, packets, datagrams, &mut router).await;
            let (direct, direct_secs, direct_cpu) = run_direct(&a, &c, &cpeer, dest, packets, datagrams).await;
            let relay_cost = (relay_cpu - direct_cpu).max(1e-9);
            println!("  {label}:");
            println!(
                "    relayed {relayed}/{packets} in {:.2} s ({:.0} packets/s), process CPU {:.2} s; direct A → C {direct}/{packets}, CPU {:.2} s",
                relay_secs,
                relayed as f64 / relay_secs,
                relay_cpu,
                direct_cpu
            );
            let _ = direct_secs;
            println!(
                "    the relay costs {:.1} µs per packet: {:.0} packets/s per core",
                relay_cost / relayed.max(1) as f64 * 1e6,
                relayed as f64 / relay_cost
            );
        }
        a.shutdown().await;
        r.shutdown().await;
        c.shutdown().await;
    });
}

/// Drains `ep`'s messages or datagrams until `n` arrived or none came for a second.
/// Returns how many arrived and when the last one did.
async fn sink(ep: Arc<P2pEndpoint>, n: u64, datagrams: bool) -> (u64, Instant) {
    let mut got = 0u64;
    let mut last = Instant::now();
    while got < n {
        let next = async {
            if datagrams {
                ep.recv_datagram().await.is_ok()
            } else {
                ep.recv().await.is_ok()
            }
        };
        match tokio::time::timeout(Duration::from_secs(1), next).await {
            Ok(true) => {
                got += 1;
                last = Instant::now();
            }
            _ => break,
        }
    }
    (got, last)
}

async fn send(ep: &P2pEndpoint, to: &antmesh_host::identity::PeerId, msg: &[u8], datagrams: bool) {
    if datagrams {
        ep.send_datagram(to, msg).await.unwrap();
    } else {
        ep.send(to, msg).await.unwrap();
    }
}

fn data_msg(dest: DestinationHash) -> Vec<u8> {
    let mut msg = vec![MSG_MESH];
    msg.extend_from_slice(&Packet::Data { dest, hops: 0, payload: &[0xab; 1024] }.encode());
    msg
}

/// A → relay → C. Returns (delivered, seconds, process CPU seconds).
#[allow(clippy::too_many_arguments)]
async fn run_relay(
    a: &Arc<P2pEndpoint>,
    r: &Arc<P2pEndpoint>,
    c: &Arc<P2pEndpoint>,
    rpeer: &antmesh_host::identity::PeerId,
    cpeer: &antmesh_host::identity::PeerId,
    dest: DestinationHash,
    packets: u64,
    datagrams: bool,
    router: &mut Router,
) -> (u64, f64, f64) {
    let msg = data_msg(dest);
    let cpu0 = cpu();
    let t = Instant::now();
    let sink = tokio::spawn(sink(Arc::clone(c), packets, datagrams));
    let relay = async {
        let mut n = 0u64;
        while n < packets {
            let got = if datagrams {
                tokio::time::timeout(Duration::from_secs(1), r.recv_datagram()).await
            } else {
                tokio::time::timeout(Duration::from_secs(1), r.recv()).await
            };
            let Ok(Ok((_, m))) = got else { break };
            let now = Instant::now();
            let _ = router.handle_packet(now, NeighbourId(1), &m[1..]);
            while let Some((_, out)) = router.poll_transmit(now) {
                let mut fwd = vec![MSG_MESH];
                fwd.extend_from_slice(&out);
                send(r, cpeer, &fwd, datagrams).await;
            }
            n += 1;
        }
    };
    let source = async {
        for _ in 0..packets {
            send(a, rpeer, &msg, datagrams).await;
        }
    };
    tokio::join!(relay, source);
    let (got, last) = sink.await.unwrap();
    (got, last.duration_since(t).as_secs_f64(), (cpu() - cpu0).as_secs_f64())
}

/// The same traffic A → C directly.
async fn run_direct(a: &Arc<P2pEndpoint>, c: &Arc<P2pEndpoint>, cpeer: &antmesh_host::identity::PeerId, dest: DestinationHash, packets: u64, datagrams: bool) -> (u64, f64, f64) {
    let msg = data_msg(dest);
    let cpu0 = cpu();
    let t = Instant::now();
    let sink = tokio::spawn(sink(Arc::clone(c), packets, datagrams));
    for _ in 0..packets {
        send(a, cpeer, &msg, datagrams).await;
    }
    let (got, last) = sink.await.unwrap();
    (got, last.duration_since(t).as_secs_f64(), (cpu() - cpu0).as_secs_f64())
}

fn cpu() -> Duration {
    let mut ru = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage writes the struct it is given.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, ru.as_mut_ptr()) };
    // SAFETY: initialised by getrusage (zeroed before in any case).
    let ru = unsafe { ru.assume_init() };
    Duration::new(ru.ru_utime.tv_sec as u64, ru.ru_utime.tv_usec as u32 * 1000) + Duration::new(ru.ru_stime.tv_sec as u64, ru.ru_stime.tv_usec as u32 * 1000)
}
