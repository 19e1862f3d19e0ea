//! The pipe instance's configuration (RON) and its validation.

use antmesh_plugin_api::{PluginError, TransportAddr};
use antmesh_plugin_kit::FramingKind;
use serde::Deserialize;

/// One pipe instance, as written in the node config.
///
/// ```ron
/// ( name: "bridge", command: "socat", args: ["-", "UNIX-LISTEN:/tmp/x.sock"],
///   framing: Length, mtu: 65535, queue_frames: 1024,
///   respawn: true, backoff_min_ms: 200, backoff_max_ms: 30000 )
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The peer's name: the child is reachable as `pipe://<name>`.
    pub name: String,
    /// Program to run; looked up in `PATH` like a shell would.
    pub command: String,
    /// Arguments passed to `command`.
    #[serde(default)]
    pub args: Vec<String>,
    /// How frames are delimited on the child's stdin/stdout.
    #[serde(default = "default_framing")]
    pub framing: FramingKind,
    /// Largest frame accepted or delivered, in bytes.
    #[serde(default = "default_mtu")]
    pub mtu: u32,
    /// Outbound queue capacity in frames; `send` returns `WouldBlock` beyond it.
    #[serde(default = "default_queue_frames")]
    pub queue_frames: usize,
    /// Start the child again after it exits.
    #[serde(default = "default_respawn")]
    pub respawn: bool,
    /// First respawn delay.
    #[serde(default = "default_backoff_min_ms")]
    pub backoff_min_ms: u64,
    /// Respawn delay ceiling.
    #[serde(default = "default_backoff_max_ms")]
    pub backoff_max_ms: u64,
}

/// The configuration every optional field defaults to, with an empty name and command;
/// only used to describe what a default instance declares (`PluginInfo::capabilities`).
pub(crate) fn defaults() -> Config {
    Config {
        name: String::new(),
        command: String::new(),
        args: Vec::new(),
        framing: default_framing(),
        mtu: default_mtu(),
        queue_frames: default_queue_frames(),
        respawn: default_respawn(),
        backoff_min_ms: default_backoff_min_ms(),
        backoff_max_ms: default_backoff_max_ms(),
    }
}

fn default_framing() -> FramingKind {
    FramingKind::Length
}
fn default_mtu() -> u32 {
    65535
}
fn default_queue_frames() -> usize {
    1024
}
fn default_respawn() -> bool {
    true
}
fn default_backoff_min_ms() -> u64 {
    200
}
fn default_backoff_max_ms() -> u64 {
    30_000
}

impl Config {
    /// Parses and validates the RON text handed to `open`.
    pub fn parse(text: &str) -> Result<Config, PluginError> {
        let cfg: Config = antmesh_plugin_api::export::parse_config(text)?;
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<(), PluginError> {
        if self.name.is_empty() {
            return Err(PluginError::bad_config("name must not be empty"));
        }
        if self.command.is_empty() {
            return Err(PluginError::bad_config("command must not be empty"));
        }
        if self.mtu == 0 {
            return Err(PluginError::bad_config("mtu must be at least 1"));
        }
        if self.queue_frames == 0 {
            return Err(PluginError::bad_config("queue_frames must be at least 1"));
        }
        if self.backoff_min_ms == 0 || self.backoff_min_ms > self.backoff_max_ms {
            return Err(PluginError::bad_config("need 0 < backoff_min_ms <= backoff_max_ms"));
        }
        Ok(())
    }

    /// The peer's name as it appears in `LinkAddr::Named`: the canonical (percent-encoded)
    /// text after `pipe://`, so `TransportAddr::from_link` round-trips it.
    pub fn peer_name(&self) -> String {
        let text = TransportAddr::Pipe(self.name.clone()).to_string();
        text.strip_prefix("pipe://").map(str::to_owned).unwrap_or(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use antmesh_plugin_api::PluginErrorKind;

    #[test]
    fn defaults_apply() {
        let c = Config::parse(r#"(name: "b", command: "cat")"#).unwrap();
        assert_eq!(c.framing, FramingKind::Length);
        assert_eq!((c.mtu, c.queue_frames, c.respawn), (65535, 1024, true));
        assert_eq!((c.backoff_min_ms, c.backoff_max_ms), (200, 30_000));
        assert!(c.args.is_empty());
    }

    #[test]
    fn full_config_parses() {
        let c = Config::parse(
            r#"( name: "bridge", command: "socat", args: ["-", "UNIX-LISTEN:/tmp/x.sock"],
                 framing: Hdlc, mtu: 1500, queue_frames: 8, respawn: false,
                 backoff_min_ms: 10, backoff_max_ms: 20 )"#,
        )
        .unwrap();
        assert_eq!(c.framing, FramingKind::Hdlc);
        assert_eq!(c.args, vec!["-", "UNIX-LISTEN:/tmp/x.sock"]);
        assert_eq!((c.mtu, c.queue_frames, c.respawn), (1500, 8, false));
    }

    #[test]
    fn bad_configs_are_refused_with_position() {
        for (text, needle) in [
            (r#"(name: "b")"#, "command"),
            (r#"(name: "b", command: "cat", colour: 3)"#, "colour"),
            (r#"(name: "b", command: "cat", framing: Morse)"#, "Morse"),
            (r#"(name: "b", command: "cat", mtu: 0)"#, "mtu"),
            (r#"(name: "", command: "cat")"#, "name"),
            (r#"(name: "b", command: "cat", backoff_min_ms: 5, backoff_max_ms: 1)"#, "backoff"),
        ] {
            let e = Config::parse(text).unwrap_err();
            assert_eq!(e.kind, PluginErrorKind::BadConfig, "{text}");
            assert!(e.message.contains(needle), "{text}: {}", e.message);
        }
        let e = Config::parse("(name: \"b\",\n command: 7)").unwrap_err();
        assert!(e.message.starts_with("2:"), "{}", e.message);
    }

    #[test]
    fn peer_name_is_canonical() {
        let c = Config::parse(r#"(name: "radio bridge", command: "cat")"#).unwrap();
        assert_eq!(c.peer_name(), "radio%20bridge");
    }
}
