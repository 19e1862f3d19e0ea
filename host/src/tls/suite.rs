//! The one cipher suite, TLS13_AES_128_GCM_SHA256 (0x1301), built from RustCrypto crates:
//! SHA-256 (`sha2`), HMAC-SHA256 (`hmac`, and HKDF on top of it via rustls'
//! [`HkdfUsingHmac`]), AES-128-GCM (`aes-gcm`) for TLS records and QUIC packets, and
//! AES-128 single-block encryption (`aes`) for QUIC header protection (RFC 9001 §5.4.3).
//!
//! QUIC needs the suite's [`quic::Algorithm`] ([`QUIC_AES_128_GCM`]): rustls derives every
//! QUIC packet and header-protection key through it, and [`quic_initial_suite`] gives the
//! `rustls::quic::Suite` from which a QUIC stack derives the Initial keys (RFC 9001 §5.2).
//!
//! No `unwrap`: the few constructors that can fail in principle (a key of the wrong length,
//! which rustls never passes) produce an object whose every operation returns an error.

use aes::cipher::BlockEncrypt;
use aes_gcm::aead::{AeadInPlace, KeyInit};
use aes_gcm::Aes128Gcm;
use hmac::{Hmac, Mac};
use rustls::crypto::cipher::{
    make_tls13_aad, AeadKey, InboundOpaqueMessage, InboundPlainMessage, Iv, MessageDecrypter, MessageEncrypter, Nonce,
    OutboundOpaqueMessage, OutboundPlainMessage, PrefixedPayload, Tls13AeadAlgorithm, UnsupportedOperationError,
};
use rustls::crypto::tls13::HkdfUsingHmac;
use rustls::crypto::{hash, hmac as rhmac, CipherSuiteCommon};
use rustls::{quic, CipherSuite, ConnectionTrafficSecrets, ContentType, Error, ProtocolVersion, Tls13CipherSuite};
use sha2::{Digest, Sha256};

type GcmNonce = aes_gcm::Nonce<<Aes128Gcm as aes_gcm::AeadCore>::NonceSize>;
type GcmTag = aes_gcm::Tag<<Aes128Gcm as aes_gcm::AeadCore>::TagSize>;

/// Bytes in an AES-128-GCM key.
const KEY_LEN: usize = 16;
/// Bytes in an AES-GCM tag.
const TAG_LEN: usize = 16;
/// Bytes of ciphertext sampled for QUIC header protection.
const HP_SAMPLE_LEN: usize = 16;

/// TLS13_AES_128_GCM_SHA256 over RustCrypto, with its QUIC algorithm. The only suite of
/// [`super::provider`].
pub static TLS13_AES_128_GCM_SHA256: Tls13CipherSuite = Tls13CipherSuite {
    common: CipherSuiteCommon {
        suite: CipherSuite::TLS13_AES_128_GCM_SHA256,
        hash_provider: &Sha256Hash,
        // Records per key before a key update (same value as rustls' ring/aws-lc suites).
        confidentiality_limit: 1 << 24,
    },
    hkdf_provider: &HkdfUsingHmac(&HmacSha256),
    aead_alg: &Aes128GcmAead,
    quic: Some(&QUIC_AES_128_GCM),
};

/// The QUIC packet-protection algorithm of [`TLS13_AES_128_GCM_SHA256`]: AES-128-GCM
/// packet keys and AES-128 header protection.
pub static QUIC_AES_128_GCM: QuicAes128Gcm = QuicAes128Gcm;

/// The suite a QUIC stack uses for Initial packets (RFC 9001 §5.2 requires
/// TLS_AES_128_GCM_SHA256): `quic_initial_suite().keys(dcid, side, version)`.
pub fn quic_initial_suite() -> quic::Suite {
    quic::Suite { suite: &TLS13_AES_128_GCM_SHA256, quic: &QUIC_AES_128_GCM }
}

// ---------------------------------------------------------------------------------------
// SHA-256 and HMAC-SHA256

/// SHA-256 for the TLS transcript.
struct Sha256Hash;

impl hash::Hash for Sha256Hash {
    fn start(&self) -> Box<dyn hash::Context> {
        Box::new(Sha256Context(Sha256::new()))
    }

    fn hash(&self, data: &[u8]) -> hash::Output {
        hash::Output::new(&Sha256::digest(data)[..])
    }

