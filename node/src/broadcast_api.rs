//! Databroadcast over HTTP: `POST /v1/broadcast` publishes, `GET
//! /v1/broadcast/stream` follows the stream as Server-Sent Events and resumes from
//! `Last-Event-ID` on any node, `GET /v1/broadcast/origins` shows the log.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::Addr;
use actix_web::http::{header, StatusCode};
use actix_web::web::Bytes;
use actix_web::{web, HttpRequest, HttpResponse};
use kiln_actors::broadcast::event::{EventBody, EventJson, Filter, MissedAbout, Positions};
use kiln_actors::broadcast::{
    BroadcastActor, Delivered, GetOrigins, Publish, PublishError, Subscribe, Subscription,
};
use kiln_persistence::Missed;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::{
    broadcast::error::RecvError, mpsc, oneshot, watch, OwnedSemaphorePermit, Semaphore,
};

use crate::http::{ApiError, ApiState};
use crate::kv_api::read_body;

/// Events one `POST /v1/broadcast` may carry.
const MAX_EVENTS_PER_POST: usize = 10_000;

/// Event streams one node serves at once; more are answered 503 (a client
/// that opens streams without end must not take the node's memory).
const MAX_STREAMS: usize = 4096;

/// Backlog pages (up to 4 MiB each) read for catching-up streams at once: many
/// streams resuming together wait their turn instead of filling the blocking
/// pool and the memory.
const BACKLOG_READERS: usize = 4;
/// Frames buffered towards one HTTP client before the feed waits for it.
const CLIENT_BUFFER: usize = 64;
/// A comment line this often keeps proxies from closing an idle stream and
/// notices a client that went away.
const KEEPALIVE: Duration = Duration::from_secs(15);
/// While events go by that a subscriber's filter passes over, its position is
/// sent this often (a client cut off then resumes from there, not from its
/// last event: a rare topic after a long backlog would otherwise start over
/// every time).
const POSITION_EVERY: Duration = Duration::from_secs(1);
/// How often a feed blocked on a slow client looks at how far behind it is.
const LAG_CHECK: Duration = Duration::from_millis(100);
/// Events read from the log per page of a subscriber's backlog.
const BACKLOG_PAGE: usize = 1_000;
/// How long a subscriber catching up waits for received events to be written
/// (normally milliseconds), and how many times, before it takes them for a
/// hole: a slow disk is no reason for a `resync`, a log that cannot write for
/// a minute is.
const LOG_WRITE_WAIT: Duration = Duration::from_secs(5);
const LOG_WRITE_WAITS: u32 = 12;
/// Polls of the log per [`LOG_WRITE_WAIT`] while events it lost are fetched again.
const REFETCH_POLLS_PER_WAIT: u32 = 20;

pub struct BroadcastApi {
    pub actor: Addr<BroadcastActor>,
    pub max_event_bytes: usize,
    streams: Arc<Semaphore>,
    backlog_reads: Arc<Semaphore>,
    /// Set when the node stops: event streams end (with their position, so
    /// clients resume elsewhere), rather than holding the stop up.
    stopping: watch::Receiver<bool>,
}

impl BroadcastApi {
    pub fn new(
        actor: Addr<BroadcastActor>,
        max_event_bytes: usize,
        stopping: watch::Receiver<bool>,
    ) -> Self {
        BroadcastApi {
            actor,
            max_event_bytes,
            streams: Arc::new(Semaphore::new(MAX_STREAMS)),
            backlog_reads: Arc::new(Semaphore::new(BACKLOG_READERS)),
            stopping,
        }
    }
}

fn broadcast(state: &ApiState) -> Result<&BroadcastApi, ApiError> {
    state
        .broadcast
        .as_ref()
        .ok_or_else(|| ApiError::retry_later("the broadcast API is not ready".into()))
}

fn bad_request(msg: String) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, msg)
}

