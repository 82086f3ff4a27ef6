//! The node's libp2p transport: gossip, anti-entropy, the DHT, job forwarding and NAT
//! traversal, translated into domain events.
//!
//! Shape (as rust-libp2p's file-sharing example): [`start`] returns a cloneable [`Client`], an
//! [`EventLoop`] and a receiver of [`NetEvent`]s. The client sends commands with oneshot replies
//! over a bounded channel; the loop is one `select!` over swarm events, commands and timers, and
//! translates swarm events into domain events before anything else sees them. The loop touches
//! no disk: the replica (`crate::replica`) checks and stores what arrives and reports back.
//!
//! | file | concern |
//! |---|---|
//! | `config.rs` | `[network]` settings, [`NetError`] |
//! | `client.rs` | [`Client`] and the loop's commands |
//! | `event.rs` | [`NetEvent`] and the handles that answer events |
//! | `behaviour.rs` | the behaviours, swarm building, gossipsub peer scoring |
//! | `event_loop.rs` | the loop, connections, peer liveness |
//! | `gossip.rs` | records and heartbeats topics, validation verdicts |
//! | `anti_entropy.rs` + `sync.rs` | version vectors and paged pulls; its wire types |
//! | `job_transport.rs` + `jobs.rs` | job calls and streamed deltas; their wire types |
//! | `state.rs` | `/metainf/state/1`: a host's state now, asked for directly |
//! | `nat.rs` | relays, hole punching, direct dials |
//! | `frame.rs` | the length-prefixed, size-limited codec of every request-response protocol |
//!
//! - **Gossip** (`metainf/records/1`, `metainf/heartbeats/2`): messages are validated before
//!   they are forwarded (gossipsub's manual validation): size, decoding, signature, signer =
//!   origin, value ranges, dedup against the store. Invalid records are rejected and count
//!   against the sender's peer score.
//! - **Anti-entropy** (`/metainf/sync/2`): on connecting and then periodically, peers compare
//!   version vectors by range digest (a few kilobytes a round whatever the network's size),
//!   page through the buckets that differ, pull what they lack in bounded pages, and exchange
//!   proofs of equivocation when their convicted sets differ.
//! - **Evidence** (`metainf/evidence/1`): a proof that an origin signed two records under one
//!   seq. A record that conflicts with a stored one is ignored, not rejected (the relay may be
//!   honest); the proof is gossiped, every node deletes the origin's records, refuses its next
//!   ones and [`Client::ban`]s it: no heartbeat, connection or job of it is accepted.
//! - **Heartbeats that scale**: each node announces every `max(interval, N / budget)` seconds
//!   (`heartbeat_budget_per_s`, default 2 a second per node whatever `N`), four times as rarely
//!   with nothing to offer; a peer counts as alive for three of its announced intervals. A
//!   router asks its best candidates directly (`/metainf/state/1`) when their state is stale.
//! - **Kademlia** (server mode): peer routing, bootstrap, provider records for served models.

mod anti_entropy;
mod behaviour;
mod client;
mod config;
mod event;
mod event_loop;
mod frame;
mod gossip;
mod job_transport;
mod jobs;
mod nat;
pub mod state;
mod sync;

use std::collections::{HashMap, HashSet, VecDeque};

use libp2p::gossipsub::IdentTopic;
use libp2p::identity::Keypair;
use libp2p::swarm::dial_opts::DialOpts;
use libp2p::{Multiaddr, PeerId, Swarm};
use metainf_protocol::HardwareProfile;
use tokio::sync::mpsc;
use tokio_util::task::TaskTracker;
use tracing::warn;

pub use client::Client;
pub use config::{NetError, NetworkConfig};
pub use event::{
    GossipRecord, GossipTicket, GossipVerdict, InboundJob, InboundSync, NatStatus, NetCounters,
    NetEvent, Offer, PeerStatus, Topic,
};
pub use event_loop::EventLoop;
pub use jobs::{DeltaAck, JobCall, JobDelta, JobReply};
pub use sync::{
    MAX_EVIDENCE_PAGE, MAX_PAGE, MAX_SUMMARY, SUMMARY_BUCKETS, SyncRequest, SyncResponse,
    VersionEntry, bucket_digests, bucket_of, convicted_digest, summary_page,
};

