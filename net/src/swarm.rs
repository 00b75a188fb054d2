//! The libp2p swarm of a node, run in a task of its own that owns it: commands come
//! in on a channel, events go out on another. The task never blocks; it only
//! encodes, decodes, and keeps the offence books for bad frames.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::Either;
use futures::StreamExt;
use libp2p::core::transport::upgrade::Version;
use libp2p::core::{muxing::StreamMuxerBox, transport::Boxed};
use libp2p::gossipsub::{self, IdentTopic, MessageAuthenticity, ValidationMode};
use libp2p::identity::Keypair;
use libp2p::metrics::{Metrics as Libp2pMetrics, Recorder};
use libp2p::multiaddr::Protocol;
use libp2p::request_response::{self, OutboundRequestId, ProtocolSupport, ResponseChannel};
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{
    allow_block_list, identify, noise, ping, tcp, yamux, Multiaddr, PeerId, Swarm, Transport,
};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, oneshot};

use crate::backoff::DialBackoff;
use crate::codec::{Inbound, KilnCodec, PROTOCOL};
use crate::offences::{Offences, Verdict};
use crate::pipe::{self, InboundRoutes, PipeOffence, PipeReply, Pipes, PIPE_PROTOCOL};
use crate::wire::{
    self, BroadcastGossip, MembershipGossip, Request, Response, BROADCAST_TOPIC, MAX_GOSSIP_BYTES,
    MEMBERSHIP_TOPIC,
};

/// Everything the swarm task needs to start.
pub struct NetConfig {
    pub keypair: Keypair,
    pub listen: Vec<Multiaddr>,
    /// Addresses to announce instead of the listen addresses (NAT, `0.0.0.0`).
    pub advertise: Vec<Multiaddr>,
    /// Key derived from the cluster secret; `None` for an open cluster.
    pub cluster_key: Option<[u8; 32]>,
    /// Interval of libp2p ping on every connection: the direct liveness probe.
    pub probe_interval: Duration,
    pub request_timeout: Duration,
}

/// Derives the 32-byte cluster key from the cluster secret.
pub fn cluster_key_from_secret(secret: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"kiln-cluster-key-v1");
    h.update(secret);
    h.finalize().into()
}

/// The prologue of every noise handshake of a node. Noise hashes it into the
/// handshake and both sides must have the same one, so a peer started with
/// another cluster secret (or none) fails the handshake at its first encrypted
/// message and never gets a connection. This is the job libp2p `pnet` did here
/// until 2026-12: pnet encrypts every byte a second time (XSalsa20 without SIMD,
/// 3.5x the cost of noise's own cipher): 5-12 % of the CPU of a key/value write
/// (integration/BENCHMARKS.md, 2026-12-02).
fn handshake_prologue(cluster_key: Option<[u8; 32]>) -> Vec<u8> {
    let mut prologue = b"kiln/1 ".to_vec();
    match cluster_key {
        Some(key) => {
            prologue.extend_from_slice(b"secret ");
            prologue.extend_from_slice(&key);
        }
        None => prologue.extend_from_slice(b"open"),
    }
    prologue
}

/// How an actor answers an inbound request: on the substream it came on, or on
/// the pipe it came on.
pub struct Reply(ReplyTo);

enum ReplyTo {
    Substream(ResponseChannel<Inbound<Response>>),
    Pipe(PipeReply),
}

impl Reply {
    pub(crate) fn pipe(reply: PipeReply) -> Self {
        Reply(ReplyTo::Pipe(reply))
    }
}

impl std::fmt::Debug for Reply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Reply")
    }
}

/// Commands to the swarm task.
#[derive(Debug)]
pub enum NetCommand {
    /// Dial a peer at any of `addrs` unless already connected or dialing.
    Dial {
        peer: Option<PeerId>,
        addrs: Vec<Multiaddr>,
    },
    PublishMembership(MembershipGossip),
    PublishBroadcast(BroadcastGossip),
    Request {
        peer: PeerId,
        request: Request,
    },
    /// A request whose response (or failure) goes back on `reply` instead of the
    /// event channel. `addrs` are dialled if the peer is not connected.
    Call {
        peer: PeerId,
        addrs: Vec<Multiaddr>,
        request: Request,
        reply: oneshot::Sender<Result<Response, CallError>>,
    },
    Respond {
        reply: Reply,
        response: Response,
    },
    Disconnect(PeerId),
    /// Stop the swarm; answered once every connection is being closed.
    Shutdown(oneshot::Sender<()>),
}

/// Events from the swarm task.
#[derive(Debug)]
pub enum NetEvent {
    /// The swarm listens on (or advertises) this address.
    ListenAddr(Multiaddr),
    ConnectionUp {
        peer: PeerId,
    },
    /// The last connection to `peer` closed.
    ConnectionDown {
        peer: PeerId,
    },
    DialFailed {
        peer: Option<PeerId>,
        error: String,
    },
    Membership {
        source: PeerId,
        msg: MembershipGossip,
    },
    /// A peer subscribed to the membership topic: a publish now reaches it.
    MembershipSubscribed {
        peer: PeerId,
    },
    Request {
        peer: PeerId,
        request: Request,
        reply: Reply,
    },
    Response {
        peer: PeerId,
        response: Response,
    },
    RequestFailed {
        peer: PeerId,
        error: String,
    },
    /// These peers answered a ping since the last such event. Pings are reported
    /// in batches (every `PROBE_REPORT_INTERVAL`): one event per ping would wake
    /// the actors' thread tens of times a second per node for nothing.
    ProbesOk {
        peers: Vec<PeerId>,
    },
    ProbeFailed {
        peer: PeerId,
        error: String,
    },
    Identified {
        peer: PeerId,
        listen_addrs: Vec<Multiaddr>,
        /// The peer answers indirect membership probes (identify `/kiln/2` on).
        probes: bool,
    },
    /// A peer was banned for repeated bad frames.
    Banned {
        peer: PeerId,
    },
}

