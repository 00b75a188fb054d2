//! Soak: a cluster of real `kiln` processes in network namespaces (5 nodes, 2
//! stripes) under a random schedule of faults — kill -9 and restart, SIGSTOP and
//! SIGCONT, a node cut off by nftables, a pair cut off from each other, a
//! graceful stop — one at a time, while writers, a publisher and one subscriber
//! per node run. It checks DESIGN.md's invariants over the whole run:
//!
//! 1. at most one active per stripe per epoch, in every node's view;
//! 2. no acknowledged write lost, reads linearizable: each key has one writer,
//!    which knows what it wrote; a read (from any node) must show the last
//!    acknowledged write or one the writer could not settle since;
//! 3. a write retried with its Idempotency-Key after an unknown outcome is
//!    applied once, and so is each attempt of a write without one (half the
//!    writers send none: their nodes number them in their retry sessions, and
//!    send them again themselves across failovers): each applied write of a
//!    key is one `change` event of its stripe, so a key has at least as many as
//!    writes acknowledged and at most as many as writes and attempts sent;
//! 4. every subscriber (resuming with Last-Event-ID across restarts) gets every
//!    event once, in per-origin order, and the same event at each position;
//! 5. the cluster recovers on its own after each fault (every stripe with an
//!    active, every member in sync, every node alive everywhere).
//!
//! ```sh
//! cargo build --release -p kiln-node -p kiln-integration --bins
//! target/release/soak [minutes] [seed]          # root; iproute2 and nftables
//! ```
//!
//! It prints one line per fault and a summary, and exits 1 on a violation,
//! keeping the nodes' data directories and logs (the path is printed; also
//! kept with `KILN_SOAK_KEEP=1`).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kiln_integration::netns::Lab;
use kiln_integration::{check_stream, Node, NodeOpts, Subscriber};
use serde_json::{json, Value};

const NODES: usize = 5;
const STRIPES: usize = 2;
const WRITERS: usize = 6;
/// Writers that keep away from a node under a fault (see [`Writer::steady`]).
const STEADY_WRITERS: usize = 4;
const KEYS_PER_WRITER: usize = 40;
/// Longer than the server's request timeout (5 s), so that a request the client
/// gave up on is not still being retried inside the cluster.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(20);
/// A steady writer's write slower than this is printed, with where it went.
const SLOW_WRITE: Duration = Duration::from_secs(1);
/// Attempts of one write with its Idempotency-Key before it is left unsettled.
const WRITE_ATTEMPTS: u32 = 10;
/// How long the cluster may take to recover after a fault before that counts
/// as a violation of invariant 5.
const RECOVERY_LIMIT: Duration = Duration::from_secs(120);

/// Set by SIGINT/SIGTERM: the faults end early and the run is still checked
/// (and the namespaces removed).
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_interrupt(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// xorshift64*: a seeded schedule, so that a failing run can be repeated.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    fn millis(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(lo + self.below(hi - lo + 1))
    }
}

/// What the run found; shared by every thread.
#[derive(Default)]
struct Findings {
    violations: Mutex<Vec<String>>,
    acked_writes: AtomicU64,
    unsettled_writes: AtomicU64,
    retried_writes: AtomicU64,
    reads: AtomicU64,
    failed_reads: AtomicU64,
    published: AtomicU64,
    failed_publishes: AtomicU64,
    /// Nodes under a fault now: steady writers do not send to them.
    faulted: Mutex<Vec<usize>>,
    /// When a steady writer last had a write acknowledged (ms since start).
    last_ack_ms: AtomicU64,
    /// The longest time without a steady writer's write acknowledged: the
    /// cluster's unavailability as a client that avoids a faulty node sees it.
    longest_ack_gap_ms: AtomicU64,
    /// The same since the current fault began.
    fault_ack_gap_ms: AtomicU64,
}

impl Findings {
    fn violation(&self, started: Instant, what: String) {
        eprintln!(
            "[{:>6.1}s] VIOLATION: {what}",
            started.elapsed().as_secs_f64()
        );
        self.violations
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(what);
    }

    fn acked(&self, started: Instant, steady: bool) {
        self.acked_writes.fetch_add(1, Ordering::SeqCst);
        if !steady {
            return;
        }
        let now = started.elapsed().as_millis() as u64;
        let last = self.last_ack_ms.swap(now, Ordering::SeqCst);
        self.longest_ack_gap_ms
            .fetch_max(now.saturating_sub(last), Ordering::SeqCst);
        self.fault_ack_gap_ms
            .fetch_max(now.saturating_sub(last), Ordering::SeqCst);
    }

    fn set_faulted(&self, nodes: &[usize]) {
        *self.faulted.lock().unwrap_or_else(|p| p.into_inner()) = nodes.to_vec();
    }
}

/// One HTTP answer: status and body, or a failure with no answer.
enum Reply {
    Answer(u16, String),
    NoAnswer(String),
}

fn call(req: ureq::Request, body: Option<&str>) -> Reply {
    let result = match body {
        Some(b) => req.send_string(b),
        None => req.call(),
    };
    match result {
        Ok(r) => {
            let status = r.status();
            Reply::Answer(status, r.into_string().unwrap_or_default())
        }
        Err(ureq::Error::Status(status, r)) => {
            Reply::Answer(status, r.into_string().unwrap_or_default())
        }
        Err(e) => Reply::NoAnswer(e.to_string()),
    }
}

