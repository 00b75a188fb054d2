//! The broadcast actor: runs this node's [`Origins`] and does its I/O — the
//! broadcast log (one storage job at a time, later appends merged into one
//! transaction), gossip of the node's own events and of its stripe's change events,
//! heads digests, repair fetches, and the hand-off of every event to the node's
//! subscribers.
//!
//! A node's own events reach subscribers and peers once they are durable in the
//! log. Events of other origins reach subscribers as soon as they are in order, and
//! are written to the log in batches (every [`TICK`] or with the next own append):
//! their origin holds them durably, so the node need not make every subscriber wait
//! for a transaction of its own, and what a crash loses is fetched again.

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use kiln_net::wire::{BroadcastGossip, EventFrame, OriginHead, Request, Response};
use kiln_net::{BroadcastIn, CallError, NetCommand, NetHandle, PeerId, Reply};
use kiln_persistence::{
    BroadcastStore, PublishKey, Retention, StoreError, StoredEvent, StripeStore,
};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use serde_bytes::ByteBuf;
use sha2::{Digest, Sha256};
use tokio::sync::{broadcast, oneshot, watch};

use super::event::{stripe_origin, EventBody, MissedAbout};
use super::keys::{KeyCheck, PublishKeys, MAX_PUBLISH_KEYS};
use super::state::{Effect, Origins, RepairConfig, MAX_SEQ};
use crate::blocking::blocking;
use crate::control::state::Placement;
use crate::control::types::NodeId;
use crate::control::{addresses, AddressBook, SharedApplied};
use crate::health::{StorageHealth, StoragePart};
use crate::stripe::kv::KvChange;
use crate::stripe::KnownChangeSeq;

const TICK: Duration = Duration::from_millis(20);
const HEADS_EVERY: Duration = Duration::from_secs(1);
/// Longest wait for every other node's digest before the known change seq of
/// this node's stripe counts as settled (see [`KnownChangeSeq`]): a few digests'
/// time, for connections and the gossip mesh to form after a start.
pub const SETTLE_WAIT: Duration = Duration::from_secs(3);
const PRUNE_EVERY: Duration = Duration::from_secs(10);
/// Non-durable appends (received events) are made durable at least this often
/// (whatever the persistence mode: redb reclaims space only at durable commits).
/// A node's own events are fsynced before they are acknowledged, in both modes:
/// a seq must never be given out twice.
const SYNC_EVERY: Duration = Duration::from_secs(1);
/// The backoff before the log is read again after a second storage failure in
/// a row (doubling with each further one up to [`RELOAD_BACKOFF_MAX`]).
const RELOAD_RETRY: Duration = Duration::from_secs(1);
const RELOAD_BACKOFF_MAX: Duration = Duration::from_secs(30);
/// How soon the log is tried again while a reader of the failed handle holds it.
const REOPEN_WAIT: Duration = Duration::from_millis(100);
/// Bytes of events in one gossip message (gossip frames are limited to 256 KiB).
const GOSSIP_BATCH_BYTES: usize = 192 * 1024;
/// Bytes of events in one fetch answer (frames are limited to 4 MiB).
const FETCH_BATCH_BYTES: usize = 2 * 1024 * 1024;
const FETCH_BATCH_EVENTS: usize = 10_000;
/// Received events waiting for their write, beyond which they are written
/// without waiting for the next tick.
const UNWRITTEN_EVENTS: usize = 8_192;

#[derive(Debug, Clone)]
pub struct BroadcastConfig {
    pub retention: Retention,
    /// Events a subscriber may be behind the node before it is told `lagged`.
    pub subscriber_buffer: usize,
    /// Bytes of events a subscriber may be behind (what the node holds for it)
    /// before it is told `lagged`: the count alone would let 65 536 large
    /// events pin gigabytes.
    pub subscriber_buffer_bytes: u64,
    /// How long a publish's Idempotency-Key is remembered (the reconnect window).
    pub publish_key_window: Duration,
}

/// One event appended to this node's log, as subscribers get it.
#[derive(Debug)]
pub struct Delivered {
    pub origin: String,
    pub seq: u64,
    pub ts: u64,
    /// `None` if the stored bytes do not decode (an event of a newer kiln):
    /// subscribers step over it.
    pub body: Option<EventBody>,
    /// About the memory it holds (the decoded event's, or its encoded size),
    /// for the subscribers' byte bound.
    pub weight: u64,
}

impl Delivered {
    pub fn decode(origin: &str, seq: u64, ts: u64, bytes: &[u8]) -> Delivered {
        let body = EventBody::from_cbor(bytes);
        let held = body.as_ref().map_or(bytes.len(), EventBody::heap_bytes);
        Delivered {
            origin: origin.to_string(),
            seq,
            ts,
            body,
            weight: (held.max(bytes.len()) + origin.len() + 128) as u64,
        }
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OriginLabel {
    origin: String,
}

/// kiln_broadcast_* metrics.
#[derive(Clone)]
pub struct BroadcastMetrics {
    published: Family<OriginLabel, Counter>,
    delivered: Family<OriginLabel, Counter>,
    repaired: Family<OriginLabel, Counter>,
    gap_repairs: Counter,
    gossip_reconnects: Counter,
    holes_skipped: Counter,
    pub resyncs: Counter,
    pub subscribers: Gauge,
    pub subscribers_lagged: Counter,
    /// Events appended but not yet sent, summed over the subscribers.
    pub subscriber_lag: Gauge,
    pruned: Counter,
    latency: Histogram,
    log_failures: Counter,
    gossip_dropped_behind_log: Counter,
}

impl BroadcastMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = BroadcastMetrics {
            published: Default::default(),
            delivered: Default::default(),
            repaired: Default::default(),
            gap_repairs: Default::default(),
            gossip_reconnects: Default::default(),
            holes_skipped: Default::default(),
            resyncs: Default::default(),
            subscribers: Default::default(),
            subscribers_lagged: Default::default(),
            subscriber_lag: Default::default(),
            pruned: Default::default(),
            log_failures: Default::default(),
            gossip_dropped_behind_log: Default::default(),
            latency: Histogram::new([
                0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
            ]),
        };
        let r = registry.sub_registry_with_prefix("kiln_broadcast");
        r.register(
            "events_published",
            "Events this node published as their origin, by origin",
            m.published.clone(),
        );
        r.register(
            "events_delivered",
            "Events appended to this node's log and handed to its subscribers, by origin",
            m.delivered.clone(),
        );
        r.register(
            "events_repaired",
            "Events this node fetched from a peer after missing them in gossip, by origin",
            m.repaired.clone(),
        );
        r.register(
            "gap_repairs",
            "Fetches of missed events answered by a peer",
            m.gap_repairs.clone(),
        );
        r.register(
            "gossip_reconnects",
            "Connections closed because a node's events kept reaching this node only by repair",
            m.gossip_reconnects.clone(),
        );
        r.register(
            "holes_skipped",
            "Runs of events no peer held any more (older than retention)",
            m.holes_skipped.clone(),
        );
        r.register(
            "resyncs",
            "resync events sent to subscribers that were behind the log's retention",
            m.resyncs.clone(),
        );
        r.register(
            "subscribers",
            "Open event streams on this node",
            m.subscribers.clone(),
        );
        r.register(
            "subscribers_lagged",
            "Event streams closed with `lagged` because the subscriber fell too far behind",
            m.subscribers_lagged.clone(),
        );
        r.register(
            "subscriber_lag_events",
            "Events appended on this node and not yet sent to its subscribers, all subscribers together",
            m.subscriber_lag.clone(),
        );
        r.register(
            "events_pruned",
            "Events removed from the log by retention",
            m.pruned.clone(),
        );
        r.register(
            "log_failures",
            "Writes of the broadcast log that failed (a full disk, an I/O error); the log is read again after each",
            m.log_failures.clone(),
        );
        r.register(
            "gossip_dropped_behind_log",
            "Gossip messages dropped because 64 MiB of received events waited for the log (fetched later)",
            m.gossip_dropped_behind_log.clone(),
        );
        r.register(
            "delivery_latency_seconds",
            "From an event's publication at its origin to its append on this node",
            m.latency.clone(),
        );
        m
    }

