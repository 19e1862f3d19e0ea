//! What a finished QUIC session reads in 1-RTT CRYPTO frames, on arbitrary bytes cut
//! arbitrarily: no panic, and the verdict does not depend on where the stream is cut.
#![no_main]

use antmesh_host::quic::crypto::PostHandshakeReader;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&control, stream)) = data.split_first() else { return };
    let peer_is_server = control & 0x80 != 0;
    let piece = usize::from(control & 0x7f).max(1);
    let whole = PostHandshakeReader::new(peer_is_server).read(stream);
    let mut cut = PostHandshakeReader::new(peer_is_server);
    let mut last = Ok(());
    for chunk in stream.chunks(piece) {
        last = cut.read(chunk);
    }
    assert_eq!(whole, last);
    if whole.is_err() {
        assert!(!cut.at_boundary());
    }
});
