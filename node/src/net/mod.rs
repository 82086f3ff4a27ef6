//! The node's libp2p swarm: replicates the performance tensor to every node.
//!
//! Shape (as rust-libp2p's file-sharing example): [`start`] returns a cloneable [`Client`] and
//! an [`EventLoop`]; the client sends [`Command`]s with oneshot replies over a bounded channel;
//! the loop is one `select!` over swarm events, commands and timers, and translates swarm events
//! into domain actions before anything else sees them.
//!
//! - **Gossip** (`metainf/records/1`, `metainf/heartbeats/1`): messages are validated before they
//!   are stored or forwarded (gossipsub's manual validation): size, decoding, signature,
//!   signer = origin, value ranges, dedup against the store. Invalid records are rejected and
//!   count against the sender's peer score.
//! - **Anti-entropy** (`/metainf/sync/1`): on connecting and then periodically, peers exchange
//!   version vectors and pull what they lack in bounded pages, one page in flight per origin, so
//!   memory stays bounded however far behind a node is.
//! - **Kademlia** (server mode): peer routing, bootstrap, provider records for served models.

mod frame;
mod jobs;
mod sync;

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use libp2p::gossipsub::{self, IdentTopic, MessageAcceptance, MessageAuthenticity};
use libp2p::identity::Keypair;
use libp2p::kad::{self, store::MemoryStore};
use libp2p::request_response::{self, OutboundRequestId, ProtocolSupport};
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{
    Multiaddr, PeerId, Swarm, autonat, dcutr, identify, mdns, noise, ping, relay, tcp, yamux,
};
use metainf_protocol::{
    ContentId, HardwareId, HardwareProfile, Heartbeat, JobId, MAX_RECORD_BYTES, ModelDescriptor,
    ModelId, SignedRecord, VerifiedRecord, codec,
};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::store::{PeerEntry, PutOutcome, Store};
pub use jobs::{DeltaAck, JobCall, JobDelta, JobReply};
pub use sync::{MAX_PAGE, SyncRequest, SyncResponse};

/// Gossip topic of performance records.
pub const RECORDS_TOPIC: &str = "metainf/records/1";
/// Gossip topic of heartbeats.
pub const HEARTBEATS_TOPIC: &str = "metainf/heartbeats/1";
/// Largest heartbeat message.
pub const MAX_HEARTBEAT_BYTES: usize = 32 * 1024;

/// Network settings (the `[network]` section of the configuration).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NetworkConfig {
    /// Whether `run` starts the swarm at all.
    pub enabled: bool,
    /// Addresses to listen on (TCP and QUIC).
    pub listen: Vec<Multiaddr>,
    /// Peers to dial at start (with `/p2p/<peer id>`), also Kademlia's bootstrap nodes.
    pub bootstrap: Vec<Multiaddr>,
    /// mDNS discovery on the local network.
    pub mdns: bool,
    /// AutoNAT, relay client and DCUtR hole punching for nodes behind NAT.
    pub nat: bool,
    /// Offer relaying to nodes behind NAT (turn on for publicly reachable nodes).
    pub relay_server: bool,
    /// Let AutoNAT probe and confirm private and loopback addresses too: for networks that
    /// live inside one private network (a cluster, the docker testnet).
    pub autonat_private_addresses: bool,
    /// Addresses at which others can reach this node (a public IP, a port forward). A relay
    /// server serves only once it has one; AutoNAT confirms them otherwise.
    pub external_addresses: Vec<Multiaddr>,
    /// Seconds between heartbeats.
    pub heartbeat_interval_s: u64,
    /// A peer silent for this many seconds counts as gone.
    pub peer_timeout_s: u64,
    /// Seconds between anti-entropy rounds.
    pub anti_entropy_interval_s: u64,
    /// Records per anti-entropy page.
    pub page_size: u32,
    /// Price per hour of this node's compute, announced in heartbeats.
    pub price_per_hour: f64,
}

impl Default for NetworkConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            listen: vec![
                "/ip4/0.0.0.0/tcp/4001"
                    .parse()
                    .unwrap_or_else(|_| Multiaddr::empty()),
                "/ip4/0.0.0.0/udp/4001/quic-v1"
                    .parse()
                    .unwrap_or_else(|_| Multiaddr::empty()),
            ],
            bootstrap: Vec::new(),
            mdns: true,
            nat: true,
            relay_server: false,
            autonat_private_addresses: false,
            external_addresses: Vec::new(),
            heartbeat_interval_s: 5,
            peer_timeout_s: 30,
            anti_entropy_interval_s: 30,
            page_size: 1000,
            price_per_hour: 0.0,
        }
    }
}

/// Errors of the network layer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NetError {
    /// The swarm could not be built or could not listen.
    #[error("network setup failed: {0}")]
    Setup(String),
    /// The event loop has stopped.
    #[error("the network has shut down")]
    Closed,
    /// A record could not be published.
    #[error("cannot publish: {0}")]
    Publish(String),
    /// Storing failed.
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    /// A request to a peer failed: it could not be reached, closed the connection or timed
    /// out.
    #[error("peer {peer}: {reason}")]
    Peer {
        /// The peer.
        peer: PeerId,
        /// What happened.
        reason: String,
    },
}

/// What this node offers, announced in its heartbeats: kept current by the job service.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Offer {
    /// Models it serves.
    pub models: Vec<ModelDescriptor>,
    /// Jobs waiting in its queue.
    pub queue_depth: u32,
    /// Jobs running now.
    pub running_jobs: u32,
    /// Capacity of its queue.
    pub queue_capacity: u32,
}

/// A job call from a peer, to be answered through [`InboundJob::respond`].
#[derive(Debug)]
pub struct InboundJob {
    /// The peer that forwarded it.
    pub peer: PeerId,
    /// What to run.
    pub call: JobCall,
    channel: request_response::ResponseChannel<JobReply>,
    tx: mpsc::Sender<Command>,
}

