//! `stripe.redb` and `stripe-state.redb`: this node's share of the data — the
//! stripe's replication log, and the key/value state it materializes with
//! recent request results and the change outbox.
//!
//! Two files, so two redb writers: a log append (fsynced before a write is
//! acknowledged) never waits for a flush of applied state, and its fsync
//! writes back log pages only. The state file is fsynced now and then, and
//! always before the log drops entries it covers; after a crash the log
//! brings back whatever the state file lost.
//!
//! Log entries and request records are opaque bytes here; what a write means is
//! decided in the actors crate, which applies committed entries through
//! [`KvTxn`], in memory until a flush (see [`crate::unflushed`]).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use redb::{Database, Durability, ReadableDatabase, ReadableTable, ReadableTableMetadata};

use crate::db_file::{storage_error, DbFile};
use crate::node_store::{open_or_create, where_created};
use crate::schema::*;
use crate::unflushed::{write_pending, OverlayKv, Pending, Unflushed};
use crate::StoreError;

/// A flush is fsynced once this long after the last fsynced one (the others
/// are not: the log holds what they cover), and before compaction. Bounds what
/// a crash makes the node apply again, and lets redb reuse the pages flushes
/// freed. Such an fsync holds up the log's fsyncs while it writes: every
/// second, p99 at 16 clients was 10.9–11.1 ms; every 10 s, 9.6–9.7; at every
/// flush (15–20 a second per node under load), ~11 ms and 11 % fewer writes a
/// second (integration/BENCHMARKS.md). What it has left to write is kept
/// small instead: see [`write_back_in_steps`].
pub const STATE_FSYNC_EVERY: Duration = Duration::from_secs(10);

/// Rows copied between reports while a data directory from before the state
/// file moves its state there.
const MIGRATE_REPORT_EVERY: u64 = 100_000;

/// The stripe database of one data directory.
pub struct StripeStore {
    log: DbFile,
    state: DbFile,
    /// Fsync log appends before they are acknowledged (`persistence = "permanent"`).
    durable: bool,
    /// The last change seq applied writes produced (see [`CHANGES`]).
    changes_head: AtomicU64,
    /// Applied state not yet in the file (see [`crate::unflushed`]).
    unflushed: Mutex<Unflushed>,
    /// Held while pending state is written, so one flush runs at a time and
    /// nothing replaces the state under it.
    flush_lock: Mutex<()>,
    /// Entries `unflushed` covers (read without its lock).
    unflushed_entries: AtomicU64,
    /// Bytes of the log entries those are (see [`Self::unflushed_bytes`]).
    unflushed_bytes: AtomicU64,
    /// Flushes that wrote something.
    flushes: AtomicU64,
    /// A file was opened again since the last [`recover`](Self::recover).
    state_lost: AtomicBool,
    /// Which one (last), for messages.
    reopened: Mutex<Option<PathBuf>>,
    /// Change events up to this seq left the outbox (a flush skips them).
    changes_pruned: AtomicU64,
    /// When the state file was last fsynced.
    state_fsynced: Mutex<Instant>,
    /// The applied index the state file held at its last fsync since open
    /// or reopen (0: none yet): log entries up to it may go.
    state_durable: AtomicU64,
}

/// What the stripe database held at open.
#[derive(Debug, Clone, Default)]
pub struct StripeRecovered {
    pub stripe: Option<u32>,
    pub promised: u64,
    /// (epoch, index) of the last entry covered by applied state the log no longer holds.
    pub base: (u64, u64),
    /// Log entries after `base`, in order: (index, bytes).
    pub entries: Vec<(u64, Vec<u8>)>,
    pub applied: u64,
}

/// A consistent view of a stripe's applied state, for a snapshot sent to a
/// member that is too far behind for log entries. It holds read transactions:
/// writes go on meanwhile, and the view does not move.
pub struct SnapshotSource {
    state: redb::ReadTransaction,
    path: PathBuf,
    /// The log entry at `applied` (read after `state` was begun), unless
    /// compaction dropped it meanwhile: what names the snapshot's epoch.
    pub applied_entry: Option<Vec<u8>>,
    /// Index of the last entry the state covers.
    pub applied: u64,
    /// (epoch, index) of the compaction point.
    pub base: (u64, u64),
    /// Change events the covered writes produced.
    pub changes: u64,
}

/// A key/value row: map, key, version, value.
pub type KvRow = (String, String, u64, Vec<u8>);

impl SnapshotSource {
    fn storage<E: Into<redb::Error>>(&self) -> impl Fn(E) -> StoreError + '_ {
        move |e| StoreError::Storage {
            path: self.path.clone(),
            source: e.into(),
        }
    }

    /// Keys in the view.
    pub fn key_count(&self) -> Result<u64, StoreError> {
        let kv = self.state.open_table(KV).map_err(self.storage())?;
        kv.len().map_err(self.storage())
    }

    /// Key/value rows after `after` (all from the start if `None`), up to about
    /// `max_bytes` (at least one row if any is left).
    pub fn kv_batch(
        &self,
        after: Option<&(String, String)>,
        max_bytes: usize,
    ) -> Result<Vec<KvRow>, StoreError> {
        let kv = self.state.open_table(KV).map_err(self.storage())?;
        let mut out = Vec::new();
        let mut size = 0;
        let range = match after {
            Some((m, k)) => kv.range((m.as_str(), k.as_str())..),
            None => kv.range::<(&str, &str)>(..),
        }
        .map_err(self.storage())?;
        for row in range {
            let (k, v) = row.map_err(self.storage())?;
            let (map, key) = k.value();
            if after.is_some_and(|(m, a)| m == map && a == key) {
                continue;
            }
            let (version, value) = v.value();
            size += map.len() + key.len() + value.len() + 16;
            if !out.is_empty() && size > max_bytes {
                break;
            }
            out.push((map.to_string(), key.to_string(), version, value.to_vec()));
        }
        Ok(out)
    }

    /// Request records after `after`, up to about `max_bytes`.
    pub fn requests_batch(
        &self,
        after: Option<&str>,
        max_bytes: usize,
    ) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let table = self.state.open_table(REQUESTS).map_err(self.storage())?;
        let mut out = Vec::new();
        let mut size = 0;
        let range = match after {
            Some(a) => table.range(a..),
            None => table.range::<&str>(..),
        }
        .map_err(self.storage())?;
        for row in range {
            let (k, v) = row.map_err(self.storage())?;
            if after == Some(k.value()) {
                continue;
            }
            size += k.value().len() + v.value().len();
            if !out.is_empty() && size > max_bytes {
                break;
            }
            out.push((k.value().to_string(), v.value().to_vec()));
        }
        Ok(out)
    }
}

/// (epoch, index) from its stored form (see [`base_bytes`]).
fn base_of(b: &[u8]) -> (u64, u64) {
    (
        u64_of(&b[..b.len().min(8)]),
        u64_of(b.get(8..).unwrap_or(&[])),
    )
}

fn base_bytes(base: (u64, u64)) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(&base.0.to_le_bytes());
    b[8..].copy_from_slice(&base.1.to_le_bytes());
    b
}

/// The key/value state as one batch of committed entries sees it.
pub trait KvTxn {
    /// The key's current version, if it exists (its value is not read).
    fn version(&self, map: &str, key: &str) -> Result<Option<u64>, StoreError>;
    fn put(&mut self, map: &str, key: &str, version: u64, value: &[u8]) -> Result<(), StoreError>;
    fn delete(&mut self, map: &str, key: &str) -> Result<(), StoreError>;
    fn request(&self, id: &str) -> Result<Option<Vec<u8>>, StoreError>;
    /// Records a request's result until `remember_until_ms`; `replaces` is the
    /// expiry of the (expired) record of the same id it overwrites.
    fn record_request(
        &mut self,
        id: &str,
        record: &[u8],
        remember_until_ms: u64,
        replaces: Option<u64>,
    ) -> Result<(), StoreError>;
    /// Drops up to `limit` request records remembered until before `before_ms`;
    /// returns how many went.
    fn prune_requests(&mut self, before_ms: u64, limit: usize) -> Result<u64, StoreError>;
    /// Writes (`None`: drops) a row of the request table that has no expiry of
    /// its own (a retry session's rows, which go with their session).
    fn set_request_row(&mut self, id: &str, row: Option<&[u8]>) -> Result<(), StoreError>;
    /// Rows of the request table with ids in `from..below`, in id order.
    fn request_rows(&self, from: &str, below: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError>;
    /// Appends a change event to the stripe's outbox; returns its change seq
    /// (gap-free from 1, the same on every member since apply is deterministic).
    fn record_change(&mut self, change: &[u8]) -> Result<u64, StoreError>;
    /// The next change seq is above `seq` (change seqs already used elsewhere).
    fn raise_changes_to(&mut self, seq: u64) -> Result<(), StoreError>;
}

fn u64_of(bytes: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    let n = bytes.len().min(8);
    a[..n].copy_from_slice(&bytes[..n]);
    u64::from_le_bytes(a)
}

impl StripeStore {
    /// Opens (or creates) `stripe.redb` and `stripe-state.redb` in `dir`. With
    /// `durable = false` (temporary persistence) existing stripe data is
    /// discarded first. A data directory from before the state file has its
    /// state moved there (once; see [`migrate_state`]).
    pub fn open(dir: &Path, durable: bool) -> Result<Self, StoreError> {
        let log_path = dir.join(STRIPE_DB_FILE);
        let state_path = dir.join(STRIPE_STATE_DB_FILE);
        if !durable {
            for path in [&log_path, &state_path, &migrating_path(&state_path)] {
                // The file, not a link to it (kept on another disk).
                let path = where_created(path);
                if path.exists() {
                    std::fs::remove_file(&path).map_err(|e| StoreError::Storage {
                        path: path.clone(),
                        source: redb::StorageError::Io(e).into(),
                    })?;
                }
            }
        }
        let mut log_db = open_log_db(&log_path)?;
        migrate_state(&mut log_db, &log_path, &state_path)?;
        let state_db = open_state_db(&state_path)?;
        let changes_head = read_changes_head(&state_db, &state_path)?;
        Ok(StripeStore {
            log: DbFile::new(log_db, log_path, open_log_db),
            state: DbFile::new(state_db, state_path, open_state_db),
            durable,
            changes_head: AtomicU64::new(changes_head),
            unflushed: Mutex::new(Unflushed::default()),
            flush_lock: Mutex::new(()),
            unflushed_entries: AtomicU64::new(0),
            unflushed_bytes: AtomicU64::new(0),
            flushes: AtomicU64::new(0),
            state_lost: AtomicBool::new(false),
            reopened: Mutex::new(None),
            changes_pruned: AtomicU64::new(0),
            state_fsynced: Mutex::new(Instant::now()),
            state_durable: AtomicU64::new(0),
        })
    }

