//! The control plane: the decisions that must never be made twice (placement of
//! nodes, active and epoch of each stripe, in-sync sets, slot map), agreed by a
//! majority of a few voters through openraft, over libp2p and `control.redb`.

mod actor;
mod network;
mod pre_vote;
pub mod state;
mod storage;
pub mod types;
pub mod wire;

#[cfg(test)]
mod tests;

pub use actor::{
    raft_config, AttachStripe, ClusterStripes, ConfirmActive, ControlMetrics, ControlPlane,
    ControlPlaneConfig, GetStripes, GiveUpVote, Propose, RequestElection, ServeControl,
    StripeMemberView, StripeView, VoteHandover,
};
pub use network::{addresses, AddressBook, ControlNetwork};
pub use storage::{Applied, LogStore, SharedApplied, StateMachine};

pub(crate) fn unix_ms() -> u64 {
    crate::membership::unix_ms()
}
