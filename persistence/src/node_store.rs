use std::path::{Path, PathBuf};

use redb::{Database, Durability, ReadableDatabase, ReadableTable};

use redb::TableDefinition;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::schema::*;
use crate::StoreError;

/// State of a member as last known, persisted so that a restarted node knows whom to dial.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum MemberState {
    Alive,
    Suspect,
    Dead,
    Left,
}

/// One member as stored in `MEMBERS`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredMember {
    pub id: String,
    pub name: String,
    pub addrs: Vec<String>,
    pub incarnation: u64,
    pub started_ms: u64,
    pub state: MemberState,
    /// Unix milliseconds when the member entered `state`; drives `dead_member_ttl_s`.
    pub state_since_unix_ms: u64,
}

/// What the stored secret verifier says about the secret a node was started with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SecretCheck {
    /// First start: the verifier of this secret (or of "no secret") was recorded.
    Recorded,
    /// The secret matches the one the data directory was created with.
    Matches,
}

/// The node database `node.redb` of one data directory.
pub struct NodeStore {
    db: Database,
    dir: PathBuf,
    path: PathBuf,
}

const VERIFIER_DOMAIN: &[u8] = b"kiln-secret-verifier-v1";
const OPEN_CLUSTER_MARK: &[u8] = b"open";

