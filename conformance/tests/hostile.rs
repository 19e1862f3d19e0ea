//! The hostile-peer suite: a stranger attacks a real `antmesh up` node (A) while an honest
//! peer (B, on another loopback address) keeps probing A and sending it end-to-end
//! messages. The attacker is a separate process, `antmesh-hostile`, as fast as it goes.
//! For each attack: A's resident memory stays under a stated bound, every honest probe and
//! message gets through, and A is healthy afterwards. The figures (rates, CPU, round trips
//! against the same without the attack) come from `benches/hostile.rs` with release builds;
//! these runs assert the behaviour.
//!
//! The attacks on QUIC run from 127.0.0.1, the honest peer from 127.0.0.2: per-IP limits
//! are part of the defence, as with any real attacker that has its own address. The test
//! with spoofed sources needs root (network namespaces, a raw socket).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::scene::{attack, free_port, is_root, lo, pinned, spoofed_stage, stage, udp_iface, under_attack, wait_path, Netns, Node, Outcome, Stage, T};
use serde_json::{json, Value};

/// One attack at a time: they measure one node's memory, and share two cores.
static SERIAL: Mutex<()> = Mutex::new(());

const ATTACK_SECS: &str = "8";

fn hostile(args: &[&str]) -> Value {
    let mut all = args.to_vec();
    all.extend_from_slice(&["--seconds", ATTACK_SECS]);
    attack(&all, None)
}

/// The suite's three claims for one attack: memory under `rss_bound_mib` above the start,
/// every honest probe and message through, the node healthy after.
fn assert_survived(s: &Stage, o: &Outcome, rss_bound_mib: u64) {
    eprintln!(
        "{}: attacker {} ({:.0}/s, {} sessions, {} refused); A: RSS {} → max {} KiB, CPU {:.2} s in {:.1} s; honest: {} probes p50 {:.2} ms p99 {:.2} ms, {} messages",
        o.report["attack"],
        o.report["sent"],
        o.report["rate"].as_f64().unwrap_or(0.0),
        o.report["sessions"],
        o.report["refused"],
        o.rss0,
        o.max_rss,
        o.cpu,
        o.secs,
        o.honest.rtts.len(),
        o.honest.percentile(50.0),
        o.honest.percentile(99.0),
        o.honest.sent.len(),
    );
    assert!(o.honest.probe_failures.is_empty(), "honest probes failed: {:?}\nA's log:\n{}", o.honest.probe_failures, s.a.log());
    assert!(o.honest.send_failures.is_empty(), "honest messages refused: {:?}", o.honest.send_failures);
    assert!(o.honest.rtts.len() >= 10, "too few honest probes: {}", o.honest.rtts.len());
    assert!(!o.honest.sent.is_empty());
    for text in &o.honest.sent {
        s.a.wait_line(&["end-to-end message received", text], T);
    }
    assert!(o.max_rss <= o.rss0 + rss_bound_mib * 1024, "A's RSS grew from {} to {} KiB (bound {rss_bound_mib} MiB)", o.rss0, o.max_rss);
    let v = s.b.request(json!({"cmd": "probe", "dest": s.a.node_dest(), "timeout_s": 10}), T);
    assert_eq!(v["ok"], true, "A does not answer after the attack: {v}");
    assert_eq!(s.a.request(json!({"cmd": "status"}), T)["ok"], true);
}

#[test]
fn every_stream_of_a_connection_written_and_never_finished() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let s = stage(false, "");
    let target = format!("127.0.0.1:{}", s.a_udp);
    let o = under_attack(&s, || hostile(&["streams", "--target", &target]));
    assert_survived(&s, &o, 16);
    // The node allowed 16 unidirectional streams and no bidirectional one, and bounded
    // what they could carry: far below the 956 MB the issue measured.
    assert!(o.report["bytes"].as_u64().unwrap() < 8 << 20, "{}", o.report);
}

#[test]
fn connections_as_fast_as_possible_from_one_identity() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let s = stage(false, "");
    let target = format!("127.0.0.1:{}", s.a_udp);
    let o = under_attack(&s, || hostile(&["connections", "--target", &target]));
    assert_survived(&s, &o, 48);
    // One address gets its burst of 16 handshakes and 4 a second: the rest of its Initials
    // are ignored.
    let secs: u64 = ATTACK_SECS.parse().unwrap();
    assert!(o.report["sessions"].as_u64().unwrap() <= 16 + 4 * (secs + 1), "{}", o.report);
}

#[test]
fn connections_as_fast_as_possible_from_fresh_identities() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let s = stage(false, "");
    let target = format!("127.0.0.1:{}", s.a_udp);
    let o = under_attack(&s, || hostile(&["connections", "--fresh", "--target", &target]));
    assert_survived(&s, &o, 48);
}

