//! Replication of one stripe, as seen by one of its members: a plain state machine.
//!
//! The active orders writes into a log and sends them to every other member of its
//! stripe; an entry is committed (and its write acknowledged) once it is durable on
//! the active and on every in-sync standby. Who is active, in which epoch, and who is
//! in sync is decided by the control plane and fed in with [`Replica::on_view`];
//! this machine never decides it alone. It only asks (`Effect::Propose`).
//!
//! Fencing: a member promises, durably, not to accept entries of older epochs — when
//! it sees a newer active, and when an election asks for its log position
//! ([`Replica::on_prepare`]). An active needs the acknowledgement of every in-sync
//! standby, and every electable standby is in sync, so once an election has begun no
//! deposed active can acknowledge another write, and the standby elected (the one
//! with the most up-to-date log among those that answered) holds every write ever
//! acknowledged.
//!
//! No I/O and no clock: inputs are messages, views, ticks with a time in ms, and
//! client proposals; outputs are effects the caller executes in order (persist
//! before send: a `Persist` effect must be durable before any later effect runs).

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use serde::{Deserialize, Serialize};

pub type NodeId = u64;

/// Position of a log entry: the epoch it was written in, and its index (from 1).
/// Ordered by epoch, then index: the greater position is the more up-to-date log.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct LogPos {
    pub epoch: u64,
    pub index: u64,
}

/// One write of a stripe's log. What a write means (a key/value operation) is the
/// caller's; replication moves opaque bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub epoch: u64,
    /// Empty for the no-op an active writes when it takes over (or what
    /// [`Replica::set_first_entry`] gave, if that no-op starts the log).
    #[serde(with = "serde_bytes")]
    pub data: Vec<u8>,
}

impl Entry {
    /// What an entry counts for against `retain_bytes`.
    fn weight(&self) -> u64 {
        self.data.len() as u64 + 16
    }
}

/// The control plane's decision for this stripe, as last committed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StripeView {
    /// Grows with every control-plane decision (its log index): a view older than
    /// the one held is ignored, so a delayed view never undoes a newer one.
    pub version: u64,
    pub epoch: u64,
    pub active: Option<NodeId>,
    pub members: BTreeSet<NodeId>,
    pub in_sync: BTreeSet<NodeId>,
    /// See [`crate::control::StripeEntry::in_sync_removals`].
    pub in_sync_removals: u64,
}

/// Messages between members of a stripe.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Message {
    /// Active → member: entries following `prev` (none for a heartbeat), the
    /// active's commit index, and the heartbeat round (for linearizable reads).
    Append {
        epoch: u64,
        prev: LogPos,
        entries: Vec<Entry>,
        commit: u64,
        round: u64,
    },
    /// Member → active. `ok`: the member's log matches up to `matched`. Not ok:
    /// `matched` is where the active should retry from (+1), or `stale` is the newer
    /// epoch the member has promised to.
    AppendAck {
        epoch: u64,
        ok: bool,
        matched: u64,
        round: u64,
        stale: Option<u64>,
    },
    /// Active → member too far behind for entries: install a snapshot of the
    /// committed state at `at` (the caller ships the data).
    SnapshotOffer { epoch: u64, at: LogPos },
}

/// A request to the control plane.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Proposal {
    /// This in-sync standby has not heard its active of `epoch` for the election
    /// timeout: elect a new one.
    Election { epoch: u64 },
    /// The active of `epoch` adds or removes `node` from the in-sync set; an
    /// addition only while the set's `removals` figure is the one given.
    InSync {
        epoch: u64,
        node: NodeId,
        in_sync: bool,
        removals: u64,
    },
    /// This node took over as active of `epoch` from its own copy of the
    /// control plane's state, which may be stale (after a restart, say): it
    /// commits and serves reads only once the control plane confirms the epoch
    /// is current ([`Replica::on_confirmed`]).
    ConfirmActive { epoch: u64 },
    /// This node is the active of `epoch` by the control plane's state but its log
    /// already holds entries of `epoch`: it was active before a restart and may
    /// have lost entries it had sent. It takes over only in a new epoch, so that
    /// no index of one epoch ever holds two different entries.
    Renew { epoch: u64 },
    /// Planned handover: make `to`, which holds every entry of this active of
    /// `epoch`, the next active (no election: this active stopped writing).
    HandOver { epoch: u64, to: NodeId },
}

