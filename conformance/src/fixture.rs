//! Fixtures: how the suite makes instances and connected pairs for each transport.
//!
//! | fixture | plugin | pair |
//! |---|---|---|
//! | `udp-loopback` | udp | two sockets on 127.0.0.1; B on 0.0.0.0 so A's broadcast to 127.255.255.255 reaches it |
//! | `tcp-loopback` | tcp | A listens on 127.0.0.1, B dials it |
//! | `pipe` | pipe | each instance runs `socat - UNIX-CONNECT:…`; the runner's [`Cable`] joins the two sockets |
//! | `serial-pty` | serial | each instance opens one end of a socat pty pair; the runner's [`Cable`] joins the other ends |
//!
//! Every pair can have garbage injected towards A, which is what makes the garbage check
//! possible for every transport.

use std::any::Any;
use std::io::Write;
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use antmesh_host::plugin::LoadedPlugin;
use antmesh_host::transport::Transport;
use antmesh_plugin_api::abi_stable::std_types::RString;
use antmesh_plugin_api::{LinkAddr, TransportAddr};

use crate::cable::{Cable, Side};
use crate::harness::{Endpoint, Ev};

/// The fixtures this runner knows: (name, plugin scheme it drives, description).
pub const FIXTURES: &[(&str, &str, &str)] = &[
    ("udp-loopback", "udp", "two UDP sockets on loopback, broadcast via 127.255.255.255"),
    ("tcp-loopback", "tcp", "a TCP listener and a dialler on loopback"),
    ("pipe", "pipe", "two socat children joined by the runner's relay"),
    ("serial-pty", "serial", "two socat pty pairs joined by the runner's relay"),
];

/// Why a fixture could not set up.
#[derive(thiserror::Error, Debug)]
#[non_exhaustive]
pub enum FixtureError {
    /// No fixture by that name.
    #[error("unknown fixture `{0}` (known: udp-loopback, tcp-loopback, pipe, serial-pty)")]
    Unknown(String),
    /// A helper program or resource is missing.
    #[error("fixture setup: {0}")]
    Setup(String),
    /// The plugin did not open an instance the fixture needs.
    #[error("opening instance {which}: {error}")]
    Open {
        /// a or b.
        which: &'static str,
        /// The error.
        error: String,
    },
    /// The pair did not come up.
    #[error("pair did not connect: {0}")]
    NotConnected(String),
}

fn setup<E: std::fmt::Display>(what: &str) -> impl Fn(E) -> FixtureError + '_ {
    move |e| FixtureError::Setup(format!("{what}: {e}"))
}

/// Writes garbage towards instance A.
type Injector = Box<dyn Fn(&[u8]) -> Result<(), String> + Send + Sync>;

/// A connected pair of instances.
pub struct Pair {
    /// Instance A.
    pub a: Endpoint,
    /// Instance B (taken by the vanish check).
    pub b: Option<Endpoint>,
    /// B's address as A sends to it.
    pub a_to_b: LinkAddr,
    /// A's address as B sends to it.
    pub b_to_a: LinkAddr,
    injector: Injector,
    // Fields drop in order: endpoints first (declared above), then helpers.
    _keep: Vec<Box<dyn Any + Send>>,
}

impl Pair {
    /// Delivers `bytes` to A as if its peer had sent them (framing included or not —
    /// it is garbage).
    pub fn inject_garbage(&self, bytes: &[u8]) -> Result<(), String> {
        (self.injector)(bytes)
    }
}

/// A way of making instances of one transport.
pub trait Fixture {
    /// The fixture's name.
    fn name(&self) -> &'static str;
    /// A config for a single instance that needs no peer.
    fn single_config(&mut self) -> Result<String, FixtureError>;
    /// Opens a connected pair.
    fn open_pair(&mut self, plugin: &LoadedPlugin) -> Result<Pair, FixtureError>;
}

/// Makes the fixture called `name`.
pub fn make(name: &str) -> Result<Box<dyn Fixture>, FixtureError> {
    match name {
        "udp-loopback" => Ok(Box::new(UdpLoopback)),
        "tcp-loopback" => Ok(Box::new(TcpLoopback)),
        "pipe" => Ok(Box::new(PipeFixture::new()?)),
        "serial-pty" => Ok(Box::new(SerialPty::new()?)),
        other => Err(FixtureError::Unknown(other.to_owned())),
    }
}

fn open(plugin: &LoadedPlugin, which: &'static str, config: &str) -> Result<Endpoint, FixtureError> {
    Endpoint::open(plugin, which, config).map_err(|e| FixtureError::Open { which, error: e.to_string() })
}

fn first_socket_addr(e: &Endpoint, which: &'static str) -> Result<SocketAddr, FixtureError> {
    e.transport
        .local_addresses()
        .into_iter()
        .find_map(|a| match a {
            TransportAddr::Udp(sa) | TransportAddr::Tcp(sa) => Some(sa),
            _ => None,
        })
        .ok_or_else(|| FixtureError::Open { which, error: "instance reports no IP address".into() })
}