/// Parses and checks the events of a publish request: one JSON object or an array.
pub fn parse_events(body: &[u8], max_event_bytes: usize) -> Result<Vec<EventBody>, ApiError> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| bad_request(format!("the body is not JSON: {e}")))?;
    let items = match value {
        Value::Array(items) => items,
        one @ Value::Object(_) => vec![one],
        _ => {
            return Err(bad_request(
                "expected an event object or an array of them".into(),
            ))
        }
    };
    if items.is_empty() {
        return Err(bad_request("no events to publish".into()));
    }
    if items.len() > MAX_EVENTS_PER_POST {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("at most {MAX_EVENTS_PER_POST} events per request"),
        ));
    }
    let mut out = Vec::with_capacity(items.len());
    for (i, item) in items.into_iter().enumerate() {
        let size = item.to_string().len();
        if size > max_event_bytes {
            return Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("event {i} is {size} bytes as JSON; max_event_bytes is {max_event_bytes}"),
            ));
        }
        // serde's own message would list every kind, `artifact` too, which
        // only nodes announce.
        match item.get("kind").and_then(Value::as_str) {
            Some("change" | "flush" | "message" | "artifact") => {}
            other => {
                return Err(bad_request(format!(
                    "event {i}: field `kind` must be \"change\", \"flush\" or \"message\"{}",
                    other.map_or_else(
                        || " (it is missing or not text)".into(),
                        |k| format!(", not {k:?}")
                    )
                )))
            }
        }
        let event: EventBody =
            serde_json::from_value(item).map_err(|e| bad_request(format!("event {i}: {e}")))?;
        event
            .check_publishable()
            .map_err(|e| bad_request(format!("event {i}: {e}")))?;
        out.push(event);
    }
    Ok(out)
}

pub async fn publish(
    state: web::Data<ApiState>,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let api = broadcast(&state)?;
    let key = publish_key(&req)?;
    let limit = api
        .max_event_bytes
        .saturating_mul(MAX_EVENTS_PER_POST)
        .min(64 << 20);
    let (body, _room) = read_body(&state.bodies, &req, payload, limit, "the publish limit").await?;
    let bodies = parse_events(&body, api.max_event_bytes)?;
    let (tx, rx) = oneshot::channel();
    api.actor
        .send(Publish {
            bodies,
            key,
            reply: tx,
        })
        .await
        .map_err(|e| ApiError::retry_later(format!("node is shutting down: {e}")))?;
    match rx.await {
        Ok(Ok((origin, seqs))) => {
            Ok(HttpResponse::Accepted().json(json!({ "origin": origin, "seqs": seqs })))
        }
        Ok(Err(PublishError::Storage(e))) => Err(ApiError::new(
            StatusCode::INSUFFICIENT_STORAGE,
            format!("the events were not acknowledged (they are published only if the failure came after their commit reached the disk): {e}"),
        )),
        Ok(Err(PublishError::KeyReused)) => Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!(
                "{}: a retry must send the same events; use a new key for new events",
                PublishError::KeyReused
            ),
        )),
        Ok(Err(e)) => Err(ApiError::retry_later(format!(
            "the events were not published: {e}"
        ))),
        Err(_) => Err(ApiError::retry_later("node is shutting down".into())),
    }
}

/// The publish's `Idempotency-Key`, if it has one: a retry under it to this
/// node, within the reconnect window, gets the first answer.
fn publish_key(req: &HttpRequest) -> Result<Option<String>, ApiError> {
    match req.headers().get("idempotency-key") {
        None => Ok(None),
        Some(v) => match v.to_str().map(str::trim) {
            Ok(k) if !k.is_empty() && k.len() <= 256 => Ok(Some(k.to_string())),
            _ => Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "Idempotency-Key must be 1 to 256 characters of text".into(),
            )),
        },
    }
}

pub async fn origins(state: web::Data<ApiState>) -> Result<HttpResponse, ApiError> {
    let api = broadcast(&state)?;
    let list = api
        .actor
        .send(GetOrigins)
        .await
        .map_err(|e| ApiError::retry_later(format!("node is shutting down: {e}")))?;
    let origins: Vec<Value> = list
        .into_iter()
        .map(|(origin, first, last, head)| {
            json!({"origin": origin, "first": first, "last": last, "head": head})
        })
        .collect();
    Ok(HttpResponse::Ok().json(json!({ "origins": origins })))
}

#[derive(Debug, Deserialize)]
pub struct StreamQuery {
    server: Option<String>,
    table: Option<String>,
    topic: Option<String>,
    /// Same as the `Last-Event-ID` header, for clients that cannot set headers.
    last_event_id: Option<String>,
}

