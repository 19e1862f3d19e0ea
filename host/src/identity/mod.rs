//! Node identity: an ML-DSA-65 key pair and the [`PeerId`] derived from its public key.
//!
//! Read first: [`PeerId`] (the derivation is shared with ant-quic, so an id means the same
//! node in both stacks), then [`Identity`] (key file format and the permission rule).
//!
//! The key file holds the 32-byte FIPS 204 key-generation seed ξ, from which the key pair
//! is re-derived on load, plus the PeerId as a check value:
//!
//! ```text
//! "AMID" | version 0x01 | seed ξ (32 bytes) | PeerId (32 bytes)     = 69 bytes, mode 0600
//! ```
//! Like ssh, the host refuses a key file that its group or others can read.

mod key_file;

use core::fmt;
use core::str::FromStr;

use fips204::ml_dsa_65;
use fips204::traits::{KeyGen, SerDes, Signer, Verifier};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

pub use key_file::{default_data_dir, default_identity_path, IdentityError};

/// Bytes in an ML-DSA-65 public key.
pub const PUBLIC_KEY_LEN: usize = ml_dsa_65::PK_LEN;
/// Bytes in an ML-DSA-65 signature.
pub const SIGNATURE_LEN: usize = ml_dsa_65::SIG_LEN;
/// The domain separator of the PeerId derivation (shared with ant-quic).
pub const PEER_ID_DOMAIN: &[u8] = b"AUTONOMI_PEER_ID_V2:";
/// ML-DSA context string for `antmesh id sign` / `verify` (domain separation from
/// handshake and announce signatures, which use their own contexts).
pub const CLI_SIGNATURE_CONTEXT: &[u8] = b"antmesh/v1/detached-signature";

/// A node's identifier: SHA-256(`"AUTONOMI_PEER_ID_V2:"` ‖ 1952-byte ML-DSA-65 public key).
/// Self-certifying: whoever shows a public key hashing to it is that node.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PeerId(pub [u8; 32]);

impl PeerId {
    /// Derives the id of `public_key` (the encoded 1952-byte key).
    pub fn from_public_key(public_key: &[u8; PUBLIC_KEY_LEN]) -> PeerId {
        let mut h = Sha256::new();
        h.update(PEER_ID_DOMAIN);
        h.update(public_key);
        PeerId(h.finalize().into())
    }

    /// The id as lower-case hex.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl fmt::Display for PeerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for PeerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PeerId({})", &self.to_hex()[..16])
    }
}

/// Why a PeerId did not parse.
#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
#[error("a PeerId is 64 hex characters")]
pub struct PeerIdParseError;

impl FromStr for PeerId {
    type Err = PeerIdParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).map_err(|_| PeerIdParseError)?;
        Ok(PeerId(out))
    }
}

/// A verified ML-DSA-65 public key with its PeerId.
#[derive(Clone)]
pub struct PublicIdentity {
    key: ml_dsa_65::PublicKey,
    bytes: Box<[u8; PUBLIC_KEY_LEN]>,
    peer_id: PeerId,
}

impl fmt::Debug for PublicIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicIdentity({:?})", self.peer_id)
    }
}

/// Why a public key or signature was refused.
#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum VerifyError {
    /// Not 1952 bytes, or not a valid encoding.
    #[error("not an ML-DSA-65 public key ({len} bytes; expected {PUBLIC_KEY_LEN})")]
    BadPublicKey {
        /// Length given.
        len: usize,
    },
    /// The key does not hash to the expected PeerId.
    #[error("public key belongs to {actual}, not {expected}")]
    WrongPeer {
        /// Expected id.
        expected: PeerId,
        /// The key's id.
        actual: PeerId,
    },
    /// Not 3309 bytes.
    #[error("not an ML-DSA-65 signature ({len} bytes; expected {SIGNATURE_LEN})")]
    BadSignatureLength {
        /// Length given.
        len: usize,
    },
    /// The signature does not verify.
    #[error("signature does not verify")]
    Invalid,
}

impl PublicIdentity {
    /// Parses an encoded public key.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, VerifyError> {
        let arr: [u8; PUBLIC_KEY_LEN] = bytes.try_into().map_err(|_| VerifyError::BadPublicKey { len: bytes.len() })?;
        let key = ml_dsa_65::PublicKey::try_from_bytes(arr).map_err(|_| VerifyError::BadPublicKey { len: bytes.len() })?;
        Ok(PublicIdentity { key, peer_id: PeerId::from_public_key(&arr), bytes: Box::new(arr) })
    }

    /// Parses a public key and checks it belongs to `expected`.
    pub fn from_bytes_for(bytes: &[u8], expected: &PeerId) -> Result<Self, VerifyError> {
        let p = Self::from_bytes(bytes)?;
        if p.peer_id != *expected {
            return Err(VerifyError::WrongPeer { expected: *expected, actual: p.peer_id });
        }
        Ok(p)
    }

    /// The PeerId.
    pub fn peer_id(&self) -> PeerId {
        self.peer_id
    }

    /// The encoded key.
    pub fn as_bytes(&self) -> &[u8; PUBLIC_KEY_LEN] {
        &self.bytes
    }

    /// Verifies `signature` over `message` under ML-DSA context `ctx`.
    pub fn verify(&self, message: &[u8], signature: &[u8], ctx: &[u8]) -> Result<(), VerifyError> {
        let sig: &[u8; SIGNATURE_LEN] =
            signature.try_into().map_err(|_| VerifyError::BadSignatureLength { len: signature.len() })?;
        if self.key.verify(message, sig, ctx) {
            Ok(())
        } else {
            Err(VerifyError::Invalid)
        }
    }
}

