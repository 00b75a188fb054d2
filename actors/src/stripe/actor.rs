//! The stripe actor: runs this node's [`Replica`] and does its I/O — the stripe
//! database (on blocking threads, one job at a time, in effect order: nothing
//! leaves the node before what precedes it is durable), replication requests to
//! the other members, client writes (batched: many writes share one log append and
//! one fsync) and reads, and proposals to the control plane.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use kiln_net::wire::{Request, Response};
use kiln_net::{NetCommand, NetHandle, PeerId, Reply};
use kiln_persistence::{StoreError, StripeRecovered, StripeStore, STATE_FSYNC_EVERY};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use serde_bytes::ByteBuf;
use tokio::sync::oneshot;

use super::kv::{self, KvCommand, KvOutcome};
use super::linger::Linger;
use super::replica::{
    Effect, Entry, LogPos, Message, Proposal, Recovered, Replica, ReplicaConfig, Role, StripeView,
};
use super::wire::{ServeError, StripeRequest, StripeResponse};
use crate::blocking::{background, blocking, Background};
use crate::control::state::{ControlCommand, ControlOutcome, Placement};
use crate::control::wire::{from_cbor, to_cbor, MAX_CONTROL_BODY};
use crate::control::{
    addresses, AddressBook, ConfirmActive, ControlPlane, Propose, RequestElection, SharedApplied,
};
use crate::health::{StorageHealth, StoragePart};

/// Sources of the stripe's storage health: its log and state files, the
/// staging of a snapshot being received, and opening them at start.
const LOG_SOURCE: &str = "log";
const SNAPSHOT_SOURCE: &str = "snapshot";
const OPEN_SOURCE: &str = "open";

/// How often the replica's timers run and the control plane's view is read.
const TICK: Duration = Duration::from_millis(20);
/// A replication request not answered this long counts as lost.
const REPLICATION_TIMEOUT: Duration = Duration::from_secs(2);
/// A standby applies committed entries once this many are waiting, or once the
/// oldest has waited `APPLY_DEFER` (nothing waits for a standby's apply but
/// stale reads): one read of the log and one turn of the state's lock for many
/// writes rather than for every replication message.
const APPLY_BATCH: u64 = 64;
const APPLY_DEFER: Duration = Duration::from_millis(20);
/// Applied state waits in memory (readers read through it) and is flushed to
/// its own file in the background after this many ticks without a flush, or
/// once `FLUSH_ENTRIES` have gathered (see `kiln_persistence::StripeStore`).
/// Each flush costs a redb commit and rewrites the B-tree pages above what it
/// changed: flushing every 200 ms rather than every 40 ms took ~6 % off the
/// CPU per write at 64 clients (BENCHMARKS, nineteenth session).
const FLUSH_AFTER_TICKS: u32 = 10;
const FLUSH_ENTRIES: u64 = 4096;
/// Or once this many bytes of entries have: entries alone bound nothing for
/// large values (4 096 of 1 MiB).
const FLUSH_BYTES: u64 = 64 << 20;
/// Past this many unflushed entries, or bytes of them, a flush runs at normal
/// priority (see `start_flush`).
const FLUSH_BEHIND: u64 = 8 * FLUSH_ENTRIES;
const FLUSH_BEHIND_BYTES: u64 = 8 * FLUSH_BYTES;
/// An idle-class flush still running after this long counts as starved of CPU:
/// the flushes after it run at nice + 10 (`Background::Low`) for
/// `STARVED_FOR`, then in the idle class again.
const FLUSH_STARVED: Duration = Duration::from_secs(1);
const STARVED_FOR: Duration = Duration::from_secs(600);
/// A compaction waits up to this long for the state's next periodic fsync
/// (`STATE_FSYNC_EVERY`) before it forces one. Forcing one at every
/// compaction (every ~3 s at 64 clients) fsynced the state three times as
/// often as it needs: each such flush writes every page the flushes since the
/// last one changed, ~200 ms of writes at normal priority beside the clients'.
const COMPACTION_WAITS: Duration = STATE_FSYNC_EVERY.saturating_add(Duration::from_secs(5));
/// A long catch-up applies this many entries at a time: an apply holds the
/// state's lock, and reads on this actor's thread wait for it.
const APPLY_PART: u64 = 1024;
/// A log compaction drops at most this many entries per transaction, one step
/// a tick: the stripe's queue (and the log's writer) waits for each step, and
/// dropping 10 000 entries at once held every write of the stripe 5-10 ms.
const COMPACT_STEP: u64 = 1024;
/// After a failed log write the stripe starts again from its disk this much
/// later, and again, twice as late each time (up to `STORAGE_RETRY_MAX`), until
/// a log write succeeds: an active whose disk stays full would otherwise take
/// a new epoch from the control plane every second (its small probe write fits,
/// the take-over entry does not).
const STORAGE_RETRY: Duration = Duration::from_secs(1);
const STORAGE_RETRY_MAX: Duration = Duration::from_secs(16);
/// A storage failure this long after the previous one backs off from the start.
const STORAGE_FAILURES_FORGOTTEN: Duration = Duration::from_secs(60);

/// The pause before the replica starts again after `failures` log writes or
/// restarts in a row failed.
fn storage_retry(failures: u32) -> Duration {
    STORAGE_RETRY
        .saturating_mul(1 << failures.saturating_sub(1).min(16))
        .min(STORAGE_RETRY_MAX)
}

/// Encodes a stripe message for the wire.
pub fn stripe_request(req: &StripeRequest) -> Request {
    Request::Stripe {
        body: ByteBuf::from(to_cbor(req)),
    }
}

/// Decodes a stripe answer.
pub fn stripe_response(resp: Response) -> Result<StripeResponse, String> {
    match resp {
        Response::Stripe { body } => from_cbor(&body, MAX_CONTROL_BODY),
        Response::Refused { reason } => Err(reason),
        other => Err(format!("unexpected answer {other:?}")),
    }
}

/// The view of `stripe` in the control plane's applied state.
pub fn stripe_view(applied: &SharedApplied, stripe: u32) -> Option<StripeView> {
    let a = applied.read().ok()?;
    let s = a.state.stripes.get(&stripe)?;
    Some(StripeView {
        version: a.last_applied.map(|l| l.index).unwrap_or(0),
        epoch: s.epoch,
        active: s.active,
        members: s.members.clone(),
        in_sync: s.in_sync.clone(),
        in_sync_removals: s.in_sync_removals,
    })
}

/// The active of `stripe` in the control plane's applied state (without
/// copying the stripe's member sets, as [`stripe_view`] does: routing asks
/// this on every request).
pub fn stripe_active(applied: &SharedApplied, stripe: u32) -> Option<u64> {
    applied.read().ok()?.state.stripes.get(&stripe)?.active
}

/// Where the answer to a stripe request goes: a peer, or this node's own
/// control plane (an election coordinated here asks this node too).
pub enum Responder {
    Peer(Reply),
    Local(oneshot::Sender<StripeResponse>),
}

enum Step {
    Fx(Effect),
    Reply(Responder, StripeResponse),
}

type WriteReply = oneshot::Sender<Result<KvOutcome, ServeError>>;
type ReadReply = oneshot::Sender<Result<Option<(u64, Vec<u8>)>, ServeError>>;
type KeysReply = oneshot::Sender<Result<Vec<String>, ServeError>>;

/// A client write appended by the active, waiting for its answer.
struct Waiting {
    reply: WriteReply,
    /// Its outcome is known once it commits (`KvCommand::done_at_commit`): it
    /// is answered then, not after the apply.
    at_commit: bool,
}

/// A read the active answers once it has confirmed it still is (`ReadReady`).
enum PendingRead {
    Value {
        map: String,
        key: String,
        reply: ReadReply,
    },
    Keys {
        map: String,
        prefix: String,
        after: Option<String>,
        limit: usize,
        reply: KeysReply,
    },
}

impl PendingRead {
    fn fail(self, e: ServeError) {
        match self {
            PendingRead::Value { reply, .. } => {
                let _ = reply.send(Err(e));
            }
            PendingRead::Keys { reply, .. } => {
                let _ = reply.send(Err(e));
            }
        }
    }

    fn answer(self, store: &StripeStore) {
        let storage = |e: StoreError| ServeError::Storage(e.to_string());
        match self {
            PendingRead::Value { map, key, reply } => {
                let _ = reply.send(store.get(&map, &key).map_err(storage));
            }
            PendingRead::Keys {
                map,
                prefix,
                after,
                limit,
                reply,
            } => {
                let _ = reply.send(
                    store
                        .keys(&map, &prefix, after.as_deref(), limit)
                        .map_err(storage),
                );
            }
        }
    }
}

/// A stripe request from a peer (or from this node, with `Responder::Local`).
#[derive(Message)]
#[rtype(result = "()")]
pub struct ServeStripe {
    pub peer: PeerId,
    pub request: StripeRequest,
    pub reply: Responder,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct PeerLabel {
    peer: String,
}

/// Kinds of stripe storage work, as the `job` label of `kiln_stripe_storage_seconds`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct StorageJob {
    job: &'static str,
}

/// Up to 10 s: a disk that stalls for seconds (the failure an operator looks
/// for here) must not vanish into `+Inf`.
fn storage_histogram() -> Histogram {
    Histogram::new([
        0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    ])
}

/// Time each storage job took on its blocking thread (queueing excluded).
#[derive(Clone)]
struct StorageTimes(Family<StorageJob, Histogram, fn() -> Histogram>);

impl Default for StorageTimes {
    fn default() -> Self {
        StorageTimes(Family::new_with_constructor(storage_histogram))
    }
}

/// On the active: a batch's time from proposal to commit.
#[derive(Clone)]
struct CommitTimes(Histogram);

impl Default for CommitTimes {
    fn default() -> Self {
        CommitTimes(storage_histogram())
    }
}

/// Stripe metrics, `kiln_stripe_*`.
#[derive(Clone, Default)]
pub struct StripeMetrics {
    is_active: Gauge,
    epoch: Gauge,
    last_index: Gauge,
    log_compacted: Gauge,
    commit_index: Gauge,
    member_lag: Family<PeerLabel, Gauge>,
    writes: Counter,
    writes_answered_at_commit: Counter,
    write_batches: Counter,
    elections_requested: Counter,
    snapshot_bytes_sent: Counter,
    snapshot_bytes_received: Counter,
    snapshot_keys_received: Counter,
    snapshots_installed: Counter,
    /// Keys of the snapshot being received, and of those received so far.
    snapshot_keys_total: Gauge,
    snapshot_keys_done: Gauge,
    storage_seconds: StorageTimes,
    commit_seconds: CommitTimes,
}

