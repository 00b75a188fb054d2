//! Tests of the control state machine and voter planning.

use std::collections::BTreeSet;

use super::state::*;

fn join(s: &mut ControlState, node: u64, witness: bool, stripe: Option<u32>) -> ControlOutcome {
    s.apply(&ControlCommand::Join {
        node,
        peer: format!("peer-{node}"),
        witness,
        stripe,
    })
}

fn configured(stripes: u32) -> ControlState {
    let mut s = ControlState::default();
    assert_eq!(
        s.apply(&ControlCommand::Configure { stripes }),
        ControlOutcome::Configured { stripes }
    );
    s
}

#[test]
fn configure_spreads_slots_once() {
    let mut s = configured(2);
    assert_eq!(s.slots.len(), SLOT_COUNT as usize);
    assert_eq!(s.slots_of(0), 128);
    assert_eq!(s.slots_of(1), 128);
    assert!(matches!(
        s.apply(&ControlCommand::Configure { stripes: 3 }),
        ControlOutcome::Rejected { .. }
    ));
    assert_eq!(s.stripe_count, 2);
    let mut fresh = ControlState::default();
    assert!(matches!(
        fresh.apply(&ControlCommand::Configure { stripes: 0 }),
        ControlOutcome::Rejected { .. }
    ));
}

#[test]
fn join_before_configure_is_rejected() {
    let mut s = ControlState::default();
    assert_eq!(join(&mut s, 1, false, None), ControlOutcome::Unconfigured);
    assert!(s.nodes.is_empty());
}

#[test]
fn nodes_fill_the_emptiest_stripe_and_first_member_is_active() {
    let mut s = configured(2);
    let placements: Vec<_> = (1..=5).map(|n| join(&mut s, n, false, None)).collect();
    let stripe_of = |o: &ControlOutcome| match o {
        ControlOutcome::Placed {
            placement: Placement::Stripe(k),
        } => *k,
        other => panic!("not placed: {other:?}"),
    };
    let ks: Vec<u32> = placements.iter().map(stripe_of).collect();
    assert_eq!(ks, vec![0, 1, 0, 1, 0]);
    assert_eq!(s.stripes[&0].active, Some(1));
    assert_eq!(s.stripes[&1].active, Some(2));
    assert_eq!(s.stripes[&0].epoch, 1);
    assert!(s.stripes[&0].in_sync.is_empty());
}

#[test]
fn join_is_idempotent_and_honours_wishes() {
    let mut s = configured(3);
    join(&mut s, 1, false, Some(2));
    assert_eq!(
        join(&mut s, 1, false, Some(0)),
        ControlOutcome::Placed {
            placement: Placement::Stripe(2)
        }
    );
    assert_eq!(
        join(&mut s, 2, true, None),
        ControlOutcome::Placed {
            placement: Placement::Witness
        }
    );
    assert!(matches!(
        join(&mut s, 3, false, Some(7)),
        ControlOutcome::Rejected { .. }
    ));
    assert_eq!(s.nodes.len(), 2);
    assert!(s.stripes.values().all(|st| !st.members.contains(&2)));
}

/// An addition proposed before a removal was decided is refused: its active
/// may have stopped waiting for the standby (the removal) and acknowledged
/// writes it does not hold.
#[test]
fn an_in_sync_addition_is_refused_once_a_removal_was_decided_after_it_was_proposed() {
    let mut s = configured(1);
    for n in 1..=3 {
        join(&mut s, n, false, None);
    }
    let set = |node, in_sync, removals| ControlCommand::SetInSync {
        stripe: 0,
        epoch: 1,
        by: 1,
        node,
        in_sync,
        removals,
    };
    assert_eq!(
        s.apply(&set(2, true, Some(0))),
        ControlOutcome::InSyncChanged
    );
    // Node 3's addition is proposed, seems to fail; the active has it removed.
    assert_eq!(
        s.apply(&set(3, false, Some(0))),
        ControlOutcome::InSyncChanged
    );
    assert_eq!(s.stripes[&0].in_sync_removals, 1);
    // A late copy of the addition finds the figure moved.
    assert!(matches!(
        s.apply(&set(3, true, Some(0))),
        ControlOutcome::Rejected { .. }
    ));
    assert_eq!(s.stripes[&0].in_sync, BTreeSet::from([2]));
    // Proposed again with the figure of now, it is taken; entries written
    // before the figure existed are neither checked nor counted (every node
    // replaying them reaches the same figure).
    assert_eq!(
        s.apply(&set(3, true, Some(1))),
        ControlOutcome::InSyncChanged
    );
    assert_eq!(s.apply(&set(2, false, None)), ControlOutcome::InSyncChanged);
    assert_eq!(s.stripes[&0].in_sync_removals, 1);
    assert_eq!(s.apply(&set(2, true, None)), ControlOutcome::InSyncChanged);
}

