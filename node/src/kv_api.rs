//! The key/value HTTP API: `/v1/kv/{map}/{key}` on every node, routed to the
//! active of the key's stripe (this node's own stripe actor, or a peer over
//! request-response). During a failover a request waits and retries, with the
//! command (its `Idempotency-Key` or its place in this node's retry session, so
//! it is applied once), for up to `request_timeout_ms`.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::Addr;
use actix_web::http::{header, StatusCode};
use actix_web::{web, HttpRequest, HttpResponse};
use futures::StreamExt;
use kiln_actors::control::state::SLOT_COUNT;
use kiln_actors::control::{addresses, AddressBook, SharedApplied};
use kiln_actors::stripe::kv::{
    idempotency_home, slot_of, Condition, KvCommand, KvOp, KvOutcome, SessionTag,
};
use kiln_actors::stripe::wire::{ServeError, StripeRequest, StripeResponse};
use kiln_actors::stripe::{
    stripe_active, stripe_request, stripe_response, stripe_view, Responder, ServeStripe,
    StripeActor,
};
use kiln_net::{NetHandle, PeerId};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use serde_json::json;
use tokio::sync::oneshot;

use crate::http::{ApiError, ApiState, BodyBudget, BodyRoom};

/// Longest key accepted, in bytes.
pub const MAX_KEY_BYTES: usize = 1024;
/// Pause between two attempts while a stripe has no reachable active.
const RETRY_PAUSE: Duration = Duration::from_millis(50);
/// One attempt at the active.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long requests to a stripe's active keep going through another member
/// after one was answered that way; then one tries the active directly again.
const RELAY_PREFERRED: Duration = Duration::from_secs(5);
/// How often an attempt still unanswered checks whether the stripe's active
/// changed meanwhile.
const ACTIVE_RECHECK: Duration = Duration::from_millis(100);
/// A planned handover waits for the standby to catch up.
const HANDOVER_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabel {
    /// `write` (put or delete), `read`, `list`.
    op: &'static str,
    /// `local`: this node is the active; `forwarded`: the active is another
    /// node; `relayed`: through another member, the active not answering this one.
    route: &'static str,
}

fn request_histogram() -> Histogram {
    Histogram::new([
        0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
    ])
}

/// `kiln_kv_request_seconds`.
#[derive(Clone)]
pub struct KvMetrics {
    requests: Family<RequestLabel, Histogram, fn() -> Histogram>,
}

impl KvMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = KvMetrics {
            requests: Family::new_with_constructor(request_histogram),
        };
        registry.sub_registry_with_prefix("kiln_kv").register(
            "request_seconds",
            "Time from a key/value request's arrival at this node to the active's answer, \
             retries included (op: write, read, list; route: local = this node is the \
             active, forwarded = the active is another node, relayed = through another \
             member, the active not answering this node); answered requests only",
            m.requests.clone(),
        );
        m
    }
}

/// Where key/value requests go.
pub struct KvRouter {
    pub me: u64,
    pub applied: SharedApplied,
    pub stripe: Option<Addr<StripeActor>>,
    pub net: NetHandle,
    pub book: AddressBook,
    pub request_timeout: Duration,
    pub max_value_bytes: usize,
    /// How long a request's result is remembered for retries (`reconnect_window_s`).
    pub reconnect_window: Duration,
    pub metrics: KvMetrics,
    /// Stripe → (its active, until when): requests to that active go through
    /// another member first, since the last one that did was answered that
    /// way (a direct attempt over a link that drops everything would cost each
    /// request the attempt timeout first).
    pub relay_preferred: std::sync::Mutex<HashMap<u32, (u64, Instant)>>,
    /// Numbers the writes this node takes without an `Idempotency-Key`.
    pub session: Arc<RetrySession>,
}

/// This node's retry session (see [`SessionTag`]): one per process start.
pub struct RetrySession {
    id: String,
    /// The last number given out, and the writes still waited for.
    state: std::sync::Mutex<(u64, BTreeSet<u64>)>,
}

impl Default for RetrySession {
    fn default() -> Self {
        RetrySession {
            id: format!("{:032x}", rand::random::<u128>()),
            state: Default::default(),
        }
    }
}

impl RetrySession {
    /// Numbers a write this node is about to send.
    fn begin(self: &Arc<Self>) -> Waiting {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.0 += 1;
        let seq = state.0;
        state.1.insert(seq);
        let done_below = state.1.first().copied().unwrap_or(seq);
        Waiting {
            session: self.clone(),
            tag: SessionTag {
                id: self.id.clone(),
                seq,
                done_below,
            },
        }
    }
}

/// A write of the retry session this node still waits for. Dropped (answered,
/// given up, or its client gone), it lets the stripes forget its outcome: no
/// copy of it is sent after that.
struct Waiting {
    session: Arc<RetrySession>,
    tag: SessionTag,
}

impl Drop for Waiting {
    fn drop(&mut self) {
        let mut state = self.session.state.lock().unwrap_or_else(|e| e.into_inner());
        state.1.remove(&self.tag.seq);
    }
}

