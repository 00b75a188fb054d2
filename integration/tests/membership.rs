//! Real `kiln` processes on loopback: forming, joining, failure detection, restart,
//! isolation by secret. Deadlines here only guard against hanging.

use std::time::{Duration, Instant};

use kiln_integration::*;

const SECRET: &str = "membership-test-secret";

fn opts() -> NodeOpts {
    NodeOpts {
        secret: Some(SECRET.into()),
        ..Default::default()
    }
}

#[test]
fn three_converge_from_one_seed_and_a_fourth_joins_through_a_non_seed() {
    let _serial = serial();
    let mut nodes = start_cluster("conv", 3, opts());
    wait_converged(&nodes, Duration::from_secs(60));
    let cluster = nodes[0].get("/v1/node").unwrap()["cluster"].clone();
    assert!(cluster.is_string(), "first node created a cluster id");
    for n in &nodes {
        assert_eq!(
            n.get("/v1/node").unwrap()["cluster"],
            cluster,
            "{} adopted the cluster id",
            n.name
        );
    }
    // The fourth knows only node 3, which is not anyone's seed.
    let fourth = Node::start(
        "conv4",
        NodeOpts {
            seeds: vec![nodes[2].seed()],
            ..opts()
        },
    );
    nodes.push(fourth);
    wait_converged(&nodes, Duration::from_secs(60));
    assert_eq!(nodes[3].get("/v1/node").unwrap()["cluster"], cluster);
    let members = nodes[0].get("/v1/cluster/members").unwrap();
    assert_eq!(members["self"], serde_json::json!(nodes[0].id()));
    for m in members["members"].as_array().unwrap() {
        assert!(m["name"].as_str().unwrap().starts_with("conv"));
        assert!(m["addrs"][0].as_str().unwrap().starts_with("/ip4/127."));
        assert!(m["incarnation"].as_u64().unwrap() >= 1);
        assert!(m["last_seen_ms"].as_u64().is_some());
    }
}

