//! The control-plane actor: runs the node's openraft instance, answers peers'
//! control-plane requests, gets the node placed in a stripe, and — on the Raft
//! leader — keeps the voter set healthy: every live member follows the log as a
//! learner, the voters are 1, 3 or 5 placed nodes spread across stripes, and a voter
//! dead for longer than `voter_replace_after` is swapped for a live node.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use futures::stream::{FuturesUnordered, StreamExt};
use kiln_net::wire::{MemberStatus, Request, Response};
use kiln_net::{Multiaddr, NetCommand, NetHandle, PeerId, ServiceRequest};
use kiln_persistence::NodeStore;
use openraft::error::{ChangeMembershipError, CheckIsLeaderError, ClientWriteError, RaftError};
use openraft::{ChangeMembers, Raft, ServerState};
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use rand::seq::SliceRandom;
use serde_bytes::ByteBuf;

use super::network::{addresses, AddressBook};
use super::pre_vote::{Backoff, Observed, Tally};
use super::state::{plan_voters, ControlCommand, ControlOutcome, ControlState, Placement};
use super::storage::{SharedApplied, MAX_SNAPSHOT_BYTES};
use super::types::{node_id_of, ControlNode, ControlTypes, NodeId};
use super::wire::{from_cbor, to_cbor, ControlRequest, ControlResponse, MAX_CONTROL_BODY};
use crate::membership::{GetNodeInfo, ListMembers, MemberView, MembershipActor};
use crate::stripe::replica::{choose_candidate, electable, LogPos, NamedActive};
use crate::stripe::wire::{StripeRequest, StripeResponse};
use crate::stripe::{stripe_request, stripe_response, Responder, ServeStripe, StripeActor};

/// How often the actor looks at membership and, on the leader, at the voters.
const TICK: Duration = Duration::from_millis(300);
/// How long a proposal may take before the proposer gives up and retries.
const PROPOSE_TIMEOUT: Duration = Duration::from_secs(3);
/// How long an election waits for the active's or a standby's answer.
const ELECTION_PROBE: Duration = Duration::from_millis(250);
/// openraft's election timeouts; the maximum is also its leader lease.
const RAFT_ELECTION_TIMEOUT_MIN_MS: u64 = 300;
const RAFT_ELECTION_TIMEOUT_MAX_MS: u64 = 400;
/// How often a voter looks whether it hears a control-plane leader, and asks
/// the others whether they would elect it when it does not (see `pre_vote`).
/// A round ends as soon as a majority granted, so with one voter silent (the
/// leader, usually) a round takes a round trip, and voters whose leases end
/// a little later are asked again well before openraft's election (lease +
/// 300–400 ms).
const PRE_VOTE_TICK: Duration = Duration::from_millis(50);
/// How long a pre-vote round waits for answers: as long as openraft waits
/// for a vote (`election_timeout_min`), so a loaded node that would win the
/// real vote wins the round too.
const PRE_VOTE_TIMEOUT: Duration = Duration::from_millis(RAFT_ELECTION_TIMEOUT_MIN_MS);
/// The longest pause between lost pre-vote rounds.
const PRE_VOTE_BACKOFF_MAX: Duration = Duration::from_secs(1);
/// How a node refuses a control-plane request it cannot decode; a node older
/// than pre-votes refuses one so (see `ask_pre_vote`).
const MALFORMED_REQUEST: &str = "malformed control-plane request";
/// Pause between two join attempts of a node that is not placed yet.
const JOIN_RETRY: Duration = Duration::from_secs(1);
/// The longest wait between joins once the control plane has answered that
/// this node is placed but the decision has not reached it (its leader cannot
/// reach this node): each join would be one more entry in the log.
const JOIN_RETRY_PLACED_MAX: Duration = Duration::from_secs(30);

/// What the control plane of this node is asked to do at start.
#[derive(Debug, Clone)]
pub struct ControlPlaneConfig {
    /// Stripes of a cluster this node creates (`None`: 1); when it joins a
    /// cluster instead, a count given that differs from the cluster's is
    /// reported, not applied.
    pub stripes: Option<u32>,
    /// Stripe this node asks to join (`--stripe K`).
    pub stripe: Option<u32>,
    /// A voter without stripe data.
    pub witness: bool,
    /// How long a voter may be dead or gone before a live node replaces it.
    pub voter_replace_after: Duration,
}

/// openraft's timing for kiln: a LAN cluster, where the leader is heard from every
/// 100 ms. A follower of openraft 0.9 starts an election only after the leader
/// lease (`election_timeout_max`) and its election timeout have both passed since
/// it last heard from the leader: 700–800 ms here. That bounds the failover of a
/// stripe whose active was also the Raft leader (elections avoid that placement).
#[allow(clippy::result_large_err)] // openraft's own error type
pub fn raft_config() -> Result<openraft::Config, openraft::ConfigError> {
    openraft::Config {
        cluster_name: "kiln".into(),
        heartbeat_interval: 100,
        election_timeout_min: RAFT_ELECTION_TIMEOUT_MIN_MS,
        election_timeout_max: RAFT_ELECTION_TIMEOUT_MAX_MS,
        // Switched on by the control-plane actor while a pre-vote round is won.
        enable_elect: false,
        install_snapshot_timeout: 2_000,
        max_payload_entries: 256,
        snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(1_000),
        max_in_snapshot_log_to_keep: 1_000,
        snapshot_max_chunk_size: 1024 * 1024,
        ..Default::default()
    }
    .validate()
}

/// Control-plane metrics, `kiln_control_*`.
#[derive(Clone, Default)]
pub struct ControlMetrics {
    is_leader: Gauge,
    voters: Gauge,
    learners: Gauge,
    term: Gauge,
    last_applied: Gauge,
    placed_nodes: Gauge,
}

impl ControlMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = ControlMetrics::default();
        let r = registry.sub_registry_with_prefix("kiln_control");
        r.register(
            "is_leader",
            "1 if this node leads the control plane",
            m.is_leader.clone(),
        );
        r.register("voters", "Voters of the control plane", m.voters.clone());
        r.register(
            "learners",
            "Non-voting followers of the control plane",
            m.learners.clone(),
        );
        r.register("term", "Current Raft term", m.term.clone());
        r.register(
            "last_applied",
            "Index of the last control-plane entry applied here",
            m.last_applied.clone(),
        );
        r.register(
            "placed_nodes",
            "Nodes placed in a stripe or as witness",
            m.placed_nodes.clone(),
        );
        m
    }
}

/// One stripe as `GET /v1/cluster/stripes` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct StripeView {
    pub id: u32,
    pub active: Option<String>,
    pub epoch: u64,
    pub slots: usize,
    pub members: Vec<StripeMemberView>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct StripeMemberView {
    pub id: String,
    /// `active`, `standby` (in sync, electable) or `syncing`.
    pub role: &'static str,
    /// Entries behind the active; `None` until the stripe's replication reports it.
    pub lag: Option<u64>,
}

