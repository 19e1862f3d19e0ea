//! Mesh decoders on arbitrary input: packets (with a re-encode round trip), announce bodies
//! and compact announces, sealed key records, and a router fed arbitrary packets from two
//! neighbours with timers in between. No panic; the router's bounds hold.
#![no_main]

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use antmesh_host::identity::{Identity, PeerId};
use antmesh_host::mesh::announce::{Announce, AnnounceBody, CompactAnnounce};
use antmesh_host::mesh::dest::DestinationHash;
use antmesh_host::mesh::packet::Packet;
use antmesh_host::mesh::router::{NeighbourId, NeighbourInfo, Router, RouterConfig};
use antmesh_host::mesh::sealed::RemoteKem;
use libfuzzer_sys::fuzz_target;

fn identity() -> Arc<Identity> {
    static ID: OnceLock<Arc<Identity>> = OnceLock::new();
    Arc::clone(ID.get_or_init(|| Arc::new(Identity::from_seed(zeroize::Zeroizing::new([5; 32])))))
}

fuzz_target!(|data: &[u8]| {
    if let Ok(p) = Packet::decode(data) {
        assert_eq!(p.encode(), data);
    }
    let _ = AnnounceBody::decode(data);
    let _ = CompactAnnounce::decode(data);
    let _ = Announce::decode_verify(data, |_| None);
    let _ = RemoteKem::from_record(&DestinationHash([0; 16]), data);

    let t0 = Instant::now();
    let cfg = RouterConfig { max_paths: 16, max_seen: 64, max_keys: 4, ..RouterConfig::default() };
    let mut r = Router::new(identity(), cfg, (t0, 1_700_000_000_000), [1; 32]);
    for (n, compact) in [(1u32, false), (2, true)] {
        let info = NeighbourInfo { peer: PeerId([n as u8; 32]), compact, cost: 1, announce_rate: 100 };
        r.add_neighbour(t0, NeighbourId(n), info);
    }
    // Records: neighbour selector, length, bytes.
    let mut rest = data;
    let mut now = t0;
    while let Some((&sel, tail)) = rest.split_first() {
        let Some((&n, tail)) = tail.split_first() else { break };
        let (pkt, tail) = tail.split_at(usize::from(n).min(tail.len()));
        rest = tail;
        now += Duration::from_millis(u64::from(sel) * 10);
        let _ = r.handle_packet(now, NeighbourId(1 + u32::from(sel & 1)), pkt);
        r.handle_timeout(now);
        while r.poll_transmit(now).is_some() {}
        while r.poll_event().is_some() {}
        assert!(r.paths().count() <= 16);
    }
});
