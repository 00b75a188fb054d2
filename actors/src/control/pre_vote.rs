//! Pre-vote (Raft thesis §9.6) in front of openraft 0.9, which has none: a voter
//! that cannot win an election does not start one.
//!
//! Without it a voter cut off from the others raised its term at every election
//! timeout (three a second). Back on the network, its higher term made it refuse
//! the leader's appends — its control-plane state stayed stale, and requests
//! through it waited for the active it still named (~2 s in the soak) — and then
//! deposed the leader. openraft's own timer still decides *when* to elect; this
//! only decides *whether* it may: while a majority of voters (of each half of a
//! joint configuration) say they would vote for this node, because they hear no
//! leader within the lease and their log is no longer than this node's.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use openraft::LogId;

use super::types::NodeId;

/// What decides a pre-vote on a voter, read from openraft's state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observed {
    pub leading: bool,
    /// A leader was heard (or this node's vote changed) within the leader lease.
    pub lease_held: bool,
    /// The last entry of this node's Raft log (not read, and `None`, while it
    /// leads or hears a leader: it then neither asks nor grants).
    pub last_log: Option<LogId<NodeId>>,
}

impl Observed {
    /// Whether this node hears no leader: it should find out whether it could
    /// win an election before openraft starts one.
    pub fn hears_no_leader(&self) -> bool {
        !self.leading && !self.lease_held
    }

    /// Whether this node would vote for a candidate whose log ends at
    /// `candidate_last_log`: openraft's own test of a vote request (lease, then
    /// log), without changing anything.
    pub fn would_vote_for(&self, candidate_last_log: Option<&LogId<NodeId>>) -> bool {
        self.hears_no_leader() && candidate_last_log >= self.last_log.as_ref()
    }
}

/// The answers of one pre-vote round. This node counts as granting.
#[derive(Debug, Clone)]
pub struct Tally {
    /// The voter sets a quorum is needed in (two during a joint change).
    configs: Vec<BTreeSet<NodeId>>,
    granted: BTreeSet<NodeId>,
}

impl Tally {
    pub fn new(me: NodeId, configs: Vec<BTreeSet<NodeId>>) -> Self {
        Tally {
            configs,
            granted: BTreeSet::from([me]),
        }
    }

    /// Every voter but `me`, once each: the nodes to ask.
    pub fn others(&self) -> BTreeSet<NodeId> {
        self.configs
            .iter()
            .flatten()
            .filter(|v| !self.granted.contains(v))
            .copied()
            .collect()
    }

    pub fn grant(&mut self, voter: NodeId) {
        self.granted.insert(voter);
    }

    /// A majority of every voter set granted.
    pub fn won(&self) -> bool {
        !self.configs.is_empty()
            && self.configs.iter().all(|c| {
                let granted = c.iter().filter(|v| self.granted.contains(v)).count();
                granted * 2 > c.len()
            })
    }
}

/// When the next round may start: at once after a won round or a leader
/// heard, after a pause that doubles with every lost round (up to `max`), so a
/// voter cut off from the others does not ask them 20 times a second.
#[derive(Debug, Clone)]
pub struct Backoff {
    first: Duration,
    max: Duration,
    pause: Duration,
    next: Option<Instant>,
}

impl Backoff {
    pub fn new(first: Duration, max: Duration) -> Self {
        Backoff {
            first,
            max,
            pause: first,
            next: None,
        }
    }

    pub fn due(&self, now: Instant) -> bool {
        self.next.is_none_or(|t| now >= t)
    }

    pub fn lost(&mut self, now: Instant) {
        self.next = Some(now + self.pause);
        self.pause = (self.pause * 2).min(self.max);
    }

    pub fn reset(&mut self) {
        self.pause = self.first;
        self.next = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::CommittedLeaderId;

    fn log(term: u64, index: u64) -> Option<LogId<NodeId>> {
        Some(LogId::new(CommittedLeaderId::new(term, 1), index))
    }

    fn follower(lease_held: bool, last_log: Option<LogId<NodeId>>) -> Observed {
        Observed {
            leading: false,
            lease_held,
            last_log,
        }
    }

    #[test]
    fn a_voter_that_hears_its_leader_grants_nothing() {
        let me = follower(true, log(3, 10));
        assert!(!me.hears_no_leader());
        assert!(!me.would_vote_for(log(4, 20).as_ref()));
        let leader = Observed {
            leading: true,
            lease_held: false,
            last_log: log(3, 10),
        };
        assert!(!leader.would_vote_for(log(4, 20).as_ref()));
    }

    #[test]
    fn a_voter_without_a_leader_grants_a_log_at_least_as_long() {
        let me = follower(false, log(3, 10));
        assert!(me.would_vote_for(log(3, 10).as_ref()));
        assert!(
            me.would_vote_for(log(4, 2).as_ref()),
            "a later term outranks"
        );
        assert!(!me.would_vote_for(log(3, 9).as_ref()));
        assert!(!me.would_vote_for(None));
        assert!(follower(false, None).would_vote_for(None));
    }

    #[test]
    fn a_round_is_won_by_a_majority_of_each_voter_set() {
        let voters = BTreeSet::from([1, 2, 3, 4, 5]);
        let mut t = Tally::new(1, vec![voters.clone()]);
        assert_eq!(t.others(), BTreeSet::from([2, 3, 4, 5]));
        t.grant(2);
        assert!(!t.won(), "two of five");
        t.grant(9); // not a voter: counts for nothing
        assert!(!t.won());
        t.grant(4);
        assert!(t.won());

        // A joint change: a majority of the old set is not enough.
        let mut t = Tally::new(
            1,
            vec![BTreeSet::from([1, 2, 3]), BTreeSet::from([3, 4, 5])],
        );
        assert_eq!(t.others(), BTreeSet::from([2, 3, 4, 5]));
        t.grant(2);
        assert!(!t.won(), "no majority of the new set");
        t.grant(4);
        assert!(!t.won(), "one of three in the new set");
        t.grant(5);
        assert!(t.won());
    }

    #[test]
    fn lost_rounds_space_the_next_ones_out_until_a_leader_is_heard() {
        let ms = Duration::from_millis;
        let t0 = Instant::now();
        let mut b = Backoff::new(ms(50), ms(1000));
        assert!(b.due(t0));
        let mut waits = Vec::new();
        let mut now = t0;
        for _ in 0..6 {
            b.lost(now);
            let mut wait = ms(0);
            while !b.due(now + wait) {
                wait += ms(10);
            }
            waits.push(wait.as_millis());
            now += wait;
        }
        assert_eq!(waits, vec![50, 100, 200, 400, 800, 1000]);
        b.reset();
        assert!(b.due(now));
        b.lost(now);
        assert!(!b.due(now + ms(40)) && b.due(now + ms(50)));
    }

    #[test]
    fn a_single_voter_wins_alone_and_no_voter_set_never_wins() {
        assert!(Tally::new(1, vec![BTreeSet::from([1])]).won());
        assert!(!Tally::new(1, vec![]).won());
        assert!(
            !Tally::new(1, vec![BTreeSet::from([2, 3])]).won(),
            "a node outside the voter set"
        );
    }
}
