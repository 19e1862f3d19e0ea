//! The thin tokio layer behind `antmesh up`: load plugins, open the configured interfaces,
//! pump their events, and close everything on shutdown.
//!
//! No protocol logic lives here. Today inbound frames are counted and logged; the session
//! engines and the router consume the same event streams as they land.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;

use crate::config::NodeConfig;
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
    /// Frames received over the whole run.
    pub frames_received: u64,
}

/// Runs a node until `shutdown` resolves.
pub async fn run(
    cfg: NodeConfig,
    plugin_dir: Option<PathBuf>,
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
                pumps.push(tokio::spawn(pump(Arc::clone(&t), rx)));
                open.push(t);
                summary.opened.push(iface.name.clone());
            }
            Err(e) => {
                tracing::error!("{e}");
                summary.failed.push((iface.name.clone(), e.to_string()));
            }
        }
    }
    if open.is_empty() && !enabled.is_empty() {
        return Err(UpError::NoInterfaces { configured: enabled.len() });
    }
    tracing::info!(interfaces = open.len(), "node up");

    shutdown.await;
    tracing::info!("shutting down");
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
    tracing::info!(frames = summary.frames_received, "node stopped");
    Ok(summary)
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
