//! The membership protocol as a plain state machine: events in, effects out, time
//! passed in by the caller. No sockets, no clock, no disk.
//!
//! Liveness is judged by each node from its own evidence (a ping answered on the
//! direct connection, a fresh announcement heard through gossip):
//! - `alive → suspect` after `suspect_timeout_ms` without evidence, or at once when
//!   the connection is gone and a redial failed;
//! - `→ dead` after `dead_timeout_ms` without evidence (a hung or cut-off
//!   process), or once the member has stayed unreachable for
//!   `unreachable_confirm_ms`: its connection closed and redials keep failing (a
//!   crashed process: the kernel closed its sockets and refuses connections). A
//!   paused process still accepts TCP, so a pause never takes that fast path
//!   (its connections close after 3 s only if its receive buffers fill: the
//!   swarm's `TCP_USER_TIMEOUT`; redials then wait out the handshake). Nor does a member that only this node cannot reach:
//!   before taking it, up to `INDIRECT_PROBE_FANOUT` connected members are asked
//!   to reach it (SWIM's indirect probe), and one that does vouches for it;
//! - suspicion stays this node's own opinion; death is gossiped as a claim that
//!   every node adopts, and the subject refutes it by announcing a higher
//!   incarnation, which outranks every claim about an older one;
//! - `left` is announced by the member itself on a graceful shutdown.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use kiln_net::wire::{MemberRecord, MemberStatus, MembershipGossip};

/// Timing of the membership protocol. Every field is also a configuration key.
#[derive(Debug, Clone)]
pub struct MembershipConfig {
    pub announce_interval_ms: u64,
    pub suspect_timeout_ms: u64,
    pub dead_timeout_ms: u64,
    pub redial_interval_ms: u64,
    /// How long a member must stay unreachable (connection closed, redials failing)
    /// before it is declared dead without waiting for `dead_timeout_ms`.
    pub unreachable_confirm_ms: u64,
    /// How often a dead member is dialled again, so that a healed partition reunites.
    pub dead_redial_interval_ms: u64,
    pub dead_member_ttl_ms: u64,
}

impl Default for MembershipConfig {
    fn default() -> Self {
        MembershipConfig {
            announce_interval_ms: 3000,
            suspect_timeout_ms: 3000,
            dead_timeout_ms: 6000,
            redial_interval_ms: 500,
            unreachable_confirm_ms: 500,
            // Was 10 s. A dial every 3 s costs nothing. (What held a node cut
            // off past `dead_timeout_ms` `dead` 2–6 s after the heal was its
            // stalled connection, not this: see the swarm's
            // `UNACKNOWLEDGED_TIMEOUT`.)
            dead_redial_interval_ms: 3_000,
            dead_member_ttl_ms: 86_400_000,
        }
    }
}

/// The time of an event: monotonic milliseconds for timeouts, Unix milliseconds
/// for what is shown and persisted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Now {
    pub mono_ms: u64,
    pub unix_ms: u64,
}

/// What the state machine asks its actor to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    Publish(MembershipGossip),
    Dial {
        id: String,
        addrs: Vec<String>,
    },
    /// Push-pull: send our member table to `id` and merge its answer.
    Sync {
        id: String,
    },
    /// Ask each of `via` whether it can reach `subject`, which this node cannot;
    /// the answers come back through `on_indirect_answer`.
    ProbeIndirectly {
        subject: String,
        via: Vec<String>,
    },
    /// Our incarnation went up (refutation); it must survive a restart.
    PersistIncarnation(u64),
    StatusChanged {
        id: String,
        from: Option<MemberStatus>,
        to: MemberStatus,
        incarnation: u64,
    },
    Suspected {
        id: String,
    },
    DeclaredDead {
        id: String,
    },
    Refuted {
        incarnation: u64,
    },
    /// This node cannot reach `id` but `via` can: the path between the two is
    /// broken, not the member.
    ReachedIndirectly {
        id: String,
        via: String,
    },
    Forgotten {
        id: String,
        incarnation: u64,
    },
}

/// One known member, with this node's view of its liveness.
#[derive(Debug, Clone)]
pub struct Member {
    pub record: MemberRecord,
    /// Monotonic ms of the last evidence of life; `None` if never heard this run.
    pub last_heard_ms: Option<u64>,
    pub status_since_unix_ms: u64,
    pub connected: bool,
    /// This node has had a direct connection to the member during this run. Until
    /// then, the member only gets suspect after `dead_timeout_ms`: right after it
    /// is learnt of (many nodes starting at once) connecting may take a while.
    pub ever_connected: bool,
    /// Since when the connection is gone and redials fail (monotonic ms).
    pub unreachable_since_ms: Option<u64>,
    last_beat: u64,
    last_dial_ms: Option<u64>,
    /// When we last re-told this member a claim about itself it has not refuted.
    last_reclaim_ms: Option<u64>,
    /// A first connection to it has been attempted.
    first_dial_tried: bool,
    /// Members asked to reach it for us, and since when; while any has not
    /// answered, the fast path to `dead` waits.
    indirect_probe: Option<IndirectProbe>,
    /// Since when another member reaches it for us while we cannot (monotonic
    /// ms); cleared by a direct connection.
    reached_indirectly_ms: Option<u64>,
    /// When others were last asked to reach it (monotonic ms).
    last_indirect_probe_ms: Option<u64>,
}

