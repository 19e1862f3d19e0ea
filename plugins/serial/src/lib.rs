//! antmesh serial transport plugin: frames over a serial device (or anything tty-like).
//!
//! The line is treated as a point-to-point link to one peer, named after the device path.
//! Frames are HDLC-like (flags, escapes, CRC-16, one type byte so keepalives can share the
//! line) or KISS (for TNCs). With HDLC keepalives the link state follows the peer; without
//! them it follows the device. A device that fails or hangs up is reopened with backoff,
//! since USB adapters come and go.
//!
//! See `docs/transports/serial.md` for the configuration and behaviour reference.

mod config;
mod device;

#[cfg(test)]
mod tests;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use abi_stable::std_types::RString;
use antmesh_plugin_api::{
    guard, Capabilities, Duplex, Framing, Host, LatencyClass, LinkAddr, LogLevel, PluginError, PluginErrorKind,
    Reliability, SendError, Transport,
};
use antmesh_plugin_kit::Outbox;

pub use config::Config;
use device::{open_port, run, Shared};
use antmesh_plugin_kit::link::{check_point_to_point, close_crew};
use antmesh_plugin_kit::sys::{Crew, StopSignal};

antmesh_plugin_api::export_transport! {
    name: "serial",
    description: "frames over a serial device (HDLC with CRC and keepalives, or KISS)",
    schemes: ["serial"],
    capabilities: capabilities(&config::defaults()),
    open: open_serial,
}

/// An open serial instance: one device, one peer.
pub struct SerialTransport {
    shared: Arc<Shared>,
    /// Held by a `close` from outside the instance's threads for as long as it waits for
    /// them, so that a second, concurrent `close` returns only when the first is done.
    closing: Mutex<()>,
    caps: Capabilities,
    local: String,
}

/// Opens an instance from its RON config: opens the device (failure is an `Io` error
/// naming the path; later reopen failures are only logged and retried) and starts its
/// threads.
pub fn open_serial(config: &str, host: Host) -> Result<SerialTransport, PluginError> {
    let cfg = Config::parse(config)?;
    let stop = Arc::new(StopSignal::new().map_err(|e| PluginError::io("creating the stop signal", &e))?);
    let port = open_port(&cfg).map_err(|msg| PluginError::new(PluginErrorKind::Io, msg))?;
    let caps = capabilities(&cfg);
    let local = cfg.address().to_string();
    let peer_name = RString::from(cfg.peer_name());
    // Every callback, the outbox's `writable` included, goes through the gate, so none
    // starts once `close` has begun, whichever thread it would come from.
    let host = stop.gate(host);
    let shared = Arc::new(Shared {
        peer: LinkAddr::Named(peer_name.clone()),
        peer_name,
        outbox: Outbox::new(cfg.queue_frames, host.clone()),
        host,
        // Open already: a `send` right after `open` returns is accepted.
        device_open: AtomicBool::new(true),
        stop,
        crew: Arc::new(Crew::new()),
        cfg,
    });
    let sh = Arc::clone(&shared);
    shared
        .crew
        .spawn("am-serial-rd", move || {
            if let Err(msg) = guard(|| run(&sh, port)) {
                sh.device_open.store(false, Ordering::SeqCst);
                sh.host.log(LogLevel::Error, &format!("serial device thread panicked: {msg}"));
            }
        })
        .map_err(|e| PluginError::io("starting the device thread", &e))?;
    Ok(SerialTransport { shared, closing: Mutex::new(()), caps, local })
}

fn capabilities(cfg: &Config) -> Capabilities {
    Capabilities {
        mtu: cfg.mtu,
        bitrate_bps: u64::from(cfg.baud),
        latency: match cfg.baud {
            b if b >= 115_200 => LatencyClass::Lan,
            b if b >= 9_600 => LatencyClass::Wan,
            _ => LatencyClass::Slow,
        },
        // A serial line has one peer, so a broadcast is simply a send to it.
        broadcast: true,
        duplex: Duplex::Full,
        reliability: Reliability::Lossy,
        framing: Framing::Stream,
        link_layer_acks: false,
        metered: false,
        power_constrained: false,
        peer_liveness: cfg.keepalive().is_some(),
    }
}

impl Transport for SerialTransport {
    fn capabilities(&self) -> Capabilities {
        self.caps
    }

    fn local_addresses(&self) -> Vec<String> {
        vec![self.local.clone()]
    }

    fn send(&self, to: &LinkAddr, frame: &[u8]) -> Result<(), SendError> {
        if self.shared.stop.is_set() {
            return Err(SendError::Closed);
        }
        check_point_to_point(to, &self.shared.peer_name, frame.len(), self.caps.mtu)?;
        if !self.shared.device_open.load(Ordering::SeqCst) {
            return Err(SendError::UnknownPeer(RString::from(format!("{} (device not open)", self.local))));
        }
        self.shared.outbox.push(frame.to_vec())
    }

    fn close(&self) -> Result<(), PluginError> {
        close_crew(&self.shared.stop, &self.shared.outbox, &self.shared.crew, &self.closing);
        Ok(())
    }
}

impl Drop for SerialTransport {
    fn drop(&mut self) {
        let _ = self.close();
    }
}
