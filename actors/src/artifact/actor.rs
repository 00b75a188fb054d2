//! The artifact actor: fetches the content of live artifact versions this node
//! lacks, chunk by chunk from the nodes that hold it (each chunk checked against
//! its digest; a bad one is fetched from another holder), records this node as a
//! holder once the whole content is verified, announces every version it is
//! recorded as holding with an `artifact` event (once: the versions announced
//! are kept on disk), serves chunks to other nodes and collects retired content.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use kiln_net::wire::{Request, Response};
use kiln_net::{CallError, NetCommand, NetHandle, PeerId, Reply};
use kiln_persistence::{
    chunk_count, chunks_root, Announced, ArtifactStore, StoreError, ARTIFACT_CHUNK,
};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde_bytes::ByteBuf;
use sha2::{Digest, Sha256};

use super::{plan, Wanted};
use crate::blocking::blocking;
use crate::broadcast::event::EventBody;
use crate::broadcast::{BroadcastActor, Publish, PublishError};
use crate::control::state::{ArtifactCommand, ControlCommand, ControlOutcome};
use crate::control::types::NodeId;
use crate::control::{addresses, AddressBook, ControlPlane, Propose, SharedApplied};
use crate::health::{StorageHealth, StoragePart};

const TICK: Duration = Duration::from_millis(500);
/// Chunk requests in flight per transfer.
const WINDOW: usize = 4;
/// Transfers at once: more would only split the same bandwidth.
const MAX_TRANSFERS: usize = 2;
/// Chunks read for other nodes at once (each is held in memory until sent): a
/// peer asking for many more than its window waits rather than filling memory.
const SERVE_AT_ONCE: usize = 8;
/// The pause before content whose write failed `n` times in a row is fetched
/// again: 1, 2, 4 … 30 s.
fn write_retry(n: u32) -> Duration {
    (Duration::from_secs(1) * 2u32.pow(n.saturating_sub(1).min(5))).min(Duration::from_secs(30))
}
/// A holder that failed is not asked again for this long.
const PEER_BACKOFF: Duration = Duration::from_secs(5);
/// A transfer whose every holder has failed this long leaves its slot to others.
const STALL_AFTER: Duration = Duration::from_secs(30);
/// The longest the store's claims spare content (an upload whose publish this
/// node never saw applied: a client retries a publish whose answer it lost),
/// and how long a partial fetch not in the plan is kept after its last write.
const GC_GRACE: Duration = Duration::from_secs(600);
const GC_EVERY: Duration = Duration::from_secs(30);
/// An announcement refused while the node gets its own earlier events back
/// (a lost broadcast log, up to a minute and a half) is tried again this soon.
const ANNOUNCE_RECOVERING_RETRY: Duration = Duration::from_secs(1);
/// An announcement that failed otherwise is tried again after this long.
const ANNOUNCE_RETRY: Duration = Duration::from_secs(10);

/// kiln_artifact_* metrics.
#[derive(Clone, Default)]
pub struct ArtifactMetrics {
    bytes_fetched: Counter,
    bytes_served: Counter,
    chunks_rejected: Counter,
    transfers: Gauge,
    transfers_completed: Counter,
    versions_missing: Gauge,
}

impl ArtifactMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = ArtifactMetrics::default();
        let r = registry.sub_registry_with_prefix("kiln_artifact");
        r.register(
            "bytes_fetched",
            "Artifact bytes this node fetched from other nodes (verified chunks)",
            m.bytes_fetched.clone(),
        );
        r.register(
            "bytes_served",
            "Artifact bytes this node sent to other nodes",
            m.bytes_served.clone(),
        );
        r.register(
            "chunks_rejected",
            "Fetched chunks that did not match their digest and were fetched again elsewhere",
            m.chunks_rejected.clone(),
        );
        r.register(
            "transfers",
            "Artifact fetches under way on this node",
            m.transfers.clone(),
        );
        r.register(
            "transfers_completed",
            "Artifact fetches completed and verified on this node",
            m.transfers_completed.clone(),
        );
        r.register(
            "versions_missing",
            "Live artifact versions whose content this node does not hold yet",
            m.versions_missing.clone(),
        );
        m
    }
}

