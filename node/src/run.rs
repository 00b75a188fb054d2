//! `kiln run`: open the data directory, start the swarm, the actors and the HTTP
//! API, and leave the cluster gracefully on SIGTERM / Ctrl-C.

use std::sync::Arc;
use std::time::Duration;

use actix::{Actor, Arbiter};
use actix_web::{web, HttpServer};
use anyhow::Context;
use kiln_actors::artifact::{ArtifactActor, ArtifactMetrics, ServeArtifact};
use kiln_actors::broadcast::{
    BroadcastActor, BroadcastConfig, BroadcastMetrics, GossipInlet, ServeFetch,
};
use kiln_actors::control::types::node_id_of;
use kiln_actors::control::wire::{from_cbor, MAX_CONTROL_BODY};
use kiln_actors::control::{
    raft_config, AddressBook, AttachStripe, ControlMetrics, ControlNetwork, ControlPlane,
    GiveUpVote, LogStore, ServeControl, StateMachine, VoteHandover,
};
use kiln_actors::membership::{Leave, MembershipActor, MembershipMetrics};
use kiln_actors::stripe::replica::ReplicaConfig;
use kiln_actors::stripe::wire::StripeRequest;
use kiln_actors::stripe::{
    respond_with, HandOver, KnownChangeSeq, Responder, ServeStripe, StripeActor, StripeMetrics,
};
use kiln_net::wire::{MemberRecord, MemberStatus, Request, Response};
use kiln_net::{Keypair, NetCommand, NetConfig, NetHandle, Protocol, ServiceRequest};
use kiln_persistence::{ArtifactStore, BroadcastStore, ControlStore, NodeStore, StripeStore};
use openraft::Raft;
use prometheus_client::registry::Registry;

use crate::config::Settings;
use crate::http::{self, ApiState};
use crate::kv_api::{KvMetrics, KvRouter};