    fn origin(f: &Family<OriginLabel, Counter>, origin: &str) -> Counter {
        f.get_or_create(&OriginLabel {
            origin: origin.to_string(),
        })
        .clone()
    }
}

type PublishReply = oneshot::Sender<Result<Vec<u64>, PublishError>>;

/// A publish of this node's own events waiting for its append.
struct OwnPublish {
    bodies: Vec<Vec<u8>>,
    reply: PublishReply,
    /// Its Idempotency-Key and the request's digest.
    key: Option<(String, [u8; 32])>,
}

/// Work for the storage thread, in order.
enum Job {
    /// Events to append: `received` were handed to subscribers already; `own`
    /// are this node's new events, numbered when the job starts (so a failed
    /// append never leaves a gap in its seqs). Once it is written, every event
    /// handed on up to delivery count `covers` is in the log.
    Append {
        received: Vec<(String, Vec<EventFrame>)>,
        covers: u64,
        own: Vec<OwnPublish>,
    },
    SkipTo {
        origin: String,
        first: u64,
    },
    Prune,
    Sync,
    /// Ends this node's recovery of its own events in a durable commit.
    FinishOwnRecovery,
}

pub struct BroadcastActor {
    /// Kept up to date for the stripe actor (see [`KnownChangeSeq`]).
    known_change_seq: KnownChangeSeq,
    /// Set while this node, whose log was lost, gets its own earlier events
    /// back from its peers (see [`OwnRecovery`]).
    own_recovery: Option<OwnRecovery>,
    /// Idempotency-Keys of this node's publishes in the reconnect window.
    publish_keys: PublishKeys<PublishReply>,
    /// The highest own seq handed to subscribers and peers (those the log held
    /// at start count as handed on).
    own_handed_on: u64,
    me: PeerId,
    /// The origin of this node's own events: its peer id.
    origin: String,
    node: NodeId,
    store: Arc<BroadcastStore>,
    stripe_store: Option<Arc<StripeStore>>,
    applied: SharedApplied,
    net: NetHandle,
    book: AddressBook,
    origins: Origins,
    config: BroadcastConfig,
    metrics: BroadcastMetrics,
    jobs: VecDeque<Job>,
    busy: bool,
    /// Received events handed to subscribers and not yet given to an append.
    unwritten: Vec<(String, Vec<EventFrame>)>,
    unwritten_events: usize,
    /// Bytes of received events handed on whose append has not finished (in
    /// `unwritten`, queued, or being written): gossip beyond
    /// [`MAX_UNWRITTEN_BYTES`] is dropped while the log is this far behind.
    unwritten_bytes: u64,
    /// Gossip messages dropped for that (warned at powers of two).
    dropped_behind_log: u64,
    /// Counts hand-offs of received events (written after they are handed on);
    /// `written` tells the highest count whose events are all in the log (a
    /// subscriber catching up waits for it).
    handed_on: Arc<AtomicU64>,
    written: watch::Sender<u64>,
    importing: bool,
    unsynced: bool,
    /// Change events of this node's stripe that the log holds durably (the
    /// stripe's outbox may drop them).
    stripe_durable: u64,
    /// The live feed, made when the first subscriber comes: its buffer is
    /// allocated whole, and a node nobody subscribes to need not hold it.
    subscribers: Option<broadcast::Sender<Arc<Delivered>>>,
    /// Weight of every event put into the live feed so far (see [`Subscription::behind_bytes`]).
    fed_bytes: Arc<AtomicU64>,
    started: Instant,
    /// Peers whose digest arrived since this node started (until the known
    /// change seq is settled).
    heads_heard: HashSet<PeerId>,
    last_heads: Instant,
    last_prune: Instant,
    last_sync: Instant,
    /// A storage job failed: before any other, the log's runs are read again
    /// (the file may have been opened again and gone back to its last durable
    /// commit), not before this time.
    reload_due: Option<Instant>,
    /// The last storage error (what a refused publish is told).
    store_error: Option<StoreError>,
    /// Storage failures since the last append that succeeded: from the second
    /// on, the log is read again only after a backoff (opening the file again
    /// walks all of it), and publishes are refused meanwhile.
    failures_in_row: u32,
    /// Where failures show (status, metrics).
    health: StorageHealth,
}

/// A node that existed before but whose `broadcast.redb` is new (deleted, or
/// lost with a disk) has peers that may hold events of its own that it no
/// longer has. Given out again, their seqs would make every peer drop the new
/// events as ones it holds: acknowledged, yet never delivered. So publishes
/// are refused until it heard the other nodes' digests (every one it knows
/// of, or at least one by [`SETTLE_WAIT`]; alone, none), fetched what they
/// hold of this origin back into the log (or, after [`RECOVERY_FETCH_WAIT`],
/// skipped past it) and made that durable. The log's meta table keeps the
/// recovery pending across restarts until then.
#[derive(Debug, Default)]
struct OwnRecovery {
    heard: HashSet<PeerId>,
    /// When enough digests were heard.
    settled: Option<Instant>,
    /// The highest seq of this origin in a digest (kept here: a reload of the
    /// log resets what `Origins` knows of this node's own origin).
    head: u64,
    /// The durable commit that ends the recovery is queued or running.
    finishing: bool,
}

/// How long a recovering node waits for a digest from a node it knows of
/// before it goes on with what it has (warning that seqs may be given twice).
const RECOVERY_HEAR_MAX: Duration = Duration::from_secs(60);
/// How long it tries to fetch its own events back before it continues above
/// the highest seq a peer reported (the events it could not fetch are skipped:
/// its subscribers get a resync, its peers keep them).
const RECOVERY_FETCH_WAIT: Duration = Duration::from_secs(30);

/// Why a publish was not acknowledged.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("{0}")]
    Storage(StoreError),
    #[error("this node lost its broadcast log and is fetching its own earlier events back from its peers before it gives out new seqs; try again shortly")]
    Recovering,
    #[error("the broadcast actor stopped")]
    Stopped,
    #[error("this Idempotency-Key was used for a different publish on this node")]
    KeyReused,
}

