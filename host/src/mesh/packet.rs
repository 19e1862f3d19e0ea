//! Mesh packets: what neighbours send each other over their authenticated sessions (QUIC
//! streams or link sessions). Every packet starts with a type byte.
//!
//! ```text
//! 1 Announce         hops u8 | cost u16 | flags u8 | [tag 8 if RESPONSE] | full announce
//! 2 CompactAnnounce  hops u8 | cost u16 | flags u8 | [tag 8 if RESPONSE] | compact announce
//! 3 PathRequest      tag [8] | destination [16] | hops u8
//! 4 Data             destination [16] | hops u8 | payload
//! ```
//!
//! `hops` and `cost` are the per-hop, unsigned part: each relay adds one hop and its
//! link's cost. A RESPONSE announce answers the path request with that tag and travels
//! only back along the request's path instead of flooding.

use super::dest::{DestinationHash, DEST_LEN};

/// Packet type bytes.
pub mod kind {
    /// Full announce.
    pub const ANNOUNCE: u8 = 1;
    /// Compact announce.
    pub const COMPACT: u8 = 2;
    /// Path request.
    pub const PATH_REQUEST: u8 = 3;
    /// Data for a destination.
    pub const DATA: u8 = 4;
}

/// Envelope flag: the announce answers a path request.
pub const RESPONSE: u8 = 0x01;
/// Bytes of a path request tag.
pub const TAG_LEN: usize = 8;

/// Why a packet did not decode.
#[derive(thiserror::Error, Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum PacketError {
    /// Empty or truncated.
    #[error("truncated mesh packet")]
    Truncated,
    /// Unknown type byte.
    #[error("unknown mesh packet type {0}")]
    Kind(u8),
    /// Unknown envelope flags.
    #[error("unknown envelope flags {0:#04x}")]
    Flags(u8),
}

/// A decoded packet, borrowing the input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Packet<'a> {
    /// An announce, full or compact.
    Announce {
        /// Compact form.
        compact: bool,
        /// Hops so far.
        hops: u8,
        /// Path cost so far.
        cost: u16,
        /// The path request this answers.
        response: Option<[u8; TAG_LEN]>,
        /// The announce bytes.
        bytes: &'a [u8],
    },
    /// A path request.
    PathRequest {
        /// Duplicate-suppression tag.
        tag: [u8; TAG_LEN],
        /// Wanted destination.
        dest: DestinationHash,
        /// Hops so far.
        hops: u8,
    },
    /// Data for a destination.
    Data {
        /// Destination.
        dest: DestinationHash,
        /// Hops so far.
        hops: u8,
        /// Payload.
        payload: &'a [u8],
    },
}

impl<'a> Packet<'a> {
    /// Decodes a packet.
    pub fn decode(b: &'a [u8]) -> Result<Packet<'a>, PacketError> {
        let (&t, rest) = b.split_first().ok_or(PacketError::Truncated)?;
        match t {
            kind::ANNOUNCE | kind::COMPACT => {
                let (head, rest) = rest.split_at_checked(4).ok_or(PacketError::Truncated)?;
                let flags = head[3];
                if flags & !RESPONSE != 0 {
                    return Err(PacketError::Flags(flags));
                }
                let (response, bytes) = if flags & RESPONSE != 0 {
                    let (tag, bytes) = rest.split_at_checked(TAG_LEN).ok_or(PacketError::Truncated)?;
                    let mut t = [0u8; TAG_LEN];
                    t.copy_from_slice(tag);
                    (Some(t), bytes)
                } else {
                    (None, rest)
                };
                Ok(Packet::Announce {
                    compact: t == kind::COMPACT,
                    hops: head[0],
                    cost: u16::from_be_bytes([head[1], head[2]]),
                    response,
                    bytes,
                })
            }
            kind::PATH_REQUEST => {
                if rest.len() != TAG_LEN + DEST_LEN + 1 {
                    return Err(PacketError::Truncated);
                }
                let mut tag = [0u8; TAG_LEN];
                tag.copy_from_slice(&rest[..TAG_LEN]);
                let mut dest = [0u8; DEST_LEN];
                dest.copy_from_slice(&rest[TAG_LEN..TAG_LEN + DEST_LEN]);
                Ok(Packet::PathRequest { tag, dest: DestinationHash(dest), hops: rest[TAG_LEN + DEST_LEN] })
            }
            kind::DATA => {
                let (head, payload) = rest.split_at_checked(DEST_LEN + 1).ok_or(PacketError::Truncated)?;
                let mut dest = [0u8; DEST_LEN];
                dest.copy_from_slice(&head[..DEST_LEN]);
                Ok(Packet::Data { dest: DestinationHash(dest), hops: head[DEST_LEN], payload })
            }
            other => Err(PacketError::Kind(other)),
        }
    }

    /// Encodes the packet.
    pub fn encode(&self) -> Vec<u8> {
        match *self {
            Packet::Announce { compact, hops, cost, response, bytes } => {
                let mut out = Vec::with_capacity(5 + TAG_LEN + bytes.len());
                out.push(if compact { kind::COMPACT } else { kind::ANNOUNCE });
                out.push(hops);
                out.extend_from_slice(&cost.to_be_bytes());
                out.push(if response.is_some() { RESPONSE } else { 0 });
                if let Some(t) = response {
                    out.extend_from_slice(&t);
                }
                out.extend_from_slice(bytes);
                out
            }
            Packet::PathRequest { tag, dest, hops } => {
                let mut out = Vec::with_capacity(2 + TAG_LEN + DEST_LEN);
                out.push(kind::PATH_REQUEST);
                out.extend_from_slice(&tag);
                out.extend_from_slice(&dest.0);
                out.push(hops);
                out
            }
            Packet::Data { dest, hops, payload } => {
                let mut out = Vec::with_capacity(2 + DEST_LEN + payload.len());
                out.push(kind::DATA);
                out.extend_from_slice(&dest.0);
                out.push(hops);
                out.extend_from_slice(payload);
                out
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn packets_round_trip(t in 1u8..=4, hops in any::<u8>(), cost in any::<u16>(), tag in proptest::option::of(any::<[u8; 8]>()),
                              dest in any::<[u8; 16]>(), bytes in proptest::collection::vec(any::<u8>(), 0..100)) {
            let p = match t {
                1 | 2 => Packet::Announce { compact: t == 2, hops, cost, response: tag, bytes: &bytes },
                3 => Packet::PathRequest { tag: tag.unwrap_or([1; 8]), dest: DestinationHash(dest), hops },
                _ => Packet::Data { dest: DestinationHash(dest), hops, payload: &bytes },
            };
            let enc = p.encode();
            prop_assert_eq!(Packet::decode(&enc).unwrap(), p);
        }

        #[test]
        fn arbitrary_bytes_never_panic(b in proptest::collection::vec(any::<u8>(), 0..64)) {
            if let Ok(p) = Packet::decode(&b) {
                prop_assert_eq!(p.encode(), b);
            }
        }
    }
}