impl KvRouter {
    /// How far behind its active each member of `stripe` is, by peer id, as
    /// the active says (`None` if it did not answer within `timeout`).
    pub async fn member_lags(
        &self,
        stripe: u32,
        timeout: Duration,
    ) -> Option<std::collections::BTreeMap<String, u64>> {
        let active = stripe_active(&self.applied, stripe)?;
        match self
            .ask(active, StripeRequest::Lags { stripe }, timeout)
            .await
        {
            Ok(StripeResponse::Lags(Ok(lags))) => Some(lags),
            _ => None,
        }
    }

    /// A write's request id, when it arrived, and until when its result is
    /// remembered: a client's `Idempotency-Key` for the reconnect window; without
    /// one, the write is numbered in this node's retry session (see
    /// [`Self::write_identified`]) and its outcome kept for as long as the node
    /// itself retries it.
    fn identify(&self, req: &HttpRequest) -> Result<(Option<String>, u64, u64), ApiError> {
        let now = kiln_actors::membership::unix_ms();
        Ok(match header_str(req, "idempotency-key")? {
            Some(k) if k.is_empty() || k.len() > 256 => {
                return Err(bad_request("Idempotency-Key must be 1 to 256 characters"))
            }
            Some(k) => (
                Some(format!("k:{k}")),
                now,
                now + self.reconnect_window.as_millis() as u64,
            ),
            None => (None, now, now + 2 * self.request_timeout.as_millis() as u64),
        })
    }

    /// Sends a write: under its `Idempotency-Key` (`request`), or numbered in
    /// this node's retry session until it is answered or given up.
    async fn write_identified(
        &self,
        request: Option<String>,
        op: KvOp,
        received_ms: u64,
        remember_until_ms: u64,
    ) -> Result<KvOutcome, ApiError> {
        let waiting = request.is_none().then(|| self.session.begin());
        let cmd = KvCommand {
            request: request.unwrap_or_default(),
            op,
            received_ms,
            remember_until_ms,
            session: waiting.as_ref().map(|w| w.tag.clone()),
        };
        let outcome = self.write(cmd).await;
        drop(waiting);
        outcome
    }

    fn stripe_of(&self, map: &str, key: &str) -> Result<u32, ApiError> {
        let a = self
            .applied
            .read()
            .map_err(|_| unavailable("control state"))?;
        if a.state.slots.is_empty() {
            return Err(unavailable("the cluster is not configured yet"));
        }
        let slot = slot_of(map, key, SLOT_COUNT);
        Ok(a.state.slots[slot as usize])
    }

    fn peer(&self, node: u64) -> Option<PeerId> {
        self.applied.read().ok()?.state.peer_of(node)?.parse().ok()
    }

    /// Sends a stripe request to `node`: this node's own stripe actor (a node
    /// does not dial itself) or a peer.
    async fn ask(
        &self,
        node: u64,
        request: StripeRequest,
        timeout: Duration,
    ) -> Result<StripeResponse, String> {
        if node == self.me {
            let addr = self.stripe.as_ref().ok_or("this node holds no stripe")?;
            let (tx, rx) = oneshot::channel();
            addr.do_send(ServeStripe {
                peer: self.net.local_peer_id,
                request,
                reply: Responder::Local(tx),
            });
            return match tokio::time::timeout(timeout, rx).await {
                Ok(Ok(resp)) => Ok(resp),
                _ => Err("this node's stripe did not answer in time".into()),
            };
        }
        let peer = self.peer(node).ok_or("the active's address is unknown")?;
        let call = self
            .net
            .call(peer, addresses(&self.book, &peer), stripe_request(&request));
        match tokio::time::timeout(timeout, call).await {
            Err(_) => Err(format!("{peer} did not answer in time")),
            Ok(Err(e)) => Err(e.to_string()),
            Ok(Ok(resp)) => stripe_response(resp),
        }
    }

    /// [`Self::ask`] of `node` on behalf of the stripe's `active` (the active
    /// itself, or a node relaying to it), given up as soon as the control
    /// plane names another active: one that is paused or cut off from this
    /// node does not answer, and its successor (elected within the election
    /// timeout) should not wait for this attempt's timeout.
    async fn ask_for_active(
        &self,
        stripe: u32,
        active: u64,
        node: u64,
        request: StripeRequest,
        timeout: Duration,
    ) -> Result<StripeResponse, String> {
        let attempt = self.ask(node, request, timeout);
        tokio::pin!(attempt);
        loop {
            if let Ok(answer) = tokio::time::timeout(ACTIVE_RECHECK, &mut attempt).await {
                return answer;
            }
            let now = stripe_active(&self.applied, stripe);
            if now != Some(active) {
                return Err(format!(
                    "the stripe's active changed while node {active} was asked"
                ));
            }
        }
    }

    /// Serves a peer's [`StripeRequest::Relay`]: one attempt at the active
    /// this node knows, never relayed further.
    pub async fn relay(
        &self,
        stripe: u32,
        request: StripeRequest,
    ) -> Result<StripeResponse, String> {
        let inner = match &request {
            StripeRequest::Write { stripe, .. }
            | StripeRequest::Read { stripe, .. }
            | StripeRequest::Keys { stripe, .. } => *stripe,
            _ => return Err("only client requests are relayed".into()),
        };
        if inner != stripe {
            return Err(format!(
                "a relay for stripe {stripe} carried a request for stripe {inner}"
            ));
        }
        let active = stripe_active(&self.applied, stripe)
            .ok_or_else(|| format!("stripe {stripe} has no active"))?;
        self.ask_for_active(stripe, active, active, request, ATTEMPT_TIMEOUT)
            .await
    }

