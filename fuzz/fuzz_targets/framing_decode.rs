//! Stream framing decoders on arbitrary input: no panic, bounded output, and every frame
//! they produce re-encodes and decodes to itself.
#![no_main]

use antmesh_plugin_kit::framing::{Codec, Decoded, FramingKind};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&sel, rest)) = data.split_first() else { return };
    let kind = match sel % 3 {
        0 => FramingKind::Length,
        1 => FramingKind::Hdlc,
        _ => FramingKind::Kiss,
    };
    let max = 1 + usize::from(sel) * 4;
    let chunk = 1 + usize::from(sel >> 4);
    let mut dec = Codec::new(kind, max);
    let mut out = Vec::new();
    for c in rest.chunks(chunk) {
        if dec.decode(c, &mut out).is_err() {
            break;
        }
    }
    for d in out {
        if let Decoded::Frame(f) = d {
            assert!(f.len() <= max);
            let mut wire = Vec::new();
            Codec::new(kind, max).encode(&f, &mut wire);
            let mut again = Vec::new();
            Codec::new(kind, max).decode(&wire, &mut again).unwrap();
            assert_eq!(again, vec![Decoded::Frame(f)]);
        }
    }
});
