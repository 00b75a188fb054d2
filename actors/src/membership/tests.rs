use super::state::*;
use kiln_net::wire::{MemberRecord, MemberStatus, MembershipGossip};

fn rec(id: &str, inc: u64, status: MemberStatus) -> MemberRecord {
    MemberRecord {
        id: id.into(),
        name: format!("node-{id}"),
        addrs: vec![format!("/ip4/127.0.0.1/tcp/{}", 7000 + id.len())],
        incarnation: inc,
        started_ms: 1,
        status,
    }
}

fn at(ms: u64) -> Now {
    Now {
        mono_ms: ms,
        unix_ms: 1_000_000 + ms,
    }
}

fn node(id: &str) -> Membership {
    Membership::new(
        rec(id, 1, MemberStatus::Alive),
        vec![],
        vec![],
        MembershipConfig::default(),
    )
}

fn status(m: &Membership, id: &str) -> MemberStatus {
    m.member(id).map(|x| x.record.status).expect("member known")
}

fn published(effects: &[Effect]) -> Vec<MembershipGossip> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Publish(g) => Some(g.clone()),
            _ => None,
        })
        .collect()
}

fn dials(fx: &[Effect], to: &str) -> bool {
    fx.iter()
        .any(|e| matches!(e, Effect::Dial { id, .. } if id == to))
}

/// Ticks every 100 ms from `from` to `to` (inclusive) and collects the effects.
fn ticks(m: &mut Membership, from: u64, to: u64) -> Vec<Effect> {
    (from / 100..=to / 100)
        .flat_map(|i| m.tick(at(i * 100)))
        .collect()
}

#[test]
fn announcement_adds_member_and_dials_it_after_the_redial_interval() {
    let cfg = MembershipConfig::default();
    let mut a = node("a");
    let fx = a.on_announce(at(0), rec("b", 1, MemberStatus::Alive), 1);
    assert_eq!(status(&a, "b"), MemberStatus::Alive);
    assert!(!dials(&fx, "b"), "not dialled the moment it is learnt of");
    assert_eq!(a.take_dirty().len(), 1);
    assert!(!dials(
        &ticks(&mut a, 100, cfg.redial_interval_ms - 100),
        "b"
    ));
    assert!(dials(&a.tick(at(cfg.redial_interval_ms)), "b"));
}

#[test]
fn of_two_members_that_learn_of_each_other_only_the_smaller_id_dials_first() {
    let mut a = node("a");
    let mut b = node("b");
    a.on_announce(at(0), rec("b", 1, MemberStatus::Alive), 1);
    b.on_announce(at(0), rec("a", 1, MemberStatus::Alive), 1);
    assert!(dials(&ticks(&mut a, 100, 1000), "b"));
    assert!(!dials(&ticks(&mut b, 100, 1000), "a"));
    // Still no connection from "a" after the grace: "b" dials itself, once.
    let waited = ticks(&mut b, 1100, 3000);
    assert_eq!(
        waited
            .iter()
            .filter(|e| matches!(e, Effect::Dial { id, .. } if id == "a"))
            .count(),
        1
    );
    // A connection that was up and is lost is redialled by both sides at once.
    a.on_connected(at(3100), "b");
    b.on_connected(at(3100), "a");
    assert!(dials(&a.on_disconnected(at(3200), "b"), "b"));
    assert!(dials(&b.on_disconnected(at(3200), "a"), "a"));
}

#[test]
fn first_connections_keep_to_a_pace() {
    let mut a = node("a");
    let table: Vec<MemberRecord> = (0..20)
        .map(|i| rec(&format!("m{i:02}"), 1, MemberStatus::Alive))
        .collect();
    a.on_sync(at(0), table);
    let count = |fx: &[Effect]| {
        fx.iter()
            .filter(|e| matches!(e, Effect::Dial { .. }))
            .count()
    };
    // Due after the redial interval, then a burst of 4 and one per 100 ms
    // (redials of members not connected yet included).
    assert_eq!(count(&ticks(&mut a, 100, 400)), 0);
    let burst = a.tick(at(500));
    assert_eq!(count(&burst), 4);
    let next = ticks(&mut a, 600, 1000);
    assert_eq!(count(&next), 5);
    let later = ticks(&mut a, 1100, 2_500);
    assert!(count(&later) <= 15, "at most one first dial per 100 ms");
    // Members never tried go before redials of those that did not answer.
    let dialled: std::collections::BTreeSet<String> = [burst, next, later]
        .concat()
        .into_iter()
        .filter_map(|e| match e {
            Effect::Dial { id, .. } => Some(id),
            _ => None,
        })
        .collect();
    assert_eq!(dialled.len(), 20, "every member is dialled within 2.5 s");
}

