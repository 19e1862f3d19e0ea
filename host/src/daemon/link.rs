//! The driver of one constrained interface: the link engine over a plugin instance.

use std::sync::Arc;

use tokio::sync::mpsc;

use crate::config::LinkSettings;
use crate::log_budget::{log_limited, LogBudget};
use crate::link::{LinkEngine, LinkEvent};
use crate::transport::{EventReceiver, SharedTransport, TransportEvent};

use super::hub::{HubInbox, LinkCommand, NeighbourKey, NeighbourTx, SessionEvent, MSG_MESH};
use super::{agent, MSG_NODE_INFO};

/// The channels between a link driver and the mesh hub.
pub struct HubLink {
    /// To the hub.
    pub inbox: Arc<HubInbox>,
    /// From the hub: what to send on this interface.
    pub commands: mpsc::Receiver<LinkCommand>,
    /// The sending end of `commands`, handed to the hub with each neighbour.
    pub command_tx: mpsc::Sender<LinkCommand>,
}

/// Hop cost of a link at `bps`: 1 per megabit/s of shortfall, at least 2 (slower than a
/// QUIC hop), 1,000 at most; 10 when the rate is unknown.
fn hop_cost(bps: u64) -> u16 {
    if bps == 0 {
        return 10;
    }
    (1_000_000 / bps).clamp(2, 1000) as u16
}

