//! Every redb table kiln keeps, in one place, with the format version checked at open.

use redb::TableDefinition;

/// Format of `node.redb`. Bump when a table's meaning changes; a node refuses a
/// data directory written by a newer format instead of misreading it.
pub const FORMAT_VERSION: u32 = 1;

/// File name of the node database inside the data directory.
pub const NODE_DB_FILE: &str = "node.redb";

/// Node-wide facts: format version, identity keypair, cluster id, secret verifier,
/// own incarnation. Keys are the `META_*` constants below.
pub const META: TableDefinition<&str, &[u8]> = TableDefinition::new("kiln_meta");

/// Known members of the cluster, by peer id (base58); value is a CBOR `StoredMember`.
pub const MEMBERS: TableDefinition<&str, &[u8]> = TableDefinition::new("kiln_members");

/// Members forgotten on purpose, by peer id; value is the incarnation (u64 LE) up to
/// which announcements of that member are ignored, so gossip does not bring it back.
pub const FORGOTTEN: TableDefinition<&str, u64> = TableDefinition::new("kiln_forgotten");

pub const META_FORMAT_VERSION: &str = "format_version";
pub const META_IDENTITY: &str = "identity_keypair";
pub const META_CLUSTER_ID: &str = "cluster_id";
pub const META_SECRET_VERIFIER: &str = "secret_verifier";
pub const META_INCARNATION: &str = "incarnation";
/// Set (to `[1]`) in the same transaction that records a cluster id this node
/// created itself: the founder bootstraps the control plane, also after a crash
/// between creating the cluster and bootstrapping it.
pub const META_CLUSTER_FOUNDER: &str = "cluster_founder";

/// File name of the control-plane database inside the data directory. Always
/// fsynced: a voter must never forget a vote, whatever the persistence mode.
pub const CONTROL_DB_FILE: &str = "control.redb";

/// Control-plane facts: format version, the Raft vote, the committed log id, the
/// last purged log id and the latest state-machine snapshot. Keys are `CONTROL_*`.
pub const CONTROL_META: TableDefinition<&str, &[u8]> = TableDefinition::new("kiln_control_meta");

/// The control plane's Raft log: index → one CBOR-encoded entry.
pub const CONTROL_LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("kiln_control_log");

pub const CONTROL_VOTE: &str = "vote";
pub const CONTROL_COMMITTED: &str = "committed";
pub const CONTROL_LAST_PURGED: &str = "last_purged";
pub const CONTROL_SNAPSHOT: &str = "snapshot";

/// File name of the stripe database (the node's share of the data): the
/// stripe's facts and replication log.
pub const STRIPE_DB_FILE: &str = "stripe.redb";

/// File name of the stripe's applied state (key/value data, request records,
/// the change outbox): a file of its own, so its flushes and the log's
/// appends never wait for one redb writer.
pub const STRIPE_STATE_DB_FILE: &str = "stripe-state.redb";

/// The applied state's facts: format version, applied index, change seq, an
/// unfinished snapshot install. Keys are `STRIPE_*`.
pub const STRIPE_STATE_META: TableDefinition<&str, &[u8]> =
    TableDefinition::new("kiln_stripe_state_meta");

/// Stripe facts: format version, stripe, promised epoch, log base. Keys are `STRIPE_*`.
pub const STRIPE_META: TableDefinition<&str, &[u8]> = TableDefinition::new("kiln_stripe_meta");

/// The stripe's replication log: index → one CBOR-encoded entry.
pub const STRIPE_LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("kiln_stripe_log");

/// The key/value data: (map, key) → (version, value).
pub const KV: TableDefinition<(&str, &str), (u64, &[u8])> = TableDefinition::new("kiln_kv");

/// Results of recent client requests by request id (idempotency keys and the
/// node's own retry ids), CBOR-encoded, so a retry is answered, not re-applied.
pub const REQUESTS: TableDefinition<&str, &[u8]> = TableDefinition::new("kiln_requests");

/// When each request record may go: (remember until, Unix ms; request id).
/// Records are dropped in log order (see `KvTxn::prune_requests`), so every
/// member drops the same ones at the same entry.
pub const REQUEST_EXPIRY: TableDefinition<(u64, &str), ()> =
    TableDefinition::new("kiln_request_expiry");

/// Outbox of the stripe's change events: change seq → CBOR change, written in the
/// same transaction as the write it describes, so an applied write always has its
/// event. The broadcast log takes them from here.
pub const CHANGES: TableDefinition<u64, &[u8]> = TableDefinition::new("kiln_stripe_changes");

/// A snapshot being received from the active: the key/value state and request
/// records, swapped in for [`KV`] and [`REQUESTS`] once complete.
pub const KV_STAGING: TableDefinition<(&str, &str), (u64, &[u8])> =
    TableDefinition::new("kiln_kv_staging");
pub const REQUESTS_STAGING: TableDefinition<&str, &[u8]> =
    TableDefinition::new("kiln_requests_staging");

pub const STRIPE_PROMISED: &str = "promised";
pub const STRIPE_BASE: &str = "base";
pub const STRIPE_APPLIED: &str = "applied";
pub const STRIPE_ID: &str = "stripe";
/// Number of change events the applied writes produced (the last change seq).
pub const STRIPE_CHANGES: &str = "changes";
/// A snapshot installed in the state file whose log part may not be done:
/// (epoch, index, keep the log's tail).
pub const STRIPE_INSTALLING: &str = "installing";
