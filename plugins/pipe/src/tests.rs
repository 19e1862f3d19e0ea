//! Behaviour tests for the pipe transport, run against real child processes (`cat`, `sh`,
//! `socat`) through the test host.

use std::path::Path;
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

use abi_stable::std_types::RString;
use antmesh_plugin_api::{LinkAddr, PluginErrorKind, Reliability, SendError, Transport};

use antmesh_plugin_kit::testing::{Event, Harness};
use crate::{open_pipe, PipeTransport};

const T: Duration = Duration::from_secs(5);

/// The leak test counts process-wide fds, threads and children, so it runs alone; every
/// other test shares the lock.
static EXCLUSIVE: RwLock<()> = RwLock::new(());

fn shared() -> RwLockReadGuard<'static, ()> {
    EXCLUSIVE.read().unwrap_or_else(|p| p.into_inner())
}

fn exclusive() -> RwLockWriteGuard<'static, ()> {
    EXCLUSIVE.write().unwrap_or_else(|p| p.into_inner())
}

fn ron_str(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

fn config(name: &str, command: &str, args: &[&str], extra: &str) -> String {
    let args: Vec<String> = args.iter().map(|a| ron_str(a)).collect();
    format!(
        "(name: {}, command: {}, args: [{}], backoff_min_ms: 20, backoff_max_ms: 200, {extra})",
        ron_str(name),
        ron_str(command),
        args.join(", ")
    )
}

fn named(n: &str) -> LinkAddr {
    LinkAddr::Named(RString::from(n))
}

fn open(h: &Harness, cfg: &str) -> PipeTransport {
    open_pipe(cfg, h.host.clone()).unwrap_or_else(|e| panic!("open failed: {e}"))
}

fn close(h: &Harness, t: &PipeTransport) {
    t.close().unwrap();
    h.mark_closed();
}

#[test]
fn echo_round_trip_every_framing() {
    let _g = shared();
    for framing in ["Length", "Hdlc", "Kiss"] {
        let h = Harness::new();
        let t = open(&h, &config("echo", "cat", &[], &format!("framing: {framing}, mtu: 4096")));
        assert_eq!(h.wait_up(T), Some(named("echo")));
        let frames: Vec<Vec<u8>> = vec![
            b"hello".to_vec(),
            vec![0x7E, 0x7D, 0xC0, 0xDB, 0x00, 0xFF],
            (0..4096u32).map(|i| (i % 251) as u8).collect(), // exactly the MTU
            b"last".to_vec(),
        ];
        for f in &frames[..3] {
            t.send(&named("echo"), f).unwrap();
        }
        t.send(&LinkAddr::Broadcast, &frames[3]).unwrap();
        let got = h.frames(frames.len(), T);
        assert!(got.iter().all(|(from, _)| *from == named("echo")), "{framing}");
        let payloads: Vec<Vec<u8>> = got.into_iter().map(|(_, d)| d).collect();
        assert_eq!(payloads, frames, "{framing}");
        close(&h, &t);
        assert_eq!(h.late_callbacks(), 0);
    }
}

#[test]
fn capabilities_and_addresses() {
    let _g = shared();
    let h = Harness::new();
    let t = open(&h, &config("radio bridge", "cat", &[], "mtu: 1500"));
    let c = t.capabilities();
    assert_eq!((c.mtu, c.bitrate_bps, c.broadcast, c.peer_liveness), (1500, 0, true, true));
    assert_eq!(c.reliability, Reliability::ReliableOrdered);
    assert_eq!(t.local_addresses(), vec!["pipe://radio%20bridge".to_owned()]);
    assert_eq!(h.wait_up(T), Some(named("radio%20bridge")));
    close(&h, &t);
    let t = open(&h, &config("x", "cat", &[], "framing: Hdlc"));
    assert_eq!(t.capabilities().reliability, Reliability::Lossy);
    t.close().unwrap();
}

#[test]
fn send_checks_addresses_and_size() {
    let _g = shared();
    let h = Harness::new();
    let t = open(&h, &config("p", "cat", &[], "mtu: 100"));
    assert!(matches!(t.send(&named("q"), b"x"), Err(SendError::UnknownPeer(_))));
    let ip = LinkAddr::from("127.0.0.1:9".parse::<std::net::SocketAddr>().unwrap());
    assert!(matches!(t.send(&ip, b"x"), Err(SendError::BadAddress(_))));
    assert_eq!(t.send(&named("p"), &[0; 101]), Err(SendError::TooLarge { size: 101, mtu: 100 }));
    t.send(&named("p"), &[0; 100]).unwrap();
    close(&h, &t);
    assert_eq!(t.send(&named("p"), b"x"), Err(SendError::Closed));
    // Idempotent.
    t.close().unwrap();
    assert_eq!(h.late_callbacks(), 0);
}

#[test]
fn bad_config_and_missing_command() {
    let _g = shared();
    let h = Harness::new();
    let e = open_pipe("(name: \"a\", command: \"cat\", bogus: 1)", h.host.clone()).err().unwrap();
    assert_eq!(e.kind, PluginErrorKind::BadConfig);
    assert!(e.message.contains("1:"), "{}", e.message);
    let e = open_pipe(&config("a", "/nonexistent/antmesh-no-such-command", &[], ""), h.host.clone()).err().unwrap();
    assert_eq!(e.kind, PluginErrorKind::Io);
    assert!(e.message.contains("antmesh-no-such-command"), "{}", e.message);
}

#[test]
fn child_exit_reports_link_down_and_respawns() {
    let _g = shared();
    let h = Harness::new();
    let t = open(&h, &config("x", "sh", &["-c", "exit 3"], ""));
    assert_eq!(h.wait_up(T), Some(named("x")));
    let (peer, reason) = h.wait_down(T).unwrap();
    assert_eq!(peer, named("x"));
    assert!(reason.starts_with("child exited: exit status: 3"), "{reason}");
    assert_eq!(h.wait_up(T), Some(named("x")), "respawned");
    assert!(h.wait_down(T).is_some());
    close(&h, &t);
    assert_eq!(h.late_callbacks(), 0);
}

#[test]
fn no_respawn_when_disabled_and_send_refused_while_down() {
    let _g = shared();
    let h = Harness::new();
    let t = open(&h, &config("x", "true", &[], "respawn: false"));
    assert!(h.wait_up(T).is_some());
    let (_, reason) = h.wait_down(T).unwrap();
    assert!(reason.starts_with("child exited: exit status: 0"), "{reason}");
    assert!(matches!(t.send(&named("x"), b"x"), Err(SendError::UnknownPeer(_))));
    close(&h, &t);
    let ups = h.rx.try_iter().filter(|e| matches!(e, Event::Up(_))).count();
    assert_eq!(ups, 0, "respawned although respawn: false");
}

#[test]
fn garbage_on_stdout_is_dropped_for_hdlc_and_kiss() {
    let _g = shared();
    for framing in ["Hdlc", "Kiss"] {
        let h = Harness::new();
        // Noise, a flag, noise, bad escapes, a truncated frame, then an echoing `cat`.
        let script = r"printf 'garbage\176\001\002\003\176\175\001\300\333\001\300junk\300\000ab'; exec cat";
        let t = open(&h, &config("g", "sh", &["-c", script], &format!("framing: {framing}")));
        assert!(h.wait_up(T).is_some());
        t.send(&named("g"), b"after garbage").unwrap();
        let got = h.frames(1, T);
        let payloads: Vec<&[u8]> = got.iter().map(|(_, d)| d.as_slice()).collect();
        assert!(payloads.contains(&&b"after garbage"[..]), "{framing}: {payloads:?}");
        close(&h, &t);
        assert_eq!(h.late_callbacks(), 0);
    }
}

#[test]
fn oversized_length_prefix_kills_and_respawns_the_child() {
    let _g = shared();
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("spoke-garbage");
    // The first child announces a 4 GiB frame; its successors are well-behaved echoes.
    let script = format!(
        "if [ ! -e '{m}' ]; then : > '{m}'; printf '\\377\\377\\377\\377'; exec sleep 30; fi; exec cat",
        m = marker.display()
    );
    let h = Harness::new();
    let t = open(&h, &config("l", "sh", &["-c", &script], "framing: Length, mtu: 1024"));
    assert!(h.wait_up(T).is_some());
    let (_, reason) = h.wait_down(T).unwrap();
    assert!(reason.starts_with("child exited:") && reason.contains("length prefix"), "{reason}");
    assert!(h.wait_up(T).is_some());
    t.send(&named("l"), b"fine again").unwrap();
    let got = h.frames(1, T);
    assert_eq!(got.first().map(|(_, d)| d.as_slice()), Some(&b"fine again"[..]));
    close(&h, &t);
    assert_eq!(h.late_callbacks(), 0);
}

#[test]
fn backpressure_would_block_then_writable() {
    let _g = shared();
    let dir = tempfile::tempdir().unwrap();
    let go = dir.path().join("go");
    // The child reads nothing until the test creates `go`. (No `exec`: the shell keeps the
    // stdout pipe open, since a child closing its stdout counts as gone.)
    let script = format!("while [ ! -e '{}' ]; do sleep 0.01; done; cat > /dev/null", go.display());
    let h = Harness::new();
    let t = open(&h, &config("b", "sh", &["-c", &script], "queue_frames: 4"));
    let frame = vec![0x55u8; 16 * 1024];
    let mut blocked = false;
    for _ in 0..10_000 {
        match t.send(&named("b"), &frame) {
            Ok(()) => {}
            Err(SendError::WouldBlock) => {
                blocked = true;
                break;
            }
            Err(e) => panic!("unexpected {e}"),
        }
    }
    assert!(blocked, "never saw WouldBlock");
    std::fs::write(&go, b"").unwrap();
    assert!(h.wait(T, |e| matches!(e, Event::Writable)).is_some());
    t.send(&named("b"), &frame).unwrap();
    close(&h, &t);
}

fn wait_for_path(p: &Path) {
    let deadline = Instant::now() + T;
    while !p.exists() {
        assert!(Instant::now() < deadline, "{} never appeared", p.display());
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn two_instances_over_socat_unix_socket() {
    let _g = shared();
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("s.sock");
    let listen = format!("UNIX-LISTEN:{}", sock.display());
    let connect = format!("UNIX-CONNECT:{}", sock.display());
    // B starts first: its socat cannot connect yet, exits, and is respawned until A listens.
    let hb = Harness::new();
    let b = open(&hb, &config("a-side", "socat", &["-", &connect], ""));
    assert!(hb.wait_up(T).is_some());
    let ha = Harness::new();
    let a = open(&ha, &config("b-side", "socat", &["-", &listen], ""));
    assert!(ha.wait_up(T).is_some());
    wait_for_path(&sock);

    // A's socat holds the frame until B's connects, so its arrival proves B is connected.
    a.send(&named("b-side"), b"from A").unwrap();
    let at_b = hb.frames(1, T);
    assert_eq!(at_b, vec![(named("a-side"), b"from A".to_vec())]);
    b.send(&LinkAddr::Broadcast, b"from B").unwrap();
    let at_a = ha.frames(1, T);
    assert_eq!(at_a, vec![(named("b-side"), b"from B".to_vec())]);

    // B goes away: A's socat sees EOF on the socket and exits.
    close(&hb, &b);
    let (peer, reason) = ha.wait_down(T).unwrap();
    assert_eq!(peer, named("b-side"));
    assert!(reason.starts_with("child exited"), "{reason}");
    close(&ha, &a);
    assert_eq!(ha.late_callbacks() + hb.late_callbacks(), 0);
}

#[test]
fn close_kills_a_child_that_ignores_sigterm() {
    let _g = shared();
    let h = Harness::new();
    let t = open(&h, &config("stubborn", "sh", &["-c", "trap '' TERM; exec cat"], ""));
    assert!(h.wait_up(T).is_some());
    let start = Instant::now();
    close(&h, &t);
    let took = start.elapsed();
    assert!(took < Duration::from_secs(1), "close took {took:?}");
    assert_eq!(h.late_callbacks(), 0);
}

fn fd_count() -> usize {
    std::fs::read_dir("/proc/self/fd").map(|d| d.count()).unwrap_or(0)
}

fn our_threads() -> usize {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else { return 0 };
    tasks
        .filter_map(|t| t.ok())
        .filter_map(|t| std::fs::read_to_string(t.path().join("comm")).ok())
        .filter(|name| name.starts_with("am-pipe"))
        .count()
}

/// Processes whose parent is this process (running or zombie).
fn children() -> Vec<String> {
    let me = std::process::id().to_string();
    let Ok(procs) = std::fs::read_dir("/proc") else { return Vec::new() };
    procs
        .filter_map(|p| p.ok())
        .filter_map(|p| std::fs::read_to_string(p.path().join("stat")).ok())
        .filter(|stat| {
            // Fields after the parenthesised command: state, ppid, …
            let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
            rest.split_whitespace().nth(1) == Some(me.as_str())
        })
        .collect()
}

#[test]
fn open_close_100_times_leaks_nothing() {
    let _g = exclusive();
    let h = Harness::new();
    let (fds, threads) = (fd_count(), our_threads());
    assert_eq!(threads, 0);
    let mut closes = Vec::new();
    for i in 0..100 {
        let t = open(&h, &config("leak", "cat", &[], ""));
        t.send(&named("leak"), format!("frame {i}").as_bytes()).unwrap();
        let start = Instant::now();
        t.close().unwrap();
        closes.push(start.elapsed());
    }
    h.mark_closed();
    closes.sort();
    eprintln!("close: median {:?}, max {:?}", closes[50], closes[99]);
    assert!(closes[50] < Duration::from_millis(100), "median close {:?}", closes[50]);
    assert_eq!(fd_count(), fds, "fd leak");
    assert_eq!(our_threads(), 0, "thread leak");
    assert_eq!(children(), Vec::<String>::new(), "child processes left behind");
    assert_eq!(h.late_callbacks(), 0);
}

#[test]
fn exported_root_module_opens_a_guarded_instance() {
    let _g = shared();
    let m = crate::antmesh_transport_root_module();
    let info = (m.info())();
    assert_eq!(info.name.as_str(), "pipe");
    assert_eq!(info.schemes.iter().map(|s| s.as_str()).collect::<Vec<_>>(), vec!["pipe"]);
    let h = Harness::new();
    let bad = (m.open())(abi_stable::std_types::RStr::from_str("(name: 1)"), h.handle.clone());
    assert_eq!(bad.into_result().err().map(|e| e.kind), Some(PluginErrorKind::BadConfig));
    let cfg = config("m", "cat", &[], "mtu: 16");
    let inst = (m.open())(abi_stable::std_types::RStr::from_str(&cfg), h.handle.clone()).unwrap();
    assert_eq!(inst.local_addresses().into_iter().map(|s| s.into_string()).collect::<Vec<_>>(), vec!["pipe://m"]);
    let small = abi_stable::std_types::RSlice::from_slice(b"via the ABI");
    let big = [0u8; 17];
    assert_eq!(
        inst.send(&named("m"), abi_stable::std_types::RSlice::from_slice(&big)).into_result(),
        Err(SendError::TooLarge { size: 17, mtu: 16 })
    );
    inst.send(&named("m"), small).unwrap();
    assert_eq!(h.frames(1, T), vec![(named("m"), b"via the ABI".to_vec())]);
    inst.close().unwrap();
    h.mark_closed();
    assert_eq!(h.late_callbacks(), 0);
}
