//! Stripes: replication of a stripe's log from its active to its standbys, with
//! elections and in-sync changes decided by the control plane.

pub mod replica;

#[cfg(test)]
mod sim;
