//! Key/value benchmark: kiln (1 stripe × 3 nodes, permanent persistence) against a
//! 3-member etcd cluster (Debian `etcd-server`, JSON gateway `/v3/kv/put`), same
//! machine, same run, same closed-loop load generator.
//!
//! - Throughput and p50/p99/p99.9/max latency of 1 KiB puts at 1, 16 and 64 clients (each
//!   client sends its next put when the previous one is answered; clients are
//!   spread over all nodes, which forward to the active / leader).
//! - Failover: kill -9 of the active (etcd: the leader) under 16 clients → time from
//!   the kill to the first acknowledgement of a put sent after the kill; median and
//!   max of N runs. `KILN_BENCH_FAILOVER=pause` SIGSTOPs the active (leader)
//!   for 8 s instead: the time from the pause to the first acknowledgement.
//!
//! It prints numbers and ratios; it asserts nothing. Run it with
//! `apt-get install -y etcd-server && cargo build --release --workspace --bins &&
//! target/release/bench-kv [seconds-per-point] [failover-runs]`.
//!
//! Each client count is measured `KILN_BENCH_ROUNDS` times (default 3), kiln and
//! etcd one right after the other; the ratios printed are the medians of the
//! rounds' ratios. Before the first, each system takes `KILN_BENCH_WARMUP_S`
//! seconds (default 3, 0 for none) of load at the largest client count, not
//! recorded: a process's first seconds of load (allocator, caches, connections)
//! are not what it serves at.
//!
//! For profiling: `KILN_BENCH_SYSTEMS=kiln` measures kiln alone and
//! `KILN_BENCH_CLIENTS=64,64` only at those client counts;
//! `KILN_BENCH_ENDPOINTS=leader` sends every put to the active / leader.

use std::net::Ipv4Addr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use kiln_integration::http1::Http1;
use kiln_integration::{
    clock_ticks, free_ip, machine_busy_ticks, ticks_of, wait_until, Node, NodeOpts,
};
use serde_json::{json, Value};

const VALUE_BYTES: usize = 1024;

/// One put against an endpoint; true if acknowledged.
type Putter = Arc<dyn Fn(&mut Http1, &str, &str, &[u8]) -> bool + Send + Sync>;

trait KvSystem {
    fn name(&self) -> &'static str;
    fn endpoints(&self) -> Vec<String>;
    fn putter(&self) -> Putter;
    /// Index of the node that orders writes now.
    fn leader(&self) -> Option<usize>;
    fn kill9(&mut self, i: usize);
    /// SIGSTOP (`true`) or SIGCONT (`false`) member `i`.
    fn pause(&mut self, i: usize, stop: bool);
    fn restart(&mut self, i: usize);
    /// Waits until the cluster is whole again (all members replicating).
    fn wait_whole(&self);
    /// Process ids of the running members, for their CPU time.
    fn pids(&self) -> Vec<i32>;
}

struct Kiln {
    nodes: Vec<Node>,
    ids: Vec<String>,
}

impl Kiln {
    fn start() -> Kiln {
        let opts = NodeOpts {
            secret: Some("bench-kv".into()),
            extra: vec!["--persistence".into(), "permanent".into()],
            ..Default::default()
        };
        let first = Node::start("kv1", opts.clone());
        let seed = first.seed();
        let mut nodes = vec![first];
        for i in 2..=3 {
            let mut o = opts.clone();
            o.seeds.push(seed.clone());
            nodes.push(Node::start(&format!("kv{i}"), o));
        }
        let ids = nodes.iter().map(|n| n.id()).collect();
        let k = Kiln { nodes, ids };
        k.wait_whole();
        k
    }
}

