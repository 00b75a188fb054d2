//! `broadcast.redb`: the node's bounded per-origin log of databroadcast events.
//!
//! For every origin the log holds a contiguous run of sequence numbers
//! `first..=last`: events are appended strictly in order, and retention removes
//! them from the front. An origin whose older events could not be had any more
//! (pruned everywhere) starts later: its `first` jumps, and readers that were behind
//! it learn that they must resynchronise.
//!
//! Events are opaque bytes here (the broadcast module owns their schema); each
//! carries its timestamp so that age-based retention needs no decoding.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use crate::db_file::DbFile;
use crate::error::StoreError;
use crate::node_store::open_or_create;

/// File name of the broadcast database inside the data directory.
pub const BROADCAST_DB_FILE: &str = "broadcast.redb";

const BROADCAST_META: TableDefinition<&str, &[u8]> = TableDefinition::new("kiln_broadcast_meta");

/// (origin, seq) → (ts in Unix ms, event bytes).
const EVENTS: TableDefinition<(&str, u64), (u64, &[u8])> =
    TableDefinition::new("kiln_broadcast_events");

/// origin → (first, last, count, bytes): the run of seqs held and its size.
const ORIGINS: TableDefinition<&str, (u64, u64, u64, u64)> =
    TableDefinition::new("kiln_broadcast_origins");

/// (origin, what) → the highest seq of the events retention dropped that were
/// about `what` (a datasource, message topic or artifact, as the caller's
/// `missed_label` encodes it): what a subscriber that missed them must refresh.
const MISSED: TableDefinition<(&str, &[u8]), u64> = TableDefinition::new("kiln_broadcast_missed");

/// origin → the seq from which `MISSED` knows every dropped event (below it the
/// log never held some, or forgot what they were about): 1 when absent.
const MISSED_FROM: TableDefinition<&str, u64> = TableDefinition::new("kiln_broadcast_missed_from");

/// Idempotency-Key of one of this node's publishes → (accepted at, Unix ms;
/// SHA-256 of the request; first seq; number of events): a retry with the key
/// gets the first answer again.
const PUBLISH_KEYS: TableDefinition<&str, (u64, &[u8], u64, u64)> =
    TableDefinition::new("kiln_broadcast_publish_keys");

/// (accepted at, key) → (): `PUBLISH_KEYS` by age, for expiry.
const PUBLISH_KEYS_BY_AGE: TableDefinition<(u64, &str), ()> =
    TableDefinition::new("kiln_broadcast_publish_keys_by_age");

/// What `MISSED` keeps per origin; beyond it the least recent go, and with them
/// the knowledge of the seqs up to theirs.
pub const MAX_MISSED_PER_ORIGIN: usize = 4096;

/// The run of events held for one origin.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct OriginRun {
    /// First seq held (or that will be held: `last + 1` when the run is empty).
    pub first: u64,
    /// Last seq held; 0 before any event of the origin.
    pub last: u64,
    pub count: u64,
    pub bytes: u64,
}

impl OriginRun {
    /// From its row in the origins table: (first, last, count, bytes).
    fn from_row((first, last, count, bytes): (u64, u64, u64, u64)) -> Self {
        OriginRun {
            first,
            last,
            count,
            bytes,
        }
    }

    fn row(&self) -> (u64, u64, u64, u64) {
        (self.first, self.last, self.count, self.bytes)
    }

    fn new() -> Self {
        OriginRun {
            first: 1,
            ..Default::default()
        }
    }
}

/// Set in the meta table while this node gets its own earlier events back
/// from its peers (see `BroadcastActor`): kept across restarts until done.
const OWN_RECOVERY: &str = "own_recovery";

fn open_db(path: &Path) -> Result<Database, StoreError> {
    open_db_for(path, false)
}

/// Opens (or creates) the file; one created for a node that existed before
/// starts with the recovery of the node's own events pending, in the same
/// commit that creates it.
fn open_db_for(path: &Path, node_existed: bool) -> Result<Database, StoreError> {
    let db = open_or_create(path, BROADCAST_META, |txn| {
        txn.open_table(EVENTS)?;
        txn.open_table(ORIGINS)?;
        txn.open_table(MISSED)?;
        txn.open_table(MISSED_FROM)?;
        if node_existed {
            let mut meta = txn.open_table(BROADCAST_META)?;
            meta.insert(OWN_RECOVERY, [1u8].as_slice())?;
        }
        Ok(())
    })?;
    remember_what_older_files_dropped(&db, path)?;
    Ok(db)
}

