//! Per-origin ordering and repair of databroadcast events, as a plain state
//! machine: events in (gossip, fetched, published, imported), effects out
//! (append to the log, fetch from a peer, skip a hole). No I/O, no clock.
//!
//! For every origin the node appends events strictly in seq order. An event ahead
//! of the next expected one waits in a bounded buffer; a gap that lasts longer
//! than `gap_grace_ms`, or an origin whose head (learnt from any peer's heads
//! digest) is ahead of what the node holds, is fetched from a peer that holds it.

use std::collections::{BTreeMap, HashMap};

use kiln_net::wire::{EventFrame, OriginHead};
use kiln_net::PeerId;
use kiln_persistence::OriginRun;

#[derive(Debug, Clone)]
pub struct RepairConfig {
    /// How long a gap may wait for late gossip before it is fetched.
    pub gap_grace_ms: u64,
    /// How long a fetch may take before another peer is asked.
    pub fetch_timeout_ms: u64,
    /// After a fetch that brought nothing, how long before the next one.
    pub retry_after_ms: u64,
    /// Events, and bytes of their bodies, held ahead of a gap, per origin;
    /// later ones are dropped and fetched once the gap is filled.
    pub max_pending: usize,
    pub max_pending_bytes: u64,
}

impl Default for RepairConfig {
    fn default() -> Self {
        RepairConfig {
            gap_grace_ms: 100,
            fetch_timeout_ms: 3_000,
            retry_after_ms: 500,
            max_pending: 100_000,
            max_pending_bytes: 64 << 20,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Fetching {
    peer: PeerId,
    from: u64,
    since_ms: u64,
}

#[derive(Debug, Default)]
struct OriginLog {
    /// First seq held in the log.
    first: u64,
    /// Last seq appended to the log (0: none yet).
    stored: u64,
    /// Next seq to hand to an append (above `stored` while appends are running).
    next: u64,
    pending: BTreeMap<u64, EventFrame>,
    /// Bytes of the bodies in `pending`.
    pending_bytes: u64,
    /// Highest seq known to exist, and a peer that holds it.
    head: u64,
    holder: Option<PeerId>,
    /// Since when events are known to be missing (a gap or a head ahead).
    missing_since: Option<u64>,
    fetching: Option<Fetching>,
    /// No fetch before this time (after one that brought nothing).
    quiet_until: u64,
    /// A peer said the events this node misses are gone from its log: who,
    /// since when, and the first seq it still holds. A hole is skipped on the
    /// origin's word, or a second peer's, or the same peer's again after
    /// [`HOLE_CONFIRM_MS`] with nobody else holding it; and only up to what the
    /// first reporter still holds (a peer with a longer retention may hold
    /// more than the second).
    hole_report: Option<(PeerId, u64, u64)>,
    /// Repairs that brought events of this (node) origin with no gossip from the
    /// origin itself in between: its gossip stream to this node may be dead.
    silent_repairs: u32,
    /// The node this origin is (`None` for a stripe's), parsed once.
    node: Option<PeerId>,
}

/// What the actor must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// Append these consecutive events of `origin` (the first is the next seq).
    Append {
        origin: String,
        events: Vec<EventFrame>,
    },
    /// Ask `peer` for the events of `origin` from `from` on.
    Fetch {
        peer: PeerId,
        origin: String,
        from: u64,
    },
    /// The events of `origin` before `first` are gone everywhere we asked:
    /// continue the log at `first` (subscribers behind it get a `resync`).
    SkipTo { origin: String, first: u64 },
    /// The events of the node `peer` have reached this node only by repair for
    /// [`SILENT_REPAIRS_MAX`] repairs in a row (each up to the head then known):
    /// close the connection to it, so that the next one starts with fresh
    /// gossip streams.
    Reconnect { peer: PeerId },
}

/// Repairs of a node's events in a row, with none of its gossip arriving in
/// between, after which its gossip stream to this node is taken for dead. Gossip
/// that is only late (a busy node) arrives between repairs and resets the count.
pub const SILENT_REPAIRS_MAX: u32 = 3;

/// How long one peer's word that events are gone waits for another peer that
/// still holds them (a peer with a shorter retention, or one that joined later).
pub const HOLE_CONFIRM_MS: u64 = 2_000;

/// The highest seq a peer may name. No origin gets near it (2^62 events at a
/// million a second take 146 000 years), so a peer's numbers never make seq
/// arithmetic overflow; anything above is dropped as malformed.
pub const MAX_SEQ: u64 = 1 << 62;

/// Whether a peer may name `origin`: a node's peer id in its canonical form, or
/// `stripe:<k>`. Any other name is refused: origins are listed in every
/// subscriber's resume token (`origin=seq,...`), and every name a peer made up
/// would take a log, memory and a metric label on every node.
pub fn is_origin(origin: &str) -> bool {
    match origin.strip_prefix("stripe:") {
        Some(k) => k.parse::<u32>().is_ok_and(|n| n.to_string() == k),
        None => node_of(origin).is_some_and(|p| p.to_string() == origin),
    }
}

#[derive(Debug, Default)]
pub struct Origins {
    config: RepairConfig,
    logs: HashMap<String, OriginLog>,
}

/// How much of an origin this node holds and knows of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OriginStatus {
    pub first: u64,
    pub stored: u64,
    pub head: u64,
}

impl Origins {
    /// Starts from the runs held in the log: `(origin, first, last)`.
    pub fn new(config: RepairConfig, runs: impl IntoIterator<Item = (String, u64, u64)>) -> Self {
        let logs = runs
            .into_iter()
            .map(|(origin, first, last)| {
                let log = OriginLog {
                    first,
                    stored: last,
                    next: last + 1,
                    head: last,
                    node: node_of(&origin),
                    ..Default::default()
                };
                (origin, log)
            })
            .collect();
        Origins { config, logs }
    }

