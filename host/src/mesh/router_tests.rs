//! The router against hostile neighbours: table bounds, budgets, eviction order, paced
//! replay, restore of a poisoned store, incremental changes; and the indexes' invariants
//! under any sequence of announces.

use super::*;
use crate::mesh::announce::AnnounceBody;
use crate::mesh::dest::ServiceHash;
use proptest::prelude::*;
use zeroize::Zeroizing;

const T0_MS: u64 = 1_700_000_000_000;

fn ident(n: u8) -> Arc<Identity> {
    Arc::new(Identity::from_seed(Zeroizing::new([n; 32])))
}

fn router(cfg: RouterConfig) -> (Router, Instant) {
    let now = Instant::now();
    (Router::new(ident(200), cfg, (now, T0_MS), [7; 32]), now)
}

fn quic(peer: u8) -> NeighbourInfo {
    NeighbourInfo { peer: ident(peer).peer_id(), compact: false, cost: 1, announce_rate: 0 }
}

/// A compact announce for a random-looking destination of identity `k` (not signed: a
/// compact announce needs no key, which is what makes floods of them cheap).
fn compact_packet(k: u32, ts: u64, lifetime_s: u32) -> Vec<u8> {
    let mut p = [0u8; 32];
    p[..4].copy_from_slice(&k.to_be_bytes());
    let peer = PeerId(p);
    let service = ServiceHash([9; 8]);
    let body = AnnounceBody { dest: DestinationHash::from_parts(&peer, &service), service, peer, timestamp_ms: ts, nonce: [1; 8], lifetime_s, app_data: Vec::new() };
    let mut bytes = body.encode(0);
    bytes.extend_from_slice(&[k as u8; ID_LEN]);
    Packet::Announce { compact: true, hops: 0, cost: 0, response: None, bytes: &bytes }.encode()
}

fn dest_of(k: u32) -> DestinationHash {
    let mut p = [0u8; 32];
    p[..4].copy_from_slice(&k.to_be_bytes());
    DestinationHash::from_parts(&PeerId(p), &ServiceHash([9; 8]))
}

/// A signed full announce (with key) of identity `n`'s destination for `service`.
fn full_packet(n: u8, service: &str, ts: u64) -> (Vec<u8>, DestinationHash) {
    let id = ident(n);
    let svc = ServiceName::new(service).unwrap();
    let dest = DestinationHash::new(&id.peer_id(), &svc);
    let body = AnnounceBody { dest, service: svc.hash(), peer: id.peer_id(), timestamp_ms: ts, nonce: [n; 8], lifetime_s: 3600, app_data: Vec::new() };
    let a = Announce::sign(&id, body).unwrap();
    (Packet::Announce { compact: false, hops: 0, cost: 0, response: None, bytes: &a.encode(Some(id.public())) }.encode(), dest)
}

impl Router {
    /// Every index agrees with the tables it indexes, and every bound holds.
    fn check_invariants(&self) {
        assert_eq!(self.evict.len(), self.cache.len(), "eviction index");
        assert_eq!(self.cache_expiry.len(), self.cache.len(), "cache expiry index");
        assert_eq!(self.path_expiry.len(), self.paths.len(), "path expiry index");
        assert_eq!(self.by_freshness.len(), self.paths.len(), "freshness index");
        assert_eq!(self.paths_by_hop.values().map(HashSet::len).sum::<usize>(), self.paths.len(), "next-hop index");
        assert!(self.cache.len() <= self.cfg.max_paths, "table over its cap");
        for (d, p) in &self.paths {
            let c = self.cache.get(d).expect("every path has its announce");
            assert!(self.path_expiry.contains(&(p.expires, *d)));
            assert!(!p.verified || c.full.is_some(), "a verified path without a verified announce");
            assert_eq!(p.timestamp_ms, c.body.timestamp_ms, "a path from another announce than the one held");
            assert!(self.neighbours.contains_key(&p.next_hop), "a path through a neighbour that is gone");
        }
        let mut pathless = 0;
        let mut unverified: HashMap<NeighbourId, usize> = HashMap::new();
        for (d, c) in &self.cache {
            assert!(self.evict.contains(&c.evict_key) && c.evict_key.2 == *d);
            let has_path = self.paths.contains_key(d) || self.restored_dest.contains_key(d);
            assert_eq!(c.evict_key.0, u8::from(c.full.is_some()) * 2 + u8::from(has_path), "stale eviction class");
            pathless += usize::from(!has_path);
            if let (None, Some(from)) = (&c.full, c.from) {
                *unverified.entry(from).or_default() += 1;
            }
        }
        assert_eq!(pathless, self.pathless, "path-less count");
        for (id, n) in &self.neighbours {
            assert_eq!(n.unverified, unverified.get(id).copied().unwrap_or(0), "unverified count of {id:?}");
            assert!(n.unverified <= self.cfg.max_unverified_per_neighbour);
        }
    }
}

