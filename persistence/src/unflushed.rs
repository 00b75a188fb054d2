//! Applied key/value state not yet written to `stripe-state.redb`.
//!
//! Applying committed entries needs no transaction of its own: the log holds
//! them durably, and a crash applies them again from there. So applies change
//! memory only ([`Pending`], read through by every reader of the state), and
//! the store writes what gathered in one transaction now and then ("flush",
//! as etcd's backend commits its batch every 100 ms). A write's reply then
//! waits for no commit of the state, and a key written many times between
//! flushes costs one B-tree update.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::path::Path;
use std::sync::Arc;

use redb::ReadOnlyTable;

use crate::schema::*;
use crate::stripe_store::KvTxn;
use crate::StoreError;

/// A key's (version, value), or `None`: deleted.
pub(crate) type KvChange = Option<(u64, Vec<u8>)>;

/// What applied entries changed, relative to the tables in the file.
#[derive(Debug, Default, Clone)]
pub(crate) struct Pending {
    /// (map, key) → (version, value), or `None`: deleted.
    pub kv: BTreeMap<(String, String), KvChange>,
    /// Request id → record, or `None`: dropped.
    pub requests: BTreeMap<String, Option<Vec<u8>>>,
    /// (remember until, request id) → present (`false`: dropped).
    pub expiry: BTreeMap<(u64, String), bool>,
    /// Change events added to the outbox.
    pub changes: BTreeMap<u64, Vec<u8>>,
    /// Index of the last entry applied (0: nothing pending).
    pub applied: u64,
    /// Index of the last entry the state under these changes covers: a flush
    /// writes them only over a file that holds exactly that.
    pub base: u64,
    /// The change seq the outbox reached, if entries moved it.
    pub last_change: Option<u64>,
    /// Entries applied, and their size.
    pub entries: u64,
    pub bytes: u64,
}

impl Pending {
    pub fn is_empty(&self) -> bool {
        self.applied == 0
    }

    /// Adds the changes of `newer`, applied after these.
    pub fn absorb(&mut self, newer: Pending) {
        self.kv.extend(newer.kv);
        self.requests.extend(newer.requests);
        self.expiry.extend(newer.expiry);
        self.changes.extend(newer.changes);
        if self.is_empty() {
            self.base = newer.base;
        }
        self.applied = self.applied.max(newer.applied);
        self.last_change = newer.last_change.or(self.last_change);
        self.entries += newer.entries;
        self.bytes += newer.bytes;
    }
}

/// Pending changes: the ones applies add to, and the ones a flush is writing.
#[derive(Debug, Default)]
pub(crate) struct Unflushed {
    pub newest: Pending,
    /// Being written (or failed to be): readers still see it until the
    /// transaction that writes it has committed.
    pub flushing: Option<Arc<Pending>>,
}

impl Unflushed {
    pub fn kv(&self, map: &str, key: &str) -> Option<KvChange> {
        self.newest_kv(&(map.to_string(), key.to_string())).cloned()
    }

    /// As [`kv`](Self::kv), the version alone (`Some(None)`: deleted).
    pub fn version(&self, k: &(String, String)) -> Option<Option<u64>> {
        self.newest_kv(k)
            .map(|v| v.as_ref().map(|(version, _)| *version))
    }

    fn newest_kv(&self, k: &(String, String)) -> Option<&KvChange> {
        self.layers().rev().find_map(|l| l.kv.get(k))
    }

    pub fn request(&self, id: &str) -> Option<Option<Vec<u8>>> {
        self.layers()
            .rev()
            .find_map(|l| l.requests.get(id))
            .cloned()
    }

    /// Index of the last entry applied, if that is newer than the file.
    pub fn applied(&self) -> Option<u64> {
        if !self.newest.is_empty() {
            return Some(self.newest.applied);
        }
        self.flushing.as_ref().map(|f| f.applied)
    }

    pub fn last_change(&self) -> Option<u64> {
        self.newest
            .last_change
            .or_else(|| self.flushing.as_ref().and_then(|f| f.last_change))
    }

    /// Entries applied and not yet flushed.
    pub fn entries(&self) -> u64 {
        self.newest.entries + self.flushing.as_ref().map_or(0, |f| f.entries)
    }

    /// Their size, as log entries.
    pub fn bytes(&self) -> u64 {
        self.newest.bytes + self.flushing.as_ref().map_or(0, |f| f.bytes)
    }

    /// The layers of pending changes, oldest first: a later one overrides.
    fn layers(&self) -> impl DoubleEndedIterator<Item = &Pending> {
        self.flushing.as_deref().into_iter().chain([&self.newest])
    }