impl StripeMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = StripeMetrics::default();
        let r = registry.sub_registry_with_prefix("kiln_stripe");
        r.register(
            "is_active",
            "1 if this node is the active of its stripe",
            m.is_active.clone(),
        );
        r.register(
            "epoch",
            "Epoch of this node's stripe as it knows it",
            m.epoch.clone(),
        );
        r.register(
            "last_index",
            "Index of the last entry in this node's stripe log",
            m.last_index.clone(),
        );
        r.register(
            "log_compacted_index",
            "Index up to which this node's stripe log was compacted since it started \
             (the log on disk holds the entries after it)",
            m.log_compacted.clone(),
        );
        r.register(
            "commit_index",
            "Highest committed index known here",
            m.commit_index.clone(),
        );
        r.register(
            "member_lag",
            "Entries each member is behind the active (reported by the active)",
            m.member_lag.clone(),
        );
        r.register(
            "writes",
            "Client writes appended by this node as active",
            m.writes.clone(),
        );
        r.register(
            "writes_answered_at_commit",
            "Client writes this node as active answered as soon as they committed, \
             before their apply (unconditional puts sent for the first time)",
            m.writes_answered_at_commit.clone(),
        );
        r.register(
            "write_batches",
            "Log appends of client writes (writes / batches = group commit factor)",
            m.write_batches.clone(),
        );
        r.register(
            "elections_requested",
            "Times this standby asked for an election",
            m.elections_requested.clone(),
        );
        r.register(
            "snapshot_bytes_sent",
            "Bytes of snapshots this node sent to members too far behind for log entries",
            m.snapshot_bytes_sent.clone(),
        );
        r.register(
            "snapshot_bytes_received",
            "Bytes of snapshots this node received while syncing",
            m.snapshot_bytes_received.clone(),
        );
        r.register(
            "snapshot_keys_received",
            "Keys of snapshots this node received while syncing",
            m.snapshot_keys_received.clone(),
        );
        r.register(
            "snapshots_installed",
            "Snapshots this node installed",
            m.snapshots_installed.clone(),
        );
        r.register(
            "snapshot_keys_total",
            "Keys in the snapshot this node is receiving (0 when none)",
            m.snapshot_keys_total.clone(),
        );
        r.register(
            "snapshot_keys_done",
            "Keys of the snapshot this node is receiving that arrived so far",
            m.snapshot_keys_done.clone(),
        );
        r.register(
            "storage_seconds",
            "Time stripe storage jobs took (job: append = the active's own log write, \
             persist = a member's log write with the apply of what it covers, apply, \
             flush = applied state to its file and its pages' write-back, \
             flush_durable = the same fsynced for a compaction, compact = the log part of one, \
             stage = a received snapshot part, install)",
            m.storage_seconds.0.clone(),
        );
        r.register(
            "commit_seconds",
            "On the active: time from a batch of client writes being proposed to its \
             commit (durable here and on every in-sync member)",
            m.commit_seconds.0.clone(),
        );
        m
    }

    /// A storage job to run on a blocking thread, timed as `job`.
    fn timed<T: Send + 'static>(
        &self,
        job: &'static str,
        f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
    ) -> impl FnOnce() -> Result<T, StoreError> + Send + 'static {
        let histogram = self
            .storage_seconds
            .0
            .get_or_create(&StorageJob { job })
            .clone();
        move || {
            let started = Instant::now();
            let out = f();
            histogram.observe(started.elapsed().as_secs_f64());
            out
        }
    }
}

/// Planned handover of this node's active role (to `to`, or the most
/// up-to-date in-sync standby). Answers the new active once the control plane
/// made it so; `Ok(None)` if this node is not active (nothing to hand over).
#[derive(Message)]
#[rtype(result = "()")]
pub struct HandOver {
    pub to: Option<u64>,
    pub reply: oneshot::Sender<Result<Option<u64>, String>>,
}

pub struct StripeActor {
    /// See [`super::KnownChangeSeq`].
    known_change_seq: super::KnownChangeSeq,
    me: u64,
    stripe: Option<u32>,
    replica: Option<Replica>,
    cfg: ReplicaConfig,
    store: Arc<StripeStore>,
    net: NetHandle,
    book: AddressBook,
    applied: SharedApplied,
    control: Addr<ControlPlane>,
    started: Instant,
    queue: VecDeque<Step>,
    busy: bool,
    /// When the next batch goes (see `super::linger`).
    linger: Linger,
    /// A timer will look at the batch again.
    linger_timer: bool,
    applied_index: u64,
    /// Client writes waiting for the next log append (group commit).
    batch: Vec<(Vec<u8>, Waiting)>,
    /// Appended client writes waiting for their commit, by log index.
    waiting: BTreeMap<u64, Waiting>,
    /// Writes answered at their commit and not yet applied here, by log index:
    /// their apply must give what they were told (checked in `applied`).
    answered_at_commit: BTreeSet<u64>,
    /// Batches proposed as active and not yet committed: last index, and when
    /// (for `kiln_stripe_commit_seconds`).
    proposed: VecDeque<(u64, Instant)>,
    reads: HashMap<u64, PendingRead>,
    next_read: u64,
    view_version: u64,
    handover_waiters: Vec<oneshot::Sender<Result<Option<u64>, String>>>,
    metrics: StripeMetrics,
    /// The active's own appends waiting for their fsync, in order; one runs at a time.
    local_queue: VecDeque<Vec<(u64, Vec<u8>)>>,
    local_busy: bool,
    /// Counts replica restarts after a failed log write: a local append started
    /// before one must not report to the replica that replaced it.
    replica_generation: u64,
    /// The replica dropped after a storage failure had started without its
    /// stripe data and not caught up: the next one is behind too.
    restart_behind: bool,
    /// A log write failed: the error, and when to start the replica again from
    /// the disk. Writes meanwhile are refused with the error at once.
    storage_down: Option<(String, Instant)>,
    /// Where `storage_down` shows (status, metrics).
    health: StorageHealth,
    /// The last error opening the stripe's data at start (logged once).
    open_error: Option<String>,
    /// Elections asked for and in-sync changes proposed in the current epoch,
    /// logged at info once each: they are asked again every 100–200 ms until
    /// decided (for as long as a partition lasts; an active cut off proposes
    /// one removal per standby), the repeats at debug.
    proposals_logged: HashSet<Proposal>,
    /// Writes and restarts that failed since both files last took a write.
    storage_failures: u32,
    /// Since the last failed write: a log append, and a flush of applied
    /// state, succeeded (both files take writes again: the backoff resets).
    appended_since_failure: bool,
    flushed_since_failure: bool,
    last_storage_failure: Option<Instant>,
    /// A standby's committed entries not applied yet (see `APPLY_BATCH`), and
    /// since when the oldest of them waits.
    apply_pending: Option<(u64, Instant)>,
    /// A flush of applied state to the file is under way.
    flushing: bool,
    /// When the flush under way started, if on an idle-class thread.
    idle_flush_started: Option<Instant>,
    /// Since when flushes avoid the idle class (see `FLUSH_STARVED`).
    flushes_starved: Option<Instant>,
    /// A compaction waiting for a flush (see `Effect::Compact`), and since when.
    compact_after_flush: Option<u64>,
    compact_waits_since: Option<Instant>,
    /// The log holds no entry up to here (compacted by this process).
    compacted_upto: u64,
    /// Where the compaction under way ends: its next step goes at the next
    /// tick (see `COMPACT_STEP`).
    compact_rest: Option<u64>,
    /// `StripeStore::flushes` at the last tick.
    flushes_seen: u64,
    ticks_without_flush: u32,
    /// A snapshot being received: its epoch, position and next part.
    receiving: Option<Receiving>,
    /// The answer to a snapshot's last part, sent once it is installed, and
    /// the change count it carried.
    install_reply: Option<(Responder, u64)>,
    /// Members a snapshot is being sent to.
    sending: HashSet<u64>,
    /// Snapshot transfers this node started receiving.
    transfers_started: u64,
}

struct Receiving {
    /// Tells this transfer's storage jobs from those of an earlier one.
    transfer: u64,
    epoch: u64,
    at: LogPos,
    next_seq: u64,
    keys: u64,
    bytes: u64,
    started: Instant,
    last_log: Instant,
    /// Parts received and not yet written, in order.
    staging: VecDeque<StagedPart>,
    staging_busy: bool,
    /// A part could not be written: the transfer fails at its next part.
    failed: Option<String>,
    /// The last part's answer and change count, once it arrived.
    finish: Option<(Responder, u64)>,
    /// Answers held back while too many parts wait to be written.
    held: VecDeque<Responder>,
    parts_staged: u64,
    /// Parts that arrived before an earlier one: (part, change count if last, answer).
    early: BTreeMap<u64, (StagedPart, Option<u64>, Responder)>,
}

/// Every this many staged snapshot parts (of up to 1 MiB) one is fsynced.
const DURABLE_EVERY_PARTS: u64 = 32;

/// Snapshot parts the sender may have on the way at once.
const PARTS_IN_FLIGHT: usize = 3;
/// Parts accepted ahead of the next expected one.
const PARTS_AHEAD: u64 = 8;

/// Snapshot parts (up to 1 MiB each) received ahead of the one being written:
/// enough that the transfer goes on while every 32nd part is fsynced (~30 ms
/// alone, ~110 ms beside a transfer); with 2, each fsync stalled the sender and
/// 1 GiB took 8 s instead of 5.
const STAGING_AHEAD: usize = 32;

struct StagedPart {
    reset: bool,
    kv: Vec<kiln_persistence::KvRow>,
    requests: Vec<(String, Vec<u8>)>,
}