#[test]
fn a_compact_flood_is_held_to_the_neighbours_share_and_never_evicts_verified_destinations() {
    let cfg = RouterConfig { max_paths: 100, max_unverified_per_neighbour: 30, max_pathless: 20, ..Default::default() };
    let (mut r, now) = router(cfg);
    let (honest, attacker) = (NeighbourId(1), NeighbourId(2));
    r.add_neighbour(now, honest, quic(1));
    r.add_neighbour(now, attacker, quic(2));
    // 60 honest, verified destinations.
    let mut honest_dests = Vec::new();
    for n in 0..60u8 {
        let (pkt, d) = full_packet(10 + n % 100, &format!("svc{n}"), T0_MS);
        r.handle_packet(now, honest, &pkt).unwrap();
        honest_dests.push(d);
    }
    // The attacker floods compact announces with the longest lifetime and the furthest
    // future timestamp it may.
    let future = T0_MS + r.cfg.max_skew.as_millis() as u64;
    let mut refused = HashMap::new();
    for k in 0..1000u32 {
        if let Err(e) = r.handle_packet(now, attacker, &compact_packet(k, future, u32::MAX)) {
            *refused.entry(std::mem::discriminant(&e)).or_insert(0) += 1;
        }
    }
    r.check_invariants();
    let (held, unverified) = r.destinations();
    assert_eq!(unverified, 30, "the attacker's share");
    assert_eq!(held, 90);
    for d in &honest_dests {
        assert!(r.resolve(d).is_some_and(|p| p.verified), "an honest destination was displaced");
    }
    // Its lifetimes were capped: 6 h after the timestamp, not 136 years.
    let p = r.resolve(&dest_of(0)).unwrap();
    assert!(p.expires <= now + r.cfg.max_skew + r.cfg.max_lifetime);
    // It leaves: its paths go, and of its now path-less entries at most `max_pathless` stay.
    r.remove_neighbour(attacker);
    r.check_invariants();
    assert_eq!(r.destinations(), (60 + 20, 20));
    assert!(honest_dests.iter().all(|d| r.resolve(d).is_some()));
}

#[test]
fn a_full_table_takes_a_verified_newcomer_but_not_an_unverified_one() {
    let cfg = RouterConfig { max_paths: 10, max_unverified_per_neighbour: 10, ..Default::default() };
    let (mut r, now) = router(cfg);
    r.add_neighbour(now, NeighbourId(1), quic(1));
    for n in 0..10u8 {
        r.handle_packet(now, NeighbourId(1), &full_packet(20 + n, "a", T0_MS).0).unwrap();
    }
    assert_eq!(r.handle_packet(now, NeighbourId(1), &compact_packet(1, T0_MS, 3600)), Err(DropReason::TableFull));
    // A verified newcomer evicts the verified entry closest to expiry.
    let (pkt, d) = full_packet(40, "b", T0_MS + 1000);
    r.handle_packet(now, NeighbourId(1), &pkt).unwrap();
    assert!(r.resolve(&d).is_some());
    assert_eq!(r.stats().evicted, 1);
    r.check_invariants();
}

#[test]
fn verifications_are_budgeted_per_neighbour_and_in_all_and_forgeries_are_named() {
    let cfg = RouterConfig { verify_rate: 1.0, verify_burst: 3, verify_rate_total: 1.0, verify_burst_total: 5, ..Default::default() };
    let (mut r, now) = router(cfg);
    r.add_neighbour(now, NeighbourId(1), quic(1));
    r.add_neighbour(now, NeighbourId(2), quic(2));
    let mut outcomes = Vec::new();
    for n in 0..4u8 {
        outcomes.push(r.handle_packet(now, NeighbourId(1), &full_packet(30 + n, "v", T0_MS).0).is_ok());
    }
    assert_eq!(outcomes, [true, true, true, false], "neighbour 1's burst of 3");
    assert_eq!(r.handle_packet(now, NeighbourId(1), &full_packet(40, "v", T0_MS).0), Err(DropReason::VerifyBudget));
    // Neighbour 2 has its own burst, but only 2 of the total's 5 are left.
    assert!(r.handle_packet(now, NeighbourId(2), &full_packet(41, "v", T0_MS).0).is_ok());
    assert!(r.handle_packet(now, NeighbourId(2), &full_packet(42, "v", T0_MS).0).is_ok());
    assert_eq!(r.handle_packet(now, NeighbourId(2), &full_packet(43, "v", T0_MS).0), Err(DropReason::VerifyBudget));
    assert_eq!(r.stats().verified, 5);
    // A second later both have one more.
    let later = now + Duration::from_secs(1);
    let (mut forged, _) = full_packet(44, "v", T0_MS);
    let last = forged.len() - 1;
    forged[last] ^= 1;
    let e = r.handle_packet(later, NeighbourId(2), &forged).unwrap_err();
    assert!(e.is_forgery(), "{e:?}");
    assert!(!DropReason::VerifyBudget.is_forgery() && !DropReason::Duplicate.is_forgery());
}

