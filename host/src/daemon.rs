//! The thin tokio layer behind `antmesh up`: load plugins, open the configured interfaces,
//! pump their events, and close everything on shutdown.
//!
//! No protocol logic lives here. An interface whose capabilities suit QUIC (datagrams,
//! MTU ≥ 1200, ≥ 10 kbit/s, LAN/WAN latency) gets a [`P2pEndpoint`] with the node's
//! identity; every other interface gets the constrained [`LinkEngine`], driven by
//! [`run_link`] over the plugin. Either way a peer is known by the same [`crate::identity::PeerId`].
//!
//! Until the mesh router is attached, the only application message the daemon sends is
//! *node info* (type byte [`MSG_NODE_INFO`], then the sender's agent string) as the first
//! message of every link session, so operators see who and what is on each link.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;

use crate::config::{LinkSettings, NodeConfig};
use crate::identity::Identity;
use crate::link::{LinkConfig, LinkEngine, LinkEvent};
use crate::quic::endpoint::{P2pConfig, P2pEndpoint, P2pEvent};
use crate::plugin::loader::{self, PluginDirError};
use crate::plugin::NativeTransport;
use crate::transport::{EventReceiver, SharedTransport, Transport, TransportEvent};

/// Why the node could not run.
#[derive(thiserror::Error, Debug)]
#[non_exhaustive]
pub enum UpError {
    /// No plugin directory was given and none could be derived from the executable path.
    #[error("no plugin directory: pass --plugin-dir or set plugin_dir in the config")]
    NoPluginDir,
    /// The plugin directory could not be read.
    #[error(transparent)]
    PluginDir(#[from] PluginDirError),
    /// The QUIC endpoint could not start on an interface.
    #[error("interface `{interface}`: {source}")]
    Quic {
        /// Interface name.
        interface: String,
        /// Why.
        source: crate::quic::endpoint::EndpointError,
    },
    /// Interfaces were configured but none could be opened.
    #[error("none of the {configured} configured interfaces could be opened (see the errors above)")]
    NoInterfaces {
        /// How many were enabled.
        configured: usize,
    },
}

/// What a run did, for the exit log line and for tests.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RunSummary {
    /// Interfaces that were opened.
    pub opened: Vec<String>,
    /// Interfaces that failed to open, with reasons.
    pub failed: Vec<(String, String)>,
    /// Frames received over the whole run on constrained interfaces.
    pub frames_received: u64,
    /// QUIC peers that connected over the whole run.
    pub quic_peers: u64,
    /// Link sessions established over the whole run on constrained interfaces.
    pub link_sessions: u64,
}

/// Message type byte of *node info*, the first message the daemon sends on a link session.
pub const MSG_NODE_INFO: u8 = 0x01;

/// This build's agent string, as sent in node info.
pub fn agent() -> String {
    format!("antmesh/{}", env!("CARGO_PKG_VERSION"))
}