    /// Whether log appends are fsynced (`persistence = "permanent"`); with
    /// temporary persistence the stripe data started empty.
    pub fn durable(&self) -> bool {
        self.durable
    }

    /// `file` was opened again after an I/O error (see [`DbFile`]): whatever
    /// was applied over the old handle is void until [`recover`](Self::recover).
    fn reopened(&self, file: &DbFile, db: &Database) -> Result<(), StoreError> {
        if std::ptr::eq(file, &self.state) {
            self.changes_head
                .store(read_changes_head(db, &file.path)?, Ordering::Release);
        }
        *lock(&self.reopened) = Some(file.path.clone());
        self.state_lost.store(true, Ordering::Release);
        self.state_durable.store(0, Ordering::Release);
        Ok(())
    }

    fn begin_read(&self, file: &DbFile) -> Result<redb::ReadTransaction, StoreError> {
        file.begin_read(&|db| self.reopened(file, db))
    }

    fn write_txn(
        &self,
        file: &DbFile,
        durable: bool,
    ) -> Result<redb::WriteTransaction, StoreError> {
        file.write_txn(durable, &|db| self.reopened(file, db))
    }

    /// The log file's path (the stripe's data, in messages).
    pub fn path(&self) -> &Path {
        &self.log.path
    }

    /// Everything needed to restart replication where it stopped. Applied state
    /// not yet flushed is dropped: the replica applies those entries again from
    /// the log, which keeps every entry after the state file's applied index.
    pub fn recover(&self) -> Result<StripeRecovered, StoreError> {
        let _flush = lock(&self.flush_lock);
        self.finish_install()?;
        let state = self.begin_read(&self.state)?;
        let log = self.begin_read(&self.log)?;
        {
            // Together: nothing applied over the old file survives the flag.
            let mut u = self.lock_unflushed();
            *u = Unflushed::default();
            self.note_unflushed(&u);
            self.state_lost.store(false, Ordering::Release);
        }
        let get = |txn: &redb::ReadTransaction,
                   file: &DbFile,
                   table: redb::TableDefinition<&str, &[u8]>,
                   k: &str|
         -> Result<Option<Vec<u8>>, StoreError> {
            let meta = txn.open_table(table).map_err(file.storage())?;
            let v = meta.get(k).map_err(file.storage())?;
            Ok(v.map(|v| v.value().to_vec()))
        };
        let base = get(&log, &self.log, STRIPE_META, STRIPE_BASE)?
            .map(|b| base_of(&b))
            .unwrap_or((0, 0));
        let applied = get(&state, &self.state, STRIPE_STATE_META, STRIPE_APPLIED)?
            .map(|b| u64_of(&b))
            .unwrap_or(0);
        if applied < base.1 {
            // The log no longer holds the entries in between: the state file
            // lost fsynced commits, or is not this log's.
            return Err(StoreError::Corrupt {
                path: self.state.path.clone(),
                what: "the stripe's applied state".into(),
                detail: format!(
                    "it covers log entries up to {applied}, but the log ({}) starts after {}",
                    self.log.path.display(),
                    base.1
                ),
            });
        }
        let table = log.open_table(STRIPE_LOG).map_err(self.log.storage())?;
        let mut entries = Vec::new();
        let mut gap_at = None;
        for row in table.range(base.1 + 1..).map_err(self.log.storage())? {
            let (k, v) = row.map_err(self.log.storage())?;
            let expected = base.1 + 1 + entries.len() as u64;
            if k.value() != expected {
                gap_at = Some(expected);
                break;
            }
            entries.push((k.value(), v.value().to_vec()));
        }
        drop(table);
        if let Some(at) = gap_at {
            // Entries written after a reopen went back to an older commit
            // (temporary persistence after an I/O error): what follows the hole
            // would be served at the wrong indexes. Inside what the state covers
            // the stripe stays down here; past it the tail is dropped (the
            // active sends it again).
            if at <= applied {
                return Err(StoreError::Corrupt {
                    path: self.log.path.clone(),
                    what: "the stripe log".into(),
                    detail: format!(
                        "entry {at} is missing, within what the applied state covers ({applied}); restart the node"
                    ),
                });
            }
            self.persist(Some(at), &[], None)?;
        }
        let stripe = get(&log, &self.log, STRIPE_META, STRIPE_ID)?.map(|b| u64_of(&b) as u32);
        let promised = get(&log, &self.log, STRIPE_META, STRIPE_PROMISED)?
            .map(|b| u64_of(&b))
            .unwrap_or(0);
        let last = entries.last().map_or(base.1, |e| e.0);
        if applied > last {
            // Temporary persistence fsyncs neither file's data, so after an I/O
            // error each may go back to a different point. Starting from a log
            // behind its state could apply new writes over old indexes; the
            // stripe stays down on this node instead (a restart of the process
            // starts it empty).
            return Err(StoreError::Corrupt {
                path: self.state.path.clone(),
                what: "the stripe's applied state".into(),
                detail: format!(
                    "it covers log entries up to {applied}, but the log ({}) ends at {last}; restart the node",
                    self.log.path.display()
                ),
            });
        }
        // Until the entries after the file's state are applied again.
        let changes = get(&state, &self.state, STRIPE_STATE_META, STRIPE_CHANGES)?
            .map(|b| u64_of(&b))
            .unwrap_or(0);
        self.changes_head.store(changes, Ordering::Release);
        Ok(StripeRecovered {
            stripe,
            promised,
            base,
            entries,
            applied,
        })
    }

    /// Records which stripe this data belongs to (a node placed elsewhere must
    /// not serve it).
    pub fn set_stripe(&self, stripe: u32) -> Result<(), StoreError> {
        let txn = self.write_txn(&self.log, true)?;
        {
            let mut meta = txn.open_table(STRIPE_META).map_err(self.log.storage())?;
            meta.insert(STRIPE_ID, u64::from(stripe).to_le_bytes().as_slice())
                .map_err(self.log.storage())?;
        }
        txn.commit().map_err(self.log.storage())
    }

    /// Whether both files take fsynced writes again (after a failed one): a
    /// small write to each, fsynced. Records `stripe` as [`set_stripe`](Self::set_stripe) does.
    pub fn probe(&self, stripe: u32) -> Result<(), StoreError> {
        self.set_stripe(stripe)?;
        let txn = self.write_txn(&self.state, true)?;
        {
            // The same value again: a page written, nothing changed.
            let mut meta = txn
                .open_table(STRIPE_STATE_META)
                .map_err(self.state.storage())?;
            let changes = meta
                .get(STRIPE_CHANGES)
                .map_err(self.state.storage())?
                .map(|v| u64_of(v.value()))
                .unwrap_or(0);
            meta.insert(STRIPE_CHANGES, changes.to_le_bytes().as_slice())
                .map_err(self.state.storage())?;
        }
        txn.commit().map_err(self.state.storage())
    }

    /// Log changes in one transaction, fsynced in permanent mode: drop entries
    /// from `truncate_from`, append `entries`, record `promised`.
    pub fn persist(
        &self,
        truncate_from: Option<u64>,
        entries: &[(u64, Vec<u8>)],
        promised: Option<u64>,
    ) -> Result<(), StoreError> {
        // A promise is a vote: always durable, whatever the persistence mode.
        let durable = self.durable || promised.is_some();
        let txn = self.write_txn(&self.log, durable)?;
        {
            let mut log = txn.open_table(STRIPE_LOG).map_err(self.log.storage())?;
            if let Some(from) = truncate_from {
                log.retain_in(from.., |_, _| false)
                    .map_err(self.log.storage())?;
            }
            for (index, bytes) in entries {
                log.insert(*index, bytes.as_slice())
                    .map_err(self.log.storage())?;
            }
            if let Some(p) = promised {
                let mut meta = txn.open_table(STRIPE_META).map_err(self.log.storage())?;
                meta.insert(STRIPE_PROMISED, p.to_le_bytes().as_slice())
                    .map_err(self.log.storage())?;
            }
        }
        txn.commit().map_err(self.log.storage())
    }

    /// [`apply`](Self::apply) of the log entries `from..=upto`, read back from
    /// the log (`data_of` turns a log entry into what `f` applies).
    pub fn apply_logged<R>(
        &self,
        (from, upto): (u64, u64),
        data_of: impl Fn(&[u8]) -> Vec<u8>,
        f: impl FnMut(&mut dyn KvTxn, u64, &[u8]) -> Result<R, StoreError>,
    ) -> Result<Vec<(u64, R)>, StoreError> {
        if from > upto {
            return Ok(Vec::new());
        }
        let rows: Vec<(u64, Vec<u8>)> = self
            .entries(from, upto)?
            .into_iter()
            .map(|(i, b)| (i, data_of(&b)))
            .collect();
        if rows.len() as u64 != (upto + 1).saturating_sub(from) {
            // Never skip an entry: the state would silently miss it.
            return Err(StoreError::Corrupt {
                path: self.log.path.clone(),
                what: format!("log entries {from}..={upto}"),
                detail: format!("only {} of them are in the log", rows.len()),
            });
        }
        self.apply(&rows, f)
    }

