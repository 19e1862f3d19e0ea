//! Errors that cross the plugin boundary. They are `abi_stable` types so a plugin built
//! with another compiler can return them; the host shows them as they are.

use abi_stable::std_types::RString;
use abi_stable::StableAbi;

/// Why a frame was not accepted by `send`.
#[repr(u8)]
#[derive(StableAbi, thiserror::Error, Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum SendError {
    /// The outbound queue is full; the plugin will call `HostHandle::writable` once it
    /// has room again. Nothing was queued.
    #[error("transport is busy (backpressure); retry after the writable event")]
    WouldBlock,
    /// The frame exceeds the instance's MTU. Nothing was sent.
    #[error("frame of {size} bytes exceeds the MTU of {mtu} bytes")]
    TooLarge {
        /// Size of the refused frame.
        size: u32,
        /// The instance's MTU.
        mtu: u32,
    },
    /// The address is not one this instance can reach.
    #[error("no route to peer {0} on this transport")]
    UnknownPeer(RString),
    /// The address kind does not belong to this transport (a name on UDP, say).
    #[error("address not usable on this transport: {0}")]
    BadAddress(RString),
    /// Broadcast was requested but the instance does not declare it.
    #[error("broadcast is not supported by this transport instance")]
    BroadcastUnsupported,
    /// The instance was closed, or disabled after a panic.
    #[error("transport instance is closed")]
    Closed,
    /// The operating system refused the send.
    #[error("I/O error: {0}")]
    Io(RString),
    /// The plugin panicked while sending; the instance is now disabled.
    #[error("plugin panicked in send: {0}")]
    Panicked(RString),
}

/// The category of a [`PluginError`].
#[repr(u8)]
#[derive(StableAbi, Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum PluginErrorKind {
    /// The instance configuration did not parse or was rejected.
    BadConfig,
    /// An operating system resource could not be opened or used.
    Io,
    /// The operation is not supported by this plugin.
    Unsupported,
    /// The plugin panicked; the instance is disabled.
    Panicked,
    /// The instance is closed.
    Closed,
}

impl core::fmt::Display for PluginErrorKind {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            PluginErrorKind::BadConfig => "bad instance config",
            PluginErrorKind::Io => "I/O error",
            PluginErrorKind::Unsupported => "unsupported",
            PluginErrorKind::Panicked => "plugin panicked",
            PluginErrorKind::Closed => "instance closed",
        })
    }
}

/// An error from `open` or `close`.
#[repr(C)]
#[derive(StableAbi, thiserror::Error, Debug, Clone, PartialEq, Eq)]
#[error("{kind}: {message}")]
pub struct PluginError {
    /// What went wrong.
    pub kind: PluginErrorKind,
    /// Human-readable detail (for a bad config: line and column).
    pub message: RString,
}

impl PluginError {
    /// Builds an error of `kind` with `message`.
    pub fn new(kind: PluginErrorKind, message: impl Into<String>) -> Self {
        PluginError { kind, message: RString::from(message.into()) }
    }

    /// A configuration error.
    pub fn bad_config(message: impl Into<String>) -> Self {
        Self::new(PluginErrorKind::BadConfig, message)
    }

    /// An I/O error with context.
    pub fn io(context: &str, err: &std::io::Error) -> Self {
        Self::new(PluginErrorKind::Io, format!("{context}: {err}"))
    }
}

impl SendError {
    /// Maps an I/O error from a non-blocking send.
    pub fn from_io(err: &std::io::Error) -> Self {
        if err.kind() == std::io::ErrorKind::WouldBlock {
            SendError::WouldBlock
        } else {
            SendError::Io(RString::from(err.to_string()))
        }
    }
}
