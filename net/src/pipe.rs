//! Pipes: one long-lived stream to each connected peer that carries kiln's small
//! stripe and control-plane requests, each tagged with a call id, and their
//! responses, in any order.
//!
//! Request-response opens a yamux substream per request and passes every request
//! and response through the swarm task. At thousands of forwarded writes a second
//! that was the largest CPU cost measured (~160 µs per forwarded put) and a queue
//! every write waited in. A pipe's frames go from the caller's task to the
//! connection's task and back without the swarm task; several queued frames leave
//! in one write.
//!
//! A pipe is opened when the first connection to a peer is established, and again
//! by the next call after it broke while the peer is still connected. Large
//! requests (snapshot parts, artifact chunks) and everything but stripe and
//! control-plane requests keep their substream of their own, so a megabyte never
//! holds up a heartbeat. A peer without the pipe protocol gets request-response only.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, StreamExt};
use libp2p::{PeerId, StreamProtocol};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};

use crate::swarm::{CallError, NetEvent, Reply, ServiceRequest};
use crate::wire::{self, Request, Response, WireError, MAX_FRAME_BYTES};

/// Protocol name of kiln's pipes.
pub const PIPE_PROTOCOL: StreamProtocol = StreamProtocol::new("/kiln/pipe/1");

/// Requests whose body is larger than this take a substream of their own.
pub const PIPE_MAX_BODY_BYTES: usize = 64 * 1024;

/// After a failed open, calls to that peer use substreams for this long before a
/// call tries to open a pipe again (a peer without the protocol is not asked for
/// it on every call).
const REOPEN_AFTER: Duration = Duration::from_secs(2);

/// How long opening a pipe may take, its hello included.
const OPEN_TIMEOUT: Duration = Duration::from_secs(10);

/// Bytes of queued frames one write may gather.
const WRITE_BATCH_BYTES: usize = 256 * 1024;

/// Calls one pipe may have waiting; more go on substreams (which have limits of
/// their own).
const MAX_PENDING_CALLS: usize = 4096;

/// Stripe requests from one inbound pipe in service at once (a slot is freed once
/// the answer is written). More are refused at once, not left unread: the pipe
/// must keep carrying control-plane messages, which take no slot (openraft bounds
/// its own), so a stripe actor held up by a slow disk cannot stall the control
/// plane behind it.
const MAX_SERVED_REQUESTS: usize = 1024;

/// Answers one inbound pipe may have queued that hold no stripe slot (control
/// plane answers, refusals). Past this the pipe's requests are no longer read
/// until answers are written: only a peer that does not read its answers gets
/// here, and it must not make this node buffer without bound.
const MAX_QUEUED_OTHER_ANSWERS: usize = 4096;

/// Inbound pipes one peer may have at once (it opens one per connection, and a
/// new one after a failure); more are dropped.
const MAX_INBOUND_PIPES_PER_PEER: usize = 8;

/// Protocol version a pipe's acceptor announces in its hello.
const PIPE_VERSION: u16 = 1;

/// The first frame on a pipe, from the acceptor. The opener uses a pipe only once
/// it has read this: with lazy protocol negotiation (`V1Lazy`) an open succeeds
/// before the peer agreed to the protocol, and a peer may also drop an inbound
/// stream it has no room to accept.
#[derive(Serialize, Deserialize)]
struct PipeHello {
    pipe: u16,
}

/// One frame on a pipe: a request or a response and the call it belongs to.
#[derive(Serialize, Deserialize)]
struct PipeFrame<T> {
    id: u64,
    body: T,
}