#[test]
fn promote_needs_the_current_epoch_and_an_in_sync_standby() {
    let mut s = configured(1);
    for n in 1..=3 {
        join(&mut s, n, false, None);
    }
    let set = |epoch, node, in_sync| ControlCommand::SetInSync {
        stripe: 0,
        epoch,
        by: 1,
        node,
        in_sync,
        removals: None,
    };
    assert_eq!(s.apply(&set(1, 2, true)), ControlOutcome::InSyncChanged);
    assert_eq!(s.apply(&set(1, 3, true)), ControlOutcome::InSyncChanged);
    // The active itself is never an in-sync standby.
    assert!(matches!(
        s.apply(&set(1, 1, true)),
        ControlOutcome::Rejected { .. }
    ));
    // Node 3 (syncing? no: in sync) is promoted; 2 stays in sync; the old active does not.
    let promote = |epoch, node, in_sync: &[u64]| ControlCommand::Promote {
        stripe: 0,
        epoch,
        node,
        in_sync: in_sync.iter().copied().collect(),
    };
    assert_eq!(
        s.apply(&promote(1, 3, &[2, 3])),
        ControlOutcome::Promoted { epoch: 2 }
    );
    assert_eq!(s.stripes[&0].active, Some(3));
    assert_eq!(s.stripes[&0].in_sync, BTreeSet::from([2]));
    // A second election for the same epoch is stale: never two actives for epoch 2.
    assert!(matches!(
        s.apply(&promote(1, 2, &[2])),
        ControlOutcome::Rejected { .. }
    ));
    // A stale in-sync change from the deposed active is rejected too.
    assert!(matches!(
        s.apply(&set(1, 2, false)),
        ControlOutcome::Rejected { .. }
    ));
    // Only an in-sync standby can be promoted.
    assert!(matches!(
        s.apply(&promote(2, 1, &[])),
        ControlOutcome::Rejected { .. }
    ));
}

#[test]
fn removing_the_active_fences_its_epoch() {
    let mut s = configured(1);
    join(&mut s, 1, false, None);
    join(&mut s, 2, false, None);
    assert_eq!(
        s.apply(&ControlCommand::Remove { node: 1 }),
        ControlOutcome::Removed
    );
    assert_eq!(s.stripes[&0].active, None);
    assert_eq!(s.stripes[&0].epoch, 2);
    assert!(!s.nodes.contains_key(&1));
    // Its data directory is stale: it may not come back as it was.
    assert!(matches!(
        join(&mut s, 1, false, None),
        ControlOutcome::Rejected { .. }
    ));
}

fn ids(v: &[u64]) -> BTreeSet<u64> {
    v.iter().copied().collect()
}

#[test]
fn voters_grow_to_three_then_five_spread_across_stripes() {
    let mut s = configured(2);
    for n in 1..=6 {
        join(&mut s, n, false, None);
    }
    // Nodes 1,3,5 are in stripe 0; 2,4,6 in stripe 1.
    assert_eq!(
        plan_voters(&s, &ids(&[1]), &ids(&[1, 2]), &ids(&[]), 1),
        None
    );
    let three = plan_voters(&s, &ids(&[1]), &ids(&[1, 2, 3]), &ids(&[]), 1).unwrap();
    assert_eq!(three, ids(&[1, 2, 3]));
    let five = plan_voters(&s, &three, &ids(&[1, 2, 3, 4, 5, 6]), &ids(&[]), 1).unwrap();
    assert_eq!(five.len(), 5);
    assert!(five.contains(&4), "stripe 1 had fewer voters: {five:?}");
}

