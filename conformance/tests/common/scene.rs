//! The stage of the hostile-peer suite (`tests/hostile.rs`) and its benchmark
//! (`benches/hostile.rs`): real `antmesh up` processes, an honest peer that keeps probing
//! and messaging the victim, samples of the victim's memory and CPU, the attacker as a
//! separate `antmesh-hostile` process, and network namespaces for spoofed sources.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{BufRead, BufReader};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use antmesh_host::identity::{Identity, PeerId};
use antmesh_host::mesh::dest::DestinationHash;
use serde_json::{json, Value};

/// How long a stage waits for anything.
pub const T: Duration = Duration::from_secs(60);

/// A binary of this workspace's build (beside the plugins).
pub fn bin(name: &str) -> PathBuf {
    let p = antmesh_host::plugin::default_plugin_dir().expect("test executable has a parent directory").join(name);
    assert!(p.is_file(), "{} missing: run `cargo build --workspace` first", p.display());
    p
}

/// A port free on `ip` at the time of asking (UDP and TCP alike).
pub fn free_port(ip: IpAddr) -> u16 {
    loop {
        let port = std::net::UdpSocket::bind((ip, 0)).unwrap().local_addr().unwrap().port();
        if std::net::TcpListener::bind((ip, port)).is_ok() {
            return port;
        }
    }
}

/// A running `antmesh up`: its identity, data directory, config and log.
pub struct Node {
    pub name: String,
    pub home: PathBuf,
    pub cfg: PathBuf,
    pub key: PathBuf,
    pub id: PeerId,
    pub netns: Option<String>,
    child: Child,
    log: Arc<Mutex<Vec<String>>>,
}

impl Node {
    /// Makes an identity and a config (`body`: the fields inside the config's parentheses)
    /// named `name` in `dir`, and starts the node (in `netns`, if given).
    pub fn start(dir: &Path, name: &str, body: &str, netns: Option<&str>) -> Node {
        Self::start_logged(dir, name, "info", body, netns)
    }

    /// As `start`, with a log filter.
    pub fn start_logged(dir: &Path, name: &str, log: &str, body: &str, netns: Option<&str>) -> Node {
        let key = dir.join(format!("{name}.key"));
        let id = Identity::generate().unwrap();
        id.save(&key, true).unwrap();
        let home = dir.join(format!("{name}-home"));
        let cfg = dir.join(format!("{name}.ron"));
        std::fs::write(&cfg, format!("(log: {log:?}, data_dir: Some({:?}), {body})", home)).unwrap();
        let netns = netns.map(str::to_owned);
        let log = Arc::new(Mutex::new(Vec::new()));
        let child = spawn_node(&cfg, &key, netns.as_deref(), &log);
        let n = Node { name: name.to_owned(), home, cfg, key, id: id.peer_id(), netns, child, log };
        n.wait_line(&["node up"], Duration::from_secs(60));
        n
    }

    /// Kills the process with SIGKILL and starts it again (same identity, config, data).
    pub fn kill9_and_restart(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.log.lock().unwrap().clear();
        self.child = spawn_node(&self.cfg, &self.key, self.netns.as_deref(), &self.log);
        self.wait_line(&["node up"], Duration::from_secs(60));
    }
}

/// Starts `antmesh up` with `cfg` and `key` (in `netns`), its stderr lines into `log`.
fn spawn_node(cfg: &Path, key: &Path, netns: Option<&str>, log: &Arc<Mutex<Vec<String>>>) -> Child {
    let mut cmd = match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns]).arg(bin("antmesh"));
            c
        }
        None => Command::new(bin("antmesh")),
    };
    let mut child = cmd
        .arg("up")
        .arg("--config")
        .arg(cfg)
        .arg("--identity")
        .arg(key)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let log = Arc::clone(log);
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            log.lock().unwrap().push(line);
        }
    });
    child
}