impl Proposal {
    /// The epoch of the active it was made in (or about).
    pub fn epoch(&self) -> u64 {
        match self {
            Proposal::Election { epoch }
            | Proposal::InSync { epoch, .. }
            | Proposal::ConfirmActive { epoch }
            | Proposal::Renew { epoch }
            | Proposal::HandOver { epoch, .. } => *epoch,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// Make durable, in this order: drop log entries from `truncate_from`, append
    /// `entries` (index, entry), record `promised`. Must complete before the
    /// effects after it.
    Persist {
        truncate_from: Option<u64>,
        entries: Vec<(u64, Entry)>,
        promised: Option<u64>,
    },
    /// The active's own new entries: make them durable in the background, in
    /// order, then report with [`Replica::on_persisted`]. Later effects need not
    /// wait (replication runs in parallel with the local fsync; commits wait for
    /// it), except a `Persist`, which must follow every earlier append.
    AppendLocal {
        entries: Vec<(u64, Entry)>,
    },
    /// Replace the state with the snapshot received at `at` (a follower); the log
    /// entries after `at` stay if `keep_log`, else the whole log goes.
    InstallSnapshot {
        at: LogPos,
        keep_log: bool,
    },
    Send {
        to: NodeId,
        msg: Message,
    },
    /// Ship a snapshot of the committed state to `to` (active), then report it
    /// with [`Replica::on_snapshot_sent`].
    SendSnapshot {
        to: NodeId,
    },
    /// Entries up to `upto` are committed: apply them.
    Commit {
        upto: u64,
    },
    Propose(Proposal),
    /// The linearizable read `id` may be served once entries up to `index` are applied.
    ReadReady {
        id: u64,
        index: u64,
    },
    /// This node stopped being active: pending writes and reads get no answer
    /// from it (their clients retry elsewhere).
    SteppedDown {
        epoch: u64,
    },
    /// Entries up to `upto` are no longer needed in the log (applied and held by
    /// every member, or covered by snapshots).
    Compact {
        upto: u64,
    },
}

/// A planned handover whose standby has not taken over by then is given up (the
/// active takes writes again): below the 10 s an operator's request waits.
pub const HANDOVER_GIVE_UP_MS: u64 = 8_000;

/// A standby proposed for the in-sync set (see [`Replica`]'s `adding`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Adding {
    /// The view's `in_sync_removals` when the active began waiting for it.
    removals: u64,
    /// Proposed, and no failure heard since.
    asked: bool,
}

/// Timing and limits of replication.
#[derive(Debug, Clone)]
pub struct ReplicaConfig {
    /// An in-sync standby that has not heard its active this long asks for an election.
    pub election_timeout_ms: u64,
    /// How often an active sends to every member (with entries or empty).
    pub heartbeat_ms: u64,
    /// An in-sync standby silent this long while it holds up commits is dropped
    /// from the in-sync set (through the control plane).
    pub in_sync_timeout_ms: u64,
    /// Most entries in one `Append`.
    pub max_batch: usize,
    /// Appends with entries sent to one member before it answers the first
    /// (while they carry less than half of `max_batch_bytes` together).
    pub max_appends_in_flight: usize,
    /// Most bytes of entry data in one `Append` (at least one entry is sent):
    /// an `Append` must fit one request frame.
    pub max_batch_bytes: usize,
    /// Entries kept in the log beyond what every member holds, for followers that
    /// fall a little behind; further behind, they get a snapshot (except one
    /// catching up from a snapshot just taken, within a quarter of
    /// `retain_bytes`: see `Progress::catching_up`).
    pub retain_entries: u64,
    /// Bytes of entry data the log keeps at most in memory (older committed
    /// entries go, whatever `retain_entries` says): large values must not make
    /// the log outgrow memory.
    pub retain_bytes: u64,
    /// A snapshot transfer not reported done or failed after this long is
    /// assumed lost and offered again.
    pub snapshot_retry_ms: u64,
}

impl Default for ReplicaConfig {
    fn default() -> Self {
        ReplicaConfig {
            election_timeout_ms: 500,
            heartbeat_ms: 100,
            in_sync_timeout_ms: 500,
            max_batch: 512,
            max_appends_in_flight: 4,
            max_batch_bytes: 2 * 1024 * 1024,
            retain_entries: 10_000,
            retain_bytes: 256 * 1024 * 1024,
            snapshot_retry_ms: 60_000,
        }
    }
}

/// What the active knows of one other member.
#[derive(Debug, Clone)]
struct Progress {
    /// Next index to send.
    next: u64,
    /// Highest index known to match the active's log.
    matched: u64,
    /// Highest heartbeat round acknowledged in the current epoch.
    round: u64,
    last_ack_ms: u64,
    /// Appends with entries sent and not yet acknowledged, oldest first: up to
    /// `max_appends_in_flight` go out before the first is answered, so a member
    /// writes the next batch while its answer to the previous one travels. A
    /// heartbeat's answer does not end the wait (it would send the same entries
    /// twice); an answer covering them, a refusal, or the timeout does.
    in_flight: VecDeque<InFlight>,
    /// The member refused an append that overtook the oldest one in flight.
    refused_in_flight: bool,
    /// An append in flight got no answer (see `Replica::on_append_lost`).
    lost_in_flight: bool,
    /// When a snapshot transfer to this member started, until it is reported.
    snapshot_since_ms: Option<u64>,
    /// When the last transfer to it failed: the next waits a moment (a member
    /// that cannot be reached fails each at once).
    snapshot_failed_ms: Option<u64>,
    /// The first heartbeat round of messages sent after its last snapshot.
    snapshot_round: u64,
    /// The member took a snapshot and is catching up from its end: the entries
    /// after it stay until it is in sync (unless it goes silent, or they
    /// outgrow a quarter of `retain_bytes`).
    catching_up: bool,
}

/// The pause before a snapshot is offered again after a failed transfer.
const SNAPSHOT_FAILED_PAUSE_MS: u64 = 1_000;
/// After a proposal to the control plane failed (no leader reachable, say),
/// the active's confirmation and in-sync changes wait this long before they
/// are proposed again, instead of once per tick.
pub const PROPOSAL_RETRY_MS: u64 = 200;

/// How long a member catching up from a snapshot may stay silent before the
/// entries it needs are no longer kept for it.
const CATCH_UP_SILENCE_MS: u64 = 30_000;

/// Epoch of the entry at `index` of a log that follows `base`.
fn epoch_in(log: &VecDeque<Entry>, base: LogPos, index: u64) -> Option<u64> {
    if index == base.index {
        return Some(base.epoch);
    }
    if index < base.index {
        return None;
    }
    log.get((index - base.index - 1) as usize).map(|e| e.epoch)
}

/// The entry at `index` of a log that follows index `base`.
fn entry_in(log: &VecDeque<Entry>, base: u64, index: u64) -> Option<&Entry> {
    if index <= base {
        return None;
    }
    log.get((index - base - 1) as usize)
}

/// One `Append` on its way to a member.
#[derive(Debug, Clone, Copy)]
struct InFlight {
    from: u64,
    upto: u64,
    since_ms: u64,
    /// Entry data it carries.
    bytes: usize,
}

#[derive(Debug, Clone)]
struct PendingRead {
    id: u64,
    index: u64,
    round: u64,
}

/// Durable state a replica restarts from.
#[derive(Debug, Clone, Default)]
pub struct Recovered {
    pub promised: u64,
    /// Position of the last entry covered by the snapshot or compaction (the log
    /// starts after it); `LogPos::default()` for none.
    pub base: LogPos,
    /// Entries after `base`, in order.
    pub entries: Vec<Entry>,
    /// Highest index known committed (applied) before the restart.
    pub applied: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Orders and acknowledges writes in this epoch.
    Active { epoch: u64 },
    /// Follows the active (in sync or not: that is the view's business).
    Follower,
}

pub struct Replica {
    me: NodeId,
    cfg: ReplicaConfig,
    view: StripeView,
    role: Role,
    /// Never accept entries of an epoch below this (durable).
    promised: u64,
    base: LogPos,
    log: VecDeque<Entry>,
    /// What the entries in `log` weigh (see [`Entry::weight`]), kept so that
    /// the byte bound of compaction costs nothing while the log is under it.
    log_bytes: u64,
    commit: u64,
    now_ms: u64,
    // Follower side.
    last_heard_ms: u64,
    last_election_ask_ms: Option<u64>,
    /// Epoch an election asked this member about (its promise is `epoch + 1`).
    prepared_for: Option<u64>,
    // Active side.
    progress: BTreeMap<NodeId, Progress>,
    /// Index of the no-op this active wrote on taking over; reads wait for it.
    start_index: u64,
    /// Highest index of this active's log known durable here (commits wait for it).
    durable: u64,
    /// The control plane confirmed this node is the active of its epoch.
    confirmed: bool,
    confirm_asked: bool,
    /// A planned handover to this standby is under way: no new writes.
    handing_over: Option<NodeId>,
    handover_since_ms: u64,
    handover_asked: bool,
    /// When a `Renew` was last asked (it is asked again after an election
    /// timeout: the request or its answer may be lost).
    renew_asked_ms: Option<u64>,
    /// No confirmation is proposed again before this, nor an in-sync change
    /// (see [`PROPOSAL_RETRY_MS`]); each kind waits only for its own failure.
    confirm_retry_ms: u64,
    in_sync_retry_ms: u64,
    /// Standbys proposed for the in-sync set: already waited for, until the
    /// view shows them in the set, or shows that their addition can no longer
    /// be applied (a removal moved `in_sync_removals` past the figure it
    /// carries). A proposal that seemed to fail may still be applied, so it is
    /// asked again, never forgotten.
    adding: BTreeMap<NodeId, Adding>,
    /// In-sync standbys proposed for removal (still waited for until decided).
    removing: BTreeSet<NodeId>,
    round: u64,
    last_heartbeat_ms: u64,
    reads: Vec<PendingRead>,
    /// Data of the no-op this node writes if it takes over with an empty log.
    first_entry: Vec<u8>,
    /// Started with no log and no promise (a new member, or one whose stripe
    /// data a restart emptied: temporary persistence, a wiped directory) and
    /// not yet shown by an active to hold every committed entry. The control
    /// state may still count it in sync, but elected, it would lose what the
    /// others hold: it answers no election until then.
    started_empty: bool,
}

impl Replica {
    pub fn new(me: NodeId, cfg: ReplicaConfig, recovered: Recovered) -> Replica {
        let started_empty = recovered.entries.is_empty()
            && recovered.base == LogPos::default()
            && recovered.promised == 0;
        Replica {
            started_empty,
            me,
            cfg,
            view: StripeView::default(),
            role: Role::Follower,
            promised: recovered.promised,
            base: recovered.base,
            log_bytes: recovered.entries.iter().map(Entry::weight).sum(),
            log: recovered.entries.into(),
            commit: recovered.applied.max(recovered.base.index),
            now_ms: 0,
            last_heard_ms: 0,
            last_election_ask_ms: None,
            prepared_for: None,
            progress: BTreeMap::new(),
            start_index: 0,
            durable: 0,
            confirmed: false,
            confirm_asked: false,
            handing_over: None,
            handover_since_ms: 0,
            handover_asked: false,
            renew_asked_ms: None,
            confirm_retry_ms: 0,
            in_sync_retry_ms: 0,
            adding: BTreeMap::new(),
            removing: BTreeSet::new(),
            round: 0,
            last_heartbeat_ms: 0,
            reads: Vec::new(),
            first_entry: Vec::new(),
        }
    }

    /// What the no-op carries that this node writes if it takes over a stripe
    /// whose log is empty here (and was never compacted): the start of the log.
    pub fn set_first_entry(&mut self, data: Vec<u8>) {
        self.first_entry = data;
    }

    /// The standby a planned handover waits for, while it does.
    pub fn handing_over(&self) -> Option<NodeId> {
        self.handing_over
    }

    /// Whether it started without its stripe data and has not caught up since.
    pub fn started_empty(&self) -> bool {
        self.started_empty
    }

    /// A replica started again from the disk after a storage failure goes on
    /// from where the one before was: still behind if that one was (what it
    /// wrote since its empty start may be a part of the log).
    pub fn still_behind(&mut self) {
        self.started_empty = true;
    }

    pub fn role(&self) -> Role {
        self.role
    }

    pub fn commit_index(&self) -> u64 {
        self.commit
    }

    /// An append to `to` carrying entries from `from` got no answer (the
    /// request failed, or the member could not write it): what is in flight
    /// to `to` goes again once it has been on its way a heartbeat interval
    /// (at most that often, however fast a member fails), rather than after
    /// the in-flight timeout. A new batch of writes waits for the previous
    /// one's commit, so nothing else would send it sooner.
    pub fn on_append_lost(&mut self, to: NodeId, from: u64) {
        if let Some(p) = self.progress.get_mut(&to) {
            if p.in_flight.iter().any(|f| f.from == from) {
                p.lost_in_flight = true;
            }
        }
    }

    /// This active appended entries in its epoch that are not committed yet
    /// (entries of earlier epochs do not count: committing them takes an entry
    /// of this one).
    pub fn own_entries_uncommitted(&self) -> bool {
        match self.role {
            Role::Active { epoch } => {
                let last = self.last();
                last.epoch == epoch && last.index > self.commit
            }
            Role::Follower => false,
        }
    }

    pub fn promised(&self) -> u64 {
        self.promised
    }

    pub fn view(&self) -> &StripeView {
        &self.view
    }

    /// Position of the last entry in the log.
    pub fn last(&self) -> LogPos {
        match self.log.back() {
            Some(e) => LogPos {
                epoch: e.epoch,
                index: self.base.index + self.log.len() as u64,
            },
            None => self.base,
        }
    }

    /// Epoch of the entry at `index`, if the log (or its base) covers it.
    pub fn epoch_at(&self, index: u64) -> Option<u64> {
        epoch_in(&self.log, self.base, index)
    }

    /// The entry at `index`, if still in the log.
    pub fn entry(&self, index: u64) -> Option<&Entry> {
        entry_in(&self.log, self.base.index, index)
    }

    /// Lag of each member behind the active's last entry (active only).
    pub fn lags(&self) -> BTreeMap<NodeId, u64> {
        let last = self.last().index;
        self.progress
            .iter()
            .map(|(n, p)| (*n, last.saturating_sub(p.matched)))
            .collect()
    }

    fn is_active(&self) -> bool {
        matches!(self.role, Role::Active { .. })
    }

    /// Standbys whose acknowledgement every commit needs.
    fn required(&self) -> BTreeSet<NodeId> {
        self.view
            .in_sync
            .iter()
            .chain(self.adding.keys())
            .copied()
            .filter(|n| *n != self.me)
            .collect()
    }

