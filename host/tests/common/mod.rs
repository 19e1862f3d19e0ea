//! Helpers shared by the tests that run `antmesh up` processes.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use antmesh_host::identity::{Identity, PeerId};

pub const ANTMESH: &str = env!("CARGO_BIN_EXE_antmesh");

/// A running `antmesh up` with its own identity, config and data directory.
pub struct Node {
    pub home: PathBuf,
    pub key: PathBuf,
    pub cfg: PathBuf,
    pub child: Child,
    pub lines: mpsc::Receiver<String>,
    pub seen: Vec<String>,
    pub id: PeerId,
}

impl Node {
    /// Creates an identity and config named `name` in `dir` and starts the node.
    pub fn start(dir: &Path, name: &str, interfaces: &str) -> Node {
        Self::start_with(dir, name, "info,antmesh_host=debug", interfaces)
    }

    /// As `start`, with a log filter.
    pub fn start_with(dir: &Path, name: &str, log: &str, interfaces: &str) -> Node {
        let key = dir.join(format!("{name}.key"));
        let out = Command::new(ANTMESH).args(["id", "new", "--identity"]).arg(&key).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let id = Identity::load(&key).unwrap().peer_id();
        let cfg = dir.join(format!("{name}.ron"));
        std::fs::write(&cfg, format!("(log: \"{log}\", interfaces: [{interfaces}])")).unwrap();
        let home = dir.join(format!("{name}-home"));
        let (child, lines) = spawn(&cfg, &key, &home);
        Node { home, key, cfg, child, lines, seen: Vec::new(), id }
    }

    /// Kills the process with SIGKILL and starts it again with the same identity, config
    /// and data directory.
    pub fn kill9_and_restart(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let (child, lines) = spawn(&self.cfg, &self.key, &self.home);
        self.child = child;
        self.lines = lines;
        self.seen.clear();
    }

    /// Waits for a line containing every needle.
    pub fn wait(&mut self, needles: &[&str]) -> String {
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

    /// Reads whatever log lines arrived so far.
    pub fn drain(&mut self) {
        while let Ok(l) = self.lines.try_recv() {
            self.seen.push(l);
        }
    }

    /// Runs `antmesh <args> --json --data-dir <home>` and parses its output.
    pub fn cli(&self, args: &[&str]) -> (bool, serde_json::Value) {
        let out = Command::new(ANTMESH).args(args).arg("--json").arg("--data-dir").arg(&self.home).output().unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{args:?}: {e}: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)));
        (out.status.success(), v)
    }

    /// SIGINT, then the exit status and the "node stopped" line.
    pub fn stop(mut self) -> String {
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

fn spawn(cfg: &Path, key: &Path, home: &Path) -> (Child, mpsc::Receiver<String>) {
    let mut child = Command::new(ANTMESH)
        .arg("up")
        .arg("--config")
        .arg(cfg)
        .arg("--identity")
        .arg(key)
        .env_remove("RUST_LOG")
        .env("ANTMESH_HOME", home)
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
    (child, lines)
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A socat pty pair, killed on drop.
pub struct PtyPair {
    pub child: Child,
    pub a: PathBuf,
    pub b: PathBuf,
}

impl PtyPair {
    /// Two linked ptys, `tty-<tag>-a` and `tty-<tag>-b`, in `dir`.
    pub fn new(dir: &Path) -> PtyPair {
        Self::named(dir, "x")
    }

    /// As `new`, with a tag for several pairs in one directory.
    pub fn named(dir: &Path, tag: &str) -> PtyPair {
        let (a, b) = (dir.join(format!("tty-{tag}-a")), dir.join(format!("tty-{tag}-b")));
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

/// A UDP port free at the time of asking.
pub fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// An interface entry for the serial plugin on `path`.
pub fn serial(name: &str, path: &Path) -> String {
    format!(r#"(name: "{name}", plugin: "serial", config: "(path: \"{}\", baud: 115200)")"#, path.display())
}