/// Whether `request` may go on a pipe: stripe and control-plane messages up to
/// `PIPE_MAX_BODY_BYTES`.
fn fits_pipe(request: &Request) -> bool {
    match request {
        Request::Stripe { body } | Request::ControlPlane { body } => {
            body.len() <= PIPE_MAX_BODY_BYTES
        }
        _ => false,
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabel {
    route: &'static str,
}

/// A call waiting for its response on a pipe.
struct Pending {
    reply: oneshot::Sender<Result<Response, CallError>>,
    deadline: Instant,
}

/// What the tasks of one open outbound pipe share with callers.
struct OpenPipe {
    pending: Mutex<HashMap<u64, Pending>>,
    /// Since when a request written has been waiting with nothing at all
    /// arriving; `None` while frames arrive. Callers give up on their own (often
    /// shorter) timeouts, so this, not their calls, tells a pipe that went silent
    /// (a half-open connection, a peer that stopped serving it): closed past the
    /// request timeout.
    silent_since: Mutex<Option<Instant>>,
}

impl OpenPipe {
    fn new() -> Self {
        OpenPipe {
            pending: Mutex::new(HashMap::new()),
            silent_since: Mutex::new(None),
        }
    }
}

enum PipeState {
    /// An open is under way; only the open of this token may install the pipe.
    Opening(u64),
    /// Opening failed at this time; calls use substreams until `REOPEN_AFTER`.
    Failed(Instant),
    Open {
        generation: u64,
        frames: mpsc::UnboundedSender<Outgoing>,
        shared: Arc<OpenPipe>,
        /// The pipe's reader and writer, stopped when it is forgotten: a writer
        /// blocked on a peer that stopped reading would otherwise keep its
        /// queue, and the stream, for as long as the connection lasts.
        tasks: Vec<tokio::task::AbortHandle>,
    },
}

/// A frame queued for a pipe's writer.
struct Outgoing {
    frame: Vec<u8>,
    /// A request's call id: the frame is skipped if nobody waits for it any more.
    call: Option<u64>,
    /// An inbound request's slot, freed once its response is written.
    _slot: Option<OwnedSemaphorePermit>,
}

/// A bad frame seen on a pipe, for the swarm task's offence books.
pub(crate) struct PipeOffence {
    pub(crate) peer: PeerId,
    pub(crate) kind: &'static str,
    pub(crate) error: String,
}

/// The pipes of a node, shared by its `NetHandle`s, the swarm task and the pipes'
/// own tasks.
pub(crate) struct Pipes {
    out: Mutex<HashMap<PeerId, PipeState>>,
    /// Inbound pipes being served, per peer.
    inbound: Mutex<HashMap<PeerId, usize>>,
    next_id: AtomicU64,
    control: Mutex<libp2p_stream::Control>,
    request_timeout: Duration,
    offences: mpsc::UnboundedSender<PipeOffence>,
    calls: Family<RouteLabel, Counter>,
}

impl std::fmt::Debug for Pipes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Pipes")
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these locks leaves plain maps behind, still
    // consistent enough to go on with.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Pipes {
    pub(crate) fn new(
        control: libp2p_stream::Control,
        request_timeout: Duration,
        offences: mpsc::UnboundedSender<PipeOffence>,
        registry: &mut Registry,
    ) -> Arc<Self> {
        let calls = Family::<RouteLabel, Counter>::default();
        registry.sub_registry_with_prefix("kiln_net").register(
            "calls",
            "Requests this node sent to peers, by route: on the peer's pipe, or on a substream of their own",
            calls.clone(),
        );
        for route in ["pipe", "substream"] {
            let _ = calls.get_or_create(&RouteLabel { route });
        }
        Arc::new(Pipes {
            out: Mutex::new(HashMap::new()),
            inbound: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            control: Mutex::new(control),
            request_timeout,
            offences,
            calls,
        })
    }

    fn count(&self, route: &'static str) {
        self.calls.get_or_create(&RouteLabel { route }).inc();
    }

    /// Sends `request` on the pipe to `peer` if there is one with room and the
    /// request fits; otherwise gives it back for a substream of its own.
    pub(crate) fn try_call(
        &self,
        peer: PeerId,
        request: Request,
        reply: oneshot::Sender<Result<Response, CallError>>,
    ) -> Result<(), (Request, oneshot::Sender<Result<Response, CallError>>)> {
        if !fits_pipe(&request) {
            self.count("substream");
            return Err((request, reply));
        }
        // Encoded before the lock of every peer's pipe is taken (a pipe is open
        // nearly always; the rare fallback wastes one encoding).
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let frame = wire::encode(&PipeFrame { id, body: &request });
        let out = lock(&self.out);
        let Some(PipeState::Open { frames, shared, .. }) = out.get(&peer) else {
            drop(out);
            self.count("substream");
            return Err((request, reply));
        };
        let mut pending = lock(&shared.pending);
        if pending.len() >= MAX_PENDING_CALLS {
            drop(pending);
            drop(out);
            self.count("substream");
            return Err((request, reply));
        }
        pending.insert(
            id,
            Pending {
                reply,
                deadline: Instant::now() + self.request_timeout,
            },
        );
        let queued = frames.send(Outgoing {
            frame,
            call: Some(id),
            _slot: None,
        });
        if queued.is_err() {
            // The pipe's writer has ended; its close will fail the call.
            tracing::trace!(%peer, "pipe closed under a call");
        }
        drop(pending);
        drop(out);
        self.count("pipe");
        Ok(())
    }

    /// Opens a pipe to `peer` unless one is open, opening, or failed recently.
    /// Must be called on the tokio runtime.
    pub(crate) fn open(self: &Arc<Self>, peer: PeerId) {
        let token = self.next_id.fetch_add(1, Ordering::Relaxed);
        {
            let mut out = lock(&self.out);
            match out.get(&peer) {
                Some(PipeState::Opening(_) | PipeState::Open { .. }) => return,
                Some(PipeState::Failed(at)) if at.elapsed() < REOPEN_AFTER => return,
                _ => {}
            }
            out.insert(peer, PipeState::Opening(token));
        }
        let mut control = lock(&self.control).clone();
        let pipes = self.clone();
        tokio::spawn(async move {
            let opened = tokio::time::timeout(OPEN_TIMEOUT, async {
                let mut stream = control
                    .open_stream(peer, PIPE_PROTOCOL)
                    .await
                    .map_err(|e| e.to_string())?;
                read_hello(&mut stream).await?;
                Ok::<_, String>(stream)
            })
            .await;
            match opened {
                Ok(Ok(stream)) => pipes.start(peer, token, stream),
                Ok(Err(e)) => pipes.open_failed(peer, token, &e),
                Err(_) => pipes.open_failed(peer, token, "timed out"),
            }
        });
    }

    fn open_failed(&self, peer: PeerId, token: u64, error: &str) {
        let mut out = lock(&self.out);
        if matches!(out.get(&peer), Some(PipeState::Opening(t)) if *t == token) {
            tracing::debug!(%peer, error, "cannot open a pipe; requests to this peer use substreams for now");
            out.insert(peer, PipeState::Failed(Instant::now()));
        }
    }

    /// Starts the tasks of a newly opened pipe to `peer`, if its open is still the
    /// one wanted (the connection may have closed meanwhile).
    fn start(self: &Arc<Self>, peer: PeerId, token: u64, stream: libp2p::Stream) {
        let generation = token;
        let (frames_tx, frames_rx) = mpsc::unbounded_channel();
        let shared = Arc::new(OpenPipe::new());
        let mut out = lock(&self.out);
        if !matches!(out.get(&peer), Some(PipeState::Opening(t)) if *t == token) {
            // Dropping the stream closes it.
            return;
        }
        let (read, write) = stream.split();
        let reader = tokio::spawn(read_responses(
            self.clone(),
            peer,
            generation,
            read,
            shared.clone(),
        ));
        let pipes = self.clone();
        let calls = shared.clone();
        let stall = self.request_timeout;
        let writer = tokio::spawn(async move {
            let error = match write_frames(write, frames_rx, Some(&calls), stall).await {
                Ok(()) => "closed".to_string(),
                Err(e) => e.to_string(),
            };
            pipes.close(peer, Some(generation), &error);
        });
        out.insert(
            peer,
            PipeState::Open {
                generation,
                frames: frames_tx,
                shared,
                tasks: vec![reader.abort_handle(), writer.abort_handle()],
            },
        );
        drop(out);
        tracing::debug!(%peer, "pipe open");
    }

    /// Forgets the pipe to `peer` (only the one of `generation`, if given) and
    /// fails its waiting calls.
    pub(crate) fn close(&self, peer: PeerId, generation: Option<u64>, reason: &str) {
        let state = {
            let mut out = lock(&self.out);
            match out.get(&peer) {
                Some(PipeState::Open { generation: g, .. })
                    if generation.is_none_or(|want| want == *g) =>
                {
                    out.remove(&peer)
                }
                _ => None,
            }
        };
        closed(peer, state, reason);
    }

    /// Forgets everything about a peer whose last connection closed: its pipe,
    /// an open under way (whose result is then dropped), a recent failure.
    pub(crate) fn disconnected(&self, peer: PeerId) {
        // One critical section: a pipe installed in between must not be dropped
        // with its calls still waiting.
        let state = lock(&self.out).remove(&peer);
        closed(peer, state, "connection closed");
    }

    /// Fails the calls whose time is up and forgets those nobody waits for. A
    /// pipe silent for the request timeout is closed, so the next call opens a
    /// new one.
    pub(crate) fn sweep(&self) {
        let now = Instant::now();
        let mut silent = Vec::new();
        {
            let out = lock(&self.out);
            for (peer, state) in out.iter() {
                let PipeState::Open {
                    generation, shared, ..
                } = state
                else {
                    continue;
                };
                lock(&shared.pending).retain(|_, call| {
                    if call.reply.is_closed() {
                        return false;
                    }
                    if call.deadline > now {
                        return true;
                    }
                    let (tx, _) = oneshot::channel();
                    let reply = std::mem::replace(&mut call.reply, tx);
                    // A closed receiver is fine: the caller gave up first.
                    let _ = reply.send(Err(CallError::Failed {
                        peer: *peer,
                        reason: "timed out".into(),
                    }));
                    false
                });
                let silent_since = *lock(&shared.silent_since);
                if silent_since.is_some_and(|t| now.duration_since(t) >= self.request_timeout) {
                    silent.push((*peer, *generation));
                }
            }
        }
        for (peer, generation) in silent {
            tracing::warn!(%peer, timeout_s = self.request_timeout.as_secs(),
                "a request has waited on the pipe to this peer with nothing arriving; reopening the pipe");
            self.close(
                peer,
                Some(generation),
                "nothing arrived on it within the request timeout",
            );
        }
    }

    fn offence(&self, peer: PeerId, kind: &'static str, error: &WireError) {
        let _ = self.offences.send(PipeOffence {
            peer,
            kind,
            error: error.to_string(),
        });
    }
}

/// Fails the waiting calls of a pipe just forgotten (if `state` was an open one).
fn closed(peer: PeerId, state: Option<PipeState>, reason: &str) {
    let Some(PipeState::Open { shared, tasks, .. }) = state else {
        return;
    };
    tracing::debug!(%peer, reason, "pipe closed");
    // Ends the stream (both halves dropped) and frees what was queued.
    for task in tasks {
        task.abort();
    }
    for (_, call) in lock(&shared.pending).drain() {
        let _ = call.reply.send(Err(CallError::Failed {
            peer,
            reason: format!("pipe closed: {reason}"),
        }));
    }
}

/// Reads the acceptor's hello off a newly opened pipe.
async fn read_hello<R: AsyncRead + Unpin>(io: &mut R) -> Result<(), String> {
    match read_frame(io).await {
        Ok(RawFrame::Bytes(b)) => match wire::decode::<PipeHello>(&b, MAX_FRAME_BYTES) {
            Ok(h) if h.pipe == PIPE_VERSION => Ok(()),
            Ok(h) => Err(format!("the peer speaks pipe version {}", h.pipe)),
            Err(e) => Err(format!("bad hello: {e}")),
        },
        Ok(RawFrame::TooLarge(len)) => Err(format!("bad hello: a frame of {len} bytes")),
        Err(e) => Err(format!("no hello: {e}")),
    }
}

/// Writes queued frames, gathering what is queued into one write, until the
/// queue closes. Requests nobody waits for any more (their call in `calls` is
/// gone) are skipped. A write the peer does not take within `stall` (it stopped
/// reading) ends the pipe.
async fn write_frames<W: AsyncWrite + Unpin>(
    mut io: W,
    mut queue: mpsc::UnboundedReceiver<Outgoing>,
    calls: Option<&OpenPipe>,
    stall: Duration,
) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(WRITE_BATCH_BYTES);
    let mut written = Vec::new();
    while let Some(first) = queue.recv().await {
        buf.clear();
        let mut requests = false;
        let mut next = Some(first);
        while let Some(item) = next.take() {
            let wanted = match (item.call, calls) {
                (Some(id), Some(calls)) => lock(&calls.pending).contains_key(&id),
                _ => true,
            };
            if wanted {
                put_frame(&mut buf, &item.frame);
                requests |= item.call.is_some();
            }
            written.push(item);
            if buf.len() < WRITE_BATCH_BYTES {
                next = queue.try_recv().ok();
            }
        }
        if let (true, Some(calls)) = (requests, calls) {
            // Before the write: an answer may arrive before it returns.
            lock(&calls.silent_since).get_or_insert_with(Instant::now);
        }
        if !buf.is_empty() {
            let write = async {
                io.write_all(&buf).await?;
                io.flush().await
            };
            tokio::time::timeout(stall, write).await.map_err(|_| {
                std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("the peer took nothing written for {} s", stall.as_secs()),
                )
            })??;
        }
        // Frees the slots of the answers just written.
        written.clear();
    }
    io.close().await
}

