//! Membership benchmark: kiln against serf (Debian package `serf`), same machine,
//! same run. For each cluster size N it measures
//! - convergence: from starting N processes to every node seeing N alive;
//! - failure detection: from kill -9 of one node to each survivor seeing it dead
//!   (median and maximum over survivors);
//! - false deaths: how many nodes declared a node dead during a 1 s SIGSTOP of it;
//! - idle RSS per node: after convergence, once the joins' aftermath is over (kiln:
//!   new stripe members synced) and 15 s more.
//!
//! It prints numbers and ratios; it asserts nothing. Run it with
//! `cargo build --release --workspace --bins && target/release/bench-membership [5,10,20,40]`.

use std::collections::HashSet;
use std::io::{BufReader, Write};
use std::net::{Ipv4Addr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kiln_integration::{free_ip, member_rows_of, Node, NodeOpts};
use serde::{Deserialize, Serialize};

const SERF_BIND_PORT: u16 = 7946;
const SERF_RPC_PORT: u16 = 7373;
/// How long a settled cluster idles before its RSS is read.
const IDLE_SETTLE: Duration = Duration::from_secs(15);

/// What an observer node reports: member name → state (alive|dead|other).
type View = Vec<(String, String)>;

/// Asks one node for its view over a connection of its own, so that the nodes
/// can be watched in parallel (one after the other, a round over 40 loaded nodes
/// takes longer than what is measured).
type Observer = Box<dyn FnMut() -> Option<View> + Send>;

/// How often each node is asked for its view while the cluster converges.
const CONVERGE_POLL: Duration = Duration::from_millis(50);

trait Cluster {
    fn len(&self) -> usize;
    fn name(&self, i: usize) -> String;
    fn view(&mut self, i: usize) -> Option<View>;
    fn observer(&self, i: usize) -> Observer;
    fn pid(&self, i: usize) -> i32;
    fn kill9(&mut self, i: usize);
    /// Done with the work that follows a join (kiln: stripe members syncing).
    fn settled(&self) -> bool {
        true
    }
}

struct KilnCluster {
    nodes: Vec<Node>,
}

impl KilnCluster {
    fn start(n: usize) -> Self {
        let opts = NodeOpts {
            secret: Some("bench-secret".into()),
            ..Default::default()
        };
        let first = Node::start("k1", opts.clone());
        let seed = first.seed();
        let mut nodes = vec![first];
        for i in 2..=n {
            let mut o = opts.clone();
            o.seeds.push(seed.clone());
            nodes.push(Node::start(&format!("k{i}"), o));
        }
        KilnCluster { nodes }
    }
}

impl Cluster for KilnCluster {
    fn len(&self) -> usize {
        self.nodes.len()
    }
    fn name(&self, i: usize) -> String {
        self.nodes[i].name.clone()
    }
    fn view(&mut self, i: usize) -> Option<View> {
        self.nodes[i].member_rows("name")
    }
    fn observer(&self, i: usize) -> Observer {
        let url = format!("http://{}/v1/cluster/members", self.nodes[i].http());
        let agent = ureq::AgentBuilder::new()
            .timeout(Duration::from_secs(5))
            .build();
        Box::new(move || {
            let v: serde_json::Value = agent.get(&url).call().ok()?.into_json().ok()?;
            member_rows_of(&v, "name")
        })
    }
    fn pid(&self, i: usize) -> i32 {
        self.nodes[i].pid()
    }
    fn kill9(&mut self, i: usize) {
        self.nodes[i].kill9();
    }
    fn settled(&self) -> bool {
        self.nodes[0]
            .get("/v1/cluster/stripes")
            .and_then(|v| {
                let stripes = v["stripes"].as_array()?.clone();
                Some(stripes.iter().all(|s| {
                    s["members"]
                        .as_array()
                        .is_some_and(|m| m.iter().all(|m| m["role"] != "syncing"))
                }))
            })
            .unwrap_or(false)
    }
}

#[derive(Serialize)]
struct RpcHeader<'a> {
    #[serde(rename = "Command")]
    command: &'a str,
    #[serde(rename = "Seq")]
    seq: u64,
}