/// The control plane as this node sees it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ClusterStripes {
    pub stripes: Vec<StripeView>,
    pub voters: Vec<String>,
    /// A change of the voter set is under way (a joint configuration, or one not
    /// yet applied here): `voters` is then the old and new sets together.
    pub voters_changing: bool,
    pub witnesses: Vec<String>,
    /// Peer id of the control-plane leader, if known.
    pub leader: Option<String>,
    /// This node's place: `stripe K`, `witness`, or `unplaced`.
    pub placement: String,
    /// Conditions an operator should act on.
    pub warnings: Vec<String>,
}

#[derive(Message)]
#[rtype(result = "ClusterStripes")]
pub struct GetStripes;

/// Proposes a command from this node (through the leader).
#[derive(Message)]
#[rtype(result = "Result<ControlOutcome, String>")]
pub struct Propose(pub ControlCommand);

pub struct ControlPlane {
    me: NodeId,
    me_peer: PeerId,
    raft: Raft<ControlTypes>,
    applied: SharedApplied,
    net: NetHandle,
    book: AddressBook,
    membership: Addr<MembershipActor>,
    store: Arc<NodeStore>,
    cfg: ControlPlaneConfig,
    metrics: ControlMetrics,
    /// Stripes with an election under way on this node (the leader coordinates).
    elections: BTreeSet<u32>,
    /// This node's stripe actor: an election coordinated here asks it directly
    /// (a node does not dial itself).
    local_stripe: Option<Addr<StripeActor>>,
    members: Vec<MemberView>,
    my_addrs: Vec<String>,
    founder: bool,
    initializing: bool,
    last_join: Option<Instant>,
    joining: bool,
    /// Joins answered "placed" whose decision this node has not applied yet.
    placed_answers: u32,
    /// The control plane answered a join of this node since it started. Until
    /// then a node its own (possibly stale) state shows placed asks again: an
    /// operator may have removed it while it was down, and nobody else would
    /// tell it (a removed node is not sent the log).
    place_confirmed: bool,
    /// Whether a `--stripes` given to this node was compared with the count of
    /// the cluster it is placed in (once, when its place is first applied here).
    stripe_count_checked: bool,
    /// Why the control plane refused to place this node (removed by an
    /// operator, a stripe that does not exist): the node stops with it.
    refused: tokio::sync::watch::Sender<Option<String>>,
    /// A membership change of the Raft group is running (one at a time).
    changing: bool,
    /// When each voter or learner was first seen dead, left or unknown.
    gone_since: HashMap<NodeId, Instant>,
    warned_no_failover: bool,
    last_leader: Option<NodeId>,
    /// A pre-vote round is under way.
    pre_voting: bool,
    /// When the next pre-vote round may start, after lost ones.
    pre_vote_backoff: Backoff,
    /// openraft's elections are switched on: the last pre-vote round was won.
    elections_allowed: bool,
    /// Elections were allowed since a leader was last heard (logged once).
    leaderless_logged: bool,
}

/// What an operator can do about fewer than 3 live voters.
fn voter_advice(voters: usize, replace_after: Duration) -> String {
    if voters >= 3 {
        format!(
            "a dead voter is replaced by a live node {} s after it died (voter_replace_after_s), \
             if a live node that is not a voter is there to take its place; else start one \
             (or a `kiln run --witness`)",
            replace_after.as_secs()
        )
    } else {
        "add a third node or a `kiln run --witness`".to_string()
    }
}