#[test]
fn quic_initials_from_many_source_ports() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let s = stage(false, "");
    let target = format!("127.0.0.1:{}", s.a_udp);
    let o = under_attack(&s, || hostile(&["initials", "--target", &target]));
    assert_survived(&s, &o, 32);
    // One IP: at most its burst plus 4 handshakes a second were worked on; the rest got
    // a Retry, which the attacker never follows. A handshake's server side costs ~1 ms of
    // CPU: thousands of Initials must not have cost A anywhere near a core.
    let sent = o.report["sent"].as_u64().unwrap();
    assert!(sent > 500, "{}", o.report);
    assert!(o.cpu < 0.6 * o.secs, "A spent {:.2} s of CPU in {:.1} s on {sent} Initials", o.cpu, o.secs);
}

#[test]
fn spoofed_quic_initials_from_a_whole_subnet() {
    if !is_root() {
        eprintln!("skipped: spoofed sources need root (network namespaces, a raw socket)");
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let ns = Netns::new("i");
    let s = spoofed_stage(&ns);
    let outside = ns.outside.clone();
    let dir = s.dir.path().to_owned();
    let a_id = s.a.id;
    let o = under_attack(&s, || {
        let flood = std::thread::spawn(move || attack(&["initials", "--target", "10.77.1.1:4242", "--spoof", "10.77.0.0", "--seconds", ATTACK_SECS], Some(&outside)));
        // A newcomer connects in the middle of the flood: it is sent a Retry like
        // everyone, answers it, and gets in.
        std::thread::sleep(Duration::from_secs(3));
        let c = Node::start(
            &dir,
            "c",
            &format!("interfaces: [(name: \"udp0\", plugin: \"udp\", config: \"(bind: \\\"10.77.1.3:4343\\\")\", connect: [(addr: \"udp://10.77.1.1:4242\", peer: \"{}\")])]", a_id.to_hex()),
            Some(&ns.outside),
        );
        c.wait_line(&["dialled", &a_id.to_hex()], T);
        flood.join().unwrap()
    });
    assert_survived(&s, &o, 32);
    // A spoofer never completes a Retry: A worked on at most 8 handshakes per handshake
    // timeout from it, however many thousands it sent.
    assert!(o.report["sent"].as_u64().unwrap() > 1000, "{}", o.report);
    assert!(o.cpu < 0.6 * o.secs, "A spent {:.2} s of CPU in {:.1} s", o.cpu, o.secs);
}

#[test]
fn compact_announce_flood_with_longest_lifetimes_then_a_restart() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let mut s = stage(false, "");
    let target = format!("127.0.0.1:{}", s.a_udp);
    let o = under_attack(&s, || hostile(&["flood", "compact", "--target", &target]));
    assert_survived(&s, &o, 32);
    let c = s.a.counters();
    // The flooder's share of unverified destinations (and its announce rate) held.
    assert!(c["unverified"].as_u64().unwrap() <= 12_500, "{c}");
    assert!(c["neighbour_limited"].as_u64().unwrap() > 0, "{c}");
    // The honest destination is there, verified; after a kill -9 it still is (the
    // flooder's entries come back unverified, capped, and the flooder is gone).
    std::thread::sleep(Duration::from_secs(3));
    s.a.kill9_and_restart();
    let loaded = s.a.wait_line(&["mesh state loaded"], T);
    assert!(!loaded.contains("paths=0"), "{loaded}");
    s.a.wait_line(&["mesh neighbour up", &s.b.id.to_hex()], T);
    wait_path(&s.a, &s.b);
    let paths = s.a.request(json!({"cmd": "paths"}), T);
    let b_dest = s.b.node_dest();
    let p = paths["paths"].as_array().unwrap().iter().find(|p| p["dest"] == b_dest.as_str()).unwrap().clone();
    assert_eq!(p["verified"], true, "{p}");
    let c = s.a.counters();
    assert!(c["unverified"].as_u64().unwrap() <= 25_000, "{c}");
    let v = s.b.request(json!({"cmd": "probe", "dest": s.a.node_dest(), "timeout_s": 10}), T);
    assert_eq!(v["ok"], true, "{v}");
}

#[test]
fn forged_signature_announces_get_the_neighbour_blocked() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let s = stage(false, "");
    let target = format!("127.0.0.1:{}", s.a_udp);
    let o = under_attack(&s, || hostile(&["flood", "forged", "--target", &target]));
    assert_survived(&s, &o, 32);
    s.a.wait_line(&["forged announce", "blocked"], T);
    // Blocked after its first forgery, and its IP with it: it never got another session.
    assert_eq!(o.report["sessions"], 1, "{}", o.report);
    assert!(o.report["refused"].as_u64().unwrap() > 0, "{}", o.report);
    let c = s.a.counters();
    assert!(c["signatures_verified"].as_u64().unwrap() < 100, "{c}");
}

