//! Every message kiln nodes exchange, its protocol version, and the one encoder and
//! decoder for them (CBOR via ciborium, inside a versioned envelope).
//!
//! Gossip goes over gossipsub topics; requests and responses over kiln's
//! request-response protocol. Decoding is defensive: a frame larger than its limit,
//! not CBOR, of an unknown shape or of an unknown version is a `WireError`, never a
//! panic.

use serde::{de::DeserializeOwned, Deserialize, Serialize};

/// Version of the message schema in this module. A peer sending another version is
/// refused message by message (and counted as an offence), so a mixed-version
/// cluster fails loudly instead of misreading.
pub const WIRE_VERSION: u16 = 2;

/// Largest gossip message accepted (gossipsub's `max_transmit_size` is set to this).
pub const MAX_GOSSIP_BYTES: usize = 256 * 1024;

/// Largest request or response frame accepted on the request-response protocol.
pub const MAX_FRAME_BYTES: usize = 4 * 1024 * 1024;

/// Gossipsub topic of membership announcements and claims.
pub const MEMBERSHIP_TOPIC: &str = "kiln/membership/1";

/// Gossipsub topic of databroadcast events and heads.
pub const BROADCAST_TOPIC: &str = "kiln/broadcast/1";

/// One databroadcast event on the wire: its place in its origin's sequence, when it
/// was published (Unix ms) and its content, encoded by the broadcast module (which
/// owns the event schema) and stored as is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventFrame {
    pub seq: u64,
    pub ts: u64,
    pub body: serde_bytes::ByteBuf,
}

/// The run of an origin's events a node holds: `first..=last`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OriginHead {
    pub origin: String,
    pub first: u64,
    pub last: u64,
}

/// Messages on the broadcast gossipsub topic.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum BroadcastGossip {
    /// Consecutive events of one origin.
    Events {
        origin: String,
        events: Vec<EventFrame>,
    },
    /// What the sender holds of every origin it knows, so that a node that
    /// missed the last events of an origin notices and fetches them.
    Heads {
        heads: Vec<OriginHead>,
        sent_ms: u64,
    },
}

/// Liveness state of a member as the cluster sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum MemberStatus {
    Alive,
    Suspect,
    Dead,
    Left,
}

impl MemberStatus {
    /// The lower-case name used in the HTTP API, logs and metrics labels.
    pub fn as_str(self) -> &'static str {
        match self {
            MemberStatus::Alive => "alive",
            MemberStatus::Suspect => "suspect",
            MemberStatus::Dead => "dead",
            MemberStatus::Left => "left",
        }
    }
}

/// What the cluster knows of one member.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberRecord {
    /// libp2p peer id, base58.
    pub id: String,
    pub name: String,
    /// Multiaddrs (without `/p2p/`) the member can be dialled at.
    pub addrs: Vec<String>,
    /// Raised by the member itself to refute a suspicion and at every start.
    pub incarnation: u64,
    /// Unix milliseconds when the member's process started.
    pub started_ms: u64,
    pub status: MemberStatus,
}

/// Messages on the membership gossipsub topic.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MembershipGossip {
    /// The sender announces itself. `beat` grows with every announcement so that
    /// each is a distinct gossipsub message and a fresh sign of life. `cluster` is
    /// the sender's cluster id once it has one: receivers ignore announcements of
    /// another cluster and a node without one adopts it.
    Announce {
        member: MemberRecord,
        beat: u64,
        cluster: Option<String>,
    },
    /// `by` claims that `subject` at `incarnation` is in `status` (suspect, dead or
    /// left). The subject refutes a suspect or dead claim by announcing a higher
    /// incarnation.
    Claim {
        subject: String,
        incarnation: u64,
        status: MemberStatus,
        by: String,
        /// Unix ms when the claim was made: a claim repeated later is a new
        /// gossipsub message, not a duplicate dropped for the next minute.
        sent_ms: u64,
    },
    /// An operator asked the cluster to forget a dead or left member.
    Forget { subject: String, incarnation: u64 },
    /// Members the sender has just learnt of first-hand (while connected to them)
    /// and passes on to all its peers at once: while nodes are joining, the
    /// gossipsub mesh is still forming, and news forwarded only along it reached
    /// most nodes a heartbeat or two late. No sender field, so that two nodes
    /// passing on the same news send one gossipsub message.
    Joined {
        members: Vec<MemberRecord>,
        cluster: Option<String>,
    },
}

