//! Stripes: replication of a stripe's log from its active to its standbys, with
//! elections and in-sync changes decided by the control plane.

mod actor;
pub mod kv;
mod linger;
pub mod replica;
pub mod wire;
pub use actor::*;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

#[cfg(test)]
mod sim;

/// The highest change seq of this node's stripe known here (its broadcast log
/// and its peers' digests): the broadcast actor keeps it, and a node that takes
/// over its stripe with an empty log continues the change seqs above it.
///
/// With temporary persistence a restarted node's stripe log is empty and its
/// broadcast log may lack the last second of received events, so the stripe
/// starts only once the figure is settled: every other node of the cluster sent
/// its digest since this node started, or [`crate::broadcast::SETTLE_WAIT`]
/// passed (a node that is down sends none).
#[derive(Clone, Default)]
pub struct KnownChangeSeq(Arc<KnownChangeSeqInner>);

#[derive(Default)]
struct KnownChangeSeqInner {
    seq: AtomicU64,
    settled: AtomicBool,
}

impl KnownChangeSeq {
    pub fn get(&self) -> u64 {
        self.0.seq.load(Ordering::Acquire)
    }

    pub fn set(&self, seq: u64) {
        self.0.seq.store(seq, Ordering::Release);
    }

    pub fn settled(&self) -> bool {
        self.0.settled.load(Ordering::Acquire)
    }

    /// Called after the last [`KnownChangeSeq::set`] that must count.
    pub fn settle(&self) {
        self.0.settled.store(true, Ordering::Release);
    }
}
