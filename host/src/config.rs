//! The node configuration (RON).
//!
//! ```ron
//! (
//!     plugin_dir: None,            // default: the directory of the antmesh executable
//!     log: "info",                 // tracing filter; RUST_LOG overrides
//!     interfaces: [
//!         (name: "udp0", plugin: "udp", config: r#"(bind: "0.0.0.0:4242")"#),
//!     ],
//! )
//! ```
//! Each interface's `config` is the plugin's own RON, passed through verbatim, so a plugin
//! reports its errors with positions inside that string.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The embedded default configuration (`config/default.ron`).
pub const DEFAULT_CONFIG: &str = include_str!("../../config/default.ron");

fn default_true() -> bool {
    true
}

fn default_log() -> String {
    "info".to_owned()
}

/// A whole node configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// Where plugin libraries are loaded from.
    #[serde(default)]
    pub plugin_dir: Option<PathBuf>,
    /// The identity key file (default: `$ANTMESH_HOME/identity.key`, else the XDG data
    /// directory's `antmesh/identity.key`).
    #[serde(default)]
    pub identity: Option<PathBuf>,
    /// Where the node keeps its state (mesh store, control socket): default
    /// `$ANTMESH_HOME`, else `$XDG_DATA_HOME/antmesh`, else `~/.local/share/antmesh`.
    #[serde(default)]
    pub data_dir: Option<PathBuf>,
    /// tracing filter directive, e.g. `info` or `antmesh_host=debug`.
    #[serde(default = "default_log")]
    pub log: String,
    /// Mesh settings.
    #[serde(default)]
    pub mesh: MeshSettings,
    /// Transport interfaces to open.
    #[serde(default)]
    pub interfaces: Vec<InterfaceConfig>,
}

/// One transport interface.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InterfaceConfig {
    /// Unique name used in logs and the CLI.
    pub name: String,
    /// Which plugin provides it (the name `antmesh plugins` shows).
    pub plugin: String,
    /// Whether to open it.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// The plugin's instance configuration, RON text.
    #[serde(default = "empty_unit")]
    pub config: String,
    /// Peers to dial and keep dialled on this interface (QUIC interfaces), as transport
    /// addresses, e.g. `udp://192.0.2.7:4242`, or with the PeerId the peer must prove:
    /// `(addr: "udp://192.0.2.7:4242", peer: "3f…")`. Nothing else needs to be configured:
    /// beyond its neighbours a node learns destinations from announces.
    #[serde(default)]
    pub connect: Vec<ConnectEntry>,
    /// Limits of a QUIC interface on inbound connections (unset: the defaults).
    #[serde(default)]
    pub quic: QuicSettings,
    /// Settings of the constrained link engine, for interfaces below the QUIC bar.
    /// Unset fields keep the defaults the engine derives from the transport's MTU and rate.
    #[serde(default)]
    pub link: LinkSettings,
}

/// A peer to keep dialled: an address, optionally with the PeerId it must prove.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ConnectEntry {
    /// Whoever answers at the address.
    Addr(String),
    /// Only the peer with this PeerId (hex); anyone else is refused in the handshake.
    Pinned {
        /// The transport address.
        addr: String,
        /// The PeerId, 64 hex characters.
        peer: String,
    },
}

impl ConnectEntry {
    /// The address text.
    pub fn addr(&self) -> &str {
        match self {
            ConnectEntry::Addr(a) | ConnectEntry::Pinned { addr: a, .. } => a,
        }
    }

    /// The pinned PeerId (validated by [`NodeConfig::parse`]).
    pub fn peer(&self) -> Option<crate::identity::PeerId> {
        match self {
            ConnectEntry::Addr(_) => None,
            ConnectEntry::Pinned { peer, .. } => peer.parse().ok(),
        }
    }
}

