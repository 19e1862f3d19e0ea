//! Announces: a signed statement "destination D of identity P is reachable, until T".
//!
//! ```text
//! body (signed, with the KEY flag masked out):
//!  0  version u8 = 1
//!  1  flags u8            KEY 0x01: the public key follows the body; APP 0x02: app data
//!  2  destination [16]    = SHA-256("antmesh/v1/destination" ‖ PeerId ‖ service hash)[..16]
//! 18  service hash [8]
//! 26  PeerId [32]
//! 58  timestamp u64       milliseconds since the Unix epoch, at the origin
//! 66  nonce [8]
//! 74  lifetime u32        seconds; the announce expires at timestamp + lifetime
//! 78  [app data]          len u16 | bytes (≤ 512), when APP
//! then [public key 1952]  when KEY (not signed: it must hash to the PeerId)
//! then signature [3309]   ML-DSA-65, context "antmesh/v1/announce", over SHA-256(body)
//! ```
//!
//! The *announce id* is SHA-256(body ‖ signature)[..16]: it names one announce instance,
//! for duplicate suppression, and lets a node that got the compact form fetch and check the
//! full one later.
//!
//! The **compact form** for constrained hops carries only the body and the id (80–600
//! bytes instead of 3.4–5.3 KB). It is accepted only from an authenticated link neighbour,
//! which vouches for having verified (or received from its own authenticated neighbour) the
//! full form; paths learnt from it are marked unverified until the full form is checked.
//! The destination binding (destination = hash of PeerId and service hash) is checked in
//! both forms, so nobody can announce another identity's destination.

use crate::identity::{Identity, PeerId, PublicIdentity, SignError, PUBLIC_KEY_LEN, SIGNATURE_LEN};
use crate::link::crypto::hash;

use super::dest::{DestinationHash, ServiceHash, DEST_LEN, SERVICE_HASH_LEN};

/// Announce format version.
pub const VERSION: u8 = 1;
/// Flag: the public key follows the body.
pub const KEY: u8 = 0x01;
/// Flag: app data is present.
pub const APP: u8 = 0x02;
/// Bytes of the fixed part of the body.
pub const FIXED_LEN: usize = 78;
/// Most app data bytes.
pub const MAX_APP_DATA: usize = 512;
/// Bytes of an announce id.
pub const ID_LEN: usize = 16;
/// ML-DSA context of announce signatures.
pub const CONTEXT: &[u8] = b"antmesh/v1/announce";

/// Why an announce was refused.
#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum AnnounceError {
    /// Wrong length, version or flags.
    #[error("malformed announce ({len} bytes)")]
    Malformed {
        /// Length.
        len: usize,
    },
    /// Unsupported version.
    #[error("announce version {0}")]
    Version(u8),
    /// The destination is not the hash of the PeerId and service hash it carries.
    #[error("destination {dest} does not belong to {peer}")]
    Binding {
        /// Claimed destination.
        dest: DestinationHash,
        /// Claimed identity.
        peer: PeerId,
    },
    /// The public key does not hash to the PeerId.
    #[error("public key does not belong to {0}")]
    KeyMismatch(PeerId),
    /// No key included and none cached.
    #[error("no public key for {0}")]
    UnknownKey(PeerId),
    /// The signature does not verify.
    #[error("announce signature from {0} does not verify")]
    BadSignature(PeerId),
    /// Signing failed.
    #[error(transparent)]
    Sign(#[from] SignError),
    /// App data over the limit.
    #[error("app data of {0} bytes exceeds {MAX_APP_DATA}")]
    AppData(usize),
}

/// The signed fields of an announce.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AnnounceBody {
    /// Destination.
    pub dest: DestinationHash,
    /// Service hash.
    pub service: ServiceHash,
    /// Origin identity.
    pub peer: PeerId,
    /// Origin time, ms since the Unix epoch.
    pub timestamp_ms: u64,
    /// Random nonce.
    pub nonce: [u8; 8],
    /// Lifetime in seconds.
    pub lifetime_s: u32,
    /// Optional application data.
    pub app_data: Vec<u8>,
}

