//! `plugin.ron`: the manifest that may sit beside an installed plugin library.
//!
//! A bare library in the plugin directory (what `cargo build` leaves) describes itself
//! through its root module; an installed plugin comes as `<dir>/<name>/plugin.ron` plus its
//! library, and the manifest adds a checksum the loader verifies before `dlopen`.

use serde::{Deserialize, Serialize};

/// The contents of a `plugin.ron` file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginManifest {
    /// Plugin name; must match what the library reports.
    pub name: String,
    /// Plugin version; must match what the library reports.
    pub version: String,
    /// Plugin ABI version the library was built against (`MAJOR.MINOR.PATCH`).
    pub abi_version: String,
    /// What the plugin provides: `["transport"]` today; `policy`/`framing` for WASM.
    pub kinds: Vec<String>,
    /// Library file name, relative to the manifest.
    pub library: String,
    /// Lower-case hex SHA-256 of the library file.
    #[serde(default)]
    pub checksum: Option<String>,
}

/// Why a manifest could not be read.
#[derive(thiserror::Error, Debug)]
#[non_exhaustive]
pub enum ManifestError {
    /// The RON did not parse; line and column are 1-based.
    #[error("{line}:{col}: {message}")]
    Syntax {
        /// Line of the error.
        line: usize,
        /// Column of the error.
        col: usize,
        /// What was wrong.
        message: String,
    },
}

impl PluginManifest {
    /// Parses manifest text.
    pub fn parse(text: &str) -> Result<Self, ManifestError> {
        ron::from_str(text).map_err(|e| ManifestError::Syntax {
            line: e.span.start.line,
            col: e.span.start.col,
            message: e.code.to_string(),
        })
    }
}
