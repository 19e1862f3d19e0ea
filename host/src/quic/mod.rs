//! QUIC for antmesh sessions: quinn over the post-quantum TLS provider of [`crate::tls`].
//!
//! Read first: [`endpoint`] (the `P2pEndpoint` API), then [`socket`] (how a UDP transport
//! plugin instance becomes quinn's socket), then [`crypto`] (quinn's crypto traits over the
//! ML-KEM-768 / ML-DSA-65 rustls configuration; no ring, no aws-lc).

pub mod admission;
pub mod crypto;
pub mod endpoint;
pub mod socket;