#[derive(Debug, Clone)]
struct IndirectProbe {
    started_ms: u64,
    waiting: BTreeSet<String>,
}

impl Member {
    /// A round of indirect probes ended without anyone reaching it. If others
    /// vouched for it until now, it is unreachable from this moment: the fast
    /// path to `dead` applies again.
    fn nobody_reached(&mut self, now: Now) {
        self.indirect_probe = None;
        if self.reached_indirectly_ms.take().is_some() && !self.connected {
            self.unreachable_since_ms.get_or_insert(now.mono_ms);
        }
    }
}

/// A row of the member table as shown to operators.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberView {
    pub record: MemberRecord,
    /// Unix ms of the last evidence of life (for this node itself: now).
    pub last_seen_unix_ms: Option<u64>,
    pub is_self: bool,
    /// This node holds a direct connection to it (always true for itself).
    pub connected: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ForgetError {
    #[error("member {0} is not known")]
    Unknown(String),
    #[error("member {id} is {}; only dead or left members can be forgotten", status.as_str())]
    NotGone { id: String, status: MemberStatus },
    #[error("a node cannot forget itself")]
    IsSelf,
}

/// News of a member (new, or a new life) learnt while connected to it, which
/// makes it first-hand: passed on to every peer at once. A node that just joined
/// is then known cluster-wide as soon as the node it joined through has met it,
/// without waiting for the gossipsub mesh to form or for its own next
/// announcement. Identical news from two nodes is one gossipsub message.
fn pass_on(rec: &MemberRecord) -> Effect {
    Effect::Publish(MembershipGossip::Joined {
        members: vec![rec.clone()],
        cluster: None,
    })
}

/// How long the member with the larger id waits for the other to dial before
/// it dials itself (a first connection only; a lost one is redialled at once by
/// both, since that is how a crash is noticed).
const FIRST_DIAL_GRACE_MS: u64 = 2000;

/// Anti-entropy push-pulls: every `ANTI_ENTROPY_JOINING_MS` during the first
/// `JOINING_MS` after start, every `ANTI_ENTROPY_MS` after.
const JOINING_MS: u64 = 5_000;
const ANTI_ENTROPY_JOINING_MS: u64 = 250;
const ANTI_ENTROPY_MS: u64 = 10_000;

/// Pace of first connections (see `Membership::take_first_dial`).
const FIRST_DIAL_SPACING_MS: u64 = 100;
const FIRST_DIAL_BURST: u64 = 4;

/// Members asked at once to reach a member this node cannot, and how long their
/// answers are waited for (a member that asks the subject itself answers well
/// within it; one that does not answer counts as "cannot reach").
pub const INDIRECT_PROBE_FANOUT: usize = 3;
pub const INDIRECT_PROBE_TIMEOUT_MS: u64 = 2_000;

/// Incarnations above this are refused from peers: a member raises its
/// incarnation once per restart or refutation, so a real one never gets near it,
/// and one at `u64::MAX` could never be outranked.
pub const MAX_INCARNATION: u64 = u64::MAX / 2;

fn rank(s: MemberStatus) -> u8 {
    match s {
        MemberStatus::Alive => 0,
        MemberStatus::Suspect => 1,
        MemberStatus::Dead => 2,
        MemberStatus::Left => 3,
    }
}

fn gone(s: MemberStatus) -> bool {
    matches!(s, MemberStatus::Dead | MemberStatus::Left)
}

pub struct Membership {
    me: MemberRecord,
    beat: u64,
    last_announce_ms: Option<u64>,
    members: BTreeMap<String, Member>,
    forgotten: HashMap<String, u64>,
    /// Peers with a live connection, members or not yet: a member learnt of after
    /// its connection came up must still count as connected.
    connected: BTreeSet<String>,
    dirty: BTreeSet<String>,
    cfg: MembershipConfig,
    /// When the next first connection may be opened (monotonic ms, a GCRA).
    next_first_dial_ms: u64,
    /// When this node started (monotonic ms) and last ran an anti-entropy push-pull.
    started_ms: u64,
    last_anti_entropy_ms: u64,
    anti_entropy_turn: usize,
    probe_turn: usize,
}