impl BroadcastActor {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        me: PeerId,
        node: NodeId,
        store: Arc<BroadcastStore>,
        stripe_store: Option<Arc<StripeStore>>,
        applied: SharedApplied,
        net: NetHandle,
        book: AddressBook,
        config: BroadcastConfig,
        metrics: BroadcastMetrics,
        known_change_seq: KnownChangeSeq,
        health: StorageHealth,
    ) -> Result<Self, StoreError> {
        let runs = store.runs()?;
        let own_handed_on = runs.get(&me.to_string()).map_or(0, |r| r.last);
        let own_recovery = store.own_recovery_pending()?.then(|| {
            tracing::warn!(log = %store.path().display(),
                "this node's broadcast log is new but the node is not: its own earlier events are fetched back from its peers before it publishes again");
            OwnRecovery::default()
        });
        let origins = Origins::new(
            RepairConfig::default(),
            runs.into_iter().map(|(o, r)| (o, r.first, r.last)),
        );
        let window_ms = config.publish_key_window.as_millis() as u64;
        let publish_keys = PublishKeys::new(
            window_ms,
            MAX_PUBLISH_KEYS,
            store.publish_keys(crate::membership::unix_ms().saturating_sub(window_ms))?,
        );
        let now = Instant::now();
        let mut actor = BroadcastActor {
            known_change_seq,
            own_recovery,
            publish_keys,
            own_handed_on,
            me,
            origin: me.to_string(),
            node,
            store,
            stripe_store,
            applied,
            net,
            book,
            origins,
            config,
            metrics,
            jobs: VecDeque::new(),
            busy: false,
            unwritten: Vec::new(),
            unwritten_events: 0,
            unwritten_bytes: 0,
            dropped_behind_log: 0,
            handed_on: Arc::new(AtomicU64::new(0)),
            fed_bytes: Arc::new(AtomicU64::new(0)),
            written: watch::Sender::new(0),
            importing: false,
            unsynced: false,
            stripe_durable: 0,
            subscribers: None,
            started: now,
            heads_heard: HashSet::new(),
            last_heads: now,
            last_prune: now,
            last_sync: now,
            reload_due: None,
            store_error: None,
            failures_in_row: 0,
            health,
        };
        actor.publish_known_change_seq();
        Ok(actor)
    }

    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// The stripe this node holds data of, and whether it is its active.
    fn my_stripe(&self) -> Option<(u32, bool)> {
        let a = self.applied.read().ok()?;
        match a.state.nodes.get(&self.node)?.placement {
            Placement::Stripe(k) => {
                let active = a.state.stripes.get(&k).and_then(|s| s.active) == Some(self.node);
                Some((k, active))
            }
            Placement::Witness => None,
        }
    }

    fn peers(&self) -> Vec<PeerId> {
        self.book
            .read()
            .map(|b| b.keys().filter(|p| **p != self.me).copied().collect())
            .unwrap_or_default()
    }

    fn apply_effects(&mut self, effects: Vec<Effect>, gossip: bool, ctx: &mut Context<Self>) {
        for effect in effects {
            match effect {
                Effect::Append { origin, events } => {
                    self.deliver(&origin, &events, gossip);
                    self.handed_on.fetch_add(1, Ordering::Relaxed);
                    self.unwritten_events += events.len();
                    self.unwritten_bytes += frame_bytes(&events);
                    self.unwritten.push((origin, events));
                }
                // Not while the log is far behind: what a fetch brings would
                // wait in memory too. Asked again once the fetch times out.
                Effect::Fetch { .. } if self.unwritten_bytes >= MAX_UNWRITTEN_BYTES => {}
                Effect::Fetch { peer, origin, from } => self.fetch(peer, origin, from, ctx),
                // This node's own origin, while it fetches its events back.
                Effect::Reconnect { peer } if peer == self.me => {}
                Effect::Reconnect { peer } => {
                    tracing::warn!(%peer, repairs = super::state::SILENT_REPAIRS_MAX,
                        "this node's events reach us only by repair, none by gossip: closing the connection to it so that a new one starts with fresh gossip streams");
                    self.metrics.gossip_reconnects.inc();
                    self.net.send(NetCommand::Disconnect(peer));
                }
                Effect::SkipTo { origin, first } => {
                    tracing::warn!(%origin, first,
                        "events of this origin are gone from every log asked (older than retention); subscribers behind them get a resync");
                    self.metrics.holes_skipped.inc();
                    // After what was received before the hole.
                    self.flush_unwritten();
                    self.jobs.push_back(Job::SkipTo { origin, first });
                }
            }
        }
        if self.unwritten_events >= UNWRITTEN_EVENTS {
            self.flush_unwritten();
        }
        self.run_jobs(ctx);
    }

    /// Forgets the received events not yet given to an append (they are
    /// fetched again).
    fn drop_unwritten(&mut self) {
        let bytes: u64 = self.unwritten.iter().map(|(_, e)| frame_bytes(e)).sum();
        self.unwritten_bytes = self.unwritten_bytes.saturating_sub(bytes);
        self.unwritten.clear();
        self.unwritten_events = 0;
    }

    /// Queues the write of the received events handed to subscribers so far.
    fn flush_unwritten(&mut self) {
        if self.unwritten.is_empty() {
            return;
        }
        let batches = std::mem::take(&mut self.unwritten);
        self.unwritten_events = 0;
        let upto = self.handed_on.load(Ordering::Relaxed);
        if let Some(Job::Append {
            received, covers, ..
        }) = self.jobs.back_mut()
        {
            received.extend(batches);
            *covers = upto;
            return;
        }
        self.jobs.push_back(Job::Append {
            received: batches,
            covers: upto,
            own: Vec::new(),
        });
    }

    fn fetch(&mut self, peer: PeerId, origin: String, from: u64, ctx: &mut Context<Self>) {
        tracing::debug!(%peer, %origin, from, "fetching missed broadcast events");
        let call = self.net.call(
            peer,
            addresses(&self.book, &peer),
            Request::BroadcastFetch {
                origin: origin.clone(),
                from,
            },
        );
        ctx.spawn(
            call.into_actor(self)
                .map(move |result, act, ctx| act.on_fetched(peer, origin, result, ctx)),
        );
    }

    fn on_fetched(
        &mut self,
        peer: PeerId,
        origin: String,
        result: Result<Response, CallError>,
        ctx: &mut Context<Self>,
    ) {
        match result {
            Ok(Response::BroadcastEvents {
                origin: o,
                first,
                last,
                events,
            }) if o == origin => {
                if !events.is_empty() {
                    self.metrics.gap_repairs.inc();
                    BroadcastMetrics::origin(&self.metrics.repaired, &origin)
                        .inc_by(events.len() as u64);
                }
                let now = self.now_ms();
                let fx = self
                    .origins
                    .fetched(peer, &origin, first, last, events, now);
                self.apply_effects(fx, false, ctx);
            }
            other => {
                tracing::debug!(%peer, %origin, answer = ?other.map(|_| ()), "broadcast fetch failed");
                let now = self.now_ms();
                self.origins.fetch_failed(peer, &origin, now);
            }
        }
    }

    fn run_jobs(&mut self, ctx: &mut Context<Self>) {
        if self.busy {
            return;
        }
        if let Some(due) = self.reload_due {
            if Instant::now() >= due {
                self.start_reload(ctx);
            } else {
                self.refuse_jobs();
            }
            return;
        }
        let Some(mut job) = self.jobs.pop_front() else {
            return;
        };
        // Group commit: consecutive appends share one transaction (one fsync if
        // any of them holds this node's own events).
        if let Job::Append {
            received,
            covers,
            own,
        } = &mut job
        {
            while let Some(Job::Append { .. }) = self.jobs.front() {
                if let Some(Job::Append {
                    received: r,
                    covers: c,
                    own: o,
                }) = self.jobs.pop_front()
                {
                    received.extend(r);
                    *covers = (*covers).max(c);
                    own.extend(o);
                }
            }
        }
        self.busy = true;
        match job {
            Job::Append {
                received,
                covers,
                own,
            } => self.start_append(received, covers, own, ctx),
            Job::SkipTo { origin, first } => {
                let store = self.store.clone();
                let o = origin.clone();
                ctx.spawn(
                    blocking(move || store.skip_to(&o, first))
                        .into_actor(self)
                        .map(move |r, act, ctx| {
                            match r {
                                Ok(_) => act.log_wrote(),
                                Err(e) => {
                                    tracing::error!(error = %e, %origin, "cannot record a hole in the broadcast log");
                                    act.log_failed(&e);
                                }
                            }
                            act.busy = false;
                            act.run_jobs(ctx);
                        }),
                );
            }
            Job::FinishOwnRecovery => {
                let store = self.store.clone();
                ctx.spawn(
                    blocking(move || store.finish_own_recovery())
                        .into_actor(self)
                        .map(|r, act, ctx| {
                            match r {
                                Ok(()) => {
                                    act.log_wrote();
                                    let (stored, known) = act
                                        .origins
                                        .status(&act.origin)
                                        .map_or((0, 0), |s| (s.stored, s.head));
                                    let heard = act.own_recovery.as_ref().map_or(0, |r| r.head);
                                    if stored >= known.max(heard) {
                                        act.own_recovery = None;
                                        tracing::info!(continues_at = stored + 1,
                                            "this node's own earlier events are back in its broadcast log; publishing again");
                                    } else if let Some(r) = act.own_recovery.as_mut() {
                                        // A digest told of more meanwhile: fetch that too.
                                        r.finishing = false;
                                    }
                                }
                                Err(e) => {
                                    tracing::warn!(error = %e, "cannot end the recovery of this node's own events");
                                    if let Some(r) = act.own_recovery.as_mut() {
                                        r.finishing = false;
                                    }
                                    act.log_failed(&e);
                                }
                            }
                            act.busy = false;
                            act.run_jobs(ctx);
                        }),
                );
            }
            Job::Prune => {
                let store = self.store.clone();
                let now = crate::membership::unix_ms();
                let limits = self.config.retention;
                ctx.spawn(
                    blocking(move || {
                        let n = store.prune(now, limits, &MissedAbout::label_of_event)?;
                        Ok((n, store.runs()?))
                    })
                    .into_actor(self)
                    .map(|r, act, ctx| {
                        match r {
                            Ok((n, runs)) => {
                                act.metrics.pruned.inc_by(n);
                                if n > 0 {
                                    tracing::debug!(events = n, "broadcast log pruned");
                                }
                                for (origin, run) in runs {
                                    act.origins.pruned(&origin, run.first);
                                }
                            }
                            Err(e) => {
                                tracing::warn!(error = %e, "broadcast log pruning failed");
                                act.log_failed(&e);
                            }
                        }
                        act.busy = false;
                        act.run_jobs(ctx);
                    }),
                );
            }
            Job::Sync => {
                let store = self.store.clone();
                // Everything appended so far is durable once this commit is.
                let stripe_stored = self
                    .my_stripe()
                    .and_then(|(k, _)| self.origins.status(&stripe_origin(k)))
                    .map(|s| s.stored);
                ctx.spawn(blocking(move || store.sync()).into_actor(self).map(
                    move |r, act, ctx| {
                        match r {
                            Ok(()) => {
                                // It wrote the received events appended since
                                // the last one (queued only when there were some).
                                act.log_wrote();
                                if let Some(s) = stripe_stored {
                                    act.stripe_durable = act.stripe_durable.max(s);
                                }
                            }
                            Err(e) => {
                                tracing::warn!(error = %e, "cannot fsync the broadcast log");
                                act.log_failed(&e);
                            }
                        }
                        act.busy = false;
                        act.run_jobs(ctx);
                    },
                ));
            }
        }
    }

    fn start_append(
        &mut self,
        received: Vec<(String, Vec<EventFrame>)>,
        covers: u64,
        own: Vec<OwnPublish>,
        ctx: &mut Context<Self>,
    ) {
        let ts = crate::membership::unix_ms();
        let mut replies = Vec::new();
        let mut own_frames = Vec::new();
        let mut keyed = Vec::new();
        for OwnPublish { bodies, reply, key } in own {
            if let Some((k, digest)) = &key {
                if let Some((check, waiters)) = self.publish_keys.take_recalled(k, digest) {
                    // Its first try reached the log after all (see `start_reload`).
                    for w in waiters.into_iter().chain([reply]) {
                        let _ = w.send(match check {
                            KeyCheck::Answered { first, count } => {
                                Ok((first..first + count).collect())
                            }
                            _ => Err(PublishError::KeyReused),
                        });
                    }
                    continue;
                }
            }
            let count = bodies.len() as u64;
            let first = self.origins.reserve(&self.origin, count);
            let seqs: Vec<u64> = (first..first + count).collect();
            for (seq, body) in seqs.iter().zip(bodies) {
                own_frames.push(EventFrame {
                    seq: *seq,
                    ts,
                    body: ByteBuf::from(body),
                });
            }
            if let Some((key, digest)) = &key {
                keyed.push(PublishKey {
                    key: key.clone(),
                    at_ms: ts,
                    digest: *digest,
                    first,
                    count,
                });
            }
            replies.push((reply, key, seqs));
        }
        let expire_keys_before = ts.saturating_sub(self.publish_keys.window_ms());
        // Received events are not fsynced one by one: their origin holds them
        // durably, and what a crash loses here is fetched again.
        let durable = !own_frames.is_empty();
        let rows: Vec<StoredEvent> = received
            .iter()
            .map(|(origin, events)| (origin, events))
            .chain((!own_frames.is_empty()).then_some((&self.origin, &own_frames)))
            .flat_map(|(origin, events)| {
                events.iter().map(move |e| StoredEvent {
                    origin: origin.clone(),
                    seq: e.seq,
                    ts: e.ts,
                    bytes: e.body.to_vec(),
                })
            })
            .collect();
        let store = self.store.clone();
        let received_bytes: u64 = received.iter().map(|(_, e)| frame_bytes(e)).sum();
        let keys = keyed.clone();
        ctx.spawn(
            blocking(move || store.append_keyed(&rows, &keys, expire_keys_before, durable))
                .into_actor(self)
                .map(move |r, act, ctx| {
                    act.busy = false;
                    act.unwritten_bytes = act.unwritten_bytes.saturating_sub(received_bytes);
                    match r {
                        Ok(()) => {
                            if durable {
                                act.log_wrote();
                            } else {
                                act.unsynced = true;
                            }
                            for (origin, events) in &received {
                                if let Some(last) = events.last() {
                                    act.origins.appended(origin, last.seq);
                                    if *origin == act.origin {
                                        // Own events fetched back from peers
                                        // (own recovery): they have them.
                                        act.own_handed_on = act.own_handed_on.max(last.seq);
                                    }
                                }
                            }
                            act.written.send_if_modified(|w| {
                                let more = covers > *w;
                                *w = (*w).max(covers);
                                more
                            });
                            for answer in keyed {
                                let seqs: Vec<u64> =
                                    (answer.first..answer.first + answer.count).collect();
                                for waiter in act.publish_keys.finished(answer) {
                                    let _ = waiter.send(Ok(seqs.clone()));
                                }
                            }
                            for (reply, _, seqs) in replies {
                                let _ = reply.send(Ok(seqs));
                            }
                            act.hand_on_own(own_frames);
                        }
                        Err(e) => {
                            tracing::error!(error = %e, "cannot append to the broadcast log");
                            // Handed to subscribers already: they step over the
                            // copies that come again.
                            for (origin, _) in &received {
                                act.origins.rollback(origin);
                            }
                            if durable {
                                let origin = act.origin.clone();
                                act.origins.unreserve(&origin);
                            }
                            for (reply, key, _) in replies {
                                let err = again(&e, act.store.path());
                                act.publish_failed(reply, key, err);
                            }
                            act.log_failed(&e);
                        }
                    }
                    act.run_jobs(ctx);
                }),
        );
    }

    /// A storage job failed. redb refuses every transaction of a handle that
    /// saw an I/O error; the store opens the file again (it may go back to its
    /// last durable commit), so the runs held are read again before anything
    /// else is written.
    fn log_failed(&mut self, e: &StoreError) {
        self.metrics.log_failures.inc();
        self.health
            .failing(StoragePart::Broadcast, "log", e.to_string());
        self.store_error = Some(again(e, self.store.path()));
        self.failures_in_row += 1;
        if self.reload_due.is_none() {
            let backoff = match self.failures_in_row {
                0 | 1 => Duration::ZERO,
                n => (RELOAD_RETRY * 2u32.pow((n - 2).min(5))).min(RELOAD_BACKOFF_MAX),
            };
            self.reload_due = Some(Instant::now() + backoff);
        }
    }

    /// A durable write of the log succeeded. Only a durable one counts: redb
    /// keeps a non-durable commit's pages in memory, so one can succeed on a
    /// full disk.
    fn log_wrote(&mut self) {
        if self.failures_in_row > 0 {
            self.failures_in_row = 0;
            self.health.ok(StoragePart::Broadcast, "log");
        }
    }

    /// Reads the runs the log holds and goes on from them: what the file lost
    /// is fetched again (subscribers step over the copies they had).
    fn start_reload(&mut self, ctx: &mut Context<Self>) {
        self.busy = true;
        let store = self.store.clone();
        let reopens = store.reopens();
        let (own, handed_on) = (self.origin.clone(), self.own_handed_on);
        let since_ms = crate::membership::unix_ms().saturating_sub(self.publish_keys.window_ms());
        let reload = move || {
            let runs = store.reload_runs()?;
            // An append answered with an error may have reached the file: its
            // events and keys count as published once a durable commit says
            // the disk holds them (the file read back may be the page cache).
            store.sync()?;
            let keys = store.publish_keys(since_ms)?;
            // Own events appended but never handed on: at most those of the
            // group commit that failed (own events fetched back from peers
            // count as handed on), so bounded by the node's body budget.
            let mut unsent = Vec::new();
            let last = runs.get(&own).map_or(0, |r| r.last);
            while unsent.last().map_or(handed_on, |e: &EventFrame| e.seq) < last {
                let from = unsent.last().map_or(handed_on, |e: &EventFrame| e.seq) + 1;
                let part = store.range(&own, from, 4096, 16 << 20)?;
                if part.is_empty() {
                    break;
                }
                unsent.extend(part.into_iter().map(|(seq, ts, bytes)| EventFrame {
                    seq,
                    ts,
                    body: ByteBuf::from(bytes),
                }));
            }
            Ok::<_, StoreError>((runs, keys, unsent))
        };
        ctx.spawn(blocking(reload).into_actor(self).map(
            move |r, act, ctx| {
                act.busy = false;
                match r {
                    Ok((runs, keys, unsent)) => {
                        let now = act.now_ms();
                        act.origins.reload(&runs, now);
                        let own = act.origin.clone();
                        act.origins.unreserve(&own);
                        act.publish_keys.recall(keys);
                        act.hand_on_own(unsent);
                        // Handed on, but after what the log may hold now:
                        // fetched again. Holes found are found again.
                        act.drop_unwritten();
                        act.drop_queued_received();
                        act.reload_due = None;
                        // An fsync within a second says whether the disk takes
                        // writes again, even on a node with nothing to write.
                        act.unsynced = true;
                        tracing::info!(
                            origins = runs.len(),
                            reopened = act.store.reopens() > reopens,
                            "broadcast log read again after a storage error; events it lost are fetched again"
                        );
                    }
                    // A reader of the old handle is still busy: shortly, and
                    // not counted as a failure.
                    Err(e @ StoreError::Reopening { .. }) => {
                        tracing::debug!(error = %e, "broadcast log not opened again yet");
                        act.reload_due = Some(Instant::now() + REOPEN_WAIT);
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, path = %act.store.path().display(), "cannot open the broadcast log again (retrying with a backoff of up to 30 s; this node's publishes get 507 meanwhile)");
                        act.reload_due = None;
                        act.log_failed(&e);
                    }
                }
                act.run_jobs(ctx);
            },
        ));
    }

    /// Takes the received events out of the queued appends (this node's own
    /// events stay), and the queued hole skips and end of an own recovery
    /// (what it was to make durable went with them).
    fn drop_queued_received(&mut self) {
        let mut dropped = 0;
        let mut finish_dropped = false;
        self.jobs.retain_mut(|job| match job {
            Job::Append { received, own, .. } => {
                dropped += received.iter().map(|(_, e)| frame_bytes(e)).sum::<u64>();
                received.clear();
                !own.is_empty()
            }
            Job::SkipTo { .. } => false,
            Job::FinishOwnRecovery => {
                finish_dropped = true;
                false
            }
            Job::Prune | Job::Sync => true,
        });
        self.unwritten_bytes = self.unwritten_bytes.saturating_sub(dropped);
        if let (true, Some(r)) = (finish_dropped, self.own_recovery.as_mut()) {
            r.finishing = false;
        }
    }

    /// While the log cannot be read again: this node's new events are refused
    /// (507), received ones dropped (fetched again once it can).
    fn refuse_jobs(&mut self) {
        self.drop_unwritten();
        self.drop_queued_received();
        let path = self.store.path().to_path_buf();
        let jobs: Vec<Job> = self.jobs.drain(..).collect();
        for job in jobs {
            if let Job::Append { own, .. } = job {
                for publish in own {
                    let err = self.store_error.as_ref().map_or_else(
                        || StoreError::Reopening { path: path.clone() },
                        |e| again(e, &path),
                    );
                    self.publish_failed(publish.reply, publish.key, err);
                }
            }
        }
    }

    /// This node's own events, just in the log: to its subscribers and peers.
    fn hand_on_own(&mut self, frames: Vec<EventFrame>) {
        let Some(last) = frames.last().map(|e| e.seq) else {
            return;
        };
        let origin = self.origin.clone();
        self.origins.appended(&origin, last);
        self.own_handed_on = self.own_handed_on.max(last);
        self.deliver(&origin, &frames, false);
        BroadcastMetrics::origin(&self.metrics.published, &origin).inc_by(frames.len() as u64);
        self.gossip(origin, frames);
    }

    /// Tells a publish, and the retries waiting under its Idempotency-Key,
    /// that it failed; the key is free again.
    fn publish_failed(
        &mut self,
        reply: PublishReply,
        key: Option<(String, [u8; 32])>,
        err: StoreError,
    ) {
        if let Some((key, _)) = key {
            let path = self.store.path().to_path_buf();
            for waiter in self.publish_keys.failed(&key) {
                let _ = waiter.send(Err(PublishError::Storage(again(&err, &path))));
            }
        }
        let _ = reply.send(Err(PublishError::Storage(err)));
    }

    /// Hands events, in order, to the node's subscribers (and to its peers, for
    /// the events this node gossips).
    fn deliver(&mut self, origin: &str, events: &[EventFrame], gossip: bool) {
        let now = crate::membership::unix_ms();
        BroadcastMetrics::origin(&self.metrics.delivered, origin).inc_by(events.len() as u64);
        if self
            .subscribers
            .as_ref()
            .is_some_and(|s| s.receiver_count() == 0)
        {
            // The last subscriber left: give the feed's buffer back.
            self.subscribers = None;
        }
        for e in events {
            self.metrics
                .latency
                .observe(now.saturating_sub(e.ts) as f64 / 1000.0);
            if let Some(feed) = &self.subscribers {
                let delivered = Delivered::decode(origin, e.seq, e.ts, &e.body);
                // Counted before it is sent: a subscriber never sees itself
                // further ahead than the feed.
                self.fed_bytes
                    .fetch_add(delivered.weight, Ordering::Relaxed);
                let _ = feed.send(Arc::new(delivered));
            }
        }
        if gossip {
            self.gossip(origin.to_string(), events.to_vec());
        }
    }

    fn gossip(&self, origin: String, events: Vec<EventFrame>) {
        let mut batch = Vec::new();
        let mut size = 0;
        for e in events {
            if !batch.is_empty() && size + e.body.len() > GOSSIP_BATCH_BYTES {
                self.net
                    .send(NetCommand::PublishBroadcast(BroadcastGossip::Events {
                        origin: origin.clone(),
                        events: std::mem::take(&mut batch),
                    }));
                size = 0;
            }
            size += e.body.len() + 32;
            batch.push(e);
        }
        if !batch.is_empty() {
            self.net
                .send(NetCommand::PublishBroadcast(BroadcastGossip::Events {
                    origin,
                    events: batch,
                }));
        }
    }

    fn tick(&mut self, ctx: &mut Context<Self>) {
        let now = self.now_ms();
        let peers = self.peers();
        let fx = self.origins.tick(now, &peers);
        self.apply_effects(fx, false, ctx);
        self.publish_known_change_seq();
        self.own_recovered();
        self.import_changes(ctx);
        self.flush_unwritten();
        if self.last_heads.elapsed() >= HEADS_EVERY {
            self.last_heads = Instant::now();
            // Sent empty too: a node waiting to settle its known change seq
            // counts every node's digest.
            self.net
                .send(NetCommand::PublishBroadcast(BroadcastGossip::Heads {
                    heads: self.origins.heads(),
                    sent_ms: crate::membership::unix_ms(),
                }));
        }
        if self.last_prune.elapsed() >= PRUNE_EVERY {
            self.last_prune = Instant::now();
            self.jobs.push_back(Job::Prune);
            self.prune_outbox();
        }
        if self.unsynced && self.last_sync.elapsed() >= SYNC_EVERY {
            self.last_sync = Instant::now();
            self.unsynced = false;
            self.jobs.push_back(Job::Sync);
        }
        self.run_jobs(ctx);
    }

    /// Other nodes whose digest is not in `heard`: those of the control state
    /// and the peers membership knows. Unknown while the control state cannot
    /// be read or does not hold this node yet.
    fn unheard(&self, heard: &HashSet<PeerId>) -> Option<usize> {
        let a = self.applied.read().ok()?;
        if !a.state.nodes.contains_key(&self.node) {
            return None;
        }
        let heard: HashSet<String> = heard.iter().map(PeerId::to_string).collect();
        let mut others: HashSet<String> = a
            .state
            .nodes
            .iter()
            .filter(|(n, _)| **n != self.node)
            .map(|(_, e)| e.peer.clone())
            .collect();
        others.extend(self.peers().iter().map(PeerId::to_string));
        Some(others.difference(&heard).count())
    }

    /// Whether this node may give out seqs of its own (see [`OwnRecovery`]);
    /// moves the recovery on.
    fn own_recovered(&mut self) -> bool {
        let Some(recovery) = &self.own_recovery else {
            return true;
        };
        let waited = self.started.elapsed();
        let settled = match recovery.settled {
            Some(at) => at,
            None => {
                let unheard = self.unheard(&recovery.heard);
                let heard_any = !recovery.heard.is_empty();
                // Hearing nobody is no proof that nobody holds this node's
                // events (its control state may predate every other node's
                // join), unless it knows of nobody else.
                let alone = unheard == Some(0) && !heard_any;
                let enough = (unheard == Some(0) && heard_any)
                    || (waited >= SETTLE_WAIT && (heard_any || alone))
                    || waited >= RECOVERY_HEAR_MAX;
                if !enough {
                    return false;
                }
                if heard_any || alone {
                    tracing::info!(unheard = ?unheard, waited_ms = waited.as_millis() as u64,
                        "heard from the other nodes about this node's own earlier events");
                } else {
                    tracing::warn!(waited_ms = waited.as_millis() as u64,
                        "no other node answered about this node's own earlier events: going on with what the log holds; events of this node that a peer holds may be given their seqs again");
                }
                let now = Instant::now();
                if let Some(r) = self.own_recovery.as_mut() {
                    r.settled = Some(now);
                }
                now
            }
        };
        let status = self.origins.status(&self.origin);
        let (stored, known) = status.map_or((0, 0), |s| (s.stored, s.head));
        let head = known.max(self.own_recovery.as_ref().map_or(0, |r| r.head));
        if stored < head {
            if settled.elapsed() >= RECOVERY_FETCH_WAIT {
                tracing::warn!(stored, head, waited_s = settled.elapsed().as_secs(),
                    "this node's own events up to the highest seq its peers reported could not all be fetched back: continuing above it (the events not fetched are skipped here)");
                let fx = self.origins.skip_before(&self.origin, head + 1);
                self.apply_own_effects(fx);
            }
            return false;
        }
        let Some(recovery) = self.own_recovery.as_mut() else {
            return true;
        };
        if !recovery.finishing {
            // What was fetched back is durable before a seq above it is given out.
            recovery.finishing = true;
            self.flush_unwritten();
            self.jobs.push_back(Job::FinishOwnRecovery);
        }
        false
    }

    /// Effects of skipping within this node's own origin (no context needed).
    fn apply_own_effects(&mut self, fx: Vec<Effect>) {
        for effect in fx {
            if let Effect::SkipTo { origin, first } = effect {
                self.metrics.holes_skipped.inc();
                self.flush_unwritten();
                self.jobs.push_back(Job::SkipTo { origin, first });
            }
        }
    }

    /// Tells the stripe actor the highest change seq of this node's stripe known
    /// here (held, or seen in a peer's digest), and settles it once every other
    /// node of the cluster sent its digest, or after [`SETTLE_WAIT`].
    fn publish_known_change_seq(&mut self) {
        let Some((stripe, _)) = self.my_stripe() else {
            return;
        };
        let head = self
            .origins
            .status(&stripe_origin(stripe))
            .map_or(0, |s| s.head);
        self.known_change_seq.set(head);
        if self.known_change_seq.settled() {
            return;
        }
        let unheard = self.unheard(&self.heads_heard);
        let waited = self.started.elapsed();
        if unheard == Some(0) || waited >= SETTLE_WAIT {
            self.known_change_seq.settle();
            self.heads_heard = HashSet::new();
            tracing::info!(
                stripe,
                change_seq = head,
                waited_ms = waited.as_millis() as u64,
                unheard = ?unheard,
                "known change seq of the stripe settled"
            );
        }
    }

    /// Takes the change events of this node's stripe from its outbox into the log
    /// (the active also gossips them).
    fn import_changes(&mut self, ctx: &mut Context<Self>) {
        let Some(stripe_store) = self.stripe_store.clone() else {
            return;
        };
        if self.importing {
            return;
        }
        let Some((stripe, _)) = self.my_stripe() else {
            return;
        };
        let origin = stripe_origin(stripe);
        let next = self.origins.next(&origin);
        if stripe_store.changes_head() < next {
            return;
        }
        self.importing = true;
        ctx.spawn(
            blocking(move || stripe_store.changes(next, 4_096))
                .into_actor(self)
                .map(move |r, act, ctx| {
                    act.importing = false;
                    let changes = match r {
                        Ok(c) => c,
                        Err(e) => {
                            tracing::warn!(error = %e, "cannot read the stripe's change outbox");
                            return;
                        }
                    };
                    let now = crate::membership::unix_ms();
                    let frames: Vec<EventFrame> = changes
                        .into_iter()
                        .map(|(seq, bytes)| {
                            match ciborium::from_reader::<KvChange, _>(bytes.as_slice()) {
                                Ok(change) => EventFrame {
                                    seq,
                                    ts: change.ts,
                                    body: ByteBuf::from(
                                        EventBody::of_kv_change(&change).to_cbor(),
                                    ),
                                },
                                // Its seq still counts (every member skips the
                                // same one): an event subscribers step over,
                                // not a gap that nobody can ever fill.
                                Err(e) => {
                                    tracing::warn!(%origin, seq, error = %e, "a change event in the stripe's outbox does not decode; passed on empty");
                                    EventFrame {
                                        seq,
                                        ts: now,
                                        body: ByteBuf::new(),
                                    }
                                }
                            }
                        })
                        .collect();
                    let active = act.my_stripe().is_some_and(|(k, a)| k == stripe && a);
                    let fx = act.origins.receive(&origin, frames, None, now);
                    act.apply_effects(fx, active, ctx);
                }),
        );
    }

    /// Drops outbox entries the log holds (now and then; they are small).
    fn prune_outbox(&self) {
        let (Some(stripe_store), Some((stripe, _))) = (self.stripe_store.clone(), self.my_stripe())
        else {
            return;
        };
        // Only what the broadcast log holds durably: a crash may undo the rest.
        let stored = self.stripe_durable.min(
            self.origins
                .status(&stripe_origin(stripe))
                .map(|s| s.stored)
                .unwrap_or(0),
        );
        if stored == 0 {
            return;
        }
        tokio::task::spawn_blocking(move || {
            if let Err(e) = stripe_store.prune_changes(stored) {
                tracing::warn!(error = %e, "cannot prune the stripe's change outbox");
            }
        });
    }
}

