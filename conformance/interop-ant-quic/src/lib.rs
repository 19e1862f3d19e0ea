//! Helpers for the ant-quic interop tests (`tests/interop.rs`): where the antmesh UDP
//! plugin is, and the PeerId both stacks derive from an ML-DSA-65 public key.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// File name of the UDP transport plugin the antmesh endpoint loads.
pub const UDP_PLUGIN_FILE: &str = if cfg!(target_os = "macos") { "libantmesh_udp.dylib" } else { "libantmesh_udp.so" };

/// Bytes in an ML-DSA-65 public key (FIPS 204).
pub const ML_DSA_65_PUBLIC_KEY_LEN: usize = 1952;

/// The PeerId of a node, computed here without either stack:
/// SHA-256("AUTONOMI_PEER_ID_V2:" ‖ the 1952-byte ML-DSA-65 public key).
pub fn peer_id_of(ml_dsa_65_public_key: &[u8]) -> Result<[u8; 32], String> {
    if ml_dsa_65_public_key.len() != ML_DSA_65_PUBLIC_KEY_LEN {
        return Err(format!(
            "an ML-DSA-65 public key has {ML_DSA_65_PUBLIC_KEY_LEN} bytes, not {}",
            ml_dsa_65_public_key.len()
        ));
    }
    let mut h = Sha256::new();
    h.update(b"AUTONOMI_PEER_ID_V2:");
    h.update(ml_dsa_65_public_key);
    Ok(h.finalize().into())
}

/// The directory holding the main workspace's `libantmesh_udp.so`:
/// `$ANTMESH_PLUGIN_DIR` if set, else `$CARGO_TARGET_DIR/debug`, else `../../target/debug`
/// (relative to this crate). The directory must contain the plugin; otherwise the error says
/// where it looked and how to build it.
pub fn plugin_dir() -> Result<PathBuf, String> {
    let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let (dir, from) = if let Some(d) = std::env::var_os("ANTMESH_PLUGIN_DIR").filter(|d| !d.is_empty()) {
        (PathBuf::from(d), "ANTMESH_PLUGIN_DIR")
    } else if let Some(t) = std::env::var_os("CARGO_TARGET_DIR").filter(|d| !d.is_empty()) {
        (PathBuf::from(t).join("debug"), "CARGO_TARGET_DIR/debug")
    } else {
        (crate_dir.join("../../target/debug"), "../../target/debug")
    };
    // A relative ANTMESH_PLUGIN_DIR / CARGO_TARGET_DIR is taken from this crate's directory
    // (cargo runs tests there), as the fallback is.
    let dir = if dir.is_absolute() { dir } else { crate_dir.join(dir) };
    if dir.join(UDP_PLUGIN_FILE).is_file() {
        Ok(dir)
    } else {
        Err(format!(
            "{UDP_PLUGIN_FILE} not found in {} (from {from}). Build the main antmesh workspace first \
             (`cargo build --workspace` in the repository root) and/or set ANTMESH_PLUGIN_DIR to the \
             directory holding {UDP_PLUGIN_FILE}.",
            dir.display()
        ))
    }
}
