//! antmesh's post-quantum QUIC (`antmesh_host::quic::endpoint::P2pEndpoint`, ML-KEM-768 +
//! ML-DSA-65 raw public keys, the UDP plugin as socket) against ant-quic 0.27's
//! `P2pEndpoint`, on 127.0.0.1:
//!
//! 1. antmesh dials ant-quic: both ends report the other's PeerId;
//! 2. ant-quic dials antmesh: the same;
//! 3. messages both ways (`send` = one unidirectional stream, raw bytes, finished) over a
//!    connection dialled by either side.
//!
//! Every PeerId is checked against SHA-256("AUTONOMI_PEER_ID_V2:" ‖ ML-DSA-65 public key)
//! computed here, not taken from either stack. ant-quic runs with mDNS, router port mapping,
//! relaying and the on-disk bootstrap cache off, so nothing leaves the loopback interface.
//! `RUST_LOG=debug` shows both stacks' logs.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use ant_quic::{BootstrapCacheConfig, NatConfig, PortMappingConfig};
use antmesh_host::identity::{Identity, PeerId};
use antmesh_host::quic::endpoint::{ConnectError, P2pConfig, P2pEndpoint};
use antmesh_plugin_api::TransportAddr;
use antmesh_interop_ant_quic::{peer_id_of, plugin_dir};
use tokio::time::timeout;
use zeroize::Zeroizing;

const T: Duration = Duration::from_secs(30);
const LOOPBACK: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0);

fn init_logs() {
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
    }
}

/// One test at a time: the handshakes are CPU-heavy (ML-DSA, ML-KEM) and timing-sensitive
/// machines have 2 cores.
async fn serial() -> tokio::sync::MutexGuard<'static, ()> {
    static LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    LOCK.lock().await
}

struct Antmesh {
    node: P2pEndpoint,
    /// PeerId computed from the identity's public key bytes, not by antmesh.
    id: [u8; 32],
}

async fn antmesh(seed: u8) -> Antmesh {
    let dir = plugin_dir().unwrap_or_else(|e| panic!("{e}"));
    let identity = Arc::new(Identity::from_seed(Zeroizing::new([seed; 32])));
    let id = peer_id_of(identity.public().as_bytes()).unwrap();
    assert_eq!(identity.peer_id().0, id, "antmesh derives PeerIds as specified");
    let mut cfg = P2pConfig::new(identity, LOOPBACK);
    cfg.plugin_dir = Some(dir);
    let node = P2pEndpoint::new(cfg).await.expect("antmesh endpoint with the udp plugin");
    Antmesh { node, id }
}

struct AntQuic {
    node: Arc<ant_quic::P2pEndpoint>,
    /// PeerId computed from the node's ML-DSA-65 public key bytes, not by ant-quic.
    id: [u8; 32],
}

async fn ant_quic_node() -> AntQuic {
    let (public, secret) = ant_quic::generate_ml_dsa_keypair().expect("ML-DSA-65 key pair");
    let id = peer_id_of(public.as_bytes()).unwrap();
    let nat = NatConfig {
        port_mapping: PortMappingConfig { enabled: false, ..PortMappingConfig::default() },
        enable_relay_fallback: false,
        enable_relay_service: false,
        ..NatConfig::default()
    };
    let cache = BootstrapCacheConfig { persist: false, ..BootstrapCacheConfig::default() };
    let config = ant_quic::P2pConfig::builder()
        .bind_addr(LOOPBACK)
        .nat(nat)
        .mdns_enabled(false)
        .bootstrap_cache(cache)
        .keypair(public, secret)
        .build()
        .expect("ant-quic config");
    let node = Arc::new(ant_quic::P2pEndpoint::new(config).await.expect("ant-quic endpoint"));
    assert_eq!(node.public_key_bytes().len(), 1952);
    assert_eq!(peer_id_of(node.public_key_bytes()).unwrap(), id);
    assert_eq!(node.peer_id().0, id, "ant-quic derives PeerIds as specified");
    AntQuic { node, id }
}

fn ant_addr(a: &AntQuic) -> SocketAddr {
    let addr = a.node.local_addr().expect("ant-quic bound");
    if addr.ip().is_unspecified() {
        SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), addr.port())
    } else {
        addr
    }
}

