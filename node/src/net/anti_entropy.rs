//! Anti-entropy over `/metainf/sync/2`: on connecting and then periodically, the replica
//! compares this node's version vector with each peer's by range digest and pulls what it lacks
//! in bounded pages, one pull per origin at a time and a few in flight, so memory stays bounded
//! however far behind a node is.
//!
//! The loop keeps only the flow control (which pulls are queued, in flight or being stored, and
//! which sync calls wait for an answer). Reading the store to answer, comparing vectors and
//! storing pages are the replica's: the loop hands them out as [`NetEvent`]s and hears back
//! through [`Client`](super::Client) commands.
//!
//! A peer is held to what it claims: a pull it answers with an empty page (after its summary
//! promised records) is a broken promise, and after [`MAX_BROKEN_PROMISES`] of them its queued
//! pulls are dropped and it is not asked again for [`DISTRUST_FOR`]: a fake vector costs the
//! peer that sent it its own sync, not this node an unbounded queue.

use std::collections::hash_map::Entry;
use std::time::{Duration, Instant};

use libp2p::PeerId;
use libp2p::request_response::{self, OutboundRequestId};
use tokio::sync::oneshot;
use tracing::{debug, warn};

use super::config::NetError;
use super::event::{InboundSync, NetEvent};
use super::event_loop::EventLoop;
use super::sync::{MAX_PAGE, SyncRequest, SyncResponse};

/// Most pull requests in flight at once (each holds at most one page).
const MAX_PULLS_IN_FLIGHT: usize = 4;
/// Most pulls queued; past this, what is missing is pulled in a later round.
const MAX_QUEUED_PULLS: usize = 65_536;
/// Empty pages a peer may answer pulls with before it is distrusted.
pub(super) const MAX_BROKEN_PROMISES: u32 = 16;
/// How long a distrusted peer is not asked anything.
pub(super) const DISTRUST_FOR: Duration = Duration::from_secs(600);

impl EventLoop {
    /// Asks the replica to compare vectors with every connected peer it trusts.
    pub(super) fn start_sync_round(&mut self) {
        let now = Instant::now();
        self.distrusted.retain(|_, until| *until > now);
        let peers: Vec<PeerId> = self
            .swarm
            .connected_peers()
            .filter(|p| !self.distrusted.contains_key(p))
            .copied()
            .collect();
        if !peers.is_empty() {
            let _ = self.emit(NetEvent::SyncDue(peers));
        }
    }

    /// Sends a sync request whose answer goes to `reply`.
    pub(super) fn sync_call(
        &mut self,
        peer: PeerId,
        request: SyncRequest,
        reply: oneshot::Sender<Result<SyncResponse, NetError>>,
    ) {
        if self.distrusted.contains_key(&peer) {
            let _ = reply.send(Err(NetError::Peer {
                peer,
                reason: "its sync answers broke their promises; not asked for a while".into(),
            }));
            return;
        }
        // Anti-entropy runs over the connections there are; it never dials. A round queued
        // behind others may find its peer gone (trimmed, or it trimmed this node): dialling
        // it back would make each trim a new connection, and each new connection a new round.
        if !self.swarm.is_connected(&peer) {
            let _ = reply.send(Err(NetError::Peer {
                peer,
                reason: "not connected".into(),
            }));
            return;
        }
        self.sending(peer);
        self.counters.sync_requests_sent = self.counters.sync_requests_sent.saturating_add(1);
        let id = self.swarm.behaviour_mut().sync.send_request(&peer, request);
        self.sync_calls.insert(id, reply);
    }

    pub(super) fn on_sync_event(
        &mut self,
        event: request_response::Event<SyncRequest, SyncResponse>,
    ) {
        match event {
            request_response::Event::Message { peer, message, .. } => {
                self.seen(peer);
                match message {
                    request_response::Message::Request {
                        request, channel, ..
                    } => {
                        let inbound = Box::new(InboundSync {
                            peer,
                            request,
                            channel,
                            tx: self.self_tx.clone(),
                        });
                        if let Err(NetEvent::SyncRequest(inbound)) =
                            self.emit(NetEvent::SyncRequest(inbound))
                        {
                            let _ = self.swarm.behaviour_mut().sync.send_response(
                                inbound.channel,
                                SyncResponse::Error("busy; ask again later".into()),
                            );
                        }
                    }
                    request_response::Message::Response {
                        request_id,
                        response,
                    } => self.on_sync_response(peer, request_id, response),
                }
            }
            request_response::Event::OutboundFailure {
                peer,
                request_id,
                error,
                ..
            } => {
                debug!(%peer, %error, "sync request failed");
                if let Some(reply) = self.sync_calls.remove(&request_id) {
                    let _ = reply.send(Err(NetError::Peer {
                        peer,
                        reason: error.to_string(),
                    }));
                }
                if let Some((_, origin, _)) = self.pulls.remove(&request_id) {
                    self.pulling.remove(&origin);
                    self.drive_pulls();
                }
            }
            _ => {}
        }
    }

