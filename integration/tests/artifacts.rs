//! Artifact publish with real `kiln` processes: a 100 MiB artifact reaches every
//! node — one restarted in the middle of its transfer (it resumes) and one that
//! joins after the upload included — and every copy has the uploaded SHA-256, and
//! each node announces it once with an `artifact` event; a holder whose copy went
//! bad on disk does not spread it.
//! Deadlines only guard against hanging.

use std::io::{Read, Write};
use std::time::Duration;

use kiln_integration::*;
use serde_json::Value;
use sha2::{Digest, Sha256};

const LONG: Duration = Duration::from_secs(300);
const SIZE: usize = 100 * 1024 * 1024;

/// Deterministic, incompressible-looking content.
fn content(size: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(size);
    let mut block = Sha256::digest(b"kiln artifact test").to_vec();
    while out.len() < size {
        block = Sha256::digest(&block).to_vec();
        out.extend_from_slice(&block);
    }
    out.truncate(size);
    out
}

/// (state, fetched bytes) of the newest version of `name` on `node`.
fn here(node: &Node, name: &str) -> Option<(String, u64)> {
    let v = node.get("/v1/artifacts")?;
    v["artifacts"].as_array()?.iter().find_map(|a| {
        if a["name"] != name {
            return None;
        }
        let last = a["versions"].as_array()?.last()?.clone();
        Some((
            last["here"].as_str()?.to_string(),
            last["fetched_bytes"].as_u64()?,
        ))
    })
}

fn sha_of_download(node: &Node, name: &str) -> String {
    let resp = ureq::AgentBuilder::new()
        .timeout_connect(Duration::from_secs(5))
        .build()
        .get(&format!("http://{}/v1/artifacts/{name}", node.http()))
        .call()
        .unwrap_or_else(|e| panic!("download from {}: {e}", node.name));
    let mut reader = resp.into_reader();
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = reader.read(&mut buf).expect("read the download");
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    hex_of(&h.finalize())
}

