//! Membership: who is in the cluster and whether they are alive.
//! `state` is the protocol; `actor` does its I/O.

mod actor;
pub mod state;
#[cfg(test)]
mod tests;

pub use actor::{ForgetMember, Leave, ListMembers, MembershipActor, MembershipMetrics, NodeInfo, GetNodeInfo};
pub use state::{MemberView, MembershipConfig};