    fn log(&mut self, origin: &str) -> &mut OriginLog {
        // Called for every gossip message: no key allocated for a known origin.
        if !self.logs.contains_key(origin) {
            let log = OriginLog {
                first: 1,
                next: 1,
                node: node_of(origin),
                ..Default::default()
            };
            self.logs.insert(origin.to_string(), log);
        }
        self.logs
            .get_mut(origin)
            .expect("the origin's log was inserted above")
    }

    pub fn status(&self, origin: &str) -> Option<OriginStatus> {
        self.logs.get(origin).map(|l| OriginStatus {
            first: l.first,
            stored: l.stored,
            head: l.head,
        })
    }

    /// What this node holds of every origin, for its heads digest.
    pub fn heads(&self) -> Vec<OriginHead> {
        let mut out: Vec<OriginHead> = self
            .logs
            .iter()
            .filter(|(_, l)| l.stored > 0)
            .map(|(origin, l)| OriginHead {
                origin: origin.clone(),
                first: l.first,
                last: l.stored,
            })
            .collect();
        out.sort_by(|a, b| a.origin.cmp(&b.origin));
        out
    }

    /// How far every origin has been handed on to subscribers: `(origin, first,
    /// last)`. Events of other origins are handed on as soon as they are in
    /// order; `own` (numbered here before its append) once it is stored.
    pub fn handed_on(&self, own: &str) -> Vec<(String, u64, u64)> {
        self.logs
            .iter()
            .map(|(origin, l)| {
                let last = if origin == own { l.stored } else { l.next - 1 };
                (origin.clone(), l.first, last)
            })
            .filter(|(_, _, last)| *last > 0)
            .collect()
    }

    /// The next seq of an origin this node numbers itself (its own events):
    /// reserves `n` seqs and returns the first.
    pub fn reserve(&mut self, origin: &str, n: u64) -> u64 {
        let log = self.log(origin);
        let first = log.next;
        log.next += n;
        log.head = log.head.max(log.next - 1);
        first
    }

    /// Events of `origin` arrived (from gossip when `source` is set, else
    /// imported locally). Returns what to append now.
    pub fn receive(
        &mut self,
        origin: &str,
        events: Vec<EventFrame>,
        source: Option<PeerId>,
        now_ms: u64,
    ) -> Vec<Effect> {
        let (max_pending, max_bytes) = (self.config.max_pending, self.config.max_pending_bytes);
        // Checked once, before an origin gets a log.
        if !self.logs.contains_key(origin) && !is_origin(origin) {
            return Vec::new();
        }
        let log = self.log(origin);
        if source.is_some() && source == log.node {
            log.silent_repairs = 0;
        }
        let mut ready = Vec::new();
        let take_held = |log: &mut OriginLog, ready: &mut Vec<EventFrame>| {
            while let Some(ev) = log.pending.remove(&log.next) {
                log.pending_bytes = log.pending_bytes.saturating_sub(ev.body.len() as u64);
                ready.push(ev);
                log.next += 1;
            }
        };
        take_held(log, &mut ready);
        for ev in events {
            if ev.seq < log.next || ev.seq > MAX_SEQ {
                continue;
            }
            if ev.seq > log.head {
                log.head = ev.seq;
                if source.is_some() {
                    log.holder = source;
                }
            }
            if ev.seq == log.next {
                // Taken at once, whatever the bound, and so is what it frees:
                // a fetched run fills its gap in one answer even while the
                // events held beyond the gap are at the bound.
                ready.push(ev);
                log.next += 1;
                take_held(log, &mut ready);
                continue;
            }
            let size = ev.body.len() as u64;
            let room = log.pending.len() < max_pending && log.pending_bytes + size <= max_bytes;
            if room {
                if let std::collections::btree_map::Entry::Vacant(slot) = log.pending.entry(ev.seq)
                {
                    log.pending_bytes += size;
                    slot.insert(ev);
                }
            }
        }
        if log.next <= log.head {
            log.missing_since.get_or_insert(now_ms);
        } else {
            log.missing_since = None;
        }
        if ready.is_empty() {
            Vec::new()
        } else {
            // What a peer called gone arrived after all: its word is void.
            log.hole_report = None;
            vec![Effect::Append {
                origin: origin.to_string(),
                events: ready,
            }]
        }
    }

