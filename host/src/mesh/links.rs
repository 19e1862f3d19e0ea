//! End-to-end links over the mesh: the constrained link engine whose link addresses are
//! node destinations and whose frames ride mesh DATA packets. Sans-IO like the rest: the
//! caller hands [`MeshLinks::handle_payload`] what arrived for its node destination and
//! routes what [`MeshLinks::poll_payload`] returns with `Router::send_to`.
//!
//! ```text
//! DATA payload   0x03 | reply-to destination [16] | link engine frame (docs/link.md)
//! ```
//!
//! The engine's handshake proves a PeerId; a session is kept only if that PeerId owns the
//! destination used as its address (its node destination is the hash of the PeerId and
//! [`NODE_SERVICE`](super::dest::NODE_SERVICE)). So a relay can neither read the link nor
//! stand in for the far end, even when the path to it came from an unverified compact
//! announce.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use antmesh_plugin_api::LinkAddr;

use crate::identity::{Identity, PeerId};
use crate::link::{ConnectError, FrameError, LinkConfig, LinkEngine, LinkEvent, Mode, SendError};

use super::dest::DestinationHash;

/// The DATA payload type of a link frame.
pub const LINK_FRAME: u8 = 0x03;

/// Whether `dest` is the node destination of `peer`.
pub fn owns_node_destination(peer: &PeerId, dest: &DestinationHash) -> bool {
    DestinationHash::node(peer) == *dest
}

/// What happened on an end-to-end link.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum LinkUpdate {
    /// A link is up with the node behind `dest`.
    Up {
        /// The remote node destination.
        dest: DestinationHash,
        /// Its proven identity.
        peer: PeerId,
        /// How keys were agreed.
        mode: Mode,
        /// This node dialled.
        initiator: bool,
    },
    /// A session proved an identity that does not own the destination it used; closed.
    Refused {
        /// The destination claimed.
        dest: DestinationHash,
        /// The identity proven.
        peer: PeerId,
    },
    /// A message arrived on a link.
    Message {
        /// From this destination.
        dest: DestinationHash,
        /// Its identity.
        peer: PeerId,
        /// The message.
        data: Vec<u8>,
    },
    /// A link ended (closed, idle, timed out).
    Down {
        /// The destination.
        dest: DestinationHash,
        /// Its identity.
        peer: PeerId,
    },
    /// A handshake failed.
    Failed {
        /// The destination.
        dest: DestinationHash,
        /// Why.
        error: String,
    },
}

