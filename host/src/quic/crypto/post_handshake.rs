//! What an antmesh QUIC session accepts in CRYPTO frames once its handshake is over.
//!
//! Once the handshake is complete the session drops its rustls connection (see
//! `TlsSession::retire` in the parent module): what is left must still answer the TLS
//! handshake messages a peer may send in the 1-RTT space. In QUIC (RFC 9001 §4.1.3, §6)
//! those are NewSessionTicket only, from a server: KeyUpdate is forbidden, and so is
//! post-handshake client authentication, which antmesh never offers. antmesh does no
//! resumption, so tickets are skipped: their header (type and length) is checked, their body
//! is not parsed (rustls parsed it and refused a malformed one; with nothing kept, a ticket's
//! contents cannot matter). Every other message fails the connection, as under rustls.
//!
//! The reader keeps no message bytes: a ticket of any length costs a few bytes of state,
//! however it is cut into CRYPTO frames.

use rustls::AlertDescription;

/// The handshake message type of NewSessionTicket (RFC 8446 §4).
const NEW_SESSION_TICKET: u8 = 4;
/// Bytes of a handshake message header: type (1) and body length (3).
const HEADER_LEN: usize = 4;
/// The largest handshake message rustls reassembles, so the largest accepted here too.
pub const MAX_MESSAGE_LEN: u32 = 0xffff;

/// Why a post-handshake message was refused; each maps to the TLS alert that closes the
/// connection (QUIC code `crypto(alert)`).
#[derive(thiserror::Error, Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum PostHandshakeError {
    /// A message type that is not allowed after a QUIC handshake from this peer (anything
    /// but NewSessionTicket from a server).
    #[error("TLS handshake message type {0} after the handshake is not allowed in QUIC")]
    Unexpected(u8),
    /// A message longer than [`MAX_MESSAGE_LEN`].
    #[error("TLS handshake message of {0} bytes after the handshake (at most {MAX_MESSAGE_LEN})")]
    TooLong(u32),
}

impl PostHandshakeError {
    /// The alert that closes the connection: `unexpected_message` for a message that is not
    /// allowed, as rustls sends; `decode_error` for one over the size limit (rustls failed
    /// those without an alert, so quinn closed with PROTOCOL_VIOLATION).
    pub fn alert(self) -> AlertDescription {
        match self {
            Self::Unexpected(_) => AlertDescription::UnexpectedMessage,
            Self::TooLong(_) => AlertDescription::DecodeError,
        }
    }
}

/// Reads the TLS handshake messages of a finished QUIC session's CRYPTO stream, in order,
/// in pieces of any size, and refuses what the peer may not send.
#[derive(Debug, Clone)]
pub struct PostHandshakeReader {
    /// Whether the peer is a server (only a server may send tickets).
    peer_is_server: bool,
    /// Header bytes of the current message seen so far.
    header: [u8; HEADER_LEN],
    header_seen: usize,
    /// Body bytes of the current message still to skip (once its header is complete).
    body_left: u32,
    /// The first refusal; after it, everything is refused.
    failed: Option<PostHandshakeError>,
}

impl PostHandshakeReader {
    /// A reader for a session whose peer is a server (`true`) or a client (`false`).
    pub fn new(peer_is_server: bool) -> Self {
        PostHandshakeReader { peer_is_server, header: [0; HEADER_LEN], header_seen: 0, body_left: 0, failed: None }
    }

    /// Takes the next bytes of the stream. Refuses the first message that is not allowed as
    /// soon as its header is complete, and keeps refusing after that.
    pub fn read(&mut self, mut bytes: &[u8]) -> Result<(), PostHandshakeError> {
        if let Some(e) = self.failed {
            return Err(e);
        }
        while !bytes.is_empty() {
            if self.body_left > 0 {
                let skip = bytes.len().min(self.body_left as usize);
                bytes = &bytes[skip..];
                // `skip` ≤ `body_left`, a u32.
                self.body_left -= skip as u32;
                if self.body_left == 0 {
                    self.header_seen = 0;
                }
                continue;
            }
            let take = bytes.len().min(HEADER_LEN - self.header_seen);
            self.header[self.header_seen..self.header_seen + take].copy_from_slice(&bytes[..take]);
            self.header_seen += take;
            bytes = &bytes[take..];
            if self.header_seen < HEADER_LEN {
                break;
            }
            let [kind, l0, l1, l2] = self.header;
            let len = u32::from_be_bytes([0, l0, l1, l2]);
            let refused = if kind != NEW_SESSION_TICKET || !self.peer_is_server {
                Some(PostHandshakeError::Unexpected(kind))
            } else if len > MAX_MESSAGE_LEN {
                Some(PostHandshakeError::TooLong(len))
            } else {
                None
            };
            if let Some(e) = refused {
                self.failed = Some(e);
                return Err(e);
            }
            self.body_left = len;
            if len == 0 {
                self.header_seen = 0;
            }
        }
        Ok(())
    }