    /// A peer's digest: where its log of every origin ends.
    pub fn peer_heads(&mut self, peer: PeerId, heads: &[OriginHead], now_ms: u64) {
        for h in heads {
            if h.last > MAX_SEQ || (!self.logs.contains_key(&h.origin) && !is_origin(&h.origin)) {
                continue;
            }
            let log = self.log(&h.origin);
            let holds_missing = h.first <= log.next && h.last >= log.next;
            if h.last > log.head
                || (h.last >= log.next && log.holder.is_none())
                || (holds_missing && log.hole_report.is_some_and(|(p, _, _)| p != peer))
            {
                log.head = log.head.max(h.last);
                log.holder = Some(peer);
            }
            if log.next <= log.head {
                log.missing_since.get_or_insert(now_ms);
            }
        }
    }

    /// A fetch was answered: the peer holds `first..=last` of the origin and sent
    /// `events` (from the seq asked for).
    pub fn fetched(
        &mut self,
        peer: PeerId,
        origin: &str,
        first: u64,
        last: u64,
        events: Vec<EventFrame>,
        now_ms: u64,
    ) -> Vec<Effect> {
        let retry = self.config.retry_after_ms;
        if first > MAX_SEQ || last > MAX_SEQ {
            self.fetch_failed(peer, origin, now_ms);
            return Vec::new();
        }
        let log = self.log(origin);
        // A late answer to an earlier fetch does not end the current one.
        let asked = if log.fetching.as_ref().is_some_and(|f| f.peer == peer) {
            log.fetching.take()
        } else {
            None
        };
        let mut out = Vec::new();
        if last > log.head {
            log.head = last;
            log.holder = Some(peer);
        }
        if first > log.next && events.first().is_none_or(|e| e.seq == first) {
            // The peer no longer holds what we miss. Another peer may (a shorter
            // retention, a later join): skip only on the origin's word, a second
            // peer's, or this peer's again once nobody else had it for a while.
            let confirmed = log.node == Some(peer)
                || log.hole_report.is_some_and(|(p, since, _)| {
                    p != peer || now_ms.saturating_sub(since) >= HOLE_CONFIRM_MS
                });
            if confirmed {
                // Not past what another reporter still holds: it is fetched
                // from there next.
                let first = match log.hole_report.take() {
                    Some((p, _, held)) if p != peer && held < first => {
                        log.holder = Some(p);
                        held
                    }
                    _ => first,
                };
                if first > log.next {
                    out.push(Effect::SkipTo {
                        origin: origin.to_string(),
                        first,
                    });
                    log.next = first;
                    log.stored = log.stored.max(first - 1);
                    log.first = log.first.max(first);
                    log.pending.retain(|s, _| *s >= first);
                    log.pending_bytes = log.pending.values().map(|e| e.body.len() as u64).sum();
                }
            } else {
                log.hole_report.get_or_insert((peer, now_ms, first));
                if log.holder == Some(peer) {
                    log.holder = None;
                }
                log.quiet_until = now_ms + retry;
            }
        }
        if events.is_empty() && asked.is_some() && log.next <= log.head && last < log.next {
            // This peer does not have what we miss after all: ask someone else,
            // in a while (nobody may have it yet).
            if log.holder == Some(peer) {
                log.holder = None;
            }
            log.quiet_until = now_ms + retry;
        }
        let brought = !events.is_empty();
        out.extend(self.receive(origin, events, None, now_ms));
        // A repair counts once it has caught up with everything known: the
        // batches of a long catch-up (a node that joins, or comes back) are one.
        let log = self.log(origin);
        if brought && log.next > log.head {
            if let Some(node) = log.node {
                log.silent_repairs += 1;
                if log.silent_repairs >= SILENT_REPAIRS_MAX {
                    log.silent_repairs = 0;
                    out.push(Effect::Reconnect { peer: node });
                }
            }
        }
        out.extend(self.fetch_if_missing(origin, now_ms, true));
        out
    }