/// The error again, for another recipient (redb errors are not `Clone`), as
/// what a publisher is told: the log at `path` cannot be written.
fn again(e: &StoreError, path: &Path) -> StoreError {
    let detail = match e {
        StoreError::Unwritable { detail, .. } => detail.clone(),
        StoreError::Storage { source, .. } => source.to_string(),
        other => other.to_string(),
    };
    StoreError::Unwritable {
        path: path.to_path_buf(),
        detail,
    }
}

impl Actor for BroadcastActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.run_interval(TICK, |act, ctx| act.tick(ctx));
    }
}

/// Publishes events with this node as their origin; answered with their seqs
/// once they are durable in the log.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Publish {
    pub bodies: Vec<EventBody>,
    /// The client's Idempotency-Key: a retry under it gets the first answer.
    pub key: Option<String>,
    pub reply: oneshot::Sender<Result<(String, Vec<u64>), PublishError>>,
}

/// What a publish under an Idempotency-Key is compared by: its events, encoded.
fn publish_digest(bodies: &[Vec<u8>]) -> [u8; 32] {
    let mut h = Sha256::new();
    for b in bodies {
        h.update((b.len() as u64).to_be_bytes());
        h.update(b);
    }
    h.finalize().into()
}

impl Handler<Publish> for BroadcastActor {
    type Result = ();

