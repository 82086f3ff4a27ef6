//! What the network tells the rest of the node: domain events, and the handles that answer them.
//!
//! The event loop translates swarm events into [`NetEvent`]s and never waits on their consumer:
//! an event that finds the channel full is answered on the spot the cheapest safe way (a gossip
//! record is ignored and anti-entropy fetches it later, a job call is answered `Busy`, a sync
//! request gets an error, a page pulled is dropped and pulled again on the next round).

use libp2p::gossipsub::MessageId;
use libp2p::request_response::ResponseChannel;
use libp2p::{Multiaddr, PeerId};
use metainf_protocol::{Heartbeat, ModelDescriptor, SignedRecord};
use serde::Serialize;
use tokio::sync::mpsc;

use super::client::Command;
use super::jobs::{JobCall, JobReply};
use super::sync::{SyncRequest, SyncResponse};

/// A domain event from the network.
#[derive(Debug)]
#[non_exhaustive]
pub enum NetEvent {
    /// A record arrived by gossip, unchecked. Gossipsub holds it back from other peers until its
    /// verdict is reported with [`Client::report_record`](super::Client::report_record), so
    /// nothing invalid is forwarded.
    Record(GossipRecord),
    /// A proof of equivocation arrived by gossip, unchecked; report its verdict as a record's.
    Evidence(GossipRecord),
    /// A valid heartbeat (size-checked, decoded, in range, from the peer it names).
    Heartbeat(Box<Heartbeat>),
    /// The first connection to a peer opened.
    PeerUp(PeerId),
    /// The last connection to a peer closed.
    PeerDown(PeerId),
    /// A peer asks this node to run a job.
    Job(Box<InboundJob>),
    /// A peer asks for this node's version vector or a page of its records.
    SyncRequest(Box<InboundSync>),
    /// Time to compare version vectors with these peers (through
    /// [`Client::sync_call`](super::Client::sync_call)).
    SyncDue(Vec<PeerId>),
    /// A page of records pulled from `peer`, unchecked: verify and store it, then report with
    /// [`Client::page_stored`](super::Client::page_stored) (which asks for the next page).
    SyncPage {
        /// The peer that served it.
        peer: PeerId,
        /// The origin whose records these claim to be.
        origin: PeerId,
        /// The records.
        records: Vec<SignedRecord>,
        /// Where the next page starts, if there is more.
        next_after: Option<u64>,
    },
}

/// A gossiped record waiting for its verdict.
#[derive(Debug)]
pub struct GossipRecord {
    /// The wire bytes, as received (at most the gossip size limit).
    pub data: Vec<u8>,
    /// Which message to report on.
    pub ticket: GossipTicket,
}

/// Names one gossip message for [`Client::report_record`](super::Client::report_record).
#[derive(Clone, Debug)]
pub struct GossipTicket {
    pub(super) message_id: MessageId,
    /// The peer it came from (not necessarily its author).
    pub source: PeerId,
}

/// The gossip topics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Topic {
    /// Performance records ([`super::RECORDS_TOPIC`]).
    Records,
    /// Heartbeats ([`super::HEARTBEATS_TOPIC`]).
    Heartbeats,
    /// Proofs of equivocation ([`super::EVIDENCE_TOPIC`]).
    Evidence,
}

/// What a gossip message deserves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GossipVerdict {
    /// Valid and new: forward it.
    Accept,
    /// Valid but known, or not checkable now: do not forward, do not penalise.
    Ignore,
    /// Invalid: do not forward, and count it against the sender's score.
    Reject,
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
    /// Live load of its serving engine.
    pub load: Option<metainf_protocol::HostLoad>,
    /// What its prefix cache holds (shared: heartbeats and state answers clone it often).
    pub cache: Option<std::sync::Arc<metainf_protocol::CacheSummary>>,
}

/// A job call from a peer, to be answered through [`InboundJob::respond`].
#[derive(Debug)]
pub struct InboundJob {
    /// The peer that forwarded it.
    pub peer: PeerId,
    /// What to run.
    pub call: JobCall,
    pub(super) channel: ResponseChannel<JobReply>,
    pub(super) tx: mpsc::Sender<Command>,
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

/// A sync request from a peer, to be answered through [`InboundSync::respond`].
#[derive(Debug)]
pub struct InboundSync {
    /// The peer that asks.
    pub peer: PeerId,
    /// What it asks for.
    pub request: SyncRequest,
    pub(super) channel: ResponseChannel<SyncResponse>,
    pub(super) tx: mpsc::Sender<Command>,
}

impl InboundSync {
    /// Sends the answer back to the peer (a peer that has gone is ignored).
    pub async fn respond(self, response: SyncResponse) {
        let _ = self
            .tx
            .send(Command::RespondSync {
                channel: self.channel,
                response: Box::new(response),
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

/// What the transport has done since it started: for operators (`/metrics`) and for the
/// network bench, which tells steady traffic from connection churn by them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct NetCounters {
    /// Heartbeats taken in (from gossip and state answers).
    pub heartbeats_received: u64,
    /// Connections established (every one, dialled or accepted).
    pub connections_opened: u64,
    /// Of those, the ones this node dialled.
    pub connections_dialled: u64,
    /// Connections closed.
    pub connections_closed: u64,
    /// Peers this node disconnected to keep within `max_peers`.
    pub connections_trimmed: u64,
    /// State queries sent (`/metainf/state/1`).
    pub state_queries_sent: u64,
    /// State queries answered.
    pub state_queries_answered: u64,
    /// Sync requests sent (`/metainf/sync/2`: summaries, pages, pulls).
    pub sync_requests_sent: u64,
    /// Kademlia bootstraps finished (the node's own and Kademlia's automatic ones).
    pub kad_bootstraps: u64,
}

impl NetCounters {
    /// Every counter with its name (as `/metrics` labels it), one list for all who read them.
    pub fn named(&self) -> [(&'static str, u64); 9] {
        [
            ("heartbeats_received", self.heartbeats_received),
            ("connections_opened", self.connections_opened),
            ("connections_dialled", self.connections_dialled),
            ("connections_closed", self.connections_closed),
            ("connections_trimmed", self.connections_trimmed),
            ("state_queries_sent", self.state_queries_sent),
            ("state_queries_answered", self.state_queries_answered),
            ("sync_requests_sent", self.sync_requests_sent),
            ("kad_bootstraps", self.kad_bootstraps),
        ]
    }
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
    /// Whether a job or query can reach it: connected, or heard from since this node closed
    /// an idle connection to it or last heard of it (never when the last connection was lost
    /// or a dial failed, until it is heard from again).
    pub reachable: bool,
    /// Whether it was heard from within the timeout ([`crate::clock::is_alive`]).
    pub alive: bool,
    /// Last time it was heard from, Unix milliseconds.
    pub last_seen_ms: u64,
    /// Its gossipsub peer score (negative after invalid messages), when connected.
    pub score: Option<f64>,
    /// Not synced with for a while: its sync summaries promised records it did not send.
    pub distrusted: bool,
    /// Its latest heartbeat.
    #[serde(skip)]
    pub heartbeat: Option<Heartbeat>,
}
