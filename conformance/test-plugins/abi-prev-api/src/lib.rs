//! The antmesh native transport plugin contract.
//!
//! Read first: [`contract`] (what crosses the boundary), then [`export`] (how a plugin
//! author implements it safely), then [`addr`] and [`caps`].
//!
//! The contract is built on `abi_stable`: a plugin is a `cdylib` exporting one root module
//! ([`TransportModRef`]). The host checks at load time that the plugin was built against a
//! compatible version of this crate — this crate's semver *is* the ABI version
//! ([`ABI_VERSION`]) — and that every type crossing the boundary has the expected layout.
//!
//! Nothing async crosses the boundary: a plugin owns its own threads, reports inbound frames
//! and link events through the host-implemented [`HostHandle`], and its `send` never blocks
//! (it returns [`SendError::WouldBlock`] and later calls [`HostHandle::writable`]).

pub mod addr;
pub mod caps;
pub mod contract;
pub mod error;
pub mod export;
pub mod manifest;

pub use abi_stable;
pub use addr::{AddrParseError, IpPort, LinkAddr, TransportAddr};
pub use caps::{Capabilities, Duplex, Framing, LatencyClass, Reliability};
pub use contract::{
    BatchResult, HostHandle, HostHandleBox, HostHandle_TO, InFrame, LogLevel, OutFrame,
    PluginInfo, TransportInstance, TransportInstanceBox, TransportInstance_TO, TransportMod,
    TransportModRef,
};
pub use error::{PluginError, PluginErrorKind, SendError};
pub use export::{guard, Host, Transport};
pub use manifest::{ManifestError, PluginManifest};

/// A semantic version of the native plugin ABI.
#[repr(C)]
#[derive(abi_stable::StableAbi, Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AbiVersion {
    /// Incompatible changes.
    pub major: u32,
    /// Compatible additions.
    pub minor: u32,
    /// Fixes.
    pub patch: u32,
}

impl AbiVersion {
    /// Whether a plugin built against `plugin` can be loaded by a host speaking `self`.
    ///
    /// Cargo's rules, as abi_stable applies them: the major must match (for 0.y, the minor
    /// acts as the major), and the plugin must be at least as new as the host within it.
    pub const fn accepts(self, plugin: AbiVersion) -> bool {
        if self.major == 0 && plugin.major == 0 {
            self.minor == plugin.minor && self.patch <= plugin.patch
        } else {
            self.major == plugin.major && self.minor <= plugin.minor
        }
    }

    /// Parses `MAJOR.MINOR.PATCH` (no pre-release or build suffix).
    pub fn parse(s: &str) -> Option<AbiVersion> {
        let mut it = s.trim().split('.').map(|p| p.parse::<u32>().ok());
        let v = AbiVersion { major: it.next()??, minor: it.next()??, patch: it.next()?? };
        it.next().is_none().then_some(v)
    }
}

impl core::fmt::Display for AbiVersion {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

const fn parse_component(s: &[u8], mut i: usize) -> (u32, usize) {
    let mut v: u32 = 0;
    while i < s.len() && s[i] != b'.' {
        v = v * 10 + (s[i] - b'0') as u32;
        i += 1;
    }
    (v, i + 1)
}

const fn parse_pkg_version(s: &str) -> AbiVersion {
    let b = s.as_bytes();
    let (major, i) = parse_component(b, 0);
    let (minor, i) = parse_component(b, i);
    let (patch, _) = parse_component(b, i);
    AbiVersion { major, minor, patch }
}

/// The ABI version this copy of the contract speaks (this crate's package version).
pub const ABI_VERSION: AbiVersion = parse_pkg_version(env!("CARGO_PKG_VERSION"));