    fn handle(&mut self, msg: Publish, ctx: &mut Self::Context) {
        if !self.own_recovered() {
            let _ = msg.reply.send(Err(PublishError::Recovering));
            return;
        }
        let bodies: Vec<Vec<u8>> = msg.bodies.iter().map(EventBody::to_cbor).collect();
        let origin = self.origin.clone();
        let reply = msg.reply;
        let key = msg.key.map(|k| {
            let digest = publish_digest(&bodies);
            (k, digest)
        });
        let mut key_check = None;
        if let Some((k, digest)) = &key {
            // Marks a new key in flight; the answer below acts on that.
            let check = self
                .publish_keys
                .check(k, digest, crate::membership::unix_ms());
            if check == KeyCheck::Different {
                let _ = reply.send(Err(PublishError::KeyReused));
                return;
            }
            key_check = Some(check);
        }
        let (tx, rx) = oneshot::channel();
        let answer = async move {
            let r = match rx.await {
                Ok(Ok(seqs)) => Ok((origin, seqs)),
                Ok(Err(e)) => Err(e),
                Err(_) => Err(PublishError::Stopped),
            };
            let _ = reply.send(r);
        };
        match (&key, key_check) {
            (Some(_), Some(KeyCheck::Answered { first, count })) => {
                let _ = tx.send(Ok((first..first + count).collect()));
                actix_rt::spawn(answer);
                return;
            }
            (Some((k, _)), Some(KeyCheck::InFlight)) => {
                // Given back only if not in flight, which the check just said it is.
                let _ = self.publish_keys.wait(k, tx);
                actix_rt::spawn(answer);
                return;
            }
            _ => {}
        }
        // Received events waiting for their write share this fsync. With them
        // queued, everything handed on so far is written when this job is.
        self.flush_unwritten();
        let upto = self.handed_on.load(Ordering::Relaxed);
        let publish = OwnPublish {
            bodies,
            reply: tx,
            key,
        };
        match self.jobs.back_mut() {
            Some(Job::Append { own, covers, .. }) => {
                own.push(publish);
                *covers = (*covers).max(upto);
            }
            _ => self.jobs.push_back(Job::Append {
                received: Vec::new(),
                covers: upto,
                own: vec![publish],
            }),
        }
        actix_rt::spawn(answer);
        self.run_jobs(ctx);
    }
}

