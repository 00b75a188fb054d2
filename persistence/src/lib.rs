//! persistence: every byte of a kiln node that survives a restart, in redb.
//!
//! It knows nothing of the network: identity is stored as opaque bytes, members as
//! plain records. Identity, membership and cluster facts are always committed with
//! `Durability::Immediate` (fsync), whatever the node's persistence mode.

mod artifact_store;
mod broadcast_store;
mod control_store;
mod db_file;
mod error;
mod node_store;
pub mod schema;
mod stripe_store;
mod unflushed;

pub use artifact_store::{
    chunk_count, chunks_root, is_sha256_hex, Announced, ArtifactStore, Digests, Upload,
    ARTIFACT_CHUNK,
};
pub use broadcast_store::{
    BroadcastStore, Missed, OriginRun, PublishKey, Retention, StoredEvent, BROADCAST_DB_FILE,
};
pub use control_store::ControlStore;
pub use error::StoreError;
pub use node_store::{verify_untouched, MemberState, NodeStore, SecretCheck, StoredMember};
pub use stripe_store::{
    KvRow, KvTxn, SnapshotSource, StripeRecovered, StripeStore, STATE_FSYNC_EVERY,
};