struct Transfer {
    wanted: Wanted,
    /// Chunk digests, once a holder sent them and they matched the recorded root.
    manifest: Option<Arc<Vec<[u8; 32]>>>,
    asking_manifest: bool,
    /// Chunks `..written` are on disk.
    written: u64,
    /// Chunks not yet asked for, lowest first (failed ones come back here).
    todo: BTreeSet<u64>,
    inflight: HashMap<u64, PeerId>,
    /// Verified chunks waiting for the ones before them.
    ready: BTreeMap<u64, Vec<u8>>,
    writing: bool,
    /// Holders that failed or sent a bad chunk, and since when.
    avoid: HashMap<PeerId, Instant>,
    /// Holders failing since (cleared by a good answer).
    failing_since: HashMap<PeerId, Instant>,
    next_holder: usize,
    started: Instant,
}

impl Transfer {
    fn new(wanted: Wanted) -> Self {
        Transfer {
            wanted,
            manifest: None,
            asking_manifest: false,
            written: 0,
            todo: BTreeSet::new(),
            inflight: HashMap::new(),
            ready: BTreeMap::new(),
            writing: false,
            avoid: HashMap::new(),
            failing_since: HashMap::new(),
            next_holder: 0,
            started: Instant::now(),
        }
    }

    fn count(&self) -> u64 {
        chunk_count(self.wanted.size)
    }

    fn chunk_len(&self, index: u64) -> u64 {
        let last = self.count().saturating_sub(1);
        if index < last {
            ARTIFACT_CHUNK
        } else {
            self.wanted.size - last * ARTIFACT_CHUNK
        }
    }

    /// A holder to ask next: round-robin over those not recently failed.
    fn usable_holders(&self) -> Vec<PeerId> {
        self.wanted
            .holders
            .iter()
            .filter_map(|h| h.parse().ok())
            .filter(|p| {
                self.avoid
                    .get(p)
                    .is_none_or(|since| since.elapsed() >= PEER_BACKOFF)
            })
            .collect()
    }

    fn failed(&mut self, peer: PeerId) {
        let now = Instant::now();
        self.avoid.insert(peer, now);
        self.failing_since.entry(peer).or_insert(now);
    }

    fn answered(&mut self, peer: PeerId) {
        self.failing_since.remove(&peer);
    }

    /// Nothing under way and nobody to ask — no holder left, or every one
    /// failing for `STALL_AFTER` (gone, not just slow for a moment): the
    /// transfer does not hold up the fetch of other versions meanwhile.
    fn stalled(&self) -> bool {
        self.inflight.is_empty()
            && !self.asking_manifest
            && !self.writing
            && self
                .wanted
                .holders
                .iter()
                .filter_map(|h| h.parse::<PeerId>().ok())
                .all(|p| {
                    self.failing_since
                        .get(&p)
                        .is_some_and(|since| since.elapsed() >= STALL_AFTER)
                })
    }

    fn pick_holder(&mut self) -> Option<PeerId> {
        let holders = self.usable_holders();
        if holders.is_empty() {
            return None;
        }
        self.next_holder = (self.next_holder + 1) % holders.len();
        Some(holders[self.next_holder])
    }
}

/// What a transfer looks like from outside.
#[derive(Debug, Clone)]
pub struct TransferView {
    pub name: String,
    pub version: u64,
    pub sha256: String,
    pub size: u64,
    pub bytes_done: u64,
    pub seconds: f64,
}

