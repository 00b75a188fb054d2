//! Databroadcast fan-out benchmark: kiln (N real `kiln run` processes, one Server-Sent
//! Events subscriber per node) against RabbitMQ (Debian `rabbitmq-server`, a fanout
//! exchange with one non-durable auto-delete queue per subscriber, as Servoy uses it)
//! and NATS (Debian `nats-server`, one core NATS subject), with N subscribers and N
//! publishing connections each, same machine, same run, same load generator.
//!
//! - **Latency**: from just before the publish call to reception by each subscriber,
//!   on this process's monotonic clock (the publisher puts nanoseconds since a shared
//!   start `Instant` in the payload, with the event's due time); p50/p99/max over all
//!   (event, subscriber) pairs at offered rates of 1 000 and 10 000 events/s.
//! - **Load**: open loop. N publisher lanes (kiln: lane k posts to node k; brokers:
//!   lane k has its own connection), the events' due times interleaved over the lanes
//!   at the offered rate. A lane sends whatever is due in one call at most every 1 ms:
//!   kiln one `POST /v1/broadcast` with a JSON array (answered `202` once fsynced),
//!   RabbitMQ one `basic.publish` per event (no confirms, as Servoy), NATS one
//!   `PUB` per event then a flush. A lane whose call takes longer sends a bigger
//!   batch next time (it never waits for the schedule to be met).
//! - **Highest sustained rate**: the offered rate steps up until a step fails; a step
//!   passes when every subscriber received every acknowledged event exactly once and
//!   was never cut off (`lagged`), the publishers kept at least 95 % of the offered
//!   rate, the p99 latency counted from the events' *due* times (so including any
//!   backlog in the publishers) is at most 1 s, and the last event arrived at most
//!   0.5 s after publishing ended (no growing backlog). One step between the last
//!   pass and the first failure refines the figure.
//! - **Restart**: at 1 000 events/s for 10 s, 3 s in, subscriber 2's node is killed
//!   with kill -9 and started again at once (its subscriber reconnects with
//!   `Last-Event-ID` as the harness `Subscriber` does); for the brokers, subscriber
//!   2's connection is closed and reopened after as long as kiln's subscriber was
//!   away. Counted: events acknowledged to a publisher that a subscriber never received.
//!
//! It prints numbers and ratios; it asserts nothing. Run it with
//! `apt-get install -y rabbitmq-server nats-server &&
//! cargo build --release --workspace --bins &&
//! cargo build --release -p kiln-integration --features bench-brokers --bins &&
//! target/release/bench-broadcast [Ns] [seconds-per-step] [systems]`
//! (defaults `3,5,10`, `5`, `kiln,rabbitmq,nats`).
//!
//! For profiling: `KILN_BENCH_RATES=5000,20000` measures only at those offered
//! rates (no ladder, no restart run); `KILN_BENCH_DUMP=/tmp/lat` writes every
//! reception (`subscriber event-id latency-ns`) to `/tmp/lat.<step>.<rate>`.

use std::borrow::Cow;
use std::collections::HashMap;
use std::io::BufRead;
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use futures::StreamExt;
use kiln_integration::http1::Http1;
use kiln_integration::{
    clock_ticks, start_cluster, ticks_of, wait_converged, wait_until, Node, NodeOpts,
};
use serde::Deserialize;
use serde_json::Value;

/// Minimum time between two publish calls of one lane.
const MIN_GAP: Duration = Duration::from_millis(1);
/// Most events in one publish call (kiln accepts 10 000 per POST).
const MAX_BATCH: u64 = 10_000;
/// How late the last event of a step may arrive and the step still count as kept up.
const KEPT_UP_DRAIN_S: f64 = 0.5;
/// p99 of the latency from an event's due time (publisher backlog included) that a
/// step may have and still count as kept up.
const KEPT_UP_P99_DUE_MS: f64 = 1000.0;
/// Rates tried after 1 000 and 10 000 events/s, in order, while steps pass.
const LADDER: &[f64] = &[
    2_000.0, 5_000.0, 20_000.0, 30_000.0, 50_000.0, 75_000.0, 100_000.0, 150_000.0, 200_000.0,
    300_000.0, 500_000.0,
];
const EXCHANGE: &str = "bench-broadcast";
const SUBJECT: &str = "bench";
/// The subscriber (0-based) whose node or connection the restart run restarts.
const RESTARTED: usize = 1;

static T0: OnceLock<Instant> = OnceLock::new();