/// Operator overrides of a QUIC interface's inbound limits (docs/operator.md).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuicSettings {
    /// Most inbound connections (default 128).
    #[serde(default)]
    pub max_connections: Option<usize>,
    /// Most inbound connections from one IP address (default 16).
    #[serde(default)]
    pub max_connections_per_ip: Option<usize>,
}

impl QuicSettings {
    /// Applies the overrides.
    pub fn apply(&self, a: &mut crate::quic::admission::AdmissionConfig) {
        if let Some(v) = self.max_connections {
            a.max_connections = v;
        }
        if let Some(v) = self.max_connections_per_ip {
            a.max_connections_per_ip = v;
        }
    }

    fn validate(&self) -> Result<(), String> {
        for (name, v) in [("max_connections", self.max_connections), ("max_connections_per_ip", self.max_connections_per_ip)] {
            if let Some(v) = v {
                if !(1..=65_536).contains(&v) {
                    return Err(format!("quic.{name} must be 1 to 65536, not {v}"));
                }
            }
        }
        Ok(())
    }
}

/// Longest duration a setting may name, in seconds (30 days): far beyond any sensible
/// timer, far below what would overflow one.
pub const MAX_SETTING_SECS: u64 = 30 * 24 * 3600;
/// Longest announce interval (3 h): an announce lives two intervals, and nodes honour at
/// most 6 h (`RouterConfig::max_lifetime`).
pub const MAX_ANNOUNCE_INTERVAL_SECS: u64 = 3 * 3600;

/// Mesh settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MeshSettings {
    /// Re-announce the node's destination this often (seconds).
    #[serde(default = "default_announce_interval")]
    pub announce_interval_secs: u64,
    /// Keep paths, announces and known identities in `<data_dir>/mesh.redb` across restarts.
    #[serde(default = "default_true")]
    pub persist: bool,
}

fn default_announce_interval() -> u64 {
    1800
}

impl Default for MeshSettings {
    fn default() -> Self {
        MeshSettings { announce_interval_secs: default_announce_interval(), persist: true }
    }
}

/// Operator overrides of the constrained link engine (see docs/link.md for each default).
///
/// ```ron
/// link: (rekey_interval_secs: Some(1800), rekey_bytes: Some(67108864), peer: Some("3f…")),
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinkSettings {
    /// Start a session to each peer the transport reports up (default true). A node that
    /// only answers sets this false.
    #[serde(default)]
    pub dial: Option<bool>,
    /// The PeerId (hex) the peer on this link must prove; a handshake with anyone else fails.
    #[serde(default)]
    pub peer: Option<String>,
    /// Keepalive after this many seconds without sending.
    #[serde(default)]
    pub keepalive_secs: Option<u64>,
    /// Declare the peer dead after this many seconds without an authenticated frame.
    #[serde(default)]
    pub dead_after_secs: Option<u64>,
    /// Give up on a handshake after this many seconds.
    #[serde(default)]
    pub handshake_timeout_secs: Option<u64>,
    /// Symmetric ratchet step after this many bytes under one key.
    #[serde(default)]
    pub ratchet_bytes: Option<u64>,
    /// Symmetric ratchet step after this many seconds under one key.
    #[serde(default)]
    pub ratchet_interval_secs: Option<u64>,
    /// Fresh ML-KEM exchange after this many bytes.
    #[serde(default)]
    pub rekey_bytes: Option<u64>,
    /// Fresh ML-KEM exchange after this many seconds (keys expire at three times this).
    #[serde(default)]
    pub rekey_interval_secs: Option<u64>,
    /// Largest message, bytes.
    #[serde(default)]
    pub max_message: Option<usize>,
    /// Most peers with state on this interface.
    #[serde(default)]
    pub max_peers: Option<usize>,
    /// Most handshakes in progress at once.
    #[serde(default)]
    pub max_handshakes: Option<usize>,
    /// Offer and accept resumption (default true).
    #[serde(default)]
    pub resumption: Option<bool>,
    /// When to ask an initiator to prove its address before answering: `Never`,
    /// `UnderLoad` (default) or `Always`.
    #[serde(default)]
    pub cookie: Option<crate::link::CookieMode>,
    /// Handshakes in progress from one source (IP address, or link address) (default 2).
    #[serde(default)]
    pub max_handshakes_per_source: Option<usize>,
    /// Sessions from one source (default 8).
    #[serde(default)]
    pub max_sessions_per_source: Option<usize>,
}