#[test]
fn kill_9_is_seen_dead_by_all_but_a_one_second_pause_is_not() {
    let _serial = serial();
    let mut nodes = start_cluster("fd", 4, opts());
    let ids = wait_converged(&nodes, Duration::from_secs(60));

    // SIGSTOP node 3 for one second; watch every other node for 4 s.
    nodes[2].signal(libc::SIGSTOP);
    let paused_at = Instant::now();
    let mut resumed = false;
    while paused_at.elapsed() < Duration::from_secs(4) {
        if !resumed && paused_at.elapsed() >= Duration::from_secs(1) {
            nodes[2].signal(libc::SIGCONT);
            resumed = true;
        }
        for n in [&nodes[0], &nodes[1], &nodes[3]] {
            if let Some(s) = n.state_of(&ids[2]) {
                assert_ne!(s, "dead", "{} declared the paused node dead", n.name);
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    wait_until(
        "the paused node is alive everywhere",
        Duration::from_secs(30),
        || nodes.iter().all(|n| n.alive().contains(&ids[2])),
    );

    nodes[3].kill9();
    wait_until(
        "every survivor sees the killed node dead",
        Duration::from_secs(30),
        || {
            nodes[..3]
                .iter()
                .all(|n| n.state_of(&ids[3]).as_deref() == Some("dead"))
        },
    );
    // And nobody else was harmed.
    for n in &nodes[..3] {
        let alive = n.alive();
        assert!(
            ids[..3].iter().all(|i| alive.contains(i)),
            "{} lost a live member",
            n.name
        );
    }
}

/// A node paused past the dead timeout is declared dead by the others; when it
/// resumes it declares none of them dead (the silence was its own): nobody has
/// to refute a claim, so every other node keeps its incarnation.
#[test]
fn a_node_paused_past_the_dead_timeout_declares_nobody_dead_when_it_resumes() {
    let _serial = serial();
    let nodes = start_cluster("stall", 3, opts());
    let ids = wait_converged(&nodes, Duration::from_secs(60));
    let incarnations = |n: &Node| -> Vec<(String, u64)> {
        let table = n.get("/v1/cluster/members").unwrap_or_default();
        let mut rows: Vec<(String, u64)> = table["members"]
            .as_array()
            .map(|ms| {
                ms.iter()
                    .filter_map(|m| {
                        Some((m["id"].as_str()?.to_string(), m["incarnation"].as_u64()?))
                    })
                    .filter(|(id, _)| id != &ids[2])
                    .collect()
            })
            .unwrap_or_default();
        rows.sort();
        rows
    };
    let before = incarnations(&nodes[0]);
    assert_eq!(before.len(), 2, "{before:?}");

    nodes[2].signal(libc::SIGSTOP);
    wait_until(
        "the others see the paused node dead",
        Duration::from_secs(60),
        || {
            nodes[..2]
                .iter()
                .all(|n| n.state_of(&ids[2]).as_deref() == Some("dead"))
        },
    );
    std::thread::sleep(Duration::from_secs(2));
    nodes[2].signal(libc::SIGCONT);
    wait_until(
        "every node sees every other alive",
        Duration::from_secs(60),
        || nodes.iter().all(|n| n.alive().len() == 3),
    );
    std::thread::sleep(Duration::from_secs(2));
    for n in &nodes {
        assert_eq!(
            incarnations(n),
            before,
            "{}: a member raised its incarnation (it had to refute a claim)",
            n.name
        );
    }
}

#[test]
fn graceful_leave_then_forget() {
    let _serial = serial();
    let mut nodes = start_cluster("leave", 3, opts());
    let ids = wait_converged(&nodes, Duration::from_secs(60));
    // Every node holds the stripe's data (else the one leaving may be the only
    // holder, which a forget refuses without --force).
    wait_until(
        "an active and 2 in-sync standbys",
        Duration::from_secs(60),
        || {
            nodes[0].get("/v1/cluster/stripes").is_some_and(|v| {
                v["stripes"][0]["members"]
                    .as_array()
                    .is_some_and(|ms| ms.len() == 3 && ms.iter().all(|m| m["role"] != "syncing"))
            })
        },
    );
    let code = nodes[2].terminate();
    assert_eq!(code, Some(0), "SIGTERM ends the node cleanly");
    assert!(nodes[2].log().contains("leaving the cluster"));
    wait_until("both see the node as left", Duration::from_secs(30), || {
        nodes[..2]
            .iter()
            .all(|n| n.state_of(&ids[2]).as_deref() == Some("left"))
    });
    // Forget it on one node: it disappears everywhere.
    let out = kiln_cli(&["members", "forget", &ids[2], "--http", &nodes[0].http()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_until(
        "the left node is forgotten everywhere",
        Duration::from_secs(30),
        || {
            nodes[..2].iter().all(|n| {
                n.member_states()
                    .is_some_and(|m| m.iter().all(|(id, _)| id != &ids[2]))
            })
        },
    );
    // A live member cannot be forgotten.
    let out = kiln_cli(&["members", "forget", &ids[1], "--http", &nodes[0].http()]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("only dead or left"));
    // Started again on its old data directory, the forgotten node holds stale
    // stripe data and its own state still shows it placed: it asks, is told it
    // was removed, and stops saying what to do, rather than running unplaced.
    nodes[2].restart();
    let code = nodes[2].wait_exit(Duration::from_secs(60));
    assert!(
        code.is_some_and(|c| c != 0),
        "the removed node stops with an error (exit {code:?})"
    );
    let log = nodes[2].log();
    assert!(
        log.contains("removed from the cluster by an operator") && log.contains("--data-dir"),
        "{log}"
    );
}

/// Forgetting the only member that holds a stripe's data would drop that data:
/// refused unless forced.
#[test]
fn the_only_holder_of_a_stripe_is_forgotten_only_when_forced() {
    let _serial = serial();
    let mut o = opts();
    o.extra = vec!["--stripes".into(), "2".into()];
    let mut nodes = start_cluster("only", 2, o);
    let ids = wait_converged(&nodes, Duration::from_secs(60));
    wait_until(
        "each stripe has its own active",
        Duration::from_secs(60),
        || {
            nodes[0].get("/v1/cluster/stripes").is_some_and(|v| {
                v["stripes"]
                    .as_array()
                    .is_some_and(|s| s.len() == 2 && s.iter().all(|s| s["active"].is_string()))
            })
        },
    );
    nodes[1].kill9();
    wait_until("node 1 sees node 2 dead", Duration::from_secs(60), || {
        nodes[0].state_of(&ids[1]).as_deref() == Some("dead")
    });
    let out = kiln_cli(&["members", "forget", &ids[1], "--http", &nodes[0].http()]);
    assert!(!out.status.success(), "forgot the only holder of a stripe");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("only member holding") && err.contains("--force"),
        "{err}"
    );
    assert!(nodes[0].state_of(&ids[1]).is_some(), "still a member");
    let out = kiln_cli(&[
        "members",
        "forget",
        &ids[1],
        "--force",
        "--http",
        &nodes[0].http(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(nodes[0].state_of(&ids[1]).is_none(), "forgotten");
}

#[test]
fn restart_keeps_peer_id_and_rejoins_with_the_seed_down() {
    let _serial = serial();
    let mut nodes = start_cluster("rs", 3, opts());
    let ids = wait_converged(&nodes, Duration::from_secs(60));
    nodes[1].terminate();
    nodes[0].kill9(); // the seed is gone for good
    nodes[1].restart();
    assert_eq!(nodes[1].id(), ids[1], "peer id survives the restart");
    wait_until(
        "the restarted node and node 3 see each other alive",
        Duration::from_secs(60),
        || nodes[1].alive().contains(&ids[2]) && nodes[2].alive().contains(&ids[1]),
    );
    let inc = nodes[2].get("/v1/cluster/members").unwrap()["members"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"] == ids[1].as_str())
        .unwrap()["incarnation"]
        .as_u64()
        .unwrap();
    assert!(inc >= 2, "a restart raises the incarnation");
}

#[test]
fn a_node_with_another_secret_never_appears() {
    let _serial = serial();
    let nodes = start_cluster("sec", 2, opts());
    let ids = wait_converged(&nodes, Duration::from_secs(60));
    let stranger = Node::start(
        "stranger",
        NodeOpts {
            secret: Some("some-other-secret".into()),
            seeds: vec![nodes[0].seed(), nodes[1].seed()],
            ..Default::default()
        },
    );
    let stranger_id = stranger.id();
    // Give it many redial rounds (seeds are redialled every 2 s).
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(6) {
        for n in &nodes {
            let states = n.member_states().unwrap_or_default();
            assert!(
                states.iter().all(|(id, _)| id != &stranger_id),
                "{} let the stranger in",
                n.name
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let seen = stranger.member_states().unwrap();
    assert_eq!(seen.len(), 1, "the stranger learnt nobody: {seen:?}");
    assert!(ids.iter().all(|i| !seen.iter().any(|(s, _)| s == i)));
}

#[test]
fn twenty_nodes_converge() {
    let _serial = serial();
    let nodes = start_cluster("big", 20, opts());
    wait_converged(&nodes, Duration::from_secs(180));
    // Every node is placed, also those whose join reached a follower first, and
    // the control plane settles on five voters.
    wait_until(
        "20 nodes placed with 5 voters",
        Duration::from_secs(180),
        || {
            let lagging: Vec<String> = nodes
                .iter()
                .filter(|n| {
                    !n.get("/v1/cluster/stripes").is_some_and(|v| {
                        v["placement"]
                            .as_str()
                            .is_some_and(|p| p.starts_with("stripe "))
                            && v["voters"].as_array().is_some_and(|a| a.len() == 5)
                    })
                })
                .map(|n| n.name.clone())
                .collect();
            if !lagging.is_empty() {
                eprintln!("not yet placed with 5 voters: {lagging:?}");
            }
            lagging.is_empty()
        },
    );
}

#[test]
fn nodes_that_all_have_seeds_still_agree_on_one_cluster_id() {
    let _serial = serial();
    let ips: Vec<_> = (0..3).map(|_| free_ip()).collect();
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let nodes: Vec<Node> = (0..3)
        .map(|i| {
            let seeds = ips
                .iter()
                .enumerate()
                .filter(|(j, _)| *j != i)
                .map(|(_, ip)| format!("{ip}:{PEER_PORT}"))
                .collect();
            Node::start_in(
                &format!("sym{}", i + 1),
                dirs[i].path(),
                ips[i],
                NodeOpts { seeds, ..opts() },
            )
        })
        .collect();
    wait_converged(&nodes, Duration::from_secs(60));
    let mut cluster = None;
    wait_until(
        "all three share one cluster id",
        Duration::from_secs(30),
        || {
            let ids: Vec<_> = nodes
                .iter()
                .map(|n| n.get("/v1/node").map(|v| v["cluster"].clone()))
                .collect();
            cluster = ids[0].clone();
            ids.iter()
                .all(|c| c.as_ref().is_some_and(|c| c.is_string()) && *c == ids[0])
        },
    );
    assert!(cluster.is_some());
    // The node that created the cluster bootstrapped its one control plane.
    wait_until(
        "all three placed under one control-plane leader",
        Duration::from_secs(60),
        || {
            let views: Vec<_> = nodes
                .iter()
                .filter_map(|n| n.get("/v1/cluster/stripes"))
                .collect();
            views.len() == 3
                && views.iter().all(|v| {
                    v["leader"].is_string()
                        && v["leader"] == views[0]["leader"]
                        && v["placement"] == "stripe 0"
                })
        },
    );
}

/// A line in `/etc/hosts` for the length of a test.
struct HostsEntry {
    line: String,
}

impl HostsEntry {
    fn add(name: &str, ip: std::net::Ipv4Addr) -> HostsEntry {
        use std::io::Write;
        let line = format!("{ip} {name}");
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open("/etc/hosts")
            .expect("/etc/hosts is writable (the tests run as root)");
        writeln!(f, "{line}").unwrap();
        HostsEntry { line }
    }
}

impl Drop for HostsEntry {
    fn drop(&mut self) {
        // Rewritten in place, not renamed over: /etc/hosts may be a bind mount.
        if let Ok(text) = std::fs::read_to_string("/etc/hosts") {
            let kept: String = text
                .lines()
                .filter(|l| *l != self.line)
                .map(|l| format!("{l}\n"))
                .collect();
            let _ = std::fs::write("/etc/hosts", kept);
        }
    }
}

#[test]
fn a_seed_name_that_resolves_only_later_is_joined_once_it_does() {
    let _serial = serial();
    let name = format!("kiln-seed-test-{}", std::process::id());
    // Started before its seed's name exists (containers starting together).
    let joiner = Node::start(
        "dnsjoin",
        NodeOpts {
            seeds: vec![format!("{name}:{PEER_PORT}")],
            ..opts()
        },
    );
    wait_until(
        "the joiner says the seed name does not resolve",
        Duration::from_secs(30),
        || joiner.log().contains("cannot resolve the seed host name"),
    );
    let seed = Node::start("dnsseed", opts());
    seed.id();
    let _entry = HostsEntry::add(&name, seed.ip);
    let nodes = [seed, joiner];
    wait_converged(&nodes, Duration::from_secs(60));
    assert_eq!(
        nodes[0].get("/v1/node").unwrap()["cluster"],
        nodes[1].get("/v1/node").unwrap()["cluster"],
        "the joiner adopted the seed's cluster"
    );
}