    /// Log entries with `from <= index <= to`.
    pub fn entries(&self, from: u64, to: u64) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        let txn = self.begin_read(&self.log)?;
        let log = txn.open_table(STRIPE_LOG).map_err(self.log.storage())?;
        let mut out = Vec::new();
        for row in log.range(from..=to).map_err(self.log.storage())? {
            let (k, v) = row.map_err(self.log.storage())?;
            out.push((k.value(), v.value().to_vec()));
        }
        Ok(out)
    }

    /// Applies committed entries `(index, bytes)` with `f`, in memory: readers
    /// see the result at once, [`flush`](Self::flush) writes it to the file
    /// (a crash undoes nothing the log does not hold). Entries applied before
    /// are passed over (a batch that was under way when the replica restarted
    /// from the file); one after a gap is refused. Returns each applied entry's
    /// index and outcome.
    pub fn apply<R>(
        &self,
        entries: &[(u64, Vec<u8>)],
        mut f: impl FnMut(&mut dyn KvTxn, u64, &[u8]) -> Result<R, StoreError>,
    ) -> Result<Vec<(u64, R)>, StoreError> {
        let mut out = Vec::with_capacity(entries.len());
        if entries.is_empty() {
            return Ok(out);
        }
        let mut unflushed = self.lock_unflushed();
        // Opened while pending state cannot be flushed: together they are the
        // current state.
        let txn = self.begin_read(&self.state)?;
        self.check_state_kept()?;
        let meta = txn
            .open_table(STRIPE_STATE_META)
            .map_err(self.state.storage())?;
        let meta_u64 = |k: &str| -> Result<Option<u64>, StoreError> {
            Ok(meta
                .get(k)
                .map_err(self.state.storage())?
                .map(|v| u64_of(v.value())))
        };
        let applied = match unflushed.applied() {
            Some(a) => a,
            None => meta_u64(STRIPE_APPLIED)?.unwrap_or(0),
        };
        let last_change = match unflushed.last_change() {
            Some(c) => c,
            None => meta_u64(STRIPE_CHANGES)?.unwrap_or(0),
        };
        let todo: Vec<&(u64, Vec<u8>)> = entries.iter().filter(|(i, _)| *i > applied).collect();
        let Some(first) = todo.first().map(|e| e.0) else {
            return Ok(out);
        };
        if first != applied + 1 || todo.windows(2).any(|w| w[1].0 != w[0].0 + 1) {
            return Err(StoreError::Corrupt {
                path: self.state.path.clone(),
                what: format!("applying log entries from {first}"),
                detail: format!("the state covers entries up to {applied} only"),
            });
        }
        let mut tx = OverlayKv {
            batch: Pending::default(),
            unflushed: &unflushed,
            kv: txn.open_table(KV).map_err(self.state.storage())?,
            requests: txn.open_table(REQUESTS).map_err(self.state.storage())?,
            expiry: txn
                .open_table(REQUEST_EXPIRY)
                .map_err(self.state.storage())?,
            last_change,
            path: &self.state.path,
        };
        // An entry that fails drops the whole batch: nothing half applied stays.
        for (index, bytes) in &todo {
            out.push((*index, f(&mut tx, *index, bytes)?));
        }
        let mut batch = tx.batch;
        batch.last_change = Some(tx.last_change);
        batch.base = applied;
        batch.applied = todo.last().map_or(applied, |e| e.0);
        batch.entries = todo.len() as u64;
        batch.bytes = todo.iter().map(|e| e.1.len() as u64).sum();
        let last_change = tx.last_change;
        unflushed.newest.absorb(batch);
        self.note_unflushed(&unflushed);
        self.changes_head.store(last_change, Ordering::Release);
        Ok(out)
    }

    /// Entries applied and not yet written to the file.
    pub fn unflushed_entries(&self) -> u64 {
        self.unflushed_entries.load(Ordering::Acquire)
    }

    /// The size of the log entries applied and not yet written to the file:
    /// a bound on the memory their changes hold (a value written many times
    /// between flushes is counted each time), which entries alone do not give
    /// for large values.
    pub fn unflushed_bytes(&self) -> u64 {
        self.unflushed_bytes.load(Ordering::Acquire)
    }

    fn note_unflushed(&self, u: &Unflushed) {
        self.unflushed_entries.store(u.entries(), Ordering::Release);
        self.unflushed_bytes.store(u.bytes(), Ordering::Release);
    }

    /// Writes the applied state gathered in memory to the state file, in one
    /// transaction (fsynced only now and then: the log holds what it covers).
    /// Returns how many entries it covered. After a failure the state stays
    /// pending, but earlier flushes may be undone with the file (redb drops
    /// commits that were not fsynced when it reopens the file after an I/O
    /// error): start again from the files ([`recover`](Self::recover)).
    pub fn flush(&self) -> Result<u64, StoreError> {
        {
            let u = self.lock_unflushed();
            if u.newest.is_empty() && u.flushing.is_none() {
                return Ok(0);
            }
        }
        self.flush_state(false).map(|(entries, _)| entries)
    }

    /// [`flush`](Self::flush), fsynced even with nothing pending, so that
    /// [`compact_log`](Self::compact_log) may drop what it covers.
    pub fn flush_durable(&self) -> Result<u64, StoreError> {
        self.flush_state(true).map(|(entries, _)| entries)
    }

    /// The applied index the state file held at its last fsync (see
    /// [`flush_durable`](Self::flush_durable)).
    pub fn state_durable(&self) -> u64 {
        self.state_durable.load(Ordering::Acquire)
    }

    /// A file was opened again after an I/O error since the last
    /// [`recover`](Self::recover): the stripe must start again from the files.
    pub fn state_lost(&self) -> bool {
        self.state_lost.load(Ordering::Acquire)
    }

    /// Flushes so far that wrote something.
    pub fn flushes(&self) -> u64 {
        self.flushes.load(Ordering::Acquire)
    }

    /// [`flush`](Self::flush), fsynced if `fsync` (in either mode: a log that
    /// drops entries relies on it), even with nothing pending: then every
    /// earlier flush is durable too. Returns the entries it covered and the
    /// state file's applied index.
    fn flush_state(&self, fsync: bool) -> Result<(u64, u64), StoreError> {
        let flush_guard = lock(&self.flush_lock);
        let batch = {
            let mut u = self.lock_unflushed();
            let newest = std::mem::take(&mut u.newest);
            let batch = match u.flushing.take() {
                Some(failed) => {
                    let mut merged = Arc::try_unwrap(failed).unwrap_or_else(|a| (*a).clone());
                    merged.absorb(newest);
                    merged
                }
                None => newest,
            };
            let batch = Arc::new(batch);
            if !batch.is_empty() {
                u.flushing = Some(batch.clone());
            }
            batch
        };
        let fsync =
            fsync || (self.durable && lock(&self.state_fsynced).elapsed() >= STATE_FSYNC_EVERY);
        let started = Instant::now();
        let txn = self.write_txn(&self.state, fsync)?;
        // Also with nothing pending: a caller (compaction) relies on the file's
        // state being the one this node applied.
        self.check_state_kept()?;
        let filed = {
            let meta = txn
                .open_table(STRIPE_STATE_META)
                .map_err(self.state.storage())?;
            let v = meta.get(STRIPE_APPLIED).map_err(self.state.storage())?;
            v.map(|v| u64_of(v.value())).unwrap_or(0)
        };
        let applied = if batch.is_empty() {
            filed
        } else {
            if filed != batch.base {
                return Err(StoreError::Corrupt {
                    path: self.state.path.clone(),
                    what: "applied state kept in memory".into(),
                    detail: format!(
                        "it follows entry {}, the file's state entry {filed}",
                        batch.base
                    ),
                });
            }
            let pruned = self.changes_pruned.load(Ordering::Acquire);
            write_pending(&txn, &batch, pruned, &self.state.path)?;
            batch.applied
        };
        txn.commit().map_err(self.state.storage())?;
        if fsync {
            *lock(&self.state_fsynced) = started;
            self.state_durable.fetch_max(applied, Ordering::AcqRel);
        }
        {
            let mut u = self.lock_unflushed();
            u.flushing = None;
            self.note_unflushed(&u);
        }
        if !batch.is_empty() {
            self.flushes.fetch_add(1, Ordering::AcqRel);
        }
        // Outside the flush lock: snapshots and recovery need not wait for
        // the disk. (The flush job, and so the next flush, still does.)
        drop(flush_guard);
        if !fsync && !batch.is_empty() {
            write_back_in_steps(&self.state.path);
        }
        Ok((batch.entries, applied))
    }