fn put_frame(buf: &mut Vec<u8>, frame: &[u8]) {
    buf.extend_from_slice(&(frame.len() as u32).to_be_bytes());
    buf.extend_from_slice(frame);
}

/// A frame read from a pipe: its bytes, or an announced length over the limit
/// (after which the stream cannot be read on).
enum RawFrame {
    Bytes(Vec<u8>),
    TooLarge(usize),
}

async fn read_frame<R: AsyncRead + Unpin>(io: &mut R) -> std::io::Result<RawFrame> {
    let mut len = [0u8; 4];
    io.read_exact(&mut len).await?;
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_FRAME_BYTES {
        return Ok(RawFrame::TooLarge(len));
    }
    let mut buf = vec![0u8; len];
    io.read_exact(&mut buf).await?;
    Ok(RawFrame::Bytes(buf))
}

/// Reads responses off a pipe and hands each to its call, until the stream ends
/// or breaks.
async fn read_responses<R: AsyncRead + Unpin>(
    pipes: Arc<Pipes>,
    peer: PeerId,
    generation: u64,
    mut io: R,
    shared: Arc<OpenPipe>,
) {
    let reason = loop {
        let bytes = match read_frame(&mut io).await {
            Ok(RawFrame::Bytes(b)) => b,
            Ok(RawFrame::TooLarge(len)) => {
                let e = WireError::TooLarge {
                    len,
                    max: MAX_FRAME_BYTES,
                };
                pipes.offence(peer, "response", &e);
                break e.to_string();
            }
            Err(e) => break e.to_string(),
        };
        *lock(&shared.silent_since) = None;
        match wire::decode::<PipeFrame<Response>>(&bytes, MAX_FRAME_BYTES) {
            Ok(frame) => {
                let call = lock(&shared.pending).remove(&frame.id);
                if let Some(call) = call {
                    let _ = call.reply.send(Ok(frame.body));
                }
            }
            // The call this frame answered cannot be known; it times out.
            Err(e) => pipes.offence(peer, "response", &e),
        }
    };
    // Ends the pipe's writer too (by forgetting its queue), so the stream closes.
    pipes.close(peer, Some(generation), &reason);
}

