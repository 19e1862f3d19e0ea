//! The pure-Rust [`Backend`]: SHA-256 (`sha2`), HMAC-SHA256 (`hmac`, HKDF on top of it via
//! rustls' [`HkdfUsingHmac`]), AES-128-GCM (`graviola` where the CPU has what it needs,
//! `aes-gcm` otherwise, see [`GcmKey`]), AES-128 (`aes`), ML-KEM-768 (`ml-kem`) and ML-DSA-65
//! (`fips204`, through [`Identity`]). No C: the backend of a normal build, and with the
//! `aws-lc` feature the reference the aws-lc backend is checked against (and still
//! selectable, `tls::Primitives::RustCrypto`).
//!
//! Randomness comes from `getrandom` with a returned error (`ml-kem`'s own `getrandom`
//! feature would panic inside the crate if the OS RNG failed).

use aes::cipher::BlockEncrypt;
use aes_gcm::aead::{AeadInPlace, KeyInit};
use hmac::{Hmac, Mac};
use ml_kem::array::Array;
use ml_kem::ml_kem_768::{DecapsulationKey, EncapsulationKey};
use ml_kem::{Decapsulate, KeyExport};
use rustls::crypto::tls13::{Hkdf, HkdfUsingHmac};
use rustls::crypto::{hash, hmac as rhmac, SharedSecret};
use rustls::Error;
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use super::backend::{
    Backend, GCM_NONCE_LEN, GCM_TAG_LEN, HP_MASK_LEN, HP_SAMPLE_LEN, MLKEM768_CT_LEN, MLKEM768_EK_LEN,
};
use super::kx::invalid_share;
use super::sign::TLS_SIGNATURE_CONTEXT;
use super::TlsConfigError;
use crate::identity::{Identity, PublicIdentity};

type GcmNonce = aes_gcm::Nonce<<aes_gcm::Aes128Gcm as aes_gcm::AeadCore>::NonceSize>;
type GcmTag = aes_gcm::Tag<<aes_gcm::Aes128Gcm as aes_gcm::AeadCore>::TagSize>;

/// The RustCrypto backend (marker type).
pub(crate) struct RustCrypto;

impl Backend for RustCrypto {
    const NAME: &'static str = "RustCrypto";
    const SHA256: &'static dyn hash::Hash = &Sha256Hash;
    const HKDF_SHA256: &'static dyn Hkdf = &HkdfUsingHmac(&HmacSha256);

    type Aes128Gcm = GcmKey;
    // Encryption only: QUIC header protection never decrypts a block, and the key schedule
    // is half the size (it is kept per connection and direction).
    type Aes128 = aes::Aes128Enc;
    type MlKemDecapsulationKey = DecapsulationKey;
    type MlDsaKey = Identity;

    fn aes128gcm_key(key: &[u8]) -> Option<Self::Aes128Gcm> {
        GcmKey::new(key)
    }

    fn aes128gcm_seal(
        key: &Self::Aes128Gcm,
        nonce: &[u8; GCM_NONCE_LEN],
        aad: &[u8],
        in_out: &mut [u8],
    ) -> Option<[u8; GCM_TAG_LEN]> {
        key.seal(nonce, aad, in_out)
    }

    fn aes128gcm_open(
        key: &Self::Aes128Gcm,
        nonce: &[u8; GCM_NONCE_LEN],
        aad: &[u8],
        in_out: &mut [u8],
        tag: &[u8; GCM_TAG_LEN],
    ) -> bool {
        key.open(nonce, aad, in_out, tag)
    }

    fn aes128_key(key: &[u8]) -> Option<Self::Aes128> {
        aes::Aes128Enc::new_from_slice(key).ok()
    }

    fn header_mask(key: &Self::Aes128, sample: &[u8; HP_SAMPLE_LEN]) -> Option<[u8; HP_MASK_LEN]> {
        let mut block = aes::Block::from(*sample);
        key.encrypt_block(&mut block);
        let mut mask = [0u8; HP_MASK_LEN];
        mask.copy_from_slice(&block[..HP_MASK_LEN]);
        Some(mask)
    }

    fn mlkem768_generate() -> Result<(Self::MlKemDecapsulationKey, Vec<u8>), Error> {
        let seed = random::<64>()?;
        let dk = DecapsulationKey::from_seed(Array::from(*seed));
        let ek = dk.encapsulation_key().to_bytes().to_vec();
        Ok((dk, ek))
    }