#[test]
fn a_member_met_first_hand_is_passed_on_once() {
    let mut a = node("a");
    a.on_connected(at(0), "b");
    let fx = a.on_sync(
        at(1),
        vec![
            rec("b", 1, MemberStatus::Alive),
            rec("c", 1, MemberStatus::Alive),
        ],
    );
    let passed: Vec<_> = published(&fx)
        .into_iter()
        .filter_map(|g| match g {
            MembershipGossip::Joined { members, .. } => Some(members),
            _ => None,
        })
        .collect();
    // "b" is connected (first-hand); "c" is only hearsay.
    assert_eq!(passed.len(), 1);
    assert_eq!(passed[0][0].id, "b");
    // Known now: not news again.
    let fx = a.on_announce(at(2), rec("b", 1, MemberStatus::Alive), 2);
    assert!(!published(&fx)
        .iter()
        .any(|g| matches!(g, MembershipGossip::Joined { .. })));
}

#[test]
fn a_new_node_catches_up_by_anti_entropy() {
    let mut a = node("a");
    a.start(at(0));
    a.on_connected(at(10), "b");
    a.on_sync(at(20), vec![rec("b", 1, MemberStatus::Alive)]);
    let syncs = |fx: &[Effect]| {
        fx.iter()
            .filter(|e| matches!(e, Effect::Sync { .. }))
            .count()
    };
    // Often while joining, seldom after.
    assert!(syncs(&ticks(&mut a, 100, 4900)) >= 10);
    assert!(syncs(&ticks(&mut a, 5000, 14_900)) <= 1);
}

#[test]
fn silence_makes_suspect_then_dead() {
    let cfg = MembershipConfig::default();
    let mut a = node("a");
    a.on_announce(at(0), rec("b", 1, MemberStatus::Alive), 1);
    a.on_connected(at(0), "b");
    a.tick(at(cfg.suspect_timeout_ms - 1));
    assert_eq!(status(&a, "b"), MemberStatus::Alive);
    let fx = a.tick(at(cfg.suspect_timeout_ms));
    assert_eq!(status(&a, "b"), MemberStatus::Suspect);
    assert!(fx.contains(&Effect::Suspected { id: "b".into() }));
    assert!(
        published(&fx)
            .iter()
            .all(|g| !matches!(g, MembershipGossip::Claim { .. })),
        "a suspicion is not gossiped"
    );
    // Still connected (a paused process): only the long timeout declares it dead.
    a.tick(at(cfg.dead_timeout_ms - 1));
    assert_eq!(status(&a, "b"), MemberStatus::Suspect);
    let fx = a.tick(at(cfg.dead_timeout_ms));
    assert_eq!(status(&a, "b"), MemberStatus::Dead);
    assert!(fx.contains(&Effect::DeclaredDead { id: "b".into() }));
}

#[test]
fn a_member_not_yet_connected_gets_the_long_timeout() {
    let cfg = MembershipConfig::default();
    let mut a = node("a");
    a.on_sync(at(0), vec![rec("b", 1, MemberStatus::Alive)]);
    a.tick(at(cfg.dead_timeout_ms - 1));
    assert_eq!(status(&a, "b"), MemberStatus::Alive, "still connecting");
    a.tick(at(cfg.dead_timeout_ms));
    assert_eq!(status(&a, "b"), MemberStatus::Dead, "never answered at all");
}

