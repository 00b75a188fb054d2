//! Messages between nodes about stripes: replication, elections, and client
//! operations forwarded to a stripe's active. Carried as the body of
//! `Request::Stripe` / `Response::Stripe` of the net crate's versioned envelope.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::kv::{KvCommand, KvOutcome};
use super::replica::{LogPos, Message};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum StripeRequest {
    /// Replication within a stripe; the answer carries the member's reply.
    Replicate { stripe: u32, msg: Message },
    /// An election asks an in-sync standby for its position (and fences it).
    Prepare { stripe: u32, epoch: u64 },
    /// An election coordinator checks whether the active still answers.
    Ping { stripe: u32 },
    /// A client write for the active. `first_attempt`: the node that took the
    /// write sends it for the first time (see `KvCommand::done_at_commit`); a
    /// node that does not know the field sends none, and its writes are
    /// answered after their apply, as before it.
    Write {
        stripe: u32,
        cmd: KvCommand,
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        first_attempt: bool,
    },
    /// A client read: linearizable at the active, or `stale` at any member.
    Read {
        stripe: u32,
        map: String,
        key: String,
        stale: bool,
    },
    /// Planned handover of the active role, to `to` (a peer id) or the most
    /// up-to-date in-sync standby.
    HandOver { stripe: u32, to: Option<String> },
    /// Part `seq` of a snapshot of the active's applied state at `at`, for a
    /// member too far behind for log entries: key/value rows and request
    /// records; the last part (`done`) carries the change count and completes it.
    SnapshotChunk {
        stripe: u32,
        epoch: u64,
        at: LogPos,
        seq: u64,
        kv: Vec<(String, String, u64, serde_bytes::ByteBuf)>,
        requests: Vec<(String, serde_bytes::ByteBuf)>,
        /// Keys in the whole snapshot, for progress.
        total_keys: u64,
        changes: u64,
        done: bool,
    },
    /// Keys of a map, for listing.
    Keys {
        stripe: u32,
        map: String,
        prefix: String,
        after: Option<String>,
        limit: u32,
    },
    /// How far behind the active each other member is (asked of the active).
    Lags { stripe: u32 },
    /// A client request (`Write`, `Read`, `Keys`) for the stripe's active, sent
    /// to another node that passes it on: the way around a link between this
    /// node and the active that is down while both still reach others. The
    /// node asks the active it knows, once; it never relays further. (A node
    /// older than this variant refuses it as malformed, logging a warning; the
    /// sender's next attempt goes to the active directly, the one after
    /// through a member again.)
    Relay {
        stripe: u32,
        request: Box<StripeRequest>,
    },
}

impl StripeRequest {
    /// The request as sent again after an attempt that may have reached the
    /// active: a write's outcome then waits for its apply.
    pub fn mark_retried(&mut self) {
        match self {
            StripeRequest::Write { first_attempt, .. } => *first_attempt = false,
            StripeRequest::Relay { request, .. } => request.mark_retried(),
            _ => {}
        }
    }
}