pub struct ArtifactActor {
    me: NodeId,
    store: Arc<ArtifactStore>,
    applied: SharedApplied,
    net: NetHandle,
    book: AddressBook,
    control: Addr<ControlPlane>,
    broadcast: Addr<BroadcastActor>,
    metrics: ArtifactMetrics,
    /// Where a failed write of fetched content shows (status, metrics).
    health: StorageHealth,
    /// Content whose write failed: when last, and how many times in a row.
    write_failed: HashMap<String, (Instant, u32)>,
    /// Digests of complete content held here.
    local: HashSet<String>,
    transfers: HashMap<String, Transfer>,
    /// Hold proposals sent, and when (retried after a while if not applied).
    holding: HashMap<(String, u64), Instant>,
    /// Versions announced (as on disk); `None` until the first tick for a
    /// directory kept by a kiln from before the list.
    announced: Option<Announced>,
    /// Generation of the last list of announced versions handed to the store.
    announced_generation: u64,
    /// Announcements under way (`None`: awaiting the publish's answer) or
    /// refused, and when they may be tried again.
    announcing: HashMap<(String, u64), Option<Instant>>,
    /// Permits to read a chunk for another node (see `SERVE_AT_ONCE`).
    serving: Arc<tokio::sync::Semaphore>,
    last_gc: Instant,
    /// Uploads published through this node (name, version, digest, the store's
    /// claim): their content is spared by garbage collection until this node's
    /// applied state has the publish, from when on the live versions decide.
    published_uploads: Vec<(String, u64, String, u64)>,
}