/// Why `open_link` or `send` failed.
#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum MeshLinkError {
    /// The engine refused to dial.
    #[error(transparent)]
    Connect(#[from] ConnectError),
    /// No link is up with that destination.
    #[error("no end-to-end link with {0}")]
    NoLink(DestinationHash),
    /// The link refused the message.
    #[error(transparent)]
    Send(#[from] SendError),
}

/// End-to-end links of one node.
pub struct MeshLinks {
    engine: LinkEngine,
    me: DestinationHash,
    used: HashMap<DestinationHash, Instant>,
    idle: Duration,
}

fn addr_of(dest: &DestinationHash) -> LinkAddr {
    LinkAddr::Named(dest.to_hex().into())
}

fn dest_of(addr: &LinkAddr) -> Option<DestinationHash> {
    match addr {
        LinkAddr::Named(n) => n.as_str().parse().ok(),
        _ => None,
    }
}

impl MeshLinks {
    /// Links for `me`, whose node destination is `my_dest`; links idle for `idle` close.
    pub fn new(me: Arc<Identity>, my_dest: DestinationHash, idle: Duration) -> Result<MeshLinks, getrandom::Error> {
        let mut lc = LinkConfig::for_link(1200, 0);
        // Several hops, some of them slow: no fast retransmissions of handshake fragments.
        lc.latency = Duration::from_millis(500);
        Ok(MeshLinks { engine: LinkEngine::new(me, lc)?, me: my_dest, used: HashMap::new(), idle })
    }

    /// Opens (or keeps) a link to `dest`, whose announce names `peer`.
    pub fn open_link(&mut self, now: Instant, dest: DestinationHash, peer: PeerId) -> Result<(), MeshLinkError> {
        self.engine.connect(now, addr_of(&dest), Some(peer))?;
        Ok(())
    }

    /// Whether this node dialled `dest` (keeps a link to it up), as opposed to answering.
    pub fn dialled(&self, dest: &DestinationHash) -> bool {
        self.engine.wants(&addr_of(dest))
    }

    /// The identity of the link up with `dest`, if any.
    pub fn link_peer(&self, dest: &DestinationHash) -> Option<PeerId> {
        self.engine.session_peer(&addr_of(dest))
    }

    /// Sends a message on the link with `dest`.
    pub fn send(&mut self, now: Instant, dest: &DestinationHash, data: Vec<u8>) -> Result<PeerId, MeshLinkError> {
        let peer = self.link_peer(dest).ok_or(MeshLinkError::NoLink(*dest))?;
        self.engine.send(&peer, data)?;
        self.used.insert(*dest, now);
        Ok(peer)
    }

    /// Closes the link with `dest`.
    pub fn close(&mut self, now: Instant, dest: &DestinationHash) {
        self.used.remove(dest);
        self.engine.close(now, &addr_of(dest));
    }

    /// Handles a DATA payload of type [`LINK_FRAME`] (type byte included).
    pub fn handle_payload(&mut self, now: Instant, payload: &[u8]) -> Result<(), FrameError> {
        let Some((&LINK_FRAME, rest)) = payload.split_first() else {
            return Err(FrameError::Wire(crate::link::wire::WireError::Empty));
        };
        let (from, frame) = rest.split_at_checked(16).ok_or(FrameError::Wire(crate::link::wire::WireError::Empty))?;
        let addr = LinkAddr::Named(hex::encode(from).into());
        self.engine.handle_frame(now, &addr, frame)
    }

    /// The next payload to route: (destination, DATA payload).
    pub fn poll_payload(&mut self, now: Instant) -> Option<(DestinationHash, Vec<u8>)> {
        loop {
            let t = self.engine.poll_transmit(now)?;
            let Some(dest) = dest_of(&t.to) else { continue };
            let mut payload = Vec::with_capacity(17 + t.frame.len());
            payload.push(LINK_FRAME);
            payload.extend_from_slice(&self.me.0);
            payload.extend_from_slice(&t.frame);
            return Some((dest, payload));
        }
    }

    /// The next update, after the owner check.
    pub fn poll_update(&mut self, now: Instant) -> Option<LinkUpdate> {
        loop {
            let ev = self.engine.poll_event()?;
            let update = match ev {
                LinkEvent::Connected { addr, peer, mode, initiator } => {
                    let Some(dest) = dest_of(&addr) else { continue };
                    if owns_node_destination(&peer, &dest) {
                        self.used.insert(dest, now);
                        LinkUpdate::Up { dest, peer, mode, initiator }
                    } else {
                        self.engine.close(now, &addr);
                        LinkUpdate::Refused { dest, peer }
                    }
                }
                LinkEvent::Message { addr, peer, data } => {
                    let Some(dest) = dest_of(&addr) else { continue };
                    self.used.insert(dest, now);
                    LinkUpdate::Message { dest, peer, data }
                }
                LinkEvent::Disconnected { addr, peer, .. } => {
                    let Some(dest) = dest_of(&addr) else { continue };
                    self.used.remove(&dest);
                    LinkUpdate::Down { dest, peer }
                }
                LinkEvent::HandshakeFailed { addr, error } => {
                    let Some(dest) = dest_of(&addr) else { continue };
                    LinkUpdate::Failed { dest, error: error.to_string() }
                }
                LinkEvent::Rekeyed { .. } => continue,
            };
            return Some(update);
        }
    }

    /// Fires timers and closes idle links.
    pub fn handle_timeout(&mut self, now: Instant) {
        let idle: Vec<DestinationHash> = self.used.iter().filter(|(_, t)| **t + self.idle <= now).map(|(d, _)| *d).collect();
        for d in idle {
            self.close(now, &d);
        }
        self.engine.handle_timeout(now);
    }

    /// When `handle_timeout` is next due.
    pub fn poll_timeout(&self, now: Instant) -> Option<Instant> {
        let idle = self.used.values().min().map(|t| *t + self.idle);
        [self.engine.poll_timeout(now), idle].into_iter().flatten().min()
    }

    /// Links established so far.
    pub fn established(&self) -> u64 {
        let s = self.engine.stats();
        s.cold + s.warm + s.resumed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use zeroize::Zeroizing;

    fn node(n: u8) -> (Arc<Identity>, DestinationHash) {
        let id = Arc::new(Identity::from_seed(Zeroizing::new([n; 32])));
        let d = DestinationHash::node(&id.peer_id());
        (id, d)
    }

    /// Moves payloads between the two until neither has any (a lossless one-hop mesh).
    fn pump(now: Instant, a: &mut MeshLinks, b: &mut MeshLinks, a_dest: DestinationHash, b_dest: DestinationHash) {
        for _ in 0..100 {
            let mut moved = false;
            while let Some((to, p)) = a.poll_payload(now) {
                assert_eq!(to, b_dest);
                let _ = b.handle_payload(now, &p);
                moved = true;
            }
            while let Some((to, p)) = b.poll_payload(now) {
                assert_eq!(to, a_dest);
                let _ = a.handle_payload(now, &p);
                moved = true;
            }
            if !moved {
                return;
            }
        }
    }

    #[test]
    fn a_link_to_a_destination_carries_messages_and_closes_when_idle() {
        let ((ia, da), (ib, db)) = (node(1), node(2));
        let now = Instant::now();
        let mut a = MeshLinks::new(Arc::clone(&ia), da, Duration::from_secs(300)).unwrap();
        let mut b = MeshLinks::new(Arc::clone(&ib), db, Duration::from_secs(300)).unwrap();
        a.open_link(now, db, ib.peer_id()).unwrap();
        pump(now, &mut a, &mut b, da, db);
        let ups: Vec<LinkUpdate> = std::iter::from_fn(|| a.poll_update(now)).collect();
        assert!(matches!(ups.as_slice(), [LinkUpdate::Up { dest, peer, initiator: true, .. }] if *dest == db && *peer == ib.peer_id()), "{ups:?}");
        assert!(matches!(b.poll_update(now), Some(LinkUpdate::Up { dest, initiator: false, .. }) if dest == da));
        assert_eq!(a.send(now, &db, b"over the mesh".to_vec()), Ok(ib.peer_id()));
        pump(now, &mut a, &mut b, da, db);
        assert!(matches!(b.poll_update(now), Some(LinkUpdate::Message { data, .. }) if data == b"over the mesh"));
        // Idle: closed after the idle time, both ends told.
        let later = now + Duration::from_secs(301);
        a.handle_timeout(later);
        pump(later, &mut a, &mut b, da, db);
        assert!(matches!(a.poll_update(later), Some(LinkUpdate::Down { dest, .. }) if dest == db));
        assert_eq!(a.send(later, &db, b"x".to_vec()), Err(MeshLinkError::NoLink(db)));
    }

    #[test]
    fn a_session_at_someone_elses_destination_is_refused() {
        // X answers frames addressed to B's destination with its own identity, and claims
        // B's destination as its reply-to: the dialler's engine already refuses the wrong
        // PeerId; a responder that X dials under B's destination refuses the session.
        let ((ia, da), (ib, db), (ix, _)) = (node(1), node(2), node(3));
        let now = Instant::now();
        let mut a = MeshLinks::new(Arc::clone(&ia), da, Duration::from_secs(300)).unwrap();
        // X pretends its node destination is B's.
        let mut x = MeshLinks::new(Arc::clone(&ix), db, Duration::from_secs(300)).unwrap();
        x.open_link(now, da, ia.peer_id()).unwrap();
        pump(now, &mut x, &mut a, db, da);
        let ups: Vec<LinkUpdate> = std::iter::from_fn(|| a.poll_update(now)).collect();
        assert!(ups.iter().any(|u| matches!(u, LinkUpdate::Refused { dest, peer } if *dest == db && *peer == ix.peer_id())), "{ups:?}");
        assert!(!ups.iter().any(|u| matches!(u, LinkUpdate::Up { .. })));
        assert_eq!(a.link_peer(&db), None);
        let _ = ib;
    }
}
