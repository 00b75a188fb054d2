//! The actix actor around the membership state machine: turns network events into
//! state-machine inputs and effects into libp2p commands, redb writes and logs.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use actix::prelude::*;
use kiln_net::addr::{seed_host, socket_multiaddr, PeerAddr};
use kiln_net::wire::{MemberRecord, MemberStatus, MembershipGossip, Request, Response};
use kiln_net::{Multiaddr, NetCommand, NetEvent, NetHandle, PeerId, Reply};
use kiln_persistence::{MemberState, NodeStore, StoredMember};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::sync::mpsc;

use super::state::{Effect, ForgetError, MemberView, Membership, MembershipConfig, Now};

const TICK: Duration = Duration::from_millis(100);
/// Seeds are dialled again while this node has no connection at all: soon at
/// first (the seed may be starting at the same moment), then backing off.
const SEED_REDIAL_FIRST: Duration = Duration::from_millis(250);
const SEED_REDIAL_MAX: Duration = Duration::from_secs(5);
/// How long a node started with seeds waits for a cluster id from its peers
/// before the smallest member creates one.
const CLUSTER_ID_GRACE: Duration = Duration::from_secs(5);
/// How long a seed host name lookup may take before it counts as failed.
const SEED_LOOKUP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a peer's indirect probe waits for the subject's answer before it is
/// told "not reached" (within the asker's own wait, `INDIRECT_PROBE_TIMEOUT_MS`).
const FORWARDED_PROBE_TIMEOUT: Duration = Duration::from_millis(1_500);

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: &'static str,
}

/// Membership metrics, registered under `kiln_membership_*`.
#[derive(Clone, Default)]
pub struct MembershipMetrics {
    members: Family<StateLabel, Gauge>,
    announcements_sent: Counter,
    announcements_received: Counter,
    claims_received: Counter,
    suspicions: Counter,
    refutations: Counter,
    deaths_declared: Counter,
    syncs: Counter,
    indirect_probes: Counter,
    reached_indirectly: Counter,
}

impl MembershipMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = MembershipMetrics::default();
        let r = registry.sub_registry_with_prefix("kiln_membership");
        r.register(
            "members",
            "Members of the cluster as this node sees them, by state (this node included)",
            m.members.clone(),
        );
        r.register(
            "announcements_sent",
            "Membership announcements published by this node",
            m.announcements_sent.clone(),
        );
        r.register(
            "announcements_received",
            "Membership announcements received from other members",
            m.announcements_received.clone(),
        );
        r.register(
            "claims_received",
            "Suspect, dead and left claims received",
            m.claims_received.clone(),
        );
        r.register(
            "suspicions",
            "Times this node started suspecting a member",
            m.suspicions.clone(),
        );
        r.register(
            "refutations",
            "Times this node refuted a claim about itself with a higher incarnation",
            m.refutations.clone(),
        );
        r.register(
            "deaths_declared",
            "Members this node declared dead",
            m.deaths_declared.clone(),
        );
        r.register(
            "syncs",
            "Push-pull member table exchanges completed",
            m.syncs.clone(),
        );
        r.register(
            "indirect_probes",
            "Times this node asked other members to reach a member it could not",
            m.indirect_probes.clone(),
        );
        r.register(
            "reached_indirectly",
            "Times a member this node could not reach was found reachable by another",
            m.reached_indirectly.clone(),
        );
        m
    }
}

fn to_stored(r: &MemberRecord, since: u64) -> StoredMember {
    StoredMember {
        id: r.id.clone(),
        name: r.name.clone(),
        addrs: r.addrs.clone(),
        incarnation: r.incarnation,
        started_ms: r.started_ms,
        state: match r.status {
            MemberStatus::Alive => MemberState::Alive,
            MemberStatus::Suspect => MemberState::Suspect,
            MemberStatus::Dead => MemberState::Dead,
            MemberStatus::Left => MemberState::Left,
        },
        state_since_unix_ms: since,
    }
}

/// The listen addresses worth announcing: loopback ones only when there is
/// nothing else. A node listening on 0.0.0.0 hears of every interface, 127.0.0.1
/// included, and a peer on another machine that dials that reaches itself.
fn announceable(addrs: Vec<String>) -> Vec<String> {
    let loopback = |a: &String| {
        a.parse::<Multiaddr>().is_ok_and(|m| {
            m.iter().next().is_some_and(|p| match p {
                kiln_net::addr::Protocol::Ip4(ip) => ip.is_loopback(),
                kiln_net::addr::Protocol::Ip6(ip) => ip.is_loopback(),
                _ => false,
            })
        })
    };
    if addrs.iter().all(loopback) {
        addrs
    } else {
        addrs.into_iter().filter(|a| !loopback(a)).collect()
    }
}