/// A write a writer sent: a put of value number `n`, or a delete.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Write {
    Put(u64),
    Delete,
}

/// What a writer knows of one of its keys.
#[derive(Default)]
struct KeyModel {
    /// The key's version and value (`None`: absent) as of the last write
    /// acknowledged or read; the version is unknown after a delete found nothing.
    known: Option<(Option<u64>, Option<u64>)>,
    /// Writes sent since then whose outcome is unknown (all attempts failed).
    unsettled: Vec<Write>,
    next_value: u64,
    /// Writes answered 200 (each one applied, so one change event).
    acked: u64,
    /// Writes left with an unknown outcome (applied at most once each); for a
    /// writer without Idempotency-Keys, attempts with an unknown outcome.
    ever_unsettled: u64,
    /// A writer without Idempotency-Keys: the attempts whose outcome is
    /// unknown. Each may still be applied once, at any later time (a copy its
    /// node had sent before giving up), so none is ever settled.
    stragglers: Vec<Write>,
}

fn value_text(writer: usize, key: usize, n: u64, len: usize) -> String {
    let head = format!("w{writer}k{key}n{n}:");
    let pad = len.saturating_sub(head.len());
    format!("{head}{}", "x".repeat(pad))
}

/// The value number in a value this writer wrote.
fn value_number(text: &str) -> Option<u64> {
    let head = text.split(':').next()?;
    head.rsplit('n').next()?.parse().ok()
}

struct Writer {
    id: usize,
    https: Vec<String>,
    findings: Arc<Findings>,
    started: Instant,
    stop: Arc<AtomicBool>,
    agent: ureq::Agent,
    rng: Rng,
    keys: Vec<KeyModel>,
    /// Writes sent, for their Idempotency-Keys.
    writes: u64,
    /// Sends no Idempotency-Key, nor If-Match: a retry of a write is a new
    /// request, and an earlier attempt may apply after it.
    keyless: bool,
    /// A steady writer sends only to nodes not under a fault, as a client
    /// behind a health-checking balancer would; the others send anywhere.
    steady: bool,
}

impl Writer {
    /// Writer `id` of `keys`, sending anywhere (not steady).
    fn new(
        id: usize,
        https: &[String],
        findings: &Arc<Findings>,
        started: Instant,
        stop: &Arc<AtomicBool>,
        keys: Vec<KeyModel>,
    ) -> Writer {
        Writer {
            id,
            https: https.to_vec(),
            findings: findings.clone(),
            started,
            stop: stop.clone(),
            agent: ureq::AgentBuilder::new().timeout(CLIENT_TIMEOUT).build(),
            rng: Rng((id as u64 * 7919) | 1),
            keys,
            writes: 0,
            steady: false,
            keyless: id % 2 == 1,
        }
    }

    fn key_path(&self, key: usize) -> String {
        format!("/v1/kv/soak/w{}-{key}", self.id)
    }

    fn node(&mut self) -> String {
        let mut candidates: Vec<usize> = (0..self.https.len()).collect();
        if self.steady {
            let faulted = self
                .findings
                .faulted
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone();
            candidates.retain(|i| !faulted.contains(i));
            if candidates.is_empty() {
                candidates = (0..self.https.len()).collect();
            }
        }
        let i = candidates[self.rng.below(candidates.len() as u64) as usize];
        self.https[i].clone()
    }

    fn violation(&self, what: String) {
        self.findings.violation(self.started, what);
    }

    fn run(mut self) -> Vec<KeyModel> {
        while !self.stop.load(Ordering::SeqCst) {
            let key = self.rng.below(KEYS_PER_WRITER as u64) as usize;
            match self.rng.below(10) {
                0 => self.delete(key),
                1 | 2 => self.read(key),
                3 => self.cas_put(key),
                _ => self.put(key, None),
            }
        }
        self.keys
    }

    fn cas_put(&mut self, key: usize) {
        // A compare-and-set only where the writer knows the exact version.
        match self.keys[key].known {
            Some((Some(v), Some(_))) if self.keys[key].unsettled.is_empty() && !self.keyless => {
                self.put(key, Some(v))
            }
            _ => self.put(key, None),
        }
    }

    fn put(&mut self, key: usize, if_match: Option<u64>) {
        let n = self.keys[key].next_value;
        self.keys[key].next_value += 1;
        let len = 16 + self.rng.below(2048) as usize;
        let body = value_text(self.id, key, n, len);
        self.write(key, Write::Put(n), Some(body), if_match);
    }

    fn delete(&mut self, key: usize) {
        self.write(key, Write::Delete, None, None);
    }