/// Runs a node until SIGTERM or SIGINT. Errors are what stopped it from starting.
pub fn run(settings: Settings) -> anyhow::Result<()> {
    ports_free(&settings)?;
    kiln_persistence::verify_untouched(&settings.data_dir, settings.cluster_secret.as_deref())?;
    let store = NodeStore::open(&settings.data_dir)?;
    store.bind_secret(settings.cluster_secret.as_deref())?;
    let (key_bytes, created) = store.identity_or_create(|| {
        Keypair::generate_ed25519()
            .to_protobuf_encoding()
            .unwrap_or_default()
    })?;
    let keypair = Keypair::from_protobuf_encoding(&key_bytes).map_err(|e| {
        anyhow::anyhow!(
            "{}: the stored node identity is corrupt ({e}); restore the file from a backup or use a new --data-dir",
            store.path().display()
        )
    })?;
    let peer_id = keypair.public().to_peer_id();
    let cluster = store.cluster_id()?;
    // Before anything else is written: a member that lost control.redb is refused.
    let control_store = Arc::new(ControlStore::open(&settings.data_dir, cluster.as_deref())?);
    let incarnation = store.next_incarnation()?;
    let id = peer_id.to_string();
    let name = settings
        .name
        .clone()
        .unwrap_or_else(|| format!("kiln-{}", &id[id.len().saturating_sub(6)..]));
    let span = tracing::info_span!("node", node = %name);
    let _enter = span.enter();
    tracing::info!(peer = %id, data_dir = %settings.data_dir.display(), created_identity = created,
        incarnation, cluster = cluster.as_deref().unwrap_or("(not yet known)"), "starting kiln node");
    if settings.cluster_secret.is_none() {
        tracing::warn!("no cluster secret: the cluster is open to anyone who can reach its port; set --cluster-secret");
    }
    if settings.http_token.is_none() && !settings.http.ip().is_loopback() {
        tracing::warn!(http = %settings.http,
            "the HTTP API listens on a non-loopback address without --http-token; anyone who reaches it can use it");
    }

    let mut registry = Registry::default();
    // The swarm gets a runtime and thread of its own, so that nothing the actors
    // or the HTTP server do can stall it.
    let net_runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("kiln-net")
        .on_thread_start({
            // The network thread logs inside the node span too.
            let span = span.clone();
            move || std::mem::forget(span.clone().entered())
        })
        .enable_all()
        .build()
        .context("cannot start the network runtime")?;
    let (net, channels) = {
        let _guard = net_runtime.enter();
        kiln_net::spawn(
            NetConfig {
                keypair,
                listen: settings.listen.clone(),
                advertise: settings.advertise.clone(),
                cluster_key: settings
                    .cluster_secret
                    .as_deref()
                    .map(kiln_net::cluster_key_from_secret),
                probe_interval: Duration::from_millis(settings.probe_interval_ms),
                request_timeout: Duration::from_secs(10),
            },
            &mut registry,
        )?
    };
    let metrics = MembershipMetrics::register(&mut registry);
    let control_metrics = ControlMetrics::register(&mut registry);
    let stripe_metrics = StripeMetrics::register(&mut registry);
    let kv_metrics = KvMetrics::register(&mut registry);
    let broadcast_metrics = BroadcastMetrics::register(&mut registry);
    let health = kiln_actors::health::StorageHealth::register(&mut registry);
    // A node that existed before and finds no log lost it: its peers may hold
    // events of its own that the new log has not.
    let broadcast_store = Arc::new(BroadcastStore::open_for_node(&settings.data_dir, !created)?);
    let artifact_metrics = ArtifactMetrics::register(&mut registry);
    let artifact_store = Arc::new(ArtifactStore::open(&settings.data_dir)?);
    let state_machine = StateMachine::open(control_store.clone())?;
    let stripe_store = Arc::new(StripeStore::open(&settings.data_dir, settings.permanent)?);
    if !settings.permanent {
        tracing::warn!("persistence = \"temporary\": stripe data is not fsynced and starts empty at every restart");
    }
    let applied = state_machine.shared();
    let applied_for_check = applied.clone();
    let raft_config = Arc::new(raft_config().context("invalid control-plane timing")?);
    let registry = Arc::new(registry);
    let store = Arc::new(store);
    let me = MemberRecord {
        id: id.clone(),
        name,
        // Known addresses from the start, so that the very first push-pull already
        // tells others where to dial; `0.0.0.0` and port 0 wait for the listener.
        addrs: initial_addrs(&settings),
        incarnation,
        started_ms: kiln_actors::membership::unix_ms(),
        status: MemberStatus::Alive,
    };

    let system = actix_rt::System::new();
    let result = system.block_on(async move {
        // Membership and consensus each get a thread of their own: on a busy node
        // (the seed while many nodes join, an active under write load) a push-pull
        // answer or a Raft heartbeat must not queue behind stripe and broadcast work.
        let membership_thread = Arbiter::new();
        let membership = MembershipActor::new(
            me,
            store.clone(),
            cluster,
            settings.seeds.clone(),
            net.clone(),
            channels.events,
            settings.membership.clone(),
            metrics,
        )?;
        let membership =
            MembershipActor::start_in_arbiter(&membership_thread.handle(), move |_| membership);
        let book = AddressBook::default();
        let consensus_thread = Arbiter::new();
        let raft = {
            let network = ControlNetwork {
                net: net.clone(),
                book: book.clone(),
            };
            let (tx, rx) = tokio::sync::oneshot::channel();
            let me = node_id_of(&id);
            consensus_thread.spawn(async move {
                let raft = Raft::new(
                    me,
                    raft_config,
                    network,
                    LogStore::new(control_store, &state_machine),
                    state_machine,
                )
                .await;
                let _ = tx.send(raft);
            });
            rx.await
                .context("the control-plane thread stopped while starting")?
                .context("cannot start the control plane")?
        };
        // On the consensus thread too: peers' Raft requests pass through this
        // actor, and a heartbeat (answered within 100 ms) must not wait behind
        // stripe and broadcast work on the main thread.
        let control_plane = ControlPlane::new(
            peer_id,
            raft.clone(),
            applied.clone(),
            net.clone(),
            book.clone(),
            membership.clone(),
            store.clone(),
            settings.control.clone(),
            control_metrics,
        );
        let refusal = control_plane.refusal();
        let control =
            ControlPlane::start_in_arbiter(&consensus_thread.handle(), move |_| control_plane);
        let me = node_id_of(&id);
        // Before the stripe actor: it reads the change seqs the broadcast log holds
        // when it takes over an empty stripe log.
        let known_change_seq = KnownChangeSeq::default();
        let broadcast = BroadcastActor::new(
            peer_id,
            me,
            broadcast_store,
            (!settings.control.witness).then(|| stripe_store.clone()),
            applied.clone(),
            net.clone(),
            book.clone(),
            BroadcastConfig {
                retention: settings.broadcast_retention,
                subscriber_buffer: 65_536,
                subscriber_buffer_bytes: settings.subscriber_buffer_bytes,
                publish_key_window: Duration::from_secs(settings.reconnect_window_s),
            },
            broadcast_metrics,
            known_change_seq.clone(),
            health.clone(),
        )?
        .start();
        let stripe = (!settings.control.witness).then(|| {
            StripeActor::new(
                me,
                replica_config(settings.election_timeout_ms, settings.log_retain_entries),
                stripe_store.clone(),
                net.clone(),
                book.clone(),
                applied.clone(),
                control.clone(),
                stripe_metrics,
                known_change_seq.clone(),
                health.clone(),
            )
            .start()
        });
        if let Some(addr) = &stripe {
            control.do_send(AttachStripe(addr.clone()));
        }
        let artifacts = ArtifactActor::new(
            me,
            artifact_store.clone(),
            applied.clone(),
            net.clone(),
            book.clone(),
            control.clone(),
            broadcast.clone(),
            artifact_metrics,
            health.clone(),
            artifact_store.announced()?,
        )
        .start();
        let kv = Arc::new(KvRouter {
            me,
            applied: applied.clone(),
            stripe: stripe.clone(),
            net: net.clone(),
            book: book.clone(),
            request_timeout: Duration::from_millis(settings.request_timeout_ms),
            max_value_bytes: settings.max_value_bytes,
            reconnect_window: Duration::from_secs(settings.reconnect_window_s),
            metrics: kv_metrics,
            relay_preferred: Default::default(),
            session: Default::default(),
        });
        // Peers' requests go to the actor that serves them.
        {
            let services_of = Services {
                control: control.clone(),
                stripe: stripe.clone(),
                broadcast: broadcast.clone(),
                artifacts: artifacts.clone(),
                kv: kv.clone(),
                main: actix_rt::Arbiter::current(),
            };
            let net = net.clone();
            let mut services = channels.services;
            // On the consensus thread: peers' Raft requests come this way, and
            // must not wait behind stripe and broadcast work on the main one.
            consensus_thread.spawn(async move {
                while let Some(req) = services.recv().await {
                    route_service(req, &services_of, &net);
                }
            });
        }
        {
            let mut inlet = GossipInlet::new(broadcast.clone().recipient());
            let mut gossip = channels.broadcast;
            actix_rt::spawn(async move {
                while let Some(msg) = gossip.recv().await {
                    inlet.push(msg);
                }
            });
        }
        let (stopping, stopping_rx) = tokio::sync::watch::channel(false);
        let state = web::Data::new(ApiState {
            bodies: crate::http::BodyBudget::new(crate::http::BODY_BUDGET_BYTES),
            membership: membership.clone(),
            control: control.clone(),
            kv: Some(kv),
            broadcast: Some(crate::broadcast_api::BroadcastApi::new(
                broadcast.clone(),
                settings.max_event_bytes,
                stopping_rx,
            )),
            artifacts: Some(crate::artifact_api::ArtifactApi {
                actor: artifacts,
                store: artifact_store,
                applied,
                control: control.clone(),
                me,
                keep_versions: settings.artifact_keep_versions,
            }),
            registry,
            token: settings.http_token.clone(),
            health,
        });
        let server = HttpServer::new(move || http::app(state.clone()))
            .workers(1)
            // Event streams write small frames: without this, Nagle's algorithm
            // and the client's delayed ACK hold some of them for 40 ms.
            .tcp_nodelay(true)
            // kiln handles SIGTERM/SIGINT itself: the leave must be announced
            // before the HTTP server and the swarm go away.
            .disable_signals()
            .shutdown_timeout(5)
            .bind(settings.http)
            .with_context(|| {
                format!(
                    "cannot listen for HTTP on {}; is the port in use? choose another with --http",
                    settings.http
                )
            })?
            .run();
        let handle = server.handle();
        tracing::info!(http = %settings.http, "HTTP API ready");
        actix_rt::spawn(server);
        actix_rt::spawn(return_freed_memory());
        // A control plane whose storage failed has stopped for good (openraft
        // treats every storage error as fatal): a voter that silently stopped
        // would leave its group one failure from standstill, so the node
        // stops too, loudly, and a restart opens `control.redb` again.
        let control_file = settings.data_dir.join("control.redb");
        let fatal = tokio::select! {
            _ = wait_for_signal() => None,
            f = control_plane_stopped(raft.metrics()) => {
                tracing::error!(error = %f, "the control plane stopped; leaving the cluster and exiting");
                Some(format!(
                    "the control plane stopped: {f}; check the disk holding {} and start the node again",
                    control_file.display()
                ))
            }
            reason = refusal => Some(format!(
                "the control plane refused to place this node: {reason} (data directory {})",
                settings.data_dir.display()
            )),
            m = placement_mismatch(applied_for_check, me, settings.control.witness) => {
                tracing::error!(reason = %m, "this node's place does not match how it was started; exiting");
                Some(m)
            }
        };
        // With its control plane stopped a handover cannot be decided: the
        // standbys elect a new active once this node is gone.
        if let (Some(stripe), None) = (&stripe, &fatal) {
            // An active hands its role to an in-sync standby first, so that no
            // client request fails because this node goes away.
            let (tx, rx) = tokio::sync::oneshot::channel();
            stripe.do_send(HandOver {
                to: None,
                reply: tx,
            });
            match tokio::time::timeout(Duration::from_secs(5), rx).await {
                Ok(Ok(Ok(Some(_)))) => tracing::info!("handed the active role over"),
                Ok(Ok(Ok(None))) => {}
                Ok(Ok(Err(e))) => tracing::warn!(reason = %e, "stopping without a handover"),
                _ => tracing::warn!("the handover did not complete within 5 s; stopping anyway"),
            }
        }
        if fatal.is_none() {
            hand_vote_over(&control).await;
        }
        tracing::info!("shutting down: announcing leave");
        let _ = membership.send(Leave).await;
        // Event streams never end on their own: ended here, else the HTTP
        // server's graceful stop waits its whole timeout for them.
        stopping.send_replace(true);
        handle.stop(true).await;
        if let Err(e) = raft.shutdown().await {
            tracing::warn!(error = %e, "control plane did not stop cleanly");
        }
        net.shutdown().await;
        tracing::info!("stopped");
        anyhow::Ok(([membership_thread, consensus_thread], fatal))
    });
    net_runtime.shutdown_timeout(Duration::from_secs(2));
    // Stopping the membership thread drops its actor, which waits for its queued
    // writes to the node database.
    let (threads, fatal) = result?;
    for thread in threads {
        thread.stop();
        let _ = thread.join();
    }
    match fatal {
        Some(f) => Err(anyhow::anyhow!(f)),
        None => Ok(()),
    }
}