impl NodeStore {
    /// Opens (or creates, for an empty directory) the node database of `dir`.
    /// Refuses a file that is not a kiln database or has a newer format, without
    /// writing to it.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir).map_err(|source| StoreError::CreateDir {
            path: dir.to_path_buf(),
            source,
        })?;
        let path = dir.join(NODE_DB_FILE);
        let existed = path.exists();
        let map_open = |e: redb::DatabaseError| map_open_error(e, &path);
        let (db, creating) = if existed {
            (db_builder().open(&path).map_err(map_open)?, None)
        } else {
            let (db, tmp) = create_unnamed(&path)?;
            (db, Some(tmp))
        };
        let store = NodeStore {
            db,
            dir: dir.to_path_buf(),
            path,
        };
        match creating {
            None => store.check_format()?,
            Some(tmp) => {
                store.init()?;
                name_created(&tmp, &store.path)?;
            }
        }
        Ok(store)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn storage<E: Into<redb::Error>>(&self) -> impl Fn(E) -> StoreError + '_ {
        move |e| StoreError::Storage {
            path: self.path.clone(),
            source: e.into(),
        }
    }

    fn init(&self) -> Result<(), StoreError> {
        let txn = self.db.begin_write().map_err(self.storage())?;
        {
            let mut meta = txn.open_table(META).map_err(self.storage())?;
            meta.insert(META_FORMAT_VERSION, FORMAT_VERSION.to_le_bytes().as_slice())
                .map_err(self.storage())?;
            txn.open_table(MEMBERS).map_err(self.storage())?;
            txn.open_table(FORGOTTEN).map_err(self.storage())?;
        }
        txn.commit().map_err(self.storage())
    }

    fn check_format(&self) -> Result<(), StoreError> {
        let txn = self.db.begin_read().map_err(self.storage())?;
        check_format(&txn, &self.path)
    }

    fn get_meta(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let txn = self.db.begin_read().map_err(self.storage())?;
        let meta = txn.open_table(META).map_err(self.storage())?;
        Ok(meta
            .get(key)
            .map_err(self.storage())?
            .map(|v| v.value().to_vec()))
    }

    fn put_meta(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        let mut txn = self.db.begin_write().map_err(self.storage())?;
        txn.set_durability(Durability::Immediate)
            .map_err(self.storage())?;
        {
            let mut meta = txn.open_table(META).map_err(self.storage())?;
            meta.insert(key, value).map_err(self.storage())?;
        }
        txn.commit().map_err(self.storage())
    }

    /// The node's identity keypair (opaque bytes), created by `generate` at first start.
    pub fn identity_or_create(
        &self,
        generate: impl FnOnce() -> Vec<u8>,
    ) -> Result<(Vec<u8>, bool), StoreError> {
        if let Some(bytes) = self.get_meta(META_IDENTITY)? {
            return Ok((bytes, false));
        }
        let bytes = generate();
        self.put_meta(META_IDENTITY, &bytes)?;
        Ok((bytes, true))
    }

    /// Records the verifier of `secret` at first start; afterwards, refuses another one.
    /// Only a salted hash is stored, never the secret.
    pub fn bind_secret(&self, secret: Option<&[u8]>) -> Result<SecretCheck, StoreError> {
        match self.get_meta(META_SECRET_VERIFIER)? {
            None => {
                let record = match secret {
                    None => OPEN_CLUSTER_MARK.to_vec(),
                    Some(s) => {
                        let salt: [u8; 16] = rand::random();
                        let mut rec = salt.to_vec();
                        rec.extend_from_slice(&verifier(&salt, s));
                        rec
                    }
                };
                self.put_meta(META_SECRET_VERIFIER, &record)?;
                Ok(SecretCheck::Recorded)
            }
            Some(stored) => {
                compare_secret(&stored, secret, &self.dir, &self.path)?;
                Ok(SecretCheck::Matches)
            }
        }
    }

    /// The cluster this data directory belongs to, once known.
    pub fn cluster_id(&self) -> Result<Option<String>, StoreError> {
        match self.get_meta(META_CLUSTER_ID)? {
            None => Ok(None),
            Some(b) => String::from_utf8(b)
                .map(Some)
                .map_err(|e| StoreError::Corrupt {
                    path: self.path.clone(),
                    what: "cluster id".into(),
                    detail: e.to_string(),
                }),
        }
    }

    /// Records the id of a cluster this node creates, and that it is its founder,
    /// in one transaction.
    pub fn create_cluster_id(&self, id: &str) -> Result<(), StoreError> {
        if let Some(stored) = self.cluster_id()? {
            return Err(StoreError::ClusterMismatch {
                dir: self.dir.clone(),
                stored,
                offered: id.to_string(),
            });
        }
        let mut txn = self.db.begin_write().map_err(self.storage())?;
        txn.set_durability(Durability::Immediate)
            .map_err(self.storage())?;
        {
            let mut meta = txn.open_table(META).map_err(self.storage())?;
            meta.insert(META_CLUSTER_ID, id.as_bytes())
                .map_err(self.storage())?;
            meta.insert(META_CLUSTER_FOUNDER, [1u8].as_slice())
                .map_err(self.storage())?;
        }
        txn.commit().map_err(self.storage())
    }

    /// Whether this node created its cluster (and so bootstraps the control plane).
    pub fn is_cluster_founder(&self) -> Result<bool, StoreError> {
        Ok(self.get_meta(META_CLUSTER_FOUNDER)?.is_some())
    }

    /// Records the cluster id; refuses to change it once recorded.
    pub fn set_cluster_id(&self, id: &str) -> Result<(), StoreError> {
        match self.cluster_id()? {
            Some(stored) if stored == id => Ok(()),
            Some(stored) => Err(StoreError::ClusterMismatch {
                dir: self.dir.clone(),
                stored,
                offered: id.to_string(),
            }),
            None => self.put_meta(META_CLUSTER_ID, id.as_bytes()),
        }
    }

    /// Bumps and returns this node's incarnation: every start outranks what the
    /// cluster remembers of the previous run (including a `dead` verdict).
    pub fn next_incarnation(&self) -> Result<u64, StoreError> {
        let current = match self.get_meta(META_INCARNATION)? {
            None => 0,
            Some(b) => {
                let arr: [u8; 8] = b.as_slice().try_into().map_err(|_| StoreError::Corrupt {
                    path: self.path.clone(),
                    what: "incarnation".into(),
                    detail: format!("{} bytes, expected 8", b.len()),
                })?;
                u64::from_le_bytes(arr)
            }
        };
        self.store_incarnation(current + 1)?;
        Ok(current + 1)
    }

    /// Persists an incarnation raised at run time (a refutation). The stored value
    /// never goes down, whatever order writes arrive in.
    pub fn store_incarnation(&self, incarnation: u64) -> Result<(), StoreError> {
        let mut txn = self.db.begin_write().map_err(self.storage())?;
        txn.set_durability(Durability::Immediate)
            .map_err(self.storage())?;
        {
            let mut meta = txn.open_table(META).map_err(self.storage())?;
            let stored = meta
                .get(META_INCARNATION)
                .map_err(self.storage())?
                .and_then(|v| <[u8; 8]>::try_from(v.value()).ok())
                .map(u64::from_le_bytes)
                .unwrap_or(0);
            let value = stored.max(incarnation);
            meta.insert(META_INCARNATION, value.to_le_bytes().as_slice())
                .map_err(self.storage())?;
        }
        txn.commit().map_err(self.storage())
    }

    /// Every member persisted. A record that cannot be decoded is skipped with a
    /// warning: gossip will teach the member again.
    pub fn load_members(&self) -> Result<Vec<StoredMember>, StoreError> {
        let txn = self.db.begin_read().map_err(self.storage())?;
        let table = txn.open_table(MEMBERS).map_err(self.storage())?;
        let mut out = Vec::new();
        for row in table.iter().map_err(self.storage())? {
            let (k, v) = row.map_err(self.storage())?;
            match ciborium::from_reader::<StoredMember, _>(v.value()) {
                Ok(m) => out.push(m),
                Err(e) => tracing::warn!(
                    file = %self.path.display(), member = k.value(), error = %e,
                    "skipping undecodable member record"
                ),
            }
        }
        Ok(out)
    }

    /// Members forgotten on purpose, with the incarnation up to which they stay forgotten.
    pub fn load_forgotten(&self) -> Result<Vec<(String, u64)>, StoreError> {
        let txn = self.db.begin_read().map_err(self.storage())?;
        let table = txn.open_table(FORGOTTEN).map_err(self.storage())?;
        let mut out = Vec::new();
        for row in table.iter().map_err(self.storage())? {
            let (k, v) = row.map_err(self.storage())?;
            out.push((k.value().to_string(), v.value()));
        }
        Ok(out)
    }

    /// Applies member changes in one fsynced transaction.
    pub fn save_members(
        &self,
        upserts: &[StoredMember],
        forgotten: &[(String, u64)],
    ) -> Result<(), StoreError> {
        let mut txn = self.db.begin_write().map_err(self.storage())?;
        txn.set_durability(Durability::Immediate)
            .map_err(self.storage())?;
        {
            let mut members = txn.open_table(MEMBERS).map_err(self.storage())?;
            let mut tomb = txn.open_table(FORGOTTEN).map_err(self.storage())?;
            // Forgets first: a member forgotten and then heard of again (a newer
            // life) within one batch must end up stored, not deleted.
            for (id, inc) in forgotten {
                let relearnt = upserts.iter().any(|m| m.id == *id && m.incarnation > *inc);
                if !relearnt {
                    members.remove(id.as_str()).map_err(self.storage())?;
                }
                tomb.insert(id.as_str(), *inc).map_err(self.storage())?;
            }
            for m in upserts {
                let mut buf = Vec::with_capacity(128);
                ciborium::into_writer(m, &mut buf).map_err(|e| StoreError::Corrupt {
                    path: self.path.clone(),
                    what: format!("member {}", m.id),
                    detail: e.to_string(),
                })?;
                members
                    .insert(m.id.as_str(), buf.as_slice())
                    .map_err(self.storage())?;
            }
        }
        txn.commit().map_err(self.storage())
    }
}