/// A file from before `MISSED` kept no record of what retention dropped: every
/// origin's record starts at its run's first seq.
fn remember_what_older_files_dropped(db: &Database, path: &Path) -> Result<(), StoreError> {
    let storage = |e: redb::Error| StoreError::Storage {
        path: path.to_path_buf(),
        source: e,
    };
    let read = db.begin_read().map_err(|e| storage(e.into()))?;
    match read.open_table(MISSED_FROM) {
        Ok(_) => return Ok(()),
        Err(redb::TableError::TableDoesNotExist(_)) => {}
        Err(e) => return Err(storage(e.into())),
    }
    drop(read);
    let txn = db.begin_write().map_err(|e| storage(e.into()))?;
    {
        let origins = txn.open_table(ORIGINS).map_err(|e| storage(e.into()))?;
        let mut from = txn.open_table(MISSED_FROM).map_err(|e| storage(e.into()))?;
        txn.open_table(MISSED).map_err(|e| storage(e.into()))?;
        for row in origins.iter().map_err(|e| storage(e.into()))? {
            let (k, v) = row.map_err(|e| storage(e.into()))?;
            let run = OriginRun::from_row(v.value());
            if run.first > 1 {
                from.insert(k.value(), run.first)
                    .map_err(|e| storage(e.into()))?;
            }
        }
    }
    txn.commit().map_err(|e| storage(e.into()))
}

/// One event to append.
#[derive(Debug, Clone)]
pub struct StoredEvent {
    pub origin: String,
    pub seq: u64,
    pub ts: u64,
    pub bytes: Vec<u8>,
}

/// The answer to a publish made under an Idempotency-Key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishKey {
    pub key: String,
    /// When the publish was accepted (Unix ms).
    pub at_ms: u64,
    /// SHA-256 of the request (a different request under the key is refused).
    pub digest: [u8; 32],
    /// Seqs `first..first + count` of this node's origin.
    pub first: u64,
    pub count: u64,
}

/// What a subscriber that missed events older than the log keeps must refresh.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Missed {
    /// The log does not know what every missed event was about (it never held
    /// some of them): everything of the origin.
    Unknown,
    /// What the missed events were about, as `missed_label` encoded it.
    Labels(Vec<Vec<u8>>),
}

/// Limits of the log; whichever is reached first removes the oldest events.
#[derive(Debug, Clone, Copy)]
pub struct Retention {
    pub max_events: u64,
    pub max_bytes: u64,
    pub max_age_ms: u64,
}

pub struct BroadcastStore {
    file: DbFile,
    /// Times the file was opened again after an I/O error (each time the
    /// commits since the last durable one may be gone).
    reopens: AtomicU64,
}

