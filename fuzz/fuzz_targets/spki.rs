//! The peer's SubjectPublicKeyInfo as it arrives in the TLS handshake: no panic, and what
//! parses is exactly the one DER encoding of its key. Half the inputs are parsed as they
//! are; the other half are a valid SPKI (key bytes from the input) with byte flips from the
//! input, so that the fuzzer reaches the accepting path and the edges of the framing.
#![no_main]

use antmesh_host::identity::PublicIdentity;
use antmesh_host::tls::{peer_id_from_spki, public_identity_from_spki, spki_for};
use libfuzzer_sys::fuzz_target;

const KEY_LEN: usize = 1952;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    if mode & 1 == 0 {
        let peer_id = peer_id_from_spki(rest);
        if let Ok(public) = public_identity_from_spki(rest) {
            assert_eq!(spki_for(&public), rest);
            assert_eq!(peer_id, Ok(public.peer_id()));
        }
        return;
    }
    let mut key = [0u8; KEY_LEN];
    let (key_src, flips) = rest.split_at(rest.len().min(KEY_LEN));
    key[..key_src.len()].copy_from_slice(key_src);
    let Ok(public) = PublicIdentity::from_bytes(&key) else { return };
    let original = spki_for(&public);
    let mut spki = original.clone();
    for flip in flips.chunks_exact(3) {
        let at = usize::from(u16::from_le_bytes([flip[0], flip[1]])) % spki.len();
        spki[at] ^= flip[2];
    }
    let framing = spki.len() - KEY_LEN;
    let framing_intact = spki[..framing] == original[..framing];
    match public_identity_from_spki(&spki) {
        Ok(parsed) => {
            assert!(framing_intact);
            assert_eq!(&parsed.as_bytes()[..], &spki[framing..]);
            assert_eq!(peer_id_from_spki(&spki), Ok(parsed.peer_id()));
        }
        Err(_) => assert!(!framing_intact),
    }
});
