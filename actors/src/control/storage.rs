//! openraft's log storage and state machine for the control plane, over
//! `control.redb`. Every write is fsynced on a blocking thread, so the runtime
//! that drives Raft never waits on a disk. The state machine lives in memory
//! (it is small: nodes, stripes, slots) behind a lock the rest of the node reads;
//! snapshots of it are stored, and openraft re-applies the committed log after a
//! restart.

// openraft's storage traits fix the (large) error type; boxing it is not ours to do.
#![allow(clippy::result_large_err)]

use std::fmt::Debug;
use std::io::Cursor;
use std::ops::{Bound, RangeBounds};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use kiln_persistence::schema::{
    CONTROL_COMMITTED, CONTROL_LAST_PURGED, CONTROL_SNAPSHOT, CONTROL_VOTE,
};
use kiln_persistence::{ControlStore, StoreError};
use openraft::storage::{LogFlushed, RaftLogStorage, RaftStateMachine};
use openraft::{
    AnyError, Entry, EntryPayload, ErrorSubject, ErrorVerb, LogId, LogState, RaftLogReader,
    RaftSnapshotBuilder, Snapshot, SnapshotMeta, StorageError, StorageIOError, StoredMembership,
    Vote,
};
use serde::{Deserialize, Serialize};

use super::state::{ControlOutcome, ControlState};
use super::types::{ControlNode, ControlTypes, NodeId};
use super::wire::{from_cbor, to_cbor};

/// Largest record read back from `control.redb` (a snapshot is the largest).
pub(super) const MAX_RECORD: usize = 64 * 1024 * 1024;
/// Largest control-plane snapshot taken from a peer.
pub(super) const MAX_SNAPSHOT_BYTES: usize = MAX_RECORD;

/// What the control plane has applied: shared with the node, which reads it for
/// placement, routing and status.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Applied {
    pub last_applied: Option<LogId<NodeId>>,
    pub membership: StoredMembership<NodeId, ControlNode>,
    pub state: ControlState,
}

pub type SharedApplied = Arc<RwLock<Applied>>;

/// The last log id the stored snapshot covers: a purge of the log waits for it.
type SnapshotCovers = Arc<tokio::sync::watch::Sender<Option<LogId<NodeId>>>>;

/// How long a purge waits for a snapshot being installed to be stored.
const PURGE_WAIT: Duration = Duration::from_secs(60);

#[derive(Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta<NodeId, ControlNode>,
    data: Vec<u8>,
}

fn io_error(
    subject: ErrorSubject<NodeId>,
    verb: ErrorVerb,
    e: impl ToString,
) -> StorageError<NodeId> {
    StorageError::IO {
        source: StorageIOError::new(subject, verb, AnyError::error(e.to_string())),
    }
}

fn read_err(e: impl ToString) -> StorageError<NodeId> {
    io_error(ErrorSubject::Store, ErrorVerb::Read, e)
}

fn write_err(e: impl ToString) -> StorageError<NodeId> {
    io_error(ErrorSubject::Store, ErrorVerb::Write, e)
}

/// Runs a blocking store operation off the async runtime.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, String> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(e) => Err(format!("storage task failed: {e}")),
    }
}

/// The Raft log, vote and committed id.
#[derive(Clone)]
pub struct LogStore {
    store: Arc<ControlStore>,
    snapshot_covers: SnapshotCovers,
}

impl LogStore {
    /// The log of `state_machine`'s store (whose stored snapshots bound purges).
    pub fn new(store: Arc<ControlStore>, state_machine: &StateMachine) -> Self {
        LogStore {
            store,
            snapshot_covers: state_machine.snapshot_covers.clone(),
        }
    }

    fn meta<T: serde::de::DeserializeOwned>(
        &self,
        key: &str,
    ) -> Result<Option<T>, StorageError<NodeId>> {
        match self.store.get_meta(key).map_err(read_err)? {
            None => Ok(None),
            Some(bytes) => from_cbor(&bytes, MAX_RECORD).map(Some).map_err(|e| {
                read_err(format!(
                    "{}: corrupt {key}: {e}",
                    self.store.path().display()
                ))
            }),
        }
    }
}

