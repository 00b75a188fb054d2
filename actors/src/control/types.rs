//! The control plane's openraft type configuration and node identities.

use std::io::Cursor;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::state::{ControlCommand, ControlOutcome};

/// openraft wants a `Copy` node id; kiln's identity is the libp2p peer id. The id is
/// the first 8 bytes of a hash of the peer id: stable across restarts, never reused
/// by another node (a collision among a cluster's nodes has odds of about n²/2⁶⁵).
pub type NodeId = u64;

/// Derives the control-plane node id of a peer id (base58 text).
pub fn node_id_of(peer: &str) -> NodeId {
    let digest = Sha256::new()
        .chain_update(b"kiln-control-node-id-v1")
        .chain_update(peer.as_bytes())
        .finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    u64::from_be_bytes(first)
}

/// How to reach a member of the control plane.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ControlNode {
    /// libp2p peer id, base58.
    pub peer: String,
    /// Multiaddrs the node announced (without `/p2p/`).
    pub addrs: Vec<String>,
}

openraft::declare_raft_types!(
    /// Type configuration of kiln's control plane.
    pub ControlTypes:
        D = ControlCommand,
        R = ControlOutcome,
        NodeId = NodeId,
        Node = ControlNode,
        Entry = openraft::Entry<ControlTypes>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_ids_are_stable_and_distinct() {
        let a = node_id_of("12D3KooWA");
        assert_eq!(a, node_id_of("12D3KooWA"));
        assert_ne!(a, node_id_of("12D3KooWB"));
    }
}
