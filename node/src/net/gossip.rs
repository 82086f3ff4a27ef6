//! Gossip on `metainf/records/1` and `metainf/heartbeats/1`.
//!
//! Messages are validated before they are forwarded (gossipsub's manual validation). A
//! heartbeat is small and checked here (size, decoding, ranges, sender = the peer it names).
//! A record needs a signature check and a look at the store, so it goes out as a
//! [`NetEvent::Record`] and waits in gossipsub's cache until the replica reports its verdict;
//! the loop itself never waits for a disk.

use libp2p::PeerId;
use libp2p::gossipsub::{self, MessageAcceptance};
use metainf_protocol::{Heartbeat, codec};
use tracing::{debug, warn};

use super::MAX_HEARTBEAT_BYTES;
use super::config::NetError;
use super::event::{GossipRecord, GossipTicket, GossipVerdict, NetEvent};
use super::event_loop::EventLoop;
use crate::clock::now_ms;

impl EventLoop {
    pub(super) fn on_gossip_event(&mut self, event: gossipsub::Event) {
        let gossipsub::Event::Message {
            propagation_source,
            message_id,
            message,
        } = event
        else {
            return;
        };
        let ticket = GossipTicket {
            message_id,
            source: propagation_source,
        };
        if message.topic == self.records.hash() {
            let record = GossipRecord {
                data: message.data,
                ticket,
            };
            if let Err(NetEvent::Record(record)) = self.emit(NetEvent::Record(record)) {
                // Not checked, so neither forwarded nor held against the sender.
                self.report_record(record.ticket, GossipVerdict::Ignore);
            }
        } else if message.topic == self.heartbeats.hash() {
            let verdict = self.on_heartbeat_message(message.source, &message.data);
            self.report_record(ticket, verdict);
        } else {
            self.report_record(ticket, GossipVerdict::Ignore);
        }
    }

    /// Tells gossipsub what a message deserves.
    pub(super) fn report_record(&mut self, ticket: GossipTicket, verdict: GossipVerdict) {
        let acceptance = match verdict {
            GossipVerdict::Accept => MessageAcceptance::Accept,
            GossipVerdict::Ignore => MessageAcceptance::Ignore,
            GossipVerdict::Reject => {
                warn!(peer = %ticket.source, "rejected an invalid gossip message");
                MessageAcceptance::Reject
            }
        };
        self.swarm
            .behaviour_mut()
            .gossipsub
            .report_message_validation_result(&ticket.message_id, &ticket.source, acceptance);
    }

    fn on_heartbeat_message(&mut self, source: Option<PeerId>, data: &[u8]) -> GossipVerdict {
        let heartbeat = match codec::decode_with_limit::<Heartbeat>(data, MAX_HEARTBEAT_BYTES) {
            Ok(h) if h.validate().is_ok() && Some(h.peer) == source => h,
            _ => return GossipVerdict::Reject,
        };
        let peer = heartbeat.peer;
        self.seen(peer);
        if let Some(status) = self.peers.get_mut(&peer) {
            status.heartbeat = Some(heartbeat.clone());
        }
        // The replica remembers it on disk; a full channel loses only this copy.
        let _ = self.emit(NetEvent::Heartbeat(Box::new(heartbeat)));
        GossipVerdict::Accept
    }

    /// Gossips a record's wire bytes (already stored by whoever made it).
    pub(super) fn gossip_record(&mut self, bytes: Vec<u8>) -> Result<(), NetError> {
        match self
            .swarm
            .behaviour_mut()
            .gossipsub
            .publish(self.records.clone(), bytes)
        {
            Ok(_) => Ok(()),
            // Alone on the network, or sent before: anti-entropy spreads it.
            Err(gossipsub::PublishError::NoPeersSubscribedToTopic)
            | Err(gossipsub::PublishError::Duplicate) => Ok(()),
            Err(e) => Err(NetError::Publish(e.to_string())),
        }
    }

    pub(super) fn send_heartbeat(&mut self) {
        let local = *self.swarm.local_peer_id();
        let records_seq = self.records_seq.as_ref().map_or(0, |s| *s.borrow());
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
            free_memory_bytes: metainf_profiler::hardware::available_memory_bytes(),
            hardware: self.hardware,
            profile: Some(self.profile.clone()),
            records_seq,
            load: offer.load,
        };
        match codec::encode(&heartbeat) {
            Ok(bytes) => {
                // No peers yet is not an error.
                let _ = self
                    .swarm
                    .behaviour_mut()
                    .gossipsub
                    .publish(self.heartbeats.clone(), bytes);
            }
            Err(e) => debug!(error = %e, "cannot encode a heartbeat"),
        }
    }
}