/// Checks an existing data directory without writing to it: a refused start (not a
/// kiln file, newer format, another secret) leaves the file byte for byte as it
/// was. A database that needs recovery after a crash cannot be opened read-only;
/// it passes here and is checked again after `NodeStore::open` recovered it.
pub fn verify_untouched(dir: &Path, secret: Option<&[u8]>) -> Result<(), StoreError> {
    let path = dir.join(NODE_DB_FILE);
    if !path.exists() {
        return Ok(());
    }
    let db = match db_builder().open_read_only(&path) {
        Ok(db) => db,
        Err(redb::DatabaseError::RepairAborted) => return Ok(()),
        Err(e) => return Err(map_open_error(e, &path)),
    };
    let storage = |e: redb::Error| StoreError::Storage {
        path: path.clone(),
        source: e,
    };
    let txn = db.begin_read().map_err(|e| storage(e.into()))?;
    check_format(&txn, &path)?;
    let meta = txn.open_table(META).map_err(|e| storage(e.into()))?;
    if let Some(stored) = meta
        .get(META_SECRET_VERIFIER)
        .map_err(|e| storage(e.into()))?
    {
        compare_secret(stored.value(), secret, dir, &path)?;
    }
    Ok(())
}

/// Memory each kiln database may use for redb's page cache, written pages
/// included. redb's default is 1 GiB per file, and a transaction committed
/// without fsync keeps its pages in that cache, not in the file: the stripe
/// state's flushes (fsynced every 10 s) gathered hundreds of megabytes there,
/// which its next fsync then wrote at once (136–432 ms, while every write of
/// the stripe waited behind it; integration/BENCHMARKS.md). With a bounded
/// cache redb hands older pages to the OS as it goes, and a state flush has
/// the OS write them out in steps (`write_back_in_steps` in stripe_store.rs).
/// The read cache is bounded too: pages beyond it are read from the OS's
/// page cache.
pub(crate) const DB_CACHE_BYTES: usize = 64 << 20;