/// Fails if another process listens on this node's peer or HTTP address,
/// before anything is written to the data directory. libp2p listens with
/// `SO_REUSEPORT`, so its own bind would succeed beside another kiln and the
/// kernel would share the peers' connections between the two; a bind without
/// it is refused while another socket listens there.
fn ports_free(settings: &Settings) -> anyhow::Result<()> {
    let peer_addrs = settings.listen.iter().filter_map(|a| {
        let mut ip = None;
        let mut port = None;
        for part in a.iter() {
            match part {
                Protocol::Ip4(v4) => ip = Some(std::net::IpAddr::V4(v4)),
                Protocol::Ip6(v6) => ip = Some(std::net::IpAddr::V6(v6)),
                Protocol::Tcp(p) => port = Some(p),
                _ => {}
            }
        }
        Some((std::net::SocketAddr::new(ip?, port?), "peer", "--listen"))
    });
    for (addr, what, flag) in peer_addrs.chain([(settings.http, "HTTP", "--http")]) {
        // libp2p listens on IPv6 addresses for IPv6 only; actix-web dual-stack.
        let only_v6 = what == "peer";
        if addr.port() == 0 {
            continue;
        }
        if let Err(e) = probe_listen(addr, only_v6) {
            let hint = match e.kind() {
                std::io::ErrorKind::AddrInUse => "is another kiln (or another program) using it? ",
                std::io::ErrorKind::AddrNotAvailable => {
                    "is the address one of this machine's own? "
                }
                std::io::ErrorKind::PermissionDenied => {
                    "ports below 1024 need root or CAP_NET_BIND_SERVICE; "
                }
                _ => "",
            };
            anyhow::bail!(
                "cannot listen for {what} connections on {addr}: {e}; {hint}choose another \
                 with {flag}"
            );
        }
    }
    Ok(())
}

