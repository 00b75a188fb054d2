//! Databroadcast with real `kiln` processes: every event reaches every subscriber
//! exactly once, in per-origin order, across a kill -9 and restart of one node and
//! a 5 s network cut of another (network namespaces + nftables: needs root,
//! iproute2 and nftables, which `.ci/run` installs). Deadlines only guard against
//! hanging.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kiln_integration::netns::Lab;
use kiln_integration::*;
use serde_json::{json, Value};

const LONG: Duration = Duration::from_secs(120);
const NODES: usize = 5;
const EVENTS_PER_NODE: usize = 5_000;
const BATCH: usize = 50;

/// Publishes `EVENTS_PER_NODE` events to one node in batches, retrying a batch
/// that fails (the node is down or cut off) until it is accepted. Returns the
/// accepted (seq, payload) pairs and the origin.
fn publish_all(http: String, publisher: usize) -> (String, Vec<(u64, Value)>) {
    let agent = ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(5))
        .build();
    let mut origin = String::new();
    let mut accepted = Vec::new();
    let mut n = 0;
    while n < EVENTS_PER_NODE {
        let payloads: Vec<Value> = (n..n + BATCH)
            .map(|i| json!({"publisher": publisher, "i": i}))
            .collect();
        let events: Vec<Value> = payloads
            .iter()
            .map(|p| json!({"kind": "message", "topic": "test", "payload": p}))
            .collect();
        match agent
            .post(&format!("http://{http}/v1/broadcast"))
            .send_json(Value::Array(events))
        {
            Ok(resp) => {
                let body: Value = resp.into_json().expect("202 body is JSON");
                origin = body["origin"].as_str().unwrap_or_default().to_string();
                let seqs: Vec<u64> = body["seqs"]
                    .as_array()
                    .expect("seqs")
                    .iter()
                    .map(|s| s.as_u64().expect("seq"))
                    .collect();
                assert_eq!(seqs.len(), BATCH, "one seq per event");
                accepted.extend(seqs.into_iter().zip(payloads));
                n += BATCH;
            }
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
    (origin, accepted)
}

#[test]
fn every_event_reaches_every_subscriber_once_in_order_across_a_crash_and_a_partition() {
    let _serial = serial();
    let lab =
        Lab::new(NODES).unwrap_or_else(|e| panic!("cannot build the network namespaces: {e}"));
    let opts = |i: usize, seeds: Vec<String>| NodeOpts {
        netns: Some(lab.namespace(i)),
        secret: Some("broadcast-test".into()),
        seeds,
        ..Default::default()
    };
    let dirs: Vec<tempfile::TempDir> = (0..NODES).map(|_| tempfile::tempdir().unwrap()).collect();
    let first = Node::start_in("bc1", dirs[0].path(), lab.ip(0), opts(0, vec![]));
    let seed = first.seed();
    let mut nodes = vec![first];
    for (i, dir) in dirs.iter().enumerate().skip(1) {
        nodes.push(Node::start_in(
            &format!("bc{}", i + 1),
            dir.path(),
            lab.ip(i),
            opts(i, vec![seed.clone()]),
        ));
    }
    wait_converged(&nodes, LONG);
    let (crashed, cut) = (2, 3);

    // One subscriber per node, from the start of the log, reconnecting with
    // Last-Event-ID when its stream breaks.
    let subscribers: Vec<Subscriber> = nodes
        .iter()
        .map(|n| Subscriber::follow(n.http(), Some(String::new())))
        .collect();
    // origin → acknowledged (seq, payload)
    type Accepted = BTreeMap<String, Vec<(u64, Value)>>;
    let accepted: Arc<Mutex<Accepted>> = Arc::default();
    let publishers: Vec<_> = nodes
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let (http, accepted) = (n.http(), accepted.clone());
            std::thread::spawn(move || {
                let (origin, got) = publish_all(http, i);
                accepted.lock().unwrap().insert(origin, got);
            })
        })
        .collect();

    // Mid-run: kill -9 one node and restart it; cut another off for 5 s.
    wait_until("a fifth of the events published", LONG, || {
        subscribers[0].count() >= NODES * EVENTS_PER_NODE / 5
    });
    eprintln!(
        "kill -9 of node {} and cut of node {} with {} events on node 1",
        crashed + 1,
        cut + 1,
        subscribers[0].count()
    );
    nodes[crashed].kill9();
    lab.cut(cut).expect("cut a node off");
    std::thread::sleep(Duration::from_secs(2));
    nodes[crashed].restart();
    std::thread::sleep(Duration::from_secs(3));
    lab.heal(cut).expect("heal the cut");

    for p in publishers {
        p.join().expect("publisher thread");
    }
    eprintln!(
        "publishers done with {} events on node 1",
        subscribers[0].count()
    );
    let accepted = accepted.lock().unwrap().clone();
    assert_eq!(
        accepted.len(),
        NODES,
        "every node published as its own origin"
    );

    // What each origin holds in the end (acknowledged events and any whose 202
    // was lost in the crash): every subscriber must get all of it.
    let mut want: BTreeMap<String, u64> = BTreeMap::new();
    for n in &nodes {
        let id = n.id();
        wait_until(&format!("{} answers", n.name), LONG, || {
            n.get("/v1/broadcast/origins")
                .and_then(|v| {
                    v["origins"]
                        .as_array()?
                        .iter()
                        .find_map(|o| (o["origin"] == id.as_str()).then(|| o["last"].as_u64())?)
                })
                .map(|last| want.insert(id.clone(), last))
                .is_some()
        });
    }
    for (origin, got) in &accepted {
        let max = got.iter().map(|(s, _)| *s).max().unwrap_or(0);
        assert!(
            want[origin] >= max,
            "origin {origin} holds up to {} but acknowledged {max}",
            want[origin]
        );
    }
    for (i, sub) in subscribers.iter().enumerate() {
        wait_until(
            &format!("the subscriber on node {} has every event", i + 1),
            LONG,
            || {
                let last = check_stream(&sub.snapshot())
                    .unwrap_or_else(|e| panic!("subscriber on node {}: {e}", i + 1));
                want.iter()
                    .all(|(o, w)| last.get(o).copied().unwrap_or(0) >= *w)
            },
        );
    }

    // Exactly once, in order, and every subscriber saw the same event at each
    // (origin, seq), which is the one its publisher had acknowledged.
    let mut reference: BTreeMap<(String, u64), Value> = BTreeMap::new();
    for (i, sub) in subscribers.iter().enumerate() {
        let events = sub.snapshot();
        check_stream(&events).unwrap_or_else(|e| panic!("subscriber on node {}: {e}", i + 1));
        for s in events {
            let key = (
                s.event["origin"].as_str().unwrap_or_default().to_string(),
                s.event["seq"].as_u64().unwrap_or(0),
            );
            let payload = s.event["payload"].clone();
            let prev = reference.entry(key.clone()).or_insert(payload.clone());
            assert_eq!(*prev, payload, "subscribers disagree on event {key:?}");
        }
    }
    for (origin, got) in &accepted {
        for (seq, payload) in got {
            assert_eq!(
                reference.get(&(origin.clone(), *seq)),
                Some(payload),
                "acknowledged event {origin}#{seq} was delivered with other content or not at all"
            );
        }
    }
    for n in &nodes {
        let metrics = n.metrics();
        let repairs: Vec<&str> = metrics
            .lines()
            .filter(|l| l.starts_with("kiln_broadcast_gap_repairs_total"))
            .collect();
        eprintln!("{}: {repairs:?}", n.name);
    }
    assert!(
        subscribers[crashed]
            .connections
            .load(std::sync::atomic::Ordering::SeqCst)
            >= 2,
        "the restarted node's subscriber reconnected (and resumed with Last-Event-ID)"
    );
}

