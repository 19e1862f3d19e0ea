//! aws-lc-rs against the pure-Rust implementations (feature `aws-lc`): each primitive's
//! output under one library is checked by the other, and whole handshakes run between a
//! RustCrypto side and an aws-lc side, both ways, in TLS and in QUIC mode. Together with the
//! known answers the other tests check over the default backend (aws-lc-rs with the
//! feature: RFC 9001 A.2/A.3, FIPS 180-2, RFC 4231, RFC 5869), this is "the same wire
//! format" without building two binaries.

use aws_lc_rs::encoding::AsRawBytes;
use aws_lc_rs::signature::{KeyPair, PqdsaKeyPair, ML_DSA_65_SIGNING};
use fips204::ml_dsa_65;
use fips204::traits::{KeyGen, SerDes};
use rustls::crypto::tls13::OkmBlock;
use rustls::crypto::SupportedKxGroup;
use rustls::quic::{self, KeyChange};
use rustls::Side;

use super::*;
use crate::identity::{PublicIdentity, PUBLIC_KEY_LEN, SIGNATURE_LEN};
use crate::tls::aws_lc::AwsLc;
use crate::tls::backend::{Backend, MLKEM768_CT_LEN, MLKEM768_EK_LEN};
use crate::tls::kx::MlKem768;
use crate::tls::rustcrypto::RustCrypto;

/// Deterministic filler bytes (xorshift), so failures are reproducible.
fn bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn array<const N: usize>(seed: u64) -> [u8; N] {
    bytes(seed, N).try_into().unwrap()
}

// ---------------------------------------------------------------------------------------
// ML-DSA-65: the same key pair from the seed ξ, signatures accepted both ways

#[test]
fn mldsa65_same_key_pair_from_the_seed() {
    for seed in 0..8u64 {
        let xi: [u8; 32] = array(seed);
        let (pk, sk) = ml_dsa_65::KG::keygen_from_seed(&xi);
        let aws = PqdsaKeyPair::from_seed(&ML_DSA_65_SIGNING, &xi).unwrap();
        assert_eq!(aws.public_key().as_ref(), &pk.clone().into_bytes()[..], "public key, seed {seed}");
        // The expanded private key too (FIPS 204 skEncode), and aws-lc takes fips204's.
        let expanded = sk.into_bytes();
        assert_eq!(aws.private_key().as_raw_bytes().unwrap().as_ref(), &expanded[..], "private key, seed {seed}");
        let imported = PqdsaKeyPair::from_raw_private_key(&ML_DSA_65_SIGNING, &expanded).unwrap();
        assert_eq!(imported.public_key().as_ref(), aws.public_key().as_ref());
    }
    // Through the backend: the key of an Identity is accepted (its public key checked).
    let id = identity(42);
    let key = AwsLc::mldsa65_key(&id).unwrap();
    assert_eq!(key.public_key().as_ref(), &id.public().as_bytes()[..]);
    assert_eq!(key.public_key().as_ref().len(), PUBLIC_KEY_LEN);
}