/// Binds `addr` as the listeners will (SO_REUSEADDR, so a port whose last
/// connections are in TIME_WAIT counts as free) and lets it go again.
fn probe_listen(addr: std::net::SocketAddr, only_v6: bool) -> std::io::Result<()> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    if addr.is_ipv6() {
        socket.set_only_v6(only_v6)?;
    }
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1)
}

/// A leader's vote goes to the voters left before the node stops (waiting
/// out a voter change under way; 5 s at most).
async fn hand_vote_over(control: &actix::Addr<ControlPlane>) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match tokio::time::timeout(left, control.send(GiveUpVote)).await {
            Ok(Ok(VoteHandover::Done)) => {
                tracing::info!("handed the control-plane vote over");
                return;
            }
            Ok(Ok(VoteHandover::NotNeeded(why))) => {
                tracing::debug!(why, "no control-plane vote to hand over");
                return;
            }
            Ok(Ok(VoteHandover::Busy)) if !left.is_zero() => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Ok(Ok(VoteHandover::Failed(e))) => {
                tracing::warn!(error = %e, "cannot hand the control-plane vote over; stopping with it");
                return;
            }
            _ => {
                tracing::warn!(
                    "the control-plane vote was not handed over within 5 s; stopping with it"
                );
                return;
            }
        }
    }
}

