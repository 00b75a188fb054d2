//! The control plane's replicated state: which stripe each node belongs to, the
//! active and epoch of each stripe, its in-sync standbys, and the slot → stripe map.
//! A plain state machine: `apply` is deterministic, so every replica that applies
//! the same committed commands holds the same state. Commands that depend on what
//! the proposer saw (an epoch) are conditional, so a stale proposal is rejected
//! instead of applied twice or out of turn.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use super::types::NodeId;

/// Number of slots keys hash to. Fixed for the life of a cluster: slots, not keys,
/// move between stripes.
pub const SLOT_COUNT: u32 = 256;

/// Most stripes a cluster may have (each needs at least one slot).
pub const MAX_STRIPES: u32 = 64;

/// Where a node sits in the cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Placement {
    /// A data node, member of this stripe.
    Stripe(u32),
    /// A voter that holds no stripe data (`kiln run --witness`).
    Witness,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeEntry {
    /// libp2p peer id, base58.
    pub peer: String,
    pub placement: Placement,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StripeEntry {
    /// The node that orders and acknowledges writes in `epoch`, if any.
    pub active: Option<NodeId>,
    /// Raised with every change of active; replication messages carry it.
    pub epoch: u64,
    /// Every node placed in this stripe, the active included.
    pub members: BTreeSet<NodeId>,
    /// Standbys (never the active) that hold every acknowledged write: the active
    /// waits for each of them before acknowledging, and only they are electable.
    pub in_sync: BTreeSet<NodeId>,
    /// Raised by every removal from the in-sync set. An addition carries the
    /// figure its active saw when it began waiting for the standby, and is
    /// refused once it moved: an active whose addition seemed to fail stops
    /// waiting for the standby only after a removal, which no late copy of the
    /// addition can then undo.
    #[serde(default)]
    pub in_sync_removals: u64,
}

/// One version of an artifact: its content (by digest) and the nodes that hold it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArtifactVersion {
    /// Hex SHA-256 of the content.
    pub sha256: String,
    pub size: u64,
    /// Hex SHA-256 over the SHA-256 of every chunk: a node fetching the artifact
    /// checks each chunk it gets, and fetches a bad one from another holder.
    pub chunks_root: String,
    /// Unix ms of the upload.
    pub published_ms: u64,
    /// Random id of the upload, so that a retried proposal gets the same version.
    pub upload: String,
    /// Nodes that hold the complete, verified content.
    pub holders: BTreeSet<NodeId>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArtifactEntry {
    /// The version the next upload gets: versions are never reused, even retired ones.
    pub next_version: u64,
    pub versions: BTreeMap<u64, ArtifactVersion>,
}

/// The whole replicated state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ControlState {
    /// Number of stripes; 0 until the founder configured the cluster.
    pub stripe_count: u32,
    /// Slot → stripe, `SLOT_COUNT` long once configured.
    pub slots: Vec<u32>,
    pub nodes: BTreeMap<NodeId, NodeEntry>,
    pub stripes: BTreeMap<u32, StripeEntry>,
    /// Nodes an operator removed: their data directories hold stale stripe data,
    /// so they may not join again (a new data directory is a new node).
    pub removed: BTreeSet<NodeId>,
    /// Artifacts by name: their live versions.
    #[serde(default)]
    pub artifacts: BTreeMap<String, ArtifactEntry>,
}

