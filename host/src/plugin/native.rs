//! The native backend of [`Transport`]: an `abi_stable` instance plus the host handle that
//! turns its callbacks into [`TransportEvent`]s.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use abi_stable::sabi_trait::TD_Opaque;
use abi_stable::std_types::{RArc, RSlice, RSliceMut, RStr};
use antmesh_plugin_api::{
    BatchResult, Capabilities, HostHandle, HostHandle_TO, InFrame, LinkAddr, LogLevel, OutFrame, PluginError, RecvSlot,
    SendError, TransportAddr, TransportInstanceBox,
};

use super::loader::LoadedPlugin;
use crate::log_budget::{log_limited, LogBudget};
use crate::transport::{CloseError, EventReceiver, FrameBatch, Transport, TransportEvent};

/// Events buffered per instance before `deliver` makes the plugin wait.
pub const EVENT_QUEUE: usize = 1024;

/// Why an instance could not be opened.
#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum OpenError {
    /// The plugin refused the configuration or could not open its resources.
    #[error("interface `{interface}` (plugin `{plugin}`): {source}")]
    Plugin {
        /// Interface name.
        interface: String,
        /// Plugin name.
        plugin: String,
        /// The plugin's error.
        source: PluginError,
    },
}

thread_local! {
    /// Set while this thread is inside a call from the host into a plugin.
    static IN_PLUGIN_CALL: Cell<bool> = const { Cell::new(false) };
}

/// Runs `f` (a call into the plugin) with [`IN_PLUGIN_CALL`] set.
fn plugin_call<T>(f: impl FnOnce() -> T) -> T {
    let outer = IN_PLUGIN_CALL.with(|c| c.replace(true));
    let r = f();
    IN_PLUGIN_CALL.with(|c| c.set(outer));
    r
}

#[derive(Clone)]
struct ChannelHost {
    interface: Arc<str>,
    tx: async_channel::Sender<TransportEvent>,
    /// Plugin log lines at info and above: traffic from strangers (connections accepted,
    /// garbage refused) must not flood the node's log.
    log_budget: Arc<Mutex<LogBudget>>,
    /// Events dropped because the plugin called back from inside a host call while the
    /// queue was full (waiting there would deadlock: the host is the one who drains it).
    reentrant_drops: Arc<AtomicU64>,
}

impl ChannelHost {
    fn emit(&self, ev: TransportEvent) {
        if IN_PLUGIN_CALL.with(Cell::get) {
            if self.tx.try_send(ev).is_err() && !self.tx.is_closed() {
                let n = self.reentrant_drops.fetch_add(1, Ordering::Relaxed) + 1;
                if n.is_power_of_two() {
                    tracing::warn!(interface = &*self.interface, dropped = n, "plugin delivered from inside a host call with the event queue full; events dropped");
                }
            }
            return;
        }
        // Blocks the plugin thread while the host is behind: that is inbound backpressure.
        // Fails only once the instance is closing, when the event no longer matters.
        let _ = self.tx.send_blocking(ev);
    }
}

impl HostHandle for ChannelHost {
    fn deliver(&self, frames: RSlice<'_, InFrame<'_>>) {
        let bytes = frames.iter().map(|f| f.data.len()).sum();
        let mut batch = FrameBatch::with_capacity(frames.len(), bytes);
        for f in frames.iter() {
            batch.push(f.from.clone(), f.data.as_slice());
        }
        self.emit(TransportEvent::Frames(batch));
    }

    fn link_up(&self, peer: &LinkAddr) {
        self.emit(TransportEvent::LinkUp(peer.clone()));
    }

    fn link_down(&self, peer: &LinkAddr, reason: RStr<'_>) {
        self.emit(TransportEvent::LinkDown { peer: peer.clone(), reason: reason.as_str().to_owned() });
    }

    fn writable(&self) {
        self.emit(TransportEvent::Writable);
    }

    fn readable(&self) {
        self.emit(TransportEvent::Readable);
    }

