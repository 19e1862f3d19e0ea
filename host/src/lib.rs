//! The antmesh host.
//!
//! Read first: [`transport`] (the one interface every transport is seen through), then
//! [`plugin`] (how native plugins are found, checked and wrapped into that interface),
//! then [`daemon`] (the thin tokio layer behind `antmesh up`) and [`config`].
//!
//! Data flow: transport plugin → [`transport::Transport`] + its event stream → session
//! engines (QUIC or constrained) → router → destinations → application API. Protocol state
//! machines live in sans-IO modules that take `now` as a parameter; only [`daemon`] owns
//! sockets, timers and the runtime.

pub mod budget;
pub mod config;
pub mod daemon;
pub mod identity;
pub mod link;
pub mod log_budget;
pub mod mesh;
pub mod plugin;
pub mod quic;
pub mod tls;
pub mod transport;