#[test]
fn mldsa65_signatures_verify_across_libraries() {
    let id = identity(7);
    let aws_key = AwsLc::mldsa65_key(&id).unwrap();
    let rc_key = RustCrypto::mldsa65_key(&id).unwrap();
    let pk = id.public().as_bytes();
    for (i, len) in [0usize, 1, 32, 130, 1000].into_iter().enumerate() {
        let message = bytes(i as u64, len);
        let by_aws = AwsLc::mldsa65_sign(&aws_key, &message).unwrap();
        let by_rc = RustCrypto::mldsa65_sign(&rc_key, &message).unwrap();
        assert_eq!((by_aws.len(), by_rc.len()), (SIGNATURE_LEN, SIGNATURE_LEN));
        for sig in [&by_aws, &by_rc] {
            assert!(AwsLc::mldsa65_verify(pk, &message, sig));
            assert!(RustCrypto::mldsa65_verify(pk, &message, sig));
        }
        // fips204's own API, with the TLS (empty) context and not with another.
        PublicIdentity::from_bytes(pk).unwrap().verify(&message, &by_aws, b"").unwrap();
        assert!(PublicIdentity::from_bytes(pk).unwrap().verify(&message, &by_aws, b"antmesh").is_err());
        // A CLI-context signature is no TLS signature in either library.
        let other_ctx = id.sign(&message, crate::identity::CLI_SIGNATURE_CONTEXT).unwrap();
        assert!(!AwsLc::mldsa65_verify(pk, &message, &other_ctx));
        assert!(!RustCrypto::mldsa65_verify(pk, &message, &other_ctx));
        // Tampering is caught by both.
        let mut forged = by_rc.clone();
        forged[100] ^= 1;
        assert!(!AwsLc::mldsa65_verify(pk, &message, &forged));
        assert!(!RustCrypto::mldsa65_verify(pk, &message, &forged));
        let mut wrong_message = message.clone();
        wrong_message.push(0);
        assert!(!AwsLc::mldsa65_verify(pk, &wrong_message, &by_aws));
        assert!(!RustCrypto::mldsa65_verify(pk, &wrong_message, &by_aws));
    }
    // Another node's key refuses both; so do wrong lengths and a DER-wrapped key.
    let other = identity(8);
    let sig = AwsLc::mldsa65_sign(&aws_key, b"m").unwrap();
    assert!(!AwsLc::mldsa65_verify(other.public().as_bytes(), b"m", &sig));
    assert!(!RustCrypto::mldsa65_verify(other.public().as_bytes(), b"m", &sig));
    assert!(!AwsLc::mldsa65_verify(&pk[..100], b"m", &sig));
    assert!(!AwsLc::mldsa65_verify(pk, b"m", &sig[..SIGNATURE_LEN - 1]));
    assert!(!AwsLc::mldsa65_verify(&spki_for(id.public()), b"m", &sig));
}

#[test]
fn tls_signing_keys_verify_across_libraries() {
    let id = identity(9);
    let message = [0x20u8; 130];
    for (signer, verifier) in [
        (sign::certified_key_with::<AwsLc>(&id).unwrap(), &verify::RUSTCRYPTO_ML_DSA_65_ALGORITHMS),
        (sign::certified_key_with::<RustCrypto>(&id).unwrap(), &ML_DSA_65_ALGORITHMS),
    ] {
        assert_eq!(signer.cert[0].as_ref(), &spki_for(id.public())[..]);
        let sig = signer.key.choose_scheme(&[SignatureScheme::ML_DSA_65]).unwrap().sign(&message).unwrap();
        assert_eq!(sig.len(), SIGNATURE_LEN);
        let (_, algs) = verifier.mapping[0];
        algs[0].verify_signature(id.public().as_bytes(), &message, &sig).unwrap();
    }
}

// ---------------------------------------------------------------------------------------
// ML-KEM-768: encapsulate with one library, decapsulate with the other

#[test]
fn mlkem768_encapsulate_and_decapsulate_across_libraries() {
    for _ in 0..4 {
        // aws-lc key pair, RustCrypto encapsulates.
        let (dk, ek) = AwsLc::mlkem768_generate().unwrap();
        let ek: &[u8; MLKEM768_EK_LEN] = ek.as_slice().try_into().unwrap();
        let (ct, ss) = RustCrypto::mlkem768_encapsulate(ek).unwrap();
        let ct: &[u8; MLKEM768_CT_LEN] = ct.as_slice().try_into().unwrap();
        assert_eq!(AwsLc::mlkem768_decapsulate(&dk, ct).unwrap().secret_bytes(), ss.secret_bytes());
        // And aws-lc to its own key for comparison.
        let (ct2, ss2) = AwsLc::mlkem768_encapsulate(ek).unwrap();
        let ct2: &[u8; MLKEM768_CT_LEN] = ct2.as_slice().try_into().unwrap();
        assert_eq!(AwsLc::mlkem768_decapsulate(&dk, ct2).unwrap().secret_bytes(), ss2.secret_bytes());

        // RustCrypto key pair, aws-lc encapsulates.
        let (dk, ek) = RustCrypto::mlkem768_generate().unwrap();
        let ek: &[u8; MLKEM768_EK_LEN] = ek.as_slice().try_into().unwrap();
        let (ct, ss) = AwsLc::mlkem768_encapsulate(ek).unwrap();
        assert_eq!(ss.secret_bytes().len(), 32);
        let ct: &[u8; MLKEM768_CT_LEN] = ct.as_slice().try_into().unwrap();
        assert_eq!(RustCrypto::mlkem768_decapsulate(&dk, ct).unwrap().secret_bytes(), ss.secret_bytes());
        // A tampered ciphertext gives another (implicit-rejection) secret, not an error.
        let mut bad = *ct;
        bad[5] ^= 1;
        assert_ne!(RustCrypto::mlkem768_decapsulate(&dk, &bad).unwrap().secret_bytes(), ss.secret_bytes());
    }
}