#[test]
fn crashed_member_is_dead_once_unreachable_is_confirmed() {
    let cfg = MembershipConfig::default();
    let mut a = node("a");
    a.on_announce(at(0), rec("b", 1, MemberStatus::Alive), 1);
    a.on_connected(at(0), "b");
    a.on_probe_ok(at(100), "b");
    let fx = a.on_disconnected(at(200), "b");
    assert!(fx
        .iter()
        .any(|e| matches!(e, Effect::Dial { id, .. } if id == "b")));
    a.on_dial_failed(at(210), "b");
    assert_eq!(status(&a, "b"), MemberStatus::Suspect);
    a.tick(at(210 + cfg.unreachable_confirm_ms - 1));
    assert_eq!(status(&a, "b"), MemberStatus::Suspect);
    a.tick(at(210 + cfg.unreachable_confirm_ms));
    assert_eq!(status(&a, "b"), MemberStatus::Dead);
}

/// `a` connected to `b` and `c`, then loses `b` and fails to redial it at 210 ms.
fn a_loses_b_while_c_is_connected() -> (Membership, Vec<Effect>) {
    let mut a = node("a");
    for id in ["b", "c"] {
        a.on_announce(at(0), rec(id, 1, MemberStatus::Alive), 1);
        a.on_connected(at(0), id);
    }
    a.on_disconnected(at(200), "b");
    let fx = a.on_dial_failed(at(210), "b");
    (a, fx)
}

#[test]
fn a_member_only_this_node_cannot_reach_is_vouched_for_and_kept_alive() {
    let cfg = MembershipConfig::default();
    let (mut a, fx) = a_loses_b_while_c_is_connected();
    assert!(
        fx.contains(&Effect::ProbeIndirectly {
            subject: "b".into(),
            via: vec!["c".into()],
        }),
        "{fx:?}"
    );
    // The fast path waits for c's answer.
    a.tick(at(210 + cfg.unreachable_confirm_ms));
    assert_eq!(status(&a, "b"), MemberStatus::Suspect);
    let fx = a.on_indirect_answer(at(800), "b", "c", true);
    assert!(fx.contains(&Effect::ReachedIndirectly {
        id: "b".into(),
        via: "c".into()
    }));
    assert_eq!(status(&a, "b"), MemberStatus::Alive);
    // From now on: redialled seldom, asked after on the tick's pace, neither
    // suspect nor dead while c vouches, even with none of b's announcements
    // getting through.
    let mut t = 900;
    let mut dial_times = Vec::new();
    let mut probes = 0;
    while t < 60_000 {
        a.on_probe_ok(at(t), "c");
        let mut fx = a.tick(at(t));
        if dials(&fx, "b") {
            dial_times.push(t);
            fx.extend(a.on_dial_failed(at(t + 5), "b"));
        }
        assert!(
            !fx.iter()
                .any(|e| matches!(e, Effect::DeclaredDead { .. } | Effect::Suspected { .. })),
            "at {t}: {fx:?}"
        );
        for e in fx {
            if let Effect::ProbeIndirectly { subject, via } = e {
                probes += 1;
                for v in via {
                    a.on_indirect_answer(at(t + 20), &subject, &v, true);
                }
            }
        }
        t += 100;
    }
    assert!(probes >= 30, "asked after only {probes} times in a minute");
    assert_eq!(status(&a, "b"), MemberStatus::Alive);
    assert!(
        dial_times
            .windows(2)
            .all(|w| w[1] - w[0] >= cfg.dead_redial_interval_ms),
        "redialled too often: {dial_times:?}"
    );
    // A direct connection again ends the vouching.
    a.on_connected(at(60_000), "b");
    assert!(a.member("b").is_some_and(|m| m.connected));
}

#[test]
fn a_vouched_member_nobody_reaches_any_more_is_dead_soon() {
    let cfg = MembershipConfig::default();
    let (mut a, _) = a_loses_b_while_c_is_connected();
    a.on_indirect_answer(at(300), "b", "c", true);
    // The next round: c cannot reach b either (b crashed).
    let mut t = 400;
    let mut dead_at = None;
    while t < 10_000 && dead_at.is_none() {
        a.on_probe_ok(at(t), "c");
        let fx = a.tick(at(t));
        for e in &fx {
            match e {
                Effect::ProbeIndirectly { subject, .. } => {
                    a.on_indirect_answer(at(t + 10), subject, "c", false);
                }
                Effect::DeclaredDead { id } if id == "b" => dead_at = Some(t),
                _ => {}
            }
        }
        t += 100;
    }
    let dead_at = dead_at.expect("declared dead");
    assert!(
        dead_at <= 300 + cfg.suspect_timeout_ms / 2 + cfg.unreachable_confirm_ms + 200,
        "declared dead only at {dead_at} ms"
    );
}