    fn output_len(&self) -> usize {
        32
    }

    fn algorithm(&self) -> hash::HashAlgorithm {
        hash::HashAlgorithm::SHA256
    }
}

struct Sha256Context(Sha256);

impl hash::Context for Sha256Context {
    fn fork_finish(&self) -> hash::Output {
        hash::Output::new(&self.0.clone().finalize()[..])
    }

    fn fork(&self) -> Box<dyn hash::Context> {
        Box::new(Sha256Context(self.0.clone()))
    }

    fn finish(self: Box<Self>) -> hash::Output {
        hash::Output::new(&self.0.finalize()[..])
    }

    fn update(&mut self, data: &[u8]) {
        self.0.update(data)
    }
}

/// HMAC-SHA256; HKDF (RFC 5869) is built on it by rustls' `HkdfUsingHmac`.
struct HmacSha256;

impl rhmac::Hmac for HmacSha256 {
    fn with_key(&self, key: &[u8]) -> Box<dyn rhmac::Key> {
        // HMAC accepts keys of every length (longer ones are hashed), so this never fails;
        // a failure would give a key whose tags never match anything.
        Box::new(HmacSha256Key(<Hmac<Sha256> as Mac>::new_from_slice(key).ok()))
    }

    fn hash_output_len(&self) -> usize {
        32
    }
}

struct HmacSha256Key(Option<Hmac<Sha256>>);

impl rhmac::Key for HmacSha256Key {
    fn sign_concat(&self, first: &[u8], middle: &[&[u8]], last: &[u8]) -> rhmac::Tag {
        let Some(mac) = &self.0 else {
            return rhmac::Tag::new(&[0u8; 32]);
        };
        let mut mac = mac.clone();
        mac.update(first);
        for part in middle {
            mac.update(part);
        }
        mac.update(last);
        rhmac::Tag::new(&mac.finalize().into_bytes()[..])
    }

    fn tag_len(&self) -> usize {
        32
    }
}

// ---------------------------------------------------------------------------------------
// TLS 1.3 record protection (RFC 8446 §5.2)

/// AES-128-GCM for TLS 1.3 records. Over QUIC rustls still builds the record
/// encrypter/decrypter but never uses them.
struct Aes128GcmAead;

impl Tls13AeadAlgorithm for Aes128GcmAead {
    fn encrypter(&self, key: AeadKey, iv: Iv) -> Box<dyn MessageEncrypter> {
        Box::new(RecordCipher { aead: Aes128Gcm::new_from_slice(key.as_ref()).ok(), iv })
    }

    fn decrypter(&self, key: AeadKey, iv: Iv) -> Box<dyn MessageDecrypter> {
        Box::new(RecordCipher { aead: Aes128Gcm::new_from_slice(key.as_ref()).ok(), iv })
    }

    fn key_len(&self) -> usize {
        KEY_LEN
    }

    fn extract_keys(&self, key: AeadKey, iv: Iv) -> Result<ConnectionTrafficSecrets, UnsupportedOperationError> {
        Ok(ConnectionTrafficSecrets::Aes128Gcm { key, iv })
    }
}

/// `aead` is `None` only if rustls passed a key of the wrong length; then every call fails.
struct RecordCipher {
    aead: Option<Aes128Gcm>,
    iv: Iv,
}

impl MessageEncrypter for RecordCipher {
    fn encrypt(&mut self, msg: OutboundPlainMessage<'_>, seq: u64) -> Result<OutboundOpaqueMessage, Error> {
        let aead = self.aead.as_ref().ok_or(Error::EncryptError)?;
        let total_len = self.encrypted_payload_len(msg.payload.len());
        let mut payload = PrefixedPayload::with_capacity(total_len);
        payload.extend_from_chunks(&msg.payload);
        payload.extend_from_slice(&msg.typ.to_array());
        let nonce = Nonce::new(&self.iv, seq).0;
        let tag = aead
            .encrypt_in_place_detached(GcmNonce::from_slice(&nonce), &make_tls13_aad(total_len), payload.as_mut())
            .map_err(|_| Error::EncryptError)?;
        payload.extend_from_slice(&tag);
        // All TLS 1.3 protected records carry the legacy version 0x0303 (RFC 8446 §5.1).
        Ok(OutboundOpaqueMessage::new(ContentType::ApplicationData, ProtocolVersion::TLSv1_2, payload))
    }

