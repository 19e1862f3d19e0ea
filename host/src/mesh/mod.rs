//! The mesh control plane: destinations, signed announces, the path table, path requests
//! and forwarding (docs/mesh.md).
//!
//! Sans-IO like the link engine: [`router::Router`] sees neighbours (authenticated QUIC or
//! link sessions) and mesh packets, and returns packets to send. Read [`dest`], then
//! [`announce`], [`packet`], [`router`].

pub mod announce;
pub mod dest;
pub mod links;
pub mod packet;
pub mod router;
pub mod sealed;
pub mod sim;
pub mod store;