/// A decision proposed to the control plane.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ControlCommand {
    /// Sets the number of stripes and spreads the slots over them. Only the first
    /// one applies; the stripe count of a cluster is fixed at creation.
    Configure { stripes: u32 },
    /// A node asks for its place. Idempotent: a node already placed keeps its place.
    Join {
        node: NodeId,
        peer: String,
        witness: bool,
        /// Stripe the operator asked for (`--stripe K`); else the one with fewest members.
        stripe: Option<u32>,
    },
    /// The operator forgot a node: it leaves its stripe and the in-sync set.
    Remove { node: NodeId },
    /// Makes `node`, an in-sync standby of `stripe` in `epoch`, the active of
    /// `epoch + 1`; `in_sync` are the standbys that stay in sync with it.
    Promote {
        stripe: u32,
        epoch: u64,
        node: NodeId,
        in_sync: BTreeSet<NodeId>,
    },
    /// The active of `epoch`, restarted, continues in a new epoch (`epoch + 1`).
    Renew {
        stripe: u32,
        epoch: u64,
        node: NodeId,
    },
    /// The active `by` of `epoch` adds (`in_sync = true`) or removes a standby
    /// from the in-sync set of `stripe`.
    SetInSync {
        stripe: u32,
        epoch: u64,
        by: NodeId,
        node: NodeId,
        in_sync: bool,
        /// The stripe's `in_sync_removals` its active saw: an addition is refused
        /// if it moved; a removal raises it. `None` in entries written before
        /// it existed: neither checked nor counted, so a node replaying old
        /// entries over an old snapshot reaches the same figure as one that
        /// restored a newer snapshot.
        #[serde(default)]
        removals: Option<u64>,
    },
    /// Artifact versions and their holders.
    Artifact(ArtifactCommand),
}

/// Commands about artifacts, part of [`ControlCommand`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ArtifactCommand {
    /// A new version of `name`, uploaded to `by`, which holds it. Versions beyond
    /// the newest `keep` are retired.
    Publish {
        name: String,
        version: ArtifactVersion,
        by: NodeId,
        keep: u32,
    },
    /// `node` holds version `version` of `name` now.
    Hold {
        name: String,
        version: u64,
        node: NodeId,
    },
    /// Version `version` of `name` is retired everywhere.
    Retire { name: String, version: u64 },
}

/// What applying a command did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ControlOutcome {
    Configured {
        stripes: u32,
    },
    Placed {
        placement: Placement,
    },
    Removed,
    Promoted {
        epoch: u64,
    },
    InSyncChanged,
    ArtifactPublished {
        version: u64,
    },
    /// Nothing changed: a membership or blank entry.
    Nothing,
    /// The founder has not set the stripe count yet: a join is retried.
    Unconfigured,
    /// The command did not apply; nothing changed.
    Rejected {
        reason: String,
    },
}

fn rejected(reason: impl Into<String>) -> ControlOutcome {
    ControlOutcome::Rejected {
        reason: reason.into(),
    }
}

impl ControlState {
    /// Applies one committed command. Deterministic: depends on `self` and `cmd` only.
    pub fn apply(&mut self, cmd: &ControlCommand) -> ControlOutcome {
        match cmd {
            ControlCommand::Configure { stripes } => self.configure(*stripes),
            ControlCommand::Join {
                node,
                peer,
                witness,
                stripe,
            } => self.join(*node, peer, *witness, *stripe),
            ControlCommand::Remove { node } => self.remove(*node),
            ControlCommand::Promote {
                stripe,
                epoch,
                node,
                in_sync,
            } => self.promote(*stripe, *epoch, *node, in_sync),
            ControlCommand::SetInSync {
                stripe,
                epoch,
                by,
                node,
                in_sync,
                removals,
            } => self.set_in_sync(*stripe, *epoch, *by, *node, *in_sync, *removals),
            ControlCommand::Renew {
                stripe,
                epoch,
                node,
            } => self.renew(*stripe, *epoch, *node),
            ControlCommand::Artifact(cmd) => self.artifact(cmd),
        }
    }