/// How an inbound request that came on a pipe is answered: its response is queued
/// on the pipe's writer. Dropped unanswered, it answers `Refused`, so the caller
/// does not wait for its timeout.
pub(crate) struct PipeReply {
    id: u64,
    responses: Option<mpsc::UnboundedSender<Outgoing>>,
    slot: Option<OwnedSemaphorePermit>,
}

impl PipeReply {
    pub(crate) fn answer(mut self, response: &Response) {
        self.send(response);
    }

    fn send(&mut self, response: &Response) {
        let Some(tx) = self.responses.take() else {
            return;
        };
        let mut frame = wire::encode(&PipeFrame {
            id: self.id,
            body: response,
        });
        if frame.len() > MAX_FRAME_BYTES {
            // The caller would take it for a bad frame; request-response refuses
            // to send such a frame too.
            frame = wire::encode(&PipeFrame {
                id: self.id,
                body: Response::Refused {
                    reason: format!(
                        "the answer of {} bytes exceeds the frame limit of {MAX_FRAME_BYTES}",
                        frame.len()
                    ),
                },
            });
        }
        let _ = tx.send(Outgoing {
            frame,
            call: None,
            _slot: self.slot.take(),
        });
    }
}

impl Drop for PipeReply {
    fn drop(&mut self) {
        self.send(&Response::Refused {
            reason: "the request was dropped unanswered".into(),
        });
    }
}