    /// A fetch failed (peer gone, timeout, refused): ask another holder later.
    pub fn fetch_failed(&mut self, peer: PeerId, origin: &str, now_ms: u64) {
        let retry = self.config.retry_after_ms;
        let log = self.log(origin);
        if log.fetching.as_ref().is_some_and(|f| f.peer == peer) {
            log.fetching = None;
            log.quiet_until = now_ms + retry;
        }
        if log.holder == Some(peer) {
            log.holder = None;
        }
    }

    /// The next seq of `origin` this node will append.
    pub fn next(&mut self, origin: &str) -> u64 {
        self.log(origin).next
    }

    /// The log was opened again after a storage error and holds `runs` (what
    /// was appended since its last durable commit may be gone): every origin
    /// goes on from what it holds, and what is missing now is fetched again.
    /// Events still waiting behind a gap stay.
    pub fn reload(&mut self, runs: &HashMap<String, OriginRun>, now_ms: u64) {
        for (origin, log) in self.logs.iter_mut() {
            let run = runs.get(origin).copied().unwrap_or(OriginRun {
                first: 1,
                ..Default::default()
            });
            log.first = run.first;
            log.stored = run.last;
            log.next = run.last + 1;
            log.pending.retain(|s, _| *s > run.last);
            log.pending_bytes = log.pending.values().map(|e| e.body.len() as u64).sum();
            if log.next <= log.head {
                log.missing_since.get_or_insert(now_ms);
            }
        }
    }

    /// An append failed: what was handed to it is to be had again.
    pub fn rollback(&mut self, origin: &str) {
        let log = self.log(origin);
        log.next = log.stored + 1;
    }

    /// This node's own seqs reserved beyond what its log holds were never
    /// given out (their append failed, or the log was read again): they are
    /// not missing events to fetch.
    pub fn unreserve(&mut self, own: &str) {
        let log = self.log(own);
        log.next = log.stored + 1;
        log.head = log.stored;
        log.missing_since = None;
    }

    /// Gives up on `origin`'s events before `first` (this node's own, which
    /// it could not fetch back): the log continues at `first`.
    pub fn skip_before(&mut self, origin: &str, first: u64) -> Vec<Effect> {
        let log = self.log(origin);
        if log.next >= first {
            return Vec::new();
        }
        log.next = first;
        log.stored = log.stored.max(first - 1);
        log.first = log.first.max(first);
        log.head = log.head.max(first - 1);
        log.fetching = None;
        log.missing_since = None;
        log.pending.retain(|s, _| *s >= first);
        log.pending_bytes = log.pending.values().map(|e| e.body.len() as u64).sum();
        vec![Effect::SkipTo {
            origin: origin.to_string(),
            first,
        }]
    }

    /// Retention removed the events before `first`.
    pub fn pruned(&mut self, origin: &str, first: u64) {
        let log = self.log(origin);
        log.first = log.first.max(first);
    }

    pub fn origin_names(&self) -> Vec<String> {
        self.logs.keys().cloned().collect()
    }

    /// Appended to the log up to `upto`.
    pub fn appended(&mut self, origin: &str, upto: u64) {
        let log = self.log(origin);
        log.stored = log.stored.max(upto);
    }

    /// Fetches what has been missing long enough; retries timed-out fetches.
    /// `peers` are candidates when no holder is known (any peer may hold it).
    pub fn tick(&mut self, now_ms: u64, peers: &[PeerId]) -> Vec<Effect> {
        let timeout = self.config.fetch_timeout_ms;
        let origins: Vec<String> = self.logs.keys().cloned().collect();
        let mut out = Vec::new();
        for (i, origin) in origins.iter().enumerate() {
            let log = self.log(origin);
            if let Some(f) = &log.fetching {
                if now_ms.saturating_sub(f.since_ms) >= timeout {
                    if log.holder == Some(f.peer) {
                        log.holder = None;
                    }
                    log.fetching = None;
                }
            }
            if log.holder.is_none() && log.next <= log.head && !peers.is_empty() {
                // Spread the guesses over the peers.
                log.holder = Some(peers[(now_ms as usize / 100 + i) % peers.len()]);
            }
            out.extend(self.fetch_if_missing(origin, now_ms, false));
        }
        out
    }

