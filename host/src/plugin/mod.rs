//! Native transport plugins: discovery and checks ([`loader`]) and the adapter that turns
//! an `abi_stable` instance into the host's [`crate::transport::Transport`] ([`native`]).
//!
//! Native libraries are never unloaded (`dlclose` of Rust code with thread-locals is not
//! safe); "reloading" a native plugin means loading a new library file beside the old one,
//! or restarting the node.

pub mod loader;
pub mod native;

pub use loader::{default_plugin_dir, LoadedPlugin, PluginLoadError, PluginSet};
pub use native::{NativeTransport, OpenError};