    /// Whether requests to `active` of `stripe` go through another member first
    /// (see [`Self::relay_preferred`]).
    fn prefers_relay(&self, stripe: u32, active: u64) -> bool {
        self.relay_preferred
            .lock()
            .ok()
            .and_then(|p| p.get(&stripe).copied())
            .is_some_and(|(a, until)| a == active && Instant::now() < until)
    }

    /// Remembers how the active of `stripe` last answered: through another
    /// member (preferred for [`RELAY_PREFERRED`] from then, not extended by
    /// later relayed answers, so that the active is tried directly again) or
    /// directly (not any more).
    fn note_route(&self, stripe: u32, active: u64, relayed: bool) {
        let Ok(mut p) = self.relay_preferred.lock() else {
            return;
        };
        if !relayed {
            p.remove(&stripe);
            return;
        }
        let now = Instant::now();
        let current = p
            .get(&stripe)
            .is_some_and(|(a, until)| *a == active && now < *until);
        if !current {
            p.insert(stripe, (active, now + RELAY_PREFERRED));
        }
    }

    /// A member of `stripe` other than this node and its `active` to relay a
    /// request through when the active does not answer this node: an in-sync
    /// standby first (the active replicates to it, so it reaches the active),
    /// taken in turn by `turn`.
    fn relay_through(&self, stripe: u32, active: u64, turn: usize) -> Option<u64> {
        let v = stripe_view(&self.applied, stripe)?;
        let usable = |n: &&u64| **n != self.me && **n != active;
        let mut helpers: Vec<u64> = v.in_sync.iter().filter(usable).copied().collect();
        if helpers.is_empty() {
            helpers = v.members.iter().filter(usable).copied().collect();
        }
        (!helpers.is_empty()).then(|| helpers[turn % helpers.len()])
    }

    /// Sends `request` to the stripe's current active until `answer` takes its
    /// reply or the request timeout passes; a retry is the same request (the
    /// same command), so it is applied once.
    async fn routed<T>(
        &self,
        op: &'static str,
        stripe: u32,
        request: StripeRequest,
        answer: impl Fn(StripeResponse) -> Option<Result<T, ServeError>>,
    ) -> Result<T, ApiError> {
        let deadline = Instant::now() + self.request_timeout;
        self.routed_until(deadline, op, stripe, request, answer)
            .await
    }

    /// [`Self::routed`] with the deadline of a request that routes more than
    /// once (a write that reserves its Idempotency-Key first).
    async fn routed_until<T>(
        &self,
        deadline: Instant,
        op: &'static str,
        stripe: u32,
        mut request: StripeRequest,
        answer: impl Fn(StripeResponse) -> Option<Result<T, ServeError>>,
    ) -> Result<T, ApiError> {
        let started = Instant::now();
        // An attempt whose write may have been committed (in the log when the
        // storage failed, stepped down from, or unanswered): no later attempt
        // (applied at most once, the same command) may say "not persisted".
        let mut unsettled = false;
        // After an attempt at the active failed while it stayed the active,
        // the next goes through another member (the link from this node to the
        // active may be down while theirs is up), then directly again:
        // `Some(true)` when the last failed attempt was relayed.
        let mut last_failed: Option<bool> = None;
        let mut relays = 0;
        loop {
            let active = stripe_active(&self.applied, stripe);
            let why = match active {
                None => "no active".to_string(),
                Some(a) => {
                    // No attempt outlives the request's deadline.
                    let left = deadline.saturating_duration_since(Instant::now());
                    let timeout = ATTEMPT_TIMEOUT.min(left.max(RETRY_PAUSE));
                    let relay = match last_failed {
                        Some(relayed) => !relayed,
                        None => self.prefers_relay(stripe, a),
                    };
                    let helper = match relay && a != self.me {
                        true => self.relay_through(stripe, a, relays),
                        false => None,
                    };
                    let attempt = match helper {
                        Some(h) => {
                            relays += 1;
                            let relay = StripeRequest::Relay {
                                stripe,
                                request: Box::new(request.clone()),
                            };
                            self.ask_for_active(stripe, a, h, relay, timeout).await
                        }
                        None => {
                            self.ask_for_active(stripe, a, a, request.clone(), timeout)
                                .await
                        }
                    };
                    // Whatever came of it, the request may have reached the log.
                    request.mark_retried();
                    last_failed = (attempt.is_err()
                        && stripe_active(&self.applied, stripe) == Some(a))
                    .then_some(helper.is_some());
                    match attempt {
                        Err(e) => {
                            // The attempt may have reached the log (a timeout).
                            unsettled = true;
                            e
                        }
                        Ok(resp) => match answer(resp) {
                            None => "unexpected answer".to_string(),
                            Some(Ok(t)) => {
                                self.note_route(stripe, a, helper.is_some());
                                let route = match (helper, a == self.me) {
                                    (Some(_), _) => "relayed",
                                    (None, true) => "local",
                                    (None, false) => "forwarded",
                                };
                                self.metrics
                                    .requests
                                    .get_or_create(&RequestLabel { op, route })
                                    .observe(started.elapsed().as_secs_f64());
                                return Ok(t);
                            }
                            Some(Err(ServeError::Storage(e))) if op == "write" && !unsettled => {
                                return Err(ApiError::new(
                                    StatusCode::INSUFFICIENT_STORAGE,
                                    format!("the write could not be persisted: {e}"),
                                ))
                            }
                            Some(Err(ServeError::Unsettled(e))) => {
                                unsettled = true;
                                format!("the stripe's storage failed while the write was replicated: {e}")
                            }
                            Some(Err(e)) => {
                                // Stepped down with the write in its log: it
                                // may be committed by the next active.
                                unsettled |= matches!(e, ServeError::SteppedDown);
                                e.to_string()
                            }
                        },
                    }
                }
            };
            if Instant::now() >= deadline {
                if unsettled && op == "write" {
                    let keyed = matches!(&request, StripeRequest::Write { cmd, .. }
                        if cmd.request.starts_with("k:"));
                    let resend = if keyed {
                        "send it again with the same Idempotency-Key"
                    } else {
                        "read the key before sending it again (without an Idempotency-Key \
                         a resent write may apply twice)"
                    };
                    return Err(ApiError::retry_later(format!(
                        "the outcome of this write on stripe {stripe} is not known yet ({why}); \
                         it may have been applied: {resend}"
                    )));
                }
                return Err(ApiError::retry_later(format!(
                    "stripe {stripe} has no reachable active ({why}); retry later"
                )));
            }
            tokio::time::sleep(RETRY_PAUSE).await;
        }
    }