    /// The control plane committed a new decision for this stripe.
    pub fn on_view(&mut self, view: StripeView) -> Vec<Effect> {
        let mut fx = Vec::new();
        if view.version <= self.view.version && self.view.version > 0 {
            return fx;
        }
        let newer = view.epoch > self.view.epoch;
        self.view = view;
        if let Role::Active { epoch } = self.role {
            if self.view.epoch > epoch || self.view.active != Some(self.me) {
                self.step_down(&mut fx);
            }
        }
        if newer {
            self.last_heard_ms = self.now_ms;
            self.last_election_ask_ms = None;
        }
        if self.view.epoch > self.promised
            && self.view.active != Some(self.me)
            && !self.started_empty
        {
            // A committed decision of a later epoch deposes whoever was active
            // before it (an active removed from the cluster, with no successor
            // yet): its entries are refused from now on, so it cannot commit
            // through this member. `take_over` raises its own promise. Not
            // while this member started empty: a promise on disk would make
            // it count as holding the stripe's log after a restart.
            self.promised = self.view.epoch;
            self.prepared_for = None;
            fx.push(Effect::Persist {
                truncate_from: None,
                entries: vec![],
                promised: Some(self.promised),
            });
        }
        self.release_promise(&mut fx);
        if self.view.active == Some(self.me)
            && !self.is_active()
            && self.view.epoch >= self.promised
            && self.view.epoch > 0
        {
            // Otherwise (entries of this epoch already in the log) `tick` asks
            // for a new epoch; with no log at all while standbys hold the data
            // (temporary persistence, or a wiped data directory) it asks for an
            // election among them instead.
            if self.last().epoch < self.view.epoch && !self.lost_its_log() {
                self.take_over(&mut fx);
            }
        }
        if self.is_active() {
            let view = &self.view;
            self.adding.retain(|n, a| {
                !view.in_sync.contains(n)
                    && view.members.contains(n)
                    && view.in_sync_removals == a.removals
            });
            self.removing.retain(|n| self.view.in_sync.contains(n));
            let members: BTreeSet<NodeId> = self
                .view
                .members
                .iter()
                .copied()
                .filter(|n| *n != self.me)
                .collect();
            self.progress.retain(|n, _| members.contains(n));
            let next = self.last().index + 1;
            for n in members {
                self.progress.entry(n).or_insert(Progress {
                    next,
                    matched: 0,
                    round: 0,
                    last_ack_ms: self.now_ms,
                    in_flight: VecDeque::new(),
                    refused_in_flight: false,
                    lost_in_flight: false,
                    snapshot_since_ms: None,
                    snapshot_failed_ms: None,
                    snapshot_round: 0,
                    catching_up: false,
                });
            }
            self.advance_commit(&mut fx);
        }
        fx
    }

    /// An election asked this member for its position, then the control plane
    /// took it out of the in-sync set without electing anyone: its promise no
    /// longer protects anything (the active does not wait for it), and keeping it
    /// would stop it from ever catching up with the active it refuses.
    fn release_promise(&mut self, fx: &mut Vec<Effect>) {
        let Some(e) = self.prepared_for else { return };
        if self.view.epoch > e {
            self.prepared_for = None;
        } else if self.view.epoch == e
            && !self.view.in_sync.contains(&self.me)
            && self.promised == e + 1
        {
            self.prepared_for = None;
            self.promised = e;
            fx.push(Effect::Persist {
                truncate_from: None,
                entries: vec![],
                promised: Some(e),
            });
        }
    }

    fn take_over(&mut self, fx: &mut Vec<Effect>) {
        // Its log is the stripe's from now on.
        self.started_empty = false;
        let epoch = self.view.epoch;
        let index = self.last().index + 1;
        let noop = Entry {
            epoch,
            data: if index == 1 {
                self.first_entry.clone()
            } else {
                Vec::new()
            },
        };
        self.log_bytes += noop.weight();
        self.log.push_back(noop.clone());
        let promised = (epoch > self.promised).then_some(epoch);
        self.promised = self.promised.max(epoch);
        fx.push(Effect::Persist {
            truncate_from: None,
            entries: vec![(index, noop)],
            promised,
        });
        self.role = Role::Active { epoch };
        self.start_index = index;
        self.confirm_retry_ms = 0;
        self.in_sync_retry_ms = 0;
        // The no-op's `Persist` precedes every later effect: durable by then.
        self.durable = index;
        self.confirmed = false;
        self.confirm_asked = true;
        self.handing_over = None;
        self.handover_asked = false;
        fx.push(Effect::Propose(Proposal::ConfirmActive { epoch }));
        self.progress.clear();
        self.adding.clear();
        self.removing.clear();
        self.reads.clear();
        self.last_heartbeat_ms = 0;
    }

    fn step_down(&mut self, fx: &mut Vec<Effect>) {
        if let Role::Active { epoch } = self.role {
            self.role = Role::Follower;
            self.handing_over = None;
            self.handover_asked = false;
            self.progress.clear();
            self.adding.clear();
            self.removing.clear();
            self.reads.clear();
            self.last_heard_ms = self.now_ms;
            fx.push(Effect::SteppedDown { epoch });
        }
    }

    /// Client writes: appended at once if this node is active (their indexes are
    /// returned; the writes are acknowledged when `Commit` covers them).
    pub fn propose(&mut self, writes: Vec<Vec<u8>>) -> Result<(Vec<u64>, Vec<Effect>), NotActive> {
        let Role::Active { epoch } = self.role else {
            return Err(NotActive {
                epoch: self.view.epoch,
                active: self.view.active,
            });
        };
        if self.handing_over.is_some() {
            return Err(NotActive {
                epoch: self.view.epoch,
                active: self.view.active,
            });
        }
        let first = self.last().index + 1;
        let mut entries = Vec::with_capacity(writes.len());
        for (k, data) in writes.into_iter().enumerate() {
            let e = Entry { epoch, data };
            self.log_bytes += e.weight();
            self.log.push_back(e.clone());
            entries.push((first + k as u64, e));
        }
        let indexes = entries.iter().map(|(i, _)| *i).collect();
        let mut fx = vec![Effect::AppendLocal { entries }];
        self.replicate(&mut fx, false);
        self.advance_commit(&mut fx);
        Ok((indexes, fx))
    }

    /// This active's own entries up to `upto` are durable.
    pub fn on_persisted(&mut self, upto: u64) -> Vec<Effect> {
        let mut fx = Vec::new();
        if self.is_active() && upto > self.durable {
            self.durable = upto.min(self.last().index);
            self.advance_commit(&mut fx);
            self.maybe_hand_over(&mut fx);
        }
        fx
    }

    /// A linearizable read: answered with `ReadReady` once every in-sync standby
    /// has confirmed this node is still active after the read arrived.
    pub fn read(&mut self, id: u64) -> Result<Vec<Effect>, NotActive> {
        if !self.is_active() {
            return Err(NotActive {
                epoch: self.view.epoch,
                active: self.view.active,
            });
        }
        self.round += 1;
        self.reads.push(PendingRead {
            id,
            index: self.commit.max(self.start_index),
            round: self.round,
        });
        let mut fx = Vec::new();
        self.replicate(&mut fx, true);
        self.serve_reads(&mut fx);
        Ok(fx)
    }