/// Resolves with an explanation once the control plane has this node in a
/// place its start does not fit: a stripe member started with `--witness`
/// (its stripe would count a member that serves nothing), or a witness started
/// without it.
async fn placement_mismatch(
    applied: kiln_actors::control::SharedApplied,
    me: kiln_actors::control::types::NodeId,
    witness: bool,
) -> String {
    use kiln_actors::control::state::Placement;
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tick.tick().await;
        let placement = applied
            .read()
            .ok()
            .and_then(|a| a.state.nodes.get(&me).map(|n| n.placement));
        match (placement, witness) {
            (Some(Placement::Stripe(k)), true) => {
                return format!(
                    "this node is a member of stripe {k} and holds its data; it cannot run as a \
                     witness: start it without --witness (a witness needs a data directory of its own)"
                )
            }
            (Some(Placement::Witness), false) => {
                return "this node was placed as a witness; start it with --witness (a data node \
                        needs a data directory of its own)"
                    .to_string()
            }
            _ => {}
        }
    }
}

/// Resolves with openraft's fatal error once the control plane stops running.
async fn control_plane_stopped(
    mut metrics: tokio::sync::watch::Receiver<
        openraft::RaftMetrics<
            kiln_actors::control::types::NodeId,
            kiln_actors::control::types::ControlNode,
        >,
    >,
) -> String {
    loop {
        if let Err(f) = &metrics.borrow().running_state {
            return f.to_string();
        }
        if metrics.changed().await.is_err() {
            return "the control plane's core went away".to_string();
        }
    }
}

/// Replication timing derived from the election timeout: heartbeats five times
/// per timeout, and an in-sync standby dropped after one timeout of silence.
fn replica_config(election_timeout_ms: u64, retain_entries: u64) -> ReplicaConfig {
    ReplicaConfig {
        election_timeout_ms,
        heartbeat_ms: (election_timeout_ms / 5).max(10),
        in_sync_timeout_ms: election_timeout_ms,
        max_batch: 512,
        max_appends_in_flight: ReplicaConfig::default().max_appends_in_flight,
        max_batch_bytes: 2 * 1024 * 1024,
        // Beyond this, a member that falls behind gets a snapshot instead (one
        // catching up from a snapshot is waited for, within 64 MiB of log).
        retain_entries,
        retain_bytes: 256 * 1024 * 1024,
        // A transfer reports failure itself (every part has a request timeout);
        // this only guards against a lost report.
        snapshot_retry_ms: 600_000,
    }
}