impl StripeActor {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        me: u64,
        cfg: ReplicaConfig,
        store: Arc<StripeStore>,
        net: NetHandle,
        book: AddressBook,
        applied: SharedApplied,
        control: Addr<ControlPlane>,
        metrics: StripeMetrics,
        known_change_seq: super::KnownChangeSeq,
        health: StorageHealth,
    ) -> Self {
        StripeActor {
            known_change_seq,
            health,
            open_error: None,
            proposals_logged: HashSet::new(),
            me,
            stripe: None,
            replica: None,
            cfg,
            store,
            net,
            book,
            applied,
            control,
            started: Instant::now(),
            queue: VecDeque::new(),
            busy: false,
            linger: Linger::default(),
            linger_timer: false,
            applied_index: 0,
            batch: Vec::new(),
            waiting: BTreeMap::new(),
            answered_at_commit: BTreeSet::new(),
            proposed: VecDeque::new(),
            reads: HashMap::new(),
            next_read: 1,
            view_version: 0,
            handover_waiters: Vec::new(),
            metrics,
            local_queue: VecDeque::new(),
            local_busy: false,
            replica_generation: 0,
            restart_behind: false,
            storage_down: None,
            storage_failures: 0,
            appended_since_failure: false,
            flushed_since_failure: false,
            last_storage_failure: None,
            apply_pending: None,
            flushing: false,
            idle_flush_started: None,
            flushes_starved: None,
            compact_after_flush: None,
            compact_waits_since: None,
            compacted_upto: 0,
            compact_rest: None,
            flushes_seen: 0,
            ticks_without_flush: 0,
            receiving: None,
            install_reply: None,
            sending: HashSet::new(),
            transfers_started: 0,
        }
    }

    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// Starts replication once the control plane has placed this node.
    fn start_replica(&mut self, stripe: u32) -> Result<(), StoreError> {
        if let Some(r) = recover_stripe(&self.store, stripe)? {
            self.start_replica_from(stripe, r);
        }
        Ok(())
    }

    /// Runs the replica of `stripe` from what its store held.
    fn start_replica_from(&mut self, stripe: u32, r: StripeRecovered) {
        // The log is positional: an entry that does not decode ends it (what
        // follows would be served at the wrong indexes).
        let entries: Vec<Entry> = r
            .entries
            .iter()
            .map_while(|(_, b)| from_cbor::<Entry>(b, usize::MAX).ok())
            .collect();
        if entries.len() != r.entries.len() {
            let from = r.base.1 + 1 + entries.len() as u64;
            tracing::error!(path = %self.store.path().display(), from,
                "an entry of the stripe log does not decode; serving what precedes it");
            if from > r.applied {
                if let Err(e) = self.store.persist(Some(from), &[], None) {
                    tracing::error!(error = %e, "cannot drop the undecodable stripe log tail");
                }
            }
        }
        self.applied_index = r.applied;
        self.answered_at_commit.clear();
        let mut replica = Replica::new(
            self.me,
            self.cfg.clone(),
            Recovered {
                promised: r.promised,
                base: LogPos {
                    epoch: r.base.0,
                    index: r.base.1,
                },
                entries,
                applied: r.applied,
            },
        );
        if std::mem::take(&mut self.restart_behind) {
            replica.still_behind();
        }
        self.replica = Some(replica);
        self.stripe = Some(stripe);
        tracing::info!(
            stripe,
            promised = r.promised,
            applied = r.applied,
            log = r.entries.len(),
            "stripe replication started"
        );
    }

    fn tick(&mut self, ctx: &mut Context<Self>) {
        if self.stripe.is_none() {
            let placed = self
                .applied
                .read()
                .ok()
                .and_then(|a| a.state.nodes.get(&self.me).map(|n| n.placement));
            if let Some(Placement::Stripe(k)) = placed {
                if !self.store.durable() && !self.known_change_seq.settled() {
                    // The stripe data started empty: if this node takes the
                    // stripe over, its change seqs go on above what the cluster
                    // holds, which the peers' digests tell.
                    return;
                }
                match self.start_replica(k) {
                    Ok(()) => self.health.ok(StoragePart::Stripe, OPEN_SOURCE),
                    Err(e) => {
                        // Tried every tick: said once per distinct error.
                        let msg = e.to_string();
                        if self.open_error.as_ref() != Some(&msg) {
                            tracing::error!(stripe = k, error = %e, "cannot open the stripe data (trying again)");
                            self.health
                                .failing(StoragePart::Stripe, OPEN_SOURCE, msg.clone());
                            self.open_error = Some(msg);
                        }
                    }
                }
            }
            return;
        }
        let Some(stripe) = self.stripe else { return };
        self.restart_after_storage_failure(ctx);
        if self.replica.is_some() && self.storage_down.is_none() {
            // Reads fail until the stripe starts again from the reopened file.
            if let Err(e) = self.store.check_state_kept() {
                self.log_write_failed(&e);
            }
        }
        if self.replica.is_some() && self.storage_down.is_none() {
            // Behind whatever is queued: a step a tick however busy the stripe.
            let queued = self
                .queue
                .iter()
                .any(|s| matches!(s, Step::Fx(Effect::Compact { .. })));
            if !queued {
                if let Some(upto) = self.compact_rest.take() {
                    self.queue.push_back(Step::Fx(Effect::Compact { upto }));
                    self.pump(ctx);
                }
            }
        }
        if let Some(started) = self.idle_flush_started {
            if started.elapsed() >= FLUSH_STARVED && self.flushes_starved.is_none() {
                tracing::warn!(
                    stripe,
                    waiting = self.store.unflushed_entries(),
                    waiting_bytes = self.store.unflushed_bytes(),
                    secs = started.elapsed().as_secs_f64(),
                    "a flush of applied state in the idle scheduling class has run for over a \
                     second (other work keeps every core busy, or the disk is slow); flushes \
                     run at nice + 10 for the next 10 minutes"
                );
                self.flushes_starved = Some(Instant::now());
            }
        }
        self.force_fsync_for_compaction(ctx);
        // Also counts the flushes others made (compaction, snapshots).
        let flushes = self.store.flushes();
        if flushes == self.flushes_seen {
            self.ticks_without_flush += 1;
            if self.ticks_without_flush >= FLUSH_AFTER_TICKS {
                self.flush_applied(ctx, 1);
                self.ticks_without_flush = 0;
            }
        } else {
            self.ticks_without_flush = 0;
        }
        self.flushes_seen = flushes;
        let mut fx = Vec::new();
        if let Some((upto, since)) = self.apply_pending {
            // Not while a job runs: the Commit would queue again every tick.
            if since.elapsed() >= APPLY_DEFER && !self.busy {
                fx.push(Effect::Commit { upto });
            }
        }
        if let Some(view) = stripe_view(&self.applied, stripe) {
            if view.version != self.view_version {
                self.view_version = view.version;
                if let Some(r) = self.replica.as_mut() {
                    let before = r.role();
                    let known = self.known_change_seq.get();
                    r.set_first_entry(if known > 0 {
                        kv::encode(&kv::TakeOver {
                            change_floor: known,
                        })
                    } else {
                        Vec::new()
                    });
                    fx.extend(r.on_view(view.clone()));
                    if r.role() != before {
                        tracing::info!(stripe, epoch = view.epoch, role = ?r.role(), "stripe role changed");
                    }
                }
            }
        }
        let now = self.now_ms();
        if let Some(r) = self.replica.as_mut() {
            fx.extend(r.tick(now));
        }
        self.update_metrics();
        if !self.handover_waiters.is_empty() && !self.is_active() {
            let active = self.replica.as_ref().and_then(|r| r.view().active);
            for w in self.handover_waiters.drain(..) {
                let _ = w.send(Ok(active));
            }
        } else if !self.handover_waiters.is_empty()
            && self
                .replica
                .as_ref()
                .is_some_and(|r| r.handing_over().is_none())
        {
            tracing::warn!(stripe, epoch = self.replica.as_ref().map(|r| r.view().epoch),
                "planned handover given up: the standby left the in-sync set or did not take over in time; taking writes again");
            for w in self.handover_waiters.drain(..) {
                let _ = w.send(Err(
                    "given up: the standby left the in-sync set or did not take over within 8 s; \
                     this node is still the active and takes writes again"
                        .to_string(),
                ));
            }
        }
        self.push(fx, ctx);
    }

    fn update_metrics(&self) {
        let Some(r) = self.replica.as_ref() else {
            return;
        };
        self.metrics.is_active.set(i64::from(self.is_active()));
        self.metrics.epoch.set(r.view().epoch as i64);
        self.metrics.last_index.set(r.last().index as i64);
        self.metrics.commit_index.set(r.commit_index() as i64);
        if self.is_active() {
            for (n, lag) in r.lags() {
                if let Some(p) = self.peer_of(n) {
                    self.metrics
                        .member_lag
                        .get_or_create(&PeerLabel {
                            peer: p.to_string(),
                        })
                        .set(lag as i64);
                }
            }
        }
    }

    fn push(&mut self, fx: Vec<Effect>, ctx: &mut Context<Self>) {
        self.observe_commits(&fx);
        self.queue.extend(fx.into_iter().map(Step::Fx));
        self.pump(ctx);
    }

    /// Answers the writes up to `upto` whose outcome their commit settles
    /// (see `Waiting`), without waiting for the apply (~0.7 ms for a batch at
    /// 64 clients), so their clients' next writes come sooner. A linearizable read
    /// still sees them: its `ReadReady` is queued behind this `Commit`, whose
    /// apply it waits for.
    ///
    /// Only as the active, for entries of its own epoch that its log holds as
    /// committed: `waiting` may still hold writes of an epoch this node just
    /// stepped down from (until the queued `SteppedDown` fails them), whose
    /// indexes a follower's commit may cover with other entries.
    fn answer_at_commit(&mut self, upto: u64) {
        let Some(r) = self.replica.as_ref() else {
            return;
        };
        let Role::Active { epoch } = r.role() else {
            return;
        };
        let settled: Vec<u64> = self
            .waiting
            .range(..=upto.min(r.commit_index()))
            .filter(|(i, w)| w.at_commit && r.epoch_at(**i) == Some(epoch))
            .map(|(i, _)| *i)
            .collect();
        if settled.is_empty() {
            return;
        }
        for &index in &settled {
            if let Some(w) = self.waiting.remove(&index) {
                let _ = w.reply.send(Ok(KvOutcome::Done { version: index }));
                self.answered_at_commit.insert(index);
            }
        }
        self.metrics
            .writes_answered_at_commit
            .inc_by(settled.len() as u64);
        self.linger.answered(settled.len(), Instant::now());
    }

    /// Answers the writes that `fx` commits and settles (`answer_at_commit`),
    /// and times the batches it commits (see `proposed`); forgets them once
    /// this node is no longer active.
    fn observe_commits(&mut self, fx: &[Effect]) {
        for e in fx {
            if let Effect::Commit { upto } = e {
                self.answer_at_commit(*upto);
            }
        }
        if self.proposed.is_empty() {
            return;
        }
        if !self.is_active() {
            self.proposed.clear();
            return;
        }
        for e in fx {
            if let Effect::Commit { upto } = e {
                while let Some((_, at)) = self.proposed.front().filter(|(i, _)| i <= upto) {
                    self.metrics
                        .commit_seconds
                        .0
                        .observe(at.elapsed().as_secs_f64());
                    self.proposed.pop_front();
                }
            }
        }
    }

    /// Executes queued steps in order; a storage job pauses the queue until done.
    fn pump(&mut self, ctx: &mut Context<Self>) {
        while !self.busy {
            // A `Persist` (a follower's, or a take-over's) follows every earlier
            // local append: a late append must not land after a truncation.
            let local_pending = self.local_busy || !self.local_queue.is_empty();
            let rewrites_log = matches!(
                self.queue.front(),
                Some(Step::Fx(
                    Effect::Persist { .. }
                        | Effect::InstallSnapshot { .. }
                        | Effect::Compact { .. }
                ))
            );
            if local_pending && rewrites_log {
                break;
            }
            let Some(step) = self.queue.pop_front() else {
                break;
            };
            // A standby's `Persist` of new entries is followed by the `Commit` of
            // earlier ones and its answer, and often by the next appends (they
            // are pipelined): one transaction for the run of them, the answers
            // once it is durable, then the apply.
            if let Step::Fx(Effect::Persist {
                truncate_from,
                mut entries,
                mut promised,
            }) = step
            {
                let mut upto = self.applied_index;
                let mut answers = Vec::new();
                loop {
                    match self.queue.front() {
                        Some(Step::Fx(Effect::Commit { upto: u })) => upto = upto.max(*u),
                        Some(Step::Reply(..)) => {}
                        Some(Step::Fx(Effect::Persist {
                            truncate_from: None,
                            ..
                        })) => {}
                        _ => break,
                    }
                    match self.queue.pop_front() {
                        Some(Step::Fx(Effect::Persist {
                            entries: more,
                            promised: p,
                            ..
                        })) => {
                            entries.extend(more);
                            promised = promised.max(p);
                        }
                        Some(Step::Reply(reply, resp)) => answers.push((reply, resp)),
                        _ => {}
                    }
                }
                let due = self.apply_now_or_later(upto);
                // A long catch-up goes in parts (see `apply_committed`); the
                // rest at the next tick.
                let upto = due.min(self.applied_index + APPLY_PART);
                if upto < due {
                    let overdue = Instant::now().checked_sub(APPLY_DEFER);
                    self.apply_pending = Some((due, overdue.unwrap_or_else(Instant::now)));
                }
                self.persist_and_apply(truncate_from, entries, promised, upto, answers, ctx);
                continue;
            }
            match step {
                Step::Reply(reply, resp) => self.respond(reply, &resp),
                Step::Fx(e) => self.run(e, ctx),
            }
        }
        if self.ready_for_batch() {
            self.flush_batch(ctx);
        }
    }

    /// Persists log changes, then sends `answers` (they wait for the log
    /// changes to be durable), then applies committed entries up to `upto` (in
    /// memory, see `StripeStore::apply`).
    ///
    /// The answers go from the storage thread as soon as the log write is
    /// durable: through this actor's thread they waited for the apply (every
    /// second batch at 64 clients) and for one more thread hop, on the path of
    /// every commit. An apply that fails after them does not take them back:
    /// what they said is durable is (the replica starts again from the disk).
    fn persist_and_apply(
        &mut self,
        truncate_from: Option<u64>,
        entries: Vec<(u64, Entry)>,
        promised: Option<u64>,
        upto: u64,
        answers: Vec<(Responder, StripeResponse)>,
        ctx: &mut Context<Self>,
    ) {
        self.busy = true;
        let store = self.store.clone();
        let net = self.net.clone();
        let rows: Vec<(u64, Vec<u8>)> = entries.iter().map(|(i, e)| (*i, to_cbor(e))).collect();
        let has_entries = !rows.is_empty();
        let from = self.applied_index + 1;
        let generation = self.replica_generation;
        ctx.spawn(
            blocking(self.metrics.timed("persist", move || {
                if let Err(e) = store.persist(truncate_from, &rows, promised) {
                    // Nothing the write covered may be acknowledged.
                    for (reply, resp) in answers {
                        respond_with(&net, reply, &refused(resp, &e));
                    }
                    return Err(e);
                }
                for (reply, resp) in answers {
                    respond_with(&net, reply, &resp);
                }
                store.apply_logged((from, upto), entry_data, kv::apply)
            }))
            .into_actor(self)
            .map(move |res, act, ctx| {
                act.busy = false;
                match res {
                    Ok(done) => {
                        if has_entries && act.replica_generation == generation {
                            act.storage_ok(true);
                        }
                        act.applied(upto, Ok(done));
                        act.flush_applied(ctx, FLUSH_ENTRIES);
                    }
                    Err(e) => act.log_write_failed(&e),
                }
                act.pump(ctx);
            }),
        );
    }

    /// Applies committed entries up to `upto` (in memory, flushed to the file
    /// later: the log holds them), then answers the writes that waited.
    fn apply_committed(&mut self, upto: u64, ctx: &mut Context<Self>) {
        if upto <= self.applied_index {
            return;
        }
        // A long catch-up goes in parts: an apply holds the state's lock, and
        // reads on this actor's thread wait for it.
        let target = upto;
        let upto = upto.min(self.applied_index + APPLY_PART);
        self.busy = true;
        let from = self.applied_index + 1;
        let store = self.store.clone();
        ctx.spawn(
            blocking(self.metrics.timed("apply", move || {
                store.apply_logged((from, upto), entry_data, kv::apply)
            }))
            .into_actor(self)
            .map(move |res, act, ctx| {
                act.busy = false;
                match res {
                    Ok(done) => {
                        act.applied(upto, Ok(done));
                        act.flush_applied(ctx, FLUSH_ENTRIES);
                        if target > upto {
                            act.queue
                                .push_front(Step::Fx(Effect::Commit { upto: target }));
                        }
                    }
                    // The file's state is not the one applied so far (it was
                    // opened again), or unreadable: start again from the file.
                    Err(e) => act.log_write_failed(&e),
                }
                act.pump(ctx);
            }),
        );
    }

    /// This node's log holds no entry up to `upto` any more.
    fn note_compacted(&mut self, upto: u64) {
        self.compacted_upto = self.compacted_upto.max(upto);
        self.metrics.log_compacted.set(self.compacted_upto as i64);
    }

    /// A compaction up to `upto` waits for the state's next fsync (stashed in
    /// `compact_after_flush`; every flush's end queues it again).
    fn wait_to_compact(&mut self, upto: u64, ctx: &mut Context<Self>) {
        self.compact_after_flush = self.compact_after_flush.max(Some(upto));
        self.compact_waits_since.get_or_insert_with(Instant::now);
        self.force_fsync_for_compaction(ctx);
    }

    /// Starts a fsynced flush for a compaction that waited `COMPACTION_WAITS`
    /// for one: no fsync of the state came (no writes since, or a temporary
    /// store, which fsyncs none of its own). Also from a compaction queued at
    /// a flush's end: flushes back to back leave ticks few chances.
    fn force_fsync_for_compaction(&mut self, ctx: &mut Context<Self>) {
        let waited = self
            .compact_waits_since
            .is_some_and(|since| since.elapsed() >= COMPACTION_WAITS);
        if !waited || self.flushing || self.replica.is_none() || self.storage_down.is_some() {
            return;
        }
        // It runs beside the queue, not in it: the fsync of what gathered
        // since the last one took 100–230 ms, and writes would wait.
        self.compact_waits_since = Some(Instant::now());
        self.start_flush(ctx, true);
    }

    /// Writes the applied state gathered in memory to the file once `at_least`
    /// entries, or `FLUSH_BYTES` of them, are waiting (in the background:
    /// nothing waits for it).
    fn flush_applied(&mut self, ctx: &mut Context<Self>, at_least: u64) {
        // Not while the stripe restarts from its file (which drops the state).
        let restarting = self.replica.is_none() || self.storage_down.is_some();
        let due = flush_due(
            self.store.unflushed_entries(),
            self.store.unflushed_bytes(),
            at_least,
        );
        if self.flushing || restarting || !due {
            return;
        }
        self.start_flush(ctx, false);
    }

    /// Starts a flush of applied state (`durable`: fsynced, for a compaction
    /// stashed in `compact_after_flush`, which is queued once it is done).
    fn start_flush(&mut self, ctx: &mut Context<Self>, durable: bool) {
        let behind = flush_behind(self.store.unflushed_entries(), self.store.unflushed_bytes());
        self.flushing = true;
        let generation = self.replica_generation;
        let store = self.store.clone();
        let name = if durable { "flush_durable" } else { "flush" };
        let job = self.metrics.timed(name, move || match durable {
            true => store.flush_durable(),
            false => store.flush(),
        });
        // Nothing waits for a flush, but memory does: once flushes fall far
        // behind (a saturated CPU starves the background thread), at normal
        // priority; and the log, for one a compaction waits for.
        let flushed = if durable || behind {
            futures::FutureExt::boxed_local(blocking(job))
        } else if self
            .flushes_starved
            .is_some_and(|since| since.elapsed() < STARVED_FOR)
        {
            futures::FutureExt::boxed_local(background(Background::Low, job))
        } else {
            self.flushes_starved = None;
            self.idle_flush_started = Some(Instant::now());
            futures::FutureExt::boxed_local(background(Background::Idle, job))
        };
        ctx.spawn(flushed.into_actor(self).map(move |res, act, ctx| {
            act.flushing = false;
            act.idle_flush_started = None;
            let current = act.replica_generation == generation;
            match res {
                Ok(n) if current && n > 0 => act.storage_ok(false),
                // Earlier flushes may be undone with the file (see
                // `StripeStore::flush`); the failure drops a stashed compaction.
                Err(e) if current => act.log_write_failed(&e),
                _ => {}
            }
            // Also after a flush of an earlier replica: a compaction stashed
            // since (by the new one) goes through the queue again.
            if let Some(upto) = act.compact_after_flush.take() {
                act.queue.push_back(Step::Fx(Effect::Compact { upto }));
                act.pump(ctx);
            }
        }));
    }

    /// How far to apply now, given entries committed up to `upto`: everything
    /// on an active (writes wait for it); on a standby nothing until
    /// `APPLY_BATCH` entries or `APPLY_DEFER` have gathered.
    fn apply_now_or_later(&mut self, upto: u64) -> u64 {
        let pending = self.apply_pending.map_or(0, |(p, _)| p).max(upto);
        if pending <= self.applied_index {
            // A snapshot may have covered what was pending.
            self.apply_pending = None;
            return self.applied_index;
        }
        let since = self.apply_pending.map_or_else(Instant::now, |(_, t)| t);
        let due = self.is_active()
            || pending - self.applied_index >= APPLY_BATCH
            || since.elapsed() >= APPLY_DEFER;
        if due {
            self.apply_pending = None;
            pending
        } else {
            self.apply_pending = Some((pending, since));
            self.applied_index
        }
    }

    /// Committed entries up to `upto` were applied (or applying them failed):
    /// answers the writes that waited for them.
    fn applied(&mut self, upto: u64, res: Result<Vec<(u64, kv::KvOutcome)>, StoreError>) {
        match res {
            Ok(done) => {
                self.applied_index = self.applied_index.max(upto);
                let mut answered = 0;
                let mut round_begun = false;
                for (index, outcome) in done {
                    if self.answered_at_commit.remove(&index) {
                        round_begun = true;
                        // `Abandoned`: its node stopped waiting before the
                        // write was applied, so nobody took the answer.
                        let told = KvOutcome::Done { version: index };
                        if outcome != told && outcome != KvOutcome::Abandoned {
                            tracing::error!(stripe = ?self.stripe, index, ?outcome,
                                "a write answered at its commit applied otherwise (a bug: its client was told it was written at this version)");
                        }
                    }
                    if let Some(w) = self.waiting.remove(&index) {
                        let _ = w.reply.send(Ok(outcome));
                        answered += 1;
                    }
                }
                // Those answered at the commit began this round of the linger.
                match round_begun {
                    true => self.linger.answered_more(answered),
                    false => self.linger.answered(answered, Instant::now()),
                }
                self.answered_at_commit = self.answered_at_commit.split_off(&(upto + 1));
            }
            Err(e) => self.storage_failed(&e),
        }
    }

    /// Group commit: a new batch starts once the previous one is committed
    /// (durable here and on every in-sync standby), so writes arriving
    /// meanwhile share the next fsync on every member. Starting it once the
    /// local append alone was durable kept more batches in flight, each smaller:
    /// ~10 % more CPU per write at 64 clients and ~25 % more at 16, for no more
    /// writes per second on a machine whose CPU is the limit.
    fn ready_for_batch(&self) -> bool {
        !self.busy
            && self.queue.is_empty()
            && !self.local_busy
            && self.local_queue.is_empty()
            && self
                .replica
                .as_ref()
                .is_none_or(|r| !r.own_entries_uncommitted())
    }

    fn run(&mut self, e: Effect, ctx: &mut Context<Self>) {
        match e {
            Effect::AppendLocal { entries } => {
                let rows = entries.iter().map(|(i, e)| (*i, to_cbor(e))).collect();
                self.local_queue.push_back(rows);
                self.start_local(ctx);
            }
            // `pump` takes every `Persist` with what follows it; this is the same.
            Effect::Persist {
                truncate_from,
                entries,
                promised,
            } => {
                let upto = self.applied_index;
                self.persist_and_apply(truncate_from, entries, promised, upto, Vec::new(), ctx);
            }
            Effect::Commit { upto } => {
                let upto = self.apply_now_or_later(upto);
                self.apply_committed(upto, ctx);
            }
            Effect::Send { to, msg } => self.send(to, msg, ctx),
            Effect::SendSnapshot { to } => self.send_snapshot(to, ctx),
            Effect::InstallSnapshot { at, keep_log } => {
                let (reply, changes) = match self.install_reply.take() {
                    Some((reply, changes)) => (Some(reply), changes),
                    None => (None, 0),
                };
                self.busy = true;
                let store = self.store.clone();
                ctx.spawn(
                    blocking(self.metrics.timed("install", move || {
                        store.install_snapshot(
                            (at.epoch, at.index),
                            keep_log,
                            changes,
                            &kv::request_expiry,
                        )
                    }))
                    .into_actor(self)
                    .map(move |res, act, ctx| {
                        act.busy = false;
                        let answer = match res {
                            Ok(()) => {
                                act.applied_index = at.index;
                                act.answered_at_commit.clear();
                                act.metrics.snapshots_installed.inc();
                                act.health.ok(StoragePart::Stripe, SNAPSHOT_SOURCE);
                                act.metrics.snapshot_keys_total.set(0);
                                act.metrics.snapshot_keys_done.set(0);
                                if let Some(rx) = act.receiving.take() {
                                    tracing::info!(stripe = ?act.stripe, epoch = rx.epoch,
                                            index = at.index, keys = rx.keys, bytes = rx.bytes,
                                            seconds = rx.started.elapsed().as_secs_f64(),
                                            "snapshot installed; catching up from the log");
                                }
                                Ok(())
                            }
                            Err(e) => {
                                // The replica already counts the snapshot as
                                // installed: start it again from the disk.
                                act.log_write_failed(&e);
                                Err(format!("cannot install the snapshot: {e}"))
                            }
                        };
                        if let Some(reply) = reply {
                            act.respond(reply, &StripeResponse::SnapshotStored(answer));
                        }
                        act.pump(ctx);
                    }),
                );
            }
            Effect::Compact { upto } => {
                // The store keeps every entry not yet applied here.
                let upto = upto.min(self.applied_index);
                if upto == 0 {
                    return;
                }
                if self.flushing {
                    self.wait_to_compact(upto, ctx);
                    return;
                }
                // The log may lose only what the state file holds, fsynced.
                // The state's own fsync, every `STATE_FSYNC_EVERY`, soon
                // covers the rest: a compaction waits for that one rather
                // than forcing one of its own (see `COMPACTION_WAITS`), and
                // meanwhile drops what is covered already.
                let durable = self.store.state_durable();
                let upto = if durable < upto {
                    self.wait_to_compact(upto, ctx);
                    if durable <= self.compacted_upto || self.flushing {
                        return;
                    }
                    durable
                } else {
                    // A compaction that waits for more (this one may be the
                    // next step of what was covered) keeps its clock.
                    if self
                        .compact_after_flush
                        .is_none_or(|stashed| stashed <= upto)
                    {
                        self.compact_after_flush = None;
                        self.compact_waits_since = None;
                    }
                    upto
                };
                self.busy = true;
                let generation = self.replica_generation;
                let store = self.store.clone();
                ctx.spawn(
                    blocking(self.metrics.timed("compact", move || {
                        // Nothing left up to `upto` (compacted, or covered by a
                        // snapshot): done.
                        let Some(first) = store.log_first()?.filter(|&f| f <= upto) else {
                            return Ok(upto);
                        };
                        let step = upto.min(first.saturating_add(COMPACT_STEP - 1));
                        let epoch = store
                            .entries(step, step)?
                            .first()
                            .and_then(|(_, b)| from_cbor::<Entry>(b, usize::MAX).ok())
                            .map(|e| e.epoch);
                        match epoch {
                            Some(epoch) => store.compact_log((epoch, step)).map(|()| step),
                            // Already compacted (or covered by a snapshot).
                            None => Ok(upto),
                        }
                    }))
                    .into_actor(self)
                    .map(move |res, act, ctx| {
                        act.busy = false;
                        match res {
                            // Not for a replica that started again since.
                            Ok(done) if done < upto && act.replica_generation == generation => {
                                act.note_compacted(done);
                                act.compact_rest = act.compact_rest.max(Some(upto));
                            }
                            Ok(done) => act.note_compacted(done.min(upto)),
                            // The file lost commits its state had (see
                            // `StripeStore::flush`): start again from it.
                            Err(e @ (StoreError::StateReopened { .. } | StoreError::Corrupt { .. })) => {
                                act.log_write_failed(&e)
                            }
                            Err(e) => {
                                tracing::warn!(error = %e, "log compaction failed; the log stays longer")
                            }
                        }
                        act.pump(ctx);
                    }),
                );
            }
            Effect::Propose(p) => self.propose(p, ctx),
            Effect::ReadReady { id, .. } => {
                if let Some(read) = self.reads.remove(&id) {
                    read.answer(&self.store);
                }
            }
            Effect::SteppedDown { epoch } => {
                tracing::info!(stripe = ?self.stripe, epoch, "no longer active; pending requests go to the new active");
                for (_, w) in std::mem::take(&mut self.waiting) {
                    let _ = w.reply.send(Err(ServeError::SteppedDown));
                }
                for (_, read) in std::mem::take(&mut self.reads) {
                    read.fail(ServeError::SteppedDown);
                }
            }
        }
    }

    /// Sends a snapshot of the applied state to member `to` from a blocking
    /// thread holding one read transaction (a consistent view while writes go
    /// on), part by part, each acknowledged before the next; then reports it.
    fn send_snapshot(&mut self, to: u64, ctx: &mut Context<Self>) {
        let (Some(stripe), Some(peer), Some(r)) =
            (self.stripe, self.peer_of(to), self.replica.as_ref())
        else {
            return;
        };
        let Role::Active { epoch } = r.role() else {
            return;
        };
        if !self.sending.insert(to) {
            return;
        }
        let store = self.store.clone();
        let net = self.net.clone();
        let addrs = addresses(&self.book, &peer);
        let sent = self.metrics.snapshot_bytes_sent.clone();
        tracing::info!(stripe, epoch, %peer, "sending a snapshot to a member too far behind for log entries");
        let started = Instant::now();
        ctx.spawn(
            async move {
                tokio::task::spawn_blocking(move || {
                    stream_snapshot(&store, &net, peer, addrs, stripe, epoch, &sent)
                })
                .await
                .unwrap_or_else(|e| Err(format!("snapshot task failed: {e}")))
            }
            .into_actor(self)
            .map(move |res, act, ctx| {
                act.sending.remove(&to);
                let (at, ok) = match res {
                    Ok((at, keys, bytes)) => {
                        tracing::info!(stripe, %peer, index = at.index, keys, bytes,
                            seconds = started.elapsed().as_secs_f64(), "snapshot sent and installed");
                        (at, true)
                    }
                    Err(e) => {
                        tracing::warn!(stripe, %peer, error = %e, "snapshot transfer failed; it will be offered again");
                        (LogPos::default(), false)
                    }
                };
                if let Some(r) = act.replica.as_mut() {
                    let fx = r.on_snapshot_sent(to, at, ok);
                    act.push(fx, ctx);
                }
            }),
        );
    }

    /// A part of a snapshot from the active. Parts are answered as they arrive
    /// (in order) and staged one at a time behind the answer, so the next part
    /// travels while this one is written; the last part is answered once every
    /// part is staged and the snapshot installed.
    #[allow(clippy::too_many_arguments)]
    fn receive_snapshot_part(
        &mut self,
        epoch: u64,
        at: LogPos,
        seq: u64,
        kv: Vec<(String, String, u64, ByteBuf)>,
        requests: Vec<(String, ByteBuf)>,
        total_keys: u64,
        changes: u64,
        done: bool,
        reply: Responder,
        ctx: &mut Context<Self>,
    ) {
        let refuse = |act: &Self, reply, why: String| {
            act.respond(reply, &StripeResponse::SnapshotStored(Err(why)))
        };
        let Some(r) = self.replica.as_ref() else {
            return refuse(self, reply, "not a member".into());
        };
        if epoch < r.promised() {
            let why = format!("epoch {epoch} is stale (promised {})", r.promised());
            return refuse(self, reply, why);
        }
        let fresh = seq == 0;
        if fresh {
            // An install pending or under way would be undone by a new
            // transfer's reset of the staging tables.
            if self.receiving.as_ref().is_some_and(|rx| rx.staging_busy)
                || self.install_reply.is_some()
            {
                let why = "an earlier snapshot is still being written; offer it again".into();
                return refuse(self, reply, why);
            }
            tracing::info!(stripe = ?self.stripe, epoch, index = at.index, keys = total_keys,
                "receiving a snapshot from the active");
            self.transfers_started += 1;
            self.receiving = Some(Receiving {
                transfer: self.transfers_started,
                epoch,
                at,
                next_seq: 0,
                keys: 0,
                bytes: 0,
                started: Instant::now(),
                last_log: Instant::now(),
                staging: VecDeque::new(),
                staging_busy: false,
                failed: None,
                finish: None,
                held: VecDeque::new(),
                parts_staged: 0,
                early: BTreeMap::new(),
            });
            self.metrics.snapshot_keys_total.set(total_keys as i64);
            self.metrics.snapshot_keys_done.set(0);
        }
        let Some(rx) = self
            .receiving
            .as_mut()
            .filter(|rx| rx.epoch == epoch && rx.at == at)
            .filter(|rx| seq >= rx.next_seq && seq < rx.next_seq + PARTS_AHEAD)
        else {
            let why = format!("snapshot part {seq} out of order; start again");
            return refuse(self, reply, why);
        };
        if let Some(why) = rx.failed.clone() {
            return refuse(self, reply, why);
        }
        let kv: Vec<kiln_persistence::KvRow> = kv
            .into_iter()
            .map(|(m, k, ver, v)| (m, k, ver, v.into_vec()))
            .collect();
        let requests: Vec<(String, Vec<u8>)> = requests
            .into_iter()
            .map(|(k, v)| (k, v.into_vec()))
            .collect();
        // Parts may overtake each other on the way: take them in order.
        rx.early.insert(
            seq,
            (
                StagedPart {
                    reset: fresh,
                    kv,
                    requests,
                },
                done.then_some(changes),
                reply,
            ),
        );
        let mut ready = Vec::new();
        while let Some((part, finish, reply)) = rx.early.remove(&rx.next_seq) {
            rx.next_seq += 1;
            rx.staging.push_back(part);
            match finish {
                Some(changes) => rx.finish = Some((reply, changes)),
                None if rx.staging.len() > STAGING_AHEAD => rx.held.push_back(reply),
                None => ready.push(reply),
            }
        }
        for reply in ready {
            self.respond(reply, &StripeResponse::SnapshotStored(Ok(())));
        }
        self.stage_next(ctx);
    }

    /// Writes the next received snapshot part; after the last, installs.
    fn stage_next(&mut self, ctx: &mut Context<Self>) {
        let Some(rx) = self.receiving.as_mut() else {
            return;
        };
        if rx.staging_busy {
            return;
        }
        let Some(part) = rx.staging.pop_front() else {
            if let Some((reply, changes)) = rx.finish.take() {
                self.finish_snapshot(reply, changes, ctx);
            }
            return;
        };
        rx.staging_busy = true;
        rx.parts_staged += 1;
        let transfer = rx.transfer;
        // Now and then a staged part is fsynced, so that the install at the end
        // has little left to write.
        let durable = rx.parts_staged % DURABLE_EVERY_PARTS == 0;
        let keys = part.kv.len() as u64;
        let bytes: u64 = part
            .kv
            .iter()
            .map(|(m, k, _, v)| (m.len() + k.len() + v.len()) as u64)
            .sum::<u64>()
            + part
                .requests
                .iter()
                .map(|(k, v)| (k.len() + v.len()) as u64)
                .sum::<u64>();
        let store = self.store.clone();
        ctx.spawn(
            blocking(self.metrics.timed("stage", move || {
                store.stage_snapshot(part.reset, &part.kv, &part.requests, durable)
            }))
            .into_actor(self)
            .map(move |res, act, ctx| {
                let Some(rx) = act.receiving.as_mut().filter(|rx| rx.transfer == transfer) else {
                    return;
                };
                rx.staging_busy = false;
                match res {
                    Ok(()) => {
                        act.metrics.snapshot_bytes_received.inc_by(bytes);
                        act.metrics.snapshot_keys_received.inc_by(keys);
                        rx.keys += keys;
                        rx.bytes += bytes;
                        act.metrics.snapshot_keys_done.set(rx.keys as i64);
                        if rx.last_log.elapsed() >= Duration::from_secs(2) {
                            rx.last_log = Instant::now();
                            tracing::info!(stripe = ?act.stripe, keys = rx.keys,
                                    bytes = rx.bytes, "receiving snapshot");
                        }
                    }
                    Err(e) => {
                        rx.failed = Some(format!("cannot store the snapshot: {e}"));
                        rx.staging.clear();
                        act.health
                            .failing(StoragePart::Stripe, SNAPSHOT_SOURCE, e.to_string());
                    }
                }
                let failed = rx.failed.clone();
                let released: Vec<Responder> = if failed.is_some() {
                    rx.held.drain(..).collect()
                } else if rx.staging.len() <= STAGING_AHEAD {
                    rx.held.pop_front().into_iter().collect()
                } else {
                    Vec::new()
                };
                for reply in released {
                    let answer = match &failed {
                        Some(why) => Err(why.clone()),
                        None => Ok(()),
                    };
                    act.respond(reply, &StripeResponse::SnapshotStored(answer));
                }
                act.stage_next(ctx);
            }),
        );
    }

    /// Every part is staged: install the snapshot if the replica still wants it.
    fn finish_snapshot(&mut self, reply: Responder, changes: u64, ctx: &mut Context<Self>) {
        let Some(rx) = self.receiving.as_ref() else {
            return;
        };
        if let Some(why) = rx.failed.clone() {
            self.receiving = None;
            return self.respond(reply, &StripeResponse::SnapshotStored(Err(why)));
        }
        let (epoch, at) = (rx.epoch, rx.at);
        let Some(r) = self.replica.as_mut() else {
            return;
        };
        // Committed already (an earlier transfer's answer was lost, or the
        // member caught up meanwhile): committed prefixes are the same on
        // every member, so it holds all the snapshot does — said so, the
        // active goes on with log entries instead of sending it again.
        let held = epoch >= r.promised() && at.index <= r.commit_index();
        let fx = r.on_snapshot_received(epoch, at);
        if fx
            .iter()
            .any(|e| matches!(e, Effect::InstallSnapshot { .. }))
        {
            self.install_reply = Some((reply, changes));
            self.push(fx, ctx);
        } else {
            self.receiving = None;
            let answer = match held {
                true => Ok(()),
                false => Err("the snapshot is older than what this member holds".into()),
            };
            // After what is queued: the entries behind `commit` are durable
            // before the active counts them held.
            self.queue.extend(fx.into_iter().map(Step::Fx));
            self.queue
                .push_back(Step::Reply(reply, StripeResponse::SnapshotStored(answer)));
            self.pump(ctx);
        }
    }

    /// Runs the next local append (one at a time, in order).
    fn start_local(&mut self, ctx: &mut Context<Self>) {
        if self.local_busy {
            return;
        }
        let Some(rows) = self.local_queue.pop_front() else {
            return;
        };
        self.local_busy = true;
        let last = rows.last().map(|r: &(u64, Vec<u8>)| r.0).unwrap_or(0);
        let generation = self.replica_generation;
        let store = self.store.clone();
        ctx.spawn(
            blocking(
                self.metrics
                    .timed("append", move || store.persist(None, &rows, None)),
            )
            .into_actor(self)
            .map(move |res, act, ctx| {
                act.local_busy = false;
                match res {
                    Ok(()) if act.replica_generation != generation => {}
                    Ok(()) => {
                        act.storage_ok(true);
                        if let Some(r) = act.replica.as_mut() {
                            let fx = r.on_persisted(last);
                            act.observe_commits(&fx);
                            act.queue.extend(fx.into_iter().map(Step::Fx));
                        }
                    }
                    // The entries of this append must never count as durable
                    // (a later append's success would cover them): start over.
                    Err(e) if act.replica_generation == generation => act.log_write_failed(&e),
                    Err(e) => act.storage_failed(&e),
                }
                act.start_local(ctx);
                act.pump(ctx);
            }),
        );
    }

    /// A log append (`append`) or a flush of applied state succeeded: once
    /// both did since the last failure, restarts no longer back off.
    fn storage_ok(&mut self, append: bool) {
        if append {
            // A durable append: a snapshot that could not be staged before
            // would be now.
            self.health.ok(StoragePart::Stripe, SNAPSHOT_SOURCE);
            self.appended_since_failure = true;
        } else {
            self.flushed_since_failure = true;
        }
        if self.appended_since_failure && self.flushed_since_failure {
            self.storage_failures = 0;
        }
    }

    fn storage_failed(&mut self, e: &StoreError) {
        tracing::error!(error = %e, stripe = ?self.stripe, "stripe storage failed");
        for (_, w) in std::mem::take(&mut self.waiting) {
            let _ = w.reply.send(Err(ServeError::Unsettled(e.to_string())));
        }
    }

    /// A write to this member's log failed: its in-memory log is ahead of its
    /// disk, so nothing queued behind the write may be acknowledged (an ack or a
    /// promise that is not durable could lose an acknowledged write). The replica
    /// starts again from what the disk holds; the active sends the rest again.
    fn log_write_failed(&mut self, e: &StoreError) {
        self.compact_after_flush = None;
        self.compact_waits_since = None;
        self.compact_rest = None;
        // Appended writes may still be committed: not "not persisted".
        for (_, w) in std::mem::take(&mut self.waiting) {
            let _ = w.reply.send(Err(ServeError::Unsettled(e.to_string())));
        }
        for step in std::mem::take(&mut self.queue) {
            let Step::Reply(reply, resp) = step else {
                continue;
            };
            self.respond(reply, &refused(resp, e));
        }
        for (_, w) in std::mem::take(&mut self.batch) {
            let _ = w.reply.send(Err(ServeError::Storage(e.to_string())));
        }
        for (_, read) in std::mem::take(&mut self.reads) {
            read.fail(ServeError::Storage(e.to_string()));
        }
        // A snapshot being received starts over once the replica is back.
        self.receiving = None;
        if let Some((reply, _)) = self.install_reply.take() {
            let why = format!("cannot store the snapshot: {e}");
            self.respond(reply, &StripeResponse::SnapshotStored(Err(why)));
        }
        // Still behind if the one before was; in temporary mode also when it
        // was not: a reopen takes the log back to its last fsynced commit (a
        // promise), so entries it acknowledged may be gone.
        // (A second failure before the restart keeps what the first found.)
        self.restart_behind = match self.replica.as_ref() {
            Some(r) => r.started_empty() || !self.store.durable(),
            None => self.restart_behind || !self.store.durable(),
        };
        self.replica = None;
        self.replica_generation += 1;
        self.local_queue.clear();
        // What the failed write would have covered is not on the disk.
        self.apply_pending = None;
        // A failure long after the last one starts the backoff afresh (an
        // idle member may never have written since).
        if self
            .last_storage_failure
            .is_some_and(|t| t.elapsed() >= STORAGE_FAILURES_FORGOTTEN)
        {
            self.storage_failures = 0;
        }
        self.last_storage_failure = Some(Instant::now());
        self.storage_failures += 1;
        (self.appended_since_failure, self.flushed_since_failure) = (false, false);
        let retry = storage_retry(self.storage_failures);
        tracing::error!(stripe = ?self.stripe, error = %e, retry_s = retry.as_secs(),
            failures = self.storage_failures,
            "a stripe log write failed; the stripe starts again from its disk (free space or fix the disk)");
        self.storage_down = Some((e.to_string(), Instant::now() + retry));
        self.health
            .failing(StoragePart::Stripe, LOG_SOURCE, e.to_string());
    }

    /// Starts the replica again from the disk once the pause after a failed log
    /// write (see `storage_retry`) has passed.
    fn restart_after_storage_failure(&mut self, ctx: &mut Context<Self>) {
        let (Some(stripe), Some((_, at))) = (self.stripe, &self.storage_down) else {
            return;
        };
        // Storage jobs of the failed replica finish first (their results are
        // then dropped: the replica is gone).
        if Instant::now() < *at || self.busy || self.local_busy {
            return;
        }
        self.busy = true;
        let store = self.store.clone();
        ctx.spawn(
            // A small durable write to each file first: while the disk still
            // fails, the stripe stays down without asking the control plane
            // for a new epoch each time.
            blocking(move || {
                store.probe(stripe)?;
                recover_stripe(&store, stripe)
            })
            .into_actor(self)
            .map(move |res, act, ctx| {
                act.busy = false;
                match res {
                    Ok(recovered) => {
                        act.storage_down = None;
                        // The probe's small fsynced writes went through (a
                        // nearly full disk may still fail a larger one: the
                        // status then shows it again).
                        act.health.ok(StoragePart::Stripe, LOG_SOURCE);
                        // The new replica learns the stripe's view at the next tick.
                        act.view_version = 0;
                        if let Some(r) = recovered {
                            act.start_replica_from(stripe, r);
                        }
                    }
                    Err(e) => {
                        act.storage_failures += 1;
                        let retry = storage_retry(act.storage_failures);
                        tracing::warn!(stripe, error = %e, retry_s = retry.as_secs(),
                            "the stripe data still cannot be written or read back; trying again");
                        act.storage_down = Some((e.to_string(), Instant::now() + retry));
                        act.health
                            .failing(StoragePart::Stripe, LOG_SOURCE, e.to_string());
                    }
                }
                act.pump(ctx);
            }),
        );
    }

    fn respond(&self, reply: Responder, resp: &StripeResponse) {
        respond_with(&self.net, reply, resp);
    }

    fn peer_of(&self, node: u64) -> Option<PeerId> {
        self.applied
            .read()
            .ok()?
            .state
            .peer_of(node)
            .and_then(|p| p.parse().ok())
    }

    fn send(&mut self, to: u64, msg: Message, ctx: &mut Context<Self>) {
        let (Some(stripe), Some(peer)) = (self.stripe, self.peer_of(to)) else {
            return;
        };
        let addrs = addresses(&self.book, &peer);
        let appended_from = match &msg {
            Message::Append { prev, entries, .. } if !entries.is_empty() => Some(prev.index + 1),
            _ => None,
        };
        let call = self.net.call(
            peer,
            addrs,
            stripe_request(&StripeRequest::Replicate { stripe, msg }),
        );
        ctx.spawn(
            async move { tokio::time::timeout(REPLICATION_TIMEOUT, call).await }
                .into_actor(self)
                .map(move |res, act, ctx| {
                    let reply = match res {
                        Ok(Ok(r)) => stripe_response(r),
                        Ok(Err(e)) => Err(e.to_string()),
                        Err(_) => Err("timed out".into()),
                    };
                    match reply {
                        Ok(StripeResponse::Replicated(Some(m))) => {
                            if let Some(r) = act.replica.as_mut() {
                                let fx = r.on_message(to, m);
                                act.push(fx, ctx);
                            }
                        }
                        other => {
                            if let Err(e) = other {
                                tracing::trace!(%peer, error = %e, "replication request failed");
                            }
                            if let (Some(r), Some(from)) = (act.replica.as_mut(), appended_from) {
                                r.on_append_lost(to, from);
                            }
                        }
                    }
                }),
        );
    }

    /// Whether `p` was not logged yet in its epoch (and remembers it).
    fn first_time_logged(&mut self, p: &Proposal) -> bool {
        if self.proposals_logged.iter().any(|q| q.epoch() != p.epoch()) {
            self.proposals_logged.clear();
        }
        self.proposals_logged.insert(p.clone())
    }

    fn propose(&mut self, p: Proposal, ctx: &mut Context<Self>) {
        let Some(stripe) = self.stripe else { return };
        match p.clone() {
            Proposal::Renew { epoch } => {
                tracing::info!(stripe, epoch, "restarted as active: asking for a new epoch");
                let cmd = ControlCommand::Renew {
                    stripe,
                    epoch,
                    node: self.me,
                };
                ctx.spawn(self.control.send(Propose(cmd)).into_actor(self).map(
                    move |res, act, _| {
                        if !matches!(res, Ok(Ok(ControlOutcome::Promoted { .. }))) {
                            if let Some(r) = act.replica.as_mut() {
                                r.on_proposal_failed(&p);
                            }
                        }
                    },
                ));
            }
            Proposal::HandOver { epoch, to } => {
                let in_sync = self
                    .applied
                    .read()
                    .ok()
                    .and_then(|a| a.state.stripes.get(&stripe).map(|s| s.in_sync.clone()))
                    .unwrap_or_default();
                tracing::info!(stripe, epoch, to, "handing the active role over");
                let cmd = ControlCommand::Promote {
                    stripe,
                    epoch,
                    node: to,
                    in_sync,
                };
                ctx.spawn(self.control.send(Propose(cmd)).into_actor(self).map(
                    move |res, act, _| {
                        if !matches!(res, Ok(Ok(ControlOutcome::Promoted { .. }))) {
                            if let Some(r) = act.replica.as_mut() {
                                r.on_proposal_failed(&p);
                            }
                        }
                    },
                ));
            }
            Proposal::ConfirmActive { epoch } => {
                ctx.spawn(
                    self.control
                        .send(ConfirmActive { stripe, epoch })
                        .into_actor(self)
                        .map(move |res, act, ctx| {
                            let Some(r) = act.replica.as_mut() else {
                                return;
                            };
                            match res {
                                Ok(Ok(current)) => {
                                    if !current {
                                        tracing::warn!(
                                            stripe,
                                            epoch,
                                            "the control plane says this node is no longer active"
                                        );
                                    }
                                    let fx = r.on_confirmed(epoch, current);
                                    act.push(fx, ctx);
                                }
                                _ => r.on_proposal_failed(&p),
                            }
                        }),
                );
            }
            Proposal::Election { epoch } => {
                if self.first_time_logged(&p) {
                    tracing::info!(
                        stripe,
                        epoch,
                        "the active is silent; asking for an election"
                    );
                } else {
                    tracing::debug!(stripe, epoch, "asking for an election again");
                }
                self.control.do_send(RequestElection { stripe, epoch });
            }
            Proposal::InSync {
                epoch,
                node,
                in_sync,
                removals,
            } => {
                let cmd = ControlCommand::SetInSync {
                    stripe,
                    epoch,
                    by: self.me,
                    node,
                    in_sync,
                    removals: Some(removals),
                };
                if self.first_time_logged(&p) {
                    tracing::info!(stripe, epoch, node, in_sync, "proposing an in-sync change");
                } else {
                    tracing::debug!(
                        stripe,
                        epoch,
                        node,
                        in_sync,
                        "proposing an in-sync change again"
                    );
                }
                ctx.spawn(self.control.send(Propose(cmd)).into_actor(self).map(
                    move |res, act, _| {
                        let Some(r) = act.replica.as_mut() else { return };
                        match res {
                            Ok(Ok(ControlOutcome::Rejected { reason })) => {
                                tracing::info!(stripe, epoch, node, in_sync, %reason, "in-sync change refused");
                                r.on_proposal_rejected(&p);
                            }
                            Ok(Ok(_)) => {}
                            _ => r.on_proposal_failed(&p),
                        }
                    },
                ));
            }
        }
    }

    /// Appends the waiting client writes as one batch (one log append, one fsync).
    fn flush_batch(&mut self, ctx: &mut Context<Self>) {
        if self.batch.is_empty() || !self.batch_due(ctx) {
            return;
        }
        self.linger.started();
        let batch = std::mem::take(&mut self.batch);
        let Some(r) = self.replica.as_mut() else {
            for (_, w) in batch {
                let _ = w
                    .reply
                    .send(Err(ServeError::NotMember(self.stripe.unwrap_or(0))));
            }
            return;
        };
        let (datas, waiting): (Vec<Vec<u8>>, Vec<Waiting>) = batch.into_iter().unzip();
        let n = datas.len() as u64;
        match r.propose(datas) {
            Ok((indexes, fx)) => {
                self.metrics.writes.inc_by(n);
                self.metrics.write_batches.inc();
                if let Some(last) = indexes.last() {
                    self.proposed.push_back((*last, Instant::now()));
                }
                for (i, w) in indexes.into_iter().zip(waiting) {
                    self.waiting.insert(i, w);
                }
                self.push(fx, ctx);
            }
            Err(e) => {
                for w in waiting {
                    let _ = w.reply.send(Err(ServeError::NotActive {
                        stripe: self.stripe.unwrap_or(0),
                        epoch: e.epoch,
                    }));
                }
            }
        }
    }

    /// Whether the writes gathered so far go now (see `super::linger`);
    /// otherwise a timer looks again when the wait is over.
    fn batch_due(&mut self, ctx: &mut Context<Self>) -> bool {
        let Some(wait) = self.linger.wait(Instant::now()) else {
            return true;
        };
        if !self.linger_timer {
            self.linger_timer = true;
            ctx.run_later(wait, |act, ctx| {
                act.linger_timer = false;
                act.pump(ctx);
            });
        }
        false
    }

    fn not_active(&self) -> ServeError {
        let epoch = self.replica.as_ref().map(|r| r.view().epoch).unwrap_or(0);
        ServeError::NotActive {
            stripe: self.stripe.unwrap_or(0),
            epoch,
        }
    }

    fn is_active(&self) -> bool {
        self.replica
            .as_ref()
            .is_some_and(|r| matches!(r.role(), Role::Active { .. }))
    }

    fn write(
        &mut self,
        cmd: KvCommand,
        first_attempt: bool,
        reply: WriteReply,
        ctx: &mut Context<Self>,
    ) {
        if let Some((e, _)) = &self.storage_down {
            // Still the active in the control plane's view: nobody else can take
            // the write, so say why it fails; otherwise the sender retries at the
            // new active.
            let still_active = self
                .stripe
                .and_then(|k| stripe_view(&self.applied, k))
                .is_some_and(|v| v.active == Some(self.me));
            let answer = if still_active {
                ServeError::Storage(e.clone())
            } else {
                self.not_active()
            };
            let _ = reply.send(Err(answer));
            return;
        }
        if !self.is_active() {
            let _ = reply.send(Err(self.not_active()));
            return;
        }
        let cmd = cmd.stamped_at(crate::membership::unix_ms());
        let at_commit = cmd.done_at_commit(first_attempt);
        self.batch
            .push((kv::encode(&cmd), Waiting { reply, at_commit }));
        self.linger.arrived(Instant::now());
        if self.ready_for_batch() {
            self.flush_batch(ctx);
        }
    }

    fn read(
        &mut self,
        map: String,
        key: String,
        stale: bool,
        reply: ReadReply,
        ctx: &mut Context<Self>,
    ) {
        let Some(r) = self.replica.as_ref() else {
            let _ = reply.send(Err(ServeError::NotMember(self.stripe.unwrap_or(0))));
            return;
        };
        if stale {
            // The control state may still count a member in sync that started
            // without its data or is taking a snapshot: it would answer from
            // what it has, missing acknowledged writes.
            if r.started_empty() || self.receiving.is_some() {
                let _ = reply.send(Err(ServeError::Behind(self.stripe.unwrap_or(0))));
                return;
            }
            let _ = reply.send(
                self.store
                    .get(&map, &key)
                    .map_err(|e| ServeError::Storage(e.to_string())),
            );
            return;
        }
        self.confirmed_read(PendingRead::Value { map, key, reply }, ctx);
    }

    /// Answers `read` once this node has confirmed it is still the active
    /// (every in-sync standby acknowledged a heartbeat of its epoch), so the
    /// answer holds every write acknowledged before it was asked.
    fn confirmed_read(&mut self, read: PendingRead, ctx: &mut Context<Self>) {
        let id = self.next_read;
        self.next_read += 1;
        let Some(r) = self.replica.as_mut() else {
            read.fail(ServeError::NotMember(self.stripe.unwrap_or(0)));
            return;
        };
        match r.read(id) {
            Ok(fx) => {
                self.reads.insert(id, read);
                self.push(fx, ctx);
            }
            Err(_) => read.fail(self.not_active()),
        }
    }

    /// Entries each other member is behind (known on the active), by peer id.
    fn member_lags(&self) -> BTreeMap<String, u64> {
        let Some(r) = self.replica.as_ref() else {
            return BTreeMap::new();
        };
        r.lags()
            .into_iter()
            .filter_map(|(n, l)| self.peer_of(n).map(|p| (p.to_string(), l)))
            .collect()
    }

    fn serve(&mut self, msg: ServeStripe, ctx: &mut Context<Self>) {
        let ServeStripe {
            peer,
            request,
            reply,
        } = msg;
        let mine = |k: u32| self.stripe == Some(k) && self.replica.is_some();
        match request {
            StripeRequest::Replicate { stripe, msg } if mine(stripe) => {
                let from = crate::control::types::node_id_of(&peer.to_string());
                let Some(r) = self.replica.as_mut() else {
                    return;
                };
                let mut fx = r.on_message(from, msg);
                // The member's answer goes back on this request, after whatever
                // it had to make durable first.
                let pos = fx.iter().position(
                    |e| matches!(e, Effect::Send { to, msg: Message::AppendAck { .. } } if *to == from),
                );
                let answer = pos.and_then(|p| match fx.remove(p) {
                    Effect::Send { msg, .. } => Some((p, msg)),
                    _ => None,
                });
                let mut steps: Vec<Step> = fx.into_iter().map(Step::Fx).collect();
                match answer {
                    Some((p, m)) => {
                        steps.insert(p, Step::Reply(reply, StripeResponse::Replicated(Some(m))))
                    }
                    None => steps.push(Step::Reply(reply, StripeResponse::Replicated(None))),
                }
                self.queue.extend(steps);
                self.pump(ctx);
            }
            StripeRequest::Prepare { stripe, epoch } if mine(stripe) => {
                let Some(r) = self.replica.as_mut() else {
                    return;
                };
                let (pos, behind, fx) = r.on_prepare(epoch);
                tracing::info!(
                    stripe,
                    epoch,
                    last = pos.index,
                    started_empty = behind,
                    "an election asked for this standby's position"
                );
                self.queue.extend(fx.into_iter().map(Step::Fx));
                let answer = if behind {
                    StripeResponse::PreparedBehind(pos)
                } else {
                    StripeResponse::Prepared(Ok(pos))
                };
                self.queue.push_back(Step::Reply(reply, answer));
                self.pump(ctx);
            }
            StripeRequest::Ping { .. } => {
                let active_in = match self.replica.as_ref().map(|r| r.role()) {
                    Some(Role::Active { epoch }) => Some(epoch),
                    _ => None,
                };
                let started_empty = self.replica.as_ref().is_some_and(Replica::started_empty);
                self.respond(
                    reply,
                    &StripeResponse::Pong {
                        active_in,
                        started_empty,
                    },
                );
            }
            // While its storage is down (no replica), the active still says
            // why a write fails (`507`), rather than that it is no member.
            StripeRequest::Write {
                stripe,
                cmd,
                first_attempt,
            } if mine(stripe) || (self.stripe == Some(stripe) && self.storage_down.is_some()) => {
                let (tx, rx) = oneshot::channel();
                self.write(cmd, first_attempt, tx, ctx);
                let net = self.net.clone();
                actix_rt::spawn(async move {
                    let resp = rx.await.unwrap_or(Err(ServeError::SteppedDown));
                    respond_with(&net, reply, &StripeResponse::Written(resp));
                });
            }
            StripeRequest::Read {
                stripe,
                map,
                key,
                stale,
            } if mine(stripe) => {
                let (tx, rx) = oneshot::channel();
                self.read(map, key, stale, tx, ctx);
                let net = self.net.clone();
                actix_rt::spawn(async move {
                    let resp = rx
                        .await
                        .unwrap_or(Err(ServeError::SteppedDown))
                        .map(|v| v.map(|(ver, val)| (ver, ByteBuf::from(val))));
                    respond_with(&net, reply, &StripeResponse::Value(resp));
                });
            }
            StripeRequest::HandOver { stripe, to } if mine(stripe) => {
                let to = match to.map(|p| crate::control::types::node_id_of(&p)) {
                    Some(n) if self.peer_of(n).is_none() => {
                        self.respond(
                            reply,
                            &StripeResponse::HandedOver(Err("unknown peer".into())),
                        );
                        return;
                    }
                    other => other,
                };
                let (tx, rx) = oneshot::channel();
                ctx.notify(HandOver { to, reply: tx });
                let net = self.net.clone();
                let applied = self.applied.clone();
                actix_rt::spawn(async move {
                    let resp = match tokio::time::timeout(Duration::from_secs(10), rx).await {
                        Ok(Ok(Ok(active))) => Ok(active
                            .and_then(|n| applied.read().ok()?.state.peer_of(n).map(String::from))),
                        Ok(Ok(Err(e))) => Err(e),
                        _ => Err("the handover did not complete in time".into()),
                    };
                    respond_with(&net, reply, &StripeResponse::HandedOver(resp));
                });
            }
            StripeRequest::SnapshotChunk {
                stripe,
                epoch,
                at,
                seq,
                kv,
                requests,
                total_keys,
                changes,
                done,
            } if mine(stripe) => self.receive_snapshot_part(
                epoch, at, seq, kv, requests, total_keys, changes, done, reply, ctx,
            ),
            StripeRequest::Keys {
                stripe,
                map,
                prefix,
                after,
                limit,
            } if mine(stripe) => {
                // Listed by the active, once confirmed: a standby (or a new
                // active before its first commit) may not have applied every
                // acknowledged write yet.
                let (tx, rx) = oneshot::channel();
                let read = PendingRead::Keys {
                    map,
                    prefix,
                    after,
                    limit: limit as usize,
                    reply: tx,
                };
                self.confirmed_read(read, ctx);
                let net = self.net.clone();
                actix_rt::spawn(async move {
                    let keys = rx.await.unwrap_or(Err(ServeError::SteppedDown));
                    respond_with(&net, reply, &StripeResponse::Keys(keys));
                });
            }
            StripeRequest::Lags { stripe } if mine(stripe) => {
                let lags = match self.is_active() {
                    true => Ok(self.member_lags()),
                    false => Err(self.not_active()),
                };
                self.respond(reply, &StripeResponse::Lags(lags));
            }
            other => {
                let stripe = match other {
                    StripeRequest::Replicate { stripe, .. }
                    | StripeRequest::Prepare { stripe, .. }
                    | StripeRequest::Ping { stripe }
                    | StripeRequest::Write { stripe, .. }
                    | StripeRequest::Read { stripe, .. }
                    | StripeRequest::HandOver { stripe, .. }
                    | StripeRequest::SnapshotChunk { stripe, .. }
                    | StripeRequest::Keys { stripe, .. }
                    | StripeRequest::Lags { stripe }
                    | StripeRequest::Relay { stripe, .. } => stripe,
                };
                let err = ServeError::NotMember(stripe);
                let resp = match other {
                    StripeRequest::Prepare { .. } => StripeResponse::Prepared(Err(err)),
                    StripeRequest::Write { .. } => StripeResponse::Written(Err(err)),
                    StripeRequest::Read { .. } => StripeResponse::Value(Err(err)),
                    StripeRequest::Keys { .. } => StripeResponse::Keys(Err(err)),
                    StripeRequest::Lags { .. } => StripeResponse::Lags(Err(err)),
                    StripeRequest::HandOver { .. } => {
                        StripeResponse::HandedOver(Err(err.to_string()))
                    }
                    StripeRequest::SnapshotChunk { .. } => {
                        StripeResponse::SnapshotStored(Err(err.to_string()))
                    }
                    _ => StripeResponse::Replicated(None),
                };
                self.respond(reply, &resp);
            }
        }
    }
}