/// How kiln opens its redb databases.
pub(crate) fn db_builder() -> redb::Builder {
    let mut b = redb::Builder::new();
    b.set_cache_size(DB_CACHE_BYTES);
    b
}

/// Opens the kiln database at `path`, or creates it. A new file gets the format
/// version in `meta` and the tables `create` opens, in one fsynced transaction;
/// an existing one must carry a format this binary knows.
pub(crate) fn open_or_create(
    path: &Path,
    meta: TableDefinition<&str, &[u8]>,
    create: impl FnOnce(&redb::WriteTransaction) -> Result<(), redb::TableError>,
) -> Result<Database, StoreError> {
    let storage = |e: redb::Error| StoreError::Storage {
        path: path.to_path_buf(),
        source: e,
    };
    if path.exists() {
        let db = db_builder()
            .open(path)
            .map_err(|e| map_open_error(e, path))?;
        let txn = db.begin_read().map_err(|e| storage(e.into()))?;
        check_format_in(&txn, meta, path)?;
        drop(txn);
        return Ok(db);
    }
    let (db, tmp) = create_unnamed(path)?;
    let mut txn = db.begin_write().map_err(|e| storage(e.into()))?;
    txn.set_durability(Durability::Immediate)
        .map_err(|e| storage(e.into()))?;
    {
        let mut m = txn.open_table(meta).map_err(|e| storage(e.into()))?;
        m.insert(META_FORMAT_VERSION, FORMAT_VERSION.to_le_bytes().as_slice())
            .map_err(|e| storage(e.into()))?;
    }
    create(&txn).map_err(|e| storage(e.into()))?;
    txn.commit().map_err(|e| storage(e.into()))?;
    name_created(&tmp, path)?;
    Ok(db)
}

/// A new database for `path`, created under a temporary name: it takes its real
/// name (`name_created`) only once its format and tables are committed, so a
/// crash in between leaves no file that a restart would refuse as not kiln's.
/// A temporary file left by such a crash is started over.
fn create_unnamed(path: &Path) -> Result<(Database, PathBuf), StoreError> {
    let tmp = where_created(path).with_extension("redb.creating");
    match std::fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        // Named by the file the operator knows; the temporary name is ours.
        Err(e) => {
            return Err(StoreError::Create {
                path: where_created(path),
                source: e,
            })
        }
    }
    let db = db_builder().create(&tmp).map_err(|e| match e {
        redb::DatabaseError::Storage(redb::StorageError::Io(source)) => StoreError::Create {
            path: where_created(path),
            source,
        },
        e => map_open_error(e, &tmp),
    })?;
    Ok((db, tmp))
}

/// Where a new database for `path` goes: the file a symbolic link at `path`
/// points to (an operator's way to keep one file on another disk), else `path`.
pub(crate) fn where_created(path: &Path) -> PathBuf {
    let mut at = path.to_path_buf();
    for _ in 0..8 {
        let is_link = std::fs::symlink_metadata(&at).is_ok_and(|m| m.file_type().is_symlink());
        let Some(target) = is_link.then(|| std::fs::read_link(&at).ok()).flatten() else {
            break;
        };
        at = match at.parent() {
            Some(dir) => dir.join(target),
            None => target,
        };
    }
    at
}

