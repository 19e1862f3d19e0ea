//! antmesh pipe transport plugin: frames over a child process's stdin and stdout.
//!
//! The instance runs one configured command (`socat`, a radio bridge, an SSH session…)
//! and treats it as a point-to-point link to a single peer, `pipe://<name>`. Frames are
//! delimited on the byte streams by the kit's framings (length prefix by default). The
//! child is respawned with backoff when it exits; the link is up while a child runs.
//!
//! See `docs/transports/pipe.md` for the configuration and behaviour reference.

mod config;
mod supervisor;

#[cfg(test)]
mod tests;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use abi_stable::std_types::RString;
use antmesh_plugin_api::{
    guard, Capabilities, Duplex, Framing, Host, LatencyClass, LinkAddr, LogLevel, PluginError, Reliability,
    SendError, Transport, TransportAddr,
};
use antmesh_plugin_kit::{FramingKind, Outbox};

pub use config::Config;
use supervisor::{spawn_child, supervise, Session, Shared};
use antmesh_plugin_kit::link::{check_point_to_point, close_crew};
use antmesh_plugin_kit::sys::{Crew, StopSignal};

antmesh_plugin_api::export_transport! {
    name: "pipe",
    description: "frames over a child process's stdin/stdout (respawned with backoff)",
    schemes: ["pipe"],
    capabilities: capabilities(&config::defaults()),
    open: open_pipe,
}

/// An open pipe instance: one child process, one peer.
pub struct PipeTransport {
    shared: Arc<Shared>,
    /// Held by a `close` from outside the instance's threads for as long as it waits for
    /// them, so that a second, concurrent `close` returns only when the first is done.
    closing: Mutex<()>,
    caps: Capabilities,
    local: String,
}

/// Opens an instance from its RON config: spawns the child (a spawn failure is an `Io`
/// error here; later respawn failures are only logged and retried) and starts its threads.
pub fn open_pipe(config: &str, host: Host) -> Result<PipeTransport, PluginError> {
    let cfg = Config::parse(config)?;
    let stop = Arc::new(StopSignal::new().map_err(|e| PluginError::io("creating the stop signal", &e))?);
    let child = spawn_child(&cfg).map_err(|e| PluginError::io(&format!("spawning `{}`", cfg.command), &e))?;
    let caps = capabilities(&cfg);
    let local = TransportAddr::Pipe(cfg.name.clone()).to_string();
    // Every callback, the outbox's `writable` included, goes through the gate, so none
    // starts once `close` has begun, whichever thread it would come from.
    let host = stop.gate(host);
    let shared = Arc::new(Shared {
        peer_name: RString::from(cfg.peer_name()),
        peer: LinkAddr::Named(RString::from(cfg.peer_name())),
        outbox: Outbox::new(cfg.queue_frames, host.clone()),
        host,
        child_up: AtomicBool::new(false),
        stop,
        crew: Arc::new(Crew::new()),
        cfg,
    });
    let session = Session::start(&shared, child).map_err(|e| PluginError::io("starting the child's writer", &e))?;
    // Up before `open` returns, so a `send` right after it is accepted.
    shared.child_up.store(true, Ordering::SeqCst);
    let sh = Arc::clone(&shared);
    shared
        .crew
        .spawn("am-pipe-sup", move || {
            if let Err(msg) = guard(|| supervise(&sh, session)) {
                sh.child_up.store(false, Ordering::SeqCst);
                sh.host.log(LogLevel::Error, &format!("pipe supervisor thread panicked: {msg}"));
            }
        })
        .map_err(|e| {
            // The closure, and with it the session, is dropped: that kills and reaps the
            // child and stops its writer (the stop signal makes the writer quit at once).
            shared.stop.trigger();
            PluginError::io("starting the supervisor thread", &e)
        })?;
    Ok(PipeTransport { shared, closing: Mutex::new(()), caps, local })
}

fn capabilities(cfg: &Config) -> Capabilities {
    Capabilities {
        mtu: cfg.mtu,
        bitrate_bps: 0,
        latency: LatencyClass::Lan,
        // A pipe has exactly one peer, so a broadcast is simply a send to it.
        broadcast: true,
        duplex: Duplex::Full,
        // Only the length framing runs without a checksum over a lossless pipe; HDLC and
        // KISS drop frames they cannot parse, so they promise nothing.
        reliability: if cfg.framing == FramingKind::Length { Reliability::ReliableOrdered } else { Reliability::Lossy },
        framing: Framing::Stream,
        link_layer_acks: false,
        metered: false,
        power_constrained: false,
        peer_liveness: true,
    }
}

impl Transport for PipeTransport {
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
        if !self.shared.child_up.load(Ordering::SeqCst) {
            return Err(SendError::UnknownPeer(RString::from(format!("{} (child not running)", self.local))));
        }
        self.shared.outbox.push(frame.to_vec())
    }

    fn close(&self) -> Result<(), PluginError> {
        close_crew(&self.shared.stop, &self.shared.outbox, &self.shared.crew, &self.closing);
        Ok(())
    }
}

impl Drop for PipeTransport {
    fn drop(&mut self) {
        let _ = self.close();
    }
}