/// Bytes of rows in one snapshot part (a part must fit one request frame; a
/// single value may be up to 3 MiB and is sent alone).
const SNAPSHOT_PART_BYTES: usize = 1024 * 1024;

/// Runs on a blocking thread: sends the applied state as a snapshot to `peer`,
/// part by part. Returns the position it covers, keys and bytes sent.
fn stream_snapshot(
    store: &StripeStore,
    net: &NetHandle,
    peer: PeerId,
    addrs: Vec<kiln_net::Multiaddr>,
    stripe: u32,
    epoch: u64,
    sent: &Counter,
) -> Result<(LogPos, u64, u64), String> {
    let source = store.snapshot_source().map_err(|e| e.to_string())?;
    let at_epoch = if source.applied == source.base.1 {
        source.base.0
    } else {
        source
            .applied_entry
            .as_deref()
            .and_then(|b| from_cbor::<Entry>(b, usize::MAX).ok())
            .map(|e| e.epoch)
            .ok_or_else(|| format!("entry {} is not in the log", source.applied))?
    };
    let at = LogPos {
        epoch: at_epoch,
        index: source.applied,
    };
    let total_keys = source.key_count().map_err(|e| e.to_string())?;
    let answer = |resp: Result<Response, kiln_net::CallError>| -> Result<(), String> {
        match resp {
            Ok(resp) => match stripe_response(resp)? {
                StripeResponse::SnapshotStored(r) => r,
                other => Err(format!("unexpected answer {other:?}")),
            },
            Err(e) => Err(e.to_string()),
        }
    };
    // The first part goes alone (it starts the transfer at the member); then up
    // to PARTS_IN_FLIGHT at once, so reading, the network and the member's
    // writes overlap.
    let mut in_flight = VecDeque::new();
    let mut send = |req: StripeRequest| -> Result<(), String> {
        let first = matches!(req, StripeRequest::SnapshotChunk { seq: 0, .. });
        in_flight.push_back(net.call(peer, addrs.clone(), stripe_request(&req)));
        while in_flight.len() >= PARTS_IN_FLIGHT || (first && !in_flight.is_empty()) {
            if let Some(call) = in_flight.pop_front() {
                answer(futures::executor::block_on(call))?;
            }
        }
        Ok(())
    };
    let (mut seq, mut keys, mut bytes) = (0u64, 0u64, 0u64);
    let mut after_key: Option<(String, String)> = None;
    loop {
        let rows = source
            .kv_batch(after_key.as_ref(), SNAPSHOT_PART_BYTES)
            .map_err(|e| e.to_string())?;
        let Some(last) = rows.last() else { break };
        after_key = Some((last.0.clone(), last.1.clone()));
        let size: u64 = rows
            .iter()
            .map(|r| (r.0.len() + r.1.len() + r.3.len()) as u64)
            .sum();
        keys += rows.len() as u64;
        send(StripeRequest::SnapshotChunk {
            stripe,
            epoch,
            at,
            seq,
            kv: rows
                .into_iter()
                .map(|(m, k, v, val)| (m, k, v, ByteBuf::from(val)))
                .collect(),
            requests: Vec::new(),
            total_keys,
            changes: source.changes,
            done: false,
        })?;
        sent.inc_by(size);
        bytes += size;
        seq += 1;
    }
    let mut after_request: Option<String> = None;
    loop {
        let rows = source
            .requests_batch(after_request.as_deref(), SNAPSHOT_PART_BYTES)
            .map_err(|e| e.to_string())?;
        let last = rows.last().map(|r| r.0.clone());
        let done = last.is_none();
        let size: u64 = rows.iter().map(|r| (r.0.len() + r.1.len()) as u64).sum();
        send(StripeRequest::SnapshotChunk {
            stripe,
            epoch,
            at,
            seq,
            kv: Vec::new(),
            requests: rows
                .into_iter()
                .map(|(k, v)| (k, ByteBuf::from(v)))
                .collect(),
            total_keys,
            changes: source.changes,
            done,
        })?;
        sent.inc_by(size);
        bytes += size;
        seq += 1;
        match last {
            Some(l) => after_request = Some(l),
            None => break,
        }
    }
    for call in in_flight {
        answer(futures::executor::block_on(call))?;
    }
    Ok((at, keys, bytes))
}