impl LinkSettings {
    /// The pinned peer, if any (validated by [`NodeConfig::parse`]).
    pub fn peer_id(&self) -> Option<crate::identity::PeerId> {
        self.peer.as_deref().and_then(|p| p.parse().ok())
    }

    /// Applies the overrides to engine settings.
    pub fn apply(&self, c: &mut crate::link::LinkConfig) {
        use std::time::Duration;
        let secs = Duration::from_secs;
        if let Some(v) = self.keepalive_secs {
            c.keepalive = secs(v);
        }
        if let Some(v) = self.dead_after_secs {
            c.dead_after = secs(v);
        }
        if let Some(v) = self.handshake_timeout_secs {
            c.handshake_timeout = secs(v);
        }
        if let Some(v) = self.ratchet_bytes {
            c.ratchet_bytes = v;
        }
        if let Some(v) = self.ratchet_interval_secs {
            c.ratchet_interval = secs(v);
        }
        if let Some(v) = self.rekey_bytes {
            c.rekey_bytes = v;
        }
        if let Some(v) = self.rekey_interval_secs {
            c.rekey_interval = secs(v);
        }
        if let Some(v) = self.max_message {
            c.max_message = v;
        }
        if let Some(v) = self.max_peers {
            c.max_peers = v;
        }
        if let Some(v) = self.max_handshakes {
            c.max_handshakes = v;
        }
        if let Some(v) = self.resumption {
            c.resumption = v;
        }
        if let Some(v) = self.cookie {
            c.cookie = v;
        }
        if let Some(v) = self.max_handshakes_per_source {
            c.max_handshakes_per_source = v;
        }
        if let Some(v) = self.max_sessions_per_source {
            c.max_sessions_per_source = v;
        }
    }

    fn validate(&self) -> Result<(), String> {
        if let Some(p) = &self.peer {
            if p.parse::<crate::identity::PeerId>().is_err() {
                return Err(format!("link.peer `{p}` is not a PeerId (64 hex characters)"));
            }
        }
        // (name, value, largest allowed): durations are capped far below anything that
        // would overflow a timer, counts at what the engine can hold.
        let numbers = [
            ("keepalive_secs", self.keepalive_secs, MAX_SETTING_SECS),
            ("dead_after_secs", self.dead_after_secs, MAX_SETTING_SECS),
            ("handshake_timeout_secs", self.handshake_timeout_secs, MAX_SETTING_SECS),
            ("ratchet_bytes", self.ratchet_bytes, 1 << 40),
            ("ratchet_interval_secs", self.ratchet_interval_secs, MAX_SETTING_SECS),
            ("rekey_bytes", self.rekey_bytes, 1 << 50),
            ("rekey_interval_secs", self.rekey_interval_secs, MAX_SETTING_SECS),
            ("max_message", self.max_message.map(|v| v as u64), 16 << 20),
            ("max_peers", self.max_peers.map(|v| v as u64), 65_536),
            ("max_handshakes", self.max_handshakes.map(|v| v as u64), 1024),
            ("max_handshakes_per_source", self.max_handshakes_per_source.map(|v| v as u64), 1024),
            ("max_sessions_per_source", self.max_sessions_per_source.map(|v| v as u64), 65_536),
        ];
        for (name, v, max) in numbers {
            match v {
                Some(0) => return Err(format!("link.{name} must be at least 1")),
                Some(v) if v > max => return Err(format!("link.{name} must be at most {max}, not {v}")),
                _ => {}
            }
        }
        if let (Some(k), Some(d)) = (self.keepalive_secs, self.dead_after_secs) {
            if d <= k {
                return Err(format!("link.dead_after_secs ({d}) must exceed keepalive_secs ({k})"));
            }
        }
        Ok(())
    }
}