impl ControlPlane {
    /// Resolves with the reason once the control plane refused to place this
    /// node for good.
    pub fn refusal(&self) -> impl std::future::Future<Output = String> + 'static {
        let mut rx = self.refused.subscribe();
        async move {
            loop {
                if let Some(reason) = rx.borrow_and_update().clone() {
                    return reason;
                }
                if rx.changed().await.is_err() {
                    // The actor is gone: the node stops for that reason.
                    return std::future::pending().await;
                }
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub fn new(
        me_peer: PeerId,
        raft: Raft<ControlTypes>,
        applied: SharedApplied,
        net: NetHandle,
        book: AddressBook,
        membership: Addr<MembershipActor>,
        store: Arc<NodeStore>,
        cfg: ControlPlaneConfig,
        metrics: ControlMetrics,
    ) -> Self {
        ControlPlane {
            me: node_id_of(&me_peer.to_string()),
            me_peer,
            raft,
            applied,
            net,
            book,
            membership,
            store,
            cfg,
            metrics,
            elections: BTreeSet::new(),
            local_stripe: None,
            members: Vec::new(),
            my_addrs: Vec::new(),
            founder: false,
            initializing: false,
            last_join: None,
            joining: false,
            placed_answers: 0,
            place_confirmed: false,
            stripe_count_checked: false,
            refused: tokio::sync::watch::Sender::new(None),
            changing: false,
            gone_since: HashMap::new(),
            warned_no_failover: false,
            last_leader: None,
            pre_voting: false,
            pre_vote_backoff: Backoff::new(PRE_VOTE_TICK, PRE_VOTE_BACKOFF_MAX),
            elections_allowed: false,
            leaderless_logged: false,
        }
    }

    /// Runs a pre-vote round when this voter hears no leader, and allows
    /// openraft's elections only while the last round was won.
    fn pre_vote_tick(&mut self, ctx: &mut Context<Self>) {
        if self.pre_voting || !self.pre_vote_backoff.due(Instant::now()) {
            return;
        }
        self.pre_voting = true;
        let (raft, net, book, me) = (
            self.raft.clone(),
            self.net.clone(),
            self.book.clone(),
            self.me,
        );
        let round = async move {
            let Some((seen, voters)) = observe(&raft, true).await else {
                return Round::Stopped;
            };
            if !seen.hears_no_leader() {
                return Round::LeaderHeard;
            }
            if !voters.configs.iter().any(|c| c.contains(&me)) {
                return Round::NotVoter;
            }
            let mut tally = Tally::new(me, voters.configs);
            let body = ByteBuf::from(to_cbor(&ControlRequest::PreVote {
                last_log: seen.last_log,
            }));
            let mut asks: FuturesUnordered<_> = tally
                .others()
                .into_iter()
                .filter_map(|id| {
                    let node = voters.nodes.get(&id)?;
                    let peer: PeerId = node.peer.parse().ok()?;
                    let mut addrs: Vec<Multiaddr> =
                        node.addrs.iter().filter_map(|a| a.parse().ok()).collect();
                    addrs.extend(addresses(&book, &peer));
                    let (net, body) = (net.clone(), body.clone());
                    Some(async move { (id, ask_pre_vote(net, peer, addrs, body).await) })
                })
                .collect();
            // Done as soon as a majority granted: a silent voter (the leader
            // that is gone, usually) does not hold the round up.
            while !tally.won() {
                match asks.next().await {
                    Some((id, true)) => tally.grant(id),
                    Some((_, false)) => {}
                    None => break,
                }
            }
            if tally.won() {
                Round::Won
            } else {
                Round::Lost
            }
        };
        ctx.spawn(round.into_actor(self).map(|round, act, _| {
            act.pre_voting = false;
            act.after_pre_vote(round);
        }));
    }

    fn after_pre_vote(&mut self, round: Round) {
        let now = Instant::now();
        let allowed = match round {
            Round::Stopped => return,
            Round::LeaderHeard | Round::NotVoter => {
                self.pre_vote_backoff.reset();
                self.leaderless_logged = false;
                false
            }
            Round::Won => {
                self.pre_vote_backoff.reset();
                true
            }
            Round::Lost => {
                // A voter cut off from the others asks ever less often.
                self.pre_vote_backoff.lost(now);
                false
            }
        };
        if allowed == self.elections_allowed {
            return;
        }
        self.elections_allowed = allowed;
        self.raft.runtime_config().elect(allowed);
        if allowed && !self.leaderless_logged {
            self.leaderless_logged = true;
            tracing::info!("no control-plane leader heard, and a majority of voters would elect this node: elections allowed");
        } else {
            tracing::debug!(allowed, "control-plane elections switched");
        }
    }

    fn state(&self) -> ControlState {
        match self.applied.read() {
            Ok(a) => a.state.clone(),
            Err(p) => p.into_inner().state.clone(),
        }
    }

    fn me_node(&self) -> ControlNode {
        ControlNode {
            peer: self.me_peer.to_string(),
            addrs: self.my_addrs.clone(),
        }
    }

    fn tick(&mut self, ctx: &mut Context<Self>) {
        let membership = self.membership.clone();
        let fut = async move {
            let info = membership.send(GetNodeInfo).await.ok();
            let members = membership.send(ListMembers).await.ok();
            (info, members)
        };
        ctx.spawn(fut.into_actor(self).map(|(info, members), act, ctx| {
            if let Some(info) = info {
                act.my_addrs = info.addrs;
                act.founder = info.founder;
            }
            if let Some(members) = members {
                act.remember_addresses(&members);
                act.members = members;
            }
            act.after_tick(ctx);
        }));
    }

    fn remember_addresses(&self, members: &[MemberView]) {
        if let Ok(mut book) = self.book.write() {
            for m in members {
                if let Ok(peer) = m.record.id.parse::<PeerId>() {
                    let addrs: Vec<Multiaddr> = m
                        .record
                        .addrs
                        .iter()
                        .filter_map(|a| a.parse().ok())
                        .collect();
                    book.insert(peer, addrs);
                }
            }
        }
    }

    fn after_tick(&mut self, ctx: &mut Context<Self>) {
        let metrics = self.raft.metrics().borrow().clone();
        let membership = metrics.membership_config.membership().clone();
        let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        let learners: BTreeSet<NodeId> = membership.learner_ids().collect();
        let state = self.state();
        self.metrics
            .is_leader
            .set(i64::from(metrics.state == ServerState::Leader));
        self.metrics.voters.set(voters.len() as i64);
        self.metrics.learners.set(learners.len() as i64);
        self.metrics.term.set(metrics.current_term as i64);
        self.metrics
            .last_applied
            .set(metrics.last_applied.map(|l| l.index as i64).unwrap_or(0));
        self.metrics.placed_nodes.set(state.nodes.len() as i64);
        if metrics.current_leader != self.last_leader {
            let leader = metrics.current_leader.and_then(|l| {
                membership
                    .get_node(&l)
                    .map(|n| n.peer.clone())
                    .or_else(|| state.peer_of(l).map(str::to_string))
            });
            tracing::info!(term = metrics.current_term, leader = ?leader,
                voters = voters.len(), "control-plane leader changed");
            self.last_leader = metrics.current_leader;
        }

        let uninitialized = voters.is_empty();
        if uninitialized && self.founder && !self.initializing {
            self.initialize(ctx);
        }
        if !state.nodes.contains_key(&self.me) || !self.place_confirmed {
            self.join(ctx, &state);
        } else {
            self.placed_answers = 0;
            if !self.stripe_count_checked {
                self.stripe_count_checked = true;
                self.warn_of_ignored_stripe_count(&state);
            }
        }
        if metrics.state == ServerState::Leader && !self.changing {
            let joint = membership.get_joint_config();
            if joint.len() > 1 {
                // A leader died between the two steps of a voter change: finish it.
                let last = joint.last().cloned().unwrap_or_default();
                self.finish_joint(ctx, last);
            } else {
                self.reconcile(ctx, &state, &voters, &learners);
            }
        }
        let data_nodes = state
            .nodes
            .values()
            .filter(|n| matches!(n.placement, Placement::Stripe(_)))
            .count();
        let live_voters = self.live_voters(&voters);
        if live_voters < 3 && data_nodes >= 2 {
            if !self.warned_no_failover {
                tracing::warn!(voters = voters.len(), live_voters, data_nodes,
                    advice = voter_advice(voters.len(), self.cfg.voter_replace_after),
                    "the control plane has fewer than 3 live voters: a stripe cannot fail over safely");
                self.warned_no_failover = true;
            }
        } else {
            self.warned_no_failover = false;
        }
    }

    /// Voters this node or membership sees alive (or only suspected).
    fn live_voters(&self, voters: &BTreeSet<NodeId>) -> usize {
        voters
            .iter()
            .filter(|v| {
                **v == self.me
                    || self.members.iter().any(|m| {
                        node_id_of(&m.record.id) == **v
                            && matches!(
                                m.record.status,
                                MemberStatus::Alive | MemberStatus::Suspect
                            )
                    })
            })
            .count()
    }

    fn finish_joint(&mut self, ctx: &mut Context<Self>, voters: BTreeSet<NodeId>) {
        self.changing = true;
        let raft = self.raft.clone();
        tracing::info!(
            voters = voters.len(),
            "completing an unfinished control-plane voter change"
        );
        ctx.spawn(
            async move { raft.change_membership(voters, true).await }
                .into_actor(self)
                .map(|res, act, _| {
                    act.changing = false;
                    if let Err(e) = res {
                        tracing::warn!(error = %e, "cannot complete the voter change; will retry");
                    }
                }),
        );
    }

    /// The founder makes itself the first voter of a new control plane.
    fn initialize(&mut self, ctx: &mut Context<Self>) {
        self.initializing = true;
        let raft = self.raft.clone();
        let nodes = BTreeMap::from([(self.me, self.me_node())]);
        ctx.spawn(
            async move { raft.initialize(nodes).await }
                .into_actor(self)
                .map(|res, act, _| {
                    act.initializing = false;
                    match res {
                        Ok(()) => {
                            tracing::info!("bootstrapped the control plane as its first voter")
                        }
                        Err(e) => tracing::debug!(error = %e, "control plane not initialized"),
                    }
                }),
        );
    }

    /// Asks the control plane for this node's place (the founder first sets the
    /// stripe count).
    fn join(&mut self, ctx: &mut Context<Self>, state: &ControlState) {
        let retry = JOIN_RETRY
            .saturating_mul(1 << self.placed_answers.min(5))
            .min(JOIN_RETRY_PLACED_MAX);
        if self.joining || self.last_join.is_some_and(|t| t.elapsed() < retry) {
            return;
        }
        let proposer = self.proposer();
        if proposer.fallback.is_empty() && self.raft.metrics().borrow().current_leader.is_none() {
            // Nobody to ask yet (the first tick comes before the seed answers):
            // the next tick tries, rather than a whole JOIN_RETRY later.
            return;
        }
        self.joining = true;
        self.last_join = Some(Instant::now());
        let mut commands = Vec::new();
        if self.founder && state.stripe_count == 0 {
            commands.push(ControlCommand::Configure {
                stripes: self.cfg.stripes.unwrap_or(1),
            });
        }
        commands.push(ControlCommand::Join {
            node: self.me,
            peer: self.me_peer.to_string(),
            witness: self.cfg.witness,
            stripe: self.cfg.stripe,
        });
        ctx.spawn(
            async move {
                let mut last = Err("nothing proposed".to_string());
                for cmd in commands {
                    last = proposer.propose(cmd, Hop::Local).await;
                    if last.is_err() {
                        break;
                    }
                }
                last
            }
            .into_actor(self)
            .map(|res, act, _| {
                act.joining = false;
                match res {
                    Ok(ControlOutcome::Placed { placement }) => {
                        if !act.place_confirmed {
                            tracing::info!(?placement, "placed by the control plane");
                        }
                        act.placed_answers += 1;
                        act.place_confirmed = true;
                    }
                    Ok(ControlOutcome::Unconfigured) => {
                        tracing::debug!("the cluster is not configured yet; will retry")
                    }
                    Ok(ControlOutcome::Rejected { reason }) => {
                        tracing::error!(%reason, "the control plane refused to place this node; stopping");
                        act.refused.send_replace(Some(reason));
                    }
                    Ok(other) => tracing::debug!(?other, "join answered"),
                    Err(e) => tracing::debug!(error = %e, "join not accepted yet; will retry"),
                }
            }),
        );
    }

    /// `--stripes` only shapes a cluster this node creates: an operator who gave
    /// another count to a joining node learns that it had no effect.
    fn warn_of_ignored_stripe_count(&self, state: &ControlState) {
        let cluster = state.stripe_count;
        if let Some(given) = self.cfg.stripes.filter(|&n| n != cluster) {
            tracing::warn!(
                given,
                cluster,
                "--stripes {given} ignored: this node joined a cluster created with {cluster} stripes (the count is fixed when a cluster is created)"
            );
        }
    }

    fn proposer(&self) -> Proposer {
        let mut alive: Vec<PeerId> = self
            .members
            .iter()
            .filter(|m| !m.is_self && m.record.status == MemberStatus::Alive)
            .filter_map(|m| m.record.id.parse().ok())
            .collect();
        // Spread the relaying of a joining node's proposals over the members.
        alive.shuffle(&mut rand::thread_rng());
        Proposer {
            applied: self.applied.clone(),
            raft: self.raft.clone(),
            net: self.net.clone(),
            book: self.book.clone(),
            fallback: alive,
        }
    }

    /// On the leader: learners for every placed live node, and a healthy voter set.
    fn reconcile(
        &mut self,
        ctx: &mut Context<Self>,
        state: &ControlState,
        voters: &BTreeSet<NodeId>,
        learners: &BTreeSet<NodeId>,
    ) {
        let now = Instant::now();
        let mut alive: BTreeMap<NodeId, ControlNode> = BTreeMap::new();
        let mut status: HashMap<NodeId, MemberStatus> = HashMap::new();
        for m in &self.members {
            let id = node_id_of(&m.record.id);
            status.insert(id, m.record.status);
            // Every live member follows the log, placed or not: a node learns who
            // leads the control plane (to ask for its place) by following it —
            // but not one an operator removed (refused a place, it would be
            // added as a learner and dropped as gone on every other tick).
            if m.record.status == MemberStatus::Alive && !state.removed.contains(&id) {
                alive.insert(
                    id,
                    ControlNode {
                        peer: m.record.id.clone(),
                        addrs: m.record.addrs.clone(),
                    },
                );
            }
        }
        // Followers that are not alive: how long they have been gone.
        let followers: BTreeSet<NodeId> = voters.union(learners).copied().collect();
        self.gone_since.retain(|id, _| followers.contains(id));
        let mut gone = BTreeSet::new();
        for id in &followers {
            let st = status.get(id).copied();
            if *id == self.me
                || st == Some(MemberStatus::Alive)
                || st == Some(MemberStatus::Suspect)
            {
                self.gone_since.remove(id);
                continue;
            }
            let since = *self.gone_since.entry(*id).or_insert(now);
            // A member that left said so itself: no need to wait.
            if st == Some(MemberStatus::Left) || now - since >= self.cfg.voter_replace_after {
                gone.insert(*id);
            }
        }
        // A node an operator removed is gone whatever membership says: it may
        // come back with its old data directory, and it is refused a place.
        for id in &followers {
            if *id != self.me && state.removed.contains(id) {
                gone.insert(*id);
            }
        }

        let new_learners: Vec<(NodeId, ControlNode)> = alive
            .iter()
            .filter(|(id, _)| !followers.contains(id))
            .map(|(id, n)| (*id, n.clone()))
            .collect();
        let live: BTreeSet<NodeId> = alive
            .keys()
            .filter(|id| followers.contains(id) && state.nodes.contains_key(id))
            .copied()
            .collect();
        let raft = self.raft.clone();
        if !new_learners.is_empty() {
            self.changing = true;
            // All new learners in one membership change: each change restarts
            // replication to every follower, so adding 40 joining nodes one by one
            // kept the leader (usually the seed they all join through) busy for
            // seconds.
            let peers: Vec<String> = new_learners.iter().map(|(_, n)| n.peer.clone()).collect();
            let nodes: BTreeMap<NodeId, ControlNode> = new_learners.into_iter().collect();
            ctx.spawn(
                async move { raft.change_membership(ChangeMembers::AddNodes(nodes), false).await }
                    .into_actor(self)
                    .map(move |res, act, _| {
                        act.changing = false;
                        match res {
                            Ok(_) => tracing::info!(?peers, "added control-plane learners"),
                            Err(e) => {
                                tracing::warn!(?peers, error = %e, "cannot add control-plane learners; will retry")
                            }
                        }
                    }),
            );
            return;
        }
        if let Some(next) = plan_voters(state, voters, &live, &gone, self.me) {
            let peers = |ids: &BTreeSet<NodeId>| -> Vec<String> {
                ids.iter()
                    .map(|id| state.peer_of(*id).unwrap_or("?").to_string())
                    .collect()
            };
            tracing::info!(from = ?peers(voters), to = ?peers(&next), "changing the control-plane voters");
            self.changing = true;
            // Voters dropped stay learners (a live one follows the log still;
            // a gone one is dropped as a learner below).
            ctx.spawn(
                async move { raft.change_membership(next, true).await }
                    .into_actor(self)
                    .map(|res, act, _| {
                        act.changing = false;
                        if let Err(e) = res {
                            tracing::warn!(error = %e, "control-plane voter change failed; will retry");
                        }
                    }),
            );
            return;
        }
        // Learners gone for good are dropped: replicating to them is wasted work.
        let gone_learners: BTreeSet<NodeId> = learners.intersection(&gone).copied().collect();
        if !gone_learners.is_empty() {
            self.changing = true;
            ctx.spawn(
                async move {
                    raft.change_membership(ChangeMembers::RemoveNodes(gone_learners), false)
                        .await
                }
                .into_actor(self)
                .map(|res, act, _| {
                    act.changing = false;
                    if let Err(e) = res {
                        tracing::debug!(error = %e, "cannot drop gone learners");
                    }
                }),
            );
        }
    }

    fn on_service_request(&mut self, req: ServiceRequest, ctx: &mut Context<Self>) {
        let ServiceRequest {
            peer,
            request,
            reply,
        } = req;
        let Request::ControlPlane { body } = request else {
            self.net.send(NetCommand::Respond {
                reply,
                response: Response::Refused {
                    reason: "this node does not serve that request".into(),
                },
            });
            return;
        };
        let request: ControlRequest = match from_cbor(&body, MAX_CONTROL_BODY) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(%peer, error = %e, "rejected a malformed control-plane request");
                self.net.send(NetCommand::Respond {
                    reply,
                    response: Response::Refused {
                        reason: format!("{MALFORMED_REQUEST}: {e}"),
                    },
                });
                return;
            }
        };
        if let ControlRequest::InstallSnapshot(r) = &request {
            // openraft writes a chunk at the offset it names: a peer's offset
            // far beyond any snapshot must not grow the buffer to it.
            let end = r.offset.saturating_add(r.data.len() as u64);
            if end > MAX_SNAPSHOT_BYTES as u64 {
                tracing::warn!(%peer, offset = r.offset, "refused a control-plane snapshot chunk beyond the snapshot bound");
                self.net.send(NetCommand::Respond {
                    reply,
                    response: Response::Refused {
                        reason: format!(
                            "snapshot chunk ends at byte {end}, beyond {MAX_SNAPSHOT_BYTES}"
                        ),
                    },
                });
                return;
            }
        }
        if let ControlRequest::Elect { stripe, epoch } = request {
            if self.raft.metrics().borrow().current_leader == Some(self.me) {
                self.coordinate(stripe, epoch, ctx);
            }
            self.net.send(NetCommand::Respond {
                reply,
                response: Response::ControlPlane {
                    body: ByteBuf::from(to_cbor(&ControlResponse::Elect)),
                },
            });
            return;
        }
        let raft = self.raft.clone();
        let net = self.net.clone();
        let proposer = self.proposer();
        actix_rt::spawn(async move {
            let response = match request {
                ControlRequest::AppendEntries(r) => {
                    ControlResponse::AppendEntries(raft.append_entries(r).await)
                }
                ControlRequest::Vote(r) => ControlResponse::Vote(raft.vote(r).await),
                ControlRequest::InstallSnapshot(r) => {
                    ControlResponse::InstallSnapshot(raft.install_snapshot(r).await)
                }
                ControlRequest::Propose { command, forwarded } => {
                    let hop = if forwarded { Hop::Final } else { Hop::Relay };
                    ControlResponse::Propose(proposer.propose(command, hop).await)
                }
                ControlRequest::Elect { .. } => ControlResponse::Elect,
                ControlRequest::PreVote { last_log } => ControlResponse::PreVote {
                    granted: observe(&raft, false)
                        .await
                        .is_some_and(|(seen, _)| seen.would_vote_for(last_log.as_ref())),
                },
                ControlRequest::ConfirmActive {
                    stripe,
                    epoch,
                    node,
                } => ControlResponse::Confirmed(
                    proposer
                        .confirm_active(stripe, epoch, node, Hop::Final)
                        .await,
                ),
            };
            net.send(NetCommand::Respond {
                reply,
                response: Response::ControlPlane {
                    body: ByteBuf::from(to_cbor(&response)),
                },
            });
        });
    }