/// What a member answers in place of `resp` when the log write it waited for
/// failed: nothing it covered counts as durable.
fn refused(resp: StripeResponse, e: &StoreError) -> StripeResponse {
    match resp {
        StripeResponse::Replicated(_) => StripeResponse::Replicated(None),
        // A promise that was not stored is none.
        StripeResponse::Prepared(_) | StripeResponse::PreparedBehind(_) => {
            StripeResponse::Prepared(Err(ServeError::Storage(e.to_string())))
        }
        StripeResponse::SnapshotStored(_) => StripeResponse::SnapshotStored(Err(format!(
            "the log write this answer waited for failed: {e}"
        ))),
        other => other,
    }
}

/// Sends a stripe answer to the peer (or local caller) that asked.
pub fn respond_with(net: &NetHandle, reply: Responder, resp: &StripeResponse) {
    match reply {
        Responder::Peer(reply) => net.send(NetCommand::Respond {
            reply,
            response: Response::Stripe {
                body: ByteBuf::from(to_cbor(resp)),
            },
        }),
        Responder::Local(tx) => {
            let _ = tx.send(resp.clone());
        }
    }
}

impl Actor for StripeActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.run_interval(TICK, |act, ctx| act.tick(ctx));
    }
}

impl Handler<ServeStripe> for StripeActor {
    type Result = ();
    fn handle(&mut self, msg: ServeStripe, ctx: &mut Self::Context) {
        self.serve(msg, ctx);
    }
}

