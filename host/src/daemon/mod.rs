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

pub mod control;
pub mod hub;
pub mod inbox;
pub mod link;
pub mod persist;

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, Notify};

use crate::config::NodeConfig;
use crate::identity::{Identity, PeerId};
use crate::log_budget::{log_limited, LogBudget};
use crate::link::{LinkConfig, LinkEngine};
use crate::plugin::loader::{self, PluginDirError};
use crate::plugin::NativeTransport;
use crate::quic::endpoint::{P2pConfig, P2pEndpoint, P2pEvent};
use crate::transport::{SharedTransport, Transport};

use self::hub::{HubConfig, HubInbox, NeighbourKey, NeighbourTx, QuicWriter, SessionEvent, MSG_MESH};
use self::inbox::InboxLimits;
use self::link::{run_link, HubLink};

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
    /// The control socket could not be served.
    #[error(transparent)]
    Control(#[from] control::ControlError),
    /// The data directory could not be created.
    #[error("data directory {path}: {source}")]
    DataDir {
        /// The directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Interfaces were configured but none could be opened.
    #[error("none of the {configured} configured interfaces could be opened (see the errors above)")]
    NoInterfaces {
        /// How many were enabled.
        configured: usize,
    },
    /// A task the node cannot run without (the mesh hub, an interface driver, the control
    /// socket) ended or panicked: the node stopped rather than run without it.
    #[error("the {0} stopped unexpectedly; the node shut down")]
    TaskStopped(String),
}

/// Watches the tasks the node cannot run without. Each holds a [`TaskGuard`]; a guard
/// dropped before shutdown began (the task returned early, or panicked and unwound) sends
/// the task's name, and the node stops.
struct Watchdog {
    tx: mpsc::UnboundedSender<String>,
    rx: mpsc::UnboundedReceiver<String>,
    stopping: Arc<std::sync::atomic::AtomicBool>,
}

struct TaskGuard {
    name: String,
    tx: mpsc::UnboundedSender<String>,
    stopping: Arc<std::sync::atomic::AtomicBool>,
}

impl Drop for TaskGuard {
    fn drop(&mut self) {
        if !self.stopping.load(std::sync::atomic::Ordering::Acquire) {
            let _ = self.tx.send(std::mem::take(&mut self.name));
        }
    }
}

impl Watchdog {
    fn new() -> Watchdog {
        let (tx, rx) = mpsc::unbounded_channel();
        Watchdog { tx, rx, stopping: Arc::new(std::sync::atomic::AtomicBool::new(false)) }
    }

    /// Spawns `task` as a critical task named `name`.
    fn spawn<T: Send + 'static>(&self, name: String, task: impl Future<Output = T> + Send + 'static) -> tokio::task::JoinHandle<T> {
        let guard = TaskGuard { name, tx: self.tx.clone(), stopping: Arc::clone(&self.stopping) };
        tokio::spawn(async move {
            let _guard = guard;
            task.await
        })
    }

    /// The name of the first critical task that ended early.
    async fn died(&mut self) -> String {
        self.rx.recv().await.unwrap_or_default()
    }

    /// From now on tasks end because they are told to.
    fn stand_down(&self) {
        self.stopping.store(true, std::sync::atomic::Ordering::Release);
    }
}

/// The data directory's lock file: held (flock) for the node's life, so that a second node
/// started on the same directory fails at once, and a crashed node's socket can be
/// replaced without a race.
pub const LOCK_NAME: &str = "lock";