#[test]
fn a_crashed_member_nobody_reaches_is_dead_once_the_answers_are_in() {
    let cfg = MembershipConfig::default();
    let (mut a, _) = a_loses_b_while_c_is_connected();
    a.tick(at(210 + cfg.unreachable_confirm_ms));
    assert_eq!(status(&a, "b"), MemberStatus::Suspect, "waits for c");
    assert!(a.on_indirect_answer(at(750), "b", "c", false).is_empty());
    let fx = a.tick(at(800));
    assert_eq!(status(&a, "b"), MemberStatus::Dead);
    assert!(fx.contains(&Effect::DeclaredDead { id: "b".into() }));
}

#[test]
fn a_helper_that_fails_or_stays_silent_counts_as_not_reaching() {
    let cfg = MembershipConfig::default();
    // Its request failed.
    let (mut a, _) = a_loses_b_while_c_is_connected();
    a.on_request_failed(at(300), "c");
    a.tick(at(210 + cfg.unreachable_confirm_ms));
    assert_eq!(status(&a, "b"), MemberStatus::Dead);
    // No answer at all: the wait ends after the timeout.
    let (mut a, _) = a_loses_b_while_c_is_connected();
    a.tick(at(210 + INDIRECT_PROBE_TIMEOUT_MS - 100));
    assert_eq!(status(&a, "b"), MemberStatus::Suspect);
    a.tick(at(210 + INDIRECT_PROBE_TIMEOUT_MS));
    assert_eq!(status(&a, "b"), MemberStatus::Dead);
    // An answer from a member that was not asked changes nothing.
    let (mut a, _) = a_loses_b_while_c_is_connected();
    assert!(a.on_indirect_answer(at(300), "b", "d", true).is_empty());
    assert_eq!(status(&a, "b"), MemberStatus::Suspect);
}

#[test]
fn a_successful_redial_cancels_the_fast_path() {
    let cfg = MembershipConfig::default();
    let mut a = node("a");
    a.on_announce(at(0), rec("b", 1, MemberStatus::Alive), 1);
    a.on_connected(at(0), "b");
    a.on_disconnected(at(100), "b");
    a.on_dial_failed(at(110), "b");
    a.on_connected(at(300), "b");
    a.tick(at(110 + cfg.unreachable_confirm_ms));
    assert_ne!(status(&a, "b"), MemberStatus::Dead);
}

#[test]
fn a_one_second_pause_changes_nothing() {
    let mut a = node("a");
    a.on_announce(at(0), rec("b", 1, MemberStatus::Alive), 1);
    a.on_connected(at(0), "b");
    let mut t = 0;
    while t < 10_000 {
        // b answers pings every 500 ms except during a 1 s pause from 3 s to 4 s.
        if !(3000..4000).contains(&t) {
            a.on_probe_ok(at(t), "b");
        }
        let fx = a.tick(at(t));
        assert!(
            !fx.iter()
                .any(|e| matches!(e, Effect::DeclaredDead { .. } | Effect::Suspected { .. })),
            "at {t}: {fx:?}"
        );
        t += 100;
    }
    assert_eq!(status(&a, "b"), MemberStatus::Alive);
}

