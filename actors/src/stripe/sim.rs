//! Deterministic simulation of a stripe: replicas of `replica.rs`, the control
//! plane's real decision rules (`ControlState`) behind an oracle that is sometimes
//! unavailable, a network that delays, drops and partitions, crashes with restarts
//! from what was durable, and clients that write and read. Seeded random schedules
//! of thousands of steps; after every step the invariants of DESIGN.md are checked:
//!
//! 1. at most one active per epoch, and it is the one the control plane chose;
//! 2. every acknowledged write is durable on the active and every in-sync standby
//!    the control plane knows, forever after; a linearizable read sees every write
//!    acknowledged before it was issued.
//!
//! No sockets, no clock: a step is 10 ms of simulated time.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::replica::*;
use crate::control::state::{ControlCommand, ControlOutcome, ControlState};

const STEP_MS: u64 = 10;
const CP: NodeId = 0;

/// What a node keeps across a crash.
#[derive(Debug, Clone, Default)]
struct Disk {
    promised: u64,
    base: LogPos,
    /// Write ids covered by `base` (applied and compacted, or from a snapshot).
    base_writes: Vec<u64>,
    entries: Vec<Entry>,
    applied: u64,
}

impl Disk {
    fn content(&self) -> BTreeSet<u64> {
        self.base_writes
            .iter()
            .copied()
            .chain(self.entries.iter().filter_map(|e| write_id(&e.data)))
            .collect()
    }

    /// Write ids in log order up to `index`.
    fn writes_upto(&self, index: u64) -> Vec<u64> {
        let mut out = self.base_writes.clone();
        for (k, e) in self.entries.iter().enumerate() {
            if self.base.index + 1 + k as u64 > index {
                break;
            }
            out.extend(write_id(&e.data));
        }
        out
    }
}

fn write_id(data: &[u8]) -> Option<u64> {
    data.try_into().ok().map(u64::from_be_bytes)
}

#[derive(Debug, Clone)]
enum SimMsg {
    Stripe(Message),
    View(StripeView),
    Confirmed {
        epoch: u64,
        current: bool,
    },
    Prepare {
        epoch: u64,
        election: u64,
    },
    Prepared {
        election: u64,
        pos: LogPos,
        behind: bool,
    },
    Snapshot {
        epoch: u64,
        at: LogPos,
        writes: Vec<u64>,
    },
    SnapshotDone {
        at: LogPos,
    },
    Propose(Proposal),
    /// The control plane's answer to a proposal did not come: the proposer is
    /// told it failed, whether or not the command was (or will be) applied.
    ProposalFailed(Proposal),
    /// The control plane refused the proposal (its answer, as the proposer's
    /// call returns it).
    ProposalRejected(Proposal),
}

struct Node {
    id: NodeId,
    up: bool,
    replica: Replica,
    disk: Disk,
    /// Writes this node accepted as active: index → write id.
    pending: BTreeMap<u64, u64>,
    /// Reads waiting: read id → acknowledged writes when the read was issued.
    reads: HashMap<u64, BTreeSet<u64>>,
    /// A received snapshot's writes, until the replica says whether to install it.
    staged: Option<Vec<u64>>,
    /// The active's own appends not yet durable (lost in a crash), in order.
    appending: Vec<(u64, Entry)>,
}

struct Election {
    epoch: u64,
    id: u64,
    started: u64,
    /// What the coordinator's ping of the named active found.
    named: NamedActive,
    answers: Vec<(NodeId, LogPos, bool)>,
}

struct Sim {
    rng: StdRng,
    now: u64,
    nodes: Vec<Node>,
    cp: ControlState,
    /// Number of control-plane decisions applied (the view version).
    cp_version: u64,
    /// epoch → the active the control plane chose for it.
    chosen: BTreeMap<u64, NodeId>,
    cp_down_until: u64,
    election: Option<Election>,
    next_election: u64,
    net: Vec<(u64, NodeId, NodeId, SimMsg)>,
    /// Nodes cut off from everyone (the control plane included).
    isolated: BTreeSet<NodeId>,
    /// Nodes whose disk was emptied (temporary persistence): not held to
    /// invariant 2 until a test checks them itself.
    wiped: BTreeSet<NodeId>,
    acked: BTreeMap<u64, u64>,
    next_write: u64,
    next_read: u64,
    reads_served: u64,
    loss: f64,
    /// Random crashes, partitions and control-plane outages (off for scripted tests).
    chaos: bool,
    /// Acknowledged writes not yet checked against the holders.
    unchecked: Vec<u64>,
    steps: u64,
}

fn cfg() -> ReplicaConfig {
    ReplicaConfig {
        election_timeout_ms: 500,
        heartbeat_ms: 100,
        in_sync_timeout_ms: 500,
        max_batch: 16,
        max_appends_in_flight: 3,
        max_batch_bytes: 200,
        retain_entries: 40,
        retain_bytes: 400,
        snapshot_retry_ms: 1_000,
    }
}