/// Creates the data directory owner-only (0700) if missing, warns if an existing one is
/// open to others, and takes its lock.
fn prepare_data_dir(d: &std::path::Path) -> Result<std::fs::File, UpError> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
    let io = |source| UpError::DataDir { path: d.to_path_buf(), source };
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(d).map_err(io)?;
    let mode = std::fs::metadata(d).map_err(io)?.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        tracing::warn!(dir = %d.display(), mode = format!("{mode:04o}"), "the data directory is open to other users (the mesh store is inside); chmod 700 it");
    }
    let lock = std::fs::OpenOptions::new().create(true).truncate(false).write(true).mode(0o600).open(d.join(LOCK_NAME)).map_err(io)?;
    use std::os::fd::AsRawFd;
    // SAFETY: flock on a descriptor this function owns.
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let e = std::io::Error::last_os_error();
        if e.kind() == std::io::ErrorKind::WouldBlock {
            return Err(UpError::Control(control::ControlError::InUse(d.to_path_buf())));
        }
        return Err(io(e));
    }
    Ok(lock)
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
    /// Destinations with a path at exit.
    pub paths: usize,
    /// End-to-end links established over the mesh.
    pub e2e_sessions: u64,
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
    // Only the plugins the configuration uses: opening a library runs its code.
    let mut names: Vec<&str> = cfg.interfaces.iter().filter(|i| i.enabled).map(|i| i.plugin.as_str()).collect();
    names.sort_unstable();
    names.dedup();
    let set = loader::load_named(&dir, &names)?;
    for p in &set.plugins {
        tracing::info!(plugin = p.name(), version = %p.info.version, abi = %p.info.abi_version, file = %p.path.display(), "plugin loaded");
    }
    for e in &set.errors {
        tracing::error!("plugin refused: {e}");
    }

    // The data directory holds the mesh store and the control socket; its lock keeps a
    // second node off it.
    let data_dir = cfg.data_dir.clone().or_else(crate::identity::default_data_dir);
    let _lock = match &data_dir {
        Some(d) => Some(prepare_data_dir(d)?),
        None => None,
    };
    let listener = match &data_dir {
        Some(d) => {
            let path = d.join(control::SOCKET_NAME);
            let listener = control::bind(&path).await?;
            tracing::info!(socket = %path.display(), "control socket");
            Some((path, listener))
        }
        None => None,
    };
    let inbox: Arc<HubInbox> = Arc::new(inbox::Inbox::new(InboxLimits::default()));
    let (control_tx, control_rx) = mpsc::channel(hub::CONTROL_QUEUE);
    let hub_stop = Arc::new(Notify::new());
    let hub_cfg = HubConfig {
        store: data_dir.as_ref().filter(|_| cfg.mesh.persist).map(|d| d.join("mesh.redb")),
        announce_interval: Duration::from_secs(cfg.mesh.announce_interval_secs),
        // A crash loses at most the last two seconds of path changes.
        save_interval: Duration::from_secs(2),
    };
    let mut watchdog = Watchdog::new();
    let hub_task = watchdog.spawn("mesh hub".into(), hub::run(Arc::clone(&identity), hub_cfg, Arc::clone(&inbox), control_rx, Arc::clone(&hub_stop)));
    let control_task = listener.map(|(path, l)| (path, watchdog.spawn("control socket".into(), control::serve(l, control_tx.clone()))));
    drop(control_tx);

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
                    let mut pc = P2pConfig::mesh_node(Arc::clone(&identity), bind);
                    iface.quic.apply(&mut pc.admission);
                    let ep = match P2pEndpoint::with_transport(pc, Arc::clone(&t), rx) {
                        Ok(ep) => Arc::new(ep),
                        Err(source) => {
                            // Refused like any interface that does not open; the others run.
                            let e = UpError::Quic { interface: iface.name.clone(), source };
                            tracing::error!("{e}");
                            summary.failed.push((iface.name.clone(), e.to_string()));
                            let _ = tokio::task::spawn_blocking(move || t.close()).await;
                            continue;
                        }
                    };
                    tracing::info!(interface = %iface.name, peer_id = %ep.peer_id(), "QUIC endpoint up");
                    watchers.push(watchdog.spawn(format!("QUIC driver of `{}`", iface.name), watch_quic(iface.name.clone(), Arc::clone(&ep), Arc::clone(&inbox))));
                    for c in &iface.connect {
                        watchers.push(tokio::spawn(keep_dialled(iface.name.clone(), Arc::clone(&ep), c.addr().to_owned(), c.peer())));
                    }
                    endpoints.push((iface.name.clone(), ep));
                } else {
                    if !iface.connect.is_empty() {
                        tracing::warn!(interface = %iface.name, "`connect` is for QUIC interfaces; a constrained interface reaches the peers its transport reports");
                    }
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
                    let stop = Arc::new(Notify::new());
                    let (command_tx, commands) = mpsc::channel(hub::LINK_COMMAND_QUEUE);
                    let hub_link = HubLink { inbox: Arc::clone(&inbox), commands, command_tx };
                    pumps.push((
                        Arc::clone(&stop),
                        watchdog.spawn(format!("link driver of `{}`", iface.name), run_link(Arc::clone(&t), rx, engine, iface.link.clone(), stop, hub_link)),
                    ));
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
    let outcome = if summary.opened.is_empty() && !enabled.is_empty() {
        Err(UpError::NoInterfaces { configured: enabled.len() })
    } else {
        tracing::info!(interfaces = summary.opened.len(), peer_id = %identity.peer_id(), "node up");
        tokio::select! {
            () = shutdown => Ok(()),
            name = watchdog.died() => {
                let e = UpError::TaskStopped(name);
                tracing::error!("{e}");
                Err(e)
            }
        }
    };
    watchdog.stand_down();
    tracing::info!("shutting down");
    if let Some((_, task)) = &control_task {
        task.abort();
    }
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
    hub_stop.notify_one();
    inbox.close();
    if let Ok(h) = hub_task.await {
        summary.paths = h.paths;
        summary.e2e_sessions = h.e2e_sessions;
    }
    // Only once the store is saved and closed may another node take the directory.
    if let Some((path, _)) = control_task {
        let _ = std::fs::remove_file(path);
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
        paths = summary.paths,
        e2e_sessions = summary.e2e_sessions,
        "node stopped"
    );
    outcome.map(|()| summary)
}

