//! net: kiln's libp2p swarm (tcp + noise + yamux; identify, ping, gossipsub,
//! request-response) and its wire format. It knows nothing of stripes or elections.

pub mod addr;
pub mod backoff;
pub mod codec;
pub mod offences;
mod pipe;
mod swarm;
pub mod wire;

pub use libp2p::identity::Keypair;
pub use libp2p::multiaddr::Protocol;
pub use libp2p::{Multiaddr, PeerId};
pub use swarm::{
    cluster_key_from_secret, spawn, transport, BroadcastIn, CallError, NetChannels, NetCommand,
    NetConfig, NetError, NetEvent, NetHandle, Reply, ServiceRequest,
};
