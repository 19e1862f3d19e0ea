//! Building blocks shared by antmesh's transport plugins (and offered to third parties).
//!
//! - [`outbox`]: the bounded outbound queue behind every non-blocking `send` — it returns
//!   `WouldBlock` when full and calls the host's `writable` once it has drained.
//! - [`framing`]: byte-stream framings (length-prefixed, HDLC-like with CRC, KISS); their
//!   decoders are fuzzed and property-tested because they face whatever the wire carries.
//! - [`backoff`]: reconnect/respawn delays with jitter.

pub mod backoff;
pub mod framing;
pub mod outbox;

pub use backoff::Backoff;
pub use framing::{Codec, Decoded, FramingKind};
pub use outbox::Outbox;