    /// On the leader: elects a new active for `stripe` if its active of `epoch`
    /// really is silent. The in-sync standbys are asked for their log positions
    /// (which fences them against the old active), and the most up-to-date one is
    /// promoted, with those that answered as its in-sync set.
    fn coordinate(&mut self, stripe: u32, epoch: u64, ctx: &mut Context<Self>) {
        let state = self.state();
        let Some(entry) = state.stripes.get(&stripe) else {
            return;
        };
        if entry.epoch != epoch || entry.in_sync.is_empty() || !self.elections.insert(stripe) {
            return;
        }
        let peer_of = |n: NodeId| -> Option<PeerId> { state.peer_of(n)?.parse().ok() };
        let named = entry.active;
        let active = entry.active.and_then(|a| peer_of(a).map(|p| (a, p)));
        let in_sync_count = entry.in_sync.len();
        let standbys: Vec<(NodeId, PeerId)> = entry
            .in_sync
            .iter()
            .filter_map(|n| peer_of(*n).map(|p| (*n, p)))
            .collect();
        let asker = StripeAsker {
            me: self.me,
            me_peer: self.me_peer,
            local: self.local_stripe.clone(),
            net: self.net.clone(),
            book: self.book.clone(),
        };
        let proposer = self.proposer();
        let me = self.me;
        let fut = async move {
            let mut named = match named {
                Some(_) => NamedActive::Silent,
                None => NamedActive::Absent,
            };
            if let Some((a, peer)) = active {
                let ping = asker.ask(a, peer, StripeRequest::Ping { stripe });
                match tokio::time::timeout(ELECTION_PROBE, ping).await {
                    Ok(Ok(StripeResponse::Pong {
                        active_in: Some(e), ..
                    })) if e == epoch => {
                        return Err("the active answers the control-plane leader".to_string());
                    }
                    Ok(Ok(StripeResponse::Pong {
                        started_empty: true,
                        ..
                    })) => named = NamedActive::LostData,
                    Ok(Ok(StripeResponse::Pong { .. })) => named = NamedActive::HoldsData,
                    _ => {}
                }
            }
            let prepares = standbys.iter().map(|(n, p)| {
                let ask = asker.ask(*n, *p, StripeRequest::Prepare { stripe, epoch });
                let n = *n;
                async move {
                    match tokio::time::timeout(ELECTION_PROBE, ask).await {
                        Ok(Ok(StripeResponse::Prepared(Ok(pos)))) => Some((n, pos, false)),
                        Ok(Ok(StripeResponse::PreparedBehind(pos))) => Some((n, pos, true)),
                        _ => None,
                    }
                }
            });
            let answers: Vec<(NodeId, LogPos, bool)> = futures::future::join_all(prepares)
                .await
                .into_iter()
                .flatten()
                .collect();
            let positions = electable(&answers, in_sync_count, named);
            let Some(winner) = choose_candidate(&positions, Some(me)) else {
                return Err(if answers.is_empty() {
                    "no in-sync standby answered".to_string()
                } else {
                    format!("the {} in-sync standbys that answered started without their stripe data; waiting for the others or the active ({named:?}), which may hold it", answers.len())
                });
            };
            let in_sync = positions.iter().map(|(n, _)| *n).collect();
            proposer
                .propose(
                    ControlCommand::Promote {
                        stripe,
                        epoch,
                        node: winner,
                        in_sync,
                    },
                    Hop::Local,
                )
                .await
        };
        ctx.spawn(fut.into_actor(self).map(move |res, act, _| {
            act.elections.remove(&stripe);
            match res {
                Ok(ControlOutcome::Promoted { epoch: new }) => {
                    tracing::info!(stripe, epoch = new, "elected a new active")
                }
                Ok(other) => {
                    tracing::info!(stripe, epoch, outcome = ?other, "election not applied")
                }
                Err(e) => tracing::info!(stripe, epoch, reason = %e, "no election"),
            }
        }));
    }