    fn encrypted_payload_len(&self, payload_len: usize) -> usize {
        payload_len + 1 + TAG_LEN
    }
}

impl MessageDecrypter for RecordCipher {
    fn decrypt<'a>(&mut self, mut msg: InboundOpaqueMessage<'a>, seq: u64) -> Result<InboundPlainMessage<'a>, Error> {
        let aead = self.aead.as_ref().ok_or(Error::DecryptError)?;
        let payload = &mut msg.payload;
        let len = payload.len();
        let plain_len = len.checked_sub(TAG_LEN).ok_or(Error::DecryptError)?;
        let aad = make_tls13_aad(len);
        let nonce = Nonce::new(&self.iv, seq).0;
        let (ciphertext, tag) = payload.split_at_mut(plain_len);
        aead.decrypt_in_place_detached(GcmNonce::from_slice(&nonce), &aad, ciphertext, GcmTag::from_slice(tag))
            .map_err(|_| Error::DecryptError)?;
        payload.truncate(plain_len);
        msg.into_tls13_unpadded_message()
    }
}

// ---------------------------------------------------------------------------------------
// QUIC packet protection (RFC 9001 §5.3) and header protection (§5.4)

/// AES-128-GCM packet protection with AES-128 header protection. Use the
/// [`QUIC_AES_128_GCM`] static.
#[derive(Debug)]
pub struct QuicAes128Gcm;

impl quic::Algorithm for QuicAes128Gcm {
    fn packet_key(&self, key: AeadKey, iv: Iv) -> Box<dyn quic::PacketKey> {
        Box::new(QuicPacketKey { aead: Aes128Gcm::new_from_slice(key.as_ref()).ok(), iv })
    }

    fn header_protection_key(&self, key: AeadKey) -> Box<dyn quic::HeaderProtectionKey> {
        Box::new(QuicHeaderKey(aes::Aes128::new_from_slice(key.as_ref()).ok()))
    }

    fn aead_key_len(&self) -> usize {
        KEY_LEN
    }
}

struct QuicPacketKey {
    aead: Option<Aes128Gcm>,
    iv: Iv,
}

impl QuicPacketKey {
    fn seal(&self, nonce: [u8; 12], header: &[u8], payload: &mut [u8]) -> Result<quic::Tag, Error> {
        let aead = self.aead.as_ref().ok_or(Error::EncryptError)?;
        let tag = aead
            .encrypt_in_place_detached(GcmNonce::from_slice(&nonce), header, payload)
            .map_err(|_| Error::EncryptError)?;
        Ok(quic::Tag::from(&tag[..]))
    }

    fn open<'a>(&self, nonce: [u8; 12], header: &[u8], payload: &'a mut [u8]) -> Result<&'a [u8], Error> {
        let aead = self.aead.as_ref().ok_or(Error::DecryptError)?;
        let plain_len = payload.len().checked_sub(TAG_LEN).ok_or(Error::DecryptError)?;
        let (ciphertext, tag) = payload.split_at_mut(plain_len);
        aead.decrypt_in_place_detached(GcmNonce::from_slice(&nonce), header, ciphertext, GcmTag::from_slice(tag))
            .map_err(|_| Error::DecryptError)?;
        Ok(&payload[..plain_len])
    }
}

impl quic::PacketKey for QuicPacketKey {
    fn encrypt_in_place(&self, packet_number: u64, header: &[u8], payload: &mut [u8]) -> Result<quic::Tag, Error> {
        self.seal(Nonce::new(&self.iv, packet_number).0, header, payload)
    }

    fn encrypt_in_place_for_path(
        &self,
        path_id: u32,
        packet_number: u64,
        header: &[u8],
        payload: &mut [u8],
    ) -> Result<quic::Tag, Error> {
        self.seal(Nonce::for_path(path_id, &self.iv, packet_number).0, header, payload)
    }

