//! Real `kiln` processes in network namespaces: an active cut off by nftables never
//! acknowledges a write once a new active is elected, and after healing it holds
//! the same data as the new active. Needs root, iproute2 and nftables (`.ci/run`
//! installs them). Deadlines only guard against hanging.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kiln_integration::netns::Lab;
use kiln_integration::*;

const LONG: Duration = Duration::from_secs(90);

/// Three nodes, each in a namespace of a new lab, the first seeding the
/// others (`prefix1`..`prefix3`). Bound in this order, the nodes are dropped
/// before their directories and the lab.
fn lab_cluster(prefix: &str, secret: &str) -> (Lab, Vec<tempfile::TempDir>, Vec<Node>) {
    let lab = Lab::new(3).unwrap_or_else(|e| panic!("cannot build the network namespaces: {e}"));
    let opts = |i: usize, seeds: Vec<String>| NodeOpts {
        netns: Some(lab.namespace(i)),
        secret: Some(secret.into()),
        seeds,
        ..Default::default()
    };
    let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let first = Node::start_in(
        &format!("{prefix}1"),
        dirs[0].path(),
        lab.ip(0),
        opts(0, vec![]),
    );
    let seed = first.seed();
    let mut nodes = vec![first];
    for (i, dir) in dirs.iter().enumerate().skip(1) {
        nodes.push(Node::start_in(
            &format!("{prefix}{}", i + 1),
            dir.path(),
            lab.ip(i),
            opts(i, vec![seed.clone()]),
        ));
    }
    (lab, dirs, nodes)
}