#[test]
fn unsolicited_key_records_cost_no_verification() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let s = stage(false, "");
    let target = format!("127.0.0.1:{}", s.a_udp);
    let o = under_attack(&s, || hostile(&["flood", "key-records", "--target", &target]));
    assert_survived(&s, &o, 32);
    assert!(o.report["sent"].as_u64().unwrap() > 100, "{}", o.report);
    assert_eq!(s.a.counters()["remote_kems"], 0);
}

#[test]
fn sealed_packets_are_held_to_a_decapsulation_budget() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let s = stage(false, "");
    let target = format!("127.0.0.1:{}", s.a_udp);
    let o = under_attack(&s, || hostile(&["flood", "sealed", "--target", &target]));
    assert_survived(&s, &o, 32);
    assert!(o.report["sent"].as_u64().unwrap() > 500, "{}", o.report);
}

#[test]
fn probes_with_spoofed_reply_to_destinations() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let s = stage(false, "");
    let target = format!("127.0.0.1:{}", s.a_udp);
    let o = under_attack(&s, || hostile(&["flood", "probes", "--target", &target]));
    assert_survived(&s, &o, 32);
    // The answers wait for paths in their own, bounded share.
    assert!(s.a.counters()["held"].as_u64().unwrap() <= 64 + 192);
}

#[test]
fn link_hellos_on_a_tcp_interface_leave_room_for_an_honest_newcomer() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let s = stage(true, "");
    let tcp = format!("127.0.0.1:{}", s.a_tcp.unwrap());
    let dir = s.dir.path().to_owned();
    let a_id = s.a.id;
    let target = tcp.clone();
    let o = under_attack(&s, || {
        let flood = std::thread::spawn(move || attack(&["hellos", "--target", &target, "--source", "127.0.0.9", "--seconds", ATTACK_SECS], None));
        std::thread::sleep(Duration::from_secs(2));
        // C dials A over TCP during the flood and gets a link session.
        let c = Node::start(
            &dir,
            "c",
            &format!("interfaces: [(name: \"tcp0\", plugin: \"tcp\", config: \"(connect: [\\\"{tcp}\\\"])\", link: (peer: Some(\"{}\")))]", a_id.to_hex()),
            None,
        );
        c.wait_line(&["link session up", &a_id.to_hex()], T);
        flood.join().unwrap()
    });
    assert_survived(&s, &o, 32);
    assert!(o.report["sent"].as_u64().unwrap() > 20, "{}", o.report);
}