#[test]
fn new_announces_from_one_neighbour_are_rate_limited() {
    let cfg = RouterConfig { neighbour_announce_rate: 10.0, neighbour_announce_burst: 20, ..Default::default() };
    let (mut r, now) = router(cfg);
    r.add_neighbour(now, NeighbourId(1), quic(1));
    let ok = (0..50u32).filter(|k| r.handle_packet(now, NeighbourId(1), &compact_packet(*k, T0_MS, 3600)).is_ok()).count();
    assert_eq!(ok, 20);
    let later = now + Duration::from_secs(1);
    let ok = (50..100u32).filter(|k| r.handle_packet(later, NeighbourId(1), &compact_packet(*k, T0_MS, 3600)).is_ok()).count();
    assert_eq!(ok, 10);
    assert_eq!(r.stats().neighbour_limited, 30 + 40);
}

#[test]
fn forged_compact_announces_do_not_spend_the_real_identitys_tokens() {
    let cfg = RouterConfig { identity_burst: 2, ..Default::default() };
    let (mut r, now) = router(cfg);
    r.add_neighbour(now, NeighbourId(1), quic(1));
    r.add_neighbour(now, NeighbourId(2), quic(2));
    // Compact announces naming identity 50's destination, newer each time.
    let id = ident(50);
    let svc = ServiceName::new("x").unwrap();
    let dest = DestinationHash::new(&id.peer_id(), &svc);
    for i in 0..5u64 {
        let body = AnnounceBody { dest, service: svc.hash(), peer: id.peer_id(), timestamp_ms: T0_MS - 10_000 + i, nonce: [0; 8], lifetime_s: 60, app_data: Vec::new() };
        let mut bytes = body.encode(0);
        bytes.extend_from_slice(&[i as u8; ID_LEN]);
        let _ = r.handle_packet(now, NeighbourId(2), &Packet::Announce { compact: true, hops: 0, cost: 0, response: None, bytes: &bytes }.encode());
    }
    // The real, signed announce still passes the identity's limit.
    assert_eq!(r.handle_packet(now, NeighbourId(1), &full_packet(50, "x", T0_MS).0), Ok(()));
    assert!(r.resolve(&dest).is_some_and(|p| p.verified));
}

#[test]
fn a_new_neighbour_gets_a_bounded_paced_replay() {
    let cfg = RouterConfig { max_replay: 50, replay_rate: 1000, neighbour_announce_rate: 1000.0, ..Default::default() };
    let (mut r, now) = router(cfg);
    r.add_neighbour(now, NeighbourId(1), quic(1));
    for k in 0..200u32 {
        r.handle_packet(now, NeighbourId(1), &compact_packet(k, T0_MS + u64::from(k), 3600)).unwrap();
    }
    while r.poll_transmit(now).is_some() {}
    r.add_neighbour(now, NeighbourId(2), quic(2));
    let mut t = now;
    let mut sent = 0;
    let mut newest = 0;
    for _ in 0..100 {
        while let Some((to, pkt)) = r.poll_transmit(t) {
            if to == NeighbourId(2) {
                sent += 1;
                if let Ok(Packet::Announce { bytes, .. }) = Packet::decode(&pkt) {
                    newest = newest.max(CompactAnnounce::decode(bytes).unwrap().body.timestamp_ms);
                }
            }
        }
        let Some(next) = r.poll_timeout(t) else { break };
        let elapsed = t.saturating_duration_since(now);
        // At 1,000 B/s with a second's allowance to start, 99-byte compact announces, the
        // last of which may overdraw: at most (1,000 + 1,000 t) / 99 + 1.
        assert!(sent as f64 <= 1.0 + (1000.0 + 1000.0 * elapsed.as_secs_f64()) / 99.0 + 1e-6, "{sent} sent in {elapsed:?}");
        if next > now + Duration::from_secs(30) {
            break;
        }
        t = next;
        r.handle_timeout(t);
    }
    assert_eq!(sent, 50, "bounded by max_replay");
    assert_eq!(newest, T0_MS + 199, "newest first");
}

