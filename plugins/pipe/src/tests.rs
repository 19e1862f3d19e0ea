//! Behaviour tests for the pipe transport, run against real child processes (`cat`, `sh`,
//! `socat`) through the test host.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};
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
    // Kept until the end: `close` alone must release everything, stop-signal pipe included,
    // even while the host still holds the closed instances.
    let mut closed = Vec::new();
    for i in 0..100 {
        let t = open(&h, &config("leak", "cat", &[], ""));
        t.send(&named("leak"), format!("frame {i}").as_bytes()).unwrap();
        let start = Instant::now();
        t.close().unwrap();
        closes.push(start.elapsed());
        closed.push(t);
    }
    h.mark_closed();
    closes.sort();
    eprintln!("close: median {:?}, max {:?}", closes[50], closes[99]);
    assert!(closes[50] < Duration::from_millis(100), "median close {:?}", closes[50]);
    assert_eq!(fd_count(), fds, "fd leak");
    assert_eq!(our_threads(), 0, "thread leak");
    assert_eq!(children(), Vec::<String>::new(), "child processes left behind");
    drop(closed);
    assert_eq!(fd_count(), fds, "fd leak");
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

/// The pid a child script wrote to `p` (waits for it).
fn read_pid(p: &Path) -> u32 {
    let deadline = Instant::now() + T;
    loop {
        if let Some(pid) = std::fs::read_to_string(p).ok().and_then(|s| s.lines().next()?.trim().parse().ok()) {
            return pid;
        }
        assert!(Instant::now() < deadline, "{} never got a pid", p.display());
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The fields of `/proc/<pid>/stat` after the parenthesised command: state, ppid, pgrp,
/// session, tty_nr, …
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.rsplit_once(')')?.1;
    Some(rest.split_whitespace().map(str::to_owned).collect())
}

/// Whether `pid` still runs (a zombie waiting for init to reap it does not count).
fn running(pid: u32) -> bool {
    stat_fields(pid).is_some_and(|f| f.first().map(String::as_str) != Some("Z"))
}

/// Waits up to `T` for `pid` to stop running.
fn wait_not_running(pid: u32) -> bool {
    let deadline = Instant::now() + T;
    while running(pid) {
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    true
}

/// Kills a stray test process (by pid, so a failed test does not leave `sleep 300` behind).
fn kill_stray(pid: u32) {
    if running(pid) {
        // SAFETY: kill has no memory-safety preconditions; `pid` was just seen running.
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
    }
}

#[test]
fn grandchildren_die_with_a_child_that_exits_by_itself() {
    let _g = shared();
    let dir = tempfile::tempdir().unwrap();
    let pids = dir.path().join("bg");
    // The background job keeps the stdout pipe open, so the exit itself is what ends the
    // session; every respawn appends its own job's pid.
    let script = format!("sleep 300 & echo $! >> '{}'; exit 7", pids.display());
    let h = Harness::new();
    let t = open(&h, &config("gc", "sh", &["-c", &script], ""));
    let (_, reason) = h.wait_down(T).unwrap();
    assert!(reason.starts_with("child exited: exit status: 7"), "{reason}");
    let first = read_pid(&pids);
    let dead = wait_not_running(first);
    kill_stray(first);
    assert!(dead, "the exited child's background job {first} survived it");
    // Respawned children's jobs go at the latest with `close`.
    assert!(h.wait_up(T).is_some());
    close(&h, &t);
    let all: Vec<u32> = std::fs::read_to_string(&pids).unwrap().lines().filter_map(|l| l.parse().ok()).collect();
    let survivors: Vec<u32> = all.iter().copied().filter(|&p| !wait_not_running(p)).collect();
    survivors.iter().for_each(|&p| kill_stray(p));
    assert!(survivors.is_empty(), "background jobs {survivors:?} outlived close");
    assert_eq!(h.late_callbacks(), 0);
}

#[test]
fn grandchildren_die_with_a_child_that_closes_stdout_and_exits() {
    let _g = shared();
    let dir = tempfile::tempdir().unwrap();
    let pid_file = dir.path().join("bg");
    // Closes its stdout (end of file for the reader), then exits within the grace period.
    let script = format!("sleep 300 >/dev/null & echo $! > '{}'; exec >&-; sleep 0.02", pid_file.display());
    let h = Harness::new();
    let t = open(&h, &config("eof", "sh", &["-c", &script], "respawn: false"));
    let (_, reason) = h.wait_down(T).unwrap();
    assert!(reason.starts_with("child exited: exit status: 0"), "{reason}");
    let bg = read_pid(&pid_file);
    let dead = wait_not_running(bg);
    kill_stray(bg);
    assert!(dead, "the background job {bg} survived its parent's exit");
    close(&h, &t);
}

#[test]
fn close_kills_grandchildren() {
    let _g = shared();
    let dir = tempfile::tempdir().unwrap();
    let pid_file = dir.path().join("bg");
    let script = format!("sleep 300 & echo $! > '{}'; exec cat", pid_file.display());
    let h = Harness::new();
    let t = open(&h, &config("gc", "sh", &["-c", &script], ""));
    let bg = read_pid(&pid_file);
    assert!(running(bg));
    close(&h, &t);
    let dead = wait_not_running(bg);
    kill_stray(bg);
    assert!(dead, "the background job {bg} survived close");
}

#[test]
fn child_runs_in_a_session_of_its_own_without_a_terminal() {
    let _g = shared();
    let dir = tempfile::tempdir().unwrap();
    let pid_file = dir.path().join("pid");
    let script = format!("echo $$ > '{}'; exec cat", pid_file.display());
    let h = Harness::new();
    let t = open(&h, &config("s", "sh", &["-c", &script], ""));
    let pid = read_pid(&pid_file);
    let f = stat_fields(pid).unwrap();
    // state, ppid, pgrp, session, tty_nr
    assert_eq!(f[2], pid.to_string(), "process group");
    assert_eq!(f[3], pid.to_string(), "session");
    assert_eq!(f[4], "0", "controlling terminal");
    close(&h, &t);
}

/// Restores SIGCHLD's default disposition when dropped.
struct SigchldIgnored;

impl SigchldIgnored {
    fn new() -> SigchldIgnored {
        // SAFETY: changing a signal disposition; the test holds the exclusive lock, so no
        // other test in this process spawns or waits for children meanwhile.
        unsafe { libc::signal(libc::SIGCHLD, libc::SIG_IGN) };
        SigchldIgnored
    }
}

impl Drop for SigchldIgnored {
    fn drop(&mut self) {
        // SAFETY: as above.
        unsafe { libc::signal(libc::SIGCHLD, libc::SIG_DFL) };
    }
}

#[test]
fn a_child_reaped_elsewhere_is_reported_and_its_group_left_alone() {
    let _g = exclusive();
    let _ignored = SigchldIgnored::new();
    let dir = tempfile::tempdir().unwrap();
    let pid_file = dir.path().join("bg");
    let script = format!("sleep 300 & echo $! > '{}'; exit 3", pid_file.display());
    let h = Harness::new();
    let t = open(&h, &config("ign", "sh", &["-c", &script], "respawn: false"));
    let (_, reason) = h.wait_down(T).unwrap();
    let bg = read_pid(&pid_file);
    // The kernel reaped the child, so its group id may belong to anyone by now: it must
    // not be signalled, which here shows as the background job surviving.
    std::thread::sleep(Duration::from_millis(50));
    let alive = running(bg);
    kill_stray(bg);
    assert!(reason.starts_with("child exited: unknown status (reaped elsewhere"), "{reason}");
    assert!(alive, "the group of a child reaped elsewhere was signalled");
    close(&h, &t);
    assert_eq!(h.late_callbacks(), 0);
}

/// Closes the instance from inside the first callback matching `pred` and reports, from
/// there, close's result, the thread's name and whether `pid` (if any) was still there.
struct CloseInCallback {
    done: mpsc::Receiver<(bool, Option<String>, bool)>,
}

impl CloseInCallback {
    fn install(
        h: &Harness,
        t: &Arc<PipeTransport>,
        pid: Option<u32>,
        pred: impl Fn(&Event) -> bool + Send + Sync + 'static,
    ) -> CloseInCallback {
        // Taken on first use, so the hook does not keep the instance alive.
        let slot = Mutex::new(Some(Arc::clone(t)));
        let closed = h.closed_flag();
        let (tx, done) = mpsc::channel();
        let tx = Mutex::new(tx);
        h.on_callback(move |e| {
            if !pred(e) {
                return;
            }
            let Some(t) = slot.lock().unwrap().take() else { return };
            let ok = t.close().is_ok();
            closed.store(true, Ordering::SeqCst);
            let child_left = pid.is_some_and(|p| Path::new(&format!("/proc/{p}")).exists());
            let name = std::thread::current().name().map(str::to_owned);
            let _ = tx.lock().unwrap().send((ok, name, child_left));
        });
        CloseInCallback { done }
    }

    fn wait(&self) -> (bool, Option<String>, bool) {
        self.done.recv_timeout(T).expect("close from the callback did not return (deadlock?)")
    }
}

#[test]
fn close_from_a_deliver_callback_on_the_supervisor() {
    let _g = shared();
    let dir = tempfile::tempdir().unwrap();
    let pid_file = dir.path().join("pid");
    let script = format!("echo $$ > '{}'; exec cat", pid_file.display());
    let h = Harness::new();
    let t = Arc::new(open(&h, &config("cb", "sh", &["-c", &script], "")));
    let pid = read_pid(&pid_file);
    let cb = CloseInCallback::install(&h, &t, None, |e| matches!(e, Event::Frames(_)));
    t.send(&named("cb"), b"one").unwrap();
    let (ok, thread, _) = cb.wait();
    assert!(ok);
    assert_eq!(thread.as_deref(), Some("am-pipe-sup"));
    assert_eq!(t.send(&named("cb"), b"two"), Err(SendError::Closed));
    // Once the callback returned, the supervisor stops the child; a later close from
    // outside waits for that.
    t.close().unwrap();
    assert!(!Path::new(&format!("/proc/{pid}")).exists(), "child not reaped");
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(h.late_callbacks(), 0);
}

#[test]
fn close_from_a_link_up_callback_on_the_supervisor() {
    let _g = shared();
    let h = Harness::new();
    // Exits at once and is respawned, so link_up keeps coming from the supervisor.
    let t = Arc::new(open(&h, &config("up", "sh", &["-c", "exit 0"], "")));
    let cb = CloseInCallback::install(&h, &t, None, |e| matches!(e, Event::Up(_)));
    let (ok, thread, _) = cb.wait();
    assert!(ok);
    assert_eq!(thread.as_deref(), Some("am-pipe-sup"));
    std::thread::sleep(Duration::from_millis(100));
    t.close().unwrap();
    assert_eq!(h.late_callbacks(), 0);
}

#[test]
fn close_from_a_writable_callback_on_the_writer() {
    let _g = shared();
    let dir = tempfile::tempdir().unwrap();
    let (go, pid_file) = (dir.path().join("go"), dir.path().join("pid"));
    let script =
        format!("echo $$ > '{}'; while [ ! -e '{}' ]; do sleep 0.01; done; cat > /dev/null", pid_file.display(), go.display());
    let h = Harness::new();
    let t = Arc::new(open(&h, &config("wr", "sh", &["-c", &script], "queue_frames: 4")));
    let pid = read_pid(&pid_file);
    let frame = vec![0x55u8; 16 * 1024];
    let mut blocked = false;
    for _ in 0..10_000 {
        match t.send(&named("wr"), &frame) {
            Ok(()) => {}
            Err(SendError::WouldBlock) => {
                blocked = true;
                break;
            }
            Err(e) => panic!("unexpected {e}"),
        }
    }
    assert!(blocked, "never saw WouldBlock");
    let cb = CloseInCallback::install(&h, &t, Some(pid), |e| matches!(e, Event::Writable));
    std::fs::write(&go, b"").unwrap();
    let (ok, thread, child_left) = cb.wait();
    assert!(ok);
    assert_eq!(thread.as_deref(), Some("am-pipe-wr"));
    // The writer waited for the supervisor, which stopped and reaped the child.
    assert!(!child_left, "child still there when close returned");
    t.close().unwrap();
    assert_eq!(h.late_callbacks(), 0);
}

#[test]
fn concurrent_closes_both_wait_for_a_running_callback() {
    let _g = shared();
    let h = Harness::new();
    let t = Arc::new(open(&h, &config("cc", "cat", &[], "")));
    let (entered_tx, entered) = mpsc::channel();
    let entered_tx = Mutex::new(entered_tx);
    let finished = Arc::new(AtomicBool::new(false));
    let f2 = Arc::clone(&finished);
    h.on_callback(move |e| {
        if matches!(e, Event::Frames(_)) && !f2.load(Ordering::SeqCst) {
            let _ = entered_tx.lock().unwrap().send(());
            std::thread::sleep(Duration::from_millis(300));
            f2.store(true, Ordering::SeqCst);
        }
    });
    t.send(&named("cc"), b"slow").unwrap();
    entered.recv_timeout(T).unwrap();
    let t2 = Arc::clone(&t);
    let first = std::thread::spawn(move || t2.close());
    std::thread::sleep(Duration::from_millis(50));
    t.close().unwrap();
    assert!(finished.load(Ordering::SeqCst), "the second close returned while a callback still ran");
    first.join().unwrap().unwrap();
    h.mark_closed();
    assert_eq!(h.late_callbacks(), 0);
}