/// Connects a QUIC interface to the mesh hub: authenticated peers become neighbours, mesh
/// messages go to the hub, and what happens is logged. Runs until the endpoint closes.
///
/// Connection events come from a broadcast, which a burst of messages can overrun; after
/// a lag the set of neighbours is rebuilt from the endpoint's connections, so no
/// neighbour is left up (or down) by a lost event.
pub async fn watch_quic(iface: String, ep: Arc<P2pEndpoint>, inbox: Arc<HubInbox>) {
    let mut events = ep.subscribe();
    let key = |peer| NeighbourKey { iface: iface.clone(), peer, addr: None };
    // Peers announced to the hub: a message can be read before its connection's event.
    let mut up = std::collections::HashSet::new();
    let neighbour_up = |peer| SessionEvent::Up { compact: false, cost: 1, announce_rate: 0, tx: NeighbourTx::Quic(QuicWriter::spawn(Arc::clone(&ep), peer)) };
    let (mut peer_log, mut message_log) = (LogBudget::remote(), LogBudget::remote());
    let mut packet = |up: &mut std::collections::HashSet<PeerId>, peer: PeerId, data: &[u8]| {
        let Some((&MSG_MESH, packet)) = data.split_first() else {
            log_limited!(message_log, info, interface = %iface, from = %peer, bytes = data.len(), "message received (not mesh; ignored)");
            return;
        };
        if up.insert(peer) {
            inbox.push_event(key(peer), neighbour_up(peer));
        }
        if !inbox.push_packet(key(peer), packet.to_vec()) {
            tracing::trace!(interface = %iface, %peer, "mesh packet dropped: the hub's queue for this peer is full");
        }
    };
    loop {
        tokio::select! {
            ev = events.recv() => match ev {
                Ok(P2pEvent::PeerConnected { peer, addr, side }) => {
                    log_limited!(peer_log, info, interface = %iface, %peer, %addr, ?side, "peer connected");
                    if up.insert(peer) {
                        inbox.push_event(key(peer), neighbour_up(peer));
                    }
                }
                Ok(P2pEvent::PeerAuthenticated { peer }) => tracing::debug!(interface = %iface, %peer, "peer authenticated (ML-DSA-65)"),
                Ok(P2pEvent::PeerDisconnected { peer, reason }) => {
                    log_limited!(peer_log, info, interface = %iface, %peer, ?reason, "peer disconnected");
                    if up.remove(&peer) {
                        inbox.push_event(key(peer), SessionEvent::Down);
                    }
                }
                Ok(P2pEvent::DataReceived { .. }) => {}
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    let now: std::collections::HashSet<PeerId> = ep.connected_peers().into_iter().collect();
                    let gone: Vec<PeerId> = up.difference(&now).copied().collect();
                    let new: Vec<PeerId> = now.difference(&up).copied().collect();
                    tracing::debug!(interface = %iface, skipped = n, gone = gone.len(), new = new.len(), "QUIC events lagged; neighbours resynchronised");
                    for peer in gone {
                        up.remove(&peer);
                        inbox.push_event(key(peer), SessionEvent::Down);
                    }
                    for peer in new {
                        up.insert(peer);
                        inbox.push_event(key(peer), neighbour_up(peer));
                    }
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            },
            dg = ep.recv_datagram() => match dg {
                Ok((peer, data)) => packet(&mut up, peer, &data),
                Err(_) => return,
            },
            msg = ep.recv() => match msg {
                Ok((peer, data)) => packet(&mut up, peer, &data),
                Err(_) => return,
            },
        }
    }
}

