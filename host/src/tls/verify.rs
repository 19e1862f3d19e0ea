//! Verification: peers are authenticated by RFC 7250 raw public keys, i.e. a bare
//! SubjectPublicKeyInfo carrying an ML-DSA-65 key, and nothing else (no X.509, no CAs, no
//! names). Who the peer *is* follows from the key: its [`PeerId`].
//!
//! The SPKI has exactly one DER encoding, 1974 bytes:
//!
//! ```text
//! 30 82 07 b2                                   SEQUENCE, 1970 bytes
//!    30 0b 06 09 60 86 48 01 65 03 04 03 12     AlgorithmIdentifier { id-ml-dsa-65 } (no parameters)
//!    03 82 07 a1 00                             BIT STRING, 1953 bytes, 0 unused bits
//!       <1952-byte ML-DSA-65 public key>
//! ```
//!
//! id-ml-dsa-65 is OID 2.16.840.1.101.3.4.3.18 (RFC 9881). The same bytes come out of
//! `rustls::sign::public_key_to_spki` and ant-quic's `create_subject_public_key_info`.

use std::fmt;
use std::marker::PhantomData;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls13_signature_with_raw_key, WebPkiSupportedAlgorithms};
use rustls::pki_types::{
    alg_id, AlgorithmIdentifier, CertificateDer, InvalidSignature, ServerName, SignatureVerificationAlgorithm,
    SubjectPublicKeyInfoDer, UnixTime,
};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, Error, OtherError, SignatureScheme};

use super::backend::{Backend, DefaultBackend};
use crate::identity::{PeerId, PublicIdentity, PUBLIC_KEY_LEN};

/// Bytes in the DER SubjectPublicKeyInfo of an ML-DSA-65 key.
pub const SPKI_LEN: usize = 1974;
/// The algorithm's OID, id-ml-dsa-65.
pub const ML_DSA_65_OID: &str = "2.16.840.1.101.3.4.3.18";

/// SEQUENCE header of the whole SPKI.
const SPKI_SEQUENCE: [u8; 4] = [0x30, 0x82, 0x07, 0xb2];
/// AlgorithmIdentifier: SEQUENCE { OID 2.16.840.1.101.3.4.3.18 }, no parameters.
const ALGORITHM: [u8; 13] = [0x30, 0x0b, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x03, 0x12];
/// BIT STRING header: 1953 bytes, of which the first says "0 unused bits".
const KEY_BIT_STRING: [u8; 5] = [0x03, 0x82, 0x07, 0xa1, 0x00];
const KEY_OFFSET: usize = SPKI_SEQUENCE.len() + ALGORITHM.len() + KEY_BIT_STRING.len();

/// Why bytes are not the SPKI of an ML-DSA-65 key.
#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum SpkiError {
    /// Not 1974 bytes.
    #[error("not an ML-DSA-65 SubjectPublicKeyInfo ({len} bytes; expected {SPKI_LEN})")]
    Length {
        /// Length given.
        len: usize,
    },
    /// The DER framing (SEQUENCE / BIT STRING headers) is not the one valid encoding.
    #[error("malformed SubjectPublicKeyInfo DER")]
    Encoding,
    /// The AlgorithmIdentifier is not id-ml-dsa-65 without parameters.
    #[error("SubjectPublicKeyInfo algorithm is not id-ml-dsa-65 ({ML_DSA_65_OID}) without parameters")]
    Algorithm,
    /// The 1952 key bytes are not a valid ML-DSA-65 public key.
    #[error("SubjectPublicKeyInfo does not hold a valid ML-DSA-65 public key")]
    PublicKey,
}

/// The DER SubjectPublicKeyInfo (1974 bytes) of `public`: what a node presents in TLS.
pub fn spki_for(public: &PublicIdentity) -> Vec<u8> {
    rustls::sign::public_key_to_spki(&alg_id::ML_DSA_65, public.as_bytes()).as_ref().to_vec()
}

/// Parses an ML-DSA-65 SubjectPublicKeyInfo (exact DER, no trailing bytes) into the key.
pub fn public_identity_from_spki(spki_der: &[u8]) -> Result<PublicIdentity, SpkiError> {
    PublicIdentity::from_bytes(spki_key(spki_der)?).map_err(|_| SpkiError::PublicKey)
}

