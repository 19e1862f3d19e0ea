//! Shared by the conformance crate's integration tests: where the workspace's plugins are,
//! and a one-time build of the misbehaving test plugins.
#![allow(dead_code)]

pub mod scene;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// The cargo output directory holding the workspace's plugin libraries.
pub fn plugin_dir() -> PathBuf {
    antmesh_host::plugin::default_plugin_dir().expect("test executable has a parent directory")
}

/// The library file of workspace plugin `name` (e.g. `udp`).
pub fn plugin_file(name: &str) -> PathBuf {
    let p = plugin_dir().join(format!("{}antmesh_{name}{}", std::env::consts::DLL_PREFIX, std::env::consts::DLL_SUFFIX));
    assert!(p.is_file(), "{} missing: run `cargo build --workspace` before the tests", p.display());
    p
}

/// Builds `conformance/test-plugins` (once per test binary) and returns its output directory.
pub fn test_plugins_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("test-plugins/Cargo.toml");
        // A separate target directory: the outer build may still hold the main one's lock.
        let target = plugin_dir().parent().expect("profile dir has a parent").join("test-plugins");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
        let status = Command::new(cargo)
            .args(["build", "--quiet", "--manifest-path"])
            .arg(&manifest)
            .arg("--target-dir")
            .arg(&target)
            .env_remove("CARGO_TARGET_DIR")
            .status()
            .expect("run cargo");
        assert!(status.success(), "building the test plugins failed");
        target.join("debug")
    })
}

/// The library of test plugin `name` (`test_abi_next`, `test_panicking`).
pub fn test_plugin_file(name: &str) -> PathBuf {
    test_plugins_dir().join(format!("{}antmesh_{name}{}", std::env::consts::DLL_PREFIX, std::env::consts::DLL_SUFFIX))
}