    fn decrypt_in_place<'a>(
        &self,
        packet_number: u64,
        header: &[u8],
        payload: &'a mut [u8],
    ) -> Result<&'a [u8], Error> {
        self.open(Nonce::new(&self.iv, packet_number).0, header, payload)
    }

    fn decrypt_in_place_for_path<'a>(
        &self,
        path_id: u32,
        packet_number: u64,
        header: &[u8],
        payload: &'a mut [u8],
    ) -> Result<&'a [u8], Error> {
        self.open(Nonce::for_path(path_id, &self.iv, packet_number).0, header, payload)
    }

    fn tag_len(&self) -> usize {
        TAG_LEN
    }

    /// RFC 9001 §6.6 / §B.1.1.
    fn confidentiality_limit(&self) -> u64 {
        1 << 23
    }

    /// RFC 9001 §6.6 / §B.1.2.
    fn integrity_limit(&self) -> u64 {
        1 << 52
    }
}

/// AES-128 header protection: mask = AES-ECB(hp_key, sample).
struct QuicHeaderKey(Option<aes::Aes128>);

impl QuicHeaderKey {
    /// RFC 9001 §5.4.1 "Header Protection Application", as rustls' ring backend does it.
    /// `first` and `packet_number` are unchanged when an error is returned.
    fn xor_in_place(&self, sample: &[u8], first: &mut u8, packet_number: &mut [u8], masked: bool) -> Result<(), Error> {
        let aes = self.0.as_ref().ok_or_else(|| Error::General("invalid header protection key".into()))?;
        let sample: &[u8; HP_SAMPLE_LEN] =
            sample.try_into().map_err(|_| Error::General("sample of invalid length".into()))?;
        let mut block = aes::Block::from(*sample);
        aes.encrypt_block(&mut block);
        let (first_mask, pn_mask) = (block[0], &block[1..5]);
        if packet_number.len() > pn_mask.len() {
            return Err(Error::General("packet number too long".into()));
        }
        // Long header: the low 4 bits are protected; short header: the low 5.
        let bits = if *first & 0x80 == 0x80 { 0x0f } else { 0x1f };
        // The packet-number length comes from the unprotected first byte.
        let first_plain = if masked { *first ^ (first_mask & bits) } else { *first };
        let pn_len = usize::from(first_plain & 0x03) + 1;
        *first ^= first_mask & bits;
        for (byte, mask) in packet_number.iter_mut().zip(pn_mask).take(pn_len) {
            *byte ^= mask;
        }
        Ok(())
    }
}

impl quic::HeaderProtectionKey for QuicHeaderKey {
    fn encrypt_in_place(&self, sample: &[u8], first: &mut u8, packet_number: &mut [u8]) -> Result<(), Error> {
        self.xor_in_place(sample, first, packet_number, false)
    }

    fn decrypt_in_place(&self, sample: &[u8], first: &mut u8, packet_number: &mut [u8]) -> Result<(), Error> {
        self.xor_in_place(sample, first, packet_number, true)
    }

    fn sample_len(&self) -> usize {
        HP_SAMPLE_LEN
    }
}

#[cfg(test)]
mod tests {
    //! Known answers from RFC 9001 Appendix A (QUIC v1, client DCID 8394c8f03e515708).

    use super::*;
    use rustls::crypto::hash::Hash as _;
    use rustls::crypto::hmac::Hmac as _;
    use rustls::Side;