/// Runs a node until `shutdown` resolves.
pub async fn run(
    cfg: NodeConfig,
    plugin_dir: Option<PathBuf>,
    identity: Arc<Identity>,
    shutdown: impl Future<Output = ()>,
) -> Result<RunSummary, UpError> {
    let dir = plugin_dir.or(cfg.plugin_dir.clone()).or_else(loader::default_plugin_dir).ok_or(UpError::NoPluginDir)?;
    let set = loader::load_dir(&dir)?;
    for p in &set.plugins {
        tracing::info!(plugin = p.name(), version = %p.info.version, abi = %p.info.abi_version, file = %p.path.display(), "plugin loaded");
    }
    for e in &set.errors {
        tracing::error!("plugin refused: {e}");
    }

    let mut summary = RunSummary::default();
    let mut open: Vec<SharedTransport> = Vec::new();
    let mut pumps = Vec::new();
    let mut endpoints: Vec<(String, Arc<P2pEndpoint>)> = Vec::new();
    let mut watchers = Vec::new();
    let enabled: Vec<_> = cfg.interfaces.iter().filter(|i| i.enabled).collect();
    for iface in &enabled {
        let Some(plugin) = set.get(&iface.plugin) else {
            let why = format!("no plugin named `{}` in {}", iface.plugin, dir.display());
            tracing::error!(interface = %iface.name, "{why}");
            summary.failed.push((iface.name.clone(), why));
            continue;
        };
        match NativeTransport::open(plugin, &iface.name, &iface.config) {
            Ok((t, rx)) => {
                let addrs: Vec<String> = t.local_addresses().iter().map(ToString::to_string).collect();
                let caps = t.capabilities();
                tracing::info!(
                    interface = %iface.name,
                    plugin = %iface.plugin,
                    addresses = %addrs.join(", "),
                    mtu = caps.mtu,
                    engine = if caps.suits_quic() { "quic" } else { "constrained" },
                    "interface up"
                );
                let t: SharedTransport = Arc::new(t);
                if caps.suits_quic() {
                    let local = addrs.first().and_then(|a| a.strip_prefix("udp://")).and_then(|a| a.parse().ok());
                    let bind = local.unwrap_or_else(|| std::net::SocketAddr::from(([0, 0, 0, 0], 0)));
                    let ep = P2pEndpoint::with_transport(P2pConfig::new(Arc::clone(&identity), bind), Arc::clone(&t), rx)
                        .map_err(|source| UpError::Quic { interface: iface.name.clone(), source })?;
                    let ep = Arc::new(ep);
                    tracing::info!(interface = %iface.name, peer_id = %ep.peer_id(), "QUIC endpoint up");
                    watchers.push(tokio::spawn(watch_quic(iface.name.clone(), Arc::clone(&ep))));
                    endpoints.push((iface.name.clone(), ep));
                } else {
                    let mut lc = LinkConfig::from_capabilities(&caps);
                    iface.link.apply(&mut lc);
                    let engine = match LinkEngine::new(Arc::clone(&identity), lc) {
                        Ok(e) => e,
                        Err(e) => {
                            tracing::error!(interface = %iface.name, "no randomness for the link engine: {e}");
                            summary.failed.push((iface.name.clone(), e.to_string()));
                            let _ = tokio::task::spawn_blocking(move || t.close()).await;
                            continue;
                        }
                    };
                    let stop = Arc::new(tokio::sync::Notify::new());
                    pumps.push((Arc::clone(&stop), tokio::spawn(run_link(Arc::clone(&t), rx, engine, iface.link.clone(), stop))));
                    open.push(t);
                }
                summary.opened.push(iface.name.clone());
            }
            Err(e) => {
                tracing::error!("{e}");
                summary.failed.push((iface.name.clone(), e.to_string()));
            }
        }
    }
    if summary.opened.is_empty() && !enabled.is_empty() {
        return Err(UpError::NoInterfaces { configured: enabled.len() });
    }
    tracing::info!(interfaces = summary.opened.len(), peer_id = %identity.peer_id(), "node up");

    shutdown.await;
    tracing::info!("shutting down");
    for (name, ep) in &endpoints {
        // Tells connected peers, drains, and closes the interface underneath.
        ep.shutdown().await;
        tracing::debug!(interface = %name, "QUIC endpoint closed");
    }
    for w in watchers {
        w.abort();
    }
    for (_, ep) in &endpoints {
        let st = ep.stats();
        summary.quic_peers += st.connections_accepted + st.connections_dialled;
    }
    // Link drivers close their sessions (a CLOSE to each peer) before the transports go.
    let mut drivers = Vec::new();
    for (stop, task) in pumps {
        stop.notify_one();
        drivers.push(task);
    }
    for d in drivers {
        if let Ok(st) = d.await {
            summary.frames_received += st.frames_in;
            summary.link_sessions += st.cold + st.warm + st.resumed;
        }
    }
    for t in open {
        // close joins plugin threads; keep it off the async workers.
        let name = t.interface().to_owned();
        match tokio::task::spawn_blocking(move || t.close()).await {
            Ok(Ok(())) => tracing::debug!(interface = %name, "closed"),
            Ok(Err(e)) => tracing::warn!(interface = %name, "{e}"),
            Err(e) => tracing::error!(interface = %name, "close task failed: {e}"),
        }
    }
    tracing::info!(
        frames = summary.frames_received,
        quic_peers = summary.quic_peers,
        link_sessions = summary.link_sessions,
        "node stopped"
    );
    Ok(summary)
}

