//! Frames of the constrained link engine, as they appear on the transport.
//!
//! Every frame starts with one byte: the wire version in the top three bits, the frame
//! kind in the low five. A receiver drops a frame whose version it does not speak with
//! [`WireError::Version`]; the version is bumped on any incompatible change.
//!
//! ```text
//! Hello / Reply / Finish   | v|kind | tag u16 | index u8 | last u8 | fragment bytes…
//! HsAck                    | v|kind | tag u16 | msg u8 | last u8 | have-bitmap (last/8+1 bytes)
//! Resume                   | v|kind | tag u16 | ticket [16] | nonce [16] | mac [16]
//! ResumeOk                 | v|kind | tag u16 | nonce [16] | mac [16]
//! Reject                   | v|kind | tag u16 | reason u8
//! Data                     | v|kind | key-id u8 | packet number u32 | AEAD ciphertext + tag [16]
//! Cookie                   | v|kind | tag u16 | cookie [16]
//! CookieEcho               | v|kind | tag u16 | cookie [16]
//! ```
//!
//! Cookie and CookieEcho (kinds 9 and 10) came after the rest: a responder under load asks
//! an initiator to prove it receives at its address before it signs anything. An engine
//! without them ignores a Cookie, and is answered only while the responder is not under
//! load.
//!
//! Multi-byte integers are big-endian. Decoding never panics and never allocates more than
//! the frame's own length; these are views over the input slice (smoltcp style), the
//! handshake layer validates what they carry.

/// The only wire version this engine speaks.
pub const VERSION: u8 = 1;
/// Bytes in a handshake fragment header.
pub const FRAGMENT_HEADER_LEN: usize = 5;
/// Bytes in a data frame header (the AEAD's associated data).
pub const DATA_HEADER_LEN: usize = 6;
/// Bytes of a Poly1305 tag.
pub const TAG_LEN: usize = 16;
/// Bytes of a resumption ticket id.
pub const TICKET_ID_LEN: usize = 16;
/// Bytes of a handshake or resumption nonce.
pub const NONCE_LEN: usize = 16;
/// Bytes in a Resume frame.
pub const RESUME_LEN: usize = 3 + TICKET_ID_LEN + NONCE_LEN + TAG_LEN;
/// Bytes in a ResumeOk frame.
pub const RESUME_OK_LEN: usize = 3 + NONCE_LEN + TAG_LEN;
/// Bytes of an address-proof cookie.
pub const COOKIE_LEN: usize = 16;
/// Bytes in a Cookie or CookieEcho frame.
pub const COOKIE_FRAME_LEN: usize = 3 + COOKIE_LEN;
/// The smallest MTU the engine runs on: a fragment header, a data header with its tag and
/// a few payload bytes must fit.
pub const MIN_MTU: usize = 48;

/// What a frame is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Kind {
    /// A fragment of handshake message 1 (initiator → responder).
    Hello = 1,
    /// A fragment of handshake message 2 (responder → initiator).
    Reply = 2,
    /// A fragment of handshake message 3 (initiator → responder).
    Finish = 3,
    /// Which fragments of one handshake message have arrived.
    HsAck = 4,
    /// Resumption request (initiator → responder).
    Resume = 5,
    /// Resumption accepted (responder → initiator).
    ResumeOk = 6,
    /// A handshake or resumption refused.
    Reject = 7,
    /// An encrypted session packet.
    Data = 8,
    /// Prove your address: echo this (responder → initiator, instead of a Reply).
    Cookie = 9,
    /// The echo of a Cookie (initiator → responder).
    CookieEcho = 10,
}

impl Kind {
    fn from_u8(v: u8) -> Option<Kind> {
        Some(match v {
            1 => Kind::Hello,
            2 => Kind::Reply,
            3 => Kind::Finish,
            4 => Kind::HsAck,
            5 => Kind::Resume,
            6 => Kind::ResumeOk,
            7 => Kind::Reject,
            8 => Kind::Data,
            9 => Kind::Cookie,
            10 => Kind::CookieEcho,
            _ => return None,
        })
    }

    /// The first byte of a frame of this kind.
    pub fn first_byte(self) -> u8 {
        (VERSION << 5) | self as u8
    }

    /// The handshake message number of a fragment kind (1, 2 or 3).
    pub fn message_number(self) -> Option<u8> {
        match self {
            Kind::Hello => Some(1),
            Kind::Reply => Some(2),
            Kind::Finish => Some(3),
            _ => None,
        }
    }

    /// The fragment kind carrying handshake message `n`.
    pub fn for_message(n: u8) -> Option<Kind> {
        match n {
            1 => Some(Kind::Hello),
            2 => Some(Kind::Reply),
            3 => Some(Kind::Finish),
            _ => None,
        }
    }
}