fn empty_unit() -> String {
    "()".to_owned()
}

/// Why a configuration was rejected.
#[derive(thiserror::Error, Debug)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{file}: {source}")]
    Io {
        /// The file.
        file: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// RON syntax or type error, with a 1-based position.
    #[error("{origin}:{line}:{col}: {message}")]
    Syntax {
        /// The file, or `<default>` for the embedded config.
        origin: String,
        /// Line.
        line: usize,
        /// Column.
        col: usize,
        /// What was wrong.
        message: String,
    },
    /// Parsed, but not usable.
    #[error("{origin}: {message}")]
    Invalid {
        /// The file, or `<default>`.
        origin: String,
        /// What is wrong.
        message: String,
    },
}

impl NodeConfig {
    /// Parses and validates config text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Self, ConfigError> {
        let cfg: NodeConfig = ron::Options::default().from_str(text).map_err(|e| ConfigError::Syntax {
            origin: origin.to_owned(),
            line: e.span.start.line,
            col: e.span.start.col,
            message: e.code.to_string(),
        })?;
        cfg.validate(origin)?;
        Ok(cfg)
    }

    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io { file: path.to_path_buf(), source })?;
        Self::parse(&text, &path.display().to_string())
    }

    /// The embedded default.
    pub fn embedded_default() -> Result<Self, ConfigError> {
        Self::parse(DEFAULT_CONFIG, "<default>")
    }

    fn validate(&self, origin: &str) -> Result<(), ConfigError> {
        let invalid = |message: String| ConfigError::Invalid { origin: origin.to_owned(), message };
        let mut names = HashSet::new();
        for i in &self.interfaces {
            if i.name.is_empty() || !i.name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') {
                return Err(invalid(format!("interface name `{}` must be non-empty [A-Za-z0-9_-]", i.name)));
            }
            if !names.insert(i.name.as_str()) {
                return Err(invalid(format!("interface name `{}` is used twice", i.name)));
            }
            if !crate::plugin::loader::valid_name(&i.plugin) {
                return Err(invalid(format!("interface `{}`: plugin `{}` is not a plugin name (lowercase letters, digits, `_`, `-`)", i.name, i.plugin)));
            }
            i.link.validate().map_err(|m| invalid(format!("interface `{}`: {m}", i.name)))?;
            i.quic.validate().map_err(|m| invalid(format!("interface `{}`: {m}", i.name)))?;
            for c in &i.connect {
                if c.addr().parse::<antmesh_plugin_api::TransportAddr>().is_err() {
                    return Err(invalid(format!("interface `{}`: connect address `{}` is not a transport address", i.name, c.addr())));
                }
                if let ConnectEntry::Pinned { peer, .. } = c {
                    if peer.parse::<crate::identity::PeerId>().is_err() {
                        return Err(invalid(format!("interface `{}`: connect peer `{peer}` is not a PeerId (64 hex characters)", i.name)));
                    }
                }
            }
        }
        if !(10..=MAX_ANNOUNCE_INTERVAL_SECS).contains(&self.mesh.announce_interval_secs) {
            return Err(invalid(format!(
                "mesh.announce_interval_secs must be 10 to {MAX_ANNOUNCE_INTERVAL_SECS}, not {}",
                self.mesh.announce_interval_secs
            )));
        }
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log) {
            return Err(invalid(format!("log filter `{}`: {e}", self.log)));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_default_is_valid_and_has_udp() {
        let cfg = NodeConfig::embedded_default().unwrap();
        assert_eq!(cfg.interfaces.len(), 1);
        assert_eq!(cfg.interfaces[0].plugin, "udp");
    }

    #[test]
    fn syntax_errors_carry_line_and_column() {
        let err = NodeConfig::parse("(\n  interfaces: [\n    (name: \"a\" plugin: \"udp\"),\n  ],\n)", "x.ron").unwrap_err();
        match err {
            ConfigError::Syntax { line, col, .. } => {
                assert_eq!(line, 3);
                assert!(col > 10, "col {col}");
            }
            other => panic!("unexpected {other}"),
        }
        assert!(NodeConfig::parse("(interfacez: [])", "x.ron").unwrap_err().to_string().starts_with("x.ron:1:"));
    }

    #[test]
    fn shipped_examples_are_valid() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/examples");
        let mut n = 0;
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "ron") {
                NodeConfig::load(&path).unwrap_or_else(|e| panic!("{e}"));
                n += 1;
            }
        }
        assert!(n >= 4);
    }

    #[test]
    fn link_settings_are_validated_and_applied() {
        let text = r#"(interfaces: [(name: "s", plugin: "serial", link: (rekey_interval_secs: Some(600), rekey_bytes: Some(1000000)))])"#;
        let cfg = NodeConfig::parse(text, "x").unwrap();
        let mut lc = crate::link::LinkConfig::for_link(200, 1200);
        cfg.interfaces[0].link.apply(&mut lc);
        assert_eq!((lc.rekey_interval.as_secs(), lc.rekey_bytes), (600, 1_000_000));
        for bad in [
            r#"(interfaces: [(name: "s", plugin: "serial", link: (rekey_interval_secs: Some(0)))])"#,
            r#"(interfaces: [(name: "s", plugin: "serial", link: (peer: Some("abc")))])"#,
            r#"(interfaces: [(name: "s", plugin: "serial", link: (keepalive_secs: Some(9), dead_after_secs: Some(9)))])"#,
        ] {
            assert!(matches!(NodeConfig::parse(bad, "x"), Err(ConfigError::Invalid { .. })), "{bad}");
        }
    }

    #[test]
    fn values_that_would_overflow_timers_are_refused() {
        for bad in [
            "(mesh: (announce_interval_secs: 18446744073709551615))",
            "(mesh: (announce_interval_secs: 10801))",
            r#"(interfaces: [(name: "s", plugin: "serial", link: (keepalive_secs: Some(18446744073709551615)))])"#,
            r#"(interfaces: [(name: "s", plugin: "serial", link: (rekey_interval_secs: Some(2592001)))])"#,
            r#"(interfaces: [(name: "u", plugin: "udp", quic: (max_connections: Some(0)))])"#,
        ] {
            assert!(matches!(NodeConfig::parse(bad, "x"), Err(ConfigError::Invalid { .. })), "{bad}");
        }
        assert!(NodeConfig::parse("(mesh: (announce_interval_secs: 10800))", "x").is_ok());
    }

    #[test]
    fn connect_entries_may_pin_a_peer_id() {
        let id = "3f".repeat(32);
        let text = format!(r#"(interfaces: [(name: "u", plugin: "udp", connect: ["udp://127.0.0.1:1", (addr: "udp://127.0.0.1:2", peer: "{id}")])])"#);
        let cfg = NodeConfig::parse(&text, "x").unwrap();
        let c = &cfg.interfaces[0].connect;
        assert_eq!((c[0].addr(), c[0].peer()), ("udp://127.0.0.1:1", None));
        assert_eq!((c[1].addr(), c[1].peer().map(|p| p.to_hex())), ("udp://127.0.0.1:2", Some(id)));
        let bad = r#"(interfaces: [(name: "u", plugin: "udp", connect: [(addr: "udp://127.0.0.1:2", peer: "xyz")])])"#;
        assert!(matches!(NodeConfig::parse(bad, "x"), Err(ConfigError::Invalid { .. })));
    }

    #[test]
    fn duplicate_names_are_invalid() {
        let text = r#"(interfaces: [(name: "a", plugin: "udp"), (name: "a", plugin: "tcp")])"#;
        assert!(matches!(NodeConfig::parse(text, "x"), Err(ConfigError::Invalid { .. })));
    }
}