/// A persisted member, as the state machine knows it.
pub fn from_stored(m: StoredMember) -> (MemberRecord, u64) {
    (
        MemberRecord {
            id: m.id,
            name: m.name,
            addrs: m.addrs,
            incarnation: m.incarnation,
            started_ms: m.started_ms,
            status: match m.state {
                MemberState::Alive => MemberStatus::Alive,
                MemberState::Suspect => MemberStatus::Suspect,
                MemberState::Dead => MemberStatus::Dead,
                MemberState::Left => MemberStatus::Left,
            },
        },
        m.state_since_unix_ms,
    )
}

pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A write to the node database, done off the actor's thread.
enum StoreWrite {
    Members {
        stored: Vec<StoredMember>,
        forgotten: Vec<(String, u64)>,
    },
}

/// One thread applies the actor's writes in the order they were made (fsync
/// blocks; the actor must not), so a later write never lands before an earlier one.
/// Dropping it waits for the queued writes, so the database is closed cleanly.
struct StoreWriter {
    queue: Option<std::sync::mpsc::Sender<StoreWrite>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl StoreWriter {
    fn start(store: Arc<NodeStore>) -> Self {
        let (tx, rx) = std::sync::mpsc::channel::<StoreWrite>();
        let span = tracing::Span::current();
        let thread = std::thread::Builder::new()
            .name("kiln-store".into())
            .spawn(move || {
                let _span = span.entered();
                for StoreWrite::Members { stored, forgotten } in rx {
                    if let Err(e) = store.save_members(&stored, &forgotten) {
                        tracing::error!(error = %e, "cannot persist the member table");
                    }
                }
            })
            .map_err(|e| tracing::error!(error = %e, "cannot start the store writer thread"))
            .ok();
        StoreWriter {
            queue: Some(tx),
            thread,
        }
    }

    fn send(&self, write: StoreWrite) {
        if let Some(q) = &self.queue {
            // Fails only when the writer thread is gone, which it reports itself.
            let _ = q.send(write);
        }
    }
}

impl Drop for StoreWriter {
    fn drop(&mut self) {
        self.queue = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// What `GET /v1/node` shows.
#[derive(Debug, Clone)]
pub struct NodeInfo {
    pub id: String,
    pub name: String,
    pub addrs: Vec<String>,
    pub cluster: Option<String>,
    pub incarnation: u64,
    /// This node created the cluster (and bootstraps its control plane).
    pub founder: bool,
}

#[derive(Message)]
#[rtype(result = "NodeInfo")]
pub struct GetNodeInfo;

#[derive(Message)]
#[rtype(result = "Vec<MemberView>")]
pub struct ListMembers;

#[derive(Message)]
#[rtype(result = "Result<(), ForgetError>")]
pub struct ForgetMember(pub String);

/// Graceful leave: announce `left`, give gossip a moment to carry it, then answer.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Leave;

pub struct MembershipActor {
    founder: bool,
    state: Membership,
    net: NetHandle,
    events: Option<mpsc::UnboundedReceiver<NetEvent>>,
    store: Arc<NodeStore>,
    cluster: Option<String>,
    seeds: Vec<PeerAddr>,
    connected: usize,
    last_seed_dial: Option<Instant>,
    seed_redial: Duration,
    epoch: Instant,
    metrics: MembershipMetrics,
    pending_forgotten: Vec<(String, u64)>,
    leaving: bool,
    /// When the last tick ran (see `disconnect_the_dead`).
    last_tick: Option<Instant>,
    writer: StoreWriter,
    /// A push-pull showed a peer without a cluster id either: nobody founded one.
    met_peer_without_cluster: bool,
    /// Indirect probes peers asked of this node, by subject: answered once the
    /// subject answers this node (or fails to).
    forwarded_probes: std::collections::HashMap<PeerId, Vec<(Reply, Instant)>>,
    /// Peers that said (through identify) they answer indirect probes.
    probe_capable: std::collections::HashSet<PeerId>,
    /// Seeds (by address) whose host name is being looked up, and where a
    /// finished lookup says so.
    seeds_resolving: std::collections::HashSet<String>,
    seeds_resolving_done: mpsc::UnboundedSender<String>,
    seeds_resolved: mpsc::UnboundedReceiver<String>,
}

impl MembershipActor {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        me: MemberRecord,
        store: Arc<NodeStore>,
        cluster: Option<String>,
        seeds: Vec<PeerAddr>,
        net: NetHandle,
        events: mpsc::UnboundedReceiver<NetEvent>,
        cfg: MembershipConfig,
        metrics: MembershipMetrics,
    ) -> Result<Self, kiln_persistence::StoreError> {
        let known = store.load_members()?.into_iter().map(from_stored).collect();
        let (seeds_resolving_done, seeds_resolved) = mpsc::unbounded_channel();
        let forgotten = store.load_forgotten()?;
        Ok(MembershipActor {
            state: Membership::new(me, known, forgotten, cfg),
            net,
            events: Some(events),
            store: store.clone(),
            cluster,
            seeds,
            connected: 0,
            last_seed_dial: None,
            seed_redial: SEED_REDIAL_FIRST,
            epoch: Instant::now(),
            metrics,
            pending_forgotten: Vec::new(),
            leaving: false,
            last_tick: None,
            writer: StoreWriter::start(store.clone()),
            met_peer_without_cluster: false,
            forwarded_probes: Default::default(),
            seeds_resolving: Default::default(),
            probe_capable: Default::default(),
            seeds_resolving_done,
            seeds_resolved,
            founder: store.is_cluster_founder()?,
        })
    }

    fn now(&self) -> Now {
        Now {
            mono_ms: self.epoch.elapsed().as_millis() as u64,
            unix_ms: unix_ms(),
        }
    }

    fn dial_seeds(&mut self) {
        while let Ok(seed) = self.seeds_resolved.try_recv() {
            self.seeds_resolving.remove(&seed);
        }
        if self.last_seed_dial.is_some() {
            self.seed_redial = (self.seed_redial * 2).min(SEED_REDIAL_MAX);
        }
        self.last_seed_dial = Some(Instant::now());
        for s in &self.seeds {
            let Some(seed_host) = seed_host(&s.addr) else {
                self.net.send(NetCommand::Dial {
                    peer: s.peer,
                    addrs: vec![s.addr.clone()],
                });
                continue;
            };
            // Resolved now, not at start: the name may not exist yet, or point
            // elsewhere since. Every address it has is dialled (a name can
            // stand for several nodes). One lookup per seed at a time.
            let seed = s.addr.to_string();
            if !self.seeds_resolving.insert(seed.clone()) {
                continue;
            }
            let (net, peer, resolving) =
                (self.net.clone(), s.peer, self.seeds_resolving_done.clone());
            // A name standing for every node (a headless service) includes
            // this one: not dialled.
            let own: Vec<String> = self.state.me().addrs.clone();
            tokio::spawn(async move {
                let host = seed_host.host.clone();
                let lookup = tokio::net::lookup_host((host.as_str(), seed_host.port));
                match tokio::time::timeout(SEED_LOOKUP_TIMEOUT, lookup).await {
                    Ok(Ok(found)) => {
                        let resolved: Vec<Multiaddr> = found
                            .filter(|a| seed_host.wants(&a.ip()))
                            .map(|a| socket_multiaddr(a.ip(), a.port()))
                            .collect();
                        let addrs: Vec<Multiaddr> = resolved
                            .iter()
                            .filter(|a| !own.contains(&a.to_string()))
                            .cloned()
                            .collect();
                        if resolved.is_empty() {
                            tracing::warn!(seed = %host, "seed host name has no address; retrying");
                        } else if addrs.is_empty() {
                            tracing::debug!(seed = %host, "seed host name stands for this node only");
                        } else if peer.is_some() {
                            // One node: one dial trying each address.
                            net.send(NetCommand::Dial { peer, addrs });
                        } else {
                            // Perhaps several nodes: each address dialled.
                            for a in addrs {
                                net.send(NetCommand::Dial {
                                    peer,
                                    addrs: vec![a],
                                });
                            }
                        }
                    }
                    Ok(Err(e)) => tracing::warn!(seed = %host, error = %e,
                        "cannot resolve the seed host name; retrying (check the name and DNS)"),
                    Err(_) => {
                        tracing::warn!(seed = %host, timeout_s = SEED_LOOKUP_TIMEOUT.as_secs(),
                        "cannot resolve the seed host name: no answer; retrying (check DNS)")
                    }
                }
                let _ = resolving.send(seed);
            });
        }
    }

    /// Members this node declared dead itself (`fx` of a tick) lose their
    /// connection: one that looks up is never redialled. On Linux the swarm's
    /// `TCP_USER_TIMEOUT` has usually closed it already; this covers a peer
    /// whose TCP still answers while the process does not (hung), and other
    /// systems. Not after a tick that came long overdue: this node was paused
    /// itself, its peers are likely fine and the evidence of it is still
    /// queued (actix then runs the missed ticks back to back; deaths all come
    /// from the first, the late one).
    fn disconnect_the_dead(&self, fx: &[Effect]) {
        for e in fx {
            if let Effect::DeclaredDead { id } = e {
                if let Ok(peer) = id.parse::<PeerId>() {
                    self.net.send(NetCommand::Disconnect(peer));
                }
            }
        }
    }

    fn run(&mut self, effects: Vec<Effect>) {
        // Effects of inputs made while running these (answers given at once).
        let mut pending = Vec::new();
        for e in effects {
            match e {
                Effect::Publish(mut g) => {
                    match &mut g {
                        MembershipGossip::Announce { cluster, .. } => {
                            self.metrics.announcements_sent.inc();
                            cluster.clone_from(&self.cluster);
                        }
                        MembershipGossip::Joined { cluster, .. } => {
                            cluster.clone_from(&self.cluster)
                        }
                        MembershipGossip::Claim { .. } | MembershipGossip::Forget { .. } => {}
                    }
                    self.net.send(NetCommand::PublishMembership(g));
                }
                Effect::Dial { id, addrs } => {
                    let Ok(peer) = id.parse::<PeerId>() else {
                        continue;
                    };
                    let addrs: Vec<Multiaddr> =
                        addrs.iter().filter_map(|a| a.parse().ok()).collect();
                    self.net.send(NetCommand::Dial {
                        peer: Some(peer),
                        addrs,
                    });
                }
                Effect::Sync { id } => {
                    let Ok(peer) = id.parse::<PeerId>() else {
                        continue;
                    };
                    self.net.send(NetCommand::Request {
                        peer,
                        request: Request::MembershipSync {
                            cluster: self.cluster.clone(),
                            members: self.state.table(),
                        },
                    });
                }
                Effect::ProbeIndirectly { subject, via } => {
                    self.metrics.indirect_probes.inc();
                    tracing::debug!(peer = %subject, via = ?via, "member unreachable from here: asking others to reach it");
                    for v in via {
                        match v.parse::<PeerId>() {
                            Ok(peer) if self.probe_capable.contains(&peer) => {
                                self.net.send(NetCommand::Request {
                                    peer,
                                    request: Request::MembershipProbe {
                                        subject: subject.clone(),
                                    },
                                });
                            }
                            // An older node (or one not identified yet) cannot
                            // be asked: it counts as "not reached".
                            _ => {
                                let now = self.now();
                                let fx = self.state.on_indirect_answer(now, &subject, &v, false);
                                pending.extend(fx);
                            }
                        }
                    }
                }
                Effect::ReachedIndirectly { id, via } => {
                    self.metrics.reached_indirectly.inc();
                    let name = self
                        .state
                        .member(&id)
                        .map(|m| m.record.name.clone())
                        .unwrap_or_default();
                    tracing::warn!(peer = %id, peer_name = %name, %via,
                        "cannot connect to this member, but another member reaches it: it is kept alive; check the network between the two nodes");
                }
                Effect::PersistIncarnation(inc) => {
                    // On this thread, before the announcement that follows it: a
                    // refuted incarnation must never be reused after a crash.
                    if let Err(e) = self.store.store_incarnation(inc) {
                        tracing::error!(error = %e, incarnation = inc, "cannot persist the incarnation");
                    }
                }
                Effect::StatusChanged {
                    id,
                    from,
                    to,
                    incarnation,
                } => {
                    let name = self
                        .state
                        .member(&id)
                        .map(|m| m.record.name.clone())
                        .unwrap_or_default();
                    tracing::info!(peer = %id, peer_name = %name, from = from.map(MemberStatus::as_str), to = to.as_str(),
                        incarnation, "member state changed");
                }
                Effect::Suspected { .. } => {
                    self.metrics.suspicions.inc();
                }
                Effect::DeclaredDead { .. } => {
                    self.metrics.deaths_declared.inc();
                }
                Effect::Refuted { .. } => {
                    self.metrics.refutations.inc();
                }
                Effect::Forgotten { id, incarnation } => {
                    tracing::info!(peer = %id, incarnation, "member forgotten");
                    self.pending_forgotten.push((id, incarnation));
                }
            }
        }
        if !pending.is_empty() {
            self.run(pending);
        }
    }

    /// A peer asks whether this node reaches `subject`: yes at once if this node
    /// is the subject; otherwise the subject is asked over this node's own
    /// connection (a connection not yet known to be lost is no proof of life).
    fn forward_probe(&mut self, asker: PeerId, subject: String, reply: Reply) {
        let answer = |net: &NetHandle, reply: Reply, reachable: bool| {
            net.send(NetCommand::Respond {
                reply,
                response: Response::MembershipProbe {
                    subject: subject.clone(),
                    reachable,
                },
            });
        };
        if subject == self.state.me().id {
            answer(&self.net, reply, true);
            return;
        }
        let target = subject.parse::<PeerId>().ok().filter(|p| {
            *p != asker
                && self.state.member(&subject).is_some_and(|m| {
                    m.connected
                        && m.record.status != MemberStatus::Dead
                        && m.record.status != MemberStatus::Left
                })
        });
        let Some(target) = target else {
            answer(&self.net, reply, false);
            return;
        };
        let waiting = self.forwarded_probes.entry(target).or_default();
        if waiting.is_empty() {
            // Any answer from the subject will do; an older node is asked for
            // a push-pull, which it understands.
            let request = if self.probe_capable.contains(&target) {
                Request::MembershipProbe { subject }
            } else {
                Request::MembershipSync {
                    cluster: self.cluster.clone(),
                    members: self.state.table(),
                }
            };
            self.net.send(NetCommand::Request {
                peer: target,
                request,
            });
        }
        waiting.push((reply, Instant::now()));
    }

    /// `subject` answered this node (any answer: it is alive) or a request to it
    /// failed: tells every peer that asked this node to reach it.
    fn answer_forwarded_probes(&mut self, subject: &PeerId, reachable: bool) {
        let Some(waiting) = self.forwarded_probes.remove(subject) else {
            return;
        };
        for (reply, _) in waiting {
            self.net.send(NetCommand::Respond {
                reply,
                response: Response::MembershipProbe {
                    subject: subject.to_string(),
                    reachable,
                },
            });
        }
    }

    fn expire_forwarded_probes(&mut self) {
        let late: Vec<PeerId> = self
            .forwarded_probes
            .iter()
            .filter(|(_, w)| {
                w.first()
                    .is_some_and(|(_, at)| at.elapsed() >= FORWARDED_PROBE_TIMEOUT)
            })
            .map(|(p, _)| *p)
            .collect();
        for p in late {
            self.answer_forwarded_probes(&p, false);
        }
    }

    fn flush(&mut self) {
        let dirty = self.state.take_dirty();
        let forgotten = std::mem::take(&mut self.pending_forgotten);
        if dirty.is_empty() && forgotten.is_empty() {
            return;
        }
        let stored: Vec<StoredMember> = dirty
            .iter()
            .map(|(r, since)| to_stored(r, *since))
            .collect();
        self.writer.send(StoreWrite::Members { stored, forgotten });
    }

    fn update_gauges(&self) {
        for (s, n) in self.state.counts() {
            self.metrics
                .members
                .get_or_create(&StateLabel { state: s.as_str() })
                .set(n as i64);
        }
    }

    /// Checks (and, for a joining node, adopts) the cluster id of a peer.
    fn accept_cluster(&mut self, peer: &PeerId, theirs: &Option<String>) -> bool {
        match (&self.cluster, theirs) {
            (None, None) => {
                self.met_peer_without_cluster = true;
                true
            }
            (_, None) => true,
            (Some(ours), Some(t)) if ours == t => true,
            (Some(ours), Some(t)) => {
                tracing::warn!(%peer, ours = %ours, theirs = %t,
                    "peer belongs to another cluster (same secret, different cluster id); disconnecting it");
                self.net.send(NetCommand::Disconnect(*peer));
                false
            }
            (None, Some(t)) => match self.store.set_cluster_id(t) {
                Ok(()) => {
                    tracing::info!(cluster = %t, via = %peer, "joined cluster");
                    self.cluster = Some(t.clone());
                    true
                }
                Err(e) => {
                    tracing::error!(error = %e, "cannot record the cluster id");
                    false
                }
            },
        }
    }

    /// Whether gossip stamped with `theirs` belongs to this node's cluster; a node
    /// that has no cluster id yet adopts the first one it hears.
    fn same_cluster(&mut self, theirs: &Option<String>) -> bool {
        match (&self.cluster, theirs) {
            (_, None) => true,
            (Some(ours), Some(t)) => ours == t,
            (None, Some(t)) => match self.store.set_cluster_id(t) {
                Ok(()) => {
                    tracing::info!(cluster = %t, "joined cluster (from an announcement)");
                    self.cluster = Some(t.clone());
                    true
                }
                Err(e) => {
                    tracing::error!(error = %e, "cannot record the cluster id");
                    false
                }
            },
        }
    }

    /// Every node was started with seeds and none of them created a cluster (no
    /// lone first node). Once the member tables had time to converge, the member
    /// with the smallest peer id creates the cluster id; its announcements and
    /// push-pulls hand it to the others.
    ///
    /// Only once a table was exchanged with a peer that has no cluster id
    /// either, and every connected peer is in the table: a peer just connected
    /// whose table has not arrived could be smaller, and two nodes each
    /// creating an id would split the cluster for good.
    fn create_cluster_if_smallest(&mut self) {
        if self.cluster.is_some()
            || self.connected == 0
            || self.epoch.elapsed() < CLUSTER_ID_GRACE
            || !self.met_peer_without_cluster
            || self.state.has_unknown_connection()
        {
            return;
        }
        let me = self.state.me().id.clone();
        let smallest = self
            .state
            .view(self.now())
            .iter()
            .filter(|m| m.record.status == MemberStatus::Alive)
            .all(|m| m.record.id >= me);
        if smallest {
            self.create_cluster();
        }
    }

    fn create_cluster(&mut self) {
        let id = format!("{:032x}", rand::random::<u128>());
        match self.store.create_cluster_id(&id) {
            Ok(()) => {
                tracing::info!(cluster = %id, "created a new cluster");
                self.cluster = Some(id);
                self.founder = true;
            }
            Err(e) => tracing::error!(error = %e, "cannot record the new cluster id"),
        }
    }

    fn valid_records(peer: &PeerId, records: Vec<MemberRecord>) -> Vec<MemberRecord> {
        records
            .into_iter()
            .filter(|r| {
                let ok = r.id.parse::<PeerId>().is_ok();
                if !ok {
                    tracing::warn!(%peer, id = %r.id, "ignoring a member record with an invalid peer id");
                }
                ok
            })
            .collect()
    }

    fn on_net_event(&mut self, ev: NetEvent) {
        let now = self.now();
        let effects = match ev {
            NetEvent::ListenAddr(addr) => {
                let mut addrs = self.state.me().addrs.clone();
                let a = addr.to_string();
                if !addrs.contains(&a) {
                    addrs.push(a);
                }
                self.state.set_addrs(now, announceable(addrs))
            }
            NetEvent::ConnectionUp { peer, .. } => {
                self.connected += 1;
                self.seed_redial = SEED_REDIAL_FIRST;
                self.state.on_connected(now, &peer.to_string())
            }
            NetEvent::ConnectionDown { peer } => {
                self.connected = self.connected.saturating_sub(1);
                self.state.on_disconnected(now, &peer.to_string())
            }
            NetEvent::DialFailed { peer, error } => {
                tracing::debug!(peer = ?peer, %error, "dial failed");
                match peer {
                    Some(p) => self.state.on_dial_failed(now, &p.to_string()),
                    None => vec![],
                }
            }
            NetEvent::Membership { source, msg } => match msg {
                MembershipGossip::Announce {
                    member,
                    beat,
                    cluster,
                } => {
                    self.metrics.announcements_received.inc();
                    if !self.same_cluster(&cluster) {
                        tracing::debug!(peer = %member.id, cluster = ?cluster,
                            "ignoring an announcement of another cluster");
                        vec![]
                    } else if member.id.parse::<PeerId>().is_err() {
                        tracing::warn!(%source, id = %member.id, "ignoring an announcement with an invalid peer id");
                        vec![]
                    } else {
                        self.state.on_announce(now, member, beat)
                    }
                }
                MembershipGossip::Claim {
                    subject,
                    incarnation,
                    status,
                    by,
                    ..
                } => {
                    self.metrics.claims_received.inc();
                    tracing::debug!(peer = %subject, by = %by, claimed = status.as_str(), incarnation, "claim received");
                    self.state.on_claim(now, &subject, incarnation, status)
                }
                MembershipGossip::Forget {
                    subject,
                    incarnation,
                } => {
                    if subject.parse::<PeerId>().is_err() {
                        tracing::warn!(%source, id = %subject, "ignoring a forget of an invalid peer id");
                        vec![]
                    } else {
                        self.state.on_forget(now, &subject, incarnation)
                    }
                }
                MembershipGossip::Joined { members, cluster } => {
                    tracing::debug!(%source, members = members.len(), "news of joined members");
                    // News often comes before this joining node's own push-pull
                    // has answered: like an announcement, it says its cluster.
                    if self.same_cluster(&cluster) {
                        self.state
                            .on_joined(now, Self::valid_records(&source, members))
                    } else {
                        vec![]
                    }
                }
            },
            NetEvent::MembershipSubscribed { .. } => self.state.on_peer_subscribed(now),
            NetEvent::Request {
                peer,
                request: Request::MembershipSync { cluster, members },
                reply,
            } => {
                if !self.accept_cluster(&peer, &cluster) {
                    self.net.send(NetCommand::Respond {
                        reply,
                        response: Response::Refused {
                            reason: format!(
                                "this node belongs to cluster {}",
                                self.cluster.as_deref().unwrap_or("?")
                            ),
                        },
                    });
                    return;
                }
                let fx = self.state.on_sync(now, Self::valid_records(&peer, members));
                self.net.send(NetCommand::Respond {
                    reply,
                    response: Response::MembershipSync {
                        cluster: self.cluster.clone(),
                        members: self.state.table(),
                    },
                });
                fx
            }
            NetEvent::Response {
                peer,
                response: Response::MembershipSync { cluster, members },
            } => {
                self.answer_forwarded_probes(&peer, true);
                if !self.accept_cluster(&peer, &cluster) {
                    return;
                }
                self.metrics.syncs.inc();
                self.state.on_sync(now, Self::valid_records(&peer, members))
            }
            NetEvent::Request {
                peer,
                request: Request::MembershipProbe { subject },
                reply,
            } => {
                self.forward_probe(peer, subject, reply);
                vec![]
            }
            NetEvent::Response {
                peer,
                response: Response::MembershipProbe { subject, reachable },
            } => {
                self.answer_forwarded_probes(&peer, true);
                self.state
                    .on_indirect_answer(now, &subject, &peer.to_string(), reachable)
            }
            NetEvent::Response {
                peer,
                response: Response::Refused { reason },
            } => {
                tracing::warn!(%peer, %reason, "peer refused a membership request");
                // It answered, so it is alive; but it will not answer a probe.
                self.answer_forwarded_probes(&peer, true);
                self.state.on_request_failed(now, &peer.to_string())
            }
            // Service requests and call responses never reach this stream; the
            // swarm routes them elsewhere.
            NetEvent::Request { reply, .. } => {
                self.net.send(NetCommand::Respond {
                    reply,
                    response: Response::Refused {
                        reason: "request not served by membership".into(),
                    },
                });
                vec![]
            }
            NetEvent::Response { .. } => vec![],
            NetEvent::RequestFailed { peer, error } => {
                tracing::debug!(%peer, %error, "request failed");
                self.answer_forwarded_probes(&peer, false);
                self.state.on_request_failed(now, &peer.to_string())
            }
            NetEvent::ProbesOk { peers } => peers
                .iter()
                .flat_map(|p| self.state.on_probe_ok(now, &p.to_string()))
                .collect(),
            NetEvent::ProbeFailed { peer, error } => {
                tracing::debug!(%peer, %error, "ping failed");
                vec![]
            }
            NetEvent::Identified {
                peer,
                listen_addrs,
                probes,
            } => {
                if probes {
                    self.probe_capable.insert(peer);
                } else {
                    self.probe_capable.remove(&peer);
                }
                self.state.on_identified(
                    &peer.to_string(),
                    listen_addrs.iter().map(|a| a.to_string()).collect(),
                )
            }
            NetEvent::Banned { peer } => {
                tracing::warn!(%peer, "peer banned for bad frames");
                vec![]
            }
        };
        self.run(effects);
    }
}

impl Actor for MembershipActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        if let Some(rx) = self.events.take() {
            ctx.add_stream(futures::stream::unfold(rx, |mut rx| async move {
                rx.recv().await.map(|e| (e, rx))
            }));
        }
        if self.cluster.is_none() && self.seeds.is_empty() && self.state.table().len() == 1 {
            self.create_cluster();
        }
        let now = self.now();
        let fx = self.state.start(now);
        self.run(fx);
        self.dial_seeds();
        // A stall before the first tick counts too (see `own_stall`).
        self.last_tick = Some(Instant::now());
        ctx.run_interval(TICK, |act, _| {
            if act.leaving {
                return;
            }
            let since = act.last_tick.map(|t| t.elapsed()).unwrap_or_default();
            let late = since > TICK * 10;
            act.last_tick = Some(Instant::now());
            if late {
                act.state
                    .own_stall(act.now(), since.saturating_sub(TICK).as_millis() as u64);
            }
            let fx = act.state.tick(act.now());
            if !late {
                act.disconnect_the_dead(&fx);
            }
            act.run(fx);
            if act.connected == 0
                && !act.seeds.is_empty()
                && act
                    .last_seed_dial
                    .is_none_or(|t| t.elapsed() >= act.seed_redial)
            {
                act.dial_seeds();
            }
            act.create_cluster_if_smallest();
            act.expire_forwarded_probes();
            act.flush();
            act.update_gauges();
        });
    }
}