#[test]
fn a_node_that_stood_still_suspects_nobody_when_it_resumes() {
    let cfg = MembershipConfig::default();
    let mut a = node("a");
    for id in ["b", "c"] {
        a.on_announce(at(0), rec(id, 1, MemberStatus::Alive), 1);
        a.on_connected(at(0), id);
    }
    ticks(&mut a, 0, 1_000);
    a.on_probe_ok(at(1_000), "b");
    a.on_probe_ok(at(1_000), "c");
    // Paused past the dead timeout after its tick at 1 000: its first tick
    // after is told so.
    let resumed = cfg.dead_timeout_ms + 2_000;
    a.own_stall(at(resumed), resumed - 1_000);
    let fx = ticks(&mut a, resumed, resumed + cfg.suspect_timeout_ms - 100);
    assert!(
        !fx.iter()
            .any(|e| matches!(e, Effect::DeclaredDead { .. } | Effect::Suspected { .. })),
        "{fx:?}"
    );
    assert!(published(&fx)
        .iter()
        .all(|g| !matches!(g, MembershipGossip::Claim { .. })));
    // A member that stays silent after it is still found out.
    let fx = ticks(
        &mut a,
        resumed + cfg.suspect_timeout_ms,
        resumed + cfg.dead_timeout_ms,
    );
    assert!(
        fx.contains(&Effect::DeclaredDead { id: "b".into() }),
        "{fx:?}"
    );
}

#[test]
fn a_new_subscriber_gets_an_announcement_at_once_but_not_a_flood() {
    let mut a = node("a");
    a.start(at(0));
    let first = published(&a.on_peer_subscribed(at(10)));
    assert!(matches!(&first[..], [MembershipGossip::Announce { .. }]));
    assert!(a.on_peer_subscribed(at(20)).is_empty());
    assert!(a.on_peer_subscribed(at(400)).is_empty());
    assert_eq!(published(&a.on_peer_subscribed(at(600))).len(), 1);
}

#[test]
fn own_evidence_clears_own_suspicion() {
    let cfg = MembershipConfig::default();
    let mut a = node("a");
    a.on_announce(at(0), rec("b", 1, MemberStatus::Alive), 1);
    a.on_connected(at(0), "b");
    a.tick(at(cfg.suspect_timeout_ms));
    assert_eq!(status(&a, "b"), MemberStatus::Suspect);
    a.on_announce(
        at(cfg.suspect_timeout_ms + 10),
        rec("b", 1, MemberStatus::Alive),
        2,
    );
    assert_eq!(status(&a, "b"), MemberStatus::Alive);
}

#[test]
fn subject_refutes_suspicion_with_higher_incarnation() {
    let mut b = node("b");
    let fx = b.on_claim(at(0), "b", 1, MemberStatus::Suspect);
    assert_eq!(b.me().incarnation, 2);
    assert!(fx.contains(&Effect::PersistIncarnation(2)));
    assert!(fx.contains(&Effect::Refuted { incarnation: 2 }));
    let announced = published(&fx);
    assert!(
        matches!(&announced[..], [MembershipGossip::Announce { member, .. }] if member.incarnation == 2)
    );
    // A claim about an older incarnation needs no answer.
    assert!(b.on_claim(at(1), "b", 1, MemberStatus::Dead).is_empty());
}

#[test]
fn higher_incarnation_outranks_dead() {
    let mut a = node("a");
    a.on_announce(at(0), rec("b", 1, MemberStatus::Alive), 1);
    a.on_claim(at(10), "b", 1, MemberStatus::Dead);
    assert_eq!(status(&a, "b"), MemberStatus::Dead);
    // Alive at the same incarnation does not revive it; the subject is told instead.
    let fx = a.on_announce(at(2000), rec("b", 1, MemberStatus::Alive), 2);
    assert_eq!(status(&a, "b"), MemberStatus::Dead);
    assert!(published(&fx).iter().any(|g| matches!(g,
        MembershipGossip::Claim { subject, status: MemberStatus::Dead, .. } if subject == "b")));
    a.on_announce(at(2010), rec("b", 2, MemberStatus::Alive), 1);
    assert_eq!(status(&a, "b"), MemberStatus::Alive);
    assert_eq!(a.member("b").unwrap().record.incarnation, 2);
}

#[test]
fn claims_about_older_incarnations_are_ignored() {
    let mut a = node("a");
    a.on_announce(at(0), rec("b", 5, MemberStatus::Alive), 1);
    a.on_claim(at(1), "b", 4, MemberStatus::Dead);
    assert_eq!(status(&a, "b"), MemberStatus::Alive);
    a.on_sync(at(2), vec![rec("b", 3, MemberStatus::Left)]);
    assert_eq!(status(&a, "b"), MemberStatus::Alive);
}