impl InboundJob {
    /// Sends the answer back to the peer (a peer that has gone is ignored).
    pub async fn respond(self, reply: JobReply) {
        let _ = self
            .tx
            .send(Command::RespondJob {
                channel: self.channel,
                reply: Box::new(reply),
            })
            .await;
    }
}

/// This node's reachability, as AutoNAT concluded from peers dialling it back.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum NatStatus {
    /// Reachable at this address.
    Public(Multiaddr),
    /// Behind a NAT or firewall: reachable through relays.
    Private,
    /// Not enough probes yet.
    Unknown,
    /// AutoNAT is switched off (`nat = false`).
    Disabled,
}

/// What the node knows of a peer right now.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PeerStatus {
    /// The peer.
    pub peer: PeerId,
    /// Whether a connection is open.
    pub connected: bool,
    /// Whether an open connection is direct (not through a relay).
    pub direct: bool,
    /// Whether it was heard from within the timeout.
    pub alive: bool,
    /// Last time it was heard from, Unix milliseconds.
    pub last_seen_ms: u64,
    /// Its gossipsub peer score (negative after invalid messages), when connected.
    pub score: Option<f64>,
    /// Its latest heartbeat.
    #[serde(skip)]
    pub heartbeat: Option<Heartbeat>,
}

#[derive(NetworkBehaviour)]
struct Behaviour {
    identify: identify::Behaviour,
    ping: ping::Behaviour,
    kad: kad::Behaviour<MemoryStore>,
    gossipsub: gossipsub::Behaviour,
    sync: request_response::Behaviour<sync::SyncCodec>,
    jobs: request_response::Behaviour<jobs::JobCodec>,
    deltas: request_response::Behaviour<jobs::DeltaCodec>,
    mdns: Toggle<mdns::tokio::Behaviour>,
    autonat: Toggle<autonat::Behaviour>,
    relay: Toggle<relay::client::Behaviour>,
    dcutr: Toggle<dcutr::Behaviour>,
    relay_server: Toggle<relay::Behaviour>,
}

/// Commands from [`Client`] to the event loop.
#[derive(Debug)]
enum Command {
    Publish {
        record: Box<VerifiedRecord>,
        reply: oneshot::Sender<Result<(), NetError>>,
    },
    PublishBytes {
        bytes: Vec<u8>,
        reply: oneshot::Sender<Result<(), NetError>>,
    },
    Peers {
        reply: oneshot::Sender<Vec<PeerStatus>>,
    },
    ListenAddrs {
        reply: oneshot::Sender<Vec<Multiaddr>>,
    },
    AddExternalAddress {
        addr: Multiaddr,
    },
    NatStatus {
        reply: oneshot::Sender<NatStatus>,
    },
    Dial {
        addr: Multiaddr,
        reply: oneshot::Sender<Result<(), NetError>>,
    },
    Provide {
        model: ModelId,
        reply: oneshot::Sender<Result<(), NetError>>,
    },
    FindProviders {
        model: ModelId,
        reply: oneshot::Sender<HashSet<PeerId>>,
    },
    SyncNow,
    SetOffer {
        offer: watch::Receiver<Offer>,
    },
    ServeJobs {
        inbound: mpsc::Sender<InboundJob>,
    },
    CallJob {
        peer: PeerId,
        call: Box<JobCall>,
        deltas: Option<mpsc::Sender<JobDelta>>,
        reply: oneshot::Sender<Result<JobReply, NetError>>,
    },
    RespondJob {
        channel: request_response::ResponseChannel<JobReply>,
        reply: Box<JobReply>,
    },
    SendDelta {
        peer: PeerId,
        delta: JobDelta,
        reply: oneshot::Sender<Result<DeltaAck, NetError>>,
    },
    RespondDelta {
        channel: request_response::ResponseChannel<DeltaAck>,
        ack: DeltaAck,
    },
    PageStored {
        peer: PeerId,
        origin: PeerId,
        next_after: Option<u64>,
    },
}

/// A cloneable handle to the network.
#[derive(Clone, Debug)]
pub struct Client {
    tx: mpsc::Sender<Command>,
    peer_id: PeerId,
}

impl Client {
    /// This node's peer id.
    pub fn peer_id(&self) -> PeerId {
        self.peer_id
    }

