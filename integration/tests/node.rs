//! One real node: data-directory refusals, the HTTP token, metrics.

use std::time::Duration;

use kiln_integration::*;

#[test]
fn a_data_dir_is_refused_with_another_secret_and_left_untouched() {
    let _serial = serial();
    let mut n = Node::start(
        "owner",
        NodeOpts {
            secret: Some("first".into()),
            ..Default::default()
        },
    );
    n.id();
    n.terminate();
    let db = n.dir.join("data").join("node.redb");
    let before = std::fs::read(&db).unwrap();
    let mut args = n.args.clone();
    let i = args.iter().position(|a| a == "--cluster-secret").unwrap();
    args[i + 1] = "second".into();
    n.restart_with(args);
    assert_eq!(n.wait_exit(Duration::from_secs(30)), Some(1));
    assert!(n.log().contains("different cluster secret"), "{}", n.log());
    assert!(
        std::fs::read(&db).unwrap() == before,
        "the refused start changed the file"
    );
}

#[test]
fn a_node_started_with_another_cluster_secret_says_so_on_both_sides() {
    let _serial = serial();
    let a = Node::start(
        "sec1",
        NodeOpts {
            secret: Some("first".into()),
            ..Default::default()
        },
    );
    a.id();
    let b = Node::start(
        "sec2",
        NodeOpts {
            secret: Some("second".into()),
            seeds: vec![a.seed()],
            ..Default::default()
        },
    );
    // Nothing else would tell: the handshake fails before either side
    // learns who the other is.
    for n in [&b, &a] {
        wait_until(
            &format!("{} warns about the cluster secret", n.name),
            Duration::from_secs(60),
            || n.log().contains("same --cluster-secret"),
        );
    }
}

#[test]
fn a_file_that_is_not_a_kiln_database_is_refused() {
    let _serial = serial();
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let junk = b"definitely not redb\n".repeat(100);
    std::fs::write(data.join("node.redb"), &junk).unwrap();
    let mut n = Node::start_in("junk", tmp.path(), free_ip(), NodeOpts::default());
    assert_eq!(n.wait_exit(Duration::from_secs(30)), Some(1));
    assert!(n.log().contains("is not a kiln database"), "{}", n.log());
    assert!(
        std::fs::read(data.join("node.redb")).unwrap() == junk,
        "the junk file was changed"
    );
}

#[test]
fn http_token_guards_everything_but_metrics() {
    let _serial = serial();
    let n = Node::start(
        "tok",
        NodeOpts {
            extra: vec!["--http-token".into(), "t0ken".into()],
            ..Default::default()
        },
    );
    let url = |p: &str| format!("http://{}{}", n.http(), p);
    wait_until("metrics answer", Duration::from_secs(30), || {
        ureq::get(&url("/metrics")).call().is_ok()
    });
    match ureq::get(&url("/v1/node")).call() {
        Err(ureq::Error::Status(401, r)) => {
            let body: serde_json::Value = r.into_json().unwrap();
            assert!(body["error"].as_str().unwrap().contains("bearer"));
        }
        other => panic!("expected 401, got {other:?}"),
    }
    let ok = ureq::get(&url("/v1/node"))
        .set("Authorization", "Bearer t0ken")
        .call()
        .unwrap();
    assert_eq!(ok.status(), 200);
    assert!(matches!(
        ureq::get(&url("/v1/node"))
            .set("Authorization", "Bearer wrong")
            .call(),
        Err(ureq::Error::Status(401, _))
    ));
    let out = kiln_cli(&["status", "--http", &n.http(), "--http-token", "t0ken"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("tok"));
}

#[test]
fn metrics_include_swarm_gossipsub_and_membership() {
    let _serial = serial();
    let nodes = start_cluster("met", 2, NodeOpts::default());
    wait_converged(&nodes, Duration::from_secs(60));
    let names = [
        "libp2p_swarm_connections_established",
        "libp2p_gossipsub_topic_peers_counts",
        "libp2p_gossipsub_mesh_peer_counts",
        "libp2p_gossipsub_topic_msg_published",
        "libp2p_gossipsub_topic_msg_recv_counts",
        "kiln_membership_members{state=\"alive\"} 2",
        "kiln_membership_announcements_sent_total",
        "kiln_membership_announcements_received_total",
        "kiln_membership_suspicions_total",
        "kiln_membership_refutations_total",
        "kiln_membership_deaths_declared_total",
        "kiln_net_decode_errors_by_kind_total{kind=\"gossip\"} 0",
    ];
    let mut text = String::new();
    // Gossip metrics appear with the first announcement that reaches a peer.
    wait_until("metrics show every family", Duration::from_secs(30), || {
        text = ureq::get(&format!("http://{}/metrics", nodes[0].http()))
            .call()
            .ok()
            .and_then(|r| r.into_string().ok())
            .unwrap_or_default();
        names.iter().all(|n| text.contains(n))
    });
    assert!(text.starts_with("# HELP") || text.contains("# TYPE"));
    let page = ureq::get(&format!("http://{}/", nodes[0].http()))
        .call()
        .unwrap()
        .into_string()
        .unwrap();
    assert!(page.contains("met1") && page.contains("met2"));
    match ureq::get(&format!("http://{}/v1/nope", nodes[0].http())).call() {
        Err(ureq::Error::Status(404, r)) => {
            assert!(r.into_json::<serde_json::Value>().unwrap()["error"].is_string())
        }
        other => panic!("expected 404, got {other:?}"),
    }
}

/// A peer or HTTP address another process listens on is refused before the
/// data directory is touched (libp2p's own bind shares a port: SO_REUSEPORT).
#[test]
fn an_address_in_use_is_refused_before_anything_is_written() {
    let _serial = serial();
    let a = Node::start("inuse", NodeOpts::default());
    a.id();
    let free = free_ip();
    let free_peer = format!("{free}:{PEER_PORT}");
    let free_http = format!("{free}:{HTTP_PORT}");
    for (listen, http, flag) in [
        (a.seed(), free_http.clone(), "--listen"),
        (free_peer.clone(), a.http(), "--http"),
    ] {
        let tmp = tempfile::tempdir().unwrap();
        let data = tmp.path().join("data");
        let out = std::process::Command::new(kiln_bin())
            .args(["run", "--data-dir"])
            .arg(&data)
            .args(["--listen", &listen, "--http", &http])
            .output()
            .expect("run kiln");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(
            err.contains("in use") || err.contains("another kiln"),
            "{err}"
        );
        assert!(err.contains(flag), "{err}");
        assert!(!err.contains("panicked"), "{err}");
        assert!(
            !data.join("node.redb").exists(),
            "the data directory was written"
        );
    }
}