/// Bytes of received events waiting for the log beyond which gossip is
/// dropped (and fetched later): a stalled disk must not make the node hold
/// everything its peers send meanwhile.
const MAX_UNWRITTEN_BYTES: u64 = 64 << 20;

fn frame_bytes(events: &[EventFrame]) -> u64 {
    events.iter().map(|e| e.body.len() as u64 + 32).sum()
}

/// Gossip messages waiting in the broadcast actor's mailbox beyond which more
/// are dropped: the mailbox has no bound of its own, and a node that cannot
/// keep up would hold every message its peers send. What is dropped shows as
/// a gap and is fetched once the node catches up.
const MAX_GOSSIP_QUEUED: usize = 2_048;

/// Gossip from the broadcast topic.
#[derive(Message)]
#[rtype(result = "()")]
pub struct GossipIn {
    gossip: BroadcastIn,
    /// The inlet's count of messages waiting, taken off once this one is handled.
    queued: Arc<AtomicUsize>,
}

/// Hands gossip to the broadcast actor, dropping it while `MAX_GOSSIP_QUEUED`
/// messages wait there.
pub struct GossipInlet {
    actor: Recipient<GossipIn>,
    queued: Arc<AtomicUsize>,
    dropped: u64,
}

impl GossipInlet {
    pub fn new(actor: Recipient<GossipIn>) -> Self {
        GossipInlet {
            actor,
            queued: Arc::new(AtomicUsize::new(0)),
            dropped: 0,
        }
    }