impl AnnounceBody {
    /// Encodes the body with `flags`.
    pub fn encode(&self, flags: u8) -> Vec<u8> {
        let mut out = Vec::with_capacity(FIXED_LEN + 2 + self.app_data.len());
        let flags = if self.app_data.is_empty() { flags & !APP } else { flags | APP };
        out.extend_from_slice(&[VERSION, flags]);
        out.extend_from_slice(&self.dest.0);
        out.extend_from_slice(&self.service.0);
        out.extend_from_slice(&self.peer.0);
        out.extend_from_slice(&self.timestamp_ms.to_be_bytes());
        out.extend_from_slice(&self.nonce);
        out.extend_from_slice(&self.lifetime_s.to_be_bytes());
        if !self.app_data.is_empty() {
            out.extend_from_slice(&(self.app_data.len() as u16).to_be_bytes());
            out.extend_from_slice(&self.app_data);
        }
        out
    }

    /// Decodes a body; returns it, its flags and its length.
    pub fn decode(b: &[u8]) -> Result<(AnnounceBody, u8, usize), AnnounceError> {
        let bad = AnnounceError::Malformed { len: b.len() };
        if b.len() < FIXED_LEN {
            return Err(bad);
        }
        if b[0] != VERSION {
            return Err(AnnounceError::Version(b[0]));
        }
        let flags = b[1];
        if flags & !(KEY | APP) != 0 {
            return Err(bad);
        }
        let arr = |r: core::ops::Range<usize>| b.get(r).ok_or(bad.clone());
        let mut dest = [0u8; DEST_LEN];
        dest.copy_from_slice(arr(2..18)?);
        let mut service = [0u8; SERVICE_HASH_LEN];
        service.copy_from_slice(arr(18..26)?);
        let mut peer = [0u8; 32];
        peer.copy_from_slice(arr(26..58)?);
        let mut ts = [0u8; 8];
        ts.copy_from_slice(arr(58..66)?);
        let mut nonce = [0u8; 8];
        nonce.copy_from_slice(arr(66..74)?);
        let mut life = [0u8; 4];
        life.copy_from_slice(arr(74..78)?);
        let (app_data, len) = if flags & APP != 0 {
            let l = arr(78..80)?;
            let n = usize::from(u16::from_be_bytes([l[0], l[1]]));
            if n == 0 || n > MAX_APP_DATA {
                return Err(AnnounceError::AppData(n));
            }
            (arr(80..80 + n)?.to_vec(), 80 + n)
        } else {
            (Vec::new(), FIXED_LEN)
        };
        let body = AnnounceBody {
            dest: DestinationHash(dest),
            service: ServiceHash(service),
            peer: PeerId(peer),
            timestamp_ms: u64::from_be_bytes(ts),
            nonce,
            lifetime_s: u32::from_be_bytes(life),
            app_data,
        };
        Ok((body, flags, len))
    }

    /// Checks the destination binding.
    pub fn check_binding(&self) -> Result<(), AnnounceError> {
        if DestinationHash::from_parts(&self.peer, &self.service) != self.dest {
            return Err(AnnounceError::Binding { dest: self.dest, peer: self.peer });
        }
        Ok(())
    }

    /// When it expires, ms since the Unix epoch.
    pub fn expires_ms(&self) -> u64 {
        self.timestamp_ms.saturating_add(u64::from(self.lifetime_s) * 1000)
    }

    fn signed_digest(&self) -> [u8; 32] {
        hash(&[&self.encode(0)])
    }
}

/// A verified full announce.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Announce {
    /// The signed fields.
    pub body: AnnounceBody,
    /// The signature.
    pub signature: Box<[u8; SIGNATURE_LEN]>,
}