/// Why a `NetHandle::call` got no response.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallError {
    #[error("request to {peer} failed: {reason}")]
    Failed { peer: PeerId, reason: String },
    #[error("the network task has stopped")]
    Stopped,
}

/// A request for one of the node's services (everything but membership), with the
/// means to answer it.
#[derive(Debug)]
pub struct ServiceRequest {
    pub peer: PeerId,
    pub request: Request,
    pub reply: Reply,
}

/// A databroadcast gossip message and the peer it came from.
#[derive(Debug)]
pub struct BroadcastIn {
    pub source: PeerId,
    pub msg: BroadcastGossip,
}

/// What the swarm task hands to the node: events for the membership actor,
/// requests for the node's services, and databroadcast gossip.
pub struct NetChannels {
    pub events: mpsc::UnboundedReceiver<NetEvent>,
    pub services: mpsc::UnboundedReceiver<ServiceRequest>,
    pub broadcast: mpsc::UnboundedReceiver<BroadcastIn>,
}

/// Handle to the running swarm task.
#[derive(Clone, Debug)]
pub struct NetHandle {
    pub local_peer_id: PeerId,
    commands: mpsc::UnboundedSender<NetCommand>,
    pipes: Arc<Pipes>,
}

impl NetHandle {
    pub fn send(&self, cmd: NetCommand) {
        match cmd {
            // An answer to a request that came on a pipe goes straight to the pipe.
            NetCommand::Respond {
                reply: Reply(ReplyTo::Pipe(reply)),
                response,
            } => reply.answer(&response),
            // A closed channel means the swarm is shutting down; nothing to do then.
            cmd => {
                let _ = self.commands.send(cmd);
            }
        }
    }

    /// Sends `request` to `peer` (dialling `addrs` if needed) and waits for its
    /// response, up to the request timeout of the swarm.
    /// The request leaves at once; the returned future (which borrows nothing)
    /// resolves with its answer.
    pub fn call(
        &self,
        peer: PeerId,
        addrs: Vec<Multiaddr>,
        request: Request,
    ) -> impl std::future::Future<Output = Result<Response, CallError>> + Send + 'static {
        let (tx, rx) = oneshot::channel();
        if let Err((request, reply)) = self.pipes.try_call(peer, request, tx) {
            self.send(NetCommand::Call {
                peer,
                addrs,
                request,
                reply,
            });
        }
        async move { rx.await.unwrap_or(Err(CallError::Stopped)) }
    }

    pub async fn shutdown(&self) {
        let (tx, rx) = oneshot::channel();
        self.send(NetCommand::Shutdown(tx));
        let _ = rx.await;
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PeerLabel {
    peer: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: String,
}

/// kiln's own network metrics.
#[derive(Clone, Default)]
struct NetMetrics {
    decode_errors: Family<PeerLabel, Counter>,
    decode_errors_by_kind: Family<KindLabel, Counter>,
    peers_banned: Counter,
}

impl NetMetrics {
    fn register(registry: &mut Registry) -> Self {
        let m = NetMetrics::default();
        let r = registry.sub_registry_with_prefix("kiln_net");
        r.register(
            "decode_errors",
            "Frames from peers rejected as malformed, oversized or of an unknown version, by peer",
            m.decode_errors.clone(),
        );
        r.register(
            "decode_errors_by_kind",
            "Frames from peers rejected, by kind of error",
            m.decode_errors_by_kind.clone(),
        );
        for kind in ["gossip", "request", "response"] {
            // Present at zero from the start, so a dashboard sees the series.
            let _ = m
                .decode_errors_by_kind
                .get_or_create(&KindLabel { kind: kind.into() });
        }
        r.register(
            "peers_banned",
            "Peers disconnected and refused for repeated bad frames",
            m.peers_banned.clone(),
        );
        m
    }
}

#[derive(NetworkBehaviour)]
struct KilnBehaviour {
    blocked: allow_block_list::Behaviour<allow_block_list::BlockedPeers>,
    identify: identify::Behaviour,
    ping: ping::Behaviour,
    gossipsub: gossipsub::Behaviour,
    rr: request_response::Behaviour<KilnCodec>,
    pipes: libp2p_stream::Behaviour,
}

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("cannot build the libp2p transport: {0}")]
    Transport(String),
    #[error("cannot build gossipsub: {0}")]
    Gossipsub(String),
    #[error("cannot listen on {addr}: {error}; is the port in use or the address not local?")]
    Listen { addr: Multiaddr, error: String },
}

