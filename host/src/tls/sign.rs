//! Signing: the node's ML-DSA-65 [`Identity`] as a rustls signing key, presented as an
//! RFC 7250 raw public key (a bare SubjectPublicKeyInfo, see [`super::verify`]).
//!
//! TLS 1.3 signs CertificateVerify with pure ML-DSA and the empty context string
//! (draft-ietf-tls-mldsa): the message rustls hands over (64 spaces, the context label,
//! 0x00, the transcript hash) is signed as-is. The signature comes from the backend's key:
//! `fips204` (a copy of the identity) in a normal build, aws-lc-rs (a key pair derived from
//! the same seed ξ) with the `aws-lc` feature.

use std::fmt;
use std::sync::Arc;

use super::backend::{Backend, DefaultBackend};
use super::verify::spki_for;
use super::TlsConfigError;
use crate::identity::{Identity, PeerId};
use rustls::pki_types::{CertificateDer, SubjectPublicKeyInfoDer};
use rustls::sign::{CertifiedKey, Signer, SigningKey};
use rustls::{SignatureAlgorithm, SignatureScheme};

/// The ML-DSA context string of TLS handshake signatures (pure ML-DSA, empty context).
pub(crate) const TLS_SIGNATURE_CONTEXT: &[u8] = b"";

/// The identity as a rustls [`CertifiedKey`] over the default backend: the "certificate
/// chain" is the one 1974-byte SPKI, the key signs with ML-DSA-65.
pub(crate) fn certified_key(identity: &Identity) -> Result<Arc<CertifiedKey>, TlsConfigError> {
    certified_key_with::<DefaultBackend>(identity)
}

/// [`certified_key`] over backend `B`.
pub(crate) fn certified_key_with<B: Backend>(identity: &Identity) -> Result<Arc<CertifiedKey>, TlsConfigError> {
    certified_key_with_spki::<B>(identity, spki_for(identity.public()))
}

/// A key that presents `spki` and signs with `identity`. Only [`certified_key`] pairs them
/// correctly; tests use this to build a liar.
pub(crate) fn certified_key_with_spki<B: Backend>(
    identity: &Identity,
    spki: Vec<u8>,
) -> Result<Arc<CertifiedKey>, TlsConfigError> {
    let key = Arc::new(MlDsaSigningKey::<B> {
        key: Arc::new(B::mldsa65_key(identity)?),
        peer_id: identity.peer_id(),
        spki: spki.clone(),
    });
    Ok(Arc::new(CertifiedKey::new(vec![CertificateDer::from(spki)], key)))
}

/// The node's ML-DSA-65 key as a [`SigningKey`]; offers only `ML_DSA_65` (0x0905).
pub(crate) struct MlDsaSigningKey<B: Backend> {
    key: Arc<B::MlDsaKey>,
    peer_id: PeerId,
    spki: Vec<u8>,
}

impl<B: Backend> fmt::Debug for MlDsaSigningKey<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MlDsaSigningKey")
            .field("peer_id", &self.peer_id)
            .field("backend", &B::NAME)
            .finish_non_exhaustive()
    }
}

impl<B: Backend> SigningKey for MlDsaSigningKey<B> {
    fn choose_scheme(&self, offered: &[SignatureScheme]) -> Option<Box<dyn Signer>> {
        if offered.contains(&SignatureScheme::ML_DSA_65) {
            Some(Box::new(MlDsaSigner::<B> { key: self.key.clone(), peer_id: self.peer_id }))
        } else {
            None
        }
    }

    fn public_key(&self) -> Option<SubjectPublicKeyInfoDer<'_>> {
        Some(SubjectPublicKeyInfoDer::from(&self.spki[..]))
    }

    /// rustls has no ML-DSA variant; this is only consulted for TLS 1.2 suite selection,
    /// which we never do. 0x05 is the low byte of the scheme code point.
    fn algorithm(&self) -> SignatureAlgorithm {
        SignatureAlgorithm::Unknown(0x05)
    }
}

struct MlDsaSigner<B: Backend> {
    key: Arc<B::MlDsaKey>,
    peer_id: PeerId,
}

impl<B: Backend> fmt::Debug for MlDsaSigner<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("MlDsaSigner").field(&self.peer_id).field(&B::NAME).finish()
    }
}

impl<B: Backend> Signer for MlDsaSigner<B> {
    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, rustls::Error> {
        B::mldsa65_sign(&self.key, message)
    }

    fn scheme(&self) -> SignatureScheme {
        SignatureScheme::ML_DSA_65
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::{PublicIdentity, SIGNATURE_LEN};
    use zeroize::Zeroizing;

    #[test]
    fn signs_only_ml_dsa_65_with_the_empty_context() {
        let id = Identity::from_seed(Zeroizing::new([3u8; 32]));
        let ck = certified_key(&id).unwrap();
        assert_eq!(ck.cert.len(), 1);
        assert_eq!(ck.cert[0].as_ref(), &spki_for(id.public())[..]);
        assert_eq!(ck.key.public_key().unwrap().as_ref(), ck.cert[0].as_ref());
        assert!(ck.key.choose_scheme(&[SignatureScheme::ED25519, SignatureScheme::ML_DSA_44]).is_none());
        let signer = ck.key.choose_scheme(&[SignatureScheme::ED25519, SignatureScheme::ML_DSA_65]).unwrap();
        assert_eq!(signer.scheme(), SignatureScheme::ML_DSA_65);
        let sig = signer.sign(b"transcript").unwrap();
        assert_eq!(sig.len(), SIGNATURE_LEN);
        let public = PublicIdentity::from_bytes(id.public().as_bytes()).unwrap();
        public.verify(b"transcript", &sig, b"").unwrap();
        assert!(public.verify(b"transcript", &sig, b"antmesh").is_err());
    }
}
