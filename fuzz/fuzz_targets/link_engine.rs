//! A link engine fed arbitrary frames from a few addresses, with timers firing in between:
//! whatever arrives, the engine neither panics nor grows past its limits.
#![no_main]

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use antmesh_host::identity::Identity;
use antmesh_host::link::{LinkConfig, LinkEngine};
use antmesh_plugin_api::LinkAddr;
use libfuzzer_sys::fuzz_target;

fn identity() -> Arc<Identity> {
    static ID: OnceLock<Arc<Identity>> = OnceLock::new();
    Arc::clone(ID.get_or_init(|| Arc::new(Identity::from_seed(zeroize::Zeroizing::new([3; 32])))))
}

fuzz_target!(|data: &[u8]| {
    let mut cfg = LinkConfig::for_link(64, 0);
    cfg.max_peers = 4;
    cfg.max_handshakes = 2;
    let mut e = LinkEngine::with_seed(identity(), cfg, [7; 32]);
    let t0 = Instant::now();
    let mut now = t0;
    let _ = e.connect(now, LinkAddr::Named("d".into()), None);
    // Records: address selector, length, bytes.
    let mut rest = data;
    while let Some((&sel, tail)) = rest.split_first() {
        let Some((&n, tail)) = tail.split_first() else { break };
        let (frame, tail) = tail.split_at(usize::from(n).min(tail.len()));
        rest = tail;
        let from = LinkAddr::Named(format!("{}", sel % 6).into());
        now += Duration::from_millis(u64::from(sel));
        let _ = e.handle_frame(now, &from, frame);
        e.handle_timeout(now);
        while let Some(t) = e.poll_transmit(now) {
            assert!(t.frame.len() <= 64);
        }
        while e.poll_event().is_some() {}
        assert!(e.peer_count() <= 4);
    }
});
