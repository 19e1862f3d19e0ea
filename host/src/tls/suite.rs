//! The one cipher suite, TLS13_AES_128_GCM_SHA256 (0x1301), over the build's [`Backend`]:
//! SHA-256, HMAC-SHA256 (HKDF on top of it via rustls' `HkdfUsingHmac`), AES-128-GCM for
//! TLS records and QUIC packets, and AES-128 single-block encryption for QUIC header
//! protection (RFC 9001 §5.4.3). RustCrypto (`sha2`, `hmac`, `aes-gcm`, `aes`) in a normal
//! build, aws-lc-rs with the `aws-lc` feature; the framing around the primitives is here,
//! once, for both.
//!
//! QUIC needs the suite's [`quic::Algorithm`] ([`QUIC_AES_128_GCM`]): rustls derives every
//! QUIC packet and header-protection key through it, and [`quic_initial_suite`] gives the
//! `rustls::quic::Suite` from which a QUIC stack derives the Initial keys (RFC 9001 §5.2).
//!
//! No `unwrap`: the few constructors that can fail in principle (a key of the wrong length,
//! which rustls never passes) produce an object whose every operation returns an error.

use std::marker::PhantomData;
use std::sync::OnceLock;

use rustls::crypto::cipher::{
    make_tls13_aad, AeadKey, InboundOpaqueMessage, InboundPlainMessage, Iv, MessageDecrypter, MessageEncrypter, Nonce,
    OutboundOpaqueMessage, OutboundPlainMessage, PrefixedPayload, Tls13AeadAlgorithm, UnsupportedOperationError,
};
use rustls::crypto::CipherSuiteCommon;
use rustls::{quic, CipherSuite, ConnectionTrafficSecrets, ContentType, Error, ProtocolVersion, Tls13CipherSuite};

use super::backend::{Backend, DefaultBackend, AES_128_KEY_LEN, GCM_TAG_LEN, HP_MASK_LEN, HP_SAMPLE_LEN};

/// Records per key before a key update (same value as rustls' ring/aws-lc suites).
const CONFIDENTIALITY_LIMIT: u64 = 1 << 24;

/// TLS13_AES_128_GCM_SHA256 over backend `$b`, with `$quic` as its QUIC algorithm.
macro_rules! tls13_aes_128_gcm_sha256 {
    ($b:ty, $quic:expr) => {
        Tls13CipherSuite {
            common: CipherSuiteCommon {
                suite: CipherSuite::TLS13_AES_128_GCM_SHA256,
                hash_provider: <$b as Backend>::SHA256,
                confidentiality_limit: CONFIDENTIALITY_LIMIT,
            },
            hkdf_provider: <$b as Backend>::HKDF_SHA256,
            aead_alg: &Aes128GcmAead::<$b>::NEW,
            quic: Some($quic),
        }
    };
}

/// TLS13_AES_128_GCM_SHA256 with its QUIC algorithm, over the build's default backend. The
/// only suite of [`super::provider`].
pub static TLS13_AES_128_GCM_SHA256: Tls13CipherSuite = tls13_aes_128_gcm_sha256!(DefaultBackend, &QUIC_AES_128_GCM);

/// The QUIC packet-protection algorithm of [`TLS13_AES_128_GCM_SHA256`]: AES-128-GCM
/// packet keys and AES-128 header protection.
pub static QUIC_AES_128_GCM: QuicAes128Gcm = QuicAes128Gcm;

/// The suite a QUIC stack uses for Initial packets (RFC 9001 §5.2 requires
/// TLS_AES_128_GCM_SHA256): `quic_initial_suite().keys(dcid, side, version)`.
pub fn quic_initial_suite() -> quic::Suite {
    quic::Suite { suite: &TLS13_AES_128_GCM_SHA256, quic: &QUIC_AES_128_GCM }
}

/// The suite over the RustCrypto backend, when the default is aws-lc (`Primitives::RustCrypto`).
#[cfg(feature = "aws-lc")]
pub(crate) static RUSTCRYPTO_TLS13_AES_128_GCM_SHA256: Tls13CipherSuite =
    tls13_aes_128_gcm_sha256!(super::rustcrypto::RustCrypto, &RUSTCRYPTO_QUIC_AES_128_GCM);

#[cfg(feature = "aws-lc")]
static RUSTCRYPTO_QUIC_AES_128_GCM: QuicAlgorithm<super::rustcrypto::RustCrypto> = QuicAlgorithm(PhantomData);

// ---------------------------------------------------------------------------------------
// TLS 1.3 record protection (RFC 8446 §5.2)

/// AES-128-GCM for TLS 1.3 records. Over QUIC rustls still builds the record
/// encrypter/decrypter but never uses them.
pub(crate) struct Aes128GcmAead<B>(PhantomData<fn() -> B>);

