//! A UDP-scheme transport whose `send` and `recv_pull` panic. Everything else behaves, so
//! the host can open it, and the panic surfaces exactly where a buggy plugin's would.

use abi_stable as _;
use antmesh_plugin_api::{
    Capabilities, Duplex, Framing, Host, LatencyClass, LinkAddr, PluginError, RecvSlot, Reliability, SendError,
    Transport,
};

antmesh_plugin_api::export_transport! {
    name: "panicking",
    description: "test plugin: send and recv_pull panic",
    schemes: ["udp"],
    capabilities: caps(),
    open: open,
}

struct Panicking {
    _host: Host,
}

// Accepts any config at all: another defect the suite must catch.
fn open(_config: &str, host: Host) -> Result<Panicking, PluginError> {
    Ok(Panicking { _host: host })
}

impl Transport for Panicking {
    fn capabilities(&self) -> Capabilities {
        caps()
    }

    fn local_addresses(&self) -> Vec<String> {
        vec!["udp://127.0.0.1:9".to_owned()]
    }

    #[allow(clippy::panic)]
    fn send(&self, _to: &LinkAddr, _frame: &[u8]) -> Result<(), SendError> {
        panic!("deliberate panic in send")
    }

    #[allow(clippy::panic)]
    fn recv_pull(&self, _slots: &mut [RecvSlot<'_>]) -> Option<usize> {
        panic!("deliberate panic in recv_pull")
    }

    fn close(&self) -> Result<(), PluginError> {
        Ok(())
    }
}

fn caps() -> Capabilities {
    Capabilities {
        mtu: 1200,
        bitrate_bps: 0,
        latency: LatencyClass::Lan,
        broadcast: false,
        duplex: Duplex::Full,
        reliability: Reliability::Lossy,
        framing: Framing::Datagram,
        link_layer_acks: false,
        metered: false,
        power_constrained: false,
        peer_liveness: false,
    }
}