/// The 1952 key bytes of an ML-DSA-65 SubjectPublicKeyInfo, checked for the exact DER
/// framing and OID. Not decoded: every 1952-byte string is an encoding FIPS 204's pkDecode
/// accepts, and decoding (an NTT of t1, ~21 µs with `fips204`) is work the signature check
/// does anyway; a handshake used to pay it four times over.
fn spki_key(spki_der: &[u8]) -> Result<&[u8; PUBLIC_KEY_LEN], SpkiError> {
    if spki_der.len() != SPKI_LEN {
        return Err(SpkiError::Length { len: spki_der.len() });
    }
    let (sequence, rest) = spki_der.split_at(SPKI_SEQUENCE.len());
    let (algorithm, rest) = rest.split_at(ALGORITHM.len());
    let (bit_string, key) = rest.split_at(KEY_BIT_STRING.len());
    if sequence != SPKI_SEQUENCE || bit_string != KEY_BIT_STRING {
        return Err(SpkiError::Encoding);
    }
    if algorithm != ALGORITHM {
        return Err(SpkiError::Algorithm);
    }
    debug_assert_eq!((KEY_OFFSET, key.len()), (SPKI_LEN - PUBLIC_KEY_LEN, PUBLIC_KEY_LEN));
    key.try_into().map_err(|_| SpkiError::Length { len: spki_der.len() })
}

/// The [`PeerId`] of the node whose SubjectPublicKeyInfo this is (1974 bytes, OID
/// 2.16.840.1.101.3.4.3.18).
pub fn peer_id_from_spki(spki_der: &[u8]) -> Result<PeerId, SpkiError> {
    spki_key(spki_der).map(PeerId::from_public_key)
}

/// Why the peer's key was refused during the handshake. Carried inside the rustls error
/// (`Error::InvalidCertificate(CertificateError::Other(..))`); get it back with
/// [`peer_verify_error`].
#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum PeerVerifyError {
    /// The presented key is not an ML-DSA-65 SPKI.
    #[error("peer key refused: {0}")]
    Spki(#[from] SpkiError),
    /// The key is valid but belongs to another node than the one dialled.
    #[error("peer is {actual}, not the expected {expected}")]
    WrongPeer {
        /// The PeerId the client asked for.
        expected: PeerId,
        /// The PeerId of the key presented.
        actual: PeerId,
    },
    /// More than one certificate entry: a raw public key stands alone.
    #[error("peer sent {extra} certificate(s) after its raw public key")]
    Chain {
        /// Entries after the first.
        extra: usize,
    },
}

impl From<PeerVerifyError> for Error {
    fn from(e: PeerVerifyError) -> Error {
        Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(e))))
    }
}

/// The [`PeerVerifyError`] inside a rustls handshake error, if that is what failed it.
pub fn peer_verify_error(error: &Error) -> Option<&PeerVerifyError> {
    match error {
        Error::InvalidCertificate(CertificateError::Other(OtherError(inner))) => inner.downcast_ref(),
        _ => None,
    }
}

/// Why no authenticated peer key is available.
#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum PeerIdentityError {
    /// The handshake has not (yet) authenticated the peer.
    #[error("the peer has not been authenticated")]
    NotAuthenticated,
    /// The authenticated key does not parse (cannot happen after our verifiers accepted it).
    #[error(transparent)]
    Spki(#[from] SpkiError),
}

/// The peer's authenticated key after the handshake. Pass
/// `conn.peer_certificates()` (rustls) or the certificates of quinn's `peer_identity()`.
pub fn peer_identity(peer_certificates: Option<&[CertificateDer<'_>]>) -> Result<PublicIdentity, PeerIdentityError> {
    let first = peer_certificates.and_then(|c| c.first()).ok_or(PeerIdentityError::NotAuthenticated)?;
    Ok(public_identity_from_spki(first.as_ref())?)
}

// ---------------------------------------------------------------------------------------
// Signature verification

/// ML-DSA-65 (pure, empty context) over backend `B` as a webpki signature verification
/// algorithm.
pub(crate) struct MlDsa65Verify<B>(PhantomData<fn() -> B>);

impl<B> MlDsa65Verify<B> {
    pub(crate) const NEW: Self = MlDsa65Verify(PhantomData);
}

impl<B: Backend> fmt::Debug for MlDsa65Verify<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MlDsa65Verify({})", B::NAME)
    }
}

impl<B: Backend> SignatureVerificationAlgorithm for MlDsa65Verify<B> {
    fn verify_signature(&self, public_key: &[u8], message: &[u8], signature: &[u8]) -> Result<(), InvalidSignature> {
        if B::mldsa65_verify(public_key, message, signature) {
            Ok(())
        } else {
            Err(InvalidSignature)
        }
    }

    fn public_key_alg_id(&self) -> AlgorithmIdentifier {
        alg_id::ML_DSA_65
    }