    /// Time passes: heartbeats, in-sync upkeep (active); election requests (standby).
    pub fn tick(&mut self, now_ms: u64) -> Vec<Effect> {
        self.now_ms = now_ms;
        let mut fx = Vec::new();
        match self.role {
            Role::Active { epoch } => {
                if let Some(to) = self.handing_over {
                    // A standby that left the in-sync set (it died) or never got
                    // there in time is not waited for: writes are taken again.
                    if !self.view.in_sync.contains(&to)
                        || now_ms.saturating_sub(self.handover_since_ms) >= HANDOVER_GIVE_UP_MS
                    {
                        self.handing_over = None;
                        self.handover_asked = false;
                    }
                }
                if !self.confirmed && !self.confirm_asked && now_ms >= self.confirm_retry_ms {
                    self.confirm_asked = true;
                    fx.push(Effect::Propose(Proposal::ConfirmActive { epoch }));
                }
                if now_ms.saturating_sub(self.last_heartbeat_ms) >= self.cfg.heartbeat_ms {
                    self.round += 1;
                    self.replicate(&mut fx, true);
                }
                let last = self.last().index;
                let may_propose = now_ms >= self.in_sync_retry_ms;
                for n in self.required() {
                    let Some(p) = self.progress.get(&n) else {
                        continue;
                    };
                    let holding_up =
                        p.matched < last || self.reads.iter().any(|r| p.round < r.round);
                    let silent =
                        now_ms.saturating_sub(p.last_ack_ms) >= self.cfg.in_sync_timeout_ms;
                    if holding_up
                        && silent
                        && may_propose
                        && (self.view.in_sync.contains(&n) || self.adding.contains_key(&n))
                        && self.removing.insert(n)
                    {
                        fx.push(Effect::Propose(Proposal::InSync {
                            epoch,
                            node: n,
                            in_sync: false,
                            removals: self.view.in_sync_removals,
                        }));
                    }
                }
                // A member that holds every committed entry joins the in-sync set;
                // it is waited for from now on, before the control plane agrees.
                let candidates: Vec<NodeId> = self
                    .progress
                    .iter()
                    .filter(|(n, p)| {
                        !self.view.in_sync.contains(n)
                            && !self.adding.contains_key(n)
                            && p.matched >= self.commit
                            && p.matched >= self.start_index
                            && now_ms.saturating_sub(p.last_ack_ms) < self.cfg.in_sync_timeout_ms
                    })
                    .map(|(n, _)| *n)
                    .collect();
                let removals = self.view.in_sync_removals;
                for n in candidates {
                    self.adding.insert(
                        n,
                        Adding {
                            removals,
                            asked: false,
                        },
                    );
                }
                // New additions, and those whose proposal seemed to fail.
                for (n, a) in self
                    .adding
                    .iter_mut()
                    .filter(|(_, a)| !a.asked && may_propose)
                {
                    a.asked = true;
                    fx.push(Effect::Propose(Proposal::InSync {
                        epoch,
                        node: *n,
                        in_sync: true,
                        removals: a.removals,
                    }));
                }
                self.maybe_hand_over(&mut fx);
                self.compact(&mut fx);
            }
            Role::Follower => {
                let renew_due = self
                    .renew_asked_ms
                    .is_none_or(|t| now_ms.saturating_sub(t) >= self.cfg.election_timeout_ms);
                if self.view.active == Some(self.me)
                    && renew_due
                    && self.last().epoch >= self.view.epoch
                    && self.view.epoch >= self.promised
                {
                    self.renew_asked_ms = Some(now_ms);
                    fx.push(Effect::Propose(Proposal::Renew {
                        epoch: self.view.epoch,
                    }));
                }
                // An in-sync standby whose active is silent, or absent (removed
                // from the cluster), asks for an election; so does a named
                // active that lost its log.
                let electable = self.view.in_sync.contains(&self.me) || self.lost_its_log();
                let silent =
                    now_ms.saturating_sub(self.last_heard_ms) >= self.cfg.election_timeout_ms;
                // Asked again every heartbeat interval while silent: the first ask
                // may reach a control-plane leader that died with the active.
                let asked_recently = self
                    .last_election_ask_ms
                    .is_some_and(|t| now_ms.saturating_sub(t) < self.cfg.heartbeat_ms);
                if electable && silent && !asked_recently {
                    self.last_election_ask_ms = Some(now_ms);
                    fx.push(Effect::Propose(Proposal::Election {
                        epoch: self.view.epoch,
                    }));
                }
                self.compact(&mut fx);
            }
        }
        fx
    }

    /// Named the active, this node holds no log while in-sync standbys do: it
    /// came back from a restart that emptied its stripe data (temporary
    /// persistence, a wiped directory). Taking over its old epoch with an empty
    /// log would give that epoch's positions a second meaning; one of those
    /// standbys is elected instead, and this node syncs. (With nobody in sync
    /// it still takes over: see the README's limits of temporary persistence.)
    fn lost_its_log(&self) -> bool {
        self.view.active == Some(self.me)
            && self.last() == LogPos::default()
            && self.promised == 0
            && !self.view.in_sync.is_empty()
    }

    /// Sends entries (or a heartbeat) to members that need them.
    fn replicate(&mut self, fx: &mut Vec<Effect>, heartbeat: bool) {
        let Role::Active { epoch } = self.role else {
            return;
        };
        if heartbeat {
            self.last_heartbeat_ms = self.now_ms;
        }
        let last = self.last().index;
        let timeout = self.cfg.in_sync_timeout_ms.max(self.cfg.heartbeat_ms * 4);
        let now = self.now_ms;
        let peers: Vec<NodeId> = self.progress.keys().copied().collect();
        let append = |prev_index: u64, entries: Vec<Entry>| Message::Append {
            epoch,
            prev: LogPos {
                epoch: epoch_in(&self.log, self.base, prev_index).unwrap_or(0),
                index: prev_index,
            },
            entries,
            commit: self.commit,
            round: self.round,
        };
        for n in peers {
            let Some(p) = self.progress.get_mut(&n) else {
                continue;
            };
            let waited = p.in_flight.front().map(|f| now.saturating_sub(f.since_ms));
            let lost = match waited {
                Some(w) => w >= timeout || (p.lost_in_flight && w >= self.cfg.heartbeat_ms),
                None => false,
            };
            if lost {
                // Send again from the first unanswered entry (not below what
                // the member is known to hold: that could call for a snapshot).
                p.next = p.in_flight[0].from.max(p.matched + 1);
                p.in_flight.clear();
                p.refused_in_flight = false;
                p.lost_in_flight = false;
            }
            if p.snapshot_since_ms
                .is_some_and(|t| now.saturating_sub(t) < self.cfg.snapshot_retry_ms)
            {
                continue;
            }
            if p.next <= self.base.index {
                if p.snapshot_failed_ms
                    .is_some_and(|t| now.saturating_sub(t) < SNAPSHOT_FAILED_PAUSE_MS)
                {
                    continue;
                }
                p.snapshot_since_ms = Some(now);
                fx.push(Effect::Send {
                    to: n,
                    msg: Message::SnapshotOffer {
                        epoch,
                        at: self.base,
                    },
                });
                fx.push(Effect::SendSnapshot { to: n });
                continue;
            }
            let mut sent = false;
            // Small appends are pipelined; large ones (a member catching up) go
            // one at a time, so that none waits behind others past its timeout.
            let room = |p: &Progress| {
                p.in_flight.is_empty()
                    || (p.in_flight.len() < self.cfg.max_appends_in_flight
                        && p.in_flight.iter().map(|f| f.bytes).sum::<usize>()
                            < self.cfg.max_batch_bytes / 2)
            };
            while p.next <= last && room(p) {
                let prev_index = p.next - 1;
                let mut bytes = 0;
                let entries: Vec<Entry> = (p.next..=last)
                    .take(self.cfg.max_batch)
                    .map_while(|i| entry_in(&self.log, self.base.index, i).cloned())
                    .take_while(|e| {
                        let first = bytes == 0;
                        bytes += e.data.len() + 16;
                        first || bytes <= self.cfg.max_batch_bytes
                    })
                    .collect();
                if entries.is_empty() {
                    break;
                }
                let upto = prev_index + entries.len() as u64;
                p.in_flight.push_back(InFlight {
                    from: p.next,
                    upto,
                    since_ms: now,
                    bytes: entries.iter().map(|e| e.data.len()).sum(),
                });
                p.next = upto + 1;
                sent = true;
                fx.push(Effect::Send {
                    to: n,
                    msg: append(prev_index, entries),
                });
            }
            if sent || !heartbeat {
                continue;
            }
            // While entries are in flight a heartbeat refers to what the member
            // is known to hold, so that it is not refused for a gap those entries
            // are about to fill.
            let prev_index = match p.in_flight.front() {
                Some(_) if p.matched >= self.base.index => p.matched,
                Some(f) => f.from - 1,
                None => p.next - 1,
            };
            fx.push(Effect::Send {
                to: n,
                msg: append(prev_index, Vec::new()),
            });
        }
    }

    fn advance_commit(&mut self, fx: &mut Vec<Effect>) {
        if !self.is_active() || !self.confirmed {
            return;
        }
        let mut candidate = self.last().index.min(self.durable);
        for n in self.required() {
            let matched = self.progress.get(&n).map(|p| p.matched).unwrap_or(0);
            candidate = candidate.min(matched);
        }
        if candidate > self.commit {
            self.commit = candidate;
            fx.push(Effect::Commit { upto: candidate });
        }
        self.serve_reads(fx);
    }

    fn serve_reads(&mut self, fx: &mut Vec<Effect>) {
        if !self.is_active() || !self.confirmed || self.commit < self.start_index {
            return;
        }
        let required = self.required();
        let confirmed_round = required
            .iter()
            .map(|n| self.progress.get(n).map(|p| p.round).unwrap_or(0))
            .min()
            .unwrap_or(u64::MAX);
        let start = self.start_index;
        self.reads.retain(|r| {
            if r.round <= confirmed_round {
                fx.push(Effect::ReadReady {
                    id: r.id,
                    index: r.index.max(start),
                });
                false
            } else {
                true
            }
        });
    }