    pub async fn write(&self, cmd: KvCommand) -> Result<KvOutcome, ApiError> {
        let (map, key) = cmd
            .op
            .map_key()
            .ok_or_else(|| bad_request("a reservation is not a client write"))?;
        let stripe = self.stripe_of(map, key)?;
        let deadline = Instant::now() + self.request_timeout;
        // An Idempotency-Key's scope is the cluster: one whose home stripe is
        // not the write's is taken there first, for this request only (a
        // different request under it is refused there, a retry passes).
        if let Some(k) = cmd.request.strip_prefix("k:") {
            let (home_map, home_key) = idempotency_home(k);
            let home = self.stripe_of(home_map, home_key)?;
            if home != stripe {
                let reserve = KvCommand {
                    request: cmd.request.clone(),
                    op: KvOp::Reserve {
                        fingerprint: cmd.fingerprint(),
                    },
                    received_ms: cmd.received_ms,
                    remember_until_ms: cmd.remember_until_ms,
                    session: None,
                };
                let taken = self
                    .routed_until(
                        deadline,
                        "write",
                        home,
                        StripeRequest::Write {
                            stripe: home,
                            cmd: reserve,
                            first_attempt: true,
                        },
                        |r| match r {
                            StripeResponse::Written(w) => Some(w),
                            _ => None,
                        },
                    )
                    .await?;
                if taken == KvOutcome::RequestIdReused {
                    return Ok(taken);
                }
            }
        }
        self.routed_until(
            deadline,
            "write",
            stripe,
            StripeRequest::Write {
                stripe,
                cmd,
                first_attempt: true,
            },
            |r| match r {
                StripeResponse::Written(w) => Some(w),
                _ => None,
            },
        )
        .await
    }

    pub async fn read(
        &self,
        map: &str,
        key: &str,
        stale: bool,
    ) -> Result<Option<(u64, Vec<u8>)>, ApiError> {
        let stripe = self.stripe_of(map, key)?;
        let request = StripeRequest::Read {
            stripe,
            map: map.into(),
            key: key.into(),
            stale,
        };
        if stale {
            return self.read_stale(stripe, request).await;
        }
        self.routed("read", stripe, request, |r| match r {
            StripeResponse::Value(v) => Some(v.map(|v| v.map(|(ver, b)| (ver, b.into_vec())))),
            _ => None,
        })
        .await
    }

    /// A `?stale=true` read, answered by any member that holds every
    /// acknowledged write (the active or an in-sync standby; this node first if
    /// it is one): it goes on while the stripe has no active, during a failover.
    async fn read_stale(
        &self,
        stripe: u32,
        request: StripeRequest,
    ) -> Result<Option<(u64, Vec<u8>)>, ApiError> {
        let started = Instant::now();
        let deadline = started + self.request_timeout;
        loop {
            let mut holders: Vec<u64> = Vec::new();
            if let Some(v) = stripe_view(&self.applied, stripe) {
                let holds = |n: &u64| v.active == Some(*n) || v.in_sync.contains(n);
                if holds(&self.me) {
                    holders.push(self.me);
                }
                holders.extend(v.active.filter(|a| *a != self.me));
                holders.extend(v.in_sync.iter().filter(|n| **n != self.me));
            }
            let mut why = "no member holds every write".to_string();
            for n in holders {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                why = match self
                    .ask(n, request.clone(), ATTEMPT_TIMEOUT.min(left))
                    .await
                {
                    Ok(StripeResponse::Value(Ok(v))) => {
                        let route = if n == self.me { "local" } else { "forwarded" };
                        self.metrics
                            .requests
                            .get_or_create(&RequestLabel { op: "read", route })
                            .observe(started.elapsed().as_secs_f64());
                        return Ok(v.map(|(ver, b)| (ver, b.into_vec())));
                    }
                    Ok(StripeResponse::Value(Err(e))) => e.to_string(),
                    Ok(_) => "unexpected answer".to_string(),
                    Err(e) => e,
                };
            }
            if Instant::now() >= deadline {
                return Err(ApiError::retry_later(format!(
                    "no member of stripe {stripe} answered a stale read ({why}); retry later"
                )));
            }
            tokio::time::sleep(RETRY_PAUSE).await;
        }
    }