/// Gives a database made by `create_unnamed` its real name, durably (the
/// open handle stays valid across the rename).
fn name_created(tmp: &Path, path: &Path) -> Result<(), StoreError> {
    let io = |p: &Path, e: std::io::Error| StoreError::Storage {
        path: p.to_path_buf(),
        source: redb::StorageError::Io(e).into(),
    };
    let path = where_created(path);
    let path = path.as_path();
    std::fs::rename(tmp, path).map_err(|e| io(path, e))?;
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io(dir, e))
}

pub(crate) fn map_open_error(e: redb::DatabaseError, path: &Path) -> StoreError {
    let path = path.to_path_buf();
    match e {
        redb::DatabaseError::DatabaseAlreadyOpen => StoreError::InUse { path },
        redb::DatabaseError::UpgradeRequired(v) => StoreError::NotKiln {
            path,
            detail: format!("redb file format {v}"),
        },
        redb::DatabaseError::Storage(redb::StorageError::Io(io))
            if io.kind() == std::io::ErrorKind::InvalidData =>
        {
            StoreError::NotKiln {
                path,
                detail: io.to_string(),
            }
        }
        redb::DatabaseError::Storage(redb::StorageError::Io(io)) => StoreError::Storage {
            path,
            source: redb::StorageError::Io(io).into(),
        },
        other => StoreError::NotKiln {
            path,
            detail: other.to_string(),
        },
    }
}

pub(crate) fn check_format(txn: &redb::ReadTransaction, path: &Path) -> Result<(), StoreError> {
    check_format_in(txn, META, path)
}

/// Checks the format version recorded in `table` of a kiln database.
pub(crate) fn check_format_in(
    txn: &redb::ReadTransaction,
    table: redb::TableDefinition<&str, &[u8]>,
    path: &Path,
) -> Result<(), StoreError> {
    let not_kiln = |detail: &str| StoreError::NotKiln {
        path: path.to_path_buf(),
        detail: detail.to_string(),
    };
    let meta = match txn.open_table(table) {
        Ok(t) => t,
        Err(redb::TableError::TableDoesNotExist(_)) => {
            return Err(not_kiln("it has no kiln metadata table"))
        }
        Err(e) => return Err(not_kiln(&e.to_string())),
    };
    let raw = meta
        .get(META_FORMAT_VERSION)
        .map_err(|e| StoreError::Storage {
            path: path.to_path_buf(),
            source: e.into(),
        })?
        .ok_or_else(|| not_kiln("it has no format version"))?;
    let bytes: [u8; 4] = raw
        .value()
        .try_into()
        .map_err(|_| not_kiln("its format version is malformed"))?;
    let found = u32::from_le_bytes(bytes);
    if found > FORMAT_VERSION {
        return Err(StoreError::NewerFormat {
            path: path.to_path_buf(),
            found,
            known: FORMAT_VERSION,
        });
    }
    Ok(())
}

fn compare_secret(
    stored: &[u8],
    secret: Option<&[u8]>,
    dir: &Path,
    path: &Path,
) -> Result<(), StoreError> {
    let mismatch = |detail: &str| StoreError::SecretMismatch {
        dir: dir.to_path_buf(),
        detail: detail.to_string(),
    };
    match (stored, secret) {
        (OPEN_CLUSTER_MARK, None) => Ok(()),
        (OPEN_CLUSTER_MARK, Some(_)) => Err(mismatch(
            "was created for an open cluster (no secret), but a cluster secret was given",
        )),
        (_, None) => Err(mismatch(
            "was created with a cluster secret, but none was given",
        )),
        (rec, Some(s)) if rec.len() == 48 => {
            if verifier(&rec[..16], s).as_slice() == &rec[16..] {
                Ok(())
            } else {
                Err(mismatch(
                    "was created with a different cluster secret than the one given",
                ))
            }
        }
        _ => Err(StoreError::Corrupt {
            path: path.to_path_buf(),
            what: "secret verifier".into(),
            detail: format!("{} bytes, expected 48", stored.len()),
        }),
    }
}