/// Where inbound requests go, whether they came on a pipe or a substream.
#[derive(Clone)]
pub(crate) struct InboundRoutes {
    pub(crate) events: mpsc::UnboundedSender<NetEvent>,
    pub(crate) services: mpsc::UnboundedSender<ServiceRequest>,
}

impl InboundRoutes {
    /// A request for a service goes to the services channel, membership's to
    /// the event channel (the membership actor).
    pub(crate) fn route(&self, peer: PeerId, request: Request, reply: Reply) {
        if request.is_service() {
            let _ = self.services.send(ServiceRequest {
                peer,
                request,
                reply,
            });
        } else {
            let _ = self.events.send(NetEvent::Request {
                peer,
                request,
                reply,
            });
        }
    }
}

/// Accepts the pipes peers open to this node, and serves each.
pub(crate) async fn accept_pipes(
    pipes: Arc<Pipes>,
    mut incoming: libp2p_stream::IncomingStreams,
    routes: InboundRoutes,
) {
    while let Some((peer, stream)) = incoming.next().await {
        {
            let mut inbound = lock(&pipes.inbound);
            let n = inbound.entry(peer).or_insert(0);
            if *n >= MAX_INBOUND_PIPES_PER_PEER {
                tracing::warn!(%peer, pipes = *n, "refusing another pipe from a peer that has this many open");
                continue;
            }
            *n += 1;
        }
        tracing::debug!(%peer, "pipe accepted");
        let counted = InboundPipe {
            pipes: pipes.clone(),
            peer,
        };
        let routes = routes.clone();
        tokio::spawn(async move {
            serve_pipe(counted.pipes.clone(), peer, stream, routes).await;
            drop(counted);
        });
    }
}

/// One inbound pipe counted against its peer's `MAX_INBOUND_PIPES_PER_PEER`
/// while it is served (uncounted however the serving ends).
struct InboundPipe {
    pipes: Arc<Pipes>,
    peer: PeerId,
}

impl Drop for InboundPipe {
    fn drop(&mut self) {
        let mut inbound = lock(&self.pipes.inbound);
        if let Some(n) = inbound.get_mut(&self.peer) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                inbound.remove(&self.peer);
            }
        }
    }
}

/// Whether `request` may be served now: `Some(slot)` (a control-plane request
/// takes none of the stripe slots), or `None` when every stripe slot is taken.
fn admit(request: &Request, slots: &Arc<Semaphore>) -> Option<Option<OwnedSemaphorePermit>> {
    match request {
        Request::ControlPlane { .. } => Some(None),
        _ => slots.clone().try_acquire_owned().ok().map(Some),
    }
}

