//! Two `antmesh up` processes exchange authenticated messages over the constrained link
//! engine: over a real socat pty pair (serial plugin) and over the pipe plugin (socat
//! children joined by a Unix socket). A node reached over serial and over QUIC shows one
//! PeerId.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use antmesh_host::identity::Identity;
use antmesh_host::quic::endpoint::{P2pConfig, P2pEndpoint};
use zeroize::Zeroizing;

mod common;

use common::{free_udp_port, Node, PtyPair};

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
    let mut a = Node::start(dir.path(), "a", &format!("{udp}, {}", common::serial("ser", &pty.a)));
    let mut b = Node::start(dir.path(), "b", &common::serial("ser", &pty.b));
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