    fn mlkem768_encapsulate(ek: &[u8; MLKEM768_EK_LEN]) -> Result<(Vec<u8>, SharedSecret), Error> {
        // `new` also performs the FIPS 203 §7.2 modulus check.
        let ek = EncapsulationKey::new(&Array::from(*ek)).map_err(|_| invalid_share())?;
        let m = random::<32>()?;
        let (ct, ss) = ek.encapsulate_deterministic(&Array::from(*m));
        let ss = Zeroizing::new(ss);
        Ok((ct.to_vec(), SharedSecret::from(&ss[..])))
    }

    fn mlkem768_decapsulate(
        dk: &Self::MlKemDecapsulationKey,
        ct: &[u8; MLKEM768_CT_LEN],
    ) -> Result<SharedSecret, Error> {
        let ss = Zeroizing::new(dk.decapsulate_slice(ct).map_err(|_| invalid_share())?);
        Ok(SharedSecret::from(&ss[..]))
    }

    /// A copy of the identity held by the rustls config (configs outlive the borrow the
    /// builders take), re-derived from the seed by `fips204` so that no private key bytes
    /// are copied around. Never fails.
    fn mldsa65_key(identity: &Identity) -> Result<Self::MlDsaKey, TlsConfigError> {
        let mut seed = Zeroizing::new([0u8; 32]);
        seed.copy_from_slice(identity.seed());
        Ok(Identity::from_seed(seed))
    }

    fn mldsa65_sign(key: &Self::MlDsaKey, message: &[u8]) -> Result<Vec<u8>, Error> {
        key.sign(message, TLS_SIGNATURE_CONTEXT)
            .map(|sig| sig.to_vec())
            .map_err(|e| Error::General(format!("ML-DSA-65 signing failed: {e}")))
    }

    fn mldsa65_verify(public_key: &[u8], message: &[u8], signature: &[u8]) -> bool {
        PublicIdentity::from_bytes(public_key)
            .is_ok_and(|key| key.verify(message, signature, TLS_SIGNATURE_CONTEXT).is_ok())
    }
}

/// An AES-128-GCM key.
///
/// Bulk QUIC throughput is bound by this cipher: RustCrypto's `aes-gcm` runs AES-NI and
/// CLMUL as separate passes (about 1.6 GB/s sealing 1400-byte packets on the benchmark
/// machine), while graviola stitches them the way ring and aws-lc do (about 6.8 GB/s; ring
/// 7.4). graviola is Rust with inline assembly for x86-64 (AES-NI, PCLMULQDQ, AVX2, BMI1, ADX)
/// and AArch64 (the crypto extensions); on other CPUs and other architectures `aes-gcm`
/// serves. Both are the same function: `tests::gcm_implementations_agree`.
pub(crate) enum GcmKey {
    /// graviola's implementation, on a CPU it supports.
    #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
    Graviola(graviola::aead::AesGcm),
    /// RustCrypto's portable implementation (it still uses AES-NI/CLMUL when present).
    RustCrypto(aes_gcm::Aes128Gcm),
}

impl GcmKey {
    /// `None` if `key` is not 16 bytes.
    pub(crate) fn new(key: &[u8]) -> Option<Self> {
        if key.len() != super::backend::AES_128_KEY_LEN {
            return None;
        }
        #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
        if graviola::util::is_cpu_supported() {
            // graviola asserts its CPU features on every call, so it is only ever built
            // after this check (the length is checked above: `new` panics on others).
            return Some(Self::Graviola(graviola::aead::AesGcm::new(key)));
        }
        Self::portable(key)
    }

    /// RustCrypto's implementation whatever the CPU (tests compare the two).
    pub(crate) fn portable(key: &[u8]) -> Option<Self> {
        aes_gcm::Aes128Gcm::new_from_slice(key).ok().map(Self::RustCrypto)
    }

    /// Which implementation this key runs on, for benchmarks and logs.
    pub(crate) fn implementation(&self) -> &'static str {
        match self {
            #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
            Self::Graviola(_) => "graviola",
            Self::RustCrypto(_) => "aes-gcm",
        }
    }

    fn seal(&self, nonce: &[u8; GCM_NONCE_LEN], aad: &[u8], in_out: &mut [u8]) -> Option<[u8; GCM_TAG_LEN]> {
        match self {
            #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
            Self::Graviola(key) => {
                let mut tag = [0u8; GCM_TAG_LEN];
                key.encrypt(nonce, aad, in_out, &mut tag);
                Some(tag)
            }
            Self::RustCrypto(key) => {
                let tag = key.encrypt_in_place_detached(GcmNonce::from_slice(nonce), aad, in_out).ok()?;
                Some(tag.into())
            }
        }
    }

    fn open(&self, nonce: &[u8; GCM_NONCE_LEN], aad: &[u8], in_out: &mut [u8], tag: &[u8; GCM_TAG_LEN]) -> bool {
        match self {
            #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
            Self::Graviola(key) => key.decrypt(nonce, aad, in_out, tag).is_ok(),
            Self::RustCrypto(key) => key
                .decrypt_in_place_detached(GcmNonce::from_slice(nonce), aad, in_out, GcmTag::from_slice(tag))
                .is_ok(),
        }
    }
}

