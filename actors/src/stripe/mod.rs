//! Stripes: replication of a stripe's log from its active to its standbys, with
//! elections and in-sync changes decided by the control plane.

mod actor;
pub mod kv;
pub mod replica;
pub mod wire;
pub use actor::*;

#[cfg(test)]
mod sim;