#[test]
fn mlkem768_key_shares_across_libraries() {
    let aws = MlKem768::<AwsLc>::NEW;
    let rc = MlKem768::<RustCrypto>::NEW;
    for (client, server) in [(&aws as &dyn SupportedKxGroup, &rc as &dyn SupportedKxGroup), (&rc, &aws)] {
        let share = client.start().unwrap();
        assert_eq!(share.pub_key().len(), MLKEM768_ENCAPSULATION_KEY_LEN);
        let done = server.start_and_complete(share.pub_key()).unwrap();
        assert_eq!(done.pub_key.len(), MLKEM768_CIPHERTEXT_LEN);
        assert_eq!(share.complete(&done.pub_key).unwrap().secret_bytes(), done.secret.secret_bytes());
    }
    // Both refuse an encapsulation key that fails the FIPS 203 modulus check, and bad sizes.
    for group in [&aws as &dyn SupportedKxGroup, &rc] {
        for bad in [&[0xffu8; MLKEM768_ENCAPSULATION_KEY_LEN][..], &[0u8; 100][..]] {
            assert!(matches!(
                group.start_and_complete(bad),
                Err(Error::PeerMisbehaved(PeerMisbehaved::InvalidKeyShare))
            ));
        }
    }
}

// ---------------------------------------------------------------------------------------
// AES-128-GCM, the QUIC header mask, SHA-256 / HMAC / HKDF: identical outputs

#[test]
fn aes128gcm_seal_and_open_across_libraries() {
    for (i, len) in [0usize, 1, 15, 16, 17, 64, 1200, 1400, 16384].into_iter().enumerate() {
        let seed = i as u64;
        let key: [u8; 16] = array(seed);
        let nonce: [u8; 12] = array(seed + 100);
        let aad = bytes(seed + 200, i * 3);
        let plain = bytes(seed + 300, len);
        let (aws, rc) = (AwsLc::aes128gcm_key(&key).unwrap(), RustCrypto::aes128gcm_key(&key).unwrap());

        let mut by_aws = plain.clone();
        let tag_aws = AwsLc::aes128gcm_seal(&aws, &nonce, &aad, &mut by_aws).unwrap();
        let mut by_rc = plain.clone();
        let tag_rc = RustCrypto::aes128gcm_seal(&rc, &nonce, &aad, &mut by_rc).unwrap();
        assert_eq!((&by_aws, tag_aws), (&by_rc, tag_rc), "len {len}");

        let mut opened = by_aws.clone();
        assert!(RustCrypto::aes128gcm_open(&rc, &nonce, &aad, &mut opened, &tag_aws));
        assert_eq!(opened, plain);
        let mut opened = by_rc.clone();
        assert!(AwsLc::aes128gcm_open(&aws, &nonce, &aad, &mut opened, &tag_rc));
        assert_eq!(opened, plain);

        let mut bad_tag = tag_aws;
        bad_tag[0] ^= 1;
        assert!(!AwsLc::aes128gcm_open(&aws, &nonce, &aad, &mut by_aws.clone(), &bad_tag));
        assert!(!RustCrypto::aes128gcm_open(&rc, &nonce, &aad, &mut by_aws.clone(), &bad_tag));
        let mut other_aad = aad.clone();
        other_aad.push(1);
        assert!(!AwsLc::aes128gcm_open(&aws, &nonce, &other_aad, &mut by_rc.clone(), &tag_rc));
    }
    assert!(AwsLc::aes128gcm_key(&[0u8; 15]).is_none());
    assert!(AwsLc::aes128gcm_key(&[0u8; 32]).is_none());
}

