//! Behaviour tests for the serial transport over real pseudo-terminals: in-process pty
//! pairs (the test plays the peer on the master side) and `socat`-linked pty pairs.

use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use abi_stable::std_types::RString;
use antmesh_plugin_api::{LatencyClass, LinkAddr, PluginErrorKind, SendError, Transport};
use antmesh_plugin_kit::{Codec, Decoded, FramingKind};
use serialport::TTYPort;

use crate::device::{TYPE_DATA, TYPE_KEEPALIVE};
use antmesh_plugin_kit::sys::{poll, pollfd, read_fd, set_nonblocking, write_fd};
use antmesh_plugin_kit::testing::{Event, Harness};
use crate::{open_serial, SerialTransport};

const T: Duration = Duration::from_secs(5);

/// The leak test counts process-wide fds and threads, so it runs alone; every other test
/// shares the lock.
static EXCLUSIVE: RwLock<()> = RwLock::new(());

fn shared() -> RwLockReadGuard<'static, ()> {
    EXCLUSIVE.read().unwrap_or_else(|p| p.into_inner())
}

fn exclusive() -> RwLockWriteGuard<'static, ()> {
    EXCLUSIVE.write().unwrap_or_else(|p| p.into_inner())
}

fn config(path: &str, extra: &str) -> String {
    format!("(path: \"{path}\", reopen_backoff_min_ms: 20, reopen_backoff_max_ms: 100, {extra})")
}

fn named(n: &str) -> LinkAddr {
    LinkAddr::Named(RString::from(n))
}

fn open(h: &Harness, cfg: &str) -> SerialTransport {
    open_serial(cfg, h.host.clone()).unwrap_or_else(|e| panic!("open failed: {e}"))
}

fn close(h: &Harness, t: &SerialTransport) {
    t.close().unwrap();
    h.mark_closed();
}

/// The far end of an in-process pty pair: the plugin opens `path`, the test reads and
/// writes the master. The test keeps its own slave descriptor open so that the plugin
/// closing the device is not a hangup for the master.
struct PtyPeer {
    master: TTYPort,
    _slave: TTYPort,
    path: String,
    codec: Codec,
    pending: Vec<Vec<u8>>,
}

impl PtyPeer {
    fn new(kind: FramingKind) -> PtyPeer {
        let (master, slave) = TTYPort::pair().unwrap();
        let path = serialport::SerialPort::name(&slave).unwrap();
        PtyPeer { master, _slave: slave, path, codec: Codec::new(kind, 1 << 16), pending: Vec::new() }
    }

    fn write_raw(&mut self, bytes: &[u8]) {
        self.master.write_all(bytes).unwrap();
    }

    /// Sends `payload` as one frame (the caller adds the HDLC type byte).
    fn send(&mut self, payload: &[u8]) {
        let mut wire = Vec::new();
        self.codec.encode(payload, &mut wire);
        self.write_raw(&wire);
    }

    /// The next frame the plugin wrote (HDLC: with its type byte).
    fn recv(&mut self, timeout: Duration) -> Option<Vec<u8>> {
        let deadline = Instant::now() + timeout;
        let mut buf = [0u8; 4096];
        while self.pending.is_empty() {
            let left = deadline.checked_duration_since(Instant::now())?;
            let mut fds = [pollfd(self.master.as_raw_fd(), libc::POLLIN)];
            poll(&mut fds, left.min(Duration::from_millis(50))).unwrap();
            if fds[0].revents == 0 {
                continue;
            }
            let n = read_fd(self.master.as_raw_fd(), &mut buf).unwrap();
            let mut out = Vec::new();
            self.codec.decode(&buf[..n], &mut out).unwrap();
            self.pending.extend(out.into_iter().filter_map(|d| match d {
                Decoded::Frame(f) => Some(f),
                Decoded::Dropped(_) => None,
            }));
        }
        Some(self.pending.remove(0))
    }

    /// The next data frame, skipping keepalives.
    fn recv_data(&mut self, timeout: Duration) -> Option<Vec<u8>> {
        let deadline = Instant::now() + timeout;
        loop {
            let f = self.recv(deadline.checked_duration_since(Instant::now())?)?;
            if f.first() != Some(&TYPE_KEEPALIVE) {
                return Some(f);
            }
        }
    }
}