impl Membership {
    /// `me` is this node at its (already raised) incarnation; `known` what was persisted.
    pub fn new(
        me: MemberRecord,
        known: Vec<(MemberRecord, u64)>,
        forgotten: Vec<(String, u64)>,
        cfg: MembershipConfig,
    ) -> Self {
        let mut members = BTreeMap::new();
        for (record, status_since_unix_ms) in known {
            if record.id == me.id {
                continue;
            }
            members.insert(
                record.id.clone(),
                Member {
                    record,
                    last_heard_ms: None,
                    status_since_unix_ms,
                    connected: false,
                    ever_connected: false,
                    unreachable_since_ms: None,
                    last_beat: 0,
                    last_dial_ms: None,
                    last_reclaim_ms: None,
                    first_dial_tried: false,
                    indirect_probe: None,
                    reached_indirectly_ms: None,
                    last_indirect_probe_ms: None,
                },
            );
        }
        Membership {
            me,
            beat: 0,
            last_announce_ms: None,
            members,
            forgotten: forgotten.into_iter().collect(),
            connected: BTreeSet::new(),
            dirty: BTreeSet::new(),
            cfg,
            next_first_dial_ms: 0,
            started_ms: 0,
            last_anti_entropy_ms: 0,
            anti_entropy_turn: 0,
            probe_turn: 0,
        }
    }

    pub fn me(&self) -> &MemberRecord {
        &self.me
    }

    pub fn member(&self, id: &str) -> Option<&Member> {
        self.members.get(id)
    }

    /// Ids of members whose persisted record changed since the last call.
    pub fn take_dirty(&mut self) -> Vec<(MemberRecord, u64)> {
        let ids = std::mem::take(&mut self.dirty);
        ids.into_iter()
            .filter_map(|id| self.members.get(&id))
            .map(|m| (m.record.clone(), m.status_since_unix_ms))
            .collect()
    }

    /// The table this node sends in a push-pull sync, itself included.
    /// A local suspicion is sent as `alive`: it is this node's opinion only.
    pub fn table(&self) -> Vec<MemberRecord> {
        std::iter::once(self.me.clone())
            .chain(self.members.values().map(|m| {
                let mut r = m.record.clone();
                if r.status == MemberStatus::Suspect {
                    r.status = MemberStatus::Alive;
                }
                r
            }))
            .collect()
    }

    pub fn view(&self, now: Now) -> Vec<MemberView> {
        let mut rows = vec![MemberView {
            record: self.me.clone(),
            last_seen_unix_ms: Some(now.unix_ms),
            is_self: true,
            connected: true,
        }];
        rows.extend(self.members.values().map(|m| {
            MemberView {
                record: m.record.clone(),
                last_seen_unix_ms: m
                    .last_heard_ms
                    .map(|h| now.unix_ms.saturating_sub(now.mono_ms.saturating_sub(h))),
                is_self: false,
                connected: m.connected,
            }
        }));
        rows
    }

    /// Count of members (this node included) by status.
    pub fn counts(&self) -> [(MemberStatus, usize); 4] {
        let mut c = [
            (MemberStatus::Alive, 0),
            (MemberStatus::Suspect, 0),
            (MemberStatus::Dead, 0),
            (MemberStatus::Left, 0),
        ];
        for s in
            std::iter::once(self.me.status).chain(self.members.values().map(|m| m.record.status))
        {
            c[rank(s) as usize].1 += 1;
        }
        c
    }

    /// Addresses to dial at start: every member not known to be gone.
    pub fn start(&mut self, now: Now) -> Vec<Effect> {
        self.started_ms = now.mono_ms;
        self.last_anti_entropy_ms = now.mono_ms;
        let mut out = Vec::new();
        for m in self.members.values_mut() {
            if !gone(m.record.status) {
                // Grace: what we knew before the restart counts as heard just now.
                m.last_heard_ms = Some(now.mono_ms);
                m.last_dial_ms = Some(now.mono_ms);
                out.push(Effect::Dial {
                    id: m.record.id.clone(),
                    addrs: m.record.addrs.clone(),
                });
            }
        }
        out.extend(self.announce(now));
        out
    }

    /// This node's listen addresses changed.
    pub fn set_addrs(&mut self, now: Now, addrs: Vec<String>) -> Vec<Effect> {
        if addrs == self.me.addrs {
            return vec![];
        }
        self.me.addrs = addrs;
        self.announce(now)
    }

    fn announce(&mut self, now: Now) -> Vec<Effect> {
        self.beat += 1;
        self.last_announce_ms = Some(now.mono_ms);
        vec![Effect::Publish(MembershipGossip::Announce {
            member: self.me.clone(),
            beat: self.beat,
            // The actor, which owns the cluster id, fills it in.
            cluster: None,
        })]
    }

    fn set_status(&mut self, now: Now, id: &str, to: MemberStatus, out: &mut Vec<Effect>) {
        let Some(m) = self.members.get_mut(id) else {
            return;
        };
        if m.record.status == to {
            return;
        }
        let from = m.record.status;
        m.record.status = to;
        m.status_since_unix_ms = now.unix_ms;
        self.dirty.insert(id.to_string());
        out.push(Effect::StatusChanged {
            id: id.to_string(),
            from: Some(from),
            to,
            incarnation: m.record.incarnation,
        });
    }