    fn signature_alg_id(&self) -> AlgorithmIdentifier {
        alg_id::ML_DSA_65
    }
}

/// ML-DSA-65 (scheme 0x0905) and nothing else, over backend `$b`.
macro_rules! ml_dsa_65_algorithms {
    ($b:ty) => {
        WebPkiSupportedAlgorithms {
            all: &[&MlDsa65Verify::<$b>::NEW],
            mapping: &[(SignatureScheme::ML_DSA_65, &[&MlDsa65Verify::<$b>::NEW])],
        }
    };
}

/// The provider's signature verification algorithms: ML-DSA-65 (scheme 0x0905) and
/// nothing else, over the build's default backend.
pub static ML_DSA_65_ALGORITHMS: WebPkiSupportedAlgorithms = ml_dsa_65_algorithms!(DefaultBackend);

/// The same over the RustCrypto backend, when the default is aws-lc (`Primitives::RustCrypto`).
#[cfg(feature = "aws-lc")]
pub(crate) static RUSTCRYPTO_ML_DSA_65_ALGORITHMS: WebPkiSupportedAlgorithms =
    ml_dsa_65_algorithms!(super::rustcrypto::RustCrypto);

/// The one scheme offered and accepted, in ClientHello and CertificateRequest alike.
pub(crate) fn supported_schemes() -> Vec<SignatureScheme> {
    vec![SignatureScheme::ML_DSA_65]
}

/// Checks the certificate list is one well-formed ML-DSA-65 SPKI and returns its PeerId
/// (the key itself is proven by the CertificateVerify signature that follows).
fn check_presented_key(
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
) -> Result<PeerId, PeerVerifyError> {
    if !intermediates.is_empty() {
        return Err(PeerVerifyError::Chain { extra: intermediates.len() });
    }
    Ok(peer_id_from_spki(end_entity.as_ref())?)
}

/// CertificateVerify: the signature must be ML-DSA-65 (0x0905) by the presented key.
fn verify_handshake_signature(
    message: &[u8],
    cert: &CertificateDer<'_>,
    dss: &DigitallySignedStruct,
    algorithms: &WebPkiSupportedAlgorithms,
) -> Result<HandshakeSignatureValid, Error> {
    // Parsed by us first (strict, typed errors), then rustls maps the scheme: anything but
    // ML_DSA_65 is `SignedHandshakeWithUnadvertisedSigScheme`.
    spki_key(cert.as_ref()).map_err(PeerVerifyError::from)?;
    verify_tls13_signature_with_raw_key(message, &SubjectPublicKeyInfoDer::from(cert.as_ref()), dss, algorithms)
}

/// Unreachable: TLS 1.2 is not compiled in (rustls without `tls12`).
fn tls12_refused() -> Error {
    Error::General("TLS 1.2 is not supported".into())
}

/// The client's view of the server: any ML-DSA-65 raw public key, or the key of one
/// expected [`PeerId`]. Does not ask for the `server_certificate_type` extension (ant-quic
/// servers don't negotiate it; the bare SPKI arrives in an X.509-typed entry).
#[derive(Debug)]
pub(crate) struct ServerKeyVerifier {
    pub(crate) expected: Option<PeerId>,
    /// CertificateVerify: [`ML_DSA_65_ALGORITHMS`] unless another backend was chosen.
    pub(crate) algorithms: &'static WebPkiSupportedAlgorithms,
}

impl ServerKeyVerifier {
    /// Over the default backend.
    pub(crate) fn new(expected: Option<PeerId>) -> Self {
        ServerKeyVerifier { expected, algorithms: &ML_DSA_65_ALGORITHMS }
    }
}

impl ServerCertVerifier for ServerKeyVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        let actual = check_presented_key(end_entity, intermediates)?;
        if let Some(expected) = self.expected {
            if actual != expected {
                return Err(PeerVerifyError::WrongPeer { expected, actual }.into());
            }
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        Err(tls12_refused())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_handshake_signature(message, cert, dss, self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        supported_schemes()
    }

    fn requires_raw_public_keys(&self) -> bool {
        false
    }
}

/// The server's view of the client: client authentication is mandatory, by an ML-DSA-65
/// raw public key (`client_certificate_type` = RawPublicKey is required).
#[derive(Debug)]
pub(crate) struct ClientKeyVerifier {
    /// CertificateVerify: [`ML_DSA_65_ALGORITHMS`] unless another backend was chosen.
    pub(crate) algorithms: &'static WebPkiSupportedAlgorithms,
}

impl Default for ClientKeyVerifier {
    /// Over the default backend.
    fn default() -> Self {
        ClientKeyVerifier { algorithms: &ML_DSA_65_ALGORITHMS }
    }
}

