//! Destinations: what applications address instead of sockets.
//!
//! A destination is one service of one identity. Its hash is
//!
//! ```text
//! ServiceHash     = SHA-256("antmesh/v1/service" ‖ service name)[..8]
//! DestinationHash = SHA-256("antmesh/v1/destination" ‖ PeerId[32] ‖ ServiceHash[8])[..16]
//! ```
//!
//! so one identity has as many independent destinations as it has service names, and
//! anyone holding an announce's PeerId and service hash can check that the destination it
//! names belongs to that identity (PeerId is the hash of the ML-DSA-65 public key, so the
//! chain is self-certifying): an identity cannot announce another's destination.

use core::fmt;
use core::str::FromStr;

use sha2::{Digest, Sha256};

use crate::identity::PeerId;

/// Bytes of a destination hash.
pub const DEST_LEN: usize = 16;
/// Bytes of a service hash.
pub const SERVICE_HASH_LEN: usize = 8;
/// Longest service name.
pub const MAX_SERVICE_NAME: usize = 64;
/// The service name of every node's own destination.
pub const NODE_SERVICE: &str = "antmesh.node";

/// A validated service name: 1–64 bytes of `a-z 0-9 . _ - /`, e.g. `chat`, `files/v2`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceName(String);

/// Why a service name was refused.
#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
#[error("service name `{0}` must be 1–64 characters of a-z 0-9 . _ - /")]
pub struct ServiceNameError(pub String);

impl ServiceName {
    /// Validates `name`.
    pub fn new(name: &str) -> Result<ServiceName, ServiceNameError> {
        let ok = !name.is_empty()
            && name.len() <= MAX_SERVICE_NAME
            && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-/".contains(&b));
        if ok {
            Ok(ServiceName(name.to_owned()))
        } else {
            Err(ServiceNameError(name.chars().take(80).collect()))
        }
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Its hash.
    pub fn hash(&self) -> ServiceHash {
        service_hash(&self.0)
    }
}

impl fmt::Display for ServiceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for ServiceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ServiceName({})", self.0)
    }
}

fn service_hash(name: &str) -> ServiceHash {
    let mut h = Sha256::new();
    h.update(b"antmesh/v1/service");
    h.update(name.as_bytes());
    let d = h.finalize();
    let mut out = [0u8; SERVICE_HASH_LEN];
    out.copy_from_slice(&d[..SERVICE_HASH_LEN]);
    ServiceHash(out)
}

/// The hash of a service name, carried in announces so that nodes can filter by service
/// without learning names they do not already know.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceHash(pub [u8; SERVICE_HASH_LEN]);

impl fmt::Debug for ServiceHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ServiceHash({})", hex::encode(self.0))
    }
}

/// A destination: 16 bytes naming one service of one identity.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DestinationHash(pub [u8; DEST_LEN]);

impl DestinationHash {
    /// The destination of `service` at `peer`.
    pub fn new(peer: &PeerId, service: &ServiceName) -> DestinationHash {
        Self::from_parts(peer, &service.hash())
    }

    /// The node destination of `peer` (service [`NODE_SERVICE`]).
    pub fn node(peer: &PeerId) -> DestinationHash {
        Self::from_parts(peer, &service_hash(NODE_SERVICE))
    }

    /// The destination of the service with hash `service` at `peer` (what announce
    /// verification recomputes).
    pub fn from_parts(peer: &PeerId, service: &ServiceHash) -> DestinationHash {
        let mut h = Sha256::new();
        h.update(b"antmesh/v1/destination");
        h.update(peer.0);
        h.update(service.0);
        let d = h.finalize();
        let mut out = [0u8; DEST_LEN];
        out.copy_from_slice(&d[..DEST_LEN]);
        DestinationHash(out)
    }

    /// Lower-case hex.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl fmt::Display for DestinationHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for DestinationHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Dest({})", &self.to_hex()[..12])
    }
}

/// Why a destination hash did not parse.
#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
#[error("a destination is 32 hex characters")]
pub struct DestinationParseError;

impl FromStr for DestinationHash {
    type Err = DestinationParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut out = [0u8; DEST_LEN];
        hex::decode_to_slice(s, &mut out).map_err(|_| DestinationParseError)?;
        Ok(DestinationHash(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn destinations_are_deterministic_and_independent_per_service() {
        let p = PeerId([7; 32]);
        let chat = ServiceName::new("chat").unwrap();
        let files = ServiceName::new("files/v2").unwrap();
        assert_eq!(DestinationHash::new(&p, &chat), DestinationHash::new(&p, &chat));
        assert_ne!(DestinationHash::new(&p, &chat), DestinationHash::new(&p, &files));
        assert_ne!(DestinationHash::new(&p, &chat), DestinationHash::new(&PeerId([8; 32]), &chat));
        // A fixed vector, so the derivation cannot drift unnoticed (docs/mesh.md shows it).
        assert_eq!(DestinationHash::new(&PeerId([0; 32]), &chat).to_hex(), DEST_VECTOR);
        let d = DestinationHash::new(&p, &chat);
        assert_eq!(d.to_hex().parse::<DestinationHash>().unwrap(), d);
        assert_eq!(DestinationHash::node(&p), DestinationHash::new(&p, &ServiceName::new(NODE_SERVICE).unwrap()));
    }

    const DEST_VECTOR: &str = "86652cea37397da01cacd89b96de569f";

    #[test]
    fn service_names_are_validated() {
        for ok in ["a", "chat", "files/v2", "x.y_z-1", &"a".repeat(64)] {
            assert!(ServiceName::new(ok).is_ok(), "{ok}");
        }
        for bad in ["", "Chat", "a b", "é", &"a".repeat(65)] {
            assert!(ServiceName::new(bad).is_err(), "{bad}");
        }
    }
}