#[test]
fn key_value_writes_become_change_events_and_bad_events_are_refused() {
    let _serial = serial();
    let nodes = start_cluster("bckv", 3, NodeOpts::default());
    wait_converged(&nodes, LONG);
    wait_until("stripe 0 has an active", LONG, || {
        nodes[0]
            .get("/v1/cluster/stripes")
            .is_some_and(|v| v["stripes"][0]["active"].is_string())
    });
    let sub = Subscriber::follow(nodes[2].http(), Some(String::new()));
    let agent = ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(10))
        .build();
    for i in 0..50 {
        let http = nodes[i % 3].http();
        agent
            .put(&format!("http://{http}/v1/kv/orders/k{i}"))
            .send_string("v")
            .expect("put");
    }
    agent
        .put(&format!("http://{}/v1/kv/orders/k0", nodes[1].http()))
        .send_string("again")
        .expect("put");
    agent
        .delete(&format!("http://{}/v1/kv/orders/k1", nodes[1].http()))
        .call()
        .expect("delete");
    wait_until("52 change events", LONG, || {
        check_stream(&sub.snapshot())
            .map(|l| l.get("stripe:0").copied().unwrap_or(0) >= 52)
            .unwrap_or(false)
    });
    let events: Vec<Value> = sub
        .snapshot()
        .into_iter()
        .map(|s| s.event)
        .filter(|e| e["origin"] == "stripe:0")
        .collect();
    assert_eq!(events[0]["kind"], "change");
    assert_eq!(events[0]["server"], "kv");
    assert_eq!(events[0]["table"], "orders");
    assert_eq!(events[0]["pks"], json!([["k0"]]));
    assert_eq!(events[0]["action"], "insert");
    assert_eq!(events[50]["pks"], json!([["k0"]]));
    assert_eq!(events[50]["action"], "update");
    assert_eq!(events[51]["pks"], json!([["k1"]]));
    assert_eq!(events[51]["action"], "delete");

    // Bad input gets a JSON error with the right status.
    let post = |body: &str| -> (u16, Value) {
        match agent
            .post(&format!("http://{}/v1/broadcast", nodes[0].http()))
            .send_string(body)
        {
            Ok(r) => (r.status(), r.into_json().unwrap_or(Value::Null)),
            Err(ureq::Error::Status(code, r)) => (code, r.into_json().unwrap_or(Value::Null)),
            Err(e) => panic!("POST failed: {e}"),
        }
    };
    let (code, body) = post("{not json");
    assert_eq!(code, 400);
    assert!(body["error"].is_string());
    let (code, _) =
        post(r#"{"kind":"change","server":"s","table":"t","pks":[[1]],"action":"upsert"}"#);
    assert_eq!(code, 400);
    let big = "x".repeat(70_000);
    let (code, _) = post(&format!(
        r#"{{"kind":"message","topic":"t","payload":"{big}"}}"#
    ));
    assert_eq!(code, 413);
    let (code, body) = post(r#"[{"kind":"flush","server":"crm","table":"orders"}]"#);
    assert_eq!(code, 202);
    assert_eq!(body["seqs"], json!([1]));
    // Filters: only the flush of crm.orders, not the kv changes.
    let filtered = ureq::AgentBuilder::new()
        .timeout_read(Duration::from_secs(3))
        .build()
        .get(&format!(
            "http://{}/v1/broadcast/stream?server=crm&last_event_id=",
            nodes[1].http()
        ))
        .call()
        .expect("stream");
    // The read ends at the 3 s timeout; what came before it stays in `raw`.
    let mut raw = Vec::new();
    let _ = std::io::Read::read_to_end(&mut filtered.into_reader(), &mut raw);
    let text = String::from_utf8_lossy(&raw);
    let data: Vec<&str> = text.lines().filter(|l| l.starts_with("data: ")).collect();
    assert_eq!(
        data.len(),
        1,
        "only the crm flush passes the filter: {text}"
    );
    assert!(data[0].contains(r#""kind":"flush""#));

    // A live subscriber is told where it starts before any event passes its
    // filter: cut off then, it resumes from there, not from the live end.
    let read_for = |secs: u64, last_event_id: Option<&str>| -> String {
        let mut req = ureq::AgentBuilder::new()
            .timeout_read(Duration::from_secs(secs))
            .build()
            .get(&format!("http://{}/v1/broadcast/stream", nodes[1].http()))
            .query("server", "crm");
        if let Some(id) = last_event_id {
            req = req.query("last_event_id", id);
        }
        let mut raw = Vec::new();
        let _ =
            std::io::Read::read_to_end(&mut req.call().expect("stream").into_reader(), &mut raw);
        String::from_utf8_lossy(&raw).into_owned()
    };
    let opened = read_for(2, None);
    assert!(
        !opened.lines().any(|l| l.starts_with("data: ")),
        "nothing new passes the filter yet: {opened}"
    );
    let start = opened
        .lines()
        .find_map(|l| l.strip_prefix("id: "))
        .unwrap_or_else(|| panic!("the opening frame names the start: {opened}"))
        .to_string();
    assert!(start.contains("stripe:0=52"), "{start}");
    let (code, body) = post(r#"{"kind":"flush","server":"crm","table":"orders"}"#);
    assert_eq!(code, 202);
    assert_eq!(body["seqs"], json!([2]));
    let resumed = read_for(3, Some(&start));
    let data: Vec<&str> = resumed
        .lines()
        .filter(|l| l.starts_with("data: "))
        .collect();
    assert_eq!(data.len(), 1, "only what came after the start: {resumed}");
    assert!(data[0].contains(r#""seq":2"#), "{resumed}");
}

/// Publishes `n` message events to `node` in one request; returns their seqs.
fn publish_messages(node: &Node, n: usize) -> Vec<u64> {
    let events: Vec<Value> = (0..n)
        .map(|i| json!({"kind": "message", "topic": "t", "payload": i}))
        .collect();
    let resp: Value = ureq::post(&format!("http://{}/v1/broadcast", node.http()))
        .send_json(Value::Array(events))
        .expect("publish")
        .into_json()
        .expect("202 body");
    resp["seqs"]
        .as_array()
        .expect("seqs")
        .iter()
        .filter_map(Value::as_u64)
        .collect()
}

/// (first, last) of `origin`'s run in `node`'s log.
fn run_of(node: &Node, origin: &str) -> Option<(u64, u64)> {
    node.get("/v1/broadcast/origins")?["origins"]
        .as_array()?
        .iter()
        .find(|o| o["origin"] == origin)
        .and_then(|o| Some((o["first"].as_u64()?, o["last"].as_u64()?)))
}

#[test]
fn a_subscriber_or_node_behind_retention_gets_a_resync_never_a_silent_gap() {
    let _serial = serial();
    let opts = NodeOpts {
        extra: vec!["--broadcast-retention-events".into(), "100".into()],
        ..Default::default()
    };
    let mut nodes = start_cluster("bcr", 3, opts);
    wait_converged(&nodes, LONG);
    let origin = nodes[0].id();
    assert_eq!(
        publish_messages(&nodes[0], 50),
        (1..=50).collect::<Vec<_>>()
    );
    for n in &nodes {
        wait_until(&format!("{} holds 50 events", n.name), LONG, || {
            run_of(n, &origin).is_some_and(|(_, last)| last == 50)
        });
    }
    // A subscriber reads them and remembers where it was.
    let token = {
        let sub = Subscriber::follow(nodes[1].http(), Some(String::new()));
        wait_until("the subscriber has 50 events", LONG, || sub.count() >= 50);
        sub.snapshot()[49].id.clone().expect("an id")
    };
    // Node 3 is down while 500 more events push the first 450 out of every log:
    // messages, a change of crm.orders and a flush of crm.customers.
    nodes[2].kill9();
    let mut first: Vec<Value> = (0..48)
        .map(|i| json!({"kind": "message", "topic": "t", "payload": i}))
        .collect();
    first.push(json!({"kind": "change", "server": "crm", "table": "orders",
        "action": "update", "pks": [[42]]}));
    first.push(json!({"kind": "flush", "server": "crm", "table": "customers"}));
    ureq::post(&format!("http://{}/v1/broadcast", nodes[0].http()))
        .send_json(Value::Array(first))
        .expect("publish");
    for _ in 0..9 {
        publish_messages(&nodes[0], 50);
    }
    for n in &nodes[..2] {
        wait_until(&format!("{} pruned to retention", n.name), LONG, || {
            run_of(n, &origin).is_some_and(|(first, last)| last == 550 && first > 51)
        });
    }
    nodes[2].restart();
    wait_until("node 3 caught up past the hole", LONG, || {
        run_of(&nodes[2], &origin).is_some_and(|(first, last)| last == 550 && first > 51)
    });
    // Resuming from before the hole, on a node that had the events and pruned
    // them and on the node that never got them: a resync, then the rest in order.
    // The node that pruned them knows what they were about; the other does not.
    for n in &nodes[1..] {
        let sub = Subscriber::follow(n.http(), Some(token.clone()));
        let (first, _) = run_of(n, &origin).expect("run");
        let want = 550 - first + 2;
        wait_until(&format!("resync and events from {}", n.name), LONG, || {
            sub.count() >= want as usize
        });
        let events = sub.snapshot();
        let resync = &events[0].event;
        assert_eq!(resync["kind"], "resync", "{resync}");
        assert_eq!(resync["origin"], origin.as_str());
        if n.name == nodes[1].name {
            assert_eq!(resync["all"], false, "{resync}");
            assert_eq!(
                resync["datasources"],
                json!([{"server": "crm", "table": "customers"}, {"server": "crm", "table": "orders"}]),
            );
            assert_eq!(resync["topics"], json!(["t"]));
        } else {
            assert_eq!(resync["all"], true, "{resync}");
        }
        let seqs: Vec<u64> = events[1..]
            .iter()
            .filter(|s| s.event["origin"] == origin.as_str())
            .filter_map(|s| s.event["seq"].as_u64())
            .collect();
        assert_eq!(seqs, (first..=550).collect::<Vec<_>>(), "on {}", n.name);
    }
    assert!(
        nodes[2].metric_positive("kiln_broadcast_holes_skipped_total"),
        "node 3 recorded the hole it skipped"
    );
    // A subscriber of crm.orders alone is told of that table only; one of a
    // table nothing happened to is not told anything, and goes on.
    let orders = Subscriber::follow_filtered(
        nodes[1].http(),
        "?server=crm&table=orders",
        Some(token.clone()),
    );
    let quiet = Subscriber::follow_filtered(nodes[1].http(), "?table=invoices", Some(token));
    wait_until("the orders subscriber's resync", LONG, || {
        orders.count() >= 1
    });
    let resync = &orders.snapshot()[0].event;
    assert_eq!(resync["all"], false, "{resync}");
    assert_eq!(
        resync["datasources"],
        json!([{"server": "crm", "table": "orders"}])
    );
    assert_eq!(resync["topics"], json!([]));
    let after = publish_change(&nodes[0], "crm", "invoices");
    wait_until("the invoices subscriber's first event", LONG, || {
        quiet.count() >= 1
    });
    let got = &quiet.snapshot()[0].event;
    assert_eq!(got["kind"], "change", "no resync first: {got}");
    assert_eq!(got["seq"], after);
}

/// A node whose `broadcast.redb` is gone (deleted, a lost disk) must not give
/// out its seqs again: its peers hold events under them and would drop the new
/// ones as duplicates — acknowledged, yet delivered nowhere.
#[test]
fn a_node_that_lost_its_broadcast_log_continues_its_seqs_and_loses_nothing() {
    let _serial = serial();
    let mut nodes = start_cluster("bcl", 3, NodeOpts::default());
    wait_converged(&nodes, LONG);
    let origin = nodes[0].id();
    assert_eq!(
        publish_messages(&nodes[0], 30),
        (1..=30).collect::<Vec<_>>()
    );
    for n in &nodes[1..] {
        wait_until(&format!("{} holds 30 events", n.name), LONG, || {
            run_of(n, &origin).is_some_and(|(_, last)| last == 30)
        });
    }
    let sub = Subscriber::follow(nodes[1].http(), None);
    std::thread::sleep(Duration::from_millis(500));
    nodes[0].kill9();
    std::fs::remove_file(nodes[0].dir.join("data").join("broadcast.redb"))
        .expect("remove broadcast.redb");
    // Killed again while it gets its events back: the recovery is not forgotten
    // with the new file.
    nodes[0].restart();
    wait_until("the restarted node answers", LONG, || {
        nodes[0].get("/v1/node").is_some()
    });
    nodes[0].kill9();
    nodes[0].restart();
    // Refused (503) while it gets its own events back, then continued.
    let mut seqs = Vec::new();
    let mut refused = 0;
    wait_until("a publish on the restarted node", LONG, || {
        let r = ureq::post(&format!("http://{}/v1/broadcast", nodes[0].http()))
            .send_json(json!({"kind": "message", "topic": "t", "payload": "after"}));
        match r {
            Ok(resp) => {
                let v: Value = resp.into_json().expect("202 body");
                seqs = v["seqs"]
                    .as_array()
                    .expect("seqs")
                    .iter()
                    .filter_map(Value::as_u64)
                    .collect();
                true
            }
            Err(ureq::Error::Status(503, _)) => {
                refused += 1;
                std::thread::sleep(Duration::from_millis(100));
                false
            }
            // Not listening yet.
            Err(ureq::Error::Transport(_)) => {
                std::thread::sleep(Duration::from_millis(100));
                false
            }
            Err(e) => panic!("publish: {e}"),
        }
    });
    assert_eq!(seqs, vec![31], "seqs continue above what the peers hold");
    assert!(refused > 0, "publishes were refused while it recovered");
    wait_until("the new event at a peer's subscriber", LONG, || {
        sub.snapshot().iter().any(|e| e.event["payload"] == "after")
    });
    let got: Vec<u64> = sub
        .snapshot()
        .iter()
        .filter(|e| e.event["origin"] == origin.as_str())
        .filter_map(|e| e.event["seq"].as_u64())
        .collect();
    assert_eq!(got, vec![31]);
    wait_until("the restarted node holds its events again", LONG, || {
        run_of(&nodes[0], &origin) == Some((1, 31))
    });
}

/// Publishes one `change` of `server`.`table`; returns its seq.
fn publish_change(node: &Node, server: &str, table: &str) -> u64 {
    let resp: Value = ureq::post(&format!("http://{}/v1/broadcast", node.http()))
        .send_json(json!({"kind": "change", "server": server, "table": table,
            "action": "insert", "pks": [[1]]}))
        .expect("publish")
        .into_json()
        .expect("202 body");
    resp["seqs"][0].as_u64().expect("a seq")
}

/// Temporary persistence: a restart of the whole stripe starts its data empty,
/// and its log again at 1. Its change events must go on above the seqs the
/// cluster already holds; numbered from 1 again, every node would take them for
/// events it has and drop them.
#[test]
fn change_events_go_on_after_a_whole_stripe_restart_in_temporary_mode() {
    let _serial = serial();
    let opts = NodeOpts {
        extra: vec!["--persistence".into(), "temporary".into()],
        ..Default::default()
    };
    let mut nodes = start_cluster("bctmp", 3, opts);
    wait_converged(&nodes, LONG);
    for i in 0..20 {
        put(&nodes[i % 3], &format!("before{i}"));
    }
    for n in &nodes {
        wait_until(&format!("{} holds 20 change events", n.name), LONG, || {
            run_of(n, "stripe:0").is_some_and(|(_, last)| last == 20)
        });
    }
    // Received events are fsynced within a second: let that happen, so that
    // what the logs hold after the kill is what they showed.
    std::thread::sleep(Duration::from_secs(2));
    // Everything down, then up again: the stripe's data is gone, the
    // broadcast logs still hold its 20 change events.
    for n in nodes.iter_mut() {
        n.kill9();
    }
    for n in nodes.iter_mut() {
        n.restart();
    }
    wait_converged(&nodes, LONG);
    for i in 0..5 {
        put(&nodes[i % 3], &format!("after{i}"));
    }
    for n in &nodes {
        wait_until(
            &format!("{} holds the 5 new change events", n.name),
            LONG,
            || run_of(n, "stripe:0").is_some_and(|(_, last)| last == 25),
        );
    }
    // A subscriber reading from the start gets all 25, in order, the new ones last.
    let sub = Subscriber::follow(nodes[1].http(), Some(String::new()));
    wait_until("25 change events streamed", LONG, || {
        sub.snapshot()
            .iter()
            .filter(|s| s.event["origin"] == "stripe:0")
            .count()
            >= 25
    });
    let changes: Vec<Value> = sub
        .snapshot()
        .into_iter()
        .map(|s| s.event)
        .filter(|e| e["origin"] == "stripe:0")
        .collect();
    let seqs: Vec<u64> = changes.iter().filter_map(|e| e["seq"].as_u64()).collect();
    assert_eq!(seqs, (1..=25).collect::<Vec<_>>());
    assert_eq!(changes[20]["pks"], json!([["after0"]]));
    assert_eq!(changes[24]["pks"], json!([["after4"]]));
}

/// Temporary persistence, and the members of a stripe die right after a burst
/// of writes, before their broadcast logs fsynced its change events (received
/// events are fsynced within a second): only a node of another stripe holds the
/// last ones. The node that takes the stripe over must continue above those too
/// (it waits for that node's digest); continuing above its own log only, it
/// would give out seqs that node holds already, and its subscribers would never
/// see the new writes.
#[test]
fn change_events_go_on_above_what_another_stripe_holds_after_the_stripe_dies_unsynced() {
    let _serial = serial();
    let opts = NodeOpts {
        extra: vec![
            "--persistence".into(),
            "temporary".into(),
            "--stripes".into(),
            "2".into(),
        ],
        ..Default::default()
    };
    let mut nodes = start_cluster("bcuns", 3, opts);
    let ids = wait_converged(&nodes, LONG);
    // Which nodes hold stripe 0 (two of them) and which stripe 1.
    let mut members: Vec<String> = Vec::new();
    wait_until("stripe 0 has two members with an active", LONG, || {
        let Some(v) = nodes[0].get("/v1/cluster/stripes") else {
            return false;
        };
        let Some(s0) = v["stripes"]
            .as_array()
            .and_then(|s| s.iter().find(|s| s["id"] == 0))
        else {
            return false;
        };
        members = s0["members"]
            .as_array()
            .map(|m| {
                m.iter()
                    .filter_map(|m| m["id"].as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default();
        members.len() == 2 && s0["active"].is_string()
    });
    let outside = ids
        .iter()
        .position(|id| !members.contains(id))
        .expect("a node outside stripe 0");
    // Keys go to both stripes (by slot); those of stripe 0 make its events.
    for i in 0..200 {
        put(&nodes[outside], &format!("before{i}"));
    }
    let held = run_of(&nodes[outside], "stripe:0").map_or(0, |(_, last)| last);
    assert!(held > 0, "writes to stripe 0 made change events");
    for i in 0..3 {
        if ids[i] != ids[outside] {
            nodes[i].kill9();
        }
    }
    wait_until(
        "the outside node holds every change event of stripe 0",
        LONG,
        || run_of(&nodes[outside], "stripe:0").is_some_and(|(_, last)| last >= held),
    );
    let held = run_of(&nodes[outside], "stripe:0").map_or(0, |(_, last)| last);
    for i in 0..3 {
        if ids[i] != ids[outside] {
            nodes[i].restart();
        }
    }
    wait_converged(&nodes, LONG);
    let sub = Subscriber::follow(nodes[outside].http(), Some(String::new()));
    let after: Vec<String> = (0..40).map(|i| format!("after{i}")).collect();
    for key in &after {
        put(&nodes[outside], key);
    }
    // Every new write's change event reaches the outside node, whichever stripe
    // took it; stripe 0's events stay gap-free and once each.
    let missing = || -> Vec<String> {
        let streamed = sub.snapshot();
        after
            .iter()
            .filter(|k| !streamed.iter().any(|s| s.event["pks"] == json!([[k]])))
            .cloned()
            .collect()
    };
    wait_until(
        "every new write's change event reaches the outside node",
        LONG,
        || missing().is_empty(),
    );
    let seqs: Vec<u64> = sub
        .snapshot()
        .iter()
        .filter(|s| s.event["origin"] == "stripe:0")
        .filter_map(|s| s.event["seq"].as_u64())
        .collect();
    assert!(
        seqs.len() as u64 > held,
        "new change events of stripe 0 were made"
    );
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>());
}

/// A stream opened on an empty log still says where it starts, in an id a
/// browser sends back: a client cut off before the first event resumes from the
/// start, and gets what was published meanwhile.
#[test]
fn a_stream_opened_on_an_empty_log_resumes_from_its_start() {
    let node = Node::start("bcempty", NodeOpts::default());
    node.id();
    let resp = ureq::AgentBuilder::new()
        .timeout_read(Duration::from_secs(30))
        .build()
        .get(&format!("http://{}/v1/broadcast/stream", node.http()))
        .call()
        .expect("stream");
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(resp.into_reader()));
    let id = lines
        .by_ref()
        .map_while(Result::ok)
        .take_while(|l| !l.is_empty())
        .find_map(|l| l.strip_prefix("id: ").map(String::from))
        .expect("the opening frame carries an id");
    assert!(!id.is_empty());
    drop(lines);
    let seqs = publish_messages(&node, 3);
    let sub = Subscriber::follow(node.http(), Some(id));
    wait_until("the 3 events published meanwhile", LONG, || {
        sub.snapshot().len() >= 3
    });
    let got: Vec<u64> = sub
        .snapshot()
        .iter()
        .filter_map(|s| s.event["seq"].as_u64())
        .collect();
    assert_eq!(got, seqs);
}

/// Writes `orders/<key>` through `node`, again until it is acknowledged (a
/// stripe may be between actives).
fn put(node: &Node, key: &str) {
    let agent = ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(10))
        .build();
    wait_until(&format!("{key} written"), LONG, || {
        agent
            .put(&format!("http://{}/v1/kv/orders/{key}", node.http()))
            .send_string("v")
            .is_ok()
    });
}

/// Reads an event stream to its end: (event, id) of every `data:` message.
fn read_stream(reader: impl std::io::Read) -> Vec<Streamed> {
    use std::io::BufRead;
    let mut out = Vec::new();
    let (mut id, mut data) = (None, None);
    for line in std::io::BufReader::new(reader).lines() {
        let Ok(line) = line else { break };
        if let Some(v) = line.strip_prefix("id: ") {
            id = Some(v.to_string());
        } else if let Some(v) = line.strip_prefix("data: ") {
            data = serde_json::from_str::<Value>(v).ok();
        } else if line.is_empty() {
            if let Some(event) = data.take() {
                out.push(Streamed {
                    event,
                    id: id.take(),
                    at: std::time::Instant::now(),
                });
            }
        }
    }
    out
}

#[test]
fn a_subscriber_that_stops_reading_is_told_lagged_and_resumes_where_it_was() {
    // A 1 MiB bound, so a few megabytes of large events outgrow it.
    let node = Node::start(
        "lag1",
        NodeOpts {
            extra: vec!["--subscriber-buffer-bytes".into(), "1048576".into()],
            ..Default::default()
        },
    );
    node.id();
    let agent = ureq::AgentBuilder::new()
        .timeout_connect(Duration::from_secs(5))
        .timeout_read(Duration::from_secs(30))
        .build();
    // The stuck subscriber: the response head is read, the body not (yet).
    let stuck = agent
        .get(&format!("http://{}/v1/broadcast/stream", node.http()))
        .set("Last-Event-ID", "")
        .call()
        .expect("event stream")
        .into_reader();

    const EVENTS: usize = 400;
    let pad = "x".repeat(50_000);
    let mut origin = String::new();
    for batch in 0..EVENTS / 10 {
        let events: Vec<Value> = (batch * 10..batch * 10 + 10)
            .map(|i| json!({"kind": "message", "topic": "big", "payload": {"i": i, "pad": pad}}))
            .collect();
        // The node goes on accepting events whatever its subscriber does.
        let resp: Value = agent
            .post(&format!("http://{}/v1/broadcast", node.http()))
            .send_json(Value::Array(events))
            .expect("publish while a subscriber is stuck")
            .into_json()
            .expect("202 body");
        origin = resp["origin"].as_str().unwrap_or_default().to_string();
    }
    wait_until("the node gave up on the stuck subscriber", LONG, || {
        node.metric_positive("kiln_broadcast_subscribers_lagged")
    });

    let got = read_stream(stuck);
    assert_eq!(
        got.last().map(|s| s.event["kind"].clone()),
        Some(json!("lagged")),
        "the stream ends with `lagged`"
    );
    let delivered = &got[..got.len() - 1];
    let last = check_stream(delivered).expect("what came before `lagged` is in order");
    let upto = last.get(&origin).copied().unwrap_or(0);
    assert!(
        (upto as usize) < EVENTS,
        "the stuck subscriber was cut off before the end ({upto} of {EVENTS})"
    );

    // The `lagged` frame carries the position reached (a client whose filter
    // passed over everything still resumes from there): resuming from it gets
    // exactly what was missed.
    let token = got
        .last()
        .and_then(|s| s.id.clone())
        .expect("the `lagged` frame carries an id");
    let resumed = Subscriber::follow(node.http(), Some(token));
    wait_until("the resumed stream has the rest", LONG, || {
        resumed.count() >= EVENTS - upto as usize
    });
    let seqs: Vec<u64> = resumed
        .snapshot()
        .iter()
        .filter(|s| s.event["origin"] == origin.as_str())
        .filter_map(|s| s.event["seq"].as_u64())
        .collect();
    assert_eq!(
        seqs,
        (upto + 1..=EVENTS as u64).collect::<Vec<_>>(),
        "the resumed stream starts right after the last event received, once each"
    );
}

/// Publishes `n` message events of `size` bytes of payload each to `node`
/// (under Idempotency-Key `key`, if given); their seqs, or the status and
/// error message of a refusal.
fn try_publish(
    agent: &ureq::Agent,
    node: &Node,
    n: usize,
    size: usize,
    key: Option<&str>,
) -> Result<Vec<u64>, (u16, String)> {
    let events: Vec<Value> = (0..n)
        .map(|_| json!({"kind": "message", "topic": "t", "payload": "p".repeat(size)}))
        .collect();
    let mut request = agent.post(&format!("http://{}/v1/broadcast", node.http()));
    if let Some(key) = key {
        request = request.set("Idempotency-Key", key);
    }
    match request.send_json(Value::Array(events)) {
        Ok(resp) => {
            let body: Value = resp.into_json().expect("202 body");
            Ok(body["seqs"]
                .as_array()
                .expect("seqs")
                .iter()
                .filter_map(Value::as_u64)
                .collect())
        }
        Err(ureq::Error::Status(code, resp)) => {
            let body: Value = resp.into_json().expect("a JSON error");
            let error = body["error"].as_str().expect("an error message");
            Err((code, error.to_string()))
        }
        Err(e) => panic!("publish to {}: {e}", node.name),
    }
}

/// A node whose broadcast log fills its disk answers its publishers 507, takes
/// publishes again once the disk has room — without a restart — and neither it
/// nor its peer loses, repeats or reorders an acknowledged event: what it
/// received from its peer while the disk was full is fetched again. A refused
/// publish retried under its Idempotency-Key once there is room is published
/// once.
#[test]
fn a_full_disk_under_the_broadcast_log_answers_507_and_loses_nothing_once_it_has_room() {
    let _serial = serial();
    let Some(disk) = SmallDisk::mount(8) else {
        return;
    };
    let data = disk.node_dir("bfull", &["broadcast.redb"]);
    let full = Node::start_in("bfull", data.path(), free_ip(), NodeOpts::default());
    let other = Node::start(
        "bother",
        NodeOpts {
            seeds: vec![full.seed()],
            ..Default::default()
        },
    );
    let mut nodes = [full, other];
    wait_converged(&nodes, LONG);
    let [full, other] = &mut nodes;
    let subs = [
        Subscriber::follow(full.http(), Some(String::new())),
        Subscriber::follow(other.http(), Some(String::new())),
    ];
    let agent = ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(30))
        .build();
    let mut acked = [Vec::new(), Vec::new()];
    let mut refused = Vec::new();
    let (mut shown, mut status_shown) = (false, false);
    for i in 0..1_000 {
        // Events from the peer reach the full node meanwhile.
        acked[1].extend(try_publish(&agent, other, 5, 4096, None).expect("the peer has room"));
        let key = format!("fill-{i}");
        match try_publish(&agent, full, 50, 4096, Some(&key)) {
            Ok(seqs) => acked[0].extend(seqs),
            Err((507, error)) => {
                assert!(error.contains("broadcast.redb"), "{error}");
                // The operator sees it in the node's status (until a durable
                // write succeeds: look right after the refusal).
                let errors = &full.get("/v1/node").expect("node info")["storage_errors"];
                shown |= errors["broadcast"]
                    .as_str()
                    .is_some_and(|e| e.contains("broadcast.redb"));
                if shown && !status_shown {
                    let status = kiln_cli(&["status", "--http", &full.http()]);
                    let text = String::from_utf8_lossy(&status.stdout);
                    status_shown = text.contains("STORAGE FAILING (broadcast)");
                }
                refused.push(key);
                if refused.len() == 3 {
                    break;
                }
            }
            Err((code, error)) => panic!("publish to the full node: {code} {error}"),
        }
    }
    assert!(!refused.is_empty(), "8 MiB never filled up");
    eprintln!(
        "acknowledged before the disk filled up: {} by the full node, {} by its peer",
        acked[0].len(),
        acked[1].len()
    );
    assert!(
        full.metric_positive("kiln_broadcast_log_failures_total"),
        "the full node counted no failed write of its broadcast log"
    );
    assert!(
        shown,
        "the node's status never showed the broadcast log failing"
    );
    assert!(
        status_shown,
        "kiln status never showed the broadcast log failing"
    );
    disk.resize(64);
    wait_until(
        "the full node takes publishes again",
        LONG,
        || match try_publish(&agent, full, 1, 16, None) {
            Ok(seqs) => {
                acked[0].extend(seqs);
                true
            }
            Err(_) => false,
        },
    );
    // The client retries what was refused, under the same keys, twice.
    let mut answers: std::collections::HashMap<&String, Vec<u64>> = Default::default();
    for key in refused.iter().chain(&refused) {
        let seqs = try_publish(&agent, full, 50, 4096, Some(key))
            .unwrap_or_else(|(code, e)| panic!("retry under {key}: {code} {e}"));
        assert_eq!(seqs.len(), 50, "retry under {key}");
        match answers.get(key) {
            Some(first) => assert_eq!(*first, seqs, "a second retry under {key}"),
            None => {
                acked[0].extend(&seqs);
                answers.insert(key, seqs);
            }
        }
    }
    acked[1].extend(try_publish(&agent, other, 5, 16, None).expect("the peer has room"));
    // A refused try that reached the log is answered with its first seqs.
    acked[0].sort_unstable();
    let origins = [full.id(), other.id()];
    for (i, a) in acked.iter().enumerate() {
        assert_eq!(
            *a,
            (1..=a.len() as u64).collect::<Vec<_>>(),
            "seqs acknowledged by node {i}"
        );
    }
    for (sub, node) in subs.iter().zip([&*full, &*other]) {
        wait_until(
            &format!("{}'s subscriber has every acknowledged event", node.name),
            LONG,
            || {
                check_stream(&sub.snapshot()).is_ok_and(|last| {
                    origins
                        .iter()
                        .zip(&acked)
                        .all(|(o, a)| last.get(o).copied().unwrap_or(0) >= a.len() as u64)
                })
            },
        );
        if let Err(e) = check_stream(&sub.snapshot()) {
            panic!("{}'s subscriber: {e}", node.name);
        }
    }
    wait_until("the node's status shows no storage error", LONG, || {
        full.get("/v1/node").is_some_and(|n| {
            n["storage_errors"]
                .as_object()
                .is_some_and(|e| e.is_empty())
        })
    });
    // And the log holds them, after a restart too.
    full.restart();
    for (o, a) in origins.iter().zip(&acked) {
        wait_until(&format!("the full node's log holds {o}"), LONG, || {
            run_of(full, o).is_some_and(|(_, last)| last >= a.len() as u64)
        });
    }
}

/// Publishes `body` to `node` under Idempotency-Key `key`: the seqs, or the
/// status and error message of a refusal.
fn publish_keyed(node: &Node, key: &str, body: &Value) -> Result<Vec<u64>, (u16, String)> {
    match ureq::post(&format!("http://{}/v1/broadcast", node.http()))
        .set("Idempotency-Key", key)
        .send_json(body.clone())
    {
        Ok(resp) => {
            let body: Value = resp.into_json().expect("202 body");
            Ok(body["seqs"]
                .as_array()
                .expect("seqs")
                .iter()
                .filter_map(Value::as_u64)
                .collect())
        }
        Err(ureq::Error::Status(code, resp)) => {
            let body: Value = resp.into_json().expect("a JSON error");
            Err((code, body["error"].as_str().unwrap_or_default().to_string()))
        }
        Err(e) => panic!("publish to {}: {e}", node.name),
    }
}

/// A publish retried under its Idempotency-Key — also after a kill -9 of the
/// node that took it — is answered with the first try's seqs and its events are
/// in the log once; the key on other events is refused with 422.
#[test]
fn a_publish_retried_under_its_idempotency_key_is_published_once_across_a_crash() {
    let mut node = Node::start("bckey", NodeOpts::default());
    let origin = node.id();
    let first = json!([
        {"kind": "message", "topic": "orders", "payload": "a"},
        {"kind": "message", "topic": "orders", "payload": "b"}
    ]);
    let other = json!({"kind": "message", "topic": "orders", "payload": "c"});
    let seqs = publish_keyed(&node, "order-42", &first).expect("first publish");
    assert_eq!(seqs, vec![1, 2]);
    assert_eq!(publish_keyed(&node, "order-42", &first), Ok(seqs.clone()));
    let refused = publish_keyed(&node, "order-42", &other).expect_err("another request");
    assert_eq!(refused.0, 422, "{refused:?}");
    assert!(refused.1.contains("Idempotency-Key"), "{refused:?}");
    assert_eq!(publish_keyed(&node, "order-43", &other), Ok(vec![3]));

    node.kill9();
    node.restart();
    wait_until("the node answers again", LONG, || {
        node.get("/v1/broadcast/origins").is_some()
    });
    assert_eq!(publish_keyed(&node, "order-42", &first), Ok(seqs));
    assert_eq!(publish_keyed(&node, "order-43", &other), Ok(vec![3]));
    assert_eq!(publish_keyed(&node, "order-44", &other), Ok(vec![4]));
    // The log holds each event once: a stream from the start reads 4.
    let sub = Subscriber::follow(node.http(), Some(String::new()));
    wait_until("the 4 events read back", LONG, || sub.count() >= 4);
    std::thread::sleep(Duration::from_millis(500));
    let got: Vec<(String, u64, Value)> = sub
        .snapshot()
        .iter()
        .map(|s| {
            (
                s.event["origin"].as_str().unwrap_or_default().to_string(),
                s.event["seq"].as_u64().unwrap_or_default(),
                s.event["payload"].clone(),
            )
        })
        .collect();
    let want: Vec<(String, u64, Value)> = [(1, "a"), (2, "b"), (3, "c"), (4, "c")]
        .iter()
        .map(|(seq, p)| (origin.clone(), *seq, json!(p)))
        .collect();
    assert_eq!(got, want);
    // A bad key is refused as such.
    let bad = publish_keyed(&node, &"k".repeat(300), &other).expect_err("a 300-byte key");
    assert_eq!(bad.0, 400, "{bad:?}");
}

/// A node that stops ends its event streams itself, telling each client the
/// position it reached (to resume on another node), instead of holding its stop
/// up until the HTTP server gives up on them.
#[test]
fn a_stopping_node_ends_its_event_streams_with_their_position() {
    let mut node = Node::start("bcstop", NodeOpts::default());
    node.id();
    let seqs = publish_messages(&node, 2);
    let resp = ureq::AgentBuilder::new()
        .timeout_read(Duration::from_secs(60))
        .build()
        .get(&format!("http://{}/v1/broadcast/stream", node.http()))
        .set("Last-Event-ID", "")
        .call()
        .expect("stream");
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(resp.into_reader()));
    // Both events read: the stream is in its live part.
    let mut data = 0;
    for line in lines.by_ref().map_while(Result::ok) {
        data += usize::from(line.starts_with("data: "));
        if data == seqs.len() {
            break;
        }
    }
    assert_eq!(node.terminate(), Some(0));
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    let at = rest
        .iter()
        .position(|l| l == ": node stopping")
        .unwrap_or_else(|| panic!("no stopping frame: {rest:?}"));
    let id = rest
        .get(at + 1)
        .and_then(|l| l.strip_prefix("id: "))
        .unwrap_or_else(|| panic!("no position after it: {rest:?}"));
    assert!(id.contains(&format!("={}", seqs[1])), "{id}");
}
