//! `P2pEndpoint` over the real UDP plugin on loopback: pure-PQC QUIC between two nodes.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use antmesh_host::identity::Identity;
use antmesh_host::quic::endpoint::{ConnectError, DisconnectReason, P2pConfig, P2pEndpoint, P2pEvent, Side};
use antmesh_plugin_api::TransportAddr;
use tokio::time::timeout;
use zeroize::Zeroizing;

const T: Duration = Duration::from_secs(20);

fn identity(seed: u8) -> Arc<Identity> {
    Arc::new(Identity::from_seed(Zeroizing::new([seed; 32])))
}

async fn node(seed: u8) -> P2pEndpoint {
    let cfg = P2pConfig::new(identity(seed), SocketAddr::from(([127, 0, 0, 1], 0)));
    P2pEndpoint::new(cfg).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_authenticate_and_exchange_messages_both_ways() {
    let a = node(1).await;
    let b = node(2).await;
    let mut b_events = b.subscribe();
    let b_addr = b.local_addr().unwrap();

    let got = timeout(T, a.connect_addr(b_addr)).await.unwrap().unwrap();
    assert_eq!(got, b.peer_id(), "a sees b's PeerId");
    assert_eq!(timeout(T, b.accept()).await.unwrap(), Some(a.peer_id()), "b sees a's PeerId");

    let first = timeout(T, b_events.recv()).await.unwrap().unwrap();
    assert!(matches!(first, P2pEvent::PeerConnected { peer, side: Side::Accepted, .. } if peer == a.peer_id()), "{first:?}");
    let second = timeout(T, b_events.recv()).await.unwrap().unwrap();
    assert_eq!(second, P2pEvent::PeerAuthenticated { peer: a.peer_id() });

    a.send(&b.peer_id(), b"hello b").await.unwrap();
    let (from, data) = timeout(T, b.recv()).await.unwrap().unwrap();
    assert_eq!((from, data.as_slice()), (a.peer_id(), &b"hello b"[..]));

    let big = vec![0x5a; 3 * 1024 * 1024];
    b.send(&a.peer_id(), &big).await.unwrap();
    let (from, data) = timeout(T, a.recv()).await.unwrap().unwrap();
    assert_eq!(from, b.peer_id());
    assert_eq!(data, big);

    // A bidirectional stream: b echoes what a writes.
    let echo = tokio::spawn(async move {
        let (peer, mut send, mut recv) = b.accept_bi().await.unwrap();
        let msg = recv.read_to_end(1024).await.unwrap();
        send.write_all(&msg).await.unwrap();
        send.finish().unwrap();
        (peer, b)
    });
    let (mut send, mut recv) = a.open_bi(&got).await.unwrap();
    send.write_all(b"ping").await.unwrap();
    send.finish().unwrap();
    assert_eq!(timeout(T, recv.read_to_end(1024)).await.unwrap().unwrap(), b"ping");
    let (peer, b) = echo.await.unwrap();
    assert_eq!(peer, a.peer_id());

    let s = a.stats();
    assert_eq!((s.active_connections, s.connections_dialled, s.messages_sent, s.messages_received), (1, 1, 1, 1));

    // Both ends derive the same channel binding, long after the handshake.
    let binding = a.channel_binding(&b.peer_id()).unwrap();
    assert_eq!(b.channel_binding(&a.peer_id()), Some(binding));
    assert_ne!(binding, [0u8; 32]);
    assert_eq!(a.channel_binding(&identity(9).peer_id()), None, "not connected");

    // a disconnects; b learns why.
    let mut b_events = b.subscribe();
    assert!(a.disconnect(&b.peer_id()));
    loop {
        match timeout(T, b_events.recv()).await.unwrap().unwrap() {
            P2pEvent::PeerDisconnected { peer, reason } => {
                assert_eq!(peer, a.peer_id());
                assert!(matches!(reason, DisconnectReason::Remote { code: 0, .. }), "{reason:?}");
                break;
            }
            _ => continue,
        }
    }
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dialling_the_wrong_peer_id_fails() {
    let a = node(3).await;
    let b = node(4).await;
    let stranger = identity(5).peer_id();
    let addr = TransportAddr::Udp(b.local_addr().unwrap());
    let err = timeout(T, a.connect_transport(&addr, Some(stranger))).await.unwrap().unwrap_err();
    match err {
        ConnectError::WrongPeer { expected, actual } => {
            assert_eq!(expected, stranger);
            assert_eq!(actual, b.peer_id());
        }
        other => panic!("expected WrongPeer, got {other}"),
    }
    assert_eq!(a.stats().handshake_failures, 1);
    assert!(a.connected_peers().is_empty());
    // The right id works.
    assert_eq!(timeout(T, a.connect_transport(&addr, Some(b.peer_id()))).await.unwrap().unwrap(), b.peer_id());
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_ip_addresses_are_not_for_quic() {
    let a = node(6).await;
    let addr: TransportAddr = "serial:///dev/ttyUSB0".parse().unwrap();
    assert!(matches!(a.connect_transport(&addr, None).await, Err(ConnectError::UnsupportedTransport(s)) if s == "serial"));
    a.shutdown().await;
}

fn fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map(|d| d.count()).unwrap_or(0)
}

fn rss_bytes() -> usize {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: usize = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4096
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_connect_close_cycles_leave_no_growth() {
    let a = node(7).await;
    let b = node(8).await;
    let b_addr = b.local_addr().unwrap();
    let cycle = |n: usize| {
        let (a, b) = (&a, &b);
        async move {
            for _ in 0..n {
                let peer = timeout(T, a.connect_addr(b_addr)).await.unwrap().unwrap();
                assert!(a.disconnect(&peer));
                // Wait until b has seen the close too, so state is settled on both sides.
                let deadline = std::time::Instant::now() + T;
                while !b.connected_peers().is_empty() {
                    assert!(std::time::Instant::now() < deadline, "b never saw the close");
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
        }
    };
    // Warm-up: allocator pools, lazily built state.
    cycle(50).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let metrics = tokio::runtime::Handle::current().metrics();
    let (tasks0, fds0, rss0) = (metrics.num_alive_tasks(), fds(), rss_bytes());
    cycle(1000).await;
    // Closed connections linger in quinn for a drain period (3 PTO) before their state goes.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let (mut tasks, mut fd, mut rss);
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        (tasks, fd, rss) = (metrics.num_alive_tasks(), fds(), rss_bytes());
        if tasks <= tasks0 + 2 || std::time::Instant::now() > deadline {
            break;
        }
    }
    eprintln!("after 1000 cycles: tasks {tasks0} -> {tasks}, fds {fds0} -> {fd}, rss {} KiB -> {} KiB", rss0 / 1024, rss / 1024);
    assert!(tasks <= tasks0 + 2, "tasks grew: {tasks0} -> {tasks}");
    assert!(fd <= fds0 + 2, "fds grew: {fds0} -> {fd}");
    // Generous: 1000 connections of residue at 10 KB each would be ~10 MB.
    assert!(rss <= rss0 + 8 * 1024 * 1024, "rss grew by {} KiB", (rss.saturating_sub(rss0)) / 1024);
    assert_eq!(a.stats().connections_dialled, 1050);
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn datagrams_go_both_ways_and_oversize_ones_are_refused() {
    let a = node(31).await;
    let b = node(32).await;
    let b_id = timeout(T, a.connect_addr(b.local_addr().unwrap())).await.unwrap().unwrap();
    timeout(T, b.accept()).await.unwrap();
    let max = a.max_datagram_size(&b_id).unwrap();
    assert!(max >= 1_000, "max datagram {max}");
    a.send_datagram(&b_id, b"to b").await.unwrap();
    assert_eq!(timeout(T, b.recv_datagram()).await.unwrap().unwrap(), (a.peer_id(), b"to b".to_vec()));
    // Each side's limit is its own (path-MTU discovery runs per direction).
    let max_b = b.max_datagram_size(&a.peer_id()).unwrap();
    b.send_datagram(&a.peer_id(), &vec![7; max_b]).await.unwrap();
    assert_eq!(timeout(T, a.recv_datagram()).await.unwrap().unwrap().1.len(), max_b);
    // (Path-MTU discovery may raise the limit meanwhile; 64 KiB never fits.)
    assert!(matches!(a.send_datagram(&b_id, &vec![0; 65_536]).await, Err(antmesh_host::quic::endpoint::MessageError::Datagram(_))));
    // Datagrams and messages stay apart.
    a.send(&b_id, b"message").await.unwrap();
    assert_eq!(timeout(T, b.recv()).await.unwrap().unwrap().1, b"message");
}