impl StreamHandler<NetEvent> for MembershipActor {
    fn handle(&mut self, ev: NetEvent, _: &mut Self::Context) {
        if !self.leaving {
            self.on_net_event(ev);
        }
    }

    fn finished(&mut self, _: &mut Self::Context) {
        tracing::debug!("network event stream ended");
    }
}

impl Handler<GetNodeInfo> for MembershipActor {
    type Result = MessageResult<GetNodeInfo>;
    fn handle(&mut self, _: GetNodeInfo, _: &mut Self::Context) -> Self::Result {
        let me = self.state.me();
        MessageResult(NodeInfo {
            id: me.id.clone(),
            name: me.name.clone(),
            addrs: me.addrs.clone(),
            cluster: self.cluster.clone(),
            incarnation: me.incarnation,
            founder: self.founder,
        })
    }
}

impl Handler<ListMembers> for MembershipActor {
    type Result = MessageResult<ListMembers>;
    fn handle(&mut self, _: ListMembers, _: &mut Self::Context) -> Self::Result {
        MessageResult(self.state.view(self.now()))
    }
}

impl Handler<ForgetMember> for MembershipActor {
    type Result = Result<(), ForgetError>;
    fn handle(&mut self, msg: ForgetMember, _: &mut Self::Context) -> Self::Result {
        let fx = self.state.forget(&msg.0)?;
        self.run(fx);
        self.flush();
        Ok(())
    }
}

impl Handler<Leave> for MembershipActor {
    type Result = ResponseActFuture<Self, ()>;
    fn handle(&mut self, _: Leave, _: &mut Self::Context) -> Self::Result {
        let now = self.now();
        let fx = self.state.leave(now);
        tracing::info!(
            incarnation = self.state.me().incarnation,
            "leaving the cluster"
        );
        self.run(fx);
        self.leaving = true;
        self.flush();
        Box::pin(actix::clock::sleep(Duration::from_millis(300)).into_actor(self))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn loopback_addresses_are_announced_only_when_there_is_nothing_else() {
        let v = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            super::announceable(v(&["/ip4/127.0.0.1/tcp/7700", "/ip4/10.0.0.5/tcp/7700"])),
            v(&["/ip4/10.0.0.5/tcp/7700"])
        );
        assert_eq!(
            super::announceable(v(&["/ip4/127.0.0.2/tcp/7700", "/ip6/::1/tcp/7700"])),
            v(&["/ip4/127.0.0.2/tcp/7700", "/ip6/::1/tcp/7700"])
        );
    }
}