/// Why a frame did not decode.
#[derive(thiserror::Error, Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum WireError {
    /// The frame is empty.
    #[error("empty frame")]
    Empty,
    /// The frame carries a wire version this engine does not speak.
    #[error("wire version {0} (this engine speaks {VERSION})")]
    Version(u8),
    /// Unknown frame kind.
    #[error("unknown frame kind {0}")]
    Kind(u8),
    /// The frame is shorter than its kind requires.
    #[error("{kind:?} frame of {len} bytes is truncated")]
    Truncated {
        /// The kind.
        kind: Kind,
        /// Its length.
        len: usize,
    },
    /// A fixed-size frame has trailing bytes, or a fragment carries none.
    #[error("{kind:?} frame has the wrong length ({len} bytes)")]
    Length {
        /// The kind.
        kind: Kind,
        /// Its length.
        len: usize,
    },
    /// A fragment index beyond the last index.
    #[error("fragment {index} of a message whose last fragment is {last}")]
    FragmentIndex {
        /// Index.
        index: u8,
        /// Last index.
        last: u8,
    },
    /// An HsAck names a message number other than 1–3.
    #[error("acknowledgement for handshake message {0}")]
    AckMessage(u8),
}

/// A decoded frame, borrowing the input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Frame<'a> {
    /// One fragment of handshake message 1, 2 or 3.
    Fragment {
        /// Which message.
        kind: Kind,
        /// The handshake attempt, chosen by the initiator.
        tag: u16,
        /// This fragment's index.
        index: u8,
        /// The index of the message's last fragment.
        last: u8,
        /// The fragment's bytes.
        bytes: &'a [u8],
    },
    /// The fragments of one message its sender has received.
    HsAck {
        /// The handshake attempt.
        tag: u16,
        /// Message number 1–3.
        msg: u8,
        /// Index of the message's last fragment.
        last: u8,
        /// Bit `i` (LSB first, byte by byte) set when fragment `i` arrived.
        have: &'a [u8],
    },
    /// A resumption request.
    Resume {
        /// The attempt.
        tag: u16,
        /// Ticket from an earlier session.
        ticket: &'a [u8; TICKET_ID_LEN],
        /// Initiator's fresh nonce.
        nonce: &'a [u8; NONCE_LEN],
        /// Proof of the resumption secret.
        mac: &'a [u8; TAG_LEN],
    },
    /// A resumption accepted.
    ResumeOk {
        /// The attempt.
        tag: u16,
        /// Responder's fresh nonce.
        nonce: &'a [u8; NONCE_LEN],
        /// Proof of the resumption secret.
        mac: &'a [u8; TAG_LEN],
    },
    /// A refusal.
    Reject {
        /// The attempt.
        tag: u16,
        /// Why (see [`RejectReason`]).
        reason: u8,
    },
    /// A responder's request for an address proof, or the initiator's echo of it.
    Cookie {
        /// Cookie or CookieEcho.
        echo: bool,
        /// The handshake attempt.
        tag: u16,
        /// The cookie.
        cookie: &'a [u8; COOKIE_LEN],
    },
    /// An encrypted packet.
    Data {
        /// The 6 header bytes (associated data).
        header: &'a [u8; DATA_HEADER_LEN],
        /// Generation (top 2 bits) and ratchet epoch (low 6 bits) of the key.
        key_id: u8,
        /// Packet number under that key.
        pn: u32,
        /// Ciphertext with its tag.
        sealed: &'a [u8],
    },
}

/// Why a handshake was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum RejectReason {
    /// The responder holds no such resumption ticket (restarted, expired, or used).
    UnknownTicket = 1,
    /// Too many handshakes in progress; try later.
    Busy = 2,
    /// The responder refuses this peer.
    Refused = 3,
}

impl RejectReason {
    /// From the wire byte; unknown reasons read as `Refused`.
    pub fn from_u8(v: u8) -> RejectReason {
        match v {
            1 => RejectReason::UnknownTicket,
            2 => RejectReason::Busy,
            _ => RejectReason::Refused,
        }
    }
}

fn array<const N: usize>(b: &[u8]) -> Option<&[u8; N]> {
    b.try_into().ok()
}

