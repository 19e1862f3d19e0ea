//! The daemon's QUIC driver (`daemon::watch_quic`) keeps the mesh's neighbours true when the
//! endpoint's event queue overflows (review item M5): a disconnect lost to the overflow is
//! found by comparing with the endpoint's connections. The endpoint here keeps one event per
//! subscriber, so that departures overrun it; the daemon's keeps 1,024, and one peer cannot
//! overrun those (it may read only 4 messages at once).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use antmesh_host::daemon::hub::{HubInbox, SessionEvent};
use antmesh_host::daemon::inbox::{Inbox, InboxLimits, Item};
use antmesh_host::identity::{Identity, PeerId};
use antmesh_host::quic::endpoint::{P2pConfig, P2pEndpoint};
use zeroize::Zeroizing;

fn identity(seed: u8) -> Arc<Identity> {
    Arc::new(Identity::from_seed(Zeroizing::new([seed; 32])))
}

async fn endpoint(seed: u8, events: usize) -> P2pEndpoint {
    let mut cfg = P2pConfig::new(identity(seed), SocketAddr::from(([127, 0, 0, 1], 0)));
    cfg.event_queue = events;
    P2pEndpoint::new(cfg).await.unwrap()
}

/// Takes inbox items until `done` says so (panics after 20 s).
async fn until(inbox: &HubInbox, mut done: impl FnMut(PeerId, &Item<SessionEvent>) -> bool) {
    tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            let (key, item) = inbox.pop().await.unwrap();
            if done(key.peer, &item) {
                return;
            }
        }
    })
    .await
    .expect("the inbox never showed it");
}

#[tokio::test(flavor = "current_thread")]
async fn departures_lost_to_an_overflowing_event_queue_still_take_their_neighbours_down() {
    let a = Arc::new(endpoint(1, 1).await);
    let inbox: Arc<HubInbox> = Arc::new(Inbox::new(InboxLimits::default()));
    tokio::spawn(antmesh_host::daemon::watch_quic("udp0".into(), Arc::clone(&a), Arc::clone(&inbox)));
    let addr = a.local_addr().unwrap();
    let mut peers = Vec::new();
    for seed in 2..8 {
        let p = endpoint(seed, 1024).await;
        p.connect_addr(addr).await.unwrap();
        peers.push(p);
    }
    let mut up: HashSet<PeerId> = HashSet::new();
    until(&inbox, |peer, item| {
        if matches!(item, Item::Event(SessionEvent::Up { .. })) {
            up.insert(peer);
        }
        up.len() == peers.len()
    })
    .await;
    // Five leave at once: their events overrun the one-slot queue.
    let stay = peers.remove(0).peer_id();
    let gone: HashSet<PeerId> = peers.iter().map(P2pEndpoint::peer_id).collect();
    for p in &peers {
        p.shutdown().await;
    }
    let mut down = HashSet::new();
    until(&inbox, |peer, item| {
        if matches!(item, Item::Event(SessionEvent::Down)) {
            assert_ne!(peer, stay, "the peer that stayed was taken down");
            down.insert(peer);
        }
        down == gone
    })
    .await;
}
