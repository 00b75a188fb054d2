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
use tokio::sync::{mpsc, oneshot};

use crate::swarm::{CallError, NetCommand, NetEvent, ServiceRequest};
use crate::wire::{self, Request, Response, WireError, MAX_FRAME_BYTES};

/// Protocol name of kiln's pipes.
pub const PIPE_PROTOCOL: StreamProtocol = StreamProtocol::new("/kiln/pipe/1");

/// Requests whose body is larger than this take a substream of their own.
pub const PIPE_MAX_BODY_BYTES: usize = 64 * 1024;

/// After a failed open, calls to that peer use substreams for this long before a
/// call tries to open a pipe again (a peer without the protocol is not asked for
/// it on every call).
const REOPEN_AFTER: Duration = Duration::from_secs(10);

/// How long opening a pipe may take.
const OPEN_TIMEOUT: Duration = Duration::from_secs(10);

/// Bytes of queued frames one write may gather.
const WRITE_BATCH_BYTES: usize = 256 * 1024;

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

enum PipeState {
    Opening,
    /// Opening failed at this time; calls use substreams until `REOPEN_AFTER`.
    Failed(Instant),
    Open {
        generation: u64,
        frames: mpsc::UnboundedSender<Vec<u8>>,
        pending: Arc<Mutex<HashMap<u64, Pending>>>,
    },
}

/// The pipes of a node, shared by its `NetHandle`s, the swarm task and the pipes'
/// own tasks.
pub(crate) struct Pipes {
    out: Mutex<HashMap<PeerId, PipeState>>,
    next_id: AtomicU64,
    control: Mutex<libp2p_stream::Control>,
    request_timeout: Duration,
    /// For offences seen on a pipe: the swarm task keeps the books.
    commands: mpsc::UnboundedSender<NetCommand>,
    calls: Family<RouteLabel, Counter>,
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
        commands: mpsc::UnboundedSender<NetCommand>,
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
            next_id: AtomicU64::new(1),
            control: Mutex::new(control),
            request_timeout,
            commands,
            calls,
        })
    }

    /// Sends `request` on the pipe to `peer` if there is one and the request fits;
    /// otherwise gives it back for a substream of its own.
    pub(crate) fn try_call(
        &self,
        peer: PeerId,
        request: Request,
        reply: oneshot::Sender<Result<Response, CallError>>,
    ) -> Result<(), (Request, oneshot::Sender<Result<Response, CallError>>)> {
        if !fits_pipe(&request) {
            self.calls
                .get_or_create(&RouteLabel { route: "substream" })
                .inc();
            return Err((request, reply));
        }
        let out = lock(&self.out);
        let Some(PipeState::Open {
            frames, pending, ..
        }) = out.get(&peer)
        else {
            self.calls
                .get_or_create(&RouteLabel { route: "substream" })
                .inc();
            return Err((request, reply));
        };
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let frame = wire::encode(&PipeFrame { id, body: &request });
        lock(pending).insert(
            id,
            Pending {
                reply,
                deadline: Instant::now() + self.request_timeout,
            },
        );
        if frames.send(frame).is_err() {
            // The pipe's writer has ended; its close will fail the call.
            tracing::trace!(%peer, "pipe closed under a call");
        }
        self.calls
            .get_or_create(&RouteLabel { route: "pipe" })
            .inc();
        Ok(())
    }

    /// Opens a pipe to `peer` unless one is open, opening, or failed recently.
    /// Must be called on the tokio runtime.
    pub(crate) fn open(self: &Arc<Self>, peer: PeerId) {
        {
            let mut out = lock(&self.out);
            match out.get(&peer) {
                Some(PipeState::Opening | PipeState::Open { .. }) => return,
                Some(PipeState::Failed(at)) if at.elapsed() < REOPEN_AFTER => return,
                _ => {}
            }
            out.insert(peer, PipeState::Opening);
        }
        let mut control = lock(&self.control).clone();
        let pipes = self.clone();
        tokio::spawn(async move {
            let opened =
                tokio::time::timeout(OPEN_TIMEOUT, control.open_stream(peer, PIPE_PROTOCOL)).await;
            match opened {
                Ok(Ok(stream)) => pipes.start(peer, stream),
                Ok(Err(e)) => pipes.open_failed(peer, &e.to_string()),
                Err(_) => pipes.open_failed(peer, "timed out"),
            }
        });
    }

    fn open_failed(&self, peer: PeerId, error: &str) {
        tracing::debug!(%peer, error, "cannot open a pipe; requests to this peer use substreams");
        let mut out = lock(&self.out);
        if matches!(out.get(&peer), Some(PipeState::Opening)) {
            out.insert(peer, PipeState::Failed(Instant::now()));
        }
    }

    /// Starts the tasks of a newly opened pipe to `peer`.
    fn start(self: &Arc<Self>, peer: PeerId, stream: libp2p::Stream) {
        let generation = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (frames_tx, frames_rx) = mpsc::unbounded_channel();
        let pending = Arc::new(Mutex::new(HashMap::new()));
        lock(&self.out).insert(
            peer,
            PipeState::Open {
                generation,
                frames: frames_tx,
                pending: pending.clone(),
            },
        );
        tracing::debug!(%peer, "pipe open");
        let (read, write) = stream.split();
        let pipes = self.clone();
        tokio::spawn(async move {
            let reader = tokio::spawn(read_responses(
                pipes.clone(),
                peer,
                generation,
                read,
                pending,
            ));
            let error = match write_frames(write, frames_rx).await {
                Ok(()) => "closed".to_string(),
                Err(e) => e.to_string(),
            };
            reader.abort();
            pipes.close(peer, Some(generation), &error);
        });
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
        let Some(PipeState::Open { pending, .. }) = state else {
            return;
        };
        tracing::debug!(%peer, reason, "pipe closed");
        for (_, call) in lock(&pending).drain() {
            let _ = call.reply.send(Err(CallError::Failed {
                peer,
                reason: format!("pipe closed: {reason}"),
            }));
        }
    }

    /// Forgets the state of a peer whose last connection closed.
    pub(crate) fn disconnected(&self, peer: PeerId) {
        self.close(peer, None, "connection closed");
        let mut out = lock(&self.out);
        if matches!(out.get(&peer), Some(PipeState::Failed(_))) {
            out.remove(&peer);
        }
    }

    /// Fails the calls whose time is up and forgets those nobody waits for.
    pub(crate) fn sweep(&self) {
        let now = Instant::now();
        let out = lock(&self.out);
        for (peer, state) in out.iter() {
            let PipeState::Open { pending, .. } = state else {
                continue;
            };
            lock(pending).retain(|_, call| {
                if call.reply.is_closed() {
                    return false;
                }
                if call.deadline > now {
                    return true;
                }
                // A closed receiver is fine: the caller gave up first.
                let (tx, _) = oneshot::channel();
                let reply = std::mem::replace(&mut call.reply, tx);
                let _ = reply.send(Err(CallError::Failed {
                    peer: *peer,
                    reason: "timed out".into(),
                }));
                false
            });
        }
    }

    fn offence(&self, peer: PeerId, kind: &'static str, error: &WireError) {
        let _ = self.commands.send(NetCommand::Offence {
            peer,
            kind,
            error: error.to_string(),
        });
    }
}