impl BroadcastStore {
    /// Opens (or creates) `broadcast.redb` in `dir`.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        Self::open_for_node(dir, false)
    }

    /// As [`open`](Self::open), for a node that `existed` before this start: a
    /// log it has to create anew was lost, and the node's own earlier events
    /// are to be fetched back from its peers (see [`own_recovery_pending`](Self::own_recovery_pending)).
    pub fn open_for_node(dir: &Path, existed: bool) -> Result<Self, StoreError> {
        let path = dir.join(BROADCAST_DB_FILE);
        let db = open_db_for(&path, existed)?;
        Ok(BroadcastStore {
            file: DbFile::new(db, path, open_db),
            reopens: AtomicU64::new(0),
        })
    }

    pub fn path(&self) -> &Path {
        &self.file.path
    }

    /// Whether a recovery of this node's own events was begun and not finished.
    pub fn own_recovery_pending(&self) -> Result<bool, StoreError> {
        let txn = self.begin_read()?;
        let meta = txn.open_table(BROADCAST_META).map_err(self.storage())?;
        Ok(meta.get(OWN_RECOVERY).map_err(self.storage())?.is_some())
    }

    /// Ends the recovery in a durable commit, which also makes every event
    /// fetched back durable.
    pub fn finish_own_recovery(&self) -> Result<(), StoreError> {
        let txn = self.write_txn(true)?;
        {
            let mut meta = txn.open_table(BROADCAST_META).map_err(self.storage())?;
            meta.remove(OWN_RECOVERY).map_err(self.storage())?;
        }
        txn.commit().map_err(self.storage())
    }

    /// The publish keys accepted at or after `since_ms` (none in a file from
    /// before keys were kept).
    pub fn publish_keys(&self, since_ms: u64) -> Result<Vec<PublishKey>, StoreError> {
        let txn = self.begin_read()?;
        let by_key = match txn.open_table(PUBLISH_KEYS) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(e) => return Err(self.storage()(e)),
        };
        let mut keys = Vec::new();
        for row in by_key.iter().map_err(self.storage())? {
            let (k, v) = row.map_err(self.storage())?;
            let (at_ms, digest, first, count) = v.value();
            if at_ms < since_ms {
                continue;
            }
            let Ok(digest) = <[u8; 32]>::try_from(digest) else {
                return Err(StoreError::Corrupt {
                    path: self.file.path.clone(),
                    what: format!("publish key {:?}", k.value()),
                    detail: format!("its digest has {} bytes, not 32", digest.len()),
                });
            };
            keys.push(PublishKey {
                key: k.value().to_string(),
                at_ms,
                digest,
                first,
                count,
            });
        }
        keys.sort_by_key(|k| k.at_ms);
        Ok(keys)
    }

    /// Times the file was opened again after an I/O error: the runs of events
    /// held may have gone back to the last durable commit since.
    pub fn reopens(&self) -> u64 {
        self.reopens.load(Ordering::Acquire)
    }

    fn reopened(&self, _db: &Database) -> Result<(), StoreError> {
        self.reopens.fetch_add(1, Ordering::AcqRel);
        Ok(())
    }

    fn storage<E: Into<redb::Error>>(&self) -> impl Fn(E) -> StoreError + '_ {
        self.file.storage()
    }

    fn write_txn(&self, durable: bool) -> Result<redb::WriteTransaction, StoreError> {
        self.file.write_txn(durable, &|db| self.reopened(db))
    }

    fn begin_read(&self) -> Result<redb::ReadTransaction, StoreError> {
        self.file.begin_read(&|db| self.reopened(db))
    }

    /// Every origin's run of events.
    pub fn runs(&self) -> Result<HashMap<String, OriginRun>, StoreError> {
        let txn = self.begin_read()?;
        let origins = txn.open_table(ORIGINS).map_err(self.storage())?;
        let mut out = HashMap::new();
        for row in origins.iter().map_err(self.storage())? {
            let (k, v) = row.map_err(self.storage())?;
            out.insert(k.value().to_string(), OriginRun::from_row(v.value()));
        }
        Ok(out)
    }

    /// The run of events held for `origin` (`None`: none ever).
    pub fn run(&self, origin: &str) -> Result<Option<OriginRun>, StoreError> {
        let txn = self.begin_read()?;
        let origins = txn.open_table(ORIGINS).map_err(self.storage())?;
        let run = origins
            .get(origin)
            .map_err(self.storage())?
            .map(|v| OriginRun::from_row(v.value()));
        Ok(run)
    }

    /// Appends events in one transaction. Each must be the next seq of its origin
    /// (an event at or below the run's end is a duplicate and skipped); a gap is a
    /// `Corrupt` error, since the caller orders events before storing them.
    /// `durable` fsyncs the transaction.
    pub fn append(&self, events: &[StoredEvent], durable: bool) -> Result<(), StoreError> {
        self.append_keyed(events, &[], 0, durable)
    }

    /// As [`append`](Self::append), recording in the same transaction the
    /// answers to publishes made under an Idempotency-Key, and dropping the
    /// keys accepted before `expire_before_ms`.
    pub fn append_keyed(
        &self,
        events: &[StoredEvent],
        keys: &[PublishKey],
        expire_before_ms: u64,
        durable: bool,
    ) -> Result<(), StoreError> {
        if events.is_empty() {
            return Ok(());
        }
        let txn = self.write_txn(durable)?;
        if !keys.is_empty() {
            let mut by_key = txn.open_table(PUBLISH_KEYS).map_err(self.storage())?;
            let mut by_age = txn
                .open_table(PUBLISH_KEYS_BY_AGE)
                .map_err(self.storage())?;
            let expired: Vec<(u64, String)> = by_age
                .range(..(expire_before_ms, ""))
                .map_err(self.storage())?
                .map(|row| row.map(|(k, _)| (k.value().0, k.value().1.to_string())))
                .collect::<Result<_, _>>()
                .map_err(self.storage())?;
            for (at, key) in expired {
                by_age.remove((at, key.as_str())).map_err(self.storage())?;
                // A key used again since has a later time: that row stays.
                let current = by_key
                    .get(key.as_str())
                    .map_err(self.storage())?
                    .map(|v| v.value().0);
                if current == Some(at) {
                    by_key.remove(key.as_str()).map_err(self.storage())?;
                }
            }
            for k in keys {
                let row = (k.at_ms, k.digest.as_slice(), k.first, k.count);
                let old = by_key
                    .insert(k.key.as_str(), row)
                    .map_err(self.storage())?
                    .map(|v| v.value().0);
                if let Some(old_at) = old {
                    by_age
                        .remove((old_at, k.key.as_str()))
                        .map_err(self.storage())?;
                }
                by_age
                    .insert((k.at_ms, k.key.as_str()), ())
                    .map_err(self.storage())?;
            }
        }
        {
            let mut table = txn.open_table(EVENTS).map_err(self.storage())?;
            let mut origins = txn.open_table(ORIGINS).map_err(self.storage())?;
            let mut runs: HashMap<&str, OriginRun> = HashMap::new();
            for ev in events {
                let run = match runs.get_mut(ev.origin.as_str()) {
                    Some(r) => r,
                    None => {
                        let r = origins
                            .get(ev.origin.as_str())
                            .map_err(self.storage())?
                            .map(|v| OriginRun::from_row(v.value()))
                            .unwrap_or_else(OriginRun::new);
                        runs.entry(ev.origin.as_str()).or_insert(r)
                    }
                };
                if ev.seq <= run.last {
                    continue;
                }
                if ev.seq != run.last + 1 {
                    return Err(StoreError::Corrupt {
                        path: self.file.path.clone(),
                        what: format!("broadcast event {}#{}", ev.origin, ev.seq),
                        detail: format!("appended after #{}: events must be contiguous", run.last),
                    });
                }
                table
                    .insert((ev.origin.as_str(), ev.seq), (ev.ts, ev.bytes.as_slice()))
                    .map_err(self.storage())?;
                run.last = ev.seq;
                run.count += 1;
                run.bytes += ev.bytes.len() as u64;
            }
            for (origin, r) in runs {
                origins.insert(origin, r.row()).map_err(self.storage())?;
            }
        }
        txn.commit().map_err(self.storage())?;
        Ok(())
    }

    /// The origin's events before `first` are gone for good: drop what is held
    /// below it and continue the run at `first` (after a hole of events that
    /// no peer holds any more).
    pub fn skip_to(&self, origin: &str, first: u64) -> Result<OriginRun, StoreError> {
        let txn = self.write_txn(true)?;
        let run = {
            let mut origins = txn.open_table(ORIGINS).map_err(self.storage())?;
            let mut run = origins
                .get(origin)
                .map_err(self.storage())?
                .map(|v| OriginRun::from_row(v.value()))
                .unwrap_or_else(OriginRun::new);
            let mut table = txn.open_table(EVENTS).map_err(self.storage())?;
            remove_front(
                &mut table,
                origin,
                &mut run,
                first.saturating_sub(1),
                u64::MAX,
                None,
            )
            .map_err(self.storage())?;
            // Below `first` the log keeps no record of what events were
            // about: those it never held, and those dropped here.
            let mut from = txn.open_table(MISSED_FROM).map_err(self.storage())?;
            let known_from = from
                .get(origin)
                .map_err(self.storage())?
                .map_or(1, |v| v.value());
            if known_from < first {
                from.insert(origin, first).map_err(self.storage())?;
            }
            if run.last + 1 < first {
                run.last = first - 1;
            }
            run.first = run.first.max(first);
            origins.insert(origin, run.row()).map_err(self.storage())?;
            run
        };
        txn.commit().map_err(self.storage())?;
        Ok(run)
    }

    /// Events of `origin` from seq `from` on, in order, as (seq, ts, bytes), up to `max_events` and
    /// about `max_bytes` (at least one event is returned if any is held).
    pub fn range(
        &self,
        origin: &str,
        from: u64,
        max_events: usize,
        max_bytes: usize,
    ) -> Result<Vec<(u64, u64, Vec<u8>)>, StoreError> {
        let txn = self.begin_read()?;
        let table = txn.open_table(EVENTS).map_err(self.storage())?;
        let mut out = Vec::new();
        let mut size = 0usize;
        for row in table
            .range((origin, from)..=(origin, u64::MAX))
            .map_err(self.storage())?
        {
            let (k, v) = row.map_err(self.storage())?;
            let (ts, bytes) = v.value();
            if !out.is_empty() && (out.len() >= max_events || size + bytes.len() > max_bytes) {
                break;
            }
            size += bytes.len();
            out.push((k.value().1, ts, bytes.to_vec()));
        }
        Ok(out)
    }

    /// Applies retention: events older than the age limit go, then the oldest
    /// events of the largest origins until the count and size limits hold.
    /// What each removed event was about (`missed_label` of its bytes) is kept
    /// for [`missed`](Self::missed). Returns how many events were removed.
    pub fn prune(
        &self,
        now_ms: u64,
        limits: Retention,
        missed_label: &dyn Fn(&[u8]) -> Option<Vec<u8>>,
    ) -> Result<u64, StoreError> {
        let runs = self.runs()?;
        let oldest_allowed = now_ms.saturating_sub(limits.max_age_ms);
        let txn = self.write_txn(false)?;
        let mut removed = 0;
        {
            let mut table = txn.open_table(EVENTS).map_err(self.storage())?;
            let mut origins = txn.open_table(ORIGINS).map_err(self.storage())?;
            let mut runs: Vec<(String, OriginRun)> = runs.into_iter().collect();
            let mut labels: HashMap<String, HashMap<Vec<u8>, u64>> = HashMap::new();
            for (origin, run) in runs.iter_mut() {
                let before = run.count;
                let sink = (missed_label, labels.entry(origin.clone()).or_default());
                remove_front(
                    &mut table,
                    origin,
                    run,
                    u64::MAX,
                    oldest_allowed,
                    Some(sink),
                )
                .map_err(self.storage())?;
                removed += before - run.count;
            }
            loop {
                let count: u64 = runs.iter().map(|(_, r)| r.count).sum();
                let bytes: u64 = runs.iter().map(|(_, r)| r.bytes).sum();
                if count <= limits.max_events && bytes <= limits.max_bytes {
                    break;
                }
                let Some((origin, run)) = runs.iter_mut().max_by_key(|(_, r)| r.bytes) else {
                    break;
                };
                if run.count == 0 {
                    break;
                }
                // A tenth of the excess at a time keeps the origins' shares even.
                let avg = (run.bytes / run.count).max(1);
                let excess = count
                    .saturating_sub(limits.max_events)
                    .max(bytes.saturating_sub(limits.max_bytes) / avg);
                let step = excess.div_ceil(10).clamp(1, run.count);
                let upto = run.first + step - 1;
                let before = run.count;
                let sink = (missed_label, labels.entry(origin.clone()).or_default());
                remove_front(&mut table, origin, run, upto, u64::MAX, Some(sink))
                    .map_err(self.storage())?;
                if before == run.count {
                    break;
                }
                removed += before - run.count;
            }
            for (origin, r) in &runs {
                origins
                    .insert(origin.as_str(), r.row())
                    .map_err(self.storage())?;
            }
            for (origin, labels) in labels {
                if !labels.is_empty() {
                    self.remember_missed(&txn, &origin, labels)?;
                }
            }
        }
        txn.commit().map_err(self.storage())?;
        Ok(removed)
    }

    /// Adds what removed events of `origin` were about (label → highest seq),
    /// keeping at most `MAX_MISSED_PER_ORIGIN`: the least recent go, and the
    /// seqs up to theirs count as unknown from then on.
    fn remember_missed(
        &self,
        txn: &redb::WriteTransaction,
        origin: &str,
        labels: HashMap<Vec<u8>, u64>,
    ) -> Result<(), StoreError> {
        let mut missed = txn.open_table(MISSED).map_err(self.storage())?;
        for (label, seq) in labels {
            let held = missed
                .get((origin, label.as_slice()))
                .map_err(self.storage())?
                .map_or(0, |v| v.value());
            if seq > held {
                missed
                    .insert((origin, label.as_slice()), seq)
                    .map_err(self.storage())?;
            }
        }
        let mut all = missed_of(&missed, origin).map_err(self.storage())?;
        if all.len() <= MAX_MISSED_PER_ORIGIN {
            return Ok(());
        }
        all.sort_unstable();
        let excess = all.len() - MAX_MISSED_PER_ORIGIN;
        let mut forgotten_upto = 0;
        for (seq, label) in &all[..excess] {
            missed
                .remove((origin, label.as_slice()))
                .map_err(self.storage())?;
            forgotten_upto = forgotten_upto.max(*seq);
        }
        let mut from = txn.open_table(MISSED_FROM).map_err(self.storage())?;
        let known_from = from
            .get(origin)
            .map_err(self.storage())?
            .map_or(1, |v| v.value());
        if known_from <= forgotten_upto {
            from.insert(origin, forgotten_upto + 1)
                .map_err(self.storage())?;
        }
        Ok(())
    }

    /// What the events of `origin` after `seen` up to `upto` were about, for a
    /// subscriber that saw everything up to `seen` and that this log no longer
    /// holds. Known only when retention (or a hole skipped) dropped all of them
    /// from this log: events lost otherwise (a storage failure took back the
    /// end of the run) are `Unknown`.
    pub fn missed(&self, origin: &str, seen: u64, upto: u64) -> Result<Missed, StoreError> {
        // A prune between this read and the labels' only adds labels.
        if self.run(origin)?.is_none_or(|r| upto >= r.first) {
            return Ok(Missed::Unknown);
        }
        let txn = self.begin_read()?;
        // Files from before this table have no record of what was dropped.
        let from = match txn.open_table(MISSED_FROM) {
            Ok(t) => t
                .get(origin)
                .map_err(self.storage())?
                .map_or(1, |v| v.value()),
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Missed::Unknown),
            Err(e) => return Err(self.storage()(e)),
        };
        if seen + 1 < from {
            return Ok(Missed::Unknown);
        }
        let missed = match txn.open_table(MISSED) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Missed::Unknown),
            Err(e) => return Err(self.storage()(e)),
        };
        let labels = missed_of(&missed, origin)
            .map_err(self.storage())?
            .into_iter()
            .filter(|(seq, _)| *seq > seen)
            .map(|(_, label)| label)
            .collect();
        Ok(Missed::Labels(labels))
    }

    /// Every origin's run, after opening the file again if an I/O error closed
    /// it (a write transaction is begun for that: a read may still be served
    /// from the old handle).
    pub fn reload_runs(&self) -> Result<HashMap<String, OriginRun>, StoreError> {
        drop(self.write_txn(false)?);
        self.runs()
    }

    /// Makes every earlier non-durable append durable.
    pub fn sync(&self) -> Result<(), StoreError> {
        let txn = self.write_txn(true)?;
        txn.commit().map_err(self.storage())?;
        Ok(())
    }
}