    /// A claim or table says something about this node: refute what is not true.
    fn about_me(&mut self, now: Now, incarnation: u64, status: MemberStatus) -> Vec<Effect> {
        // Any claim at or above our incarnation is refuted, and so is our own
        // record at a higher incarnation (our stored incarnation was lost): others
        // would otherwise ignore our announcements as old news.
        let outdated = if status == MemberStatus::Alive {
            incarnation > self.me.incarnation
        } else {
            incarnation >= self.me.incarnation
        };
        if !outdated || incarnation > MAX_INCARNATION {
            return vec![];
        }
        if self.me.status == MemberStatus::Left {
            return vec![];
        }
        self.me.incarnation = incarnation + 1;
        tracing::info!(
            incarnation = self.me.incarnation, claimed = ?status,
            "refuting a claim about this node with a higher incarnation"
        );
        let mut out = vec![
            Effect::PersistIncarnation(self.me.incarnation),
            Effect::Refuted {
                incarnation: self.me.incarnation,
            },
        ];
        out.extend(self.announce(now));
        out
    }

    /// Merges a record learnt from an announcement (`beat` = Some, evidence of life)
    /// or from a peer's table (`beat` = None, hearsay).
    fn merge(&mut self, now: Now, mut rec: MemberRecord, beat: Option<u64>) -> Vec<Effect> {
        if rec.incarnation > MAX_INCARNATION {
            // No member restarts or refutes that often: a broken or hostile
            // peer. Taking it would leave the member unable to ever outrank it.
            return vec![];
        }
        if rec.status == MemberStatus::Suspect {
            // Suspicion is each node's own opinion, never taken from others.
            rec.status = MemberStatus::Alive;
        }
        if rec.id == self.me.id {
            return self.about_me(now, rec.incarnation, rec.status);
        }
        if self
            .forgotten
            .get(&rec.id)
            .is_some_and(|inc| rec.incarnation <= *inc)
        {
            return vec![];
        }
        let mut out = Vec::new();
        let Some(m) = self.members.get_mut(&rec.id) else {
            // A new member. Hearsay about a gone member is kept for the record only.
            let status = rec.status;
            let id = rec.id.clone();
            let live = !gone(status);
            let connected = self.connected.contains(&id);
            // Nobody is dialled the moment it is learnt of: the first
            // connection waits `redial_interval_ms`, and keeps to a pace (see
            // `take_first_dial`). When many nodes join at once, a storm of
            // handshakes otherwise delayed the push-pulls and gossip that spread
            // the news of the join itself. Both sides usually learn of each
            // other at once; if both dialled, every pair would hold two
            // connections, so the side with the larger id waits
            // `FIRST_DIAL_GRACE_MS` for the other.
            // (A member learnt of as dead waits `dead_redial_interval_ms`.)
            let last_dial_ms = Some(now.mono_ms);
            out.push(Effect::StatusChanged {
                id: id.clone(),
                from: None,
                to: status,
                incarnation: rec.incarnation,
            });
            if live && connected {
                out.push(pass_on(&rec));
            }
            self.members.insert(
                id.clone(),
                Member {
                    record: rec,
                    last_heard_ms: live.then_some(now.mono_ms),
                    status_since_unix_ms: now.unix_ms,
                    connected,
                    ever_connected: connected,
                    unreachable_since_ms: None,
                    last_beat: beat.unwrap_or(0),
                    last_dial_ms,
                    last_reclaim_ms: None,
                    first_dial_tried: false,
                    indirect_probe: None,
                    reached_indirectly_ms: None,
                    last_indirect_probe_ms: None,
                },
            );
            self.forgotten.remove(&id);
            self.dirty.insert(id);
            return out;
        };
        let id = rec.id.clone();
        if rec.incarnation > m.record.incarnation {
            // A newer life of the member outranks everything said of an older one.
            let from = m.record.status;
            let revived = gone(from) && !gone(rec.status);
            if m.connected && !gone(rec.status) {
                out.push(pass_on(&rec));
            }
            m.record = rec;
            m.status_since_unix_ms = now.unix_ms;
            m.last_beat = beat.unwrap_or(0);
            if beat.is_some() || revived {
                m.last_heard_ms = Some(now.mono_ms);
                m.unreachable_since_ms = None;
            }
            self.dirty.insert(id.clone());
            if from != m.record.status {
                out.push(Effect::StatusChanged {
                    id: id.clone(),
                    from: Some(from),
                    to: m.record.status,
                    incarnation: m.record.incarnation,
                });
            }
            if revived && !m.connected {
                m.last_dial_ms = Some(now.mono_ms);
                out.push(Effect::Dial {
                    id,
                    addrs: m.record.addrs.clone(),
                });
            }
            return out;
        }
        if rec.incarnation < m.record.incarnation {
            return out;
        }
        // Same incarnation.
        if let Some(b) = beat {
            if b > m.last_beat {
                m.last_beat = b;
                m.last_heard_ms = Some(now.mono_ms);
                if m.record.addrs != rec.addrs && !rec.addrs.is_empty() {
                    m.record.addrs = rec.addrs.clone();
                    self.dirty.insert(id.clone());
                }
                if gone(m.record.status) {
                    // It announces itself but we hold it dead or left at this very
                    // incarnation: tell it, so it refutes (rate-limited).
                    let due = m.last_reclaim_ms.is_none_or(|t| {
                        now.mono_ms.saturating_sub(t) >= self.cfg.announce_interval_ms
                    });
                    if due && m.record.status == MemberStatus::Dead {
                        m.last_reclaim_ms = Some(now.mono_ms);
                        out.push(Effect::Publish(MembershipGossip::Claim {
                            subject: id.clone(),
                            incarnation: m.record.incarnation,
                            status: MemberStatus::Dead,
                            by: self.me.id.clone(),
                            sent_ms: now.unix_ms,
                        }));
                    }
                } else if m.record.status == MemberStatus::Suspect {
                    // Our own fresh evidence clears our own suspicion.
                    self.set_status(now, &id, MemberStatus::Alive, &mut out);
                }
            }
            return out;
        }
        // Hearsay at the same incarnation: only death and departure are adopted;
        // a suspicion is each node's own opinion.
        if gone(rec.status) && rank(rec.status) > rank(m.record.status) {
            self.set_status(now, &id, rec.status, &mut out);
        }
        out
    }

