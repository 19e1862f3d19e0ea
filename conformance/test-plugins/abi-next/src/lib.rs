//! A loopback transport built against the next major plugin ABI. Its code is ordinary; the
//! point is the version it was compiled against, which the host must refuse at load time.

include!("../../loopback.rs");

antmesh_plugin_api::export_transport! {
    name: "abi-next",
    description: "loopback transport built against plugin ABI 1.0.0",
    schemes: ["pipe"],
    capabilities: caps(),
    open: open,
}
