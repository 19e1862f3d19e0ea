//! Sealed single packets: end-to-end encryption for one packet to a node destination,
//! without a link.
//!
//! Each node has a long-term ML-KEM-768 key pair derived from its identity seed (HKDF, so
//! it survives restarts and needs no extra file). Its encapsulation key travels in a
//! *key record* signed with the node's ML-DSA-65 identity:
//!
//! ```text
//! key record   public key [1952] | ek [1184] | ML-DSA-65 signature [3309]
//!              signature context "antmesh/v1/node-kem", message
//!              SHA-256(node destination [16] ‖ ek)
//! sealed       ct [1088] | ChaCha20-Poly1305(k, nonce 0, aad = destination, plaintext) ‖ tag [16]
//!              k = HKDF-SHA256(salt = "antmesh/v1/sealed" ‖ destination, ikm = ML-KEM shared secret)
//! ```
//!
//! The key record is checked against the destination: the public key must hash to the
//! PeerId that owns the destination, and its signature must verify. A sealed packet gives
//! confidentiality and integrity towards the destination — relays can neither read nor
//! alter it — and forward secrecy only as far as the destination's long-term key does
//! (a stolen identity seed opens recorded packets). It does **not** authenticate the
//! sender: that is what links are for. Each packet costs 1,104 bytes more than its
//! plaintext (ciphertext and tag).

use ml_kem::array::Array;
use ml_kem::ml_kem_768::{DecapsulationKey, EncapsulationKey};
use ml_kem::{Decapsulate, KeyExport};
use zeroize::Zeroizing;

use crate::identity::{Identity, PublicIdentity, PUBLIC_KEY_LEN, SIGNATURE_LEN};
use crate::link::crypto::{expand, extract, hash, PacketKey, Rng};
use crate::link::handshake::{CT_LEN, EK_LEN};

use super::dest::DestinationHash;

/// Bytes of a key record.
pub const KEY_RECORD_LEN: usize = PUBLIC_KEY_LEN + EK_LEN + SIGNATURE_LEN;
/// Bytes a sealed packet adds to its plaintext.
pub const SEALED_OVERHEAD: usize = CT_LEN + crate::link::wire::TAG_LEN;
const CONTEXT: &[u8] = b"antmesh/v1/node-kem";

/// Why sealing or opening failed.
#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum SealedError {
    /// A key record of the wrong length or with an invalid key.
    #[error("malformed key record")]
    Malformed,
    /// The record's public key does not own the destination.
    #[error("key record for {0} is signed by another identity")]
    WrongOwner(DestinationHash),
    /// The record's signature does not verify.
    #[error("key record signature does not verify")]
    BadSignature,
    /// The sealed packet is too short or fails authentication.
    #[error("sealed packet does not open")]
    Open,
    /// Signing the record failed.
    #[error(transparent)]
    Sign(#[from] crate::identity::SignError),
}

/// This node's sealing key pair.
pub struct NodeKem {
    dk: DecapsulationKey,
    ek: [u8; EK_LEN],
}

impl NodeKem {
    /// The key pair of `me`, derived from its identity seed.
    pub fn for_identity(me: &Identity) -> NodeKem {
        let prk = extract(b"antmesh/v1/node-kem", &me.seed()[..]);
        let seed = expand::<64>(&prk, b"ml-kem-768 seed");
        let dk = DecapsulationKey::from_seed(Array::from(*seed));
        let mut ek = [0u8; EK_LEN];
        ek.copy_from_slice(&dk.encapsulation_key().to_bytes());
        NodeKem { dk, ek }
    }

    /// The signed key record for this node's destination `dest`.
    pub fn record(&self, me: &Identity, dest: &DestinationHash) -> Result<Vec<u8>, SealedError> {
        let sig = me.sign(&hash(&[&dest.0, &self.ek]), CONTEXT)?;
        let mut out = Vec::with_capacity(KEY_RECORD_LEN);
        out.extend_from_slice(me.public().as_bytes());
        out.extend_from_slice(&self.ek);
        out.extend_from_slice(&sig);
        Ok(out)
    }

    /// Opens a sealed packet addressed to `dest` (this node's destination).
    pub fn open(&self, dest: &DestinationHash, sealed: &[u8]) -> Result<Vec<u8>, SealedError> {
        if sealed.len() < SEALED_OVERHEAD {
            return Err(SealedError::Open);
        }
        let (ct, body) = sealed.split_at(CT_LEN);
        let ss = Zeroizing::new(self.dk.decapsulate_slice(ct).map_err(|_| SealedError::Open)?);
        packet_key(dest, &ss[..]).open(0, &dest.0, body).map_err(|_| SealedError::Open)
    }
}