    /// Planned handover of `stripe`'s active role; answers the new active.
    pub async fn handover(
        &self,
        stripe: u32,
        to: Option<String>,
    ) -> Result<Option<String>, ApiError> {
        let active = stripe_view(&self.applied, stripe)
            .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, format!("no stripe {stripe}")))?
            .active
            .ok_or_else(|| unavailable(&format!("stripe {stripe} has no active")))?;
        let result = match self
            .ask(
                active,
                StripeRequest::HandOver { stripe, to },
                HANDOVER_TIMEOUT,
            )
            .await
        {
            Ok(StripeResponse::HandedOver(r)) => r,
            Ok(other) => Err(format!("unexpected answer {other:?}")),
            Err(e) => Err(e),
        };
        result.map_err(|e| {
            ApiError::new(
                StatusCode::CONFLICT,
                format!("handover of stripe {stripe} failed: {e}"),
            )
        })
    }

    /// Keys of `map` across all stripes, in order.
    pub async fn keys(
        &self,
        map: &str,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<(Vec<String>, Option<String>), ApiError> {
        let stripes: Vec<u32> = self
            .applied
            .read()
            .map_err(|_| unavailable("control state"))?
            .state
            .stripes
            .keys()
            .copied()
            .collect();
        // A stripe's answer must fit one frame (keys are up to 1 KiB each).
        let ask = (limit + 1).min(MAX_KEYS_PER_STRIPE_ANSWER);
        // All stripes at once: one failing over holds the answer up by at most
        // `request_timeout_ms`, not that times the number of stripes.
        let pages = stripes.into_iter().map(|stripe| {
            let request = StripeRequest::Keys {
                stripe,
                map: map.into(),
                prefix: prefix.into(),
                after: after.map(String::from),
                limit: ask as u32,
            };
            self.routed("list", stripe, request, |r| match r {
                StripeResponse::Keys(k) => Some(k),
                _ => None,
            })
        });
        let pages = futures::future::try_join_all(pages).await?;
        Ok(merge_pages(pages, ask, limit))
    }
}

/// Most keys one stripe is asked for in one listing: 2 000 keys of at most 1 KiB
/// fit a forwarded answer's frame.
const MAX_KEYS_PER_STRIPE_ANSWER: usize = 2_000;

/// One page of a listing from each stripe's sorted answer (each asked for `ask`
/// keys): at most `limit` keys in order, and where the next page starts. A
/// stripe that answered all `ask` may hold more beyond its last key, so the page
/// stops there: no key of another stripe after it can be listed before them.
fn merge_pages(pages: Vec<Vec<String>>, ask: usize, limit: usize) -> (Vec<String>, Option<String>) {
    let cut = pages
        .iter()
        .filter(|p| p.len() >= ask)
        .filter_map(|p| p.last().cloned())
        .min();
    let mut all: Vec<String> = pages
        .into_iter()
        .flatten()
        .filter(|k| cut.as_ref().is_none_or(|c| k <= c))
        .collect();
    all.sort();
    let more = cut.is_some() || all.len() > limit;
    all.truncate(limit);
    let next = if more { all.last().cloned() } else { None };
    (all, next)
}

fn unavailable(what: &str) -> ApiError {
    ApiError::retry_later(format!("{what}; retry later"))
}

fn bad_request(msg: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, msg.into())
}

/// Map and key of a `/v1/kv/{map}/{key}` request, percent-decoded from the raw
/// path: a name that is not UTF-8 once decoded is refused (the router's own
/// decoding replaces such bytes, so `%FF` and `%FE` would name one key).
fn names(req: &HttpRequest) -> Result<(String, String), ApiError> {
    let rest = req
        .uri()
        .path()
        .strip_prefix("/v1/kv/")
        .ok_or_else(|| bad_request("expected /v1/kv/{map}/{key}"))?;
    let (map, key) = rest
        .split_once('/')
        .ok_or_else(|| bad_request("expected /v1/kv/{map}/{key}"))?;
    let (map, key) = (decode_name(map, "map")?, decode_name(key, "key")?);
    check_names(&map, &key)?;
    Ok((map, key))
}

/// One percent-encoded name (a path segment or query value), strictly UTF-8.
pub(crate) fn decode_name(raw: &str, what: &str) -> Result<String, ApiError> {
    percent_encoding::percent_decode_str(raw)
        .decode_utf8()
        .map(|s| s.into_owned())
        .map_err(|_| bad_request(format!("{what} is not UTF-8 once percent-decoded")))
}

/// A query parameter, strictly decoded (`+` is a space, as in forms).
fn query_param(req: &HttpRequest, name: &str) -> Result<Option<String>, ApiError> {
    for pair in req.query_string().split('&') {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        if decode_name(&k.replace('+', " "), "a query parameter name")? == name {
            return decode_name(&v.replace('+', " "), name).map(Some);
        }
    }
    Ok(None)
}

