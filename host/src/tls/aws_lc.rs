//! The aws-lc-rs [`Backend`] (feature `aws-lc`): every primitive of the provider from
//! AWS-LC, for nodes that do many handshakes (relays).
//!
//! | primitive | aws-lc-rs API |
//! |---|---|
//! | ML-KEM-768 key pair, encapsulation, decapsulation | `kem::{DecapsulationKey, EncapsulationKey}`, `kem::ML_KEM_768` |
//! | ML-DSA-65 signing key from the identity's seed ξ | `signature::PqdsaKeyPair::from_seed(&ML_DSA_65_SIGNING, ξ)` |
//! | ML-DSA-65 signing (pure, empty context, hedged) | `PqdsaKeyPair::sign` |
//! | ML-DSA-65 verification (pure, empty context) | `signature::UnparsedPublicKey::new(&ML_DSA_65, ..).verify` |
//! | AES-128-GCM (TLS records, QUIC packets) | `aead::LessSafeKey` over `aead::AES_128_GCM` |
//! | AES-128 header protection (the ECB mask) | `aead::quic::HeaderProtectionKey` over `aead::quic::AES_128` |
//! | SHA-256, HMAC-SHA256 (HKDF via rustls' `HkdfUsingHmac`) | `digest::Context`, `hmac::Context` |
//!
//! ML-DSA is stable aws-lc-rs API since 1.18 (`aws_lc_rs::signature`), so the crate's
//! `unstable` feature is not needed. `from_seed` expands ξ per FIPS 204, so it yields the
//! key pair `fips204` derives for [`Identity`]; [`AwsLc::mldsa65_key`] checks the public
//! key against the identity's anyway and refuses to run with a different one.
//!
//! The identity itself (`Identity::sign` for CLI and announce signatures, `PublicIdentity`
//! parsing of peer keys and `verify` outside TLS) stays on `fips204`.

use aws_lc_rs::aead::quic::{HeaderProtectionKey, AES_128};
use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_128_GCM};
use aws_lc_rs::signature::{KeyPair, PqdsaKeyPair, UnparsedPublicKey, ML_DSA_65, ML_DSA_65_SIGNING};
use aws_lc_rs::{digest, hmac, kem};
use rustls::crypto::tls13::{Hkdf, HkdfUsingHmac};
use rustls::crypto::{hash, hmac as rhmac, SharedSecret};
use rustls::Error;

use super::backend::{
    Backend, GCM_NONCE_LEN, GCM_TAG_LEN, HP_MASK_LEN, HP_SAMPLE_LEN, MLKEM768_CT_LEN, MLKEM768_EK_LEN,
};
use super::kx::invalid_share;
use super::TlsConfigError;
use crate::identity::{Identity, PUBLIC_KEY_LEN, SIGNATURE_LEN};

/// The aws-lc-rs backend (marker type).
pub(crate) struct AwsLc;

impl Backend for AwsLc {
    const NAME: &'static str = "aws-lc-rs";
    const SHA256: &'static dyn hash::Hash = &Sha256Hash;
    const HKDF_SHA256: &'static dyn Hkdf = &HkdfUsingHmac(&HmacSha256);

    type Aes128Gcm = LessSafeKey;
    type Aes128 = HeaderProtectionKey;
    type MlKemDecapsulationKey = kem::DecapsulationKey;
    type MlDsaKey = PqdsaKeyPair;

    fn aes128gcm_key(key: &[u8]) -> Option<Self::Aes128Gcm> {
        UnboundKey::new(&AES_128_GCM, key).ok().map(LessSafeKey::new)
    }

    fn aes128gcm_seal(
        key: &Self::Aes128Gcm,
        nonce: &[u8; GCM_NONCE_LEN],
        aad: &[u8],
        in_out: &mut [u8],
    ) -> Option<[u8; GCM_TAG_LEN]> {
        let tag = key.seal_in_place_separate_tag(Nonce::assume_unique_for_key(*nonce), Aad::from(aad), in_out).ok()?;
        tag.as_ref().try_into().ok()
    }

    fn aes128gcm_open(
        key: &Self::Aes128Gcm,
        nonce: &[u8; GCM_NONCE_LEN],
        aad: &[u8],
        in_out: &mut [u8],
        tag: &[u8; GCM_TAG_LEN],
    ) -> bool {
        key.open_in_place_separate_tag(Nonce::assume_unique_for_key(*nonce), Aad::from(aad), tag, in_out).is_ok()
    }

    fn aes128_key(key: &[u8]) -> Option<Self::Aes128> {
        HeaderProtectionKey::new(&AES_128, key).ok()
    }

    fn header_mask(key: &Self::Aes128, sample: &[u8; HP_SAMPLE_LEN]) -> Option<[u8; HP_MASK_LEN]> {
        key.new_mask(sample).ok()
    }