fn data(payload: &[u8]) -> Vec<u8> {
    let mut f = vec![TYPE_DATA];
    f.extend_from_slice(payload);
    f
}

fn pattern(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 7 + 0x7B) as u8).collect() // crosses 0x7E/0x7D/0xC0/0xDB
}

#[test]
fn hdlc_round_trip_with_pty_peer() {
    let _g = shared();
    let mut peer = PtyPeer::new(FramingKind::Hdlc);
    let h = Harness::new();
    let t = open(&h, &config(&peer.path, "keepalive_ms: None, mtu: 512"));
    // Without keepalives the link is up as soon as the device is open.
    assert_eq!(h.wait_up(T), Some(named(&peer.path)));

    peer.send(&data(b"hello"));
    peer.send(&data(&pattern(512)));
    let got = h.frames(2, T);
    assert_eq!(got, vec![(named(&peer.path), b"hello".to_vec()), (named(&peer.path), pattern(512))]);

    t.send(&named(&peer.path), b"world").unwrap();
    t.send(&LinkAddr::Broadcast, &pattern(512)).unwrap();
    assert_eq!(peer.recv(T), Some(data(b"world")), "no keepalives were configured");
    assert_eq!(peer.recv(T), Some(data(&pattern(512))));
    close(&h, &t);
    assert_eq!(h.late_callbacks(), 0);
}

#[test]
fn kiss_round_trip_and_no_keepalives() {
    let _g = shared();
    let mut peer = PtyPeer::new(FramingKind::Kiss);
    let h = Harness::new();
    // keepalive_ms is ignored for KISS: a TNC would transmit the keepalives.
    let t = open(&h, &config(&peer.path, "framing: Kiss, keepalive_ms: Some(20), dead_after_ms: 100"));
    assert!(!t.capabilities().peer_liveness);
    assert!(h.wait_up(T).is_some());
    t.send(&named(&peer.path), &pattern(1024)).unwrap();
    // Had a keepalive been sent it would precede the data (the first goes out at once).
    assert_eq!(peer.recv(T), Some(pattern(1024)));
    peer.send(&[0xC0, 0xDB, 1, 2]);
    assert_eq!(h.frames(1, T), vec![(named(&peer.path), vec![0xC0, 0xDB, 1, 2])]);
    close(&h, &t);
}

#[test]
fn keepalives_drive_link_state() {
    let _g = shared();
    let mut peer = PtyPeer::new(FramingKind::Hdlc);
    let h = Harness::new();
    let t = open(&h, &config(&peer.path, "keepalive_ms: Some(50), dead_after_ms: 300"));
    assert!(t.capabilities().peer_liveness);
    // The plugin announces itself with keepalives…
    assert_eq!(peer.recv(T), Some(vec![TYPE_KEEPALIVE]));
    // …and reports the peer up on the first frame from it.
    peer.send(&[TYPE_KEEPALIVE]);
    assert_eq!(h.wait_up(T), Some(named(&peer.path)));
    // Silence: down after dead_after_ms.
    let (who, reason) = h.wait_down(T).unwrap();
    assert_eq!(who, named(&peer.path));
    assert_eq!(reason, "no frames for 300 ms");
    // Frames resume: up again, and the data is delivered (keepalives never are).
    peer.send(&data(b"back"));
    assert!(h.wait_up(T).is_some());
    assert_eq!(h.frames(1, T), vec![(named(&peer.path), b"back".to_vec())]);
    close(&h, &t);
    assert_eq!(h.late_callbacks(), 0);
}

/// Copies bytes between two pty masters, like `socat`, except that it survives a side
/// closing its slave (so a closed peer looks silent rather than hung up).
struct Bridge {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
}

impl Bridge {
    fn new(a: TTYPort, b: TTYPort) -> Bridge {
        set_nonblocking(a.as_raw_fd()).unwrap();
        set_nonblocking(b.as_raw_fd()).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let s = Arc::clone(&stop);
        let handle = std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while !s.load(Ordering::SeqCst) {
                let mut fds = [pollfd(a.as_raw_fd(), libc::POLLIN), pollfd(b.as_raw_fd(), libc::POLLIN)];
                poll(&mut fds, Duration::from_millis(10)).unwrap();
                for (i, (from, to)) in [(&a, &b), (&b, &a)].into_iter().enumerate() {
                    if fds[i].revents != 0 {
                        if let Ok(n) = read_fd(from.as_raw_fd(), &mut buf) {
                            // Lossy like a real line: what does not fit is dropped.
                            let _ = write_fd(to.as_raw_fd(), &buf[..n]);
                        }
                    }
                }
            }
        });
        Bridge { stop, handle: Some(handle) }
    }
}