    pub fn push(&mut self, gossip: BroadcastIn) {
        if self.queued.load(Ordering::Acquire) >= MAX_GOSSIP_QUEUED {
            self.dropped += 1;
            if self.dropped.is_power_of_two() {
                tracing::warn!(dropped = self.dropped, waiting = MAX_GOSSIP_QUEUED,
                    "broadcast gossip dropped: the node is not keeping up (the events are fetched later)");
            }
            return;
        }
        self.queued.fetch_add(1, Ordering::AcqRel);
        self.actor.do_send(GossipIn {
            gossip,
            queued: self.queued.clone(),
        });
    }
}

impl Handler<GossipIn> for BroadcastActor {
    type Result = ();

    fn handle(&mut self, msg: GossipIn, ctx: &mut Self::Context) {
        msg.queued.fetch_sub(1, Ordering::AcqRel);
        let now = self.now_ms();
        let BroadcastIn { source, msg } = msg.gossip;
        match msg {
            BroadcastGossip::Events { origin, events } => {
                if origin == self.origin {
                    // Our own events coming back: nothing new.
                    return;
                }
                if self.unwritten_bytes >= MAX_UNWRITTEN_BYTES {
                    // The log is far behind (a stalled disk): what is dropped
                    // shows as a gap, fetched once the log caught up.
                    self.dropped_behind_log += 1;
                    self.metrics.gossip_dropped_behind_log.inc();
                    if self.dropped_behind_log.is_power_of_two() {
                        tracing::warn!(dropped = self.dropped_behind_log, waiting_bytes = self.unwritten_bytes,
                            "broadcast gossip dropped: the broadcast log is not keeping up (the events are fetched later)");
                    }
                    return;
                }
                let fx = self.origins.receive(&origin, events, Some(source), now);
                self.apply_effects(fx, false, ctx);
            }
            BroadcastGossip::Heads { mut heads, .. } => {
                // A number no origin has is the peer's error: not taken as this
                // node's own head either (names are checked by `peer_heads`).
                heads.retain(|h| h.last <= MAX_SEQ);
                if !self.known_change_seq.settled() {
                    self.heads_heard.insert(source);
                }
                let recovering = match self.own_recovery.as_mut() {
                    Some(r) => {
                        r.heard.insert(source);
                        let own = heads.iter().filter(|h| h.origin == self.origin);
                        r.head = own.map(|h| h.last).fold(r.head, u64::max);
                        true
                    }
                    None => false,
                };
                // Nobody holds more of this node's events than it does, but
                // while it gets back what it lost.
                let heads: Vec<OriginHead> = heads
                    .into_iter()
                    .filter(|h| recovering || h.origin != self.origin)
                    .collect();
                self.origins.peer_heads(source, &heads, now);
            }
        }
    }
}