    pub fn on_announce(&mut self, now: Now, member: MemberRecord, beat: u64) -> Vec<Effect> {
        self.merge(now, member, Some(beat))
    }

    pub fn on_claim(
        &mut self,
        now: Now,
        subject: &str,
        incarnation: u64,
        status: MemberStatus,
    ) -> Vec<Effect> {
        if incarnation > MAX_INCARNATION {
            return vec![];
        }
        if subject == self.me.id {
            return self.about_me(now, incarnation, status);
        }
        let mut out = Vec::new();
        let Some(m) = self.members.get(subject) else {
            return out;
        };
        if incarnation != m.record.incarnation || status == MemberStatus::Alive {
            return out;
        }
        if gone(status) && rank(status) > rank(m.record.status) {
            self.set_status(now, subject, status, &mut out);
        }
        out
    }

    pub fn on_forget(&mut self, now: Now, subject: &str, incarnation: u64) -> Vec<Effect> {
        if incarnation > MAX_INCARNATION {
            // As in `merge`: such a tombstone would shut the member out for good.
            return vec![];
        }
        if subject == self.me.id {
            return self.about_me(now, incarnation, MemberStatus::Dead);
        }
        let mut out = Vec::new();
        if let Some(m) = self.members.get(subject) {
            if m.record.incarnation <= incarnation && gone(m.record.status) {
                self.members.remove(subject);
                out.push(Effect::Forgotten {
                    id: subject.to_string(),
                    incarnation,
                });
            }
        }
        let inc = self
            .forgotten
            .entry(subject.to_string())
            .or_insert(incarnation);
        *inc = (*inc).max(incarnation);
        out
    }

    /// Push-pull: merge a peer's table.
    pub fn on_sync(&mut self, now: Now, table: Vec<MemberRecord>) -> Vec<Effect> {
        table
            .into_iter()
            .flat_map(|rec| self.merge(now, rec, None))
            .collect()
    }

    /// Members another node passed on (`Joined`): hearsay like any table.
    pub fn on_joined(&mut self, now: Now, members: Vec<MemberRecord>) -> Vec<Effect> {
        self.on_sync(now, members)
    }

    /// A peer subscribed to the membership topic: a publish now reaches it. A
    /// node that just connected announces itself at once (not at its next
    /// interval), so that gossip spreads the news while connections are still
    /// being made; at most every 500 ms, so that many subscriptions at once do not
    /// turn into many announcements.
    pub fn on_peer_subscribed(&mut self, now: Now) -> Vec<Effect> {
        if self.me.status == MemberStatus::Left {
            return vec![];
        }
        // The announcement made at start (beat 1) reached nobody, so it does not count.
        let recent = self
            .last_announce_ms
            .is_some_and(|t| now.mono_ms.saturating_sub(t) < 500)
            && self.beat > 1;
        if recent {
            return vec![];
        }
        self.announce(now)
    }

    /// identify told us where a peer listens: fills in the addresses of a member
    /// known without any (learnt from a table sent before its listener was up).
    pub fn on_identified(&mut self, id: &str, addrs: Vec<String>) -> Vec<Effect> {
        if let Some(m) = self.members.get_mut(id) {
            if m.record.addrs.is_empty() && !addrs.is_empty() {
                m.record.addrs = addrs;
                self.dirty.insert(id.to_string());
            }
        }
        vec![]
    }

    /// This node itself stood still (paused, or starved of CPU) for
    /// `stalled_ms` before `now`: the silence it measured meanwhile is its
    /// own, not its peers'. Left out of every member's silence, so that it
    /// neither suspects nor declares dead every member at once when it
    /// resumes (each would have to refute it); the silence before the stall
    /// still counts, so frequent stalls do not hide a dead member.
    pub fn own_stall(&mut self, now: Now, stalled_ms: u64) {
        let shift = |t: &mut Option<u64>| {
            if let Some(t) = t.as_mut() {
                *t = t.saturating_add(stalled_ms).min(now.mono_ms);
            }
        };
        for m in self.members.values_mut() {
            shift(&mut m.last_heard_ms);
            shift(&mut m.unreachable_since_ms);
        }
    }