impl RaftLogReader<ControlTypes> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<ControlTypes>>, StorageError<NodeId>> {
        let start = match range.start_bound() {
            Bound::Included(s) => *s,
            Bound::Excluded(s) => s.saturating_add(1),
            Bound::Unbounded => 0,
        };
        let end = match range.end_bound() {
            Bound::Included(e) => e.saturating_add(1),
            Bound::Excluded(e) => *e,
            Bound::Unbounded => u64::MAX,
        };
        let rows = self.store.range(start, end).map_err(read_err)?;
        rows.into_iter()
            .map(|(index, bytes)| {
                from_cbor(&bytes, MAX_RECORD).map_err(|e| {
                    io_error(
                        ErrorSubject::Log(LogId::new(Default::default(), index)),
                        ErrorVerb::Read,
                        format!(
                            "{}: corrupt log entry {index}: {e}",
                            self.store.path().display()
                        ),
                    )
                })
            })
            .collect()
    }
}

impl RaftLogStorage<ControlTypes> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<ControlTypes>, StorageError<NodeId>> {
        let last_purged: Option<LogId<NodeId>> = self.meta(CONTROL_LAST_PURGED)?;
        let last = match self.store.last().map_err(read_err)? {
            None => last_purged,
            Some((_, bytes)) => {
                let entry: Entry<ControlTypes> = from_cbor(&bytes, MAX_RECORD).map_err(read_err)?;
                Some(entry.log_id)
            }
        };
        Ok(LogState {
            last_purged_log_id: last_purged,
            last_log_id: last,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StorageError<NodeId>> {
        let store = self.store.clone();
        let bytes = to_cbor(vote);
        blocking(move || store.put_meta(CONTROL_VOTE, &bytes))
            .await
            .map_err(|e| io_error(ErrorSubject::Vote, ErrorVerb::Write, e))
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError<NodeId>> {
        self.meta(CONTROL_VOTE)
    }

    async fn save_committed(
        &mut self,
        committed: Option<LogId<NodeId>>,
    ) -> Result<(), StorageError<NodeId>> {
        let store = self.store.clone();
        let bytes = to_cbor(&committed);
        blocking(move || store.put_meta(CONTROL_COMMITTED, &bytes))
            .await
            .map_err(write_err)
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<NodeId>>, StorageError<NodeId>> {
        Ok(self
            .meta::<Option<LogId<NodeId>>>(CONTROL_COMMITTED)?
            .flatten())
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<ControlTypes>,
    ) -> Result<(), StorageError<NodeId>>
    where
        I: IntoIterator<Item = Entry<ControlTypes>> + Send,
        I::IntoIter: Send,
    {
        let rows: Vec<(u64, Vec<u8>)> = entries
            .into_iter()
            .map(|e| (e.log_id.index, to_cbor(&e)))
            .collect();
        let store = self.store.clone();
        // Durable and readable before returning, as the trait asks; the callback
        // reports the same.
        let result = blocking(move || store.append(&rows)).await;
        callback.log_io_completed(result.clone().map_err(std::io::Error::other));
        result.map_err(write_err)
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError<NodeId>> {
        let store = self.store.clone();
        blocking(move || store.truncate_from(log_id.index))
            .await
            .map_err(|e| io_error(ErrorSubject::Log(log_id), ErrorVerb::Delete, e))
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError<NodeId>> {
        // openraft purges what a snapshot from the leader covers while the state
        // machine is still storing it: purged first, a crash would leave a log
        // that starts after the stored snapshot ends, and no way to start again.
        let mut covers = self.snapshot_covers.subscribe();
        let stored = covers.wait_for(|c| c.is_some_and(|c| c.index >= log_id.index));
        if !matches!(tokio::time::timeout(PURGE_WAIT, stored).await, Ok(Ok(_))) {
            return Err(io_error(
                ErrorSubject::Log(log_id),
                ErrorVerb::Delete,
                format!(
                    "{}: no stored snapshot covers the log up to {} after {} s; not purging it",
                    self.store.path().display(),
                    log_id.index,
                    PURGE_WAIT.as_secs()
                ),
            ));
        }
        let store = self.store.clone();
        let bytes = to_cbor(&Some(log_id));
        blocking(move || store.purge_upto(log_id.index, &bytes))
            .await
            .map_err(|e| io_error(ErrorSubject::Log(log_id), ErrorVerb::Delete, e))
    }
}

/// The control state machine: applies committed commands to the shared state.
#[derive(Clone)]
pub struct StateMachine {
    store: Arc<ControlStore>,
    applied: SharedApplied,
    snapshot_lock: Arc<tokio::sync::Mutex<()>>,
    snapshot_covers: SnapshotCovers,
}

impl StateMachine {
    /// Loads the last stored snapshot (if any) as the starting state.
    pub fn open(store: Arc<ControlStore>) -> Result<Self, StoreError> {
        let mut applied = Applied::default();
        let mut covers = None;
        if let Some(bytes) = store.get_meta(CONTROL_SNAPSHOT)? {
            let snap: StoredSnapshot =
                from_cbor(&bytes, MAX_RECORD).map_err(|detail| StoreError::Corrupt {
                    path: store.path().to_path_buf(),
                    what: "control-plane snapshot".into(),
                    detail,
                })?;
            applied = from_cbor(&snap.data, MAX_RECORD).map_err(|detail| StoreError::Corrupt {
                path: store.path().to_path_buf(),
                what: "control-plane snapshot data".into(),
                detail,
            })?;
            covers = snap.meta.last_log_id;
        }
        Ok(StateMachine {
            store,
            applied: Arc::new(RwLock::new(applied)),
            snapshot_lock: Arc::default(),
            snapshot_covers: Arc::new(tokio::sync::watch::Sender::new(covers)),
        })
    }

    pub fn shared(&self) -> SharedApplied {
        self.applied.clone()
    }

    fn read(&self) -> Applied {
        match self.applied.read() {
            Ok(a) => a.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Applied> {
        match self.applied.write() {
            Ok(a) => a,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// Stores a snapshot unless a newer one is stored already: a snapshot built
    /// from older state must not replace one installed meanwhile (the log before
    /// the newer one may be purged).
    async fn save_snapshot(&self, snap: StoredSnapshot) -> Result<(), StorageError<NodeId>> {
        let _one_at_a_time = self.snapshot_lock.lock().await;
        let store = self.store.clone();
        if let Some(bytes) = store.get_meta(CONTROL_SNAPSHOT).map_err(read_err)? {
            if let Ok(stored) = from_cbor::<StoredSnapshot>(&bytes, MAX_RECORD) {
                if stored.meta.last_log_id > snap.meta.last_log_id {
                    tracing::debug!("a newer control-plane snapshot is stored; keeping it");
                    return Ok(());
                }
            }
        }
        let covers = snap.meta.last_log_id;
        let bytes = to_cbor(&snap);
        blocking(move || store.put_meta(CONTROL_SNAPSHOT, &bytes))
            .await
            .map_err(|e| io_error(ErrorSubject::Snapshot(None), ErrorVerb::Write, e))?;
        self.snapshot_covers.send_if_modified(|c| {
            let newer = covers > *c;
            if newer {
                *c = covers;
            }
            newer
        });
        Ok(())
    }
}

impl RaftSnapshotBuilder<ControlTypes> for StateMachine {
    async fn build_snapshot(&mut self) -> Result<Snapshot<ControlTypes>, StorageError<NodeId>> {
        let applied = self.read();
        let data = to_cbor(&applied);
        let snapshot_id = match &applied.last_applied {
            Some(l) => format!("{}-{}-{}", l.leader_id, l.index, super::unix_ms()),
            None => format!("empty-{}", super::unix_ms()),
        };
        let meta = SnapshotMeta {
            last_log_id: applied.last_applied,
            last_membership: applied.membership.clone(),
            snapshot_id,
        };
        self.save_snapshot(StoredSnapshot {
            meta: meta.clone(),
            data: data.clone(),
        })
        .await?;
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        })
    }
}

impl RaftStateMachine<ControlTypes> for StateMachine {
    type SnapshotBuilder = StateMachine;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId<NodeId>>, StoredMembership<NodeId, ControlNode>), StorageError<NodeId>>
    {
        let a = self.read();
        Ok((a.last_applied, a.membership))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<ControlOutcome>, StorageError<NodeId>>
    where
        I: IntoIterator<Item = Entry<ControlTypes>> + Send,
        I::IntoIter: Send,
    {
        let mut out = Vec::new();
        let mut applied = self.write();
        for entry in entries {
            applied.last_applied = Some(entry.log_id);
            let outcome = match entry.payload {
                EntryPayload::Blank => ControlOutcome::Nothing,
                EntryPayload::Normal(cmd) => {
                    let outcome = applied.state.apply(&cmd);
                    tracing::info!(index = entry.log_id.index, command = ?cmd, outcome = ?outcome,
                        "control plane applied a decision");
                    outcome
                }
                EntryPayload::Membership(m) => {
                    applied.membership = StoredMembership::new(Some(entry.log_id), m);
                    ControlOutcome::Nothing
                }
            };
            out.push(outcome);
        }
        Ok(out)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(
        &mut self,
    ) -> Result<Box<Cursor<Vec<u8>>>, StorageError<NodeId>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, ControlNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError<NodeId>> {
        let data = snapshot.into_inner();
        let applied: Applied = from_cbor(&data, MAX_RECORD).map_err(|e| {
            io_error(
                ErrorSubject::Snapshot(Some(meta.signature())),
                ErrorVerb::Read,
                format!("received a corrupt control-plane snapshot: {e}"),
            )
        })?;
        self.save_snapshot(StoredSnapshot {
            meta: meta.clone(),
            data,
        })
        .await?;
        *self.write() = applied;
        Ok(())
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<Snapshot<ControlTypes>>, StorageError<NodeId>> {
        match self.store.get_meta(CONTROL_SNAPSHOT).map_err(read_err)? {
            None => Ok(None),
            Some(bytes) => {
                let snap: StoredSnapshot = from_cbor(&bytes, MAX_RECORD).map_err(read_err)?;
                Ok(Some(Snapshot {
                    meta: snap.meta,
                    snapshot: Box::new(Cursor::new(snap.data)),
                }))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::CommittedLeaderId;

    fn log_id(index: u64) -> LogId<NodeId> {
        LogId::new(CommittedLeaderId::new(1, 1), index)
    }

    fn blank(index: u64) -> (u64, Vec<u8>) {
        let entry: Entry<ControlTypes> = Entry {
            log_id: log_id(index),
            payload: EntryPayload::Blank,
        };
        (index, to_cbor(&entry))
    }

    #[tokio::test]
    async fn the_log_is_purged_only_once_a_stored_snapshot_covers_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(ControlStore::open(dir.path(), None).unwrap());
        store
            .append(&(1..=10).map(blank).collect::<Vec<_>>())
            .unwrap();
        let mut sm = StateMachine::open(store.clone()).unwrap();
        let mut log = LogStore::new(store.clone(), &sm);

        // A snapshot from the leader up to 7 is being installed: openraft asks
        // for the purge before the state machine has stored it.
        let purge = tokio::spawn(async move { log.purge(log_id(7)).await });
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            !purge.is_finished(),
            "purged before the snapshot was stored"
        );
        assert_eq!(store.range(0, u64::MAX).unwrap().len(), 10);

        let meta = SnapshotMeta {
            last_log_id: Some(log_id(7)),
            last_membership: StoredMembership::default(),
            snapshot_id: "s".into(),
        };
        let data = to_cbor(&Applied::default());
        sm.install_snapshot(&meta, Box::new(Cursor::new(data)))
            .await
            .unwrap();
        purge.await.unwrap().unwrap();
        let left: Vec<u64> = store
            .range(0, u64::MAX)
            .unwrap()
            .into_iter()
            .map(|(i, _)| i)
            .collect();
        assert_eq!(left, vec![8, 9, 10]);

        // A restart finds the snapshot: purges up to it go through at once.
        let sm = StateMachine::open(store.clone()).unwrap();
        let mut log = LogStore::new(store, &sm);
        log.purge(log_id(7)).await.unwrap();
    }
}
