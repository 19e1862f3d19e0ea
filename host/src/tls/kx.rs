//! Key exchange: ML-KEM-768 (FIPS 203) as the TLS 1.3 named group `MLKEM768` (0x0201).
//!
//! A KEM maps onto TLS 1.3's key_share like this: the client's share is a fresh
//! encapsulation key (1184 bytes); the server encapsulates to it and answers with the
//! ciphertext (1088 bytes); both sides end with the same 32-byte shared secret. The server
//! therefore never calls [`SupportedKxGroup::start`]; rustls calls
//! [`SupportedKxGroup::start_and_complete`], which we override (the default, `start()` then
//! `complete()`, is only right for Diffie-Hellman).
//!
//! Randomness comes from `getrandom` with a returned error (the crate's own `getrandom`
//! feature would panic inside the crate if the OS RNG failed).

use ml_kem::array::Array;
use ml_kem::ml_kem_768::{DecapsulationKey, EncapsulationKey};
use ml_kem::{Decapsulate, KeyExport};
use rustls::crypto::{ActiveKeyExchange, CompletedKeyExchange, SharedSecret, SupportedKxGroup};
use rustls::ffdhe_groups::FfdheGroup;
use rustls::{Error, NamedGroup, PeerMisbehaved, ProtocolVersion};
use zeroize::Zeroizing;

/// Bytes in an ML-KEM-768 encapsulation key: the client's key share.
pub const MLKEM768_ENCAPSULATION_KEY_LEN: usize = 1184;
/// Bytes in an ML-KEM-768 ciphertext: the server's key share.
pub const MLKEM768_CIPHERTEXT_LEN: usize = 1088;

/// The ML-KEM-768 key-exchange group (TLS 1.3 only). Use the [`MLKEM768`] static.
#[derive(Debug)]
pub struct MlKem768Group;

/// The only key-exchange group of [`super::provider`].
pub static MLKEM768: MlKem768Group = MlKem768Group;

fn invalid_share() -> Error {
    Error::PeerMisbehaved(PeerMisbehaved::InvalidKeyShare)
}

fn random<const N: usize>() -> Result<Zeroizing<[u8; N]>, Error> {
    let mut out = Zeroizing::new([0u8; N]);
    getrandom::getrandom(out.as_mut()).map_err(|_| Error::FailedToGetRandomBytes)?;
    Ok(out)
}

impl SupportedKxGroup for MlKem768Group {
    /// Client side: a fresh key pair; the encapsulation key is the key share.
    fn start(&self) -> Result<Box<dyn ActiveKeyExchange>, Error> {
        let seed = random::<64>()?;
        let dk = DecapsulationKey::from_seed(Array::from(*seed));
        let ek = dk.encapsulation_key().to_bytes().to_vec();
        Ok(Box::new(MlKem768Active { dk, ek }))
    }

    /// Server side: encapsulate to the client's share; the ciphertext is our share.
    fn start_and_complete(&self, client_share: &[u8]) -> Result<CompletedKeyExchange, Error> {
        let bytes: &[u8; MLKEM768_ENCAPSULATION_KEY_LEN] = client_share.try_into().map_err(|_| invalid_share())?;
        // `new` also performs the FIPS 203 §7.2 modulus check.
        let ek = EncapsulationKey::new(&Array::from(*bytes)).map_err(|_| invalid_share())?;
        let m = random::<32>()?;
        let (ct, ss) = ek.encapsulate_deterministic(&Array::from(*m));
        let ss = Zeroizing::new(ss);
        Ok(CompletedKeyExchange { group: self.name(), pub_key: ct.to_vec(), secret: SharedSecret::from(&ss[..]) })
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
struct MlKem768Active {
    dk: DecapsulationKey,
    ek: Vec<u8>,
}

impl ActiveKeyExchange for MlKem768Active {
    /// `ciphertext` is the server's key share.
    fn complete(self: Box<Self>, ciphertext: &[u8]) -> Result<SharedSecret, Error> {
        if ciphertext.len() != MLKEM768_CIPHERTEXT_LEN {
            return Err(invalid_share());
        }
        // A wrong-but-well-sized ciphertext yields a pseudo-random secret (implicit
        // rejection); the handshake then fails at Finished.
        let ss = Zeroizing::new(self.dk.decapsulate_slice(ciphertext).map_err(|_| invalid_share())?);
        Ok(SharedSecret::from(&ss[..]))
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
