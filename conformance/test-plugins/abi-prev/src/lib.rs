//! A loopback transport built against the plugin contract as released at ABI 0.1.0, before
//! 0.1.1 appended optional methods (`recv_pull`, `readable`). abi_stable cannot take it into a
//! 0.1.1 host (the host's vtables are longer), so the host must refuse it by version, saying
//! what to rebuild against.

include!("../../loopback.rs");

antmesh_plugin_api::export_transport! {
    name: "abi-prev",
    description: "loopback transport built against plugin ABI 0.1.0",
    schemes: ["pipe"],
    capabilities: caps(),
    open: open,
}