    /// Drops committed entries from the log: on the active, those every member
    /// holds (but keeping at most `retain_entries` for laggards, more for one
    /// catching up from a snapshot); on a standby, all but the last
    /// `retain_entries` committed ones (kept for the members it may serve as a
    /// future active).
    fn compact(&mut self, fx: &mut Vec<Effect>) {
        // While a snapshot is on its way to a member, the entries after it must
        // stay (only the byte bound applies): compacting past the snapshot's
        // point would send the member a new snapshot at its end, and another,
        // for as long as writes go on.
        let transferring = self
            .progress
            .values()
            .any(|p| p.snapshot_since_ms.is_some());
        let keep_from = self.commit.saturating_sub(self.cfg.retain_entries);
        let now = self.now_ms;
        // The log held for it is in memory: bounded, below the byte bound that
        // applies to every entry, since a member slower than the writes would
        // otherwise keep it there for as long as they go on.
        let held_too_much = self.log_bytes > self.cfg.retain_bytes / 4;
        for (node, p) in self.progress.iter_mut() {
            // Caught up (in sync: from then on it bounds compaction as every
            // in-sync member does), or silent: a member that stopped answering
            // does not hold the log for good. (Being within `retain_entries`
            // of the commit index for a moment is not enough: one catching up
            // slower than the writes falls out of that window again.)
            if self.view.in_sync.contains(node)
                || now.saturating_sub(p.last_ack_ms) >= CATCH_UP_SILENCE_MS
                || held_too_much
            {
                p.catching_up = false;
            }
        }
        let upto = if matches!(self.role, Role::Active { .. }) {
            let held_by_all = self
                .progress
                .values()
                .map(|p| p.matched)
                .min()
                .unwrap_or(self.commit)
                .min(self.commit);
            // A laggard beyond `retain_entries` is let go (a snapshot will
            // serve it), but not one catching up from a snapshot just taken:
            // under steady writes each compaction would otherwise send it a new
            // snapshot, for as long as the writes go on.
            let catching_up = self
                .progress
                .values()
                .filter(|p| p.catching_up)
                .map(|p| p.matched)
                .min()
                .unwrap_or(u64::MAX);
            held_by_all.max(keep_from.min(catching_up)).min(self.commit)
        } else {
            keep_from
        };
        let upto = if transferring { self.base.index } else { upto };
        // The byte bound: keep at most `retain_bytes` of committed entries.
        let mut over_bytes = self.base.index;
        if self.log_bytes > self.cfg.retain_bytes {
            let mut bytes = 0u64;
            for (i, e) in self.log.iter().enumerate().rev() {
                bytes += e.weight();
                if bytes > self.cfg.retain_bytes {
                    over_bytes = self.base.index + 1 + i as u64;
                    break;
                }
            }
        }
        let over_bytes = over_bytes.min(self.commit);
        if over_bytes > self.base.index {
            let upto = upto.max(over_bytes);
            self.compact_to(upto);
            fx.push(Effect::Compact { upto });
            return;
        }
        if upto > self.base.index + self.cfg.retain_entries {
            self.compact_to(upto);
            fx.push(Effect::Compact { upto });
        }
    }

    fn compact_to(&mut self, upto: u64) {
        let epoch = self.epoch_at(upto).unwrap_or(self.base.epoch);
        let drop = (upto - self.base.index) as usize;
        let dropped: u64 = self
            .log
            .drain(..drop.min(self.log.len()))
            .map(|e| e.weight())
            .sum();
        self.log_bytes -= dropped;
        self.base = LogPos { epoch, index: upto };
    }

    /// A message from another member of the stripe.
    pub fn on_message(&mut self, from: NodeId, msg: Message) -> Vec<Effect> {
        let mut fx = Vec::new();
        match msg {
            Message::Append {
                epoch,
                prev,
                entries,
                commit,
                round,
            } => self.on_append(from, epoch, prev, entries, commit, round, &mut fx),
            Message::AppendAck {
                epoch,
                ok,
                matched,
                round,
                stale,
            } => self.on_ack(from, epoch, ok, matched, round, stale, &mut fx),
            Message::SnapshotOffer { epoch, .. } => {
                // The data follows out of band; only fencing matters here: a
                // stale sender is told, an active of an older epoch steps down.
                if epoch < self.promised {
                    fx.push(self.stale_ack(from, epoch));
                } else if matches!(self.role, Role::Active { epoch: mine } if epoch > mine) {
                    self.step_down(&mut fx);
                }
            }
        }
        fx
    }

    fn stale_ack(&self, to: NodeId, epoch: u64) -> Effect {
        Effect::Send {
            to,
            msg: Message::AppendAck {
                epoch,
                ok: false,
                matched: 0,
                round: 0,
                stale: Some(self.promised),
            },
        }
    }

    /// Accepts an entry stream from the active of `epoch` (raising the promise).
    fn accept_epoch(&mut self, epoch: u64, fx: &mut Vec<Effect>) -> Option<u64> {
        if let Role::Active { epoch: mine } = self.role {
            if epoch > mine {
                self.step_down(fx);
            }
        }
        if epoch > self.promised {
            self.promised = epoch;
            self.prepared_for = None;
            return Some(epoch);
        }
        None
    }

    #[allow(clippy::too_many_arguments)]
    fn on_append(
        &mut self,
        from: NodeId,
        epoch: u64,
        prev: LogPos,
        entries: Vec<Entry>,
        commit: u64,
        round: u64,
        fx: &mut Vec<Effect>,
    ) {
        if epoch < self.promised || (self.is_active() && self.role == (Role::Active { epoch })) {
            fx.push(self.stale_ack(from, epoch));
            return;
        }
        let promised = self.accept_epoch(epoch, fx);
        self.last_heard_ms = self.now_ms;
        let nack = |matched: u64| Effect::Send {
            to: from,
            msg: Message::AppendAck {
                epoch,
                ok: false,
                matched,
                round,
                stale: None,
            },
        };
        let last = self.last();
        if prev.index > last.index {
            if let Some(p) = promised {
                fx.push(Effect::Persist {
                    truncate_from: None,
                    entries: vec![],
                    promised: Some(p),
                });
            }
            fx.push(nack(last.index));
            return;
        }
        // Below the base everything is committed, hence identical: skip it.
        let mut skip = 0usize;
        if prev.index < self.base.index {
            skip = (self.base.index - prev.index) as usize;
        } else if self.epoch_at(prev.index) != Some(prev.epoch) {
            if let Some(p) = promised {
                fx.push(Effect::Persist {
                    truncate_from: None,
                    entries: vec![],
                    promised: Some(p),
                });
            }
            // Skip back over the whole run of the conflicting epoch (a deposed
            // active's unacknowledged tail): one round trip instead of one per entry.
            let conflict = self.epoch_at(prev.index);
            let mut hint = prev.index.saturating_sub(1);
            while hint > self.commit && conflict.is_some() && self.epoch_at(hint) == conflict {
                hint -= 1;
            }
            fx.push(nack(hint.max(self.commit)));
            return;
        }
        // Walk the incoming entries against the log: identical ones are kept, the
        // first conflicting one truncates the log, the rest are appended.
        let start = prev.index.max(self.base.index) + 1;
        let incoming: Vec<Entry> = entries.into_iter().skip(skip).collect();
        let mut matched = prev
            .index
            .max(self.base.index.min(prev.index + skip as u64));
        let mut truncate_from = None;
        let mut fresh = Vec::new();
        for (k, e) in incoming.into_iter().enumerate() {
            let i = start + k as u64;
            match self.epoch_at(i) {
                Some(ep) if ep == e.epoch => {
                    matched = i;
                    continue;
                }
                Some(_) => {
                    if i <= self.commit {
                        // Never happens with a correct active: committed entries
                        // are on every electable member.
                        tracing::error!(
                            index = i,
                            commit = self.commit,
                            "an active tried to overwrite a committed entry; refusing"
                        );
                        fx.push(nack(self.commit));
                        return;
                    }
                    truncate_from = Some(i);
                    let keep = (i - self.base.index - 1) as usize;
                    self.log_bytes -= self.log.range(keep..).map(Entry::weight).sum::<u64>();
                    self.log.truncate(keep);
                }
                None => {}
            }
            self.log_bytes += e.weight();
            self.log.push_back(e.clone());
            fresh.push((i, e));
            matched = i;
        }
        if truncate_from.is_some() || !fresh.is_empty() || promised.is_some() {
            fx.push(Effect::Persist {
                truncate_from,
                entries: fresh,
                promised,
            });
        }
        let new_commit = commit.min(matched);
        if new_commit > self.commit {
            self.commit = new_commit;
            fx.push(Effect::Commit { upto: new_commit });
        }
        if self.started_empty && commit <= matched && epoch >= self.view.epoch {
            // Holds everything the current active has committed.
            self.started_empty = false;
        }
        fx.push(Effect::Send {
            to: from,
            msg: Message::AppendAck {
                epoch,
                ok: true,
                matched,
                round,
                stale: None,
            },
        });
    }

    #[allow(clippy::too_many_arguments)]
    fn on_ack(
        &mut self,
        from: NodeId,
        epoch: u64,
        ok: bool,
        matched: u64,
        round: u64,
        stale: Option<u64>,
        fx: &mut Vec<Effect>,
    ) {
        let Role::Active { epoch: mine } = self.role else {
            return;
        };
        if let Some(newer) = stale {
            if newer > mine {
                tracing::info!(
                    epoch = mine,
                    newer,
                    peer = from,
                    "a member promised a newer epoch; stepping down"
                );
                self.step_down(fx);
            }
            return;
        }
        if epoch != mine {
            return;
        }
        let last = self.last().index;
        let Some(p) = self.progress.get_mut(&from) else {
            return;
        };
        p.last_ack_ms = self.now_ms;
        p.round = p.round.max(round);
        if !ok && round < p.snapshot_round {
            // Answers a message sent before the member took its snapshot: its
            // hint is about the log it had then (sending from there would
            // need a new snapshot).
            return;
        }
        if ok {
            p.matched = p.matched.max(matched.min(last));
            let before = p.in_flight.len();
            while p.in_flight.front().is_some_and(|f| f.upto <= p.matched) {
                p.in_flight.pop_front();
            }
            if p.refused_in_flight && p.in_flight.len() < before {
                p.refused_in_flight = false;
                p.in_flight.clear();
                p.next = p.matched + 1;
            }
            p.next = p.next.max(p.matched + 1);
        } else if p
            .in_flight
            .front()
            .is_some_and(|f| f.from == matched.saturating_add(1))
        {
            // A later append overtook the oldest one on its way: the member
            // holds everything before that one and refused the later. Once the
            // oldest is answered, what follows it is sent again (acting on each
            // refusal at once would resend for every overtaken append).
            p.refused_in_flight = true;
        } else {
            // Retry from the member's hint, and at least one entry before the
            // first unanswered one (or the refused heartbeat's position).
            let refused_from = p.in_flight.front().map_or(p.next, |f| f.from);
            p.in_flight.clear();
            p.refused_in_flight = false;
            // (The member's number, so no overflow on a wrong one.)
            let resume = matched
                .saturating_add(1)
                .min(refused_from.saturating_sub(1))
                .max(1);
            // A member that still holds all it was known to match resumes after
            // that: stepping back further would ask for entries compaction may
            // have dropped (behind a member catching up, it stops exactly
            // there), and so for a needless snapshot. One that lost entries
            // (an emptied restart) is taken at its word.
            p.next = if matched >= p.matched {
                resume.max(p.matched + 1)
            } else {
                resume
            };
        }
        self.replicate(fx, false);
        self.advance_commit(fx);
        self.maybe_hand_over(fx);
    }