#[test]
fn quic_header_masks_are_equal() {
    // The RFC 9001 A.2 sample under the client's Initial hp key gives 437b9aec36.
    let hp = bytes_of_hex("9f50449e04a0e810283a1e9933adedd2");
    let sample: [u8; 16] = bytes_of_hex("d1b1c98dd7689fb8ec11d242b123dc9b").try_into().unwrap();
    let expected = [0x43, 0x7b, 0x9a, 0xec, 0x36];
    assert_eq!(AwsLc::header_mask(&AwsLc::aes128_key(&hp).unwrap(), &sample), Some(expected));
    assert_eq!(RustCrypto::header_mask(&RustCrypto::aes128_key(&hp).unwrap(), &sample), Some(expected));
    for seed in 0..64u64 {
        let key: [u8; 16] = array(seed);
        let sample: [u8; 16] = array(seed + 1000);
        let aws = AwsLc::header_mask(&AwsLc::aes128_key(&key).unwrap(), &sample).unwrap();
        let rc = RustCrypto::header_mask(&RustCrypto::aes128_key(&key).unwrap(), &sample).unwrap();
        assert_eq!(aws, rc, "seed {seed}");
    }
    assert!(AwsLc::aes128_key(&[0u8; 32]).is_none());
}

fn bytes_of_hex(s: &str) -> Vec<u8> {
    ::hex::decode(s).unwrap()
}

#[test]
fn sha256_hmac_and_hkdf_are_equal() {
    let (aws, rc) =
        (quic_initial_suite_with(Primitives::AwsLc).suite, quic_initial_suite_with(Primitives::RustCrypto).suite);
    for (i, len) in [0usize, 1, 55, 56, 64, 65, 1000, 5000].into_iter().enumerate() {
        let data = bytes(i as u64, len);
        let (ha, hr) = (aws.common.hash_provider, rc.common.hash_provider);
        assert_eq!(ha.hash(&data).as_ref(), hr.hash(&data).as_ref(), "sha256 len {len}");
        let mut ca = ha.start();
        ca.update(&data[..len / 2]);
        let fork = ca.fork();
        ca.update(&data[len / 2..]);
        assert_eq!(ca.fork_finish().as_ref(), hr.hash(&data).as_ref());
        assert_eq!(fork.finish().as_ref(), hr.hash(&data[..len / 2]).as_ref());

        let key = bytes(i as u64 + 50, 32 + i * 20); // short and longer-than-a-block keys
        let okm_key = OkmBlock::new(&key[..key.len().min(64)]);
        assert_eq!(
            aws.hkdf_provider.hmac_sign(&okm_key, &data).as_ref(),
            rc.hkdf_provider.hmac_sign(&okm_key, &data).as_ref()
        );
        let (mut oa, mut or) = ([0u8; 80], [0u8; 80]);
        aws.hkdf_provider.extract_from_secret(Some(&key), &data).expand_slice(&[b"tls13 ", &data], &mut oa).unwrap();
        rc.hkdf_provider.extract_from_secret(Some(&key), &data).expand_slice(&[b"tls13 ", &data], &mut or).unwrap();
        assert_eq!(oa, or, "hkdf len {len}");
    }
}

// ---------------------------------------------------------------------------------------
// QUIC keys: Initial packets byte for byte, and 1-RTT keys after a mixed handshake