    /// Whether the stream so far ends on a message boundary (no message half read).
    pub fn at_boundary(&self) -> bool {
        self.failed.is_none() && self.header_seen == 0 && self.body_left == 0
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn ticket(body_len: usize) -> Vec<u8> {
        let len = (body_len as u32).to_be_bytes();
        let mut m = vec![NEW_SESSION_TICKET, len[1], len[2], len[3]];
        m.extend(std::iter::repeat_n(0xa5, body_len));
        m
    }

    #[test]
    fn tickets_from_a_server_are_skipped_in_any_pieces() {
        let stream = [ticket(0), ticket(1), ticket(200), ticket(MAX_MESSAGE_LEN as usize)].concat();
        for piece in [1, 2, 3, 4, 5, 7, 1000, stream.len()] {
            let mut r = PostHandshakeReader::new(true);
            for chunk in stream.chunks(piece) {
                assert_eq!(r.read(chunk), Ok(()), "piece {piece}");
            }
            assert!(r.at_boundary(), "piece {piece}");
        }
    }

    #[test]
    fn a_half_read_message_is_not_at_a_boundary() {
        let mut r = PostHandshakeReader::new(true);
        r.read(&ticket(10)[..3]).unwrap();
        assert!(!r.at_boundary());
        r.read(&ticket(10)[3..9]).unwrap();
        assert!(!r.at_boundary());
        r.read(&ticket(10)[9..]).unwrap();
        assert!(r.at_boundary());
    }

    #[test]
    fn a_client_may_send_nothing() {
        let mut r = PostHandshakeReader::new(false);
        assert_eq!(r.read(&ticket(5)), Err(PostHandshakeError::Unexpected(NEW_SESSION_TICKET)));
        assert_eq!(PostHandshakeError::Unexpected(4).alert(), AlertDescription::UnexpectedMessage);
    }

    #[test]
    fn key_update_and_certificate_request_are_refused_and_stay_refused() {
        for kind in [24u8, 13, 0, 255] {
            let mut r = PostHandshakeReader::new(true);
            // A valid ticket first, then the forbidden message cut after its type byte.
            r.read(&ticket(3)).unwrap();
            assert_eq!(r.read(&[kind, 0]), Ok(()), "header incomplete: nothing decided yet");
            assert_eq!(r.read(&[0, 1]), Err(PostHandshakeError::Unexpected(kind)));
            assert_eq!(r.read(&ticket(1)), Err(PostHandshakeError::Unexpected(kind)), "stays refused");
            assert!(!r.at_boundary());
        }
    }

    #[test]
    fn an_oversized_ticket_is_refused_from_its_header() {
        let mut r = PostHandshakeReader::new(true);
        let e = r.read(&[NEW_SESSION_TICKET, 0x01, 0x00, 0x00]).unwrap_err();
        assert_eq!(e, PostHandshakeError::TooLong(0x1_0000));
        assert_eq!(e.alert(), AlertDescription::DecodeError);
    }

    proptest! {
        /// Round trip: any sequence of tickets, cut anywhere, is read to a boundary; and any
        /// bytes at all, cut anywhere, give the same verdict as when read in one piece.
        #[test]
        fn any_cut_reads_the_same(
            lens in proptest::collection::vec(0usize..600, 0..8),
            junk in proptest::collection::vec(any::<u8>(), 0..64),
            cuts in proptest::collection::vec(1usize..50, 1..40),
        ) {
            let stream: Vec<u8> = lens.iter().flat_map(|&l| ticket(l)).collect();
            let mut r = PostHandshakeReader::new(true);
            let mut rest = &stream[..];
            for &c in cuts.iter().cycle() {
                if rest.is_empty() { break; }
                let (now, later) = rest.split_at(c.min(rest.len()));
                prop_assert_eq!(r.read(now), Ok(()));
                rest = later;
            }
            prop_assert!(r.at_boundary());

            let whole = PostHandshakeReader::new(true).read(&junk).is_ok();
            let mut cut = PostHandshakeReader::new(true);
            let mut ok = true;
            for chunk in junk.chunks(cuts[0]) {
                ok = cut.read(chunk).is_ok();
            }
            prop_assert_eq!(whole, ok);
        }
    }
}