    pub fn on_probe_ok(&mut self, now: Now, id: &str) -> Vec<Effect> {
        let mut out = Vec::new();
        if let Some(m) = self.members.get_mut(id) {
            m.last_heard_ms = Some(now.mono_ms);
            m.unreachable_since_ms = None;
            if m.record.status == MemberStatus::Suspect {
                self.set_status(now, id, MemberStatus::Alive, &mut out);
            }
        }
        out
    }

    /// Whether a first connection may be opened now: at most one every
    /// `FIRST_DIAL_SPACING_MS`, in bursts of up to `FIRST_DIAL_BURST`. What the
    /// cluster knows does not wait for connections (news spreads by gossip and
    /// push-pull); only the full mesh builds up over a few seconds.
    fn take_first_dial(&mut self, now: Now) -> bool {
        let due = self.next_first_dial_ms.max(now.mono_ms);
        if due > now.mono_ms + (FIRST_DIAL_BURST - 1) * FIRST_DIAL_SPACING_MS {
            return false;
        }
        self.next_first_dial_ms = due + FIRST_DIAL_SPACING_MS;
        true
    }

    /// Of two members that learn of each other, the one with the smaller id
    /// dials; the same rule picks the side that starts push-pull.
    fn dials_first(&self, id: &str) -> bool {
        self.me.id.as_str() < id
    }

    /// Whether a connected peer is not in the member table yet (its table or
    /// announcement has not arrived): who is smallest is not known until it is.
    pub fn has_unknown_connection(&self) -> bool {
        self.connected
            .iter()
            .any(|id| !self.members.contains_key(id))
    }

    pub fn on_connected(&mut self, now: Now, id: &str) -> Vec<Effect> {
        self.connected.insert(id.to_string());
        if let Some(m) = self.members.get_mut(id) {
            m.connected = true;
            m.ever_connected = true;
            m.unreachable_since_ms = None;
            m.indirect_probe = None;
            m.reached_indirectly_ms = None;
            if !gone(m.record.status) {
                m.last_heard_ms = Some(now.mono_ms);
            }
        }
        // Push-pull once per connection, not twice: the side with the smaller id
        // sends its table, the other answers with its own. Both sides agree on who
        // that is whichever way the connection was dialled.
        if self.dials_first(id) {
            vec![Effect::Sync { id: id.to_string() }]
        } else {
            vec![]
        }
    }

    pub fn on_disconnected(&mut self, now: Now, id: &str) -> Vec<Effect> {
        self.connected.remove(id);
        let Some(m) = self.members.get_mut(id) else {
            return vec![];
        };
        m.connected = false;
        if gone(m.record.status) {
            return vec![];
        }
        m.last_dial_ms = Some(now.mono_ms);
        vec![Effect::Dial {
            id: id.to_string(),
            addrs: m.record.addrs.clone(),
        }]
    }

    pub fn on_dial_failed(&mut self, now: Now, id: &str) -> Vec<Effect> {
        let mut out = Vec::new();
        let Some(m) = self.members.get_mut(id) else {
            return out;
        };
        if m.connected || gone(m.record.status) {
            return out;
        }
        // Reached through others: this failure says nothing new about the
        // member, only about the path from here. The vouching stands until a
        // round of asking finds nobody who reaches it.
        let vouched = m.reached_indirectly_ms.is_some();
        if vouched {
            return out;
        }
        m.unreachable_since_ms.get_or_insert(now.mono_ms);
        let probing = m.indirect_probe.is_some();
        if m.record.status == MemberStatus::Alive {
            self.suspect(now, id, &mut out);
        }
        if !probing {
            out.extend(self.probe_indirectly(now, id));
        }
        out
    }

    /// Asks up to `INDIRECT_PROBE_FANOUT` connected live members, in turn, to
    /// reach `subject`. With none to ask, nothing is sent and the fast path is
    /// taken as before (a two-node cluster, say).
    fn probe_indirectly(&mut self, now: Now, subject: &str) -> Option<Effect> {
        let candidates: Vec<String> = self
            .members
            .iter()
            .filter(|(id, m)| m.connected && !gone(m.record.status) && id.as_str() != subject)
            .map(|(id, _)| id.clone())
            .collect();
        if candidates.is_empty() {
            return None;
        }
        let start = self.probe_turn % candidates.len();
        self.probe_turn = self.probe_turn.wrapping_add(1);
        let via: Vec<String> = candidates
            .iter()
            .cycle()
            .skip(start)
            .take(INDIRECT_PROBE_FANOUT.min(candidates.len()))
            .cloned()
            .collect();
        let m = self.members.get_mut(subject)?;
        m.last_indirect_probe_ms = Some(now.mono_ms);
        m.indirect_probe = Some(IndirectProbe {
            started_ms: now.mono_ms,
            waiting: via.iter().cloned().collect(),
        });
        Some(Effect::ProbeIndirectly {
            subject: subject.to_string(),
            via,
        })
    }