/// The transport of a kiln node: TCP, then noise bound to the cluster secret
/// (see [`handshake_prologue`]), then yamux.
pub fn transport(
    keypair: &Keypair,
    cluster_key: Option<[u8; 32]>,
) -> Result<Boxed<(PeerId, StreamMuxerBox)>, NetError> {
    let tcp = tcp::tokio::Transport::new(tcp::Config::default().nodelay(true)).map(|socket, _| {
        bound_unacknowledged_time(&socket.0);
        socket
    });
    let noise = noise::Config::new(keypair)
        .map_err(|e| NetError::Transport(e.to_string()))?
        .with_prologue(handshake_prologue(cluster_key));
    Ok(tcp
        .upgrade(Version::V1Lazy)
        .authenticate(noise)
        .multiplex(yamux::Config::default())
        // A dial into a partition holds every redial of that peer back
        // (`DisconnectedAndNotDialing`) until it times out, and the kernel
        // resends its SYN only 1, 3 and 7 s in: after the heal it connected
        // seconds late. A handshake on a LAN takes milliseconds.
        .timeout(DIAL_TIMEOUT)
        .boxed())
}

/// How long data sent on a connection may stay unacknowledged before the
/// kernel closes it (`TCP_USER_TIMEOUT`; pings every `probe_interval` keep
/// data in flight). Without it a connection outlived a partition of several
/// seconds, and after the heal what it held was resent only when TCP's
/// backed-off timer fired, up to the cut's length later: the active's appends
/// to a standby cut off for 4 s arrived ~3 s after the heal, the node cut off
/// for 7 s stayed `dead` ~5 s. A closed connection is redialled at once.
/// (It also closes a connection whose peer advertises a full receive window for
/// that long: a paused process that stopped reading, which answers nothing
/// anyway; a healthy transfer keeps getting acknowledgements.)
const UNACKNOWLEDGED_TIMEOUT: Duration = Duration::from_secs(3);

fn bound_unacknowledged_time(socket: &tokio::net::TcpStream) {
    #[cfg(target_os = "linux")]
    if let Err(e) =
        socket2::SockRef::from(socket).set_tcp_user_timeout(Some(UNACKNOWLEDGED_TIMEOUT))
    {
        tracing::debug!(error = %e, "cannot set TCP_USER_TIMEOUT");
    }
    #[cfg(not(target_os = "linux"))]
    let _ = socket;
}

/// How long setting a connection up (TCP connect, noise, yamux) may
/// take, dialled or accepted.
const DIAL_TIMEOUT: Duration = Duration::from_secs(5);

/// Message ids one IHAVE lists (an id is 20 bytes, ~23 on the wire).
const IHAVE_IDS_MAX: usize = 500;
/// Bytes of control messages one gossipsub RPC may carry (IHAVE, IWANT, GRAFT,
/// PRUNE, subscriptions): room for a full IHAVE and the rest.
const MAX_CONTROL_BYTES: usize = 64 * 1024;

fn gossipsub_config() -> Result<gossipsub::Config, NetError> {
    // Tuned for a cluster of tens of nodes on a LAN, not the public network. Nodes
    // hold connections to every member, so flood-publish reaches everyone in one
    // hop; the mesh only covers members that are not directly connected, and a
    // narrow one keeps the duplicates every node receives (about mesh_n copies of
    // each message) and the gossip of message ids low. A first heartbeat soon after
    // start; no signatures (noise bound to the cluster secret already authenticates every peer);
    // content-addressed ids.
    gossipsub::ConfigBuilder::default()
        .heartbeat_interval(Duration::from_secs(1))
        .heartbeat_initial_delay(Duration::from_millis(100))
        .mesh_n(4)
        .mesh_n_low(3)
        .mesh_n_high(8)
        .mesh_outbound_min(1)
        .gossip_lazy(3)
        .flood_publish(true)
        .max_transmit_size(MAX_GOSSIP_BYTES + 1024)
        // libp2p's defaults disagree: an IHAVE may list 5 000 message ids (~110 KiB)
        // while a receiver drops any RPC whose control part exceeds 16 KiB — and
        // with it the whole inbound gossip stream of that connection, so every later
        // message from that peer went to the repair path (1 s late) until the
        // connection closed. Seen at 5 000 events/s on 5 nodes. Cap the ids an IHAVE
        // lists well below what a receiver accepts.
        .max_control_messages_sent(IHAVE_IDS_MAX)
        .max_control_message_size(MAX_CONTROL_BYTES)
        .validation_mode(ValidationMode::Anonymous)
        // Forward a message only after kiln decoded it: a bad frame then goes no
        // further than its first hop, and its offence is charged to its sender,
        // not to the honest members that would otherwise have passed it on.
        .validate_messages()
        .message_id_fn(|m: &gossipsub::Message| {
            let digest = Sha256::new()
                .chain_update(m.topic.as_str())
                .chain_update(&m.data)
                .finalize();
            gossipsub::MessageId::from(digest[..20].to_vec())
        })
        .build()
        .map_err(|e| NetError::Gossipsub(e.to_string()))
}

