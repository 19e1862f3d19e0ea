//! Address parsing on arbitrary text: no panic, and what parses is canonical.
#![no_main]

use antmesh_plugin_api::TransportAddr;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(addr) = text.parse::<TransportAddr>() {
        assert_eq!(addr.to_string(), text);
        let back = TransportAddr::from_link(addr.scheme(), &addr.to_link());
        assert_eq!(back.as_ref(), Some(&addr));
    }
});