impl Handler<HandOver> for StripeActor {
    type Result = ();
    fn handle(&mut self, msg: HandOver, ctx: &mut Self::Context) {
        let Some(r) = self.replica.as_mut() else {
            let _ = msg.reply.send(Ok(None));
            return;
        };
        if !matches!(r.role(), Role::Active { .. }) {
            let _ = msg.reply.send(Ok(None));
            return;
        }
        match r.hand_over(msg.to) {
            Ok((to, fx)) => {
                tracing::info!(stripe = ?self.stripe, to, "planned handover started");
                self.handover_waiters.push(msg.reply);
                self.push(fx, ctx);
            }
            Err(crate::stripe::replica::HandOverError::NotInSync(n)) => {
                let who = self
                    .peer_of(n)
                    .map_or_else(|| n.to_string(), |p| p.to_string());
                let _ = msg.reply.send(Err(format!(
                    "{who} is not an in-sync standby of this stripe (see `kiln status`)"
                )));
            }
            Err(e) => {
                let _ = msg.reply.send(Err(e.to_string()));
            }
        }
    }
}

/// What `store` holds for `stripe` (recording the stripe on a fresh store);
/// `None` if the data belongs to another stripe.
fn recover_stripe(store: &StripeStore, stripe: u32) -> Result<Option<StripeRecovered>, StoreError> {
    let r = store.recover()?;
    match r.stripe {
        Some(k) if k != stripe => {
            tracing::error!(stored = k, placed = stripe,
                "the stripe data here belongs to another stripe; not serving it (start this node with a new --data-dir)");
            Ok(None)
        }
        Some(_) => Ok(Some(r)),
        None => {
            store.set_stripe(stripe)?;
            Ok(Some(r))
        }
    }
}