    fn view(&self) -> ClusterStripes {
        let metrics = self.raft.metrics().borrow().clone();
        let membership = metrics.membership_config.membership().clone();
        let state = self.state();
        let peer = |id: NodeId| {
            state
                .peer_of(id)
                .map(str::to_string)
                .or_else(|| membership.get_node(&id).map(|n| n.peer.clone()))
                .unwrap_or_else(|| format!("node-{id:016x}"))
        };
        let stripes = state
            .stripes
            .iter()
            .map(|(k, s)| StripeView {
                id: *k,
                active: s.active.map(peer),
                epoch: s.epoch,
                slots: state.slots_of(*k),
                members: s
                    .members
                    .iter()
                    .map(|m| StripeMemberView {
                        id: peer(*m),
                        role: if s.active == Some(*m) {
                            "active"
                        } else if s.in_sync.contains(m) {
                            "standby"
                        } else {
                            "syncing"
                        },
                        lag: None,
                    })
                    .collect(),
            })
            .collect();
        let voters: Vec<String> = membership.voter_ids().map(peer).collect();
        let voters_changing = membership.get_joint_config().len() > 1
            || metrics.membership_config.log_id().map(|l| l.index)
                > metrics.last_applied.map(|l| l.index);
        let witnesses = state
            .nodes
            .iter()
            .filter(|(_, n)| n.placement == Placement::Witness)
            .map(|(_, n)| n.peer.clone())
            .collect();
        let placement = match state.nodes.get(&self.me).map(|n| n.placement) {
            Some(Placement::Stripe(k)) => format!("stripe {k}"),
            Some(Placement::Witness) => "witness".into(),
            None => "unplaced".into(),
        };
        let mut warnings = Vec::new();
        let data_nodes = state
            .nodes
            .values()
            .filter(|n| matches!(n.placement, Placement::Stripe(_)))
            .count();
        let voter_ids: BTreeSet<NodeId> =
            metrics.membership_config.membership().voter_ids().collect();
        let live_voters = self.live_voters(&voter_ids);
        if live_voters < 3 && data_nodes >= 2 {
            warnings.push(format!(
                "the control plane has {} voter(s), {live_voters} of them alive: a stripe cannot fail over safely; {}",
                voter_ids.len(),
                voter_advice(voter_ids.len(), self.cfg.voter_replace_after)
            ));
        }
        if metrics.current_leader.is_none() {
            warnings.push("no control-plane leader is known to this node".into());
        }
        ClusterStripes {
            stripes,
            voters,
            voters_changing,
            witnesses,
            leader: metrics.current_leader.map(peer),
            placement,
            warnings,
        }
    }
}