/// A peer asks for events it missed.
#[derive(Message)]
#[rtype(result = "()")]
pub struct ServeFetch {
    pub peer: PeerId,
    pub origin: String,
    pub from: u64,
    pub reply: Reply,
}

impl Handler<ServeFetch> for BroadcastActor {
    type Result = ();

    fn handle(&mut self, msg: ServeFetch, _ctx: &mut Self::Context) {
        let store = self.store.clone();
        let net = self.net.clone();
        let status = self.origins.status(&msg.origin);
        actix_rt::spawn(async move {
            let (first, last) = status.map(|s| (s.first, s.stored)).unwrap_or((1, 0));
            let origin = msg.origin;
            let from = msg.from.max(first);
            let o = origin.clone();
            let events = if from <= last {
                blocking(move || store.range(&o, from, FETCH_BATCH_EVENTS, FETCH_BATCH_BYTES)).await
            } else {
                Ok(Vec::new())
            };
            let response = match events {
                Ok(rows) => Response::BroadcastEvents {
                    origin,
                    first,
                    last,
                    events: rows
                        .into_iter()
                        .filter(|(seq, _, _)| *seq <= last)
                        .map(|(seq, ts, bytes)| EventFrame {
                            seq,
                            ts,
                            body: ByteBuf::from(bytes),
                        })
                        .collect(),
                },
                Err(e) => Response::Refused {
                    reason: format!("cannot read the broadcast log: {e}"),
                },
            };
            net.send(NetCommand::Respond {
                reply: msg.reply,
                response,
            });
        });
    }
}

/// What a new subscription needs: the live feed (taken first, so nothing falls
/// between it and the backlog), how far each origin has been handed to
/// subscribers, and the log.
pub struct Subscription {
    feed: broadcast::Receiver<Arc<Delivered>>,
    pub runs: HashMap<String, (u64, u64)>,
    pub store: Arc<BroadcastStore>,
    pub metrics: BroadcastMetrics,
    handed_on: Arc<AtomicU64>,
    written: watch::Receiver<u64>,
    fed_bytes: Arc<AtomicU64>,
    /// `fed_bytes` as far as this subscriber took events from `feed`.
    taken_bytes: u64,
    /// The most `behind_bytes` may be before the subscriber is told `lagged`.
    buffer_bytes: u64,
}

impl Subscription {
    /// The next live event (counted as taken, for the byte bound).
    pub async fn recv(&mut self) -> Result<Arc<Delivered>, broadcast::error::RecvError> {
        let ev = self.feed.recv().await?;
        self.taken_bytes += ev.weight;
        Ok(ev)
    }

    /// Live events waiting for this subscriber.
    pub fn waiting(&self) -> usize {
        self.feed.len()
    }

    /// Bytes of events in the feed this subscriber has not taken yet: what the
    /// node holds in memory for it.
    fn behind_bytes(&self) -> u64 {
        self.fed_bytes
            .load(Ordering::Relaxed)
            .saturating_sub(self.taken_bytes)
    }

    /// Fell further behind than its byte bound.
    pub fn too_far_behind(&self) -> bool {
        self.behind_bytes() > self.buffer_bytes
    }

    /// Waits until every event handed to subscribers so far is in the log
    /// (received events are written in batches, shortly after). Gives up after
    /// `limit` (a slow disk, or writing fails): false.
    pub async fn log_caught_up(&mut self, limit: Duration) -> bool {
        let target = self.handed_on.load(Ordering::Relaxed);
        matches!(
            tokio::time::timeout(limit, self.written.wait_for(|w| *w >= target)).await,
            Ok(Ok(_))
        )
    }
}

#[derive(Message)]
#[rtype(result = "Subscription")]
pub struct Subscribe;

impl Handler<Subscribe> for BroadcastActor {
    type Result = MessageResult<Subscribe>;

    fn handle(&mut self, _: Subscribe, _ctx: &mut Self::Context) -> Self::Result {
        let buffer = self.config.subscriber_buffer.max(16);
        let feed = self
            .subscribers
            .get_or_insert_with(|| broadcast::channel(buffer).0)
            .subscribe();
        let runs = self
            .origins
            .handed_on(&self.origin)
            .into_iter()
            .map(|(origin, first, last)| (origin, (first, last)))
            .collect();
        MessageResult(Subscription {
            feed,
            runs,
            store: self.store.clone(),
            metrics: self.metrics.clone(),
            handed_on: self.handed_on.clone(),
            written: self.written.subscribe(),
            fed_bytes: self.fed_bytes.clone(),
            // Events fed before it subscribed are not its to take.
            taken_bytes: self.fed_bytes.load(Ordering::Relaxed),
            buffer_bytes: self.config.subscriber_buffer_bytes,
        })
    }
}

/// Every origin this node knows: what it holds and the highest seq it knows of.
#[derive(Message)]
#[rtype(result = "Vec<(String, u64, u64, u64)>")]
pub struct GetOrigins;

impl Handler<GetOrigins> for BroadcastActor {
    type Result = MessageResult<GetOrigins>;

    fn handle(&mut self, _: GetOrigins, _ctx: &mut Self::Context) -> Self::Result {
        let mut out: Vec<(String, u64, u64, u64)> = self
            .origins
            .origin_names()
            .into_iter()
            .filter_map(|o| {
                let s = self.origins.status(&o)?;
                Some((o, s.first, s.stored, s.head))
            })
            .collect();
        out.sort();
        MessageResult(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Takes gossip off the count as the broadcast actor does, and keeps it.
    struct Sink(Vec<BroadcastIn>);

    impl Actor for Sink {
        type Context = Context<Self>;
    }

    impl Handler<GossipIn> for Sink {
        type Result = ();
        fn handle(&mut self, msg: GossipIn, _: &mut Context<Self>) {
            msg.queued.fetch_sub(1, Ordering::AcqRel);
            self.0.push(msg.gossip);
        }
    }

    #[derive(Message)]
    #[rtype(result = "usize")]
    struct Count;

    impl Handler<Count> for Sink {
        type Result = usize;
        fn handle(&mut self, _: Count, _: &mut Context<Self>) -> usize {
            self.0.len()
        }
    }

    fn heads() -> BroadcastIn {
        BroadcastIn {
            source: PeerId::random(),
            msg: BroadcastGossip::Heads {
                sent_ms: 1,
                heads: Vec::new(),
            },
        }
    }

    #[actix_rt::test]
    async fn gossip_beyond_what_the_actor_has_waiting_is_dropped() {
        let sink = Sink(Vec::new()).start();
        let mut inlet = GossipInlet::new(sink.clone().recipient());
        // The actor runs only when this task yields: all of these wait at once.
        for _ in 0..MAX_GOSSIP_QUEUED + 10 {
            inlet.push(heads());
        }
        assert_eq!(inlet.dropped, 10);
        assert_eq!(sink.send(Count).await.unwrap(), MAX_GOSSIP_QUEUED);
        // Handled, they no longer count.
        inlet.push(heads());
        assert_eq!(sink.send(Count).await.unwrap(), MAX_GOSSIP_QUEUED + 1);
        assert_eq!(inlet.dropped, 10);
    }
}
