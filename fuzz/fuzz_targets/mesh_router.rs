//! A router fed by hostile neighbours: arbitrary packets, and compact announces built from
//! the input (destination bindings made right, so they reach the table), neighbours coming
//! and going, time passing. Whatever arrives, the router neither panics nor outgrows its
//! table.
#![no_main]

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use antmesh_host::identity::{Identity, PeerId};
use antmesh_host::mesh::announce::AnnounceBody;
use antmesh_host::mesh::dest::{DestinationHash, ServiceHash};
use antmesh_host::mesh::packet::Packet;
use antmesh_host::mesh::router::{NeighbourId, NeighbourInfo, Router, RouterConfig};
use libfuzzer_sys::fuzz_target;

fn identity() -> Arc<Identity> {
    static ID: OnceLock<Arc<Identity>> = OnceLock::new();
    Arc::clone(ID.get_or_init(|| Arc::new(Identity::from_seed(zeroize::Zeroizing::new([5; 32])))))
}

const T0_MS: u64 = 1_700_000_000_000;

fuzz_target!(|data: &[u8]| {
    let cfg = RouterConfig { max_paths: 16, max_pathless: 4, max_unverified_per_neighbour: 6, max_replay: 8, ..RouterConfig::default() };
    let t0 = Instant::now();
    let mut r = Router::new(identity(), cfg, (t0, T0_MS), [9; 32]);
    let mut now = t0;
    let mut next = 0u32;
    let mut up: Vec<u32> = Vec::new();
    let mut rest = data;
    while let Some((&sel, tail)) = rest.split_first() {
        let Some((&n, tail)) = tail.split_first() else { break };
        let (bytes, tail) = tail.split_at(usize::from(n).min(tail.len()));
        rest = tail;
        let from = up.get(usize::from(sel) % up.len().max(1)).copied();
        match sel % 8 {
            0 => {
                next += 1;
                let peer = PeerId([sel; 32]);
                r.add_neighbour(now, NeighbourId(next), NeighbourInfo { peer, compact: sel & 0x10 != 0, cost: u16::from(n), announce_rate: u64::from(sel & 0x20) });
                up.push(next);
            }
            1 => {
                if let Some(id) = from {
                    r.remove_neighbour(NeighbourId(id));
                    up.retain(|x| *x != id);
                }
            }
            2 => {
                now += Duration::from_secs(u64::from(n) * 30);
                r.handle_timeout(now);
            }
            3 | 4 => {
                // A compact announce whose fields come from the input.
                let mut b = [0u8; 64];
                b[..bytes.len().min(64)].copy_from_slice(&bytes[..bytes.len().min(64)]);
                let peer = PeerId(b[..32].try_into().unwrap_or([0; 32]));
                let service = ServiceHash(b[32..40].try_into().unwrap_or([0; 8]));
                let ts = T0_MS.wrapping_add(u64::from_be_bytes(b[40..48].try_into().unwrap_or([0; 8])) % 400_000_000).wrapping_sub(200_000_000);
                let body = AnnounceBody {
                    dest: DestinationHash::from_parts(&peer, &service),
                    service,
                    peer,
                    timestamp_ms: ts,
                    nonce: [0; 8],
                    lifetime_s: u32::from_be_bytes(b[48..52].try_into().unwrap_or([0; 4])),
                    app_data: Vec::new(),
                };
                let mut c = body.encode(0);
                c.extend_from_slice(&b[48..64]);
                let pkt = Packet::Announce { compact: true, hops: b[52] % 40, cost: u16::from(b[53]), response: None, bytes: &c }.encode();
                if let Some(id) = from {
                    let _ = r.handle_packet(now, NeighbourId(id), &pkt);
                }
            }
            _ => {
                if let Some(id) = from {
                    let _ = r.handle_packet(now, NeighbourId(id), bytes);
                }
            }
        }
        while r.poll_transmit(now).is_some() {}
        while r.poll_event().is_some() {}
        let (held, unverified) = r.destinations();
        assert!(held <= 16 && unverified <= held);
        assert!(r.paths().count() <= held);
        let _ = r.take_changes();
    }
});