use nat::{circuit_relay, last_peer_id};

/// Gossip topic of performance records.
pub const RECORDS_TOPIC: &str = "metainf/records/1";
/// Gossip topic of heartbeats.
pub const HEARTBEATS_TOPIC: &str = "metainf/heartbeats/2";
/// Gossip topic of proofs of equivocation.
pub const EVIDENCE_TOPIC: &str = "metainf/evidence/1";
/// Largest heartbeat accepted.
pub const MAX_HEARTBEAT_BYTES: usize = 32 * 1024;
/// Events waiting for the node before the loop sheds them (see [`event`]).
const EVENT_CAPACITY: usize = 4096;

/// Dials the bootstrap peers (at start, and again whenever the node finds itself alone) and
/// starts a Kademlia bootstrap through them.
fn dial_bootstrap(swarm: &mut Swarm<behaviour::Behaviour>, bootstrap: &[Multiaddr]) {
    for addr in bootstrap {
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
    if !bootstrap.is_empty() {
        let _ = swarm.behaviour_mut().kad.bootstrap();
    }
}

/// Starts the swarm: listens, dials the bootstrap peers, subscribes to the topics.
pub fn start(
    key: Keypair,
    profile: HardwareProfile,
    config: NetworkConfig,
) -> Result<(Client, EventLoop, mpsc::Receiver<NetEvent>), NetError> {
    let peer_id = key.public().to_peer_id();
    let hardware = profile
        .id()
        .map_err(|e| NetError::Setup(format!("hardware profile: {e}")))?;
    let mut swarm = behaviour::build_swarm(key, &config)?;
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
    let evidence = IdentTopic::new(EVIDENCE_TOPIC);
    for topic in [&records, &heartbeats, &evidence] {
        swarm
            .behaviour_mut()
            .gossipsub
            .subscribe(topic)
            .map_err(|e| NetError::Setup(e.to_string()))?;
    }
    for addr in &config.external_addresses {
        swarm.add_external_address(addr.clone());
    }
    dial_bootstrap(&mut swarm, &config.bootstrap);
    let (tx, rx) = mpsc::channel(256);
    let (events, events_rx) = mpsc::channel(EVENT_CAPACITY);
    let client = Client {
        tx: tx.clone(),
        peer_id,
    };
    let event_loop = EventLoop {
        swarm,
        config,
        hardware,
        profile,
        events,
        offer: None,
        records_seq: None,
        job_calls: HashMap::new(),
        delta_sinks: HashMap::new(),
        delta_sends: HashMap::new(),
        commands: rx,
        self_tx: tx,
        records,
        heartbeats,
        evidence,
        banned: HashSet::new(),
        peers: HashMap::new(),
        connections: HashMap::new(),
        deferred_listens,
        pending_providers: HashMap::new(),
        pulls: HashMap::new(),
        pull_queue: VecDeque::new(),
        pulling: HashMap::new(),
        sync_calls: HashMap::new(),
        broken_promises: HashMap::new(),
        distrusted: HashMap::new(),
        direct_addrs: HashMap::new(),
        direct_attempts: HashMap::new(),
        tasks: TaskTracker::new(),
        state_calls: HashMap::new(),
        counters: NetCounters::default(),
        state_queries: HashMap::new(),
        state_answers: (std::time::Instant::now(), 0),
        connected_since: HashMap::new(),
        last_used: HashMap::new(),
        parked: HashMap::new(),
        trimming: HashSet::new(),
        calls: HashMap::new(),
        last_bootstrap: std::time::Instant::now(),
        lost_ms: HashMap::new(),
    };
    Ok((client, event_loop, events_rx))
}