fn hex_of(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn a_100_mib_artifact_reaches_every_node_across_a_restart_and_a_late_join() {
    let _serial = serial();
    let mut nodes = start_cluster("art", 3, NodeOpts::default());
    wait_converged(&nodes, LONG);
    // Node 2 stays up throughout: its stream sees every node's announcement.
    let events = Subscriber::follow(nodes[1].http(), Some(String::new()));
    let data = content(SIZE);
    let sha = hex_of(&Sha256::digest(&data));
    let file = tempfile::NamedTempFile::new().expect("temp file");
    file.as_file()
        .write_all(&data)
        .expect("write the artifact file");
    drop(data);

    // Upload with the kiln CLI (streams the file, sends Content-Digest).
    let out = kiln_cli(&[
        "artifact",
        "put",
        "crm-solution",
        &file.path().display().to_string(),
        "--http",
        &nodes[0].http(),
    ]);
    assert!(
        out.status.success(),
        "upload failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let answer: Value = serde_json::from_slice(&out.stdout).expect("upload answer is JSON");
    assert_eq!(answer["sha256"], sha.as_str());
    assert_eq!(answer["size"], SIZE as u64);
    assert_eq!(answer["version"], 1);

    // Restart node 3 in the middle of its transfer.
    // Polled tightly: a release build fetches 100 MiB in about a second.
    let mut mid = 0;
    let start = std::time::Instant::now();
    while mid == 0 {
        match here(&nodes[2], "crm-solution") {
            Some((state, bytes)) if state == "fetching" && bytes > 0 => mid = bytes,
            Some((state, _)) if state == "complete" => {
                panic!("node 3 completed before the test could restart it mid-transfer")
            }
            _ => {
                assert!(start.elapsed() < LONG, "node 3 never started fetching");
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }
    nodes[2].kill9();
    nodes[2].restart();
    eprintln!("node 3 restarted with {mid} of {SIZE} bytes fetched");

    // A node that joins after the upload.
    let seed = nodes[0].seed();
    nodes.push(Node::start(
        "art4",
        NodeOpts {
            seeds: vec![seed],
            ..Default::default()
        },
    ));
    for n in &nodes {
        wait_until(&format!("{} holds the artifact", n.name), LONG, || {
            here(n, "crm-solution").is_some_and(|(state, _)| state == "complete")
        });
    }
    assert!(
        nodes[2].log().contains("resuming artifact fetch"),
        "node 3 resumed its transfer instead of starting over"
    );
    for n in &nodes {
        assert_eq!(sha_of_download(n, "crm-solution"), sha, "{}'s copy", n.name);
    }
    // Each node announced the version it holds, once: the uploader, the node
    // restarted mid-transfer and the late joiner included.
    let announcements = || -> Vec<(String, Value)> {
        events
            .snapshot()
            .into_iter()
            .filter(|s| s.event["kind"] == "artifact")
            .map(|s| {
                (
                    s.event["origin"].as_str().unwrap_or("").to_string(),
                    s.event,
                )
            })
            .collect()
    };
    wait_until("every node announces the version", LONG, || {
        nodes
            .iter()
            .all(|n| announcements().iter().any(|(origin, _)| *origin == n.id()))
    });
    std::thread::sleep(Duration::from_secs(2));
    let seen = announcements();
    assert_eq!(
        seen.len(),
        nodes.len(),
        "one announcement per node: {seen:?}"
    );
    for (_, e) in &seen {
        assert_eq!(e["name"], "crm-solution");
        assert_eq!(e["version"], 1);
        assert_eq!(e["sha256"], sha.as_str());
    }
    // Every node is recorded as a holder: a node records itself through the
    // control plane after it completes, so the list catches up a moment later.
    wait_until("every node is listed as a holder", LONG, || {
        nodes[3].get("/v1/artifacts").is_some_and(|list| {
            list["artifacts"][0]["versions"][0]["holders"]
                .as_array()
                .is_some_and(|h| h.len() == 4)
        })
    });

    // A checksum mismatch stores nothing; retiring removes the version.
    let bad = ureq::put(&format!("http://{}/v1/artifacts/other", nodes[1].http()))
        .set(
            "Content-Digest",
            "sha-256=:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=:",
        )
        .send_bytes(b"some content");
    assert!(matches!(bad, Err(ureq::Error::Status(422, _))), "{bad:?}");
    let del = ureq::delete(&format!(
        "http://{}/v1/artifacts/crm-solution?version=1",
        nodes[1].http()
    ))
    .call();
    assert!(del.is_ok(), "{del:?}");
    for n in &nodes {
        wait_until(
            &format!("{} drops the retired version", n.name),
            LONG,
            || {
                n.get("/v1/artifacts")
                    .is_some_and(|v| v["artifacts"].as_array().is_some_and(|a| a.is_empty()))
            },
        );
    }
}

#[test]
fn a_corrupt_chunk_from_a_holder_is_fetched_again_from_another() {
    let _serial = serial();
    let mut nodes = start_cluster("artc", 3, NodeOpts::default());
    wait_converged(&nodes, LONG);
    let data = content(16 * 1024 * 1024);
    let sha = hex_of(&Sha256::digest(&data));
    let put =
        ureq::put(&format!("http://{}/v1/artifacts/report", nodes[0].http())).send_bytes(&data);
    assert!(put.is_ok(), "{put:?}");
    // All three listed as holders, so the late node asks node 2 too.
    wait_until("every node is listed as a holder", LONG, || {
        nodes[0].get("/v1/artifacts").is_some_and(|list| {
            list["artifacts"][0]["versions"][0]["holders"]
                .as_array()
                .is_some_and(|h| h.len() == 3)
        })
    });

    // Node 2's copy goes bad on disk: one byte flipped in every 1 MiB chunk. It
    // still serves it, so a node fetching from it gets chunks that do not match
    // their digests.
    let blob = nodes[1].dir.join("data/artifacts/blobs").join(&sha);
    let mut bytes = std::fs::read(&blob).expect("node 2's copy of the artifact");
    for at in (512..bytes.len()).step_by(1 << 20) {
        bytes[at] ^= 0xff;
    }
    std::fs::write(&blob, &bytes).expect("corrupt node 2's copy");

    let seed = nodes[0].seed();
    nodes.push(Node::start(
        "artc4",
        NodeOpts {
            seeds: vec![seed],
            ..Default::default()
        },
    ));
    let late = &nodes[3];
    wait_until("the late node holds the artifact", LONG, || {
        here(late, "report").is_some_and(|(state, _)| state == "complete")
    });
    assert_eq!(sha_of_download(late, "report"), sha, "the late node's copy");
    assert!(
        late.metric_positive("kiln_artifact_chunks_rejected_total"),
        "the late node counted the chunks it rejected"
    );
    assert!(
        late.log().contains("did not match its digest"),
        "the late node logged the bad chunks"
    );
}

/// A node whose disk cannot take an artifact says so in its status, keeps
/// nothing half-written visible, and fetches the artifact once the disk has room.
#[test]
fn a_node_whose_disk_cannot_take_an_artifact_says_so_and_fetches_it_once_it_has_room() {
    let _serial = serial();
    let Some(disk) = SmallDisk::mount(4) else {
        return;
    };
    std::fs::create_dir(disk.path().join("artifacts")).expect("artifacts dir on the small disk");
    let first = Node::start("afd1", NodeOpts::default());
    let data_dir = disk.node_dir("afd2", &["artifacts"]);
    let full = Node::start_in(
        "afd2",
        data_dir.path(),
        free_ip(),
        NodeOpts {
            seeds: vec![first.seed()],
            ..Default::default()
        },
    );
    let nodes = [first, full];
    wait_converged(&nodes, LONG);
    let data = content(8 * 1024 * 1024);
    let sha = hex_of(&Sha256::digest(&data));
    let resp = ureq::put(&format!("http://{}/v1/artifacts/big", nodes[0].http()))
        .send_bytes(&data)
        .expect("upload");
    assert_eq!(resp.status(), 201);
    let [first, full] = &nodes;
    wait_until(
        "the full node reports its artifacts storage failing",
        LONG,
        || {
            full.get("/v1/node")
                .is_some_and(|n| n["storage_errors"]["artifacts"].is_string())
        },
    );
    // Nothing half-written is served: 503 until the whole content verified.
    match ureq::get(&format!("http://{}/v1/artifacts/big", full.http())).call() {
        Err(ureq::Error::Status(503, r)) => {
            let body = r.into_string().unwrap_or_default();
            assert!(body.contains("not on this node yet"), "{body}");
        }
        other => panic!("the full node answered {other:?} for an artifact it cannot hold"),
    }
    disk.resize(64);
    wait_until("the full node holds the artifact", LONG, || {
        here(full, "big").is_some_and(|(state, _)| state == "complete")
    });
    assert_eq!(sha_of_download(full, "big"), sha);
    assert_eq!(sha_of_download(first, "big"), sha);
    wait_until("the full node's status clears", LONG, || {
        full.get("/v1/node").is_some_and(|n| {
            n["storage_errors"]
                .as_object()
                .is_some_and(|e| e.is_empty())
        })
    });
}

/// An Idempotency-Key names one upload cluster-wide: a retry on another node
/// gets the first version, other content under it is refused (decided by the
/// control plane, not by a node's possibly lagging copy). A retired version
/// leaves every node's disk at the next collection, so `artifact_keep_versions`
/// bounds the disk. A name that is not UTF-8 once decoded is refused.
#[test]
fn an_upload_key_names_one_upload_and_retired_versions_leave_the_disk() {
    let _serial = serial();
    let nodes = start_cluster("artk", 3, NodeOpts::default());
    wait_converged(&nodes, LONG);
    // Versions are assigned by the control plane: every node reaches it.
    wait_until(
        "every node knows the stripe's active and 3 voters",
        LONG,
        || {
            nodes.iter().all(|n| {
                n.get("/v1/cluster/stripes").is_some_and(|v| {
                    v["stripes"][0]["active"].is_string()
                        && v["voters"].as_array().is_some_and(|a| a.len() == 3)
                })
            })
        },
    );
    let put = |node: &Node, name: &str, key: Option<&str>, body: &[u8]| {
        let mut req = ureq::put(&format!("http://{}/v1/artifacts/{name}", node.http()));
        if let Some(k) = key {
            req = req.set("Idempotency-Key", k);
        }
        match req.send_bytes(body) {
            Ok(r) => (r.status(), r.into_json::<Value>().unwrap_or_default()),
            Err(ureq::Error::Status(code, r)) => (code, r.into_json::<Value>().unwrap_or_default()),
            Err(e) => panic!("PUT /v1/artifacts/{name} on {}: {e}", node.name),
        }
    };
    let blob_on = |node: &Node, sha: &str| node.dir.join("data/artifacts/blobs").join(sha).exists();

    let first = content(64 * 1024);
    let first_sha = hex_of(&Sha256::digest(&first));
    let (code, body) = put(&nodes[0], "app", Some("release-1"), &first);
    assert_eq!(code, 201, "{body}");
    assert_eq!(body["version"], 1, "{body}");

    let other = vec![7u8; 1000];
    let (code, body) = put(&nodes[1], "app", Some("release-1"), &other);
    assert_eq!(code, 422, "other content under a used key: {body}");
    assert!(
        body["error"]
            .as_str()
            .is_some_and(|e| e.contains("Idempotency-Key")),
        "{body}"
    );
    let (code, body) = put(&nodes[2], "app", Some("release-1"), &first);
    assert_eq!(code, 201, "a retry on another node: {body}");
    assert_eq!(body["version"], 1, "a retry gets the first version: {body}");

    let (code, body) = put(&nodes[0], "%FF", None, b"x");
    assert_eq!(code, 400, "a name that is not UTF-8: {body}");

    wait_until("every node holds version 1", LONG, || {
        nodes.iter().all(|n| blob_on(n, &first_sha))
    });
    // Three newer versions: with the default of 3 kept, version 1 is retired.
    let mut newer = Vec::new();
    for i in 0..3u8 {
        let data = vec![i; 4096 + usize::from(i)];
        let (code, body) = put(&nodes[0], "app", None, &data);
        assert_eq!(code, 201, "{body}");
        newer.push(hex_of(&Sha256::digest(&data)));
    }
    wait_until(
        "every node has removed retired version 1 and holds the live ones",
        LONG,
        || {
            nodes
                .iter()
                .all(|n| !blob_on(n, &first_sha) && newer.iter().all(|sha| blob_on(n, sha)))
        },
    );
    let list = nodes[1].get("/v1/artifacts").expect("artifact list");
    let versions: Vec<u64> = list["artifacts"][0]["versions"]
        .as_array()
        .expect("versions")
        .iter()
        .filter_map(|v| v["version"].as_u64())
        .collect();
    assert_eq!(versions, vec![2, 3, 4], "{list}");
}