impl ClientCertVerifier for ClientKeyVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        check_presented_key(end_entity, intermediates)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        Err(tls12_refused())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_handshake_signature(message, cert, dss, self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        supported_schemes()
    }

    fn requires_raw_public_keys(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::Identity;
    use zeroize::Zeroizing;

    fn identity(seed: u8) -> Identity {
        Identity::from_seed(Zeroizing::new([seed; 32]))
    }

    #[test]
    fn spki_is_the_one_der_encoding() {
        let id = identity(1);
        let spki = spki_for(id.public());
        assert_eq!(spki.len(), SPKI_LEN);
        assert_eq!(&spki[..4], &SPKI_SEQUENCE);
        assert_eq!(&spki[4..17], &ALGORITHM);
        assert_eq!(&spki[17..22], &KEY_BIT_STRING);
        assert_eq!(&spki[KEY_OFFSET..], &id.public().as_bytes()[..]);
        // rustls' AlgorithmIdentifier is the SEQUENCE's content.
        assert_eq!(alg_id::ML_DSA_65.as_ref(), &ALGORITHM[2..]);
        assert_eq!(peer_id_from_spki(&spki), Ok(id.peer_id()));
    }

    proptest::proptest! {
        /// Round trip: any 1952 key bytes framed by `spki_for` parse back to the same key
        /// and PeerId; and any change to one byte of the 22-byte framing is refused.
        #[test]
        fn spki_round_trip_and_every_framing_byte_matters(
            key in proptest::collection::vec(proptest::prelude::any::<u8>(), PUBLIC_KEY_LEN),
            at in 0usize..KEY_OFFSET,
            flip in 1u8..=255,
        ) {
            let public = PublicIdentity::from_bytes(&key).unwrap();
            let spki = spki_for(&public);
            let back = public_identity_from_spki(&spki).unwrap();
            proptest::prop_assert_eq!(&back.as_bytes()[..], &key[..]);
            proptest::prop_assert_eq!(peer_id_from_spki(&spki), Ok(public.peer_id()));
            let mut bad = spki;
            bad[at] ^= flip;
            proptest::prop_assert!(peer_id_from_spki(&bad).is_err());
        }
    }

    #[test]
    fn malformed_spkis_are_refused() {
        let spki = spki_for(identity(1).public());
        assert_eq!(peer_id_from_spki(&spki[..SPKI_LEN - 1]), Err(SpkiError::Length { len: SPKI_LEN - 1 }));
        let mut trailing = spki.clone();
        trailing.push(0);
        assert_eq!(peer_id_from_spki(&trailing), Err(SpkiError::Length { len: SPKI_LEN + 1 }));
        // ML-DSA-44's OID (…3.17) instead of …3.18.
        let mut oid = spki.clone();
        oid[16] = 0x11;
        assert_eq!(peer_id_from_spki(&oid), Err(SpkiError::Algorithm));
        let mut framing = spki.clone();
        framing[21] = 0x01; // unused bits
        assert_eq!(peer_id_from_spki(&framing), Err(SpkiError::Encoding));
        let mut outer = spki;
        outer[0] = 0x31;
        assert_eq!(peer_id_from_spki(&outer), Err(SpkiError::Encoding));
    }

    #[test]
    fn peer_identity_needs_an_authenticated_key() {
        assert_eq!(peer_identity(None).err(), Some(PeerIdentityError::NotAuthenticated));
        assert_eq!(peer_identity(Some(&[])).err(), Some(PeerIdentityError::NotAuthenticated));
        let id = identity(4);
        let certs = [CertificateDer::from(spki_for(id.public()))];
        assert_eq!(peer_identity(Some(&certs)).unwrap().peer_id(), id.peer_id());
    }

    #[test]
    fn typed_errors_survive_the_rustls_error() {
        let e: Error = PeerVerifyError::Chain { extra: 2 }.into();
        assert_eq!(peer_verify_error(&e), Some(&PeerVerifyError::Chain { extra: 2 }));
        assert_eq!(peer_verify_error(&Error::DecryptError), None);
        let verifier = ServerKeyVerifier::new(None);
        let spki = CertificateDer::from(spki_for(identity(1).public()));
        let err = verifier
            .verify_server_cert(
                &spki,
                std::slice::from_ref(&spki),
                &ServerName::try_from("antmesh").unwrap(),
                &[],
                UnixTime::now(),
            )
            .unwrap_err();
        assert_eq!(peer_verify_error(&err), Some(&PeerVerifyError::Chain { extra: 1 }));
    }
}