/// antmesh dials; returns once both ends have the connection.
async fn antmesh_dials(am: &Antmesh, aq: &AntQuic) {
    let node = Arc::clone(&aq.node);
    let accepted = tokio::spawn(async move { timeout(T, node.accept()).await });
    let got = timeout(T, am.node.connect_addr(ant_addr(aq)))
        .await
        .expect("antmesh dial timed out")
        .unwrap_or_else(|e| panic!("antmesh could not dial ant-quic: {e}"));
    assert_eq!(got.0, aq.id, "antmesh's connect_addr returns ant-quic's PeerId");
    let conn = accepted
        .await
        .unwrap()
        .expect("ant-quic accept timed out")
        .expect("ant-quic accept returned None");
    assert_eq!(conn.peer_id.0, am.id, "ant-quic reports antmesh's PeerId");
    assert!(conn.authenticated, "ant-quic marks the antmesh peer authenticated");
    assert!(aq.node.is_connected(&ant_quic::PeerId(am.id)).await);
    assert_eq!(am.node.connected_peers(), vec![PeerId(aq.id)]);
}

/// ant-quic dials; returns once both ends have the connection.
async fn ant_quic_dials(am: &Antmesh, aq: &AntQuic) {
    let addr = am.node.local_addr().expect("antmesh bound");
    let conn = timeout(T, aq.node.connect_addr(addr))
        .await
        .expect("ant-quic dial timed out")
        .unwrap_or_else(|e| panic!("ant-quic could not dial antmesh: {e}"));
    assert_eq!(conn.peer_id.0, am.id, "ant-quic's connect_addr reports antmesh's PeerId");
    assert!(conn.authenticated);
    let accepted = timeout(T, am.node.accept()).await.expect("antmesh accept timed out");
    assert_eq!(accepted, Some(PeerId(aq.id)), "antmesh's accept returns ant-quic's PeerId");
    assert!(aq.node.is_connected(&ant_quic::PeerId(am.id)).await);
}

/// A payload that cannot be mistaken for one of ant-quic's control frames.
fn payload(tag: &str, len: usize) -> Vec<u8> {
    let mut v = format!("antmesh-interop {tag} ").into_bytes();
    let mut x = len as u32 ^ 0x9e37_79b9;
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        v.push((x & 0xff) as u8);
    }
    v.truncate(len.max(1));
    v
}

/// Messages both ways over the connection that exists between the two.
async fn exchange(am: &Antmesh, aq: &AntQuic) {
    // antmesh → ant-quic: a small and a multi-packet message.
    for (tag, len) in [("am->aq small", 64), ("am->aq large", 256 * 1024)] {
        let msg = payload(tag, len);
        am.node.send(&PeerId(aq.id), &msg).await.unwrap_or_else(|e| panic!("antmesh send: {e}"));
        let (from, data) = timeout(T, aq.node.recv())
            .await
            .expect("ant-quic recv timed out")
            .unwrap_or_else(|e| panic!("ant-quic recv: {e}"));
        assert_eq!(from.0, am.id, "ant-quic attributes the message to antmesh");
        assert_eq!(data.len(), msg.len(), "{tag}: length");
        assert!(data == msg, "{tag}: ant-quic received other bytes");
    }
    // ant-quic → antmesh.
    for (tag, len) in [("aq->am small", 64), ("aq->am large", 256 * 1024)] {
        let msg = payload(tag, len);
        aq.node.send(&ant_quic::PeerId(am.id), &msg).await.unwrap_or_else(|e| panic!("ant-quic send: {e}"));
        let (from, data) = timeout(T, am.node.recv())
            .await
            .expect("antmesh recv timed out")
            .unwrap_or_else(|e| panic!("antmesh recv: {e}"));
        assert_eq!(from, PeerId(aq.id), "antmesh attributes the message to ant-quic");
        assert_eq!(data.len(), msg.len(), "{tag}: length");
        assert!(data == msg, "{tag}: antmesh received other bytes");
    }
    let s = am.node.stats();
    assert_eq!((s.messages_sent, s.messages_received), (2, 2), "{s:?}");
}