#[test]
fn a_poisoned_store_comes_back_unverified_and_capped() {
    let cfg = RouterConfig { max_paths: 100, max_unverified_per_neighbour: 100, max_pathless: 100, ..Default::default() };
    let (mut r, now) = router(cfg.clone());
    r.add_neighbour(now, NeighbourId(1), quic(1));
    r.add_neighbour(now, NeighbourId(2), quic(2));
    for n in 0..10u8 {
        r.handle_packet(now, NeighbourId(1), &full_packet(60 + n, "s", T0_MS).0).unwrap();
    }
    for k in 0..90u32 {
        r.handle_packet(now, NeighbourId(2), &compact_packet(k, T0_MS, u32::MAX)).unwrap();
    }
    let mut snap = r.snapshot(now);
    // A store edited to call every path verified.
    for p in &mut snap.paths {
        p.verified = true;
    }
    let (mut back, _) = router(cfg);
    back.restore(now, snap);
    back.check_invariants();
    let (held, unverified) = back.destinations();
    assert_eq!((held, unverified), (10 + 25, 25), "unverified capped at a quarter of the table");
    // When neighbour 2 comes back, its restored paths are unverified whatever the record said.
    back.add_neighbour(now, NeighbourId(7), quic(2));
    back.add_neighbour(now, NeighbourId(8), quic(1));
    back.check_invariants();
    assert_eq!(back.paths().filter(|(_, p)| p.verified).count(), 10);
    assert_eq!(back.paths().count(), 35);
}

#[test]
fn changes_are_what_changed() {
    let (mut r, now) = router(RouterConfig::default());
    r.add_neighbour(now, NeighbourId(1), quic(1));
    r.handle_packet(now, NeighbourId(1), &full_packet(70, "c", T0_MS).0).unwrap();
    let ch = r.take_changes();
    assert_eq!((ch.paths.len(), ch.announces.len(), ch.keys.len()), (1, 1, 1));
    assert!(ch.paths[0].1.as_ref().is_some_and(|p| p.verified));
    assert!(!r.has_changes());
    let d = dest_of(3);
    r.handle_packet(now, NeighbourId(1), &compact_packet(3, T0_MS, 3600)).unwrap();
    let ch = r.take_changes();
    assert_eq!(ch.paths.iter().map(|(x, _)| *x).collect::<Vec<_>>(), vec![d]);
    // The neighbour goes: both paths are to be deleted; the announces stay.
    r.remove_neighbour(NeighbourId(1));
    let ch = r.take_changes();
    assert_eq!(ch.paths.len(), 2);
    assert!(ch.paths.iter().all(|(_, p)| p.is_none()) && ch.announces.iter().all(|(_, a)| a.is_some()));
    r.restore_changes(&ch);
    assert!(r.has_changes());
}

#[test]
fn expiry_runs_off_the_indexes() {
    let cfg = RouterConfig { max_lifetime: Duration::from_secs(100), ..Default::default() };
    let (mut r, now) = router(cfg);
    r.add_neighbour(now, NeighbourId(1), quic(1));
    for k in 0..10u32 {
        r.handle_packet(now, NeighbourId(1), &compact_packet(k, T0_MS + u64::from(k) * 1000, 3600)).unwrap();
    }
    // Capped at 100 s after each timestamp: the first expires at 100 s.
    assert_eq!(r.poll_timeout(now), Some(now + Duration::from_secs(100)));
    r.handle_timeout(now + Duration::from_millis(104_500));
    assert_eq!(r.destinations().0, 5);
    r.check_invariants();
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]
    /// Any sequence of compact announces (old, new, future, huge lifetimes), neighbours
    /// coming and going, and time passing: the bounds and the indexes hold throughout.
    #[test]
    fn the_table_stays_bounded_and_indexed(ops in proptest::collection::vec((0u8..6, 0u32..60, 0u64..400_000, any::<u32>(), 0u8..4), 1..300)) {
        let cfg = RouterConfig { max_paths: 40, max_pathless: 10, max_unverified_per_neighbour: 15, neighbour_announce_burst: 1000, ..Default::default() };
        let (mut r, start) = router(cfg);
        let mut now = start;
        let mut up: HashSet<u32> = HashSet::new();
        let mut next_id = 0u32;
        for (op, k, ts, life, nbr) in ops {
            match op {
                0 => {
                    next_id += 1;
                    r.add_neighbour(now, NeighbourId(next_id), quic(nbr + 1));
                    up.insert(next_id);
                }
                1 => if let Some(&id) = up.iter().min() {
                    r.remove_neighbour(NeighbourId(id));
                    up.remove(&id);
                },
                2 => {
                    now += Duration::from_secs(u64::from(k) * 60);
                    r.handle_timeout(now);
                }
                _ => if let Some(&id) = up.iter().max() {
                    let at = T0_MS + now.saturating_duration_since(start).as_millis() as u64;
                    let _ = r.handle_packet(now, NeighbourId(id), &compact_packet(k, at.saturating_sub(200_000) + ts, life));
                },
            }
            while r.poll_transmit(now).is_some() {}
            r.check_invariants();
            prop_assert!(r.pathless <= r.cfg.max_pathless);
        }
    }
}