fn check_names(map: &str, key: &str) -> Result<(), ApiError> {
    if map.is_empty() || key.is_empty() {
        return Err(bad_request("map and key must not be empty"));
    }
    // URL clients resolve these away: a key so named could not be read back.
    if [map, key].iter().any(|n| *n == "." || *n == "..") {
        return Err(bad_request("a map or key cannot be '.' or '..'"));
    }
    if key.len() > MAX_KEY_BYTES {
        return Err(bad_request(format!(
            "key of {} bytes exceeds the limit of {MAX_KEY_BYTES}",
            key.len()
        )));
    }
    if map.len() > MAX_KEY_BYTES {
        return Err(bad_request("map name exceeds 1024 bytes"));
    }
    Ok(())
}

fn header_str<'a>(req: &'a HttpRequest, name: &str) -> Result<Option<&'a str>, ApiError> {
    match req.headers().get(name) {
        None => Ok(None),
        Some(v) => v
            .to_str()
            .map(|s| Some(s.trim()))
            .map_err(|_| bad_request(format!("header {name} is not text"))),
    }
}

/// Most entity tags one conditional header may list.
const MAX_CONDITION_TAGS: usize = 64;

/// An entity tag of a conditional header: `"n"` or `W/"n"` (`n` is `None` for
/// a tag that is not a version number: it matches no key).
struct EntityTag {
    weak: bool,
    version: Option<u64>,
}

/// Every line of header `name`, as one comma-separated list: `None` if absent,
/// `Some(None)` for `*`.
fn entity_tags(req: &HttpRequest, name: &str) -> Result<Option<Option<Vec<EntityTag>>>, ApiError> {
    let mut lines = Vec::new();
    for v in req.headers().get_all(name) {
        lines.push(
            v.to_str()
                .map_err(|_| bad_request(format!("header {name} is not text")))?,
        );
    }
    if lines.is_empty() {
        return Ok(None);
    }
    let joined = lines.join(",");
    let items: Vec<&str> = joined
        .split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .collect();
    if items == ["*"] {
        return Ok(Some(None));
    }
    if items.is_empty() || items.len() > MAX_CONDITION_TAGS {
        return Err(bad_request(format!(
            "{name} must be * or 1 to {MAX_CONDITION_TAGS} entity tags like \"12\""
        )));
    }
    let mut tags = Vec::with_capacity(items.len());
    for item in items {
        let (weak, quoted) = match item.strip_prefix("W/") {
            Some(rest) => (true, rest),
            None => (false, item),
        };
        let inner = quoted
            .strip_prefix('"')
            .and_then(|q| q.strip_suffix('"'))
            .filter(|i| !i.contains('"'))
            .ok_or_else(|| {
                bad_request(format!(
                    "{name}: {item} is not an entity tag; a key's version is sent quoted, like \"12\""
                ))
            })?;
        tags.push(EntityTag {
            weak,
            version: inner.parse().ok(),
        });
    }
    Ok(Some(Some(tags)))
}

/// The precondition of a write, as RFC 9110 has it: `If-Match` compares
/// strongly (a weak tag never matches), `If-None-Match` weakly.
fn condition(req: &HttpRequest) -> Result<Condition, ApiError> {
    let if_match = entity_tags(req, "if-match")?;
    let if_none = entity_tags(req, "if-none-match")?;
    match (if_match, if_none) {
        (Some(_), Some(_)) => Err(bad_request("give If-Match or If-None-Match, not both")),
        (Some(None), None) => Ok(Condition::IfExists),
        (Some(Some(tags)), None) => {
            let versions: Vec<u64> = tags
                .iter()
                .filter(|t| !t.weak)
                .filter_map(|t| t.version)
                .collect();
            Ok(match versions.as_slice() {
                [v] => Condition::IfVersion(*v),
                _ => Condition::IfVersionIn(versions),
            })
        }
        (None, Some(None)) => Ok(Condition::IfAbsent),
        (None, Some(Some(tags))) => Ok(Condition::IfVersionNotIn(
            tags.iter().filter_map(|t| t.version).collect(),
        )),
        (None, None) => Ok(Condition::None),
    }
}

fn outcome_response(outcome: KvOutcome) -> HttpResponse {
    match outcome {
        KvOutcome::Done { version } => HttpResponse::Ok()
            .insert_header(etag(version))
            .json(json!({ "version": version })),
        KvOutcome::NotFound => HttpResponse::NotFound().json(json!({ "error": "no such key" })),
        KvOutcome::PreconditionFailed { current } => HttpResponse::PreconditionFailed()
            .json(json!({ "error": "precondition failed", "version": current })),
        KvOutcome::RequestIdReused => HttpResponse::UnprocessableEntity().json(json!({
            "error": "this Idempotency-Key was used for a different request"
        })),
        // Only a copy its node no longer waited for is answered so: no client
        // should see it, but one that did must not take it for a failure.
        KvOutcome::Abandoned => actix_web::ResponseError::error_response(&ApiError::retry_later(
            "the outcome of this write is not known (it may have been applied): send it again \
             with an Idempotency-Key"
                .into(),
        )),
        KvOutcome::Invalid => HttpResponse::InternalServerError()
            .json(json!({ "error": "the stripe log holds an entry this node cannot read" })),
    }
}

