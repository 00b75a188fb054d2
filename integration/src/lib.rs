//! Harness for tests and benchmarks that run real `kiln` processes.
//!
//! Each node gets its own loopback address (127.x.y.z) with fixed ports, so that
//! tests running side by side never fight over ports, and its own data directory.
//! The `kiln` binary is the one cargo built next to the test executable
//! (`target/<profile>/kiln`), or `$KILN_BIN`.

use std::collections::{BTreeMap, HashSet};
use std::net::{Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde_json::Value;

pub mod http1;
pub mod netns;

pub const PEER_PORT: u16 = 7700;
pub const HTTP_PORT: u16 = 8700;

/// Path of the `kiln` binary under test.
pub fn kiln_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("KILN_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("own executable path");
    // A test lives in target/<profile>/deps/, a benchmark binary in target/<profile>/.
    let dir = exe.parent().expect("executable has a directory");
    let dir = if dir.ends_with("deps") {
        dir.parent().unwrap_or(dir)
    } else {
        dir
    };
    let bin = dir.join("kiln");
    assert!(
        bin.exists(),
        "{} not found: build it first (cargo build -p kiln-node, or cargo test --workspace builds it)",
        bin.display()
    );
    bin
}

/// Runs a `kiln` client verb (status, members, …) to completion.
pub fn kiln_cli(args: &[&str]) -> std::process::Output {
    Command::new(kiln_bin())
        .args(args)
        .output()
        .expect("run the kiln binary")
}

static SERIAL: Mutex<()> = Mutex::new(());

/// Cluster tests share two cores: run them one at a time so that one test's load
/// cannot make another's timing assertions lie.
pub fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

static NEXT_IP: AtomicU32 = AtomicU32::new(0);

/// A loopback address whose kiln ports are free.
pub fn free_ip() -> Ipv4Addr {
    let base = (std::process::id() % 200) * 250;
    loop {
        let n = base + NEXT_IP.fetch_add(1, Ordering::Relaxed);
        let ip = Ipv4Addr::new(
            127,
            10 + ((n / 62_500) % 200) as u8,
            ((n / 250) % 250) as u8,
            (n % 250) as u8 + 2,
        );
        let free = TcpListener::bind((ip, PEER_PORT)).is_ok()
            && TcpListener::bind((ip, HTTP_PORT)).is_ok();
        if free {
            return ip;
        }
    }
}

/// Polls `cond` every 100 ms until it holds; panics with `what` after `timeout`
/// (a guard against hanging, not a performance assertion).
pub fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        if start.elapsed() > timeout {
            panic!("timed out after {timeout:?} waiting until {what}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Whether a `/v1/cluster/stripes` view shows a control plane that can fail a
/// stripe over: three voters or more and no voter change under way. A test that
/// kills, pauses or cuts off an active waits for this first: until the voter set
/// has grown from the founder alone, losing the founder stops every election.
pub fn can_fail_over(view: &Value) -> bool {
    view["voters"].as_array().is_some_and(|v| v.len() >= 3) && view["voters_changing"] == false
}

/// Client threads that each create keys `{prefix}{writer}-{i}` in `map`
/// (`If-None-Match: *`) through the node `target(writer, i)` names, until
/// stopped or `limit` writes each. A write its node sent again (across a
/// failover, through a relay) and the stripe applied twice would be answered
/// 412: [`CreateOnlyWriters::stop`] and [`CreateOnlyWriters::wait`] assert
/// that none was.
pub struct CreateOnlyWriters {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
    acked: std::sync::Arc<Mutex<BTreeMap<String, String>>>,
    refused: std::sync::Arc<Mutex<Vec<String>>>,
}

impl CreateOnlyWriters {
    pub fn start(
        writers: usize,
        map: &str,
        prefix: &str,
        limit: Option<usize>,
        target: impl Fn(usize, usize) -> String + Send + Sync + 'static,
    ) -> CreateOnlyWriters {
        let target = std::sync::Arc::new(target);
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let acked: std::sync::Arc<Mutex<BTreeMap<String, String>>> = Default::default();
        let refused: std::sync::Arc<Mutex<Vec<String>>> = Default::default();
        let threads = (0..writers)
            .map(|w| {
                let (stop, acked, refused) = (stop.clone(), acked.clone(), refused.clone());
                let (target, map, prefix) = (target.clone(), map.to_string(), prefix.to_string());
                std::thread::spawn(move || {
                    let agent = ureq::AgentBuilder::new()
                        .timeout(Duration::from_secs(30))
                        .build();
                    let mut i = 0;
                    while !stop.load(Ordering::Relaxed) && limit.is_none_or(|l| i < l) {
                        let (key, value) = (format!("{prefix}{w}-{i}"), format!("value-{w}-{i}"));
                        let resp = agent
                            .put(&format!("http://{}/v1/kv/{map}/{key}", target(w, i)))
                            .set("If-None-Match", "*")
                            .send_string(&value);
                        match resp {
                            Ok(r) if r.status() == 200 => {
                                lock(&acked).insert(key, value);
                            }
                            Err(ureq::Error::Status(412, _)) => lock(&refused).push(key),
                            _ => {}
                        }
                        i += 1;
                    }
                })
            })
            .collect();
        CreateOnlyWriters {
            stop,
            threads,
            acked,
            refused,
        }
    }

    /// Writes acknowledged so far.
    pub fn acked(&self) -> usize {
        lock(&self.acked).len()
    }

    /// Stops the writers; the acknowledged writes, none answered 412.
    pub fn stop(self) -> BTreeMap<String, String> {
        self.stop.store(true, Ordering::Relaxed);
        self.wait()
    }

    /// Waits for the writers to finish; the acknowledged writes, none
    /// answered 412.
    pub fn wait(self) -> BTreeMap<String, String> {
        for t in self.threads {
            t.join().expect("a writer thread panicked");
        }
        let refused = lock(&self.refused).clone();
        assert!(
            refused.is_empty(),
            "{} create-only writes were answered 412 (applied twice), e.g. {:?}",
            refused.len(),
            &refused[..refused.len().min(5)]
        );
        let acked = lock(&self.acked).clone();
        acked
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A `kiln run` process.
pub struct Node {
    pub name: String,
    pub ip: Ipv4Addr,
    pub dir: PathBuf,
    pub args: Vec<String>,
    netns: Option<String>,
    child: Option<Child>,
    agent: ureq::Agent,
    _tmp: Option<tempfile::TempDir>,
}

/// How to start a node.
#[derive(Clone, Debug, Default)]
pub struct NodeOpts {
    /// Network namespace to run the node in (see [`netns::Lab`]).
    pub netns: Option<String>,
    pub secret: Option<String>,
    pub seeds: Vec<String>,
    pub extra: Vec<String>,
    pub env: Vec<(String, String)>,
}

impl Node {
    /// Starts a node in a new temporary data directory.
    pub fn start(name: &str, opts: NodeOpts) -> Node {
        let tmp = tempfile::Builder::new()
            .prefix(&format!("kiln-{name}-"))
            .tempdir()
            .expect("temp dir");
        let dir = tmp.path().to_path_buf();
        let mut n = Node::start_in(name, &dir, free_ip(), opts);
        n._tmp = Some(tmp);
        n
    }

    /// Starts a node on `ip` with data directory `dir`.
    pub fn start_in(name: &str, dir: &Path, ip: Ipv4Addr, opts: NodeOpts) -> Node {
        let mut args: Vec<String> = vec![
            "run".into(),
            "--data-dir".into(),
            dir.join("data").display().to_string(),
            "--listen".into(),
            format!("{ip}:{PEER_PORT}"),
            "--http".into(),
            format!("{ip}:{HTTP_PORT}"),
            "--name".into(),
            name.into(),
        ];
        if let Some(s) = &opts.secret {
            args.push("--cluster-secret".into());
            args.push(s.clone());
        }
        for s in &opts.seeds {
            args.push("--seed".into());
            args.push(s.clone());
        }
        args.extend(opts.extra.iter().cloned());
        let mut node = Node {
            name: name.into(),
            ip,
            dir: dir.to_path_buf(),
            args,
            netns: opts.netns.clone(),
            child: None,
            agent: ureq::AgentBuilder::new()
                .timeout(Duration::from_secs(5))
                .build(),
            _tmp: None,
        };
        node.spawn(&opts.env);
        node
    }

    fn spawn(&mut self, env: &[(String, String)]) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("kiln.log"))
            .expect("log file");
        let mut cmd = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(kiln_bin());
                c
            }
            None => Command::new(kiln_bin()),
        };
        // `KILN_NODE_LOG` sets the nodes' log filter (to debug a test or
        // benchmark); without it they use kiln's default.
        match std::env::var("KILN_NODE_LOG") {
            Ok(filter) => cmd.env("RUST_LOG", filter),
            Err(_) => cmd.env_remove("RUST_LOG"),
        };
        cmd.args(&self.args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log file"))
            .stderr(log);
        for (k, v) in env {
            cmd.env(k, v);
        }
        self.child = Some(cmd.spawn().expect("start kiln"));
    }

    /// The address other nodes use as `--seed`.
    pub fn seed(&self) -> String {
        format!("{}:{PEER_PORT}", self.ip)
    }

    pub fn http(&self) -> String {
        format!("{}:{HTTP_PORT}", self.ip)
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().map(|c| c.id() as i32).unwrap_or(0)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("kiln.log")).unwrap_or_default()
    }

    /// The node's Prometheus text (empty if it does not answer).
    pub fn metrics(&self) -> String {
        self.agent
            .get(&format!("http://{}/metrics", self.http()))
            .call()
            .ok()
            .and_then(|r| r.into_string().ok())
            .unwrap_or_default()
    }

    /// Whether a counter or gauge whose line starts with `name` is above zero.
    pub fn metric_positive(&self, name: &str) -> bool {
        self.metrics()
            .lines()
            .any(|l| l.starts_with(name) && !l.ends_with(" 0"))
    }

    /// The value of an unlabelled counter or gauge (`None` if the node does not
    /// answer or has no such metric).
    pub fn metric_value(&self, name: &str) -> Option<f64> {
        self.metrics().lines().find_map(|l| {
            let value = l.strip_prefix(name)?.strip_prefix(' ')?;
            value.trim().parse().ok()
        })
    }

    /// The sum of the samples whose line starts with `prefix` and contains
    /// `containing` (a label, say; `""` for all): a labelled family's total.
    pub fn metric_sum(&self, prefix: &str, containing: &str) -> f64 {
        self.metrics()
            .lines()
            .filter(|l| l.starts_with(prefix) && l.contains(containing))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    /// GET a JSON document from the node's API; `None` if it does not answer.
    pub fn get(&self, path: &str) -> Option<Value> {
        self.agent
            .get(&format!("http://{}{}", self.http(), path))
            .call()
            .ok()?
            .into_json()
            .ok()
    }

    pub fn id(&self) -> String {
        let mut id = None;
        wait_until(
            &format!("{} answers /v1/node", self.name),
            Duration::from_secs(30),
            || {
                id = self
                    .get("/v1/node")
                    .and_then(|v| v["id"].as_str().map(String::from));
                id.is_some()
            },
        );
        id.unwrap_or_default()
    }

    /// Member id → state, as this node sees it.
    pub fn member_states(&self) -> Option<Vec<(String, String)>> {
        self.member_rows("id")
    }

    /// Member `key` (id or name) → state, as this node sees it.
    pub fn member_rows(&self, key: &str) -> Option<Vec<(String, String)>> {
        member_rows_of(&self.get("/v1/cluster/members")?, key)
    }

    pub fn state_of(&self, id: &str) -> Option<String> {
        self.member_states()?
            .into_iter()
            .find(|(m, _)| m == id)
            .map(|(_, s)| s)
    }

    /// Ids this node sees alive.
    pub fn alive(&self) -> HashSet<String> {
        self.member_states()
            .unwrap_or_default()
            .into_iter()
            .filter(|(_, s)| s == "alive")
            .map(|(id, _)| id)
            .collect()
    }

    pub fn signal(&self, sig: i32) {
        if let Some(c) = &self.child {
            unsafe {
                libc::kill(c.id() as i32, sig);
            }
        }
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait for the exit; returns the exit code.
    pub fn terminate(&mut self) -> Option<i32> {
        self.signal(libc::SIGTERM);
        let mut c = self.child.take()?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(st)) = c.try_wait() {
                return st.code();
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                let _ = c.wait();
                panic!("{} did not exit within 30 s of SIGTERM", self.name);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The exit code if the process has exited by itself; it is left running
    /// otherwise.
    pub fn exited(&mut self) -> Option<i32> {
        let st = self.child.as_mut()?.try_wait().ok()??;
        self.child = None;
        st.code()
    }

    /// Waits for the process to exit by itself (a refused start); returns its exit code.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let mut c = self.child.take()?;
        let start = Instant::now();
        loop {
            if let Ok(Some(st)) = c.try_wait() {
                return st.code();
            }
            if start.elapsed() > timeout {
                let _ = c.kill();
                let _ = c.wait();
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Starts the process again with the same arguments and data directory.
    pub fn restart(&mut self) {
        self.kill9();
        self.spawn(&[]);
    }

    /// Starts again with changed arguments.
    pub fn restart_with(&mut self, args: Vec<String>) {
        self.kill9();
        self.args = args;
        self.spawn(&[]);
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill9();
        if std::thread::panicking() {
            let log = self.log();
            // `KILN_TEST_LOG_DIR` keeps whole logs of a failed test for reading later.
            if let Some(dir) = std::env::var_os("KILN_TEST_LOG_DIR") {
                let dir = std::path::PathBuf::from(dir);
                let kept = std::fs::create_dir_all(&dir)
                    .and_then(|()| std::fs::write(dir.join(format!("{}.log", self.name)), &log));
                if let Err(e) = kept {
                    eprintln!(
                        "cannot keep the log of {} in {}: {e}",
                        self.name,
                        dir.display()
                    );
                }
            }
            let tail: Vec<&str> = log.lines().rev().take(100).collect();
            eprintln!("--- last log lines of {} ---", self.name);
            for l in tail.iter().rev() {
                eprintln!("{l}");
            }
        }
    }
}

/// Starts `n` nodes: the first without seeds, the others seeded by it.
pub fn start_cluster(prefix: &str, n: usize, opts: NodeOpts) -> Vec<Node> {
    let first = Node::start(&format!("{prefix}1"), opts.clone());
    let seed = first.seed();
    let mut nodes = vec![first];
    for i in 2..=n {
        let mut o = opts.clone();
        o.seeds.push(seed.clone());
        nodes.push(Node::start(&format!("{prefix}{i}"), o));
    }
    nodes
}

/// Waits until every node sees every other one alive.
pub fn wait_converged(nodes: &[Node], timeout: Duration) -> Vec<String> {
    let ids: Vec<String> = nodes.iter().map(|n| n.id()).collect();
    let want: HashSet<String> = ids.iter().cloned().collect();
    wait_until(
        &format!("{} nodes see each other alive", nodes.len()),
        timeout,
        || nodes.iter().all(|n| want.is_subset(&n.alive())),
    );
    ids
}

/// One message of an event stream: the event JSON and the id that came with it.
#[derive(Debug, Clone)]
pub struct Streamed {
    pub event: Value,
    pub id: Option<String>,
    /// When the test process read it.
    pub at: Instant,
}

/// Follows `GET /v1/broadcast/stream` of a node on a thread of its own and records
/// every message. When the stream breaks (the node restarts, `lagged`) it reconnects
/// with the last id as `Last-Event-ID`, as a real client does. `from` is the
/// starting token (`Some("")`: everything the node's log holds; `None`: live end).
pub struct Subscriber {
    pub events: std::sync::Arc<Mutex<Vec<Streamed>>>,
    /// Connections made (1 + reconnects).
    pub connections: std::sync::Arc<AtomicU32>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Subscriber {
    pub fn follow(http: String, from: Option<String>) -> Subscriber {
        Self::follow_filtered(http, "", from)
    }

    /// As [`follow`](Self::follow), with a filter such as `?table=orders`.
    pub fn follow_filtered(http: String, query: &str, from: Option<String>) -> Subscriber {
        use std::io::BufRead;
        let query = query.to_string();
        let events: std::sync::Arc<Mutex<Vec<Streamed>>> = Default::default();
        let connections: std::sync::Arc<AtomicU32> = Default::default();
        let stop: std::sync::Arc<std::sync::atomic::AtomicBool> = Default::default();
        let thread = {
            let (events, connections, stop) = (events.clone(), connections.clone(), stop.clone());
            std::thread::spawn(move || {
                // Reads time out so that the thread notices `stop`; keepalives
                // come every 15 s, so a 20 s silence means a dead connection.
                let agent = ureq::AgentBuilder::new()
                    .timeout_connect(Duration::from_secs(3))
                    .timeout_read(Duration::from_secs(20))
                    .build();
                let mut last_id = from;
                while !stop.load(Ordering::SeqCst) {
                    let mut req = agent.get(&format!("http://{http}/v1/broadcast/stream{query}"));
                    if let Some(id) = &last_id {
                        req = req.set("Last-Event-ID", id);
                    }
                    let Ok(resp) = req.call() else {
                        std::thread::sleep(Duration::from_millis(200));
                        continue;
                    };
                    connections.fetch_add(1, Ordering::SeqCst);
                    let reader = std::io::BufReader::new(resp.into_reader());
                    let mut id = None;
                    let mut data = None;
                    for line in reader.lines() {
                        let Ok(line) = line else { break };
                        if stop.load(Ordering::SeqCst) {
                            return;
                        }
                        if let Some(v) = line.strip_prefix("id: ") {
                            id = Some(v.to_string());
                        } else if let Some(v) = line.strip_prefix("data: ") {
                            data = serde_json::from_str::<Value>(v).ok();
                        } else if line.is_empty() {
                            // A frame may be an id alone (where the stream
                            // starts, or where filtered events moved it).
                            let frame_id = id.take();
                            if frame_id.is_some() {
                                last_id = frame_id.clone();
                            }
                            if let Some(event) = data.take() {
                                events
                                    .lock()
                                    .unwrap_or_else(|p| p.into_inner())
                                    .push(Streamed {
                                        event,
                                        id: frame_id,
                                        at: Instant::now(),
                                    });
                            }
                        }
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            })
        };
        Subscriber {
            events,
            connections,
            stop,
            thread: Some(thread),
        }
    }

    pub fn snapshot(&self) -> Vec<Streamed> {
        self.events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn count(&self) -> usize {
        self.events.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // The thread ends at its next line or read timeout; do not wait for it.
        drop(self.thread.take());
    }
}

/// Checks a recorded stream: per origin, seqs are exactly `1, 2, 3, ...` (nothing
/// twice, nothing skipped, in order), and no `resync` or unknown message came.
/// Returns the last seq seen per origin.
pub fn check_stream(
    events: &[Streamed],
) -> Result<std::collections::BTreeMap<String, u64>, String> {
    let mut last: std::collections::BTreeMap<String, u64> = Default::default();
    for (i, s) in events.iter().enumerate() {
        let e = &s.event;
        if e["kind"] == "lagged" {
            continue;
        }
        let (Some(origin), Some(seq)) = (e["origin"].as_str(), e["seq"].as_u64()) else {
            return Err(format!("message {i} is not an event: {e}"));
        };
        if e["kind"] == "resync" {
            return Err(format!("message {i} is a resync: {e}"));
        }
        let prev = last.entry(origin.to_string()).or_insert(0);
        if seq != *prev + 1 {
            return Err(format!(
                "message {i}: origin {origin} seq {seq} after {prev} (duplicate, gap or reorder)"
            ));
        }
        *prev = seq;
    }
    Ok(last)
}

/// Member `key` (id or name) → state, from a `GET /v1/cluster/members` answer.
pub fn member_rows_of(members: &serde_json::Value, key: &str) -> Option<Vec<(String, String)>> {
    Some(
        members["members"]
            .as_array()?
            .iter()
            .map(|m| {
                (
                    m[key].as_str().unwrap_or_default().to_string(),
                    m["state"].as_str().unwrap_or_default().to_string(),
                )
            })
            .collect(),
    )
}

/// Clock ticks per second of `/proc/<pid>/stat` CPU times.
pub fn clock_ticks() -> f64 {
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// User + system CPU ticks of a process (0 once it is gone).
pub fn cpu_ticks(pid: i32) -> u64 {
    let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0;
    };
    let Some((_, rest)) = s.rsplit_once(')') else {
        return 0;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let field = |i: usize| f.get(i).and_then(|x| x.parse::<u64>().ok()).unwrap_or(0);
    field(11) + field(12)
}

/// CPU ticks of all of `pids`.
pub fn ticks_of(pids: &[i32]) -> u64 {
    pids.iter().map(|p| cpu_ticks(*p)).sum()
}

/// CPU ticks the whole machine spent busy (all cores; not idle, not waiting
/// for I/O), from `/proc/stat`.
pub fn machine_busy_ticks() -> u64 {
    let Ok(s) = std::fs::read_to_string("/proc/stat") else {
        return 0;
    };
    let Some(line) = s.lines().find(|l| l.starts_with("cpu ")) else {
        return 0;
    };
    let f: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    // user nice system idle iowait irq softirq steal
    [0, 1, 2, 5, 6, 7]
        .iter()
        .map(|&i| f.get(i).copied().unwrap_or(0))
        .sum()
}

/// A tmpfs of `mib` MiB mounted on a temporary directory (root only), unmounted
/// when dropped.
pub struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    /// A tmpfs of `mib` MiB, or `None` (and a note that the test is skipped)
    /// where mounting is not allowed.
    pub fn mount(mib: u64) -> Option<SmallDisk> {
        let dir = tempfile::Builder::new()
            .prefix("kiln-smalldisk-")
            .tempdir()
            .ok()?;
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"])
            .arg(dir.path())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            eprintln!("skipped: cannot mount a tmpfs here (needs root)");
        }
        ok.then_some(SmallDisk { dir })
    }

    /// Where the disk is mounted.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// A directory for `Node::start_in` whose node keeps `files` (of its data
    /// directory) on this disk and the rest where the directory is.
    pub fn node_dir(&self, name: &str, files: &[&str]) -> tempfile::TempDir {
        let dir = tempfile::Builder::new()
            .prefix(&format!("kiln-{name}-"))
            .tempdir()
            .expect("temp dir");
        // `Node::start_in` runs the node with `--data-dir <dir>/data`.
        std::fs::create_dir(dir.path().join("data")).expect("data dir");
        for file in files {
            std::os::unix::fs::symlink(
                self.dir.path().join(file),
                dir.path().join("data").join(file),
            )
            .expect("symlink");
        }
        dir
    }

    pub fn resize(&self, mib: u64) {
        let ok = std::process::Command::new("mount")
            .args(["-o", &format!("remount,size={mib}m")])
            .arg(self.dir.path())
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "cannot resize the tmpfs");
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}
