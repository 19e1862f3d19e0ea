//! The antmesh transport plugin conformance suite.
//!
//! Read first: [`suite`] (the checks and what each one proves), then [`fixture`] (how a
//! connected pair is made for each transport), then [`harness`] (the event collector the
//! checks wait on) and [`cable`] (the in-runner relay that stands between two stream
//! endpoints so the suite can inject garbage and cut the line).
//!
//! Like rustls' provider tests and the QUIC interop runner, every check reports
//! passed / failed / unsupported, and "unsupported" is only ever derived from the
//! capabilities the plugin itself declares.

pub mod cable;
pub mod fixture;
pub mod harness;
pub mod hostile;
pub mod report;
pub mod suite;

pub use fixture::{Fixture, FixtureError, FIXTURES};
pub use report::{Outcome, Report};
pub use suite::run_suite;
