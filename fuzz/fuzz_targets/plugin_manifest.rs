//! plugin.ron parsing on arbitrary text: no panic.
#![no_main]

use antmesh_plugin_api::PluginManifest;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = PluginManifest::parse(text);
    }
});
