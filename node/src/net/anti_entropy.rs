//! Anti-entropy over `/metainf/sync/1`: on connecting and then periodically, peers exchange
//! version vectors and pull what they lack in bounded pages, one pull per origin at a time and a
//! few in flight, so memory stays bounded however far behind a node is.
//!
//! The loop keeps only the flow control (which pulls are queued, in flight or being stored).
//! Reading the store to answer, comparing vectors and storing pages are the replica's: the loop
//! hands them out as [`NetEvent`]s and hears back through [`Client`](super::Client) commands.

use std::collections::BTreeMap;

use libp2p::PeerId;
use libp2p::request_response::{self, OutboundRequestId};
use tracing::{debug, warn};

use super::event::{InboundSync, NetEvent};
use super::event_loop::EventLoop;
use super::sync::{MAX_PAGE, SyncRequest, SyncResponse};

/// Most pull requests in flight at once (each holds at most one page).
const MAX_PULLS_IN_FLIGHT: usize = 4;

impl EventLoop {
    /// Asks the replica to compare vectors with every connected peer.
    pub(super) fn start_sync_round(&mut self) {
        let peers: Vec<PeerId> = self.swarm.connected_peers().copied().collect();
        if !peers.is_empty() {
            let _ = self.emit(NetEvent::SyncDue(peers));
        }
    }

    pub(super) fn offer_summary(&mut self, peer: PeerId, vector: BTreeMap<PeerId, u64>) {
        self.swarm
            .behaviour_mut()
            .sync
            .send_request(&peer, SyncRequest::Summary { vector });
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
                if let Some((peer, origin)) = self.pulls.remove(&request_id) {
                    self.pulling.remove(&(peer, origin));
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
        match response {
            SyncResponse::Summary { vector } => {
                let _ = self.emit(NetEvent::SyncSummary { peer, vector });
            }
            SyncResponse::Page {
                records,
                next_after,
            } => {
                let Some((peer, origin)) = self.pulls.remove(&request_id) else {
                    return;
                };
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
                if let Some((peer, origin)) = self.pulls.remove(&request_id) {
                    self.pulling.remove(&(peer, origin));
                    self.drive_pulls();
                }
            }
        }
    }

    /// A pulled page was handled: frees its origin, and pulls the next page if there is one.
    pub(super) fn page_stored(&mut self, peer: PeerId, origin: PeerId, next_after: Option<u64>) {
        self.pulling.remove(&(peer, origin));
        if let Some(after) = next_after
            && self.swarm.is_connected(&peer)
        {
            self.queue_pull(peer, origin, after);
        }
        self.drive_pulls();
    }

    pub(super) fn queue_pull(&mut self, peer: PeerId, origin: PeerId, after: u64) {
        // One pull per origin at a time across all peers: no duplicate downloads.
        if self.pulling.iter().any(|(_, o)| *o == origin) {
            return;
        }
        self.pulling.insert((peer, origin));
        self.pull_queue.push_back((peer, origin, after));
    }

    pub(super) fn drive_pulls(&mut self) {
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