fn wait_up(e: &Endpoint, timeout: Duration, which: &str) -> Result<LinkAddr, FixtureError> {
    match e.events.take(timeout, |ev| matches!(ev, Ev::Up(_))) {
        Some(Ev::Up(p)) => Ok(p),
        _ => Err(FixtureError::NotConnected(format!("no link_up on {which} within {timeout:?}"))),
    }
}

struct UdpLoopback;

impl Fixture for UdpLoopback {
    fn name(&self) -> &'static str {
        "udp-loopback"
    }

    fn single_config(&mut self) -> Result<String, FixtureError> {
        Ok(r#"(bind: "127.0.0.1:0")"#.to_owned())
    }

    fn open_pair(&mut self, plugin: &LoadedPlugin) -> Result<Pair, FixtureError> {
        let b = open(plugin, "b", r#"(bind: "0.0.0.0:0")"#)?;
        let pb = first_socket_addr(&b, "b")?.port();
        let a = open(plugin, "a", &format!(r#"(bind: "127.0.0.1:0", broadcast: Some("127.255.255.255:{pb}"))"#))?;
        let a_addr = first_socket_addr(&a, "a")?;
        let garbage_sock = UdpSocket::bind("127.0.0.1:0").map_err(setup("garbage socket"))?;
        Ok(Pair {
            a,
            b: Some(b),
            a_to_b: LinkAddr::from(SocketAddr::from(([127, 0, 0, 1], pb))),
            b_to_a: LinkAddr::from(a_addr),
            injector: Box::new(move |bytes| {
                // Datagrams of assorted sizes, including ones over any sane MTU.
                let mut rest = bytes;
                let mut size = 1usize;
                while !rest.is_empty() {
                    let n = size.min(rest.len());
                    garbage_sock.send_to(&rest[..n], a_addr).map_err(|e| e.to_string())?;
                    rest = &rest[n..];
                    size = (size * 3 + 7) % 9000 + 1;
                }
                garbage_sock.send_to(&[], a_addr).map_err(|e| e.to_string())?;
                Ok(())
            }),
            _keep: Vec::new(),
        })
    }
}

struct TcpLoopback;

impl Fixture for TcpLoopback {
    fn name(&self) -> &'static str {
        "tcp-loopback"
    }

    fn single_config(&mut self) -> Result<String, FixtureError> {
        Ok(r#"(listen: Some("127.0.0.1:0"))"#.to_owned())
    }

    fn open_pair(&mut self, plugin: &LoadedPlugin) -> Result<Pair, FixtureError> {
        let a = open(plugin, "a", r#"(listen: Some("127.0.0.1:0"))"#)?;
        let a_addr = first_socket_addr(&a, "a")?;
        let b = open(
            plugin,
            "b",
            &format!(r#"(listen: None, connect: ["{a_addr}"], backoff_min_ms: 50, backoff_max_ms: 500)"#),
        )?;
        let b_up = wait_up(&b, Duration::from_secs(10), "b")?;
        let a_to_b = wait_up(&a, Duration::from_secs(10), "a")?;
        if b_up.socket_addr() != Some(a_addr) {
            return Err(FixtureError::NotConnected(format!("b reported link_up for {b_up}, expected {a_addr}")));
        }
        Ok(Pair {
            a,
            b: Some(b),
            a_to_b,
            b_to_a: LinkAddr::from(a_addr),
            injector: Box::new(move |bytes| {
                // One connection of raw garbage, one announcing an absurd frame length. The
                // instance may rightly hang up mid-write: that is not a fixture failure.
                let hung_up = |e: std::io::Error| match e.kind() {
                    std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset => Ok(()),
                    _ => Err(e.to_string()),
                };
                let mut s = TcpStream::connect(a_addr).map_err(|e| e.to_string())?;
                s.write_all(bytes).or_else(hung_up)?;
                let mut s2 = TcpStream::connect(a_addr).map_err(|e| e.to_string())?;
                s2.write_all(&[0xFF, 0xFF, 0xFF, 0xF0, 1, 2, 3]).or_else(hung_up)?;
                std::thread::sleep(Duration::from_millis(200));
                Ok(())
            }),
            _keep: Vec::new(),
        })
    }
}

fn require_program(name: &str) -> Result<(), FixtureError> {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(name).is_file()))
        .unwrap_or(false);
    if found {
        Ok(())
    } else {
        Err(FixtureError::Setup(format!("`{name}` is not installed (apt-get install {name})")))
    }
}

fn ron_str(s: &str) -> String {
    format!("{s:?}")
}

struct PipeFixture {
    dir: tempfile::TempDir,
}

impl PipeFixture {
    fn new() -> Result<Self, FixtureError> {
        require_program("socat")?;
        Ok(PipeFixture { dir: tempfile::tempdir().map_err(setup("temp dir"))? })
    }

    fn config(name: &str, sock: &Path) -> String {
        format!(
            "(name: {}, command: \"socat\", args: [\"-\", {}], backoff_min_ms: 50, backoff_max_ms: 500)",
            ron_str(name),
            ron_str(&format!("UNIX-CONNECT:{}", sock.display()))
        )
    }
}

impl Fixture for PipeFixture {
    fn name(&self) -> &'static str {
        "pipe"
    }

    fn single_config(&mut self) -> Result<String, FixtureError> {
        Ok(r#"(name: "solo", command: "cat")"#.to_owned())
    }

    fn open_pair(&mut self, plugin: &LoadedPlugin) -> Result<Pair, FixtureError> {
        let sub = tempfile::tempdir_in(self.dir.path()).map_err(setup("temp dir"))?;
        let (sa, sb) = (sub.path().join("a.sock"), sub.path().join("b.sock"));
        let cable = std::sync::Arc::new(Cable::unix(&sa, &sb).map_err(setup("relay sockets"))?);
        let a = open(plugin, "a", &Self::config("to-b", &sa))?;
        let b = open(plugin, "b", &Self::config("to-a", &sb))?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while !cable.connected() {
            if Instant::now() > deadline {
                return Err(FixtureError::NotConnected("the socat children never reached the relay".into()));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        wait_up(&a, Duration::from_secs(5), "a")?;
        wait_up(&b, Duration::from_secs(5), "b")?;
        let inject = std::sync::Arc::clone(&cable);
        Ok(Pair {
            a,
            b: Some(b),
            a_to_b: LinkAddr::Named(RString::from("to-b")),
            b_to_a: LinkAddr::Named(RString::from("to-a")),
            injector: Box::new(move |bytes| inject.inject(Side::A, bytes).map_err(|e| e.to_string())),
            _keep: vec![Box::new(cable), Box::new(sub)],
        })
    }
}

/// A socat process holding a pty pair, killed on drop.
struct PtyPair {
    child: Child,
    ends: (PathBuf, PathBuf),
}

impl PtyPair {
    fn new(dir: &Path, a: &str, b: &str) -> Result<PtyPair, FixtureError> {
        let ends = (dir.join(a), dir.join(b));
        let child = Command::new("socat")
            .arg(format!("pty,raw,echo=0,link={}", ends.0.display()))
            .arg(format!("pty,raw,echo=0,link={}", ends.1.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(setup("spawn socat"))?;
        let mut pair = PtyPair { child, ends };
        let deadline = Instant::now() + Duration::from_secs(5);
        while !(pair.ends.0.exists() && pair.ends.1.exists()) {
            if Instant::now() > deadline {
                let _ = pair.child.kill();
                return Err(FixtureError::Setup("socat did not create the pty pair".into()));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(pair)
    }
}

impl Drop for PtyPair {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct SerialPty {
    dir: tempfile::TempDir,
    single: Option<PtyPair>,
}

impl SerialPty {
    fn new() -> Result<Self, FixtureError> {
        require_program("socat")?;
        Ok(SerialPty { dir: tempfile::tempdir().map_err(setup("temp dir"))?, single: None })
    }

    fn config(path: &Path) -> String {
        format!("(path: {}, baud: 115200, keepalive_ms: Some(200), dead_after_ms: 1000)", ron_str(&path.display().to_string()))
    }
}

impl Fixture for SerialPty {
    fn name(&self) -> &'static str {
        "serial-pty"
    }

    fn single_config(&mut self) -> Result<String, FixtureError> {
        if self.single.is_none() {
            self.single = Some(PtyPair::new(self.dir.path(), "solo", "solo-far")?);
        }
        let path = self.dir.path().join("solo");
        Ok(format!("(path: {}, baud: 115200, keepalive_ms: None)", ron_str(&path.display().to_string())))
    }

    fn open_pair(&mut self, plugin: &LoadedPlugin) -> Result<Pair, FixtureError> {
        let sub = tempfile::tempdir_in(self.dir.path()).map_err(setup("temp dir"))?;
        let pa = PtyPair::new(sub.path(), "a", "a-tap")?;
        let pb = PtyPair::new(sub.path(), "b", "b-tap")?;
        let cable = std::sync::Arc::new(Cable::pty(&pa.ends.1, &pb.ends.1).map_err(setup("open pty taps"))?);
        let a = open(plugin, "a", &Self::config(&pa.ends.0))?;
        let b = open(plugin, "b", &Self::config(&pb.ends.0))?;
        wait_up(&a, Duration::from_secs(5), "a")?;
        wait_up(&b, Duration::from_secs(5), "b")?;
        let named = |p: &Path| {
            let addr = TransportAddr::Serial(antmesh_plugin_api::addr::DevicePath {
                path: p.display().to_string(),
                params: Vec::new(),
            });
            addr.to_link()
        };
        let inject = std::sync::Arc::clone(&cable);
        Ok(Pair {
            a_to_b: named(&pa.ends.0),
            b_to_a: named(&pb.ends.0),
            a,
            b: Some(b),
            injector: Box::new(move |bytes| inject.inject(Side::A, bytes).map_err(|e| e.to_string())),
            // The cable must stop before socat goes, and socat before the directory.
            _keep: vec![Box::new(cable), Box::new(pa), Box::new(pb), Box::new(sub)],
        })
    }
}