impl Announce {
    /// Signs a new announce for `service` at `me`.
    pub fn sign(me: &Identity, body: AnnounceBody) -> Result<Announce, AnnounceError> {
        if body.app_data.len() > MAX_APP_DATA {
            return Err(AnnounceError::AppData(body.app_data.len()));
        }
        body.check_binding()?;
        if body.peer != me.peer_id() {
            return Err(AnnounceError::KeyMismatch(body.peer));
        }
        let sig = me.sign(&body.signed_digest(), CONTEXT)?;
        Ok(Announce { body, signature: Box::new(sig) })
    }

    /// The announce id.
    pub fn id(&self) -> [u8; ID_LEN] {
        let d = hash(&[&self.body.encode(0), &self.signature[..]]);
        let mut out = [0u8; ID_LEN];
        out.copy_from_slice(&d[..ID_LEN]);
        out
    }

    /// Encodes the full form, with the public key when `key` is given.
    pub fn encode(&self, key: Option<&PublicIdentity>) -> Vec<u8> {
        let mut out = self.body.encode(if key.is_some() { KEY } else { 0 });
        if let Some(k) = key {
            out.extend_from_slice(k.as_bytes());
        }
        out.extend_from_slice(&self.signature[..]);
        out
    }

    /// Decodes and verifies a full announce. `lookup` returns a cached key by PeerId.
    /// Returns the announce and the key that verified it (to cache).
    pub fn decode_verify(
        b: &[u8],
        lookup: impl Fn(&PeerId) -> Option<PublicIdentity>,
    ) -> Result<(Announce, PublicIdentity), AnnounceError> {
        let (body, flags, n) = AnnounceBody::decode(b)?;
        let key_len = if flags & KEY != 0 { PUBLIC_KEY_LEN } else { 0 };
        if b.len() != n + key_len + SIGNATURE_LEN {
            return Err(AnnounceError::Malformed { len: b.len() });
        }
        body.check_binding()?;
        let key = if key_len > 0 {
            PublicIdentity::from_bytes_for(&b[n..n + key_len], &body.peer).map_err(|_| AnnounceError::KeyMismatch(body.peer))?
        } else {
            lookup(&body.peer).ok_or(AnnounceError::UnknownKey(body.peer))?
        };
        let sig = &b[n + key_len..];
        key.verify(&body.signed_digest(), sig, CONTEXT).map_err(|_| AnnounceError::BadSignature(body.peer))?;
        let mut signature = Box::new([0u8; SIGNATURE_LEN]);
        signature.copy_from_slice(sig);
        Ok((Announce { body, signature }, key))
    }

    /// The compact form: body and id.
    pub fn encode_compact(&self) -> Vec<u8> {
        let mut out = self.body.encode(0);
        out.extend_from_slice(&self.id());
        out
    }
}

/// A compact announce as received: the body (binding checked, signature not) and the id of
/// the full form it stands for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompactAnnounce {
    /// The fields.
    pub body: AnnounceBody,
    /// The full form's id.
    pub id: [u8; ID_LEN],
}