pub async fn stream(
    state: web::Data<ApiState>,
    req: HttpRequest,
    query: web::Query<StreamQuery>,
) -> Result<HttpResponse, ApiError> {
    let api = broadcast(&state)?;
    let query = query.into_inner();
    let token = req
        .headers()
        .get("Last-Event-ID")
        .map(|v| {
            v.to_str()
                .map(str::to_string)
                .map_err(|_| bad_request("Last-Event-ID is not text".into()))
        })
        .transpose()?
        .or(query.last_event_id);
    let start = token
        .map(|t| Positions::from_token(&t).map_err(|e| bad_request(e.to_string())))
        .transpose()?;
    let filter = Filter {
        server: query.server,
        table: query.table,
        topic: query.topic,
    };
    if *api.stopping.borrow() {
        return Err(ApiError::retry_later(
            "this node is stopping; subscribe on another node".into(),
        ));
    }
    let slot = api.streams.clone().try_acquire_owned().map_err(|_| {
        ApiError::retry_later(format!(
            "this node serves {MAX_STREAMS} event streams already; subscribe on another node \
             or retry later"
        ))
    })?;
    let sub = api
        .actor
        .send(Subscribe)
        .await
        .map_err(|e| ApiError::retry_later(format!("node is shutting down: {e}")))?;
    let (tx, rx) = mpsc::channel::<Bytes>(CLIENT_BUFFER);
    let backlog_reads = api.backlog_reads.clone();
    let stopping = api.stopping.clone();
    actix_rt::spawn(Feed::new(sub, start, filter, tx, slot, backlog_reads, stopping).run());
    let body = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|b| (Ok::<_, actix_web::Error>(b), rx))
    });
    Ok(HttpResponse::Ok()
        .insert_header((header::CONTENT_TYPE, "text/event-stream"))
        .insert_header((header::CACHE_CONTROL, "no-cache"))
        .insert_header(("X-Accel-Buffering", "no"))
        .streaming(body))
}

