//! A peer that knows the cluster secret but sends garbage: each bad frame is
//! rejected and counted, the node stays up, and after three offences within a
//! minute the peer is disconnected and refused.

use std::time::Duration;

use futures::StreamExt;
use kiln_integration::*;
use libp2p::gossipsub::{self, IdentTopic, MessageAuthenticity, ValidationMode};
use libp2p::request_response::{self, ProtocolSupport};
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{identity::Keypair, Multiaddr, StreamProtocol, Swarm};

const SECRET: &str = "bad-peer-test-secret";

/// Writes its request bytes as they are: a frame header claiming 5 MiB, then a little.
#[derive(Clone, Default)]
struct RawCodec;

impl request_response::Codec for RawCodec {
    type Protocol = StreamProtocol;
    type Request = Vec<u8>;
    type Response = Vec<u8>;

    async fn read_request<T>(&mut self, _: &StreamProtocol, _: &mut T) -> std::io::Result<Vec<u8>>
    where
        T: futures::AsyncRead + Unpin + Send,
    {
        Ok(vec![])
    }
    async fn read_response<T>(&mut self, _: &StreamProtocol, io: &mut T) -> std::io::Result<Vec<u8>>
    where
        T: futures::AsyncRead + Unpin + Send,
    {
        let mut buf = Vec::new();
        futures::AsyncReadExt::read_to_end(io, &mut buf).await?;
        Ok(buf)
    }
    async fn write_request<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        req: Vec<u8>,
    ) -> std::io::Result<()>
    where
        T: futures::AsyncWrite + Unpin + Send,
    {
        futures::AsyncWriteExt::write_all(io, &req).await?;
        futures::AsyncWriteExt::close(io).await
    }
    async fn write_response<T>(
        &mut self,
        _: &StreamProtocol,
        _: &mut T,
        _: Vec<u8>,
    ) -> std::io::Result<()>
    where
        T: futures::AsyncWrite + Unpin + Send,
    {
        Ok(())
    }
}

#[derive(NetworkBehaviour)]
struct BadBehaviour {
    gossipsub: gossipsub::Behaviour,
    rr: request_response::Behaviour<RawCodec>,
}

fn bad_swarm() -> Swarm<BadBehaviour> {
    let key = Keypair::generate_ed25519();
    let transport = kiln_net::transport(
        &key,
        Some(kiln_net::cluster_key_from_secret(SECRET.as_bytes())),
    )
    .unwrap();
    let config = gossipsub::ConfigBuilder::default()
        .validation_mode(ValidationMode::Anonymous)
        .heartbeat_initial_delay(Duration::from_millis(100))
        .message_id_fn(|m: &gossipsub::Message| {
            use sha2::Digest;
            gossipsub::MessageId::from(sha2::Sha256::digest(&m.data)[..20].to_vec())
        })
        .build()
        .unwrap();
    let behaviour = BadBehaviour {
        gossipsub: gossipsub::Behaviour::new(MessageAuthenticity::Anonymous, config).unwrap(),
        rr: request_response::Behaviour::with_codec(
            RawCodec,
            [(StreamProtocol::new("/kiln/rr/1"), ProtocolSupport::Outbound)],
            request_response::Config::default(),
        ),
    };
    Swarm::new(
        transport,
        behaviour,
        key.public().to_peer_id(),
        libp2p::swarm::Config::with_tokio_executor()
            .with_idle_connection_timeout(Duration::from_secs(60)),
    )
}