/// Requests of kiln's request-response protocol.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// Push-pull on connect: the sender's member table; the answer is the receiver's.
    MembershipSync {
        cluster: Option<String>,
        members: Vec<MemberRecord>,
    },
    /// Indirect probe: can the receiver reach `subject` (which the sender cannot)?
    /// A receiver that is `subject` answers at once; another asks `subject` the
    /// same question over its own connection and answers once it hears back.
    MembershipProbe { subject: String },
    /// A control-plane (Raft) message. The body is encoded by the control plane
    /// itself, which owns the schema of its messages (they embed openraft types);
    /// here it is a size-limited byte string like any other frame.
    ControlPlane { body: serde_bytes::ByteBuf },
    /// A stripe message (replication, election, client operation), encoded by the
    /// stripe module, which owns its schema.
    Stripe { body: serde_bytes::ByteBuf },
    /// Databroadcast repair: the events of `origin` from seq `from` on.
    BroadcastFetch { origin: String, from: u64 },
    /// The chunk digests of the artifact content with this SHA-256 (hex).
    ArtifactManifest { sha256: String },
    /// Chunk `index` of the artifact content with this SHA-256 (hex).
    ArtifactChunk { sha256: String, index: u64 },
}

impl Request {
    /// Requests for a service other than membership, routed to the node's
    /// services channel instead of the membership actor.
    pub fn is_service(&self) -> bool {
        !matches!(
            self,
            Request::MembershipSync { .. } | Request::MembershipProbe { .. }
        )
    }
}

/// Responses of kiln's request-response protocol.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    MembershipSync {
        cluster: Option<String>,
        members: Vec<MemberRecord>,
    },
    MembershipProbe {
        subject: String,
        reachable: bool,
    },
    ControlPlane {
        body: serde_bytes::ByteBuf,
    },
    Stripe {
        body: serde_bytes::ByteBuf,
    },
    /// Events of `origin` from the requested seq on (as many as fit a frame); the
    /// responder holds `first..=last`. A `first` beyond the requested seq means the
    /// events before it are gone from this node's log.
    BroadcastEvents {
        origin: String,
        first: u64,
        last: u64,
        events: Vec<EventFrame>,
    },
    /// The SHA-256 of every chunk, concatenated (32 bytes each).
    ArtifactManifest {
        digests: serde_bytes::ByteBuf,
    },
    ArtifactChunk {
        data: serde_bytes::ByteBuf,
    },
    /// The receiver would not serve the request; `reason` says why.
    Refused {
        reason: String,
    },
}

/// Why a frame from a peer was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("frame of {len} bytes exceeds the limit of {max}")]
    TooLarge { len: usize, max: usize },
    #[error("unknown wire version {0} (this node speaks {WIRE_VERSION})")]
    UnknownVersion(u16),
    #[error("malformed frame: {0}")]
    Malformed(String),
}

#[derive(Serialize)]
struct EnvelopeOut<'a, T> {
    v: u16,
    m: &'a T,
}

#[derive(Deserialize)]
struct EnvelopeVersion {
    v: u16,
}

#[derive(Deserialize)]
struct EnvelopeIn<T> {
    v: u16,
    m: T,
}

/// Encodes `msg` in the current wire version.
pub fn encode<T: Serialize>(msg: &T) -> Vec<u8> {
    let mut buf = Vec::with_capacity(256);
    // Writing into a Vec cannot fail, and our types always serialize.
    if let Err(e) = ciborium::into_writer(
        &EnvelopeOut {
            v: WIRE_VERSION,
            m: msg,
        },
        &mut buf,
    ) {
        tracing::error!(error = %e, "failed to encode a wire message");
    }
    buf
}