impl ArtifactActor {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        me: NodeId,
        store: Arc<ArtifactStore>,
        applied: SharedApplied,
        net: NetHandle,
        book: AddressBook,
        control: Addr<ControlPlane>,
        broadcast: Addr<BroadcastActor>,
        metrics: ArtifactMetrics,
        health: StorageHealth,
        announced: Option<Announced>,
    ) -> Self {
        ArtifactActor {
            announced,
            announced_generation: 1,
            announcing: HashMap::new(),
            serving: Arc::new(tokio::sync::Semaphore::new(SERVE_AT_ONCE)),
            health,
            write_failed: HashMap::new(),
            me,
            store,
            applied,
            net,
            book,
            control,
            broadcast,
            metrics,
            local: HashSet::new(),
            transfers: HashMap::new(),
            holding: HashMap::new(),
            last_gc: Instant::now(),
            published_uploads: Vec::new(),
        }
    }

    fn tick(&mut self, ctx: &mut Context<Self>) {
        // One read of the applied state for both: garbage collection must not
        // release an upload its `keep` does not yet list.
        let keep_taken = Instant::now();
        let Some((plan, applied_uploads)) = self.applied.read().ok().map(|a| {
            let applied_uploads: HashSet<(String, u64)> = self
                .published_uploads
                .iter()
                .filter(|(name, version, _, _)| {
                    a.state
                        .artifacts
                        .get(name)
                        .is_some_and(|e| e.next_version > *version)
                })
                .map(|(_, _, sha, claim)| (sha.clone(), *claim))
                .collect();
            (plan(&a.state, self.me, &self.local), applied_uploads)
        }) else {
            return;
        };
        // Content found on disk (after a restart) counts as held.
        let mut found = false;
        for w in &plan.fetch {
            if !self.transfers.contains_key(&w.sha256) && self.store.has(&w.sha256) {
                self.local.insert(w.sha256.clone());
                found = true;
            }
        }
        if found {
            return self.tick(ctx);
        }
        self.metrics.versions_missing.set(plan.fetch.len() as i64);
        for (name, version) in plan.hold {
            self.propose_hold(name, version);
        }
        self.announce_held(&plan.held, ctx);
        let mut busy = self.transfers.values().filter(|t| !t.stalled()).count();
        for w in plan.fetch {
            if let Some(t) = self.transfers.get_mut(&w.sha256) {
                // Holders change as other nodes complete.
                t.wanted.holders = w.holders;
                continue;
            }
            if busy >= MAX_TRANSFERS {
                continue;
            }
            if self
                .write_failed
                .get(&w.sha256)
                .is_some_and(|(at, n)| at.elapsed() < write_retry(*n))
            {
                // Its content could not be written: not before the backoff
                // (a new transfer reads and hashes what it has so far).
                continue;
            }
            tracing::info!(name = %w.name, version = w.version, size = w.size, sha256 = %w.sha256,
                "fetching artifact content");
            let sha = w.sha256.clone();
            busy += 1;
            self.transfers.insert(sha.clone(), Transfer::new(w));
        }
        // Retired while fetching: drop the transfer (its file is collected).
        self.transfers
            .retain(|sha, t| plan.live.contains(sha) || t.writing);
        // A failed write of content retired since, or held by now, fails no more.
        let still_wanted = |sha: &str| plan.live.contains(sha) && !self.local.contains(sha);
        self.health.retain(StoragePart::Artifacts, still_wanted);
        self.write_failed.retain(|sha, _| still_wanted(sha));
        self.metrics.transfers.set(self.transfers.len() as i64);
        let shas: Vec<String> = self.transfers.keys().cloned().collect();
        for sha in shas {
            self.pump(&sha, ctx);
        }
        if self.last_gc.elapsed() >= GC_EVERY {
            self.last_gc = Instant::now();
            let store = self.store.clone();
            let live = plan.live.clone();
            // Content that went from the disk (removed by hand, lost) is
            // fetched again rather than counted as held.
            self.local.retain(|s| live.contains(s) && self.store.has(s));
            let in_transfer: HashSet<String> = self.transfers.keys().cloned().collect();
            self.published_uploads
                .retain(|(_, _, sha, claim)| !applied_uploads.contains(&(sha.clone(), *claim)));
            tokio::task::spawn_blocking(move || {
                let keep: HashSet<String> = live.union(&in_transfer).cloned().collect();
                match store.collect_garbage(&keep, keep_taken, &applied_uploads, GC_GRACE) {
                    Ok(removed) if !removed.is_empty() => {
                        tracing::info!(?removed, "removed retired artifact content")
                    }
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "cannot collect retired artifact content"),
                }
            });
        }
    }

    fn propose_hold(&mut self, name: String, version: u64) {
        let key = (name.clone(), version);
        if self
            .holding
            .get(&key)
            .is_some_and(|at| at.elapsed() < Duration::from_secs(10))
        {
            return;
        }
        self.holding.insert(key, Instant::now());
        let cmd = ControlCommand::Artifact(ArtifactCommand::Hold {
            name: name.clone(),
            version,
            node: self.me,
        });
        let control = self.control.clone();
        // The announcement follows from the applied state (`announce_held`).
        actix_rt::spawn(async move {
            match control.send(Propose(cmd)).await {
                Ok(Ok(ControlOutcome::Rejected { reason })) => {
                    tracing::info!(%name, version, %reason, "artifact version retired before this node was recorded holding it")
                }
                Ok(Ok(_)) => tracing::info!(%name, version, "holding artifact version"),
                Ok(Err(e)) => tracing::debug!(%name, version, error = %e, "hold not recorded yet"),
                Err(_) => {}
            }
        });
    }

    /// Announces each version this node is recorded as holding and has not
    /// announced yet — whatever cut an earlier try off (a crash, a timeout, a
    /// broadcast log being recovered) — and forgets retired ones.
    fn announce_held(&mut self, held: &[(String, u64, String)], ctx: &mut Context<Self>) {
        let recorded: Announced = held.iter().map(|(n, v, _)| (n.clone(), *v)).collect();
        let announced = match self.announced.as_mut() {
            Some(a) => a,
            None => {
                // A directory from before the list: the kiln that kept it
                // announced what it held.
                self.announced = Some(recorded.clone());
                self.save_announced();
                return;
            }
        };
        let before = announced.len();
        announced.retain(|k| recorded.contains(k));
        if announced.len() != before {
            self.save_announced();
        }
        let now = Instant::now();
        self.announcing.retain(|k, _| recorded.contains(k));
        for (name, version, sha256) in held {
            let key = (name.clone(), *version);
            if self.announced.as_ref().is_some_and(|a| a.contains(&key))
                // One publish at a time (a slow one is not sent again).
                || self.announcing.get(&key).is_some_and(|at| at.is_none_or(|at| now < at))
                // Recorded as holding it, but the content is not here (the
                // artifacts directory was lost): announced once fetched again.
                || !self.local.contains(sha256)
            {
                continue;
            }
            self.announcing.insert(key.clone(), None);
            let (tx, rx) = tokio::sync::oneshot::channel();
            self.broadcast.do_send(Publish {
                bodies: vec![EventBody::Artifact {
                    name: name.clone(),
                    version: *version,
                    sha256: sha256.clone(),
                }],
                key: None,
                reply: tx,
            });
            ctx.spawn(rx.into_actor(self).map(
                move |answer, act, _ctx| match answer {
                    Ok(Ok(_)) => {
                        tracing::info!(artifact = %key.0, version = key.1, "announced artifact version");
                        act.announcing.remove(&key);
                        if let Some(a) = act.announced.as_mut() {
                            a.insert(key);
                        }
                        act.save_announced();
                    }
                    Ok(Err(PublishError::Recovering)) => {
                        act.announcing
                            .insert(key, Some(Instant::now() + ANNOUNCE_RECOVERING_RETRY));
                    }
                    Ok(Err(e)) => {
                        tracing::warn!(error = %e, artifact = %key.0, version = key.1,
                            retry_s = ANNOUNCE_RETRY.as_secs(), "cannot announce an artifact version; will retry");
                        act.announcing
                            .insert(key, Some(Instant::now() + ANNOUNCE_RETRY));
                    }
                    Err(_) => {
                        act.announcing
                            .insert(key, Some(Instant::now() + ANNOUNCE_RETRY));
                    }
                },
            ));
        }
    }

    /// Writes the list of announced versions (in the background; the newest
    /// list wins).
    fn save_announced(&mut self) {
        let Some(set) = self.announced.clone() else {
            return;
        };
        self.announced_generation += 1;
        let generation = self.announced_generation;
        let store = self.store.clone();
        actix_rt::spawn(async move {
            if let Err(e) = blocking(move || store.set_announced(generation, &set)).await {
                // Not fatal: at worst a version is announced again after a restart.
                tracing::warn!(error = %e, "cannot record the announced artifact versions");
            }
        });
    }

    /// Moves a transfer on: its manifest, then chunk requests up to the window.
    fn pump(&mut self, sha: &str, ctx: &mut Context<Self>) {
        let Some(t) = self.transfers.get_mut(sha) else {
            return;
        };
        if t.manifest.is_none() {
            if t.asking_manifest {
                return;
            }
            let Some(peer) = t.pick_holder() else {
                return;
            };
            t.asking_manifest = true;
            let call = self.net.call(
                peer,
                addresses(&self.book, &peer),
                Request::ArtifactManifest {
                    sha256: sha.to_string(),
                },
            );
            let sha = sha.to_string();
            ctx.spawn(call.into_actor(self).map(move |r, act, ctx| {
                act.on_manifest(&sha, peer, r, ctx);
            }));
            return;
        }
        let mut asks = Vec::new();
        while t.inflight.len() < WINDOW {
            let Some(index) = t.todo.first().copied() else {
                break;
            };
            let Some(peer) = t.pick_holder() else {
                break;
            };
            t.todo.remove(&index);
            t.inflight.insert(index, peer);
            asks.push((index, peer));
        }
        for (index, peer) in asks {
            let call = self.net.call(
                peer,
                addresses(&self.book, &peer),
                Request::ArtifactChunk {
                    sha256: sha.to_string(),
                    index,
                },
            );
            let sha = sha.to_string();
            ctx.spawn(call.into_actor(self).map(move |r, act, ctx| {
                act.on_chunk(&sha, index, peer, r, ctx);
            }));
        }
    }

    fn on_manifest(
        &mut self,
        sha: &str,
        peer: PeerId,
        r: Result<Response, CallError>,
        ctx: &mut Context<Self>,
    ) {
        let Some(t) = self.transfers.get_mut(sha) else {
            return;
        };
        t.asking_manifest = false;
        let digests = match r {
            Ok(Response::ArtifactManifest { digests }) => digests,
            other => {
                tracing::debug!(%peer, sha256 = sha, answer = ?other.map(|_| ()), "manifest request failed");
                t.failed(peer);
                return;
            }
        };
        let chunks: Vec<[u8; 32]> = digests
            .chunks_exact(32)
            .map(|c| {
                let mut a = [0u8; 32];
                a.copy_from_slice(c);
                a
            })
            .collect();
        if digests.len() % 32 != 0
            || chunks.len() as u64 != t.count()
            || chunks_root(&chunks) != t.wanted.chunks_root
        {
            tracing::warn!(%peer, sha256 = sha, "a holder sent chunk digests that do not match the recorded root; asking another");
            t.failed(peer);
            return;
        }
        t.answered(peer);
        let manifest = Arc::new(chunks);
        t.manifest = Some(manifest.clone());
        let store = self.store.clone();
        let s = sha.to_string();
        t.writing = true;
        ctx.spawn(
            blocking(move || store.resume_point(&s, &manifest))
                .into_actor(self)
                .map({
                    let sha = sha.to_string();
                    move |r, act, ctx| {
                        let Some(t) = act.transfers.get_mut(&sha) else {
                            return;
                        };
                        t.writing = false;
                        let from = match r {
                            Ok(n) => n,
                            Err(e) => {
                                tracing::warn!(error = %e, "cannot read a partial artifact; starting over");
                                0
                            }
                        };
                        if from > 0 {
                            tracing::info!(sha256 = %sha, chunks = from, "resuming artifact fetch");
                        }
                        t.written = from;
                        t.todo = (from..t.count()).collect();
                        if t.count() == from {
                            act.finish(&sha, ctx);
                        } else {
                            act.pump(&sha, ctx);
                        }
                    }
                }),
        );
    }

    fn on_chunk(
        &mut self,
        sha: &str,
        index: u64,
        peer: PeerId,
        r: Result<Response, CallError>,
        ctx: &mut Context<Self>,
    ) {
        let Some(t) = self.transfers.get_mut(sha) else {
            return;
        };
        t.inflight.remove(&index);
        let good = match (&r, &t.manifest) {
            (Ok(Response::ArtifactChunk { data }), Some(m)) => {
                let digest: [u8; 32] = Sha256::digest(data).into();
                data.len() as u64 == t.chunk_len(index) && m.get(index as usize) == Some(&digest)
            }
            _ => false,
        };
        if !good {
            if matches!(r, Ok(Response::ArtifactChunk { .. })) {
                self.metrics.chunks_rejected.inc();
                tracing::warn!(%peer, sha256 = sha, index, "a chunk did not match its digest; fetching it from another holder");
            }
            t.failed(peer);
            t.todo.insert(index);
            return self.pump(sha, ctx);
        }
        let Ok(Response::ArtifactChunk { data }) = r else {
            return;
        };
        t.answered(peer);
        self.metrics.bytes_fetched.inc_by(data.len() as u64);
        t.ready.insert(index, data.into_vec());
        self.write_ready(sha, ctx);
        self.pump(sha, ctx);
    }

    /// Writes verified chunks in order, one storage job at a time.
    fn write_ready(&mut self, sha: &str, ctx: &mut Context<Self>) {
        let Some(t) = self.transfers.get_mut(sha) else {
            return;
        };
        if t.writing {
            return;
        }
        let mut run = Vec::new();
        let mut next = t.written;
        while let Some(data) = t.ready.remove(&next) {
            run.push((next, data));
            next += 1;
        }
        if run.is_empty() {
            return;
        }
        t.writing = true;
        let store = self.store.clone();
        let s = sha.to_string();
        ctx.spawn(
            blocking(move || {
                for (index, data) in &run {
                    store.append_chunk(&s, *index, data)?;
                }
                Ok(run.len() as u64)
            })
            .into_actor(self)
            .map({
                let sha = sha.to_string();
                move |r, act, ctx| {
                    let Some(t) = act.transfers.get_mut(&sha) else {
                        return;
                    };
                    t.writing = false;
                    match r {
                        Ok(n) => {
                            t.written += n;
                            act.health.ok(StoragePart::Artifacts, &sha);
                            act.write_failed.remove(&sha);
                        }
                        Err(e) => {
                            act.content_unwritable(&sha, &e);
                            act.transfers.remove(&sha);
                            return;
                        }
                    }
                    if t.written == t.count() {
                        act.finish(&sha, ctx);
                    } else {
                        act.write_ready(&sha, ctx);
                    }
                }
            }),
        );
    }

    /// The content `sha` could not be written: shown in the node's status,
    /// fetched again after a backoff.
    fn content_unwritable(&mut self, sha: &str, e: &StoreError) {
        let failures = self.write_failed.get(sha).map_or(0, |(_, n)| *n) + 1;
        tracing::error!(error = %e, sha256 = %sha, retry_s = write_retry(failures).as_secs(),
            "cannot write artifact content; will retry");
        self.health
            .failing(StoragePart::Artifacts, sha, e.to_string());
        self.write_failed
            .insert(sha.to_string(), (Instant::now(), failures));
    }

    fn finish(&mut self, sha: &str, ctx: &mut Context<Self>) {
        let Some(t) = self.transfers.get_mut(sha) else {
            return;
        };
        let Some(manifest) = t.manifest.clone() else {
            return;
        };
        t.writing = true;
        let store = self.store.clone();
        let s = sha.to_string();
        ctx.spawn(
            blocking(move || store.complete(&s, &manifest))
                .into_actor(self)
                .map({
                    let sha = sha.to_string();
                    move |r, act, _ctx| {
                        let Some(t) = act.transfers.remove(&sha) else {
                            return;
                        };
                        act.metrics.transfers.set(act.transfers.len() as i64);
                        match r {
                            Ok(()) => {
                                let secs = t.started.elapsed().as_secs_f64();
                                tracing::info!(name = %t.wanted.name, version = t.wanted.version,
                                    size = t.wanted.size, seconds = secs,
                                    mb_per_s = t.wanted.size as f64 / 1e6 / secs.max(1e-9),
                                    "artifact content fetched and verified");
                                act.metrics.transfers_completed.inc();
                                act.health.ok(StoragePart::Artifacts, &sha);
                                act.write_failed.remove(&sha);
                                act.local.insert(sha);
                            }
                            // Reading it back, fsyncing or moving it failed: the
                            // disk, not the content.
                            Err(e @ StoreError::Storage { .. }) => act.content_unwritable(&sha, &e),
                            Err(e) => tracing::warn!(error = %e, "artifact content did not verify; fetching it again"),
                        }
                    }
                }),
        );
    }
}