fn random<const N: usize>() -> Result<Zeroizing<[u8; N]>, Error> {
    let mut out = Zeroizing::new([0u8; N]);
    getrandom::getrandom(out.as_mut()).map_err(|_| Error::FailedToGetRandomBytes)?;
    Ok(out)
}

// ---------------------------------------------------------------------------------------
// SHA-256 and HMAC-SHA256

/// SHA-256 for the TLS transcript.
pub(crate) struct Sha256Hash;

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
pub(crate) struct HmacSha256;

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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;

    fn unhex(s: &str) -> Vec<u8> {
        hex::decode(s).unwrap()
    }

    /// "The Galois/Counter Mode of Operation", test case 4 (AES-128, AAD, a partial block).
    #[test]
    fn gcm_known_answer() {
        let key = unhex("feffe9928665731c6d6a8f9467308308");
        let nonce: [u8; 12] = unhex("cafebabefacedbaddecaf888").try_into().unwrap();
        let aad = unhex("feedfacedeadbeeffeedfacedeadbeefabaddad2");
        let plain = unhex(
            "d9313225f88406e5a55909c5aff5269a86a7a9531534f7da2e4c303d8a318a721c3c0c95956809532fcf0e2449a6b525b16aedf5aa0de657ba637b39",
        );
        let cipher = unhex(
            "42831ec2217774244b7221b784d0d49ce3aa212f2c02a4e035c17e2329aca12e21d514b25466931c7d8f6a5aac84aa051ba30b396a0aac973d58e091",
        );
        let tag: [u8; 16] = unhex("5bc94fbc3221a5db94fae95ae7121a47").try_into().unwrap();
        for key in [GcmKey::new(&key).unwrap(), GcmKey::portable(&key).unwrap()] {
            let mut buf = plain.clone();
            assert_eq!(key.seal(&nonce, &aad, &mut buf), Some(tag), "{}", key.implementation());
            assert_eq!(buf, cipher, "{}", key.implementation());
            assert!(key.open(&nonce, &aad, &mut buf, &tag));
            assert_eq!(buf, plain);
        }
        assert!(GcmKey::new(&[0u8; 15]).is_none());
        assert!(GcmKey::new(&[0u8; 32]).is_none());
    }

    /// The CPU-specific implementation and the portable one are the same function, at every
    /// length around the 16-byte block and graviola's 8- and 16-block strides, and both refuse
    /// a flipped bit anywhere.
    #[test]
    fn gcm_implementations_agree() {
        let key_bytes: Vec<u8> = (0u8..16).map(|i| i.wrapping_mul(37).wrapping_add(11)).collect();
        let fast = GcmKey::new(&key_bytes).unwrap();
        let portable = GcmKey::portable(&key_bytes).unwrap();
        #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
        if graviola::util::is_cpu_supported() {
            assert_eq!(fast.implementation(), "graviola");
        }
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        };
        for len in (0..=300).chain([1199, 1200, 1350, 1400, 1452, 4096, 65_527]) {
            let nonce: [u8; 12] = std::array::from_fn(|_| next());
            let aad: Vec<u8> = (0..(len % 41)).map(|_| next()).collect();
            let plain: Vec<u8> = (0..len).map(|_| next()).collect();
            let (mut a, mut b) = (plain.clone(), plain.clone());
            let tag_a = fast.seal(&nonce, &aad, &mut a).unwrap();
            let tag_b = portable.seal(&nonce, &aad, &mut b).unwrap();
            assert_eq!((&a, tag_a), (&b, tag_b), "length {len}");

            let mut opened = a.clone();
            assert!(portable.open(&nonce, &aad, &mut opened, &tag_a));
            assert_eq!(opened, plain);
            let mut opened = b.clone();
            assert!(fast.open(&nonce, &aad, &mut opened, &tag_b));
            assert_eq!(opened, plain);

            if len > 0 {
                let mut tampered = a.clone();
                tampered[len / 2] ^= 0x01;
                assert!(!fast.open(&nonce, &aad, &mut tampered.clone(), &tag_a));
                assert!(!portable.open(&nonce, &aad, &mut tampered, &tag_a));
            }
            let mut bad_tag = tag_a;
            bad_tag[15] ^= 0x80;
            assert!(!fast.open(&nonce, &aad, &mut a.clone(), &bad_tag));
            assert!(!portable.open(&nonce, &aad, &mut a, &bad_tag));
        }
    }
}