    fn fetch_if_missing(&mut self, origin: &str, now_ms: u64, at_once: bool) -> Vec<Effect> {
        let grace = self.config.gap_grace_ms;
        let log = self.log(origin);
        if log.fetching.is_some() || log.next > log.head {
            if log.next > log.head {
                log.missing_since = None;
            }
            return Vec::new();
        }
        let since = *log.missing_since.get_or_insert(now_ms);
        if (!at_once && now_ms.saturating_sub(since) < grace) || now_ms < log.quiet_until {
            return Vec::new();
        }
        let Some(peer) = log.holder else {
            return Vec::new();
        };
        log.fetching = Some(Fetching {
            peer,
            from: log.next,
            since_ms: now_ms,
        });
        vec![Effect::Fetch {
            peer,
            origin: origin.to_string(),
            from: log.next,
        }]
    }
}

/// The node an origin names, if it is a node's own (not a stripe's).
fn node_of(origin: &str) -> Option<PeerId> {
    origin.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An origin the tests' events come from.
    const A: &str = "stripe:9";

    fn ev(seq: u64) -> EventFrame {
        EventFrame {
            seq,
            ts: seq,
            body: serde_bytes::ByteBuf::from(vec![seq as u8]),
        }
    }

    /// A heads digest: the peer holds `A`'s events `first..=60`.
    fn head_from(first: u64) -> [OriginHead; 1] {
        [OriginHead {
            origin: A.into(),
            first,
            last: 60,
        }]
    }

    fn seqs(effects: &[Effect]) -> Vec<u64> {
        effects
            .iter()
            .flat_map(|e| match e {
                Effect::Append { events, .. } => events.iter().map(|e| e.seq).collect(),
                _ => Vec::new(),
            })
            .collect()
    }

    #[test]
    fn in_order_duplicates_and_reordering() {
        let p = PeerId::random();
        let mut o = Origins::default();
        assert_eq!(
            seqs(&o.receive(A, vec![ev(1), ev(2)], Some(p), 0)),
            vec![1, 2]
        );
        assert!(o.receive(A, vec![ev(2)], Some(p), 0).is_empty());
        assert!(o.receive(A, vec![ev(4)], Some(p), 0).is_empty());
        // Within the grace period nothing is fetched; late gossip fills the gap.
        assert!(o.tick(50, &[p]).is_empty());
        assert_eq!(seqs(&o.receive(A, vec![ev(3)], Some(p), 60)), vec![3, 4]);
        assert!(o.tick(500, &[p]).is_empty());
    }

    #[test]
    fn events_ahead_of_a_gap_are_held_up_to_a_byte_bound() {
        let p = PeerId::random();
        let config = RepairConfig {
            max_pending_bytes: 10,
            ..RepairConfig::default()
        };
        let mut o = Origins::new(config, []);
        let big = |seq: u64| EventFrame {
            body: serde_bytes::ByteBuf::from(vec![0u8; 4]),
            ..ev(seq)
        };
        // 2 and 3 fit in 10 bytes; 4 does not, and is left to a fetch.
        assert!(o
            .receive(A, vec![big(2), big(3), big(4)], Some(p), 0)
            .is_empty());
        // The next seq is always taken, whatever the bound.
        assert_eq!(seqs(&o.receive(A, vec![big(1)], Some(p), 0)), vec![1, 2, 3]);
        // Handed on, they no longer count: 4 is held now (and 5 after it).
        assert!(o.receive(A, vec![big(5)], Some(p), 0).is_empty());
        assert_eq!(seqs(&o.receive(A, vec![big(4)], Some(p), 0)), vec![4, 5]);
    }

    #[test]
    fn a_fetched_run_fills_its_gap_at_once_while_the_held_events_are_at_the_bound() {
        let p = PeerId::random();
        let config = RepairConfig {
            max_pending: 2,
            ..RepairConfig::default()
        };
        let mut o = Origins::new(config, []);
        // 1 arrived; 101 and 102 are held beyond the gap, and fill the bound.
        o.receive(A, vec![ev(1), ev(101), ev(102), ev(103)], Some(p), 0);
        // The answer to the fetch of 2..: the whole gap, and what it frees.
        let fx = o.fetched(p, A, 1, 103, (2..=100).map(ev).collect(), 200);
        assert_eq!(seqs(&fx), (2..=102).collect::<Vec<_>>());
    }

    #[test]
    fn a_lasting_gap_is_fetched_and_retried_elsewhere() {
        let (p, q) = (PeerId::random(), PeerId::random());
        let mut o = Origins::default();
        o.receive(A, vec![ev(1), ev(5)], Some(p), 0);
        let f = o.tick(200, &[p, q]);
        assert_eq!(
            f,
            vec![Effect::Fetch {
                peer: p,
                origin: A.into(),
                from: 2
            }]
        );
        // No second fetch while one is running; the timeout moves on.
        assert!(o.tick(300, &[p, q]).is_empty());
        let f = o.tick(200 + 3_000, &[q]);
        assert!(matches!(&f[..], [Effect::Fetch { peer, from: 2, .. }] if *peer == q));
        let out = o.fetched(q, A, 1, 5, vec![ev(2), ev(3), ev(4), ev(5)], 3_300);
        assert_eq!(seqs(&out), vec![2, 3, 4, 5]);
        o.appended(A, 5);
        assert_eq!(o.status(A).unwrap().stored, 5);
    }

    /// Heads from `holder` say `origin` reached `last`; a tick fetches the rest
    /// and `holder` answers with it.
    fn repair(o: &mut Origins, holder: PeerId, origin: &str, last: u64, now: u64) -> Vec<Effect> {
        let from = o.next(origin);
        let heads = [OriginHead {
            origin: origin.into(),
            first: 1,
            last,
        }];
        o.peer_heads(holder, &heads, now);
        let f = o.tick(now + 200, &[holder]);
        assert!(matches!(&f[..], [Effect::Fetch { from: f, .. }] if *f == from));
        let events = (from..=last).map(ev).collect();
        o.fetched(holder, origin, 1, last, events, now + 210)
    }

    fn reconnects(effects: &[Effect]) -> Vec<PeerId> {
        effects
            .iter()
            .filter_map(|e| match e {
                Effect::Reconnect { peer } => Some(*peer),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_node_whose_events_only_come_by_repair_is_reconnected() {
        let (node, holder) = (PeerId::random(), PeerId::random());
        let origin = node.to_string();
        let mut o = Origins::default();
        o.receive(&origin, vec![ev(1)], Some(node), 0);
        for i in 1..SILENT_REPAIRS_MAX {
            let out = repair(
                &mut o,
                holder,
                &origin,
                1 + 2 * u64::from(i),
                1_000 * u64::from(i),
            );
            assert!(reconnects(&out).is_empty(), "repair {i}");
        }
        let out = repair(&mut o, holder, &origin, 20, 10_000);
        assert_eq!(reconnects(&out), vec![node]);

        // Gossip from the node between repairs: it is only late, not cut off.
        for i in 0..2 * SILENT_REPAIRS_MAX {
            let next = o.next(&origin);
            o.receive(
                &origin,
                vec![ev(next)],
                Some(node),
                20_000 + u64::from(i) * 1_000,
            );
            let out = repair(
                &mut o,
                holder,
                &origin,
                next + 3,
                20_500 + u64::from(i) * 1_000,
            );
            assert!(reconnects(&out).is_empty());
        }
        // A catch-up in many batches (a node joining a busy cluster) is one repair.
        let mut o = Origins::default();
        let holder = PeerId::random();
        o.receive(&origin, vec![ev(1)], Some(node), 0);
        let heads = [OriginHead {
            origin: origin.clone(),
            first: 1,
            last: 100,
        }];
        o.peer_heads(holder, &heads, 0);
        let mut from = 2;
        let mut now = 200;
        let mut all = Vec::new();
        while from <= 100 {
            if from == 2 {
                assert!(matches!(
                    &o.tick(now, &[holder])[..],
                    [Effect::Fetch { .. }]
                ));
            }
            let to = (from + 9).min(100);
            let out = o.fetched(holder, &origin, 1, 100, (from..=to).map(ev).collect(), now);
            all.extend(reconnects(&out));
            from = to + 1;
            now += 10;
        }
        assert!(all.is_empty());
        assert_eq!(o.next(&origin), 101);

        // A stripe's events are gossiped by its active, never by "the origin".
        for i in 0..2 * SILENT_REPAIRS_MAX {
            let out = repair(
                &mut o,
                holder,
                "stripe:0",
                2 + u64::from(i),
                40_000 + u64::from(i) * 1_000,
            );
            assert!(reconnects(&out).is_empty());
        }
    }

    #[test]
    fn heads_reveal_a_missed_tail() {
        let p = PeerId::random();
        let mut o = Origins::default();
        o.receive(A, vec![ev(1)], Some(p), 0);
        o.appended(A, 1);
        let q = PeerId::random();
        o.peer_heads(
            q,
            &[OriginHead {
                origin: A.into(),
                first: 1,
                last: 3,
            }],
            1_000,
        );
        let f = o.tick(1_200, &[p, q]);
        assert!(matches!(&f[..], [Effect::Fetch { peer, from: 2, .. }] if *peer == q));
    }

    #[test]
    fn a_reloaded_log_goes_on_from_what_it_holds_and_fetches_the_rest() {
        let p = PeerId::random();
        let mut o = Origins::default();
        let out = o.receive(A, (1..=10).map(ev).collect(), Some(p), 0);
        assert_eq!(seqs(&out), (1..=10).collect::<Vec<_>>());
        o.appended(A, 10);
        // 12 waits behind a gap at 11; the file went back to its durable 1..=4.
        assert!(o.receive(A, vec![ev(12)], Some(p), 0).is_empty());
        let runs = HashMap::from([(
            A.to_string(),
            OriginRun {
                first: 1,
                last: 4,
                count: 4,
                bytes: 4,
            },
        )]);
        o.reload(&runs, 100);
        let s = o.status(A).expect("known");
        assert_eq!((s.first, s.stored, s.head), (1, 4, 12));
        let f = o.tick(1_000, &[p]);
        assert!(matches!(&f[..], [Effect::Fetch { from: 5, .. }]), "{f:?}");
        // The fetch brings 5..=11; 12 was kept.
        let out = o.fetched(p, A, 1, 11, (5..=11).map(ev).collect(), 1_100);
        assert_eq!(seqs(&out), (5..=12).collect::<Vec<_>>());
        // An origin the file lost whole starts again at 1.
        o.receive("b", (1..=3).map(ev).collect(), Some(p), 0);
        o.appended("b", 3);
        o.reload(&runs, 2_000);
        assert_eq!(o.status("b").map(|s| (s.first, s.stored)), Some((1, 0)));
        assert_eq!(o.next("b"), 1);
        // Own seqs reserved for an append that failed are not fetched.
        o.appended("me", 0);
        assert_eq!(o.reserve("me", 5), 1);
        o.unreserve("me");
        assert_eq!(o.status("me").map(|s| (s.stored, s.head)), Some((0, 0)));
        assert!(!o
            .tick(3_000, &[p])
            .iter()
            .any(|e| matches!(e, Effect::Fetch { origin, .. } if origin == "me")));
        assert_eq!(o.reserve("me", 2), 1);
    }

    #[test]
    fn a_hole_beyond_retention_is_skipped() {
        let p = PeerId::random();
        let mut o = Origins::default();
        o.peer_heads(
            p,
            &[OriginHead {
                origin: A.into(),
                first: 50,
                last: 60,
            }],
            0,
        );
        let f = o.tick(500, &[p]);
        assert!(matches!(&f[..], [Effect::Fetch { from: 1, .. }]));
        // One peer's word is not enough: another may still hold 1..50.
        let out = o.fetched(p, A, 50, 60, (50..=60).map(ev).collect(), 600);
        assert!(seqs(&out).is_empty() && !out.iter().any(|e| matches!(e, Effect::SkipTo { .. })));
        // A second peer says the same: skipped, and what waited is appended.
        let q = PeerId::random();
        let f = o.tick(1_200, &[q]);
        assert!(matches!(&f[..], [Effect::Fetch { peer, from: 1, .. }] if *peer == q));
        let out = o.fetched(q, A, 50, 60, (50..=60).map(ev).collect(), 1_300);
        assert_eq!(
            out[0],
            Effect::SkipTo {
                origin: A.into(),
                first: 50
            }
        );
        assert_eq!(seqs(&out), (50..=60).collect::<Vec<_>>());
    }

    #[test]
    fn a_hole_one_peer_reports_is_fetched_from_a_peer_that_holds_it() {
        let (pruned, full) = (PeerId::random(), PeerId::random());
        let mut o = Origins::default();
        o.peer_heads(pruned, &head_from(50), 0);
        assert!(matches!(
            &o.tick(500, &[pruned])[..],
            [Effect::Fetch { from: 1, .. }]
        ));
        let out = o.fetched(pruned, A, 50, 60, (50..=60).map(ev).collect(), 600);
        assert!(!out.iter().any(|e| matches!(e, Effect::SkipTo { .. })));
        // The next digest of a peer that holds the start makes it the one asked.
        o.peer_heads(full, &head_from(1), 700);
        let f = o.tick(1_200, &[pruned, full]);
        assert!(matches!(&f[..], [Effect::Fetch { peer, from: 1, .. }] if *peer == full));
        let out = o.fetched(full, A, 1, 60, (1..=60).map(ev).collect(), 1_300);
        assert!(!out.iter().any(|e| matches!(e, Effect::SkipTo { .. })));
        assert_eq!(seqs(&out), (1..=60).collect::<Vec<_>>());
    }

    #[test]
    fn a_hole_is_skipped_on_the_origins_word_or_one_peers_repeated_word() {
        let node = PeerId::random();
        let origin = node.to_string();
        let mut o = Origins::default();
        let heads = [OriginHead {
            origin: origin.clone(),
            first: 50,
            last: 60,
        }];
        o.peer_heads(node, &heads, 0);
        assert!(matches!(&o.tick(500, &[node])[..], [Effect::Fetch { .. }]));
        let out = o.fetched(node, &origin, 50, 60, (50..=60).map(ev).collect(), 600);
        assert!(matches!(&out[0], Effect::SkipTo { first: 50, .. }));

        // The only peer there is says so twice, HOLE_CONFIRM_MS apart.
        let p = PeerId::random();
        let mut o = Origins::default();
        let heads = [OriginHead {
            origin: A.into(),
            first: 50,
            last: 60,
        }];
        o.peer_heads(p, &heads, 0);
        assert!(matches!(&o.tick(500, &[p])[..], [Effect::Fetch { .. }]));
        let out = o.fetched(p, A, 50, 60, Vec::new(), 600);
        assert!(out.iter().all(|e| !matches!(e, Effect::SkipTo { .. })));
        let mut now = 600;
        let skipped = loop {
            now += 500;
            assert!(now < 600 + 3 * HOLE_CONFIRM_MS, "never skipped");
            let f = o.tick(now, &[p]);
            if f.is_empty() {
                continue;
            }
            let out = o.fetched(p, A, 50, 60, Vec::new(), now + 10);
            if out
                .iter()
                .any(|e| matches!(e, Effect::SkipTo { first: 50, .. }))
            {
                break now + 10;
            }
        };
        assert!(skipped >= 600 + HOLE_CONFIRM_MS);
    }

    #[test]
    fn own_seqs_continue_after_restart() {
        let mut o = Origins::new(RepairConfig::default(), [("me".to_string(), 1, 41)]);
        assert_eq!(o.reserve("me", 3), 42);
        assert_eq!(o.reserve("me", 1), 45);
    }

    #[test]
    fn names_and_numbers_no_origin_has_are_dropped() {
        let p = PeerId::random();
        let mut o = Origins::default();
        for bad in [
            "a,b",
            "stripe:1\nx",
            "stripe:01",
            "stripe:",
            "x".repeat(10_000).as_str(),
        ] {
            assert!(
                o.receive(bad, vec![ev(1)], Some(p), 0).is_empty(),
                "{bad:?}"
            );
            o.peer_heads(
                p,
                &[OriginHead {
                    origin: bad.into(),
                    first: 1,
                    last: 5,
                }],
                0,
            );
        }
        assert!(o.origin_names().is_empty(), "{:?}", o.origin_names());
        assert!(is_origin(&p.to_string()) && is_origin("stripe:0"));

        // Seqs beyond any origin's: dropped, and the head is not moved.
        assert!(o.receive(A, vec![ev(u64::MAX)], Some(p), 0).is_empty());
        o.peer_heads(
            p,
            &[OriginHead {
                origin: A.into(),
                first: 1,
                last: u64::MAX,
            }],
            0,
        );
        assert_eq!(o.status(A).map(|s| s.head), Some(0));
        assert!(o.tick(1_000, &[p]).is_empty());
        assert!(o
            .fetched(p, A, u64::MAX, u64::MAX, Vec::new(), 1_000)
            .is_empty());
        assert_eq!(seqs(&o.receive(A, vec![ev(1)], Some(p), 1_000)), vec![1]);
    }

    #[test]
    fn a_hole_confirmed_by_a_second_peer_is_skipped_only_to_what_the_first_holds() {
        let (longer, shorter) = (PeerId::random(), PeerId::random());
        let mut o = Origins::default();
        o.peer_heads(longer, &head_from(50), 0);
        assert!(matches!(
            &o.tick(500, &[longer])[..],
            [Effect::Fetch { from: 1, .. }]
        ));
        let out = o.fetched(longer, A, 50, 60, Vec::new(), 600);
        assert!(!out.iter().any(|e| matches!(e, Effect::SkipTo { .. })));
        // The second peer has pruned further: the hole ends where the first's
        // log starts, and the rest comes from the first.
        let f = o.tick(1_200, &[shorter]);
        assert!(matches!(&f[..], [Effect::Fetch { peer, from: 1, .. }] if *peer == shorter));
        let out = o.fetched(shorter, A, 55, 60, (55..=60).map(ev).collect(), 1_300);
        assert!(
            out.contains(&Effect::SkipTo {
                origin: A.into(),
                first: 50
            }),
            "{out:?}"
        );
        assert!(seqs(&out).is_empty());
        assert!(
            out.iter()
                .any(|e| matches!(e, Effect::Fetch { peer, from: 50, .. } if *peer == longer)),
            "{out:?}"
        );
        let out = o.fetched(longer, A, 50, 60, (50..=60).map(ev).collect(), 2_100);
        assert_eq!(seqs(&out), (50..=60).collect::<Vec<_>>());
    }
}