impl Actor for ArtifactActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.run_interval(TICK, |act, ctx| act.tick(ctx));
    }
}

/// A peer asks for a manifest or a chunk.
#[derive(Message)]
#[rtype(result = "()")]
pub struct ServeArtifact {
    pub peer: PeerId,
    pub request: Request,
    pub reply: Reply,
}

impl Handler<ServeArtifact> for ArtifactActor {
    type Result = ();

    fn handle(&mut self, msg: ServeArtifact, _ctx: &mut Self::Context) {
        let store = self.store.clone();
        let net = self.net.clone();
        let served = self.metrics.bytes_served.clone();
        let serving = self.serving.clone();
        actix_rt::spawn(async move {
            // Never closed; should it be, the read goes ahead unbounded.
            let _permit = serving.acquire_owned().await.ok();
            let response = match msg.request {
                Request::ArtifactManifest { sha256 } if store.has(&sha256) => {
                    match blocking(move || store.manifest(&sha256)).await {
                        Ok(chunks) => Response::ArtifactManifest {
                            digests: ByteBuf::from(chunks.concat()),
                        },
                        Err(e) => Response::Refused {
                            reason: format!("cannot read the chunk digests: {e}"),
                        },
                    }
                }
                Request::ArtifactChunk { sha256, index } if store.has(&sha256) => {
                    match blocking(move || store.read_chunk(&sha256, index)).await {
                        Ok(data) => {
                            served.inc_by(data.len() as u64);
                            Response::ArtifactChunk {
                                data: ByteBuf::from(data),
                            }
                        }
                        Err(e) => Response::Refused {
                            reason: format!("cannot read the chunk: {e}"),
                        },
                    }
                }
                _ => Response::Refused {
                    reason: "this node does not hold that artifact content".into(),
                },
            };
            net.send(NetCommand::Respond {
                reply: msg.reply,
                response,
            });
        });
    }
}