/// Reads a request body of at most `limit` bytes (`413` naming `setting` beyond),
/// within the node's `budget` for bodies held at once; the room it takes is
/// given back when the returned [`BodyRoom`] is dropped. A body whose length
/// the request declares takes its room before it is read, so that bodies
/// read side by side never each hold part of the room and wait for the rest.
pub(crate) async fn read_body(
    budget: &BodyBudget,
    req: &HttpRequest,
    mut payload: web::Payload,
    limit: usize,
    setting: &str,
) -> Result<(Vec<u8>, BodyRoom), ApiError> {
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("body exceeds {setting} ({limit} bytes)"),
        )
    };
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<usize>().ok());
    let mut room = BodyRoom::default();
    let mut body = Vec::new();
    let mut room_for = 0;
    if let Some(len) = declared {
        if len > limit {
            return Err(too_large());
        }
        budget.take(len, &mut room).await?;
        room_for = len;
        body.reserve_exact(len);
    }
    while let Some(chunk) = payload.next().await {
        let chunk = chunk.map_err(|e| bad_request(format!("cannot read the body: {e}")))?;
        if body.len() + chunk.len() > limit {
            return Err(too_large());
        }
        let more = (body.len() + chunk.len()).saturating_sub(room_for);
        if more > 0 {
            budget.take(more, &mut room).await?;
            room_for += more;
        }
        body.extend_from_slice(&chunk);
    }
    Ok((body, room))
}

fn router(state: &ApiState) -> Result<&Arc<KvRouter>, ApiError> {
    state
        .kv
        .as_ref()
        .ok_or_else(|| unavailable("the key/value API is not ready"))
}

pub async fn put(
    state: web::Data<ApiState>,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let (map, key) = names(&req)?;
    let kv = router(&state)?;
    let cond = condition(&req)?;
    let (request, received_ms, remember_until_ms) = kv.identify(&req)?;
    let (value, _room) = read_body(
        &state.bodies,
        &req,
        payload,
        kv.max_value_bytes,
        "max_value_bytes",
    )
    .await?;
    let op = KvOp::Put {
        map,
        key,
        value,
        cond,
    };
    let outcome = kv
        .write_identified(request, op, received_ms, remember_until_ms)
        .await?;
    Ok(outcome_response(outcome))
}

pub async fn delete(
    state: web::Data<ApiState>,
    req: HttpRequest,
) -> Result<HttpResponse, ApiError> {
    let (map, key) = names(&req)?;
    let kv = router(&state)?;
    let cond = condition(&req)?;
    let (request, received_ms, remember_until_ms) = kv.identify(&req)?;
    let op = KvOp::Delete { map, key, cond };
    let outcome = kv
        .write_identified(request, op, received_ms, remember_until_ms)
        .await?;
    Ok(outcome_response(outcome))
}

#[derive(serde::Deserialize)]
pub struct ReadQuery {
    #[serde(default)]
    stale: bool,
}

pub async fn get(
    state: web::Data<ApiState>,
    query: web::Query<ReadQuery>,
    req: HttpRequest,
) -> Result<HttpResponse, ApiError> {
    let (map, key) = names(&req)?;
    let kv = router(&state)?;
    let cond = condition(&req)?;
    let found = kv.read(&map, &key, query.stale).await?;
    if let Some(refused) = read_precondition(&cond, found.as_ref().map(|(v, _)| *v)) {
        return Ok(refused);
    }
    match found {
        Some((version, value)) => Ok(HttpResponse::Ok()
            .insert_header(etag(version))
            .content_type("application/octet-stream")
            .body(value)),
        None => Ok(HttpResponse::NotFound().json(json!({ "error": "no such key" }))),
    }
}

/// The `ETag` of a key at `version`: the version as a strong entity tag.
fn etag(version: u64) -> (header::HeaderName, String) {
    (header::ETAG, format!("\"{version}\""))
}

/// A read's conditional headers against the key's version (RFC 9110 13.2.2):
/// an `If-None-Match` that matches is answered `304` (the client's copy is
/// current), an `If-Match` that does not `412`; `None` serves the value.
fn read_precondition(cond: &Condition, current: Option<u64>) -> Option<HttpResponse> {
    if cond.holds(current) {
        return None;
    }
    Some(match (cond, current) {
        (Condition::IfAbsent | Condition::IfVersionNotIn(_), Some(version)) => {
            HttpResponse::NotModified()
                .insert_header(etag(version))
                .finish()
        }
        _ => HttpResponse::PreconditionFailed()
            .json(json!({ "error": "precondition failed", "version": current })),
    })
}

#[derive(serde::Deserialize)]
pub struct ListQuery {
    limit: Option<usize>,
}

pub async fn list(
    state: web::Data<ApiState>,
    query: web::Query<ListQuery>,
    req: HttpRequest,
) -> Result<HttpResponse, ApiError> {
    let map = req
        .uri()
        .path()
        .strip_prefix("/v1/kv/")
        .ok_or_else(|| bad_request("expected /v1/kv/{map}"))?;
    let map = decode_name(map, "map")?;
    let prefix = query_param(&req, "prefix")?.unwrap_or_default();
    let after = query_param(&req, "after")?;
    let kv = router(&state)?;
    let limit = query.limit.unwrap_or(1000);
    if limit == 0 || limit > 10_000 {
        return Err(bad_request("limit must be between 1 and 10000"));
    }
    let (keys, next) = kv.keys(&map, &prefix, after.as_deref(), limit).await?;
    Ok(HttpResponse::Ok().json(json!({ "keys": keys, "next": next })))
}

