// The loopback transport both ABI test plugins are made of (each `include!`s it and exports
// it under its own name): ordinary code, whose only point is the contract version it is
// compiled against. Every frame sent is delivered back to the sender.

use abi_stable as _;
use antmesh_plugin_api::{
    Capabilities, Duplex, Framing, Host, LatencyClass, LinkAddr, PluginError, Reliability, SendError, Transport,
};

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