    async fn ask<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> Command,
    ) -> Result<T, NetError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(make(reply))
            .await
            .map_err(|_| NetError::Closed)?;
        rx.await.map_err(|_| NetError::Closed)
    }

    /// Stores a record made by this node and gossips it to the network.
    pub async fn publish(&self, record: VerifiedRecord) -> Result<(), NetError> {
        self.ask(|reply| Command::Publish {
            record: Box::new(record),
            reply,
        })
        .await?
    }

    /// Gossips raw bytes on the records topic without any local check: peers validate what
    /// they receive. For tests of that validation and for tools that relay records.
    #[doc(hidden)]
    pub async fn publish_bytes(&self, bytes: Vec<u8>) -> Result<(), NetError> {
        self.ask(|reply| Command::PublishBytes { bytes, reply })
            .await?
    }

    /// Every peer known, with liveness.
    pub async fn peers(&self) -> Result<Vec<PeerStatus>, NetError> {
        self.ask(|reply| Command::Peers { reply }).await
    }

    /// Addresses the node listens on.
    pub async fn listen_addrs(&self) -> Result<Vec<Multiaddr>, NetError> {
        self.ask(|reply| Command::ListenAddrs { reply }).await
    }

    /// What AutoNAT concluded about this node's reachability.
    pub async fn nat_status(&self) -> Result<NatStatus, NetError> {
        self.ask(|reply| Command::NatStatus { reply }).await
    }

    /// Declares an address at which others can reach this node.
    pub async fn add_external_address(&self, addr: Multiaddr) -> Result<(), NetError> {
        self.tx
            .send(Command::AddExternalAddress { addr })
            .await
            .map_err(|_| NetError::Closed)
    }

    /// Dials an address.
    pub async fn dial(&self, addr: Multiaddr) -> Result<(), NetError> {
        self.ask(|reply| Command::Dial { addr, reply }).await?
    }

    /// Announces in the DHT that this node serves `model`.
    pub async fn provide_model(&self, model: ModelId) -> Result<(), NetError> {
        self.ask(|reply| Command::Provide { model, reply }).await?
    }

    /// Peers that announced serving `model`.
    pub async fn find_providers(&self, model: ModelId) -> Result<HashSet<PeerId>, NetError> {
        self.ask(|reply| Command::FindProviders { model, reply })
            .await
    }

    /// Starts an anti-entropy round with every connected peer now.
    pub async fn sync_now(&self) -> Result<(), NetError> {
        self.send(Command::SyncNow).await
    }

    async fn send(&self, command: Command) -> Result<(), NetError> {
        self.tx.send(command).await.map_err(|_| NetError::Closed)
    }

    /// Announces in every heartbeat what `offer` holds at the time.
    pub async fn set_offer(&self, offer: watch::Receiver<Offer>) -> Result<(), NetError> {
        self.send(Command::SetOffer { offer }).await
    }

    /// Hands job calls from peers to `inbound`. Until this is called, or while `inbound` is
    /// full, peers get [`JobReply::Busy`].
    pub async fn serve_jobs(&self, inbound: mpsc::Sender<InboundJob>) -> Result<(), NetError> {
        self.send(Command::ServeJobs { inbound }).await
    }

    /// Runs a job on `peer` and waits for its answer; text deltas of a streaming job go to
    /// `deltas`. Fails with [`NetError::Peer`] when the peer cannot be reached or the
    /// connection closes before the answer.
    pub async fn call_job(
        &self,
        peer: PeerId,
        call: JobCall,
        deltas: Option<mpsc::Sender<JobDelta>>,
    ) -> Result<JobReply, NetError> {
        self.ask(|reply| Command::CallJob {
            peer,
            call: Box::new(call),
            deltas,
            reply,
        })
        .await?
    }

    /// Sends a text delta of a streaming job back to the node that forwarded it, and waits
    /// for its acknowledgement.
    pub async fn send_delta(&self, peer: PeerId, delta: JobDelta) -> Result<DeltaAck, NetError> {
        self.ask(|reply| Command::SendDelta { peer, delta, reply })
            .await?
    }
}

