//! The thin tokio layer behind `antmesh up`: load plugins, open the configured interfaces,
//! pump their events, and close everything on shutdown.
//!
//! No protocol logic lives here. An interface whose capabilities suit QUIC (datagrams,
//! MTU ≥ 1200, ≥ 10 kbit/s, LAN/WAN latency) gets a [`P2pEndpoint`] with the node's
//! identity; the constrained engine for the other interfaces is a later workstream, so their
//! inbound frames are counted and logged.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;

use crate::config::NodeConfig;
use crate::identity::Identity;
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
    /// Frames received over the whole run on interfaces without a session engine.
    pub frames_received: u64,
    /// QUIC peers that connected over the whole run.
    pub quic_peers: u64,
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
                    pumps.push(tokio::spawn(pump(Arc::clone(&t), rx)));
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
    for t in open {
        // close joins plugin threads; keep it off the async workers.
        let name = t.interface().to_owned();
        match tokio::task::spawn_blocking(move || t.close()).await {
            Ok(Ok(())) => tracing::debug!(interface = %name, "closed"),
            Ok(Err(e)) => tracing::warn!(interface = %name, "{e}"),
            Err(e) => tracing::error!(interface = %name, "close task failed: {e}"),
        }
    }
    for p in pumps {
        if let Ok(n) = p.await {
            summary.frames_received += n;
        }
    }
    tracing::info!(frames = summary.frames_received, quic_peers = summary.quic_peers, "node stopped");
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

async fn pump(t: SharedTransport, rx: EventReceiver) -> u64 {
    let iface = t.interface().to_owned();
    let scheme = t.scheme().to_owned();
    let show = |peer: &antmesh_plugin_api::LinkAddr| match antmesh_plugin_api::TransportAddr::from_link(&scheme, peer) {
        Some(a) => a.to_string(),
        None => peer.to_string(),
    };
    let mut frames = 0u64;
    while let Ok(ev) = rx.recv().await {
        match ev {
            TransportEvent::Frames(batch) => {
                frames += batch.len() as u64;
                for (from, data) in &batch {
                    tracing::debug!(interface = %iface, from = %show(from), bytes = data.len(), "frame received");
                }
            }
            TransportEvent::LinkUp(peer) => tracing::info!(interface = %iface, peer = %show(&peer), "link up"),
            TransportEvent::LinkDown { peer, reason } => {
                tracing::info!(interface = %iface, peer = %show(&peer), %reason, "link down")
            }
            TransportEvent::Writable => tracing::trace!(interface = %iface, "writable"),
        }
    }
    frames
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