impl KvSystem for Kiln {
    fn name(&self) -> &'static str {
        "kiln"
    }
    fn endpoints(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.http()).collect()
    }
    fn putter(&self) -> Putter {
        Arc::new(|http, endpoint, key, value| {
            http.request(
                endpoint,
                "PUT",
                &format!("/v1/kv/bench/{key}"),
                "application/octet-stream",
                value,
            )
            .is_ok_and(|status| status == 200)
        })
    }
    fn leader(&self) -> Option<usize> {
        for n in &self.nodes {
            if let Some(v) = n.get("/v1/cluster/stripes") {
                if let Some(a) = v["stripes"][0]["active"].as_str() {
                    return self.ids.iter().position(|i| i == a);
                }
            }
        }
        None
    }
    fn kill9(&mut self, i: usize) {
        self.nodes[i].kill9();
    }
    fn pause(&mut self, i: usize, stop: bool) {
        self.nodes[i].signal(if stop { libc::SIGSTOP } else { libc::SIGCONT });
    }
    fn pids(&self) -> Vec<i32> {
        self.nodes.iter().map(|n| n.pid()).collect()
    }
    fn restart(&mut self, i: usize) {
        self.nodes[i].restart();
    }
    fn wait_whole(&self) {
        wait_until(
            "kiln: an active with 2 in-sync standbys",
            Duration::from_secs(120),
            || {
                self.nodes.iter().all(|n| {
                    n.get("/v1/cluster/stripes").is_some_and(|v| {
                        let m = v["stripes"][0]["members"]
                            .as_array()
                            .cloned()
                            .unwrap_or_default();
                        m.len() == 3 && m.iter().filter(|m| m["role"] == "standby").count() == 2
                    })
                })
            },
        );
    }
}

struct Etcd {
    ips: Vec<Ipv4Addr>,
    dirs: Vec<tempfile::TempDir>,
    children: Vec<Option<Child>>,
}

impl Etcd {
    fn start() -> Etcd {
        let ips: Vec<Ipv4Addr> = (0..3).map(|_| free_ip()).collect();
        let dirs = (0..3)
            .map(|_| {
                tempfile::Builder::new()
                    .prefix("etcd-bench-")
                    .tempdir()
                    .expect("temp dir")
            })
            .collect();
        let mut e = Etcd {
            ips,
            dirs,
            children: vec![None, None, None],
        };
        for i in 0..3 {
            e.spawn(i);
        }
        e.wait_whole();
        e
    }