    fn artifact(&mut self, cmd: &ArtifactCommand) -> ControlOutcome {
        match cmd {
            ArtifactCommand::Publish {
                name,
                version,
                by,
                keep,
            } => {
                let entry = self.artifacts.entry(name.clone()).or_default();
                if let Some((n, first)) = entry
                    .versions
                    .iter()
                    .find(|(_, v)| v.upload == version.upload)
                {
                    // A retry of the same upload gets the first answer; the
                    // same Idempotency-Key on other content is refused here,
                    // where it is decided, not against a node's lagging copy.
                    if first.sha256 != version.sha256 {
                        return rejected(format!(
                            "this Idempotency-Key was used for another upload of {name} \
                             (version {n}, sha-256 {}); nothing new was published",
                            first.sha256
                        ));
                    }
                    return ControlOutcome::ArtifactPublished { version: *n };
                }
                entry.next_version = entry.next_version.max(1);
                let n = entry.next_version;
                entry.next_version += 1;
                let mut version = version.clone();
                version.holders = BTreeSet::from([*by]);
                entry.versions.insert(n, version);
                while entry.versions.len() > (*keep).max(1) as usize {
                    entry.versions.pop_first();
                }
                ControlOutcome::ArtifactPublished { version: n }
            }
            ArtifactCommand::Hold {
                name,
                version,
                node,
            } => match self
                .artifacts
                .get_mut(name)
                .and_then(|a| a.versions.get_mut(version))
            {
                Some(v) => {
                    v.holders.insert(*node);
                    ControlOutcome::Nothing
                }
                None => rejected(format!("artifact {name} has no version {version}")),
            },
            ArtifactCommand::Retire { name, version } => {
                let Some(entry) = self.artifacts.get_mut(name) else {
                    return rejected(format!("no artifact named {name}"));
                };
                if entry.versions.remove(version).is_none() {
                    return rejected(format!("artifact {name} has no version {version}"));
                }
                ControlOutcome::Removed
            }
        }
    }

    fn configure(&mut self, stripes: u32) -> ControlOutcome {
        if self.stripe_count != 0 {
            return rejected(format!(
                "the cluster already has {} stripes; the stripe count is fixed when the cluster is created",
                self.stripe_count
            ));
        }
        if stripes == 0 || stripes > MAX_STRIPES {
            return rejected(format!(
                "stripes must be between 1 and {MAX_STRIPES}, not {stripes}"
            ));
        }
        self.stripe_count = stripes;
        self.slots = (0..SLOT_COUNT).map(|s| s % stripes).collect();
        for k in 0..stripes {
            self.stripes.insert(k, StripeEntry::default());
        }
        ControlOutcome::Configured { stripes }
    }

    fn join(
        &mut self,
        node: NodeId,
        peer: &str,
        witness: bool,
        wanted: Option<u32>,
    ) -> ControlOutcome {
        if let Some(entry) = self.nodes.get(&node) {
            return ControlOutcome::Placed {
                placement: entry.placement,
            };
        }
        if self.removed.contains(&node) {
            return rejected(
                "this node was removed from the cluster by an operator and its data is stale; start it with a new --data-dir",
            );
        }
        if self.stripe_count == 0 {
            return ControlOutcome::Unconfigured;
        }
        let placement = if witness {
            Placement::Witness
        } else {
            let k = match wanted {
                Some(k) if k < self.stripe_count => k,
                Some(k) => {
                    return rejected(format!(
                        "stripe {k} does not exist; this cluster has stripes 0..{}",
                        self.stripe_count - 1
                    ))
                }
                None => self.stripe_needing_members(),
            };
            let stripe = self.stripes.entry(k).or_default();
            stripe.members.insert(node);
            // The first member of an empty stripe is its active: nobody else
            // holds any of its data.
            if stripe.active.is_none() && stripe.members.len() == 1 {
                stripe.active = Some(node);
                stripe.epoch += 1;
            }
            Placement::Stripe(k)
        };
        self.nodes.insert(
            node,
            NodeEntry {
                peer: peer.to_string(),
                placement,
            },
        );
        ControlOutcome::Placed { placement }
    }

    /// The stripe with the fewest members (the lowest id among equals).
    fn stripe_needing_members(&self) -> u32 {
        self.stripes
            .iter()
            .min_by_key(|(k, s)| (s.members.len(), **k))
            .map(|(k, _)| *k)
            .unwrap_or(0)
    }