impl Sim {
    fn new(seed: u64, n: u64) -> Sim {
        let mut cp = ControlState::default();
        cp.apply(&ControlCommand::Configure { stripes: 1 });
        let mut nodes = Vec::new();
        for id in 1..=n {
            cp.apply(&ControlCommand::Join {
                node: id,
                peer: format!("n{id}"),
                witness: false,
                stripe: Some(0),
            });
            nodes.push(Node {
                id,
                up: true,
                replica: Replica::new(id, cfg(), Recovered::default()),
                disk: Disk::default(),
                pending: BTreeMap::new(),
                reads: HashMap::new(),
                staged: None,
                appending: Vec::new(),
            });
        }
        let mut sim = Sim {
            rng: StdRng::seed_from_u64(seed),
            now: 0,
            nodes,
            cp,
            cp_version: 1,
            chosen: BTreeMap::from([(1, 1)]),
            cp_down_until: 0,
            election: None,
            next_election: 1,
            net: Vec::new(),
            isolated: BTreeSet::new(),
            wiped: BTreeSet::new(),
            acked: BTreeMap::new(),
            next_write: 1,
            next_read: 1,
            reads_served: 0,
            loss: 0.05,
            chaos: true,
            unchecked: Vec::new(),
            steps: 0,
        };
        sim.broadcast_view();
        sim
    }

    fn view(&self) -> StripeView {
        let s = &self.cp.stripes[&0];
        StripeView {
            version: self.cp_version,
            epoch: s.epoch,
            active: s.active,
            members: s.members.clone(),
            in_sync: s.in_sync.clone(),
            in_sync_removals: s.in_sync_removals,
        }
    }

    fn cp_up(&self) -> bool {
        self.now >= self.cp_down_until
    }

    fn reachable(&self, a: NodeId, b: NodeId) -> bool {
        let up = |n: NodeId| n == CP || self.nodes[(n - 1) as usize].up;
        up(a) && up(b) && !self.isolated.contains(&a) && !self.isolated.contains(&b)
    }

    fn send(&mut self, from: NodeId, to: NodeId, msg: SimMsg) {
        if self.rng.gen_bool(self.loss) {
            self.proposal_lost(from, msg);
            return;
        }
        let delay = self.rng.gen_range(0..4) * STEP_MS;
        self.net.push((self.now + delay, from, to, msg));
    }

    /// A proposal that never reaches the control plane times out at its
    /// proposer (as a call through openraft does).
    fn proposal_lost(&mut self, from: NodeId, msg: SimMsg) {
        if let SimMsg::Propose(p) = msg {
            let at = self.now + 300;
            self.net.push((at, CP, from, SimMsg::ProposalFailed(p)));
        }
    }

    fn broadcast_view(&mut self) {
        let v = self.view();
        for n in 1..=self.nodes.len() as u64 {
            self.send(CP, n, SimMsg::View(v.clone()));
        }
    }

    fn apply_cp(&mut self, cmd: ControlCommand) -> ControlOutcome {
        let out = self.cp.apply(&cmd);
        if let ControlOutcome::Promoted { epoch } = out {
            let active = self.cp.stripes[&0].active.unwrap_or(0);
            assert!(
                self.chosen.insert(epoch, active).is_none(),
                "two actives chosen for epoch {epoch}"
            );
        }
        if !matches!(out, ControlOutcome::Rejected { .. }) {
            self.cp_version += 1;
            self.broadcast_view();
        }
        out
    }