#[test]
fn a_cut_off_active_acknowledges_nothing_after_the_election_and_converges_after_healing() {
    let _serial = serial();
    let (lab, _dirs, nodes) = lab_cluster("part", "partition-test");
    let ids = wait_converged(&nodes, LONG);
    let mut active = String::new();
    let mut epoch = 0;
    wait_until("an active with 2 in-sync standbys, 3 voters", LONG, || {
        nodes[0].get("/v1/cluster/stripes").is_some_and(|v| {
            let m = v["stripes"][0]["members"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            active = v["stripes"][0]["active"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            epoch = v["stripes"][0]["epoch"].as_u64().unwrap_or(0);
            m.iter().filter(|m| m["role"] == "standby").count() == 2 && can_fail_over(&v)
        })
    });
    let old = ids.iter().position(|i| *i == active).unwrap();
    let others: Vec<usize> = (0..3).filter(|i| *i != old).collect();

    // Writers: two through the majority side, one straight at the old active.
    let stop = Arc::new(AtomicBool::new(false));
    // key → (value, when acknowledged, node written to)
    type Acked = BTreeMap<String, (String, Instant, usize)>;
    let acked: Arc<Mutex<Acked>> = Arc::default();
    let writers: Vec<_> = [others[0], others[1], old]
        .into_iter()
        .enumerate()
        .map(|(w, target)| {
            let (stop, acked) = (stop.clone(), acked.clone());
            let http = nodes[target].http();
            std::thread::spawn(move || {
                let agent = ureq::AgentBuilder::new()
                    .timeout(Duration::from_secs(10))
                    .build();
                let mut i = 0;
                while !stop.load(Ordering::SeqCst) {
                    let key = format!("p{w}-{i}");
                    let value = format!("v{w}-{i}");
                    if agent
                        .put(&format!("http://{http}/v1/kv/test/{key}"))
                        .send_string(&value)
                        .is_ok()
                    {
                        acked
                            .lock()
                            .unwrap()
                            .insert(key, (value, Instant::now(), target));
                    }
                    i += 1;
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(1));
    let cut_at = Instant::now();
    lab.cut(old).unwrap();
    // The majority side elects a new active.
    // Polled by hand, not by `wait_until`: a timeout shows what the majority
    // side believed (its control-plane leader, epoch, in-sync set).
    let elected_at = loop {
        let views: Vec<Option<serde_json::Value>> = others
            .iter()
            .map(|i| nodes[*i].get("/v1/cluster/stripes"))
            .collect();
        let elected = views[0].as_ref().is_some_and(|v| {
            v["stripes"][0]["epoch"].as_u64().unwrap_or(0) > epoch
                && v["stripes"][0]["active"]
                    .as_str()
                    .is_some_and(|a| a != active)
        });
        if elected {
            break Instant::now();
        }
        assert!(
            cut_at.elapsed() < LONG,
            "timed out after {LONG:?} waiting until the majority side elects a new active \
             (the cut-off one is {active}, epoch {epoch}); the majority's views: {views:#?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    std::thread::sleep(Duration::from_secs(3));
    {
        let acked = acked.lock().unwrap();
        let late: Vec<&String> = acked
            .iter()
            .filter(|(_, (_, at, target))| *target == old && *at > elected_at)
            .map(|(k, _)| k)
            .collect();
        assert!(
            late.is_empty(),
            "the cut-off active acknowledged {late:?} after the election"
        );
        let before = acked
            .values()
            .filter(|(_, at, target)| *target == old && *at < cut_at)
            .count();
        assert!(
            before > 0,
            "the writer at the old active worked before the cut"
        );
    }
    lab.heal(old).unwrap();
    wait_until("the old active is an in-sync standby again", LONG, || {
        nodes[others[0]]
            .get("/v1/cluster/stripes")
            .is_some_and(|v| {
                v["stripes"][0]["members"].as_array().is_some_and(|m| {
                    m.iter()
                        .any(|m| m["id"] == ids[old].as_str() && m["role"] == "standby")
                })
            })
    });
    stop.store(true, Ordering::SeqCst);
    for w in writers {
        w.join().unwrap();
    }
    // Same data: every acknowledged write, read from the old active's own copy,
    // equals the new active's answer.
    let acked = acked.lock().unwrap().clone();
    assert!(acked.len() > 50, "only {} writes acknowledged", acked.len());
    let agent = ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(10))
        .build();
    let read = |node: &Node, key: &str, stale: bool| -> Option<String> {
        let q = if stale { "?stale=true" } else { "" };
        agent
            .get(&format!("http://{}/v1/kv/test/{key}{q}", node.http()))
            .call()
            .ok()?
            .into_string()
            .ok()
    };
    wait_until("the old active has applied everything", LONG, || {
        acked
            .iter()
            .rev()
            .take(20)
            .all(|(k, (v, ..))| read(&nodes[old], k, true).as_deref() == Some(v.as_str()))
    });
    for (k, (v, ..)) in &acked {
        assert_eq!(
            read(&nodes[others[1]], k, false).as_deref(),
            Some(v.as_str()),
            "key {k} on the new active"
        );
        assert_eq!(
            read(&nodes[old], k, true).as_deref(),
            Some(v.as_str()),
            "key {k} on the old active"
        );
    }
}

/// Two nodes that cannot reach each other while both reach a third are not dead:
/// the third still hears both. Before indirect probes, each declared the other
/// dead half a second after a refused redial, the claim spread to every node,
/// the subject refuted it, and the pair flapped dead/alive cluster-wide for as
/// long as the cut lasted.
#[test]
fn a_pair_that_cannot_reach_each_other_is_not_declared_dead() {
    let _serial = serial();
    let (lab, _dirs, nodes) = lab_cluster("pair", "pair-cut-test");
    let ids = wait_converged(&nodes, LONG);
    let incarnations = |node: &Node| -> BTreeMap<String, u64> {
        node.get("/v1/cluster/members")
            .and_then(|v| v["members"].as_array().cloned())
            .unwrap_or_default()
            .iter()
            .map(|m| {
                (
                    m["id"].as_str().unwrap_or_default().to_string(),
                    m["incarnation"].as_u64().unwrap_or(0),
                )
            })
            .collect()
    };
    let connected = |node: &Node, id: &str| -> Option<bool> {
        node.get("/v1/cluster/members")?["members"]
            .as_array()?
            .iter()
            .find(|m| m["id"] == id)?["connected"]
            .as_bool()
    };
    // A full mesh first: a node that has not connected to the third yet has
    // nobody to ask, and takes the fast path as before.
    wait_until("every node connected to every other", LONG, || {
        (0..3).all(|a| (0..3).all(|b| a == b || connected(&nodes[a], &ids[b]) == Some(true)))
    });
    let before = incarnations(&nodes[2]);
    let dial_errors =
        |node: &Node| node.metric_sum("libp2p_swarm_outgoing_connection_error_total", "");
    let dial_errors_before = dial_errors(&nodes[0]) + dial_errors(&nodes[1]);

    lab.cut_between(0, 1).unwrap();
    // Long enough for several rounds of connection loss, refused redials and
    // (before the fix) claims and refutations.
    let watch_until = Instant::now() + Duration::from_secs(15);
    let mut seen_gone: Vec<String> = Vec::new();
    let mut seen_unlinked = false;
    while Instant::now() < watch_until {
        seen_unlinked |= connected(&nodes[0], &ids[1]) == Some(false);
        for (n, node) in nodes.iter().enumerate() {
            for (id, state) in node.member_states().unwrap_or_default() {
                if state == "dead" || state == "left" {
                    seen_gone.push(format!("node {n} held {id} {state}"));
                }
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        seen_gone.is_empty(),
        "a node was declared gone while the third node heard it: {:?}",
        &seen_gone[..seen_gone.len().min(5)]
    );
    assert_eq!(
        incarnations(&nodes[2]),
        before,
        "a member refuted a claim of death during the cut"
    );
    assert!(
        seen_unlinked,
        "the pair never lost its connection: the cut did not work"
    );
    // Redials of an unreachable peer back off: requests sent its way (the
    // control-plane leader's, a stripe's) no longer each dial it. Before, the
    // pair made ~360 failed dials in these 15 s; now ~20.
    let dials = dial_errors(&nodes[0]) + dial_errors(&nodes[1]) - dial_errors_before;
    assert!(
        dials < 120.0,
        "{dials} failed dials between the pair in 15 s: requests are not backing off"
    );
    for n in &nodes {
        assert!(
            !n.log().contains("same --cluster-secret"),
            "{}: a refused connection was taken for a secret mismatch",
            n.name
        );
    }
    assert!(
        nodes[0].log().contains("another member reaches it")
            || nodes[1].log().contains("another member reaches it"),
        "neither node of the pair said it reaches the other only through others"
    );

    lab.heal_between(0, 1).unwrap();
    wait_until(
        "every node alive for every node after healing",
        LONG,
        || nodes.iter().all(|n| n.alive().len() == 3),
    );
}

/// A node whose link to its stripe's active is down while both reach the
/// third node still serves client writes and linearizable reads: the requests
/// go through the third node, which passes them on. Before, every request
/// through that node waited out the request timeout and failed with 503 for as
/// long as the cut lasted. A write whose answer the cut dropped, sent again
/// through the relay, is applied once.
#[test]
fn a_node_cut_off_from_the_active_only_relays_client_requests_through_another_member() {
    let _serial = serial();
    let (lab, _dirs, nodes) = lab_cluster("relay", "relay-test");
    let ids = wait_converged(&nodes, LONG);
    let index_of = |id: &str| ids.iter().position(|i| i == id);
    // The active, and the control-plane leader, once the stripe is in sync.
    let mut roles = (0, 0);
    wait_until(
        "an active with 2 in-sync standbys and a leader",
        LONG,
        || {
            let Some(v) = nodes[0].get("/v1/cluster/stripes") else {
                return false;
            };
            let s = &v["stripes"][0];
            let standbys = s["members"]
                .as_array()
                .map(|m| m.iter().filter(|m| m["role"] == "standby").count())
                .unwrap_or(0);
            match (
                s["active"].as_str().and_then(index_of),
                v["leader"].as_str().and_then(index_of),
            ) {
                (Some(a), Some(l)) if standbys == 2 && can_fail_over(&v) => {
                    roles = (a, l);
                    true
                }
                _ => false,
            }
        },
    );
    let (active, leader) = roles;
    // Cut off from the active a standby that does not lead the control plane
    // (a leader cut from the active would have it replaced instead).
    let cut = (0..3)
        .find(|i| *i != active && *i != leader)
        .unwrap_or_else(|| {
            (0..3)
                .find(|i| *i != active)
                .expect("three nodes, one active")
        });
    let through = nodes[cut].http();
    // Writers busy through that node as the link goes down: the writes whose
    // answers the cut drops are sent again through the relay, a second copy of
    // each in the log (see `CreateOnlyWriters`).
    let to = through.clone();
    let writers = CreateOnlyWriters::start(8, "relay", "w", None, move |_, _| to.clone());
    wait_until("writes through the node going", LONG, || {
        writers.acked() >= 200
    });
    lab.cut_between(active, cut).unwrap();
    let agent = ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(30))
        .build();
    for k in 0..20 {
        let put = agent
            .put(&format!("http://{through}/v1/kv/relay/k{k}"))
            .send_string(&format!("v{k}"));
        let status = match put {
            Ok(r) => r.status(),
            Err(ureq::Error::Status(s, r)) => {
                panic!(
                    "write {k} through the cut-off node: {s} {}",
                    r.into_string().unwrap_or_default()
                )
            }
            Err(e) => panic!("write {k} through the cut-off node: {e}"),
        };
        assert_eq!(status, 200);
        let read = agent
            .get(&format!("http://{through}/v1/kv/relay/k{k}"))
            .call()
            .unwrap_or_else(|e| panic!("read {k} through the cut-off node: {e}"));
        assert_eq!(read.into_string().unwrap_or_default(), format!("v{k}"));
    }
    let acked = writers.stop();
    for (key, value) in &acked {
        let read = agent
            .get(&format!(
                "http://{}/v1/kv/relay/{key}",
                nodes[active].http()
            ))
            .call()
            .unwrap_or_else(|e| panic!("read {key} from the active: {e}"));
        assert_eq!(&read.into_string().unwrap_or_default(), value);
    }
    let relayed = nodes[cut].metric_sum("kiln_kv_request_seconds_count", "route=\"relayed\"");
    assert!(
        relayed >= 20.0,
        "only {relayed} requests went through the relay"
    );
    // Every write is the active's, too.
    for k in 0..20 {
        let read = agent
            .get(&format!("http://{}/v1/kv/relay/k{k}", nodes[active].http()))
            .call()
            .unwrap_or_else(|e| panic!("read {k} from the active: {e}"));
        assert_eq!(read.into_string().unwrap_or_default(), format!("v{k}"));
    }
    lab.heal_between(active, cut).unwrap();
}

/// A voter cut off from the others starts no control-plane election it
/// cannot win (pre-vote), so when it is back it follows the leader at once
/// and deposes nobody. Before, it raised its term about three times a second;
/// back on the network it refused the leader's appends, kept a stale view of
/// the stripes, and finally forced an election.
#[test]
fn a_voter_cut_off_from_the_others_raises_no_term_and_deposes_no_leader() {
    let _serial = serial();
    let (lab, _dirs, nodes) = lab_cluster("prevote", "pre-vote-test");
    let ids = wait_converged(&nodes, LONG);
    let term_of = |i: usize| nodes[i].metric_value("kiln_control_term");
    let leader_seen_by = |i: usize| {
        nodes[i]
            .get("/v1/cluster/stripes")
            .and_then(|v| v["leader"].as_str().map(String::from))
    };
    // Three voters that agree on the leader and the term.
    let mut before = (String::new(), 0.0);
    wait_until("three voters agreeing on leader and term", LONG, || {
        let voters = nodes[0]
            .get("/v1/cluster/stripes")
            .and_then(|v| v["voters"].as_array().map(Vec::len))
            .unwrap_or(0);
        let leaders: Vec<Option<String>> = (0..3).map(leader_seen_by).collect();
        let terms: Vec<Option<f64>> = (0..3).map(term_of).collect();
        match (&leaders[0], terms[0]) {
            (Some(l), Some(t))
                if voters == 3
                    && leaders.iter().all(|x| x.as_ref() == Some(l))
                    && terms.iter().all(|x| *x == Some(t)) =>
            {
                before = (l.clone(), t);
                true
            }
            _ => false,
        }
    });
    let (leader, term) = before;
    let follower = (0..3)
        .find(|i| ids[*i] != leader)
        .expect("three voters, one leader");

    // Several election timeouts (700–800 ms, then 300–400 ms) without a leader.
    lab.cut(follower).unwrap();
    std::thread::sleep(Duration::from_secs(4));
    lab.heal(follower).unwrap();

    // Back: every node sees every node alive, then time for anything to
    // happen (several election timeouts and the leader's 500 ms retry pause,
    // with room for a loaded machine).
    wait_converged(&nodes, LONG);
    std::thread::sleep(Duration::from_secs(3));
    for (i, node) in nodes.iter().enumerate() {
        assert_eq!(
            term_of(i),
            Some(term),
            "{}: the control-plane term moved (it was {term}, leader {leader})",
            node.name
        );
        assert_eq!(leader_seen_by(i), Some(leader.clone()), "{}", node.name);
    }
}
