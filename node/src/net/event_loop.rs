//! The event loop: one `select!` over swarm events, commands and timers. It owns the swarm and
//! the transport's own state (connections, pulls in flight, job calls, delta sinks) and touches
//! no disk: everything the tensor needs is a [`NetEvent`] for the replica.
//!
//! Its concerns are split by file: gossip (`gossip.rs`), anti-entropy (`anti_entropy.rs`), job
//! transport (`job_transport.rs`), NAT and direct dials (`nat.rs`).

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use futures::StreamExt;
use libp2p::gossipsub::IdentTopic;
use libp2p::kad;
use libp2p::request_response::OutboundRequestId;
use libp2p::swarm::SwarmEvent;
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::{Multiaddr, PeerId, Swarm, autonat, dcutr, identify, mdns, relay};
use metainf_protocol::{HardwareId, HardwareProfile, JobId};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info};

use super::behaviour::{Behaviour, BehaviourEvent};
use super::client::Command;
use super::config::{NetError, NetworkConfig};
use super::event::{NatStatus, NetEvent, Offer, PeerStatus, Topic};
use super::jobs::{DeltaAck, JobDelta, JobReply};
use super::sync::SyncResponse;
use crate::clock::{is_alive, now_ms};

/// Where a job call's answer goes.
pub(super) type JobAnswer = oneshot::Sender<Result<JobReply, NetError>>;

/// Most peers the loop remembers at once (connected ones are always kept).
const MAX_KNOWN_PEERS: usize = 10_000;

/// How often connections are trimmed to `max_peers`; twice this is the grace period of a new
/// or just used connection.
fn trim_period(config: &NetworkConfig) -> Duration {
    Duration::from_secs(config.heartbeat_interval_s.clamp(1, 10))
}

/// The network's event loop. Run it with [`EventLoop::run`].
pub struct EventLoop {
    pub(super) swarm: Swarm<Behaviour>,
    pub(super) config: NetworkConfig,
    pub(super) hardware: HardwareId,
    pub(super) profile: HardwareProfile,
    /// Where domain events go (never awaited: see [`super::event`]).
    pub(super) events: mpsc::Sender<NetEvent>,
    /// What the heartbeats announce.
    pub(super) offer: Option<watch::Receiver<Offer>>,
    /// The highest sequence number of this node's own records, for the heartbeats.
    pub(super) records_seq: Option<watch::Receiver<u64>>,
    /// Outstanding job calls: request → (job, answer).
    pub(super) job_calls: HashMap<OutboundRequestId, (JobId, PeerId, JobAnswer)>,
    /// Where the deltas of a streaming job forwarded from here go: job → (host, sink).
    pub(super) delta_sinks: HashMap<JobId, (PeerId, mpsc::Sender<JobDelta>)>,
    /// Outstanding deltas sent from here.
    pub(super) delta_sends: HashMap<OutboundRequestId, oneshot::Sender<Result<DeltaAck, NetError>>>,
    pub(super) commands: mpsc::Receiver<Command>,
    pub(super) self_tx: mpsc::Sender<Command>,
    pub(super) records: IdentTopic,
    pub(super) heartbeats: IdentTopic,
    pub(super) evidence: IdentTopic,
    /// Peers convicted of equivocation: disconnected on sight, their heartbeats ignored.
    pub(super) banned: HashSet<PeerId>,
    pub(super) peers: HashMap<PeerId, PeerStatus>,
    /// Circuit listen addresses waiting for their relay's connection.
    pub(super) deferred_listens: Vec<(PeerId, Multiaddr)>,
    /// Open connections per peer, and whether each goes through a relay.
    pub(super) connections: HashMap<PeerId, HashMap<libp2p::swarm::ConnectionId, bool>>,
    pub(super) pending_providers:
        HashMap<kad::QueryId, (oneshot::Sender<HashSet<PeerId>>, HashSet<PeerId>)>,
    /// Outstanding pull requests: request → (peer, origin, after).
    pub(super) pulls: HashMap<OutboundRequestId, (PeerId, PeerId, u64)>,
    /// Pulls waiting for a slot: (peer, origin, after).
    pub(super) pull_queue: VecDeque<(PeerId, PeerId, u64)>,
    /// Origins with a pull queued, in flight or being stored → the peer it goes to.
    pub(super) pulling: HashMap<PeerId, PeerId>,
    /// Sync calls waiting for their answer.
    pub(super) sync_calls:
        HashMap<OutboundRequestId, oneshot::Sender<Result<SyncResponse, NetError>>>,
    /// Pull answers per peer that lacked what its summary promised.
    pub(super) broken_promises: HashMap<PeerId, u32>,
    /// Peers not asked anything until then (see `anti_entropy.rs`).
    pub(super) distrusted: HashMap<PeerId, Instant>,
    /// Each connected peer's own listen addresses that do not go through a relay (from
    /// identify), for a direct dial when a hole punch fails.
    pub(super) direct_addrs: HashMap<PeerId, Vec<Multiaddr>>,
    /// When a direct dial to a relayed-only peer was last started.
    pub(super) direct_attempts: HashMap<PeerId, Instant>,
    /// Tasks the loop started (deltas waiting for a slow client), awaited when it stops.
    pub(super) tasks: TaskTracker,
    /// What the transport has done since the start.
    pub(super) counters: super::NetCounters,
    /// State queries waiting for their answer.
    pub(super) state_calls: HashMap<OutboundRequestId, super::state::StateAnswer>,
    /// State queries each connected peer sent this node in the current second: (window start,
    /// count).
    pub(super) state_queries: HashMap<PeerId, (Instant, u32)>,
    /// State queries this node answered in the current second, from all peers.
    pub(super) state_answers: (Instant, u32),
    /// When each connected peer's first open connection was established.
    pub(super) connected_since: HashMap<PeerId, Instant>,
    /// When a call (job, delta, state, sync) last went to or came from each connected peer.
    pub(super) last_used: HashMap<PeerId, Instant>,
    /// Known peers whose last connection closed, with the listen addresses they told: a later
    /// call dials them there (Kademlia forgets them, see [`EventLoop::trim_connections`]).
    pub(super) parked: HashMap<PeerId, Vec<Multiaddr>>,
    /// Peers whose connections this node is closing to stay within `max_peers`: still
    /// reachable once closed.
    pub(super) trimming: HashSet<PeerId>,
    /// Requests in flight per connected peer, both ways, over every request-response protocol:
    /// a connection with one is not trimmed.
    pub(super) calls: HashMap<PeerId, u32>,
    /// When the bootstrap peers were last dialled.
    pub(super) last_bootstrap: Instant,
    /// When each peer's last connection was lost or a dial to it failed (Unix ms): it is not
    /// reachable until heard from after that.
    pub(super) lost_ms: HashMap<PeerId, u64>,
}