/// Says hello, then reads the requests of one inbound pipe and routes them; a
/// writer task sends their responses back as they are answered.
async fn serve_pipe(
    pipes: Arc<Pipes>,
    peer: PeerId,
    stream: libp2p::Stream,
    routes: InboundRoutes,
) {
    let (mut read, write) = stream.split();
    let (responses, queue) = mpsc::unbounded_channel();
    let _ = responses.send(Outgoing {
        frame: wire::encode(&PipeHello { pipe: PIPE_VERSION }),
        call: None,
        _slot: None,
    });
    let writer = tokio::spawn(write_frames(write, queue, None, pipes.request_timeout));
    let slots = Arc::new(Semaphore::new(MAX_SERVED_REQUESTS));
    let other_answers = Arc::new(Semaphore::new(MAX_QUEUED_OTHER_ANSWERS));
    loop {
        let bytes = match read_frame(&mut read).await {
            Ok(RawFrame::Bytes(b)) => b,
            Ok(RawFrame::TooLarge(len)) => {
                pipes.offence(
                    peer,
                    "request",
                    &WireError::TooLarge {
                        len,
                        max: MAX_FRAME_BYTES,
                    },
                );
                break;
            }
            Err(_) => break,
        };
        let frame = match wire::decode::<PipeFrame<Request>>(&bytes, MAX_FRAME_BYTES) {
            Ok(frame) => frame,
            Err(e) => {
                pipes.offence(peer, "request", &e);
                continue;
            }
        };
        let mut reply = PipeReply {
            id: frame.id,
            responses: Some(responses.clone()),
            slot: None,
        };
        let slot = admit(&frame.body, &slots);
        if !matches!(slot, Some(Some(_))) {
            // An answer without a stripe slot: bounded all the same, by
            // reading no further until the peer takes what is queued.
            match other_answers.clone().acquire_owned().await {
                Ok(permit) => reply.slot = Some(permit),
                Err(_) => break,
            }
        }
        match slot {
            Some(Some(slot)) => reply.slot = Some(slot),
            Some(None) => {}
            None => {
                reply.answer(&Response::Refused {
                    reason: format!(
                        "busy: {MAX_SERVED_REQUESTS} requests from this peer in service"
                    ),
                });
                continue;
            }
        }
        routes.route(peer, frame.body, Reply::pipe(reply));
    }
    // The writer ends once every reply handed out is answered or dropped.
    drop(responses);
    let _ = writer.await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_bytes::ByteBuf;

    #[test]
    fn only_small_stripe_and_control_plane_requests_take_the_pipe() {
        let small = ByteBuf::from(vec![0u8; 100]);
        let big = ByteBuf::from(vec![0u8; PIPE_MAX_BODY_BYTES + 1]);
        assert!(fits_pipe(&Request::Stripe {
            body: small.clone()
        }));
        assert!(fits_pipe(&Request::ControlPlane { body: small }));
        assert!(!fits_pipe(&Request::Stripe { body: big.clone() }));
        assert!(!fits_pipe(&Request::ControlPlane { body: big }));
        assert!(!fits_pipe(&Request::ArtifactChunk {
            sha256: "00".into(),
            index: 0
        }));
    }

    #[tokio::test]
    async fn frames_written_in_one_batch_are_read_back_one_by_one() {
        let (tx, rx) = mpsc::unbounded_channel();
        for id in 1..=3u64 {
            let frame = wire::encode(&PipeFrame {
                id,
                body: Response::Refused {
                    reason: format!("r{id}"),
                },
            });
            tx.send(Outgoing {
                frame,
                call: None,
                _slot: None,
            })
            .expect("queue open");
        }
        drop(tx);
        let mut out = futures::io::Cursor::new(Vec::new());
        write_frames(&mut out, rx, None, Duration::from_secs(5))
            .await
            .expect("written");
        let mut input = futures::io::Cursor::new(out.into_inner());
        for id in 1..=3u64 {
            let RawFrame::Bytes(b) = read_frame(&mut input).await.expect("frame") else {
                panic!("frame {id} too large");
            };
            let frame: PipeFrame<Response> = wire::decode(&b, MAX_FRAME_BYTES).expect("decodes");
            assert_eq!(frame.id, id);
            assert_eq!(
                frame.body,
                Response::Refused {
                    reason: format!("r{id}")
                }
            );
        }
        assert!(
            read_frame(&mut input).await.is_err(),
            "nothing after the last frame"
        );
    }

    fn pipes(request_timeout: Duration) -> Arc<Pipes> {
        let (offences, _) = mpsc::unbounded_channel();
        Pipes::new(
            libp2p_stream::Behaviour::new().new_control(),
            request_timeout,
            offences,
            &mut Registry::default(),
        )
    }

    /// Installs an open pipe to `peer` without a stream; returns its queue.
    fn install(
        pipes: &Pipes,
        peer: PeerId,
        generation: u64,
    ) -> (mpsc::UnboundedReceiver<Outgoing>, Arc<OpenPipe>) {
        install_with(pipes, peer, generation, Vec::new())
    }

    fn install_with(
        pipes: &Pipes,
        peer: PeerId,
        generation: u64,
        tasks: Vec<tokio::task::AbortHandle>,
    ) -> (mpsc::UnboundedReceiver<Outgoing>, Arc<OpenPipe>) {
        let (frames, queue) = mpsc::unbounded_channel();
        let shared = Arc::new(OpenPipe::new());
        lock(&pipes.out).insert(
            peer,
            PipeState::Open {
                generation,
                frames,
                shared: shared.clone(),
                tasks,
            },
        );
        (queue, shared)
    }

    /// A peer that takes nothing written to it.
    struct NotReading;

    impl AsyncWrite for NotReading {
        fn poll_write(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            _: &[u8],
        ) -> std::task::Poll<std::io::Result<usize>> {
            std::task::Poll::Pending
        }
        fn poll_flush(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::task::Poll::Pending
        }
        fn poll_close(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::task::Poll::Pending
        }
    }

    #[tokio::test]
    async fn a_peer_that_stops_reading_ends_the_pipe_and_its_tasks() {
        let (tx, rx) = mpsc::unbounded_channel();
        tx.send(Outgoing {
            frame: vec![1, 2, 3],
            call: None,
            _slot: None,
        })
        .expect("queue open");
        let err = write_frames(NotReading, rx, None, Duration::from_millis(50))
            .await
            .expect_err("a write nobody takes times out");
        assert_eq!(err.kind(), std::io::ErrorKind::TimedOut);

        // Closing a pipe stops its reader and writer, wherever they are stuck.
        let pipes = pipes(Duration::from_secs(5));
        let peer = PeerId::random();
        let stuck = tokio::spawn(std::future::pending::<()>());
        let (_queue, _) = install_with(&pipes, peer, 1, vec![stuck.abort_handle()]);
        pipes.close(peer, Some(1), "test");
        assert!(stuck.await.is_err_and(|e| e.is_cancelled()));
    }

    fn stripe_request(bytes: usize) -> Request {
        Request::Stripe {
            body: ByteBuf::from(vec![7u8; bytes]),
        }
    }

    #[test]
    fn a_call_takes_the_pipe_only_when_one_is_open_and_it_fits() {
        let pipes = pipes(Duration::from_secs(5));
        let peer = PeerId::random();
        let (tx, _rx) = oneshot::channel();
        assert!(
            pipes.try_call(peer, stripe_request(10), tx).is_err(),
            "no pipe yet"
        );
        let (mut queue, shared) = install(&pipes, peer, 1);
        let (tx, _rx) = oneshot::channel();
        assert!(pipes.try_call(peer, stripe_request(10), tx).is_ok());
        assert_eq!(lock(&shared.pending).len(), 1);
        assert!(queue.try_recv().is_ok(), "the request is queued");
        let (tx, _rx) = oneshot::channel();
        let big = stripe_request(PIPE_MAX_BODY_BYTES + 1);
        assert!(
            pipes.try_call(peer, big, tx).is_err(),
            "too big for the pipe"
        );
    }

    #[tokio::test]
    async fn closing_a_pipe_fails_its_calls_and_only_its_own_generation_closes_it() {
        let pipes = pipes(Duration::from_secs(5));
        let peer = PeerId::random();
        let (_queue, _) = install(&pipes, peer, 7);
        let (tx, rx) = oneshot::channel();
        assert!(pipes.try_call(peer, stripe_request(10), tx).is_ok());
        pipes.close(peer, Some(6), "an older pipe's end");
        assert!(
            lock(&pipes.out).contains_key(&peer),
            "a stale close is ignored"
        );
        pipes.close(peer, Some(7), "reset");
        assert!(matches!(rx.await, Ok(Err(CallError::Failed { .. }))));
        assert!(!lock(&pipes.out).contains_key(&peer));
    }

    #[tokio::test]
    async fn a_timed_out_call_fails_but_leaves_its_pipe_open_while_frames_arrive() {
        let pipes = pipes(Duration::ZERO);
        let peer = PeerId::random();
        let (_queue, _shared) = install(&pipes, peer, 1);
        let (tx, rx) = oneshot::channel();
        assert!(pipes.try_call(peer, stripe_request(10), tx).is_ok());
        pipes.sweep();
        match rx.await {
            Ok(Err(CallError::Failed { reason, .. })) => assert_eq!(reason, "timed out"),
            other => panic!("expected a timeout, got {other:?}"),
        }
        assert!(lock(&pipes.out).contains_key(&peer), "not silent: kept");
    }

    #[test]
    fn a_pipe_silent_past_the_request_timeout_is_closed_though_its_callers_gave_up() {
        let pipes = pipes(Duration::from_secs(2));
        let peer = PeerId::random();
        let (_queue, shared) = install(&pipes, peer, 1);
        let (tx, rx) = oneshot::channel();
        assert!(pipes.try_call(peer, stripe_request(10), tx).is_ok());
        drop(rx);
        *lock(&shared.silent_since) = Some(Instant::now() - Duration::from_secs(1));
        pipes.sweep();
        assert!(
            lock(&pipes.out).contains_key(&peer),
            "silent for less: kept"
        );
        assert!(
            lock(&shared.pending).is_empty(),
            "the abandoned call is forgotten"
        );
        *lock(&shared.silent_since) = Some(Instant::now() - Duration::from_secs(3));
        pipes.sweep();
        assert!(!lock(&pipes.out).contains_key(&peer), "silent pipe closed");
    }

    #[tokio::test]
    async fn a_disconnect_fails_the_calls_of_a_pipe_installed_just_before() {
        let pipes = pipes(Duration::from_secs(5));
        let peer = PeerId::random();
        let (_queue, _) = install(&pipes, peer, 1);
        let (tx, rx) = oneshot::channel();
        assert!(pipes.try_call(peer, stripe_request(10), tx).is_ok());
        pipes.disconnected(peer);
        assert!(matches!(rx.await, Ok(Err(CallError::Failed { .. }))));
        let (tx, _rx) = oneshot::channel();
        assert!(
            pipes.try_call(peer, stripe_request(10), tx).is_err(),
            "no pipe after the disconnect"
        );
    }

    #[test]
    fn a_call_while_the_pipe_opens_takes_a_substream() {
        let pipes = pipes(Duration::from_secs(5));
        let peer = PeerId::random();
        lock(&pipes.out).insert(peer, PipeState::Opening(1));
        let (tx, _rx) = oneshot::channel();
        assert!(pipes.try_call(peer, stripe_request(10), tx).is_err());
    }

    #[test]
    fn stripe_requests_past_the_slots_are_refused_and_the_control_plane_always_served() {
        let slots = Arc::new(Semaphore::new(2));
        let taken: Vec<_> = (0..2)
            .map(|_| admit(&stripe_request(1), &slots).expect("a slot"))
            .collect();
        assert!(
            admit(&stripe_request(1), &slots).is_none(),
            "all slots taken"
        );
        let control = Request::ControlPlane {
            body: ByteBuf::from(vec![1u8]),
        };
        assert!(matches!(admit(&control, &slots), Some(None)));
        drop(taken);
        assert!(admit(&stripe_request(1), &slots).is_some(), "freed");
    }

    #[tokio::test]
    async fn a_request_nobody_waits_for_is_not_written() {
        let shared = OpenPipe::new();
        let (reply, _rx) = oneshot::channel();
        lock(&shared.pending).insert(
            1,
            Pending {
                reply,
                deadline: Instant::now() + Duration::from_secs(5),
            },
        );
        let (tx, rx) = mpsc::unbounded_channel();
        for id in [1u64, 2] {
            let frame = wire::encode(&PipeFrame {
                id,
                body: stripe_request(4),
            });
            tx.send(Outgoing {
                frame,
                call: Some(id),
                _slot: None,
            })
            .expect("queue open");
        }
        drop(tx);
        let mut out = futures::io::Cursor::new(Vec::new());
        write_frames(&mut out, rx, Some(&shared), Duration::from_secs(5))
            .await
            .expect("written");
        assert!(
            lock(&shared.silent_since).is_some(),
            "a request written waits for an answer"
        );
        let mut input = futures::io::Cursor::new(out.into_inner());
        let Ok(RawFrame::Bytes(b)) = read_frame(&mut input).await else {
            panic!("one frame written");
        };
        let frame: PipeFrame<Request> = wire::decode(&b, MAX_FRAME_BYTES).expect("decodes");
        assert_eq!(frame.id, 1);
        assert!(
            read_frame(&mut input).await.is_err(),
            "call 2 was not written"
        );
    }

    fn answer_of(queue: &mut mpsc::UnboundedReceiver<Outgoing>) -> Response {
        let out = queue.try_recv().expect("an answer is queued");
        let frame: PipeFrame<Response> =
            wire::decode(&out.frame, MAX_FRAME_BYTES).expect("decodes");
        assert_eq!(frame.id, 9);
        frame.body
    }

    #[test]
    fn an_answer_over_the_frame_limit_or_none_at_all_is_sent_as_refused() {
        let (tx, mut queue) = mpsc::unbounded_channel();
        let reply = |tx: &mpsc::UnboundedSender<Outgoing>| PipeReply {
            id: 9,
            responses: Some(tx.clone()),
            slot: None,
        };
        reply(&tx).answer(&Response::Stripe {
            body: ByteBuf::from(vec![1u8; MAX_FRAME_BYTES]),
        });
        assert!(
            matches!(answer_of(&mut queue), Response::Refused { reason } if reason.contains("frame limit"))
        );
        drop(reply(&tx));
        assert!(
            matches!(answer_of(&mut queue), Response::Refused { reason } if reason.contains("unanswered"))
        );
        let small = Response::Stripe {
            body: ByteBuf::from(vec![1u8; 3]),
        };
        reply(&tx).answer(&small);
        assert_eq!(answer_of(&mut queue), small);
        assert!(queue.try_recv().is_err(), "one answer each");
    }

    #[tokio::test]
    async fn a_pipe_is_used_only_after_the_acceptors_hello() {
        let mut hello = Vec::new();
        put_frame(&mut hello, &wire::encode(&PipeHello { pipe: PIPE_VERSION }));
        assert!(read_hello(&mut futures::io::Cursor::new(hello))
            .await
            .is_ok());
        let mut other = Vec::new();
        put_frame(&mut other, &wire::encode(&PipeHello { pipe: 99 }));
        assert!(read_hello(&mut futures::io::Cursor::new(other))
            .await
            .is_err());
        // A stream the peer reset or never accepted.
        assert!(read_hello(&mut futures::io::Cursor::new(Vec::new()))
            .await
            .is_err());
    }

    #[test]
    fn an_open_that_ends_after_its_connection_closed_installs_nothing() {
        let pipes = pipes(Duration::from_secs(5));
        let peer = PeerId::random();
        lock(&pipes.out).insert(peer, PipeState::Opening(3));
        pipes.disconnected(peer);
        pipes.open_failed(peer, 3, "reset");
        assert!(
            !lock(&pipes.out).contains_key(&peer),
            "no failure remembered for the next connection"
        );
        lock(&pipes.out).insert(peer, PipeState::Opening(4));
        pipes.open_failed(peer, 3, "an older open");
        assert!(matches!(
            lock(&pipes.out).get(&peer),
            Some(PipeState::Opening(4))
        ));
    }

    #[tokio::test]
    async fn an_announced_length_over_the_limit_is_refused_before_its_body() {
        let mut bytes = ((MAX_FRAME_BYTES + 1) as u32).to_be_bytes().to_vec();
        bytes.extend_from_slice(&[0u8; 16]);
        let mut input = futures::io::Cursor::new(bytes);
        assert!(matches!(
            read_frame(&mut input).await,
            Ok(RawFrame::TooLarge(len)) if len == MAX_FRAME_BYTES + 1
        ));
    }
}