/// What `MISSED` holds for `origin`: (highest seq, label), in label order.
fn missed_of(
    table: &impl ReadableTable<(&'static str, &'static [u8]), u64>,
    origin: &str,
) -> Result<Vec<(u64, Vec<u8>)>, redb::StorageError> {
    let mut out = Vec::new();
    for row in table.range((origin, [].as_slice())..)? {
        let (k, v) = row?;
        if k.value().0 != origin {
            break;
        }
        out.push((v.value(), k.value().1.to_vec()));
    }
    Ok(out)
}

/// Where `remove_front` notes what removed events were about: the labelling
/// function and label → highest seq.
type MissedSink<'a> = (
    &'a dyn Fn(&[u8]) -> Option<Vec<u8>>,
    &'a mut HashMap<Vec<u8>, u64>,
);

/// Removes the origin's events from the front of its run while their seq is at
/// most `upto_seq` and their timestamp below `before_ts`.
fn remove_front(
    table: &mut redb::Table<(&'static str, u64), (u64, &'static [u8])>,
    origin: &str,
    run: &mut OriginRun,
    upto_seq: u64,
    before_ts: u64,
    mut missed: Option<MissedSink>,
) -> Result<(), redb::StorageError> {
    while run.count > 0 && run.first <= upto_seq {
        let Some(v) = table.get((origin, run.first))? else {
            // Not held (cannot happen in a consistent file): step over it.
            run.first += 1;
            continue;
        };
        let (ts, bytes) = v.value();
        let len = bytes.len() as u64;
        if ts >= before_ts {
            break;
        }
        if let Some((label_of, labels)) = missed.as_mut() {
            if let Some(label) = label_of(bytes) {
                labels.insert(label, run.first);
            }
        }
        drop(v);
        table.remove((origin, run.first))?;
        run.first += 1;
        run.count -= 1;
        run.bytes = run.bytes.saturating_sub(len);
    }
    if run.count == 0 && run.first <= run.last {
        run.first = run.last + 1;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(origin: &str, seq: u64, ts: u64) -> StoredEvent {
        StoredEvent {
            origin: origin.into(),
            seq,
            ts,
            bytes: vec![seq as u8; 10],
        }
    }

    fn key(key: &str, at_ms: u64, first: u64, count: u64) -> PublishKey {
        PublishKey {
            key: key.into(),
            at_ms,
            digest: [at_ms as u8; 32],
            first,
            count,
        }
    }

    #[test]
    fn publish_keys_are_kept_with_their_events_and_expire() {
        let dir = tempfile::tempdir().unwrap();
        let s = BroadcastStore::open(dir.path()).unwrap();
        assert!(s.publish_keys(0).unwrap().is_empty());
        s.append_keyed(
            &[ev("me", 1, 1), ev("me", 2, 1)],
            &[key("k1", 100, 1, 2)],
            0,
            true,
        )
        .unwrap();
        s.append_keyed(&[ev("me", 3, 2)], &[key("k2", 200, 3, 1)], 0, true)
            .unwrap();
        // A failed append keeps no key.
        assert!(s
            .append_keyed(&[ev("me", 9, 3)], &[key("k3", 300, 9, 1)], 0, true)
            .is_err());
        drop(s);
        let s = BroadcastStore::open(dir.path()).unwrap();
        assert_eq!(
            s.publish_keys(0).unwrap(),
            vec![key("k1", 100, 1, 2), key("k2", 200, 3, 1)]
        );
        assert_eq!(s.publish_keys(150).unwrap(), vec![key("k2", 200, 3, 1)]);
        // k1 expires with the next keyed append past its time; k2 is used
        // again (a key reused after it was forgotten) and keeps its new row.
        s.append_keyed(&[ev("me", 4, 4)], &[key("k2", 400, 4, 1)], 250, true)
            .unwrap();
        s.append_keyed(&[ev("me", 5, 5)], &[key("k4", 500, 5, 1)], 300, true)
            .unwrap();
        assert_eq!(
            s.publish_keys(0).unwrap(),
            vec![key("k2", 400, 4, 1), key("k4", 500, 5, 1)]
        );
    }

    #[test]
    fn appends_in_order_skip_duplicates_and_refuse_gaps() {
        let dir = tempfile::tempdir().unwrap();
        let s = BroadcastStore::open(dir.path()).unwrap();
        s.append(&[ev("a", 1, 1), ev("a", 2, 2), ev("b", 1, 1)], true)
            .unwrap();
        s.append(&[ev("a", 2, 2), ev("a", 3, 3)], false).unwrap();
        assert!(matches!(
            s.append(&[ev("a", 5, 5)], false),
            Err(StoreError::Corrupt { .. })
        ));
        drop(s);
        let s = BroadcastStore::open(dir.path()).unwrap();
        let runs = s.runs().unwrap();
        assert_eq!(
            runs["a"],
            OriginRun {
                first: 1,
                last: 3,
                count: 3,
                bytes: 30
            }
        );
        assert_eq!(runs["b"].last, 1);
        let got: Vec<u64> = s
            .range("a", 2, 10, 1 << 20)
            .unwrap()
            .iter()
            .map(|e| e.0)
            .collect();
        assert_eq!(got, vec![2, 3]);
        assert_eq!(s.range("a", 1, 10, 15).unwrap().len(), 1, "byte bound");
    }

    /// A store holding events 1..=`n` of origin "a" (ts = seq).
    fn store_with_events(n: u64) -> (tempfile::TempDir, BroadcastStore) {
        let dir = tempfile::tempdir().unwrap();
        let s = BroadcastStore::open(dir.path()).unwrap();
        let events: Vec<_> = (1..=n).map(|i| ev("a", i, i)).collect();
        s.append(&events, false).unwrap();
        (dir, s)
    }

    fn retention(max_events: u64, max_age_ms: u64) -> Retention {
        Retention {
            max_events,
            max_bytes: 1 << 30,
            max_age_ms,
        }
    }

    fn no_label(_: &[u8]) -> Option<Vec<u8>> {
        None
    }

    /// Labels an event by its first byte (the tests' events are `[seq; 10]`).
    fn label_by_seq_mod_3(bytes: &[u8]) -> Option<Vec<u8>> {
        Some(vec![bytes[0] % 3])
    }

    fn labels(m: Missed) -> Vec<u8> {
        match m {
            Missed::Unknown => panic!("unknown"),
            Missed::Labels(l) => l.into_iter().map(|l| l[0]).collect(),
        }
    }

    #[test]
    fn what_retention_dropped_is_remembered_for_subscribers_that_missed_it() {
        let (dir, s) = store_with_events(10);
        // Nothing dropped yet: a subscriber anywhere missed nothing.
        assert_eq!(labels(s.missed("a", 0, 0).unwrap()), Vec::<u8>::new());
        let limits = retention(1000, 1000);
        // Seqs 1..=5 go (ts < 6): labels 1, 2, 0, 1, 2 → highest seqs 3 (0), 4 (1), 5 (2).
        assert_eq!(s.prune(1006, limits, &label_by_seq_mod_3).unwrap(), 5);
        assert_eq!(labels(s.missed("a", 0, 5).unwrap()), vec![0, 1, 2]);
        assert_eq!(labels(s.missed("a", 3, 5).unwrap()), vec![1, 2]);
        assert_eq!(labels(s.missed("a", 4, 5).unwrap()), vec![2]);
        assert_eq!(labels(s.missed("a", 5, 5).unwrap()), Vec::<u8>::new());
        // What the log still holds was not dropped: lost otherwise, if missing.
        assert_eq!(s.missed("a", 3, 6).unwrap(), Missed::Unknown);
        drop(s);
        let s = BroadcastStore::open(dir.path()).unwrap();
        assert_eq!(
            labels(s.missed("a", 3, 5).unwrap()),
            vec![1, 2],
            "kept on disk"
        );
        // A hole the log never held: below it nobody knows what was missed.
        s.skip_to("a", 20).unwrap();
        assert_eq!(s.missed("a", 5, 19).unwrap(), Missed::Unknown);
        assert_eq!(labels(s.missed("a", 19, 19).unwrap()), Vec::<u8>::new());
        // An origin this log never held: nothing is known of it.
        assert_eq!(s.missed("b", 0, 3).unwrap(), Missed::Unknown);
    }

    #[test]
    fn a_file_from_before_the_record_of_dropped_events_knows_nothing_below_its_runs() {
        let (dir, s) = store_with_events(10);
        let limits = retention(1000, 1000);
        s.prune(1006, limits, &label_by_seq_mod_3).unwrap();
        drop(s);
        // As an older kiln left it: no record of what was dropped.
        {
            let db = Database::open(dir.path().join(BROADCAST_DB_FILE)).unwrap();
            let txn = db.begin_write().unwrap();
            txn.delete_table(MISSED).unwrap();
            txn.delete_table(MISSED_FROM).unwrap();
            txn.commit().unwrap();
        }
        let s = BroadcastStore::open(dir.path()).unwrap();
        assert_eq!(s.missed("a", 0, 5).unwrap(), Missed::Unknown);
        assert_eq!(labels(s.missed("a", 5, 5).unwrap()), Vec::<u8>::new());
    }

    #[test]
    fn what_was_missed_is_bounded_per_origin_and_forgetting_makes_it_unknown() {
        let dir = tempfile::tempdir().unwrap();
        let s = BroadcastStore::open(dir.path()).unwrap();
        let n = MAX_MISSED_PER_ORIGIN as u64 + 10;
        let events: Vec<_> = (1..=n).map(|i| ev("a", i, i)).collect();
        s.append(&events, false).unwrap();
        let limits = retention(0, u64::MAX);
        // Every event its own label: events are dropped in seq order, so the
        // n-th label asked for is that of seq n.
        let counter = std::cell::Cell::new(0u64);
        let unique = |_: &[u8]| -> Option<Vec<u8>> {
            counter.set(counter.get() + 1);
            Some(counter.get().to_be_bytes().to_vec())
        };
        while s.runs().unwrap()["a"].count > 0 {
            s.prune(0, limits, &unique).unwrap();
        }
        assert_eq!(
            s.missed("a", 9, n).unwrap(),
            Missed::Unknown,
            "the 10 oldest were forgotten"
        );
        match s.missed("a", 10, n).unwrap() {
            Missed::Labels(l) => assert_eq!(l.len(), MAX_MISSED_PER_ORIGIN),
            Missed::Unknown => panic!("known from seq 11"),
        }
    }

    #[test]
    fn retention_by_age_count_and_skip() {
        let (_dir, s) = store_with_events(100);
        let limits = retention(1000, 50);
        // now = 100: events with ts < 50 are too old.
        assert_eq!(s.prune(100, limits, &no_label).unwrap(), 49);
        assert_eq!(s.runs().unwrap()["a"].first, 50);
        let limits = retention(20, 1000);
        s.prune(100, limits, &no_label).unwrap();
        let run = s.runs().unwrap()["a"];
        assert_eq!(run.count, 20);
        assert_eq!((run.first, run.last), (81, 100));
        let run = s.skip_to("a", 150).unwrap();
        assert_eq!((run.first, run.last, run.count), (150, 149, 0));
        s.append(&[ev("a", 150, 200)], true).unwrap();
        assert_eq!(s.runs().unwrap()["a"].last, 150);
    }
}