    /// Runs a node's effects, in order; messages leave only after what precedes
    /// them is durable.
    fn run(&mut self, id: NodeId, fx: Vec<Effect>) {
        for e in fx {
            let i = (id - 1) as usize;
            match e {
                Effect::AppendLocal { entries } => {
                    self.nodes[i].appending.extend(entries);
                }
                Effect::Persist {
                    truncate_from,
                    entries,
                    promised,
                } => {
                    // A `Persist` follows every earlier local append.
                    self.flush_local(id);
                    let i = (id - 1) as usize;
                    let d = &mut self.nodes[i].disk;
                    if let Some(t) = truncate_from {
                        assert!(t > d.applied, "node {id} truncated applied entry {t}");
                        d.entries.truncate((t - d.base.index - 1) as usize);
                    }
                    for (index, entry) in entries {
                        assert_eq!(
                            index,
                            d.base.index + d.entries.len() as u64 + 1,
                            "gap in log of node {id}"
                        );
                        d.entries.push(entry);
                    }
                    if let Some(p) = promised {
                        d.promised = p;
                    }
                }
                Effect::InstallSnapshot { at, keep_log } => {
                    self.flush_local(id);
                    let node = &mut self.nodes[i];
                    let writes = node.staged.take().unwrap_or_default();
                    let d = &mut node.disk;
                    if keep_log {
                        let n = (at.index - d.base.index) as usize;
                        d.entries.drain(..n.min(d.entries.len()));
                    } else {
                        d.entries.clear();
                    }
                    d.base = at;
                    d.base_writes = writes;
                    d.applied = d.applied.max(at.index);
                }
                Effect::Send { to, msg } => self.send(id, to, SimMsg::Stripe(msg)),
                Effect::SendSnapshot { to } => {
                    let node = &self.nodes[i];
                    let c = node.replica.commit_index();
                    let at = LogPos {
                        epoch: node.replica.epoch_at(c).unwrap_or(0),
                        index: c,
                    };
                    let writes = node.disk.writes_upto(c);
                    let epoch = match node.replica.role() {
                        Role::Active { epoch } => epoch,
                        Role::Follower => continue,
                    };
                    self.send(id, to, SimMsg::Snapshot { epoch, at, writes });
                }
                Effect::Commit { upto } => {
                    let node = &mut self.nodes[i];
                    node.disk.applied = node.disk.applied.max(upto);
                    if let Role::Active { .. } = node.replica.role() {
                        let done: Vec<u64> = node.pending.range(..=upto).map(|(k, _)| *k).collect();
                        for k in done {
                            let w = node.pending.remove(&k).unwrap_or(0);
                            self.acked.insert(w, k);
                            self.unchecked.push(w);
                        }
                    }
                }
                Effect::Propose(p) => self.send(id, CP, SimMsg::Propose(p)),
                Effect::ReadReady { id: read, index } => {
                    let node = &mut self.nodes[i];
                    let Some(before) = node.reads.remove(&read) else {
                        continue;
                    };
                    assert!(node.replica.commit_index() >= index);
                    let seen: BTreeSet<u64> = node.disk.writes_upto(index).into_iter().collect();
                    let missing: Vec<u64> = before.difference(&seen).copied().collect();
                    assert!(
                        missing.is_empty() || self.wiped.contains(&id),
                        "read {read} at node {id} (index {index}) misses acknowledged writes {missing:?}"
                    );
                    self.reads_served += 1;
                }
                Effect::SteppedDown { .. } => {
                    let node = &mut self.nodes[i];
                    node.pending.clear();
                    node.reads.clear();
                }
                Effect::Compact { upto } => {
                    self.flush_local(id);
                    let d = &mut self.nodes[i].disk;
                    let n = (upto - d.base.index) as usize;
                    let moved: Vec<Entry> = d.entries.drain(..n.min(d.entries.len())).collect();
                    let epoch = moved.last().map(|e| e.epoch).unwrap_or(d.base.epoch);
                    d.base_writes
                        .extend(moved.iter().filter_map(|e| write_id(&e.data)));
                    d.base = LogPos { epoch, index: upto };
                }
            }
        }
    }

    /// Makes a node's pending local appends durable (in order) and tells its replica.
    fn flush_local(&mut self, id: NodeId) {
        let i = (id - 1) as usize;
        let pending = std::mem::take(&mut self.nodes[i].appending);
        let Some(last) = pending.last().map(|e| e.0) else {
            return;
        };
        {
            let d = &mut self.nodes[i].disk;
            for (index, entry) in pending {
                assert_eq!(
                    index,
                    d.base.index + d.entries.len() as u64 + 1,
                    "gap in log of node {id}"
                );
                d.entries.push(entry);
            }
        }
        let fx = self.nodes[i].replica.on_persisted(last);
        self.run(id, fx);
    }