/// Decodes a frame of at most `max` bytes.
pub fn decode<T: DeserializeOwned>(bytes: &[u8], max: usize) -> Result<T, WireError> {
    if bytes.len() > max {
        return Err(WireError::TooLarge {
            len: bytes.len(),
            max,
        });
    }
    // One pass in the common case (each pass walks the whole message); the
    // version alone is read only to explain a message that did not decode.
    match ciborium::from_reader::<EnvelopeIn<T>, _>(bytes) {
        Ok(env) if env.v == WIRE_VERSION => Ok(env.m),
        Ok(env) => Err(WireError::UnknownVersion(env.v)),
        Err(e) => match ciborium::from_reader::<EnvelopeVersion, _>(bytes) {
            Ok(version) if version.v != WIRE_VERSION => Err(WireError::UnknownVersion(version.v)),
            _ => Err(WireError::Malformed(e.to_string())),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn record() -> MemberRecord {
        MemberRecord {
            id: "12D3KooWabc".into(),
            name: "n1".into(),
            addrs: vec!["/ip4/127.0.0.1/tcp/7701".into()],
            incarnation: 7,
            started_ms: 1_700_000_000_000,
            status: MemberStatus::Alive,
        }
    }

    #[test]
    fn gossip_round_trips() {
        let msgs = vec![
            MembershipGossip::Announce {
                member: record(),
                beat: 42,
                cluster: Some("c".into()),
            },
            MembershipGossip::Claim {
                subject: "x".into(),
                incarnation: 3,
                status: MemberStatus::Suspect,
                by: "y".into(),
                sent_ms: 1_700_000_000_000,
            },
            MembershipGossip::Forget {
                subject: "x".into(),
                incarnation: 9,
            },
            MembershipGossip::Joined {
                members: vec![record()],
                cluster: Some("c".into()),
            },
        ];
        for m in msgs {
            let bytes = encode(&m);
            assert_eq!(
                decode::<MembershipGossip>(&bytes, MAX_GOSSIP_BYTES).unwrap(),
                m
            );
        }
    }

    #[test]
    fn request_response_round_trip() {
        let req = Request::MembershipSync {
            cluster: Some("c".into()),
            members: vec![record()],
        };
        assert_eq!(
            decode::<Request>(&encode(&req), MAX_FRAME_BYTES).unwrap(),
            req
        );
        let resp = Response::Refused {
            reason: "no".into(),
        };
        assert_eq!(
            decode::<Response>(&encode(&resp), MAX_FRAME_BYTES).unwrap(),
            resp
        );
    }

    #[test]
    fn unknown_version_is_rejected() {
        let mut buf = Vec::new();
        ciborium::into_writer(
            &EnvelopeOut {
                v: WIRE_VERSION + 1,
                m: &record(),
            },
            &mut buf,
        )
        .unwrap();
        assert_eq!(
            decode::<MembershipGossip>(&buf, MAX_GOSSIP_BYTES),
            Err(WireError::UnknownVersion(WIRE_VERSION + 1))
        );
    }

    #[test]
    fn oversized_is_rejected() {
        let big = vec![0u8; MAX_GOSSIP_BYTES + 1];
        assert!(matches!(
            decode::<MembershipGossip>(&big, MAX_GOSSIP_BYTES),
            Err(WireError::TooLarge { .. })
        ));
    }

    #[test]
    fn wrong_shape_is_malformed() {
        let bytes = encode(&"just a string");
        assert!(matches!(
            decode::<MembershipGossip>(&bytes, MAX_GOSSIP_BYTES),
            Err(WireError::Malformed(_))
        ));
    }

    proptest! {
        #[test]
        fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let _ = decode::<MembershipGossip>(&bytes, MAX_GOSSIP_BYTES);
            let _ = decode::<Request>(&bytes, MAX_FRAME_BYTES);
            let _ = decode::<Response>(&bytes, MAX_FRAME_BYTES);
        }

        #[test]
        fn mutated_valid_frames_never_panic(pos in 0usize..64, byte in any::<u8>()) {
            let mut bytes = encode(&MembershipGossip::Announce { member: record(), beat: 1, cluster: None });
            let i = pos % bytes.len();
            bytes[i] = byte;
            let _ = decode::<MembershipGossip>(&bytes, MAX_GOSSIP_BYTES);
        }
    }
}
