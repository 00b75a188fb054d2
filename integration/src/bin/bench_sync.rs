//! Standby sync benchmark: a stripe of two kiln nodes (permanent persistence)
//! holding N MiB of data; a third node joins and the benchmark measures the time
//! from its start until the stripe reports it as an in-sync `standby`, and MB/s.
//! Run twice: with default settings (the log keeps at most 20 000 entries and
//! 256 MiB, so 1 GiB of large values is mostly compacted away) and with
//! `log_retain_entries = 100`; the output says whether the newcomer got a
//! snapshot or only log entries.
//!
//! It prints numbers; it asserts nothing. Run it with
//! `cargo build --release --workspace --bins && target/release/bench-sync [MiB]`.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kiln_integration::{wait_until, Node, NodeOpts};

const VALUE_BYTES: usize = 1_000_000;
const WRITERS: usize = 4;

fn role_of(node: &Node, id: &str) -> Option<String> {
    let v = node.get("/v1/cluster/stripes")?;
    v["stripes"][0]["members"]
        .as_array()?
        .iter()
        .find(|m| m["id"] == id)
        .and_then(|m| m["role"].as_str().map(String::from))
}

fn standbys(node: &Node) -> usize {
    node.get("/v1/cluster/stripes")
        .and_then(|v| {
            v["stripes"][0]["members"]
                .as_array()
                .map(|m| m.iter().filter(|m| m["role"] == "standby").count())
        })
        .unwrap_or(0)
}

fn run(mib: usize, retain: &str) {
    let opts = NodeOpts {
        secret: Some("bench-sync".into()),
        extra: vec![
            "--persistence".into(),
            "permanent".into(),
            "--log-retain-entries".into(),
            retain.into(),
        ],
        ..Default::default()
    };
    let first = Node::start("sync1", opts.clone());
    let seed = first.seed();
    let mut o = opts.clone();
    o.seeds.push(seed.clone());
    let second = Node::start("sync2", o.clone());
    let nodes = [first, second];
    wait_until(
        "a stripe with one in-sync standby",
        Duration::from_secs(60),
        || standbys(&nodes[0]) == 1,
    );

    let values = mib * 1024 * 1024 / VALUE_BYTES;
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let next = next.clone();
            let http = nodes[w % 2].http();
            std::thread::spawn(move || {
                let agent = ureq::AgentBuilder::new()
                    .timeout(Duration::from_secs(60))
                    .build();
                loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    if i >= values {
                        return;
                    }
                    let value: Vec<u8> = (0..VALUE_BYTES).map(|b| (b ^ i) as u8).collect();
                    let url = format!("http://{http}/v1/kv/bulk/k{i}");
                    while agent.put(&url).send_bytes(&value).is_err() {
                        std::thread::sleep(Duration::from_millis(100));
                    }
                }
            })
        })
        .collect();
    for w in writers {
        let _ = w.join();
    }
    let write_secs = started.elapsed().as_secs_f64();
    let bytes = (values * VALUE_BYTES) as f64;
    println!(
        "  loaded {values} values of {VALUE_BYTES} B ({:.0} MB) in {write_secs:.1} s: {:.1} MB/s replicated to 2 nodes",
        bytes / 1e6,
        bytes / 1e6 / write_secs
    );

    let join_started = Instant::now();
    let third = Node::start("sync3", o);
    let id = third.id();
    let mut syncing_at = None;
    wait_until(
        "the newcomer is an in-sync standby",
        Duration::from_secs(1800),
        || {
            let role = role_of(&nodes[0], &id);
            if syncing_at.is_none() && role.is_some() {
                syncing_at = Some(join_started.elapsed().as_secs_f64());
            }
            role.as_deref() == Some("standby")
        },
    );
    let total = join_started.elapsed().as_secs_f64();
    let placed = syncing_at.unwrap_or(0.0);
    let snapshot = third.log().contains("snapshot installed");
    println!(
        "  newcomer standby after {total:.1} s from process start ({placed:.1} s to be placed, {:.1} s syncing) via {}: {:.1} MB/s overall, {:.1} MB/s while syncing",
        total - placed,
        if snapshot { "snapshot + log tail" } else { "log entries" },
        bytes / 1e6 / total,
        bytes / 1e6 / (total - placed).max(1e-3)
    );
    // Where the time went, from the newcomer's own account.
    for line in third.log().lines().filter(|l| {
        l.contains("kiln_actors")
            && ["snapshot", "placed", "catching up", "standby"]
                .iter()
                .any(|w| l.contains(w))
    }) {
        println!("    {}", line.chars().take(260).collect::<String>());
    }
}

fn main() {
    let mib: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(1024);
    println!("standby sync of {mib} MiB in one stripe (2 nodes → 3), release kiln, permanent persistence");
    for (label, retain) in [
        (
            "default settings (log_retain_entries 20000, 256 MiB)",
            "20000",
        ),
        ("log_retain_entries 100", "100"),
    ] {
        println!("{label}:");
        run(mib, retain);
    }
}
