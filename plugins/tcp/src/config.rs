//! The instance configuration: its RON shape, defaults and the checks `open` applies.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::Duration;

use antmesh_plugin_api::PluginError;
use serde::Deserialize;

/// Largest `mtu` accepted (16 MiB). Every connection may buffer one partial inbound frame of
/// up to `mtu` bytes, so this caps what a peer can make the instance hold per connection;
/// mesh frames are far smaller, so a larger value can only be a mistake.
pub const MAX_MTU: u32 = 16 * 1024 * 1024;

/// One tcp instance's settings, parsed from the interface's RON `config`.
///
/// ```ron
/// (
///   listen: Some("127.0.0.1:4242"),
///   connect: ["192.0.2.7:4242"],
///   mtu: 65535,
///   queue_frames: 1024,
///   backoff_min_ms: 100,
///   backoff_max_ms: 30000,
///   nodelay: true,
///   max_connections: 256,
///   max_connections_per_ip: 32,
///   frame_timeout_ms: 30000,
/// )
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Address to accept connections on; `None` makes the instance dial-only. Port 0 picks
    /// a free port (see `local_addresses` for the one chosen).
    pub listen: Option<SocketAddr>,
    /// Peers to dial at open and to redial, with backoff, whenever the connection is lost.
    pub connect: Vec<SocketAddr>,
    /// Largest frame payload in bytes, both ways: larger outbound frames are refused and a
    /// peer announcing a larger frame is disconnected. At most 16 MiB (`MAX_MTU`).
    pub mtu: u32,
    /// Frames each connection may queue before `send` returns `WouldBlock`.
    pub queue_frames: usize,
    /// First redial delay after a failed or lost outbound connection.
    pub backoff_min_ms: u64,
    /// Ceiling the redial delay doubles up to.
    pub backoff_max_ms: u64,
    /// Disable Nagle's algorithm: mesh frames are latency-sensitive and already batched.
    pub nodelay: bool,
    /// Connections open at once, accepted and dialled (including dials in progress). An
    /// accepted connection beyond it is closed at once; dials are never refused, as they are
    /// bounded by `connect`. Each connection costs a descriptor and up to `mtu` bytes of
    /// partial frame, so this is what keeps an unauthenticated listener from exhausting either.
    pub max_connections: usize,
    /// Accepted connections open at once from one IP address: one stranger cannot take all
    /// of `max_connections` and lock everyone else out. Dials are not counted.
    pub max_connections_per_ip: usize,
    /// A connection that stops sending in the middle of a frame for this long is dropped: it
    /// holds a buffer for a frame that may never complete. Idle connections between frames are
    /// not affected.
    pub frame_timeout_ms: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            // Listening is opt-in: opening a port on every interface should be a decision.
            listen: None,
            connect: Vec::new(),
            mtu: 65535,
            queue_frames: 1024,
            backoff_min_ms: 100,
            backoff_max_ms: 30_000,
            nodelay: true,
            max_connections: 256,
            max_connections_per_ip: 32,
            frame_timeout_ms: 30_000,
        }
    }
}

impl Config {
    /// Parses and validates `text`; every failure is a `BadConfig` error.
    pub fn parse(text: &str) -> Result<Config, PluginError> {
        let config: Config = antmesh_plugin_api::export::parse_config(text)?;
        config.validate()?;
        Ok(config)
    }

    /// Rejects settings that parse but cannot work.
    pub fn validate(&self) -> Result<(), PluginError> {
        if self.mtu == 0 {
            return Err(PluginError::bad_config("mtu must be at least 1 byte"));
        }
        if self.mtu > MAX_MTU {
            return Err(PluginError::bad_config(format!("mtu ({}) exceeds the maximum of {MAX_MTU} bytes", self.mtu)));
        }
        if self.listen.is_none() && self.connect.is_empty() {
            return Err(PluginError::bad_config(
                "nothing to do: set `listen`, a non-empty `connect`, or both",
            ));
        }
        if self.queue_frames == 0 {
            return Err(PluginError::bad_config("queue_frames must be at least 1"));
        }
        if self.backoff_min_ms == 0 {
            // A zero delay would redial an unreachable peer in a busy loop.
            return Err(PluginError::bad_config("backoff_min_ms must be at least 1"));
        }
        if self.backoff_min_ms > self.backoff_max_ms {
            return Err(PluginError::bad_config(format!(
                "backoff_min_ms ({}) exceeds backoff_max_ms ({})",
                self.backoff_min_ms, self.backoff_max_ms
            )));
        }
        if self.max_connections == 0 {
            return Err(PluginError::bad_config("max_connections must be at least 1"));
        }
        if self.max_connections_per_ip == 0 {
            return Err(PluginError::bad_config("max_connections_per_ip must be at least 1"));
        }
        if self.frame_timeout_ms == 0 {
            // Zero would drop every connection whose frame spans two reads.
            return Err(PluginError::bad_config("frame_timeout_ms must be at least 1"));
        }
        let mut seen = HashSet::new();
        for addr in &self.connect {
            // Connections are keyed by peer address, so one peer cannot have two dialers.
            if !seen.insert(addr) {
                return Err(PluginError::bad_config(format!("connect lists {addr} more than once")));
            }
        }
        Ok(())
    }

    /// `backoff_min_ms` as a duration.
    pub fn backoff_min(&self) -> Duration {
        Duration::from_millis(self.backoff_min_ms)
    }

    /// `frame_timeout_ms` as a duration.
    pub fn frame_timeout(&self) -> Duration {
        Duration::from_millis(self.frame_timeout_ms)
    }

    /// `backoff_max_ms` as a duration.
    pub fn backoff_max(&self) -> Duration {
        Duration::from_millis(self.backoff_max_ms)
    }
}