/// Builds the swarm, starts listening, and spawns the task that owns it on the
/// current tokio runtime. Registers libp2p, gossipsub and kiln network metrics.
/// Returns the handle and the channels of what arrives from peers.
pub fn spawn(
    config: NetConfig,
    registry: &mut Registry,
) -> Result<(NetHandle, NetChannels), NetError> {
    let local_peer_id = config.keypair.public().to_peer_id();
    let transport = transport(&config.keypair, config.cluster_key)?;
    let gossipsub = gossipsub::Behaviour::new(MessageAuthenticity::Anonymous, gossipsub_config()?)
        .map_err(|e| NetError::Gossipsub(e.to_string()))?
        .with_metrics(
            registry.sub_registry_with_prefix("libp2p_gossipsub"),
            Default::default(),
        );
    let behaviour = KilnBehaviour {
        blocked: Default::default(),
        identify: identify::Behaviour::new(
            identify::Config::new(IDENTIFY_VERSION.into(), config.keypair.public())
                .with_agent_version(format!("kiln/{}", env!("CARGO_PKG_VERSION"))),
        ),
        ping: ping::Behaviour::new(
            ping::Config::new()
                .with_interval(config.probe_interval)
                .with_timeout(Duration::from_secs(10)),
        ),
        gossipsub,
        rr: request_response::Behaviour::with_codec(
            KilnCodec,
            [(PROTOCOL, ProtocolSupport::Full)],
            request_response::Config::default().with_request_timeout(config.request_timeout),
        ),
        pipes: libp2p_stream::Behaviour::new(),
    };
    let mut swarm = Swarm::new(
        transport,
        behaviour,
        local_peer_id,
        libp2p::swarm::Config::with_tokio_executor()
            // A cluster keeps its connections: an idle timeout would drop peers
            // between heartbeats and look like failures.
            .with_idle_connection_timeout(Duration::MAX)
            // Every request opens a substream; multistream-select's default (V1)
            // waits a round trip for the protocol's confirmation before the
            // request may go. A request substream negotiates one protocol that
            // every kiln node speaks, so the request goes with the proposal (a
            // pipe, which a peer might not speak, waits for the acceptor's hello).
            .with_substream_upgrade_protocol_override(Version::V1Lazy),
    );
    let topic = IdentTopic::new(MEMBERSHIP_TOPIC);
    let broadcast_topic = IdentTopic::new(BROADCAST_TOPIC);
    for t in [&topic, &broadcast_topic] {
        swarm
            .behaviour_mut()
            .gossipsub
            .subscribe(t)
            .map_err(|e| NetError::Gossipsub(e.to_string()))?;
    }
    for addr in &config.listen {
        swarm
            .listen_on(addr.clone())
            .map_err(|e| NetError::Listen {
                addr: addr.clone(),
                error: e.to_string(),
            })?;
    }
    for addr in &config.advertise {
        swarm.add_external_address(addr.clone());
    }
    let libp2p_metrics = Libp2pMetrics::new(registry);
    let net_metrics = NetMetrics::register(registry);
    let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
    let (ev_tx, ev_rx) = mpsc::unbounded_channel();
    let (svc_tx, svc_rx) = mpsc::unbounded_channel();
    let (bc_tx, bc_rx) = mpsc::unbounded_channel();
    let mut control = swarm.behaviour().pipes.new_control();
    let incoming = control
        .accept(PIPE_PROTOCOL)
        .map_err(|e| NetError::Transport(e.to_string()))?;
    let (offence_tx, offence_rx) = mpsc::unbounded_channel();
    let pipes = Pipes::new(control, config.request_timeout, offence_tx, registry);
    let routes = InboundRoutes {
        events: ev_tx,
        services: svc_tx,
    };
    tokio::spawn(pipe::accept_pipes(pipes.clone(), incoming, routes.clone()));
    let task = SwarmTask {
        swarm,
        topic,
        broadcast_topic,
        routes,
        broadcast: bc_tx,
        calls: HashMap::new(),
        offences: Offences::default(),
        started: Instant::now(),
        libp2p_metrics,
        net_metrics,
        advertise: !config.advertise.is_empty(),
        probes_ok: HashSet::new(),
        probes_failed: HashMap::new(),
        handshake_warned: None,
        handshake_failures: HashMap::new(),
        dial_backoff: DialBackoff::default(),
        pipes: pipes.clone(),
    };
    for addr in config.advertise {
        task.emit(NetEvent::ListenAddr(addr));
    }
    tokio::spawn(task.run(cmd_rx, offence_rx));
    Ok((
        NetHandle {
            local_peer_id,
            commands: cmd_tx,
            pipes,
        },
        NetChannels {
            events: ev_rx,
            services: svc_rx,
            broadcast: bc_rx,
        },
    ))
}

struct SwarmTask {
    swarm: Swarm<KilnBehaviour>,
    topic: IdentTopic,
    broadcast_topic: IdentTopic,
    /// Where inbound requests and events go.
    routes: InboundRoutes,
    broadcast: mpsc::UnboundedSender<BroadcastIn>,
    /// Outstanding `Call`s, answered when their response or failure arrives.
    calls: HashMap<OutboundRequestId, oneshot::Sender<Result<Response, CallError>>>,
    offences: Offences<PeerId>,
    started: Instant,
    libp2p_metrics: Libp2pMetrics,
    net_metrics: NetMetrics,
    /// Advertised addresses replace listen addresses in what is announced.
    advertise: bool,
    /// Peers that answered a ping since the last report.
    probes_ok: HashSet<PeerId>,
    /// Pings in a row that failed, per connection.
    probes_failed: HashMap<libp2p::swarm::ConnectionId, u32>,
    /// When a failed handshake was last reported at warn level.
    handshake_warned: Option<std::time::Instant>,
    /// Failed handshakes per remote (peer for a dial, IP for an incoming
    /// connection) since the first of them: another secret fails every
    /// attempt, a connection cut off mid-handshake fails once.
    handshake_failures: HashMap<String, (u32, Instant)>,
    /// Peers whose last dial failed: a request does not dial them again at once.
    dial_backoff: DialBackoff<PeerId>,
    pipes: Arc<Pipes>,
}

