//! The serial instance's configuration (RON) and its validation.

use std::time::Duration;

use antmesh_plugin_api::addr::DevicePath;
use antmesh_plugin_api::{PluginError, TransportAddr};
use antmesh_plugin_kit::FramingKind;
use serde::Deserialize;

/// One serial instance, as written in the node config.
///
/// ```ron
/// ( path: "/dev/ttyUSB0", baud: 115200, framing: Hdlc, mtu: 1024, queue_frames: 256,
///   keepalive_ms: Some(1000), dead_after_ms: 3500,
///   reopen_backoff_min_ms: 200, reopen_backoff_max_ms: 10000 )
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Absolute path of the device (a symlink such as `/dev/serial/by-id/…` is fine).
    pub path: String,
    /// Line rate in bits per second.
    #[serde(default = "default_baud")]
    pub baud: u32,
    /// `Hdlc` or `Kiss`. `Length` is refused: a serial line is noisy and a length-prefixed
    /// stream cannot resynchronise after a corrupted byte.
    #[serde(default = "default_framing")]
    pub framing: FramingKind,
    /// Largest frame accepted or delivered, in bytes.
    #[serde(default = "default_mtu")]
    pub mtu: u32,
    /// Outbound queue capacity in frames; `send` returns `WouldBlock` beyond it.
    #[serde(default = "default_queue_frames")]
    pub queue_frames: usize,
    /// Keepalive interval (HDLC only; `None` disables). KISS never sends keepalives: a TNC
    /// would put them on the air.
    #[serde(default = "default_keepalive_ms")]
    pub keepalive_ms: Option<u64>,
    /// With keepalives: the link is reported down after this long without a valid frame.
    #[serde(default = "default_dead_after_ms")]
    pub dead_after_ms: u64,
    /// First delay before reopening a failed device.
    #[serde(default = "default_reopen_backoff_min_ms")]
    pub reopen_backoff_min_ms: u64,
    /// Reopen delay ceiling.
    #[serde(default = "default_reopen_backoff_max_ms")]
    pub reopen_backoff_max_ms: u64,
}

/// The configuration every optional field defaults to, with an empty path; only used to
/// describe what a default instance declares (`PluginInfo::capabilities`).
pub(crate) fn defaults() -> Config {
    Config {
        path: String::new(),
        baud: default_baud(),
        framing: default_framing(),
        mtu: default_mtu(),
        queue_frames: default_queue_frames(),
        keepalive_ms: default_keepalive_ms(),
        dead_after_ms: default_dead_after_ms(),
        reopen_backoff_min_ms: default_reopen_backoff_min_ms(),
        reopen_backoff_max_ms: default_reopen_backoff_max_ms(),
    }
}

fn default_baud() -> u32 {
    115_200
}
fn default_framing() -> FramingKind {
    FramingKind::Hdlc
}
fn default_mtu() -> u32 {
    1024
}
fn default_queue_frames() -> usize {
    256
}
fn default_keepalive_ms() -> Option<u64> {
    Some(1000)
}
fn default_dead_after_ms() -> u64 {
    3500
}
fn default_reopen_backoff_min_ms() -> u64 {
    200
}
fn default_reopen_backoff_max_ms() -> u64 {
    10_000
}