#[test]
fn hearsay_suspicion_is_not_adopted_but_death_is() {
    let mut a = node("a");
    a.on_announce(at(0), rec("b", 1, MemberStatus::Alive), 1);
    a.on_claim(at(1), "b", 1, MemberStatus::Suspect);
    assert_eq!(status(&a, "b"), MemberStatus::Alive);
    a.on_sync(at(2), vec![rec("b", 1, MemberStatus::Dead)]);
    assert_eq!(status(&a, "b"), MemberStatus::Dead);
}

#[test]
fn left_is_announced_and_adopted() {
    let mut b = node("b");
    let fx = b.leave(at(0));
    let claim = match &published(&fx)[..] {
        [MembershipGossip::Claim {
            subject,
            incarnation,
            status,
            ..
        }] => (subject.clone(), *incarnation, *status),
        other => panic!("unexpected {other:?}"),
    };
    assert_eq!(claim.2, MemberStatus::Left);
    assert!(
        b.tick(at(5000)).is_empty(),
        "a leaving node stops announcing"
    );
    let mut a = node("a");
    a.on_announce(at(0), rec("b", 1, MemberStatus::Alive), 1);
    a.on_claim(at(1), &claim.0, claim.1, claim.2);
    assert_eq!(status(&a, "b"), MemberStatus::Left);
    // Left members are not dialled again.
    let fx = a.on_disconnected(at(2), "b");
    assert!(fx.is_empty());
    assert!(!a
        .tick(at(60_000))
        .iter()
        .any(|e| matches!(e, Effect::Dial { .. })));
}

#[test]
fn exactly_one_side_of_a_connection_starts_the_push_pull() {
    let mut a = node("a");
    let mut b = node("b");
    let syncs = |fx: Vec<Effect>| {
        fx.iter()
            .filter(|e| matches!(e, Effect::Sync { .. }))
            .count()
    };
    assert_eq!(
        syncs(a.on_connected(at(0), "b")) + syncs(b.on_connected(at(0), "a")),
        1
    );
}

#[test]
fn a_member_learnt_after_its_connection_counts_as_connected() {
    let mut a = node("a");
    a.on_connected(at(0), "b");
    let fx = a.on_sync(at(1), vec![rec("b", 1, MemberStatus::Alive)]);
    assert!(
        !fx.iter().any(|e| matches!(e, Effect::Dial { .. })),
        "no dial to a connected peer"
    );
    assert!(a.member("b").unwrap().connected);
}

#[test]
fn a_node_behind_its_own_record_jumps_above_it() {
    let mut a = node("a");
    let fx = a.on_sync(at(0), vec![rec("a", 5, MemberStatus::Alive)]);
    assert_eq!(a.me().incarnation, 6);
    assert!(fx.contains(&Effect::PersistIncarnation(6)));
    assert!(a
        .on_sync(at(1), vec![rec("a", 6, MemberStatus::Alive)])
        .is_empty());
}

#[test]
fn absurd_incarnations_from_peers_are_refused() {
    let mut a = node("a");
    a.on_announce(at(0), rec("b", 1, MemberStatus::Alive), 1);
    a.on_claim(at(1), "b", u64::MAX, MemberStatus::Dead);
    a.on_sync(at(2), vec![rec("b", u64::MAX, MemberStatus::Dead)]);
    assert_eq!(status(&a, "b"), MemberStatus::Alive);
    assert!(a
        .on_claim(at(3), "a", u64::MAX, MemberStatus::Dead)
        .is_empty());
    assert_eq!(a.me().incarnation, 1);
}