#[test]
fn quic_initial_packets_are_identical() {
    let (aws, rc) = (quic_initial_suite_with(Primitives::AwsLc), quic_initial_suite_with(Primitives::RustCrypto));
    for (i, version) in [quic::Version::V1, quic::Version::V1Draft, quic::Version::V2].into_iter().enumerate() {
        for side in [Side::Client, Side::Server] {
            let dcid = bytes(i as u64 + 7, 8 + i * 4);
            let (ka, kr) = (aws.keys(&dcid, side, version), rc.keys(&dcid, side, version));
            let header = [0xc3, 0, 0, 0, 1, 8, 1, 2, 3, 4, 5, 6, 7, 8, 0, 0x44, 0xd0, 0, 0, 0, 2];
            let plain = bytes(i as u64, 1162);
            let (mut pa, mut pr) = (plain.clone(), plain.clone());
            let ta = ka.local.packet.encrypt_in_place(2, &header, &mut pa).unwrap();
            let tr = kr.local.packet.encrypt_in_place(2, &header, &mut pr).unwrap();
            assert_eq!((&pa, ta.as_ref()), (&pr, tr.as_ref()));
            // Header protection of the sealed packet, the same on both.
            let (mut fa, mut na) = (header[0], [0u8, 0, 0, 2]);
            let (mut fr, mut nr) = (fa, na);
            ka.local.header.encrypt_in_place(&pa[..16], &mut fa, &mut na).unwrap();
            kr.local.header.encrypt_in_place(&pr[..16], &mut fr, &mut nr).unwrap();
            assert_eq!((fa, na), (fr, nr));
            // The other library's peer opens it.
            let peer = rc.keys(&dcid, if side == Side::Client { Side::Server } else { Side::Client }, version);
            let mut sealed = pa.clone();
            sealed.extend_from_slice(ta.as_ref());
            assert_eq!(peer.remote.packet.decrypt_in_place(2, &header, &mut sealed).unwrap(), &plain[..]);
        }
    }
}

/// A QUIC-mode handshake between `client` and `server` configs; both sides' 1-RTT keys.
fn quic_handshake(
    client: ClientConfig,
    server: ServerConfig,
) -> (quic::Connection, quic::Connection, quic::Keys, quic::Keys) {
    let mut client: quic::Connection =
        quic::ClientConnection::new(Arc::new(client), quic::Version::V1, server_name(), b"c".to_vec()).unwrap().into();
    let mut server: quic::Connection =
        quic::ServerConnection::new(Arc::new(server), quic::Version::V1, b"s".to_vec()).unwrap().into();
    fn step(from: &mut quic::Connection, to: &mut quic::Connection, one_rtt: &mut Option<quic::Keys>) {
        loop {
            let mut buf = Vec::new();
            let change = from.write_hs(&mut buf);
            if !buf.is_empty() {
                to.read_hs(&buf).unwrap();
            }
            match change {
                Some(KeyChange::OneRtt { keys, .. }) => *one_rtt = Some(keys),
                Some(KeyChange::Handshake { .. }) => {}
                None if buf.is_empty() => return,
                None => {}
            }
        }
    }
    let (mut client_keys, mut server_keys) = (None, None);
    for _ in 0..16 {
        step(&mut client, &mut server, &mut client_keys);
        step(&mut server, &mut client, &mut server_keys);
        if !client.is_handshaking() && !server.is_handshaking() {
            break;
        }
    }
    step(&mut client, &mut server, &mut client_keys);
    assert!(!client.is_handshaking() && !server.is_handshaking());
    (client, server, client_keys.unwrap(), server_keys.unwrap())
}

