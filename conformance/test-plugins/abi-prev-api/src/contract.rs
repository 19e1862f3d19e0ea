//! What crosses the native plugin boundary.
//!
//! ```text
//!  host                                   plugin (cdylib, owns its threads)
//!  ────                                   ──────
//!  TransportModRef::open(config, host) ─► TransportInstance
//!  instance.send / send_batch / close  ─► (never blocks: WouldBlock under backpressure)
//!  HostHandle::deliver / link_up /     ◄─ plugin threads
//!            link_down / writable / log
//! ```
//!
//! Stability: fields after `#[sabi(last_prefix_field)]` may be appended in minor versions;
//! anything else is a major (0.x: minor) bump of this crate.

// abi_stable's sabi_trait expansion defines impls inside a const block.
#![allow(non_local_definitions)]

use abi_stable::library::RootModule;
use abi_stable::sabi_types::VersionStrings;
use abi_stable::std_types::{RArc, RBox, ROption, RResult, RSlice, RStr, RString, RVec};
use abi_stable::{declare_root_module_statics, package_version_strings, sabi_trait, StableAbi};

use crate::addr::LinkAddr;
use crate::caps::Capabilities;
use crate::error::{PluginError, SendError};
use crate::AbiVersion;

/// What a plugin says about itself; the host shows it in `antmesh plugins`.
#[repr(C)]
#[derive(StableAbi, Debug, Clone, PartialEq, Eq)]
pub struct PluginInfo {
    /// Plugin name, e.g. `udp`. Interfaces in the node config refer to it.
    pub name: RString,
    /// The plugin's own version.
    pub version: RString,
    /// The plugin ABI version the plugin was compiled against.
    pub abi_version: AbiVersion,
    /// Address schemes the plugin serves, e.g. `["udp"]`.
    pub schemes: RVec<RString>,
    /// One line for operators.
    pub description: RString,
    /// What an instance opened with the plugin's default configuration declares (an
    /// instance's own capabilities depend on its configuration).
    pub capabilities: Capabilities,
}

/// An outbound frame in a batch.
#[repr(C)]
#[derive(StableAbi, Debug, Clone)]
pub struct OutFrame<'a> {
    /// Destination.
    pub to: LinkAddr,
    /// Payload; at most `Capabilities::mtu` bytes.
    pub data: RSlice<'a, u8>,
}

/// An inbound frame in a batch. Borrowed: the host copies what it keeps.
#[repr(C)]
#[derive(StableAbi, Debug, Clone)]
pub struct InFrame<'a> {
    /// Sender.
    pub from: LinkAddr,
    /// Payload.
    pub data: RSlice<'a, u8>,
}

/// Outcome of `send_batch`: frames are taken in order until one cannot be.
#[repr(C)]
#[derive(StableAbi, Debug, Clone, PartialEq, Eq)]
pub struct BatchResult {
    /// How many frames, from the start of the batch, were accepted.
    pub accepted: u32,
    /// Why frame number `accepted` was not (none if all were accepted).
    pub error: ROption<SendError>,
}

/// Log severity for [`HostHandle::log`].
#[repr(u8)]
#[derive(StableAbi, Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogLevel {
    /// Fine detail.
    Debug,
    /// Normal operation.
    Info,
    /// Something recoverable went wrong.
    Warn,
    /// Something failed.
    Error,
}

/// One open transport instance, implemented by the plugin.
#[sabi_trait]
pub trait TransportInstance: Send + Sync {
    /// The instance's declared capabilities; constant for its lifetime.
    fn capabilities(&self) -> Capabilities;

    /// The addresses peers can reach this instance at, in canonical text form.
    fn local_addresses(&self) -> RVec<RString>;

    /// Queues one frame for `to`. Never blocks.
    fn send(&self, to: &LinkAddr, frame: RSlice<'_, u8>) -> RResult<(), SendError>;

    /// Queues frames in order until one cannot be queued. Never blocks.
    fn send_batch(&self, frames: RSlice<'_, OutFrame<'_>>) -> BatchResult;

    /// Stops the instance: its threads exit, its descriptors close, and no host callback
    /// runs after this returns. Idempotent.
    #[sabi(last_prefix_field)]
    fn close(&self) -> RResult<(), PluginError>;
}

/// The owned trait object the host holds for an instance.
pub type TransportInstanceBox = TransportInstance_TO<'static, RBox<()>>;

/// Callbacks into the host, implemented by the host. Every method is cheap and thread-safe;
/// `deliver` may block briefly when the host is behind (that is the backpressure path for
/// inbound traffic).
#[sabi_trait]
pub trait HostHandle: Send + Sync + Clone {
    /// Hands received frames to the host.
    fn deliver(&self, frames: RSlice<'_, InFrame<'_>>);

    /// A peer became reachable (connection established, device opened, child started).
    fn link_up(&self, peer: &LinkAddr);

    /// A peer became unreachable, with a reason for operators.
    fn link_down(&self, peer: &LinkAddr, reason: RStr<'_>);

    /// The instance has room again after returning `WouldBlock`.
    fn writable(&self);

    /// A log line, routed into the host's `tracing` output with the instance's name.
    #[sabi(last_prefix_field)]
    fn log(&self, level: LogLevel, message: RStr<'_>);
}

/// The shareable trait object a plugin receives.
pub type HostHandleBox = HostHandle_TO<'static, RArc<()>>;

/// The root module every transport plugin exports.
#[repr(C)]
#[derive(StableAbi)]
#[sabi(kind(Prefix(prefix_ref = TransportModRef)))]
pub struct TransportMod {
    /// Describes the plugin.
    pub info: extern "C" fn() -> PluginInfo,

    /// Opens an instance from its RON configuration text.
    #[sabi(last_prefix_field)]
    pub open: extern "C" fn(config: RStr<'_>, host: HostHandleBox) -> RResult<TransportInstanceBox, PluginError>,
}

impl RootModule for TransportModRef {
    declare_root_module_statics! {TransportModRef}
    const BASE_NAME: &'static str = "antmesh_transport";
    const NAME: &'static str = "antmesh_transport";
    const VERSION_STRINGS: VersionStrings = package_version_strings!();
}