#[test]
fn local_suspicion_is_neither_sent_nor_taken() {
    let cfg = MembershipConfig::default();
    let mut a = node("a");
    a.on_announce(at(0), rec("b", 1, MemberStatus::Alive), 1);
    a.on_connected(at(0), "b");
    a.tick(at(cfg.suspect_timeout_ms));
    assert_eq!(status(&a, "b"), MemberStatus::Suspect);
    let sent = a.table();
    assert!(sent.iter().all(|r| r.status != MemberStatus::Suspect));
    let mut c = node("c");
    c.on_sync(at(0), vec![rec("b", 1, MemberStatus::Suspect)]);
    assert_eq!(status(&c, "b"), MemberStatus::Alive);
}

#[test]
fn push_pull_teaches_the_whole_table() {
    let mut a = node("a");
    let fx = a.on_sync(
        at(0),
        vec![
            rec("b", 1, MemberStatus::Alive),
            rec("c", 3, MemberStatus::Alive),
            rec("d", 1, MemberStatus::Dead),
            rec("a", 1, MemberStatus::Alive),
        ],
    );
    assert_eq!(a.table().len(), 4);
    assert!(!fx.iter().any(|e| matches!(e, Effect::Dial { .. })));
    let dialled: Vec<_> = a
        .tick(at(MembershipConfig::default().redial_interval_ms))
        .into_iter()
        .filter_map(|e| match e {
            Effect::Dial { id, .. } => Some(id),
            _ => None,
        })
        .collect();
    assert_eq!(dialled, vec!["b", "c"]);
}

#[test]
fn forget_only_gone_members_and_keep_them_forgotten() {
    let mut a = node("a");
    a.on_announce(at(0), rec("b", 2, MemberStatus::Alive), 1);
    assert!(matches!(a.forget("b"), Err(ForgetError::NotGone { .. })));
    assert!(matches!(a.forget("zz"), Err(ForgetError::Unknown(_))));
    assert!(matches!(a.forget("a"), Err(ForgetError::IsSelf)));
    a.on_claim(at(1), "b", 2, MemberStatus::Dead);
    let fx = a.forget("b").unwrap();
    assert!(fx.contains(&Effect::Forgotten {
        id: "b".into(),
        incarnation: 2
    }));
    assert!(a.member("b").is_none());
    // Gossip of the old life does not bring it back; a new life does.
    a.on_sync(at(2), vec![rec("b", 2, MemberStatus::Dead)]);
    assert!(a.member("b").is_none());
    a.on_announce(at(3), rec("b", 3, MemberStatus::Alive), 1);
    assert_eq!(status(&a, "b"), MemberStatus::Alive);
}

#[test]
fn an_absurd_forget_from_a_peer_leaves_no_tombstone() {
    let mut a = node("a");
    a.on_announce(at(0), rec("b", 1, MemberStatus::Alive), 1);
    a.on_forget(at(10), "b", MAX_INCARNATION + 1);
    // b is still taken at its next life.
    a.on_announce(at(20), rec("b", 2, MemberStatus::Alive), 2);
    assert_eq!(a.member("b").map(|m| m.record.incarnation), Some(2));
}

#[test]
fn dead_members_expire_after_ttl() {
    let cfg = MembershipConfig {
        dead_member_ttl_ms: 10_000,
        ..Default::default()
    };
    let mut a = Membership::new(rec("a", 1, MemberStatus::Alive), vec![], vec![], cfg);
    a.on_announce(at(0), rec("b", 1, MemberStatus::Alive), 1);
    a.on_claim(at(100), "b", 1, MemberStatus::Dead);
    a.tick(at(10_099));
    assert!(a.member("b").is_some());
    let fx = a.tick(at(10_100));
    assert!(fx.contains(&Effect::Forgotten {
        id: "b".into(),
        incarnation: 1
    }));
    assert!(a.member("b").is_none());
}

#[test]
fn restart_dials_known_members_and_gives_grace() {
    let known = vec![
        (rec("b", 1, MemberStatus::Alive), 0),
        (rec("c", 1, MemberStatus::Dead), 0),
    ];
    let mut a = Membership::new(
        rec("a", 2, MemberStatus::Alive),
        known,
        vec![],
        MembershipConfig::default(),
    );
    let fx = a.start(at(50_000));
    assert!(fx
        .iter()
        .any(|e| matches!(e, Effect::Dial { id, .. } if id == "b")));
    assert!(!fx
        .iter()
        .any(|e| matches!(e, Effect::Dial { id, .. } if id == "c")));
    assert!(!a
        .tick(at(50_100))
        .iter()
        .any(|e| matches!(e, Effect::Suspected { .. })));
}

