//! Link engine decoders on arbitrary input: frames, handshake message bodies and session
//! packet plaintext. No panic; every frame that decodes re-encodes to the same bytes.
#![no_main]

use std::time::{Duration, Instant};

use antmesh_host::link::arq::{Arq, ArqConfig};
use antmesh_host::link::handshake::{FinishBody, Hello, Reply};
use antmesh_host::link::wire::Frame;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(f) = Frame::decode(data) {
        assert_eq!(f.encode(), data);
        assert_eq!(f.encoded_len(), data.len());
    }
    if let Ok(h) = Hello::decode(data) {
        assert_eq!(h.encode(), data);
    }
    let _ = Reply::decode(data);
    let _ = FinishBody::decode(data);
    // Session packets: a sequence of plaintexts, each prefixed by one length byte.
    let mut arq = Arq::new(ArqConfig {
        max_window: 16,
        max_message: 4096,
        send_buffer: 8192,
        ack_delay: Duration::from_millis(10),
        min_rto: Duration::from_millis(50),
        max_rto: Duration::from_secs(5),
        initial_rtt: Duration::from_millis(100),
        bitrate_bps: 0,
        packet_room: 100,
    });
    let _ = arq.push(vec![1; 300]);
    let t0 = Instant::now();
    let _ = arq.poll_packet(t0, 100, true);
    let mut rest = data;
    let mut now = t0;
    while let Some((&n, tail)) = rest.split_first() {
        let (p, tail) = tail.split_at(usize::from(n).min(tail.len()));
        rest = tail;
        now += Duration::from_millis(7);
        if arq.on_packet(now, p).is_err() {
            break;
        }
        arq.on_timeout(now);
        while arq.poll_packet(now, 100, true).is_some() {}
        while let Some(m) = arq.next_message() {
            assert!(m.len() <= 4096);
        }
    }
});