    fn remove(&mut self, node: NodeId) -> ControlOutcome {
        let Some(entry) = self.nodes.remove(&node) else {
            return rejected(format!("node {node} is not placed"));
        };
        self.removed.insert(node);
        for a in self.artifacts.values_mut() {
            for v in a.versions.values_mut() {
                v.holders.remove(&node);
            }
        }
        if let Placement::Stripe(k) = entry.placement {
            if let Some(stripe) = self.stripes.get_mut(&k) {
                stripe.members.remove(&node);
                stripe.in_sync.remove(&node);
                if stripe.active == Some(node) {
                    // Electable standbys (if any) take over through `Promote`;
                    // the epoch moves on so the removed active is fenced.
                    stripe.active = None;
                    stripe.epoch += 1;
                }
            }
        }
        ControlOutcome::Removed
    }

    fn promote(
        &mut self,
        k: u32,
        epoch: u64,
        node: NodeId,
        in_sync: &BTreeSet<NodeId>,
    ) -> ControlOutcome {
        let stripe = match self.stripe_in_epoch(k, epoch) {
            Ok(s) => s,
            Err(rejection) => return rejection,
        };
        if !stripe.in_sync.contains(&node) {
            return rejected(format!(
                "node {node} is not an in-sync standby of stripe {k}"
            ));
        }
        if !in_sync.is_subset(&stripe.in_sync) {
            return rejected("the new in-sync set must come from the old one");
        }
        stripe.active = Some(node);
        stripe.epoch += 1;
        stripe.in_sync = in_sync.iter().copied().filter(|n| *n != node).collect();
        ControlOutcome::Promoted {
            epoch: stripe.epoch,
        }
    }

    /// Stripe `k`, if it is in `epoch`: a decision taken in another epoch is stale.
    fn stripe_in_epoch(&mut self, k: u32, epoch: u64) -> Result<&mut StripeEntry, ControlOutcome> {
        let Some(stripe) = self.stripes.get_mut(&k) else {
            return Err(rejected(format!("stripe {k} does not exist")));
        };
        if stripe.epoch != epoch {
            return Err(rejected(format!(
                "stripe {k} is in epoch {}, not {epoch}",
                stripe.epoch
            )));
        }
        Ok(stripe)
    }

    fn renew(&mut self, k: u32, epoch: u64, node: NodeId) -> ControlOutcome {
        let stripe = match self.stripe_in_epoch(k, epoch) {
            Ok(s) => s,
            Err(rejection) => return rejection,
        };
        if stripe.active != Some(node) {
            return rejected(format!(
                "node {node} is not the active of stripe {k} in epoch {epoch}"
            ));
        }
        stripe.epoch += 1;
        ControlOutcome::Promoted {
            epoch: stripe.epoch,
        }
    }

    fn set_in_sync(
        &mut self,
        k: u32,
        epoch: u64,
        by: NodeId,
        node: NodeId,
        in_sync: bool,
        removals: Option<u64>,
    ) -> ControlOutcome {
        let stripe = match self.stripe_in_epoch(k, epoch) {
            Ok(s) => s,
            Err(rejection) => return rejection,
        };
        if stripe.active != Some(by) {
            return rejected(format!(
                "node {by} is not the active of stripe {k} in epoch {epoch}"
            ));
        }
        if !stripe.members.contains(&node) || stripe.active == Some(node) {
            return rejected(format!("node {node} is not a standby of stripe {k}"));
        }
        if in_sync {
            if removals.is_some_and(|r| r != stripe.in_sync_removals) {
                return rejected(format!(
                    "a removal from the in-sync set of stripe {k} was decided since node {node}'s addition was proposed"
                ));
            }
            stripe.in_sync.insert(node);
        } else {
            stripe.in_sync.remove(&node);
            if removals.is_some() {
                stripe.in_sync_removals += 1;
            }
        }
        ControlOutcome::InSyncChanged
    }

    /// Number of slots of stripe `k`.
    pub fn slots_of(&self, k: u32) -> usize {
        self.slots.iter().filter(|s| **s == k).count()
    }

    /// Peer id of a placed node.
    pub fn peer_of(&self, node: NodeId) -> Option<&str> {
        self.nodes.get(&node).map(|e| e.peer.as_str())
    }
}