fn packet_key(dest: &DestinationHash, ss: &[u8]) -> PacketKey {
    let prk = extract(&[&b"antmesh/v1/sealed"[..], &dest.0].concat(), ss);
    PacketKey::from_secret(&prk)
}

/// A verified encapsulation key of a remote destination.
#[derive(Clone)]
pub struct RemoteKem {
    ek: [u8; EK_LEN],
}

impl RemoteKem {
    /// Checks a key record received for `dest`.
    pub fn from_record(dest: &DestinationHash, record: &[u8]) -> Result<RemoteKem, SealedError> {
        if record.len() != KEY_RECORD_LEN {
            return Err(SealedError::Malformed);
        }
        let (pk, rest) = record.split_at(PUBLIC_KEY_LEN);
        let (ek, sig) = rest.split_at(EK_LEN);
        let owner = PublicIdentity::from_bytes(pk).map_err(|_| SealedError::Malformed)?;
        if DestinationHash::node(&owner.peer_id()) != *dest {
            return Err(SealedError::WrongOwner(*dest));
        }
        owner.verify(&hash(&[&dest.0, ek]), sig, CONTEXT).map_err(|_| SealedError::BadSignature)?;
        let mut out = [0u8; EK_LEN];
        out.copy_from_slice(ek);
        EncapsulationKey::new(&Array::from(out)).map_err(|_| SealedError::Malformed)?;
        Ok(RemoteKem { ek: out })
    }

    /// Seals `plaintext` for `dest`.
    pub fn seal(&self, rng: &mut Rng, dest: &DestinationHash, plaintext: &[u8]) -> Result<Vec<u8>, SealedError> {
        let ek = EncapsulationKey::new(&Array::from(self.ek)).map_err(|_| SealedError::Malformed)?;
        let m = Zeroizing::new(rng.bytes::<32>());
        let (ct, ss) = ek.encapsulate_deterministic(&Array::from(*m));
        let ss = Zeroizing::new(ss);
        let mut body = plaintext.to_vec();
        packet_key(dest, &ss[..]).seal(0, &dest.0, &mut body).map_err(|_| SealedError::Open)?;
        let mut out = Vec::with_capacity(CT_LEN + body.len());
        out.extend_from_slice(&ct);
        out.extend_from_slice(&body);
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    fn node_dest(id: &Identity) -> DestinationHash {
        DestinationHash::node(&id.peer_id())
    }

    #[test]
    fn seal_and_open_and_what_is_refused() {
        let c = Identity::from_seed(Zeroizing::new([3; 32]));
        let x = Identity::from_seed(Zeroizing::new([4; 32]));
        let d = node_dest(&c);
        let kem = NodeKem::for_identity(&c);
        // Deterministic from the identity: the same key after a restart.
        assert_eq!(NodeKem::for_identity(&c).ek, kem.ek);
        let record = kem.record(&c, &d).unwrap();
        assert_eq!(record.len(), KEY_RECORD_LEN);
        let remote = RemoteKem::from_record(&d, &record).unwrap();
        let mut rng = Rng::from_seed([1; 32]);
        let sealed = remote.seal(&mut rng, &d, b"for c only").unwrap();
        assert_eq!(sealed.len(), 10 + SEALED_OVERHEAD);
        assert_eq!(kem.open(&d, &sealed).unwrap(), b"for c only");
        // Tampered, or opened by another node: refused.
        let mut bad = sealed.clone();
        bad[1100] ^= 1;
        assert_eq!(kem.open(&d, &bad), Err(SealedError::Open));
        assert_eq!(NodeKem::for_identity(&x).open(&node_dest(&x), &sealed), Err(SealedError::Open));
        // A record for C's destination signed by X, or claiming another destination.
        let forged = NodeKem::for_identity(&x).record(&x, &d).unwrap();
        assert_eq!(RemoteKem::from_record(&d, &forged).err(), Some(SealedError::WrongOwner(d)));
        let mut resigned = record.clone();
        resigned[PUBLIC_KEY_LEN + 5] ^= 1; // the ek, under the signature
        assert_eq!(RemoteKem::from_record(&d, &resigned).err(), Some(SealedError::BadSignature));
    }
}