    fn deliver(&mut self, from: NodeId, to: NodeId, msg: SimMsg) {
        if let SimMsg::ProposalFailed(p) = &msg {
            // The proposer's own timeout: no network in between.
            if to != CP && self.nodes[(to - 1) as usize].up {
                self.nodes[(to - 1) as usize].replica.on_proposal_failed(p);
            }
            return;
        }
        if let SimMsg::ProposalRejected(p) = &msg {
            // The answer to the proposer's call (the call itself was made).
            if to != CP && self.nodes[(to - 1) as usize].up {
                self.nodes[(to - 1) as usize]
                    .replica
                    .on_proposal_rejected(p);
            }
            return;
        }
        if !self.reachable(from, to) {
            if to == CP && self.nodes[(from - 1) as usize].up {
                self.proposal_lost(from, msg);
            }
            return;
        }
        if std::env::var("SIM_TRACE").is_ok() {
            eprintln!("t={} {from}->{to} {msg:?}", self.now);
        }
        if to == CP {
            if !self.cp_up() {
                self.proposal_lost(from, msg);
                return;
            }
            match msg {
                SimMsg::Propose(
                    p @ Proposal::InSync {
                        epoch,
                        node,
                        in_sync,
                        removals,
                    },
                ) => {
                    // As a proposal through openraft can time out on the way: the
                    // proposer hears it failed, yet it was applied, or will be
                    // applied later (still queued at the leader), or never.
                    let r: f64 = if self.chaos { self.rng.gen() } else { 1.0 };
                    if r < 0.1 {
                        self.net.push((
                            self.now + STEP_MS,
                            CP,
                            from,
                            SimMsg::ProposalFailed(p.clone()),
                        ));
                        let later = self.now + self.rng.gen_range(5..100) * STEP_MS;
                        self.net.push((later, from, CP, SimMsg::Propose(p)));
                        return;
                    }
                    if r >= 0.15 || self.rng.gen_bool(0.5) {
                        let out = self.apply_cp(ControlCommand::SetInSync {
                            stripe: 0,
                            epoch,
                            by: from,
                            node,
                            in_sync,
                            removals: Some(removals),
                        });
                        if r >= 0.15 && matches!(out, ControlOutcome::Rejected { .. }) {
                            let at = self.now + self.rng.gen_range(0..4) * STEP_MS;
                            self.net
                                .push((at, CP, from, SimMsg::ProposalRejected(p.clone())));
                        }
                    }
                    if r < 0.15 {
                        self.net
                            .push((self.now + STEP_MS, CP, from, SimMsg::ProposalFailed(p)));
                    }
                }
                SimMsg::Propose(Proposal::Election { epoch }) => self.start_election(epoch),
                SimMsg::Propose(Proposal::Renew { epoch }) => {
                    self.apply_cp(ControlCommand::Renew {
                        stripe: 0,
                        epoch,
                        node: from,
                    });
                }
                SimMsg::Propose(Proposal::HandOver { epoch, to }) => {
                    let in_sync = self.view().in_sync;
                    self.apply_cp(ControlCommand::Promote {
                        stripe: 0,
                        epoch,
                        node: to,
                        in_sync,
                    });
                }
                SimMsg::Propose(Proposal::ConfirmActive { epoch }) => {
                    let v = self.view();
                    let current = v.epoch == epoch && v.active == Some(from);
                    self.send(CP, from, SimMsg::Confirmed { epoch, current });
                    if !current {
                        self.send(CP, from, SimMsg::View(v));
                    }
                }
                SimMsg::Prepared {
                    election,
                    pos,
                    behind,
                } => {
                    if let Some(e) = self.election.as_mut() {
                        if e.id == election {
                            e.answers.push((from, pos, behind));
                        }
                    }
                }
                SimMsg::SnapshotDone { .. }
                | SimMsg::ProposalFailed(_)
                | SimMsg::ProposalRejected(_)
                | SimMsg::Stripe(_)
                | SimMsg::View(_)
                | SimMsg::Confirmed { .. } => {}
                SimMsg::Prepare { .. } | SimMsg::Snapshot { .. } => {}
            }
            return;
        }
        let i = (to - 1) as usize;
        let fx = match msg {
            SimMsg::Stripe(m) => self.nodes[i].replica.on_message(from, m),
            SimMsg::View(v) => self.nodes[i].replica.on_view(v),
            SimMsg::ProposalFailed(_) | SimMsg::ProposalRejected(_) => return,
            SimMsg::Prepare { epoch, election } => {
                let (pos, behind, fx) = self.nodes[i].replica.on_prepare(epoch);
                self.run(to, fx);
                self.send(
                    to,
                    CP,
                    SimMsg::Prepared {
                        election,
                        pos,
                        behind,
                    },
                );
                return;
            }
            SimMsg::Snapshot { epoch, at, writes } => {
                self.nodes[i].staged = Some(writes);
                let fx = self.nodes[i].replica.on_snapshot_received(epoch, at);
                let installed = fx
                    .iter()
                    .any(|e| matches!(e, Effect::InstallSnapshot { .. }));
                self.run(to, fx);
                self.nodes[i].staged = None;
                if installed {
                    self.send(to, from, SimMsg::SnapshotDone { at });
                }
                return;
            }
            SimMsg::SnapshotDone { at } => self.nodes[i].replica.on_snapshot_sent(from, at, true),
            SimMsg::Confirmed { epoch, current } => {
                self.nodes[i].replica.on_confirmed(epoch, current)
            }
            SimMsg::Prepared { .. } | SimMsg::Propose(_) => return,
        };
        self.run(to, fx);
    }

