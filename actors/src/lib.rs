//! actors: the cluster's behaviour. Each protocol is a plain state machine (events
//! in, effects out) wrapped by an actix actor that only does I/O and timers.

pub mod artifact;
mod blocking;
pub mod broadcast;
pub mod control;
pub mod health;
pub mod membership;
pub mod stripe;