    fn lock_unflushed(&self) -> MutexGuard<'_, Unflushed> {
        lock(&self.unflushed)
    }

    /// Fails once a file was opened again after an I/O error, until
    /// [`recover`](Self::recover): the reopened file lost the flushes that were
    /// not fsynced, so pending state no longer fits it.
    pub fn check_state_kept(&self) -> Result<(), StoreError> {
        if self.state_lost.load(Ordering::Acquire) {
            let path = lock(&self.reopened).clone();
            return Err(StoreError::StateReopened {
                path: path.unwrap_or_else(|| self.log.path.clone()),
            });
        }
        Ok(())
    }

    /// A consistent view of the applied state, to send as a snapshot.
    pub fn snapshot_source(&self) -> Result<SnapshotSource, StoreError> {
        self.flush()?;
        let state = self.begin_read(&self.state)?;
        let log = self.begin_read(&self.log)?;
        let (applied, changes) = {
            let meta = state
                .open_table(STRIPE_STATE_META)
                .map_err(self.state.storage())?;
            let get = |k: &str| -> Result<u64, StoreError> {
                let v = meta.get(k).map_err(self.state.storage())?;
                Ok(v.map(|v| u64_of(v.value())).unwrap_or(0))
            };
            (get(STRIPE_APPLIED)?, get(STRIPE_CHANGES)?)
        };
        // Read now, not held: a read transaction open for the whole stream
        // would keep `stripe.redb` from being opened again after an I/O error.
        let (base, applied_entry) = {
            let meta = log.open_table(STRIPE_META).map_err(self.log.storage())?;
            let v = meta.get(STRIPE_BASE).map_err(self.log.storage())?;
            let base = v.map(|v| base_of(v.value())).unwrap_or((0, 0));
            let table = log.open_table(STRIPE_LOG).map_err(self.log.storage())?;
            let entry = table.get(applied).map_err(self.log.storage())?;
            (base, entry.map(|v| v.value().to_vec()))
        };
        drop(log);
        Ok(SnapshotSource {
            state,
            applied_entry,
            path: self.state.path.clone(),
            applied,
            base,
            changes,
        })
    }

    /// Stores part of a snapshot being received (`reset`: its first part, so
    /// whatever an earlier, interrupted one left goes). Fsynced only if
    /// `durable`: the snapshot counts once installed, and the install fsyncs.
    pub fn stage_snapshot(
        &self,
        reset: bool,
        kv: &[KvRow],
        requests: &[(String, Vec<u8>)],
        durable: bool,
    ) -> Result<(), StoreError> {
        let txn = self.write_txn(&self.state, durable)?;
        // A reopen of the file went back to its last fsynced commit: staged
        // parts since are gone, and the transfer starts over.
        self.check_state_kept()?;
        {
            if reset {
                txn.delete_table(KV_STAGING).map_err(self.state.storage())?;
                txn.delete_table(REQUESTS_STAGING)
                    .map_err(self.state.storage())?;
            }
            let mut staging = txn.open_table(KV_STAGING).map_err(self.state.storage())?;
            for (map, key, version, value) in kv {
                staging
                    .insert((map.as_str(), key.as_str()), (*version, value.as_slice()))
                    .map_err(self.state.storage())?;
            }
            let mut reqs = txn
                .open_table(REQUESTS_STAGING)
                .map_err(self.state.storage())?;
            for (id, record) in requests {
                reqs.insert(id.as_str(), record.as_slice())
                    .map_err(self.state.storage())?;
            }
        }
        txn.commit().map_err(self.state.storage())
    }

    /// Makes the staged snapshot the stripe's state, covering the log up to `at`
    /// (epoch, index): the staged tables replace the live ones, the log keeps
    /// only the entries after `at` (or none, unless `keep_log`), and the change
    /// outbox starts after `changes`. `expiry_of` reads a request record's
    /// expiry, to index the records received.
    ///
    /// The state file's fsynced commit decides: it also records the install,
    /// so that a crash before the log's part is done finishes it at the next
    /// [`recover`](Self::recover).
    pub fn install_snapshot(
        &self,
        at: (u64, u64),
        keep_log: bool,
        changes: u64,
        expiry_of: &dyn Fn(&[u8]) -> Option<u64>,
    ) -> Result<(), StoreError> {
        // The snapshot replaces applied state, pending included. (Meanwhile
        // readers see the older state of the file: a member installing a
        // snapshot answers no linearizable read.)
        let _flush = lock(&self.flush_lock);
        let mut u = self.lock_unflushed();
        *u = Unflushed::default();
        self.note_unflushed(&u);
        drop(u);
        let txn = self.write_txn(&self.state, true)?;
        // Staged over a file a reopen took back: parts are missing.
        self.check_state_kept()?;
        {
            // Make sure both staging tables exist (an empty snapshot stages nothing).
            txn.open_table(KV_STAGING).map_err(self.state.storage())?;
            txn.open_table(REQUESTS_STAGING)
                .map_err(self.state.storage())?;
            txn.delete_table(KV).map_err(self.state.storage())?;
            txn.delete_table(REQUESTS).map_err(self.state.storage())?;
            txn.rename_table(KV_STAGING, KV)
                .map_err(self.state.storage())?;
            txn.rename_table(REQUESTS_STAGING, REQUESTS)
                .map_err(self.state.storage())?;
            txn.delete_table(REQUEST_EXPIRY)
                .map_err(self.state.storage())?;
            {
                let requests = txn.open_table(REQUESTS).map_err(self.state.storage())?;
                let mut expiry = txn
                    .open_table(REQUEST_EXPIRY)
                    .map_err(self.state.storage())?;
                for row in requests.iter().map_err(self.state.storage())? {
                    let (id, record) = row.map_err(self.state.storage())?;
                    if let Some(until) = expiry_of(record.value()) {
                        expiry
                            .insert((until, id.value()), ())
                            .map_err(self.state.storage())?;
                    }
                }
            }
            let mut outbox = txn.open_table(CHANGES).map_err(self.state.storage())?;
            outbox.retain(|_, _| false).map_err(self.state.storage())?;
            let mut meta = txn
                .open_table(STRIPE_STATE_META)
                .map_err(self.state.storage())?;
            meta.insert(STRIPE_APPLIED, at.1.to_le_bytes().as_slice())
                .map_err(self.state.storage())?;
            meta.insert(STRIPE_CHANGES, changes.to_le_bytes().as_slice())
                .map_err(self.state.storage())?;
            meta.insert(STRIPE_INSTALLING, installing_bytes(at, keep_log).as_slice())
                .map_err(self.state.storage())?;
        }
        txn.commit().map_err(self.state.storage())?;
        *lock(&self.state_fsynced) = Instant::now();
        self.state_durable.store(at.1, Ordering::Release);
        self.finish_install()?;
        // The files' state is all new, and fsynced: it no longer depends on
        // commits a reopen undid.
        self.state_lost.store(false, Ordering::Release);
        self.changes_head.store(changes, Ordering::Release);
        Ok(())
    }

    /// The log's part of an installed snapshot, if the state file records one
    /// the log has not caught up with: drop the entries the snapshot covers
    /// (all of them, unless it kept the log's tail) and start the log after it.
    fn finish_install(&self) -> Result<(), StoreError> {
        let installing = {
            let txn = self.begin_read(&self.state)?;
            let meta = txn
                .open_table(STRIPE_STATE_META)
                .map_err(self.state.storage())?;
            let v = meta.get(STRIPE_INSTALLING).map_err(self.state.storage())?;
            v.and_then(|v| installing_of(v.value()))
        };
        let Some((at, keep_log)) = installing else {
            return Ok(());
        };
        let txn = self.write_txn(&self.log, true)?;
        {
            let mut meta = txn.open_table(STRIPE_META).map_err(self.log.storage())?;
            let base = meta
                .get(STRIPE_BASE)
                .map_err(self.log.storage())?
                .map(|v| base_of(v.value()))
                .unwrap_or((0, 0));
            // Done already if the log starts at or after it (and may have new
            // entries since, which must stay).
            if base.1 < at.1 {
                let mut log = txn.open_table(STRIPE_LOG).map_err(self.log.storage())?;
                if keep_log {
                    log.retain_in(..=at.1, |_, _| false)
                        .map_err(self.log.storage())?;
                } else {
                    log.retain(|_, _| false).map_err(self.log.storage())?;
                }
                meta.insert(STRIPE_BASE, base_bytes(at).as_slice())
                    .map_err(self.log.storage())?;
            }
        }
        txn.commit().map_err(self.log.storage())?;
        let txn = self.write_txn(&self.state, false)?;
        {
            let mut meta = txn
                .open_table(STRIPE_STATE_META)
                .map_err(self.state.storage())?;
            meta.remove(STRIPE_INSTALLING)
                .map_err(self.state.storage())?;
        }
        txn.commit().map_err(self.state.storage())
    }

    /// Drops log entries up to `base.1` (applied, and held by every member or
    /// covered by snapshots) and records `base` (epoch, index) as the point the
    /// log starts after. Refused unless the state file covers every entry the
    /// log would no longer hold, fsynced ([`flush_durable`](Self::flush_durable)
    /// first, or a periodic fsync).
    pub fn compact_log(&self, base: (u64, u64)) -> Result<(), StoreError> {
        self.check_state_kept()?;
        let filed = self.state_durable();
        if filed < base.1 {
            return Err(StoreError::Corrupt {
                path: self.state.path.clone(),
                what: format!("log compaction up to entry {}", base.1),
                detail: format!("the file's fsynced state covers entries up to {filed} only"),
            });
        }
        let txn = self.write_txn(&self.log, false)?;
        {
            let mut log = txn.open_table(STRIPE_LOG).map_err(self.log.storage())?;
            log.retain_in(..=base.1, |_, _| false)
                .map_err(self.log.storage())?;
            let mut meta = txn.open_table(STRIPE_META).map_err(self.log.storage())?;
            meta.insert(STRIPE_BASE, base_bytes(base).as_slice())
                .map_err(self.log.storage())?;
        }
        txn.commit().map_err(self.log.storage())
    }

    /// Index of the first entry the log holds (`None` if it holds none).
    pub fn log_first(&self) -> Result<Option<u64>, StoreError> {
        let txn = self.begin_read(&self.log)?;
        let table = txn.open_table(STRIPE_LOG).map_err(self.log.storage())?;
        let first = table.first().map_err(self.log.storage())?;
        Ok(first.map(|(k, _)| k.value()))
    }

    /// The last change seq produced by applied writes.
    pub fn changes_head(&self) -> u64 {
        self.changes_head.load(Ordering::Acquire)
    }

    /// Change events in the outbox from change seq `from` on, at most `limit`.
    pub fn changes(&self, from: u64, limit: usize) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        let (mut pending, txn) = {
            let u = self.lock_unflushed();
            let txn = self.begin_read(&self.state)?;
            self.check_state_kept()?;
            (u.changes_from(from), txn)
        };
        let table = txn.open_table(CHANGES).map_err(self.state.storage())?;
        // Pending changes follow the file's (a flush that committed meanwhile
        // may have put some in both).
        for row in table
            .range(from..)
            .map_err(self.state.storage())?
            .take(limit)
        {
            let (k, v) = row.map_err(self.state.storage())?;
            pending
                .entry(k.value())
                .or_insert_with(|| v.value().to_vec());
        }
        Ok(pending.into_iter().take(limit).collect())
    }

    /// Removes change events up to `upto` from the outbox once the broadcast log
    /// holds them. Not fsynced: a crash only leaves a few to be skipped again.
    pub fn prune_changes(&self, upto: u64) -> Result<(), StoreError> {
        // Raised first: a flush that takes the writer right after this commit
        // must not write the pruned events back. (If the commit fails, the
        // broadcast log holds them anyway.)
        self.changes_pruned.fetch_max(upto, Ordering::AcqRel);
        let txn = self.write_txn(&self.state, false)?;
        {
            let mut table = txn.open_table(CHANGES).map_err(self.state.storage())?;
            table
                .retain_in(..=upto, |_, _| false)
                .map_err(self.state.storage())?;
        }
        txn.commit().map_err(self.state.storage())
    }

    /// The current value of a key: (version, value).
    pub fn get(&self, map: &str, key: &str) -> Result<Option<(u64, Vec<u8>)>, StoreError> {
        let txn = {
            let u = self.lock_unflushed();
            // Begun before a flush can take the key's change out of memory
            // (and before checking: beginning may open the file again).
            let txn = self.begin_read(&self.state)?;
            self.check_state_kept()?;
            if let Some(v) = u.kv(map, key) {
                return Ok(v);
            }
            txn
        };
        let kv = txn.open_table(KV).map_err(self.state.storage())?;
        Ok(kv.get((map, key)).map_err(self.state.storage())?.map(|v| {
            let (version, value) = v.value();
            (version, value.to_vec())
        }))
    }

    /// Keys of `map` starting with `prefix`, after `after`, at most `limit`.
    pub fn keys(
        &self,
        map: &str,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<String>, StoreError> {
        let start = match after {
            Some(a) if a >= prefix => a,
            _ => prefix,
        };
        let (pending, txn) = {
            let u = self.lock_unflushed();
            let txn = self.begin_read(&self.state)?;
            self.check_state_kept()?;
            (u.keys_from(map, start), txn)
        };
        let kv = txn.open_table(KV).map_err(self.state.storage())?;
        // Pending changes decide for the keys they name: at most that many keys
        // of the file are passed over.
        let mut keys = std::collections::BTreeSet::new();
        for row in kv
            .range((map, start)..)
            .map_err(self.state.storage())?
            .take(limit + pending.len() + 1)
        {
            let (k, _) = row.map_err(self.state.storage())?;
            let (m, key) = k.value();
            if m != map || !key.starts_with(prefix) {
                break;
            }
            if !pending.contains_key(key) {
                keys.insert(key.to_string());
            }
        }
        keys.extend(
            pending
                .into_iter()
                .filter(|(k, present)| *present && k.starts_with(prefix))
                .map(|(k, _)| k),
        );
        Ok(keys
            .into_iter()
            .filter(|k| after != Some(k.as_str()))
            .take(limit)
            .collect())
    }
}