    /// The coordinator: if the active is really unreachable, ask every in-sync
    /// standby for its position (fencing it), then promote the best one.
    fn start_election(&mut self, epoch: u64) {
        let view = self.view();
        if view.epoch != epoch || self.election.is_some() {
            return;
        }
        let mut named = NamedActive::Absent;
        if let Some(a) = view.active {
            named = NamedActive::Silent;
            // The pong may be lost (or late) one time in ten.
            if self.reachable(CP, a) && !self.rng.gen_bool(0.1) {
                let r = &self.nodes[(a - 1) as usize].replica;
                if r.role() == (Role::Active { epoch }) {
                    return; // the active answers the coordinator: no election
                }
                named = if r.started_empty() {
                    NamedActive::LostData
                } else {
                    NamedActive::HoldsData
                };
            }
        }
        let id = self.next_election;
        self.next_election += 1;
        self.election = Some(Election {
            epoch,
            id,
            started: self.now,
            named,
            answers: Vec::new(),
        });
        for n in view.in_sync {
            self.send(
                CP,
                n,
                SimMsg::Prepare {
                    epoch,
                    election: id,
                },
            );
        }
    }

    fn finish_election(&mut self) {
        let Some(e) = &self.election else { return };
        let in_sync = self.view().in_sync;
        let all = e.answers.len() >= in_sync.len();
        if !all && self.now < e.started + 200 {
            return;
        }
        let Some(e) = self.election.take() else {
            return;
        };
        if !self.cp_up() {
            return;
        }
        let candidates = electable(&e.answers, in_sync.len(), e.named);
        if let Some(winner) = choose_candidate(&candidates, None) {
            let responders: BTreeSet<NodeId> = candidates.iter().map(|(n, _)| *n).collect();
            self.apply_cp(ControlCommand::Promote {
                stripe: 0,
                epoch: e.epoch,
                node: winner,
                in_sync: responders,
            });
        }
    }

    fn crash(&mut self, id: NodeId) {
        let node = &mut self.nodes[(id - 1) as usize];
        node.up = false;
        node.pending.clear();
        node.reads.clear();
        node.appending.clear();
    }

    fn restart(&mut self, id: NodeId) {
        let node = &mut self.nodes[(id - 1) as usize];
        let d = node.disk.clone();
        node.replica = Replica::new(
            id,
            cfg(),
            Recovered {
                promised: d.promised,
                base: d.base,
                entries: d.entries.clone(),
                applied: d.applied,
            },
        );
        node.up = true;
        let fx = node.replica.tick(self.now);
        self.run(id, fx);
        let v = self.view();
        self.send(CP, id, SimMsg::View(v));
    }

    fn step(&mut self) {
        self.now += STEP_MS;
        // Random events.
        let n = self.nodes.len() as u64;
        let r: f64 = if self.chaos { self.rng.gen() } else { 1.0 };
        if r < 0.004 {
            let id = self.rng.gen_range(1..=n);
            if self.nodes[(id - 1) as usize].up {
                self.crash(id);
            } else {
                self.restart(id);
            }
        } else if r < 0.008 {
            let id = self.rng.gen_range(1..=n);
            if !self.isolated.remove(&id) && self.isolated.len() + 1 < n as usize {
                self.isolated.insert(id);
            }
        } else if r < 0.010 {
            self.cp_down_until = self.now + self.rng.gen_range(1..100) * STEP_MS;
        } else if r < 0.012 {
            self.isolated.clear();
        } else if r < 0.013 {
            // A planned handover on whichever node is active.
            for id in 1..=n {
                let i = (id - 1) as usize;
                if self.nodes[i].up {
                    if let Ok((_, fx)) = self.nodes[i].replica.hand_over(None) {
                        self.run(id, fx);
                    }
                }
            }
        }
        for id in 1..=n {
            if self.chaos && !self.nodes[(id - 1) as usize].up && self.rng.gen_bool(0.02) {
                self.restart(id);
            }
        }
        // Clients.
        for id in 1..=n {
            let i = (id - 1) as usize;
            if !self.nodes[i].up || !matches!(self.nodes[i].replica.role(), Role::Active { .. }) {
                continue;
            }
            if self.rng.gen_bool(0.5) {
                let k = self.rng.gen_range(1..4);
                let ws: Vec<u64> = (0..k).map(|j| self.next_write + j).collect();
                self.next_write += k;
                let data = ws.iter().map(|w| w.to_be_bytes().to_vec()).collect();
                if let Ok((idx, fx)) = self.nodes[i].replica.propose(data) {
                    for (index, w) in idx.into_iter().zip(ws) {
                        self.nodes[i].pending.insert(index, w);
                    }
                    self.run(id, fx);
                }
            }
            if self.rng.gen_bool(0.2) {
                let read = self.next_read;
                self.next_read += 1;
                let before: BTreeSet<u64> = self.acked.keys().copied().collect();
                self.nodes[i].reads.insert(read, before);
                if let Ok(fx) = self.nodes[i].replica.read(read) {
                    self.run(id, fx);
                }
            }
        }
        // Network.
        let now = self.now;
        let (due, later): (Vec<_>, Vec<_>) = std::mem::take(&mut self.net)
            .into_iter()
            .partition(|(t, ..)| *t <= now);
        self.net = later;
        for (_, from, to, msg) in due {
            self.deliver(from, to, msg);
        }
        // Local fsyncs finish at random moments.
        for id in 1..=n {
            if self.nodes[(id - 1) as usize].up && self.rng.gen_bool(0.5) {
                self.flush_local(id);
            }
        }
        // Timers.
        for id in 1..=n {
            if self.nodes[(id - 1) as usize].up {
                let fx = self.nodes[(id - 1) as usize].replica.tick(now);
                self.run(id, fx);
            }
        }
        self.finish_election();
        if self.now.is_multiple_of(300) && self.cp_up() {
            self.broadcast_view();
        }
        self.steps += 1;
        let full = self.steps.is_multiple_of(50);
        self.check(full);
    }

