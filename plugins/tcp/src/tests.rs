//! Tests against real sockets on 127.0.0.1, through a recording test host.
//!
//! Every test takes [`serial`] so descriptor and thread counts are not disturbed by other
//! tests running at the same time.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream as StdTcpStream};
use std::sync::{mpsc, Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use abi_stable::sabi_trait::TD_Opaque;
use abi_stable::std_types::{RArc, RSlice, RStr};
use antmesh_plugin_api::{
    Duplex, Framing, Host, HostHandle, HostHandleBox, HostHandle_TO, InFrame, LatencyClass, LinkAddr, LogLevel, PluginErrorKind,
    Reliability, SendError, Transport, TransportAddr,
};

use super::reactor::Fault;
use super::{open, TcpTransport};

const WAIT: Duration = Duration::from_secs(5);

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(PoisonError::into_inner)
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Ev {
    Frames(Vec<(SocketAddr, Vec<u8>)>),
    Up(SocketAddr),
    Down(SocketAddr, String),
    Writable,
    Log(LogLevel, String),
    /// Not a callback: a `close` made from inside one returned (with `Ok` or not).
    ClosedInCallback(bool),
}

#[derive(Clone)]
struct TestHost {
    tx: mpsc::Sender<Ev>,
}

impl HostHandle for TestHost {
    fn deliver(&self, frames: RSlice<'_, InFrame<'_>>) {
        let batch = frames.iter().map(|f| (f.from.socket_addr().unwrap(), f.data.to_vec())).collect();
        let _ = self.tx.send(Ev::Frames(batch));
    }

    fn link_up(&self, peer: &LinkAddr) {
        let _ = self.tx.send(Ev::Up(peer.socket_addr().unwrap()));
    }

    fn link_down(&self, peer: &LinkAddr, reason: RStr<'_>) {
        let _ = self.tx.send(Ev::Down(peer.socket_addr().unwrap(), reason.to_string()));
    }

    fn writable(&self) {
        let _ = self.tx.send(Ev::Writable);
    }

    fn log(&self, level: LogLevel, message: RStr<'_>) {
        let _ = self.tx.send(Ev::Log(level, message.to_string()));
    }
}

/// The receiving end of a test host. Events not matched by a wait are kept for later waits.
struct Rx {
    rx: mpsc::Receiver<Ev>,
    kept: VecDeque<Ev>,
}

impl Rx {
    /// The first event (kept or new) for which `pick` returns `Some`, within `timeout`.
    fn wait<T>(&mut self, timeout: Duration, mut pick: impl FnMut(&Ev) -> Option<T>) -> Option<T> {
        if let Some(i) = self.kept.iter().position(|e| pick(e).is_some()) {
            let ev = self.kept.remove(i)?;
            return pick(&ev);
        }
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.checked_duration_since(Instant::now())?;
            let ev = self.rx.recv_timeout(left).ok()?;
            if let Some(v) = pick(&ev) {
                return Some(v);
            }
            self.kept.push_back(ev);
        }
    }

    fn up(&mut self) -> SocketAddr {
        self.wait(WAIT, |e| match e {
            Ev::Up(a) => Some(*a),
            _ => None,
        })
        .expect("no link_up within the timeout")
    }

    fn down(&mut self, peer: SocketAddr) -> String {
        self.wait(WAIT, |e| match e {
            Ev::Down(a, why) if *a == peer => Some(why.clone()),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no link_down for {peer} within the timeout"))
    }

    fn writable(&mut self) {
        self.wait(WAIT, |e| (*e == Ev::Writable).then_some(())).expect("no writable event within the timeout");
    }

    /// Collects `n` frames (across deliver batches), failing after `timeout`.
    fn frames(&mut self, n: usize, timeout: Duration) -> Vec<(SocketAddr, Vec<u8>)> {
        let mut got = Vec::new();
        let deadline = Instant::now() + timeout;
        while got.len() < n {
            let left = deadline.saturating_duration_since(Instant::now());
            let batch = self.wait(left, |e| match e {
                Ev::Frames(f) => Some(f.clone()),
                _ => None,
            });
            match batch {
                Some(b) => got.extend(b),
                None => panic!("only {} of {n} frames arrived within {timeout:?}", got.len()),
            }
        }
        assert_eq!(got.len(), n, "more frames than expected");
        got
    }

    /// Every event that arrives within `window` (for checking that nothing happens).
    fn quiet(&mut self, window: Duration) -> Vec<Ev> {
        let deadline = Instant::now() + window;
        let mut seen = Vec::new();
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.rx.recv_timeout(left) {
                Ok(ev) => seen.push(ev),
                Err(_) => break,
            }
        }
        seen
    }

    /// Forgets everything received so far.
    fn drain(&mut self) {
        self.kept.clear();
        while self.rx.try_recv().is_ok() {}
    }
}

/// A test host that also runs `hook` on the I/O thread after recording each `deliver`.
#[derive(Clone)]
struct HookHost {
    inner: TestHost,
    hook: Arc<dyn Fn() + Send + Sync>,
}

impl HostHandle for HookHost {
    fn deliver(&self, frames: RSlice<'_, InFrame<'_>>) {
        self.inner.deliver(frames);
        (self.hook)();
    }

    fn link_up(&self, peer: &LinkAddr) {
        self.inner.link_up(peer);
    }

    fn link_down(&self, peer: &LinkAddr, reason: RStr<'_>) {
        self.inner.link_down(peer, reason);
    }

    fn writable(&self) {
        self.inner.writable();
    }

    fn log(&self, level: LogLevel, message: RStr<'_>) {
        self.inner.log(level, message);
    }
}

/// A host whose `deliver` calls `hook(tx)`, `tx` feeding the same event stream.
fn hook_host(hook: impl Fn(&mpsc::Sender<Ev>) + Send + Sync + 'static) -> (Host, Rx) {
    let (tx, rx) = mpsc::channel();
    let hook_tx = tx.clone();
    let host = HookHost { inner: TestHost { tx }, hook: Arc::new(move || hook(&hook_tx)) };
    let handle = HostHandle_TO::from_ptr(RArc::new(host), TD_Opaque);
    (Host::new(handle), Rx { rx, kept: VecDeque::new() })
}

fn test_handle() -> (HostHandleBox, Rx) {
    let (tx, rx) = mpsc::channel();
    // The pointer type of `HostHandleBox` is `RArc`; `from_value` would build an `RBox`.
    let handle = HostHandle_TO::from_ptr(RArc::new(TestHost { tx }), TD_Opaque);
    (handle, Rx { rx, kept: VecDeque::new() })
}

fn test_host() -> (Host, Rx) {
    let (handle, rx) = test_handle();
    (Host::new(handle), rx)
}

fn start(config: &str) -> (TcpTransport, Rx) {
    let (host, rx) = test_host();
    let t = open(config, host).unwrap_or_else(|e| panic!("open {config}: {e}"));
    (t, rx)
}

fn listen_addr(t: &TcpTransport) -> SocketAddr {
    let addrs = t.local_addresses();
    assert_eq!(addrs.len(), 1, "{addrs:?}");
    match addrs[0].parse::<TransportAddr>() {
        Ok(TransportAddr::Tcp(sa)) => sa,
        other => panic!("not a tcp address: {other:?}"),
    }
}

fn listener() -> (TcpTransport, Rx, SocketAddr) {
    let (t, rx) = start(r#"(listen: Some("127.0.0.1:0"))"#);
    let addr = listen_addr(&t);
    (t, rx, addr)
}

fn dialer(to: SocketAddr, extra: &str) -> (TcpTransport, Rx) {
    start(&format!(r#"(connect: ["{to}"], backoff_min_ms: 20, backoff_max_ms: 200, {extra})"#))
}

/// An address nothing listens on (bound, read, released).
fn free_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

fn link(sa: SocketAddr) -> LinkAddr {
    LinkAddr::from(sa)
}

/// Sends, waiting for the writable event whenever the queue is full.
fn send_all(t: &TcpTransport, rx: &mut Rx, to: SocketAddr, frame: &[u8]) -> usize {
    let mut blocked = 0;
    loop {
        match t.send(&link(to), frame) {
            Ok(()) => return blocked,
            Err(SendError::WouldBlock) => {
                blocked += 1;
                rx.writable();
            }
            Err(e) => panic!("send to {to}: {e}"),
        }
    }
}

/// A connected pair: `a` dialled `b`. Returns `b`'s address and `a`'s address as `b` sees it.
fn pair(dial_extra: &str) -> (TcpTransport, Rx, TcpTransport, Rx, SocketAddr, SocketAddr) {
    let (b, mut rb, baddr) = listener();
    let (a, mut ra) = dialer(baddr, dial_extra);
    assert_eq!(ra.up(), baddr);
    let a_seen = rb.up();
    (a, ra, b, rb, baddr, a_seen)
}

#[test]
fn round_trip_both_directions() {
    let _s = serial();
    let (a, mut ra, b, mut rb, baddr, a_seen) = pair("");
    a.send(&link(baddr), b"hello").unwrap();
    assert_eq!(rb.frames(1, WAIT), vec![(a_seen, b"hello".to_vec())]);
    b.send(&link(a_seen), b"world").unwrap();
    assert_eq!(ra.frames(1, WAIT), vec![(baddr, b"world".to_vec())]);
    // An empty frame is a frame too.
    a.send(&link(baddr), b"").unwrap();
    assert_eq!(rb.frames(1, WAIT), vec![(a_seen, Vec::new())]);
    a.close().unwrap();
    b.close().unwrap();
}

#[test]
fn burst_of_10000_frames_arrives_in_order() {
    let _s = serial();
    // A small queue so the burst runs into backpressure and must wait for `writable`.
    let (a, mut ra, b, mut rb, baddr, a_seen) = pair("queue_frames: 16");
    const N: u32 = 10_000;
    let frame = |i: u32| {
        let mut f = i.to_be_bytes().to_vec();
        f.resize(4 + (i as usize % 700), (i % 251) as u8);
        f
    };
    for i in 0..N {
        send_all(&a, &mut ra, baddr, &frame(i));
    }
    let got = rb.frames(N as usize, Duration::from_secs(30));
    for (i, (from, data)) in got.iter().enumerate() {
        assert_eq!(*from, a_seen);
        assert_eq!(*data, frame(i as u32), "frame {i}");
    }
    a.close().unwrap();
    b.close().unwrap();
}

#[test]
fn a_stalled_reader_pushes_back_on_send() {
    let _s = serial();
    let (c, mut rc) = start(r#"(listen: Some("127.0.0.1:0"), queue_frames: 8)"#);
    let mut g = StdTcpStream::connect(listen_addr(&c)).unwrap();
    let g_addr = g.local_addr().unwrap();
    assert_eq!(rc.up(), g_addr);
    // Nobody reads: queue, write buffer and socket buffers fill, then `send` must refuse
    // rather than buffer without bound (1000 frames would be 60 MB).
    let frame = vec![0x5a; 60_000];
    // (Asserting on a second send after the first refusal would race with the loop, which
    // may still move a frame into the socket in between.)
    let refused = (0..1000).map(|_| c.send(&link(g_addr), &frame)).find(Result::is_err);
    assert_eq!(refused, Some(Err(SendError::WouldBlock)), "send never pushed back");
    // Reading makes room, and the host is told so.
    let reader = std::thread::spawn(move || {
        let mut buf = vec![0u8; 1 << 16];
        let mut head = Vec::new();
        let mut total = 0usize;
        g.set_read_timeout(Some(WAIT)).unwrap();
        while let Ok(n) = g.read(&mut buf) {
            if n == 0 {
                break;
            }
            if head.is_empty() {
                head = buf[..n.min(8)].to_vec();
            }
            total += n;
        }
        (head, total)
    });
    rc.writable();
    c.send(&link(g_addr), &frame).unwrap();
    // Closing discards what is still queued; the reader sees the frames written, then EOF.
    c.close().unwrap();
    let (head, total) = reader.join().unwrap();
    assert_eq!(head, [0, 0, 0xea, 0x60, 0x5a, 0x5a, 0x5a, 0x5a]);
    assert!(total >= frame.len() + 4);
}

#[test]
fn link_events_follow_connections_and_stop_after_close() {
    let _s = serial();
    let (a, mut ra, b, mut rb, baddr, a_seen) = pair("");

    // The dialler goes away: the listener sees the link drop; the closed side stays silent.
    ra.drain();
    a.close().unwrap();
    a.close().unwrap();
    assert!(!rb.down(a_seen).is_empty());
    assert_eq!(a.send(&link(baddr), b"x"), Err(SendError::Closed));
    assert_eq!(ra.quiet(Duration::from_millis(200)), Vec::new(), "callbacks after close");

    // The listener goes away: the dialler sees it, and stops accepting frames for it.
    let (a2, mut ra2) = dialer(baddr, "");
    assert_eq!(ra2.up(), baddr);
    let a2_seen = rb.up();
    b.close().unwrap();
    ra2.down(baddr);
    assert!(matches!(a2.send(&link(baddr), b"x"), Err(SendError::UnknownPeer(_))));
    assert!(matches!(b.send(&link(a2_seen), b"x"), Err(SendError::Closed)));
    a2.close().unwrap();
}

#[test]
fn dialler_redials_until_the_listener_is_back() {
    let _s = serial();
    let addr = free_addr();
    let (a, mut ra) = dialer(addr, "");
    // Nobody listens yet: the failure is reported once, and frames are refused, not buffered.
    let warned = ra.wait(WAIT, |e| match e {
        Ev::Log(LogLevel::Warn, m) if m.contains(&addr.to_string()) => Some(m.clone()),
        _ => None,
    });
    assert!(warned.is_some(), "no warning about the failed dial");
    assert!(matches!(a.send(&link(addr), b"early"), Err(SendError::UnknownPeer(_))));

    for round in 0..2 {
        let (b, mut rb) = start(&format!(r#"(listen: Some("{addr}"))"#));
        assert_eq!(ra.up(), addr, "round {round}");
        let a_seen = rb.up();
        a.send(&link(addr), format!("round {round}").as_bytes()).unwrap();
        assert_eq!(rb.frames(1, WAIT), vec![(a_seen, format!("round {round}").into_bytes())]);
        b.close().unwrap();
        ra.down(addr);
    }
    a.close().unwrap();
}

fn assert_dropped(mut g: StdTcpStream) {
    g.set_read_timeout(Some(WAIT)).unwrap();
    let mut buf = [0u8; 64];
    loop {
        match g.read(&mut buf) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) if matches!(e.kind(), std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe) => {
                return
            }
            Err(e) => panic!("garbage connection was not dropped: {e}"),
        }
    }
}

#[test]
fn garbage_connections_are_dropped_and_others_keep_working() {
    let _s = serial();
    let (c, mut rc) = start(r#"(listen: Some("127.0.0.1:0"), mtu: 1024)"#);
    let caddr = listen_addr(&c);
    // A well-behaved peer, connected before the garbage arrives.
    let (d, mut rd) = dialer(caddr, "mtu: 1024");
    assert_eq!(rd.up(), caddr);
    let d_seen = rc.up();

    // A huge length prefix: refused before any allocation, connection dropped.
    let mut g1 = StdTcpStream::connect(caddr).unwrap();
    let g1_addr = g1.local_addr().unwrap();
    assert_eq!(rc.up(), g1_addr);
    g1.write_all(&[0xff, 0xff, 0xff, 0xff, 1, 2, 3]).unwrap();
    let why = rc.down(g1_addr);
    assert!(why.contains("framing"), "{why}");
    assert_dropped(g1);

    // Pseudo-random bytes.
    let mut g2 = StdTcpStream::connect(caddr).unwrap();
    let g2_addr = g2.local_addr().unwrap();
    assert_eq!(rc.up(), g2_addr);
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let noise: Vec<u8> = (0..65536)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    // The instance may drop us mid-write; that is the point.
    let _ = g2.write_all(&noise);
    rc.down(g2_addr);
    assert_dropped(g2);

    // A truncated frame followed by a hangup delivers nothing.
    let mut g3 = StdTcpStream::connect(caddr).unwrap();
    let g3_addr = g3.local_addr().unwrap();
    assert_eq!(rc.up(), g3_addr);
    g3.write_all(&[0, 0, 0, 10, 1, 2, 3]).unwrap();
    drop(g3);
    assert_eq!(rc.down(g3_addr), "connection closed by peer");

    // The good peer never noticed, and nothing from the garbage was delivered.
    d.send(&link(caddr), b"still fine").unwrap();
    assert_eq!(rc.frames(1, WAIT), vec![(d_seen, b"still fine".to_vec())]);
    c.send(&link(d_seen), b"and back").unwrap();
    assert_eq!(rd.frames(1, WAIT), vec![(caddr, b"and back".to_vec())]);
    assert!(!rc.kept.iter().any(|e| matches!(e, Ev::Frames(_))), "garbage was delivered: {:?}", rc.kept);
    assert!(!rd.kept.iter().any(|e| matches!(e, Ev::Down(..))), "the good link dropped");
    c.close().unwrap();
    d.close().unwrap();
}

#[test]
fn oversized_inbound_frame_drops_the_connection_and_the_dialler_reconnects() {
    let _s = serial();
    let (b, mut rb) = start(r#"(listen: Some("127.0.0.1:0"), mtu: 100)"#);
    let baddr = listen_addr(&b);
    let (a, mut ra) = dialer(baddr, "mtu: 1000");
    assert_eq!(ra.up(), baddr);
    let first = rb.up();
    a.send(&link(baddr), &[7u8; 101]).unwrap();
    assert!(rb.down(first).contains("exceeds"));
    ra.down(baddr);
    assert_eq!(ra.up(), baddr, "no redial after the drop");
    let second = rb.up();
    a.send(&link(baddr), &[7u8; 100]).unwrap();
    assert_eq!(rb.frames(1, WAIT), vec![(second, vec![7u8; 100])]);
    a.close().unwrap();
    b.close().unwrap();
}

#[test]
fn mtu_sized_frame_passes_and_larger_is_refused_by_the_exported_instance() {
    let _s = serial();
    let (b, mut rb, baddr) = listener();
    let (handle, mut ra) = test_handle();
    let config = format!(r#"(connect: ["{baddr}"])"#);
    let a = antmesh_plugin_api::export::open_guarded(RStr::from_str(&config), handle, open)
        .into_result()
        .unwrap();
    assert_eq!(ra.up(), baddr);
    let a_seen = rb.up();
    let mtu = a.capabilities().mtu as usize;
    assert_eq!(mtu, 65535);
    let big: Vec<u8> = (0..mtu).map(|i| (i % 253) as u8).collect();
    assert!(a.send(&link(baddr), RSlice::from_slice(&big)).is_ok());
    assert_eq!(rb.frames(1, WAIT), vec![(a_seen, big.clone())]);
    let too_big = vec![0u8; mtu + 1];
    assert_eq!(
        a.send(&link(baddr), RSlice::from_slice(&too_big)).into_result(),
        Err(SendError::TooLarge { size: 65536, mtu: 65535 })
    );
    assert!(a.close().is_ok());
    b.close().unwrap();
}

#[test]
fn send_errors_capabilities_and_addresses() {
    let _s = serial();
    let nobody = free_addr();
    let (t, _rx) = start(&format!(r#"(listen: Some("127.0.0.1:0"), connect: ["{nobody}"], mtu: 1500)"#));
    let bound = listen_addr(&t);
    assert_eq!(bound.ip().to_string(), "127.0.0.1");
    assert_ne!(bound.port(), 0);
    assert_eq!(t.local_addresses(), vec![format!("tcp://{bound}")]);

    let caps = t.capabilities();
    assert_eq!(caps.mtu, 1500);
    assert_eq!(caps.bitrate_bps, 0);
    assert_eq!(caps.latency, LatencyClass::Wan);
    assert!(!caps.broadcast);
    assert_eq!(caps.duplex, Duplex::Full);
    assert_eq!(caps.reliability, Reliability::ReliableOrdered);
    assert_eq!(caps.framing, Framing::Stream);
    assert!(!caps.link_layer_acks && !caps.metered && !caps.power_constrained);
    assert!(caps.peer_liveness);

    assert_eq!(t.send(&LinkAddr::Broadcast, b"x"), Err(SendError::BroadcastUnsupported));
    assert!(matches!(t.send(&LinkAddr::Named("radio".into()), b"x"), Err(SendError::BadAddress(_))));
    let stranger = "192.0.2.1:9".parse::<SocketAddr>().unwrap();
    assert_eq!(t.send(&link(stranger), b"x"), Err(SendError::UnknownPeer("192.0.2.1:9".into())));
    assert!(matches!(t.send(&link(nobody), b"x"), Err(SendError::UnknownPeer(_))));
    assert!(matches!(t.send(&link(nobody), &[0; 1501]), Err(SendError::TooLarge { size: 1501, mtu: 1500 })));
    t.close().unwrap();
    assert_eq!(t.send(&link(nobody), b"x"), Err(SendError::Closed));

    let (dial_only, _rx2) = start(&format!(r#"(connect: ["{nobody}"])"#));
    assert!(dial_only.local_addresses().is_empty());
    dial_only.close().unwrap();
}

#[test]
fn bad_configs_are_rejected() {
    let _s = serial();
    let cases = [
        ("(listen: Some(\"127.0.0.1:0\"", "unparseable"),
        ("(listen: Some(\"127.0.0.1:0\"), colour: 3)", "unknown field"),
        ("(listen: Some(\"not an address\"))", "bad address"),
        ("(listen: Some(\"127.0.0.1:0\"), mtu: 0)", "mtu 0"),
        ("()", "neither listen nor connect"),
        ("(listen: None, connect: [])", "neither listen nor connect"),
        ("(listen: Some(\"127.0.0.1:0\"), queue_frames: 0)", "queue 0"),
        ("(connect: [\"127.0.0.1:1\"], backoff_min_ms: 10, backoff_max_ms: 5)", "backoff"),
        ("(connect: [\"127.0.0.1:1\", \"127.0.0.1:1\"])", "duplicate"),
        ("(listen: Some(\"127.0.0.1:0\"), mtu: 16777217)", "mtu above 16 MiB"),
        ("(listen: Some(\"127.0.0.1:0\"), mtu: 4294967295)", "mtu 4 GiB"),
        ("(listen: Some(\"127.0.0.1:0\"), max_connections: 0)", "max_connections 0"),
        ("(listen: Some(\"127.0.0.1:0\"), frame_timeout_ms: 0)", "frame_timeout_ms 0"),
    ];
    for (text, what) in cases {
        let (host, _rx) = test_host();
        match open(text, host) {
            Err(e) => assert_eq!(e.kind, PluginErrorKind::BadConfig, "{what}: {e}"),
            Ok(t) => {
                t.close().unwrap();
                panic!("{what}: accepted {text}");
            }
        }
    }
    // Parse errors say where.
    let (host, _rx) = test_host();
    let err = open("(\n  mtu: \"big\",\n)", host).err().unwrap();
    assert!(err.message.starts_with("2:"), "{}", err.message);

    // The largest mtu is accepted.
    let (host, _rx) = test_host();
    let t = open("(listen: Some(\"127.0.0.1:0\"), mtu: 16777216)", host).unwrap();
    assert_eq!(t.capabilities().mtu, 16 * 1024 * 1024);
    t.close().unwrap();

    // Everything optional except something to do.
    let (host, _rx) = test_host();
    let t = open("(listen: Some(\"127.0.0.1:0\"))", host).unwrap();

    // A taken port is an I/O error naming the address.
    let taken = listen_addr(&t);
    let (host, _rx) = test_host();
    let err = open(&format!("(listen: Some(\"{taken}\"))"), host).err().unwrap();
    assert_eq!(err.kind, PluginErrorKind::Io);
    assert!(err.message.contains(&taken.to_string()), "{}", err.message);
    t.close().unwrap();
}

#[test]
fn export_describes_the_plugin() {
    let module = super::antmesh_transport_root_module();
    let info = (module.info())();
    assert_eq!(info.name.as_str(), "tcp");
    assert_eq!(info.schemes.iter().map(|s| s.as_str()).collect::<Vec<_>>(), vec!["tcp"]);
    assert_eq!(info.abi_version, antmesh_plugin_api::ABI_VERSION);
}

fn fd_count() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

fn io_thread_count() -> usize {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|e| std::fs::read_to_string(e.ok()?.path().join("comm")).ok())
        .filter(|name| name.trim() == "antmesh-tcp")
        .count()
}

#[test]
fn open_close_100_times_leaks_nothing() {
    let _s = serial();
    let (b, mut rb, baddr) = listener();
    let cycle = |rb: &mut Rx| {
        let (a, mut ra) = start(&format!(r#"(listen: Some("127.0.0.1:0"), connect: ["{baddr}"])"#));
        assert_eq!(ra.up(), baddr);
        let seen = rb.up();
        a.send(&link(baddr), b"ping").unwrap();
        let closing = Instant::now();
        a.close().unwrap();
        assert!(closing.elapsed() < Duration::from_millis(500), "close took {:?}", closing.elapsed());
        a.close().unwrap();
        drop(a);
        // The listener's side of the connection is gone too once it reports the drop.
        rb.down(seen);
        rb.drain();
    };
    cycle(&mut rb); // warm-up: anything the process opens once, lazily
    let fds = fd_count();
    assert_eq!(io_thread_count(), 1);
    for _ in 0..100 {
        cycle(&mut rb);
    }
    assert_eq!(fd_count(), fds, "descriptors leaked");
    assert_eq!(io_thread_count(), 1, "I/O threads leaked");
    b.close().unwrap();
    assert_eq!(io_thread_count(), 0);
}

#[test]
fn dropping_without_close_still_stops_the_thread() {
    let _s = serial();
    let before = fd_count();
    let (t, mut rx) = start(r#"(listen: Some("127.0.0.1:0"))"#);
    // A link_up proves the thread is running (and has named itself).
    let peer = StdTcpStream::connect(listen_addr(&t)).unwrap();
    assert_eq!(rx.up(), peer.local_addr().unwrap());
    assert_eq!(io_thread_count(), 1);
    drop(t);
    assert_eq!(io_thread_count(), 0);
    assert_dropped(peer);
    assert_eq!(fd_count(), before);
}

/// Connects a raw client to `to` and waits for the instance to report it up.
fn raw_peer(to: SocketAddr, rx: &mut Rx) -> (StdTcpStream, SocketAddr) {
    let g = StdTcpStream::connect(to).unwrap();
    let addr = g.local_addr().unwrap();
    assert_eq!(rx.up(), addr);
    (g, addr)
}

/// Fills `peer`'s queue (nobody reads on the other end) until `send` is refused and stays
/// refused: after the first refusal the kernel still absorbs a few MB, and each drain that
/// follows answers the refusal with `writable`. Other events meanwhile stay in `rx`.
fn fill_until_stuck(t: &TcpTransport, rx: &mut Rx, peer: SocketAddr) {
    let frame = vec![0x5a; 60_000];
    for _ in 0..1000 {
        let refused = (0..1000).map(|_| t.send(&link(peer), &frame)).find(Result::is_err);
        assert_eq!(refused, Some(Err(SendError::WouldBlock)), "send never pushed back");
        // Stuck once nothing drained for a while: no `writable`, and still no room.
        let drained = rx.wait(Duration::from_millis(200), |e| (*e == Ev::Writable).then_some(()));
        if drained.is_none() && t.send(&link(peer), &frame) == Err(SendError::WouldBlock) {
            return;
        }
    }
    panic!("the queue kept draining; the peer is not stuck");
}

#[test]
fn connections_beyond_max_connections_are_refused() {
    let _s = serial();
    let (c, mut rc) = start(r#"(listen: Some("127.0.0.1:0"), max_connections: 2)"#);
    let caddr = listen_addr(&c);
    let (g1, g1_addr) = raw_peer(caddr, &mut rc);
    let (_g2, _) = raw_peer(caddr, &mut rc);

    // The third is accepted and closed at once, without a link_up.
    let g3 = StdTcpStream::connect(caddr).unwrap();
    assert_dropped(g3);
    let logged = rc.wait(WAIT, |e| match e {
        Ev::Log(LogLevel::Debug, m) if m.contains("max_connections") => Some(()),
        _ => None,
    });
    assert!(logged.is_some(), "no debug log for the refused connection");
    assert!(!rc.kept.iter().any(|e| matches!(e, Ev::Up(_))), "refused connection reported up: {:?}", rc.kept);

    // A free slot is usable again.
    drop(g1);
    rc.down(g1_addr);
    let (_g4, _) = raw_peer(caddr, &mut rc);
    c.close().unwrap();

    // Dialled connections count too.
    let (b, mut rb, baddr) = listener();
    let (a, mut ra) = start(&format!(r#"(listen: Some("127.0.0.1:0"), connect: ["{baddr}"], max_connections: 1)"#));
    assert_eq!(ra.up(), baddr);
    rb.up();
    let g5 = StdTcpStream::connect(listen_addr(&a)).unwrap();
    assert_dropped(g5);
    a.send(&link(baddr), b"dial still works").unwrap();
    assert_eq!(rb.frames(1, WAIT).len(), 1);
    a.close().unwrap();
    b.close().unwrap();
}

#[test]
fn one_ip_gets_at_most_its_share_of_connections() {
    let _s = serial();
    let (c, mut rc) = start(r#"(listen: Some("127.0.0.1:0"), max_connections_per_ip: 2)"#);
    let caddr = listen_addr(&c);
    let (_g1, _) = raw_peer(caddr, &mut rc);
    let (_g2, _) = raw_peer(caddr, &mut rc);
    // A third from 127.0.0.1 is closed at once; one from 127.0.0.2 is taken.
    let g3 = StdTcpStream::connect(caddr).unwrap();
    assert_dropped(g3);
    let logged = rc.wait(WAIT, |e| match e {
        Ev::Log(LogLevel::Debug, m) if m.contains("max_connections_per_ip") => Some(()),
        _ => None,
    });
    assert!(logged.is_some(), "no debug log for the refused connection");
    let other = socket2_connect_from("127.0.0.2", caddr);
    let up = rc.up();
    assert_eq!(up.ip(), other.local_addr().unwrap().ip());
    c.close().unwrap();
}

/// A TCP connection to `to` from `ip` (any port).
fn socket2_connect_from(ip: &str, to: std::net::SocketAddr) -> StdTcpStream {
    let local: std::net::SocketAddr = format!("{ip}:0").parse().unwrap();
    // SAFETY: plain socket calls on a descriptor owned by the returned stream.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
        assert!(fd >= 0);
        use std::os::fd::FromRawFd;
        let s = StdTcpStream::from_raw_fd(fd);
        let sa = |a: std::net::SocketAddr| match a {
            std::net::SocketAddr::V4(v4) => libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: v4.port().to_be(),
                sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes(v4.ip().octets()) },
                sin_zero: [0; 8],
            },
            _ => panic!("IPv4 only"),
        };
        let l = sa(local);
        assert_eq!(libc::bind(fd, std::ptr::addr_of!(l).cast(), std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t), 0);
        let r = sa(to);
        assert_eq!(libc::connect(fd, std::ptr::addr_of!(r).cast(), std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t), 0);
        s
    }
}

#[test]
fn a_peer_stalling_mid_frame_is_dropped() {
    let _s = serial();
    let (c, mut rc) = start(r#"(listen: Some("127.0.0.1:0"), frame_timeout_ms: 200)"#);
    let caddr = listen_addr(&c);
    // Complete frames, then silence: idle is fine.
    let (mut idle, idle_addr) = raw_peer(caddr, &mut rc);
    idle.write_all(&[0, 0, 0, 2, 1, 2]).unwrap();
    assert_eq!(rc.frames(1, WAIT), vec![(idle_addr, vec![1, 2])]);
    // Half a payload, and half a length prefix.
    let (mut body, body_addr) = raw_peer(caddr, &mut rc);
    let (mut head, head_addr) = raw_peer(caddr, &mut rc);
    let stalled_at = Instant::now();
    body.write_all(&[0, 0, 0, 10, 1, 2, 3]).unwrap();
    head.write_all(&[0, 0]).unwrap();

    let why = rc.down(body_addr);
    assert!(why.contains("middle of a frame"), "{why}");
    assert!(rc.down(head_addr).contains("middle of a frame"));
    assert!(stalled_at.elapsed() >= Duration::from_millis(150), "dropped too early");
    assert_dropped(body);
    assert_dropped(head);

    // The idle peer outlived several timeouts and still works.
    let seen = rc.quiet(Duration::from_millis(500));
    assert!(!seen.iter().any(|e| matches!(e, Ev::Down(..))), "{seen:?}");
    idle.write_all(&[0, 0, 0, 1, 9]).unwrap();
    assert_eq!(rc.frames(1, WAIT), vec![(idle_addr, vec![9])]);
    c.close().unwrap();
}

#[test]
fn a_dead_io_thread_reports_links_down_and_fails_sends() {
    for fault in [Fault::Panic, Fault::PollError] {
        let _s = serial();
        let (c, mut rc) = start(r#"(listen: Some("127.0.0.1:0"), queue_frames: 4)"#);
        let caddr = listen_addr(&c);
        // One peer whose sender is blocked after WouldBlock, one idle.
        let (stuck, stuck_addr) = raw_peer(caddr, &mut rc);
        let (idle, idle_addr) = raw_peer(caddr, &mut rc);
        fill_until_stuck(&c, &mut rc, stuck_addr);

        c.inject_fault(fault);
        rc.down(stuck_addr);
        rc.down(idle_addr);
        // The blocked sender is woken, and learns on retry that the instance is gone.
        rc.writable();
        assert_eq!(c.send(&link(stuck_addr), b"x"), Err(SendError::Closed), "{fault:?}");
        assert_eq!(c.send(&link(idle_addr), b"x"), Err(SendError::Closed), "{fault:?}");
        let logged = rc.wait(WAIT, |e| match e {
            Ev::Log(LogLevel::Error, m) => Some(m.clone()),
            _ => None,
        });
        assert!(logged.is_some_and(|m| m.contains("injected")), "{fault:?}");
        // The sockets are closed too, and close still succeeds.
        assert_dropped(stuck);
        assert_dropped(idle);
        c.close().unwrap();
        assert_eq!(io_thread_count(), 0);
        assert_eq!(rc.quiet(Duration::from_millis(100)), Vec::new(), "{fault:?}: callbacks after close");
    }
}

#[test]
fn close_from_a_callback_silences_the_instance_at_once() {
    let _s = serial();
    let slot: Arc<Mutex<Option<Arc<TcpTransport>>>> = Arc::default();
    let hook_slot = Arc::clone(&slot);
    let (host, mut rc) = hook_host(move |tx| {
        let t = hook_slot.lock().unwrap().take();
        if let Some(t) = t {
            let _ = tx.send(Ev::ClosedInCallback(t.close().is_ok()));
        }
    });
    let c = Arc::new(open(r#"(listen: Some("127.0.0.1:0"), queue_frames: 2)"#, host).unwrap());
    let (mut g, g_addr) = raw_peer(listen_addr(&c), &mut rc);
    // A refused sender, so that dropping the connection would signal `writable`.
    fill_until_stuck(&c, &mut rc, g_addr);
    *slot.lock().unwrap() = Some(Arc::clone(&c));
    // One good frame (its delivery closes the instance), then a framing error in the same
    // read, which drops the connection right after the callback returned.
    g.write_all(&[0, 0, 0, 1, 0x42, 0xff, 0xff, 0xff, 0xff]).unwrap();
    assert_eq!(rc.frames(1, WAIT), vec![(g_addr, vec![0x42])]);
    let closed = rc.wait(WAIT, |e| match e {
        Ev::ClosedInCallback(ok) => Some(*ok),
        _ => None,
    });
    assert_eq!(closed, Some(true));
    assert_eq!(rc.quiet(Duration::from_millis(300)), Vec::new(), "callbacks after close returned");
    assert_eq!(c.send(&link(g_addr), b"x"), Err(SendError::Closed));
    // The thread was not joined from inside itself; closing from here joins it.
    c.close().unwrap();
    assert_eq!(io_thread_count(), 0);
    assert_dropped(g);
}

#[test]
fn close_from_a_callback_while_another_thread_closes() {
    let _s = serial();
    let slot: Arc<Mutex<Option<Arc<TcpTransport>>>> = Arc::default();
    let (entered_tx, entered_rx) = mpsc::channel::<()>();
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let entered_tx = Mutex::new(entered_tx);
    let go_rx = Mutex::new(go_rx);
    let hook_slot = Arc::clone(&slot);
    let (host, mut rc) = hook_host(move |tx| {
        let t = hook_slot.lock().unwrap().take();
        if let Some(t) = t {
            // Let the test start a close on its own thread, then close from here too.
            let _ = entered_tx.lock().unwrap().send(());
            let _ = go_rx.lock().unwrap().recv_timeout(WAIT);
            let _ = tx.send(Ev::ClosedInCallback(t.close().is_ok()));
        }
    });
    let c = Arc::new(open(r#"(listen: Some("127.0.0.1:0"))"#, host).unwrap());
    let (mut g, g_addr) = raw_peer(listen_addr(&c), &mut rc);
    *slot.lock().unwrap() = Some(Arc::clone(&c));
    g.write_all(&[0, 0, 0, 1, 7]).unwrap();
    entered_rx.recv_timeout(WAIT).unwrap();

    let (done_tx, done_rx) = mpsc::channel();
    let closer = Arc::clone(&c);
    std::thread::spawn(move || {
        let _ = done_tx.send(closer.close().is_ok());
    });
    // Give that close time to start joining the I/O thread, then let the callback close.
    std::thread::sleep(Duration::from_millis(100));
    go_tx.send(()).unwrap();
    assert_eq!(done_rx.recv_timeout(WAIT), Ok(true), "the two closes deadlocked");
    assert_eq!(rc.frames(1, WAIT), vec![(g_addr, vec![7])]);
    assert_eq!(
        rc.wait(WAIT, |e| match e {
            Ev::ClosedInCallback(ok) => Some(*ok),
            _ => None,
        }),
        Some(true)
    );
    assert_eq!(rc.quiet(Duration::from_millis(200)), Vec::new(), "callbacks after close returned");
    assert_eq!(io_thread_count(), 0);
    c.close().unwrap();
}