/// `MemAvailable` from /proc/meminfo (0 where unknown). The profiler will report device memory
/// for GPUs.
fn available_memory_bytes() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemAvailable:"))
                .and_then(|r| r.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kb| kb.saturating_mul(1024))
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn build_swarm(key: Keypair, config: &NetworkConfig) -> Result<Swarm<Behaviour>, NetError> {
    let setup = |e: &dyn std::fmt::Display| NetError::Setup(e.to_string());
    let gossip_config = gossipsub::ConfigBuilder::default()
        .validation_mode(gossipsub::ValidationMode::Strict)
        .validate_messages()
        .max_transmit_size(MAX_RECORD_BYTES + 1024)
        .heartbeat_interval(Duration::from_millis(700))
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
                identify: identify::Behaviour::new(identify::Config::new(
                    "/metainf/1.0.0".into(),
                    key.public(),
                )),
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

/// Starts the swarm: listens, dials the bootstrap peers, subscribes to the topics.
pub fn start(
    key: Keypair,
    store: Store,
    profile: HardwareProfile,
    config: NetworkConfig,
) -> Result<(Client, EventLoop), NetError> {
    let peer_id = key.public().to_peer_id();
    let hardware = profile
        .id()
        .map_err(|e| NetError::Setup(format!("hardware profile: {e}")))?;
    let mut swarm = build_swarm(key, &config)?;
    let bootstrap_peers: HashSet<PeerId> =
        config.bootstrap.iter().filter_map(last_peer_id).collect();
    let mut deferred_listens = Vec::new();
    for addr in &config.listen {
        // A circuit address through a relay that is also a bootstrap peer is listened on once
        // that connection is up: the relay client's own dial would race the bootstrap dial.
        if let Some(relay) = circuit_relay(addr)
            && bootstrap_peers.contains(&relay)
        {
            deferred_listens.push((relay, addr.clone()));
            continue;
        }
        swarm
            .listen_on(addr.clone())
            .map_err(|e| NetError::Setup(format!("cannot listen on {addr}: {e}")))?;
    }
    let records = IdentTopic::new(RECORDS_TOPIC);
    let heartbeats = IdentTopic::new(HEARTBEATS_TOPIC);
    for topic in [&records, &heartbeats] {
        swarm
            .behaviour_mut()
            .gossipsub
            .subscribe(topic)
            .map_err(|e| NetError::Setup(e.to_string()))?;
    }
    for addr in &config.external_addresses {
        swarm.add_external_address(addr.clone());
    }
    for addr in &config.bootstrap {
        // From a fresh port: two nodes that bootstrap from each other and start together
        // would otherwise collide in one TCP simultaneous open (see the mDNS dial).
        let opts = match last_peer_id(addr) {
            Some(peer) => {
                swarm.behaviour_mut().kad.add_address(&peer, addr.clone());
                DialOpts::peer_id(peer)
                    .addresses(vec![addr.clone()])
                    .allocate_new_port()
                    .build()
            }
            None => DialOpts::unknown_peer_id()
                .address(addr.clone())
                .allocate_new_port()
                .build(),
        };
        if let Err(e) = swarm.dial(opts) {
            warn!(%addr, error = %e, "cannot dial bootstrap peer");
        }
    }
    if !config.bootstrap.is_empty() {
        let _ = swarm.behaviour_mut().kad.bootstrap();
    }
    let (tx, rx) = mpsc::channel(256);
    let client = Client {
        tx: tx.clone(),
        peer_id,
    };
    let event_loop = EventLoop {
        swarm,
        store,
        config,
        hardware,
        profile,
        offer: None,
        inbound_jobs: None,
        job_calls: HashMap::new(),
        delta_sinks: HashMap::new(),
        delta_sends: HashMap::new(),
        commands: rx,
        self_tx: tx,
        records,
        heartbeats,
        peers: HashMap::new(),
        connections: HashMap::new(),
        deferred_listens,
        pending_providers: HashMap::new(),
        pulls: HashMap::new(),
        pull_queue: VecDeque::new(),
        pulling: HashSet::new(),
        direct_addrs: HashMap::new(),
        direct_attempts: HashMap::new(),
    };
    Ok((client, event_loop))
}

/// The peer id at the end of an address (`.../p2p/<id>`).
fn last_peer_id(addr: &Multiaddr) -> Option<PeerId> {
    match addr.iter().last() {
        Some(libp2p::multiaddr::Protocol::P2p(peer)) => Some(peer),
        _ => None,
    }
}

/// The relay of a circuit listen address (`<relay addr>/p2p/<relay>/p2p-circuit`).
fn circuit_relay(addr: &Multiaddr) -> Option<PeerId> {
    let mut relay = None;
    for p in addr.iter() {
        match p {
            libp2p::multiaddr::Protocol::P2p(peer) => relay = Some(peer),
            libp2p::multiaddr::Protocol::P2pCircuit => return relay,
            _ => {}
        }
    }
    None
}

/// Most pull requests in flight at once (each holds at most one page).
const MAX_PULLS_IN_FLIGHT: usize = 4;

/// The network's event loop. Run it with [`EventLoop::run`].
pub struct EventLoop {
    swarm: Swarm<Behaviour>,
    store: Store,
    config: NetworkConfig,
    hardware: HardwareId,
    profile: HardwareProfile,
    /// What the heartbeats announce.
    offer: Option<watch::Receiver<Offer>>,
    /// Where job calls from peers go.
    inbound_jobs: Option<mpsc::Sender<InboundJob>>,
    /// Outstanding job calls: request → (job, answer).
    job_calls: HashMap<OutboundRequestId, (JobId, oneshot::Sender<Result<JobReply, NetError>>)>,
    /// Where the deltas of a streaming job forwarded from here go: job → (host, sink).
    delta_sinks: HashMap<JobId, (PeerId, mpsc::Sender<JobDelta>)>,
    /// Outstanding deltas sent from here.
    delta_sends: HashMap<OutboundRequestId, oneshot::Sender<Result<DeltaAck, NetError>>>,
    commands: mpsc::Receiver<Command>,
    self_tx: mpsc::Sender<Command>,
    records: IdentTopic,
    heartbeats: IdentTopic,
    peers: HashMap<PeerId, PeerStatus>,
    /// Circuit listen addresses waiting for their relay's connection.
    deferred_listens: Vec<(PeerId, Multiaddr)>,
    /// Open connections per peer, and whether each goes through a relay.
    connections: HashMap<PeerId, HashMap<libp2p::swarm::ConnectionId, bool>>,
    pending_providers: HashMap<kad::QueryId, (oneshot::Sender<HashSet<PeerId>>, HashSet<PeerId>)>,
    /// Outstanding pull requests: request → (peer, origin).
    pulls: HashMap<OutboundRequestId, (PeerId, PeerId)>,
    /// Pulls waiting for a slot: (peer, origin, after).
    pull_queue: VecDeque<(PeerId, PeerId, u64)>,
    /// (peer, origin) pairs with a pull queued or in flight.
    pulling: HashSet<(PeerId, PeerId)>,
    /// Each connected peer's own listen addresses that do not go through a relay (from
    /// identify), for a direct dial when a hole punch fails.
    direct_addrs: HashMap<PeerId, Vec<Multiaddr>>,
    /// When a direct dial to a relayed-only peer was last started.
    direct_attempts: HashMap<PeerId, std::time::Instant>,
}

impl EventLoop {
    /// Runs until `shutdown` is cancelled.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let mut heartbeat =
            tokio::time::interval(Duration::from_secs(self.config.heartbeat_interval_s.max(1)));
        let mut anti_entropy = tokio::time::interval(Duration::from_secs(
            self.config.anti_entropy_interval_s.max(1),
        ));
        anti_entropy.tick().await;
        loop {
            tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                Some(command) = self.commands.recv() => self.on_command(command),
                event = self.swarm.select_next_some() => self.on_swarm_event(event),
                _ = heartbeat.tick() => {
                    self.send_heartbeat();
                    self.upgrade_relayed();
                }
                _ = anti_entropy.tick() => self.start_sync_round(),
            }
        }
        info!("network stopped");
    }

    /// One plain dial, from a fresh port, to a peer's own (non-relay) listen addresses. The
    /// peer may be directly reachable after all (a public address, the same network), which
    /// DCUtR's hole punch does not always find (it runs once, racing identify); behind real
    /// NATs the dial fails and the relayed connection stays.
    fn dial_direct(&mut self, peer: PeerId) {
        let addrs = self.direct_addrs.get(&peer).cloned().unwrap_or_default();
        if addrs.is_empty() {
            return;
        }
        self.direct_attempts.insert(peer, std::time::Instant::now());
        let opts = DialOpts::peer_id(peer)
            .addresses(addrs)
            .condition(PeerCondition::Always)
            .allocate_new_port()
            .build();
        if let Err(e) = self.swarm.dial(opts) {
            debug!(%peer, error = %e, "direct dial not started");
        }
    }

    /// Retries a direct connection to peers reached only through a relay, at most once per
    /// `DIRECT_RETRY`.
    fn upgrade_relayed(&mut self) {
        const DIRECT_RETRY: Duration = Duration::from_secs(30);
        let relayed_only: Vec<PeerId> = self
            .connections
            .iter()
            .filter(|(_, c)| !c.is_empty() && c.values().all(|relayed| *relayed))
            .map(|(p, _)| *p)
            .filter(|p| {
                self.direct_attempts
                    .get(p)
                    .is_none_or(|t| t.elapsed() >= DIRECT_RETRY)
            })
            .collect();
        for peer in relayed_only {
            self.dial_direct(peer);
        }
    }

    fn on_command(&mut self, command: Command) {
        match command {
            Command::Publish { record, reply } => {
                let result = self.publish(*record);
                let _ = reply.send(result);
            }
            Command::PublishBytes { bytes, reply } => {
                let result = self
                    .swarm
                    .behaviour_mut()
                    .gossipsub
                    .publish(self.records.clone(), bytes)
                    .map(|_| ())
                    .map_err(|e| NetError::Publish(e.to_string()));
                let _ = reply.send(result);
            }
            Command::Peers { reply } => {
                let timeout = self.config.peer_timeout_s.saturating_mul(1000);
                let now = now_ms();
                let mut peers: Vec<PeerStatus> = self
                    .peers
                    .values()
                    .cloned()
                    .map(|mut p| {
                        p.connected = self.swarm.is_connected(&p.peer);
                        p.direct = self
                            .connections
                            .get(&p.peer)
                            .is_some_and(|c| c.values().any(|relayed| !relayed));
                        p.score = self.swarm.behaviour().gossipsub.peer_score(&p.peer);
                        p.alive = now.saturating_sub(p.last_seen_ms) <= timeout;
                        p
                    })
                    .collect();
                peers.sort_by_key(|p| p.peer);
                let _ = reply.send(peers);
            }
            Command::ListenAddrs { reply } => {
                let _ = reply.send(self.swarm.listeners().cloned().collect());
            }
            Command::NatStatus { reply } => {
                let status = match self
                    .swarm
                    .behaviour()
                    .autonat
                    .as_ref()
                    .map(|a| a.nat_status())
                {
                    Some(autonat::NatStatus::Public(addr)) => NatStatus::Public(addr),
                    Some(autonat::NatStatus::Private) => NatStatus::Private,
                    Some(autonat::NatStatus::Unknown) => NatStatus::Unknown,
                    None => NatStatus::Disabled,
                };
                let _ = reply.send(status);
            }
            Command::AddExternalAddress { addr } => {
                info!(%addr, "external address");
                self.swarm.add_external_address(addr);
            }
            Command::Dial { addr, reply } => {
                let result = self
                    .swarm
                    .dial(addr)
                    .map_err(|e| NetError::Setup(e.to_string()));
                let _ = reply.send(result);
            }
            Command::Provide { model, reply } => {
                let key = kad::RecordKey::new(&model.as_bytes());
                let result = self
                    .swarm
                    .behaviour_mut()
                    .kad
                    .start_providing(key)
                    .map(|_| ())
                    .map_err(|e| NetError::Publish(e.to_string()));
                let _ = reply.send(result);
            }
            Command::FindProviders { model, reply } => {
                let key = kad::RecordKey::new(&model.as_bytes());
                let id = self.swarm.behaviour_mut().kad.get_providers(key);
                self.pending_providers.insert(id, (reply, HashSet::new()));
            }
            Command::SyncNow => self.start_sync_round(),
            Command::SetOffer { offer } => {
                self.offer = Some(offer);
                self.send_heartbeat();
            }
            Command::ServeJobs { inbound } => self.inbound_jobs = Some(inbound),
            Command::CallJob {
                peer,
                call,
                deltas,
                reply,
            } => {
                let job = call.request.id;
                if let Some(sink) = deltas {
                    self.delta_sinks.insert(job, (peer, sink));
                }
                let id = self.swarm.behaviour_mut().jobs.send_request(&peer, *call);
                self.job_calls.insert(id, (job, reply));
            }
            Command::RespondJob { channel, reply } => {
                if self
                    .swarm
                    .behaviour_mut()
                    .jobs
                    .send_response(channel, *reply)
                    .is_err()
                {
                    debug!("a job's answer could not be sent: the peer has gone");
                }
            }
            Command::SendDelta { peer, delta, reply } => {
                let id = self.swarm.behaviour_mut().deltas.send_request(&peer, delta);
                self.delta_sends.insert(id, reply);
            }
            Command::RespondDelta { channel, ack } => {
                let _ = self
                    .swarm
                    .behaviour_mut()
                    .deltas
                    .send_response(channel, ack);
            }
            Command::PageStored {
                peer,
                origin,
                next_after,
            } => {
                self.pulling.remove(&(peer, origin));
                if let Some(after) = next_after {
                    self.queue_pull(peer, origin, after);
                }
                self.drive_pulls();
            }
        }
    }

    fn publish(&mut self, record: VerifiedRecord) -> Result<(), NetError> {
        let bytes = record
            .signed()
            .to_wire()
            .map_err(|e| NetError::Publish(e.to_string()))?;
        // Stored first (durably, by the caller's wait below), then gossiped.
        let outcome = self.store.put(vec![record])?;
        if outcome.first() == Some(&PutOutcome::Stored)
            || outcome.first() == Some(&PutOutcome::Duplicate)
        {
            match self
                .swarm
                .behaviour_mut()
                .gossipsub
                .publish(self.records.clone(), bytes)
            {
                Ok(_) => Ok(()),
                // Alone on the network: stored, and anti-entropy will spread it later.
                Err(gossipsub::PublishError::NoPeersSubscribedToTopic) => Ok(()),
                Err(e) => Err(NetError::Publish(e.to_string())),
            }
        } else {
            Err(NetError::Publish(format!(
                "store refused the record: {outcome:?}"
            )))
        }
    }

    fn on_swarm_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        match event {
            SwarmEvent::NewListenAddr { address, .. } => {
                info!(%address, "listening");
            }
            SwarmEvent::ConnectionEstablished {
                peer_id,
                connection_id,
                endpoint,
                num_established,
                ..
            } => {
                let relayed = endpoint
                    .get_remote_address()
                    .iter()
                    .any(|p| matches!(p, libp2p::multiaddr::Protocol::P2pCircuit));
                debug!(peer = %peer_id, addr = %endpoint.get_remote_address(), relayed, "connected");
                self.connections
                    .entry(peer_id)
                    .or_default()
                    .insert(connection_id, relayed);
                let (ready, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.deferred_listens)
                    .into_iter()
                    .partition(|(relay, _)| *relay == peer_id);
                self.deferred_listens = waiting;
                for (_, addr) in ready {
                    if let Err(e) = self.swarm.listen_on(addr.clone()) {
                        warn!(%addr, error = %e, "cannot listen through the relay");
                    }
                }
                self.seen(peer_id);
                if num_established.get() == 1 {
                    self.request_summary(peer_id);
                }
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                connection_id,
                num_established,
                ..
            } if num_established > 0 => {
                if let Some(c) = self.connections.get_mut(&peer_id) {
                    c.remove(&connection_id);
                }
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                num_established: 0,
                ..
            } => {
                self.connections.remove(&peer_id);
                self.direct_addrs.remove(&peer_id);
                self.direct_attempts.remove(&peer_id);
                debug!(peer = %peer_id, "disconnected");
                self.pull_queue.retain(|(p, _, _)| *p != peer_id);
                self.pulling.retain(|(p, _)| *p != peer_id);
            }
            SwarmEvent::OutgoingConnectionError { peer_id, error, .. } => {
                debug!(peer = ?peer_id, %error, "outgoing connection failed");
            }
            SwarmEvent::IncomingConnectionError {
                send_back_addr,
                error,
                ..
            } => {
                debug!(addr = %send_back_addr, %error, "incoming connection failed");
            }
            SwarmEvent::Behaviour(event) => self.on_behaviour_event(event),
            _ => {}
        }
    }

    fn seen(&mut self, peer: PeerId) {
        let entry = self.peers.entry(peer).or_insert_with(|| PeerStatus {
            peer,
            connected: true,
            direct: false,
            alive: true,
            last_seen_ms: 0,
            score: None,
            heartbeat: None,
        });
        entry.last_seen_ms = now_ms();
    }

    fn on_behaviour_event(&mut self, event: BehaviourEvent) {
        match event {
            BehaviourEvent::Gossipsub(gossipsub::Event::Message {
                propagation_source,
                message_id,
                message,
            }) => {
                let acceptance = if message.topic == self.records.hash() {
                    self.on_record_message(&message.data)
                } else if message.topic == self.heartbeats.hash() {
                    self.on_heartbeat_message(message.source, &message.data)
                } else {
                    MessageAcceptance::Ignore
                };
                if acceptance == MessageAcceptance::Reject {
                    warn!(peer = %propagation_source, "rejected an invalid gossip message");
                }
                self.swarm
                    .behaviour_mut()
                    .gossipsub
                    .report_message_validation_result(&message_id, &propagation_source, acceptance);
            }
            BehaviourEvent::Identify(identify::Event::Received { peer_id, info, .. }) => {
                let direct: Vec<Multiaddr> = info
                    .listen_addrs
                    .iter()
                    .filter(|a| {
                        !a.iter()
                            .any(|p| p == libp2p::multiaddr::Protocol::P2pCircuit)
                    })
                    .take(8)
                    .cloned()
                    .collect();
                self.direct_addrs.insert(peer_id, direct);
                for addr in info.listen_addrs {
                    self.swarm.behaviour_mut().kad.add_address(&peer_id, addr);
                }
            }
            BehaviourEvent::Relay(relay::client::Event::ReservationReqAccepted {
                relay_peer_id,
                ..
            }) => {
                info!(relay = %relay_peer_id, "reachable through a relay");
            }
            BehaviourEvent::Autonat(autonat::Event::StatusChanged { old, new }) => {
                info!(?old, ?new, "reachability changed");
            }
            BehaviourEvent::Dcutr(dcutr::Event {
                remote_peer_id,
                result,
            }) => match result {
                Ok(_) => info!(peer = %remote_peer_id, "hole punch succeeded: direct connection"),
                Err(e) => {
                    debug!(peer = %remote_peer_id, error = %e, "hole punch failed; trying a direct dial");
                    self.dial_direct(remote_peer_id);
                }
            },
            BehaviourEvent::Mdns(mdns::Event::Discovered(found)) => {
                for (peer, addr) in found {
                    self.swarm
                        .behaviour_mut()
                        .kad
                        .add_address(&peer, addr.clone());
                    // Peers on a LAN discover each other at the same instant. With the listen
                    // port reused for dialling, the two dials become one TCP simultaneous
                    // open in which both ends act as noise initiator and the handshake fails,
                    // every time. A fresh port gives two ordinary connections.
                    let opts = DialOpts::peer_id(peer)
                        .addresses(vec![addr])
                        .condition(PeerCondition::DisconnectedAndNotDialing)
                        .allocate_new_port()
                        .build();
                    if let Err(e) = self.swarm.dial(opts) {
                        debug!(%peer, error = %e, "not dialling a peer found by mDNS");
                    }
                }
            }
            BehaviourEvent::Kad(kad::Event::OutboundQueryProgressed {
                id,
                result: kad::QueryResult::GetProviders(result),
                step,
                ..
            }) => {
                if let Some((_, found)) = self.pending_providers.get_mut(&id)
                    && let Ok(kad::GetProvidersOk::FoundProviders { providers, .. }) = result
                {
                    found.extend(providers);
                }
                if step.last
                    && let Some((reply, found)) = self.pending_providers.remove(&id)
                {
                    let _ = reply.send(found);
                }
            }
            BehaviourEvent::Sync(request_response::Event::Message { peer, message, .. }) => {
                self.seen(peer);
                match message {
                    request_response::Message::Request {
                        request, channel, ..
                    } => {
                        let response = self.answer_sync(request);
                        let _ = self
                            .swarm
                            .behaviour_mut()
                            .sync
                            .send_response(channel, response);
                    }
                    request_response::Message::Response {
                        request_id,
                        response,
                    } => {
                        self.on_sync_response(peer, request_id, response);
                    }
                }
            }
            BehaviourEvent::Jobs(event) => self.on_job_event(event),
            BehaviourEvent::Deltas(event) => self.on_delta_event(event),
            BehaviourEvent::Sync(request_response::Event::OutboundFailure {
                peer,
                request_id,
                error,
                ..
            }) => {
                debug!(%peer, %error, "sync request failed");
                if let Some((peer, origin)) = self.pulls.remove(&request_id) {
                    self.pulling.remove(&(peer, origin));
                    self.drive_pulls();
                }
            }
            _ => {}
        }
    }

    fn on_job_event(&mut self, event: request_response::Event<JobCall, JobReply>) {
        match event {
            request_response::Event::Message {
                peer,
                message:
                    request_response::Message::Request {
                        request, channel, ..
                    },
                ..
            } => {
                self.seen(peer);
                let job = InboundJob {
                    peer,
                    call: request,
                    channel,
                    tx: self.self_tx.clone(),
                };
                let refused = match &self.inbound_jobs {
                    Some(inbound) => match inbound.try_send(job) {
                        Ok(()) => None,
                        Err(mpsc::error::TrySendError::Full(job))
                        | Err(mpsc::error::TrySendError::Closed(job)) => Some(job),
                    },
                    None => Some(job),
                };
                if let Some(job) = refused {
                    let _ = self
                        .swarm
                        .behaviour_mut()
                        .jobs
                        .send_response(job.channel, JobReply::Busy { retry_after_s: 1 });
                }
            }
            request_response::Event::Message {
                message:
                    request_response::Message::Response {
                        request_id,
                        response,
                    },
                ..
            } => {
                if let Some((job, reply)) = self.job_calls.remove(&request_id) {
                    self.delta_sinks.remove(&job);
                    let _ = reply.send(Ok(response));
                }
            }
            request_response::Event::OutboundFailure {
                peer,
                request_id,
                error,
                ..
            } => {
                if let Some((job, reply)) = self.job_calls.remove(&request_id) {
                    self.delta_sinks.remove(&job);
                    let _ = reply.send(Err(NetError::Peer {
                        peer,
                        reason: error.to_string(),
                    }));
                }
            }
            request_response::Event::InboundFailure { peer, error, .. } => {
                debug!(%peer, %error, "inbound job call failed");
            }
            request_response::Event::ResponseSent { .. } => {}
        }
    }

    fn on_delta_event(&mut self, event: request_response::Event<JobDelta, DeltaAck>) {
        match event {
            request_response::Event::Message {
                peer,
                message:
                    request_response::Message::Request {
                        request, channel, ..
                    },
                ..
            } => {
                // Only the host the job was forwarded to may stream into it.
                let sink = self
                    .delta_sinks
                    .get(&request.job)
                    .filter(|(host, _)| *host == peer)
                    .map(|(_, sink)| sink.clone());
                let Some(sink) = sink else {
                    let _ = self
                        .swarm
                        .behaviour_mut()
                        .deltas
                        .send_response(channel, DeltaAck::Stop);
                    return;
                };
                // Waits for room in the sink off the loop: a slow client slows its host's
                // stream, nothing else.
                let tx = self.self_tx.clone();
                tokio::spawn(async move {
                    let ack = match sink.send(request).await {
                        Ok(()) => DeltaAck::Ok,
                        Err(_) => DeltaAck::Stop,
                    };
                    let _ = tx.send(Command::RespondDelta { channel, ack }).await;
                });
            }
            request_response::Event::Message {
                message:
                    request_response::Message::Response {
                        request_id,
                        response,
                    },
                ..
            } => {
                if let Some(reply) = self.delta_sends.remove(&request_id) {
                    let _ = reply.send(Ok(response));
                }
            }
            request_response::Event::OutboundFailure {
                peer,
                request_id,
                error,
                ..
            } => {
                if let Some(reply) = self.delta_sends.remove(&request_id) {
                    let _ = reply.send(Err(NetError::Peer {
                        peer,
                        reason: error.to_string(),
                    }));
                }
            }
            _ => {}
        }
    }

    /// Validates a gossiped record; stores it if valid and new.
    fn on_record_message(&mut self, data: &[u8]) -> MessageAcceptance {
        let verified = match SignedRecord::from_wire(data).and_then(SignedRecord::verify) {
            Ok(v) => v,
            Err(e) => {
                debug!(error = %e, "invalid record");
                return MessageAcceptance::Reject;
            }
        };
        match self.store.put(vec![verified]) {
            Ok(outcome) => match outcome.first() {
                Some(PutOutcome::Stored) => MessageAcceptance::Accept,
                Some(PutOutcome::Duplicate) => MessageAcceptance::Ignore,
                Some(PutOutcome::Conflict { .. }) => MessageAcceptance::Reject,
                None => MessageAcceptance::Ignore,
            },
            Err(e) => {
                warn!(error = %e, "cannot store a gossiped record; anti-entropy will retry");
                MessageAcceptance::Ignore
            }
        }
    }

    fn on_heartbeat_message(&mut self, source: Option<PeerId>, data: &[u8]) -> MessageAcceptance {
        let heartbeat = match codec::decode_with_limit::<Heartbeat>(data, MAX_HEARTBEAT_BYTES) {
            Ok(h) if h.validate().is_ok() && Some(h.peer) == source => h,
            _ => return MessageAcceptance::Reject,
        };
        let peer = heartbeat.peer;
        self.seen(peer);
        if let Some(status) = self.peers.get_mut(&peer) {
            status.heartbeat = Some(heartbeat.clone());
        }
        let entry = PeerEntry {
            peer,
            addrs: Vec::new(),
            last_seen_ms: now_ms(),
            heartbeat: Some(heartbeat),
        };
        if let Err(e) = self.store.put_peer(&entry) {
            warn!(error = %e, "cannot remember a peer");
        }
        MessageAcceptance::Accept
    }

    fn send_heartbeat(&mut self) {
        let local = *self.swarm.local_peer_id();
        let records_seq = self.store.origin_state(&local).map_or(0, |s| s.max);
        let offer = self
            .offer
            .as_ref()
            .map(|o| o.borrow().clone())
            .unwrap_or_default();
        let mut models = offer.models;
        models.truncate(metainf_protocol::heartbeat::MAX_HEARTBEAT_MODELS);
        let heartbeat = Heartbeat {
            peer: local,
            sent_at_ms: now_ms(),
            queue_depth: offer.queue_depth.min(offer.queue_capacity),
            running_jobs: offer.running_jobs,
            queue_capacity: offer.queue_capacity,
            models,
            price_per_hour: self.config.price_per_hour,
            free_memory_bytes: available_memory_bytes(),
            hardware: self.hardware,
            profile: Some(self.profile.clone()),
            records_seq,
        };
        if let Ok(bytes) = codec::encode(&heartbeat) {
            // No peers yet is not an error.
            let _ = self
                .swarm
                .behaviour_mut()
                .gossipsub
                .publish(self.heartbeats.clone(), bytes);
        }
    }

    fn start_sync_round(&mut self) {
        let peers: Vec<PeerId> = self.swarm.connected_peers().copied().collect();
        for peer in peers {
            self.request_summary(peer);
        }
    }

    fn request_summary(&mut self, peer: PeerId) {
        match self.store.version_vector() {
            Ok(vector) => {
                self.swarm
                    .behaviour_mut()
                    .sync
                    .send_request(&peer, SyncRequest::Summary { vector });
            }
            Err(e) => warn!(error = %e, "cannot read the version vector"),
        }
    }

    fn answer_sync(&mut self, request: SyncRequest) -> SyncResponse {
        match request {
            SyncRequest::Summary { .. } => match self.store.version_vector() {
                Ok(vector) => SyncResponse::Summary { vector },
                Err(e) => SyncResponse::Error(e.to_string()),
            },
            SyncRequest::Pull {
                origin,
                after,
                limit,
            } => {
                let limit = limit.clamp(1, MAX_PAGE) as usize;
                match self.store.records_after(&origin, after, limit) {
                    Ok(page) => SyncResponse::Page {
                        records: page.records,
                        next_after: page.next_after,
                    },
                    Err(e) => SyncResponse::Error(e.to_string()),
                }
            }
        }
    }

    fn on_sync_response(
        &mut self,
        peer: PeerId,
        request_id: OutboundRequestId,
        response: SyncResponse,
    ) {
        match response {
            SyncResponse::Summary { vector } => {
                let ours: BTreeMap<PeerId, u64> = self.store.version_vector().unwrap_or_default();
                for (origin, theirs) in vector {
                    let have = ours.get(&origin).copied().unwrap_or(0);
                    if theirs > have {
                        self.queue_pull(peer, origin, have);
                    }
                }
                self.drive_pulls();
            }
            SyncResponse::Page {
                records,
                next_after,
            } => {
                let Some((peer, origin)) = self.pulls.remove(&request_id) else {
                    return;
                };
                // Verify and store off the event loop; the next page is requested when done.
                let store = self.store.clone();
                let tx = self.self_tx.clone();
                tokio::spawn(async move {
                    // ~50 µs of ed25519 per record: on the blocking pool, not a runtime worker.
                    let checked = tokio::task::spawn_blocking(move || {
                        let mut verified = Vec::with_capacity(records.len());
                        let mut rejected = 0usize;
                        for r in records {
                            match r.verify() {
                                Ok(v) if v.origin() == origin => verified.push(v),
                                _ => rejected += 1,
                            }
                        }
                        (verified, rejected)
                    })
                    .await;
                    let (verified, rejected) = checked.unwrap_or_default();
                    if rejected > 0 {
                        warn!(%peer, rejected, "sync page held invalid records");
                    }
                    let ok = !verified.is_empty() && store.put_async(verified).await.is_ok();
                    let next_after = if ok && rejected == 0 {
                        next_after
                    } else {
                        None
                    };
                    let _ = tx
                        .send(Command::PageStored {
                            peer,
                            origin,
                            next_after,
                        })
                        .await;
                });
            }
            SyncResponse::Error(e) => {
                warn!(%peer, error = %e, "peer could not serve a sync request");
                if let Some((peer, origin)) = self.pulls.remove(&request_id) {
                    self.pulling.remove(&(peer, origin));
                }
            }
        }
    }

    fn queue_pull(&mut self, peer: PeerId, origin: PeerId, after: u64) {
        // One pull per origin at a time across all peers: no duplicate downloads.
        if self.pulling.iter().any(|(_, o)| *o == origin) {
            return;
        }
        self.pulling.insert((peer, origin));
        self.pull_queue.push_back((peer, origin, after));
    }

    fn drive_pulls(&mut self) {
        while self.pulls.len() < MAX_PULLS_IN_FLIGHT {
            let Some((peer, origin, after)) = self.pull_queue.pop_front() else {
                break;
            };
            let id = self.swarm.behaviour_mut().sync.send_request(
                &peer,
                SyncRequest::Pull {
                    origin,
                    after,
                    limit: self.config.page_size.clamp(1, MAX_PAGE),
                },
            );
            self.pulls.insert(id, (peer, origin));
        }
    }
}