    /// Checks the invariants: new acknowledgements at every step, every
    /// acknowledged write every 50 steps (and at the end of a run).
    fn check(&mut self, full: bool) {
        // Invariant 1: every node acting as active is the one chosen for its epoch.
        let mut seen: BTreeMap<u64, NodeId> = BTreeMap::new();
        for node in self.nodes.iter().filter(|n| n.up) {
            if let Role::Active { epoch } = node.replica.role() {
                assert_eq!(
                    self.chosen.get(&epoch),
                    Some(&node.id),
                    "node {} acts as active of epoch {epoch}, chosen: {:?}",
                    node.id,
                    self.chosen.get(&epoch)
                );
                assert!(
                    seen.insert(epoch, node.id).is_none(),
                    "two actives in epoch {epoch}"
                );
            }
        }
        // Invariant 2: acknowledged writes are on the active and every in-sync standby.
        let view = self.view();
        let holders: BTreeSet<NodeId> = view
            .in_sync
            .iter()
            .copied()
            .chain(view.active)
            .filter(|n| !self.wiped.contains(n))
            .collect();
        let fresh = std::mem::take(&mut self.unchecked);
        let to_check: Vec<u64> = if full {
            self.acked.keys().copied().collect()
        } else {
            fresh
        };
        if to_check.is_empty() {
            return;
        }
        for h in holders {
            let content = self.nodes[(h - 1) as usize].disk.content();
            for w in &to_check {
                let index = self.acked.get(w).copied().unwrap_or(0);
                assert!(
                    content.contains(w),
                    "acknowledged write {w} (index {index}) missing on node {h} (epoch {}, in sync {:?})",
                    view.epoch,
                    view.in_sync
                );
            }
        }
    }

    /// Heals everything and runs until a write is acknowledged again.
    fn recovers(&mut self) -> bool {
        self.isolated.clear();
        self.cp_down_until = 0;
        self.loss = 0.0;
        for id in 1..=self.nodes.len() as u64 {
            if !self.nodes[(id - 1) as usize].up {
                self.restart(id);
            }
        }
        let before = self.acked.len();
        for _ in 0..3000 {
            self.step();
            if self.acked.len() > before + 10 {
                return true;
            }
        }
        false
    }
}

impl Sim {
    /// A settled stripe of 3 whose two standbys are both in sync.
    fn settled_with_two_in_sync(seed: u64) -> Sim {
        let mut sim = Sim::settled(seed, 3);
        for _ in 0..2_000 {
            if sim.view().in_sync.len() == 2 {
                break;
            }
            sim.step();
        }
        assert_eq!(sim.view().in_sync.len(), 2, "{:?}", sim.view());
        sim
    }

    /// Restarts `id` with its stripe data gone (temporary persistence, a
    /// wiped directory); its missing writes are not held against it until
    /// `wiped` is cleared.
    fn restart_empty(&mut self, id: NodeId) {
        self.crash(id);
        self.nodes[(id - 1) as usize].disk = Disk::default();
        self.wiped.insert(id);
        self.restart(id);
    }

    /// Steps until `done` holds (checked after each step), at most `max` times.
    fn step_until(&mut self, max: usize, done: impl Fn(&Sim) -> bool) -> bool {
        for _ in 0..max {
            self.step();
            if done(self) {
                return true;
            }
        }
        false
    }

    /// A stripe of `nodes` with no chaos and no loss, run for 2 s: an active
    /// and its in-sync standbys, for tests that then do one thing to it.
    fn settled(seed: u64, nodes: u64) -> Sim {
        let mut sim = Sim::new(seed, nodes);
        sim.loss = 0.0;
        sim.chaos = false;
        for _ in 0..200 {
            sim.step();
        }
        sim
    }
}

fn run_seed(seed: u64, nodes: u64, steps: usize) -> Sim {
    let mut sim = Sim::new(seed, nodes);
    for _ in 0..steps {
        sim.step();
    }
    sim.check(true);
    sim
}