/// Opens (or creates) the stripe's log database at `path`.
fn open_log_db(path: &Path) -> Result<Database, StoreError> {
    open_or_create(path, STRIPE_META, |txn| {
        txn.open_table(STRIPE_LOG)?;
        Ok(())
    })
}

/// Opens (or creates) the stripe's state database at `path` with all its tables.
fn open_state_db(path: &Path) -> Result<Database, StoreError> {
    open_or_create(path, STRIPE_STATE_META, |txn| {
        txn.open_table(KV)?;
        txn.open_table(REQUESTS)?;
        txn.open_table(REQUEST_EXPIRY)?;
        txn.open_table(CHANGES)?;
        Ok(())
    })
}

/// Where a state file is built while a data directory from before it moves
/// its state there (renamed into place once complete).
fn migrating_path(state_path: &Path) -> PathBuf {
    state_path.with_extension("redb.migrating")
}

/// A data directory from before the state file kept the applied state in the
/// log's file: it is copied to a new state file (built aside, then renamed
/// into place, so a crash leaves either no state file or a complete one), then
/// dropped from the log's file. Once done, only the leftovers are dropped.
fn migrate_state(
    log_db: &mut Database,
    log_path: &Path,
    state_path: &Path,
) -> Result<(), StoreError> {
    let legacy = {
        let txn = log_db.begin_read().map_err(storage_error(log_path))?;
        match txn.open_table(KV) {
            Ok(_) => true,
            Err(redb::TableError::TableDoesNotExist(_)) => false,
            Err(e) => return Err(storage_error(log_path)(e)),
        }
    };
    if !legacy {
        return Ok(());
    }
    if !state_path.exists() {
        copy_state(log_db, log_path, state_path)?;
    }
    let mut txn = log_db.begin_write().map_err(storage_error(log_path))?;
    txn.set_durability(Durability::Immediate)
        .map_err(storage_error(log_path))?;
    for table in [KV, KV_STAGING] {
        txn.delete_table(table).map_err(storage_error(log_path))?;
    }
    for table in [REQUESTS, REQUESTS_STAGING] {
        txn.delete_table(table).map_err(storage_error(log_path))?;
    }
    txn.delete_table(REQUEST_EXPIRY)
        .map_err(storage_error(log_path))?;
    txn.delete_table(CHANGES).map_err(storage_error(log_path))?;
    {
        let mut meta = txn
            .open_table(STRIPE_META)
            .map_err(storage_error(log_path))?;
        meta.remove(STRIPE_APPLIED)
            .map_err(storage_error(log_path))?;
        meta.remove(STRIPE_CHANGES)
            .map_err(storage_error(log_path))?;
    }
    txn.commit().map_err(storage_error(log_path))?;
    // Give the room back: the log's file held the state too. (Not needed to
    // go on: a failure only leaves the file larger.)
    tracing::info!(path = %log_path.display(), "compacting the log's file");
    if let Err(e) = log_db.compact() {
        tracing::warn!(path = %log_path.display(), error = %e,
            "cannot compact the log's file after moving the state out; it keeps its size");
    }
    tracing::info!(path = %log_path.display(), "old applied-state tables dropped from the log's file");
    Ok(())
}

/// Copies the applied state out of a log file from before the state file.
fn copy_state(log_db: &Database, log_path: &Path, state_path: &Path) -> Result<(), StoreError> {
    // Built beside the file a link at `state_path` points to, so the rename
    // keeps the link.
    let state_path = &where_created(state_path);
    let tmp = migrating_path(state_path);
    if tmp.exists() {
        // An earlier attempt that did not finish.
        std::fs::remove_file(&tmp).map_err(|e| StoreError::Storage {
            path: tmp.clone(),
            source: redb::StorageError::Io(e).into(),
        })?;
    }
    tracing::info!(from = %log_path.display(), to = %state_path.display(), "moving the stripe's applied state to a file of its own");
    let new = open_state_db(&tmp)?;
    let read = log_db.begin_read().map_err(storage_error(log_path))?;
    let mut txn = new.begin_write().map_err(storage_error(&tmp))?;
    txn.set_durability(Durability::Immediate)
        .map_err(storage_error(&tmp))?;
    let mut rows = 0u64;
    copy_table(&read, &txn, KV, log_path, &tmp, &mut rows)?;
    copy_table(&read, &txn, REQUESTS, log_path, &tmp, &mut rows)?;
    copy_table(&read, &txn, REQUEST_EXPIRY, log_path, &tmp, &mut rows)?;
    copy_table(&read, &txn, CHANGES, log_path, &tmp, &mut rows)?;
    {
        let from = read
            .open_table(STRIPE_META)
            .map_err(storage_error(log_path))?;
        let mut to = txn
            .open_table(STRIPE_STATE_META)
            .map_err(storage_error(&tmp))?;
        for key in [STRIPE_APPLIED, STRIPE_CHANGES] {
            if let Some(v) = from.get(key).map_err(storage_error(log_path))? {
                to.insert(key, v.value()).map_err(storage_error(&tmp))?;
            }
        }
    }
    txn.commit().map_err(storage_error(&tmp))?;
    drop(new);
    std::fs::rename(&tmp, state_path).map_err(|e| StoreError::Storage {
        path: state_path.to_path_buf(),
        source: redb::StorageError::Io(e).into(),
    })?;
    // The rename itself must survive a crash before the log's file changes.
    if let Some(dir) = state_path.parent() {
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| StoreError::Storage {
                path: dir.to_path_buf(),
                source: redb::StorageError::Io(e).into(),
            })?;
    }
    tracing::info!(rows, path = %state_path.display(), "the stripe's applied state has a file of its own");
    Ok(())
}

/// Copies every row of `table` from `read` (of the file at `from`; none if it
/// lacks the table) into `txn` (of the file at `to`), counting them in `rows`.
fn copy_table<K: redb::Key + 'static, V: redb::Value + 'static>(
    read: &redb::ReadTransaction,
    txn: &redb::WriteTransaction,
    table: redb::TableDefinition<K, V>,
    from: &Path,
    to: &Path,
    rows: &mut u64,
) -> Result<(), StoreError> {
    let source = match read.open_table(table) {
        Ok(t) => t,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(()),
        Err(e) => return Err(storage_error(from)(e)),
    };
    let mut dest = txn.open_table(table).map_err(storage_error(to))?;
    for row in source.iter().map_err(storage_error(from))? {
        let (k, v) = row.map_err(storage_error(from))?;
        dest.insert(k.value(), v.value())
            .map_err(storage_error(to))?;
        *rows += 1;
        if rows.is_multiple_of(MIGRATE_REPORT_EVERY) {
            tracing::info!(rows = *rows, "moving the stripe's applied state");
        }
    }
    Ok(())
}

/// The last change seq recorded in the state database `db`.
fn read_changes_head(db: &Database, path: &Path) -> Result<u64, StoreError> {
    let txn = db.begin_read().map_err(storage_error(path))?;
    let meta = txn
        .open_table(STRIPE_STATE_META)
        .map_err(storage_error(path))?;
    let head = meta.get(STRIPE_CHANGES).map_err(storage_error(path))?;
    Ok(head.map(|v| u64_of(v.value())).unwrap_or(0))
}

fn installing_bytes(at: (u64, u64), keep_log: bool) -> [u8; 17] {
    let mut b = [0u8; 17];
    b[..16].copy_from_slice(&base_bytes(at));
    b[16] = u8::from(keep_log);
    b
}