/// Writes queued frames, gathering what is queued into one write, until the
/// queue closes.
async fn write_frames<W: AsyncWrite + Unpin>(
    mut io: W,
    mut frames: mpsc::UnboundedReceiver<Vec<u8>>,
) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(WRITE_BATCH_BYTES);
    while let Some(frame) = frames.recv().await {
        buf.clear();
        put_frame(&mut buf, &frame);
        while buf.len() < WRITE_BATCH_BYTES {
            match frames.try_recv() {
                Ok(frame) => put_frame(&mut buf, &frame),
                Err(_) => break,
            }
        }
        io.write_all(&buf).await?;
        io.flush().await?;
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
    pending: Arc<Mutex<HashMap<u64, Pending>>>,
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
        match wire::decode::<PipeFrame<Response>>(&bytes, MAX_FRAME_BYTES) {
            Ok(frame) => {
                if let Some(call) = lock(&pending).remove(&frame.id) {
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
    responses: Option<mpsc::UnboundedSender<Vec<u8>>>,
}

impl PipeReply {
    pub(crate) fn answer(mut self, response: &Response) {
        if let Some(tx) = self.responses.take() {
            let _ = tx.send(wire::encode(&PipeFrame {
                id: self.id,
                body: response,
            }));
        }
    }
}

impl Drop for PipeReply {
    fn drop(&mut self) {
        if let Some(tx) = self.responses.take() {
            let _ = tx.send(wire::encode(&PipeFrame {
                id: self.id,
                body: &Response::Refused {
                    reason: "the request was dropped unanswered".into(),
                },
            }));
        }
    }
}

/// Where inbound pipe requests go: the same places as request-response ones.
#[derive(Clone)]
pub(crate) struct InboundRoutes {
    pub(crate) events: mpsc::UnboundedSender<NetEvent>,
    pub(crate) services: mpsc::UnboundedSender<ServiceRequest>,
}

/// Accepts the pipes peers open to this node, and serves each.
pub(crate) async fn accept_pipes(
    pipes: Arc<Pipes>,
    mut incoming: libp2p_stream::IncomingStreams,
    routes: InboundRoutes,
) {
    while let Some((peer, stream)) = incoming.next().await {
        tracing::debug!(%peer, "pipe accepted");
        tokio::spawn(serve_pipe(pipes.clone(), peer, stream, routes.clone()));
    }
}

/// Reads the requests of one inbound pipe and routes them; a writer task sends
/// their responses back as they are answered.
async fn serve_pipe(
    pipes: Arc<Pipes>,
    peer: PeerId,
    stream: libp2p::Stream,
    routes: InboundRoutes,
) {
    let (mut read, write) = stream.split();
    let (responses, queue) = mpsc::unbounded_channel();
    let writer = tokio::spawn(write_frames(write, queue));
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
        let reply = crate::swarm::Reply::pipe(PipeReply {
            id: frame.id,
            responses: Some(responses.clone()),
        });
        let request = frame.body;
        if request.is_service() {
            let _ = routes.services.send(ServiceRequest {
                peer,
                request,
                reply,
            });
        } else {
            let _ = routes.events.send(NetEvent::Request {
                peer,
                request,
                reply,
            });
        }
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
            tx.send(frame).expect("queue open");
        }
        drop(tx);
        let mut out = futures::io::Cursor::new(Vec::new());
        write_frames(&mut out, rx).await.expect("written");
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