/// Sends a command to the control-plane leader: through the local Raft if this
/// node leads, else to the leader it knows, else (a node that does not follow the
/// log yet) to live members, which forward it once.
#[derive(Clone)]
struct Proposer {
    applied: SharedApplied,
    raft: Raft<ControlTypes>,
    net: NetHandle,
    book: AddressBook,
    fallback: Vec<PeerId>,
}

/// Where a proposal comes from, which bounds how far it may travel: at most
/// origin → any member → leader.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Hop {
    /// Proposed on this node.
    Local,
    /// Relayed by a member for a node that knows no leader: may go to the leader.
    Relay,
    /// Sent to this node as the leader: must be decided here.
    Final,
}

impl Proposer {
    /// Commits `cmd` within `PROPOSE_TIMEOUT`: here if this node leads, else
    /// at the leader (again at the next one if the leader changes meanwhile).
    async fn propose(&self, cmd: ControlCommand, hop: Hop) -> Result<ControlOutcome, String> {
        let deadline = Instant::now() + PROPOSE_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let local = tokio::time::timeout(left, self.raft.client_write(cmd.clone())).await;
            let leader = match local {
                Err(_) => return Err("the control plane did not commit in time".into()),
                Ok(Ok(resp)) => return Ok(resp.data),
                Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f)))) => {
                    f.leader_node.and_then(|n| n.peer.parse::<PeerId>().ok())
                }
                Ok(Err(e)) => return Err(e.to_string()),
            };
            let targets: Vec<(PeerId, bool)> = match (hop, leader) {
                (Hop::Final, _) => return Err("this node is not the control-plane leader".into()),
                (_, Some(l)) => vec![(l, true)],
                (Hop::Relay, None) => return Err("this node knows no control-plane leader".into()),
                // A node that does not follow the log yet asks live members, which
                // relay it once to the leader they know.
                (Hop::Local, None) => self.fallback.iter().take(3).map(|p| (*p, false)).collect(),
            };
            let mut last =
                Err("no control-plane leader known and no live member to ask".to_string());
            let mut moved = false;
            for (peer, to_leader) in targets {
                last = match self.forward(peer, cmd.clone(), to_leader, deadline).await {
                    Ok(answer) => answer,
                    Err(LeaderMoved) => {
                        moved = true;
                        Err(format!(
                            "the control-plane leader changed while {peer} was asked"
                        ))
                    }
                };
                if last.is_ok() {
                    break;
                }
            }
            // The same command once more, at the new leader: one the old leader
            // committed after all is refused or a no-op there, as after a timeout.
            if !moved || Instant::now() >= deadline {
                return last;
            }
        }
    }

    /// Whether `node` is the active of `stripe` in `epoch`, read linearizably on
    /// the leader (which first confirms it still leads).
    async fn confirm_active(
        &self,
        stripe: u32,
        epoch: u64,
        node: NodeId,
        hop: Hop,
    ) -> Result<bool, String> {
        let linearizable =
            tokio::time::timeout(PROPOSE_TIMEOUT, self.raft.ensure_linearizable()).await;
        let leader = match linearizable {
            Err(_) => return Err("the control plane did not answer in time".into()),
            Ok(Ok(_)) => {
                let a = self
                    .applied
                    .read()
                    .map_err(|_| "control state unreadable")?;
                return Ok(a
                    .state
                    .stripes
                    .get(&stripe)
                    .is_some_and(|s| s.epoch == epoch && s.active == Some(node)));
            }
            Ok(Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(f)))) => {
                f.leader_node.and_then(|n| n.peer.parse::<PeerId>().ok())
            }
            Ok(Err(e)) => return Err(e.to_string()),
        };
        let Some(leader) = leader.filter(|_| hop == Hop::Local) else {
            return Err("no control-plane leader to confirm with".into());
        };
        let addrs = addresses(&self.book, &leader);
        let body = ByteBuf::from(to_cbor(&ControlRequest::ConfirmActive {
            stripe,
            epoch,
            node,
        }));
        let call = self.net.call(leader, addrs, Request::ControlPlane { body });
        let answer = tokio::select! {
            answer = tokio::time::timeout(PROPOSE_TIMEOUT, call) => answer,
            () = self.leader_moved_from(leader) => {
                return Err(format!("the control-plane leader changed while {leader} was asked"));
            }
        };
        match answer {
            Ok(Ok(Response::ControlPlane { body })) => {
                match from_cbor::<ControlResponse>(&body, MAX_CONTROL_BODY) {
                    Ok(ControlResponse::Confirmed(r)) => r,
                    _ => Err(format!("{leader} sent an unexpected answer")),
                }
            }
            Ok(Ok(other)) => Err(format!("{leader} answered {other:?}")),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("{leader} did not answer in time")),
        }
    }

    /// Resolves once this node follows a control-plane leader other than
    /// `peer`: a proposal or confirmation sent to a leader that is paused or cut
    /// off is then given up for the new leader, instead of waiting out
    /// `PROPOSE_TIMEOUT` (a stripe whose in-sync standby stopped with the
    /// leader waited that long for its removal, writes stalled meanwhile).
    /// Only a later term counts: openraft publishes its metrics after the
    /// core has moved on, so the leader they name may still be the one before
    /// `peer`.
    async fn leader_moved_from(&self, peer: PeerId) {
        let mut metrics = self.raft.metrics();
        let peer = peer.to_string();
        let asked_in = metrics.borrow().current_term;
        loop {
            let moved = {
                let m = metrics.borrow_and_update();
                m.current_term > asked_in
                    && m.current_leader.is_some_and(|l| {
                        m.membership_config
                            .membership()
                            .get_node(&l)
                            .is_some_and(|n| n.peer != peer)
                    })
            };
            if moved {
                return;
            }
            if metrics.changed().await.is_err() {
                // Raft stopped: the call's own timeout ends the wait.
                std::future::pending::<()>().await;
            }
        }
    }

    /// Sends `command` to `peer` (the leader, if `forwarded`) and waits for
    /// its answer until `deadline`, or until this node follows another leader.
    async fn forward(
        &self,
        peer: PeerId,
        command: ControlCommand,
        forwarded: bool,
        deadline: Instant,
    ) -> Result<Result<ControlOutcome, String>, LeaderMoved> {
        let addrs = addresses(&self.book, &peer);
        let body = ByteBuf::from(to_cbor(&ControlRequest::Propose { command, forwarded }));
        let call = self.net.call(peer, addrs, Request::ControlPlane { body });
        let left = deadline.saturating_duration_since(Instant::now());
        let answer = tokio::select! {
            answer = tokio::time::timeout(left, call) => answer,
            // Only a proposal sent to the leader: one relayed by a member
            // (which may be asked while a leader is known) waits for it.
            () = self.leader_moved_from(peer), if forwarded => return Err(LeaderMoved),
        };
        Ok(match answer {
            Err(_) => Err(format!("{peer} did not answer the proposal in time")),
            Ok(Err(e)) => Err(e.to_string()),
            Ok(Ok(Response::ControlPlane { body })) => {
                match from_cbor::<ControlResponse>(&body, MAX_CONTROL_BODY) {
                    Ok(ControlResponse::Propose(r)) => r,
                    Ok(other) => Err(format!("{peer} answered a proposal with {other:?}")),
                    Err(e) => Err(format!("{peer} sent a malformed answer: {e}")),
                }
            }
            Ok(Ok(other)) => Err(format!("{peer} answered a proposal with {other:?}")),
        })
    }
}

