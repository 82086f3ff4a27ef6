//! The swarm's behaviours, how they are configured, and gossipsub's peer scoring.

use std::time::Duration;

use libp2p::gossipsub::{self, IdentTopic, MessageAuthenticity};
use libp2p::identity::Keypair;
use libp2p::kad::{self, store::MemoryStore};
use libp2p::request_response::{self, ProtocolSupport};
use libp2p::swarm::NetworkBehaviour;
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::{
    Swarm, autonat, connection_limits, dcutr, identify, mdns, noise, ping, relay, tcp, yamux,
};
use metainf_protocol::{ContentId, MAX_EVIDENCE_BYTES};

use super::config::{NetError, NetworkConfig};
use super::{HEARTBEATS_TOPIC, RECORDS_TOPIC, jobs, state, sync};

/// Every protocol the node speaks.
#[derive(NetworkBehaviour)]
pub(super) struct Behaviour {
    pub(super) limits: connection_limits::Behaviour,
    pub(super) identify: identify::Behaviour,
    pub(super) ping: ping::Behaviour,
    pub(super) kad: kad::Behaviour<MemoryStore>,
    pub(super) gossipsub: gossipsub::Behaviour,
    pub(super) sync: request_response::Behaviour<sync::SyncCodec>,
    pub(super) jobs: request_response::Behaviour<jobs::JobCodec>,
    pub(super) deltas: request_response::Behaviour<jobs::DeltaCodec>,
    pub(super) state: request_response::Behaviour<state::StateCodec>,
    pub(super) mdns: Toggle<mdns::tokio::Behaviour>,
    pub(super) autonat: Toggle<autonat::Behaviour>,
    pub(super) relay: Toggle<relay::client::Behaviour>,
    pub(super) dcutr: Toggle<dcutr::Behaviour>,
    pub(super) relay_server: Toggle<relay::Behaviour>,
}

/// Builds the swarm: TCP and QUIC, noise, yamux, the relay client, every behaviour.
pub(super) fn build_swarm(
    key: Keypair,
    config: &NetworkConfig,
) -> Result<Swarm<Behaviour>, NetError> {
    let setup = |e: &dyn std::fmt::Display| NetError::Setup(e.to_string());
    let gossip_config = gossipsub::ConfigBuilder::default()
        .validation_mode(gossipsub::ValidationMode::Strict)
        .validate_messages()
        .max_transmit_size(MAX_EVIDENCE_BYTES + 1024)
        .heartbeat_interval(Duration::from_millis(700))
        // Lazy gossip (IHAVE) to the 6 peers of `gossip_lazy` only, not to a quarter of every
        // non-mesh peer: its default grows each node's idle traffic with the network's size.
        .gossip_factor(0.0)
        // Content-addressed ids: the same record relayed by two peers is one message.
        .message_id_fn(|m: &gossipsub::Message| {
            gossipsub::MessageId::from(ContentId::of_bytes("metainf gossip", &m.data).0.to_vec())
        })
        .build()
        .map_err(|e| setup(&e))?;
    let nat = config.nat;
    let relay_server = config.relay_server;
    let autonat_config = autonat::Config {
        boot_delay: Duration::from_secs(5),
        retry_interval: Duration::from_secs(30),
        only_global_ips: !config.autonat_private_addresses,
        ..Default::default()
    };
    let mdns_on = config.mdns;
    let limits = connection_limits(config.max_peers);
    let swarm = libp2p::SwarmBuilder::with_existing_identity(key)
        .with_tokio()
        .with_tcp(
            tcp::Config::default().nodelay(true),
            noise::Config::new,
            yamux::Config::default,
        )
        .map_err(|e| setup(&e))?
        .with_quic()
        .with_relay_client(noise::Config::new, yamux::Config::default)
        .map_err(|e| setup(&e))?
        .with_behaviour(|key, relay_client| {
            let peer_id = key.public().to_peer_id();
            let mut gossipsub =
                gossipsub::Behaviour::new(MessageAuthenticity::Signed(key.clone()), gossip_config)?;
            let (params, thresholds) = peer_score();
            gossipsub.with_peer_score(params, thresholds)?;
            let mut kad_config = kad::Config::new(kad::PROTOCOL_NAME);
            // Bootstrap is run by the node when it has peers (at start and on identify),
            // not on a timer that warns while the node is alone.
            kad_config.set_periodic_bootstrap_interval(None);
            // Peers enter the table only through `EventLoop::add_kad_address`, which never
            // adds to a full bucket: Kademlia's own insert of a new connection into a full
            // bucket dials the bucket's oldest disconnected entry to check it is alive, and with
            // connections trimmed to `max_peers` every such dial is a new connection that makes
            // the node it reaches dial again (a chain of connections that never settles).
            kad_config.set_kbucket_inserts(kad::BucketInserts::Manual);
            let mut kad =
                kad::Behaviour::with_config(peer_id, MemoryStore::new(peer_id), kad_config);
            kad.set_mode(Some(kad::Mode::Server));
            let mdns = if mdns_on {
                Some(mdns::tokio::Behaviour::new(
                    mdns::Config::default(),
                    peer_id,
                )?)
            } else {
                None
            };
            Ok(Behaviour {
                limits: connection_limits::Behaviour::new(limits),
                // Listen addresses pushed as they change: a node that dialled out before its
                // listener was up is otherwise known without an address, and cannot be dialled
                // back once its connection is trimmed.
                identify: identify::Behaviour::new(
                    identify::Config::new("/metainf/1.0.0".into(), key.public())
                        .with_push_listen_addr_updates(true),
                ),
                ping: ping::Behaviour::default(),
                kad,
                gossipsub,
                sync: request_response::Behaviour::new(
                    [(sync::PROTOCOL, ProtocolSupport::Full)],
                    request_response::Config::default()
                        .with_request_timeout(Duration::from_secs(60)),
                ),
                // The job service enforces each job's own deadline; this only bounds a
                // request whose answer never comes on a live connection.
                jobs: request_response::Behaviour::new(
                    [(jobs::JOB_PROTOCOL, ProtocolSupport::Full)],
                    request_response::Config::default()
                        .with_request_timeout(Duration::from_secs(6 * 3600)),
                ),
                deltas: request_response::Behaviour::new(
                    [(jobs::DELTA_PROTOCOL, ProtocolSupport::Full)],
                    request_response::Config::default()
                        .with_request_timeout(Duration::from_secs(120)),
                ),
                state: request_response::Behaviour::new(
                    [(state::PROTOCOL, ProtocolSupport::Full)],
                    request_response::Config::default().with_request_timeout(state::TIMEOUT),
                ),
                mdns: Toggle::from(mdns),
                autonat: Toggle::from(
                    nat.then(|| autonat::Behaviour::new(peer_id, autonat_config)),
                ),
                relay: Toggle::from(nat.then_some(relay_client)),
                dcutr: Toggle::from(nat.then(|| dcutr::Behaviour::new(peer_id))),
                relay_server: Toggle::from(
                    relay_server.then(|| relay::Behaviour::new(peer_id, Default::default())),
                ),
            })
        })
        .map_err(|e| setup(&e))?
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(300)))
        .build();
    Ok(swarm)
}