impl<B> Aes128GcmAead<B> {
    pub(crate) const NEW: Self = Aes128GcmAead(PhantomData);
}

impl<B: Backend> Tls13AeadAlgorithm for Aes128GcmAead<B> {
    fn encrypter(&self, key: AeadKey, iv: Iv) -> Box<dyn MessageEncrypter> {
        Box::new(RecordCipher::<B> { aead: B::aes128gcm_key(key.as_ref()), iv })
    }

    fn decrypter(&self, key: AeadKey, iv: Iv) -> Box<dyn MessageDecrypter> {
        Box::new(RecordCipher::<B> { aead: B::aes128gcm_key(key.as_ref()), iv })
    }

    fn key_len(&self) -> usize {
        AES_128_KEY_LEN
    }

    fn extract_keys(&self, key: AeadKey, iv: Iv) -> Result<ConnectionTrafficSecrets, UnsupportedOperationError> {
        Ok(ConnectionTrafficSecrets::Aes128Gcm { key, iv })
    }
}

/// `aead` is `None` only if rustls passed a key of the wrong length; then every call fails.
struct RecordCipher<B: Backend> {
    aead: Option<B::Aes128Gcm>,
    iv: Iv,
}

impl<B: Backend> MessageEncrypter for RecordCipher<B> {
    fn encrypt(&mut self, msg: OutboundPlainMessage<'_>, seq: u64) -> Result<OutboundOpaqueMessage, Error> {
        let aead = self.aead.as_ref().ok_or(Error::EncryptError)?;
        let total_len = self.encrypted_payload_len(msg.payload.len());
        let mut payload = PrefixedPayload::with_capacity(total_len);
        payload.extend_from_chunks(&msg.payload);
        payload.extend_from_slice(&msg.typ.to_array());
        let nonce = Nonce::new(&self.iv, seq).0;
        let tag =
            B::aes128gcm_seal(aead, &nonce, &make_tls13_aad(total_len), payload.as_mut()).ok_or(Error::EncryptError)?;
        payload.extend_from_slice(&tag);
        // All TLS 1.3 protected records carry the legacy version 0x0303 (RFC 8446 §5.1).
        Ok(OutboundOpaqueMessage::new(ContentType::ApplicationData, ProtocolVersion::TLSv1_2, payload))
    }

    fn encrypted_payload_len(&self, payload_len: usize) -> usize {
        payload_len + 1 + GCM_TAG_LEN
    }
}

impl<B: Backend> MessageDecrypter for RecordCipher<B> {
    fn decrypt<'a>(&mut self, mut msg: InboundOpaqueMessage<'a>, seq: u64) -> Result<InboundPlainMessage<'a>, Error> {
        let aead = self.aead.as_ref().ok_or(Error::DecryptError)?;
        let payload = &mut msg.payload;
        let len = payload.len();
        let plain_len = len.checked_sub(GCM_TAG_LEN).ok_or(Error::DecryptError)?;
        let aad = make_tls13_aad(len);
        let nonce = Nonce::new(&self.iv, seq).0;
        let (ciphertext, tag) = payload.split_at_mut(plain_len);
        let tag: &[u8; GCM_TAG_LEN] = (&*tag).try_into().map_err(|_| Error::DecryptError)?;
        if !B::aes128gcm_open(aead, &nonce, &aad, ciphertext, tag) {
            return Err(Error::DecryptError);
        }
        payload.truncate(plain_len);
        msg.into_tls13_unpadded_message()
    }
}

// ---------------------------------------------------------------------------------------
// QUIC packet protection (RFC 9001 §5.3) and header protection (§5.4)

/// AES-128-GCM packet protection with AES-128 header protection, over the build's default
/// backend. Use the [`QUIC_AES_128_GCM`] static.
#[derive(Debug)]
pub struct QuicAes128Gcm;

impl quic::Algorithm for QuicAes128Gcm {
    fn packet_key(&self, key: AeadKey, iv: Iv) -> Box<dyn quic::PacketKey> {
        QuicAlgorithm::<DefaultBackend>(PhantomData).packet_key(key, iv)
    }

    fn header_protection_key(&self, key: AeadKey) -> Box<dyn quic::HeaderProtectionKey> {
        QuicAlgorithm::<DefaultBackend>(PhantomData).header_protection_key(key)
    }

    fn aead_key_len(&self) -> usize {
        AES_128_KEY_LEN
    }
}

/// [`QuicAes128Gcm`] over backend `B`.
pub(crate) struct QuicAlgorithm<B>(PhantomData<fn() -> B>);

impl<B: Backend> quic::Algorithm for QuicAlgorithm<B> {
    fn packet_key(&self, key: AeadKey, iv: Iv) -> Box<dyn quic::PacketKey> {
        Box::new(QuicPacketKey::<B> { key, aead: OnceLock::new(), iv })
    }

