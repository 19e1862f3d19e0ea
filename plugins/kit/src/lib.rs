//! Building blocks shared by antmesh's transport plugins (and offered to third parties).
//!
//! - [`outbox`]: the bounded outbound queue behind every non-blocking `send` — it returns
//!   `WouldBlock` when full and calls the host's `writable` once it has drained.
//! - [`framing`]: byte-stream framings (length-prefixed, HDLC-like with CRC, KISS); their
//!   decoders are fuzzed and property-tested because they face whatever the wire carries.
//! - [`backoff`]: reconnect/respawn delays with jitter.
//! - [`link`] (Unix): the `send` checks and `close` sequence of point-to-point stream
//!   transports.
//! - [`sys`] (Unix): `poll`, a pollable stop signal and the few other POSIX calls plugin I/O
//!   threads need.
//! - [`testing`]: an in-process host for plugin unit tests.

pub mod backoff;
pub mod framing;
#[cfg(unix)]
pub mod link;
pub mod outbox;
#[cfg(unix)]
pub mod sys;
pub mod testing;

pub use backoff::Backoff;
pub use framing::{Codec, Decoded, FramingKind};
pub use outbox::Outbox;