#[derive(serde::Deserialize)]
pub struct HandOverQuery {
    to: Option<String>,
}

pub async fn handover(
    state: web::Data<ApiState>,
    stripe: web::Path<u32>,
    query: web::Query<HandOverQuery>,
) -> Result<HttpResponse, ApiError> {
    let kv = router(&state)?;
    let active = kv
        .handover(stripe.into_inner(), query.into_inner().to)
        .await?;
    Ok(HttpResponse::Ok().json(json!({ "active": active })))
}

#[cfg(test)]
mod tests {
    use super::{condition, merge_pages, read_precondition, Condition};

    fn cond(headers: &[(&str, &str)]) -> Result<Condition, u16> {
        let mut req = actix_web::test::TestRequest::default();
        for (k, v) in headers {
            req = req.append_header((*k, *v));
        }
        condition(&req.to_http_request())
            .map_err(|e| actix_web::ResponseError::status_code(&e).as_u16())
    }

    #[test]
    fn a_read_is_answered_304_when_the_clients_copy_is_current() {
        let status = |cond: Condition, current| {
            read_precondition(&cond, current).map(|r| r.status().as_u16())
        };
        assert_eq!(
            status(Condition::IfVersionNotIn(vec![3]), Some(3)),
            Some(304)
        );
        assert_eq!(status(Condition::IfVersionNotIn(vec![3]), Some(4)), None);
        assert_eq!(status(Condition::IfVersionNotIn(vec![3]), None), None);
        assert_eq!(status(Condition::IfAbsent, Some(1)), Some(304));
        assert_eq!(status(Condition::IfVersion(3), Some(4)), Some(412));
        assert_eq!(status(Condition::IfExists, None), Some(412));
        assert_eq!(status(Condition::IfVersion(4), Some(4)), None);
        assert_eq!(status(Condition::None, None), None);
    }

    #[test]
    fn conditional_headers_follow_rfc_9110() {
        assert_eq!(cond(&[]), Ok(Condition::None));
        assert_eq!(cond(&[("If-Match", "\"5\"")]), Ok(Condition::IfVersion(5)));
        assert_eq!(cond(&[("If-Match", "*")]), Ok(Condition::IfExists));
        assert_eq!(
            cond(&[("If-Match", "\"1\", \"2\"")]),
            Ok(Condition::IfVersionIn(vec![1, 2]))
        );
        // Two header lines are one list.
        assert_eq!(
            cond(&[("If-Match", "\"1\""), ("If-Match", "\"2\"")]),
            Ok(Condition::IfVersionIn(vec![1, 2]))
        );
        // A weak tag, or one that is no version, never matches (412 at the stripe).
        assert_eq!(
            cond(&[("If-Match", "W/\"5\"")]),
            Ok(Condition::IfVersionIn(vec![]))
        );
        assert_eq!(
            cond(&[("If-Match", "\"abc\"")]),
            Ok(Condition::IfVersionIn(vec![]))
        );
        assert!(!Condition::IfVersionIn(vec![]).holds(Some(5)));
        assert_eq!(cond(&[("If-None-Match", "*")]), Ok(Condition::IfAbsent));
        // If-None-Match compares weakly.
        assert_eq!(
            cond(&[("If-None-Match", "W/\"5\", \"7\"")]),
            Ok(Condition::IfVersionNotIn(vec![5, 7]))
        );
        assert!(!Condition::IfVersionNotIn(vec![5]).holds(Some(5)));
        assert!(Condition::IfVersionNotIn(vec![5]).holds(Some(6)));
        assert!(Condition::IfVersionNotIn(vec![5]).holds(None));
        assert!(!Condition::IfExists.holds(None));
        // Malformed: 400.
        for bad in ["5", "\"5", "\"\"5\"\"", ""] {
            assert_eq!(cond(&[("If-Match", bad)]), Err(400), "{bad:?}");
        }
        assert_eq!(
            cond(&[("If-Match", "\"1\""), ("If-None-Match", "*")]),
            Err(400)
        );
    }

    fn keys(k: &[&str]) -> Vec<String> {
        k.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn a_listing_page_neither_skips_nor_repeats_keys_across_stripes() {
        // Everything fits: no next page.
        let (page, next) = merge_pages(vec![keys(&["a", "c"]), keys(&["b"])], 11, 10);
        assert_eq!((page, next), (keys(&["a", "b", "c"]), None));
        // More than the limit: the next page starts after the last key given.
        let (page, next) = merge_pages(vec![keys(&["a", "c", "e"]), keys(&["b", "d"])], 4, 3);
        assert_eq!((page, next), (keys(&["a", "b", "c"]), Some("c".into())));
        // A stripe that answered all it was asked for (a capped answer) may hold
        // keys before another stripe's later ones: the page stops at its last.
        let (page, next) = merge_pages(vec![keys(&["a", "d"]), keys(&["b", "c"])], 2, 10);
        assert_eq!((page, next), (keys(&["a", "b", "c"]), Some("c".into())));
        let (page, next) = merge_pages(vec![keys(&["a", "d"]), keys(&["b"])], 2, 10);
        assert_eq!((page, next), (keys(&["a", "b", "d"]), Some("d".into())));
    }
}