/// Dials `addr` (requiring `expected`, when pinned) and dials again whenever the
/// connection is gone (backing off to a minute).
async fn keep_dialled(iface: String, ep: Arc<P2pEndpoint>, addr: String, expected: Option<PeerId>) {
    let Ok(target) = addr.parse::<antmesh_plugin_api::TransportAddr>() else { return };
    let mut backoff = Duration::from_millis(250);
    let mut peer = None;
    loop {
        // Checking the connection is cheap; dialling backs off on failure up to a minute.
        let wait = if peer.is_some_and(|p| ep.is_connected(&p)) {
            Duration::from_secs(2)
        } else {
            match ep.connect_transport(&target, expected).await {
                Ok(p) => {
                    tracing::info!(interface = %iface, %addr, peer = %p, "dialled");
                    peer = Some(p);
                    backoff = Duration::from_millis(250);
                    Duration::from_secs(2)
                }
                Err(e) => {
                    tracing::debug!(interface = %iface, %addr, "dial failed: {e}");
                    backoff = (backoff * 2).min(Duration::from_secs(60));
                    backoff
                }
            }
        };
        tokio::time::sleep(wait).await;
    }
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

#[cfg(test)]
mod tests {
    use super::Watchdog;
    use std::time::Duration;

    #[tokio::test]
    async fn a_critical_task_that_panics_or_returns_early_is_reported_and_one_told_to_stop_is_not() {
        let mut w = Watchdog::new();
        let _forever = w.spawn("idle".into(), std::future::pending::<()>());
        #[allow(clippy::panic)]
        drop(w.spawn("panicky".into(), async { panic!("boom") }));
        let name = tokio::time::timeout(Duration::from_secs(5), w.died()).await.unwrap_or_default();
        assert_eq!(name, "panicky");
        drop(w.spawn("quitter".into(), async {}));
        let name = tokio::time::timeout(Duration::from_secs(5), w.died()).await.unwrap_or_default();
        assert_eq!(name, "quitter");
        w.stand_down();
        let done = w.spawn("told to stop".into(), async {});
        let _ = done.await;
        assert!(tokio::time::timeout(Duration::from_millis(100), w.died()).await.is_err(), "a task ending after stand_down is not a death");
    }
}