/// A forwarded proposal was given up: this node follows a new leader.
struct LeaderMoved;

/// How a pre-vote round ended.
enum Round {
    /// Raft stopped (the node is stopping).
    Stopped,
    LeaderHeard,
    /// This node holds no vote (a learner, or removed).
    NotVoter,
    Won,
    Lost,
}

/// The voter sets of the control plane (two during a joint change) and how
/// to reach their members.
#[derive(Default)]
struct Voters {
    configs: Vec<BTreeSet<NodeId>>,
    nodes: BTreeMap<NodeId, ControlNode>,
}

/// What decides a pre-vote, from openraft's state, with the voter sets if
/// `with_voters` (to ask them); `None` once Raft stopped.
async fn observe(raft: &Raft<ControlTypes>, with_voters: bool) -> Option<(Observed, Voters)> {
    let lease = Duration::from_millis(RAFT_ELECTION_TIMEOUT_MAX_MS);
    let (leading, lease_held, voters) = raft
        .with_raft_state(move |st| {
            let now = tokio::time::Instant::now();
            // openraft's own test before it grants a vote.
            let lease_held = st.vote_ref().is_committed()
                && st.vote_last_modified().is_some_and(|t| now <= t + lease);
            let leading = st.server_state == ServerState::Leader;
            let voters = if leading || lease_held || !with_voters {
                // Neither asks nor grants, or only answers: nothing more to read.
                Voters::default()
            } else {
                let membership = st.membership_state.effective();
                let configs = membership.membership().get_joint_config().clone();
                let nodes = configs
                    .iter()
                    .flatten()
                    .filter_map(|id| membership.get_node(id).map(|n| (*id, n.clone())))
                    .collect();
                Voters { configs, nodes }
            };
            (leading, lease_held, voters)
        })
        .await
        .ok()?;
    // The last log id as openraft published it after its latest loop (a step
    // behind its core at most, which only makes this node more cautious);
    // not needed by a node that neither asks nor grants.
    let last_log = if leading || lease_held {
        None
    } else {
        raft.data_metrics().borrow().last_log
    };
    let seen = Observed {
        leading,
        lease_held,
        last_log,
    };
    Some((seen, voters))
}

/// Asks one voter for its pre-vote. A node older than pre-votes refuses the
/// request as malformed: it counts as granted, its real vote still judges.
async fn ask_pre_vote(net: NetHandle, peer: PeerId, addrs: Vec<Multiaddr>, body: ByteBuf) -> bool {
    let call = net.call(peer, addrs, Request::ControlPlane { body });
    match tokio::time::timeout(PRE_VOTE_TIMEOUT, call).await {
        Ok(Ok(Response::ControlPlane { body })) => matches!(
            from_cbor::<ControlResponse>(&body, MAX_CONTROL_BODY),
            Ok(ControlResponse::PreVote { granted: true })
        ),
        Ok(Ok(Response::Refused { reason })) => reason.starts_with(MALFORMED_REQUEST),
        _ => false,
    }
}

impl Actor for ControlPlane {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        self.founder = self.store.is_cluster_founder().unwrap_or(false);
        ctx.run_interval(TICK, |act, ctx| act.tick(ctx));
        ctx.run_interval(PRE_VOTE_TICK, |act, ctx| act.pre_vote_tick(ctx));
        self.tick(ctx);
    }
}

/// A control-plane request from a peer.
#[derive(Message)]
#[rtype(result = "()")]
pub struct ServeControl(pub ServiceRequest);

impl Handler<ServeControl> for ControlPlane {
    type Result = ();
    fn handle(&mut self, req: ServeControl, ctx: &mut Self::Context) {
        self.on_service_request(req.0, ctx);
    }
}

/// Sends stripe requests for an election: to this node's own stripe actor, or
/// to a peer.
struct StripeAsker {
    me: NodeId,
    me_peer: PeerId,
    local: Option<Addr<StripeActor>>,
    net: NetHandle,
    book: AddressBook,
}