impl Drop for Bridge {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            h.join().unwrap();
        }
    }
}

#[test]
fn two_instances_and_a_peer_that_closes() {
    let _g = shared();
    let (ma, sa) = TTYPort::pair().unwrap();
    let (mb, sb) = TTYPort::pair().unwrap();
    let (pa, pb) = (serialport::SerialPort::name(&sa).unwrap(), serialport::SerialPort::name(&sb).unwrap());
    let _bridge = Bridge::new(ma, mb);
    let (ha, hb) = (Harness::new(), Harness::new());
    let ka = "keepalive_ms: Some(50), dead_after_ms: 300, mtu: 1024";
    let a = open(&ha, &config(&pa, ka));
    let b = open(&hb, &config(&pb, ka));
    assert_eq!(ha.wait_up(T), Some(named(&pa)));
    assert_eq!(hb.wait_up(T), Some(named(&pb)));

    a.send(&named(&pa), &pattern(1024)).unwrap();
    b.send(&LinkAddr::Broadcast, b"from B").unwrap();
    assert_eq!(hb.frames(1, T), vec![(named(&pb), pattern(1024))]);
    assert_eq!(ha.frames(1, T), vec![(named(&pa), b"from B".to_vec())]);

    close(&hb, &b);
    let (who, reason) = ha.wait_down(T).unwrap();
    assert_eq!((who, reason.as_str()), (named(&pa), "no frames for 300 ms"));
    close(&ha, &a);
    assert_eq!(ha.late_callbacks() + hb.late_callbacks(), 0);
    drop((sa, sb));
}

/// `socat` linking two ptys at `a` and `b`; terminated (politely, so it removes the
/// links) on drop.
struct Socat {
    child: Child,
}

