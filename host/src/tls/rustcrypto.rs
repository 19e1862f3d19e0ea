//! The RustCrypto [`Backend`]: SHA-256 (`sha2`), HMAC-SHA256 (`hmac`, HKDF on top of it via
//! rustls' [`HkdfUsingHmac`]), AES-128-GCM (`aes-gcm`), AES-128 (`aes`), ML-KEM-768
//! (`ml-kem`) and ML-DSA-65 (`fips204`, through [`Identity`]). Pure Rust: the backend of a
//! normal build, and with the `aws-lc` feature the reference the aws-lc backend is checked
//! against (and still selectable, `tls::Primitives::RustCrypto`).
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

    type Aes128Gcm = aes_gcm::Aes128Gcm;
    type Aes128 = aes::Aes128;
    type MlKemDecapsulationKey = DecapsulationKey;
    type MlDsaKey = Identity;

    fn aes128gcm_key(key: &[u8]) -> Option<Self::Aes128Gcm> {
        aes_gcm::Aes128Gcm::new_from_slice(key).ok()
    }

    fn aes128gcm_seal(
        key: &Self::Aes128Gcm,
        nonce: &[u8; GCM_NONCE_LEN],
        aad: &[u8],
        in_out: &mut [u8],
    ) -> Option<[u8; GCM_TAG_LEN]> {
        let tag = key.encrypt_in_place_detached(GcmNonce::from_slice(nonce), aad, in_out).ok()?;
        Some(tag.into())
    }

    fn aes128gcm_open(
        key: &Self::Aes128Gcm,
        nonce: &[u8; GCM_NONCE_LEN],
        aad: &[u8],
        in_out: &mut [u8],
        tag: &[u8; GCM_TAG_LEN],
    ) -> bool {
        key.decrypt_in_place_detached(GcmNonce::from_slice(nonce), aad, in_out, GcmTag::from_slice(tag)).is_ok()
    }

    fn aes128_key(key: &[u8]) -> Option<Self::Aes128> {
        aes::Aes128::new_from_slice(key).ok()
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