impl Node {
    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for a log line containing every needle; panics with the log on timeout.
    pub fn wait_line(&self, needles: &[&str], timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(l) = self.log.lock().unwrap().iter().find(|l| needles.iter().all(|n| l.contains(n))) {
                return l.clone();
            }
            if Instant::now() > deadline {
                panic!("{}: no log line with {needles:?}; log:\n{}", self.name, self.log.lock().unwrap().join("\n"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Log lines containing `needle`.
    pub fn lines_with(&self, needle: &str) -> Vec<String> {
        self.log.lock().unwrap().iter().filter(|l| l.contains(needle)).cloned().collect()
    }

    /// The whole log so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// The node's control socket.
    pub fn control(&self) -> PathBuf {
        self.home.join(antmesh_host::daemon::control::SOCKET_NAME)
    }

    /// One control request and its reply (`{"ok": false, …}` when the socket fails).
    pub fn request(&self, req: Value, timeout: Duration) -> Value {
        control(&self.control(), req, timeout)
    }

    /// The node's destination, hex.
    pub fn node_dest(&self) -> String {
        DestinationHash::node(&self.id).to_hex()
    }

    /// `status` counters.
    pub fn counters(&self) -> Value {
        self.request(json!({"cmd": "status"}), Duration::from_secs(10))["counters"].clone()
    }

    /// Resident memory now, KiB.
    pub fn rss_kib(&self) -> u64 {
        rss_kib(self.pid())
    }

    /// CPU time used so far (user + system), seconds.
    pub fn cpu_secs(&self) -> f64 {
        cpu_secs(self.pid())
    }

    /// SIGINT, then the exit status.
    pub fn stop(mut self) -> std::process::ExitStatus {
        // SAFETY: signalling our own child by its pid.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGINT) };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(Instant::now() < deadline, "{} did not exit after SIGINT", self.name);
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

/// One control request over `socket`.
pub fn control(socket: &Path, req: Value, timeout: Duration) -> Value {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    match rt.block_on(antmesh_host::daemon::control::request(socket, &req, timeout)) {
        Ok(v) => v,
        Err(e) => json!({"ok": false, "error": e.to_string()}),
    }
}

pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)).and_then(|v| v.parse().ok()))
        .unwrap_or(0)
}

pub fn cpu_secs(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return 0.0 };
    // Fields after the command name (which may hold spaces) in parentheses.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0) + f.get(12).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // SAFETY: sysconf has no preconditions.
    ticks / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

pub fn lo(last: u8) -> IpAddr {
    IpAddr::from([127, 0, 0, last])
}

pub fn udp_iface(name: &str, ip: IpAddr, port: u16, connect: &str) -> String {
    format!(r#"(name: "{name}", plugin: "udp", config: "(bind: \"{ip}:{port}\")", connect: [{connect}])"#)
}

pub fn pinned(ip: IpAddr, port: u16, peer: &Node) -> String {
    format!(r#"(addr: "udp://{ip}:{port}", peer: "{}")"#, peer.id.to_hex())
}

/// Waits until `from` has a path to `to`'s node destination.
pub fn wait_path(from: &Node, to: &Node) {
    let deadline = Instant::now() + T;
    let dest = to.node_dest();
    loop {
        let v = from.request(json!({"cmd": "paths"}), Duration::from_secs(10));
        if v["paths"].as_array().is_some_and(|ps| ps.iter().any(|p| p["dest"] == dest.as_str())) {
            return;
        }
        assert!(Instant::now() < deadline, "{} never learnt a path to {}:\n{}", from.name, to.name, from.log());
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Victim A (UDP on 127.0.0.1, TCP too if `tcp`) and honest B (127.0.0.2, dialling A).
pub struct Stage {
    pub dir: tempfile::TempDir,
    pub a: Node,
    pub b: Node,
    pub a_udp: u16,
    pub a_tcp: Option<u16>,
}

pub fn stage(tcp: bool, a_extra: &str) -> Stage {
    stage_logged(tcp, a_extra, "info")
}

/// As [`stage`], with A's log filter.
pub fn stage_logged(tcp: bool, a_extra: &str, a_log: &str) -> Stage {
    let dir = tempfile::tempdir().unwrap();
    let a_udp = free_port(lo(1));
    let a_tcp = tcp.then(|| free_port(lo(1)));
    let mut ifaces = udp_iface("udp0", lo(1), a_udp, "");
    if let Some(pt) = a_tcp {
        ifaces.push_str(&format!(r#", (name: "tcp0", plugin: "tcp", config: "(listen: Some(\"127.0.0.1:{pt}\"))"{a_extra})"#));
    }
    let a = Node::start_logged(dir.path(), "a", a_log, &format!("interfaces: [{ifaces}]"), None);
    let b = Node::start(dir.path(), "b", &format!("interfaces: [{}]", udp_iface("udp0", lo(2), free_port(lo(2)), &pinned(lo(1), a_udp, &a))), None);
    wait_path(&b, &a);
    Stage { dir, a, b, a_udp, a_tcp }
}

/// Victim A on 10.77.1.1:4242 inside `ns.victim`, honest B on 10.77.1.3 in
/// `ns.outside` (the side the spoofed traffic comes from), B dialling A.
pub fn spoofed_stage(ns: &Netns) -> Stage {
    let dir = tempfile::tempdir().unwrap();
    let a_ip: IpAddr = "10.77.1.1".parse().unwrap();
    let a = Node::start(dir.path(), "a", &format!("interfaces: [{}]", udp_iface("udp0", a_ip, 4242, "")), Some(&ns.victim));
    let b = Node::start(
        dir.path(),
        "b",
        &format!("interfaces: [{}]", udp_iface("udp0", "10.77.1.3".parse().unwrap(), 4242, &pinned(a_ip, 4242, &a))),
        Some(&ns.outside),
    );
    wait_path(&b, &a);
    Stage { dir, a, b, a_udp: 4242, a_tcp: None }
}

pub struct Outcome {
    pub honest: Honest,
    pub rss0: u64,
    pub max_rss: u64,
    /// RSS samples during the attack, KiB.
    pub rss: Vec<u64>,
    pub report: Value,
    pub cpu: f64,
    pub secs: f64,
}

/// Runs `during` (the attack) while B uses A; returns what B saw and what A used.
pub fn under_attack(s: &Stage, during: impl FnOnce() -> Value) -> Outcome {
    under_attack_every(s, Duration::from_millis(200), during)
}

/// As [`under_attack`], with the honest peer probing every `every`.
pub fn under_attack_every(s: &Stage, every: Duration, during: impl FnOnce() -> Value) -> Outcome {
    // Warm: the end-to-end link and the paths are up before the attack.
    let v = s.b.request(json!({"cmd": "send", "dest": s.a.node_dest(), "data": "warm-up", "timeout_s": 30}), T);
    assert_eq!(v["ok"], true, "{v}");
    let (rss0, cpu0) = (s.a.rss_kib(), s.a.cpu_secs());
    let stop = Arc::new(AtomicBool::new(false));
    let load = honest_load(s.b.control(), s.a.node_dest(), "attack".into(), every, Arc::clone(&stop));
    let sampler = sample_rss(s.a.pid(), Duration::from_millis(100), Arc::clone(&stop));
    let t = Instant::now();
    let report = during();
    let secs = t.elapsed().as_secs_f64();
    let cpu = s.a.cpu_secs() - cpu0;
    // The honest peer goes on a little after the attack: the node recovers.
    std::thread::sleep(Duration::from_secs(2));
    stop.store(true, Ordering::Release);
    let honest = load.join().unwrap();
    let (max_rss, rss) = sampler.join().unwrap();
    Outcome { honest, rss0, max_rss, rss, report, cpu, secs }
}

/// What the honest peer saw while it kept using the victim.
#[derive(Debug, Default, Clone)]
pub struct Honest {
    /// Round trips of probes that were answered, ms.
    pub rtts: Vec<f64>,
    /// Probes that failed, with the reply.
    pub probe_failures: Vec<String>,
    /// End-to-end messages the sender's node accepted (their texts).
    pub sent: Vec<String>,
    /// Messages the sender's node refused, with the reply.
    pub send_failures: Vec<String>,
}

impl Honest {
    /// The p-th percentile of the round trips (0–100), ms.
    pub fn percentile(&self, p: f64) -> f64 {
        percentile(&self.rtts, p)
    }
}

pub fn percentile(xs: &[f64], p: f64) -> f64 {
    if xs.is_empty() {
        return f64::NAN;
    }
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    let i = ((p / 100.0) * (v.len() - 1) as f64).round() as usize;
    v[i.min(v.len() - 1)]
}

/// The honest peer at work: from the node whose control socket is `from`, a probe of
/// `dest` every `every`, and an end-to-end message every tenth, until `stop`.
pub fn honest_load(from: PathBuf, dest: String, tag: String, every: Duration, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<Honest> {
    std::thread::spawn(move || {
        let mut h = Honest::default();
        let mut n = 0u64;
        while !stop.load(Ordering::Acquire) {
            let t = Instant::now();
            let v = control(&from, json!({"cmd": "probe", "dest": dest, "timeout_s": 5}), Duration::from_secs(10));
            match v["rtt_ms"].as_f64() {
                Some(rtt) if v["ok"] == true => h.rtts.push(rtt),
                _ => h.probe_failures.push(v.to_string()),
            }
            if n.is_multiple_of(10) {
                let text = format!("honest-{tag}-{n}");
                let v = control(&from, json!({"cmd": "send", "dest": dest, "data": text, "timeout_s": 20}), Duration::from_secs(30));
                if v["ok"] == true {
                    h.sent.push(text);
                } else {
                    h.send_failures.push(v.to_string());
                }
            }
            n += 1;
            std::thread::sleep(every.saturating_sub(t.elapsed()));
        }
        h
    })
}

/// The victim's resident memory and CPU, sampled until `stop`: (max RSS KiB, samples).
pub fn sample_rss(pid: u32, every: Duration, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<(u64, Vec<u64>)> {
    std::thread::spawn(move || {
        let mut all = Vec::new();
        while !stop.load(Ordering::Acquire) {
            all.push(rss_kib(pid));
            std::thread::sleep(every);
        }
        (all.iter().copied().max().unwrap_or(0), all)
    })
}

/// Runs `antmesh-hostile <args>` to its end (in `netns`, if given) and returns its report.
pub fn attack(args: &[&str], netns: Option<&str>) -> Value {
    let mut cmd = match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns]).arg(bin("antmesh-hostile"));
            c
        }
        None => Command::new(bin("antmesh-hostile")),
    };
    let out = cmd.args(args).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "antmesh-hostile {args:?} failed: {}{}", text, String::from_utf8_lossy(&out.stderr));
    serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("antmesh-hostile printed no report ({e}): {text}"))
}

/// Whether this process may make network namespaces and raw sockets.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("ip (iproute2) is required");
    assert!(out.status.success(), "ip {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// Two network namespaces on one veth: `victim` (10.77.1.1/24) and `outside` (10.77.1.2
/// and 10.77.1.3 /24, the attacker and honest peers). The victim's default route is via
/// 10.77.1.2, so that it answers spoofed sources from elsewhere in 10.77.0.0/16 through a
/// gateway (where the answers die), and reverse-path filtering is off; deleted on drop.
pub struct Netns {
    pub victim: String,
    pub outside: String,
}

impl Netns {
    pub fn new(tag: &str) -> Netns {
        let id = std::process::id() % 100_000;
        let n = Netns { victim: format!("amv{tag}{id}"), outside: format!("amo{tag}{id}") };
        let (va, vb) = (format!("va{tag}{id}"), format!("vb{tag}{id}"));
        // Interface names are limited to 15 bytes.
        let (va, vb) = (va[..va.len().min(15)].to_owned(), vb[..vb.len().min(15)].to_owned());
        ip(&["netns", "add", &n.victim]);
        ip(&["netns", "add", &n.outside]);
        ip(&["link", "add", &va, "type", "veth", "peer", "name", &vb]);
        ip(&["link", "set", &va, "netns", &n.victim]);
        ip(&["link", "set", &vb, "netns", &n.outside]);
        for (ns, dev, addrs) in [(&n.victim, &va, vec!["10.77.1.1/24"]), (&n.outside, &vb, vec!["10.77.1.2/24", "10.77.1.3/24"])] {
            for a in addrs {
                ip(&["-n", ns, "addr", "add", a, "dev", dev]);
            }
            ip(&["-n", ns, "link", "set", dev, "up"]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        ip(&["-n", &n.victim, "route", "add", "default", "via", "10.77.1.2"]);
        for key in ["net.ipv4.conf.all.rp_filter=0", &format!("net.ipv4.conf.{va}.rp_filter=0")] {
            let _ = Command::new("ip").args(["netns", "exec", &n.victim, "sysctl", "-qw", key]).status();
        }
        n
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.victim]).status();
        let _ = Command::new("ip").args(["netns", "del", &self.outside]).status();
    }
}
