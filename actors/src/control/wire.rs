//! Messages of the control plane between nodes. They travel inside the net crate's
//! versioned envelope as the body of `Request::ControlPlane` /
//! `Response::ControlPlane`; this module owns their schema because they embed
//! openraft's own types.

use openraft::error::{InstallSnapshotError, RaftError};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::LogId;
use serde::{de::DeserializeOwned, Deserialize, Serialize};

use super::state::{ControlCommand, ControlOutcome};
use super::types::{ControlTypes, NodeId};

/// Largest control-plane body accepted (the net frame limit leaves room for the
/// envelope).
pub const MAX_CONTROL_BODY: usize = kiln_net::wire::MAX_FRAME_BYTES - 1024;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum ControlRequest {
    AppendEntries(AppendEntriesRequest<ControlTypes>),
    Vote(VoteRequest<NodeId>),
    InstallSnapshot(InstallSnapshotRequest<ControlTypes>),
    /// Propose a command. `forwarded`: sent to this node as the leader, decide
    /// here; otherwise relayed by this node to the leader it knows (once).
    Propose {
        command: ControlCommand,
        forwarded: bool,
    },
    /// A standby of `stripe` has not heard its active of `epoch`: the leader
    /// coordinates an election.
    Elect {
        stripe: u32,
        epoch: u64,
    },
    /// Is `node` the active of `stripe` in `epoch`, as of now (linearizable)?
    ConfirmActive {
        stripe: u32,
        epoch: u64,
        node: NodeId,
    },
    /// Would the receiver vote for the sender, whose log ends at `last_log`,
    /// if it started an election now? Changes nothing on the receiver (see
    /// `pre_vote`).
    PreVote {
        last_log: Option<LogId<NodeId>>,
    },
}

#[derive(Debug, Serialize, Deserialize)]
pub enum ControlResponse {
    AppendEntries(Result<AppendEntriesResponse<NodeId>, RaftError<NodeId>>),
    Vote(Result<VoteResponse<NodeId>, RaftError<NodeId>>),
    InstallSnapshot(
        Result<InstallSnapshotResponse<NodeId>, RaftError<NodeId, InstallSnapshotError>>,
    ),
    /// The outcome of a committed proposal, or why it was not committed (no leader
    /// known, not reachable, ...): the proposer retries.
    Propose(Result<ControlOutcome, String>),
    Elect,
    Confirmed(Result<bool, String>),
    PreVote {
        granted: bool,
    },
}

/// Encodes a control-plane body (CBOR).
pub fn to_cbor<T: Serialize>(msg: &T) -> Vec<u8> {
    let mut buf = Vec::with_capacity(256);
    if let Err(e) = ciborium::into_writer(msg, &mut buf) {
        tracing::error!(error = %e, "failed to encode a control-plane record");
    }
    buf
}

/// Decodes a control-plane body or record, refusing anything over `max` bytes.
pub fn from_cbor<T: DeserializeOwned>(bytes: &[u8], max: usize) -> Result<T, String> {
    if bytes.len() > max {
        return Err(format!("{} bytes exceed the limit of {max}", bytes.len()));
    }
    ciborium::from_reader(bytes).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::{CommittedLeaderId, Entry, EntryPayload, Vote};
    use proptest::prelude::*;

    #[test]
    fn requests_round_trip() {
        let entry = Entry::<ControlTypes> {
            log_id: LogId::new(CommittedLeaderId::new(3, 7), 12),
            payload: EntryPayload::Normal(ControlCommand::Configure { stripes: 2 }),
        };
        let req = ControlRequest::AppendEntries(AppendEntriesRequest {
            vote: Vote::new_committed(3, 7),
            prev_log_id: Some(LogId::new(CommittedLeaderId::new(3, 7), 11)),
            entries: vec![entry],
            leader_commit: Some(LogId::new(CommittedLeaderId::new(3, 7), 11)),
        });
        let bytes = to_cbor(&req);
        let back: ControlRequest = from_cbor(&bytes, MAX_CONTROL_BODY).unwrap();
        assert_eq!(format!("{back:?}"), format!("{req:?}"));

        let prop = ControlRequest::Propose {
            command: ControlCommand::Join {
                node: 9,
                peer: "p".into(),
                witness: true,
                stripe: None,
            },
            forwarded: false,
        };
        let back: ControlRequest = from_cbor(&to_cbor(&prop), MAX_CONTROL_BODY).unwrap();
        assert_eq!(format!("{back:?}"), format!("{prop:?}"));
    }

    /// A node older than pre-votes must refuse one as undecodable (the asker
    /// counts that as a yes), not read it as some other request.
    #[test]
    fn a_pre_vote_is_undecodable_for_a_node_that_predates_it() {
        #[derive(Debug, Deserialize)]
        #[allow(dead_code)]
        enum BeforePreVote {
            AppendEntries(AppendEntriesRequest<ControlTypes>),
            Vote(VoteRequest<NodeId>),
            InstallSnapshot(InstallSnapshotRequest<ControlTypes>),
            Propose {
                command: ControlCommand,
                forwarded: bool,
            },
            Elect {
                stripe: u32,
                epoch: u64,
            },
            ConfirmActive {
                stripe: u32,
                epoch: u64,
                node: NodeId,
            },
        }
        let pre_vote = to_cbor(&ControlRequest::PreVote {
            last_log: Some(LogId::new(CommittedLeaderId::new(3, 7), 12)),
        });
        assert!(from_cbor::<BeforePreVote>(&pre_vote, MAX_CONTROL_BODY).is_err());
        let back: ControlRequest = from_cbor(&pre_vote, MAX_CONTROL_BODY).unwrap();
        assert!(matches!(back, ControlRequest::PreVote { last_log: Some(l) } if l.index == 12));
    }

    #[test]
    fn oversized_bodies_are_refused() {
        assert!(from_cbor::<ControlRequest>(&[0u8; 64], 10).is_err());
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = from_cbor::<ControlRequest>(&bytes, MAX_CONTROL_BODY);
            let _ = from_cbor::<ControlResponse>(&bytes, MAX_CONTROL_BODY);
        }
    }
}
