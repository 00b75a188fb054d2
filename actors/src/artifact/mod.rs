//! Artifact publish: versions agreed through the control plane, content fetched in
//! verified chunks from the nodes that hold it, until every node holds every live
//! version.

pub mod actor;

use std::collections::{BTreeSet, HashSet};

use crate::control::state::{ArtifactEntry, ControlState};
use crate::control::types::NodeId;

pub use actor::{
    ArtifactActor, ArtifactMetrics, GetTransfers, ServeArtifact, TransferView, Uploaded,
};

/// A live version whose content this node lacks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wanted {
    pub name: String,
    pub version: u64,
    pub sha256: String,
    pub size: u64,
    pub chunks_root: String,
    /// Peer ids of the nodes that hold it (not this node).
    pub holders: Vec<String>,
}

/// What this node should do about artifacts, given the control plane's state and
/// the content it holds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// Versions to fetch (one entry per content digest).
    pub fetch: Vec<Wanted>,
    /// Versions this node holds but is not yet recorded as holding.
    pub hold: Vec<(String, u64)>,
    /// Versions this node is recorded as holding: (name, version, sha256).
    pub held: Vec<(String, u64, String)>,
    /// Digests of every live version: everything else may be collected.
    pub live: HashSet<String>,
}

pub fn plan(state: &ControlState, me: NodeId, local: &HashSet<String>) -> Plan {
    let mut out = Plan::default();
    let mut fetching = BTreeSet::new();
    for (name, entry) in &state.artifacts {
        let ArtifactEntry { versions, .. } = entry;
        for (n, v) in versions {
            out.live.insert(v.sha256.clone());
            if v.holders.contains(&me) {
                out.held.push((name.clone(), *n, v.sha256.clone()));
            }
            if local.contains(&v.sha256) {
                if !v.holders.contains(&me) {
                    out.hold.push((name.clone(), *n));
                }
                continue;
            }
            if !fetching.insert(v.sha256.clone()) {
                continue;
            }
            out.fetch.push(Wanted {
                name: name.clone(),
                version: *n,
                sha256: v.sha256.clone(),
                size: v.size,
                chunks_root: v.chunks_root.clone(),
                holders: v
                    .holders
                    .iter()
                    .filter(|h| **h != me)
                    .filter_map(|h| state.peer_of(*h).map(str::to_string))
                    .collect(),
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::state::{ArtifactCommand, ArtifactVersion, ControlCommand, ControlOutcome};

    fn version(sha: &str) -> ArtifactVersion {
        ArtifactVersion {
            sha256: sha.into(),
            size: 10,
            chunks_root: "r".into(),
            published_ms: 1,
            upload: sha.into(),
            holders: Default::default(),
        }
    }

    #[test]
    fn versions_holders_retirement_and_plans() {
        let mut s = ControlState::default();
        s.apply(&ControlCommand::Configure { stripes: 1 });
        for (node, peer) in [(1, "p1"), (2, "p2")] {
            s.apply(&ControlCommand::Join {
                node,
                peer: peer.into(),
                witness: false,
                stripe: None,
            });
        }
        let publish = |sha: &str| {
            ControlCommand::Artifact(ArtifactCommand::Publish {
                name: "crm".into(),
                version: version(sha),
                by: 1,
                keep: 2,
            })
        };
        use crate::control::state::ControlOutcome::ArtifactPublished;
        assert_eq!(s.apply(&publish("a")), ArtifactPublished { version: 1 });
        // A retried proposal of the same upload gets the same version.
        assert_eq!(s.apply(&publish("a")), ArtifactPublished { version: 1 });
        // The same upload id on other content is refused, and assigns nothing.
        let mut other = version("z");
        other.upload = "a".into();
        let reused = s.apply(&ControlCommand::Artifact(ArtifactCommand::Publish {
            name: "crm".into(),
            version: other,
            by: 1,
            keep: 2,
        }));
        assert!(
            matches!(&reused, ControlOutcome::Rejected { reason } if reason.contains("version 1")),
            "{reused:?}"
        );
        assert_eq!(s.apply(&publish("b")), ArtifactPublished { version: 2 });
        assert_eq!(s.apply(&publish("c")), ArtifactPublished { version: 3 });
        // keep = 2: version 1 is retired; numbers are never reused.
        let versions: Vec<u64> = s.artifacts["crm"].versions.keys().copied().collect();
        assert_eq!(versions, vec![2, 3]);

        let p = plan(&s, 2, &HashSet::from(["b".to_string()]));
        assert_eq!(p.hold, vec![("crm".to_string(), 2)]);
        assert!(p.held.is_empty());
        assert_eq!(p.fetch.len(), 1);
        assert_eq!(p.fetch[0].sha256, "c");
        assert_eq!(p.fetch[0].holders, vec!["p1".to_string()]);
        assert_eq!(p.live, HashSet::from(["b".to_string(), "c".to_string()]));

        s.apply(&ControlCommand::Artifact(ArtifactCommand::Hold {
            name: "crm".into(),
            version: 2,
            node: 2,
        }));
        let p = plan(&s, 2, &HashSet::from(["b".to_string()]));
        assert!(p.hold.is_empty());
        assert_eq!(p.held, vec![("crm".to_string(), 2, "b".to_string())]);
        s.apply(&ControlCommand::Artifact(ArtifactCommand::Retire {
            name: "crm".into(),
            version: 3,
        }));
        assert!(plan(&s, 2, &HashSet::from(["b".to_string()]))
            .fetch
            .is_empty());
        // A removed node no longer counts as a holder.
        s.apply(&ControlCommand::Remove { node: 1 });
        assert!(!s.artifacts["crm"].versions[&2].holders.contains(&1));
    }
}