impl EventLoop {
    /// Runs until `shutdown` is cancelled.
    pub async fn run(mut self, shutdown: CancellationToken) {
        // The first heartbeat at once, then each after the interval the network's size sets.
        let heartbeat = tokio::time::sleep(Duration::ZERO);
        tokio::pin!(heartbeat);
        let mut anti_entropy = tokio::time::interval(Duration::from_secs(
            self.config.anti_entropy_interval_s.max(1),
        ));
        anti_entropy.tick().await;
        let mut trim = tokio::time::interval(trim_period(&self.config));
        trim.tick().await;
        loop {
            tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                Some(command) = self.commands.recv() => self.on_command(command),
                event = self.swarm.select_next_some() => self.on_swarm_event(event),
                () = &mut heartbeat => {
                    self.send_heartbeat();
                    self.upgrade_relayed();
                    self.prune_peers();
                    heartbeat.as_mut().reset(tokio::time::Instant::now() + self.heartbeat_interval());
                }
                _ = anti_entropy.tick() => self.start_sync_round(),
                _ = trim.tick() => self.trim_connections(),
            }
        }
        // Tasks still answering through the loop see it gone at once.
        let Self {
            commands,
            tasks,
            swarm,
            events,
            ..
        } = self;
        drop((commands, swarm, events));
        tasks.close();
        let _ = tokio::time::timeout(Duration::from_secs(5), tasks.wait()).await;
        info!("network stopped");
    }

    /// Hands an event to the node without waiting; gives it back when the channel is full or
    /// closed, for the caller to answer the cheap way.
    #[allow(clippy::result_large_err)] // the event is given back, not an error to propagate
    pub(super) fn emit(&self, event: NetEvent) -> Result<(), NetEvent> {
        self.events.try_send(event).map_err(|e| {
            if matches!(e, mpsc::error::TrySendError::Full(_)) {
                debug!("network events are backed up; shedding one");
            }
            e.into_inner()
        })
    }

    fn on_command(&mut self, command: Command) {
        match command {
            Command::Gossip {
                topic,
                bytes,
                reply,
            } => {
                let _ = reply.send(self.gossip(topic, bytes));
            }
            Command::PublishBytes {
                topic,
                bytes,
                reply,
            } => {
                let topic = self.topic(topic);
                let result = self
                    .swarm
                    .behaviour_mut()
                    .gossipsub
                    .publish(topic, bytes)
                    .map(|_| ())
                    .map_err(|e| NetError::Publish(e.to_string()));
                let _ = reply.send(result);
            }
            Command::ReportRecord { ticket, verdict } => self.report_record(ticket, verdict),
            Command::Peers { reply } => {
                let _ = reply.send(self.peer_list());
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
            Command::QueryState { peer, reply } => self.query_state(peer, reply),
            Command::Counters { reply } => {
                let _ = reply.send(self.counters);
            }
            Command::SyncCall {
                peer,
                request,
                reply,
            } => self.sync_call(peer, *request, reply),
            Command::Ban { peer } => self.ban(peer),
            Command::AbandonJob { peer, job } => self.abandon_job(peer, job),
            Command::Pull {
                peer,
                origin,
                after,
            } => {
                self.queue_pull(peer, origin, after);
                self.drive_pulls();
            }
            Command::PageStored {
                peer,
                origin,
                next_after,
            } => self.page_stored(peer, origin, next_after),
            Command::RespondSync { channel, response } => {
                let _ = self
                    .swarm
                    .behaviour_mut()
                    .sync
                    .send_response(channel, *response);
            }
            Command::SetOffer { offer } => {
                self.offer = Some(offer);
                self.send_heartbeat();
            }
            Command::SetRecordsSeq { seq } => self.records_seq = Some(seq),
            Command::CallJob {
                peer,
                call,
                deltas,
                reply,
            } => self.call_job(peer, *call, deltas, reply),
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
                self.sending(peer);
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
        }
    }

    pub(super) fn topic(&self, topic: Topic) -> IdentTopic {
        match topic {
            Topic::Records => self.records.clone(),
            Topic::Heartbeats => self.heartbeats.clone(),
            Topic::Evidence => self.evidence.clone(),
        }
    }

    /// Every peer heard from, with its connection state and liveness now: alive when heard
    /// from within the peer timeout, or within three of the heartbeat intervals it announced
    /// (longer in a large network).
    fn peer_list(&self) -> Vec<PeerStatus> {
        let now = now_ms();
        let mut peers: Vec<PeerStatus> = self
            .peers
            .values()
            .cloned()
            .map(|mut p| {
                p.connected = self.swarm.is_connected(&p.peer);
                p.reachable = self.reachable(&p);
                p.direct = self
                    .connections
                    .get(&p.peer)
                    .is_some_and(|c| c.values().any(|relayed| !relayed));
                p.score = self.swarm.behaviour().gossipsub.peer_score(&p.peer);
                p.distrusted = self
                    .distrusted
                    .get(&p.peer)
                    .is_some_and(|until| *until > Instant::now());
                let announced = p.heartbeat.as_ref().map_or(0, |h| h.interval_s);
                let timeout = self.config.peer_timeout_s.max(3 * u64::from(announced));
                p.alive = is_alive(p.last_seen_ms, now, Duration::from_secs(timeout));
                p
            })
            .collect();
        peers.sort_by_key(|p| p.peer);
        peers
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
                if self.banned.contains(&peer_id) {
                    debug!(peer = %peer_id, "closing a connection of a convicted peer");
                    let _ = self.swarm.disconnect_peer_id(peer_id);
                    return;
                }
                let relayed = endpoint
                    .get_remote_address()
                    .iter()
                    .any(|p| matches!(p, libp2p::multiaddr::Protocol::P2pCircuit));
                debug!(peer = %peer_id, addr = %endpoint.get_remote_address(), relayed, dialer = endpoint.is_dialer(), "connected");
                let c = &mut self.counters;
                c.connections_opened = c.connections_opened.saturating_add(1);
                if endpoint.is_dialer() {
                    c.connections_dialled = c.connections_dialled.saturating_add(1);
                }
                self.connections
                    .entry(peer_id)
                    .or_default()
                    .insert(connection_id, relayed);
                self.connected_since
                    .entry(peer_id)
                    .or_insert_with(Instant::now);
                self.lost_ms.remove(&peer_id);
                self.parked.remove(&peer_id);
                self.trimming.remove(&peer_id);
                self.listen_through(peer_id);
                self.seen(peer_id);
                if num_established.get() == 1 {
                    let _ = self.emit(NetEvent::PeerUp(peer_id));
                    let _ = self.emit(NetEvent::SyncDue(vec![peer_id]));
                    // A new peer's state is asked for at once, not waited for: heartbeats
                    // may be minutes apart in a large network.
                    let (reply, _) = oneshot::channel();
                    self.query_state(peer_id, reply);
                }
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                connection_id,
                num_established,
                ..
            } if num_established > 0 => {
                self.counters.connections_closed =
                    self.counters.connections_closed.saturating_add(1);
                if let Some(c) = self.connections.get_mut(&peer_id) {
                    c.remove(&connection_id);
                }
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                num_established: 0,
                ..
            } => {
                self.counters.connections_closed =
                    self.counters.connections_closed.saturating_add(1);
                self.connections.remove(&peer_id);
                let addrs = self.direct_addrs.remove(&peer_id).unwrap_or_default();
                if !self.banned.contains(&peer_id) {
                    self.parked.insert(peer_id, addrs);
                }
                self.direct_attempts.remove(&peer_id);
                debug!(peer = %peer_id, "disconnected");
                self.pull_queue.retain(|(p, _, _)| *p != peer_id);
                self.pulling.retain(|_, p| *p != peer_id);
                self.broken_promises.remove(&peer_id);
                self.state_queries.remove(&peer_id);
                self.connected_since.remove(&peer_id);
                self.last_used.remove(&peer_id);
                self.calls.remove(&peer_id);
                if !self.trimming.remove(&peer_id) {
                    self.lost_ms.insert(peer_id, now_ms());
                }
                let _ = self.emit(NetEvent::PeerDown(peer_id));
            }
            SwarmEvent::OutgoingConnectionError { peer_id, error, .. } => {
                debug!(peer = ?peer_id, ?error, "outgoing connection failed");
                // The peer's own failure, not a local limit or a dial this node gave up.
                let theirs = matches!(
                    error,
                    libp2p::swarm::DialError::Transport(_)
                        | libp2p::swarm::DialError::NoAddresses
                        | libp2p::swarm::DialError::WrongPeerId { .. }
                );
                if let Some(peer) = peer_id
                    && theirs
                    && !self.swarm.is_connected(&peer)
                {
                    self.lost_ms.insert(peer, now_ms());
                }
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

    /// Forgets peers that are not connected and were not heard from for ten peer timeouts, and
    /// beyond [`MAX_KNOWN_PEERS`] the longest silent of them: every identity that ever sent a
    /// heartbeat would otherwise stay in memory for good.
    fn prune_peers(&mut self) {
        let now = now_ms();
        let keep_ms = self
            .config
            .peer_timeout_s
            .saturating_mul(10_000)
            .max(60_000);
        let connected: HashSet<PeerId> = self.swarm.connected_peers().copied().collect();
        // A peer is kept at least for three of the heartbeat intervals it announced (long in
        // a large network), so that it is not forgotten between two of its heartbeats.
        self.peers.retain(|peer, status| {
            let announced = status.heartbeat.as_ref().map_or(0, |h| h.interval_s);
            let keep = keep_ms.max(3_000 * u64::from(announced));
            connected.contains(peer) || now.saturating_sub(status.last_seen_ms) < keep
        });
        self.state_queries
            .retain(|_, (start, _)| start.elapsed() < Duration::from_secs(1));
        // Trimmed and lost peers only while known.
        let known = &self.peers;
        self.parked.retain(|p, _| known.contains_key(p));
        self.trimming.retain(|p| connected.contains(p));
        self.lost_ms.retain(|p, _| known.contains_key(p));
        if self.peers.len() > MAX_KNOWN_PEERS {
            let mut silent: Vec<(u64, PeerId)> = self
                .peers
                .iter()
                .filter(|(p, _)| !connected.contains(p))
                .map(|(p, s)| (s.last_seen_ms, *p))
                .collect();
            silent.sort_unstable();
            let excess = self.peers.len() - MAX_KNOWN_PEERS;
            for (_, peer) in silent.into_iter().take(excess) {
                self.peers.remove(&peer);
            }
        }
    }

    /// Whether a job or a state query can reach `peer` (see [`PeerStatus::reachable`]): a
    /// connection closed by this node's trimming leaves it reachable, one closed otherwise or a
    /// failed dial not until it is heard from again.
    pub(super) fn reachable(&self, peer: &PeerStatus) -> bool {
        if self.banned.contains(&peer.peer) {
            return false;
        }
        // Heard from since: by when its latest heartbeat was sent, not when it arrived (a dead
        // peer's last heartbeat may still be travelling through gossip).
        let heard_ms = peer.heartbeat.as_ref().map_or(0, |h| h.sent_at_ms);
        self.swarm.is_connected(&peer.peer)
            || self
                .lost_ms
                .get(&peer.peer)
                .is_none_or(|lost| heard_ms > *lost)
    }

    /// Gives Kademlia's routing table an address of `peer`: into its bucket if the peer is
    /// there already or the bucket has room, never as a pending entry of a full bucket (which
    /// would dial the bucket's oldest disconnected entry; see `behaviour.rs`).
    pub(super) fn add_kad_address(&mut self, peer: PeerId, addr: Multiaddr) {
        let kad = &mut self.swarm.behaviour_mut().kad;
        let room = kad.kbucket(peer).is_none_or(|bucket| {
            bucket.num_entries() < kad::K_VALUE.get()
                || bucket.iter().any(|e| *e.node.key.preimage() == peer)
        });
        if room {
            kad.add_address(&peer, addr);
        }
    }

    /// Notes a call to or from `peer` now: a connection in use is not trimmed.
    fn used(&mut self, peer: PeerId) {
        if self.swarm.is_connected(&peer) {
            self.last_used.insert(peer, Instant::now());
        }
    }

    /// Notes a request about to be sent to `peer` (a call in flight until its answer or
    /// failure). A peer not connected whose addresses this node kept (its connection closed)
    /// is dialled here, from a fresh port: the request-response behaviour's own dial (which
    /// then waits for this one) would reuse the listen port, and the very connection just
    /// closed from it may still hold that address pair in TIME_WAIT.
    pub(super) fn sending(&mut self, peer: PeerId) {
        self.used(peer);
        let n = self.calls.entry(peer).or_insert(0);
        *n = n.saturating_add(1);
        if !self.swarm.is_connected(&peer)
            && let Some(addrs) = self.parked.get(&peer).filter(|a| !a.is_empty())
        {
            let opts = DialOpts::peer_id(peer)
                .addresses(addrs.clone())
                .condition(PeerCondition::DisconnectedAndNotDialing)
                .allocate_new_port()
                .build();
            if let Err(e) = self.swarm.dial(opts) {
                debug!(%peer, error = %e, "not dialling a parked peer");
            }
        }
    }

    /// Counts a request-response event into the calls in flight with its peer.
    fn used_by<Req, Resp>(&mut self, event: &libp2p::request_response::Event<Req, Resp>) {
        use libp2p::request_response::{Event, Message};
        let (peer, opened) = match event {
            Event::Message {
                peer,
                message: Message::Request { .. },
                ..
            } => (*peer, true),
            Event::Message { peer, .. }
            | Event::OutboundFailure { peer, .. }
            | Event::InboundFailure { peer, .. }
            | Event::ResponseSent { peer, .. } => (*peer, false),
        };
        self.used(peer);
        if opened {
            if self.swarm.is_connected(&peer) {
                let n = self.calls.entry(peer).or_insert(0);
                *n = n.saturating_add(1);
            }
        } else if let Some(n) = self.calls.get_mut(&peer) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.calls.remove(&peer);
            }
        }
    }

    /// Keeps the open connections within `max_peers` (and dials the bootstrap peers again when
    /// there are none): closes those of the peers used least
    /// long ago (connections in the gossipsub mesh last), sparing bootstrap peers, peers with a
    /// call in flight and peers connected or used within the grace period. Trimmed peers stay
    /// known and reachable: gossip still brings their heartbeats, and a job or state query
    /// dials them again.
    pub(super) fn trim_connections(&mut self) {
        let max = self.config.max_peers as usize;
        let connected: Vec<PeerId> = self.swarm.connected_peers().copied().collect();
        if connected.is_empty() {
            // Alone (a bootstrap peer was full, restarted or unreachable): try them again,
            // at most every ten seconds.
            if self.last_bootstrap.elapsed() >= Duration::from_secs(10) {
                self.last_bootstrap = Instant::now();
                super::dial_bootstrap(&mut self.swarm, &self.config.bootstrap);
            }
            return;
        }
        if max == 0 || connected.len() <= max {
            return;
        }
        let grace = 2 * trim_period(&self.config);
        let now = Instant::now();
        let mut busy: HashSet<PeerId> = self.calls.keys().copied().collect();
        busy.extend(self.job_calls.values().map(|(_, p, _)| *p));
        busy.extend(self.delta_sinks.values().map(|(p, _)| *p));
        busy.extend(self.pulls.values().map(|(p, _, _)| *p));
        busy.extend(self.pull_queue.iter().map(|(p, _, _)| *p));
        busy.extend(self.config.bootstrap.iter().filter_map(super::last_peer_id));
        let mesh: HashSet<PeerId> = self
            .swarm
            .behaviour()
            .gossipsub
            .all_mesh_peers()
            .copied()
            .collect();
        let mut idle: Vec<(bool, Instant, PeerId)> = connected
            .iter()
            .filter(|p| !busy.contains(p))
            .filter_map(|p| {
                let since = *self.connected_since.get(p)?;
                let used = self.last_used.get(p).copied().unwrap_or(since).max(since);
                (now.duration_since(used) >= grace).then_some((mesh.contains(p), used, *p))
            })
            .collect();
        idle.sort_unstable();
        let excess = connected.len() - max;
        for (_, _, peer) in idle.into_iter().take(excess) {
            debug!(%peer, "closing an idle connection (over max_peers)");
            self.trimming.insert(peer);
            self.counters.connections_trimmed = self.counters.connections_trimmed.saturating_add(1);
            let _ = self.swarm.disconnect_peer_id(peer);
        }
    }

    /// Stops dealing with a peer convicted of equivocation: forgets it, closes its
    /// connections, and from now on ignores its heartbeats and refuses its connections.
    fn ban(&mut self, peer: PeerId) {
        if peer == *self.swarm.local_peer_id() || !self.banned.insert(peer) {
            return;
        }
        info!(%peer, "banned a peer convicted of equivocation");
        self.peers.remove(&peer);
        self.state_queries.remove(&peer);
        self.parked.remove(&peer);
        self.swarm.behaviour_mut().kad.remove_peer(&peer);
        let _ = self.swarm.disconnect_peer_id(peer);
    }

    /// Notes that `peer` was heard from now.
    pub(super) fn seen(&mut self, peer: PeerId) {
        if self.banned.contains(&peer) {
            return;
        }
        let entry = self.peers.entry(peer).or_insert_with(|| PeerStatus {
            peer,
            connected: true,
            direct: false,
            reachable: true,
            alive: true,
            last_seen_ms: 0,
            score: None,
            distrusted: false,
            heartbeat: None,
        });
        entry.last_seen_ms = now_ms();
    }

    fn on_behaviour_event(&mut self, event: BehaviourEvent) {
        match event {
            BehaviourEvent::Gossipsub(event) => self.on_gossip_event(event),
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
                    self.add_kad_address(peer_id, addr);
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
                    self.add_kad_address(peer, addr.clone());
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
            BehaviourEvent::Sync(event) => {
                self.used_by(&event);
                self.on_sync_event(event);
            }
            BehaviourEvent::State(event) => {
                self.used_by(&event);
                self.on_state_event(event);
            }
            BehaviourEvent::Jobs(event) => {
                self.used_by(&event);
                self.on_job_event(event);
            }
            BehaviourEvent::Deltas(event) => {
                self.used_by(&event);
                self.on_delta_event(event);
            }
            BehaviourEvent::Kad(kad::Event::OutboundQueryProgressed {
                result: kad::QueryResult::Bootstrap(_),
                step,
                ..
            }) if step.last => {
                self.counters.kad_bootstraps = self.counters.kad_bootstraps.saturating_add(1);
                debug!("kademlia bootstrap done");
            }
            _ => {}
        }
    }
}
