//! Databroadcast: events with an origin and a per-origin seq, spread over
//! gossipsub, kept in a bounded log, repaired from peers, streamed to subscribers.

pub mod actor;
pub mod event;
pub mod keys;
pub mod state;

pub use actor::{
    BroadcastActor, BroadcastConfig, BroadcastMetrics, Delivered, GetOrigins, GossipIn,
    GossipInlet, Publish, PublishError, ServeFetch, Subscribe, Subscription,
};