#[test]
fn mixed_handshakes_rustcrypto_and_aws_lc_both_ways() {
    let (alice, bob) = (identity(1), identity(2));
    for (client_side, server_side) in
        [(Primitives::RustCrypto, Primitives::AwsLc), (Primitives::AwsLc, Primitives::RustCrypto)]
    {
        // TLS over bytes: handshake, both identities, data both ways.
        let (mut client, mut server) = connect(
            client_config_with(&alice, Some(bob.peer_id()), client_side).unwrap(),
            server_config_with(&bob, server_side).unwrap(),
        );
        let out = pump(&mut client, &mut server);
        assert!(out.client.is_none() && out.server.is_none(), "{client_side:?} → {server_side:?}: {out:?}");
        assert_eq!(peer_identity(client.peer_certificates()).unwrap().peer_id(), bob.peer_id());
        assert_eq!(peer_identity(server.peer_certificates()).unwrap().peer_id(), alice.peer_id());
        assert_eq!(client.negotiated_key_exchange_group().map(|g| g.name()), Some(NamedGroup::MLKEM768));
        assert_eq!(client.negotiated_cipher_suite().map(|s| s.suite()), Some(CipherSuite::TLS13_AES_128_GCM_SHA256));
        client.writer().write_all(b"from the client").unwrap();
        server.writer().write_all(b"from the server").unwrap();
        let out = pump(&mut client, &mut server);
        assert!(out.client.is_none() && out.server.is_none(), "{out:?}");
        assert_eq!(read_app_data(&mut server), b"from the client");
        assert_eq!(read_app_data(&mut client), b"from the server");

        // QUIC mode: 1-RTT packets sealed by one library open with the other.
        let (client, server, ck, sk) = quic_handshake(
            client_config_with(&alice, Some(bob.peer_id()), client_side).unwrap(),
            server_config_with(&bob, server_side).unwrap(),
        );
        assert_eq!(client.alert(), None);
        assert_eq!(server.alert(), None);
        let header = [0x41u8, 9, 9, 9, 9];
        let mut payload = b"1-RTT stream data".to_vec();
        let tag = ck.local.packet.encrypt_in_place(3, &header, &mut payload).unwrap();
        payload.extend_from_slice(tag.as_ref());
        assert_eq!(sk.remote.packet.decrypt_in_place(3, &header, &mut payload).unwrap(), b"1-RTT stream data");
        let (mut first, mut pn) = (0x41u8, [0u8, 3]);
        sk.local.header.encrypt_in_place(&[9u8; 16], &mut first, &mut pn).unwrap();
        ck.remote.header.decrypt_in_place(&[9u8; 16], &mut first, &mut pn).unwrap();
        assert_eq!((first, pn), (0x41, [0, 3]));
    }
}

#[test]
fn mixed_handshakes_still_refuse_a_liar() {
    // An aws-lc server showing Bob's key but signing with Mallory's: a RustCrypto client
    // refuses the signature, and the other way round.
    let (victim, mallory) = (identity(2), identity(66));
    for (client_side, liar_backend_is_aws) in [(Primitives::RustCrypto, true), (Primitives::AwsLc, false)] {
        let liar = if liar_backend_is_aws {
            sign::certified_key_with_spki::<AwsLc>(&mallory, spki_for(victim.public())).unwrap()
        } else {
            sign::certified_key_with_spki::<RustCrypto>(&mallory, spki_for(victim.public())).unwrap()
        };
        let server = build_server_config(liar, Arc::new(verify::ClientKeyVerifier::default())).unwrap();
        let (mut client, mut server) = connect(client_config_with(&identity(1), None, client_side).unwrap(), server);
        let out = pump(&mut client, &mut server);
        assert_eq!(out.client, Some(Error::InvalidCertificate(CertificateError::BadSignature)));
    }
}

#[test]
fn primitives_are_named_and_default_to_aws_lc() {
    assert_eq!(PRIMITIVES, "aws-lc-rs");
    assert_eq!(Primitives::AwsLc.name(), "aws-lc-rs");
    assert_eq!(Primitives::RustCrypto.name(), "RustCrypto");
    for p in [Primitives::AwsLc, Primitives::RustCrypto] {
        let provider = provider_with(p);
        assert_eq!(provider.kx_groups.iter().map(|g| g.name()).collect::<Vec<_>>(), vec![NamedGroup::MLKEM768]);
        assert_eq!(
            provider.cipher_suites.iter().map(|s| s.suite()).collect::<Vec<_>>(),
            vec![CipherSuite::TLS13_AES_128_GCM_SHA256]
        );
        assert_eq!(provider.signature_verification_algorithms.mapping.len(), 1);
        assert_eq!(provider.signature_verification_algorithms.mapping[0].0, SignatureScheme::ML_DSA_65);
    }
}