mod prop {
    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, Clone)]
    enum Input {
        Announce(u8, u64, MemberStatus),
        Claim(u8, u64, MemberStatus),
        Sync(u8, u64, MemberStatus),
        Probe(u8),
        Up(u8),
        Down(u8),
        DialFailed(u8),
        Tick(u64),
    }

    fn status_strategy() -> impl Strategy<Value = MemberStatus> {
        prop_oneof![
            Just(MemberStatus::Alive),
            Just(MemberStatus::Suspect),
            Just(MemberStatus::Dead),
            Just(MemberStatus::Left)
        ]
    }

    fn input() -> impl Strategy<Value = Input> {
        let id = 0u8..4;
        let inc = 0u64..5;
        prop_oneof![
            (id.clone(), inc.clone(), status_strategy())
                .prop_map(|(i, n, s)| Input::Announce(i, n, s)),
            (id.clone(), inc.clone(), status_strategy())
                .prop_map(|(i, n, s)| Input::Claim(i, n, s)),
            (id.clone(), inc, status_strategy()).prop_map(|(i, n, s)| Input::Sync(i, n, s)),
            id.clone().prop_map(Input::Probe),
            id.clone().prop_map(Input::Up),
            id.clone().prop_map(Input::Down),
            id.prop_map(Input::DialFailed),
            (0u64..3000).prop_map(Input::Tick),
        ]
    }

    proptest! {
        /// Whatever arrives, in whatever order: a member's incarnation never goes
        /// down, this node's own incarnation only grows and always outranks any
        /// claim it has seen about itself, and the node never declares itself gone.
        #[test]
        fn incarnations_are_monotonic(inputs in proptest::collection::vec(input(), 1..200)) {
            let ids = ["a", "b", "c", "d"];
            let mut m = node("a");
            let mut t = 0u64;
            let mut seen: std::collections::HashMap<String, u64> = Default::default();
            let mut max_claim_about_me = 0u64;
            for i in inputs {
                let now = at(t);
                match i {
                    Input::Announce(x, n, s) => { m.on_announce(now, rec(ids[x as usize], n, s), t); }
                    Input::Claim(x, n, s) => {
                        if x == 0 && s != MemberStatus::Alive { max_claim_about_me = max_claim_about_me.max(n); }
                        m.on_claim(now, ids[x as usize], n, s);
                    }
                    Input::Sync(x, n, s) => {
                        if x == 0 && matches!(s, MemberStatus::Dead | MemberStatus::Left) { max_claim_about_me = max_claim_about_me.max(n); }
                        m.on_sync(now, vec![rec(ids[x as usize], n, s)]);
                    }
                    Input::Probe(x) => { m.on_probe_ok(now, ids[x as usize]); }
                    Input::Up(x) => { m.on_connected(now, ids[x as usize]); }
                    Input::Down(x) => { m.on_disconnected(now, ids[x as usize]); }
                    Input::DialFailed(x) => { m.on_dial_failed(now, ids[x as usize]); }
                    Input::Tick(d) => { t += d; m.tick(at(t)); }
                }
                prop_assert_eq!(m.me().status, MemberStatus::Alive);
                prop_assert!(m.me().incarnation > max_claim_about_me);
                for r in m.table() {
                    let prev = seen.insert(r.id.clone(), r.incarnation).unwrap_or(0);
                    prop_assert!(r.incarnation >= prev, "incarnation of {} went down", r.id);
                }
            }
        }
    }
}

#[test]
fn a_connected_peer_whose_table_has_not_arrived_is_unknown_until_it_does() {
    let mut a = node("a");
    assert!(!a.has_unknown_connection());
    a.on_connected(at(0), "b");
    // Connected, but nothing heard of it yet: it might be the smallest.
    assert!(a.has_unknown_connection());
    a.on_announce(at(10), rec("b", 1, MemberStatus::Alive), 1);
    assert!(!a.has_unknown_connection());
}