    /// Pending keys of `map` from `start` on, in order (present or deleted).
    pub fn keys_from(&self, map: &str, start: &str) -> BTreeMap<String, bool> {
        let mut out = BTreeMap::new();
        let from = (map.to_string(), start.to_string());
        for layer in self.layers() {
            for ((m, k), v) in layer.kv.range(from.clone()..) {
                if m != map {
                    break;
                }
                out.insert(k.clone(), v.is_some());
            }
        }
        out
    }

    /// Pending expiry entries before `before_ms`, in order (present or dropped).
    pub fn expiry_before(&self, before_ms: u64) -> BTreeMap<(u64, String), bool> {
        let mut out = BTreeMap::new();
        for layer in self.layers() {
            for (k, present) in layer.expiry.range(..(before_ms, String::new())) {
                out.insert(k.clone(), *present);
            }
        }
        out
    }

    /// Pending change events from `from` on.
    pub fn changes_from(&self, from: u64) -> BTreeMap<u64, Vec<u8>> {
        let mut out = BTreeMap::new();
        for layer in self.layers() {
            out.extend(layer.changes.range(from..).map(|(k, v)| (*k, v.clone())));
        }
        out
    }
}

/// The state as a batch of committed entries sees it: pending changes over a
/// read transaction of the file. What the batch does goes to `batch`, which
/// joins the pending changes only once every entry of it applied.
pub(crate) struct OverlayKv<'a> {
    pub batch: Pending,
    pub unflushed: &'a Unflushed,
    pub kv: ReadOnlyTable<(&'static str, &'static str), (u64, &'static [u8])>,
    pub requests: ReadOnlyTable<&'static str, &'static [u8]>,
    pub expiry: ReadOnlyTable<(u64, &'static str), ()>,
    pub last_change: u64,
    pub path: &'a Path,
}

impl OverlayKv<'_> {
    fn err<E: Into<redb::Error>>(&self) -> impl Fn(E) -> StoreError + '_ {
        move |e| StoreError::Storage {
            path: self.path.to_path_buf(),
            source: e.into(),
        }
    }
}

impl KvTxn for OverlayKv<'_> {
    fn version(&self, map: &str, key: &str) -> Result<Option<u64>, StoreError> {
        let k = (map.to_string(), key.to_string());
        if let Some(v) = self.batch.kv.get(&k) {
            return Ok(v.as_ref().map(|(version, _)| *version));
        }
        if let Some(v) = self.unflushed.version(&k) {
            return Ok(v);
        }
        Ok(self
            .kv
            .get((map, key))
            .map_err(self.err())?
            .map(|v| v.value().0))
    }

    fn put(&mut self, map: &str, key: &str, version: u64, value: &[u8]) -> Result<(), StoreError> {
        self.batch.kv.insert(
            (map.to_string(), key.to_string()),
            Some((version, value.to_vec())),
        );
        Ok(())
    }

    fn delete(&mut self, map: &str, key: &str) -> Result<(), StoreError> {
        self.batch
            .kv
            .insert((map.to_string(), key.to_string()), None);
        Ok(())
    }

    fn request(&self, id: &str) -> Result<Option<Vec<u8>>, StoreError> {
        if let Some(r) = self.batch.requests.get(id) {
            return Ok(r.clone());
        }
        if let Some(r) = self.unflushed.request(id) {
            return Ok(r);
        }
        Ok(self
            .requests
            .get(id)
            .map_err(self.err())?
            .map(|v| v.value().to_vec()))
    }

    fn record_request(
        &mut self,
        id: &str,
        record: &[u8],
        remember_until_ms: u64,
        replaces: Option<u64>,
    ) -> Result<(), StoreError> {
        let newest = &mut self.batch;
        if let Some(old) = replaces {
            newest.expiry.insert((old, id.to_string()), false);
        }
        newest
            .requests
            .insert(id.to_string(), Some(record.to_vec()));
        newest
            .expiry
            .insert((remember_until_ms, id.to_string()), true);
        Ok(())
    }

    /// The oldest `limit` records of the file and the pending changes together,
    /// as one table would give them: every member drops the same ones.
    fn prune_requests(&mut self, before_ms: u64, limit: usize) -> Result<u64, StoreError> {
        let mut pending = self.unflushed.expiry_before(before_ms);
        for (k, present) in self.batch.expiry.range(..(before_ms, String::new())) {
            pending.insert(k.clone(), *present);
        }
        // Pending changes decide for the entries they name; at most that many
        // entries of the file are passed over.
        let mut filed = Vec::new();
        for row in self
            .expiry
            .range(..(before_ms, ""))
            .map_err(self.err())?
            .take(limit + pending.len())
        {
            let (k, _) = row.map_err(self.err())?;
            let (until, id) = k.value();
            let k = (until, id.to_string());
            if !pending.contains_key(&k) {
                filed.push(k);
            }
        }
        let mut filed = filed.into_iter().peekable();
        let mut kept = pending
            .into_iter()
            .filter_map(|(k, present)| present.then_some(k))
            .peekable();
        let mut gone = Vec::new();
        while gone.len() < limit {
            let next = match (filed.peek(), kept.peek()) {
                (Some(f), Some(p)) if f < p => filed.next(),
                (_, Some(_)) => kept.next(),
                (Some(_), None) => filed.next(),
                (None, None) => break,
            };
            gone.extend(next);
        }
        let newest = &mut self.batch;
        for (until, id) in &gone {
            newest.expiry.insert((*until, id.clone()), false);
            newest.requests.insert(id.clone(), None);
        }
        Ok(gone.len() as u64)
    }

    fn set_request_row(&mut self, id: &str, row: Option<&[u8]>) -> Result<(), StoreError> {
        self.batch
            .requests
            .insert(id.to_string(), row.map(<[u8]>::to_vec));
        Ok(())
    }

    fn request_rows(&self, from: &str, below: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let mut rows: BTreeMap<String, Option<Vec<u8>>> = BTreeMap::new();
        for row in self.requests.range(from..below).map_err(self.err())? {
            let (id, record) = row.map_err(self.err())?;
            rows.insert(id.value().to_string(), Some(record.value().to_vec()));
        }
        let bounds = (Bound::Included(from), Bound::Excluded(below));
        for layer in self.unflushed.layers().chain([&self.batch]) {
            for (id, row) in layer.requests.range::<str, _>(bounds) {
                rows.insert(id.clone(), row.clone());
            }
        }
        Ok(rows
            .into_iter()
            .filter_map(|(id, row)| row.map(|r| (id, r)))
            .collect())
    }

    fn record_change(&mut self, change: &[u8]) -> Result<u64, StoreError> {
        let seq = self.last_change + 1;
        self.batch.changes.insert(seq, change.to_vec());
        self.last_change = seq;
        Ok(seq)
    }

    fn raise_changes_to(&mut self, seq: u64) -> Result<(), StoreError> {
        self.last_change = self.last_change.max(seq);
        Ok(())
    }
}