#[test]
fn random_schedules_keep_one_active_per_epoch_and_every_acknowledged_write() {
    let mut epochs = 0;
    let mut acked = 0;
    let mut reads = 0;
    // SIM_SEEDS=N runs more schedules (a soak); CI runs 40.
    let seeds: u64 = std::env::var("SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(40);
    for seed in 0..seeds {
        if std::env::var("SIM_TRACE").is_ok() {
            eprintln!("seed {seed}");
        }
        let mut sim = run_seed(seed, 3, 3_000);
        assert!(sim.recovers(), "seed {seed}: no progress after healing");
        epochs += sim.chosen.len();
        acked += sim.acked.len();
        reads += sim.reads_served;
    }
    // The schedules must have exercised failover, not just a quiet stripe.
    assert!(
        epochs as u64 > seeds * 2,
        "only {epochs} epochs over {seeds} seeds"
    );
    assert!(
        acked as u64 > seeds * 250,
        "only {acked} writes acknowledged"
    );
    assert!(reads > seeds * 25, "only {reads} reads served");
}

#[test]
fn two_member_stripes_too() {
    // A stripe whose only standby is the one an addition is about.
    let seeds: u64 = std::env::var("SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(30);
    for seed in 200..200 + seeds {
        let mut sim = run_seed(seed, 2, 3_000);
        assert!(sim.recovers(), "seed {seed}: no progress after healing");
    }
}

#[test]
fn five_member_stripes_too() {
    for seed in 100..110 {
        let mut sim = run_seed(seed, 5, 3_000);
        assert!(sim.recovers(), "seed {seed}: no progress after healing");
    }
}

#[test]
fn a_planned_handover_moves_the_active_without_an_election() {
    let mut sim = Sim::settled(11, 3);
    let before = sim.view();
    let old = before.active.unwrap();
    let (to, fx) = sim.nodes[(old - 1) as usize]
        .replica
        .hand_over(None)
        .unwrap_or_else(|e| panic!("{e:?} view {:?}", sim.view()));
    sim.run(old, fx);
    let acked = sim.acked.len();
    for _ in 0..100 {
        sim.step();
    }
    let after = sim.view();
    assert_eq!(after.active, Some(to));
    assert_eq!(after.epoch, before.epoch + 1);
    assert!(sim.next_election == 1, "no election was needed");
    assert!(sim.acked.len() > acked, "writes go on at the new active");
    for _ in 0..300 {
        sim.step();
    }
    assert!(
        sim.view().in_sync.contains(&old),
        "the old active is a standby again"
    );
}

#[test]
fn a_planned_handover_to_a_standby_that_dies_is_given_up_and_writes_go_on() {
    let mut sim = Sim::settled(12, 3);
    let before = sim.view();
    let old = before.active.unwrap();
    let to = *before.in_sync.iter().next().unwrap();
    // The standby dies, and writes it lacks go on, before the handover to it
    // starts (not yet out of the in-sync set).
    sim.isolated.insert(to);
    for _ in 0..5 {
        sim.step();
    }
    let (_, fx) = sim.nodes[(old - 1) as usize]
        .replica
        .hand_over(Some(to))
        .unwrap_or_else(|e| panic!("{e:?} view {:?}", sim.view()));
    sim.run(old, fx);
    let acked = sim.acked.len();
    // 3 s: once the control plane took it out of the in-sync set, well before
    // the handover's own deadline.
    for _ in 0..300 {
        sim.step();
    }
    let after = sim.view();
    assert!(!after.in_sync.contains(&to));
    assert_eq!(after.active, Some(old), "still the active: {after:?}");
    assert!(sim.nodes[(old - 1) as usize]
        .replica
        .handing_over()
        .is_none());
    assert!(sim.acked.len() > acked, "writes are taken again");
}

#[test]
fn a_stripe_whose_active_is_removed_from_the_cluster_elects_a_standby() {
    let mut sim = Sim::settled(13, 3);
    let before = sim.view();
    let old = before.active.unwrap();
    // The operator forgets the active (it stopped for good).
    sim.crash(old);
    sim.apply_cp(ControlCommand::Remove { node: old });
    sim.broadcast_view();
    assert_eq!(sim.view().active, None);
    let acked = sim.acked.len();
    for _ in 0..300 {
        sim.step();
    }
    let after = sim.view();
    assert!(after.active.is_some_and(|a| a != old), "{after:?}");
    assert!(sim.acked.len() > acked, "writes go on");
}

/// Temporary persistence: the active restarts with its stripe data gone while
/// its in-sync standbys hold every write. It must not take over its old epoch
/// with an empty log (the standbys would refuse it for good, or serve two
/// meanings of one position): a standby is elected and it syncs.
#[test]
fn an_active_that_restarts_with_no_log_hands_the_stripe_to_a_standby_and_syncs() {
    let mut sim = Sim::settled(14, 3);
    let before = sim.view();
    let old = before.active.unwrap();
    sim.restart_empty(old);
    let acked = sim.acked.len();
    for _ in 0..300 {
        sim.step();
    }
    let after = sim.view();
    assert!(after.epoch > before.epoch, "{after:?}");
    assert!(after.active.is_some_and(|a| a != old), "{after:?}");
    assert!(sim.acked.len() > acked, "writes go on");
    for _ in 0..1_000 {
        sim.step();
        if sim.view().in_sync.contains(&old) {
            break;
        }
    }
    assert!(sim.view().in_sync.contains(&old), "the old active synced");
    sim.wiped.clear();
    sim.check(true);
}

/// Temporary persistence: a standby restarts with its stripe data gone while it
/// still counts as in sync, then the active dies and the other standby is down.
/// Elected, the emptied standby would make the other one drop every write only
/// it holds; so the stripe waits for that one, elects it, and the emptied
/// standby syncs. (Were every in-sync member emptied, one of them would stand:
/// nothing would be left to keep.)
#[test]
fn a_standby_that_restarted_empty_is_not_elected_over_one_that_holds_the_data() {
    let mut sim = Sim::settled_with_two_in_sync(21);
    let before = sim.view();
    let active = before.active.unwrap();
    let standbys: Vec<NodeId> = before.in_sync.iter().copied().collect();
    let (emptied, holder) = (standbys[0], standbys[1]);
    sim.restart_empty(emptied);
    sim.crash(holder);
    sim.crash(active);
    for _ in 0..500 {
        sim.step();
    }
    assert_ne!(sim.view().active, Some(emptied), "{:?}", sim.view());
    sim.restart(holder);
    sim.step_until(1_000, |sim| sim.view().epoch > before.epoch);
    assert_eq!(sim.view().active, Some(holder), "{:?}", sim.view());
    sim.restart(active);
    let synced = sim.step_until(2_000, |sim| sim.view().in_sync.contains(&emptied));
    assert!(synced, "{:?}", sim.view());
    sim.wiped.clear();
    sim.check(true);
}

/// Temporary persistence: both standbys restart with their stripe data gone
/// while the active, which alone holds the writes, is cut off from everyone.
/// Elected, an emptied standby would make the active drop them when it comes
/// back: the stripe waits for it instead.
#[test]
fn emptied_standbys_are_not_elected_while_a_silent_active_may_hold_the_writes() {
    let mut sim = Sim::settled_with_two_in_sync(5);
    let before = sim.view();
    let active = before.active.unwrap();
    sim.isolated.insert(active);
    for &n in &before.in_sync {
        sim.restart_empty(n);
    }
    for _ in 0..500 {
        sim.step();
        let v = sim.view();
        assert!(
            v.active == Some(active),
            "an emptied standby was elected: {v:?}"
        );
    }
    sim.isolated.clear();
    let caught_up = |sim: &Sim| {
        before
            .in_sync
            .iter()
            .all(|n| !sim.nodes[(*n - 1) as usize].replica.started_empty())
    };
    assert!(
        sim.step_until(2_000, caught_up),
        "the emptied standbys caught up"
    );
    sim.wiped.clear();
    sim.check(true);
}

/// Temporary persistence: the whole stripe restarts with its data gone.
/// Nothing is left to keep, so one of the emptied members is elected.
#[test]
fn a_stripe_whose_every_member_lost_its_data_elects_one_of_them() {
    let mut sim = Sim::settled(8, 3);
    let before = sim.view();
    for n in 1..=3 {
        sim.restart_empty(n);
    }
    let acked = sim.acked.len();
    sim.step_until(2_000, |sim| {
        sim.view().epoch > before.epoch && sim.acked.len() > acked
    });
    assert!(sim.view().epoch > before.epoch, "{:?}", sim.view());
    assert!(sim.acked.len() > acked, "writes go on");
}

#[test]
fn a_paused_active_is_replaced_and_rejoins_as_standby() {
    let mut sim = Sim::settled(7, 3);
    let before = sim.view();
    assert_eq!(
        before.in_sync.len(),
        2,
        "both standbys joined the in-sync set"
    );
    let old = before.active.unwrap();
    // A pause: the active hears nothing and says nothing for 2 s.
    sim.isolated.insert(old);
    for _ in 0..200 {
        sim.step();
    }
    let during = sim.view();
    assert!(during.epoch > before.epoch);
    assert_ne!(during.active, Some(old));
    sim.isolated.clear();
    for _ in 0..300 {
        sim.step();
    }
    let after = sim.view();
    assert!(
        after.in_sync.contains(&old),
        "the old active is an in-sync standby again: {after:?}"
    );
    assert_eq!(sim.nodes[(old - 1) as usize].replica.role(), Role::Follower);
}