/// How many voters a control plane with `eligible` live nodes should have: one
/// until three nodes exist (two voters would need both for every decision), then
/// three, then five from five nodes up.
pub fn wanted_voters(eligible: usize) -> usize {
    match eligible {
        0..=2 => 1,
        3..=4 => 3,
        _ => 5,
    }
}

/// The voter set the control plane should move to, or `None` to stay.
///
/// `live` are placed nodes that membership sees alive and that already follow the
/// log (learners or voters); `gone` are voters dead or left for longer than the
/// replacement delay, or removed by an operator. A gone voter is swapped for a
/// live node when there is one; when there is none it is dropped, and the set
/// shrinks to what the live nodes call for (`wanted_voters`): a dead voter kept
/// only makes every decision need more of the live ones (the two servers of a
/// witness that died for good would both be needed for everything, worse than
/// never having had a witness). The set grows toward `wanted_voters`. New voters
/// are picked to spread the votes: witnesses first, then the stripe with the
/// fewest voters, then the lowest node id; the voters dropped to shrink are
/// those not live first, then the last in that order, never `leader` (which
/// would cost an election).
pub fn plan_voters(
    state: &ControlState,
    voters: &BTreeSet<NodeId>,
    live: &BTreeSet<NodeId>,
    gone: &BTreeSet<NodeId>,
    leader: NodeId,
) -> Option<BTreeSet<NodeId>> {
    let mut next: BTreeSet<NodeId> = voters.clone();
    let want = wanted_voters(live.len()).max(voters.len());
    let mut to_replace: Vec<NodeId> = voters.intersection(gone).copied().collect();
    loop {
        let short = next.len() < want || !to_replace.is_empty();
        if !short {
            break;
        }
        let Some(pick) = pick_voter(state, &next, live) else {
            break;
        };
        if let Some(old) = to_replace.pop() {
            next.remove(&old);
        }
        next.insert(pick);
    }
    if !to_replace.is_empty() {
        for old in &to_replace {
            next.remove(old);
        }
        let target = wanted_voters(live.len());
        while next.len() > target.max(1) {
            let droppable: BTreeSet<NodeId> =
                next.iter().copied().filter(|v| *v != leader).collect();
            let not_live: BTreeSet<NodeId> = droppable.difference(live).copied().collect();
            let pool = if not_live.is_empty() {
                &droppable
            } else {
                &not_live
            };
            let Some(last) = least_preferred_voter(state, &next, pool) else {
                break;
            };
            next.remove(&last);
        }
    }
    (next != *voters && !next.is_empty()).then_some(next)
}

/// Voters of `current` placed in stripe `k`.
fn votes_in(state: &ControlState, current: &BTreeSet<NodeId>, k: u32) -> usize {
    current
        .iter()
        .filter(|v| {
            state
                .nodes
                .get(v)
                .is_some_and(|e| e.placement == Placement::Stripe(k))
        })
        .count()
}

/// Of `pool` (some of the voters `current`), the one `pick_voter` would have
/// picked last.
fn least_preferred_voter(
    state: &ControlState,
    current: &BTreeSet<NodeId>,
    pool: &BTreeSet<NodeId>,
) -> Option<NodeId> {
    pool.iter()
        .copied()
        .max_by_key(|n| match state.nodes.get(n).map(|e| e.placement) {
            Some(Placement::Witness) => (0, 0, *n),
            Some(Placement::Stripe(k)) => (1, votes_in(state, current, k), *n),
            None => (2, 0, *n),
        })
}

fn pick_voter(
    state: &ControlState,
    current: &BTreeSet<NodeId>,
    live: &BTreeSet<NodeId>,
) -> Option<NodeId> {
    live.iter()
        .filter(|n| !current.contains(n))
        .filter_map(|n| state.nodes.get(n).map(|e| (*n, e.placement)))
        .min_by_key(|(n, placement)| match placement {
            Placement::Witness => (0, 0, *n),
            Placement::Stripe(k) => (1, votes_in(state, current, *k), *n),
        })
        .map(|(n, _)| n)
}