/// What identify tells peers this node speaks. `/kiln/2` added indirect
/// membership probes: a `/kiln/1` node takes one for a bad frame (and bans a
/// sender of three), so it is never sent one.
const IDENTIFY_VERSION: &str = "/kiln/2";

/// Reported ping failures in a row after which a connection is closed:
/// libp2p's ping no longer closes one, and a connection whose packets vanish
/// (a lost NAT or conntrack entry) would otherwise count as up until TCP gives
/// up, minutes later — with nothing redialled meanwhile. libp2p-ping reports a
/// connection's failures from its second on, so this is three pings in a row
/// (about half a minute with a 10 s ping timeout).
const PROBE_FAILURES_TO_CLOSE: u32 = 2;

/// How often answered pings are reported to the actors.
pub const PROBE_REPORT_INTERVAL: Duration = Duration::from_millis(200);

impl SwarmTask {
    async fn run(
        mut self,
        mut commands: mpsc::UnboundedReceiver<NetCommand>,
        mut pipe_offences: mpsc::UnboundedReceiver<PipeOffence>,
    ) {
        let mut unban = tokio::time::interval(Duration::from_secs(5));
        let mut pipe_sweep = tokio::time::interval(Duration::from_secs(1));
        let mut probe_report = tokio::time::interval(PROBE_REPORT_INTERVAL);
        probe_report.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = probe_report.tick() => {
                    if !self.probes_ok.is_empty() {
                        let peers = self.probes_ok.drain().collect();
                        self.emit(NetEvent::ProbesOk { peers });
                    }
                }
                cmd = commands.recv() => match cmd {
                    Some(NetCommand::Shutdown(done)) => {
                        let peers: Vec<PeerId> = self.swarm.connected_peers().copied().collect();
                        for p in peers {
                            let _ = self.swarm.disconnect_peer_id(p);
                        }
                        let _ = done.send(());
                        return;
                    }
                    Some(cmd) => self.on_command(cmd),
                    None => return,
                },
                ev = self.swarm.select_next_some() => self.on_swarm_event(ev),
                _ = pipe_sweep.tick() => self.pipes.sweep(),
                Some(o) = pipe_offences.recv() => self.offence(o.peer, o.kind, &o.error),
                _ = unban.tick() => {
                    for peer in self.offences.expire(self.now_ms()) {
                        tracing::info!(%peer, "ban over; peer may connect again");
                        self.swarm.behaviour_mut().blocked.unblock_peer(peer);
                    }
                    let now = self.now_ms();
                    self.dial_backoff.prune(now);
                }
            }
        }
    }

    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    fn emit(&self, ev: NetEvent) {
        let _ = self.routes.events.send(ev);
    }

    fn on_command(&mut self, cmd: NetCommand) {
        match cmd {
            NetCommand::Dial { peer, addrs } => {
                if addrs.is_empty() {
                    return;
                }
                if let Some(p) = peer {
                    if p == *self.swarm.local_peer_id() || self.offences.is_banned(&p) {
                        return;
                    }
                }
                let opts = match peer {
                    Some(p) => DialOpts::peer_id(p)
                        .addresses(addrs)
                        .condition(PeerCondition::DisconnectedAndNotDialing)
                        .build(),
                    None => DialOpts::unknown_peer_id()
                        .address(addrs[0].clone())
                        .build(),
                };
                if let Err(e) = self.swarm.dial(opts) {
                    use libp2p::swarm::DialError;
                    if !matches!(e, DialError::DialPeerConditionFalse(_)) {
                        self.emit(NetEvent::DialFailed {
                            peer,
                            error: e.to_string(),
                        });
                    }
                }
            }
            NetCommand::PublishMembership(msg) => {
                let bytes = wire::encode(&msg);
                if let Err(e) = self
                    .swarm
                    .behaviour_mut()
                    .gossipsub
                    .publish(self.topic.clone(), bytes)
                {
                    // No subscribed peer yet (a lone node) is normal, not an error.
                    if !matches!(e, gossipsub::PublishError::NoPeersSubscribedToTopic) {
                        tracing::debug!(error = %e, "membership publish failed");
                    }
                }
            }
            NetCommand::PublishBroadcast(msg) => {
                let bytes = wire::encode(&msg);
                if let Err(e) = self
                    .swarm
                    .behaviour_mut()
                    .gossipsub
                    .publish(self.broadcast_topic.clone(), bytes)
                {
                    if !matches!(e, gossipsub::PublishError::NoPeersSubscribedToTopic) {
                        tracing::debug!(error = %e, "broadcast publish failed");
                    }
                }
            }
            NetCommand::Request { peer, request } => {
                self.swarm
                    .behaviour_mut()
                    .rr
                    .send_request(&peer, Inbound::Valid(request));
            }
            NetCommand::Call {
                peer,
                addrs,
                request,
                reply,
            } => self.start_call(peer, addrs, request, reply),
            NetCommand::Respond { reply, response } => match reply.0 {
                ReplyTo::Substream(channel) => {
                    let _ = self
                        .swarm
                        .behaviour_mut()
                        .rr
                        .send_response(channel, Inbound::Valid(response));
                }
                ReplyTo::Pipe(reply) => reply.answer(&response),
            },
            NetCommand::Disconnect(peer) => {
                let _ = self.swarm.disconnect_peer_id(peer);
            }
            NetCommand::Shutdown(_) => {}
        }
    }

    /// Sends a call's request, dialling the peer if it is not connected, unless
    /// a dial to it failed a moment ago: the call then fails at once. (Holding
    /// it until the pause ends was tried: a request forwarded to an active
    /// that had just died then waited out the pause instead of being retried
    /// at the new active, and failover took twice as long.)
    fn start_call(
        &mut self,
        peer: PeerId,
        addrs: Vec<Multiaddr>,
        request: Request,
        reply: oneshot::Sender<Result<Response, CallError>>,
    ) {
        if self.offences.is_banned(&peer) {
            let _ = reply.send(Err(CallError::Failed {
                peer,
                reason: "peer is banned for bad frames".into(),
            }));
            return;
        }
        if self.swarm.is_connected(&peer) {
            // Connected without a pipe: the pipe broke, or is opening.
            self.pipes.open(peer);
        } else if let Some(ago) = self.dial_backoff.holding(&peer, self.now_ms()) {
            let _ = reply.send(Err(CallError::Failed {
                peer,
                reason: format!(
                    "peer unreachable: a dial failed {ago} ms ago (retried after a pause)"
                ),
            }));
            return;
        } else {
            for addr in addrs {
                self.swarm.add_peer_address(peer, addr);
            }
        }
        let id = self
            .swarm
            .behaviour_mut()
            .rr
            .send_request(&peer, Inbound::Valid(request));
        self.calls.insert(id, reply);
    }

    /// A bad frame from `peer`: count it, log it, and ban a repeat offender.
    fn offence(&mut self, peer: PeerId, kind: &str, error: &str) {
        self.net_metrics
            .decode_errors
            .get_or_create(&PeerLabel {
                peer: peer.to_string(),
            })
            .inc();
        self.net_metrics
            .decode_errors_by_kind
            .get_or_create(&KindLabel {
                kind: kind.to_string(),
            })
            .inc();
        tracing::warn!(%peer, kind, error, "rejected a bad frame from peer");
        if let Verdict::Ban { until_ms } = self.offences.record(&peer, self.now_ms()) {
            tracing::warn!(%peer, ban_s = (until_ms - self.now_ms()) / 1000,
                "peer sent 3 bad frames within a minute; disconnecting and refusing it");
            self.net_metrics.peers_banned.inc();
            self.swarm.behaviour_mut().blocked.block_peer(peer);
            self.emit(NetEvent::Banned { peer });
        }
    }

    fn on_swarm_event(&mut self, event: SwarmEvent<KilnBehaviourEvent>) {
        if let SwarmEvent::ConnectionClosed { connection_id, .. } = &event {
            self.probes_failed.remove(connection_id);
        }
        self.libp2p_metrics.record(&event);
        match event {
            SwarmEvent::NewListenAddr { address, .. } => {
                tracing::info!(%address, "listening");
                if !self.advertise {
                    self.emit(NetEvent::ListenAddr(address));
                }
            }
            SwarmEvent::ConnectionEstablished {
                peer_id,
                endpoint,
                num_established,
                ..
            } if num_established.get() == 1 => {
                tracing::debug!(peer = %peer_id, remote = %endpoint.get_remote_address(), "connected");
                self.dial_backoff.connected(&peer_id);
                self.pipes.open(peer_id);
                self.emit(NetEvent::ConnectionUp { peer: peer_id });
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                num_established: 0,
                cause,
                ..
            } => {
                tracing::debug!(peer = %peer_id, cause = ?cause, "disconnected");
                self.pipes.disconnected(peer_id);
                self.emit(NetEvent::ConnectionDown { peer: peer_id });
            }
            SwarmEvent::OutgoingConnectionError { peer_id, error, .. } => {
                // (A dial that lost a race with the peer's own connection is
                // no sign of trouble.)
                if let Some(p) = peer_id.filter(|p| !self.swarm.is_connected(p)) {
                    let now = self.now_ms();
                    self.dial_backoff.failed(&p, now);
                }
                let error = error.to_string();
                let remote = peer_id.map_or_else(|| "an unknown peer".into(), |p| p.to_string());
                self.handshake_failed(&error, true, remote);
                self.emit(NetEvent::DialFailed {
                    peer: peer_id,
                    error,
                });
            }
            SwarmEvent::IncomingConnectionError {
                send_back_addr,
                error,
                ..
            } => {
                let error = error.to_string();
                tracing::debug!(from = %send_back_addr, %error, "incoming connection failed");
                let remote = send_back_addr
                    .iter()
                    .find_map(|p| match p {
                        Protocol::Ip4(ip) => Some(ip.to_string()),
                        Protocol::Ip6(ip) => Some(ip.to_string()),
                        _ => None,
                    })
                    .unwrap_or_else(|| send_back_addr.to_string());
                self.handshake_failed(&error, false, remote);
            }
            SwarmEvent::Behaviour(ev) => self.on_behaviour_event(ev),
            _ => {}
        }
    }

    /// A connection failed in its handshake: with noise bound to the cluster
    /// secret, that is what a peer started with another secret looks like, when it
    /// happens again with the same remote within a minute (once is also what a
    /// connection cut off by the network mid-handshake looks like). Said at
    /// warn level (at most every 30 s), since nothing else would tell.
    fn handshake_failed(&mut self, error: &str, outgoing: bool, remote: String) {
        let e = error.to_ascii_lowercase();
        // Outgoing: "... Handshake failed: decrypt error" (every failed dial, a
        // refused one too, says "Failed to negotiate transport protocol(s)"
        // around its cause); incoming: "Failed to negotiate transport
        // protocol(s)" alone.
        let handshake = e.contains("handshake")
            || e.contains("noise")
            || (!outgoing && e.contains("negotiate transport"));
        if !handshake {
            return;
        }
        if self.handshake_failures.len() > 1024 {
            self.handshake_failures.clear();
        }
        let now = Instant::now();
        let (count, since) = self
            .handshake_failures
            .entry(remote.clone())
            .or_insert((0, now));
        if now.duration_since(*since) > Duration::from_secs(60) {
            (*count, *since) = (0, now);
        }
        *count += 1;
        if *count < 2 {
            tracing::debug!(%remote, %error, "a connection failed in its handshake");
            return;
        }
        if self
            .handshake_warned
            .is_some_and(|at| at.elapsed() < Duration::from_secs(30))
        {
            return;
        }
        self.handshake_warned = Some(std::time::Instant::now());
        tracing::warn!(%remote, %error,
            "connections failed in their handshake: check that every node has the same --cluster-secret");
    }

    fn on_behaviour_event(&mut self, ev: KilnBehaviourEvent) {
        match ev {
            KilnBehaviourEvent::Gossipsub(ev) => {
                self.libp2p_metrics.record(&ev);
                match ev {
                    gossipsub::Event::Message {
                        propagation_source,
                        message_id,
                        message,
                    } => {
                        let decoded = if message.topic == self.topic.hash() {
                            wire::decode::<MembershipGossip>(&message.data, MAX_GOSSIP_BYTES)
                                .map(Either::Left)
                        } else if message.topic == self.broadcast_topic.hash() {
                            wire::decode::<BroadcastGossip>(&message.data, MAX_GOSSIP_BYTES)
                                .map(Either::Right)
                        } else {
                            Err(wire::WireError::Malformed(format!(
                                "message on unknown topic {}",
                                message.topic
                            )))
                        };
                        let acceptance = match decoded {
                            Ok(Either::Left(msg)) => {
                                self.emit(NetEvent::Membership {
                                    source: propagation_source,
                                    msg,
                                });
                                gossipsub::MessageAcceptance::Accept
                            }
                            Ok(Either::Right(msg)) => {
                                let _ = self.broadcast.send(BroadcastIn {
                                    source: propagation_source,
                                    msg,
                                });
                                // Not forwarded: every publisher floods all its peers
                                // (kiln nodes form a full mesh), so a forward would
                                // only be one more copy of every event for each node
                                // to decrypt and drop. A node that is not connected
                                // to the publisher learns of the events from the
                                // heads digests and fetches them.
                                gossipsub::MessageAcceptance::Ignore
                            }
                            Err(e) => {
                                self.offence(propagation_source, "gossip", &e.to_string());
                                gossipsub::MessageAcceptance::Reject
                            }
                        };
                        self.swarm
                            .behaviour_mut()
                            .gossipsub
                            .report_message_validation_result(
                                &message_id,
                                &propagation_source,
                                acceptance,
                            );
                    }
                    gossipsub::Event::Subscribed { peer_id, topic }
                        if topic == self.topic.hash() =>
                    {
                        self.emit(NetEvent::MembershipSubscribed { peer: peer_id });
                    }
                    _ => {}
                }
            }
            KilnBehaviourEvent::Identify(ev) => {
                self.libp2p_metrics.record(&ev);
                if let identify::Event::Received { peer_id, info, .. } = ev {
                    let listen_addrs = info
                        .listen_addrs
                        .into_iter()
                        .filter(|a| !a.iter().any(|p| matches!(p, Protocol::P2pCircuit)))
                        .collect();
                    self.emit(NetEvent::Identified {
                        peer: peer_id,
                        listen_addrs,
                        probes: info
                            .protocol_version
                            .strip_prefix("/kiln/")
                            .and_then(|v| v.parse::<u32>().ok())
                            .is_some_and(|v| v >= 2),
                    });
                }
            }
            KilnBehaviourEvent::Ping(ev) => {
                self.libp2p_metrics.record(&ev);
                match ev.result {
                    Ok(_) => {
                        self.probes_failed.remove(&ev.connection);
                        self.probes_ok.insert(ev.peer);
                    }
                    Err(e) => {
                        let failed = self.probes_failed.entry(ev.connection).or_insert(0);
                        *failed += 1;
                        if *failed >= PROBE_FAILURES_TO_CLOSE {
                            tracing::info!(peer = %ev.peer, failed = *failed, error = %e,
                                "closing a connection that stopped answering pings");
                            self.probes_failed.remove(&ev.connection);
                            self.swarm.close_connection(ev.connection);
                        }
                        self.emit(NetEvent::ProbeFailed {
                            peer: ev.peer,
                            error: e.to_string(),
                        })
                    }
                }
            }
            KilnBehaviourEvent::Rr(ev) => self.on_rr_event(ev),
            KilnBehaviourEvent::Pipes(()) => {}
            KilnBehaviourEvent::Blocked(never) => match never {},
        }
    }

    fn on_rr_event(&mut self, ev: request_response::Event<Inbound<Request>, Inbound<Response>>) {
        use request_response::{Event, Message};
        match ev {
            Event::Message { peer, message, .. } => match message {
                Message::Request {
                    request: Inbound::Valid(request),
                    channel,
                    ..
                } => {
                    self.routes
                        .route(peer, request, Reply(ReplyTo::Substream(channel)));
                }
                Message::Request {
                    request: Inbound::Invalid(e),
                    ..
                } => self.offence(peer, "request", &e.to_string()),
                Message::Response {
                    request_id,
                    response: Inbound::Valid(response),
                } => match self.calls.remove(&request_id) {
                    Some(reply) => {
                        let _ = reply.send(Ok(response));
                    }
                    None => self.emit(NetEvent::Response { peer, response }),
                },
                Message::Response {
                    request_id,
                    response: Inbound::Invalid(e),
                } => {
                    self.offence(peer, "response", &e.to_string());
                    match self.calls.remove(&request_id) {
                        Some(reply) => {
                            let _ = reply.send(Err(CallError::Failed {
                                peer,
                                reason: e.to_string(),
                            }));
                        }
                        None => self.emit(NetEvent::RequestFailed {
                            peer,
                            error: e.to_string(),
                        }),
                    }
                }
            },
            Event::OutboundFailure {
                peer,
                request_id,
                error,
                ..
            } => match self.calls.remove(&request_id) {
                Some(reply) => {
                    let _ = reply.send(Err(CallError::Failed {
                        peer,
                        reason: error.to_string(),
                    }));
                }
                None => self.emit(NetEvent::RequestFailed {
                    peer,
                    error: error.to_string(),
                }),
            },
            Event::InboundFailure { peer, error, .. } => {
                tracing::debug!(%peer, %error, "inbound request failed");
            }
            Event::ResponseSent { .. } => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bytes one message id takes in an IHAVE: 20 bytes of SHA-256 prefix, its
    /// protobuf tag and length.
    const ID_ON_WIRE: usize = 22;

    /// Connects a transport holding `dialer_key` to one holding `listener_key`
    /// over loopback TCP: whether the dialer, and the listener, got a connection.
    fn connect(listener_key: Option<[u8; 32]>, dialer_key: Option<[u8; 32]>) -> (bool, bool) {
        use futures::AsyncWriteExt;
        use libp2p::core::muxing::StreamMuxerExt;
        use libp2p::core::transport::{DialOpts, ListenerId, PortUse, TransportEvent};
        use libp2p::core::Endpoint;
        use std::task::Poll;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(async {
            let mut listener =
                transport(&Keypair::generate_ed25519(), listener_key).expect("transport");
            let any_port: Multiaddr = "/ip4/127.0.0.1/tcp/0".parse().expect("address");
            listener
                .listen_on(ListenerId::next(), any_port)
                .expect("listen");
            let addr = loop {
                if let Some(TransportEvent::NewAddress { listen_addr, .. }) = listener.next().await
                {
                    break listen_addr;
                }
            };
            let accepted = tokio::spawn(async move {
                while let Some(event) = listener.next().await {
                    if let TransportEvent::Incoming { upgrade, .. } = event {
                        return upgrade.await.is_ok();
                    }
                }
                false
            });
            let mut dialer =
                transport(&Keypair::generate_ed25519(), dialer_key).expect("transport");
            let opts = DialOpts {
                role: Endpoint::Dialer,
                port_use: PortUse::New,
            };
            let dialed = dialer.dial(addr, opts).expect("dial").await;
            let dialer_connected = dialed.is_ok();
            if let Ok((_, mut muxer)) = dialed {
                // The dialer names its multiplexer lazily (`V1Lazy`), with its
                // first data: send some, so that the listener's side completes.
                tokio::spawn(async move {
                    let Ok(mut stream) =
                        futures::future::poll_fn(|cx| muxer.poll_outbound_unpin(cx)).await
                    else {
                        return;
                    };
                    let drive = futures::future::poll_fn(|cx| loop {
                        match muxer.poll_unpin(cx) {
                            Poll::Ready(Ok(_)) => {}
                            Poll::Ready(Err(_)) => return Poll::Ready(()),
                            Poll::Pending => return Poll::Pending,
                        }
                    });
                    let write = async {
                        let _ = stream.write_all(b"kiln").await;
                        let _ = stream.flush().await;
                        std::future::pending::<()>().await
                    };
                    futures::future::select(Box::pin(drive), Box::pin(write)).await;
                });
            }
            (dialer_connected, accepted.await.unwrap_or(false))
        })
    }

    #[test]
    fn only_nodes_with_the_same_cluster_secret_complete_a_handshake() {
        let ours = Some(cluster_key_from_secret(b"ours"));
        let theirs = Some(cluster_key_from_secret(b"theirs"));
        assert_eq!(connect(ours, ours), (true, true), "same secret");
        assert_eq!(connect(None, None), (true, true), "both open");
        assert_eq!(connect(ours, theirs), (false, false), "another secret");
        assert_eq!(
            connect(ours, None),
            (false, false),
            "a dialer without a secret"
        );
        assert_eq!(
            connect(None, ours),
            (false, false),
            "a listener without a secret"
        );
    }

    #[test]
    fn a_full_ihave_fits_in_what_a_receiver_accepts() {
        let config = gossipsub_config().expect("gossipsub config");
        let ihave = config.max_control_messages_sent() * ID_ON_WIRE;
        // Room beside a full IHAVE for the topic name, GRAFT/PRUNE and subscriptions.
        assert!(
            ihave + 4096 <= config.max_control_message_size(),
            "an IHAVE of {ihave} bytes would make the receiver drop its gossip stream (limit {})",
            config.max_control_message_size()
        );
    }
}