#[test]
fn a_witness_is_preferred_as_voter() {
    let mut s = configured(1);
    join(&mut s, 1, false, None);
    join(&mut s, 2, false, None);
    join(&mut s, 9, true, None);
    let v = plan_voters(&s, &ids(&[1]), &ids(&[1, 2, 9]), &ids(&[]), 1).unwrap();
    assert_eq!(v, ids(&[1, 2, 9]));
    let mut s = configured(1);
    for n in 1..=4 {
        join(&mut s, n, false, None);
    }
    join(&mut s, 9, true, None);
    // With 1 voter and 5 live, the witness comes before any data node.
    let v = plan_voters(&s, &ids(&[1]), &ids(&[1, 2, 3, 4, 9]), &ids(&[]), 1).unwrap();
    assert!(v.contains(&9));
}

#[test]
fn a_gone_voter_is_swapped_when_a_live_node_can_take_its_place() {
    let mut s = configured(1);
    for n in 1..=4 {
        join(&mut s, n, false, None);
    }
    let voters = ids(&[1, 2, 3]);
    // Node 4 is live: it replaces node 3.
    assert_eq!(
        plan_voters(&s, &voters, &ids(&[1, 2, 4]), &ids(&[3]), 1),
        Some(ids(&[1, 2, 4]))
    );
}

#[test]
fn a_gone_voter_nobody_can_replace_is_dropped_down_to_what_the_live_nodes_call_for() {
    // Two servers and a witness; the witness is gone for good.
    let mut s = configured(1);
    join(&mut s, 1, false, None);
    join(&mut s, 2, false, None);
    join(&mut s, 9, true, None);
    let v = plan_voters(&s, &ids(&[1, 2, 9]), &ids(&[1, 2]), &ids(&[9]), 1).unwrap();
    // One voter, as a two-node cluster without a witness has: either server
    // alone can no longer stop every decision.
    assert_eq!(v.len(), 1);
    assert!(v.is_subset(&ids(&[1, 2])));

    // Five voters, two gone for good, no spare: the three live ones.
    let mut s = configured(2);
    for n in 1..=5 {
        join(&mut s, n, false, None);
    }
    assert_eq!(
        plan_voters(
            &s,
            &ids(&[1, 2, 3, 4, 5]),
            &ids(&[1, 2, 3]),
            &ids(&[4, 5]),
            1
        ),
        Some(ids(&[1, 2, 3]))
    );
    // Five voters, one gone, no spare: three of the four live ones (an even
    // count tolerates no more failures than one fewer).
    let v = plan_voters(
        &s,
        &ids(&[1, 2, 3, 4, 5]),
        &ids(&[1, 2, 3, 4]),
        &ids(&[5]),
        1,
    )
    .unwrap();
    assert_eq!(v.len(), 3);
    assert!(v.is_subset(&ids(&[1, 2, 3, 4])));
    // A voter dead but not yet gone is dropped before a live one, and the
    // leader is kept.
    let v = plan_voters(&s, &ids(&[1, 2, 3, 4, 5]), &ids(&[1, 2, 4]), &ids(&[5]), 4).unwrap();
    assert_eq!(v, ids(&[1, 2, 4]));
    let v = plan_voters(&s, &ids(&[1, 2, 3]), &ids(&[1, 2]), &ids(&[3]), 2).unwrap();
    assert_eq!(v, ids(&[2]));
    // Nothing gone: a set larger than wanted is left alone.
    assert_eq!(
        plan_voters(
            &s,
            &ids(&[1, 2, 3, 4, 5]),
            &ids(&[1, 2, 3, 4]),
            &ids(&[]),
            1
        ),
        None
    );
}

#[test]
fn wanted_voter_counts() {
    assert_eq!(wanted_voters(1), 1);
    assert_eq!(wanted_voters(2), 1);
    assert_eq!(wanted_voters(3), 3);
    assert_eq!(wanted_voters(4), 3);
    assert_eq!(wanted_voters(5), 5);
    assert_eq!(wanted_voters(40), 5);
}