    /// `from` answered whether it reached `subject` for us.
    pub fn on_indirect_answer(
        &mut self,
        now: Now,
        subject: &str,
        from: &str,
        reachable: bool,
    ) -> Vec<Effect> {
        let mut out = Vec::new();
        let Some(m) = self.members.get_mut(subject) else {
            return out;
        };
        let Some(probe) = m.indirect_probe.as_mut() else {
            return out;
        };
        if !probe.waiting.remove(from) {
            return out;
        }
        if !reachable {
            if probe.waiting.is_empty() {
                m.nobody_reached(now);
            }
            return out;
        }
        m.indirect_probe = None;
        if gone(m.record.status) || m.connected {
            return out;
        }
        // Alive, and reachable by others: only the path from here is broken.
        let first = m.reached_indirectly_ms.is_none();
        m.reached_indirectly_ms = Some(now.mono_ms);
        m.last_heard_ms = Some(now.mono_ms);
        m.unreachable_since_ms = None;
        if first {
            out.push(Effect::ReachedIndirectly {
                id: subject.to_string(),
                via: from.to_string(),
            });
        }
        if m.record.status == MemberStatus::Suspect {
            self.set_status(now, subject, MemberStatus::Alive, &mut out);
        }
        out
    }

    /// A request to `peer` failed: it will not answer the indirect probes it
    /// was asked for.
    pub fn on_request_failed(&mut self, now: Now, peer: &str) -> Vec<Effect> {
        let subjects: Vec<String> = self
            .members
            .iter()
            .filter(|(_, m)| {
                m.indirect_probe
                    .as_ref()
                    .is_some_and(|p| p.waiting.contains(peer))
            })
            .map(|(id, _)| id.clone())
            .collect();
        subjects
            .iter()
            .flat_map(|s| self.on_indirect_answer(now, s, peer, false))
            .collect()
    }

    /// Suspicion is this node's own opinion and is not gossiped: others judge by
    /// their own evidence, and a gossiped suspicion would only make the subject
    /// raise its incarnation, which under load (many nodes, two cores) turns into
    /// a storm of claims and refutations.
    fn suspect(&mut self, now: Now, id: &str, out: &mut Vec<Effect>) {
        self.set_status(now, id, MemberStatus::Suspect, out);
        out.push(Effect::Suspected { id: id.to_string() });
    }

    /// Anti-entropy: a push-pull with the next connected member in turn, often
    /// while this node is new, seldom after. Gossip sent while a joining node's
    /// subscription had not yet reached its peers never reaches it; this
    /// catches it up within `ANTI_ENTROPY_JOINING_MS`.
    fn anti_entropy(&mut self, now: Now) -> Option<Effect> {
        let joining = now.mono_ms.saturating_sub(self.started_ms) < JOINING_MS;
        let every = if joining {
            ANTI_ENTROPY_JOINING_MS
        } else {
            ANTI_ENTROPY_MS
        };
        if now.mono_ms.saturating_sub(self.last_anti_entropy_ms) < every {
            return None;
        }
        let peers: Vec<&String> = self
            .members
            .iter()
            .filter(|(_, m)| m.connected)
            .map(|(id, _)| id)
            .collect();
        if peers.is_empty() {
            return None;
        }
        let id = peers[self.anti_entropy_turn % peers.len()].clone();
        self.anti_entropy_turn = self.anti_entropy_turn.wrapping_add(1);
        self.last_anti_entropy_ms = now.mono_ms;
        Some(Effect::Sync { id })
    }

