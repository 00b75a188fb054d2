//! `control.redb`: the control plane's Raft log, vote, committed id and snapshot.
//!
//! The entries and records are opaque bytes here (the actors crate encodes them);
//! this module only makes them durable. Every write is fsynced: the control plane
//! decides who is active, and a voter that forgot a vote or an entry after a crash
//! could elect two actives.

use std::path::{Path, PathBuf};

use redb::{Database, Durability, ReadableDatabase, ReadableTable};

use crate::node_store::open_or_create;
use crate::schema::*;
use crate::StoreError;

/// The control-plane database of one data directory.
pub struct ControlStore {
    db: Database,
    path: PathBuf,
}

impl ControlStore {
    /// Opens (or creates) `control.redb` in `dir`, which must exist. A node that
    /// already belongs to a cluster (`member_of`) must find its file: recreating
    /// it would forget the node's votes, which Raft's safety rests on.
    pub fn open(dir: &Path, member_of: Option<&str>) -> Result<Self, StoreError> {
        let path = dir.join(CONTROL_DB_FILE);
        let existed = path.exists();
        if let (false, Some(cluster)) = (existed, member_of) {
            return Err(StoreError::ControlMissing {
                path,
                cluster: cluster.to_string(),
            });
        }
        let db = open_or_create(&path, CONTROL_META, |txn| {
            txn.open_table(CONTROL_LOG)?;
            Ok(())
        })?;
        let store = ControlStore { db, path };
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

    fn write_txn(&self) -> Result<redb::WriteTransaction, StoreError> {
        let mut txn = self.db.begin_write().map_err(self.storage())?;
        txn.set_durability(Durability::Immediate)
            .map_err(self.storage())?;
        Ok(txn)
    }

    pub fn get_meta(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let txn = self.db.begin_read().map_err(self.storage())?;
        let meta = txn.open_table(CONTROL_META).map_err(self.storage())?;
        Ok(meta
            .get(key)
            .map_err(self.storage())?
            .map(|v| v.value().to_vec()))
    }

    /// Stores one record durably (fsync before it returns).
    pub fn put_meta(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        let txn = self.write_txn()?;
        {
            let mut meta = txn.open_table(CONTROL_META).map_err(self.storage())?;
            meta.insert(key, value).map_err(self.storage())?;
        }
        txn.commit().map_err(self.storage())
    }

    /// Appends log entries (index, bytes) in one durable transaction.
    pub fn append(&self, entries: &[(u64, Vec<u8>)]) -> Result<(), StoreError> {
        let txn = self.write_txn()?;
        {
            let mut log = txn.open_table(CONTROL_LOG).map_err(self.storage())?;
            for (index, bytes) in entries {
                log.insert(*index, bytes.as_slice())
                    .map_err(self.storage())?;
            }
        }
        txn.commit().map_err(self.storage())
    }

    /// Deletes every entry at `from` and after (a leader overwrote them).
    pub fn truncate_from(&self, from: u64) -> Result<(), StoreError> {
        let txn = self.write_txn()?;
        {
            let mut log = txn.open_table(CONTROL_LOG).map_err(self.storage())?;
            log.retain_in(from.., |_, _| false)
                .map_err(self.storage())?;
        }
        txn.commit().map_err(self.storage())
    }

    /// Deletes every entry up to and including `upto`, and records `last_purged`
    /// (the encoded id of that entry) in the same transaction.
    pub fn purge_upto(&self, upto: u64, last_purged: &[u8]) -> Result<(), StoreError> {
        let txn = self.write_txn()?;
        {
            let mut log = txn.open_table(CONTROL_LOG).map_err(self.storage())?;
            log.retain_in(..=upto, |_, _| false)
                .map_err(self.storage())?;
            let mut meta = txn.open_table(CONTROL_META).map_err(self.storage())?;
            meta.insert(CONTROL_LAST_PURGED, last_purged)
                .map_err(self.storage())?;
        }
        txn.commit().map_err(self.storage())
    }

    /// Entries with `start <= index < end`, in order.
    pub fn range(&self, start: u64, end: u64) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        if start >= end {
            return Ok(Vec::new());
        }
        let txn = self.db.begin_read().map_err(self.storage())?;
        let log = txn.open_table(CONTROL_LOG).map_err(self.storage())?;
        let mut out = Vec::new();
        for row in log.range(start..end).map_err(self.storage())? {
            let (k, v) = row.map_err(self.storage())?;
            out.push((k.value(), v.value().to_vec()));
        }
        Ok(out)
    }

    /// The entry with the highest index, if any.
    pub fn last(&self) -> Result<Option<(u64, Vec<u8>)>, StoreError> {
        let txn = self.db.begin_read().map_err(self.storage())?;
        let log = txn.open_table(CONTROL_LOG).map_err(self.storage())?;
        let last = log
            .last()
            .map_err(self.storage())?
            .map(|(k, v)| (k.value(), v.value().to_vec()));
        Ok(last)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_survives_reopen_and_truncates_and_purges() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = ControlStore::open(dir.path(), None).unwrap();
            let entries: Vec<_> = (1..=10).map(|i| (i, vec![i as u8])).collect();
            s.append(&entries).unwrap();
            s.put_meta(CONTROL_VOTE, b"v").unwrap();
        }
        let s = ControlStore::open(dir.path(), None).unwrap();
        assert_eq!(s.get_meta(CONTROL_VOTE).unwrap(), Some(b"v".to_vec()));
        assert_eq!(s.last().unwrap(), Some((10, vec![10])));
        s.truncate_from(8).unwrap();
        assert_eq!(s.last().unwrap(), Some((7, vec![7])));
        s.purge_upto(3, b"p").unwrap();
        let left: Vec<u64> = s.range(0, 100).unwrap().into_iter().map(|e| e.0).collect();
        assert_eq!(left, vec![4, 5, 6, 7]);
        assert_eq!(
            s.get_meta(CONTROL_LAST_PURGED).unwrap(),
            Some(b"p".to_vec())
        );
        assert!(s.range(5, 5).unwrap().is_empty());
    }

    #[test]
    fn refuses_a_foreign_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(CONTROL_DB_FILE), b"not a database at all").unwrap();
        assert!(matches!(
            ControlStore::open(dir.path(), None),
            Err(StoreError::NotKiln { .. })
        ));
    }

    #[test]
    fn a_member_without_its_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let e = ControlStore::open(dir.path(), Some("c1")).err().unwrap();
        assert!(e.to_string().contains("votes"), "{e}");
        assert!(!dir.path().join(CONTROL_DB_FILE).exists());
    }
}