    /// Sends a write until it is answered, retrying with its Idempotency-Key on
    /// other nodes while the outcome is unknown.
    fn write(&mut self, key: usize, op: Write, body: Option<String>, if_match: Option<u64>) {
        let path = self.key_path(key);
        self.writes += 1;
        let idem = format!("soak-{}-{}", self.id, self.writes);
        let mut last_error = String::new();
        for attempt in 0..WRITE_ATTEMPTS {
            if attempt > 0 {
                self.findings.retried_writes.fetch_add(1, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(200 * u64::from(attempt.min(10))));
            }
            let url = format!("http://{}{path}", self.node());
            let mut req = match op {
                Write::Put(_) => self.agent.put(&url),
                Write::Delete => self.agent.delete(&url),
            };
            if !self.keyless {
                req = req.set("Idempotency-Key", &idem);
            }
            if let Some(v) = if_match {
                req = req.set("If-Match", &format!("\"{v}\""));
            }
            let sent = Instant::now();
            let reply = call(req, body.as_deref());
            if self.steady && sent.elapsed() > SLOW_WRITE {
                let how = match &reply {
                    Reply::Answer(status, text) => format!("{status} {text}"),
                    Reply::NoAnswer(e) => e.clone(),
                };
                eprintln!(
                    "[{:>6.1}s] slow write: {path} via {url} took {:.1} s: {how}",
                    self.started.elapsed().as_secs_f64(),
                    sent.elapsed().as_secs_f64()
                );
            }
            match reply {
                Reply::Answer(200, text) => {
                    let version = serde_json::from_str::<Value>(&text)
                        .ok()
                        .and_then(|v| v["version"].as_u64());
                    let Some(version) = version else {
                        self.violation(format!("{path}: 200 without a version: {text}"));
                        return;
                    };
                    self.acknowledged(key, op, version);
                    return;
                }
                Reply::Answer(404, _) if op == Write::Delete => {
                    self.found_absent(key, "a delete answered 404");
                    let model = &mut self.keys[key];
                    model.known = Some((None, None));
                    model.unsettled.clear();
                    return;
                }
                Reply::Answer(status @ (500..=599), text) => {
                    self.unknown_attempt(key, op);
                    last_error = format!("{status} {text}")
                }
                Reply::Answer(status, text) => {
                    self.violation(format!(
                        "{path}: {op:?} (If-Match {if_match:?}, attempt {attempt}) answered {status}: {text}"
                    ));
                    return;
                }
                Reply::NoAnswer(e) => {
                    self.unknown_attempt(key, op);
                    last_error = e
                }
            }
            if self.stop.load(Ordering::SeqCst) && attempt >= 3 {
                break;
            }
        }
        self.findings
            .unsettled_writes
            .fetch_add(1, Ordering::SeqCst);
        eprintln!(
            "[{:>6.1}s] {path}: {op:?} unsettled after {WRITE_ATTEMPTS} attempts (last: {last_error})",
            self.started.elapsed().as_secs_f64()
        );
        if !self.keyless {
            self.keys[key].unsettled.push(op);
            self.keys[key].ever_unsettled += 1;
        }
    }

    /// An attempt of a write without an Idempotency-Key got no answer that
    /// settles it: it may be applied, once, now or later.
    fn unknown_attempt(&mut self, key: usize, op: Write) {
        if self.keyless {
            let model = &mut self.keys[key];
            model.stragglers.push(op);
            model.ever_unsettled += 1;
        }
    }

    fn acknowledged(&mut self, key: usize, op: Write, version: u64) {
        let path = self.key_path(key);
        let model = &self.keys[key];
        if let Some((Some(before), _)) = model.known {
            if version <= before {
                self.violation(format!(
                    "{path}: {op:?} acknowledged with version {version}, not above {before} \
                     (a lost or reordered write)"
                ));
            }
        }
        let value = match op {
            Write::Put(n) => Some(n),
            Write::Delete => None,
        };
        let model = &mut self.keys[key];
        model.known = Some((Some(version), value));
        model.unsettled.clear();
        model.acked += 1;
        self.findings.acked(self.started, self.steady);
    }

    /// A read or delete found the key absent: fine unless the last
    /// acknowledged write put a value and no delete is unsettled since.
    fn found_absent(&self, key: usize, how: &str) {
        let model = &self.keys[key];
        if let Some((_, Some(n))) = model.known {
            if !model.unsettled.contains(&Write::Delete)
                && !model.stragglers.contains(&Write::Delete)
            {
                self.violation(format!(
                    "{}: {how}, but value {n} was acknowledged (a lost write)",
                    self.key_path(key)
                ));
            }
        }
    }

    /// A (linearizable) read must show the last acknowledged write or an
    /// unsettled one sent since; it then settles what it shows.
    fn read(&mut self, key: usize) {
        let path = self.key_path(key);
        let node = self.node();
        let resp = self.agent.get(&format!("http://{node}{path}")).call();
        self.findings.reads.fetch_add(1, Ordering::SeqCst);
        let (version, text) = match resp {
            Ok(r) => {
                let etag = r.header("ETag").unwrap_or("").trim_matches('"').to_string();
                (
                    etag.parse::<u64>().ok(),
                    r.into_string().unwrap_or_default(),
                )
            }
            Err(ureq::Error::Status(404, _)) => {
                self.found_absent(key, &format!("a read from {node} answered 404"));
                let model = &mut self.keys[key];
                if !model.unsettled.is_empty() || model.known.is_some() {
                    model.known = Some((None, None));
                    model.unsettled.clear();
                }
                return;
            }
            Err(_) => {
                self.findings.failed_reads.fetch_add(1, Ordering::SeqCst);
                return;
            }
        };
        let (Some(version), Some(n)) = (version, value_number(&text)) else {
            self.violation(format!(
                "{path}: a read from {node} gave no version or a foreign value"
            ));
            return;
        };
        let model = &self.keys[key];
        match model.known {
            Some((Some(before), value)) if version < before => self.violation(format!(
                "{path}: a read from {node} gave version {version} (value {n}), but {before} \
                 (value {value:?}) was acknowledged or read before (a stale read or lost write)"
            )),
            Some((Some(before), value)) if version == before && value != Some(n) => {
                self.violation(format!(
                    "{path}: a read from {node} gave value {n} at version {version}, \
                     but that version was value {value:?}"
                ))
            }
            Some((Some(before), _)) if version == before => {}
            _ if !model.unsettled.contains(&Write::Put(n))
                && !model.stragglers.contains(&Write::Put(n)) =>
            {
                self.violation(format!(
                    "{path}: a read from {node} gave value {n} (version {version}), which is \
                     neither the last acknowledged write ({:?}) nor an unsettled one ({:?}, \
                     attempts of unknown outcome {:?})",
                    model.known, model.unsettled, model.stragglers
                ))
            }
            _ => {
                let model = &mut self.keys[key];
                model.known = Some((Some(version), Some(n)));
                model.unsettled.clear();
            }
        }
    }
}