/// Content uploaded to this node is held here.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Uploaded {
    pub name: String,
    pub version: u64,
    pub sha256: String,
    /// The store's claim on the content (`ArtifactStore::keep_upload`).
    pub claim: u64,
}

impl Handler<Uploaded> for ArtifactActor {
    type Result = ();

    fn handle(&mut self, msg: Uploaded, _ctx: &mut Self::Context) {
        self.local.insert(msg.sha256.clone());
        self.published_uploads
            .push((msg.name, msg.version, msg.sha256, msg.claim));
    }
}

/// Fetches under way and how far they got.
#[derive(Message)]
#[rtype(result = "Vec<TransferView>")]
pub struct GetTransfers;

impl Handler<GetTransfers> for ArtifactActor {
    type Result = MessageResult<GetTransfers>;

    fn handle(&mut self, _: GetTransfers, _ctx: &mut Self::Context) -> Self::Result {
        MessageResult(
            self.transfers
                .iter()
                .map(|(sha, t)| TransferView {
                    name: t.wanted.name.clone(),
                    version: t.wanted.version,
                    sha256: sha.clone(),
                    size: t.wanted.size,
                    bytes_done: (t.written * ARTIFACT_CHUNK).min(t.wanted.size),
                    seconds: t.started.elapsed().as_secs_f64(),
                })
                .collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn transfer(holders: Vec<String>) -> Transfer {
        Transfer::new(Wanted {
            name: "crm".into(),
            version: 1,
            sha256: "a".repeat(64),
            size: 10,
            chunks_root: String::new(),
            holders,
        })
    }

    #[test]
    fn a_transfer_with_nobody_to_ask_is_stalled_and_leaves_its_slot() {
        // Its only holder left the cluster: nothing to ask, nothing under way.
        assert!(transfer(Vec::new()).stalled());
        let peer = PeerId::random();
        let mut t = transfer(vec![peer.to_string()]);
        assert!(!t.stalled());
        // The holder failed just now: a moment's failure keeps the slot.
        t.failed(peer);
        assert!(!t.stalled());
        // Failing for long: it leaves the slot.
        t.failing_since
            .insert(peer, Instant::now() - STALL_AFTER - Duration::from_secs(1));
        assert!(t.stalled());
        // A request still under way keeps the slot.
        t.inflight.insert(0, peer);
        assert!(!t.stalled());
        t.inflight.clear();
        // A good answer clears the failure.
        t.answered(peer);
        assert!(!t.stalled());
    }
}
