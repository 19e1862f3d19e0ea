//! Node config parsing and validation on arbitrary text: no panic.
#![no_main]

use antmesh_host::config::NodeConfig;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = NodeConfig::parse(text, "fuzz");
    }
});