fn installing_of(b: &[u8]) -> Option<((u64, u64), bool)> {
    (b.len() == 17).then(|| (base_of(&b[..16]), b[16] == 1))
}

/// Locks `m`, even if a thread panicked holding it: an apply changes pending
/// state only once its whole batch succeeded.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Has the OS write the file's dirty pages to the disk one range at a time,
/// waiting for each (Linux `sync_file_range`; RocksDB's `bytes_per_sync` does
/// the same), after a flush that was not fsynced. A range holds no more dirty
/// pages than flushes made since the last write-back (a few MB under load;
/// ranges without any cost a syscall each), so the disk holds a short queue of
/// state pages at most for a log fsync to wait behind, and the state's next
/// fsync finds less left to write (no more than redb still holds in its cache,
/// see `DB_CACHE_BYTES`). The flush job includes it (its time is in
/// `kiln_stripe_storage_seconds{job="flush"}`), so the next flush waits for
/// it. With the bounded cache, the slowest put of a 12 s run at 64 clients
/// went from 120–210 ms to 45–90 ms (integration/BENCHMARKS.md). In both
/// persistence modes: the fsync before a log compaction is made in both. Best
/// effort: durability never relies on it, so a failure is only logged (debug).
#[cfg(target_os = "linux")]
fn write_back_in_steps(path: &Path) {
    use std::os::fd::AsRawFd;
    // At most this many ranges, each at least 2 MiB.
    const STEPS: u64 = 64;
    const MIN_RANGE: u64 = 2 << 20;
    let Ok(file) = std::fs::File::open(path) else {
        return;
    };
    let len = file.metadata().map_or(0, |m| m.len());
    let range = (len / STEPS).max(MIN_RANGE);
    let flags = libc::SYNC_FILE_RANGE_WAIT_BEFORE
        | libc::SYNC_FILE_RANGE_WRITE
        | libc::SYNC_FILE_RANGE_WAIT_AFTER;
    let mut offset = 0;
    while offset < len {
        // SAFETY: `file` stays open for the call, which takes no pointers.
        let done = unsafe {
            libc::sync_file_range(
                file.as_raw_fd(),
                offset as libc::off64_t,
                range as libc::off64_t,
                flags,
            )
        };
        if done != 0 {
            tracing::debug!(path = %path.display(), error = %std::io::Error::last_os_error(),
                "write-back of the state file failed (best effort; its next fsync writes it)");
            return;
        }
        offset += range;
    }
}

#[cfg(not(target_os = "linux"))]
fn write_back_in_steps(_path: &Path) {}

#[cfg(test)]
mod tests {
    use super::*;

    /// A durable store whose log holds entries `1..=n` with empty bodies.
    fn store_with_empty_entries(n: u64) -> (tempfile::TempDir, StripeStore) {
        let dir = tempfile::tempdir().unwrap();
        let s = StripeStore::open(dir.path(), true).unwrap();
        s.persist(None, &empty_entries(1..=n), None).unwrap();
        (dir, s)
    }

    fn empty_entries(indexes: std::ops::RangeInclusive<u64>) -> Vec<(u64, Vec<u8>)> {
        indexes.map(|i| (i, vec![])).collect()
    }

    #[test]
    fn a_log_with_a_hole_past_the_applied_state_loses_what_follows_the_hole() {
        let dir = tempfile::tempdir().unwrap();
        let s = StripeStore::open(dir.path(), true).unwrap();
        let mut rows = empty_entries(1..=2);
        rows.extend(empty_entries(4..=5));
        s.persist(None, &rows, None).unwrap();
        let r = s.recover().unwrap();
        assert_eq!(
            r.entries.iter().map(|e| e.0).collect::<Vec<_>>(),
            vec![1, 2]
        );
        // Dropped from the file too: appends go on at 3.
        assert!(s.entries(3, 10).unwrap().is_empty());
        drop(s);
        let s = StripeStore::open(dir.path(), true).unwrap();
        assert_eq!(s.recover().unwrap().entries.len(), 2);
    }