/// Whether applied state waiting in memory (`entries`, of `bytes`) is worth a
/// flush for a caller that wants at least `at_least` entries.
fn flush_due(entries: u64, bytes: u64, at_least: u64) -> bool {
    entries > 0 && (entries >= at_least || bytes >= FLUSH_BYTES)
}

/// Whether flushes fell so far behind the applies that the next one runs at
/// normal priority.
fn flush_behind(entries: u64, bytes: u64) -> bool {
    entries > FLUSH_BEHIND || bytes > FLUSH_BEHIND_BYTES
}

/// The command a stored log entry carries (an entry that does not decode applies
/// as an unknown command, which `kv::apply` refuses without touching the state).
fn entry_data(stored: &[u8]) -> Vec<u8> {
    from_cbor::<Entry>(stored, usize::MAX)
        .map(|e| e.data)
        .unwrap_or_else(|_| vec![0xff])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn large_values_bring_flushes_on_sooner_than_their_count() {
        // 1 KiB values: the count decides.
        assert!(!flush_due(
            FLUSH_ENTRIES - 1,
            (FLUSH_ENTRIES - 1) * 1100,
            FLUSH_ENTRIES
        ));
        assert!(flush_due(
            FLUSH_ENTRIES,
            FLUSH_ENTRIES * 1100,
            FLUSH_ENTRIES
        ));
        // 1 MiB values: 64 of them are due, 4 096 would have been 4 GiB.
        assert!(!flush_due(63, 63 << 20, FLUSH_ENTRIES));
        assert!(flush_due(64, 64 << 20, FLUSH_ENTRIES));
        // Nothing waiting: nothing to flush, whatever the caller asks for.
        assert!(!flush_due(0, 0, 1));
        assert!(flush_due(1, 10, 1));
        assert!(!flush_behind(FLUSH_BEHIND, FLUSH_BEHIND * 1100));
        assert!(flush_behind(FLUSH_BEHIND + 1, 0));
        assert!(flush_behind(600, 600 << 20));
    }

    #[test]
    fn restarts_after_storage_failures_back_off_to_a_ceiling() {
        let pauses: Vec<u64> = (1..=8).map(|f| storage_retry(f).as_secs()).collect();
        assert_eq!(pauses, [1, 2, 4, 8, 16, 16, 16, 16]);
        assert_eq!(storage_retry(u32::MAX), STORAGE_RETRY_MAX);
        assert_eq!(storage_retry(0), STORAGE_RETRY);
    }
}