fn verifier(salt: &[u8], secret: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(VERIFIER_DOMAIN);
    h.update(salt);
    h.update(secret);
    h.finalize().into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_creation_cut_short_is_started_over_not_refused() {
        let dir = tempfile::tempdir().unwrap();
        // What a kill -9 between creating the file and its first commit left.
        std::fs::write(dir.path().join("node.redb.creating"), b"half").unwrap();
        let store = NodeStore::open(dir.path()).unwrap();
        assert!(dir.path().join(NODE_DB_FILE).exists());
        assert!(!dir.path().join("node.redb.creating").exists());
        drop(store);
        NodeStore::open(dir.path()).unwrap();

        // A link to a file on another disk stays a link.
        let elsewhere = tempfile::tempdir().unwrap();
        let linked = dir.path().join("linked.redb");
        std::os::unix::fs::symlink(elsewhere.path().join("linked.redb"), &linked).unwrap();
        drop(open_or_create(&linked, META, |_| Ok(())).unwrap());
        assert!(std::fs::symlink_metadata(&linked)
            .unwrap()
            .file_type()
            .is_symlink());
        assert!(elsewhere.path().join("linked.redb").is_file());

        let path = dir.path().join("other.redb");
        std::fs::write(path.with_extension("redb.creating"), b"half").unwrap();
        let db = open_or_create(&path, META, |_| Ok(())).unwrap();
        drop(db);
        assert!(!path.with_extension("redb.creating").exists());
        open_or_create(&path, META, |_| Ok(())).unwrap();
    }

    #[test]
    fn a_file_that_cannot_be_created_is_named_as_the_operator_knows_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("blocked.redb");
        // Something the temporary file cannot replace.
        std::fs::create_dir_all(path.with_extension("redb.creating").join("x")).unwrap();
        match open_or_create(&path, META, |_| Ok(())) {
            Err(StoreError::Create { path: named, .. }) => assert_eq!(named, path),
            other => panic!("{:?}", other.map(|_| ())),
        }
    }

    fn member(id: &str, state: MemberState) -> StoredMember {
        StoredMember {
            id: id.into(),
            name: format!("n-{id}"),
            addrs: vec!["/ip4/127.0.0.1/tcp/1".into()],
            incarnation: 3,
            started_ms: 10,
            state,
            state_since_unix_ms: 20,
        }
    }

    #[test]
    fn identity_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let (a, created) = NodeStore::open(dir.path())
            .unwrap()
            .identity_or_create(|| vec![1, 2, 3])
            .unwrap();
        assert!(created);
        let store = NodeStore::open(dir.path()).unwrap();
        let (b, created) = store.identity_or_create(|| vec![9]).unwrap();
        assert!(!created);
        assert_eq!(a, b);
    }

    #[test]
    fn secret_is_verified_not_stored() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = NodeStore::open(dir.path()).unwrap();
            assert_eq!(
                s.bind_secret(Some(b"s3cret")).unwrap(),
                SecretCheck::Recorded
            );
        }
        let raw = std::fs::read(dir.path().join(NODE_DB_FILE)).unwrap();
        assert!(!raw.windows(6).any(|w| w == b"s3cret"));
        let s = NodeStore::open(dir.path()).unwrap();
        assert_eq!(
            s.bind_secret(Some(b"s3cret")).unwrap(),
            SecretCheck::Matches
        );
        assert!(matches!(
            s.bind_secret(Some(b"other")),
            Err(StoreError::SecretMismatch { .. })
        ));
        assert!(matches!(
            s.bind_secret(None),
            Err(StoreError::SecretMismatch { .. })
        ));
    }

    #[test]
    fn wrong_secret_is_refused_without_touching_the_file() {
        let dir = tempfile::tempdir().unwrap();
        NodeStore::open(dir.path())
            .unwrap()
            .bind_secret(Some(b"one"))
            .unwrap();
        let path = dir.path().join(NODE_DB_FILE);
        let before = std::fs::read(&path).unwrap();
        assert!(matches!(
            verify_untouched(dir.path(), Some(b"two")),
            Err(StoreError::SecretMismatch { .. })
        ));
        assert!(verify_untouched(dir.path(), Some(b"one")).is_ok());
        assert!(std::fs::read(&path).unwrap() == before, "file changed");
    }

    #[test]
    fn garbage_file_is_refused_and_left_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(NODE_DB_FILE);
        let garbage = b"this is not a database at all, just some text\n".repeat(200);
        std::fs::write(&path, &garbage).unwrap();
        let err = NodeStore::open(dir.path()).err().expect("must refuse");
        assert!(matches!(err, StoreError::NotKiln { .. }), "{err}");
        assert!(std::fs::read(&path).unwrap() == garbage, "file changed");
    }

    #[test]
    fn foreign_redb_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(NODE_DB_FILE);
        {
            let db = Database::create(&path).unwrap();
            let txn = db.begin_write().unwrap();
            let t: TableDefinition<&str, &str> = TableDefinition::new("other_app");
            txn.open_table(t).unwrap().insert("a", "b").unwrap();
            txn.commit().unwrap();
        }
        let err = NodeStore::open(dir.path()).err().expect("must refuse");
        assert!(matches!(err, StoreError::NotKiln { .. }), "{err}");
    }

    #[test]
    fn newer_format_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = NodeStore::open(dir.path()).unwrap();
            s.put_meta(META_FORMAT_VERSION, &(FORMAT_VERSION + 1).to_le_bytes())
                .unwrap();
        }
        let err = NodeStore::open(dir.path()).err().expect("must refuse");
        assert!(matches!(err, StoreError::NewerFormat { .. }), "{err}");
    }

    #[test]
    fn second_open_is_refused_while_in_use() {
        let dir = tempfile::tempdir().unwrap();
        let _first = NodeStore::open(dir.path()).unwrap();
        let err = NodeStore::open(dir.path()).err().expect("must refuse");
        assert!(matches!(err, StoreError::InUse { .. }), "{err}");
    }

    #[test]
    fn cluster_id_is_fixed_once_set() {
        let dir = tempfile::tempdir().unwrap();
        let s = NodeStore::open(dir.path()).unwrap();
        assert_eq!(s.cluster_id().unwrap(), None);
        s.set_cluster_id("abc").unwrap();
        s.set_cluster_id("abc").unwrap();
        assert!(matches!(
            s.set_cluster_id("xyz"),
            Err(StoreError::ClusterMismatch { .. })
        ));
    }

    #[test]
    fn incarnation_grows_across_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let a = NodeStore::open(dir.path())
            .unwrap()
            .next_incarnation()
            .unwrap();
        let b = NodeStore::open(dir.path())
            .unwrap()
            .next_incarnation()
            .unwrap();
        assert!(b > a);
    }

    #[test]
    fn incarnation_never_goes_down() {
        let dir = tempfile::tempdir().unwrap();
        let s = NodeStore::open(dir.path()).unwrap();
        s.store_incarnation(7).unwrap();
        s.store_incarnation(6).unwrap();
        drop(s);
        assert_eq!(
            NodeStore::open(dir.path())
                .unwrap()
                .next_incarnation()
                .unwrap(),
            8
        );
    }

    #[test]
    fn a_member_forgotten_and_relearnt_in_one_batch_stays() {
        let dir = tempfile::tempdir().unwrap();
        let s = NodeStore::open(dir.path()).unwrap();
        let mut newer = member("b", MemberState::Alive);
        newer.incarnation = 4;
        s.save_members(&[newer.clone()], &[("b".into(), 3)])
            .unwrap();
        assert_eq!(s.load_members().unwrap(), vec![newer]);
    }

    #[test]
    fn members_round_trip_and_forget() {
        let dir = tempfile::tempdir().unwrap();
        let s = NodeStore::open(dir.path()).unwrap();
        s.save_members(
            &[
                member("a", MemberState::Alive),
                member("b", MemberState::Dead),
            ],
            &[],
        )
        .unwrap();
        s.save_members(&[], &[("b".into(), 3)]).unwrap();
        drop(s);
        let s = NodeStore::open(dir.path()).unwrap();
        assert_eq!(
            s.load_members().unwrap(),
            vec![member("a", MemberState::Alive)]
        );
        assert_eq!(s.load_forgotten().unwrap(), vec![("b".to_string(), 3)]);
    }
}