    #[test]
    fn log_and_promise_survive_reopen_and_apply_writes_state() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = StripeStore::open(dir.path(), true).unwrap();
            s.set_stripe(1).unwrap();
            s.persist(
                None,
                &[(1, b"a".to_vec()), (2, b"b".to_vec()), (3, b"c".to_vec())],
                Some(4),
            )
            .unwrap();
            s.persist(Some(3), &[(3, b"C".to_vec())], None).unwrap();
            let n = s
                .apply(&s.entries(1, 2).unwrap(), |tx, i, bytes| {
                    let key = String::from_utf8_lossy(bytes).to_string();
                    tx.put("m", &key, i, bytes)?;
                    tx.record_request(&key, b"done", 0, None)?;
                    Ok(i)
                })
                .unwrap();
            assert_eq!(n, vec![(1, 1), (2, 2)]);
            assert_eq!(s.unflushed_entries(), 2);
            assert_eq!(s.flush().unwrap(), 2);
            assert_eq!(s.unflushed_entries(), 0);
        }
        let s = StripeStore::open(dir.path(), true).unwrap();
        let r = s.recover().unwrap();
        assert_eq!(r.stripe, Some(1));
        assert_eq!(r.promised, 4);
        assert_eq!(r.applied, 2);
        assert_eq!(
            r.entries,
            vec![(1, b"a".to_vec()), (2, b"b".to_vec()), (3, b"C".to_vec())]
        );
        assert_eq!(s.get("m", "b").unwrap(), Some((2, b"b".to_vec())));
        assert_eq!(s.keys("m", "", None, 10).unwrap(), vec!["a", "b"]);
        assert_eq!(s.keys("m", "", Some("a"), 10).unwrap(), vec!["b"]);
        assert!(s.keys("other", "", None, 10).unwrap().is_empty());
    }

    #[test]
    fn apply_logged_applies_what_the_log_holds() {
        let dir = tempfile::tempdir().unwrap();
        let put = |tx: &mut dyn KvTxn, i: u64, bytes: &[u8]| {
            let key = String::from_utf8_lossy(bytes).to_string();
            tx.put("m", &key, i, bytes)?;
            Ok(i)
        };
        let upper = |b: &[u8]| b.to_ascii_uppercase();
        {
            let s = StripeStore::open(dir.path(), true).unwrap();
            s.persist(None, &[(1, b"a".to_vec())], None).unwrap();
            // Entry 1 was persisted earlier, entry 2 comes with this call.
            s.persist(None, &[(2, b"b".to_vec())], None).unwrap();
            let done = s.apply_logged((1, 2), upper, put).unwrap();
            assert_eq!(done, vec![(1, 1), (2, 2)]);
            // An entry that is not in the log is never skipped.
            s.persist(None, &[(4, b"d".to_vec())], None).unwrap();
            let err = s.apply_logged((3, 4), upper, put).unwrap_err();
            assert!(matches!(err, StoreError::Corrupt { .. }), "{err}");
            s.flush().unwrap();
        }
        let s = StripeStore::open(dir.path(), true).unwrap();
        let r = s.recover().unwrap();
        assert_eq!(r.applied, 2);
        // Entry 4 follows a hole: dropped at recovery (the active sends it again).
        let indexes: Vec<u64> = r.entries.iter().map(|e| e.0).collect();
        assert_eq!(indexes, vec![1, 2]);
        assert_eq!(s.get("m", "B").unwrap(), Some((2, b"B".to_vec())));
    }

    #[test]
    fn temporary_mode_starts_empty() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = StripeStore::open(dir.path(), true).unwrap();
            s.persist(None, &[(1, b"a".to_vec())], Some(2)).unwrap();
        }
        let s = StripeStore::open(dir.path(), false).unwrap();
        assert!(s.recover().unwrap().entries.is_empty());
    }

    fn put_all(s: &StripeStore, rows: &[(u64, &str, &[u8])]) {
        let entries: Vec<(u64, Vec<u8>)> = rows.iter().map(|(i, _, _)| (*i, vec![])).collect();
        s.persist(None, &entries, None).unwrap();
        let mut i = 0;
        s.apply(&entries, |tx, index, _| {
            let (_, key, value) = rows[i];
            i += 1;
            tx.put("m", key, index, value)?;
            // The record is its expiry, index seconds.
            let until = index * 1000;
            tx.record_request(key, &until.to_le_bytes(), until, None)?;
            tx.record_change(key.as_bytes())?;
            Ok(())
        })
        .unwrap();
    }

    #[test]
    fn a_snapshot_moves_the_applied_state_consistently_and_compaction_keeps_the_tail() {
        let dir = tempfile::tempdir().unwrap();
        let active = StripeStore::open(dir.path(), true).unwrap();
        put_all(&active, &[(1, "a", b"1"), (2, "b", b"2"), (3, "c", b"3")]);
        let source = active.snapshot_source().unwrap();
        // Writes after the view was taken do not show in it.
        put_all(&active, &[(4, "d", b"4")]);
        assert_eq!((source.applied, source.changes), (3, 3));
        let first = source.kv_batch(None, 1).unwrap();
        assert_eq!(first.len(), 1, "at least one row, then the byte bound");
        let key = (first[0].0.clone(), first[0].1.clone());
        let rest = source.kv_batch(Some(&key), 1 << 20).unwrap();
        let keys: Vec<&str> = first.iter().chain(&rest).map(|r| r.1.as_str()).collect();
        assert_eq!(keys, vec!["a", "b", "c"]);
        let reqs = source.requests_batch(None, 1 << 20).unwrap();
        assert_eq!(reqs.len(), 3);

        let dir2 = tempfile::tempdir().unwrap();
        let standby = StripeStore::open(dir2.path(), true).unwrap();
        put_all(&standby, &[(1, "stale", b"x"), (2, "zz", b"y")]);
        standby.stage_snapshot(true, &first, &[], false).unwrap();
        standby.stage_snapshot(false, &rest, &reqs, true).unwrap();
        let expiry_of = |r: &[u8]| Some(u64_of(r));
        standby
            .install_snapshot((1, 3), false, source.changes, &expiry_of)
            .unwrap();
        // The installed state is fsynced: the log may go up to it.
        assert_eq!(standby.state_durable(), 3);
        let r = standby.recover().unwrap();
        assert_eq!((r.base, r.applied), ((1, 3), 3));
        assert!(r.entries.is_empty());
        assert_eq!(standby.get("m", "b").unwrap(), Some((2, b"2".to_vec())));
        assert_eq!(standby.get("m", "stale").unwrap(), None);
        assert_eq!(standby.changes_head(), 3);
        assert!(standby.changes(1, 10).unwrap().is_empty());
        // The records received are indexed by expiry: pruning finds them.
        let pruned = standby
            .apply(&[(4, vec![])], |tx, _, _| {
                let n = tx.prune_requests(2_500, 10)?;
                Ok((n, tx.request("a")?, tx.request("c")?))
            })
            .unwrap();
        assert_eq!(
            pruned,
            vec![(4, (2, None, Some(3000u64.to_le_bytes().to_vec())))]
        );

        active.flush_durable().unwrap();
        assert_eq!(active.log_first().unwrap(), Some(1));
        active.compact_log((1, 2)).unwrap();
        assert_eq!(active.log_first().unwrap(), Some(3));
        let r = active.recover().unwrap();
        assert_eq!(r.base, (1, 2));
        assert_eq!(
            r.entries.iter().map(|e| e.0).collect::<Vec<_>>(),
            vec![3, 4]
        );
    }

    /// Applies a put (or, without a value, a delete) as entry `index`, which
    /// the log holds already.
    fn put_one(s: &StripeStore, index: u64, key: &str, value: Option<&[u8]>) {
        s.apply(&[(index, vec![])], |tx, i, _| {
            match value {
                Some(v) => tx.put("m", key, i, v)?,
                None => tx.delete("m", key)?,
            }
            tx.record_change(key.as_bytes())?;
            Ok(())
        })
        .unwrap();
    }

    #[test]
    fn applied_state_is_read_through_memory_before_and_after_a_flush() {
        let (dir, s) = store_with_empty_entries(7);
        put_one(&s, 1, "a", Some(b"1"));
        put_one(&s, 2, "b", Some(b"2"));
        put_one(&s, 3, "c", Some(b"3"));
        assert_eq!(s.flush().unwrap(), 3);
        assert_eq!(s.flushes(), 1);
        // In memory only: a new key, a changed one, a deleted one.
        put_one(&s, 4, "bb", Some(b"4"));
        put_one(&s, 5, "a", Some(b"5"));
        put_one(&s, 6, "b", None);
        let check = |s: &StripeStore| {
            assert_eq!(s.get("m", "a").unwrap(), Some((5, b"5".to_vec())));
            assert_eq!(s.get("m", "b").unwrap(), None);
            assert_eq!(s.get("m", "c").unwrap(), Some((3, b"3".to_vec())));
            assert_eq!(s.keys("m", "", None, 10).unwrap(), vec!["a", "bb", "c"]);
            assert_eq!(s.keys("m", "b", None, 10).unwrap(), vec!["bb"]);
            assert_eq!(s.keys("m", "", Some("a"), 1).unwrap(), vec!["bb"]);
            assert_eq!(s.keys("m", "", None, 2).unwrap(), vec!["a", "bb"]);
            let seqs: Vec<u64> = s.changes(2, 10).unwrap().iter().map(|c| c.0).collect();
            assert_eq!(seqs, vec![2, 3, 4, 5, 6]);
            assert_eq!(s.changes(3, 2).unwrap().len(), 2);
            assert_eq!(s.changes_head(), 6);
        };
        check(&s);
        assert_eq!(s.unflushed_entries(), 3);
        assert_eq!(s.flush().unwrap(), 3);
        check(&s);
        // Log writes leave pending state to flushes (the state has a file,
        // and a writer, of its own).
        put_one(&s, 7, "d", Some(b"7"));
        s.persist(None, &[(8, vec![])], None).unwrap();
        assert_eq!((s.unflushed_entries(), s.flushes()), (1, 2));
        assert_eq!(s.flush().unwrap(), 1);
        assert_eq!((s.unflushed_entries(), s.flushes()), (0, 3));
        drop(s);
        let s = StripeStore::open(dir.path(), true).unwrap();
        assert_eq!(s.recover().unwrap().applied, 7);
        assert_eq!(s.get("m", "d").unwrap(), Some((7, b"7".to_vec())));
    }

    #[test]
    fn unflushed_bytes_count_the_entries_applied_since_the_last_flush() {
        let (_dir, s) = store_with_empty_entries(0);
        let rows: Vec<(u64, Vec<u8>)> = (1..=3).map(|i| (i, vec![7u8; 1000])).collect();
        s.persist(None, &rows, None).unwrap();
        let put = |tx: &mut dyn KvTxn, i: u64, data: &[u8]| tx.put("m", "k", i, data);
        s.apply(&rows[..2], put).unwrap();
        assert_eq!((s.unflushed_entries(), s.unflushed_bytes()), (2, 2000));
        // Entries applied before are passed over, not counted again.
        s.apply(&rows, put).unwrap();
        assert_eq!((s.unflushed_entries(), s.unflushed_bytes()), (3, 3000));
        assert_eq!(s.flush().unwrap(), 3);
        assert_eq!((s.unflushed_entries(), s.unflushed_bytes()), (0, 0));
    }

    #[test]
    fn a_restart_from_the_file_drops_pending_state_and_applies_the_log_again() {
        let dir = tempfile::tempdir().unwrap();
        let s = StripeStore::open(dir.path(), true).unwrap();
        s.persist(None, &[(1, vec![]), (2, vec![])], None).unwrap();
        put_one(&s, 1, "a", Some(b"1"));
        s.flush().unwrap();
        put_one(&s, 2, "a", Some(b"2"));
        let r = s.recover().unwrap();
        assert_eq!(r.applied, 1);
        assert_eq!(r.entries.len(), 2);
        assert_eq!(s.get("m", "a").unwrap(), Some((1, b"1".to_vec())));
        let again = |tx: &mut dyn KvTxn, i: u64, _: &[u8]| {
            tx.put("m", "a", i, b"2")?;
            Ok(i)
        };
        // Entries the state covers already are passed over; a gap is refused.
        let done = s.apply(&[(1, vec![]), (2, vec![])], again).unwrap();
        assert_eq!(done, vec![(2, 2)]);
        assert!(s.apply(&[(2, vec![])], again).unwrap().is_empty());
        let err = s.apply(&[(4, vec![])], again).unwrap_err();
        assert!(matches!(err, StoreError::Corrupt { .. }), "{err}");
        assert_eq!(s.get("m", "a").unwrap(), Some((2, b"2".to_vec())));
    }

    #[test]
    fn request_records_are_pruned_alike_from_the_file_and_from_memory() {
        // The same records, once all flushed and once half in memory (with
        // one of the file's records replaced in memory): the same ones go.
        let record = |s: &StripeStore, index: u64, id: &str, until: u64, replaces: Option<u64>| {
            s.apply(&[(index, vec![])], |tx, _, _| {
                tx.record_request(id, &until.to_le_bytes(), until, replaces)
            })
            .unwrap();
        };
        let prune = |s: &StripeStore, index: u64| {
            s.apply(&[(index, vec![])], |tx, _, _| tx.prune_requests(100, 3))
                .unwrap()
        };
        let mut gone = Vec::new();
        for flush_at in [6, 3] {
            let (_dir, s) = store_with_empty_entries(8);
            let plan = [(1, "a", 50, None), (2, "b", 10, None), (3, "c", 30, None)];
            for (i, id, until, replaces) in plan {
                record(&s, i, id, until, replaces);
                if i == flush_at {
                    s.flush().unwrap();
                }
            }
            // "b" is remembered longer now; "d" and "e" come in memory.
            record(&s, 4, "b", 200, Some(10));
            record(&s, 5, "d", 20, None);
            record(&s, 6, "e", 40, None);
            if flush_at == 6 {
                s.flush().unwrap();
            }
            assert_eq!(prune(&s, 7), vec![(7, 3)]);
            s.flush().unwrap();
            let ids = ["a", "b", "c", "d", "e"];
            let left = s
                .apply(&[(8, vec![])], |tx, _, _| {
                    ids.iter()
                        .map(|id| tx.request(id))
                        .collect::<Result<Vec<_>, _>>()
                })
                .unwrap()
                .remove(0)
                .1;
            gone.push(left);
        }
        assert_eq!(gone[0], gone[1]);
        let present: Vec<bool> = gone[0].iter().map(Option::is_some).collect();
        // The three oldest before 100 (d 20, c 30, e 40) went; a 50 stays, b moved to 200.
        assert_eq!(present, vec![true, true, false, false, false]);
    }

    /// Request rows read alike whether what changed them is flushed or not.
    #[test]
    fn request_rows_read_alike_from_the_file_and_from_memory() {
        let (dir, s) = store_with_empty_entries(6);
        let set = |s: &StripeStore, index: u64, id: &'static str, row: Option<&'static [u8]>| {
            s.apply(&[(index, vec![])], |tx, _, _| tx.set_request_row(id, row))
                .unwrap();
        };
        let rows = |s: &StripeStore, index: u64| -> Vec<(String, Vec<u8>)> {
            s.apply(&[(index, vec![])], |tx, _, _| tx.request_rows("o:", "o;"))
                .unwrap()
                .remove(0)
                .1
        };
        set(&s, 1, "o:a", Some(b"1"));
        set(&s, 2, "o:b", Some(b"2"));
        s.flush().unwrap();
        set(&s, 3, "o:c", Some(b"3"));
        set(&s, 4, "o:b", None);
        set(&s, 5, "o:a", Some(b"A"));
        let expected = vec![
            ("o:a".to_string(), b"A".to_vec()),
            ("o:c".to_string(), b"3".to_vec()),
        ];
        assert_eq!(rows(&s, 6), expected);
        s.flush_durable().unwrap();
        drop(s);
        let s = StripeStore::open(dir.path(), true).unwrap();
        assert_eq!(rows(&s, 7), expected);
    }

    #[test]
    fn a_batch_that_fails_part_way_leaves_nothing_behind() {
        let (_dir, s) = store_with_empty_entries(3);
        put_one(&s, 1, "a", Some(b"1"));
        let failing = |tx: &mut dyn KvTxn, i: u64, _: &[u8]| {
            tx.put("m", "a", i, b"x")?;
            tx.record_change(b"a")?;
            if i == 3 {
                return Err(StoreError::Corrupt {
                    path: PathBuf::new(),
                    what: "test".into(),
                    detail: "entry 3 fails".into(),
                });
            }
            Ok(())
        };
        assert!(s.apply(&empty_entries(2..=3), failing).is_err());
        assert_eq!(s.get("m", "a").unwrap(), Some((1, b"1".to_vec())));
        assert_eq!((s.changes_head(), s.unflushed_entries()), (1, 1));
        // The same entries apply again from where the state is.
        put_one(&s, 2, "a", Some(b"2"));
        put_one(&s, 3, "b", Some(b"3"));
        s.flush().unwrap();
        let seqs: Vec<u64> = s.changes(1, 10).unwrap().iter().map(|c| c.0).collect();
        assert_eq!(seqs, vec![1, 2, 3]);
    }

    #[test]
    fn pending_state_is_never_written_over_a_file_it_does_not_follow() {
        let (_dir, s) = store_with_empty_entries(3);
        put_one(&s, 1, "a", Some(b"1"));
        s.flush().unwrap();
        put_one(&s, 2, "a", Some(b"2"));
        // As after redb reopened the file and undid the unfsynced flush.
        s.lock_unflushed().newest.base = 0;
        let err = s.flush().unwrap_err();
        assert!(matches!(err, StoreError::Corrupt { .. }), "{err}");
        // The file was opened again: pending state is refused until recovered.
        s.state_lost.store(true, Ordering::Release);
        assert!(matches!(
            s.get("m", "a").unwrap_err(),
            StoreError::StateReopened { .. }
        ));
        assert!(s.apply(&empty_entries(3..=3), |_, _, _| Ok(())).is_err());
        let r = s.recover().unwrap();
        assert_eq!(r.applied, 1);
        assert_eq!(s.get("m", "a").unwrap(), Some((1, b"1".to_vec())));
        put_one(&s, 2, "a", Some(b"2"));
        assert_eq!(s.flush().unwrap(), 1);
    }

    #[test]
    fn change_events_the_outbox_dropped_are_not_written_back() {
        let (_dir, s) = store_with_empty_entries(3);
        for i in 1..=3 {
            put_one(&s, i, &format!("k{i}"), Some(b"v"));
        }
        s.prune_changes(2).unwrap();
        s.flush().unwrap();
        let seqs: Vec<u64> = s.changes(1, 10).unwrap().iter().map(|c| c.0).collect();
        assert_eq!(seqs, vec![3]);
    }

    #[test]
    fn a_data_directory_from_before_the_state_file_moves_its_state_there_once() {
        let dir = tempfile::tempdir().unwrap();
        let log_path = dir.path().join(STRIPE_DB_FILE);
        {
            // As an older kiln left it: state and log in one file.
            let db = open_or_create(&log_path, STRIPE_META, |txn| {
                txn.open_table(STRIPE_LOG)?;
                txn.open_table(KV)?;
                txn.open_table(REQUESTS)?;
                txn.open_table(REQUEST_EXPIRY)?;
                txn.open_table(CHANGES)?;
                Ok(())
            })
            .unwrap();
            let txn = db.begin_write().unwrap();
            {
                let mut log = txn.open_table(STRIPE_LOG).unwrap();
                for i in 1..=3u64 {
                    log.insert(i, b"e".as_slice()).unwrap();
                }
                let mut kv = txn.open_table(KV).unwrap();
                kv.insert(("m", "a"), (1, b"1".as_slice())).unwrap();
                kv.insert(("m", "b"), (2, b"2".as_slice())).unwrap();
                let mut requests = txn.open_table(REQUESTS).unwrap();
                requests.insert("r:1", b"rec".as_slice()).unwrap();
                let mut expiry = txn.open_table(REQUEST_EXPIRY).unwrap();
                expiry.insert((9, "r:1"), ()).unwrap();
                let mut changes = txn.open_table(CHANGES).unwrap();
                changes.insert(2, b"b".as_slice()).unwrap();
                let mut meta = txn.open_table(STRIPE_META).unwrap();
                meta.insert(STRIPE_APPLIED, 2u64.to_le_bytes().as_slice())
                    .unwrap();
                meta.insert(STRIPE_CHANGES, 2u64.to_le_bytes().as_slice())
                    .unwrap();
                meta.insert(STRIPE_PROMISED, 7u64.to_le_bytes().as_slice())
                    .unwrap();
            }
            txn.commit().unwrap();
        }
        for _ in 0..2 {
            let s = StripeStore::open(dir.path(), true).unwrap();
            let r = s.recover().unwrap();
            assert_eq!((r.applied, r.promised, r.entries.len()), (2, 7, 3));
            assert_eq!(s.get("m", "b").unwrap(), Some((2, b"2".to_vec())));
            assert_eq!(s.changes(1, 10).unwrap(), vec![(2, b"b".to_vec())]);
            assert_eq!(s.changes_head(), 2);
            let requests = s
                .apply(&[(3, vec![])], |tx, _, _| tx.request("r:1"))
                .unwrap();
            assert_eq!(requests, vec![(3, Some(b"rec".to_vec()))]);
            // Nothing of the state is left in the log's file.
            let txn = s.begin_read(&s.log).unwrap();
            assert!(matches!(
                txn.open_table(KV),
                Err(redb::TableError::TableDoesNotExist(_))
            ));
            let meta = txn.open_table(STRIPE_META).unwrap();
            assert!(meta.get(STRIPE_APPLIED).unwrap().is_none());
        }
        assert!(!migrating_path(&dir.path().join(STRIPE_STATE_DB_FILE)).exists());
    }

    #[test]
    fn a_snapshot_install_cut_off_before_its_log_part_is_finished_by_the_next_recovery() {
        let (dir, s) = store_with_empty_entries(5);
        s.stage_snapshot(
            true,
            &[("m".into(), "k".into(), 9, b"v".to_vec())],
            &[],
            false,
        )
        .unwrap();
        // What an install's state part leaves: the log still holds 1..=5.
        let txn = s.write_txn(&s.state, true).unwrap();
        {
            let mut meta = txn.open_table(STRIPE_STATE_META).unwrap();
            meta.insert(STRIPE_APPLIED, 9u64.to_le_bytes().as_slice())
                .unwrap();
            meta.insert(
                STRIPE_INSTALLING,
                installing_bytes((2, 9), false).as_slice(),
            )
            .unwrap();
        }
        txn.commit().unwrap();
        drop(s);
        let s = StripeStore::open(dir.path(), true).unwrap();
        let r = s.recover().unwrap();
        assert_eq!((r.base, r.applied, r.entries.len()), ((2, 9), 9, 0));
        // Finished once: new entries after it stay at the next recovery.
        s.persist(None, &[(10, vec![])], None).unwrap();
        let r = s.recover().unwrap();
        assert_eq!(r.entries.len(), 1);
    }

    #[test]
    fn a_state_ahead_of_its_log_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let s = StripeStore::open(dir.path(), false).unwrap();
        s.persist(None, &empty_entries(1..=2), Some(5)).unwrap();
        put_one(&s, 1, "a", Some(b"1"));
        put_one(&s, 2, "b", Some(b"2"));
        s.flush().unwrap();
        // As after the log's file went back to an earlier commit.
        let txn = s.write_txn(&s.log, false).unwrap();
        txn.open_table(STRIPE_LOG)
            .unwrap()
            .retain(|_, _| false)
            .unwrap();
        txn.commit().unwrap();
        let err = s.recover().unwrap_err();
        assert!(matches!(err, StoreError::Corrupt { .. }), "{err}");
    }

    #[test]
    fn compaction_never_drops_entries_the_file_state_does_not_cover() {
        let (_dir, s) = store_with_empty_entries(3);
        let compact = |s: &StripeStore| s.flush_durable().and_then(|_| s.compact_log((1, 2)));
        let err = compact(&s).unwrap_err();
        assert!(matches!(err, StoreError::Corrupt { .. }), "{err}");
        // Applied in memory only: the durable flush writes it first.
        put_one(&s, 1, "a", Some(b"1"));
        put_one(&s, 2, "b", Some(b"2"));
        compact(&s).unwrap();
        // After a reopen, not at all until the stripe starts again.
        s.state_lost.store(true, Ordering::Release);
        let err = compact(&s).unwrap_err();
        assert!(matches!(err, StoreError::StateReopened { .. }), "{err}");
        let r = s.recover().unwrap();
        assert_eq!((r.base, r.applied, r.entries.len()), ((1, 2), 2, 1));
        assert!(!s.state_lost());
    }

    #[test]
    fn the_log_alone_is_compacted_only_up_to_the_fsynced_state() {
        let (_dir, s) = store_with_empty_entries(3);
        put_one(&s, 1, "a", Some(b"1"));
        put_one(&s, 2, "b", Some(b"2"));
        // Flushed, but not fsynced: the log keeps what a crash could undo.
        s.flush().unwrap();
        assert_eq!(s.state_durable(), 0);
        let err = s.compact_log((1, 2)).unwrap_err();
        assert!(matches!(err, StoreError::Corrupt { .. }), "{err}");
        s.flush_durable().unwrap();
        assert_eq!(s.state_durable(), 2);
        s.compact_log((1, 2)).unwrap();
        put_one(&s, 3, "c", Some(b"3"));
        s.flush_durable().unwrap();
        assert_eq!(s.state_durable(), 3);
        // After a reopen, not at all until the stripe starts again.
        s.state_lost.store(true, Ordering::Release);
        let err = s.compact_log((1, 3)).unwrap_err();
        assert!(matches!(err, StoreError::StateReopened { .. }), "{err}");
    }
}