    fn spawn(&mut self, i: usize) {
        let cluster: Vec<String> = self
            .ips
            .iter()
            .enumerate()
            .map(|(j, ip)| format!("e{j}=http://{ip}:2380"))
            .collect();
        let ip = self.ips[i];
        let child = Command::new("etcd")
            .args([
                "--name",
                &format!("e{i}"),
                "--data-dir",
                &self.dirs[i].path().join("data").display().to_string(),
                "--listen-client-urls",
                &format!("http://{ip}:2379"),
                "--advertise-client-urls",
                &format!("http://{ip}:2379"),
                "--listen-peer-urls",
                &format!("http://{ip}:2380"),
                "--initial-advertise-peer-urls",
                &format!("http://{ip}:2380"),
                "--initial-cluster",
                &cluster.join(","),
                "--initial-cluster-state",
                "new",
                "--initial-cluster-token",
                "bench",
                "--log-level",
                "error",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start etcd (apt-get install etcd-server)");
        self.children[i] = Some(child);
    }

    fn status(&self, i: usize) -> Option<Value> {
        ureq::post(&format!(
            "http://{}:2379/v3/maintenance/status",
            self.ips[i]
        ))
        .timeout(Duration::from_secs(2))
        .send_json(json!({}))
        .ok()?
        .into_json()
        .ok()
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        for c in self.children.iter_mut().flatten() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl KvSystem for Etcd {
    fn name(&self) -> &'static str {
        "etcd"
    }
    fn endpoints(&self) -> Vec<String> {
        self.ips.iter().map(|ip| format!("{ip}:2379")).collect()
    }
    fn putter(&self) -> Putter {
        Arc::new(|http, endpoint, key, value| {
            let b64 = base64::engine::general_purpose::STANDARD;
            let body = json!({ "key": b64.encode(key), "value": b64.encode(value) }).to_string();
            http.request(
                endpoint,
                "POST",
                "/v3/kv/put",
                "application/json",
                body.as_bytes(),
            )
            .is_ok_and(|status| status == 200)
        })
    }
    fn leader(&self) -> Option<usize> {
        for i in 0..3 {
            if let Some(s) = self.status(i) {
                let leader = s["leader"].as_str()?.to_string();
                for j in 0..3 {
                    if self
                        .status(j)
                        .is_some_and(|t| t["header"]["member_id"] == leader.as_str())
                    {
                        return Some(j);
                    }
                }
            }
        }
        None
    }
    fn pids(&self) -> Vec<i32> {
        self.children
            .iter()
            .flatten()
            .map(|c| c.id() as i32)
            .collect()
    }
    fn kill9(&mut self, i: usize) {
        if let Some(mut c) = self.children[i].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
    fn restart(&mut self, i: usize) {
        self.kill9(i);
        self.spawn(i);
    }
    fn pause(&mut self, i: usize, stop: bool) {
        if let Some(c) = &self.children[i] {
            let sig = if stop { libc::SIGSTOP } else { libc::SIGCONT };
            // SAFETY: a signal to a child process this benchmark started.
            unsafe {
                libc::kill(c.id() as i32, sig);
            }
        }
    }
    fn wait_whole(&self) {
        wait_until(
            "etcd: 3 members with a leader",
            Duration::from_secs(120),
            || (0..3).all(|i| self.status(i).is_some_and(|s| s["leader"].is_string())),
        );
    }
}

/// One load run: which system, at how many clients, in which round.
struct Measured {
    system: &'static str,
    clients: usize,
    round: usize,
    result: LoadResult,
}

struct LoadResult {
    puts_per_s: f64,
    p50_ms: f64,
    p99_ms: f64,
    /// The tail: stalls of the whole system (an fsync every member's writes
    /// wait behind) show here first.
    p999_ms: f64,
    max_ms: f64,
    errors: usize,
    /// Cores the system's processes used, all of them together.
    server_cores: f64,
    /// Their CPU time per acknowledged put: on a machine whose cores the
    /// system and the load share, what bounds its throughput.
    cpu_us_per_put: f64,
    /// Cores the load generator used.
    load_cores: f64,
    /// Cores the whole machine used (the other system idling included).
    machine_cores: f64,
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// Closed-loop load: `clients` threads, each putting 1 KiB values back to back.
fn load(sys: &dyn KvSystem, clients: usize, secs: f64, tag: &str) -> LoadResult {
    let mut endpoints = sys.endpoints();
    if std::env::var("KILN_BENCH_ENDPOINTS").is_ok_and(|e| e == "leader") {
        if let Some(l) = sys.leader() {
            endpoints = vec![endpoints[l].clone()];
        }
    }
    let put = sys.putter();
    let value = vec![b'x'; VALUE_BYTES];
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let lat: Mutex<Vec<f64>> = Mutex::default();
    let errors = Mutex::new(0usize);
    let (pids, me) = (sys.pids(), [std::process::id() as i32]);
    let (cpu0, me0, all0) = (ticks_of(&pids), ticks_of(&me), machine_busy_ticks());
    let started = Instant::now();
    std::thread::scope(|s| {
        for c in 0..clients {
            let (endpoints, value, lat, errors, put) = (&endpoints, &value, &lat, &errors, &put);
            s.spawn(move || {
                let mut http = Http1::new();
                let endpoint = &endpoints[c % endpoints.len()];
                let mut mine = Vec::new();
                let mut i = 0u64;
                while Instant::now() < deadline {
                    let t = Instant::now();
                    if put(&mut http, endpoint, &format!("{tag}-{c}-{i}"), value) {
                        mine.push(t.elapsed().as_secs_f64() * 1000.0);
                    } else {
                        *errors.lock().unwrap() += 1;
                    }
                    i += 1;
                }
                lat.lock().unwrap().extend(mine);
            });
        }
    });
    let elapsed = started.elapsed().as_secs_f64();
    let (cpu1, me1, all1) = (ticks_of(&pids), ticks_of(&me), machine_busy_ticks());
    let server_s = cpu1.saturating_sub(cpu0) as f64 / clock_ticks();
    let mut lat = lat.into_inner().unwrap();
    lat.sort_by(|a, b| a.total_cmp(b));
    LoadResult {
        puts_per_s: lat.len() as f64 / elapsed,
        p50_ms: percentile(&lat, 0.5),
        p99_ms: percentile(&lat, 0.99),
        p999_ms: percentile(&lat, 0.999),
        max_ms: lat.last().copied().unwrap_or(f64::NAN),
        errors: errors.into_inner().unwrap(),
        server_cores: server_s / elapsed,
        cpu_us_per_put: if lat.is_empty() {
            f64::NAN
        } else {
            server_s * 1e6 / lat.len() as f64
        },
        load_cores: me1.saturating_sub(me0) as f64 / clock_ticks() / elapsed,
        machine_cores: all1.saturating_sub(all0) as f64 / clock_ticks() / elapsed,
    }
}

/// Kills the leader under 16 clients (on the other nodes); seconds from the kill to
/// the first put acknowledged after it.
fn failover(sys: &mut dyn KvSystem, run: usize) -> Option<f64> {
    let victim = sys.leader()?;
    let endpoints: Arc<Vec<String>> = Arc::new(
        sys.endpoints()
            .into_iter()
            .enumerate()
            .filter(|(i, _)| *i != victim)
            .map(|(_, e)| e)
            .collect(),
    );
    let stop = Arc::new(AtomicBool::new(false));
    // (sent, acknowledged) of every acknowledged put.
    let acks: Arc<Mutex<Vec<(Instant, Instant)>>> = Arc::default();
    let clients: Vec<_> = (0..16)
        .map(|c| {
            let (endpoints, stop, acks, put) =
                (endpoints.clone(), stop.clone(), acks.clone(), sys.putter());
            std::thread::spawn(move || {
                let mut http = Http1::new();
                let value = vec![b'y'; VALUE_BYTES];
                let mut i = 0;
                while !stop.load(Ordering::SeqCst) {
                    let endpoint = &endpoints[c % endpoints.len()];
                    let sent = Instant::now();
                    if put(&mut http, endpoint, &format!("f{run}-{c}-{i}"), &value) {
                        acks.lock().unwrap().push((sent, Instant::now()));
                    }
                    i += 1;
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(2));
    let pause = failover_by_pause();
    let kill_at = Instant::now();
    if pause {
        sys.pause(victim, true);
    } else {
        sys.kill9(victim);
    }
    std::thread::sleep(Duration::from_secs(8));
    stop.store(true, Ordering::SeqCst);
    if pause {
        sys.pause(victim, false);
    }
    for c in clients {
        let _ = c.join();
    }
    let first = acks
        .lock()
        .unwrap()
        .iter()
        .filter(|(sent, _)| *sent > kill_at)
        .map(|(_, acked)| *acked)
        .min();
    if !pause {
        sys.restart(victim);
    }
    sys.wait_whole();
    first.map(|f| (f - kill_at).as_secs_f64())
}

/// `KILN_BENCH_FAILOVER=pause`: the failover runs SIGSTOP the active (leader)
/// for 8 s instead of killing it; a paused process holds its connections open,
/// so requests to it hang instead of failing.
fn failover_by_pause() -> bool {
    std::env::var("KILN_BENCH_FAILOVER").is_ok_and(|v| v == "pause")
}

fn main() {
    let secs: f64 = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(10.0);
    let runs: usize = std::env::args()
        .nth(2)
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    let rounds: usize = std::env::var("KILN_BENCH_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .filter(|r| *r > 0)
        .unwrap_or(3);
    let kiln_only = std::env::var("KILN_BENCH_SYSTEMS").is_ok_and(|s| s == "kiln");
    let client_counts: Vec<usize> = std::env::var("KILN_BENCH_CLIENTS")
        .ok()
        .map(|v| v.split(',').filter_map(|c| c.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![1, 16, 64]);
    let etcd_available = !kiln_only && Command::new("etcd").arg("--version").output().is_ok();
    if !etcd_available && !kiln_only {
        eprintln!("etcd is not installed (apt-get install etcd-server); measuring kiln only");
    }
    let mut systems: Vec<Box<dyn KvSystem>> = vec![Box::new(Kiln::start())];
    if etcd_available {
        systems.push(Box::new(Etcd::start()));
    }
    println!(
        "| system | clients | puts/s | p50 ms | p99 ms | p99.9 ms | max ms | errors | server CPU (cores) | µs CPU per put | load CPU (cores) | machine CPU (cores) |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    // Each round measures every system once at each client count, one right
    // after the other: a ratio is taken between neighbours, so the machine's
    // drift (etcd's own figure moved by 28 % between runs minutes apart) does
    // not fall between the two systems.
    let warmup_s: f64 = std::env::var("KILN_BENCH_WARMUP_S")
        .ok()
        .and_then(|w| w.parse().ok())
        .unwrap_or(3.0);
    if warmup_s > 0.0 {
        let clients = client_counts.iter().copied().max().unwrap_or(16);
        for sys in &systems {
            let r = load(
                sys.as_ref(),
                clients,
                warmup_s,
                &format!("warm{}", sys.name()),
            );
            eprintln!(
                "warm-up: {} at {clients} clients for {warmup_s} s, {:.0} puts/s (not recorded)",
                sys.name(),
                r.puts_per_s
            );
        }
    }
    let mut table: Vec<Measured> = Vec::new();
    for &clients in &client_counts {
        for round in 0..rounds {
            for sys in &systems {
                let r = load(
                    sys.as_ref(),
                    clients,
                    secs,
                    &format!("{}{clients}r{round}", sys.name()),
                );
                println!(
                    "| {} | {clients} | {:.0} | {:.2} | {:.2} | {:.1} | {:.1} | {} | {:.2} | {:.0} | {:.2} | {:.2} |",
                    sys.name(),
                    r.puts_per_s,
                    r.p50_ms,
                    r.p99_ms,
                    r.p999_ms,
                    r.max_ms,
                    r.errors,
                    r.server_cores,
                    r.cpu_us_per_put,
                    r.load_cores,
                    r.machine_cores
                );
                table.push(Measured {
                    system: sys.name(),
                    clients,
                    round,
                    result: r,
                });
            }
        }
    }
    if etcd_available {
        println!();
        for &clients in &client_counts {
            let of = |name: &str, round: usize| {
                table
                    .iter()
                    .find(|m| m.system == name && m.clients == clients && m.round == round)
                    .map(|m| &m.result)
            };
            let pairs: Vec<(&LoadResult, &LoadResult)> = (0..rounds)
                .filter_map(|round| Some((of("kiln", round)?, of("etcd", round)?)))
                .collect();
            let ratios = |f: fn(&LoadResult) -> f64| -> (f64, String) {
                let mut each: Vec<f64> = pairs.iter().map(|(k, e)| f(k) / f(e)).collect();
                let listed = each
                    .iter()
                    .map(|r| format!("{r:.2}"))
                    .collect::<Vec<_>>()
                    .join(", ");
                each.sort_by(|a, b| a.total_cmp(b));
                (percentile(&each, 0.5), listed)
            };
            let (throughput, each) = ratios(|r| r.puts_per_s);
            let (p99, _) = ratios(|r| r.p99_ms);
            let (cpu, _) = ratios(|r| r.cpu_us_per_put);
            println!(
                "ratio kiln/etcd at {clients} clients (median of {} rounds): throughput {throughput:.2} ({each}), p99 {p99:.2}, CPU per put {cpu:.2}",
                pairs.len()
            );
        }
    }
    let how = if failover_by_pause() {
        "SIGSTOP"
    } else {
        "kill -9"
    };
    println!("\nfailover by {how} of the active (leader):\n");
    println!("| system | failover runs | median s | max s |");
    println!("|---|---|---|---|");
    for sys in systems.iter_mut() {
        let mut times = Vec::new();
        for run in 0..runs {
            match failover(sys.as_mut(), run) {
                Some(t) => {
                    eprintln!("{} failover run {run}: {t:.3} s", sys.name());
                    times.push(t)
                }
                None => eprintln!(
                    "{} failover run {run}: no acknowledged write after the kill",
                    sys.name()
                ),
            }
        }
        times.sort_by(|a, b| a.total_cmp(b));
        println!(
            "| {} | {} | {:.3} | {:.3} |",
            sys.name(),
            times.len(),
            percentile(&times, 0.5),
            times.last().copied().unwrap_or(f64::NAN)
        );
    }
}