#[derive(Serialize)]
struct Handshake {
    #[serde(rename = "Version")]
    version: u32,
}

#[derive(Deserialize)]
struct ResponseHeader {
    #[serde(rename = "Error")]
    error: String,
}

#[derive(Deserialize)]
struct SerfMember {
    #[serde(rename = "Name")]
    name: String,
    #[serde(rename = "Status")]
    status: String,
}

#[derive(Deserialize)]
struct MembersBody {
    #[serde(rename = "Members")]
    members: Vec<SerfMember>,
}

/// A serf agent and a connection to its RPC port.
struct SerfNode {
    name: String,
    ip: Ipv4Addr,
    child: Option<Child>,
    rpc: Option<(TcpStream, BufReader<TcpStream>, u64)>,
}

impl SerfNode {
    fn connect(&mut self) -> Option<()> {
        let s = TcpStream::connect_timeout(
            &(self.ip, SERF_RPC_PORT).into(),
            Duration::from_millis(500),
        )
        .ok()?;
        s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        let mut w = s.try_clone().ok()?;
        let mut r = BufReader::new(s);
        w.write_all(
            &rmp_serde::to_vec_named(&RpcHeader {
                command: "handshake",
                seq: 0,
            })
            .ok()?,
        )
        .ok()?;
        w.write_all(&rmp_serde::to_vec_named(&Handshake { version: 1 }).ok()?)
            .ok()?;
        let h: ResponseHeader = rmp_serde::from_read(&mut r).ok()?;
        if !h.error.is_empty() {
            return None;
        }
        self.rpc = Some((w, r, 1));
        Some(())
    }

    fn members(&mut self) -> Option<View> {
        if self.rpc.is_none() {
            self.connect()?;
        }
        let result = (|| {
            let (w, r, seq) = self.rpc.as_mut()?;
            *seq += 1;
            w.write_all(
                &rmp_serde::to_vec_named(&RpcHeader {
                    command: "members",
                    seq: *seq,
                })
                .ok()?,
            )
            .ok()?;
            let h: ResponseHeader = rmp_serde::from_read(&mut *r).ok()?;
            if !h.error.is_empty() {
                return None;
            }
            let body: MembersBody = rmp_serde::from_read(&mut *r).ok()?;
            Some(
                body.members
                    .into_iter()
                    .map(|m| {
                        let state = if m.status == "failed" {
                            "dead".to_string()
                        } else {
                            m.status
                        };
                        (m.name, state)
                    })
                    .collect(),
            )
        })();
        if result.is_none() {
            self.rpc = None;
        }
        result
    }
}

struct SerfCluster {
    nodes: Vec<SerfNode>,
}