impl CompactAnnounce {
    /// Decodes a compact announce and checks its destination binding.
    pub fn decode(b: &[u8]) -> Result<CompactAnnounce, AnnounceError> {
        let (body, flags, n) = AnnounceBody::decode(b)?;
        if flags & KEY != 0 || b.len() != n + ID_LEN {
            return Err(AnnounceError::Malformed { len: b.len() });
        }
        body.check_binding()?;
        let mut id = [0u8; ID_LEN];
        id.copy_from_slice(&b[n..]);
        Ok(CompactAnnounce { body, id })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mesh::dest::ServiceName;
    use proptest::prelude::*;
    use zeroize::Zeroizing;

    fn body_for(me: &Identity, name: &str, app: Vec<u8>) -> AnnounceBody {
        let service = ServiceName::new(name).unwrap();
        AnnounceBody {
            dest: DestinationHash::new(&me.peer_id(), &service),
            service: service.hash(),
            peer: me.peer_id(),
            timestamp_ms: 1_700_000_000_000,
            nonce: [3; 8],
            lifetime_s: 3600,
            app_data: app,
        }
    }

    #[test]
    fn full_and_compact_forms_verify_and_have_the_expected_sizes() {
        let me = Identity::from_seed(Zeroizing::new([1; 32]));
        let a = Announce::sign(&me, body_for(&me, "chat", Vec::new())).unwrap();
        let with_key = a.encode(Some(me.public()));
        let without = a.encode(None);
        assert_eq!((with_key.len(), without.len(), a.encode_compact().len()), (78 + 1952 + 3309, 78 + 3309, 78 + 16));
        let (b, k) = Announce::decode_verify(&with_key, |_| None).unwrap();
        assert_eq!((b.id(), k.peer_id()), (a.id(), me.peer_id()));
        assert_eq!(Announce::decode_verify(&without, |_| None).err(), Some(AnnounceError::UnknownKey(me.peer_id())));
        assert!(Announce::decode_verify(&without, |_| Some(me.public().clone())).is_ok());
        let c = CompactAnnounce::decode(&a.encode_compact()).unwrap();
        assert_eq!((c.body, c.id), (a.body.clone(), a.id()));
    }

    #[test]
    fn forged_tampered_and_misbound_announces_are_refused() {
        let me = Identity::from_seed(Zeroizing::new([1; 32]));
        let other = Identity::from_seed(Zeroizing::new([2; 32]));
        let a = Announce::sign(&me, body_for(&me, "chat", b"hi".to_vec())).unwrap();
        let mut bad = a.encode(Some(me.public()));
        bad[70] ^= 1; // the nonce, inside what was signed
        assert_eq!(Announce::decode_verify(&bad, |_| None).err(), Some(AnnounceError::BadSignature(me.peer_id())));
        // Another identity's key in place of the origin's.
        let mut swapped = a.body.encode(KEY);
        swapped.extend_from_slice(other.public().as_bytes());
        swapped.extend_from_slice(&a.signature[..]);
        assert_eq!(Announce::decode_verify(&swapped, |_| None).err(), Some(AnnounceError::KeyMismatch(me.peer_id())));
        // `other` announcing `me`'s destination under its own identity: the binding fails.
        let mut stolen = body_for(&me, "chat", Vec::new());
        stolen.peer = other.peer_id();
        assert!(matches!(Announce::sign(&other, stolen.clone()), Err(AnnounceError::Binding { .. })));
        let mut compact = stolen.encode(0);
        compact.extend_from_slice(&[0; 16]);
        assert!(matches!(CompactAnnounce::decode(&compact), Err(AnnounceError::Binding { .. })));
    }

    proptest! {
        #[test]
        fn bodies_round_trip(ts in any::<u64>(), life in any::<u32>(), nonce in any::<[u8; 8]>(),
                             app in proptest::collection::vec(any::<u8>(), 0..=MAX_APP_DATA),
                             peer in any::<[u8; 32]>(), svc in any::<[u8; 8]>()) {
            let peer = PeerId(peer);
            let service = ServiceHash(svc);
            let body = AnnounceBody { dest: DestinationHash::from_parts(&peer, &service), service, peer,
                                      timestamp_ms: ts, nonce, lifetime_s: life, app_data: app };
            let bytes = body.encode(0);
            let (back, _, n) = AnnounceBody::decode(&bytes).unwrap();
            prop_assert_eq!(n, bytes.len());
            prop_assert_eq!(back, body);
        }

        #[test]
        fn arbitrary_bytes_never_panic(b in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = AnnounceBody::decode(&b);
            let _ = CompactAnnounce::decode(&b);
            let _ = Announce::decode_verify(&b, |_| None);
        }
    }
}