/// Why a node could not serve a stripe request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum ServeError {
    #[error("not the active of stripe {stripe} (epoch {epoch})")]
    NotActive { stripe: u32, epoch: u64 },
    #[error("not a member of stripe {0}")]
    NotMember(u32),
    #[error("the stripe's storage failed: {0}")]
    Storage(String),
    #[error("the node stepped down before the operation completed")]
    SteppedDown,
    /// A stale read asked of a member that started without its data (or is
    /// taking a snapshot) and has not caught up: another member answers.
    #[error("this member of stripe {0} is still catching up")]
    Behind(u32),
    /// The write was in the log when the stripe's storage failed: it may yet be
    /// committed (a standby holding it can take over), so its outcome is not
    /// known; sent again under the same request id, it is applied at most once.
    #[error("the stripe's storage failed after the write was appended; its outcome is not known yet: {0}")]
    Unsettled(String),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum StripeResponse {
    Replicated(Option<Message>),
    Prepared(Result<LogPos, ServeError>),
    /// The position of a member that started without its stripe data and has
    /// not caught up since (see `replica::electable`).
    PreparedBehind(LogPos),
    /// The epoch in which the answering node is active, if it is, and whether
    /// it started without its stripe data and has not caught up since.
    Pong {
        active_in: Option<u64>,
        #[serde(default)]
        started_empty: bool,
    },
    Written(Result<KvOutcome, ServeError>),
    Value(Result<Option<(u64, serde_bytes::ByteBuf)>, ServeError>),
    Keys(Result<Vec<String>, ServeError>),
    /// Entries each member is behind the active, by peer id.
    Lags(Result<BTreeMap<String, u64>, ServeError>),
    /// The new active's peer id (`None`: the node was not active).
    HandedOver(Result<Option<String>, String>),
    /// A snapshot part was stored (the last one: installed).
    SnapshotStored(Result<(), String>),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::wire::{from_cbor, to_cbor};
    use crate::stripe::kv::{Condition, KvOp, SessionTag};
    use crate::stripe::replica::Entry;

    #[test]
    fn round_trips() {
        let reqs = vec![
            StripeRequest::Replicate {
                stripe: 1,
                msg: Message::Append {
                    epoch: 3,
                    prev: LogPos { epoch: 2, index: 9 },
                    entries: vec![Entry {
                        epoch: 3,
                        data: vec![1, 2, 3],
                    }],
                    commit: 8,
                    round: 4,
                },
            },
            StripeRequest::Write {
                stripe: 0,
                cmd: KvCommand {
                    request: "k:abc".into(),
                    op: KvOp::Put {
                        map: "orders".into(),
                        key: "42".into(),
                        value: vec![0; 10],
                        cond: Condition::IfVersion(7),
                    },
                    received_ms: 5,
                    remember_until_ms: 120_005,
                    session: None,
                },
                first_attempt: true,
            },
            StripeRequest::Write {
                stripe: 1,
                cmd: KvCommand {
                    request: String::new(),
                    op: KvOp::Delete {
                        map: "orders".into(),
                        key: "43".into(),
                        cond: Condition::None,
                    },
                    received_ms: 6,
                    remember_until_ms: 10_006,
                    session: Some(SessionTag {
                        id: "5eed".into(),
                        seq: 9,
                        done_below: 4,
                    }),
                },
                first_attempt: false,
            },
        ];
        for r in &reqs {
            let back: StripeRequest = from_cbor(&to_cbor(r), 1 << 20).unwrap();
            assert_eq!(&back, r);
        }
        // A node that knows no `first_attempt` reads a write with it, and one
        // without it reads as a later attempt.
        #[derive(Debug, PartialEq, Serialize, Deserialize)]
        enum Before {
            Write { stripe: u32, cmd: KvCommand },
        }
        let StripeRequest::Write { stripe, cmd, .. } = reqs[1].clone() else {
            unreachable!("the test's first write");
        };
        let now = StripeRequest::Write {
            stripe,
            cmd: cmd.clone(),
            first_attempt: true,
        };
        let before: Before = from_cbor(&to_cbor(&now), 1 << 20).unwrap();
        assert_eq!(
            before,
            Before::Write {
                stripe,
                cmd: cmd.clone()
            }
        );
        let back: StripeRequest = from_cbor(&to_cbor(&before), 1 << 20).unwrap();
        assert_eq!(
            back,
            StripeRequest::Write {
                stripe,
                cmd,
                first_attempt: false
            }
        );
        let mut relayed = StripeRequest::Relay {
            stripe,
            request: Box::new(now),
        };
        relayed.mark_retried();
        assert!(matches!(relayed, StripeRequest::Relay { request, .. }
            if matches!(*request, StripeRequest::Write { first_attempt: false, .. })));

        let resp = StripeResponse::Written(Err(ServeError::NotActive {
            stripe: 1,
            epoch: 2,
        }));
        let back: StripeResponse = from_cbor(&to_cbor(&resp), 1 << 20).unwrap();
        assert_eq!(back, resp);
    }
}
