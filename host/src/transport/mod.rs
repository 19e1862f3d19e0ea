//! The host's single view of a transport instance, whatever its backend.
//!
//! Session engines and the router only ever see [`Transport`] and the [`TransportEvent`]
//! stream it produces. The native `abi_stable` backend ([`crate::plugin::native`]) is the
//! first implementation; a WASM component backend (sandboxed framing plugins over a byte
//! stream the host lends) implements the same trait and slots in beside it.

use std::sync::Arc;

use antmesh_plugin_api::{BatchResult, Capabilities, LinkAddr, OutFrame, PluginError, SendError, TransportAddr};

/// Something a transport instance reports to the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TransportEvent {
    /// Frames received, in arrival order.
    Frames(Vec<(LinkAddr, Vec<u8>)>),
    /// A peer became reachable.
    LinkUp(LinkAddr),
    /// A peer became unreachable.
    LinkDown {
        /// The peer.
        peer: LinkAddr,
        /// Why, for operators.
        reason: String,
    },
    /// The instance has room again after `WouldBlock`.
    Writable,
}

/// Why closing an instance failed.
#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum CloseError {
    /// The plugin reported an error (it is closed regardless).
    #[error("plugin reported an error while closing: {0}")]
    Plugin(PluginError),
}

/// An open transport instance as the host uses it.
pub trait Transport: Send + Sync {
    /// The interface name from the node config (used in logs and metrics).
    fn interface(&self) -> &str;

    /// The address scheme this instance serves, e.g. `udp`.
    fn scheme(&self) -> &str;

    /// Declared capabilities.
    fn capabilities(&self) -> Capabilities;

    /// Addresses peers can reach this instance at.
    fn local_addresses(&self) -> Vec<TransportAddr>;

    /// Queues one frame; never blocks.
    fn send(&self, to: &LinkAddr, frame: &[u8]) -> Result<(), SendError>;

    /// Queues frames in order until one cannot be queued; never blocks.
    fn send_batch(&self, frames: &[OutFrame<'_>]) -> BatchResult;

    /// Stops the instance; no event is produced after this returns. Idempotent.
    fn close(&self) -> Result<(), CloseError>;
}

/// A shared transport handle.
pub type SharedTransport = Arc<dyn Transport>;

/// The receiving end of an instance's events. Ends (returns `Err`) once the instance is
/// closed.
pub type EventReceiver = async_channel::Receiver<TransportEvent>;
