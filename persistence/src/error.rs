use std::path::PathBuf;

/// What can go wrong with a node's data directory. Every message names the file
/// and says what the operator can do.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot create data directory {path}: {source}; check the path and its permissions")]
    CreateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot create {path}: {source}; check that its directory is writable and its disk has room")]
    Create {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is already in use by another kiln process; stop it or use another --data-dir")]
    InUse { path: PathBuf },
    #[error(
        "{path} is not a kiln database ({detail}); use another --data-dir or move the file away"
    )]
    NotKiln { path: PathBuf, detail: String },
    #[error("{path} was written by a newer kiln (format {found}, this binary knows {known}); run a newer kiln")]
    NewerFormat {
        path: PathBuf,
        found: u32,
        known: u32,
    },
    #[error("data directory {dir} {detail}; start it with the secret it was created with, or use a new --data-dir")]
    SecretMismatch { dir: PathBuf, detail: String },
    #[error("data directory {dir} belongs to cluster {stored}, not {offered}; use a new --data-dir to join cluster {offered}")]
    ClusterMismatch {
        dir: PathBuf,
        stored: String,
        offered: String,
    },
    #[error("{path} is missing, but this data directory belongs to cluster {cluster}: the file holds this node's control-plane votes and log, and a node that forgot them could elect two actives; restore it from a backup, or start with a new --data-dir")]
    ControlMissing { path: PathBuf, cluster: String },
    #[error("{path}: corrupt record {what}: {detail}")]
    Corrupt {
        path: PathBuf,
        what: String,
        detail: String,
    },
    #[error("{path} was opened again after an I/O error, which undoes its commits that were not fsynced: the applied state kept in memory no longer fits it, and the stripe starts again from the file")]
    StateReopened { path: PathBuf },
    #[error("{path} cannot be opened again after an I/O error while transactions begun before it are open; try again shortly")]
    Reopening { path: PathBuf },
    #[error("{path} cannot be written ({detail}); free disk space or fix the disk: the node tries again shortly")]
    Unwritable { path: PathBuf, detail: String },
    #[error("{path}: storage error: {source}")]
    Storage { path: PathBuf, source: redb::Error },
}