/// Why signing failed (the RNG or a context over 255 bytes).
#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
#[error("signing failed: {0}")]
pub struct SignError(pub &'static str);

/// A node's key pair.
pub struct Identity {
    seed: Zeroizing<[u8; 32]>,
    secret: ml_dsa_65::PrivateKey,
    public: PublicIdentity,
}

impl Identity {
    /// A fresh identity from the operating system's RNG.
    pub fn generate() -> Result<Identity, IdentityError> {
        let mut seed = Zeroizing::new([0u8; 32]);
        getrandom::getrandom(seed.as_mut()).map_err(|e| IdentityError::Rng(e.to_string()))?;
        Ok(Self::from_seed(seed))
    }

    /// The identity for FIPS 204 key-generation seed ξ.
    pub fn from_seed(seed: Zeroizing<[u8; 32]>) -> Identity {
        let (pk, secret) = ml_dsa_65::KG::keygen_from_seed(&seed);
        let bytes = pk.clone().into_bytes();
        let public = PublicIdentity { key: pk, peer_id: PeerId::from_public_key(&bytes), bytes: Box::new(bytes) };
        Identity { seed, secret, public }
    }

    /// The PeerId.
    pub fn peer_id(&self) -> PeerId {
        self.public.peer_id
    }

    /// The public half.
    pub fn public(&self) -> &PublicIdentity {
        &self.public
    }

    /// Signs `message` under ML-DSA context `ctx` (hedged: fresh randomness per signature).
    pub fn sign(&self, message: &[u8], ctx: &[u8]) -> Result<[u8; SIGNATURE_LEN], SignError> {
        self.secret.try_sign(message, ctx).map_err(SignError)
    }

    pub(crate) fn seed(&self) -> &[u8; 32] {
        &self.seed
    }
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity").field("peer_id", &self.peer_id()).finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_id_is_sha256_of_domain_and_key() {
        let id = Identity::from_seed(Zeroizing::new([7u8; 32]));
        let mut h = Sha256::new();
        h.update(b"AUTONOMI_PEER_ID_V2:");
        h.update(id.public().as_bytes());
        assert_eq!(id.peer_id().0, <[u8; 32]>::from(h.finalize()));
        assert_eq!(id.public().as_bytes().len(), 1952);
        assert_eq!(id.peer_id().to_hex().parse::<PeerId>().unwrap(), id.peer_id());
    }

    #[test]
    fn same_seed_same_identity_and_signatures_verify() {
        let a = Identity::from_seed(Zeroizing::new([1u8; 32]));
        let b = Identity::from_seed(Zeroizing::new([1u8; 32]));
        assert_eq!(a.peer_id(), b.peer_id());
        let sig = a.sign(b"hello", CLI_SIGNATURE_CONTEXT).unwrap();
        assert_eq!(sig.len(), 3309);
        b.public().verify(b"hello", &sig, CLI_SIGNATURE_CONTEXT).unwrap();
        assert_eq!(b.public().verify(b"hellp", &sig, CLI_SIGNATURE_CONTEXT), Err(VerifyError::Invalid));
        assert_eq!(b.public().verify(b"hello", &sig, b"other context"), Err(VerifyError::Invalid));
        let mut forged = sig;
        forged[100] ^= 1;
        assert_eq!(b.public().verify(b"hello", &forged, CLI_SIGNATURE_CONTEXT), Err(VerifyError::Invalid));
        assert!(matches!(b.public().verify(b"hello", &sig[..10], CLI_SIGNATURE_CONTEXT), Err(VerifyError::BadSignatureLength { .. })));
    }

    #[test]
    fn public_keys_are_checked_against_peer_ids() {
        let a = Identity::from_seed(Zeroizing::new([1u8; 32]));
        let b = Identity::from_seed(Zeroizing::new([2u8; 32]));
        PublicIdentity::from_bytes_for(a.public().as_bytes(), &a.peer_id()).unwrap();
        assert!(matches!(
            PublicIdentity::from_bytes_for(a.public().as_bytes(), &b.peer_id()),
            Err(VerifyError::WrongPeer { .. })
        ));
        assert!(matches!(PublicIdentity::from_bytes(&[0u8; 12]), Err(VerifyError::BadPublicKey { len: 12 })));
    }
}
