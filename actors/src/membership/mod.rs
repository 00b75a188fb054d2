//! Membership: who is in the cluster and whether they are alive.
//! `state` is the protocol; `actor` does its I/O.

mod actor;
pub mod state;
#[cfg(test)]
mod tests;

pub use actor::{
    unix_ms, ForgetMember, GetNodeInfo, Leave, ListMembers, MembershipActor, MembershipMetrics,
    NodeInfo,
};
pub use state::{MemberView, MembershipConfig};