/// Logs what happens on a QUIC interface and drains its messages (no application is
/// attached to the daemon yet; the mesh router will be).
async fn watch_quic(iface: String, ep: Arc<P2pEndpoint>) {
    let mut events = ep.subscribe();
    loop {
        tokio::select! {
            ev = events.recv() => match ev {
                Ok(P2pEvent::PeerConnected { peer, addr, side }) => {
                    tracing::info!(interface = %iface, %peer, %addr, ?side, "peer connected");
                }
                Ok(P2pEvent::PeerAuthenticated { peer }) => tracing::debug!(interface = %iface, %peer, "peer authenticated (ML-DSA-65)"),
                Ok(P2pEvent::PeerDisconnected { peer, reason }) => tracing::info!(interface = %iface, %peer, ?reason, "peer disconnected"),
                Ok(P2pEvent::DataReceived { .. }) => {}
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => tracing::debug!(interface = %iface, "{n} events skipped"),
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            },
            msg = ep.recv() => match msg {
                Ok((peer, data)) => tracing::info!(interface = %iface, from = %peer, bytes = data.len(), "message received"),
                Err(_) => return,
            },
        }
    }
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
) -> crate::link::LinkStats {
    let iface = t.interface().to_owned();
    let scheme = t.scheme().to_owned();
    let show = |peer: &antmesh_plugin_api::LinkAddr| match antmesh_plugin_api::TransportAddr::from_link(&scheme, peer) {
        Some(a) => a.to_string(),
        None => peer.to_string(),
    };
    let dial = settings.dial.unwrap_or(true);
    let expect = settings.peer_id();
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
                    tracing::info!(interface = %iface, %peer, addr = %show(&addr), ?mode, initiator, "link session up");
                    let mut info = vec![MSG_NODE_INFO];
                    info.extend_from_slice(agent().as_bytes());
                    if let Err(e) = engine.send(&peer, info) {
                        tracing::warn!(interface = %iface, %peer, "node info not sent: {e}");
                    }
                }
                LinkEvent::Rekeyed { peer, .. } => tracing::debug!(interface = %iface, %peer, "link rekeyed (fresh ML-KEM-768)"),
                LinkEvent::Message { peer, data, .. } => match data.split_first() {
                    Some((&MSG_NODE_INFO, agent)) => {
                        let agent: String = String::from_utf8_lossy(agent).chars().take(128).collect();
                        tracing::info!(interface = %iface, %peer, agent = %agent, "node info received");
                    }
                    _ => tracing::info!(interface = %iface, from = %peer, bytes = data.len(), "message received"),
                },
                LinkEvent::Disconnected { addr, peer, reason } => {
                    tracing::info!(interface = %iface, %peer, addr = %show(&addr), ?reason, "link session down")
                }
                LinkEvent::HandshakeFailed { addr, error } => {
                    tracing::warn!(interface = %iface, addr = %show(&addr), "link handshake failed: {error}")
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
                    tracing::info!(interface = %iface, peer = %show(&peer), "link up");
                    let now = std::time::Instant::now();
                    if dial {
                        if let Err(e) = engine.connect(now, peer.clone(), expect) {
                            tracing::warn!(interface = %iface, peer = %show(&peer), "cannot start a session: {e}");
                        }
                    }
                    engine.link_up(now, &peer);
                }
                Ok(TransportEvent::LinkDown { peer, reason }) => {
                    tracing::info!(interface = %iface, peer = %show(&peer), %reason, "link down");
                    engine.link_down(&peer);
                }
                Ok(TransportEvent::Writable) => {}
                Err(_) => break,
            },
            () = sleep => engine.handle_timeout(std::time::Instant::now()),
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

/// Resolves on Ctrl-C (SIGINT) or SIGTERM.
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(e) => {
                tracing::warn!("cannot watch SIGTERM: {e}");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
