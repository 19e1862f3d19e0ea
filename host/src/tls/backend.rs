//! The primitives under the TLS provider, behind one trait: the protocol code around them
//! (TLS record framing, QUIC packet and header protection, the KEM-as-key-share mapping, the
//! rustls signing key and verifier) is written once, generic over a [`Backend`], and runs
//! over either library:
//!
//! | backend | library | when |
//! |---|---|---|
//! | [`super::rustcrypto::RustCrypto`] | `ml-kem`, `fips204`, `aes-gcm`, `aes`, `sha2`, `hmac` | a normal build |
//! | `super::aws_lc::AwsLc` | aws-lc-rs | feature `aws-lc` (the default then; RustCrypto stays selectable) |
//!
//! [`DefaultBackend`] is the one behind [`super::provider`], [`super::client_config`] and
//! the other public items. Both produce the same bytes on the wire: the cross-check tests
//! (`tls/cross_check.rs`, feature `aws-lc`) run one against the other.

use rustls::crypto::tls13::Hkdf;
use rustls::crypto::{hash, SharedSecret};
use rustls::Error;

use super::TlsConfigError;
use crate::identity::Identity;

/// Bytes in an AES-128 key (GCM and header protection).
pub(crate) const AES_128_KEY_LEN: usize = 16;
/// Bytes in an AES-GCM nonce.
pub(crate) const GCM_NONCE_LEN: usize = 12;
/// Bytes in an AES-GCM tag.
pub(crate) const GCM_TAG_LEN: usize = 16;
/// Bytes of ciphertext sampled for QUIC header protection (RFC 9001 §5.4.2).
pub(crate) const HP_SAMPLE_LEN: usize = 16;
/// Bytes of a QUIC header-protection mask that are used: 1 for the first byte, 4 for the
/// packet number.
pub(crate) const HP_MASK_LEN: usize = 5;
/// Bytes in an ML-KEM-768 encapsulation key: the client's key share.
pub(crate) const MLKEM768_EK_LEN: usize = 1184;
/// Bytes in an ML-KEM-768 ciphertext: the server's key share.
pub(crate) const MLKEM768_CT_LEN: usize = 1088;

/// The backend of a build without the `aws-lc` feature.
#[cfg(not(feature = "aws-lc"))]
pub(crate) type DefaultBackend = super::rustcrypto::RustCrypto;
/// The backend of a build with the `aws-lc` feature.
#[cfg(feature = "aws-lc")]
pub(crate) type DefaultBackend = super::aws_lc::AwsLc;

/// One library's implementation of every primitive the provider needs. Functions rather than
/// methods: a backend is a marker type, its keys are the associated types.
///
/// Failures are `None` / `false` / a rustls error; nothing here panics.
pub(crate) trait Backend: 'static {
    /// The library, for logs and benchmarks.
    const NAME: &'static str;
    /// SHA-256 for the TLS transcript.
    const SHA256: &'static dyn hash::Hash;
    /// HKDF-SHA256 for the TLS 1.3 key schedule (and the QUIC keys derived from it).
    const HKDF_SHA256: &'static dyn Hkdf;

    /// An AES-128-GCM key.
    type Aes128Gcm: Send + Sync;
    /// An AES-128 block-cipher key (QUIC header protection).
    type Aes128: Send + Sync;
    /// An ML-KEM-768 decapsulation key (zeroized on drop).
    type MlKemDecapsulationKey: Send + Sync;
    /// The node's ML-DSA-65 signing key.
    type MlDsaKey: Send + Sync;

    /// `None` if `key` is not 16 bytes.
    fn aes128gcm_key(key: &[u8]) -> Option<Self::Aes128Gcm>;
    /// Encrypts `in_out` in place and returns the tag; `None` if it failed.
    fn aes128gcm_seal(
        key: &Self::Aes128Gcm,
        nonce: &[u8; GCM_NONCE_LEN],
        aad: &[u8],
        in_out: &mut [u8],
    ) -> Option<[u8; GCM_TAG_LEN]>;
    /// Decrypts `in_out` in place if `tag` authenticates it; `false` otherwise (then `in_out`
    /// holds unspecified bytes).
    fn aes128gcm_open(
        key: &Self::Aes128Gcm,
        nonce: &[u8; GCM_NONCE_LEN],
        aad: &[u8],
        in_out: &mut [u8],
        tag: &[u8; GCM_TAG_LEN],
    ) -> bool;

    /// `None` if `key` is not 16 bytes.
    fn aes128_key(key: &[u8]) -> Option<Self::Aes128>;
    /// The first 5 bytes of AES-128-ECB(key, sample): the QUIC header-protection mask.
    fn header_mask(key: &Self::Aes128, sample: &[u8; HP_SAMPLE_LEN]) -> Option<[u8; HP_MASK_LEN]>;

    /// A fresh ML-KEM-768 key pair: the decapsulation key and the encoded encapsulation key.
    fn mlkem768_generate() -> Result<(Self::MlKemDecapsulationKey, Vec<u8>), Error>;
    /// Encapsulates to `ek` (checked per FIPS 203 §7.2): the ciphertext and the shared secret.
    /// An invalid `ek` is `PeerMisbehaved::InvalidKeyShare`.
    fn mlkem768_encapsulate(ek: &[u8; MLKEM768_EK_LEN]) -> Result<(Vec<u8>, SharedSecret), Error>;
    /// The shared secret of `ct` (implicit rejection: a wrong ciphertext gives a
    /// pseudo-random secret, not an error).
    fn mlkem768_decapsulate(
        dk: &Self::MlKemDecapsulationKey,
        ct: &[u8; MLKEM768_CT_LEN],
    ) -> Result<SharedSecret, Error>;

    /// The node's signing key, derived from the identity's FIPS 204 seed ξ. Fails if the
    /// library cannot, or derives another public key than the identity's.
    fn mldsa65_key(identity: &Identity) -> Result<Self::MlDsaKey, TlsConfigError>;
    /// Pure ML-DSA-65 over `message` with the empty context (hedged), 3309 bytes.
    fn mldsa65_sign(key: &Self::MlDsaKey, message: &[u8]) -> Result<Vec<u8>, Error>;
    /// Whether `signature` is a pure ML-DSA-65 signature (empty context) of `message` by the
    /// 1952-byte `public_key`.
    fn mldsa65_verify(public_key: &[u8], message: &[u8], signature: &[u8]) -> bool;
}
