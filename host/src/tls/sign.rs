//! Signing: the node's ML-DSA-65 [`Identity`] as a rustls signing key, presented as an
//! RFC 7250 raw public key (a bare SubjectPublicKeyInfo, see [`super::verify`]).
//!
//! TLS 1.3 signs CertificateVerify with pure ML-DSA and the empty context string
//! (draft-ietf-tls-mldsa): the message rustls hands over (64 spaces, the context label,
//! 0x00, the transcript hash) is signed as-is.

use std::sync::Arc;

use rustls::pki_types::{CertificateDer, SubjectPublicKeyInfoDer};
use rustls::sign::{CertifiedKey, Signer, SigningKey};
use rustls::{SignatureAlgorithm, SignatureScheme};
use zeroize::Zeroizing;

use super::verify::spki_for;
use crate::identity::Identity;

/// The ML-DSA context string of TLS handshake signatures (pure ML-DSA, empty context).
pub(crate) const TLS_SIGNATURE_CONTEXT: &[u8] = b"";

/// A copy of the node's identity held by a rustls config (configs outlive the borrow the
/// builders take). Re-derived from the seed, so no private key bytes are copied around.
pub(crate) fn own_copy(identity: &Identity) -> Arc<Identity> {
    let mut seed = Zeroizing::new([0u8; 32]);
    seed.copy_from_slice(identity.seed());
    Arc::new(Identity::from_seed(seed))
}

/// The identity as a rustls [`CertifiedKey`]: the "certificate chain" is the one 1974-byte
/// SPKI, the key signs with ML-DSA-65.
pub(crate) fn certified_key(identity: &Identity) -> Arc<CertifiedKey> {
    certified_key_with_spki(own_copy(identity), spki_for(identity.public()))
}

/// A key that presents `spki` and signs with `identity`. Only [`certified_key`] pairs them
/// correctly; tests use this to build a liar.
pub(crate) fn certified_key_with_spki(identity: Arc<Identity>, spki: Vec<u8>) -> Arc<CertifiedKey> {
    let key = Arc::new(MlDsaSigningKey { identity, spki: spki.clone() });
    Arc::new(CertifiedKey::new(vec![CertificateDer::from(spki)], key))
}

/// The node's ML-DSA-65 key as a [`SigningKey`]; offers only `ML_DSA_65` (0x0905).
pub(crate) struct MlDsaSigningKey {
    identity: Arc<Identity>,
    spki: Vec<u8>,
}

impl std::fmt::Debug for MlDsaSigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MlDsaSigningKey").field("peer_id", &self.identity.peer_id()).finish_non_exhaustive()
    }
}

impl SigningKey for MlDsaSigningKey {
    fn choose_scheme(&self, offered: &[SignatureScheme]) -> Option<Box<dyn Signer>> {
        if offered.contains(&SignatureScheme::ML_DSA_65) {
            Some(Box::new(MlDsaSigner(self.identity.clone())))
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

struct MlDsaSigner(Arc<Identity>);

impl std::fmt::Debug for MlDsaSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("MlDsaSigner").field(&self.0.peer_id()).finish()
    }
}

impl Signer for MlDsaSigner {
    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, rustls::Error> {
        self.0
            .sign(message, TLS_SIGNATURE_CONTEXT)
            .map(|sig| sig.to_vec())
            .map_err(|e| rustls::Error::General(format!("ML-DSA-65 signing failed: {e}")))
    }

    fn scheme(&self) -> SignatureScheme {
        SignatureScheme::ML_DSA_65
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::{PublicIdentity, SIGNATURE_LEN};

    #[test]
    fn signs_only_ml_dsa_65_with_the_empty_context() {
        let id = Identity::from_seed(Zeroizing::new([3u8; 32]));
        let ck = certified_key(&id);
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
