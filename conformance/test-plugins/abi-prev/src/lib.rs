//! A loopback transport built against the plugin contract as released at ABI 0.1.0, before
//! 0.1.1 added optional methods (`recv_pull`, `readable`). The host must load it, take its
//! frames through `deliver`, and see `recv_pull` answer with its default ("unsupported").

use abi_stable as _;
use antmesh_plugin_api::{
    Capabilities, Duplex, Framing, Host, LatencyClass, LinkAddr, PluginError, Reliability, SendError, Transport,
};

antmesh_plugin_api::export_transport! {
    name: "abi-prev",
    description: "loopback transport built against plugin ABI 0.1.0",
    schemes: ["pipe"],
    capabilities: caps(),
    open: open,
}

struct Loopback {
    host: Host,
}

fn open(_config: &str, host: Host) -> Result<Loopback, PluginError> {
    Ok(Loopback { host })
}

impl Transport for Loopback {
    fn capabilities(&self) -> Capabilities {
        caps()
    }

    fn local_addresses(&self) -> Vec<String> {
        vec!["pipe://loopback".to_owned()]
    }

    fn send(&self, to: &LinkAddr, frame: &[u8]) -> Result<(), SendError> {
        self.host.deliver_one(to.clone(), frame);
        Ok(())
    }

    fn close(&self) -> Result<(), PluginError> {
        Ok(())
    }
}

fn caps() -> Capabilities {
    Capabilities {
        mtu: 1500,
        bitrate_bps: 0,
        latency: LatencyClass::Lan,
        broadcast: false,
        duplex: Duplex::Full,
        reliability: Reliability::ReliableOrdered,
        framing: Framing::Datagram,
        link_layer_acks: false,
        metered: false,
        power_constrained: false,
        peer_liveness: false,
    }
}