    fn log(&self, level: LogLevel, message: RStr<'_>) {
        let iface = &*self.interface;
        let msg = message.as_str();
        if matches!(level, LogLevel::Debug) {
            tracing::debug!(interface = iface, "{msg}");
            return;
        }
        let mut budget = self.log_budget.lock().unwrap_or_else(|p| p.into_inner());
        match level {
            LogLevel::Debug | LogLevel::Info => log_limited!(budget, info, interface = iface, "{msg}"),
            LogLevel::Warn => log_limited!(budget, warn, interface = iface, "{msg}"),
            LogLevel::Error => log_limited!(budget, error, interface = iface, "{msg}"),
        }
    }
}

/// An open native plugin instance.
pub struct NativeTransport {
    interface: String,
    scheme: String,
    caps: Capabilities,
    instance: TransportInstanceBox,
    tx: async_channel::Sender<TransportEvent>,
    closed: AtomicBool,
}

impl NativeTransport {
    /// Opens an instance of `plugin` named `interface` with the plugin's RON `config`.
    pub fn open(plugin: &LoadedPlugin, interface: &str, config: &str) -> Result<(Self, EventReceiver), OpenError> {
        let (tx, rx) = async_channel::bounded(EVENT_QUEUE);
        let host = ChannelHost {
            interface: Arc::from(interface),
            tx: tx.clone(),
            log_budget: Arc::new(Mutex::new(LogBudget::new(5.0, 50))),
            reentrant_drops: Arc::new(AtomicU64::new(0)),
        };
        let handle = HostHandle_TO::from_ptr(RArc::new(host), TD_Opaque);
        let instance = (plugin.module.open())(RStr::from_str(config), handle).into_result().map_err(|source| {
            OpenError::Plugin { interface: interface.to_owned(), plugin: plugin.name().to_owned(), source }
        })?;
        let caps = instance.capabilities();
        let scheme = plugin.info.schemes.first().map(|s| s.to_string()).unwrap_or_else(|| plugin.name().to_owned());
        Ok((
            NativeTransport { interface: interface.to_owned(), scheme, caps, instance, tx, closed: AtomicBool::new(false) },
            rx,
        ))
    }
}

impl Transport for NativeTransport {
    fn interface(&self) -> &str {
        &self.interface
    }

    fn scheme(&self) -> &str {
        &self.scheme
    }

    fn capabilities(&self) -> Capabilities {
        self.caps
    }

    fn local_addresses(&self) -> Vec<TransportAddr> {
        self.instance
            .local_addresses()
            .into_iter()
            .filter_map(|s| match s.parse::<TransportAddr>() {
                Ok(a) => Some(a),
                Err(e) => {
                    tracing::warn!(interface = %self.interface, "plugin reported unparseable address `{s}`: {e}");
                    None
                }
            })
            .collect()
    }

    fn send(&self, to: &LinkAddr, frame: &[u8]) -> Result<(), SendError> {
        if self.closed.load(Ordering::Acquire) {
            return Err(SendError::Closed);
        }
        plugin_call(|| self.instance.send(to, RSlice::from_slice(frame)).into_result())
    }

    fn send_batch(&self, frames: &[OutFrame<'_>]) -> BatchResult {
        if self.closed.load(Ordering::Acquire) {
            return BatchResult { accepted: 0, error: abi_stable::std_types::ROption::RSome(SendError::Closed) };
        }
        plugin_call(|| self.instance.send_batch(RSlice::from_slice(frames)))
    }

    fn recv_pull(&self, slots: &mut [RecvSlot<'_>]) -> Option<usize> {
        if self.closed.load(Ordering::Acquire) {
            return Some(0);
        }
        let n = slots.len();
        plugin_call(|| self.instance.recv_pull(RSliceMut::from_mut_slice(slots)).into_option().map(|filled| (filled as usize).min(n)))
    }

    fn close(&self) -> Result<(), CloseError> {
        if self.closed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        // Close the channel first so plugin threads blocked in `deliver` return and the
        // plugin can join them.
        self.tx.close();
        self.instance.close().into_result().map_err(CloseError::Plugin)
    }
}

impl Drop for NativeTransport {
    fn drop(&mut self) {
        if let Err(e) = Transport::close(self) {
            tracing::warn!(interface = %self.interface, "{e}");
        }
    }
}
