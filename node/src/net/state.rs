//! `/metainf/state/1`: a router asks a host directly for its state now (its heartbeat as it
//! would send it: load, cache summary, offer) when the one it holds is stale. With heartbeats
//! growing rarer as the network grows (see `gossip.rs`), this is how decisions stay current:
//! a few direct questions to the best candidates, not everyone's state everywhere.
//!
//! The answer is checked as a gossiped heartbeat is (decoded within the heartbeat limit, in
//! range, naming the peer that answered) and kept as that peer's state if newer. Each peer may
//! ask this node at most [`MAX_QUERIES_PER_S`] times a second; more are dropped unanswered.

use std::time::{Duration, Instant};

use libp2p::StreamProtocol;
use libp2p::request_response::{self, OutboundRequestId};
use metainf_protocol::{Heartbeat, PeerId, codec};
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;
use tracing::debug;

use super::MAX_HEARTBEAT_BYTES;
use super::config::NetError;
use super::event_loop::EventLoop;

/// Protocol name.
pub(crate) const PROTOCOL: StreamProtocol = StreamProtocol::new("/metainf/state/1");

/// Most state queries a peer may send this node per second.
pub const MAX_QUERIES_PER_S: u32 = 20;
/// Most state queries this node answers per second, from all peers together (many identities
/// cost an attacker nothing).
pub const MAX_ANSWERS_PER_S: u32 = 200;

/// How long a state query may take.
pub(crate) const TIMEOUT: Duration = Duration::from_secs(2);

/// "What is your state now?"
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateRequest;

/// The answer: the host's heartbeat as of now, as its encoded bytes (checked against the
/// heartbeat limit before decoding).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateResponse(pub Vec<u8>);

pub(crate) type StateCodec = super::frame::FrameCodec<StateRequest, StateResponse>;

/// Where a state query's answer goes.
pub(super) type StateAnswer = oneshot::Sender<Result<Heartbeat, NetError>>;

impl EventLoop {
    /// Asks `peer` for its state: over its connection, or dialling it again when it is
    /// reachable (see [`super::PeerStatus::reachable`]) but not connected.
    pub(super) fn query_state(&mut self, peer: PeerId, reply: StateAnswer) {
        let reachable = self.swarm.is_connected(&peer)
            || self.peers.get(&peer).is_some_and(|p| self.reachable(p));
        if !reachable {
            let _ = reply.send(Err(NetError::Peer {
                peer,
                reason: "not reachable".into(),
            }));
            return;
        }
        self.sending(peer);
        self.counters.state_queries_sent = self.counters.state_queries_sent.saturating_add(1);
        let id = self
            .swarm
            .behaviour_mut()
            .state
            .send_request(&peer, StateRequest);
        self.state_calls.insert(id, reply);
    }

    /// Whether `peer` may ask again now (one-second windows of [`MAX_QUERIES_PER_S`] per peer
    /// and [`MAX_ANSWERS_PER_S`] in all). The per-peer windows are dropped when the peer
    /// disconnects, and stale ones at every heartbeat.
    fn may_query(&mut self, peer: PeerId) -> bool {
        let now = Instant::now();
        let window = |(start, count): &mut (Instant, u32), limit: u32| {
            if now.duration_since(*start) >= Duration::from_secs(1) {
                *start = now;
                *count = 0;
            }
            *count = count.saturating_add(1);
            *count <= limit
        };
        if !window(&mut self.state_answers, MAX_ANSWERS_PER_S) {
            return false;
        }
        window(
            self.state_queries.entry(peer).or_insert((now, 0)),
            MAX_QUERIES_PER_S,
        )
    }

    pub(super) fn on_state_event(
        &mut self,
        event: request_response::Event<StateRequest, StateResponse>,
    ) {
        match event {
            request_response::Event::Message { peer, message, .. } => match message {
                request_response::Message::Request { channel, .. } => {
                    if self.banned.contains(&peer) || !self.may_query(peer) {
                        debug!(%peer, "state query dropped (banned or over its rate)");
                        return;
                    }
                    let answer = codec::encode(&self.own_heartbeat()).unwrap_or_default();
                    let c = &mut self.counters;
                    c.state_queries_answered = c.state_queries_answered.saturating_add(1);
                    let _ = self
                        .swarm
                        .behaviour_mut()
                        .state
                        .send_response(channel, StateResponse(answer));
                }
                request_response::Message::Response {
                    request_id,
                    response,
                } => self.on_state_response(peer, request_id, response),
            },
            request_response::Event::OutboundFailure {
                peer,
                request_id,
                error,
                ..
            } => {
                if let Some(reply) = self.state_calls.remove(&request_id) {
                    let _ = reply.send(Err(NetError::Peer {
                        peer,
                        reason: error.to_string(),
                    }));
                }
            }
            _ => {}
        }
    }

    fn on_state_response(
        &mut self,
        peer: PeerId,
        request_id: OutboundRequestId,
        response: StateResponse,
    ) {
        let Some(reply) = self.state_calls.remove(&request_id) else {
            return;
        };
        let checked = codec::decode_with_limit::<Heartbeat>(&response.0, MAX_HEARTBEAT_BYTES)
            .map_err(|e| e.to_string())
            .and_then(|h| h.validate().map(|()| h).map_err(|e| e.to_string()))
            .and_then(|h| {
                if h.peer == peer {
                    Ok(h)
                } else {
                    Err(format!("its state names another peer ({})", h.peer))
                }
            });
        match checked {
            Ok(h) => {
                // Kept as its state where newer; the caller gets it either way (and compares).
                self.take_heartbeat(h.clone());
                let _ = reply.send(Ok(h));
            }
            Err(reason) => {
                debug!(%peer, %reason, "a state answer was refused");
                let _ = reply.send(Err(NetError::Peer { peer, reason }));
            }
        }
    }
}
