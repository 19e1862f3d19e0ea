//! Key exchange: ML-KEM-768 (FIPS 203) as the TLS 1.3 named group `MLKEM768` (0x0201).
//!
//! A KEM maps onto TLS 1.3's key_share like this: the client's share is a fresh
//! encapsulation key (1184 bytes); the server encapsulates to it and answers with the
//! ciphertext (1088 bytes); both sides end with the same 32-byte shared secret. The server
//! therefore never calls [`SupportedKxGroup::start`]; rustls calls
//! [`SupportedKxGroup::start_and_complete`], which we override (the default, `start()` then
//! `complete()`, is only right for Diffie-Hellman).
//!
//! The primitives come from the build's [`Backend`] (RustCrypto `ml-kem`, or aws-lc-rs with
//! the `aws-lc` feature); [`MlKem768`] is the group over any backend, [`MlKem768Group`] the
//! public one over the default backend.

use std::fmt;
use std::marker::PhantomData;

use rustls::crypto::{ActiveKeyExchange, CompletedKeyExchange, SharedSecret, SupportedKxGroup};
use rustls::ffdhe_groups::FfdheGroup;
use rustls::{Error, NamedGroup, PeerMisbehaved, ProtocolVersion};

use super::backend::{Backend, DefaultBackend, MLKEM768_CT_LEN, MLKEM768_EK_LEN};

/// Bytes in an ML-KEM-768 encapsulation key: the client's key share.
pub const MLKEM768_ENCAPSULATION_KEY_LEN: usize = MLKEM768_EK_LEN;
/// Bytes in an ML-KEM-768 ciphertext: the server's key share.
pub const MLKEM768_CIPHERTEXT_LEN: usize = MLKEM768_CT_LEN;

/// The ML-KEM-768 key-exchange group (TLS 1.3 only). Use the [`MLKEM768`] static.
#[derive(Debug)]
pub struct MlKem768Group;

/// The only key-exchange group of [`super::provider`].
pub static MLKEM768: MlKem768Group = MlKem768Group;

/// The error for a key share that is not a valid ML-KEM-768 key or ciphertext.
pub(crate) fn invalid_share() -> Error {
    Error::PeerMisbehaved(PeerMisbehaved::InvalidKeyShare)
}

impl SupportedKxGroup for MlKem768Group {
    fn start(&self) -> Result<Box<dyn ActiveKeyExchange>, Error> {
        MlKem768::<DefaultBackend>::NEW.start()
    }

    fn start_and_complete(&self, client_share: &[u8]) -> Result<CompletedKeyExchange, Error> {
        MlKem768::<DefaultBackend>::NEW.start_and_complete(client_share)
    }

    fn ffdhe_group(&self) -> Option<FfdheGroup<'static>> {
        None
    }

    fn name(&self) -> NamedGroup {
        NamedGroup::MLKEM768
    }

    fn usable_for_version(&self, version: ProtocolVersion) -> bool {
        version == ProtocolVersion::TLSv1_3
    }
}

/// ML-KEM-768 over backend `B`.
pub(crate) struct MlKem768<B>(PhantomData<fn() -> B>);

impl<B> MlKem768<B> {
    pub(crate) const NEW: Self = MlKem768(PhantomData);
}

impl<B: Backend> fmt::Debug for MlKem768<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MlKem768({})", B::NAME)
    }
}

impl<B: Backend> SupportedKxGroup for MlKem768<B> {
    /// Client side: a fresh key pair; the encapsulation key is the key share.
    fn start(&self) -> Result<Box<dyn ActiveKeyExchange>, Error> {
        let (dk, ek) = B::mlkem768_generate()?;
        Ok(Box::new(MlKem768Active::<B> { dk, ek }))
    }

    /// Server side: encapsulate to the client's share; the ciphertext is our share.
    fn start_and_complete(&self, client_share: &[u8]) -> Result<CompletedKeyExchange, Error> {
        let ek: &[u8; MLKEM768_EK_LEN] = client_share.try_into().map_err(|_| invalid_share())?;
        let (ct, secret) = B::mlkem768_encapsulate(ek)?;
        Ok(CompletedKeyExchange { group: self.name(), pub_key: ct, secret })
    }

    fn ffdhe_group(&self) -> Option<FfdheGroup<'static>> {
        None
    }

    fn name(&self) -> NamedGroup {
        NamedGroup::MLKEM768
    }

    fn usable_for_version(&self, version: ProtocolVersion) -> bool {
        version == ProtocolVersion::TLSv1_3
    }
}

/// A client's pending exchange: the decapsulation key (zeroized on drop) and its share.
struct MlKem768Active<B: Backend> {
    dk: B::MlKemDecapsulationKey,
    ek: Vec<u8>,
}

impl<B: Backend> ActiveKeyExchange for MlKem768Active<B> {
    /// `ciphertext` is the server's key share.
    fn complete(self: Box<Self>, ciphertext: &[u8]) -> Result<SharedSecret, Error> {
        let ct: &[u8; MLKEM768_CT_LEN] = ciphertext.try_into().map_err(|_| invalid_share())?;
        // A wrong-but-well-sized ciphertext yields a pseudo-random secret (implicit
        // rejection); the handshake then fails at Finished.
        B::mlkem768_decapsulate(&self.dk, ct)
    }

    fn pub_key(&self) -> &[u8] {
        &self.ek
    }

    fn ffdhe_group(&self) -> Option<FfdheGroup<'static>> {
        None
    }

    fn group(&self) -> NamedGroup {
        NamedGroup::MLKEM768
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_and_server_agree() {
        let client = MLKEM768.start().unwrap();
        assert_eq!(client.pub_key().len(), MLKEM768_ENCAPSULATION_KEY_LEN);
        assert_eq!(client.group(), NamedGroup::MLKEM768);
        let server = MLKEM768.start_and_complete(client.pub_key()).unwrap();
        assert_eq!(server.pub_key.len(), MLKEM768_CIPHERTEXT_LEN);
        assert_eq!(server.group, NamedGroup::MLKEM768);
        let secret = client.complete(&server.pub_key).unwrap();
        assert_eq!(secret.secret_bytes().len(), 32);
        assert_eq!(secret.secret_bytes(), server.secret.secret_bytes());
    }

    #[test]
    fn wrong_lengths_are_invalid_key_shares() {
        let client = MLKEM768.start().unwrap();
        let ek = client.pub_key().to_vec();
        assert!(matches!(
            MLKEM768.start_and_complete(&ek[..100]),
            Err(Error::PeerMisbehaved(PeerMisbehaved::InvalidKeyShare))
        ));
        // An encapsulation key whose coefficients are not reduced mod q fails the modulus check.
        assert!(matches!(
            MLKEM768.start_and_complete(&[0xff; MLKEM768_ENCAPSULATION_KEY_LEN]),
            Err(Error::PeerMisbehaved(PeerMisbehaved::InvalidKeyShare))
        ));
        assert!(matches!(client.complete(&[0u8; 32]), Err(Error::PeerMisbehaved(PeerMisbehaved::InvalidKeyShare))));
        assert!(MLKEM768.usable_for_version(ProtocolVersion::TLSv1_3));
        assert!(!MLKEM768.usable_for_version(ProtocolVersion::TLSv1_2));
    }
}