    fn header_protection_key(&self, key: AeadKey) -> Box<dyn quic::HeaderProtectionKey> {
        Box::new(QuicHeaderKey::<B>(B::aes128_key(key.as_ref())))
    }

    fn aead_key_len(&self) -> usize {
        AES_128_KEY_LEN
    }
}

/// The AES-GCM key schedule is built on first use: quinn derives the keys of the next 1-RTT
/// key phase as soon as the current ones exist and keeps them for the connection's life, and
/// most connections never update their keys (the schedule is 0.7–0.8 KB, two per end). A
/// peer that flips the key-phase bit makes quinn try the next keys early, which only costs
/// the saving.
struct QuicPacketKey<B: Backend> {
    key: AeadKey,
    aead: OnceLock<Option<Box<B::Aes128Gcm>>>,
    iv: Iv,
}

impl<B: Backend> QuicPacketKey<B> {
    fn aead(&self) -> Option<&B::Aes128Gcm> {
        self.aead.get_or_init(|| B::aes128gcm_key(self.key.as_ref()).map(Box::new)).as_deref()
    }

    fn seal(&self, nonce: [u8; 12], header: &[u8], payload: &mut [u8]) -> Result<quic::Tag, Error> {
        let aead = self.aead().ok_or(Error::EncryptError)?;
        let tag = B::aes128gcm_seal(aead, &nonce, header, payload).ok_or(Error::EncryptError)?;
        Ok(quic::Tag::from(&tag[..]))
    }

    fn open<'a>(&self, nonce: [u8; 12], header: &[u8], payload: &'a mut [u8]) -> Result<&'a [u8], Error> {
        let aead = self.aead().ok_or(Error::DecryptError)?;
        let plain_len = payload.len().checked_sub(GCM_TAG_LEN).ok_or(Error::DecryptError)?;
        let (ciphertext, tag) = payload.split_at_mut(plain_len);
        let tag: &[u8; GCM_TAG_LEN] = (&*tag).try_into().map_err(|_| Error::DecryptError)?;
        if !B::aes128gcm_open(aead, &nonce, header, ciphertext, tag) {
            return Err(Error::DecryptError);
        }
        Ok(&payload[..plain_len])
    }
}

impl<B: Backend> quic::PacketKey for QuicPacketKey<B> {
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
        GCM_TAG_LEN
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
struct QuicHeaderKey<B: Backend>(Option<B::Aes128>);

impl<B: Backend> QuicHeaderKey<B> {
    /// RFC 9001 §5.4.1 "Header Protection Application", as rustls' ring backend does it.
    /// `first` and `packet_number` are unchanged when an error is returned.
    fn xor_in_place(&self, sample: &[u8], first: &mut u8, packet_number: &mut [u8], masked: bool) -> Result<(), Error> {
        let key = self.0.as_ref().ok_or_else(|| Error::General("invalid header protection key".into()))?;
        let sample: &[u8; HP_SAMPLE_LEN] =
            sample.try_into().map_err(|_| Error::General("sample of invalid length".into()))?;
        let mask: [u8; HP_MASK_LEN] =
            B::header_mask(key, sample).ok_or_else(|| Error::General("header protection failed".into()))?;
        let (first_mask, pn_mask) = (mask[0], &mask[1..]);
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

impl<B: Backend> quic::HeaderProtectionKey for QuicHeaderKey<B> {
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
    fn sha256_hmac_and_hkdf_known_answers() {
        // FIPS 180-2 "abc" and RFC 4231 test case 2, on the suite's own hash and HKDF.
        let sha256 = TLS13_AES_128_GCM_SHA256.common.hash_provider;
        assert_eq!(
            sha256.hash(b"abc").as_ref(),
            &hex("ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad")[..]
        );
        let mut ctx = sha256.start();
        ctx.update(b"a");
        let fork = ctx.fork();
        ctx.update(b"bc");
        assert_eq!(ctx.fork_finish().as_ref(), sha256.hash(b"abc").as_ref());
        assert_eq!(fork.finish().as_ref(), sha256.hash(b"a").as_ref());
        let hkdf = TLS13_AES_128_GCM_SHA256.hkdf_provider;
        let hmac = hkdf.hmac_sign(&rustls::crypto::tls13::OkmBlock::new(b"Jefe"), b"what do ya want for nothing?");
        assert_eq!(hmac.as_ref(), &hex("5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843")[..]);
        // RFC 5869 A.1 (HKDF-SHA256, test case 1).
        let salt = hex("000102030405060708090a0b0c");
        let okm_expected = hex("3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865");
        let mut okm = [0u8; 42];
        hkdf.extract_from_secret(Some(&salt), &[0x0b; 22])
            .expand_slice(&[&hex("f0f1f2f3f4f5f6f7f8f9")], &mut okm)
            .unwrap();
        assert_eq!(&okm[..], &okm_expected[..]);
    }
}