/// Writes `pending` into the tables of `txn`, but for change events up to
/// `changes_pruned` (the outbox dropped them already).
pub(crate) fn write_pending(
    txn: &redb::WriteTransaction,
    pending: &Pending,
    changes_pruned: u64,
    path: &Path,
) -> Result<(), StoreError> {
    let err = |e: redb::Error| StoreError::Storage {
        path: path.to_path_buf(),
        source: e,
    };
    let mut kv = txn.open_table(KV).map_err(|e| err(e.into()))?;
    for ((map, key), v) in &pending.kv {
        match v {
            Some((version, value)) => {
                kv.insert((map.as_str(), key.as_str()), (*version, value.as_slice()))
                    .map_err(|e| err(e.into()))?;
            }
            None => {
                kv.remove((map.as_str(), key.as_str()))
                    .map_err(|e| err(e.into()))?;
            }
        }
    }
    let mut requests = txn.open_table(REQUESTS).map_err(|e| err(e.into()))?;
    for (id, record) in &pending.requests {
        match record {
            Some(r) => {
                requests
                    .insert(id.as_str(), r.as_slice())
                    .map_err(|e| err(e.into()))?;
            }
            None => {
                requests.remove(id.as_str()).map_err(|e| err(e.into()))?;
            }
        }
    }
    let mut expiry = txn.open_table(REQUEST_EXPIRY).map_err(|e| err(e.into()))?;
    for ((until, id), present) in &pending.expiry {
        if *present {
            expiry
                .insert((*until, id.as_str()), ())
                .map_err(|e| err(e.into()))?;
        } else {
            expiry
                .remove((*until, id.as_str()))
                .map_err(|e| err(e.into()))?;
        }
    }
    let mut changes = txn.open_table(CHANGES).map_err(|e| err(e.into()))?;
    for (seq, change) in pending.changes.range(changes_pruned + 1..) {
        changes
            .insert(*seq, change.as_slice())
            .map_err(|e| err(e.into()))?;
    }
    let mut meta = txn
        .open_table(STRIPE_STATE_META)
        .map_err(|e| err(e.into()))?;
    if let Some(c) = pending.last_change {
        meta.insert(STRIPE_CHANGES, c.to_le_bytes().as_slice())
            .map_err(|e| err(e.into()))?;
    }
    meta.insert(STRIPE_APPLIED, pending.applied.to_le_bytes().as_slice())
        .map_err(|e| err(e.into()))?;
    Ok(())
}