    /// Timers: announce, anti-entropy, suspect, declare dead, redial, forget after
    /// the TTL.
    pub fn tick(&mut self, now: Now) -> Vec<Effect> {
        let mut out = Vec::new();
        out.extend(self.anti_entropy(now));
        if self.me.status != MemberStatus::Left
            && self
                .last_announce_ms
                .is_none_or(|t| now.mono_ms.saturating_sub(t) >= self.cfg.announce_interval_ms)
        {
            out.extend(self.announce(now));
        }
        let ids: Vec<String> = self.members.keys().cloned().collect();
        // First connections due: (tried before, id).
        let mut first_dials: Vec<(bool, String)> = Vec::new();
        for id in ids {
            let Some(m) = self.members.get(&id) else {
                continue;
            };
            let status = m.record.status;
            let silence = m
                .last_heard_ms
                .map(|h| now.mono_ms.saturating_sub(h))
                .unwrap_or(u64::MAX);
            let probe_expired = m.indirect_probe.as_ref().is_some_and(|p| {
                now.mono_ms.saturating_sub(p.started_ms) >= INDIRECT_PROBE_TIMEOUT_MS
            });
            if probe_expired {
                if let Some(m) = self.members.get_mut(&id) {
                    m.nobody_reached(now);
                }
            }
            // A member reached only through others is asked after often
            // enough that its silence never reaches `suspect_timeout_ms`:
            // announcements alone (one every `announce_interval_ms`, relayed)
            // would leave it suspect between two, and dead after one lost.
            let Some(m) = self.members.get(&id) else {
                continue;
            };
            let reprobe_due = m.reached_indirectly_ms.is_some()
                && !m.connected
                && !gone(status)
                && m.indirect_probe.is_none()
                && m.last_indirect_probe_ms.is_none_or(|t| {
                    now.mono_ms.saturating_sub(t) >= self.cfg.suspect_timeout_ms / 2
                });
            if reprobe_due {
                out.extend(self.probe_indirectly(now, &id));
            }
            let Some(m) = self.members.get(&id) else {
                continue;
            };
            if !gone(status) {
                let dead = silence >= self.cfg.dead_timeout_ms
                    || (!m.connected
                        && m.indirect_probe.is_none()
                        && m.unreachable_since_ms.is_some_and(|t| {
                            now.mono_ms.saturating_sub(t) >= self.cfg.unreachable_confirm_ms
                        }));
                if dead {
                    let inc = m.record.incarnation;
                    self.set_status(now, &id, MemberStatus::Dead, &mut out);
                    out.push(Effect::DeclaredDead { id: id.clone() });
                    out.push(Effect::Publish(MembershipGossip::Claim {
                        subject: id.clone(),
                        incarnation: inc,
                        status: MemberStatus::Dead,
                        by: self.me.id.clone(),
                        sent_ms: now.unix_ms,
                    }));
                } else if status == MemberStatus::Alive
                    && m.ever_connected
                    && silence >= self.cfg.suspect_timeout_ms
                {
                    self.suspect(now, &id, &mut out);
                }
            }
            let dials_first = self.dials_first(&id);
            let Some(m) = self.members.get(&id) else {
                continue;
            };
            let status = m.record.status;
            if !m.connected && status != MemberStatus::Left {
                // A member others reach for us is tried seldom: the path from
                // here is what is broken, and that rarely mends in a second.
                let every = if status == MemberStatus::Dead || m.reached_indirectly_ms.is_some() {
                    self.cfg.dead_redial_interval_ms
                } else {
                    self.cfg.redial_interval_ms
                };
                let first = !m.ever_connected;
                let every = if first && !dials_first {
                    every.max(FIRST_DIAL_GRACE_MS)
                } else {
                    every
                };
                let due = m
                    .last_dial_ms
                    .is_none_or(|t| now.mono_ms.saturating_sub(t) >= every);
                // A lost connection is redialled at once (that is how a crash is
                // noticed); first connections keep to the pace, below.
                if due && !first {
                    if let Some(m) = self.members.get_mut(&id) {
                        m.last_dial_ms = Some(now.mono_ms);
                        out.push(Effect::Dial {
                            id: id.clone(),
                            addrs: m.record.addrs.clone(),
                        });
                    }
                } else if due {
                    first_dials.push((m.first_dial_tried, id.clone()));
                }
            }
            let Some(m) = self.members.get_mut(&id) else {
                continue;
            };
            if gone(status)
                && now.unix_ms.saturating_sub(m.status_since_unix_ms) >= self.cfg.dead_member_ttl_ms
            {
                let inc = m.record.incarnation;
                self.members.remove(&id);
                self.forgotten.insert(id.clone(), inc);
                out.push(Effect::Forgotten {
                    id,
                    incarnation: inc,
                });
            }
        }
        // Members never tried first: a member that cannot be reached must not
        // starve the others of the pace.
        first_dials.sort();
        for (_, id) in first_dials {
            if !self.take_first_dial(now) {
                break;
            }
            if let Some(m) = self.members.get_mut(&id) {
                m.last_dial_ms = Some(now.mono_ms);
                m.first_dial_tried = true;
                out.push(Effect::Dial {
                    id,
                    addrs: m.record.addrs.clone(),
                });
            }
        }
        out
    }

    /// Graceful leave: the claim to publish before shutting down.
    pub fn leave(&mut self, now: Now) -> Vec<Effect> {
        self.me.status = MemberStatus::Left;
        vec![Effect::Publish(MembershipGossip::Claim {
            subject: self.me.id.clone(),
            incarnation: self.me.incarnation,
            status: MemberStatus::Left,
            by: self.me.id.clone(),
            sent_ms: now.unix_ms,
        })]
    }

    /// Operator's `kiln members forget ID`: only a dead or left member.
    pub fn forget(&mut self, id: &str) -> Result<Vec<Effect>, ForgetError> {
        if id == self.me.id {
            return Err(ForgetError::IsSelf);
        }
        let m = self
            .members
            .get(id)
            .ok_or_else(|| ForgetError::Unknown(id.to_string()))?;
        if !gone(m.record.status) {
            return Err(ForgetError::NotGone {
                id: id.to_string(),
                status: m.record.status,
            });
        }
        let inc = m.record.incarnation;
        self.members.remove(id);
        self.forgotten.insert(id.to_string(), inc);
        Ok(vec![
            Effect::Forgotten {
                id: id.to_string(),
                incarnation: inc,
            },
            Effect::Publish(MembershipGossip::Forget {
                subject: id.to_string(),
                incarnation: inc,
            }),
        ])
    }
}