    fn mlkem768_generate() -> Result<(Self::MlKemDecapsulationKey, Vec<u8>), Error> {
        let dk = kem::DecapsulationKey::generate(&kem::ML_KEM_768)
            .map_err(|_| Error::General("aws-lc: ML-KEM-768 key generation failed".into()))?;
        let ek = dk
            .encapsulation_key()
            .and_then(|ek| ek.key_bytes())
            .map_err(|_| Error::General("aws-lc: ML-KEM-768 encapsulation key unavailable".into()))?;
        Ok((dk, ek.as_ref().to_vec()))
    }

    fn mlkem768_encapsulate(ek: &[u8; MLKEM768_EK_LEN]) -> Result<(Vec<u8>, SharedSecret), Error> {
        // AWS-LC performs the FIPS 203 §7.2 modulus check when encapsulating.
        let ek = kem::EncapsulationKey::new(&kem::ML_KEM_768, ek).map_err(|_| invalid_share())?;
        let (ct, ss) = ek.encapsulate().map_err(|_| invalid_share())?;
        Ok((ct.as_ref().to_vec(), SharedSecret::from(ss.as_ref())))
    }

    fn mlkem768_decapsulate(
        dk: &Self::MlKemDecapsulationKey,
        ct: &[u8; MLKEM768_CT_LEN],
    ) -> Result<SharedSecret, Error> {
        let ss = dk.decapsulate(kem::Ciphertext::from(&ct[..])).map_err(|_| invalid_share())?;
        Ok(SharedSecret::from(ss.as_ref()))
    }

    /// `PqdsaKeyPair::from_seed` on the identity's ξ; its public key must be the identity's.
    fn mldsa65_key(identity: &Identity) -> Result<Self::MlDsaKey, TlsConfigError> {
        let key = PqdsaKeyPair::from_seed(&ML_DSA_65_SIGNING, identity.seed())
            .map_err(|_| TlsConfigError::SigningKey("aws-lc refused the ML-DSA-65 seed"))?;
        if key.public_key().as_ref() != &identity.public().as_bytes()[..] {
            return Err(TlsConfigError::SigningKey("aws-lc derived another ML-DSA-65 public key from the seed"));
        }
        Ok(key)
    }

    fn mldsa65_sign(key: &Self::MlDsaKey, message: &[u8]) -> Result<Vec<u8>, Error> {
        let mut signature = vec![0u8; SIGNATURE_LEN];
        let len =
            key.sign(message, &mut signature).map_err(|_| Error::General("aws-lc: ML-DSA-65 signing failed".into()))?;
        signature.truncate(len);
        Ok(signature)
    }

    fn mldsa65_verify(public_key: &[u8], message: &[u8], signature: &[u8]) -> bool {
        // aws-lc would also take a DER SubjectPublicKeyInfo here; only the bare key is ours.
        public_key.len() == PUBLIC_KEY_LEN
            && signature.len() == SIGNATURE_LEN
            && UnparsedPublicKey::new(&ML_DSA_65, public_key).verify(message, signature).is_ok()
    }
}

// ---------------------------------------------------------------------------------------
// SHA-256 and HMAC-SHA256

/// SHA-256 for the TLS transcript.
pub(crate) struct Sha256Hash;

impl hash::Hash for Sha256Hash {
    fn start(&self) -> Box<dyn hash::Context> {
        Box::new(Sha256Context(digest::Context::new(&digest::SHA256)))
    }

    fn hash(&self, data: &[u8]) -> hash::Output {
        hash::Output::new(digest::digest(&digest::SHA256, data).as_ref())
    }

    fn output_len(&self) -> usize {
        32
    }

    fn algorithm(&self) -> hash::HashAlgorithm {
        hash::HashAlgorithm::SHA256
    }
}

struct Sha256Context(digest::Context);

impl hash::Context for Sha256Context {
    fn fork_finish(&self) -> hash::Output {
        hash::Output::new(self.0.clone().finish().as_ref())
    }

    fn fork(&self) -> Box<dyn hash::Context> {
        Box::new(Sha256Context(self.0.clone()))
    }

    fn finish(self: Box<Self>) -> hash::Output {
        hash::Output::new(self.0.finish().as_ref())
    }

    fn update(&mut self, data: &[u8]) {
        self.0.update(data)
    }
}

/// HMAC-SHA256; HKDF (RFC 5869) is built on it by rustls' `HkdfUsingHmac`.
pub(crate) struct HmacSha256;

impl rhmac::Hmac for HmacSha256 {
    fn with_key(&self, key: &[u8]) -> Box<dyn rhmac::Key> {
        Box::new(HmacSha256Key(hmac::Key::new(hmac::HMAC_SHA256, key)))
    }

    fn hash_output_len(&self) -> usize {
        32
    }
}

struct HmacSha256Key(hmac::Key);

impl rhmac::Key for HmacSha256Key {
    fn sign_concat(&self, first: &[u8], middle: &[&[u8]], last: &[u8]) -> rhmac::Tag {
        let mut ctx = hmac::Context::with_key(&self.0);
        ctx.update(first);
        for part in middle {
            ctx.update(part);
        }
        ctx.update(last);
        rhmac::Tag::new(ctx.sign().as_ref())
    }

    fn tag_len(&self) -> usize {
        32
    }
}
