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
