//! Framings that turn a byte stream into frames and back.
//!
//! | kind | wire | integrity | used by |
//! |---|---|---|---|
//! | `Length` | u32 big-endian length, then payload | none (the stream is reliable) | tcp, pipe |
//! | `Hdlc` | `0x7E` · escaped(payload · CRC-16/X.25 LE) · `0x7E`; `0x7D` escapes, XOR `0x20` | CRC-16 | serial |
//! | `Kiss` | `0xC0` · `0x00` · escaped(payload) · `0xC0`; `0xDB 0xDC`/`0xDB 0xDD` escapes | none | serial, KISS TNCs |
//!
//! Decoders are incremental (feed any chunking), bounded (a frame longer than `max_frame`
//! is discarded, never buffered), and never panic. For `Length` an oversized length prefix
//! is a fatal error: the stream cannot be resynchronised, so the caller drops the
//! connection. HDLC and KISS resynchronise at the next flag byte.

/// Which framing a stream uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Deserialize, serde::Serialize)]
pub enum FramingKind {
    /// u32 big-endian length prefix.
    Length,
    /// HDLC-like flags and escapes with a CRC-16.
    Hdlc,
    /// KISS (TNC) framing, data frames on port 0.
    Kiss,
}

const HDLC_FLAG: u8 = 0x7E;
const HDLC_ESC: u8 = 0x7D;
const HDLC_XOR: u8 = 0x20;
const FEND: u8 = 0xC0;
const FESC: u8 = 0xDB;
const TFEND: u8 = 0xDC;
const TFESC: u8 = 0xDD;

/// What one decoder step produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decoded {
    /// A whole frame.
    Frame(Vec<u8>),
    /// A frame was dropped (bad CRC, oversized, bad escape); counted, not fatal.
    Dropped(DropReason),
}

/// Why a frame was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// CRC did not match.
    BadCrc,
    /// Longer than the configured maximum.
    Oversized,
    /// An escape byte followed by an invalid byte.
    BadEscape,
    /// Too short to hold a CRC, or a KISS command other than data.
    Malformed,
}

/// An unrecoverable stream error (length framing only).
#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
pub enum StreamError {
    /// The peer announced a frame longer than the maximum.
    #[error("length prefix {len} exceeds maximum frame size {max}")]
    LengthTooLarge {
        /// Announced length.
        len: u64,
        /// Configured maximum.
        max: usize,
    },
}

/// CRC-16/X.25 (the HDLC FCS).
pub fn crc16_x25(data: &[u8]) -> u16 {
    let mut crc: u16 = 0xFFFF;
    for &b in data {
        crc ^= u16::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 { (crc >> 1) ^ 0x8408 } else { crc >> 1 };
        }
    }
    !crc
}

/// An encoder/decoder pair for one direction of one stream.
#[derive(Debug, Clone)]
pub struct Codec {
    kind: FramingKind,
    max_frame: usize,
    buf: Vec<u8>,
    in_frame: bool,
    escaped: bool,
    overflow: bool,
    bad_escape: bool,
}

impl Codec {
    /// A codec of `kind` that accepts frames up to `max_frame` bytes of payload.
    pub fn new(kind: FramingKind, max_frame: usize) -> Self {
        Codec { kind, max_frame, buf: Vec::new(), in_frame: false, escaped: false, overflow: false, bad_escape: false }
    }

    /// The framing kind.
    pub fn kind(&self) -> FramingKind {
        self.kind
    }

    /// Appends the encoding of `payload` to `out`.
    pub fn encode(&self, payload: &[u8], out: &mut Vec<u8>) {
        match self.kind {
            FramingKind::Length => {
                out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
                out.extend_from_slice(payload);
            }
            FramingKind::Hdlc => {
                out.push(HDLC_FLAG);
                let crc = crc16_x25(payload).to_le_bytes();
                for &b in payload.iter().chain(crc.iter()) {
                    if b == HDLC_FLAG || b == HDLC_ESC {
                        out.push(HDLC_ESC);
                        out.push(b ^ HDLC_XOR);
                    } else {
                        out.push(b);
                    }
                }
                out.push(HDLC_FLAG);
            }
            FramingKind::Kiss => {
                out.push(FEND);
                out.push(0x00);
                for &b in payload {
                    match b {
                        FEND => out.extend_from_slice(&[FESC, TFEND]),
                        FESC => out.extend_from_slice(&[FESC, TFESC]),
                        _ => out.push(b),
                    }
                }
                out.push(FEND);
            }
        }
    }

