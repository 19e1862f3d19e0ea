//! Two `antmesh up` processes exchange authenticated messages over the constrained link
//! engine: over a real socat pty pair (serial plugin) and over the pipe plugin (socat
//! children joined by a Unix socket). A node reached over serial and over QUIC shows one
//! PeerId.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use antmesh_host::identity::{Identity, PeerId};
use antmesh_host::quic::endpoint::{P2pConfig, P2pEndpoint};
use zeroize::Zeroizing;

const ANTMESH: &str = env!("CARGO_BIN_EXE_antmesh");

struct Node {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
    id: PeerId,
}

impl Node {
    fn start(dir: &Path, name: &str, interfaces: &str) -> Node {
        let key = dir.join(format!("{name}.key"));
        let out = Command::new(ANTMESH).args(["id", "new", "--identity"]).arg(&key).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let id = Identity::load(&key).unwrap().peer_id();
        let cfg = dir.join(format!("{name}.ron"));
        std::fs::write(&cfg, format!("(log: \"info,antmesh_host=debug\", interfaces: [{interfaces}])")).unwrap();
        let mut child = Command::new(ANTMESH)
            .arg("up")
            .arg("--config")
            .arg(&cfg)
            .arg("--identity")
            .arg(&key)
            .env_remove("RUST_LOG")
            .env("ANTMESH_HOME", dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Node { child, lines, seen: Vec::new(), id }
    }

    /// Waits for a line containing every needle.
    fn wait(&mut self, needles: &[&str]) -> String {
        // Generous: CI runs this beside CPU-heavy tests on two cores.
        let deadline = Instant::now() + Duration::from_secs(90);
        if let Some(l) = self.seen.iter().find(|l| needles.iter().all(|n| l.contains(n))) {
            return l.clone();
        }
        loop {
            match self.lines.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if needles.iter().all(|n| line.contains(n)) {
                        return line;
                    }
                }
                Err(_) => panic!("no log line with {needles:?}; saw:\n{}", self.seen.join("\n")),
            }
        }
    }

    /// SIGINT, then the exit status and the "node stopped" line.
    fn stop(mut self) -> String {
        // SAFETY: signalling our own child by its pid.
        assert_eq!(unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGINT) }, 0);
        let line = self.wait(&["node stopped"]);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                assert_eq!(s.code(), Some(0), "{s:?}");
                return line;
            }
            assert!(Instant::now() < deadline, "antmesh did not exit after SIGINT");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A socat pty pair, killed on drop.
struct PtyPair {
    child: Child,
    a: PathBuf,
    b: PathBuf,
}

impl PtyPair {
    fn new(dir: &Path) -> PtyPair {
        let (a, b) = (dir.join("tty-a"), dir.join("tty-b"));
        let child = Command::new("socat")
            .arg(format!("pty,raw,echo=0,link={}", a.display()))
            .arg(format!("pty,raw,echo=0,link={}", b.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("socat is required (scripts/test installs it)");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !(a.exists() && b.exists()) {
            assert!(Instant::now() < deadline, "socat made no ptys");
            std::thread::sleep(Duration::from_millis(20));
        }
        PtyPair { child, a, b }
    }
}

impl Drop for PtyPair {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn serial(path: &Path) -> String {
    format!(r#"(name: "ser", plugin: "serial", config: "(path: \"{}\", baud: 115200)")"#, path.display())
}

/// Both nodes: an authenticated session (each names the other's PeerId, from its key file)
/// and the other's node info, carried by the session.
fn assert_exchange(a: &mut Node, b: &mut Node) {
    let (ida, idb) = (a.id.to_hex(), b.id.to_hex());
    let up = a.wait(&["link session up", &idb]);
    assert!(up.contains("interface=ser") || up.contains("interface=pip"), "{up}");
    b.wait(&["link session up", &ida]);
    let agent = format!("agent=antmesh/{}", env!("CARGO_PKG_VERSION"));
    a.wait(&["node info received", &idb, &agent]);
    b.wait(&["node info received", &ida, &agent]);
}

#[test]
fn two_nodes_over_a_pty_pair_and_one_peer_id_over_serial_and_quic() {
    let dir = tempfile::tempdir().unwrap();
    let pty = PtyPair::new(dir.path());
    let port = free_udp_port();
    let udp = format!(r#"(name: "udp0", plugin: "udp", config: "(bind: \"127.0.0.1:{port}\")")"#);
    let mut a = Node::start(dir.path(), "a", &format!("{udp}, {}", serial(&pty.a)));
    let mut b = Node::start(dir.path(), "b", &serial(&pty.b));
    a.wait(&["interface up", "engine=\"constrained\""]);
    assert_exchange(&mut a, &mut b);

    // The same node over QUIC: dial A's UDP interface. Its PeerId is the one B's serial
    // session authenticated.
    a.wait(&["QUIC endpoint up"]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let quic_id = rt.block_on(async {
        let me = P2pEndpoint::new(P2pConfig::new(Arc::new(Identity::from_seed(Zeroizing::new([7; 32]))), "127.0.0.1:0".parse().unwrap()))
            .await
            .unwrap();
        let id = tokio::time::timeout(Duration::from_secs(30), me.connect_addr(format!("127.0.0.1:{port}").parse().unwrap()))
            .await
            .unwrap()
            .unwrap();
        me.shutdown().await;
        id
    });
    assert_eq!(quic_id, a.id);
    let over_serial = b.wait(&["link session up"]);
    assert!(over_serial.contains(&quic_id.to_hex()), "{over_serial}");

    let stopped = a.stop();
    assert!(stopped.contains("link_sessions=1") && stopped.contains("quic_peers=1"), "{stopped}");
    let stopped = b.stop();
    assert!(stopped.contains("link_sessions=1"), "{stopped}");
}

#[test]
fn two_nodes_over_the_pipe_plugin() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("pipe.sock");
    let pipe = |args: &str| {
        format!(r#"(name: "pip", plugin: "pipe", config: "(name: \"peer\", command: \"socat\", args: [\"-\", \"{args}\"], backoff_min_ms: 50, backoff_max_ms: 500)")"#)
    };
    let mut a = Node::start(dir.path(), "a", &pipe(&format!("UNIX-LISTEN:{}", sock.display())));
    let deadline = Instant::now() + Duration::from_secs(20);
    while !sock.exists() {
        assert!(Instant::now() < deadline, "socat never listened");
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut b = Node::start(dir.path(), "b", &pipe(&format!("UNIX-CONNECT:{}", sock.display())));
    assert_exchange(&mut a, &mut b);
    assert!(b.stop().contains("link_sessions=1"));
    drop(a);
}

#[test]
fn a_pinned_peer_id_that_does_not_match_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let pty = PtyPair::new(dir.path());
    let stranger = Identity::from_seed(Zeroizing::new([5; 32])).peer_id();
    let pinned = format!(
        r#"(name: "ser", plugin: "serial", config: "(path: \"{}\", baud: 115200)", link: (dial: Some(true), peer: Some("{stranger}")))"#,
        pty.a.display()
    );
    let mut a = Node::start(dir.path(), "a", &pinned);
    let b = Node::start(dir.path(), "b", &format!(r#"(name: "ser", plugin: "serial", config: "(path: \"{}\", baud: 115200)", link: (dial: Some(false)))"#, pty.b.display()));
    let failed = a.wait(&["link handshake failed", "expected peer"]);
    assert!(failed.contains(&stranger.to_hex()) && failed.contains(&b.id.to_hex()), "{failed}");
    assert!(!a.seen.iter().any(|l| l.contains("link session up")), "{:?}", a.seen);
    drop(b);
}