    const DCID: [u8; 8] = [0x83, 0x94, 0xc8, 0xf0, 0x3e, 0x51, 0x57, 0x08];

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.chars().filter(|c| !c.is_whitespace()).collect();
        ::hex::decode(s).unwrap()
    }

    #[test]
    fn a2_client_initial_header_protection() {
        // A.2: sample d1b1c98dd7689fb8ec11d242b123dc9b gives mask 437b9aec36, which turns the
        // header's c3 … 00000002 into c0 … 7b9aec34.
        let keys = quic_initial_suite().keys(&DCID, Side::Client, quic::Version::V1);
        let sample = hex("d1b1c98dd7689fb8ec11d242b123dc9b");
        let mut first = 0xc3;
        let mut pn = [0x00, 0x00, 0x00, 0x02];
        keys.local.header.encrypt_in_place(&sample, &mut first, &mut pn).unwrap();
        assert_eq!((first, pn), (0xc0, [0x7b, 0x9a, 0xec, 0x34]));
        // The server removes it with its remote key.
        let server = quic_initial_suite().keys(&DCID, Side::Server, quic::Version::V1);
        server.remote.header.decrypt_in_place(&sample, &mut first, &mut pn).unwrap();
        assert_eq!((first, pn), (0xc3, [0x00, 0x00, 0x00, 0x02]));
    }

    #[test]
    fn a3_server_initial_packet() {
        let mut header = hex("c1000000010008f067a5502a4262b50040750001");
        let plain = hex("02000000000600405a020000560303eefce7f7b37ba1d1632e96677825ddf739
             88cfc79825df566dc5430b9a045a1200130100002e00330024001d00209d3c94
             0d89690b84d08a60993c144eca684d1081287c834d5311bcf32bb9da1a002b00
             020304");
        let expected = hex("cf000000010008f067a5502a4262b5004075c0d95a482cd0991cd25b0aac406a
             5816b6394100f37a1c69797554780bb38cc5a99f5ede4cf73c3ec2493a1839b3
             dbcba3f6ea46c5b7684df3548e7ddeb9c3bf9c73cc3f3bded74b562bfb19fb84
             022f8ef4cdd93795d77d06edbb7aaf2f58891850abbdca3d20398c276456cbc4
             2158407dd074ee");
        let server = quic_initial_suite().keys(&DCID, Side::Server, quic::Version::V1);
        let mut payload = plain.clone();
        let tag = server.local.packet.encrypt_in_place(1, &header, &mut payload).unwrap();
        payload.extend_from_slice(tag.as_ref());
        // Packet number: 2 bytes at offset 18; sample: 4 bytes past its start.
        let (first, rest) = header.split_at_mut(1);
        server.local.header.encrypt_in_place(&payload[2..18], &mut first[0], &mut rest[17..19]).unwrap();
        let mut packet = header.clone();
        packet.extend_from_slice(&payload);
        assert_eq!(packet, expected);

        // And the client opens it.
        let client = quic_initial_suite().keys(&DCID, Side::Client, quic::Version::V1);
        let (header, sealed) = packet.split_at_mut(20);
        let (first, rest) = header.split_at_mut(1);
        client.remote.header.decrypt_in_place(&sealed[2..18], &mut first[0], &mut rest[17..19]).unwrap();
        assert_eq!(header, &hex("c1000000010008f067a5502a4262b50040750001")[..]);
        assert_eq!(client.remote.packet.decrypt_in_place(1, header, sealed).unwrap(), &plain[..]);
        // A flipped bit fails authentication.
        let mut tampered = expected.clone();
        tampered[40] ^= 1;
        let (h, s) = tampered.split_at_mut(20);
        h.copy_from_slice(&hex("c1000000010008f067a5502a4262b50040750001"));
        assert!(client.remote.packet.decrypt_in_place(1, h, s).is_err());
    }

    #[test]
    fn short_header_masks_five_bits_and_bad_inputs_are_errors() {
        let keys = quic_initial_suite().keys(&DCID, Side::Client, quic::Version::V1);
        let sample = [0u8; 16];
        let mut first = 0x43; // short header, 4-byte packet number
        let mut pn = [1, 2, 3, 4];
        keys.local.header.encrypt_in_place(&sample, &mut first, &mut pn).unwrap();
        keys.local.header.decrypt_in_place(&sample, &mut first, &mut pn).unwrap();
        assert_eq!((first, pn), (0x43, [1, 2, 3, 4]));
        assert!(keys.local.header.encrypt_in_place(&sample[..15], &mut first, &mut pn).is_err());
        assert!(keys.local.header.encrypt_in_place(&sample, &mut first, &mut [0u8; 5]).is_err());
        assert_eq!((first, pn), (0x43, [1, 2, 3, 4]));
        assert!(keys.remote.packet.decrypt_in_place(0, b"", &mut [0u8; 15]).is_err());
    }

    #[test]
    fn sha256_and_hmac_known_answers() {
        // FIPS 180-2 "abc" and RFC 4231 test case 2.
        assert_eq!(
            Sha256Hash.hash(b"abc").as_ref(),
            &hex("ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad")[..]
        );
        let mut ctx = Sha256Hash.start();
        ctx.update(b"a");
        let fork = ctx.fork();
        ctx.update(b"bc");
        assert_eq!(ctx.fork_finish().as_ref(), Sha256Hash.hash(b"abc").as_ref());
        assert_eq!(fork.finish().as_ref(), Sha256Hash.hash(b"a").as_ref());
        let tag = HmacSha256.with_key(b"Jefe").sign_concat(b"what do ya want ", &[b"for "], b"nothing?");
        assert_eq!(tag.as_ref(), &hex("5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843")[..]);
    }
}