/// Drives one constrained interface: frames and link events in, the engine's frames out,
/// timers in between. Returns the engine's counters when `stop` fires or the transport
/// closes.
pub async fn run_link(
    t: SharedTransport,
    rx: EventReceiver,
    mut engine: LinkEngine,
    settings: LinkSettings,
    stop: Arc<tokio::sync::Notify>,
    mut hub: HubLink,
) -> crate::link::LinkStats {
    let bitrate = t.capabilities().bitrate_bps;
    // Announces may use 2 % of the link (Reticulum's announce cap).
    let announce_rate = bitrate / 8 / 50;
    let iface = t.interface().to_owned();
    let scheme = t.scheme().to_owned();
    let show = |peer: &antmesh_plugin_api::LinkAddr| match antmesh_plugin_api::TransportAddr::from_link(&scheme, peer) {
        Some(a) => a.to_string(),
        None => peer.to_string(),
    };
    let dial = settings.dial.unwrap_or(true);
    // One neighbour per session: keyed by its link address too, so that the end of an
    // old session never takes down a newer one of the same peer.
    let key = |addr: &antmesh_plugin_api::LinkAddr, peer| NeighbourKey { iface: iface.clone(), peer, addr: Some(addr.to_string()) };
    let expect = settings.peer_id();
    // Lines a peer (or anyone reaching the transport) can cause, each under a budget.
    let (mut session_log, mut failure_log, mut transport_log) = (LogBudget::remote(), LogBudget::remote(), LogBudget::remote());
    // A frame the transport refused with WouldBlock; sent first once it reports Writable.
    let mut held: Option<crate::link::Transmit> = None;
    loop {
        let now = std::time::Instant::now();
        while let Some(tx) = held.take().or_else(|| engine.poll_transmit(now)) {
            match t.send(&tx.to, &tx.frame) {
                Ok(()) => {}
                Err(antmesh_plugin_api::SendError::WouldBlock) => {
                    held = Some(tx);
                    break;
                }
                // Lost like a frame on the air: the engine retransmits what matters.
                Err(e) => tracing::debug!(interface = %iface, to = %show(&tx.to), "send failed: {e}"),
            }
        }
        let mut more = false;
        while let Some(ev) = engine.poll_event() {
            more = true;
            match ev {
                LinkEvent::Connected { addr, peer, mode, initiator } => {
                    log_limited!(session_log, info, interface = %iface, %peer, addr = %show(&addr), ?mode, initiator, "link session up");
                    let mut info = vec![MSG_NODE_INFO];
                    info.extend_from_slice(agent().as_bytes());
                    if let Err(e) = engine.send(&peer, info) {
                        tracing::warn!(interface = %iface, %peer, "node info not sent: {e}");
                    }
                    hub.inbox.push_event(
                        key(&addr, peer),
                        SessionEvent::Up {
                            compact: true,
                            cost: hop_cost(bitrate),
                            announce_rate,
                            tx: NeighbourTx::Link(hub.command_tx.clone()),
                        },
                    );
                }
                LinkEvent::Rekeyed { peer, .. } => tracing::debug!(interface = %iface, %peer, "link rekeyed (fresh ML-KEM-768)"),
                LinkEvent::Message { peer, data, addr } => match data.split_first() {
                    Some((&MSG_NODE_INFO, agent)) => {
                        let agent: String = String::from_utf8_lossy(agent).chars().take(128).collect();
                        log_limited!(session_log, info, interface = %iface, %peer, agent = %agent, "node info received");
                    }
                    Some((&MSG_MESH, packet)) => {
                        if !hub.inbox.push_packet(key(&addr, peer), packet.to_vec()) {
                            tracing::trace!(interface = %iface, %peer, "mesh packet dropped: the hub's queue for this session is full");
                        }
                    }
                    _ => tracing::debug!(interface = %iface, from = %peer, bytes = data.len(), "message received"),
                },
                LinkEvent::Disconnected { addr, peer, reason } => {
                    log_limited!(session_log, info, interface = %iface, %peer, addr = %show(&addr), ?reason, "link session down");
                    hub.inbox.push_event(key(&addr, peer), SessionEvent::Down);
                }
                LinkEvent::HandshakeFailed { addr, error } => {
                    log_limited!(failure_log, warn, interface = %iface, addr = %show(&addr), "link handshake failed: {error}")
                }
            }
        }
        if more {
            // Handling events may have queued frames (node info).
            continue;
        }
        let wake = engine.poll_timeout(now).map(tokio::time::Instant::from_std);
        let sleep = async {
            match wake {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            ev = rx.recv() => match ev {
                Ok(TransportEvent::Frames(batch)) => {
                    let now = std::time::Instant::now();
                    for (from, data) in &batch {
                        if let Err(e) = engine.handle_frame(now, from, data) {
                            tracing::debug!(interface = %iface, from = %show(from), bytes = data.len(), "frame dropped: {e}");
                        }
                    }
                }
                Ok(TransportEvent::LinkUp(peer)) => {
                    log_limited!(transport_log, info, interface = %iface, peer = %show(&peer), "link up");
                    let now = std::time::Instant::now();
                    if dial {
                        if let Err(e) = engine.connect(now, peer.clone(), expect) {
                            log_limited!(failure_log, warn, interface = %iface, peer = %show(&peer), "cannot start a session: {e}");
                        }
                    }
                    engine.link_up(now, &peer);
                }
                Ok(TransportEvent::LinkDown { peer, reason }) => {
                    log_limited!(transport_log, info, interface = %iface, peer = %show(&peer), %reason, "link down");
                    engine.link_down(&peer);
                }
                // Writable: sends are retried on the engine's own schedule; Readable only
                // follows a `recv_pull`, which this driver never calls.
                Ok(TransportEvent::Writable | TransportEvent::Readable) => {}
                Err(_) => break,
            },
            () = sleep => engine.handle_timeout(std::time::Instant::now()),
            Some(cmd) = hub.commands.recv() => match cmd {
                LinkCommand::Send { peer, data } => {
                    if let Err(e) = engine.send(&peer, data) {
                        tracing::debug!(interface = %iface, %peer, "mesh packet not sent: {e}");
                    }
                }
                LinkCommand::Block { peer, duration } => {
                    let now = std::time::Instant::now();
                    engine.block_peer(now, peer, now + duration);
                }
            },
            () = stop.notified() => {
                let now = std::time::Instant::now();
                for (addr, _, _) in engine.sessions() {
                    engine.close(now, &addr);
                }
                while let Some(tx) = engine.poll_transmit(now) {
                    let _ = t.send(&tx.to, &tx.frame);
                }
                break;
            }
        }
    }
    engine.stats()
}