/// The actors that serve peers' requests.
struct Services {
    control: actix::Addr<ControlPlane>,
    stripe: Option<actix::Addr<StripeActor>>,
    broadcast: actix::Addr<BroadcastActor>,
    artifacts: actix::Addr<ArtifactActor>,
    /// Passes relayed client requests on to the stripe's active, on `main`
    /// (not the consensus thread that routes peers' requests: Raft's must not
    /// wait behind them).
    kv: Arc<KvRouter>,
    main: actix_rt::ArbiterHandle,
}

/// Hands a peer's request to the actor that serves it.
fn route_service(req: ServiceRequest, services: &Services, net: &NetHandle) {
    let Services {
        control,
        stripe,
        broadcast,
        artifacts,
        kv,
        main,
    } = services;
    let refuse = |reply, reason: String| {
        net.send(NetCommand::Respond {
            reply,
            response: Response::Refused { reason },
        })
    };
    match &req.request {
        Request::ControlPlane { .. } => control.do_send(ServeControl(req)),
        Request::Stripe { body } => {
            let Some(stripe) = stripe else {
                return refuse(
                    req.reply,
                    "this node is a witness and holds no stripe".into(),
                );
            };
            match from_cbor::<StripeRequest>(body, MAX_CONTROL_BODY) {
                Ok(StripeRequest::Relay { stripe, request }) => {
                    let (kv, net, reply) = (kv.clone(), net.clone(), req.reply);
                    let relayed = main.spawn(async move {
                        match kv.relay(stripe, *request).await {
                            Ok(answer) => respond_with(&net, Responder::Peer(reply), &answer),
                            Err(reason) => net.send(NetCommand::Respond {
                                reply,
                                response: Response::Refused { reason },
                            }),
                        }
                    });
                    if !relayed {
                        tracing::debug!(peer = %req.peer, stripe, "a relayed request was dropped: the node is stopping");
                    }
                }
                Ok(request) => stripe.do_send(ServeStripe {
                    peer: req.peer,
                    request,
                    reply: Responder::Peer(req.reply),
                }),
                Err(e) => {
                    tracing::warn!(peer = %req.peer, error = %e, "rejected a malformed stripe request");
                    refuse(req.reply, format!("malformed stripe request: {e}"))
                }
            }
        }
        Request::ArtifactManifest { .. } | Request::ArtifactChunk { .. } => {
            artifacts.do_send(ServeArtifact {
                peer: req.peer,
                request: req.request,
                reply: req.reply,
            })
        }
        Request::BroadcastFetch { origin, from } => broadcast.do_send(ServeFetch {
            peer: req.peer,
            origin: origin.clone(),
            from: *from,
            reply: req.reply,
        }),
        Request::MembershipSync { .. } | Request::MembershipProbe { .. } => {
            refuse(req.reply, "not a service request".into())
        }
    }
}

fn initial_addrs(settings: &Settings) -> Vec<String> {
    if !settings.advertise.is_empty() {
        return settings.advertise.iter().map(|a| a.to_string()).collect();
    }
    settings
        .listen
        .iter()
        .filter(|a| {
            !kiln_net::addr::is_unspecified(a)
                && !a
                    .iter()
                    .any(|p| matches!(p, kiln_net::addr::Protocol::Tcp(0)))
        })
        .map(|a| a.to_string())
        .collect()
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM received"),
                _ = int.recv() => tracing::info!("SIGINT received"),
            }
        }
        _ => {
            tracing::error!("cannot install signal handlers; stop this node with SIGKILL");
            std::future::pending::<()>().await
        }
    }
}

/// Hands memory freed after a burst (a snapshot sent, a backlog served) back to
/// the system now and then: glibc keeps freed heap pages otherwise, and an idle
/// node would go on holding what its busiest moment needed.
async fn return_freed_memory() {
    let mut every = tokio::time::interval(Duration::from_secs(10));
    loop {
        every.tick().await;
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        // SAFETY: malloc_trim only releases free pages of the allocator's heaps.
        unsafe {
            libc::malloc_trim(0);
        }
    }
}