impl Socat {
    fn start(a: &Path, b: &Path) -> Socat {
        let child = Command::new("socat")
            .arg(format!("pty,raw,echo=0,link={}", a.display()))
            .arg(format!("pty,raw,echo=0,link={}", b.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + T;
        while !(a.exists() && b.exists()) {
            assert!(Instant::now() < deadline, "socat did not create its ptys");
            std::thread::sleep(Duration::from_millis(10));
        }
        Socat { child }
    }
}

impl Drop for Socat {
    fn drop(&mut self) {
        // SAFETY: signalling our own, not yet reaped, child.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

#[test]
fn socat_pair_round_trip_hangup_and_reopen() {
    let _g = shared();
    let dir = tempfile::tempdir().unwrap();
    let (la, lb): (PathBuf, PathBuf) = (dir.path().join("a"), dir.path().join("b"));
    let socat = Socat::start(&la, &lb);
    let (pa, pb) = (la.display().to_string(), lb.display().to_string());
    let (ha, hb) = (Harness::new(), Harness::new());
    let ka = "keepalive_ms: Some(50), dead_after_ms: 1000";
    let a = open(&ha, &config(&pa, ka));
    let b = open(&hb, &config(&pb, ka));
    assert_eq!(ha.wait_up(T), Some(named(&pa)));
    assert_eq!(hb.wait_up(T), Some(named(&pb)));
    a.send(&named(&pa), b"ping").unwrap();
    assert_eq!(hb.frames(1, T), vec![(named(&pb), b"ping".to_vec())]);
    b.send(&named(&pb), &pattern(1024)).unwrap();
    assert_eq!(ha.frames(1, T), vec![(named(&pa), pattern(1024))]);

    // The "adapter" is unplugged: both ends hang up and keep trying to reopen.
    drop(socat);
    for h in [&ha, &hb] {
        let (_, reason) = h.wait_down(T).unwrap();
        assert!(reason.starts_with("device error: "), "{reason}");
    }
    assert!(matches!(a.send(&named(&pa), b"x"), Err(SendError::UnknownPeer(_))));

    // …and plugged back in.
    let _socat = Socat::start(&la, &lb);
    assert!(ha.wait_up(T).is_some());
    assert!(hb.wait_up(T).is_some());
    a.send(&named(&pa), b"again").unwrap();
    assert_eq!(hb.frames(1, T), vec![(named(&pb), b"again".to_vec())]);
    close(&ha, &a);
    close(&hb, &b);
    assert_eq!(ha.late_callbacks() + hb.late_callbacks(), 0);
}

#[test]
fn master_hangup_reports_device_error() {
    let _g = shared();
    let peer = PtyPeer::new(FramingKind::Kiss);
    let h = Harness::new();
    let t = open(&h, &config(&peer.path, "framing: Kiss"));
    assert!(h.wait_up(T).is_some());
    let path = peer.path.clone();
    drop(peer);
    let (who, reason) = h.wait_down(T).unwrap();
    assert_eq!(who, named(&path));
    assert!(reason.starts_with("device error: "), "{reason}");
    close(&h, &t);
}

#[test]
fn garbage_on_the_line_is_survived() {
    let _g = shared();
    for kind in [FramingKind::Hdlc, FramingKind::Kiss] {
        let mut peer = PtyPeer::new(kind);
        let h = Harness::new();
        let framing = if kind == FramingKind::Hdlc { "Hdlc" } else { "Kiss" };
        let t = open(&h, &config(&peer.path, &format!("framing: {framing}, keepalive_ms: None, mtu: 64")));
        assert!(h.wait_up(T).is_some());
        // Deterministic noise, rich in flag and escape bytes.
        let mut x: u32 = 0x1234_5678;
        let noise: Vec<u8> = (0..4000)
            .map(|i| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                if i % 5 == 0 { [0x7E, 0x7D, 0xC0, 0xDB][(x % 4) as usize] } else { x as u8 }
            })
            .collect();
        peer.write_raw(&noise);
        let wrap = |p: &[u8]| if kind == FramingKind::Hdlc { data(p) } else { p.to_vec() };
        peer.send(&wrap(&[0x55; 65])); // over the MTU: dropped by the decoder
        if kind == FramingKind::Hdlc {
            peer.send(&[0x05, 1, 2, 3]); // unknown type: dropped
        }
        peer.send(&wrap(b"good"));
        // Noise may decode into something by chance (KISS has no checksum), but the
        // good frame must arrive and nothing over the MTU may.
        let mut seen = Vec::new();
        while !seen.iter().any(|f: &Vec<u8>| f == b"good") {
            let got = h.frames(1, T);
            assert!(!got.is_empty(), "{framing}: good frame never arrived");
            seen.extend(got.into_iter().map(|(_, d)| d));
        }
        assert!(seen.iter().all(|f| f.len() <= 64), "{framing}");
        if kind == FramingKind::Hdlc {
            assert_eq!(seen, vec![b"good".to_vec()], "HDLC's CRC must reject noise");
        }
        t.send(&named(&peer.path), b"still works").unwrap();
        assert_eq!(peer.recv_data(T), Some(wrap(b"still works")), "{framing}");
        close(&h, &t);
    }
}

#[test]
fn backpressure_would_block_then_writable() {
    let _g = shared();
    let mut peer = PtyPeer::new(FramingKind::Hdlc);
    let h = Harness::new();
    let t = open(&h, &config(&peer.path, "keepalive_ms: None, queue_frames: 4"));
    let frame = pattern(1024);
    let mut blocked = false;
    // The test does not read the master, so the pty buffer fills and the writer stalls.
    for _ in 0..100_000 {
        match t.send(&named(&peer.path), &frame) {
            Ok(()) => {}
            Err(SendError::WouldBlock) => {
                blocked = true;
                break;
            }
            Err(e) => panic!("unexpected {e}"),
        }
    }
    assert!(blocked, "never saw WouldBlock");
    let deadline = Instant::now() + T;
    loop {
        assert!(Instant::now() < deadline, "no writable event");
        let _ = peer.recv(Duration::from_millis(10));
        if h.rx.try_iter().any(|e| matches!(e, Event::Writable)) {
            break;
        }
    }
    t.send(&named(&peer.path), &frame).unwrap();
    close(&h, &t);
}

#[test]
fn bad_config_and_missing_device() {
    let _g = shared();
    let h = Harness::new();
    let e = open_serial("(path: \"/dev/x\", framing: Length)", h.host.clone()).err().unwrap();
    assert_eq!(e.kind, PluginErrorKind::BadConfig);
    let e = open_serial("(path: \"/dev/x\",\n bogus: 1)", h.host.clone()).err().unwrap();
    assert_eq!(e.kind, PluginErrorKind::BadConfig);
    assert!(e.message.starts_with("2:"), "{}", e.message);
    let e = open_serial(&config("/dev/antmesh-no-such-tty", ""), h.host.clone()).err().unwrap();
    assert_eq!(e.kind, PluginErrorKind::Io);
    assert!(e.message.contains("/dev/antmesh-no-such-tty"), "{}", e.message);
}

#[test]
fn addresses_capabilities_and_send_checks() {
    let _g = shared();
    let peer = PtyPeer::new(FramingKind::Hdlc);
    let h = Harness::new();
    let t = open(&h, &config(&peer.path, "baud: 9600, mtu: 100"));
    assert_eq!(t.local_addresses(), vec![format!("serial://{}", peer.path)]);
    let c = t.capabilities();
    assert_eq!((c.mtu, c.bitrate_bps, c.latency, c.broadcast), (100, 9600, LatencyClass::Wan, true));
    assert!(c.peer_liveness);
    assert!(matches!(t.send(&named("/dev/other"), b"x"), Err(SendError::UnknownPeer(_))));
    let ip = LinkAddr::from("127.0.0.1:9".parse::<std::net::SocketAddr>().unwrap());
    assert!(matches!(t.send(&ip, b"x"), Err(SendError::BadAddress(_))));
    assert_eq!(t.send(&named(&peer.path), &[0; 101]), Err(SendError::TooLarge { size: 101, mtu: 100 }));
    t.send(&named(&peer.path), &[0; 100]).unwrap();
    close(&h, &t);
    assert_eq!(t.send(&named(&peer.path), b"x"), Err(SendError::Closed));
    t.close().unwrap(); // idempotent
    for (baud, latency) in [(115_200, LatencyClass::Lan), (1200, LatencyClass::Slow)] {
        let t = open(&h, &config(&peer.path, &format!("baud: {baud}")));
        assert_eq!(t.capabilities().latency, latency);
        t.close().unwrap();
    }
}

fn fd_count() -> usize {
    std::fs::read_dir("/proc/self/fd").map(|d| d.count()).unwrap_or(0)
}

fn our_threads() -> usize {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else { return 0 };
    tasks
        .filter_map(|t| t.ok())
        .filter_map(|t| std::fs::read_to_string(t.path().join("comm")).ok())
        .filter(|name| name.starts_with("am-serial"))
        .count()
}

#[test]
fn open_close_100_times_leaks_nothing() {
    let _g = exclusive();
    let mut peer = PtyPeer::new(FramingKind::Hdlc);
    let h = Harness::new();
    let (fds, threads) = (fd_count(), our_threads());
    assert_eq!(threads, 0);
    let mut closes = Vec::new();
    // Kept until the end: `close` alone must release everything, stop-signal pipe included,
    // even while the host still holds the closed instances.
    let mut closed = Vec::new();
    for i in 0..100 {
        let t = open(&h, &config(&peer.path, "keepalive_ms: Some(1000)"));
        t.send(&named(&peer.path), format!("frame {i}").as_bytes()).unwrap();
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
    drop(closed);
    assert_eq!(fd_count(), fds, "fd leak");
    assert_eq!(h.late_callbacks(), 0);
    // The device is still usable afterwards (exclusive access was released each time).
    let h = Harness::new();
    let t = open(&h, &config(&peer.path, "keepalive_ms: None"));
    t.send(&named(&peer.path), b"after").unwrap();
    // Frames queued by the cycles above may still be in the pty buffer; skip them.
    let deadline = Instant::now() + T;
    loop {
        let f = peer.recv_data(deadline.saturating_duration_since(Instant::now()));
        assert!(f.is_some(), "the frame sent after the cycles never arrived");
        if f == Some(data(b"after")) {
            break;
        }
    }
    close(&h, &t);
}

#[test]
fn exported_root_module_opens_a_guarded_instance() {
    let _g = shared();
    let m = crate::antmesh_transport_root_module();
    let info = (m.info())();
    assert_eq!(info.name.as_str(), "serial");
    assert_eq!(info.schemes.iter().map(|s| s.as_str()).collect::<Vec<_>>(), vec!["serial"]);
    let mut peer = PtyPeer::new(FramingKind::Hdlc);
    let h = Harness::new();
    let cfg = config(&peer.path, "keepalive_ms: None, mtu: 16");
    let inst = (m.open())(abi_stable::std_types::RStr::from_str(&cfg), h.handle.clone()).unwrap();
    let big = [0u8; 17];
    assert_eq!(
        inst.send(&named(&peer.path), abi_stable::std_types::RSlice::from_slice(&big)).into_result(),
        Err(SendError::TooLarge { size: 17, mtu: 16 })
    );
    inst.send(&named(&peer.path), abi_stable::std_types::RSlice::from_slice(b"via the ABI")).unwrap();
    assert_eq!(peer.recv_data(T), Some(data(b"via the ABI")));
    inst.close().unwrap();
    h.mark_closed();
    assert_eq!(h.late_callbacks(), 0);
}

/// Closes the instance from inside the first callback matching `pred` and reports, from
/// there, close's result and the thread's name.
struct CloseInCallback {
    done: mpsc::Receiver<(bool, Option<String>)>,
}

impl CloseInCallback {
    fn install(
        h: &Harness,
        t: &Arc<SerialTransport>,
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
            let name = std::thread::current().name().map(str::to_owned);
            let _ = tx.lock().unwrap().send((ok, name));
        });
        CloseInCallback { done }
    }

    fn try_wait(&self) -> Option<(bool, Option<String>)> {
        self.done.try_recv().ok()
    }

    fn wait(&self) -> (bool, Option<String>) {
        self.done.recv_timeout(T).expect("close from the callback did not return (deadlock?)")
    }
}

#[test]
fn close_from_a_link_up_callback_on_the_device_thread() {
    let _g = shared();
    let mut peer = PtyPeer::new(FramingKind::Hdlc);
    let h = Harness::new();
    let t = Arc::new(open(&h, &config(&peer.path, "keepalive_ms: Some(50), dead_after_ms: 1000")));
    let cb = CloseInCallback::install(&h, &t, |e| matches!(e, Event::Up(_)));
    // With keepalives the link comes up on the first frame from the peer.
    peer.send(&[TYPE_KEEPALIVE]);
    let (ok, thread) = cb.wait();
    assert!(ok);
    assert_eq!(thread.as_deref(), Some("am-serial-rd"));
    assert_eq!(t.send(&named(&peer.path), b"x"), Err(SendError::Closed));
    // Frames after the close are neither delivered nor reported.
    peer.send(&data(b"after close"));
    std::thread::sleep(Duration::from_millis(100));
    t.close().unwrap();
    assert_eq!(h.late_callbacks(), 0);
    // The port was closed: exclusive access is free again.
    let t = open(&h, &config(&peer.path, "keepalive_ms: None"));
    t.close().unwrap();
}

#[test]
fn close_from_a_writable_callback_on_the_writer() {
    let _g = shared();
    let mut peer = PtyPeer::new(FramingKind::Hdlc);
    let h = Harness::new();
    let t = Arc::new(open(&h, &config(&peer.path, "keepalive_ms: None, queue_frames: 4")));
    let frame = pattern(1024);
    let mut blocked = false;
    // The test does not read the master, so the pty buffer fills and the writer stalls.
    for _ in 0..100_000 {
        match t.send(&named(&peer.path), &frame) {
            Ok(()) => {}
            Err(SendError::WouldBlock) => {
                blocked = true;
                break;
            }
            Err(e) => panic!("unexpected {e}"),
        }
    }
    assert!(blocked, "never saw WouldBlock");
    let cb = CloseInCallback::install(&h, &t, |e| matches!(e, Event::Writable));
    let deadline = Instant::now() + T;
    let (ok, thread) = loop {
        assert!(Instant::now() < deadline, "close from writable never returned (deadlock?)");
        let _ = peer.recv(Duration::from_millis(10));
        if let Some(r) = cb.try_wait() {
            break r;
        }
    };
    assert!(ok);
    assert_eq!(thread.as_deref(), Some("am-serial-wr"));
    t.close().unwrap();
    assert_eq!(h.late_callbacks(), 0);
}

#[test]
fn concurrent_closes_both_wait_for_a_running_callback() {
    let _g = shared();
    let mut peer = PtyPeer::new(FramingKind::Hdlc);
    let h = Harness::new();
    let t = Arc::new(open(&h, &config(&peer.path, "keepalive_ms: None")));
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
    peer.send(&data(b"slow"));
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
