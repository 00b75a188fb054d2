//! Real `kiln` processes: the control plane places nodes in stripes, keeps 1, 3 or
//! 5 voters (witnesses first), replaces a dead voter, elects a new leader, and
//! keeps every decision across a full restart. Deadlines only guard against hanging.

use std::collections::BTreeSet;
use std::time::Duration;

use kiln_integration::*;
use serde_json::Value;

const SECRET: &str = "control-plane-test-secret";
const LONG: Duration = Duration::from_secs(90);

fn opts(extra: &[&str]) -> NodeOpts {
    NodeOpts {
        secret: Some(SECRET.into()),
        extra: extra.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

fn stripes(n: &Node) -> Option<Value> {
    n.get("/v1/cluster/stripes")
}

fn voters(v: &Value) -> BTreeSet<String> {
    v["voters"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

/// (stripe id, member id, role) of every stripe member, sorted.
fn placement(v: &Value) -> Vec<(u64, String, String)> {
    let mut out = Vec::new();
    for st in v["stripes"].as_array().map(|a| a.as_slice()).unwrap_or(&[]) {
        for m in st["members"]
            .as_array()
            .map(|a| a.as_slice())
            .unwrap_or(&[])
        {
            out.push((
                st["id"].as_u64().unwrap_or(u64::MAX),
                m["id"].as_str().unwrap_or_default().to_string(),
                m["role"].as_str().unwrap_or_default().to_string(),
            ));
        }
    }
    out.sort();
    out
}

/// Waits until every node reports the same placement and voters, with `placed`
/// nodes placed, `n_voters` voters and a leader; returns that view.
fn wait_agreed(nodes: &[&Node], placed: usize, n_voters: usize) -> Value {
    let mut agreed = Value::Null;
    wait_until(
        &format!(
            "{} nodes agree on {placed} placed, {n_voters} voters",
            nodes.len()
        ),
        LONG,
        || {
            let views: Vec<Value> = match nodes.iter().map(|n| stripes(n)).collect() {
                Some(v) => v,
                None => return false,
            };
            let first = &views[0];
            // A voter change counts once it is complete everywhere: a leader
            // lost half-way through growing from one voter takes the only vote
            // of the old set with it.
            let ok = placement(first).len() == placed
                && voters(first).len() == n_voters
                && first["leader"].is_string()
                && views.iter().all(|v| {
                    placement(v) == placement(first)
                        && voters(v) == voters(first)
                        && v["leader"] == first["leader"]
                        && v["voters_changing"] == false
                });
            if ok {
                agreed = first.clone();
            }
            ok
        },
    );
    agreed
}

#[test]
fn nodes_are_placed_in_the_emptiest_stripe_and_every_node_agrees() {
    let _serial = serial();
    let nodes = start_cluster("cpp", 3, opts(&["--stripes", "2"]));
    let ids = wait_converged(&nodes, LONG);
    let all: Vec<&Node> = nodes.iter().collect();
    let view = wait_agreed(&all, 3, 3);

    let stripes = view["stripes"].as_array().unwrap();
    assert_eq!(stripes.len(), 2);
    let sizes: Vec<usize> = stripes
        .iter()
        .map(|s| s["members"].as_array().unwrap().len())
        .collect();
    assert_eq!(
        sizes,
        vec![2, 1],
        "the third node went to the emptier stripe"
    );
    for s in stripes {
        assert_eq!(s["slots"], 128);
        assert_eq!(s["epoch"], 1);
        let active = s["active"].as_str().expect("every stripe has an active");
        assert!(ids.iter().any(|i| i == active));
    }
    assert_eq!(voters(&view), ids.iter().cloned().collect());
    assert_eq!(view["warnings"], serde_json::json!([]));
    // Each node knows its own place.
    for n in &nodes {
        let p = stripes_of(n);
        assert!(p.starts_with("stripe "), "{}: {p}", n.name);
    }
    // `kiln status` prints the stripes.
    let out = kiln_cli(&["status", "--http", &nodes[1].http()]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("STRIPE") && text.contains("active"), "{text}");

    // A node joining with another stripe count is placed in the cluster's
    // stripes and says that its count had no effect; the others said nothing.
    let mut o = opts(&["--stripes", "5"]);
    o.seeds.push(nodes[0].seed());
    let late = Node::start("cpp4", o);
    wait_until("the late node knows its place", LONG, || {
        stripes_of(&late).starts_with("stripe ")
    });
    wait_until("the late node warns of its ignored --stripes", LONG, || {
        late.log().contains("--stripes 5 ignored")
    });
    let view = late
        .get("/v1/cluster/stripes")
        .expect("the late node answers");
    assert_eq!(view["stripes"].as_array().map(Vec::len), Some(2));
    for n in &nodes {
        assert!(!n.log().contains("ignored: this node joined"), "{}", n.name);
    }
}

fn stripes_of(n: &Node) -> String {
    stripes(n)
        .and_then(|v| v["placement"].as_str().map(String::from))
        .unwrap_or_default()
}

#[test]
fn a_dead_leader_is_replaced_as_leader_and_as_voter() {
    let _serial = serial();
    let mut nodes = start_cluster("cpv", 4, opts(&["--voter-replace-after-s", "2"]));
    let ids = wait_converged(&nodes, LONG);
    let all: Vec<&Node> = nodes.iter().collect();
    let view = wait_agreed(&all, 4, 3);
    let leader = view["leader"].as_str().unwrap().to_string();
    let before = voters(&view);
    assert!(before.contains(&leader));
    let spare = ids
        .iter()
        .find(|i| !before.contains(*i))
        .expect("one node is not a voter")
        .clone();

    let victim = ids.iter().position(|i| *i == leader).unwrap();
    nodes[victim].kill9();
    let survivors: Vec<&Node> = nodes
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != victim)
        .map(|(_, n)| n)
        .collect();
    wait_until(
        "a new control-plane leader and the dead voter replaced",
        LONG,
        || {
            survivors.iter().all(|n| {
                stripes(n).is_some_and(|v| {
                    let vs = voters(&v);
                    v["leader"].as_str().is_some_and(|l| l != leader)
                        && vs.len() == 3
                        && !vs.contains(&leader)
                        && vs.contains(&spare)
                })
            })
        },
    );
}

#[test]
fn a_witness_completes_the_majority_of_a_two_node_stripe() {
    let _serial = serial();
    let nodes = start_cluster("cpw", 2, opts(&[]));
    wait_converged(&nodes, LONG);
    let pair: Vec<&Node> = nodes.iter().collect();
    let view = wait_agreed(&pair, 2, 1);
    let warnings = view["warnings"].to_string();
    assert!(warnings.contains("cannot fail over safely"), "{warnings}");

    let witness = Node::start(
        "cpw-witness",
        NodeOpts {
            seeds: vec![nodes[0].seed()],
            ..opts(&["--witness"])
        },
    );
    let witness_id = witness.id();
    let all: Vec<&Node> = nodes.iter().chain(std::iter::once(&witness)).collect();
    let view = wait_agreed(&all, 2, 3);
    assert!(voters(&view).contains(&witness_id));
    assert_eq!(view["witnesses"], serde_json::json!([witness_id]));
    assert!(placement(&view).iter().all(|(_, id, _)| *id != witness_id));
    assert_eq!(stripes_of(&witness), "witness");
    assert_eq!(view["warnings"], serde_json::json!([]));

    // A stripe member started again as a witness would leave its stripe
    // counting a member that serves nothing: it refuses, saying why.
    let mut nodes = nodes;
    let mut args = nodes[1].args.clone();
    args.push("--witness".into());
    nodes[1].restart_with(args);
    let code = nodes[1].wait_exit(LONG);
    assert_eq!(code, Some(1), "a data node started with --witness exits");
    let log = nodes[1].log();
    assert!(log.contains("cannot run as a witness"), "{log}");
}

/// Waits until a key/value write on `node` is acknowledged.
fn wait_write_succeeds(node: &Node) {
    let agent = ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(10))
        .build();
    wait_until(&format!("a write on {} succeeds", node.name), LONG, || {
        agent
            .put(&format!("http://{}/v1/kv/m/k", node.http()))
            .send_bytes(b"v")
            .is_ok()
    });
}

#[test]
fn a_witness_gone_for_good_leaves_one_voter_and_the_survivor_of_the_next_failure_serves() {
    let _serial = serial();
    let mut nodes = start_cluster("cpg", 2, opts(&["--voter-replace-after-s", "2"]));
    wait_converged(&nodes, LONG);
    let mut witness = Node::start(
        "cpg-witness",
        NodeOpts {
            seeds: vec![nodes[0].seed()],
            ..opts(&["--witness", "--voter-replace-after-s", "2"])
        },
    );
    let all: Vec<&Node> = nodes.iter().chain(std::iter::once(&witness)).collect();
    wait_agreed(&all, 2, 3);

    // The witness dies for good; nobody can take its place. Kept as a voter,
    // it would make both servers needed for every decision.
    witness.kill9();
    let pair: Vec<&Node> = nodes.iter().collect();
    let view = wait_agreed(&pair, 2, 1);
    let warnings = view["warnings"].to_string();
    assert!(warnings.contains("cannot fail over safely"), "{warnings}");

    // The server that is not the voter fails: the voter decides alone (drops
    // it from the in-sync set, or takes the active role) and writes go on.
    let voter = voters(&view).into_iter().next().unwrap_or_default();
    let other = nodes.iter().position(|n| n.id() != voter).unwrap_or(0);
    nodes[other].kill9();
    let survivor = &nodes[1 - other];
    wait_write_succeeds(survivor);
}

#[test]
fn a_graceful_stop_of_the_only_voter_hands_its_vote_over_and_writes_go_on() {
    let _serial = serial();
    let mut nodes = start_cluster("cps", 2, opts(&[]));
    wait_converged(&nodes, LONG);
    let pair: Vec<&Node> = nodes.iter().collect();
    let view = wait_agreed(&pair, 2, 1);
    let voter = voters(&view).into_iter().next().unwrap_or_default();
    let v = nodes.iter().position(|n| n.id() == voter).unwrap_or(0);
    // Stopped for maintenance: it hands its stripe role and its vote over, so
    // the other server can still drop it from the in-sync set and go on.
    assert_eq!(nodes[v].terminate(), Some(0));
    let survivor = &nodes[1 - v];
    wait_write_succeeds(survivor);
    let view = stripes(survivor).unwrap_or_default();
    assert_eq!(voters(&view), BTreeSet::from([survivor.id()]));
}

#[test]
fn every_decision_survives_a_full_restart_in_reverse_order() {
    let _serial = serial();
    let mut nodes = start_cluster("cpr", 3, opts(&["--stripes", "2"]));
    wait_converged(&nodes, LONG);
    let all: Vec<&Node> = nodes.iter().collect();
    let before = wait_agreed(&all, 3, 3);
    for n in nodes.iter_mut() {
        assert_eq!(n.terminate(), Some(0));
    }
    for n in nodes.iter_mut().rev() {
        n.restart();
    }
    let all: Vec<&Node> = nodes.iter().collect();
    let after = wait_agreed(&all, 3, 3);
    // Same places and voters (roles may move: a standby back first may be elected).
    let places = |v: &Value| -> Vec<(u64, String)> {
        placement(v).into_iter().map(|(k, id, _)| (k, id)).collect()
    };
    assert_eq!(places(&after), places(&before));
    assert_eq!(voters(&after), voters(&before));
}

/// openraft stops a control plane for good at its first storage error: the node
/// must not go on as a voter that silently decides nothing. It leaves and exits
/// with an error naming `control.redb` (a supervisor restarts it).
#[test]
fn a_node_whose_control_log_cannot_be_written_exits_naming_the_file() {
    let _serial = serial();
    let Some(disk) = SmallDisk::mount(8) else {
        return;
    };
    let data = disk.node_dir("cpfull", &["control.redb"]);
    let mut node = Node::start_in("cpfull", data.path(), free_ip(), opts(&[]));
    node.id();
    wait_until("the node is placed", LONG, || {
        stripes(&node).is_some_and(|v| v["stripes"][0]["active"].is_string())
    });
    // Fill the disk under control.redb.
    let mut filler = std::fs::File::create(disk.path().join("filler")).expect("filler");
    let chunk = vec![0u8; 64 * 1024];
    while std::io::Write::write_all(&mut filler, &chunk).is_ok() {}
    let _ = filler.sync_all();
    // Every artifact upload is a control-plane decision (its version).
    let agent = ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(10))
        .build();
    let mut code = None;
    for i in 0..20_000 {
        let _ = agent
            .put(&format!("http://{}/v1/artifacts/a{i}", node.http()))
            .send_bytes(b"x");
        code = node.exited();
        if code.is_some() || node.log().contains("the control plane stopped") {
            break;
        }
    }
    // It leaves the cluster first (a few seconds at most).
    let code = code.or_else(|| node.wait_exit(Duration::from_secs(60)));
    assert_eq!(code, Some(1), "the node exits with an error");
    let log = node.log();
    assert!(
        log.contains("the control plane stopped") && log.contains("control.redb"),
        "{log}"
    );
}