impl<'a> Frame<'a> {
    /// Decodes one frame.
    pub fn decode(buf: &'a [u8]) -> Result<Frame<'a>, WireError> {
        let first = *buf.first().ok_or(WireError::Empty)?;
        let version = first >> 5;
        if version != VERSION {
            return Err(WireError::Version(version));
        }
        let kind = Kind::from_u8(first & 0x1f).ok_or(WireError::Kind(first & 0x1f))?;
        let len = buf.len();
        let truncated = WireError::Truncated { kind, len };
        let length = WireError::Length { kind, len };
        let tag = || -> Result<u16, WireError> {
            match (buf.get(1), buf.get(2)) {
                (Some(a), Some(b)) => Ok(u16::from_be_bytes([*a, *b])),
                _ => Err(truncated),
            }
        };
        match kind {
            Kind::Hello | Kind::Reply | Kind::Finish => {
                if len < FRAGMENT_HEADER_LEN {
                    return Err(truncated);
                }
                if len == FRAGMENT_HEADER_LEN {
                    return Err(length);
                }
                let (index, last) = (buf[3], buf[4]);
                if index > last {
                    return Err(WireError::FragmentIndex { index, last });
                }
                Ok(Frame::Fragment { kind, tag: tag()?, index, last, bytes: &buf[FRAGMENT_HEADER_LEN..] })
            }
            Kind::HsAck => {
                if len < 5 {
                    return Err(truncated);
                }
                let (msg, last) = (buf[3], buf[4]);
                if !(1..=3).contains(&msg) {
                    return Err(WireError::AckMessage(msg));
                }
                let need = 5 + usize::from(last) / 8 + 1;
                if len != need {
                    return Err(if len < need { truncated } else { length });
                }
                Ok(Frame::HsAck { tag: tag()?, msg, last, have: &buf[5..] })
            }
            Kind::Resume => {
                if len != RESUME_LEN {
                    return Err(if len < RESUME_LEN { truncated } else { length });
                }
                let (ticket, nonce, mac) = (array(&buf[3..19]), array(&buf[19..35]), array(&buf[35..51]));
                match (ticket, nonce, mac) {
                    (Some(ticket), Some(nonce), Some(mac)) => Ok(Frame::Resume { tag: tag()?, ticket, nonce, mac }),
                    _ => Err(truncated),
                }
            }
            Kind::ResumeOk => {
                if len != RESUME_OK_LEN {
                    return Err(if len < RESUME_OK_LEN { truncated } else { length });
                }
                match (array(&buf[3..19]), array(&buf[19..35])) {
                    (Some(nonce), Some(mac)) => Ok(Frame::ResumeOk { tag: tag()?, nonce, mac }),
                    _ => Err(truncated),
                }
            }
            Kind::Reject => {
                if len != 4 {
                    return Err(if len < 4 { truncated } else { length });
                }
                Ok(Frame::Reject { tag: tag()?, reason: buf[3] })
            }
            Kind::Cookie | Kind::CookieEcho => {
                if len != COOKIE_FRAME_LEN {
                    return Err(if len < COOKIE_FRAME_LEN { truncated } else { length });
                }
                let cookie = array(&buf[3..COOKIE_FRAME_LEN]).ok_or(truncated)?;
                Ok(Frame::Cookie { echo: kind == Kind::CookieEcho, tag: tag()?, cookie })
            }
            Kind::Data => {
                if len < DATA_HEADER_LEN + TAG_LEN {
                    return Err(truncated);
                }
                let header = array(&buf[..DATA_HEADER_LEN]).ok_or(truncated)?;
                let pn = u32::from_be_bytes([buf[2], buf[3], buf[4], buf[5]]);
                Ok(Frame::Data { header, key_id: buf[1], pn, sealed: &buf[DATA_HEADER_LEN..] })
            }
        }
    }

    /// Encodes the frame (the inverse of [`Frame::decode`]).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.encoded_len());
        match *self {
            Frame::Fragment { kind, tag, index, last, bytes } => {
                out.push(kind.first_byte());
                out.extend_from_slice(&tag.to_be_bytes());
                out.extend_from_slice(&[index, last]);
                out.extend_from_slice(bytes);
            }
            Frame::HsAck { tag, msg, last, have } => {
                out.push(Kind::HsAck.first_byte());
                out.extend_from_slice(&tag.to_be_bytes());
                out.extend_from_slice(&[msg, last]);
                out.extend_from_slice(have);
            }
            Frame::Resume { tag, ticket, nonce, mac } => {
                out.push(Kind::Resume.first_byte());
                out.extend_from_slice(&tag.to_be_bytes());
                out.extend_from_slice(ticket);
                out.extend_from_slice(nonce);
                out.extend_from_slice(mac);
            }
            Frame::ResumeOk { tag, nonce, mac } => {
                out.push(Kind::ResumeOk.first_byte());
                out.extend_from_slice(&tag.to_be_bytes());
                out.extend_from_slice(nonce);
                out.extend_from_slice(mac);
            }
            Frame::Reject { tag, reason } => {
                out.push(Kind::Reject.first_byte());
                out.extend_from_slice(&tag.to_be_bytes());
                out.push(reason);
            }
            Frame::Cookie { echo, tag, cookie } => {
                out.push(if echo { Kind::CookieEcho } else { Kind::Cookie }.first_byte());
                out.extend_from_slice(&tag.to_be_bytes());
                out.extend_from_slice(cookie);
            }
            Frame::Data { header, sealed, .. } => {
                out.extend_from_slice(header);
                out.extend_from_slice(sealed);
            }
        }
        out
    }

