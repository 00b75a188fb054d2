//! openraft's network over the node's libp2p request-response protocol.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use kiln_net::wire::{Request, Response};
use kiln_net::{Multiaddr, NetHandle, PeerId};
use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{Backoff, RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};

use super::types::{ControlNode, ControlTypes, NodeId};
use super::wire::{from_cbor, to_cbor, ControlRequest, ControlResponse, MAX_CONTROL_BODY};

/// The longest pause between the leader's tries of an unreachable node. It is
/// also how long a restarted node may go on with the control-plane state it
/// stored (naming itself active of a stripe that failed over meanwhile,
/// say): with 2 s, requests through a node just restarted waited 1–1.5 s.
const CONTROL_BACKOFF_MAX: Duration = Duration::from_millis(500);

/// Latest known addresses per peer (from membership), fresher than what the
/// control plane's membership config recorded when a node was added.
pub type AddressBook = Arc<RwLock<HashMap<PeerId, Vec<Multiaddr>>>>;

/// The addresses the book knows for `peer` (none if it knows none).
pub fn addresses(book: &AddressBook, peer: &PeerId) -> Vec<Multiaddr> {
    book.read()
        .ok()
        .and_then(|b| b.get(peer).cloned())
        .unwrap_or_default()
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Failure(String);

/// Makes one `ControlPeer` per target node.
#[derive(Clone)]
pub struct ControlNetwork {
    pub net: NetHandle,
    pub book: AddressBook,
}

impl RaftNetworkFactory<ControlTypes> for ControlNetwork {
    type Network = ControlPeer;

    async fn new_client(&mut self, target: NodeId, node: &ControlNode) -> ControlPeer {
        ControlPeer {
            target,
            peer: node.peer.parse().ok(),
            addrs: node.addrs.iter().filter_map(|a| a.parse().ok()).collect(),
            net: self.net.clone(),
            book: self.book.clone(),
        }
    }
}

/// The connection to one control-plane node.
pub struct ControlPeer {
    target: NodeId,
    /// `None` if the stored peer id does not parse: every call is then unreachable.
    peer: Option<PeerId>,
    addrs: Vec<Multiaddr>,
    net: NetHandle,
    book: AddressBook,
}

type RpcResult<T, E> = Result<T, RPCError<NodeId, ControlNode, E>>;

impl ControlPeer {
    async fn call<E: std::error::Error>(
        &self,
        req: ControlRequest,
        timeout: Duration,
    ) -> RpcResult<ControlResponse, E> {
        let Some(peer) = self.peer else {
            return Err(RPCError::Unreachable(Unreachable::new(&Failure(format!(
                "node {} has no valid peer id",
                self.target
            )))));
        };
        let mut addrs = self.addrs.clone();
        if let Ok(book) = self.book.read() {
            if let Some(known) = book.get(&peer) {
                addrs.extend(known.iter().cloned());
            }
        }
        let request = Request::ControlPlane {
            body: serde_bytes::ByteBuf::from(to_cbor(&req)),
        };
        let response =
            match tokio::time::timeout(timeout, self.net.call(peer, addrs, request)).await {
                Err(_) => {
                    return Err(RPCError::Unreachable(Unreachable::new(&Failure(format!(
                        "no answer from {peer} within {timeout:?}"
                    )))))
                }
                Ok(Err(e)) => return Err(RPCError::Unreachable(Unreachable::new(&e))),
                Ok(Ok(r)) => r,
            };
        match response {
            Response::ControlPlane { body } => from_cbor(&body, MAX_CONTROL_BODY)
                .map_err(|e| RPCError::Network(NetworkError::new(&Failure(e)))),
            Response::Refused { reason } => Err(RPCError::Unreachable(Unreachable::new(&Failure(
                format!("{peer} refused: {reason}"),
            )))),
            other => Err(RPCError::Network(NetworkError::new(&Failure(format!(
                "unexpected answer from {peer}: {other:?}"
            ))))),
        }
    }

    fn unexpected<E: std::error::Error>(&self, what: &str) -> RPCError<NodeId, ControlNode, E> {
        RPCError::Network(NetworkError::new(&Failure(format!(
            "node {} answered a {what} with another kind of response",
            self.target
        ))))
    }
}

impl RaftNetwork<ControlTypes> for ControlPeer {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<ControlTypes>,
        option: RPCOption,
    ) -> RpcResult<AppendEntriesResponse<NodeId>, RaftError<NodeId>> {
        match self
            .call(ControlRequest::AppendEntries(rpc), option.hard_ttl())
            .await?
        {
            ControlResponse::AppendEntries(Ok(r)) => Ok(r),
            ControlResponse::AppendEntries(Err(e)) => {
                Err(RPCError::RemoteError(RemoteError::new(self.target, e)))
            }
            _ => Err(self.unexpected("append-entries")),
        }
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<ControlTypes>,
        option: RPCOption,
    ) -> RpcResult<InstallSnapshotResponse<NodeId>, RaftError<NodeId, InstallSnapshotError>> {
        match self
            .call(ControlRequest::InstallSnapshot(rpc), option.hard_ttl())
            .await?
        {
            ControlResponse::InstallSnapshot(Ok(r)) => Ok(r),
            ControlResponse::InstallSnapshot(Err(e)) => {
                Err(RPCError::RemoteError(RemoteError::new(self.target, e)))
            }
            _ => Err(self.unexpected("install-snapshot")),
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> RpcResult<VoteResponse<NodeId>, RaftError<NodeId>> {
        match self
            .call(ControlRequest::Vote(rpc), option.hard_ttl())
            .await?
        {
            ControlResponse::Vote(Ok(r)) => Ok(r),
            ControlResponse::Vote(Err(e)) => {
                Err(RPCError::RemoteError(RemoteError::new(self.target, e)))
            }
            _ => Err(self.unexpected("vote")),
        }
    }

    fn backoff(&self) -> Backoff {
        // An unreachable node is retried soon (on a LAN it is usually back, or
        // replaced, quickly), then less often: every retry is a failed request
        // (and an error line from openraft). The cap bounds how long a node that
        // came back waits for the leader.
        Backoff::new(std::iter::successors(
            Some(Duration::from_millis(200)),
            |d| Some((*d * 2).min(CONTROL_BACKOFF_MAX)),
        ))
    }
}