#[test]
fn a_tcp_peer_reconnecting_from_a_new_port_keeps_its_neighbour() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    // A forgets a silent session after 6 s.
    let s = stage(true, ", link: (keepalive_secs: Some(2), dead_after_secs: Some(6))");
    let tcp = format!("127.0.0.1:{}", s.a_tcp.unwrap());
    let mut c = Node::start(
        s.dir.path(),
        "c",
        &format!("interfaces: [(name: \"tcp0\", plugin: \"tcp\", config: \"(connect: [\\\"{tcp}\\\"], backoff_max_ms: 500)\")]"),
        None,
    );
    let c_hex = c.id.to_hex();
    s.a.wait_line(&["link session up", &c_hex], T);
    // C restarts: it reaches A again from a new port, with a new session, while A still
    // holds the old one (A saw the old connection close, but a link may come back).
    c.kill9_and_restart();
    let deadline = Instant::now() + T;
    while s.a.lines_with("link session up").iter().filter(|l| l.contains(&c_hex)).count() < 2 {
        assert!(Instant::now() < deadline, "C never came back:\n{}", s.a.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    // The old session times out on A; the new one must stay A's neighbour.
    std::thread::sleep(Duration::from_secs(9));
    s.a.wait_line(&["link session down", &c_hex, "Timeout"], T);
    let st = s.a.request(json!({"cmd": "status"}), T);
    let peers: Vec<&str> = st["neighbours"].as_array().unwrap().iter().filter_map(|n| n["peer"].as_str()).collect();
    assert!(peers.contains(&c_hex.as_str()), "C's live session was dropped with its old one: {st}\n{}", s.a.log());
    let v = c.request(json!({"cmd": "probe", "dest": s.a.node_dest(), "timeout_s": 10}), T);
    assert_eq!(v["ok"], true, "{v}");
}

#[test]
fn a_burst_of_messages_loses_no_disconnect() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let s = stage(false, "");
    let d = Node::start(s.dir.path(), "d", &format!("interfaces: [{}]", udp_iface("udp0", lo(3), free_port(lo(3)), &pinned(lo(1), s.a_udp, &s.a))), None);
    s.a.wait_line(&["mesh neighbour up", &d.id.to_hex()], T);
    let target = format!("127.0.0.1:{}", s.a_udp);
    let d_hex = d.id.to_hex();
    let o = under_attack(&s, || {
        let burst = std::thread::spawn(move || attack(&["flood", "burst", "--target", &target, "--seconds", ATTACK_SECS], None));
        std::thread::sleep(Duration::from_millis(300));
        // D leaves in the middle of the burst.
        assert!(d.stop().success());
        burst.join().unwrap()
    });
    assert_survived(&s, &o, 32);
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let st = s.a.request(json!({"cmd": "status"}), T);
        let gone = !st["neighbours"].as_array().unwrap().iter().any(|n| n["peer"] == d_hex.as_str());
        if gone {
            break;
        }
        assert!(Instant::now() < deadline, "D left but A still lists it: {st}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Sets the file-size limit of process `pid` (soft and hard) to `bytes`.
fn limit_file_size(pid: u32, bytes: u64) {
    let lim = libc::rlimit { rlim_cur: bytes, rlim_max: libc::RLIM_INFINITY };
    // SAFETY: prlimit on a child of this process with a valid rlimit.
    let r = unsafe { libc::prlimit(pid as libc::pid_t, libc::RLIMIT_FSIZE, &lim, std::ptr::null_mut()) };
    assert_eq!(r, 0, "prlimit: {}", std::io::Error::last_os_error());
}

fn store_status(n: &Node) -> Value {
    n.request(json!({"cmd": "status"}), T)["store"].clone()
}

#[test]
fn a_store_that_cannot_be_written_mid_run_is_reported_retried_and_recovered() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let mut s = stage(false, "");
    let store = s.a.home.join("mesh.redb");
    let size = std::fs::metadata(&store).unwrap().len();
    // The disk is "full": the store cannot grow.
    limit_file_size(s.a.pid(), size);
    let target = format!("127.0.0.1:{}", s.a_udp);
    let o = under_attack(&s, || attack(&["flood", "compact", "--target", &target, "--seconds", "4"], None));
    assert_survived(&s, &o, 32);
    let deadline = Instant::now() + T;
    while store_status(&s.a)["ok"] != false {
        assert!(Instant::now() < deadline, "the failing store was never reported: {}", store_status(&s.a));
        std::thread::sleep(Duration::from_millis(200));
    }
    s.a.wait_line(&["mesh store save failed"], T);
    // Room again: the node reopens the store and writes what it kept.
    limit_file_size(s.a.pid(), libc::RLIM_INFINITY);
    let deadline = Instant::now() + Duration::from_secs(120);
    while store_status(&s.a)["ok"] != true {
        assert!(Instant::now() < deadline, "the store never recovered: {}", store_status(&s.a));
        std::thread::sleep(Duration::from_millis(500));
    }
    s.a.wait_line(&["mesh store saving again"], T);
    std::thread::sleep(Duration::from_secs(3));
    s.a.kill9_and_restart();
    let loaded = s.a.wait_line(&["mesh state loaded"], T);
    assert!(!loaded.contains("announces=0"), "nothing was saved after the recovery: {loaded}");
}

#[test]
fn a_damaged_store_at_start_is_moved_aside_and_replaced() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let a_udp = free_port(lo(1));
    // A store full of garbage where A's data directory will be.
    let home = dir.path().join("a-home");
    std::fs::create_dir_all(&home).unwrap();
    std::fs::write(home.join("mesh.redb"), vec![0xa5u8; 64 << 10]).unwrap();
    let a = Node::start(dir.path(), "a", &format!("interfaces: [{}]", udp_iface("udp0", lo(1), a_udp, "")), None);
    a.wait_line(&["mesh store was damaged", "moved aside"], T);
    let aside: Vec<_> = std::fs::read_dir(&home).unwrap().filter_map(|e| e.ok()).filter(|e| e.file_name().to_string_lossy().starts_with("mesh.redb.damaged-")).collect();
    assert_eq!(aside.len(), 1);
    let b = Node::start(dir.path(), "b", &format!("interfaces: [{}]", udp_iface("udp0", lo(2), free_port(lo(2)), &pinned(lo(1), a_udp, &a))), None);
    wait_path(&a, &b);
    let deadline = Instant::now() + T;
    while store_status(&a)["saves"].as_u64().unwrap_or(0) == 0 {
        assert!(Instant::now() < deadline, "the new store was never written: {}", store_status(&a));
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(store_status(&a)["ok"], true);
}