    /// Bytes [`Frame::encode`] produces.
    pub fn encoded_len(&self) -> usize {
        match self {
            Frame::Fragment { bytes, .. } => FRAGMENT_HEADER_LEN + bytes.len(),
            Frame::HsAck { have, .. } => 5 + have.len(),
            Frame::Resume { .. } => RESUME_LEN,
            Frame::ResumeOk { .. } => RESUME_OK_LEN,
            Frame::Reject { .. } => 4,
            Frame::Cookie { .. } => COOKIE_FRAME_LEN,
            Frame::Data { sealed, .. } => DATA_HEADER_LEN + sealed.len(),
        }
    }
}

/// The header of a data frame for `key_id` and packet number `pn`.
pub fn data_header(key_id: u8, pn: u32) -> [u8; DATA_HEADER_LEN] {
    let p = pn.to_be_bytes();
    [Kind::Data.first_byte(), key_id, p[0], p[1], p[2], p[3]]
}

/// Bytes of the have-bitmap for a message whose last fragment index is `last`.
pub fn bitmap_len(last: u8) -> usize {
    usize::from(last) / 8 + 1
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn frame_strategy() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            (1u8..=3, any::<u16>(), any::<u8>(), any::<u8>(), proptest::collection::vec(any::<u8>(), 1..300)).prop_map(
                |(k, tag, a, b, bytes)| {
                    let (index, last) = (a.min(b), a.max(b));
                    Frame::Fragment { kind: Kind::for_message(k).unwrap_or(Kind::Hello), tag, index, last, bytes: &bytes }
                        .encode()
                }
            ),
            (any::<u16>(), 1u8..=3, any::<u8>()).prop_map(|(tag, msg, last)| {
                let have = vec![0xa5; bitmap_len(last)];
                Frame::HsAck { tag, msg, last, have: &have }.encode()
            }),
            (any::<u16>(), any::<[u8; 16]>(), any::<[u8; 16]>(), any::<[u8; 16]>())
                .prop_map(|(tag, t, n, m)| Frame::Resume { tag, ticket: &t, nonce: &n, mac: &m }.encode()),
            (any::<u16>(), any::<[u8; 16]>(), any::<[u8; 16]>())
                .prop_map(|(tag, n, m)| Frame::ResumeOk { tag, nonce: &n, mac: &m }.encode()),
            (any::<u16>(), any::<u8>()).prop_map(|(tag, reason)| Frame::Reject { tag, reason }.encode()),
            (any::<bool>(), any::<u16>(), any::<[u8; 16]>()).prop_map(|(echo, tag, c)| Frame::Cookie { echo, tag, cookie: &c }.encode()),
            (any::<u8>(), any::<u32>(), proptest::collection::vec(any::<u8>(), 16..300)).prop_map(|(k, pn, sealed)| {
                let header = data_header(k, pn);
                Frame::Data { header: &header, key_id: k, pn, sealed: &sealed }.encode()
            }),
        ]
    }

    proptest! {
        #[test]
        fn encode_decode_round_trip(bytes in frame_strategy()) {
            let f = Frame::decode(&bytes).unwrap();
            prop_assert_eq!(f.encoded_len(), bytes.len());
            prop_assert_eq!(f.encode(), bytes);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..80)) {
            if let Ok(f) = Frame::decode(&bytes) {
                prop_assert_eq!(f.encode(), bytes);
            }
        }
    }

    #[test]
    fn other_versions_and_kinds_are_refused() {
        assert_eq!(Frame::decode(&[]), Err(WireError::Empty));
        assert_eq!(Frame::decode(&[(2 << 5) | 1, 0, 0, 0, 0, 9]), Err(WireError::Version(2)));
        assert_eq!(Frame::decode(&[(1 << 5) | 31]), Err(WireError::Kind(31)));
        assert_eq!(
            Frame::decode(&[Kind::Hello.first_byte(), 0, 1, 3, 2, 9]),
            Err(WireError::FragmentIndex { index: 3, last: 2 })
        );
        assert_eq!(
            Frame::decode(&[Kind::Hello.first_byte(), 0, 1, 0, 0]),
            Err(WireError::Length { kind: Kind::Hello, len: 5 })
        );
        assert_eq!(Frame::decode(&[Kind::HsAck.first_byte(), 0, 1, 4, 0, 1]), Err(WireError::AckMessage(4)));
        assert_eq!(Frame::decode(&[Kind::Cookie.first_byte(), 0, 1, 2]), Err(WireError::Truncated { kind: Kind::Cookie, len: 4 }));
        assert_eq!(Frame::decode(&[Kind::CookieEcho.first_byte(); 20]), Err(WireError::Length { kind: Kind::CookieEcho, len: 20 }));
    }
}