async fn stop(am: Antmesh, aq: AntQuic) {
    am.node.shutdown().await;
    aq.node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn antmesh_dials_ant_quic() {
    init_logs();
    let _one = serial().await;
    let am = antmesh(11).await;
    let aq = ant_quic_node().await;
    antmesh_dials(&am, &aq).await;
    assert_eq!(am.node.stats().connections_dialled, 1);
    stop(am, aq).await;
}

/// Dialling with an expected PeerId: ant-quic's key is checked inside the handshake.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn antmesh_dials_ant_quic_by_peer_id() {
    init_logs();
    let _one = serial().await;
    let am = antmesh(15).await;
    let aq = ant_quic_node().await;
    let addr = TransportAddr::Udp(ant_addr(&aq));
    let stranger = PeerId(peer_id_of(&[7u8; 1952]).unwrap());
    match timeout(T, am.node.connect_transport(&addr, Some(stranger))).await.expect("dial timed out") {
        Err(ConnectError::WrongPeer { expected, actual }) => {
            assert_eq!(expected, stranger);
            assert_eq!(actual, PeerId(aq.id), "the refusal names ant-quic's real PeerId");
        }
        other => panic!("expected WrongPeer, got {other:?}"),
    }
    assert!(am.node.connected_peers().is_empty());
    let node = Arc::clone(&aq.node);
    let accepted = tokio::spawn(async move { timeout(T, node.accept()).await });
    let got = timeout(T, am.node.connect_transport(&addr, Some(PeerId(aq.id))))
        .await
        .expect("dial timed out")
        .unwrap_or_else(|e| panic!("antmesh could not dial ant-quic by PeerId: {e}"));
    assert_eq!(got.0, aq.id);
    let conn = accepted.await.unwrap().expect("ant-quic accept timed out").expect("ant-quic accept returned None");
    assert_eq!(conn.peer_id.0, am.id);
    stop(am, aq).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ant_quic_dials_antmesh() {
    init_logs();
    let _one = serial().await;
    let am = antmesh(12).await;
    let aq = ant_quic_node().await;
    ant_quic_dials(&am, &aq).await;
    assert_eq!(am.node.stats().connections_accepted, 1);
    stop(am, aq).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_both_ways_on_a_connection_antmesh_dialled() {
    init_logs();
    let _one = serial().await;
    let am = antmesh(13).await;
    let aq = ant_quic_node().await;
    antmesh_dials(&am, &aq).await;
    exchange(&am, &aq).await;
    stop(am, aq).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_both_ways_on_a_connection_ant_quic_dialled() {
    init_logs();
    let _one = serial().await;
    let am = antmesh(14).await;
    let aq = ant_quic_node().await;
    ant_quic_dials(&am, &aq).await;
    exchange(&am, &aq).await;
    stop(am, aq).await;
}

/// Application bidirectional streams both ways: each side echoes what the other wrote. Both
/// stacks prefix such streams with `ANQAppB1`, which their `accept_bi` consumes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bidirectional_streams_both_ways() {
    init_logs();
    let _one = serial().await;
    let am = antmesh(16).await;
    let aq = ant_quic_node().await;
    antmesh_dials(&am, &aq).await;

    // antmesh opens, ant-quic echoes.
    let aq_node = Arc::clone(&aq.node);
    let echo = tokio::spawn(async move {
        let (peer, mut send, mut recv) = timeout(T, aq_node.accept_bi()).await.expect("ant-quic accept_bi timed out").unwrap();
        let data = recv.read_to_end(1 << 20).await.unwrap();
        send.write_all(&data).await.unwrap();
        send.finish().unwrap();
        peer
    });
    let msg = payload("am bi", 5000);
    let (mut send, mut recv) = am.node.open_bi(&PeerId(aq.id)).await.unwrap();
    send.write_all(&msg).await.unwrap();
    send.finish().unwrap();
    let back = timeout(T, recv.read_to_end(1 << 20)).await.expect("echo timed out").unwrap();
    assert!(back == msg, "ant-quic echoed other bytes");
    assert_eq!(echo.await.unwrap().0, am.id);

    // ant-quic opens, antmesh echoes.
    let msg = payload("aq bi", 7000);
    let (mut send, mut recv) = aq.node.open_bi(&ant_quic::PeerId(am.id)).await.unwrap();
    send.write_all(&msg).await.unwrap();
    send.finish().unwrap();
    let (peer, mut a_send, mut a_recv) = timeout(T, am.node.accept_bi()).await.expect("antmesh accept_bi timed out").unwrap();
    assert_eq!(peer, PeerId(aq.id));
    let data = a_recv.read_to_end(1 << 20).await.unwrap();
    assert!(data == msg, "antmesh received other bytes");
    a_send.write_all(&data).await.unwrap();
    a_send.finish().unwrap();
    let back = timeout(T, recv.read_to_end(1 << 20)).await.expect("echo timed out").unwrap();
    assert!(back == msg, "antmesh echoed other bytes");
    stop(am, aq).await;
}