impl SerfCluster {
    fn start(n: usize) -> Self {
        let mut nodes: Vec<SerfNode> = Vec::new();
        for i in 1..=n {
            let ip = free_serf_ip();
            let name = format!("s{i}");
            let mut cmd = Command::new("serf");
            cmd.arg("agent")
                .arg(format!("-node={name}"))
                .arg(format!("-bind={ip}:{SERF_BIND_PORT}"))
                .arg(format!("-rpc-addr={ip}:{SERF_RPC_PORT}"))
                .arg("-log-level=err")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            if let Some(first) = nodes.first() {
                cmd.arg(format!("-join={}:{SERF_BIND_PORT}", first.ip));
                // serf's -join fails if the seed is not up yet; it is, by now.
            }
            let child = cmd.spawn().expect("start serf (apt-get install serf)");
            nodes.push(SerfNode {
                name,
                ip,
                child: Some(child),
                rpc: None,
            });
            if i == 1 {
                // The first agent must listen before the others join it.
                let start = Instant::now();
                while nodes[0].connect().is_none() && start.elapsed() < Duration::from_secs(10) {
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
        SerfCluster { nodes }
    }
}

fn free_serf_ip() -> Ipv4Addr {
    loop {
        let ip = free_ip();
        if std::net::TcpListener::bind((ip, SERF_BIND_PORT)).is_ok()
            && std::net::TcpListener::bind((ip, SERF_RPC_PORT)).is_ok()
        {
            return ip;
        }
    }
}

impl Cluster for SerfCluster {
    fn len(&self) -> usize {
        self.nodes.len()
    }
    fn name(&self, i: usize) -> String {
        self.nodes[i].name.clone()
    }
    fn view(&mut self, i: usize) -> Option<View> {
        self.nodes[i].members()
    }
    fn observer(&self, i: usize) -> Observer {
        let mut node = SerfNode {
            name: self.nodes[i].name.clone(),
            ip: self.nodes[i].ip,
            child: None,
            rpc: None,
        };
        Box::new(move || node.members())
    }
    fn pid(&self, i: usize) -> i32 {
        self.nodes[i]
            .child
            .as_ref()
            .map(|c| c.id() as i32)
            .unwrap_or(0)
    }
    fn kill9(&mut self, i: usize) {
        if let Some(mut c) = self.nodes[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.nodes[i].rpc = None;
    }
}

impl Drop for SerfCluster {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            self.kill9(i);
        }
    }
}

fn rss_mb(pid: i32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

fn signal(pid: i32, sig: i32) {
    unsafe {
        libc::kill(pid, sig);
    }
}

#[derive(Debug, Default, Clone)]
struct Result {
    converge_s: Option<f64>,
    /// When the median node first saw every node alive.
    converge_node_median_s: Option<f64>,
    detect_median_s: Option<f64>,
    detect_max_s: Option<f64>,
    false_deaths: usize,
    rss_mean_mb: f64,
    rss_max_mb: f64,
}

fn median(v: &mut [f64]) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    Some(v[v.len() / 2])
}

fn measure(c: &mut dyn Cluster, started: Instant, timeout: Duration) -> Result {
    let n = c.len();
    let names: HashSet<String> = (0..n).map(|i| c.name(i)).collect();
    let mut r = Result::default();

    // Convergence: the moment each node first sees every node alive, each node
    // watched by a thread of its own.
    let observers: Vec<Observer> = (0..n).map(|i| c.observer(i)).collect();
    let names = &names;
    let converged: Vec<Option<f64>> = std::thread::scope(|scope| {
        let watchers: Vec<_> = observers
            .into_iter()
            .map(|mut view| {
                scope.spawn(move || {
                    while started.elapsed() < timeout {
                        let sees_all = view().is_some_and(|v| {
                            let alive: HashSet<&String> = v
                                .iter()
                                .filter(|(_, s)| s == "alive")
                                .map(|(m, _)| m)
                                .collect();
                            names.iter().all(|m| alive.contains(m))
                        });
                        if sees_all {
                            return Some(started.elapsed().as_secs_f64());
                        }
                        std::thread::sleep(CONVERGE_POLL);
                    }
                    None
                })
            })
            .collect();
        watchers
            .into_iter()
            .map(|w| w.join().ok().flatten())
            .collect()
    });
    if converged.iter().any(Option::is_none) {
        eprintln!("  did not converge within {timeout:?}");
        return r;
    }
    let mut times: Vec<f64> = converged.iter().flatten().copied().collect();
    r.converge_node_median_s = median(&mut times);
    r.converge_s = times.last().copied();
    eprintln!(
        "  nodes converged at (s): {}",
        times
            .iter()
            .map(|t| format!("{t:.2}"))
            .collect::<Vec<_>>()
            .join(" ")
    );

    // Idle RSS: once the joins' aftermath is over (kiln: new stripe members
    // synced) and then IDLE_SETTLE more, for both systems.
    let t = Instant::now();
    while !c.settled() && t.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(IDLE_SETTLE);
    let rss: Vec<f64> = (0..n).filter_map(|i| rss_mb(c.pid(i))).collect();
    r.rss_mean_mb = rss.iter().sum::<f64>() / rss.len().max(1) as f64;
    r.rss_max_mb = rss.iter().cloned().fold(0.0, f64::max);

    // A 1 s SIGSTOP of node 2 (index 1): who declares it dead?
    let paused = 1.min(n - 1);
    let paused_name = c.name(paused);
    let mut declared: HashSet<usize> = HashSet::new();
    signal(c.pid(paused), libc::SIGSTOP);
    let t = Instant::now();
    let mut resumed = false;
    while t.elapsed() < Duration::from_secs(6) {
        if !resumed && t.elapsed() >= Duration::from_secs(1) {
            signal(c.pid(paused), libc::SIGCONT);
            resumed = true;
        }
        for i in (0..n).filter(|i| *i != paused) {
            if let Some(v) = c.view(i) {
                if v.iter().any(|(m, s)| *m == paused_name && s == "dead") {
                    declared.insert(i);
                }
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    r.false_deaths = declared.len();
    // Let it recover before the next step.
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(30)
        && !(0..n).all(|i| {
            c.view(i)
                .is_some_and(|v| v.iter().any(|(m, s)| *m == paused_name && s == "alive"))
        })
    {
        std::thread::sleep(Duration::from_millis(100));
    }

    // kill -9 of the last node.
    let victim = n - 1;
    let victim_name = c.name(victim);
    c.kill9(victim);
    let t = Instant::now();
    let mut seen: Vec<Option<f64>> = vec![None; n - 1];
    while t.elapsed() < Duration::from_secs(60) && seen.iter().any(Option::is_none) {
        for (i, s) in seen.iter_mut().enumerate() {
            if s.is_none()
                && c.view(i)
                    .is_some_and(|v| v.iter().any(|(m, st)| *m == victim_name && st == "dead"))
            {
                *s = Some(t.elapsed().as_secs_f64());
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut times: Vec<f64> = seen.iter().flatten().copied().collect();
    r.detect_max_s = if times.len() == n - 1 {
        times.iter().cloned().reduce(f64::max)
    } else {
        None
    };
    r.detect_median_s = median(&mut times);
    r
}

fn fmt(v: Option<f64>) -> String {
    v.map(|x| format!("{x:.2}")).unwrap_or_else(|| "—".into())
}

fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}", a / b),
        _ => "—".into(),
    }
}

fn main() {
    let sizes: Vec<usize> = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "5,10,20,40".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let serf_available = Command::new("serf").arg("version").output().is_ok();
    if !serf_available {
        eprintln!("serf is not installed (apt-get install serf); measuring kiln only");
    }
    println!("| N | system | converge s (median node) | detect median s | detect max s | false deaths (1 s SIGSTOP) | idle RSS mean MB | idle RSS max MB |");
    println!("|---|---|---|---|---|---|---|---|");
    let mut rows = Vec::new();
    for &n in &sizes {
        let timeout = Duration::from_secs(120);
        let started = Instant::now();
        let mut k = KilnCluster::start(n);
        eprintln!(
            "  kiln: {n} processes started in {:.2} s",
            started.elapsed().as_secs_f64()
        );
        let kr = measure(&mut k, started, timeout);
        drop(k);
        print_row(n, "kiln", &kr);
        let sr = if serf_available {
            let started = Instant::now();
            let mut s = SerfCluster::start(n);
            eprintln!(
                "  serf: {n} processes started in {:.2} s",
                started.elapsed().as_secs_f64()
            );
            let sr = measure(&mut s, started, timeout);
            drop(s);
            print_row(n, "serf", &sr);
            Some(sr)
        } else {
            None
        };
        rows.push((n, kr, sr));
        std::thread::sleep(Duration::from_secs(1));
    }
    if serf_available {
        println!();
        println!("| N | converge kiln/serf | detect median kiln/serf | RSS kiln/serf |");
        println!("|---|---|---|---|");
        for (n, k, s) in &rows {
            let s = s.clone().unwrap_or_default();
            println!(
                "| {n} | {} | {} | {} |",
                ratio(k.converge_s, s.converge_s),
                ratio(k.detect_median_s, s.detect_median_s),
                ratio(Some(k.rss_mean_mb), Some(s.rss_mean_mb)),
            );
        }
    }
}

fn print_row(n: usize, system: &str, r: &Result) {
    println!(
        "| {n} | {system} | {} ({}) | {} | {} | {} | {:.1} | {:.1} |",
        fmt(r.converge_s),
        fmt(r.converge_node_median_s),
        fmt(r.detect_median_s),
        fmt(r.detect_max_s),
        r.false_deaths,
        r.rss_mean_mb,
        r.rss_max_mb
    );
}