/// Resolves once the node stops (never, if nobody can tell it any more).
async fn node_stopping(mut stopping: watch::Receiver<bool>) {
    if stopping.wait_for(|s| *s).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Why a feed ended.
enum End {
    ClientGone,
    Lagged,
    LogUnreadable,
    NodeStopping,
}

/// One subscriber's stream: the backlog from the log, then the live feed.
struct Feed {
    sub: Subscription,
    /// Last seq given (or stepped over) per origin: an event whose frame
    /// could not be queued is not counted, so a `lagged` frame's position is
    /// where the client resumes without a gap.
    pos: BTreeMap<String, u64>,
    /// Without a resume token, the subscriber starts at the live end: an origin
    /// first seen later starts at its first live event.
    live_only: bool,
    filter: Filter,
    tx: mpsc::Sender<Bytes>,
    /// This subscriber's share of `kiln_broadcast_subscriber_lag_events`.
    lag: i64,
    /// `pos` moved past events the client was not sent (filtered out): the
    /// next keepalive (or position frame) carries it.
    position_unsent: bool,
    /// When the client was last sent a position.
    position_sent: Instant,
    /// This stream's place among the node's `MAX_STREAMS`.
    _slot: OwnedSemaphorePermit,
    backlog_reads: Arc<Semaphore>,
    stopping: watch::Receiver<bool>,
}

struct SubscriberGuard(prometheus_client::metrics::gauge::Gauge);

impl Drop for SubscriberGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

impl Feed {
    fn new(
        sub: Subscription,
        start: Option<Positions>,
        filter: Filter,
        tx: mpsc::Sender<Bytes>,
        slot: OwnedSemaphorePermit,
        backlog_reads: Arc<Semaphore>,
        stopping: watch::Receiver<bool>,
    ) -> Self {
        let live_only = start.is_none();
        let pos = match start {
            Some(p) => p.0,
            None => sub
                .runs
                .iter()
                .map(|(o, (_, last))| (o.clone(), *last))
                .collect(),
        };
        Feed {
            sub,
            pos,
            live_only,
            filter,
            tx,
            lag: 0,
            position_unsent: false,
            position_sent: Instant::now(),
            _slot: slot,
            backlog_reads,
            stopping,
        }
    }

    async fn run(mut self) {
        self.sub.metrics.subscribers.inc();
        let _guard = SubscriberGuard(self.sub.metrics.subscribers.clone());
        let end = self.serve().await;
        self.sub.metrics.subscriber_lag.dec_by(self.lag);
        if let End::NodeStopping = end {
            // The position reached, for the client to resume on another node.
            let frame = Bytes::from(format!(": node stopping\nid: {}\n\n", self.token()));
            let _ = tokio::time::timeout(Duration::from_secs(1), self.tx.send(frame)).await;
        }
        if let End::Lagged = end {
            self.sub.metrics.subscribers_lagged.inc();
            // With the position reached: what the client got or its filter
            // passed over, so it resumes there.
            let frame = Bytes::from(format!(
                "id: {}\ndata: {{\"kind\":\"lagged\"}}\n\n",
                self.token()
            ));
            let _ = tokio::time::timeout(Duration::from_secs(5), self.tx.send(frame)).await;
        }
    }

    async fn serve(&mut self) -> End {
        // Tell the client the stream is open, and where it starts: a client
        // cut off before its first event (or one whose filter passes few)
        // resumes from there, not from the live end.
        let open = format!(": kiln event stream\nid: {}\n\n", self.token());
        if let Err(end) = self.send(Bytes::from(open)).await {
            return end;
        }
        let backlog: Vec<(String, u64)> = self
            .sub
            .runs
            .iter()
            .map(|(o, (_, last))| (o.clone(), *last))
            .collect();
        for (origin, last) in backlog {
            if let Err(end) = self.catch_up(&origin, last).await {
                return end;
            }
        }
        let mut keepalive = tokio::time::interval(KEEPALIVE);
        keepalive.tick().await;
        loop {
            tokio::select! {
                ev = self.sub.recv() => match ev {
                    Ok(ev) => {
                        if let Err(end) = self.live(ev).await {
                            return end;
                        }
                    }
                    Err(RecvError::Lagged(_)) => return End::Lagged,
                    Err(RecvError::Closed) => return End::ClientGone,
                },
                _ = keepalive.tick() => {
                    // With the position if events went by unsent (filtered out).
                    let frame = match self.position_unsent {
                        true => format!(": keepalive\nid: {}\n\n", self.token()),
                        false => ": keepalive\n\n".to_string(),
                    };
                    if let Err(end) = self.send(Bytes::from(frame)).await {
                        return end;
                    }
                    self.position_unsent = false;
                    self.position_sent = Instant::now();
                }
                _ = self.tx.closed() => return End::ClientGone,
                _ = node_stopping(self.stopping.clone()) => return End::NodeStopping,
            }
        }
    }

    async fn live(&mut self, ev: Arc<Delivered>) -> Result<(), End> {
        let lag = self.sub.waiting() as i64;
        self.sub.metrics.subscriber_lag.inc_by(lag - self.lag);
        self.lag = lag;
        let at = match self.pos.get(&ev.origin) {
            Some(p) => *p,
            None if self.live_only => ev.seq - 1,
            None => 0,
        };
        if ev.seq <= at {
            return Ok(());
        }
        if ev.seq > at + 1 {
            // Appended before this subscriber caught up with that origin.
            self.catch_up(&ev.origin, ev.seq - 1).await?;
        }
        self.emit(&ev).await
    }

    /// Sends what the log holds of `origin` after the subscriber's position, up
    /// to `upto`; a `resync` first if the log no longer holds what it missed.
    async fn catch_up(&mut self, origin: &str, upto: u64) -> Result<(), End> {
        let (mut written, mut waits) = (false, 0);
        loop {
            let at = *self.pos.get(origin).unwrap_or(&0);
            if at >= upto {
                return Ok(());
            }
            let store = self.sub.store.clone();
            let o = origin.to_string();
            // Held for the read only, not while the client takes the page.
            let Ok(reading) = self.backlog_reads.clone().acquire_owned().await else {
                return Err(End::LogUnreadable);
            };
            let page =
                tokio::task::spawn_blocking(move || store.range(&o, at + 1, BACKLOG_PAGE, 4 << 20))
                    .await;
            drop(reading);
            let rows = match page {
                Ok(Ok(rows)) => rows,
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "cannot read the broadcast log for a subscriber");
                    return Err(End::LogUnreadable);
                }
                Err(_) => return Err(End::LogUnreadable),
            };
            if rows.is_empty() && !written && waits < LOG_WRITE_WAITS {
                // Handed on already but not written yet: that takes a moment,
                // longer on a slow disk. Only a log that holds everything handed
                // on and still lacks them lost them (to retention), or one that
                // cannot write for a minute.
                written = self.sub.log_caught_up(LOG_WRITE_WAIT).await;
                if !written {
                    waits += 1;
                    self.send(Bytes::from(": waiting for the log\n\n")).await?;
                }
                continue;
            }
            if rows.is_empty() && waits < LOG_WRITE_WAITS * REFETCH_POLLS_PER_WAIT {
                // Everything handed on was written, yet the log's run of the
                // origin does not reach past the subscriber and starts no later:
                // not pruned but lost with a storage failure (the log went back
                // to its last fsynced commit) and being fetched again.
                let store = self.sub.store.clone();
                let o = origin.to_string();
                let run = tokio::task::spawn_blocking(move || store.run(&o)).await;
                if let Ok(Ok(Some(run))) = run {
                    if run.first <= at + 1 {
                        waits += 1;
                        tokio::time::sleep(LOG_WRITE_WAIT / REFETCH_POLLS_PER_WAIT).await;
                        if waits % REFETCH_POLLS_PER_WAIT == 0 {
                            self.send(Bytes::from(": waiting for the log\n\n")).await?;
                        }
                        written = false;
                        continue;
                    }
                }
            }
            (written, waits) = (false, 0);
            let first = rows.first().map(|r| r.0);
            if first != Some(at + 1) {
                // What the subscriber missed is older than the log keeps.
                let resume_at = first.map(|f| f - 1).unwrap_or(upto).min(upto);
                self.resync(origin, at, resume_at).await?;
                if first.is_none() {
                    return Ok(());
                }
            }
            for (seq, ts, bytes) in rows {
                if seq > upto {
                    return Ok(());
                }
                let ev = Delivered::decode(origin, seq, ts, &bytes);
                self.emit(&ev).await?;
            }
        }
    }

    /// The subscriber saw `origin` up to `seen`, and the log lost what follows
    /// up to `resume_at`: tells it what to refresh (or that it missed nothing
    /// its filter passes).
    async fn resync(&mut self, origin: &str, seen: u64, resume_at: u64) -> Result<(), End> {
        let before = self.pos.insert(origin.to_string(), resume_at);
        let store = self.sub.store.clone();
        let o = origin.to_string();
        let missed = match tokio::task::spawn_blocking(move || store.missed(&o, seen, resume_at))
            .await
        {
            Ok(Ok(m)) => m,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, %origin,
                    "cannot read what a subscriber missed from the broadcast log; it is told to refresh everything of the origin");
                Missed::Unknown
            }
            Err(_) => Missed::Unknown,
        };
        let about = match missed {
            Missed::Unknown => None,
            Missed::Labels(labels) => labels
                .iter()
                .map(|l| MissedAbout::from_label(l))
                // A label this version cannot read: refresh everything.
                .collect::<Option<BTreeSet<_>>>(),
        };
        let data = match about {
            None => json!({"kind": "resync", "origin": origin, "all": true,
                "datasources": [], "topics": [], "artifacts": []}),
            Some(about) => {
                let about: Vec<_> = about
                    .into_iter()
                    .filter(|a| self.filter.passes_about(a))
                    .collect();
                if about.is_empty() {
                    // Nothing this subscriber would have been sent.
                    self.position_unsent = true;
                    return Ok(());
                }
                let (mut datasources, mut topics, mut artifacts) = (vec![], vec![], vec![]);
                for a in about {
                    match a {
                        MissedAbout::Datasource { server, table } => {
                            datasources.push(json!({"server": server, "table": table}))
                        }
                        MissedAbout::Topic(t) => topics.push(t),
                        MissedAbout::Artifact(name) => artifacts.push(name),
                    }
                }
                json!({"kind": "resync", "origin": origin, "all": false,
                    "datasources": datasources, "topics": topics, "artifacts": artifacts})
            }
        };
        let frame = format!("id: {}\ndata: {}\n\n", self.token(), data);
        if let Err(end) = self.send(Bytes::from(frame)).await {
            self.set_position(origin, before);
            return Err(end);
        }
        self.sub.metrics.resyncs.inc();
        self.position_unsent = false;
        self.position_sent = Instant::now();
        Ok(())
    }

    /// Puts an origin's position back to what it was before a frame that could
    /// not be queued.
    fn set_position(&mut self, origin: &str, to: Option<u64>) {
        match to {
            Some(seq) => {
                self.pos.insert(origin.to_string(), seq);
            }
            None => {
                self.pos.remove(origin);
            }
        }
    }

    async fn emit(&mut self, ev: &Delivered) -> Result<(), End> {
        // In place when the origin is known (per event and subscriber: no
        // allocation on that path).
        let before = match self.pos.get_mut(&ev.origin) {
            Some(seq) => Some(std::mem::replace(seq, ev.seq)),
            None => {
                self.pos.insert(ev.origin.clone(), ev.seq);
                None
            }
        };
        let Some(body) = ev.body.as_ref().filter(|b| self.filter.passes(b)) else {
            // Passed over: the position moves on all the same.
            self.position_unsent = true;
            if self.position_sent.elapsed() >= POSITION_EVERY {
                let frame = format!(": position\nid: {}\n\n", self.token());
                self.send(Bytes::from(frame)).await?;
                self.position_unsent = false;
                self.position_sent = Instant::now();
            }
            return Ok(());
        };
        // One buffer for the whole frame: `id: <token>\ndata: <json>\n\n`.
        let mut frame = String::with_capacity(self.pos.len() * 64 + 256);
        frame.push_str("id: ");
        Positions::write_token(&self.pos, &mut frame);
        frame.push_str("\ndata: ");
        let mut frame = frame.into_bytes();
        let event = EventJson {
            origin: &ev.origin,
            seq: ev.seq,
            ts: ev.ts,
            body,
        };
        if serde_json::to_writer(&mut frame, &event).is_err() {
            return Ok(());
        }
        frame.extend_from_slice(b"\n\n");
        if let Err(end) = self.send(Bytes::from(frame)).await {
            // A stream from the live end had no position for an origin first
            // seen now: it resumes just before this event, not from the
            // origin's first retained one.
            let before = before.or(self.live_only.then(|| ev.seq - 1));
            self.set_position(&ev.origin, before);
            return Err(end);
        }
        self.position_unsent = false;
        self.position_sent = Instant::now();
        Ok(())
    }

    fn token(&self) -> String {
        Positions(self.pos.clone()).to_token()
    }

    /// Queues a frame for the client. While the client does not read, live
    /// events it has not taken pile up in the node: past the byte bound it is
    /// told `lagged` rather than holding them (checked every `LAG_CHECK` while
    /// the client's buffer is full).
    async fn send(&self, frame: Bytes) -> Result<(), End> {
        if self.sub.too_far_behind() {
            return Err(End::Lagged);
        }
        // The common case: room in the client's buffer, no timer needed.
        let frame = match self.tx.try_send(frame) {
            Ok(()) => return Ok(()),
            Err(mpsc::error::TrySendError::Closed(_)) => return Err(End::ClientGone),
            Err(mpsc::error::TrySendError::Full(frame)) => frame,
        };
        loop {
            if self.sub.too_far_behind() {
                return Err(End::Lagged);
            }
            match tokio::time::timeout(LAG_CHECK, self.tx.reserve()).await {
                Ok(Ok(permit)) => {
                    permit.send(frame);
                    return Ok(());
                }
                Ok(Err(_)) => return Err(End::ClientGone),
                Err(_) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publish_bodies_are_checked() {
        let ok =
            br#"[{"kind":"change","server":"crm","table":"orders","pks":[[42]],"action":"update"},
                      {"kind":"message","topic":"t","payload":{"x":1}}]"#;
        assert_eq!(parse_events(ok, 65536).unwrap().len(), 2);
        let one = br#"{"kind":"flush","server":"crm","table":"orders"}"#;
        assert_eq!(parse_events(one, 65536).unwrap().len(), 1);
        let status = |b: &[u8], max| parse_events(b, max).unwrap_err().status();
        assert_eq!(status(b"{nope", 65536), StatusCode::BAD_REQUEST);
        assert_eq!(
            status(
                br#"{"kind":"change","server":"a","table":"b","pks":[[1]],"action":"upsert"}"#,
                65536
            ),
            StatusCode::BAD_REQUEST
        );
        assert_eq!(status(b"[]", 65536), StatusCode::BAD_REQUEST);
        assert_eq!(status(b"42", 65536), StatusCode::BAD_REQUEST);
        assert_eq!(status(one, 10), StatusCode::PAYLOAD_TOO_LARGE);
    }
}