    /// The snapshot offered to `to` arrived there, covering entries up to `at`.
    pub fn on_snapshot_sent(&mut self, to: NodeId, at: LogPos, ok: bool) -> Vec<Effect> {
        let mut fx = Vec::new();
        // Messages sent from here on carry a round of their own: an answer to
        // one sent before (a refusal from before the member held the
        // snapshot) is told apart and not taken for its state now.
        if ok {
            self.round += 1;
        }
        let round = self.round;
        if let Some(p) = self.progress.get_mut(&to) {
            p.snapshot_since_ms = None;
            if ok {
                p.snapshot_round = round;
                p.matched = p.matched.max(at.index);
                p.next = at.index + 1;
                p.last_ack_ms = self.now_ms;
                p.catching_up = true;
                p.snapshot_failed_ms = None;
            } else {
                p.snapshot_failed_ms = Some(self.now_ms);
            }
        }
        self.replicate(&mut fx, false);
        self.advance_commit(&mut fx);
        fx
    }

    /// No answer came to a proposal this replica made (it may still be applied):
    /// it is proposed again, a confirmation or in-sync change after
    /// [`PROPOSAL_RETRY_MS`], the others on the next tick. An addition stays
    /// waited for meanwhile.
    pub fn on_proposal_failed(&mut self, proposal: &Proposal) {
        // A failure from an earlier term as active says nothing of this one's
        // confirmation and in-sync changes.
        let current = |epoch: &u64| self.role == Role::Active { epoch: *epoch };
        match proposal {
            Proposal::InSync { epoch, .. } | Proposal::ConfirmActive { epoch }
                if !current(epoch) =>
            {
                return
            }
            Proposal::InSync { .. } => self.in_sync_retry_ms = self.now_ms + PROPOSAL_RETRY_MS,
            Proposal::ConfirmActive { .. } => {
                self.confirm_retry_ms = self.now_ms + PROPOSAL_RETRY_MS
            }
            _ => {}
        }
        match proposal {
            Proposal::InSync {
                epoch,
                node,
                in_sync: true,
                removals,
            } => {
                if let Some(a) = self.current_addition(*epoch, *node, *removals) {
                    a.asked = false;
                }
            }
            Proposal::InSync {
                node,
                in_sync: false,
                ..
            } => {
                self.removing.remove(node);
            }
            Proposal::Election { .. } => self.last_election_ask_ms = None,
            Proposal::ConfirmActive { .. } => self.confirm_asked = false,
            Proposal::HandOver { .. } => self.handover_asked = false,
            Proposal::Renew { .. } => self.renew_asked_ms = None,
        }
    }

    /// The control plane refused a proposal: refusals are final (the epoch, the
    /// members and `in_sync_removals` only move on), so an addition refused is
    /// not waited for any more.
    pub fn on_proposal_rejected(&mut self, proposal: &Proposal) {
        match proposal {
            Proposal::InSync {
                epoch,
                node,
                in_sync: true,
                removals,
            } => {
                // Only the addition this refusal answers: a refusal of an older
                // copy (an earlier figure or epoch) says nothing of a newer one.
                if self.current_addition(*epoch, *node, *removals).is_some() {
                    self.adding.remove(node);
                }
            }
            other => self.on_proposal_failed(other),
        }
    }

    /// The addition of `node` waited for now, if it is the one proposed in
    /// `epoch` with the figure `removals`.
    fn current_addition(&mut self, epoch: u64, node: NodeId, removals: u64) -> Option<&mut Adding> {
        if self.role != (Role::Active { epoch }) {
            return None;
        }
        self.adding
            .get_mut(&node)
            .filter(|a| a.removals == removals)
    }

    /// Starts a planned handover (graceful stop, maintenance): no new writes are
    /// taken; once `to` (or the most up-to-date in-sync standby) holds every
    /// entry, the control plane is asked to make it active. Returns the standby.
    pub fn hand_over(
        &mut self,
        to: Option<NodeId>,
    ) -> Result<(NodeId, Vec<Effect>), HandOverError> {
        if !self.is_active() || !self.confirmed {
            return Err(HandOverError::NotActive);
        }
        let target = match to {
            Some(t) if t == self.me => return Err(HandOverError::ActiveAlready),
            Some(t) if self.view.in_sync.contains(&t) => t,
            Some(t) => return Err(HandOverError::NotInSync(t)),
            None => self
                .view
                .in_sync
                .iter()
                .max_by_key(|n| (self.progress.get(n).map(|p| p.matched).unwrap_or(0), **n))
                .copied()
                .ok_or(HandOverError::NoStandby)?,
        };
        self.handing_over = Some(target);
        self.handover_since_ms = self.now_ms;
        self.handover_asked = false;
        let mut fx = Vec::new();
        self.replicate(&mut fx, true);
        self.maybe_hand_over(&mut fx);
        Ok((target, fx))
    }

    fn maybe_hand_over(&mut self, fx: &mut Vec<Effect>) {
        let (Some(to), Role::Active { epoch }) = (self.handing_over, self.role) else {
            return;
        };
        let caught_up = self
            .progress
            .get(&to)
            .is_some_and(|p| p.matched >= self.last().index);
        if caught_up && self.commit >= self.last().index && !self.handover_asked {
            self.handover_asked = true;
            fx.push(Effect::Propose(Proposal::HandOver { epoch, to }));
        }
    }

    /// The control plane confirmed that this node is the active of `epoch` (or,
    /// `current = false`, that it is not: it steps down and waits for the view).
    pub fn on_confirmed(&mut self, epoch: u64, current: bool) -> Vec<Effect> {
        let mut fx = Vec::new();
        if self.role != (Role::Active { epoch }) {
            return fx;
        }
        if current {
            self.confirmed = true;
            self.advance_commit(&mut fx);
        } else {
            self.step_down(&mut fx);
        }
        fx
    }

    /// This follower received a snapshot of the active's committed state at `at`.
    /// Answers `InstallSnapshot` if it should be installed: a snapshot older than
    /// what is committed here, or from a fenced epoch, is dropped. Entries after
    /// `at` are kept when the log agrees with the snapshot at `at` (they may be
    /// acknowledged writes the snapshot does not cover).
    pub fn on_snapshot_received(&mut self, epoch: u64, at: LogPos) -> Vec<Effect> {
        let mut fx = Vec::new();
        if epoch < self.promised || at.index <= self.commit {
            return fx;
        }
        let promised = self.accept_epoch(epoch, &mut fx);
        let keep_log = self.epoch_at(at.index) == Some(at.epoch);
        if keep_log {
            self.compact_to(at.index);
        } else {
            self.log.clear();
            self.log_bytes = 0;
            self.base = at;
        }
        self.commit = at.index;
        // The promise is durable before the install is, and so before the
        // active hears the snapshot was taken.
        if let Some(p) = promised {
            fx.push(Effect::Persist {
                truncate_from: None,
                entries: vec![],
                promised: Some(p),
            });
        }
        fx.push(Effect::InstallSnapshot { at, keep_log });
        fx
    }

    /// An election for the epoch after `epoch` asks for this member's position:
    /// from now on it refuses entries of `epoch` and older (durably, before it
    /// answers), and whether it started empty and has not caught up since
    /// (see [`electable`]).
    pub fn on_prepare(&mut self, epoch: u64) -> (LogPos, bool, Vec<Effect>) {
        let mut fx = Vec::new();
        if let Role::Active { epoch: mine } = self.role {
            if mine <= epoch {
                self.step_down(&mut fx);
            }
        }
        if self.promised <= epoch {
            self.promised = epoch + 1;
            self.prepared_for = Some(epoch);
            fx.push(Effect::Persist {
                truncate_from: None,
                entries: vec![],
                promised: Some(self.promised),
            });
        }
        (self.last(), self.started_empty, fx)
    }
}

/// What the coordinator of an election learned of the stripe's named active
/// (it pings it; a prepare would fence it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NamedActive {
    /// The stripe names none.
    Absent,
    /// It did not answer: it may hold the writes (paused, cut off).
    Silent,
    /// It answered that it started without its stripe data.
    LostData,
    /// It answered with its data, not as the active of the epoch (it stepped
    /// down, and takes a new epoch itself: `Renew`).
    HoldsData,
}

/// Who may win an election, from the answers to its prepare: (member, log
/// position, started empty and not caught up since). A member that lost its
/// stripe data in a restart may still count as in sync, but elected it would
/// make the others drop what only they hold; it stands only when all
/// `in_sync` members answered, every one of them lost its data, and so did
/// the named active (or there is none): a whole stripe restarted with
/// temporary persistence, nothing is left to keep.
pub fn electable(
    answers: &[(NodeId, LogPos, bool)],
    in_sync: usize,
    active: NamedActive,
) -> Vec<(NodeId, LogPos)> {
    let caught_up: Vec<(NodeId, LogPos)> = answers
        .iter()
        .filter(|(_, _, behind)| !behind)
        .map(|(n, pos, _)| (*n, *pos))
        .collect();
    let nothing_left = matches!(active, NamedActive::Absent | NamedActive::LostData);
    if !caught_up.is_empty() || answers.len() < in_sync || !nothing_left {
        return caught_up;
    }
    answers.iter().map(|(n, pos, _)| (*n, *pos)).collect()
}