impl StripeAsker {
    fn ask(
        &self,
        node: NodeId,
        peer: PeerId,
        request: StripeRequest,
    ) -> impl std::future::Future<Output = Result<StripeResponse, String>> + 'static {
        let local = (node == self.me).then(|| self.local.clone()).flatten();
        let me_peer = self.me_peer;
        let remote = (node != self.me).then(|| {
            let addrs = addresses(&self.book, &peer);
            self.net.call(peer, addrs, stripe_request(&request))
        });
        async move {
            if let Some(call) = remote {
                return match call.await {
                    Ok(resp) => stripe_response(resp),
                    Err(e) => Err(e.to_string()),
                };
            }
            let Some(addr) = local else {
                return Err("this node holds no stripe".into());
            };
            let (tx, rx) = tokio::sync::oneshot::channel();
            addr.do_send(ServeStripe {
                peer: me_peer,
                request,
                reply: Responder::Local(tx),
            });
            rx.await
                .map_err(|_| "the stripe actor did not answer".to_string())
        }
    }
}

/// Gives the control plane this node's stripe actor (for elections it coordinates).
#[derive(Message)]
#[rtype(result = "()")]
pub struct AttachStripe(pub Addr<StripeActor>);

impl Handler<AttachStripe> for ControlPlane {
    type Result = ();
    fn handle(&mut self, msg: AttachStripe, _: &mut Self::Context) {
        self.local_stripe = Some(msg.0);
    }
}

/// Asks the control plane whether this node is the active of `stripe` in `epoch`.
#[derive(Message)]
#[rtype(result = "Result<bool, String>")]
pub struct ConfirmActive {
    pub stripe: u32,
    pub epoch: u64,
}

impl Handler<ConfirmActive> for ControlPlane {
    type Result = ResponseFuture<Result<bool, String>>;
    fn handle(&mut self, msg: ConfirmActive, _: &mut Self::Context) -> Self::Result {
        let proposer = self.proposer();
        let me = self.me;
        Box::pin(async move {
            proposer
                .confirm_active(msg.stripe, msg.epoch, me, Hop::Local)
                .await
        })
    }
}

/// A node stopping gracefully gives up its vote first, when it leads the
/// control plane: the voters left behind (with a live node in its place, if
/// there is one) keep deciding — a sole voter that just left would leave the
/// others unable to decide anything, even to drop it from its stripe's in-sync
/// set.
#[derive(Message)]
#[rtype(result = "VoteHandover")]
pub struct GiveUpVote;

/// What became of a [`GiveUpVote`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VoteHandover {
    /// Handed over: the change is committed.
    Done,
    /// Nothing to hand over, or nobody to hand it to (why).
    NotNeeded(&'static str),
    /// Another voter change is under way: ask again shortly.
    Busy,
    Failed(String),
}

impl Handler<GiveUpVote> for ControlPlane {
    type Result = ResponseActFuture<Self, VoteHandover>;
    fn handle(&mut self, _: GiveUpVote, _: &mut Self::Context) -> Self::Result {
        let ready = |v: VoteHandover| -> Self::Result { Box::pin(actix::fut::ready(v)) };
        let metrics = self.raft.metrics().borrow().clone();
        let membership = metrics.membership_config.membership();
        let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        let learners: BTreeSet<NodeId> = membership.learner_ids().collect();
        if !voters.contains(&self.me) {
            return ready(VoteHandover::NotNeeded("not a voter"));
        }
        if metrics.current_leader != Some(self.me) {
            // The leader sees this node leave and replaces it; the voters left
            // are a majority (a sole voter always leads).
            return ready(VoteHandover::NotNeeded("not the control-plane leader"));
        }
        if self.changing || membership.get_joint_config().len() > 1 {
            return ready(VoteHandover::Busy);
        }
        let state = self.state();
        let live: BTreeSet<NodeId> = self
            .members
            .iter()
            .filter(|m| !m.is_self && m.record.status == MemberStatus::Alive)
            .map(|m| node_id_of(&m.record.id))
            .filter(|id| {
                (voters.contains(id) || learners.contains(id))
                    && state.nodes.contains_key(id)
                    && !state.removed.contains(id)
            })
            .collect();
        let next = plan_voters(&state, &voters, &live, &BTreeSet::from([self.me]), self.me);
        let Some(next) = next.filter(|n| !n.contains(&self.me)) else {
            return ready(VoteHandover::NotNeeded("no other node can hold the vote"));
        };
        tracing::info!(voters = ?next, "stopping: handing this node's control-plane vote over");
        // Kept set once done: the node is stopping, and its own reconcile must
        // not undo the change meanwhile. Cleared if it did not go through, so
        // that it can be asked again.
        self.changing = true;
        let raft = self.raft.clone();
        Box::pin(
            async move {
                match raft.change_membership(next, true).await {
                    Ok(_) => VoteHandover::Done,
                    Err(RaftError::APIError(ClientWriteError::ChangeMembershipError(
                        ChangeMembershipError::InProgress(_),
                    ))) => VoteHandover::Busy,
                    Err(e) => VoteHandover::Failed(e.to_string()),
                }
            }
            .into_actor(self)
            .map(|outcome, act, _| {
                if outcome != VoteHandover::Done {
                    act.changing = false;
                }
                outcome
            }),
        )
    }
}

/// A standby of `stripe` has not heard its active of `epoch`: the control-plane
/// leader coordinates an election.
#[derive(Message)]
#[rtype(result = "()")]
pub struct RequestElection {
    pub stripe: u32,
    pub epoch: u64,
}

impl Handler<RequestElection> for ControlPlane {
    type Result = ();
    fn handle(&mut self, msg: RequestElection, ctx: &mut Self::Context) {
        let leader = self.raft.metrics().borrow().current_leader;
        if leader == Some(self.me) {
            self.coordinate(msg.stripe, msg.epoch, ctx);
            return;
        }
        // The leader may be a node without a place (yet): its peer id is in
        // the consensus membership.
        let peer = leader.and_then(|l| {
            let metrics = self.raft.metrics().borrow().clone();
            metrics
                .membership_config
                .membership()
                .get_node(&l)
                .map(|n| n.peer.clone())
                .or_else(|| self.state().peer_of(l).map(str::to_string))
        });
        let Some(peer) = peer else {
            tracing::debug!(
                stripe = msg.stripe,
                "no control-plane leader to run an election"
            );
            return;
        };
        let Ok(peer) = peer.parse::<PeerId>() else {
            return;
        };
        let addrs = addresses(&self.book, &peer);
        let body = ByteBuf::from(to_cbor(&ControlRequest::Elect {
            stripe: msg.stripe,
            epoch: msg.epoch,
        }));
        let call = self.net.call(peer, addrs, Request::ControlPlane { body });
        actix_rt::spawn(async move {
            let _ = tokio::time::timeout(PROPOSE_TIMEOUT, call).await;
        });
    }
}

impl Handler<GetStripes> for ControlPlane {
    type Result = MessageResult<GetStripes>;
    fn handle(&mut self, _: GetStripes, _: &mut Self::Context) -> Self::Result {
        MessageResult(self.view())
    }
}

impl Handler<Propose> for ControlPlane {
    type Result = ResponseFuture<Result<ControlOutcome, String>>;
    fn handle(&mut self, msg: Propose, _: &mut Self::Context) -> Self::Result {
        let proposer = self.proposer();
        Box::pin(async move { proposer.propose(msg.0, Hop::Local).await })
    }
}
