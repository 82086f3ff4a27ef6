//! The `[network]` section of the configuration and the network layer's errors.

use libp2p::{Multiaddr, PeerId};
use serde::{Deserialize, Serialize};

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
    /// Seconds between heartbeats in a small network.
    pub heartbeat_interval_s: u64,
    /// Heartbeats a second the whole network may cost each node: in a network of `N` nodes
    /// each announces every `max(heartbeat_interval_s, N / budget)` seconds, so per-node
    /// traffic stays flat as the network grows (0 = always `heartbeat_interval_s`). Routers
    /// ask candidate hosts directly for state they hold stale.
    pub heartbeat_budget_per_s: f64,
    /// A peer silent for this many seconds counts as gone.
    pub peer_timeout_s: u64,
    /// Seconds between anti-entropy rounds.
    pub anti_entropy_interval_s: u64,
    /// Records per anti-entropy page.
    pub page_size: u32,
    /// Price per hour of this node's compute, announced in heartbeats.
    pub price_per_hour: f64,
    /// Peers to stay connected to (0 = no limit). Past it the connections used least are
    /// closed (never one with a call in flight, a bootstrap peer or one younger than the grace
    /// period), and more than twice as many connections (1.5× inbound) are refused outright,
    /// so a large network costs each node a bounded number of sockets. Peers are still heard
    /// through gossip and dialled again when a job or state query needs them.
    pub max_peers: u32,
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
            heartbeat_budget_per_s: 2.0,
            peer_timeout_s: 30,
            anti_entropy_interval_s: 30,
            page_size: 1000,
            price_per_hour: 0.0,
            max_peers: 50,
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
