//! Stripes: replication of a stripe's log from its active to its standbys, with
//! elections and in-sync changes decided by the control plane.

mod actor;
pub mod kv;
pub mod replica;
pub mod wire;
pub use actor::*;

#[cfg(test)]
mod sim;

/// The highest change seq of this node's stripe known here (its broadcast log
/// and its peers' digests): the broadcast actor keeps it, and a node that takes
/// over its stripe with an empty log continues the change seqs above it.
pub type KnownChangeSeq = std::sync::Arc<std::sync::atomic::AtomicU64>;
