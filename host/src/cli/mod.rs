//! Operator subcommands of the `antmesh` binary (not part of the library).

pub mod id;
pub mod mesh;