fn metric(text: &str, prefix: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

#[test]
fn bad_frames_are_rejected_counted_and_the_sender_is_banned() {
    let _serial = serial();
    let node = Node::start(
        "victim",
        NodeOpts {
            secret: Some(SECRET.into()),
            ..Default::default()
        },
    );
    let victim_id = node.id();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut swarm = rt.block_on(async { bad_swarm() });
    let bad_id = *swarm.local_peer_id();
    let topic = IdentTopic::new(kiln_net::wire::MEMBERSHIP_TOPIC);
    let addr: Multiaddr = format!("/ip4/{}/tcp/{}", node.ip, PEER_PORT)
        .parse()
        .unwrap();

    rt.block_on(async {
        swarm.behaviour_mut().gossipsub.subscribe(&topic).unwrap();
        swarm.dial(addr.clone()).unwrap();
        // Wait until the node's subscription is known, so publishes reach it.
        tokio::time::timeout(Duration::from_secs(30), async {
            loop {
                if let SwarmEvent::Behaviour(BadBehaviourEvent::Gossipsub(
                    gossipsub::Event::Subscribed { .. },
                )) = swarm.select_next_some().await
                {
                    break;
                }
            }
        })
        .await
        .expect("the node's gossipsub subscription");

        // Offence 1: not CBOR at all.
        swarm
            .behaviour_mut()
            .gossipsub
            .publish(topic.clone(), b"\xff\xfe this is not a kiln frame".to_vec())
            .unwrap();
        // Offence 2: well-formed CBOR of an unknown wire version.
        let mut unknown = Vec::new();
        ciborium::into_writer(
            &ciborium::Value::Map(vec![
                (
                    ciborium::Value::Text("v".into()),
                    ciborium::Value::Integer(99.into()),
                ),
                (ciborium::Value::Text("m".into()), ciborium::Value::Null),
            ]),
            &mut unknown,
        )
        .unwrap();
        swarm
            .behaviour_mut()
            .gossipsub
            .publish(topic.clone(), unknown)
            .unwrap();
        // Offence 3: a request frame announcing 5 MiB, over the 4 MiB limit.
        let mut oversized = (5u32 * 1024 * 1024).to_be_bytes().to_vec();
        oversized.extend_from_slice(&[0u8; 1024]);
        let victim: libp2p::PeerId = victim_id.parse().unwrap();
        swarm.behaviour_mut().rr.send_request(&victim, oversized);

        // The node closes the connection when it bans us.
        tokio::time::timeout(Duration::from_secs(30), async {
            loop {
                if let SwarmEvent::ConnectionClosed {
                    num_established: 0, ..
                } = swarm.select_next_some().await
                {
                    break;
                }
            }
        })
        .await
        .expect("the node disconnects the offender");

        // A new connection is refused while the ban lasts.
        swarm.dial(addr.clone()).unwrap();
        let refused = tokio::time::timeout(Duration::from_secs(30), async {
            loop {
                match swarm.select_next_some().await {
                    SwarmEvent::ConnectionClosed {
                        num_established: 0, ..
                    } => return true,
                    SwarmEvent::OutgoingConnectionError { .. } => return true,
                    SwarmEvent::Behaviour(BadBehaviourEvent::Rr(
                        request_response::Event::Message { .. },
                    )) => return false,
                    _ => {}
                }
            }
        })
        .await
        .expect("the redial ends");
        assert!(refused, "a banned peer got a working connection");
    });

    let text = node.metrics();
    let by_peer = metric(
        &text,
        &format!("kiln_net_decode_errors_total{{peer=\"{bad_id}\"}}"),
    );
    assert!(
        by_peer >= 3.0,
        "decode errors of the bad peer: {by_peer}\n{text}"
    );
    assert_eq!(metric(&text, "kiln_net_peers_banned_total"), 1.0);
    assert!(
        metric(
            &text,
            "kiln_net_decode_errors_by_kind_total{kind=\"gossip\"}"
        ) >= 2.0
    );
    assert!(
        metric(
            &text,
            "kiln_net_decode_errors_by_kind_total{kind=\"request\"}"
        ) >= 1.0
    );
    let log = node.log();
    assert!(
        log.contains("rejected a bad frame from peer") && log.contains(&bad_id.to_string()),
        "{log}"
    );
    assert!(log.contains("refusing it"));
    // Still alive and well, and the stranger is no member.
    let members = node.member_states().expect("node still serves its API");
    assert!(members.iter().all(|(id, _)| *id != bad_id.to_string()));
}
