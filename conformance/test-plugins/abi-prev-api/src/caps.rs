//! The capability descriptor every transport instance declares.
//!
//! Modelled on smoltcp's `DeviceCapabilities`: the host reads it to pick a session engine
//! (QUIC needs datagrams, MTU ≥ 1200, ≥ 10 kbit/s and RTT < 2 s; everything else gets the
//! constrained engine) and the conformance suite reads it to decide which checks apply.

use abi_stable::StableAbi;
use serde::{Deserialize, Serialize};

/// Expected round-trip class of the medium.
#[repr(u8)]
#[derive(StableAbi, Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum LatencyClass {
    /// Sub-millisecond to a few milliseconds (loopback, LAN, a local pipe).
    Lan,
    /// Tens to hundreds of milliseconds (the internet, overlays).
    Wan,
    /// Around a second or more (slow serial, packet radio, anonymity overlays).
    Slow,
    /// Many seconds (LoRa at high spreading factors, duty-cycled radios).
    VerySlow,
}

/// Whether both ends can transmit at once.
#[repr(u8)]
#[derive(StableAbi, Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Duplex {
    /// One transmitter at a time (radio).
    Half,
    /// Both directions at once.
    Full,
}

/// What the transport promises about delivery.
#[repr(u8)]
#[derive(StableAbi, Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Reliability {
    /// Frames may be lost, duplicated or reordered.
    Lossy,
    /// While the link is up, frames arrive exactly once, in order.
    ReliableOrdered,
}

/// The shape of the underlying medium (the host always sees whole frames).
#[repr(u8)]
#[derive(StableAbi, Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Framing {
    /// The medium carries datagrams natively.
    Datagram,
    /// The medium is a byte stream the plugin frames.
    Stream,
}

/// Everything the host and the conformance suite may rely on about an instance.
#[repr(C)]
#[derive(StableAbi, Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Capabilities {
    /// Largest frame `send` accepts, in bytes. Larger frames are refused, never truncated.
    pub mtu: u32,
    /// Nominal link rate in bits per second; 0 when unknown or unbounded.
    pub bitrate_bps: u64,
    /// Round-trip class.
    pub latency: LatencyClass,
    /// `LinkAddr::Broadcast` reaches every peer on the medium.
    pub broadcast: bool,
    /// Half or full duplex.
    pub duplex: Duplex,
    /// Delivery guarantee.
    pub reliability: Reliability,
    /// Datagram or framed stream.
    pub framing: Framing,
    /// The link layer acknowledges frames itself.
    pub link_layer_acks: bool,
    /// Traffic costs money or quota.
    pub metered: bool,
    /// Runs on batteries or a duty cycle: the host should keep chatter down.
    pub power_constrained: bool,
    /// The instance reports `link_up`/`link_down` for its peers (connection state, hangup,
    /// or a keepalive). Connectionless transports leave liveness to the session engine.
    pub peer_liveness: bool,
}

impl Capabilities {
    /// Whether the QUIC engine may run over this transport; otherwise the constrained
    /// engine is used.
    pub fn suits_quic(&self) -> bool {
        self.framing == Framing::Datagram
            && self.mtu >= 1200
            && (self.bitrate_bps == 0 || self.bitrate_bps >= 10_000)
            && matches!(self.latency, LatencyClass::Lan | LatencyClass::Wan)
    }
}