/// The hard limits behind `max_peers` (the event loop trims to `max_peers` itself, softly):
/// twice as many connections in all, at most one and a half times as many inbound (others'
/// connections never fill the slots of this node's own dials), two per peer, and a bounded
/// number being set up at once. They are a safety valve, not the working limit: a refused
/// dial costs Kademlia the address it tried, and a routing table that shrinks below its
/// bucket size bootstraps again, dialling more.
fn connection_limits(max_peers: u32) -> connection_limits::ConnectionLimits {
    let limits = connection_limits::ConnectionLimits::default()
        .with_max_established_per_peer(Some(2))
        .with_max_pending_incoming(Some(32))
        .with_max_pending_outgoing(Some(32));
    if max_peers == 0 {
        return limits;
    }
    let total = max_peers.saturating_mul(2).max(max_peers.saturating_add(2));
    let inbound = max_peers
        .saturating_add(max_peers / 2)
        .max(max_peers.saturating_add(1));
    limits
        .with_max_established(Some(total))
        .with_max_established_incoming(Some(inbound))
}

/// Peer scoring: a rejected record costs its sender heavily; persistent offenders are graylisted.
fn peer_score() -> (gossipsub::PeerScoreParams, gossipsub::PeerScoreThresholds) {
    let mut params = gossipsub::PeerScoreParams::default();
    // Positive terms are small and capped (at most +36 for an hour in the mesh, +50 for first
    // deliveries); one invalid record costs -100, squared in the count: three invalid records
    // (-900) graylist a peer (threshold -80). Quiet honest peers are not penalised for
    // delivering little (mesh delivery penalties off): records are rare, bursty events.
    let topic = gossipsub::TopicScoreParams {
        topic_weight: 1.0,
        time_in_mesh_weight: 0.01,
        time_in_mesh_quantum: Duration::from_secs(1),
        time_in_mesh_cap: 3600.0,
        first_message_deliveries_weight: 0.5,
        first_message_deliveries_decay: 0.99,
        first_message_deliveries_cap: 100.0,
        mesh_message_deliveries_weight: 0.0,
        mesh_failure_penalty_weight: 0.0,
        invalid_message_deliveries_weight: -100.0,
        invalid_message_deliveries_decay: 0.99,
        ..Default::default()
    };
    // Many nodes on one loopback address are a local test network, not a Sybil attack; other
    // addresses keep gossipsub's colocation penalty (more than 10 peers behind one IP).
    params.ip_colocation_factor_whitelist = [
        std::net::IpAddr::from(std::net::Ipv4Addr::LOCALHOST),
        std::net::IpAddr::from(std::net::Ipv6Addr::LOCALHOST),
    ]
    .into_iter()
    .collect();
    for name in [RECORDS_TOPIC, HEARTBEATS_TOPIC] {
        params
            .topics
            .insert(IdentTopic::new(name).hash(), topic.clone());
    }
    (params, gossipsub::PeerScoreThresholds::default())
}