/// Why a planned handover cannot start.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandOverError {
    #[error("this node is not the confirmed active of its stripe")]
    NotActive,
    #[error("node {0} is not an in-sync standby")]
    NotInSync(NodeId),
    #[error("the node named is the stripe's active already: nothing to hand over")]
    ActiveAlready,
    #[error("the stripe has no in-sync standby to hand over to")]
    NoStandby,
}

/// Why a write or read cannot be served here.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not the active of this stripe (epoch {epoch}, active {active:?})")]
pub struct NotActive {
    pub epoch: u64,
    pub active: Option<NodeId>,
}

/// The election's choice among the positions in-sync standbys reported: the most
/// up-to-date log; among equals one that is not `coordinator` (the control-plane
/// leader), then the lowest node id.
///
/// An active that is also the control-plane leader fails over slowly: its death
/// needs a new leader before anyone can be promoted, and openraft 0.9 starts that
/// election only after the leader lease and an election timeout (0.7–0.8 s here).
pub fn choose_candidate(
    positions: &[(NodeId, LogPos)],
    coordinator: Option<NodeId>,
) -> Option<NodeId> {
    positions
        .iter()
        .max_by(|a, b| {
            a.1.cmp(&b.1)
                .then((Some(a.0) != coordinator).cmp(&(Some(b.0) != coordinator)))
                .then(b.0.cmp(&a.0))
        })
        .map(|(n, _)| *n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_election_prefers_the_longest_log_then_a_node_other_than_the_coordinator() {
        let at = |epoch, index| LogPos { epoch, index };
        // The longest log wins, even on the coordinator.
        assert_eq!(
            choose_candidate(&[(1, at(2, 9)), (2, at(2, 8))], Some(1)),
            Some(1)
        );
        // Among equals, not the coordinator; then the lowest id.
        let equal = [(1, at(2, 9)), (2, at(2, 9)), (3, at(2, 9))];
        assert_eq!(choose_candidate(&equal, Some(1)), Some(2));
        assert_eq!(choose_candidate(&equal, Some(2)), Some(1));
        assert_eq!(choose_candidate(&equal, None), Some(1));
        assert_eq!(choose_candidate(&[], Some(1)), None);
    }

    /// Appends with entries sent to `to` in `fx`: (first index, last index).
    fn appends_to(fx: &[Effect], to: NodeId) -> Vec<(u64, u64)> {
        fx.iter()
            .filter_map(|e| match e {
                Effect::Send {
                    to: t,
                    msg: Message::Append { prev, entries, .. },
                } if *t == to && !entries.is_empty() => {
                    Some((prev.index + 1, prev.index + entries.len() as u64))
                }
                _ => None,
            })
            .collect()
    }

    /// An active (node 1) of a stripe with one in-sync standby (node 2).
    fn active() -> Replica {
        let cfg = ReplicaConfig {
            max_appends_in_flight: 3,
            ..ReplicaConfig::default()
        };
        active_of(cfg, &[1, 2]).0
    }

    /// Node `me` with nothing on disk, at 1 000 ms.
    fn fresh(me: NodeId, cfg: ReplicaConfig) -> Replica {
        let mut r = Replica::new(
            me,
            cfg,
            Recovered {
                promised: 0,
                base: LogPos { epoch: 0, index: 0 },
                entries: Vec::new(),
                applied: 0,
            },
        );
        r.tick(1_000);
        r
    }

    /// Node 1 made the active of epoch 1 at 1 000 ms, of `members` (node 2
    /// among them, in sync and holding the take-over no-op), and the view.
    fn active_of(cfg: ReplicaConfig, members: &[NodeId]) -> (Replica, StripeView) {
        let mut r = fresh(1, cfg);
        // A new stripe's first active; the standby joined, then the in-sync
        // set once it held the take-over no-op.
        let view = StripeView {
            version: 1,
            epoch: 1,
            active: Some(1),
            members: [1].into(),
            in_sync: BTreeSet::new(),
            in_sync_removals: 0,
        };
        r.on_view(view.clone());
        let view = StripeView {
            version: 2,
            members: members.iter().copied().collect(),
            in_sync: [2].into(),
            ..view
        };
        r.on_view(view.clone());
        r.on_persisted(1);
        r.on_confirmed(1, true);
        ack(&mut r, true, 1);
        (r, view)
    }

    fn ack(r: &mut Replica, ok: bool, matched: u64) -> Vec<Effect> {
        r.on_message(
            2,
            Message::AppendAck {
                epoch: 1,
                ok,
                matched,
                round: 0,
                stale: None,
            },
        )
    }

    /// Proposes `n` one-entry writes one by one; the appends they sent to node 2.
    fn propose_each(r: &mut Replica, n: u8) -> Vec<(u64, u64)> {
        let mut sent = Vec::new();
        for k in 0..n {
            let (_, fx) = r.propose(vec![vec![k]]).unwrap();
            sent.extend(appends_to(&fx, 2));
        }
        sent
    }

    #[test]
    fn own_entries_are_uncommitted_until_the_in_sync_standby_holds_them() {
        let mut r = active();
        assert!(!r.own_entries_uncommitted(), "the take-over is committed");
        propose_each(&mut r, 2);
        assert!(r.own_entries_uncommitted());
        r.on_persisted(3);
        assert!(r.own_entries_uncommitted(), "durable here only");
        ack(&mut r, true, 2);
        assert!(r.own_entries_uncommitted(), "one of two held");
        ack(&mut r, true, 3);
        assert!(!r.own_entries_uncommitted());
        // A member that follows has none of its own.
        let mut f = active();
        f.propose(vec![vec![9]]).unwrap();
        f.on_view(StripeView {
            version: 3,
            epoch: 2,
            active: Some(2),
            members: [1, 2].into(),
            in_sync: [1].into(),
            in_sync_removals: 0,
        });
        assert!(!f.own_entries_uncommitted());
    }

    #[test]
    fn a_committed_later_epoch_fences_the_active_it_deposed() {
        let mut r = fresh(2, ReplicaConfig::default());
        let view = StripeView {
            version: 2,
            epoch: 1,
            active: Some(1),
            members: [1, 2].into(),
            in_sync: [2].into(),
            in_sync_removals: 0,
        };
        r.on_view(view.clone());
        let append = |r: &mut Replica, index: u64| {
            r.on_message(
                1,
                Message::Append {
                    epoch: 1,
                    prev: LogPos {
                        epoch: u64::from(index > 1),
                        index: index - 1,
                    },
                    entries: vec![Entry {
                        epoch: 1,
                        data: vec![index as u8],
                    }],
                    commit: 0,
                    round: index,
                },
            )
        };
        let acked = |fx: &[Effect]| {
            fx.iter().find_map(|e| match e {
                Effect::Send {
                    to: 1,
                    msg: Message::AppendAck { ok, stale, .. },
                } => Some((*ok, *stale)),
                _ => None,
            })
        };
        let fx = append(&mut r, 1);
        r.on_persisted(1);
        assert_eq!(acked(&fx).map(|a| a.1), Some(None), "{fx:?}");
        // Node 1 is removed from the cluster while cut off from the control
        // plane: the epoch moves on with no active yet.
        let fx = r.on_view(StripeView {
            version: 3,
            epoch: 2,
            active: None,
            members: [2].into(),
            ..view
        });
        assert!(
            fx.iter().any(|e| matches!(
                e,
                Effect::Persist {
                    promised: Some(2),
                    ..
                }
            )),
            "{fx:?}"
        );
        let fx = append(&mut r, 2);
        assert_eq!(acked(&fx), Some((false, Some(2))), "{fx:?}");
        assert_eq!(r.last().index, 1);
    }

    #[test]
    fn a_lost_append_goes_again_at_the_next_heartbeat() {
        let mut r = active();
        r.tick(1_100);
        assert_eq!(propose_each(&mut r, 1), vec![(2, 2)]);
        r.on_persisted(2);
        // Another append's loss changes nothing.
        r.on_append_lost(2, 7);
        assert!(appends_to(&r.tick(1_150), 2).is_empty());
        // Sent at 1 100 and lost: it goes again a heartbeat interval after it
        // was sent, not at once on whatever replicates next.
        r.on_append_lost(2, 2);
        assert!(
            appends_to(&r.read(1).unwrap(), 2).is_empty(),
            "not before its time"
        );
        let resent_by = |r: &mut Replica, from: u64, to: u64| -> Vec<(u64, (u64, u64))> {
            (from..=to)
                .step_by(10)
                .flat_map(|t| appends_to(&r.tick(t), 2).into_iter().map(move |a| (t, a)))
                .collect()
        };
        // The read was a heartbeat at 1 150: the next is due at 1 250.
        assert_eq!(resent_by(&mut r, 1_160, 1_300), vec![(1_250, (2, 2))]);
        // Lost again at once: sent again a heartbeat interval later, once.
        r.on_append_lost(2, 2);
        assert_eq!(resent_by(&mut r, 1_310, 1_400), vec![(1_350, (2, 2))]);
        ack(&mut r, true, 2);
        assert!(!r.own_entries_uncommitted());
    }

    #[test]
    fn appends_are_pipelined_up_to_the_limit() {
        let mut r = active();
        let sent = propose_each(&mut r, 5);
        // Three on their way before the first answer, one entry each.
        assert_eq!(sent, vec![(2, 2), (3, 3), (4, 4)]);
        r.on_persisted(6);
        // The first answer frees a place: the two waiting entries go together.
        let fx = ack(&mut r, true, 2);
        assert_eq!(appends_to(&fx, 2), vec![(5, 6)]);
        assert_eq!(r.commit_index(), 2);
    }

    #[test]
    fn an_overtaken_append_is_sent_again_once_the_first_is_answered() {
        let mut r = active();
        propose_each(&mut r, 3);
        r.on_persisted(4);
        // Appends 3 and 4 overtook append 2: both refused, the member holds 1.
        assert!(appends_to(&ack(&mut r, false, 1), 2).is_empty());
        assert!(appends_to(&ack(&mut r, false, 1), 2).is_empty());
        // Append 2 arrives and is answered: 3 and 4 go again, once.
        let fx = ack(&mut r, true, 2);
        assert_eq!(appends_to(&fx, 2), vec![(3, 4)]);
        assert!(appends_to(&ack(&mut r, true, 4), 2).is_empty());
        assert_eq!(r.commit_index(), 4);
    }

    fn snapshot_offers_to(fx: &[Effect], to: NodeId) -> usize {
        fx.iter()
            .filter(|e| matches!(e, Effect::SendSnapshot { to: t } if *t == to))
            .count()
    }

    /// One-entry writes the in-sync standby (node 2) acknowledges at once, with
    /// a tick after each (compaction runs on ticks); every effect they made.
    fn write(r: &mut Replica, written: &mut u64, n: u64, now_ms: u64) -> Vec<Effect> {
        let mut fx = Vec::new();
        for _ in 0..n {
            fx.extend(r.propose(vec![vec![0]]).unwrap().1);
            *written += 1;
            fx.extend(r.on_persisted(*written));
            fx.extend(ack(r, true, *written));
            fx.extend(r.tick(now_ms));
        }
        fx
    }

    fn answer(matched: u64, ok: bool) -> Message {
        Message::AppendAck {
            epoch: 1,
            ok,
            matched,
            round: 0,
            stale: None,
        }
    }

    #[test]
    fn a_member_catching_up_from_a_snapshot_is_not_sent_another_while_writes_go_on() {
        // Small appends, so that catching up takes many round trips.
        let cfg = ReplicaConfig {
            retain_entries: 5,
            max_batch: 4,
            ..ReplicaConfig::default()
        };
        let (mut r, view) = active_of(cfg, &[1, 2]);
        let mut written = 1;
        write(&mut r, &mut written, 20, 1_000);
        // A new member joins: the log no longer reaches back to its start.
        assert!(r.base.index > 1, "compacted before the member joined");
        let mut fx = r.on_view(StripeView {
            version: 3,
            members: [1, 2, 3].into(),
            ..view
        });
        fx.extend(r.tick(1_000));
        fx.extend(r.on_message(3, answer(0, false)));
        fx.extend(r.tick(1_000));
        assert_eq!(snapshot_offers_to(&fx, 3), 1);
        let at = r.base;
        // Writes go on during the transfer, far past `retain_entries`.
        write(&mut r, &mut written, 30, 1_000);
        let mut fx = r.on_snapshot_sent(3, at, true);
        // And after it, while the member catches up from the snapshot's end,
        // answering each append as it arrives.
        let mut offers = 0;
        let mut held = at.index;
        for _ in 0..40 {
            fx.extend(write(&mut r, &mut written, 1, 1_000));
            offers += snapshot_offers_to(&fx, 3);
            let sent = appends_to(&fx, 3);
            fx.clear();
            for (from, to) in sent {
                if from == held + 1 {
                    held = to;
                    fx.extend(r.on_message(3, answer(held, true)));
                }
            }
        }
        assert_eq!(offers, 0, "the member was sent another snapshot");
        assert!(held + 5 >= written, "it caught up: {held} of {written}");
        // Caught up: compaction goes on as usual.
        assert!(r.base.index > at.index, "the log was never compacted again");
    }

    /// An active with a short log (`retain_entries` 5), node 2 in sync, and
    /// node 3 holding nothing, offered a snapshot of the compacted log; the
    /// index written up to.
    fn member_3_offered_a_snapshot() -> (Replica, u64) {
        let cfg = ReplicaConfig {
            retain_entries: 5,
            ..ReplicaConfig::default()
        };
        let (mut r, _) = active_of(cfg, &[1, 2, 3]);
        let mut written = 1;
        let mut fx = write(&mut r, &mut written, 20, 1_000);
        fx.extend(r.on_message(3, answer(0, false)));
        fx.extend(r.tick(1_000));
        assert_eq!(snapshot_offers_to(&fx, 3), 1);
        (r, written)
    }

    #[test]
    fn a_member_catching_up_that_falls_silent_does_not_hold_the_log() {
        let (mut r, mut written) = member_3_offered_a_snapshot();
        let at = r.base;
        r.on_snapshot_sent(3, at, true);
        write(&mut r, &mut written, 20, 1_000);
        assert_eq!(r.base, at, "held for the member catching up");
        // It never answers again.
        write(&mut r, &mut written, 20, 1_000 + CATCH_UP_SILENCE_MS);
        assert!(
            r.base.index > at.index,
            "a silent member still holds the log"
        );
    }

    #[test]
    fn a_failed_snapshot_transfer_is_offered_again_after_a_pause() {
        let (mut r, _) = member_3_offered_a_snapshot();
        // The member cannot be reached: the transfer fails at once.
        let at = r.base;
        let mut fx = r.on_snapshot_sent(3, at, false);
        fx.extend(r.tick(1_000 + SNAPSHOT_FAILED_PAUSE_MS - 1));
        assert_eq!(snapshot_offers_to(&fx, 3), 0, "offered again at once");
        // On the next heartbeat after the pause.
        let fx = r.tick(1_000 + SNAPSHOT_FAILED_PAUSE_MS + 100);
        assert_eq!(snapshot_offers_to(&fx, 3), 1, "never offered again");
    }

    /// The in-sync removals of node 2 proposed in `fx`.
    fn removals_of_2(fx: &[Effect]) -> usize {
        fx.iter()
            .filter(|e| {
                matches!(
                    e,
                    Effect::Propose(Proposal::InSync {
                        node: 2,
                        in_sync: false,
                        ..
                    })
                )
            })
            .count()
    }

    #[test]
    fn a_removal_the_control_plane_could_not_take_is_proposed_again_after_a_pause() {
        let mut r = active();
        r.propose(vec![vec![1]]).unwrap();
        let silent_at = 1_000 + r.cfg.in_sync_timeout_ms;
        let fx = r.tick(silent_at);
        assert_eq!(removals_of_2(&fx), 1, "a silent standby holding up a write");
        // No control-plane leader answers: the proposal fails at once.
        let removal = fx
            .iter()
            .find_map(|e| match e {
                Effect::Propose(p @ Proposal::InSync { .. }) => Some(p.clone()),
                _ => None,
            })
            .unwrap();
        r.on_proposal_failed(&removal);
        let mut again = 0;
        for t in (silent_at + 20..silent_at + PROPOSAL_RETRY_MS).step_by(20) {
            again += removals_of_2(&r.tick(t));
        }
        assert_eq!(again, 0, "proposed again on every tick");
        let fx = r.tick(silent_at + PROPOSAL_RETRY_MS);
        assert_eq!(removals_of_2(&fx), 1, "never proposed again");
    }

    #[test]
    fn a_refusal_sent_before_a_snapshot_arrived_does_not_ask_for_another() {
        let (mut r, mut written) = member_3_offered_a_snapshot();
        let at = r.base;
        // During the transfer a heartbeat goes out; the member, holding
        // nothing yet, refuses it, and the refusal arrives after the snapshot.
        let before = r.round;
        r.tick(1_100);
        let mut fx = r.on_snapshot_sent(3, at, true);
        let late = Message::AppendAck {
            epoch: 1,
            ok: false,
            matched: 0,
            round: before + 1,
            stale: None,
        };
        fx.extend(r.on_message(3, late));
        fx.extend(r.tick(1_200));
        fx.extend(write(&mut r, &mut written, 3, 1_200));
        assert_eq!(snapshot_offers_to(&fx, 3), 0, "a second snapshot");
        let sent = appends_to(&fx, 3);
        assert_eq!(sent.first().map(|a| a.0), Some(at.index + 1), "{sent:?}");
    }

    #[test]
    fn a_refusal_from_a_member_holding_what_it_matched_resumes_after_that() {
        let mut r = active();
        propose_each(&mut r, 3);
        r.on_persisted(4);
        ack(&mut r, true, 2);
        // Appends to 3 and 4 are in flight; the member refuses one, saying it
        // holds up to 3 (it took them in another order): resume after 2, the
        // last index known to match, never before it.
        let fx = ack(&mut r, false, 3);
        let sent = appends_to(&fx, 2);
        assert!(sent.iter().all(|a| a.0 >= 3), "{sent:?}");
    }

    #[test]
    fn a_refusal_behind_every_append_in_flight_sends_from_the_members_hint() {
        let mut r = active();
        propose_each(&mut r, 3);
        // The member lost its log past the no-op's predecessor: start over there.
        let fx = ack(&mut r, false, 0);
        assert_eq!(appends_to(&fx, 2), vec![(1, 4)]);
    }
}
