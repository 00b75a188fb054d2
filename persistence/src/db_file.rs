//! One redb file that is opened again after an I/O error.
//!
//! After an I/O error (a full disk, say) redb answers every transaction of that
//! handle with `PreviousIo`. The file is then opened again (redb repairs it to
//! its last durable commit), so its owner can go on once the disk has room,
//! without a restart of the process. What the owner must forget with the lost
//! commits is its own business: [`DbFile`] tells it through `on_reopen`.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use redb::{Database, Durability, ReadableDatabase};

use crate::StoreError;

pub(crate) struct DbFile {
    /// `None` after a failed commit until the file is open again.
    db: RwLock<Option<Arc<Database>>>,
    pub(crate) path: PathBuf,
    open: fn(&Path) -> Result<Database, StoreError>,
}

/// Called with the database just opened again, before anyone else can use it.
pub(crate) type OnReopen<'a> = &'a dyn Fn(&Database) -> Result<(), StoreError>;

impl DbFile {
    pub(crate) fn new(
        db: Database,
        path: PathBuf,
        open: fn(&Path) -> Result<Database, StoreError>,
    ) -> DbFile {
        DbFile {
            db: RwLock::new(Some(Arc::new(db))),
            path,
            open,
        }
    }

    pub(crate) fn storage<E: Into<redb::Error>>(&self) -> impl Fn(E) -> StoreError + '_ {
        storage_error(&self.path)
    }

    /// The open database, opened again if a failed commit closed it.
    fn db(&self, on_reopen: OnReopen) -> Result<Arc<Database>, StoreError> {
        let open = self.db.read().unwrap_or_else(|e| e.into_inner()).clone();
        match open {
            Some(db) => Ok(db),
            None => self.reopen(None, on_reopen),
        }
    }

    /// Opens the file again unless another caller did so since `failed` saw
    /// `PreviousIo`. Fails (`Reopening`) while transactions of the old handle
    /// are open: redb holds a lock on the file while any handle lives.
    fn reopen(
        &self,
        failed: Option<Arc<Database>>,
        on_reopen: OnReopen,
    ) -> Result<Arc<Database>, StoreError> {
        let mut slot = self.db.write().unwrap_or_else(|e| e.into_inner());
        match (slot.as_ref(), failed.as_ref()) {
            (Some(open), Some(failed)) if !Arc::ptr_eq(open, failed) => return Ok(open.clone()),
            (Some(open), None) => return Ok(open.clone()),
            _ => {}
        }
        drop(failed);
        *slot = None;
        let db = match (self.open)(&self.path) {
            Ok(db) => Arc::new(db),
            Err(StoreError::InUse { path }) => return Err(StoreError::Reopening { path }),
            Err(e) => return Err(e),
        };
        on_reopen(&db)?;
        *slot = Some(db.clone());
        tracing::info!(path = %self.path.display(), "database opened again after an I/O error");
        Ok(db)
    }

    pub(crate) fn begin_read(
        &self,
        on_reopen: OnReopen,
    ) -> Result<redb::ReadTransaction, StoreError> {
        let db = self.db(on_reopen)?;
        match db.begin_read() {
            Err(redb::TransactionError::Storage(redb::StorageError::PreviousIo)) => self
                .reopen(Some(db), on_reopen)?
                .begin_read()
                .map_err(self.storage()),
            r => r.map_err(self.storage()),
        }
    }

    /// A write transaction, fsynced at commit if `durable`.
    pub(crate) fn write_txn(
        &self,
        durable: bool,
        on_reopen: OnReopen,
    ) -> Result<redb::WriteTransaction, StoreError> {
        let db = self.db(on_reopen)?;
        let mut txn = match db.begin_write() {
            Err(redb::TransactionError::Storage(redb::StorageError::PreviousIo)) => self
                .reopen(Some(db), on_reopen)?
                .begin_write()
                .map_err(self.storage())?,
            r => r.map_err(self.storage())?,
        };
        txn.set_durability(if durable {
            Durability::Immediate
        } else {
            Durability::None
        })
        .map_err(self.storage())?;
        Ok(txn)
    }
}

/// A storage error of the database at `path`.
pub(crate) fn storage_error<E: Into<redb::Error>>(path: &Path) -> impl Fn(E) -> StoreError + '_ {
    move |e| StoreError::Storage {
        path: path.to_path_buf(),
        source: e.into(),
    }
}