    fn on_sync_response(
        &mut self,
        peer: PeerId,
        request_id: OutboundRequestId,
        response: SyncResponse,
    ) {
        if let Some(reply) = self.sync_calls.remove(&request_id) {
            let _ = reply.send(Ok(response));
            return;
        }
        let Some((peer, origin, after)) = self.pulls.remove(&request_id).or_else(|| {
            debug!(%peer, "an answer to no sync request");
            None
        }) else {
            return;
        };
        match response {
            SyncResponse::Page {
                records,
                next_after,
            } => {
                // What was asked for, in order, and a cursor that moves on: anything else is a
                // broken promise, refused before a signature is checked.
                let in_order = records
                    .iter()
                    .map(|r| r.record.seq)
                    .try_fold(after, |prev, seq| (seq > prev).then_some(seq));
                let valid = !records.is_empty()
                    && records.iter().all(|r| r.record.origin == origin)
                    && in_order.is_some_and(|last| next_after.is_none_or(|n| n >= last));
                if !valid {
                    self.broken_promise(peer);
                    self.page_stored(peer, origin, None);
                    return;
                }
                let page = NetEvent::SyncPage {
                    peer,
                    origin,
                    records,
                    next_after,
                };
                if self.emit(page).is_err() {
                    // Dropped: the next round pulls it again.
                    self.page_stored(peer, origin, None);
                }
            }
            SyncResponse::Error(e) => {
                warn!(%peer, error = %e, "peer could not serve a sync request");
                self.page_stored(peer, origin, None);
            }
            _ => {
                self.broken_promise(peer);
                self.page_stored(peer, origin, None);
            }
        }
    }

    /// A peer's pull answer did not hold what its summary promised.
    fn broken_promise(&mut self, peer: PeerId) {
        let count = self.broken_promises.entry(peer).or_default();
        *count += 1;
        if *count >= MAX_BROKEN_PROMISES {
            warn!(%peer, "a peer's sync summaries promise records it does not send; not syncing with it for a while");
            self.broken_promises.remove(&peer);
            self.distrusted.insert(peer, Instant::now() + DISTRUST_FOR);
            self.pull_queue.retain(|(p, _, _)| *p != peer);
            self.pulling.retain(|_, p| *p != peer);
        }
    }

    /// A pulled page was handled: frees its origin, and pulls the next page if there is one.
    pub(super) fn page_stored(&mut self, peer: PeerId, origin: PeerId, next_after: Option<u64>) {
        if self.pulling.get(&origin) == Some(&peer) {
            self.pulling.remove(&origin);
        }
        if let Some(after) = next_after
            && self.swarm.is_connected(&peer)
        {
            self.queue_pull(peer, origin, after);
        }
        self.drive_pulls();
    }

    pub(super) fn queue_pull(&mut self, peer: PeerId, origin: PeerId, after: u64) {
        if self.distrusted.contains_key(&peer) || self.pull_queue.len() >= MAX_QUEUED_PULLS {
            return;
        }
        // One pull per origin at a time across all peers: no duplicate downloads.
        if let Entry::Vacant(e) = self.pulling.entry(origin) {
            e.insert(peer);
            self.pull_queue.push_back((peer, origin, after));
        }
    }

    pub(super) fn drive_pulls(&mut self) {
        while self.pulls.len() < MAX_PULLS_IN_FLIGHT {
            let Some((peer, origin, after)) = self.pull_queue.pop_front() else {
                break;
            };
            self.counters.sync_requests_sent = self.counters.sync_requests_sent.saturating_add(1);
            let id = self.swarm.behaviour_mut().sync.send_request(
                &peer,
                SyncRequest::Pull {
                    origin,
                    after,
                    limit: self.config.page_size.clamp(1, MAX_PAGE),
                },
            );
            self.pulls.insert(id, (peer, origin, after));
        }
    }
}