/// Publishes small events to random nodes and records the acknowledged ones.
fn publisher(
    https: Vec<String>,
    findings: Arc<Findings>,
    stop: Arc<AtomicBool>,
    seed: u64,
) -> BTreeMap<(String, u64), String> {
    let agent = ureq::AgentBuilder::new().timeout(CLIENT_TIMEOUT).build();
    let mut rng = Rng(seed | 1);
    let mut acked = BTreeMap::new();
    let mut next = 0u64;
    while !stop.load(Ordering::SeqCst) {
        let batch = 1 + rng.below(4);
        let payloads: Vec<String> = (0..batch)
            .map(|_| {
                next += 1;
                format!("p{next}")
            })
            .collect();
        let events: Vec<Value> = payloads
            .iter()
            .map(|p| json!({"kind": "message", "topic": "soak", "payload": p}))
            .collect();
        let node = &https[rng.below(https.len() as u64) as usize];
        let req = agent
            .post(&format!("http://{node}/v1/broadcast"))
            .set("Content-Type", "application/json");
        match call(req, Some(&Value::Array(events).to_string())) {
            Reply::Answer(202, text) => {
                let v: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
                let origin = v["origin"].as_str().unwrap_or("").to_string();
                let seqs: Vec<u64> = v["seqs"]
                    .as_array()
                    .map(|a| a.iter().filter_map(Value::as_u64).collect())
                    .unwrap_or_default();
                if seqs.len() != payloads.len() || origin.is_empty() {
                    eprintln!("publish answered 202 without origin and seqs: {text}");
                }
                for (seq, p) in seqs.into_iter().zip(payloads) {
                    acked.insert((origin.clone(), seq), p);
                }
                findings.published.fetch_add(batch, Ordering::SeqCst);
            }
            _ => {
                findings.failed_publishes.fetch_add(1, Ordering::SeqCst);
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    acked
}

/// Polls every node's stripe table; the same stripe and epoch must always name
/// the same active (invariant 1, as the control plane tells it).
fn epoch_watch(
    https: Vec<String>,
    findings: Arc<Findings>,
    stop: Arc<AtomicBool>,
    started: Instant,
) {
    let agent = ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(1))
        .build();
    let mut seen: HashMap<(u64, u64), String> = HashMap::new();
    while !stop.load(Ordering::SeqCst) {
        for http in &https {
            let Ok(r) = agent
                .get(&format!("http://{http}/v1/cluster/stripes"))
                .call()
            else {
                continue;
            };
            let Ok(v) = r.into_json::<Value>() else {
                continue;
            };
            for s in v["stripes"].as_array().into_iter().flatten() {
                let (Some(id), Some(epoch), Some(active)) =
                    (s["id"].as_u64(), s["epoch"].as_u64(), s["active"].as_str())
                else {
                    continue;
                };
                let prev = seen
                    .entry((id, epoch))
                    .or_insert_with(|| active.to_string());
                if prev != active {
                    findings.violation(
                        started,
                        format!(
                            "stripe {id} epoch {epoch}: active {prev} and, on {http}, {active}"
                        ),
                    );
                    *prev = active.to_string();
                }
            }
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Why the cluster is not (yet) recovered, or `None` when it is: every node
/// answers, sees every node alive, sees every stripe with an active and every
/// member in sync, and all agree on each stripe's active and epoch.
fn not_recovered(nodes: &[Node], ids: &[String]) -> Option<String> {
    let mut first_view: Option<(String, Vec<(Value, Value)>)> = None;
    for n in nodes {
        let Some(members) = n.get("/v1/cluster/members") else {
            return Some(format!("{} does not answer", n.name));
        };
        let states = kiln_integration::member_rows_of(&members, "id").unwrap_or_default();
        for id in ids {
            let state = states
                .iter()
                .find(|(m, _)| m == id)
                .map(|(_, s)| s.as_str());
            if state != Some("alive") {
                let name = node_name(nodes, ids, id);
                return Some(format!("{} sees {name} as {state:?}", n.name));
            }
        }
        let Some(stripes) = n.get("/v1/cluster/stripes") else {
            return Some(format!("{} does not answer /v1/cluster/stripes", n.name));
        };
        let mut placed = 0;
        for s in stripes["stripes"].as_array().into_iter().flatten() {
            if s["active"].is_null() {
                return Some(format!(
                    "{} sees stripe {} without an active",
                    n.name, s["id"]
                ));
            }
            for m in s["members"].as_array().into_iter().flatten() {
                placed += 1;
                let role = m["role"].as_str().unwrap_or("");
                if role != "active" && role != "standby" {
                    let name = node_name(nodes, ids, m["id"].as_str().unwrap_or(""));
                    return Some(format!(
                        "{} sees {name} in stripe {} as {role}",
                        n.name, s["id"]
                    ));
                }
            }
        }
        if placed != nodes.len() {
            return Some(format!("{} sees {placed} stripe members", n.name));
        }
        // Every node's control-plane view current: a restarted node starts from
        // the state it stored, which may name an active that failed over.
        let view: Vec<(Value, Value)> = stripes["stripes"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|s| (s["active"].clone(), s["epoch"].clone()))
            .collect();
        match &first_view {
            None => first_view = Some((n.name.clone(), view)),
            Some((name, first)) if *first != view => {
                return Some(format!(
                    "{} and {name} disagree on the stripes' actives and epochs",
                    n.name
                ));
            }
            Some(_) => {}
        }
    }
    None
}

/// The time of day in UTC, `HH:MM:SS.mmm`, to find a fault in the nodes' logs.
fn utc_now() -> String {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    let s = (ms / 1000) % 86_400;
    format!(
        "{:02}:{:02}:{:02}.{:03}",
        s / 3600,
        s / 60 % 60,
        s % 60,
        ms % 1000
    )
}

fn node_name(nodes: &[Node], ids: &[String], id: &str) -> String {
    match ids.iter().position(|i| i == id) {
        Some(i) => nodes[i].name.clone(),
        None => id.to_string(),
    }
}

/// How long the cluster took to recover, and what it was waiting for on the
/// way ("[0.0 s] s1 sees s3 as \"suspect\"; [2.2 s] ..."); `Err` past `limit`.
fn wait_recovered(
    nodes: &[Node],
    ids: &[String],
    limit: Duration,
) -> Result<(Duration, String), String> {
    let t = Instant::now();
    let mut waits: Vec<String> = Vec::new();
    let mut last = String::new();
    while t.elapsed() < limit {
        match not_recovered(nodes, ids) {
            None => return Ok((t.elapsed(), waits.join("; "))),
            Some(why) => {
                if why != last {
                    waits.push(format!("[{:.1} s] {why}", t.elapsed().as_secs_f64()));
                    last = why;
                }
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Err(waits.join("; "))
}

/// Index of the node that is the active of some stripe, if one is known.
fn an_active(nodes: &[Node], ids: &[String], rng: &mut Rng) -> Option<usize> {
    let stripes = nodes.iter().find_map(|n| n.get("/v1/cluster/stripes"))?;
    let actives: Vec<usize> = stripes["stripes"]
        .as_array()?
        .iter()
        .filter_map(|s| s["active"].as_str())
        .filter_map(|a| ids.iter().position(|id| id == a))
        .collect();
    if actives.is_empty() {
        return None;
    }
    Some(actives[rng.below(actives.len() as u64) as usize])
}

/// What node `i` is, as the cluster sees it ("active of stripe 0,
/// control-plane leader"), for the fault lines.
fn roles(nodes: &[Node], ids: &[String], i: usize) -> String {
    let Some(v) = nodes.iter().find_map(|n| n.get("/v1/cluster/stripes")) else {
        return "roles unknown".into();
    };
    let mut roles = Vec::new();
    for s in v["stripes"].as_array().into_iter().flatten() {
        for m in s["members"].as_array().into_iter().flatten() {
            if m["id"].as_str() == Some(&ids[i]) {
                let role = m["role"].as_str().unwrap_or("?");
                roles.push(format!("{role} of stripe {}", s["id"]));
            }
        }
    }
    if v["leader"].as_str() == Some(&ids[i]) {
        roles.push("control-plane leader".into());
    }
    roles.join(", ")
}

/// The kinds of fault: all, or those `KILN_SOAK_FAULTS` names (comma-separated
/// of kill, stop, cut, pair, term).
fn fault_kinds() -> Vec<&'static str> {
    const ALL: [&str; 7] = ["kill", "kill", "stop", "cut", "cut", "pair", "term"];
    let wanted = std::env::var("KILN_SOAK_FAULTS").unwrap_or_default();
    let picked: Vec<&str> = ALL
        .into_iter()
        .filter(|k| wanted.split(',').any(|w| w.trim() == *k))
        .collect();
    if picked.is_empty() {
        ALL.to_vec()
    } else {
        picked
    }
}

/// Applies one fault and undoes it; returns its description.
fn fault(
    lab: &Lab,
    nodes: &mut [Node],
    ids: &[String],
    rng: &mut Rng,
    findings: &Findings,
) -> String {
    let kinds = fault_kinds();
    let kind = kinds[rng.below(kinds.len() as u64) as usize];
    let target = if rng.below(2) == 0 {
        an_active(nodes, ids, rng)
    } else {
        None
    }
    .unwrap_or_else(|| rng.below(nodes.len() as u64) as usize);
    let name = format!("{} ({})", nodes[target].name, roles(nodes, ids, target));
    findings.set_faulted(&[target]);
    // The target stays out of the steady writers' way until the cluster has
    // recovered (see the caller), as behind a balancer's health check.
    apply_fault(lab, nodes, ids, rng, findings, kind, target, name)
}

#[allow(clippy::too_many_arguments)]
fn apply_fault(
    lab: &Lab,
    nodes: &mut [Node],
    ids: &[String],
    rng: &mut Rng,
    findings: &Findings,
    kind: &str,
    target: usize,
    name: String,
) -> String {
    match kind {
        "kill" => {
            let down = rng.millis(500, 8000);
            nodes[target].kill9();
            std::thread::sleep(down);
            nodes[target].restart();
            format!("kill -9 {name}, restarted after {down:?}")
        }
        "stop" => {
            let paused = rng.millis(300, 6000);
            nodes[target].signal(libc::SIGSTOP);
            std::thread::sleep(paused);
            nodes[target].signal(libc::SIGCONT);
            format!("SIGSTOP {name} for {paused:?}")
        }
        "cut" => {
            let cut = rng.millis(1000, 10_000);
            if let Err(e) = lab.cut(target) {
                return format!("cut {name} failed: {e}");
            }
            std::thread::sleep(cut);
            if let Err(e) = lab.heal(target) {
                eprintln!("heal {name} failed: {e}");
            }
            format!("{name} cut off for {cut:?}")
        }
        "pair" => {
            let other = (target + 1 + rng.below(nodes.len() as u64 - 1) as usize) % nodes.len();
            let other_name = format!("{} ({})", nodes[other].name, roles(nodes, ids, other));
            findings.set_faulted(&[target, other]);
            let cut = rng.millis(1000, 10_000);
            if let Err(e) = lab.cut_between(target, other) {
                return format!("cut between {name} and {other_name} failed: {e}");
            }
            std::thread::sleep(cut);
            if let Err(e) = lab.heal_between(target, other) {
                eprintln!("heal between failed: {e}");
            }
            format!("{name} and {other_name} cut from each other for {cut:?}")
        }
        _ => {
            let code = nodes[target].terminate();
            std::thread::sleep(rng.millis(200, 3000));
            nodes[target].restart();
            format!("graceful stop of {name} (exit {code:?}), restarted")
        }
    }
}

/// Every key read from every node (`?stale=true`: the node's own copy where it
/// is a member of the key's stripe) must be the same.
fn compare_copies(nodes: &[Node], writers: usize, findings: &Findings, started: Instant) {
    let agent = ureq::AgentBuilder::new().timeout(CLIENT_TIMEOUT).build();
    for w in 0..writers {
        for k in 0..KEYS_PER_WRITER {
            let path = format!("/v1/kv/soak/w{w}-{k}");
            let mut copies: Vec<(String, Option<(String, String)>)> = Vec::new();
            for n in nodes {
                let got = match agent
                    .get(&format!("http://{}{path}?stale=true", n.http()))
                    .call()
                {
                    Ok(r) => {
                        let etag = r.header("ETag").unwrap_or("").to_string();
                        Some((etag, r.into_string().unwrap_or_default()))
                    }
                    Err(ureq::Error::Status(404, _)) => None,
                    Err(e) => Some(("error".into(), e.to_string())),
                };
                copies.push((n.name.clone(), got));
            }
            if copies.windows(2).any(|p| p[0].1 != p[1].1) {
                let summary: Vec<String> = copies
                    .iter()
                    .map(|(n, c)| {
                        format!("{n}: {:?}", c.as_ref().map(|(e, v)| (e, value_number(v))))
                    })
                    .collect();
                findings.violation(
                    started,
                    format!("{path}: copies differ: {}", summary.join(", ")),
                );
            }
        }
    }
}

/// The highest seq received per origin.
fn positions(events: &[kiln_integration::Streamed]) -> BTreeMap<String, u64> {
    let mut max: BTreeMap<String, u64> = BTreeMap::new();
    for e in events {
        if let (Some(o), Some(q)) = (e.event["origin"].as_str(), e.event["seq"].as_u64()) {
            let m = max.entry(o.to_string()).or_insert(0);
            *m = (*m).max(q);
        }
    }
    max
}

fn main() {
    let mut args = std::env::args().skip(1);
    let minutes: f64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(10.0);
    let seed: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
    });
    println!("soak: {NODES} nodes, {STRIPES} stripes, {minutes} min, seed {seed}");
    // SAFETY: the handler only stores to an atomic.
    unsafe {
        let handler = on_interrupt as extern "C" fn(libc::c_int);
        libc::signal(libc::SIGINT, handler as libc::sighandler_t);
        libc::signal(libc::SIGTERM, handler as libc::sighandler_t);
    }
    let lab = match Lab::new(NODES) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("soak: cannot build the network namespaces: {e} (run as root with iproute2 and nftables)");
            std::process::exit(2);
        }
    };
    let root = match tempfile::Builder::new().prefix("kiln-soak-").tempdir() {
        Ok(d) => d,
        Err(e) => {
            eprintln!("soak: cannot create a temporary directory: {e}");
            std::process::exit(2);
        }
    };
    let secret = "soak-secret".to_string();
    let mut nodes: Vec<Node> = Vec::new();
    for i in 0..NODES {
        let name = format!("s{i}");
        let dir = root.path().join(&name);
        if let Err(e) = std::fs::create_dir_all(&dir) {
            eprintln!("soak: cannot create {}: {e}", dir.display());
            std::process::exit(2);
        }
        let mut opts = NodeOpts {
            netns: Some(lab.namespace(i)),
            secret: Some(secret.clone()),
            ..Default::default()
        };
        if i == 0 {
            opts.extra = vec!["--stripes".into(), STRIPES.to_string()];
        } else {
            opts.seeds = vec![nodes[0].seed()];
        }
        nodes.push(Node::start_in(&name, &dir, lab.ip(i), opts));
        // One at a time, so that placement fills the stripes in turn.
        std::thread::sleep(Duration::from_millis(1500));
    }
    let ids: Vec<String> = nodes.iter().map(Node::id).collect();
    if let Err(why) = wait_recovered(&nodes, &ids, Duration::from_secs(120)) {
        eprintln!("soak: the cluster did not form: {why}");
        std::process::exit(2);
    }
    println!("cluster formed: {}", ids.join(", "));

    let started = Instant::now();
    let findings = Arc::new(Findings::default());
    let stop = Arc::new(AtomicBool::new(false));
    let https: Vec<String> = nodes.iter().map(Node::http).collect();
    let subscribers: Vec<Subscriber> = https
        .iter()
        .map(|h| Subscriber::follow(h.clone(), Some(String::new())))
        .collect();
    let writer_threads: Vec<_> = (0..WRITERS)
        .map(|id| {
            let keys = (0..KEYS_PER_WRITER).map(|_| KeyModel::default()).collect();
            let mut w = Writer::new(id, &https, &findings, started, &stop, keys);
            w.rng = Rng(seed.wrapping_add(id as u64 * 7919) | 1);
            w.steady = id < STEADY_WRITERS;
            std::thread::spawn(move || w.run())
        })
        .collect();
    let publisher_thread = {
        let (h, f, s) = (https.clone(), findings.clone(), stop.clone());
        std::thread::spawn(move || publisher(h, f, s, seed ^ 0xabcdef))
    };
    let watch_stop = Arc::new(AtomicBool::new(false));
    let watch_thread = {
        let (h, f, s) = (https.clone(), findings.clone(), watch_stop.clone());
        std::thread::spawn(move || epoch_watch(h, f, s, started))
    };

    let mut rng = Rng(seed | 1);
    let deadline = Duration::from_secs_f64(minutes * 60.0);
    let mut recoveries: Vec<f64> = Vec::new();
    let mut faults = 0;
    while started.elapsed() < deadline && !INTERRUPTED.load(Ordering::SeqCst) {
        std::thread::sleep(rng.millis(2000, 8000));
        let before = findings.acked_writes.load(Ordering::SeqCst);
        findings.fault_ack_gap_ms.store(0, Ordering::SeqCst);
        let what = fault(&lab, &mut nodes, &ids, &mut rng, &findings);
        faults += 1;
        let healed_at = utc_now();
        let recovered = wait_recovered(&nodes, &ids, RECOVERY_LIMIT);
        findings.set_faulted(&[]);
        match recovered {
            Ok((took, waits)) => {
                recoveries.push(took.as_secs_f64());
                // A steady write acknowledged after the recovery ends the last gap.
                let recovered_ms = started.elapsed().as_millis() as u64;
                let t = Instant::now();
                while findings.last_ack_ms.load(Ordering::SeqCst) <= recovered_ms
                    && t.elapsed() < Duration::from_secs(30)
                {
                    std::thread::sleep(Duration::from_millis(20));
                }
                println!(
                    "[{:>6.1}s] fault {faults}: {what}; over at {healed_at} UTC, recovered {:.1} s after; longest without a steady write acknowledged {:.1} s; writes acknowledged {} (+{}), unsettled {}, violations {}",
                    started.elapsed().as_secs_f64(),
                    took.as_secs_f64(),
                    findings.fault_ack_gap_ms.load(Ordering::SeqCst) as f64 / 1000.0,
                    findings.acked_writes.load(Ordering::SeqCst),
                    findings.acked_writes.load(Ordering::SeqCst) - before,
                    findings.unsettled_writes.load(Ordering::SeqCst),
                    findings.violations.lock().map(|v| v.len()).unwrap_or(0),
                );
                if took > Duration::from_secs(2) {
                    println!("           waited for: {waits}");
                }
            }
            Err(why) => {
                findings.violation(
                    started,
                    format!(
                        "not recovered {RECOVERY_LIMIT:?} after fault {faults} ({what}, over at {healed_at} UTC): {why}"
                    ),
                );
            }
        }
    }

    println!("faults over; settling");
    stop.store(true, Ordering::SeqCst);
    let models: Vec<Vec<KeyModel>> = writer_threads
        .into_iter()
        .map(|t| t.join().unwrap_or_default())
        .collect();
    let acked_events = publisher_thread.join().unwrap_or_default();
    if let Err(why) = wait_recovered(&nodes, &ids, RECOVERY_LIMIT) {
        findings.violation(started, format!("not recovered at the end: {why}"));
    }
    watch_stop.store(true, Ordering::SeqCst);
    let _ = watch_thread.join();

    // Final reads: each key once more, linearizable, through the writer's model.
    let mut unsettled_keys = 0;
    let mut settled_models: Vec<Vec<KeyModel>> = Vec::new();
    for (id, keys) in models.into_iter().enumerate() {
        unsettled_keys += keys.iter().filter(|k| !k.unsettled.is_empty()).count();
        let mut w = Writer::new(id, &https, &findings, started, &stop, keys);
        w.rng = Rng(seed ^ id as u64 | 1);
        for k in 0..KEYS_PER_WRITER {
            w.read(k);
        }
        settled_models.push(w.keys);
    }
    compare_copies(&nodes, WRITERS, &findings, started);

    // Every subscriber reaches the same positions, then every stream is checked.
    let want = |subs: &[Subscriber]| -> BTreeMap<String, u64> {
        let mut max: BTreeMap<String, u64> = BTreeMap::new();
        for s in subs {
            for (o, q) in positions(&s.snapshot()) {
                let m = max.entry(o).or_insert(0);
                *m = (*m).max(q);
            }
        }
        for (o, q) in acked_events.keys() {
            let m = max.entry(o.clone()).or_insert(0);
            *m = (*m).max(*q);
        }
        max
    };
    let t = Instant::now();
    let mut behind = String::new();
    while t.elapsed() < RECOVERY_LIMIT {
        let target = want(&subscribers);
        behind = String::new();
        for (i, s) in subscribers.iter().enumerate() {
            let reached = positions(&s.snapshot());
            for (o, q) in &target {
                let r = reached.get(o).copied().unwrap_or(0);
                if r < *q && behind.is_empty() {
                    behind = format!("subscriber on s{i} at {o} {r} of {q}");
                }
            }
        }
        if behind.is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    if !behind.is_empty() {
        findings.violation(started, format!("subscribers did not catch up: {behind}"));
    }
    let mut first_seen: HashMap<(String, u64), String> = HashMap::new();
    let mut delivered = 0usize;
    for (i, s) in subscribers.iter().enumerate() {
        let events = s.snapshot();
        delivered += events.len();
        if let Err(e) = check_stream(&events) {
            findings.violation(started, format!("subscriber on s{i}: {e}"));
        }
        let mut payloads: HashMap<(String, u64), String> = HashMap::new();
        for e in &events {
            let (Some(o), Some(q)) = (e.event["origin"].as_str(), e.event["seq"].as_u64()) else {
                continue;
            };
            let key = (o.to_string(), q);
            let text = e.event.to_string();
            if let Some(p) = e.event["payload"].as_str() {
                payloads.insert(key.clone(), p.to_string());
            }
            match first_seen.get(&key) {
                Some(prev) if *prev != text => findings.violation(
                    started,
                    format!("{o} seq {q}: subscriber on s{i} got {text}, another got {prev}"),
                ),
                Some(_) => {}
                None => {
                    first_seen.insert(key, text);
                }
            }
        }
        for ((o, q), p) in &acked_events {
            match payloads.get(&(o.clone(), *q)) {
                Some(got) if got == p => {}
                got => findings.violation(
                    started,
                    format!("subscriber on s{i}: published {o} seq {q} ({p}) arrived as {got:?}"),
                ),
            }
        }
    }
    // Invariant 3: writes applied once each, counted by their change events.
    let mut changes: HashMap<String, u64> = HashMap::new();
    for e in subscribers[0].snapshot() {
        let ev = &e.event;
        if ev["kind"] == "change" && ev["server"] == "kv" && ev["table"] == "soak" {
            if let Some(key) = ev["pks"][0][0].as_str() {
                *changes.entry(key.to_string()).or_insert(0) += 1;
            }
        }
    }
    for (w, keys) in settled_models.iter().enumerate() {
        for (k, model) in keys.iter().enumerate() {
            let key = format!("w{w}-{k}");
            let got = changes.get(&key).copied().unwrap_or(0);
            let most = model.acked + model.ever_unsettled;
            if got < model.acked || got > most {
                findings.violation(
                    started,
                    format!(
                        "soak/{key}: {got} change events for {} acknowledged writes and {} \
                         with an unknown outcome",
                        model.acked, model.ever_unsettled
                    ),
                );
            }
        }
    }
    drop(subscribers);

    let violations = findings
        .violations
        .lock()
        .map(|v| v.clone())
        .unwrap_or_default();
    recoveries.sort_by(f64::total_cmp);
    let median = recoveries.get(recoveries.len() / 2).copied().unwrap_or(0.0);
    let max = recoveries.last().copied().unwrap_or(0.0);
    println!("--- soak summary (seed {seed}) ---");
    println!(
        "{} s, {faults} faults; recovery median {median:.1} s, max {max:.1} s",
        started.elapsed().as_secs()
    );
    println!(
        "writes acknowledged {}, retried attempts {}, unsettled {} (keys still unsettled {unsettled_keys}); longest time without a steady writer's write acknowledged {:.1} s",
        findings.acked_writes.load(Ordering::SeqCst),
        findings.retried_writes.load(Ordering::SeqCst),
        findings.unsettled_writes.load(Ordering::SeqCst),
        findings.longest_ack_gap_ms.load(Ordering::SeqCst) as f64 / 1000.0,
    );
    println!(
        "reads {} (failed {}); events published {} (failed publishes {}), {} messages delivered to {NODES} subscribers",
        findings.reads.load(Ordering::SeqCst),
        findings.failed_reads.load(Ordering::SeqCst),
        findings.published.load(Ordering::SeqCst),
        findings.failed_publishes.load(Ordering::SeqCst),
        delivered,
    );
    println!("violations: {}", violations.len());
    for v in &violations {
        println!("  {v}");
    }
    drop(nodes);
    if !violations.is_empty() || std::env::var_os("KILN_SOAK_KEEP").is_some() {
        let kept = root.keep();
        println!("data directories and logs kept in {}", kept.display());
        if !violations.is_empty() {
            std::process::exit(1);
        }
    }
}