/// Nanoseconds since the benchmark's start, on the monotonic clock.
fn now_ns() -> u64 {
    T0.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

/// `t`: ns just before the publish call; `d`: ns when the event was due (open-loop
/// schedule); `i`: event id; `p`: phase.
fn payload_json(t: u64, e: &Ev, phase: u32) -> String {
    format!(r#"{{"t":{t},"d":{},"i":{},"p":{phase}}}"#, e.due, e.id)
}

#[derive(Deserialize)]
struct Payload {
    t: u64,
    d: u64,
    i: u64,
    p: u32,
}

/// An event to publish: id and due time (ns since the benchmark's start).
#[derive(Clone, Copy)]
struct Ev {
    id: u64,
    due: u64,
}

/// A reception: event id, latency from the publish call and from the due time, ns.
type Rec = (u64, i64, i64);

// ---------------------------------------------------------------------------------
// What subscribers record.

/// Events of the current phase: (event id, latency in ns).
struct PhaseBuf {
    phase: u32,
    recs: Vec<Rec>,
}

/// One subscriber's record, shared between its reader and the phase runner.
struct Sink {
    buf: Mutex<PhaseBuf>,
    /// Connections made (1 + reconnects).
    connections: AtomicU32,
    /// Messages of no current phase (late arrivals, warm-up).
    stale: AtomicU64,
    /// Messages that did not parse.
    bad: AtomicU64,
    /// kiln: `lagged` messages (the node cut the stream off).
    lagged: AtomicU32,
    /// kiln: `resync` messages.
    resyncs: AtomicU32,
    /// kiln: events whose (origin, seq) was at or below the last one seen of that origin.
    seq_dups: AtomicU64,
    /// kiln: seqs skipped within an origin.
    seq_gaps: AtomicU64,
}

impl Sink {
    fn new() -> Arc<Sink> {
        Arc::new(Sink {
            buf: Mutex::new(PhaseBuf {
                phase: u32::MAX,
                recs: Vec::new(),
            }),
            connections: AtomicU32::new(0),
            stale: AtomicU64::new(0),
            bad: AtomicU64::new(0),
            lagged: AtomicU32::new(0),
            resyncs: AtomicU32::new(0),
            seq_dups: AtomicU64::new(0),
            seq_gaps: AtomicU64::new(0),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, PhaseBuf> {
        self.buf.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn record(&self, p: &Payload, at: u64) {
        let mut b = self.lock();
        if b.phase == p.p {
            b.recs
                .push((p.i, at as i64 - p.t as i64, at as i64 - p.d as i64));
        } else {
            drop(b);
            self.stale.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// A broker message: the payload JSON alone.
    fn message(&self, bytes: &[u8], at: u64) {
        match serde_json::from_slice::<Payload>(bytes) {
            Ok(p) => self.record(&p, at),
            Err(_) => {
                self.bad.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    fn begin(&self, phase: u32) {
        let mut b = self.lock();
        b.phase = phase;
        b.recs.clear();
    }

    /// Acknowledged ids (sorted) not recorded in this phase.
    fn missing(&self, acked: &[u64]) -> u64 {
        let mut ids: Vec<u64> = self.lock().recs.iter().map(|r| r.0).collect();
        ids.sort_unstable();
        ids.dedup();
        missing_from(acked, &ids)
    }

    fn count(&self) -> usize {
        self.lock().recs.len()
    }

    fn finish(&self) -> Vec<Rec> {
        let mut b = self.lock();
        b.phase = u32::MAX;
        std::mem::take(&mut b.recs)
    }
}

/// How many of `want` are not in `have` (both sorted, `have` without duplicates).
fn missing_from(want: &[u64], have: &[u64]) -> u64 {
    let mut missing = 0;
    let mut j = 0;
    for a in want {
        while j < have.len() && have[j] < *a {
            j += 1;
        }
        if j >= have.len() || have[j] != *a {
            missing += 1;
        }
    }
    missing
}

// ---------------------------------------------------------------------------------
// Systems.

/// Publishes one batch: (timestamp put in every payload, event ids, phase). Ok(true):
/// accepted only after an attempt that failed (kiln: the lane's node died during the
/// request; it may have stored the batch too, so it can arrive twice).
type Publisher = Box<dyn FnMut(u64, &[Ev], u32) -> Result<bool, String> + Send>;

trait System {
    fn name(&self) -> &'static str;
    fn sinks(&self) -> Vec<Arc<Sink>>;
    /// One publisher per lane, fresh for each phase.
    fn publishers(&mut self) -> Vec<Publisher>;
    /// Processes of the system under test, for CPU accounting.
    fn server_pids(&self) -> Vec<i32>;
    /// kiln: gap repairs (fetches of missed events) summed over nodes.
    fn repairs(&self) -> Option<u64> {
        None
    }
    /// kiln: the nodes' `kiln_broadcast_delivery_latency_seconds` histogram (from an
    /// event's time at its origin to its append to a node's log), summed over nodes:
    /// (upper bound s, cumulative count).
    fn append_histogram(&self) -> Option<Vec<(f64, u64)>> {
        None
    }
    /// Takes subscriber `v` away and back: kiln restarts its node (kill -9), the
    /// brokers close its connection, wait `outage` and reconnect. Returns how long
    /// the subscriber was away.
    fn restart_subscriber(&mut self, v: usize, outage: Duration) -> Duration;
    /// Copies logs somewhere lasting after an anomaly; returns what was saved.
    fn save_logs(&self, _tag: &str) -> Vec<PathBuf> {
        Vec::new()
    }
}

// --- kiln ---

struct Kiln {
    nodes: Vec<Node>,
    sinks: Vec<Arc<Sink>>,
    stop: Arc<AtomicBool>,
    readers: Vec<std::thread::JoinHandle<()>>,
}

#[derive(Deserialize)]
struct SseEvent<'a> {
    #[serde(borrow)]
    kind: Cow<'a, str>,
    #[serde(borrow, default)]
    origin: Option<Cow<'a, str>>,
    #[serde(default)]
    seq: Option<u64>,
    #[serde(default)]
    payload: Option<Payload>,
}

/// Follows a node's event stream like the harness `Subscriber` (reconnecting with the
/// last id as `Last-Event-ID`), but records only what the benchmark needs, so that it
/// keeps up with hundreds of thousands of events per second.
fn kiln_reader(http: String, sink: Arc<Sink>, stop: Arc<AtomicBool>) {
    let agent = ureq::AgentBuilder::new()
        .timeout_connect(Duration::from_secs(3))
        .timeout_read(Duration::from_secs(20))
        .build();
    let mut last_id: Option<String> = None;
    let mut id_buf = String::new();
    let mut last_seq: HashMap<String, u64> = HashMap::new();
    let mut line = String::new();
    while !stop.load(Ordering::SeqCst) {
        let mut req = agent.get(&format!("http://{http}/v1/broadcast/stream?topic=bench"));
        if let Some(id) = &last_id {
            req = req.set("Last-Event-ID", id);
        }
        let Ok(resp) = req.call() else {
            std::thread::sleep(Duration::from_millis(200));
            continue;
        };
        sink.connections.fetch_add(1, Ordering::SeqCst);
        let mut reader = std::io::BufReader::with_capacity(1 << 16, resp.into_reader());
        let mut have_id = false;
        loop {
            line.clear();
            match reader.read_line(&mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
            if stop.load(Ordering::Relaxed) {
                return;
            }
            let l = line.trim_end_matches(['\r', '\n']);
            if let Some(v) = l.strip_prefix("id: ") {
                id_buf.clear();
                id_buf.push_str(v);
                have_id = true;
            } else if let Some(v) = l.strip_prefix("data: ") {
                let at = now_ns();
                // kiln sends an event's id before its data: the event is ours now.
                if have_id {
                    let id = last_id.get_or_insert_with(String::new);
                    std::mem::swap(id, &mut id_buf);
                    have_id = false;
                }
                let Ok(ev) = serde_json::from_str::<SseEvent>(v) else {
                    sink.bad.fetch_add(1, Ordering::Relaxed);
                    continue;
                };
                match ev.kind.as_ref() {
                    "lagged" => {
                        sink.lagged.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    "resync" => {
                        sink.resyncs.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    _ => {}
                }
                if let (Some(origin), Some(seq)) = (ev.origin.as_deref(), ev.seq) {
                    match last_seq.get_mut(origin) {
                        Some(prev) if seq <= *prev => {
                            sink.seq_dups.fetch_add(1, Ordering::Relaxed);
                        }
                        Some(prev) => {
                            if seq > *prev + 1 {
                                sink.seq_gaps.fetch_add(seq - *prev - 1, Ordering::Relaxed);
                            }
                            *prev = seq;
                        }
                        None => {
                            last_seq.insert(origin.to_string(), seq);
                        }
                    }
                }
                match &ev.payload {
                    Some(p) => sink.record(p, at),
                    None => {
                        sink.bad.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

impl Kiln {
    fn start(n: usize) -> Kiln {
        let opts = NodeOpts {
            secret: Some("bench-broadcast".into()),
            ..Default::default()
        };
        let nodes = start_cluster(&format!("bb{n}-"), n, opts);
        wait_converged(&nodes, Duration::from_secs(120));
        for node in &nodes {
            wait_until(
                &format!("{} serves /v1/broadcast/origins", node.name),
                Duration::from_secs(60),
                || node.get("/v1/broadcast/origins").is_some(),
            );
        }
        let stop = Arc::new(AtomicBool::new(false));
        let sinks: Vec<Arc<Sink>> = (0..n).map(|_| Sink::new()).collect();
        let readers = nodes
            .iter()
            .zip(&sinks)
            .map(|(node, sink)| {
                let (http, sink, stop) = (node.http(), sink.clone(), stop.clone());
                std::thread::spawn(move || kiln_reader(http, sink, stop))
            })
            .collect();
        wait_until(
            "every kiln subscriber connected",
            Duration::from_secs(30),
            || {
                sinks
                    .iter()
                    .all(|s| s.connections.load(Ordering::SeqCst) > 0)
            },
        );
        Kiln {
            nodes,
            sinks,
            stop,
            readers,
        }
    }
}

impl Drop for Kiln {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for n in &mut self.nodes {
            n.kill9();
        }
        // With their nodes gone the readers' streams end at once.
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
    }
}

/// Sum of the values of a Prometheus counter (all label sets) in `text`.
fn metric_sum(text: &str, name: &str) -> u64 {
    text.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|r| r.starts_with(' ') || r.starts_with('{'))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

impl Kiln {
    fn metrics(&self, n: &Node) -> Option<String> {
        ureq::get(&format!("http://{}/metrics", n.http()))
            .timeout(Duration::from_secs(5))
            .call()
            .ok()?
            .into_string()
            .ok()
    }
}

impl System for Kiln {
    fn name(&self) -> &'static str {
        "kiln"
    }

    fn sinks(&self) -> Vec<Arc<Sink>> {
        self.sinks.clone()
    }

    fn publishers(&mut self) -> Vec<Publisher> {
        let endpoints: Vec<String> = self.nodes.iter().map(|n| n.http()).collect();
        (0..endpoints.len())
            .map(|home| {
                let endpoints = endpoints.clone();
                let mut http = Http1::new();
                let mut body = String::new();
                Box::new(move |t: u64, ids: &[Ev], phase: u32| {
                    body.clear();
                    body.push('[');
                    for (j, i) in ids.iter().enumerate() {
                        if j > 0 {
                            body.push(',');
                        }
                        body.push_str(r#"{"kind":"message","topic":"bench","payload":"#);
                        body.push_str(&payload_json(t, i, phase));
                        body.push('}');
                    }
                    body.push(']');
                    // The lane's own node first; while it is down, the next ones.
                    let mut last_err = String::new();
                    for k in 0..endpoints.len() {
                        let ep = &endpoints[(home + k) % endpoints.len()];
                        match http.request(
                            ep,
                            "POST",
                            "/v1/broadcast",
                            "application/json",
                            body.as_bytes(),
                        ) {
                            Ok(202) => {
                                let v: Value = serde_json::from_slice(http.body())
                                    .map_err(|e| format!("202 body from {ep}: {e}"))?;
                                let seqs = v["seqs"].as_array().map(|s| s.len()).unwrap_or(0);
                                if seqs != ids.len() {
                                    return Err(format!(
                                        "{ep} answered {} seqs for {} events: {v}",
                                        seqs,
                                        ids.len()
                                    ));
                                }
                                return Ok(k > 0);
                            }
                            Ok(status) => {
                                last_err = format!(
                                    "POST to {ep}: {status} {}",
                                    String::from_utf8_lossy(http.body())
                                )
                            }
                            Err(e) => last_err = format!("POST to {ep}: {e}"),
                        }
                    }
                    Err(last_err)
                }) as Publisher
            })
            .collect()
    }

    fn server_pids(&self) -> Vec<i32> {
        self.nodes.iter().map(|n| n.pid()).collect()
    }

    fn repairs(&self) -> Option<u64> {
        let mut sum = 0;
        for n in &self.nodes {
            sum += metric_sum(&self.metrics(n)?, "kiln_broadcast_gap_repairs_total");
        }
        Some(sum)
    }

    fn append_histogram(&self) -> Option<Vec<(f64, u64)>> {
        let mut sum: Vec<(f64, u64)> = Vec::new();
        for n in &self.nodes {
            let text = self.metrics(n)?;
            for l in text.lines() {
                let Some(rest) =
                    l.strip_prefix("kiln_broadcast_delivery_latency_seconds_bucket{le=\"")
                else {
                    continue;
                };
                let Some((le, count)) = rest.split_once("\"} ") else {
                    continue;
                };
                let le = if le == "+Inf" {
                    f64::INFINITY
                } else {
                    le.parse().unwrap_or(f64::NAN)
                };
                let count: u64 = count.trim().parse().unwrap_or(0);
                match sum.iter_mut().find(|(b, _)| *b == le) {
                    Some(b) => b.1 += count,
                    None => sum.push((le, count)),
                }
            }
        }
        sum.sort_by(|a, b| a.0.total_cmp(&b.0));
        Some(sum)
    }

    fn restart_subscriber(&mut self, v: usize, _outage: Duration) -> Duration {
        let before = self.sinks[v].connections.load(Ordering::SeqCst);
        let t = Instant::now();
        self.nodes[v].restart();
        while self.sinks[v].connections.load(Ordering::SeqCst) == before {
            if t.elapsed() > Duration::from_secs(60) {
                panic!(
                    "kiln: the subscriber of {} did not reconnect within 60 s of its restart",
                    self.nodes[v].name
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        t.elapsed()
    }

    fn save_logs(&self, tag: &str) -> Vec<PathBuf> {
        let dir = std::env::temp_dir().join("bench-broadcast-logs");
        let _ = std::fs::create_dir_all(&dir);
        self.nodes
            .iter()
            .filter_map(|n| {
                let to = dir.join(format!("{tag}-{}.log", n.name));
                std::fs::copy(n.dir.join("kiln.log"), &to).ok()?;
                Some(to)
            })
            .collect()
    }
}

// --- brokers: servers ---

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port on 127.0.0.1")
}

fn wait_port(port: u16, what: &str, timeout: Duration) {
    wait_until(what, timeout, || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
}

/// A `rabbitmq-server` of our own: its own node name, ports, epmd, data and logs in
/// a temporary directory; stopped (and its epmd with it) on drop.
struct RabbitServer {
    dir: tempfile::TempDir,
    child: Option<Child>,
    port: u16,
    epmd_port: u16,
}

const RABBITMQ_SERVER: &str = "/usr/lib/rabbitmq/bin/rabbitmq-server";

impl RabbitServer {
    fn start() -> RabbitServer {
        let dir = tempfile::Builder::new()
            .prefix("rabbitmq-bench-")
            .tempdir()
            .expect("temp dir");
        let (port, dist_port, epmd_port) = (free_port(), free_port(), free_port());
        let p = dir.path();
        std::fs::write(p.join("enabled_plugins"), "[].\n").expect("write enabled_plugins");
        let log = std::fs::File::create(p.join("server.out")).expect("rabbitmq log file");
        let child = Command::new(RABBITMQ_SERVER)
            .current_dir(p)
            // The Erlang cookie goes to $HOME: keep it in the temp dir.
            .env("HOME", p)
            .env("RABBITMQ_MNESIA_BASE", p.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", p.join("log"))
            .env(
                "RABBITMQ_NODENAME",
                format!("bench{}@localhost", std::process::id()),
            )
            .env("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1")
            .env("RABBITMQ_NODE_PORT", port.to_string())
            .env("RABBITMQ_DIST_PORT", dist_port.to_string())
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", p.join("enabled_plugins"))
            .env("RABBITMQ_CONFIG_FILE", p.join("rabbitmq"))
            .env("RABBITMQ_PID_FILE", p.join("rabbitmq.pid"))
            .env("ERL_EPMD_PORT", epmd_port.to_string())
            .env("ERL_EPMD_ADDRESS", "127.0.0.1")
            .env(
                "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS",
                "-kernel inet_dist_use_interface {127,0,0,1}",
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log file"))
            .stderr(log)
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start {RABBITMQ_SERVER} (apt-get install -y rabbitmq-server): {e}")
            });
        let s = RabbitServer {
            dir,
            child: Some(child),
            port,
            epmd_port,
        };
        wait_port(port, "rabbitmq-server listens", Duration::from_secs(90));
        s
    }

    fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    fn beam_pid(&self) -> Option<i32> {
        std::fs::read_to_string(self.dir.path().join("rabbitmq.pid"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }
}

impl Drop for RabbitServer {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let pgid = c.id() as i32;
            unsafe {
                libc::kill(-pgid, libc::SIGTERM);
            }
            let deadline = Instant::now() + Duration::from_secs(30);
            while !matches!(c.try_wait(), Ok(Some(_))) {
                if Instant::now() > deadline {
                    unsafe {
                        libc::kill(-pgid, libc::SIGKILL);
                    }
                    let _ = c.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        // Our own epmd (own port): stop it too.
        let _ = Command::new("epmd")
            .args(["-port", &self.epmd_port.to_string(), "-kill"])
            .env("ERL_EPMD_PORT", self.epmd_port.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

struct NatsServer {
    _dir: tempfile::TempDir,
    child: Option<Child>,
    port: u16,
}

impl NatsServer {
    fn start() -> NatsServer {
        let dir = tempfile::Builder::new()
            .prefix("nats-bench-")
            .tempdir()
            .expect("temp dir");
        let port = free_port();
        let log = std::fs::File::create(dir.path().join("server.out")).expect("nats log file");
        let child = Command::new("nats-server")
            .args(["-a", "127.0.0.1", "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log file"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start nats-server (apt-get install -y nats-server): {e}")
            });
        let s = NatsServer {
            _dir: dir,
            child: Some(child),
            port,
        };
        wait_port(port, "nats-server listens", Duration::from_secs(30));
        s
    }

    fn addr(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    fn pid(&self) -> i32 {
        self.child.as_ref().map(|c| c.id() as i32).unwrap_or(0)
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            unsafe {
                libc::kill(c.id() as i32, libc::SIGTERM);
            }
            let deadline = Instant::now() + Duration::from_secs(10);
            while !matches!(c.try_wait(), Ok(Some(_))) {
                if Instant::now() > deadline {
                    let _ = c.kill();
                    let _ = c.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

// --- RabbitMQ ---

struct Rabbit {
    rt: tokio::runtime::Handle,
    url: String,
    beam: Option<i32>,
    /// One publishing connection per lane (a Servoy server's).
    pub_conns: Vec<(lapin::Connection, lapin::Channel)>,
    sinks: Vec<Arc<Sink>>,
    subs: Vec<Option<(lapin::Connection, tokio::task::JoinHandle<()>)>>,
}

async fn rabbit_subscribe(
    url: &str,
    sink: Arc<Sink>,
) -> Result<(lapin::Connection, tokio::task::JoinHandle<()>), String> {
    use lapin::options::{BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions};
    use lapin::types::FieldTable;
    let conn = lapin::Connection::connect(url, lapin::ConnectionProperties::default())
        .await
        .map_err(|e| format!("connect to RabbitMQ at {url}: {e}"))?;
    let ch = conn
        .create_channel()
        .await
        .map_err(|e| format!("RabbitMQ channel: {e}"))?;
    // Servoy: a server-named, non-durable, auto-delete queue bound to the fanout exchange.
    let q = ch
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                auto_delete: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(|e| format!("RabbitMQ queue.declare: {e}"))?;
    ch.queue_bind(
        q.name().clone(),
        EXCHANGE.into(),
        "".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .map_err(|e| format!("RabbitMQ queue.bind: {e}"))?;
    let mut consumer = ch
        .basic_consume(
            q.name().clone(),
            "".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(|e| format!("RabbitMQ basic.consume: {e}"))?;
    sink.connections.fetch_add(1, Ordering::SeqCst);
    let task = tokio::spawn(async move {
        let _ch = ch;
        while let Some(d) = consumer.next().await {
            let Ok(d) = d else { break };
            let at = now_ns();
            sink.message(&d.data, at);
        }
    });
    Ok((conn, task))
}

impl Rabbit {
    fn start(rt: &tokio::runtime::Handle, server: &RabbitServer, n: usize) -> Rabbit {
        use lapin::options::ExchangeDeclareOptions;
        use lapin::types::FieldTable;
        let url = server.url();
        let pub_conns = rt.block_on(async {
            let mut out = Vec::new();
            for _ in 0..n {
                let conn = lapin::Connection::connect(&url, lapin::ConnectionProperties::default())
                    .await
                    .unwrap_or_else(|e| panic!("cannot connect to RabbitMQ at {url}: {e}"));
                let ch = conn
                    .create_channel()
                    .await
                    .unwrap_or_else(|e| panic!("cannot open a RabbitMQ channel: {e}"));
                ch.exchange_declare(
                    EXCHANGE.into(),
                    lapin::ExchangeKind::Fanout,
                    ExchangeDeclareOptions::default(),
                    FieldTable::default(),
                )
                .await
                .unwrap_or_else(|e| panic!("cannot declare the fanout exchange: {e}"));
                out.push((conn, ch));
            }
            out
        });
        let sinks: Vec<Arc<Sink>> = (0..n).map(|_| Sink::new()).collect();
        let subs = sinks
            .iter()
            .map(|s| {
                Some(
                    rt.block_on(rabbit_subscribe(&url, s.clone()))
                        .unwrap_or_else(|e| panic!("{e}")),
                )
            })
            .collect();
        Rabbit {
            rt: rt.clone(),
            url,
            beam: server.beam_pid(),
            pub_conns,
            sinks,
            subs,
        }
    }

    fn close_sub(&mut self, v: usize) {
        if let Some((conn, task)) = self.subs[v].take() {
            self.rt.block_on(async {
                let _ = conn.close(200, "bench: subscriber restart".into()).await;
                if tokio::time::timeout(Duration::from_secs(2), task)
                    .await
                    .is_err()
                {
                    eprintln!("rabbitmq: a closed subscriber's task did not end in 2 s");
                }
            });
        }
    }
}

impl Drop for Rabbit {
    fn drop(&mut self) {
        for v in 0..self.subs.len() {
            self.close_sub(v);
        }
        let conns = std::mem::take(&mut self.pub_conns);
        self.rt.block_on(async {
            for (conn, _) in conns {
                let _ = conn.close(200, "bench done".into()).await;
            }
        });
    }
}

impl System for Rabbit {
    fn name(&self) -> &'static str {
        "rabbitmq"
    }

    fn sinks(&self) -> Vec<Arc<Sink>> {
        self.sinks.clone()
    }

    fn publishers(&mut self) -> Vec<Publisher> {
        use lapin::options::BasicPublishOptions;
        self.pub_conns
            .iter()
            .map(|(_, ch)| {
                let (rt, ch) = (self.rt.clone(), ch.clone());
                Box::new(move |t: u64, ids: &[Ev], phase: u32| {
                    let payloads: Vec<String> =
                        ids.iter().map(|e| payload_json(t, e, phase)).collect();
                    rt.block_on(async {
                        let sends = payloads.iter().map(|p| {
                            ch.basic_publish(
                                EXCHANGE.into(),
                                "".into(),
                                BasicPublishOptions::default(),
                                p.as_bytes(),
                                lapin::BasicProperties::default(),
                            )
                        });
                        for r in futures::future::join_all(sends).await {
                            r.map_err(|e| format!("basic.publish: {e}"))?;
                        }
                        Ok(false)
                    })
                }) as Publisher
            })
            .collect()
    }

    fn server_pids(&self) -> Vec<i32> {
        self.beam.into_iter().collect()
    }

    fn restart_subscriber(&mut self, v: usize, outage: Duration) -> Duration {
        let t = Instant::now();
        self.close_sub(v);
        std::thread::sleep(outage.saturating_sub(t.elapsed()));
        let sub = self
            .rt
            .block_on(rabbit_subscribe(&self.url, self.sinks[v].clone()))
            .unwrap_or_else(|e| panic!("rabbitmq: cannot resubscribe: {e}"));
        self.subs[v] = Some(sub);
        t.elapsed()
    }
}

// --- NATS ---

struct Nats {
    rt: tokio::runtime::Handle,
    addr: String,
    pid: i32,
    pub_clients: Vec<async_nats::Client>,
    sinks: Vec<Arc<Sink>>,
    subs: Vec<Option<(async_nats::Client, tokio::task::JoinHandle<()>)>>,
}

async fn nats_subscribe(
    addr: &str,
    sink: Arc<Sink>,
) -> Result<(async_nats::Client, tokio::task::JoinHandle<()>), String> {
    let client = async_nats::connect(addr)
        .await
        .map_err(|e| format!("connect to NATS at {addr}: {e}"))?;
    let mut sub = client
        .subscribe(SUBJECT)
        .await
        .map_err(|e| format!("NATS subscribe: {e}"))?;
    // A server handles a connection's commands in order: once a message to a
    // private inbox comes back, the SUB before it is in place.
    let inbox = client.new_inbox();
    let mut probe = client
        .subscribe(inbox.clone())
        .await
        .map_err(|e| format!("NATS subscribe: {e}"))?;
    client
        .publish(inbox, "probe".into())
        .await
        .map_err(|e| format!("NATS publish: {e}"))?;
    match tokio::time::timeout(Duration::from_secs(5), probe.next()).await {
        Ok(Some(_)) => {}
        _ => return Err("NATS: the subscription probe did not come back in 5 s".into()),
    }
    drop(probe);
    sink.connections.fetch_add(1, Ordering::SeqCst);
    let task = tokio::spawn(async move {
        while let Some(m) = sub.next().await {
            let at = now_ns();
            sink.message(&m.payload, at);
        }
    });
    Ok((client, task))
}

impl Nats {
    fn start(rt: &tokio::runtime::Handle, server: &NatsServer, n: usize) -> Nats {
        let addr = server.addr();
        let pub_clients = rt.block_on(async {
            let mut out = Vec::new();
            for _ in 0..n {
                out.push(
                    async_nats::connect(&addr)
                        .await
                        .unwrap_or_else(|e| panic!("cannot connect to NATS at {addr}: {e}")),
                );
            }
            out
        });
        let sinks: Vec<Arc<Sink>> = (0..n).map(|_| Sink::new()).collect();
        let subs = sinks
            .iter()
            .map(|s| {
                Some(
                    rt.block_on(nats_subscribe(&addr, s.clone()))
                        .unwrap_or_else(|e| panic!("{e}")),
                )
            })
            .collect();
        Nats {
            rt: rt.clone(),
            addr,
            pid: server.pid(),
            pub_clients,
            sinks,
            subs,
        }
    }

    fn close_sub(&mut self, v: usize) {
        if let Some((client, task)) = self.subs[v].take() {
            self.rt.block_on(async {
                // Unsubscribe and close the connection.
                let _ = client.drain().await;
                drop(client);
                if tokio::time::timeout(Duration::from_secs(2), task)
                    .await
                    .is_err()
                {
                    eprintln!("nats: a closed subscriber's task did not end in 2 s");
                }
            });
        }
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        for v in 0..self.subs.len() {
            self.close_sub(v);
        }
    }
}

impl System for Nats {
    fn name(&self) -> &'static str {
        "nats"
    }

    fn sinks(&self) -> Vec<Arc<Sink>> {
        self.sinks.clone()
    }

    fn publishers(&mut self) -> Vec<Publisher> {
        self.pub_clients
            .iter()
            .map(|client| {
                let (rt, client) = (self.rt.clone(), client.clone());
                Box::new(move |t: u64, ids: &[Ev], phase: u32| {
                    rt.block_on(async {
                        for i in ids {
                            client
                                .publish(SUBJECT, payload_json(t, i, phase).into())
                                .await
                                .map_err(|e| format!("NATS publish: {e}"))?;
                        }
                        client
                            .flush()
                            .await
                            .map(|_| false)
                            .map_err(|e| format!("NATS flush: {e}"))
                    })
                }) as Publisher
            })
            .collect()
    }

    fn server_pids(&self) -> Vec<i32> {
        vec![self.pid]
    }

    fn restart_subscriber(&mut self, v: usize, outage: Duration) -> Duration {
        let t = Instant::now();
        self.close_sub(v);
        std::thread::sleep(outage.saturating_sub(t.elapsed()));
        let sub = self
            .rt
            .block_on(nats_subscribe(&self.addr, self.sinks[v].clone()))
            .unwrap_or_else(|e| panic!("nats: cannot resubscribe: {e}"));
        self.subs[v] = Some(sub);
        t.elapsed()
    }
}

// ---------------------------------------------------------------------------------
// Load and measurement.

struct LaneOut {
    acked: Vec<u64>,
    errors: usize,
    last_error: Option<String>,
    /// Largest delay of an event's publish call after its due time.
    max_lag: Duration,
    /// Duration of every publish call, ns.
    calls: Vec<i64>,
    /// Events accepted only after a failed attempt.
    retried: Vec<u64>,
}

/// Lane `lane` of `lanes` publishes its share of `rate` events/s for `secs`: global
/// event g is due at g / rate and belongs to lane g mod lanes.
fn run_lane(
    lane: usize,
    lanes: usize,
    rate: f64,
    secs: f64,
    phase: u32,
    start: Instant,
    mut publish: Publisher,
) -> LaneOut {
    let total = (rate * secs).round() as u64;
    let (lane, lanes) = (lane as u64, lanes as u64);
    let count = if total > lane {
        (total - lane - 1) / lanes + 1
    } else {
        0
    };
    let due = |k: u64| Duration::from_secs_f64((k * lanes + lane) as f64 / rate);
    let start_ns = start
        .duration_since(*T0.get_or_init(Instant::now))
        .as_nanos() as u64;
    let mut out = LaneOut {
        acked: Vec::with_capacity(count as usize),
        errors: 0,
        last_error: None,
        max_lag: Duration::ZERO,
        calls: Vec::new(),
        retried: Vec::new(),
    };
    let mut k = 0u64;
    let mut last_call: Option<Instant> = None;
    let mut ids = Vec::new();
    while k < count {
        let now = start.elapsed();
        let first_due = due(k);
        if first_due > now {
            std::thread::sleep(first_due - now);
            continue;
        }
        if let Some(lc) = last_call {
            let since = lc.elapsed();
            if since < MIN_GAP {
                std::thread::sleep(MIN_GAP - since);
                continue;
            }
        }
        let now = start.elapsed();
        // Every event of this lane due by now: k' with (k' * lanes + lane) / rate <= now.
        let due_by_now =
            ((now.as_secs_f64() * rate - lane as f64) / lanes as f64).floor() as u64 + 1;
        let end = due_by_now.clamp(k + 1, count).min(k + MAX_BATCH);
        out.max_lag = out.max_lag.max(now.saturating_sub(first_due));
        ids.clear();
        ids.extend((k..end).map(|j| Ev {
            id: (lane << 40) | j,
            due: start_ns + due(j).as_nanos() as u64,
        }));
        let t = now_ns();
        let call = Instant::now();
        last_call = Some(call);
        let r = publish(t, &ids, phase);
        out.calls.push(call.elapsed().as_nanos() as i64);
        match r {
            Ok(retried) => {
                out.acked.extend(ids.iter().map(|e| e.id));
                if retried {
                    out.retried.extend(ids.iter().map(|e| e.id));
                }
            }
            Err(e) => {
                out.errors += 1;
                out.last_error = Some(e);
            }
        }
        k = end;
    }
    out
}

#[derive(Clone, Debug, Default)]
struct PhaseResult {
    offered: f64,
    acked: usize,
    /// Acknowledged events per second of publishing.
    pub_rate: f64,
    pub_errors: usize,
    last_error: Option<String>,
    max_lag_ms: f64,
    /// Publish calls made, and their duration.
    calls: usize,
    call_p50_ms: f64,
    call_p99_ms: f64,
    /// kiln: from an event's time at its origin to its append on a node (all
    /// nodes), bucket upper bounds in ms.
    append_p50_ms: Option<f64>,
    append_p99_ms: Option<f64>,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    /// p99 of the latency from the due time (includes waiting in the publisher).
    p99_due_ms: f64,
    /// Acknowledged events not received, per subscriber.
    lost: Vec<u64>,
    /// Receptions of an event beyond the first, all subscribers.
    dups: u64,
    /// Of these, of events whose publish was retried after a failed attempt.
    dups_retried: u64,
    /// From the end of publishing until every subscriber had every event; None if never.
    drain_s: Option<f64>,
    lagged: u32,
    seq_dups: u64,
    seq_gaps: u64,
    resyncs: u32,
    bad: u64,
    /// CPU of the system under test and of this process, in cores, over the phase.
    server_cpu: f64,
    bench_cpu: f64,
    repairs: Option<u64>,
}

impl PhaseResult {
    fn lost_total(&self) -> u64 {
        self.lost.iter().sum()
    }

    /// Why the step does not count as sustained; None if it does.
    fn failure(&self) -> Option<String> {
        let mut why = Vec::new();
        if self.lost_total() > 0 {
            why.push(format!("{} lost", self.lost_total()));
        }
        if self.dups > 0 || self.seq_dups > 0 {
            why.push(format!("{} duplicates", self.dups.max(self.seq_dups)));
        }
        if self.lagged > 0 {
            why.push(format!("{} lagged", self.lagged));
        }
        if self.pub_errors > 0 {
            why.push(format!("{} publish errors", self.pub_errors));
        }
        if self.pub_rate < 0.95 * self.offered {
            why.push(format!("publishers reached {:.0}/s", self.pub_rate));
        }
        if self.p99_due_ms.is_nan() || self.p99_due_ms > KEPT_UP_P99_DUE_MS {
            why.push(format!("p99 from due time {:.0} ms", self.p99_due_ms));
        }
        match self.drain_s {
            None => why.push("never complete".into()),
            Some(d) if d > KEPT_UP_DRAIN_S => why.push(format!("last event {d:.1} s late")),
            _ => {}
        }
        (!why.is_empty()).then(|| why.join(", "))
    }
}

/// Value at quantile `q` (nearest rank) of latencies in ns, in ms.
fn quantile_ms(v: &mut [i64], q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let idx = ((v.len() - 1) as f64 * q).round() as usize;
    let (_, x, _) = v.select_nth_unstable(idx);
    *x as f64 / 1e6
}

/// Upper bound (ms) of the bucket holding quantile `q` of a cumulative histogram.
fn bucket_quantile_ms(cumulative: &[(f64, u64)], q: f64) -> Option<f64> {
    let total = cumulative.last()?.1;
    if total == 0 {
        return None;
    }
    let want = (total as f64 * q).ceil() as u64;
    cumulative
        .iter()
        .find(|(_, c)| *c >= want)
        .map(|(le, _)| le * 1000.0)
}

/// Something done to the system while the load runs: at `at` seconds into it.
type Action<'a> = (f64, &'a mut dyn FnMut(&mut dyn System));

/// One measured step: `rate` events/s over the lanes for `secs`, then waits (at most
/// `drain_cap`, or until nothing arrives for 3 s) for every subscriber to have every
/// acknowledged event.
fn run_phase(
    sys: &mut dyn System,
    phase: u32,
    rate: f64,
    secs: f64,
    drain_cap: Duration,
    action: Option<Action>,
) -> PhaseResult {
    let sinks = sys.sinks();
    // Start from a quiet system: what an earlier step left in flight arrives first.
    let settle = Instant::now();
    let mut seen = (u64::MAX, Instant::now());
    while settle.elapsed() < Duration::from_secs(30) {
        let n: u64 = sinks
            .iter()
            .map(|s| s.stale.load(Ordering::Relaxed) + s.count() as u64)
            .sum();
        if n != seen.0 {
            seen = (n, Instant::now());
        } else if seen.1.elapsed() >= Duration::from_millis(500) {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    for s in &sinks {
        s.begin(phase);
    }
    let snap = |s: &Sink| {
        (
            s.lagged.load(Ordering::Relaxed),
            s.seq_dups.load(Ordering::Relaxed),
            s.seq_gaps.load(Ordering::Relaxed),
            s.resyncs.load(Ordering::Relaxed),
            s.bad.load(Ordering::Relaxed),
        )
    };
    let before: Vec<_> = sinks.iter().map(|s| snap(s)).collect();
    let repairs0 = sys.repairs();
    let hist0 = sys.append_histogram();
    let pids = sys.server_pids();
    let me = [std::process::id() as i32];
    let (cpu0, me0) = (ticks_of(&pids), ticks_of(&me));
    let publishers = sys.publishers();
    let lanes = publishers.len();
    let start = Instant::now();
    let handles: Vec<_> = publishers
        .into_iter()
        .enumerate()
        .map(|(l, p)| std::thread::spawn(move || run_lane(l, lanes, rate, secs, phase, start, p)))
        .collect();
    if let Some((at, f)) = action {
        let at = Duration::from_secs_f64(at);
        std::thread::sleep(at.saturating_sub(start.elapsed()));
        f(sys);
    }
    let outs: Vec<LaneOut> = handles
        .into_iter()
        .map(|h| h.join().expect("publisher lane panicked"))
        .collect();
    let published = start.elapsed();
    let mut acked: Vec<u64> = outs.iter().flat_map(|o| o.acked.iter().copied()).collect();
    acked.sort_unstable();
    // Drain.
    let want = acked.len();
    let mut drain_s = None;
    let mut progress = (0usize, Instant::now());
    let drain_start = Instant::now();
    let mut checked = 0usize;
    loop {
        let counts: Vec<usize> = sinks.iter().map(|s| s.count()).collect();
        // Enough messages; duplicates may stand in for missing ones, so check ids
        // (again whenever more came).
        let total: usize = counts.iter().sum();
        if counts.iter().all(|c| *c >= want) && total != checked {
            checked = total;
            if sinks.iter().all(|s| s.missing(&acked) == 0) {
                drain_s = Some(drain_start.elapsed().as_secs_f64());
                break;
            }
        }
        if total != progress.0 {
            progress = (total, Instant::now());
        }
        if progress.1.elapsed() > Duration::from_secs(3) || drain_start.elapsed() > drain_cap {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let elapsed = start.elapsed().as_secs_f64();
    let (cpu1, me1) = (ticks_of(&pids), ticks_of(&me));
    let mut lat: Vec<i64> = Vec::new();
    let mut lat_due: Vec<i64> = Vec::new();
    let mut lost = Vec::new();
    let mut dups = 0u64;
    let mut dups_retried = 0u64;
    let retried: std::collections::HashSet<u64> = outs
        .iter()
        .flat_map(|o| o.retried.iter().copied())
        .collect();
    // `KILN_BENCH_DUMP=prefix`: every reception as `subscriber id latency-ns`, one
    // file per step, to see when and where slow deliveries happen.
    let mut dump = std::env::var("KILN_BENCH_DUMP").ok().and_then(|p| {
        let path = format!("{p}.{phase}.{rate}");
        std::fs::File::create(&path)
            .map_err(|e| eprintln!("    cannot write {path}: {e}"))
            .ok()
            .map(std::io::BufWriter::new)
    });
    for (si, s) in sinks.iter().enumerate() {
        let recs = s.finish();
        if let Some(f) = dump.as_mut() {
            use std::io::Write;
            for r in &recs {
                let _ = writeln!(f, "{si} {} {}", r.0, r.1);
            }
        }
        let mut ids: Vec<u64> = recs.iter().map(|r| r.0).collect();
        lat.extend(recs.iter().map(|r| r.1));
        lat_due.extend(recs.iter().map(|r| r.2));
        ids.sort_unstable();
        for w in ids.windows(2) {
            if w[0] == w[1] {
                dups += 1;
                if retried.contains(&w[0]) {
                    dups_retried += 1;
                }
            }
        }
        ids.dedup();
        lost.push(missing_from(&acked, &ids));
    }
    let after: Vec<_> = sinks.iter().map(|s| snap(s)).collect();
    let delta = |f: fn(&(u32, u64, u64, u32, u64)) -> u64| -> u64 {
        after
            .iter()
            .zip(&before)
            .map(|(a, b)| f(a).saturating_sub(f(b)))
            .sum()
    };
    let ticks = clock_ticks();
    let mut calls: Vec<i64> = outs.iter().flat_map(|o| o.calls.iter().copied()).collect();
    let (append_p50_ms, append_p99_ms) = match (hist0, sys.append_histogram()) {
        (Some(a), Some(b)) => {
            let d: Vec<(f64, u64)> = b
                .iter()
                .map(|(le, c)| {
                    let was = a.iter().find(|x| x.0 == *le).map(|x| x.1).unwrap_or(0);
                    (*le, c.saturating_sub(was))
                })
                .collect();
            (bucket_quantile_ms(&d, 0.5), bucket_quantile_ms(&d, 0.99))
        }
        _ => (None, None),
    };
    PhaseResult {
        offered: rate,
        acked: want,
        pub_rate: want as f64 / published.as_secs_f64(),
        pub_errors: outs.iter().map(|o| o.errors).sum(),
        last_error: outs.iter().find_map(|o| o.last_error.clone()),
        max_lag_ms: outs
            .iter()
            .map(|o| o.max_lag.as_secs_f64() * 1000.0)
            .fold(0.0, f64::max),
        calls: calls.len(),
        call_p50_ms: quantile_ms(&mut calls, 0.5),
        call_p99_ms: quantile_ms(&mut calls, 0.99),
        append_p50_ms,
        append_p99_ms,
        p99_due_ms: quantile_ms(&mut lat_due, 0.99),
        p50_ms: quantile_ms(&mut lat, 0.5),
        p99_ms: quantile_ms(&mut lat, 0.99),
        max_ms: lat
            .iter()
            .max()
            .map(|m| *m as f64 / 1e6)
            .unwrap_or(f64::NAN),
        lost,
        dups,
        dups_retried,
        drain_s,
        lagged: delta(|x| x.0 as u64) as u32,
        seq_dups: delta(|x| x.1),
        seq_gaps: delta(|x| x.2),
        resyncs: delta(|x| x.3 as u64) as u32,
        bad: delta(|x| x.4),
        server_cpu: cpu1.saturating_sub(cpu0) as f64 / ticks / elapsed,
        bench_cpu: me1.saturating_sub(me0) as f64 / ticks / elapsed,
        repairs: match (repairs0, sys.repairs()) {
            (Some(a), Some(b)) => Some(b.saturating_sub(a)),
            _ => None,
        },
    }
}

// ---------------------------------------------------------------------------------
// The benchmark.

#[derive(Default)]
struct SystemResults {
    n: usize,
    name: &'static str,
    steps: Vec<PhaseResult>,
    /// Highest passing rate; None if even the lowest failed.
    max_rate: Option<f64>,
    first_failure: Option<(f64, String)>,
    restart: Option<(Duration, PhaseResult)>,
}

fn fmt_ms(x: f64) -> String {
    if x.is_nan() {
        "—".into()
    } else if x < 10.0 {
        format!("{x:.2}")
    } else {
        format!("{x:.1}")
    }
}

fn describe(sys: &str, n: usize, r: &PhaseResult) {
    eprintln!(
        "  {sys} N={n} {:>7.0}/s: acked {} ({:.0}/s, {} errors, max lag {:.1} ms; {} calls p50 {} p99 {} ms{}) p50 {} p99 {} max {} ms (p99 from due {}); lost {} dups {} (after a retried publish {}) drain {} lagged {} seq dups/gaps {}/{} resyncs {} bad {}; cpu server {:.2} bench {:.2}{}",
        r.offered,
        r.acked,
        r.pub_rate,
        r.pub_errors,
        r.max_lag_ms,
        r.calls,
        fmt_ms(r.call_p50_ms),
        fmt_ms(r.call_p99_ms),
        match (r.append_p50_ms, r.append_p99_ms) {
            (Some(a), Some(b)) => format!("; append on nodes p50 ≤ {a} p99 ≤ {b} ms"),
            _ => String::new(),
        },
        fmt_ms(r.p50_ms),
        fmt_ms(r.p99_ms),
        fmt_ms(r.max_ms),
        fmt_ms(r.p99_due_ms),
        r.lost_total(),
        r.dups,
        r.dups_retried,
        r.drain_s.map(|d| format!("{d:.2} s")).unwrap_or("never".into()),
        r.lagged,
        r.seq_dups,
        r.seq_gaps,
        r.resyncs,
        r.bad,
        r.server_cpu,
        r.bench_cpu,
        r.repairs.map(|x| format!("; gap repairs {x}")).unwrap_or_default(),
    );
    if let Some(e) = &r.last_error {
        eprintln!("    last publish error: {e}");
    }
}

/// Runs every measurement on one system.
fn measure(
    sys: &mut dyn System,
    n: usize,
    secs: f64,
    outage: Duration,
) -> (SystemResults, Duration) {
    let name = sys.name();
    let mut phase = 0u32;
    let mut next_phase = || {
        phase += 1;
        phase
    };
    // Warm-up: connections, gossip meshes, JIT-less caches; must be complete.
    let mut warm = false;
    for _ in 0..3 {
        let r = run_phase(sys, next_phase(), 200.0, 2.0, Duration::from_secs(20), None);
        if r.lost_total() == 0 && r.pub_errors == 0 {
            warm = true;
            break;
        }
        eprintln!("  {name} N={n}: warm-up incomplete, again");
        describe(name, n, &r);
    }
    if !warm {
        eprintln!("  {name} N={n}: warm-up never complete; measuring anyway");
    }
    let mut res = SystemResults {
        n,
        name,
        ..Default::default()
    };
    let mut pass: Option<f64> = None;
    let mut fail: Option<(f64, String)> = None;
    let step = |sys: &mut dyn System, phase: u32, rate: f64, res: &mut SystemResults| {
        let r = run_phase(sys, phase, rate, secs, Duration::from_secs(15), None);
        describe(name, n, &r);
        if r.lost_total() > 0 || r.seq_dups > 0 || r.seq_gaps > 0 {
            let saved = sys.save_logs(&format!("{name}-n{n}-{rate:.0}"));
            if !saved.is_empty() {
                eprintln!("    logs saved: {saved:?}");
            }
        }
        let f = r.failure();
        res.steps.push(r);
        f
    };
    // Fixed rates only (for profiling one load): no ladder, no restart run.
    if let Some(rates) = fixed_rates() {
        for rate in rates {
            step(sys, next_phase(), rate, &mut res);
        }
        return (res, Duration::ZERO);
    }
    for rate in [1_000.0, 10_000.0] {
        match step(sys, next_phase(), rate, &mut res) {
            None => pass = Some(rate),
            Some(why) => {
                if fail.is_none() {
                    fail = Some((rate, why));
                }
            }
        }
    }
    if pass.is_some() {
        for &rate in LADDER {
            if rate <= pass.unwrap_or(0.0) || fail.as_ref().is_some_and(|f| rate >= f.0) {
                continue;
            }
            match step(sys, next_phase(), rate, &mut res) {
                None => pass = Some(rate),
                Some(why) => {
                    fail = Some((rate, why));
                    break;
                }
            }
        }
        if let (Some(p), Some((f, _))) = (pass, &fail) {
            let mid = ((p + f) / 2.0 / 1000.0).round() * 1000.0;
            if mid > p && mid < *f {
                if let Some(why) = step(sys, next_phase(), mid, &mut res) {
                    fail = Some((mid, why));
                } else {
                    pass = Some(mid);
                }
            }
        }
    }
    res.max_rate = pass;
    res.first_failure = fail;
    // Restart run.
    let v = RESTARTED.min(n - 1);
    let mut away = Duration::ZERO;
    let mut act = |s: &mut dyn System| away = s.restart_subscriber(v, outage);
    let r = run_phase(
        sys,
        next_phase(),
        1_000.0,
        10.0,
        Duration::from_secs(30),
        Some((3.0, &mut act)),
    );
    eprintln!(
        "  {name} N={n} restart of subscriber {} (away {:.2} s): lost by it {}, by the others {}",
        v + 1,
        away.as_secs_f64(),
        r.lost[v],
        r.lost_total() - r.lost[v]
    );
    describe(name, n, &r);
    if r.lost_total() > 0 || r.seq_dups > 0 || r.seq_gaps > 0 {
        let saved = sys.save_logs(&format!("{name}-n{n}-restart"));
        if !saved.is_empty() {
            eprintln!("    logs saved: {saved:?}");
        }
    }
    res.restart = Some((away, r));
    (res, away)
}

/// `KILN_BENCH_RATES=5000,20000`: measure at these offered rates and nothing else.
fn fixed_rates() -> Option<Vec<f64>> {
    let v = std::env::var("KILN_BENCH_RATES").ok()?;
    let rates: Vec<f64> = v.split(',').filter_map(|r| r.trim().parse().ok()).collect();
    (!rates.is_empty()).then_some(rates)
}

fn ratio(a: f64, b: f64) -> String {
    if a.is_nan() || b.is_nan() || b == 0.0 {
        "—".into()
    } else {
        format!("{:.2}", a / b)
    }
}

fn print_tables(all: &[SystemResults]) {
    println!();
    println!("Latency, publish call → reception, all (event, subscriber) pairs:");
    println!();
    println!("| N | system | offered/s | published/s | p50 ms | p99 ms | max ms | lost | dup | last event after s | publish call p50 / p99 ms | kiln: in nodes' logs p50 / p99 ms | server CPU (cores) | bench CPU (cores) |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for r in all {
        for s in r
            .steps
            .iter()
            .filter(|s| s.offered == 1_000.0 || s.offered == 10_000.0)
        {
            println!(
                "| {} | {} | {:.0} | {:.0} | {} | {} | {} | {} | {} | {} | {} / {} | {} | {:.2} | {:.2} |",
                r.n,
                r.name,
                s.offered,
                s.pub_rate,
                fmt_ms(s.p50_ms),
                fmt_ms(s.p99_ms),
                fmt_ms(s.max_ms),
                s.lost_total(),
                s.dups,
                s.drain_s
                    .map(|d| format!("{d:.2}"))
                    .unwrap_or("never".into()),
                fmt_ms(s.call_p50_ms),
                fmt_ms(s.call_p99_ms),
                match (s.append_p50_ms, s.append_p99_ms) {
                    (Some(a), Some(b)) => format!("≤ {a} / ≤ {b}"),
                    _ => "—".into(),
                },
                s.server_cpu,
                s.bench_cpu,
            );
        }
    }
    println!();
    println!("Highest sustained rate (every subscriber got every event once, not cut off; publishers ≥ 95 % of the offered rate; p99 from the events' due times ≤ {KEPT_UP_P99_DUE_MS} ms; the last event ≤ {KEPT_UP_DRAIN_S} s after publishing ended):");
    println!();
    println!("| N | system | max sustained events/s | p99 ms there | first failing step |");
    println!("|---|---|---|---|---|");
    for r in all {
        let p99 = r
            .max_rate
            .and_then(|m| r.steps.iter().rev().find(|s| s.offered == m))
            .map(|s| fmt_ms(s.p99_ms))
            .unwrap_or("—".into());
        println!(
            "| {} | {} | {} | {} | {} |",
            r.n,
            r.name,
            r.max_rate
                .map(|m| format!("{m:.0}"))
                .unwrap_or("< 1000".into()),
            p99,
            r.first_failure
                .as_ref()
                .map(|(rate, why)| format!("{rate:.0}/s: {why}"))
                .unwrap_or("none (ladder exhausted)".into()),
        );
    }
    println!();
    println!(
        "Restart run (1 000 events/s for 10 s; subscriber {} restarted after 3 s):",
        RESTARTED + 1
    );
    println!();
    println!("| N | system | subscriber away s | events acknowledged | lost by the restarted subscriber | lost by the others | received twice (of which: publish retried after the node died mid-request) | kiln: (origin, seq) repeated / skipped |");
    println!("|---|---|---|---|---|---|---|---|");
    for r in all {
        if let Some((away, s)) = &r.restart {
            let v = RESTARTED.min(r.n - 1);
            println!(
                "| {} | {} | {:.2} | {} | {} | {} | {} ({}) | {} |",
                r.n,
                r.name,
                away.as_secs_f64(),
                s.acked,
                s.lost[v],
                s.lost_total() - s.lost[v],
                s.dups,
                s.dups_retried,
                if r.name == "kiln" {
                    format!("{} / {}", s.seq_dups, s.seq_gaps)
                } else {
                    "—".into()
                },
            );
        }
    }
    println!();
    println!("Ratios kiln/other (below 1: kiln lower latency; max rate above 1: kiln higher):");
    println!();
    println!("| N | vs | p50 @1k | p99 @1k | p50 @10k | p99 @10k | max sustained rate |");
    println!("|---|---|---|---|---|---|---|");
    let ns: Vec<usize> = {
        let mut v: Vec<usize> = all.iter().map(|r| r.n).collect();
        v.dedup();
        v
    };
    for n in ns {
        let Some(k) = all.iter().find(|r| r.n == n && r.name == "kiln") else {
            continue;
        };
        let at = |r: &SystemResults, rate: f64| r.steps.iter().find(|s| s.offered == rate).cloned();
        for other in all.iter().filter(|r| r.n == n && r.name != "kiln") {
            let q = |rate: f64, p99: bool| match (at(k, rate), at(other, rate)) {
                (Some(a), Some(b)) if p99 => ratio(a.p99_ms, b.p99_ms),
                (Some(a), Some(b)) => ratio(a.p50_ms, b.p50_ms),
                _ => "—".into(),
            };
            println!(
                "| {n} | {} | {} | {} | {} | {} | {} |",
                other.name,
                q(1_000.0, false),
                q(1_000.0, true),
                q(10_000.0, false),
                q(10_000.0, true),
                ratio(
                    k.max_rate.unwrap_or(f64::NAN),
                    other.max_rate.unwrap_or(f64::NAN)
                ),
            );
        }
    }
}

fn main() {
    T0.get_or_init(Instant::now);
    let args: Vec<String> = std::env::args().collect();
    let ns: Vec<usize> = args
        .get(1)
        .map(|s| {
            s.split(',')
                .map(|x| {
                    x.trim()
                        .parse()
                        .unwrap_or_else(|_| panic!("bad node count `{x}` (expected e.g. 3,5,10)"))
                })
                .collect()
        })
        .unwrap_or(vec![3, 5, 10]);
    let secs: f64 = args
        .get(2)
        .map(|s| s.parse().unwrap_or_else(|_| panic!("bad seconds `{s}`")))
        .unwrap_or(5.0);
    let systems: Vec<String> = args
        .get(3)
        .map(|s| s.split(',').map(str::to_string).collect())
        .unwrap_or(vec!["kiln".into(), "rabbitmq".into(), "nats".into()]);
    let want = |s: &str| systems.iter().any(|x| x == s);
    assert!(ns.iter().all(|n| *n >= 2), "node counts must be at least 2");

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");

    println!(
        "Publishing: open loop, N lanes (kiln: lane k → node k, POST /v1/broadcast with a JSON \
         array; RabbitMQ: lane k has its own connection, one basic.publish per event to a fanout \
         exchange; NATS: lane k has its own connection, one PUB per event + flush), each lane \
         sending what is due in one call at most every {} ms; {secs} s per step.",
        MIN_GAP.as_millis()
    );
    let mut all = Vec::new();
    for &n in &ns {
        let mut outage = Duration::from_secs(1);
        if want("kiln") {
            eprintln!("kiln, N = {n}: starting");
            let mut k = Kiln::start(n);
            let (r, away) = measure(&mut k, n, secs, outage);
            outage = away;
            all.push(r);
        }
        // Each broker runs only while it is measured: an idle Erlang VM still
        // spins its schedulers, CPU the other systems would be measured without.
        if want("rabbitmq") {
            eprintln!("rabbitmq, N = {n}");
            let server = RabbitServer::start();
            let mut s = Rabbit::start(rt.handle(), &server, n);
            all.push(measure(&mut s, n, secs, outage).0);
        }
        if want("nats") {
            eprintln!("nats, N = {n}");
            let server = NatsServer::start();
            let mut s = Nats::start(rt.handle(), &server, n);
            all.push(measure(&mut s, n, secs, outage).0);
        }
    }
    print_tables(&all);
}