impl Config {
    /// Parses and validates the RON text handed to `open`.
    pub fn parse(text: &str) -> Result<Config, PluginError> {
        let cfg: Config = antmesh_plugin_api::export::parse_config(text)?;
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<(), PluginError> {
        if !self.path.starts_with('/') || self.path.len() < 2 {
            return Err(PluginError::bad_config(format!("path must be an absolute device path, got `{}`", self.path)));
        }
        if self.path.contains('\0') {
            return Err(PluginError::bad_config("path must not contain NUL"));
        }
        if self.baud == 0 {
            return Err(PluginError::bad_config("baud must be at least 1"));
        }
        if self.framing == FramingKind::Length {
            return Err(PluginError::bad_config(
                "framing Length is not allowed on a serial line (it cannot resynchronise after noise); use Hdlc or Kiss",
            ));
        }
        if self.mtu == 0 {
            return Err(PluginError::bad_config("mtu must be at least 1"));
        }
        if self.queue_frames == 0 {
            return Err(PluginError::bad_config("queue_frames must be at least 1"));
        }
        if let Some(k) = self.keepalive() {
            if k.is_zero() {
                return Err(PluginError::bad_config("keepalive_ms must be at least 1 (or None)"));
            }
            if u128::from(self.dead_after_ms) <= k.as_millis() {
                return Err(PluginError::bad_config("dead_after_ms must be longer than keepalive_ms"));
            }
        }
        if self.reopen_backoff_min_ms == 0 || self.reopen_backoff_min_ms > self.reopen_backoff_max_ms {
            return Err(PluginError::bad_config("need 0 < reopen_backoff_min_ms <= reopen_backoff_max_ms"));
        }
        Ok(())
    }

    /// The keepalive interval actually used: only HDLC carries keepalives.
    pub fn keepalive(&self) -> Option<Duration> {
        match self.framing {
            FramingKind::Hdlc => self.keepalive_ms.map(Duration::from_millis),
            FramingKind::Kiss | FramingKind::Length => None,
        }
    }

    /// The canonical `serial://` address of the device (no parameters).
    pub fn address(&self) -> TransportAddr {
        TransportAddr::Serial(DevicePath { path: self.path.clone(), params: Vec::new() })
    }

    /// The peer's name as it appears in `LinkAddr::Named`: the canonical text after
    /// `serial://`, i.e. the (percent-encoded) path.
    pub fn peer_name(&self) -> String {
        let text = self.address().to_string();
        text.strip_prefix("serial://").map(str::to_owned).unwrap_or(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use antmesh_plugin_api::PluginErrorKind;

    #[test]
    fn defaults_apply() {
        let c = Config::parse(r#"(path: "/dev/ttyUSB0")"#).unwrap();
        assert_eq!((c.baud, c.framing, c.mtu, c.queue_frames), (115_200, FramingKind::Hdlc, 1024, 256));
        assert_eq!((c.keepalive_ms, c.dead_after_ms), (Some(1000), 3500));
        assert_eq!((c.reopen_backoff_min_ms, c.reopen_backoff_max_ms), (200, 10_000));
        assert_eq!(c.keepalive(), Some(Duration::from_secs(1)));
        assert_eq!(c.peer_name(), "/dev/ttyUSB0");
        assert_eq!(c.address().to_string(), "serial:///dev/ttyUSB0");
    }

    #[test]
    fn kiss_and_none_disable_keepalives() {
        let c = Config::parse(r#"(path: "/dev/x", framing: Kiss)"#).unwrap();
        assert_eq!(c.keepalive(), None);
        let c = Config::parse(r#"(path: "/dev/x", keepalive_ms: None)"#).unwrap();
        assert_eq!(c.keepalive(), None);
    }

    #[test]
    fn bad_configs_are_refused() {
        for (text, needle) in [
            (r#"(baud: 9600)"#, "path"),
            (r#"(path: "dev/x")"#, "absolute"),
            (r#"(path: "/dev/x", framing: Length)"#, "Length"),
            (r#"(path: "/dev/x", parity: Even)"#, "parity"),
            (r#"(path: "/dev/x", mtu: 0)"#, "mtu"),
            (r#"(path: "/dev/x", baud: 0)"#, "baud"),
            (r#"(path: "/dev/x", keepalive_ms: Some(0))"#, "keepalive_ms"),
            (r#"(path: "/dev/x", keepalive_ms: Some(1000), dead_after_ms: 900)"#, "dead_after_ms"),
            (r#"(path: "/dev/x", reopen_backoff_min_ms: 9, reopen_backoff_max_ms: 1)"#, "backoff"),
        ] {
            let e = Config::parse(text).unwrap_err();
            assert_eq!(e.kind, PluginErrorKind::BadConfig, "{text}");
            assert!(e.message.contains(needle), "{text}: {}", e.message);
        }
        let e = Config::parse("(\n  path: 3)").unwrap_err();
        assert!(e.message.starts_with("2:"), "{}", e.message);
    }
}
