//! The native backend of [`Transport`]: an `abi_stable` instance plus the host handle that
//! turns its callbacks into [`TransportEvent`]s.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use abi_stable::sabi_trait::TD_Opaque;
use abi_stable::std_types::{RArc, RSlice, RSliceMut, RStr};
use antmesh_plugin_api::{
    BatchResult, Capabilities, HostHandle, HostHandle_TO, InFrame, LinkAddr, LogLevel, OutFrame, PluginError, RecvSlot,
    SendError, TransportAddr, TransportInstanceBox,
};

use super::loader::LoadedPlugin;
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

#[derive(Clone)]
struct ChannelHost {
    interface: Arc<str>,
    tx: async_channel::Sender<TransportEvent>,
}

impl ChannelHost {
    fn emit(&self, ev: TransportEvent) {
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
        match level {
            LogLevel::Debug => tracing::debug!(interface = iface, "{msg}"),
            LogLevel::Info => tracing::info!(interface = iface, "{msg}"),
            LogLevel::Warn => tracing::warn!(interface = iface, "{msg}"),
            LogLevel::Error => tracing::error!(interface = iface, "{msg}"),
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
        let host = ChannelHost { interface: Arc::from(interface), tx: tx.clone() };
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
        self.instance.send(to, RSlice::from_slice(frame)).into_result()
    }

    fn send_batch(&self, frames: &[OutFrame<'_>]) -> BatchResult {
        if self.closed.load(Ordering::Acquire) {
            return BatchResult { accepted: 0, error: abi_stable::std_types::ROption::RSome(SendError::Closed) };
        }
        self.instance.send_batch(RSlice::from_slice(frames))
    }

    fn recv_pull(&self, slots: &mut [RecvSlot<'_>]) -> Option<usize> {
        if self.closed.load(Ordering::Acquire) {
            return Some(0);
        }
        let n = slots.len();
        self.instance
            .recv_pull(RSliceMut::from_mut_slice(slots))
            .into_option()
            .map(|filled| (filled as usize).min(n))
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