    /// Feeds received bytes; decoded frames and drops are appended to `out`.
    pub fn decode(&mut self, bytes: &[u8], out: &mut Vec<Decoded>) -> Result<(), StreamError> {
        match self.kind {
            FramingKind::Length => self.decode_length(bytes, out),
            FramingKind::Hdlc => {
                for &b in bytes {
                    self.hdlc_byte(b, out);
                }
                Ok(())
            }
            FramingKind::Kiss => {
                for &b in bytes {
                    self.kiss_byte(b, out);
                }
                Ok(())
            }
        }
    }

    fn decode_length(&mut self, mut bytes: &[u8], out: &mut Vec<Decoded>) -> Result<(), StreamError> {
        loop {
            if self.buf.len() < 4 {
                let take = (4 - self.buf.len()).min(bytes.len());
                self.buf.extend_from_slice(&bytes[..take]);
                bytes = &bytes[take..];
                if self.buf.len() < 4 {
                    return Ok(());
                }
            }
            let len = u32::from_be_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]]) as usize;
            if len > self.max_frame {
                return Err(StreamError::LengthTooLarge { len: len as u64, max: self.max_frame });
            }
            let have = self.buf.len() - 4;
            let take = (len - have).min(bytes.len());
            self.buf.extend_from_slice(&bytes[..take]);
            bytes = &bytes[take..];
            if self.buf.len() - 4 < len {
                return Ok(());
            }
            out.push(Decoded::Frame(self.buf[4..].to_vec()));
            self.buf.clear();
        }
    }

    fn push_byte(&mut self, b: u8, limit: usize) {
        if self.buf.len() >= limit {
            self.overflow = true;
        } else {
            self.buf.push(b);
        }
    }

    fn hdlc_byte(&mut self, b: u8, out: &mut Vec<Decoded>) {
        if b == HDLC_FLAG {
            if self.in_frame && (!self.buf.is_empty() || self.overflow || self.bad_escape) {
                out.push(self.finish_hdlc());
            }
            self.reset_frame();
            self.in_frame = true;
            return;
        }
        if !self.in_frame {
            return; // line noise before the first flag
        }
        if self.escaped {
            self.escaped = false;
            let v = b ^ HDLC_XOR;
            if v != HDLC_FLAG && v != HDLC_ESC {
                self.bad_escape = true;
            }
            self.push_byte(v, self.max_frame + 2);
        } else if b == HDLC_ESC {
            self.escaped = true;
        } else {
            self.push_byte(b, self.max_frame + 2);
        }
    }

    fn finish_hdlc(&mut self) -> Decoded {
        if self.overflow {
            return Decoded::Dropped(DropReason::Oversized);
        }
        if self.bad_escape || self.escaped {
            return Decoded::Dropped(DropReason::BadEscape);
        }
        if self.buf.len() < 2 {
            return Decoded::Dropped(DropReason::Malformed);
        }
        let split = self.buf.len() - 2;
        let crc = u16::from_le_bytes([self.buf[split], self.buf[split + 1]]);
        if crc16_x25(&self.buf[..split]) != crc {
            return Decoded::Dropped(DropReason::BadCrc);
        }
        self.buf.truncate(split);
        Decoded::Frame(std::mem::take(&mut self.buf))
    }

    fn kiss_byte(&mut self, b: u8, out: &mut Vec<Decoded>) {
        if b == FEND {
            if self.in_frame && (!self.buf.is_empty() || self.overflow || self.bad_escape) {
                out.push(self.finish_kiss());
            }
            self.reset_frame();
            self.in_frame = true;
            return;
        }
        if !self.in_frame {
            return;
        }
        if self.escaped {
            self.escaped = false;
            match b {
                TFEND => self.push_byte(FEND, self.max_frame + 1),
                TFESC => self.push_byte(FESC, self.max_frame + 1),
                _ => self.bad_escape = true,
            }
        } else if b == FESC {
            self.escaped = true;
        } else {
            self.push_byte(b, self.max_frame + 1);
        }
    }

    fn finish_kiss(&mut self) -> Decoded {
        if self.overflow {
            return Decoded::Dropped(DropReason::Oversized);
        }
        if self.bad_escape || self.escaped {
            return Decoded::Dropped(DropReason::BadEscape);
        }
        // First byte: port (high nibble) and command (low nibble); only data on port 0.
        if self.buf.first() != Some(&0x00) {
            return Decoded::Dropped(DropReason::Malformed);
        }
        let mut frame = std::mem::take(&mut self.buf);
        frame.remove(0);
        Decoded::Frame(frame)
    }

    fn reset_frame(&mut self) {
        self.buf.clear();
        self.escaped = false;
        self.overflow = false;
        self.bad_escape = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn frames(out: Vec<Decoded>) -> Vec<Vec<u8>> {
        out.into_iter()
            .filter_map(|d| match d {
                Decoded::Frame(f) => Some(f),
                Decoded::Dropped(_) => None,
            })
            .collect()
    }

    #[test]
    fn crc_reference_value() {
        // CRC-16/X-25 check value for "123456789".
        assert_eq!(crc16_x25(b"123456789"), 0x906E);
    }

    #[test]
    fn length_prefix_too_large_is_fatal() {
        let mut c = Codec::new(FramingKind::Length, 16);
        let mut out = Vec::new();
        assert!(matches!(c.decode(&[0, 0, 0, 17], &mut out), Err(StreamError::LengthTooLarge { len: 17, .. })));
    }

    #[test]
    fn hdlc_resyncs_after_noise_and_bad_crc() {
        let mut c = Codec::new(FramingKind::Hdlc, 64);
        let mut wire = vec![1, 2, 3, 0x7E, 9, 9, 9, 9];
        c.encode(b"ok", &mut wire);
        let mut out = Vec::new();
        c.decode(&wire, &mut out).unwrap();
        assert_eq!(out[0], Decoded::Dropped(DropReason::BadCrc));
        assert_eq!(frames(out), vec![b"ok".to_vec()]);
    }

    #[test]
    fn oversized_frames_are_dropped_not_buffered() {
        for kind in [FramingKind::Hdlc, FramingKind::Kiss] {
            let big = Codec::new(kind, 1000);
            let mut wire = Vec::new();
            big.encode(&[0x55; 500], &mut wire);
            big.encode(b"small", &mut wire);
            let mut c = Codec::new(kind, 100);
            let mut out = Vec::new();
            c.decode(&wire, &mut out).unwrap();
            assert!(out.contains(&Decoded::Dropped(DropReason::Oversized)));
            assert_eq!(frames(out), vec![b"small".to_vec()]);
            assert!(c.buf.capacity() <= 1024);
        }
    }

    proptest! {
        #[test]
        fn round_trip_any_chunking(
            kind in prop_oneof![Just(FramingKind::Length), Just(FramingKind::Hdlc), Just(FramingKind::Kiss)],
            payloads in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 1..300), 1..8),
            chunk in 1usize..64,
        ) {
            let enc = Codec::new(kind, 300);
            let mut wire = Vec::new();
            for p in &payloads { enc.encode(p, &mut wire); }
            let mut dec = Codec::new(kind, 300);
            let mut out = Vec::new();
            for c in wire.chunks(chunk) { dec.decode(c, &mut out).unwrap(); }
            prop_assert_eq!(frames(out), payloads);
        }

        #[test]
        fn garbage_never_panics_and_stays_bounded(
            kind in prop_oneof![Just(FramingKind::Length), Just(FramingKind::Hdlc), Just(FramingKind::Kiss)],
            garbage in proptest::collection::vec(any::<u8>(), 0..4096),
        ) {
            let mut dec = Codec::new(kind, 256);
            let mut out = Vec::new();
            let _ = dec.decode(&garbage, &mut out);
            prop_assert!(dec.buf.len() <= 260);
            for d in out {
                if let Decoded::Frame(f) = d { prop_assert!(f.len() <= 256); }
            }
        }
    }
}
